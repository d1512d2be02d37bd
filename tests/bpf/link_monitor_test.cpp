// The link monitor never loses an interface: 500 TAPs are created at once
// while its socket is not read (with a small receive buffer the kernel drops
// notifications: ENOBUFS), then the monitor is read; replaying its on_link
// events and on_resync lists (as the daemon reconciles) must give all 500,
// and after they are deleted, none of them.
//
// Runs in a network namespace of its own, entered by this thread for the
// test and left (and so destroyed) afterwards. Needs root (see harness.h).
#include "agent/datapath/link_monitor.h"

#include <gtest/gtest.h>

#include <fstream>
#include <map>
#include <set>

#include "tests/bpf/harness.h"

using namespace vmfence;
using namespace vmfence::test;

namespace {

constexpr int kTaps = 500;

// This thread in a fresh network namespace for one scope.
class ScopedNetns {
 public:
  ScopedNetns() {
    saved_.reset(::open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC));
    if (!saved_.valid()) {
      error_ = std::string("open own netns: ") + std::strerror(errno);
      return;
    }
    if (unshare(CLONE_NEWNET) != 0) {
      error_ = std::string("unshare(CLONE_NEWNET): ") + std::strerror(errno);
      saved_.reset();
    }
  }
  ~ScopedNetns() {
    if (saved_.valid() && setns(saved_.get(), CLONE_NEWNET) != 0) std::perror("setns back");
  }
  const std::string& error() const { return error_; }

 private:
  Fd saved_;
  std::string error_;
};

// What the daemon would believe: links by ifindex, from events and resyncs.
struct Model {
  std::map<uint32_t, std::string> links;
  std::set<std::string> seen;  // every name an event or a resync reported
  size_t events = 0;
  size_t resync_calls = 0;

  LinkMonitor::OnLink on_link() {
    return [this](bool added, uint32_t ifindex, const std::string& name) {
      ++events;
      if (added) {
        links[ifindex] = name;
        seen.insert(name);
      } else {
        links.erase(ifindex);
      }
    };
  }
  LinkMonitor::OnResync on_resync() {
    return [this](const std::vector<LinkMonitor::Link>& all) {
      ++resync_calls;
      links.clear();
      for (const auto& l : all) {
        links[l.ifindex] = l.name;
        seen.insert(l.name);
      }
    };
  }
  bool has(const std::string& name) const {
    for (const auto& [ifindex, n] : links)
      if (n == name) return true;
    return false;
  }
};

std::string tap_name(int i) { return "vflm" + std::to_string(i); }

// All TAPs in one `ip -batch` run (one process, back to back).
bool taps(bool add) {
  std::string file = "/tmp/vmfence-link-monitor-" + std::to_string(getpid()) + ".batch";
  {
    std::ofstream out(file);
    for (int i = 0; i < kTaps; ++i)
      out << "tuntap " << (add ? "add" : "del") << " dev " << tap_name(i) << " mode tap\n";
  }
  int rc = std::system(("ip -batch " + file + " >/dev/null 2>&1").c_str());
  std::remove(file.c_str());
  return rc == 0;
}

void run_burst(int buffer_size, bool expect_overflow) {
  ScopedNetns ns;
  ASSERT_EQ(ns.error(), "");
  Model model;
  auto mon = std::make_unique<LinkMonitor>(model.on_link(), model.on_resync(), buffer_size);
  EXPECT_EQ(mon->fd(), -1);
  auto s = mon->open();
  ASSERT_TRUE(s) << s.message;
  ASSERT_GE(mon->fd(), 0);

  // The starting point, as the daemon takes it.
  std::vector<LinkMonitor::Link> initial;
  ASSERT_TRUE(LinkMonitor::list_links(initial));
  model.on_resync()(initial);
  ASSERT_TRUE(model.has("lo"));
  model.resync_calls = 0;

  // Created while nobody reads the socket.
  ASSERT_TRUE(taps(true));
  ASSERT_NE(if_nametoindex(tap_name(kTaps - 1).c_str()), 0u);
  s = mon->handle_readable();
  ASSERT_TRUE(s) << s.message;
  ASSERT_TRUE(mon->handle_readable()) << "nothing left: a second call finds the socket empty";
  for (int i = 0; i < kTaps; ++i) {
    ASSERT_TRUE(model.seen.count(tap_name(i))) << tap_name(i) << " never reported";
    ASSERT_TRUE(model.has(tap_name(i))) << tap_name(i) << " missing after replaying the monitor";
  }
  std::printf("burst of %d TAPs, %d-byte receive buffer: %zu link events, %zu resyncs\n", kTaps, mon->receive_buffer(),
              model.events, model.resync_calls);
  if (expect_overflow) {
    EXPECT_GE(mon->resyncs(), 1u) << "a " << mon->receive_buffer() << "-byte buffer should have overflowed";
    EXPECT_EQ(model.resync_calls, mon->resyncs());
  } else {
    EXPECT_EQ(mon->resyncs(), 0u) << "the default buffer holds a burst of " << kTaps << " new links";
  }

  // Every one deleted, again unread meanwhile.
  ASSERT_TRUE(taps(false));
  s = mon->handle_readable();
  ASSERT_TRUE(s) << s.message;
  for (int i = 0; i < kTaps; ++i) ASSERT_FALSE(model.has(tap_name(i))) << tap_name(i) << " still believed present";

  // The model matches the kernel's list exactly.
  std::vector<LinkMonitor::Link> now;
  ASSERT_TRUE(LinkMonitor::list_links(now));
  std::map<uint32_t, std::string> truth;
  for (const auto& l : now) truth[l.ifindex] = l.name;
  EXPECT_EQ(model.links, truth);
}

TEST(LinkMonitor, SmallBufferOverflowsAndResyncs) {
  VMFENCE_REQUIRE_KERNEL();
  run_burst(4096, /*expect_overflow=*/true);
}

TEST(LinkMonitor, DefaultBufferLosesNothing) {
  VMFENCE_REQUIRE_KERNEL();
  run_burst(LinkMonitor::kDefaultBufferSize, /*expect_overflow=*/false);
}

TEST(LinkMonitor, EventsOneByOne) {
  VMFENCE_REQUIRE_KERNEL();
  ScopedNetns ns;
  ASSERT_EQ(ns.error(), "");
  Model model;
  auto mon = std::make_unique<LinkMonitor>(model.on_link(), model.on_resync());
  ASSERT_TRUE(mon->open());
  // Root may exceed rmem_max: the kernel doubles what was asked.
  EXPECT_GE(mon->receive_buffer(), LinkMonitor::kDefaultBufferSize);
  EXPECT_TRUE(mon->handle_readable()) << "nothing pending is fine";
  EXPECT_EQ(model.events, 0u);

  ASSERT_EQ(std::system("ip tuntap add dev vflm-one mode tap"), 0);
  uint32_t ifindex = if_nametoindex("vflm-one");
  ASSERT_NE(ifindex, 0u);
  ASSERT_TRUE(mon->handle_readable());
  EXPECT_GE(model.events, 1u);
  EXPECT_EQ(model.links[ifindex], "vflm-one");

  ASSERT_EQ(std::system("ip link del vflm-one"), 0);
  ASSERT_TRUE(mon->handle_readable());
  EXPECT_EQ(model.links.count(ifindex), 0u);
  EXPECT_EQ(mon->resyncs(), 0u);
  EXPECT_EQ(model.resync_calls, 0u);

  // An explicit resync hands over the whole list.
  ASSERT_TRUE(mon->resync());
  EXPECT_EQ(model.resync_calls, 1u);
  EXPECT_TRUE(model.has("lo"));
}

}  // namespace
