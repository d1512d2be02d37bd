#!/usr/bin/env bash
# End-to-end: per-VM rate limits ("limits" in a VM spec; DESIGN.md, "limits").
#
#   egress_mbit / egress_pps    traffic FROM the VM, policed at the TAP's tcx
#                               ingress (token buckets); the excess is dropped
#                               with reason rate_limited
#   ingress_mbit                traffic TO the VM, paced with EDT timestamps at
#                               the TAP's tcx egress + an fq root qdisc vmfence
#                               installs on the TAP while the limit is set
#   ingress_pps                 traffic TO the VM, dropped beyond the rate
#   rate_limited is quiet: never a violation, never logged as one, never
#   counted toward quarantine/terminate. A limits change takes effect on reload
#   and resets nothing else (flows, counters).
#
# Topology (routed like seed 003, all in namespaces "$PFX-*"):
#   hv:   vm1, vm2 (veth host ends = the TAPs) with the gateway 10.0.0.0/32,
#         proxy_arp, host routes 10.0.0.N/32; wan0 198.51.100.1/24 -> netns
#         "inet" 198.51.100.2 (iperf3 servers, one-off per measurement on
#         ports 5201.., UDP sinks/sources 7000.., TCP 7100: a long-lived
#         connection the server pushes on, to show flows survive reloads).
#   vm1:  10.0.0.1/32, limited; vm2: 10.0.0.2/32, never limited.
#   Both: egress tcp 5201-5299 + 7100 and udp (all ports) to 198.51.100.2;
#   on_violation terminate, threshold 1 (the command leaves a marker): a
#   rate_limited drop counted as a violation would quarantine vm1.
#   IPv6 off in the VMs and on the TAPs (no link-local noise in the counters).
# Phases:
#   A  vm1 {egress_mbit, ingress_mbit} = RL_MBIT (50): iperf3 single TCP stream
#      vm1 -> inet and inet -> vm1 (-R) within RL_MIN_PCT..RL_MAX_PCT of the
#      limit (contract 90-105 %; this test: 80-105 % on noisy CI VMs); fq is
#      vm1's root qdisc, vm2 has none; rate_limited drops > 0; vm2 alone
#      > RL_FAST_MBIT (150) both ways.
#   B  reload adding {egress_pps, ingress_pps} = RL_PPS (2000): counters and
#      the long-lived flow survive; a UDP flood vm1 -> inet and inet -> vm1 (64 B
#      payloads, as fast as python sends) arrives at RL_PPS +- RL_PPS_TOL % (contract
#      5 %, steady state: the first second is left out for the bucket's burst).
#   C  reload without "limits": vm1 unlimited again (> RL_FAST_MBIT, UDP far over
#      RL_PPS), fq gone from vm1, counters and the flow survive.
#   D  ingress_mbit again -> fq back; vm1's spec removed -> fq gone; back
#      again; `vmfence down` (after the daemon stopped) leaves no fq.
#   Throughout: no violation logged for vm1, no terminate, not quarantined.
# NO_VMFENCE=1 (control): the same topology without the daemon must carry
# vm1's traffic far above the limits (so a limit measured under vmfence is
# vmfence's doing) and the long-lived flow.
# Needs root, iperf3, /usr/bin/python3. Env: see lib.sh; RL_MBIT, RL_PPS,
# RL_SECS (iperf3 seconds measured, default 4, after 1 s omitted), RL_UDP_SECS
# (UDP flood seconds, default 3),
# RL_MIN_PCT (80), RL_MAX_PCT (105), RL_PPS_TOL (15), RL_FAST_MBIT (150),
# RL_BURST_KB (an explicit limits.burst_kb; default: none),
# CLIENT_CPU (0), SERVER_CPU (1).
set -u
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/live_lib.sh"
. "$(dirname "$0")/noise_lib.sh"
e2e_init ratelimit

