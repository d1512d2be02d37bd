#!/usr/bin/env bash
# End-to-end: hostile guests (issue 8). A tenant owns its guest kernel and
# crafts every byte; each frame below is sent through a real veth "TAP" in a
# namespace and must not show up at the receiving namespace's interface under
# vmfence. Every hostile frame is also sent without vmfence (the control run,
# NO_VMFENCE=1, which this script also runs, in the background, unless
# HOSTILE_CONTROL=0): there it must arrive, so a block under vmfence is
# vmfence's doing and not the topology's.
#
# Arrival is checked at the receiver, not through counters: tests/e2e/hostile/
# cap.py records every frame an interface receives; each crafted frame carries
# a random 6-byte token (payload, ND nonce option, ARP padding, MLD group or
# source) and "arrived" means the token is in that capture. Frames are built
# once by hostile/frames.py (scapy) and sent by hostile/tx.py (AF_PACKET).
# Under vmfence each blocked frame must also have grown a drop counter of the
# sending or receiving VM in `vmfence status --json` (a named reason where the
# README names one: bad_ethertype for tags, malformed for source routes,
# routing headers and length mismatches, spoofed_ip for VM sources from
# outside; any reason elsewhere).
#
#   hv:    br0 02:00:0a:64:00:01, 10.100.0.1/16, fec0:100::1/64, fe80::1 (no
#          other link-local), multicast snooping off, bridge netfilter off,
#          accept_source_route on (so that the control carries LSRR).
#          Ports tap-a1, tap-a2, tap-b1, tap-s1 (veth host ends). Forwarding on.
#          wan0  -> netns wan  P 198.51.100.2, 2001:db8:100::2 (WAN; udp/53
#                               echo, tcp/80)
#          wanq0 -> netns wanq Q 203.0.113.2, 2001:db8:200::2 (WAN)
#          adm0  -> netns adm    192.0.2.2, 2001:db8:300::2 (admin, not WAN)
#   a1 10.100.1.2 fec0:100::102  group tenant-a   filtered; egress udp/53 and
#   a2 10.100.1.3 fec0:100::103  group tenant-a   tcp/80 to P (v4+v6); a1 also
#   b1 10.100.2.2 fec0:100::202  group tenant-b   ingress tcp/22 from P's and
#                                                 Q's networks, 10.0.0.0/8 and
#                                                 fec0::/10 (so that the host's
#                                                 nftables WAN chain passes the
#                                                 spoofed SYNs of case 4 and the
#                                                 TAP program must stop them)
#   s1 10.100.3.2 fec0:100::302  group s1  sampled, sample_rate 1.0; egress
#                                          tcp/80 to P, ingress tcp/22 from any
#   Gateways of every VM: 10.100.0.1, fec0:100::1, fe80::1. on_violation alert.
#
# Cases (issue 8 numbering): 1 link-local control traffic that is not
# link-local, ARP between tenants, oversize ARP/ND; 2 ICMP errors as a
# carrier; 3 ND options and link-local ownership; 4 trust by source address
# toward a VM; 5 VLAN tags; 7 sampled mode and source ports; 9 parser (source
# routes, routing headers, truncated frames, fragments). Legit traffic (TCP/UDP
# to allowed peers, ND/ARP with the gateway, a correct ICMP error, same-group
# traffic) must keep passing in both runs.
#
# Needs root. NO_VMFENCE=1: topology only (every hostile frame must arrive).
# HOSTILE_CONTROL=0 (or E2E_CONTROL=0): skip the background control run. HIT_WAIT=S: see below.
set -u
. "$(dirname "$0")/lib.sh"
E2E_CONTROL_MODE=bg
[ "${HOSTILE_CONTROL:-1}" = 0 ] && E2E_CONTROL=0

HOSTILE=$E2E_DIR/hostile
# Seconds a frame has to show up at the receiver. Frames arrive within ~25 ms
# here (control run); a frame that arrives later still fails the test: the
# late-arrival sweep at the end greps every capture again for every token.
HIT_WAIT=${HIT_WAIT:-0.5}

