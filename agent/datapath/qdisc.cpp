#include "agent/datapath/qdisc.h"

#include <libmnl/libmnl.h>
#include <linux/pkt_sched.h>
#include <linux/rtnetlink.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace vmfence {

namespace {

struct MnlClose {
  void operator()(mnl_socket* s) const { mnl_socket_close(s); }
};

enum class Kind { kNone, kFq, kTbf };

// One request on a fresh NETLINK_ROUTE socket; the kernel's answer (0 or
// -errno) from its ACK. kNone: a delete.
int rtnl_request(uint16_t type, uint16_t flags, uint32_t ifindex, Kind kind, uint64_t rate, uint32_t horizon) {
  std::unique_ptr<mnl_socket, MnlClose> nl(mnl_socket_open2(NETLINK_ROUTE, SOCK_CLOEXEC));
  if (!nl || mnl_socket_bind(nl.get(), 0, MNL_SOCKET_AUTOPID) < 0) return -errno;
  std::vector<char> buf(MNL_SOCKET_BUFFER_SIZE);
  nlmsghdr* nlh = mnl_nlmsg_put_header(buf.data());
  nlh->nlmsg_type = type;
  nlh->nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK | flags;
  nlh->nlmsg_seq = 1;
  auto* tcm = static_cast<tcmsg*>(mnl_nlmsg_put_extra_header(nlh, sizeof(tcmsg)));
  tcm->tcm_family = AF_UNSPEC;
  tcm->tcm_ifindex = static_cast<int>(ifindex);
  tcm->tcm_handle = kPacingQdiscHandle;
  tcm->tcm_parent = TC_H_ROOT;
  if (kind == Kind::kFq) {
    mnl_attr_put_strz(nlh, TCA_KIND, "fq");
    nlattr* opts = mnl_attr_nest_start(nlh, TCA_OPTIONS);
    // Forwarded traffic arrives as few flows (fq hashes packets without a
    // socket): the default 100 packets per flow would drop what pacing
    // holds back within the drop horizon.
    mnl_attr_put_u32(nlh, TCA_FQ_FLOW_PLIMIT, 10000);
    mnl_attr_put_u32(nlh, TCA_FQ_PLIMIT, 100000);
    mnl_attr_nest_end(nlh, opts);
  } else if (kind == Kind::kTbf) {
    // A shaper a little faster than the limit (it counts Ethernet headers,
    // the limit counts IP bytes), so the datapath's clock stays the limit
    // and tbf only spaces out what it passed. Its queue holds the horizon.
    uint64_t r = rate + rate * 3 / 100;
    tc_tbf_qopt q{};
    q.rate.linklayer = TC_LINKLAYER_ETHERNET;
    q.rate.rate = static_cast<uint32_t>(std::min<uint64_t>(r, UINT32_MAX));
    q.limit = horizon + (1u << 20);
    mnl_attr_put_strz(nlh, TCA_KIND, "tbf");
    nlattr* opts = mnl_attr_nest_start(nlh, TCA_OPTIONS);
    mnl_attr_put(nlh, TCA_TBF_PARMS, sizeof(q), &q);
    if (r >= UINT32_MAX) mnl_attr_put_u64(nlh, TCA_TBF_RATE64, r);
    mnl_attr_put_u32(nlh, TCA_TBF_BURST, 64 * 1024);  // a guest's TSO segment
    mnl_attr_nest_end(nlh, opts);
  }
  if (mnl_socket_sendto(nl.get(), nlh, nlh->nlmsg_len) < 0) return -errno;
  ssize_t n = mnl_socket_recvfrom(nl.get(), buf.data(), buf.size());
  if (n < 0) return -errno;
  int ret = mnl_cb_run(buf.data(), static_cast<size_t>(n), 1, mnl_socket_get_portid(nl.get()), nullptr, nullptr);
  return ret < 0 ? -errno : 0;
}

}  // namespace

Status install_pacing_qdisc(uint32_t ifindex, uint64_t bytes_per_s, uint32_t horizon_bytes, std::string* kind) {
  int err = rtnl_request(RTM_NEWQDISC, NLM_F_CREATE | NLM_F_REPLACE, ifindex, Kind::kFq, 0, 0);
  if (kind) *kind = "fq";
  // A kernel without sch_fq (ENOENT: no such qdisc kind): tbf shapes at the
  // rate instead (EDT stamps are then ignored; the horizon still holds).
  if (err == -ENOENT) {
    err = rtnl_request(RTM_NEWQDISC, NLM_F_CREATE | NLM_F_REPLACE, ifindex, Kind::kTbf, bytes_per_s, horizon_bytes);
    if (kind) *kind = "tbf";
  }
  if (err) return Status::error(err, "install pacing qdisc on ifindex " + std::to_string(ifindex));
  return {};
}

Status remove_pacing_qdisc(uint32_t ifindex) {
  // The kernel refuses (EINVAL) to delete a root qdisc whose handle is not
  // ours, and says ENOENT when there is none or the device is gone.
  int err = rtnl_request(RTM_DELQDISC, 0, ifindex, Kind::kNone, 0, 0);
  if (err && err != -EINVAL && err != -ENOENT && err != -ENODEV)
    return Status::error(err, "remove fq qdisc from ifindex " + std::to_string(ifindex));
  return {};
}

}  // namespace vmfence
