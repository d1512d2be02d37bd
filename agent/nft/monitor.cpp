// nft::Monitor: nftables notifications (NFNLGRP_NFTABLES) -> verify table inet vmfence
// and restore it when someone else changed or deleted it.
#include "agent/nft/monitor.h"

#include <libmnl/libmnl.h>
#include <linux/netfilter.h>
#include <linux/netfilter/nf_tables.h>
#include <linux/netfilter/nfnetlink.h>
#include <linux/netlink.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>

#include <cerrno>
#include <cstring>
#include <utility>
#include <vector>

#include "agent/nft/internal.h"

namespace vmfence::nft {

namespace {

// Verify the live table against rs; re-apply when missing or different.
bool restore(const Ruleset& rs) {
  Result v = verify(rs);
  if (v) return false;
  if (v.err != ENOENT && v.err != EPROTO) {
    spdlog::warn("nftables: cannot check table inet vmfence: {}", v.message);
    return false;
  }
  spdlog::warn("nftables: {}; restoring table inet vmfence", v.message);
  if (Result a = apply(rs); !a) {
    spdlog::error("nftables: restoring table inet vmfence failed: {}", a.message);
    return false;
  }
  spdlog::warn("nftables: table inet vmfence restored");
  return true;
}

// Whether an nf_tables object message names table vmfence. Attribute 1 is the table
// name in every one (NFTA_TABLE_NAME, NFTA_CHAIN_TABLE, NFTA_RULE_TABLE,
// NFTA_SET_TABLE, ...).
bool names_our_table(const nlmsghdr* nlh) {
  bool ours = false;
  auto cb = [](const nlattr* a, void* data) -> int {
    if (mnl_attr_get_type(a) == 1 && mnl_attr_validate(a, MNL_TYPE_NUL_STRING) == 0 &&
        std::strcmp(mnl_attr_get_str(a), kTableName) == 0) {
      *static_cast<bool*>(data) = true;
      return MNL_CB_STOP;
    }
    return MNL_CB_OK;
  };
  // MNL_CB_ERROR only if the callback said so, which it never does; were it to, the
  // message could be ours: check the table.
  if (mnl_attr_parse(nlh, sizeof(nfgenmsg), cb, &ours) == MNL_CB_ERROR) return true;
  return ours;
}

}  // namespace

Monitor::~Monitor() { close(); }

Monitor::Monitor(Monitor&& other) noexcept : sock_(std::exchange(other.sock_, nullptr)) {}

Monitor& Monitor::operator=(Monitor&& other) noexcept {
  if (this != &other) {
    close();
    sock_ = std::exchange(other.sock_, nullptr);
  }
  return *this;
}

Result Monitor::open() {
  close();
  internal::SocketPtr s;
  if (Result r = internal::open_socket(s, 1u << (NFNLGRP_NFTABLES - 1), SOCK_NONBLOCK); !r) return r;
  // A burst of changes (another tool's big batch) must not overflow it; if it does
  // anyway, drain() sees ENOBUFS and the table is checked.
  if (!internal::set_buffer(mnl_socket_get_fd(s.get()), SO_RCVBUFFORCE, SO_RCVBUF, 4u << 20))
    spdlog::debug("nftables: monitor receive buffer: {}", std::strerror(errno));
  sock_ = s.release();
  return {};
}

void Monitor::close() {
  if (sock_) internal::SocketClose()(sock_);
  sock_ = nullptr;
}

int Monitor::fd() const { return sock_ ? mnl_socket_get_fd(sock_) : -1; }

bool Monitor::drain() {
  if (!sock_) return false;
  bool relevant = false;
  std::vector<char> buf(1 << 16);
  const int fd = mnl_socket_get_fd(sock_);
  for (;;) {
    ssize_t n = recv(fd, buf.data(), buf.size(), MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == ENOBUFS) {  // events lost: check the table
        relevant = true;
        continue;
      }
      if (errno != EAGAIN && errno != EWOULDBLOCK) spdlog::debug("nftables: monitor receive: {}", std::strerror(errno));
      break;  // drained, or a real error (the next poll tells)
    }
    if (n == 0) break;
    int left = static_cast<int>(n);
    for (auto* nlh = reinterpret_cast<nlmsghdr*>(buf.data()); mnl_nlmsg_ok(nlh, left);
         nlh = mnl_nlmsg_next(nlh, &left)) {
      if (NFNL_SUBSYS_ID(nlh->nlmsg_type) != NFNL_SUBSYS_NFTABLES) continue;
      const int msg = NFNL_MSG_TYPE(nlh->nlmsg_type);
      if (msg == NFT_MSG_NEWGEN) continue;
      if (nlh->nlmsg_pid != 0 && internal::is_own_portid(nlh->nlmsg_pid)) continue;  // our own apply
      if (nlh->nlmsg_len < mnl_nlmsg_size(sizeof(nfgenmsg))) continue;
      const auto* g = static_cast<const nfgenmsg*>(mnl_nlmsg_get_payload(nlh));
      if (g->nfgen_family != NFPROTO_INET) continue;
      relevant = relevant || names_our_table(nlh);
    }
  }
  return relevant;
}

bool Monitor::handle_readable(const Spec& spec) {
  if (!drain()) return false;
  return restore(build_ruleset(spec));
}

bool Monitor::handle_readable(const Ruleset& rs) {
  if (!drain()) return false;
  return restore(rs);
}

}  // namespace vmfence::nft
