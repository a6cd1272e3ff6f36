"""Latency of several models, interleaved.

Each model gets its own session (``threads``, optimization level; default ORT_ENABLE_ALL).
After ``warmup`` runs of each, ``runs`` rounds run every model once, A B C, B C A, C A B, ...
(rotating order), so drift and thermal effects hit all models alike. Reported per model:
median and p90 in ms, and the paired ratio to the first model (median of the per-round
ratios) with a bootstrap 95% CI over rounds. On CUDA, inputs and outputs are bound to the
device with IO binding and each run is synchronized.
"""

from __future__ import annotations

import collections
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

from .inputs import InputOptions, make_feeds
from .providers import make_session

NORM_OPS = {
    "LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization", "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization", "BatchNormalization", "InstanceNormalization", "GroupNormalization",
}


@dataclass
class ModelTiming:
    label: str
    path: str
    median_ms: float
    p90_ms: float
    ratio: float = 1.0
    ci_low: float = 1.0
    ci_high: float = 1.0
    norm_ops: dict = field(default_factory=dict)  # normalizations by kind
    times_ms: list = field(default_factory=list)


@dataclass
class BenchResult:
    models: list
    provider: str
    threads: int | None
    runs: int
    warmup: int
    level: str
    machine: str
    spin: bool = False
    not_timed: list = field(default_factory=list)  # (label, why): baselines that failed or differ

    def to_dict(self, with_times=False):
        d = asdict(self)
        if not with_times:
            for m in d["models"]:
                m.pop("times_ms", None)
        return d

    def header(self) -> str:
        return (f"machine: {self.machine}; EP: {self.provider}; threads: {self.threads or 'default'}; level: {self.level}; "
                f"intra-op spinning {'on' if self.spin else 'off'}; {self.runs} interleaved runs after {self.warmup} warm-up; "
                "ratio = model / first model (median of paired per-round ratios, bootstrap 95% CI); lower is faster")

    def norm_column(self, m) -> str:
        from ..reporting import norm_change, norm_summary

        return norm_summary(m.norm_ops) if m is self.models[0] else norm_change(self.models[0].norm_ops, m.norm_ops)

    def rows(self, prefix: str = "") -> list[str]:
        rows = []
        for m in self.models:
            rows.append(f"| {prefix}{m.label} | {m.median_ms:.3f} | {m.p90_ms:.3f} | {m.ratio:.3f} | [{m.ci_low:.3f}, {m.ci_high:.3f}] | {self.norm_column(m)} |")
        for label, why in self.not_timed:
            rows.append(f"| {prefix}{label} | not timed: {why} | | | | |")
        return rows

    TABLE_HEAD = ["| model | median ms | p90 ms | ratio vs first | 95% CI | norm ops |", "|---|---:|---:|---:|---|---|"]

    def markdown(self) -> str:
        return self.header() + "\n\n" + "\n".join(self.TABLE_HEAD + self.rows())

    def verdicts(self) -> list[str]:
        from ..reporting import verdict

        return [verdict(f"{m.label} vs {self.models[0].label}", m.ratio, m.ci_low, m.ci_high) for m in self.models[1:]]

    def csv_rows(self, extra: str = "") -> list[str]:
        rows = []
        for m in self.models:
            rows.append(f"{extra}{m.label},{m.median_ms:.4f},{m.p90_ms:.4f},{m.ratio:.4f},{m.ci_low:.4f},{m.ci_high:.4f},"
                        f"\"{self.norm_column(m)}\",{self.provider},{self.threads or ''},\"{self.machine}\"")
        for label, why in self.not_timed:
            rows.append(f"{extra}{label},,,,,,,{self.provider},{self.threads or ''},\"not timed: {why}\"")
        return rows

    def csv(self) -> str:
        return "\n".join(["model,median_ms,p90_ms,ratio,ci_low,ci_high,norm_ops,provider,threads,machine"] + self.csv_rows())

    def json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, onnxruntime {ort.__version__}"


def count_norm_ops(model: onnx.ModelProto) -> dict:
    """Normalizations by kind ({"LN": 7, ...}), If branches included."""
    from ..inspect import count_norms
    from ..reporting import norm_kind

    try:
        return count_norms(model)
    except Exception:
        counts = collections.Counter()
        counts.update(norm_kind(n.op_type) for n in model.graph.node if n.op_type in NORM_OPS)
        return dict(counts)


MAX_CI_WIDTH = 0.10  # a timing decision is taken only when its 95% CI is narrower than this, relative to the ratio
MIN_EFFECT = 0.03  # and only on a difference at least this large (a real, large difference): 3%


def decide(ratio, lo, hi):
    """'faster' | 'slower' | 'same' | 'noisy' for a variant/default ratio and its 95% CI: decide only
    when the CI is narrower than MAX_CI_WIDTH (relative to the ratio, so a model 40x slower with a CI
    of 38x-42x is resolved) and clears 1 by MIN_EFFECT. The one rule for every
    timing decision (whole-model tuning, the guard, the op micro-benchmarks), so two sessions of
    one model, which can differ by a percent or two in where their buffers land, never read as a
    difference."""
    if not (ratio > 0 and hi - lo <= MAX_CI_WIDTH * ratio):
        return "noisy"
    if hi < 1.0 - MIN_EFFECT:
        return "faster"
    if lo > 1.0 + MIN_EFFECT:
        return "slower"
    return "same"


