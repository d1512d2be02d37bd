// Ring buffer consumer: decode each violation, log it, send it to journald,
// and start the VM's action when the datapath says the threshold was reached.
#pragma once

#include <functional>
#include <map>
#include <set>
#include <string>
#include <utility>

#include "agent/events/journal.h"
#include "agent/events/violation.h"
#include "agent/spec/spec.h"
#include "maps/status.h"
#include "vmfence_abi.h"

struct ring_buffer;

namespace vmfence {

class MonitorServer;

// Decode one event; `vm` may be null (interface without a VM).
Violation decode_event(const vmfence_event& e, const VmSpec* vm);
// Address text of a 16-byte (IPv4-mapped) address.
std::string addr_str(const uint8_t addr[16], int family);

class EventConsumer {
 public:
  // lookup: vm_id -> spec (null when unknown).
  using Lookup = std::function<const VmSpec*(uint32_t vm_id)>;
  // on_trigger: a VM reached its on_violation threshold (the action is the
  // daemon's: events does not depend on actions). Called before journald,
  // which may block.
  using OnTrigger = std::function<void(const VmSpec& vm, const Violation& v, uint64_t packet_ns)>;
  EventConsumer(const Journal& journal, OnTrigger on_trigger, Lookup lookup);
  ~EventConsumer();
  Status open(int events_map_fd);
  int fd() const;  // epoll fd of the ring buffer
  // Consume everything available; returns events handled.
  int consume();
  uint64_t handled() const { return handled_; }
  // Every event also goes to `vmfence monitor` clients (null: none).
  void set_monitor(MonitorServer* monitor) { monitor_ = monitor; }
  // VMs that had events since the last call (the only ones whose budget
  // can have run out), then forgets them.
  std::set<uint32_t> take_active_vms() { return std::exchange(active_, {}); }

 private:
  static int on_sample(void* ctx, void* data, size_t size);
  void handle(const vmfence_event& e);

  const Journal& journal_;
  OnTrigger on_trigger_;
  Lookup lookup_;
  MonitorServer* monitor_ = nullptr;
  ring_buffer* rb_ = nullptr;
  uint64_t handled_ = 0;
  std::set<uint32_t> active_;
};

}  // namespace vmfence
