#!/usr/bin/env bash
# End-to-end: noisy neighbours (issue 8, item 6). One VM floods the flow table
# with 300,000 new UDP flows; another VM's established TCP connection must
# survive it, carry data both ways, and the victim must still open new
# connections. The attacker's excess flows are dropped with reason
# `flow_limit` (its own `limits.flows` share), which is not a violation: at
# on_violation terminate, threshold 1, it is neither quarantined nor
# terminated. Idle UDP flows expire after host.json `flow_timeouts.udp_s`, so
# once the attacker has been quiet for a while it can open flows again.
#
# Why: before per-VM flow tables, every VM shared one global LRU hash of
# 262,144 flows (vmfence_flows_v1). A flood of new flows from one VM then
# evicted the least recently used entries, an idle but established flow of
# another VM among them, and the server's next packet toward the victim was
# "unsolicited inbound" (ingress_denied): the victim's connection hung until
# the victim itself sent again. (The kernel's BPF LRU gives referenced entries
# a second chance: a flood of one-datagram flows, never referenced again,
# mostly evicts its own entries. An attacker that sends each of its flows a
# second datagram - the default here, FLOOD_REPEAT_GAP - makes its entries as
# "hot" as the victim's.) The server-to-victim push right after the flood
# below is the check that catches the eviction: the victim sends nothing on
# that connection from before the flood until then. Measured on 6a14348 (the
# global LRU) with FLOOD_LEGACY_SPEC=1: every srv -> victim push after the
# flood was lost (15 ingress_denied drops of the victim); with
# FLOOD_REPEAT_GAP=0 the victim's flow survived.
#
# Topology (routed /32s, all in namespaces):
#   hv:   tap-v, tap-a (10.70.0.1/32, proxy_arp, host routes), wan0
#         198.51.100.1/24 -> netns "srv" 198.51.100.2, and 198.51.101.0/24
#         routed to srv, where it is a local route whose every datagram an nft
#         rule in srv counts and drops (the flood's sink: no ICMP back).
#   srv:  TCP 443 banner, UDP 51900 echo, TCP 7000 the victim's long-lived
#         connection (both sides driven by control files in the work dir).
#   v 10.70.0.11 (victim): egress tcp 443 + 7000 to srv.
#   a 10.70.0.12 (attacker): egress udp to 198.51.100.0/23, all ports, tcp 9999
#         not allowed; "limits": {"flows": 4096}.
#   Both: on_violation terminate, threshold 1 (host command writes a marker).
#   host.json flow_timeouts: tcp 7440 s, udp 5 s, icmp 30 s.
#
# Control: NO_VMFENCE=1 runs the same topology without the daemon: the flood
# reaches the sink, the attacker's probe during the flood goes through, and the
# victim's connection works (the topology carries everything, so what vmfence
# blocks is vmfence's doing).
#
# Env: FLOOD_FLOWS (default 300000), FLOOD_MAX_S (time bound of the flood, 60),
#      FLOOD_REPEAT_GAP (default 1000: each flow's second datagram is sent
#      that many flows later; 0: one datagram per flow),
#      FLOOD_LEGACY_SPEC=1 (no limits/flow_timeouts in the spec: for builds
#      that predate them).
set -u
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/modes_lib.sh"
. "$(dirname "$0")/noise_lib.sh"
e2e_init flood

FLOWS=${FLOOD_FLOWS:-300000}
FLOOD_MAX_S=${FLOOD_MAX_S:-60}
REPEAT_GAP=${FLOOD_REPEAT_GAP:-1000}
LIMIT=4096
UDP_TIMEOUT=5
SRV=198.51.100.2
GW=10.70.0.1
V=10.70.0.11
A=10.70.0.12
VM_V=$PFX-victim
VM_A=$PFX-attacker
MAC_V=02:00:00:70:00:11
MAC_A=02:00:00:70:00:12
CTL=$WORK/ctl
mkdir -p "$CTL"

# ---------------------------------------------------------------- helpers ----

# Victim's long-lived connection: srv side (port 7000) and VM side, each
# driven by numbered control files and logging every line it receives.
#   $CTL/s2c.N: the server sends "S2C <content>";  $CTL/c2s.N: the victim sends
#   "C2S <content>" and the server answers "ECHO <content>".
#   Logs: $CTL/srv.log ("got <line>"), $CTL/cli.log ("got <line>").
conn_server() {
	spawn srv "$PY" -u -c '
import os, socket, sys, threading, time
port, ctl = int(sys.argv[1]), sys.argv[2]
def log(t):
    with open(ctl + "/srv.log", "a") as f:
        f.write(t + "\n")
ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("0.0.0.0", port))
ls.listen(1)
c, a = ls.accept()
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
log("accepted %s:%d" % a)
def reader():
    for line in c.makefile("rb"):
        t = line.decode(errors="replace").strip()
        log("got " + t)
        if t.startswith("C2S "):
            c.sendall(("ECHO %s\n" % t[4:]).encode())
    log("closed")
