// Journal against a real journald: entries are sent with sd_journal_send and
// read back with `journalctl -o json`, every field checked against the
// contract (DESIGN.md: MESSAGE, PRIORITY=4, a fixed MESSAGE_ID for violations,
// VMFENCE_VM, _REASON, _SRC, _DST, _PROTO, _DPORT, _MODE), written out here as
// literals, never taken from the code under test. When no journald runs (no
// /run/systemd/journal/socket, or a stale one), the suite starts
// /lib/systemd/systemd-journald (needs root) in a session of its own with none
// of the test's file descriptors, and stops it (its process group) after the
// last test, removing the sockets it leaves behind (a stopped journald's
// sockets would make every later test, and vmfence, think a journal is there).
#include <fcntl.h>
#include <grp.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <syslog.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <thread>
#include <vector>

#if __has_include(<cereal/external/rapidjson/document.h>)
#include <cereal/external/rapidjson/document.h>
namespace rj = CEREAL_RAPIDJSON_NAMESPACE;
#else
#include <rapidjson/document.h>
namespace rj = rapidjson;
#endif

#include "agent/actions/actions.h"
#include "agent/events/journal.h"
#include "agent/events/violation.h"
#include "tests/unit/test_util.h"

using namespace std::chrono_literals;

namespace vmfence {
namespace {

constexpr const char* kSocket = "/run/systemd/journal/socket";
constexpr const char* kJournald = "/lib/systemd/systemd-journald";
// The sockets a journald creates and leaves behind when stopped.
constexpr const char* kJournaldSockets[] = {"/run/systemd/journal/socket", "/run/systemd/journal/stdout",
                                            "/run/systemd/journal/dev-log", "/run/systemd/journal/io.systemd.journal"};

// The contract's fixed MESSAGE_ID of a violation (the e2e tests and operators'
// journalctl filters use the same literal): a change is a breaking change.
constexpr const char* kContractViolationId = "6f1c2a7d9e3b4c58a0d1e2f3a4b5c6d7";

// A listener behind the journal socket (not just a file left by a dead journald).
bool journal_alive() {
  int fd = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  struct sockaddr_un sa {};
  sa.sun_family = AF_UNIX;
  std::strncpy(sa.sun_path, kSocket, sizeof sa.sun_path - 1);
  bool ok = ::connect(fd, reinterpret_cast<struct sockaddr*>(&sa), sizeof sa) == 0;
  ::close(fd);
  return ok;
}

// "" when a journald runs, else why not. When none answers, starts one:
// `started` is then its pid (a session leader: its process group is its own),
// for stop_journald.
std::string ensure_journald(pid_t& started) {
  started = -1;
  if (journal_alive()) return "";
  if (::geteuid() != 0) return std::string("no journald at ") + kSocket + " and not root to start one";
  if (::access(kJournald, X_OK) != 0) return std::string("no journald running and no ") + kJournald;
  posix_spawn_file_actions_t fa;
  posix_spawnattr_t attr;
  posix_spawn_file_actions_init(&fa);
  posix_spawnattr_init(&attr);
  posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
  posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0);
  // None of the test's other descriptors (ctest's pipes among them).
  posix_spawn_file_actions_addclosefrom_np(&fa, 3);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSID);  // its own session and process group
  char* argv[] = {const_cast<char*>(kJournald), nullptr};
  pid_t pid = -1;
  int r = ::posix_spawn(&pid, kJournald, &fa, &attr, argv, environ);
  posix_spawn_file_actions_destroy(&fa);
  posix_spawnattr_destroy(&attr);
  if (r != 0) return std::string("cannot start ") + kJournald + ": " + std::strerror(r);
  started = pid;
  for (int i = 0; i < 500; ++i) {
    if (journal_alive()) {
      std::fprintf(stderr, "journal_test: started %s (pid %d); stopped after the last test\n", kJournald, pid);
      return "";
    }
    if (::waitpid(pid, nullptr, WNOHANG) == pid) {
      started = -1;
      return std::string(kJournald) + " exited at once";
    }
    std::this_thread::sleep_for(10ms);
  }
  return std::string(kJournald) + " started but its socket never answered";
}

