#!/usr/bin/env bash
# End-to-end: seed 003 topology (routed, no bridge, dual stack), real packets.
#
# As microvm.nix's routed-network pattern that seed 003 follows:
#   hv:   interfaces vm1..vm3 (veth host ends = the TAPs), each with the host
#         gateway addresses 10.0.0.0/32 and fec0::/128, proxy_arp on, host
#         routes 10.0.0.N/32 dev vmN and fec0::N/128 dev vmN; forwarding on.
#         wan0 198.51.100.1/24 + 2001:db8:100::1/64 -> netns "inet"
#         (198.51.100.2, 2001:db8:100::2: TCP 443 and 8080).
#   vmN:  eth0 02:00:00:00:00:0N, 10.0.0.N/32 + fec0::N/128, on-link routes to
#         the gateways 10.0.0.0 and fec0::, default routes via them (vm2's
#         IPv6 default route goes via the host's link-local fe80::1 instead).
#         TCP 22 (v4+v6) in every VM, UDP echo 5000 in vm3.
#   One group "mesh": every VM reaches every other VM over IPv4 and IPv6.
#   Egress: tcp 443 to 0.0.0.0/0 and ::/0; vm1 and vm2 may also ping the
#   gateways (icmp 10.0.0.0/32, icmpv6 fec0::/128), vm3 may not.
# Needs root. NO_VMFENCE=1: topology only (denied flows must then go through).
set -u
. "$(dirname "$0")/lib.sh"
e2e_init seed003_routed

section topology
hv_add
for n in 1 2 3; do
	vm_add "vm$n" "vm$n" "02:00:00:00:00:0$n"
	ipn hv addr add 10.0.0.0/32 dev "vm$n"
	ipn hv addr add fec0::/128 dev "vm$n" nodad
	nsx hv sysctl -qw "net.ipv4.conf.vm$n.proxy_arp=1"
	ipn hv route add "10.0.0.$n/32" dev "vm$n"
	ipn hv -6 route add "fec0::$n/128" dev "vm$n"
	ipn "vm$n" addr add "10.0.0.$n/32" dev eth0
	ipn "vm$n" addr add "fec0::$n/128" dev eth0 nodad
	ipn "vm$n" route add 10.0.0.0/32 dev eth0
	ipn "vm$n" route add default via 10.0.0.0 dev eth0
	ipn "vm$n" -6 route add fec0::/128 dev eth0
	if [ "$n" = 2 ]; then
		# vm2's IPv6 next hop is the host's link-local fe80::1 instead.
		ipn hv addr add fe80::1/64 dev vm2 nodad
		ipn vm2 -6 route add default via fe80::1 dev eth0
	else
		ipn "vm$n" -6 route add default via fec0:: dev eth0
	fi
	serve_tcp "vm$n" 22
done
serve_udp vm3 5000
wan_add inet wan0 198.51.100.1/24 198.51.100.2/24 2001:db8:100::1/64 2001:db8:100::2/64
serve_tcp inet 443
serve_tcp inet 8080
for n in 1 2 3; do wait_listen "vm$n" 22; done
wait_listen vm3 5000 udp; wait_listen inet 443; wait_listen inet 8080
# Link-local addresses (used by ND and the RA test) must be past DAD.
for n in 1 2 3; do
	for i in $(seq 50); do
		ipn "vm$n" -6 addr show dev eth0 scope link | grep -q tentative || break
		sleep 0.1
	done
done

section config
write_host '{}'
WEB='{ "to": "0.0.0.0/0", "proto": "tcp", "ports": ["443"] }, { "to": "::/0", "proto": "tcp", "ports": ["443"] }'
GWPING='{ "to": "10.0.0.0/32", "proto": "icmp" }, { "to": "fec0::/128", "proto": "icmpv6" }'
for n in 1 2 3; do
	eg="$WEB"
	[ "$n" != 3 ] && eg="$WEB, $GWPING"
	write_vm "vm$n" "{
  \"name\": \"vm$n\", \"interface\": \"vm$n\", \"mac\": \"02:00:00:00:00:0$n\",
  \"addresses\": [\"10.0.0.$n/32\", \"fec0::$n/128\"], \"gateway\": [\"10.0.0.0\", \"fec0::\"],
  \"group\": \"mesh\", \"egress\": [$eg]
}"
done
start_daemon

