// on_violation terminate actions: a command (posix_spawn), a systemd unit
// (sd-bus StopUnit) and a QEMU QMP quit, each in its own child process so the
// event loop never waits on a VM manager.
#include "agent/actions/actions.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <syslog.h>
#include <systemd/sd-bus.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <map>
#include <memory>
#include <string_view>
#include <thread>
#include <vector>

#include "agent/events/journal.h"
#include "agent/spec/json.h"

extern char** environ;

namespace vmfence {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

namespace {

constexpr size_t kOutputKeep = 4096;  // last bytes of a child's output kept for the log
constexpr size_t kOutputLog = 512;    // at most this much of it goes into a log line

std::string errno_text(int e) { return std::strerror(e); }

long long ms_since(Clock::time_point t) { return std::chrono::duration_cast<milliseconds>(Clock::now() - t).count(); }

int remaining_ms(Clock::time_point deadline) {
  auto left = std::chrono::duration_cast<milliseconds>(deadline - Clock::now()).count();
  return left <= 0 ? 0 : static_cast<int>(std::min<long long>(left, 1 << 30));
}

std::string join_argv(const std::vector<std::string>& argv) {
  std::string s;
  for (const auto& a : argv) {
    if (!s.empty()) s += ' ';
    bool plain = !a.empty() && a.find_first_of(" \t\n'\"\\$`") == std::string::npos;
    s += plain ? a : "'" + a + "'";
  }
  return s;
}

// One line for the log: trailing whitespace dropped, newlines shown as " | ",
// the end kept when it is too long (the error is usually last).
std::string output_for_log(const std::string& out) {
  std::string s = out;
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.pop_back();
  if (s.size() > kOutputLog) s = "..." + s.substr(s.size() - kOutputLog);
  std::string r;
  r.reserve(s.size());
  for (char c : s) {
    if (c == '\n') {
      r += " | ";
    } else if (c != '\r') {
      r += c;
    }
  }
  return r;
}

std::string signal_text(int sig) {
  const char* name = sigabbrev_np(sig);
  return name ? std::string("SIG") + name : "signal " + std::to_string(sig);
}

// The environment of a command: ours minus the VMFENCE_* names it gets set.
std::vector<std::string> command_env(const Violation& v) {
  const std::pair<const char*, std::string> ours[] = {
      {"VMFENCE_VM", v.vm},     {"VMFENCE_REASON", v.reason},       {"VMFENCE_SRC", v.src},
      {"VMFENCE_DST", v.dst},   {"VMFENCE_PROTO", v.proto},         {"VMFENCE_DPORT", std::to_string(v.dport)},
      {"VMFENCE_MODE", v.mode}, {"VMFENCE_DIRECTION", v.direction}, {"VMFENCE_INTERFACE", v.interface},
  };
  std::vector<std::string> env;
  for (char** e = environ; e && *e; ++e) {
    std::string_view kv(*e);
    bool replaced = false;
    for (const auto& [name, value] : ours) {
      size_t n = std::strlen(name);
      if (kv.size() > n && kv.compare(0, n, name) == 0 && kv[n] == '=') replaced = true;
    }
    if (!replaced) env.emplace_back(kv);
  }
  for (const auto& [name, value] : ours) env.push_back(std::string(name) + "=" + value);
  return env;
}

std::vector<char*> c_array(std::vector<std::string>& v) {
  std::vector<char*> a;
  a.reserve(v.size() + 1);
  for (auto& s : v) a.push_back(s.data());
  a.push_back(nullptr);
  return a;
}

// close() of an fd the parent owns. Linux releases the fd even when close
// fails (EINTR, EIO), so there is nothing to retry: the error is logged.
void close_fd(int fd, const char* what) {
  if (::close(fd) != 0) spdlog::warn("actions: close({}) of {}: {}", fd, what, errno_text(errno));
}

// write() all of s to fd (EINTR retried); false when it could not.
bool write_all(int fd, const std::string& s) {
  size_t off = 0;
  while (off < s.size()) {
    ssize_t n = ::write(fd, s.data() + off, s.size() - off);
    if (n > 0) {
      off += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    return false;
  }
  return true;
}

// A pipe for a child's stdout + stderr: the read end non-blocking, both CLOEXEC
// (the child's copies on fds 1 and 2 are made by dup2 and so stay open).
// "" on success, else what failed.
std::string output_pipe(int fds[2]) {
  if (::pipe2(fds, O_CLOEXEC) != 0) return "pipe: " + errno_text(errno);
  int flags = ::fcntl(fds[0], F_GETFL);
  if (flags < 0 || ::fcntl(fds[0], F_SETFL, flags | O_NONBLOCK) < 0) {
    std::string err = "fcntl O_NONBLOCK on the output pipe: " + errno_text(errno);
    close_fd(fds[0], "the output pipe");
    close_fd(fds[1], "the output pipe");
    return err;
  }
  return "";
}

// posix_spawn (vfork + exec in glibc: returns once the exec happened) of argv
// in its own process group, stdin /dev/null, stdout + stderr into out_w, no
// other fds, default signal dispositions and an empty signal mask.
// "" on success (*pid set), else why it did not start.
std::string spawn_command(std::vector<std::string> argv, std::vector<std::string> env, int out_w, pid_t* pid) {
  posix_spawn_file_actions_t fa;
  posix_spawnattr_t attr;
  if (int e = posix_spawn_file_actions_init(&fa); e != 0) return "posix_spawn_file_actions_init: " + errno_text(e);
  if (int e = posix_spawnattr_init(&attr); e != 0) {
    if (int d = posix_spawn_file_actions_destroy(&fa); d != 0) {
      spdlog::warn("actions: posix_spawn_file_actions_destroy: {}", errno_text(d));
    }
    return "posix_spawnattr_init: " + errno_text(e);
  }
  std::string err = [&]() -> std::string {
    auto failed = [](const char* what, int e) { return std::string(what) + ": " + errno_text(e); };
    int e;
    if ((e = posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0)) != 0) {
      return failed("posix_spawn_file_actions_addopen /dev/null", e);
    }
    if ((e = posix_spawn_file_actions_adddup2(&fa, out_w, 1)) != 0 ||
        (e = posix_spawn_file_actions_adddup2(&fa, out_w, 2)) != 0) {
      return failed("posix_spawn_file_actions_adddup2", e);
    }
    if ((e = posix_spawn_file_actions_addclosefrom_np(&fa, 3)) != 0) {
      return failed("posix_spawn_file_actions_addclosefrom_np", e);
    }
    sigset_t none, all;
    if (sigemptyset(&none) != 0 || sigfillset(&all) != 0) return failed("sigemptyset/sigfillset", errno);
    if ((e = posix_spawnattr_setsigmask(&attr, &none)) != 0) return failed("posix_spawnattr_setsigmask", e);
    if ((e = posix_spawnattr_setsigdefault(&attr, &all)) != 0) return failed("posix_spawnattr_setsigdefault", e);
    if ((e = posix_spawnattr_setpgroup(&attr, 0)) != 0) return failed("posix_spawnattr_setpgroup", e);
    if ((e = posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETPGROUP)) !=
        0) {
      return failed("posix_spawnattr_setflags", e);
    }
    auto cargv = c_array(argv);
    auto cenv = c_array(env);
    if ((e = posix_spawnp(pid, cargv[0], &fa, &attr, cargv.data(), cenv.data())) != 0) return errno_text(e);
    return "";
  }();
  // Both only fail on an invalid object: nothing to undo, the child (if any) runs.
  if (int d = posix_spawn_file_actions_destroy(&fa); d != 0) {
    spdlog::warn("actions: posix_spawn_file_actions_destroy: {}", errno_text(d));
  }
  if (int d = posix_spawnattr_destroy(&attr); d != 0) {
    spdlog::warn("actions: posix_spawnattr_destroy: {}", errno_text(d));
  }
  return err;
}

// fork a child that runs fn() and reports its error text on stdout (exit 1),
// or exits 0 on success. The child touches nothing of the parent's state
// beyond what fn needs (no spdlog: its locks may be held by another thread).
// Set-up steps of the child that fail without stopping it (its own process
// group, signal mask and dispositions, stdin, closing inherited fds) are
// reported as "warning: ..." lines on its output, logged with its exit status.
// Exit status 2: the child could not report on its output at all.
template <typename Fn>
pid_t fork_task(int out_w, Fn fn) {
  pid_t pid = ::fork();
  if (pid != 0) {
    // Also in the parent: no race with kill(-pid). The child does the same,
    // so a failure here (ESRCH: it already exited) is only worth a note.
    if (pid > 0 && ::setpgid(pid, pid) != 0 && errno != ESRCH) {
      spdlog::warn("actions: setpgid of child {}: {}", pid, errno_text(errno));
    }
    return pid;
  }
  std::string warnings;
  auto warn = [&warnings](const char* what) {
    warnings += std::string("warning: ") + what + ": " + errno_text(errno) + "\n";
  };
  if (::setpgid(0, 0) != 0) warn("setpgid");
  sigset_t none;
  if (sigemptyset(&none) != 0 || ::sigprocmask(SIG_SETMASK, &none, nullptr) != 0) warn("sigprocmask");
  for (int s = 1; s < NSIG; ++s) {
    if (s == SIGKILL || s == SIGSTOP) continue;
    // EINVAL: a signal glibc reserves for itself (32, 33), not ours to set.
    if (::signal(s, SIG_DFL) == SIG_ERR && errno != EINVAL) warn("signal");
  }
  int null = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  if (null < 0) {
    warn("open /dev/null");  // fn does not read stdin
  } else if (::dup2(null, 0) < 0) {
    warn("dup2 /dev/null to stdin");
  }
  if (::dup2(out_w, 1) < 0 || ::dup2(out_w, 2) < 0) {
    warn("dup2 of the output pipe");
    ::_exit(write_all(out_w, warnings) ? 1 : 2);  // say it on the pipe itself
  }
  if (::close_range(3, ~0U, 0) != 0) warn("close_range");  // harmless: fds held until it exits
  if (!write_all(1, warnings)) ::_exit(2);
  std::string err = fn();
  if (!err.empty()) {
    err += '\n';
    if (!write_all(1, err)) ::_exit(2);
  }
  ::_exit(err.empty() ? 0 : 1);
}

}  // namespace

