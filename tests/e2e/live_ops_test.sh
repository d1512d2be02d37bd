#!/usr/bin/env bash
# End-to-end: live operation without gaps (issue 5), real kernel, real packets.
#
# Topology (routed, as seed 003), all in namespaces "$PFX-*":
#   hv:   forwarding on; vmN interfaces (veth host ends = the TAPs) carry the
#         gateway 10.0.0.0/32 with proxy_arp and a host route 10.0.0.N/32.
#         wan0 198.51.100.1/24 -> netns "srv" 198.51.100.2: UDP stream sink
#         7001/7002, TCP banners 8443/8444, TCP echo 9000.
#   vm1:  filtered; egress udp/7001 + tcp/8443 to srv. The UDP streams.
#   vm2:  filtered; egress tcp/8443 + one udp port that the test keeps
#         rewriting (reloads), later an invalid file, then no file at all.
#   vm4:  conntrack; egress tcp/9000 (the long-lived TCP flow) to srv.
#   vm3:  a veth created only after the daemon started (vmfence wait).
#   vm5:  a real TAP created after start, deleted and re-created.
#   ghost: a spec whose interface never appears.
# Sections (numbers as in the issue's test list):
#   1 two UDP streams (allowed/denied) across 10 reloads of vm2, SIGKILL of the
#     agent and a restart: denied delivers 0, allowed loses < 0.5 %
#   5 explain agrees with real traffic (allowed and denied)
#   3 invalid spec keeps the last good policy; removed spec drops everything
#   2 interfaces created after start attached promptly (target 50 ms); vmfence wait
#   4 conntrack: an open TCP flow is cut when its egress rule is removed
#   6 vmfence check reports every error of a file with several
# NO_VMFENCE=1 (run by lib.sh as the control of the expect_blocked checks):
# the topology only, and the flows vmfence drops must go through.
# Needs root, /usr/bin/python3. Env: see lib.sh (VMFENCE, KEEP, CI, E2E_VERBOSE);
# STREAM_SECS (default 14), STREAM_RATE (pkt/s per stream, default 1000),
# ATTACH_TARGET_US (default 100000: twice the 50 ms target, see below).
set -u
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/live_lib.sh"
e2e_init live_ops

STREAM_SECS=${STREAM_SECS:-14}
STREAM_RATE=${STREAM_RATE:-1000}
# The issue's target is 50 ms (bench/control_plane_bench.sh measures it: p99
# 28-32 ms). Two tcx link creations cost ~15-20 ms each in the kernel on this
# kind of machine and more when it is busy, so the test allows twice the
# target: it fails when attaching is broken or slow, not on scheduler noise.
ATTACH_TARGET_US=${ATTACH_TARGET_US:-100000}
SRV=198.51.100.2

# routed_vm N: hv side of VM N's interface vmN (gateway, proxy ARP, host
# route) and the VM side (10.0.0.N/32, default via 10.0.0.0). IPv6 off in the
# VM: its link-local chatter would muddy the drop counters this test checks.
routed_vm() {
	local n=$1 dev=vm$1
	nsx "vm$n" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.eth0.disable_ipv6=1
	route_vm "vm$n" "$dev" "10.0.0.$n" 10.0.0.0
}

# vm_spec N MODE EGRESS_RULES [IFACE]
vm_spec() {
	printf '{ "name": "vm%s", "interface": "%s", "mac": "02:00:00:00:00:0%s",
  "addresses": ["10.0.0.%s/32"], "gateway": ["10.0.0.0"], "mode": "%s",
  "egress": [%s] }' "$1" "${4:-vm$1}" "$1" "$1" "$2" "$3"
}
R_TCP8443="{ \"to\": \"$SRV/32\", \"proto\": \"tcp\", \"ports\": [\"8443\"] }"
R_UDP7001="{ \"to\": \"$SRV/32\", \"proto\": \"udp\", \"ports\": [\"7001\"] }"
R_TCP9000="{ \"to\": \"$SRV/32\", \"proto\": \"tcp\", \"ports\": [\"9000\"] }"
r_udp() { echo "{ \"to\": \"$SRV/32\", \"proto\": \"udp\", \"ports\": [\"$1\"] }"; }

section topology
hv_add
for n in 1 2 4; do
	vm_add "vm$n" "vm$n" "02:00:00:00:00:0$n"
	routed_vm "$n"
