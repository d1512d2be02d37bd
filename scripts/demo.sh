#!/bin/sh
# Quick start: install dependencies, build, create the demo topology (a
# hypervisor namespace with two VM namespaces, see scripts/demo-topology.sh)
# and run the daemon on config/example inside the hypervisor namespace.
# Stop with Ctrl-C (enforcement stays); `scripts/demo-topology.sh down` cleans up.
set -eu
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
./scripts/build.sh
./scripts/demo-topology.sh up
echo "demo: try  ip netns exec vmfence-demo-vm1 ping -c1 10.2.0.2   (cross-group: dropped)"
echo "      and  nsenter --net=/run/netns/vmfence-demo-hv build/vmfence status"
exec nsenter --net=/run/netns/vmfence-demo-hv build/vmfence run --config config/example
