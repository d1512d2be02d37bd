#!/usr/bin/env bash
# tests/e2e/journald.sh - a journald for the tests that is stopped afterwards.
#
#   journald.sh start STATE   when no journald answers on
#                             /run/systemd/journal/socket, start
#                             /lib/systemd/systemd-journald: in a session of
#                             its own, stdin/stdout/stderr on /dev/null and no
#                             other file descriptor of the caller (so it never
#                             holds a test's or ctest's pipes open). Writes its
#                             pid to STATE (left empty when a journald already
#                             answered: nothing to stop later). Exit 0 when a
#                             journald answers at the end, 1 otherwise.
#   journald.sh stop STATE    stop the journald STATE names (SIGTERM to its
#                             process group, SIGKILL after 5 s), then remove
#                             the socket files it left in
#                             /run/systemd/journal (a stopped journald's
#                             sockets would make the next test, and vmfence
#                             itself, believe a journal is there). No-op for
#                             an empty or missing STATE.
#   journald.sh alive         exit 0 when a journald answers.
#
# Used by tests/e2e/lib.sh (journald_ensure) and scripts/test.sh.
set -u
PY=/usr/bin/python3
JOURNALD=/lib/systemd/systemd-journald
JDIR=/run/systemd/journal

alive() {
	"$PY" -c '
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
try:
    s.connect(sys.argv[1])
except OSError:
    sys.exit(1)
' "$JDIR/socket" 2>/dev/null
}

# gone PID: the process no longer exists (or is a zombie nobody reaped yet).
gone() {
	local st
	st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 0
	[ -z "$st" ] || [ "$st" = Z ] || [ "$st" = X ]
}

start() {
	local state=$1 pid i
	: >"$state"
	alive && return 0
	[ -x "$JOURNALD" ] || { echo "journald.sh: no journald answers and no $JOURNALD" >&2; return 1; }
	# The launcher becomes journald (same pid): new session, fds 0-2 on
	# /dev/null, every other fd closed, then exec.
	pid=$("$PY" -c '
import os, resource, sys
pid = os.fork()
if pid:
    print(pid)
    sys.exit(0)
os.setsid()
fd = os.open("/dev/null", os.O_RDWR)
for i in (0, 1, 2):
    os.dup2(fd, i)
limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
os.closerange(3, limit if limit != resource.RLIM_INFINITY else 65536)
os.execv(sys.argv[1], [sys.argv[1]])
' "$JOURNALD") || { echo "journald.sh: cannot start $JOURNALD" >&2; return 1; }
	echo "$pid" >"$state"
	for i in $(seq 100); do
		alive && return 0
		gone "$pid" && break
		sleep 0.05
	done
	echo "journald.sh: $JOURNALD (pid $pid) started but $JDIR/socket does not answer" >&2
	return 1
}

stop() {
	local state=$1 pid i f
	pid=$(cat "$state" 2>/dev/null)
	[ -n "$pid" ] || return 0
	# Only the journald started by `start` (a session leader: pgid = pid).
	if ! gone "$pid" && [ "$(awk '{print $5}' "/proc/$pid/stat" 2>/dev/null)" = "$pid" ]; then
		kill -TERM -- "-$pid" 2>/dev/null
		for i in $(seq 100); do gone "$pid" && break; sleep 0.05; done
		gone "$pid" || kill -KILL -- "-$pid" 2>/dev/null
		for i in $(seq 40); do gone "$pid" && break; sleep 0.05; done
	fi
	: >"$state"
	# Its sockets stay behind: remove them unless another journald answers.
	if ! alive; then
		for f in socket stdout dev-log io.systemd.journal; do
			[ -S "$JDIR/$f" ] && rm -f -- "$JDIR/$f"
		done
	fi
	return 0
}

case ${1:-} in
start) start "${2:?state file}" ;;
stop) stop "${2:?state file}" ;;
alive) alive ;;
*) echo "usage: $0 start STATE | stop STATE | alive" >&2; exit 2 ;;
esac
