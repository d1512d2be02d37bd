#!/usr/bin/env bash
# End-to-end: the XDP pre-filter (host.json "xdp_prefilter") on a real TAP fed
# the way QEMU's userspace virtio-net feeds it (IFF_TAP|IFF_NO_PI, send buffer
# INT_MAX, non-blocking writes: XDP runs before the kernel builds an skb).
#
#   hv:   TAP vf-tap1 (persistent, `ip tuntap`), gateway 10.31.0.1/32 on it,
#         route 10.31.0.2/32 dev vf-tap1; wan0 10.99.0.1/24 -> netns "inet"
#         (10.99.0.2, UDP 9000 records what arrives).
#   vm1:  no namespace: tap_write.py plays the VMM and writes vm1's frames
#         (MAC 02:00:00:00:31:02, 10.31.0.2) into the TAP.
#
# Checks: XDP is attached to the TAP as vmfence_xdp_from_vm; a spoofed frame
# never reaches inet and is dropped at XDP (tcx's run count does not move,
# status counts spoofed_ip, journald-style log line); vm1's own frame still
# reaches inet; turning the switch off detaches XDP on reload (tcx still
# drops the spoofed frame), on again re-attaches; the XDP link outlives the
# daemon (fail closed) and is adopted by the next one; `vmfence down`
# removes it. Needs root. NO_VMFENCE=1: topology only (the spoofed frame
# then reaches inet).
set -u
. "$(dirname "$0")/lib.sh"
e2e_init prefilter

TAP=vf-tap1
VM_MAC=02:00:00:00:31:02
TAP_WRITE="$E2E_DIR/tools/tap_write.py"

section topology
hv_add
ip -n "$HV" tuntap add dev "$TAP" mode tap || fatal "tuntap $TAP"
ipn hv link set "$TAP" up
ipn hv addr add 10.31.0.1/32 dev "$TAP"
ipn hv route add 10.31.0.2/32 dev "$TAP"
nsx hv sysctl -qw "net.ipv6.conf.$TAP.disable_ipv6=1"
wan_add inet wan0 10.99.0.1/24 10.99.0.2/24
TAP_MAC=$(mac_of hv "$TAP")
serve_udp inet 9000
wait_listen inet 9000 udp

write_host '{ "wan_interfaces": ["wan0"], "xdp_prefilter": true,
  "on_violation": { "action": "alert", "threshold": 1000000, "window_ms": 1000 } }'
write_vm vm1 '{ "name": "vm1", "interface": "'$TAP'", "mac": "'$VM_MAC'",
  "addresses": ["10.31.0.2/32"], "gateway": ["10.31.0.1"],
  "egress": [ { "to": "10.99.0.0/24", "proto": "udp", "ports": ["9000"] } ] }'

# send SRC TOKEN: one UDP frame from vm1's MAC, SRC -> 10.99.0.2:9000, written
# into the TAP like a VMM writes; true when inet received TOKEN.
send() {
	nsx hv "$PY" "$TAP_WRITE" "$TAP" "$VM_MAC" "$TAP_MAC" "$1" 10.99.0.2 9000 "$2" || return 2
	udp_log_has inet 9000 "$2" 2
}

# xdp_prog: name of the XDP program on the TAP ("" when none).
xdp_prog() {
	local id
	id=$(ipn hv -d link show dev "$TAP" | grep -o 'prog/xdp id [0-9]*' | awk '{print $3}')
	[ -n "$id" ] || return 0
	bpftool prog show id "$id" | awk 'NR==1 {for (i = 1; i < NF; i++) if ($i == "name") print $(i + 1)}'
}

# run_cnt xdp|tcx: how often the TAP's XDP or tcx ingress program has run
# (bpf stats on).
run_cnt() {
	local id
	if [ "$1" = xdp ]; then
		id=$(ipn hv -d link show dev "$TAP" | grep -o 'prog/xdp id [0-9]*' | awk '{print $3}')
	else
		id=$(tap_prog_id)
	fi
	# bpftool prints run_cnt only once the program has run.
	bpftool prog show id "$id" 2>/dev/null | grep -o 'run_cnt [0-9]*' | awk '{n = $2} END {print n + 0}'
}

