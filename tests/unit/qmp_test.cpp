// qmp_quit: against a scripted fake QMP server (protocol, errors, timeouts),
// through ActionRunner, and end to end against a real QEMU guest booted by
// tests/guest/microvm.sh on a TAP inside a test network namespace (root).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <spdlog/sinks/ostream_sink.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "agent/actions/actions.h"
#include "agent/events/violation.h"
#include "tests/unit/test_util.h"

#ifndef VMFENCE_SOURCE_DIR
#define VMFENCE_SOURCE_DIR "."
#endif

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

namespace vmfence {
namespace {

using testing::in_ci;
using testing::LogCapture;
using testing::read_file;
struct TempDir : testing::TempDir {
  TempDir() : testing::TempDir("vmfence-qmp") {}
};

// ---- a scripted QMP server -------------------------------------------------------

enum class Script {
  normal,            // greeting, return, return + SHUTDOWN event + close
  with_events,       // events before each return
  caps_error,        // qmp_capabilities gets an error
  quit_error,        // quit gets an error
  no_greeting,       // accepts, says nothing
  close_after_quit,  // closes on quit without a return (EOF = success)
  close_at_once,     // closes right after accept
  not_qmp,           // greeting is not QMP
};

class FakeQmp {
 public:
  FakeQmp(const std::string& path, Script script) : path_(path), script_(script) {
    fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un sa {};
    sa.sun_family = AF_UNIX;
    std::strncpy(sa.sun_path, path.c_str(), sizeof sa.sun_path - 1);
    if (::bind(fd_, reinterpret_cast<struct sockaddr*>(&sa), sizeof sa) != 0 || ::listen(fd_, 8) != 0) {
      throw std::runtime_error("fake QMP bind/listen: " + std::string(std::strerror(errno)));
    }
    thread_ = std::thread([this] { serve(); });
  }
  ~FakeQmp() {
    stop_ = true;
    thread_.join();
    ::close(fd_);
    ::unlink(path_.c_str());
  }
  std::vector<std::string> received() {
    std::lock_guard<std::mutex> lock(mu_);
    return received_;
  }

 private:
  void serve() {
    while (!stop_) {
      struct pollfd p = {fd_, POLLIN, 0};
      if (::poll(&p, 1, 20) != 1) continue;
      int c = ::accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (c < 0) continue;
      session(c);
      ::close(c);
    }
  }
  void say(int c, const std::string& s) {
    std::string line = s + "\r\n";
    ssize_t n = ::send(c, line.data(), line.size(), MSG_NOSIGNAL);
    (void)n;
  }
  bool hear(int c, std::string& buf, std::string* line) {
    for (;;) {
      if (auto nl = buf.find('\n'); nl != std::string::npos) {
        *line = buf.substr(0, nl);
        buf.erase(0, nl + 1);
        std::lock_guard<std::mutex> lock(mu_);
        received_.push_back(*line);
        return true;
      }
      struct pollfd p = {c, POLLIN, 0};
      if (::poll(&p, 1, 3000) != 1) return false;
      char b[512];
      ssize_t n = ::recv(c, b, sizeof b, 0);
      if (n <= 0) return false;
      buf.append(b, static_cast<size_t>(n));
    }
  }
  void session(int c) {
    const std::string event =
        R"({"timestamp": {"seconds": 1, "microseconds": 2}, "event": "NIC_RX_FILTER_CHANGED", "data": {"return": 1}})";
    if (script_ == Script::close_at_once) return;
    if (script_ == Script::no_greeting) {
      std::this_thread::sleep_for(1500ms);
      return;
    }
    if (script_ == Script::not_qmp) {
      say(c, "SSH-2.0-OpenSSH_9.2");
      return;
    }
    say(c,
        R"({"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}})");
    std::string buf, line;
    if (!hear(c, buf, &line)) return;
    if (script_ == Script::with_events) say(c, event);
    if (script_ == Script::caps_error) {
      say(c,
          R"({"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}})");
      return;
    }
    say(c, R"({"return": {}})");
    if (!hear(c, buf, &line)) return;
    if (script_ == Script::close_after_quit) return;
    if (script_ == Script::with_events) say(c, event);
    if (script_ == Script::quit_error) {
      say(c, R"({"error": {"class": "GenericError", "desc": "quit is not allowed here"}})");
      return;
    }
    say(c, R"({"return": {}})");
    say(c,
        R"({"timestamp": {"seconds": 1, "microseconds": 3}, "event": "SHUTDOWN", "data": {"guest": false, "reason": "host-qmp-quit"}})");
  }

  std::string path_;
  Script script_;
  int fd_ = -1;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  std::mutex mu_;
  std::vector<std::string> received_;
};

