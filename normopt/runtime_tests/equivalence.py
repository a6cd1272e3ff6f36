"""Numerical equivalence of two models under ONNX Runtime.

The reference is the original model under ORT_DISABLE_ALL on the CPU; the candidate runs
under the chosen optimization level on the chosen EP. Several seeds (default 3). Outputs are
matched by name; a missing or extra output is a failure. Per output: max abs, max rel and
cosine; pass means ``np.allclose(cand, ref, atol, rtol)`` (NaN equal to NaN) for every seed.
Default tolerances: fp32/fp64 atol 1e-4, rtol 1e-3; fp16/bf16 atol 1e-2, rtol 1e-2; integer
and bool outputs must match exactly. Stress inputs (a large per-token offset, a large scale)
are compared with atol scaled by the reference output's RMS (at least 1) and by the reference's
own sensitivity at that input (see _tolerances); the max abs/rel and cosine reported are those of
the seeded draws.
"""

from __future__ import annotations

import gc
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from .. import weights as W
from ..errors import NormoptError
from .inputs import STRESS, InputOptions, input_specs, make_feeds, plan_inputs, stress_feeds
from .providers import SessionError, make_session

DEFAULT_TOL = {"fp32": (1e-4, 1e-3), "fp16": (1e-2, 1e-2)}


def default_tolerance(dtype) -> tuple[float, float]:
    dtype = np.dtype(dtype)
    if dtype == np.float16 or dtype.name == "bfloat16":
        return DEFAULT_TOL["fp16"]
    return DEFAULT_TOL["fp32"]


@dataclass
class OutputMetrics:
    name: str
    dtype: str
    shape: list
    max_abs: float = 0.0
    max_rel: float = 0.0
    cosine: float = 1.0
    atol: float = 0.0
    rtol: float = 0.0
    passed: bool = True
    worst_seed: int | None = None
    worst_input: str | None = None
    failed_on: list = field(default_factory=list)  # input sets on which it differs
    snr_db: float = float("inf")  # 10 log10(sum ref^2 / sum (cand - ref)^2), worst over the inputs
    top1: float | None = None  # argmax agreement over the last axis (logits-like outputs), worst over the inputs


@dataclass
class Thresholds:
    """Approximate comparison, for models that differ by design (fp16 or int8 against fp32): a
    float output passes when it meets every threshold given, instead of allclose."""
    min_cosine: float | None = None
    min_snr: float | None = None
    min_top1: float | None = None

    def active(self) -> bool:
        return any(v is not None for v in (self.min_cosine, self.min_snr, self.min_top1))

    def check(self, m) -> list:
        bad = []
        if self.min_cosine is not None and m.cosine < self.min_cosine:
            bad.append(f"cosine {fmt_cosine(m.cosine)} < {self.min_cosine}")
        if self.min_snr is not None and m.snr_db < self.min_snr:
            bad.append(f"SNR {m.snr_db:.1f} dB < {self.min_snr}")
        if self.min_top1 is not None and m.top1 is not None and m.top1 < self.min_top1:
            bad.append(f"top-1 {m.top1:.4f} < {self.min_top1}")
        return bad


def fmt_cosine(c: float) -> str:
    """Enough digits to tell a cosine that is not 1 from 1."""
    if c == 1.0 or not np.isfinite(c):
        return f"{c:.6f}"
    for k in range(6, 17):
        if round(c, k) != 1.0:
            return f"{c:.{k}f}"
    return f"{c:.16f}"


@dataclass
class EquivalenceResult:
    equivalent: bool
    outputs: list = field(default_factory=list)
    problems: list = field(default_factory=list)  # structural failures (missing outputs...)
    seeds: int = 0
    provider: str = "cpu"
    level: str = "all"
    first_divergence: dict | None = None
    inputs: list = field(default_factory=list)  # input sets run: seeds, then stress inputs
    notes: list = field(default_factory=list)
    thresholds: Thresholds | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def summary_lines(self) -> list[str]:
        width = max([6] + [len(m.name) for m in self.outputs])
        top1 = any(m.top1 is not None for m in self.outputs)
        lines = [f"{'output':<{width}} {'max_abs':>10} {'max_rel':>10} {'cosine':>12} {'SNR dB':>8}"
                 + (f" {'top-1':>7}" if top1 else "") + "  result"]
        for m in self.outputs:
            snr = "inf" if m.snr_db == float("inf") else f"{m.snr_db:.1f}"
            t1 = (f" {m.top1:7.4f}" if m.top1 is not None else f" {'':>7}") if top1 else ""
            if m.passed:
                verdict = "ok"
            elif self.thresholds and self.thresholds.active() and m.failed_on == ["thresholds"]:
                verdict = "DIFFERS (" + "; ".join(self.thresholds.check(m)) + ")"
            else:
                verdict = f"DIFFERS (atol {m.atol:g}, rtol {m.rtol:g}) on {', '.join(m.failed_on)}"
            lines.append(f"{m.name:<{width}} {m.max_abs:10.3g} {m.max_rel:10.3g} {fmt_cosine(m.cosine):>12} {snr:>8}{t1}  {verdict}")
        lines.extend(f"problem: {p}" for p in self.problems)
        lines.extend(f"note: {n}" for n in self.notes)
        if self.first_divergence:
            lines.extend(divergence_lines(self.first_divergence))
        lines.append("EQUIVALENT" if self.equivalent else "NOT EQUIVALENT")
        return lines


