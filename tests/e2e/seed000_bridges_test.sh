#!/usr/bin/env bash
# End-to-end: seed 000 topology (one bridge per VM), real packets, real kernel.
#
#   hv:   br-vmN 10.N.0.1/24 with port vm-vmN (veth host end = the VM's TAP), N=1..5
#         wan0 198.51.100.1/24 -> netns "inet" 198.51.100.2 (the internet:
#         TCP 443, 8080, UDP echo 53)
#   vmN:  eth0 02:00:00:00:0N:02, 10.N.0.2/24, default via 10.N.0.1, TCP 22 server
#   each VM is its own group; vm1 may ping its gateway, vm3 accepts TCP 22 from
#   198.51.100.0/24.
# Needs root. NO_VMFENCE=1: topology only (denied flows must then go through).
set -u
. "$(dirname "$0")/lib.sh"
e2e_init seed000_bridges

section topology
hv_add
for n in 1 2 3 4 5; do
	vm_add "vm$n" "vm-vm$n" "02:00:00:00:0$n:02"
	bridge_add "br-vm$n" "10.$n.0.1/24"
	bridge_port "br-vm$n" "vm-vm$n"
	ipn "vm$n" addr add "10.$n.0.2/24" dev eth0
	ipn "vm$n" route add default via "10.$n.0.1"
done
wan_add inet wan0 198.51.100.1/24 198.51.100.2/24
serve_tcp inet 443
serve_tcp inet 8080
serve_udp inet 53
for n in 1 2 3 4 5; do serve_tcp "vm$n" 22; done
wait_listen inet 443; wait_listen inet 8080; wait_listen inet 53 udp
for n in 1 2 3 4 5; do wait_listen "vm$n" 22; done

section config
write_host '{}'
vm_json() { # N EGRESS INGRESS
	write_vm "vm$1" "{
  \"name\": \"vm$1\", \"interface\": \"vm-vm$1\", \"mac\": \"02:00:00:00:0$1:02\",
  \"addresses\": [\"10.$1.0.2/32\"], \"gateway\": [\"10.$1.0.1\"], \"group\": \"vm$1\",
  \"egress\": [$2], \"ingress\": [$3]
}"
}
WEB='{ "to": "0.0.0.0/0", "proto": "tcp", "ports": ["443"] }'
DNS='{ "to": "0.0.0.0/0", "proto": "udp", "ports": ["53"] }'
vm_json 1 "$WEB, $DNS, { \"to\": \"10.1.0.1/32\", \"proto\": \"icmp\" }" ""
vm_json 2 "$WEB, $DNS" ""
vm_json 3 "$WEB" '{ "from": "198.51.100.0/24", "proto": "tcp", "ports": ["22"] }'
vm_json 4 "$WEB" ""
vm_json 5 "$WEB" ""
start_daemon

GW1_MAC=$(mac_of hv br-vm1)
VM1_MAC=02:00:00:00:01:02

section "gateway: ARP always, ICMP only with an egress rule"
mark_log
expect_ok "vm1 pings its gateway 10.1.0.1 (egress icmp 10.1.0.1/32)" ping_probe vm1 10.1.0.1
expect_blocked "vm2 pings its gateway 10.2.0.1 (no egress rule)" ping_probe vm2 10.2.0.1
expect_log "egress_denied logged for vm2's ping to its gateway" \
	"$(violation_re vm2 egress_denied 'dir=from_vm src=10\.2\.0\.2 dst=10\.2\.0\.1 proto=icmp')"
expect_ok "vm2 resolved its gateway with ARP (neighbour entry has a lladdr)" neigh_resolved vm2 eth0 10.2.0.1
expect_no_log "no ARP violation for vm1/vm2 gateway resolution" 'violation vm=vm[12] reason=(spoofed_arp|arp_denied)'

section "egress allowlist to the internet"
mark_log
for n in 1 2 3 4 5; do
	expect_ok "vm$n -> internet tcp/443 (egress rule; reply comes back)" tcp_probe "vm$n" 198.51.100.2 443
done
expect_ok "vm1 -> internet udp/53 echo (egress rule)" udp_probe vm1 198.51.100.2 53
expect_no_log "no violation for allowed flows" 'violation vm=vm[1-5] reason=' "$HOST_MCAST"
mark_log
expect_blocked "vm1 -> internet tcp/8080 (not allowlisted)" tcp_probe vm1 198.51.100.2 8080
expect_log "egress_denied vm=vm1 dport=8080 logged" \
	"$(violation_re vm1 egress_denied 'dir=from_vm src=10\.1\.0\.2 dst=198\.51\.100\.2 proto=tcp sport=[0-9]+ dport=8080')"
expect_blocked "vm3 -> internet udp/53 (vm3 has no udp rule)" udp_probe vm3 198.51.100.2 53
expect_log "egress_denied vm=vm3 udp dport=53 logged" "$(violation_re vm3 egress_denied 'proto=udp .*dport=53')"
expect_blocked "vm1 pings the internet (icmp only allowed to the gateway)" ping_probe vm1 198.51.100.2
expect_log "egress_denied vm=vm1 icmp logged" "$(violation_re vm1 egress_denied 'dst=198\.51\.100\.2 proto=icmp')"

section "isolation between VMs (each VM its own group)"
mark_log
expect_blocked "vm1 pings vm2" ping_probe vm1 10.2.0.2
expect_log "cross_group vm=vm1 -> 10.2.0.2 icmp logged" \
	"$(violation_re vm1 cross_group 'dir=from_vm src=10\.1\.0\.2 dst=10\.2\.0\.2 proto=icmp')"
