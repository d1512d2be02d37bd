#!/usr/bin/env bash
# Control-plane benchmark (issue 5): how long vmfence takes to apply N VM specs
# from scratch, to re-adopt them on a restart, and how long one VM's spec
# change takes from "file renamed into place" to "new policy generation in
# the kernel's VM map" (what the datapath enforces).
#
# Everything runs in a network namespace this script creates ("$PFX-hvN"),
# with its own bpffs pin dir and run dir, and is removed afterwards. Needs
# root and the vmfence binary (VMFENCE=..., default <repo>/build/vmfence).
#
# Per size N (SIZES, default "1000 10000"):
#   - N spec files vms.d/vmI.json: IPv4 /32 + IPv6 /128, a gateway, 4 egress
#     rules (incl. port lists and a range) and 1 ingress rule each.
#   - interfaces: N TAPs (ip tuntap) when N <= IFACES_MAX (default 1000),
#     otherwise only the TAP of the VM whose spec the change test rewrites
#     (the others are "not present yet": policy installed, no attach).
#   - cold start: fresh pin dir, `vmfence run` launched -> log line
#     "enforcing N VMs" (every policy written, every present TAP attached,
#     nftables applied). Also the daemon's RSS then.
#   - restart: SIGTERM, `vmfence run` again on the pinned state (adopt, swap
#     programs in place) -> "enforcing N VMs".
#   - change latency (CHANGES times, default 20): a python harness writes
#     vms.d/.vm1.json.tmp, renames it to vm1.json (t0) and spins on the pinned
#     VM map (bpf(BPF_MAP_LOOKUP_ELEM) on vm1's ifindex) until policy_id
#     changes (t1 = enforced); then until run/vms.json (what `vmfence status`
#     reads for names) shows it (t2). p50/p99/max of t1-t0 and t2-t0, and the
#     number of reloads the agent ran per change.
#   - attach latency (ATTACHES times, default 10) with N VMs loaded: the
#     harness creates the TAP of a VM whose interface was absent
#     (TUNSETIFF + TUNSETPERSIST on /dev/net/tun, t0 just before) and spins
#     until the VM map has its ifindex and both tcx link pins exist (what
#     `vmfence wait` waits for). Also the agent's own "X us after the link
#     event" figures.
# Output: a table per size, and markdown rows at the end (for BENCHMARKS.md).
# Env: SIZES, IFACES_MAX, CHANGES, ATTACHES, KEEP=1 (keep work dir).
set -u
. "$(dirname "$0")/../tests/e2e/lib.sh"
. "$(dirname "$0")/../tests/e2e/live_lib.sh"
SIZES=${SIZES:-"1000 10000"}
IFACES_MAX=${IFACES_MAX:-1000}
CHANGES=${CHANGES:-20}
ATTACHES=${ATTACHES:-10}
e2e_init cpbench
# lib.sh's vmf runs in "$PFX-hv"; here every size has its own namespace $HV.
vmf() { nsenter --net="/run/netns/$HV" -- env VMFENCE_PIN_DIR="$PIN" VMFENCE_RUN_DIR="$RUNDIR" "$VMFENCE" "$@"; }
ROWS=()

# gen_specs DIR N: N VM spec files.
gen_specs() {
	"$PY" - "$1" "$2" <<'EOF'
import json, os, sys
d, n = sys.argv[1], int(sys.argv[2])
os.makedirs(d, exist_ok=True)
for i in range(1, n + 1):
    hi, lo = i >> 8, i & 255
    spec = {
        "name": "vm%d" % i, "interface": "t%d" % i,
        "mac": "02:00:00:00:%02x:%02x" % (hi, lo),
        "addresses": ["10.%d.%d.2/32" % (hi, lo), "fec0::%x:2/128" % i],
        "gateway": ["10.%d.%d.1" % (hi, lo)],
        "egress": [
            {"to": "0.0.0.0/0", "proto": "tcp", "ports": ["80", "443"]},
            {"to": "203.0.113.7/32", "proto": "udp", "ports": ["51900"]},
            {"to": "198.51.100.0/24", "proto": "tcp", "ports": ["8000-8999"]},
            {"to": "::/0", "proto": "tcp", "ports": ["443"]},
        ],
        "ingress": [{"from": "100.64.0.0/10", "proto": "tcp", "ports": ["22"]}],
    }
    with open(os.path.join(d, "vm%d.json" % i), "w") as f:
        json.dump(spec, f, indent=1)
EOF
}

