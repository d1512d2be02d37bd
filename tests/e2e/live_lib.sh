# shellcheck shell=bash
# shellcheck disable=SC2034  # the *_SENDER/RECEIVER/CLIENT scripts are used by the sourcing test
# tests/e2e/live_lib.sh - extra helpers for live-operation tests (issue 5) and
# the control-plane benchmark. Source after lib.sh (uses $CONF, $PY, nsx, vmf).

# write_vm_atomic NAME JSON: what a VM manager does: write a dot-file in
# vms.d, then rename it into place (one inotify IN_MOVED_TO).
write_vm_atomic() {
	local tmp="$CONF/vms.d/.$1.json.tmp.$$"
	printf '%s\n' "$2" >"$tmp" && mv -f -- "$tmp" "$CONF/vms.d/$1.json"
}

# vm_status VM FIELD: one field of VM's entry in `vmfence status --json`
# (FIELD may be a dotted path: drops.egress_denied); empty when absent.
vm_status() {
	vmf status --json 2>/dev/null | "$PY" -c '
import json, sys
vm, path = sys.argv[1], sys.argv[2].split(".")
try:
    st = json.load(sys.stdin)
except Exception:
    sys.exit(0)
for v in st.get("vms", []):
    if v.get("name") == vm:
        x = v
        for p in path:
            x = x.get(p) if isinstance(x, dict) else None
        if x is not None:
            print(json.dumps(x) if not isinstance(x, str) else x)
        break
' "$1" "$2"
}

# wait_generation VM OLD [SECONDS]: until VM's policy_generation differs from
# OLD (default 5 s); prints the new one. Fails on timeout.
wait_generation() {
	local vm=$1 old=$2 n=$(( ${3:-5} * 20 )) g i
	for i in $(seq "$n"); do
		g=$(vm_status "$vm" policy_generation)
		if [ -n "$g" ] && [ "$g" != "$old" ]; then echo "$g"; return 0; fi
		sleep 0.05
	done
	echo "${g:-}"
	return 1
}

# log_count REGEX: daemon log lines matching REGEX (whole log).
log_count() { grep -Ec -- "$1" "$DLOG"; }

# log_wait_count REGEX N [SECONDS]: until at least N lines of the whole log match.
log_wait_count() {
	local _ n=$(( ${3:-5} * 20 ))
	for _ in $(seq "$n"); do
		[ "$(log_count "$1")" -ge "$2" ] && return 0
		sleep 0.05
	done
	return 1
}

