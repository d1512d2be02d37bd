#include "agent/events/events.h"

#include <arpa/inet.h>
#include <bpf/libbpf.h>
#include <spdlog/spdlog.h>

#include <chrono>
#include <cstring>

#include "agent/events/monitor_server.h"
#include "maps/reasons.h"

namespace vmfence {

std::string addr_str(const uint8_t addr[16], int family) {
  char buf[INET6_ADDRSTRLEN] = "";
  if (family == 4)
    inet_ntop(AF_INET, addr + 12, buf, sizeof(buf));
  else
    inet_ntop(AF_INET6, addr, buf, sizeof(buf));
  return buf;
}

Violation decode_event(const vmfence_event& e, const VmSpec* vm) {
  Violation v;
  if (vm) {
    v.vm = vm->name;
    v.interface = vm->interface;
  }
  v.reason = reason_name(e.reason);
  v.direction = direction_name(e.direction);
  v.mode = datapath_mode_name(e.mode);
  v.timestamp_ns = e.timestamp_ns;
  v.trigger = e.flags & VMFENCE_EVENT_F_TRIGGER;
  v.quarantined = e.flags & VMFENCE_EVENT_F_QUARANTINED;
  if (e.family == 4 || e.family == 6) {
    v.src = addr_str(e.saddr, e.family);
    v.dst = addr_str(e.daddr, e.family);
    v.proto = e.ethertype == 0x0806 ? "arp" : l4_proto_name(e.proto);
    v.sport = e.sport;
    v.dport = e.dport;
  } else {
    char mac[18];
    snprintf(mac, sizeof(mac), "%02x:%02x:%02x:%02x:%02x:%02x", e.smac[0], e.smac[1], e.smac[2], e.smac[3], e.smac[4],
             e.smac[5]);
    v.src = mac;
    v.proto = fmt::format("ethertype:0x{:04x}", e.ethertype);
  }
  return v;
}

EventConsumer::EventConsumer(const Journal& journal, OnTrigger on_trigger, Lookup lookup)
    : journal_(journal), on_trigger_(std::move(on_trigger)), lookup_(std::move(lookup)) {}

EventConsumer::~EventConsumer() {
  if (rb_) ring_buffer__free(rb_);
}

Status EventConsumer::open(int events_map_fd) {
  rb_ = ring_buffer__new(events_map_fd, &EventConsumer::on_sample, this, nullptr);
  if (!rb_) return Status::error(errno, "open violation ring buffer");
  return {};
}

int EventConsumer::fd() const { return rb_ ? ring_buffer__epoll_fd(rb_) : -1; }

int EventConsumer::consume() { return rb_ ? ring_buffer__consume(rb_) : 0; }

int EventConsumer::on_sample(void* ctx, void* data, size_t size) {
  if (size < sizeof(vmfence_event)) return 0;
  vmfence_event e;
  std::memcpy(&e, data, sizeof(e));
  static_cast<EventConsumer*>(ctx)->handle(e);
  return 0;
}

void EventConsumer::handle(const vmfence_event& e) {
  ++handled_;
  active_.insert(e.vm_id);
  const VmSpec* vm = lookup_(e.vm_id);
  Violation v = decode_event(e, vm);
  spdlog::warn("violation vm={} reason={} dir={} src={} dst={} proto={} sport={} dport={} mode={}{}",
               v.vm.empty() ? "-" : v.vm, v.reason, v.direction, v.src, v.dst, v.proto, v.sport, v.dport, v.mode,
               v.quarantined ? " quarantined=1" : "");
  // The action first: sd_journal_send may block on a slow journald. The
  // monitor never blocks.
  if (vm && v.trigger && on_trigger_) on_trigger_(*vm, v, e.timestamp_ns);
  if (monitor_) monitor_->publish(v);
  journal_.violation(v);
}

}  // namespace vmfence