const std::vector<std::string> kNegotiateAndQuit = {R"({"execute":"qmp_capabilities"})", R"({"execute":"quit"})"};

TEST(QmpQuit, NegotiatesThenQuits) {
  TempDir dir;
  FakeQmp qmp(dir / "qmp", Script::normal);
  EXPECT_EQ(qmp_quit(dir / "qmp", 2s), "");
  EXPECT_EQ(qmp.received(), kNegotiateAndQuit);
}

TEST(QmpQuit, SkipsEvents) {
  TempDir dir;
  FakeQmp qmp(dir / "qmp", Script::with_events);
  EXPECT_EQ(qmp_quit(dir / "qmp", 2s), "");
  EXPECT_EQ(qmp.received(), kNegotiateAndQuit);
}

TEST(QmpQuit, ClosedAfterQuitIsSuccess) {
  TempDir dir;
  FakeQmp qmp(dir / "qmp", Script::close_after_quit);
  EXPECT_EQ(qmp_quit(dir / "qmp", 2s), "");
}

TEST(QmpQuit, CapabilitiesErrorIsReported) {
  TempDir dir;
  FakeQmp qmp(dir / "qmp", Script::caps_error);
  EXPECT_EQ(
      qmp_quit(dir / "qmp", 2s),
      "QMP " + dir / "qmp" + ": qmp_capabilities refused: Expecting capabilities negotiation with 'qmp_capabilities'");
}

TEST(QmpQuit, QuitErrorIsReported) {
  TempDir dir;
  FakeQmp qmp(dir / "qmp", Script::quit_error);
  EXPECT_EQ(qmp_quit(dir / "qmp", 2s), "QMP " + dir / "qmp" + ": quit refused: quit is not allowed here");
}

TEST(QmpQuit, SilentServerTimesOut) {
  TempDir dir;
  FakeQmp qmp(dir / "qmp", Script::no_greeting);
  auto t0 = Clock::now();
  std::string err = qmp_quit(dir / "qmp", 300ms);
  auto took = Clock::now() - t0;
  EXPECT_NE(err.find("no greeting: timed out"), std::string::npos) << err;
  EXPECT_GE(took, 290ms);
  EXPECT_LT(took, 1s);
}

TEST(QmpQuit, ClosedBeforeGreeting) {
  TempDir dir;
  FakeQmp qmp(dir / "qmp", Script::close_at_once);
  EXPECT_NE(qmp_quit(dir / "qmp", 2s).find("closed before the greeting"), std::string::npos);
}

TEST(QmpQuit, NotAQmpSocket) {
  TempDir dir;
  FakeQmp qmp(dir / "qmp", Script::not_qmp);
  EXPECT_NE(qmp_quit(dir / "qmp", 2s).find("not a QMP greeting: SSH-2.0"), std::string::npos);
}

TEST(QmpQuit, MissingSocket) {
  TempDir dir;
  auto t0 = Clock::now();
  EXPECT_EQ(qmp_quit(dir / "none", 2s), "QMP " + dir / "none" + ": connect: No such file or directory");
  EXPECT_LT(Clock::now() - t0, 100ms);
  EXPECT_NE(qmp_quit(std::string(200, 'x'), 2s).find("bad socket path"), std::string::npos);
}

TEST(QmpQuit, ThroughActionRunner) {
  TempDir dir;
  LogCapture log;
  FakeQmp qmp(dir / "vmq1.qmp", Script::normal);
  ActionRunner runner(nullptr, 5s);
  ViolationPolicy p;
  p.action = Action::terminate;
  p.qmp_socket = dir / "{vm}.qmp";
  Violation v;
  v.vm = "vmq1";
  v.reason = "spoofed_ip";
  ASSERT_TRUE(runner.terminate(p, v));
  for (int i = 0; i < 500 && runner.busy(); ++i) {
    runner.poll();
    std::this_thread::sleep_for(5ms);
  }
  ASSERT_FALSE(runner.busy());
  EXPECT_EQ(qmp.received(), kNegotiateAndQuit);
  EXPECT_NE(log.text().find("vmq1: terminate: qmp_socket (pid "), std::string::npos) << log.text();
  EXPECT_NE(log.text().find("exited with status 0"), std::string::npos) << log.text();
}

