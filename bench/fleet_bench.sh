#!/usr/bin/env bash
# Fleet benchmark: etcd propagation and sync at 10,000 remote VMs.
#
# One real etcd (/usr/bin/etcd) in namespace "$PFX-etcd"; one hypervisor
# namespace "$PFX-hv1-hv" running a real `vmfence run` (fleet configured,
# lease_s 30, no local VMs, a dummy underlay ul0); simulated hosts written by
# build/vmfence_fleet_publisher (bench/fleet_publisher.cpp: EtcdClient,
# record_key/record_json, one lease per host, as agent/fleet/fleet.cpp does)
# from namespace "$PFX-pub". Two veths leave etcd's namespace:
#   e-hv1 192.0.2.1/30 <-> hv1 etcd0 192.0.2.2   (the daemon, extra watchers)
#   e-pub 192.0.2.9/30 <-> pub etcd0 192.0.2.10  (the publishers)
# so etcd's own interface counters split publisher traffic from watch fan-out.
#
# Phases:
#   0 populate: HOSTS x VMS records (default 50 x 200 = 10,000; each VM one
#     IPv4 /32 + one IPv6 /128, so 20,000 owner-map keys).
#   1 library: `vmfence_fleet_publisher list` (range_prefix in pages of 2000 +
#     parse_record + resolve + remote_owners), LIST_REPS times.
#   2 full sync, SYNC_REPS times from scratch (fresh pin dir, run dir, no saved
#     view): t0 just before the daemon is exec'd; t1 when its pinned
#     vmfence_owners_v2 holds every remote key (`... count`, polls every 2 ms).
#     The daemon's own reload lines (maps written / interfaces ms) are kept.
#   3 propagation: SAMPLES times, a new VM of host "simprop" is put (t0 just
#     before the put) and the bench spins on bpf_map_lookup_elem of its IPv4
#     key in the pinned map until present; then deleted, until absent.
#     etcd-side bytes (ip -s link in etcd's namespace) around the phase.
#   4 fan-out: WATCHERS extra watchers (EtcdClient::watch_prefix, in hv1's
#     namespace, behind the same veth) + the daemon, FANOUT_SAMPLES changes:
#     bytes per change per watcher.
# Cleanup on any exit: watchers and daemon (process groups), `vmfence down`,
# etcd, namespaces, pins, work dir (KEEP=1 keeps the work dir).
# Env: HOSTS, VMS, SYNC_REPS (5), LIST_REPS (5), SAMPLES (200), FANOUT_SAMPLES
# (50), WATCHERS (3), GAP_MS (30), PERF=1 (perf record the daemon during phase 3,
# report its top symbols), PUBLISHER (default <repo>/build/vmfence_fleet_publisher).
set -u -o pipefail
. "$(dirname "$0")/../tests/e2e/lib.sh"
. "$(dirname "$0")/../tests/e2e/fleet_lib.sh"
HOSTS=${HOSTS:-50}
VMS=${VMS:-200}
SYNC_REPS=${SYNC_REPS:-5}
LIST_REPS=${LIST_REPS:-5}
SAMPLES=${SAMPLES:-200}
FANOUT_SAMPLES=${FANOUT_SAMPLES:-50}
WATCHERS=${WATCHERS:-3}
GAP_MS=${GAP_MS:-30}
PUBLISHER=${PUBLISHER:-$(cd "$(dirname "$0")/.." && pwd)/build/vmfence_fleet_publisher}
[ -x "$PUBLISHER" ] || { echo "FAIL: $PUBLISHER missing (cmake --build build --target vmfence_fleet_publisher)"; exit 1; }

# shellcheck disable=SC2034  # read by fleet_lib.sh
FLEET_HOSTS=(hv1)
e2e_init fleetbench
fleet_init
WATCHER_PIDS=()
bench_cleanup() {
	local rc=$? p
	set +e
	for p in "${WATCHER_PIDS[@]}"; do _stop_group "$p" TERM 3; done
	(exit "$rc")
	fleet_cleanup
}
trap bench_cleanup EXIT
H1=$PFX-hv1-hv
E=$PFX-etcd
P=$PFX-pub
URL_HV=http://192.0.2.1:2379
URL_PUB=http://192.0.2.9:2379
HPIN=/sys/fs/bpf/vmfence-e2e-$PFX-hv1
HRUN=$WORK/hv1/run
WANT=$((HOSTS * VMS * 2))
# nsenter, not `ip netns exec`: the latter remounts /sys, hiding the bpffs pins.
pub() { nsenter --net="/run/netns/$P" -- "$PUBLISHER" "$@"; }

