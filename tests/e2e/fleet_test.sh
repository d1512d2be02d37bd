#!/usr/bin/env bash
# End-to-end: the fleet (DESIGN.md "fleet" in host.json): two hypervisors share
# their VMs through etcd; groups hold across hosts, remote addresses are only
# believed from the underlay, conflicts are refused, etcd loss is fail static,
# leases outlive SIGTERM, `vmfence down` withdraws a host at once.
#
# Topology (all in namespaces "$PFX-*", see fleet_lib.sh):
#   etcd      /usr/bin/etcd; 192.0.2.1/30 <-> hv1 etcd0 192.0.2.2/30,
#             192.0.2.5/30 <-> hv2 etcd0 192.0.2.6/30
#   hv1, hv2  forwarding on; underlay ul0 172.31.0.1/30 <-> 172.31.0.2/30;
#             hv1: 10.2.0.0/16 via 172.31.0.2, hv2: 10.1.0.0/16 via 172.31.0.1
#   VMs routed as in seed 003 (veth host end = TAP, /32, proxy ARP):
#     hv1: a1 10.1.0.2 tenant-a  (gw 10.1.0.1)  TCP 22, UDP echo 5000
#     hv2: a2 10.2.0.2 tenant-a  (gw 10.2.0.1)  TCP 22
#          b2 10.2.0.3 tenant-b, egress AND ingress 0.0.0.0/0 any   TCP 22, UDP 5000
#          a4 10.2.0.5 tenant-a (removed while etcd is down), a3 10.2.0.4 tenant-a
#          (added while etcd is down), x2 (10.1.0.2: a conflict with a1)
#     hv1 wan0 198.51.100.1/24 -> netns "wan" 198.51.100.2 (UDP echo 51900)
#   a1: egress udp 51900 to the WAN host only; ingress udp 5000 from 0.0.0.0/0
#   (so only the fleet's checks can stop b2's address or a spoofed a2 there).
#   a2, a3, a4: no rules at all: same-group remote traffic needs none.
#   host.json: fleet {etcd, host, interfaces ["ul0"], lease_s $FLEET_LEASE};
#   hv1 sets prefix "/vmfence/", hv2 leaves the default (the same).
# Scenarios:
#   1 both up: a1<->a2 TCP; b2->a1, b2->a2, a1->b2, a2->b2 blocked as
#     cross_group on the right host and direction; frames from the underlay
#     claiming b2 (to a1) or a1 (to b2, whose ingress is 0.0.0.0/0 any) are
#     cross_group (to_vm); status/JSON/metrics/etcd records show the fleet
#   2 conflict: x2 (10.1.0.2/32) on hv2 refused (no_policy), error names hv1/a1
#     (wait, log, status, check); a1 removed -> x2 enforced; then restored
#   3 spoofing: a1 sends as a2 -> spoofed_ip (from_vm); the WAN sends as a2 to
#     a1 -> spoofed_ip (to_vm)
#   4 etcd killed: traffic and isolation continue; a3 added / a4 removed on hv2
#     meanwhile; hv1's agent restarted meanwhile keeps enforcing its last view
#     (pinned remote entries, saved view); after etcd's restart hv1 learns both;
#     etcd_connected follows
#   5 SIGTERM on hv2's agent: its records live until the lease ends, then go;
#     hv2's pinned datapath still drops b2->a1
#   6 `vmfence down` on hv2 deletes its records at once
#   7 the control run (NO_VMFENCE=1, lib.sh) carries every blocked flow
# Needs root, /usr/bin/etcd (etcd-server), curl. NO_VMFENCE=1: topology + etcd
# start/kill/restart only. FLEET_LEASE (default 8, min 5): lease_s of both hosts.
set -u
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/fleet_lib.sh"
e2e_init fleet
fleet_init

LEASE=${FLEET_LEASE:-8}
WANIP=198.51.100.2

