// MonitorServer (the daemon's side of `vmfence monitor`) over a real unix
// socket: a client that never reads is disconnected once its buffer is full
// while another keeps receiving every line in order; a client that goes away
// is cleaned up; publishing never waits for a client. The JSON line carries
// the contract's keys (DESIGN.md), written out here as literals.
#include "agent/events/monitor_server.h"

#include <gtest/gtest.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <string>

#include "agent/spec/json.h"
#include "tests/unit/test_util.h"

namespace vmfence {
namespace {

using Clock = std::chrono::steady_clock;

Fd connect_to(const std::string& path) {
  Fd fd(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.data(), path.size());
  if (connect(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0) fd.reset();
  return fd;
}

// Everything readable now, without waiting; `eof` set when the peer closed.
std::string drain(const Fd& fd, bool* eof = nullptr) {
  std::string out;
  char buf[65536];
  for (;;) {
    ssize_t n = recv(fd.get(), buf, sizeof(buf), MSG_DONTWAIT);
    if (n > 0) {
      out.append(buf, static_cast<size_t>(n));
      continue;
    }
    if (eof) *eof = n == 0;
    return out;
  }
}

// The daemon's loop: handle the server whenever its fd is readable.
void pump(MonitorServer& s) {
  pollfd p{s.fd(), POLLIN, 0};
  while (poll(&p, 1, 0) == 1) s.handle_ready();
}

Violation sample() {
  Violation v;
  v.vm = "vm1";
  v.interface = "tap-vm1";
  v.reason = "spoofed_ip";
  v.direction = "from_vm";
  v.src = "10.9.9.9";
  v.dst = "10.2.0.2";
  v.proto = "udp";
  v.sport = 4000;
  v.dport = 53;
  v.mode = "filtered";
  return v;
}

class MonitorServerTest : public ::testing::Test {
 protected:
  testing::TempDir dir{"vmfence-monitor"};
  std::string path = dir / "monitor.sock";
};

TEST(MonitorLine, CarriesTheJournaldFieldsInLowerCase) {
  // 2026-11-30T12:00:00.123Z
  std::string line = monitor_line(sample(), int64_t{1796040000} * 1000000000 + 123456789);
  ASSERT_FALSE(line.empty());
  EXPECT_EQ(line.back(), '\n');
  EXPECT_EQ(line.find('\n'), line.size() - 1) << "one line per event";
  rj::Document d;
  d.Parse(line.c_str());
  ASSERT_FALSE(d.HasParseError()) << line;
  EXPECT_STREQ(d["vm"].GetString(), "vm1");
  EXPECT_STREQ(d["reason"].GetString(), "spoofed_ip");
  EXPECT_STREQ(d["src"].GetString(), "10.9.9.9");
  EXPECT_STREQ(d["dst"].GetString(), "10.2.0.2");
  EXPECT_STREQ(d["proto"].GetString(), "udp");
  ASSERT_TRUE(d["dport"].IsUint()) << "dport is a JSON number: " << line;
  EXPECT_EQ(d["dport"].GetUint(), 53u);
  EXPECT_STREQ(d["mode"].GetString(), "filtered");
  EXPECT_STREQ(d["direction"].GetString(), "from_vm");
  EXPECT_STREQ(d["interface"].GetString(), "tap-vm1");
  ASSERT_TRUE(d["sport"].IsUint()) << line;
  EXPECT_EQ(d["sport"].GetUint(), 4000u);
  EXPECT_FALSE(d["quarantined"].GetBool());
  EXPECT_STREQ(d["time"].GetString(), "2026-11-30T12:00:00.123Z");
}

TEST(MonitorLine, EscapesWhatItQuotes) {
  Violation v = sample();
  v.vm = "a\"b\\c\n";
  rj::Document d;
  std::string line = monitor_line(v, 0);
  d.Parse(line.c_str());
  ASSERT_FALSE(d.HasParseError()) << line;
  EXPECT_STREQ(d["vm"].GetString(), "a\"b\\c\n");
}

TEST_F(MonitorServerTest, SocketIsPrivateReplacesAStaleOneAndIsRemovedAtExit) {
  {
    // A dead daemon's socket: a file nobody listens on.
    Fd stale(socket(AF_UNIX, SOCK_STREAM, 0));
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, path.data(), path.size());
    ASSERT_EQ(bind(stale.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)), 0);
  }
  {
    MonitorServer s;
    ASSERT_TRUE(s.open(path)) << "stale socket not replaced";
    struct stat st {};
    ASSERT_EQ(::stat(path.c_str(), &st), 0);
    EXPECT_TRUE(S_ISSOCK(st.st_mode));
    EXPECT_EQ(st.st_mode & 0777, 0600u);
    Fd c = connect_to(path);
    ASSERT_TRUE(c.valid());
    pump(s);
    EXPECT_EQ(s.clients(), 1u);
  }
  EXPECT_FALSE(std::filesystem::exists(path));
}

TEST_F(MonitorServerTest, StuckClientIsDroppedWhileAnotherKeepsReceivingAndPublishNeverWaits) {
  MonitorServer s;
  ASSERT_TRUE(s.open(path));
  Fd stuck = connect_to(path), good = connect_to(path);
  ASSERT_TRUE(stuck.valid() && good.valid());
  pump(s);
  ASSERT_EQ(s.clients(), 2u);

  // Far more than the buffer plus the socket's own: the stuck client must
  // overflow. The good one reads between batches, as a live reader does.
  const std::string line = monitor_line(sample(), 0);
  const size_t total = 8 * MonitorServer::kMaxBuffered / line.size() + 1000;
  std::string received;
  auto slowest = Clock::duration::zero();
  for (size_t i = 0; i < total; ++i) {
    auto t0 = Clock::now();
    s.send_line(line);
    slowest = std::max(slowest, Clock::now() - t0);
    if (i % 64 == 63) {
      pump(s);
      received += drain(good);
    }
  }
  for (int i = 0; i < 100 && received.size() < total * line.size(); ++i) {
    pump(s);
    received += drain(good);
    usleep(1000);
  }

  EXPECT_EQ(s.clients(), 1u);
  EXPECT_EQ(s.disconnected_slow(), 1u);
  EXPECT_EQ(received.size(), total * line.size()) << "the good client lost lines";
  size_t torn = 0;
  for (size_t at = 0; at + line.size() <= received.size(); at += line.size())
    torn += received.compare(at, line.size(), line) != 0;
  EXPECT_EQ(torn, 0u) << "lines torn or interleaved";
  EXPECT_LT(std::chrono::duration_cast<std::chrono::milliseconds>(slowest).count(), 250)
      << "send_line waited for a client";

  // The stuck client got at most a buffer's worth plus the socket's, then the end.
  bool eof = false;
  std::string got;
  for (int i = 0; i < 100 && !eof; ++i) got += drain(stuck, &eof);
  EXPECT_TRUE(eof) << "stuck client not disconnected";
  EXPECT_LT(got.size(), received.size());
  EXPECT_EQ(got.size() % line.size(), 0u) << "the stuck client got a torn line";
}

TEST_F(MonitorServerTest, ClientThatHangsUpIsCleanedUp) {
  MonitorServer s;
  ASSERT_TRUE(s.open(path));
  {
    Fd c = connect_to(path);
    ASSERT_TRUE(c.valid());
    pump(s);
    ASSERT_EQ(s.clients(), 1u);
  }
  // Noticed by the event loop, before anything is sent.
  pump(s);
  EXPECT_EQ(s.clients(), 0u);

  // Noticed by a send (EPIPE, and no SIGPIPE kills the daemon).
  Fd c = connect_to(path);
  pump(s);
  ASSERT_EQ(s.clients(), 1u);
  c.reset();
  s.send_line(monitor_line(sample(), 0));
  EXPECT_EQ(s.clients(), 0u);
  EXPECT_EQ(s.disconnected_slow(), 0u);
}

TEST_F(MonitorServerTest, HalfClosedClientStillReceives) {
  MonitorServer s;
  ASSERT_TRUE(s.open(path));
  Fd c = connect_to(path);
  pump(s);
  ASSERT_EQ(shutdown(c.get(), SHUT_WR), 0);
  pump(s);
  ASSERT_EQ(s.clients(), 1u);
  const std::string line = monitor_line(sample(), 0);
  s.send_line(line);
  pump(s);
  EXPECT_EQ(drain(c), line);
}

TEST_F(MonitorServerTest, BoundedNumberOfClients) {
  MonitorServer s;
  ASSERT_TRUE(s.open(path));
  std::vector<Fd> cs;
  for (size_t i = 0; i < MonitorServer::kMaxClients + 3; ++i) {
    cs.push_back(connect_to(path));
    pump(s);
  }
  EXPECT_EQ(s.clients(), MonitorServer::kMaxClients);
  bool eof = false;
  drain(cs.back(), &eof);
  EXPECT_TRUE(eof) << "a client over the limit is closed";
}

}  // namespace
}  // namespace vmfence
