// BPF program tests: a table of packet fixtures run through
// BPF_PROG_TEST_RUN on the real TC programs (vmfence_from_vm = TC ingress on
// the TAP, VM -> host; vmfence_to_vm = TC egress, host -> VM).
//
// Each fixture gets a freshly loaded datapath with the same world of VMs
// (below), seeded with the agent's own parser, compiler and MapWriter. A
// fixture is a sequence of steps: a frame on a VM's interface with the
// expected verdict and drop reason, or a change (a new policy). After every
// frame the harness checks the verdict, the VM's per-reason counters (exactly
// the expected reason, nothing else), the packet counters, and the ring buffer
// (one event per drop, with the VM, reason, direction, addresses and ports).
// Frames shorter than BPF_PROG_TEST_RUN accepts (a cut IPv4/IPv6 header) go
// through the VM's real TAP instead (wire()). After the table: sampling
// statistics (DatapathSampling) and the per-VM event budget (DatapathEvents).
//
// Needs root (see harness.h).
#include <gtest/gtest.h>
#include <linux/if_tun.h>
#include <sys/ioctl.h>

#include <climits>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>

#include "agent/fleet/view.h"
#include "maps/reasons.h"
#include "tests/bpf/harness.h"
#include "tests/bpf/packet.h"

using namespace vmfence;
using namespace vmfence::test;

namespace {

// ---- the world every fixture runs in -----------------------------------------

const char* kHostJson = R"({ "imds": { "address": "169.254.169.254", "port": 80 } })";

struct VmDef {
  const char* name;
  const char* mac;
  const char* json;
};

// Interfaces are TAPs "vft-<name>" in the test's private netns.
const std::vector<VmDef>& world_vms() {
  static const std::vector<VmDef> vms = {
      // The VM most fixtures use: filtered, group "a", an allowlist, an ingress rule.
      {"vm1", "02:00:00:00:01:02", R"({
        "name": "vm1", "interface": "vft-vm1", "mac": "02:00:00:00:01:02",
        "addresses": ["10.1.0.2/32", "fec0::1/128"], "gateway": ["10.1.0.1", "fec0::ffff"],
        "group": "a",
        "egress": [ { "to": "0.0.0.0/0", "proto": "tcp", "ports": ["443"] },
                    { "to": "198.51.100.0/24", "proto": "tcp", "ports": ["8000-8080"] },
                    { "to": "203.0.113.7/32", "proto": "udp", "ports": ["51900"] },
                    { "to": "192.0.2.0/24", "proto": "icmp" },
                    { "to": "2001:db8::/32", "proto": "tcp", "ports": ["443"] },
                    { "to": "2001:db8::/32", "proto": "icmpv6" } ],
        "ingress": [ { "from": "100.64.0.0/10", "proto": "tcp", "ports": ["22"] },
                     { "from": "100.64.0.0/10", "proto": "udp", "ports": ["5000-5010"] },
                     { "from": "2001:db8:ffff::/48", "proto": "udp", "ports": ["5000-5010"] } ] })"},
      // Same group as vm1, no egress rules, IMDS allowed.
      {"vm2", "02:00:00:00:02:02", R"({
        "name": "vm2", "interface": "vft-vm2", "mac": "02:00:00:00:02:02",
        "addresses": ["10.2.0.2/32", "fec0::2/128"], "gateway": ["10.2.0.1"], "group": "a",
        "imds": true })"},
      // Another group (another tenant), allowed to send anywhere.
      {"vm3", "02:00:00:00:03:02", R"({
        "name": "vm3", "interface": "vft-vm3", "mac": "02:00:00:00:03:02",
        "addresses": ["10.3.0.2/32", "fec0::3/128"], "group": "b",
        "egress": [ { "to": "0.0.0.0/0" }, { "to": "::/0" } ] })"},
      // Only an IPv6 ::/0 rule: must not open IPv4.
      {"vm4", "02:00:00:00:04:02", R"({
        "name": "vm4", "interface": "vft-vm4", "mac": "02:00:00:00:04:02",
        "addresses": ["10.4.0.2/32", "fec0::4/128"], "egress": [ { "to": "::/0", "proto": "any" } ] })"},
      // Group "a" too, with a routed block, a second IPv4 and an IPv6 /64
      // (owner LPM, owners hash beyond the inline addresses).
      {"vm5", "02:00:00:00:05:02", R"({
        "name": "vm5", "interface": "vft-vm5", "mac": "02:00:00:00:05:02",
        "addresses": ["10.5.0.0/28", "10.5.1.2/32", "fec0:5::/64"], "group": "a",
        "egress": [ { "to": "0.0.0.0/0", "proto": "tcp", "ports": ["443"] } ] })"},
      // Modes.
      {"vmdirect", "02:00:00:00:06:02", R"({
        "name": "vmdirect", "interface": "vft-direct", "mac": "02:00:00:00:06:02",
        "addresses": ["10.6.0.2/32"], "mode": "direct" })"},
      {"vmsamp1", "02:00:00:00:07:02", R"({
        "name": "vmsamp1", "interface": "vft-samp1", "mac": "02:00:00:00:07:02",
        "addresses": ["10.7.0.2/32"], "mode": "sampled", "sample_rate": 1,
        "egress": [ { "to": "0.0.0.0/0", "proto": "tcp", "ports": ["443"] } ],
        "ingress": [ { "from": "100.64.0.0/10", "proto": "tcp", "ports": ["22"] } ] })"},
      {"vmsamp0", "02:00:00:00:08:02", R"({
        "name": "vmsamp0", "interface": "vft-samp0", "mac": "02:00:00:00:08:02",
        "addresses": ["10.8.0.2/32"], "mode": "sampled", "sample_rate": 1e-9,
        "egress": [ { "to": "0.0.0.0/0", "proto": "tcp", "ports": ["443"] } ] })"},
      {"vmct", "02:00:00:00:09:02", R"({
        "name": "vmct", "interface": "vft-ct", "mac": "02:00:00:00:09:02",
        "addresses": ["10.9.0.2/32"], "mode": "conntrack",
        "egress": [ { "to": "0.0.0.0/0", "proto": "tcp", "ports": ["443"] },
                    { "to": "203.0.113.7/32", "proto": "udp", "ports": ["51900"] } ],
        "ingress": [ { "from": "100.64.0.0/10", "proto": "tcp", "ports": ["22"] } ] })"},
      // A flow table of two entries.
      {"vmlimit", "02:00:00:00:0c:02", R"({
        "name": "vmlimit", "interface": "vft-limit", "mac": "02:00:00:00:0c:02",
        "addresses": ["10.12.0.2/32"], "limits": { "flows": 2 },
        "egress": [ { "to": "203.0.113.7/32", "proto": "udp", "ports": ["51900"] } ],
        "on_violation": { "action": "terminate" } })"},
      // on_violation terminate: quarantined in the kernel at the first violation.
      {"vmquar", "02:00:00:00:0a:02", R"({
        "name": "vmquar", "interface": "vft-quar", "mac": "02:00:00:00:0a:02",
        "addresses": ["10.10.0.2/32"],
        "egress": [ { "to": "0.0.0.0/0", "proto": "tcp", "ports": ["443"] } ],
        "on_violation": { "action": "terminate" } })"},
      // ... at the third violation within the window.
      {"vmquar3", "02:00:00:00:0b:02", R"({
        "name": "vmquar3", "interface": "vft-quar3", "mac": "02:00:00:00:0b:02",
        "addresses": ["10.11.0.2/32"],
        "egress": [ { "to": "0.0.0.0/0", "proto": "tcp", "ports": ["443"] } ],
        "on_violation": { "action": "terminate", "threshold": 3,
                          "window_ms": 60000 } })"},
  };
  return vms;
}

const Mac kGwMac = mac("02:00:00:00:00:01");
const Mac kOtherMac = mac("02:00:00:00:99:99");
constexpr const char* kNoVmIface = "vft-none";  // a TAP with no VM bound

Mac mac_of(const std::string& vm) {
  for (const auto& d : world_vms())
    if (vm == d.name) return mac(d.mac);
  throw std::invalid_argument("no VM " + vm);
}

const std::string& json_of(const std::string& vm) {
  static std::map<std::string, std::string> by_name;
  if (by_name.empty())
    for (const auto& d : world_vms()) by_name[d.name] = d.json;
  return by_name.at(vm);
}

// A frame sent by `vm` (Ethernet source = its MAC), or sent to it.
Packet F(const std::string& vm) { return Packet().eth(mac_of(vm), kGwMac); }
Packet T(const std::string& vm) { return Packet().eth(kGwMac, mac_of(vm)); }

// ---- fixtures ----------------------------------------------------------------

struct Expect {
  bool pass = true;
  uint8_t reason = VMFENCE_REASON_NONE;
};
const Expect PASS{};
Expect DROP(uint8_t reason) { return {false, reason}; }

struct Step {
  std::string what;
  bool from_vm = true;
  std::string vm;     // the VM whose interface sees the frame ...
  std::string iface;  // ... or an interface with no VM (then vm is "")
  Frame frame;
  Expect expect;
  int repeat = 1;
  uint32_t mark = 0;                               // skb->mark (VMFENCE_MARK_FROM_VM: another VM's from_vm passed it)
  bool truncated = false;                          // cut short: the event has no addresses
  bool via_tap = false;                            // written to the TAP, not BPF_PROG_TEST_RUN
  std::optional<uint8_t> event_flags;              // VMFENCE_EVENT_F_* of the drop's event
  std::function<void(World&)> action;              // instead of a frame: a change
  std::function<void(World&, const Step&)> check;  // extra assertions after the frame
};

Step out(const std::string& vm, const Packet& p, Expect e, std::string what = "") {
  Step s;
  s.what = what.empty() ? "from " + vm : what;
  s.vm = vm;
  s.frame = p.build();
  s.expect = e;
  return s;
}
Step in(const std::string& vm, const Packet& p, Expect e, std::string what = "") {
  Step s = out(vm, p, e, what.empty() ? "to " + vm : what);
  s.from_vm = false;
  return s;
}
Step on_iface(const std::string& iface, bool from_vm, const Packet& p, Expect e) {
  Step s = out("", p, e, "on " + iface);
  s.iface = iface;
  s.from_vm = from_vm;
  return s;
}
Step cut(Step s, size_t bytes) {
  s.frame = s.frame.truncated(bytes);
  s.truncated = true;
  s.what += " (first " + std::to_string(bytes) + " bytes)";
  return s;
}
// Through the real TAP hook (see World::send_via_tap): for frames too short
// for BPF_PROG_TEST_RUN. from_vm only; the verdict shows in the counters.
Step wire(Step s) {
  s.via_tap = true;
  s.what += " (via the TAP)";
  return s;
}
// A packet that entered through a VM's TAP: its from_vm vouched for it.
Step vouched(Step s) {
  s.mark = VMFENCE_MARK_FROM_VM;
  s.what += " (vouched)";
  return s;
}
Step times(Step s, int n) {
  s.repeat = n;
  return s;
}
Step with_flags(Step s, uint8_t flags) {
  s.event_flags = flags;
  return s;
}
Step then_check(Step s, std::function<void(World&, const Step&)> check) {
  s.check = std::move(check);
  return s;
}
Step change(std::string what, std::function<void(World&)> action) {
  Step s;
  s.what = std::move(what);
  s.action = std::move(action);
  return s;
}

struct Fixture {
  std::string name;
  std::vector<Step> steps;
};

std::ostream& operator<<(std::ostream& os, const Fixture& f) { return os << f.name; }

// Frames of vm1 (10.1.0.2, fec0::1).
Packet tcp4(const char* src, const char* dst, uint16_t sport, uint16_t dport, uint8_t flags = SYN,
            const std::string& vm = "vm1") {
  return F(vm).ipv4(ip(src), ip(dst)).tcp(sport, dport, flags);
}
Packet udp4(const char* src, const char* dst, uint16_t sport, uint16_t dport, const std::string& vm = "vm1") {
  return F(vm).ipv4(ip(src), ip(dst)).udp(sport, dport).payload(8);
}
Packet tcp4_to(const std::string& vm, const char* src, const char* dst, uint16_t sport, uint16_t dport, uint8_t flags) {
  return T(vm).ipv4(ip(src), ip(dst)).tcp(sport, dport, flags);
}
Packet arp_req(const std::string& vm, const Mac& sha, const char* spa, const char* tpa) {
  return F(vm).arp(1, sha, ip(spa), Mac{}, ip(tpa));
}

const Ip kAllNodes = ip("ff02::1");
Ip solicited_node(const char* target) {
  Ip t = ip(target), s = ip("ff02::1:ff00:0");
  std::copy(t.mapped.begin() + 13, t.mapped.end(), s.mapped.begin() + 13);
  return s;
}

void expect_state_quarantined(World& w, const std::string& vm, bool want) {
  EXPECT_EQ(w.state(w.vm(vm).slot).quarantined, want ? 1u : 0u) << vm;
}

