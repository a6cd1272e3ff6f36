"""Proof rules, one per op family. Each takes the optimized node and its inputs' relations and
returns the relations of its outputs, or raises _Skip with the reason it does not apply.

Identities used (v' = P(a*u) + t along axis k, P the centering or the identity):

* Add/Sub:  (P(a u1) + t1) +- (P(a u2) + t2) = P(a (u1 +- u2)) + (t1 +- t2), equal axes and P;
  with a constant, P(a u) + t + c' = P(a y) + (t + c' - P(a c)) for the original y = u + c.
* Mul/Div by c': (a u + t) c' = (a c'/c) y + t c' for the original y = u * c; with P only
  for a scalar c' (centering does not commute with a per-channel scale).
* Linear (MatMul, Gemm, Conv with constant weights): (a u + t) W' + b' = u (diag(a) W') + tW' + b';
  if diag(a) W' = W diag(c) (or its centering along the outputs), the output is the original's
  z = c (u W + b) + s, shifted by tW' + b' - c b - s (centered when W' is).
* Gather of a table centered along its last axis: the rows read are centered.
* RMS norms: SimplifiedLayerNormalization(P(u)) = LN(u) without its affine; an RMS norm or
  LayerNormalization of x - mean(x) or of a centered value; LN(u + c 1) = LN(u).
  With scales g' and the original's g, b: out = (g'/g) y - g' b / g.
* ReduceMean(u) over one axis with keepdims, then u - mean(u): the centering.
* com.microsoft Skip(Simplified)LayerNormalization: output 3 = input + skip (+ bias), output 0
  its norm.
"""

from __future__ import annotations

import numpy as np

from .graphs import BLOCK_BYTES, last_row, reduce_axes, row_blocks, same_bytes
from .graphs import reduce_axes as _reduce_axes
from .prover import W_TOL, NotProved, _bcast, _Skip, _weights_close, _where
from .relations import Rel, center, eps_of, per_channel, per_channel_err, simplify, tiny_of, vec
from .symshape import shape_range


def _rank_key(r: Rel):
    return (0 if r.eq else 1 if r.pure_center else 2 if r.kind == "rel" and r.a is None else 3)


def _sorted(rs):
    out, seen = [], set()
    for r in sorted(rs, key=_rank_key):
        key = (r.u, r.axis, r.centered, r.kind, r.a is None, r.t is None)
        if key in seen and (r.a is None and r.t is None):
            continue
        seen.add(key)
        out.append(r)
    return out


def _finish(prover, rs, what):
    rs = _sorted(rs)
    if not rs:
        raise _Skip(what)
    return rs


# ============================================================================ Add / Sub


def _combine(O, q1: Rel, q2: Rel, w1, w2, y, sign):
    if q1.kind != "rel" or q2.kind != "rel" or q1.centered != q2.centered or q1.full_t or q2.full_t:
        return None
    r1, r2, ry = O.rank(w1), O.rank(y), O.rank(y)
    r2 = O.rank(w2)
    axis = None
    if q1.axis is not None or q2.axis is not None:
        if r1 is None or r2 is None or ry is None:
            return None
        negs = {q.axis - rk for q, rk in ((q1, r1), (q2, r2)) if q.axis is not None}
        if len(negs) != 1:
            return None
        axis = ry + negs.pop()
        sy = O.shape(y)
        for q, w, rk in ((q1, w1, r1), (q2, w2, r2)):
            sw = O.shape(w)
            k = axis - (ry - rk)
            if sw is None or sy is None or k < 0 or sw[k] != sy[axis] or not isinstance(sy[axis], int):
                return None
        if (q1.axis is None or q2.axis is None) and (q1.centered or q2.centered):
            return None
    a1, a2 = q1.a, q2.a
    if (a1 is None) != (a2 is None):
        return None
    if a1 is not None and not np.allclose(a1, a2, rtol=1e-6, atol=0):
        return None
    t = None
    if q1.t is not None or q2.t is not None:
        t = (0.0 if q1.t is None else q1.t) + sign * (0.0 if q2.t is None else q2.t)
    err = np.asarray(q1.err, np.float64) + np.asarray(q2.err, np.float64)
    return simplify(Rel(y, axis, q1.centered, a1, t, err, how="add"), eps_of(O.elem(y)))


def _full(arr, rank):
    arr = np.asarray(arr, np.float64)
    return arr.reshape((1,) * (rank - arr.ndim) + arr.shape) if arr.ndim <= rank else None


def _channel_err(err_full, q: Rel, rank):
    """An elementwise bound reduced to the relation's axis (max over the other axes), or a scalar."""
    e = np.asarray(err_full, np.float64)
    if e.ndim == 0:
        return float(e)
    if q.axis is None or e.ndim != rank or e.shape[q.axis] == 1:
        return float(e.max())
    other = tuple(i for i in range(rank) if i != q.axis)
    return e.max(axis=other).reshape(-1)


def _shift_rel(O, y, q: Rel, delta, err_full):
    """Rel on y: P(a y) + delta, delta a full array; None unless delta is per-channel within the
    elementwise rounding bound err_full (plus the relation's own)."""
    ry = O.rank(y)
    if ry is None:
        return None
    delta = _full(delta, ry)
    if delta is None:
        return None
    err_full = _full(err_full, ry)
    sy = O.shape(y)
    if sy is not None and any(isinstance(s, int) and dd not in (1, s) for dd, s in zip(delta.shape, sy)):
        return None  # the constant would broadcast the value to a larger shape
    axis = q.axis
    if axis is None:
        varying = [i for i, dd in enumerate(delta.shape) if dd != 1]
        if not varying:
            if float(delta.reshape(())) == 0.0:
                return simplify(Rel(y, None, False, None, None, 0.0), eps_of(O.elem(y))) if q.a is None else None
            if ry == 0:
                return None  # a scalar value has no channel axis to carry a shift
            varying = [ry - 1]  # a scalar shift: per channel along the last axis
        if len(varying) != 1:
            return None
        axis = varying[0]
    qe = np.asarray(q.err, np.float64)
    bound = (_bcast(qe, axis, ry) if qe.ndim == 1 else qe) + err_full
    got = per_channel_err(delta, axis, ry, bound)
    if got is None:
        return None
    tv, err = got  # the shift lies within every element's own bound: err is that interval's half-width
    d = sy[axis] if sy is not None else None
    if not isinstance(d, int):
        return None
    a = q.a
    return simplify(Rel(y, axis, q.centered, None if a is None else vec(a, d), vec(tv, d), vec(err, d) if np.ndim(err) else err,
                        how="shift"), eps_of(O.elem(y)))


def _p_of(arr, q: Rel, rank):
    """P(a * arr) broadcast to rank, as float64."""
    x = _full(arr, rank)
    if x is None:
        return None
    if q.a is not None:
        x = x * _bcast(q.a, q.axis, rank)
    if q.centered:
        if x.shape[q.axis] == 1:
            x = np.broadcast_to(x, x.shape[:q.axis] + (len(q.a) if q.a is not None else 1,) + x.shape[q.axis + 1:])
        x = center(x, q.axis)
    return x


