# shellcheck shell=bash
# shellcheck disable=SC2034  # DAEMON_PID (hv_do) is read by lib.sh; FLEET_RC by the tests
# tests/e2e/fleet_lib.sh - two hypervisors and an etcd for the fleet tests.
#
# lib.sh assumes one hypervisor namespace ("$PFX-hv") and one daemon. This file
# adds what several hosts need, without forking lib.sh's helpers: hv_do HOST
# runs any lib.sh helper as if HOST were "the" hypervisor, by shadowing (bash
# `local`, dynamically scoped) the globals those helpers read:
#
#   PFX     "$PFX-HOST"   so ns_add/vm_add/route_vm/wan_add/serve_* name their
#                         namespaces "$PFX-HOST-NAME" and "hv" is "$PFX-HOST-hv"
#   HV      "$PFX-HOST-hv"
#   CONF    $WORK/HOST/config          (host.json, vms.d/)
#   PIN     /sys/fs/bpf/vmfence-e2e-$PFX-HOST   (VMFENCE_PIN_DIR)
#   RUNDIR  $WORK/HOST/run             (VMFENCE_RUN_DIR)
#   DLOG    $WORK/HOST/daemon.log, LOG_MARK (kept per host across calls)
#   DAEMON_PID  HOST's daemon
#
# so `hv_do hv2 vm_add b2 tap-b2 MAC`, `hv_do hv2 vmf status --json`,
# `hv_do hv1 mark_log`, `hv_do hv1 expect_log ...`, `hv_do hv2 drop_count b2
# cross_group` all work. From the test's own scope a host's namespaces are
# "HOST-hv" and "HOST-VM" (nsx hv1-a1 ..., tcp_probe hv2-b2 ...).
#
# Source after lib.sh; call fleet_init right after e2e_init. Cleanup: fleet_init
# chains fleet_cleanup in front of lib.sh's e2e_cleanup on EXIT (daemons and
# etcd stopped by process group, `vmfence down` per host, then e2e_cleanup
# removes the namespaces, every /sys/fs/bpf/vmfence-e2e-$PFX* and the work dir).
#
# etcd runs in namespace "$PFX-etcd" (192.0.2.1/30 toward hv1, 192.0.2.5/30
# toward hv2), data in $WORK/etcd, log $WORK/etcd.log; ETCD_URL[HOST] is the
# client URL as HOST reaches it. Its contents are read with curl against the
# gRPC gateway (/v3/kv/range), never etcdctl.

FLEET_HOSTS=(hv1 hv2)
declare -A FLEET_PID=() FLEET_MARK=() ETCD_URL=()
ETCD_PID=""
FLEET_PFX=""

# fleet_init: per-host work dirs, the cleanup chain.
fleet_init() {
	local h
	FLEET_PFX=$PFX
	FLEET_HV0=$HV FLEET_CONF0=$CONF FLEET_DLOG0=$DLOG FLEET_PIN0=$PIN FLEET_RUNDIR0=$RUNDIR
	for h in "${FLEET_HOSTS[@]}"; do
		mkdir -p "$WORK/$h/config/vms.d" "$WORK/$h/run"
		: >"$WORK/$h/daemon.log"
		FLEET_MARK[$h]=0
	done
	mkdir -p "$WORK/etcd"
	: >"$WORK/etcd.log"
	ETCD_URL[hv1]=http://192.0.2.1:2379
	ETCD_URL[hv2]=http://192.0.2.5:2379
	for h in curl setsid; do
		command -v "$h" >/dev/null || fatal "missing tool $h"
	done
	[ -x /usr/bin/etcd ] || fatal "/usr/bin/etcd missing (apt install etcd-server)"
	trap fleet_cleanup EXIT
}

