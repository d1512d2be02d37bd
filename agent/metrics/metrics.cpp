#include "agent/metrics/metrics.h"

#include <arpa/inet.h>
#include <civetweb.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <prometheus/exposer.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <exception>

#include "agent/spec/spec.h"
#include "maps/pinned_maps.h"
#include "maps/reasons.h"

namespace vmfence {

namespace {

using prometheus::ClientMetric;
using prometheus::MetricFamily;
using prometheus::MetricType;

class MapCounterSource : public CounterSource {
 public:
  explicit MapCounterSource(const MapSet& maps) {
    maps_.counters.reset(fcntl_dup(maps.counters.get()));
    maps_.state.reset(fcntl_dup(maps.state.get()));
  }
  bool counters(uint32_t slot, vmfence_counters& out) const override { return read_counters(maps_, slot, out).ok(); }
  bool quarantined(uint32_t slot) const override {
    vmfence_state st{};
    return read_state(maps_, slot, st).ok() && st.quarantined;
  }

 private:
  static int fcntl_dup(int fd) { return fd < 0 ? -1 : fcntl(fd, F_DUPFD_CLOEXEC, 0); }
  MapSet maps_;  // counters and state only
};

MetricFamily family(const char* name, const char* help, MetricType type) {
  MetricFamily f;
  f.name = name;
  f.help = help;
  f.type = type;
  return f;
}

void add(MetricFamily& f, std::vector<ClientMetric::Label> labels, double value) {
  ClientMetric m;
  m.label = std::move(labels);
  if (f.type == MetricType::Counter)
    m.counter.value = value;
  else
    m.gauge.value = value;
  f.metric.push_back(std::move(m));
}

// civetweb says only that it could not start: bind a socket the same way
// first for the errno (address in use, not an address of this host).
Status try_bind(const std::string& address) {
  std::string why;
  auto l = parse_listen(address, &why);
  if (!l) return {EINVAL, "metrics: " + address + ": " + why};
  sockaddr_storage ss{};
  socklen_t len = 0;
  if (l->address.family == 4) {
    auto* a = reinterpret_cast<sockaddr_in*>(&ss);
    a->sin_family = AF_INET;
    a->sin_port = htons(l->port);
    std::memcpy(&a->sin_addr, l->address.addr.data() + 12, 4);
    len = sizeof(*a);
  } else {
    auto* a = reinterpret_cast<sockaddr_in6*>(&ss);
    a->sin6_family = AF_INET6;
    a->sin6_port = htons(l->port);
    std::memcpy(&a->sin6_addr, l->address.addr.data(), 16);
    len = sizeof(*a);
  }
  Fd s(socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0));
  int one = 1;
  if (!s.valid() || setsockopt(s.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) != 0 ||
      bind(s.get(), reinterpret_cast<sockaddr*>(&ss), len) != 0)
    return Status::error(errno, "metrics: cannot listen on " + address);
  return {};
}

}  // namespace

std::unique_ptr<CounterSource> map_counter_source(const MapSet& maps) {
  return std::make_unique<MapCounterSource>(maps);
}

