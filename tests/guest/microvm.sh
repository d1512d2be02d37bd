#!/bin/bash
# microvm.sh - vmfence's guest harness: boot a throw-away Linux guest under QEMU on an
# existing TAP device inside a network namespace, run a shell script in it, report
# its output and exit status. The truest test of the datapath is a real guest behind
# a real TAP; this gives the tests one in about 5 s.
#
#   microvm.sh build [DIR]
#       Guest kernel + initramfs from Debian packages only, into DIR (default
#       $VMFENCE_GUEST_DIR, else <repo>/build/guest). Idempotent: the kernel is fetched
#       once; the initramfs is rebuilt only when this script's /init changes.
#       qemu-system-x86 and busybox-static are apt-installed when missing (root);
#       linux-image-*-amd64 is only `apt-get download`ed and unpacked (never
#       installed: the host's /boot and bootloader stay untouched).
#   microvm.sh run <netns> <tap> <guest_ip/prefix> <gateway> <script-file>
#       Builds first when needed, then boots a guest whose virtio-net NIC is the
#       (pre-created) TAP <tap> in <netns>, configures eth0 statically, runs
#       <script-file> with busybox sh, prints its output between "===KV-BEGIN===" and
#       "===KV-END=== EXIT=<n>" and exits with <n> (124: qemu timed out, 125: the guest
#       never reached the END marker, e.g. because it was stopped from outside).
#
# Env: VMFENCE_GUEST_DIR (build cache), KV_ACCEL (tcg|kvm, default tcg: see note),
#      KV_TIMEOUT (s, default 120), KV_MEM (MiB, default 256), KV_LOG (keep the full
#      serial log at this path), KV_MAC (guest MAC; default 52:54 + the IPv4 octets),
#      KV_QMP (path: a QMP unix socket, server=on,wait=off), KV_PIDFILE (path: QEMU
#      writes its pid there).
# Note: on hosts whose /dev/kvm is the PVM backend (kvm_pvm, no vmx/svm), an unmodified
#       kernel is instruction-emulated by KVM: ~1000x slower, and it dies on instructions
#       the emulator lacks. TCG boots to network in ~5 s: the default.
set -euo pipefail

die() { echo "microvm: $*" >&2; exit 2; }
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
GUEST_DIR=${VMFENCE_GUEST_DIR:-$here/../../build/guest}
MODS="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci failover net_failover virtio_net"

# The guest's /init. Its hash names the initramfs build, so editing it rebuilds.
init_script() {
  cat <<EOF
#!/bin/busybox sh
/bin/busybox --install -s /bin; export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs dev /dev
for m in $MODS; do insmod /lib/modules/\$m.ko; done
dmesg -n 1   # keep kernel messages out of the script output
for kv in \$(cat /proc/cmdline); do case "\$kv" in vm_ip=*|vm_gw=*) export "\$kv";; esac; done
i=0; while [ ! -e /sys/class/net/eth0 ] && [ \$i -lt 100 ]; do sleep 0.05; i=\$((i+1)); done
ip link set lo up; ip link set eth0 up
ip addr add "\$vm_ip" dev eth0 && ip route add default via "\$vm_gw" || echo "guest: net setup failed"
echo "===KV-BEGIN==="
VM_IP=\$vm_ip VM_GW=\$vm_gw sh /guest/script.sh </dev/null 2>&1; rc=\$?
echo "===KV-END=== EXIT=\$rc"
sync; poweroff -f
EOF
}

built() {  # <dir>: kernel and an initramfs of the current /init are there
  local out=$1
  [ -f "$out/vmlinux" ] && [ -f "$out/initrd.base" ] && [ -f "$out/initrd.stamp" ] &&
    [ "$(cat "$out/initrd.stamp")" = "$(init_script | sha256sum | cut -d' ' -f1)" ]
}

build_kernel() {  # <dir>: vmlinux + the virtio-net module chain in <dir>/modules
  local out=$1 pkg ver x off m
  pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ && !p {print $2; p=1}')
  [ -n "$pkg" ] || die "cannot resolve linux-image-amd64 (apt-get update?)"
  x=$(mktemp -d "$out/.pkg.XXXXXX")
  # shellcheck disable=SC2064
  trap "rm -rf '$x'; trap - RETURN" RETURN
  (cd "$x" && apt-get download "$pkg" >&2) || die "apt-get download $pkg failed"
  dpkg-deb -x "$x"/"$pkg"_*.deb "$x/root"
  ver=$(ls "$x/root/lib/modules")
  # bzImage -> uncompressed ELF vmlinux (it has a PVH entry note): QEMU boots it
  # directly, skipping real-mode setup and the in-guest xz decompression (~7 s on TCG).
  off=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$x/root/boot/vmlinuz-$ver" | awk -F: 'NR==1{print $1}')
  [ -n "$off" ] || die "no xz payload in vmlinuz-$ver"
  tail -c +$((off + 1)) "$x/root/boot/vmlinuz-$ver" | xz -dcq --single-stream > "$x/vmlinux" || true  # SIGPIPE
  [ "$(head -c4 "$x/vmlinux" | od -An -c | tr -d ' ')" = '177ELF' ] || die "vmlinux extraction failed"
  rm -rf "$out/modules"; mkdir -p "$out/modules"
  for m in $MODS; do
    find "$x/root/lib/modules/$ver" -name "$m.ko*" -exec cp {} "$out/modules/" \;
    [ -e "$out/modules/$m.ko" ] || die "module $m.ko not found (compressed?)"
  done
  mv "$x/vmlinux" "$out/vmlinux"  # last: its presence means the kernel step is done
  echo "$pkg $ver" > "$out/kernel.txt"
}