# hv_do HOST cmd...: run cmd (usually a lib.sh helper) with HOST as "the" hv.
hv_do() {
	local h=$1; shift
	local PFX=$FLEET_PFX-$h HV=$FLEET_PFX-$h-hv CONF=$WORK/$h/config \
		PIN=/sys/fs/bpf/vmfence-e2e-$FLEET_PFX-$h RUNDIR=$WORK/$h/run \
		DLOG=$WORK/$h/daemon.log LOG_MARK=${FLEET_MARK[$h]:-0} DAEMON_PID=${FLEET_PID[$h]:-}
	local rc=0
	"$@" || rc=$?
	FLEET_MARK[$h]=$LOG_MARK
	return $rc
}

# vmfh HOST args...: the vmfence CLI for HOST (its namespace, pin and run dirs).
vmfh() { local h=$1; shift; hv_do "$h" vmf "$@"; }

# vmfq HOST args...: vmfh with its output appended to $WORK/cli.log (for
# expect_ok checks whose output is not the point, e.g. wait, down).
vmfq() { echo "--- $* ---" >>"$WORK/cli.log"; vmfh "$@" >>"$WORK/cli.log" 2>&1; }

# fleet_conf HOST / fleet_log HOST: HOST's config dir and daemon log.
fleet_conf() { echo "$WORK/$1/config"; }
fleet_log() { echo "$WORK/$1/daemon.log"; }

# fleet_mark_logs: mark_log on every host.
fleet_mark_logs() { local h; for h in "${FLEET_HOSTS[@]}"; do hv_do "$h" mark_log; done; }

# ------------------------------------------------------------- processes -----

# _detach OUT cmd...: start cmd in a session (and process group) of its own,
# stdin /dev/null, stdout+stderr appended to OUT, no other fd of this shell.
# DETACHED_PID = its pid = its process group (setsid does not fork here: the
# background subshell is no group leader; nsenter, env and `ip netns exec` exec).
_detach() {
	local out=$1 fd; shift
	(
		for fd in /proc/"$BASHPID"/fd/*; do
			fd=${fd##*/}
			[ "$fd" -gt 2 ] 2>/dev/null && eval "exec $fd>&-" 2>/dev/null
		done
		exec setsid "$@" </dev/null >>"$out" 2>&1
	) &
	DETACHED_PID=$!
}

# _stop_group PID SIGNAL SECONDS: signal the process group PID, wait up to
# SECONDS, then SIGKILL it; reaps PID (a child of this shell); rc in STOP_RC.
# (The shell's stderr is /dev/null meanwhile: no "Killed" job notice.)
_stop_group() {
	local pid=$1 sig=$2 n=$(( $3 * 10 )) i
	{
		kill -"$sig" -- "-$pid"
		for i in $(seq "$n"); do kill -0 "$pid" || break; sleep 0.1; done
		if kill -0 "$pid"; then
			say "pid $pid still there $3 s after SIG$sig: SIGKILL to its process group"
			kill -KILL -- "-$pid"
		fi
		wait "$pid"
		STOP_RC=$?
		# Anything left in the group (children of the daemon: actions) goes too.
		kill -KILL -- "-$pid"
	} 2>/dev/null
	return 0
}

# ------------------------------------------------------------- topology ------

