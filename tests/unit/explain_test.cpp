// `vmfence explain`: target parsing and the user-space verdict with its rule.
#include <gtest/gtest.h>

#include "agent/cli/commands.h"

namespace vmfence {
namespace {

Spec two_vms() {
  std::vector<SpecError> e;
  Spec s;
  s.host = parse_host("host.json", R"({"imds": {"address": "169.254.169.254", "port": 80}})", e);
  s.vms.push_back(*parse_vm("vm1.json", R"({"name": "vm1", "interface": "t1", "mac": "02:00:00:00:01:02",
      "addresses": ["10.1.0.2/32"], "group": "a",
      "egress": [{"to": "0.0.0.0/0", "proto": "tcp", "ports": ["443"]},
                 {"to": "203.0.113.7/32", "proto": "udp", "ports": ["51900"]}]})",
                            s.host.on_violation, e));
  s.vms.push_back(*parse_vm("vm2.json", R"({"name": "vm2", "interface": "t2", "mac": "02:00:00:00:02:02",
      "addresses": ["10.2.0.2/32"], "group": "b"})",
                            s.host.on_violation, e));
  s.vms.push_back(*parse_vm("vm3.json", R"({"name": "vm3", "interface": "t3", "mac": "02:00:00:00:03:02",
      "addresses": ["10.3.0.2/32"], "group": "a", "mode": "direct", "imds": true})",
                            s.host.on_violation, e));
  EXPECT_TRUE(e.empty());
  return s;
}

Target target(const std::string& t) {
  std::string why;
  auto r = parse_target(t, &why);
  EXPECT_TRUE(r) << why;
  return *r;
}

TEST(ParseTarget, Forms) {
  Target t = target("203.0.113.7:51900/udp");
  EXPECT_EQ(t.proto, Proto::udp);
  EXPECT_EQ(t.port, 51900);
  EXPECT_EQ(target("10.0.0.1:22").proto, Proto::tcp);
  EXPECT_EQ(target("10.0.0.1").proto, Proto::icmp);
  EXPECT_EQ(target("[fec0::1]:443/tcp").addr.family, 6);
  EXPECT_EQ(target("fec0::1").proto, Proto::icmpv6);
  std::string why;
  EXPECT_FALSE(parse_target("10.0.0.1:99999", &why));
  EXPECT_FALSE(parse_target("nowhere:80", &why));
  EXPECT_FALSE(parse_target("10.0.0.1:80/sctp", &why));
}

TEST(ExplainSpec, AllowedByTheLongestMatchingRule) {
  Spec s = two_vms();
  auto x = explain_spec(s, s.vms[0], target("203.0.113.7:51900/udp"));
  EXPECT_TRUE(x.allowed);
  EXPECT_NE(x.rule.find("egress[1]"), std::string::npos) << x.rule;
  x = explain_spec(s, s.vms[0], target("203.0.113.7:443/tcp"));
  EXPECT_TRUE(x.allowed);
  EXPECT_NE(x.rule.find("egress[0]"), std::string::npos) << x.rule;
}

TEST(ExplainSpec, DefaultDeny) {
  Spec s = two_vms();
  auto x = explain_spec(s, s.vms[0], target("198.51.100.1:80/tcp"));
  EXPECT_FALSE(x.allowed);
  EXPECT_EQ(x.reason, "egress_denied");
}

TEST(ExplainSpec, GroupsDecideVmToVm) {
  Spec s = two_vms();
  auto x = explain_spec(s, s.vms[0], target("10.2.0.2:443/tcp"));
  EXPECT_FALSE(x.allowed);
  EXPECT_EQ(x.reason, "cross_group");
  x = explain_spec(s, s.vms[0], target("10.3.0.2:22/tcp"));
  EXPECT_TRUE(x.allowed);
  EXPECT_NE(x.rule.find("same group"), std::string::npos);
}

TEST(ExplainSpec, ImdsNeedsTheFlagEvenUnderABroadRule) {
  Spec s = two_vms();
  auto x = explain_spec(s, s.vms[0], target("169.254.169.254:80/tcp"));
  EXPECT_FALSE(x.allowed);
  EXPECT_EQ(x.reason, "imds_denied");
  x = explain_spec(s, s.vms[2], target("169.254.169.254:80/tcp"));
  EXPECT_TRUE(x.allowed);
}

}  // namespace
}  // namespace vmfence
