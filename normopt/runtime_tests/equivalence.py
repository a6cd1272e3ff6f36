"""Numerical equivalence of two models under ONNX Runtime, judged against the exact function.

Default mode ("exact"): the original (the reference) is also evaluated in float64 (see
exact.py) on every input set. Each float output is judged by the candidate's error against
that exact answer, compared with the original's own error against it:

    pass  iff  err_cand <= K_EXACT * err_orig + FLOOR_ULPS * eps(dtype) * RMS(exact)

with err = max abs difference over the finite elements (non-finite elements must be
non-finite as in the original). Per channel (last axis) and per row, each block is also judged
against the original's error in that block, with the looser K_BLOCK (blocks of at least
MIN_BLOCK elements): the original's worst error in one part of an output does not excuse an
error in another. A reassociation (a folded affine, a mean moved into a weight)
is as exact as the original (0.5-3x its error); a planted error is 50-50,000x further. See
docs/verification.md for the choice of K_EXACT and FLOOR_ULPS. Integer and bool outputs must
equal the original's exactly.

Other modes: ``atol``/``rtol`` given explicitly: ``np.allclose(cand, orig, atol, rtol)`` per
input set ("tolerance"); where float64 cannot be evaluated (an op without a float64
implementation anywhere, or not enough memory) the same tolerance check is the fallback, named
as such in the result; ``thresholds`` (--min-cosine/--min-snr/--min-top1): approximate models.

Input sets: `seeds` seeded draws (more when one-element bool flags need their combinations:
inputs.flag_combinations) and, with `stress`, a large per-token offset and a large scale. An
output that is empty on every set, or never informative (constant across the sets, saturated,
or discrete) without a pre-saturation value to compare, was not compared; a check that
compared nothing does not pass. The table shows, per output, the numbers of the input set it
failed on (else of its worst set).
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from .. import weights as W
from ..errors import NormoptError
from .exact import _ulp as _eps  # eps of a float dtype, bfloat16 included
from .inputs import STRESS, InputOptions, flag_combinations, input_specs, make_feeds, plan_inputs, settle_plan, stress_feeds
from .providers import SessionError, make_session

DEFAULT_TOL = {"fp32": (1e-4, 1e-3), "fp16": (1e-2, 1e-2)}
K_EXACT = 10.0  # the candidate may be this many times further from exact than the original
FLOOR_ULPS = 32.0  # plus this many units of roundoff of the output's RMS (an original that happens to be exact)


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
    max_abs: float = 0.0  # candidate vs original, on the shown input set
    max_rel: float = 0.0
    cosine: float = 1.0
    atol: float = 0.0
    rtol: float = 0.0
    passed: bool = True
    worst_seed: int | None = None
    worst_input: str | None = None  # the input set whose numbers are shown: the first failing one, else the worst
    failed_on: list = field(default_factory=list)  # input sets on which it differs
    snr_db: float = float("inf")  # 10 log10(sum ref^2 / sum (cand - ref)^2), worst over the seeded draws
    top1: float | None = None  # argmax agreement over the last axis (logits-like outputs), worst over the seeded draws
    err_orig: float | None = None  # exact mode: the original's max abs error against float64 (shown set)
    err_cand: float | None = None  # the candidate's
    bound: float | None = None  # K_EXACT * err_orig + floor on the shown set
    compared_on: list = field(default_factory=list)  # input sets on which this output (or its probe) was compared
    uninformative: str | None = None  # why the output itself told nothing on every set (empty, constant, saturated)
    probe: str | None = None  # the pre-saturation value compared in its place (reference name)
    weight_noise: float | None = None  # shown set: the weight sensitivity, where it was drawn and consulted
    by_weights: list = field(default_factory=list)  # input sets on which it passed only within the weight-rounding allowance


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
    problems: list = field(default_factory=list)  # structural failures (missing outputs, nothing compared...)
    seeds: int = 0
    provider: str = "cpu"
    level: str = "all"
    first_divergence: dict | None = None
    inputs: list = field(default_factory=list)  # input sets run: seeds, then stress inputs
    notes: list = field(default_factory=list)
    thresholds: Thresholds | None = None
    mode: str = "exact"  # exact | tolerance | fallback | thresholds
    judge: str = ""  # one line: how outputs were judged
    timings: dict = field(default_factory=dict)  # phase -> seconds
    uninformative: list = field(default_factory=list)  # outputs that told nothing on every input set
    input_plan: str = ""  # the plan's one line
    input_options: InputOptions | None = None  # the settled plan (defaults that failed replaced)

    def to_dict(self) -> dict:
        return asdict(self)

    def verdict(self) -> str:
        if self.thresholds is not None and self.thresholds.active():
            return "WITHIN THRESHOLDS" if self.equivalent else "NOT WITHIN THRESHOLDS"
        return "EQUIVALENT" if self.equivalent else "NOT EQUIVALENT"

    def summary_lines(self) -> list[str]:
        width = max([6] + [len(m.name) for m in self.outputs])
        exact = self.mode == "exact"
        top1 = any(m.top1 is not None for m in self.outputs)
        head = f"{'output':<{width}} {'input set':>9} {'max_abs':>10} {'max_rel':>10} {'cosine':>12}"
        head += f" {'orig err':>10} {'cand err':>10} {'bound':>10}" if exact else f" {'SNR dB':>8}" + (f" {'top-1':>7}" if top1 else "")
        lines = [self.judge] if self.judge else []
        lines.append(head + "  result")
        for m in self.outputs:
            shown = m.worst_input or "-"
            if m.passed:
                verdict = "ok" if m.compared_on else "not compared"
                if m.by_weights and m.compared_on:
                    verdict += f" (within weight rounding on {', '.join(m.by_weights)})"
            elif self.thresholds and self.thresholds.active() and m.failed_on == ["thresholds"]:
                verdict = "DIFFERS (" + "; ".join(self.thresholds.check(m)) + ")"
            elif exact and m.err_cand is not None and m.err_orig is not None:
                verdict = f"DIFFERS (further from exact than {K_EXACT:g}x the original's error) on {', '.join(m.failed_on)}"
            elif exact:
                verdict = f"DIFFERS on {', '.join(m.failed_on)}"
            else:
                verdict = f"DIFFERS (atol {m.atol:g}, rtol {m.rtol:g}) on {', '.join(m.failed_on)}"
            if m.probe:
                verdict += f" (pre-saturation value '{m.probe}' compared too)"
            row = f"{m.name:<{width}} {shown:>9} {m.max_abs:10.3g} {m.max_rel:10.3g} {fmt_cosine(m.cosine):>12}"
            if exact:
                f = (lambda v: f"{v:10.3g}" if v is not None else f"{'-':>10}")
                row += f" {f(m.err_orig)} {f(m.err_cand)} {f(m.bound)}"
            else:
                snr = "inf" if m.snr_db == float("inf") else f"{m.snr_db:.1f}"
                row += f" {snr:>8}" + ((f" {m.top1:7.4f}" if m.top1 is not None else f" {'':>7}") if top1 else "")
            lines.append(f"{row}  {verdict}")
        lines.extend(f"problem: {p}" for p in self.problems)
        lines.extend(f"note: {n}" for n in self.notes)
        if self.uninformative:
            lines.append("uninformative on every input set: " + ", ".join(self.uninformative))
        if self.timings:
            lines.append("time: " + ", ".join(f"{k} {v:.2f} s" for k, v in self.timings.items()))
        if self.first_divergence:
            lines.extend(divergence_lines(self.first_divergence))
        lines.append(self.verdict())
        return lines


def _load_proto(model, cache: dict | None = None):
    """The model's structure: an in-memory model as is, a path as a skeleton (weights not read).
    `cache` (a ref_cache): a path's skeleton is read once per verification (0.1 s a read for a
    650 MB decoder); nothing here changes a proto it is given."""
    if isinstance(model, onnx.ModelProto):
        return model
    from ..weights import read_skeleton

    key = "_skeleton " + os.path.realpath(model)
    if cache is not None and key in cache:
        return cache[key]
    proto = read_skeleton(model)
    if cache is not None:
        cache[key] = proto
    return proto


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


# The judgement's arithmetic takes a shortcut where every value is finite (almost always): the
# same operations on the whole arrays instead of on boolean-indexed copies, and the differences
# computed once for the whole output and its blocks. The numbers are the general path's, bit for
# bit (tests/test_verify_cost.py compares the two); a logits output of 16 x 50257 values was
# judged in about 140 ms, 72 ms this way (shared cores). FAST_JUDGE = False takes the general path.
FAST_JUDGE = True


def _cosine(rf: np.ndarray, cf: np.ndarray) -> float:
    """The cosine of two float64 vectors. Its sums are einsum's own loops, not a BLAS dot: a
    multi-threaded BLAS call waits for a core that ONNX Runtime or the proof holds (1.4 s of a
    verification's 2.3 s of judging on shared cores), and its worker threads spin on after it.
    (A BLAS dot's last bits depend on its thread count anyway; the cosine decides nothing except
    under --min-cosine.)"""
    with np.errstate(over="ignore", invalid="ignore"):  # huge values: an inf norm gives NaN, as before
        nr = np.sqrt(np.einsum("i,i->", rf, rf))
        nc = np.sqrt(np.einsum("i,i->", cf, cf))
        if nr == 0 and nc == 0:
            return 1.0
        return float(np.einsum("i,i->", rf, cf) / (nr * nc)) if nr and nc else 0.0


def _metrics(ref: np.ndarray, cand: np.ndarray, r=None, c=None):
    """(max_abs, max_rel, cosine) of cand against ref; r, c: their float64 copies where made."""
    if _floating(ref):
        r = ref.astype(np.float64) if r is None else r
        c = cand.astype(np.float64) if c is None else c
        diff = np.abs(c - r)
        if FAST_JUDGE and diff.size and np.isfinite(diff).all():  # so r and c are finite too
            with np.errstate(divide="ignore", invalid="ignore"):
                q = diff / np.abs(r)  # where |r| is 0: inf where diff > 0, nan (the general path's 0) where not
            top = np.fmax.reduce(q, axis=None)
            return float(diff.max()), (0.0 if np.isnan(top) else float(top)), _cosine(r.ravel(), c.ravel())
        finite = np.isfinite(diff)
        max_abs = float(diff[finite].max()) if finite.any() else 0.0
        denom = np.abs(r)
        rel = np.where(denom > 0, diff / np.where(denom > 0, denom, 1), np.where(diff > 0, np.inf, 0.0))
        rel = rel[np.isfinite(diff)]
        max_rel = float(rel.max()) if rel.size else 0.0
        cos = _cosine(np.nan_to_num(r.ravel()), np.nan_to_num(c.ravel()))
        if not np.array_equal(np.isnan(r), np.isnan(c)):
            max_abs = float("inf")
        return max_abs, max_rel, cos
    eq = np.array_equal(ref, cand)
    return (0.0 if eq else float("inf")), (0.0 if eq else float("inf")), (1.0 if eq else 0.0)


def _smallest_normal(dtype) -> float:
    try:
        return float(np.finfo(dtype).tiny)
    except Exception:  # bfloat16 and the float8 types (ml_dtypes): their smallest normal numbers
        return {"bfloat16": 2.0 ** -126, "float8_e4m3fn": 2.0 ** -6, "float8_e4m3fnuz": 2.0 ** -7,
                "float8_e5m2": 2.0 ** -14, "float8_e5m2fnuz": 2.0 ** -15}.get(np.dtype(dtype).name, 0.0)


def exact_judgement(orig: np.ndarray, cand: np.ndarray, exact: np.ndarray, sensitivity: float | None = None,
                    o=None, c=None, weights: np.ndarray | None = None):
    """(ok, err_orig, err_cand, bound, why) for one float output on one input set.
    `sensitivity`: how far ulp-level noise on the inputs moves the original there (stress
    inputs); the original's error is taken as at least that, since a single fp32 evaluation can
    land close to exact by luck where rounding-size changes move the output far. `weights`: per
    element, how far the exact function moves when the original's weights are rounded by up to
    half an ulp (weight_sensitivity; drawn only where a set fails without it): the original's error is taken
    as at least its maximum too, per block at least its maximum in the block. o, c: the
    float64 copies of orig and cand where already made."""
    o = np.asarray(orig).astype(np.float64) if o is None else o
    c = np.asarray(cand).astype(np.float64) if c is None else c
    e = np.asarray(exact).astype(np.float64)
    both = np.isfinite(e) & np.isfinite(o)
    if FAST_JUDGE and both.size and both.all():  # every value finite: no masked copies (FAST_JUDGE)
        do, dc, e2 = np.abs(o - e), np.abs(c - e), np.square(e)
        err_o = float(np.max(do))
        err_c = float(np.max(dc)) if np.isfinite(dc).all() else float("inf")
        rms = float(np.sqrt(np.mean(e2.ravel())))
        pre = (do, dc, e2)
    else:
        rest = ~both
        if rest.any():  # where the original (or exact) is not finite, the candidate must be non-finite alike
            oc, cc = o[rest], c[rest]
            same = (np.isnan(oc) & np.isnan(cc)) | (oc == cc) | (np.isfinite(oc) & np.isfinite(cc))
            if not same.all():
                return False, None, None, None, "non-finite values differ from the original's"
        if not both.any():
            return True, 0.0, 0.0, 0.0, ""
        eb = e[both]
        err_o = float(np.max(np.abs(o[both] - eb)))
        dc = np.abs(c[both] - eb)
        err_c = float(np.max(dc)) if np.isfinite(dc).all() else float("inf")
        rms = float(np.sqrt(np.mean(np.square(eb))))
        pre = None
    if weights is not None and weights.shape != o.shape:
        weights = None
    whole = max(sensitivity or 0.0, float(np.max(weights)) if weights is not None and weights.size else 0.0)
    bound = K_EXACT * max(err_o, whole) + FLOOR_ULPS * _eps(orig.dtype) * rms
    if err_c > bound:
        return False, err_o, err_c, bound, ""
    where = _blockwise(o, c, e, both, sensitivity, _eps(orig.dtype), rms, pre, weights)
    if where:
        return False, err_o, err_c, bound, where
    return True, err_o, err_c, bound, ""


MIN_BLOCK = 16  # a block judged on its own holds at least this many elements (fewer: one lucky-exact draw decides)
# a block may be this many times further from exact than the original is there: looser than
# K_EXACT, since an exact rewrite may concentrate rounding in a block (crms rebuilds the last
# channel as minus the sum of the d-1 others: ~sqrt(d) ulps there, 17x the original at d=256),
# yet far below what a masked planted error gives (1e4-1e6x the original's error in its block)
K_BLOCK = 100.0


def _blockwise(o, c, e, both, sensitivity, eps, rms, pre=None, weights=None):
    """The same judgement per channel (the last axis; max over the other axes) and per row
    (max over the last axis): an error is judged against the original's error where it is,
    not against the original's worst error in another part of the same output (an
    ill-conditioned half of a Concat would hide a wrong column in the other half). The floor
    is taken of the block's own RMS where it exceeds the output's (an outlier channel); the
    weight sensitivity (an array like o, or None) of the block's own elements. A message naming
    the first block outside its bound, or ''."""
    if o.ndim < 1 or o.size < 2 * MIN_BLOCK:
        return ""
    if pre is not None:  # every value finite: |o - e|, |c - e| and e^2 as computed for the whole output
        do, dc, e2 = pre
    else:
        do = np.where(both, np.abs(o - e), 0.0)
        dc = np.where(both, np.abs(c - e), 0.0)
        e2 = np.where(both, np.square(e), 0.0)
    cnt = both.astype(np.float64) if pre is None else None
    last = o.ndim - 1
    other = tuple(range(last))
    for label, axes, size in (("channel", other, o.size // max(o.shape[-1], 1)), ("row", (last,), o.shape[-1])):
        if size < MIN_BLOCK or not axes:
            continue
        bo, bc = do.max(axis=axes), dc.max(axis=axes)
        n = cnt.sum(axis=axes) if cnt is not None else np.full(bo.shape, float(size))  # every element counts
        brms = np.sqrt(e2.sum(axis=axes) / np.maximum(n, 1))
        floor_o = np.maximum(bo, sensitivity or 0.0)
        if weights is not None:
            floor_o = np.maximum(floor_o, weights.max(axis=axes))
        bound = K_BLOCK * floor_o + FLOOR_ULPS * eps * np.maximum(brms, rms)
        bad = (n > 0) & ~(bc <= bound)
        if bad.any():
            i = np.unravel_index(int(np.argmax(np.where(bad, bc / np.maximum(bound, 1e-300), -1.0))), bad.shape)
            at = int(i[0]) if len(i) == 1 else tuple(int(v) for v in i)
            return (f"{label} {at}: {float(bc[i]):.3g} from exact where the original is {float(bo[i]):.3g} "
                    f"(bound {float(bound[i]):.3g}); the output's worst original error elsewhere does not cover it")
    return ""


def feed_sets(proto, seeds: int, input_opts, stress: bool = True) -> list:
    """[(label, feeds)]: max(`seeds`, flag combinations) seeded draws, then (stress) one with a
    large per-token offset and one with a large scale on every float input (a mean or scale
    error in a rewrite shows there even where unit-normal inputs hide it)."""
    n = 1 if (input_opts and input_opts.inputs_npz) else seeds  # given inputs: one set
    if not (input_opts and input_opts.inputs_npz):
        n = max(seeds, len(flag_combinations(plan_inputs(proto, input_opts))))
    sets = [(f"seed {k}", make_feeds(proto, k, input_opts)) for k in range(n)]
    if stress and not (input_opts and input_opts.inputs_npz):
        base = make_feeds(proto, n, input_opts)
        if any(W.is_float(v.dtype) for v in base.values()):
            for kind in STRESS:
                sets.append((kind, stress_feeds(base, kind, n)))
    return sets


SENSITIVITY_FACTOR = 10.0  # tolerance mode: a rewrite's rounding may move an output this many times ulp-level input noise
UNINFORMATIVE = 0.1  # tolerance mode: past this fraction of the output's RMS, a stress input says nothing
NOISE_DRAWS = 3  # tolerance mode: sensitivity is the worst of this many ulp-noise draws (one draw can miss a near-tie)
SATURATED = 1e-4  # a probability output with every element this close to 0 or 1 (a Tanh to +-1) says little


def _rms(a: np.ndarray) -> float:
    finite = a[np.isfinite(a)].astype(np.float64)
    return float(np.sqrt(np.mean(np.square(finite)))) if finite.size else 0.0


def _tolerances(m: OutputMetrics, ref: np.ndarray, label: str, noise: float | None):
    """Tolerance mode: (atol, rtol, informative). Seeded draws use the output's tolerances. Under
    a stress input atol scales with the reference's RMS and with the reference's own sensitivity
    there (its change under ulp-level noise on its float inputs, worst of NOISE_DRAWS draws, times
    SENSITIVITY_FACTOR); past UNINFORMATIVE of the output's RMS the input is not informative."""
    if label not in STRESS or not _floating(ref) or not ref.size:
        return m.atol, m.rtol, True
    rms = _rms(ref)
    atol = m.atol * max(1.0, rms)
    if noise:
        if SENSITIVITY_FACTOR * noise > UNINFORMATIVE * max(rms, 1e-30):
            return atol, m.rtol, False
        atol = max(atol, SENSITIVITY_FACTOR * noise)
    return atol, m.rtol, True


