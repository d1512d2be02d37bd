#!/usr/bin/env bash
# End-to-end: on_violation terminate. The datapath quarantines the VM at the
# violation that reaches the threshold (all its traffic, both directions,
# dropped at once) and the agent runs the command once per VM per incident
# with VMFENCE_VM / _REASON / _SRC / _DST in its environment.
#
# Topology (routed, all in namespaces):
#   hv:   taps tap-a tap-b tap-c (10.40.0.1/32 + proxy_arp + host routes),
#         wan0 198.51.100.1/24 -> netns "cons" 198.51.100.2: TCP 443, UDP echo
#         51900, UDP sinks 51902 (violations) and 51904 (heartbeats).
#   a 10.40.0.21: terminate, threshold 1 (VM override of the host's threshold);
#                 ingress tcp/22 from the consumer (TCP 22 served in a)
#   b 10.40.0.22: terminate with the host default: threshold 3 in 1000 ms
#   c 10.40.0.23: on_violation alert (override): no command, no quarantine
#   Egress of every VM: tcp 443, udp 51900 and udp 51904 to the consumer.
#   The command records argv, VMFENCE_* and times in $WORK/act-VM.log, sleeps 2 s.
# Needs root and the daemon (nothing to test without vmfence: NO_VMFENCE=1 only
# checks the topology carries the traffic).
set -u
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/modes_lib.sh"
e2e_init terminate

CONS=198.51.100.2
declare -A IP=([a]=10.40.0.21 [b]=10.40.0.22 [c]=10.40.0.23)
declare -A NAME=([a]=$PFX-term1 [b]=$PFX-term3 [c]=$PFX-alert)
mac() { printf '02:00:00:40:00:%s' "${IP[$1]##*.}"; }

# tap_up KEY: (re)create the VM's veth and addressing (the VM's "boot").
tap_up() {
	local k=$1
	ip -n "$HV" link add "tap-$k" type veth peer name eth0 netns "$PFX-$k" || fatal "veth tap-$k"
	ipn "$k" link set eth0 address "$(mac "$k")"
	ipn "$k" link set eth0 up
	ipn hv link set "tap-$k" up
	route_vm "$k" "tap-$k" "${IP[$k]}" 10.40.0.1
}

section topology
hv_add
for k in a b c; do ns_add "$k"; tap_up "$k"; done
wan_add cons wan0 198.51.100.1/24 "$CONS/24"
serve_tcp cons 443
serve_tcp a 22
serve_udp cons 51900
serve_sink cons 51902
serve_sink cons 51904
wait_listen cons 443; wait_listen a 22
for p in 51900 51902 51904; do wait_listen cons "$p" udp; done

cat >"$WORK/record.sh" <<EOF
#!/bin/sh
# terminate command: argv + environment + times to $WORK/act-\$1.log, then sleep 2 s
f="$WORK/act-\$1.log"
echo "start \$(date +%s%N) argc=\$# argv=\$*" >>"\$f"
env | grep '^VMFENCE_' | sort | sed 's/^/env /' >>"\$f"
sleep 2
echo "end \$(date +%s%N)" >>"\$f"
EOF
chmod +x "$WORK/record.sh"
act_log() { echo "$WORK/act-${NAME[$1]}.log"; }
starts() { grep -c '^start' "$(act_log "$1")" 2>/dev/null || echo 0; }
# act_field KEY NAME: a field of the command's first run ("env VMFENCE_X=..." or argv=...)
act_env() { awk -v k="env $2=" 'index($0, k) == 1 {print substr($0, length(k) + 1); exit}' "$(act_log "$1")" 2>/dev/null; }
act_time() { awk -v w="$2" '$1 == w {print $2; exit}' "$(act_log "$1")" 2>/dev/null; }

# violate KEY DPORT...: one violating datagram per DPORT to the consumer's sink
# (udp/51902 if DPORT is "-"), 50 ms apart; prints each one's send time (realtime ns).
violate() {
	local k=$1; shift
	nsx "$k" "$PY" -c '
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i, p in enumerate(sys.argv[2:]):
    if i:
        time.sleep(0.05)
    t = time.time_ns()
    s.sendto(b"violation", (sys.argv[1], int(p)))
    print(t)
' "$CONS" "$@"
}

section config
enforced && journal_setup
write_host "{ \"on_violation\": { \"action\": \"terminate\", \"command\": [\"$WORK/record.sh\", \"{vm}\", \"host-default\"],
  \"threshold\": 3, \"window_ms\": 1000 } }"
