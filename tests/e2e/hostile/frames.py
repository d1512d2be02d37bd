# frames.py TOPO_JSON OUT_DIR: build every frame hostile_test.sh sends.
#
# For each frame (or short train of frames) NAME it writes OUT_DIR/NAME.hex
# (one frame a line, sent in order by tx.py) and a line
# "NAME SENDER_NS IFACE TOKEN" to OUT_DIR/manifest. TOKEN (6 random bytes, in
# hex) is somewhere in the last frame of the train - in the payload, in an ND
# nonce option, in ARP padding, in a multicast group address - so a capture of
# the receiving interface that contains TOKEN proves the frame arrived there.
#
# Everything is built once with scapy (slow to import); sending is tx.py.
import json
import os
import sys

import logging

logging.getLogger("scapy.runtime").setLevel(logging.ERROR)
from scapy.all import (  # noqa: E402
    ARP, ICMP, IP, TCP, UDP, Dot1AD, Dot1Q, Ether, ICMPv6DestUnreach,
    ICMPv6MLDMultAddrRec, ICMPv6MLReport, ICMPv6MLReport2, ICMPv6ND_NA,
    ICMPv6ND_NS, ICMPv6ND_RS, IPOption_LSRR, IPOption_SSRR, IPv6,
    IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrRouting,
    IPv6ExtHdrSegmentRouting, PadN, Raw, checksum, in6_getnsma, in6_getnsmac,
    in6_mactoifaceid, inet_ntop, inet_pton, socket)

topo = json.load(open(sys.argv[1]))
out = sys.argv[2]
os.makedirs(out, exist_ok=True)
manifest = open(os.path.join(out, "manifest"), "w")

T = topo  # short alias
BRMAC = T["br_mac"]
BCAST = "ff:ff:ff:ff:ff:ff"
GW4, GW6, GWLL = T["gw4"], T["gw6"], T["gwll"]
P4, P6, Q4, Q6 = T["p4"], T["p6"], T["q4"], T["q6"]
VM = T["vms"]  # name -> {mac, ip4, ip6}


def ll_of(mac):
    return "fe80::" + in6_mactoifaceid(mac).lower()


for v in VM.values():
    v["ll"] = ll_of(v["mac"])


def nsma(addr):
    return inet_ntop(socket.AF_INET6, in6_getnsma(inet_pton(socket.AF_INET6, addr)))


def nsmac(addr):
    return in6_getnsmac(inet_pton(socket.AF_INET6, addr))


def emit(name, sender, iface, frames, tok):
    with open(os.path.join(out, name + ".hex"), "w") as f:
        for fr in frames:
            f.write(bytes(fr).hex() + "\n")
    manifest.write("%s %s %s %s\n" % (name, sender, iface, tok.hex()))


def token():
    return os.urandom(6)


def ndopt(t, data):
    """An ND option: type, length in 8-byte units, data zero-padded."""
    n = (2 + len(data) + 7) // 8
    return bytes([t, n]) + data + b"\0" * (n * 8 - 2 - len(data))


def slla(mac):
    return ndopt(1, bytes.fromhex(mac.replace(":", "")))


def tlla(mac):
    return ndopt(2, bytes.fromhex(mac.replace(":", "")))


def nonce(tok):
    return ndopt(14, tok)  # RFC 3971 nonce option: 6 bytes, one unit


def eth(vm, dst=None):
    return Ether(src=VM[vm]["mac"], dst=dst or BRMAC)


def arp_frame(src_vm, op, pdst, dst_mac, hwdst, size, tok, psrc=None):
    v = VM[src_vm]
    f = Ether(src=v["mac"], dst=dst_mac) / ARP(
        op=op, hwsrc=v["mac"], psrc=psrc or v["ip4"], hwdst=hwdst, pdst=pdst)
    pad = tok + b"\0" * (size - len(f) - len(tok))
    return f / Raw(pad)