# The noise draws only ever loosen a verdict: a larger sensitivity raises every bound (exact
# mode: K_EXACT x max(orig err, sensitivity); per block K_BLOCK x the same; tolerance mode:
# atol >= SENSITIVITY_FACTOR x sensitivity) or takes the input set out of the comparison
# (ill-conditioned there: not compared, never failed). So they are drawn only for a stress set on
# which some output fails without them; where everything passes without them it passes with
# them too, and the verdict is the one the draws would give. EAGER_NOISE draws them always (tests),
# and the weight noise draws (weight_sensitivity) on every set too.
EAGER_NOISE = False


def _sensitivity(run, feeds: dict, vals: list, k: int) -> list:
    """Per fetched value, the original's worst change under NOISE_DRAWS ulp-level perturbations
    of its float inputs (None where the value is not a finite float array). `run(feeds)` runs it."""
    worst = [0.0] * len(vals)  # outputs and pre-saturation values alike
    for draw in range(NOISE_DRAWS):
        moved = run(_ulp_noise(feeds, 100 * k + draw))
        for j, (a, b) in enumerate(zip(vals, moved)):
            if worst[j] is not None and _floating(a) and a.size and np.isfinite(a).all():
                worst[j] = max(worst[j], float(np.nanmax(np.abs(a.astype(np.float64) - np.asarray(b, np.float64)))))
            else:
                worst[j] = None
    return worst


