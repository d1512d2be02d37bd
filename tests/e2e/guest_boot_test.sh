#!/usr/bin/env bash
# End-to-end with a real guest: no false violations (issue 8, item 8). QEMU
# (TCG) boots a Linux guest (tests/guest/microvm.sh) whose NIC is a real TAP in
# the hypervisor namespace, at on_violation terminate, threshold 1. The guest
# lives an ordinary life: stable-privacy link-local (addr_gen_mode=3) and
# privacy addresses (use_tempaddr=2) after a link down/up, its kernel's own
# DAD / RS / MLD reports, SLAAC from a router advertisement (sent by scapy from
# the hypervisor, prefix = the /64 of the VM's IPv6 address), a DHCP client
# (udhcpc), an ARP probe (arping -D) for an address that is not its own, mDNS
# (224.0.0.251, ff02::fb), LLMNR (224.0.0.252, ff02::1:3), SSDP
# (239.255.255.250), a DHCPv6-style datagram to ff02::1:2, ping of the gateway
# (IPv4, and IPv6 from its spec address), IPv6 from its privacy address, and a
# TCP connection to an allowed server.
#   Assert: the guest is not terminated (no marker, QEMU exits normally with
#   the script's status), its allowed TCP and pings worked, and the noise is
#   counted under link_local / unassigned_src with zero violations.
# Positive control: the same guest, booted again, opens TCP to a port no rule
# allows: the terminate command runs (it sends QMP `quit`) and QEMU stops
# mid-script.
#
# The guest's UDP sender: busybox has no UDP client, so a tiny static C program
# (udpx, built here with gcc -static) rides in the guest script as base64.
#
# Topology: hv (TAP vmb-tap: 10.61.0.1/32 + fd00:61::1/128, proxy_arp, host
#   routes to the guest 10.61.0.2/32 and fd00:61::2/128), wan0 198.51.100.1/24 ->
#   netns "cons" 198.51.100.2 with TCP 443 (allowed) and TCP 9999 (not).
# Control: NO_VMFENCE=1 boots the same guest without vmfence: the script runs to
#   the end (its IPv6 from the privacy address works too), and the "violation"
#   run is not stopped.
set -u
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/modes_lib.sh"
. "$(dirname "$0")/noise_lib.sh"
e2e_init guest_boot

HARNESS=$(cd "$(dirname "$0")/../guest" && pwd)/microvm.sh
command -v qemu-system-x86_64 >/dev/null || fatal "qemu-system-x86_64 missing (scripts/install-deps.sh)"
command -v gcc >/dev/null || fatal "gcc missing (the guest's UDP sender is built with gcc -static)"
[ -e /dev/net/tun ] || fatal "/dev/net/tun missing"

CONS=198.51.100.2
GUEST=10.61.0.2
GUEST6=fd00:61::2
GW=10.61.0.1
GW6=fd00:61::1
MAC=02:00:00:61:00:02
VM=$PFX-guest
TAP=vmb-tap
QMP=$WORK/qmp-$VM.sock

section "guest image and the guest's UDP sender"
"$HARNESS" build >"$WORK/guest-build.log" 2>&1 || { tail -20 "$WORK/guest-build.log"; fatal "guest build failed"; }
_pass "guest kernel + initramfs ready"
cat >"$WORK/udpx.c" <<'EOF'
/* udpx DST PORT [IFNAME] [PAYLOAD] [SPORT]: one UDP datagram, IPv4 or IPv6
 * (multicast: out of IFNAME, which is also the IPv6 scope). Exit 0 when sent. */