command -v iperf3 >/dev/null || fatal "iperf3 missing (apt install iperf3)"
SRV=198.51.100.2
MBIT=${RL_MBIT:-50}
PPS=${RL_PPS:-2000}
SECS=${RL_SECS:-4}
UDP_SECS=${RL_UDP_SECS:-3}
MIN_PCT=${RL_MIN_PCT:-80}
MAX_PCT=${RL_MAX_PCT:-105}
PPS_TOL=${RL_PPS_TOL:-15}
FAST=${RL_FAST_MBIT:-150}
CLIENT_CPU=${CLIENT_CPU:-0}
SERVER_CPU=${SERVER_CPU:-1}
PORT_SEQ=5200
UDP_SEQ=7000
CTL=$WORK/ctl
mkdir -p "$CTL"

# ---------------------------------------------------------------- helpers ----

# next_port / next_udp: a fresh port per measurement (one-off servers).
next_port() { PORT_SEQ=$((PORT_SEQ + 1)); }
next_udp() { UDP_SEQ=$((UDP_SEQ + 1)); }

# iperf_once VM SECS [iperf3 args]: one TCP measurement VM <-> inet on a fresh
# one-off server; prints "MBIT RETRANSMITS" (received side, Mbit/s) or
# "ERR message".
iperf_once() {
	local vm=$1 secs=$2 out; shift 2
	next_port
	out=$WORK/iperf-$vm-$PORT_SEQ.json
	spawn inet taskset -c "$SERVER_CPU" iperf3 -s -1 -p "$PORT_SEQ"
	wait_listen inet "$PORT_SEQ"
	nsx "$vm" taskset -c "$CLIENT_CPU" timeout $((secs + 25)) \
		iperf3 -c "$SRV" -p "$PORT_SEQ" -t "$secs" -O 1 -J "$@" >"$out" 2>&1
	"$PY" -c '
import json, sys
try:
    j = json.load(open(sys.argv[1]))
except ValueError:
    print("ERR no JSON from iperf3: " + open(sys.argv[1]).read()[:200].replace("\n", " ")); sys.exit(0)
if "error" in j:
    print("ERR " + j["error"]); sys.exit(0)
e = j["end"]
print("%.1f %d" % (e["sum_received"]["bits_per_second"] / 1e6, e.get("sum_sent", {}).get("retransmits", -1)))
' "$out"
}

# in_range X LO HI (floats)
in_range() { "$PY" -c 'import sys; x, lo, hi = map(float, sys.argv[1:]); sys.exit(0 if lo <= x <= hi else 1)' "$@"; }
# pct X OF
pct() { "$PY" -c 'import sys; print("%.1f" % (100.0 * float(sys.argv[1]) / float(sys.argv[2])))' "$1" "$2"; }

# measure_limited DESC VM [iperf3 args]: TCP throughput VM <-> inet must be
# MIN_PCT..MAX_PCT of MBIT; one retry when the first try is outside (noise).
measure_limited() {
	local d=$1 vm=$2 r m p try; shift 2
	for try in 1 2; do
		r=$(iperf_once "$vm" "$SECS" "$@")
		m=${r%% *}
		if [ "$m" = ERR ]; then
			say "  $d: try $try: iperf3 failed: $r"
			p=-1
		else
			p=$(pct "$m" "$MBIT")
			say "  $d: try $try: $m Mbit/s = $p % of $MBIT Mbit/s (retransmits ${r#* })"
			in_range "$p" "$MIN_PCT" "$MAX_PCT" && break
		fi
	done
	expect_ok "$d: $p % of the limit (want $MIN_PCT..$MAX_PCT %)" in_range "$p" "$MIN_PCT" "$MAX_PCT"
}

# measure_fast DESC VM [iperf3 args]: TCP throughput VM <-> inet must exceed
# FAST Mbit/s (unlimited); one retry.
measure_fast() {
	local d=$1 vm=$2 r m try; shift 2
	for try in 1 2; do
		r=$(iperf_once "$vm" 2 "$@")
		m=${r%% *}
		if [ "$m" = ERR ]; then
			say "  $d: try $try: iperf3 failed: $r"
			m=-1
		else
			say "  $d: try $try: $m Mbit/s (retransmits ${r#* })"
			in_range "$m" "$FAST" 1e9 && break
		fi
	done
	expect_ok "$d: $m Mbit/s > $FAST Mbit/s (unlimited)" in_range "$m" "$FAST" 1e9
}

