#!/usr/bin/env bash
# End-to-end: the control plane never fails open.
#
#   hv:   routed TAPs (seed 003 style), gateway 10.70.0.254 on each
#   fc1:  vm1 10.70.0.1, valid spec (egress icmp anywhere)
#   fc2:  vm2 10.70.0.2, spec with an unknown field          -> no_policy
#   fc3:  vm3 10.70.0.3, spec written after start claiming 10.70.0.0/29
#         (overlaps the enforced vm1; its file is older by name order)
#         -> refused, vm1 untouched, fc3 no_policy
#   fc4:  vm4 10.70.0.4, invalid spec; its TAP appears after the start -> no_policy
#   vm5:  a spec dropped into vms.d just as the daemon starts -> enforced
#   500 TAPs with valid specs created at once after the start -> all enforced
# Needs root. NO_VMFENCE=1: the topology carries every blocked flow.
set -u
. "$(dirname "$0")/lib.sh"
e2e_init failclosed

GW=10.70.0.254
icmp_any='"egress": [ { "to": "0.0.0.0/0", "proto": "icmp" } ]'
spec() { # NAME TAP MAC ADDR [EXTRA]
	echo "{ \"name\": \"$1\", \"interface\": \"$2\", \"mac\": \"$3\", \"addresses\": [\"$4\"],
  \"gateway\": [\"$GW\"], $icmp_any ${5:-} }"
}

section topology
hv_add
for n in 1 2 3 5; do
	vm_add "vm$n" "fc$n" "02:00:00:00:70:0$n"
	route_vm "vm$n" "fc$n" "10.70.0.$n" "$GW"
done

section "start with one valid and one invalid file"
write_host '{}'
write_vm vm1 "$(spec vm1 fc1 02:00:00:00:70:01 10.70.0.1/32)"
write_vm vm2 "$(spec vm2 fc2 02:00:00:00:70:02 10.70.0.2/32 ', "colour": "red"')"
write_vm vm4 "$(spec vm4 fc4 02:00:00:00:70:04 10.70.0.4/32 ', "mode": "paranoid"')"
if enforced; then
	nsenter --net="/run/netns/$HV" -- env VMFENCE_PIN_DIR="$PIN" VMFENCE_RUN_DIR="$RUNDIR" \
		"$VMFENCE" run --config "$CONF" >>"$DLOG" 2>&1 &
	DAEMON_PID=$!
	# A file dropped just as the daemon starts (the watch is armed before the scan).
	sleep 0.05
	write_vm vm5 "$(spec vm5 fc5 02:00:00:00:70:05 10.70.0.5/32)"
	expect_ok "vm1 enforced although vm2's and vm4's files are invalid" vmf wait --vm vm1 --timeout 15
	expect_ok "vm5 (dropped in during the start) enforced" vmf wait --vm vm5 --timeout 10
	expect_ok "the daemon keeps running with invalid files" kill -0 "$DAEMON_PID"
	t0=${EPOCHREALTIME/./}
	expect_fail "wait --vm vm2 fails (invalid file)" vmf wait --vm vm2 --timeout 20
	el=$(( (${EPOCHREALTIME/./} - t0) / 1000 ))
	expect_ok "... at once (${el} ms, not the 20 s timeout)" test "$el" -lt 5000
	expect_ok "... with the file's error" grep -q "vms.d/vm2.json: colour: unknown field" <(vmf wait --vm vm2 --timeout 1 2>&1)
	expect_fail "vmfence check exits non-zero" vmf check --config "$CONF"
	expect_ok "vm2's file reported as FILE: json.path: message" grep -Eq "vm2\.json: colour: unknown field" "$DLOG"
fi
expect_ok "vm1 -> gateway (valid policy)" ping_probe vm1 "$GW"
expect_ok "vm5 -> gateway (valid policy)" ping_probe vm5 "$GW"
expect_blocked "vm2 -> gateway (invalid file: its TAP drops everything)" ping_probe vm2 "$GW"

if enforced; then
	st=$(vmf status --json)
	expect_ok "status: fc2 attached in no_policy" /usr/bin/python3 -c '
import json, sys
d = json.loads(sys.argv[1])
v = [x for x in d["vms"] if x["interface"] == "fc2"]
assert v and v[0]["attached"] and v[0]["no_policy"] and not v[0]["enforced"], v
r = [x for x in d["rejected"] if x["file"].endswith("vm2.json")]
assert r and r[0]["interface"] == "fc2" and not r[0]["kept_last_good"], r
' "$st"
fi