build_initrd() {  # <dir>: initrd.base (busybox, modules, /init), 512-byte padded
  local out=$1 r
  r=$(mktemp -d "$out/.rootfs.XXXXXX")
  # shellcheck disable=SC2064
  trap "rm -rf '$r'; trap - RETURN" RETURN
  mkdir -p "$r"/{bin,dev,proc,sys,tmp,guest,lib/modules}
  cp /bin/busybox "$r/bin/"   # busybox-static: copied into the guest as is
  cp "$out"/modules/*.ko "$r/lib/modules/"
  init_script > "$r/init"; chmod 755 "$r/init"
  # The kernel only finds a second (per-run) cpio appended after a gzip member when it
  # starts 4-byte aligned: pad the base image with zeros to 512 bytes.
  (cd "$r" && find . | /bin/busybox cpio -o -H newc 2>/dev/null) | gzip -9 > "$out/.initrd.tmp"
  truncate -s %512 "$out/.initrd.tmp"
  mv "$out/.initrd.tmp" "$out/initrd.base"
  init_script | sha256sum | cut -d' ' -f1 > "$out/initrd.stamp"
}

build() {
  local out=${1:-$GUEST_DIR}
  mkdir -p "$out"; out=$(cd "$out" && pwd)
  exec 9>"$out/.lock"; flock 9   # concurrent test runs build once
  if built "$out"; then echo "$out"; return 0; fi
  if ! dpkg -s qemu-system-x86 busybox-static >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || die "qemu-system-x86 / busybox-static missing and not root (apt-get)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      qemu-system-x86 busybox-static >&2
  fi
  [ -f "$out/vmlinux" ] && [ -f "$out/modules/virtio_net.ko" ] || build_kernel "$out"
  build_initrd "$out"
  echo "microvm: built $out: vmlinux ($(cat "$out/kernel.txt")) + initrd.base" >&2
  echo "$out"
}

run() {
  local ns=$1 tap=$2 ip=$3 gw=$4 script=$5 out tmp mac rc log
  [ -r "$script" ] || die "no script $script"
  ip netns exec "$ns" ip link show "$tap" >/dev/null 2>&1 || die "no TAP $tap in netns $ns"
  out=$(build "$GUEST_DIR")
  tmp=$(mktemp -d)
  # shellcheck disable=SC2064
  trap "rm -rf '$tmp'" EXIT
  trap 'exit 143' TERM INT HUP  # so that the EXIT trap runs
  mkdir -p "$tmp/r/guest"; cp "$script" "$tmp/r/guest/script.sh"
  (cd "$tmp/r" && find . | /bin/busybox cpio -o -H newc 2>/dev/null) > "$tmp/run.cpio"
  cat "$out/initrd.base" "$tmp/run.cpio" > "$tmp/initrd"
  # Locally administered MAC derived from the guest IP (unique per guest).
  mac=${KV_MAC:-$(echo "${ip%/*}" | awk -F. '{printf "52:54:%02x:%02x:%02x:%02x", $1,$2,$3,$4}')}
  local extra=()
  [ -n "${KV_QMP:-}" ] && extra+=(-qmp "unix:$KV_QMP,server=on,wait=off")
  [ -n "${KV_PIDFILE:-}" ] && extra+=(-pidfile "$KV_PIDFILE")
  log=${KV_LOG:-$tmp/serial.log}
  rc=0
  # --foreground: QEMU stays in our process group, so killing the group stops it.
  timeout --foreground -k 5 "${KV_TIMEOUT:-120}" ip netns exec "$ns" qemu-system-x86_64 \
    -accel "${KV_ACCEL:-tcg}" -M pc -m "${KV_MEM:-256}" -smp 1 \
    -nodefaults -no-user-config -display none -no-reboot -serial stdio \
    -kernel "$out/vmlinux" -initrd "$tmp/initrd" \
    -append "console=ttyS0 quiet panic=-1 i8042.noaux i8042.nokbd vm_ip=$ip vm_gw=$gw" \
    -netdev "tap,id=n0,ifname=$tap,script=no,downscript=no" \
    -device "virtio-net-pci,netdev=n0,mac=$mac,romfile=" "${extra[@]}" \
    </dev/null 2>&1 | stdbuf -oL tr -d '\r' > "$log" || rc=$?  # line by line: tests watch the log
  sed -n '/^===KV-BEGIN===$/,/^===KV-END=== EXIT=/p' "$log"
  local ex; ex=$(sed -n 's/^===KV-END=== EXIT=\([0-9]*\)$/\1/p' "$log" | tail -1)
  if [ -n "$ex" ]; then return "$ex"; fi
  echo "microvm: no END marker (qemu rc=$rc); serial log tail:" >&2
  tail -n 30 "$log" >&2
  [ "$rc" = 124 ] && return 124 || return 125
}

case "${1:-}" in
  build) [ $# -le 2 ] || die "usage: $0 build [DIR]"; build "${2:-$GUEST_DIR}" >/dev/null ;;
  run)   [ $# -eq 6 ] || die "usage: $0 run <netns> <tap> <ip/prefix> <gw> <script>"
         shift; run "$@" ;;
  *) die "usage: $0 build [DIR] | run <netns> <tap> <ip/prefix> <gw> <script>" ;;
esac
