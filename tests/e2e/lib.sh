# shellcheck shell=bash
# tests/e2e/lib.sh - helpers for vmfence's end-to-end tests.
#
# Sourced by tests/e2e/*_test.sh. Every test builds its whole topology inside
# network namespaces it creates (the hypervisor "hv" is a namespace too), all
# named "$PFX-*" with a per-run random prefix, and removes them on exit. Nothing
# is configured in the root network namespace and traffic only goes to
# addresses inside the test namespaces.
#
# Environment:
#   VMFENCE      path of the vmfence binary (default: <repo>/build/vmfence)
#   NO_VMFENCE=1 topology-only mode: no daemon; every flow the test expects
#                vmfence to block must then SUCCEED (proves the topology
#                would carry it, so a block under vmfence is vmfence's doing);
#                log expectations are skipped. A normal (enforced) run that
#                used expect_blocked runs this control itself (see "control
#                run" below): a plain `bash X_test.sh` proves both sides.
#   E2E_CONTROL=0 skip that control run (a failure with CI=true).
#   KEEP=1       keep the work directory (config, daemon log) after the run.
#   CI=true      missing root or missing binary is a failure, never a skip
#                (CI set to anything but "", "0", "false" counts, as in the
#                C++ suites: tests/common/ci.h).
#   E2E_VERBOSE=1 print every command's output.
#
# Pinned maps go to /sys/fs/bpf/vmfence-e2e-$PFX (VMFENCE_PIN_DIR) and the run
# dir to the work dir (VMFENCE_RUN_DIR), so a test never touches a real
# deployment's /sys/fs/bpf/vmfence or /run/vmfence.
#
# Note: `ip netns exec` mounts a fresh /sys (hiding bpffs pins); everything that
# must see the pins (daemon, vmfence CLI, bpftool) runs under
# `nsenter --net=/run/netns/NAME` (helper: nsx).

E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$E2E_DIR/../.." && pwd)
VMFENCE=${VMFENCE:-$REPO/build/vmfence}
PY=/usr/bin/python3            # Debian's python3 with scapy (not the one on PATH)

E2E_PASS=0
E2E_FAIL=0
E2E_SKIP=0
E2E_FAILED_DESCS=()
E2E_BG_PIDS=()
E2E_T0=${EPOCHREALTIME/./}      # microseconds
E2E_SCRIPT=$(readlink -f -- "$0")   # the test script (re-run for the control)
E2E_CONTROL_PID=""
E2E_CONTROL_DONE=0
JOURNALD_STATE=""
DAEMON_PID=""
DAEMON_RC=""
LOG_MARK=0
ENFORCE=1
[ "${NO_VMFENCE:-0}" = 1 ] && ENFORCE=0

# ---------------------------------------------------------------- output -----

# _elapsed [T0_US]: seconds since T0 (default: start of the test), 2 decimals.
_elapsed() {
	local d=$(( ${EPOCHREALTIME/./} - ${1:-$E2E_T0} ))
	printf '%d.%02d' $((d / 1000000)) $(((d % 1000000) / 10000))
}
_ts() { printf '%6s' "$(_elapsed)"; }
say() { echo "[$(_ts)] $*"; }
section() { echo; echo "[$(_ts)] ===== $* ====="; }

# ------------------------------------------------------------- prologue ------

# e2e_in_ci: CI is set (anything but "", "0", "false"): cannot-run is a failure.
e2e_in_ci() {
	case ${CI:-} in "" | 0 | [Ff][Aa][Ll][Ss][Ee]) return 1 ;; *) return 0 ;; esac
}

