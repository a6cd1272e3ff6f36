"""Benchmark: LayerNorm -> RMSNorm (ln_to_rms) on ORT CPU, original against optimized.

For each model: export (TorchScript, opset 17, random weights), `normopt optimize` (verified),
then
  * end to end: interleaved A/B runs under ORT_ENABLE_ALL at 1 and 2 threads, median, p90 and
    the paired ratio optimized/original with a bootstrap 95% CI;
  * norm-path kernel time per inference from ORT's profiler, on the graph ORT actually runs
    (after its own fusions): norm ops, the residual Adds that feed them and the beta Adds that
    follow them.

Usage:  python benchmarks/bench_ln_to_rms.py [--quick] [--runs N] [--threads 1 2] [--only NAME]
                                             [--out benchmarks/results/ln_to_rms.md]
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
from normopt.runtime_tests.inputs import InputOptions, make_feeds
from normopt.runtime_tests.latency import bench, machine_description
from normopt.runtime_tests.profile import kernel_ms

NORM_OPS = {"LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization", "SkipLayerNormalization",
            "SkipSimplifiedLayerNormalization"}

MODELS = {
    # name: (builder, builder kwargs, batch, seq, thread settings)
    "gpt2-small (12x768, seq 128, b1)": (B.gpt, dict(size="gpt2-small"), 1, 128, (1, 2)),
    "vit-b16 (197 tok, b1)": (B.vit, dict(size="vit-b16"), 1, None, (1, 2)),
    "6x256 (seq 64, b8)": (B.gpt, dict(size="d256"), 8, 64, (1, 2)),
    "12x192 (197 tok, b1)": (B.vit, dict(size="d192", image=224, patch=16), 1, None, (1,)),
}
QUICK = {"6x256 (seq 64, b8)", "12x192 (197 tok, b1)"}


def norm_path_nodes(g: onnx.ModelProto):
    """Norm ops, the residual Adds that feed them and the beta Adds that follow them."""
    g = g.graph
    norm_nodes = {n.name for n in g.node if n.op_type in NORM_OPS}
    norm_in = {n.input[0] for n in g.node if n.name in norm_nodes}
    norm_out = {o for n in g.node if n.name in norm_nodes for o in n.output}
    adds = {n.name for n in g.node if n.op_type == "Add" and (set(n.output) & norm_in or set(n.input) & norm_out)}
    return norm_nodes | adds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="only the small models")
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--profile-runs", type=int, default=20)
    ap.add_argument("--threads", type=int, nargs="*", default=None, help="override the thread settings")
    ap.add_argument("--only", default=None, help="only models whose name contains this")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "ln_to_rms.md"))
    args = ap.parse_args()
    lines = [f"# ln_to_rms on ORT CPU\n", f"machine: {machine_description()}; ORT_ENABLE_ALL; intra-op spinning off; {args.runs} interleaved runs after 5 warm-ups; ratio = optimized / original (median of paired ratios, bootstrap 95% CI)\n",
             "| model | threads | original ms (median / p90) | normopt ms (median / p90) | ratio | 95% CI | norm-path ms original | norm-path ms normopt | norm-path change |",
             "|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name, (builder, kw, batch, seq, threads_list) in MODELS.items():
            if (args.quick and name not in QUICK) or (args.only and args.only not in name):
                continue
            if args.threads:
                threads_list = tuple(args.threads)
            model = builder(**kw)
            src = os.path.join(tmp, "model.onnx")
            dst = os.path.join(tmp, "model.opt.onnx")
            inputs = example_inputs(model, batch=batch, seq=seq or 16)
            export(model, inputs, src)
            res = optimize(src, dst)
            ln = next(p for p in res.report.passes if p.name == "ln_to_rms")
            print(f"{name}: {ln.applied} LN -> RMSNorm, verified (max abs {max(m.max_abs for m in res.verification.outputs):.2g})", file=sys.stderr)
            feeds = make_feeds(onnx.load(src, load_external_data=False), 0, InputOptions())
            for threads in threads_list:
                r = bench([("original", src), ("normopt", dst)], threads=threads, runs=args.runs, warmup=5)
                a, b = r.models
                na, _ = kernel_ms(src, feeds, norm_path_nodes, threads, args.profile_runs)
                nb, _ = kernel_ms(dst, feeds, norm_path_nodes, threads, args.profile_runs)
                row = (f"| {name} | {threads} | {a.median_ms:.2f} / {a.p90_ms:.2f} | {b.median_ms:.2f} / {b.p90_ms:.2f} | "
                       f"{b.ratio:.3f} | [{b.ci_low:.3f}, {b.ci_high:.3f}] | {na:.3f} | {nb:.3f} | {100 * (nb - na) / na:+.0f}% |")
                print(row, file=sys.stderr)
                lines.append(row)
            del model
    text = write_table(lines, args.out)
    print(text)


if __name__ == "__main__":
    main()