section topology
fleet_topology
hv_do hv1 wan_add wan wan0 198.51.100.1/24 "$WANIP/24"
fleet_vm hv1 a1 tap-a1 02:00:00:01:00:02 10.1.0.2 10.1.0.1
fleet_vm hv2 a2 tap-a2 02:00:00:02:00:02 10.2.0.2 10.2.0.1
fleet_vm hv2 b2 tap-b2 02:00:00:02:00:03 10.2.0.3 10.2.0.1
fleet_vm hv2 a4 tap-a4 02:00:00:02:00:05 10.2.0.5 10.2.0.1
for x in hv1:a1 hv2:a2 hv2:b2 hv2:a4; do hv_do "${x%:*}" serve_tcp "${x#*:}" 22; done
hv_do hv1 serve_udp a1 5000
hv_do hv2 serve_udp b2 5000
hv_do hv1 serve_udp wan 51900
for x in hv1:a1 hv2:a2 hv2:b2 hv2:a4; do hv_do "${x%:*}" wait_listen "${x#*:}" 22; done
hv_do hv1 wait_listen a1 5000 udp
hv_do hv2 wait_listen b2 5000 udp
hv_do hv1 wait_listen wan 51900 udp

section "etcd: reachable from both hosts, data survives SIGKILL + restart"
etcd_start
expect_ok "a key written through hv1's path" etcd_put hv1 /e2e/probe "$PFX"
expect_ok "... is read back through hv2's path" test "$(etcd_range hv2 /e2e/probe | cut -f3)" = "$PFX"
etcd_kill
expect_fail "etcd does not answer once killed" etcd_healthy hv1
etcd_start
expect_ok "the key survived the restart (same data dir)" test "$(etcd_range hv1 /e2e/probe | cut -f3)" = "$PFX"

# ------------------------------------------------------------------ config ---
host_json() { # HOST ETCD_URL EXTRA_FLEET_FIELDS
	printf '{
  "on_violation": { "action": "alert" },
  "metrics": { "listen": "127.0.0.1:9727" },
  "fleet": { "etcd": ["%s"], "host": "%s"%s, "interfaces": ["ul0"], "lease_s": %s }
}\n' "$2" "$1" "$3" "$LEASE"
}
vm_json() { # NAME TAP MAC ADDR GW GROUP [EGRESS [INGRESS]]
	printf '{ "name": "%s", "interface": "%s", "mac": "%s", "addresses": ["%s"], "gateway": ["%s"],
  "group": "%s", "egress": [%s], "ingress": [%s] }\n' "$1" "$2" "$3" "$4" "$5" "$6" "${7:-}" "${8:-}"
}
A1_JSON=$(vm_json a1 tap-a1 02:00:00:01:00:02 10.1.0.2/32 10.1.0.1 tenant-a \
	"{ \"to\": \"$WANIP/32\", \"proto\": \"udp\", \"ports\": [\"51900\"] }" \
	'{ "from": "0.0.0.0/0", "proto": "udp", "ports": ["5000"] }')
ANY_OUT='{ "to": "0.0.0.0/0", "proto": "any" }'
ANY_IN='{ "from": "0.0.0.0/0", "proto": "any" }'

section config
hv_do hv1 write_host "$(host_json hv1 "${ETCD_URL[hv1]}" ', "prefix": "/vmfence/"')"
hv_do hv2 write_host "$(host_json hv2 "${ETCD_URL[hv2]}" '')"
hv_do hv1 write_vm a1 "$A1_JSON"
hv_do hv2 write_vm a2 "$(vm_json a2 tap-a2 02:00:00:02:00:02 10.2.0.2/32 10.2.0.1 tenant-a)"
hv_do hv2 write_vm b2 "$(vm_json b2 tap-b2 02:00:00:02:00:03 10.2.0.3/32 10.2.0.1 tenant-b "$ANY_OUT" "$ANY_IN")"
hv_do hv2 write_vm a4 "$(vm_json a4 tap-a4 02:00:00:02:00:05 10.2.0.5/32 10.2.0.1 tenant-a)"
if enforced; then
	for h in hv1 hv2; do
		if ! out=$(vmfh "$h" check --config "$(fleet_conf "$h")" 2>&1); then
			echo "$out" | sed 's/^/    | /'
			fatal "vmfence check rejects $h's config (no \"fleet\" support in this build?)"
		fi
		_pass "vmfence check accepts $h's fleet config (etcd reachable)"
	done
