"""Benchmark: normopt against the original export and peer optimizers on ORT CPU.

Per model: the original export; onnxruntime.transformers.optimizer; onnxscript's optimizer +
ort_fusions; and normopt (`optimize` with tuning and its never-slower guard). Each baseline is
verified against the original first; one that differs is listed as NOT EQUIVALENT and not
timed. All are timed interleaved (ORT_ENABLE_ALL, 1 thread), ratios paired against the original.

Usage:  python benchmarks/bench_baselines.py [--runs N] [--out benchmarks/results/baselines.md]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import onnx
from _common import write_table

from normopt.api import optimize
from normopt.models import builders as B
from normopt.models.export import example_inputs, export
from normopt.runtime_tests import baselines as BL
from normopt.runtime_tests.latency import bench, machine_description

MODELS = {
    # name: (builder, batch, seq, ort-transformers model type, heads, hidden)
    "gpt2-small (12x768, seq 128, b1)": (lambda: B.gpt("gpt2-small"), 1, 128, "gpt2", 12, 768),
    "vit-b16 (197 tok, b1)": (lambda: B.vit("vit-b16"), 1, None, "vit", 12, 768),
    "6x256 (seq 64, b8)": (lambda: B.gpt("d256"), 8, 64, "gpt2", 4, 256),
    "SLAB RepBN DeiT-S (b1)": (lambda: B.slab("deit-s"), 1, None, "vit", 6, 384),
    "Unified Norm DeiT-S (b1)": (lambda: B.unified("deit-s"), 1, None, "vit", 6, 384),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "baselines.md"))
    args = ap.parse_args()
    lines = ["# normopt against peer optimizers on ORT CPU\n",
             f"machine: {machine_description()}; ORT_ENABLE_ALL; {args.threads} thread(s); intra-op spinning off; {args.runs} interleaved "
             "runs; ratio = model / original (median of paired ratios, bootstrap 95% CI); norm ops = normalizations found in the graph\n",
             "| model | variant | median ms | p90 ms | ratio | 95% CI | norm ops |", "|---|---|---:|---:|---:|---|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name, (build, batch, seq, mtype, heads, hidden) in MODELS.items():
            m = build()
            src, dst = os.path.join(tmp, "m.onnx"), os.path.join(tmp, "o.onnx")
            export(m, example_inputs(m, batch=batch, seq=seq or 16), src)
            original = onnx.load(src)
            res = optimize(src, dst, tune=True)
            print(f"{name}: normopt verified; " + "; ".join(n for n in res.report.notes if n.startswith("guard")), file=sys.stderr)
            entries = [("original", original)]
            skipped = []
            for b in BL.build(list(BL.KNOWN), original, mtype, num_heads=heads, hidden_size=hidden):
                print(f"  baseline {b.label}: {b.status}", file=sys.stderr)
                (entries.append((b.label, b.model)) if b.model is not None else skipped.append((b.label, b.status)))
            entries.append(("normopt", onnx.load(dst)))
            r = bench(entries, threads=args.threads, runs=args.runs, warmup=3)
            for t in r.models:
                lines.append(f"| {name} | {t.label} | {t.median_ms:.2f} | {t.p90_ms:.2f} | {t.ratio:.3f} | [{t.ci_low:.3f}, {t.ci_high:.3f}] | {r.norm_column(t)} |")
            for label, why in skipped:
                lines.append(f"| {name} | {label} | not timed: {why} | | | | |")
            print("\n".join(lines[-len(r.models) - len(skipped):]), file=sys.stderr)
            del m, original, entries
    print(write_table(lines, args.out))


if __name__ == "__main__":
    main()
