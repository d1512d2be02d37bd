#!/usr/bin/env bash
# Measurement only (issue: "is an XDP pre-filter on the TAP worth adding?").
# In a private network namespace: one persistent TAP fed by tap_writer (the
# way QEMU's userspace virtio-net feeds it: IFF_VNET_HDR, TUNSETSNDBUF INT_MAX,
# O_NONBLOCK, one write() per frame), with frames a VM is not allowed to send,
# dropped by each dropper in turn:
#   none          nothing attached: the stack drops them (baseline cost)
#   tcx-min       minimal tc program at tcx ingress (anti-spoof + 1-entry allowlist)
#   tcx-vmfence   the real vmfence_from_vm (the vmfence daemon, one-VM spec)
#   xdp-drv       the same minimal check as an XDP program, native mode
#   xdp-skb       the same, generic (skb) mode
#   xdp-drv-small xdp-drv, but the writer sets sndbuf 212992 (no build_skb:
#                 tun runs the program via do_xdp_generic on an skb)
#   tcx-vmfence-q the real vmfence_from_vm on a quarantined VM (on_violation
#                 terminate, command /bin/true: the first violation quarantines
#                 it, every later frame is dropped early as `quarantined`)
#   xdp-vmfence   the daemon with host.json "xdp_prefilter": vmfence's own
#                 XDP pre-filter drops spoofed frames (deny ones pass it and
#                 meet vmfence_from_vm at tcx)
#   xdp-vmfence-q xdp-vmfence on a quarantined VM
#   xdpas+vmfence (deny only) XDP anti-spoof only (passes the frame), the
#                 real vmfence_from_vm at tcx drops it: the proposed pre-filter
#                 on traffic it does not judge
# ROUNDS interleaved rounds (shuffled order per round), SECS s per run.
# Raw lines to $OUT/raw.txt; summarize.py makes the table.
# Env: ROUNDS (5), SECS (4), CPU (writer's CPU, 1), OUT ($BUILD/xdp/run-DATE),
#      BUILD (<repo>/build-xdp), CASES (override the case list).
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
BUILD=${BUILD:-$(cd "$(dirname "$0")/../.." && pwd)/build-xdp}
BIN=$BUILD/xdp
VMFENCE=${VMFENCE:-$BUILD/vmfence}
ROUNDS=${ROUNDS:-5}
SECS=${SECS:-4}
CPU=${CPU:-1}
OTHER_CPU=$((1 - CPU))
OUT=${OUT:-$BIN/run-$(date +%Y%m%d-%H%M%S)}
PFX=xdpb$$
NS=$PFX
TAP=vxtap0
PIN=/sys/fs/bpf/$PFX
RUNDIR=$OUT/vmfence-run
CFG=$OUT/cfg
mkdir -p "$OUT" "$RUNDIR" "$CFG/vms.d"
RAW=$OUT/raw.txt
: >"$RAW"
LOADER_PID= DAEMON_PID=

E() { nsenter --net="/run/netns/$NS" -- "$@"; }
vmf() { E env VMFENCE_PIN_DIR="$PIN" VMFENCE_RUN_DIR="$RUNDIR" "$VMFENCE" "$@"; }