fi
fleet_start hv1
fleet_start hv2
if enforced; then
	wait_until 15 has_remote hv1 a2@hv2 b2@hv2 a4@hv2
	expect_ok "hv1 learns hv2's VMs (a2, b2, a4) within 15 s of hv2 going live (${WAITED_MS} ms)" has_remote hv1 a2@hv2 b2@hv2 a4@hv2
	expect_ok "hv2 learns hv1's a1" wait_until 10 has_remote hv2 a1@hv1
fi

# ------------------------------------------------------------- helpers -------

# craft_udp FROM_NS FROM_IF NEXT_NS NEXT_IF SRC DST DPORT SINK: one
# Ether/IP/UDP frame (sport 40000, fresh token) from FROM_IF in FROM_NS to the
# MAC of NEXT_IF in NEXT_NS; true when SINK's UDP server on DPORT logged it.
craft_udp() {
	local tok="fl$RANDOM$RANDOM" smac dmac
	smac=$(mac_of "$1" "$2") && dmac=$(mac_of "$3" "$4") || return 2
	scapy "$1" "sendp(Ether(src='$smac', dst='$dmac')/IP(src='$5', dst='$6')/UDP(sport=40000, dport=$7)/Raw(b'$tok'), iface='$2')" &&
		udp_log_has "$8" "$7" "$tok" 2
}
# underlay_udp FROM_HOST SRC DST SINK: a frame to DST:5000 claiming SRC, sent
# by FROM_HOST on the underlay (so it arrives on the other host's ul0).
underlay_udp() {
	local to=hv2
	[ "$1" = hv2 ] && to=hv1
	craft_udp "$1-hv" ul0 "$to-hv" ul0 "$2" "$3" 5000 "$4"
}
# line_with TEXT WORD...: some line of TEXT has every WORD (as a word, any order).
line_with() {
	local text=$1; shift
	echo "$text" | "$PY" -c '
import re, sys
words = sys.argv[1:]
sys.exit(0 if any(all(re.search(r"(^|[^\w.-])" + re.escape(w) + r"($|[^\w.-])", l) for w in words)
                  for l in sys.stdin) else 1)' "$@"
}
# at_least N VALUE: VALUE is a number >= N.
at_least() { [[ $2 =~ ^[0-9]+$ ]] && [ "$2" -ge "$1" ]; }

# ------------------------------------------------------------------ 1 --------
section "1. both agents up: same group across hosts, cross_group otherwise"
fleet_mark_logs
expect_ok "a1 -> a2 tcp/22 across hosts (same group, a1 has no egress rule for it)" tcp_probe hv1-a1 10.2.0.2 22
expect_ok "a2 -> a1 tcp/22 across hosts (a2 has no rule at all)" tcp_probe hv2-a2 10.1.0.2 22
expect_ok "a4 -> a1 tcp/22 across hosts" tcp_probe hv2-a4 10.1.0.2 22
hv_do hv1 expect_no_log "no violation for a1's same-group traffic on hv1" 'violation vm=a1 reason=' "$HOST_MCAST"
hv_do hv2 expect_no_log "no violation for a2's/a4's same-group traffic on hv2" 'violation vm=a[24] reason=' "$HOST_MCAST"

expect_blocked "b2 -> a1 tcp/22 (remote, other tenant; b2's egress is 0.0.0.0/0 any)" tcp_probe hv2-b2 10.1.0.2 22
hv_do hv2 expect_log "hv2 reports b2 -> a1 as cross_group (from_vm)" \
	"$(violation_re b2 cross_group 'dir=from_vm src=10\.2\.0\.3 dst=10\.1\.0\.2 proto=tcp')"
expect_blocked "b2 -> a2 tcp/22 (local, other tenant)" tcp_probe hv2-b2 10.2.0.2 22
hv_do hv2 expect_log "hv2 reports b2 -> a2 as cross_group (from_vm)" \
	"$(violation_re b2 cross_group 'dir=from_vm src=10\.2\.0\.3 dst=10\.2\.0\.2 ')"
