// Seeded, reproducible generator of random valid specs and of random and
// mutated frames for the differential fuzzer (std::mt19937_64 only: the same
// seed gives the same worlds and frames on every machine).
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "tests/fuzz/model.h"

namespace vmfence::fuzz {

// A spec set: the model's description and the same as spec text for the
// agent's parser.
struct GenWorld {
  MWorld model;
  std::string host_json;
  std::vector<std::string> vm_jsons;  // in model.vms order
};

// One frame at one hook of one VM.
struct Shot {
  size_t vm = 0;
  Hook hook = Hook::from_vm;
  uint32_t mark = 0;                 // skb->mark it carries in
  uint32_t ingress_vm = UINT32_MAX;  // to_vm: the VM whose TAP it entered by (mark set), else none
  std::vector<uint8_t> frame;
  std::string kind;  // what the generator meant ("tcp_egress", "ns/dad", ...) + "+mutation"
};

struct GenOptions {
  bool limits = true;  // the spec parser knows limits.flows
};

class Gen {
 public:
  Gen(uint64_t seed, GenOptions opt) : rng_(seed), opt_(opt) {}
  GenWorld world();
  // A scenario: one frame or a stateful sequence (flow then reply, fragment train).
  std::vector<Shot> scenario(const MWorld& w);

  // Random helpers (public for the driver).
  uint64_t u(uint64_t n) { return n ? rng_() % n : 0; }
  bool p(double prob) { return std::uniform_real_distribution<double>(0, 1)(rng_) < prob; }

 private:
  std::mt19937_64 rng_;
  GenOptions opt_;
  uint32_t frag_seq_ = 0;  // fragment ids: unique within a world
  // Scenario parts (gen.cpp).
  struct Env;
  void egress(Env& e, std::vector<Shot>& out);
  void ingress(Env& e, std::vector<Shot>& out);
  void flow_then_reply(Env& e, std::vector<Shot>& out);
  void peer_flow(Env& e, std::vector<Shot>& out);
  void fragments(Env& e, std::vector<Shot>& out);
  void arp(Env& e, std::vector<Shot>& out);
  void nd(Env& e, std::vector<Shot>& out);
  void mld_igmp(Env& e, std::vector<Shot>& out);
  void noise(Env& e, std::vector<Shot>& out);
  void spoof(Env& e, std::vector<Shot>& out);
  void flood(Env& e, std::vector<Shot>& out);
  void mutate(Env& e, Shot& s);
};

// Spec text of a world (for mismatch reports: a minimal spec keeps only some VMs).
std::string vm_json(const MVm& vm, bool limits);
std::string host_json(const MHost& h);

}  // namespace vmfence::fuzz
