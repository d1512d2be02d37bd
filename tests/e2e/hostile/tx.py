# tx.py IFACE FRAMES [TOKEN WAIT CAPTURE...]
#
# Send the frames of FRAMES (one hex frame a line) on IFACE through an
# AF_PACKET socket, in order, 2 ms apart. With TOKEN: then watch the CAPTURE
# files (written by cap.py) for a line holding TOKEN for up to WAIT seconds.
# Exit 0: sent (and, with TOKEN, seen); 1: TOKEN not seen; 2: send error.
# One process for send + watch: forks are slow on a loaded machine.
import os
import socket
import sys
import time

iface, path = sys.argv[1], sys.argv[2]
token = sys.argv[3] if len(sys.argv) > 3 else None
wait = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
caps = sys.argv[5:]

offsets = {}
for c in caps:
    try:
        offsets[c] = os.path.getsize(c)
    except OSError:
        offsets[c] = 0

try:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((iface, 0))
    n = 0
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            if n:
                time.sleep(0.002)
            frame = bytes.fromhex(line)
            if s.send(frame) != len(frame):
                raise OSError("short send")
            n += 1
    if n == 0:
        raise OSError("no frame in " + path)
except OSError as e:
    print("tx.py: %s: %s" % (iface, e), file=sys.stderr)
    sys.exit(2)

if token is None:
    sys.exit(0)
t0 = time.monotonic()
deadline = t0 + wait
while True:
    for c in caps:
        try:
            with open(c) as f:
                f.seek(offsets[c])
                data = f.read()
        except OSError:
            continue
        if token in data:
            print("%s after %.0f ms" % (os.path.basename(c), (time.monotonic() - t0) * 1000))
            sys.exit(0)
    if time.monotonic() >= deadline:
        sys.exit(1)
    time.sleep(0.02)
