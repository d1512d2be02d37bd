// Reference model of the vmfence policy, for the differential fuzzer.
//
// Written from the contract only: /work/shared/DESIGN.md and the README
// sections "Spec format", "Modes and detection", "What happens to a packet"
// and "What a guest can and cannot do", made precise by the lead engineer's
// rulings of 2026-11-30 (marked "RULING n" in model.cpp). It does not use the BPF code, the
// compiler or the spec parser: it takes its own plain description of the
// specs (the generator writes the same specs as JSON for the agent's parser),
// parses raw Ethernet frames itself and keeps its own per-VM state (flows
// opened, first fragments seen). Each README rule is one function in
// model.cpp; where the README is silent the choice is marked "CHOICE" there.
//
// Not modelled: `sampled` mode (random by design), quarantine (the fuzzer's
// specs use on_violation "alert"), rate limits, flow idle timeouts and the
// FIN/RST linger (a fuzz world lives for seconds), the 256-entry LRU of the
// fragment table (the generator never reuses a fragment id within a world)
// and the VLAN metadata of real TAPs (BPF_PROG_TEST_RUN does not strip tags:
// a tag is seen in the frame).
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <tuple>
#include <vector>

namespace vmfence::fuzz {

using MacAddr = std::array<uint8_t, 6>;

// An IPv4 (first 4 bytes of b) or IPv6 address.
struct Addr {
  uint8_t fam = 4;
  std::array<uint8_t, 16> b{};
  bool operator<(const Addr& o) const { return std::tie(fam, b) < std::tie(o.fam, o.b); }
  bool operator==(const Addr& o) const { return fam == o.fam && b == o.b; }
  std::string str() const;
  static Addr v4(uint8_t a, uint8_t b, uint8_t c, uint8_t d);
  static Addr v6(const char* text);  // inet_pton; throws on error
  static Addr parse(const std::string& text);
};

struct Net {
  Addr a;
  uint8_t plen = 32;
  bool contains(const Addr& x) const;
  bool operator==(const Net& o) const { return a == o.a && plen == o.plen; }
  std::string str() const;
};

enum class MMode { filtered, conntrack, direct };
const char* mmode_name(MMode m);

struct MRule {
  Net peer;
  uint8_t proto = 0;                                 // 0 any, 1 icmp, 6 tcp, 17 udp, 58 icmpv6
  std::vector<std::pair<uint16_t, uint16_t>> ports;  // empty = all
};

struct MVm {
  std::string name, iface;
  MacAddr mac{};
  std::vector<Net> addrs;
  std::vector<Addr> gateways;
  std::string group;  // already defaulted to the name
  bool group_explicit = true;
  MMode mode = MMode::filtered;
  std::vector<MRule> egress, ingress;
  bool imds = false;
  uint32_t flows = 16384;  // limits.flows (README default 16,384)
  bool flows_explicit = false;
};

struct MHost {
  bool has_imds = true;
  Addr imds = Addr::v4(169, 254, 169, 254);
  uint16_t imds_port = 80;
};

struct MWorld {
  MHost host;
  std::vector<MVm> vms;
};

enum class Hook { from_vm, to_vm };

// The bit the from_vm program sets on skb->mark (README "Same group").
constexpr uint32_t kVouchMark = 0x10000000;

struct Verdict {
  bool pass = true;
  std::string reason;  // drop reason name ("" when passed)
  std::string rule;    // which model rule decided (diagnostics)
  bool vouch = false;  // from_vm IP traffic that passed: the vouch mark must be set
};

// One flow as seen from the VM (README "Flow state per VM").
struct FlowKey {
  Addr vm, peer;
  uint16_t vm_port = 0, peer_port = 0;
  uint8_t proto = 0;
  bool operator<(const FlowKey& o) const {
    return std::tie(vm, peer, vm_port, peer_port, proto) < std::tie(o.vm, o.peer, o.vm_port, o.peer_port, o.proto);
  }
};

// A datagram's fragments, as the frame carries them (src, dst, id, proto).
struct FragKey {
  Addr src, dst;
  uint32_t id = 0;
  uint8_t proto = 0;
  bool operator<(const FragKey& o) const {
    return std::tie(src, dst, id, proto) < std::tie(o.src, o.dst, o.id, o.proto);
  }
};

// What a frame does to the state when it passes.
struct Effects {
  std::vector<FlowKey> add_flows;
  bool by_peer = false;  // the flows it adds were opened by the peer
  std::vector<FlowKey> del_flows;
  std::vector<FragKey> add_frags;
};

class Model {
 public:
  explicit Model(MWorld world);
  const MWorld& world() const { return w_; }

