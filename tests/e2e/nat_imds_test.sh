#!/usr/bin/env bash
# End-to-end: NAT and IMDS through vmfence's nftables table (issue 4).
#
# Needs root. Everything lives in network namespaces this script creates (prefix
# vfnat<pid>-) and removes on exit; the root namespace is never touched.
#
#   vm1 (imds: true)  eth0 10.1.0.2 fd00:1::2 ──veth── vm-vm1 ┐
#   vm2 (imds: false) eth0 10.2.0.2           ──veth── vm-vm2 ┤ hv (vmfence run)
#                                                     wan0 ───┘ 198.51.100.2 2001:db8:100::2
#   wan: eth0 198.51.100.1 2001:db8:100::1, lo 169.254.169.254 (IMDS stand-in),
#        an "internet" web server on :8080, and NO route back to 10.0.0.0/8 or fd00::/8
#        (except a route to vm2's 10.2.0.0/24 while the IMDS fence is tested).
#
# Asserts: VMs reach the internet only through masquerade (the server sees hv's WAN
# address; without vmfence there is no way back); vm1 gets IMDS (IMDSv2 token whose
# reply leaves IMDS with TTL 1, then a GET) and IMDS logs hv's address; vm2 gets
# nothing from IMDS, although the path would carry it: vmfence leaves traffic toward
# IMDS untranslated for VMs without `imds`, so the wan gets a route back to vm2 for
# that check, and the same request is first shown to reach IMDS before vmfence runs
# (the control; without it a blocked vm2 would prove nothing); unsolicited WAN -> VM
# is dropped unless an ingress rule allows it; an operator's table survives `run` and
# `down`; restart leaves exactly one `inet vmfence` table; deleting the table by hand
# is repaired within seconds; after `down` the table is gone and NAT with it.
#
# Env: VMFENCE (default: <repo>/build/vmfence), CI (set, not "0"/"false") makes
# "cannot run" a failure.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
VMFENCE=${VMFENCE:-$ROOT/build/vmfence}
PY=/usr/bin/python3  # Debian's; `python3` on PATH may be another interpreter

cannot_run() {
  if [[ -n "${CI:-}" && "${CI,,}" != 0 && "${CI,,}" != false ]]; then  # CI set: no skip (lib.sh e2e_in_ci)
    echo "FAIL: $*" >&2
    exit 1
  fi
  echo "SKIP: $*" >&2
  exit 0
}
[[ $EUID -eq 0 ]] || cannot_run "needs root (network namespaces, nftables, BPF)"
for tool in ip nft jq nsenter "$PY"; do
  command -v "$tool" >/dev/null || cannot_run "missing $tool"
done
[[ -x "$VMFENCE" ]] || { echo "FAIL: $VMFENCE not built" >&2; exit 1; }

P="vfnat$$-"
HV="${P}hv" WAN="${P}wan" VM1="${P}vm1" VM2="${P}vm2"
WORK=$(mktemp -d /tmp/vfnat$$.XXXXXX)
CONF="$WORK/config"
export VMFENCE_PIN_DIR="/sys/fs/bpf/vmfence-test-$$"
export VMFENCE_RUN_DIR="/run/vmfence-test-$$"
DAEMON_PID=""
PIDS=()
PASS=0
FAIL=0