# UDP flood, one direction. The receiver notes arrival times and reports the
# steady-state rate (packets in [first + 1 s, first + UDP_SECS - 0.3 s]: the
# bucket's initial burst is left out) and the overall rate (all packets /
# UDP_SECS).
UDP_RX='
import json, socket, sys, time
port, secs, out, hello = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    s.setsockopt(socket.SOL_SOCKET, 33, 1 << 23)   # SO_RCVBUFFORCE
except OSError:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 23)
s.bind(("0.0.0.0", port))
if hello != "-":   # to-VM flood: open the flow (a reply is what the VM may get)
    h, hp = hello.rsplit(":", 1)
    for _ in range(3):
        s.sendto(b"hello", (h, int(hp)))
        time.sleep(0.05)
s.settimeout(8)
ts = []
try:
    while True:
        d = s.recv(2048)
        if d == b"hello":
            continue
        t = time.monotonic()
        ts.append(t)
        if t - ts[0] > secs + 0.5:
            break
        if len(ts) == 1:
            s.settimeout(1.0)
except socket.timeout:
    pass
res = {"n": len(ts)}
if ts:
    w0, w1 = ts[0] + 1.0, ts[0] + secs - 0.3
    res["window_pps"] = sum(1 for t in ts if w0 <= t < w1) / (w1 - w0)
    res["overall_pps"] = len(ts) / secs
    res["first_s_pkts"] = sum(1 for t in ts if t < ts[0] + 1.0)
json.dump(res, open(out, "w"))
'
# The sender: 64-byte datagrams as fast as it can for SECS (to-VM: after the
# receiver's hello, back to where it came from); reports the rate sent.
UDP_TX='
import json, socket, sys, time
dst, port, secs, out, wait_hello = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5] == "1"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
if wait_hello:
    s.bind(("0.0.0.0", port))
    s.settimeout(8)
    d, a = s.recvfrom(2048)
    s.connect(a)
else:
    s.connect((dst, port))
payload = b"r" * 64
n = err = 0
t0 = time.monotonic()
end = t0 + secs
while time.monotonic() < end:
    for _ in range(64):
        try:
            s.send(payload)
            n += 1
        except OSError:
            err += 1
json.dump({"sent_pps": n / (time.monotonic() - t0), "errors": err}, open(out, "w"))
'

# udp_flood DIR: DIR "from_vm" (vm1 -> inet) or "to_vm" (inet -> vm1); prints
# "WINDOW_PPS OVERALL_PPS SENT_PPS FIRST_S_PKTS" or "ERR ...".
udp_flood() {
	local dir=$1 rx tx out
	next_udp
	out=$WORK/udp-$dir-$UDP_SEQ
	if [ "$dir" = from_vm ]; then
		nsx inet "$PY" -c "$UDP_RX" "$UDP_SEQ" "$UDP_SECS" "$out.rx" - >"$out.rx.log" 2>&1 &
		rx=$!
		wait_listen inet "$UDP_SEQ" udp
		nsx vm1 taskset -c "$CLIENT_CPU" "$PY" -c "$UDP_TX" "$SRV" "$UDP_SEQ" "$UDP_SECS" "$out.tx" 0 >"$out.tx.log" 2>&1
	else
		nsx inet taskset -c "$SERVER_CPU" "$PY" -c "$UDP_TX" - "$UDP_SEQ" "$UDP_SECS" "$out.tx" 1 >"$out.tx.log" 2>&1 &
		tx=$!
		wait_listen inet "$UDP_SEQ" udp
		nsx vm1 taskset -c "$CLIENT_CPU" "$PY" -c "$UDP_RX" "$UDP_SEQ" "$UDP_SECS" "$out.rx" "$SRV:$UDP_SEQ" >"$out.rx.log" 2>&1 &
		rx=$!
		wait "$tx"
	fi
	wait "$rx"
	"$PY" -c '
import json, sys
try:
    rx, tx = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
except (OSError, ValueError) as e:
    print("ERR %s" % e); sys.exit(0)
if not rx.get("n"):
    print("ERR nothing received (sent %.0f pps)" % tx["sent_pps"]); sys.exit(0)
print("%.0f %.0f %.0f %d" % (rx["window_pps"], rx["overall_pps"], tx["sent_pps"], rx["first_s_pkts"]))
' "$out.rx" "$out.tx"
}