std::vector<Fixture> fixtures() {
  std::vector<Fixture> t;
  auto add = [&](std::string name, std::vector<Step> steps) { t.push_back({std::move(name), std::move(steps)}); };

  // ---- egress policy (filtered) ----
  add("allowed_tcp443_any", {out("vm1", tcp4("10.1.0.2", "93.184.216.34", 40000, 443), PASS)});
  add("allowed_prefix_inherits_wider_rule", {out("vm1", tcp4("10.1.0.2", "198.51.100.9", 40000, 443), PASS)});
  add("not_allowlisted_port",
      {out("vm1", tcp4("10.1.0.2", "93.184.216.34", 40000, 80), DROP(VMFENCE_REASON_EGRESS_DENIED))});
  add("not_allowlisted_dns", {out("vm1", udp4("10.1.0.2", "8.8.8.8", 40000, 53), DROP(VMFENCE_REASON_EGRESS_DENIED))});
  add("port_range_bounds",
      {out("vm1", tcp4("10.1.0.2", "198.51.100.9", 40000, 8000), PASS),
       out("vm1", tcp4("10.1.0.2", "198.51.100.9", 40001, 8080), PASS),
       out("vm1", tcp4("10.1.0.2", "198.51.100.9", 40002, 7999), DROP(VMFENCE_REASON_EGRESS_DENIED)),
       out("vm1", tcp4("10.1.0.2", "198.51.100.9", 40003, 8081), DROP(VMFENCE_REASON_EGRESS_DENIED)),
       out("vm1", tcp4("10.1.0.2", "198.51.101.9", 40004, 8000), DROP(VMFENCE_REASON_EGRESS_DENIED))});
  add("allowlist_udp_exact_host",
      {out("vm1", udp4("10.1.0.2", "203.0.113.7", 40000, 51900), PASS),
       out("vm1", udp4("10.1.0.2", "203.0.113.7", 40000, 51901), DROP(VMFENCE_REASON_EGRESS_DENIED)),
       out("vm1", udp4("10.1.0.2", "203.0.113.8", 40000, 51900), DROP(VMFENCE_REASON_EGRESS_DENIED)),
       out("vm1", tcp4("10.1.0.2", "203.0.113.7", 40000, 51900), DROP(VMFENCE_REASON_EGRESS_DENIED))});
  add("protocol_mismatch_udp443",
      {out("vm1", udp4("10.1.0.2", "93.184.216.34", 40000, 443), DROP(VMFENCE_REASON_EGRESS_DENIED))});
  add("ipv4_options_allowed",
      {out("vm1",
           F("vm1")
               .ipv4(ip("10.1.0.2"), ip("93.184.216.34"), ip4_options({0x94, 0x04, 0x00, 0x00}))  // router alert
               .tcp(40000, 443, SYN),
           PASS)});
  add("tcp_options_allowed", {out("vm1",
                                  F("vm1")
                                      .ipv4(ip("10.1.0.2"), ip("93.184.216.34"))
                                      .tcp(40000, 443, SYN, {2, 4, 0x05, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0}),
                                  PASS)});
  add("host_gateway_needs_rule",
      {out("vm1", udp4("10.1.0.2", "10.1.0.1", 40000, 53), DROP(VMFENCE_REASON_EGRESS_DENIED)),
       out("vm1", tcp4("10.1.0.2", "10.1.0.1", 40000, 443), PASS)});
  // Multicast/broadcast no rule allows is the guest's link-local noise.
  add("broadcast_not_allowlisted",
      {out("vm1", udp4("10.1.0.2", "255.255.255.255", 68, 67), DROP(VMFENCE_REASON_LINK_LOCAL)),
       out("vm1", udp4("10.1.0.2", "224.0.0.251", 5353, 5353), DROP(VMFENCE_REASON_LINK_LOCAL)),
       out("vm1", udp4("10.1.0.2", "239.255.255.250", 40000, 1900), DROP(VMFENCE_REASON_LINK_LOCAL))});
  add("dhcp_discover_is_noise",
      {out("vm1", udp4("0.0.0.0", "255.255.255.255", 68, 67), DROP(VMFENCE_REASON_LINK_LOCAL)),
       out("vm1", udp4("0.0.0.0", "10.1.0.1", 68, 67), DROP(VMFENCE_REASON_SPOOFED_IP))});

  // ---- isolation ----
  add("same_group_without_rule", {out("vm1", tcp4("10.1.0.2", "10.2.0.2", 40000, 5555), PASS),
                                  vouched(in("vm2", tcp4_to("vm2", "10.1.0.2", "10.2.0.2", 40000, 5555, SYN), PASS))});
  // A VM's address toward a VM counts only when that VM's TAP vouched for it.
  add("group_peer_address_from_outside",
      {in("vm2", tcp4_to("vm2", "10.1.0.2", "10.2.0.2", 40000, 5555, SYN), DROP(VMFENCE_REASON_SPOOFED_IP)),
       in("vm2", T("vm2").ipv6(ip("fec0::1"), ip("fec0::2")).udp(4000, 5000), DROP(VMFENCE_REASON_SPOOFED_IP))});
  add("own_address_toward_vm",
      {vouched(in("vm1", tcp4_to("vm1", "10.1.0.2", "10.1.0.2", 40000, 22, SYN), DROP(VMFENCE_REASON_SPOOFED_IP))),
       in("vm1", tcp4_to("vm1", "10.1.0.2", "10.1.0.2", 40000, 22, SYN), DROP(VMFENCE_REASON_SPOOFED_IP))});
  add("same_group_owner_prefix_and_extra_address",
      {out("vm1", tcp4("10.1.0.2", "10.5.0.3", 40000, 5555), PASS),
       out("vm1", tcp4("10.1.0.2", "10.5.1.2", 40000, 5555), PASS),
       out("vm1", F("vm1").ipv6(ip("fec0::1"), ip("fec0:5::77")).udp(4000, 5000), PASS)});
  add("other_group",
      {out("vm1", tcp4("10.1.0.2", "10.3.0.2", 40000, 443), DROP(VMFENCE_REASON_CROSS_GROUP)),
       out("vm3", tcp4("10.3.0.2", "10.1.0.2", 40000, 22, SYN, "vm3"), DROP(VMFENCE_REASON_CROSS_GROUP))});
  add("other_group_to_vm",
      {vouched(in("vm1", tcp4_to("vm1", "10.3.0.2", "10.1.0.2", 40000, 22, SYN), DROP(VMFENCE_REASON_CROSS_GROUP)))});
  add("other_group_owner_prefix",
      {out("vm3", tcp4("10.3.0.2", "10.5.0.9", 40000, 443, SYN, "vm3"), DROP(VMFENCE_REASON_CROSS_GROUP))});
  add("other_group_ipv6",
      {out("vm1", F("vm1").ipv6(ip("fec0::1"), ip("fec0::3")).tcp(40000, 443, SYN), DROP(VMFENCE_REASON_CROSS_GROUP))});

  // ---- anti-spoofing: MAC, IP ----
  add("spoofed_ip", {out("vm1", tcp4("10.1.0.3", "93.184.216.34", 40000, 443), DROP(VMFENCE_REASON_SPOOFED_IP))});
  add("spoofed_ip_of_group_peer",
      {out("vm1", tcp4("10.2.0.2", "93.184.216.34", 40000, 443), DROP(VMFENCE_REASON_SPOOFED_IP))});
  add("spoofed_ip_outside_owned_prefix",
      {out("vm5", tcp4("10.5.0.7", "93.184.216.34", 40000, 443, SYN, "vm5"), PASS),
       out("vm5", tcp4("10.5.1.2", "93.184.216.34", 40000, 443, SYN, "vm5"), PASS),
       out("vm5", tcp4("10.5.0.16", "93.184.216.34", 40000, 443, SYN, "vm5"), DROP(VMFENCE_REASON_SPOOFED_IP))});
  add("spoofed_mac",
      {out("vm1", Packet().eth(kOtherMac, kGwMac).ipv4(ip("10.1.0.2"), ip("93.184.216.34")).tcp(40000, 443, SYN),
           DROP(VMFENCE_REASON_SPOOFED_MAC))});
  add("spoofed_mac_on_arp",
      {out("vm1", Packet().eth(kOtherMac, kGwMac).arp(1, mac_of("vm1"), ip("10.1.0.2"), Mac{}, ip("10.1.0.1")),
           DROP(VMFENCE_REASON_SPOOFED_MAC))});
  add("spoofed_mac_on_malformed",
      {wire(cut(out("vm1", Packet().eth(kOtherMac, kGwMac).ipv4(ip("10.1.0.2"), ip("93.184.216.34")).tcp(1, 443, SYN),
                    DROP(VMFENCE_REASON_SPOOFED_MAC)),
                20))});
  add("spoofed_ipv6", {out("vm1", F("vm1").ipv6(ip("fec0::2"), ip("2001:db8::5")).tcp(40000, 443, SYN),
                           DROP(VMFENCE_REASON_SPOOFED_IP)),
                       out("vm1", F("vm1").ipv6(ip("2001:db8:1::9"), ip("2001:db8::5")).tcp(40000, 443, SYN),
                           DROP(VMFENCE_REASON_SPOOFED_IP)),
                       out("vm1", F("vm1").ipv6(ip("fec0::ffff"), ip("2001:db8::5")).tcp(40000, 443, SYN),
                           DROP(VMFENCE_REASON_SPOOFED_IP))});
  // A SLAAC privacy address in its own /64: not its to use, not a violation.
  add("ipv6_privacy_address_source", {out("vm1", F("vm1").ipv6(ip("fec0::9"), ip("2001:db8::5")).tcp(40000, 443, SYN),
                                          DROP(VMFENCE_REASON_UNASSIGNED_SRC))});
  add("ipv6_link_local_source_not_nd",
      {out("vm1", F("vm1").ipv6(ip("fe80::1"), ip("2001:db8::5")).tcp(40000, 443, SYN),
           DROP(VMFENCE_REASON_LINK_LOCAL)),
       out("vm1", F("vm1").ipv6(ip("fe80::1"), ip("ff02::fb")).udp(5353, 5353), DROP(VMFENCE_REASON_LINK_LOCAL)),
       // vm2's EUI-64 link-local (02:00:00:00:02:02) is vm2's.
       out("vm1", F("vm1").ipv6(ip("fe80::ff:fe00:202"), ip("ff02::fb")).udp(5353, 5353),
           DROP(VMFENCE_REASON_SPOOFED_IP)),
       out("vm1", F("vm1").ipv6(ip("fec0::1"), ip("fe80::2")).udp(5353, 5353), DROP(VMFENCE_REASON_LINK_LOCAL))});

  // ---- ARP ----
  add("arp_request_gateway", {out("vm1", arp_req("vm1", mac_of("vm1"), "10.1.0.2", "10.1.0.1"), PASS)});
  add("arp_request_group_peer", {out("vm1", arp_req("vm1", mac_of("vm1"), "10.1.0.2", "10.2.0.2"), PASS)});
  add("arp_request_other_group",
      {out("vm1", arp_req("vm1", mac_of("vm1"), "10.1.0.2", "10.3.0.2"), DROP(VMFENCE_REASON_CROSS_GROUP))});
  add("arp_request_foreign",
      {out("vm1", arp_req("vm1", mac_of("vm1"), "10.1.0.2", "10.9.9.9"), DROP(VMFENCE_REASON_LINK_LOCAL))});
  add("arp_probe_unspecified_sender", {out("vm1", arp_req("vm1", mac_of("vm1"), "0.0.0.0", "10.1.0.2"), PASS)});
  add("arp_spoofed_sender_mac",
      {out("vm1", arp_req("vm1", kOtherMac, "10.1.0.2", "10.1.0.1"), DROP(VMFENCE_REASON_SPOOFED_ARP))});
  add("arp_spoofed_sender_ip",
      {out("vm1", arp_req("vm1", mac_of("vm1"), "10.1.0.1", "10.1.0.1"), DROP(VMFENCE_REASON_SPOOFED_ARP))});
  add("arp_reply_own_address",
      {out("vm1", F("vm1").arp(2, mac_of("vm1"), ip("10.1.0.2"), kGwMac, ip("10.1.0.1")), PASS)});
  add("arp_reply_spoofed_ip",  // "I am the gateway"
      {out("vm1", F("vm1").arp(2, mac_of("vm1"), ip("10.1.0.1"), kGwMac, ip("10.1.0.1")),
           DROP(VMFENCE_REASON_SPOOFED_ARP))});
  add("arp_reply_spoofed_sender_mac", {out("vm1", F("vm1").arp(2, kOtherMac, ip("10.1.0.2"), kGwMac, ip("10.1.0.1")),
                                           DROP(VMFENCE_REASON_SPOOFED_ARP))});
  add("arp_bad_opcode", {out("vm1", F("vm1").arp(3, mac_of("vm1"), ip("10.1.0.2"), Mac{}, ip("10.1.0.1")),
                             DROP(VMFENCE_REASON_MALFORMED))});
  add("arp_to_vm_passes", {in("vm1", T("vm1").arp(1, kGwMac, ip("10.1.0.1"), Mac{}, ip("10.1.0.2")), PASS)});

  // ---- IPv6 and ND ----
  add("ipv6_allowed", {out("vm1", F("vm1").ipv6(ip("fec0::1"), ip("2001:db8::5")).tcp(40000, 443, SYN), PASS)});
  add("ipv6_not_allowlisted", {out("vm1", F("vm1").ipv6(ip("fec0::1"), ip("2001:db9::5")).tcp(40000, 443, SYN),
                                   DROP(VMFENCE_REASON_EGRESS_DENIED)),
                               out("vm1", F("vm1").ipv6(ip("fec0::1"), ip("2001:db8::5")).tcp(40000, 80, SYN),
                                   DROP(VMFENCE_REASON_EGRESS_DENIED))});
  add("ipv6_extension_headers_allowed",
      {out("vm1", F("vm1").ipv6(ip("fec0::1"), ip("2001:db8::5")).hop_by_hop().dest_opts().tcp(40000, 443, SYN), PASS),
       out("vm1", F("vm1").ipv6(ip("fec0::1"), ip("2001:db8::5")).dest_opts().tcp(40000, 80, SYN),
           DROP(VMFENCE_REASON_EGRESS_DENIED))});
  add("ipv6_too_many_extension_headers", {out("vm1",
                                              F("vm1")
                                                  .ipv6(ip("fec0::1"), ip("2001:db8::5"))
                                                  .hop_by_hop()
                                                  .dest_opts()
                                                  .dest_opts()
                                                  .dest_opts()
                                                  .dest_opts()
                                                  .dest_opts()
                                                  .dest_opts()
                                                  .tcp(40000, 443, SYN),
                                              DROP(VMFENCE_REASON_MALFORMED))});
  add("nd_ns_gateway_with_slla",
      {out("vm1",
           F("vm1").ipv6(ip("fec0::1"), solicited_node("fec0::ffff"), 255).ns(ip("fec0::ffff")).lla(1, mac_of("vm1")),
           PASS),
       out("vm1",
           F("vm1").ipv6(ip("fe80::1"), solicited_node("fec0::ffff"), 255).ns(ip("fec0::ffff")).lla(1, mac_of("vm1")),
           PASS)});
  add("nd_ns_link_local_target",
      {out("vm1", F("vm1").ipv6(ip("fe80::1"), solicited_node("fe80::2"), 255).ns(ip("fe80::2")).lla(1, mac_of("vm1")),
           PASS)});
  add("nd_ns_wrong_slla",
      {out("vm1",
           F("vm1").ipv6(ip("fec0::1"), solicited_node("fec0::ffff"), 255).ns(ip("fec0::ffff")).lla(1, kOtherMac),
           DROP(VMFENCE_REASON_SPOOFED_ND))});
  add("nd_ns_wrong_slla_after_other_option", {out("vm1",
                                                  F("vm1")
                                                      .ipv6(ip("fec0::1"), solicited_node("fec0::ffff"), 255)
                                                      .ns(ip("fec0::ffff"))
                                                      .nd_option(14, 1)
                                                      .lla(1, kOtherMac),
                                                  DROP(VMFENCE_REASON_SPOOFED_ND))});
  add("nd_ns_zero_length_option", {out("vm1",
                                       F("vm1")
                                           .ipv6(ip("fec0::1"), solicited_node("fec0::ffff"), 255)
                                           .ns(ip("fec0::ffff"))
                                           .raw({1, 0, 0, 0, 0, 0, 0, 0}),
                                       DROP(VMFENCE_REASON_MALFORMED))});
  // Options are walked to the end however many come first (bpf_loop).
  add("nd_ns_wrong_slla_after_many_options", {out("vm1",
                                                  F("vm1")
                                                      .ipv6(ip("fec0::1"), solicited_node("fec0::ffff"), 255)
                                                      .ns(ip("fec0::ffff"))
                                                      .nd_option(14, 1)
                                                      .nd_option(14, 1)
                                                      .nd_option(14, 1)
                                                      .nd_option(14, 1)
                                                      .lla(1, kOtherMac),
                                                  DROP(VMFENCE_REASON_SPOOFED_ND))});
  // Beyond the size bound an NS is not control traffic: judged as any packet.
  add("nd_ns_oversized_is_policy_packet", {out("vm1",
                                               F("vm1")
                                                   .ipv6(ip("fec0::1"), solicited_node("fec0::ffff"), 255)
                                                   .ns(ip("fec0::ffff"))
                                                   .nd_option(14, 1)
                                                   .nd_option(14, 1)
                                                   .nd_option(14, 1)
                                                   .nd_option(14, 1)
                                                   .nd_option(14, 1)
                                                   .lla(1, mac_of("vm1")),
                                               DROP(VMFENCE_REASON_LINK_LOCAL))});
  add("nd_ns_to_remote_address_is_policy_packet",
      {out("vm1", F("vm1").ipv6(ip("fec0::1"), ip("2001:db9::5"), 255).ns(ip("fec0::ffff")).lla(1, mac_of("vm1")),
           DROP(VMFENCE_REASON_EGRESS_DENIED)),
       out("vm1",
           F("vm1").ipv6(ip("fec0::1"), solicited_node("fec0::ffff"), 64).ns(ip("fec0::ffff")).lla(1, mac_of("vm1")),
           DROP(VMFENCE_REASON_LINK_LOCAL))});
  add("nd_na_claims_group_peer_link_local",
      {out("vm1", F("vm1").ipv6(ip("fe80::1"), kAllNodes, 255).na(ip("fe80::ff:fe00:202"), false).lla(2, mac_of("vm1")),
           DROP(VMFENCE_REASON_SPOOFED_ND))});
  add("nd_ns_foreign_target",
      {out("vm1",
           F("vm1").ipv6(ip("fec0::1"), solicited_node("fec0::99"), 255).ns(ip("fec0::99")).lla(1, mac_of("vm1")),
           DROP(VMFENCE_REASON_LINK_LOCAL))});
  add("nd_ns_other_group_target",
      {out("vm1", F("vm1").ipv6(ip("fec0::1"), solicited_node("fec0::3"), 255).ns(ip("fec0::3")).lla(1, mac_of("vm1")),
           DROP(VMFENCE_REASON_CROSS_GROUP))});
  add("nd_ns_spoofed_source",
      {out("vm1",
           F("vm1").ipv6(ip("fec0::2"), solicited_node("fec0::ffff"), 255).ns(ip("fec0::ffff")).lla(1, mac_of("vm1")),
           DROP(VMFENCE_REASON_SPOOFED_IP), "a group peer's address"),
       out("vm1",
           F("vm1").ipv6(ip("fec0::9"), solicited_node("fec0::ffff"), 255).ns(ip("fec0::ffff")).lla(1, mac_of("vm1")),
           DROP(VMFENCE_REASON_UNASSIGNED_SRC), "a privacy address of its own /64: noise")});
  add("nd_dad_from_unspecified",
      {out("vm1", F("vm1").ipv6(ip("::"), solicited_node("fec0::1"), 255).ns(ip("fec0::1")), PASS)});
  add("nd_na_own_target",
      {out("vm1", F("vm1").ipv6(ip("fec0::1"), ip("fec0::ffff"), 255).na(ip("fec0::1")).lla(2, mac_of("vm1")), PASS)});
  add("nd_na_foreign_target",
      {out("vm1", F("vm1").ipv6(ip("fec0::1"), kAllNodes, 255).na(ip("fec0::ffff"), false).lla(2, mac_of("vm1")),
           DROP(VMFENCE_REASON_SPOOFED_ND))});
  add("nd_na_wrong_tlla",
      {out("vm1", F("vm1").ipv6(ip("fec0::1"), ip("fec0::ffff"), 255).na(ip("fec0::1")).lla(2, kOtherMac),
           DROP(VMFENCE_REASON_SPOOFED_ND))});
  add("nd_ra_from_vm", {out("vm1", F("vm1").ipv6(ip("fe80::1"), kAllNodes, 255).ra().lla(1, mac_of("vm1")),
                            DROP(VMFENCE_REASON_SPOOFED_ND))});
  add("nd_redirect_from_vm",
      {out("vm1", F("vm1").ipv6(ip("fe80::1"), ip("fe80::2"), 255).redirect(ip("fe80::3"), ip("2001:db8::5")),
           DROP(VMFENCE_REASON_SPOOFED_ND))});
  add("nd_rs_from_vm", {out("vm1", F("vm1").ipv6(ip("fe80::1"), ip("ff02::2"), 255).rs().lla(1, mac_of("vm1")), PASS)});
  add("mld_report",
      {out("vm1", F("vm1").ipv6(ip("fe80::1"), ip("ff02::16"), 1).hop_by_hop().mld2_report(ip("ff02::1:ff00:1")), PASS),
       out("vm1", F("vm1").ipv6(ip("::"), ip("ff02::16"), 1).hop_by_hop().mld2_report(ip("ff02::1:ff00:1")), PASS)});
  add("mld_report_spoofed_source",
      {out("vm1", F("vm1").ipv6(ip("2001:db8:9::9"), ip("ff02::16"), 1).hop_by_hop().mld2_report(ip("ff02::1:ff00:1")),
           DROP(VMFENCE_REASON_SPOOFED_IP)),
       out("vm1", F("vm1").ipv6(ip("fec0::9"), ip("ff02::16"), 1).hop_by_hop().mld2_report(ip("ff02::1:ff00:1")),
           DROP(VMFENCE_REASON_UNASSIGNED_SRC), "a privacy address of its own /64: noise")});
  add("nd_to_vm_passes",
      {in("vm1", T("vm1").ipv6(ip("fec0::ffff"), solicited_node("fec0::1"), 255).ns(ip("fec0::1")).lla(1, kGwMac),
          PASS)});

  // ---- IGMP (link-local group membership, like MLD) ----
  {
    auto igmp = [](Packet p, const char* src, const char* dst, uint8_t type) {
      Ip4Opts o = ip4_options({0x94, 0x04, 0x00, 0x00});  // router alert
      o.ttl = 1;
      return p.ipv4(ip(src), ip(dst), o).next_proto(2).raw({type, 0, 0, 0, 0, 0, 0, 0});
    };
    add("igmp_report_link_local", {out("vm1", igmp(F("vm1"), "10.1.0.2", "224.0.0.22", 0x22), PASS)});
    // A v2 report whose group is not its destination is not a report.
    add("igmp_to_routed_group_needs_rule",
        {out("vm1", igmp(F("vm1"), "10.1.0.2", "239.1.1.1", 0x16), DROP(VMFENCE_REASON_LINK_LOCAL))});
    add("igmp_to_unicast_is_policy_packet",
        {out("vm1", igmp(F("vm1"), "10.1.0.2", "93.184.216.34", 0x22), DROP(VMFENCE_REASON_EGRESS_DENIED))});
    add("igmp_spoofed_source",
        {out("vm1", igmp(F("vm1"), "10.1.0.9", "224.0.0.22", 0x22), DROP(VMFENCE_REASON_SPOOFED_IP))});
    add("igmp_query_to_vm", {in("vm1", igmp(T("vm1"), "10.1.0.1", "224.0.0.1", 0x11), PASS)});
  }

  // ---- unknown interface ----
  add("unknown_ifindex",
      {on_iface(kNoVmIface, true, tcp4("10.1.0.2", "93.184.216.34", 40000, 443), DROP(VMFENCE_REASON_UNKNOWN_IFINDEX)),
       on_iface(kNoVmIface, false, tcp4_to("vm1", "93.184.216.34", "10.1.0.2", 443, 40000, SYN | ACK),
                DROP(VMFENCE_REASON_UNKNOWN_IFINDEX)),
       on_iface("lo", true, tcp4("10.1.0.2", "93.184.216.34", 40000, 443), DROP(VMFENCE_REASON_UNKNOWN_IFINDEX))});

  // ---- truncated headers at each layer ----
  {
    const Step tcp = out("vm1", tcp4("10.1.0.2", "93.184.216.34", 40000, 443), DROP(VMFENCE_REASON_MALFORMED));
    const Step udp = out("vm1", udp4("10.1.0.2", "203.0.113.7", 40000, 51900), DROP(VMFENCE_REASON_MALFORMED));
    const Step icmp = out("vm1", F("vm1").ipv4(ip("10.1.0.2"), ip("192.0.2.10")).icmp(8, 0, 7, 1).payload(8),
                          DROP(VMFENCE_REASON_MALFORMED));
    const Step opts =
        out("vm1", F("vm1").ipv4(ip("10.1.0.2"), ip("93.184.216.34"), ip4_options({1, 1, 1, 0})).tcp(40000, 443, SYN),
            DROP(VMFENCE_REASON_MALFORMED));
    const Step tcp6 = out("vm1", F("vm1").ipv6(ip("fec0::1"), ip("2001:db8::5")).tcp(40000, 443, SYN),
                          DROP(VMFENCE_REASON_MALFORMED));
    const Step ext6 = out("vm1", F("vm1").ipv6(ip("fec0::1"), ip("2001:db8::5")).hop_by_hop().tcp(40000, 443, SYN),
                          DROP(VMFENCE_REASON_MALFORMED));
    const Step ns = out("vm1", F("vm1").ipv6(ip("fec0::1"), solicited_node("fec0::ffff"), 255).ns(ip("fec0::ffff")),
                        DROP(VMFENCE_REASON_MALFORMED));
    const Step arp = out("vm1", arp_req("vm1", mac_of("vm1"), "10.1.0.2", "10.1.0.1"), DROP(VMFENCE_REASON_MALFORMED));
    // BPF_PROG_TEST_RUN wants a whole IPv4/IPv6 header: shorter frames go
    // through the TAP, as a guest would send them.
    add("wire_allowed_frame", {wire(out("vm1", tcp4("10.1.0.2", "93.184.216.34", 40000, 443), PASS))});
    add("truncated_ethernet_only_ipv4", {wire(cut(tcp, 14))});
    add("truncated_ipv4_header", {wire(cut(tcp, 14 + 19))});
    add("truncated_ipv4_options", {cut(opts, 14 + 22)});
    add("truncated_tcp_header", {cut(tcp, 14 + 20 + 13), cut(tcp, 14 + 20 + 2)});
    add("truncated_tcp_after_ipv4_options", {cut(opts, 14 + 24 + 10)});
    add("truncated_udp_header", {cut(udp, 14 + 20 + 3)});
    add("truncated_icmp_header", {cut(icmp, 14 + 20 + 7)});
    add("truncated_ethernet_only_ipv6", {wire(cut(tcp6, 14))});
    add("truncated_ipv6_header", {wire(cut(tcp6, 14 + 39))});
    add("truncated_ipv6_extension_header", {cut(ext6, 14 + 40 + 7)});
    add("truncated_ipv6_tcp_header", {cut(tcp6, 14 + 40 + 13)});
    add("truncated_nd_target", {cut(ns, 14 + 40 + 8 + 15)});
    add("truncated_arp", {cut(arp, 14 + 27)});
    add("truncated_to_vm",
        {cut(in("vm1", tcp4_to("vm1", "100.64.1.5", "10.1.0.2", 50000, 22, SYN), DROP(VMFENCE_REASON_MALFORMED)),
             14 + 20 + 10)});
    add("ipv4_bad_version",
        {out("vm1", F("vm1").ipv4(ip("10.1.0.2"), ip("93.184.216.34"), ip4_header(5, -1)).tcp(40000, 443, SYN),
             DROP(VMFENCE_REASON_MALFORMED))});
    add("ipv4_ihl_below_5",
        {out("vm1", F("vm1").ipv4(ip("10.1.0.2"), ip("93.184.216.34"), ip4_header(4, 4)).tcp(40000, 443, SYN),
             DROP(VMFENCE_REASON_MALFORMED))});
    add("ipv6_bad_version",
        {out("vm1", F("vm1").ethertype(kEthIpv6).raw(std::vector<uint8_t>(60, 0x40)), DROP(VMFENCE_REASON_MALFORMED))});
  }

  // ---- link layer ----
  add("vlan_tagged", {out("vm1", F("vm1").vlan(10).ipv4(ip("10.1.0.2"), ip("93.184.216.34")).tcp(40000, 443, SYN),
                          DROP(VMFENCE_REASON_BAD_ETHERTYPE))});
  add("qinq_tagged",
      {out("vm1", F("vm1").vlan(10, kEthQinQ).vlan(20).ipv4(ip("10.1.0.2"), ip("93.184.216.34")).tcp(40000, 443, SYN),
           DROP(VMFENCE_REASON_BAD_ETHERTYPE))});
  add("vlan_tagged_to_vm", {in("vm1", T("vm1").vlan(10).ipv4(ip("100.64.1.5"), ip("10.1.0.2")).tcp(50000, 22, SYN),
                               DROP(VMFENCE_REASON_BAD_ETHERTYPE))});
  add("unknown_ethertype_lldp",
      {out("vm1", F("vm1").ethertype(0x88cc).payload(46), DROP(VMFENCE_REASON_BAD_ETHERTYPE))});

  // ---- fragments ----
  {
    auto frag4 = [](uint16_t id, bool mf, uint16_t offset, uint16_t dport) {
      Packet p = F("vm1").ipv4(ip("10.1.0.2"), ip("203.0.113.7"), ip4_frag(id, mf, offset));
      if (offset == 0) return p.udp(40000, dport).payload(1472);
      return p.next_proto(kProtoUdp).payload(600);
    };
    add("ipv4_fragments_of_allowed_datagram", {out("vm1", frag4(0x1111, true, 0, 51900), PASS, "first fragment"),
                                               out("vm1", frag4(0x1111, true, 185, 0), PASS, "middle fragment"),
                                               out("vm1", frag4(0x1111, false, 370, 0), PASS, "last fragment")});
    add("ipv4_later_fragment_alone", {out("vm1", frag4(0x2222, false, 185, 0), DROP(VMFENCE_REASON_FRAGMENT))});
    add("ipv4_fragments_of_denied_datagram",
        {out("vm1", frag4(0x3333, true, 0, 53), DROP(VMFENCE_REASON_EGRESS_DENIED)),
         out("vm1", frag4(0x3333, false, 185, 0), DROP(VMFENCE_REASON_FRAGMENT))});
    add("ipv4_later_fragment_other_id", {out("vm1", frag4(0x4444, true, 0, 51900), PASS),
                                         out("vm1", frag4(0x4445, false, 185, 0), DROP(VMFENCE_REASON_FRAGMENT))});
    add("ipv4_fragments_after_policy_change",
        {out("vm1", frag4(0x5555, true, 0, 51900), PASS),
         change("vm1 loses its udp rule",
                [](World& w) {
                  ASSERT_TRUE(w.reinstall(R"({ "name": "vm1", "interface": "vft-vm1", "mac": "02:00:00:00:01:02",
                    "addresses": ["10.1.0.2/32", "fec0::1/128"], "group": "a",
                    "egress": [ { "to": "0.0.0.0/0", "proto": "tcp", "ports": ["443"] } ] })"));
                }),
         out("vm1", frag4(0x5555, false, 185, 0), DROP(VMFENCE_REASON_FRAGMENT))});
    auto frag6 = [](uint32_t id, bool more, uint16_t offset, uint16_t dport) {
      Packet p = F("vm1").ipv6(ip("fec0::1"), ip("2001:db8::5")).ipv6_frag(offset, more, id);
      if (offset == 0) return p.tcp(40000, dport, SYN).payload(1200);
      return p.next_proto(kProtoTcp).payload(600);
    };
    add("ipv6_fragments_of_allowed_packet",
        {out("vm1", frag6(0xabcd, true, 0, 443), PASS), out("vm1", frag6(0xabcd, false, 154, 0), PASS)});
    add("ipv6_later_fragment_alone", {out("vm1", frag6(0xbcde, false, 154, 0), DROP(VMFENCE_REASON_FRAGMENT))});
    add("ipv6_fragments_of_denied_packet", {out("vm1", frag6(0xcdef, true, 0, 80), DROP(VMFENCE_REASON_EGRESS_DENIED)),
                                            out("vm1", frag6(0xcdef, false, 154, 0), DROP(VMFENCE_REASON_FRAGMENT))});
    add("to_vm_later_fragment_alone",
        {in("vm1",
            T("vm1").ipv4(ip("100.64.1.5"), ip("10.1.0.2"), ip4_frag(9, false, 185)).next_proto(kProtoTcp).payload(100),
            DROP(VMFENCE_REASON_FRAGMENT))});
    add("to_vm_fragments_of_allowed_packet",
        {in("vm1",
            T("vm1").ipv4(ip("100.64.1.5"), ip("10.1.0.2"), ip4_frag(9, true, 0)).tcp(50000, 22, SYN).payload(1000),
            PASS),
         in("vm1",
            T("vm1").ipv4(ip("100.64.1.5"), ip("10.1.0.2"), ip4_frag(9, false, 128)).next_proto(kProtoTcp).payload(100),
            PASS)});
  }

  // ---- IMDS ----
  add("imds_denied", {out("vm1", tcp4("10.1.0.2", "169.254.169.254", 40000, 80), DROP(VMFENCE_REASON_IMDS_DENIED)),
                      // tcp 443 to 0.0.0.0/0 does not open the IMDS address either.
                      out("vm1", tcp4("10.1.0.2", "169.254.169.254", 40001, 443), DROP(VMFENCE_REASON_IMDS_DENIED))});
  add("imds_allowed",
      {out("vm2", tcp4("10.2.0.2", "169.254.169.254", 40000, 80, SYN, "vm2"), PASS),
       out("vm2", tcp4("10.2.0.2", "169.254.169.254", 40001, 443, SYN, "vm2"), DROP(VMFENCE_REASON_IMDS_DENIED)),
       in("vm2", tcp4_to("vm2", "169.254.169.254", "10.2.0.2", 80, 40000, SYN | ACK), PASS)});

  // ---- host -> VM ----
  add("reply_to_flow_vm_opened",
      {out("vm1", tcp4("10.1.0.2", "93.184.216.34", 40000, 443, SYN), PASS, "SYN"),
       in("vm1", tcp4_to("vm1", "93.184.216.34", "10.1.0.2", 443, 40000, SYN | ACK), PASS, "SYN-ACK"),
       out("vm1", tcp4("10.1.0.2", "93.184.216.34", 40000, 443, ACK), PASS, "ACK"),
       in("vm1", tcp4_to("vm1", "93.184.216.34", "10.1.0.2", 443, 40000, ACK | PSH), PASS, "data")});
  add("reply_to_udp_flow", {out("vm1", udp4("10.1.0.2", "203.0.113.7", 40000, 51900), PASS),
                            in("vm1", T("vm1").ipv4(ip("203.0.113.7"), ip("10.1.0.2")).udp(51900, 40000), PASS),
                            in("vm1", T("vm1").ipv4(ip("203.0.113.7"), ip("10.1.0.2")).udp(51900, 40001),
                               DROP(VMFENCE_REASON_INGRESS_DENIED))});
  add("reply_to_ipv6_flow",
      {out("vm1", F("vm1").ipv6(ip("fec0::1"), ip("2001:db8::5")).tcp(40000, 443, SYN), PASS),
       in("vm1", T("vm1").ipv6(ip("2001:db8::5"), ip("fec0::1")).tcp(443, 40000, SYN | ACK), PASS)});
  add("unsolicited_inbound",
      {in("vm1", tcp4_to("vm1", "93.184.216.34", "10.1.0.2", 443, 40001, SYN | ACK),
          DROP(VMFENCE_REASON_INGRESS_DENIED)),
       in("vm1", tcp4_to("vm1", "8.8.8.8", "10.1.0.2", 50000, 22, SYN), DROP(VMFENCE_REASON_INGRESS_DENIED)),
       in("vm1", T("vm1").ipv4(ip("8.8.8.8"), ip("10.1.0.2")).udp(53, 40000), DROP(VMFENCE_REASON_INGRESS_DENIED))});
  add("denied_syn_opens_no_flow",
      {out("vm1", tcp4("10.1.0.2", "93.184.216.34", 40000, 80, SYN), DROP(VMFENCE_REASON_EGRESS_DENIED)),
       in("vm1", tcp4_to("vm1", "93.184.216.34", "10.1.0.2", 80, 40000, SYN | ACK),
          DROP(VMFENCE_REASON_INGRESS_DENIED))});
  add("inbound_by_ingress_rule_then_reply",
      {in("vm1", tcp4_to("vm1", "100.64.1.5", "10.1.0.2", 50000, 22, SYN), PASS, "SYN in"),
       out("vm1", tcp4("10.1.0.2", "100.64.1.5", 22, 50000, SYN | ACK), PASS, "SYN-ACK out"),
       in("vm1", tcp4_to("vm1", "100.64.1.5", "10.1.0.2", 50000, 22, ACK), PASS, "ACK in"),
       out("vm1", tcp4("10.1.0.2", "100.64.1.5", 22, 50000, ACK | PSH), PASS, "data out")});
  // Reply-shaped without its flow: dropped, but not a violation (stale_reply).
  add("reply_without_inbound_is_stale",
      {out("vm1", tcp4("10.1.0.2", "100.64.1.5", 22, 50000, SYN | ACK), DROP(VMFENCE_REASON_STALE_REPLY))});
  add("ingress_rule_wrong_port",
      {in("vm1", tcp4_to("vm1", "100.64.1.5", "10.1.0.2", 50000, 23, SYN), DROP(VMFENCE_REASON_INGRESS_DENIED))});
  add("ingress_rule_ipv6_udp_range",
      {in("vm1", T("vm1").ipv6(ip("2001:db8:ffff::9"), ip("fec0::1")).udp(7000, 5010), PASS),
       out("vm1", F("vm1").ipv6(ip("fec0::1"), ip("2001:db8:ffff::9")).udp(5010, 7000), PASS),
       in("vm1", T("vm1").ipv6(ip("2001:db8:ffff::9"), ip("fec0::1")).udp(7000, 5011),
          DROP(VMFENCE_REASON_INGRESS_DENIED))});
  add("icmp_echo_reply",
      {out("vm1", F("vm1").ipv4(ip("10.1.0.2"), ip("192.0.2.10")).icmp(8, 0, 0x77, 1).payload(56), PASS),
       in("vm1", T("vm1").ipv4(ip("192.0.2.10"), ip("10.1.0.2")).icmp(0, 0, 0x77, 1).payload(56), PASS),
       in("vm1", T("vm1").ipv4(ip("192.0.2.10"), ip("10.1.0.2")).icmp(0, 0, 0x78, 1).payload(56),
          DROP(VMFENCE_REASON_INGRESS_DENIED))});
  add("icmp_echo_not_allowlisted",
      {out("vm1", F("vm1").ipv4(ip("10.1.0.2"), ip("1.1.1.1")).icmp(8, 0, 0x77, 1).payload(56),
           DROP(VMFENCE_REASON_EGRESS_DENIED)),
       in("vm1", T("vm1").ipv4(ip("192.0.2.10"), ip("10.1.0.2")).icmp(8, 0, 0x99, 1).payload(56),
          DROP(VMFENCE_REASON_INGRESS_DENIED))});
  add("icmpv6_echo_reply",
      {out("vm1", F("vm1").ipv6(ip("fec0::1"), ip("2001:db8::5")).echo6(true, 0x55).payload(56), PASS),
       in("vm1", T("vm1").ipv6(ip("2001:db8::5"), ip("fec0::1")).echo6(false, 0x55).payload(56), PASS)});
  {
    const Frame syn = F("vm1").ipv4(ip("10.1.0.2"), ip("93.184.216.34")).tcp(40002, 443, SYN).build();
    const Frame syn6 = F("vm1").ipv6(ip("fec0::1"), ip("2001:db8::5")).tcp(40002, 443, SYN).build();
    auto unreachable = [&](size_t inner_bytes) {
      return in("vm1", T("vm1").ipv4(ip("192.0.2.254"), ip("10.1.0.2")).icmp(3, 1).embed(syn, inner_bytes), PASS,
                "ICMP unreachable quoting " + std::to_string(inner_bytes) + " bytes");
    };
    add("icmp_error_about_vm_flow",
        {out("vm1", tcp4("10.1.0.2", "93.184.216.34", 40002, 443, SYN), PASS, "SYN"), unreachable(40)});
    // RFC 792: the error quotes the IP header + 64 bits (the ports only).
    add("icmp_error_rfc792_minimal_quote",
        {out("vm1", tcp4("10.1.0.2", "93.184.216.34", 40002, 443, SYN), PASS, "SYN"), unreachable(28)});
    add("icmp_error_without_flow", {in("vm1", T("vm1").ipv4(ip("192.0.2.254"), ip("10.1.0.2")).icmp(3, 1).embed(syn),
                                       DROP(VMFENCE_REASON_INGRESS_DENIED))});
    add("icmpv6_packet_too_big_about_vm_flow",
        {out("vm1", F("vm1").ipv6(ip("fec0::1"), ip("2001:db8::5")).tcp(40002, 443, SYN), PASS, "SYN"),
         in("vm1", T("vm1").ipv6(ip("2001:db8::fe"), ip("fec0::1")).icmp6(2, 0, 1280).embed(syn6), PASS)});
  }
  {
    // A peer's datagram to a closed port of the VM: the VM's port
    // unreachable quotes it, and belongs to the flow the ingress rule allowed.
    const Packet dgram = T("vm1").ipv4(ip("100.64.1.5"), ip("10.1.0.2")).udp(7000, 5005).payload(20);
    const Packet unreachable = F("vm1").ipv4(ip("10.1.0.2"), ip("100.64.1.5")).icmp(3, 3).embed(dgram.build());
    add("icmp_error_from_vm_about_inbound_flow", {in("vm1", dgram, PASS), out("vm1", unreachable, PASS)});
    add("icmp_error_from_vm_without_flow", {out("vm1", unreachable, DROP(VMFENCE_REASON_EGRESS_DENIED))});
    add("icmp_error_from_vm_quoting_foreign_packet",
        {in("vm1", dgram, PASS),
         out("vm1",
             F("vm1")
                 .ipv4(ip("10.1.0.2"), ip("100.64.1.5"))
                 .icmp(3, 3)
                 .embed(T("vm1").ipv4(ip("100.64.1.5"), ip("10.2.0.2")).udp(7000, 5005).payload(20).build()),
             DROP(VMFENCE_REASON_EGRESS_DENIED))});
  }
  {
    // ICMP errors as a carrier: only back to the quoted peer, within 576 bytes.
    const Packet dgram = T("vm1").ipv4(ip("100.64.1.5"), ip("10.1.0.2")).udp(7000, 5005).payload(20);
    add("icmp_error_from_vm_to_another_destination",
        {in("vm1", dgram, PASS),
         out("vm1", F("vm1").ipv4(ip("10.1.0.2"), ip("198.51.100.9")).icmp(3, 3).embed(dgram.build()),
             DROP(VMFENCE_REASON_EGRESS_DENIED))});
    const Packet big = T("vm1").ipv4(ip("100.64.1.5"), ip("10.1.0.2")).udp(7001, 5005).payload(1000);
    add("icmp_error_from_vm_oversized",
        {in("vm1", big, PASS),
         out("vm1", F("vm1").ipv4(ip("10.1.0.2"), ip("100.64.1.5")).icmp(3, 3).embed(big.build()),
             DROP(VMFENCE_REASON_EGRESS_DENIED)),
         out("vm1", F("vm1").ipv4(ip("10.1.0.2"), ip("100.64.1.5")).icmp(3, 3).embed(big.build(), 548), PASS,
             "at 576 bytes")});
  }
  // Source routing would carry the packet past the policy.
  add("ipv4_source_route_option",
      {out("vm1",
           F("vm1")
               .ipv4(ip("10.1.0.2"), ip("93.184.216.34"), ip4_options({131, 7, 4, 10, 9, 9, 9, 0}))
               .tcp(40000, 443, SYN),
           DROP(VMFENCE_REASON_MALFORMED)),
       out("vm1",
           F("vm1")
               .ipv4(ip("10.1.0.2"), ip("93.184.216.34"), ip4_options({137, 7, 4, 10, 9, 9, 9, 0}))
               .tcp(40000, 443, SYN),
           DROP(VMFENCE_REASON_MALFORMED))});
  add("ipv6_routing_header_segments_left", {out("vm1",
                                                F("vm1")
                                                    .ipv6(ip("fec0::1"), ip("2001:db8::5"))
                                                    .routing_header(0, 1, {ip("2001:db9::6")})
                                                    .tcp(40000, 443, SYN),
                                                DROP(VMFENCE_REASON_MALFORMED)),
                                            out("vm1",
                                                F("vm1")
                                                    .ipv6(ip("fec0::1"), ip("2001:db8::5"))
                                                    .routing_header(4, 1, {ip("2001:db9::6")})
                                                    .tcp(40000, 443, SYN),
                                                DROP(VMFENCE_REASON_MALFORMED)),
                                            out("vm1",
                                                F("vm1")
                                                    .ipv6(ip("fec0::1"), ip("2001:db8::5"))
                                                    .routing_header(4, 0, {ip("2001:db9::6")})
                                                    .tcp(40000, 443, SYN),
                                                PASS, "segments left 0: the destination is final")});
  add("ipv6_hop_by_hop_not_first",
      {out("vm1", F("vm1").ipv6(ip("fec0::1"), ip("2001:db8::5")).dest_opts().hop_by_hop().tcp(40000, 443, SYN),
           DROP(VMFENCE_REASON_MALFORMED))});
  // IPv4-mapped addresses never appear in an IPv6 header on the wire.
  add("ipv6_v4_mapped_addresses",
      {out("vm1", F("vm1").ipv6(ip("fec0::1"), ip("::ffff:93.184.216.34")).tcp(40000, 443, SYN),
           DROP(VMFENCE_REASON_MALFORMED)),
       out("vm1", F("vm1").ipv6(ip("::ffff:10.1.0.2"), ip("2001:db8::5")).tcp(40000, 443, SYN),
           DROP(VMFENCE_REASON_MALFORMED))});
  // Frame length against the IP length: truncated datagram, trailing bytes.
  add("frame_longer_than_ip_length",
      {out("vm1", F("vm1").ipv4(ip("10.1.0.2"), ip("93.184.216.34")).tcp(40000, 443, SYN).trailer(40),
           DROP(VMFENCE_REASON_MALFORMED)),
       out("vm1", F("vm1").ipv4(ip("10.1.0.2"), ip("93.184.216.34")).tcp(40001, 443, SYN).trailer(4), PASS,
           "Ethernet padding to 60 bytes")});
  add("frame_shorter_than_ip_length",
      {out("vm1", F("vm1").ipv4(ip("10.1.0.2"), ip("93.184.216.34")).tcp(40000, 443, SYN).payload(100).chopped(50),
           DROP(VMFENCE_REASON_MALFORMED))});
  // A full flow table refuses the VM's new flows, never evicts; not a violation.
  add("flow_limit_is_per_vm_and_quiet",
      {out("vmlimit", udp4("10.12.0.2", "203.0.113.7", 40000, 51900, "vmlimit"), PASS),
       out("vmlimit", udp4("10.12.0.2", "203.0.113.7", 40001, 51900, "vmlimit"), PASS),
       out("vmlimit", udp4("10.12.0.2", "203.0.113.7", 40002, 51900, "vmlimit"), DROP(VMFENCE_REASON_FLOW_LIMIT)),
       out("vmlimit", udp4("10.12.0.2", "203.0.113.7", 40000, 51900, "vmlimit"), PASS, "an existing flow"),
       in("vmlimit", T("vmlimit").ipv4(ip("203.0.113.7"), ip("10.12.0.2")).udp(51900, 40001).payload(8), PASS,
          "its reply"),
       then_check(out("vm1", udp4("10.1.0.2", "203.0.113.7", 40002, 51900), PASS, "another VM"),
                  [](World& w, const Step&) { expect_state_quarantined(w, "vmlimit", false); })});
  add("tcp_rst_ends_flow", {out("vm1", tcp4("10.1.0.2", "93.184.216.34", 40010, 443, SYN), PASS),
                            in("vm1", tcp4_to("vm1", "93.184.216.34", "10.1.0.2", 443, 40010, ACK), PASS, "reply"),
                            out("vm1", tcp4("10.1.0.2", "93.184.216.34", 40010, 443, RST), PASS, "RST"),
                            in("vm1", tcp4_to("vm1", "93.184.216.34", "10.1.0.2", 443, 40010, ACK),
                               DROP(VMFENCE_REASON_INGRESS_DENIED), "after the RST")});
  // Sampled: a source port an ingress rule allows is not a reply.
  add("sampled_ingress_port_is_not_a_reply",
      {out("vmsamp1", tcp4("10.7.0.2", "93.184.216.34", 22, 40000, SYN | ACK, "vmsamp1"),
           DROP(VMFENCE_REASON_EGRESS_DENIED)),
       in("vmsamp1", tcp4_to("vmsamp1", "100.64.1.5", "10.7.0.2", 50000, 22, SYN), PASS, "a real opener"),
       out("vmsamp1", tcp4("10.7.0.2", "100.64.1.5", 22, 50000, SYN | ACK, "vmsamp1"), PASS, "its reply")});
  // An unchecked first fragment is recorded: its later fragments never count.
  add("sampled_unchecked_first_fragment",
      {out("vmsamp0",
           F("vmsamp0").ipv4(ip("10.8.0.2"), ip("93.184.216.34"), ip4_frag(0x77, true, 0)).udp(4000, 53).payload(1472),
           PASS),
       change("sample every packet from now on",
              [](World& w) {
                ASSERT_TRUE(w.reinstall(R"({ "name": "vmsamp0", "interface": "vft-samp0", "mac": "02:00:00:00:08:02",
                  "addresses": ["10.8.0.2/32"], "mode": "sampled", "sample_rate": 1,
                  "egress": [ { "to": "0.0.0.0/0", "proto": "udp", "ports": ["53"] } ] })"));
              }),
       out("vmsamp0",
           F("vmsamp0")
               .ipv4(ip("10.8.0.2"), ip("93.184.216.34"), ip4_frag(0x77, false, 185))
               .next_proto(kProtoUdp)
               .payload(100),
           DROP(VMFENCE_REASON_FRAGMENT), "a new generation re-checks")});
  add("nd_na_from_unspecified",
      {out("vm1", F("vm1").ipv6(ip("::"), kAllNodes, 255).na(ip("fec0::1"), false).lla(2, mac_of("vm1")),
           DROP(VMFENCE_REASON_SPOOFED_ND))});
  add("queries_from_vm_are_noise",
      {out("vm1", F("vm1").ipv6(ip("fe80::1"), kAllNodes, 1).hop_by_hop().icmp6(130, 0).payload(20),
           DROP(VMFENCE_REASON_LINK_LOCAL))});
  add("to_vm_link_control_bounds",
      {in("vm1", T("vm1").ipv6(ip("fe80::1"), kAllNodes, 1).hop_by_hop().mld2_report(ip("ff02::1:ff00:1")),
          DROP(VMFENCE_REASON_LINK_LOCAL), "another host's MLD report"),
       in("vm1", T("vm1").ipv6(ip("fec0::ffff"), solicited_node("fec0::1"), 64).ns(ip("fec0::1")).lla(1, kGwMac),
          DROP(VMFENCE_REASON_INGRESS_DENIED), "NS with hop limit 64: not control, judged by the rules"),
       in("vm1", T("vm1").ipv6(ip("fe80::99"), ip("fec0::1")).udp(5000, 5000).payload(8),
          DROP(VMFENCE_REASON_LINK_LOCAL), "link-local source")});
  add("arp_to_vm_bounds", {in("vm1", T("vm1").arp(1, kGwMac, ip("10.9.9.9"), Mac{}, ip("10.9.9.8")),
                              DROP(VMFENCE_REASON_ARP_DENIED), "about neither the VM nor its gateway"),
                           in("vm1", T("vm1").arp(1, kGwMac, ip("10.1.0.1"), Mac{}, ip("10.1.0.2")).payload(30),
                              DROP(VMFENCE_REASON_MALFORMED), "longer than 60 bytes"),
                           vouched(in("vm1", T("vm1").arp(1, mac_of("vm3"), ip("10.3.0.2"), Mac{}, ip("10.1.0.1")),
                                      DROP(VMFENCE_REASON_CROSS_GROUP), "another tenant asking for the gateway")),
                           in("vm1", T("vm1").arp(2, kOtherMac, ip("10.1.0.2"), Mac{}, ip("10.1.0.2")),
                              DROP(VMFENCE_REASON_SPOOFED_ARP), "someone claiming the VM's own address")});
  add("arp_oversized_from_vm",
      {out("vm1", arp_req("vm1", mac_of("vm1"), "10.1.0.2", "10.1.0.1").payload(30), DROP(VMFENCE_REASON_MALFORMED)),
       out("vm1", arp_req("vm1", mac_of("vm1"), "0.0.0.0", "10.1.0.77"), DROP(VMFENCE_REASON_LINK_LOCAL),
           "a probe for someone else's address")});
  add("ieee_link_local_frames_are_noise",
      {out("vm1", Packet().eth(mac_of("vm1"), mac("01:80:c2:00:00:0e")).ethertype(0x88cc).payload(46),
           DROP(VMFENCE_REASON_LINK_LOCAL)),
       out("vm1", Packet().eth(mac_of("vm1"), mac("01:80:c2:00:00:00")).ethertype(38).payload(46),
           DROP(VMFENCE_REASON_LINK_LOCAL))});
  // An outsider's stray ACK to an allowed port: the VM's RST answers it, and
  // is a reply, not the VM's violation (an outsider must not be able to get a
  // terminate VM stopped).
  // ICMPv6 errors quote extension headers too: the flow is found behind them.
  {
    const Packet opts = T("vm1").ipv6(ip("2001:db8:ffff::9"), ip("fec0::1")).dest_opts({0x80, 1, 0}).udp(7000, 5005);
    add("icmpv6_error_quoting_extension_headers",
        {in("vm1", opts, PASS),
         out("vm1", F("vm1").ipv6(ip("fec0::1"), ip("2001:db8:ffff::9")).icmp6(4, 2, 42).embed(opts.build()), PASS,
             "parameter problem")});
  }
  // IPv4 carrying protocol 58 is not ICMPv6: no ND shortcut to the gateway.
  add("ipv4_protocol_58_is_not_nd", {out("vm1",
                                         F("vm1")
                                             .ipv4(ip("10.1.0.2"), ip("10.1.0.1"), ip4_ttl(255))
                                             .next_proto(58)
                                             .raw({135, 0, 0, 0, 0, 0, 0, 0})
                                             .payload(16),
                                         DROP(VMFENCE_REASON_EGRESS_DENIED))});
  // The policy never reads ports from the Ethernet padding after the datagram.
  add("ports_in_padding_are_malformed",
      {out("vm1", F("vm1").ipv4(ip("10.1.0.2"), ip("93.184.216.34")).next_proto(6).raw({0x9c, 0x40}).trailer(20),
           DROP(VMFENCE_REASON_MALFORMED))});
  add("stray_ack_answer_is_a_reply", {in("vm1", tcp4_to("vm1", "100.64.7.7", "10.1.0.2", 31337, 22, ACK), PASS),
                                      out("vm1", tcp4("10.1.0.2", "100.64.7.7", 22, 31337, RST), PASS)});
  add("reply_without_flow_is_stale_not_violation",
      {out("vmquar", tcp4("10.10.0.2", "100.64.7.7", 22, 31337, RST, "vmquar"), DROP(VMFENCE_REASON_STALE_REPLY)),
       then_check(out("vm1", tcp4("10.1.0.2", "100.64.7.8", 22, 31338, ACK), DROP(VMFENCE_REASON_STALE_REPLY),
                      "from a port an ingress rule opens"),
                  [](World& w, const Step&) { expect_state_quarantined(w, "vmquar", false); })});
  // A forged RST from outside (sequence numbers unchecked) only starts a
  // linger: the VM's flow keeps working.
  add("peer_rst_does_not_end_flow",
      {out("vm1", tcp4("10.1.0.2", "93.184.216.34", 40020, 443, SYN), PASS),
       in("vm1", tcp4_to("vm1", "93.184.216.34", "10.1.0.2", 443, 40020, RST), PASS, "forged RST"),
       in("vm1", tcp4_to("vm1", "93.184.216.34", "10.1.0.2", 443, 40020, ACK), PASS, "the flow still holds")});
  // Sampled: an ICMP error may not ride on a flow an unsampled packet opened.
  add("sampled_icmp_error_on_unchecked_flow",
      {out("vmsamp0", udp4("10.8.0.2", "198.51.100.66", 5555, 9999, "vmsamp0"), PASS, "unsampled"),
       change("sample every packet from now on",
              [](World& w) {
                ASSERT_TRUE(w.reinstall(R"({ "name": "vmsamp0", "interface": "vft-samp0", "mac": "02:00:00:00:08:02",
                  "addresses": ["10.8.0.2/32"], "mode": "sampled", "sample_rate": 1,
                  "egress": [ { "to": "0.0.0.0/0", "proto": "tcp", "ports": ["443"] } ] })"));
              }),
       out("vmsamp0",
           F("vmsamp0")
               .ipv4(ip("10.8.0.2"), ip("198.51.100.66"))
               .icmp(3, 3)
               .embed(T("vmsamp0").ipv4(ip("198.51.100.66"), ip("10.8.0.2")).udp(9999, 5555).payload(400).build()),
           DROP(VMFENCE_REASON_EGRESS_DENIED), "data in an ICMP error")});
  add("not_for_vm",
      {in("vm1", tcp4_to("vm1", "100.64.1.5", "10.1.0.9", 50000, 22, SYN), DROP(VMFENCE_REASON_NOT_FOR_VM)),
       in("vm1", tcp4_to("vm1", "100.64.1.5", "10.2.0.2", 50000, 22, SYN), DROP(VMFENCE_REASON_NOT_FOR_VM)),
       in("vm1", T("vm1").ipv6(ip("2001:db8:ffff::9"), ip("fec0::2")).udp(7000, 5000),
          DROP(VMFENCE_REASON_NOT_FOR_VM))});

  add("ipv6_any_rule_does_not_open_ipv4",
      {out("vm4", tcp4("10.4.0.2", "93.184.216.34", 40000, 443, SYN, "vm4"), DROP(VMFENCE_REASON_EGRESS_DENIED)),
       out("vm4", F("vm4").ipv6(ip("fec0::4"), ip("2001:db8::5")).udp(40000, 53), PASS)});

  // ---- modes ----
  add("direct_skips_policy", {out("vmdirect", tcp4("10.6.0.2", "93.184.216.34", 40000, 80, SYN, "vmdirect"), PASS),
                              out("vmdirect", udp4("10.6.0.2", "8.8.8.8", 40000, 53, "vmdirect"), PASS),
                              in("vmdirect", tcp4_to("vmdirect", "8.8.8.8", "10.6.0.2", 50000, 22, SYN), PASS)});
  add("direct_still_antispoofing",
      {out("vmdirect", tcp4("10.6.0.3", "93.184.216.34", 40000, 80, SYN, "vmdirect"), DROP(VMFENCE_REASON_SPOOFED_IP)),
       out("vmdirect", Packet().eth(kOtherMac, kGwMac).ipv4(ip("10.6.0.2"), ip("1.1.1.1")).tcp(1, 80, SYN),
           DROP(VMFENCE_REASON_SPOOFED_MAC)),
       out("vmdirect", arp_req("vmdirect", kOtherMac, "10.6.0.2", "10.6.0.1"), DROP(VMFENCE_REASON_SPOOFED_ARP)),
       out("vmdirect", tcp4("10.6.0.2", "10.3.0.2", 40000, 80, SYN, "vmdirect"), DROP(VMFENCE_REASON_CROSS_GROUP)),
       in("vmdirect", tcp4_to("vmdirect", "8.8.8.8", "10.6.0.9", 50000, 22, SYN), DROP(VMFENCE_REASON_NOT_FOR_VM))});
  add("sampled_rate_1_checks_every_packet",
      {times(out("vmsamp1", tcp4("10.7.0.2", "93.184.216.34", 40000, 80, SYN, "vmsamp1"),
                 DROP(VMFENCE_REASON_EGRESS_DENIED)),
             50),
       times(out("vmsamp1", tcp4("10.7.0.2", "93.184.216.34", 40001, 443, SYN, "vmsamp1"), PASS), 50),
       times(in("vmsamp1", tcp4_to("vmsamp1", "8.8.8.8", "10.7.0.2", 50000, 22, SYN),
                DROP(VMFENCE_REASON_INGRESS_DENIED)),
             50)});
  add("sampled_tiny_rate_lets_violations_pass",
      {times(out("vmsamp0", tcp4("10.8.0.2", "93.184.216.34", 40000, 80, SYN, "vmsamp0"), PASS), 2000),
       // What reaches the VM is always checked (an outsider must not make
       // the VM's answer look like its violation).
       in("vmsamp0", tcp4_to("vmsamp0", "8.8.8.8", "10.8.0.2", 50000, 22, SYN), DROP(VMFENCE_REASON_INGRESS_DENIED)),
       // Anti-spoofing and isolation are not sampled.
       out("vmsamp0", tcp4("10.8.0.3", "93.184.216.34", 40000, 80, SYN, "vmsamp0"), DROP(VMFENCE_REASON_SPOOFED_IP)),
       out("vmsamp0", tcp4("10.8.0.2", "10.3.0.2", 40000, 80, SYN, "vmsamp0"), DROP(VMFENCE_REASON_CROSS_GROUP))});
  add("conntrack_first_packet_checked_then_cached",
      {then_check(out("vmct", tcp4("10.9.0.2", "93.184.216.34", 40000, 443, SYN, "vmct"), PASS, "SYN"),
                  [](World& w, const Step&) { EXPECT_EQ(w.flow_count(), 1u) << "the SYN's flow is cached"; }),
       times(out("vmct", tcp4("10.9.0.2", "93.184.216.34", 40000, 443, ACK, "vmct"), PASS, "cached ACKs"), 100),
       in("vmct", tcp4_to("vmct", "93.184.216.34", "10.9.0.2", 443, 40000, ACK), PASS, "reply"),
       then_check(
           out("vmct", tcp4("10.9.0.2", "93.184.216.34", 40001, 80, SYN, "vmct"), DROP(VMFENCE_REASON_EGRESS_DENIED)),
           [](World& w, const Step&) { EXPECT_EQ(w.flow_count(), 1u) << "a denied flow is not cached"; })});
  add("conntrack_policy_change_rechecks_cached_flow",
      {out("vmct", tcp4("10.9.0.2", "93.184.216.34", 40000, 443, SYN, "vmct"), PASS, "SYN"),
       out("vmct", udp4("10.9.0.2", "203.0.113.7", 40000, 51900, "vmct"), PASS, "udp flow"),
       change("vmct loses its tcp 443 rule",
              [](World& w) {
                ASSERT_TRUE(w.reinstall(R"({ "name": "vmct", "interface": "vft-ct", "mac": "02:00:00:00:09:02",
                  "addresses": ["10.9.0.2/32"], "mode": "conntrack",
                  "egress": [ { "to": "203.0.113.7/32", "proto": "udp", "ports": ["51900"] } ] })"));
              }),
       then_check(out("vmct", tcp4("10.9.0.2", "93.184.216.34", 40000, 443, ACK, "vmct"),
                      DROP(VMFENCE_REASON_EGRESS_DENIED), "cached flow, rule gone"),
                  [](World& w, const Step&) { EXPECT_EQ(w.flow_count(), 1u) << "the cut flow is evicted"; }),
       in("vmct", tcp4_to("vmct", "93.184.216.34", "10.9.0.2", 443, 40000, ACK), DROP(VMFENCE_REASON_INGRESS_DENIED),
          "its reply"),
       out("vmct", udp4("10.9.0.2", "203.0.113.7", 40000, 51900, "vmct"), PASS, "flow whose rule stayed")});
  add("conntrack_policy_change_cuts_inbound_flow",
      {in("vmct", tcp4_to("vmct", "100.64.1.5", "10.9.0.2", 50000, 22, SYN), PASS),
       out("vmct", tcp4("10.9.0.2", "100.64.1.5", 22, 50000, SYN | ACK, "vmct"), PASS),
       change("vmct loses its ingress rule",
              [](World& w) {
                ASSERT_TRUE(w.reinstall(R"({ "name": "vmct", "interface": "vft-ct", "mac": "02:00:00:00:09:02",
                  "addresses": ["10.9.0.2/32"], "mode": "conntrack",
                  "egress": [ { "to": "0.0.0.0/0", "proto": "tcp", "ports": ["443"] } ] })"));
              }),
       in("vmct", tcp4_to("vmct", "100.64.1.5", "10.9.0.2", 50000, 22, ACK), DROP(VMFENCE_REASON_INGRESS_DENIED)),
       out("vmct", tcp4("10.9.0.2", "100.64.1.5", 22, 50000, ACK, "vmct"), DROP(VMFENCE_REASON_EGRESS_DENIED))});
  add("filtered_policy_change_cuts_flow",
      {out("vm1", tcp4("10.1.0.2", "198.51.100.9", 40000, 8000, SYN), PASS),
       change("vm1 loses its 8000-8080 rule",
              [](World& w) {
                ASSERT_TRUE(w.reinstall(R"({ "name": "vm1", "interface": "vft-vm1", "mac": "02:00:00:00:01:02",
                  "addresses": ["10.1.0.2/32", "fec0::1/128"], "group": "a",
                  "egress": [ { "to": "0.0.0.0/0", "proto": "tcp", "ports": ["443"] } ] })"));
              }),
       out("vm1", tcp4("10.1.0.2", "198.51.100.9", 40000, 8000, ACK), DROP(VMFENCE_REASON_EGRESS_DENIED)),
       in("vm1", tcp4_to("vm1", "198.51.100.9", "10.1.0.2", 8000, 40000, ACK), DROP(VMFENCE_REASON_INGRESS_DENIED))});

  // ---- quarantine (on_violation terminate) ----
  add("quarantine_at_first_violation",
      {out("vmquar", tcp4("10.10.0.2", "93.184.216.34", 40000, 443, SYN, "vmquar"), PASS, "allowed before"),
       with_flags(then_check(out("vmquar", tcp4("10.10.0.2", "93.184.216.34", 40001, 80, SYN, "vmquar"),
                                 DROP(VMFENCE_REASON_EGRESS_DENIED), "violation"),
                             [](World& w, const Step&) { expect_state_quarantined(w, "vmquar", true); }),
                  VMFENCE_EVENT_F_TRIGGER | VMFENCE_EVENT_F_QUARANTINED),
       out("vmquar", tcp4("10.10.0.2", "93.184.216.34", 40000, 443, ACK, "vmquar"), DROP(VMFENCE_REASON_QUARANTINED),
           "allowed after"),
       in("vmquar", tcp4_to("vmquar", "93.184.216.34", "10.10.0.2", 443, 40000, ACK), DROP(VMFENCE_REASON_QUARANTINED),
          "reply after"),
       out("vmquar", arp_req("vmquar", mac_of("vmquar"), "10.10.0.2", "10.10.0.1"), DROP(VMFENCE_REASON_QUARANTINED),
           "ARP after")});
  add("quarantine_on_spoofing",
      {with_flags(out("vmquar", tcp4("10.10.0.9", "93.184.216.34", 40000, 443, SYN, "vmquar"),
                      DROP(VMFENCE_REASON_SPOOFED_IP)),
                  VMFENCE_EVENT_F_TRIGGER | VMFENCE_EVENT_F_QUARANTINED),
       out("vmquar", tcp4("10.10.0.2", "93.184.216.34", 40000, 443, SYN, "vmquar"), DROP(VMFENCE_REASON_QUARANTINED))});
  add("quarantine_not_on_inbound_drop",  // the VM did nothing wrong
      {in("vmquar", tcp4_to("vmquar", "8.8.8.8", "10.10.0.2", 50000, 22, SYN), DROP(VMFENCE_REASON_INGRESS_DENIED)),
       out("vmquar", tcp4("10.10.0.2", "93.184.216.34", 40000, 443, SYN, "vmquar"), PASS)});
  add("quarantine_at_threshold",
      {with_flags(
           out("vmquar3", tcp4("10.11.0.2", "1.1.1.1", 40000, 80, SYN, "vmquar3"), DROP(VMFENCE_REASON_EGRESS_DENIED)),
           0),
       with_flags(
           out("vmquar3", tcp4("10.11.0.2", "1.1.1.1", 40001, 80, SYN, "vmquar3"), DROP(VMFENCE_REASON_EGRESS_DENIED)),
           0),
       out("vmquar3", tcp4("10.11.0.2", "1.1.1.1", 40002, 443, SYN, "vmquar3"), PASS, "still allowed"),
       with_flags(
           out("vmquar3", tcp4("10.11.0.2", "1.1.1.1", 40003, 80, SYN, "vmquar3"), DROP(VMFENCE_REASON_EGRESS_DENIED)),
           VMFENCE_EVENT_F_TRIGGER | VMFENCE_EVENT_F_QUARANTINED),
       out("vmquar3", tcp4("10.11.0.2", "1.1.1.1", 40002, 443, ACK, "vmquar3"), DROP(VMFENCE_REASON_QUARANTINED))});
  add("alert_vm_never_quarantined",
      {with_flags(out("vm1", tcp4("10.1.0.2", "1.1.1.1", 40000, 80), DROP(VMFENCE_REASON_EGRESS_DENIED)),
                  VMFENCE_EVENT_F_TRIGGER),
       then_check(out("vm1", tcp4("10.1.0.2", "1.1.1.1", 40000, 443), PASS),
                  [](World& w, const Step&) { expect_state_quarantined(w, "vm1", false); })});

  // ---- a VM whose spec was removed while its interface stays ----
  add("removed_spec_drops_everything",
      {change("remove vm1", [](World& w) { ASSERT_TRUE(w.writer().remove("vm1")); }),
       out("vm1", tcp4("10.1.0.2", "93.184.216.34", 40000, 443), DROP(VMFENCE_REASON_NO_POLICY)),
       in("vm1", tcp4_to("vm1", "100.64.1.5", "10.1.0.2", 50000, 22, SYN), DROP(VMFENCE_REASON_NO_POLICY))});
  return t;
}

