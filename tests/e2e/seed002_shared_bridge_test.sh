#!/usr/bin/env bash
# End-to-end: seed 002 topology (one shared bridge, two tenants), real packets.
#
#   hv:      br0 10.100.0.1/16, ports tap-acme1, tap-acme2, tap-globex1, tap-globex2
#            (veth host ends). ip_forward is OFF: VM to VM traffic is switched by
#            the bridge, never routed, so only the TAP hooks can stop it.
#            UDP echo on 10.100.0.1:53.
#   acme1    10.100.1.2/16  group acme     TCP 22 and 80 servers in every VM
#   acme2    10.100.1.3/16  group acme
#   globex1  10.100.2.2/16  group globex   ingress tcp 80 from 10.100.0.1/32
#   globex2  10.100.2.3/16  group globex   egress tcp 80 to 0.0.0.0/0
# Needs root. NO_VMFENCE=1: topology only (denied flows must then go through).
set -u
. "$(dirname "$0")/lib.sh"
e2e_init seed002_shared_bridge

declare -A IP=([acme1]=10.100.1.2 [acme2]=10.100.1.3 [globex1]=10.100.2.2 [globex2]=10.100.2.3)
declare -A MAC=([acme1]=02:00:0a:64:01:02 [acme2]=02:00:0a:64:01:03
	[globex1]=02:00:0a:64:02:02 [globex2]=02:00:0a:64:02:03)
VMS="acme1 acme2 globex1 globex2"

section topology
hv_add
nsx hv sysctl -qw net.ipv4.ip_forward=0
bridge_add br0 10.100.0.1/16
for vm in $VMS; do
	vm_add "$vm" "tap-$vm" "${MAC[$vm]}"
	bridge_port br0 "tap-$vm"
	ipn "$vm" addr add "${IP[$vm]}/16" dev eth0
	ipn "$vm" route add default via 10.100.0.1
	serve_tcp "$vm" 22
	serve_tcp "$vm" 80
done
serve_udp hv 53
for vm in $VMS; do wait_listen "$vm" 22; wait_listen "$vm" 80; done
wait_listen hv 53 udp
BR_MAC=$(mac_of hv br0)

section config
write_host '{}'
vm_json() { # NAME GROUP EGRESS INGRESS
	write_vm "$1" "{
  \"name\": \"$1\", \"interface\": \"tap-$1\", \"mac\": \"${MAC[$1]}\",
  \"addresses\": [\"${IP[$1]}/32\"], \"gateway\": [\"10.100.0.1\"], \"group\": \"$2\",
  \"egress\": [$3], \"ingress\": [$4]
}"
}
DNS='{ "to": "10.100.0.1/32", "proto": "udp", "ports": ["53"] }'
vm_json acme1 acme "$DNS" ""
vm_json acme2 acme "$DNS" ""
vm_json globex1 globex "$DNS" '{ "from": "10.100.0.1/32", "proto": "tcp", "ports": ["80"] }'
vm_json globex2 globex "$DNS, { \"to\": \"0.0.0.0/0\", \"proto\": \"tcp\", \"ports\": [\"80\"] }" ""
start_daemon

section "same tenant: allowed both ways (group acme, group globex)"
mark_log
expect_ok "acme1 pings acme2" ping_probe acme1 10.100.1.3
expect_ok "acme2 pings acme1" ping_probe acme2 10.100.1.2
expect_ok "acme1 -> acme2 tcp/22" tcp_probe acme1 10.100.1.3 22
expect_ok "acme2 -> acme1 tcp/80" tcp_probe acme2 10.100.1.2 80
expect_ok "globex1 pings globex2" ping_probe globex1 10.100.2.3
expect_ok "globex2 -> globex1 tcp/22" tcp_probe globex2 10.100.2.2 22
expect_ok "acme1 -> host udp/53 (egress rule)" udp_probe acme1 10.100.0.1 53
expect_no_log "no violation for same-group traffic" 'violation vm=(acme|globex)[12] reason=' "$HOST_MCAST"

section "across tenants: dropped at the TAP although the bridge switches it"
mark_log
expect_blocked "acme1 pings globex1" ping_probe acme1 10.100.2.2
expect_log "cross_group vm=acme1 for 10.100.2.2 logged (ARP or ICMP)" "$(violation_re acme1 cross_group 'dst=10\.100\.2\.2')"
expect_blocked "globex1 pings acme2" ping_probe globex1 10.100.1.3
expect_log "cross_group vm=globex1 for 10.100.1.3 logged" "$(violation_re globex1 cross_group 'dst=10\.100\.1\.3')"
# With the neighbour entry already in place, the IP packet itself is the
# cross-group frame (no ARP first).
ipn acme1 neigh replace 10.100.2.3 lladdr "${MAC[globex2]}" dev eth0 nud permanent
ipn globex2 neigh replace 10.100.1.3 lladdr "${MAC[acme2]}" dev eth0 nud permanent
mark_log
expect_blocked "acme1 -> globex2 tcp/22 (static neighbour: IP frame switched directly)" tcp_probe acme1 10.100.2.3 22
expect_log "cross_group vm=acme1 tcp dport=22 logged" \
	"$(violation_re acme1 cross_group 'dir=from_vm src=10\.100\.1\.2 dst=10\.100\.2\.3 proto=tcp sport=[0-9]+ dport=22')"
expect_blocked "globex2 -> acme2 tcp/80 (globex2 may reach any tcp/80, but not another tenant)" tcp_probe globex2 10.100.1.3 80
expect_log "cross_group vm=globex2 tcp dport=80 logged" \
	"$(violation_re globex2 cross_group 'src=10\.100\.2\.3 dst=10\.100\.1\.3 proto=tcp sport=[0-9]+ dport=80')"