expect_blocked "a1 -> b2 tcp/22 (remote, other tenant; b2's ingress is 0.0.0.0/0 any)" tcp_probe hv1-a1 10.2.0.3 22
hv_do hv1 expect_log "hv1 reports a1 -> b2 as cross_group (from_vm), not egress_denied" \
	"$(violation_re a1 cross_group 'dir=from_vm src=10\.1\.0\.2 dst=10\.2\.0\.3 proto=tcp')"
expect_blocked "a2 -> b2 tcp/22 (local, other tenant)" tcp_probe hv2-a2 10.2.0.3 22
hv_do hv2 expect_log "hv2 reports a2 -> b2 as cross_group (from_vm)" \
	"$(violation_re a2 cross_group 'dir=from_vm src=10\.2\.0\.2 dst=10\.2\.0\.3 ')"

# The receiving host's own check (the sender's host is bypassed: frames put on
# the underlay directly). a1 admits udp/5000 from 0.0.0.0/0 and b2 admits
# anything from anywhere: only the group stops these.
expect_ok "control: a frame on the underlay from a2's address reaches a1 udp/5000 (same group)" \
	underlay_udp hv2 10.2.0.2 10.1.0.2 a1
expect_blocked "a frame on the underlay from b2's address to a1 udp/5000 (a1's ingress allows 0.0.0.0/0)" \
	underlay_udp hv2 10.2.0.3 10.1.0.2 a1
hv_do hv1 expect_log "hv1 reports it as cross_group to a1 (to_vm)" \
	"$(violation_re a1 cross_group 'dir=to_vm src=10\.2\.0\.3 dst=10\.1\.0\.2 proto=udp sport=40000 dport=5000')"
expect_blocked "a frame on the underlay from a1's address to b2 udp/5000 (b2's ingress allows 0.0.0.0/0 any)" \
	underlay_udp hv1 10.1.0.2 10.2.0.3 b2
hv_do hv2 expect_log "hv2 reports it as cross_group to b2 (to_vm)" \
	"$(violation_re b2 cross_group 'dir=to_vm src=10\.1\.0\.2 dst=10\.2\.0\.3 proto=udp sport=40000 dport=5000')"

if enforced; then
	expect_ok "hv2 counts cross_group drops for b2" at_least 1 "$(hv_do hv2 drop_count b2 cross_group)"
	expect_ok "hv2 counts cross_group drops for a2" at_least 1 "$(hv_do hv2 drop_count a2 cross_group)"
	expect_ok "hv1 counts cross_group drops for a1 (from_vm and to_vm)" at_least 2 "$(hv_do hv1 drop_count a1 cross_group)"
	hv_do hv1 expect_no_log "no egress_denied for a1 -> b2 (the group decides, not a1's rules)" \
		'violation vm=a1 reason=egress_denied .*dst=10\.2\.0\.3 '

	section "1b. status, metrics and etcd records"
	expect_ok "hv1 status --json: fleet.host hv1, connected, remote a2/b2/a4 with host, group, addresses; not a1" fleet_py hv1 '
rv = {v["name"]: v for v in fl["remote_vms"]}
assert fl["host"] == "hv1", fl
assert fl["etcd_connected"] is True, fl
age = fl["sync_age_seconds"]
assert isinstance(age, (int, float)) and 0 <= age <= '"$((LEASE + 5))"', fl
assert sorted(rv) == ["a2", "a4", "b2"], sorted(rv)
for n, g, a in (("a2", "tenant-a", "10.2.0.2"), ("b2", "tenant-b", "10.2.0.3"), ("a4", "tenant-a", "10.2.0.5")):
    assert rv[n]["host"] == "hv2" and rv[n]["group"] == g, rv[n]
    assert [x.split("/")[0] for x in rv[n]["addresses"]] == [a], rv[n]'
	expect_ok "hv2 status --json: fleet.host hv2, connected, remote a1 (hv1, tenant-a, 10.1.0.2) only" fleet_py hv2 '