// ---- the runner --------------------------------------------------------------

class DatapathTest : public ::testing::TestWithParam<Fixture> {
 protected:
  void SetUp() override {
    VMFENCE_REQUIRE_KERNEL();
    std::vector<std::string> jsons;
    for (const auto& d : world_vms()) jsons.push_back(d.json);
    std::string error;
    world_ = World::create(kHostJson, jsons, error);
    ASSERT_TRUE(world_) << error;
    ASSERT_NE(TestNet::get().tap(kNoVmIface), 0u);
  }
  std::unique_ptr<World> world_;
};

// Does the event carry the frame's addresses? Not when the datapath could
// not parse them, nor for ARP dropped before its ARP header was read.
bool event_has_addresses(const Step& s) {
  if (s.truncated) return false;
  switch (s.expect.reason) {
    case VMFENCE_REASON_MALFORMED:
    case VMFENCE_REASON_BAD_ETHERTYPE:
      return false;
    case VMFENCE_REASON_SPOOFED_MAC:  // checked before the ARP header
    case VMFENCE_REASON_UNKNOWN_IFINDEX:
    case VMFENCE_REASON_QUARANTINED:
    case VMFENCE_REASON_NO_POLICY:
      return !s.frame.info.is_arp;
    default:
      return true;
  }
}

