"""Op micro-benchmarks: time small single-pattern models interleaved on an EP (medians, ms)."""

from __future__ import annotations

import statistics
import time

import numpy as np

from .providers import make_session


def time_models(models, shapes: dict, dtype, provider="cpu", runs=60, warmup=5, threads=None) -> list[float]:
    """Median ms per model; every model takes the same random inputs `shapes` {name: shape};
    `threads`: intra-op threads (the deployment's), else ONNX Runtime's default."""
    rng = np.random.default_rng(0)
    feeds = {k: rng.standard_normal(v).astype(dtype) for k, v in shapes.items()}
    sess = [make_session(m, provider, "all", threads=threads, spin=False) for m in models]
    for s in sess:
        for _ in range(warmup):
            s.run(None, feeds)
    times = [[] for _ in sess]
    n = len(sess)
    for k in range(runs):
        for j in range(n):
            i = (k + j) % n
            t0 = time.perf_counter()
            sess[i].run(None, feeds)
            times[i].append((time.perf_counter() - t0) * 1000)
    return [statistics.median(t) for t in times]
