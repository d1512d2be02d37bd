// Unit tests for agent/spec: parsing, every validation error (path + message),
// defaults, on_violation merging, cross-file checks and the shipped examples.
#include "agent/spec/spec.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <map>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#ifndef VMFENCE_SOURCE_DIR
#error "VMFENCE_SOURCE_DIR must name the repository root"
#endif

namespace fs = std::filesystem;
using namespace vmfence;

namespace {

// Builds a JSON object from raw JSON member values; "" in `changes` removes a member.
std::string object_json(std::map<std::string, std::string> fields, const std::map<std::string, std::string>& changes) {
  for (const auto& [key, value] : changes) {
    if (value.empty())
      fields.erase(key);
    else
      fields[key] = value;
  }
  std::string out = "{";
  for (const auto& [key, value] : fields) out += (out.size() > 1 ? ", \"" : "\"") + key + "\": " + value;
  return out + "}";
}

std::string vm_json(const std::map<std::string, std::string>& changes = {}) {
  return object_json({{"name", R"("vm1")"},
                      {"interface", R"("vm-vm1")"},
                      {"mac", R"("02:00:00:00:01:02")"},
                      {"addresses", R"(["10.1.0.2/32"])"}},
                     changes);
}

// VM n's own name, interface, MAC and address (n < 10).
std::string vm_n_json(int n) {
  const std::string d = std::to_string(n);
  return vm_json({{"name", "\"vm" + d + "\""},
                  {"interface", "\"vm-vm" + d + "\""},
                  {"mac", "\"02:00:00:00:0" + d + ":02\""},
                  {"addresses", "[\"10." + d + ".0.2/32\"]"}});
}

std::string describe(const std::vector<SpecError>& errors) {
  std::string out;
  for (const auto& e : errors) out += "  " + e.str() + "\n";
  return out;
}

std::optional<VmSpec> parse_vm_text(const std::string& json, std::vector<SpecError>& errors,
                                    const ViolationPolicy& host = {}) {
  return parse_vm("vms.d/vm1.json", json, host, errors);
}

// ---- addresses and names ---------------------------------------------------

TEST(Cidr, ParsesIpv4AsMapped) {
  auto c = parse_cidr("10.1.2.0/24");
  ASSERT_TRUE(c);
  EXPECT_EQ(c->family, 4);
  EXPECT_EQ(c->prefix_len, 24);
  EXPECT_EQ(c->mapped_prefix_len(), 120);
  std::array<uint8_t, 16> want{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 1, 2, 0};
  EXPECT_EQ(c->addr, want);
  EXPECT_EQ(c->str(), "10.1.2.0/24");
}

TEST(Cidr, ParsesIpv6AndBareAddresses) {
  auto c = parse_cidr("FEC0:0::1");
  ASSERT_TRUE(c);
  EXPECT_EQ(c->family, 6);
  EXPECT_EQ(c->prefix_len, 128);
  EXPECT_EQ(c->str(), "fec0::1/128");
  EXPECT_EQ(parse_cidr("10.0.0.1")->prefix_len, 32);
  EXPECT_EQ(parse_cidr("::/0")->str(), "::/0");
}

TEST(Cidr, KeepsHostBitsAsWritten) { EXPECT_EQ(parse_cidr("10.1.0.2/24")->str(), "10.1.0.2/24"); }

TEST(Cidr, RejectsMalformed) {
  std::string why;
  EXPECT_FALSE(parse_cidr("10.0.0.0/33", &why));
  EXPECT_EQ(why, "the prefix length must be 0-32");
  EXPECT_FALSE(parse_cidr("fec0::/129", &why));
  EXPECT_EQ(why, "the prefix length must be 0-128");
  EXPECT_FALSE(parse_cidr("10.0.0.0/", &why));
  EXPECT_EQ(why, "the prefix length is not a number");
  EXPECT_FALSE(parse_cidr("10.0.0.0/x", &why));
  for (const char* bad : {"", "10.0.0", "10.0.0.256", " 10.0.0.1", "fe80::1%eth0", "host"}) {
    EXPECT_FALSE(parse_cidr(bad, &why)) << bad;
    EXPECT_EQ(why, "not an IPv4 or IPv6 address") << bad;
  }
}

TEST(Cidr, ParseIpRejectsPrefixes) {
  EXPECT_TRUE(parse_ip("10.0.0.1"));
  EXPECT_FALSE(parse_ip("10.0.0.1/32"));
}

TEST(Cidr, ContainsAndOverlaps) {
  auto net8 = *parse_cidr("10.0.0.0/8"), host = *parse_cidr("10.1.0.2/32"), other = *parse_cidr("11.0.0.0/8");
  auto all4 = *parse_cidr("0.0.0.0/0"), all6 = *parse_cidr("::/0");
  EXPECT_TRUE(net8.contains(host));
  EXPECT_FALSE(host.contains(net8));
  EXPECT_TRUE(host.overlaps(net8));
  EXPECT_FALSE(net8.overlaps(other));
  EXPECT_TRUE(all4.contains(net8));
  EXPECT_FALSE(all6.contains(net8)) << "families never mix";
  EXPECT_FALSE(parse_cidr("10.0.0.0/25")->overlaps(*parse_cidr("10.0.0.128/25")));
  EXPECT_TRUE(parse_cidr("fec0::/64")->contains(*parse_cidr("fec0::5/128")));
}

TEST(Mac, ParsesAndPrints) {
  auto mac = parse_mac("02:00:0A:ff:01:02");
  ASSERT_TRUE(mac);
  EXPECT_EQ(mac_str(*mac), "02:00:0a:ff:01:02");
  for (const char* bad : {"02:00:00:00:01", "02-00-00-00-01-02", "02:00:00:00:01:0g", "0200.0000.0102", ""})
    EXPECT_FALSE(parse_mac(bad)) << bad;
}

TEST(Names, EnumNames) {
  EXPECT_STREQ(proto_name(Proto::icmpv6), "icmpv6");
  EXPECT_STREQ(proto_name(Proto::any), "any");
  EXPECT_STREQ(mode_name(Mode::conntrack), "conntrack");
  EXPECT_STREQ(action_name(Action::terminate), "terminate");
}

TEST(NameId, IsFnv1a32AndNeverZero) {
  EXPECT_EQ(name_id(""), 0x811c9dc5u);
  EXPECT_EQ(name_id("a"), 0xe40c292cu);
  EXPECT_EQ(name_id("costarring"), name_id("liquid"));  // a known FNV-1a collision
  EXPECT_EQ(name_id("akhnp9x"), 1u);                    // hashes to 0
}

TEST(SpecError, Formats) {
  EXPECT_EQ((SpecError{"vms.d/vm1.json", "egress[1].ports[0]", "bad"}.str()),
            "vms.d/vm1.json: egress[1].ports[0]: bad");
  EXPECT_EQ((SpecError{"host.json", "", "cannot read: x"}.str()), "host.json: cannot read: x");
}

// ---- VM files: valid ---------------------------------------------------------

TEST(ParseVm, Defaults) {
  std::vector<SpecError> errors;
  ViolationPolicy host;
  host.threshold = 7;
  auto vm = parse_vm_text(vm_json(), errors, host);
  ASSERT_TRUE(vm) << describe(errors);
  EXPECT_TRUE(errors.empty());
  EXPECT_EQ(vm->file, "vms.d/vm1.json");
  EXPECT_EQ(vm->group, "vm1");
  EXPECT_EQ(vm->mode, Mode::filtered);
  EXPECT_DOUBLE_EQ(vm->sample_rate, 0.01);
  EXPECT_TRUE(vm->egress.empty());
  EXPECT_TRUE(vm->ingress.empty());
  EXPECT_TRUE(vm->gateway.empty());
  EXPECT_FALSE(vm->imds);
  EXPECT_EQ(vm->on_violation.threshold, 7u);
}

TEST(ParseVm, EveryField) {
  const char* json = R"({
    "name": "vm1", "interface": "vm-vm1", "mac": "02:00:00:00:01:02",
    "addresses": ["10.1.0.2/32", "fec0::1/128"], "gateway": ["10.1.0.1", "fec0::"],
    "group": "web", "mode": "sampled", "sample_rate": 0.5,
    "egress": [ { "to": "0.0.0.0/0", "proto": "tcp", "ports": ["80", "8000-8080"] },
                { "to": "fec0::/64", "proto": "icmpv6" } ],
    "ingress": [ { "from": "100.64.0.0/10", "proto": "udp", "ports": ["0-65535"] } ],
    "imds": true,
    "on_violation": { "action": "terminate", "threshold": 3, "window_ms": 500 }
  })";
  std::vector<SpecError> errors;
  ViolationPolicy host;
  host.qmp_socket = "/run/{vm}.qmp";
  auto vm = parse_vm_text(json, errors, host);
  ASSERT_TRUE(vm) << describe(errors);
  EXPECT_EQ(mac_str(vm->mac), "02:00:00:00:01:02");
  ASSERT_EQ(vm->addresses.size(), 2u);
  EXPECT_EQ(vm->addresses[1].str(), "fec0::1/128");
  ASSERT_EQ(vm->gateway.size(), 2u);
  EXPECT_EQ(vm->gateway[1].str(), "fec0::/128");
  EXPECT_EQ(vm->group, "web");
  EXPECT_EQ(vm->mode, Mode::sampled);
  EXPECT_DOUBLE_EQ(vm->sample_rate, 0.5);
  ASSERT_EQ(vm->egress.size(), 2u);
  EXPECT_EQ(vm->egress[0].proto, Proto::tcp);
  EXPECT_EQ(vm->egress[0].ports, (std::vector<PortRange>{{80, 80}, {8000, 8080}}));
  EXPECT_EQ(vm->egress[1].peer.str(), "fec0::/64");
  EXPECT_EQ(vm->egress[1].proto, Proto::icmpv6);
  EXPECT_TRUE(vm->egress[1].ports.empty());
  ASSERT_EQ(vm->ingress.size(), 1u);
  EXPECT_EQ(vm->ingress[0].ports, (std::vector<PortRange>{{0, 65535}}));
  EXPECT_TRUE(vm->imds);
  EXPECT_EQ(vm->on_violation.action, Action::terminate);
  EXPECT_EQ(vm->on_violation.qmp_socket, "/run/{vm}.qmp");
  EXPECT_EQ(vm->on_violation.threshold, 3u);
  EXPECT_EQ(vm->on_violation.window_ms, 500u);
}

