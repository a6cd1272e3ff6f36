"""Translation validation at scale: time and peak RSS of `normopt verify ORIG OPT --prove` on
LLM-shaped decoders (normopt.models.llm: written tensor by tensor, random weights, a KV cache).

For each shape the script writes the decoder, optimizes it once (`normopt optimize --no-tune
--no-verify`, not timed), then runs the proof `--runs` times, each in its own process: wall time
around the process, peak RSS from os.wait4 (ru_maxrss). The table gives the median wall with its
range and the largest peak RSS, against the targets (OPT-1.3B shape: <= 180 s, <= 1.5 GB;
OPT-6.7B fp16: <= 4 GB).

    python benchmarks/bench_proof.py --dir /path/with/space [--only tiny opt-1.3b opt-6.7b] [--runs 3]

`tiny` (2 layers, d 64) is the smoke test: seconds, a few MB.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from _common import model_bytes, remove_model, run_measured, write_table

CASES = [
    # name, llm shape (None: the small default spec), dtype, single file, targets (wall s, peak RSS GB)
    ("tiny", None, "float32", True, (None, None)),
    ("gpt2-small", "gpt2-small", "float32", True, (None, None)),
    ("opt-1.3b", "opt-1.3b", "float32", False, (180, 1.5)),
    ("opt-6.7b", "opt-6.7b", "float16", False, (None, 4.0)),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/normopt-proof-scale")
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the generated models")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "proof.md"))
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    from normopt.models.llm import SHAPES, DecoderSpec, write_decoder

    lines = [f"| model | weights | proof | wall s (median of {args.runs}; range) | peak RSS (largest) | targets |",
             "|---|---:|---|---:|---:|---|"]
    for name, shape, dtype, single, (t_wall, t_rss) in CASES:
        if args.only and name not in args.only:
            continue
        src = os.path.join(args.dir, f"{name}.onnx")
        dst = os.path.join(args.dir, f"{name}.opt.onnx")
        if not os.path.exists(src):
            spec = DecoderSpec(**SHAPES[shape], dtype=dtype) if shape else DecoderSpec(dtype=dtype)
            write_decoder(src, spec, single_file=single)
        if not os.path.exists(dst):
            r = subprocess.run([sys.executable, "-m", "normopt.cli", "optimize", src, "-o", dst, "--no-tune", "--no-verify", "-q"],
                               capture_output=True, text=True)
            if r.returncode != 0:
                lines.append(f"| {name} | | optimize failed (exit {r.returncode}) | | | |")
                print(r.stderr, file=sys.stderr)
                continue
        weights = model_bytes(src)
        cmd = [sys.executable, "-m", "normopt.cli", "verify", src, dst, "--prove"]
        runs, verdict = [], ""
        for _ in range(args.runs):
            code, wall, rss, out, err = run_measured(cmd)
            verdict = (out.strip().splitlines() or [err.strip()])[0][:120]
            runs.append((wall, rss))
            if code != 0:
                break
        walls = sorted(w for w, _ in runs)
        wall = walls[len(walls) // 2]
        rss = max(r for _, r in runs)
        target = []
        if t_wall:
            target.append(f"wall <= {t_wall} s: {'met' if wall <= t_wall else 'MISSED'}")
        if t_rss:
            target.append(f"RSS <= {t_rss} GB: {'met' if rss <= t_rss * 2**30 else 'MISSED'}")
        spread = f"{wall:.1f} ({walls[0]:.1f}-{walls[-1]:.1f})" if len(walls) > 1 else f"{wall:.1f}"
        lines.append(f"| {name} ({dtype}) | {weights / 2**30:.2f} GB | {verdict} | {spread} | {rss / 2**30:.2f} GB | {'; '.join(target)} |")
        print(lines[-1], file=sys.stderr)
        if not args.keep:
            remove_model(src)
            remove_model(dst)
    import platform

    head = (f"machine: {platform.machine()}, {os.cpu_count()} cores; `normopt verify ORIG OPT --prove` (no model is run); "
            "wall time around the process; peak RSS = that process's ru_maxrss\n\n")
    print(write_table([head] + lines, args.out))


if __name__ == "__main__":
    main()
