// One error policy at the libbpf / netlink boundary: a negative-errno style
// result with context, never an exception.
#pragma once

#include <cstring>
#include <string>
#include <utility>

namespace vmfence {

struct Status {
  int err = 0;          // positive errno, 0 = ok
  std::string message;  // what was being done, and the errno text
  bool ok() const { return err == 0; }
  explicit operator bool() const { return ok(); }
  static Status success() { return {}; }
  // err may be given negative (libbpf style) or positive.
  static Status error(int err, const std::string& what) {
    int e = err < 0 ? -err : err;
    if (e == 0) e = EINVAL;
    return {e, what + ": " + std::strerror(e)};
  }
};

// A file descriptor that closes itself.
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  Fd(Fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  Fd& operator=(Fd&& o) noexcept;
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd();
  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  void reset(int fd = -1);

 private:
  int fd_ = -1;
};

}  // namespace vmfence