e2e_init hostile
for f in cap.py tx.py frames.py; do
	[ -f "$HOSTILE/$f" ] || fatal "missing $HOSTILE/$f"
done

# The control run (lib.sh): this script again with NO_VMFENCE=1 (its own
# prefix and namespaces), started by e2e_init in the background
# (E2E_CONTROL_MODE=bg) while this run goes on; e2e_finish prints its output,
# counts its result and checks that every frame blocked here arrived there.
declare -A IP4=([a1]=10.100.1.2 [a2]=10.100.1.3 [b1]=10.100.2.2 [s1]=10.100.3.2)
declare -A IP6=([a1]=fec0:100::102 [a2]=fec0:100::103 [b1]=fec0:100::202 [s1]=fec0:100::302)
declare -A MAC=([a1]=02:00:0a:64:01:02 [a2]=02:00:0a:64:01:03 [b1]=02:00:0a:64:02:02 [s1]=02:00:0a:64:03:02)
VMS="a1 a2 b1 s1"
BR_MAC=02:00:0a:64:00:01
P4=198.51.100.2 P6=2001:db8:100::2 Q4=203.0.113.2 Q6=2001:db8:200::2
FLOW_SPORT=40001

section topology
hv_add
nsx hv sysctl -qw net.ipv4.conf.all.accept_source_route=1 net.ipv4.conf.default.accept_source_route=1
# Bridged frames must reach the ports as sent (no br_netfilter sanity checks).
for k in iptables ip6tables arptables; do
	[ -e "/proc/sys/net/bridge/bridge-nf-call-$k" ] && nsx hv sysctl -qw "net.bridge.bridge-nf-call-$k=0"
done
ipn hv link add br0 address "$BR_MAC" type bridge mcast_snooping 0
ipn hv link set br0 addrgenmode none
ipn hv link set br0 up
ipn hv addr add 10.100.0.1/16 dev br0
ipn hv addr add fec0:100::1/64 dev br0 nodad
ipn hv addr add fe80::1/64 dev br0 nodad
nsx hv sysctl -qw net.ipv4.conf.br0.accept_source_route=1
for vm in $VMS; do
	vm_add "$vm" "tap-$vm" "${MAC[$vm]}"
	bridge_port br0 "tap-$vm"
	ipn "$vm" addr add "${IP4[$vm]}/16" dev eth0
	ipn "$vm" addr add "${IP6[$vm]}/64" dev eth0 nodad
	ipn "$vm" route add default via 10.100.0.1
	ipn "$vm" -6 route add default via fe80::1 dev eth0
	serve_tcp "$vm" 22
done
serve_udp a2 5000
wan_add wan wan0 198.51.100.1/24 "$P4/24" 2001:db8:100::1/64 "$P6/64"
wan_add wanq wanq0 203.0.113.1/24 "$Q4/24" 2001:db8:200::1/64 "$Q6/64"
wan_add adm adm0 192.0.2.1/24 192.0.2.2/24 2001:db8:300::1/64 2001:db8:300::2/64
serve_udp wan 53
serve_tcp wan 80
for vm in $VMS; do wait_listen "$vm" 22; done
wait_listen a2 5000 udp; wait_listen wan 53 udp; wait_listen wan 80
for vm in $VMS; do # link-locals past DAD
	for i in $(seq 50); do
		ipn "$vm" -6 addr show dev eth0 | grep -q tentative || break
		sleep 0.1
	done
done

# Captures: one per receiving interface, keyed NS/IFACE.
CAP=$WORK/cap
mkdir -p "$CAP"
CAPS="a1/eth0 a2/eth0 b1/eth0 hv/br0 wan/eth0 wanq/eth0"
for c in $CAPS; do
	spawn "${c%/*}" "$PY" -u "$HOSTILE/cap.py" "${c#*/}" "$CAP/${c/\//_}.hex"