std::string expand_vm(const std::string& s, const std::string& vm) {
  static constexpr std::string_view kVar = "{vm}";
  std::string r;
  r.reserve(s.size() + vm.size());
  size_t pos = 0;
  for (size_t at; (at = s.find(kVar, pos)) != std::string::npos; pos = at + kVar.size()) {
    r.append(s, pos, at - pos);
    r += vm;
  }
  r.append(s, pos, std::string::npos);
  return r;
}

// ---- ActionRunner ------------------------------------------------------------

const char* ActionRunner::kind_name(Kind kind) {
  switch (kind) {
    case Kind::command:
      return "command";
    case Kind::systemd_unit:
      return "systemd_unit";
    case Kind::qmp_socket:
      return "qmp_socket";
  }
  return "?";
}

ActionRunner::ActionRunner(const Journal* journal, milliseconds timeout, size_t max_running)
    : journal_(journal), timeout_(timeout), max_running_(std::max<size_t>(1, max_running)) {}

ActionRunner::~ActionRunner() {
  // Queued terminations are not started now: the agent is stopping, and
  // enforcement stays in place without it.
  for (const auto& vm : queue_) {
    auto it = pending_.find(vm);
    const size_t left = it == pending_.end() ? 0 : it->second.steps.size() - it->second.next;
    std::string msg =
        vm + ": terminate: dropped, the agent is stopping: " + std::to_string(left) + " queued child(ren) not started";
    spdlog::error("{}", msg);
    if (journal_) journal_->notice(LOG_ERR, msg, vm);
  }
  queue_.clear();
  pending_.clear();
  if (!running_.empty()) {
    spdlog::info("actions: waiting for {} termination child(ren) to finish", running_.size());
  }
  // poll() kills what passes its deadline; give a killed child a moment to go.
  Clock::time_point give_up{};
  for (const auto& [pid, r] : running_) give_up = std::max(give_up, r.deadline);
  give_up += std::chrono::seconds(2);
  while (busy() && Clock::now() < give_up) {
    poll();
    if (busy()) std::this_thread::sleep_for(milliseconds(5));
  }
  for (auto& [pid, r] : running_) {
    spdlog::error("{}: terminate: {} (pid {}) did not exit even after SIGKILL; left behind", r.vm, r.kind, pid);
    if (r.out_fd >= 0) close_fd(r.out_fd, "a child's output pipe");
  }
}

