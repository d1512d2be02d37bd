// on_violation actions: terminate a VM through its manager.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "agent/events/violation.h"
#include "agent/spec/spec.h"

namespace vmfence {

class Journal;

// Runs terminations without blocking the event loop: a command is forked
// (argv with {vm} replaced; VMFENCE_VM, VMFENCE_REASON, VMFENCE_SRC,
// VMFENCE_DST in its environment), a systemd unit is stopped over sd-bus
// (StopUnit, mode "replace"), a QMP socket gets qmp_capabilities + quit.
// Once per VM per incident: a VM is not terminated again until rearm(vm)
// (called when the VM's interface is re-created or its spec changes).
//
// Bounds (nothing here grows with events or with VM churn):
// - at most max_running child processes run at once; an accepted termination
//   that finds no free slot waits in a FIFO queue and poll() starts it when
//   slots free up, in the order the terminations were accepted;
// - the queue holds at most one entry per VM (a queued termination counts as
//   the VM's accepted incident), so it is bounded by the number of VMs;
// - per-VM bookkeeping exists only for VMs with an open incident or a queued
//   termination. The daemon calls forget(vm) when a VM is removed, which
//   drops all of it.
class ActionRunner {
 public:
  static constexpr size_t kDefaultMaxRunning = 16;

  // max_running: the most termination child processes running at once (a
  // value of 0 is taken as 1).
  explicit ActionRunner(const Journal* journal = nullptr, std::chrono::milliseconds timeout = std::chrono::seconds(10),
                        size_t max_running = kDefaultMaxRunning);
  // Waits for running terminations (up to their deadlines; timed-out ones
  // are killed): a termination in progress is never abandoned. Queued
  // terminations that never got a slot are not started; each is logged as
  // dropped.
  ~ActionRunner();
  ActionRunner(const ActionRunner&) = delete;
  ActionRunner& operator=(const ActionRunner&) = delete;
  // Accept the VM's termination (policy.action must be terminate): every one
  // of command, systemd_unit, qmp_socket that is set, in that order, each in
  // its own child process, started now as far as the concurrency cap allows
  // and from the queue by poll() otherwise. Returns false when an incident
  // for this VM is already being handled (accepted, queued or running) or
  // the policy is not terminate / sets nothing; true when the incident was
  // accepted (a child that fails to start is logged and counted as failed,
  // and the VM stays marked until rearm).
  bool terminate(const ViolationPolicy& policy, const Violation& v);
  // Reap finished children, kill timed-out ones, log exit status, then start
  // queued terminations into the free slots. Call from the event loop at
  // least every 100 ms while busy().
  void poll();
  // Children running or terminations queued.
  bool busy() const;
  // A new incident may start for the VM: its mark is erased. A termination of
  // the VM still waiting in the queue is not cancelled (while it waits, a new
  // terminate() for the VM returns false and marks the VM again).
  void rearm(const std::string& vm);
  // The VM is gone (the daemon calls this when a VM is removed): drop all of
  // its bookkeeping, its incident mark and its queued termination (not
  // started, logged as cancelled). Its children already running finish, are
  // reaped and counted as usual, without re-creating any per-VM state: a
  // later terminate() for the same name is a new incident.
  void forget(const std::string& vm);

  // Counters for status and metrics.
  // Terminations started (first child started or attempted), in total.
  uint64_t started() const { return started_; }
  // Terminations accepted that still have children waiting for a slot.
  size_t queued() const { return queue_.size(); }
  // Child processes running now (at most max_running()).
  size_t running() const { return running_.size(); }
  // Children that exited with status 0, in total.
  uint64_t ok() const { return ok_; }
  // Children that exited non-zero, were killed (timeout, signal), ended with
  // an unknown status or failed to start, in total.
  uint64_t failed() const { return failed_; }
  // VMs with an open incident (marked until rearm or forget).
  size_t incidents() const { return incident_.size(); }
  size_t max_running() const { return max_running_; }
  // Told the result of every child as ok_ and failed_ count it (metrics).
  using OnResult = std::function<void(const std::string& vm, bool ok)>;
  void on_result(OnResult fn) { on_result_ = std::move(fn); }

 private:
  enum class Kind { command, systemd_unit, qmp_socket };
  struct Step {
    Kind kind = Kind::command;
    std::vector<std::string> argv;  // command: {vm} replaced
    std::string target;             // systemd_unit: the unit; qmp_socket: the path
    std::string what;               // for the log
  };
  // An accepted termination whose children have not all been started.
  struct Pending {
    Violation violation;
    std::string why;  // violation.summary()
    std::vector<Step> steps;
    size_t next = 0;      // steps[next..] not started yet
    bool waited = false;  // had to wait for a slot (its start is logged with the wait)
    std::chrono::steady_clock::time_point accepted;
  };
  struct Running {
    pid_t pid = -1;  // also the child's process group (killed as a whole)
    std::string vm;
    std::string kind;  // "command" | "systemd_unit" | "qmp_socket"
    std::string what;  // the argv / unit / socket path, for the log
    std::chrono::steady_clock::time_point start;
    std::chrono::steady_clock::time_point deadline;
    int out_fd = -1;      // read end of the child's stdout + stderr
    std::string output;   // its last bytes, logged with the exit status
    bool killed = false;  // SIGKILLed at the deadline
  };
  static const char* kind_name(Kind kind);
  void start_queued();
  void start_step(const Pending& p, const Step& step);
  void start_child(Running r, const std::string& why, long long queued_ms);
  void start_failed(const std::string& vm, const std::string& kind, const std::string& what, const std::string& err);
  void drain(Running& r);
  void finish(Running& r, int wait_status, const std::string& unknown_why);
  void kill_child(Running& r);
  const Journal* journal_;
  std::chrono::milliseconds timeout_;
  size_t max_running_;
  std::set<std::string> incident_;          // VMs whose incident is being handled
  std::map<std::string, Pending> pending_;  // vm -> its queued termination
  std::deque<std::string> queue_;           // the VMs of pending_, in order of acceptance
  std::map<pid_t, Running> running_;
  uint64_t started_ = 0;
  uint64_t ok_ = 0;
  uint64_t failed_ = 0;
  OnResult on_result_;
};

// Replace every "{vm}" in s.
std::string expand_vm(const std::string& s, const std::string& vm);

// Synchronous building blocks (used by ActionRunner, tested directly).
// Stop a systemd unit through sd-bus; error text on failure, "" on success.
std::string stop_systemd_unit(const std::string& unit, std::chrono::milliseconds timeout = std::chrono::seconds(10));
// QMP: connect, read greeting, qmp_capabilities, quit. "" on success.
std::string qmp_quit(const std::string& socket_path, std::chrono::milliseconds timeout);

}  // namespace vmfence
