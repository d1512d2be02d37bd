#!/usr/bin/env bash
# Rate-limit benchmark: how closely vmfence's per-VM limits ("limits" in a VM
# spec) hold real traffic to the configured rate, and what they cost TCP.
#
# Topology (as tests/e2e/ratelimit_test.sh; all in namespaces "$PFX-*", made
# and removed by lib.sh): hv routes vm1 10.0.0.1/32 and vm2 10.0.0.2/32 (veth
# host ends vm1/vm2 = the TAPs, gateway 10.0.0.0/32, proxy_arp) and wan0
# 198.51.100.1/24 -> netns "inet" 198.51.100.2 (iperf3 servers, UDP sinks and
# sources). vm1 is the measured VM; vm2 never has limits.
#
# Configurations (interleaved each round, in a rotated order; a reload between
# them, no daemon restart):
#   none          vm1 without limits (baseline; % columns are of the largest limit)
#   mbit L        {"egress_mbit": L, "ingress_mbit": L} for L in LIMITS (10 100 1000)
#   pps P         {"egress_pps": P, "ingress_pps": P} (PPS, default 10000)
# Measured per configuration, egress (vm1 -> inet) and ingress (inet -> vm1, iperf3 -R):
#   - iperf3 TCP, 1 stream and 8 streams (-P 8), DURATION s after 1 s omitted:
#     received Mbit/s, % of the limit, sender retransmits
#   - (pps configurations, and the baseline) UDP flood of 64-byte datagrams from
#     a python sender: received pkt/s in steady state (first second left out)
#     and overall (incl. the initial burst), and what the sender offered
#   - whether vm1's root qdisc is fq (the ingress_mbit pacing needs it)
# ROUNDS rounds (default 3); the tables show medians (min-max when ROUNDS > 1).
# Clients on CPU CLIENT_CPU (0), servers on SERVER_CPU (1), pinned with taskset.
# Output: markdown tables on stdout; raw TSV in OUT_DIR (kept).
#
# Env: VMFENCE (default <repo>/build/vmfence), ROUNDS (3), DURATION (5),
#      LIMITS ("10 100 1000"), PPS (10000), STREAMS ("1 8"), CLIENT_CPU,
#      SERVER_CPU, OUT_DIR (default: a new /tmp/ratelimit-bench.XXXXXX),
#      KEEP=1 (keep lib.sh's work dir with the daemon log), BURST_KB (limits.burst_kb
#      for the mbit configurations; default: vmfence's).
# Needs root, iperf3, /usr/bin/python3.
set -u
. "$(dirname "$0")/../tests/e2e/lib.sh"
. "$(dirname "$0")/../tests/e2e/live_lib.sh"
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
LIMITS=${LIMITS-"10 100 1000"}   # LIMITS="" : baseline and pps only
PPS=${PPS:-10000}
STREAMS=${STREAMS:-"1 8"}
CLIENT_CPU=${CLIENT_CPU:-0}
SERVER_CPU=${SERVER_CPU:-1}
OUT_DIR=${OUT_DIR:-$(mktemp -d /tmp/ratelimit-bench.XXXXXX)}
mkdir -p "$OUT_DIR"
RAW=$OUT_DIR/raw.tsv
e2e_init rlbench
command -v iperf3 >/dev/null || fatal "iperf3 missing (apt install iperf3)"
[ "$ENFORCE" = 1 ] || say "NO_VMFENCE=1: every configuration runs unlimited (topology check only)"
SRV=198.51.100.2
PORT_SEQ=5200
UDP_SEQ=7000
printf 'round\tconfig\tdir\tkind\tvalue\tretrans\textra\n' >"$RAW"

# ---------------------------------------------------------------- helpers ----

next_port() { PORT_SEQ=$((PORT_SEQ + 1)); [ "$PORT_SEQ" -gt 5999 ] && PORT_SEQ=5201; return 0; }
next_udp() { UDP_SEQ=$((UDP_SEQ + 1)); [ "$UDP_SEQ" -gt 7999 ] && UDP_SEQ=7001; return 0; }

# iperf_tcp VM STREAMS [args]: "MBIT RETRANSMITS" or "ERR ..."
iperf_tcp() {
	local vm=$1 p=$2 out; shift 2
	next_port
	out=$WORK/iperf.json
	spawn inet taskset -c "$SERVER_CPU" iperf3 -s -1 -p "$PORT_SEQ"
	wait_listen inet "$PORT_SEQ"
	nsx "$vm" taskset -c "$CLIENT_CPU" timeout $((DURATION + 30)) \
		iperf3 -c "$SRV" -p "$PORT_SEQ" -t "$DURATION" -O 1 -P "$p" -J "$@" >"$out" 2>&1
	"$PY" -c '
import json, sys
try:
    j = json.load(open(sys.argv[1]))
except ValueError:
    print("ERR no JSON: " + open(sys.argv[1]).read()[:200].replace("\n", " ")); sys.exit(0)
if "error" in j:
    print("ERR " + j["error"].replace(" ", "_")); sys.exit(0)
e = j["end"]
print("%.2f %d" % (e["sum_received"]["bits_per_second"] / 1e6, e.get("sum_sent", {}).get("retransmits", -1)))
' "$out"
}