def ns_frame(src_vm, tgt, opts, src=None, dst=None, dst_mac=None, hlim=255):
    v = VM[src_vm]
    dst = dst or nsma(tgt)
    return Ether(src=v["mac"], dst=dst_mac or nsmac(tgt)) / IPv6(
        src=src or v["ip6"], dst=dst, hlim=hlim) / ICMPv6ND_NS(tgt=tgt) / Raw(opts)


def na_frame(src_vm, tgt, opts, src=None, dst="ff02::1", dst_mac="33:33:00:00:00:01"):
    v = VM[src_vm]
    return Ether(src=v["mac"], dst=dst_mac) / IPv6(src=src or v["ip6"], dst=dst, hlim=255) / \
        ICMPv6ND_NA(tgt=tgt, R=0, S=0, O=1) / Raw(opts)


def pad_opts(n, tok):
    """n unknown 8-byte ND options (type 253, experimental), the token in the first."""
    return ndopt(253, tok) + b"".join(ndopt(253, b"\0" * 6) for _ in range(n - 1))


def emit_ns_na():
    a1, a2, b1 = VM["a1"], VM["a2"], VM["b1"]
    # --- legit --------------------------------------------------------------
    t = token()
    emit("ok_ns", "a1", "eth0", [ns_frame("a1", a2["ip6"], slla(a1["mac"]) + nonce(t))], t)
    t = token()
    emit("ok_ns_gw_ll", "a1", "eth0",
         [ns_frame("a1", GWLL, slla(a1["mac"]) + nonce(t), src=a1["ll"])], t)
    t = token()
    emit("ok_na", "a1", "eth0", [na_frame("a1", a1["ip6"], tlla(a1["mac"]) + nonce(t))], t)
    # A stable-privacy (RFC 7217) link-local no VM owns: the guest's own choice.
    t = token()
    emit("ok_ns_stable_privacy", "a1", "eth0",
         [ns_frame("a1", a2["ip6"], slla(a1["mac"]) + nonce(t), src="fe80::5a1e:9c3b:77d2:41f0")], t)
    # --- class 1: ND that is not link-local ---------------------------------
    t = token()
    emit("ns_remote", "a1", "eth0",
         [ns_frame("a1", P6, slla(a1["mac"]) + nonce(t), dst=P6, dst_mac=BRMAC)], t)
    t = token()
    emit("na_remote", "a1", "eth0",
         [na_frame("a1", a1["ip6"], tlla(a1["mac"]) + nonce(t), dst=P6, dst_mac=BRMAC)], t)
    t = token()
    emit("rs_remote", "a1", "eth0",
         [eth("a1") / IPv6(src=a1["ip6"], dst=P6, hlim=255) / ICMPv6ND_RS() / Raw(slla(a1["mac"]) + nonce(t))], t)
    # NS with 1 KB of options to a solicited-node group (a2's: otherwise fine).
    t = token()
    big = slla(a1["mac"]) + ndopt(253, t) + b"".join(ndopt(253, b"\xaa" * 46) for _ in range(21))
    emit("ns_oversize", "a1", "eth0", [ns_frame("a1", a2["ip6"], big)], t)
    t = token()
    big = tlla(a1["mac"]) + ndopt(253, t) + b"".join(ndopt(253, b"\xaa" * 46) for _ in range(21))
    emit("na_oversize", "a1", "eth0", [na_frame("a1", a1["ip6"], big)], t)
    # Toward the VM: the host (br0) sends a 1 KB NS for a1.
    t = token()
    big = slla(BRMAC) + ndopt(253, t) + b"".join(ndopt(253, b"\xaa" * 46) for _ in range(21))
    emit("ns_oversize_to_a1", "hv", "br0",
         [Ether(src=BRMAC, dst=nsmac(a1["ip6"])) / IPv6(src=GW6, dst=nsma(a1["ip6"]), hlim=255) /
          ICMPv6ND_NS(tgt=a1["ip6"]) / Raw(big)], t)
    # --- class 3: ND options and link-local ownership -----------------------
    t = token()
    emit("na_opt9_foreign", "a1", "eth0",
         [na_frame("a1", a1["ip6"], pad_opts(8, t) + tlla(b1["mac"]))], t)
    t = token()
    emit("ns_opt9_foreign", "a1", "eth0",
         [ns_frame("a1", a2["ip6"], pad_opts(8, t) + slla(b1["mac"]))], t)
    # 24 + 5 x 8 = 64 bytes of ICMPv6: inside the NS size bound.
    t = token()
    emit("ns_opt5_foreign", "a1", "eth0",
         [ns_frame("a1", a2["ip6"], pad_opts(4, t) + slla(b1["mac"]))], t)
    t = token()
    emit("na_opt2_foreign", "a1", "eth0",
         [na_frame("a1", a1["ip6"], nonce(t) + tlla(b1["mac"]))], t)
    t = token()
    emit("na_gw_ll", "a1", "eth0",
         [na_frame("a1", GWLL, tlla(a1["mac"]) + nonce(t), src=a1["ll"])], t)
    t = token()
    emit("na_a2_ll", "a1", "eth0",
         [na_frame("a1", a2["ll"], tlla(a1["mac"]) + nonce(t), src=a1["ll"])], t)
    t = token()
    emit("na_b1_ll", "a1", "eth0",
         [na_frame("a1", b1["ll"], tlla(a1["mac"]) + nonce(t), src=a1["ll"])], t)
    t = token()
    emit("ns_src_gw_ll", "a1", "eth0",
         [ns_frame("a1", a2["ip6"], slla(a1["mac"]) + nonce(t), src=GWLL)], t)
    t = token()
    emit("ns_src_a2_ll", "a1", "eth0",
         [ns_frame("a1", a2["ip6"], slla(a1["mac"]) + nonce(t), src=a2["ll"])], t)
    # Option lists that cannot be walked to the end.
    t = token()
    emit("ns_zero_len_opt", "a1", "eth0",
         [ns_frame("a1", a2["ip6"], nonce(t) + bytes([1, 0]) + bytes.fromhex(a1["mac"].replace(":", "")))], t)
    t = token()
    emit("ns_unterminated_opt", "a1", "eth0",
         [ns_frame("a1", a2["ip6"], nonce(t) + bytes([1, 4]) + bytes.fromhex(a1["mac"].replace(":", "")))], t)
    # --- MLD / RS --------------------------------------------------------------
    t = token()
    rec = ICMPv6MLDMultAddrRec(rtype=4, dst="ff05::1:3", sources=[inet_ntop(socket.AF_INET6, b"\x20\x01\x0d\xb8" + b"\0" * 6 + t)])
    emit("mld2_remote", "a1", "eth0",
         [eth("a1") / IPv6(src=a1["ip6"], dst=P6, hlim=64) / ICMPv6MLReport2(records=[rec])], t)
    t = token()
    rec = ICMPv6MLDMultAddrRec(rtype=4, dst="ff05::1:3", sources=[inet_ntop(socket.AF_INET6, b"\x20\x01\x0d\xb8" + b"\0" * 6 + t)])
    emit("mld2_gw_unicast", "a1", "eth0",
         [eth("a1") / IPv6(src=a1["ll"], dst=GW6, hlim=1) / ICMPv6MLReport2(records=[rec])], t)
    t = token()
    grp = inet_ntop(socket.AF_INET6, b"\xff\x05" + b"\0" * 8 + t)
    emit("mld1_gw_unicast", "a1", "eth0",
         [eth("a1") / IPv6(src=a1["ll"], dst=GW6, hlim=1) / ICMPv6MLReport(mladdr=grp)], t)
    # Another VM's MLD report and RS (legit from a2) are not for a1.
    t = token()
    rec = ICMPv6MLDMultAddrRec(rtype=4, dst="ff05::1:3", sources=[inet_ntop(socket.AF_INET6, b"\x20\x01\x0d\xb8" + b"\0" * 6 + t)])
    emit("a2_mld2_report", "a2", "eth0",
         [Ether(src=a2["mac"], dst="33:33:00:00:00:16") / IPv6(src=a2["ll"], dst="ff02::16", hlim=1) /
          ICMPv6MLReport2(records=[rec])], t)
    t = token()
    emit("a2_rs", "a2", "eth0",
         [Ether(src=a2["mac"], dst="33:33:00:00:00:02") / IPv6(src=a2["ll"], dst="ff02::2", hlim=255) /
          ICMPv6ND_RS() / Raw(slla(a2["mac"]) + nonce(t))], t)