# e2e_init NAME: root check, prefix, work dir, cleanup trap.
e2e_init() {
	TEST_NAME=$1
	if [ "$(id -u)" != 0 ]; then
		if e2e_in_ci; then
			echo "FAIL: $TEST_NAME needs root (network namespaces, BPF, TC); CI=true so this is a failure"
			exit 1
		fi
		echo "SKIP: $TEST_NAME needs root (network namespaces, BPF, TC)"
		exit 0
	fi
	local t
	for t in ip nsenter tc nft bpftool nc socat ping ss timeout; do
		command -v "$t" >/dev/null || { echo "FAIL: $TEST_NAME: missing tool $t (scripts/install-deps.sh)"; exit 1; }
	done
	[ -x "$PY" ] && "$PY" -c 'import scapy' 2>/dev/null ||
		{ echo "FAIL: $TEST_NAME: $PY with scapy missing (apt install python3-scapy)"; exit 1; }
	if [ "$ENFORCE" = 1 ] && [ ! -x "$VMFENCE" ]; then
		echo "FAIL: $TEST_NAME: vmfence binary not found at $VMFENCE (build it, set VMFENCE=..., or NO_VMFENCE=1 for a topology-only run)"
		exit 1
	fi
	# A per-run prefix no existing namespace uses.
	while :; do
		PFX=$(printf 'vf%04x%02x' "$RANDOM" "$((RANDOM % 256))")
		ip netns list 2>/dev/null | grep -q "^$PFX-" || break
	done
	WORK=$(mktemp -d "/tmp/vmfence-e2e-$TEST_NAME.XXXXXX")
	CONF=$WORK/config
	mkdir -p "$CONF/vms.d" "$WORK/run" "$WORK/srv"
	DLOG=$WORK/daemon.log
	: >"$DLOG"
	PIN=/sys/fs/bpf/vmfence-e2e-$PFX
	RUNDIR=$WORK/run
	HV=$PFX-hv
	trap e2e_cleanup EXIT
	trap 'say "interrupted"; exit 130' INT TERM
	say "$TEST_NAME: prefix $PFX, work dir $WORK, $([ "$ENFORCE" = 1 ] && echo "vmfence $VMFENCE" || echo "NO_VMFENCE: topology only")"
	if [ "$ENFORCE" = 1 ]; then
		: >"$WORK/e2e-blocked.cmds"
		[ "${E2E_CONTROL_MODE:-after}" = bg ] && [ "${E2E_CONTROL:-1}" != 0 ] && _control_start
	fi
	return 0
}

# ------------------------------------------------------------- control run ---
#
# A blocked flow proves nothing unless the same flow goes through without
# vmfence. So an enforced run that used expect_blocked runs the script again
# with NO_VMFENCE=1 (the control run: own prefix, namespaces and work dir, no
# daemon) and fails unless
#   - the control run passes, and
#   - every command an expect_blocked check ran here (the probe with its
#     source, destination and port: "$*" is the key) was run by an
#     expect_blocked check of the control run and succeeded there.
# The control runs from e2e_finish, after this run's checks (one run at a time:
# timing checks are not disturbed); a script that sets E2E_CONTROL_MODE=bg
# before e2e_init starts it at e2e_init instead, in parallel with this run.
# A script whose NO_VMFENCE=1 mode skips some expect_blocked checks (they need
# the daemon's state) must still run each of their commands through
# expect_blocked in that mode, or the coverage check below fails.

# _control_start: the control run, in the background.
_control_start() {
	: >"$WORK/control.report"
	NO_VMFENCE=1 E2E_CONTROL=0 E2E_CONTROL_REPORT="$WORK/control.report" \
		bash "$E2E_SCRIPT" </dev/null >"$WORK/control.log" 2>&1 &
	E2E_CONTROL_PID=$!
	say "control run (NO_VMFENCE=1) started, pid $E2E_CONTROL_PID"
}