# time_start N: launch the daemon (log: $DLOG); START_S = seconds until
# "enforcing N VMs" is logged (polled every 2 ms). Sets DAEMON_PID.
time_start() {
	local n=$1 t0
	echo "----- vmfence run (start $(date +%T)) -----" >>"$DLOG"
	local before
	before=$(wc -l <"$DLOG")
	t0=${EPOCHREALTIME/./}
	nsenter --net="/run/netns/$HV" -- env VMFENCE_PIN_DIR="$PIN" VMFENCE_RUN_DIR="$RUNDIR" \
		"$VMFENCE" run --config "$CONF" >>"$DLOG" 2>&1 &
	DAEMON_PID=$!
	while :; do
		if tail -n "+$((before + 1))" "$DLOG" | grep -q "enforcing $n VMs"; then break; fi
		if ! kill -0 "$DAEMON_PID" 2>/dev/null; then
			tail -n 20 "$DLOG"; fatal "daemon exited during start"
		fi
		sleep 0.002
	done
	START_S=$(_elapsed "$t0")
}

rss_mb() { awk '/VmRSS/ {printf "%.0f", $2 / 1024}' "/proc/$1/status" 2>/dev/null; }
# maps_memlock_mb: kernel memory of the datapath's maps (bpftool's bytes_memlock),
# the pinned maps and every per-VM inner map (flow/fragment tables, policy tries).
maps_memlock_mb() {
	bpftool -j map show 2>/dev/null | "$PY" -c '
import json, sys
t = sum(m.get("bytes_memlock", 0) for m in json.load(sys.stdin) if m.get("name", "").startswith("vmfence"))
print("%.1f" % (t / 1048576))'
}

CHANGE_HARNESS='
import ctypes, json, os, struct, sys, time
specdir, name, ifindex, pin, state, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], int(sys.argv[6])
libc = ctypes.CDLL(None, use_errno=True)
NR_BPF = 321
def bpf(cmd, attr):
    buf = ctypes.create_string_buffer(attr, 128)
    r = libc.syscall(NR_BPF, cmd, buf, 128)
    if r < 0:
        return -ctypes.get_errno()
    return r
path = ctypes.create_string_buffer(pin.encode() + b"/vmfence_vms_v1")
fd = bpf(7, struct.pack("=QII", ctypes.addressof(path), 0, 0))  # BPF_OBJ_GET
assert fd >= 0, "BPF_OBJ_GET %d" % fd
key = ctypes.c_uint32(ifindex)
val = ctypes.create_string_buffer(64)
lookup = struct.pack("=IIQQQ", fd, 0, ctypes.addressof(key), ctypes.addressof(val), 0)
def gen():
    if bpf(1, lookup) != 0:   # BPF_MAP_LOOKUP_ELEM
        return None
    return struct.unpack_from("=I", val.raw, 8)[0]   # vmfence_vm.policy_id
def state_gen():
    try:
        st = json.load(open(state))
    except Exception:
        return None
    for v in st.get("vms", []):
        if v.get("name") == name:
            return v.get("policy_id", v.get("policy_generation"))
    return None
base = json.load(open(os.path.join(specdir, name + ".json")))
res = []
for k in range(n):
    g0 = gen()
    spec = dict(base)
    spec["egress"] = base["egress"] + [{"to": "192.0.2.%d/32" % (k % 250 + 1), "proto": "udp", "ports": [str(10000 + k)]}]
    tmp = os.path.join(specdir, "." + name + ".json.tmp")
    with open(tmp, "w") as f:
        json.dump(spec, f)
    t0 = time.monotonic()
    os.rename(tmp, os.path.join(specdir, name + ".json"))
    while True:
        g = gen()
        if g is not None and g != g0:
            break
        if time.monotonic() - t0 > 60:
            sys.exit("no new generation after 60 s")
    t1 = time.monotonic()
    while state_gen() != g:
        if time.monotonic() - t1 > 60:
            sys.exit("state file never showed generation %d" % g)
        time.sleep(0.0005)
    t2 = time.monotonic()
    res.append((t1 - t0, t2 - t0, g0, g))
    time.sleep(0.3)   # let the agent finish the reload (nftables, state) before the next
