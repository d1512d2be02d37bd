// Spec -> map entries: the compiler's folding of covering prefixes, barriers
// (IPv4 under an IPv6 ::/0, IMDS), port merging and limits.
#include "maps/compiler.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>

#include <cstring>

#include "agent/spec/spec.h"

namespace vmfence {
namespace {

VmSpec vm_from(const std::string& json, std::vector<SpecError>* errs = nullptr) {
  std::vector<SpecError> e;
  auto vm = parse_vm("vm.json", json, ViolationPolicy{}, e);
  EXPECT_TRUE(e.empty()) << (e.empty() ? "" : e[0].str());
  if (errs) *errs = e;
  return *vm;
}

HostSpec host_with_imds() {
  std::vector<SpecError> e;
  return parse_host("host.json", R"({"imds": {"address": "169.254.169.254", "port": 80}})", e);
}

const PolicyEntry* find(const std::vector<PolicyEntry>& es, const std::string& cidr) {
  auto c = parse_cidr(cidr);
  auto addr = masked_addr(*c);
  for (const auto& e : es)
    if (e.key.prefixlen == c->mapped_prefix_len() && std::memcmp(e.key.addr, addr.data(), 16) == 0) return &e;
  return nullptr;
}

const char* kBase = R"("name": "vm1", "interface": "tap1", "mac": "02:00:00:00:01:02",
                       "addresses": ["10.1.0.2/32", "fec0::1/128"], "gateway": ["10.1.0.1"])";

TEST(Compiler, VmEntryCarriesIdentityModeAndInlineAddresses) {
  std::vector<SpecError> errs;
  VmSpec vm = vm_from(std::string("{") + kBase + R"(, "group": "g", "mode": "sampled", "sample_rate": 0.5})");
  VmPlan p = compile_vm(vm, HostSpec{}, {}, errs);
  EXPECT_EQ(p.vm.vm_id, name_id("vm1"));
  EXPECT_EQ(p.vm.group_id, name_id("g"));
  EXPECT_EQ(p.vm.mode, VMFENCE_MODE_SAMPLED);
  EXPECT_EQ(p.vm.sample_threshold, 0x80000000u);
  EXPECT_EQ(p.vm.v4_plen, 32);
  EXPECT_EQ(p.vm.v6_plen, 128);
  uint32_t v4;
  std::memcpy(&v4, p.vm.v4_addr, 4);
  EXPECT_EQ(v4, inet_addr("10.1.0.2"));
  // Its EUI-64 link-local is registered as its own (beyond the inline pair).
  EXPECT_TRUE(p.vm.flags & VMFENCE_VM_F_MORE_ADDRS);
  ASSERT_EQ(p.host_addresses.size(), 3u);
  const vmfence_addr ll = eui64_link_local(vm.mac);
  EXPECT_EQ(std::memcmp(&p.host_addresses.back(), &ll, sizeof(ll)), 0);
  ASSERT_EQ(p.gateways.size(), 1u);
  EXPECT_EQ(p.gateways[0].vm_id, p.vm.vm_id);
}

TEST(Compiler, MoreSpecificPrefixInheritsCoveringRules) {
  std::vector<SpecError> errs;
  VmSpec vm = vm_from(std::string("{") + kBase + R"(, "egress": [
      {"to": "0.0.0.0/0", "proto": "tcp", "ports": ["443"]},
      {"to": "203.0.113.7/32", "proto": "udp", "ports": ["51900"]}]})");
  VmPlan p = compile_vm(vm, HostSpec{}, {}, errs);
  ASSERT_TRUE(errs.empty());
  const PolicyEntry* host = find(p.egress, "203.0.113.7/32");
  ASSERT_NE(host, nullptr);
  ASSERT_EQ(host->value.count, 2);  // its own udp 51900 and the inherited tcp 443
  const PolicyEntry* all = find(p.egress, "0.0.0.0/0");
  ASSERT_NE(all, nullptr);
  EXPECT_EQ(all->value.count, 1);
  EXPECT_EQ(all->value.rules[0].proto, 6);
  EXPECT_EQ(all->value.rules[0].port_lo, 443);
}