done
for c in $CAPS; do
	for _ in $(seq 50); do [ -e "$CAP/${c/\//_}.hex.ready" ] && break; sleep 0.1; done
	[ -e "$CAP/${c/\//_}.hex.ready" ] || fatal "capture on $c did not start"
done

# The frames (tokens are per run).
FR=$WORK/frames
cat >"$WORK/topo.json" <<EOF
{"br_mac": "$BR_MAC", "gw4": "10.100.0.1", "gw6": "fec0:100::1", "gwll": "fe80::1",
 "p4": "$P4", "p6": "$P6", "q4": "$Q4", "q6": "$Q6", "flow_sport": $FLOW_SPORT,
 "wan_mac": "$(mac_of wan eth0)", "wan_hv_mac": "$(mac_of hv wan0)",
 "adm_mac": "$(mac_of adm eth0)", "adm_hv_mac": "$(mac_of hv adm0)",
 "vms": {$(for vm in $VMS; do printf '"%s": {"mac": "%s", "ip4": "%s", "ip6": "%s"},' "$vm" "${MAC[$vm]}" "${IP4[$vm]}" "${IP6[$vm]}"; done | sed 's/,$//')}}
EOF
"$PY" "$HOSTILE/frames.py" "$WORK/topo.json" "$FR" || fatal "hostile/frames.py failed"
declare -A F_NS F_IF F_TOK
while read -r name ns ifc tok; do
	F_NS[$name]=$ns F_IF[$name]=$ifc F_TOK[$name]=$tok
done <"$FR/manifest"
say "$(wc -l <"$FR/manifest") frames built"

# hit NAME POINT...: send frame train NAME from its namespace; true when its
# token shows up in the capture of one of the POINTs (NS/IFACE) within
# HIT_WAIT seconds (hostile/tx.py sends and watches). A send error is a test
# failure (never a "block").
hit() {
	local name=$1 p rc out
	shift
	SNAP_OK=0
	[ -n "${F_TOK[$name]:-}" ] || { _fail "test bug: no frame $name"; return 1; }
	local caps=()
	for p in "$@"; do caps+=("$CAP/${p/\//_}.hex"); done
	out=$(nsx "${F_NS[$name]}" "$PY" "$HOSTILE/tx.py" "${F_IF[$name]}" "$FR/$name.hex" \
		"${F_TOK[$name]}" "$HIT_WAIT" "${caps[@]}" 2>&1)
	rc=$?
	case $rc in
	0) [ "${E2E_VERBOSE:-0}" = 1 ] && say "    $name arrived: $out"; return 0 ;;
	1) return 1 ;;
	*) _fail "sending $name from ${F_NS[$name]} failed: $out"; return 1 ;;
	esac
}