# The weight noise draws: a rewrite that folds weights (an affine into a Gemm, a mean into a bias)
# stores each folded weight rounded to its dtype, up to half an ulp from the exact fold: a
# rounding no fold can avoid. The candidate then computes, exactly, the function of weights within
# that rounding of the exact folded ones; so an output that moves by S when the original's own
# weights move by such a rounding cannot be judged tighter than about S, however close to exact
# the original happened to land (a per-token mean that cancels to a small value: 1 ulp from
# exact in the original, 70 in a correct candidate; rounding the weights upstream moves it by
# 22). weight_sensitivity measures S: the float64 function of the ORIGINAL on the same inputs
# with every continuous float weight scaled by (1 + r), r uniform in [-eps/2, eps/2] of its own
# dtype, worst of NOISE_DRAWS draws, per element. It only loosens a bound (the same max(orig err, sensitivity) slot), so it is
# drawn only for an input set on which some output fails without it, and an output that passes
# only thanks to it says so. (Relative noise eps x N(0, 1), as for the inputs, is 3.5x the
# rounding of a stored weight and halved the margin of a planted one-element x1.0005 error.)


WEIGHT_NOISE = True  # False: no weight-rounding allowance (tests: the verdicts without it)


def weight_sensitivity(runner, feeds: dict, exact: list, k: int) -> list:
    """Per fetched value, the original's exact function's worst change (an array like the
    value, or None) under NOISE_DRAWS half-ulp roundings of its float weights, on `feeds`
    (input set k; `exact`: its unperturbed float64 values). `runner`: an ExactRunner."""
    return runner.weight_noise(feeds, exact, NOISE_DRAWS, 100 * k)


