#!/usr/bin/env python3
"""Tables for bench/seed000_compare.sh: raw.tsv -> markdown (medians, min-max,
ratio to nofilter of the same round), plus the target checks."""
import collections
import statistics
import sys

raw, meta = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None
data = collections.defaultdict(dict)  # (N, config, metric) -> {round: value}
for line in open(raw):
    f = line.rstrip("\n").split("\t")
    if f[0] == "N" or len(f) < 5 or f[4] == "":
        continue
    try:
        v = float(f[4])
    except ValueError:
        continue
    data[(int(f[0]), f[2], f[3])][int(f[1])] = v

CFGS = [("nofilter", "no filter"), ("seed", "seed 000 matrix"), ("vmap", "nft verdict map"),
        ("vmf_filtered", "vmfence filtered"), ("vmf_conntrack", "vmfence conntrack")]
sizes = sorted({k[0] for k in data})


def med(n, c, m):
    d = data.get((n, c, m))
    return statistics.median(d.values()) if d else None


def ratio(n, c, m):
    d, b = data.get((n, c, m)), data.get((n, "nofilter", m))
    if not d or not b:
        return None
    r = [d[k] / b[k] for k in d if k in b and b[k]]
    return statistics.median(r) if r else None


def fmt(v, nd):
    return "–" if v is None else ("%.*f" % (nd, v))


def cell(n, c, m, nd, with_ratio=True):
    d = data.get((n, c, m))
    if not d:
        return "–"
    vals = list(d.values())
    s = fmt(statistics.median(vals), nd)
    if len(vals) > 1:
        s += " [%s–%s]" % (fmt(min(vals), nd), fmt(max(vals), nd))
    r = ratio(n, c, m)
    if with_ratio and r is not None and c != "nofilter":
        s += " (%.2f×)" % r
    return s


def lat(n, c, p):
    a, b = med(n, c, p + "_rr_p50"), med(n, c, p + "_rr_p99")
    return "–" if a is None else "%.0f / %.0f" % (a, b)


out = []
if meta:
    out += ["```", open(meta).read().rstrip(), "```", ""]
for n in sizes:
    rounds = max((len(v) for k, v in data.items() if k[0] == n), default=0)
    out.append("### N = %d VMs (%d rounds; median [min–max] (median of per-round ratio to no filter))" % (n, rounds))
    out.append("")
    hdr = ["config"]
    for p, name in (("pair", "pair"), ("wan", "VM→WAN")):
        hdr += ["%s iperf3 Gbit/s" % name, "%s TCP_RR trans/s" % name, "%s RR p50/p99 µs" % name,
                "%s TCP_CRR conn/s" % name]
    hdr.append("time to enforce s")
    out.append("| " + " | ".join(hdr) + " |")
    out.append("|" + "---|" * len(hdr))
    for c, name in CFGS:
        if not any(k[0] == n and k[1] == c for k in data):
            continue
        row = [name]
        for p in ("pair", "wan"):
            row += [cell(n, c, p + "_gbps", 2), cell(n, c, p + "_rr_trans", 0), lat(n, c, p), cell(n, c, p + "_crr", 0)]
        row.append(cell(n, c, "enforce_s", 3, False) if c != "nofilter" else "–")
        out.append("| " + " | ".join(row) + " |")
    out.append("")
    # probes and errors
    notes = []
    for c, name in CFGS:
        cross = data.get((n, c, "probe_cross"), {})
        if c != "nofilter" and any(v > 0 for v in cross.values()):
            notes.append("%s: ISOLATION BROKEN (vm3 -> vm2 connected)" % name)
        if c == "nofilter" and cross and any(v == 0 for v in cross.values()):
            notes.append("no filter: vm3 -> vm2 did not connect (topology problem)")
        for p in ("pair", "wan"):
            e = data.get((n, c, p + "_crr_err"), {})
            if any(v > 0 for v in e.values()):
                notes.append("%s %s TCP_CRR connect/IO errors per round: %s" % (name, p, sorted(e.items())))
        if data.get((n, c, "error")):
            notes.append("%s: failed to enable in rounds %s" % (name, sorted(data[(n, c, "error")])))
        d = data.get((n, c, "vmf_drops"))
        if d and any(v > 0 for v in d.values()):
            notes.append("%s: drops counted on vm1..vm3 per round: %s" % (name, sorted(d.items())))
        w = data.get((n, c, "enforce_wait_s"))
        if w:
            notes.append("%s: launch -> `vmfence wait` ok for vm1..vm3: median %.3f s" % (name, statistics.median(w.values())))
    checked = [name for c, name in CFGS if c != "nofilter" and data.get((n, c, "probe_cross"))]
    if checked and not any("ISOLATION" in x for x in notes):
        notes.insert(0, "isolation probe vm3 -> vm2:7000 blocked in every round by: " + ", ".join(checked))
    for x in notes:
        out.append("- " + x)
    out.append("")
    # targets
    t = []
    for c in ("vmf_filtered", "vmf_conntrack"):
        if not any(k[0] == n and k[1] == c for k in data):
            continue
        for m, nd, hib, floor in (("pair_gbps", 2, True, 0.97), ("pair_rr_trans", 0, True, 0.95), ("pair_rr_p50", 0, False, None),
                                  ("pair_rr_p99", 0, False, None), ("pair_crr", 0, True, 0.95), ("wan_gbps", 2, True, 0.97),
                                  ("wan_rr_trans", 0, True, 0.95), ("wan_rr_p50", 0, False, None), ("wan_rr_p99", 0, False, None),
                                  ("wan_crr", 0, True, 0.95), ("enforce_s", 3, False, None)):
            a, b = med(n, c, m), med(n, "vmap", m)
            if a is None:
                continue
            ok_vmap = None if b is None else ((a > b) if hib else (a < b))
            r = ratio(n, c, m)
            ok_floor = None if floor is None or r is None else r >= floor
            s = "%s %s: %s vs vmap %s -> %s" % (c, m, fmt(a, nd), fmt(b, nd),
                                                 "-" if ok_vmap is None else ("ahead" if ok_vmap else "BEHIND"))
            if floor is not None and r is not None:
                s += "; %.3f× no filter (target ≥%.2f: %s)" % (r, floor, "ok" if ok_floor else "MISSED")
            t.append(s)
        a, b = med(n, c, "enforce_s"), med(n, "seed", "enforce_s")
        if a is not None and b is not None:
            t.append("%s enforce %.3f s vs seed nft -f %.3f s -> %s" % (c, a, b, "faster" if a < b else "SLOWER"))
    if t:
        out.append("<details><summary>target checks N=%d</summary>\n" % n)
        out += ["- " + x for x in t]
        out.append("\n</details>\n")
print("\n".join(out))