def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100.0 * (len(xs) - 1))))]
enf = [r[0] * 1000 for r in res]
pub = [r[1] * 1000 for r in res]
print("samples_ms_enforced", " ".join("%.1f" % x for x in enf))
print("samples_ms_published", " ".join("%.1f" % x for x in pub))
print("RESULT %.1f %.1f %.1f %.1f %.1f %.1f" % (pct(enf, 50), pct(enf, 99), max(enf), pct(pub, 50), pct(pub, 99), max(pub)))
'

ATTACH_HARNESS='
import ctypes, fcntl, os, socket, struct, sys, time
pin, names = sys.argv[1], sys.argv[2:]
libc = ctypes.CDLL(None, use_errno=True)
def bpf(cmd, attr):
    buf = ctypes.create_string_buffer(attr, 128)
    return libc.syscall(321, cmd, buf, 128)
path = ctypes.create_string_buffer(pin.encode() + b"/vmfence_vms_v1")
fd = bpf(7, struct.pack("=QII", ctypes.addressof(path), 0, 0))
assert fd >= 0
key = ctypes.c_uint32(0)
val = ctypes.create_string_buffer(64)
lookup = struct.pack("=IIQQQ", fd, 0, ctypes.addressof(key), ctypes.addressof(val), 0)
res = []
for name in names:
    time.sleep(0.3)
    t0 = time.monotonic()
    tun = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(tun, 0x400454ca, struct.pack("16sH22x", name.encode(), 0x0002 | 0x1000))  # TUNSETIFF tap, no PI
    fcntl.ioctl(tun, 0x400454cb, 1)                                                     # TUNSETPERSIST
    os.close(tun)
    key.value = socket.if_nametoindex(name)
    links = ["%s/links/if%d_%s" % (pin, key.value, d) for d in ("from_vm", "to_vm")]
    while not (bpf(1, lookup) == 0 and all(os.path.exists(l) for l in links)):
        if time.monotonic() - t0 > 60:
            sys.exit("%s not enforced after 60 s" % name)
    res.append((time.monotonic() - t0) * 1000)
def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100.0 * (len(xs) - 1))))]
print("samples_ms_attached", " ".join("%.1f" % x for x in res))
print("RESULT %.1f %.1f %.1f" % (pct(res, 50), pct(res, 99), max(res)))
'

