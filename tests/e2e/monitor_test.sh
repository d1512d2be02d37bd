#!/usr/bin/env bash
# End-to-end: `vmfence monitor` (issue 11, part 3) against a running daemon.
# Monitors run as their own processes (killed by pid at the end) while VMs
# send hostile packets; their output is checked line by line:
#   - `monitor --json`: one JSON object per drop with the contract's keys
#     (vm, reason, src, dst, proto, dport, mode, direction) and the right values;
#   - `monitor --vm A --reason egress_denied` (text) and
#     `monitor --vm B --reason spoofed_ip --json`: only the matching drops;
#   - a client that connects and never reads does not stop enforcement, the
#     daemon (status answers), nor the other monitors, and is disconnected by
#     the daemon once its buffer is full (a burst from four VMs);
#   - exit status: 1 with no daemon (before start, after stop, or when the
#     daemon goes away mid-stream), 2 for an unknown reason, 0 on SIGINT;
#   - the socket is private (0600) and removed when the daemon exits.
#
# Topology (routed, all in namespaces):
#   hv:   tap-a .. tap-d (10.41.0.1/32 + proxy_arp + host routes),
#         wan0 198.51.100.1/24 -> netns "cons" 198.51.100.2 (UDP echo 51900)
#   a..d 10.41.0.2{1..4}: filtered, egress udp/51900 to the consumer only,
#         on_violation alert.
# Needs root and the daemon (NO_VMFENCE=1 only checks the topology).
set -u
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/modes_lib.sh"
e2e_init monitor

CONS=198.51.100.2
KEYS="a b c d"
declare -A IP=([a]=10.41.0.21 [b]=10.41.0.22 [c]=10.41.0.23 [d]=10.41.0.24)
declare -A SPOOF=([a]=10.9.9.21 [b]=10.9.9.22 [c]=10.9.9.23 [d]=10.9.9.24)
declare -A NAME=([a]=$PFX-a [b]=$PFX-b [c]=$PFX-c [d]=$PFX-d)
mac() { printf '02:00:00:41:00:%s' "${IP[$1]##*.}"; }

section topology
hv_add
for k in $KEYS; do
	vm_add "$k" "tap-$k" "$(mac "$k")"
	route_vm "$k" "tap-$k" "${IP[$k]}" 10.41.0.1
done
wan_add cons wan0 198.51.100.1/24 "$CONS/24"
serve_udp cons 51900
wait_listen cons 51900 udp

section config
write_host '{ "on_violation": { "action": "alert" } }'
for k in $KEYS; do
	write_vm "${NAME[$k]}" "{ \"name\": \"${NAME[$k]}\", \"interface\": \"tap-$k\", \"mac\": \"$(mac "$k")\",
  \"addresses\": [\"${IP[$k]}/32\"], \"gateway\": [\"10.41.0.1\"], \"mode\": \"filtered\",
  \"egress\": [ { \"to\": \"$CONS/32\", \"proto\": \"udp\", \"ports\": [\"51900\"] } ] }"
done

if ! enforced; then
	for k in $KEYS; do expect_ok "VM $k: udp/51900 to the consumer" quick_udp "$k" "$CONS" 51900 2; done
	say "NO_VMFENCE: the monitor needs the daemon; topology checked only"
	e2e_finish
fi