# measure_pps DESC DIR: steady-state rate within PPS +- PPS_TOL %; one retry.
measure_pps() {
	local d=$1 dir=$2 r w p try lo hi f
	lo=$(( PPS * (100 - PPS_TOL) / 100 )); hi=$(( PPS * (100 + PPS_TOL) / 100 ))
	for try in 1 2; do
		r=$(udp_flood "$dir")
		w=${r%% *}
		if [ "$w" = ERR ]; then
			say "  $d: try $try: $r"; w=-1; continue
		fi
		read -r -a f <<<"$r"
		set -- "${f[@]}"
		p=$(pct "$1" "$PPS")
		say "  $d: try $try: steady $1 pkt/s = $p % of $PPS (overall $2 pkt/s incl. burst, $4 in the first second; sent $3 pkt/s)"
		expect_ok "$d: the sender offered >= 3x the limit ($3 pkt/s)" in_range "$3" $((3 * PPS)) 1e12
		in_range "$w" "$lo" "$hi" && break
	done
	expect_ok "$d: $w pkt/s within $PPS +- $PPS_TOL % ($lo..$hi)" in_range "$w" "$lo" "$hi"
}

# measure_pps_free DESC DIR: without a pps limit the flood arrives far above PPS.
measure_pps_free() {
	local d=$1 dir=$2 r
	r=$(udp_flood "$dir")
	say "  $d: $r (steady, overall, sent pkt/s, first second)"
	expect_ok "$d: ${r%% *} pkt/s > 3x $PPS (no pps limit)" in_range "${r%% *}" $((3 * PPS)) 1e12
}

# has_fq DEV: the root qdisc of DEV in hv is vmfence's pacing qdisc (handle
# 766d:): fq, or tbf on a kernel without sch_fq. no_fq DEV: no such qdisc.
has_fq() {
	local kind=fq
	[ "$KERNEL_FQ" = yes ] || kind=tbf
	nsx hv tc qdisc show dev "$1" | grep -Eq "^qdisc $kind 766d: root" && return 0
	# Say why, once per call site (poll retries quietly until the last try).
	[ "${_FQ_QUIET:-0}" = 1 ] || {
		say "  no fq root qdisc on $1 (kernel sch_fq: $KERNEL_FQ); daemon log lines about qdiscs/fq:"
		grep -Ei 'qdisc|[^a-z]fq[^a-z_]|pacing|rate.?limit' "$DLOG" | tail -n 5 | sed 's/^/    | /'
	}
	return 1
}
no_fq() { ! nsx hv tc qdisc show dev "$1" | grep -Eq '^qdisc (fq|tbf) 766d:'; }
# poll CMD...: until CMD succeeds, up to 3 s.
poll() {
	local i
	for i in $(seq 30); do _FQ_QUIET=1 "$@" 2>/dev/null && return 0; sleep 0.1; done
	"$@"
}
show_qdisc() { say "  tc qdisc show dev $1: $(nsx hv tc qdisc show dev "$1" | tr '\n' ';')"; }

# The long-lived flow: a TCP connection vm1 -> inet:7100 opened at the start;
# push N makes the server send "PUSH N" (nothing from vm1 before it: a flow
# table reset would make it unsolicited inbound).
conn_start() {
	spawn inet "$PY" -u -c '
import os, socket, sys, time
ctl = sys.argv[1]
ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("0.0.0.0", 7100))
ls.listen(1)
c, a = ls.accept()
i = 0
while True:
    p = "%s/push.%d" % (ctl, i)
    if os.path.exists(p):
        c.sendall(b"PUSH %d\n" % i)
        i += 1
    time.sleep(0.02)
' "$CTL"
	wait_listen inet 7100
	spawn vm1 "$PY" -u -c '
import socket, sys
c = socket.create_connection((sys.argv[1], 7100), timeout=5)
c.settimeout(None)
with open(sys.argv[2], "a") as f:
    f.write("connected\n")