TEST(ParseVm, OnViolationMergesFieldWiseOverHost) {
  ViolationPolicy host;
  host.action = Action::terminate;
  host.command = {"systemctl", "stop", "microvm@{vm}.service"};
  host.threshold = 3;
  host.window_ms = 2000;

  std::vector<SpecError> errors;
  auto inherit = parse_vm_text(vm_json(), errors, host);
  ASSERT_TRUE(inherit) << describe(errors);
  EXPECT_EQ(inherit->on_violation.action, Action::terminate);
  EXPECT_EQ(inherit->on_violation.command, host.command);

  auto partial = parse_vm_text(vm_json({{"on_violation", R"({"threshold": 10})"}}), errors, host);
  ASSERT_TRUE(partial) << describe(errors);
  EXPECT_EQ(partial->on_violation.action, Action::terminate);
  EXPECT_EQ(partial->on_violation.command, host.command);
  EXPECT_EQ(partial->on_violation.threshold, 10u);
  EXPECT_EQ(partial->on_violation.window_ms, 2000u);

  auto alert = parse_vm_text(vm_json({{"on_violation", R"({"action": "alert"})"}}), errors, host);
  ASSERT_TRUE(alert) << describe(errors);
  EXPECT_EQ(alert->on_violation.action, Action::alert);
  EXPECT_EQ(alert->on_violation.threshold, 3u);

  // Terminate asked for by the VM, carried out by the host's command.
  ViolationPolicy alerting = host;
  alerting.action = Action::alert;
  auto terminate = parse_vm_text(vm_json({{"on_violation", R"({"action": "terminate"})"}}), errors, alerting);
  ASSERT_TRUE(terminate) << describe(errors);
  EXPECT_EQ(terminate->on_violation.action, Action::terminate);
  EXPECT_TRUE(errors.empty()) << describe(errors);
}

// ---- VM files: one test per error kind ----------------------------------------

struct ErrorCase {
  const char* name;
  std::map<std::string, std::string> changes;  // applied to a valid VM
  const char* path;
  const char* fragment;  // expected inside the message
};

std::ostream& operator<<(std::ostream& os, const ErrorCase& c) { return os << c.name; }

class VmError : public testing::TestWithParam<ErrorCase> {};

TEST_P(VmError, ReportsPathAndMessage) {
  const ErrorCase& c = GetParam();
  std::vector<SpecError> errors;
  auto vm = parse_vm_text(vm_json(c.changes), errors);
  EXPECT_FALSE(vm);
  ASSERT_EQ(errors.size(), 1u) << describe(errors);
  EXPECT_EQ(errors[0].file, "vms.d/vm1.json");
  EXPECT_EQ(errors[0].path, c.path);
  EXPECT_NE(errors[0].message.find(c.fragment), std::string::npos) << errors[0].str();
}