// Stops the journald ensure_journald started: SIGTERM to its process group,
// SIGKILL after 5 s, reaped; then removes the sockets it leaves behind unless
// another journald answers.
void stop_journald(pid_t pid) {
  if (pid <= 0) return;
  ::kill(-pid, SIGTERM);
  bool reaped = false;
  for (int i = 0; i < 500 && !reaped; ++i) {
    reaped = ::waitpid(pid, nullptr, WNOHANG) == pid;
    if (!reaped) std::this_thread::sleep_for(10ms);
  }
  if (!reaped) {
    ::kill(-pid, SIGKILL);
    ::waitpid(pid, nullptr, 0);
  }
  std::fprintf(stderr, "journal_test: stopped %s (pid %d)\n", kJournald, pid);
  if (journal_alive()) return;
  for (const char* s : kJournaldSockets) {
    struct stat st {};
    if (::lstat(s, &st) == 0 && S_ISSOCK(st.st_mode)) ::unlink(s);
  }
}

std::string run(const std::string& cmd) {
  std::string out;
  FILE* p = ::popen(cmd.c_str(), "r");
  if (!p) return out;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  ::pclose(p);
  return out;
}

using Entry = std::map<std::string, std::string>;

// Entries matching MESSAGE_ID and VMFENCE_VM, waiting up to 5 s for `want` of them.
std::vector<Entry> read_back(const std::string& message_id, const std::string& vm, size_t want = 1) {
  std::vector<Entry> entries;
  for (int attempt = 0; attempt < 50; ++attempt) {
    entries.clear();
    std::string out =
        run("journalctl -o json --no-pager MESSAGE_ID=" + message_id + " VMFENCE_VM=" + vm + " 2>/dev/null");
    size_t pos = 0;
    while (pos < out.size()) {
      size_t nl = out.find('\n', pos);
      std::string line = out.substr(pos, nl == std::string::npos ? std::string::npos : nl - pos);
      pos = nl == std::string::npos ? out.size() : nl + 1;
      rj::Document d;
      d.Parse(line.c_str());
      if (d.HasParseError() || !d.IsObject()) continue;
      Entry e;
      for (auto it = d.MemberBegin(); it != d.MemberEnd(); ++it) {
        if (it->value.IsString()) e[it->name.GetString()] = it->value.GetString();
      }
      entries.push_back(std::move(e));
    }
    if (entries.size() >= want) break;
    std::this_thread::sleep_for(100ms);
  }
  return entries;
}

std::string unique_vm(const char* what) {
  return std::string("jt") + what + "-" + std::to_string(::getpid()) + "-" +
         std::to_string(std::chrono::steady_clock::now().time_since_epoch().count());
}

class JournalTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    why_not_ = ensure_journald(journald_pid_);
    if (why_not_.empty() && !can_read_system_journal()) {
      why_not_ = "cannot read the system journal (needs root or group systemd-journal/adm)";
    }
  }
  static bool can_read_system_journal() {
    if (::geteuid() == 0) return true;
    std::vector<gid_t> groups(static_cast<size_t>(std::max(::getgroups(0, nullptr), 0)));
    groups.resize(static_cast<size_t>(std::max(::getgroups(static_cast<int>(groups.size()), groups.data()), 0)));
    for (const char* name : {"systemd-journal", "adm", "wheel"}) {
      if (const struct group* g = ::getgrnam(name)) {
        if (std::find(groups.begin(), groups.end(), g->gr_gid) != groups.end()) return true;
      }
    }
    return false;
  }
  void SetUp() override {
    VMFENCE_REQUIRE(why_not_.empty(), why_not_);
    VMFENCE_REQUIRE(::access("/usr/bin/journalctl", X_OK) == 0 || ::access("/bin/journalctl", X_OK) == 0,
                    "no journalctl");
  }
  static void TearDownTestSuite() {
    stop_journald(journald_pid_);
    journald_pid_ = -1;
  }
  static std::string why_not_;
  static pid_t journald_pid_;  // the journald this suite started, or -1
};
std::string JournalTest::why_not_;
pid_t JournalTest::journald_pid_ = -1;