std::string hex16(const std::array<uint8_t, 16>& a) {
  char buf[64];
  std::string out;
  for (uint8_t b : a) {
    std::snprintf(buf, sizeof buf, "%02x", b);
    out += buf;
  }
  return out;
}
std::string hex16(const uint8_t* p) {
  std::array<uint8_t, 16> a;
  std::memcpy(a.data(), p, 16);
  return hex16(a);
}

void run_step(World& w, const Step& s) {
  if (s.action) {
    s.action(w);
    return;
  }
  uint32_t ifindex = s.iface == "lo"   ? 1
                     : s.iface.empty() ? TestNet::get().tap(w.spec(s.vm).interface)
                                       : TestNet::get().tap(s.iface);
  ASSERT_NE(ifindex, 0u);
  // What the datapath sees for this interface (also after a VM was removed).
  std::optional<vmfence_vm> entry = w.vm_entry(ifindex);
  ASSERT_EQ(entry.has_value(), !s.vm.empty()) << "a VM is bound to the interface";
  bool bound = entry.has_value();
  uint32_t slot = bound ? entry->slot : 0;
  vmfence_counters before = w.counters(slot);
  w.take_events();

  vmfence_counters after;
  if (s.via_tap) {
    ASSERT_TRUE(s.from_vm && s.repeat == 1 && bound) << "fixture: wire() is for one from_vm frame of a VM";
    auto st = w.send_via_tap(s.iface.empty() ? w.spec(s.vm).interface : s.iface, s.frame);
    ASSERT_TRUE(st) << st.message;
    for (int i = 0; i < 200; ++i) {  // the hook runs in the write; allow a softirq's delay
      after = w.counters(slot);
      if (after.from_vm_packets != before.from_vm_packets) break;
      usleep(10000);
    }
  } else {
    RunResult r = w.run(s.from_vm, ifindex, s.frame, s.repeat, s.mark);
    ASSERT_EQ(r.err, 0) << "BPF_PROG_TEST_RUN: " << std::strerror(r.err);
    EXPECT_EQ(r.retval, s.expect.pass ? kPass : kDrop)
        << (s.expect.pass ? "expected pass" : std::string("expected drop: ") + reason_name(s.expect.reason));
    after = w.counters(slot);
  }
  const uint64_t n = static_cast<uint64_t>(s.repeat);
  for (int reason = 0; reason < VMFENCE_REASON_COUNT; ++reason) {
    uint64_t want = !s.expect.pass && reason == s.expect.reason ? n : 0;
    EXPECT_EQ(after.drops[reason] - before.drops[reason], want) << "drops[" << reason_name(reason) << "]";
    // The to-VM hook's share (metrics' direction label).
    EXPECT_EQ(after.to_vm_drops[reason] - before.to_vm_drops[reason], s.from_vm ? 0 : want)
        << "to_vm_drops[" << reason_name(reason) << "]";
  }
  if (bound) {
    uint64_t pkts =
        s.from_vm ? after.from_vm_packets - before.from_vm_packets : after.to_vm_packets - before.to_vm_packets;
    uint64_t bytes = s.from_vm ? after.from_vm_bytes - before.from_vm_bytes : after.to_vm_bytes - before.to_vm_bytes;
    EXPECT_EQ(pkts, n) << "packet counter";
    EXPECT_EQ(bytes, n * s.frame.bytes.size()) << "byte counter";
  }

  auto events = w.take_events();
  const bool quiet =
      !s.expect.pass && (s.expect.reason == VMFENCE_REASON_FLOW_LIMIT || s.expect.reason == VMFENCE_REASON_LINK_LOCAL ||
                         s.expect.reason == VMFENCE_REASON_UNASSIGNED_SRC ||
                         s.expect.reason == VMFENCE_REASON_STALE_REPLY || s.expect.reason == VMFENCE_REASON_FRAGMENT);
  if (s.expect.pass || quiet) {
    EXPECT_TRUE(events.empty()) << events.size() << " events for a passed or quiet frame, first: "
                                << reason_name(events.empty() ? 0 : events[0].reason);
  } else if (s.repeat > 1) {
    EXPECT_GE(events.size(), 1u);
    // The event that triggers on_violation is never budgeted.
    EXPECT_LE(events.size(), size_t{VMFENCE_DEFAULT_EVENT_BUDGET} + 1) << "event budget";
    EXPECT_EQ(after.events_suppressed - before.events_suppressed + events.size(), n)
        << "every drop is an event or counted as suppressed";
  } else {
    ASSERT_EQ(events.size(), 1u) << "one event per drop";
  }
  if (s.expect.pass || events.empty()) return;

  const vmfence_event& e = events.front();
  EXPECT_EQ(e.reason, s.expect.reason) << reason_name(e.reason);
  EXPECT_EQ(e.direction, s.from_vm ? VMFENCE_DIR_FROM_VM : VMFENCE_DIR_TO_VM);
  EXPECT_EQ(e.ifindex, ifindex);
  EXPECT_NE(e.timestamp_ns, 0u);
  if (bound) {
    EXPECT_EQ(e.vm_id, name_id(s.vm));
    EXPECT_EQ(e.policy_id, entry->policy_id);
    EXPECT_EQ(e.mode, entry->mode);
  } else {
    EXPECT_EQ(e.vm_id, 0u);
  }
  if (s.event_flags) {
    EXPECT_EQ(e.flags, *s.event_flags) << "event flags";
  }
  const FrameInfo& fi = s.frame.info;
  EXPECT_EQ(e.ethertype, fi.ethertype);
  EXPECT_EQ(0, std::memcmp(e.smac, fi.smac.data(), 6)) << "event smac";
  if (event_has_addresses(s)) {
    EXPECT_EQ(e.family, fi.family);
    EXPECT_EQ(hex16(e.saddr), hex16(fi.saddr)) << "event saddr";
    EXPECT_EQ(hex16(e.daddr), hex16(fi.daddr)) << "event daddr";
    if (!fi.is_arp) {
      EXPECT_EQ(e.proto, fi.proto) << "event proto";
      EXPECT_EQ(e.sport, fi.sport) << "event sport";
      EXPECT_EQ(e.dport, fi.dport) << "event dport";
    }
  }
}