const ErrorCase kVmErrors[] = {
    {"missing_name", {{"name", ""}}, "name", "required field is missing"},
    {"missing_interface", {{"interface", ""}}, "interface", "required field is missing"},
    {"missing_mac", {{"mac", ""}}, "mac", "required field is missing"},
    {"missing_addresses", {{"addresses", ""}}, "addresses", "required field is missing"},
    {"unknown_field", {{"colour", R"("red")"}}, "colour", "unknown field (known: name, interface"},
    {"unknown_field_odd_key", {{"my key", "1"}}, R"(["my key"])", "unknown field"},
    {"limits_unknown",
     {{"limits", R"({"flow": 10})"}},
     "limits.flow",
     "unknown field (known: egress_mbit, egress_pps, ingress_mbit, ingress_pps, burst_kb, flows)"},
    {"limits_mbit_zero", {{"limits", R"({"egress_mbit": 0})"}}, "limits.egress_mbit", "must be 1-100000, got 0"},
    {"limits_mbit_type", {{"limits", R"({"ingress_mbit": "100M"})"}}, "limits.ingress_mbit", "expected"},
    {"limits_pps_huge", {{"limits", R"({"ingress_pps": 200000000})"}}, "limits.ingress_pps", "must be"},
    {"limits_burst_alone",
     {{"limits", R"({"burst_kb": 64, "flows": 100})"}},
     "limits.burst_kb",
     "applies to a rate limit; set egress_* or ingress_* too"},
    {"limits_flows_zero", {{"limits", R"({"flows": 0})"}}, "limits.flows", "must be"},
    {"limits_flows_huge", {{"limits", R"({"flows": 99999999})"}}, "limits.flows", "must be"},
    {"limits_type", {{"limits", R"([1])"}}, "limits", "expected an object"},
    {"unknown_rule_field", {{"egress", R"([{"to": "0.0.0.0/0", "port": "80"}])"}}, "egress[0].port", "unknown field"},
    {"unknown_on_violation_field", {{"on_violation", R"({"acton": "alert"})"}}, "on_violation.acton", "unknown field"},
    {"name_type", {{"name", "5"}}, "name", "expected a string, got a number"},
    {"addresses_type", {{"addresses", R"("10.1.0.2/32")"}}, "addresses", "expected an array, got a string"},
    {"rule_type", {{"egress", R"(["0.0.0.0/0"])"}}, "egress[0]", "expected an object, got a string"},
    {"on_violation_type", {{"on_violation", R"("terminate")"}}, "on_violation", "expected an object, got a string"},
    {"bad_name", {{"name", R"("-vm1")"}}, "name", "\"-vm1\" is not a valid name"},
    {"long_name", {{"name", "\"" + std::string(65, 'a') + "\""}}, "name", "is not a valid name"},
    {"name_with_slash", {{"name", R"("vm/1")"}}, "name", "is not a valid name"},
    {"bad_interface", {{"interface", R"("vm/1")"}}, "interface", "\"vm/1\" is not a valid interface name"},
    {"long_interface", {{"interface", R"("abcdefghijklmnop")"}}, "interface", "is not a valid interface name"},
    {"dot_interface", {{"interface", R"("..")"}}, "interface", "is not a valid interface name"},
    {"space_interface", {{"interface", R"("vm 1")"}}, "interface", "is not a valid interface name"},
    {"bad_mac", {{"mac", R"("02:00:00:00:01")"}}, "mac", "is not a MAC address (xx:xx:xx:xx:xx:xx)"},
    {"multicast_mac", {{"mac", R"("01:00:5e:00:00:01")"}}, "mac", "multicast MAC"},
    {"zero_mac", {{"mac", R"("00:00:00:00:00:00")"}}, "mac", "all-zero MAC"},
    {"empty_addresses", {{"addresses", "[]"}}, "addresses", "must list at least one address"},
    {"bad_address",
     {{"addresses", R"(["10.1.0.300/32"])"}},
     "addresses[0]",
     "\"10.1.0.300/32\": not an IPv4 or IPv6 address"},
    {"bad_prefix", {{"addresses", R"(["10.1.0.2/33"])"}}, "addresses[0]", "prefix length must be 0-32"},
    {"host_bits",
     {{"addresses", R"(["10.1.0.2/24"])"}},
     "addresses[0]",
     "has host bits set (did you mean 10.1.0.0/24 or 10.1.0.2/32?)"},
    {"loopback_address", {{"addresses", R"(["127.0.0.1"])"}}, "addresses[0]", "overlaps loopback (127.0.0.0/8)"},
    {"multicast_address", {{"addresses", R"(["ff02::1"])"}}, "addresses[0]", "overlaps multicast (ff00::/8)"},
    {"unspecified_address", {{"addresses", R"(["::/128"])"}}, "addresses[0]", "unspecified"},
    {"everything_address", {{"addresses", R"(["0.0.0.0/0"])"}}, "addresses[0]", "overlaps the unspecified address"},
    {"own_addresses_overlap",
     {{"addresses", R"(["10.1.0.0/24", "10.1.0.2/32"])"}},
     "addresses[1]",
     "overlaps 10.1.0.0/24"},
    {"gateway_prefix", {{"gateway", R"(["10.1.0.1/24"])"}}, "gateway[0]", "must be a bare address"},
    {"gateway_bad", {{"gateway", R"(["gw"])"}}, "gateway[0]", "not an IPv4 or IPv6 address"},
    {"gateway_own_address", {{"gateway", R"(["10.1.0.2"])"}}, "gateway[0]", "is one of the VM's own addresses"},
    {"gateway_multicast", {{"gateway", R"(["224.0.0.1"])"}}, "gateway[0]", "multicast"},
    {"bad_group", {{"group", R"("")"}}, "group", "is not a valid name"},
    {"bad_mode", {{"mode", R"("fast")"}}, "mode", "\"fast\" is not a mode (direct, sampled, conntrack, filtered)"},
    {"sample_rate_zero", {{"sample_rate", "0"}}, "sample_rate", "must be in (0, 1], got 0"},
    {"sample_rate_above_one", {{"sample_rate", "1.5"}}, "sample_rate", "must be in (0, 1], got 1.5"},
    {"sample_rate_type", {{"sample_rate", R"("0.1")"}}, "sample_rate", "expected a number, got a string"},
    {"rule_missing_to", {{"egress", R"([{"proto": "tcp"}])"}}, "egress[0].to", "required field is missing"},
    {"rule_missing_from", {{"ingress", R"([{"proto": "udp"}])"}}, "ingress[0].from", "required field is missing"},
    {"rule_bad_peer", {{"ingress", R"([{"from": "10.0.0.1/8"}])"}}, "ingress[0].from", "has host bits set"},
    {"bad_proto",
     {{"egress", R"([{"to": "0.0.0.0/0", "proto": "sctp"}])"}},
     "egress[0].proto",
     "\"sctp\" is not a protocol (tcp, udp, icmp, icmpv6, any)"},
    {"port_out_of_range",
     {{"egress", R"([{"to": "0.0.0.0/0"}, {"to": "0.0.0.0/0", "proto": "tcp", "ports": ["70000"]}])"}},
     "egress[1].ports[0]",
     "\"70000\" is not a port (0-65535)"},
    {"port_range_out_of_range",
     {{"egress", R"([{"to": "0.0.0.0/0", "proto": "tcp", "ports": ["1-70000"]}])"}},
     "egress[0].ports[0]",
     "\"1-70000\": 70000 is not a port (0-65535)"},
    {"port_syntax",
     {{"egress", R"([{"to": "0.0.0.0/0", "proto": "tcp", "ports": ["http"]}])"}},
     "egress[0].ports[0]",
     "\"http\" is not a port or port range"},
    {"port_negative",
     {{"egress", R"([{"to": "0.0.0.0/0", "proto": "tcp", "ports": ["-1"]}])"}},
     "egress[0].ports[0]",
     "is not a port or port range"},
    {"port_reversed",
     {{"egress", R"([{"to": "0.0.0.0/0", "proto": "tcp", "ports": ["90-80"]}])"}},
     "egress[0].ports[0]",
     "\"90-80\" is a reversed range"},
    {"port_number",
     {{"egress", R"([{"to": "0.0.0.0/0", "proto": "tcp", "ports": [80]}])"}},
     "egress[0].ports[0]",
     "expected a string, got a number"},
    {"ports_empty",
     {{"egress", R"([{"to": "0.0.0.0/0", "proto": "tcp", "ports": []}])"}},
     "egress[0].ports",
     "must not be empty"},
    {"ports_without_proto",
     {{"egress", R"([{"to": "0.0.0.0/0", "ports": ["80"]}])"}},
     "egress[0].ports",
     "ports need proto \"tcp\" or \"udp\" (proto is \"any\")"},
    {"ports_with_icmp",
     {{"ingress", R"([{"from": "0.0.0.0/0", "proto": "icmp", "ports": ["8"]}])"}},
     "ingress[0].ports",
     "ports need proto \"tcp\" or \"udp\" (proto is \"icmp\")"},
    {"icmp_to_ipv6",
     {{"egress", R"([{"to": "::/0", "proto": "icmp"}])"}},
     "egress[0].proto",
     "\"icmp\" is IPv4 only; use \"icmpv6\" for ::/0"},
    {"icmpv6_to_ipv4",
     {{"ingress", R"([{"from": "10.0.0.0/8", "proto": "icmpv6"}])"}},
     "ingress[0].proto",
     "\"icmpv6\" is IPv6 only"},
    {"imds_type", {{"imds", R"("yes")"}}, "imds", "expected true or false, got a string"},
    {"bad_action",
     {{"on_violation", R"({"action": "kill"})"}},
     "on_violation.action",
     "\"kill\" is not an action (alert, terminate)"},
    // The trust boundary: how to terminate runs as root, so only host.json says it.
    {"command_in_vm_file",
     {{"on_violation", R"({"command": ["systemctl", "stop", "x"]})"}},
     "on_violation.command",
     "not allowed in a VM's file (it runs as root): set it in host.json"},
    {"systemd_unit_in_vm_file",
     {{"on_violation", R"({"systemd_unit": "x@{vm}.service"})"}},
     "on_violation.systemd_unit",
     "not allowed in a VM's file (it runs as root): set it in host.json"},
    {"qmp_socket_in_vm_file",
     {{"on_violation", R"({"qmp_socket": "/run/{vm}.qmp"})"}},
     "on_violation.qmp_socket",
     "not allowed in a VM's file (it runs as root): set it in host.json"},
    {"threshold_zero",
     {{"on_violation", R"({"threshold": 0})"}},
     "on_violation.threshold",
     "must be at least 1, got 0"},
    {"threshold_negative",
     {{"on_violation", R"({"threshold": -3})"}},
     "on_violation.threshold",
     "must be at least 1, got -3"},
    {"threshold_too_big",
     {{"on_violation", R"({"threshold": 4294967296})"}},
     "on_violation.threshold",
     "must be at least 1, got 4294967296"},
    {"window_ms_fraction",
     {{"on_violation", R"({"window_ms": 1.5})"}},
     "on_violation.window_ms",
     "expected an integer, got 1.5"},
    {"terminate_without_target",
     {{"on_violation", R"({"action": "terminate"})"}},
     "on_violation.action",
     "\"terminate\" needs one of command, systemd_unit or qmp_socket"},
};