UDP_RX='
import json, socket, sys, time
port, secs, out, hello = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    s.setsockopt(socket.SOL_SOCKET, 33, 1 << 23)   # SO_RCVBUFFORCE
except OSError:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 23)
s.bind(("0.0.0.0", port))
if hello != "-":
    h, hp = hello.rsplit(":", 1)
    for _ in range(3):
        s.sendto(b"hello", (h, int(hp)))
        time.sleep(0.05)
s.settimeout(8)
ts = []
try:
    while True:
        d = s.recv(2048)
        if d == b"hello":
            continue
        t = time.monotonic()
        ts.append(t)
        if t - ts[0] > secs + 0.5:
            break
        if len(ts) == 1:
            s.settimeout(1.0)
except socket.timeout:
    pass
res = {"n": len(ts)}
if ts:
    w0, w1 = ts[0] + 1.0, ts[0] + secs - 0.3
    res["window_pps"] = sum(1 for t in ts if w0 <= t < w1) / (w1 - w0)
    res["overall_pps"] = len(ts) / secs
json.dump(res, open(out, "w"))
'
UDP_TX='
import json, socket, sys, time
dst, port, secs, out, wait_hello = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5] == "1"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
if wait_hello:
    s.bind(("0.0.0.0", port))
    s.settimeout(8)
    d, a = s.recvfrom(2048)
    s.connect(a)
else:
    s.connect((dst, port))
payload = b"r" * 64
n = err = 0
t0 = time.monotonic()
end = t0 + secs
while time.monotonic() < end:
    for _ in range(64):
        try:
            s.send(payload)
            n += 1
        except OSError:
            err += 1
json.dump({"sent_pps": n / (time.monotonic() - t0), "errors": err}, open(out, "w"))
'
# udp_flood DIR (egress|ingress): "STEADY_PPS OVERALL_PPS SENT_PPS" or "ERR ..."
udp_flood() {
	local dir=$1 rx tx out=$WORK/udp
	next_udp
	rm -f "$out.rx" "$out.tx"
	if [ "$dir" = egress ]; then
		nsx inet taskset -c "$SERVER_CPU" "$PY" -c "$UDP_RX" "$UDP_SEQ" "$DURATION" "$out.rx" - >>"$out.log" 2>&1 &
		rx=$!
		wait_listen inet "$UDP_SEQ" udp
		nsx vm1 taskset -c "$CLIENT_CPU" "$PY" -c "$UDP_TX" "$SRV" "$UDP_SEQ" "$DURATION" "$out.tx" 0 >>"$out.log" 2>&1
	else
		nsx inet taskset -c "$SERVER_CPU" "$PY" -c "$UDP_TX" - "$UDP_SEQ" "$DURATION" "$out.tx" 1 >>"$out.log" 2>&1 &
		tx=$!
		wait_listen inet "$UDP_SEQ" udp
		nsx vm1 taskset -c "$CLIENT_CPU" "$PY" -c "$UDP_RX" "$UDP_SEQ" "$DURATION" "$out.rx" "$SRV:$UDP_SEQ" >>"$out.log" 2>&1 &
		rx=$!
		wait "$tx"
	fi
	wait "$rx"
	"$PY" -c '
import json, sys
try:
    rx, tx = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
except (OSError, ValueError) as e:
    print("ERR %s" % str(e).replace(" ", "_")); sys.exit(0)
if not rx.get("n"):
    print("ERR nothing_received"); sys.exit(0)
print("%.0f %.0f %.0f" % (rx["window_pps"], rx["overall_pps"], tx["sent_pps"]))
' "$out.rx" "$out.tx"
}