expect_blocked "vm1 -> vm2 tcp/22" tcp_probe vm1 10.2.0.2 22
expect_log "cross_group vm=vm1 -> 10.2.0.2 tcp/22 logged" \
	"$(violation_re vm1 cross_group 'dst=10\.2\.0\.2 proto=tcp sport=[0-9]+ dport=22')"
expect_blocked "vm4 -> vm5 tcp/22" tcp_probe vm4 10.5.0.2 22
expect_log "cross_group vm=vm4 -> 10.5.0.2 logged" "$(violation_re vm4 cross_group 'dst=10\.5\.0\.2')"
expect_blocked "vm2 -> vm3 tcp/22 (vm3's ingress rule is for the internet only)" tcp_probe vm2 10.3.0.2 22
expect_log "cross_group vm=vm2 -> 10.3.0.2 logged" "$(violation_re vm2 cross_group 'dst=10\.3\.0\.2')"

section "inbound: only replies and ingress rules"
mark_log
expect_blocked "internet -> vm1 tcp/22 (no ingress rule)" tcp_probe inet 10.1.0.2 22
expect_log "ingress_denied vm=vm1 dir=to_vm tcp/22 logged" \
	"$(violation_re vm1 ingress_denied 'dir=to_vm src=198\.51\.100\.2 dst=10\.1\.0\.2 proto=tcp sport=[0-9]+ dport=22')"
expect_ok "internet -> vm3 tcp/22 (ingress tcp 22 from 198.51.100.0/24)" tcp_probe inet 10.3.0.2 22
expect_blocked "internet pings vm3 (ingress rule is tcp/22 only)" ping_probe inet 10.3.0.2
expect_log "ingress_denied vm=vm3 icmp logged" "$(violation_re vm3 ingress_denied 'dir=to_vm src=198\.51\.100\.2 dst=10\.3\.0\.2 proto=icmp')"
expect_blocked "hypervisor (10.2.0.1) -> vm2 tcp/22 (the host is no exception)" tcp_probe hv 10.2.0.2 22
expect_log "ingress_denied vm=vm2 from the gateway logged" "$(violation_re vm2 ingress_denied 'src=10\.2\.0\.1 dst=10\.2\.0\.2 proto=tcp')"

section "anti-spoofing (scapy from vm1)"
# Each crafted frame is a UDP datagram to the internet's echo port 53, which
# vm1's egress allows, so spoofing is the only reason to drop it. The
# well-formed frame first: proves crafted frames reach the sink at all.
send_udp() { # SRC_MAC SRC_IP TOKEN
	scapy vm1 "sendp(Ether(src='$1', dst='$GW1_MAC')/IP(src='$2', dst='198.51.100.2')/UDP(sport=40000, dport=53)/Raw(b'$3'), iface='eth0')"
}
crafted() { # SRC_MAC SRC_IP: send a frame, true if the internet got it
	local tok="crafted$RANDOM$RANDOM"
	send_udp "$1" "$2" "$tok" && udp_log_has inet 53 "$tok" 2
}
mark_log
expect_ok "control: well-formed crafted frame from vm1 reaches the internet" crafted "$VM1_MAC" 10.1.0.2
expect_blocked "spoofed source IP 10.2.0.2 (vm2's) from vm1" crafted "$VM1_MAC" 10.2.0.2
expect_log "spoofed_ip vm=vm1 src=10.2.0.2 logged" "$(violation_re vm1 spoofed_ip 'dir=from_vm src=10\.2\.0\.2 dst=198\.51\.100\.2')"
expect_blocked "spoofed source IP 198.51.100.77 (off-net) from vm1" crafted "$VM1_MAC" 198.51.100.77
expect_log "spoofed_ip vm=vm1 src=198.51.100.77 logged" "$(violation_re vm1 spoofed_ip 'src=198\.51\.100\.77')"
expect_blocked "spoofed source MAC 02:00:00:00:02:02 (vm2's) from vm1" crafted 02:00:00:00:02:02 10.1.0.2
expect_log "spoofed_mac vm=vm1 logged" "$(violation_re vm1 spoofed_mac 'dir=from_vm')"

# ARP claiming vm2's address, asked of vm1's gateway: without vmfence the
# hypervisor learns 10.2.0.2 at vm1's MAC on br-vm1.
arp_spoof() {
	ipn hv neigh flush dev br-vm1 to 10.2.0.2 2>/dev/null
	scapy vm1 "sendp(Ether(src='$VM1_MAC', dst='ff:ff:ff:ff:ff:ff')/ARP(op=1, hwsrc='$VM1_MAC', psrc='10.2.0.2', pdst='10.1.0.1'), iface='eth0')
sendp(Ether(src='$VM1_MAC', dst='$GW1_MAC')/ARP(op=2, hwsrc='$VM1_MAC', psrc='10.2.0.2', hwdst='$GW1_MAC', pdst='10.1.0.1'), iface='eth0')"
	sleep 0.3
	ipn hv neigh show 10.2.0.2 dev br-vm1 | grep -q lladdr
}
mark_log
expect_blocked "spoofed ARP (sender 10.2.0.2 at vm1's MAC) poisons the hypervisor" arp_spoof
expect_log "spoofed_arp vm=vm1 logged" "$(violation_re vm1 spoofed_arp 'src=10\.2\.0\.2')"
ipn hv neigh flush dev br-vm1 to 10.2.0.2 2>/dev/null

section "still healthy after the attacks"
expect_ok "vm1 -> internet tcp/443 still works" tcp_probe vm1 198.51.100.2 443
expect_ok "vm1 still pings its gateway" ping_probe vm1 10.1.0.1
if enforced; then
	expect_ok "daemon still running" kill -0 "$DAEMON_PID"
	expect_ok "vmfence status --json works" eval 'vmf status --json >/dev/null'
fi
counters_match_log
e2e_finish
