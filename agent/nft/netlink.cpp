// table inet vmfence in the kernel through libmnl: one netlink batch to apply or
// remove the table (objects.cpp builds its libnftnl objects), dumps to verify it, and
// the sockets the monitor shares. Every libnftnl/libmnl result is checked: a setter
// that fails aborts building the batch (BuildError, or std::bad_alloc), a reply that
// cannot be parsed fails the dump.
#include "agent/nft/netlink.h"

#include <libmnl/libmnl.h>
#include <libnftnl/chain.h>
#include <libnftnl/common.h>
#include <libnftnl/rule.h>
#include <libnftnl/set.h>
#include <libnftnl/table.h>
#include <linux/netfilter.h>
#include <linux/netfilter/nf_tables.h>
#include <linux/netfilter/nfnetlink.h>
#include <linux/netlink.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <deque>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "agent/nft/internal.h"

namespace vmfence::nft {

namespace {

std::mutex g_mu;
std::optional<Ruleset> g_applied;
// Netlink port ids of our own batches: the Monitor skips the notifications
// they cause instead of dumping (at 10,000 VMs, 30,000 rules) the table again.
std::deque<uint32_t> g_own_portids;

void remember_own_portid(uint32_t portid) {
  std::lock_guard lock(g_mu);
  g_own_portids.push_back(portid);
  if (g_own_portids.size() > 16) g_own_portids.pop_front();
}

}  // namespace

// ---------------------------------------------------------------------------
// Sockets (shared with the monitor)
// ---------------------------------------------------------------------------

namespace internal {

void SocketClose::operator()(mnl_socket* s) const {
  // The socket is freed either way; a failed close() of a netlink socket leaves
  // nothing to do but say so.
  if (mnl_socket_close(s) < 0) spdlog::debug("nftables: close netlink socket: {}", std::strerror(errno));
}

Result errno_result(int err, const std::string& what) {
  return Result{err ? err : EIO, what + ": " + std::strerror(err ? err : EIO)};
}

Result open_socket(SocketPtr& out, unsigned groups, int flags) {
  SocketPtr s(mnl_socket_open2(NETLINK_NETFILTER, SOCK_CLOEXEC | flags));
  if (!s) return errno_result(errno, "nftables: open netlink socket");
  if (mnl_socket_bind(s.get(), groups, MNL_SOCKET_AUTOPID) < 0)
    return errno_result(errno, "nftables: bind netlink socket");
  out = std::move(s);
  return {};
}

bool set_buffer(int fd, int opt_force, int opt, size_t size) {
  int v = static_cast<int>(std::min<size_t>(size, 1u << 30));
  if (setsockopt(fd, SOL_SOCKET, opt_force, &v, sizeof v) == 0) return true;
  return setsockopt(fd, SOL_SOCKET, opt, &v, sizeof v) == 0;
}

bool is_own_portid(uint32_t portid) {
  std::lock_guard lock(g_mu);
  return std::find(g_own_portids.begin(), g_own_portids.end(), portid) != g_own_portids.end();
}

}  // namespace internal

namespace {

using internal::alloc_chain;
using internal::alloc_rule;
using internal::alloc_table;
using internal::BuildError;
using internal::ChainPtr;
using internal::check;
using internal::elem_canon;

namespace {
// Every element of s, canonical (elem_canon), appended to out.
void append_canon_elems(nftnl_set* s, std::vector<std::string>& out) {
  nftnl_set_elem_foreach(
      s,
      [](nftnl_set_elem* e, void* data) -> int {
        static_cast<std::vector<std::string>*>(data)->push_back(elem_canon(e));
        return 0;
      },
      &out);
}
}  // namespace
using internal::errno_result;
using internal::hex64;
using internal::hook_number;
using internal::make_chain;
using internal::make_rule;
using internal::make_set;
using internal::make_set_elems;
using internal::make_table;
using internal::open_socket;
using internal::rule_canon;
using internal::RulePtr;
using internal::set_buffer;
using internal::set_canon;
using internal::SetPtr;
using internal::SocketPtr;
using internal::table_comment;
using internal::TablePtr;

// Elements per NEWSETELEM message: each takes well under 200 bytes (IPv6 concatenated
// key and key end, comment), far below the batch's per-message room.
constexpr size_t kElemsPerMsg = 64;

// Result of a failed build, for apply()/verify().
Result build_failed(const BuildError& e) { return Result{e.err, e.what()}; }
Result out_of_memory(const char* doing) { return Result{ENOMEM, std::string("nftables: out of memory ") + doing}; }

// ---------------------------------------------------------------------------
// Netlink: batches, dumps
// ---------------------------------------------------------------------------

uint32_t next_seq() {
  static std::mutex mu;
  static uint32_t seq = static_cast<uint32_t>(time(nullptr));
  std::lock_guard lock(mu);
  seq += 1;
  return seq;
}

// One transaction: BEGIN, messages, END, sent in one sendto. Only the last message
// asks for an ACK: the kernel processes the batch inside sendto, so when it returns
// the replies are queued: errors for rejected messages (with their sequence number),
// then the ACK when the whole batch committed.
class Batch {
 public:
  Batch() {
    begin_seq_ = next_seq();
    nlmsghdr* nlh = nftnl_batch_begin(reserve(), begin_seq_);
    commit(nlh);
  }