vm1_spec() { # LIMITS_JSON ("" = none)
	printf '{ "name": "vm1", "interface": "vm1", "mac": "02:00:00:00:00:01",
  "addresses": ["10.0.0.1/32"], "gateway": ["10.0.0.0"], "mode": "filtered",
  "egress": [%s]%s }' "$RULES" "${1:+, \"limits\": $1}"
}
limits_of() { # CONFIG -> limits JSON
	case $1 in
	none) echo "" ;;
	mbit*) echo "{ \"egress_mbit\": ${1#mbit}, \"ingress_mbit\": ${1#mbit}${BURST_KB:+, \"burst_kb\": $BURST_KB} }" ;;
	pps*) echo "{ \"egress_pps\": ${1#pps}, \"ingress_pps\": ${1#pps} }" ;;
	esac
}
reload_re='reload \([^)]*\): [0-9]+ VMs changed'
CUR=""
NOT_APPLIED=()
ROUND=0
set_config() { # CONFIG
	local n
	[ "$1" = "$CUR" ] && return 0
	# From one set of limits to another through "none": the bench measures
	# the limiter, not the reload path (5a4ff00: a change between two limited
	# specs with the same VM entry is not applied; ratelimit_test.sh checks that).
	[ "$1" != none ] && [ "$CUR" != none ] && set_config none
	CUR=$1
	[ "$ENFORCE" = 1 ] || return 0
	n=$(log_count "$reload_re")
	write_vm_atomic vm1 "$(vm1_spec "$(limits_of "$1")")"
	log_wait_count "$reload_re" $((n + 1)) 10 || fatal "no reload logged for config $1 (daemon log: $DLOG)"
	# vm1's spec changed: a reload that changed no VM did not apply the new limits.
	if grep -E "$reload_re" "$DLOG" | tail -n 1 | grep -q ': 0 VMs changed'; then
		say "  WARNING: the reload for config $1 changed no VM: its limits are not in force (measured anyway)"
		NOT_APPLIED+=("$1 (round $ROUND)")
	fi
	if ! grep -E "$reload_re" "$DLOG" | tail -n 1 | grep -q ' 0 kept at their last good policy, 0 files refused'; then
		tail -n 5 "$DLOG"; fatal "config $1 refused by the daemon"
	fi
	sleep 0.5   # qdisc changes, buckets refill
}
fq_state() { nsx hv tc qdisc show dev vm1 | grep -Eq '^qdisc fq [0-9a-f]+: root' && echo fq || echo no; }

# --------------------------------------------------------------- topology ----

section topology
hv_add
for n in 1 2; do
	vm_add "vm$n" "vm$n" "02:00:00:00:00:0$n"
	nsx "vm$n" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.eth0.disable_ipv6=1
	nsx hv sysctl -qw "net.ipv6.conf.vm$n.disable_ipv6=1"
	route_vm "vm$n" "vm$n" "10.0.0.$n" 10.0.0.0
