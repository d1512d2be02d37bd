#!/usr/bin/env bash
# End-to-end with a real guest: QEMU (TCG) boots a Linux guest whose NIC is a
# real TAP in the hypervisor namespace; vmfence enforces on that TAP. The
# guest's script does allowed traffic, then sends one packet its policy
# denies, then keeps going. The datapath drops it and quarantines the VM, the
# agent's terminate action sends `quit` over the VM's QMP socket, and QEMU
# exits mid-script: the guest never reaches its end marker.
#
# Topology: hv (TAP vmq-tap 10.60.0.1/32 proxy_arp + host route to the guest
#   10.60.0.2/32), wan0 198.51.100.1/24 -> netns "cons" 198.51.100.2 with TCP
#   443 (allowed) and TCP 9999 (not allowlisted).
set -u
. "$(dirname "$0")/lib.sh"
e2e_init guest_qmp

HARNESS=$(cd "$(dirname "$0")/../guest" && pwd)/microvm.sh
command -v qemu-system-x86_64 >/dev/null || fatal "qemu-system-x86_64 missing (scripts/install-deps.sh)"
[ -e /dev/net/tun ] || fatal "/dev/net/tun missing"
section "guest image"
"$HARNESS" build >"$WORK/guest-build.log" 2>&1 || { tail -20 "$WORK/guest-build.log"; fatal "guest build failed"; }
_pass "guest kernel + initramfs ready"

CONS=198.51.100.2
GUEST=10.60.0.2
MAC=02:00:00:60:00:02
QMP=$WORK/qmp-$PFX.sock

section topology
hv_add
ip -n "$HV" tuntap add dev vmq-tap mode tap || fatal "tuntap"
ipn hv link set vmq-tap up
ipn hv addr add 10.60.0.1/32 dev vmq-tap
nsx hv sysctl -qw net.ipv4.conf.vmq-tap.proxy_arp=1
ipn hv route add "$GUEST/32" dev vmq-tap
wan_add cons wan0 198.51.100.1/24 "$CONS/24"
serve_tcp cons 443
serve_tcp cons 9999
wait_listen cons 443

# How to terminate is the host's (it runs as root); the VM's file only asks for it.
write_host "{ \"on_violation\": { \"action\": \"alert\", \"qmp_socket\": \"$QMP\" } }"
write_vm guest1 "{
  \"name\": \"guest1\", \"interface\": \"vmq-tap\", \"mac\": \"$MAC\",
  \"addresses\": [\"$GUEST/32\"], \"gateway\": [\"10.60.0.1\"],
  \"egress\": [ { \"to\": \"$CONS/32\", \"proto\": \"tcp\", \"ports\": [\"443\"] } ],
  \"on_violation\": { \"action\": \"terminate\" }
}"
start_daemon

section "guest: allowed traffic, then one violation, then more work"
cat >"$WORK/guest.sh" <<EOF
echo "guest up"
if nc -w 3 $CONS 443 </dev/null | grep -q vmfence-e2e; then echo "allowed: tcp/443 ok"; else echo "allowed: tcp/443 FAILED"; fi
echo "violating: tcp/9999"
nc -w 1 $CONS 9999 </dev/null
i=0
while [ \$i -lt 60 ]; do echo "still running \$i"; sleep 1; i=\$((i+1)); done
echo "script finished"
EOF
t0=$(date +%s)
KV_QMP=$QMP KV_MAC=$MAC KV_TIMEOUT=90 KV_LOG="$WORK/serial.log" \
	"$HARNESS" run "$HV" vmq-tap "$GUEST/24" 10.60.0.1 "$WORK/guest.sh" >"$WORK/guest.out" 2>&1
rc=$?
t1=$(date +%s)
say "guest exited rc=$rc after $((t1 - t0)) s"; sed 's/^/    guest| /' "$WORK/guest.out" | head -20

expect_ok "the guest ran and did its allowed TCP connection" grep -q "allowed: tcp/443 ok" "$WORK/guest.out"
expect_ok "the guest reached the violation" grep -q "violating: tcp/9999" "$WORK/guest.out"
expect_fail "QEMU was stopped mid-script (no 'script finished')" grep -q "script finished" "$WORK/guest.out"
expect_ok "the harness saw no end marker (rc 125), not a timeout (rc=$rc)" test "$rc" = 125
expect_ok "stopped well before the script's 60 s loop ended ($((t1 - t0)) s)" test $((t1 - t0)) -lt 60
expect_log "the violation was logged with the guest's addresses" \
	"violation vm=guest1 reason=egress_denied dir=from_vm src=$GUEST dst=$CONS proto=tcp .*dport=9999 .*quarantined=1"
expect_log "the agent started the terminate action" "terminating vm=guest1 reason=egress_denied"
expect_fail "the guest never got the consumer's tcp/9999 banner" grep -q "vmfence-e2e cons 9999" "$WORK/guest.out"
counters_match_log
e2e_finish
