"""``normopt demo``: build a small Pre-LN transformer, optimize it, verify it, bench it."""

from __future__ import annotations

import os

from .reporting import collapsed_declines
from .runtime_tests.inputs import InputOptions


def run_demo(workdir: str = "normopt-demo", runs: int = 30, threads: int = 1, echo=print):
    try:
        from .models import builders
        from .models.export import example_inputs, export
    except ImportError:
        from .errors import NormoptError

        raise NormoptError("the demo builds a model with torch: pip install torch==2.13.0 'normopt[models]'") from None
    from .api import optimize
    from .runtime_tests.latency import bench

    os.makedirs(workdir, exist_ok=True)
    src = os.path.join(workdir, "gpt_preln.onnx")
    dst = os.path.join(workdir, "gpt_preln.opt.onnx")
    echo("1. building a Pre-LN GPT-style decoder (4 layers, d=128, seq 64) and exporting it to ONNX")
    model = builders.gpt("tiny", layers=4, d=128, heads=4)
    export(model, example_inputs(model, batch=1, seq=64), src, output_names=["hidden"])
    echo(f"   wrote {src}")
    echo("2. optimizing (verified with ONNX Runtime before writing)")
    report_path = os.path.join(workdir, "report.json")
    res = optimize(src, dst, report_path=report_path)
    for p in res.report.passes:
        echo("   " + p.summary())
    for line in collapsed_declines(res.report):  # each candidate left alone, with its reason
        echo("  " + line)
    echo(f"   the report (every pass, every decline with its reason, the verification): {report_path}")
    echo(f"   verified on {res.verification.seeds} seeds, max abs diff "
         f"{max(m.max_abs for m in res.verification.outputs):.3g}; wrote {dst}")
    echo(f"3. benchmarking on ORT CPU, {threads} thread(s), {runs} interleaved runs")
    result = bench([("original", src), ("normopt", dst)], threads=threads, runs=runs, warmup=5, input_opts=InputOptions())
    echo(result.markdown())
    for line in result.verdicts():
        echo(f"normopt: {line}")
    return result
