// Follows interfaces appearing and going away (RTNLGRP_LINK) without ever
// losing one: a receive error (ENOBUFS when the socket buffer overflowed in
// a burst of TAPs) re-lists every link and hands the full list over.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "maps/status.h"

struct nl_sock;
struct nl_msg;

namespace vmfence {

class LinkMonitor {
 public:
  struct Link {
    uint32_t ifindex = 0;
    std::string name;
  };
  using OnLink = std::function<void(bool added, uint32_t ifindex, const std::string& name)>;
  using OnResync = std::function<void(const std::vector<Link>& all)>;

  LinkMonitor(OnLink on_link, OnResync on_resync, int buffer_bytes = 8 << 20);
  ~LinkMonitor();
  LinkMonitor(const LinkMonitor&) = delete;
  LinkMonitor& operator=(const LinkMonitor&) = delete;

  Status open();
  int fd() const;
  // Receive everything pending; on any error, resync.
  void handle_readable();
  // Every link now (an RTM_GETLINK dump).
  static Status list_links(std::vector<Link>& out);

 private:
  static int on_msg(nl_msg* msg, void* arg);
  OnLink on_link_;
  OnResync on_resync_;
  int buffer_bytes_;
  nl_sock* sock_ = nullptr;
};

}  // namespace vmfence