cleanup() {
  set +e
  [[ -n "$DAEMON_PID" ]] && kill "$DAEMON_PID" 2>/dev/null && wait "$DAEMON_PID" 2>/dev/null
  if [[ -e "/run/netns/$HV" ]]; then
    nsenter --net="/run/netns/$HV" "$VMFENCE" down --config "$CONF" >/dev/null 2>&1
  fi
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
  for ns in "$VM1" "$VM2" "$WAN" "$HV"; do ip netns del "$ns" 2>/dev/null; done
  rm -rf "$VMFENCE_PIN_DIR" "$VMFENCE_RUN_DIR"
  if [[ $FAIL -ne 0 && -f "$WORK/daemon.log" ]]; then
    echo "--- daemon log (last 60 lines) ---" >&2
    tail -n 60 "$WORK/daemon.log" >&2
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ok() { PASS=$((PASS + 1)); echo "ok   - $*"; }
bad() { FAIL=$((FAIL + 1)); echo "FAIL - $*"; }
check() {  # check "description" command...
  local what=$1
  shift
  if "$@"; then ok "$what"; else bad "$what"; fi
}
check_not() {
  local what=$1
  shift
  if "$@"; then bad "$what"; else ok "$what"; fi
}
quiet() { "$@" >/dev/null 2>&1; }
must() { "$@" || { echo "setup failed: $*" >&2; FAIL=$((FAIL + 1)); exit 1; }; }

in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
hv_nft() { in_ns "$HV" nft "$@"; }
vmfence() { nsenter --net="/run/netns/$HV" "$VMFENCE" "$@"; }
count_vmfence_tables() { hv_nft -j list tables | jq '[.nftables[] | select(.table.name == "vmfence" and .table.family == "inet")] | length'; }
has_table() { hv_nft list table "$1" "$2" >/dev/null 2>&1; }
wait_for() {  # wait_for SECONDS command...: poll every 0.1 s
  local deadline=$((SECONDS + $1))
  shift
  until "$@"; do
    ((SECONDS >= deadline)) && return 1
    sleep 0.1
  done
}

# ---------------------------------------------------------------------------
# helper: HTTP servers (internet + IMDS stand-in) and clients, TCP listeners
# ---------------------------------------------------------------------------
cat >"$WORK/helper.py" <<'EOF'
import http.client, http.server, socket, socketserver, sys

TOKEN = "vmfence-test-token"

def serve(addr, port, log, kind):
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, fmt, *args):
            with open(log, "a") as f:
                f.write("%s %s %s\n" % (self.client_address[0], self.command, self.path))
        def reply(self, code, body):
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def do_GET(self):
            if kind == "imds":
                if self.headers.get("X-aws-ec2-metadata-token") != TOKEN:
                    return self.reply(401, b"no token\n")
                return self.reply(200, b"i-vmfence\n")
            self.reply(200, b"hello from the internet\n")
        def do_PUT(self):
            if kind == "imds" and self.path == "/latest/api/token":
                # Like AWS IMDSv2 (hop limit 1): the token reply leaves with IP TTL 1.
                self.connection.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 1)
                return self.reply(200, TOKEN.encode())
            self.reply(404, b"")
    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        address_family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        allow_reuse_address = True
        daemon_threads = True
    Server((addr, int(port)), Handler).serve_forever()

def request(method, host, port, path, token=None):
    conn = http.client.HTTPConnection(host, int(port), timeout=3)
    headers = {}
    if token:
        headers["X-aws-ec2-metadata-token"] = token
    if method == "PUT":
        headers["X-aws-ec2-metadata-token-ttl-seconds"] = "60"
    conn.request(method, path, headers=headers)
    r = conn.getresponse()
    body = r.read().decode()
    if r.status != 200:
        sys.exit("HTTP %d" % r.status)
    sys.stdout.write(body)

def listen(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(port)))
    s.listen(16)
    while True:
        c, _ = s.accept()
        c.sendall(b"vm1 port %s\n" % port.encode())
        c.close()

def connect(host, port):
    with socket.create_connection((host, int(port)), timeout=2) as s:
        s.settimeout(2)
        sys.stdout.write(s.recv(100).decode())

cmd = sys.argv[1]
if cmd == "serve": serve(*sys.argv[2:6])
elif cmd in ("GET", "PUT"): request(cmd, *sys.argv[2:])
elif cmd == "listen": listen(sys.argv[2])
elif cmd == "connect": connect(*sys.argv[2:4])
EOF
helper() { local ns=$1; shift; in_ns "$ns" "$PY" "$WORK/helper.py" "$@"; }
bg_in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@" >/dev/null 2>&1 & PIDS+=($!); }

# ---------------------------------------------------------------------------
# topology
# ---------------------------------------------------------------------------
for ns in "$HV" "$WAN" "$VM1" "$VM2"; do
  must ip netns add "$ns"
  must ip -n "$ns" link set lo up