# Drop counters from `vmfence status --json` (sum over reasons with "any").
# SNAP is the status after the previous hostile case; it serves as the
# "before" of the next one while nothing else ran in between (SNAP_OK=1).
SNAP="" SNAP_OK=0
snap() {
	enforced || return 0
	[ "$SNAP_OK" = 1 ] || SNAP=$(vmf status --json 2>/dev/null)
	return 0
}
# drop_delta VM[,VM...] REASON: how much drops.REASON of those VMs grew since
# snap (a frame between two VMs may be dropped at either TAP): sets DELTA to
# that growth and DELTA_REASONS to the reasons that grew ("vm:reason+n").
drop_delta() {
	local now
	now=$(vmf status --json 2>/dev/null)
	local res
	res=$("$PY" -c '
import json, sys
vms, reason = sys.argv[1].split(","), sys.argv[2]
def drops(text):
    d = {}
    try:
        for v in json.loads(text)["vms"]:
            if v["name"] in vms:
                for k, n in v.get("drops", {}).items():
                    key = k if len(vms) == 1 else "%s:%s" % (v["name"], k)
                    d[key] = n
    except Exception:
        pass
    return d
a, b = drops(sys.argv[3]), drops(sys.argv[4])
grew = {k: b[k] - a.get(k, 0) for k in b if b[k] != a.get(k, 0)}
d = sum(n for k, n in grew.items() if reason == "any" or k.split(":")[-1] == reason)
print(d, ",".join("%s+%d" % kv for kv in sorted(grew.items())) or "none")
' "$1" "$2" "$SNAP" "$now")
	DELTA=${res%% *}
	DELTA_REASONS=${res#* }
	SNAP=$now SNAP_OK=1
}

# hostile DESC NAME VMS REASON POINT...: NAME must not reach any POINT under
# vmfence (and must reach one without it); under vmfence, the drop counter for
# REASON ("any": any reason) of one of VMS (comma-separated) must have grown.
hostile() {
	local d=$1 name=$2 vm=$3 reason=$4 before=$E2E_FAIL
	shift 4
	snap
	local keep=$SNAP_OK
	expect_blocked "$d" hit "$name" "$@"
	SNAP_OK=$keep
	enforced || return 0
	if [ "$E2E_FAIL" != "$before" ]; then
		SNAP_OK=0
		say "     (counter check skipped: frame not blocked)"
		return 0
	fi
	echo "$name $*" >>"$WORK/blocked.list"
	DELTA=0 DELTA_REASONS=none
	drop_delta "$vm" "$reason"
	if [ "${DELTA:-0}" -gt 0 ] 2>/dev/null; then
		_pass "  ... counted: $vm drops $DELTA_REASONS"
	else
		_fail "  ... $name dropped but $vm's drops.$reason did not grow (grew: $DELTA_REASONS)"
	fi
}

# unpoison: forget every neighbour entry on the shared link. In the control
# run the hostile ARP/NA frames really do rewrite the host's and the VMs'
# caches (that is what they are for); later cases need clean ones.
unpoison() {
	local vm
	SNAP_OK=0
	ipn hv neigh flush dev br0 2>/dev/null
	for vm in $VMS; do ipn "$vm" neigh flush dev eth0 2>/dev/null; done
	return 0
}

# legit DESC NAME POINT...: a crafted frame that must arrive in both runs.
legit() {
	local d=$1 name=$2
	shift 2
	expect_ok "$d" hit "$name" "$@"
}

section config
write_host '{ "wan_interfaces": ["wan0", "wanq0"],
  "on_violation": { "action": "alert", "threshold": 1000, "window_ms": 1000 } }'
EG="{ \"to\": \"$P4/32\", \"proto\": \"udp\", \"ports\": [\"53\"] }, { \"to\": \"$P4/32\", \"proto\": \"tcp\", \"ports\": [\"80\"] },
  { \"to\": \"$P6/128\", \"proto\": \"udp\", \"ports\": [\"53\"] }, { \"to\": \"$P6/128\", \"proto\": \"tcp\", \"ports\": [\"80\"] }"
vm_json() { # NAME GROUP EXTRA
	write_vm "$1" "{
  \"name\": \"$1\", \"interface\": \"tap-$1\", \"mac\": \"${MAC[$1]}\",
  \"addresses\": [\"${IP4[$1]}/32\", \"${IP6[$1]}/128\"],
  \"gateway\": [\"10.100.0.1\", \"fec0:100::1\", \"fe80::1\"], \"group\": \"$2\"$3
}"
}
vm_json a1 tenant-a ", \"egress\": [$EG],
  \"ingress\": [ { \"from\": \"198.51.100.0/24\", \"proto\": \"tcp\", \"ports\": [\"22\"] },
                 { \"from\": \"10.0.0.0/8\", \"proto\": \"tcp\", \"ports\": [\"22\"] },
                 { \"from\": \"fec0::/10\", \"proto\": \"tcp\", \"ports\": [\"22\"] },
                 { \"from\": \"203.0.113.0/24\", \"proto\": \"tcp\", \"ports\": [\"22\"] },
                 { \"from\": \"2001:db8:100::/64\", \"proto\": \"tcp\", \"ports\": [\"22\"] } ]"
vm_json a2 tenant-a ", \"egress\": [$EG]"
vm_json b1 tenant-b ", \"egress\": [$EG]"
vm_json s1 s1 ", \"mode\": \"sampled\", \"sample_rate\": 1.0,
  \"egress\": [ { \"to\": \"$P4/32\", \"proto\": \"tcp\", \"ports\": [\"80\"] } ],
  \"ingress\": [ { \"from\": \"0.0.0.0/0\", \"proto\": \"tcp\", \"ports\": [\"22\"] },
                 { \"from\": \"::/0\", \"proto\": \"tcp\", \"ports\": [\"22\"] } ]"
if enforced; then
	vmf check --config "$CONF" >"$WORK/check.log" 2>&1 || { cat "$WORK/check.log"; fatal "vmfence check rejects the test config"; }
fi
start_daemon

# ---------------------------------------------------------------------------
section "legit traffic (must pass in both runs)"
expect_ok "a1 -> P udp/53 over IPv4 (egress rule)" udp_probe a1 "$P4" 53
expect_ok "a1 -> P udp/53 over IPv6 (egress rule)" udp_probe a1 "$P6" 53
expect_ok "a1 -> P tcp/80 over IPv4" tcp_probe a1 "$P4" 80
expect_ok "a1 -> P tcp/80 over IPv6" tcp_probe a1 "$P6" 80
expect_ok "a1 -> a2 tcp/22 over IPv4 (same group)" tcp_probe a1 "${IP4[a2]}" 22
expect_ok "a2 -> a1 tcp/22 over IPv6 (same group)" tcp_probe a2 "${IP6[a1]}" 22
expect_ok "a1 -> a2 udp/5000 over IPv6 (same group)" udp_probe a1 "${IP6[a2]}" 5000
expect_ok "P -> a1 tcp/22 (ingress rule)" tcp_probe wan "${IP4[a1]}" 22
expect_ok "P -> a1 tcp/22 over IPv6 (ingress rule)" tcp_probe wan "${IP6[a1]}" 22
expect_ok "Q -> s1 tcp/22 (sampled VM, ingress rule): its replies from sport 22 pass" tcp_probe wanq "${IP4[s1]}" 22
expect_ok "s1 -> P tcp/80 (sampled VM, egress rule)" tcp_probe s1 "$P4" 80
expect_ok "a1 resolved its IPv4 gateway 10.100.0.1 (ARP)" neigh_resolved a1 eth0 10.100.0.1
expect_ok "a1 resolved its IPv6 gateway fe80::1 (ND)" neigh_resolved a1 eth0 fe80::1
ping_probe a1 fec0:100::1 >/dev/null 2>&1  # no egress rule for it; ND must work all the same
expect_ok "a1 resolved its IPv6 gateway fec0:100::1 (ND)" neigh_resolved a1 eth0 fec0:100::1
expect_ok "the host resolved a1's fec0:100::102 (its NS reached a1, a1's NA came back)" neigh_resolved hv br0 "${IP6[a1]}"
legit "crafted: a1 -> a2 udp (same group) arrives" ok_udp_a2 a2/eth0
legit "crafted: a1's ARP request for a2 (60 bytes) reaches a2" ok_arp_req_a2 a2/eth0
legit "crafted: a1's NS for a2 (solicited-node group) reaches a2" ok_ns a2/eth0
legit "crafted: a1's NS for the gateway fe80::1 reaches the host" ok_ns_gw_ll hv/br0
legit "crafted: a1's NA for its own address to ff02::1 reaches a2" ok_na a2/eth0
legit "crafted: a1's NS from a stable-privacy link-local (RFC 7217) reaches a2" ok_ns_stable_privacy a2/eth0
legit "crafted: a1 -> P:53 udp from sport $FLOW_SPORT (opens the flow) arrives" ok_udp4_flow wan/eth0
legit "crafted: a1 -> P:53 udp over IPv6 from sport $FLOW_SPORT (opens the flow) arrives" ok_udp6_flow wan/eth0
legit "crafted: a1 -> P port-unreachable quoting the flow (small, to its peer) arrives" ok_icmp4_err wan/eth0
legit "crafted: a1 -> P ICMPv6 port-unreachable quoting the flow arrives" ok_icmp6_err wan/eth0
legit "crafted: a1 -> P:53 fragmented udp over IPv4 arrives (both fragments)" ok_frag4_p53 wan/eth0
legit "crafted: a1 -> P:53 fragmented udp over IPv6 arrives (both fragments)" ok_frag6_p53 wan/eth0
legit "crafted: a1 -> P:53 fragmented udp over IPv6, dest options after the fragment header, arrives" ok_frag6_destopt_p53 wan/eth0

# ---------------------------------------------------------------------------
section "1. link-local control traffic that is not link-local"
hostile "a1's NS to a remote global address (P) is not ND" ns_remote a1 any wan/eth0
hostile "a1's NA to a remote global address (P) is not ND" na_remote a1 any wan/eth0
hostile "a1's RS to a remote global address (P) is not ND" rs_remote a1 any wan/eth0
hostile "a1's MLDv2 report to P (hop limit 64) is not MLD" mld2_remote a1 any wan/eth0
hostile "a1's MLDv2 report to the gateway's unicast address is not MLD" mld2_gw_unicast a1 any hv/br0
hostile "a1's MLDv1 report to the gateway's unicast address is not MLD" mld1_gw_unicast a1 any hv/br0
hostile "a1's IGMP report to the gateway's unicast address is not IGMP" igmp_gw_unicast a1 any hv/br0
hostile "a1's IGMP report to P (TTL 64) is not IGMP" igmp_remote a1 any wan/eth0
hostile "a1's NS with 1 KB of options to a2's solicited-node group" ns_oversize a1,a2 any a2/eth0 hv/br0
hostile "a1's NA with 1 KB of options to ff02::1" na_oversize a1,a2 any a2/eth0 hv/br0
hostile "host's NS with 1 KB of options toward a1" ns_oversize_to_a1 a1 any a1/eth0
hostile "a2's MLD report (ff02::16) does not reach a1" a2_mld2_report a1,a2 any a1/eth0
hostile "a2's router solicitation (ff02::2) does not reach a1" a2_rs a1,a2 any a1/eth0
hostile "tenant A's ARP request for b1 does not reach b1 (shared bridge)" arp_req_b1 a1,b1 any b1/eth0
hostile "tenant A's unicast ARP reply to b1 does not reach b1" arp_rep_b1 a1,b1 any b1/eth0
hostile "tenant A's gratuitous ARP does not reach b1" arp_garp_bcast a1,b1 any b1/eth0
hostile "a1's 200-byte ARP request for a2 (> 60 bytes)" arp_oversize_a2 a1,a2 any a2/eth0
hostile "a1's 200-byte ARP request for the gateway" arp_oversize_gw a1 any hv/br0
hostile "host's 200-byte ARP request toward a1" arp_oversize_to_a1 a1 any a1/eth0

# ---------------------------------------------------------------------------
unpoison
section "2. ICMP errors as a carrier (flow a1:$FLOW_SPORT -> P:53 is live)"
hostile "a1's port-unreachable quoting the flow, sent to Q instead of P" icmp4_err_to_q a1 any wanq/eth0
hostile "a1's ICMPv6 port-unreachable quoting the flow, sent to Q" icmp6_err_to_q a1 any wanq/eth0
hostile "a1's port-unreachable to P of 962 bytes (> 576)" icmp4_err_oversize a1 any wan/eth0
hostile "a1's ICMPv6 port-unreachable to P of 1402 bytes (> 1280)" icmp6_err_oversize a1 any wan/eth0
hostile "a1's port-unreachable to P quoting a flow that does not exist" icmp4_err_no_flow a1 any wan/eth0

# ---------------------------------------------------------------------------
section "3. ND options and link-local ownership"
hostile "a1's NA whose 9th option is a target link-layer address of another MAC" na_opt9_foreign a1,a2 any a2/eth0 hv/br0
hostile "a1's NS whose 9th option is a source link-layer address of another MAC" ns_opt9_foreign a1,a2 any a2/eth0
hostile "a1's 64-byte NS whose 5th option is a foreign source link-layer address" ns_opt5_foreign a1,a2 any a2/eth0
hostile "a1's NA whose 2nd option is a foreign target link-layer address" na_opt2_foreign a1,a2 any a2/eth0 hv/br0
hostile "a1's NA claiming the gateway's link-local fe80::1" na_gw_ll a1,a2 any a2/eth0 hv/br0
hostile "a1's NA claiming a2's EUI-64 link-local" na_a2_ll a1,a2 any a2/eth0 hv/br0
hostile "a1's NA claiming b1's EUI-64 link-local" na_b1_ll a1,a2 any a2/eth0 hv/br0
hostile "a1's NS from the gateway's link-local fe80::1" ns_src_gw_ll a1,a2 any a2/eth0
hostile "a1's NS from a2's link-local" ns_src_a2_ll a1,a2 any a2/eth0
hostile "a1's NS with a zero-length option" ns_zero_len_opt a1,a2 any a2/eth0
hostile "a1's NS whose last option runs past the end" ns_unterminated_opt a1,a2 any a2/eth0

# ---------------------------------------------------------------------------
unpoison
section "4. trust by source address toward a VM"
hostile "from the WAN, claiming a2 (a1's group), to a1" wan_spoof4_a2_to_a1 a1 spoofed_ip a1/eth0
hostile "from the WAN, claiming a1 itself, to a1" wan_spoof4_a1_to_a1 a1 spoofed_ip a1/eth0
hostile "from the WAN over IPv6, claiming a2, to a1" wan_spoof6_a2_to_a1 a1 spoofed_ip a1/eth0
hostile "from the WAN over IPv6, claiming a1 itself, to a1" wan_spoof6_a1_to_a1 a1 spoofed_ip a1/eth0
hostile "from the admin network, claiming a2, to a1" adm_spoof4_a2_to_a1 a1 any a1/eth0
hostile "from the admin network, claiming a1 itself, to a1" adm_spoof4_a1_to_a1 a1 any a1/eth0
hostile "from the admin network over IPv6, claiming a2, to a1" adm_spoof6_a2_to_a1 a1 any a1/eth0
hostile "from the admin network over IPv6, claiming a1 itself, to a1" adm_spoof6_a1_to_a1 a1 any a1/eth0

# ---------------------------------------------------------------------------
section "5. VLAN tags on a shared bridge"
hostile "a1 -> a2 (same group) single-tagged 802.1Q" vlan1_a2 a1,a2 bad_ethertype a2/eth0
hostile "a1 -> a2 double-tagged 802.1ad + 802.1Q" vlan2_a2 a1,a2 bad_ethertype a2/eth0
hostile "a1 -> a2 IPv6 single-tagged" vlan1_v6_a2 a1,a2 bad_ethertype a2/eth0
hostile "a1's single-tagged ARP request for a2" vlan1_arp_a2 a1,a2 bad_ethertype a2/eth0
hostile "host -> a1 single-tagged" vlan1_to_a1 a1 bad_ethertype a1/eth0

# ---------------------------------------------------------------------------
section "7. sampled mode: a source port an ingress rule allows is not a reply"
hostile "s1 (sampled 1.0): SYN from sport 22 to Q:9999" s1_sport22_syn_q s1 any wanq/eth0
hostile "s1 (sampled 1.0): SYN-ACK from sport 22 to Q:9999" s1_sport22_synack_q s1 any wanq/eth0
hostile "s1 (sampled 1.0): SYN-ACK from sport 22 to P:9999" s1_sport22_synack_p s1 any wan/eth0
hostile "s1 (sampled 1.0): udp from sport 22 to Q:9999" s1_sport22_udp_q s1 any wanq/eth0
hostile "a1 (filtered): SYN-ACK from sport 22 to Q:9999" a1_sport22_synack_q a1 any wanq/eth0
hostile "a1 (filtered): SYN-ACK from sport 22 to P:9999" a1_sport22_synack_p a1 any wan/eth0

# ---------------------------------------------------------------------------
section "9. parser"
hostile "a1 -> P:53 (allowed) with an IPv4 LSRR option" lsrr_p a1 malformed wan/eth0 wanq/eth0
hostile "a1 -> a2 (same group) with an IPv4 LSRR option" lsrr_a2 a1,a2 malformed a2/eth0
hostile "a1 -> a2 (same group) with an IPv4 SSRR option" ssrr_a2 a1,a2 malformed a2/eth0
hostile "a1 -> P:53 with a type 0 routing header, segments left 1" rh0_p a1 malformed wan/eth0 wanq/eth0
hostile "a1 -> P:53 with a segment routing header (type 4), segments left 1" rh4_p a1 malformed wan/eth0 wanq/eth0
hostile "a1 -> a2 IPv4 total length 400, frame carries ~130 bytes" trunc4_a2 a1,a2 malformed a2/eth0
hostile "a1 -> a2 IPv6 payload length 400, frame carries ~110 bytes" trunc6_a2 a1,a2 malformed a2/eth0
hostile "a1 -> a2 IPv4 with 406 bytes after the IP packet (frame > 60)" trailer4_a2 a1,a2 malformed a2/eth0
hostile "a1 -> a2 IPv6 with 406 bytes after the IP packet" trailer6_a2 a1,a2 malformed a2/eth0
hostile "a1 -> P:9999 atomic fragment with dest options after the fragment header" frag6_atomic_destopt_p9999 a1 any wan/eth0
hostile "a1 -> P:9999 fragments: dest options in the first, the UDP header only in the second" frag6_l4_in_second_p9999 a1 any wan/eth0

# ---------------------------------------------------------------------------
unpoison
section "still healthy after the attacks"
expect_ok "a1 -> P udp/53 still works" udp_probe a1 "$P4" 53
expect_ok "a1 -> a2 tcp/22 still works" tcp_probe a1 "${IP4[a2]}" 22
expect_ok "P -> a1 tcp/22 over IPv6 still works" tcp_probe wan "${IP6[a1]}" 22
if enforced; then
	expect_ok "the daemon is still running" kill -0 "$DAEMON_PID"
	for vm in $VMS; do
		expect_ok "$vm not quarantined" test "$(vmf status --json | "$PY" -c '
import json, sys
print(next((v["quarantined"] for v in json.load(sys.stdin)["vms"] if v["name"] == sys.argv[1]), "NA"))' "$vm")" = False
	done
fi
# late_arrivals: every hostile frame counted as blocked must still be absent
# from its receivers' captures now (not merely absent for HIT_WAIT seconds).
late_arrivals() {
	enforced || return 0
	[ -s "$WORK/blocked.list" ] || return 0
	local out
	out=$("$PY" - "$FR/manifest" "$WORK/blocked.list" "$CAP" <<'PYEOF'
import sys
tok = {l.split()[0]: l.split()[3] for l in open(sys.argv[1]) if l.strip()}
late = []
for line in open(sys.argv[2]):
    name, *points = line.split()
    for p in points:
        with open("%s/%s.hex" % (sys.argv[3], p.replace("/", "_"))) as f:
            if tok[name] in f.read():
                late.append("%s at %s" % (name, p))
print("\n".join(late))
PYEOF
)
	if [ -n "$out" ]; then
		_fail "hostile frames counted as blocked arrived later:"
		echo "$out" | sed 's/^/    | /'
	else
		_pass "late-arrival sweep: no blocked hostile frame reached its receiver afterwards ($(wc -l <"$WORK/blocked.list") frames)"
	fi
}
late_arrivals
e2e_finish
