"""Proof rules for CRMSNorm streams: values carried in d-1 channels.

The compressed relation (relations.Rel kind "comp") on an original value u along axis k:

    v' = C(F),   F = P(a * u) + t,   F zero-mean along k,

C taking the first d-1 of the d channels, P the centering or the identity. Because F is
zero-mean, its last channel is -sum of the others, so nothing is lost. Identities used:

* writers (MatMul / Gemm / Conv with constant weights): W' = C(center_out(W diag(c))): the
  output is C(P(z)) + (tau W' + b' - C(P(c b))) for the original z; a shift s of d-1 channels
  is carried as t = [s, -sum s], which keeps F zero-mean;
* Gather of a table whose rows are C(center(rows));
* Add: C(F1) + C(F2) = C(F1 + F2); C(F) + c' with the original y = u + c: C(F_y) where
  F_y = F + P(a c), the remainder of c' taken into t as [s, -sum s] (centered relations only);
* Slice [0:d-1] along k of a centered value P(a u) (+ a zero-mean t): C of it;
* CRMSNorm of C(F), F = P(u): sum x_c^2 + (sum x_c)^2 = sum F^2, so
  x_c / sqrt((sum x_c^2 + (sum x_c)^2) / d + eps) = C(RMS(F)) = C(LN(u) without its affine),
  which is C(a y + t) for an original LayerNorm output y = LN(u) gamma + beta (a = 1/gamma,
  t = -beta/gamma), a zero-mean F again;
* readers y W of such an F: F W'' = F M for any M with M[:d-1] - M[d-1] = W'' (F 1 = 0), and
  F M = u Wo diag(c) + t M for M = diag(1/a) Wo diag(c): W' = M[:d-1] - M[d-1] is checked, the
  output shift is t M + b' - c b (streamed row block by row block);
* decompression: Concat(x_c, -ReduceSum(x_c)) along k is F itself.

Layout ops that commute with taking channels (Transpose, Reshape keeping the channel, Gather /
Slice / Concat / ReduceMean over other axes, ...) carry the relation in prover._layout.
"""

from __future__ import annotations

import numpy as np

from .prover import W_TOL, _bcast, _Skip, _where
from .relations import Rel, eps_of, per_channel_err, simplify, tiny_of, vec
from .rules import (_bias, _check_matrix, _combine, _full, _linear_ok, _Mat, _Rows, _writer_targets, centered_table,
                    input_err, norm_rels, writer_shift)


def _akey(x):
    if x is None:
        return None
    x = np.asarray(x, np.float64)
    return (x.shape, x.tobytes())


def fkey(q: Rel):
    """The identity of F (exact: the same arrays), for statistics that must be of one F."""
    return (q.u, q.axis, q.centered, _akey(q.a), _akey(q.t))


def _cstat(q: Rel, *st):
    return Rel(q.u, q.axis, q.centered, q.a, q.t, q.err, kind="cstat", how="crms statistic", stat=tuple(st))


def _csubstat(q: Rel, name, r):
    return Rel(q.u, q.axis, q.centered, q.a, q.t, q.err, kind="csubstat", how="crms statistic, run-time beta",
               stat=(name, r))


def _comps_fam(prover, O, rs):
    """Compressed relations of rs restated on every family member of their values."""
    if rs in (None, "const"):
        return []
    return [q for _, q in prover._rels_on(O, [r for r in rs if r.kind == "comp"]) if q.kind == "comp"]


def _comps(rs, kind="comp", stat=None):
    if rs in (None, "const"):
        return []
    return [q for q in rs if q.kind == kind and (stat is None or (q.stat and q.stat[0] in stat))]


def _width(O, q):
    s = O.shape(q.u)
    d = s[q.axis] if s is not None and q.axis is not None and q.axis < len(s) else None
    return d if isinstance(d, int) and not isinstance(d, bool) else None


def _reduce_axes_p(P, node):
    a = P.attrs(node)
    axes = a.get("axes")
    if len(node.input) > 1 and node.input[1]:
        v = P.const(node.input[1])
        axes = None if v is None else [int(i) for i in np.asarray(v).reshape(-1)]
    return axes, int(a.get("keepdims", 1))


def _scalar(P, name):
    v = P.const(name) if name else None
    if v is None or np.asarray(v).size != 1:
        return None
    return float(np.asarray(v, np.float64).reshape(-1)[0])