done
# hv <-> wan
must ip -n "$HV" link add wan0 type veth peer name eth0 netns "$WAN"
must ip -n "$HV" addr add 198.51.100.2/24 dev wan0
must ip -n "$HV" addr add 2001:db8:100::2/64 dev wan0 nodad
must ip -n "$HV" link set wan0 up
must ip -n "$WAN" addr add 198.51.100.1/24 dev eth0
must ip -n "$WAN" addr add 2001:db8:100::1/64 dev eth0 nodad
must ip -n "$WAN" addr add 169.254.169.254/32 dev lo
must ip -n "$WAN" link set eth0 up
must ip -n "$HV" route add default via 198.51.100.1
must ip -n "$HV" -6 route add default via 2001:db8:100::1
must in_ns "$HV" sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
# VMs: a namespace behind a veth whose hv end plays the TAP
make_vm() {  # make_vm NS TAP MAC N
  local ns=$1 tap=$2 mac=$3 n=$4
  must ip -n "$HV" link add "$tap" type veth peer name eth0 netns "$ns"
  must ip -n "$ns" link set eth0 address "$mac"
  for end in "$HV:$tap" "$ns:eth0"; do
    must ip -n "${end%%:*}" link set "${end#*:}" addrgenmode none
  done
  must ip -n "$HV" addr add "10.$n.0.1/24" dev "$tap"
  must ip -n "$HV" addr add "fd00:$n::1/64" dev "$tap" nodad
  must ip -n "$ns" addr add "10.$n.0.2/24" dev eth0
  must ip -n "$ns" addr add "fd00:$n::2/64" dev eth0 nodad
  must ip -n "$HV" link set "$tap" up
  must ip -n "$ns" link set eth0 up
  must ip -n "$ns" route add default via "10.$n.0.1"
  must ip -n "$ns" -6 route add default via "fd00:$n::1"
  # Static IPv6 neighbours: this test is about NAT; neighbour discovery through
  # the datapath is the BPF tests' business.
  local hv_mac
  hv_mac=$(ip -n "$HV" -j link show "$tap" | jq -r '.[0].address')
  must ip -n "$ns" -6 neigh replace "fd00:$n::1" lladdr "$hv_mac" dev eth0 nud permanent
  must ip -n "$HV" -6 neigh replace "fd00:$n::2" lladdr "$mac" dev "$tap" nud permanent
}
make_vm "$VM1" vm-vm1 02:00:00:00:01:02 1
make_vm "$VM2" vm-vm2 02:00:00:00:02:02 2

# servers in the wan namespace, listeners in vm1
bg_in_ns "$WAN" "$PY" "$WORK/helper.py" serve 198.51.100.1 8080 "$WORK/web.log" web
bg_in_ns "$WAN" "$PY" "$WORK/helper.py" serve 2001:db8:100::1 8080 "$WORK/web6.log" web
bg_in_ns "$WAN" "$PY" "$WORK/helper.py" serve 169.254.169.254 80 "$WORK/imds.log" imds
bg_in_ns "$VM1" "$PY" "$WORK/helper.py" listen 2222
bg_in_ns "$VM1" "$PY" "$WORK/helper.py" listen 2223
touch "$WORK/web.log" "$WORK/web6.log" "$WORK/imds.log"
port_open() { in_ns "$1" bash -c "exec 3<>/dev/tcp/$2/$3" 2>/dev/null; }
must wait_for 5 port_open "$WAN" 198.51.100.1 8080
must wait_for 5 port_open "$WAN" 169.254.169.254 80
must wait_for 5 port_open "$WAN" 2001:db8:100::1 8080
must wait_for 5 port_open "$VM1" 127.0.0.1 2222

# Sanity of the topology: hv reaches the wan; a VM cannot, for want of NAT
# (the wan has no route back to 10.0.0.0/8).
check "topology: hv reaches the internet server" quiet helper "$HV" GET 198.51.100.1 8080 /
check_not "topology: without vmfence vm1 cannot reach the internet (no route back)" \
  quiet helper "$VM1" GET 198.51.100.1 8080 /

