"""The CUDA benchmark of benchmarks/cuda_check.sh: original vs normopt vs ORT's transformer
optimizer, interleaved paired runs with IO binding (normopt.runtime_tests.latency).

    python benchmarks/cuda_bench.py OUTDIR [--provider cuda|cpu] [--quick] [--runs N] [--budget S]

Models, built here without torch (normopt.models.llm; benchmarks/cuda_models.py):
  * GPT-2-small-shaped decoder (d 768, 12 heads, FFN 3072, vocab 50257), fp16: sequence 128
    without a cache, and sequence 1 after a 127-token KV cache;
  * OPT-350M-shaped decoder (d 1024, 16 heads, FFN 4096, vocab 50272), fp16, the same two shapes,
    with fewer layers than the real 24 (--opt-layers, default 8) to keep the run short;
  * ViT-B/16 (224 x 224, 197 tokens), fp16;
  * SLAB DeiT-S (RepBN in every norm position, mean pooled), fp16, with its norm-free floor
    (the same network with the norms removed): the affine-norm target is normopt <= 1.01x floor.
Each model is optimized with `normopt optimize --provider P` (tuning on, output verified), and
ORT's transformer optimizer (onnxruntime.transformers.optimizer, its fusions at opt_level 0,
use_gpu on CUDA) makes a third version, timed only if it is equivalent to the original on P. All versions of one model run
interleaved in one harness call; ratios are medians of per-round paired ratios with bootstrap
95% CIs. --quick: tiny shapes and few runs (the CPU dry run). Writes OUTDIR/cuda-results.md and
OUTDIR/cuda-results.json; exits 1 if a normopt output failed verification or a case crashed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback

import numpy as np
import onnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cuda_models  # noqa: E402

from normopt import api  # noqa: E402
from normopt.errors import NormoptError, VerificationFailed  # noqa: E402
from normopt.models.llm import SHAPES, write_decoder  # noqa: E402
from normopt.runtime_tests.equivalence import compare  # noqa: E402
from normopt.runtime_tests.inputs import InputOptions  # noqa: E402
from normopt.runtime_tests.latency import bench, bootstrap_ratio, machine_description  # noqa: E402


def cases(quick: bool, opt_layers: int):
    """(name, shape text, builder(path) -> None, InputOptions, ort model type, heads, hidden, floor builder or None)."""
    out = []
    if quick:
        dec = {"gpt2-small": dict(arch="gpt2", layers=2, d=64, heads=4, ffn=256, vocab=256, positions=64),
               "opt-350m": dict(arch="opt", layers=2, d=64, heads=4, ffn=256, vocab=256, positions=64)}
        seq, past = 16, 15
        enc = {"vit-b16": ("tiny", {}), "deit-s": ("tiny", {"pool": "mean"})}
    else:
        dec = {"gpt2-small": dict(SHAPES["gpt2-small"]), "opt-350m": dict(SHAPES["opt-350m"], layers=opt_layers)}
        seq, past = 128, 127
        enc = {"vit-b16": ("vit-b16", {}), "deit-s": ("deit-s", {})}
    for name, spec in dec.items():
        layers = spec["layers"]
        real = SHAPES[name]["layers"]
        note = f"{layers} of {real} layers" if layers != real else f"{layers} layers"
        # --quick: GPT-2 at the sequence shape, OPT with the KV cache (each path once)
        for kv in (((name == "opt-350m"),) if quick else (False, True)):
            if kv:
                shape = f"fp16, seq 1 after {past} cached, batch 1 ({note})"
                opts = InputOptions(shapes={"batch_size": 1, "sequence_length": 1, "past_sequence_length": past})
            else:
                shape = f"fp16, seq {seq}, batch 1 ({note})"
                opts = InputOptions(shapes={"batch_size": 1, "sequence_length": seq})

            def build(path, spec=spec, kv=kv):
                write_decoder(path, **spec, dtype="float16", kv_cache=kv, opset=17)

            out.append((f"{name} decoder", shape, build, opts, "gpt2", spec["heads"], spec["d"], None))
    for name, (size, kw) in enc.items():
        cfg = dict(cuda_models.SIZES[size], **kw)
        tokens = (cfg["image"] // cfg["patch"]) ** 2 + (1 if cfg["pool"] == "cls" else 0)
        norm = "ln" if name == "vit-b16" else "repbn"
        label = "ViT-B/16" if name == "vit-b16" else "SLAB DeiT-S (RepBN)"
        shape = f"fp16, {cfg['image']}x{cfg['image']} ({tokens} tokens), batch 1, {cfg['layers']} layers"

        def build(path, size=size, kw=kw, norm=norm):
            onnx.save(cuda_models.encoder(size, norm=norm, dtype="float16", **kw), path)

        def floor(path, size=size, kw=kw):
            onnx.save(cuda_models.encoder(size, norm="none", dtype="float16", **kw), path)

        out.append((label, shape, build, None, "vit", cfg["heads"], cfg["d"], floor if norm == "repbn" else None))
    # the cases that decide the targets first: GPT-2-small at sequence 128, SLAB against its floor
    # (out: gpt2 seq, gpt2 kv, opt seq, opt kv, ViT, SLAB)
    order = [0, 5, 4, 1, 2, 3] if len(out) == 6 else range(len(out))
    return [out[i] for i in order]


def ort_transformers(src, dst, provider, model_type, heads, hidden, input_opts):
    """(path, None) or (None, why not)."""
    try:
        from onnxruntime.transformers import optimizer

        # opt_level 0: its Python fusions; ONNX Runtime's own graph optimizations run when the
        # harness loads the model (ORT_ENABLE_ALL), as for every version timed. (Levels >= 1 run
        # a session inside the optimizer, which imports torch, and this check installs none.)
        m = optimizer.optimize_model(src, model_type=model_type, num_heads=heads, hidden_size=hidden,
                                     use_gpu=provider == "cuda", opt_level=0)
        m.save_model_to_file(dst, use_external_data_format=m.model.ByteSize() > 2**31 - 1)
    except Exception as exc:
        return None, f"optimizer failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"
    try:
        res = compare(src, dst, seeds=1, input_opts=input_opts, provider=provider, stress=False)
    except Exception as exc:
        return None, f"does not run: {str(exc).splitlines()[0][:100]}"
    if not res.equivalent:
        worst = max(res.outputs, key=lambda o: o.max_abs, default=None)
        why = f"max abs {worst.max_abs:.3g} on '{worst.name}'" if worst else "; ".join(res.problems)[:100]
        return None, f"not equivalent on {provider} ({why})"
    return dst, None


def ratio(times, a, b):
    """Paired ratio b / a with its bootstrap 95% CI."""
    return bootstrap_ratio(np.asarray(times[a]), np.asarray(times[b]))


def fmt_ratio(r):
    return f"{r[0]:.3f} [{r[1]:.3f}, {r[2]:.3f}]"


def run_case(case, work, provider, runs, warmup):
    name, shape, build, opts, model_type, heads, hidden, floor = case
    row = {"model": name, "shape": shape, "phases": {}}
    t0 = time.perf_counter()
    src = os.path.join(work, "original.onnx")
    build(src)
    row["phases"]["build_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    dst = os.path.join(work, "normopt.onnx")
    try:
        res = api.optimize(src, dst, provider=provider, tune=True, verify=True, seeds=1, input_opts=opts)
    except VerificationFailed as exc:
        row["error"] = f"normopt output NOT EQUIVALENT: {exc}"
        return row
    row["phases"]["normopt_s"] = time.perf_counter() - t0
    row["normopt_notes"] = [n for n in res.report.notes if n.startswith(("ln_to_rms:", "fuse_skip:", "guard:", "crms:"))]
    row["normopt_errors"] = list(res.report.errors)
    row["unchanged"] = res.unchanged
    t0 = time.perf_counter()
    ortt, why = ort_transformers(src, os.path.join(work, "ort_transformers.onnx"), provider, model_type, heads, hidden, opts)
    row["phases"]["ort_transformers_s"] = time.perf_counter() - t0
    models = [("original", src), ("normopt", dst)]
    if ortt:
        models.append(("ort-transformers", ortt))
    else:
        row["ort_transformers_why_not"] = why
    if floor:
        fpath = os.path.join(work, "floor.onnx")
        floor(fpath)
        models.append(("norm-free floor", fpath))
    t0 = time.perf_counter()
    b = bench(models, provider=provider, runs=runs, warmup=warmup, input_opts=opts)
    row["phases"]["bench_s"] = time.perf_counter() - t0
    times = {m.label: m.times_ms for m in b.models}
    row["median_ms"] = {m.label: m.median_ms for m in b.models}
    row["norm_ops"] = {m.label: b.norm_column(m) for m in b.models}
    row["normopt_vs_original"] = ratio(times, "original", "normopt")
    if ortt:
        row["normopt_vs_ort_transformers"] = ratio(times, "ort-transformers", "normopt")
        row["ort_transformers_vs_original"] = ratio(times, "original", "ort-transformers")
    if floor:
        row["normopt_vs_floor"] = ratio(times, "norm-free floor", "normopt")
    row["header"] = b.header()
    return row


def gpu_description() -> str:
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20).stdout.strip().splitlines()
        return f"; GPU: {out[0]} (driver)" if out else ""
    except Exception:
        return ""


def markdown(rows, provider, runs, warmup, total_s, quick=False):
    lines = [f"# normopt on {provider.upper()}", ""]
    if quick:
        lines += ["**--quick: tiny shapes and few runs, a dry run of the script; the figures measure nothing.**", ""]
    lines += [
             f"machine: {machine_description()}{gpu_description() if provider == 'cuda' else ''}; EP: {provider}; {runs} interleaved paired runs after {warmup} warm-up, "
             "inputs and outputs bound to the device (IO binding) on CUDA; ratio = median of per-round paired ratios, "
             "bootstrap 95% CI; lower is faster. normopt: `optimize --provider " + provider + "` (tuned on the provider, "
             f"verified before writing). Total {total_s:.0f} s.", "",
             "| model | shape | original ms | normopt ms | normopt / original [95% CI] | ort-transformers ms | "
             "normopt / ort-transformers [95% CI] | norm-free floor: normopt / floor [95% CI] | norms |",
             "|---|---|---:|---:|---|---:|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['shape']} | {r['error'][:200]} | | | | | | |")
            continue
        med = r["median_ms"]
        ortt = (f"{med['ort-transformers']:.3f}", fmt_ratio(r["normopt_vs_ort_transformers"])) if "ort-transformers" in med \
            else ("-", f"not timed: {r.get('ort_transformers_why_not', '?')}")
        fl = (f"{med['norm-free floor']:.3f} ms; {fmt_ratio(r['normopt_vs_floor'])}" if "normopt_vs_floor" in r else "-")
        lines.append(f"| {r['model']} | {r['shape']} | {med['original']:.3f} | {med['normopt']:.3f} | "
                     f"{fmt_ratio(r['normopt_vs_original'])} | {ortt[0]} | {ortt[1]} | {fl} | {r['norm_ops'].get('normopt', '')} |")
    lines += ["", "## Targets", ""]
    lines += targets(rows)
    lines += ["", "## normopt's decisions (tuning on the provider)", ""]
    for r in rows:
        for n in r.get("normopt_notes", []) + [f"internal error: {e}" for e in r.get("normopt_errors", [])]:
            lines.append(f"- {r['model']}, {r['shape']}: {n}")
    lines += ["", "## Phases (seconds)", ""]
    for r in rows:
        lines.append(f"- {r['model']}, {r['shape']}: " + ", ".join(f"{k} {v:.1f}" for k, v in r["phases"].items()))
    return "\n".join(lines) + "\n"


def targets(rows):
    out = []
    for r in rows:
        if "error" in r:
            continue
        if r["model"].startswith("gpt2-small") and "seq 1 " not in r["shape"]:
            v = r["normopt_vs_original"]
            out.append(f"- ln_to_rms >= 3% faster than the original ({r['model']}, {r['shape']}): ratio {fmt_ratio(v)}: "
                       + ("met" if v[2] <= 0.97 else "met at the median, CI crosses 0.97" if v[0] <= 0.97 else "NOT met"))
        if "normopt_vs_floor" in r:
            v = r["normopt_vs_floor"]
            out.append(f"- affine-norm model <= 1.01x its norm-free floor ({r['model']}): {fmt_ratio(v)}: "
                       + ("met" if v[0] <= 1.01 else "NOT met"))
        if "normopt_vs_ort_transformers" in r:
            v = r["normopt_vs_ort_transformers"]
            out.append(f"- never slower than ort-transformers ({r['model']}, {r['shape']}): {fmt_ratio(v)}: "
                       + ("met" if v[1] <= 1.0 else "NOT met (slower)"))
    return out or ["- no case ran"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir")
    ap.add_argument("--provider", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, few runs (the CPU dry run)")
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--opt-layers", type=int, default=8, help="layers of the OPT-350M-shaped decoder (the real one has 24)")
    ap.add_argument("--budget", type=float, default=float(os.environ.get("NORMOPT_BENCH_BUDGET_S", "330")),
                    help="seconds after which no further case starts (its row says so)")
    a = ap.parse_args(argv)
    runs = a.runs or (8 if a.quick else 50)
    warmup = 2 if a.quick else 10
    os.makedirs(a.outdir, exist_ok=True)
    start = time.perf_counter()
    rows, failed = [], False
    for case in cases(a.quick, a.opt_layers):
        if time.perf_counter() - start > a.budget:
            rows.append({"model": case[0], "shape": case[1], "error": f"not run: the {a.budget:.0f} s budget was spent", "phases": {}})
            continue
        print(f"[cuda_bench] {case[0]}, {case[1]} ...", flush=True)
        with tempfile.TemporaryDirectory(prefix="normopt-cuda-bench-") as work:
            try:
                row = run_case(case, work, a.provider, runs, warmup)
            except (NormoptError, Exception) as exc:  # a crash is a row and a failure, not the end of the run
                traceback.print_exc()
                row = {"model": case[0], "shape": case[1], "error": f"crashed: {type(exc).__name__}: {str(exc)[:200]}", "phases": {}}
        failed |= "error" in row and not row["error"].startswith("not run")
        rows.append(row)
        if "error" not in row:
            print(f"[cuda_bench]   original {row['median_ms']['original']:.3f} ms, normopt {row['median_ms']['normopt']:.3f} ms, "
                  f"ratio {fmt_ratio(row['normopt_vs_original'])}; " + ", ".join(f"{k} {v:.1f} s" for k, v in row["phases"].items()),
                  flush=True)
        else:
            print(f"[cuda_bench]   {row['error']}", flush=True)
    total = time.perf_counter() - start
    md = markdown(rows, a.provider, runs, warmup, total, a.quick)
    with open(os.path.join(a.outdir, "cuda-results.md"), "w") as f:
        f.write(md)
    with open(os.path.join(a.outdir, "cuda-results.json"), "w") as f:
        json.dump({"provider": a.provider, "quick": a.quick, "runs": runs, "rows": rows}, f, indent=2, default=str)
    print(md)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