def _load_proto(model):
    """The model's structure: an in-memory model as is, a path as a skeleton (weights not read)."""
    if isinstance(model, onnx.ModelProto):
        return model
    from ..weights import read_skeleton

    return read_skeleton(model)


def _floating(a) -> bool:
    return W.is_float(np.asarray(a).dtype) or np.asarray(a).dtype.kind == "c"


def divergence_lines(fd: dict) -> list[str]:
    """The first divergence as a small table."""
    if "error" in fd:
        return [f"first divergence: not found ({fd['error']})"]
    rows = [("node", fd.get("node") or "(unnamed)"), ("op", fd.get("op", "")), ("value", fd.get("value", ""))]
    if "max_abs" in fd:
        rows.append(("max abs diff", f"{fd['max_abs']:.4g}"))
    if "reason" in fd:
        rows.append(("reason", fd["reason"]))
    if fd.get("skipped"):
        rows.append(("passed over", f"{fd['skipped']} earlier value(s) changed on purpose ({fd.get('skipped_from', 'report')})"))
    w = max(len(k) for k, _ in rows)
    return ["first divergence:"] + [f"  {k:<{w}}  {v}" for k, v in rows]


def _snr_top1(ref: np.ndarray, cand: np.ndarray):
    r, c = ref.astype(np.float64), cand.astype(np.float64)
    noise = float(np.sum(np.square(np.nan_to_num(c - r))))
    signal = float(np.sum(np.square(np.nan_to_num(r))))
    snr = float("inf") if noise == 0 else (10 * np.log10(signal / noise) if signal > 0 else float("-inf"))
    top1 = None
    if r.ndim >= 1 and r.shape[-1] > 1 and r.size:
        top1 = float(np.mean(np.argmax(r, axis=-1) == np.argmax(c, axis=-1)))
    return snr, top1


def _metrics(ref: np.ndarray, cand: np.ndarray):
    if _floating(ref):
        r = ref.astype(np.float64)
        c = cand.astype(np.float64)
        diff = np.abs(c - r)
        finite = np.isfinite(diff)
        max_abs = float(diff[finite].max()) if finite.any() else 0.0
        denom = np.abs(r)
        rel = np.where(denom > 0, diff / np.where(denom > 0, denom, 1), np.where(diff > 0, np.inf, 0.0))
        rel = rel[np.isfinite(diff)]
        max_rel = float(rel.max()) if rel.size else 0.0
        rf, cf = np.nan_to_num(r.ravel()), np.nan_to_num(c.ravel())
        nr, nc = np.linalg.norm(rf), np.linalg.norm(cf)
        cos = 1.0 if nr == 0 and nc == 0 else float(rf @ cf / (nr * nc)) if nr and nc else 0.0
        if not np.array_equal(np.isnan(r), np.isnan(c)):
            max_abs = float("inf")
        return max_abs, max_rel, cos
    eq = np.array_equal(ref, cand)
    return (0.0 if eq else float("inf")), (0.0 if eq else float("inf")), (1.0 if eq else 0.0)


def feed_sets(proto, seeds: int, input_opts, stress: bool = True) -> list:
    """[(label, feeds)]: `seeds` seeded draws, then (stress) one with a large per-token offset
    and one with a large scale on every float input (a mean or scale error in a rewrite shows
    there even where unit-normal inputs hide it)."""
    sets = [(f"seed {k}", make_feeds(proto, k, input_opts)) for k in range(seeds)]
    if stress and not (input_opts and input_opts.inputs_npz):
        base = make_feeds(proto, seeds, input_opts)
        if any(W.is_float(v.dtype) for v in base.values()):
            for kind in STRESS:
                sets.append((kind, stress_feeds(base, kind, seeds)))
    return sets


SENSITIVITY_FACTOR = 10.0  # a rewrite's rounding may move an output this many times ulp-level input noise
UNINFORMATIVE = 0.1  # past this fraction of the output's RMS, a stress input says nothing
NOISE_DRAWS = 3  # sensitivity is the worst of this many ulp-noise draws (one draw can miss a near-tie)


def _rms(a: np.ndarray) -> float:
    finite = a[np.isfinite(a)].astype(np.float64)
    return float(np.sqrt(np.mean(np.square(finite)))) if finite.size else 0.0