# The control of the IMDS fence (section IMDS): with a route back to vm2's
# network (vmfence does not translate vm2's traffic toward IMDS: vm2 is not an
# IMDS VM), vm2's request reaches IMDS and gets its answer when nothing fences
# it. So when it fails under vmfence, vmfence stopped it.
wan_route_vm2() { ip -n "$WAN" route "$1" 10.2.0.0/24 via 198.51.100.2; }
vm2_reads_imds() {
  [[ "$(helper "$VM2" GET 169.254.169.254 80 /latest/meta-data/instance-id vmfence-test-token 2>/dev/null)" == i-vmfence ]]
}
must wan_route_vm2 add
check "control: without vmfence vm2 reads IMDS (wan routes 10.2.0.0/24 back)" vm2_reads_imds
check "control: IMDS saw vm2's own address" grep -q '^10\.2\.0\.2 GET /latest/meta-data/instance-id' "$WORK/imds.log"
must wan_route_vm2 del
: >"$WORK/imds.log"  # the checks below look at what IMDS sees under vmfence

# An operator's own table in hv, created before vmfence runs.
must hv_nft add table inet opsguard
must hv_nft add chain inet opsguard guard '{ type filter hook forward priority 10; policy accept; }'
must hv_nft add rule inet opsguard guard counter comment '"operator rule"'

# ---------------------------------------------------------------------------
# config + daemon
# ---------------------------------------------------------------------------
mkdir -p "$CONF/vms.d"
cat >"$CONF/host.json" <<'EOF'
{
  "wan_interfaces": ["wan0"],
  "nat": { "masquerade": ["10.0.0.0/8", "fd00::/8"] },
  "imds": { "address": "169.254.169.254", "port": 80 },
  "on_violation": { "action": "alert" }
}
EOF
cat >"$CONF/vms.d/vm1.json" <<'EOF'
{
  "name": "vm1",
  "interface": "vm-vm1",
  "mac": "02:00:00:00:01:02",
  "addresses": ["10.1.0.2/32", "fd00:1::2/128"],
  "gateway": ["10.1.0.1", "fd00:1::1"],
  "egress": [ { "to": "0.0.0.0/0", "proto": "tcp", "ports": ["8080"] },
              { "to": "::/0", "proto": "tcp", "ports": ["8080"] } ],
  "ingress": [ { "from": "198.51.100.0/24", "proto": "tcp", "ports": ["2222"] } ],
  "imds": true
}
EOF
# vm2 may send to port 80 anywhere, yet is not an IMDS VM: nftables must still
# keep it from IMDS.
cat >"$CONF/vms.d/vm2.json" <<'EOF'
{
  "name": "vm2",
  "interface": "vm-vm2",
  "mac": "02:00:00:00:02:02",
  "addresses": ["10.2.0.2/32"],
  "gateway": ["10.2.0.1"],
  "egress": [ { "to": "0.0.0.0/0", "proto": "tcp", "ports": ["80", "8080"] } ],
  "imds": false
}
EOF
must vmfence check --config "$CONF"

start_daemon() {
  nsenter --net="/run/netns/$HV" "$VMFENCE" run --config "$CONF" >>"$WORK/daemon.log" 2>&1 &
  DAEMON_PID=$!
  must vmfence wait --vm vm1 --timeout 10
  must vmfence wait --vm vm2 --timeout 10
  must wait_for 10 has_table inet vmfence
}
stop_daemon() {
  kill -TERM "$DAEMON_PID" 2>/dev/null
  wait "$DAEMON_PID" 2>/dev/null
  DAEMON_PID=""
}
start_daemon
check "run: exactly one inet vmfence table" test "$(count_vmfence_tables)" = 1
check "run: the operator's table is untouched" has_table inet opsguard
check "run: the operator's rule is untouched" bash -c "ip netns exec '$HV' nft list chain inet opsguard guard | grep -q 'operator rule'"