# fleet_topology: namespaces etcd, hv1-hv, hv2-hv; etcd veths; the underlay
# ul0 (172.31.0.1/30 hv1 <-> 172.31.0.2/30 hv2) with routes for the other host's
# VM prefix (hv1: 10.2.0.0/16 via 172.31.0.2; hv2: 10.1.0.0/16 via 172.31.0.1).
fleet_topology() {
	local e=$FLEET_PFX-etcd h1=$FLEET_PFX-hv1-hv h2=$FLEET_PFX-hv2-hv
	hv_do hv1 hv_add
	hv_do hv2 hv_add
	ns_add etcd
	ip -n "$e" link add e-hv1 type veth peer name etcd0 netns "$h1" || fatal "veth e-hv1"
	ip -n "$e" link add e-hv2 type veth peer name etcd0 netns "$h2" || fatal "veth e-hv2"
	ip -n "$e" addr add 192.0.2.1/30 dev e-hv1
	ip -n "$e" addr add 192.0.2.5/30 dev e-hv2
	ip -n "$h1" addr add 192.0.2.2/30 dev etcd0
	ip -n "$h2" addr add 192.0.2.6/30 dev etcd0
	ip -n "$e" link set e-hv1 up
	ip -n "$e" link set e-hv2 up
	ip -n "$h1" link set etcd0 up
	ip -n "$h2" link set etcd0 up
	ip -n "$h1" link add ul0 type veth peer name ul0 netns "$h2" || fatal "veth ul0"
	ip -n "$h1" addr add 172.31.0.1/30 dev ul0
	ip -n "$h2" addr add 172.31.0.2/30 dev ul0
	ip -n "$h1" link set ul0 up
	ip -n "$h2" link set ul0 up
	ip -n "$h1" route add 10.2.0.0/16 via 172.31.0.2 dev ul0 || fatal "route hv1 -> 10.2.0.0/16"
	ip -n "$h2" route add 10.1.0.0/16 via 172.31.0.1 dev ul0 || fatal "route hv2 -> 10.1.0.0/16"
}

# fleet_vm HOST VM TAP MAC IP GW: a routed VM (seed 003 style) on HOST: netns
# "$PFX-HOST-VM" behind the veth TAP, IP/32, host route, proxy ARP, GW/32.
fleet_vm() {
	local h=$1 vm=$2 tap=$3 mac=$4 ip=$5 gw=$6
	hv_do "$h" vm_add "$vm" "$tap" "$mac" || fatal "vm $vm on $h"
	hv_do "$h" route_vm "$vm" "$tap" "$ip" "$gw" || fatal "route_vm $vm on $h"
}

# fleet_vm_del HOST VM: the VM is gone (its namespace, hence its TAP and
# route). Its servers go first: lib.sh's spawn remembers the subshell around
# nsenter, not the server, and e2e_cleanup finds servers through their
# namespace (ip netns pids), which would be gone by then.
fleet_vm_del() {
	local ns=$FLEET_PFX-$1-$2 p
	for p in $(ip netns pids "$ns" 2>/dev/null); do kill "$p" 2>/dev/null; done
	ip netns del "$ns"
}

# ------------------------------------------------------------- etcd ----------

# etcd_start [TIMEOUT]: /usr/bin/etcd in netns etcd (own process group, data
# dir $WORK/etcd: a restart finds its data), then wait until /health answers
# from every host.
# shellcheck disable=SC2120  # TIMEOUT is optional
etcd_start() {
	local to=${1:-20} h i ok
	[ -z "$ETCD_PID" ] || fatal "etcd_start: etcd already running (pid $ETCD_PID)"
	echo "----- etcd start $(date +%T) -----" >>"$WORK/etcd.log"
	_detach "$WORK/etcd.log" ip netns exec "$FLEET_PFX-etcd" /usr/bin/etcd \
		--name e2e --data-dir "$WORK/etcd/data" \
		--listen-client-urls http://0.0.0.0:2379 --advertise-client-urls http://192.0.2.1:2379 \
		--listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
		--initial-cluster e2e=http://127.0.0.1:2380 --logger zap --log-outputs stderr
	ETCD_PID=$DETACHED_PID
	for h in "${FLEET_HOSTS[@]}"; do
		ok=0
		for i in $(seq $((to * 5))); do
			if etcd_healthy "$h"; then ok=1; break; fi
			kill -0 "$ETCD_PID" 2>/dev/null || break
			sleep 0.2
		done
		if [ "$ok" != 1 ]; then
			tail -n 20 "$WORK/etcd.log"
			fatal "etcd (pid $ETCD_PID) not healthy from $h at ${ETCD_URL[$h]} within $to s"
		fi
	done
	say "etcd pid $ETCD_PID healthy from ${FLEET_HOSTS[*]}"
}

