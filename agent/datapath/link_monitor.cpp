#include "agent/datapath/link_monitor.h"

#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <netlink/errno.h>
#include <netlink/msg.h>
#include <netlink/netlink.h>
#include <netlink/socket.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>

#include <cerrno>
#include <cstring>
#include <exception>
#include <utility>
#include <vector>

namespace vmfence {

namespace {

struct SockFree {
  void operator()(nl_sock* s) const { nl_socket_free(s); }
};
using SockPtr = std::unique_ptr<nl_sock, SockFree>;

// A libnl error (negative NLE_*) as a Status.
Status nl_status(int nlerr, const std::string& what) {
  int e = nlerr < 0 ? -nlerr : nlerr;
  int err = EIO;
  switch (e) {
    case NLE_NOMEM:
      err = ENOBUFS;
      break;  // libnl maps both ENOMEM and ENOBUFS here
    case NLE_AGAIN:
      err = EAGAIN;
      break;
    case NLE_PERM:
      err = EPERM;
      break;
    case NLE_NOACCESS:
      err = EACCES;
      break;
    case NLE_DUMP_INTR:
      err = EINTR;
      break;
    case NLE_BAD_SOCK:
      err = EBADF;
      break;
  }
  return {err, what + ": " + nl_geterror(nlerr)};
}

// ifindex and name of an RTM_NEWLINK / RTM_DELLINK; false for anything else.
bool parse_link(nlmsghdr* h, uint32_t* ifindex, std::string* name) {
  if (h->nlmsg_type != RTM_NEWLINK && h->nlmsg_type != RTM_DELLINK) return false;
  if (!nlmsg_valid_hdr(h, sizeof(ifinfomsg))) return false;
  auto* ifi = static_cast<ifinfomsg*>(nlmsg_data(h));
  nlattr* tb[IFLA_MAX + 1];
  if (nlmsg_parse(h, sizeof(*ifi), tb, IFLA_MAX, nullptr) < 0) return false;
  *ifindex = static_cast<uint32_t>(ifi->ifi_index);
  name->clear();
  if (nlattr* a = tb[IFLA_IFNAME])
    name->assign(static_cast<const char*>(nla_data(a)), strnlen(static_cast<const char*>(nla_data(a)), nla_len(a)));
  return true;
}

int on_dump_msg(nl_msg* msg, void* arg) {
  auto* out = static_cast<std::vector<LinkMonitor::Link>*>(arg);
  LinkMonitor::Link e;
  if (nlmsg_hdr(msg)->nlmsg_type == RTM_NEWLINK && parse_link(nlmsg_hdr(msg), &e.ifindex, &e.name))
    out->push_back(std::move(e));
  return NL_OK;
}

}  // namespace

LinkMonitor::LinkMonitor(OnLink on_link, OnResync on_resync, int buffer_bytes)
    : on_link_(std::move(on_link)), on_resync_(std::move(on_resync)), buffer_bytes_(buffer_bytes) {}

Status LinkMonitor::open() {
  if (sock_) return Status::error(EALREADY, "link monitor: already open");
  if (buffer_bytes_ <= 0)
    return Status::error(EINVAL, "link monitor: receive buffer size " + std::to_string(buffer_bytes_));
  SockPtr sk(nl_socket_alloc());
  if (!sk) return Status::error(ENOMEM, "link monitor: allocate netlink socket");
  // Notifications carry no sequence numbers of ours.
  nl_socket_disable_seq_check(sk.get());
  if (int err = nl_socket_modify_cb(sk.get(), NL_CB_VALID, NL_CB_CUSTOM, &LinkMonitor::on_msg, this); err < 0)
    return nl_status(err, "link monitor: set callback");
  if (int err = nl_connect(sk.get(), NETLINK_ROUTE); err < 0)
    return nl_status(err, "link monitor: connect NETLINK_ROUTE");
  if (int err = nl_socket_add_membership(sk.get(), RTNLGRP_LINK); err < 0)
    return nl_status(err, "link monitor: subscribe to RTNLGRP_LINK");
  if (int err = nl_socket_set_nonblocking(sk.get()); err < 0) return nl_status(err, "link monitor: set nonblocking");
  // SO_RCVBUF (capped by net.core.rmem_max), then SO_RCVBUFFORCE past the
  // cap where we may (CAP_NET_ADMIN).
  if (int err = nl_socket_set_buffer_size(sk.get(), buffer_bytes_, 0); err < 0)
    return nl_status(err, "link monitor: set receive buffer");
  sock_ = sk.release();
  if (setsockopt(fd(), SOL_SOCKET, SO_RCVBUFFORCE, &buffer_bytes_, sizeof(buffer_bytes_)) != 0)
    spdlog::info("link monitor: SO_RCVBUFFORCE {}: {} (receive buffer {} bytes)", buffer_bytes_, std::strerror(errno),
                 receive_buffer());
  return {};
}

LinkMonitor::~LinkMonitor() {
  if (sock_) nl_socket_free(sock_);
}

int LinkMonitor::fd() const { return sock_ ? nl_socket_get_fd(sock_) : -1; }

int LinkMonitor::receive_buffer() const {
  int size = 0;
  socklen_t len = sizeof(size);
  if (getsockopt(fd(), SOL_SOCKET, SO_RCVBUF, &size, &len) != 0) return -1;
  return size;
}

int LinkMonitor::on_msg(nl_msg* msg, void* arg) {
  auto* self = static_cast<LinkMonitor*>(arg);
  nlmsghdr* h = nlmsg_hdr(msg);
  uint32_t ifindex = 0;
  std::string name;
  if (!parse_link(h, &ifindex, &name)) return NL_OK;
  try {
    self->on_link_(h->nlmsg_type == RTM_NEWLINK, ifindex, name);
  } catch (...) {
    // Not through libnl's C frames: rethrown by handle_readable().
    self->error_ = std::current_exception();
    return NL_STOP;
  }
  return NL_OK;
}

Status LinkMonitor::handle_readable() {
  if (!sock_) return Status::error(EBADF, "link monitor: not open");
  if (resync_pending_) return resync();
  for (;;) {
    int err = nl_recvmsgs_default(sock_);
    if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
    if (err >= 0) continue;
    if (err == -NLE_AGAIN) return {};  // all read
    // ENOBUFS (NLE_NOMEM: the kernel dropped notifications) or any other
    // receive error: what was lost is unknown, so start over from a dump.
    if (err == -NLE_NOMEM)
      spdlog::warn("link monitor: receive buffer overflow (ENOBUFS), link events lost; resynchronizing from a dump");
    else
      spdlog::warn("link monitor: receive error: {}; resynchronizing from a dump", nl_geterror(err));
    return resync();
  }
}

void LinkMonitor::drain() {
  // Everything queued predates the dump that follows: discard it unparsed.
  std::vector<char> buf(65536);
  for (int i = 0; i < (1 << 20); ++i) {
    ssize_t n = recv(fd(), buf.data(), buf.size(), MSG_DONTWAIT | MSG_TRUNC);
    if (n >= 0) continue;
    if (errno == EINTR || errno == ENOBUFS) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) spdlog::warn("link monitor: drain: {}", std::strerror(errno));
    return;
  }
}