for line in c.makefile("rb"):
    with open(sys.argv[2], "a") as f:
        f.write(line.decode(errors="replace"))
' "$SRV" "$CTL/cli.log"
}
PUSHES=0
push() {
	local i
	: >"$CTL/push.$PUSHES"
	for i in $(seq 60); do
		grep -qx "PUSH $PUSHES" "$CTL/cli.log" 2>/dev/null && { PUSHES=$((PUSHES + 1)); return 0; }
		sleep 0.05
	done
	PUSHES=$((PUSHES + 1))
	return 1
}

# Reloads: rewrite vm1's spec atomically and wait for the daemon's reload line.
reload_re='reload \([^)]*\): [0-9]+ VMs changed'
vm1_spec() { # LIMITS_JSON ("" = no limits)
	printf '{ "name": "vm1", "interface": "vm1", "mac": "02:00:00:00:00:01",
  "addresses": ["10.0.0.1/32"], "gateway": ["10.0.0.0"], "mode": "filtered",
  "egress": [%s]%s }' "$RULES" "${1:+, \"limits\": $1}"
}
reload_vm1() { # LIMITS_JSON | --remove
	local n
	n=$(log_count "$reload_re")
	if [ "$1" = --remove ]; then rm -f "$CONF/vms.d/vm1.json"; else write_vm_atomic vm1 "$(vm1_spec "$1")"; fi
	log_wait_count "$reload_re" $((n + 1)) 5 || { _fail "no reload logged within 5 s"; return 1; }
	say "  $(grep -E "$reload_re" "$DLOG" | tail -n 1 | sed -E 's/.*(reload \([^)]*\): [^(]*) \(.*/\1/')"
	if grep -E "$reload_re" "$DLOG" | tail -n 1 | grep -q ': 0 VMs changed, 0 removed'; then
		say "  NOTE: vm1's spec changed but the reload changed no VM: the new limits are not in force"
	fi
}
# counters VM: "from_vm_packets to_vm_packets rate_limited" from status.
counters() { echo "$(st_get "$1" counters.from_vm_packets) $(st_get "$1" counters.to_vm_packets) $(st_get "$1" drops.rate_limited)"; }
# not_less "A B C" "X Y Z": X >= A, Y >= B, Z >= C.
not_less() {
	local a b i
	read -r -a a <<<"$1"
	read -r -a b <<<"$2"
	for i in 0 1 2; do [ "${b[$i]}" -ge "${a[$i]}" ] 2>/dev/null || return 1; done
}
vm_clean() { # VM: no violation logged since the mark, no terminate, not quarantined
	# From the VM: a stray segment of a closed iperf3 connection toward it is
	# reported as ingress_denied (to_vm), which is not the VM's doing.
	expect_no_log "$1: no violation logged" "violation vm=$1 reason=[^ ]+ dir=from_vm" "$HOST_MCAST"
	expect_ok "$1: the terminate command did not run" test ! -e "$(marker "$1")"
	expect_ok "$1: not quarantined" test "$(st_get "$1" quarantined)" = 0
}

# --------------------------------------------------------------- topology ----

section topology
hv_add
for n in 1 2; do
	vm_add "vm$n" "vm$n" "02:00:00:00:00:0$n"
	nsx "vm$n" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.eth0.disable_ipv6=1
	nsx hv sysctl -qw "net.ipv6.conf.vm$n.disable_ipv6=1"
	route_vm "vm$n" "vm$n" "10.0.0.$n" 10.0.0.0
