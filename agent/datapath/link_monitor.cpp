#include "agent/datapath/link_monitor.h"

#include <linux/rtnetlink.h>
#include <netlink/msg.h>
#include <netlink/netlink.h>
#include <netlink/socket.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>

#include <cerrno>

namespace vmfence {

namespace {

// The link in an RTM_NEWLINK / RTM_DELLINK message, if it has a name.
bool parse_link(nl_msg* msg, int& type, LinkMonitor::Link& out) {
  nlmsghdr* h = nlmsg_hdr(msg);
  type = h->nlmsg_type;
  if (type != RTM_NEWLINK && type != RTM_DELLINK) return false;
  auto* ifi = static_cast<ifinfomsg*>(nlmsg_data(h));
  nlattr* tb[IFLA_MAX + 1];
  if (nlmsg_parse(h, sizeof(*ifi), tb, IFLA_MAX, nullptr) < 0 || !tb[IFLA_IFNAME]) return false;
  out.ifindex = static_cast<uint32_t>(ifi->ifi_index);
  out.name = nla_get_string(tb[IFLA_IFNAME]);
  return true;
}

int collect(nl_msg* msg, void* arg) {
  int type = 0;
  LinkMonitor::Link l;
  if (parse_link(msg, type, l) && type == RTM_NEWLINK) static_cast<std::vector<LinkMonitor::Link>*>(arg)->push_back(l);
  return NL_OK;
}

}  // namespace

LinkMonitor::LinkMonitor(OnLink on_link, OnResync on_resync, int buffer_bytes)
    : on_link_(std::move(on_link)), on_resync_(std::move(on_resync)), buffer_bytes_(buffer_bytes) {}

LinkMonitor::~LinkMonitor() {
  if (sock_) nl_socket_free(sock_);
}

int LinkMonitor::fd() const { return sock_ ? nl_socket_get_fd(sock_) : -1; }

Status LinkMonitor::open() {
  sock_ = nl_socket_alloc();
  if (!sock_) return Status::error(ENOMEM, "netlink socket");
  nl_socket_disable_seq_check(sock_);
  if (int err = nl_socket_modify_cb(sock_, NL_CB_VALID, NL_CB_CUSTOM, &LinkMonitor::on_msg, this); err < 0)
    return Status::error(EINVAL, std::string("netlink callback: ") + nl_geterror(err));
  if (int err = nl_connect(sock_, NETLINK_ROUTE); err < 0)
    return Status::error(ECONNREFUSED, std::string("netlink connect: ") + nl_geterror(err));
  if (int err = nl_socket_add_membership(sock_, RTNLGRP_LINK); err < 0)
    return Status::error(EINVAL, std::string("subscribe to RTNLGRP_LINK: ") + nl_geterror(err));
  // A burst of TAPs must fit; SO_RCVBUFFORCE goes past rmem_max as root.
  if (nl_socket_set_buffer_size(sock_, buffer_bytes_, 0) < 0) spdlog::warn("link monitor: cannot set buffer size");
  int bytes = buffer_bytes_;
  if (setsockopt(fd(), SOL_SOCKET, SO_RCVBUFFORCE, &bytes, sizeof bytes) != 0)
    spdlog::debug("link monitor: SO_RCVBUFFORCE: {}", std::strerror(errno));
  if (int err = nl_socket_set_nonblocking(sock_); err < 0)
    return Status::error(EINVAL, std::string("netlink nonblocking: ") + nl_geterror(err));
  return {};
}

int LinkMonitor::on_msg(nl_msg* msg, void* arg) {
  auto* self = static_cast<LinkMonitor*>(arg);
  int type = 0;
  Link l;
  if (parse_link(msg, type, l)) self->on_link_(type == RTM_NEWLINK, l.ifindex, l.name);
  return NL_OK;
}

void LinkMonitor::handle_readable() {
  for (;;) {
    int n = nl_recvmsgs_default(sock_);
    if (n >= 0) continue;  // more may be pending
    if (n == -NLE_AGAIN) return;
    // ENOBUFS (libnl: NLE_NOMEM) or anything else: events were lost.
    spdlog::warn("link monitor: receive failed ({}); re-listing every link", nl_geterror(n));
    std::vector<Link> all;
    if (auto s = list_links(all); !s) {
      spdlog::error("link monitor: {}", s.message);
      return;
    }
    on_resync_(all);
    return;
  }
}

Status LinkMonitor::list_links(std::vector<Link>& out) {
  out.clear();
  nl_sock* s = nl_socket_alloc();
  if (!s) return Status::error(ENOMEM, "netlink socket");
  Status st;
  int err = nl_connect(s, NETLINK_ROUTE);
  if (err >= 0) {
    rtgenmsg g{};
    g.rtgen_family = AF_UNSPEC;
    err = nl_send_simple(s, RTM_GETLINK, NLM_F_DUMP, &g, sizeof g);
  }
  if (err >= 0) err = nl_socket_modify_cb(s, NL_CB_VALID, NL_CB_CUSTOM, collect, &out);
  if (err >= 0) err = nl_recvmsgs_default(s);
  if (err < 0) st = Status::error(EIO, std::string("list links: ") + nl_geterror(err));
  nl_socket_free(s);
  return st;
}

}  // namespace vmfence
