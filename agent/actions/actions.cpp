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

#include "agent/spec/json.h"

#include "agent/events/journal.h"

extern char** environ;

namespace vmfence {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

namespace {

constexpr size_t kOutputKeep = 4096;  // last bytes of a child's output kept for the log
constexpr size_t kOutputLog = 512;    // at most this much of it goes into a log line

std::string errno_text(int e) { return std::strerror(e); }

long long ms_since(Clock::time_point t) {
  return std::chrono::duration_cast<milliseconds>(Clock::now() - t).count();
}

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
      {"VMFENCE_VM", v.vm},
      {"VMFENCE_REASON", v.reason},
      {"VMFENCE_SRC", v.src},
      {"VMFENCE_DST", v.dst},
      {"VMFENCE_PROTO", v.proto},
      {"VMFENCE_DPORT", std::to_string(v.dport)},
      {"VMFENCE_MODE", v.mode},
      {"VMFENCE_DIRECTION", v.direction},
      {"VMFENCE_INTERFACE", v.interface},
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

// A pipe for a child's stdout + stderr: the read end non-blocking, both CLOEXEC
// (the child's copies on fds 1 and 2 are made by dup2 and so stay open).
bool output_pipe(int fds[2]) {
  if (::pipe2(fds, O_CLOEXEC) != 0) return false;
  ::fcntl(fds[0], F_SETFL, ::fcntl(fds[0], F_GETFL) | O_NONBLOCK);
  return true;
}

// posix_spawn (vfork + exec in glibc: returns once the exec happened) of argv
// in its own process group, stdin /dev/null, stdout + stderr into out_w, no
// other fds, default signal dispositions and an empty signal mask.
int spawn_command(std::vector<std::string> argv, std::vector<std::string> env, int out_w, pid_t* pid) {
  posix_spawn_file_actions_t fa;
  posix_spawnattr_t attr;
  posix_spawn_file_actions_init(&fa);
  posix_spawnattr_init(&attr);
  posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_adddup2(&fa, out_w, 1);
  posix_spawn_file_actions_adddup2(&fa, out_w, 2);
  posix_spawn_file_actions_addclosefrom_np(&fa, 3);
  sigset_t none, all;
  sigemptyset(&none);
  sigfillset(&all);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setsigdefault(&attr, &all);
  posix_spawnattr_setpgroup(&attr, 0);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETPGROUP);
  auto cargv = c_array(argv);
  auto cenv = c_array(env);
  int r = posix_spawnp(pid, cargv[0], &fa, &attr, cargv.data(), cenv.data());
  posix_spawn_file_actions_destroy(&fa);
  posix_spawnattr_destroy(&attr);
  return r;
}

// fork a child that runs fn() and reports its error text on stdout (exit 1),
// or exits 0 on success. The child touches nothing of the parent's state
// beyond what fn needs (no spdlog: its locks may be held by another thread).
template <typename Fn>
pid_t fork_task(int out_w, Fn fn) {
  pid_t pid = ::fork();
  if (pid != 0) {
    if (pid > 0) ::setpgid(pid, pid);  // also in the parent: no race with kill(-pid)
    return pid;
  }
  ::setpgid(0, 0);
  sigset_t none;
  sigemptyset(&none);
  ::sigprocmask(SIG_SETMASK, &none, nullptr);
  for (int s = 1; s < NSIG; ++s) {
    if (s != SIGKILL && s != SIGSTOP) ::signal(s, SIG_DFL);
  }
  int null = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  if (null >= 0) ::dup2(null, 0);
  ::dup2(out_w, 1);
  ::dup2(out_w, 2);
  ::close_range(3, ~0U, 0);
  std::string err = fn();
  if (!err.empty()) {
    err += '\n';
    ssize_t ignored = ::write(1, err.data(), err.size());
    (void)ignored;
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

ActionRunner::ActionRunner(const Journal* journal, milliseconds timeout)
    : journal_(journal), timeout_(timeout) {}

ActionRunner::~ActionRunner() {
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
    if (r.out_fd >= 0) ::close(r.out_fd);
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
  bool& handled = incident_[v.vm];
  if (handled) {
    spdlog::debug("{}: terminate: already handled in this incident", v.vm);
    return false;
  }
  handled = true;
  const std::string why = v.summary();
  if (policy.command.empty() && policy.systemd_unit.empty() && policy.qmp_socket.empty()) {
    spdlog::error("{}: terminate: no command, systemd_unit or qmp_socket configured; nothing to do ({})",
                  v.vm, why);
    if (journal_) journal_->notice(LOG_ERR, v.vm + ": terminate: nothing configured to stop the VM", v.vm);
    return false;
  }
  ++started_;
  // Leave the child part of the time for its own timeout, so that it can
  // still say why before it would be killed.
  const milliseconds child_timeout = timeout_ - std::min(timeout_ / 10, milliseconds(500));

  auto start_failed = [&](const std::string& kind, const std::string& what, const std::string& err) {
    std::string msg = v.vm + ": terminate: " + kind + " " + what + " failed to start: " + err;
    spdlog::error("{}", msg);
    if (journal_) journal_->notice(LOG_ERR, msg, v.vm);
  };

  if (!policy.command.empty()) {
    std::vector<std::string> argv;
    argv.reserve(policy.command.size());
    for (const auto& a : policy.command) argv.push_back(expand_vm(a, v.vm));
    Running r;
    r.vm = v.vm;
    r.kind = "command";
    r.what = join_argv(argv);
    int fds[2];
    if (!output_pipe(fds)) {
      start_failed(r.kind, r.what, "pipe: " + errno_text(errno));
    } else {
      r.start = Clock::now();
      int e = spawn_command(std::move(argv), command_env(v), fds[1], &r.pid);
      ::close(fds[1]);
      if (e != 0) {
        ::close(fds[0]);
        start_failed(r.kind, r.what, errno_text(e));
      } else {
        r.out_fd = fds[0];
        start_child(std::move(r), why);
      }
    }
  }

  auto start_task = [&](const std::string& kind, const std::string& what, auto fn) {
    Running r;
    r.vm = v.vm;
    r.kind = kind;
    r.what = what;
    int fds[2];
    if (!output_pipe(fds)) {
      start_failed(kind, what, "pipe: " + errno_text(errno));
      return;
    }
    r.start = Clock::now();
    r.pid = fork_task(fds[1], fn);
    ::close(fds[1]);
    if (r.pid < 0) {
      ::close(fds[0]);
      start_failed(kind, what, "fork: " + errno_text(errno));
      return;
    }
    r.out_fd = fds[0];
    start_child(std::move(r), why);
  };

  if (!policy.systemd_unit.empty()) {
    const std::string unit = expand_vm(policy.systemd_unit, v.vm);
    start_task("systemd_unit", unit, [unit, child_timeout] { return stop_systemd_unit(unit, child_timeout); });
  }
  if (!policy.qmp_socket.empty()) {
    const std::string sock = expand_vm(policy.qmp_socket, v.vm);
    start_task("qmp_socket", sock, [sock, child_timeout] { return qmp_quit(sock, child_timeout); });
  }
  return true;
}

void ActionRunner::start_child(Running r, const std::string& why) {
  r.deadline = r.start + timeout_;
  std::string msg = r.vm + ": terminate: " + r.kind + " started (pid " + std::to_string(r.pid) + "): " +
                    r.what + " [" + why + "]";
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
      ::close(r.out_fd);
      r.out_fd = -1;
    }
    return;  // EAGAIN: a writer (the child, or something it started) is still there
  }
}

void ActionRunner::finish(Running& r, int wait_status) {
  drain(r);
  if (r.out_fd >= 0) {  // a grandchild may hold the pipe: do not wait for it
    ::close(r.out_fd);
    r.out_fd = -1;
  }
  const long long ms = ms_since(r.start);
  const std::string head = r.vm + ": terminate: " + r.kind + " (pid " + std::to_string(r.pid) + ") ";
  std::string msg;
  bool ok = false;
  if (wait_status < 0) {
    msg = head + "ended; exit status unknown (already reaped elsewhere: is SIGCHLD ignored?)";
  } else if (r.killed) {
    msg = head + "timed out after " + std::to_string(timeout_.count()) + " ms: killed (" +
          (WIFSIGNALED(wait_status) ? signal_text(WTERMSIG(wait_status)) : "exited") + ")";
  } else if (WIFEXITED(wait_status)) {
    ok = WEXITSTATUS(wait_status) == 0;
    msg = head + "exited with status " + std::to_string(WEXITSTATUS(wait_status)) + " after " +
          std::to_string(ms) + " ms";
  } else if (WIFSIGNALED(wait_status)) {
    msg = head + "killed by " + signal_text(WTERMSIG(wait_status)) + " after " + std::to_string(ms) + " ms";
  } else {
    msg = head + "ended with wait status " + std::to_string(wait_status);
  }
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

void ActionRunner::poll() {
  const auto now = Clock::now();
  for (auto it = running_.begin(); it != running_.end();) {
    Running& r = it->second;
    drain(r);
    int status = 0;
    pid_t w = ::waitpid(r.pid, &status, WNOHANG);
    if (w < 0 && errno == EINTR) {
      ++it;
      continue;
    }
    if (w == r.pid || (w < 0 && errno == ECHILD)) {
      finish(r, w == r.pid ? status : -1);
      it = running_.erase(it);
      continue;
    }
    if (!r.killed && now >= r.deadline) {
      ::kill(-r.pid, SIGKILL);  // the whole group: a shell's children too
      ::kill(r.pid, SIGKILL);
      r.killed = true;
      spdlog::error("{}: terminate: {} (pid {}) still running after {} ms: sending SIGKILL", r.vm, r.kind,
                    r.pid, timeout_.count());
    }
    ++it;
  }
}

bool ActionRunner::busy() const { return !running_.empty(); }

void ActionRunner::rearm(const std::string& vm) { incident_.erase(vm); }

// ---- systemd over sd-bus -----------------------------------------------------

namespace {

struct BusCloser {
  void operator()(sd_bus* b) const { sd_bus_flush_close_unref(b); }
};
struct MessageUnref {
  void operator()(sd_bus_message* m) const { sd_bus_message_unref(m); }
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
  sd_bus_set_method_call_timeout(bus.get(), static_cast<uint64_t>(std::max<long long>(1, timeout.count())) * 1000);

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
                         "org.freedesktop.systemd1.Manager", "StopUnit", &error, &reply_raw, "ss",
                         unit.c_str(), "replace");
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
    if (fd_ >= 0) ::close(fd_);
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
        ::poll(&p, 1, left);
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
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  int r;
  do {
    r = ::connect(fd, reinterpret_cast<struct sockaddr*>(&sa), sizeof sa);
  } while (r < 0 && errno == EINTR && remaining_ms(deadline) > 0);
  if (r < 0) return where + "connect: " + errno_text(errno);
  ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);

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