def _stol(P, name):
    v = np.asarray(P.const(name))
    if v.dtype.kind != "f":
        return (0.0, 0.0)
    fi = np.finfo(v.dtype)
    return (float(fi.eps), float(fi.smallest_subnormal))


def _extend(s, err, d):
    """A shift of d-1 channels as the d-long zero-mean t = [s, -sum s] (and its bound)."""
    s = np.asarray(s, np.float64).reshape(-1)
    e = np.broadcast_to(np.asarray(err, np.float64), s.shape)
    return np.append(s, -s.sum()), np.append(e, e.sum())


# ============================================================================ writers


def comp_writer(prover, O, P, node, cand, q, Mp, Mo, alpha, tau, bp, bo, Wp_scale, Wo_scale, eps, m, rm, out_axis, rep,
                out, tried):
    """The optimized weight keeps the first N-1 of the original's N output channels, centered."""
    N, K = Mo.N, Mp.K
    e_in = input_err(q, K, rep)
    tiny = tiny_of(P.elem(node.input[1]))
    for z, cz, sz in _writer_targets(prover, O, m, out_axis, N, rm):
        if np.ndim(sz) > 1:
            # z = c (m + T) + s with T a full tensor: state the relation on m itself, with a = c
            # (F = P(c m) + t); the original's own constant Add after m is then matched as a shift
            if cz is None:
                continue
            z, sz = m, 0.0
        c_all = (np.ones(N) if cz is None else cz) * Wo_scale
        c_use = None if np.all(c_all == 1.0) else c_all
        ok, bad, tw, atw, ew = _check_matrix(Mp, Mo, alpha, c_use, True, eps, tau, e_in, tiny, comp=True)
        prover.stats.weights_checked += 1
        if not ok:
            tried.append((z, bad))
            continue
        shift, err = writer_shift(bp, eps, tau, tw, atw, e_in, ew, Wp_scale)
        orig = (np.ones(N) if cz is None else cz) * bo + sz
        err = err + eps * np.abs(orig[:N - 1]) * (np.asarray(bp) != 0)  # a zero stored bias rounds nothing
        orig = orig - orig.mean()
        t, e = _extend(shift - orig[:N - 1], err, N)
        a_rel = cz if z == m and cz is not None else None  # F = P(c m): the scale stays in the relation
        if a_rel is not None:
            # on m: P(c (m)) with m = u W + b, so the shift is b' - C(P(c b)) (b inside m)
            orig_m = cz * bo
            orig_m = orig_m - orig_m.mean()
            t, e = _extend(shift - orig_m[:N - 1], err + eps * np.abs(cz * bo)[:N - 1] * (np.asarray(bp) != 0), N)
        out.append(simplify(Rel(z, out_axis, True, a_rel, t, e, kind="comp", how=f"compressed {node.op_type} writer"), eps))
        prover.stats.centered_writers += 1
        return


# ============================================================================ readers


