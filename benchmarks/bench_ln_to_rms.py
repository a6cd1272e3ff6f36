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
import collections
import json
import os
import sys
import tempfile

import onnx

from normopt.api import optimize
from normopt.models import builders as B
from normopt.models.export import example_inputs, export
from normopt.runtime_tests.inputs import InputOptions, make_feeds
from normopt.runtime_tests.latency import bench, machine_description
from normopt.runtime_tests.providers import make_session

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


def norm_path_ms(path: str, feeds: dict, threads: int, runs: int) -> tuple[float, dict]:
    """Kernel time per inference in the norm path, from ORT's profiler."""
    with tempfile.TemporaryDirectory() as tmp:
        opt_path = os.path.join(tmp, "ort_optimized.onnx")
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = threads
        so.optimized_model_filepath = opt_path
        so.log_severity_level = 3
        ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        g = onnx.load(opt_path, load_external_data=False).graph
        norm_nodes = {n.name for n in g.node if n.op_type in NORM_OPS}
        norm_in = {n.input[0] for n in g.node if n.name in norm_nodes}
        norm_out = {o for n in g.node if n.name in norm_nodes for o in n.output}
        path_adds = {n.name for n in g.node if n.op_type == "Add" and (set(n.output) & norm_in or set(n.input) & norm_out)}
        sess = make_session(path, "cpu", "all", threads, profile_prefix=os.path.join(tmp, "prof"), spin=False)
        for _ in range(3):
            sess.run(None, feeds)
        sess.end_profiling()
        sess = make_session(path, "cpu", "all", threads, profile_prefix=os.path.join(tmp, "prof2"), spin=False)
        for _ in range(runs):
            sess.run(None, feeds)
        prof = sess.end_profiling()
        events = json.load(open(prof))
    total = collections.Counter()
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        node = e["name"][: -len("_kernel_time")]
        op = e.get("args", {}).get("op_name", "")
        if node in norm_nodes or node in path_adds:
            total[op] += e["dur"]
    per = {op: us / runs / 1000.0 for op, us in total.items()}
    return sum(per.values()), per


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
                na, _ = norm_path_ms(src, feeds, threads, args.profile_runs)
                nb, _ = norm_path_ms(dst, feeds, threads, args.profile_runs)
                row = (f"| {name} | {threads} | {a.median_ms:.2f} / {a.p90_ms:.2f} | {b.median_ms:.2f} / {b.p90_ms:.2f} | "
                       f"{b.ratio:.3f} | [{b.ci_low:.3f}, {b.ci_high:.3f}] | {na:.3f} | {nb:.3f} | {100 * (nb - na) / na:+.0f}% |")
                print(row, file=sys.stderr)
                lines.append(row)
            del model
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