  // The verdict on `frame` at `hook` of VM `vm` (index into world().vms),
  // `mark` = the skb mark the frame carries in. Does not change the state:
  // call commit() with the datapath's verdict afterwards.
  Verdict judge(size_t vm, Hook hook, uint32_t mark, const std::vector<uint8_t>& frame);
  // Apply the state change of the last judge(): the model's own effects when
  // `passed` agrees with it, what passing would have recorded when the
  // datapath passed a frame the model dropped, nothing when the datapath
  // dropped it. Keeps one mismatch from cascading.
  void commit(bool passed);

  size_t flow_count(size_t vm) const { return flows_[vm].size(); }
  const std::set<FlowKey>& flows(size_t vm) const { return flows_[vm]; }

 private:
  struct Pkt;
  struct Ctx;
  Verdict from_vm(Ctx& c);
  Verdict to_vm(Ctx& c);
  Verdict arp_from_vm(Ctx& c);
  Verdict arp_to_vm(Ctx& c);
  Verdict control_from_vm(Ctx& c, bool& is_control);
  Verdict control_to_vm(Ctx& c, bool& is_control);
  Verdict policy_from_vm(Ctx& c);
  Verdict policy_to_vm(Ctx& c);
  Verdict vm_source_to_vm(Ctx& c, const Addr& src);
  void echo_ports(Ctx& c, FlowKey& k, bool from_vm) const;
  Verdict source_v6_from_vm(Ctx& c, bool allow_ll, bool allow_unspec);
  Verdict nd_options(Ctx& c, size_t first_opt);
  bool icmp_error_of_flow(Ctx& c, bool from_vm) const;
  bool rules_allow(const std::vector<MRule>& rules, const Pkt& p, const Addr& peer) const;
  Verdict open_flow(Ctx& c, const FlowKey& k, const char* rule);
  Verdict denied_from_vm(Ctx& c, const FlowKey& k, Verdict deny);
  Verdict pass(Ctx& c, const char* rule);

  // Ownership.
  int owner_of(const Addr& a) const;          // VM index owning a (spec address or EUI-64 LL), -1
  bool owns(size_t vm, const Addr& a) const;  // in one of the VM's spec addresses
  bool same_group(size_t a, size_t b) const { return w_.vms[a].group == w_.vms[b].group; }
  bool is_gateway(size_t vm, const Addr& a) const;
  bool ll_usable(size_t vm, const Addr& a) const;  // SAVI rule
  bool in_own_64(size_t vm, const Addr& a) const;

  MWorld w_;
  std::vector<Addr> eui64_;  // per VM
  std::vector<std::set<FlowKey>> flows_;
  std::vector<std::set<FlowKey>> peer_opened_;  // subset of flows_: opened by the peer
  std::vector<std::set<FragKey>> frags_;
  // Pending from the last judge().
  size_t pend_vm_ = 0;
  bool pend_pass_ = false;
  Effects pend_effects_, pend_if_pass_;
};

// fe80::/64 + modified EUI-64 of a MAC.
Addr eui64_ll(const MacAddr& mac);
// ff02::1:ffXX:XXXX of an IPv6 address.
Addr solicited_node(const Addr& a);

}  // namespace vmfence::fuzz