// terminate() -> the forked child connecting to the QMP socket (fork path).
TEST(QmpQuitLatency, TerminateToConnect) {
  TempDir dir;
  LogCapture log;
  const std::string path = dir / "lat.qmp";
  int lfd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  struct sockaddr_un sa {};
  sa.sun_family = AF_UNIX;
  std::strncpy(sa.sun_path, path.c_str(), sizeof sa.sun_path - 1);
  ASSERT_EQ(::bind(lfd, reinterpret_cast<struct sockaddr*>(&sa), sizeof sa), 0);
  ASSERT_EQ(::listen(lfd, 8), 0);
  ActionRunner runner(nullptr, 5s);
  ViolationPolicy p;
  p.action = Action::terminate;
  p.qmp_socket = path;
  Violation v;
  v.vm = "vmlat";
  std::vector<double> ms;
  for (int i = 0; i < 100; ++i) {
    auto t0 = Clock::now();
    ASSERT_TRUE(runner.terminate(p, v));
    struct pollfd pfd = {lfd, POLLIN, 0};
    ASSERT_EQ(::poll(&pfd, 1, 5000), 1);
    ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
    int c = ::accept4(lfd, nullptr, nullptr, SOCK_CLOEXEC);
    ::close(c);  // the child then reports "closed before the greeting"
    for (int j = 0; j < 1000 && runner.busy(); ++j) {
      runner.poll();
      std::this_thread::sleep_for(1ms);
    }
    ASSERT_FALSE(runner.busy());
    runner.rearm(v.vm);
  }
  ::close(lfd);
  std::sort(ms.begin(), ms.end());
  const double p50 = ms[50], p99 = ms[98], mx = ms[99];
  std::printf("terminate() -> QMP child connected (fork path), 100 runs: p50 %.3f ms, p99 %.3f ms, max %.3f ms\n", p50,
              p99, mx);
  RecordProperty("p50_ms", std::to_string(p50));
  RecordProperty("p99_ms", std::to_string(p99));
  // A bound that only a blocking path breaks: the figures themselves are a
  // benchmark (BENCHMARKS.md), and p99 on a loaded CI machine is noise.
  EXPECT_LT(p50, 100.0);
}

// ---- a real QEMU guest --------------------------------------------------------------

std::string harness_path() {
  if (const char* d = std::getenv("VMFENCE_SOURCE_DIR")) return std::string(d) + "/tests/guest/microvm.sh";
  return std::string(VMFENCE_SOURCE_DIR) + "/tests/guest/microvm.sh";
}

bool on_path(const char* prog) {
  std::string path = std::getenv("PATH") ? std::getenv("PATH") : "/usr/bin:/bin";
  std::stringstream ss(path);
  for (std::string d; std::getline(ss, d, ':');) {
    if (::access((d + "/" + prog).c_str(), X_OK) == 0) return true;
  }
  return false;
}

