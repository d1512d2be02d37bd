# shellcheck shell=bash
# tests/e2e/modes_lib.sh - helpers for the modes / terminate end-to-end tests
# and bench/violation_latency.sh, on top of lib.sh (source lib.sh first).
#
#   journal_setup                 make sure a journald answers (start one,
#                                 stopped at the end, if none does),
#                                 JOURNAL_OK=1 when it round-trips
#   journal_expect DESC VM K=V... a violation entry of VM with every K=V
#   journal_count VM [K=V...]     number of violation entries of VM matching
#   status_get VM PATH            a number from `vmfence status --json`
#                                 (PATH: counters.X, drops.REASON, quarantined)
#   udp_send NS DST PORT COUNT [SPORT] [SECONDS] [TOKEN]
#                                 COUNT datagrams "TOKEN-i" from one socket bound
#                                 to SPORT (0: one fresh socket, hence a fresh
#                                 source port, per datagram), spread over
#                                 SECONDS; prints how many sendto() accepted
#   serve_sink NS PORT            UDP receiver (big buffer, no echo) logging
#                                 "RECV_REALTIME_NS PAYLOAD" per datagram to
#                                 $WORK/srv/NS-sink-PORT.log
#   sink_count NS PORT TOKEN      datagrams with TOKEN the sink received
#   udp_rcvbuf_errors NS          UdpRcvbufErrors of NS (receiver-side loss)
#   link_rx_dropped NS IFACE      rx_dropped of IFACE (backlog drops before TC)
#   quick_udp / quick_tcp NS HOST PORT [TIMEOUT]
#                                 fast probes (default 0.5 s) of the lib.sh
#                                 echo / banner servers
#   flow_cached VM_IP VM_PORT PEER_PORT   flow map entries of that flow

VIOLATION_MESSAGE_ID=6f1c2a7d9e3b4c58a0d1e2f3a4b5c6d7
JOURNAL_OK=0

# journal_setup: a journald that answers. Starts /lib/systemd/systemd-journald
# when none answers on /run/systemd/journal/socket (lib.sh journald_ensure:
# detached from this test's file descriptors, stopped when the test ends).
# JOURNAL_OK=1 once an entry sent with systemd-cat is read back.
journal_setup() {
	local tag i
	journald_ensure || say "could not start a journald"
	tag="vmfence-e2e-probe-$PFX"
	echo "journal probe $PFX" | systemd-cat -t "$tag" 2>/dev/null
	for i in $(seq 50); do
		if journalctl --no-pager -q -o cat -t "$tag" 2>/dev/null | grep -q "journal probe $PFX"; then
			JOURNAL_OK=1
			say "journald answers (probe entry read back)"
			return 0
		fi
		sleep 0.1
	done
	say "journald does not answer: journal checks will fail"
	return 1
}

# _journal_json VM: the violation entries of VM, one JSON object per line.
_journal_json() {
	journalctl --no-pager -q -o json "MESSAGE_ID=$VIOLATION_MESSAGE_ID" "VMFENCE_VM=$1" 2>/dev/null
}

# _journal_match VM K=V...: prints the number of entries of VM matching every
# K=V (V is an extended regex matched against the whole value).
_journal_match() {
	local vm=$1; shift
	_journal_json "$vm" | "$PY" -c '
import json, re, sys
want = [a.split("=", 1) for a in sys.argv[1:]]
n = 0
for line in sys.stdin:
    try:
        e = json.loads(line)
    except ValueError:
        continue
    def val(k):
        v = e.get(k)
        if isinstance(v, list) and v and isinstance(v[0], int):   # non-UTF-8: bytes
            v = bytes(v).decode(errors="replace")
        return v
    if all(isinstance(val(k), str) and re.fullmatch(v, val(k)) for k, v in want):
        n += 1
print(n)
' "$@"
}