cleanup() {
	[ -n "$LOADER_PID" ] && kill -TERM "$LOADER_PID" 2>/dev/null && wait "$LOADER_PID" 2>/dev/null
	[ -n "$DAEMON_PID" ] && kill -TERM "$DAEMON_PID" 2>/dev/null && wait "$DAEMON_PID" 2>/dev/null
	if [ -e "/run/netns/$NS" ]; then
		vmf down --config "$CFG" >>"$OUT/down.log" 2>&1
		ip -n "$NS" link set dev "$TAP" xdp off 2>/dev/null
		ip -n "$NS" link del "$TAP" 2>/dev/null
		ip netns del "$NS"
	fi
	rm -rf "$PIN"
	LOADER_PID= DAEMON_PID=
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ip netns add "$NS" || exit 1
ip -n "$NS" link set lo up
ip -n "$NS" tuntap add dev "$TAP" mode tap vnet_hdr
ip -n "$NS" link set "$TAP" up
ip -n "$NS" addr add 192.168.64.1/24 dev "$TAP"

cat >"$CFG/host.json" <<'J'
{ "on_violation": { "action": "alert", "threshold": 1, "window_ms": 1000 } }
J
# The same VM, terminate (quarantine on the first violation); the command does nothing.
CFGQ=$OUT/cfg-q
mkdir -p "$CFGQ/vms.d"
cat >"$CFGQ/host.json" <<'J'
{ "on_violation": { "action": "terminate", "command": ["/bin/true"], "threshold": 1, "window_ms": 1000 } }
J
cat >"$CFG/vms.d/vx1.json" <<J
{
  "name": "vx1", "interface": "$TAP", "mac": "52:54:00:12:34:56",
  "addresses": ["192.168.64.2/32"], "gateway": ["192.168.64.1"], "mode": "filtered",
  "egress": [ { "to": "203.0.113.7/32", "proto": "udp", "ports": ["51900"] } ],
  "on_violation": { "action": "alert" }
}
J
sed 's/"alert"/"terminate"/' "$CFG/vms.d/vx1.json" >"$CFGQ/vms.d/vx1.json"
# The same two with vmfence's XDP pre-filter on.
CFGX=$OUT/cfg-x CFGXQ=$OUT/cfg-xq
mkx() { mkdir -p "$2/vms.d" && cp "$1/vms.d/vx1.json" "$2/vms.d/" && sed 's/^{/{ "xdp_prefilter": true,/' "$1/host.json" >"$2/host.json"; }
mkx "$CFG" "$CFGX" && mkx "$CFGQ" "$CFGXQ" || exit 1
for c in "$CFG" "$CFGQ" "$CFGX" "$CFGXQ"; do vmf check --config "$c" || exit 1; done
DCFG=$CFG

rx() { ip -n "$NS" -j -s link show "$TAP" | python3 -c 'import json,sys; d=json.load(sys.stdin)[0]["stats64"]["rx"]; print("tap_rx_packets=%d tap_rx_dropped=%d"%(d["packets"],d["dropped"]))'; }

start_loader() { # MODE POLICY
	nsenter --net="/run/netns/$NS" -- taskset -c "$OTHER_CPU" "$BIN/xdp_loader" "$BIN/xdp_bench.bpf.o" "$1" "$TAP" "$2" >"$OUT/loader.out" 2>&1 &
	LOADER_PID=$!
	for _ in $(seq 100); do grep -q ready "$OUT/loader.out" && return 0; sleep 0.05; done
	echo "loader failed: $(cat "$OUT/loader.out")" >&2
	return 1
}
stop_loader() {
	kill -TERM "$LOADER_PID"; wait "$LOADER_PID"; LOADER_PID=
	grep -v ready "$OUT/loader.out" | tr '\n' ' ' >>"$OUT/extra"
}
start_daemon() {
	nsenter --net="/run/netns/$NS" -- taskset -c "$OTHER_CPU" env VMFENCE_PIN_DIR="$PIN" VMFENCE_RUN_DIR="$RUNDIR" \
		"$VMFENCE" run --config "$DCFG" >>"$OUT/daemon.log" 2>&1 &
	DAEMON_PID=$!
	vmf wait --vm vx1 --timeout 20 >/dev/null 2>&1 || { echo "vmfence wait failed" >&2; return 1; }
}
stop_daemon() {
	vmf status --json >"$OUT/status.json" 2>/dev/null
	kill -TERM "$DAEMON_PID"; wait "$DAEMON_PID"; DAEMON_PID=
	vmf down --config "$DCFG" >>"$OUT/down.log" 2>&1
	DCFG=$CFG
	python3 - "$OUT/status.json" >>"$OUT/extra" <<'P'
import json, sys
d = json.load(open(sys.argv[1]))
vms = d.get("vms", d) if isinstance(d, dict) else d
vm = None
if isinstance(vms, dict):
    vm = vms.get("vx1") or next((v for v in vms.values() if isinstance(v, dict) and "drops" in v), None)
elif isinstance(vms, list):
    vm = next((v for v in vms if v.get("name") == "vx1"), None)
if not vm:
    print("vmfence_status=unparsed"); sys.exit()
dr = {k: v for k, v in vm["drops"].items() if v}
c = vm["counters"]
print("vmfence_from_vm_packets=%d vmfence_drops=%d vmfence_drop_reasons=%s events_suppressed=%d events_lost=%d quarantined=%s" % (
    c["from_vm_packets"], sum(dr.values()), ",".join("%s:%d" % kv for kv in dr.items()) or "-",
    c["events_suppressed"], c["events_lost"], vm.get("quarantined")))
P
}

# case = dropper:kind:size
CASES=${CASES:-"
none:spoof:64 tcx-min:spoof:64 tcx-vmfence:spoof:64 tcx-vmfence-q:spoof:64 xdp-drv:spoof:64 xdp-skb:spoof:64 xdp-drv-small:spoof:64
none:spoof:512 tcx-min:spoof:512 tcx-vmfence:spoof:512 xdp-drv:spoof:512 xdp-skb:spoof:512
none:deny:64 tcx-min:deny:64 tcx-vmfence:deny:64 xdp-drv:deny:64 xdp-skb:deny:64 xdpas+vmfence:deny:64
"}

run_case() { # dropper kind size round
	local d=$1 kind=$2 size=$3 round=$4 extra= small= line pre post
	if ip -n "$NS" link show "$TAP" | grep -q xdp; then echo "XDP left on $TAP" >&2; exit 1; fi
	case $d in
	none) ;;
	tcx-min) start_loader tcx 1 || return ;;
	xdp-drv) start_loader xdp-drv 1 || return ;;
	xdp-skb) start_loader xdp-skb 1 || return ;;
	xdp-drv-small) start_loader xdp-drv 1 || return; small=small-sndbuf ;;
	tcx-vmfence) DCFG=$CFG; start_daemon || return ;;
	tcx-vmfence-q) DCFG=$CFGQ; start_daemon || return ;;
	xdp-vmfence) DCFG=$CFGX; start_daemon || return ;;
	xdp-vmfence-q) DCFG=$CFGXQ; start_daemon || return ;;
	xdpas+vmfence) DCFG=$CFG; start_daemon || return; start_loader xdp-drv 0 || return ;;
	esac
	pre=$(rx)
	line=$(E "$BIN/tap_writer" "$TAP" "$SECS" "$CPU" "$size" "$kind" 1 $small)
	post=$(rx)
	: >"$OUT/extra"
	case $d in
	none) ;;
	tcx-vmfence | tcx-vmfence-q | xdp-vmfence | xdp-vmfence-q) stop_daemon ;;
	xdpas+vmfence) stop_loader; stop_daemon ;;
	*) stop_loader ;;
	esac
	extra=$(tr '\n' ' ' <"$OUT/extra")
	echo "case=$d:$kind:$size round=$round $line pre_$(echo $pre | sed 's/ / pre_/') post_$(echo $post | sed 's/ / post_/') $extra" | tee -a "$RAW"
}

echo "# $(date -Is) kernel $(uname -r) rounds=$ROUNDS secs=$SECS writer_cpu=$CPU ns=$NS" | tee -a "$RAW"
for r in $(seq "$ROUNDS"); do
	for c in $(printf '%s\n' $CASES | shuf --random-source=<(yes "$r")); do
		IFS=: read -r d kind size <<<"$c"
		run_case "$d" "$kind" "$size" "$r"
	done
done
echo "raw results: $RAW"