section "a newcomer conflicting with an enforced VM is refused"
write_vm a-vm3 "$(spec vm3 fc3 02:00:00:00:70:03 10.70.0.0/29)"
if enforced; then
	expect_fail "wait --vm vm3 fails (conflict)" vmf wait --vm vm3 --timeout 10
	expect_ok "... blamed on the newcomer" grep -Eq "a-vm3.json: addresses\[0\]: 10.70.0.0/29 overlaps 10.70.0.[15]/32 of vm[15] " \
		<(vmf wait --vm vm3 --timeout 1 2>&1)
	expect_ok "vm1 still enforced" vmf wait --vm vm1 --timeout 1
fi
expect_ok "vm1 -> gateway still works (keeps its policy and address)" ping_probe vm1 "$GW"
expect_blocked "vm3 -> gateway (refused newcomer: its TAP drops everything)" ping_probe vm3 "$GW"

section "an invalid file's TAP that appears later drops everything"
vm_add vm4 fc4 02:00:00:00:70:04
route_vm vm4 fc4 10.70.0.4 "$GW"
sleep 0.5
expect_blocked "vm4 -> gateway (TAP created after the start, file invalid)" ping_probe vm4 "$GW"
if enforced; then
	expect_ok "fc4 carries both programs" test "$(tap_progs hv fc4 | grep -c vmfence)" -ge 2
fi

section "an attach that fails is undone, reported and retried"
if enforced; then
	write_vm vm6 "$(spec vm6 fc6 02:00:00:00:70:06 10.70.0.6/32)"
	sleep 0.5
	# A TAP whose tcx egress hook is full (to_vm cannot go on), renamed into
	# vm6's interface name so the daemon sees it appear as fc6.
	ip -n "$HV" tuntap add dev fcx mode tap || fatal "tuntap fcx"
	ifx=$(ipn hv -o link show dev fcx | awk -F: '{print $1; exit}')
	# nsenter execs python: $! is the process that holds the links.
	nsenter --net="/run/netns/$HV" -- "$PY" "$(dirname "$0")/tools/fill_tcx_egress.py" "$ifx" >"$WORK/fill.log" 2>&1 &
	FILL_PID=$!
	E2E_BG_PIDS+=("$FILL_PID")  # killed at cleanup if the test stops early
	for _ in $(seq 100); do grep -q '^full' "$WORK/fill.log" && break; sleep 0.1; done
	expect_ok "fcx's egress hook is full ($(cat "$WORK/fill.log"))" grep -q '^full' "$WORK/fill.log"
	ipn hv link set fcx name fc6
	sleep 1
	expect_fail "wait --vm vm6 does not succeed while to_vm cannot attach" vmf wait --vm vm6 --timeout 2
	expect_ok "status: vm6 not enforced" /usr/bin/python3 -c '
import json, sys
d = json.loads(sys.argv[1])
v = [x for x in d["vms"] if x["name"] == "vm6"]
assert v and not v[0]["enforced"], v' "$(vmf status --json)"
	expect_ok "from_vm was taken back (no half-attached TAP)" test "$(tap_progs hv fc6 | grep -c vmfence)" = 0
	expect_ok "the failure is logged" grep -Eq "vm vm6: attach to ifindex [0-9]+: .*NOT enforced; retrying" "$DLOG"
	kill "$FILL_PID"; wait "$FILL_PID" 2>/dev/null
	expect_ok "once the hook has room, the retry enforces vm6" vmf wait --vm vm6 --timeout 20
	expect_ok "fc6 carries both programs" test "$(tap_progs hv fc6 | grep -c vmfence)" -ge 2
fi