#include <arpa/inet.h>
#include <net/if.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
int main(int argc, char **argv) {
	if (argc < 3) { fprintf(stderr, "usage: udpx DST PORT [IFNAME] [PAYLOAD] [SPORT]\n"); return 2; }
	const char *pl = argc > 4 ? argv[4] : "udpx";
	unsigned ifi = argc > 3 && argv[3][0] ? if_nametoindex(argv[3]) : 0;
	int port = atoi(argv[2]), sport = argc > 5 ? atoi(argv[5]) : 0, fd, one = 1, r;
	if (strchr(argv[1], ':')) {
		struct sockaddr_in6 a = { .sin6_family = AF_INET6, .sin6_port = htons(port), .sin6_scope_id = ifi };
		struct sockaddr_in6 b = { .sin6_family = AF_INET6, .sin6_port = htons(sport) };
		if (inet_pton(AF_INET6, argv[1], &a.sin6_addr) != 1) return 2;
		fd = socket(AF_INET6, SOCK_DGRAM, 0);
		setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		if (sport && bind(fd, (struct sockaddr *)&b, sizeof(b))) { perror("udpx: bind"); return 1; }
		if (ifi) setsockopt(fd, IPPROTO_IPV6, IPV6_MULTICAST_IF, &ifi, sizeof(ifi));
		r = sendto(fd, pl, strlen(pl), 0, (struct sockaddr *)&a, sizeof(a));
	} else {
		struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
		struct sockaddr_in b = { .sin_family = AF_INET, .sin_port = htons(sport) };
		if (inet_pton(AF_INET, argv[1], &a.sin_addr) != 1) return 2;
		fd = socket(AF_INET, SOCK_DGRAM, 0);
		setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		setsockopt(fd, SOL_SOCKET, SO_BROADCAST, &one, sizeof(one));
		if (sport && bind(fd, (struct sockaddr *)&b, sizeof(b))) { perror("udpx: bind"); return 1; }
		if (ifi) { struct ip_mreqn m = { .imr_ifindex = (int)ifi }; setsockopt(fd, IPPROTO_IP, IP_MULTICAST_IF, &m, sizeof(m)); }
		r = sendto(fd, pl, strlen(pl), 0, (struct sockaddr *)&a, sizeof(a));
	}
	if (r < 0) { perror("udpx: sendto"); return 1; }
	return 0;
}
EOF
gcc -static -Os -s -o "$WORK/udpx" "$WORK/udpx.c" 2>"$WORK/udpx.err" ||
	{ cat "$WORK/udpx.err"; fatal "gcc -static udpx failed (glibc static libraries: libc6-dev)"; }
_pass "udpx built ($(stat -c %s "$WORK/udpx") bytes)"

section topology
hv_add
ip -n "$HV" tuntap add dev "$TAP" mode tap || fatal "tuntap"
tap_setup() {
	ipn hv link set "$TAP" up
	ipn hv addr add "$GW/32" dev "$TAP"
	ipn hv addr add "$GW6/128" dev "$TAP" nodad
	nsx hv sysctl -qw "net.ipv4.conf.$TAP.proxy_arp=1"
	ipn hv route add "$GUEST/32" dev "$TAP"
	ipn hv -6 route add "${GUEST6%::*}::/64" dev "$TAP"   # the VM's /64 (SLAAC addresses too)
}
tap_setup
wan_add cons wan0 198.51.100.1/24 "$CONS/24"
serve_tcp cons 443
serve_tcp cons 9999
wait_listen cons 443
wait_listen cons 9999

# The terminate command: a marker, then QMP `quit` to the VM's QEMU.
cat >"$WORK/term.sh" <<EOF
#!/bin/sh
{ echo "argv=\$*"; env | grep '^VMFENCE_' | sort; } >>"$WORK/terminated-\$1"
[ -S "$WORK/qmp-\$1.sock" ] &&
	printf '%s\n' '{"execute":"qmp_capabilities"}' '{"execute":"quit"}' |
	timeout 5 socat -t 2 - "UNIX-CONNECT:$WORK/qmp-\$1.sock" >/dev/null 2>&1
exit 0
EOF
chmod +x "$WORK/term.sh"
write_host "{ \"on_violation\": { \"action\": \"terminate\", \"command\": [\"$WORK/term.sh\", \"{vm}\"],
  \"threshold\": 1, \"window_ms\": 1000 } }"
