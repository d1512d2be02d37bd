// on_violation actions: terminate a VM through its manager.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <string>
#include <sys/types.h>

#include "agent/spec/spec.h"
#include "agent/events/violation.h"

namespace vmfence {

class Journal;

// Runs terminations without blocking the event loop: a command is forked
// (argv with {vm} replaced; VMFENCE_VM, VMFENCE_REASON, VMFENCE_SRC,
// VMFENCE_DST in its environment), a systemd unit is stopped over sd-bus
// (StopUnit, mode "replace"), a QMP socket gets qmp_capabilities + quit.
// Once per VM per incident: a VM is not terminated again until rearm(vm)
// (called when the VM's interface is re-created or its spec changes).
class ActionRunner {
 public:
  explicit ActionRunner(const Journal* journal = nullptr,
                        std::chrono::milliseconds timeout = std::chrono::seconds(10));
  // Waits for running terminations (up to their deadlines; timed-out ones
  // are killed): a termination in progress is never abandoned.
  ~ActionRunner();
  ActionRunner(const ActionRunner&) = delete;
  ActionRunner& operator=(const ActionRunner&) = delete;
  // Start the VM's termination (policy.action must be terminate): every one
  // of command, systemd_unit, qmp_socket that is set, in that order, each in
  // its own child process. Returns false when an incident for this VM is
  // already being handled (or the policy is not terminate / sets nothing);
  // true when the incident was accepted (a child that fails to start is
  // logged, and the VM stays marked until rearm).
  bool terminate(const ViolationPolicy& policy, const Violation& v);
  // Reap finished commands, kill timed-out ones, log exit status. Call from
  // the event loop at least every 100 ms while busy() .
  void poll();
  bool busy() const;
  void rearm(const std::string& vm);
  // How many terminations were started in total (for status and tests).
  uint64_t started() const { return started_; }

 private:
  struct Running {
    pid_t pid = -1;  // also the child's process group (killed as a whole)
    std::string vm;
    std::string kind;  // "command" | "systemd_unit" | "qmp_socket"
    std::string what;  // the argv / unit / socket path, for the log
    std::chrono::steady_clock::time_point start;
    std::chrono::steady_clock::time_point deadline;
    int out_fd = -1;       // read end of the child's stdout + stderr
    std::string output;    // its last bytes, logged with the exit status
    bool killed = false;   // SIGKILLed at the deadline
  };
  void start_child(Running r, const std::string& why);
  void drain(Running& r);
  void finish(Running& r, int wait_status);
  const Journal* journal_;
  std::chrono::milliseconds timeout_;
  std::map<std::string, bool> incident_;  // vm -> already handled
  std::map<pid_t, Running> running_;
  uint64_t started_ = 0;
};

// Replace every "{vm}" in s.
std::string expand_vm(const std::string& s, const std::string& vm);

// Synchronous building blocks (used by ActionRunner, tested directly).
// Stop a systemd unit through sd-bus; error text on failure, "" on success.
std::string stop_systemd_unit(const std::string& unit,
                              std::chrono::milliseconds timeout = std::chrono::seconds(10));
// QMP: connect, read greeting, qmp_capabilities, quit. "" on success.
std::string qmp_quit(const std::string& socket_path, std::chrono::milliseconds timeout);

}  // namespace vmfence