# log_epoch_us LINE: the spdlog timestamp at the start of LINE as epoch µs
# (local time, millisecond precision).
log_epoch_us() {
	local ts=${1%% *}
	local sec ms
	sec=$(date -d "${ts%.*}" +%s) || return 1
	ms=${ts##*.}
	echo $(( sec * 1000000 + 10#$ms * 1000 ))
}

# py_bg NS OUT SCRIPT ARGS...: run a python script (text) in the background in
# netns NS, stdout+stderr to OUT; sets LAST_PID (also killed on cleanup).
py_bg() {
	local ns=$1 out=$2 script=$3; shift 3
	nsx "$ns" "$PY" -u -c "$script" "$@" >"$out" 2>&1 &
	LAST_PID=$!
	E2E_BG_PIDS+=("$LAST_PID")
}

# Sequence-numbered UDP sender: DST RATE SECONDS OUT_JSON PORT...
# Sends one datagram "SEQ" per port every 1/RATE s (paced on the monotonic
# clock, catching up when late) and writes {"sent": N, "ports": [...]}.
# Before the measured stream it sends a few "warm" datagrams to the first
# port (ARP resolution of the gateway) and pauses.
UDP_SENDER='
import json, socket, sys, time
dst, rate, secs, out = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
ports = [int(p) for p in sys.argv[5:]]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
for _ in range(3):
    s.sendto(b"warm", (dst, ports[0]))
    time.sleep(0.1)
time.sleep(0.3)
errors = 0
t0 = time.monotonic()
i = 0
while True:
    now = time.monotonic()
    if now - t0 >= secs:
        break
    due = t0 + i / rate
    if due > now:
        time.sleep(due - now)
    for p in ports:
        try:
            s.sendto(b"%d" % i, (dst, p))
        except OSError:
            errors += 1
    i += 1
json.dump({"sent": i, "ports": ports, "send_errors": errors, "t0": time.time() - (time.monotonic() - t0),
           "secs": time.monotonic() - t0}, open(out, "w"))
'

# UDP receiver: OUT_JSON PORT...: counts distinct sequence numbers per port
# until OUT_JSON.stop exists, then writes {"PORT": {"count": n, "seqs":
# [[lo, hi], ...] (received ranges), "warm": n}}.
UDP_RECEIVER='
import json, os, select, socket, sys, time
out = sys.argv[1]
ports = [int(p) for p in sys.argv[2:]]
socks = {}
for p in ports:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, 33, 1 << 23)   # SO_RCVBUFFORCE
    except OSError:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 23)
    s.bind(("0.0.0.0", p))
    s.setblocking(False)
    socks[s.fileno()] = (p, s)
seen = {p: set() for p in ports}
warm = {p: 0 for p in ports}
first = {p: None for p in ports}
print("ready", flush=True)
while not os.path.exists(out + ".stop"):
    r, _, _ = select.select(list(socks), [], [], 0.1)
    for fd in r:
        p, s = socks[fd]
        while True:
            try:
                d = s.recv(2048)
            except BlockingIOError:
                break
            if d == b"warm":
                warm[p] += 1
                continue
            try:
                seen[p].add(int(d))
                if first[p] is None:
                    first[p] = time.time()
            except ValueError:
                pass
res = {}
for p in ports:
    xs = sorted(seen[p])
    ranges = []
    for x in xs:
        if ranges and x == ranges[-1][1] + 1:
            ranges[-1][1] = x
        else:
            ranges.append([x, x])
    res[str(p)] = {"count": len(xs), "ranges": ranges, "warm": warm[p]}
json.dump(res, open(out, "w"))
'

# TCP line client: HOST PORT SECONDS LOG: connect, send "N\n" every 100 ms,
# log "EPOCH echo N" for every echoed line, "EPOCH connected", "EPOCH error ..."
# and "EPOCH eof".
TCP_LINE_CLIENT='
import socket, sys, time
host, port, secs, log = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
f = open(log, "a", buffering=1)
try:
    s = socket.create_connection((host, port), timeout=3)
except OSError as e:
    f.write("%f error connect %s\n" % (time.time(), e)); sys.exit(1)
f.write("%f connected\n" % time.time())
s.settimeout(0.02)
t_end = time.monotonic() + secs
nxt = time.monotonic()
i = 0
buf = b""
while time.monotonic() < t_end:
    if time.monotonic() >= nxt:
        try:
            s.send(b"%d\n" % i)
        except socket.timeout:
            pass
        except OSError as e:
            f.write("%f error send %s\n" % (time.time(), e)); break
        i += 1
        nxt += 0.1
    try:
        d = s.recv(4096)
    except socket.timeout:
        continue
    except OSError as e:
        f.write("%f error recv %s\n" % (time.time(), e)); break
    if not d:
        f.write("%f eof\n" % time.time()); break
    buf += d
    while b"\n" in buf:
        line, buf = buf.split(b"\n", 1)
        f.write("%f echo %s\n" % (time.time(), line.decode()))
f.write("%f done sent %d\n" % (time.time(), i))
'

# vms_has_ifindex IFINDEX: the pinned VM map has an entry for IFINDEX.
vms_has_ifindex() {
	bpftool map dump pinned "$PIN/vmfence_vms_v1" 2>/dev/null | grep -Eq "\"key\": $1,"
}

# link_pins IFINDEX: how many tcx link pins the agent keeps for IFINDEX.
link_pins() {
	local n=0 f
	for f in "$PIN/links/if$1_from_vm" "$PIN/links/if$1_to_vm"; do [ -e "$f" ] && n=$((n + 1)); done
	echo "$n"
}