bool ActionRunner::terminate(const ViolationPolicy& policy, const Violation& v) {
  if (policy.action != Action::terminate) {
    spdlog::error("{}: terminate called for a policy whose action is not terminate", v.vm);
    return false;
  }
  if (v.vm.empty()) {
    spdlog::error("terminate: violation on {} belongs to no VM; nothing to stop ({})",
                  v.interface.empty() ? "an unknown interface" : v.interface, v.summary());
    return false;
  }
  if (incident_.count(v.vm)) {
    spdlog::debug("{}: terminate: already handled in this incident", v.vm);
    return false;
  }
  if (pending_.count(v.vm)) {
    // Rearmed while its termination waits in the queue: that one handles this
    // incident too (one queue entry per VM).
    incident_.insert(v.vm);
    spdlog::debug("{}: terminate: already queued", v.vm);
    return false;
  }
  incident_.insert(v.vm);
  const std::string why = v.summary();
  if (policy.command.empty() && policy.systemd_unit.empty() && policy.qmp_socket.empty()) {
    spdlog::error("{}: terminate: no command, systemd_unit or qmp_socket configured; nothing to do ({})", v.vm, why);
    if (journal_) journal_->notice(LOG_ERR, v.vm + ": terminate: nothing configured to stop the VM", v.vm);
    return false;
  }

  Pending p;
  p.violation = v;
  p.why = why;
  p.accepted = Clock::now();
  if (!policy.command.empty()) {
    Step s;
    s.kind = Kind::command;
    s.argv.reserve(policy.command.size());
    for (const auto& a : policy.command) s.argv.push_back(expand_vm(a, v.vm));
    s.what = join_argv(s.argv);
    p.steps.push_back(std::move(s));
  }
  if (!policy.systemd_unit.empty()) {
    Step s;
    s.kind = Kind::systemd_unit;
    s.target = expand_vm(policy.systemd_unit, v.vm);
    s.what = s.target;
    p.steps.push_back(std::move(s));
  }
  if (!policy.qmp_socket.empty()) {
    Step s;
    s.kind = Kind::qmp_socket;
    s.target = expand_vm(policy.qmp_socket, v.vm);
    s.what = s.target;
    p.steps.push_back(std::move(s));
  }
  // The queue is empty whenever a slot is free (start_queued fills them).
  if (running_.size() >= max_running_) {
    p.waited = true;
    std::string msg = v.vm + ": terminate: queued: " + std::to_string(running_.size()) +
                      " child(ren) running, the most at once; " + std::to_string(queue_.size()) + " ahead [" + why +
                      "]";
    spdlog::warn("{}", msg);
    if (journal_) journal_->notice(LOG_WARNING, msg, v.vm);
  }
  pending_.emplace(v.vm, std::move(p));
  queue_.push_back(v.vm);
  start_queued();
  return true;
}