for N in $SIZES; do
	section "N = $N VMs"
	HV=$PFX-hv$N
	PIN=/sys/fs/bpf/vmfence-e2e-$PFX-n$N
	RUNDIR=$WORK/run$N
	CONF=$WORK/config$N
	mkdir -p "$RUNDIR" "$CONF/vms.d"
	ns_add "hv$N"
	write_host '{}'
	t=${EPOCHREALTIME/./}
	gen_specs "$CONF/vms.d" "$N"
	say "generated $N spec files ($(du -sh "$CONF/vms.d" | cut -f1)) in $(_elapsed "$t") s"
	# TAPs present from the start: all but the last ATTACHES VMs (created
	# later, for the attach test), or only vm1 above IFACES_MAX.
	nif=$((N - ATTACHES))
	[ "$N" -gt "$IFACES_MAX" ] && nif=1
	LATE=()
	for i in $(seq $((nif + 1)) $((nif + ATTACHES))); do LATE+=("t$i"); done
	t=${EPOCHREALTIME/./}
	for i in $(seq "$nif"); do echo "tuntap add dev t$i mode tap"; done >"$WORK/links$N.batch"
	ip -n "$HV" -batch "$WORK/links$N.batch" || fatal "creating $nif TAPs"
	say "created $nif TAPs in $(_elapsed "$t") s"
	t=${EPOCHREALTIME/./}
	out=$(vmf check --config "$CONF" 2>&1) || { echo "$out" | tail -5; fatal "check failed"; }
	CHECK_S=$(_elapsed "$t")
	say "vmfence check: $out in $CHECK_S s"

	time_start "$N"; COLD_S=$START_S
	COLD_RSS=$(rss_mb "$DAEMON_PID")
	MEMLOCK=$(maps_memlock_mb)
	say "cold start: enforcing $N VMs after $COLD_S s ($nif TAPs attached), daemon RSS ${COLD_RSS} MB, maps ${MEMLOCK} MB (bpftool memlock)"
	vmf wait --vm vm1 --timeout 10 >/dev/null || fatal "vm1 not enforced"
	fills=$(vmf status --json | "$PY" -c '
import json, sys
m = json.load(sys.stdin)["maps"]
print(", ".join("%s %d/%d" % (k.replace("vmfence_", "").replace("_v1", ""), v["entries"], v["max_entries"]) for k, v in m.items() if v["entries"]))')
	say "map fill: $fills"
	stop_daemon TERM
	time_start "$N"; WARM_S=$START_S
	say "restart (adopt pinned state, swap programs): enforcing $N VMs after $WARM_S s"
	vmf wait --vm vm1 --timeout 10 >/dev/null || fatal "vm1 not enforced after restart"
	sleep 0.5
	IFX=$(ipn "hv$N" -o link show dev t1 | awk -F: '{print $1}')
	mark=$(wc -l <"$DLOG")
	out=$(nsx "hv$N" "$PY" -c "$CHANGE_HARNESS" "$CONF/vms.d" vm1 "$IFX" "$PIN" "$RUNDIR/vms.json" "$CHANGES" 2>&1) ||
		{ echo "$out"; fatal "change harness failed"; }
	echo "$out" | sed 's/^/    /'
	read -r _ E50 E99 EMAX P50 P99 PMAX < <(echo "$out" | grep '^RESULT')
	RELOADS=$(tail -n "+$((mark + 1))" "$DLOG" | grep -c 'reload (spec files changed)')
	say "one VM's change ($CHANGES samples): enforced p50 $E50 ms, p99 $E99 ms (max $EMAX); state published p50 $P50 ms, p99 $P99 ms; the agent ran $RELOADS reloads for $CHANGES renames"
	RELOAD_RSS=$(rss_mb "$DAEMON_PID")
	mark=$(wc -l <"$DLOG")
	out=$(nsx "hv$N" "$PY" -c "$ATTACH_HARNESS" "$PIN" "${LATE[@]}" 2>&1) || { echo "$out"; fatal "attach harness failed"; }
	echo "$out" | sed 's/^/    /'
	read -r _ A50 A99 AMAX < <(echo "$out" | grep '^RESULT')
	own=$(tail -n "+$((mark + 1))" "$DLOG" | sed -nE 's/.* ([0-9]+) us after the link event.*/\1/p' | sort -n | tr '\n' ' ')
	say "attach of a new TAP with $N VMs loaded ($ATTACHES samples): TAP created -> enforced p50 $A50 ms, p99 $A99 ms (max $AMAX); agent's own figures (us): $own"
	OWN_MAX=$(echo "$own" | awk '{print $NF / 1000}')
	stop_daemon TERM
	vmf down --config "$CONF" >>"$WORK/down.log" 2>&1
	ip netns del "$HV"
	ROWS+=("| $N | $nif | $COLD_S s | $WARM_S s | $E50 / $E99 ms | $P50 / $P99 ms | $RELOADS / $CHANGES | $A50 / $A99 ms (agent's own max $OWN_MAX ms) | ${COLD_RSS} / ${RELOAD_RSS} MB | ${MEMLOCK} MB |")
done

section results
echo "| VMs | TAPs at start | cold start (run -> \"enforcing N VMs\") | restart (adopt) | one VM's change: rename -> enforced p50 / p99 | rename -> state published p50 / p99 | reloads / changes | new TAP -> enforced p50 / p99 | daemon RSS (start / after) | maps memlock |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for r in "${ROWS[@]}"; do echo "$r"; done
echo "kernel $(uname -r), $(nproc) CPUs, $(date -u +%F)"
# lib.sh's cleanup expects HV to be a namespace of this run.
HV=$PFX-none
e2e_finish