section "full mesh, IPv4 and IPv6 (one group)"
mark_log
for a in 1 2 3; do
	for b in 1 2 3; do
		[ "$a" = "$b" ] && continue
		expect_ok "vm$a pings vm$b 10.0.0.$b" ping_probe "vm$a" "10.0.0.$b"
		expect_ok "vm$a pings vm$b fec0::$b" ping_probe "vm$a" "fec0::$b"
		expect_ok "vm$a -> vm$b tcp/22 over IPv4" tcp_probe "vm$a" "10.0.0.$b" 22
		expect_ok "vm$a -> vm$b tcp/22 over IPv6" tcp_probe "vm$a" "fec0::$b" 22
	done
done
expect_ok "vm1 -> vm3 udp/5000 over IPv6" udp_probe vm1 fec0::3 5000
expect_no_log "no violation for mesh traffic or its ARP/ND" 'violation vm=vm[123] reason=' "$HOST_MCAST"

expect_ok "vm2 resolved its link-local IPv6 next hop fe80::1" neigh_resolved vm2 eth0 fe80::1

section "duplicate address detection under enforcement"
# vm3 re-adds fec0::3 with DAD: its NS from :: for its own address must pass
# and the address must come out of tentative without dadfailed.
mark_log
ipn vm3 addr del fec0::3/128 dev eth0
ipn vm3 addr add fec0::3/128 dev eth0
dad_done() {
	local i
	for i in $(seq 50); do
		ipn vm3 -6 addr show dev eth0 | grep 'fec0::3/128' | grep -q tentative || break
		sleep 0.1
	done
	ipn vm3 -6 addr show dev eth0 | grep 'fec0::3/128' | grep -vq 'tentative\|dadfailed'
}
expect_ok "vm3's fec0::3 passes DAD (not tentative, not dadfailed)" dad_done
ipn vm3 -6 route replace default via fec0:: dev eth0
expect_ok "vm3 -> vm1 tcp/22 over IPv6 from the re-added address" tcp_probe vm3 fec0::1 22
expect_no_log "no violation for vm3's DAD" 'violation vm=vm3 reason=' "$HOST_MCAST"

section "gateways: ARP and ND resolve; pings need an egress rule"
mark_log
expect_ok "vm1 pings its IPv4 gateway 10.0.0.0 (egress icmp rule)" ping_probe vm1 10.0.0.0
expect_ok "vm1 pings its IPv6 gateway fec0:: (egress icmpv6 rule)" ping_probe vm1 fec0::
expect_ok "vm1 resolved fec0:: with neighbour solicitation" neigh_resolved vm1 eth0 fec0::
expect_ok "vm1 resolved 10.0.0.0 with ARP" neigh_resolved vm1 eth0 10.0.0.0
expect_ok "the host resolved vm1's fec0::1 (its NS reached vm1, vm1's NA came back)" neigh_resolved hv vm1 fec0::1
expect_no_log "no violation for vm1's gateway traffic" 'violation vm=vm1 reason=' "$HOST_MCAST"
mark_log
ipn vm3 neigh flush dev eth0
expect_blocked "vm3 pings fec0:: (no egress rule)" ping_probe vm3 fec0::
expect_log "egress_denied vm=vm3 icmpv6 to fec0:: logged" \
	"$(violation_re vm3 egress_denied 'dir=from_vm src=fec0::3 dst=fec0:: proto=icmpv6')"
