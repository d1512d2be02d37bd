#!/usr/bin/env bash
# End-to-end: daemon lifecycle. Fail closed on exit, adopt on restart, and
# `vmfence down` removes everything vmfence installed and nothing else.
#
#   hv:   br-vm1 10.1.0.1/24 + TAP vm-vm1, br-vm2 10.2.0.1/24 + TAP vm-vm2,
#         wan0 198.51.100.1/24 -> "inet" 198.51.100.2 (TCP 443, 8080);
#         host.json masquerades 10.0.0.0/8 out of wan0 and so vmfence's nft
#         table also drops unsolicited WAN -> VM traffic
#   vm1, vm2 at 10.N.0.2, each its own group, egress tcp/443 only.
# Unrelated objects the test puts in place first and that must survive
# everything: a pinned BPF map in a sibling bpffs dir, an nft table in hv, a
# clsact qdisc with a u32 filter on vm-vm2 and on wan0, a tbf root qdisc on
# vm-vm1.
# Needs root. NO_VMFENCE=1: topology, the flows vmfence blocks (they must go
# through) and the unfiltered flows only.
set -u
. "$(dirname "$0")/lib.sh"
e2e_init lifecycle

section topology
hv_add
for n in 1 2; do
	vm_add "vm$n" "vm-vm$n" "02:00:00:00:0$n:02"
	bridge_add "br-vm$n" "10.$n.0.1/24"
	bridge_port "br-vm$n" "vm-vm$n"
	ipn "vm$n" addr add "10.$n.0.2/24" dev eth0
	ipn "vm$n" route add default via "10.$n.0.1"
	serve_tcp "vm$n" 22
done
wan_add inet wan0 198.51.100.1/24 198.51.100.2/24
serve_tcp inet 443
serve_tcp inet 8080
for n in 1 2; do wait_listen "vm$n" 22; done
wait_listen inet 443; wait_listen inet 8080

section "unrelated objects"
KEEP_PIN=$PIN-keep
mkdir -p "$KEEP_PIN"
bpftool map create "$KEEP_PIN/keep" type array key 4 value 4 entries 1 name e2e_keep || fatal "bpftool map create"
nsx hv nft add table inet e2ekeep
nsx hv nft add chain inet e2ekeep c '{ type filter hook forward priority 10; policy accept; }'
for dev in vm-vm2 wan0; do
	nsx hv tc qdisc add dev "$dev" clsact
	nsx hv tc filter add dev "$dev" ingress pref 7 protocol 0x88b5 u32 match u32 0 0 classid 1:1
	nsx hv tc filter add dev "$dev" egress pref 7 protocol 0x88b5 u32 match u32 0 0 classid 1:1
done
nsx hv tc qdisc add dev vm-vm1 root tbf rate 10gbit burst 1mb latency 50ms
unrelated_intact() {
	local ok=0 dev dir
	[ -e "$KEEP_PIN/keep" ] && bpftool map show pinned "$KEEP_PIN/keep" >/dev/null 2>&1 || { echo "    pinned $KEEP_PIN/keep gone"; ok=1; }
	nsx hv nft list table inet e2ekeep >/dev/null 2>&1 || { echo "    nft table inet e2ekeep gone"; ok=1; }
	for dev in vm-vm2 wan0; do
		for dir in ingress egress; do
			nsx hv tc filter show dev "$dev" "$dir" | grep -q 'pref 7 u32' || { echo "    u32 filter on $dev $dir gone"; ok=1; }
		done
	done
	nsx hv tc qdisc show dev vm-vm1 | grep -q '^qdisc tbf' || { echo "    tbf qdisc on vm-vm1 gone"; ok=1; }
	return $ok
}
expect_ok "unrelated objects in place" unrelated_intact

section config
write_host '{ "wan_interfaces": ["wan0"], "nat": { "masquerade": ["10.0.0.0/8"] } }'
for n in 1 2; do
	write_vm "vm$n" "{
  \"name\": \"vm$n\", \"interface\": \"vm-vm$n\", \"mac\": \"02:00:00:00:0$n:02\",
  \"addresses\": [\"10.$n.0.2/32\"], \"gateway\": [\"10.$n.0.1\"],
  \"egress\": [{ \"to\": \"0.0.0.0/0\", \"proto\": \"tcp\", \"ports\": [\"443\"] }]
}"
done

# The vmfence state: pinned maps, programs on both TAPs, the nft table.
has_pins() { ls "$PIN" 2>/dev/null | grep -q '^vmfence_'; }
progs_on() { tap_progs hv "$1" | grep -q vmfence; }
progs_on_both_hooks() { # TAP: a vmfence program on ingress and on egress
	local p
	p=$(tap_progs hv "$1")
	echo "$p" | grep -E '(tcx|tc)/ingress' | grep -q vmfence && echo "$p" | grep -E '(tcx|tc)/egress' | grep -q vmfence
}
has_nft() { nsx hv nft list table inet vmfence >/dev/null 2>&1; }
# The enforced behaviour.
enforced_flows() { # LABEL
	expect_ok "$1: vm1 -> internet tcp/443 (allowed, new connection)" tcp_probe vm1 198.51.100.2 443
	expect_ok "$1: vm2 -> internet tcp/443 (allowed, new connection)" tcp_probe vm2 198.51.100.2 443
	expect_blocked "$1: vm1 -> internet tcp/8080" tcp_probe vm1 198.51.100.2 8080
	expect_blocked "$1: vm1 -> vm2 tcp/22 (other group)" tcp_probe vm1 10.2.0.2 22
	expect_blocked "$1: hypervisor 10.2.0.1 -> vm2 tcp/22 (unsolicited: the TAP hook)" tcp_probe hv 10.2.0.2 22
	expect_blocked "$1: internet -> vm2 tcp/22 (unsolicited from the WAN: the nft table)" tcp_probe inet 10.2.0.2 22
}

