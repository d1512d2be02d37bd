#!/usr/bin/env python3
"""Measurement only (bench/xdp): summarize run.sh's raw.txt into a markdown table.

Per run: drops = what the dropper counted (its own counter map; vmfence's
per-VM drop counters; for `none` every written frame, dropped by the stack),
writer CPU = utime + stime of tap_writer (the whole tun receive path, XDP, tcx
and the stack run inside its write() calls). CPU per million drops is writer
CPU / (drops / 1e6). Savings are computed per round (paired runs of the same
round) and reported as median [min, max] over rounds.
"""
import collections
import statistics
import sys


def parse(path):
    runs = []
    for line in open(path):
        if not line.startswith("case="):
            continue
        kv = {}
        for tok in line.split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                kv[k] = v
        d, kind, size = kv["case"].split(":")
        w = int(kv["written"])
        cpu = float(kv["utime"]) + float(kv["stime"])
        if d == "none":
            drops = w
        elif "vmfence" in d:
            drops = int(kv.get("vmfence_drops", 0))
        else:
            drops = int(kv.get("drop_spoof", 0)) + int(kv.get("drop_policy", 0))
        soft = sum(int(kv.get("cpu%d_softirq" % c, 0)) for c in (0, 1))
        steal = sum(int(kv.get("cpu%d_steal" % c, 0)) for c in (0, 1))
        runs.append(dict(d=d, kind=kind, size=int(size), round=int(kv["round"]), written=w,
                         drops=drops, wall=float(kv["wall"]), cpu=cpu,
                         cpuM=cpu / (drops / 1e6) if drops else float("nan"),
                         soft=soft, steal=steal,
                         xdp_native=int(kv.get("post_tap_rx_dropped", 0)) - int(kv.get("pre_tap_rx_dropped", 0)),
                         reasons=kv.get("vmfence_drop_reasons", "")))
    return runs


def med_rng(xs, fmt="%.0f"):
    xs = [x for x in xs if x == x]
    if not xs:
        return "-"
    return (fmt + " [" + fmt + "–" + fmt + "]") % (statistics.median(xs), min(xs), max(xs))


def main(path):
    runs = parse(path)
    by = collections.OrderedDict()
    for r in runs:
        by.setdefault((r["kind"], r["size"], r["d"]), []).append(r)
    order = ["none", "tcx-min", "tcx-vmfence", "tcx-vmfence-q", "xdp-vmfence", "xdp-vmfence-q", "xdp-drv", "xdp-skb",
             "xdp-drv-small", "xdpas+vmfence"]
    keys = sorted(by, key=lambda k: (k[0] != "spoof", k[1], order.index(k[2]) if k[2] in order else 99))
    print("| frames | dropper | n | drops/s (wall) | drops per writer-CPU-s | writer CPU ms per 1M drops "
          "| dropped/written | TAP rx_dropped (native XDP) | softirq+steal ticks/run | vmfence reasons |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for k in keys:
        rs = by[k]
        kind, size, d = k
        ok = sum(r["drops"] for r in rs) / max(1, sum(r["written"] for r in rs))
        nat = sum(r["xdp_native"] for r in rs) / max(1, sum(r["drops"] for r in rs))
        print("| %s %dB | %s | %d | %s | %s | %s | %.4f | %.2f×drops | %s | %s |" % (
            kind, size, d, len(rs),
            med_rng([r["drops"] / r["wall"] for r in rs]),
            med_rng([r["drops"] / r["cpu"] for r in rs]),
            med_rng([r["cpuM"] * 1000 for r in rs]),
            ok, nat,
            med_rng([r["soft"] + r["steal"] for r in rs], "%.0f"),
            rs[0]["reasons"] or "-"))
    print()
    print("Saving in writer CPU per 1M drops, 1 - X/Y, paired per round: median [min–max] "
          "(and from the medians)")
    print()
    print("| frames | X (candidate) | Y (reference) | saving per round | saving of medians | ≥ 25 %? |")
    print("|---|---|---|---|---|---|")
    pairs = [("xdp-drv", "tcx-min"), ("xdp-drv", "tcx-vmfence"), ("xdp-drv", "tcx-vmfence-q"),
             ("xdp-skb", "tcx-min"), ("xdp-drv-small", "tcx-min"), ("tcx-min", "none"),
             ("xdp-drv", "none"), ("xdpas+vmfence", "tcx-vmfence"), ("xdp-vmfence", "tcx-vmfence"),
             ("xdp-vmfence-q", "tcx-vmfence-q")]
    for kind, size in sorted({(k[0], k[1]) for k in keys}, key=lambda x: (x[0] != "spoof", x[1])):
        for x, y in pairs:
            X, Y = by.get((kind, size, x)), by.get((kind, size, y))
            if not X or not Y:
                continue
            yr = {r["round"]: r["cpuM"] for r in Y}
            s = [1 - r["cpuM"] / yr[r["round"]] for r in X if r["round"] in yr]
            sm = 1 - statistics.median(r["cpuM"] for r in X) / statistics.median(r["cpuM"] for r in Y)
            print("| %s %dB | %s | %s | %s | %.1f %% | %s |" % (
                kind, size, x, y, med_rng([v * 100 for v in s], "%.1f %%"), sm * 100,
                "yes" if sm >= 0.25 else "no"))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "raw.txt")