expect_ok "vm3 resolved fec0:: with ND all the same" neigh_resolved vm3 eth0 fec0::
expect_blocked "vm3 pings 10.0.0.0 (no egress rule)" ping_probe vm3 10.0.0.0
expect_log "egress_denied vm=vm3 icmp to 10.0.0.0 logged" "$(violation_re vm3 egress_denied 'src=10\.0\.0\.3 dst=10\.0\.0\.0 proto=icmp')"
expect_ok "vm3 resolved 10.0.0.0 with ARP all the same" neigh_resolved vm3 eth0 10.0.0.0

section "internet over IPv4 and IPv6 through the egress rules"
mark_log
expect_ok "vm1 -> internet tcp/443 over IPv6" tcp_probe vm1 2001:db8:100::2 443
expect_ok "vm2 -> internet tcp/443 over IPv4" tcp_probe vm2 198.51.100.2 443
expect_ok "vm3 -> internet tcp/443 over IPv6" tcp_probe vm3 2001:db8:100::2 443
expect_no_log "no violation for allowed internet flows" 'violation vm=vm[123] reason=' "$HOST_MCAST"
mark_log
expect_blocked "vm1 -> internet tcp/8080 over IPv6 (not allowlisted)" tcp_probe vm1 2001:db8:100::2 8080
expect_log "egress_denied vm=vm1 IPv6 tcp/8080 logged" \
	"$(violation_re vm1 egress_denied 'dir=from_vm src=fec0::1 dst=2001:db8:100::2 proto=tcp sport=[0-9]+ dport=8080')"
expect_blocked "vm2 pings the internet over IPv6" ping_probe vm2 2001:db8:100::2
expect_log "egress_denied vm=vm2 icmpv6 logged" "$(violation_re vm2 egress_denied 'dst=2001:db8:100::2 proto=icmpv6')"
expect_blocked "internet -> vm1 tcp/22 over IPv6 (unsolicited)" tcp_probe inet fec0::1 22
expect_log "ingress_denied vm=vm1 IPv6 tcp/22 logged" \
	"$(violation_re vm1 ingress_denied 'dir=to_vm src=2001:db8:100::2 dst=fec0::1 proto=tcp sport=[0-9]+ dport=22')"
expect_blocked "internet -> vm2 tcp/22 over IPv4 (unsolicited)" tcp_probe inet 10.0.0.2 22
expect_log "ingress_denied vm=vm2 IPv4 tcp/22 logged" "$(violation_re vm2 ingress_denied 'src=198\.51\.100\.2 dst=10\.0\.0\.2 proto=tcp')"

section "anti-spoofing (scapy from vm1)"
HV1_MAC=$(mac_of hv vm1)
VM1_MAC=02:00:00:00:00:01
VM1_LL=$(ipn vm1 -6 addr show dev eth0 scope link | awk '/inet6/ {sub("/.*", "", $2); print $2; exit}')
crafted() { # IPv6|IP SRC DST: UDP to vm3's echo port 5000 (mesh: allowed); true if vm3 got it
	local tok="crafted$RANDOM$RANDOM"
	scapy vm1 "sendp(Ether(src='$VM1_MAC', dst='$HV1_MAC')/$1(src='$2', dst='$3')/UDP(sport=40000, dport=5000)/Raw(b'$tok'), iface='eth0')" &&
		udp_log_has vm3 5000 "$tok" 2
}
mark_log
expect_ok "control: well-formed crafted IPv6 frame from vm1 reaches vm3" crafted IPv6 fec0::1 fec0::3
expect_ok "control: well-formed crafted IPv4 frame from vm1 reaches vm3" crafted IP 10.0.0.1 10.0.0.3
expect_blocked "vm1 sends as vm2 (fec0::2)" crafted IPv6 fec0::2 fec0::3
expect_log "spoofed_ip vm=vm1 src=fec0::2 logged" "$(violation_re vm1 spoofed_ip 'dir=from_vm src=fec0::2 dst=fec0::3')"
expect_blocked "vm1 sends from 2001:db8:bad::1 (not its address)" crafted IPv6 2001:db8:bad::1 fec0::3
expect_log "spoofed_ip vm=vm1 src=2001:db8:bad::1 logged" "$(violation_re vm1 spoofed_ip 'src=2001:db8:bad::1')"
expect_blocked "vm1 sends as vm2 (10.0.0.2)" crafted IP 10.0.0.2 10.0.0.3
expect_log "spoofed_ip vm=vm1 src=10.0.0.2 logged" "$(violation_re vm1 spoofed_ip 'src=10\.0\.0\.2 dst=10\.0\.0\.3')"