void ActionRunner::start_queued() {
  while (!queue_.empty() && running_.size() < max_running_) {
    auto it = pending_.find(queue_.front());
    if (it == pending_.end() || it->second.next >= it->second.steps.size()) {  // not expected: keep going
      if (it != pending_.end()) pending_.erase(it);
      queue_.pop_front();
      continue;
    }
    Pending& p = it->second;
    if (p.next == 0) ++started_;
    const size_t step = p.next++;
    start_step(p, p.steps[step]);
    if (p.next >= p.steps.size()) {
      pending_.erase(it);
      queue_.pop_front();
    }
  }
  // The head may have started only part of its children: the rest wait.
  if (!queue_.empty()) {
    if (auto it = pending_.find(queue_.front()); it != pending_.end()) it->second.waited = true;
  }
}

void ActionRunner::start_failed(const std::string& vm, const std::string& kind, const std::string& what,
                                const std::string& err) {
  ++failed_;
  if (on_result_) on_result_(vm, false);
  std::string msg = vm + ": terminate: " + kind + " " + what + " failed to start: " + err;
  spdlog::error("{}", msg);
  if (journal_) journal_->notice(LOG_ERR, msg, vm);
}

void ActionRunner::start_step(const Pending& p, const Step& step) {
  Running r;
  r.vm = p.violation.vm;
  r.kind = kind_name(step.kind);
  r.what = step.what;
  int fds[2];
  if (std::string e = output_pipe(fds); !e.empty()) {
    start_failed(r.vm, r.kind, r.what, e);
    return;
  }
  r.start = Clock::now();
  if (step.kind == Kind::command) {
    std::string e = spawn_command(step.argv, command_env(p.violation), fds[1], &r.pid);
    close_fd(fds[1], "the output pipe's write end");
    if (!e.empty()) {
      close_fd(fds[0], "the output pipe");
      start_failed(r.vm, r.kind, r.what, e);
      return;
    }
  } else {
    // Leave the child part of the time for its own timeout, so that it can
    // still say why before it would be killed.
    const milliseconds child_timeout = timeout_ - std::min(timeout_ / 10, milliseconds(500));
    const std::string target = step.target;
    if (step.kind == Kind::systemd_unit) {
      r.pid = fork_task(fds[1], [target, child_timeout] { return stop_systemd_unit(target, child_timeout); });
    } else {
      r.pid = fork_task(fds[1], [target, child_timeout] { return qmp_quit(target, child_timeout); });
    }
    const int fork_errno = errno;
    close_fd(fds[1], "the output pipe's write end");
    if (r.pid < 0) {
      close_fd(fds[0], "the output pipe");
      start_failed(r.vm, r.kind, r.what, "fork: " + errno_text(fork_errno));
      return;
    }
  }
  r.out_fd = fds[0];
  start_child(std::move(r), p.why, p.waited ? ms_since(p.accepted) : -1);
}

