#!/usr/bin/env bash
# Real-traffic benchmark: vmfence vs the nftables design of seed 000 it replaces.
#
# Topology (all inside namespaces "$PFX-*", PFX=s0b<pid>; nothing in the root netns):
#   hv    the hypervisor: per VM i a bridge b<i> with 10.H.L.1/24 (H=i/250, L=i%250)
#         and a veth t<i> (the VM's "TAP", enslaved to b<i>); routing between the
#         bridges (L3 forwarding: where seed 000's nft forward chain applies);
#         wan0 198.51.100.1/24 (host.json wan_interfaces) toward netns "wan".
#         One nat table, identical in every configuration:
#         ip saddr 10.0.0.0/8 oifname "wan0" masquerade.
#   vm1, vm2  the same-group pair (10.0.1.2, 10.0.2.2; group "pair"), vm2 serves.
#   vm3   10.0.3.2, its own group, 1,000 egress rules (999 non-matching /24s
#         172.16.0.0/24.. tcp 443, plus 198.51.100.2/32 tcp 5201,7000: the one
#         that matches); client of the WAN servers.
#   idle  ONE shared namespace holding the VM ends p<i> (up, MAC set, no address)
#         of VMs 4..N: their TAPs, bridges, addresses and specs are real, so the
#         rule/map sizes scale, without N namespaces.
#   wan   198.51.100.2: iperf3 -s and tcp_rr server.
#
# Configurations (interleaved, order rotated each round):
#   nofilter       no filter table (nat table only)
#   seed           table inet s0bfilt, forward policy drop: ct state
#                  established,related accept; N*(N-1)-2 `iifname bI oifname bJ drop`
#                  (every pair but vm1<->vm2); then vm1<->vm2 accept; then
#                  iifname "b*" oifname "wan0" accept (seed order: isolation first)
#   vmap           same, the matrix as one map: iifname . oifname vmap @iso
#   vmf_filtered   vmfence run, every VM mode filtered
#   vmf_conntrack  vmfence run, every VM mode conntrack
# Measured per configuration: pair (vm1 -> vm2) and WAN (vm3 -> wan): iperf3
# single stream (Gbit/s), TCP_RR (trans/s, p50/p99 us), TCP_CRR (conn/s), and
# the time to enforce (nft: `nft -f` of the whole filter table; vmfence: launch
# of `vmfence run` -> log line "enforcing N VMs", then `vmfence wait` on the
# measured VMs). Clients run on CPU $CLIENT_CPU, servers on CPU $SERVER_CPU
# (taskset). Before measuring, an isolation probe vm3 -> vm2:7000 must fail
# (pass under nofilter).
#
# Env: RT_PRIO (50: clients/servers SCHED_FIFO 50; 0 = off), VMFENCE (default <repo>/build/vmfence), SIZES ("5 50 200"), ROUNDS (3),
#      DURATION (4 s per cell), CONFIGS, CLIENT_CPU (0), SERVER_CPU (1),
#      FLOWS (limits.flows of the measured VMs, 262144), OUT_DIR (kept; raw TSV,
#      tables, logs), NFT_TIMEOUT (900 s per nft -f).
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
VMFENCE=${VMFENCE:-$REPO/build/vmfence}
SIZES=${SIZES:-"5 50 200"}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-4}
CONFIGS=${CONFIGS:-"nofilter seed vmap vmf_filtered vmf_conntrack"}
CLIENT_CPU=${CLIENT_CPU:-0}
SERVER_CPU=${SERVER_CPU:-1}
FLOWS=${FLOWS:-262144}
RT_PRIO=${RT_PRIO:-50}
NFT_TIMEOUT=${NFT_TIMEOUT:-900}
PY=/usr/bin/python3
PFX=s0b$$
OUT_DIR=${OUT_DIR:-$(mktemp -d /tmp/seed000-bench.XXXXXX)}
mkdir -p "$OUT_DIR"
WORK=$(mktemp -d /tmp/seed000-work.XXXXXX)
PIN=/sys/fs/bpf/$PFX-pins
RUNDIR=$WORK/run
RAW=$OUT_DIR/raw.tsv
PIDS=()
DAEMON_PID=""
CUR_CONF=""
HV=$PFX-hv