// Every step of a fixture, in order, stopping at the first fatal failure.
void run_fixture(World& w, const Fixture& f) {
  for (size_t i = 0; i < f.steps.size(); ++i) {
    const Step& s = f.steps[i];
    SCOPED_TRACE("step " + std::to_string(i + 1) + ": " + s.what);
    run_step(w, s);
    if (::testing::Test::HasFatalFailure()) return;
    if (s.check) s.check(w, s);
  }
}

TEST_P(DatapathTest, Fixture) { run_fixture(*world_, GetParam()); }

INSTANTIATE_TEST_SUITE_P(Table, DatapathTest, ::testing::ValuesIn(fixtures()),
                         [](const ::testing::TestParamInfo<Fixture>& i) { return i.param.name; });

// The same table with the XDP pre-filter in front of from_vm (host.json
// "xdp_prefilter"): every verdict, reason, counter and event must be the
// same, since the pre-filter may only drop sooner what tcx drops anyway.
class DatapathPrefilterTest : public DatapathTest {
 protected:
  void SetUp() override {
    DatapathTest::SetUp();
    if (world_) world_->set_prefilter(true);
  }
};

TEST_P(DatapathPrefilterTest, Fixture) { run_fixture(*world_, GetParam()); }

INSTANTIATE_TEST_SUITE_P(Table, DatapathPrefilterTest, ::testing::ValuesIn(fixtures()),
                         [](const ::testing::TestParamInfo<Fixture>& i) { return i.param.name; });