std::vector<MetricFamily> collect_metrics(const MetricsState& state, const CounterSource& source) {
  auto info = family("vmfence_vm_info", "A VM in force: its interface, group and mode (always 1).", MetricType::Gauge);
  auto packets = family("vmfence_vm_packets_total",
                        "Packets a VM's hooks saw, dropped ones included, by direction (from_vm: sent by the VM).",
                        MetricType::Counter);
  auto bytes =
      family("vmfence_vm_bytes_total", "Bytes of the packets in vmfence_vm_packets_total.", MetricType::Counter);
  auto drops = family("vmfence_vm_drops_total",
                      "Packets dropped, by direction and drop reason (reasons with no drop yet are not listed).",
                      MetricType::Counter);
  auto quarantined = family("vmfence_vm_quarantined",
                            "1 while the datapath quarantines the VM (terminate action after a violation), else 0.",
                            MetricType::Gauge);
  auto suppressed = family("vmfence_events_suppressed_total",
                           "Violation events not sent: over the per-VM event budget (the drops are still counted).",
                           MetricType::Counter);
  auto lost =
      family("vmfence_events_lost_total",
             "Violation events lost: the ring buffer was full (the drops are still counted).", MetricType::Counter);
  auto actions = family("vmfence_actions_total",
                        "on_violation actions by result: alert (threshold reached and reported), terminate (one per "
                        "command, systemd_unit or qmp_socket run).",
                        MetricType::Counter);
  auto entries = family("vmfence_map_entries", "Entries the agent has written to a pinned map.", MetricType::Gauge);
  auto capacity = family("vmfence_map_capacity", "The most entries a pinned map holds.", MetricType::Gauge);
  auto reloads = family("vmfence_reloads_total",
                        "Reloads of the spec files: ok, or error (host.json invalid, or a file refused or not "
                        "installed).",
                        MetricType::Counter);

  static const std::vector<MetricsVm> kNone;
  const auto& vms = state.vms ? *state.vms : kNone;
  for (const auto& vm : vms) {
    add(info, {{"vm", vm.name}, {"interface", vm.interface}, {"group", vm.group}, {"mode", vm.mode}}, 1);
    vmfence_counters c{};
    // Slot 0 holds the packets of interfaces without a VM: not this VM's.
    bool bound = vm.slot != 0 && source.counters(vm.slot, c);
    add(quarantined, {{"vm", vm.name}}, bound && source.quarantined(vm.slot) ? 1 : 0);
    if (!bound) continue;
    add(packets, {{"vm", vm.name}, {"direction", "from_vm"}}, static_cast<double>(c.from_vm_packets));
    add(packets, {{"vm", vm.name}, {"direction", "to_vm"}}, static_cast<double>(c.to_vm_packets));
    add(bytes, {{"vm", vm.name}, {"direction", "from_vm"}}, static_cast<double>(c.from_vm_bytes));
    add(bytes, {{"vm", vm.name}, {"direction", "to_vm"}}, static_cast<double>(c.to_vm_bytes));
    for (uint8_t r = 1; r < VMFENCE_REASON_COUNT; ++r) {  // 0 is "none", not a drop
      uint64_t to_vm = std::min(c.to_vm_drops[r], c.drops[r]);
      uint64_t from_vm = c.drops[r] - to_vm;
      if (from_vm)
        add(drops, {{"vm", vm.name}, {"direction", "from_vm"}, {"reason", reason_name(r)}},
            static_cast<double>(from_vm));
      if (to_vm)
        add(drops, {{"vm", vm.name}, {"direction", "to_vm"}, {"reason", reason_name(r)}}, static_cast<double>(to_vm));
    }
    add(suppressed, {{"vm", vm.name}}, static_cast<double>(c.events_suppressed));
    add(lost, {{"vm", vm.name}}, static_cast<double>(c.events_lost));
  }
  // Every VM's action starts at 0: a series born at 1 hides its first
  // increase from increase() and rate().
  auto counted = state.actions;
  for (const auto& vm : vms)
    if (!vm.action.empty()) counted.try_emplace({vm.name, vm.action});
  for (const auto& [key, n] : counted) {
    add(actions, {{"vm", key.first}, {"action", key.second}, {"result", "ok"}}, static_cast<double>(n.ok));
    add(actions, {{"vm", key.first}, {"action", key.second}, {"result", "failed"}}, static_cast<double>(n.failed));
  }
  for (const auto& m : state.maps) {
    add(entries, {{"map", m.name}}, static_cast<double>(m.entries));
    add(capacity, {{"map", m.name}}, static_cast<double>(m.capacity));
  }
  add(reloads, {{"result", "ok"}}, static_cast<double>(state.reloads_ok));
  add(reloads, {{"result", "error"}}, static_cast<double>(state.reloads_error));

  std::vector<MetricFamily> out;
  for (auto* f :
       {&info, &packets, &bytes, &drops, &quarantined, &suppressed, &lost, &actions, &entries, &capacity, &reloads})
    if (!f->metric.empty()) out.push_back(std::move(*f));
  if (state.fleet) {
    auto remote = family("vmfence_fleet_remote_vms", "VMs of other hosts known from the fleet.", MetricType::Gauge);
    add(remote, {}, static_cast<double>(state.fleet->remote_vms));
    auto age =
        family("vmfence_fleet_sync_age_seconds", "Seconds since the fleet view was last in sync.", MetricType::Gauge);
    add(age, {}, state.fleet->sync_age_seconds);
    out.push_back(std::move(remote));
    out.push_back(std::move(age));
  }
  return out;
}