T0=${EPOCHREALTIME/./}
say() { local d=$(( ${EPOCHREALTIME/./} - T0 )); printf '[%4d.%02d] %s\n' $((d / 1000000)) $(((d % 1000000) / 10000)) "$*"; }
die() { say "FATAL: $*"; exit 1; }
# secs_since T0_US: seconds, 3 decimals
secs_since() { local d=$(( ${EPOCHREALTIME/./} - $1 )); printf '%d.%03d' $((d / 1000000)) $(((d % 1000000) / 1000)); }
nsx() { local ns=$1; shift; nsenter --net="/run/netns/$PFX-$ns" -- "$@"; }
vmf() { nsenter --net="/run/netns/$HV" -- env VMFENCE_PIN_DIR="$PIN" VMFENCE_RUN_DIR="$RUNDIR" "$VMFENCE" "$@"; }
# Clients and servers run SCHED_FIFO RT_PRIO (0: normal policy) so that the other
# work on the machine does not preempt the measured processes.
CHRT=(); [ "$RT_PRIO" -gt 0 ] && CHRT=(chrt -f "$RT_PRIO")
rec() { printf '%s\t%s\t%s\t%s\t%s\n' "$N" "$ROUND" "$CFG" "$1" "$2" >>"$RAW"; }

[ "$(id -u)" = 0 ] || die "needs root"
for t in ip nft nsenter taskset iperf3 jq cc; do command -v $t >/dev/null || die "missing $t"; done
case " $CONFIGS " in *" vmf_"*) [ -x "$VMFENCE" ] || die "no vmfence binary at $VMFENCE (set VMFENCE=...)" ;; esac

stop_daemon() {
	[ -n "$DAEMON_PID" ] || return 0
	kill -TERM "$DAEMON_PID" 2>/dev/null
	local i
	for i in $(seq 100); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.1; done
	kill -0 "$DAEMON_PID" 2>/dev/null && { say "daemon did not exit after SIGTERM: SIGKILL"; kill -KILL "$DAEMON_PID"; }
	wait "$DAEMON_PID" 2>/dev/null
	DAEMON_PID=""
	if [ -n "$CUR_CONF" ] && [ -e "/run/netns/$HV" ]; then
		vmf down --config "$CUR_CONF" >>"$WORK/down.log" 2>&1 || say "vmfence down failed (see $WORK/down.log)"
	fi
	CUR_CONF=""
}

teardown_topology() {
	local p ns
	stop_daemon
	for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
	sleep 0.2
	for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
	PIDS=()
	for ns in $(ip netns list | awk '{print $1}' | grep "^$PFX-"); do
		for p in $(ip netns pids "$ns" 2>/dev/null); do kill "$p" 2>/dev/null; done
		ip netns del "$ns"
	done
	[ -e "$PIN" ] && rm -rf -- "$PIN"
	return 0
}