done
wan_add srv wan0 198.51.100.1/24 "$SRV/24"
serve_tcp srv 8443
serve_tcp srv 8444
spawn srv socat TCP-LISTEN:9000,reuseaddr,fork PIPE
wait_listen srv 8443; wait_listen srv 8444; wait_listen srv 9000

if ! enforced; then
	# NO_VMFENCE=1 (lib.sh's control run): every other check is about the
	# running agent. What is left: each flow the enforced run expects vmfence
	# to drop (same commands) goes through without it. vm3 is wired as the
	# enforced run wires it once the daemon runs.
	section "unenforced: the flows vmfence drops"
	ns_add vm3
	ip -n "$HV" link add vm3 type veth peer name eth0 netns "$PFX-vm3" || fatal "veth vm3"
	ipn vm3 link set eth0 address 02:00:00:00:00:03
	ipn vm3 link set eth0 up
	ipn hv link set vm3 up
	routed_vm 3
	expect_blocked "vm1 -> srv tcp/8444" tcp_probe vm1 "$SRV" 8444
	expect_blocked "vm2 -> srv tcp/8444" tcp_probe vm2 "$SRV" 8444
	expect_blocked "vm2 -> srv tcp/8443 (dropped once vm2's spec is gone)" tcp_probe vm2 "$SRV" 8443
	expect_blocked "vm3 -> srv tcp/8444" tcp_probe vm3 "$SRV" 8444
	e2e_finish
fi

section config
write_host '{}'
write_vm vm1 "$(vm_spec 1 filtered "$R_UDP7001, $R_TCP8443")"
write_vm vm2 "$(vm_spec 2 filtered "$R_TCP8443, $(r_udp 20000)")"
write_vm vm4 "$(vm_spec 4 conntrack "$R_TCP9000")"
expect_ok "vmfence check accepts the test configuration" vmf check --config "$CONF"
start_daemon
expect_ok "control: vm1 -> srv tcp/8443 (allowed) works" tcp_probe vm1 "$SRV" 8443
expect_ok "control: vm2 -> srv tcp/8443 (allowed) works" tcp_probe vm2 "$SRV" 8443

# ---------------------------------------------------------------------------
section "1. UDP streams (allowed 7001, denied 7002) across 10 reloads of vm2, SIGKILL, restart"
py_bg srv "$WORK/receiver.out" "$UDP_RECEIVER" "$WORK/streams.json" 7001 7002
RECEIVER=$LAST_PID
wait_listen srv 7001 udp; wait_listen srv 7002 udp
DROPS0=$(vm_status vm1 drops.egress_denied)
G1_0=$(vm_status vm1 policy_generation)
G2=$(vm_status vm2 policy_generation)
mark_log
RELOAD_MARK=$LOG_MARK
py_bg vm1 "$WORK/sender.out" "$UDP_SENDER" "$SRV" "$STREAM_RATE" "$STREAM_SECS" "$WORK/sent.json" 7001 7002
SENDER=$LAST_PID
T_STREAM=${EPOCHREALTIME/./}
sleep 1.5
gens=("$G2")
reload_ok=1
for i in $(seq 10); do
	write_vm_atomic vm2 "$(vm_spec 2 filtered "$R_TCP8443, $(r_udp $((20000 + i)))")"
	if ! G2=$(wait_generation vm2 "$G2" 5); then
		reload_ok=0
		say "reload $i of vm2: no new policy generation within 5 s"
	fi
	gens+=("$G2")
	sleep 0.2
done
say "vm2 policy generations: ${gens[*]} (stream at $(_elapsed "$T_STREAM") s)"
expect_ok "each of the 10 rewrites of vm2 gave it a new policy generation" test "$reload_ok" = 1
expect_ok "10 reloads logged with 1 VM changed" \
	test "$(_log_since_mark | grep -Ec 'reload \(spec files changed\): 1 VMs changed, 0 removed')" -ge 10