// ---- beyond the table ----------------------------------------------------------

class DatapathSampling : public ::testing::Test {
 protected:
  void SetUp() override { VMFENCE_REQUIRE_KERNEL(); }

  // A sampled VM at `rate` with an ingress rule (tcp 22 from 100.64.0.0/10)
  // and no egress rule.
  std::unique_ptr<World> sampled_world(double rate) {
    std::string error;
    auto w = World::create(kHostJson,
                           {R"({ "name": "s", "interface": "vft-samp", "mac": "02:00:00:00:0c:02",
                                 "addresses": ["10.12.0.2/32"], "mode": "sampled", "sample_rate": )" +
                            std::to_string(rate) + R"(,
                                 "ingress": [ { "from": "100.64.0.0/10", "proto": "tcp", "ports": ["22"] } ] })"},
                           error);
    EXPECT_TRUE(w) << error;
    return w;
  }
  static Packet from_s() { return Packet().eth(mac("02:00:00:00:0c:02"), kGwMac); }
  static Packet to_s() { return Packet().eth(kGwMac, mac("02:00:00:00:0c:02")); }
};

// N violating packets of distinct flows are checked (and dropped) about
// rate*N times: binomial, bounds at 6 sigma.
TEST_F(DatapathSampling, DistinctFlowsSampledAtRate) {
  auto w = sampled_world(0.25);
  ASSERT_TRUE(w);
  const int n = 4000;
  uint32_t ifindex = w->vm("s").ifindex;
  for (int i = 0; i < n; ++i) {
    Frame f = from_s().ipv4(ip("10.12.0.2"), ip("1.1.1.1")).udp(static_cast<uint16_t>(10000 + i), 53).build();
    ASSERT_EQ(w->run(true, ifindex, f).err, 0);
  }
  vmfence_counters c = w->counters(w->vm("s").slot);
  EXPECT_EQ(c.from_vm_packets, static_cast<uint64_t>(n));
  double drops = static_cast<double>(c.drops[VMFENCE_REASON_EGRESS_DENIED]);
  EXPECT_NEAR(drops, 0.25 * n, 6 * std::sqrt(n * 0.25 * 0.75)) << "sampled drops out of " << n;
  auto events = w->take_events();
  EXPECT_EQ(c.events_suppressed + events.size(), c.drops[VMFENCE_REASON_EGRESS_DENIED])
      << "events over the budget are counted as suppressed";
}

// The documented detection probability, 1-(1-r)^k for k violating packets,
// must hold for a stream of one flow too (a flood to one port): each packet
// is sampled independently, whether or not an earlier one went unchecked.
TEST_F(DatapathSampling, OneFlowStreamSampledAtRate) {
  auto w = sampled_world(0.25);
  ASSERT_TRUE(w);
  const int n = 20000;
  Frame f = from_s().ipv4(ip("10.12.0.2"), ip("1.1.1.1")).udp(10000, 53).build();
  ASSERT_EQ(w->run(true, w->vm("s").ifindex, f, n).err, 0);
  vmfence_counters c = w->counters(w->vm("s").slot);
  EXPECT_EQ(c.from_vm_packets, static_cast<uint64_t>(n));
  EXPECT_NEAR(static_cast<double>(c.drops[VMFENCE_REASON_EGRESS_DENIED]), 0.25 * n, 6 * std::sqrt(n * 0.25 * 0.75))
      << "violating packets of one flow dropped out of " << n;
}