# journal_expect DESC VM K=V...: within 5 s a violation entry of VM (fixed
# MESSAGE_ID) has every K=V (V: regex for the whole value).
journal_expect() {
	local d=$1 vm=$2 i n; shift 2
	if ! enforced; then _skip "$d (no daemon)"; return 0; fi
	if [ "$JOURNAL_OK" != 1 ]; then _fail "$d  [journald does not answer: see journal_setup]"; return 1; fi
	for i in $(seq 50); do
		n=$(_journal_match "$vm" "MESSAGE_ID=$VIOLATION_MESSAGE_ID" "$@")
		if [ "${n:-0}" -gt 0 ]; then _pass "$d"; return 0; fi
		sleep 0.1
	done
	_fail "$d  [no journal entry of $vm with: $*]"
	echo "    journal entries of $vm (last 3, VMFENCE_* / PRIORITY / MESSAGE_ID / MESSAGE):"
	_journal_json "$vm" | tail -n 3 | "$PY" -c '
import json, sys
for line in sys.stdin:
    e = json.loads(line)
    print("    | " + " ".join("%s=%s" % (k, v) for k, v in sorted(e.items())
                              if k.startswith("VMFENCE_") or k in ("PRIORITY", "MESSAGE_ID", "MESSAGE")))
'
	return 1
}

# journal_count VM [K=V...]
journal_count() { local vm=$1; shift; _journal_match "$vm" "$@"; }

# status_get VM PATH: e.g. status_get vm1 drops.egress_denied,
# status_get vm1 counters.events_suppressed, status_get vm1 quarantined.
status_get() {
	vmf status --json 2>/dev/null | "$PY" -c '
import json, sys
st = json.load(sys.stdin)
for vm in st["vms"]:
    if vm["name"] == sys.argv[1]:
        v = vm
        for k in sys.argv[2].split("."):
            v = v[k]
        print(int(v) if not isinstance(v, bool) else int(v))
        sys.exit(0)
print("NA")
' "$1" "$2"
}

# udp_send NS DST PORT COUNT [SPORT] [SECONDS] [TOKEN]: prints the number of
# datagrams sendto() accepted (and, on stderr, errors if any).
udp_send() {
	local ns=$1 dst=$2 port=$3 count=$4 sport=${5:-0} secs=${6:-0} tok=${7:-u$RANDOM}
	nsx "$ns" "$PY" -c '
import socket, sys, time, errno
dst, port, count, sport, secs, tok = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), sys.argv[6]
fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
def mk():
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if sport:
        s.bind(("", sport))
    return s
s = mk() if sport else None
ok, errs = 0, {}
t0 = time.monotonic()
chunk = max(1, count // 200) if secs > 0 else count
for i in range(count):
    if secs > 0 and i % chunk == 0:
        due = t0 + secs * i / count
        d = due - time.monotonic()
        if d > 0:
            time.sleep(d)
    so = s if s else mk()
    try:
        so.sendto(("%s-%d\n" % (tok, i)).encode(), (dst, port))
        ok += 1
    except OSError as e:
        errs[e.errno] = errs.get(e.errno, 0) + 1
    if not s:
        so.close()
if s:
    time.sleep(0.3)   # keep the socket open for echoes (else the VM answers them with ICMP port unreachable)
print(ok)
if errs:
    print("sendto errors: %r" % {errno.errorcode.get(k, k): v for k, v in errs.items()}, file=sys.stderr)
' "$dst" "$port" "$count" "$sport" "$secs" "$tok"
}

# serve_sink NS PORT: UDP receiver logging every datagram's payload.
serve_sink() {
	spawn "$1" "$PY" -u -c '
import socket, sys, time
port, log = int(sys.argv[1]), sys.argv[2]
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)   # SO_RCVBUFFORCE (root)
s.bind(("::", port))
with open(log, "a") as f:
    while True:
        d = s.recv(65535)
        f.write("%d %s\n" % (time.time_ns(), d.decode(errors="replace").strip()))
        f.flush()