# ---------------------------------------------------------------------------
# VM -> internet through masquerade
# ---------------------------------------------------------------------------
internet_v4() { [[ "$(helper "$1" GET 198.51.100.1 8080 / 2>/dev/null)" == "hello from the internet" ]]; }
check "vm1 reaches the internet (IPv4)" internet_v4 "$VM1"
check "vm2 reaches the internet (IPv4)" internet_v4 "$VM2"
check "internet server saw only hv's WAN address (IPv4 masquerade)" \
  bash -c "grep -q '^198.51.100.2 GET' '$WORK/web.log' && ! grep -q '^10\\.' '$WORK/web.log'"
check "vm1 reaches the internet (IPv6)" \
  bash -c "[[ \"\$(ip netns exec '$VM1' '$PY' '$WORK/helper.py' GET 2001:db8:100::1 8080 /)\" == 'hello from the internet' ]]"
check "internet server saw only hv's WAN address (IPv6 masquerade)" \
  bash -c "grep -q '^2001:db8:100::2 GET' '$WORK/web6.log' && ! grep -q '^fd00' '$WORK/web6.log'"

# ---------------------------------------------------------------------------
# IMDS
# ---------------------------------------------------------------------------
TOKEN=$(helper "$VM1" PUT 169.254.169.254 80 /latest/api/token 2>/dev/null)
check "vm1 gets an IMDSv2 token (reply sent with TTL 1, restored by vmfence)" test "$TOKEN" = vmfence-test-token
check "vm1 reads IMDS metadata with the token" \
  test "$(helper "$VM1" GET 169.254.169.254 80 /latest/meta-data/instance-id "$TOKEN" 2>/dev/null)" = i-vmfence
check "IMDS saw the hypervisor's address" grep -q '^198.51.100.2 GET /latest/meta-data/instance-id' "$WORK/imds.log"
check_not "IMDS never saw a VM address" grep -q '^10\.' "$WORK/imds.log"
# vm2 with the route back of the control (which read IMDS without vmfence).
# imds_fence_drops: packets of vm2 toward IMDS vmfence dropped (the TAP
# program's imds_denied counter plus the counter of vm2's element, "vm2: no IMDS",
# in the nft set the imds_forward chain drops from).
# elem_packets SET COMMENT: the packet counter of that set's element with COMMENT.
elem_packets() {
  hv_nft -j list set inet vmfence "$1" |
    jq --arg c "$2" '[.nftables[] | select(.set) | .set.elem[]? | .elem | select(.comment == $c) | .counter.packets] | add // 0'
}
imds_fence_drops() {
  local nft dp
  nft=$(elem_packets imds_denied4 "vm2: no IMDS")
  dp=$(vmfence status --json 2>/dev/null | jq '[.vms[] | select(.name == "vm2") | .drops.imds_denied // 0] | add // 0')
  echo $((${nft:-0} + ${dp:-0}))
}
must wan_route_vm2 add
IMDS_LINES=$(wc -l <"$WORK/imds.log")
FENCE_BEFORE=$(imds_fence_drops)
check_not "vm2 (imds: false) gets nothing from IMDS (the control above read it without vmfence)" vm2_reads_imds
check "IMDS received nothing from vm2" test "$(wc -l <"$WORK/imds.log")" = "$IMDS_LINES"
FENCE_AFTER=$(imds_fence_drops)
check "vmfence dropped vm2's packets toward IMDS (imds_denied + nft 'vm2: no IMDS': $FENCE_BEFORE -> $FENCE_AFTER)" \
  test "$FENCE_AFTER" -gt "$FENCE_BEFORE"
must wan_route_vm2 del

# ---------------------------------------------------------------------------
# WAN -> VM: established only, unless an ingress rule allows it
# ---------------------------------------------------------------------------
drops_toward_vm1() { elem_packets vm_addrs4 "vm1: unsolicited from the WAN"; }
# Give the wan a route to vm1 for this test only (it has none: that is the point
# of masquerade), then knock.
must ip -n "$WAN" route add 10.1.0.0/24 via 198.51.100.2
DROPS_BEFORE=$(drops_toward_vm1)
check_not "unsolicited wan -> vm1:2223 is dropped" quiet helper "$WAN" connect 10.1.0.2 2223
check "the drop happened in table inet vmfence (wan_to_vm counter grew)" test "$(drops_toward_vm1)" -gt "$DROPS_BEFORE"
check "wan -> vm1:2222 allowed by vm1's ingress rule" \
  bash -c "ip netns exec '$WAN' '$PY' '$WORK/helper.py' connect 10.1.0.2 2222 2>/dev/null | grep -q 'vm1 port 2222'"