ALLOW="[ { \"to\": \"$CONS/32\", \"proto\": \"tcp\", \"ports\": [\"443\"] },
           { \"to\": \"$CONS/32\", \"proto\": \"udp\", \"ports\": [\"51900\", \"51904\"] } ]"
vm_json() {
	local k=$1 extra=""
	case $k in
	a) extra=", \"ingress\": [ { \"from\": \"$CONS/32\", \"proto\": \"tcp\", \"ports\": [\"22\"] } ],
  \"on_violation\": { \"threshold\": 1 }" ;;
	c) extra=', "on_violation": { "action": "alert" }' ;;
	esac
	echo "{ \"name\": \"${NAME[$k]}\", \"interface\": \"tap-$k\", \"mac\": \"$(mac "$k")\",
  \"addresses\": [\"${IP[$k]}/32\"], \"gateway\": [\"10.40.0.1\"], \"mode\": \"filtered\",
  \"egress\": $ALLOW$extra }"
}
for k in a b c; do write_vm "${NAME[$k]}" "$(vm_json "$k")"; done
start_daemon

section "before any violation: allowed traffic, both directions"
for k in a b c; do
	expect_ok "VM $k: tcp/443 to the consumer" quick_tcp "$k" "$CONS" 443 2
	expect_ok "VM $k: udp/51900 to the consumer" quick_udp "$k" "$CONS" 51900 2
done
expect_ok "consumer -> VM a tcp/22 (ingress rule)" quick_tcp cons "${IP[a]}" 22 2

if ! enforced; then
	nv_check() { violate a 51902 >/dev/null; sleep 0.5; grep -q ' violation$' "$WORK/srv/cons-sink-51902.log"; }
	expect_ok "without vmfence a violating datagram reaches the consumer" nv_check
	# The control of the quarantine check below (same command): without
	# vmfence b's allowed datagram arrives.
	expect_blocked "quarantined: allowed udp/51900 fails" quick_udp b "$CONS" 51900 0.5
	e2e_finish
fi

# ---------------------------------------------------------------------------
section "threshold 1: one violation quarantines at once; the command runs once"
q0=$(status_get "${NAME[a]}" drops.quarantined)
hb=hb$RANDOM
# Heartbeats: allowed udp/51904 every 10 ms for 5 s, each with its send time.
spawn a "$PY" -c '
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(500):
    try:
        s.sendto(("%s-%d %d" % (sys.argv[2], i, time.time_ns())).encode(), (sys.argv[1], 51904))
    except OSError:
        pass
    time.sleep(0.01)
' "$CONS" "$hb"
sleep 0.5
mark_log
T_V=$(violate a 51902)
for i in $(seq 300); do [ "$(starts a)" -ge 1 ] && break; sleep 0.01; done
T_START=$(act_time a start)
# While the command sleeps: every allowed flow must already be cut.
# (in parallel, 0.3 s each: well within the command's 2 s)
quick_udp a "$CONS" 51900 0.3 & q1=$!
quick_tcp a "$CONS" 443 0.3 & q2=$!
quick_tcp cons "${IP[a]}" 22 0.3 & q3=$!
p1=1; p2=1; p3=1
wait "$q1" && p1=0
wait "$q2" && p2=0
wait "$q3" && p3=0
T_PROBED=$(date +%s%N)
ended_before_probes=$(grep -c '^end' "$(act_log a)" 2>/dev/null)
expect_ok "the command started ($(( (T_START - T_V) / 1000000 )) ms after the packet was sent)" test -n "$T_START"
expect_ok "quarantined: allowed udp/51900 from the VM fails while the command runs" test "$p1" = 1
expect_ok "quarantined: allowed tcp/443 from the VM fails while the command runs" test "$p2" = 1
expect_ok "quarantined: allowed inbound tcp/22 to the VM fails while the command runs" test "$p3" = 1
expect_ok "the probes finished before the command did (no 'end' yet: ${ended_before_probes:-0})" test "${ended_before_probes:-0}" = 0
expect_ok "status: quarantined" test "$(status_get "${NAME[a]}" quarantined)" = 1
# A second burst while the command still runs: no second command.
violate a 51902 51903 51902 >/dev/null
for i in $(seq 40); do grep -q '^end' "$(act_log a)" && break; sleep 0.1; done
T_END=$(act_time a end)
expect_ok "probing finished $(( (T_END - T_PROBED) / 1000000 )) ms before the command ended" test "$T_PROBED" -lt "${T_END:-0}"
# Heartbeats: none sent 20 ms or more after the violating packet (margin for
# scheduling between the sender's clock read and its sendto()).
sleep 1
hb_before=$(awk -v t="$hb-" -v v="$T_V" 'index($2, t) == 1 && $3 < v' "$WORK/srv/cons-sink-51904.log" | wc -l)
hb_after=$(awk -v t="$hb-" -v v="$((T_V + 20000000))" 'index($2, t) == 1 && $3 > v' "$WORK/srv/cons-sink-51904.log" | wc -l)
hb_last=$(awk -v t="$hb-" 'index($2, t) == 1 {print $3}' "$WORK/srv/cons-sink-51904.log" | sort -n | tail -n 1)
say "heartbeats: $hb_before sent before the violating packet; $hb_after sent >20 ms after it; last one sent $(( (${hb_last:-0} - T_V) / 1000 )) us after the violating packet"
expect_ok "heartbeats flowed before the violation ($hb_before)" test "$hb_before" -gt 10
expect_ok "no heartbeat sent after the violation got through ($hb_after)" test "$hb_after" = 0
# After the command ended: another burst, still no second run.
violate a 51902 51905 >/dev/null
quick_tcp a "$CONS" 8443 0.3
sleep 2.5
expect_ok "the command ran exactly once (runs: $(starts a))" test "$(starts a)" = 1
expect_ok "one 'terminating' line for the incident" test "$(log_count "terminating vm=${NAME[a]} ")" = 1
expect_log "terminating vm=a logged with its latency" \
	"terminating vm=${NAME[a]} reason=egress_denied \([0-9.]+ ms after the packet\)"