# _control_finish: (run and) wait for the control run; count its result and
# whether it carried every blocked flow of this run.
_control_finish() {
	local rc n missing
	[ "$ENFORCE" = 1 ] && [ "$E2E_CONTROL_DONE" = 0 ] || return 0
	E2E_CONTROL_DONE=1
	n=$(cut -f1 "$WORK/e2e-blocked.cmds" 2>/dev/null | sort -u | wc -l)
	if [ -z "$E2E_CONTROL_PID" ]; then
		[ "$n" -gt 0 ] || return 0
		if [ "${E2E_CONTROL:-1}" = 0 ]; then
			if e2e_in_ci; then
				_fail "control run disabled (E2E_CONTROL=0) in CI: $n blocked flows not shown to pass without vmfence"
			else
				_skip "control run (E2E_CONTROL=0): $n blocked flows not shown to pass without vmfence"
			fi
			return 0
		fi
		section "control run (NO_VMFENCE=1): the $n blocked flows must go through without vmfence"
		_control_start
	else
		section "control run (NO_VMFENCE=1, started at the beginning): the $n blocked flows must go through without vmfence"
	fi
	wait "$E2E_CONTROL_PID"
	rc=$?
	E2E_CONTROL_PID=""
	sed 's/^/  [control] /' "$WORK/control.log"
	expect_ok "control run (NO_VMFENCE=1) succeeds (rc=$rc)" test "$rc" = 0
	[ "$n" -gt 0 ] || return 0
	missing=$(awk -F'\t' 'NR == FNR { if ($1 == "ok") ok[$2] = 1; next }
		!($1 in ok) && !seen[$1]++ { print "    | " $2 "  [" $1 "]" }' \
		"$WORK/control.report" "$WORK/e2e-blocked.cmds")
	if [ -z "$missing" ]; then
		_pass "control: each of the $n blocked flows went through without vmfence"
	else
		_fail "control: blocked flows not shown to go through without vmfence:"
		echo "$missing"
	fi
}

# _control_stop: end a control run still going (early exit).
_control_stop() {
	local i
	[ -n "$E2E_CONTROL_PID" ] || return 0
	if kill -0 "$E2E_CONTROL_PID" 2>/dev/null; then
		kill -TERM "$E2E_CONTROL_PID" 2>/dev/null
		# Its own cleanup removes its namespaces: give it time.
		for i in $(seq 300); do kill -0 "$E2E_CONTROL_PID" 2>/dev/null || break; sleep 0.1; done
		kill -KILL "$E2E_CONTROL_PID" 2>/dev/null
	fi
	wait "$E2E_CONTROL_PID" 2>/dev/null
	E2E_CONTROL_PID=""
}

# ------------------------------------------------------------- journald ------

# journald_ensure: a journald that answers on /run/systemd/journal/socket.
# When none does, one is started (tests/e2e/journald.sh: own session, no fd of
# this test) and stopped again, with its sockets, when the test ends.
journald_ensure() {
	[ -n "$JOURNALD_STATE" ] || JOURNALD_STATE=$WORK/journald.state
	if ! bash "$E2E_DIR/journald.sh" alive; then
		say "no journald answers: starting /lib/systemd/systemd-journald (stopped at the end)"
	fi
	bash "$E2E_DIR/journald.sh" start "$JOURNALD_STATE" || return 1
	[ -s "$JOURNALD_STATE" ] && say "journald pid $(cat "$JOURNALD_STATE") started for this test"
	return 0
}

# ------------------------------------------------------------- namespaces ----

# nsx NS cmd...: run cmd in netns $PFX-NS (NS may also be a full name).
nsx() {
	local ns=$1; shift
	case $ns in "$PFX"-*) ;; *) ns=$PFX-$ns ;; esac
	nsenter --net="/run/netns/$ns" -- "$@"
}
# ipn NS args...: ip in netns $PFX-NS.
ipn() { local ns=$1; shift; ip -n "$PFX-$ns" "$@"; }

# ns_add NAME: create netns $PFX-NAME with lo up.
ns_add() {
	ip netns add "$PFX-$1" || fatal "ip netns add $PFX-$1"
	ip -n "$PFX-$1" link set lo up
	nsx "$1" sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0
}

# hv_add: the hypervisor namespace, forwarding on, no rp_filter (vmfence alone
# must stop spoofing).
hv_add() {
	ns_add hv
	nsx hv sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
}

# vm_add VM TAP MAC: netns $PFX-VM whose eth0 (MAC) is the peer of the veth TAP
# in hv (the host end plays the VM's TAP device).
vm_add() {
	local vm=$1 tap=$2 mac=$3
	ns_add "$vm"
	ip -n "$HV" link add "$tap" type veth peer name eth0 netns "$PFX-$vm" || fatal "veth $tap"
	ipn "$vm" link set eth0 address "$mac"
	ipn "$vm" link set eth0 up
	ipn hv link set "$tap" up
}

# route_vm VM TAP IP GW: seed 003's routed /32 wiring. hv: GW/32 on TAP, proxy
# ARP, host route IP/32 -> TAP. VM: IP/32 on eth0, GW on link, default via GW.
route_vm() {
	local vm=$1 tap=$2 ip=$3 gw=$4
	ipn hv addr add "$gw/32" dev "$tap"
	nsx hv sysctl -qw "net.ipv4.conf.$tap.proxy_arp=1"
	ipn hv route add "$ip/32" dev "$tap"
	ipn "$vm" addr add "$ip/32" dev eth0
	ipn "$vm" route add "$gw/32" dev eth0
	ipn "$vm" route add default via "$gw" dev eth0
}