TEST_F(JournalTest, ViolationEntryHasEveryField) {
  Journal journal;
  ASSERT_TRUE(journal.available());
  Violation v;
  v.vm = unique_vm("viol");
  v.interface = "vm-" + v.vm;
  v.reason = "cross_group";
  v.direction = "from_vm";
  v.src = "10.1.0.2";
  v.dst = "10.2.0.2";
  v.proto = "tcp";
  v.sport = 41000;
  v.dport = 22;
  v.mode = "conntrack";
  journal.violation(v);

  // Looked up by the contract's literal MESSAGE_ID, not the code's constant.
  auto entries = read_back(kContractViolationId, v.vm);
  ASSERT_EQ(entries.size(), 1u) << "journalctl found no (or several) entries for " << v.vm << " with MESSAGE_ID "
                                << kContractViolationId;
  Entry& e = entries[0];
  // Every expected value is a literal (or the VM name the test chose).
  const Entry want = {
      {"MESSAGE", v.vm + ": cross_group from_vm 10.1.0.2 -> 10.2.0.2 tcp/22"},
      {"PRIORITY", "4"},
      {"MESSAGE_ID", "6f1c2a7d9e3b4c58a0d1e2f3a4b5c6d7"},
      {"SYSLOG_IDENTIFIER", "vmfence"},
      {"VMFENCE_VM", v.vm},
      {"VMFENCE_REASON", "cross_group"},
      {"VMFENCE_SRC", "10.1.0.2"},
      {"VMFENCE_DST", "10.2.0.2"},
      {"VMFENCE_PROTO", "tcp"},
      {"VMFENCE_DPORT", "22"},
      {"VMFENCE_MODE", "conntrack"},
      {"VMFENCE_DIRECTION", "from_vm"},
      {"VMFENCE_INTERFACE", "vm-" + v.vm},
  };
  for (const auto& [field, value] : want) {
    EXPECT_TRUE(e.count(field)) << field << " missing from the entry";
    EXPECT_EQ(e[field], value) << field;
  }
  // The code's constant is the contract's id.
  EXPECT_STREQ(kViolationMessageId, kContractViolationId);
}

// A quarantining violation says so in MESSAGE; the other fields as above.
TEST_F(JournalTest, QuarantiningViolationEntry) {
  Journal journal;
  ASSERT_TRUE(journal.available());
  Violation v;
  v.vm = unique_vm("quar");
  v.interface = "tap-q";
  v.reason = "egress_denied";
  v.direction = "from_vm";
  v.src = "10.40.0.21";
  v.dst = "198.51.100.2";
  v.proto = "udp";
  v.sport = 40001;
  v.dport = 51902;
  v.mode = "filtered";
  v.quarantined = true;
  journal.violation(v);
  auto entries = read_back(kContractViolationId, v.vm);
  ASSERT_EQ(entries.size(), 1u);
  Entry& e = entries[0];
  EXPECT_EQ(e["MESSAGE"], v.vm + ": egress_denied from_vm 10.40.0.21 -> 198.51.100.2 udp/51902 [quarantined]");
  EXPECT_EQ(e["PRIORITY"], "4");
  EXPECT_EQ(e["MESSAGE_ID"], "6f1c2a7d9e3b4c58a0d1e2f3a4b5c6d7");
  EXPECT_EQ(e["VMFENCE_VM"], v.vm);
  EXPECT_EQ(e["VMFENCE_REASON"], "egress_denied");
  EXPECT_EQ(e["VMFENCE_SRC"], "10.40.0.21");
  EXPECT_EQ(e["VMFENCE_DST"], "198.51.100.2");
  EXPECT_EQ(e["VMFENCE_PROTO"], "udp");
  EXPECT_EQ(e["VMFENCE_DPORT"], "51902");
  EXPECT_EQ(e["VMFENCE_MODE"], "filtered");
}

