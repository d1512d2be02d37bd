// vmfence_fleet_publisher: the simulated hosts of the fleet benchmark
// (bench/fleet_bench.sh). It writes records the way agent/fleet/fleet.cpp
// does (vmfence::fleet::EtcdClient, record_key/record_json, one lease per
// host, the value put under that lease) and measures what a vmfence daemon
// makes of them through its pinned owner map.
//
//   populate  --etcd URL --prefix P --hosts H --vms V [--ttl S] [--threads T]
//             H hosts "sim<h>" x V VMs "vm<v>" (sim_record: one IPv4 /32 + one
//             IPv6 /128, 20 groups), each host under a lease of its own (TTL S,
//             default 3600: the simulated hosts do not keep them alive).
//   list      --etcd URL --prefix P [--reps N]
//             the Fleet library alone: range_prefix (pages of range_limit) +
//             parse_record + resolve() + remote_owners(), per step, N times.
//   count     --pin DIR --want N [--timeout S]
//             wait until DIR/vmfence_owners_v2 holds >= N entries; prints the
//             CLOCK_REALTIME (ns) when it did (polls every 2 ms).
//   propagate --etcd URL --prefix P --pin DIR [--samples N] [--gap-ms G]
//             N times: put a new VM of host "simprop" (t0 just before the put),
//             spin on bpf_map_lookup_elem of its IPv4 address in the pinned
//             owner map until it is there (t1); then delete it (t0) and spin
//             until it is gone (t1). Prints add/del latencies (ms), and "rpc":
//             how long the put / delete call itself took (etcd's commit).
//   watch     --etcd URL --prefix P
//             an extra watcher (like a Fleet's sync thread) until SIGTERM; prints
//             events seen on exit.
#include <bpf/bpf.h>
#include <signal.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "agent/fleet/etcd_client.h"
#include "agent/fleet/view.h"
#include "maps/compiler.h"

using namespace vmfence;
using namespace vmfence::fleet;

