#include "agent/events/monitor_server.h"

#include <errno.h>
#include <spdlog/spdlog.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <vector>

#include "agent/spec/json.h"
#include "maps/pinned_maps.h"

namespace vmfence {

namespace {

int64_t clock_ns(clockid_t id) {
  timespec ts{};
  clock_gettime(id, &ts);
  return int64_t{ts.tv_sec} * 1000000000 + ts.tv_nsec;
}

// "2026-11-30T12:00:00.123Z"
std::string utc_ms(int64_t ns) {
  time_t s = static_cast<time_t>(ns / 1000000000);
  tm t{};
  gmtime_r(&s, &t);
  char buf[40];
  size_t n = strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%S", &t);
  snprintf(buf + n, sizeof(buf) - n, ".%03dZ", static_cast<int>(ns / 1000000 % 1000));
  return buf;
}

}  // namespace

std::string monitor_socket_path() { return run_dir() + "/monitor.sock"; }

std::string monitor_line(const Violation& v, int64_t realtime_ns) {
  rj::StringBuffer sb;
  rj::Writer<rj::StringBuffer> w(sb);
  w.StartObject();
  w.Key("time");
  w.String(utc_ms(realtime_ns).c_str());
  for (const auto& f : v.fields()) {
    w.Key(f.name);
    // Writer::RawNumber quotes its text in rapidjson 1.1 (Debian's): a number it is.
    if (f.number)
      w.Uint64(std::strtoull(f.value.c_str(), nullptr, 10));
    else
      w.String(f.value.c_str(), static_cast<rj::SizeType>(f.value.size()));
  }
  w.Key("sport");
  w.Uint(v.sport);
  w.Key("quarantined");
  w.Bool(v.quarantined);
  w.EndObject();
  std::string line(sb.GetString(), sb.GetSize());
  line += '\n';
  return line;
}

MonitorServer::~MonitorServer() {
  clients_.clear();
  if (listen_.valid() && !path_.empty()) ::unlink(path_.c_str());
}

Status MonitorServer::open(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path)) return Status::error(ENAMETOOLONG, "monitor socket " + path);
  std::memcpy(addr.sun_path, path.data(), path.size());
  epoll_.reset(epoll_create1(EPOLL_CLOEXEC));
  if (!epoll_.valid()) return Status::error(errno, "monitor: epoll_create1");
  listen_.reset(socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!listen_.valid()) return Status::error(errno, "monitor: socket");
  // A previous daemon's socket (killed, so never removed): we hold the agent
  // lock, so nobody listens on it.
  ::unlink(path.c_str());
  // Created 0600 rather than chmod-ed after bind: no window where others
  // may connect. (The daemon has no other thread creating files.)
  mode_t old = umask(0177);
  int r = bind(listen_.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof(addr));
  int err = errno;
  umask(old);
  if (r != 0) {
    listen_.reset();
    return Status::error(err, "monitor: bind " + path);
  }
  path_ = path;
  if (listen(listen_.get(), 16) != 0) return Status::error(errno, "monitor: listen on " + path);
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = 0;
  if (epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, listen_.get(), &ev) != 0) return Status::error(errno, "monitor: epoll");
  return {};
}

void MonitorServer::handle_ready() {
  epoll_event evs[32];
  int n = epoll_wait(epoll_.get(), evs, 32, 0);
  for (int i = 0; i < n; ++i) {
    if (evs[i].data.u64 == 0)
      accept_all();
    else
      on_client(evs[i].data.u64, evs[i].events);
  }
}

void MonitorServer::accept_all() {
  for (;;) {
    int fd = accept4(listen_.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      if (errno != EAGAIN && errno != EWOULDBLOCK) spdlog::warn("monitor: accept: {}", std::strerror(errno));
      return;
    }
    Fd owned(fd);
    if (clients_.size() >= kMaxClients) {
      spdlog::warn("monitor: {} clients already connected; refusing another", clients_.size());
      continue;
    }
    uint64_t id = next_id_++;
    Client& c = clients_[id];
    c.id = id;
    c.fd = std::move(owned);
    if (!rewatch(c)) {
      clients_.erase(id);
      continue;
    }
    spdlog::info("monitor: client connected ({} connected)", clients_.size());
  }
}