SOCK=$RUNDIR/monitor.sock
MON_PIDS=()
# monitor OUT ARGS...: `vmfence monitor ARGS` in the background, stdout to
# OUT, stderr to OUT.err; MON_PID is its pid (env execs vmfence: the pid is
# the monitor's own). The socket is a path: no namespace needed.
monitor() {
	local out=$1
	shift
	env VMFENCE_PIN_DIR="$PIN" VMFENCE_RUN_DIR="$RUNDIR" "$VMFENCE" monitor "$@" >"$out" 2>"$out.err" &
	MON_PID=$!
	MON_PIDS+=("$MON_PID")
	E2E_BG_PIDS+=("$MON_PID")
}
# clients_now: monitor clients the daemon has, from its last connect/disconnect line.
clients_now() { grep -Eo 'monitor: client .*\(([^()]*; )?[0-9]+ connected\)' "$DLOG" | tail -n 1 | grep -Eo '[0-9]+ connected' | cut -d' ' -f1; }
wait_clients() {
	local i
	for i in $(seq 50); do
		[ "$(clients_now)" = "$1" ] && return 0
		sleep 0.1
	done
	return 1
}
# exits_with PID RC [SECONDS]: the process ends within SECONDS (5) with status RC.
exits_with() {
	local pid=$1 want=$2 i rc
	for i in $(seq $((${3:-5} * 10))); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	kill -0 "$pid" 2>/dev/null && return 1
	wait "$pid"
	rc=$?
	[ "$rc" = "$want" ] || { echo "    pid $pid exited $rc, expected $want"; return 1; }
}
# denied KEY PORT: one UDP datagram from VM KEY to the consumer on a port its
# egress does not allow (egress_denied).
denied() {
	nsx "$1" "$PY" -c '
import socket, sys
socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"denied", (sys.argv[1], int(sys.argv[2])))' "$CONS" "$2"
}
# spoofed KEY DPORT: one UDP datagram from VM KEY with a source it does not own (spoofed_ip).
spoofed() {
	local tapmac
	tapmac=$(mac_of hv "tap-$1")
	scapy "$1" "sendp(Ether(src='$(mac "$1")', dst='$tapmac')/IP(src='${SPOOF[$1]}', dst='$CONS')/UDP(sport=4000, dport=$2)/b'spoof', iface='eth0')"
}
# status_answers: `vmfence status --json` succeeds within 5 s.
status_answers() {
	timeout 5 env VMFENCE_PIN_DIR="$PIN" VMFENCE_RUN_DIR="$RUNDIR" nsenter --net="/run/netns/$HV" -- \
		"$VMFENCE" status --json >/dev/null 2>&1
}
# has_line FILE REGEX [SECONDS]: a line of FILE matches (extended regex), polled.
has_line() {
	local i
	for i in $(seq $((${3:-5} * 10))); do
		grep -Eq -- "$2" "$1" 2>/dev/null && return 0
		sleep 0.1
	done
	return 1
}

section "no daemon: exit 1; unknown reason: exit 2"
out=$(env VMFENCE_RUN_DIR="$RUNDIR" "$VMFENCE" monitor --json 2>&1)
rc=$?
expect_ok "monitor without a daemon exits 1 (rc=$rc)" test "$rc" = 1
expect_ok "... and says no daemon runs: $out" grep -q "no daemon running" <<<"$out"
out=$(env VMFENCE_RUN_DIR="$RUNDIR" "$VMFENCE" monitor --reason no_such_reason 2>&1)
rc=$?
expect_ok "monitor --reason no_such_reason exits 2 (rc=$rc)" test "$rc" = 2
expect_ok "... and names the reason" grep -q "no_such_reason" <<<"$out"

start_daemon
expect_ok "monitor socket is private (mode $(stat -c %a "$SOCK" 2>&1))" test "$(stat -c %a "$SOCK" 2>/dev/null)" = 600

section "monitors: all drops as JSON, two filtered"
monitor "$WORK/all.jsonl" --json
ALL_PID=$MON_PID
monitor "$WORK/a-denied.txt" --vm "${NAME[a]}" --reason egress_denied
A_PID=$MON_PID
monitor "$WORK/b-spoofed.jsonl" --vm "${NAME[b]}" --reason spoofed_ip --json
B_PID=$MON_PID
expect_ok "the daemon has 3 monitor clients" wait_clients 3

for k in a b; do expect_ok "VM $k: allowed udp/51900 still passes" quick_udp "$k" "$CONS" 51900 2; done
denied a 9999
denied b 9998
spoofed a 53
spoofed b 53
has_line "$WORK/all.jsonl" '"src":"10\.9\.9\.22"' 5 # the last one sent