def _same_feeds(a: dict, b: dict) -> bool:
    """The same inputs, value for value (dtype and shape included)."""
    if a.keys() != b.keys():
        return False
    for k, v in a.items():
        x, y = np.asarray(v), np.asarray(b[k])
        if x.dtype != y.dtype or x.shape != y.shape or not np.array_equal(x, y, equal_nan=_floating(x)):
            return False
    return True


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


# ---------------------------------------------------------------------------------------------
# informative outputs: saturating ops and the value before them

SHAPE_ONLY = {"Identity", "Cast", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Transpose"}
SATURATING = {"Sigmoid": "saturated", "Softmax": "saturated", "HardSigmoid": "saturated", "Tanh": "saturated",
              "ArgMax": "discrete", "ArgMin": "discrete", "TopK": "discrete", "Less": "discrete", "Greater": "discrete",
              "Equal": "discrete", "LessOrEqual": "discrete", "GreaterOrEqual": "discrete"}


def saturating_op(proto, output: str, _maps=None):
    """(op, pre-saturation value name) behind a graph output, through shape-only ops, or None.
    TopK counts only for its indices output. _maps: _graph_maps(proto), made once for many outputs."""
    producer, consts = _maps or _graph_maps(proto)
    name = output
    for _ in range(16):
        n = producer.get(name)
        if n is None:
            return None
        if n.op_type in SHAPE_ONLY and n.input:
            name = n.input[0]
            continue
        if n.op_type in SATURATING and n.input and n.input[0] and (n.op_type != "TopK" or list(n.output).index(name) == 1):
            pre = n.input[0]
            if pre in consts or pre in producer and producer[pre].op_type == "Constant":
                return None
            return n.op_type, pre
        return None
    return None


def _graph_maps(proto):
    """(producer of each value, names of initializers and graph inputs) of the main graph."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    consts = {t.name for t in proto.graph.initializer} | {i.name for i in proto.graph.input}
    return producer, consts


def _saturated(op: str, e: np.ndarray) -> bool:
    if not _floating(e) or not e.size:
        return False
    v = np.abs(e.astype(np.float64)) if op == "Tanh" else e.astype(np.float64)
    return bool(np.all((np.abs(v) < SATURATED) | (np.abs(1 - v) < SATURATED)))


def _value_types(proto) -> dict:
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:
        return {}
    vis = list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)
    return {vi.name: vi.type.tensor_type.elem_type for vi in vis if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type}


def _with_outputs(proto, names: list, types: dict):
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(onnx.helper.make_tensor_value_info(n, types[n], None))
    return m


def _probes(ref_proto, cand_proto, outs):
    """{output: (op, kind, ref value, cand value)} for outputs behind a saturating op in both."""
    found = {}
    rmaps, cmaps = _graph_maps(ref_proto), _graph_maps(cand_proto)
    for name in outs:
        r = saturating_op(ref_proto, name, rmaps)
        c = saturating_op(cand_proto, name, cmaps)
        if r and c and r[0] == c[0]:
            found[name] = (r[0], SATURATING[r[0]], r[1], c[1])
    if not found:
        return {}, {}, {}
    rt, ct = _value_types(ref_proto), _value_types(cand_proto)
    return {k: v for k, v in found.items() if v[2] in rt and v[3] in ct and rt[v[2]] == ct[v[3]]}, rt, ct


# ---------------------------------------------------------------------------------------------


def _fail_line(exc) -> str:
    return str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__


def reference_fetch(ref_proto) -> tuple:
    """(outputs, pre-saturation values) the original could be asked for by compare() against any
    candidate: its outputs, then each value before a saturating op behind one (_probes keeps
    those the candidate has too), with the value types known for them."""
    outs = [o.name for o in ref_proto.graph.output]
    pres = {}
    maps = _graph_maps(ref_proto)
    for name in outs:
        r = saturating_op(ref_proto, name, maps)
        if r and r[1] not in outs:
            pres.setdefault(r[1], None)
    types = _value_types(ref_proto) if pres else {}
    return outs, [n for n in pres if n in types], types


def prepare_reference(reference, seeds: int = 3, input_opts: InputOptions | None = None, stress: bool = True,
                      session=None, stop=None) -> dict:
    """The original's phase of compare() made ahead of time (optimize runs it beside the passes):
    the input plan settled on the original, and its outputs on every input set, in the ref_cache
    form compare() takes (entries '_fetch', '_opts', per input set (outputs, None, None); and
    '_notes', '_seconds', '_prepared'). The same sessions options, feeds and fetches as compare()
    itself, so the same values bit for bit. `session`: one already built of the reference's file
    at ORT_DISABLE_ALL (io.OrtCheck's), taken where no pre-saturation value is fetched; else one
    is built as compare() builds it. `stop` (an Event) ends it between runs: {} then. Errors
    give {} too: compare() then runs the original itself and says what went wrong."""
    t0 = time.perf_counter()
    if EAGER_NOISE:  # the old schedule draws the noise with the original's runs: compare() does it all
        return {}
    skeletons = {}
    ref_proto = _load_proto(reference, skeletons)
    outs, pres, types = reference_fetch(ref_proto)
    fetch = outs + pres
    try:
        if pres or session is None:
            session = None
            model = reference if not pres else _with_outputs(ref_proto, pres, types)
            session = make_session(model, "cpu", "disable", mapped=True, spin=SPIN)
        settled = []

        def settle_run(f):
            vals = [np.asarray(v) for v in session.run(fetch, f)]
            settled[:] = [(f, vals)]
            return vals[:len(outs)]

        input_opts, notes = settle_plan(ref_proto, input_opts, settle_run)
        cache = {"_fetch": tuple(fetch), "_opts": input_opts, "_notes": notes, "_prepared": True, **skeletons}
        if W.weight_bytes(ref_proto) <= BIG_BYTES:
            cache["_session"] = session  # kept for the noise draws, as compare() keeps it
        for label, feeds in feed_sets(ref_proto, seeds, input_opts, stress):
            if stop is not None and stop.is_set():
                return {}
            if settled and _same_feeds(settled[0][0], feeds):
                vals = settled[0][1]
            else:
                vals = [np.asarray(v) for v in session.run(fetch, feeds)]
            cache[label] = (vals, None, None)
    except Exception:
        return {}
    finally:
        session = None
    cache["_seconds"] = time.perf_counter() - t0
    return cache


def _clear(ref_cache: dict) -> None:
    """Forget the outputs of another fetch (and their session); the skeletons read stay."""
    for k in [k for k in ref_cache if not k.startswith("_skeleton ")]:
        del ref_cache[k]


def _take_prepared(ref_cache: dict, key: tuple) -> None:
    """A prepare_reference() cache fetched the original's outputs and every pre-saturation value
    a candidate might need: keep the ones this comparison fetches, in its order."""
    have = ref_cache.get("_fetch")
    if not ref_cache.pop("_prepared", False) or have is None or have == key:
        return
    if not set(key) <= set(have):
        _clear(ref_cache)
        return
    idx = [have.index(n) for n in key]
    for label in [k for k in ref_cache if not k.startswith("_")]:
        vals, ex, nz = ref_cache[label]
        ref_cache[label] = ([vals[i] for i in idx], None if ex is None else [ex[i] for i in idx],
                            None if nz is None else [nz[i] for i in idx])
    ref_cache["_fetch"] = key


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
    exact: bool | None = None,
    map_candidate: bool = False,
) -> EquivalenceResult:
    """Run both models on the same generated inputs and compare every output by name.

    Sessions are built once each and never alive together: the original (ORT_DISABLE_ALL, CPU)
    runs every input set and is freed (a small model's is kept for the noise draws), then the
    float64 evaluation of the original, then the candidate (`level`, `provider`). A ref_cache
    from prepare_reference() holds the original's outputs already (optimize runs it beside the
    passes): then no session of the original is built here. `exact`: None judges against float64 unless atol/rtol or
    thresholds are given; False forces the tolerance check. `ref_cache` (a dict) keeps the
    original's and the exact outputs by input set, so a second comparison against the same
    reference on the same inputs runs neither again. The original's sessions take its weights
    memory-mapped (providers.make_session(mapped=True)); the candidate's too with map_candidate
    (a second check of a file another session has loaded)."""
    t_start = time.perf_counter()
    timings = {}
    ref_proto = _load_proto(reference, ref_cache)
    cand_proto = _load_proto(candidate, ref_cache)
    result = EquivalenceResult(equivalent=True, seeds=seeds, provider=provider, level=level, thresholds=thresholds)
    approx = thresholds is not None and thresholds.active()
    if approx:
        stress = False  # stress inputs look for a rewrite's mean or scale error; approximate models differ anyway
    use_exact = (atol is None and rtol is None and not approx) if exact is None else bool(exact)
    result.mode = "exact" if use_exact else ("thresholds" if approx else "tolerance")

    from .inputs import random_draws_line

    drawn = random_draws_line(ref_proto)
    if drawn:  # two runs of the original already differ: a comparison would judge the draws
        result.equivalent = False
        result.problems.append(f"nothing was compared: {drawn} (verify --prove decides without running it)")
        return result
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

    big = W.weight_bytes(ref_proto) > BIG_BYTES  # free one session's memory before the next is built
    # probes: the value before a saturating op, compared where both models have it
    probes, rtypes, ctypes = _probes(ref_proto, cand_proto, ref_outs)
    ref_probe_names = [v[2] for v in probes.values() if v[2] not in ref_outs]
    cand_probe_names = [v[3] for v in probes.values() if v[3] not in ref_outs]
    ref_fetch = ref_outs + [n for n in dict.fromkeys(ref_probe_names)]
    cand_fetch = ref_outs + [n for n in dict.fromkeys(cand_probe_names)]

    # 1. the original, in its own precision; the input plan is settled on it once
    t0 = time.perf_counter()
    ref_sess = None
    settled = []  # [(feeds, outputs)] of the original's last run while the plan was settled
    key = tuple(ref_fetch)

    def ref_model():
        return reference if not ref_probe_names else _with_outputs(ref_proto, ref_probe_names, rtypes)
    beside = None  # the seconds of a prepare_reference() run beside the passes
    if ref_cache is not None:
        _take_prepared(ref_cache, key)
        beside = ref_cache.pop("_seconds", None)
    reuse = ref_cache is not None and ref_cache.get("_fetch") == key and "_opts" in ref_cache
    if reuse:
        input_opts = ref_cache["_opts"]
        result.notes.extend(ref_cache.pop("_notes", []))  # a prepared plan's notes, said once
    else:
        try:
            ref_sess = make_session(ref_model(), "cpu", "disable", mapped=True, spin=SPIN)
        except SessionError as exc:
            raise NormoptError(f"the reference model does not load in ONNX Runtime: {_fail_line(exc)}") from None
        def settle_run(f):  # the outputs of the plan's seed-0 run are kept: that set needs no second run
            vals = [np.asarray(v) for v in ref_sess.run(ref_fetch, f)]
            settled[:] = [(f, vals)]
            return vals[:len(ref_outs)]

        input_opts, settle_notes = settle_plan(ref_proto, input_opts, settle_run)
        result.notes.extend(settle_notes)
    result.input_options = input_opts
    sets = feed_sets(ref_proto, seeds, input_opts, stress)
    result.inputs = [label for label, _ in sets]
    plan_line = "" if (input_opts and input_opts.inputs_npz) else plan_inputs(ref_proto, input_opts).line()
    result.input_plan = plan_line
    combos = [] if (input_opts and input_opts.inputs_npz) else flag_combinations(plan_inputs(ref_proto, input_opts))
    if len(combos) > 1:
        how = "every combination" if len(combos) == 2 ** len(combos[0]) else "a covering design: every pair of values"
        result.notes.append(f"one-element bool flags {sorted(combos[0])}: {how} across {max(seeds, len(combos))} seeded draws")
    cached = ref_cache if reuse and all(label in ref_cache for label, _ in sets) else None
    ref_vals, noise, exact_vals = [], {}, []
    if cached is None:
        if ref_sess is None:
            ref_sess = make_session(ref_model(), "cpu", "disable", mapped=True, spin=SPIN)
        for k, (label, feeds) in enumerate(sets):
            if settled and _same_feeds(settled[0][0], feeds):
                ref_vals.append(settled[0][1])
                continue
            try:
                vals = [np.asarray(v) for v in ref_sess.run(ref_fetch, feeds)]
            except Exception as exc:
                used = f" with {plan_line}" if plan_line else ""
                raise NormoptError(f"the reference model fails to run ({label}){used}: {_fail_line(exc)}"
                                   " (override with --shape DIM=N, --shape INPUT=AxB, --int-range NAME=LO:HI or --inputs feeds.npz)") from None
            ref_vals.append(vals)
            if EAGER_NOISE and label in STRESS:
                noise[label] = _sensitivity(lambda f: ref_sess.run(ref_fetch, f), feeds, vals, k)
        settled.clear()
    else:
        for label, _ in sets:
            ref_vals.append(cached[label][0])
            exact_vals.append(cached[label][1])
            if cached[label][2] is not None:
                noise[label] = cached[label][2]
        if not all(v is not None for v in exact_vals):
            exact_vals = []
    # a small model's session of the original stays for the noise draws (two big ones never live together)
    kept_sess = ref_sess if not big else None
    if ref_sess is not None:  # (nothing to free where the outputs came from the cache)
        ref_sess = None
        _collect(big)
    timings["original"] = time.perf_counter() - t0
    if beside is not None:
        timings["original (beside the passes)"] = beside

    # 2. the exact function: the original in float64
    exact_note = ""
    fresh_exact = use_exact and not exact_vals  # computed here (a cache of the original's outputs alone keeps them)
    kept_exact = None  # a small model's float64 runner, kept for the weight noise draws

    def new_runner(first, full_ref=None):
        from .exact import ExactRunner

        if full_ref is None:
            full_ref = ref_proto if not ref_probe_names else _with_outputs(ref_proto, ref_probe_names, rtypes)
        return ExactRunner(full_ref, ref_fetch, first, reference_fits=lambda: _float64_fits(ref_proto, "reference"))
    if use_exact and not exact_vals:
        t0 = time.perf_counter()
        why = _float64_fits(ref_proto)
        if why is None:
            full_ref = ref_proto if not ref_probe_names else _with_outputs(ref_proto, ref_probe_names, rtypes)
            runner = new_runner(sets[0][1], full_ref)
            if runner.available:
                try:
                    exact_vals = [runner.run(feeds) for _, feeds in sets]
                    exact_note = runner.engine
                    why = runner.disagreement(full_ref, sets[0][1], ref_vals[0], K_EXACT, FLOOR_ULPS)
                    if why is not None:
                        exact_vals = []
                except Exception as exc:
                    why = f"the float64 evaluation fails to run ({_fail_line(exc)[:160]})"
                    exact_vals = []
            else:
                why = runner.why
            if why is None and not big:
                kept_exact = runner  # kept (as the original's session is) for the weight noise draws
                runner._first = None
            else:
                runner.close()
            del runner
            _collect(big)
        timings["exact float64"] = time.perf_counter() - t0
        if why is not None:
            use_exact = False
            result.mode = "fallback"
            result.notes.append(f"no float64 reference: {why}; fell back to the fp32 tolerance check")
    elif use_exact:
        exact_note = "cached"
    if ref_cache is not None and cached is not None and fresh_exact and exact_vals:
        for k, (label, _) in enumerate(sets):
            ref_cache[label] = (ref_vals[k], exact_vals[k], noise.get(label))
    if ref_cache is not None and cached is None:
        if not reuse:
            _clear(ref_cache)
        ref_cache["_fetch"], ref_cache["_opts"] = key, input_opts
        if kept_sess is not None:
            ref_cache["_session"] = kept_sess
        for k, (label, _) in enumerate(sets):
            ref_cache[label] = (ref_vals[k], exact_vals[k] if exact_vals else None, noise.get(label))
    if ref_cache is not None and kept_exact is not None:
        ref_cache["_exact"] = kept_exact  # a small model's float64 runner, for the weight noise draws

    if use_exact:
        result.judge = (f"judge: each float output against the float64 evaluation of the original ({exact_note}); "
                        f"pass iff cand err <= {K_EXACT:g} x orig err + {FLOOR_ULPS:g} ulp x RMS")
    elif result.mode == "fallback" or result.mode == "tolerance":
        a_txt = "atol/rtol " + ("by dtype" if atol is None and rtol is None else f"{atol if atol is not None else 'default'}/"
                                                                                  f"{rtol if rtol is not None else 'default'}")
        result.judge = ("judge: FALLBACK fp32 tolerance check (no float64 reference), " if result.mode == "fallback"
                        else "judge: tolerance check against the original, ") + a_txt
    else:
        result.judge = "judge: thresholds (approximate comparison against the original)"

    # 3. the candidate
    t0 = time.perf_counter()
    try:
        cand_model = candidate if not cand_probe_names else _with_outputs(cand_proto, cand_probe_names, ctypes)
        # the candidate's file itself is loaded unless told (map_candidate) or made a copy with
        # probe outputs: ONNX Runtime must show that the written file loads
        cand_sess = make_session(cand_model, provider, level, spin=SPIN,
                                 mapped=provider == "cpu" and (map_candidate or bool(cand_probe_names)))
    except SessionError as exc:
        result.equivalent = False
        result.problems.append(f"candidate does not load: {exc}")
        return result
    cand_all = []
    for label, feeds in sets:
        try:
            cand_all.append([np.asarray(v) for v in cand_sess.run(cand_fetch, feeds)])
        except Exception as exc:
            result.equivalent = False
            result.problems.append(f"candidate fails to run ({label}): {_fail_line(exc)}")
            return result
    del cand_sess
    _collect(big)
    timings["candidate"] = time.perf_counter() - t0

    # 4. judging
    t0 = time.perf_counter()
    metrics = {}
    rix = {n: i for i, n in enumerate(ref_fetch)}
    cix = {n: i for i, n in enumerate(cand_fetch)}

    # the noise draws, only for the input sets on which some value fails without them (see
    # EAGER_NOISE): input noise on the stress sets, then weight noise on any set that still
    # fails; each set's judgements are made once per state of its allowances (memo)
    memo = {}
    wnoise = {}  # input set -> weight sensitivity per fetched value (arrays), where drawn
    wcache = ref_cache.get("_wnoise") if ref_cache is not None and ref_cache.get("_fetch") == key else None
    if wcache and use_exact:
        wnoise.update({label: v for label, v in wcache.items() if label in result.inputs})

    def dry(k):
        label = sets[k][0]
        nz, wz = noise.get(label), wnoise.get(label)
        ok_all = True
        for name in ref_outs:
            r, c = ref_vals[k][rix[name]], cand_all[k][cix[name]]
            if r.shape != c.shape or r.dtype != c.dtype or not r.size:
                continue
            a0, r0 = default_tolerance(r.dtype) if _floating(r) else (0.0, 0.0)
            a0, r0 = (a0 if atol is None else atol), (r0 if rtol is None else rtol)
            ex = exact_vals[k] if use_exact else None
            pairs = [((k, name), OutputMetrics(name, str(r.dtype), list(r.shape), atol=a0, rtol=r0), r, c,
                      ex[rix[name]] if ex is not None else None, rix[name])]
            probe = probes.get(name)
            if probe is not None:
                _, _, rp, cp = probe
                pr, pc = ref_vals[k][rix[rp]], cand_all[k][cix[cp]]
                if pr.shape == pc.shape and pr.dtype == pc.dtype and pr.size:
                    pairs.append(((k, "probe", name), OutputMetrics(rp, str(pr.dtype), list(pr.shape), atol=a0, rtol=r0),
                                  pr, pc, ex[rix[rp]] if ex is not None else None, rix[rp]))
            for mk, mm, rr, cc, ee, j in pairs:
                sink = EquivalenceResult(equivalent=True)
                judged = _judge(mm, rr, cc, ee, label, use_exact, approx, nz[j] if nz is not None else None, sink,
                                wz[j] if wz is not None else None)
                memo[mk] = (judged, sink.notes)
                if judged is not None and not judged[0]:
                    ok_all = False
        return ok_all

    failing = [k for k in range(len(sets)) if not dry(k)]
    need = [k for k in failing if sets[k][0] in STRESS and sets[k][0] not in noise]
    if need:
        tn = time.perf_counter()
        sess = kept_sess if kept_sess is not None else (ref_cache or {}).get("_session")  # the original's own, where kept
        if sess is None:
            sess = make_session(ref_model(), "cpu", "disable", mapped=True, spin=SPIN)
        for k in need:
            label, feeds = sets[k]
            noise[label] = _sensitivity(lambda f: sess.run(ref_fetch, f), feeds, ref_vals[k], k)
            if ref_cache is not None and label in ref_cache:
                ref_cache[label] = (*ref_cache[label][:2], noise[label])
        del sess
        _collect(big)
        failing = [k for k in failing if k not in need or not dry(k)]
        timings["noise draws"] = time.perf_counter() - tn
        t0 += timings["noise draws"]
    wneed = [k for k in (range(len(sets)) if EAGER_NOISE else failing) if sets[k][0] not in wnoise] \
        if WEIGHT_NOISE and use_exact and exact_vals else []
    if wneed:
        tn = time.perf_counter()
        runner = kept_exact if kept_exact is not None else (ref_cache or {}).get("_exact")
        if runner is not None and (runner.outputs != list(ref_fetch) or not runner.available):
            runner = None
        own = runner is None  # a big model's (or a cached reference's) float64 runner was freed: one of its own
        if own:
            runner = new_runner(None)
        if runner.available:
            for k in wneed:
                label, feeds = sets[k]
                wnoise[label] = weight_sensitivity(runner, feeds, exact_vals[k], k)
                dry(k)
            if ref_cache is not None and ref_cache.get("_fetch") == key:
                ref_cache.setdefault("_wnoise", {}).update({sets[k][0]: wnoise[sets[k][0]] for k in wneed})
        if own:
            runner.close()
        del runner
        _collect(big)
        timings["weight noise draws"] = time.perf_counter() - tn
        t0 += timings["weight noise draws"]
    if wnoise:
        result.judge += ("; orig err taken as at least the original's movement under half-ulp rounding of its weights "
                         f"on {', '.join(l for l, _ in sets if l in wnoise)} (failing without it)")

    def judge(mk, m, r, c, e, label, j):
        if mk in memo:
            judged, notes = memo[mk]
            result.notes.extend(notes)
            return judged
        nz, wz = noise.get(label), wnoise.get(label)
        return _judge(m, r, c, e, label, use_exact, approx, nz[j] if nz is not None else None, result,
                      wz[j] if wz is not None else None)
    shown_score = {}
    first_value, varies = {}, {n: False for n in ref_outs}
    informative_sets = {n: set() for n in ref_outs}
    empty_everywhere = {n: True for n in ref_outs}
    saturated_everywhere = {n: True for n in ref_outs}
    normal_somewhere = {n: False for n in ref_outs}  # a float output with some value of normal size (or inf/NaN)
    for k, (label, _) in enumerate(sets):
        refs, cands = ref_vals[k], cand_all[k]
        exs = exact_vals[k] if use_exact else None
        for j, name in enumerate(ref_outs):
            r, c = refs[rix[name]], cands[cix[name]]
            m = metrics.get(name)
            if m is None:
                a0, r0 = default_tolerance(r.dtype) if _floating(r) else (0.0, 0.0)
                m = metrics[name] = OutputMetrics(name, str(r.dtype), list(r.shape), atol=a0 if atol is None else atol,
                                                  rtol=r0 if rtol is None else rtol)
            if r.shape != c.shape or r.dtype != c.dtype:
                m.passed = False
                m.max_abs = m.max_rel = float("inf")
                m.cosine = 0.0
                m.worst_seed, m.worst_input = k, label
                m.failed_on.append(label)
                result.problems.append(f"output '{name}' ({label}): shape/dtype {c.shape} {c.dtype} vs reference {r.shape} {r.dtype}")
                continue
            if r.size:
                empty_everywhere[name] = False
            else:
                continue
            if not normal_somewhere[name]:
                normal_somewhere[name] = not _floating(r) or bool(np.any(~(np.abs(r) < _smallest_normal(r.dtype))))
            if name not in first_value:
                first_value[name] = r
            elif not varies[name] and not np.array_equal(first_value[name], r, equal_nan=_floating(r)):
                varies[name] = True
            judged = judge((k, name), m, r, c, exs[rix[name]] if exs is not None else None, label, rix[name])
            if judged is None:
                continue
            ok, score, row = judged
            by_weights = bool(row.get("by_weights"))
            probe = probes.get(name)
            if probe is not None:
                op, kind, rp, cp = probe
                sat = kind == "discrete" or _saturated(op, exs[rix[name]] if exs is not None else r)
                if not sat:
                    saturated_everywhere[name] = False
                pr, pc = refs[rix[rp]], cands[cix[cp]]
                pe = exs[rix[rp]] if exs is not None else None
                if pr.shape == pc.shape and pr.dtype == pc.dtype and pr.size:
                    m.probe = rp
                    pj = judge((k, "probe", name), OutputMetrics(rp, str(pr.dtype), list(pr.shape), atol=m.atol, rtol=m.rtol),
                               pr, pc, pe, label, rix[rp])
                    if pj is not None:
                        pok, pscore, prow = pj
                        by_weights = by_weights or bool(prow.get("by_weights"))
                        if not pok:
                            result.notes.append(f"output '{name}' ({label}): its pre-saturation value '{rp}' differs")
                            if ok:
                                ok, score, row = False, pscore, prow
                        informative_sets[name].add(label)
                if not sat:
                    informative_sets[name].add(label)
            else:
                saturated_everywhere[name] = False
                informative_sets[name].add(label)
            m.compared_on.append(label)
            if _floating(r) and label not in STRESS:
                snr, t1 = _snr_top1(r, c)
                m.snr_db = min(m.snr_db, snr)
                m.top1 = t1 if m.top1 is None or t1 is None else min(m.top1, t1)
            # the shown set: the first failing one, else the worst
            first_fail = not ok and m.passed
            if first_fail or (m.passed and score >= shown_score.get(name, -1.0)):
                shown_score[name] = score
                m.worst_seed, m.worst_input = k, label
                m.max_abs, m.max_rel, m.cosine = row["max_abs"], row["max_rel"], row["cosine"]
                m.err_orig, m.err_cand, m.bound = row.get("err_orig"), row.get("err_cand"), row.get("bound")
                m.weight_noise = row.get("weight_noise")
            if ok and by_weights:
                m.by_weights.append(label)
            if not ok:
                m.failed_on.append(label)
            m.passed = m.passed and ok
    if approx:
        for m in metrics.values():
            if m.dtype not in ("bool",) and not m.dtype.startswith(("int", "uint")) and thresholds.check(m):
                m.passed = False
                m.failed_on = ["thresholds"]
    result.outputs = [metrics[n] for n in ref_outs if n in metrics]
    # what was not compared
    npz = bool(input_opts and input_opts.inputs_npz)
    hint = "give --shape DIM=N (or --inputs feeds.npz with real inputs)"
    for name in ref_outs:
        m = metrics.get(name)
        if m is None:
            continue
        if empty_everywhere[name]:
            m.uninformative = "empty on every input set"
        elif name in probes and saturated_everywhere[name] and probes[name][1] == "saturated" and not m.probe:
            m.uninformative = f"saturated ({probes[name][0]}) on every input set"
        elif not normal_somewhere[name] and not m.probe:
            # zeros and subnormals only: below the dtype's smallest normal number there is no
            # relative precision to compare (and flushing subnormals to zero is a kernel's choice)
            m.uninformative = "zero or subnormal on every input set"
        elif len(sets) > 1 and not npz and not varies[name] and not m.probe:  # given inputs may repeat
            m.uninformative = "the same on every input set"
        elif name in probes and probes[name][1] == "discrete" and not m.probe:
            m.uninformative = "discrete"
        if m.uninformative:
            result.uninformative.append(f"{name} ({m.uninformative})")
        if empty_everywhere[name]:
            m.compared_on = []
    empties = [n for n in ref_outs if n in metrics and empty_everywhere[n]]
    if empties:
        result.problems.append(f"nothing was compared for output(s) {empties}: empty on every input set; {hint}")
    compared = [m for m in result.outputs if m.compared_on and not m.uninformative]
    if ref_outs and not compared and not empties:
        result.problems.append(f"nothing was compared: every output is uninformative on every input set; {hint}")
    timings["judging"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    result.timings = {k: round(v, 3) for k, v in timings.items()}
    result.equivalent = all(m.passed for m in result.outputs) and not result.problems
    return result


def _judge(m, r, c, e, label, use_exact, approx, noise, result, weights=None):
    """(ok, score, row) for one output on one input set, or None when not compared there.
    `noise`: the input sensitivity (a number); `weights`: the weight sensitivity (an array like
    r), consulted only where the output fails without it; row["weight_noise"] is then its
    maximum, and row["by_weights"] says that the output passed only thanks to it."""
    if _floating(r) and not np.all(np.isfinite(r)) and label in STRESS and not use_exact:
        result.notes.append(f"{label} input: reference output '{m.name}' is not finite; not compared")
        return None
    r64 = c64 = None
    if _floating(r) and not approx:  # the float64 copies, made once for the metrics and the judgement
        r64, c64 = r.astype(np.float64), c.astype(np.float64)
    max_abs, max_rel, cos = _metrics(r, c, r64, c64)
    row = {"max_abs": max_abs, "max_rel": max_rel, "cosine": cos}
    if not _floating(r):
        ok = bool(np.array_equal(c, r))
        return ok, (0.0 if ok else float("inf")), row
    if approx:
        return True, max_abs, row  # judged once, on the worst metrics, by the caller
    if use_exact and e is not None:
        if noise and K_EXACT * noise > UNINFORMATIVE * max(_rms(r), 1e-30):
            result.notes.append(f"{label} input: output '{m.name}' moves by {noise:.3g} under ulp-level input "
                                f"noise (ill-conditioned there); not compared")
            return None
        ok, err_o, err_c, bound, why = exact_judgement(r, c, e, noise, r64, c64)
        if not ok and weights is not None and err_o is not None and weights.shape == np.shape(r):
            b0 = bound
            ok, err_o, err_c, bound, why = exact_judgement(r, c, e, noise, r64, c64, weights)
            s_w = float(np.max(weights)) if weights.size else 0.0
            row["weight_noise"] = s_w
            if ok:
                row["by_weights"] = True
                result.notes.append(
                    f"output '{m.name}' ({label}): passes only within the weight-rounding allowance: the original's "
                    f"exact function moves by {s_w:.3g} when its weights are rounded by up to half an ulp "
                    f"(cand err {err_c:.3g}; "
                    f"bound {b0:.3g} without it, {bound:.3g} with it)")
        if why:
            result.notes.append(f"output '{m.name}' ({label}): {why}")
        row.update(err_orig=err_o, err_cand=err_c, bound=bound)
        score = float("inf") if err_c is None else (err_c / bound if bound else (0.0 if err_c == 0 else float("inf")))
        return ok, score, row
    a_tol, r_tol, informative = _tolerances(m, r, label, noise)
    if not informative:
        result.notes.append(f"{label} input: output '{m.name}' moves by {noise:.3g} under ulp-level input "
                            f"noise (ill-conditioned there); not compared")
        return None
    ok = bool(np.allclose(c.astype(np.float64), r.astype(np.float64), atol=a_tol, rtol=r_tol, equal_nan=True))
    return ok, max_abs, row


BIG_BYTES = 64 << 20
# Verification's sessions run with intra-op spinning off: they share the cores with the passes
# (the original's runs beside them), the proof and each other, and a spinning worker holds a core
# between a session's parallel sections. Spinning decides only when a worker looks for work, never
# a value. Under load (2 cores shared), a Python loop beside a GPT-2-small-shaped decoder's runs
# took 5.2-5.9 s with it off against 5.8-8.7 s on, while the runs went 3.9-4.6/s against 2.3-3.4/s
# (three alternations each).
SPIN = False


def _collect(big: bool) -> None:
    if big:  # a full collection costs ~0.2 s in a large process: only where the memory matters
        gc.collect()


# Peak memory of the float64 evaluation, per byte of fp32-equivalent weights (a 16-bit weight
# counts twice). Fed weights (exact.FEED_BYTES: large float initializers of the main graph) exist
# once, in float64, and ONNX Runtime reads them in place: a 0.66 GB fp32 GPT-2-small-shaped
# decoder's whole optimize peaked at 1.7 GB. Embedded tensors (integers, small or subgraph
# tensors) exist in the converted proto, its serialized bytes and the session's copy. onnx.reference
# (where ORT lacks a float64 kernel) holds more: 4.2x the weights measured on a 128 MB MatMul+Erf.
FLOAT64_FACTOR = 2.5
EMBEDDED_FACTOR = 6.0
REFERENCE_FACTOR = 4.5


def _float64_fits(proto, engine: str = "ort") -> str | None:
    """None, or why the float64 evaluation (by ONNX Runtime, or by onnx.reference) does not fit
    in memory."""
    from ..api import available_bytes
    from .exact import FEED_BYTES, FLOATS

    def size(t):  # fp32-equivalent bytes: a 16-bit weight grows 4x in float64
        nb = W.tensor_nbytes(t)
        return 2 * nb if t.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16) else nb

    fed = sum(size(t) for t in proto.graph.initializer if t.data_type in FLOATS and W.tensor_nbytes(t) >= FEED_BYTES)
    embedded = sum(size(t) for t in W.iter_tensors(proto)) - fed
    if engine == "ort":
        need = int(FLOAT64_FACTOR * fed + EMBEDDED_FACTOR * embedded) + (512 << 20)
    else:  # asked once the fed float64 weights (2x) are held: what onnx.reference needs on top
        need = int((REFERENCE_FACTOR - 2.0) * fed + EMBEDDED_FACTOR * embedded) + (512 << 20)
    avail = available_bytes()
    if avail is not None and need > avail:
        return (f"evaluating the model in float64 needs about {need / 2**30:.1f} GB of memory and "
                f"{avail / 2**30:.1f} GB is available")
    return None