write_vm "$VM" "{
  \"name\": \"$VM\", \"interface\": \"$TAP\", \"mac\": \"$MAC\",
  \"addresses\": [\"$GUEST/32\", \"$GUEST6/128\"], \"gateway\": [\"$GW\", \"$GW6\"],
  \"egress\": [ { \"to\": \"$CONS/32\", \"proto\": \"tcp\", \"ports\": [\"443\"] },
              { \"to\": \"$GW/32\", \"proto\": \"icmp\" },
              { \"to\": \"$GW6/128\", \"proto\": \"icmpv6\" } ],
  \"on_violation\": { \"action\": \"terminate\", \"threshold\": 1 }
}"
start_daemon

# Router advertisements from the hypervisor end of the TAP, every 2 s while
# the test runs: prefix fd00:61::/64 (on-link, autonomous), source = the
# TAP's link-local (it exists once QEMU holds the TAP).
spawn hv "$PY" -u -c '
import logging, sys, time
logging.getLogger("scapy.runtime").setLevel(logging.ERROR)
from scapy.all import *
conf.verb = 0
tap, prefix = sys.argv[1], sys.argv[2]
def linklocal():
    for l in open("/proc/net/if_inet6"):
        f = l.split()
        if f[5] == tap and f[3] == "20" and not int(f[4], 16) & 0x40:   # scope link, not tentative
            return ":".join(f[0][i:i + 4] for i in range(0, 32, 4))
end = time.time() + 600
while time.time() < end:
    ll = linklocal()
    if ll:
        try:
            mac = get_if_hwaddr(tap)
            sendp(Ether(src=mac, dst="33:33:00:00:00:01") / IPv6(src=ll, dst="ff02::1", hlim=255) /
                  ICMPv6ND_RA(routerlifetime=1800) / ICMPv6NDOptSrcLLAddr(lladdr=mac) /
                  ICMPv6NDOptPrefixInfo(prefix=prefix, prefixlen=64, L=1, A=1,
                                        validlifetime=86400, preferredlifetime=14400), iface=tap)
        except OSError:
            pass
    time.sleep(2)
' "$TAP" "fd00:61::"

# ----------------------------------------------------------- the guest life --

# guest_script FILE BODY: udpx (base64) + BODY as the guest's script.
guest_script() {
	{
		echo 'base64 -d >/tmp/udpx <<"UDPX_EOF"'
		base64 "$WORK/udpx"
		echo 'UDPX_EOF'
		echo 'chmod +x /tmp/udpx; export PATH=/tmp:$PATH'
		printf '%s\n' "$2"
	} >"$1"
}

guest_script "$WORK/life.sh" "$(cat <<EOF
fail=0
step() { echo "STEP \$* (uptime \$(cut -d' ' -f1 /proc/uptime))"; }
echo "guest up: \$(ip -4 -o addr show dev eth0 | awk '{print \$4}')"
# Stable-privacy link-local + privacy addresses, re-formed by a link bounce.
sysctl -qw net.ipv6.conf.eth0.addr_gen_mode=3 net.ipv6.conf.eth0.use_tempaddr=2 net.ipv6.conf.eth0.accept_ra=1
ip link set eth0 down; ip link set eth0 up
i=0; while [ ! -e /sys/class/net/eth0/carrier ] || [ "\$(cat /sys/class/net/eth0/carrier 2>/dev/null)" != 1 ]; do
	[ \$i -ge 50 ] && break; sleep 0.1; i=\$((i+1)); done
ip route replace default via \$VM_GW dev eth0 || echo "default route: failed"
ip -6 addr add $GUEST6/64 dev eth0      # with DAD (NS from ::)
# SLAAC from the hypervisor's RA: wait for a temporary (privacy) address
# (busybox ip shows IFA_F_TEMPORARY as "secondary").
step slaac
i=0; while ! ip -6 addr show dev eth0 | grep -q 'global secondary dynamic'; do
	[ \$i -ge 40 ] && break; sleep 0.5; i=\$((i+1)); done
ip -6 addr show dev eth0 | grep -q 'global secondary dynamic' && echo "slaac: temporary address formed" || echo "slaac: no temporary address"
i=0; while ip -6 addr show dev eth0 | grep -q tentative; do [ \$i -ge 20 ] && break; sleep 0.5; i=\$((i+1)); done
ip -6 addr show dev eth0 | awk '/inet6/ {\$1 = "addr6:"; print}'
ip -6 route show | sed 's/^/route6: /'
step dhcp; udhcpc -n -q -t 2 -T 1 -i eth0 2>&1 | sed 's/^/udhcpc: /'; echo "udhcpc rc=\$?"
step arp_probe; arping -D -c 1 -w 2 -I eth0 10.61.0.77 >/dev/null 2>&1; echo "arping -D rc=\$?"
step mdns; udpx 224.0.0.251 5353 eth0 mdns-query 5353; echo "mdns4 rc=\$?"
udpx ff02::fb 5353 eth0 mdns-query 5353; echo "mdns6 rc=\$?"
step llmnr; udpx 224.0.0.252 5355 eth0 llmnr-query; echo "llmnr4 rc=\$?"
udpx ff02::1:3 5355 eth0 llmnr-query; echo "llmnr6 rc=\$?"
step ssdp; udpx 239.255.255.250 1900 eth0 "M-SEARCH * HTTP/1.1"; echo "ssdp rc=\$?"
step dhcpv6; udpx ff02::1:2 547 eth0 dhcpv6-solicit 546; echo "dhcpv6 rc=\$?"
step ping_gw
if ping -c 2 -W 2 \$VM_GW >/dev/null 2>&1; then echo "allowed: ping gateway ok"; else echo "allowed: ping gateway FAILED"; fail=1; fi
if ping -6 -c 2 -W 2 -I $GUEST6 $GW6 >/dev/null 2>&1; then echo "allowed: ping6 gateway from $GUEST6 ok"
else echo "allowed: ping6 gateway from $GUEST6 FAILED"; fail=1; fi
step privacy_src
if ping -6 -c 1 -W 2 $GW6 >/dev/null 2>&1; then echo "privacy: ping6 from the default (temporary) source got through"
else echo "privacy: ping6 from the default (temporary) source dropped"; fi
step tcp
if nc -w 3 $CONS 443 </dev/null | grep -q vmfence-e2e; then echo "allowed: tcp/443 ok"; else echo "allowed: tcp/443 FAILED"; fail=1; fi
sleep 1
step done; echo "script finished fail=\$fail"
exit \$fail
EOF
)"

