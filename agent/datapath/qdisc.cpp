#include "agent/datapath/qdisc.h"

#include <libmnl/libmnl.h>
#include <linux/pkt_sched.h>
#include <linux/rtnetlink.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <map>
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
int rtnl_request(uint16_t type, uint16_t flags, uint32_t ifindex, Kind kind, uint64_t rate, uint32_t horizon,
                 uint32_t horizon_us = 10000000) {
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
    mnl_attr_put_u32(nlh, TCA_FQ_PLIMIT, 10000);
    // fq's own horizon (10 s by default) beyond ours: ours decides.
    mnl_attr_put_u32(nlh, TCA_FQ_HORIZON, horizon_us);
    mnl_attr_nest_end(nlh, opts);
  } else if (kind == Kind::kTbf) {
    // A shaper a little faster than the limit (it counts Ethernet headers,
    // the limit counts IP bytes), so the datapath's clock stays the limit
    // and tbf only spaces out what it passed. Its queue holds the horizon.
    uint64_t r = rate + rate * 3 / 100;
    tc_tbf_qopt q{};
    q.rate.linklayer = TC_LINKLAYER_ETHERNET;
    q.rate.rate = static_cast<uint32_t>(std::min<uint64_t>(r, UINT32_MAX));
    // The horizon's bytes, at most 64 MB held per TAP.
    q.limit = static_cast<uint32_t>(std::min<uint64_t>(uint64_t{horizon} + (1u << 20), 64u << 20));
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

struct RootsCtx {
  std::map<uint32_t, RootQdisc>* out;
};

int on_qdisc(const nlmsghdr* nlh, void* data) {
  auto* ctx = static_cast<RootsCtx*>(data);
  auto* tcm = static_cast<const tcmsg*>(mnl_nlmsg_get_payload(nlh));
  if (tcm->tcm_parent != TC_H_ROOT) return MNL_CB_OK;
  RootQdisc q;
  q.handle = tcm->tcm_handle;
  mnl_attr_parse(
      nlh, sizeof(*tcm),
      [](const nlattr* a, void* kind) {
        if (mnl_attr_get_type(a) == TCA_KIND && mnl_attr_validate(a, MNL_TYPE_NUL_STRING) >= 0)
          *static_cast<std::string*>(kind) = mnl_attr_get_str(a);
        return MNL_CB_OK;
      },
      &q.kind);
  (*ctx->out)[static_cast<uint32_t>(tcm->tcm_ifindex)] = q;
  return MNL_CB_OK;
}

// A kernel without sch_fq says so once (ENOENT); tbf from then on.
bool g_no_fq = false;

}  // namespace

Status root_qdiscs(std::map<uint32_t, RootQdisc>& out) {
  std::unique_ptr<mnl_socket, MnlClose> nl(mnl_socket_open2(NETLINK_ROUTE, SOCK_CLOEXEC));
  if (!nl || mnl_socket_bind(nl.get(), 0, MNL_SOCKET_AUTOPID) < 0) return Status::error(errno, "netlink socket");
  std::vector<char> buf(MNL_SOCKET_BUFFER_SIZE * 4);
  nlmsghdr* nlh = mnl_nlmsg_put_header(buf.data());
  nlh->nlmsg_type = RTM_GETQDISC;
  nlh->nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP;
  nlh->nlmsg_seq = 1;
  auto* tcm = static_cast<tcmsg*>(mnl_nlmsg_put_extra_header(nlh, sizeof(tcmsg)));
  tcm->tcm_family = AF_UNSPEC;
  if (mnl_socket_sendto(nl.get(), nlh, nlh->nlmsg_len) < 0) return Status::error(errno, "dump qdiscs");
  RootsCtx ctx{&out};
  uint32_t portid = mnl_socket_get_portid(nl.get());
  for (;;) {
    ssize_t n = mnl_socket_recvfrom(nl.get(), buf.data(), buf.size());
    if (n < 0) return Status::error(errno, "dump qdiscs");
    int ret = mnl_cb_run(buf.data(), static_cast<size_t>(n), 1, portid, on_qdisc, &ctx);
    if (ret < 0) return Status::error(errno, "dump qdiscs");
    if (ret == MNL_CB_STOP) return {};
  }
}

Status install_pacing_qdisc(uint32_t ifindex, uint64_t bytes_per_s, uint32_t horizon_bytes, std::string* kind) {
  // Only over the device's default root qdisc (handle 0) or our own: a
  // root qdisc someone configured (libvirt's htb, say) stays.
  std::map<uint32_t, RootQdisc> roots;
  if (auto s = root_qdiscs(roots); !s) return s;
  auto root = roots.find(ifindex);
  if (root != roots.end() && root->second.handle != 0 && root->second.handle != kPacingQdiscHandle)
    return Status::error(EEXIST, "ifindex " + std::to_string(ifindex) + " has a root qdisc of its own (" +
                                     root->second.kind + "); vmfence leaves it");
  bool ours = root != roots.end() && root->second.handle == kPacingQdiscHandle;
  const char* want = g_no_fq ? "tbf" : "fq";
  // Ours of the other kind: the kernel changes a qdisc in place only
  // within its kind.
  if (ours && root->second.kind != want) (void)rtnl_request(RTM_DELQDISC, 0, ifindex, Kind::kNone, 0, 0);
  uint64_t horizon_us = bytes_per_s ? uint64_t{horizon_bytes} * 1000000 / bytes_per_s + 1000000 : 10000000;
  int err = g_no_fq ? -ENOENT
                    : rtnl_request(RTM_NEWQDISC, NLM_F_CREATE | NLM_F_REPLACE, ifindex, Kind::kFq, 0, 0,
                                   static_cast<uint32_t>(std::min<uint64_t>(horizon_us, UINT32_MAX)));
  if (kind) *kind = "fq";
  // A kernel without sch_fq (ENOENT: no such qdisc kind): tbf shapes at the
  // rate instead (EDT stamps are then ignored; the horizon still holds).
  if (err == -ENOENT) {
    g_no_fq = true;
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