INSTANTIATE_TEST_SUITE_P(Kinds, VmError, testing::ValuesIn(kVmErrors),
                         [](const testing::TestParamInfo<ErrorCase>& info) { return std::string(info.param.name); });

TEST(ParseVmErrors, SyntaxErrorHasLineAndColumn) {
  std::vector<SpecError> errors;
  EXPECT_FALSE(parse_vm_text("{\n  \"name\": \"vm1\",\n  \"mac\" \"x\"\n}", errors));
  ASSERT_EQ(errors.size(), 1u) << describe(errors);
  EXPECT_EQ(errors[0].path, "");
  EXPECT_EQ(errors[0].message, "3:9: Missing a colon after a name of object member.");
  EXPECT_EQ(errors[0].str(), "vms.d/vm1.json: 3:9: Missing a colon after a name of object member.");
}

TEST(ParseVmErrors, SyntaxErrorKinds) {
  for (const char* bad : {"", "{", "{} {}", "{\"name\": \"v\xff\"}", "{\"a\": NaN}", "{\"a\": 1,}"}) {
    std::vector<SpecError> errors;
    EXPECT_FALSE(parse_vm_text(bad, errors)) << bad;
    ASSERT_EQ(errors.size(), 1u) << bad;
    EXPECT_EQ(errors[0].path, "") << bad;
    EXPECT_EQ(errors[0].message.substr(0, 2), "1:") << errors[0].message;
  }
}

TEST(ParseVmErrors, RootMustBeAnObject) {
  std::vector<SpecError> errors;
  EXPECT_FALSE(parse_vm_text("[]", errors));
  ASSERT_EQ(errors.size(), 1u);
  EXPECT_EQ(errors[0].str(), "vms.d/vm1.json: expected an object, got an array");
}

TEST(ParseVmErrors, DuplicateField) {
  std::vector<SpecError> errors;
  std::string json = vm_json();
  json.insert(1, R"("name": "other", )");
  EXPECT_FALSE(parse_vm_text(json, errors));
  ASSERT_EQ(errors.size(), 1u) << describe(errors);
  EXPECT_EQ(errors[0].path, "name");
  EXPECT_EQ(errors[0].message, "duplicate field");
}

TEST(ParseVmErrors, ControlCharactersAreEscapedInMessages) {
  std::vector<SpecError> errors;
  EXPECT_FALSE(parse_vm_text(vm_json({{"name", R"("a\nb")"}}), errors));
  ASSERT_EQ(errors.size(), 1u);
  EXPECT_EQ(errors[0].message.find('\n'), std::string::npos);
  EXPECT_NE(errors[0].message.find(R"("a\u000ab")"), std::string::npos) << errors[0].message;
}

TEST(ParseVmErrors, ReportsEveryErrorInAFile) {
  const char* json = R"({
    "name": "vm 1",
    "mac": "ff:ff:ff:ff:ff:ff",
    "addresses": ["10.1.0.2/32", "nope"],
    "mode": "turbo",
    "egress": [ { "to": "0.0.0.0/0", "proto": "tcp", "ports": ["80"] },
                { "to": "0.0.0.0/0", "proto": "tcp", "ports": ["443", "70000"] } ],
    "ingress": [ { "from": "::/0", "proto": "icmp" } ],
    "imds": 1,
    "extra": null
  })";
  std::vector<SpecError> errors;
  EXPECT_FALSE(parse_vm_text(json, errors));
  std::set<std::string> paths;
  for (const auto& e : errors) paths.insert(e.path);
  EXPECT_EQ(paths, (std::set<std::string>{"extra", "name", "interface", "mac", "addresses[1]", "mode",
                                          "egress[1].ports[1]", "ingress[0].proto", "imds"}))
      << describe(errors);
  EXPECT_EQ(errors.size(), paths.size()) << describe(errors);
}

// ---- host.json ---------------------------------------------------------------