int sh(const std::string& cmd) {
  int st = std::system(cmd.c_str());
  return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

// One guest on a TAP in its own namespace, with a QMP socket; torn down in the dtor.
class RealGuest {
 public:
  RealGuest() {
    static std::atomic<int> n{0};
    int k = ++n;
    ns_ = "vmfq-" + std::to_string(::getpid()) + "-" + std::to_string(k);
    subnet_ = "10.231." + std::to_string(k % 250) + ".";
  }
  ~RealGuest() {
    // QEMU is in the harness's process group (the harness runs timeout
    // --foreground); the pidfile catches it should it not be.
    if (qemu_ <= 0) qemu_ = std::atoi(read_file(dir_ / "qemu.pid").c_str());
    if (pidfd_ < 0 && qemu_ > 0) {
      ::kill(qemu_, SIGKILL);
    } else if (pidfd_ >= 0) {
      struct pollfd p = {pidfd_, POLLIN, 0};
      if (::poll(&p, 1, 0) == 0 && qemu_ > 0) ::kill(qemu_, SIGKILL);
      ::close(pidfd_);
    }
    if (harness_ > 0) {
      // SIGTERM first: QEMU goes, and the harness's EXIT trap removes its temp files.
      ::kill(-harness_, SIGTERM);
      if (wait_harness(3s) < 0) {
        ::kill(-harness_, SIGKILL);
        ::waitpid(harness_, nullptr, 0);
      }
    }
    if (netns_made_) sh("ip netns del " + ns_ + " 2>/dev/null");
  }

  // Boots the guest running `script`; "" once the script has started.
  std::string boot(const std::string& script) {
    if (sh("ip netns add " + ns_) != 0) return "ip netns add " + ns_ + " failed";
    netns_made_ = true;
    if (sh("ip -n " + ns_ + " link set lo up && ip -n " + ns_ + " tuntap add dev vmfqtap mode tap && ip -n " + ns_ +
           " link set vmfqtap up && ip -n " + ns_ + " addr add " + subnet_ + "1/24 dev vmfqtap") != 0) {
      return "cannot create the TAP in " + ns_;
    }
    std::ofstream(dir_ / "script.sh") << script;
    const std::string harness = harness_path();
    std::vector<std::string> args = {"bash",    harness,          "run",         ns_,
                                     "vmfqtap", subnet_ + "2/24", subnet_ + "1", dir_ / "script.sh"};
    std::vector<std::string> env;
    for (char** e = environ; *e; ++e) env.emplace_back(*e);
    env.push_back("KV_QMP=" + qmp_path());
    env.push_back("KV_PIDFILE=" + dir_ / "qemu.pid");
    env.push_back("KV_LOG=" + serial_path());
    env.push_back("KV_TIMEOUT=300");
    std::vector<char*> argv, envp;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    for (auto& e : env) envp.push_back(e.data());
    envp.push_back(nullptr);
    posix_spawn_file_actions_t fa;
    posix_spawnattr_t attr;
    posix_spawn_file_actions_init(&fa);
    posix_spawnattr_init(&attr);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&fa, 1, (dir_ / "harness.out").c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    posix_spawn_file_actions_adddup2(&fa, 1, 2);
    posix_spawnattr_setpgroup(&attr, 0);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETPGROUP);
    int r = ::posix_spawnp(&harness_, "bash", &fa, &attr, argv.data(), envp.data());
    posix_spawn_file_actions_destroy(&fa);
    posix_spawnattr_destroy(&attr);
    if (r != 0) return "cannot start the harness: " + std::string(std::strerror(r));
    // TCG boots in seconds; a loaded machine gets a generous limit.
    for (auto end = Clock::now() + 90s; Clock::now() < end; std::this_thread::sleep_for(50ms)) {
      if (::waitpid(harness_, &harness_status_, WNOHANG) == harness_) {
        harness_ = -1;
        return "the harness exited before the guest script started:\n" + read_file(dir_ / "harness.out");
      }
      struct stat st {};
      if (read_file(serial_path()).find("guest-script-started") != std::string::npos &&
          ::stat(qmp_path().c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) {
        qemu_ = std::atoi(read_file(dir_ / "qemu.pid").c_str());
        if (qemu_ <= 0) return "no pid in " + dir_ / "qemu.pid";
        pidfd_ = static_cast<int>(::syscall(SYS_pidfd_open, qemu_, 0));
        if (pidfd_ < 0) return "pidfd_open(" + std::to_string(qemu_) + "): " + std::strerror(errno);
        return "";
      }
    }
    return "the guest script did not start within 90 s; serial log:\n" + read_file(serial_path());
  }

  // Waits up to `limit` for QEMU to exit; how long it took, or nothing.
  std::optional<std::chrono::milliseconds> wait_qemu_exit(std::chrono::milliseconds limit) {
    auto t0 = Clock::now();
    struct pollfd p = {pidfd_, POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(limit.count())) != 1) return std::nullopt;
    return std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - t0);
  }
  // The harness's exit code (waits up to `limit`), -1 if it did not exit.
  int wait_harness(std::chrono::milliseconds limit) {
    for (auto end = Clock::now() + limit; harness_ > 0 && Clock::now() < end; std::this_thread::sleep_for(20ms)) {
      if (::waitpid(harness_, &harness_status_, WNOHANG) == harness_) harness_ = -1;
    }
    if (harness_ > 0) return -1;
    return WIFEXITED(harness_status_) ? WEXITSTATUS(harness_status_) : 128 + WTERMSIG(harness_status_);
  }

  std::string qmp_path() const { return dir_ / "qmp.sock"; }
  std::string serial_path() const { return dir_ / "serial.log"; }
  std::string serial() const { return read_file(serial_path()); }
  std::string harness_out() const { return read_file(dir_ / "harness.out"); }

 private:
  TempDir dir_;
  std::string ns_, subnet_;
  bool netns_made_ = false;
  pid_t harness_ = -1;
  int harness_status_ = 0;
  pid_t qemu_ = -1;
  int pidfd_ = -1;
};