Status LinkMonitor::resync() {
  if (!sock_) return Status::error(EBADF, "link monitor: not open");
  resync_pending_ = true;
  drain();
  std::vector<Link> links;
  if (auto s = list_links(links); !s) {
    spdlog::error("link monitor: {} (resync pending)", s.message);
    return s;
  }
  resync_pending_ = false;
  ++resyncs_;
  on_resync_(links);
  return {};
}

Status LinkMonitor::list_links(std::vector<Link>& out) {
  Status last;
  for (int attempt = 0; attempt < 8; ++attempt) {
    SockPtr sk(nl_socket_alloc());
    if (!sk) return Status::error(ENOMEM, "link dump: allocate netlink socket");
    std::vector<Link> links;
    if (int err = nl_socket_modify_cb(sk.get(), NL_CB_VALID, NL_CB_CUSTOM, on_dump_msg, &links); err < 0)
      return nl_status(err, "link dump: set callback");
    if (int err = nl_connect(sk.get(), NETLINK_ROUTE); err < 0)
      return nl_status(err, "link dump: connect NETLINK_ROUTE");
    ifinfomsg ifi{};
    ifi.ifi_family = AF_UNSPEC;
    if (int err = nl_send_simple(sk.get(), RTM_GETLINK, NLM_F_DUMP, &ifi, sizeof(ifi)); err < 0)
      return nl_status(err, "link dump: send RTM_GETLINK");
    int err = nl_recvmsgs_default(sk.get());
    if (err == 0) {
      out = std::move(links);
      return {};
    }
    last = nl_status(err, "link dump: receive");
    if (err != -NLE_DUMP_INTR) return last;  // else links changed during the dump: again
  }
  return last;
}

}  // namespace vmfence
