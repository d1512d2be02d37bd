# shellcheck shell=bash
# tests/e2e/noise_lib.sh - helpers for the tests of traffic that is dropped but
# is not a violation (flood_test, guest_noise_test, guest_boot_test), on top
# of lib.sh (source lib.sh first).
#
#   st_get VM PATH          a number from `vmfence status --json` (PATH:
#                           drops.REASON, counters.X, quarantined); "NA" when
#                           the VM or the field is absent (older builds)
#   num X                   X when it is a number, else -1
#   drops_json VM           the VM's "drops" object from status, as JSON
#   violation_drops VM      sum of the VM's drop counters of reasons that are
#                           violations when the VM sends them (all but
#                           NON_VIOLATION and the to-VM-only ones)
#   marker_cmd              writes $WORK/mark.sh, a terminate `command` that
#                           leaves $WORK/terminated-VM (argv + VMFENCE_*)
#   marker VM               that marker's path
#   violations_match_log    every violation counter = its log lines (like
#                           counters_match_log), and no log line at all for a
#                           NON_VIOLATION reason
#   expect_no_from_vm_violation DESC VM
#                           no "violation vm=VM ... dir=from_vm" log line since
#                           the mark, no marker, not quarantined

# Drop reasons that are counted but never held against the VM (README, "What
# happens to a packet"): no event, no log line, never toward the threshold.
NON_VIOLATION="flow_limit link_local unassigned_src stale_reply fragment rate_limited"
# Reasons only the to-VM hook gives (never counted against the VM).
TO_VM_ONLY="ingress_denied not_for_vm unknown_ifindex"

st_get() {
	vmf status --json 2>/dev/null | "$PY" -c '
import json, sys
try:
    st = json.load(sys.stdin)
except ValueError:
    print("NA"); sys.exit(0)
for vm in st.get("vms", []):
    if vm.get("name") == sys.argv[1]:
        v = vm
        try:
            for k in sys.argv[2].split("."):
                v = v[k]
        except (KeyError, TypeError):
            print("NA"); sys.exit(0)
        print(int(v))
        sys.exit(0)
print("NA")
' "$1" "$2"
}

num() { case $1 in '' | *[!0-9]*) echo -1 ;; *) echo "$1" ;; esac; }

drops_json() {
	vmf status --json 2>/dev/null | "$PY" -c '
import json, sys
st = json.load(sys.stdin)
for vm in st.get("vms", []):
    if vm.get("name") == sys.argv[1]:
        print(json.dumps(vm.get("drops", {}), sort_keys=True)); sys.exit(0)
print("{}")
' "$1"
}

violation_drops() {
	vmf status --json 2>/dev/null | "$PY" -c '
import json, sys
skip = set(sys.argv[2].split()) | set(sys.argv[3].split())
st = json.load(sys.stdin)
for vm in st.get("vms", []):
    if vm.get("name") == sys.argv[1]:
        print(sum(n for r, n in vm.get("drops", {}).items() if r not in skip)); sys.exit(0)
print("NA")
' "$1" "$NON_VIOLATION" "$TO_VM_ONLY"
}

marker_cmd() {
	cat >"$WORK/mark.sh" <<EOF
#!/bin/sh
# terminate command: leave a marker (argv and the VMFENCE_* environment)
{ echo "argv=\$*"; env | grep '^VMFENCE_' | sort; } >>"$WORK/terminated-\$1"
EOF
	chmod +x "$WORK/mark.sh"
}
marker() { echo "$WORK/terminated-$1"; }

violations_match_log() {
	if ! enforced; then _skip "violation counters match the log (no daemon)"; return 0; fi
	sleep 1
	local out
	if ! out=$(vmf status --json 2>&1 | "$PY" -c '
import json, re, sys, collections
st = json.load(sys.stdin)
quiet = set(sys.argv[2].split())
logged = collections.Counter()
for line in open(sys.argv[1], errors="replace"):
    m = re.search(r"violation vm=(\S+) reason=(\S+)", line)
    if m:
        logged[(m.group(1), m.group(2))] += 1
bad = []
for vm in st["vms"]:
    if "counters" not in vm:
        continue
    c = vm["counters"]
    slack = c.get("events_suppressed", 0) + c.get("events_lost", 0)
    for reason, n in vm["drops"].items():
        l = logged[(vm["name"], reason)]
        if reason in quiet:
            if l:
                bad.append("%s %s: %d log lines for a reason that is not a violation" % (vm["name"], reason, l))
            continue
        if n < l or (slack == 0 and n != l):
            bad.append("%s %s: counter %d, logged %d (suppressed+lost %d)" % (vm["name"], reason, n, l, slack))
print("\n".join(bad))
sys.exit(1 if bad else 0)
' "$DLOG" "$NON_VIOLATION" 2>&1); then
		_fail "violation counters match the log"
		echo "$out" | sed 's/^/    | /'
	else
		_pass "violation counters match the log (non-violation reasons: no log line)"
	fi
}

expect_no_from_vm_violation() {
	local d=$1 vm=$2
	if ! enforced; then _skip "$d (no daemon)"; return 0; fi
	expect_no_log "$d: no from_vm violation logged" "violation vm=$vm reason=[a-z_]+ dir=from_vm"
	expect_ok "$d: the terminate command did not run" test ! -e "$(marker "$vm")"
	expect_ok "$d: not quarantined" test "$(st_get "$vm" quarantined)" = 0
}
