// nftables: vmfence's one table, `inet vmfence`, built with libnftnl and applied
// through libmnl as one netlink batch (never by shelling out to `nft`).
//
// What the table does (see README "NAT and IMDS"):
//   prerouting  (filter, mangle -150)  IMDSv2: restore the TTL/hop limit of IMDS replies
//                                      to NATed VMs (AWS sends the PUT token reply with 1)
//   forward     (filter, 0)            ct established,related accept;
//                                      to IMDS -> imds_forward; in from a WAN -> wan_to_vm
//   postrouting (nat, srcnat 100)      masquerade imds:true VMs -> IMDS; nothing else
//                                      toward IMDS; masquerade nat.masquerade out a WAN
//   imds_forward                       imds:true VMs (@imds_allowed4|6) may reach
//                                      imds.address:port; other VM addresses
//                                      (@imds_denied4|6) -> IMDS dropped
//   wan_to_vm                          VM ingress rules (@ingress_*) accepted; the rest to
//                                      VMs (@vm_addrs4|6, per-VM counters) dropped
// Per-VM and per-address matches are elements of named sets (ruleset.h SetDesc): the
// number of rules does not grow with the VMs.
//
// apply() replaces the table in one transaction (add table; delete table; add table,
// chains, sets, elements, rules): there is never a moment without NAT or with two copies, and a batch
// the kernel rejects leaves the previous table in force. Other tables are never touched.
//
// The one header the rest of vmfence includes; the module is three parts:
//   ruleset.h  the pure builder: Spec -> Ruleset (chains, rules, nft text, fingerprint)
//   netlink.h  libnftnl/libmnl: rule expressions, apply/remove/verify, table_intact
//   monitor.h  nft::Monitor: nftables change notifications -> verify and repair
#pragma once

#include "agent/nft/monitor.h"
#include "agent/nft/netlink.h"
#include "agent/nft/ruleset.h"