# etcd_healthy HOST: GET /health from HOST answers {"health":"true"}.
etcd_healthy() {
	nsx "$1-hv" curl -s --max-time 1 "${ETCD_URL[$1]}/health" 2>/dev/null | grep -q '"health" *: *"true"'
}

# etcd_kill: SIGKILL etcd's process group (a crash: no clean shutdown).
etcd_kill() {
	[ -n "$ETCD_PID" ] || return 0
	_stop_group "$ETCD_PID" KILL 5
	ETCD_PID=""
	say "etcd killed (SIGKILL)"
}

# etcd_restart: start it again on the same data dir.
etcd_restart() { etcd_kill; etcd_start "$@"; }

# _etcd_post HOST PATH JSON: POST to HOST's etcd gateway, print the answer.
_etcd_post() {
	nsx "$1-hv" curl -sf --max-time 3 -X POST -H 'Content-Type: application/json' \
		-d "$3" "${ETCD_URL[$1]}$2"
}

# etcd_range HOST PREFIX: "KEY<TAB>LEASE<TAB>VALUE" for every key under PREFIX
# (base64 on the wire, decoded here), as HOST reaches etcd. Non-zero when etcd
# does not answer.
etcd_range() {
	local body out
	body=$("$PY" -c '
import base64, json, sys
p = sys.argv[1].encode()
end = p[:-1] + bytes([p[-1] + 1])
print(json.dumps({"key": base64.b64encode(p).decode(), "range_end": base64.b64encode(end).decode()}))' "$2")
	out=$(_etcd_post "$1" /v3/kv/range "$body") || return 2
	printf '%s' "$out" | "$PY" -c '
import base64, json, sys
for kv in json.load(sys.stdin).get("kvs", []):
    print("%s\t%s\t%s" % (base64.b64decode(kv["key"]).decode(), kv.get("lease", "0"),
                          base64.b64decode(kv.get("value", "")).decode()))'
}

# etcd_keys HOST PREFIX: the keys under PREFIX, one a line (non-zero when
# etcd does not answer).
etcd_keys() {
	local out
	out=$(etcd_range "$1" "$2") || return 2
	[ -z "$out" ] || printf '%s\n' "$out" | cut -f1
}

# etcd_none HOST PREFIX: etcd answers and holds no key under PREFIX.
etcd_none() {
	local out
	out=$(etcd_keys "$1" "$2") && [ -z "$out" ]
}

# etcd_put HOST KEY VALUE
etcd_put() {
	_etcd_post "$1" /v3/kv/put "$("$PY" -c '
import base64, json, sys
print(json.dumps({"key": base64.b64encode(sys.argv[1].encode()).decode(),
                  "value": base64.b64encode(sys.argv[2].encode()).decode()}))' "$2" "$3")" >/dev/null
}

# ------------------------------------------------------------- daemons -------

# fleet_start HOST [TIMEOUT [VM...]]: vmfence run on HOST (own process group,
# no inherited fds, VMFENCE_PIN_DIR/VMFENCE_RUN_DIR set), then vmfence wait for
# the VMs named (default: every file in HOST's vms.d). Fatal when the daemon
# exits or a VM never goes live.
fleet_start() {
	local h=$1 to=${2:-15} vm f t0 rc; shift; [ $# -gt 0 ] && shift
	local vms=("$@")
	if ! enforced; then say "NO_VMFENCE: $h's daemon not started"; return 0; fi
	[ -z "${FLEET_PID[$h]:-}" ] || fatal "fleet_start $h: already running (pid ${FLEET_PID[$h]})"
	if [ ${#vms[@]} = 0 ]; then
		for f in "$WORK/$h/config"/vms.d/*.json; do [ -e "$f" ] && vms+=("$(basename "$f" .json)"); done
	fi
	echo "----- vmfence run on $h (start $(date +%T)) -----" >>"$WORK/$h/daemon.log"
	_detach "$WORK/$h/daemon.log" nsenter --net="/run/netns/$FLEET_PFX-$h-hv" -- \
		env VMFENCE_PIN_DIR="/sys/fs/bpf/vmfence-e2e-$FLEET_PFX-$h" VMFENCE_RUN_DIR="$WORK/$h/run" \
		"$VMFENCE" run --config "$WORK/$h/config"
	FLEET_PID[$h]=$DETACHED_PID
	t0=${EPOCHREALTIME/./}
	for vm in "${vms[@]}"; do
		if ! vmfh "$h" wait --vm "$vm" --timeout "$to" >>"$WORK/$h/wait.log" 2>&1; then
			rc=""
			if ! kill -0 "${FLEET_PID[$h]}" 2>/dev/null; then
				wait "${FLEET_PID[$h]}"; rc=$?; FLEET_PID[$h]=""
			fi
			echo "--- $h daemon log ---"; tail -n 40 "$WORK/$h/daemon.log"
			echo "--- $h wait log ---"; tail -n 10 "$WORK/$h/wait.log"
			fatal "$h: vmfence wait --vm $vm failed (daemon ${rc:+exited rc=$rc}${rc:-still running})"
		fi
	done
	kill -0 "${FLEET_PID[$h]}" 2>/dev/null || { tail -n 40 "$WORK/$h/daemon.log"; fatal "$h: daemon exited right after start"; }
	say "$h: daemon pid ${FLEET_PID[$h]} live for ${vms[*]:-no VM} in $(_elapsed "$t0") s"
}

# fleet_stop HOST [SIGNAL]: signal HOST's daemon (TERM), wait up to 10 s
# (then SIGKILL); FLEET_RC[HOST] = its exit status.
declare -A FLEET_RC=()
fleet_stop() {
	local h=$1 sig=${2:-TERM}
	[ -n "${FLEET_PID[$h]:-}" ] || return 0
	_stop_group "${FLEET_PID[$h]}" "$sig" 10
	FLEET_RC[$h]=$STOP_RC
	FLEET_PID[$h]=""
	say "$h: daemon exited rc=$STOP_RC after SIG$sig"
}

# ------------------------------------------------------------- status --------

# fleet_py HOST CODE: run CODE (python; `st` = HOST's `vmfence status --json`,
# `fl` = its "fleet" object or {}) and print what it prints. Non-zero when the
# status cannot be read or CODE fails.
fleet_py() {
	local st
	st=$(vmfh "$1" status --json 2>/dev/null) || return 2
	"$PY" -c '
import json, sys
st = json.loads(sys.argv[1])
fl = st.get("fleet") or {}
exec(sys.argv[2])
' "$st" "$2"
}

# remote_vms HOST: HOST's remote VMs, "NAME HOST GROUP ADDR[,ADDR...]" a line, sorted.
remote_vms() {
	fleet_py "$1" '
for v in sorted(fl.get("remote_vms", []), key=lambda v: (v.get("host", ""), v.get("name", ""))):
    print(v.get("name"), v.get("host"), v.get("group"), ",".join(v.get("addresses", [])))'
}

# has_remote HOST NAME@OWNER...: HOST lists every NAME as a remote VM of OWNER.
has_remote() {
	local h=$1 rv x; shift
	rv=$(remote_vms "$h") || return 1
	for x in "$@"; do
		echo "$rv" | awk -v n="${x%@*}" -v o="${x#*@}" '$1 == n && $2 == o { f = 1 } END { exit !f }' || return 1
	done
}

# lacks_remote HOST NAME@OWNER...: HOST lists none of them (status readable).
lacks_remote() {
	local h=$1 rv x; shift
	rv=$(remote_vms "$h") || return 1
	for x in "$@"; do
		echo "$rv" | awk -v n="${x%@*}" -v o="${x#*@}" '$1 == n && $2 == o { f = 1 } END { exit f }' || return 1
	done
}

# no_remote_of HOST OWNER: HOST lists no remote VM of OWNER.
no_remote_of() {
	local rv
	rv=$(remote_vms "$1") || return 1
	! echo "$rv" | awk -v o="$2" '$2 == o { f = 1 } END { exit !f }'
}

# etcd_connected HOST: "true" / "false" (fleet.etcd_connected), "" when absent.
etcd_connected() {
	fleet_py "$1" 'v = fl.get("etcd_connected"); print("" if v is None else str(v).lower())'
}

# fleet_metric HOST SERIES: the value of SERIES (name with labels, exactly as
# exposed) from HOST's GET http://127.0.0.1:9727/metrics; empty when absent.
fleet_metric() {
	nsx "$1-hv" curl -sf --max-time 3 "http://${FLEET_METRICS:-127.0.0.1:9727}/metrics" |
		awk -v s="$2" 'index($0, s " ") == 1 { print $2; exit }'
}

# metric_is HOST SERIES VALUE: HOST exposes SERIES with the numeric value VALUE.
metric_is() {
	local v
	v=$(fleet_metric "$1" "$2")
	[ -n "$v" ] && awk -v a="$v" -v b="$3" 'BEGIN { exit !(a + 0 == b + 0) }'
}

# wait_until SECONDS cmd...: poll cmd every 0.2 s until it succeeds (non-zero
# on timeout); WAITED_MS = how long it took.
wait_until() {
	local n=$(( $1 * 5 )) _ t0=${EPOCHREALTIME/./} rc=1; shift
	for _ in $(seq "$n"); do
		"$@" && { rc=0; break; }
		sleep 0.2
	done
	[ "$rc" = 0 ] || { "$@"; rc=$?; }
	WAITED_MS=$(( (${EPOCHREALTIME/./} - t0) / 1000 ))
	return $rc
}

# ------------------------------------------------------------- cleanup -------

# fleet_cleanup: stop the daemons (process groups), `vmfence down` on every
# host while etcd still answers, stop etcd, then lib.sh's e2e_cleanup (which
# removes the namespaces, the pins /sys/fs/bpf/vmfence-e2e-$PFX* and the work
# dir) with the exit status this cleanup was called with.
fleet_cleanup() {
	local rc=$? h
	set +e
	# An exit from inside hv_do sees its locals: back to the test's own values.
	PFX=$FLEET_PFX HV=$FLEET_HV0 CONF=$FLEET_CONF0 DLOG=$FLEET_DLOG0 PIN=$FLEET_PIN0 RUNDIR=$FLEET_RUNDIR0
	for h in "${FLEET_HOSTS[@]}"; do
		[ -n "${FLEET_PID[$h]:-}" ] && _stop_group "${FLEET_PID[$h]}" TERM 5 && FLEET_PID[$h]=""
	done
	if enforced && [ -x "$VMFENCE" ]; then
		for h in "${FLEET_HOSTS[@]}"; do
			{ [ -e "/run/netns/$FLEET_PFX-$h-hv" ] && [ -f "$WORK/$h/config/host.json" ]; } || continue
			timeout 20 nsenter --net="/run/netns/$FLEET_PFX-$h-hv" -- \
				env VMFENCE_PIN_DIR="/sys/fs/bpf/vmfence-e2e-$FLEET_PFX-$h" VMFENCE_RUN_DIR="$WORK/$h/run" \
				"$VMFENCE" down --config "$WORK/$h/config" </dev/null >>"$WORK/down.log" 2>&1 ||
				say "cleanup: vmfence down on $h failed (see $WORK/down.log)"
		done
	fi
	[ -n "$ETCD_PID" ] && _stop_group "$ETCD_PID" KILL 5 && ETCD_PID=""
	(exit "$rc")
	e2e_cleanup
}
