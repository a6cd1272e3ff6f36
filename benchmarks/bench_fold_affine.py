"""Benchmark: folding affine norms (fold_affine) on ORT CPU against the norm-free floor.

For each model shape, three ONNX models run interleaved under ORT_ENABLE_ALL:
  * floor:    the same network built with the norms removed;
  * normopt:  `normopt optimize` of the export with norms (verified equivalent to it);
  * unfolded: the export with norms, as PyTorch wrote it.
Ratios are paired against the floor (median of per-round ratios, bootstrap 95% CI). Norm kernel
time is from ORT's profiler on the graph ORT runs: BatchNormalization and every op of a
per-channel affine norm still present.

Usage:  python benchmarks/bench_fold_affine.py [--quick] [--runs N] [--out benchmarks/results/fold_affine.md]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import onnx

from normopt import graph as G
from _common import write_table

from normopt.api import optimize
from normopt.models import builders as B
from normopt.models.export import example_inputs, export
from normopt.passes.fold_affine import find_affines
from normopt.runtime_tests.inputs import InputOptions, make_feeds
from normopt.runtime_tests.latency import bench, machine_description
from normopt.runtime_tests.profile import kernel_ms

SHAPES = {
    # name: (size kwargs, batch, threads, runs scale)
    "DeiT-S 12x384, 197 tok, b1": (dict(size="deit-s"), 1, 1, 1.0),
    "DeiT-S 12x384, 197 tok, b8": (dict(size="deit-s"), 8, 2, 0.75),
    "12x192, 197 tok, b1": (dict(size="d192", image=224, patch=16), 1, 1, 1.0),
}
NORMS = {"RepBN (SLAB)": "repbn", "Unified Norm": "un"}
QUICK = {"12x192, 197 tok, b1"}


NORM_MODULES = ("/n1/", "/n2/", "/norm/")  # the norm modules of normopt.models.builders.Block / Encoder


def norm_nodes(model: onnx.ModelProto):
    """Norm ops, the ops of affine norms the recognizer finds, and every node the exporter named
    under a norm module of our builders (ORT's fusions can hide a norm from the recognizer)."""
    g = G.to_graph(model)
    names = {n.name for n in g.nodes if n.op in ("BatchNormalization", "LayerNormalization", "InstanceNormalization")}
    names.update(n.name for n in g.nodes if any(k in n.name for k in NORM_MODULES))
    for aff in find_affines(g):
        names.update(n.name for n in aff.nodes)
    return names


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--profile-runs", type=int, default=10)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "fold_affine.md"))
    args = ap.parse_args()
    lines = ["# fold_affine on ORT CPU\n",
             f"machine: {machine_description()}; ORT_ENABLE_ALL; intra-op spinning off; interleaved floor / normopt / unfolded; "
             f"ratios paired against the floor (median of per-round ratios, bootstrap 95% CI)\n",
             "| norm | shape | threads | runs | floor ms | normopt ms | unfolded ms | normopt / floor | 95% CI | unfolded / floor | 95% CI | norm kernel ms (unfolded -> normopt) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for sname, (kw, batch, threads, scale) in SHAPES.items():
            if args.quick and sname not in QUICK:
                continue
            for nname, norm in NORMS.items():
                m = B.slab(norm=norm, **kw) if norm == "repbn" else B.unified(**kw)
                # the floor: the same network (same layout: UN runs fairseq's time-major) without norms
                floor_model = B.vit(norm="none", pool="mean", time_major=m.time_major, **kw)
                floor = os.path.join(tmp, "floor.onnx")
                export(floor_model, example_inputs(floor_model, batch=batch), floor)
                src, dst = os.path.join(tmp, "unfolded.onnx"), os.path.join(tmp, "normopt.onnx")
                export(m, example_inputs(m, batch=batch), src)
                res = optimize(src, dst)
                fa = next(p for p in res.report.passes if p.name == "fold_affine")
                print(f"{nname} {sname}: {fa.applied} norms folded, verified", file=sys.stderr)
                runs = max(8, int(args.runs * scale))
                r = bench([("floor", floor), ("normopt", dst), ("unfolded", src)], threads=threads, runs=runs, warmup=3)
                f_, n_, u_ = r.models
                feeds = make_feeds(onnx.load(src, load_external_data=False), 0, InputOptions())
                ku, _ = kernel_ms(src, feeds, norm_nodes, threads, args.profile_runs)
                kn, _ = kernel_ms(dst, feeds, norm_nodes, threads, args.profile_runs)
                row = (f"| {nname} | {sname} | {threads} | {runs} | {f_.median_ms:.2f} | {n_.median_ms:.2f} | {u_.median_ms:.2f} | "
                       f"{n_.ratio:.3f} | [{n_.ci_low:.3f}, {n_.ci_high:.3f}] | {u_.ratio:.3f} | [{u_.ci_low:.3f}, {u_.ci_high:.3f}] | "
                       f"{ku:.3f} -> {kn:.3f} |")
                print(row, file=sys.stderr)
                lines.append(row)
    text = write_table(lines, args.out)
    print(text)


if __name__ == "__main__":
    main()
