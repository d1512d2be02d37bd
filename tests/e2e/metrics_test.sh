#!/usr/bin/env bash
# End-to-end: Prometheus metrics (GET /metrics on host.json's metrics.listen).
# Scrapes while real traffic runs and checks the values move: packets and
# bytes per direction, drops per direction and reason (a spoofed source, a
# denied destination, unsolicited inbound), quarantine and on_violation
# actions (terminate ok / failed, alert), reloads; promtool accepts the output
# and config/prometheus's alert rules; a real prometheus server in the
# hypervisor namespace scrapes the daemon and its query API returns a
# vmfence_vm_drops_total series. Then the endpoint moves on a reload and
# "listen": "" turns it off.
#
# Topology (routed, all in namespaces):
#   hv:   taps tap-a tap-b tap-c (10.41.0.1/32 + proxy_arp + host routes),
#         wan0 198.51.100.1/24 -> netns "cons" 198.51.100.2: UDP echo 51900,
#         TCP 443, UDP sink 51902 (violations).
#   a 10.41.0.21: terminate, threshold 1 (command exits 0)
#   b 10.41.0.22: alert (VM override)
#   c 10.41.0.23: terminate, threshold 1 (the command exits 3 for it)
#   The daemon serves metrics on 127.0.0.1:9727 of hv (the default listen).
# Needs root, the daemon, promtool and prometheus (Debian: prometheus).
set -u
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/modes_lib.sh"
e2e_init metrics

for t in curl promtool prometheus; do
	command -v "$t" >/dev/null || fatal "missing tool $t (scripts/install-deps.sh installs it)"
done

CONS=198.51.100.2
declare -A IP=([a]=10.41.0.21 [b]=10.41.0.22 [c]=10.41.0.23)
declare -A NAME=([a]=$PFX-term [b]=$PFX-alert [c]=$PFX-bad)
mac() { printf '02:00:00:41:00:%s' "${IP[$1]##*.}"; }
METRICS=127.0.0.1:9727

section topology
hv_add
for k in a b c; do
	ns_add "$k"
	ip -n "$HV" link add "tap-$k" type veth peer name eth0 netns "$PFX-$k" || fatal "veth tap-$k"
	ipn "$k" link set eth0 address "$(mac "$k")"
	ipn "$k" link set eth0 up
	ipn hv link set "tap-$k" up
	route_vm "$k" "tap-$k" "${IP[$k]}" 10.41.0.1
done
wan_add cons wan0 198.51.100.1/24 "$CONS/24"
serve_udp cons 51900
serve_tcp cons 443
serve_sink cons 51902
wait_listen cons 443
for p in 51900 51902; do wait_listen cons "$p" udp; done

if ! enforced; then
	say "NO_VMFENCE: the metrics endpoint is the daemon's; nothing to compare without it"
	e2e_finish
fi

# The terminate command: exits 3 for VM c, 0 otherwise (after 1 s).
cat >"$WORK/act.sh" <<EOF
#!/bin/sh
echo "\$1 \$\$" >>"$WORK/act.log"
sleep 1
case \$1 in *-bad) exit 3 ;; esac
exit 0
EOF
chmod +x "$WORK/act.sh"