std::string host_json(const std::map<std::string, std::string>& changes = {}) {
  return object_json({{"wan_interfaces", R"(["eth0"])"},
                      {"nat", R"({"masquerade": ["10.0.0.0/8"]})"},
                      {"imds", R"({"address": "169.254.169.254"})"}},
                     changes);
}

TEST(ParseHost, EmptyObjectGivesDefaults) {
  std::vector<SpecError> errors;
  HostSpec host = parse_host("host.json", "{}", errors);
  EXPECT_TRUE(errors.empty()) << describe(errors);
  EXPECT_EQ(host.file, "host.json");
  EXPECT_TRUE(host.wan_interfaces.empty());
  EXPECT_TRUE(host.masquerade.empty());
  EXPECT_FALSE(host.imds);
  EXPECT_EQ(host.on_violation.action, Action::alert);
  EXPECT_EQ(host.on_violation.threshold, 1u);
  EXPECT_EQ(host.on_violation.window_ms, 1000u);
  EXPECT_EQ(host.metrics.listen, "127.0.0.1:9727");
}

TEST(ParseHost, MetricsListen) {
  for (const char* listen : {"0.0.0.0:9100", "10.9.0.1:9727", "[::1]:9727", "[fec0::1]:1", ""}) {
    std::vector<SpecError> errors;
    HostSpec host = parse_host("host.json", std::string(R"({"metrics": {"listen": ")") + listen + "\"}}", errors);
    EXPECT_TRUE(errors.empty()) << listen << ": " << describe(errors);
    EXPECT_EQ(host.metrics.listen, listen);
  }
  std::vector<SpecError> errors;
  EXPECT_EQ(parse_host("host.json", R"({"metrics": {}})", errors).metrics.listen, "127.0.0.1:9727");
  EXPECT_TRUE(errors.empty()) << describe(errors);
  auto l = parse_listen("[::1]:9100");
  ASSERT_TRUE(l);
  EXPECT_EQ(l->address.str(), "::1/128");
  EXPECT_EQ(l->port, 9100);
}

TEST(ParseHost, EveryField) {
  std::vector<SpecError> errors;
  HostSpec host = parse_host("host.json",
                             host_json({{"on_violation", R"({"action": "terminate",
      "command": ["systemctl", "stop", "microvm@{vm}.service"], "threshold": 2, "window_ms": 5000})"},
                                        {"wan_interfaces", R"(["enP2p4s0", "eth1"])"}}),
                             errors);
  EXPECT_TRUE(errors.empty()) << describe(errors);
  EXPECT_EQ(host.wan_interfaces, (std::vector<std::string>{"enP2p4s0", "eth1"}));
  ASSERT_EQ(host.masquerade.size(), 1u);
  EXPECT_EQ(host.masquerade[0].str(), "10.0.0.0/8");
  ASSERT_TRUE(host.imds);
  EXPECT_EQ(host.imds->address.str(), "169.254.169.254/32");
  EXPECT_EQ(host.imds->port, 80);
  EXPECT_EQ(host.on_violation.action, Action::terminate);
  EXPECT_EQ(host.on_violation.command.size(), 3u);
  EXPECT_EQ(host.on_violation.threshold, 2u);
  EXPECT_EQ(host.on_violation.window_ms, 5000u);
}

class HostError : public testing::TestWithParam<ErrorCase> {};

TEST_P(HostError, ReportsPathAndMessage) {
  const ErrorCase& c = GetParam();
  std::vector<SpecError> errors;
  parse_host("cfg/host.json", host_json(c.changes), errors);
  ASSERT_EQ(errors.size(), 1u) << describe(errors);
  EXPECT_EQ(errors[0].file, "cfg/host.json");
  EXPECT_EQ(errors[0].path, c.path);
  EXPECT_NE(errors[0].message.find(c.fragment), std::string::npos) << errors[0].str();
}

