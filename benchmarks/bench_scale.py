"""Scale (issue 10): time and peak memory of `normopt optimize --no-tune` on LLM-sized models.

Models come from normopt.models.llm (written tensor by tensor, random weights, Hugging Face input
names, a KV cache):
  * gpt2-small-shaped decoder, fp32, 652 MB in one protobuf (verified);
  * opt-1.3b-shaped decoder, fp32, 5.7 GB of external data (verified);
  * opt-6.7b-shaped decoder, fp16, 13.7 GB of external data (--no-verify).
Each run is `normopt optimize` in its own process; wall time is measured around it and peak RSS
is that process's ru_maxrss (os.wait4); each model runs --runs times (default 3) and the table
gives the median wall time with its range and the largest peak RSS. Per-pass times come from the
median run's report. Needs disk for each model and its output (about 40 GB for all three).

    python benchmarks/bench_scale.py --dir /path/with/space [--only gpt2-small opt-1.3b opt-6.7b] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from _common import model_bytes, remove_model, run_measured, write_table

CASES = [
    # name, llm shape, dtype, single file, verify, targets (wall s, peak RSS / bytes)
    ("gpt2-small", "gpt2-small", "float32", True, True, (20, 2.5)),
    ("opt-1.3b", "opt-1.3b", "float32", False, True, (180, 2.5)),
    ("opt-6.7b", "opt-6.7b", "float16", False, False, (None, None)),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/normopt-scale")
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--keep", action="store_true", help="keep the generated models")
    ap.add_argument("--runs", type=int, default=3, help="runs per model (median wall, largest peak RSS)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "scale.md"))
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    from normopt.models.llm import SHAPES, DecoderSpec, write_decoder

    lines = [f"| model | weights | form | verify | wall s (median of {args.runs}; range) | peak RSS (largest) | RSS / weights | LNs -> RMS | slowest passes (s) | targets |",
             "|---|---:|---|---|---:|---:|---:|---|---|---|"]
    for name, shape, dtype, single, verify, (t_wall, t_rss) in CASES:
        if args.only and name not in args.only:
            continue
        src = os.path.join(args.dir, f"{name}.onnx")
        dst = os.path.join(args.dir, f"{name}.opt.onnx")
        report = os.path.join(args.dir, f"{name}.report.json")
        if not os.path.exists(src):
            t0 = time.perf_counter()
            info = write_decoder(src, DecoderSpec(**SHAPES[shape], dtype=dtype), single_file=single)
            print(f"{name}: wrote {info['weight_bytes'] / 2**30:.2f} GB in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        weights = model_bytes(src)
        cmd = [sys.executable, "-m", "normopt.cli", "optimize", src, "-o", dst, "--no-tune", "--report", report, "-q"]
        if not verify:
            cmd.append("--no-verify")
        runs = []
        for _ in range(args.runs):
            code, wall, rss, out, err = run_measured(cmd)
            if code != 0:
                break
            runs.append((wall, rss, json.load(open(report))))
        if code != 0:
            print(f"{name}: exit {code}\n{err}", file=sys.stderr)
            lines.append(f"| {name} | {weights / 2**30:.2f} GB | | | failed (exit {code}) | | | | | |")
            continue
        walls = sorted(r[0] for r in runs)
        wall = walls[len(walls) // 2]
        rss = max(r[1] for r in runs)
        rep = next(r[2] for r in runs if r[0] == wall)
        spread = f"{wall:.1f} ({walls[0]:.1f}-{walls[-1]:.1f})" if len(walls) > 1 else f"{wall:.1f}"
        ln = next(p for p in rep["passes"] if p["name"] == "ln_to_rms")
        total = ln["applied"] + len(ln["declined"])
        slowest = sorted(rep["passes"], key=lambda p: -p["seconds"])[:3]
        passes = ", ".join(f"{p['name']} {p['seconds']:.1f}" for p in slowest)
        verified = "equivalent" if rep["verification"] and rep["verification"]["equivalent"] else ("--no-verify" if not verify else "FAILED")
        target = []
        if t_wall:
            target.append(f"wall <= {t_wall} s: {'met' if wall <= t_wall else 'MISSED'}")
        if t_rss:
            target.append(f"RSS <= {t_rss}x: {'met' if rss <= t_rss * weights else 'MISSED'}")
        if name == "opt-6.7b":
            target.append(f"RSS <= 4 GB: {'met' if rss <= 4 * 2**30 else 'MISSED'}")
        lines.append(f"| {name} ({dtype}) | {weights / 2**30:.2f} GB | {'one protobuf' if single else 'external data'} | {verified} | "
                     f"{spread} | {rss / 2**30:.2f} GB | {rss / weights:.2f} | {ln['applied']} / {total} | {passes} | {'; '.join(target)} |")
        print(lines[-1], file=sys.stderr)
        remove_model(dst)
        if not args.keep:
            remove_model(src)
    import platform

    import onnxruntime as ort

    head = (f"machine: {platform.machine()}, {os.cpu_count()} cores, onnxruntime {ort.__version__}; `normopt optimize --no-tune` "
            "(verification on unless marked); wall time around the process; peak RSS = that process's ru_maxrss\n\n")
    print(write_table([head] + lines, args.out))


if __name__ == "__main__":
    main()
