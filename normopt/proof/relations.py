"""Relations between an optimized value v' and an original value u.

    v' = P(a * u) + t          along one axis of u

where P is the identity or the centering along the axis (x - mean_axis(x)), and a, t are
float64 vectors along the axis (None: 1 and 0). Special cases: *equal* (P = identity, a = 1,
t = 0) and *centered* (P centering, a = 1, t = 0). ``kind="mean"`` is v' = mean_axis(u)
(keepdims). ``err`` bounds the absolute rounding error of t (from the weights' dtype), so
``t ~ 0`` is judged against what rounding can explain and nothing more.

``kind="comp"`` is the compressed relation of a CRMSNorm stream: v' is the first d-1 channels
along the axis of F = P(a * u) + t, where F is zero-mean along the axis (so its last channel is
-sum of the others); a and t are d-long. Only the rules that know the invariant (the proof's
compressed module, the commuting layout ops) read it; every other rule skips it. Kind "cstat"
is a per-token statistic of such an F (stat: ("sq",), ("sumsq",), ("sum",), ("last",),
("sum2",), ("ssq",), ("ms",), ("mse", eps, tol), ("rms", eps, tol), ("irms", eps, tol)).

``kind="sub"`` is v' = a * (u - r) + t for an original run-time value r (stat holds its name):
a norm whose original adds a run-time beta r. Only an Add of a value equal to r (with a = 1)
turns it back into a plain relation on u.

``kind="csub"`` is the compressed form of such a norm: v' is the first d-1 channels along the axis
of F = a * (u - r) + t, F zero-mean along the axis (stat = (r,)). Kind "csubstat" is a per-token
statistic of it (stat = ("sum", r) or ("last", r)). Only the compressed module's sum, Neg and
Concat steps read them (the Concat gives back kind "sub"); every other rule skips them.

Every relation the prover records is a true statement about the two graphs (given the weight
facts it checked); several may hold for one value.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

COMP_KINDS = ("comp", "cstat", "csub", "csubstat")  # the relations only the compressed-stream rules read

A_TOL = 2  # a ~ 1 within this many ulps of the value's dtype (a scale is a ratio of stored values)


def eps_of(elem_type) -> float:
    from .. import weights as W

    dt = W.np_dtype(elem_type) if elem_type else None
    if dt is None or dt.kind != "f":
        return float(np.finfo(np.float32).eps)
    return float(np.finfo(dt).eps) if dt.itemsize >= 2 and dt.name != "bfloat16" else 2.0 ** -7


def tiny_of(elem_type) -> float:
    """The spacing of the dtype's subnormals: the absolute rounding floor near zero."""
    from .. import weights as W

    dt = W.np_dtype(elem_type) if elem_type else None
    if dt is None or dt.kind != "f":
        return float(np.finfo(np.float32).smallest_subnormal)
    try:
        return float(np.finfo(dt).smallest_subnormal)
    except Exception:
        return 0.0


@dataclass
class Rel:
    u: str
    axis: int | None = None
    centered: bool = False
    a: np.ndarray | None = None
    t: np.ndarray | None = None
    err: np.ndarray | float = 0.0
    kind: str = "rel"  # "rel" | "mean" | "zero" (the mean of a centered u: 0) | "stat" (a per-token statistic of u) | "comp" | "cstat"
    how: str = field(default="", compare=False)
    stat: tuple = ()  # kind "stat": ("sq",) (P(u))^2, ("ms",) mean of it, ("mse", eps), ("rms", eps), ("irms", eps)

    @property
    def eq(self) -> bool:
        return self.kind == "rel" and not self.centered and self.a is None and self.t is None

    @property
    def full_t(self) -> bool:
        """t is a whole constant tensor (not per-channel): only a constant Add may consume it."""
        return self.t is not None and np.ndim(self.t) > 1

    @property
    def pure_center(self) -> bool:
        return self.kind == "rel" and self.centered and self.a is None and self.t is None

    def describe(self) -> str:
        if self.kind == "mean":
            return f"mean of '{self.u}' along axis {self.axis}"
        if self.kind == "zero":
            return f"mean of centered '{self.u}' (zero)"
        if self.kind == "stat":
            return f"statistic {self.stat[0]} of centered '{self.u}' along axis {self.axis}"
        if self.kind == "comp":
            return f"the first d-1 channels (axis {self.axis}) of a zero-mean form of '{self.u}'"
        if self.kind == "csub":
            return f"the first d-1 channels (axis {self.axis}) of a zero-mean form of '{self.u}' minus '{self.stat[0]}'"
        if self.kind == "csubstat":
            return f"statistic {self.stat[0]} of a compressed form of '{self.u}' minus '{self.stat[1]}' along axis {self.axis}"
        if self.kind == "cstat":
            return f"statistic {self.stat[0]} of a compressed form of '{self.u}' along axis {self.axis}"
        if self.eq:
            return f"equal to '{self.u}'"
        parts = []
        if self.centered:
            parts.append(f"centered along axis {self.axis}")
        if self.a is not None:
            parts.append("scaled per channel")
        if self.t is not None:
            parts.append("shifted per channel")
        return f"'{self.u}' " + ", ".join(parts)


def simplify(r: Rel, eps: float) -> Rel:
    if r.kind not in ("rel", "comp", "sub"):
        return r
    a, t = r.a, r.t
    if a is not None:
        a = np.asarray(a, np.float64)
        if np.all(np.abs(a - 1.0) <= A_TOL * eps):
            a = None
    if t is not None:
        t = np.asarray(t, np.float64)
        bound = np.asarray(r.err, np.float64) + 1e-12  # float64 noise of the prover's own arithmetic
        # P(x) + c is not P(x) even for a uniform c: t must vanish itself
        if np.all(np.abs(t) <= bound):
            t = None
    centered = r.centered
    axis = r.axis
    if not centered and a is None and t is None and r.kind == "rel":
        axis = None
    return Rel(r.u, axis, centered, a, t, r.err if t is not None else 0.0, r.kind, r.how, r.stat)


