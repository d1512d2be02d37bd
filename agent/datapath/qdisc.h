// The root qdisc that paces a rate-limited VM's incoming traffic: the to-VM
// program stamps each packet with its departure time (EDT) and fq on the TAP
// holds it until then (README, "Rate limits"); tbf where the kernel has no fq. vmfence's own fq
// carries a fixed handle, so it never removes a qdisc it did not install.
#pragma once

#include <cstdint>
#include <map>
#include <string>

#include "maps/status.h"

namespace vmfence {

constexpr uint32_t kPacingQdiscHandle = 0x766d0000;  // "vm":0

// Install (or re-install) vmfence's fq as ifindex's root qdisc, or, on a
// kernel without sch_fq, a tbf shaping at bytes_per_s whose queue holds
// horizon_bytes. *kind: which ("fq", "tbf"). Only over the device's default
// root qdisc or vmfence's own: another root qdisc is left (EEXIST).
Status install_pacing_qdisc(uint32_t ifindex, uint64_t bytes_per_s, uint32_t horizon_bytes, std::string* kind);
// The root qdisc of every device in this namespace: handle (0 = the
// device's default) and kind, by ifindex.
struct RootQdisc {
  uint32_t handle = 0;
  std::string kind;
};
Status root_qdiscs(std::map<uint32_t, RootQdisc>& out);

// Remove it again; absent (or another root qdisc) is success.
Status remove_pacing_qdisc(uint32_t ifindex);

}  // namespace vmfence