def comp_reader(prover, O, P, node, w, q, Mp, bp, Wp_scale, eps, out, tried):
    """A MatMul / Gemm reading C(F), F = a u + t zero-mean, with the original's u W + b."""
    op = node.op_type
    if op == "Conv" or q.centered or q.full_t or Mp.rep != 1:
        return
    rw = O.rank(w)
    d = _width(O, q)
    if rw is None or q.axis != rw - 1 or d is None or Mp.K != d - 1:
        return
    a = np.ones(d) if q.a is None else vec(q.a, d)
    if np.any(a == 0):
        return
    t = np.zeros(d) if q.t is None else vec(q.t, d)
    et = np.broadcast_to(np.asarray(q.err, np.float64), (d,)) if np.ndim(q.err) else np.full(d, float(q.err))
    tiny = tiny_of(P.elem(node.input[1]))
    N = Mp.N
    for cand, slot in O.consumers.get(w, ()):
        if slot != 0 or cand.op_type not in ("MatMul", "Gemm") or len(cand.input) < 2 or not O.is_const(cand.input[1]):
            continue
        oattrs = O.attrs(cand)
        if not _linear_ok(cand, oattrs, O, w):
            continue
        try:
            Mo = _Mat(O, cand.input[1], cand.op_type, oattrs)
        except _Skip:
            continue
        if (Mo.K, Mo.N, Mo.rep) != (d, N, 1):
            continue
        Wo_scale = float(oattrs.get("alpha", 1.0)) if cand.op_type == "Gemm" else 1.0
        bo = _bias(O, cand, cand.op_type, oattrs, N)
        m = cand.output[0]
        rm = O.rank(m)
        if bo is None or rm is None:
            continue
        out_axis = rm - 1
        last = Mo.last()
        if last is None:
            continue
        for z, cz, sz in _writer_targets(prover, O, m, out_axis, N, rm):
            if np.ndim(sz) > 1:
                continue
            c_all = (np.ones(N) if cz is None else cz) * Wo_scale
            Md = last * c_all / a[d - 1]
            rows = _Rows(Mp)
            tw, ew = np.zeros(N), np.zeros(N)
            ok = True
            for s, o in Mo.blocks():
                n = len(o)
                M = o * (1.0 / a[s:s + n])[:, None] * c_all[None, :]
                tw += t[s:s + n] @ M  # the original's weights: the stored weight's rounding is the weight fact's
                ew += et[s:s + n] @ np.abs(M)
                k = min(n, d - 1 - s)
                if k <= 0:
                    continue
                p = rows.take(k) * Wp_scale
                e = M[:k] - Md[None, :]
                bound = W_TOL * eps * (np.abs(e) + np.abs(p) + np.abs(M[:k]) + np.abs(Md)[None, :])
                bad = np.abs(p - e) > bound + 2 * tiny + 1e-300
                if bad.any():
                    i, j = np.argwhere(bad)[0]
                    tried.append((z, (s + int(i), int(j))))
                    ok = False
                    break
            prover.stats.weights_checked += 1
            if not ok:
                continue
            orig = (np.ones(N) if cz is None else cz) * bo + sz
            shift = np.asarray(bp, np.float64) + tw - orig
            err = eps * (np.abs(bp) + np.abs(orig)) + ew
            out.append(simplify(Rel(z, out_axis, False, None, shift, err, how=f"{op} reading a compressed stream"), eps))
            prover.stats.affine_folds += 1
            break


# ============================================================================ Gather of a table


def comp_gather(prover, O, P, node, in_rels, out):
    """Gather of a table whose rows keep the first d-1 of the original's rows centered."""
    if in_rels[0] != "const" or in_rels[1] in (None, "const"):
        return
    g = P.attrs(node).get("axis", 0)
    tshape = P.shape(node.input[0])
    if tshape is None or len(tshape) < 2 or g % len(tshape) == len(tshape) - 1:
        return
    eps_t, tiny = eps_of(P.elem(node.input[0])), tiny_of(P.elem(node.input[0]))
    for w, q in prover._rels_on(O, in_rels[1], keep=lambda r: r.eq):
        for cand, slot in O.consumers.get(w, ()):
            if cand.op_type != "Gather" or slot != 1 or O.attrs(cand).get("axis", 0) != g or not O.is_const(cand.input[0]):
                continue
            oshape = O.shape(cand.input[0])
            if oshape is None or tuple(oshape[:-1]) != tuple(tshape[:-1]) or oshape[-1] != tshape[-1] + 1:
                continue
            prover.stats.weights_checked += 1
            ok = centered_table(P, node.input[0], O, cand.input[0], eps_t, tiny, compressed=True)
            y = cand.output[0]
            ry = O.rank(y)
            if ok and ry is not None:
                out.append(Rel(y, ry - 1, True, kind="comp", how="compressed table"))
                prover.stats.centered_writers += 1


# ============================================================================ Slice of a centered value


def rule_slice(prover, O, P, node, in_rels):
    """Slice [0:d-1] along k of a centered value (an explicit centering, then compressed)."""
    if in_rels[0] in (None, "const") or len(node.input) < 4 or any(r != "const" for r in in_rels[1:]):
        raise _Skip("not a compressing Slice")
    st, en, ax = (P.const(node.input[i]) for i in (1, 2, 3))
    steps = P.const(node.input[4]) if len(node.input) > 4 and node.input[4] else np.ones(1, np.int64)
    vals = [None if v is None else np.asarray(v).reshape(-1) for v in (st, en, ax, steps)]
    if any(v is None or v.size != 1 for v in vals):
        raise _Skip("not a compressing Slice")
    st, en, ax, sp = (int(v[0]) for v in vals)
    out = []
    for w, q in prover._rels_on(O, in_rels[0]):
        r = O.rank(w)
        if r is None or q.kind != "rel" or q.full_t:
            continue
        k = ax % r
        if q.centered and q.axis == k and q.t is None:  # P(a u) + t is zero-mean only for a zero-mean t
            base = q
        elif q.eq and O.is_zero_mean(w, k):
            base = Rel(w, k, False)
        else:
            continue
        s = O.shape(w)
        d = s[k] if s is not None else None
        if not isinstance(d, int) or d < 2 or st != 0 or sp != 1 or en != d - 1:
            continue
        out.append(Rel(w, k, base.centered, base.a, base.t, base.err, kind="comp", how="compressing slice"))
    if not out:
        raise _Skip("not a Slice [0:d-1] of a centered value")
    prover.stats.centered_values += 1
    return out