# bridge_add NAME CIDR: a bridge in hv with the host address CIDR.
bridge_add() {
	ipn hv link add "$1" type bridge
	ipn hv link set "$1" up
	[ -n "${2:-}" ] && ipn hv addr add "$2" dev "$1"
	return 0
}

# bridge_port BRIDGE TAP
bridge_port() { ipn hv link set "$2" master "$1"; }

# wan_add NS HV_IF HV_V4 NS_V4 [HV_V6 NS_V6]: an "internet" namespace NS behind
# veth HV_IF in hv; NS routes 10.0.0.0/8 (and fec0::/10) back via hv.
wan_add() {
	local ns=$1 hvif=$2 hv4=$3 ns4=$4 hv6=${5:-} ns6=${6:-}
	ns_add "$ns"
	ip -n "$HV" link add "$hvif" type veth peer name eth0 netns "$PFX-$ns" || fatal "veth $hvif"
	ipn hv addr add "$hv4" dev "$hvif"
	ipn "$ns" addr add "$ns4" dev eth0
	[ -n "$hv6" ] && ipn hv addr add "$hv6" dev "$hvif" nodad
	[ -n "$ns6" ] && ipn "$ns" addr add "$ns6" dev eth0 nodad
	ipn hv link set "$hvif" up
	ipn "$ns" link set eth0 up
	ipn "$ns" route add 10.0.0.0/8 via "${hv4%/*}"
	[ -n "$hv6" ] && ipn "$ns" -6 route add fec0::/10 via "${hv6%/*}"
	return 0
}

# mac_of NS IFACE
mac_of() { ipn "$1" -br link show dev "$2" | awk '{print $3}'; }

# ------------------------------------------------------------- processes -----

# spawn NS cmd...: start cmd in the background in netns NS; remembered for cleanup.
spawn() {
	local ns=$1; shift
	nsx "$ns" "$@" >>"$WORK/srv/bg.log" 2>&1 &
	E2E_BG_PIDS+=("$!")
}

# serve_tcp NS PORT: TCP server (IPv4 + IPv6) that answers every connection
# with "vmfence-e2e NS PORT peer=ADDR" (ADDR: the source it saw) and closes.
serve_tcp() {
	spawn "$1" "$PY" -u -c '
import socket, sys
ns, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", port))
s.listen(64)
while True:
    c, a = s.accept()
    try:
        c.sendall(("vmfence-e2e %s %d peer=%s\n" % (ns, port, a[0].replace("::ffff:", ""))).encode())
    except OSError:
        pass
    c.close()
' "$1" "$2"
}

# serve_udp NS PORT: UDP echo server (IPv4 + IPv6) that also records every
# datagram ("SRC PAYLOAD") in $WORK/srv/NS-udp-PORT.log.
serve_udp() {
	spawn "$1" "$PY" -u -c '
import socket, sys
port, log = int(sys.argv[1]), sys.argv[2]
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", port))
while True:
    d, a = s.recvfrom(65535)
    with open(log, "a") as f:
        f.write("%s %s\n" % (a[0].replace("::ffff:", ""), d.decode(errors="replace").strip()))
    s.sendto(d, a)
' "$2" "$WORK/srv/$1-udp-$2.log"
	: >>"$WORK/srv/$1-udp-$2.log"
}

# wait_listen NS PORT [udp]: until something listens there (max 5 s).
wait_listen() {
	local flag=-ltn i
	[ "${3:-}" = udp ] && flag=-lun
	for i in $(seq 50); do
		nsx "$1" ss -H $flag "sport = :$2" 2>/dev/null | grep -q . && return 0
		sleep 0.1
	done
	fatal "nothing listens on $1:$2"
}

# ------------------------------------------------------------- traffic -------

_fam() { case $1 in *:*) echo 6 ;; *) echo 4 ;; esac; }

# tcp_probe NS HOST PORT: connect and read the server's banner.
tcp_probe() {
	local out
	out=$(nsx "$1" timeout 6 nc -N -w 2 "$2" "$3" </dev/null 2>&1)
	[ "${E2E_VERBOSE:-0}" = 1 ] && echo "    tcp $1 -> $2:$3: ${out:-<nothing>}"
	case $out in *vmfence-e2e*) return 0 ;; *) return 1 ;; esac
}

# tcp_peer NS HOST PORT: the source address the server saw (after any NAT).
tcp_peer() {
	nsx "$1" timeout 6 nc -N -w 2 "$2" "$3" </dev/null 2>/dev/null | sed -n 's/^vmfence-e2e .* peer=//p'
}

