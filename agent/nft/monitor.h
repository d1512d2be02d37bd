// nft::Monitor: nftables change notifications in the current network namespace; a
// change to table inet vmfence (by anyone but vmfence itself) is verified and, when
// the table is missing or different, repaired. Include agent/nft/nft.h.
#pragma once

#include "agent/nft/netlink.h"
#include "agent/nft/ruleset.h"
#include "agent/spec/spec.h"

struct mnl_socket;  // libmnl

namespace vmfence::nft {

// Watches nftables changes (NFNLGRP_NFTABLES) in the current network namespace.
// Poll fd() for POLLIN (edge or level), then call handle_readable().
class Monitor {
 public:
  Monitor() = default;
  ~Monitor();
  Monitor(const Monitor&) = delete;
  Monitor& operator=(const Monitor&) = delete;
  Monitor(Monitor&& other) noexcept;
  Monitor& operator=(Monitor&& other) noexcept;

  Result open();
  void close();
  int fd() const;  // -1 when not open

  // Drain pending events. When one concerned table inet vmfence (or events were lost),
  // verify the table against build_ruleset(spec) and re-apply it when missing or
  // different, logging what it found. Returns true when it re-applied successfully.
  bool handle_readable(const Spec& spec);
  bool handle_readable(const Ruleset& ruleset);

  // Drain only: true when a pending event concerned our table (or events were lost).
  bool drain();

 private:
  ::mnl_socket* sock_ = nullptr;
};

}  // namespace vmfence::nft
