// Journal against a real journald: entries are sent with sd_journal_send and
// read back with `journalctl -o json`, every field checked. When no journald
// runs (no /run/systemd/journal/socket, or a stale one), the suite starts
// /lib/systemd/systemd-journald (needs root) and leaves it running, as on a
// normal host: a stopped journald leaves its socket files behind, which would
// make every later test think a journal is there.
#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/un.h>
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

#include <gtest/gtest.h>

#if __has_include(<cereal/external/rapidjson/document.h>)
#include <cereal/external/rapidjson/document.h>
namespace rj = CEREAL_RAPIDJSON_NAMESPACE;
#else
#include <rapidjson/document.h>
namespace rj = rapidjson;
#endif

#include "agent/actions/actions.h"
#include "agent/events/journal.h"
#include "tests/unit/test_util.h"
#include "agent/events/violation.h"

using namespace std::chrono_literals;

namespace vmfence {
namespace {

constexpr const char* kSocket = "/run/systemd/journal/socket";
constexpr const char* kJournald = "/lib/systemd/systemd-journald";

using testing::in_ci;

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

// "" when a journald runs (started here if needed), else why not.
std::string ensure_journald() {
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
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSID);  // outlives this test run
  char* argv[] = {const_cast<char*>(kJournald), nullptr};
  pid_t pid = -1;
  int r = ::posix_spawn(&pid, kJournald, &fa, &attr, argv, environ);
  posix_spawn_file_actions_destroy(&fa);
  posix_spawnattr_destroy(&attr);
  if (r != 0) return std::string("cannot start ") + kJournald + ": " + std::strerror(r);
  for (int i = 0; i < 500; ++i) {
    if (journal_alive()) {
      std::fprintf(stderr, "journal_test: started %s (pid %d); left running\n", kJournald, pid);
      return "";
    }
    std::this_thread::sleep_for(10ms);
  }
  return std::string(kJournald) + " started but its socket never answered";
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
    std::string out = run("journalctl -o json --no-pager MESSAGE_ID=" + message_id + " VMFENCE_VM=" + vm +
                          " 2>/dev/null");
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
    why_not_ = ensure_journald();
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
    if (!why_not_.empty()) {
      if (in_ci()) FAIL() << "cannot run (CI=true): " << why_not_;
      GTEST_SKIP() << why_not_;
    }
    if (::access("/usr/bin/journalctl", X_OK) != 0 && ::access("/bin/journalctl", X_OK) != 0) {
      if (in_ci()) FAIL() << "cannot run (CI=true): no journalctl";
      GTEST_SKIP() << "no journalctl";
    }
  }
  static std::string why_not_;
};
std::string JournalTest::why_not_;

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

  auto entries = read_back(kViolationMessageId, v.vm);
  ASSERT_EQ(entries.size(), 1u) << "journalctl found no (or several) entries for " << v.vm;
  Entry& e = entries[0];
  const Entry want = {
      {"MESSAGE", v.summary()},
      {"PRIORITY", "4"},
      {"MESSAGE_ID", kViolationMessageId},
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
    EXPECT_EQ(e[field], value) << field;
  }
  EXPECT_EQ(e["MESSAGE"], v.vm + ": cross_group from_vm 10.1.0.2 -> 10.2.0.2 tcp/22");
}

TEST_F(JournalTest, ValuesAreNotFormatStrings) {
  Journal journal;
  ASSERT_TRUE(journal.available());
  Violation v;
  v.vm = unique_vm("fmt");
  v.reason = "odd%s%n%d";
  v.src = "fec0::1";
  v.dst = "ff02::1:ff00:2";
  v.proto = "icmpv6";
  v.mode = "filtered";
  journal.violation(v);
  auto entries = read_back(kViolationMessageId, v.vm);
  ASSERT_EQ(entries.size(), 1u);
  EXPECT_EQ(entries[0]["VMFENCE_REASON"], "odd%s%n%d");
  EXPECT_EQ(entries[0]["VMFENCE_SRC"], "fec0::1");
  EXPECT_EQ(entries[0]["VMFENCE_DPORT"], "0");
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
  journal.notice(LOG_NOTICE, "custom id", vm, kViolationMessageId);
  auto custom = read_back(kViolationMessageId, vm);
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