namespace {

std::map<std::string, std::string> g_opt;
std::string opt(const char* k, const char* def) {
  auto it = g_opt.find(k);
  return it == g_opt.end() ? def : it->second;
}
long opti(const char* k, long def) {
  auto it = g_opt.find(k);
  return it == g_opt.end() ? def : std::atol(it->second.c_str());
}

int64_t now_ns(clockid_t c = CLOCK_MONOTONIC) {
  timespec ts{};
  clock_gettime(c, &ts);
  return int64_t(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

[[noreturn]] void die(const std::string& m) {
  std::fprintf(stderr, "fleet_publisher: %s\n", m.c_str());
  std::exit(1);
}

EtcdClient make_client() {
  EtcdOptions o;
  o.endpoints = {opt("etcd", "http://127.0.0.1:2379")};
  o.timeout_ms = 3000;  // what etcd_options() gives lease_s >= 18
  return EtcdClient(o);
}

// Host h (0-based, < 256), VM v (< 16384): 10.(64 + h/4).((h%4)*64 + v/256).(v%256)/32
// and fd00:<h+1>::<v+1>/128.
Record sim_record(const std::string& host, int h, int v) {
  Record r;
  r.host = host;
  r.name = "vm" + std::to_string(v);
  r.group = "tenant-" + std::to_string(v % 20);
  char a4[64], a6[64];
  std::snprintf(a4, sizeof a4, "10.%d.%d.%d/32", 64 + h / 4, (h % 4) * 64 + v / 256, v % 256);
  std::snprintf(a6, sizeof a6, "fd00:%x::%x/128", h + 1, v + 1);
  r.addresses = {*parse_cidr(a4), *parse_cidr(a6)};
  return r;
}

std::vector<uint8_t> owner_key(const Cidr& c) {
  std::vector<vmfence_addr> hosts;
  std::vector<vmfence_addr_key> nets;
  add_owner_key(c, hosts, nets);
  if (hosts.empty()) die("not a host address");
  return std::vector<uint8_t>(hosts[0].addr, hosts[0].addr + 16);
}

int open_owners(const std::string& pin, int timeout_s) {
  std::string path = pin + "/vmfence_owners_v2";
  int64_t end = now_ns() + int64_t(timeout_s) * 1000000000;
  for (;;) {
    int fd = bpf_obj_get(path.c_str());
    if (fd >= 0) return fd;
    if (now_ns() > end) die("no pinned map " + path);
    usleep(1000);
  }
}

void stats(const char* what, std::vector<double> v) {
  if (v.empty()) return;
  std::sort(v.begin(), v.end());
  auto q = [&](double p) { return v[std::min(v.size() - 1, size_t(p * (v.size() - 1) + 0.5))]; };
  std::printf("%s n=%zu min=%.1f p50=%.1f p90=%.1f p99=%.1f max=%.1f ms\n", what, v.size(), v.front(), q(0.5), q(0.9),
              q(0.99), v.back());
}

int cmd_populate() {
  const std::string prefix = opt("prefix", "/vmfence/");
  const int hosts = opti("hosts", 50), vms = opti("vms", 200), ttl = opti("ttl", 3600);
  const int threads = std::max(1L, opti("threads", 4));
  std::atomic<int> next{0}, fails{0};
  int64_t t0 = now_ns();
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; ++t)
    ts.emplace_back([&] {
      EtcdClient c = make_client();
      for (int h; (h = next++) < hosts;) {
        std::string host = "sim" + std::to_string(h);
        int64_t lease = 0;
        if (auto s = c.grant_lease(ttl, &lease); !s) {
          std::fprintf(stderr, "grant %s: %s\n", host.c_str(), s.message.c_str());
          ++fails;
          continue;
        }
        for (int v = 0; v < vms; ++v) {
          Record r = sim_record(host, h, v);
          if (auto s = c.put(record_key(prefix, host, r.name), record_json(r), lease); !s) {
            std::fprintf(stderr, "put: %s\n", s.message.c_str());
            ++fails;
          }
        }
      }
    });
  for (auto& t : ts) t.join();
  std::printf("populate: %d hosts x %d VMs in %.2f s (%d failures)\n", hosts, vms, (now_ns() - t0) / 1e9, fails.load());
  return fails ? 1 : 0;
}

int cmd_list() {
  const std::string prefix = opt("prefix", "/vmfence/");
  const int reps = opti("reps", 5);
  EtcdClient c = make_client();
  std::vector<double> tl, tp, tr, to, tt;
  size_t n = 0, remote = 0;
  for (int i = 0; i < reps; ++i) {
    int64_t a = now_ns();
    RangeResult list;
    if (auto s = c.range_prefix(vms_prefix(prefix), 0, &list); !s) die(s.message);
    int64_t b = now_ns();
    Records recs;
    for (const auto& kv : list.kvs) {
      auto r = parse_record(prefix, kv.key, kv.value, nullptr);
      if (!r) continue;
      r->create_revision = kv.create_revision;
      r->lease = kv.lease;
      recs[kv.key] = std::move(*r);
    }
    int64_t d = now_ns();
    Resolution res = resolve("benchhost", {}, recs);
    int64_t e = now_ns();
    MapWriter::RemoteOwners ow = remote_owners(res.remote);
    int64_t f = now_ns();
    n = recs.size();
    remote = ow.hosts.size();
    tl.push_back((b - a) / 1e6);
    tp.push_back((d - b) / 1e6);
    tr.push_back((e - d) / 1e6);
    to.push_back((f - e) / 1e6);
    tt.push_back((f - a) / 1e6);
  }
  std::printf("list: %zu records, %zu owner keys\n", n, remote);
  stats("  range_prefix  ", tl);
  stats("  parse_record  ", tp);
  stats("  resolve       ", tr);
  stats("  remote_owners ", to);
  stats("  total         ", tt);
  return 0;
}

int cmd_count() {
  const long want = opti("want", 20000);
  int fd = open_owners(opt("pin", ""), opti("timeout", 60));
  int64_t end = now_ns() + opti("timeout", 60) * 1000000000L;
  uint8_t key[16], nkey[16];
  long last = -1;
  for (;;) {
    long n = 0;
    void* prev = nullptr;
    while (bpf_map_get_next_key(fd, prev, nkey) == 0) {
      ++n;
      std::memcpy(key, nkey, 16);
      prev = key;
    }
    if (n >= want) {
      std::printf("%lld %ld\n", (long long)now_ns(CLOCK_REALTIME), n);
      return 0;
    }
    last = n;
    if (now_ns() > end) {
      std::fprintf(stderr, "count: %ld of %ld entries after timeout\n", last, want);
      return 1;
    }
    usleep(2000);
  }
}

int cmd_propagate() {
  const std::string prefix = opt("prefix", "/vmfence/");
  const int samples = opti("samples", 200), gap = opti("gap-ms", 30);
  const int timeout_ms = opti("timeout-ms", 10000);
  EtcdClient c = make_client();
  int fd = open_owners(opt("pin", ""), 10);
  const std::string host = "simprop";
  int64_t lease = 0;
  if (auto s = c.grant_lease(opti("ttl", 3600), &lease); !s) die(s.message);
  std::vector<double> add, del, rpc;
  uint8_t val[64];
  auto spin = [&](const std::vector<uint8_t>& k, bool present, int64_t t0) -> double {
    for (;;) {
      bool there = bpf_map_lookup_elem(fd, k.data(), val) == 0;
      int64_t t = now_ns();
      if (there == present) return (t - t0) / 1e6;
      if (t - t0 > int64_t(timeout_ms) * 1000000) return -1;
      usleep(200);  // ~0.25 ms resolution
    }
  };
  int lost = 0;
  for (int i = 0; i < samples; ++i) {
    // Host index 200 + i/16384: addresses no populated host uses.
    Record r = sim_record(host, 240, i);
    std::string key = record_key(prefix, host, r.name);
    auto k = owner_key(r.addresses[0]);
    int64_t t0 = now_ns();
    if (auto s = c.put(key, record_json(r), lease); !s) die(s.message);
    rpc.push_back((now_ns() - t0) / 1e6);
    double a = spin(k, true, t0);
    if (a < 0)
      ++lost;
    else
      add.push_back(a);
    usleep(gap * 1000);
    t0 = now_ns();
    if (auto s = c.del(key); !s) die(s.message);
    rpc.push_back((now_ns() - t0) / 1e6);
    double d = spin(k, false, t0);
    if (d < 0)
      ++lost;
    else
      del.push_back(d);
    usleep(gap * 1000);
  }
  (void)c.revoke(lease);
  stats("add", add);
  stats("del", del);
  stats("rpc", rpc);  // the put / delete call itself (etcd commit), part of add / del
  if (lost) std::printf("timeouts: %d (> %d ms)\n", lost, timeout_ms);
  return lost ? 1 : 0;
}

std::atomic<bool> g_stop{false};

int cmd_watch() {
  const std::string prefix = opt("prefix", "/vmfence/");
  signal(SIGTERM, [](int) { g_stop = true; });
  signal(SIGINT, [](int) { g_stop = true; });
  EtcdClient c = make_client();
  long events = 0;
  while (!g_stop) {
    std::string why;
    c.watch_prefix(
        vms_prefix(prefix), 0, [&](const std::vector<WatchEvent>& ev, int64_t) { events += ev.size(); }, &g_stop, &why);
    if (!g_stop) usleep(200000);
  }
  std::printf("watch: %ld events\n", events);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) die("usage: vmfence_fleet_publisher populate|list|count|propagate|watch [--opt value]...");
  std::string cmd = argv[1];
  for (int i = 2; i + 1 < argc; i += 2) {
    if (std::strncmp(argv[i], "--", 2) != 0) die(std::string("bad option ") + argv[i]);
    g_opt[argv[i] + 2] = argv[i + 1];
  }
  setvbuf(stdout, nullptr, _IOLBF, 0);
  if (cmd == "populate") return cmd_populate();
  if (cmd == "list") return cmd_list();
  if (cmd == "count") return cmd_count();
  if (cmd == "propagate") return cmd_propagate();
  if (cmd == "watch") return cmd_watch();
  die("unknown command " + cmd);
}