ipn acme1 neigh del 10.100.2.3 dev eth0
ipn globex2 neigh del 10.100.1.3 dev eth0
mark_log
ll_before=$(drop_count globex1 link_local)
expect_fail "globex1 pings 10.100.9.9 (nobody there)" ping_probe globex1 10.100.9.9
# An ARP for an address that is nobody's is the guest's noise: dropped and
# counted (link_local), never a violation (README "Guest noise").
expect_no_log "no violation for an ARP to nobody's address" "$(violation_re globex1 '[a-z_]+' 'dst=10\.100\.9\.9')"
if enforced; then
	ll_after=$(drop_count globex1 link_local)
	expect_ok "the ARP for 10.100.9.9 is counted as link_local ($ll_before -> $ll_after)" test "$ll_after" -gt "$ll_before"
fi

section "inbound from the host: ingress rules only"
mark_log
expect_ok "host 10.100.0.1 -> globex1 tcp/80 (ingress rule)" tcp_probe hv 10.100.2.2 80
expect_blocked "host -> globex1 tcp/22 (no rule)" tcp_probe hv 10.100.2.2 22
expect_log "ingress_denied vm=globex1 dir=to_vm tcp/22 logged" \
	"$(violation_re globex1 ingress_denied 'dir=to_vm src=10\.100\.0\.1 dst=10\.100\.2\.2 proto=tcp sport=[0-9]+ dport=22')"
expect_blocked "host -> acme1 tcp/80 (acme has no ingress rule)" tcp_probe hv 10.100.1.2 80
expect_log "ingress_denied vm=acme1 tcp/80 logged" "$(violation_re acme1 ingress_denied 'dir=to_vm .*dport=80')"
expect_blocked "host pings globex2 (no rule)" ping_probe hv 10.100.2.3
expect_log "ingress_denied vm=globex2 icmp logged" "$(violation_re globex2 ingress_denied 'dir=to_vm src=10\.100\.0\.1 dst=10\.100\.2\.3 proto=icmp')"

section "spoofing a neighbour's address (scapy from globex1)"
crafted() { # SRC_IP: UDP to the host's udp/53 (allowed); true if the host got it
	local tok="crafted$RANDOM$RANDOM"
	scapy globex1 "sendp(Ether(src='${MAC[globex1]}', dst='$BR_MAC')/IP(src='$1', dst='10.100.0.1')/UDP(sport=40000, dport=53)/Raw(b'$tok'), iface='eth0')" &&
		udp_log_has hv 53 "$tok" 2
}
mark_log
expect_ok "control: well-formed crafted frame from globex1 reaches the host" crafted 10.100.2.2
expect_blocked "globex1 sends as acme1 (10.100.1.2, other tenant)" crafted 10.100.1.2
expect_log "spoofed_ip vm=globex1 src=10.100.1.2 logged" "$(violation_re globex1 spoofed_ip 'dir=from_vm src=10\.100\.1\.2 dst=10\.100\.0\.1')"
expect_blocked "globex1 sends as globex2 (10.100.2.3, same tenant)" crafted 10.100.2.3
expect_log "spoofed_ip vm=globex1 src=10.100.2.3 logged" "$(violation_re globex1 spoofed_ip 'src=10\.100\.2\.3')"

section "ARP poisoning: globex1 claims acme2's 10.100.1.3"
# acme1 and the host hold a (stale) entry for acme2; a gratuitous ARP (and an
# unsolicited reply) from globex1 would override both with globex1's MAC.
poison() {
	ipn acme1 neigh replace 10.100.1.3 lladdr "${MAC[acme2]}" dev eth0 nud stale
	ipn hv neigh replace 10.100.1.3 lladdr "${MAC[acme2]}" dev br0 nud stale
	scapy globex1 "g = '${MAC[globex1]}'
sendp(Ether(src=g, dst='ff:ff:ff:ff:ff:ff')/ARP(op=1, hwsrc=g, psrc='10.100.1.3', hwdst='00:00:00:00:00:00', pdst='10.100.1.3'), iface='eth0')
sendp(Ether(src=g, dst='ff:ff:ff:ff:ff:ff')/ARP(op=2, hwsrc=g, psrc='10.100.1.3', hwdst='ff:ff:ff:ff:ff:ff', pdst='10.100.1.3'), iface='eth0')
sendp(Ether(src=g, dst='${MAC[acme1]}')/ARP(op=2, hwsrc=g, psrc='10.100.1.3', hwdst='${MAC[acme1]}', pdst='10.100.1.2'), iface='eth0')"
	sleep 0.3
	ipn acme1 neigh show 10.100.1.3 dev eth0 | grep -qi "${MAC[globex1]}" ||
		ipn hv neigh show 10.100.1.3 dev br0 | grep -qi "${MAC[globex1]}"
}
mark_log
expect_blocked "gratuitous ARP / unsolicited reply poisons acme1's or the host's cache" poison
expect_log "spoofed_arp vm=globex1 src=10.100.1.3 logged" "$(violation_re globex1 spoofed_arp 'src=10\.100\.1\.3')"
ipn acme1 neigh replace 10.100.1.3 lladdr "${MAC[acme2]}" dev eth0 nud stale
ipn hv neigh replace 10.100.1.3 lladdr "${MAC[acme2]}" dev br0 nud stale

section "still healthy after the attacks"
mark_log
expect_ok "acme1 -> acme2 tcp/22 still works" tcp_probe acme1 10.100.1.3 22
expect_ok "host -> globex1 tcp/80 still works" tcp_probe hv 10.100.2.2 80
expect_no_log "no violation for these" 'violation vm=(acme|globex)[12] reason=' "$HOST_MCAST"
counters_match_log
e2e_finish