# ============================================================================ elementwise, statistics, decompression


def rule_comp(prover, O, P, node, in_rels):
    op, ins = node.op_type, list(node.input)
    if op in ("Add", "Sub") and len(ins) == 2:
        got = _stat_add(prover, O, P, node, in_rels)
        if got:
            return got
        got = _comp_add(prover, O, P, node, in_rels)
        if got:
            return got
        raise _Skip(f"{op} of compressed values that no original {op} explains")
    if op == "Mul" and len(ins) == 2 and ins[0] == ins[1]:
        got = [_cstat(q, "sq") for q in _comps(in_rels[0])] + [_cstat(q, "sum2") for q in _comps(in_rels[0], "cstat", ("sum",))]
        if got:
            return _order(got)
    if op == "ReduceSum":
        axes, keep = _reduce_axes_p(P, node)
        out = []
        for q in _comps(in_rels[0]) + _comps(in_rels[0], "cstat", ("sq",)) + _comps(in_rels[0], "csub"):
            r = O.rank(q.u)
            if axes and len(axes) == 1 and keep and r and int(axes[0]) % r == q.axis:
                if q.kind == "csub":
                    out.append(_csubstat(q, "sum", q.stat[0]))
                else:
                    out.append(_cstat(q, "sum" if q.kind == "comp" else "sumsq"))
        if out:
            return _order(out)
    if op == "Neg" and (_comps(in_rels[0], "cstat", ("sum",)) or _comps(in_rels[0], "csubstat", ("sum",))):
        return _order([_cstat(q, "last") for q in _comps(in_rels[0], "cstat", ("sum",))] +
                      [_csubstat(q, "last", q.stat[1]) for q in _comps(in_rels[0], "csubstat", ("sum",))])
    if op in ("Mul", "Div") and len(ins) == 2 and "const" in in_rels:
        ci = 0 if in_rels[0] == "const" else 1
        c = _scalar(P, ins[ci])
        if c is not None and not (op == "Div" and ci == 0):
            inv = (1.0 / c if c else None) if op == "Div" else c
            rel, _ = _stol(P, ins[ci])
            got = [_cstat(q, "ms") for q in _comps(in_rels[1 - ci], "cstat", ("ssq",))
                   if _width(O, q) and inv is not None and abs(inv - 1.0 / _width(O, q)) <= 2 * rel / _width(O, q)]
            if got:
                return _order(got)
    if op in ("Mul", "Div") and len(ins) == 2 and "const" in in_rels:
        got = _comp_scale(prover, O, P, node, in_rels)
        if got:
            return got
    if op == "Sqrt" and _comps(in_rels[0], "cstat", ("mse",)):
        return _order([_cstat(q, "rms", *q.stat[1:]) for q in _comps(in_rels[0], "cstat", ("mse",))])
    if op == "Reciprocal" and _comps(in_rels[0], "cstat", ("rms",)):
        return _order([_cstat(q, "irms", *q.stat[1:]) for q in _comps(in_rels[0], "cstat", ("rms",))])
    if op in ("Div", "Mul") and len(ins) == 2 and "const" not in in_rels:
        got = _crms(prover, O, P, node, in_rels)
        if got:
            return got
    if op == "Concat" and len(ins) == 2:
        got = _decompress(prover, O, P, node, in_rels)
        if got:
            return got
    raise _Skip(f"{op} is not a step the compressed-stream rules know")