void ActionRunner::start_child(Running r, const std::string& why, long long queued_ms) {
  r.deadline = r.start + timeout_;
  std::string msg =
      r.vm + ": terminate: " + r.kind + " started (pid " + std::to_string(r.pid) + "): " + r.what + " [" + why + "]";
  if (queued_ms >= 0) msg += " after " + std::to_string(queued_ms) + " ms in the queue";
  spdlog::warn("{}", msg);
  if (journal_) journal_->notice(LOG_WARNING, msg, r.vm);
  pid_t pid = r.pid;
  running_.emplace(pid, std::move(r));
}

void ActionRunner::drain(Running& r) {
  if (r.out_fd < 0) return;
  char buf[4096];
  for (;;) {
    ssize_t n = ::read(r.out_fd, buf, sizeof buf);
    if (n > 0) {
      r.output.append(buf, static_cast<size_t>(n));
      if (r.output.size() > kOutputKeep) r.output.erase(0, r.output.size() - kOutputKeep);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n == 0) {  // every writer is gone
      close_fd(r.out_fd, "a child's output pipe");
      r.out_fd = -1;
      return;
    }
    if (errno != EAGAIN) {  // not expected on a pipe: stop reading it, finish() still logs the exit
      spdlog::warn("{}: terminate: reading the output of {} (pid {}): {}", r.vm, r.kind, r.pid, errno_text(errno));
      close_fd(r.out_fd, "a child's output pipe");
      r.out_fd = -1;
    }
    return;  // EAGAIN: a writer (the child, or something it started) is still there
  }
}

void ActionRunner::finish(Running& r, int wait_status, const std::string& unknown_why) {
  drain(r);
  if (r.out_fd >= 0) {  // a grandchild may hold the pipe: do not wait for it
    close_fd(r.out_fd, "a child's output pipe");
    r.out_fd = -1;
  }
  const long long ms = ms_since(r.start);
  const std::string head = r.vm + ": terminate: " + r.kind + " (pid " + std::to_string(r.pid) + ") ";
  std::string msg;
  bool ok = false;
  if (wait_status < 0) {
    msg = head + "ended; exit status unknown (" + unknown_why + ")";
  } else if (r.killed) {
    msg = head + "timed out after " + std::to_string(timeout_.count()) + " ms: killed (" +
          (WIFSIGNALED(wait_status) ? signal_text(WTERMSIG(wait_status)) : "exited") + ")";
  } else if (WIFEXITED(wait_status)) {
    ok = WEXITSTATUS(wait_status) == 0;
    msg = head + "exited with status " + std::to_string(WEXITSTATUS(wait_status)) + " after " + std::to_string(ms) +
          " ms";
  } else if (WIFSIGNALED(wait_status)) {
    msg = head + "killed by " + signal_text(WTERMSIG(wait_status)) + " after " + std::to_string(ms) + " ms";
  } else {
    msg = head + "ended with wait status " + std::to_string(wait_status);
  }
  ++(ok ? ok_ : failed_);
  if (on_result_) on_result_(r.vm, ok);
  msg += ": " + r.what;
  std::string out = output_for_log(r.output);
  if (!out.empty()) msg += (ok ? "; output: " : "; error: ") + out;
  if (ok) {
    spdlog::info("{}", msg);
  } else {
    spdlog::error("{}", msg);
  }
  if (journal_) journal_->notice(ok ? LOG_INFO : LOG_ERR, msg, r.vm);
}