threading.Thread(target=reader, daemon=True).start()
i = 0
while True:
    p = "%s/s2c.%d" % (ctl, i)
    if os.path.exists(p):
        c.sendall(("S2C %s\n" % open(p).read().strip()).encode())
        i += 1
    else:
        time.sleep(0.02)
' 7000 "$CTL"
}
conn_client() {
	spawn v "$PY" -u -c '
import os, socket, sys, threading, time
host, port, ctl = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def log(t):
    with open(ctl + "/cli.log", "a") as f:
        f.write(t + "\n")
c = socket.create_connection((host, port), timeout=5)
c.settimeout(None)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
log("connected from %s:%d" % c.getsockname())
def reader():
    for line in c.makefile("rb"):
        log("got " + line.decode(errors="replace").strip())
    log("closed")
threading.Thread(target=reader, daemon=True).start()
i = 0
while True:
    p = "%s/c2s.%d" % (ctl, i)
    if os.path.exists(p):
        c.sendall(("C2S %s\n" % open(p).read().strip()).encode())
        i += 1
    else:
        time.sleep(0.02)
' "$SRV" 7000 "$CTL"
}
N_S2C=0
N_C2S=0
_ctl_write() { printf '%s\n' "$2" >"$CTL/.$1.tmp" && mv "$CTL/.$1.tmp" "$CTL/$1"; }
_wait_line() { # FILE LINE SECONDS
	local i
	for i in $(seq $(( $3 * 20 ))); do
		grep -qxF -- "$2" "$1" 2>/dev/null && return 0
		sleep 0.05
	done
	return 1
}
# push_s2c TOKEN: the server sends first; the victim must receive it in 3 s.
push_s2c() {
	_ctl_write "s2c.$N_S2C" "$1"; N_S2C=$((N_S2C + 1))
	_wait_line "$CTL/cli.log" "got S2C $1" 3
}
# push_c2s TOKEN: the victim sends; the server must get it and its echo come back.
push_c2s() {
	_ctl_write "c2s.$N_C2S" "$1"; N_C2S=$((N_C2S + 1))
	_wait_line "$CTL/srv.log" "got C2S $1" 3 && _wait_line "$CTL/cli.log" "got ECHO $1" 3
}

# flood_sunk: datagrams the flood's sink (nft counter in srv) received.
flood_sunk() {
	nsx srv nft -j list counter inet floodsink sunk 2>/dev/null | "$PY" -c '
import json, sys
for o in json.load(sys.stdin)["nftables"]:
    if "counter" in o:
        print(o["counter"]["packets"])
'
}
# flood_flows: distinct flows (address . port) the sink saw (a set of at most 65535).
flood_flows() {
	nsx srv nft -j list set inet floodsink flows 2>/dev/null | "$PY" -c '
import json, sys
for o in json.load(sys.stdin)["nftables"]:
    if "set" in o:
        print(len(o["set"].get("elem", [])))
'
}

# --------------------------------------------------------------- topology ----

section topology
hv_add
vm_add v tap-v "$MAC_V"
route_vm v tap-v "$V" "$GW"
vm_add a tap-a "$MAC_A"
route_vm a tap-a "$A" "$GW"
wan_add srv wan0 198.51.100.1/24 "$SRV/24"
ipn hv route add 198.51.101.0/24 via "$SRV"
ipn srv route add local 198.51.101.0/24 dev lo
nsx srv nft -f - <<'EOF' || fatal "nft sink in srv"
table inet floodsink {
	counter sunk { }
	set flows { type ipv4_addr . inet_service; size 65535; flags dynamic; }
	chain input {
		type filter hook input priority 0; policy accept;
		ip daddr 198.51.101.0/24 counter name "sunk"
		ip daddr 198.51.101.0/24 add @flows { ip daddr . udp dport }
		ip daddr 198.51.101.0/24 drop
	}
}
EOF
serve_tcp srv 443
serve_tcp srv 9999
serve_udp srv 51900
conn_server
wait_listen srv 443; wait_listen srv 7000; wait_listen srv 51900 udp

marker_cmd