const char* kLongScript =
    "echo guest-script-started\n"
    "i=0; while [ $i -lt 600 ]; do sleep 1; i=$((i+1)); echo tick $i; done\n"
    "echo guest-script-finished\n";

class RealQemu : public ::testing::Test {
 protected:
  void SetUp() override {
    VMFENCE_REQUIRE(::geteuid() == 0, "needs root (network namespace, TAP, QEMU)");
    VMFENCE_REQUIRE(on_path("qemu-system-x86_64"), "no qemu-system-x86_64 (package qemu-system-x86)");
    VMFENCE_REQUIRE(::access("/dev/net/tun", R_OK | W_OK) == 0, "no /dev/net/tun");
    VMFENCE_REQUIRE(on_path("ip"), "no ip (package iproute2)");
    VMFENCE_REQUIRE(::access(harness_path().c_str(), R_OK) == 0,
                    "no guest harness at " + harness_path() + " (set VMFENCE_SOURCE_DIR)");
    // Idempotent: fetches the guest kernel once into build/guest.
    static int built = sh("bash '" + harness_path() + "' build >/tmp/vmfence-guest-build.log 2>&1");
    VMFENCE_REQUIRE(built == 0, "building the guest failed: see /tmp/vmfence-guest-build.log");
  }
};

TEST_F(RealQemu, QmpQuitStopsAGuestMidScript) {
  RealGuest guest;
  std::string err = guest.boot(kLongScript);
  ASSERT_EQ(err, "");
  auto t0 = Clock::now();
  EXPECT_EQ(qmp_quit(guest.qmp_path(), 5s), "");
  auto exited = guest.wait_qemu_exit(5s);
  ASSERT_TRUE(exited.has_value()) << "QEMU still running 5 s after quit";
  auto total = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - t0);
  std::printf("qmp_quit -> QEMU gone: %lld ms\n", static_cast<long long>(total.count()));
  EXPECT_LT(total, 5s);
  // The guest never got to the end of its script.
  EXPECT_EQ(guest.serial().find("guest-script-finished"), std::string::npos);
  EXPECT_EQ(guest.serial().find("===KV-END==="), std::string::npos);
  EXPECT_EQ(guest.wait_harness(10s), 125) << guest.harness_out();
}

TEST_F(RealQemu, ActionRunnerTerminatesAGuestThroughQmp) {
  RealGuest guest;
  ASSERT_EQ(guest.boot(kLongScript), "");
  LogCapture log;
  ActionRunner runner(nullptr, 5s);
  ViolationPolicy p;
  p.action = Action::terminate;
  p.qmp_socket = guest.qmp_path();
  Violation v;
  v.vm = "vmguest";
  v.reason = "cross_group";
  auto t0 = Clock::now();
  ASSERT_TRUE(runner.terminate(p, v));
  std::optional<std::chrono::milliseconds> exited;
  while (!exited && Clock::now() - t0 < 5s) {
    runner.poll();
    exited = guest.wait_qemu_exit(10ms);
  }
  ASSERT_TRUE(exited.has_value()) << "QEMU still running 5 s after terminate; log:\n" << log.text();
  auto total = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - t0);
  std::printf("terminate() -> QEMU gone (qmp_socket action): %lld ms\n", static_cast<long long>(total.count()));
  for (int i = 0; i < 500 && runner.busy(); ++i) {
    runner.poll();
    std::this_thread::sleep_for(10ms);
  }
  EXPECT_FALSE(runner.busy());
  EXPECT_NE(log.text().find("vmguest: terminate: qmp_socket (pid "), std::string::npos) << log.text();
  EXPECT_NE(log.text().find("exited with status 0"), std::string::npos) << log.text();
  EXPECT_EQ(guest.serial().find("guest-script-finished"), std::string::npos);
}

}  // namespace
}  // namespace vmfence