# tap_prog_id: id of the tcx ingress program on the TAP.
tap_prog_id() {
	local ifindex
	ifindex=$(ipn hv -o link show dev "$TAP" | awk -F: '{print $1; exit}')
	nsx hv "$PY" -c '
import ctypes, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
ids = (ctypes.c_uint32 * 8)()
attr = ctypes.create_string_buffer(struct.pack("=IIIIQII", int(sys.argv[1]), 46, 0, 0, ctypes.addressof(ids), 8, 0), 128)
if libc.syscall(321, 16, attr, 128) == 0 and struct.unpack_from("=I", attr.raw, 24)[0]:
    print(ids[0])
' "$ifindex"
}

# wait_xdp WANT: until the TAP's XDP program is WANT ("" = none), max 5 s.
wait_xdp() {
	local i
	for i in $(seq 50); do
		[ "$(xdp_prog)" = "$1" ] && return 0
		sleep 0.1
	done
	return 1
}

STATS_WAS=$(cat /proc/sys/kernel/bpf_stats_enabled)
restore_stats() { echo "$STATS_WAS" >/proc/sys/kernel/bpf_stats_enabled; }

section "pre-filter on"
start_daemon
expect_ok "vm1's own frame reaches inet" send 10.31.0.2 clean-1
expect_blocked "a frame with a spoofed source does not reach inet" send 10.31.0.77 spoof-1
if enforced; then
	expect_ok "XDP on the TAP is vmfence_xdp_from_vm" wait_xdp vmfence_xdp_from_vm
	echo 1 >/proc/sys/kernel/bpf_stats_enabled
	tcx0=$(run_cnt tcx) xdp0=$(run_cnt xdp) drops0=$(drop_count vm1 spoofed_ip)
	send 10.31.0.78 spoof-2
	tcx1=$(run_cnt tcx) xdp1=$(run_cnt xdp) drops1=$(drop_count vm1 spoofed_ip)
	restore_stats
	expect_ok "the spoofed frame ran XDP ($xdp0 -> $xdp1)" test "$xdp1" -gt "$xdp0"
	expect_ok "tcx never saw it: dropped at XDP ($tcx0 -> $tcx1)" test "$tcx1" = "$tcx0"
	expect_ok "status counts it as spoofed_ip ($drops0 -> $drops1)" test "$drops1" = $((drops0 + 1))
	expect_log "the drop is reported" "$(violation_re vm1 spoofed_ip 'src=10.31.0.78')"

	section "pre-filter off: reload detaches it, tcx still drops"
	mark_log
	write_host '{ "wan_interfaces": ["wan0"],
	  "on_violation": { "action": "alert", "threshold": 1000000, "window_ms": 1000 } }'
	expect_ok "XDP detached after host.json turned it off" wait_xdp ""
	echo 1 >/proc/sys/kernel/bpf_stats_enabled
	tcx0=$(run_cnt tcx)
	expect_fail "a spoofed frame is still dropped (by tcx)" send 10.31.0.79 spoof-3
	tcx1=$(run_cnt tcx)
	restore_stats
	expect_ok "tcx judged it ($tcx0 -> $tcx1)" test "$tcx1" -gt "$tcx0"
	expect_ok "vm1's own frame still reaches inet" send 10.31.0.2 clean-2

	section "pre-filter on again; daemon stopped and restarted"
	write_host '{ "wan_interfaces": ["wan0"], "xdp_prefilter": true,
	  "on_violation": { "action": "alert", "threshold": 1000000, "window_ms": 1000 } }'
	expect_ok "XDP attached again" wait_xdp vmfence_xdp_from_vm
	stop_daemon
	expect_ok "the XDP link outlives the daemon" wait_xdp vmfence_xdp_from_vm
	expect_fail "a spoofed frame is dropped while no daemon runs" send 10.31.0.80 spoof-4
	start_daemon
	expect_ok "the next daemon keeps the pre-filter" wait_xdp vmfence_xdp_from_vm
	expect_ok "vm1's own frame reaches inet after the restart" send 10.31.0.2 clean-3
	stop_daemon
	vmf down --config "$CONF" >>"$WORK/down.log" 2>&1
	expect_ok "vmfence down removes the XDP program" wait_xdp ""
fi
e2e_finish