  // Header for the next message; build its payload, then call done().
  nlmsghdr* add(uint16_t type, uint16_t flags, std::string what) {
    const uint32_t seq = next_seq();
    msgs_.push_back({seq, std::move(what)});
    return nftnl_nlmsg_build_hdr(reserve(), type, NFPROTO_INET, flags, seq);
  }
  void done(nlmsghdr* nlh) {
    // nftnl_*_nlmsg_build_payload cannot say when a message outgrows its room: our
    // messages are far smaller than kMaxMsg, and this catches a change that breaks that.
    if (nlh->nlmsg_len > kMaxMsg) {
      spdlog::critical("nftables: message {} is {} bytes, over {}", msgs_.back().second, nlh->nlmsg_len, kMaxMsg);
      std::abort();  // the batch buffer has been overrun
    }
    commit(nlh);
  }

  Result send_and_wait() {
    if (msgs_.empty()) return {};
    // Ask for an ACK on the last message only: see above.
    auto* last = reinterpret_cast<nlmsghdr*>(buf_.data() + last_off_);
    last->nlmsg_flags |= NLM_F_ACK;
    const uint32_t end_seq = next_seq();
    commit(nftnl_batch_end(reserve(), end_seq));

    SocketPtr sock;
    if (Result r = open_socket(sock); !r) return r;
    const int fd = mnl_socket_get_fd(sock.get());
    int one = 1;
    // Errors carry only the header of the rejected message; without it (older
    // kernels) they carry the whole message and need more receive buffer.
    if (setsockopt(fd, SOL_NETLINK, NETLINK_CAP_ACK, &one, sizeof one) < 0)
      spdlog::debug("nftables: NETLINK_CAP_ACK: {}", std::strerror(errno));
    if (!set_buffer(fd, SO_SNDBUFFORCE, SO_SNDBUF, len_ + 4096))
      spdlog::debug("nftables: send buffer for a {}-byte batch: {}", len_, std::strerror(errno));
    if (!set_buffer(fd, SO_RCVBUFFORCE, SO_RCVBUF, std::max<size_t>(msgs_.size() * 1024, 1 << 20)))
      spdlog::debug("nftables: receive buffer for {} replies: {}", msgs_.size(), std::strerror(errno));

    remember_own_portid(mnl_socket_get_portid(sock.get()));
    const ssize_t sent = mnl_socket_sendto(sock.get(), buf_.data(), len_);
    if (sent < 0) return errno_result(errno, "nftables: send batch (" + std::to_string(len_) + " bytes)");
    if (static_cast<size_t>(sent) != len_)  // netlink sends whole datagrams; never expected
      return Result{EIO, "nftables: sent " + std::to_string(sent) + " of " + std::to_string(len_) + " bytes"};

    const uint32_t portid = mnl_socket_get_portid(sock.get());
    const uint32_t ack_seq = msgs_.back().first;
    bool acked = false;
    std::vector<std::pair<int, uint32_t>> errors;  // (errno, seq)
    std::vector<char> rbuf(1 << 16);
    for (;;) {
      ssize_t n = recv(fd, rbuf.data(), rbuf.size(), MSG_DONTWAIT);
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) break;
        if (errno == ENOBUFS) {  // replies lost: the outcome is unknown to us
          errors.push_back({ENOBUFS, 0});
          continue;
        }
        return errno_result(errno, "nftables: receive batch replies");
      }
      int left = static_cast<int>(n);
      for (auto* nlh = reinterpret_cast<nlmsghdr*>(rbuf.data()); mnl_nlmsg_ok(nlh, left);
           nlh = mnl_nlmsg_next(nlh, &left)) {
        if (nlh->nlmsg_pid != portid && nlh->nlmsg_pid != 0) continue;
        if (nlh->nlmsg_type != NLMSG_ERROR) continue;
        if (nlh->nlmsg_len < mnl_nlmsg_size(sizeof(nlmsgerr))) continue;
        const auto* e = static_cast<const nlmsgerr*>(mnl_nlmsg_get_payload(nlh));
        if (e->error == 0) {
          if (e->msg.nlmsg_seq == ack_seq) acked = true;
        } else {
          errors.push_back({-e->error, e->msg.nlmsg_seq});
        }
      }
    }
    if (!errors.empty()) {
      const auto [err, seq] = errors.front();
      std::string what;
      if (seq == 0) {
        what = "replies lost (receive buffer overrun)";
      } else if (seq == begin_seq_ || seq == end_seq) {
        what = "the transaction (commit)";
      } else {
        for (size_t i = 0; i < msgs_.size(); ++i)
          if (msgs_[i].first == seq)
            what =
                "message " + std::to_string(i + 1) + "/" + std::to_string(msgs_.size()) + " (" + msgs_[i].second + ")";
        if (what.empty()) what = "message seq " + std::to_string(seq);
      }
      std::string msg = "nftables: kernel rejected " + what + ": " + std::strerror(err);
      if (errors.size() > 1) msg += " (+" + std::to_string(errors.size() - 1) + " more errors)";
      return Result{err, msg};
    }
    if (!acked) return Result{EIO, "nftables: no acknowledgement for the batch"};
    return {};
  }