# udp_probe NS HOST PORT: send a token, expect it echoed.
udp_probe() {
	local tok="tok$RANDOM$RANDOM" out addr
	if [ "$(_fam "$2")" = 6 ]; then addr="UDP6:[$2]:$3"; else addr="UDP4:$2:$3"; fi
	out=$(echo "$tok" | nsx "$1" timeout 6 socat -t 1 -T 3 - "$addr" 2>&1)
	[ "${E2E_VERBOSE:-0}" = 1 ] && echo "    udp $1 -> $2:$3: ${out:-<nothing>}"
	case $out in *"$tok"*) return 0 ;; *) return 1 ;; esac
}

# ping_probe NS HOST: one echo request, 2 s.
ping_probe() {
	local out
	out=$(nsx "$1" ping -"$(_fam "$2")" -n -c 1 -W 2 "$2" 2>&1)
	local rc=$?
	[ "${E2E_VERBOSE:-0}" = 1 ] && echo "    ping $1 -> $2: rc=$rc"
	return $rc
}

# neigh_resolved NS IFACE ADDR: the neighbour entry exists with a lladdr
# (REACHABLE, STALE, DELAY, PROBE or PERMANENT: resolution worked).
neigh_resolved() {
	local out
	out=$(ipn "$1" neigh show "$3" dev "$2")
	[ "${E2E_VERBOSE:-0}" = 1 ] && echo "    neigh $1 $3: $out"
	echo "$out" | grep -Eq 'lladdr .* (REACHABLE|STALE|DELAY|PROBE|PERMANENT)'
}

# scapy NS CODE...: run python with `from scapy.all import *` in netns NS.
scapy() {
	local ns=$1; shift
	nsx "$ns" "$PY" -c "
import logging; logging.getLogger('scapy.runtime').setLevel(logging.ERROR)
from scapy.all import *
conf.verb = 0
$*"
}

# udp_log_has NS PORT TOKEN [SECONDS]: did the UDP server on NS:PORT receive TOKEN?
udp_log_has() {
	local i n=$(( ${4:-2} * 10 ))
	for i in $(seq "$n"); do
		grep -q -- "$3" "$WORK/srv/$1-udp-$2.log" 2>/dev/null && return 0
		sleep 0.1
	done
	return 1
}

# tap_progs NS IFACE: the BPF programs attached to IFACE in NS, one line each:
# "tcx/ingress NAME", "tcx/egress NAME" (BPF_PROG_QUERY on the tcx hooks:
# bpftool 7.1 cannot list tcx) and "tc/ingress|egress ..." lines for classic
# cls_bpf filters (tc filter show).
tap_progs() {
	local ns=$1 dev=$2 ifindex id dir
	ifindex=$(ipn "$ns" -o link show dev "$dev" | awk -F: '{print $1; exit}')
	[ -n "$ifindex" ] || return 1
	nsx "$ns" "$PY" -c '
import ctypes, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
ifindex = int(sys.argv[1])
for at, name in ((46, "ingress"), (47, "egress")):
    ids = (ctypes.c_uint32 * 64)()
    attr = ctypes.create_string_buffer(struct.pack("=IIIIQII", ifindex, at, 0, 0, ctypes.addressof(ids), 64, 0), 128)
    if libc.syscall(321, 16, attr, 128) != 0:   # bpf(BPF_PROG_QUERY)
        continue
    cnt = struct.unpack_from("=I", attr.raw, 24)[0]
    for i in range(cnt):
        print(name, ids[i])
' "$ifindex" | while read -r dir id; do
		echo "tcx/$dir $(bpftool prog show id "$id" 2>/dev/null | awk 'NR==1 {for (i = 1; i < NF; i++) if ($i == "name") print $(i + 1)}')"
	done
	for dir in ingress egress; do
		nsx "$ns" tc filter show dev "$dev" "$dir" 2>/dev/null | grep -E '^filter ' | sed "s|^|tc/$dir |"
	done
	return 0
}

# ------------------------------------------------------------- config --------

# write_host JSON / write_vm NAME JSON
write_host() { printf '%s\n' "$1" >"$CONF/host.json"; }
write_vm() { printf '%s\n' "$2" >"$CONF/vms.d/$1.json"; }

# ------------------------------------------------------------- daemon --------

