// Violation::summary: the one-line text used in logs and as the journal MESSAGE.
#include "agent/events/violation.h"

namespace vmfence {

std::string Violation::summary() const {
  // "vm1: cross_group from_vm 10.1.0.2 -> 10.2.0.2 tcp/22"
  std::string s;
  s.reserve(96);
  if (!vm.empty()) {
    s += vm;
  } else if (!interface.empty()) {
    s += interface;  // a TAP without a VM: name the interface instead
  } else {
    s += "?";
  }
  s += ": ";
  s += reason.empty() ? "violation" : reason;
  if (!direction.empty()) {
    s += ' ';
    s += direction;
  }
  if (!src.empty() || !dst.empty()) {
    s += ' ';
    s += src.empty() ? "?" : src;
    s += " -> ";
    s += dst.empty() ? "?" : dst;
  }
  if (!proto.empty()) {
    s += ' ';
    s += proto;
    if (dport != 0) {
      s += '/';
      s += std::to_string(dport);
    }
  } else if (dport != 0) {
    s += " port ";
    s += std::to_string(dport);
  }
  if (quarantined) s += " [quarantined]";
  return s;
}

std::vector<ViolationField> Violation::fields() const {
  return {{"vm", vm},     {"reason", reason},       {"src", src},
          {"dst", dst},   {"proto", proto},         {"dport", std::to_string(dport), true},
          {"mode", mode}, {"direction", direction}, {"interface", interface}};
}

}  // namespace vmfence