def vec(x, d):
    if x is None:
        return None
    x = np.asarray(x, np.float64)
    if x.ndim == 0 or x.size == 1:
        return np.full(d, float(x.reshape(-1)[0]))
    return x.reshape(-1)


def per_channel(arr: np.ndarray, axis: int, rank: int, tol=0.0):
    """A float64 vector when the array (broadcast to `rank`, right-aligned) varies only along
    `axis`; a scalar array when constant; None otherwise."""
    arr = np.asarray(arr, np.float64)
    if arr.ndim > rank:
        return None
    if arr.size == 1:
        return arr.reshape(())
    full = arr.reshape((1,) * (rank - arr.ndim) + arr.shape)
    other = tuple(i for i in range(rank) if i != axis)
    first = full[tuple(slice(0, 1) if i in other else slice(None) for i in range(rank))]
    if not np.array_equal(np.broadcast_to(first, full.shape), full):
        # variation along the other axes is allowed only within the rounding bound `tol`, element
        # by element: one value per channel must lie within every element's own bound (the
        # intersection of [x - tol, x + tol] over the other axes is not empty), so a small
        # element is never excused by its larger neighbours' bounds
        tol = np.broadcast_to(np.asarray(tol, np.float64), np.broadcast_shapes(np.shape(tol), full.shape))
        full = np.broadcast_to(full, tol.shape)
        lo = (full - tol).max(axis=other, keepdims=True)
        hi = (full + tol).min(axis=other, keepdims=True)
        if not np.all(lo <= hi + 1e-300):
            return None
        return ((lo + hi) / 2).reshape(-1)
    return first.reshape(-1)


def tighten(rels: list) -> list:
    """Relations of one value, with every two that claim the same form (same original value,
    axis, centering, scale and shift shape) merged into one: each bounds the same difference
    v' - (a u + t), so the true shift lies in the intersection of their intervals [t - err,
    t + err], and the merged relation keeps that intersection's midpoint and half-width. A weak
    duplicate (a shift carried through a longer path, with a larger rounding bound) must not
    stand beside a tight one, or a later rule could pick the loose bound and accept a change the
    tight one refuses. Only kind "rel"; order of first appearance kept."""
    out, keys = [], {}
    for r in rels:
        if r.kind != "rel":
            out.append(r)
            continue
        a = None if r.a is None else np.asarray(r.a, np.float64)
        t = None if r.t is None else np.asarray(r.t, np.float64)
        key = (r.u, r.axis, r.centered, None if a is None else (a.shape, a.tobytes()), None if t is None else t.shape)
        k = keys.get(key)
        if k is None:
            keys[key] = len(out)
            out.append(r)
            continue
        q = out[k]
        e1, e2 = np.asarray(q.err, np.float64), np.asarray(r.err, np.float64)
        if t is None:  # no shift: both bound the same difference around zero
            if np.shape(np.minimum(e1, e2)) == np.broadcast_shapes(np.shape(e1), np.shape(e2)):
                out[k] = Rel(q.u, q.axis, q.centered, q.a, None, np.minimum(e1, e2), kind=q.kind, how=q.how, stat=q.stat)
            continue
        t1 = np.asarray(q.t, np.float64)
        try:
            lo = np.maximum(t1 - e1, t - e2)
            hi = np.minimum(t1 + e1, t + e2)
        except ValueError:
            out.append(r)
            continue
        if lo.shape != t1.shape or not np.all(lo <= hi):
            out.append(r)  # intervals that do not meet (or broadcast elsewhere): keep both as they are
            continue
        out[k] = Rel(q.u, q.axis, q.centered, q.a, (lo + hi) / 2, (hi - lo) / 2, kind=q.kind, how=q.how, stat=q.stat)
    return out


def per_channel_err(arr: np.ndarray, axis: int, rank: int, tol):
    """(t, bound) per channel along `axis` when one value per channel lies within every element's
    own bound: t is the midpoint of the intersection of [x - tol, x + tol] over the other axes
    (None when it is empty). Each element's true shift lies within its own tol of x, so within
    tol + |x - t| of t: the bound is the largest of those over the other axes (at most twice the
    largest tol). The intersection's half-width alone would understate it: the true shifts need
    not be one value per channel."""
    arr = np.asarray(arr, np.float64)
    if arr.ndim > rank:
        return None
    full = arr.reshape((1,) * (rank - arr.ndim) + arr.shape)
    tol = np.asarray(tol, np.float64)
    tol = tol.reshape((1,) * (rank - tol.ndim) + tol.shape) if tol.ndim <= rank else None
    if tol is None:
        return None
    shape = np.broadcast_shapes(full.shape, tol.shape)
    full, tol = np.broadcast_to(full, shape), np.broadcast_to(tol, shape)
    other = tuple(i for i in range(rank) if i != axis)
    lo = (full - tol).max(axis=other) if other else full - tol
    hi = (full + tol).min(axis=other) if other else full + tol
    if not np.all(lo <= hi + 1e-300):
        return None
    mid = (lo + hi) / 2
    midb = np.expand_dims(mid, other) if other else mid
    width = tol + np.abs(full - midb)
    width = width.max(axis=other) if other else width
    return mid.reshape(-1), np.asarray(width, np.float64).reshape(-1)


def center(arr: np.ndarray, axis: int) -> np.ndarray:
    arr = np.asarray(arr, np.float64)
    return arr - arr.mean(axis=axis, keepdims=True)