# vmf args...: the vmfence CLI in hv with the test's pin/run dirs.
vmf() {
	nsx hv env VMFENCE_PIN_DIR="$PIN" VMFENCE_RUN_DIR="$RUNDIR" "$VMFENCE" "$@"
}

# start_daemon [TIMEOUT]: vmfence run in hv, then vmfence wait for every VM of
# the config. Fatal when the daemon exits or a VM never goes live.
start_daemon() {
	local to=${1:-15} f vm t0
	if [ "$ENFORCE" != 1 ]; then say "NO_VMFENCE: daemon not started"; return 0; fi
	echo "----- vmfence run (start $(date +%T)) -----" >>"$DLOG"
	nsenter --net="/run/netns/$HV" -- env VMFENCE_PIN_DIR="$PIN" VMFENCE_RUN_DIR="$RUNDIR" \
		"$VMFENCE" run --config "$CONF" >>"$DLOG" 2>&1 &
	DAEMON_PID=$!
	DAEMON_RC=""
	t0=${EPOCHREALTIME/./}
	for f in "$CONF"/vms.d/*.json; do
		vm=$(basename "$f" .json)
		if ! vmf wait --vm "$vm" --timeout "$to" >>"$WORK/wait.log" 2>&1; then
			kill -0 "$DAEMON_PID" 2>/dev/null || { wait "$DAEMON_PID"; DAEMON_RC=$?; DAEMON_PID=""; }
			echo "--- daemon log ---"; tail -n 40 "$DLOG"; echo "--- wait log ---"; tail -n 10 "$WORK/wait.log"
			fatal "vmfence wait --vm $vm failed (daemon ${DAEMON_PID:+still running}${DAEMON_RC:+exited rc=$DAEMON_RC})"
		fi
	done
	if ! kill -0 "$DAEMON_PID" 2>/dev/null; then
		tail -n 40 "$DLOG"; fatal "daemon exited right after start"
	fi
	say "daemon pid $DAEMON_PID live for all VMs in $(_elapsed "$t0") s"
}

# stop_daemon [SIGNAL]: signal (TERM) and wait up to 10 s; DAEMON_RC = exit status.
stop_daemon() {
	local sig=${1:-TERM} i
	[ -n "$DAEMON_PID" ] || return 0
	kill -"$sig" "$DAEMON_PID" 2>/dev/null
	for i in $(seq 100); do
		kill -0 "$DAEMON_PID" 2>/dev/null || break
		sleep 0.1
	done
	if kill -0 "$DAEMON_PID" 2>/dev/null; then
		say "daemon did not exit 10 s after SIG$sig: SIGKILL"
		kill -KILL "$DAEMON_PID" 2>/dev/null
	fi
	wait "$DAEMON_PID" 2>/dev/null
	DAEMON_RC=$?
	DAEMON_PID=""
	say "daemon exited rc=$DAEMON_RC after SIG$sig"
}

# ------------------------------------------------------------- assertions ----

_pass() { E2E_PASS=$((E2E_PASS + 1)); say "ok   - $1"; }
_fail() { E2E_FAIL=$((E2E_FAIL + 1)); E2E_FAILED_DESCS+=("$1"); say "FAIL - $1"; }
_skip() { E2E_SKIP=$((E2E_SKIP + 1)); say "skip - $1"; }

# fatal MSG: count a failure and end the test (cleanup runs from the trap).
fatal() { _fail "FATAL: $*"; e2e_summary; exit 1; }

# expect_ok DESC cmd...: cmd must succeed.
expect_ok() {
	local d=$1; shift
	if "$@"; then _pass "$d"; else _fail "$d  [command: $*]"; fi
}

# expect_fail DESC cmd...: cmd must fail (always, with or without vmfence).
expect_fail() {
	local d=$1; shift
	if "$@"; then _fail "$d  [unexpectedly succeeded: $*]"; else _pass "$d"; fi
}

# expect_blocked DESC cmd...: a flow/attack vmfence must stop. With vmfence cmd
# must fail; with NO_VMFENCE=1 it must succeed (the topology carries it, so the
# block is vmfence's doing).
# An enforced run records each command; the control run (see "control run")
# reports which of them went through.
expect_blocked() {
	local d=$1; shift
	if [ "$ENFORCE" = 1 ]; then
		printf '%s\t%s\n' "$*" "$d" >>"$WORK/e2e-blocked.cmds"
		if "$@"; then _fail "$d  [NOT blocked: $*]"; else _pass "$d (blocked)"; fi
	else
		if "$@"; then
			_pass "$d (unenforced: goes through, as it must without vmfence)"
			[ -n "${E2E_CONTROL_REPORT:-}" ] && printf 'ok\t%s\n' "$*" >>"$E2E_CONTROL_REPORT"
		else
			_fail "$d  [fails even without vmfence: topology problem: $*]"
			[ -n "${E2E_CONTROL_REPORT:-}" ] && printf 'fail\t%s\n' "$*" >>"$E2E_CONTROL_REPORT"
		fi
	fi
	return 0
}

# mark_log: later expect_log/expect_no_log only look at lines logged after now.
mark_log() { LOG_MARK=$(wc -l <"$DLOG"); }

_log_since_mark() { tail -n "+$((LOG_MARK + 1))" "$DLOG"; }

# expect_log DESC REGEX [SECONDS]: a daemon log line after the mark matches
# (extended regex), polled for up to SECONDS (5).
expect_log() {
	local d=$1 re=$2 n=$(( ${3:-5} * 10 )) i
	if [ "$ENFORCE" != 1 ]; then _skip "$d (no daemon)"; return 0; fi
	for i in $(seq "$n"); do
		if _log_since_mark | grep -Eq -- "$re"; then
			_pass "$d"
			[ "${E2E_VERBOSE:-0}" = 1 ] && _log_since_mark | grep -E -- "$re" | head -n 1 | sed 's/^/    log: /'
			return 0
		fi
		sleep 0.1
	done
	_fail "$d  [no log line matching /$re/]"
	echo "    violations logged since the mark:"
	_log_since_mark | grep -E 'violation|error|warn' | tail -n 15 | sed 's/^/    | /'
	return 1
}

# expect_no_log DESC REGEX [EXCLUDE]: no line after the mark matches REGEX
# (lines that also match the extended regex EXCLUDE are ignored).
expect_no_log() {
	local d=$1 re=$2 ex=${3:-}
	if [ "$ENFORCE" != 1 ]; then _skip "$d (no daemon)"; return 0; fi
	local hits
	hits=$(_log_since_mark | grep -E -- "$re")
	[ -n "$ex" ] && hits=$(echo "$hits" | grep -Ev -- "$ex")
	if [ -n "$hits" ]; then
		_fail "$d  [unexpected log line:]"
		echo "$hits" | head -n 5 | sed 's/^/    | /'
	else
		_pass "$d"
	fi
}

# Host-originated IPv4 multicast toward a VM (e.g. the bridge's IGMP reports to
# 224.0.0.22) is "other inbound" under the contract: vmfence drops and reports
# it as ingress_denied, at moments the test does not control. expect_no_log
# callers that look at all of a VM's violations exclude these with
# EXCLUDE="$HOST_MCAST".
HOST_MCAST='dir=to_vm .*dst=2(2[4-9]|3[0-9])\.'

# counters_match_log: for every VM in `vmfence status --json`, each reason's drop
# counter (but the quiet ones) equals the lines logged for that VM and reason, unless
# events were suppressed (budget) or lost (ring full) for it. Every drop in the
# datapath is either reported or counted as suppressed/lost, so a mismatch
# means drops nobody hears about (or a status/ABI mix-up). Call after the
# traffic has settled (waits 1 s for the log to catch up).
counters_match_log() {
	if [ "$ENFORCE" != 1 ] || [ -z "$DAEMON_PID" ]; then _skip "status counters match the violation log (no daemon)"; return 0; fi
	sleep 1
	# A drop may land between the reads (a peer still retransmitting): the
	# counter must lie between the log before it was read and the log 1 s
	# later (every event reported by then).
	local out before="$WORK/counters_log_before" st
	cp "$DLOG" "$before"
	st=$(vmf status --json 2>&1)
	sleep 1
	if ! out=$("$PY" -c '
import json, re, sys, collections
st = json.loads(sys.argv[3])
def logged_in(path):
    n = collections.Counter()
    for line in open(path, errors="replace"):
        m = re.search(r"violation vm=(\S+) reason=(\S+)", line)
        if m:
            n[(m.group(1), m.group(2))] += 1
    return n
lo, hi = logged_in(sys.argv[2]), logged_in(sys.argv[1])
# Quiet reasons (the guest noise and its limits) are counted, never logged.
quiet = {"flow_limit", "link_local", "unassigned_src", "stale_reply", "fragment", "rate_limited"}
bad = []
for vm in st["vms"]:
    if "counters" not in vm:  # interface not present: nothing counted
        continue
    c = vm["counters"]
    slack = c.get("events_suppressed", 0) + c.get("events_lost", 0)
    for reason, n in vm["drops"].items():
        if reason in quiet:
            continue
        a, b = lo[(vm["name"], reason)], hi[(vm["name"], reason)]
        if n < a or (slack == 0 and n > b):
            bad.append("%s %s: counter %d, logged %d..%d (suppressed+lost %d)" % (vm["name"], reason, n, a, b, slack))
print("\n".join(bad))
sys.exit(1 if bad else 0)
' "$DLOG" "$before" "$st" 2>&1); then
		_fail "status drop counters match the violation log"
		echo "$out" | sed 's/^/    | /'
	else
		_pass "status drop counters match the violation log"
	fi
}

# drop_count VM REASON: VM's drop counter for REASON in `vmfence status --json`
# (-1 when it cannot be read).
drop_count() {
	vmf status --json 2>/dev/null | "$PY" -c '
import json, sys
try:
    st = json.load(sys.stdin)
except ValueError:
    print(-1); sys.exit(0)
for vm in st.get("vms", []):
    if vm.get("name") == sys.argv[1]:
        print(vm.get("drops", {}).get(sys.argv[2], -1)); sys.exit(0)
print(-1)
' "$1" "$2"
}

# enforced: true when vmfence runs (for checks that only make sense then).
enforced() { [ "$ENFORCE" = 1 ]; }

# violation_re VM REASON [extra regex]: regex for a violation log line.
violation_re() { echo "violation vm=$1 reason=$2 .*${3:-}"; }

# ------------------------------------------------------------- epilogue ------

e2e_summary() {
	local dt
	dt=$(_elapsed)
	echo
	echo "== $TEST_NAME: $E2E_PASS passed, $E2E_FAIL failed, $E2E_SKIP skipped in ${dt}s$([ "$ENFORCE" = 1 ] || echo ' (NO_VMFENCE)')"
	local f
	for f in "${E2E_FAILED_DESCS[@]}"; do echo "   failed: $f"; done
}

# e2e_finish: the control run (when this run blocked anything), summary; exit
# status 1 on any failure.
e2e_finish() {
	_control_finish
	e2e_summary
	[ "$E2E_FAIL" = 0 ] || exit 1
	exit 0
}

e2e_cleanup() {
	local rc=$? p ns
	trap - EXIT INT TERM
	set +e
	_control_stop
	if [ -n "$DAEMON_PID" ]; then
		kill -TERM "$DAEMON_PID" 2>/dev/null
		for p in $(seq 50); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.1; done
		kill -KILL "$DAEMON_PID" 2>/dev/null
		wait "$DAEMON_PID" 2>/dev/null
	fi
	for p in "${E2E_BG_PIDS[@]}"; do kill "$p" 2>/dev/null; done
	sleep 0.2
	for p in "${E2E_BG_PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; done
	if [ "$ENFORCE" = 1 ] && [ -x "$VMFENCE" ] && [ -e "/run/netns/$HV" ] && [ -f "$CONF/host.json" ]; then
		vmf down --config "$CONF" >>"$WORK/down.log" 2>&1 ||
			say "cleanup: vmfence down failed (see $WORK/down.log)"
	fi
	for ns in $(ip netns list | awk '{print $1}' | grep "^$PFX-"); do
		# Leftovers are processes this test started in its own namespaces.
		for p in $(ip netns pids "$ns" 2>/dev/null); do kill "$p" 2>/dev/null; done
		ip netns del "$ns"
	done
	for p in /sys/fs/bpf/vmfence-e2e-"$PFX"*; do
		[ -e "$p" ] && rm -rf -- "$p"
	done
	# A journald this test started (journald_ensure) goes too.
	[ -n "$JOURNALD_STATE" ] && bash "$E2E_DIR/journald.sh" stop "$JOURNALD_STATE"
	if [ "$rc" != 0 ] || [ "${KEEP:-0}" = 1 ]; then
		say "work dir kept: $WORK (daemon log: $DLOG)"
	else
		rm -rf -- "$WORK"
	fi
	exit "$rc"
}
