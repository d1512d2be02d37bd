#!/usr/bin/env bash
# scripts/demo-topology.sh up|down|status
#
# The demo topology for config/example, entirely in network namespaces (the
# root namespace is not touched):
#
#   vmfence-demo-vm1   eth0 02:00:00:00:01:02 10.1.0.2/24, default via 10.1.0.1
#         |  veth
#   vmfence-demo-hv    vmf-vm1 (the "TAP") in bridge br-vm1 10.1.0.1/24
#                      vmf-vm2 (the "TAP") in bridge br-vm2 10.2.0.1/24
#                      vmf-wan 198.51.100.1/24, default route to the "internet"
#         |  veth
#   vmfence-demo-vm2   eth0 02:00:00:00:02:02 10.2.0.2/24, default via 10.2.0.1
#
#   vmfence-demo-wan   eth0 198.51.100.2/24: the internet. HTTP on :80 and :443
#                      (plain HTTP on both), a UDP echo on :53, and the IMDS
#                      stand-in: HTTP on 169.254.169.254:80.
#
# Then run the daemon inside the hypervisor namespace (scripts/demo.sh does):
#   nsenter --net=/run/netns/vmfence-demo-hv build/vmfence run --config config/example
# `up` on an existing demo rebuilds it; `down` also runs `vmfence down` for
# config/example (when the binary exists) so nothing of vmfence is left.
# Env: VMFENCE (default build/vmfence).
set -eu

REPO=$(cd "$(dirname "$0")/.." && pwd)
VMFENCE=${VMFENCE:-$REPO/build/vmfence}
PY=/usr/bin/python3
P=vmfence-demo
HV=$P-hv
RUN=/run/vmfence-demo

die() { echo "demo-topology: $*" >&2; exit 1; }

# A static HTTP server: ADDR PORT DIR. (python -m http.server resolves its own
# address with getfqdn first, which stalls for seconds in a namespace without DNS.)
HTTPD='
import functools, http.server, socketserver, sys
class Server(http.server.ThreadingHTTPServer):
    def server_bind(self):
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[3])
Server((sys.argv[1], int(sys.argv[2])), handler).serve_forever()
'


ns_exists() { [ -e "/run/netns/$1" ]; }

start_bg() { # NAME NS cmd...: a background server, pid in $RUN/NAME.pid
	local name=$1 ns=$2
	shift 2
	nsenter --net="/run/netns/$ns" -- setsid "$@" >"$RUN/$name.log" 2>&1 </dev/null &
	echo $! >"$RUN/$name.pid"
}