done
wan_add inet wan0 198.51.100.1/24 "$SRV/24"
ipn hv link add fqprobe0 type veth peer name fqprobe1
if nsx hv tc qdisc add dev fqprobe0 root fq 2>/dev/null; then KERNEL_FQ=yes; else KERNEL_FQ=no; fi
ipn hv link del fqprobe0
say "kernel sch_fq (ingress_mbit pacing): $KERNEL_FQ"
RULES="{ \"to\": \"$SRV/32\", \"proto\": \"tcp\", \"ports\": [\"5201-5999\"] },
             { \"to\": \"$SRV/32\", \"proto\": \"udp\" }"
write_host '{}'
write_vm vm1 "$(vm1_spec "")"
write_vm vm2 "{ \"name\": \"vm2\", \"interface\": \"vm2\", \"mac\": \"02:00:00:00:00:02\",
  \"addresses\": [\"10.0.0.2/32\"], \"gateway\": [\"10.0.0.0\"], \"mode\": \"filtered\", \"egress\": [$RULES] }"
start_daemon
CUR=none

CONFIGS=(none)
for l in $LIMITS; do CONFIGS+=("mbit$l"); done
CONFIGS+=("pps$PPS")
NC=${#CONFIGS[@]}

# ----------------------------------------------------------------- rounds ----

for r in $(seq "$ROUNDS"); do
	ROUND=$r
	section "round $r/$ROUNDS"
	for i in $(seq 0 $((NC - 1))); do
		c=${CONFIGS[$(( (i + r - 1) % NC ))]}
		set_config "$c"
		fq=$(fq_state)
		for dir in egress ingress; do
			args=()
			[ "$dir" = ingress ] && args=(-R)
			if [ "${c#pps}" = "$c" ]; then
				for p in $STREAMS; do
					res=$(iperf_tcp vm1 "$p" "${args[@]}")
					read -r v rt <<<"$res"
					[ "$v" = ERR ] && { v=NA; rt=NA; say "  $c $dir tcp x$p: iperf3 failed: $res"; }
					printf '%s\t%s\t%s\ttcp%s\t%s\t%s\t%s\n' "$r" "$c" "$dir" "$p" "$v" "$rt" "$fq" >>"$RAW"
					say "  $c $dir tcp x$p: $v Mbit/s, $rt retransmits (root qdisc fq: $fq)"
				done
			fi
			if [ "$c" = none ] || [ "${c#pps}" != "$c" ]; then
				res=$(udp_flood "$dir")
				read -r w o s <<<"$res"
				[ "$w" = ERR ] && { say "  $c $dir udp: $res"; w=NA; o=NA; s=NA; }
				printf '%s\t%s\t%s\tudp\t%s\t%s\t%s\n' "$r" "$c" "$dir" "$w" "$o" "$s" >>"$RAW"
				say "  $c $dir udp: steady $w pkt/s, overall $o pkt/s, offered $s pkt/s"
			fi
		done
	done
done

# --------------------------------------------------------------- results -----

section results
if [ "$ENFORCE" = 1 ]; then
	RL=$(vmf status --json 2>/dev/null | "$PY" -c '
import json, sys
for v in json.load(sys.stdin).get("vms", []):
    if v.get("name") == "vm1": print(v.get("drops", {}).get("rate_limited", "NA"))' 2>/dev/null)
	VIOL=$(grep -Ec 'violation vm=vm1 ' "$DLOG")
else
	RL=NA; VIOL=NA
fi
"$PY" - "$RAW" "$LIMITS" "$STREAMS" "$ROUNDS" <<'EOF'
import collections, statistics, sys
raw, limits, streams, rounds = sys.argv[1], sys.argv[2].split(), sys.argv[3].split(), int(sys.argv[4])
rows = collections.defaultdict(list)
fq = collections.defaultdict(set)
for line in open(raw).read().splitlines()[1:]:
    r, c, d, kind, v, rt, extra = line.split("\t")
    rows[(c, d, kind)].append((v, rt, extra))
    if kind.startswith("tcp"):
        fq[c].add(extra)
def nums(xs):
    return [float(x) for x in xs if x not in ("NA", "-1", "")]
def med(xs, fmt="%.1f"):
    v = nums(xs)
    if not v:
        return "NA"
    s = fmt % statistics.median(v)
    if rounds > 1 and len(v) > 1:
        s += (" (" + fmt + "-" + fmt + ")") % (min(v), max(v))
    return s
def pct(xs, limit):
    v = nums(xs)
    return [str(100.0 * x / limit) for x in v]
configs = ["none"] + ["mbit" + l for l in limits]
print()
hdr = "| limit | dir | root qdisc fq |"
sep = "|---|---|---|"
for p in streams:
    hdr += " TCP x%s Mbit/s | x%s %% of limit | x%s retransmits |" % (p, p, p)
    sep += "---|---|---|"
print(hdr); print(sep)
for c in configs:
    lim = float(c[4:]) if c != "none" else None
    for d in ("egress", "ingress"):
        line = "| %s | %s | %s |" % ("none (baseline)" if lim is None else "%s Mbit/s" % c[4:], d,
                                     "/".join(sorted(fq.get(c, {"?"}))))
        for p in streams:
            xs = rows.get((c, d, "tcp" + p), [])
            mb = [x[0] for x in xs]
            line += " %s | %s | %s |" % (med(mb), med(pct(mb, lim)) if lim else "-", med([x[1] for x in xs], "%.0f"))
        print(line)
print()
print("| pps limit | dir | steady pkt/s | % of limit | overall pkt/s (incl. burst) | offered pkt/s |")
print("|---|---|---|---|---|---|")
for c in ["none"] + sorted({k[0] for k in rows if k[0].startswith("pps")}):
    lim = float(c[3:]) if c != "none" else None
    for d in ("egress", "ingress"):
        xs = rows.get((c, d, "udp"), [])
        w = [x[0] for x in xs]
        print("| %s | %s | %s | %s | %s | %s |" % ("none (baseline)" if lim is None else "%d" % lim, d, med(w, "%.0f"),
              med(pct(w, lim)) if lim else "-", med([x[1] for x in xs], "%.0f"), med([x[2] for x in xs], "%.0f")))
EOF
echo
[ "${#NOT_APPLIED[@]}" = 0 ] || echo "WARNING: configs whose reload changed no VM (limits not applied, rows measure the previous config): ${NOT_APPLIED[*]}"
echo "vm1 rate_limited drops at the end: $RL; violations logged for vm1: $VIOL; kernel sch_fq: $KERNEL_FQ"
echo "medians of $ROUNDS rounds (min-max), iperf3 ${DURATION} s after 1 s omitted, UDP 64-byte payloads (steady state: first second left out)"
echo "kernel $(uname -r), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg), $(date -u +%F); $([ "$ENFORCE" = 1 ] && echo "vmfence $VMFENCE" || echo "NO_VMFENCE (unlimited)"); raw: $RAW"
e2e_finish