section config
write_host "{ \"on_violation\": { \"action\": \"terminate\", \"command\": [\"$WORK/act.sh\", \"{vm}\"], \"threshold\": 1 } }"
ALLOW="[ { \"to\": \"$CONS/32\", \"proto\": \"udp\", \"ports\": [\"51900\"] },
           { \"to\": \"$CONS/32\", \"proto\": \"tcp\", \"ports\": [\"443\"] } ]"
for k in a b c; do
	extra=""
	[ "$k" = b ] && extra=', "on_violation": { "action": "alert" }, "mode": "conntrack"'
	write_vm "${NAME[$k]}" "{ \"name\": \"${NAME[$k]}\", \"interface\": \"tap-$k\", \"mac\": \"$(mac "$k")\",
  \"addresses\": [\"${IP[$k]}/32\"], \"gateway\": [\"10.41.0.1\"], \"egress\": $ALLOW$extra }"
done
start_daemon

# scrape [ADDR]: the metrics text from hv (non-zero when nothing answers).
scrape() { nsx hv curl -sf --max-time 3 "http://${1:-$METRICS}/metrics"; }
# metric SERIES: the value of the one series whose name and labels are exactly
# SERIES (e.g. 'vmfence_vm_quarantined{vm="x"}'); 0 when absent.
metric() {
	scrape | awk -v s="$1" 'index($0, s " ") == 1 { v = $2 } END { printf "%d\n", v + 0 }'
}
# wait_metric SERIES MIN [SECONDS]: until SERIES >= MIN.
wait_metric() {
	local i
	for i in $(seq $((${3:-5} * 10))); do
		[ "$(metric "$1")" -ge "$2" ] && return 0
		sleep 0.1
	done
	return 1
}

# A real prometheus server in hv scrapes the daemon every second from now on
# (the alert rules need the counters' values before the violations).
mkdir -p "$WORK/prom/data"
cat >"$WORK/prom/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: ["$REPO/config/prometheus/vmfence-alerts.yml"]
scrape_configs:
  - job_name: vmfence
    static_configs:
      - targets: ["$METRICS"]
EOF
nsenter --net="/run/netns/$HV" -- prometheus --config.file="$WORK/prom/prometheus.yml" \
	--storage.tsdb.path="$WORK/prom/data" --web.listen-address=127.0.0.1:9090 >"$WORK/prom/log" 2>&1 &
PROM_PID=$!
E2E_BG_PIDS+=("$PROM_PID")
# query EXPR: the API's JSON for an instant query.
query() { nsx hv curl -sf --max-time 2 -G --data-urlencode "query=$1" http://127.0.0.1:9090/api/v1/query; }
# series_count EXPR: how many series the query returned.
series_count() { query "$1" | "$PY" -c 'import json, sys
try:
    print(len(json.load(sys.stdin)["data"]["result"]))
except Exception:
    print(0)'; }

section "the endpoint (default listen $METRICS in hv)"
expect_log "the daemon says where it serves" "metrics: serving http://$METRICS/metrics"
scrape >"$WORK/scrape0.txt"
expect_ok "GET /metrics answers" test -s "$WORK/scrape0.txt"
for k in a b c; do
	expect_ok "vmfence_vm_info for ${NAME[$k]}" \
		grep -q "^vmfence_vm_info{vm=\"${NAME[$k]}\",interface=\"tap-$k\",group=\"${NAME[$k]}\",mode=\"$([ "$k" = b ] && echo conntrack || echo filtered)\"} 1$" "$WORK/scrape0.txt"
done
expect_ok "a reload counted ok" test "$(metric 'vmfence_reloads_total{result="ok"}')" -ge 1
expect_ok "map gauges: vms entries 3" grep -q '^vmfence_map_entries{map="vmfence_vms_v1"} 3$' "$WORK/scrape0.txt"
expect_ok "map gauges: vms capacity 16384" grep -q '^vmfence_map_capacity{map="vmfence_vms_v1"} 16384$' "$WORK/scrape0.txt"
expect_ok "no fleet gauges without a fleet" bash -c "! grep -q vmfence_fleet '$WORK/scrape0.txt'"
expect_ok "promtool check metrics accepts the output" promtool check metrics <"$WORK/scrape0.txt"
expect_ok "promtool check rules accepts config/prometheus/vmfence-alerts.yml" \
	promtool check rules "$REPO/config/prometheus/vmfence-alerts.yml"
# The listening socket must not leak into the actions' children.
leaky=$(for f in /proc/"$DAEMON_PID"/fd/*; do
	[[ $(readlink "$f") == socket:* ]] || continue
	fl=$(awk '/^flags:/ {print $2}' "/proc/$DAEMON_PID/fdinfo/${f##*/}")
	(( (8#$fl & 8#2000000) == 0 )) && echo "${f##*/}"
done)
expect_ok "every socket of the daemon is close-on-exec (without: ${leaky:-none})" test -z "$leaky"

scraped() { [ "$(series_count "vmfence_actions_total{vm=\"${NAME[c]}\",result=\"failed\"}")" = 1 ]; }
for i in $(seq 100); do scraped && break; sleep 0.1; done
expect_ok "prometheus scraped the daemon before the traffic (the actions series at 0)" scraped

section "traffic: packets and bytes per direction"
pa0=$(metric "vmfence_vm_packets_total{vm=\"${NAME[a]}\",direction=\"from_vm\"}")
pb0=$(metric "vmfence_vm_packets_total{vm=\"${NAME[a]}\",direction=\"to_vm\"}")
ba0=$(metric "vmfence_vm_bytes_total{vm=\"${NAME[a]}\",direction=\"from_vm\"}")
bb0=$(metric "vmfence_vm_bytes_total{vm=\"${NAME[a]}\",direction=\"to_vm\"}")
# 200 echoed datagrams of 1000 bytes, scraped while they flow.
nsx a "$PY" -c '
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
got = 0
for i in range(200):
    s.sendto(b"x" * 1000, (sys.argv[1], 51900))
    try:
        s.recv(2048); got += 1
    except OSError:
        pass
print(got)
' "$CONS" >"$WORK/echoed" &
echo_pid=$!
sleep 0.2
mid=$(metric "vmfence_vm_packets_total{vm=\"${NAME[a]}\",direction=\"from_vm\"}")
wait "$echo_pid"
say "echoed: $(cat "$WORK/echoed") of 200; from_vm packets $pa0 -> $mid (during) -> ..."
pa1=$(metric "vmfence_vm_packets_total{vm=\"${NAME[a]}\",direction=\"from_vm\"}")
pb1=$(metric "vmfence_vm_packets_total{vm=\"${NAME[a]}\",direction=\"to_vm\"}")
ba1=$(metric "vmfence_vm_bytes_total{vm=\"${NAME[a]}\",direction=\"from_vm\"}")
bb1=$(metric "vmfence_vm_bytes_total{vm=\"${NAME[a]}\",direction=\"to_vm\"}")
expect_ok "the echoes came back ($(cat "$WORK/echoed"))" test "$(cat "$WORK/echoed")" -ge 190
expect_ok "from_vm packets +$((pa1 - pa0)) (>= 200)" test $((pa1 - pa0)) -ge 200
expect_ok "to_vm packets +$((pb1 - pb0)) (>= 190)" test $((pb1 - pb0)) -ge 190
expect_ok "from_vm bytes +$((ba1 - ba0)) (>= 200 x 1042)" test $((ba1 - ba0)) -ge $((200 * 1042))
expect_ok "to_vm bytes +$((bb1 - bb0)) (>= 190 x 1042)" test $((bb1 - bb0)) -ge $((190 * 1042))
expect_ok "packets from vm matched the status counters" \
	test "$(status_get "${NAME[a]}" counters.from_vm_packets)" -ge "$pa1"

section "drops per direction and reason (VM b: alert)"
D="vmfence_vm_drops_total{vm=\"${NAME[b]}\""
spoof0=$(metric "$D,direction=\"from_vm\",reason=\"spoofed_ip\"}")
# A spoofed source (another VM's address), 3 times.
scapy b "sendp(Ether(src='$(mac b)', dst='ff:ff:ff:ff:ff:ff')/IP(src='${IP[a]}', dst='$CONS')/UDP(sport=1234, dport=51900)/b'spoof', iface='eth0', count=3)"
expect_ok "spoofed_ip from_vm +3" wait_metric "$D,direction=\"from_vm\",reason=\"spoofed_ip\"}" $((spoof0 + 3))
# A denied destination (udp/51902 is not allowlisted).
quick_udp b "$CONS" 51902 0.2
expect_ok "egress_denied from_vm +1" wait_metric "$D,direction=\"from_vm\",reason=\"egress_denied\"}" 1
expect_ok "alert counted: vmfence_actions_total{action=alert,result=ok}" \
	wait_metric "vmfence_actions_total{vm=\"${NAME[b]}\",action=\"alert\",result=\"ok\"}" 1
# Unsolicited inbound (no ingress rule): the to-VM hook drops it.
nsx cons "$PY" -c '
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(4):
    s.sendto(b"in", (sys.argv[1], 7777))
' "${IP[b]}"
expect_ok "ingress_denied to_vm +4" wait_metric "$D,direction=\"to_vm\",reason=\"ingress_denied\"}" 4
scrape >"$WORK/scrape1.txt"
expect_ok "no from_vm series for a reason only the to-VM hook gave" \
	bash -c "! grep -q '^$D,direction=\"from_vm\",reason=\"ingress_denied\"}' '$WORK/scrape1.txt'"
for r in spoofed_ip egress_denied ingress_denied; do
	sum=$(awk -v s="$D," -v r="reason=\"$r\"}" 'index($0, s) == 1 && index($0, r) {t += $2} END {print t + 0}' "$WORK/scrape1.txt")
	expect_ok "$r: metrics ($sum) = vmfence status ($(status_get "${NAME[b]}" "drops.$r"))" \
		test "$sum" = "$(status_get "${NAME[b]}" "drops.$r")"
done
expect_ok "alert: not quarantined" test "$(metric "vmfence_vm_quarantined{vm=\"${NAME[b]}\"}")" = 0

section "rate-limited drops (VM b gets egress_pps 100 on a reload)"
write_vm "${NAME[b]}" "{ \"name\": \"${NAME[b]}\", \"interface\": \"tap-b\", \"mac\": \"$(mac b)\",
  \"addresses\": [\"${IP[b]}/32\"], \"gateway\": [\"10.41.0.1\"], \"egress\": $ALLOW,
  \"on_violation\": { \"action\": \"alert\" }, \"mode\": \"conntrack\", \"limits\": { \"egress_pps\": 100 } }"
expect_ok "b reloaded with its limit" vmf wait --vm "${NAME[b]}" --timeout 5
for i in $(seq 30); do grep -q "reload (.*): 1 VMs changed" "$DLOG" && break; sleep 0.1; done
RL="$D,direction=\"from_vm\",reason=\"rate_limited\"}"
rl0=$(metric "$RL")
# 2000 allowed datagrams as fast as the VM can send: the bucket (32) and
# ~100/s pass, the rest is rate_limited.
nsx b "$PY" -c '
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(2000):
    s.sendto(b"x", (sys.argv[1], 51900))
' "$CONS"
expect_ok "rate_limited from_vm counted (>= 1000 of 2000)" wait_metric "$RL" $((rl0 + 1000))
expect_ok "rate_limited: metrics = vmfence status" \
	test "$(metric "$RL")" = "$(status_get "${NAME[b]}" drops.rate_limited)"
expect_ok "rate-limited is no violation: b not quarantined" \
	test "$(metric "vmfence_vm_quarantined{vm=\"${NAME[b]}\"}")" = 0

section "quarantine and terminate actions (VMs a: ok, c: fails)"
expect_ok "a: vmfence_vm_quarantined 0 before" grep -q "^vmfence_vm_quarantined{vm=\"${NAME[a]}\"} 0$" "$WORK/scrape1.txt"
quick_udp a "$CONS" 51902 0.2
quick_udp c "$CONS" 51902 0.2
expect_ok "a: vmfence_vm_quarantined 1" wait_metric "vmfence_vm_quarantined{vm=\"${NAME[a]}\"}" 1
expect_ok "c: vmfence_vm_quarantined 1" wait_metric "vmfence_vm_quarantined{vm=\"${NAME[c]}\"}" 1
expect_ok "a: terminate ok counted" wait_metric "vmfence_actions_total{vm=\"${NAME[a]}\",action=\"terminate\",result=\"ok\"}" 1 5
expect_ok "c: terminate failed counted" \
	wait_metric "vmfence_actions_total{vm=\"${NAME[c]}\",action=\"terminate\",result=\"failed\"}" 1 5
expect_ok "a: no failure" test "$(metric "vmfence_actions_total{vm=\"${NAME[a]}\",action=\"terminate\",result=\"failed\"}")" = 0
quick_udp a "$CONS" 51900 0.3
expect_ok "a: quarantined drops counted" \
	wait_metric "vmfence_vm_drops_total{vm=\"${NAME[a]}\",direction=\"from_vm\",reason=\"quarantined\"}" 1

section "the prometheus server (scraping since the start)"
got=0
for i in $(seq 150); do
	[ "$(series_count "vmfence_vm_drops_total{vm=\"${NAME[b]}\",reason=\"spoofed_ip\"}")" -ge 1 ] && got=1 && break
	sleep 0.2
done
expect_ok "the query API returns a vmfence_vm_drops_total series (spoofed_ip of ${NAME[b]})" test "$got" = 1
expect_ok "the scrape target is up" test "$(series_count 'up{job="vmfence"} == 1')" = 1
# alert_firing NAME VM: the rule fired for the VM (config/prometheus's rules).
alert_firing() {
	local i
	for i in $(seq 50); do
		nsx hv curl -sf --max-time 2 http://127.0.0.1:9090/api/v1/alerts | "$PY" -c 'import json, sys
a = json.load(sys.stdin)["data"]["alerts"]
sys.exit(0 if any(x["labels"].get("alertname") == sys.argv[1] and x["labels"].get("vm") == sys.argv[2]
                  and x["state"] == "firing" for x in a) else 1)' "$1" "$2" && return 0
		sleep 0.2
	done
	return 1
}
expect_ok "the example rule VmfenceVmQuarantined fires for a" alert_firing VmfenceVmQuarantined "${NAME[a]}"
expect_ok "the example rule VmfenceActionFailed fires for c" alert_firing VmfenceActionFailed "${NAME[c]}"
kill "$PROM_PID" 2>/dev/null
wait "$PROM_PID" 2>/dev/null

section "reloads: an invalid host.json counts an error; the endpoint moves; \"\" turns it off"
err0=$(metric 'vmfence_reloads_total{result="error"}')
cp "$CONF/host.json" "$WORK/host.good"
write_host '{ "metrics": { "listen": "localhost:9727" } }'
expect_ok "the invalid host.json counted as a reload error" wait_metric 'vmfence_reloads_total{result="error"}' $((err0 + 1))
expect_log "the listen error is reported in the FILE: json.path: message form" \
	"host.json: metrics.listen: \"localhost:9727\": expected ADDRESS:PORT"
expect_ok "still served on $METRICS meanwhile" scrape
"$PY" - "$WORK/host.good" "$CONF/host.json" 127.0.0.1:9728 <<'EOF'
import json, sys
h = json.load(open(sys.argv[1]))
h["metrics"] = {"listen": sys.argv[3]}
json.dump(h, open(sys.argv[2] + ".tmp", "w"))
EOF
mv "$CONF/host.json.tmp" "$CONF/host.json"
for i in $(seq 50); do scrape 127.0.0.1:9728 >/dev/null && break; sleep 0.1; done
expect_ok "served on the new address 127.0.0.1:9728 after the reload" scrape 127.0.0.1:9728
expect_fail "no longer on $METRICS" scrape
expect_ok "enforcement unaffected (a stays quarantined)" \
	test "$(scrape 127.0.0.1:9728 | grep -c "^vmfence_vm_quarantined{vm=\"${NAME[a]}\"} 1$")" = 1
"$PY" - "$WORK/host.good" "$CONF/host.json" "" <<'EOF'
import json, sys
h = json.load(open(sys.argv[1]))
h["metrics"] = {"listen": sys.argv[3]}
json.dump(h, open(sys.argv[2] + ".tmp", "w"))
EOF
mv "$CONF/host.json.tmp" "$CONF/host.json"
for i in $(seq 50); do scrape 127.0.0.1:9728 >/dev/null || break; sleep 0.1; done
expect_fail "\"listen\": \"\": nothing served on 127.0.0.1:9728" scrape 127.0.0.1:9728
expect_fail "\"listen\": \"\": nothing served on $METRICS" scrape
expect_log "the daemon says the endpoint is off" 'metrics: off'
expect_ok "nothing listens in hv on a TCP port of the daemon" \
	bash -c "! nsenter --net=/run/netns/$HV ss -Hltnp | grep -q 'pid=$DAEMON_PID,'"
expect_ok "the daemon still runs" kill -0 "$DAEMON_PID"

e2e_finish