rv = {v["name"]: v for v in fl["remote_vms"]}
assert fl["host"] == "hv2" and fl["etcd_connected"] is True, fl
assert sorted(rv) == ["a1"], sorted(rv)
assert rv["a1"]["host"] == "hv1" and rv["a1"]["group"] == "tenant-a", rv
assert [x.split("/")[0] for x in rv["a1"]["addresses"]] == ["10.1.0.2"], rv'
	st1=$(vmfh hv1 status 2>&1)
	st2=$(vmfh hv2 status 2>&1)
	expect_ok "hv1 status (text) lists a2 with hv2 and tenant-a" line_with "$st1" a2 hv2 tenant-a
	expect_ok "hv1 status (text) lists b2 with hv2 and tenant-b" line_with "$st1" b2 hv2 tenant-b
	expect_ok "hv2 status (text) lists a1 with hv1 and tenant-a" line_with "$st2" a1 hv1 tenant-a
	expect_ok "hv1 metrics: vmfence_fleet_remote_vms 3" metric_is hv1 vmfence_fleet_remote_vms 3
	expect_ok "hv2 metrics: vmfence_fleet_remote_vms 1" metric_is hv2 vmfence_fleet_remote_vms 1
	expect_ok "hv1 metrics: vmfence_fleet_sync_age_seconds present" test -n "$(fleet_metric hv1 vmfence_fleet_sync_age_seconds)"
	expect_ok "hv2 metrics: vmfence_fleet_sync_age_seconds present" test -n "$(fleet_metric hv2 vmfence_fleet_sync_age_seconds)"
	etcd_range hv1 /vmfence/vms/ >"$WORK/etcd-vms-1.txt"
	expect_ok "etcd holds exactly /vmfence/vms/{hv1/a1,hv2/a2,hv2/a4,hv2/b2}" test \
		"$(cut -f1 "$WORK/etcd-vms-1.txt" | sort | tr '\n' ' ')" = "/vmfence/vms/hv1/a1 /vmfence/vms/hv2/a2 /vmfence/vms/hv2/a4 /vmfence/vms/hv2/b2 "
	expect_ok "each record is {name, host, group, addresses} and attached to a lease" "$PY" -c '
import json, sys
for line in open(sys.argv[1]):
    key, lease, value = line.rstrip("\n").split("\t", 2)
    host, name = key.split("/")[-2:]
    v = json.loads(value)
    assert v["name"] == name and v["host"] == host, (key, v)
    assert v["group"] == ("tenant-b" if name == "b2" else "tenant-a"), (key, v)
    assert isinstance(v["addresses"], list) and v["addresses"], (key, v)
    assert int(lease) != 0, ("no lease", key)
' "$WORK/etcd-vms-1.txt"
fi

# ------------------------------------------------------------------ 2 --------
section "2. conflict: x2 on hv2 claims a1's address 10.1.0.2/32"
if enforced; then
	hv_do hv2 vm_add x2 tap-x2 02:00:00:02:00:09
	hv_do hv2 mark_log
	hv_do hv2 write_vm x2 "$(vm_json x2 tap-x2 02:00:00:02:00:09 10.1.0.2/32 10.2.0.1 tenant-x)"
	# names_hv1_a1 TEXT: a "x2.json: addresses[0]: ..." line naming hv1 and a1.
	names_hv1_a1() { grep -E 'x2\.json: addresses\[0\]: ' <<<"$1" | grep -w hv1 | grep -qw a1; }
	x2_refused() { fleet_py hv2 'assert any(r["name"] == "x2" for r in st.get("rejected", []))'; }
	expect_ok "hv2 refuses x2" wait_until 10 x2_refused
	t0=${EPOCHREALTIME/./}
	out=$(vmfh hv2 wait --vm x2 --timeout 2 2>&1); rc=$?
	expect_ok "vmfence wait --vm x2 --timeout 2 fails (rc=$rc)" test "$rc" != 0
	expect_ok "... with the error naming hv1 and a1" names_hv1_a1 "$out"
	expect_ok "hv2's log: FILE: addresses[0]: ... naming hv1 and a1" names_hv1_a1 "$(tail -n "+$((FLEET_MARK[hv2] + 1))" "$(fleet_log hv2)")"
	st2=$(vmfh hv2 status 2>&1)
	expect_ok "hv2 status lists x2's file among the refused files" \
		grep -q 'x2\.json' <<<"$(sed -n '/^refused files:/,$p' <<<"$st2")"
	expect_ok "x2's TAP attached in no_policy" fleet_py hv2 '