must ip -n "$WAN" route del 10.1.0.0/24 via 198.51.100.2

# ---------------------------------------------------------------------------
# reconcile: deleting the table by hand is repaired
# ---------------------------------------------------------------------------
must hv_nft delete table inet vmfence
check "deleted table is restored within 5 s" wait_for 5 has_table inet vmfence
check "the daemon logged the repair" grep -qi 'restor' "$WORK/daemon.log"
check "after the repair: still exactly one table" test "$(count_vmfence_tables)" = 1
check "after the repair: vm1 reaches the internet" internet_v4 "$VM1"
RULE_HANDLE=$(hv_nft -j list chain inet vmfence postrouting |
  jq -r '[.nftables[] | select(.rule.comment == "masquerade 10.0.0.0/8 out wan0") | .rule.handle][0]')
must hv_nft delete rule inet vmfence postrouting handle "$RULE_HANDLE"
masquerade_back() { hv_nft list chain inet vmfence postrouting | grep -q 'masquerade 10.0.0.0/8 out wan0'; }
check "a rule deleted by hand is restored within 5 s" wait_for 5 masquerade_back
# Per-VM matches are set elements: one deleted by hand is noticed and restored too.
must hv_nft delete element inet vmfence vm_addrs4 '{ 10.1.0.2 }'
vm1_element_back() { hv_nft list set inet vmfence vm_addrs4 | grep -q 'vm1: unsolicited from the WAN'; }
check "a set element deleted by hand is restored within 5 s" wait_for 5 vm1_element_back

# ---------------------------------------------------------------------------
# restart: one table, not two; stopping leaves enforcement in place
# ---------------------------------------------------------------------------
stop_daemon
check "stopped daemon leaves the table in place (fail closed)" has_table inet vmfence
check "stopped daemon: NAT keeps working" internet_v4 "$VM1"
# Control for the IMDSv2 rule: without the TTL restore, the token reply (TTL 1)
# dies at hv's forward step. Nobody repairs it while the daemon is stopped...
must hv_nft flush chain inet vmfence prerouting
check_not "control: without vmfence's TTL restore the IMDSv2 token never arrives" \
  quiet helper "$VM1" PUT 169.254.169.254 80 /latest/api/token
start_daemon  # ...and the restart replaces the tampered table
check "restart: exactly one inet vmfence table" test "$(count_vmfence_tables)" = 1
check "restart: each masquerade rule once" \
  test "$(hv_nft list table inet vmfence | grep -c 'masquerade 10.0.0.0/8 out wan0')" = 1
check "restart: vm1 still reaches the internet" internet_v4 "$VM1"
# `vmfence wait` returns at once (the kernel kept enforcing): the new agent
# replaces the tampered table once its programs are loaded (seconds).
imds_token() { test "$(helper "$VM1" PUT 169.254.169.254 80 /latest/api/token 2>/dev/null)" = vmfence-test-token; }
check "restart: the IMDSv2 token arrives again (tampered table replaced)" wait_for 15 imds_token
check "restart: the operator's table is untouched" has_table inet opsguard

# ---------------------------------------------------------------------------
# down: our table goes, the operator's stays
# ---------------------------------------------------------------------------
stop_daemon
check "vmfence down succeeds" quiet vmfence down --config "$CONF"
check_not "down: table inet vmfence is gone" has_table inet vmfence
check "down: the operator's table survives" has_table inet opsguard
check "down: the operator's rule survives" bash -c "ip netns exec '$HV' nft list chain inet opsguard guard | grep -q 'operator rule'"
check_not "down: without vmfence's NAT vm1 cannot reach the internet" internet_v4 "$VM1"
check "down twice is fine" quiet vmfence down --config "$CONF"

echo "nat_imds: $PASS passed, $FAIL failed"
[[ $FAIL -eq 0 ]]
