// The daemon's side of `vmfence monitor`: every reported drop, as one JSON
// line, to every client connected to <run dir>/monitor.sock. The daemon never
// waits for a client: each one has a bounded buffer, and a client that falls
// further behind, or is gone, is disconnected.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>

#include "agent/events/violation.h"
#include "maps/status.h"

namespace vmfence {

// <run dir>/monitor.sock (VMFENCE_RUN_DIR selects another run dir).
std::string monitor_socket_path();

// One event as the monitor protocol carries it: a JSON object on one line,
// newline-terminated: "time" (UTC, ms), the journald fields by their lower-case
// names (Violation::fields()), "sport", "quarantined". `realtime_ns` is the
// wall-clock time of the drop.
std::string monitor_line(const Violation& v, int64_t realtime_ns);

class MonitorServer {
 public:
  static constexpr size_t kMaxBuffered = 256 * 1024;  // per client, beyond the socket's own buffer
  static constexpr size_t kMaxClients = 64;

  explicit MonitorServer(size_t max_buffered = kMaxBuffered) : max_buffered_(max_buffered) {}
  ~MonitorServer();  // removes the socket file
  MonitorServer(const MonitorServer&) = delete;
  MonitorServer& operator=(const MonitorServer&) = delete;

  // Listen on `path` (mode 0600: events carry addresses), replacing a socket
  // a previous daemon left behind. The caller holds the agent lock.
  Status open(const std::string& path);
  // Readable when a client connects, hangs up, or can take more of its
  // buffer (an epoll fd of the listener and the clients): call handle_ready().
  int fd() const { return epoll_.get(); }
  void handle_ready();
  // The drop to every client (its datapath timestamp made wall-clock time).
  void publish(const Violation& v);
  // One line (newline included) to every client.
  void send_line(std::string_view line);

  size_t clients() const { return clients_.size(); }
  uint64_t disconnected_slow() const { return slow_; }

 private:
  struct Client {
    uint64_t id = 0;
    Fd fd;
    std::string out;  // unsent bytes are out[sent..]
    size_t sent = 0;
    bool reading = true;  // until the client half-closes
    bool registered = false;
    uint32_t events = 0;  // registered with epoll
  };
  void accept_all();
  void on_client(uint64_t id, uint32_t events);
  bool flush(Client& c);    // false: the client is gone
  bool rewatch(Client& c);  // false: epoll refused it
  void drop(uint64_t id, const char* why);

  size_t max_buffered_;
  std::string path_;
  Fd listen_, epoll_;
  // By id, never by fd: a closed client's fd may be reused by the next
  // accept while its events are still in the batch being handled.
  std::map<uint64_t, Client> clients_;
  uint64_t next_id_ = 1;  // 0 is the listener
  uint64_t slow_ = 0;
};

}  // namespace vmfence