def igmp(typ, group, extra=b""):
    b = bytes([typ, 0, 0, 0]) + inet_pton(socket.AF_INET, group) + extra
    c = checksum(b)
    return b[:2] + c.to_bytes(2, "big") + b[4:]


def emit_igmp_arp():
    a1, a2, b1 = VM["a1"], VM["a2"], VM["b1"]
    t = token()
    emit("igmp_gw_unicast", "a1", "eth0",
         [eth("a1") / IP(src=a1["ip4"], dst=GW4, ttl=1, proto=2) / Raw(igmp(0x16, "239.1.2.3", t))], t)
    t = token()
    emit("igmp_remote", "a1", "eth0",
         [eth("a1") / IP(src=a1["ip4"], dst=P4, ttl=64, proto=2) / Raw(igmp(0x16, "239.1.2.3", t))], t)
    # ARP: legit ones first, then between tenants, then oversized.
    t = token()
    emit("ok_arp_req_a2", "a1", "eth0", [arp_frame("a1", 1, a2["ip4"], BCAST, "00:00:00:00:00:00", 60, t)], t)
    t = token()
    emit("arp_req_b1", "a1", "eth0", [arp_frame("a1", 1, b1["ip4"], BCAST, "00:00:00:00:00:00", 60, t)], t)
    t = token()
    emit("arp_rep_b1", "a1", "eth0", [arp_frame("a1", 2, b1["ip4"], b1["mac"], b1["mac"], 60, t)], t)
    t = token()
    emit("arp_garp_bcast", "a1", "eth0", [arp_frame("a1", 1, a1["ip4"], BCAST, "00:00:00:00:00:00", 60, t)], t)
    t = token()
    emit("arp_oversize_a2", "a1", "eth0", [arp_frame("a1", 1, a2["ip4"], BCAST, "00:00:00:00:00:00", 200, t)], t)
    t = token()
    emit("arp_oversize_gw", "a1", "eth0", [arp_frame("a1", 1, GW4, BCAST, "00:00:00:00:00:00", 200, t)], t)
    t = token()
    f = Ether(src=BRMAC, dst=BCAST) / ARP(op=1, hwsrc=BRMAC, psrc=GW4, hwdst="00:00:00:00:00:00", pdst=a1["ip4"])
    emit("arp_oversize_to_a1", "hv", "br0", [f / Raw(t + b"\0" * (200 - len(f) - len(t)))], t)