check_all_json() {
	"$PY" - "$WORK/all.jsonl" "$CONS" "${NAME[a]}" "${NAME[b]}" "${IP[a]}" "${IP[b]}" "${SPOOF[a]}" "${SPOOF[b]}" <<'EOF'
import json, sys
path, cons, na, nb, ia, ib, sa, sb = sys.argv[1:]
keys = ("vm", "reason", "src", "dst", "proto", "dport", "mode", "direction")
events, bad = [], []
for n, line in enumerate(open(path), 1):
    try:
        e = json.loads(line)
    except ValueError:
        bad.append("line %d is not JSON: %r" % (n, line))
        continue
    missing = [k for k in keys if k not in e]
    if missing:
        bad.append("line %d lacks %s: %s" % (n, missing, line.strip()))
    events.append(e)
want = [
    dict(vm=na, reason="egress_denied", src=ia, dst=cons, proto="udp", dport=9999, mode="filtered", direction="from_vm"),
    dict(vm=nb, reason="egress_denied", src=ib, dst=cons, proto="udp", dport=9998, mode="filtered", direction="from_vm"),
    dict(vm=na, reason="spoofed_ip", src=sa, dst=cons, proto="udp", dport=53, mode="filtered", direction="from_vm"),
    dict(vm=nb, reason="spoofed_ip", src=sb, dst=cons, proto="udp", dport=53, mode="filtered", direction="from_vm"),
]
for w in want:
    if not any(all(e.get(k) == v for k, v in w.items()) for e in events):
        bad.append("no event %s" % json.dumps(w, sort_keys=True))
print("%d events" % len(events))
for b in bad:
    print("    " + b)
sys.exit(1 if bad else 0)
EOF
}
expect_ok "monitor --json: one JSON object per drop, the 8 keys, the 4 drops with their values" check_all_json

check_a_text() {
	local f=$WORK/a-denied.txt
	# "2026-11-30T12:00:00.123Z vm: egress_denied from_vm 10.41.0.21 -> 198.51.100.2 udp/9999 mode=filtered"
	grep -Eq "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:]{8}\.[0-9]{3}Z ${NAME[a]}: egress_denied from_vm ${IP[a]//./\\.} -> ${CONS//./\\.} udp/9999 mode=filtered$" "$f" ||
		{ echo "    no egress_denied line for udp/9999 in:"; sed 's/^/    | /' "$f"; return 1; }
	if grep -v "^[^ ]* ${NAME[a]}: egress_denied " "$f"; then
		echo "    ^ lines that are not VM a's egress_denied"
		return 1
	fi
}
expect_ok "monitor --vm A --reason egress_denied: A's denied destination, nothing else" check_a_text

check_b_json() {
	"$PY" - "$WORK/b-spoofed.jsonl" "${NAME[b]}" "${SPOOF[b]}" <<'EOF'
import json, sys
path, nb, sb = sys.argv[1:]
events = [json.loads(l) for l in open(path)]
others = [e for e in events if e["vm"] != nb or e["reason"] != "spoofed_ip"]
ok = any(e["src"] == sb and e["dport"] == 53 for e in events) and not others
print("%d events, %d not B's spoofed_ip" % (len(events), len(others)))
sys.exit(0 if ok else 1)
EOF
}
expect_ok "monitor --vm B --reason spoofed_ip --json: B's spoofed source only" check_b_json

section "a client that never reads"
"$PY" -c '
import socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
time.sleep(120)
' "$SOCK" &
STUCK_PID=$!
E2E_BG_PIDS+=("$STUCK_PID")
expect_ok "the daemon has 4 monitor clients" wait_clients 4
before=$(wc -l <"$WORK/all.jsonl")
spoofed_before=$(drop_count "${NAME[c]}" spoofed_ip)