void MonitorServer::on_client(uint64_t id, uint32_t events) {
  auto it = clients_.find(id);
  if (it == clients_.end()) return;  // dropped earlier in this batch
  Client& c = it->second;
  if (events & (EPOLLHUP | EPOLLERR)) return drop(id, "hung up");
  if (events & EPOLLIN) {
    // Clients send nothing: discard what comes (a bounded amount per wakeup)
    // and notice a half close (the client may still read: keep sending).
    char buf[4096];
    ssize_t r = -1;
    for (int i = 0; i < 16 && (r = recv(c.fd.get(), buf, sizeof(buf), MSG_DONTWAIT)) > 0; ++i) {
    }
    if (r == 0) {
      c.reading = false;
    } else if (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
      return drop(id, std::strerror(errno));
    }
  }
  if ((events & EPOLLOUT) && !flush(c)) return drop(id, "gone");
  rewatch(c);
}

void MonitorServer::publish(const Violation& v) {
  if (clients_.empty()) return;
  int64_t mono = clock_ns(CLOCK_MONOTONIC), real = clock_ns(CLOCK_REALTIME);
  int64_t at = real;
  if (v.timestamp_ns && static_cast<int64_t>(v.timestamp_ns) <= mono) at = real - (mono - v.timestamp_ns);
  send_line(monitor_line(v, at));
}

void MonitorServer::send_line(std::string_view line) {
  std::vector<std::pair<uint64_t, const char*>> gone;
  for (auto& [id, c] : clients_) {
    size_t pending = c.out.size() - c.sent;
    if (pending + line.size() > max_buffered_) {
      ++slow_;
      gone.push_back({id, "too slow: its buffer is full"});
      continue;
    }
    c.out.append(line);
    // With bytes already waiting, EPOLLOUT is armed and sends them in order.
    if (pending == 0) {
      if (!flush(c))
        gone.push_back({id, "gone"});
      else
        rewatch(c);
    }
  }
  for (auto& [id, why] : gone) drop(id, why);
}

bool MonitorServer::flush(Client& c) {
  while (c.sent < c.out.size()) {
    ssize_t n = send(c.fd.get(), c.out.data() + c.sent, c.out.size() - c.sent, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      c.sent += static_cast<size_t>(n);
    } else if (n < 0 && errno == EINTR) {
      continue;
    } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      break;
    } else {
      return false;  // EPIPE, ECONNRESET: the client is gone
    }
  }
  if (c.sent == c.out.size()) {
    c.out.clear();
    c.sent = 0;
  } else if (c.sent > c.out.size() / 2) {
    c.out.erase(0, c.sent);  // amortised: the buffer never holds more than twice what is unsent
    c.sent = 0;
  }
  return true;
}

// Watch for input (until a half close) and, while bytes wait, for room to
// send. Hang-ups are reported whatever is watched.
bool MonitorServer::rewatch(Client& c) {
  uint32_t want = 0;
  if (c.reading) want |= EPOLLIN;
  if (c.sent < c.out.size()) want |= EPOLLOUT;
  if (c.registered && want == c.events) return true;
  epoll_event ev{};
  ev.events = want;
  ev.data.u64 = c.id;
  if (epoll_ctl(epoll_.get(), c.registered ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, c.fd.get(), &ev) != 0) {
    spdlog::warn("monitor: epoll_ctl: {}", std::strerror(errno));
    return false;
  }
  c.registered = true;
  c.events = want;
  return true;
}

void MonitorServer::drop(uint64_t id, const char* why) {
  if (clients_.erase(id)) spdlog::info("monitor: client disconnected ({}; {} connected)", why, clients_.size());
}

}  // namespace vmfence