 private:
  static constexpr size_t kMaxMsg = 16384;  // far above any message we build

  char* reserve() {
    if (buf_.size() - len_ < kMaxMsg) buf_.resize(std::max(buf_.size() * 2, len_ + kMaxMsg));
    return buf_.data() + len_;
  }
  void commit(nlmsghdr* nlh) {
    last_off_ = len_;
    len_ += NLMSG_ALIGN(nlh->nlmsg_len);
  }

  std::vector<char> buf_;
  size_t len_ = 0;
  size_t last_off_ = 0;
  uint32_t begin_seq_ = 0;
  std::vector<std::pair<uint32_t, std::string>> msgs_;
};

void add_table_msg(Batch& b, uint16_t type, uint16_t flags, const std::string& comment, const std::string& what) {
  TablePtr t = make_table(comment);
  nlmsghdr* nlh = b.add(type, flags, what);
  nftnl_table_nlmsg_build_payload(nlh, t.get());
  b.done(nlh);
}

// add table (so the delete cannot fail when absent) + delete table
void add_replace_prefix(Batch& b) {
  add_table_msg(b, NFT_MSG_NEWTABLE, NLM_F_CREATE, {}, "add table inet vmfence");
  add_table_msg(b, NFT_MSG_DELTABLE, 0, {}, "delete table inet vmfence");
}