done
wan_add inet wan0 198.51.100.1/24 "$SRV/24"
# Can this kernel do fq at all (CONFIG_NET_SCH_FQ)? ingress_mbit's pacing needs it.
ipn hv link add fqprobe0 type veth peer name fqprobe1
if nsx hv tc qdisc add dev fqprobe0 root fq 2>/dev/null; then KERNEL_FQ=yes; else KERNEL_FQ=no; fi
ipn hv link del fqprobe0
say "kernel sch_fq (needed for ingress_mbit pacing): $KERNEL_FQ"
marker_cmd
RULES="{ \"to\": \"$SRV/32\", \"proto\": \"tcp\", \"ports\": [\"5201-5299\", \"7100\"] },
             { \"to\": \"$SRV/32\", \"proto\": \"udp\" }"
# RL_BURST_KB: an explicit burst_kb (default: none, the documented default).
BURST=${RL_BURST_KB:+, \"burst_kb\": $RL_BURST_KB}
LIM_A="{ \"egress_mbit\": $MBIT, \"ingress_mbit\": $MBIT$BURST }"
LIM_B="{ \"egress_mbit\": $MBIT, \"ingress_mbit\": $MBIT, \"egress_pps\": $PPS, \"ingress_pps\": $PPS$BURST }"
LIM_D="{ \"ingress_mbit\": $MBIT$BURST }"

section config
write_host "{ \"on_violation\": { \"action\": \"terminate\", \"command\": [\"$WORK/mark.sh\", \"{vm}\"],
                      \"threshold\": 1, \"window_ms\": 1000 } }"
write_vm vm1 "$(vm1_spec "$LIM_A")"
write_vm vm2 "{ \"name\": \"vm2\", \"interface\": \"vm2\", \"mac\": \"02:00:00:00:00:02\",
  \"addresses\": [\"10.0.0.2/32\"], \"gateway\": [\"10.0.0.0\"], \"mode\": \"filtered\",
  \"egress\": [$RULES] }"
if enforced; then
	if ! vmf check --config "$CONF" >"$WORK/check.log" 2>&1; then
		sed 's/^/    check| /' "$WORK/check.log"
		fatal "vmfence check rejects the spec with limits"
	fi
	_pass "vmfence check accepts limits $LIM_A"
fi
start_daemon
mark_log
conn_start
expect_ok "long-lived flow vm1 -> inet:7100 open" poll grep -qx connected "$CTL/cli.log"
expect_ok "long-lived flow: server push reaches vm1" push

if ! enforced; then
	section "unenforced (control): the topology carries vm1 far above the limits"
	measure_fast "vm1 -> inet TCP" vm1
	measure_fast "inet -> vm1 TCP (-R)" vm1 -R
	measure_pps_free "vm1 -> inet UDP flood" from_vm
	measure_pps_free "inet -> vm1 UDP flood" to_vm
	expect_ok "long-lived flow: server push reaches vm1" push
	expect_ok "no fq qdisc on vm1 without vmfence" no_fq vm1
	e2e_finish
fi

section "A: vm1 limited to $MBIT Mbit/s both ways"
show_qdisc vm1
expect_ok "fq is vm1's root qdisc (ingress_mbit set)" poll has_fq vm1
expect_ok "no fq on vm2 (no limits)" no_fq vm2
C0=$(counters vm1)
measure_limited "vm1 -> inet TCP, 1 stream" vm1
RL=$(st_get vm1 drops.rate_limited)
say "  vm1 rate_limited drops after the egress run: $RL"
expect_ok "vm1: rate_limited drops counted ($RL > 0)" test "$(num "$RL")" -gt 0
measure_limited "inet -> vm1 TCP (-R), 1 stream" vm1 -R
show_qdisc vm1
measure_fast "vm2 -> inet TCP (no limits)" vm2
measure_fast "inet -> vm2 TCP (-R, no limits)" vm2 -R
expect_ok "vm2: no rate_limited drops" test "$(st_get vm2 drops.rate_limited)" = 0
C1=$(counters vm1)
say "  vm1 counters (from_vm_packets to_vm_packets rate_limited): $C0 -> $C1"
expect_ok "vm1's packet counters grew with the traffic" test "${C1%% *}" -gt "${C0%% *}"
vm_clean vm1
vm_clean vm2

section "B: reload adds egress_pps/ingress_pps $PPS"
mark_log
C1=$(counters vm1)
reload_vm1 "$LIM_B"
C2=$(counters vm1)
say "  vm1 counters before/after the reload: $C1 -> $C2"
expect_ok "reload reset no counter of vm1" not_less "$C1" "$C2"
expect_ok "long-lived flow survived the reload (server push reaches vm1)" push
expect_ok "fq still vm1's root qdisc" has_fq vm1
measure_pps "vm1 -> inet UDP flood" from_vm
measure_pps "inet -> vm1 UDP flood" to_vm
expect_ok "long-lived flow still works after the floods" push
vm_clean vm1

section "C: reload without limits: vm1 unlimited again"
mark_log
C2=$(counters vm1)
reload_vm1 ""
C3=$(counters vm1)
say "  vm1 counters before/after the reload: $C2 -> $C3"
expect_ok "reload reset no counter of vm1" not_less "$C2" "$C3"
expect_ok "fq removed from vm1 with the ingress_mbit limit" poll no_fq vm1
show_qdisc vm1
expect_ok "long-lived flow survived the reload (server push reaches vm1)" push
RL=$(st_get vm1 drops.rate_limited)
measure_fast "vm1 -> inet TCP (limits removed)" vm1
measure_fast "inet -> vm1 TCP (-R, limits removed)" vm1 -R
measure_pps_free "vm1 -> inet UDP flood (limits removed)" from_vm
RL2=$(st_get vm1 drops.rate_limited)
expect_ok "no rate_limited drops without limits ($RL -> $RL2)" test "$RL2" = "$RL"
vm_clean vm1

section "D: fq follows the limit, the VM and vmfence down"
mark_log
reload_vm1 "$LIM_D"
expect_ok "ingress_mbit set again: fq back on vm1" poll has_fq vm1
reload_vm1 --remove
expect_ok "vm1's spec removed: fq gone from vm1" poll no_fq vm1
reload_vm1 "$LIM_D"
expect_ok "vm1's spec back: fq on vm1 again" poll has_fq vm1
expect_ok "no fq on vm2 at any time" no_fq vm2

section "E: a rate change applies; another root qdisc stays; a restart removes a stale one"
reload_vm1 "{ \"egress_mbit\": 20, \"ingress_mbit\": 20$BURST }"
MBIT_WAS=$MBIT
MBIT=20
measure_limited "inet -> vm1 TCP (-R) after 50 -> 20 Mbit/s" vm1 -R
MBIT=$MBIT_WAS
# vm2's TAP gets a root qdisc of someone else's (libvirt's htb, say), then a limit.
nsx hv tc qdisc add dev vm2 root handle 1: htb default 1
mark_log
write_vm_atomic vm2 "{ \"name\": \"vm2\", \"interface\": \"vm2\", \"mac\": \"02:00:00:00:00:02\",
  \"addresses\": [\"10.0.0.2/32\"], \"gateway\": [\"10.0.0.0\"], \"mode\": \"filtered\",
  \"egress\": [$RULES], \"limits\": { \"ingress_mbit\": $MBIT } }"
expect_log "vm2: vmfence leaves a root qdisc that is not its own" "vm vm2: .*root qdisc of its own \\(htb\\)"
expect_ok "vm2's htb is still its root qdisc" bash -c "nsx() { nsenter --net=/run/netns/$HV -- \"\$@\"; }; nsx tc qdisc show dev vm2 | grep -q '^qdisc htb 1: root'"
nsx hv tc qdisc del dev vm2 root
expect_no_log "no rate_limited violation logged at all" "violation vm=[^ ]+ reason=rate_limited"
counters_match_log
# vm1's limit goes while no daemon runs: the next start removes its qdisc.
stop_daemon
write_vm vm1 "$(vm1_spec "")"
start_daemon
expect_ok "a restart removes the pacing qdisc of a VM whose limit went meanwhile" poll no_fq vm1
reload_vm1 "$LIM_D"
expect_ok "and it comes back with the limit" poll has_fq vm1
stop_daemon
if _FQ_QUIET=1 has_fq vm1; then say "  after SIGTERM fq stays on vm1 (enforcement stays in the kernel)"; else say "  NOTE: after SIGTERM fq is gone from vm1"; fi
expect_ok "vmfence down" vmf down --config "$CONF"
show_qdisc vm1
expect_ok "vmfence down: no fq qdisc left on vm1" no_fq vm1
expect_ok "vmfence down: no fq qdisc left on vm2" no_fq vm2
e2e_finish