TEST_F(JournalTest, ValuesAreNotFormatStrings) {
  Journal journal;
  ASSERT_TRUE(journal.available());
  Violation v;
  v.vm = unique_vm("fmt");
  v.reason = "odd%s%n%d";
  v.direction = "to_vm";
  v.src = "fec0::1";
  v.dst = "ff02::1:ff00:2";
  v.proto = "icmpv6";
  v.mode = "filtered";
  journal.violation(v);
  auto entries = read_back(kContractViolationId, v.vm);
  ASSERT_EQ(entries.size(), 1u);
  EXPECT_EQ(entries[0]["MESSAGE"], v.vm + ": odd%s%n%d to_vm fec0::1 -> ff02::1:ff00:2 icmpv6");
  EXPECT_EQ(entries[0]["PRIORITY"], "4");
  EXPECT_EQ(entries[0]["VMFENCE_REASON"], "odd%s%n%d");
  EXPECT_EQ(entries[0]["VMFENCE_SRC"], "fec0::1");
  EXPECT_EQ(entries[0]["VMFENCE_DST"], "ff02::1:ff00:2");
  EXPECT_EQ(entries[0]["VMFENCE_PROTO"], "icmpv6");
  EXPECT_EQ(entries[0]["VMFENCE_DPORT"], "0");
  EXPECT_EQ(entries[0]["VMFENCE_MODE"], "filtered");
  EXPECT_EQ(entries[0]["VMFENCE_INTERFACE"], "");
}

TEST_F(JournalTest, NoticeCarriesPriorityAndMessageId) {
  Journal journal;
  ASSERT_TRUE(journal.available());
  const std::string vm = unique_vm("notice");
  journal.notice(LOG_ERR, vm + ": suppressed 17 events", vm);
  auto entries = read_back(kActionMessageId, vm);
  ASSERT_EQ(entries.size(), 1u);
  EXPECT_EQ(entries[0]["MESSAGE"], vm + ": suppressed 17 events");
  EXPECT_EQ(entries[0]["PRIORITY"], "3");
  EXPECT_EQ(entries[0]["VMFENCE_VM"], vm);
  journal.notice(LOG_NOTICE, "custom id", vm, kContractViolationId);
  auto custom = read_back(kContractViolationId, vm);
  ASSERT_EQ(custom.size(), 1u);
  EXPECT_EQ(custom[0]["PRIORITY"], "5");
}

// The terminate action reports its start and its exit status to the journal.
TEST_F(JournalTest, ActionStartAndExitAreJournaled) {
  Journal journal;
  ASSERT_TRUE(journal.available());
  const std::string vm = unique_vm("action");
  {
    ActionRunner runner(&journal, 5s);
    ViolationPolicy p;
    p.action = Action::terminate;
    p.command = {"/bin/sh", "-c", "exit 4"};
    Violation v;
    v.vm = vm;
    v.reason = "spoofed_ip";
    ASSERT_TRUE(runner.terminate(p, v));
    for (int i = 0; i < 500 && runner.busy(); ++i) {
      runner.poll();
      std::this_thread::sleep_for(10ms);
    }
    ASSERT_FALSE(runner.busy());
  }
  auto entries = read_back(kActionMessageId, vm, 2);
  ASSERT_EQ(entries.size(), 2u);
  EXPECT_NE(entries[0]["MESSAGE"].find(vm + ": terminate: command started (pid "), std::string::npos)
      << entries[0]["MESSAGE"];
  EXPECT_EQ(entries[0]["PRIORITY"], "4");
  EXPECT_NE(entries[1]["MESSAGE"].find("exited with status 4"), std::string::npos) << entries[1]["MESSAGE"];
  EXPECT_EQ(entries[1]["PRIORITY"], "3");
}

}  // namespace
}  // namespace vmfence