const ErrorCase kHostErrors[] = {
    {"unknown_field",
     {{"wan", R"(["eth0"])"}},
     "wan",
     "unknown field (known: wan_interfaces, nat, imds, on_violation, flow_timeouts, metrics, xdp_prefilter, fleet)"},
    {"fleet_no_etcd",
     {{"fleet", R"({"host": "hv1", "interfaces": ["ul0"]})"}},
     "fleet.etcd",
     "required field is missing"},
    {"fleet_no_interfaces",
     {{"fleet", R"({"etcd": ["http://192.0.2.1:2379"], "host": "hv1"})"}},
     "fleet.interfaces",
     "required field is missing"},
    {"fleet_lease_too_short",
     {{"fleet", R"({"etcd": ["http://192.0.2.1:2379"], "host": "hv1", "interfaces": ["ul0"], "lease_s": 4})"}},
     "fleet.lease_s",
     "must be 5-3600, got 4"},
    {"fleet_url",
     {{"fleet", R"({"etcd": ["192.0.2.1:2379"], "host": "hv1", "interfaces": ["ul0"]})"}},
     "fleet.etcd[0]",
     "starts with http:// or https://"},
    {"fleet_prefix",
     {{"fleet", R"({"etcd": ["http://192.0.2.1:2379"], "host": "hv1", "interfaces": ["ul0"], "prefix": "vmfence"})"}},
     "fleet.prefix",
     "starts and ends with '/'"},
    {"fleet_underlay_is_wan",
     {{"wan_interfaces", R"(["eth0"])"},
      {"fleet", R"({"etcd": ["http://192.0.2.1:2379"], "host": "hv1", "interfaces": ["eth0"]})"}},
     "fleet.interfaces[0]",
     "also in wan_interfaces"},
    {"fleet_host_slash",
     {{"fleet", R"({"etcd": ["http://192.0.2.1:2379"], "host": "a/b", "interfaces": ["ul0"]})"}},
     "fleet.host",
     "a host name"},
    {"xdp_prefilter_type", {{"xdp_prefilter", R"("yes")"}}, "xdp_prefilter", "expected true or false, got a string"},
    {"metrics_unknown_field", {{"metrics", R"({"port": 9727})"}}, "metrics.port", "unknown field (known: listen)"},
    {"metrics_type", {{"metrics", R"("127.0.0.1:9727")"}}, "metrics", "expected an object"},
    {"metrics_listen_type", {{"metrics", R"({"listen": 9727})"}}, "metrics.listen", "expected a string, got a number"},
    {"metrics_listen_name",
     {{"metrics", R"({"listen": "localhost:9727"})"}},
     "metrics.listen",
     "\"localhost:9727\": expected ADDRESS:PORT or [IPV6]:PORT with a numeric address"},
    {"metrics_listen_no_port", {{"metrics", R"({"listen": "127.0.0.1"})"}}, "metrics.listen", "expected ADDRESS:PORT"},
    {"metrics_listen_port_zero",
     {{"metrics", R"({"listen": "127.0.0.1:0"})"}},
     "metrics.listen",
     "port must be 1-65535"},
    {"metrics_listen_port_big",
     {{"metrics", R"({"listen": "127.0.0.1:65536"})"}},
     "metrics.listen",
     "port must be 1-65535"},
    {"metrics_listen_port_text", {{"metrics", R"({"listen": "127.0.0.1:http"})"}}, "metrics.listen", "port must be"},
    {"metrics_listen_v6_unbracketed", {{"metrics", R"({"listen": "::1:9727"})"}}, "metrics.listen", "[IPV6]:PORT"},
    {"metrics_listen_v4_bracketed", {{"metrics", R"({"listen": "[10.0.0.1]:9727"})"}}, "metrics.listen", "[IPV6]:PORT"},
    {"flow_timeouts_unknown", {{"flow_timeouts", R"({"sctp_s": 5})"}}, "flow_timeouts.sctp_s", "unknown field"},
    {"flow_timeouts_zero", {{"flow_timeouts", R"({"udp_s": 0})"}}, "flow_timeouts.udp_s", "must be"},
    {"flow_timeouts_type", {{"flow_timeouts", R"({"tcp_s": "long"})"}}, "flow_timeouts.tcp_s", "expected"},
    {"wan_type", {{"wan_interfaces", R"("eth0")"}}, "wan_interfaces", "expected an array, got a string"},
    {"wan_bad_ifname", {{"wan_interfaces", R"(["eth0", "eth:1"])"}}, "wan_interfaces[1]", "not a valid interface name"},
    {"wan_duplicate", {{"wan_interfaces", R"(["eth0", "eth0"])"}}, "wan_interfaces[1]", "listed twice"},
    {"nat_unknown_field", {{"nat", R"({"snat": []})"}}, "nat.snat", "unknown field (known: masquerade)"},
    {"masquerade_bad",
     {{"nat", R"({"masquerade": ["10.0.0.0/8", "10/8"]})"}},
     "nat.masquerade[1]",
     "not an IPv4 or IPv6 address"},
    {"masquerade_host_bits", {{"nat", R"({"masquerade": ["10.1.0.0/8"]})"}}, "nat.masquerade[0]", "has host bits set"},
    {"imds_missing_address", {{"imds", R"({"port": 80})"}}, "imds.address", "required field is missing"},
    {"imds_address_prefix",
     {{"imds", R"({"address": "169.254.169.254/32"})"}},
     "imds.address",
     "must be a bare address"},
    {"imds_port_zero",
     {{"imds", R"({"address": "169.254.169.254", "port": 0})"}},
     "imds.port",
     "must be 1-65535, got 0"},
    {"imds_port_big",
     {{"imds", R"({"address": "169.254.169.254", "port": 65536})"}},
     "imds.port",
     "must be 1-65535, got 65536"},
    {"imds_unknown_field", {{"imds", R"({"address": "169.254.169.254", "host": "x"})"}}, "imds.host", "unknown field"},
    {"on_violation_unknown_field",
     {{"on_violation", R"({"actions": "alert"})"}},
     "on_violation.actions",
     "unknown field"},
    {"command_type",
     {{"on_violation", R"({"command": "systemctl stop vm"})"}},
     "on_violation.command",
     "expected an array, got a string"},
    {"command_empty", {{"on_violation", R"({"command": []})"}}, "on_violation.command", "must not be empty"},
    {"command_empty_program",
     {{"on_violation", R"({"command": ["", "x"]})"}},
     "on_violation.command[0]",
     "the program must not be empty"},
    {"command_element_type",
     {{"on_violation", R"({"command": ["kill", 9]})"}},
     "on_violation.command[1]",
     "expected a string, got a number"},
    {"systemd_unit_empty",
     {{"on_violation", R"({"systemd_unit": ""})"}},
     "on_violation.systemd_unit",
     "must not be empty"},
    {"qmp_socket_type",
     {{"on_violation", R"({"qmp_socket": 1})"}},
     "on_violation.qmp_socket",
     "expected a string, got a number"},
    {"terminate_without_target",
     {{"on_violation", R"({"action": "terminate"})"}},
     "on_violation.action",
     "\"terminate\" needs one of command, systemd_unit or qmp_socket"},
};

INSTANTIATE_TEST_SUITE_P(Kinds, HostError, testing::ValuesIn(kHostErrors),
                         [](const testing::TestParamInfo<ErrorCase>& info) { return std::string(info.param.name); });

TEST(ParseHostErrors, RootMustBeAnObject) {
  std::vector<SpecError> errors;
  parse_host("host.json", "null", errors);
  ASSERT_EQ(errors.size(), 1u);
  EXPECT_EQ(errors[0].str(), "host.json: expected an object, got null");
}

// ---- cross-VM checks -----------------------------------------------------------

VmSpec make_vm(const std::string& name, const std::string& address, int n) {
  std::vector<SpecError> errors;
  char mac[18];
  std::snprintf(mac, sizeof mac, "02:00:00:00:%02x:02", n);
  auto vm = parse_vm("vms.d/" + name + ".json",
                     vm_json({{"name", "\"" + name + "\""},
                              {"interface", "\"tap" + std::to_string(n) + "\""},
                              {"mac", "\"" + std::string(mac) + "\""},
                              {"addresses", "[\"" + address + "\"]"}}),
                     {}, errors);
  EXPECT_TRUE(vm) << describe(errors);
  return *vm;
}

TEST(ValidateVms, DistinctVmsPass) {
  std::vector<SpecError> errors;
  validate_vms({make_vm("a", "10.0.0.0/25", 1), make_vm("b", "10.0.0.128/25", 2), make_vm("c", "fec0::/64", 3)},
               errors);
  EXPECT_TRUE(errors.empty()) << describe(errors);
}

TEST(ValidateVms, OverlapsAcrossVms) {
  std::vector<SpecError> errors;
  validate_vms({make_vm("a", "10.0.0.0/8", 1), make_vm("b", "10.5.0.0/16", 2), make_vm("c", "11.0.0.1", 3),
                make_vm("d", "10.200.0.1", 4)},
               errors);
  ASSERT_EQ(errors.size(), 2u) << describe(errors);
  EXPECT_EQ(errors[0].str(), "vms.d/b.json: addresses[0]: 10.5.0.0/16 overlaps 10.0.0.0/8 of a (vms.d/a.json)");
  EXPECT_EQ(errors[1].str(), "vms.d/d.json: addresses[0]: 10.200.0.1/32 overlaps 10.0.0.0/8 of a (vms.d/a.json)");
}

// The sorted sweep must agree with comparing every pair.
TEST(ValidateVms, OverlapSweepMatchesPairwise) {
  std::mt19937 rng(42);
  std::vector<VmSpec> vms;
  for (int n = 0; n < 300; ++n) {
    unsigned len = 20 + rng() % 13;
    uint32_t ip = (10u << 24) | (rng() & 0x3ffff);
    ip &= len == 32 ? ~0u : ~(~0u >> len);
    char text[32];
    std::snprintf(text, sizeof text, "%u.%u.%u.%u/%u", ip >> 24, ip >> 16 & 255, ip >> 8 & 255, ip & 255, len);
    VmSpec vm;
    vm.name = "vm" + std::to_string(n);
    vm.file = vm.name + ".json";
    vm.interface = vm.name;
    vm.mac = {2, 0, 0, 0, static_cast<uint8_t>(n >> 8), static_cast<uint8_t>(n)};
    vm.addresses = {*parse_cidr(text)};
    vms.push_back(vm);
  }
  // First come, first served: a VM is reported when its address overlaps
  // one of a VM before it that was not reported itself.
  std::set<std::string> want;
  std::vector<Cidr> taken;
  for (const auto& vm : vms) {
    const Cidr& mine = vm.addresses[0];
    if (std::any_of(taken.begin(), taken.end(), [&](const Cidr& t) { return t.overlaps(mine); }))
      want.insert(vm.file);
    else
      taken.push_back(mine);
  }
  std::vector<SpecError> errors;
  validate_vms(vms, errors);
  std::set<std::string> got;
  for (const auto& e : errors) got.insert(e.file);
  EXPECT_GT(want.size(), 10u);
  EXPECT_EQ(got, want);
  EXPECT_EQ(errors.size(), want.size());
}

TEST(ValidateVms, NameIdCollisions) {
  std::vector<SpecError> errors;
  VmSpec a = make_vm("costarring", "10.0.0.1", 1), b = make_vm("liquid", "10.0.0.2", 2);
  VmSpec c = make_vm("c", "10.0.0.3", 3), d = make_vm("d", "10.0.0.4", 4);
  c.group = "declinate";  // collides with "macallums"
  d.group = "macallums";
  validate_vms({a, b, c, d}, errors);
  ASSERT_EQ(errors.size(), 2u) << describe(errors);
  EXPECT_EQ(errors[0].path, "name");
  EXPECT_EQ(errors[0].file, "vms.d/liquid.json");
  EXPECT_NE(errors[0].message.find("\"liquid\" has the same id (0x5e4daa9d) as \"costarring\" (vms.d/costarring.json)"),
            std::string::npos)
      << errors[0].message;
  EXPECT_EQ(errors[1].path, "group");
  EXPECT_EQ(errors[1].file, "vms.d/d.json");
}

// ---- load_spec on a directory ----------------------------------------------------

class LoadSpec : public testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/vmfence-spec-test.XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { fs::remove_all(dir_); }

  void write(const std::string& rel, const std::string& text) {
    fs::create_directories((dir_ / rel).parent_path());
    std::ofstream(dir_ / rel) << text;
  }
  std::string path(const std::string& rel) const { return (dir_ / rel).string(); }

  fs::path dir_;
};

TEST_F(LoadSpec, LoadsSortsAndIgnoresTempFiles) {
  write("host.json", host_json());
  write("vms.d/b.json", vm_json());
  write("vms.d/a.json", vm_n_json(2));
  write("vms.d/.c.json", "garbage");
  write("vms.d/c.json.tmp", "garbage");
  write("vms.d/README", "garbage");
  SpecLoad load = load_spec(dir_);
  ASSERT_TRUE(load.ok()) << describe(load.errors);
  EXPECT_EQ(load.spec.host.file, path("host.json"));
  ASSERT_EQ(load.spec.vms.size(), 2u);
  EXPECT_EQ(load.spec.vms[0].name, "vm1");
  EXPECT_EQ(load.spec.vms[0].file, path("vms.d/b.json"));
  EXPECT_EQ(load.spec.vms[1].name, "vm2");
}

// Reloads reuse what an earlier read parsed; every kind of change is still
// seen: an edit in place (same size), a file renamed over another, a
// deletion, and a host.json change that alters an unchanged file's verdict.
TEST_F(LoadSpec, FileCacheSeesEveryChange) {
  write("host.json", host_json());
  write("vms.d/a.json", vm_json());
  write("vms.d/b.json", vm_n_json(2));
  // Files changed within the last second are never cached (file times are
  // coarse): age them first.
  std::this_thread::sleep_for(std::chrono::milliseconds(1100));
  SpecFileCache cache;
  auto names = [](const SpecFiles& f) {
    std::vector<std::string> out;
    for (const auto& v : f.vms) out.push_back(v.vm ? v.vm->name + "@" + v.vm->addresses[0].str() : "!" + v.path);
    return out;
  };
  using V = std::vector<std::string>;
  EXPECT_EQ(names(read_spec_files(dir_, &cache)), (V{"vm1@10.1.0.2/32", "vm2@10.2.0.2/32"}));
  EXPECT_EQ(cache.parsed_last(), 2u);
  EXPECT_EQ(names(read_spec_files(dir_, &cache)), (V{"vm1@10.1.0.2/32", "vm2@10.2.0.2/32"}));
  EXPECT_EQ(cache.parsed_last(), 0u);  // both from the cache

  // host.json makes vm-vm2 a WAN interface: b.json (unchanged) is refused.
  write("host.json", host_json({{"wan_interfaces", R"(["eth0", "vm-vm2"])"}}));
  SpecFiles files = read_spec_files(dir_, &cache);
  EXPECT_EQ(names(files), (V{"vm1@10.1.0.2/32", "!" + path("vms.d/b.json")}));
  EXPECT_EQ(cache.parsed_last(), 2u);
  write("host.json", host_json());

  // Same size, same second: still seen (recent files are read every time).
  write("vms.d/a.json", vm_json({{"addresses", R"(["10.1.0.3/32"])"}}));
  EXPECT_EQ(names(read_spec_files(dir_, &cache)), (V{"vm1@10.1.0.3/32", "vm2@10.2.0.2/32"}));
  write("vms.d/a.json", vm_json({{"addresses", R"(["10.1.0.4/32"])"}}));
  EXPECT_EQ(names(read_spec_files(dir_, &cache)), (V{"vm1@10.1.0.4/32", "vm2@10.2.0.2/32"}));

  write("vms.d/.b.json.tmp", vm_n_json(3));
  fs::rename(dir_ / "vms.d/.b.json.tmp", dir_ / "vms.d/b.json");
  EXPECT_EQ(names(read_spec_files(dir_, &cache)), (V{"vm1@10.1.0.4/32", "vm3@10.3.0.2/32"}));

  fs::remove(dir_ / "vms.d/a.json");
  EXPECT_EQ(names(read_spec_files(dir_, &cache)), (V{"vm3@10.3.0.2/32"}));
}

TEST_F(LoadSpec, MissingHostJsonIsAnError) {
  SpecLoad load = load_spec(dir_);
  ASSERT_EQ(load.errors.size(), 1u) << describe(load.errors);
  EXPECT_EQ(load.errors[0].str(), path("host.json") + ": cannot read: No such file or directory");
}

TEST_F(LoadSpec, MissingVmsDirMeansNoVms) {
  write("host.json", "{}");
  SpecLoad load = load_spec(dir_);
  EXPECT_TRUE(load.ok()) << describe(load.errors);
  EXPECT_TRUE(load.spec.vms.empty());
}

TEST_F(LoadSpec, UnreadableVmFile) {
  write("host.json", "{}");
  fs::create_directories(dir_ / "vms.d/dir.json");
  SpecLoad load = load_spec(dir_);
  ASSERT_EQ(load.errors.size(), 1u) << describe(load.errors);
  EXPECT_EQ(load.errors[0].str(), path("vms.d/dir.json") + ": cannot read: Is a directory");
}

TEST_F(LoadSpec, VmsDirThatIsAFile) {
  write("host.json", "{}");
  write("vms.d", "");
  SpecLoad load = load_spec(dir_);
  ASSERT_EQ(load.errors.size(), 1u) << describe(load.errors);
  EXPECT_EQ(load.errors[0].file, path("vms.d"));
  EXPECT_NE(load.errors[0].message.find("cannot list"), std::string::npos);
}

TEST_F(LoadSpec, ErrorsFromEveryFile) {
  write("host.json", R"({"wan_interfaces": "eth0"})");
  write("vms.d/a.json", "{");
  write("vms.d/b.json", vm_json({{"mode", R"("x")"}}));
  SpecLoad load = load_spec(dir_);
  ASSERT_EQ(load.errors.size(), 3u) << describe(load.errors);
  EXPECT_EQ(load.errors[0].file, path("host.json"));
  EXPECT_EQ(load.errors[1].file, path("vms.d/a.json"));
  EXPECT_EQ(load.errors[2].file, path("vms.d/b.json"));
}

// The contract: a conflict is blamed on the file that came later (its
// mtime), never on the earlier one and never by file name order.
void set_mtime(const fs::path& p, int64_t seconds) {
  fs::last_write_time(p, fs::file_time_type(std::chrono::seconds(seconds)));
}

TEST_F(LoadSpec, ConflictsAreBlamedOnTheLaterFile) {
  write("host.json", "{}");
  write("vms.d/a.json", vm_json());
  write("vms.d/b.json", vm_json({{"addresses", R"(["10.1.0.0/24"])"}}));
  set_mtime(path("vms.d/a.json"), 1000000);
  set_mtime(path("vms.d/b.json"), 2000000);
  SpecLoad load = load_spec(dir_);
  std::vector<std::string> got;
  for (const auto& e : load.errors) got.push_back(e.str());
  std::string a = path("vms.d/a.json"), b = path("vms.d/b.json");
  EXPECT_EQ(got, (std::vector<std::string>{
                     b + ": name: \"vm1\" is also used by " + a,
                     b + ": interface: \"vm-vm1\" is also used by vm1 (" + a + ")",
                     b + ": mac: 02:00:00:00:01:02 is also used by vm1 (" + a + ")",
                     b + ": addresses[0]: 10.1.0.0/24 overlaps 10.1.0.2/32 of vm1 (" + a + ")",
                 }));
  ASSERT_EQ(load.spec.vms.size(), 1u);
  EXPECT_EQ(load.spec.vms[0].file, a);
}

TEST_F(LoadSpec, FileNameOrderNeverDecides) {
  write("host.json", "{}");
  write("vms.d/a.json",
        vm_json({{"name", R"("late")"}, {"interface", R"("tap-late")"}, {"mac", R"("02:00:00:00:09:09")"}}));
  write("vms.d/z.json", vm_json({{"name", R"("early")"}}));
  set_mtime(path("vms.d/z.json"), 1000000);
  set_mtime(path("vms.d/a.json"), 2000000);
  SpecLoad load = load_spec(dir_);
  ASSERT_EQ(load.errors.size(), 1u) << describe(load.errors);
  EXPECT_EQ(load.errors[0].str(), path("vms.d/a.json") + ": addresses[0]: 10.1.0.2/32 overlaps 10.1.0.2/32 of early (" +
                                      path("vms.d/z.json") + ")");
  ASSERT_EQ(load.spec.vms.size(), 1u);
  EXPECT_EQ(load.spec.vms[0].name, "early");
}

TEST_F(LoadSpec, ChecksAgainstHost) {
  write("host.json", R"({"wan_interfaces": ["vm-vm1"]})");
  write("vms.d/vm1.json", vm_json({{"imds", "true"}}));
  SpecLoad load = load_spec(dir_);
  ASSERT_EQ(load.errors.size(), 2u) << describe(load.errors);
  EXPECT_EQ(load.errors[0].path, "interface");
  EXPECT_NE(load.errors[0].message.find("is a WAN interface"), std::string::npos);
  EXPECT_EQ(load.errors[1].path, "imds");
  EXPECT_NE(load.errors[1].message.find("needs \"imds\""), std::string::npos);
}

// The underlay carries other hosts' VMs: no VM may sit on it, and a refused
// file naming it never turns it into no_policy.
TEST_F(LoadSpec, AVmOnTheFleetUnderlayIsRefused) {
  write("host.json", R"({"fleet": {"etcd": ["http://192.0.2.1:2379"], "host": "hv1", "interfaces": ["vm-vm1"]}})");
  write("vms.d/vm1.json", vm_json({}));
  SpecLoad load = load_spec(dir_);
  ASSERT_EQ(load.errors.size(), 1u) << describe(load.errors);
  EXPECT_EQ(load.errors[0].path, "interface");
  EXPECT_NE(load.errors[0].message.find("fleet's underlay"), std::string::npos);
  SpecFiles files = read_spec_files(dir_);
  ASSERT_EQ(files.vms.size(), 1u);
  EXPECT_EQ(files.vms[0].interface, "") << "never blocked (no_policy) on the underlay";
}

TEST_F(LoadSpec, BrokenHostImdsIsReportedOnce) {
  write("host.json", R"({"imds": {"address": "169.254.169.254", "port": 0}})");
  write("vms.d/vm1.json", vm_json({{"imds", "true"}}));
  SpecLoad load = load_spec(dir_);
  ASSERT_EQ(load.errors.size(), 1u) << describe(load.errors);
  EXPECT_EQ(load.errors[0].path, "imds.port");
}

TEST_F(LoadSpec, VmInheritsHostOnViolation) {
  write("host.json", R"({"on_violation": {"action": "terminate", "systemd_unit": "microvm@{vm}.service"}})");
  write("vms.d/vm1.json", vm_json({{"on_violation", R"({"window_ms": 10})"}}));
  SpecLoad load = load_spec(dir_);
  ASSERT_TRUE(load.ok()) << describe(load.errors);
  const ViolationPolicy& p = load.spec.vms.at(0).on_violation;
  EXPECT_EQ(p.action, Action::terminate);
  EXPECT_EQ(p.systemd_unit, "microvm@{vm}.service");
  EXPECT_EQ(p.window_ms, 10u);
}

// ---- shipped examples --------------------------------------------------------------

TEST(Examples, EveryExampleLoadsWithoutErrors) {
  fs::path root = VMFENCE_SOURCE_DIR;
  std::vector<fs::path> dirs = {root / "config/example"};
  for (const auto& entry : fs::directory_iterator(root / "config/examples")) {
    if (!entry.is_directory()) continue;
    if (fs::exists(entry.path() / "host.json")) {
      dirs.push_back(entry.path());
      continue;
    }
    // A several-host example (fleet/): one config dir per host.
    for (const auto& host : fs::directory_iterator(entry.path()))
      if (host.is_directory() && fs::exists(host.path() / "host.json")) dirs.push_back(host.path());
  }
  EXPECT_GE(dirs.size(), 7u);
  EXPECT_NE(std::find(dirs.begin(), dirs.end(), root / "config/examples/fleet/hv2"), dirs.end());
  for (const auto& dir : dirs) {
    SpecLoad load = load_spec(dir);
    EXPECT_TRUE(load.ok()) << dir << ":\n" << describe(load.errors);
    EXPECT_FALSE(load.spec.vms.empty()) << dir;
  }
}

}  // namespace
