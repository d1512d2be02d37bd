// The link monitor: a netlink route socket subscribed to RTNLGRP_LINK that
// never loses an interface. Notifications are delivered one by one
// (on_link); when the kernel could not queue one (the receive buffer
// overflowed: ENOBUFS) or any receive error, the monitor drops what is queued
// and hands over the complete current list of links instead (on_resync, from
// a fresh RTM_GETLINK dump), so the caller reconciles against the truth.
//
// Single-threaded: fd() goes into the caller's epoll, handle_readable() when
// it is readable. The callbacks run inside handle_readable() / resync(); an
// exception from one is rethrown from there (the messages after it stay
// queued).
#pragma once

#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "maps/status.h"

struct nl_sock;
struct nl_msg;

namespace vmfence {

class LinkMonitor {
 public:
  struct Link {
    uint32_t ifindex = 0;
    std::string name;
  };
  // added: RTM_NEWLINK (created or changed), else RTM_DELLINK.
  using OnLink = std::function<void(bool added, uint32_t ifindex, const std::string& name)>;
  // Every link of the network namespace, after events were lost.
  using OnResync = std::function<void(const std::vector<Link>& all)>;

  static constexpr int kDefaultBufferSize = 8 << 20;  // 8 MiB

  // buffer_bytes: the socket's receive buffer (SO_RCVBUFFORCE when
  // permitted, else SO_RCVBUF up to net.core.rmem_max).
  LinkMonitor(OnLink on_link, OnResync on_resync, int buffer_bytes = kDefaultBufferSize);
  ~LinkMonitor();  // closes the socket
  LinkMonitor(const LinkMonitor&) = delete;
  LinkMonitor& operator=(const LinkMonitor&) = delete;

  // Connect, subscribe to RTNLGRP_LINK, make nonblocking, size the buffer.
  Status open();
  // For epoll (EPOLLIN); -1 before open().
  int fd() const;
  // Receive every pending message (until EAGAIN), on_link for each link
  // message; on a receive error (ENOBUFS included) resync(). An error (also
  // logged) only when the resync's dump failed too: resync_pending() stays
  // set, and the next handle_readable() or resync() tries again.
  Status handle_readable();
  // Drop what is queued, dump every link, on_resync(list).
  Status resync();
  bool resync_pending() const { return resync_pending_; }
  // Number of completed resyncs (receive errors / overflows).
  uint64_t resyncs() const { return resyncs_; }
  // The receive buffer the kernel granted (bytes, as SO_RCVBUF reports it).
  int receive_buffer() const;

  // Every link of the current network namespace (RTM_GETLINK dump; retried
  // when the dump is interrupted by concurrent changes).
  static Status list_links(std::vector<Link>& out);

 private:
  static int on_msg(nl_msg* msg, void* arg);
  void drain();

  nl_sock* sock_ = nullptr;
  OnLink on_link_;
  OnResync on_resync_;
  int buffer_bytes_;
  bool resync_pending_ = false;
  uint64_t resyncs_ = 0;
  std::exception_ptr error_;  // thrown by a callback inside libnl
};

}  // namespace vmfence