void ActionRunner::kill_child(Running& r) {
  // The whole group: a shell's children too. ESRCH: already gone (or the
  // group never formed: the pid itself is killed next).
  if (::kill(-r.pid, SIGKILL) != 0 && errno != ESRCH) {
    spdlog::error("{}: terminate: kill of process group {}: {}", r.vm, r.pid, errno_text(errno));
  }
  if (::kill(r.pid, SIGKILL) != 0 && errno != ESRCH) {
    spdlog::error("{}: terminate: kill of pid {}: {}", r.vm, r.pid, errno_text(errno));
  }
  r.killed = true;
}

void ActionRunner::poll() {
  const auto now = Clock::now();
  for (auto it = running_.begin(); it != running_.end();) {
    Running& r = it->second;
    drain(r);
    int status = 0;
    pid_t w = ::waitpid(r.pid, &status, WNOHANG);
    if (w == 0 || (w < 0 && errno == EINTR)) {  // still running (or ask again at the next poll)
      if (!r.killed && now >= r.deadline) {
        spdlog::error("{}: terminate: {} (pid {}) still running after {} ms: sending SIGKILL", r.vm, r.kind, r.pid,
                      timeout_.count());
        kill_child(r);
      }
      ++it;
      continue;
    }
    if (w == r.pid) {
      finish(r, status, "");
    } else if (w < 0 && errno == ECHILD) {
      finish(r, -1, "already reaped elsewhere: is SIGCHLD ignored?");
    } else {
      // It cannot be waited for: make sure it does not run on unaccounted.
      std::string why = w < 0 ? "waitpid: " + errno_text(errno) : "waitpid returned pid " + std::to_string(w);
      kill_child(r);
      finish(r, -1, why);
    }
    it = running_.erase(it);
  }
  start_queued();
}

bool ActionRunner::busy() const { return !running_.empty() || !queue_.empty(); }

void ActionRunner::rearm(const std::string& vm) { incident_.erase(vm); }

void ActionRunner::forget(const std::string& vm) {
  incident_.erase(vm);
  auto it = pending_.find(vm);
  if (it == pending_.end()) return;
  const size_t left = it->second.steps.size() - it->second.next;
  pending_.erase(it);
  std::erase(queue_, vm);
  std::string msg =
      vm + ": terminate: cancelled, the VM was removed: " + std::to_string(left) + " queued child(ren) not started";
  spdlog::warn("{}", msg);
  if (journal_) journal_->notice(LOG_WARNING, msg, vm);
}

// ---- systemd over sd-bus -----------------------------------------------------

namespace {

struct BusCloser {
  void operator()(sd_bus* b) const {
    // Always returns NULL (nothing to check): flushes what is queued, closes, unrefs.
    static_cast<void>(sd_bus_flush_close_unref(b));
  }
};
struct MessageUnref {
  void operator()(sd_bus_message* m) const {
    static_cast<void>(sd_bus_message_unref(m));  // always returns NULL
  }
};

std::string bus_error_text(int r, const sd_bus_error& e) {
  if (e.message && *e.message) return std::string(e.message) + (e.name ? std::string(" (") + e.name + ")" : "");
  return errno_text(-r);
}

int on_job_removed(sd_bus_message* m, void* userdata, sd_bus_error*) {
  auto* results = static_cast<std::map<std::string, std::string>*>(userdata);
  uint32_t id = 0;
  const char* path = nullptr;
  const char* unit = nullptr;
  const char* result = nullptr;
  if (sd_bus_message_read(m, "uoss", &id, &path, &unit, &result) >= 0 && path && result) {
    (*results)[path] = result;
  }
  return 0;
}

}  // namespace