def emit_icmp_errors():
    a1 = VM["a1"]
    sport = T["flow_sport"]
    # The flow: a1:sport -> P:53 (udp, egress rule). The error a1 may send
    # about it quotes a packet P sent to a1 (P:53 -> a1:sport).
    t = token()
    emit("ok_udp4_flow", "a1", "eth0", [eth("a1") / IP(src=a1["ip4"], dst=P4) / UDP(sport=sport, dport=53) / Raw(t)], t)
    t = token()
    emit("ok_udp6_flow", "a1", "eth0", [eth("a1") / IPv6(src=a1["ip6"], dst=P6) / UDP(sport=sport, dport=53) / Raw(t)], t)

    def q4(tok, n=0):
        return bytes(IP(src=P4, dst=a1["ip4"]) / UDP(sport=53, dport=sport) / Raw(tok + b"\x55" * n))

    def q6(tok, n=0):
        return bytes(IPv6(src=P6, dst=a1["ip6"]) / UDP(sport=53, dport=sport) / Raw(tok + b"\x55" * n))

    t = token()
    emit("ok_icmp4_err", "a1", "eth0", [eth("a1") / IP(src=a1["ip4"], dst=P4) / ICMP(type=3, code=3) / Raw(q4(t))], t)
    t = token()
    emit("ok_icmp6_err", "a1", "eth0", [eth("a1") / IPv6(src=a1["ip6"], dst=P6) / ICMPv6DestUnreach(code=4) / Raw(q6(t))], t)
    t = token()
    emit("icmp4_err_to_q", "a1", "eth0", [eth("a1") / IP(src=a1["ip4"], dst=Q4) / ICMP(type=3, code=3) / Raw(q4(t))], t)
    t = token()
    emit("icmp6_err_to_q", "a1", "eth0", [eth("a1") / IPv6(src=a1["ip6"], dst=Q6) / ICMPv6DestUnreach(code=4) / Raw(q6(t))], t)
    t = token()  # 20 + 8 + 28 + 6 + 900 = 962 > 576
    emit("icmp4_err_oversize", "a1", "eth0", [eth("a1") / IP(src=a1["ip4"], dst=P4) / ICMP(type=3, code=3) / Raw(q4(t, 900))], t)
    t = token()  # 40 + 8 + 48 + 6 + 1300 = 1402 > 1280
    emit("icmp6_err_oversize", "a1", "eth0", [eth("a1") / IPv6(src=a1["ip6"], dst=P6) / ICMPv6DestUnreach(code=4) / Raw(q6(t, 1300))], t)
    # An error about a flow that does not exist (P:53 -> a1:sport+1).
    t = token()
    qq = bytes(IP(src=P4, dst=a1["ip4"]) / UDP(sport=53, dport=sport + 1) / Raw(t))
    emit("icmp4_err_no_flow", "a1", "eth0", [eth("a1") / IP(src=a1["ip4"], dst=P4) / ICMP(type=3, code=3) / Raw(qq)], t)