if enforced; then
	section "running"
	start_daemon
	mark_log
	enforced_flows running
	expect_log "running: egress_denied vm=vm1 dport=8080 logged" "$(violation_re vm1 egress_denied 'dport=8080')"
	expect_log "running: cross_group vm=vm1 logged" "$(violation_re vm1 cross_group 'dst=10\.2\.0\.2')"
	expect_log "running: ingress_denied vm=vm2 logged" "$(violation_re vm2 ingress_denied 'dir=to_vm src=10\.2\.0\.1 dst=10\.2\.0\.2 proto=tcp')"
	expect_ok "running: maps pinned under $PIN" has_pins
	expect_ok "running: vmfence programs on vm-vm1 ingress and egress" progs_on_both_hooks vm-vm1
	expect_ok "running: vmfence programs on vm-vm2 ingress and egress" progs_on_both_hooks vm-vm2
	expect_ok "running: nft table inet vmfence exists" has_nft
	expect_ok "running: vm1's connection to the internet is masqueraded to 198.51.100.1" \
		eval 'test "$(tcp_peer vm1 198.51.100.2 443)" = 198.51.100.1'
	expect_ok "running: unrelated objects intact" unrelated_intact
	say "programs on vm-vm1:"; tap_progs hv vm-vm1 | sed 's/^/    /'

	section "after SIGTERM: fail closed"
	stop_daemon TERM
	expect_ok "daemon exited 0 on SIGTERM" test "$DAEMON_RC" = 0
	enforced_flows "stopped"
	expect_ok "stopped: maps still pinned" has_pins
	expect_ok "stopped: programs still on vm-vm1 both hooks" progs_on_both_hooks vm-vm1
	expect_ok "stopped: programs still on vm-vm2 both hooks" progs_on_both_hooks vm-vm2
	expect_ok "stopped: nft table inet vmfence still there" has_nft
	expect_ok "stopped: vmfence status --json reads the pinned state" eval 'vmf status --json | grep -q "\"vm1\""'

	section "restart adopts the pinned state"
	start_daemon
	mark_log
	enforced_flows restarted
	expect_log "restarted: egress_denied vm=vm1 dport=8080 logged" "$(violation_re vm1 egress_denied 'dport=8080')"
	expect_ok "restarted: exactly one vmfence program per hook on vm-vm1" \
		eval 'test "$(tap_progs hv vm-vm1 | grep -c vmfence)" = 2'
	counters_match_log
	stop_daemon INT
	expect_ok "daemon exited 0 on SIGINT" test "$DAEMON_RC" = 0
	expect_ok "after SIGINT: programs still on vm-vm1" progs_on_both_hooks vm-vm1

	section "vmfence down"
	expect_ok "vmfence down --config exits 0" eval 'vmf down --config "$CONF" >>"$WORK/down.log" 2>&1'
	expect_fail "down: pin dir $PIN is gone" test -e "$PIN"
	expect_fail "down: no vmfence program on vm-vm1" progs_on vm-vm1
	expect_fail "down: no vmfence program on vm-vm2" progs_on vm-vm2
	expect_fail "down: no nft table inet vmfence" has_nft
	expect_ok "down: unrelated objects intact" unrelated_intact
	say "left on vm-vm2:"; tap_progs hv vm-vm2 | sed 's/^/    /'
	expect_ok "vmfence down again (nothing left) exits 0" eval 'vmf down --config "$CONF" >>"$WORK/down.log" 2>&1'
else
	# NO_VMFENCE=1 (lib.sh's control run): each flow vmfence must block goes
	# through without it.
	section "unenforced: the flows vmfence blocks"
	enforced_flows unenforced
fi

section "unfiltered after down"
expect_ok "vm1 -> internet tcp/8080 flows" tcp_probe vm1 198.51.100.2 8080
expect_ok "vm1's source address arrives unmasqueraded (10.1.0.2)" eval 'test "$(tcp_peer vm1 198.51.100.2 8080)" = 10.1.0.2'
expect_ok "vm1 -> vm2 tcp/22 flows" tcp_probe vm1 10.2.0.2 22
expect_ok "vm1 pings vm2" ping_probe vm1 10.2.0.2
expect_ok "internet -> vm2 tcp/22 flows" tcp_probe inet 10.2.0.2 22
expect_ok "hypervisor -> vm2 tcp/22 flows" tcp_probe hv 10.2.0.2 22
expect_ok "unrelated objects intact at the end" unrelated_intact
e2e_finish