down() {
	if ns_exists "$HV" && [ -x "$VMFENCE" ]; then
		nsenter --net="/run/netns/$HV" -- "$VMFENCE" down --config "$REPO/config/example" ||
			echo "demo-topology: vmfence down failed (continuing)" >&2
	fi
	local f ns pid
	for f in "$RUN"/*.pid; do
		[ -e "$f" ] || continue
		kill "$(cat "$f")" 2>/dev/null || true
	done
	for ns in $HV $P-vm1 $P-vm2 $P-wan; do
		ns_exists "$ns" || continue
		# Anything still running in the demo namespaces was started for the demo.
		for pid in $(ip netns pids "$ns" 2>/dev/null); do kill "$pid" 2>/dev/null || true; done
		ip netns del "$ns"
	done
	rm -rf "$RUN"
	echo "demo-topology: down"
}

up() {
	[ "$(id -u)" = 0 ] || die "needs root"
	[ -x "$PY" ] || die "$PY missing (apt install python3)"
	down >/dev/null 2>&1 || true
	mkdir -p "$RUN/www" "$RUN/imds/latest/meta-data"

	ip netns add "$HV"
	ip -n "$HV" link set lo up
	ip netns exec "$HV" sysctl -qw net.ipv4.ip_forward=1

	local n
	for n in 1 2; do
		ip netns add "$P-vm$n"
		ip -n "$P-vm$n" link set lo up
		ip -n "$HV" link add "vmf-vm$n" type veth peer name eth0 netns "$P-vm$n"
		ip -n "$HV" link add "br-vm$n" type bridge
		ip -n "$HV" link set "vmf-vm$n" master "br-vm$n"
		ip -n "$HV" addr add "10.$n.0.1/24" dev "br-vm$n"
		ip -n "$HV" link set "br-vm$n" up
		ip -n "$HV" link set "vmf-vm$n" up
		ip -n "$P-vm$n" link set eth0 address "02:00:00:00:0$n:02"
		ip -n "$P-vm$n" addr add "10.$n.0.2/24" dev eth0
		ip -n "$P-vm$n" link set eth0 up
		ip -n "$P-vm$n" route add default via "10.$n.0.1"
	done

	ip netns add "$P-wan"
	ip -n "$P-wan" link set lo up
	ip -n "$HV" link add vmf-wan type veth peer name eth0 netns "$P-wan"
	ip -n "$HV" addr add 198.51.100.1/24 dev vmf-wan
	ip -n "$HV" link set vmf-wan up
	ip -n "$HV" route add default via 198.51.100.2
	ip -n "$P-wan" addr add 198.51.100.2/24 dev eth0
	ip -n "$P-wan" addr add 169.254.169.254/32 dev lo
	ip -n "$P-wan" link set eth0 up
	# Replies to unmasqueraded VM traffic (daemon not running) find their way back.
	ip -n "$P-wan" route add 10.0.0.0/8 via 198.51.100.1

	echo "hello from the demo internet" >"$RUN/www/index.html"
	echo "i-0vmfencedemo" >"$RUN/imds/latest/meta-data/instance-id"
	start_bg web80 "$P-wan" "$PY" -c "$HTTPD" 198.51.100.2 80 "$RUN/www"
	start_bg web443 "$P-wan" "$PY" -c "$HTTPD" 198.51.100.2 443 "$RUN/www"
	start_bg imds "$P-wan" "$PY" -c "$HTTPD" 169.254.169.254 80 "$RUN/imds"
	start_bg dns "$P-wan" socat UDP4-RECVFROM:53,bind=198.51.100.2,fork SYSTEM:cat
	local i
	for i in $(seq 50); do
		[ "$(nsenter --net="/run/netns/$P-wan" -- ss -Hltn | wc -l)" -ge 3 ] && break
		sleep 0.1
	done
	[ "$(nsenter --net="/run/netns/$P-wan" -- ss -Hltn | wc -l)" -ge 3 ] ||
		die "the demo HTTP servers did not start (see $RUN/*.log)"

	cat <<EOF
demo-topology: up
  hypervisor  $HV     (br-vm1 10.1.0.1, br-vm2 10.2.0.1, vmf-wan 198.51.100.1)
  VMs         $P-vm1 10.1.0.2 on vmf-vm1, $P-vm2 10.2.0.2 on vmf-vm2
  internet    $P-wan  198.51.100.2 (http :80 :443, udp echo :53), IMDS 169.254.169.254:80
run the daemon:
  nsenter --net=/run/netns/$HV $VMFENCE run --config $REPO/config/example
then try (from another shell):
  ip netns exec $P-vm1 curl -s http://198.51.100.2/                      # egress tcp/80: allowed
  ip netns exec $P-vm1 curl -s http://169.254.169.254/latest/meta-data/instance-id   # imds: allowed
  ip netns exec $P-vm1 curl -s -m 3 http://198.51.100.2:8080/            # not allowlisted: dropped
  ip netns exec $P-vm1 ping -c1 -W2 10.2.0.2                             # other group: dropped
  nsenter --net=/run/netns/$HV $VMFENCE status
clean up:
  $REPO/scripts/demo-topology.sh down
EOF
}

status() {
	local ns
	for ns in $HV $P-vm1 $P-vm2 $P-wan; do
		if ns_exists "$ns"; then
			echo "== $ns"
			ip -n "$ns" -br addr show | grep -v '^lo '
		else
			echo "== $ns: absent"
		fi
	done
}

case ${1:-} in
up) up ;;
down) down ;;
status) status ;;
*) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