// Sampling must not turn allowed traffic into violations: a connection a peer
// opens under an ingress rule gets its replies out whichever of its packets
// are sampled (a false violation of a terminate VM kills it).
TEST_F(DatapathSampling, RepliesToAllowedInboundNeverDropped) {
  auto w = sampled_world(0.5);
  ASSERT_TRUE(w);
  uint32_t ifindex = w->vm("s").ifindex;
  const int n = 400;
  for (int i = 0; i < n; ++i) {
    auto port = static_cast<uint16_t>(20000 + i);
    Frame syn = to_s().ipv4(ip("100.64.1.5"), ip("10.12.0.2")).tcp(port, 22, SYN).build();
    Frame synack = from_s().ipv4(ip("10.12.0.2"), ip("100.64.1.5")).tcp(22, port, SYN | ACK).build();
    ASSERT_EQ(w->run(false, ifindex, syn).err, 0);
    ASSERT_EQ(w->run(true, ifindex, synack).err, 0);
  }
  vmfence_counters c = w->counters(w->vm("s").slot);
  EXPECT_EQ(c.to_vm_packets, static_cast<uint64_t>(n));
  EXPECT_EQ(c.from_vm_packets, static_cast<uint64_t>(n));
  EXPECT_EQ(c.drops[VMFENCE_REASON_INGRESS_DENIED], 0u) << "inbound SYNs allowed by the ingress rule";
  EXPECT_EQ(c.drops[VMFENCE_REASON_EGRESS_DENIED], 0u) << "the VM's SYN-ACKs to allowed connections, out of " << n;
}

class DatapathEvents : public ::testing::Test {
 protected:
  void SetUp() override { VMFENCE_REQUIRE_KERNEL(); }
};

// The per-VM event budget: a flood yields VMFENCE_DEFAULT_EVENT_BUDGET events,
// the rest are counted as suppressed, and the drop counters stay exact.
TEST_F(DatapathEvents, BudgetCountsSuppressed) {
  std::string error;
  auto w = World::create(kHostJson, {json_of("vm1")}, error);
  ASSERT_TRUE(w) << error;
  Frame f = F("vm1").ipv4(ip("10.1.0.2"), ip("1.1.1.1")).tcp(1, 80, SYN).build();
  RunResult r = w->run(true, w->vm("vm1").ifindex, f, 1000);
  ASSERT_EQ(r.err, 0);
  EXPECT_EQ(r.retval, kDrop);
  auto events = w->take_events();
  vmfence_counters c = w->counters(w->vm("vm1").slot);
  EXPECT_EQ(c.drops[VMFENCE_REASON_EGRESS_DENIED], 1000u);
  // The first drop triggers on_violation (threshold 1): its event is never
  // budgeted; the next VMFENCE_DEFAULT_EVENT_BUDGET are, the rest suppressed.
  ASSERT_EQ(events.size(), size_t{VMFENCE_DEFAULT_EVENT_BUDGET} + 1);
  EXPECT_EQ(events[0].flags, VMFENCE_EVENT_F_TRIGGER);
  EXPECT_EQ(c.events_suppressed, 1000u - events.size());
  EXPECT_EQ(c.events_lost, 0u);
}

}  // namespace

// What the pre-filter decides on its own: it drops the certain cases (no
// VM policy, quarantine, foreign MAC, spoofed IP in the shapes it parses)
// and leaves everything else, noise included, to tcx. The table above shows
// the verdicts stay the same with it; this shows it is the one dropping.
class Prefilter : public DatapathTest {};

TEST_F(Prefilter, DropsOnlyCertainSpoofingAndQuarantine) {
  World& w = *world_;
  struct Case {
    const char* what;
    std::string vm;
    Frame frame;
    int verdict;
    uint8_t reason;  // counted and reported when dropped
  };
  const std::vector<Case> cases = {
      {"spoofed IPv4 source", "vm1", tcp4("10.1.0.3", "93.184.216.34", 40000, 443).build(), kXdpDrop,
       VMFENCE_REASON_SPOOFED_IP},
      {"spoofed IPv4 source, UDP", "vm1", udp4("10.9.9.9", "203.0.113.7", 4000, 51900).build(), kXdpDrop,
       VMFENCE_REASON_SPOOFED_IP},
      {"spoofed IPv6 source", "vm1", F("vm1").ipv6(ip("fec0::2"), ip("2001:db8::5")).tcp(40000, 443, SYN).build(),
       kXdpDrop, VMFENCE_REASON_SPOOFED_IP},
      {"foreign MAC", "vm1",
       Packet().eth(kOtherMac, kGwMac).ipv4(ip("10.1.0.2"), ip("93.184.216.34")).tcp(40000, 443, SYN).build(), kXdpDrop,
       VMFENCE_REASON_SPOOFED_MAC},
      {"foreign MAC on ARP", "vm1",
       Packet().eth(kOtherMac, kGwMac).arp(1, mac_of("vm1"), ip("10.1.0.2"), Mac{}, ip("10.1.0.1")).build(), kXdpDrop,
       VMFENCE_REASON_SPOOFED_MAC},
      {"own source, denied destination: tcx judges", "vm1", tcp4("10.1.0.2", "1.1.1.1", 40000, 80).build(), kXdpPass,
       0},
      {"own source, allowed", "vm1", tcp4("10.1.0.2", "93.184.216.34", 40000, 443).build(), kXdpPass, 0},
      {"DHCP discover from 0.0.0.0", "vm1", udp4("0.0.0.0", "255.255.255.255", 68, 67).build(), kXdpPass, 0},
      {"spoofed source with IPv4 options: tcx judges", "vm1",
       F("vm1")
           .ipv4(ip("10.9.9.9"), ip("93.184.216.34"), ip4_options({0x94, 0x04, 0x00, 0x00}))
           .tcp(40000, 443, SYN)
           .build(),
       kXdpPass, 0},
      {"ND from link-local: tcx judges", "vm1",
       F("vm1")
           .ipv6(ip("fe80::1"), solicited_node("fec0::ffff"), 255)
           .ns(ip("fec0::ffff"))
           .lla(1, mac_of("vm1"))
           .build(),
       kXdpPass, 0},
      {"ARP from the VM", "vm1", F("vm1").arp(1, mac_of("vm1"), ip("10.1.0.2"), Mac{}, ip("10.1.0.1")).build(),
       kXdpPass, 0},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    uint32_t ifindex = TestNet::get().tap(w.spec(c.vm).interface);
    uint32_t slot = w.vm(c.vm).slot;
    vmfence_counters before = w.counters(slot);
    w.take_events();
    RunResult r = test_run_xdp(w.dp().xdp_prog_fd(), ifindex, c.frame.bytes);
    ASSERT_EQ(r.err, 0) << std::strerror(r.err);
    EXPECT_EQ(r.retval, c.verdict);
    vmfence_counters after = w.counters(slot);
    auto events = w.take_events();
    if (c.verdict == kXdpPass) {
      EXPECT_EQ(after.from_vm_packets, before.from_vm_packets) << "passed frames are counted at tcx";
      EXPECT_TRUE(events.empty());
      continue;
    }
    EXPECT_EQ(after.drops[c.reason] - before.drops[c.reason], 1u) << reason_name(c.reason);
    EXPECT_EQ(after.from_vm_packets - before.from_vm_packets, 1u);
    EXPECT_EQ(after.from_vm_bytes - before.from_vm_bytes, c.frame.bytes.size());
    ASSERT_EQ(events.size(), 1u);
    EXPECT_EQ(events[0].reason, c.reason);
    EXPECT_EQ(events[0].ifindex, ifindex);
    EXPECT_EQ(events[0].direction, VMFENCE_DIR_FROM_VM);
    EXPECT_EQ(events[0].vm_id, name_id(c.vm));
  }

  // An interface without a VM: tcx drops and reports it (unknown_ifindex).
  RunResult r = test_run_xdp(w.dp().xdp_prog_fd(), TestNet::get().tap(kNoVmIface),
                             tcp4("10.1.0.2", "93.184.216.34", 40000, 443).build().bytes);
  ASSERT_EQ(r.err, 0);
  EXPECT_EQ(r.retval, kXdpPass);

  // A quarantined VM: everything from it, its own clean traffic included.
  Frame spoof = tcp4("10.10.0.9", "93.184.216.34", 40000, 443, SYN, "vmquar").build();
  Frame clean = tcp4("10.10.0.2", "93.184.216.34", 40000, 443, SYN, "vmquar").build();
  uint32_t quar = TestNet::get().tap(w.spec("vmquar").interface);
  ASSERT_EQ(test_run_xdp(w.dp().xdp_prog_fd(), quar, clean.bytes).retval, kXdpPass);
  ASSERT_EQ(test_run_xdp(w.dp().xdp_prog_fd(), quar, spoof.bytes).retval, kXdpDrop);
  EXPECT_EQ(w.state(w.vm("vmquar").slot).quarantined, 1u) << "a spoofing drop at XDP counts toward on_violation";
  vmfence_counters before = w.counters(w.vm("vmquar").slot);
  EXPECT_EQ(test_run_xdp(w.dp().xdp_prog_fd(), quar, clean.bytes).retval, kXdpDrop);
  EXPECT_EQ(
      w.counters(w.vm("vmquar").slot).drops[VMFENCE_REASON_QUARANTINED] - before.drops[VMFENCE_REASON_QUARANTINED], 1u);
}

// The pre-filter attached to a real TAP: a frame written the way QEMU writes
// (non-blocking, send buffer INT_MAX: XDP runs before an skb exists) is
// dropped at XDP, and tcx never sees it.
TEST_F(Prefilter, OnARealTapDropsBeforeTcx) {
  World& w = *world_;
  const std::string iface = w.spec("vm1").interface;
  uint32_t ifindex = TestNet::get().tap(iface);
  ASSERT_TRUE(w.dp().attach(ifindex));
  ASSERT_TRUE(w.dp().attach_xdp(ifindex));
  EXPECT_TRUE(w.dp().xdp_attached(ifindex));
  ASSERT_TRUE(w.dp().attach_xdp(ifindex)) << "attaching again keeps the link";

  Fd tap(::open("/dev/net/tun", O_RDWR | O_CLOEXEC | O_NONBLOCK));
  ASSERT_TRUE(tap.valid());
  ifreq ifr{};
  std::strncpy(ifr.ifr_name, iface.c_str(), IFNAMSIZ - 1);
  ifr.ifr_flags = IFF_TAP | IFF_NO_PI;
  ASSERT_EQ(::ioctl(tap.get(), TUNSETIFF, &ifr), 0) << std::strerror(errno);
  int sndbuf = INT_MAX;
  ASSERT_EQ(::ioctl(tap.get(), TUNSETSNDBUF, &sndbuf), 0);
  std::ofstream("/proc/sys/net/ipv6/conf/" + iface + "/disable_ipv6") << "1\n";
  ASSERT_EQ(std::system(("ip link set dev " + iface + " up").c_str()), 0);

  // tcx's own count of the frames it ran on: the run count of its program.
  auto tcx_runs = [&] {
    bpf_prog_info info{};
    uint32_t len = sizeof(info);
    bpf_obj_get_info_by_fd(w.dp().from_vm_prog_fd(), &info, &len);
    return info.run_cnt;
  };
  std::ifstream stats_in("/proc/sys/kernel/bpf_stats_enabled");
  std::string stats_was;
  stats_in >> stats_was;
  std::ofstream("/proc/sys/kernel/bpf_stats_enabled") << "1\n";

  uint32_t slot = w.vm("vm1").slot;
  auto send = [&](const Frame& f) {
    vmfence_counters before = w.counters(slot);
    EXPECT_EQ(::write(tap.get(), f.bytes.data(), f.bytes.size()), static_cast<ssize_t>(f.bytes.size()));
    for (int i = 0; i < 200 && w.counters(slot).from_vm_packets == before.from_vm_packets; ++i) usleep(10000);
    return before;
  };
  uint64_t runs0 = tcx_runs();
  vmfence_counters before = send(tcp4("10.1.0.3", "93.184.216.34", 40000, 443).build());
  vmfence_counters after = w.counters(slot);
  EXPECT_EQ(after.drops[VMFENCE_REASON_SPOOFED_IP] - before.drops[VMFENCE_REASON_SPOOFED_IP], 1u);
  EXPECT_EQ(tcx_runs(), runs0) << "dropped at XDP: tcx never ran";

  // Control: the VM's own frame passes XDP and meets tcx.
  send(tcp4("10.1.0.2", "93.184.216.34", 40000, 443).build());
  for (int i = 0; i < 100 && tcx_runs() == runs0; ++i) usleep(10000);
  EXPECT_GT(tcx_runs(), runs0) << "a clean frame goes on to tcx";
  std::ofstream("/proc/sys/kernel/bpf_stats_enabled") << (stats_was.empty() ? "0" : stats_was) << "\n";

  Datapath::detach_xdp(w.dir(), ifindex);
  EXPECT_FALSE(w.dp().xdp_attached(ifindex));
  EXPECT_FALSE(std::filesystem::exists(Datapath::xdp_path(w.dir(), ifindex)));
}

// Rate limits (README "Rate limits"): policed from the VM, paced to it.
class DatapathRateLimits : public ::testing::Test {
 protected:
  void SetUp() override { VMFENCE_REQUIRE_KERNEL(); }
  static std::unique_ptr<World> world(const std::string& limits) {
    std::string error;
    auto w = World::create(kHostJson,
                           {R"({ "name": "rl", "interface": "vft-rl", "mac": "02:00:00:00:0d:02",
                                 "addresses": ["10.13.0.2/32"], "on_violation": { "action": "terminate" },
                                 "egress": [ { "to": "0.0.0.0/0", "proto": "udp" } ],
                                 "ingress": [ { "from": "0.0.0.0/0", "proto": "udp" } ],
                                 "limits": )" +
                            limits + "}"},
                           error);
    EXPECT_TRUE(w) << error;
    return w;
  }
  static Frame from_rl(int size = 0) {
    return Packet()
        .eth(mac("02:00:00:00:0d:02"), kGwMac)
        .ipv4(ip("10.13.0.2"), ip("1.1.1.1"))
        .udp(4000, 53)
        .payload(size)
        .build();
  }
  static Frame to_rl(int size = 0) {
    return Packet()
        .eth(kGwMac, mac("02:00:00:00:0d:02"))
        .ipv4(ip("1.1.1.1"), ip("10.13.0.2"))
        .udp(53, 4000)
        .payload(size)
        .build();
  }
};

// 1000 pps from the VM: a burst of 200 back-to-back packets gets the
// bucket's 32 (10 ms of the rate, at least 32 packets) and the rest are
// dropped as rate_limited: counted, no event, never a violation.
TEST_F(DatapathRateLimits, EgressPpsPolicesQuietly) {
  auto w = world(R"({ "egress_pps": 1000 })");
  ASSERT_TRUE(w);
  uint32_t slot = w->vm("rl").slot, ifindex = w->vm("rl").ifindex;
  int passed = 0;
  for (int i = 0; i < 200; ++i) passed += w->run(true, ifindex, from_rl()).retval == kPass;
  vmfence_counters c = w->counters(slot);
  EXPECT_GE(passed, 32);
  EXPECT_LE(passed, 40) << "200 packets within a few ms of each other";
  EXPECT_EQ(c.drops[VMFENCE_REASON_RATE_LIMITED], uint64_t(200 - passed));
  EXPECT_TRUE(w->take_events().empty()) << "rate_limited is quiet";
  EXPECT_EQ(w->state(slot).quarantined, 0u) << "never a violation, though the VM's action is terminate";
  EXPECT_EQ(w->state(slot).violations, 0u);
  // Traffic to the VM is not limited by its egress limit.
  for (int i = 0; i < 100; ++i) ASSERT_EQ(w->run(false, ifindex, to_rl()).retval, kPass);
  // The bucket refills at the rate, up to its depth: after 50 ms idle it is
  // full again (32), after 10 ms it holds about 10.
  usleep(50000);
  int later = 0;
  for (int i = 0; i < 200; ++i) later += w->run(true, ifindex, from_rl()).retval == kPass;
  EXPECT_GE(later, 32);
  EXPECT_LE(later, 40);
  usleep(10000);
  int refill = 0;
  for (int i = 0; i < 200; ++i) refill += w->run(true, ifindex, from_rl()).retval == kPass;
  EXPECT_GE(refill, 9);
  EXPECT_LE(refill, 20) << "10 ms at 1000 pps, plus the time the runs take";
}