def add_const(prover, O, rs, c, sign_c=1.0, op="Add", name="", slack=0.0):
    """Relations of v' + sign_c * c for v' with relations rs and the optimized constant c
    (`slack`: its bound against the run-time value, GraphView.slack)."""
    c = np.asarray(c)
    eps_c = W_TOL * (float(np.finfo(c.dtype).eps) if c.dtype.kind == "f" else eps_of(None))  # the cast of c' and one intermediate
    tiny_c = 2 * float(np.finfo(c.dtype).smallest_subnormal) if c.dtype.kind == "f" else 0.0
    slack_c = np.asarray(slack, np.float64)
    c = c.astype(np.float64)
    out = []
    for w, q in prover._rels_on(O, rs):
        if q.kind != "rel":
            continue
        ry = O.rank(w)
        if ry is None or c.ndim > ry:
            continue
        t0 = 0.0 if q.t is None else (q.t if np.ndim(q.t) > 1 else _bcast(q.t, q.axis, ry) if q.axis is not None else q.t)
        # A: the original adds (or subtracts) a constant too
        for cand, slot in O.consumers.get(w, ()):
            if cand.op_type not in ("Add", "Sub") or len(cand.input) != 2 or (cand.op_type == "Sub" and slot != 0):
                continue
            oc = cand.input[1 - slot]
            if not O.is_const(oc):
                continue
            c0 = np.asarray(O.const(oc), np.float64)
            s0 = 1.0 if cand.op_type == "Add" else -1.0
            y = cand.output[0]
            if O.rank(y) != ry:
                continue
            pc = _p_of(s0 * c0, q, ry)
            if pc is None:
                continue
            delta = t0 + sign_c * _full(c, ry) - pc
            rnd = eps_c * (np.abs(_full(c, ry)) + np.abs(pc)) + tiny_c + _slack_full(slack_c, ry)
            s_o = O.slack(oc)
            if np.any(np.asarray(s_o) != 0):  # the original's constant is a run-time sum too
                so = _full(np.asarray(s_o, np.float64), ry)
                if so is None:
                    continue
                so = so * (np.abs(_bcast(q.a, q.axis, ry)) if q.a is not None else 1.0)
                rnd = rnd + (2 * so.max(axis=q.axis, keepdims=True) if q.centered else so)  # centering: x and its mean
            if q.a is None and not q.centered:
                # an element stored exactly as the original's (the same constant, kept) rounds nothing
                same = np.broadcast_to(_full(c, ry), np.broadcast_shapes(np.shape(_full(c, ry)), np.shape(pc))) == pc
                rnd = np.where(same, 0.0, rnd)
            r = _shift_rel(O, y, q, delta, rnd)
            if r is not None:
                out.append(r)
        # B: the constant has no counterpart (a bias moved here, a beta re-added)
        # c' = cast(s + cast(-t)) folds the shift t in: the cast of c' and of that intermediate
        delta = t0 + sign_c * _full(c, ry)
        r = _shift_rel(O, w, q, delta, eps_c * (np.abs(_full(c, ry)) + np.abs(t0)) + tiny_c + _slack_full(slack_c, ry))
        if r is not None:
            out.append(r)
    return out


def _slack_full(slack, rank):
    s = np.asarray(slack, np.float64)
    return float(s) if s.ndim == 0 else (_full(s, rank) if s.ndim <= rank else float(s.max()))


def _mean_axis_of(O, m, w):
    """The axis when the original's value m is ReduceMean(w) over that one axis, keepdims."""
    p = O.producer.get(m)
    if p is None or p[0].op_type != "ReduceMean" or p[0].domain not in ("", "ai.onnx") or p[0].input[0] != w:
        return None
    axes = _reduce_axes(O, p[0])
    if axes is None or len(axes) != 1 or not O.attrs(p[0]).get("keepdims", 1):
        return None
    r, s = O.rank(w), O.shape(w)
    if r is None or s is None or not isinstance(s[axes[0]], int):
        return None
    return axes[0]


def rule_add(prover, O, P, node, in_rels, sign=1.0):
    op = node.op_type
    if len(node.input) != 2:
        raise _Skip(f"{op} with {len(node.input)} inputs")
    k0, k1 = in_rels
    if k0 == "const" or k1 == "const":
        ci = 0 if k0 == "const" else 1
        rs = in_rels[1 - ci]
        c = P.const(node.input[ci])
        if op == "Sub" and ci == 0:
            raise _Skip("constant minus a value")
        got = add_const(prover, O, rs, c, -1.0 if op == "Sub" else 1.0, op, slack=P.slack(node.input[ci]))
        if got:
            prover.stats.shifts_absorbed += 1
        return _finish(prover, got, f"the constant '{node.input[ci]}' is not a per-channel shift the original explains")
    out = _runtime_beta_add(prover, O, P, node, in_rels)
    r0 = prover._rels_on(O, k0)
    r1 = prover._rels_on(O, k1)
    for w1, q1 in r0:
        for cand, slot in O.consumers.get(w1, ()):
            if cand.op_type != op or len(cand.input) != 2 or slot not in (0, 1):
                continue
            if op == "Sub" and slot != 0:
                continue
            w2 = cand.input[1 - slot]
            for ww, q2 in r1:
                if ww != w2:
                    continue
                r = _combine(O, q1, q2, w1, w2, cand.output[0], -1.0 if op == "Sub" else 1.0)
                if r is not None:
                    out.append(r)
    # u - mean(u): an explicit centering the optimizer inserted
    if op == "Sub":
        for w, q in r0:
            for ww, q2 in r1:
                if q.eq and q2.kind == "mean" and q2.u == w:
                    out.append(Rel(w, q2.axis, True, how="explicit centering"))
                    prover.stats.centered_values += 1
                if q.eq and q2.eq and _mean_axis_of(O, ww, w) is not None:
                    # the mean equals the original's own ReduceMean(w) over one axis (keepdims)
                    out.append(Rel(w, _mean_axis_of(O, ww, w), True, how="explicit centering"))
                    prover.stats.centered_values += 1
                if q.pure_center and q2.kind == "zero" and q2.u == w and q2.axis == q.axis:
                    # P(u) - 0 = P(u), and the original's own u - mean(u) is exactly that
                    out.append(Rel(w, q.axis, True, how="centering of a centered value"))
                    for cand, slot in O.consumers.get(w, ()):
                        if cand.op_type == "Sub" and slot == 0 and O.zero_mean_axis(cand.output[0]) == q.axis:
                            out.append(Rel(cand.output[0], how="existing centering"))
    return _finish(prover, out, f"no original {op} of the related values keeps one relation")


# ============================================================================ Mul / Div


def rule_mul(prover, O, P, node, in_rels):
    op = node.op_type
    if len(node.input) != 2 or ("const" not in in_rels):
        raise _Skip(f"{op} of two computed values")
    ci = 0 if in_rels[0] == "const" else 1
    if op == "Div" and ci == 0:
        raise _Skip("constant divided by a value")
    c = np.asarray(P.const(node.input[ci]), np.float64)
    if op == "Div":
        if np.any(c == 0):
            raise _Skip("division by zero")
        c = 1.0 / c
    rs = in_rels[1 - ci]
    out = []
    for q in rs:
        # a * (y - r) + t times a per-channel constant (the scale of a decomposed norm)
        ry = O.rank(q.u) if q.kind == "sub" else None
        if ry is None or c.ndim > ry:
            continue
        cv = per_channel(_full(c, ry), q.axis, ry)
        d = O.shape(q.u)[q.axis] if O.shape(q.u) is not None else None
        if cv is None or not isinstance(d, int) or (np.ndim(cv) and cv.size not in (1, d)):
            continue
        cv = vec(cv, d)
        a = cv if q.a is None else vec(q.a, d) * cv
        t = None if q.t is None else vec(q.t, d) * cv
        out.append(simplify(Rel(q.u, q.axis, False, a, t, np.asarray(q.err, np.float64) * np.abs(cv), kind="sub", how="scale",
                                stat=q.stat), eps_of(O.elem(q.u))))
    for w, q in prover._rels_on(O, rs):
        if q.kind != "rel" or q.full_t:
            continue
        ry = O.rank(w)
        if ry is None or c.ndim > ry:
            continue
        targets = []
        for cand, slot in O.consumers.get(w, ()):
            if cand.op_type in ("Mul", "Div") and len(cand.input) == 2 and (cand.op_type == "Mul" or slot == 0) and \
                    O.is_const(cand.input[1 - slot]) and O.rank(cand.output[0]) == ry:
                c0 = np.asarray(O.const(cand.input[1 - slot]), np.float64)
                if cand.op_type == "Div":
                    if np.any(c0 == 0):
                        continue
                    c0 = 1.0 / c0
                if np.any(c0 == 0):
                    continue
                targets.append((cand.output[0], c0))
        targets.append((w, None))
        for y, c0 in targets:
            ratio = _full(c, ry) if c0 is None else _full(c, ry) / _full(c0, ry)
            if ratio is None:
                continue
            sy = O.shape(y)
            if sy is not None and any(isinstance(s, int) and dd not in (1, s) for dd, s in zip(ratio.shape, sy)):
                continue
            axis = q.axis
            if axis is None:
                varying = [i for i, dd in enumerate(ratio.shape) if dd != 1]
                if len(varying) > 1:
                    continue
                axis = varying[0] if varying else None
            rv = per_channel(ratio, axis, ry) if axis is not None else np.asarray(ratio).reshape(())
            cv = per_channel(_full(c, ry), axis, ry) if axis is not None else np.asarray(c).reshape(())
            if rv is None or cv is None:
                continue
            if q.centered and (np.ndim(cv) > 0 and np.ptp(cv) != 0):
                continue  # a per-channel scale does not commute with the centering
            d = sy[axis] if (axis is not None and sy is not None) else None
            if axis is not None and not isinstance(d, int):
                continue
            a = (1.0 if q.a is None else q.a) * rv
            t = None if q.t is None else q.t * cv
            err = np.asarray(q.err, np.float64) * np.abs(cv)
            if axis is not None:
                a, t = vec(a, d), (None if t is None else vec(t, d))
            elif np.ndim(a) == 0 and float(a) != 1.0 and not np.isclose(float(a), 1.0, rtol=4 * eps_of(O.elem(y)), atol=0):
                continue
            elif np.ndim(a) == 0:
                a = None
            r = simplify(Rel(y, axis, q.centered, a, t, err, how="scale"), eps_of(O.elem(y)))
            out.append(r)
    return _finish(prover, out, f"the constant '{node.input[ci]}' is not a scale the original explains")