# A router advertisement from vm1 (prefix 2001:db8:bad::/64, on-link). The
# host's vm1 interface accepts RAs (accept_ra=2 although forwarding): without
# vmfence it installs the prefix route.
nsx hv sysctl -qw net.ipv6.conf.vm1.accept_ra=2
rogue_ra() {
	scapy vm1 "sendp(Ether(src='$VM1_MAC', dst='33:33:00:00:00:01')/IPv6(src='$VM1_LL', dst='ff02::1', hlim=255)/ICMPv6ND_RA(routerlifetime=0)/ICMPv6NDOptSrcLLAddr(lladdr='$VM1_MAC')/ICMPv6NDOptPrefixInfo(prefix='2001:db8:bad::', prefixlen=64, L=1, A=0), iface='eth0')"
	sleep 0.5
	ipn hv -6 route show 2001:db8:bad::/64 | grep -q .
}
mark_log
expect_blocked "vm1 sends a router advertisement the host would act on" rogue_ra
expect_log "spoofed_nd vm=vm1 for the RA logged" "$(violation_re vm1 spoofed_nd 'dir=from_vm')"
ipn hv -6 route del 2001:db8:bad::/64 dev vm1 2>/dev/null
nsx hv sysctl -qw net.ipv6.conf.vm1.accept_ra=0

# Neighbour advertisements that lie. One claims vm2's fec0::2 (log only: in a
# routed set-up the host has no entry for it on vm1's link).
mark_log
scapy vm1 "sendp(Ether(src='$VM1_MAC', dst='$HV1_MAC')/IPv6(src='fec0::1', dst='ff02::1', hlim=255)/ICMPv6ND_NA(tgt='fec0::2', R=0, S=0, O=1)/ICMPv6NDOptDstLLAddr(lladdr='$VM1_MAC'), iface='eth0')"
expect_log "spoofed_nd vm=vm1 for an NA claiming fec0::2 logged" "$(violation_re vm1 spoofed_nd)"
# The other keeps vm1's own address but names another MAC in its target
# link-layer option: without vmfence the host's entry for fec0::1 moves to
# that MAC (traffic to vm1 redirected).
na_foreign_ll() {
	ipn hv neigh replace fec0::1 lladdr "$VM1_MAC" dev vm1 nud stale
	scapy vm1 "sendp(Ether(src='$VM1_MAC', dst='33:33:00:00:00:01')/IPv6(src='fec0::1', dst='ff02::1', hlim=255)/ICMPv6ND_NA(tgt='fec0::1', R=0, S=0, O=1)/ICMPv6NDOptDstLLAddr(lladdr='02:00:00:00:00:02'), iface='eth0')"
	sleep 0.3
	ipn hv neigh show fec0::1 dev vm1 | grep -qi 02:00:00:00:00:02
}
mark_log
expect_blocked "vm1's NA names a foreign link-layer address and repoints the host's entry" na_foreign_ll
expect_log "spoofed_nd vm=vm1 for the NA with a foreign link-layer address logged" "$(violation_re vm1 spoofed_nd)"
ipn hv neigh replace fec0::1 lladdr "$VM1_MAC" dev vm1 nud stale

section "still healthy after the attacks"
expect_ok "vm1 -> vm2 tcp/22 over IPv6 still works" tcp_probe vm1 fec0::2 22
expect_ok "vm2 -> vm1 ping over IPv6 still works" ping_probe vm2 fec0::1
expect_ok "vm1 -> internet tcp/443 over IPv6 still works" tcp_probe vm1 2001:db8:100::2 443
counters_match_log
e2e_finish