// Run one dump request: build(nlh) adds the request's payload (may throw), on_msg(m)
// returns a failed Result to stop the dump with it. Retries when the dump was
// interrupted by a concurrent change (NLM_F_DUMP_INTR).
template <class BuildReq, class OnMsg>
Result dump(uint16_t type, const char* what, BuildReq build, OnMsg on_msg) {
  const std::string doing = std::string("nftables: dump ") + what;
  for (int attempt = 0; attempt < 5; ++attempt) {
    SocketPtr sock;
    if (Result r = open_socket(sock); !r) return r;
    std::vector<char> buf(1 << 16);
    const uint32_t seq = next_seq();
    nlmsghdr* nlh = nftnl_nlmsg_build_hdr(buf.data(), type, NFPROTO_INET, NLM_F_DUMP, seq);
    try {
      build(nlh);
    } catch (const BuildError& e) {
      return build_failed(e);
    } catch (const std::bad_alloc&) {
      return Result{ENOMEM, doing + ": out of memory"};
    }
    const ssize_t sent = mnl_socket_sendto(sock.get(), nlh, nlh->nlmsg_len);
    if (sent < 0) return errno_result(errno, doing);
    if (static_cast<size_t>(sent) != nlh->nlmsg_len) return Result{EIO, doing + ": short send"};
    const uint32_t portid = mnl_socket_get_portid(sock.get());
    struct Ctx {
      OnMsg* on_msg;
      Result status;  // failed: on_msg (or an exception) stopped the dump
    } ctx{&on_msg, {}};
    auto cb = [](const nlmsghdr* m, void* data) -> int {  // called from C: must not throw
      auto* c = static_cast<Ctx*>(data);
      try {
        c->status = (*c->on_msg)(m);
      } catch (const BuildError& e) {
        c->status = build_failed(e);
      } catch (...) {
        c->status = Result{ENOMEM, "out of memory"};
      }
      if (c->status) return MNL_CB_OK;
      errno = c->status.err;
      return MNL_CB_ERROR;
    };
    int ret;
    for (;;) {
      const ssize_t n = mnl_socket_recvfrom(sock.get(), buf.data(), buf.size());
      if (n < 0) {
        ret = MNL_CB_ERROR;
        break;
      }
      ret = mnl_cb_run(buf.data(), static_cast<size_t>(n), seq, portid, cb, &ctx);
      if (ret <= MNL_CB_STOP) break;
    }
    if (ret >= MNL_CB_STOP) return {};
    if (!ctx.status) return Result{ctx.status.err, doing + ": " + ctx.status.message};
    if (errno == EINTR) continue;  // NLM_F_DUMP_INTR: start over
    return errno_result(errno, doing);
  }
  return Result{EINTR, doing + ": interrupted repeatedly"};
}

// A reply libnftnl cannot parse: out of memory, or something it does not know (an
// expression newer than libnftnl, say) in our table: not what vmfence put there.
Result unparsable(const char* what) {
  if (errno == ENOMEM) return Result{ENOMEM, "out of memory"};
  return Result{EPROTO, std::string("table inet vmfence holds a ") + what + " libnftnl cannot parse"};
}

struct LiveTable {
  bool found = false;
  uint32_t flags = 0;
  std::string comment;
};

struct LiveChain {
  std::string name, type;
  int hook = -1;
  int prio = 0;
  uint32_t policy = NF_ACCEPT;
};

Result read_table(LiveTable& out) {
  return dump(
      NFT_MSG_GETTABLE, "tables", [](nlmsghdr*) {},
      [&](const nlmsghdr* m) -> Result {
        TablePtr t = alloc_table();
        if (nftnl_table_nlmsg_parse(m, t.get()) < 0) {
          // Every inet table comes by: one we cannot parse may not be ours.
          if (errno == ENOMEM) return Result{ENOMEM, "out of memory"};
          return {};
        }
        const char* name = nftnl_table_get_str(t.get(), NFTNL_TABLE_NAME);
        if (!name || std::strcmp(name, kTableName) != 0) return {};
        if (nftnl_table_get_u32(t.get(), NFTNL_TABLE_FAMILY) != NFPROTO_INET) return {};
        out.found = true;
        out.flags = nftnl_table_get_u32(t.get(), NFTNL_TABLE_FLAGS);
        out.comment = table_comment(t.get());
        return {};
      });
}