TEST(Compiler, Ipv6DefaultRouteDoesNotCoverIpv4) {
  std::vector<SpecError> errs;
  VmSpec vm = vm_from(std::string("{") + kBase + R"(, "egress": [{"to": "::/0", "proto": "tcp"}]})");
  VmPlan p = compile_vm(vm, HostSpec{}, {}, errs);
  const PolicyEntry* v4root = find(p.egress, "0.0.0.0/0");
  ASSERT_NE(v4root, nullptr) << "a barrier entry must fence off the IPv4-mapped space";
  EXPECT_EQ(v4root->value.count, 0);
}

TEST(Compiler, ImdsIsFencedFromBroadRules) {
  std::vector<SpecError> errs;
  HostSpec host = host_with_imds();
  VmSpec denied = vm_from(std::string("{") + kBase + R"(, "egress": [{"to": "0.0.0.0/0", "proto": "tcp"}]})");
  VmPlan p = compile_vm(denied, host, {}, errs);
  const PolicyEntry* imds = find(p.egress, "169.254.169.254/32");
  ASSERT_NE(imds, nullptr);
  EXPECT_EQ(imds->value.count, 0);
  EXPECT_TRUE(imds->value.flags & VMFENCE_POLICY_F_IMDS);

  VmSpec allowed = vm_from(std::string("{") + kBase + R"(, "imds": true})");
  VmPlan q = compile_vm(allowed, host, {}, errs);
  imds = find(q.egress, "169.254.169.254/32");
  ASSERT_NE(imds, nullptr);
  ASSERT_EQ(imds->value.count, 1);
  EXPECT_EQ(imds->value.rules[0].proto, 6);
  EXPECT_EQ(imds->value.rules[0].port_lo, 80);
  EXPECT_EQ(imds->value.rules[0].port_hi, 80);
}

TEST(Compiler, OverlappingPortRangesMerge) {
  std::vector<SpecError> errs;
  VmSpec vm = vm_from(std::string("{") + kBase + R"(, "egress": [
      {"to": "10.9.0.0/16", "proto": "tcp", "ports": ["80-90", "85-100", "101"]},
      {"to": "10.9.0.0/16", "proto": "any"}]})");
  VmPlan p = compile_vm(vm, HostSpec{}, {}, errs);
  const PolicyEntry* e = find(p.egress, "10.9.0.0/16");
  ASSERT_NE(e, nullptr);
  ASSERT_EQ(e->value.count, 1);  // "any" covers every tcp range
  EXPECT_EQ(e->value.rules[0].proto, VMFENCE_PROTO_ANY);
}

TEST(Compiler, TooManyPortRulesForOnePrefixIsAnError) {
  std::string rules;
  for (int i = 0; i < VMFENCE_MAX_PORT_RULES + 1; ++i)
    rules += std::string(i ? "," : "") + "\"" + std::to_string(1000 + 2 * i) + "\"";
  std::vector<SpecError> errs;
  VmSpec vm = vm_from(std::string("{") + kBase + R"(, "egress": [{"to": "0.0.0.0/0", "proto": "tcp", "ports": [)" +
                      rules + "]}]}");
  compile_vm(vm, HostSpec{}, {}, errs);
  ASSERT_EQ(errs.size(), 1u);
  EXPECT_EQ(errs[0].file, "vm.json");
  EXPECT_EQ(errs[0].path, "egress");
  EXPECT_NE(errs[0].message.find("at most 16"), std::string::npos);
}

TEST(Compiler, PrefixAddressesGoToTheOwnerTrie) {
  std::vector<SpecError> errs;
  VmSpec vm = vm_from(R"({"name": "r", "interface": "tap9", "mac": "02:00:00:00:09:02",
                          "addresses": ["10.9.0.2/32", "10.9.1.0/28", "fec0::9/128"]})");
  VmPlan p = compile_vm(vm, HostSpec{}, {}, errs);
  EXPECT_TRUE(p.vm.flags & VMFENCE_VM_F_MORE_ADDRS);
  ASSERT_EQ(p.net_addresses.size(), 1u);
  EXPECT_EQ(p.net_addresses[0].prefixlen, 96u + 28);
  EXPECT_EQ(p.host_addresses.size(), 3u);  // + the EUI-64 link-local
}