section config
# FLOOD_LEGACY_SPEC=1 leaves out limits.flows and flow_timeouts, so that a
# build from before them runs the test (and shows the eviction).
FT="\"flow_timeouts\": { \"tcp_s\": 7440, \"udp_s\": $UDP_TIMEOUT, \"icmp_s\": 30 },"
LIM="\"limits\": { \"flows\": $LIMIT },"
[ "${FLOOD_LEGACY_SPEC:-0}" = 1 ] && { FT=""; LIM=""; }
write_host "{ $FT
  \"on_violation\": { \"action\": \"terminate\", \"command\": [\"$WORK/mark.sh\", \"{vm}\"],
                      \"threshold\": 1, \"window_ms\": 1000 }
}"
write_vm "$VM_V" "{
  \"name\": \"$VM_V\", \"interface\": \"tap-v\", \"mac\": \"$MAC_V\",
  \"addresses\": [\"$V/32\"], \"gateway\": [\"$GW\"], \"mode\": \"filtered\",
  \"egress\": [ { \"to\": \"$SRV/32\", \"proto\": \"tcp\", \"ports\": [\"443\", \"7000\"] } ],
  \"on_violation\": { \"action\": \"terminate\", \"threshold\": 1 }
}"
write_vm "$VM_A" "{
  \"name\": \"$VM_A\", \"interface\": \"tap-a\", \"mac\": \"$MAC_A\",
  \"addresses\": [\"$A/32\"], \"gateway\": [\"$GW\"], \"mode\": \"filtered\",
  \"egress\": [ { \"to\": \"198.51.100.0/23\", \"proto\": \"udp\" } ],
  $LIM
  \"on_violation\": { \"action\": \"terminate\", \"threshold\": 1 }
}"
if enforced; then
	if ! vmf check --config "$CONF" >"$WORK/check.log" 2>&1; then
		sed 's/^/    check| /' "$WORK/check.log"
		fatal "vmfence check rejects the spec (limits.flows / flow_timeouts not supported by this build?)"
	fi
	_pass "vmfence check accepts the spec${LIM:+ (limits.flows, flow_timeouts)}"
fi
start_daemon

# ---------------------------------------------------------- before flood -----

section "before the flood"
conn_client
for i in $(seq 60); do grep -q '^accepted' "$CTL/srv.log" 2>/dev/null && break; sleep 0.05; done
expect_ok "victim: long-lived tcp/7000 connection established" grep -q '^accepted' "$CTL/srv.log"
expect_ok "victim -> srv data on it (echoed back)" push_c2s before-1
expect_ok "srv -> victim data on it" push_s2c before-2
expect_ok "victim: new tcp/443 connection" quick_tcp v "$SRV" 443 2
expect_ok "attacker: udp/51900 echo (allowed) works" quick_udp a "$SRV" 51900 2
sink0=$(flood_sunk)
if enforced; then
	fl0=$(num "$(st_get "$VM_A" drops.flow_limit)")
	expect_ok "status --json has a flow_limit drop counter for the attacker ($fl0)" test "$fl0" -ge 0
fi

# ---------------------------------------------------------------- flood -------

section "flood: $FLOWS new UDP flows from the attacker (distinct dst address + port)"
mark_log
# One unconnected socket, sendmmsg() batches of 1024 (ctypes): flow i goes to
# 198.51.101.(i%256), port 1024+i/256; with FLOOD_REPEAT_GAP=G > 0 each flow
# gets a second datagram G flows later (so every flood flow is a referenced
# entry, as the victim's is). Progress (messages handled so far) in
# $WORK/flood.progress after each batch.
nsx a "$PY" -c '
import ctypes, errno, os, socket, struct, sys, time
n, tmax, prog, rep_gap = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], int(sys.argv[4])
libc = ctypes.CDLL(None, use_errno=True)
# message order: flow j, and (rep_gap > 0) flow j - rep_gap again
order = []
for j in range(n + (rep_gap if rep_gap > 0 else 0)):
    if j < n:
        order.append(j)
    if rep_gap > 0 and j >= rep_gap:
        order.append(j - rep_gap)
m = len(order)
addrs = ctypes.create_string_buffer(b"".join(
    struct.pack("=H", socket.AF_INET) + struct.pack(">H", 1024 + (i >> 8)) + bytes((198, 51, 101, i & 255)) + b"\0" * 8
    for i in range(n)))
payload = ctypes.create_string_buffer(b"f", 1)
iov = ctypes.create_string_buffer(struct.pack("=QQ", ctypes.addressof(payload), 1))
base, iovp = ctypes.addressof(addrs), ctypes.addressof(iov)
# struct mmsghdr: msghdr (name, namelen, iov, iovlen, control, controllen, flags) + msg_len, 64 bytes
hdrs = ctypes.create_string_buffer(b"".join(
    struct.pack("=QI4xQQQQi4xI4x", base + 16 * i, 16, iovp, 1, 0, 0, 0, 0) for i in order))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
