"""Benchmark: Pre-CRMSNorm (opt-in crms) against plain RMSNorm on ORT CPU.

Three models interleaved under ORT_ENABLE_ALL: the original export, normopt's default output
(LN -> RMSNorm) and normopt with --crms forced (streams in d-1 channels). Ratios are paired
against the RMS output. Width d-1 (767 for d=768) can misalign GEMMs; `optimize --crms` keeps
CRMS only where it measures faster, and this table says where that is.

Usage:  python benchmarks/bench_crms.py [--runs N] [--out benchmarks/results/crms.md]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import onnx
from _common import write_table

from normopt import optimize_model
from normopt.models import builders as B
from normopt.models.export import example_inputs, export
from normopt.runtime_tests.equivalence import compare
from normopt.runtime_tests.latency import bench, machine_description

MODELS = {
    "gpt2-small (12x768, seq 128, b1)": (lambda: B.gpt("gpt2-small"), 1, 128),
    "vit-b16 (197 tok, b1)": (lambda: B.vit("vit-b16"), 1, None),
    "12x192 (197 tok, b1)": (lambda: B.vit("d192", image=224, patch=16), 1, None),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "crms.md"))
    args = ap.parse_args()
    lines = ["# Pre-CRMSNorm (crms) against RMSNorm on ORT CPU\n",
             f"machine: {machine_description()}; ORT_ENABLE_ALL; intra-op spinning off; {args.runs} interleaved runs; "
             "ratios paired against the RMS output (median of per-round ratios, bootstrap 95% CI)\n",
             "| model | threads | original ms | RMS ms | CRMS ms | CRMS / RMS | 95% CI | RMS / original | `optimize --crms` keeps |",
             "|---|---:|---:|---:|---:|---:|---|---:|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name, (build, batch, seq) in MODELS.items():
            model = build()
            src = os.path.join(tmp, "m.onnx")
            export(model, example_inputs(model, batch=batch, seq=seq or 16), src)
            m = onnx.load(src)
            rms, _ = optimize_model(m)
            crms, rep = optimize_model(m, opt_in=["crms"])
            applied = next(p for p in rep.passes if p.name == "crms").applied
            ok = compare(m, crms, seeds=2).equivalent
            print(f"{name}: {applied} readers compressed, equivalent={ok}", file=sys.stderr)
            for threads in args.threads:
                r = bench([("rms", rms), ("crms", crms), ("original", m)], threads=threads, runs=args.runs, warmup=5)
                rr, cc, oo = r.models
                keep = "CRMS" if cc.ci_high < 1.0 else "RMS"
                row = (f"| {name} | {threads} | {oo.median_ms:.2f} | {rr.median_ms:.2f} | {cc.median_ms:.2f} | {cc.ratio:.3f} | "
                       f"[{cc.ci_low:.3f}, {cc.ci_high:.3f}] | {1 / oo.ratio:.3f} | {keep} |")
                print(row, file=sys.stderr)
                lines.append(row)
            del model, m, rms, crms
    print(write_table(lines, args.out))


if __name__ == "__main__":
    main()
