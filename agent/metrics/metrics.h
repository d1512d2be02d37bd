// Prometheus metrics (README "Metrics"): GET /metrics on host.json's
// metrics.listen. The exposer answers on its own threads while the daemon is
// one event loop: counters are read from the per-CPU maps at scrape time
// (map lookups are thread safe), everything else comes from what the event
// loop last published here, under a mutex.
#pragma once

#include <prometheus/collectable.h>
#include <prometheus/metric_family.h>

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "maps/status.h"
#include "vmfence_abi.h"

namespace prometheus {
class Exposer;
}

namespace vmfence {

struct MapSet;

// A VM in force, as the daemon knows it (the maps hold no names).
struct MetricsVm {
  std::string name, interface, group, mode;
  uint32_t slot = 0;   // 0: no interface bound, so no counters of its own
  std::string action;  // on_violation.action: its actions series start at 0
};

struct ActionCount {
  uint64_t ok = 0, failed = 0;
};

// A map's fill level: entries as the writer counts them, no walk of the map.
struct MapFill {
  std::string name;  // the pin name, e.g. vmfence_vms_v1
  uint64_t entries = 0, capacity = 0;
};

// Hook for the fleet (DESIGN.md "fleet"): its gauges are emitted only when
// set, i.e. when host.json configures a fleet (nothing sets it yet).
struct FleetMetrics {
  uint64_t remote_vms = 0;
  double sync_age_seconds = 0;
};

// Everything a scrape reports besides the kernel's counters.
struct MetricsState {
  std::shared_ptr<const std::vector<MetricsVm>> vms;                   // sorted by name
  std::map<std::pair<std::string, std::string>, ActionCount> actions;  // (vm, action)
  uint64_t reloads_ok = 0, reloads_error = 0;
  std::vector<MapFill> maps;
  std::optional<FleetMetrics> fleet;
};

// Where a scrape reads a slot's counters and quarantine flag: the pinned
// maps, or a fake in the unit tests.
class CounterSource {
 public:
  virtual ~CounterSource() = default;
  virtual bool counters(uint32_t slot, vmfence_counters& out) const = 0;
  virtual bool quarantined(uint32_t slot) const = 0;
};
// Reads through duplicates of maps' counters and state fds (the source
// outlives nothing it borrows).
std::unique_ptr<CounterSource> map_counter_source(const MapSet& maps);

// The metric families of one scrape (families without samples left out).
// Drops are reported per reason only where non-zero: every reason of every VM
// in both directions would be 40 series per VM.
std::vector<prometheus::MetricFamily> collect_metrics(const MetricsState& state, const CounterSource& source);

// The collectable the exposer serves. Written by the event loop, read by the
// exposer's threads.
class MetricsCollector : public prometheus::Collectable {
 public:
  explicit MetricsCollector(std::unique_ptr<CounterSource> source) : source_(std::move(source)) {}
  void set_vms(std::vector<MetricsVm> vms);
  void set_maps(std::vector<MapFill> maps);
  void count_action(const std::string& vm, const std::string& action, bool ok);
  void forget_vm(const std::string& vm);  // removed: its action series go with it
  void count_reload(bool ok);
  void set_fleet(std::optional<FleetMetrics> fleet);
  MetricsState state() const;
  std::vector<prometheus::MetricFamily> Collect() const override;

 private:
  mutable std::mutex mu_;
  MetricsState state_;
  std::unique_ptr<CounterSource> source_;
};

// The HTTP endpoint. listen() binds (or unbinds with "") when the address
// changed or the last bind failed; a failure leaves the endpoint off and is
// returned for the log: enforcement never depends on it. Create it after the
// daemon blocked its signals: the exposer's threads inherit the mask, and a
// thread with SIGTERM unblocked would take it from the signalfd.
class MetricsServer {
 public:
  explicit MetricsServer(std::shared_ptr<MetricsCollector> collector);
  ~MetricsServer();
  Status listen(const std::string& address);
  // The port bound (0 when off).
  int port() const;
  // What it serves ("" when off).
  const std::string& address() const { return address_; }

 private:
  std::shared_ptr<MetricsCollector> collector_;
  std::unique_ptr<prometheus::Exposer> exposer_;
  std::string address_;  // what exposer_ serves
};

}  // namespace vmfence