expect_log "the command's exit status logged" "${NAME[a]}: terminate: command \(pid [0-9]+\) exited with status 0 after [0-9]+ ms"
expect_log "the triggering violation logged with quarantined=1" \
	"$(violation_re "${NAME[a]}" egress_denied "src=${IP[a]} dst=$CONS proto=udp sport=[0-9]+ dport=51902 mode=filtered quarantined=1")"
expect_ok "argv: {vm} replaced in the host's command ('$(grep -m1 '^start' "$(act_log a)" | cut -d' ' -f3-)')" \
	grep -Eq "^start [0-9]+ argc=2 argv=${NAME[a]} host-default$" "$(act_log a)"
expect_ok "env VMFENCE_VM=${NAME[a]}" test "$(act_env a VMFENCE_VM)" = "${NAME[a]}"
expect_ok "env VMFENCE_REASON=egress_denied" test "$(act_env a VMFENCE_REASON)" = egress_denied
expect_ok "env VMFENCE_SRC=${IP[a]}" test "$(act_env a VMFENCE_SRC)" = "${IP[a]}"
expect_ok "env VMFENCE_DST=$CONS" test "$(act_env a VMFENCE_DST)" = "$CONS"
expect_ok "env VMFENCE_DPORT=51902 (the triggering packet)" test "$(act_env a VMFENCE_DPORT)" = 51902
expect_ok "later packets counted as quarantined drops" test "$(status_get "${NAME[a]}" drops.quarantined)" -gt "$q0"
expect_ok "egress_denied counted once: later violations are quarantine drops" \
	test "$(status_get "${NAME[a]}" drops.egress_denied)" = 1
journal_expect "journald: the triggering violation, every contract field" "${NAME[a]}" \
	"VMFENCE_VM=${NAME[a]}" VMFENCE_REASON=egress_denied "VMFENCE_SRC=${IP[a]}" "VMFENCE_DST=$CONS" \
	VMFENCE_PROTO=udp VMFENCE_DPORT=51902 VMFENCE_MODE=filtered PRIORITY=4 "MESSAGE=.*\[quarantined\]"
expect_ok "the other VMs are unaffected (b: udp/51900)" quick_udp b "$CONS" 51900 2
# Packets dropped by the quarantine are reported too (budgeted): they must name
# the packet, not an unparsed all-zero one.
n_unparsed=$(journal_count "${NAME[a]}" VMFENCE_REASON=quarantined "VMFENCE_PROTO=ethertype:0x0000")
n_quar=$(journal_count "${NAME[a]}" VMFENCE_REASON=quarantined)
expect_ok "quarantine drop reports carry the packet's headers ($n_unparsed of $n_quar journal entries have src=00:00:00:00:00:00 dst='' proto=ethertype:0x0000)" \
	test "$n_unparsed" = 0