v = [x for x in st["vms"] if x["interface"] == "tap-x2"]
assert v and v[0]["attached"] and v[0]["no_policy"] and not v[0]["enforced"], v'
	out=$(vmfh hv2 check --config "$(fleet_conf hv2)" 2>&1); rc=$?
	expect_ok "vmfence check on hv2 fails (rc=$rc; etcd reachable)" test "$rc" != 0
	expect_ok "... printing x2.json: addresses[0]: ... naming hv1 and a1" names_hv1_a1 "$out"
	expect_ok "a1 on hv1 stays enforced (the earlier claim is not blamed)" vmfq hv1 wait --vm a1 --timeout 2
	expect_ok "a1 -> a2 still works" tcp_probe hv1-a1 10.2.0.2 22
	expect_ok "hv2 still lists a1 as hv1's (the refusal changes nothing for the earlier claim)" \
		has_remote hv2 a1@hv1

	rm -f -- "$(fleet_conf hv1)/vms.d/a1.json"
	expect_ok "a1's claim withdrawn: /vmfence/vms/hv1/a1 gone from etcd" \
		wait_until 5 etcd_none hv1 /vmfence/vms/hv1/a1
	expect_ok "x2 retried and enforced on hv2 once a1's claim is gone" vmfq hv2 wait --vm x2 --timeout 15

	# Restore: x2 goes, a1 comes back.
	rm -f -- "$(fleet_conf hv2)/vms.d/x2.json"
	expect_ok "x2 withdrawn (not in etcd, not on hv1)" wait_until 10 eval \
		'etcd_none hv1 /vmfence/vms/hv2/x2 && lacks_remote hv1 x2@hv2'
	hv_do hv1 write_vm a1 "$A1_JSON"
	expect_ok "a1 enforced again on hv1" vmfq hv1 wait --vm a1 --timeout 15
	expect_ok "hv2 learns a1 again" wait_until 10 has_remote hv2 a1@hv1
	expect_ok "a1 -> a2 works again" tcp_probe hv1-a1 10.2.0.2 22
	fleet_vm_del hv2 x2
else
	say "NO_VMFENCE: the conflict is the daemons' business; nothing to run"
fi

# ------------------------------------------------------------------ 3 --------
section "3. spoofing a remote VM's address"
fleet_mark_logs
expect_ok "control: a1 -> WAN udp/51900 from its own address arrives" \
	craft_udp hv1-a1 eth0 hv1-hv tap-a1 10.1.0.2 "$WANIP" 51900 wan
expect_blocked "a1 sends as a2 (10.2.0.2) to the WAN" \
	craft_udp hv1-a1 eth0 hv1-hv tap-a1 10.2.0.2 "$WANIP" 51900 wan
hv_do hv1 expect_log "hv1 reports spoofed_ip for a1 (from_vm, src 10.2.0.2)" \
	"$(violation_re a1 spoofed_ip 'dir=from_vm src=10\.2\.0\.2 ')"
expect_ok "control: WAN -> a1 udp/5000 from its own address arrives (a1's ingress rule)" \
	craft_udp hv1-wan eth0 hv1-hv wan0 "$WANIP" 10.1.0.2 5000 a1
expect_blocked "the WAN sends as a2 (10.2.0.2) to a1 udp/5000" \
	craft_udp hv1-wan eth0 hv1-hv wan0 10.2.0.2 10.1.0.2 5000 a1
hv_do hv1 expect_log "hv1 reports spoofed_ip toward a1 (to_vm, src 10.2.0.2)" \
	"$(violation_re a1 spoofed_ip 'dir=to_vm src=10\.2\.0\.2 dst=10\.1\.0\.2 ')"
hv_do hv1 counters_match_log
hv_do hv2 counters_match_log

# ------------------------------------------------------------------ 4 --------
section "4. etcd killed: fail static"
etcd_kill
if enforced; then
	for h in hv1 hv2; do
		expect_ok "$h: fleet.etcd_connected false" wait_until $((LEASE + 5)) eval "[ \"\$(etcd_connected $h)\" = false ]"
	done