// 1 Mbit/s from the VM (125 bytes per ms, burst 512 KB by default at this
// rate): bytes, not packets, run the bucket dry.
TEST_F(DatapathRateLimits, EgressMbitPolicesBytes) {
  auto w = world(R"({ "egress_mbit": 1, "burst_kb": 64 })");
  ASSERT_TRUE(w);
  uint32_t ifindex = w->vm("rl").ifindex;
  Frame big = from_rl(1000);  // 1028 IP bytes
  int passed = 0;
  for (int i = 0; i < 200; ++i) passed += w->run(true, ifindex, big).retval == kPass;
  // 64 KB of burst: 63-64 packets of 1028 bytes.
  EXPECT_GE(passed, 62);
  EXPECT_LE(passed, 66);
  EXPECT_EQ(w->counters(w->vm("rl").slot).drops[VMFENCE_REASON_RATE_LIMITED], uint64_t(200 - passed));
}

// 8 Mbit/s to the VM: each packet leaves 1 us per IP byte after the one
// before (EDT stamp for the TAP's fq), and beyond the drop horizon (the
// burst) packets are dropped as rate_limited.
TEST_F(DatapathRateLimits, IngressMbitPacesWithDepartureTimes) {
  auto w = world(R"({ "ingress_mbit": 8, "burst_kb": 16 })");
  ASSERT_TRUE(w);
  uint32_t ifindex = w->vm("rl").ifindex;
  Frame f = to_rl(972);  // 1000 IP bytes: 1 ms at 8 Mbit/s
  std::vector<uint64_t> stamps;
  int dropped = 0;
  for (int i = 0; i < 40; ++i) {
    __sk_buff ctx{}, out{};
    ctx.ifindex = ifindex;
    bpf_test_run_opts o{};
    o.sz = sizeof(o);
    o.data_in = f.bytes.data();
    o.data_size_in = static_cast<uint32_t>(f.bytes.size());
    o.ctx_in = &ctx;
    o.ctx_size_in = sizeof(ctx);
    o.ctx_out = &out;
    o.ctx_size_out = sizeof(out);
    o.repeat = 1;
    ASSERT_EQ(bpf_prog_test_run_opts(w->dp().to_vm_prog_fd(), &o), 0) << std::strerror(errno);
    if (static_cast<int>(o.retval) == kDrop)
      ++dropped;
    else
      stamps.push_back(out.tstamp);
  }
  ASSERT_GE(stamps.size(), 16u);
  for (size_t i = 1; i < stamps.size(); ++i)
    EXPECT_EQ(stamps[i] - stamps[i - 1], 1000000u) << "packet " << i << ": 1000 bytes = 1 ms apart";
  // The horizon: 16 KB at 8 Mbit/s = 16.4 ms ahead of now; 16-18 packets fit.
  EXPECT_LE(stamps.size(), 19u);
  EXPECT_EQ(w->counters(w->vm("rl").slot).drops[VMFENCE_REASON_RATE_LIMITED], uint64_t(dropped));
  EXPECT_EQ(w->counters(w->vm("rl").slot).to_vm_drops[VMFENCE_REASON_RATE_LIMITED], uint64_t(dropped));
}

// A VM without limits pays one flag test: no stamp, no drop.
TEST_F(DatapathRateLimits, NoLimitsNoEffect) {
  auto w = world(R"({ "flows": 1024 })");
  ASSERT_TRUE(w);
  uint32_t ifindex = w->vm("rl").ifindex;
  ASSERT_FALSE(w->vm_entry(ifindex)->flags & VMFENCE_VM_F_RATE_LIMITED);
  for (int i = 0; i < 500; ++i) ASSERT_EQ(w->run(true, ifindex, from_rl()).retval, kPass);
  EXPECT_EQ(w->counters(w->vm("rl").slot).drops[VMFENCE_REASON_RATE_LIMITED], 0u);
}

// A guest's GSO frame counts as its segments (a TAP leaves gso_segs 0 and
// the guest picks gso_size): 1400 bytes of payload at gso_size 100 are 15
// packets, so the 32-packet bucket passes 3 such frames, not 33.
TEST_F(DatapathRateLimits, GsoFramesCountAsTheirSegments) {
  auto w = world(R"({ "egress_pps": 1000 })");
  ASSERT_TRUE(w);
  uint32_t ifindex = w->vm("rl").ifindex;
  Frame f = from_rl(1400);
  int passed = 0;
  for (int i = 0; i < 20; ++i) {
    __sk_buff ctx{};
    ctx.ifindex = ifindex;
    ctx.gso_size = 100;
    ctx.gso_segs = 0;
    bpf_test_run_opts o{};
    o.sz = sizeof(o);
    o.data_in = f.bytes.data();
    o.data_size_in = static_cast<uint32_t>(f.bytes.size());
    o.ctx_in = &ctx;
    o.ctx_size_in = sizeof(ctx);
    o.repeat = 1;
    ASSERT_EQ(bpf_prog_test_run_opts(w->dp().from_vm_prog_fd(), &o), 0) << std::strerror(errno);
    passed += static_cast<int>(o.retval) == kPass;
  }
  EXPECT_GE(passed, 2);
  EXPECT_LE(passed, 4) << "each frame is 15 packets of the 1000 pps limit";
}

// Fleet (README "Fleet"): remote VMs in the owner maps, flagged REMOTE, and
// the fleet interfaces in the config. Each hostile packet is first shown
// passing without the fleet's entries (the same world before set_remote),
// then dropped with them.
class DatapathFleet : public ::testing::Test {
 protected:
  static constexpr uint32_t kUnderlay = 4242;  // fleet.interfaces' ifindex (skb_iif only)
  static constexpr uint32_t kWan = 4243;
  void SetUp() override {
    VMFENCE_REQUIRE_KERNEL();
    std::string error;
    // a1 may send anything anywhere and take anything in: only the group
    // can stop it (the bypass a fleet must not open).
    w_ = World::create(kHostJson, {R"({ "name": "a1", "interface": "vft-a1", "mac": "02:00:00:00:0a:01",
                             "addresses": ["10.1.0.2/32"], "group": "tenant-a",
                             "egress": [ { "to": "0.0.0.0/0", "proto": "any" } ],
                             "ingress": [ { "from": "0.0.0.0/0", "proto": "any" } ] })"},
                       error);
    ASSERT_TRUE(w_) << error;
    ifindex_ = w_->vm("a1").ifindex;
    slot_ = w_->vm("a1").slot;
  }
  void join_fleet() {
    a2_ = {"hv2", "a2", "tenant-a", {*parse_cidr("10.2.0.2/32")}, 10, 0};
    b2_ = {"hv2", "b2", "tenant-b", {*parse_cidr("10.2.0.3/32"), *parse_cidr("10.2.8.0/24")}, 11, 0};
    ASSERT_TRUE(w_->writer().set_remote(fleet::remote_owners({&a2_, &b2_})).ok());
    vmfence_config cfg{};
    cfg.event_budget = VMFENCE_DEFAULT_EVENT_BUDGET;
    cfg.budget_window_ns = VMFENCE_DEFAULT_BUDGET_WINDOW_NS;
    cfg.flags = VMFENCE_CFG_F_FLEET | VMFENCE_CFG_F_OWNER_NETS;
    cfg.fleet_ifaces = 1;
    cfg.fleet_ifindex[0] = kUnderlay;
    ASSERT_TRUE(w_->writer().write_config(cfg).ok());
  }
  static Frame from_a1(const char* src, const char* dst) {
    return Packet().eth(mac("02:00:00:00:0a:01"), kGwMac).ipv4(ip(src), ip(dst)).tcp(40000, 22, SYN).build();
  }
  static Frame to_a1(const char* src) {
    return Packet().eth(kGwMac, mac("02:00:00:00:0a:01")).ipv4(ip(src), ip("10.1.0.2")).tcp(40000, 22, SYN).build();
  }
  int from(const Frame& f) { return w_->run(true, ifindex_, f).retval; }
  int to(const Frame& f, uint32_t arrived_on) {
    return test_run(w_->dp().to_vm_prog_fd(), ifindex_, f.bytes, 1, 0, arrived_on).retval;
  }
  uint64_t drops(uint8_t reason) { return w_->counters(slot_).drops[reason]; }

  std::unique_ptr<World> w_;
  uint32_t ifindex_ = 0, slot_ = 0;
  fleet::Record a2_, b2_;
};

TEST_F(DatapathFleet, AnotherTenantsRemoteVmIsCrossGroupWhateverTheRules) {
  // Without the fleet: a1's egress 0.0.0.0/0 lets it reach hv2's VMs.
  EXPECT_EQ(from(from_a1("10.1.0.2", "10.2.0.3")), kPass);
  EXPECT_EQ(from(from_a1("10.1.0.2", "10.2.8.77")), kPass);
  join_fleet();
  EXPECT_EQ(from(from_a1("10.1.0.2", "10.2.0.3")), kDrop);
  EXPECT_EQ(from(from_a1("10.1.0.2", "10.2.8.77")), kDrop) << "a remote VM's prefix";
  EXPECT_EQ(drops(VMFENCE_REASON_CROSS_GROUP), 2u);
  EXPECT_EQ(from(from_a1("10.1.0.2", "10.2.0.2")), kPass) << "its own tenant on the other host";
  EXPECT_EQ(from(from_a1("10.1.0.2", "93.184.216.34")), kPass) << "the outside still by its rules";
}

TEST_F(DatapathFleet, ARemoteAddressIsBelievedOnlyFromTheUnderlay) {
  // Without the fleet: a1's ingress 0.0.0.0/0 takes a2's address from anywhere.
  EXPECT_EQ(to(to_a1("10.2.0.2"), kWan), kPass);
  join_fleet();
  EXPECT_EQ(to(to_a1("10.2.0.2"), kUnderlay), kPass) << "a2, same tenant, from the underlay";
  EXPECT_EQ(to(to_a1("10.2.0.2"), kWan), kDrop) << "a2's address from the WAN";
  EXPECT_EQ(to(to_a1("10.2.0.2"), 0), kDrop) << "a2's address from the host itself";
  EXPECT_EQ(drops(VMFENCE_REASON_SPOOFED_IP), 2u);
  EXPECT_EQ(to(to_a1("10.2.0.3"), kUnderlay), kDrop) << "b2, another tenant, from the underlay";
  EXPECT_EQ(drops(VMFENCE_REASON_CROSS_GROUP), 1u);
  EXPECT_EQ(to(to_a1("198.51.100.7"), kUnderlay), kPass) << "no VM's address: a1's ingress rules";
}

TEST_F(DatapathFleet, AGuestCannotClaimARemoteVmsAddress) {
  join_fleet();
  // a1's own TAP, a2's address: the remote entry is never a1's.
  EXPECT_EQ(from(from_a1("10.2.0.2", "93.184.216.34")), kDrop);
  EXPECT_EQ(drops(VMFENCE_REASON_SPOOFED_IP), 1u);
  ASSERT_FALSE(w_->take_events().empty()) << "a violation, reported";
}

TEST_F(DatapathFleet, TheUnderlayCannotClaimALocalVmsAddress) {
  std::string error;
  auto w = World::create(kHostJson,
                         {R"({ "name": "a1", "interface": "vft-a1", "mac": "02:00:00:00:0a:01",
                               "addresses": ["10.1.0.2/32"], "group": "tenant-a",
                               "ingress": [ { "from": "0.0.0.0/0", "proto": "any" } ] })",
                          R"({ "name": "a3", "interface": "vft-a3", "mac": "02:00:00:00:0a:03",
                               "addresses": ["10.1.0.3/32"], "group": "tenant-a" })"},
                         error);
  ASSERT_TRUE(w) << error;
  // a3's address arriving on the underlay, toward a1 (a3's own packets carry
  // the mark a3's TAP sets; this one does not).
  Frame f =
      Packet().eth(kGwMac, mac("02:00:00:00:0a:01")).ipv4(ip("10.1.0.3"), ip("10.1.0.2")).tcp(40000, 22, SYN).build();
  uint32_t a1 = w->vm("a1").ifindex;
  EXPECT_EQ(test_run(w->dp().to_vm_prog_fd(), a1, f.bytes, 1, 0, kUnderlay).retval, kDrop);
  EXPECT_EQ(w->counters(w->vm("a1").slot).drops[VMFENCE_REASON_SPOOFED_IP], 1u);
  EXPECT_EQ(test_run(w->dp().to_vm_prog_fd(), a1, f.bytes, 1, VMFENCE_MARK_FROM_VM, w->vm("a3").ifindex).retval, kPass)
      << "control: the same packet as a3's TAP passed it";
  // ... but not when a guest's packet was decapsulated off the underlay
  // with a3's source (the mark survives a decap in the same netns).
  vmfence_config cfg{};
  cfg.event_budget = VMFENCE_DEFAULT_EVENT_BUDGET;
  cfg.flags = VMFENCE_CFG_F_FLEET;
  cfg.fleet_ifaces = 1;
  cfg.fleet_ifindex[0] = kUnderlay;
  ASSERT_TRUE(w->writer().write_config(cfg).ok());
  EXPECT_EQ(test_run(w->dp().to_vm_prog_fd(), a1, f.bytes, 1, VMFENCE_MARK_FROM_VM, kUnderlay).retval, kDrop);
}

// A guest that reaches a tunnel endpoint on its own host (VXLAN on the
// underlay) gets its inner packet decapsulated there with its TAP's mark
// still on it (same netns): arriving on the underlay does not make it a
// remote VM's, nor a local VM's.
TEST_F(DatapathFleet, ALocalGuestsDecapsulatedPacketIsNoRemoteVmsNorALocalOnes) {
  join_fleet();
  EXPECT_EQ(to(to_a1("10.2.0.2"), kUnderlay), kPass) << "control: off the wire";
  EXPECT_EQ(
      test_run(w_->dp().to_vm_prog_fd(), ifindex_, to_a1("10.2.0.2").bytes, 1, VMFENCE_MARK_FROM_VM, kUnderlay).retval,
      kDrop);
  EXPECT_EQ(drops(VMFENCE_REASON_SPOOFED_IP), 1u);
}

TEST_F(DatapathFleet, RemoteEntriesGoWithTheViewAndNeverTakeALocalVmsAddress) {
  join_fleet();
  // A remote record claiming a1's own address (a conflict admission lost for
  // hv2): the local entry stays a1's.
  fleet::Record evil{"hv3", "evil", "tenant-b", {*parse_cidr("10.1.0.2/32")}, 1, 0};
  ASSERT_TRUE(w_->writer().set_remote(fleet::remote_owners({&a2_, &b2_, &evil})).ok());
  EXPECT_EQ(from(from_a1("10.1.0.2", "93.184.216.34")), kPass) << "a1 still owns its address";
  // The view empties (leases expired): hv2's addresses are the outside again.
  ASSERT_TRUE(w_->writer().set_remote({}).ok());
  EXPECT_EQ(from(from_a1("10.1.0.2", "10.2.0.3")), kPass);
  EXPECT_TRUE(w_->writer().remote().hosts.empty());
  EXPECT_EQ(from(from_a1("10.1.0.2", "93.184.216.34")), kPass) << "and a1 kept its own";
}
