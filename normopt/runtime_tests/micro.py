"""Op micro-benchmarks: time small single-pattern models interleaved on an EP (medians, ms).

Each model runs through latency.Runner: on CUDA with its inputs and outputs on the device (IO
binding) and each run synchronized, so the copies to and from the host, which at these sizes
take longer than the kernels compared, are not in the timings.

Noise cannot flip a tuned choice: a model whose paired ratio to the first model is not resolved
by latency.decide (its bootstrap 95% CI wider than MAX_CI_WIDTH, or not clear of 1 by
MIN_EFFECT, the rule of every timing decision) is reported at the first model's median, i.e. as
no measurable difference, so every caller keeps its deterministic default.
The shapes are the run's input plan (pipeline.tuning_shape with the plan's dims)."""

from __future__ import annotations

import statistics

import numpy as np

from .providers import make_session

def time_models(models, shapes: dict, dtype, provider="cpu", runs=60, warmup=5, threads=None) -> list[float]:
    """Median ms per model; every model takes the same random inputs `shapes` {name: shape};
    `threads`: intra-op threads (the deployment's), else ONNX Runtime's default."""
    from .latency import Runner

    rng = np.random.default_rng(0)
    feeds = {k: rng.standard_normal(v).astype(dtype) for k, v in shapes.items()}
    runners = [Runner(make_session(m, provider, "all", threads=threads, spin=False), feeds, provider) for m in models]
    for r in runners:
        for _ in range(warmup):
            r()
    times = [[] for _ in runners]
    n = len(runners)
    for k in range(runs):
        for j in range(n):
            i = (k + j) % n
            times[i].append(runners[i]() * 1000)
    from .latency import bootstrap_ratio, decide

    med = [statistics.median(t) for t in times]
    for i in range(1, n):
        ratio, lo, hi = bootstrap_ratio(np.asarray(times[0]), np.asarray(times[i]), n_boot=500)
        if decide(ratio, lo, hi) in ("same", "noisy"):
            med[i] = med[0]
    return med