expect_ok "vm1's policy generation untouched by vm2's reloads ($G1_0)" test "$(vm_status vm1 policy_generation)" = "$G1_0"
# Per-VM policy tries (issue 10): each VM's own trie, pinned by name with BTF,
# holds the last generation only; status --rules reads what the kernel holds.
trie_ports() { bpftool -j map dump pinned "$PIN/policy/$1_$2" 2>/dev/null | "$PY" -c '
import json, sys
print(" ".join(sorted(set("%s/%d" % ({6: "tcp", 17: "udp"}.get(r["proto"], r["proto"]), r["port_lo"])
    for e in json.load(sys.stdin) for r in e["formatted"]["value"]["rules"][:e["formatted"]["value"]["count"]]))))'; }
say "pinned tries: $(ls "$PIN/policy" | tr '\n' ' ')"
expect_ok "bpftool prints vm2's egress trie by field: its last rules only (tcp/8443 udp/20010)" \
	test "$(trie_ports vm2 egress)" = "tcp/8443 udp/20010"
expect_ok "vm1's trie holds none of vm2's rules ($(trie_ports vm1 egress))" \
	test "$(trie_ports vm1 egress)" = "tcp/8443 udp/7001"
expect_ok "one egress and one ingress trie pinned per VM (6), none left from the 10 reloads" \
	test "$(ls "$PIN/policy" | wc -l)" = 6
expect_ok "status --vm vm2 --rules shows the rule in force (udp 20010, not udp 20009)" \
	"$PY" -c '
import json, sys
st = json.loads(sys.argv[1])
(v,) = st["vms"]
allow = [a for e in v["rules"]["egress"] for a in e["allow"]]
sys.exit(0 if v["name"] == "vm2" and "udp 20010" in allow and "udp 20009" not in allow else 1)' "$(vmf status --vm vm2 --rules --json)"
ST_TXT=$(vmf status --vm vm2 --rules)
expect_ok "status --vm vm2 --rules (text) lists the egress rules" test -n "$(grep 'udp 20010' <<<"$ST_TXT")"
expect_fail "status --vm for an unknown VM exits non-zero" vmf status --vm nosuchvm

IFX1=$(ipn hv -o link show dev vm1 | awk -F: '{print $1}')
# pinned_link DIR: "LINK_ID PROG_ID" of vm1's pinned tcx link (from_vm|to_vm).
pinned_link() { bpftool link show pinned "$PIN/links/if${IFX1}_$1" 2>/dev/null | awk -F'[: ]+' 'NR == 1 {for (i = 1; i < NF; i++) if ($i == "prog") print $1, $(i + 1)}'; }
LINK_IN0=$(pinned_link from_vm); LINK_OUT0=$(pinned_link to_vm)
say "SIGKILL the agent at $(_elapsed "$T_STREAM") s into the stream"
stop_daemon KILL
progs=$(tap_progs hv vm1)
say "vm1 after SIGKILL: $(echo "$progs" | tr '\n' ';')"
expect_ok "programs stay attached on vm1 after SIGKILL" \
	test "$(echo "$progs" | grep -c '^tcx/')" = 2
sleep 1.5
say "restart at $(_elapsed "$T_STREAM") s into the stream"
T_RESTART=${EPOCHREALTIME/./}
start_daemon
# vmfence wait returns at once here (the kernel kept enforcing); the new agent
# has taken over when it logs "enforcing" for the second time.
expect_ok "the restarted agent took over (second \"enforcing 3 VMs\" log line)" log_wait_count 'enforcing 3 VMs' 2 10
say "agent restarted and took over in $(_elapsed "$T_RESTART") s"
progs=$(tap_progs hv vm1)
say "vm1 after restart: $(echo "$progs" | tr '\n' ';')"
expect_ok "after restart exactly one program per direction on vm1 (tcx link updated in place, no second attach)" \
	test "$(echo "$progs" | grep -c '^tcx/ingress')" = 1 -a "$(echo "$progs" | grep -c '^tcx/egress')" = 1 -a \
	"$(echo "$progs" | grep -c '^tc/')" = 0
LINK_IN1=$(pinned_link from_vm); LINK_OUT1=$(pinned_link to_vm)
say "vm1's pinned links (link prog): from_vm $LINK_IN0 -> $LINK_IN1, to_vm $LINK_OUT0 -> $LINK_OUT1"
expect_ok "restart kept vm1's tcx links and swapped their programs (same link ids, new program ids)" \
	test -n "$LINK_IN0" -a -n "$LINK_OUT0" -a "${LINK_IN1% *}" = "${LINK_IN0% *}" -a "${LINK_OUT1% *}" = "${LINK_OUT0% *}" \
	-a "${LINK_IN1#* }" != "${LINK_IN0#* }" -a "${LINK_OUT1#* }" != "${LINK_OUT0#* }"
wait "$SENDER"
sleep 0.5
touch "$WORK/streams.json.stop"
wait "$RECEIVER"
if [ -s "$WORK/sent.json" ] && [ -s "$WORK/streams.json" ]; then
	read -r SENT ALLOWED_RX DENIED_RX LOSS_PCT GAPS < <("$PY" -c '
import json, sys
sent = json.load(open(sys.argv[1]))["sent"]
rx = json.load(open(sys.argv[2]))
a, d = rx["7001"], rx["7002"]
loss = 100.0 * (sent - a["count"]) / sent if sent else 100.0
gaps = []
prev = -1
for lo, hi in a["ranges"] + [[sent, sent]]:
    if lo > prev + 1:
        gaps.append("%d-%d" % (prev + 1, lo - 1))
    prev = hi
print(sent, a["count"], d["count"], "%.3f" % loss, ",".join(gaps[:20]) or "none")
' "$WORK/sent.json" "$WORK/streams.json")
	say "sent $SENT per stream at $STREAM_RATE pkt/s; allowed received $ALLOWED_RX (loss $LOSS_PCT %, missing seqs: $GAPS); denied received $DENIED_RX"
	expect_ok "denied stream (udp/7002) delivered zero packets" test "$DENIED_RX" = 0
	expect_ok "allowed stream (udp/7001) lost < 0.5 % ($LOSS_PCT %)" \
		"$PY" -c "import sys; sys.exit(0 if $LOSS_PCT < 0.5 and $SENT >= $STREAM_RATE * ($STREAM_SECS - 1) else 1)"
	DROPS1=$(vm_status vm1 drops.egress_denied)
	say "vm1 egress_denied counter: $DROPS0 -> $DROPS1 (delta $((DROPS1 - DROPS0)), denied datagrams sent $SENT)"
	expect_ok "vm1's egress_denied counter grew by exactly the denied datagrams sent (counters survive the restart)" \
		test "$((DROPS1 - DROPS0))" = "$SENT"
else
	_fail "stream results missing (sender: $(cat "$WORK/sender.out"), receiver: $(cat "$WORK/receiver.out"))"
fi
LOG_MARK=$RELOAD_MARK
expect_log "denied stream reported (egress_denied dport=7002)" "$(violation_re vm1 egress_denied 'dst=198\.51\.100\.2 proto=udp sport=[0-9]+ dport=7002')"
expect_no_log "no violation for the allowed stream (dport=7001)" 'violation vm=vm1 .* dport=7001 '

# ---------------------------------------------------------------------------
section "5. explain agrees with real traffic"
# explain_check DESC VERDICT_RE TARGET: explain's verdict line matches, the
# kernel replay agrees, exit 0.
explain_check() {
	local d=$1 re=$2 tgt=$3 out rc
	out=$(vmf explain --config "$CONF" --vm vm1 --to "$tgt" 2>&1)
	rc=$?
	echo "$out" | sed 's/^/    | /'
	if [ "$rc" = 0 ] && echo "$out" | grep -Eq -- "$re" && echo "$out" | grep -Eq '^  kernel: .* - agrees$' &&
		echo "$out" | grep -Eq '^  rule: '; then
		_pass "$d"
	else
		_fail "$d  [rc=$rc]"
	fi
}
mark_log
explain_check "explain vm1 -> srv:8443/tcp: ALLOW, kernel agrees" "^vm1 -> $SRV:8443/tcp: ALLOW$" "$SRV:8443/tcp"
expect_ok "real traffic: vm1 -> srv tcp/8443 passes" tcp_probe vm1 "$SRV" 8443
explain_check "explain vm1 -> srv:8444/tcp: DENY (egress_denied), kernel agrees" \
	"^vm1 -> $SRV:8444/tcp: DENY \(egress_denied\)$" "$SRV:8444/tcp"
expect_blocked "real traffic: vm1 -> srv tcp/8444 is dropped" tcp_probe vm1 "$SRV" 8444
expect_log "the dropped tcp/8444 SYN was reported as egress_denied" "$(violation_re vm1 egress_denied 'proto=tcp sport=[0-9]+ dport=8444 ')"
explain_check "explain vm1 -> srv:7001/udp: ALLOW (the stream that arrived)" "^vm1 -> $SRV:7001/udp: ALLOW$" "$SRV:7001/udp"
explain_check "explain vm1 -> srv:7002/udp: DENY (the stream that never arrived)" \
	"^vm1 -> $SRV:7002/udp: DENY \(egress_denied\)$" "$SRV:7002/udp"

# ---------------------------------------------------------------------------
section "3. invalid spec keeps the last good policy; removed spec drops everything"
G2=$(vm_status vm2 policy_generation)
mark_log
# (a) truncated JSON
write_vm_atomic vm2 '{ "name": "vm2", "interface": "vm2", "mac": '
expect_log "syntax error reported as FILE: message" "vms\.d/vm2\.json: .+" 5
expect_log "reload keeps vm2 at its last good policy" 'reload \(spec files changed\): 0 VMs changed, 0 removed, 1 kept at their last good policy' 5
expect_ok "vm2's policy generation unchanged ($G2)" test "$(vm_status vm2 policy_generation)" = "$G2"
expect_ok "vm2 -> srv tcp/8443 still passes (last good policy)" tcp_probe vm2 "$SRV" 8443
expect_blocked "vm2 -> srv tcp/8444 still denied (last good policy)" tcp_probe vm2 "$SRV" 8444
# (b) well-formed JSON, invalid spec (bad port, unknown field)
mark_log
write_vm_atomic vm2 "{ \"name\": \"vm2\", \"interface\": \"vm2\", \"mac\": \"02:00:00:00:00:02\",
  \"addresses\": [\"10.0.0.2/32\"], \"gateway\": [\"10.0.0.0\"], \"colour\": \"red\",
  \"egress\": [ { \"to\": \"0.0.0.0/0\", \"proto\": \"tcp\", \"ports\": [\"99999\"] } ] }"
expect_log "schema errors reported as FILE: path: message (egress[0].ports[0])" 'vms\.d/vm2\.json: egress\[0\]\.ports\[0\]: .+' 5
expect_log "schema errors reported as FILE: path: message (colour)" 'vms\.d/vm2\.json: colour: unknown field' 5
expect_log "reload keeps vm2 at its last good policy" '1 kept at their last good policy' 5
expect_ok "vm2's policy generation unchanged ($G2)" test "$(vm_status vm2 policy_generation)" = "$G2"
expect_ok "vm2 -> srv tcp/8443 still passes (last good policy)" tcp_probe vm2 "$SRV" 8443
expect_blocked "vm2 -> srv tcp/8444 still denied (the invalid file's 0.0.0.0/0 rule is not in force)" tcp_probe vm2 "$SRV" 8444
# (c) spec removed, interface remains
mark_log
rm -f "$CONF/vms.d/vm2.json"
expect_log "removal logged" 'vm vm2: spec removed' 5
expect_log "reload counts one removed VM" 'reload \(spec files changed\): 0 VMs changed, 1 removed' 5
expect_blocked "vm2 -> srv tcp/8443 dropped once its spec is gone" tcp_probe vm2 "$SRV" 8443
expect_log "the drops are reported with reason no_policy" 'violation vm=\S+ reason=no_policy dir=from_vm ' 5
# The report must say whose packet it was: the VM's name (the agent knew it
# until the reload) or at least the packet's source address.
expect_log "the no_policy report identifies vm2 (vm=vm2 or src=10.0.0.2)" \
	'violation vm=(vm2 reason=no_policy dir=from_vm|\S+ reason=no_policy dir=from_vm src=10\.0\.0\.2 )' 1
st=$(vmf status --json 2>/dev/null | "$PY" -c '
import json, sys
for v in json.load(sys.stdin)["vms"]:
    if v.get("interface") == "vm2":
        print(v.get("spec_removed"), v.get("attached"), v.get("drops", {}).get("no_policy", 0) > 0)' 2>/dev/null)
expect_ok "status shows vm2's interface still attached, spec_removed, no_policy drops counted ($st)" test "$st" = "True True True"
expect_fail "vmfence wait --vm vm2 fails while its spec is removed" vmf wait --vm vm2 --timeout 0.5
# (d) restored
mark_log
write_vm_atomic vm2 "$(vm_spec 2 filtered "$R_TCP8443")"
expect_ok "vmfence wait --vm vm2 succeeds once the spec is back" vmf wait --vm vm2 --timeout 5
expect_ok "vm2 -> srv tcp/8443 passes again" tcp_probe vm2 "$SRV" 8443

# ---------------------------------------------------------------------------
section "2. interfaces created after start; vmfence wait"
mark_log
write_vm_atomic vm3 "$(vm_spec 3 filtered "$R_TCP8443")"
write_vm_atomic vm5 "$(vm_spec 5 filtered "$R_TCP8443")"
write_vm_atomic ghost '{ "name": "ghost", "interface": "ghost0", "mac": "02:00:00:00:00:09", "addresses": ["10.0.0.9/32"] }'
expect_log "vm3 known before its interface exists" 'vm vm3: interface vm3 not present yet' 5
expect_log "ghost known before its interface exists" 'vm ghost: interface ghost0 not present yet' 5
vmf wait --vm vm3 --timeout 30 >"$WORK/wait-vm3.out" 2>&1 &
WAIT3=$!
vmf wait --vm vm5 --timeout 30 >"$WORK/wait-vm5.out" 2>&1 &
WAIT5=$!
T_GHOST=${EPOCHREALTIME/./}
vmf wait --vm ghost --timeout 1.5 >"$WORK/wait-ghost.out" 2>&1
GHOST_RC=$?
GHOST_S=$(_elapsed "$T_GHOST")
expect_ok "vmfence wait --vm ghost (interface never appears) exits 1 after its timeout (${GHOST_S} s)" \
	test "$GHOST_RC" = 1 -a "${GHOST_S%.*}" -ge 1
expect_fail "vmfence wait --vm nosuchvm (no such VM) fails on timeout" vmf wait --vm nosuchvm --timeout 0.3
expect_ok "vmfence wait --vm vm3 still blocked while vm3 does not exist" kill -0 "$WAIT3"
expect_ok "vmfence wait --vm vm5 still blocked while vm5 does not exist" kill -0 "$WAIT5"

# attach_latency VM IFACE T_ADD_US: check the daemon's attach log line for
# IFACE; sets ATTACH_US (daemon's figure) and E2E_US (link creation command
# start -> log timestamp, ms resolution).
attach_latency() {
	local vm=$1 dev=$2 t_add=$3 line ts
	line=$(_log_since_mark | grep -E "vm $vm enforced on $dev \(ifindex [0-9]+\) [0-9]+ us after the link event" | tail -n 1)
	ATTACH_US=$(echo "$line" | sed -nE 's/.*\) ([0-9]+) us after the link event.*/\1/p')
	ATTACH_IFINDEX=$(echo "$line" | sed -nE 's/.*\(ifindex ([0-9]+)\).*/\1/p')
	ts=$(log_epoch_us "$line" 2>/dev/null)
	E2E_US=$(( ${ts:-0} - t_add ))
	say "attach of $dev: daemon ${ATTACH_US:-?} us after the link event; link command start -> log line ~$((E2E_US / 1000)) ms (ms clock)"
}

ns_add vm3  # the namespace first: the clock starts at the link creation itself
T_ADD=${EPOCHREALTIME/./}
ip -n "$HV" link add vm3 type veth peer name eth0 netns "$PFX-vm3" || fatal "veth vm3"
ipn vm3 link set eth0 address 02:00:00:00:00:03
ipn vm3 link set eth0 up
ipn hv link set vm3 up
T_ADDED=${EPOCHREALTIME/./}
wait "$WAIT3"
WAIT3_RC=$?
T_WAITED=${EPOCHREALTIME/./}
IFX3=$(ipn hv -o link show dev vm3 | awk -F: '{print $1}')
ATT3=$(vm_status vm3 attached)
IF3=$(vm_status vm3 ifindex)
say "wait --vm vm3: rc=$WAIT3_RC, $(cat "$WORK/wait-vm3.out"), $(( (T_WAITED - T_ADD) / 1000 )) ms after the link command started (command took $(( (T_ADDED - T_ADD) / 1000 )) ms)"
expect_ok "vmfence wait --vm vm3 (started before the veth existed) exits 0" test "$WAIT3_RC" = 0
expect_ok "right after wait: status shows vm3 attached on ifindex $IFX3 ($ATT3, $IF3)" test "$ATT3" = true -a "$IF3" = "$IFX3"
expect_ok "wait reported the new interface's ifindex" grep -q "enforced on vm3 (ifindex $IFX3," "$WORK/wait-vm3.out"
progs=$(tap_progs hv vm3)
expect_ok "vm3 has the programs on both hooks ($(echo "$progs" | tr '\n' ';'))" \
	test "$(echo "$progs" | grep -c '^tcx/')" = 2
expect_log "daemon logged the attach of vm3" 'vm vm3 enforced on vm3 \(ifindex [0-9]+\) [0-9]+ us after the link event' 2
attach_latency vm3 vm3 "$T_ADD"
expect_ok "vm3 attached on the created ifindex ($ATTACH_IFINDEX)" test "${ATTACH_IFINDEX:-x}" = "$IFX3"
expect_ok "vm3 attached ${ATTACH_US:-?} us after the link event (< $ATTACH_TARGET_US)" test "${ATTACH_US:-999999999}" -lt "$ATTACH_TARGET_US"
expect_ok "vm3 attached within $((ATTACH_TARGET_US / 1000)) ms of starting the link command (log clock, ms)" \
	test "$E2E_US" -lt "$ATTACH_TARGET_US"
routed_vm 3
expect_ok "vm3 -> srv tcp/8443 (allowed) passes" tcp_probe vm3 "$SRV" 8443
# Its flow table came with its interface (none while it was absent) and
# carried the reply above.
expect_ok "vm3's flow table exists since its interface does ($(vm_status vm3 flows.entries) / $(vm_status vm3 flows.max_entries) flows)" \
	test "$(vm_status vm3 flows.max_entries)" = 16384 -a "$(vm_status vm3 flows.entries)" -ge 1
expect_blocked "vm3 -> srv tcp/8444 (not allowed) dropped" tcp_probe vm3 "$SRV" 8444
expect_log "vm3's denied SYN reported" "$(violation_re vm3 egress_denied 'dport=8444 ')"

# A real TAP (no process behind it: carrier down, still attachable).
mark_log
T_ADD=${EPOCHREALTIME/./}
ipn hv tuntap add dev vm5 mode tap
wait "$WAIT5"
WAIT5_RC=$?
IFX5=$(ipn hv -o link show dev vm5 | awk -F: '{print $1}')
expect_ok "vmfence wait --vm vm5 (started before the TAP existed) exits 0 ($(cat "$WORK/wait-vm5.out"))" test "$WAIT5_RC" = 0
expect_ok "right after wait: status shows vm5 attached on ifindex $IFX5" \
	test "$(vm_status vm5 attached)" = true -a "$(vm_status vm5 ifindex)" = "$IFX5"
expect_log "daemon logged the attach of the TAP vm5" 'vm vm5 enforced on vm5 \(ifindex [0-9]+\) [0-9]+ us after the link event' 2
attach_latency vm5 vm5 "$T_ADD"
expect_ok "TAP vm5 attached ${ATTACH_US:-?} us after the link event (< $ATTACH_TARGET_US)" test "${ATTACH_US:-999999999}" -lt "$ATTACH_TARGET_US"
# The TAP goes away (VM stopped) and comes back (VM restarted): new ifindex.
mark_log
ipn hv link del vm5
expect_log "vm5's interface going away is noticed" 'vm vm5: interface vm5 gone' 3
expect_fail "vmfence wait --vm vm5 fails while the TAP is gone" vmf wait --vm vm5 --timeout 0.3
expect_fail "the VM map forgot the deleted TAP's ifindex $IFX5" vms_has_ifindex "$IFX5"
expect_ok "no link pins left for the deleted TAP's ifindex $IFX5" test "$(link_pins "$IFX5")" = 0
mark_log
T_ADD=${EPOCHREALTIME/./}
ipn hv tuntap add dev vm5 mode tap
IFX5B=$(ipn hv -o link show dev vm5 | awk -F: '{print $1}')
expect_ok "vmfence wait --vm vm5 returns for the re-created TAP" vmf wait --vm vm5 --timeout 5
expect_ok "status shows vm5 attached on the new ifindex $IFX5B (was $IFX5)" \
	test "$(vm_status vm5 attached)" = true -a "$(vm_status vm5 ifindex)" = "$IFX5B"
expect_log "daemon logged the attach of the re-created TAP" "vm vm5 enforced on vm5 \(ifindex $IFX5B\) [0-9]+ us after the link event" 2
attach_latency vm5 vm5 "$T_ADD"
expect_ok "re-created TAP attached ${ATTACH_US:-?} us after the link event (< $ATTACH_TARGET_US)" test "${ATTACH_US:-999999999}" -lt "$ATTACH_TARGET_US"
# A VM manager that drops the spec first and deletes the TAP after: the
# interface first drops everything, then its state must go with it (bounded
# state: VMs come and go all day).
mark_log
rm -f "$CONF/vms.d/vm5.json"
expect_log "vm5's spec removal noticed" 'vm vm5: spec removed' 3
expect_ok "vm5's TAP still has the VM map entry (drop everything) while it exists" vms_has_ifindex "$IFX5B"
ipn hv link del vm5
sleep 0.5
expect_fail "the VM map forgot the spec-less TAP's ifindex $IFX5B after it was deleted (no leaked entry/slot)" vms_has_ifindex "$IFX5B"
expect_ok "no link pins left for the spec-less TAP's ifindex $IFX5B" test "$(link_pins "$IFX5B")" = 0

# ---------------------------------------------------------------------------
section "4. conntrack: an open TCP flow is cut when its egress rule is removed"
TCPLOG=$WORK/tcp-client.log
: >"$TCPLOG"
echoes() { grep -c ' echo ' "$TCPLOG"; }
py_bg vm4 "$WORK/tcp-client.out" "$TCP_LINE_CLIENT" "$SRV" 9000 30 "$TCPLOG"
CLIENT=$LAST_PID
for i in $(seq 50); do [ "$(echoes)" -ge 5 ] && break; sleep 0.1; done
expect_ok "the TCP flow vm4 -> srv:9000 echoes lines ($(echoes) so far)" test "$(echoes)" -ge 5
expect_ok "status shows vm4 in mode conntrack" test "$(vm_status vm4 mode)" = conntrack
# A new generation that still allows the flow: the re-check keeps it.
G4=$(vm_status vm4 policy_generation)
mark_log
write_vm_atomic vm4 "$(vm_spec 4 conntrack "$R_TCP9000, $(r_udp 53)")"
G4B=$(wait_generation vm4 "$G4" 5)
expect_ok "vm4 got a new policy generation ($G4 -> $G4B) with the rule kept" test -n "$G4B" -a "$G4B" != "$G4"
n0=$(echoes); sleep 1.2; n1=$(echoes)
expect_ok "the flow survives a policy change that still allows it ($n0 -> $n1 echoes)" test "$((n1 - n0))" -ge 8
expect_no_log "no violation for vm4 while its rule is in force" 'violation vm=vm4 '
# Now remove the rule the flow relies on.
mark_log
T_CUT=${EPOCHREALTIME/./}
write_vm_atomic vm4 "$(vm_spec 4 conntrack "$(r_udp 53)")"
G4C=$(wait_generation vm4 "$G4B" 5)
say "rule removed: generation $G4B -> $G4C visible $(( (${EPOCHREALTIME/./} - T_CUT) / 1000 )) ms after the rename"
sleep 0.3
n2=$(echoes); sleep 2; n3=$(echoes)
expect_ok "the open flow is cut: no echo after the rule's removal ($n2 -> $n3)" test "$n3" = "$n2"
expect_log "vm4's next segment reported as egress_denied (mode conntrack)" \
	"$(violation_re vm4 egress_denied 'dst=198\.51\.100\.2 proto=tcp sport=[0-9]+ dport=9000 mode=conntrack')" 3
expect_fail "a new connection vm4 -> srv:9000 fails too" nsx vm4 timeout 4 nc -z -w 2 "$SRV" 9000
kill "$CLIENT" 2>/dev/null; wait "$CLIENT" 2>/dev/null

# ---------------------------------------------------------------------------
section "6. vmfence check reports every error of a file with several"
BAD=$WORK/badconf
mkdir -p "$BAD/vms.d"
echo '{}' >"$BAD/host.json"
cat >"$BAD/vms.d/multi.json" <<'EOF'
{
  "name": "multi",
  "interface": "vmx",
  "mac": "02:00:00:00:00:zz",
  "addresses": ["10.0.0.300/32"],
  "mode": "turbo",
  "egress": [ { "to": "0.0.0.0/0", "proto": "sctp", "ports": ["99999"] } ],
  "colour": "blue"
}
EOF
out=$(vmf check --config "$BAD" 2>&1)
rc=$?
echo "$out" | sed 's/^/    | /'
expect_ok "vmfence check exits non-zero (rc=$rc)" test "$rc" != 0
nerr=$(echo "$out" | grep -E '^\S*vms\.d/multi\.json: [^ :]+: .+' | sort -u | wc -l)
expect_ok "at least 3 distinct FILE: path: message lines ($nerr)" test "$nerr" -ge 3
for p in mac 'addresses\[0\]' mode 'egress\[0\]\.proto' 'egress\[0\]\.ports\[0\]' colour; do
	expect_ok "error reported for ${p//\\/}" grep -Eq "^\S*vms\.d/multi\.json: $p: .+" <<<"$out"
done

# ---------------------------------------------------------------------------
section "after all that"
# ghost never got an interface; status lists it without counters.
rm -f "$CONF/vms.d/ghost.json"
expect_ok "the agent is still running" kill -0 "$DAEMON_PID"
expect_ok "vm1 -> srv tcp/8443 still passes" tcp_probe vm1 "$SRV" 8443
counters_match_log
e2e_finish