# ---------------------------------------------------------------------------
section "threshold 3 in 1000 ms (host default): the third violation in the window acts"
mark_log
T1=$(violate b 51911 51912)
T1=${T1%%$'\n'*}
sleep 0.3
expect_ok "2 violations: no command" test "$(starts b)" = 0
expect_ok "2 violations: not quarantined" test "$(status_get "${NAME[b]}" quarantined)" = 0
expect_ok "2 violations: allowed udp/51900 still passes" quick_udp b "$CONS" 51900 1
expect_log "both violations logged" "$(violation_re "${NAME[b]}" egress_denied "dport=51912 mode=filtered")"
# Let the window (which started at the first violation) expire.
while [ $(( $(date +%s%N) - T1 )) -lt 1300000000 ]; do sleep 0.05; done
violate b 51913 51914 51915 >/dev/null
for i in $(seq 300); do [ "$(starts b)" -ge 1 ] && break; sleep 0.01; done
expect_ok "3 violations in a fresh window: the command ran" test "$(starts b)" = 1
expect_ok "the third violation of the window triggered it (VMFENCE_DPORT=$(act_env b VMFENCE_DPORT), want 51915)" \
	test "$(act_env b VMFENCE_DPORT)" = 51915
expect_ok "argv: host default command ('$(grep -m1 '^start' "$(act_log b)" | cut -d' ' -f3-)')" \
	grep -Eq "^start [0-9]+ argc=2 argv=${NAME[b]} host-default$" "$(act_log b)"
expect_ok "env VMFENCE_VM / REASON / SRC / DST" \
	test "$(act_env b VMFENCE_VM) $(act_env b VMFENCE_REASON) $(act_env b VMFENCE_SRC) $(act_env b VMFENCE_DST)" = "${NAME[b]} egress_denied ${IP[b]} $CONS"
expect_ok "quarantined after the third" test "$(status_get "${NAME[b]}" quarantined)" = 1
expect_blocked "quarantined: allowed udp/51900 fails" quick_udp b "$CONS" 51900 0.5
expect_ok "egress_denied counter = 5 (each violation before the quarantine)" \
	test "$(status_get "${NAME[b]}" drops.egress_denied)" = 5
expect_log "the triggering line is dport=51915 with quarantined=1" \
	"$(violation_re "${NAME[b]}" egress_denied "dport=51915 mode=filtered quarantined=1")"
expect_no_log "no other violation of b carries quarantined=1" \
	"violation vm=${NAME[b]} reason=egress_denied .*dport=519(11|12|13|14) .*quarantined=1"

# ---------------------------------------------------------------------------
section "alert (VM override): drop and report only"
mark_log
violate c 51902 51902 51902 >/dev/null
sleep 0.5
expect_log "alert: violations logged" "$(violation_re "${NAME[c]}" egress_denied "dport=51902 mode=filtered")"
expect_ok "alert: no command ran" test ! -e "$(act_log c)"
expect_ok "alert: not quarantined" test "$(status_get "${NAME[c]}" quarantined)" = 0
expect_ok "alert: allowed udp/51900 still passes" quick_udp c "$CONS" 51900 1
expect_no_log "alert: no terminating line" "terminating vm=${NAME[c]} "

# ---------------------------------------------------------------------------
section "the VM manager restarts a (new TAP): quarantine cleared, a new incident acts again"
mark_log
ipn hv link del tap-a
sleep 0.3
tap_up a
expect_log "a re-enforced on its new interface" "vm ${NAME[a]} enforced on tap-a \(ifindex [0-9]+\)"
expect_ok "restarted: not quarantined" test "$(status_get "${NAME[a]}" quarantined)" = 0
expect_ok "restarted: allowed udp/51900 passes" quick_udp a "$CONS" 51900 2
expect_ok "restarted: allowed tcp/443 passes" quick_tcp a "$CONS" 443 2
violate a 51906 >/dev/null
for i in $(seq 300); do [ "$(starts a)" -ge 2 ] && break; sleep 0.01; done
expect_ok "new incident: the command ran a second time (runs: $(starts a))" test "$(starts a)" = 2
expect_ok "new incident: quarantined again" test "$(status_get "${NAME[a]}" quarantined)" = 1
sleep 2.3

section "counters"
counters_match_log
e2e_finish
