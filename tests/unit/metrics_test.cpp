// The Prometheus collector over a fake counter source, and the endpoint on
// the loopback (no root needed).
#include "agent/metrics/metrics.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <prometheus/text_serializer.h>
#include <sys/socket.h>
#include <unistd.h>

#include <filesystem>
#include <map>
#include <set>
#include <string>

#include "maps/status.h"
#include "vmfence_abi.h"

namespace vmfence {
namespace {

class FakeCounters : public CounterSource {
 public:
  bool counters(uint32_t slot, vmfence_counters& out) const override {
    auto it = counters_.find(slot);
    if (it == counters_.end()) return false;
    out = it->second;
    return true;
  }
  bool quarantined(uint32_t slot) const override { return quarantined_.count(slot) > 0; }
  std::map<uint32_t, vmfence_counters> counters_;
  std::set<uint32_t> quarantined_;
};

std::string text_of(const std::vector<prometheus::MetricFamily>& families) {
  return prometheus::TextSerializer().Serialize(families);
}

MetricsState two_vms() {
  MetricsState st;
  st.vms = std::make_shared<const std::vector<MetricsVm>>(std::vector<MetricsVm>{
      {"vm1", "tap1", "web", "filtered", 3, "terminate"},
      {"vm2", "tap2", "vm2", "conntrack", 0, "alert"},  // interface absent: no counters
  });
  return st;
}

TEST(MetricsCollect, CountersPerDirectionFromTheSlot) {
  FakeCounters src;
  vmfence_counters c{};
  c.from_vm_packets = 10;
  c.from_vm_bytes = 1000;
  c.to_vm_packets = 7;
  c.to_vm_bytes = 700;
  c.events_suppressed = 4;
  c.events_lost = 2;
  c.drops[VMFENCE_REASON_SPOOFED_IP] = 3;  // 1 of them to the VM
  c.to_vm_drops[VMFENCE_REASON_SPOOFED_IP] = 1;
  c.drops[VMFENCE_REASON_INGRESS_DENIED] = 5;
  c.to_vm_drops[VMFENCE_REASON_INGRESS_DENIED] = 5;
  src.counters_[3] = c;
  src.counters_[0] = c;  // slot 0 (interfaces without a VM) is never a VM's
  src.quarantined_.insert(3);
  std::string text = text_of(collect_metrics(two_vms(), src));

  for (const char* line : {
           R"(vmfence_vm_info{vm="vm1",interface="tap1",group="web",mode="filtered"} 1)",
           R"(vmfence_vm_info{vm="vm2",interface="tap2",group="vm2",mode="conntrack"} 1)",
           R"(vmfence_vm_packets_total{vm="vm1",direction="from_vm"} 10)",
           R"(vmfence_vm_packets_total{vm="vm1",direction="to_vm"} 7)",
           R"(vmfence_vm_bytes_total{vm="vm1",direction="from_vm"} 1000)",
           R"(vmfence_vm_bytes_total{vm="vm1",direction="to_vm"} 700)",
           R"(vmfence_vm_drops_total{vm="vm1",direction="from_vm",reason="spoofed_ip"} 2)",
           R"(vmfence_vm_drops_total{vm="vm1",direction="to_vm",reason="spoofed_ip"} 1)",
           R"(vmfence_vm_drops_total{vm="vm1",direction="to_vm",reason="ingress_denied"} 5)",
           R"(vmfence_vm_quarantined{vm="vm1"} 1)",
           R"(vmfence_vm_quarantined{vm="vm2"} 0)",
           R"(vmfence_events_suppressed_total{vm="vm1"} 4)",
           R"(vmfence_events_lost_total{vm="vm1"} 2)",
           R"(vmfence_reloads_total{result="ok"} 0)",
           R"(vmfence_reloads_total{result="error"} 0)",
           // Each VM's action from 0, before it ever ran.
           R"(vmfence_actions_total{vm="vm1",action="terminate",result="ok"} 0)",
           R"(vmfence_actions_total{vm="vm1",action="terminate",result="failed"} 0)",
           R"(vmfence_actions_total{vm="vm2",action="alert",result="ok"} 0)",
       })
    EXPECT_NE(text.find(std::string(line) + "\n"), std::string::npos) << line << "\nin:\n" << text;
  // Zero reasons and directions are left out; the unbound VM has no counters.
  EXPECT_EQ(text.find(R"(direction="from_vm",reason="ingress_denied")"), std::string::npos) << text;
  EXPECT_EQ(text.find(R"(reason="cross_group")"), std::string::npos) << text;
  EXPECT_EQ(text.find(R"(vmfence_vm_packets_total{vm="vm2")"), std::string::npos) << text;
  // Every family says what it is.
  for (const char* name : {"vmfence_vm_info", "vmfence_vm_packets_total", "vmfence_vm_bytes_total",
                           "vmfence_vm_drops_total", "vmfence_vm_quarantined", "vmfence_events_suppressed_total",
                           "vmfence_events_lost_total", "vmfence_reloads_total"}) {
    EXPECT_NE(text.find(std::string("# HELP ") + name + " "), std::string::npos) << name;
    EXPECT_NE(text.find(std::string("# TYPE ") + name + " "), std::string::npos) << name;
  }
  EXPECT_NE(text.find("# TYPE vmfence_vm_drops_total counter"), std::string::npos);
  EXPECT_NE(text.find("# TYPE vmfence_vm_quarantined gauge"), std::string::npos);
  // No fleet configured: no fleet gauges.
  EXPECT_EQ(text.find("vmfence_fleet"), std::string::npos);
}

TEST(MetricsCollect, ActionsReloadsMapsAndFleet) {
  FakeCounters src;
  MetricsCollector collector(std::make_unique<FakeCounters>());
  collector.set_vms(*two_vms().vms);
  collector.count_action("vm1", "terminate", true);
  collector.count_action("vm1", "terminate", false);
  collector.count_action("vm1", "terminate", true);
  collector.count_action("vm2", "alert", true);
  collector.count_reload(true);
  collector.count_reload(true);
  collector.count_reload(false);
  collector.set_maps({{VMFENCE_MAP_VMS, 2, VMFENCE_MAX_VMS}});
  std::string text = text_of(collector.Collect());
  for (const char* line : {
           R"(vmfence_actions_total{vm="vm1",action="terminate",result="ok"} 2)",
           R"(vmfence_actions_total{vm="vm1",action="terminate",result="failed"} 1)",
           R"(vmfence_actions_total{vm="vm2",action="alert",result="ok"} 1)",
           R"(vmfence_actions_total{vm="vm2",action="alert",result="failed"} 0)",
           R"(vmfence_reloads_total{result="ok"} 2)",
           R"(vmfence_reloads_total{result="error"} 1)",
           R"(vmfence_map_entries{map="vmfence_vms_v1"} 2)",
           R"(vmfence_map_capacity{map="vmfence_vms_v1"} 16384)",
       })
    EXPECT_NE(text.find(std::string(line) + "\n"), std::string::npos) << line << "\nin:\n" << text;

  collector.forget_vm("vm1");  // removed: its series go
  collector.set_vms({(*two_vms().vms)[1]});
  collector.set_fleet(FleetMetrics{12, 1.5});
  text = text_of(collector.Collect());
  EXPECT_EQ(text.find(R"(vm="vm1",action=)"), std::string::npos) << text;
  EXPECT_NE(text.find("vmfence_fleet_remote_vms 12\n"), std::string::npos) << text;
  EXPECT_NE(text.find("vmfence_fleet_sync_age_seconds 1.5\n"), std::string::npos) << text;
}

// A free loopback port (bound and released).
int free_port() {
  Fd s(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(a);
  if (bind(s.get(), reinterpret_cast<sockaddr*>(&a), len) != 0) return 0;
  getsockname(s.get(), reinterpret_cast<sockaddr*>(&a), &len);
  return ntohs(a.sin_port);
}

// The body of GET path from 127.0.0.1:port ("" when nothing answers).
std::string http_get(int port, const char* path = "/metrics") {
  Fd s(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(s.get(), reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) return "";
  std::string req = std::string("GET ") + path + " HTTP/1.0\r\nHost: x\r\n\r\n";
  if (write(s.get(), req.data(), req.size()) != static_cast<ssize_t>(req.size())) return "";
  std::string out;
  char buf[4096];
  ssize_t n;
  while ((n = read(s.get(), buf, sizeof(buf))) > 0) out.append(buf, static_cast<size_t>(n));
  return out;
}

TEST(MetricsServer, ServesRebindsAndSurvivesABusyPort) {
  auto collector = std::make_shared<MetricsCollector>(std::make_unique<FakeCounters>());
  collector->set_vms(*two_vms().vms);
  MetricsServer server(collector);
  int port = free_port();
  ASSERT_NE(port, 0);
  std::string addr = "127.0.0.1:" + std::to_string(port);
  ASSERT_TRUE(server.listen(addr)) << server.listen(addr).message;
  EXPECT_EQ(server.port(), port);
  std::string body = http_get(port);
  EXPECT_NE(body.find("200 OK"), std::string::npos) << body;
  EXPECT_NE(body.find(R"(vmfence_vm_info{vm="vm1",interface="tap1",group="web",mode="filtered"} 1)"), std::string::npos)
      << body;

  // Its sockets do not leak into the actions' children.
  for (const auto& e : std::filesystem::directory_iterator("/proc/self/fd")) {
    std::error_code ec;
    auto target = std::filesystem::read_symlink(e.path(), ec).string();
    if (ec || target.rfind("socket:", 0) != 0) continue;
    int fd = std::stoi(e.path().filename().string());
    int flags = fcntl(fd, F_GETFD);
    EXPECT_TRUE(flags >= 0 && (flags & FD_CLOEXEC)) << "socket fd " << fd << " without FD_CLOEXEC";
  }

  // The same address again: nothing changes. Another port: rebinds.
  EXPECT_TRUE(server.listen(addr));
  int port2 = free_port();
  std::string addr2 = "127.0.0.1:" + std::to_string(port2);
  ASSERT_TRUE(server.listen(addr2));
  EXPECT_EQ(http_get(port), "") << "the old port still answers";
  EXPECT_NE(http_get(port2).find("vmfence_vm_info"), std::string::npos);

  // An IPv6 address (civetweb's "[::1]:PORT"): served, or refused saying
  // why where civetweb was built without IPv6 (Debian 12).
  int port6 = free_port();
  Status v6 = server.listen("[::1]:" + std::to_string(port6));
  if (v6)
    EXPECT_EQ(server.port(), port6);
  else
    EXPECT_NE(v6.message.find("this civetweb has no IPv6"), std::string::npos) << v6.message;

  // "" turns it off.
  ASSERT_TRUE(server.listen(""));
  EXPECT_EQ(server.port(), 0);
  EXPECT_EQ(http_get(port2), "");

  // A port someone else holds: an error naming the cause, nothing served;
  // once free, the next listen() binds.
  MetricsServer other(collector);
  ASSERT_TRUE(other.listen(addr));
  Status busy = server.listen(addr);
  EXPECT_FALSE(busy);
  EXPECT_NE(busy.message.find("Address already in use"), std::string::npos) << busy.message;
  EXPECT_EQ(server.port(), 0);
  ASSERT_TRUE(other.listen(""));
  EXPECT_TRUE(server.listen(addr));
  EXPECT_NE(http_get(port).find("vmfence_vm_info"), std::string::npos);
}

}  // namespace
}  // namespace vmfence
