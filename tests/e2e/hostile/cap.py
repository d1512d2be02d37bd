# cap.py IFACE OUT: record every frame IFACE receives (not the ones it sends)
# as one hex line in OUT; touches OUT.ready once the socket is bound.
# The hostile test greps these files for the per-frame token, so a frame
# "arrived" means it reached the receiving namespace's interface, whatever its
# kernel then does with it (a checksum error, an unknown option, no socket).
import socket
import sys

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4

iface, out = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.bind((iface, 0))
f = open(out, "a", buffering=1)
open(out + ".ready", "w").close()
while True:
    data, addr = s.recvfrom(65535)
    if addr[2] == PACKET_OUTGOING:
        continue
    f.write(data.hex() + "\n")