fi
expect_ok "a1 -> a2 tcp/22 still works" tcp_probe hv1-a1 10.2.0.2 22
expect_ok "a2 -> a1 tcp/22 still works" tcp_probe hv2-a2 10.1.0.2 22
hv_do hv2 mark_log
expect_blocked "b2 -> a1 tcp/22 still blocked" tcp_probe hv2-b2 10.1.0.2 22
hv_do hv2 expect_log "... as cross_group" "$(violation_re b2 cross_group 'dir=from_vm src=10\.2\.0\.3 dst=10\.1\.0\.2 ')"
# a3 appears, a4 goes, while etcd is down.
fleet_vm hv2 a3 tap-a3 02:00:00:02:00:04 10.2.0.4 10.2.0.1
hv_do hv2 serve_tcp a3 22
hv_do hv2 wait_listen a3 22
hv_do hv2 write_vm a3 "$(vm_json a3 tap-a3 02:00:00:02:00:04 10.2.0.4/32 10.2.0.1 tenant-a)"
rm -f -- "$(fleet_conf hv2)/vms.d/a4.json"
fleet_vm_del hv2 a4
if enforced; then
	expect_ok "a3 enforced on hv2 while etcd is down" vmfq hv2 wait --vm a3 --timeout 10
	expect_ok "hv1 keeps its last view meanwhile (a4 listed, a3 not)" \
		eval 'has_remote hv1 a4@hv2 && lacks_remote hv1 a3@hv2'
	sleep 2
	expect_ok "hv1's sync age grows while etcd is down (>= 2 s)" fleet_py hv1 'assert fl["sync_age_seconds"] >= 2, fl'
	# check with etcd unreachable: the local files alone, and a note on stderr.
	vmfh hv2 check --config "$(fleet_conf hv2)" >"$WORK/check-down.out" 2>"$WORK/check-down.err"
	rc=$?
	expect_ok "vmfence check on hv2 with etcd down exits 0 (local files fine; rc=$rc)" test "$rc" = 0
	expect_ok "... and says on stderr that the cluster could not be asked" grep -Eiq 'etcd|cluster' "$WORK/check-down.err"
	cp -r "$(fleet_conf hv2)" "$WORK/hv2-bad"
	printf '{ "name": "bad", "interface": "tap-bad", "mac": "02:00:00:02:00:0b", "addresses": ["10.2.0.11/32"], "colour": "red" }\n' \
		>"$WORK/hv2-bad/vms.d/bad.json"
	out=$(vmfh hv2 check --config "$WORK/hv2-bad" 2>&1); rc=$?
	expect_ok "... but still fails on a bad local file (rc=$rc)" test "$rc" != 0
	expect_ok "... printed as FILE: json.path: message" grep -q 'bad\.json: colour: ' <<<"$out"
fi
expect_ok "a3 -> a2 tcp/22 (local, same group)" tcp_probe hv2-a3 10.2.0.2 22
expect_blocked "b2 -> a3 tcp/22 (local, other tenant)" tcp_probe hv2-b2 10.2.0.4 22
# A restart while etcd is down keeps what the previous run knew: the remote
# entries it pinned (until the first full sync) and its saved view.
if enforced; then
	fleet_stop hv1
	fleet_start hv1
	expect_ok "hv1 restarted with etcd down: still lists b2@hv2 (its saved view)" has_remote hv1 b2@hv2
	hv_do hv1 mark_log
fi
expect_blocked "hv1 restarted with etcd down: a1 -> b2 tcp/22 still blocked" tcp_probe hv1-a1 10.2.0.3 22
if enforced; then
	hv_do hv1 expect_log "... as cross_group on hv1 (the pinned remote entry)" \
		"$(violation_re a1 cross_group 'dir=from_vm src=10\.1\.0\.2 dst=10\.2\.0\.3 ')"