def _stat_add(prover, O, P, node, in_rels):
    ins = list(node.input)
    if node.op_type == "Add" and "const" in in_rels:
        ci = 0 if in_rels[0] == "const" else 1
        e = _scalar(P, ins[ci])
        if e is not None:
            return _order([_cstat(q, "mse", e, _stol(P, ins[ci])) for q in _comps(in_rels[1 - ci], "cstat", ("ms",))]) or None
        return None
    if node.op_type != "Add" or "const" in in_rels or None in in_rels:
        return None
    got = []
    for q1 in _comps(in_rels[0], "cstat", ("sumsq", "sum2")):
        for q2 in _comps(in_rels[1], "cstat", ("sumsq", "sum2")):
            if {q1.stat[0], q2.stat[0]} == {"sumsq", "sum2"} and fkey(q1) == fkey(q2):
                got.append(_cstat(q1, "ssq"))  # sum of the d-1 squares plus the last one's: F's sum of squares
    return _order(got) or None


def _comp_add(prover, O, P, node, in_rels):
    op = node.op_type
    sign = -1.0 if op == "Sub" else 1.0
    out = []
    if "const" in in_rels:
        ci = 0 if in_rels[0] == "const" else 1
        if op == "Sub" and ci == 0:
            return None
        c = np.asarray(P.const(ins_name(node, ci)))
        dt_c = c.dtype if c.dtype.kind == "f" else np.float32
        eps_c = W_TOL * (float(np.finfo(c.dtype).eps) if c.dtype.kind == "f" else eps_of(None))  # the cast of c' and one intermediate
        tiny_c = 2 * float(np.finfo(c.dtype).smallest_subnormal) if c.dtype.kind == "f" else 0.0
        c = c.astype(np.float64)
        for q in _comps_fam(prover, O, in_rels[1 - ci]):
            if not q.centered or q.full_t:
                continue
            w = q.u
            r, d = O.rank(w), _width(O, q)
            if r is None or d is None or c.ndim > r:
                continue
            cf = _full(c, r)
            if cf.shape[q.axis] not in (1, d - 1):
                continue
            sw = O.shape(w)
            targets = []
            if sw is not None and all(dd == 1 or (isinstance(x, int) and dd == x) for k, (dd, x) in enumerate(zip(cf.shape, sw))
                                      if k != q.axis):
                targets.append((w, None))  # a shift with no counterpart: it must not broadcast the value
            for cand, slot in O.consumers.get(w, ()):
                if cand.op_type not in ("Add", "Sub") or len(cand.input) != 2 or (cand.op_type == "Sub" and slot != 0):
                    continue
                oc = cand.input[1 - slot]
                if O.is_const(oc) and O.rank(cand.output[0]) == r:
                    s0 = 1.0 if cand.op_type == "Add" else -1.0
                    targets.append((cand.output[0], s0 * np.asarray(O.const(oc), np.float64)))
            for y, c0 in targets:
                if c0 is None:
                    pc = np.zeros((1,) * r)
                else:
                    c0f = _full(c0, r)
                    if c0f is None or c0f.shape[q.axis] not in (1, d):
                        continue
                    if any(x != y0 for k, (x, y0) in enumerate(zip(cf.shape, c0f.shape)) if k != q.axis):
                        continue  # the constants broadcast alike in both graphs, or this is not the relation
                    shape = list(c0f.shape)
                    shape[q.axis] = d
                    pc = np.broadcast_to(c0f, shape)
                    pc_alt = None
                    if q.a is not None:
                        pc = pc * _bcast(q.a, q.axis, r)
                        # or the centering of the rounded intermediate a * c (cast, then centered)
                        pc_alt = pc.astype(dt_c).astype(np.float64)
                        pc_alt = np.take(pc_alt - pc_alt.mean(axis=q.axis, keepdims=True), range(d - 1), axis=q.axis)
                    pc = pc - pc.mean(axis=q.axis, keepdims=True)
                    pc = np.take(pc, range(d - 1), axis=q.axis)
                    if pc_alt is not None:
                        pc = np.where(np.abs(sign * cf - pc_alt) < np.abs(sign * cf - pc), pc_alt, pc)
                delta = sign * cf - pc
                bound = eps_c * (np.abs(cf) + np.abs(pc)) + tiny_c
                got = per_channel_err(delta, q.axis, r, bound)
                if got is None:
                    continue
                dvec, berr = got
                dv, de = _extend(vec(dvec, d - 1), vec(berr, d - 1), d)
                t = dv if q.t is None else vec(q.t, d) + dv
                err = de + (np.asarray(q.err, np.float64) if np.ndim(q.err) else float(q.err))
                out.append(simplify(Rel(y, q.axis, True, q.a, t, err, kind="comp", how="compressed shift"), eps_of(O.elem(y))))
        if out:
            prover.stats.shifts_absorbed += 1
        return _order(out)
    c1 = _comps_fam(prover, O, in_rels[1])
    for q1 in _comps_fam(prover, O, in_rels[0]):
        w1 = q1.u
        for cand, slot in O.consumers.get(w1, ()):
            if cand.op_type != op or len(cand.input) != 2 or (op == "Sub" and slot != 0):
                continue
            w2 = cand.input[1 - slot]
            for q2 in c1:
                if q2.u != w2:
                    continue
                if q1.centered != q2.centered:
                    continue
                ra, rb = (Rel(x.u, x.axis, x.centered, x.a, x.t, x.err) for x in (q1, q2))
                r = _combine(O, ra, rb, w1, w2, cand.output[0], sign)
                if r is None or r.axis is None or r.axis != q1.axis:
                    continue
                d = _width(O, r)
                if d is None:
                    continue
                # _combine dropped a and t if they vanished: the sum is again a zero-mean F
                out.append(Rel(r.u, r.axis, r.centered, r.a, None if r.t is None else vec(r.t, d), r.err, kind="comp",
                               how="compressed sum"))
    return _order(out)