pf = os.open(prog, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
hb = ctypes.addressof(hdrs)
sent, errs, k = 0, {}, 0
t0 = time.monotonic()
while k < m and time.monotonic() - t0 < tmax:
    v = min(1024, m - k)
    r = libc.sendmmsg(s.fileno(), ctypes.c_void_p(hb + 64 * k), v, 0)
    if r < 0:
        e = ctypes.get_errno()
        errs[e] = errs.get(e, 0) + 1
        k += 1                      # skip the message that failed
        continue
    sent += r
    k += r
    os.pwrite(pf, b"%-12d\n" % k, 0)
dt = time.monotonic() - t0
print("sent %d datagrams (%d flows, %s) of %d in %.2f s (%.0f/s), sendmmsg errors %r" % (
    sent, n, "each twice, %d flows apart" % rep_gap if rep_gap > 0 else "one datagram each", m, dt, sent / dt,
    {errno.errorcode.get(e, e): c for e, c in errs.items()}))
' "$FLOWS" "$FLOOD_MAX_S" "$WORK/flood.progress" "$REPEAT_GAP" >"$WORK/flood.out" 2>&1 &
FLOOD_PID=$!
E2E_BG_PIDS+=("$FLOOD_PID")
progress() { local p; p=$({ tr -d ' \n' <"$WORK/flood.progress"; } 2>/dev/null); echo "${p:-0}"; }
running() { kill -0 "$FLOOD_PID" 2>/dev/null && echo yes || echo no; }
# The sender creates the progress file when its buffers are built and the
# first batch goes out: that is the flood's start.
for i in $(seq 600); do [ -e "$WORK/flood.progress" ] && break; kill -0 "$FLOOD_PID" 2>/dev/null || break; sleep 0.05; done
T_FLOOD=${EPOCHREALTIME/./}
# Probe while the flood runs, once it has sent 3x the attacker's share and
# well within udp_s of its start (so none of its flows can have expired yet).
for i in $(seq 200); do [ "$(progress)" -ge $((3 * LIMIT)) ] && break; kill -0 "$FLOOD_PID" 2>/dev/null || break; sleep 0.02; done
flows_probe=$(num "$(flood_flows)")
p_probe=$(progress)
expect_blocked "attacker: a new flow (udp/51900 echo) while its table is full (flood at $p_probe messages, still running: $(running))" \
	quick_udp a "$SRV" 51900 0.5
dt_probe=$(_elapsed "$T_FLOOD")
say "probe done $dt_probe s after the flood started (udp_s=$UDP_TIMEOUT)"
expect_ok "victim: new tcp/443 connection while the attacker's table is full (flood still running: $(running))" \
	quick_tcp v "$SRV" 443 3
# (The long-lived connection stays idle during the flood: a packet on it now
# would refresh its entry in a shared LRU and hide an eviction.)
wait "$FLOOD_PID"
T_FLOOD_END=${EPOCHREALTIME/./}
say "flood: $(cat "$WORK/flood.out")"
sent=$(sed -n 's/^sent \([0-9]*\) .*/\1/p' "$WORK/flood.out")
expect_ok "the flood opened at least 300,000 new flows ($FLOWS flows, ${sent:-0} datagrams sent)" \
	test "$FLOWS" -ge 300000 -a "${sent:-0}" -ge "$FLOWS"

# ---------------------------------------------------------- after flood ------

section "after the flood"
# The server speaks first: this is what an evicted flow cannot survive.
expect_ok "victim: srv -> victim data right after the flood (server first)" push_s2c after-1
expect_ok "victim: victim -> srv data after the flood (echoed)" push_c2s after-2
expect_ok "victim: new tcp/443 connection after the flood" quick_tcp v "$SRV" 443 2
sleep 0.5
sunk=$(( $(num "$(flood_sunk)") - $(num "$sink0") ))
if enforced; then
	fl=$(num "$(st_get "$VM_A" drops.flow_limit)")
	fl=$((fl - fl0))
	say "attacker: flow_limit drops $fl; flood datagrams that reached the sink $sunk, in $(flood_flows) distinct flows"
	# Within udp_s of the flood's start no flow can have expired: at the probe
	# the attacker had at most its share through. Later, expired flows make room.
	expect_ok "attacker: at most limits.flows=$LIMIT flood flows got through in the first $dt_probe s ($flows_probe; $p_probe messages sent)" \
		test "$flows_probe" -le "$LIMIT" -a "$flows_probe" -ge 0
	expect_ok "attacker: flows up to its share did get through ($flows_probe >= $((LIMIT / 2)))" test "$flows_probe" -ge $((LIMIT / 2))
	expect_ok "attacker: what did not get through is counted as flow_limit ($fl >= ${sent:-0} - $sunk - 1%)" \
		test "$fl" -ge $(( ${sent:-0} - sunk - ${sent:-0} / 100 ))
	expect_ok "attacker: most of the flood dropped as flow_limit ($fl >= ${sent:-0}/2)" test "$fl" -ge $(( ${sent:-0} / 2 ))
	expect_ok "attacker: not quarantined" test "$(st_get "$VM_A" quarantined)" = 0
	expect_ok "attacker: the terminate command did not run" test ! -e "$(marker "$VM_A")"
	expect_ok "victim: not quarantined" test "$(st_get "$VM_V" quarantined)" = 0
	expect_ok "victim: the terminate command did not run" test ! -e "$(marker "$VM_V")"
	expect_ok "victim: no flow_limit drops ($(st_get "$VM_V" drops.flow_limit))" test "$(st_get "$VM_V" drops.flow_limit)" = 0
	expect_ok "victim: no ingress_denied drops (no reply dropped as unsolicited: $(st_get "$VM_V" drops.ingress_denied))" \
		test "$(st_get "$VM_V" drops.ingress_denied)" = 0
	expect_no_log "no violation logged for either VM during the flood" \
		"violation vm=($VM_A|$VM_V) " "$HOST_MCAST"
	expect_no_log "flow_limit drops raise no event" "reason=flow_limit"
	expect_no_log "no terminate action" "terminating vm="
	vmf status --json 2>/dev/null | "$PY" -c '
import json, sys
st = json.load(sys.stdin)
for k, v in sorted(st.get("maps", {}).items()):
    if "flow" in k or "frag" in k:
        print("    map %-28s %7d / %d" % (k, v["entries"], v["max_entries"]))
'
else
	say "unenforced: flood datagrams that reached the sink: $sunk"
	expect_ok "unenforced: the flood reaches the sink ($sunk >= ${sent:-0}/2)" test "$sunk" -ge $(( ${sent:-0} / 2 ))
fi

# ------------------------------------------------------------- expiry --------

section "flow expiry: udp_s=$UDP_TIMEOUT, the attacker idle for 12 s"
while [ $(( ${EPOCHREALTIME/./} - T_FLOOD_END )) -lt 12000000 ]; do sleep 0.1; done
expect_ok "attacker: a new flow (udp/51900 echo) works again 12 s after the flood" quick_udp a "$SRV" 51900 1
# quick_sink_flow: one datagram of a flow the flood never used; did the sink get it?
quick_sink_flow() {
	local s0 s1
	s0=$(num "$(flood_sunk)")
	nsx a "$PY" -c 'import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("198.51.101.7", 60999))'
	sleep 0.3
	s1=$(num "$(flood_sunk)")
	[ "$s1" -gt "$s0" ]
}
expect_ok "attacker: and a second new flow (udp to a fresh flood address reaches the sink)" quick_sink_flow
expect_ok "victim: its connection still carries srv -> victim data (idle 12 s, tcp_s=7440)" push_s2c late-1
expect_ok "victim: and victim -> srv data" push_c2s late-2
if enforced; then
	expect_ok "attacker: still not terminated" test ! -e "$(marker "$VM_A")"
	violations_match_log
fi

# ------------------------------------------------ positive control -----------

section "control: a real violation of the attacker does terminate it"
if enforced; then
	mark_log
	quick_tcp a "$SRV" 9999 0.5
	for i in $(seq 50); do [ -e "$(marker "$VM_A")" ] && break; sleep 0.1; done
	expect_ok "attacker: tcp/9999 (not allowed) ran the terminate command" test -e "$(marker "$VM_A")"
	expect_ok "the command saw VMFENCE_REASON=egress_denied" grep -q '^VMFENCE_REASON=egress_denied$' "$(marker "$VM_A")"
	expect_ok "attacker: quarantined now" test "$(st_get "$VM_A" quarantined)" = 1
	expect_ok "victim: unaffected (srv -> victim)" push_s2c final-1
	expect_ok "victim: unaffected (victim -> srv)" push_c2s final-2
else
	expect_ok "unenforced: the attacker's tcp/9999 reaches srv" quick_tcp a "$SRV" 9999 1
fi
e2e_finish