section "500 TAPs created at once: every one enforced"
N=500
if enforced; then
	for i in $(seq 1 $N); do
		printf '{ "name": "b%d", "interface": "bt%d", "mac": "02:00:00:71:%02x:%02x", "addresses": ["10.71.%d.%d/32"] }\n' \
			"$i" "$i" $((i / 256)) $((i % 256)) $((i / 256)) $((i % 256)) >"$CONF/vms.d/b$i.json"
	done
	# Wait until the daemon has read the 500 files (each is "not present yet").
	for _ in $(seq 100); do
		[ "$(vmf status --json | /usr/bin/python3 -c 'import json,sys; print(sum(1 for v in json.load(sys.stdin)["vms"] if v["name"].startswith("b")))')" = "$N" ] && break
		sleep 0.2
	done
	: >"$WORK/taps.batch"
	for i in $(seq 1 $N); do echo "tuntap add dev bt$i mode tap" >>"$WORK/taps.batch"; done
	t0=${EPOCHREALTIME/./}
	ip -n "$HV" -batch "$WORK/taps.batch" || fatal "ip -batch tuntap"
	all_enforced() {
		vmf status --json | /usr/bin/python3 -c '
import json, sys
d = json.load(sys.stdin)
n = sum(1 for v in d["vms"] if v["name"].startswith("b") and v.get("enforced"))
print(n)
sys.exit(0 if n == int(sys.argv[1]) else 1)' "$N" >"$WORK/enforced.count"
	}
	for _ in $(seq 300); do all_enforced && break; sleep 0.2; done
	el=$(( (${EPOCHREALTIME/./} - t0) / 1000 ))
	expect_ok "all $N TAPs enforced ($(cat "$WORK/enforced.count") after ${el} ms)" all_enforced
	expect_ok "vmfence wait for the last one" vmf wait --vm "b$N" --timeout 5
fi

section "a quarantine whose event was lost still terminates the VM"
if enforced; then
	# host.json says how to terminate; vm1 asks for it. Then the kernel's
	# quarantine flag is set as the datapath does when the ring buffer is
	# full (no event reaches the daemon): the daemon must still act.
	printf '#!/bin/sh\necho "$1 $VMFENCE_REASON" >>"%s/terminated.log"\n' "$WORK" >"$WORK/term.sh"
	chmod +x "$WORK/term.sh"
	write_host "{ \"on_violation\": { \"action\": \"alert\", \"command\": [\"$WORK/term.sh\", \"{vm}\"] } }"
	write_vm vm1 "$(spec vm1 fc1 02:00:00:00:70:01 10.70.0.1/32 ', "on_violation": { "action": "terminate" }')"
	sleep 1
	slot=$(/usr/bin/python3 -c '
import json, sys
print([v["slot"] for v in json.load(open(sys.argv[1]))["vms"] if v["name"] == "vm1"][0])' "$RUNDIR/vms.json")
	key=$(printf '%02x %02x 00 00' $((slot & 255)) $((slot >> 8 & 255)))
	val="00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 01 00 00 00 00 00 00 00"
	# shellcheck disable=SC2086
	nsx hv bpftool map update pinned "$PIN/vmfence_state_v1" key hex $key value hex $val
	for _ in $(seq 50); do [ -s "$WORK/terminated.log" ] && break; sleep 0.1; done
	expect_ok "the host's command ran for vm1 ($(cat "$WORK/terminated.log" 2>/dev/null))" \
		grep -q "^vm1 quarantined" "$WORK/terminated.log"
	expect_blocked "vm1 -> gateway (quarantined)" ping_probe vm1 "$GW"
	sleep 2
	expect_ok "... once per incident" test "$(grep -c . "$WORK/terminated.log")" = 1
else
	expect_blocked "vm1 -> gateway (quarantined)" ping_probe vm1 "$GW"
fi

section "after a restart, a VM whose file broke meanwhile keeps its claims"
if enforced; then
	stop_daemon TERM
	# While the agent is down: vm5's file breaks, and a newcomer claims vm5's address.
	write_vm vm5 '{ "name": "vm5", "interface": "fc5", '
	write_vm vm7 "$(spec vm7 fc7 02:00:00:00:70:07 10.70.0.5/32)"
	nsenter --net="/run/netns/$HV" -- env VMFENCE_PIN_DIR="$PIN" VMFENCE_RUN_DIR="$RUNDIR" \
		"$VMFENCE" run --config "$CONF" >>"$DLOG" 2>&1 &
	DAEMON_PID=$!
	expect_ok "the agent is back (vm6 enforced)" vmf wait --vm vm6 --timeout 20
	expect_fail "wait --vm vm7 fails: vm5's address stays vm5's" vmf wait --vm vm7 --timeout 10
	expect_ok "... with the reason" grep -q "vm7.json: addresses\[0\]: 10.70.0.5/32 overlaps 10.70.0.5/32 of vm5" \
		<(vmf wait --vm vm7 --timeout 1 2>&1)
fi
expect_blocked "vm5 -> gateway (its file broke while the agent was down: no_policy)" ping_probe vm5 "$GW"

expect_ok "the daemon is still running" test "$ENFORCE" != 1 -o -n "$(kill -0 "${DAEMON_PID:-0}" 2>/dev/null && echo y)"
e2e_finish
