#!/bin/sh
# Install every build and test dependency of vmfence from Debian's packages.
set -eu
PKGS="build-essential cmake pkg-config clang llvm libclang-rt-14-dev libbpf-dev bpftool linux-libc-dev
libelf-dev zlib1g-dev libnl-3-dev libnl-route-3-dev libnftnl-dev libmnl-dev
libcereal-dev rapidjson-dev libspdlog-dev libfmt-dev libsystemd-dev systemd libgtest-dev libgmock-dev
googletest libbenchmark-dev iproute2 nftables python3-scapy iputils-ping netcat-openbsd
socat qemu-system-x86 busybox-static xz-utils cpio kmod procps psmisc iperf3 jq
dbus-daemon curl coreutils clang-format-14 prometheus-cpp-dev prometheus
libcurl4-openssl-dev etcd-server"
missing=""
for p in $PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends $missing
fi
