// Shared by agent/nft/*.cpp only (not part of the public API: include agent/nft/nft.h).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "agent/nft/netlink.h"
#include "agent/nft/ruleset.h"
#include "agent/spec/spec.h"

struct mnl_socket;   // libmnl
struct nftnl_chain;  // libnftnl
struct nftnl_rule;
struct nftnl_set;
struct nftnl_set_elem;
struct nftnl_table;

namespace vmfence::nft::internal {

// --- text and addresses (ruleset.cpp) ---
// The address bytes in network order (4 for IPv4, 16 for IPv6), host bits cleared.
std::vector<uint8_t> net_bytes(const Cidr& c);
unsigned full_bits(const Cidr& c);  // 32 | 128
bool has_ports(Proto p);            // tcp, udp
bool full_range(const PortRange& r);
std::string quote(const std::string& s);
std::string hex64(uint64_t v);
// Cut to what a rule/table comment can hold (NFTNL_UDATA_COMMENT_MAXLEN with its NUL).
std::string clamp_comment(std::string s);

// --- libnftnl objects (objects.cpp) ---
// Building one failed: libnftnl refused an attribute (err: ENOMEM, or EINVAL for a
// bug here), or a value does not fit. Out of memory may also be std::bad_alloc.
struct BuildError : std::runtime_error {
  BuildError(int e, const std::string& what) : std::runtime_error(what), err(e) {}
  int err;
};
// A libnftnl setter's result (< 0: failed) -> BuildError.
void check(int ret, const char* what);
// An nftnl_udata_put* result (false: does not fit) -> BuildError.
void check(bool ok, const char* what);

struct RuleFree {
  void operator()(nftnl_rule* r) const;
};
struct ChainFree {
  void operator()(nftnl_chain* c) const;
};
struct TableFree {
  void operator()(nftnl_table* t) const;
};
struct SetFree {
  void operator()(nftnl_set* s) const;
};
using SetPtr = std::unique_ptr<nftnl_set, SetFree>;
using RulePtr = std::unique_ptr<nftnl_rule, RuleFree>;
using ChainPtr = std::unique_ptr<nftnl_chain, ChainFree>;
using TablePtr = std::unique_ptr<nftnl_table, TableFree>;
// Empty objects; std::bad_alloc when libnftnl cannot allocate.
RulePtr alloc_rule();
ChainPtr alloc_chain();
TablePtr alloc_table();
SetPtr alloc_set();

// The objects apply() sends. Throw BuildError or std::bad_alloc.
RulePtr make_rule(const RuleDesc& d);
ChainPtr make_chain(const ChainDesc& c);
TablePtr make_table(const std::string& comment);  // "" = no comment
int hook_number(const std::string& hook);         // NF_INET_*; -1 when unknown
// The set itself (no elements), and the set carrying elems[first, first + count) for
// one NEWSETELEM message (interval sets without concatenation take each range as a
// start element and an end element).
SetPtr make_set(const SetDesc& s);
SetPtr make_set_elems(const SetDesc& s, size_t first, size_t count);
// A set as verify() compares it (name, flags, key type and lengths), and one element
// (key, key end, flags, comment) of a dumped set / of the ones make_set_elems builds.
std::string set_canon(const nftnl_set* s);
std::string elem_canon(nftnl_set_elem* e);  // libnftnl 1.2.4 getters take it non-const

// The table comment apply() stores (it names the ruleset's fingerprint), and the one
// a table read back from the kernel holds ("" when none).
std::string table_comment(const Ruleset& rs);
std::string table_comment(uint64_t fingerprint);
std::string table_comment(const nftnl_table* t);
// A rule as verify() compares it: its expressions as text (counters without their
// values) and its comment. Throws BuildError or std::bad_alloc.
std::string rule_canon(const nftnl_rule* r);

// --- netlink sockets (netlink.cpp), shared with the monitor ---
struct SocketClose {
  void operator()(mnl_socket* s) const;
};
using SocketPtr = std::unique_ptr<mnl_socket, SocketClose>;

// Result{err (EIO when 0), "what: strerror"}.
Result errno_result(int err, const std::string& what);
// A NETLINK_NETFILTER socket bound to `groups`; flags are added to SOCK_CLOEXEC.
Result open_socket(SocketPtr& out, unsigned groups = 0, int flags = 0);
// Set a socket buffer: opt_force (beyond the sysctl limit, needs CAP_NET_ADMIN), else
// opt. False (errno set) when neither could be set.
bool set_buffer(int fd, int opt_force, int opt, size_t size);
// The netlink port id of one of this process's recent batches: the notifications
// it caused are vmfence's own.
bool is_own_portid(uint32_t portid);

}  // namespace vmfence::nft::internal