Result read_chains(std::vector<LiveChain>& out) {
  return dump(
      NFT_MSG_GETCHAIN, "chains",
      [](nlmsghdr* nlh) {
        ChainPtr c = alloc_chain();
        check(nftnl_chain_set_str(c.get(), NFTNL_CHAIN_TABLE, kTableName), "chain dump: table");
        nftnl_chain_nlmsg_build_payload(nlh, c.get());
      },
      [&](const nlmsghdr* m) -> Result {
        ChainPtr c = alloc_chain();
        if (nftnl_chain_nlmsg_parse(m, c.get()) < 0) return unparsable("chain");
        const char* table = nftnl_chain_get_str(c.get(), NFTNL_CHAIN_TABLE);
        if (!table || std::strcmp(table, kTableName) != 0) return {};
        if (nftnl_chain_get_u32(c.get(), NFTNL_CHAIN_FAMILY) != NFPROTO_INET) return {};
        const char* name = nftnl_chain_get_str(c.get(), NFTNL_CHAIN_NAME);
        if (!name) return Result{EPROTO, "table inet vmfence holds a chain without a name"};
        LiveChain lc;
        lc.name = name;
        if (nftnl_chain_is_set(c.get(), NFTNL_CHAIN_HOOKNUM)) {
          lc.hook = static_cast<int>(nftnl_chain_get_u32(c.get(), NFTNL_CHAIN_HOOKNUM));
          lc.prio = nftnl_chain_get_s32(c.get(), NFTNL_CHAIN_PRIO);
          if (const char* ty = nftnl_chain_get_str(c.get(), NFTNL_CHAIN_TYPE)) lc.type = ty;
          lc.policy = nftnl_chain_get_u32(c.get(), NFTNL_CHAIN_POLICY);
        }
        out.push_back(std::move(lc));
        return {};
      });
}

// chain name -> canonical text of its rules, in order
Result read_rules(std::map<std::string, std::vector<std::string>>& out) {
  return dump(
      NFT_MSG_GETRULE, "rules",
      [](nlmsghdr* nlh) {
        RulePtr r = alloc_rule();
        check(nftnl_rule_set_str(r.get(), NFTNL_RULE_TABLE, kTableName), "rule dump: table");
        nftnl_rule_nlmsg_build_payload(nlh, r.get());
      },
      [&](const nlmsghdr* m) -> Result {
        RulePtr r = alloc_rule();
        if (nftnl_rule_nlmsg_parse(m, r.get()) < 0) return unparsable("rule");
        const char* table = nftnl_rule_get_str(r.get(), NFTNL_RULE_TABLE);
        if (!table || std::strcmp(table, kTableName) != 0) return {};
        if (nftnl_rule_get_u32(r.get(), NFTNL_RULE_FAMILY) != NFPROTO_INET) return {};
        const char* chain = nftnl_rule_get_str(r.get(), NFTNL_RULE_CHAIN);
        if (!chain) return Result{EPROTO, "table inet vmfence holds a rule without a chain"};
        out[chain].push_back(rule_canon(r.get()));
        return {};
      });
}

// set name -> canonical text of the set
Result read_sets(std::map<std::string, std::string>& out) {
  return dump(
      NFT_MSG_GETSET, "sets",
      [](nlmsghdr* nlh) {
        SetPtr s = internal::alloc_set();
        check(nftnl_set_set_str(s.get(), NFTNL_SET_TABLE, kTableName), "set dump: table");
        nftnl_set_nlmsg_build_payload(nlh, s.get());
      },
      [&](const nlmsghdr* m) -> Result {
        SetPtr s = internal::alloc_set();
        if (nftnl_set_nlmsg_parse(m, s.get()) < 0) return unparsable("set");
        const char* table = nftnl_set_get_str(s.get(), NFTNL_SET_TABLE);
        if (!table || std::strcmp(table, kTableName) != 0) return {};
        if (nftnl_set_get_u32(s.get(), NFTNL_SET_FAMILY) != NFPROTO_INET) return {};
        const char* name = nftnl_set_get_str(s.get(), NFTNL_SET_NAME);
        if (!name) return Result{EPROTO, "table inet vmfence holds a set without a name"};
        out[name] = set_canon(s.get());
        return {};
      });
}

