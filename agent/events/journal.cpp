// Violations and action results to journald through libsystemd's native protocol.
#include "agent/events/journal.h"

#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <systemd/sd-journal.h>

#include <atomic>
#include <cctype>
#include <cstring>
#include <string>
#include <vector>

namespace vmfence {

namespace {

constexpr const char* kJournalSocket = "/run/systemd/journal/socket";

// Send failures (journald stopped after we started, socket full, ...) are
// warned about on the first one and then every 1000th, never per event.
std::atomic<uint64_t> g_send_failures{0};

void report_send_failure(int r) {
  uint64_t n = g_send_failures.fetch_add(1, std::memory_order_relaxed) + 1;
  if (n == 1 || n % 1000 == 0) {
    spdlog::warn("journal: sd_journal_send failed: {} ({} failure(s) so far)", std::strerror(-r), n);
  }
}

}  // namespace

Journal::Journal() {
  struct stat st {};
  available_ = ::stat(kJournalSocket, &st) == 0 && S_ISSOCK(st.st_mode);
  if (!available_) {
    spdlog::warn("no journal socket at {}: violations go to the log only", kJournalSocket);
  }
}

void Journal::violation(const Violation& v) const {
  if (!available_) return;
  std::vector<std::string> parts = {"MESSAGE=" + v.summary(), "PRIORITY=4",
                                    std::string("MESSAGE_ID=") + kViolationMessageId, "SYSLOG_IDENTIFIER=vmfence"};
  for (const auto& f : v.fields()) {
    std::string name = f.name;
    for (char& c : name) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
    parts.push_back("VMFENCE_" + name + "=" + f.value);
  }
  std::vector<iovec> iov;
  iov.reserve(parts.size());
  for (auto& p : parts) iov.push_back({p.data(), p.size()});
  int r = sd_journal_sendv(iov.data(), static_cast<int>(iov.size()));
  if (r < 0) report_send_failure(r);
}

void Journal::notice(int priority, const std::string& message, const std::string& vm, const char* message_id) const {
  if (!available_) return;
  if (priority < 0 || priority > 7) priority = 5;  // LOG_NOTICE
  int r = sd_journal_send("MESSAGE=%s", message.c_str(), "PRIORITY=%d", priority, "MESSAGE_ID=%s",
                          message_id ? message_id : kActionMessageId, "SYSLOG_IDENTIFIER=vmfence", "VMFENCE_VM=%s",
                          vm.c_str(), nullptr);
  if (r < 0) report_send_failure(r);
}

}  // namespace vmfence
