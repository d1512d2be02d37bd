// EtcdClient against a real etcd (/usr/bin/etcd, 3.4) that this binary starts
// in its own network namespace (vfetcd<pid>). The whole binary enters that
// namespace on its main thread before any test runs, so every curl handle
// talks to the namespace's 127.0.0.1. Root only: skips elsewhere, fails in CI.
#include "agent/fleet/etcd_client.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "tests/common/ci.h"

namespace {

using namespace vmfence::fleet;
using Clock = std::chrono::steady_clock;

constexpr int kPort = 2379;
const std::string kUrl = "http://127.0.0.1:2379";
const std::string kRefused = "http://127.0.0.1:2389";  // nothing listens there

long ms_since(Clock::time_point t) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - t).count();
}

// The etcd of this test binary: its namespace, data directory and process.
struct Etcd {
  std::string ns, dir, data, log;
  pid_t pid = -1;
  std::string skip;   // cannot run here
  std::string error;  // could not set up (a failure)

  bool start() {
    pid_t p = ::fork();
    if (p < 0) return false;
    if (p == 0) {
      ::setpgid(0, 0);
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      int nsfd = ::open(("/run/netns/" + ns).c_str(), O_RDONLY | O_CLOEXEC);
      if (nsfd < 0 || ::setns(nsfd, CLONE_NEWNET) != 0) ::_exit(126);
      int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
      if (fd >= 0) {
        ::dup2(fd, 1);
        ::dup2(fd, 2);
      }
      std::string curls = "http://127.0.0.1:" + std::to_string(kPort);
      std::string purls = "http://127.0.0.1:" + std::to_string(kPort + 1);
      std::vector<std::string> args = {"/usr/bin/etcd",
                                       "--name=vfetcd",
                                       "--data-dir=" + data,
                                       "--listen-client-urls=" + curls,
                                       "--advertise-client-urls=" + curls,
                                       "--listen-peer-urls=" + purls,
                                       "--initial-advertise-peer-urls=" + purls,
                                       "--initial-cluster=vfetcd=" + purls,
                                       "--experimental-watch-progress-notify-interval=1s"};
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      ::execv(argv[0], argv.data());
      ::_exit(127);
    }
    ::setpgid(p, p);
    pid = p;
    return wait_ready();
  }

