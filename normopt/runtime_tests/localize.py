"""First-divergence localization: which node's value first differs between two models.

Intermediate values that exist in both graphs under the same name are added as extra outputs
to both; both run on the same inputs (reference under ORT_DISABLE_ALL, candidate under the
given level); the candidate's nodes are walked in topological order and the first value that
is not allclose is reported with the node that produces it. Values a pass changed on purpose
(``skip``: a centered stream, the input of a folded affine's consumer) are not compared.
"""

from __future__ import annotations

import numpy as np
import onnx

from .. import weights as W
from .. import graph as G
from .equivalence import default_tolerance
from .inputs import InputOptions, make_feeds
from .providers import make_session

MAX_VALUES = 4000


def _typed_values(model: onnx.ModelProto) -> dict:
    inferred = G.infer_shapes(model)
    return {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.output)
            if vi.type.tensor_type.elem_type}


def _with_outputs(model, names, typed):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    existing = {o.name for o in m.graph.output}
    for n in names:
        if n not in existing:
            vi = onnx.ValueInfoProto()
            vi.CopyFrom(typed[n])
            m.graph.output.append(vi)
    return m


TWO_WAY_CHANNELS = 256  # channels the per-token part of the two-way fit is solved on (exactly)


def _two_way_fit(rr: np.ndarray, cc: np.ndarray):
    """Least squares fit of cc[i, j] = a[j] * rr[i, j] + t[j] + s[i] (rows i, channels j): a
    per-channel affine followed by a per-token shift, the composition normopt's passes make
    (a LayerScale folded into a writer, then the writer centered). The per-token part s is
    solved exactly on at most TWO_WAY_CHANNELS evenly spaced channels (normal equations with s
    eliminated: P centers a row over those channels, and the objective is
    sum_i |P(c_i - a*r_i - t)|^2); then every channel's a, t are fitted to cc - s. Returns the
    fitted values (a model outside the family leaves a residual)."""
    n, d = rr.shape
    J = np.unique(np.linspace(0, d - 1, min(d, TWO_WAY_CHANNELS)).round().astype(int))
    k = len(J)
    rj, cj = rr[:, J], cc[:, J]
    pc = cj - cj.mean(axis=1, keepdims=True)
    colsum = rj.sum(axis=0)
    eye = np.eye(k)
    m_aa = np.diag((rj * rj).sum(axis=0)) - (rj.T @ rj) / k
    m_at = colsum[:, None] * (eye - 1.0 / k)
    m_tt = n * (eye - 1.0 / k)
    m = np.block([[m_aa, m_at], [m_at.T, m_tt]])
    rhs = np.concatenate([(rj * pc).sum(axis=0), pc.sum(axis=0)])
    scale = np.sqrt(np.maximum(np.diag(m), 1e-300))  # equilibrate: r may be 1e3 while t is 1
    sol = np.linalg.lstsq(m / scale[:, None] / scale[None, :], rhs / scale, rcond=None)[0] / scale
    a_j, t_j = sol[:k], sol[k:]
    s = (cj - a_j * rj - t_j).mean(axis=1, keepdims=True)
    # every channel: c - s = a * r + t, a per-channel least squares line
    y = cc - s
    rm, ym = rr.mean(axis=0), y.mean(axis=0)
    var = ((rr - rm) ** 2).mean(axis=0)
    a = np.where(var > 0, ((rr - rm) * (y - ym)).mean(axis=0) / np.where(var > 0, var, 1.0), 1.0)
    return a * rr + (ym - a * rm) + s