void MetricsCollector::set_vms(std::vector<MetricsVm> vms) {
  auto shared = std::make_shared<const std::vector<MetricsVm>>(std::move(vms));
  std::lock_guard lock(mu_);
  state_.vms = std::move(shared);
}

void MetricsCollector::set_maps(std::vector<MapFill> maps) {
  std::lock_guard lock(mu_);
  state_.maps = std::move(maps);
}

void MetricsCollector::count_action(const std::string& vm, const std::string& action, bool ok) {
  std::lock_guard lock(mu_);
  auto& n = state_.actions[{vm, action}];
  ++(ok ? n.ok : n.failed);
}

void MetricsCollector::forget_vm(const std::string& vm) {
  std::lock_guard lock(mu_);
  std::erase_if(state_.actions, [&](const auto& kv) { return kv.first.first == vm; });
}

void MetricsCollector::count_reload(bool ok) {
  std::lock_guard lock(mu_);
  ++(ok ? state_.reloads_ok : state_.reloads_error);
}

void MetricsCollector::set_fleet(std::optional<FleetMetrics> fleet) {
  std::lock_guard lock(mu_);
  state_.fleet = fleet;
}

MetricsState MetricsCollector::state() const {
  std::lock_guard lock(mu_);
  return state_;  // the VM list is shared, not copied
}

std::vector<MetricFamily> MetricsCollector::Collect() const {
  // The map reads happen outside the lock: the event loop never waits for a
  // scrape.
  return collect_metrics(state(), *source_);
}

MetricsServer::MetricsServer(std::shared_ptr<MetricsCollector> collector) : collector_(std::move(collector)) {}

MetricsServer::~MetricsServer() = default;

Status MetricsServer::listen(const std::string& address) {
  if (address == address_ && (exposer_ || address.empty())) return {};
  exposer_.reset();  // the old address is free before a rebind (the same port, another address)
  address_.clear();
  if (address.empty()) return {};
  if (auto s = try_bind(address); !s) return s;
  if (address.starts_with("[") && !mg_check_feature(8))  // 8: IPv6 (Debian 12's civetweb has none)
    return {EAFNOSUPPORT, "metrics: cannot listen on " + address + ": this civetweb has no IPv6 (use an IPv4 address)"};
  try {
    // civetweb's listening_ports: "127.0.0.1:9727" or "[::1]:9727" (the
    // spec allows nothing else: no "s" or "r" suffixes). Two threads: a
    // scrape reads 16,384 slots at most, no need for more.
    exposer_ = std::make_unique<prometheus::Exposer>(address, 2);
  } catch (const std::exception& e) {
    return {EADDRNOTAVAIL, "metrics: cannot listen on " + address + ": " + e.what()};
  }
  exposer_->RegisterCollectable(collector_);
  address_ = address;
  return {};
}

int MetricsServer::port() const {
  if (!exposer_) return 0;
  auto ports = exposer_->GetListeningPorts();
  return ports.empty() ? 0 : ports.front();
}

}  // namespace vmfence