TEST(Compiler, Eui64LinkLocalOfMac) {
  // 02:00:00:00:02:02 -> fe80::ff:fe00:202 (U/L bit flipped, ff:fe inserted).
  vmfence_addr a = eui64_link_local({0x02, 0x00, 0x00, 0x00, 0x02, 0x02});
  const uint8_t want[16] = {0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0x00, 0x00, 0x00, 0xff, 0xfe, 0x00, 0x02, 0x02};
  EXPECT_EQ(std::memcmp(a.addr, want, 16), 0);
  vmfence_addr b = eui64_link_local({0x52, 0x54, 0x00, 0x12, 0x34, 0x56});
  EXPECT_EQ(b.addr[8], 0x50);
}

TEST(Compiler, FlowLimitComesFromTheSpec) {
  std::vector<SpecError> errs;
  VmSpec vm = vm_from(std::string("{") + kBase + R"(, "limits": {"flows": 4096}})");
  EXPECT_EQ(compile_vm(vm, HostSpec{}, {}, errs).flow_limit, 4096u);
  VmSpec dflt = vm_from(std::string("{") + kBase + "}");
  EXPECT_EQ(compile_vm(dflt, HostSpec{}, {}, errs).flow_limit, uint32_t{VMFENCE_DEFAULT_FLOWS});
}

TEST(Compiler, RateLimitsBecomeCostsAndBursts) {
  std::vector<SpecError> errs;
  VmSpec vm =
      vm_from(std::string("{") + kBase +
              R"(, "limits": {"egress_mbit": 100, "egress_pps": 50000, "ingress_mbit": 10, "ingress_pps": 1000}})");
  VmPlan p = compile_vm(vm, HostSpec{}, {}, errs);
  EXPECT_TRUE(p.vm.flags & VMFENCE_VM_F_RATE_LIMITED);
  // 100 Mbit/s = 12.5 MB/s: 80 ns per byte; 10 Mbit/s: 800 ns.
  EXPECT_EQ(p.limit.egress_byte_ns_q16 >> 16, 80u);
  EXPECT_EQ(p.limit.ingress_byte_ns_q16 >> 16, 800u);
  EXPECT_EQ(p.limit.egress_pkt_ns, 20000u);
  EXPECT_EQ(p.limit.ingress_pkt_ns, 1000000u);
  // Default burst: 512 ms of the rate, at least 512 KB.
  EXPECT_EQ(p.limit.egress_burst_ns, 512000000u);
  EXPECT_EQ(p.limit.ingress_burst_ns, 512000000u);
  VmSpec slow = vm_from(std::string("{") + kBase + R"(, "limits": {"egress_mbit": 1}})");
  EXPECT_EQ(compile_vm(slow, HostSpec{}, {}, errs).limit.egress_burst_ns, uint64_t{512 * 1024} * 8000)
      << "512 KB at 1 Mbit/s";
  // Packet buckets: 10 ms, at least 32 packets of the slower rate.
  EXPECT_EQ(p.limit.egress_pkt_burst_ns, 10000000u) << "10 ms at 50,000 pps (500 packets)";
  EXPECT_EQ(p.limit.ingress_pkt_burst_ns, 32000000u) << "32 packets at 1,000 pps";
  EXPECT_EQ(p.limit.egress_bytes_at, 0u) << "buckets start empty";

  VmSpec burst = vm_from(std::string("{") + kBase + R"(, "limits": {"egress_mbit": 100, "burst_kb": 4096}})");
  EXPECT_EQ(compile_vm(burst, HostSpec{}, {}, errs).limit.egress_burst_ns, uint64_t{4096 * 1024} * 80);

  VmPlan none = compile_vm(vm_from(std::string("{") + kBase + "}"), HostSpec{}, {}, errs);
  EXPECT_FALSE(none.vm.flags & VMFENCE_VM_F_RATE_LIMITED);
  vmfence_limit zero{};
  EXPECT_EQ(std::memcmp(&none.limit, &zero, sizeof(zero)), 0);
}