# ------------------------------------------------------------- topology ------
hv_do hv1 hv_add
ns_add etcd
ns_add pub
ip -n "$E" link add e-hv1 type veth peer name etcd0 netns "$H1" || fatal "veth e-hv1"
ip -n "$E" link add e-pub type veth peer name etcd0 netns "$P" || fatal "veth e-pub"
ip -n "$E" addr add 192.0.2.1/30 dev e-hv1
ip -n "$E" addr add 192.0.2.9/30 dev e-pub
ip -n "$H1" addr add 192.0.2.2/30 dev etcd0
ip -n "$P" addr add 192.0.2.10/30 dev etcd0
ip -n "$E" link set e-hv1 up
ip -n "$E" link set e-pub up
ip -n "$H1" link set etcd0 up
ip -n "$P" link set etcd0 up
ip -n "$H1" link add ul0 type veth peer name ul0p || fatal "veth ul0"
ip -n "$H1" link set ul0 up
ip -n "$H1" link set ul0p up
etcd_start
hv_do hv1 write_host "{
  \"on_violation\": { \"action\": \"alert\" },
  \"metrics\": { \"listen\": \"127.0.0.1:9727\" },
  \"fleet\": { \"etcd\": [\"$URL_HV\"], \"host\": \"hv1\", \"interfaces\": [\"ul0\"], \"lease_s\": 30 }
}"

