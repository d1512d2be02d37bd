"""Fill an interface's tcx egress hook to the kernel's limit with trivial
programs (return TCX_NEXT), so that attaching one more fails with ERANGE;
hold the links until killed. Prints "full N" once the hook is full.
Usage: fill_tcx_egress.py IFINDEX"""
import ctypes
import errno
import signal
import struct
import sys

libc = ctypes.CDLL(None, use_errno=True)
SYS_BPF = 321
BPF_PROG_LOAD, BPF_LINK_CREATE = 5, 28
BPF_PROG_TYPE_SCHED_CLS = 3
BPF_TCX_EGRESS = 47


def bpf(cmd, attr):
    buf = ctypes.create_string_buffer(attr, 128)
    r = libc.syscall(SYS_BPF, cmd, buf, 128)
    return r, ctypes.get_errno()


insns = struct.pack("<BBhi", 0xB7, 0, 0, -1) + struct.pack("<BBhi", 0x95, 0, 0, 0)
insn_buf = ctypes.create_string_buffer(insns)
license = ctypes.create_string_buffer(b"GPL")
ifindex = int(sys.argv[1])
fds = []
while True:
    attr = struct.pack("=IIQQIIQII16s", BPF_PROG_TYPE_SCHED_CLS, 2, ctypes.addressof(insn_buf),
                       ctypes.addressof(license), 0, 0, 0, 0, 0, b"vmf_e2e_fill")
    prog, err = bpf(BPF_PROG_LOAD, attr)
    if prog < 0:
        sys.exit("prog load: " + errno.errorcode.get(err, str(err)))
    link, err = bpf(BPF_LINK_CREATE, struct.pack("=IIII", prog, ifindex, BPF_TCX_EGRESS, 0))
    if link < 0:
        if err != errno.ERANGE:
            sys.exit("link create: " + errno.errorcode.get(err, str(err)))
        break
    fds += [prog, link]
print("full", len(fds) // 2, flush=True)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
signal.pause()