// The canonical text of every element of set `name`, sorted.
Result read_elems(const std::string& name, std::vector<std::string>& out) {
  Result r = dump(
      NFT_MSG_GETSETELEM, "set elements",
      [&](nlmsghdr* nlh) {
        SetPtr s = internal::alloc_set();
        nftnl_set_set_u32(s.get(), NFTNL_SET_FAMILY, NFPROTO_INET);
        check(nftnl_set_set_str(s.get(), NFTNL_SET_TABLE, kTableName), "element dump: table");
        check(nftnl_set_set_str(s.get(), NFTNL_SET_NAME, name.c_str()), "element dump: set");
        nftnl_set_elems_nlmsg_build_payload(nlh, s.get());
      },
      [&](const nlmsghdr* m) -> Result {
        SetPtr s = internal::alloc_set();
        if (nftnl_set_elems_nlmsg_parse(m, s.get()) < 0) return unparsable("set element");
        append_canon_elems(s.get(), out);
        return {};
      });
  std::sort(out.begin(), out.end());
  return r;
}

// What make_set_elems sends for every element of `set`, canonical and sorted.
std::vector<std::string> expected_elems(const SetDesc& set) {
  std::vector<std::string> out;
  SetPtr s = make_set_elems(set, 0, set.elems.size());
  append_canon_elems(s.get(), out);
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace

// ---------------------------------------------------------------------------
// apply / remove / verify
// ---------------------------------------------------------------------------

Result apply(const Spec& spec) { return apply(build_ruleset(spec)); }

Result apply(const Ruleset& rs) {
  const auto t0 = std::chrono::steady_clock::now();
  const uint64_t fp = rs.fingerprint();  // the whole table's text: once
  Batch b;
  try {
    add_replace_prefix(b);
    add_table_msg(b, NFT_MSG_NEWTABLE, NLM_F_CREATE | NLM_F_EXCL, table_comment(fp), "add table inet vmfence");
    for (const auto& c : rs.chains) {
      ChainPtr ch = make_chain(c);
      nlmsghdr* nlh = b.add(NFT_MSG_NEWCHAIN, NLM_F_CREATE | NLM_F_EXCL, "add chain inet vmfence " + c.name);
      nftnl_chain_nlmsg_build_payload(nlh, ch.get());
      b.done(nlh);
    }
    for (const auto& set : rs.sets) {
      SetPtr st = make_set(set);
      nlmsghdr* nlh = b.add(NFT_MSG_NEWSET, NLM_F_CREATE | NLM_F_EXCL, "add set inet vmfence " + set.name);
      nftnl_set_nlmsg_build_payload(nlh, st.get());
      b.done(nlh);
    }
    for (const auto& set : rs.sets) {
      for (size_t i = 0; i < set.elems.size(); i += kElemsPerMsg) {
        SetPtr st = make_set_elems(set, i, kElemsPerMsg);
        nlmsghdr* nlh = b.add(NFT_MSG_NEWSETELEM, NLM_F_CREATE | NLM_F_EXCL,
                              "add element inet vmfence " + set.name + " { " + set.elem_text(set.elems[i]) + ", ... }");
        nftnl_set_elems_nlmsg_build_payload(nlh, st.get());
        b.done(nlh);
      }
    }
    for (const auto& r : rs.rules) {
      RulePtr rule = make_rule(r);
      nlmsghdr* nlh =
          b.add(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, "add rule inet vmfence " + r.chain + " " + r.text());
      nftnl_rule_nlmsg_build_payload(nlh, rule.get());
      b.done(nlh);
    }
  } catch (const BuildError& e) {
    return build_failed(e);
  } catch (const std::bad_alloc&) {
    return out_of_memory("building the batch");
  }
  Result res = b.send_and_wait();
  if (!res) return res;  // the caller logs it; the kernel kept the previous table
  {
    std::lock_guard lock(g_mu);
    g_applied = rs;
  }
  const auto ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  spdlog::info(
      "nftables: table inet vmfence applied ({} chains, {} rules, {} sets with {} elements, ruleset {}) in {:.1f} ms",
      rs.chains.size(), rs.rules.size(), rs.sets.size(), rs.elements(), hex64(fp), ms);
  return res;
}

Result remove() {
  Batch b;
  try {
    add_replace_prefix(b);
  } catch (const BuildError& e) {
    return build_failed(e);
  } catch (const std::bad_alloc&) {
    return out_of_memory("building the batch");
  }
  Result res = b.send_and_wait();
  if (res) {
    std::lock_guard lock(g_mu);
    g_applied.reset();
  }
  return res;
}

namespace {

Result verify_sets(const Ruleset& rs) {
  std::map<std::string, std::string> live;
  if (Result r = read_sets(live); !r) return r;
  if (live.size() != rs.sets.size())
    return Result{EPROTO, "table inet vmfence has " + std::to_string(live.size()) + " sets, expected " +
                              std::to_string(rs.sets.size())};
  for (const auto& set : rs.sets) {
    auto it = live.find(set.name);
    if (it == live.end()) return Result{EPROTO, "set " + set.name + " is missing"};
    SetPtr want = make_set(set);
    if (it->second != set_canon(want.get()))
      return Result{EPROTO, "set " + set.name + " is `" + it->second + "`, expected `" + set_canon(want.get()) + "`"};
    std::vector<std::string> got;
    if (Result r = read_elems(set.name, got); !r) return r;
    const std::vector<std::string> exp = expected_elems(set);
    if (got != exp) {
      std::vector<std::string> missing, extra;
      std::set_difference(exp.begin(), exp.end(), got.begin(), got.end(), std::back_inserter(missing));
      std::set_difference(got.begin(), got.end(), exp.begin(), exp.end(), std::back_inserter(extra));
      std::string msg = "set " + set.name + " has " + std::to_string(got.size()) + " elements, expected " +
                        std::to_string(exp.size());
      if (!missing.empty()) msg += "; missing " + missing.front();
      if (!extra.empty()) msg += "; unexpected " + extra.front();
      return Result{EPROTO, msg};
    }
  }
  return {};
}

Result verify_rules(const Ruleset& rs) {
  std::map<std::string, std::vector<std::string>> live;
  if (Result r = read_rules(live); !r) return r;
  for (const auto& c : rs.chains) {
    const auto want = rs.in_chain(c.name);
    const auto& got = live[c.name];
    if (got.size() != want.size())
      return Result{EPROTO, "chain " + c.name + " has " + std::to_string(got.size()) + " rules, expected " +
                                std::to_string(want.size())};
    for (size_t i = 0; i < want.size(); ++i) {
      RulePtr r = make_rule(*want[i]);
      if (rule_canon(r.get()) != got[i])
        return Result{EPROTO,
                      "chain " + c.name + " rule " + std::to_string(i + 1) + " differs from `" + want[i]->text() + "`"};
    }
  }
  return {};
}

}  // namespace

Result verify(const Ruleset& rs) {
  LiveTable table;
  if (Result r = read_table(table); !r) return r;
  if (!table.found) return Result{ENOENT, "table inet vmfence is missing"};
  if (table.flags != 0)
    return Result{EPROTO, "table inet vmfence has flags " + std::to_string(table.flags) + " (dormant?)"};
  if (table.comment != table_comment(rs))
    return Result{EPROTO,
                  "table inet vmfence comment is \"" + table.comment + "\", expected \"" + table_comment(rs) + "\""};

  std::vector<LiveChain> chains;
  if (Result r = read_chains(chains); !r) return r;
  if (chains.size() != rs.chains.size())
    return Result{EPROTO, "table inet vmfence has " + std::to_string(chains.size()) + " chains, expected " +
                              std::to_string(rs.chains.size())};
  for (const auto& want : rs.chains) {
    auto it = std::find_if(chains.begin(), chains.end(), [&](const LiveChain& c) { return c.name == want.name; });
    if (it == chains.end()) return Result{EPROTO, "chain " + want.name + " is missing"};
    const int hook = want.hook.empty() ? -1 : hook_number(want.hook);
    if (it->hook != hook ||
        (hook >= 0 && (it->prio != want.priority || it->type != want.type || it->policy != NF_ACCEPT)))
      return Result{EPROTO, "chain " + want.name + " has a different type, hook, priority or policy"};
  }

  try {
    if (Result r = verify_sets(rs); !r) return r;
    return verify_rules(rs);
  } catch (const BuildError& e) {
    return build_failed(e);
  } catch (const std::bad_alloc&) {
    return out_of_memory("comparing the rules");
  }
}

bool table_intact() {
  std::optional<Ruleset> rs;
  {
    std::lock_guard lock(g_mu);
    rs = g_applied;
  }
  return rs && static_cast<bool>(verify(*rs));
}

}  // namespace vmfence::nft