def emit_spoof_from_outside():
    # TCP SYNs to a1:22, which a1's ingress rules allow from 10.0.0.0/8 and
    # fec0::/10 (so the host's nftables WAN chain lets them through and the
    # TAP program is what must stop them).
    a1, a2 = VM["a1"], VM["a2"]
    for ns, key in (("wan", "wan"), ("adm", "adm")):
        mac, hvmac = T[key + "_mac"], T[key + "_hv_mac"]
        for who, src4, src6 in (("a2", a2["ip4"], a2["ip6"]), ("a1", a1["ip4"], a1["ip6"])):
            t = token()
            emit("%s_spoof4_%s_to_a1" % (ns, who), ns, "eth0",
                 [Ether(src=mac, dst=hvmac) / IP(src=src4, dst=a1["ip4"]) / TCP(sport=40000, dport=22, flags="S") / Raw(t)], t)
            t = token()
            emit("%s_spoof6_%s_to_a1" % (ns, who), ns, "eth0",
                 [Ether(src=mac, dst=hvmac) / IPv6(src=src6, dst=a1["ip6"]) / TCP(sport=40000, dport=22, flags="S") / Raw(t)], t)


def emit_vlan():
    a1, a2 = VM["a1"], VM["a2"]
    t = token()
    emit("ok_udp_a2", "a1", "eth0",
         [eth("a1", a2["mac"]) / IP(src=a1["ip4"], dst=a2["ip4"]) / UDP(sport=40010, dport=5000) / Raw(t)], t)
    t = token()
    emit("vlan1_a2", "a1", "eth0",
         [eth("a1", a2["mac"]) / Dot1Q(vlan=100) / IP(src=a1["ip4"], dst=a2["ip4"]) / UDP(sport=40010, dport=5000) / Raw(t)], t)
    t = token()
    emit("vlan2_a2", "a1", "eth0",
         [eth("a1", a2["mac"]) / Dot1AD(vlan=200) / Dot1Q(vlan=100) / IP(src=a1["ip4"], dst=a2["ip4"]) /
          UDP(sport=40010, dport=5000) / Raw(t)], t)
    t = token()
    emit("vlan1_arp_a2", "a1", "eth0",
         [Ether(src=a1["mac"], dst=BCAST) / Dot1Q(vlan=100) /
          ARP(op=1, hwsrc=a1["mac"], psrc=a1["ip4"], pdst=a2["ip4"]) / Raw(t)], t)
    t = token()
    emit("vlan1_v6_a2", "a1", "eth0",
         [eth("a1", a2["mac"]) / Dot1Q(vlan=100) / IPv6(src=a1["ip6"], dst=a2["ip6"]) / UDP(sport=40010, dport=5000) / Raw(t)], t)
    t = token()
    emit("vlan1_to_a1", "hv", "br0",
         [Ether(src=BRMAC, dst=a1["mac"]) / Dot1Q(vlan=100) / IP(src=P4, dst=a1["ip4"]) / UDP(sport=53, dport=T["flow_sport"]) / Raw(t)], t)