  // Until a range answers (at most 30 s), or etcd exits.
  bool wait_ready() {
    EtcdClient c(EtcdOptions{{kUrl}, {}, 500});
    auto t0 = Clock::now();
    while (ms_since(t0) < 30000) {
      int st;
      if (::waitpid(pid, &st, WNOHANG) == pid) {
        pid = -1;
        error = "etcd exited at start; its log:\n" + tail();
        return false;
      }
      std::optional<KeyValue> kv;
      if (c.get("/ready", &kv).ok()) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    error = "etcd did not answer within 30 s; its log:\n" + tail();
    return false;
  }

  void kill_now() {
    if (pid <= 0) return;
    ::kill(-pid, SIGKILL);
    ::kill(pid, SIGKILL);
    int st;
    ::waitpid(pid, &st, 0);
    pid = -1;
  }

  std::string tail() {
    std::ifstream f(log);
    std::stringstream ss;
    ss << f.rdbuf();
    std::string s = ss.str();
    return s.size() > 3000 ? s.substr(s.size() - 3000) : s;
  }

  void setup() {
    if (::geteuid() != 0) {
      skip = "needs root (network namespace)";
      return;
    }
    if (::access("/usr/bin/etcd", X_OK) != 0) {
      skip = "/usr/bin/etcd missing (Debian etcd-server)";
      return;
    }
    remove_stale_namespaces();
    ns = "vfetcd" + std::to_string(::getpid());
    if (std::system(("ip netns add " + ns + " && ip -n " + ns + " link set lo up").c_str()) != 0) {
      error = "ip netns add " + ns + " failed";
      ns.clear();
      return;
    }
    // This thread (the main one, before any other exists) moves in; gtest
    // and the threads the tests start run in the namespace.
    int nsfd = ::open(("/run/netns/" + ns).c_str(), O_RDONLY | O_CLOEXEC);
    if (nsfd < 0 || ::setns(nsfd, CLONE_NEWNET) != 0) {
      error = "setns into " + ns + ": " + std::strerror(errno);
      return;
    }
    ::close(nsfd);
    std::string t =
        (std::filesystem::temp_directory_path() / ("vfetcd-" + std::to_string(::getpid()) + "-XXXXXX")).string();
    if (!::mkdtemp(t.data())) {
      error = "mkdtemp";
      return;
    }
    dir = t;
    data = dir + "/data";
    log = dir + "/etcd.log";
    start();
  }

  void teardown() {
    kill_now();
    if (!ns.empty()) {
      // What `ip netns del` does; we are inside it, which does not keep it.
      std::string path = "/run/netns/" + ns;
      ::umount2(path.c_str(), MNT_DETACH);
      ::unlink(path.c_str());
      ns.clear();
    }
    if (!dir.empty()) {
      std::error_code ec;
      std::filesystem::remove_all(dir, ec);
      dir.clear();
    }
  }

  // Namespaces (vfetcd<pid>) and data directories (vfetcd-<pid>-*) left by a
  // run that was killed: its pid is gone.
  static void remove_stale_namespaces() {
    auto gone = [](const char* digits) {
      pid_t p = std::atoi(digits);
      return p > 0 && ::kill(p, 0) != 0 && errno == ESRCH;
    };
    std::error_code ec;
    for (auto& e : std::filesystem::directory_iterator("/run/netns", ec)) {
      std::string n = e.path().filename().string();
      if (n.rfind("vfetcd", 0) == 0 && gone(n.c_str() + 6)) {
        ::umount2(e.path().c_str(), MNT_DETACH);
        ::unlink(e.path().c_str());
      }
    }
    for (auto& e : std::filesystem::directory_iterator(std::filesystem::temp_directory_path(), ec)) {
      std::string n = e.path().filename().string();
      if (n.rfind("vfetcd-", 0) == 0 && gone(n.c_str() + 7)) std::filesystem::remove_all(e.path(), ec);
    }
  }
};

Etcd g_etcd;

void on_fatal_signal(int sig) {
  if (g_etcd.pid > 0) ::kill(-g_etcd.pid, SIGKILL);
  if (!g_etcd.ns.empty()) {
    char path[128];
    std::snprintf(path, sizeof path, "/run/netns/%s", g_etcd.ns.c_str());
    ::umount2(path, MNT_DETACH);
    ::unlink(path);
  }
  ::signal(sig, SIG_DFL);
  ::raise(sig);
}

#define REQUIRE_ETCD()                                                                         \
  do {                                                                                         \
    if (!g_etcd.skip.empty()) {                                                                \
      if (::vmfence::testing::in_ci()) FAIL() << "cannot run, and CI is set: " << g_etcd.skip; \
      GTEST_SKIP() << g_etcd.skip;                                                             \
    }                                                                                          \
    ASSERT_TRUE(g_etcd.error.empty()) << g_etcd.error;                                         \
    if (g_etcd.pid <= 0) {                                                                     \
      ASSERT_TRUE(g_etcd.start()) << "etcd restart (a test before killed it)";                 \
    }                                                                                          \
  } while (0)

EtcdOptions opts(std::vector<std::string> eps = {kUrl}, int timeout_ms = 2000) {
  EtcdOptions o;
  o.endpoints = std::move(eps);
  o.timeout_ms = timeout_ms;
  return o;
}

// A watch on its own thread, recording what it is given.
struct Watcher {
  std::mutex mu;
  std::vector<WatchEvent> events;
  std::vector<int64_t> revisions;  // header revision per callback
  int progress = 0;                // callbacks without events
  std::atomic<bool> stop{false};
  std::atomic<bool> ended{false};
  WatchEnd end = WatchEnd::failed;
  std::string why;
  Clock::time_point ended_at;
  std::thread t;