cleanup() {
	local rc=$?
	trap - EXIT INT TERM
	set +e
	say "cleanup"
	teardown_topology
	cp "$WORK"/*.log "$OUT_DIR"/ 2>/dev/null
	rm -rf -- "$WORK"
	say "results kept in $OUT_DIR"
	exit "$rc"
}
trap cleanup EXIT
trap 'say interrupted; exit 130' INT TERM

say "command: SIZES=\"$SIZES\" ROUNDS=$ROUNDS DURATION=$DURATION CONFIGS=\"$CONFIGS\" VMFENCE=$VMFENCE $0"
say "load average at start: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) CPUs; kernel $(uname -r)"
{
	echo "command: SIZES=\"$SIZES\" ROUNDS=$ROUNDS DURATION=$DURATION CONFIGS=\"$CONFIGS\" VMFENCE=$VMFENCE $0"
	echo "start: $(date -Is) loadavg $(cut -d' ' -f1-3 /proc/loadavg) cpus $(nproc) kernel $(uname -r)"
	echo "vmfence: $(ls -l --time-style=+%F_%T "$VMFENCE" 2>/dev/null | awk '{print $6, $7}')"
} >"$OUT_DIR/meta.txt"
printf 'N\tround\tconfig\tmetric\tvalue\n' >"$RAW"

cc -O2 -Wall -o "$WORK/tcp_rr" "$REPO/bench/tcp_rr.c" || die "cc tcp_rr.c"
TCPRR=$WORK/tcp_rr

ns_add() {
	ip netns add "$PFX-$1" || die "ip netns add $PFX-$1"
	nsx "$1" ip link set lo up
	nsx "$1" sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0 \
		net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
}

hl() { echo "$(($1 / 250)) $(($1 % 250))"; }   # VM i -> "H L"
vm_ip() { set -- $(hl "$1"); echo "10.$1.$2.2"; }
vm_mac() { printf '02:00:00:00:%02x:%02x' $(($1 >> 8)) $(($1 & 255)); }

# build_topology N
build_topology() {
	local n=$1 i h l peerns peer t
	t=${EPOCHREALTIME/./}
	for ns in hv idle wan vm1 vm2 vm3; do ns_add "$ns"; done
	nsx hv sysctl -qw net.ipv4.ip_forward=1
	# br_netfilter is loaded on this host: keep bridged frames out of the IP hooks
	# (as on a host without it); identical for every configuration.
	nsx hv sysctl -qw net.bridge.bridge-nf-call-iptables=0 net.bridge.bridge-nf-call-ip6tables=0 \
		net.bridge.bridge-nf-call-arptables=0 2>/dev/null
	: >"$WORK/hv.batch"; : >"$WORK/idle.batch"
	for i in $(seq "$n"); do
		read -r h l <<<"$(hl "$i")"
		if [ "$i" -le 3 ]; then peerns=$PFX-vm$i; peer=eth0; else peerns=$PFX-idle; peer=p$i; fi
		{
			echo "link add b$i type bridge"
			echo "link add t$i type veth peer name $peer address $(vm_mac "$i") netns $peerns"
			echo "link set t$i master b$i"
			echo "link set t$i up"
			echo "link set b$i up"
			echo "addr add 10.$h.$l.1/24 dev b$i"
		} >>"$WORK/hv.batch"
		[ "$i" -gt 3 ] && echo "link set p$i up" >>"$WORK/idle.batch"
	done
	ip -n "$HV" -batch "$WORK/hv.batch" || die "hv batch"
	[ -s "$WORK/idle.batch" ] && { ip -n "$PFX-idle" -batch "$WORK/idle.batch" || die "idle batch"; }
	for i in 1 2 3; do
		nsx vm$i ip link set eth0 up
		nsx vm$i ip addr add "$(vm_ip $i)/24" dev eth0
		gw=$(vm_ip $i); gw=${gw%.2}.1
		nsx vm$i ip route add default via "$gw"
		nsx vm$i sysctl -qw net.ipv4.tcp_tw_reuse=1 net.ipv4.ip_local_port_range="1024 65535"
	done
	ip -n "$HV" link add wan0 type veth peer name eth0 netns "$PFX-wan" || die "wan veth"
	nsx hv ip addr add 198.51.100.1/24 dev wan0
	nsx hv ip link set wan0 up
	nsx wan ip addr add 198.51.100.2/24 dev eth0
	nsx wan ip link set eth0 up
	nsx wan ip route add 10.0.0.0/8 via 198.51.100.1
	# Identical in every configuration (seed 000 masquerades VM -> internet).
	nsx hv nft -f - <<-'EOF' || die "nat table"
	table ip s0bnat {
		chain post {
			type nat hook postrouting priority srcnat; policy accept;
			ip saddr 10.0.0.0/8 oifname "wan0" masquerade
		}
	}
	EOF
	# Many short connections (TCP_CRR) in every configuration: do not let
	# TIME_WAIT conntrack entries of earlier cells fill the table.
	nsx hv sysctl -qw net.netfilter.nf_conntrack_tcp_timeout_time_wait=2 || say "warn: time_wait sysctl"
	# servers: vm2 (pair) and wan
	for ns in vm2 wan; do
		nsx $ns "${CHRT[@]}" taskset -c "$SERVER_CPU" iperf3 -s -p 5201 >>"$WORK/servers.log" 2>&1 &
		PIDS+=("$!")
		nsx $ns "${CHRT[@]}" taskset -c "$SERVER_CPU" "$TCPRR" server 7000 >>"$WORK/servers.log" 2>&1 &
		PIDS+=("$!")
	done
	sleep 0.5
	say "topology N=$n built in $(secs_since "$t") s ($(nsx hv ip -o link | wc -l) links in hv)"
}

# gen_configs N: vmfence config dirs for both modes, nft files for both designs.
gen_configs() {
	local n=$1 mode
	for mode in filtered conntrack; do
		"$PY" - "$WORK/conf-$mode" "$n" "$mode" "$FLOWS" <<-'EOF' || die "gen specs"
		import json, os, shutil, sys
		d, n, mode, flows = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
		shutil.rmtree(d, ignore_errors=True)
		os.makedirs(d + "/vms.d")
		json.dump({"wan_interfaces": ["wan0"], "on_violation": {"action": "alert"}}, open(d + "/host.json", "w"))
		for i in range(1, n + 1):
		    h, l = i // 250, i % 250
		    spec = {"name": "vm%d" % i, "interface": "t%d" % i,
		            "mac": "02:00:00:00:%02x:%02x" % (i >> 8, i & 255),
		            "addresses": ["10.%d.%d.2/32" % (h, l)], "gateway": ["10.%d.%d.1" % (h, l)],
		            "group": "vm%d" % i, "mode": mode,
		            "egress": [{"to": "0.0.0.0/0", "proto": "tcp", "ports": ["443"]}]}
		    if i in (1, 2):
		        spec["group"] = "pair"
		        spec["egress"] = []
		    if i == 3:
		        spec["egress"] = [{"to": "172.%d.%d.0/24" % (16 + k // 256, k % 256), "proto": "tcp", "ports": ["443"]}
		                          for k in range(999)]
		        spec["egress"].append({"to": "198.51.100.2/32", "proto": "tcp", "ports": ["5201", "7000"]})
		    if i <= 3:
		        spec["limits"] = {"flows": flows}
		    json.dump(spec, open("%s/vms.d/vm%d.json" % (d, i), "w"))
		EOF
		if [ -x "$VMFENCE" ]; then
			vmf check --config "$WORK/conf-$mode" >"$WORK/check.log" 2>&1 || { cat "$WORK/check.log"; die "vmfence check $mode"; }
		fi
	done
	local matrix='for (i = 1; i <= n; i++) for (j = 1; j <= n; j++) if (i != j && !((i == 1 && j == 2) || (i == 2 && j == 1)))'
	{
		echo 'table inet s0bfilt {'
		echo '  chain forward {'
		echo '    type filter hook forward priority filter; policy drop;'
		echo '    ct state established,related accept'
		awk -v n="$n" "BEGIN { $matrix printf \"    iifname \\\"b%d\\\" oifname \\\"b%d\\\" drop\\n\", i, j }"
		echo '    iifname "b1" oifname "b2" accept'
		echo '    iifname "b2" oifname "b1" accept'
		echo '    iifname "b*" oifname "wan0" accept'
		echo '  }'
		echo '}'
	} >"$WORK/seed.nft"
	{
		echo 'table inet s0bfilt {'
		echo '  map iso {'
		echo '    type ifname . ifname : verdict'
		echo '    elements = {'
		awk -v n="$n" "BEGIN { $matrix printf \"      \\\"b%d\\\" . \\\"b%d\\\" : drop,\\n\", i, j }"
		echo '    }'
		echo '  }'
		echo '  chain forward {'
		echo '    type filter hook forward priority filter; policy drop;'
		echo '    ct state established,related accept'
		echo '    iifname . oifname vmap @iso'
		echo '    iifname "b1" oifname "b2" accept'
		echo '    iifname "b2" oifname "b1" accept'
		echo '    iifname "b*" oifname "wan0" accept'
		echo '  }'
		echo '}'
	} >"$WORK/vmap.nft"
	say "configs for N=$n: seed.nft $(grep -c ' drop$' "$WORK/seed.nft") drop rules, vmap $(grep -c ': drop,' "$WORK/vmap.nft") elements"
}

# enable CFG: put the configuration in force; records enforce_s.
enable() {
	local t before mode
	case $CFG in
	nofilter) ;;
	seed | vmap)
		t=${EPOCHREALTIME/./}
		if ! nsx hv timeout "$NFT_TIMEOUT" nft -f "$WORK/$CFG.nft" 2>"$WORK/nft.err"; then
			say "nft -f $CFG failed: $(head -c 300 "$WORK/nft.err")"
			return 1
		fi
		rec enforce_s "$(secs_since "$t")"
		;;
	vmf_*)
		mode=${CFG#vmf_}
		CUR_CONF=$WORK/conf-$mode
		local dlog=$WORK/daemon.log
		echo "----- N=$N round $ROUND $CFG $(date +%T) -----" >>"$dlog"
		before=$(wc -l <"$dlog")
		t=${EPOCHREALTIME/./}
		nsenter --net="/run/netns/$HV" -- env VMFENCE_LOG_LEVEL="${VMFENCE_LOG_LEVEL:-info}" VMFENCE_PIN_DIR="$PIN" VMFENCE_RUN_DIR="$RUNDIR" \
			"$VMFENCE" run --config "$CUR_CONF" >>"$dlog" 2>&1 &
		DAEMON_PID=$!
		while ! tail -n "+$((before + 1))" "$dlog" | grep -q "enforcing $N VMs"; do
			kill -0 "$DAEMON_PID" 2>/dev/null || { tail -n 20 "$dlog"; DAEMON_PID=""; say "daemon exited"; return 1; }
			if [ $(( ${EPOCHREALTIME/./} - t )) -gt 600000000 ]; then say "no 'enforcing $N VMs' after 600 s"; return 1; fi
			sleep 0.005
		done
		rec enforce_s "$(secs_since "$t")"
		for v in vm1 vm2 vm3; do
			vmf wait --vm $v --timeout 10 >>"$WORK/wait.log" 2>&1 || { say "vmfence wait --vm $v failed"; return 1; }
		done
		rec enforce_wait_s "$(secs_since "$t")"
		;;
	esac
	return 0
}

disable() {
	case $CFG in
	seed | vmap) nsx hv nft delete table inet s0bfilt ;;
	vmf_*) stop_daemon ;;
	esac
	return 0
}

# probe CLIENT_NS HOST: >0 when a TCP_CRR to HOST:7000 completes within ~2 s.
probe() { nsx "$1" timeout 5 "$TCPRR" crr "$2" 7000 0.3 2>/dev/null | sed -n 's/.* n=\([0-9]*\) .*/\1/p'; }

# measure PATH CLIENT_NS HOST
measure() {
	local p=$1 c=$2 host=$3 out v
	out=$(nsx "$c" "${CHRT[@]}" taskset -c "$CLIENT_CPU" timeout $((DURATION + 20)) iperf3 -c "$host" -p 5201 -t "$DURATION" -J 2>>"$WORK/client.err")
	v=$(echo "$out" | jq -r '.end.sum_received.bits_per_second // empty' 2>/dev/null)
	[ -n "$v" ] && rec "${p}_gbps" "$(awk -v b="$v" 'BEGIN { printf "%.3f", b / 1e9 }')" || say "iperf3 $p failed: $(echo "$out" | jq -r .error 2>/dev/null)"
	sleep 0.3
	out=$(nsx "$c" "${CHRT[@]}" taskset -c "$CLIENT_CPU" timeout $((DURATION + 20)) "$TCPRR" rr "$host" 7000 "$DURATION" 2>>"$WORK/client.err")
	for v in trans_s p50_us p99_us; do
		rec "${p}_rr_${v%_*}" "$(echo "$out" | sed -n "s/.*$v=\([0-9.]*\).*/\1/p")"
	done
	sleep 0.3
	out=$(nsx "$c" "${CHRT[@]}" taskset -c "$CLIENT_CPU" timeout $((DURATION + 20)) "$TCPRR" crr "$host" 7000 "$DURATION" 2>>"$WORK/client.err")
	rec "${p}_crr" "$(echo "$out" | sed -n 's/.*conn_s=\([0-9.]*\).*/\1/p')"
	rec "${p}_crr_err" "$(echo "$out" | sed -n 's/.*errors=\([0-9]*\).*/\1/p')"
	sleep 0.3
}

for N in $SIZES; do
	ROUND=0 CFG=setup
	say "===== N=$N ====="
	[ "$N" -ge 3 ] || die "N must be >= 3"
	build_topology "$N"
	gen_configs "$N"
	read -r -a CFGS <<<"$CONFIGS"
	nc=${#CFGS[@]}
	for ROUND in $(seq "$ROUNDS"); do
		for k in $(seq 0 $((nc - 1))); do
			CFG=${CFGS[$(((k + ROUND - 1) % nc))]}
			say "N=$N round $ROUND: $CFG (load $(cut -d' ' -f1 /proc/loadavg))"
			if ! enable; then rec error enable; disable; continue; fi
			ok_pair=$(probe vm1 10.0.2.2); ok_wan=$(probe vm3 198.51.100.2); iso=$(probe vm3 10.0.2.2)
			rec probe_pair "${ok_pair:-0}"; rec probe_wan "${ok_wan:-0}"; rec probe_cross "${iso:-0}"
			if [ "$CFG" != nofilter ] && [ "${iso:-0}" != 0 ]; then say "WARNING: $CFG lets vm3 reach vm2 (isolation broken)"; fi
			if [ "$CFG" = nofilter ] && [ "${iso:-0}" = 0 ]; then say "WARNING: vm3 -> vm2 fails without filtering (topology?)"; fi
			[ "${ok_pair:-0}" != 0 ] && [ "${ok_wan:-0}" != 0 ] || say "WARNING: $CFG: allowed probe failed (pair ${ok_pair:-0}, wan ${ok_wan:-0})"
			measure pair vm1 10.0.2.2
			measure wan vm3 198.51.100.2
			if [ "${CFG#vmf_}" != "$CFG" ]; then
				vmf status --json >"$WORK/status.json" 2>/dev/null
				rec vmf_drops "$(jq '[.vms[] | select(.name == "vm1" or .name == "vm2" or .name == "vm3") | .drops | to_entries[] | .value] | add // 0' "$WORK/status.json" 2>/dev/null)"
				rec vmf_enforced "$(jq '[.vms[] | select(.enforced == true)] | length' "$WORK/status.json" 2>/dev/null)"
			fi
			disable
		done
	done
	say "N=$N done; tearing down"
	teardown_topology
done
say "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "end: $(date -Is) loadavg $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT_DIR/meta.txt"

"$PY" "$REPO/bench/seed000_report.py" "$RAW" "$OUT_DIR/meta.txt" | tee "$OUT_DIR/tables.md"