def _comp_scale(prover, O, P, node, in_rels):
    """C(F) * c for a scalar c: C(c F), c F zero-mean again; for the original y = u * c0 (c0 a
    scalar or a per-channel vector along the axis) c F = P((c a / c0) y) + c t."""
    op, ins = node.op_type, list(node.input)
    ci = 0 if in_rels[0] == "const" else 1
    if op == "Div" and ci == 0:
        return None
    c = _scalar(P, ins[ci])
    if c is None or c == 0:
        return None
    c = 1.0 / c if op == "Div" else c
    out = []
    for q in _comps(in_rels[1 - ci]):
        r, d = O.rank(q.u), _width(O, q)
        if r is None or d is None or q.full_t:
            continue
        for cand, slot in O.consumers.get(q.u, ()):
            if cand.op_type not in ("Mul", "Div") or len(cand.input) != 2 or (cand.op_type == "Div" and slot != 0):
                continue
            oc = cand.input[1 - slot]
            if not O.is_const(oc) or O.rank(cand.output[0]) != r:
                continue
            c0 = np.asarray(O.const(oc), np.float64)
            c0f = _full(c0, r)
            if c0f is None or any(x != 1 for k, x in enumerate(c0f.shape) if k != q.axis) or c0f.shape[q.axis] not in (1, d):
                continue
            c0v = vec(c0f.reshape(-1), d)
            if cand.op_type == "Div":
                if np.any(c0v == 0):
                    continue
                c0v = 1.0 / c0v
            if np.any(c0v == 0):
                continue
            a = (np.ones(d) if q.a is None else vec(q.a, d)) * c / c0v
            t = None if q.t is None else vec(q.t, d) * c
            err = np.asarray(q.err, np.float64) * abs(c)
            out.append(simplify(Rel(cand.output[0], q.axis, q.centered, a, t, err, kind="comp", how="compressed scale"),
                                eps_of(O.elem(cand.output[0]))))
    return _order(out)


def _order(rs):
    """Plain forms first (no scale, no shift), at most six."""
    return sorted(rs, key=lambda q: (q.a is not None) + (q.t is not None))[:6]


def ins_name(node, k):
    return node.input[k]


def _crms(prover, O, P, node, in_rels):
    """x_c / rms (or x_c * irms), the statistic of the same F = P(u) (or a zero-mean u)."""
    op = node.op_type
    pairs = []
    if op == "Div":
        pairs = [(q, s) for q in _comps(in_rels[0]) for s in _comps(in_rels[1], "cstat", ("rms",)) if fkey(q) == fkey(s)]
    else:
        for i in (0, 1):
            pairs += [(q, s) for q in _comps(in_rels[i]) for s in _comps(in_rels[1 - i], "cstat", ("irms",)) if fkey(q) == fkey(s)]
    for q, s in pairs:
        if q.a is not None or q.t is not None:
            continue
        r = O.rank(q.u)
        if r is None or q.axis != r - 1:
            continue
        base = Rel(q.u, q.axis, True) if q.centered else Rel(q.u)
        if not q.centered and not O.is_zero_mean(q.u, q.axis):
            continue
        e, tol = s.stat[1], s.stat[2]
        got = norm_rels(prover, O, [base], np.ones(1), None, e, "rms", _where(node), eps_tol=tol)
        out = []
        for g in got:
            if g.kind not in ("rel", "sub") or g.centered or g.axis != r - 1:
                continue
            # F = a y + t (a run-time beta r: a (y - r) + t) is LN(u) without its affine: zero-mean
            # along the axis
            if g.kind == "sub":
                out.append(Rel(g.u, g.axis, False, g.a, g.t, g.err, kind="csub", how="CRMSNorm, run-time beta",
                               stat=tuple(g.stat)))
            else:
                out.append(Rel(g.u, g.axis, False, g.a, g.t, g.err, kind="comp", how="CRMSNorm"))
        if out:
            prover.stats.norms_converted += 1
            return out
    return None