  Watcher(EtcdClient& c, const std::string& prefix, int64_t from) {
    t = std::thread([this, &c, prefix, from] {
      end = c.watch_prefix(
          prefix, from,
          [this](const std::vector<WatchEvent>& evs, int64_t rev) {
            std::lock_guard<std::mutex> l(mu);
            if (evs.empty()) ++progress;
            events.insert(events.end(), evs.begin(), evs.end());
            revisions.push_back(rev);
          },
          &stop, &why);
      ended_at = Clock::now();
      ended = true;
    });
  }
  ~Watcher() { join(); }
  void join() {
    stop = true;
    if (t.joinable()) t.join();
  }
  size_t count() {
    std::lock_guard<std::mutex> l(mu);
    return events.size();
  }
  // Until at least n events (or the watch ended), at most ms.
  bool wait_events(size_t n, int ms) {
    auto t0 = Clock::now();
    while (ms_since(t0) < ms) {
      if (count() >= n) return true;
      if (ended) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return count() >= n;
  }
  bool wait_end(int ms) {
    auto t0 = Clock::now();
    while (!ended && ms_since(t0) < ms) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    return ended;
  }
};

std::string key_of(int i) {
  char b[32];
  std::snprintf(b, sizeof b, "/page/k%05d", i);
  return b;
}

TEST(EtcdEncoding, Base64AndPrefixEnd) {
  for (std::string s : {std::string(), std::string("f"), std::string("fo"), std::string("foo"), std::string("foob"),
                        std::string("\0\xff\x01 \"\\\n", 7)}) {
    std::string back;
    ASSERT_TRUE(EtcdClient::base64_decode(EtcdClient::base64_encode(s), &back));
    EXPECT_EQ(back, s);
  }
  EXPECT_EQ(EtcdClient::base64_encode("foo"), "Zm9v");
  EXPECT_EQ(EtcdClient::prefix_range_end("/a/"), "/a0");
  EXPECT_EQ(EtcdClient::prefix_range_end(std::string("a\xff", 2)), "b");
  EXPECT_EQ(EtcdClient::prefix_range_end(""), std::string(1, '\0'));
  std::string out;
  EXPECT_FALSE(EtcdClient::base64_decode("Zm9v!", &out));
}

TEST(EtcdClient, PutGetAndRangeInPagesAtARevision) {
  REQUIRE_ETCD();
  EtcdClient c(opts());
  // 5,000 keys from 8 threads at once on one client (3 pages of 2,000).
  constexpr int kKeys = 5000, kThreads = 8;
  std::atomic<int> failures{0};
  std::string first_error;
  std::mutex emu;
  auto t0 = Clock::now();
  std::vector<std::thread> ts;
  for (int t = 0; t < kThreads; ++t)
    ts.emplace_back([&, t] {
      for (int i = t; i < kKeys; i += kThreads) {
        auto st = c.put(key_of(i), "v" + std::to_string(i), 0);
        if (!st) {
          std::lock_guard<std::mutex> l(emu);
          if (failures++ == 0) first_error = st.message;
        }
      }
    });
  for (auto& t : ts) t.join();
  ASSERT_EQ(failures, 0) << first_error;
  std::printf("[ info ] %d puts from %d threads: %ld ms\n", kKeys, kThreads, ms_since(t0));
  ASSERT_TRUE(c.put("/page0", "sibling, not under /page/", 0).ok());

  RangeResult r;
  auto st = c.range_prefix("/page/", 0, &r);
  ASSERT_TRUE(st.ok()) << st.message;
  ASSERT_EQ(r.kvs.size(), size_t(kKeys));
  for (int i = 0; i < kKeys; ++i) {
    ASSERT_EQ(r.kvs[i].key, key_of(i));
    ASSERT_EQ(r.kvs[i].value, "v" + std::to_string(i));
    ASSERT_GT(r.kvs[i].mod_revision, 0);
    ASSERT_EQ(r.kvs[i].create_revision, r.kvs[i].mod_revision);
  }
  const int64_t rev = r.revision;
  ASSERT_GT(rev, int64_t(kKeys));

  // A smaller page size: the same view.
  EtcdOptions small = opts();
  small.range_limit = 7;
  EtcdClient c7(small);
  RangeResult r7;
  ASSERT_TRUE(c7.range_prefix("/page/k001", 0, &r7).ok());
  ASSERT_EQ(r7.kvs.size(), 100u);
  EXPECT_EQ(r7.kvs.front().key, "/page/k00100");
  EXPECT_EQ(r7.kvs.back().key, "/page/k00199");

  // Changes after rev; the view at rev stays the old one.
  int64_t put_rev = 0, del_rev = 0;
  ASSERT_TRUE(c.put(key_of(0), "new", 0, &put_rev).ok());
  EXPECT_EQ(put_rev, rev + 1);
  ASSERT_TRUE(c.del(key_of(1), &del_rev).ok());
  EXPECT_EQ(del_rev, rev + 2);
  ASSERT_TRUE(c.put("/page/zzz", "late", 0).ok());
  ASSERT_TRUE(c.range_prefix("/page/", 0, &r).ok());
  ASSERT_EQ(r.kvs.size(), size_t(kKeys));
  EXPECT_EQ(r.kvs[0].value, "new");
  EXPECT_EQ(r.kvs[0].mod_revision, put_rev);
  EXPECT_LT(r.kvs[0].create_revision, put_rev);
  EXPECT_EQ(r.kvs[1].key, key_of(2));
  EXPECT_EQ(r.kvs.back().key, "/page/zzz");
  EXPECT_EQ(r.revision, rev + 3);

  RangeResult old;
  st = c.range_prefix("/page/", rev, &old);
  ASSERT_TRUE(st.ok()) << st.message;
  EXPECT_EQ(old.revision, rev);
  ASSERT_EQ(old.kvs.size(), size_t(kKeys));
  EXPECT_EQ(old.kvs[0].value, "v0");
  EXPECT_EQ(old.kvs[1].key, key_of(1));
  EXPECT_EQ(old.kvs.back().key, key_of(kKeys - 1));

  // get: present, absent, binary key and value.
  std::optional<KeyValue> kv;
  int64_t grev = 0;
  ASSERT_TRUE(c.get(key_of(0), &kv, &grev).ok());
  ASSERT_TRUE(kv.has_value());
  EXPECT_EQ(kv->value, "new");
  EXPECT_EQ(grev, rev + 3);
  ASSERT_TRUE(c.get(key_of(1), &kv).ok());
  EXPECT_FALSE(kv.has_value());
  const std::string bkey("/bin/\0\xff\n", 8), bval("\"\\\0{}\xc3", 6);
  ASSERT_TRUE(c.put(bkey, bval, 0).ok());
  ASSERT_TRUE(c.get(bkey, &kv).ok());
  ASSERT_TRUE(kv.has_value());
  EXPECT_EQ(kv->key, bkey);
  EXPECT_EQ(kv->value, bval);
  ASSERT_TRUE(c.put("/bin/empty", "", 0).ok());
  ASSERT_TRUE(c.get("/bin/empty", &kv).ok());
  ASSERT_TRUE(kv.has_value());
  EXPECT_EQ(kv->value, "");
  ASSERT_TRUE(c.range_prefix("/bin/", 0, &r).ok());
  ASSERT_EQ(r.kvs.size(), 2u);
  EXPECT_EQ(r.kvs[0].key, bkey);
  EXPECT_EQ(r.kvs[0].value, bval);

  ASSERT_TRUE(c.del_prefix("/page", nullptr).ok());  // /page/ and /page0
}

TEST(EtcdClient, DelAndDelPrefix) {
  REQUIRE_ETCD();
  EtcdClient c(opts());
  for (auto k : {"/d/a", "/d/b", "/d/c/x", "/e"}) ASSERT_TRUE(c.put(k, "1", 0).ok());
  int64_t rev = 0, n = -1;
  ASSERT_TRUE(c.del("/d/a", &rev, &n).ok());
  EXPECT_EQ(n, 1);
  int64_t rev2 = 0;
  ASSERT_TRUE(c.del("/d/missing", &rev2, &n).ok());
  EXPECT_EQ(n, 0);
  EXPECT_EQ(rev2, rev);  // nothing deleted: no new revision
  ASSERT_TRUE(c.del_prefix("/d/", &rev2, &n).ok());
  EXPECT_EQ(n, 2);
  EXPECT_EQ(rev2, rev + 1);  // one deleterange, one revision
  RangeResult r;
  ASSERT_TRUE(c.range_prefix("/d/", 0, &r).ok());
  EXPECT_TRUE(r.kvs.empty());
  std::optional<KeyValue> kv;
  ASSERT_TRUE(c.get("/e", &kv).ok());
  EXPECT_TRUE(kv.has_value());
  ASSERT_TRUE(c.del("/e").ok());
}

TEST(EtcdClient, LeaseKeepaliveExpiryAndRevoke) {
  REQUIRE_ETCD();
  EtcdClient c(opts());
  int64_t lease = 0, granted = 0;
  ASSERT_TRUE(c.grant_lease(1, &lease, &granted).ok());
  std::printf("[ info ] asked a 1 s lease, etcd granted %lld s\n", (long long)granted);
  EXPECT_GE(granted, 1);
  ASSERT_TRUE(c.revoke(lease).ok());

  ASSERT_TRUE(c.grant_lease(2, &lease, &granted).ok());
  EXPECT_EQ(granted, 2);
  EXPECT_NE(lease, 0);
  int64_t rev = 0;
  ASSERT_TRUE(c.put("/lease/k", "alive", lease, &rev).ok());
  std::optional<KeyValue> kv;
  ASSERT_TRUE(c.get("/lease/k", &kv).ok());
  ASSERT_TRUE(kv.has_value());
  EXPECT_EQ(kv->lease, lease);

  Watcher w(c, "/lease/", rev);
  ASSERT_TRUE(w.wait_events(1, 3000)) << w.why;  // the put itself
  // Kept alive for 4 s (twice the TTL): the key stays.
  for (int i = 0; i < 8; ++i) {
    int64_t left = 0;
    auto st = c.keepalive(lease, &left);
    ASSERT_TRUE(st.ok()) << st.message;
    EXPECT_EQ(left, 2);
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
  }
  int64_t ttl = 0;
  ASSERT_TRUE(c.lease_ttl(lease, &ttl).ok());
  EXPECT_GE(ttl, 1);
  ASSERT_TRUE(c.get("/lease/k", &kv).ok());
  EXPECT_TRUE(kv.has_value());
  EXPECT_EQ(w.count(), 1u);

  // No more keepalives: the lease expires and the watch sees the delete.
  auto t0 = Clock::now();
  ASSERT_TRUE(w.wait_events(2, 10000)) << w.why;
  std::printf("[ info ] key gone %ld ms after the last keepalive\n", ms_since(t0) + 500);
  {
    std::lock_guard<std::mutex> l(w.mu);
    EXPECT_EQ(w.events[0].type, WatchEvent::Type::put);
    EXPECT_EQ(w.events[0].kv.value, "alive");
    EXPECT_EQ(w.events[1].type, WatchEvent::Type::del);
    EXPECT_EQ(w.events[1].kv.key, "/lease/k");
    EXPECT_GT(w.events[1].kv.mod_revision, rev);
  }
  ASSERT_TRUE(c.get("/lease/k", &kv).ok());
  EXPECT_FALSE(kv.has_value());
  ASSERT_TRUE(c.lease_ttl(lease, &ttl).ok());
  EXPECT_EQ(ttl, -1);
  int64_t left = 99;
  ASSERT_TRUE(c.keepalive(lease, &left).ok());
  EXPECT_EQ(left, 0);
  auto st = c.revoke(lease);
  EXPECT_EQ(st.err, ENOENT) << st.message;
  st = c.put("/lease/x", "v", lease);
  EXPECT_EQ(st.err, ENOENT) << st.message;
  EXPECT_NE(st.message.find("lease not found"), std::string::npos) << st.message;

  // Revoke takes its keys with it.
  int64_t l2 = 0;
  ASSERT_TRUE(c.grant_lease(60, &l2).ok());
  ASSERT_TRUE(c.put("/lease/r", "v", l2).ok());
  ASSERT_TRUE(c.revoke(l2).ok());
  ASSERT_TRUE(c.get("/lease/r", &kv).ok());
  EXPECT_FALSE(kv.has_value());
  ASSERT_TRUE(w.wait_events(4, 3000));
  w.join();
  EXPECT_EQ(w.end, WatchEnd::stopped) << w.why;
}

TEST(EtcdClient, WatchFromARevisionInOrderThenLiveAndProgress) {
  REQUIRE_ETCD();
  EtcdClient c(opts());
  int64_t r1, r2, r3, r4, r5;
  ASSERT_TRUE(c.put("/w/a", "1", 0, &r1).ok());
  ASSERT_TRUE(c.put("/w/b", "2", 0, &r2).ok());
  ASSERT_TRUE(c.put("/x/other", "not watched", 0).ok());
  ASSERT_TRUE(c.del("/w/a", &r3).ok());
  ASSERT_TRUE(c.put("/w/a", "3", 0, &r4).ok());
  ASSERT_TRUE(c.del_prefix("/w/", &r5).ok());

  Watcher w(c, "/w/", r1);
  ASSERT_TRUE(w.wait_events(6, 3000)) << w.why;
  {
    std::lock_guard<std::mutex> l(w.mu);
    ASSERT_EQ(w.events.size(), 6u);
    using T = WatchEvent::Type;
    struct E {
      T t;
      const char* k;
      const char* v;
      int64_t rev;
    } want[] = {{T::put, "/w/a", "1", r1}, {T::put, "/w/b", "2", r2}, {T::del, "/w/a", "", r3},
                {T::put, "/w/a", "3", r4}, {T::del, "/w/a", "", r5},  {T::del, "/w/b", "", r5}};
    for (size_t i = 0; i < 6; ++i) {
      EXPECT_EQ(w.events[i].type, want[i].t) << i;
      EXPECT_EQ(w.events[i].kv.key, want[i].k) << i;
      EXPECT_EQ(w.events[i].kv.value, want[i].v) << i;
      EXPECT_EQ(w.events[i].kv.mod_revision, want[i].rev) << i;
    }
    EXPECT_EQ(w.events[3].kv.create_revision, r4);
    for (size_t i = 1; i < w.revisions.size(); ++i) EXPECT_LE(w.revisions[i - 1], w.revisions[i]);
    EXPECT_GE(w.revisions.back(), r5);
  }
  // Live.
  int64_t r6 = 0;
  ASSERT_TRUE(c.put("/w/live", "4", 0, &r6).ok());
  ASSERT_TRUE(w.wait_events(7, 3000)) << w.why;
  // Idle: progress notifications (etcd runs with a 1 s interval here) advance the revision.
  int64_t r7 = 0;
  ASSERT_TRUE(c.put("/x/elsewhere", "5", 0, &r7).ok());
  auto t0 = Clock::now();
  bool advanced = false;
  while (!advanced && ms_since(t0) < 5000) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    std::lock_guard<std::mutex> l(w.mu);
    advanced = w.progress > 0 && w.revisions.back() >= r7;
  }
  EXPECT_TRUE(advanced) << "no progress notification to revision " << r7;
  EXPECT_EQ(w.count(), 7u);
  w.join();
  EXPECT_EQ(w.end, WatchEnd::stopped) << w.why;
}

TEST(EtcdClient, WatchOfACompactedRevision) {
  REQUIRE_ETCD();
  EtcdClient c(opts());
  int64_t r1, r2, r3;
  ASSERT_TRUE(c.put("/c/x", "1", 0, &r1).ok());
  ASSERT_TRUE(c.put("/c/x", "2", 0, &r2).ok());
  ASSERT_TRUE(c.put("/c/x", "3", 0, &r3).ok());
  auto st = c.compact(r2);
  ASSERT_TRUE(st.ok()) << st.message;
  std::atomic<bool> stop{false};
  std::string why;
  int calls = 0;
  auto t0 = Clock::now();
  WatchEnd e = c.watch_prefix(
      "/c/", r1, [&](const std::vector<WatchEvent>&, int64_t) { ++calls; }, &stop, &why);
  EXPECT_EQ(e, WatchEnd::compacted) << why;
  EXPECT_LT(ms_since(t0), 2000);
  EXPECT_EQ(calls, 0);
  EXPECT_NE(why.find("compact_revision " + std::to_string(r2)), std::string::npos) << why;
  RangeResult r;
  st = c.range_prefix("/c/", r1, &r);
  EXPECT_EQ(st.err, ERANGE) << st.message;
  EXPECT_NE(st.message.find("compacted"), std::string::npos) << st.message;
  // From the compaction revision on it works.
  Watcher w(c, "/c/", r2);
  ASSERT_TRUE(w.wait_events(2, 3000)) << w.why;
  w.join();
  EXPECT_EQ(w.end, WatchEnd::stopped);
}

TEST(EtcdClient, StopFlagEndsAnIdleWatchWithinASecond) {
  REQUIRE_ETCD();
  EtcdClient c(opts());
  Watcher w(c, "/idle/", 0);
  std::this_thread::sleep_for(std::chrono::milliseconds(700));
  EXPECT_FALSE(w.ended);
  auto t0 = Clock::now();
  w.stop = true;
  ASSERT_TRUE(w.wait_end(1000));
  long took = std::chrono::duration_cast<std::chrono::milliseconds>(w.ended_at - t0).count();
  std::printf("[ info ] watch stopped %ld ms after the flag\n", took);
  EXPECT_LT(took, 1000);
  w.join();
  EXPECT_EQ(w.end, WatchEnd::stopped) << w.why;
}

TEST(EtcdClient, RefusingEndpointIsSkippedAndErrorsNameEndpoints) {
  REQUIRE_ETCD();
  EtcdClient c(opts({kRefused, kUrl}));
  int64_t rev = 0;
  auto st = c.put("/multi/k", "v", 0, &rev);
  ASSERT_TRUE(st.ok()) << st.message;
  std::optional<KeyValue> kv;
  ASSERT_TRUE(c.get("/multi/k", &kv).ok());
  ASSERT_TRUE(kv.has_value());
  {
    EtcdClient fresh(opts({kRefused, kUrl}));  // the watch, too, skips it
    Watcher w(fresh, "/multi/", rev);
    ASSERT_TRUE(w.wait_events(1, 3000)) << w.why;
  }

  EtcdClient none(opts({kRefused, "http://127.0.0.1:2388"}));
  auto t0 = Clock::now();
  st = none.put("/multi/k", "v", 0);
  EXPECT_LT(ms_since(t0), 1000);
  EXPECT_EQ(st.err, ECONNREFUSED) << st.message;
  EXPECT_NE(st.message.find(kRefused + "/v3/kv/put"), std::string::npos) << st.message;
  EXPECT_NE(st.message.find("http://127.0.0.1:2388/v3/kv/put"), std::string::npos) << st.message;
  std::string why;
  std::atomic<bool> stop{false};
  EXPECT_EQ(none.watch_prefix(
                "/multi/", 0, [](auto&, int64_t) {}, &stop, &why),
            WatchEnd::failed);
  EXPECT_NE(why.find(kRefused), std::string::npos) << why;

  // A peer that takes the connection and never answers: timeout_ms holds.
  int s = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(2387);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(s, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  ASSERT_EQ(::listen(s, 16), 0);  // never accepted: the kernel completes the handshake
  EtcdClient silent(opts({"http://127.0.0.1:2387"}, 400));
  t0 = Clock::now();
  st = silent.get("/multi/k", &kv);
  long took = ms_since(t0);
  ::close(s);
  EXPECT_EQ(st.err, ETIMEDOUT) << st.message;
  EXPECT_GE(took, 350);
  EXPECT_LT(took, 1500);
  EXPECT_NE(st.message.find("http://127.0.0.1:2387/v3/kv/range"), std::string::npos) << st.message;
  ASSERT_TRUE(c.del_prefix("/multi/").ok());
}

// Last: kills etcd and restarts it on the same data directory.
TEST(EtcdClient, KilledEtcdFailsFastAndARestartRecovers) {
  REQUIRE_ETCD();
  EtcdClient c(opts());
  int64_t rev = 0;
  ASSERT_TRUE(c.put("/kill/k", "before", 0, &rev).ok());
  Watcher w(c, "/kill/", rev);
  ASSERT_TRUE(w.wait_events(1, 3000)) << w.why;

  g_etcd.kill_now();
  auto t0 = Clock::now();
  ASSERT_TRUE(w.wait_end(3000)) << "the watch did not end";
  EXPECT_EQ(w.end, WatchEnd::failed);
  EXPECT_NE(w.why.find(kUrl), std::string::npos) << w.why;
  std::printf("[ info ] watch failed %ld ms after SIGKILL: %s\n", ms_since(t0), w.why.c_str());

  t0 = Clock::now();
  auto st = c.put("/kill/k", "during", 0);
  EXPECT_LT(ms_since(t0), 1000);
  EXPECT_EQ(st.err, ECONNREFUSED) << st.message;
  EXPECT_NE(st.message.find(kUrl + "/v3/kv/put"), std::string::npos) << st.message;
  std::printf("[ info ] put while down: %s\n", st.message.c_str());
  int64_t lease = 0;
  EXPECT_EQ(c.grant_lease(10, &lease).err, ECONNREFUSED);

  ASSERT_TRUE(g_etcd.start()) << g_etcd.error;
  std::optional<KeyValue> kv;
  st = c.get("/kill/k", &kv);
  ASSERT_TRUE(st.ok()) << st.message;
  ASSERT_TRUE(kv.has_value());
  EXPECT_EQ(kv->value, "before");
  int64_t rev2 = 0;
  ASSERT_TRUE(c.put("/kill/k", "after", 0, &rev2).ok());
  EXPECT_GT(rev2, rev);
  Watcher w2(c, "/kill/", rev);
  ASSERT_TRUE(w2.wait_events(2, 3000)) << w2.why;
  {
    std::lock_guard<std::mutex> l(w2.mu);
    EXPECT_EQ(w2.events[1].kv.value, "after");
  }
  w2.join();
  EXPECT_EQ(w2.end, WatchEnd::stopped) << w2.why;
}

}  // namespace

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  for (int sig : {SIGINT, SIGTERM, SIGABRT, SIGSEGV, SIGBUS}) ::signal(sig, on_fatal_signal);
  g_etcd.setup();
  int rc = RUN_ALL_TESTS();
  if (rc != 0 && g_etcd.pid > 0) std::fprintf(stderr, "--- etcd log (tail) ---\n%s\n", g_etcd.tail().c_str());
  g_etcd.teardown();
  return rc;
}