# ============================================================================ linear ops


class _Mat:
    """A linear op's constant weight as a [K, N] matrix (inputs x outputs), read in row blocks
    of float64: MatMul and Gemm (transB=0) weights stream from their file; Gemm transB=1 and
    Conv weights (small in practice) are read whole."""

    def __init__(self, view, name, op, attrs):
        self.view, self.name = view, name
        shape = view.shape(name)
        if shape is None:
            arr = view.const(name)
            shape = None if arr is None else arr.shape
        if shape is None:
            raise _Skip("weight of unknown shape")
        shape = tuple(int(d) for d in shape)
        self.rep, self.whole = 1, None
        if op in ("MatMul", "Gemm"):
            if len(shape) != 2:
                raise _Skip(f"{op} weight of rank {len(shape)}")
            if op == "Gemm" and attrs.get("transB", 0):
                self.whole = np.asarray(view.const(name), np.float64).T
                self.K, self.N = shape[1], shape[0]
            else:
                self.K, self.N = shape
        elif op == "Conv":
            if len(shape) < 3 or attrs.get("group", 1) != 1:
                raise _Skip("grouped or 1-D Conv weight")
            w = np.asarray(view.const(name), np.float64)
            self.whole = w.reshape(shape[0], -1).T
            self.K, self.N = self.whole.shape
            self.rep = int(np.prod(shape[2:]))
        else:
            raise _Skip(f"{op} is not linear")

    def last(self):
        """The last row (input channel K-1) in float64, read alone."""
        if self.whole is not None:
            return self.whole[-1]
        r = last_row(self.view, self.name)
        return None if r is None else np.asarray(r, np.float64).reshape(-1)

    def blocks(self, rows=None):
        """(first row, float64 rows) blocks; with ``rows``, only the first that many rows, read as
        one small block (a screen: see _check_matrix)."""
        if self.whole is not None:
            step = max(1, (BLOCK_BYTES // 4) // max(1, self.N)) if rows is None else rows
            for s in range(0, self.K if rows is None else min(self.K, rows), step):
                yield s, self.whole[s:s + step]
            return
        if rows is None:
            for s, b in row_blocks(self.view, self.name):
                yield s, np.asarray(b, np.float64)
            return
        for s, b in row_blocks(self.view, self.name, block_bytes=1):
            yield s, np.asarray(b, np.float64)
            if s + len(b) >= rows:
                return


class _Table:
    """A stored constant's row blocks in float64 (for _Rows)."""

    def __init__(self, view, name):
        self.view, self.name = view, name

    def blocks(self):
        for s, b in row_blocks(self.view, self.name):
            yield s, np.asarray(b, np.float64)


class _Rows:
    """Rows of a _Mat on demand, whatever block sizes the caller asks for."""

    def __init__(self, mat, rows=None):
        self.it, self.buf, self.at = (mat.blocks(rows) if rows is not None else mat.blocks()), None, 0

    def take(self, n):
        parts = []
        while n > 0:
            if self.buf is None or self.at >= len(self.buf):
                _, self.buf = next(self.it)
                self.at = 0
            k = min(n, len(self.buf) - self.at)
            parts.append(self.buf[self.at:self.at + k])
            self.at += k
            n -= k
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _bias(view, node, op, attrs, n):
    if op == "Gemm":
        if len(node.input) < 3 or not node.input[2]:
            return np.zeros(n)
        c = view.const(node.input[2])
        if c is None:
            return None
        c = np.asarray(c, np.float64) * float(attrs.get("beta", 1.0))
        if c.size == 1:
            return np.full(n, float(c.reshape(-1)[0]))
        if c.size != n:
            return None
        return c.reshape(-1)
    if op == "Conv":
        if len(node.input) < 3 or not node.input[2]:
            return np.zeros(n)
        c = view.const(node.input[2])
        return None if c is None else np.asarray(c, np.float64).reshape(-1)
    return np.zeros(n)


def _bias_full(view, node, op, attrs, n):
    """A Gemm's C (times beta) that is not one value per output channel, as a rank-2 float64
    array that broadcasts against the [M, n] output ([M, 1] or [M, n]); None otherwise."""
    if op != "Gemm" or len(node.input) < 3 or not node.input[2]:
        return None
    c = view.const(node.input[2])
    if c is None or np.asarray(c).ndim > 2 or np.asarray(c).size > (1 << 22):
        return None
    c = _full(np.asarray(c, np.float64) * float(attrs.get("beta", 1.0)), 2)
    so = view.shape(node.output[0])
    if so is None or len(so) != 2 or not all(isinstance(d, int) for d in so):
        return None
    try:
        joint = np.broadcast_shapes(c.shape, tuple(so))
    except ValueError:
        return None
    return c if c.shape[1] in (1, n) and joint == tuple(so) else None


def _biases(view, node, op, attrs, n):
    """(per-channel bias, full part or None): a Gemm's full C is all in the full part."""
    b = _bias(view, node, op, attrs, n)
    if b is not None:
        return b, None
    full = _bias_full(view, node, op, attrs, n)
    return (np.zeros(n), full) if full is not None else (None, None)


def _linear_ok(node, attrs, view, x):
    op = node.op_type
    if op == "Gemm" and attrs.get("transA", 0):
        return False
    if op == "MatMul" and view.rank(x) is not None and view.rank(x) < 1:
        return False
    return True


def _in_axis(op, rank):
    return 1 if op == "Conv" else rank - 1


SCREEN_ROWS = 8  # rows of a weight compared before a full pass (_check_matrix's screen)


def _check_matrix(Mp, Mo, alpha, cz, centered, eps, tau=None, err_in=None, tiny=0.0, comp=False, screen=None):
    """Is diag(alpha) Wp equal to Wo diag(cz) (centered along the outputs if asked) within the
    rounding of eps? One pass over both weights in float64 row blocks, which also gives
    tau We (We the weight the original implies), |tau (Wp - We)| and err_in |Wp|.
    Returns (ok, first bad (row, col), tauWe, |tau (Wp - We)|, errW).
    comp: Wp holds the first N-1 of Wo's N output columns (after the centering).

    With ``screen=r``, only the first r rows are compared (each row holds every output column,
    so a centering is checked exactly there): a hypothesis that fails there is refused without
    reading the weights; one that passes is only a candidate for the full pass (ok is never a
    proof then, and the sums are not returned)."""
    if (Mo.K, Mo.N) != (Mp.K, Mp.N + (1 if comp else 0)) or (comp and not centered):
        return False, None, None, None, None
    N = Mp.N
    tw, atw, ew = np.zeros(N), np.zeros(N), np.zeros(N)
    from .. import weights as W

    dt = W.np_dtype(Mp.view.elem(Mp.name)) if Mp.view.elem(Mp.name) else None
    dt = dt if dt is not None and dt.kind == "f" else None
    rows = _Rows(Mo, screen)
    for s, p in Mp.blocks(screen):
        if screen is not None:
            p = p[:max(0, screen - s)]
            if not len(p):
                break
        n = len(p)
        o = rows.take(n)
        if err_in is not None:
            ew += err_in[s:s + n] @ np.abs(p)
        p_stored = p
        if alpha is not None:
            p = p * alpha[s:s + n, None]
        if cz is not None:
            o = o * cz[None, :]
        e = o - o.mean(axis=1, keepdims=True) if centered else o
        # or the centering of the rounded intermediate W diag(c) (cast to the weight's dtype, then
        # centered): that moves the row's mean by the mean of the roundings, computed here exactly
        # (only where the first form leaves an element outside its bound: see below)
        o_full = o
        if comp:
            e, o = e[:, :N], o[:, :N]
        if tau is not None:
            # tau times the weight the original implies (e / alpha), not the stored one: the
            # stored weight's rounding, times the whole input (tau included), is the weight
            # fact's own tolerance, not a bias error (rows with alpha = 0 use the stored weight)
            if alpha is None:
                p_exp = e
            else:
                al = alpha[s:s + n, None]
                p_exp = np.where(al != 0, e / np.where(al != 0, al, 1.0), p_stored)
            tw += tau[s:s + n] @ p_exp
            # what the same shift through the stored (rounded) weight differs by: an optimizer
            # may fold a bias through either; the actual signed sum, not a bound of it
            atw += tau[s:s + n] @ (p_stored - p_exp)
        # bound = W_TOL eps (|e| + |p| (+ |o| where centered)) + 2 tiny, element by element, in place
        bound = np.abs(e)
        bound += np.abs(p)
        if centered:
            bound += np.abs(o)
        bound *= W_TOL * eps
        bound += 2 * tiny
        bound += 1e-300
        diff = np.subtract(p, e)
        np.abs(diff, out=diff)
        bad = diff > bound
        if centered and cz is not None and dt is not None and bad.any():
            oc = o_full.astype(dt).astype(np.float64)
            e_alt = oc - oc.mean(axis=1, keepdims=True)
            if comp:
                e_alt = e_alt[:, :N]
            bad &= np.abs(p - e_alt) > W_TOL * eps * (np.abs(e_alt) + np.abs(p)) + 2 * tiny + 1e-300
        if bad.any():
            i, j = divmod(int(np.argmax(bad)), bad.shape[1])  # the first bad element
            return False, (s + int(i), int(j)), None, None, None
    if screen is not None:
        return True, None, None, None, None
    return True, None, tw, np.abs(atw), ew


def writer_shift(bp, eps, tau, tw, atw, e_in, ew, Wp_scale):
    """A linear writer's own output shift, bp + tau We (tau: the input's shift, We the weight the
    original implies), and its bound: bp's rounding, the stored weight's difference through tau
    (atw), and the input's error through |W| (ew); _check_matrix gives tw, atw and ew."""
    shift = np.asarray(bp, np.float64) * 1.0
    err = eps * np.abs(bp)
    if tau is not None:
        shift = shift + tw * Wp_scale
        err = err + atw * abs(Wp_scale)
    if e_in is not None:
        err = err + ew * abs(Wp_scale)
    return shift, err


def input_err(q, K, rep):
    """The input relation's error bound per input row of a linear op (None: no error)."""
    if q.err is None or not np.any(np.asarray(q.err) != 0):
        return None
    return np.repeat(vec(q.err, K // rep), rep) if np.ndim(q.err) else np.full(K, float(q.err))


def _solved_screen(Mp, Mo, alpha, eps, tiny) -> bool:
    """False where the first rows already show that no column scale c makes diag(alpha) Wp equal
    to Wo diag(c) (a sibling reader of the same stream, another weight): c fitted on those rows
    by least squares leaves a residual beyond sqrt(rows) x the full check's column bound, which
    the full check's c could not do better on. True means only "do the full pass"."""
    r = 2 * SCREEN_ROWS
    ps = [p for _, p in Mp.blocks(r)]
    if not ps:
        return True
    p = np.concatenate(ps)[:r]
    o = _Rows(Mo, r).take(len(p))
    if alpha is not None:
        p = p * alpha[:len(p), None]
    den = (o * o).sum(axis=0)
    c = np.divide((p * o).sum(axis=0), den, out=np.zeros_like(den), where=den > 0)
    bound = 2 * W_TOL * eps * (np.abs(p) + np.abs(o * c)).max(axis=0) + 2 * tiny
    resid = np.abs(p - o * c).max(axis=0)
    return not bool(np.any((resid > np.sqrt(len(p)) * 2 * bound + 1e-300) & (den > 0)))


def prover_solved(prover, O, Mp, Mo, alpha, tau, eps, bp, bo, Wp_scale, Wo_scale, m, out_axis, out, K, rep, q, tiny_b=0.0):
    """The weight is the original's with each output column scaled: diag(alpha) Wp = Wo diag(c)
    for a c solved column by column (a per-channel scale the original applies later, past a
    layout op, for example). The output relates to m by a = c, t = tau Wp + bp - c bo."""
    N = Mp.N
    if not _solved_screen(Mp, Mo, alpha, eps, tiny_of(Mp.view.elem(Mp.name))):
        return False
    num, den = np.zeros(N), np.zeros(N)
    rows = _Rows(Mo)
    for s, p in Mp.blocks():
        o = rows.take(len(p))
        if alpha is not None:
            p = p * alpha[s:s + len(p), None]
        num += (p * o).sum(axis=0)
        den += (o * o).sum(axis=0)
    if np.any(den == 0):
        return False
    c = num / den / Wo_scale
    if np.any(c == 0):
        return False
    e_in = input_err(q, K, rep)
    ok, bad, tw, atw, ew = _check_matrix(Mp, Mo, alpha, c * Wo_scale, False, eps, tau, e_in, tiny_of(Mp.view.elem(Mp.name)))
    prover.stats.weights_checked += 1
    if not ok:
        return False
    shift = np.asarray(bp, np.float64) - c * bo
    # the stored bias rounds the folded value, to the subnormals' spacing below the normal range
    err = eps * (np.abs(bp) + np.abs(c * bo)) + tiny_b * (np.asarray(bp) != 0)
    if tau is not None:
        shift = shift + tw * Wp_scale
        err = err + atw * abs(Wp_scale)
    if e_in is not None:
        err = err + ew * abs(Wp_scale)
    out.append(simplify(Rel(m, out_axis, False, c, shift, err, how="scaled weights"), eps))
    prover.stats.affine_folds += 1
    return True


def _writer_targets(prover, O, m, out_axis, N, rm):
    """(z, c, s) for original values z = c * (m + T) + s after a linear op's output m: m's family
    (c, s per-channel vectors), and the family of m + T for a constant T of any broadcastable
    shape (s then a full array: c * T + s)."""
    out = []

    def family(base, T):
        for z in prover.fam(O, base):
            fz = O.form_on(z, base)
            if z == base:
                cz, sz = None, 0.0
            else:
                if fz is None or not O.is_identity_layout(z, fz):
                    continue
                if fz.axis is not None and fz.axis != out_axis:
                    continue
                cz = vec(fz.a, N) if np.ndim(fz.a) or fz.a != 1.0 else None
                sz = vec(fz.t, N) if np.ndim(fz.t) or fz.t != 0.0 else 0.0
            if T is not None:
                c_b = _bcast(np.ones(N) if cz is None else cz, out_axis, rm)
                sz = c_b * T + (_bcast(sz, out_axis, rm) if np.ndim(sz) else sz)
            out.append((z, cz, sz))

    family(m, None)
    for cand, slot in O.consumers.get(m, ()):
        if cand.op_type != "Add" or len(cand.input) != 2 or not O.is_const(cand.input[1 - slot]):
            continue
        T = O.const(cand.input[1 - slot])
        if T is None or np.asarray(T).ndim > rm or np.asarray(T).size > (1 << 22) or O.rank(cand.output[0]) != rm:
            continue
        T = _full(np.asarray(T, np.float64), rm)
        sm, so = O.shape(m), O.shape(cand.output[0])
        if sm is None or so is None or tuple(sm) != tuple(so) or np.asarray(T).ndim < 2 or per_channel(T, out_axis, rm) is not None:
            continue  # per-channel constants are already in m's family
        family(cand.output[0], T)
    return out


def rule_linear(prover, O, P, node, in_rels):
    op = node.op_type
    if in_rels[0] in (None, "const") or len(node.input) < 2 or in_rels[1] != "const":
        raise _Skip(f"{op} without a constant weight")
    pattrs = P.attrs(node)
    if not _linear_ok(node, pattrs, P, node.input[0]):
        raise _Skip(f"{op} form not supported")
    Mp = _Mat(P, node.input[1], op, pattrs)
    rep, K, N = Mp.rep, Mp.K, Mp.N
    if op == "Gemm":
        Wp_scale = float(pattrs.get("alpha", 1.0))
    else:
        Wp_scale = 1.0
    bp, bp_full = _biases(P, node, op, pattrs, N)
    if bp is None:
        raise _Skip(f"{op} bias is neither a per-channel constant nor a constant of the output's shape")
    eps = eps_of(P.elem(node.input[1]))
    # a stored bias's rounding floor: the subnormals' spacing of its dtype (the weight's), times
    # the Gemm's beta that scales it
    tiny_b = tiny_of(P.elem(node.input[1])) * (abs(float(pattrs.get("beta", 1.0))) if op == "Gemm" else 1.0)
    out, tried = [], []
    for w, q in prover._rels_on(O, in_rels[0]):
        if q.kind == "comp":
            if bp_full is not None:
                continue  # the compressed rules take per-channel biases only
            from .compressed import comp_reader

            comp_reader(prover, O, P, node, w, q, Mp, bp, Wp_scale, eps, out, tried)
            continue
        if q.kind != "rel" or q.centered or q.full_t:
            continue
        rw = O.rank(w)
        if rw is None:
            continue
        if q.axis is not None and q.axis != _in_axis(op, rw):
            continue
        for cand, slot in O.consumers.get(w, ()):
            if slot != 0 or cand.op_type not in ("MatMul", "Gemm", "Conv"):
                continue
            if (cand.op_type == "Conv") != (op == "Conv"):
                continue
            oattrs = O.attrs(cand)
            if op == "Conv":
                keys = ("strides", "pads", "dilations", "kernel_shape", "auto_pad", "group")
                if any(oattrs.get(k) != pattrs.get(k) for k in keys):
                    continue
            if not _linear_ok(cand, oattrs, O, w) or len(cand.input) < 2:
                continue
            if not O.is_const(cand.input[1]):
                continue
            try:
                Mo = _Mat(O, cand.input[1], cand.op_type, oattrs)
            except _Skip:
                continue
            comp = (Mo.K, Mo.N, Mo.rep) == (K, N + 1, rep)  # a CRMS writer keeps N-1 output channels
            if ((Mo.K, Mo.N) != (K, N) or Mo.rep != rep) and not comp:
                continue
            Wo_scale = float(oattrs.get("alpha", 1.0)) if cand.op_type == "Gemm" else 1.0
            bo, bo_full = _biases(O, cand, cand.op_type, oattrs, Mo.N)
            if bo is None or (bo_full is not None and comp):
                continue
            m = cand.output[0]
            rm = O.rank(m)
            if rm is None:
                continue
            out_axis = 1 if op == "Conv" else rm - 1
            alpha = None
            if q.a is not None:
                alpha = np.repeat(np.asarray(q.a, np.float64), rep)
            if Wp_scale != 1.0:
                alpha = (alpha if alpha is not None else np.ones(K)) * Wp_scale
            tau = None if q.t is None else np.repeat(vec(q.t, K // rep), rep)
            if tau is not None and op == "Conv":
                pads = pattrs.get("pads") or ()
                if any(pads) or pattrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
                    continue  # a shift does not pass through zero padding
            if comp:
                from .compressed import comp_writer

                comp_writer(prover, O, P, node, cand, q, Mp, Mo, alpha, tau, bp, bo, Wp_scale, Wo_scale, eps, m, rm,
                            out_axis, rep, out, tried)
                continue
            checked = {}  # (scale, centered) -> _check_matrix's answer, for this weight pair
            for z, cz, sz in _writer_targets(prover, O, m, out_axis, N, rm):
                c_all = (np.ones(N) if cz is None else cz) * Wo_scale
                c_use = None if np.all(c_all == 1.0) else c_all
                e_in = input_err(q, K, rep)
                # the optimized weight IS the original's (same bytes, same reading): tau Wp is
                # tau Wo exactly, so the weight's rounding bound adds nothing to the shift's
                same_w = alpha is None and c_use is None and cand.op_type == op and \
                    (op != "Gemm" or bool(pattrs.get("transB", 0)) == bool(oattrs.get("transB", 0)))
                if same_w:  # one read of the pair, whatever the number of targets
                    if "same" not in checked:
                        checked["same"] = same_bytes(P, node.input[1], O, cand.input[1])
                    same_w = checked["same"]
                for centered in (False, True):
                    # the check depends on the target only through c_use: targets with the same
                    # scale share one pass over the weights
                    key = (None if c_use is None else c_use.tobytes(), centered)
                    if key not in checked:
                        ok, bad, *_ = _check_matrix(Mp, Mo, alpha, c_use, centered, eps, screen=SCREEN_ROWS,
                                                    tiny=tiny_of(P.elem(node.input[1])))
                        if ok:  # the screen passed: the full pass decides
                            ok, bad, tw, atw, ew = _check_matrix(Mp, Mo, alpha, c_use, centered, eps, tau, e_in,
                                                                 tiny_of(P.elem(node.input[1])))
                        checked[key] = (ok, bad, *((tw, atw, ew) if ok else (None, None, None)))
                    ok, bad, tw, atw, ew = checked[key]
                    if same_w and not centered:
                        atw = np.zeros_like(atw) if atw is not None else atw
                    prover.stats.weights_checked += 1
                    if not ok:
                        tried.append((z, bad))
                        continue
                    # output shift: tau Wp + bp - c bo - s (centered: minus its centering)
                    shift, err = writer_shift(bp, eps, tau, tw, atw, e_in, ew, Wp_scale)
                    if np.ndim(sz) > 1 or bp_full is not None or bo_full is not None:
                        # a full constant tensor: the original adds one before its per-channel
                        # chain, or a Gemm's C is one (either graph's)
                        c_b = _bcast(np.ones(N) if cz is None else cz, out_axis, rm)
                        sz_b = _bcast(sz, out_axis, rm) if np.ndim(sz) == 1 else sz
                        orig_shift = c_b * _bcast(bo, out_axis, rm) + sz_b
                        if bo_full is not None:
                            orig_shift = orig_shift + c_b * bo_full
                        if centered:
                            orig_shift = center(orig_shift, out_axis)
                        t_full = _bcast(shift, out_axis, rm) - orig_shift
                        if bp_full is not None:
                            t_full = t_full + bp_full
                        # element by element: each element's own shift bound, and the rounding of
                        # the folded value where this writer's stored bias holds it (a bound taken
                        # over the whole tensor let a small element change by 2% and prove). A
                        # full tensor left to a later Add is charged its rounding there.
                        e_ch = _bcast(err, out_axis, rm) if np.ndim(err) == 1 else np.asarray(err, np.float64)
                        stored = _bcast(np.asarray(bp, np.float64), out_axis, rm)
                        if bp_full is not None:  # the stored full C: its own rounding, and the folded value's
                            stored = stored + bp_full
                            e_ch = e_ch + eps * np.abs(bp_full)
                        bound = e_ch + (eps * np.abs(orig_shift) + tiny_b) * (stored != 0)
                        got = per_channel_err(t_full, out_axis, rm, bound)
                        if got is not None:
                            t_rel, err = got
                        else:
                            t_rel, err = t_full, np.broadcast_to(bound, np.broadcast_shapes(bound.shape, t_full.shape)).copy()
                    else:
                        orig_shift = (np.ones(N) if cz is None else cz) * bo + sz
                        # the stored bias rounds the folded value (one intermediate; below the
                        # normal range to the subnormals' spacing); a zero stored bias folded
                        # nothing and rounds nothing
                        err = err + (eps * np.abs(orig_shift) + tiny_b) * (np.asarray(bp) != 0)
                        if centered:
                            orig_shift = orig_shift - orig_shift.mean()
                        t_rel = shift - orig_shift
                    r = simplify(Rel(z, out_axis, centered, None, t_rel, err, how=f"{op} weights"), eps)
                    out.append(r)
                    if centered:
                        prover.stats.centered_writers += 1
                    elif alpha is not None or c_use is not None:
                        prover.stats.affine_folds += 1
                    break
            if not out and bp_full is None and bo_full is None and \
                    not prover_solved(prover, O, Mp, Mo, alpha, tau, eps, bp, bo, Wp_scale, Wo_scale, m, out_axis, out, K, rep, q,
                                      tiny_b):
                pass
    if not out:
        where = ""
        if tried:
            z, bad = tried[0]
            where = f" (first mismatch at weight element {bad} against the original's '{z}')" if bad else ""
        raise _Skip(f"the weight '{node.input[1]}' is not the original's under any checked relation{where}")
    return _sorted(out)


# ============================================================================ Gather of a table


def centered_table(P, name_p, O, name_o, eps_t, tiny, compressed=False) -> bool:
    """Is P's table the original's centered along its last axis (compressed: its first d-1
    channels), row block by row block, within the table dtype's rounding?"""
    rows = _Rows(_Table(O, name_o))
    for _, blk in row_blocks(P, name_p):
        t0 = rows.take(len(blk))
        exp = center(t0, t0.ndim - 1)
        if compressed:
            exp, t0 = exp[..., :-1], t0[..., :-1]
        if not _weights_close(np.asarray(blk, np.float64), exp, eps_t, np.abs(t0), tiny):
            return False
    return True


def rule_gather(prover, O, P, node, in_rels):
    if in_rels[0] != "const" or in_rels[1] in (None, "const"):
        raise _Skip("Gather not of a constant table")
    g = P.attrs(node).get("axis", 0)
    tshape = P.shape(node.input[0])
    if tshape is None or len(tshape) < 2 or g % len(tshape) == len(tshape) - 1:
        raise _Skip("Gather along the channel axis")
    eps_t = eps_of(P.elem(node.input[0]))
    out = []
    for w, q in prover._rels_on(O, in_rels[1], keep=lambda r: r.eq):
        for cand, slot in O.consumers.get(w, ()):
            if cand.op_type != "Gather" or slot != 1 or O.attrs(cand).get("axis", 0) != g or not O.is_const(cand.input[0]):
                continue
            if O.shape(cand.input[0]) != tshape:
                continue
            prover.stats.weights_checked += 1
            if centered_table(P, node.input[0], O, cand.input[0], eps_t, tiny_of(P.elem(node.input[0]))):
                y = cand.output[0]
                ry = O.rank(y)
                if ry is None:
                    continue
                out.append(Rel(y, ry - 1, True, how="centered table"))
                prover.stats.centered_writers += 1
    from .compressed import comp_gather

    comp_gather(prover, O, P, node, in_rels, out)
    return _finish(prover, out, f"table '{node.input[0]}' is neither the original's nor its rows centered")


# ============================================================================ norms


def _norm_axis(attrs, rank):
    a = int(attrs.get("axis", -1))
    return a % rank if rank else None


def _vals(view, name):
    if not name:
        return None
    v = view.const(name)
    return None if v is None else np.asarray(v, np.float64)


def _same_eps(e0, e1, tol) -> bool:
    if np.float32(e0) == np.float32(e1):
        return True
    rel, tiny = tol if isinstance(tol, tuple) else (tol, 0.0)
    return abs(float(e0) - float(e1)) <= rel * abs(float(e0)) + tiny  # the epsilon rounded to the value's dtype


def norm_rels(prover, O, rs, gamma_p, beta_p, eps_attr, kind, where, stash=1, eps_tol=0.0):
    """Relations of RMS/LN(x') * gamma_p (+ beta_p) for x' with relations rs."""
    out = []
    for w, q in prover._rels_on(O, rs):
        if q.kind != "rel" or q.full_t:
            continue
        r = O.rank(w)
        if r is None:
            continue
        last = r - 1
        if kind == "rms":
            ok = (q.pure_center and q.axis == last) or (q.eq and O.is_zero_mean(w, last))
        else:  # LN: any per-token shift or centering along the last axis, no scale
            ok = q.a is None and (q.axis in (None, last)) and (q.t is None or _uniform_within(q.t, q.err))
        if not ok:
            continue
        sites = [(cand, slot) for cand, slot in O.consumers.get(w, ())] + [(site, 0) for site in O.ln_sites.get(w, ())]
        for cand, slot in sites:
            if slot != 0:
                continue
            if isinstance(cand, tuple):  # a decomposed LayerNorm of the original: (value, eps[, gamma, beta])
                if isinstance(gamma_p, RuntimeGamma):
                    continue
                n, e0 = cand[0], cand[1]
                if not _same_eps(e0, eps_attr, eps_tol):
                    continue
                d = O.shape(w)[last]
                if not isinstance(d, int) or gamma_p is None:
                    continue
                g0 = vec(cand[2], d) if len(cand) > 2 else np.ones(d)
                b0 = vec(cand[3], d) if len(cand) > 3 else np.zeros(d)
                gp = vec(gamma_p, d) if gamma_p.size in (1, d) else None
                bp = np.zeros(d) if beta_p is None else (vec(beta_p, d) if beta_p.size in (1, d) else None)
                if gp is None or bp is None:
                    continue
                same = g0 == gp
                if np.any((g0 == 0) & ~same):
                    continue
                a = np.where(same, 1.0, gp / np.where(g0 == 0, 1.0, g0))
                t = bp - a * b0
                eps = eps_of(O.elem(w))
                out.append(_exact_t(simplify(Rel(n, last, False, a, t, 2 * eps * (np.abs(bp) + np.abs(a * b0)), how="norm"), eps)))
                continue
            oa = O.attrs(cand)
            if cand.op_type == "LayerNormalization":
                g0, b0 = _vals(O, cand.input[1] if len(cand.input) > 1 else ""), _vals(O, cand.input[2] if len(cand.input) > 2 else "")
            elif cand.op_type in ("SimplifiedLayerNormalization", "RMSNormalization") and q.eq and O.is_zero_mean(w, last):
                g0, b0 = _vals(O, cand.input[1] if len(cand.input) > 1 else ""), None
            else:
                continue
            if _norm_axis(oa, r) != last or not _same_eps(oa.get("epsilon", 1e-5), eps_attr, eps_tol):
                continue
            if int(oa.get("stash_type", 1)) != 1 or stash != 1:
                continue
            d = O.shape(w)[last]
            if not isinstance(d, int):
                continue
            # a run-time beta r of the original: y = g0 N + r, so out = (gp/g0)(y - r) + bp, a
            # relation of kind "sub" (stat holds r) that only an Add of r itself turns back
            rt_beta = cand.op_type == "LayerNormalization" and len(cand.input) > 2 and bool(cand.input[2]) and b0 is None
            if rt_beta and not _broadcasts_into(O, cand.input[2], cand.output[0]):
                continue
            if isinstance(gamma_p, RuntimeGamma):
                # the same run-time scale on both sides: out = y - gamma * b0 needs b0 = 0 unless a beta is re-added
                if len(cand.input) < 2 or cand.input[1] not in gamma_p.names:
                    continue
                if rt_beta:
                    d = O.shape(w)[last]
                    bpv = None if beta_p is None else (vec(beta_p, d) if isinstance(d, int) and beta_p.size in (1, d) else False)
                    if bpv is False:
                        continue
                    out.append(Rel(cand.output[0], last, False, None, bpv, 0.0, kind="sub", how="norm, run-time beta",
                                   stat=(cand.input[2],)))
                    continue
                b0v = np.zeros(d) if b0 is None else (vec(b0, d) if b0.size in (1, d) else None)
                bpv = np.zeros(d) if beta_p is None else (vec(beta_p, d) if beta_p.size in (1, d) else None)
                if b0v is None or bpv is None:
                    continue
                eps = eps_of(O.elem(w))
                out.append(simplify(Rel(cand.output[0], last, False, None, bpv - b0v, 2 * eps * (np.abs(b0v) + np.abs(bpv)),
                                        how="norm"), eps))
                continue
            if g0 is None:
                continue
            g0 = vec(g0, d) if g0.size in (1, d) else None
            gp = vec(gamma_p, d) if gamma_p is not None and gamma_p.size in (1, d) else None
            if g0 is None or gp is None:
                continue
            if rt_beta:
                bpv = None if beta_p is None else (vec(beta_p, d) if beta_p.size in (1, d) else False)
                if bpv is False or np.any(g0 == 0):
                    continue
                eps = eps_of(O.elem(w))
                a = np.where(g0 == gp, 1.0, gp / g0)
                rel = simplify(Rel(cand.output[0], last, False, a, bpv, 0.0), eps)
                out.append(Rel(rel.u, last, False, rel.a, rel.t, 0.0, kind="sub", how="norm, run-time beta", stat=(cand.input[2],)))
                continue
            b0 = np.zeros(d) if b0 is None else (vec(b0, d) if b0.size in (1, d) else None)
            bp = np.zeros(d) if beta_p is None else (vec(beta_p, d) if beta_p.size in (1, d) else None)
            if b0 is None or bp is None:
                continue
            same = g0 == gp
            if np.any((g0 == 0) & ~same):
                continue
            safe = np.where(g0 == 0, 1.0, g0)
            a = np.where(same, 1.0, gp / safe)
            t = bp - a * b0
            eps = eps_of(O.elem(w))
            err = 2 * eps * (np.abs(a * b0) + np.abs(bp))
            y = cand.output[0]
            out.append(_exact_t(simplify(Rel(y, last, False, a, t, err, how="norm"), eps)))
    return out


def _uniform_within(t, err) -> bool:
    """One value lies within every channel's own bound of t (LN(u + c 1) = LN(u) for a uniform
    c only): the intervals [t - err, t + err] intersect."""
    t = np.asarray(t, np.float64).reshape(-1)
    e = np.broadcast_to(np.asarray(err, np.float64), t.shape) + 1e-30
    return bool(np.max(t - e) <= np.min(t + e))


def _broadcasts_into(O, r, y) -> bool:
    """The original value r broadcasts into y's shape without widening it (every dim of r,
    right-aligned, is 1 or y's)."""
    sr, sy = O.shape(r), O.shape(y)
    if sr is None or sy is None or len(sr) > len(sy):
        return False
    return all(a == 1 or a == b for a, b in zip(reversed(list(sr)), reversed(list(sy))))


def _runtime_beta_add(prover, O, P, node, in_rels):
    """mid + r' where mid = (y - r) + t (a norm whose original adds a run-time beta r) and r'
    equals r: y + t, a plain per-channel relation."""
    if node.op_type != "Add" or len(node.input) != 2 or any(r in (None, "const") for r in in_rels):
        return []
    out = []
    for k in (0, 1):
        for q in in_rels[k]:
            if q.kind != "sub" or q.a is not None:
                continue
            r = q.stat[0]
            if any(w == r and qq.eq for w, qq in prover._rels_on(O, in_rels[1 - k])):
                out.append(simplify(Rel(q.u, q.axis, False, None, q.t, q.err, how="run-time beta re-added"), eps_of(O.elem(q.u))))
    return out


def _exact_t(r: Rel) -> Rel:
    """A norm's relation keeps t = beta' - a beta only when it does not vanish within the rounding
    of the stored betas; what is kept is then exact (computed in float64 from the stored values,
    the identity LN = RMS o P is exact), so it carries no rounding bound on to its readers."""
    if r.t is not None:
        r.err = 4 * np.finfo(np.float64).eps * np.abs(r.t)
    return r


def rule_norm(prover, O, P, node, in_rels):
    op = node.op_type
    if in_rels[0] in (None, "const"):
        raise _Skip(f"{op} of a constant")
    if any(o and prover._read(P, o) for o in node.output[1:]):
        raise _Skip(f"{op}'s extra outputs are read")
    a = P.attrs(node)
    gp = _norm_gamma(prover, O, P, node, 1, in_rels) if len(node.input) > 1 and node.input[1] else None
    bp = None
    kind = "ln" if op == "LayerNormalization" else "rms"
    if kind == "ln" and len(node.input) > 2 and node.input[2]:
        bp = _vals(P, node.input[2])
        if bp is None:
            raise _Skip("LayerNormalization bias is not a constant")
    rs = in_rels[0]
    for w, q in prover._rels_on(O, rs):
        rk = O.rank(w)
        if rk is not None and _norm_axis(a, rk) != rk - 1:
            raise _Skip(f"{op} does not normalize the last axis")
        break
    if gp is None:
        gp = np.ones(1)
    got = norm_rels(prover, O, rs, gp, bp, a.get("epsilon", 1e-5), kind, _where(node), int(a.get("stash_type", 1)))
    if got:
        prover.stats.norms_converted += 1
    return _finish(prover, got, f"its input is not a centered value whose original is read by a LayerNormalization "
                                f"with the same axis and epsilon ({_desc(rs)})")


def _norm_gamma(prover, O, P, node, k, in_rels):
    """A norm's scale (input k): its constant values, or, for a run-time scale, the RuntimeGamma
    of the original values it is equal to (the original's norm must read one of them, and then
    the scale ratio is 1)."""
    gp = _vals(P, node.input[k])
    if gp is not None:
        return gp
    gp = RuntimeGamma(_equal_originals(prover, O, in_rels[k]))
    if not gp.names:
        raise _Skip(f"{node.op_type} scale is neither a constant nor equal to an original value")
    return gp


def _equal_originals(prover, O, rs) -> set:
    """The original values a run-time input (relations rs) is equal to."""
    return {w for w, _ in prover._rels_on(O, rs if isinstance(rs, list) else [], keep=lambda q: q.eq)}


class RuntimeGamma:
    """A norm scale that is a run-time value, equal to these original values."""

    def __init__(self, names):
        self.names = set(names)
        self.size = -1


def _desc(rs):
    return rs[0].describe() if rs else "no relation"


def rule_skip(prover, O, P, node, in_rels):
    """com.microsoft SkipSimplifiedLayerNormalization(input, skip, gamma, bias?) and
    SkipLayerNormalization(input, skip, gamma, beta?, bias?)."""
    op = node.op_type
    if node.domain != "com.microsoft":
        raise _Skip(f"{op} outside com.microsoft")
    simplified = op == "SkipSimplifiedLayerNormalization"
    if any(prover._read(P, node.output[k]) for k in (1, 2) if k < len(node.output) and node.output[k]):
        raise _Skip(f"{op}'s mean / inv_std outputs are read")
    if in_rels[0] in (None, "const") or in_rels[1] in (None, "const"):
        raise _Skip(f"{op} with a constant input or skip")
    # the sum: input + skip (an original Add), then the bias
    sums = []
    for w1, q1 in prover._rels_on(O, in_rels[0]):
        for cand, slot in O.consumers.get(w1, ()):
            if cand.op_type != "Add" or len(cand.input) != 2:
                continue
            w2 = cand.input[1 - slot]
            for ww, q2 in prover._rels_on(O, in_rels[1]):
                if ww == w2:
                    r = _combine(O, q1, q2, w1, w2, cand.output[0], 1.0)
                    if r is not None:
                        sums.append(r)
    bias_slot = 3 if simplified else 4
    if len(node.input) > bias_slot and node.input[bias_slot]:
        if in_rels[bias_slot] != "const":
            raise _Skip(f"{op} bias is not a constant")
        sums = add_const(prover, O, sums, P.const(node.input[bias_slot]))
    sums = _sorted(sums)
    if not sums:
        raise _Skip(f"{op}: input + skip is not an original sum under one relation")
    a = P.attrs(node)
    gp = _norm_gamma(prover, O, P, node, 2, in_rels)
    bp = None if simplified or len(node.input) < 4 or not node.input[3] else _vals(P, node.input[3])
    rt_beta = None
    if bp is None and not simplified and len(node.input) > 3 and node.input[3]:
        # a run-time beta: equal to the original norm's own run-time beta r, it adds r back to
        # the "y - r" relation the norm gives without it
        rt_beta = _equal_originals(prover, O, in_rels[3])
        if not rt_beta:
            raise _Skip(f"{op} beta is neither a constant nor equal to an original value")
    ys = norm_rels(prover, O, sums, gp, bp, a.get("epsilon", 1e-12), "rms" if simplified else "ln", _where(node))
    if rt_beta is not None:
        eps = eps_of(P.elem(node.output[0])) if node.output[0] else 0.0
        ys = [simplify(Rel(r.u, r.axis, False, None, r.t, r.err, how="norm, run-time beta"), eps)
              for r in ys if r.kind == "sub" and r.a is None and not r.centered and r.stat and r.stat[0] in rt_beta]
    if node.output[0] and not ys:
        raise _Skip(f"{op}: the normalized sum is not an original norm's output ({_desc(sums)})")
    prover.stats.norms_converted += 1
    outs = [_sorted(ys) if node.output[0] else [], [], []]
    if len(node.output) > 3:
        outs.append(sums if node.output[3] else [])
    return outs[:len(node.output)]


# ============================================================================ ReduceMean


def rule_reduce_mean(prover, O, P, node, in_rels):
    if in_rels[0] in (None, "const"):
        raise _Skip("ReduceMean of a constant")
    a = P.attrs(node)
    out = []
    for w, q in prover._rels_on(O, in_rels[0], keep=lambda r: r.eq or r.pure_center):
        r = O.rank(w)
        if r is None:
            continue
        # the axes are read against the original value's rank
        axes = a.get("axes")
        if len(node.input) > 1 and node.input[1]:
            v = P.const(node.input[1])
            if v is None:
                continue
            axes = [int(i) for i in np.asarray(v).reshape(-1)]
        if not axes or len(axes) != 1 or not a.get("keepdims", 1):
            continue
        if q.pure_center:
            if int(axes[0]) % r == q.axis:  # the mean of a centered value: zero per token
                out.append(Rel(w, q.axis, kind="zero", how="mean of a centered value"))
            continue
        out.append(Rel(w, int(axes[0]) % r, kind="mean", how="mean"))
    return _finish(prover, out, "ReduceMean that the original does not compute")


# ============================================================================ decomposed RMS norms

STAT_OPS = {"Pow", "Mul", "ReduceMean", "Add", "Sqrt", "Reciprocal", "Div"}


def _stat_in(prover, O, rs, *names):
    return [(w, q) for w, q in prover._rels_on(O, rs or []) if q.kind == "stat" and q.stat and q.stat[0] in names] \
        if rs not in (None, "const") else []


def _centered_in(prover, O, rs):
    if rs in (None, "const"):
        return []
    out = []
    for w, q in prover._rels_on(O, rs):
        r = O.rank(w)
        if r is None:
            continue
        if q.pure_center and q.axis == r - 1:
            out.append((w, q))
        elif q.eq and O.is_zero_mean(w, r - 1):
            out.append((w, Rel(w, r - 1, True, how="zero-mean")))
    return out


def _scalar(P, name):
    v = P.const(name) if name else None
    if v is None or np.asarray(v).size != 1:
        return None
    return float(np.asarray(v).reshape(-1)[0])


def _scalar_tol(P, name):
    v = np.asarray(P.const(name))
    if v.dtype.kind != "f":
        return (0.0, 0.0)
    fi = np.finfo(v.dtype)
    return (float(fi.eps), float(fi.smallest_subnormal))  # relative, and the spacing of subnormals


def rule_stat(prover, O, P, node, in_rels):
    """A decomposed RMS norm of a centered value, node by node:
    (P u)^2 -> mean over the axis -> + eps -> sqrt -> (reciprocal) -> P u / rms = LN(u) without affine."""
    op, ins = node.op_type, list(node.input)

    def stat(w, q, *st):
        return [Rel(w, q.axis, False, kind="stat", stat=tuple(st), how="rms statistic")]

    if op == "Pow" and len(ins) == 2 and in_rels[1] == "const" and _scalar(P, ins[1]) == 2.0:
        for w, q in _centered_in(prover, O, in_rels[0]):
            return stat(w, q, "sq")
    if op == "Mul" and len(ins) == 2 and ins[0] == ins[1]:
        for w, q in _centered_in(prover, O, in_rels[0]):
            return stat(w, q, "sq")
    if op == "ReduceMean":
        a = P.attrs(node)
        for w, q in _stat_in(prover, O, in_rels[0], "sq"):
            axes = a.get("axes")
            if len(ins) > 1 and ins[1]:
                v = P.const(ins[1])
                axes = None if v is None else [int(i) for i in np.asarray(v).reshape(-1)]
            r = O.rank(w)
            if axes and len(axes) == 1 and r and int(axes[0]) % r == q.axis and a.get("keepdims", 1):
                return stat(w, q, "ms")
    if op == "Add" and len(ins) == 2 and "const" in in_rels:
        ci = 0 if in_rels[0] == "const" else 1
        e = _scalar(P, ins[ci])
        if e is not None:
            for w, q in _stat_in(prover, O, in_rels[1 - ci], "ms"):
                return stat(w, q, "mse", e, _scalar_tol(P, ins[ci]))
    if op == "Sqrt":
        for w, q in _stat_in(prover, O, in_rels[0], "mse"):
            return stat(w, q, "rms", *q.stat[1:])
    if op == "Reciprocal":
        for w, q in _stat_in(prover, O, in_rels[0], "rms"):
            return stat(w, q, "irms", *q.stat[1:])
    normed = []
    if op == "Div" and len(ins) == 2:
        normed = [(w, q, s.stat[1:]) for w, q in _centered_in(prover, O, in_rels[0]) for w2, s in _stat_in(prover, O, in_rels[1], "rms")
                  if w2 == w]
    if op == "Mul" and len(ins) == 2:
        for i in (0, 1):
            normed += [(w, q, s.stat[1:]) for w, q in _centered_in(prover, O, in_rels[i])
                       for w2, s in _stat_in(prover, O, in_rels[1 - i], "irms") if w2 == w]
    for w, q, e in normed:
        got = norm_rels(prover, O, [q], np.ones(1), None, e[0], "rms", _where(node), eps_tol=e[1])
        if got:
            prover.stats.norms_converted += 1
            return _sorted(got)
    raise _Skip(f"{op} is not a step of an RMS norm of a centered value")


RULES = {
    "Add": rule_add,
    "Sub": rule_add,
    "Mul": rule_mul,
    "Div": rule_mul,
    "MatMul": rule_linear,
    "Gemm": rule_linear,
    "Conv": rule_linear,
    "Gather": rule_gather,
    "SimplifiedLayerNormalization": rule_norm,
    "RMSNormalization": rule_norm,
    "LayerNormalization": rule_norm,
    "SkipSimplifiedLayerNormalization": rule_skip,
    "SkipLayerNormalization": rule_skip,
    "ReduceMean": rule_reduce_mean,
}


def _rule_slice(prover, O, P, node, in_rels):
    from .compressed import rule_slice

    return rule_slice(prover, O, P, node, in_rels)


def _rule_expand(prover, O, P, node, in_rels):
    from .compressed import rule_expand_const

    return rule_expand_const(prover, O, P, node, in_rels)


RULES["Slice"] = _rule_slice
RULES["Expand"] = _rule_expand


def rule_rows(prover, O, P, node, in_rels):
    """op(x') over x's last axis, op a Softmax / LogSoftmax / Hardmax, where the original computes
    Reshape(op(Flatten(x, last)), Shape(x)) (ONNX's version converter writes that for an opset-11
    op whose rank it does not know): Flatten at the last axis keeps x's rows, the op acts row by
    row over its 2-D input's last axis, and the Reshape to x's own shape (Shape(x) whole, or a
    constant equal to x's static shape) puts them back. x' must be equal to x."""
    if in_rels[0] in (None, "const") or len(node.input) != 1:
        raise _Skip(f"{node.op_type} of a constant")
    out = []
    for w, q in prover._rels_on(O, in_rels[0]):
        if not q.eq:
            continue
        r = O.rank(w)
        if r is None or r < 1 or P.rank(node.input[0]) != r:
            continue
        ax = P.attrs(node).get("axis", -1 if P.opset() >= 13 else 1)
        if int(ax) % r != r - 1:
            continue
        for flat, slot in O.consumers.get(w, ()):
            if flat.op_type != "Flatten" or slot != 0 or flat.domain not in ("", "ai.onnx"):
                continue
            if int(O.attrs(flat).get("axis", 1)) % r != r - 1:
                continue
            for op, _ in O.consumers.get(flat.output[0], ()):
                if op.op_type != node.op_type or op.domain not in ("", "ai.onnx") or len(op.input) != 1:
                    continue
                if int(O.attrs(op).get("axis", -1 if O.opset() >= 13 else 1)) not in (-1, 1):
                    continue
                for rs, k in O.consumers.get(op.output[0], ()):
                    if rs.op_type != "Reshape" or k != 0 or len(rs.input) < 2:
                        continue
                    sh = O.producer.get(rs.input[1])
                    whole = sh is not None and sh[0].op_type == "Shape" and sh[0].input[0] == w and \
                        int(O.attrs(sh[0]).get("start", 0)) == 0 and O.attrs(sh[0]).get("end") is None
                    if not whole:
                        c, s_w = O.const(rs.input[1]), O.shape(w)
                        if c is None or s_w is None or not all(isinstance(d, int) for d in s_w) or \
                                [int(v) for v in np.asarray(c).reshape(-1)] != list(s_w):
                            continue
                    out.append(Rel(rs.output[0], how=f"{node.op_type} without the converter's Flatten / Reshape"))
    if not out:
        raise _Skip(f"no original {node.op_type} computes it (directly, or between a Flatten at the last axis and a "
                    "Reshape to the input's shape)")
    return out


for _op in ("Softmax", "LogSoftmax", "Hardmax"):
    RULES[_op] = rule_rows
del _op


def _shape_key(view, name, attrs):
    """(x's tracked shape, start, end normalized) for Shape(x), or None when a dim is unknown."""
    s = view.tracker.S(name)
    if s is None or any(d is None for d in s):
        return None
    return (tuple(s),) + shape_range(attrs.get("start", 0), attrs.get("end"), len(s))


def rule_shape(prover, O, P, node, in_rels):
    """Shape(x') is the original's Shape(u) when x' and u have the same shape for every input size
    (both tracked as the same polynomials of the graph inputs' dims): a Shape the optimizer
    re-pointed at another value of that shape (the input of a norm it folded, say). A Shape
    reads nothing but the shape, so x's relation does not matter beyond having one."""
    if in_rels[0] in (None, "const"):
        raise _Skip("Shape of a constant")
    key = _shape_key(P, node.input[0], P.attrs(node))
    if key is None:
        raise _Skip("the input's shape is not tracked for every size")
    idx = getattr(O, "_shape_index", None)
    if idx is None:
        idx = {}
        for n in O.nodes:
            if n.op_type == "Shape" and n.domain in ("", "ai.onnx") and n.input and n.output[0]:
                k = _shape_key(O, n.input[0], O.attrs(n))
                if k is not None:
                    idx.setdefault(k, []).append(n.output[0])
        O._shape_index = idx
    outs = idx.get(key)
    if not outs:
        raise _Skip("no original Shape of a value of the same shape")
    return [Rel(o, how="Shape of a value of the same shape") for o in outs[:2]]


RULES["Shape"] = rule_shape

del reduce_axes, NotProved