fi
expect_ok "hv1 restarted with etcd down: a1 -> a2 tcp/22 still works" tcp_probe hv1-a1 10.2.0.2 22
etcd_start
if enforced; then
	wait_until 15 eval 'has_remote hv1 a3@hv2 && lacks_remote hv1 a4@hv2'
	expect_ok "within 15 s of etcd's restart hv1 lists a3 and no longer a4 (${WAITED_MS} ms)" \
		eval 'has_remote hv1 a3@hv2 && lacks_remote hv1 a4@hv2'
	for h in hv1 hv2; do
		expect_ok "$h: fleet.etcd_connected true again" wait_until 10 eval "[ \"\$(etcd_connected $h)\" = true ]"
	done
	expect_ok "etcd: /vmfence/vms/hv2/a3 published, a4 deleted" \
		test "$(etcd_keys hv1 /vmfence/vms/hv2/ | sort | tr '\n' ' ')" = "/vmfence/vms/hv2/a2 /vmfence/vms/hv2/a3 /vmfence/vms/hv2/b2 "
fi
expect_ok "a1 -> a3 tcp/22 across hosts" tcp_probe hv1-a1 10.2.0.4 22
expect_ok "a3 -> a1 tcp/22 across hosts" tcp_probe hv2-a3 10.1.0.2 22

# ------------------------------------------------------------------ 5 --------
section "5. SIGTERM on hv2's agent keeps its lease until it expires (lease_s $LEASE)"
if enforced; then
	t0=${EPOCHREALTIME/./}
	fleet_stop hv2 TERM
	expect_ok "hv2's agent exited 0 on SIGTERM" test "${FLEET_RC[hv2]}" = 0
	expect_ok "hv2's records still in etcd right after" \
		test "$(etcd_keys hv1 /vmfence/vms/hv2/ | wc -l)" = 3
	expect_ok "hv1 still lists a2, b2, a3" has_remote hv1 a2@hv2 b2@hv2 a3@hv2
	expect_ok "b2's TAP keeps vmfence's programs (fail closed)" test "$(tap_progs hv2-hv tap-b2 | grep -c vmfence)" -ge 2
	gone() { etcd_none hv1 /vmfence/vms/hv2/ && no_remote_of hv1 hv2; }
	wait_until $((LEASE + 6)) gone
	el=$(( (${EPOCHREALTIME/./} - t0) / 1000 ))
	expect_ok "hv2's records and hv1's view of them gone within lease_s + 6 s (${el} ms)" gone
	# A keepalive may have gone out up to lease_s/3 (contract: retry at least
	# that often; /2 allowed here) before the SIGTERM; a revoked lease would
	# take the records at once.
	expect_ok "... but not before lease_s/2 - 1 s (SIGTERM kept the lease: ${el} ms)" test "$el" -ge $(( LEASE * 500 - 1000 ))
fi
expect_blocked "b2 -> a1 tcp/22 (hv2's pinned datapath, agent stopped)" tcp_probe hv2-b2 10.1.0.2 22

# ------------------------------------------------------------------ 6 --------
section "6. vmfence down deletes a host's records at once"
if enforced; then
	fleet_start hv2
	wait_until 15 has_remote hv1 a2@hv2 b2@hv2 a3@hv2
	expect_ok "hv2 republished: hv1 lists a2, b2, a3 within 15 s (${WAITED_MS} ms)" has_remote hv1 a2@hv2 b2@hv2 a3@hv2
	fleet_stop hv2 TERM
	t0=${EPOCHREALTIME/./}
	expect_ok "vmfence down on hv2" vmfq hv2 down --config "$(fleet_conf hv2)"
	expect_ok "hv2's records gone from etcd when down returns" etcd_none hv1 /vmfence/vms/hv2/
	wait_until 4 no_remote_of hv1 hv2
	el=$(( (${EPOCHREALTIME/./} - t0) / 1000 ))
	expect_ok "hv1 forgets hv2's VMs within 4 s, before the lease (${el} ms)" no_remote_of hv1 hv2
	expect_ok "hv1's own record stays" test "$(etcd_keys hv1 /vmfence/vms/hv1/)" = /vmfence/vms/hv1/a1
	expect_ok "hv1's agent still runs" kill -0 "${FLEET_PID[hv1]}"
fi

e2e_finish