def _decompress(prover, O, P, node, in_rels):
    """Concat(C(F), -sum C(F)) along the axis: F itself."""
    if in_rels[0] in (None, "const") or in_rels[1] in (None, "const"):
        return None
    ax = int(P.attrs(node).get("axis", 0))
    out = []
    for q in _comps(in_rels[0]):
        r = O.rank(q.u)
        if r is None or ax % r != q.axis:
            continue
        for s in _comps(in_rels[1], "cstat", ("last",)):
            if fkey(s) == fkey(q):
                out.append(simplify(Rel(q.u, q.axis, q.centered, q.a, q.t, q.err, how="decompressed"), eps_of(O.elem(q.u))))
    for q in _comps(in_rels[0], "csub"):  # F = a (u - r) + t: the run-time beta's relation
        r = O.rank(q.u)
        if r is None or ax % r != q.axis or q.centered:
            continue
        for s in _comps(in_rels[1], "csubstat", ("last",)):
            if fkey(s) == fkey(q) and s.stat[1] == q.stat[0]:
                out.append(simplify(Rel(q.u, q.axis, False, q.a, q.t, q.err, kind="sub", how="decompressed, run-time beta",
                                        stat=(q.stat[0],)), eps_of(O.elem(q.u))))
    return out or None


# ============================================================================ Expand of a centered constant


def rule_expand_const(prover, O, P, node, in_rels):
    """Expand(c', shape) where the original has Expand(c, shape) with the same (equal) shape
    value: a cls token, say, centered along its last axis (c' = center(c)) or also compressed
    to its first d-1 channels (c' = C(center(c))). The output is centered (compressed) along
    its last axis; the channel must not be broadcast (c's last dim is the output's)."""
    from .prover import _weights_close
    from .relations import center

    if len(node.input) != 2 or in_rels[0] != "const" or in_rels[1] in (None, "const"):
        raise _Skip("not an Expand of a constant by a computed shape")
    c = P.const(node.input[0])
    if c is None or np.ndim(c) < 1 or np.asarray(c).dtype.kind != "f":
        raise _Skip("not an Expand of a float constant")
    c = np.asarray(c)
    out = []
    for w, q in prover._rels_on(O, in_rels[1], keep=lambda r: r.eq):
        for cand, slot in O.consumers.get(w, ()):
            if cand.op_type != "Expand" or slot != 1 or not O.is_const(cand.input[0]):
                continue
            c0 = O.const(cand.input[0])
            y = cand.output[0]
            ry, sy = O.rank(y), O.shape(y)
            if c0 is None or np.ndim(c0) != c.ndim or ry is None or sy is None:
                continue
            c0 = np.asarray(c0, np.float64)
            d = c0.shape[-1]
            if d < 2 or sy[-1] != d or c.shape[:-1] != c0.shape[:-1]:
                continue
            exp = center(c0, c0.ndim - 1)
            comp = c.shape[-1] == d - 1
            if not comp and c.shape[-1] != d:
                continue
            scale = np.abs(c0)
            if comp:
                exp, scale = exp[..., :-1], scale[..., :-1]
            prover.stats.weights_checked += 1
            if _weights_close(np.asarray(c, np.float64), exp, eps_of(P.elem(node.input[0])), scale, tiny_of(P.elem(node.input[0]))):
                out.append(Rel(y, ry - 1, True, kind="comp" if comp else "rel", how="centered constant expanded"))
                prover.stats.centered_writers += 1
    if not out:
        raise _Skip("the constant is not the original's expanded constant, centered")
    return out