def _tolerances(m: OutputMetrics, ref: np.ndarray, label: str, noise: float | None):
    """(atol, rtol, informative). Seeded draws use the output's tolerances. Under a stress input
    atol scales with the reference's RMS (rounding grows with the values an output is computed
    from) and with the reference's own sensitivity there: its change under ulp-level noise on its
    float inputs (worst of NOISE_DRAWS draws), times SENSITIVITY_FACTOR (an ill-conditioned input, such as x1000 on a KV cache
    that saturates softmax, moves outputs far more than unit-normal inputs do). Where that exceeds
    UNINFORMATIVE of the output's RMS the input is not informative for this output."""
    if label not in STRESS or not _floating(ref) or not ref.size:
        return m.atol, m.rtol, True
    rms = _rms(ref)
    atol = m.atol * max(1.0, rms)
    if noise:
        if SENSITIVITY_FACTOR * noise > UNINFORMATIVE * max(rms, 1e-30):
            return atol, m.rtol, False
        atol = max(atol, SENSITIVITY_FACTOR * noise)
    return atol, m.rtol, True


def _ulp_noise(feeds: dict, seed: int) -> dict:
    """The feeds with every float input perturbed by about one unit in the last place."""
    rng = np.random.default_rng(20_000 + seed)
    out = {}
    for k, v in feeds.items():
        if W.is_float(v.dtype):
            eps = float(np.finfo(v.dtype).eps)
            out[k] = (v.astype(np.float64) * (1 + eps * rng.standard_normal(v.shape))).astype(v.dtype)
        else:
            out[k] = v
    return out


def _overridable(proto) -> set:
    """Initializers a caller may feed (listed as graph inputs, IR >= 4; below IR 4 every
    initializer is listed and is a constant)."""
    if proto.ir_version < 4:
        return set()
    inputs = {i.name for i in proto.graph.input}
    return {t.name for t in proto.graph.initializer if t.name in inputs}


