#!/bin/sh
# The whole test suite: unit tests, BPF program tests (BPF_PROG_TEST_RUN) and
# end-to-end tests in network namespaces. Needs root (BPF, namespaces, nft).
# With CI=true a test that cannot run fails instead of skipping.
set -eu
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "scripts/test.sh: needs root (BPF programs, network namespaces, nftables)" >&2
  exit 1
fi
./scripts/build.sh
cd build
ctest --output-on-failure "$@"
