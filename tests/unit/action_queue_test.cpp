// ActionRunner's bounds: the concurrency cap and its FIFO queue (one entry per
// VM), forget() and rearm() dropping per-VM bookkeeping, and the counters.
// No root needed; every test waits for its children (none is left behind).
#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "agent/actions/actions.h"
#include "agent/events/violation.h"
#include "tests/unit/test_util.h"

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

namespace vmfence {
namespace {

using testing::LogCapture;
using testing::read_file;
struct TempDir : testing::TempDir {
  TempDir() : testing::TempDir("vmfence-action-queue") {}
};

std::vector<std::string> lines(const std::string& s) {
  std::vector<std::string> v;
  std::stringstream ss(s);
  for (std::string l; std::getline(ss, l);) v.push_back(l);
  return v;
}

Violation violation(const std::string& vm) {
  Violation v;
  v.vm = vm;
  v.interface = "vm-" + vm;
  v.reason = "cross_group";
  v.direction = "from_vm";
  v.src = "10.1.0.2";
  v.dst = "10.2.0.2";
  v.proto = "tcp";
  v.dport = 22;
  v.mode = "filtered";
  v.trigger = true;
  return v;
}

ViolationPolicy command_policy(std::vector<std::string> argv) {
  ViolationPolicy p;
  p.action = Action::terminate;
  p.command = std::move(argv);
  return p;
}

// A command that logs "start VM" and "end VM" lines (appends of one short line:
// atomic) around a sleep, and leaves its shell's pid in pid.VM.
ViolationPolicy logging_policy(const TempDir& dir, const std::string& sleep = "0.3") {
  const std::string log = dir / "log";
  const std::string pid = dir / "pid.";
  return command_policy({"/bin/sh", "-c",
                         "echo $$ > '" + pid + "'\"$VMFENCE_VM\"; echo \"start $VMFENCE_VM\" >> '" + log + "'; sleep " +
                             sleep + "; echo \"end $VMFENCE_VM\" >> '" + log + "'"});
}

// poll() until idle, checking the cap on every round; false when the (generous) limit passes.
bool run_until_idle(ActionRunner& runner, std::chrono::milliseconds limit = 20s) {
  const auto end = Clock::now() + limit;
  while (runner.busy() && Clock::now() < end) {
    runner.poll();
    EXPECT_LE(runner.running(), runner.max_running());
    if (runner.busy()) std::this_thread::sleep_for(5ms);
  }
  return !runner.busy();
}

// poll() until pred() holds (or the limit passes).
template <typename Pred>
bool poll_until(ActionRunner& runner, Pred pred, std::chrono::milliseconds limit = 20s) {
  const auto end = Clock::now() + limit;
  while (!pred() && Clock::now() < end) {
    runner.poll();
    if (!pred()) std::this_thread::sleep_for(5ms);
  }
  return pred();
}

std::string unique_vm(const char* what) {
  static int n = 0;
  return std::string("q") + what + "-" + std::to_string(::getpid()) + "-" + std::to_string(++n);
}

// The most "start" lines without their "end" at any point of the log.
int max_concurrent(const std::vector<std::string>& log) {
  int now = 0, most = 0;
  for (const auto& l : log) {
    if (l.rfind("start ", 0) == 0) most = std::max(most, ++now);
    if (l.rfind("end ", 0) == 0) --now;
  }
  return most;
}

// Every shell whose pid a command left in dir is gone (reaped: no such process).
void expect_no_process_left(const TempDir& dir, const std::vector<std::string>& vms) {
  for (const auto& vm : vms) {
    const std::string text = read_file(dir / ("pid." + vm));
    if (text.empty()) continue;  // never ran
    const pid_t pid = std::atoi(text.c_str());
    ASSERT_GT(pid, 0) << vm;
    errno = 0;
    EXPECT_TRUE(::kill(pid, 0) != 0 && errno == ESRCH) << vm << ": pid " << pid << " still exists";
  }
}

TEST(ActionQueue, CapLimitsConcurrencyAndStartsInOrderOfAcceptance) {
  TempDir dir;
  LogCapture log;
  ActionRunner runner(nullptr, 10s, 2);
  EXPECT_EQ(runner.max_running(), 2u);
  const ViolationPolicy policy = logging_policy(dir);
  std::vector<std::string> vms;
  for (int i = 0; i < 5; ++i) vms.push_back(unique_vm("cap"));

  for (const auto& vm : vms) ASSERT_TRUE(runner.terminate(policy, violation(vm))) << vm;
  EXPECT_EQ(runner.running(), 2u);
  EXPECT_EQ(runner.queued(), 3u);
  EXPECT_EQ(runner.started(), 2u);
  EXPECT_EQ(runner.incidents(), 5u);
  EXPECT_TRUE(runner.busy());

  // A queued (or running) VM is already handled: refused, and the queue does not grow.
  for (int round = 0; round < 50; ++round) {
    for (const auto& vm : vms) EXPECT_FALSE(runner.terminate(policy, violation(vm))) << vm;
  }
  EXPECT_LE(runner.queued(), 3u);

  ASSERT_TRUE(run_until_idle(runner));
  EXPECT_EQ(runner.started(), 5u);
  EXPECT_EQ(runner.queued(), 0u);
  EXPECT_EQ(runner.running(), 0u);
  EXPECT_EQ(runner.ok(), 5u);
  EXPECT_EQ(runner.failed(), 0u);

  // Never more than 2 at once: each child logs its end before it exits, and
  // the next one starts only after it was reaped.
  const auto events = lines(read_file(dir / "log"));
  EXPECT_EQ(events.size(), 10u) << read_file(dir / "log");
  EXPECT_EQ(max_concurrent(events), 2) << read_file(dir / "log");
  for (const auto& vm : vms) {
    EXPECT_EQ(std::count(events.begin(), events.end(), "start " + vm), 1) << vm;
    EXPECT_EQ(std::count(events.begin(), events.end(), "end " + vm), 1) << vm;
  }
  // Started in the order they were accepted (the runner's own log: the
  // children's first writes may race each other).
  const std::string text = log.text();
  size_t prev = 0;
  for (const auto& vm : vms) {
    const size_t at = text.find(vm + ": terminate: command started (pid ");
    ASSERT_NE(at, std::string::npos) << text;
    EXPECT_GE(at, prev) << vm << " started out of order:\n" << text;
    prev = at;
  }
  // The waiting ones say so.
  EXPECT_NE(text.find(vms[2] + ": terminate: queued: 2 child(ren) running"), std::string::npos) << text;
  EXPECT_NE(text.find("ms in the queue"), std::string::npos) << text;
  expect_no_process_left(dir, vms);

  // Still once per incident after they all ran.
  EXPECT_FALSE(runner.terminate(policy, violation(vms[0])));
  EXPECT_FALSE(runner.busy());
}

TEST(ActionQueue, ForgetDropsAQueuedTerminationAndItsIncident) {
  TempDir dir;
  LogCapture log;
  ActionRunner runner(nullptr, 10s, 1);
  const ViolationPolicy policy = logging_policy(dir);
  const std::string a = unique_vm("run"), b = unique_vm("queued"), c = unique_vm("after");
  ASSERT_TRUE(runner.terminate(policy, violation(a)));
  ASSERT_TRUE(runner.terminate(policy, violation(b)));
  ASSERT_TRUE(runner.terminate(policy, violation(c)));
  EXPECT_EQ(runner.queued(), 2u);
  EXPECT_EQ(runner.incidents(), 3u);

  runner.forget(b);  // queued: cancelled, never runs
  EXPECT_EQ(runner.queued(), 1u);
  EXPECT_EQ(runner.incidents(), 2u);
  runner.forget(a);  // running: finishes and is reaped, its VM's state is not re-created
  EXPECT_EQ(runner.running(), 1u);
  EXPECT_EQ(runner.incidents(), 1u);
  runner.forget("never-seen");  // no-op
  EXPECT_NE(log.text().find(b + ": terminate: cancelled, the VM was removed: 1 queued child(ren) not started"),
            std::string::npos)
      << log.text();

  ASSERT_TRUE(run_until_idle(runner));
  EXPECT_EQ(runner.incidents(), 1u);  // c only
  EXPECT_EQ(runner.started(), 2u);
  EXPECT_EQ(runner.ok(), 2u);
  auto events = lines(read_file(dir / "log"));
  EXPECT_EQ(events, (std::vector<std::string>{"start " + a, "end " + a, "start " + c, "end " + c}));

  // A new incident for the forgotten names: accepted again.
  ASSERT_TRUE(runner.terminate(policy, violation(a)));
  ASSERT_TRUE(runner.terminate(policy, violation(b)));
  EXPECT_FALSE(runner.terminate(policy, violation(c)));  // not forgotten: still marked
  ASSERT_TRUE(run_until_idle(runner));
  events = lines(read_file(dir / "log"));
  EXPECT_EQ(std::count(events.begin(), events.end(), "end " + a), 2);
  EXPECT_EQ(std::count(events.begin(), events.end(), "end " + b), 1);
  EXPECT_EQ(runner.started(), 4u);
  expect_no_process_left(dir, {a, b, c});

  // Forget after completion leaves nothing behind.
  for (const auto& vm : {a, b, c}) runner.forget(vm);
  EXPECT_EQ(runner.incidents(), 0u);
  EXPECT_EQ(runner.queued(), 0u);
}

TEST(ActionQueue, RearmErasesAndDoesNotDuplicateAQueuedTermination) {
  TempDir dir;
  ActionRunner runner(nullptr, 10s, 1);
  const ViolationPolicy policy = logging_policy(dir, "0.2");
  const std::string a = unique_vm("a"), b = unique_vm("b");
  ASSERT_TRUE(runner.terminate(policy, violation(a)));
  ASSERT_TRUE(runner.terminate(policy, violation(b)));
  EXPECT_EQ(runner.queued(), 1u);

  runner.rearm(b);  // queued: its mark goes, its termination stays
  EXPECT_EQ(runner.incidents(), 1u);
  EXPECT_EQ(runner.queued(), 1u);
  EXPECT_FALSE(runner.terminate(policy, violation(b)));  // the queued one handles it: one entry per VM
  EXPECT_EQ(runner.queued(), 1u);
  EXPECT_EQ(runner.incidents(), 2u);

  ASSERT_TRUE(run_until_idle(runner));
  auto events = lines(read_file(dir / "log"));
  EXPECT_EQ(std::count(events.begin(), events.end(), "start " + b), 1);
  EXPECT_EQ(max_concurrent(events), 1);

  runner.rearm(a);
  runner.rearm(b);
  runner.rearm(b);
  EXPECT_EQ(runner.incidents(), 0u);  // erased, not kept as "not handled"
  expect_no_process_left(dir, {a, b});
}

TEST(ActionQueue, VmChurnLeavesNoBookkeeping) {
  LogCapture log;
  ActionRunner runner(nullptr, 10s, 4);
  const ViolationPolicy policy = command_policy({"/bin/true"});
  uint64_t accepted = 0;
  for (int round = 0; round < 10; ++round) {
    std::vector<std::string> vms;
    for (int i = 0; i < 20; ++i) vms.push_back(unique_vm("churn"));
    for (const auto& vm : vms) {
      for (int repeat = 0; repeat < 3; ++repeat) accepted += runner.terminate(policy, violation(vm)) ? 1 : 0;
    }
    EXPECT_LE(runner.running(), 4u);
    EXPECT_LE(runner.queued(), 20u);  // at most one entry per VM
    // Half of them go away while still queued or running, half after.
    for (size_t i = 0; i < vms.size(); i += 2) runner.forget(vms[i]);
    ASSERT_TRUE(run_until_idle(runner));
    for (size_t i = 1; i < vms.size(); i += 2) runner.forget(vms[i]);
    EXPECT_EQ(runner.incidents(), 0u);
    EXPECT_EQ(runner.queued(), 0u);
  }
  EXPECT_EQ(accepted, 200u);
  EXPECT_EQ(runner.ok() + runner.failed(), runner.started());
  EXPECT_EQ(runner.failed(), 0u);
}

TEST(ActionQueue, OkAndFailedCounters) {
  TempDir dir;
  LogCapture log;
  ActionRunner runner(nullptr, 1s, 2);
  EXPECT_EQ(runner.ok(), 0u);
  EXPECT_EQ(runner.failed(), 0u);
  ASSERT_TRUE(runner.terminate(command_policy({"/bin/sh", "-c", "exit 0"}), violation(unique_vm("ok"))));
  ASSERT_TRUE(runner.terminate(command_policy({"/bin/sh", "-c", "exit 3"}), violation(unique_vm("exit3"))));
  ASSERT_TRUE(runner.terminate(command_policy({"/bin/sh", "-c", "kill -TERM $$"}), violation(unique_vm("sig"))));
  // Timed out (killed at 1 s): failed.
  ASSERT_TRUE(runner.terminate(command_policy({"/bin/sh", "-c", "echo $$ > '" + dir / "pid.slow" + "'; sleep 60"}),
                               violation("slow")));
  // Cannot start at all: failed, at once, without taking a slot.
  ASSERT_TRUE(runner.terminate(command_policy({"/nonexistent/vmfence-stop"}), violation(unique_vm("enoent"))));
  ASSERT_TRUE(runner.terminate(command_policy({"/bin/true"}), violation(unique_vm("true"))));
  ASSERT_TRUE(run_until_idle(runner));
  EXPECT_EQ(runner.started(), 6u);
  EXPECT_EQ(runner.ok(), 2u) << log.text();
  EXPECT_EQ(runner.failed(), 4u) << log.text();
  expect_no_process_left(dir, {"slow"});
}

TEST(ActionQueue, CapCountsEachChildOfATermination) {
  TempDir dir;
  LogCapture log;
  // No bus and no QEMU here: the systemd_unit and qmp_socket children fail fast.
  ::setenv("DBUS_SYSTEM_BUS_ADDRESS", ("unix:path=" + dir / "no-bus").c_str(), 1);
  ActionRunner runner(nullptr, 10s, 1);
  ViolationPolicy p = logging_policy(dir, "0.2");
  p.systemd_unit = "microvm@{vm}.service";
  p.qmp_socket = dir / "{vm}.qmp";
  const std::string a = unique_vm("all"), b = unique_vm("next");
  ASSERT_TRUE(runner.terminate(p, violation(a)));
  ASSERT_TRUE(runner.terminate(p, violation(b)));
  EXPECT_EQ(runner.running(), 1u);
  EXPECT_EQ(runner.queued(), 2u);  // a's unit and QMP children wait too
  EXPECT_EQ(runner.started(), 1u);
  ASSERT_TRUE(poll_until(runner, [&] { return runner.started() == 2; }));
  EXPECT_EQ(runner.queued(), 1u);  // b's command has the slot (sleeping): b's unit and QMP children wait
  const bool idle = run_until_idle(runner);
  ::unsetenv("DBUS_SYSTEM_BUS_ADDRESS");
  ASSERT_TRUE(idle);
  EXPECT_EQ(runner.started(), 2u);
  EXPECT_EQ(runner.ok(), 2u) << log.text();      // the two commands
  EXPECT_EQ(runner.failed(), 4u) << log.text();  // unit and QMP, twice
  const std::string text = log.text();
  // One VM's children in their order, then the next VM's.
  std::vector<size_t> at;
  for (const auto& vm : {a, b}) {
    for (const char* kind : {"command", "systemd_unit", "qmp_socket"}) {
      at.push_back(text.find(vm + ": terminate: " + kind + " started (pid "));
      ASSERT_NE(at.back(), std::string::npos) << vm << " " << kind << "\n" << text;
    }
  }
  EXPECT_TRUE(std::is_sorted(at.begin(), at.end())) << text;
  EXPECT_EQ(max_concurrent(lines(read_file(dir / "log"))), 1);
  expect_no_process_left(dir, {a, b});
}

TEST(ActionQueue, DestructorWaitsForRunningAndDropsQueued) {
  TempDir dir;
  LogCapture log;
  const std::string a = unique_vm("dtor-run"), b = unique_vm("dtor-queued");
  {
    ActionRunner runner(nullptr, 10s, 1);
    const ViolationPolicy policy = logging_policy(dir, "0.2");
    ASSERT_TRUE(runner.terminate(policy, violation(a)));
    ASSERT_TRUE(runner.terminate(policy, violation(b)));
  }
  EXPECT_EQ(lines(read_file(dir / "log")), (std::vector<std::string>{"start " + a, "end " + a}));
  EXPECT_NE(log.text().find(b + ": terminate: dropped, the agent is stopping"), std::string::npos) << log.text();
  expect_no_process_left(dir, {a, b});
}

TEST(ActionQueue, ZeroCapMeansOne) {
  LogCapture log;
  ActionRunner runner(nullptr, 10s, 0);
  EXPECT_EQ(runner.max_running(), 1u);
  ASSERT_TRUE(runner.terminate(command_policy({"/bin/true"}), violation(unique_vm("zero"))));
  ASSERT_TRUE(run_until_idle(runner));
  EXPECT_EQ(runner.ok(), 1u);
}

}  // namespace
}  // namespace vmfence