TEST(Compiler, TerminateSetsQuarantineAndThreshold) {
  std::vector<SpecError> errs;
  ViolationPolicy host;
  host.action = Action::terminate;
  host.command = {"true"};
  host.threshold = 3;
  host.window_ms = 500;
  std::vector<SpecError> e;
  auto vm = parse_vm("vm.json", std::string("{") + kBase + "}", host, e);
  ASSERT_TRUE(vm);
  VmPlan p = compile_vm(*vm, HostSpec{}, {}, errs);
  EXPECT_TRUE(p.vm.flags & VMFENCE_VM_F_QUARANTINE);
  EXPECT_EQ(p.vm.threshold, 3);
  EXPECT_EQ(p.vm.window_ms, 500u);
}

TEST(Compiler, VmAddressSpaceIsMarkedWhereARuleCoversIt) {
  std::vector<SpecError> errs;
  VmSpec a = vm_from(std::string("{") + kBase + R"(, "egress": [{"to": "0.0.0.0/0", "proto": "tcp"}]})");
  VmSpec b = vm_from(R"({"name": "vm2", "interface": "tap2", "mac": "02:00:00:00:02:02",
                        "addresses": ["10.1.7.2/32", "192.0.2.9/32", "fec0::2/128"]})");
  auto nets = vm_address_space({a, b});
  ASSERT_EQ(nets.size(), 3u);  // 10.1.0.0/16 (both VMs), 192.0.2.0/16 -> 192.0.0.0/16, fec0::/48
  VmPlan p = compile_vm(a, HostSpec{}, nets, errs);
  const PolicyEntry* marker = find(p.egress, "10.1.0.0/16");
  ASSERT_NE(marker, nullptr);
  EXPECT_TRUE(marker->value.flags & VMFENCE_POLICY_F_VM_NET);
  EXPECT_EQ(marker->value.count, 1) << "a marker inherits the rules that cover it";
  const PolicyEntry* world = find(p.egress, "0.0.0.0/0");
  ASSERT_NE(world, nullptr);
  EXPECT_FALSE(world->value.flags & VMFENCE_POLICY_F_VM_NET) << "outside VM space: no ownership lookup";
  EXPECT_EQ(find(p.egress, "fec0::/48"), nullptr) << "no IPv6 rule covers it: a lookup misses, and a miss is checked";
}

TEST(Compiler, VmAddressSpaceStaysSmall) {
  // 300 VMs in 300 different /16s: the markers coarsen to /8s, then /0, so
  // every policy carries a handful of marker entries, never hundreds.
  std::vector<VmSpec> vms;
  for (int i = 0; i < 300; ++i) {
    VmSpec v;
    v.name = "vm" + std::to_string(i);
    v.addresses.push_back(*parse_cidr("10." + std::to_string(i % 250) + "." + std::to_string(i / 250) + ".2/32"));
    v.addresses.push_back(*parse_cidr("fd00:" + std::to_string(i) + "::2/128"));
    vms.push_back(v);
  }
  auto nets = vm_address_space(vms);
  size_t v4 = 0, v6 = 0;
  for (const auto& n : nets) (n.family == 4 ? v4 : v6)++;
  EXPECT_EQ(v4, 1u);  // 10.0.0.0/8
  EXPECT_LE(v6, 8u);
  EXPECT_EQ(nets[0].str(), "10.0.0.0/8");
}

TEST(Compiler, SampleThresholdBounds) {
  EXPECT_EQ(sample_threshold(1.0), 0xffffffffu);
  EXPECT_EQ(sample_threshold(0.0), 0u);
  EXPECT_NEAR(sample_threshold(0.01) / 4294967296.0, 0.01, 1e-9);
}

}  // namespace
}  // namespace vmfence