run_guest() { # SCRIPT OUT LOG: boots the guest, sets GUEST_RC and GUEST_SECS
	local t0=${EPOCHREALTIME/./}
	rm -f "$QMP"
	KV_QMP=$QMP KV_MAC=$MAC KV_TIMEOUT=120 KV_LOG="$3" \
		"$HARNESS" run "$HV" "$TAP" "$GUEST/24" "$GW" "$1" >"$2" 2>&1
	GUEST_RC=$?
	GUEST_SECS=$(_elapsed "$t0")
	say "guest exited rc=$GUEST_RC after $GUEST_SECS s"
	grep -v '^[A-Za-z0-9+/=]\{60,\}$' "$2" | sed 's/^/    guest| /' | head -60
}

section "the guest's ordinary life at threshold 1"
mark_log
run_guest "$WORK/life.sh" "$WORK/life.out" "$WORK/life-serial.log"
expect_ok "the script ran to its end (not terminated)" grep -q "^script finished" "$WORK/life.out"
expect_ok "QEMU exited normally with the script's status (rc=$GUEST_RC, want 0)" test "$GUEST_RC" = 0
expect_ok "the guest accepted the RA: a SLAAC privacy address formed" grep -q "slaac: temporary address formed" "$WORK/life.out"
expect_ok "the guest's link-local is not EUI-64 (stable privacy)" \
	sh -c "grep '^addr6: fe80::' '$WORK/life.out' | grep -vq 'ff:fe'"
