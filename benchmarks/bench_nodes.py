"""Scale with the number of nodes (issue 17): `normopt optimize --no-verify --no-tune` on a
transformer-like Pre-LN stack and on an elementwise chain of scalar-constant ops, by node count.

Each case runs in its own process (`python -m normopt.cli optimize ... --no-verify --no-tune
--report`), --runs times (default 3); the table gives the median wall time with its range, and
the per-pass times of the median run (from the report), and the median CPU time (user + system,
all threads: on a shared machine the steadier number; ONNX Runtime's load check of the input runs
in a thread beside the passes and counts here). Targets: a 100k-node transformer-like
graph <= 20 s, a 100k-node chain <= 10 s.

    python benchmarks/bench_nodes.py [--nodes 100000] [--runs 3] [--only transformer chain] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import onnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from node_graphs import elementwise_chain, transformer_like  # noqa: E402

from _common import write_table  # noqa: E402

CASES = {"transformer": (transformer_like, 20.0), "chain": (elementwise_chain, 10.0)}


def run_once(src, dst, report):
    cmd = [sys.executable, "-m", "normopt.cli", "optimize", src, "-o", dst, "--no-verify", "--no-tune", "--report", report]
    for p in (dst, report):
        if os.path.exists(p):
            os.remove(p)
    t0 = time.perf_counter()
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"optimize failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    with open(report) as f:
        rep = json.load(f)
    return wall, cpu, {p["name"]: p["seconds"] for p in rep.get("passes", [])}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", nargs="*", choices=sorted(CASES), default=sorted(CASES))
    ap.add_argument("--dir", default=None, help="where the models go (default: a temporary folder)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "nodes.md"))
    args = ap.parse_args()
    work = args.dir or tempfile.mkdtemp(prefix="normopt-bench-nodes-")
    lines = ["| graph | nodes | median wall s (range) | median CPU s | target s | slowest passes (median run) |",
             "|---|---|---|---|---|---|"]
    for name in args.only:
        build, target = CASES[name]
        model = build(args.nodes)
        src = os.path.join(work, f"{name}.onnx")
        onnx.save(model, src)
        runs = [run_once(src, os.path.join(work, f"{name}.out.onnx"), os.path.join(work, f"{name}.json")) for _ in range(args.runs)]
        walls = [w for w, _, _ in runs]
        med = statistics.median(walls)
        cpu = statistics.median(c for _, c, _ in runs)
        passes = runs[walls.index(min(walls, key=lambda w: abs(w - med)))][2]
        top = ", ".join(f"{k} {v:.1f}" for k, v in sorted(passes.items(), key=lambda kv: -kv[1])[:4])
        lines.append(f"| {name} | {len(model.graph.node)} | {med:.1f} ({min(walls):.1f}-{max(walls):.1f}) | {cpu:.1f} | {target:g} | {top} |")
        print(lines[-1], flush=True)
    print(write_table(lines, args.out))


if __name__ == "__main__":
    main()
