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


def _deliberate(r: np.ndarray, c: np.ndarray, atol: float, rtol: float) -> bool:
    """Does c differ from r only the way normopt's rewrites change values on purpose: by a
    per-token shift (a centered stream), a per-channel shift (a folded beta) or a per-channel
    scale (a folded LayerScale)?"""
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
