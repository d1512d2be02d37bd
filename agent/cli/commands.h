// The CLI subcommands other than `run`.
#pragma once

#include <optional>
#include <string>

#include "agent/spec/spec.h"

namespace vmfence {

int cmd_check(const std::string& config_dir);
int cmd_down(const std::string& config_dir);
struct StatusOptions {
  bool json = false;
  std::string vm;      // only this VM ("" = all)
  bool rules = false;  // each VM's egress and ingress tries as the kernel holds them
};
int cmd_status(const StatusOptions& opt);
int cmd_wait(const std::string& vm, double timeout_s);
int cmd_explain(const std::string& config_dir, const std::string& vm, const std::string& to);
// Drops from the running daemon as they happen; exit 1 when none runs, 2 for
// an unknown reason, 0 on SIGINT/SIGTERM.
struct MonitorOptions {
  std::string vm;      // only this VM ("" = all)
  std::string reason;  // only this reason name ("" = all)
  bool json = false;   // JSON lines instead of text
};
int cmd_monitor(const MonitorOptions& opt);

// A destination for `explain`: "IP", "IP:PORT/PROTO", "IP/PROTO", "[v6]:PORT/PROTO".
struct Target {
  Cidr addr;  // full length
  Proto proto = Proto::tcp;
  uint16_t port = 0;
  bool has_port = false;
};
std::optional<Target> parse_target(const std::string& text, std::string* why);

// The user-space verdict for a packet from `vm` to `t`, with the rule (or
// the absence of one) that decides it.
struct Explanation {
  bool allowed = false;
  std::string reason;  // drop reason name when denied
  std::string rule;    // "egress[1] {to 0.0.0.0/0 tcp 80,443}", "same group 'mesh' (vm2)", ...
};
// A VM of another host (fleet), as `explain` sees it.
struct RemoteVm {
  std::string name, host, group;
  std::vector<Cidr> addresses;
};
Explanation explain_spec(const Spec& spec, const VmSpec& vm, const Target& t, const std::vector<RemoteVm>& remote = {});

}  // namespace vmfence