def bootstrap_ratio(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0):
    """Median of paired ratios b/a and its bootstrap 95% CI over rounds."""
    ratios = np.asarray(b, dtype=np.float64) / np.asarray(a, dtype=np.float64)
    point = float(np.median(ratios))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(ratios), size=(n_boot, len(ratios)))
    meds = np.median(ratios[idx], axis=1)
    return point, float(np.percentile(meds, 2.5)), float(np.percentile(meds, 97.5))


class Runner:
    """One session timed on its feeds. On CUDA the inputs live on the device (IO binding, bound
    once) and the outputs are bound to the device, so a run times the graph, not host<->device
    copies; each run waits for the device (synchronize_outputs) before the clock stops. On the CPU
    a run is sess.run on numpy feeds (through OrtValues where a feed is bfloat16, which
    onnxruntime's numpy conversion does not take)."""

    def __init__(self, sess, feeds, provider):
        from .providers import to_ortvalue

        self.sess = sess
        self.feeds = feeds
        self.cuda = provider == "cuda"
        self.ort_feeds = None
        if self.cuda:
            self.binding = sess.io_binding()
            self.device_feeds = {name: to_ortvalue(arr, "cuda") for name, arr in feeds.items()}  # kept alive with the binding
            for name, value in self.device_feeds.items():
                self.binding.bind_ortvalue_input(name, value)
            for o in sess.get_outputs():
                self.binding.bind_output(o.name, "cuda", 0)
            self.binding.synchronize_inputs()
        elif any(np.asarray(a).dtype.name == "bfloat16" for a in feeds.values()):
            self.ort_feeds = {name: to_ortvalue(arr) for name, arr in feeds.items()}
            self.names = [o.name for o in sess.get_outputs()]

    def __call__(self) -> float:
        if self.cuda:
            t0 = time.perf_counter()
            self.sess.run_with_iobinding(self.binding)
            self.binding.synchronize_outputs()
            return time.perf_counter() - t0
        if self.ort_feeds is not None:
            t0 = time.perf_counter()
            self.sess.run_with_ort_values(self.names, self.ort_feeds)
            return time.perf_counter() - t0
        t0 = time.perf_counter()
        self.sess.run(None, self.feeds)
        return time.perf_counter() - t0


_Runner = Runner


def bench(
    models: list,
    provider: str = "cpu",
    threads: int | None = None,
    runs: int = 50,
    warmup: int = 5,
    input_opts: InputOptions | None = None,
    level: str = "all",
    progress=None,
    spin: bool = False,
) -> BenchResult:
    """models: list of (label, path or ModelProto). progress(i, total) is called per round."""
    from ..weights import read_skeleton

    protos = [m if isinstance(m, onnx.ModelProto) else read_skeleton(m) for _, m in models]
    feeds = make_feeds(protos[0], 0, input_opts)
    runners = [Runner(make_session(m, provider, level, threads, spin=spin), feeds, provider) for _, m in models]
    for (label, _), r in zip(models, runners):
        try:
            r()
        except Exception as exc:  # a default size the model cannot take is bad input, with the flag to give
            from ..errors import NormoptError
            from .inputs import plan_inputs

            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            if input_opts and input_opts.inputs_npz:
                raise NormoptError(f"{label} fails to run on --inputs {input_opts.inputs_npz}: {first}") from None
            plan = plan_inputs(protos[0], input_opts)
            flags = " ".join(f"--shape {d.split('=')[0]}=N" for d in plan.defaulted if "=" in d and not d.startswith("unnamed"))
            raise NormoptError(f"{label} fails to run with {plan.line()}: {first}; give the sizes it needs: "
                               f"{flags or '--shape INPUT=AxB'} (or --inputs feeds.npz)") from None
        for _ in range(max(0, warmup - 1)):
            r()
    n = len(runners)
    times = [[] for _ in range(n)]
    for k in range(runs):
        for j in range(n):
            i = (k + j) % n
            times[i].append(runners[i]() * 1000.0)
        if progress:
            progress(k + 1, runs)
    base = np.asarray(times[0])
    out = []
    for i, (label, m) in enumerate(models):
        t = np.asarray(times[i])
        ratio, lo, hi = (1.0, 1.0, 1.0) if i == 0 else bootstrap_ratio(base, t)
        full = protos[i]
        out.append(
            ModelTiming(
                label=label,
                path=m if isinstance(m, str) else "<in-memory>",
                median_ms=float(np.median(t)),
                p90_ms=float(np.percentile(t, 90)),
                ratio=ratio,
                ci_low=lo,
                ci_high=hi,
                norm_ops=count_norm_ops(full),
                times_ms=[float(x) for x in t],
            )
        )
    return BenchResult(out, provider, threads, runs, warmup, level, machine_description(), spin)