std::string stop_systemd_unit(const std::string& unit, milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  sd_bus* raw = nullptr;
  int r = sd_bus_open_system(&raw);
  if (r < 0) return "cannot connect to the system bus: " + errno_text(-r);
  std::unique_ptr<sd_bus, BusCloser> bus(raw);
  r = sd_bus_set_method_call_timeout(bus.get(), static_cast<uint64_t>(std::max<long long>(1, timeout.count())) * 1000);
  // Without it a silent systemd would hold each call for sd-bus's default (25 s), past our deadline.
  if (r < 0) return "system bus: cannot set the call timeout: " + errno_text(-r);

  // Watch for the stop job's end before asking for it, so it cannot be missed.
  std::map<std::string, std::string> results;
  r = sd_bus_match_signal(bus.get(), nullptr, "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
                          "org.freedesktop.systemd1.Manager", "JobRemoved", on_job_removed, &results);
  if (r < 0) return "system bus: cannot watch systemd jobs: " + errno_text(-r);

  sd_bus_error error = SD_BUS_ERROR_NULL;
  // Make systemd send JobRemoved even when nobody else subscribed (best effort).
  r = sd_bus_call_method(bus.get(), "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
                         "org.freedesktop.systemd1.Manager", "Subscribe", &error, nullptr, "");
  if (r < 0) {
    std::string e = bus_error_text(r, error);
    sd_bus_error_free(&error);
    if (r == -ETIMEDOUT) return "systemd did not answer on the system bus: " + e;
    if (r == -ECONNREFUSED || r == -ENOENT || r == -ECONNRESET) return "system bus: " + e;
    // Otherwise go on: StopUnit says what is wrong.
  }
  sd_bus_message* reply_raw = nullptr;
  r = sd_bus_call_method(bus.get(), "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
                         "org.freedesktop.systemd1.Manager", "StopUnit", &error, &reply_raw, "ss", unit.c_str(),
                         "replace");
  if (r < 0) {
    std::string e = "StopUnit " + unit + ": " + bus_error_text(r, error);
    sd_bus_error_free(&error);
    return e;
  }
  std::unique_ptr<sd_bus_message, MessageUnref> reply(reply_raw);
  const char* job_c = nullptr;
  r = sd_bus_message_read(reply.get(), "o", &job_c);
  if (r < 0 || !job_c) return "StopUnit " + unit + ": unexpected reply: " + errno_text(-r);
  const std::string job = job_c;

  for (;;) {
    if (auto it = results.find(job); it != results.end()) {
      if (it->second == "done") return "";
      return "stop job for " + unit + " ended with result '" + it->second + "'";
    }
    r = sd_bus_process(bus.get(), nullptr);
    if (r < 0) return "system bus: " + errno_text(-r) + " while waiting for the stop job of " + unit;
    if (r > 0) continue;
    int left = remaining_ms(deadline);
    if (left <= 0) return "timed out waiting for the stop job of " + unit + " (" + job + ")";
    r = sd_bus_wait(bus.get(), static_cast<uint64_t>(left) * 1000);
    if (r < 0 && r != -EINTR) return "system bus: " + errno_text(-r) + " while waiting for the stop job of " + unit;
  }
}

// ---- QEMU QMP ----------------------------------------------------------------

namespace {

class QmpConn {
 public:
  QmpConn(int fd, Clock::time_point deadline) : fd_(fd), deadline_(deadline) {}
  ~QmpConn() {
    // The exchange is over (its result is already decided): a failing close
    // of the socket changes nothing and has nobody to tell.
    if (fd_ >= 0 && ::close(fd_) != 0) {
      // Nothing to do: Linux releases the fd anyway.
    }
  }
  // One JSON message (QMP is one per line). "" + eof=true when closed.
  std::string read_line(std::string* err, bool* eof) {
    *eof = false;
    for (;;) {
      if (size_t nl = buf_.find('\n'); nl != std::string::npos) {
        std::string line = buf_.substr(0, nl);
        buf_.erase(0, nl + 1);
        while (!line.empty() && (line.back() == '\r' || line.back() == ' ')) line.pop_back();
        if (line.empty()) continue;
        return line;
      }
      int left = remaining_ms(deadline_);
      if (left <= 0) {
        *err = "timed out";
        return "";
      }
      struct pollfd p = {fd_, POLLIN, 0};
      int r = ::poll(&p, 1, left);
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) {
        *err = "poll: " + errno_text(errno);
        return "";
      }
      if (r == 0) continue;  // the deadline check above ends it
      char b[4096];
      ssize_t n = ::recv(fd_, b, sizeof b, 0);
      if (n > 0) {
        buf_.append(b, static_cast<size_t>(n));
        if (buf_.size() > (1 << 20)) {
          *err = "message too long";
          return "";
        }
        continue;
      }
      if (n == 0 || errno == ECONNRESET) {
        *eof = true;
        return "";
      }
      if (errno == EINTR || errno == EAGAIN) continue;
      *err = "read: " + errno_text(errno);
      return "";
    }
  }
  std::string send(const std::string& s) {
    size_t off = 0;
    while (off < s.size()) {
      ssize_t n = ::send(fd_, s.data() + off, s.size() - off, MSG_NOSIGNAL);
      if (n > 0) {
        off += static_cast<size_t>(n);
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && errno == EAGAIN) {
        int left = remaining_ms(deadline_);
        if (left <= 0) return "timed out sending";
        struct pollfd p = {fd_, POLLOUT, 0};
        if (::poll(&p, 1, left) < 0 && errno != EINTR) return "poll: " + errno_text(errno);
        continue;
      }
      return "send: " + errno_text(errno);
    }
    return "";
  }