expect_ok "udhcpc ran (sent DISCOVERs)" grep -qi "udhcpc: .*discover" "$WORK/life.out"
expect_ok "allowed: tcp/443 to the consumer worked" grep -q "allowed: tcp/443 ok" "$WORK/life.out"
expect_ok "allowed: ping of the gateway worked" grep -q "allowed: ping gateway ok" "$WORK/life.out"
expect_ok "allowed: ping6 of the gateway from the spec address worked" grep -q "allowed: ping6 gateway from $GUEST6 ok" "$WORK/life.out"
for s in mdns4 mdns6 llmnr4 llmnr6 ssdp dhcpv6; do
	expect_ok "the guest sent $s" grep -q "^$s rc=0" "$WORK/life.out"
done
if enforced; then
	expect_ok "IPv6 from the privacy address did not get through" grep -q "privacy: .* dropped" "$WORK/life.out"
	expect_ok "no terminate command ran" test ! -e "$(marker "$VM")"
	expect_ok "not quarantined" test "$(st_get "$VM" quarantined)" = 0
	say "drops: $(drops_json "$VM")"
	expect_ok "noise counted under link_local ($(st_get "$VM" drops.link_local))" test "$(num "$(st_get "$VM" drops.link_local)")" -gt 0
	expect_ok "privacy-source traffic counted under unassigned_src ($(st_get "$VM" drops.unassigned_src))" \
		test "$(num "$(st_get "$VM" drops.unassigned_src)")" -gt 0
	expect_ok "zero violation drops from the guest ($(violation_drops "$VM"))" test "$(violation_drops "$VM")" = 0
	expect_no_log "no violation from the guest logged" "violation vm=$VM reason=[a-z_]+ dir=from_vm"
	expect_no_log "no terminate action" "terminating vm="
	violations_match_log
else
	expect_ok "unenforced: IPv6 from the privacy address gets through" grep -q "privacy: .* got through" "$WORK/life.out"
fi

# --------------------------------------------------------- positive control --

section "control: the same guest, one real violation"
# A fresh TAP (a VM manager's restart): any quarantine is gone.
ipn hv link del "$TAP"
ip -n "$HV" tuntap add dev "$TAP" mode tap || fatal "tuntap"
tap_setup
if enforced; then
	vmf wait --vm "$VM" --timeout 10 >>"$WORK/wait.log" 2>&1 || fatal "VM not enforced on the new TAP"
fi
guest_script "$WORK/violate.sh" "$(cat <<EOF
echo "guest up"
if nc -w 3 $CONS 443 </dev/null | grep -q vmfence-e2e; then echo "allowed: tcp/443 ok"; else echo "allowed: tcp/443 FAILED"; fi
echo "violating: tcp/9999"
nc -w 2 $CONS 9999 </dev/null | grep -q vmfence-e2e && echo "violation got through"
i=0
while [ \$i -lt 25 ]; do echo "still running \$i"; sleep 1; i=\$((i+1)); done
echo "script finished"
EOF
)"
mark_log
run_guest "$WORK/violate.sh" "$WORK/violate.out" "$WORK/violate-serial.log"
expect_ok "the guest did its allowed TCP first" grep -q "allowed: tcp/443 ok" "$WORK/violate.out"
expect_ok "the guest reached the violation" grep -q "violating: tcp/9999" "$WORK/violate.out"
if enforced; then
	expect_ok "the terminate command ran" test -e "$(marker "$VM")"
	expect_ok "VMFENCE_REASON=egress_denied" grep -q '^VMFENCE_REASON=egress_denied$' "$(marker "$VM")"
	expect_fail "QEMU was stopped mid-script (no 'script finished')" grep -q "^script finished" "$WORK/violate.out"
	expect_ok "the harness saw no end marker (rc 125, got $GUEST_RC)" test "$GUEST_RC" = 125
	expect_fail "the violating connection did not get through" grep -q "violation got through" "$WORK/violate.out"
	expect_log "the violation was logged" "violation vm=$VM reason=egress_denied dir=from_vm .*dport=9999"
else
	expect_ok "unenforced: the violating connection gets through" grep -q "violation got through" "$WORK/violate.out"
	expect_ok "unenforced: the script ran to its end" grep -q "^script finished" "$WORK/violate.out"
fi
e2e_finish
