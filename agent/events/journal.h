// Violations to journald (sd_journal_send) when a journal socket exists.
#pragma once

#include "agent/events/violation.h"

namespace vmfence {

// MESSAGE_ID of every violation entry (journalctl MESSAGE_ID=...).
inline constexpr const char* kViolationMessageId = "6f1c2a7d9e3b4c58a0d1e2f3a4b5c6d7";
// MESSAGE_ID of "action taken" entries (terminate started / finished).
inline constexpr const char* kActionMessageId = "0b7e5d3c2a19487f9e6d5c4b3a291807";

class Journal {
 public:
  // Checks for /run/systemd/journal/socket once; logs (spdlog) once at start
  // when there is none.
  Journal();
  bool available() const { return available_; }
  // PRIORITY=4 entry with MESSAGE, MESSAGE_ID, VMFENCE_VM, VMFENCE_REASON,
  // VMFENCE_SRC, VMFENCE_DST, VMFENCE_PROTO, VMFENCE_DPORT, VMFENCE_MODE,
  // (+ VMFENCE_DIRECTION, VMFENCE_INTERFACE). No-op when unavailable.
  void violation(const Violation& v) const;
  // "suppressed N events for VM" / action results: PRIORITY given.
  void notice(int priority, const std::string& message, const std::string& vm,
              const char* message_id = kActionMessageId) const;

 private:
  bool available_ = false;
};

}  // namespace vmfence