 private:
  int fd_;
  Clock::time_point deadline_;
  std::string buf_;
};

enum class QmpKind { greeting, ret, error, event, other, invalid };

QmpKind classify(const std::string& line, std::string* desc) {
  rj::Document d;
  d.Parse(line.c_str());
  if (d.HasParseError() || !d.IsObject()) return QmpKind::invalid;
  if (d.HasMember("QMP")) return QmpKind::greeting;
  if (d.HasMember("return")) return QmpKind::ret;
  if (d.HasMember("error")) {
    const auto& e = d["error"];
    if (e.IsObject() && e.HasMember("desc") && e["desc"].IsString()) {
      *desc = e["desc"].GetString();
    } else {
      *desc = line;
    }
    return QmpKind::error;
  }
  if (d.HasMember("event")) return QmpKind::event;
  return QmpKind::other;
}

std::string shorten(const std::string& s) { return s.size() > 200 ? s.substr(0, 200) + "..." : s; }

}  // namespace

std::string qmp_quit(const std::string& socket_path, milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  const std::string where = "QMP " + socket_path + ": ";
  struct sockaddr_un sa {};
  sa.sun_family = AF_UNIX;
  if (socket_path.empty() || socket_path.size() >= sizeof sa.sun_path) return where + "bad socket path";
  std::memcpy(sa.sun_path, socket_path.data(), socket_path.size());

  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return where + "socket: " + errno_text(errno);
  QmpConn conn(fd, deadline);
  // A full backlog makes a unix connect wait, bounded by SO_SNDTIMEO.
  struct timeval tv {};
  tv.tv_sec = timeout.count() / 1000;
  tv.tv_usec = (timeout.count() % 1000) * 1000;
  if (::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) != 0) return where + "setsockopt: " + errno_text(errno);
  int r;
  do {
    r = ::connect(fd, reinterpret_cast<struct sockaddr*>(&sa), sizeof sa);
  } while (r < 0 && errno == EINTR && remaining_ms(deadline) > 0);
  if (r < 0) return where + "connect: " + errno_text(errno);
  int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0 || ::fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) return where + "fcntl: " + errno_text(errno);

  std::string err, desc;
  bool eof = false;
  // Greeting (QEMU sends it at once unless another client holds the monitor).
  for (;;) {
    std::string line = conn.read_line(&err, &eof);
    if (eof) return where + "closed before the greeting";
    if (!err.empty()) return where + "no greeting: " + err + " (is another client connected?)";
    QmpKind k = classify(line, &desc);
    if (k == QmpKind::greeting) break;
    if (k == QmpKind::invalid) return where + "not a QMP greeting: " + shorten(line);
  }
  // Capabilities negotiation, then quit: wait for each one's return, skipping events.
  auto command = [&](const char* name, bool eof_ok) -> std::string {
    std::string e = conn.send(std::string("{\"execute\":\"") + name + "\"}\n");
    if (!e.empty()) {
      // QEMU may close as soon as quit is in: a broken pipe then is success.
      if (eof_ok && e.find(errno_text(EPIPE)) != std::string::npos) return "";
      return where + name + ": " + e;
    }
    for (;;) {
      std::string line = conn.read_line(&err, &eof);
      if (eof) return eof_ok ? "" : where + "closed during " + name;
      if (!err.empty()) return where + name + ": " + err;
      QmpKind k = classify(line, &desc);
      if (k == QmpKind::ret) return "";
      if (k == QmpKind::error) return where + name + " refused: " + desc;
      if (k == QmpKind::invalid) return where + name + ": unexpected reply: " + shorten(line);
    }
  };
  if (std::string e = command("qmp_capabilities", false); !e.empty()) return e;
  return command("quit", true);
}

}  // namespace vmfence