' "$2" "$WORK/srv/$1-sink-$2.log"
	: >>"$WORK/srv/$1-sink-$2.log"
}

# sink_count NS PORT TOKEN: datagrams "TOKEN-i" received (distinct i).
sink_count() {
	awk -v t="$3-" 'index($2, t) == 1 {print $2}' "$WORK/srv/$1-sink-$2.log" 2>/dev/null | sort -u | wc -l
}

# udp_rcvbuf_errors NS
udp_rcvbuf_errors() {
	nsx "$1" cat /proc/net/snmp /proc/net/snmp6 2>/dev/null | awk '
		$1 == "Udp:" && !hdr { for (i = 2; i <= NF; i++) col[$i] = i; hdr = 1; next }
		$1 == "Udp:" && hdr { n += $col["RcvbufErrors"] }
		$1 == "Udp6RcvbufErrors" { n += $2 }
		END { print n + 0 }'
}

# link_rx_dropped NS IFACE
link_rx_dropped() {
	ipn "$1" -s -j link show dev "$2" | "$PY" -c 'import json, sys; print(json.load(sys.stdin)[0]["stats64"]["rx"]["dropped"])'
}

# log_count REGEX: daemon log lines after the mark matching REGEX.
log_count() { _log_since_mark | grep -Ec -- "$1"; }

# flow_cached VM_IPV4 VM_PORT PEER_PORT: prints the flow map entries (as
# "opened_by=N generation=N") for that UDP/TCP 5-tuple side of a VM; nothing
# when the flow is not cached.
flow_cached() {
	# Each VM's flow table is an inner map of vmfence_flows_v2 (not pinned):
	# dump every vmfence_vm_flow map by id.
	local id
	for id in $(nsx hv bpftool -j map show 2>/dev/null | "$PY" -c '
import json, sys
print(" ".join(str(m["id"]) for m in json.load(sys.stdin) if m.get("name", "").startswith("vmfence_vm_flow")))'); do
		nsx hv bpftool -j map dump id "$id" 2>/dev/null
	done | "$PY" -c '
import json, socket, struct, sys
ip, vport, pport = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
want = list(b"\0" * 10 + b"\xff\xff" + socket.inet_aton(ip))
entries = []
for doc in sys.stdin.read().replace("][", "]\n[").splitlines():
    entries += json.loads(doc or "[]")
for e in entries:
    k, v = e.get("formatted", {}).get("key"), e.get("formatted", {}).get("value")
    if not k:
        continue
    sw = lambda p: struct.unpack("<H", struct.pack(">H", p))[0]   # network-order u16 shown as host
    if list(k["vm_addr"]) == want and vport in (k["vm_port"], sw(k["vm_port"])) and pport in (k["peer_port"], sw(k["peer_port"])):
        print("opened_by=%s generation=%s" % (v.get("opened_by"), v.get("policy_id")))
' "$1" "$2" "$3"
}

# quick_udp NS HOST PORT [TIMEOUT]: a token to a serve_udp echo server, echoed in time?
quick_udp() {
	nsx "$1" "$PY" -c '
import socket, sys, os
h, p, t = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in h else socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(t)
tok = b"q%d" % int.from_bytes(os.urandom(4), "big")
try:
    s.sendto(tok, (h, p))
    while True:
        if s.recv(2048).strip() == tok:
            sys.exit(0)
except OSError:
    sys.exit(1)
' "$2" "$3" "${4:-0.5}"
}

# quick_tcp NS HOST PORT [TIMEOUT]: connect to a serve_tcp server and read its banner in time?
quick_tcp() {
	nsx "$1" "$PY" -c '
import socket, sys
h, p, t = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
try:
    s = socket.create_connection((h, p), timeout=t)
    s.settimeout(t)
    sys.exit(0 if b"vmfence-e2e" in s.recv(256) else 1)
except OSError:
    sys.exit(1)
' "$2" "$3" "${4:-0.5}"
}