def emit_sampled():
    s1, a1 = VM["s1"], VM["a1"]
    for vm, v in (("s1", s1), ("a1", a1)):
        for flags, fl in (("S", "syn"), ("SA", "synack")):
            for dst, dn in ((Q4, "q"), (P4, "p")):
                t = token()
                emit("%s_sport22_%s_%s" % (vm, fl, dn), vm, "eth0",
                     [eth(vm) / IP(src=v["ip4"], dst=dst) / TCP(sport=22, dport=9999, flags=flags, seq=1000, ack=2000 if "A" in flags else 0) / Raw(t)], t)
        t = token()
        emit("%s_sport22_udp_q" % vm, vm, "eth0",
             [eth(vm) / IP(src=v["ip4"], dst=Q4) / UDP(sport=22, dport=9999) / Raw(t)], t)


def emit_parser():
    a1, a2 = VM["a1"], VM["a2"]
    t = token()
    emit("lsrr_p", "a1", "eth0",
         [eth("a1") / IP(src=a1["ip4"], dst=P4, options=[IPOption_LSRR(routers=[Q4])]) / UDP(sport=40020, dport=53) / Raw(t)], t)
    t = token()
    emit("lsrr_a2", "a1", "eth0",
         [eth("a1", a2["mac"]) / IP(src=a1["ip4"], dst=a2["ip4"], options=[IPOption_LSRR(routers=[Q4])]) / UDP(sport=40020, dport=5000) / Raw(t)], t)
    t = token()
    emit("ssrr_a2", "a1", "eth0",
         [eth("a1", a2["mac"]) / IP(src=a1["ip4"], dst=a2["ip4"], options=[IPOption_SSRR(routers=[Q4])]) / UDP(sport=40020, dport=5000) / Raw(t)], t)
    t = token()
    emit("rh0_p", "a1", "eth0",
         [eth("a1") / IPv6(src=a1["ip6"], dst=P6) / IPv6ExtHdrRouting(type=0, segleft=1, addresses=[Q6]) /
          UDP(sport=40020, dport=53) / Raw(t)], t)
    t = token()
    emit("rh4_p", "a1", "eth0",
         [eth("a1") / IPv6(src=a1["ip6"], dst=P6) / IPv6ExtHdrSegmentRouting(addresses=[Q6, P6], segleft=1) /
          UDP(sport=40020, dport=53) / Raw(t)], t)
    # Truncated: the IP header claims 400 bytes, the frame carries ~130.
    t = token()
    emit("trunc4_a2", "a1", "eth0",
         [eth("a1", a2["mac"]) / IP(src=a1["ip4"], dst=a2["ip4"], len=400) / UDP(sport=40021, dport=5000) / Raw(t + b"\0" * 100)], t)
    t = token()
    emit("trunc6_a2", "a1", "eth0",
         [eth("a1", a2["mac"]) / IPv6(src=a1["ip6"], dst=a2["ip6"], plen=400) / UDP(sport=40021, dport=5000) / Raw(t + b"\0" * 100)], t)
    # Bytes beyond the IP length in a frame longer than 60 bytes.
    t = token()
    good = bytes(eth("a1", a2["mac"]) / IP(src=a1["ip4"], dst=a2["ip4"]) / UDP(sport=40021, dport=5000) / Raw(b"hello"))
    emit("trailer4_a2", "a1", "eth0", [Raw(good + t + b"\x77" * 400)], t)
    t = token()
    good = bytes(eth("a1", a2["mac"]) / IPv6(src=a1["ip6"], dst=a2["ip6"]) / UDP(sport=40021, dport=5000) / Raw(b"hello"))
    emit("trailer6_a2", "a1", "eth0", [Raw(good + t + b"\x77" * 400)], t)
    # IPv6 fragments with destination options after the fragment header.
    def frag_train(dport, first_len, payload, destopt=True):
        """a1 -> P:dport over IPv6, fragment header [+ dest options] + UDP,
        cut after first_len bytes of the fragmentable part (None: one
        atomic fragment)."""
        full = IPv6(src=a1["ip6"], dst=P6)
        if destopt:
            full = full / IPv6ExtHdrDestOpt(options=[PadN(optdata=b"\0" * 12)])
        full = full / UDP(sport=40022, dport=dport) / Raw(payload)
        fb = bytes(full)[40:]  # [dest opts +] udp + payload, checksums right
        nh = 60 if destopt else 17
        fid = int.from_bytes(os.urandom(4), "big")
        frames = []
        if first_len is None:  # atomic fragment
            frames.append(eth("a1") / IPv6(src=a1["ip6"], dst=P6, nh=44) / IPv6ExtHdrFragment(nh=nh, offset=0, m=0, id=fid) / Raw(fb))
        else:
            frames.append(eth("a1") / IPv6(src=a1["ip6"], dst=P6, nh=44) / IPv6ExtHdrFragment(nh=nh, offset=0, m=1, id=fid) / Raw(fb[:first_len]))
            frames.append(eth("a1") / IPv6(src=a1["ip6"], dst=P6, nh=44) / IPv6ExtHdrFragment(nh=nh, offset=first_len // 8, m=0, id=fid) / Raw(fb[first_len:]))
        return frames
    # Legit: a fragmented datagram to P:53 (allowed), the token in the second
    # fragment; without and with destination options after the fragment
    # header (RFC 8200 4.1: where options for the final destination go).
    t = token()
    emit("ok_frag6_p53", "a1", "eth0", frag_train(53, 48, b"\x11" * 40 + t + b"\x22" * 40, destopt=False), t)
    t = token()
    emit("ok_frag6_destopt_p53", "a1", "eth0", frag_train(53, 48, b"\x11" * 40 + t + b"\x22" * 40), t)
    t = token()
    full = bytes(IP(src=a1["ip4"], dst=P4, id=0x4242) / UDP(sport=40022, dport=53) / Raw(b"\x11" * 40 + t + b"\x22" * 40))
    body = full[20:]
    f1 = IP(src=a1["ip4"], dst=P4, id=0x4242, flags="MF", frag=0, proto=17) / Raw(body[:48])
    f2 = IP(src=a1["ip4"], dst=P4, id=0x4242, flags=0, frag=6, proto=17) / Raw(body[48:])
    emit("ok_frag4_p53", "a1", "eth0", [eth("a1") / f1, eth("a1") / f2], t)
    t = token()
    emit("frag6_atomic_destopt_p9999", "a1", "eth0", frag_train(9999, None, t + b"\x22" * 40), t)
    # First fragment: fragment header + 16 bytes of dest options, no UDP
    # header; second: the UDP header (dport 9999, denied) and the payload.
    t = token()
    emit("frag6_l4_in_second_p9999", "a1", "eth0", frag_train(9999, 16, t + b"\x22" * 40), t)


emit_ns_na()
emit_igmp_arp()
emit_icmp_errors()
emit_spoof_from_outside()
emit_vlan()
emit_sampled()
emit_parser()
manifest.close()