# ctr DEV: "rx_bytes tx_bytes rx_packets tx_packets" of DEV in etcd's namespace.
ctr() {
	ip -n "$E" -s -j link show dev "$1" | "$PY" -c '
import json, sys
s = json.load(sys.stdin)[0]["stats64"]
print(s["rx"]["bytes"], s["tx"]["bytes"], s["rx"]["packets"], s["tx"]["packets"])'
}
# per DEV BEFORE AFTER N: "rx/N tx/N" bytes
per() { "$PY" -c 'import sys; a=sys.argv[1].split(); b=sys.argv[2].split(); n=int(sys.argv[3])
print("%.0f %.0f %.1f %.1f" % ((int(b[0])-int(a[0]))/n, (int(b[1])-int(a[1]))/n, (int(b[2])-int(a[2]))/n, (int(b[3])-int(a[3]))/n))' "$1" "$2" "$3"; }
med() { "$PY" -c 'import statistics, sys; v=[float(x) for x in sys.argv[1:]]
print("median %.0f ms, min %.0f, max %.0f (n=%d)" % (statistics.median(v), min(v), max(v), len(v)))' "$@"; }
load() { awk '{print $1, $2, $3}' /proc/loadavg; }

section "machine: $(nproc) CPUs, load $(load); etcd $(/usr/bin/etcd --version | head -1)"

# ------------------------------------------------------------- 0 populate ----
section "0: populate $HOSTS hosts x $VMS VMs"
pub populate --etcd "$URL_PUB" --hosts "$HOSTS" --vms "$VMS" --threads 4 | tee "$WORK/populate.txt" ||
	fatal "populate failed"

# ------------------------------------------------------------- 1 library -----
section "1: Fleet library alone (list + parse + resolve + remote_owners), $LIST_REPS times"
pub list --etcd "$URL_PUB" --reps "$LIST_REPS" | tee "$WORK/list.txt" || fatal "list failed"

# ------------------------------------------------------------- 2 full sync ---
section "2: full sync from scratch, $SYNC_REPS times (want $WANT owner keys)"
SYNC_MS=() UP_MS=() LOAD_MS=() FLEET_MS=() SYNC_BYTES=()
for rep in $(seq "$SYNC_REPS"); do
	rm -rf -- "$HPIN" "$HRUN" && mkdir -p "$HRUN"
	: >"$WORK/hv1/daemon.log"
	"$PUBLISHER" count --pin "$HPIN" --want "$WANT" --timeout 60 >"$WORK/count.$rep" 2>&1 &
	cpid=$!
	b_sync=$(ctr e-hv1)
	t0=$(date +%s%N)
	_detach "$WORK/hv1/daemon.log" nsenter --net="/run/netns/$H1" -- \
		env VMFENCE_PIN_DIR="$HPIN" VMFENCE_RUN_DIR="$HRUN" "$VMFENCE" run --config "$WORK/hv1/config"
	FLEET_PID[hv1]=$DETACHED_PID
	wait "$cpid" || { tail -n 30 "$WORK/hv1/daemon.log"; fatal "rep $rep: owner map never held $WANT keys"; }
	a_sync=$(ctr e-hv1)
	SYNC_BYTES+=("$(per "$b_sync" "$a_sync" 1 | awk '{print $2}')")
	read -r t1 n <"$WORK/count.$rep"
	ms=$(( (t1 - t0) / 1000000 ))
	SYNC_MS+=("$ms")
	sleep 1.5  # the log's lines for this sync (reload, view saved)
	cp "$WORK/hv1/daemon.log" "$WORK/daemon.sync.$rep.log"
	# Split at the daemon's "enforcing" line (its start: BPF load, nftables) and
	# the rest (fleet: lease, list, reload, owner-map writes). Log times are ms.
	read -r up loadms <<<"$("$PY" - "$WORK/hv1/daemon.log" "$t0" <<'EOF'
import datetime, re, sys
t0 = int(sys.argv[2]) / 1e9
up = loadms = -1
for line in open(sys.argv[1]):
    m = re.match(r"(\S+) info (.*)", line)
    if not m: continue
    ts = datetime.datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S.%f").timestamp()
    g = re.search(r"programs loaded in (\d+) ms", m.group(2))
    if g: loadms = int(g.group(1))
    if m.group(2).startswith("enforcing ") and up < 0: up = round((ts - t0) * 1000)
print(up, loadms)
EOF
)"
	UP_MS+=("$up") LOAD_MS+=("$loadms") FLEET_MS+=("$((ms - up))")
	say "rep $rep: $n keys in $ms ms: daemon start $up ms (programs loaded $loadms ms), then fleet $((ms - up)) ms (load $(load))"
	grep -E 'enforcing|reload \(fleet|fleet:' "$WORK/hv1/daemon.log" | sed 's/^/    | /' | head -8
	if [ "$rep" != "$SYNC_REPS" ]; then
		fleet_stop hv1
		hv_do hv1 vmf down --config "$WORK/hv1/config" >>"$WORK/down.log" 2>&1
	fi
done
REMOTE_METRIC=$(fleet_metric hv1 vmfence_fleet_remote_vms)
say "vmfence_fleet_remote_vms = $REMOTE_METRIC"

# ------------------------------------------------------------- 3 propagation -
section "3: propagation, $SAMPLES adds + $SAMPLES deletes (gap $GAP_MS ms)"
: >"$WORK/hv1/daemon.log"
b_pub=$(ctr e-pub) b_hv=$(ctr e-hv1)
ts0=$(date +%s%N)
if [ "${PERF:-0}" = 1 ]; then
	perf record -q -g -F 499 -p "${FLEET_PID[hv1]}" -o "$WORK/perf.data" >/dev/null 2>&1 &
	PERF_PID=$!
fi
pub propagate --etcd "$URL_PUB" --pin "$HPIN" --samples "$SAMPLES" --gap-ms "$GAP_MS" | tee "$WORK/prop.txt" ||
	fatal "propagation failed"
a_pub=$(ctr e-pub) a_hv=$(ctr e-hv1)
ts1=$(date +%s%N)
if [ -n "${PERF_PID:-}" ]; then
	kill -INT "$PERF_PID"; wait "$PERF_PID"
	perf report -i "$WORK/perf.data" --no-children --sort dso,symbol --percent-limit 1.5 --stdio 2>/dev/null |
		grep -E '^ +[0-9.]+%' | sed -E 's/ +- +- *$//; s/\(.{60}.*$/(...)/' | cut -c1-150 | head -25 | tee "$WORK/perf.txt"
fi
PROP_PUB=$(per "$b_pub" "$a_pub" $((SAMPLES * 2)))
PROP_HV=$(per "$b_hv" "$a_hv" $((SAMPLES * 2)))
say "phase took $(( (ts1 - ts0) / 1000000 )) ms, load $(load)"
say "per change, e-pub (publisher) rx/tx bytes, rx/tx packets: $PROP_PUB"
say "per change, e-hv1 (daemon) rx/tx bytes, rx/tx packets: $PROP_HV"
RELOADS=$(grep -c 'reload (fleet view changed)' "$WORK/hv1/daemon.log")
"$PY" - "$WORK/hv1/daemon.log" <<'EOF' | tee "$WORK/reload_profile.txt"
import re, statistics, sys
rx = re.compile(r'reload \(fleet view changed\).*parsed in ([\d.]+) ms, maps written in ([\d.]+) ms, interfaces ([\d.]+) ms, nftables ([\d.]+) ms, state ([\d.]+) ms')
cols = [[], [], [], [], []]
for line in open(sys.argv[1]):
    m = rx.search(line)
    if m:
        for i in range(5): cols[i].append(float(m.group(i + 1)))
names = ["read files", "admit+reconcile (resolve)", "apply+set_remote", "nftables", "state"]
print("daemon reloads per fleet wake: %d" % len(cols[0]))
for n, c in zip(names, cols):
    if c: print("  %-28s median %.1f ms  max %.1f ms" % (n, statistics.median(c), max(c)))
EOF
say "idle check: e-hv1 over 10 s"
b_idle=$(ctr e-hv1); sleep 10; a_idle=$(ctr e-hv1)
IDLE=$(per "$b_idle" "$a_idle" 10)
say "idle e-hv1 rx/tx bytes per second: $IDLE"

# ------------------------------------------------------------- 4 fan-out -----
section "4: watch fan-out, daemon + $WATCHERS extra watchers, $FANOUT_SAMPLES adds + deletes"
for i in $(seq "$WATCHERS"); do
	_detach "$WORK/watcher.$i.log" nsenter --net="/run/netns/$H1" -- "$PUBLISHER" watch --etcd "$URL_HV"
	WATCHER_PIDS+=("$DETACHED_PID")
done
sleep 1
b_hv=$(ctr e-hv1)
pub propagate --etcd "$URL_PUB" --pin "$HPIN" --samples "$FANOUT_SAMPLES" --gap-ms "$GAP_MS" >"$WORK/fanout.txt" ||
	fatal "fan-out propagation failed"
a_hv=$(ctr e-hv1)
FAN_HV=$(per "$b_hv" "$a_hv" $((FANOUT_SAMPLES * 2 * (WATCHERS + 1))))
for p in "${WATCHER_PIDS[@]}"; do _stop_group "$p" TERM 3; done
WATCHER_PIDS=()
cat "$WORK"/watcher.*.log | sed 's/^/    | /'
say "per change per watcher (e-hv1 / $((WATCHERS + 1))) rx/tx bytes, rx/tx packets: $FAN_HV"

# ------------------------------------------------------------- table ---------
section "results ($HOSTS hosts x $VMS VMs, load at end $(load))"
tot=$(awk '/total/ {print $4}' "$WORK/list.txt")
echo "| measurement | result |"
echo "| --- | --- |"
echo "| populate ($((HOSTS * VMS)) puts, 4 threads) | $(sed 's/^populate: //' "$WORK/populate.txt") |"
echo "| library: list + parse + resolve + remote_owners | ${tot#p50=} p50 ($(grep -E 'range_prefix|parse_record|resolve|remote_owners' "$WORK/list.txt" | awk '{printf "%s%s %s", sep, $1, $4; sep="; "}')) |"
echo "| full sync, daemon exec -> $WANT keys in owner map | $(med "${SYNC_MS[@]}"); raw ${SYNC_MS[*]} |"
echo "| of which daemon start (exec -> \"enforcing\" line) | $(med "${UP_MS[@]}"); BPF programs loaded in ${LOAD_MS[*]} ms |"
echo "| of which fleet (\"enforcing\" -> all keys in map) | $(med "${FLEET_MS[@]}"); raw ${FLEET_MS[*]} |"
echo "| etcd -> daemon bytes during a full sync (list + lease) | ${SYNC_BYTES[*]} B |"
echo "| propagation add (put -> key in map) | $(awk '/^add/ {print $3, $4, $6, $7}' "$WORK/prop.txt") |"
echo "| propagation delete (del -> key gone) | $(awk '/^del/ {print $3, $4, $6, $7}' "$WORK/prop.txt") |"
echo "| of which the put / delete call (etcd commit) | $(awk '/^rpc/ {print $3, $4, $6, $7}' "$WORK/prop.txt") |"
echo "| daemon full reloads / fleet wake | $RELOADS for $((SAMPLES * 2)) changes; $(grep -E 'apply\+set_remote|resolve' "$WORK/reload_profile.txt" | tr -s ' ' | paste -sd';') |"
read -r -a x <<<"$PROP_PUB"; set -- "${x[@]}"; echo "| publisher <-> etcd per change (put or del) | $1 B to etcd, $2 B back ($3 / $4 packets) |"
read -r -a x <<<"$PROP_HV"; set -- "${x[@]}"; echo "| etcd -> daemon watch per change | $2 B ($4 packets), $1 B back (ACKs) |"
read -r -a x <<<"$FAN_HV"; set -- "${x[@]}"; echo "| etcd -> each of $((WATCHERS + 1)) watchers per change | $2 B ($4 packets), $1 B back |"
read -r -a x <<<"$IDLE"; set -- "${x[@]}"; echo "| idle daemon <-> etcd | $1 B/s in, $2 B/s out (keepalive, progress) |"
echo "| vmfence_fleet_remote_vms after sync | $REMOTE_METRIC |"