def compare(
    reference,
    candidate,
    seeds: int = 3,
    atol: float | None = None,
    rtol: float | None = None,
    input_opts: InputOptions | None = None,
    provider: str = "cpu",
    level: str = "all",
    stress: bool = True,
    thresholds: Thresholds | None = None,
    ref_cache: dict | None = None,
) -> EquivalenceResult:
    """Run both models on the same generated inputs and compare every output by name.

    The two sessions are never alive at once: the reference runs every input set and is freed,
    then the candidate runs. Inputs: `seeds` seeded draws plus, with `stress`, a large per-token
    offset and a large scale (see feed_sets); boolean scalar inputs (an If condition such as
    Optimum's use_cache_branch) alternate between True and False across seeds. `ref_cache`
    (a dict) keeps the reference's outputs by input set, so a second comparison against the same
    reference on the same inputs does not run it again."""
    ref_proto = _load_proto(reference)
    cand_proto = _load_proto(candidate)
    result = EquivalenceResult(equivalent=True, seeds=seeds, provider=provider, level=level, thresholds=thresholds)
    approx = thresholds is not None and thresholds.active()
    if approx:
        stress = False  # stress inputs look for a rewrite's mean or scale error; approximate models differ anyway

    ref_inputs = {s.name: s for s in input_specs(ref_proto)}
    cand_inputs = {s.name: s for s in input_specs(cand_proto)}
    if set(ref_inputs) != set(cand_inputs):
        result.equivalent = False
        result.problems.append(f"inputs differ: reference {sorted(ref_inputs)}, candidate {sorted(cand_inputs)}")
        return result
    ref_over, cand_over = _overridable(ref_proto), _overridable(cand_proto)
    if ref_over != cand_over:  # a default a caller may feed is part of the interface too
        result.equivalent = False
        result.problems.append(f"overridable initializers differ: reference {sorted(ref_over)}, candidate {sorted(cand_over)}")
        return result
    ref_outs = [o.name for o in ref_proto.graph.output]
    cand_outs = [o.name for o in cand_proto.graph.output]
    missing = [n for n in ref_outs if n not in cand_outs]
    extra = [n for n in cand_outs if n not in ref_outs]
    if missing:
        result.problems.append(f"candidate lacks output(s) {missing}")
    if extra:
        result.problems.append(f"candidate has extra output(s) {extra}")
    if missing or extra:
        result.equivalent = False
        return result

    sets = feed_sets(ref_proto, seeds, input_opts, stress)
    result.inputs = [label for label, _ in sets]
    cached = ref_cache if ref_cache is not None and all(label in ref_cache for label, _ in sets) else None
    ref_sess = None if cached is not None else make_session(reference, "cpu", "disable")
    ref_vals, noise = [], {}
    for k, (label, feeds) in enumerate(sets):
        if cached is not None:  # the same reference on the same inputs: its outputs are known
            ref_vals.append(cached[label][0])
            if cached[label][1] is not None:
                noise[label] = cached[label][1]
            continue
        try:
            ref_vals.append(ref_sess.run(ref_outs, feeds))
            if label in STRESS:  # the reference's own sensitivity at this input: worst of a few ulp-noise draws
                worst = [0.0] * len(ref_outs)
                for draw in range(NOISE_DRAWS):
                    moved = ref_sess.run(ref_outs, _ulp_noise(feeds, 100 * k + draw))
                    for j, (a, b) in enumerate(zip(ref_vals[-1], moved)):
                        a = np.asarray(a)
                        if worst[j] is not None and _floating(a) and a.size and np.isfinite(a).all():
                            worst[j] = max(worst[j], float(np.nanmax(np.abs(a.astype(np.float64) - np.asarray(b, np.float64)))))
                        else:
                            worst[j] = None
                noise[label] = worst
            if ref_cache is not None:
                ref_cache[label] = (ref_vals[-1], noise.get(label))
        except Exception as exc:
            used = "" if (input_opts and input_opts.inputs_npz) else f" with {plan_inputs(ref_proto, input_opts).line()}"
            raise NormoptError(f"the reference model fails to run ({label}){used}: {str(exc).strip().splitlines()[0][:300]}"
                               " (override with --shape DIM=N, --shape INPUT=AxB, --int-range NAME=LO:HI or --inputs feeds.npz)") from None
    del ref_sess
    gc.collect()
    try:
        cand_sess = make_session(candidate, provider, level)
    except SessionError as exc:
        result.equivalent = False
        result.problems.append(f"candidate does not load: {exc}")
        return result

    metrics = {}
    for k, ((label, feeds), refs) in enumerate(zip(sets, ref_vals)):
        try:
            cand_vals = cand_sess.run(ref_outs, feeds)
        except Exception as exc:
            result.equivalent = False
            result.problems.append(f"candidate fails to run ({label}): {str(exc).strip().splitlines()[0][:300]}")
            return result
        for j, (name, r, c) in enumerate(zip(ref_outs, refs, cand_vals)):
            r, c = np.asarray(r), np.asarray(c)
            m = metrics.get(name)
            if m is None:
                a0, r0 = default_tolerance(r.dtype) if _floating(r) else (0.0, 0.0)
                m = metrics[name] = OutputMetrics(
                    name, str(r.dtype), list(r.shape), atol=a0 if atol is None else atol, rtol=r0 if rtol is None else rtol
                )
            if r.shape != c.shape or r.dtype != c.dtype:
                m.passed = False
                m.max_abs = m.max_rel = float("inf")
                m.cosine = 0.0
                m.worst_seed = k
                result.problems.append(f"output '{name}': shape/dtype {c.shape} {c.dtype} vs reference {r.shape} {r.dtype}")
                continue
            if label in STRESS and _floating(r) and not np.all(np.isfinite(r)):
                result.notes.append(f"{label} input: reference output '{name}' is not finite; not compared")
                continue
            max_abs, max_rel, cos = _metrics(r, c)
            a_tol, r_tol, informative = _tolerances(m, r, label, noise.get(label, [None] * len(ref_outs))[j])
            if not informative:
                result.notes.append(f"{label} input: output '{name}' moves by {noise[label][j]:.3g} under ulp-level input "
                                    f"noise (ill-conditioned there); not compared")
                continue
            if _floating(r):
                snr, t1 = _snr_top1(r, c)
                if label not in STRESS:
                    m.snr_db = min(m.snr_db, snr)
                    m.top1 = t1 if m.top1 is None or t1 is None else min(m.top1, t1)
                if approx:
                    ok = True  # judged once, on the worst metrics, below
                else:
                    ok = bool(np.allclose(c.astype(np.float64), r.astype(np.float64), atol=a_tol, rtol=r_tol, equal_nan=True))
            else:
                ok = bool(np.array_equal(c, r))
            if max_abs > m.max_abs or (not ok and m.passed):
                m.worst_seed = k
                m.worst_input = label
            if label not in STRESS:
                m.max_abs = max(m.max_abs, max_abs)
                m.max_rel = max(m.max_rel, max_rel)
                m.cosine = min(m.cosine, cos)
            if not ok:
                m.failed_on.append(label)
            m.passed = m.passed and ok
    del cand_sess
    gc.collect()
    if approx:
        for m in metrics.values():
            if m.dtype not in ("bool",) and not m.dtype.startswith(("int", "uint")) and thresholds.check(m):
                m.passed = False
                m.failed_on = ["thresholds"]
    result.outputs = [metrics[n] for n in ref_outs]
    result.equivalent = all(m.passed for m in result.outputs) and not result.problems
    return result
