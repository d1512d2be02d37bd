# tap_write.py TAP SRC_MAC DST_MAC SRC_IP DST_IP DPORT PAYLOAD
#
# Write one Ethernet/IPv4/UDP frame into TAP the way a VMM does (QEMU's
# userspace virtio-net): attach a queue with IFF_TAP|IFF_NO_PI, raise the send
# buffer to INT_MAX and write non-blocking, so tun runs a natively attached
# XDP program on the frame before it builds an skb (tun_build_skb).
# Exit 0: written; 2: error.
import fcntl
import os
import socket
import struct
import sys

TUNSETIFF = 0x400454CA
TUNSETSNDBUF = 0x400454D4
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000


def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def frame(smac, dmac, src, dst, dport, payload):
    udp = struct.pack("!HHHH", 40000, dport, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    mac = lambda m: bytes(int(x, 16) for x in m.split(":"))
    return mac(dmac) + mac(smac) + b"\x08\x00" + ip + udp


def main():
    tap, smac, dmac, src, dst, dport, payload = sys.argv[1:8]
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", tap.encode(), IFF_TAP | IFF_NO_PI))
        fcntl.ioctl(fd, TUNSETSNDBUF, struct.pack("i", 0x7FFFFFFF))
        os.write(fd, frame(smac, dmac, src, dst, int(dport), payload.encode()))
        os.close(fd)
    except OSError as e:
        print("tap_write: %s" % e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