def _deliberate(r: np.ndarray, c: np.ndarray, atol: float, rtol: float) -> bool:
    """Does c differ from r only the way normopt's rewrites change values on purpose: by a
    per-token shift (a centered stream), a per-channel shift (a folded beta), a per-channel
    scale (a folded LayerScale), or a composition of these that the passes make (a
    per-channel affine, then a per-token shift: a LayerScale folded into a writer that is then
    centered), i.e. c = a*r + t + s with a, t per channel and s per token?"""
    if r.shape != c.shape or r.ndim == 0 or not r.size:
        return False
    r64, c64 = r.astype(np.float64), c.astype(np.float64)
    d = c64 - r64
    tol = atol + rtol * np.abs(r64)

    def flat(x):
        return bool(np.all(np.abs(x) <= tol))

    if flat(d - d.mean(axis=-1, keepdims=True)):
        return True  # per token
    if r.ndim >= 2 and flat(d - d.reshape(-1, r.shape[-1]).mean(axis=0)):
        return True  # per channel
    if r.ndim >= 2 and r.size > r.shape[-1]:  # per channel a*r + t (a folded affine, a LayerScale)
        rr, cc = r64.reshape(-1, r.shape[-1]), c64.reshape(-1, r.shape[-1])
        rm, cm = rr.mean(axis=0), cc.mean(axis=0)
        var = ((rr - rm) ** 2).mean(axis=0)
        a = np.where(var > 0, ((rr - rm) * (cc - cm)).mean(axis=0) / np.where(var > 0, var, 1.0), 1.0)
        t = cm - a * rm
        if flat((cc - (a * rr + t)).reshape(r.shape)):
            return True
        # the composition a*r + t + s: it has 2d + n - 1 parameters for n*d numbers, so it is
        # asked only where it leaves freedom over (at least 3 rows and 3 channels)
        n_rows, width = rr.shape
        if n_rows >= 3 and width >= 3 and np.all(np.isfinite(rr)) and np.all(np.isfinite(cc)):
            fit = _two_way_fit(rr, cc)
            # the candidate's own rounding is of its size (a LayerScale can make c larger than r)
            tol2 = atol + rtol * np.maximum(np.abs(rr), np.abs(cc))
            if bool(np.all(np.abs(cc - fit) <= tol2)):
                return True
    return False


def localize(reference, candidate, input_opts: InputOptions | None = None, atol=None, rtol=None,
             provider="cpu", level="all", skip=(), detect: bool = False) -> dict | None:
    """The first value (in the candidate's topological order) that differs, or None. `skip`:
    values changed on purpose (an optimize report's changed_values); with `detect`, a value
    that differs only as normopt's rewrites change values on purpose (_deliberate) is passed
    over too (for a candidate without its report). A value the report lists is passed over only
    if it differs the way such a change does: a broken weight on a centered stream is still
    blamed where it enters."""
    from ..weights import read_skeleton

    # structure only: the sessions below read the weights from their files
    ref = reference if isinstance(reference, onnx.ModelProto) else read_skeleton(reference)
    cand = candidate if isinstance(candidate, onnx.ModelProto) else read_skeleton(candidate)
    skip = set(skip)
    ref_typed, cand_typed = _typed_values(ref), _typed_values(cand)
    ref_produced = {o for n in ref.graph.node for o in n.output}
    order = [(node, o) for node in cand.graph.node for o in node.output
             if o and o in ref_produced and o in ref_typed and o in cand_typed]
    order = order[:MAX_VALUES]
    names = list(dict.fromkeys(o for _, o in order))
    if not names:
        return None
    feeds = make_feeds(ref, 0, input_opts)
    r_sess = make_session(_with_outputs(ref, names, ref_typed), "cpu", "disable")
    r_vals = dict(zip(names, r_sess.run(names, feeds)))
    del r_sess  # one session at a time
    c_sess = make_session(_with_outputs(cand, names, cand_typed), provider, level)
    c_vals = dict(zip(names, c_sess.run(names, feeds)))
    del c_sess
    passed_over = 0
    info = {}
    for node, name in order:
        r, c = np.asarray(r_vals[name]), np.asarray(c_vals[name])
        if r.shape != c.shape:
            if name in skip:  # Pre-CRMSNorm carries a listed stream in d-1 channels
                passed_over += 1
                continue
            return {"node": node.name, "op": node.op_type, "value": name, "reason": f"shape {list(c.shape)} vs {list(r.shape)}", **info}
        if W.is_float(r.dtype):
            a0, r0 = default_tolerance(r.dtype)
            a, rt = (a0 if atol is None else atol), (r0 if rtol is None else rtol)
            if not np.allclose(c.astype(np.float64), r.astype(np.float64), atol=a, rtol=rt, equal_nan=True):
                if (detect or name in skip) and _deliberate(r, c, a0, r0):
                    # changed on purpose (listed in the report, or recognized): passed over
                    passed_over += 1
                    info = {"skipped": passed_over, "skipped_from": "report" if name in skip and not detect else "recognized"}
                    continue
                diff = float(np.nanmax(np.abs(c.astype(np.float64) - r.astype(np.float64))))
                return {"node": node.name, "op": node.op_type, "value": name, "max_abs": diff, **info}
        elif not np.array_equal(c, r):
            return {"node": node.name, "op": node.op_type, "value": name, "reason": "values differ", **info}
    return None
