// `vmfence monitor`: the running daemon's drop events as they happen. The
// daemon sends every event as a JSON line (agent/events/monitor_server.h);
// this side filters and formats.
#include <poll.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>
#include <string_view>

#include "agent/cli/commands.h"
#include "agent/events/monitor_server.h"
#include "agent/events/violation.h"
#include "agent/spec/json.h"
#include "maps/reasons.h"
#include "maps/status.h"
#include "vmfence_abi.h"

namespace vmfence {

namespace {

std::string str(const rj::Value& o, const char* key) {
  auto it = o.FindMember(key);
  return it != o.MemberEnd() && it->value.IsString() ? it->value.GetString() : "";
}

unsigned num(const rj::Value& o, const char* key) {
  auto it = o.FindMember(key);
  return it != o.MemberEnd() && it->value.IsUint() ? it->value.GetUint() : 0;
}

// One event line from the daemon: print it if it passes the filters.
// Returns false when stdout is gone.
bool show(std::string_view line, const MonitorOptions& opt) {
  rj::Document d;
  d.Parse(line.data(), line.size());
  if (d.HasParseError() || !d.IsObject()) return true;  // not an event: a newer daemon's, ignore
  if (!opt.vm.empty() && str(d, "vm") != opt.vm) return true;
  if (!opt.reason.empty() && str(d, "reason") != opt.reason) return true;
  std::string out;
  if (opt.json) {
    out.assign(line);
  } else {
    // "2026-11-30T12:00:00.123Z vm1: spoofed_ip from_vm 10.9.9.9 -> 10.2.0.2 udp/53 mode=filtered":
    // the journal's MESSAGE (Violation::summary) with the time and mode.
    Violation v;
    v.vm = str(d, "vm");
    v.interface = str(d, "interface");
    v.reason = str(d, "reason");
    v.direction = str(d, "direction");
    v.src = str(d, "src");
    v.dst = str(d, "dst");
    v.proto = str(d, "proto");
    v.dport = static_cast<uint16_t>(num(d, "dport"));
    v.mode = str(d, "mode");
    auto q = d.FindMember("quarantined");
    v.quarantined = q != d.MemberEnd() && q->value.IsBool() && q->value.GetBool();
    out = str(d, "time") + " " + v.summary() + " mode=" + v.mode;
  }
  out += '\n';
  // Flushed per event: readers are often pipes.
  return std::fwrite(out.data(), 1, out.size(), stdout) == out.size() && std::fflush(stdout) == 0;
}

}  // namespace

int cmd_monitor(const MonitorOptions& opt) {
  if (!opt.reason.empty()) {
    auto r = reason_from_name(opt.reason);
    if (!r) {
      std::string names;
      for (uint8_t i = 0; i < VMFENCE_REASON_COUNT; ++i) names += std::string(i ? ", " : "") + reason_name(i);
      std::fprintf(stderr, "vmfence monitor: unknown reason '%s' (reasons: %s)\n", opt.reason.c_str(), names.c_str());
      return 2;
    }
    if (vmfence_reason_kind(*r) == VMFENCE_DROP_QUIET)
      std::fprintf(stderr,
                   "vmfence monitor: %s drops are counted, never reported: none will show "
                   "(see `vmfence status`)\n",
                   opt.reason.c_str());
  }

  // SIGINT/SIGTERM end the stream (exit 0) through a signalfd polled with
  // the socket. A shell starts background jobs with SIGINT ignored, and an
  // ignored signal never reaches a signalfd: take the default back first.
  signal(SIGINT, SIG_DFL);
  signal(SIGTERM, SIG_DFL);
  sigset_t mask;
  sigemptyset(&mask);
  sigaddset(&mask, SIGINT);
  sigaddset(&mask, SIGTERM);
  sigprocmask(SIG_BLOCK, &mask, nullptr);
  Fd sig(signalfd(-1, &mask, SFD_CLOEXEC));
  if (!sig.valid()) {
    std::fprintf(stderr, "vmfence monitor: signalfd: %s\n", std::strerror(errno));
    return 1;
  }

  const std::string path = monitor_socket_path();
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path)) {
    std::fprintf(stderr, "vmfence monitor: socket path too long: %s\n", path.c_str());
    return 1;
  }
  std::memcpy(addr.sun_path, path.data(), path.size());
  Fd sock(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!sock.valid() || connect(sock.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0) {
    // ENOENT: never started or stopped cleanly; ECONNREFUSED: killed.
    std::fprintf(stderr, "vmfence monitor: no daemon running (%s: %s)\n", path.c_str(), std::strerror(errno));
    return 1;
  }

  std::string buf;
  char chunk[65536];
  for (;;) {
    pollfd fds[2] = {{sock.get(), POLLIN, 0}, {sig.get(), POLLIN, 0}};
    if (poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      std::fprintf(stderr, "vmfence monitor: poll: %s\n", std::strerror(errno));
      return 1;
    }
    if (fds[1].revents & POLLIN) return 0;
    if (!fds[0].revents) continue;
    ssize_t n = read(sock.get(), chunk, sizeof(chunk));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      std::fprintf(stderr,
                   "vmfence monitor: the daemon closed the connection (%s: it stopped, or this monitor fell "
                   "more than %zu KB behind)\n",
                   n < 0 ? std::strerror(errno) : "end of stream", MonitorServer::kMaxBuffered / 1024);
      return 1;
    }
    buf.append(chunk, static_cast<size_t>(n));
    size_t start = 0, nl;
    while ((nl = buf.find('\n', start)) != std::string::npos) {
      if (!show(std::string_view(buf).substr(start, nl - start), opt)) return 1;
      start = nl + 1;
    }
    buf.erase(0, start);
  }
}

}  // namespace vmfence
