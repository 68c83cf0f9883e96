#!/usr/bin/env python3
"""Turns the fio JSON files of one benches/run.sh run into a Markdown table with
ratios against qemu-nbd and the raw file, all measured in that same run."""
import json
import os
import sys

TARGETS = ["raftblkd", "qemu-nbd", "nbdkit", "raw", "replicas0", "replicas1", "replicas2",
           "raftblkd-enc", "replicas2e", "raftblkd-after"]
JOBS = ["randwrite-4k-qd1", "randwrite-4k-qd32", "randread-4k-qd32", "write-1m-qd8", "read-1m-qd8"]
TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def load(out, target, job):
    path = os.path.join(out, f"{target}.{job}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        text = f.read()
    data = json.loads(text[text.index("{"):])  # fio may print notes before the JSON
    j = data["jobs"][0]
    side = j["write"] if j["write"]["total_ios"] > 0 else j["read"]
    ticks = int(open(os.path.join(out, f"{target}.{job}.cputicks")).read().strip() or 0)
    ios = side["total_ios"]
    lat = side["clat_ns"]
    return {
        "iops": side["iops"],
        "bw_mib": side["bw_bytes"] / 2**20,
        "mean_us": side["lat_ns"]["mean"] / 1000,
        "p99_us": lat.get("percentile", {}).get("99.000000", 0) / 1000,
        "cpu_us_per_io": (ticks / TICKS_PER_S * 1e6 / ios) if ios and ticks else None,
    }


def ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "-"


def main():
    out = sys.argv[1]
    rows = {(t, j): load(out, t, j) for t in TARGETS for j in JOBS}
    print("| job | target | IOPS | MiB/s | mean lat µs | p99 lat µs | server CPU µs/IO |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for j in JOBS:
        for t in TARGETS:
            r = rows[(t, j)]
            if r is None:
                continue
            cpu = f"{r['cpu_us_per_io']:.1f}" if r["cpu_us_per_io"] is not None else "-"
            print(f"| {j} | {t} | {r['iops']:.0f} | {r['bw_mib']:.1f} | {r['mean_us']:.0f} | {r['p99_us']:.0f} | {cpu} |")
    print()
    print("| job | raftblkd/qemu-nbd IOPS | raftblkd/nbdkit IOPS | raftblkd/raw IOPS | CPU per IO raftblkd/qemu-nbd |")
    print("|---|---:|---:|---:|---:|")
    for j in JOBS:
        r, q, k, w = (rows[(t, j)] for t in TARGETS[:4])
        if not r:
            continue
        cpu = ratio(r["cpu_us_per_io"], q["cpu_us_per_io"]) if q else "-"
        print(f"| {j} | {ratio(r['iops'], q and q['iops'])} | {ratio(r['iops'], k and k['iops'])} | {ratio(r['iops'], w and w['iops'])} | {cpu} |")
    replicated(rows)
    encryption(rows)
    ab(out)


def encryption(rows):
    if not any(rows[(t, j)] for t in ("raftblkd-enc", "replicas2e") for j in JOBS):
        return
    print()
    print("Encrypted (AES-256-GCM) vs plain volumes, both checksummed, in this run:")
    print()
    print("| job | alone enc/plain IOPS | alone CPU µs/IO plain, enc | replicas=2 enc/plain IOPS | replicas=2 CPU µs/IO plain, enc |")
    print("|---|---:|---:|---:|---:|")
    def cpu(a, b):
        f = lambda r: f"{r['cpu_us_per_io']:.1f}" if r and r["cpu_us_per_io"] is not None else "-"
        return f"{f(a)}, {f(b)}"
    for j in JOBS:
        p, e, p2, e2 = (rows[(t, j)] for t in ("raftblkd", "raftblkd-enc", "replicas2", "replicas2e"))
        print(f"| {j} | {ratio(e and e['iops'], p and p['iops'])} | {cpu(p, e)} | "
              f"{ratio(e2 and e2['iops'], p2 and p2['iops'])} | {cpu(p2, e2)} |")


def ab(out):
    rounds = sorted({f.split(".")[1] for f in os.listdir(out) if f.startswith("ab-base.r")})
    if not rounds:
        return
    print()
    print(f"A/B on a plain volume of raftblkd alone, baseline build vs this one, {len(rounds)} alternating rounds:")
    print()
    print("| job | baseline IOPS (each round) | this build IOPS | this/baseline (mean of rounds) | CPU µs/IO baseline, this |")
    print("|---|---:|---:|---:|---:|")
    for j in JOBS[:3]:
        b = [load(out, f"ab-base.{r}", j) for r in rounds]
        n = [load(out, f"ab-new.{r}", j) for r in rounds]
        if not all(b) or not all(n):
            continue
        ratios = [x["iops"] / y["iops"] for x, y in zip(n, b)]
        mean = lambda xs: sum(xs) / len(xs)
        cb = mean([x["cpu_us_per_io"] or 0 for x in b])
        cn = mean([x["cpu_us_per_io"] or 0 for x in n])
        each = lambda rs: ", ".join("%.0f" % x["iops"] for x in rs)
        print(f"| {j} | {each(b)} | {each(n)} | {mean(ratios):.2f}x | {cb:.1f}, {cn:.1f} |")


def replicated(rows):
    if not any(rows[(t, j)] for t in ("replicas0", "replicas1", "replicas2") for j in JOBS):
        return
    print()
    print("Replicated volumes on a local 3-node cluster (served by the leader's node):")
    print()
    print("| job | replicas=1 / replicas=0 | replicas=2 / replicas=0 | replicas=2 / qemu-nbd | replicas=0 (cluster) / raftblkd (alone) |")
    print("|---|---:|---:|---:|---:|")
    for j in JOBS:
        r0, r1, r2, q, alone = (rows[(t, j)] for t in ("replicas0", "replicas1", "replicas2", "qemu-nbd", "raftblkd"))
        if not r0:
            continue
        print(f"| {j} | {ratio(r1 and r1['iops'], r0['iops'])} | {ratio(r2 and r2['iops'], r0['iops'])} | "
              f"{ratio(r2 and r2['iops'], q and q['iops'])} | {ratio(r0['iops'], alone and alone['iops'])} |")

    targets(rows)


def targets(rows):
    """The replicated write path's targets (issue 3/6), as ratios to the node alone."""
    def get(t, j, k):
        if t == "alone":
            # The mean of the runs before and after the cluster's (the host's speed drifts).
            values = [v for v in (get("raftblkd", j, k), get("raftblkd-after", j, k)) if v]
            return sum(values) / len(values) if values else None
        r = rows[(t, j)]
        return r and r[k]
    if not get("replicas2", "randwrite-4k-qd32", "iops"):
        return
    def line(what, value, target, ok):
        mark = "-" if value is None else ("met" if ok(value) else "missed")
        shown = "-" if value is None else f"{value:.2f}"
        print(f"| {what} | {shown} | {target} | {mark} |")
    def div(a, b):
        return a / b if a and b else None
    print()
    print("Replicated write path targets, ratios to the same node alone in this run (alone: the mean of")
    print("raftblkd before and raftblkd-after after the cluster targets):")
    print()
    print("| measure | value | target | |")
    print("|---|---:|---:|---|")
    line("replicas=0 / alone IOPS, 4k randwrite QD32",
         div(get("replicas0", "randwrite-4k-qd32", "iops"), get("alone", "randwrite-4k-qd32", "iops")),
         ">= 0.8", lambda v: v >= 0.8)
    for j in ("randwrite-4k-qd32", "randwrite-4k-qd1"):
        line(f"replicas=2 / alone server CPU per write (3 nodes summed), {j}",
             div(get("replicas2", j, "cpu_us_per_io"), get("alone", j, "cpu_us_per_io")),
             "<= 4.5", lambda v: v <= 4.5)
    line("replicas=2 / alone IOPS, 4k randwrite QD32",
         div(get("replicas2", "randwrite-4k-qd32", "iops"), get("alone", "randwrite-4k-qd32", "iops")),
         ">= 0.2", lambda v: v >= 0.2)
    qd1 = get("replicas2", "randwrite-4k-qd1", "mean_us")
    line("replicas=2 mean latency ms, 4k randwrite QD1", qd1 and qd1 / 1000, "<= 1.0", lambda v: v <= 1.0)
    line("replicas=2 / alone MiB/s, 1 MiB write QD8",
         div(get("replicas2", "write-1m-qd8", "bw_mib"), get("alone", "write-1m-qd8", "bw_mib")),
         ">= 0.15", lambda v: v >= 0.15)
    line("replicas=2 / replicas=0 IOPS, 4k randread QD32",
         div(get("replicas2", "randread-4k-qd32", "iops"), get("replicas0", "randread-4k-qd32", "iops")),
         ">= 0.9", lambda v: v >= 0.9)


if __name__ == "__main__":
    main()