# Events are budgeted at 64 per VM per second: four VMs send spoofed frames
# (150/s each) until the daemon gives up on the stuck client (~1,200 events
# fill its 256 KB and the socket's buffer), 20 s at most.
BURST_PIDS=()
for k in $KEYS; do
	tapmac=$(mac_of hv "tap-$k")
	nsenter --net="/run/netns/$PFX-$k" -- "$PY" -c '
import logging; logging.getLogger("scapy.runtime").setLevel(logging.ERROR)
import socket, sys, time
from scapy.all import Ether, IP, UDP
src_mac, dst_mac, spoof, cons = sys.argv[1:5]
frame = bytes(Ether(src=src_mac, dst=dst_mac)/IP(src=spoof, dst=cons)/UDP(sport=4001, dport=53)/b"burst")
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
end = time.time() + 20
while time.time() < end:
    s.send(frame)
    time.sleep(1 / 150)
' "$(mac "$k")" "$tapmac" "${SPOOF[$k]}" "$CONS" >>"$WORK/srv/bg.log" 2>&1 &
	BURST_PIDS+=("$!")
	E2E_BG_PIDS+=("$!")
done
status_ok=0
for i in $(seq 200); do
	grep -q 'monitor: client disconnected (too slow' "$DLOG" && break
	# The daemon keeps answering while the stuck client's buffer fills.
	if [ $((i % 10)) = 0 ]; then status_answers || status_ok=1; fi
	sleep 0.1
done
for p in "${BURST_PIDS[@]}"; do kill "$p" 2>/dev/null; done
for p in "${BURST_PIDS[@]}"; do wait "$p" 2>/dev/null; done
expect_ok "vmfence status answered during the burst" test "$status_ok" = 0
expect_ok "the daemon disconnected the stuck client (too slow)" grep -q 'monitor: client disconnected (too slow' "$DLOG"
expect_ok "the daemon is still running" kill -0 "$DAEMON_PID"
expect_ok "vmfence status answers after the burst" status_answers
expect_ok "the other monitors are still running" kill -0 "$ALL_PID" "$A_PID" "$B_PID"
expect_ok "the daemon has 3 monitor clients again" wait_clients 3
after=$(wc -l <"$WORK/all.jsonl")
expect_ok "monitor --json received the burst ($((after - before)) lines, >= 1000)" test $((after - before)) -ge 1000
spoofed_after=$(drop_count "${NAME[c]}" spoofed_ip)
expect_ok "enforcement went on: VM c's spoofed_ip drops $spoofed_before -> $spoofed_after" \
	test "$spoofed_after" -gt $((spoofed_before + 100))
expect_ok "allowed udp/51900 still passes" quick_udp a "$CONS" 51900 2
sleep 1.1 # a fresh event budget
denied a 7777
expect_ok "a new drop reaches monitor --json" has_line "$WORK/all.jsonl" '"dport":7777' 5
expect_ok "... and the filtered text monitor" has_line "$WORK/a-denied.txt" 'udp/7777 mode=filtered$' 5
kill "$STUCK_PID" 2>/dev/null

section "SIGINT ends a monitor with exit 0"
monitor "$WORK/int.txt"
INT_PID=$MON_PID
expect_ok "the daemon has 4 monitor clients" wait_clients 4
kill -INT "$INT_PID"
expect_ok "monitor exits 0 on SIGINT" exits_with "$INT_PID" 0

section "the daemon goes away: monitors exit 1, the socket is removed"
stop_daemon TERM
for p in "$ALL_PID" "$A_PID" "$B_PID"; do
	expect_ok "monitor pid $p exits 1 when the daemon stops" exits_with "$p" 1
done
expect_ok "... saying the daemon closed the connection" grep -q "closed the connection" "$WORK/all.jsonl.err"
expect_ok "monitor socket removed at exit" test ! -e "$SOCK"
out=$(env VMFENCE_RUN_DIR="$RUNDIR" "$VMFENCE" monitor 2>&1)
rc=$?
expect_ok "monitor after the daemon stopped exits 1 (rc=$rc: $out)" test "$rc" = 1

e2e_finish
