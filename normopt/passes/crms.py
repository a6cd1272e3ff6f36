"""crms (opt-in): compress zero-mean residual streams from d to d-1 (Pre-CRMSNorm, arXiv 2305.14858).

Identity (normopt-math.md section 1). For a zero-mean x in R^d, x_d = -sum_{i<d} x_i, so the
stream can be carried as x_c = x[:d-1]. With s = sum x_c:

    RMSNorm(x) = x / sqrt(mean(x^2) + eps),   mean(x^2) = (sum x_c^2 + s^2) / d
    CRMSNorm(x_c) = x_c / sqrt((sum x_c^2 + s^2) / d + eps)      (the first d-1 outputs)

Writers keep W[:, :d-1], b[:d-1], E[:, :d-1] (Gemm and Conv on their output channel axis). A
reader RMSNorm(x) * gamma (+ beta) feeding y W + c becomes CRMSNorm(x_c) feeding W_c, with
W' = diag(gamma) W and W_c = W'[:d-1, :] - W'[d-1, :], c' = c + beta W: the last normalized
value is -sum of the others. A reader whose output goes anywhere but such a linear op is
decompressed to d values: [n_c, -sum n_c] * gamma + beta.

Preconditions, per stream (a failed one is declined with its reason):
  - the stream was proved zero-mean by ln_to_rms, and is zero-mean as it stands (its writers
    are centered, or x - ReduceMean(x));
  - every stream value is read only by the stream's RMS norms and by ops whose output is a
    stream value (residual Adds, layout ops); no Shape/Size reads it (compression changes the
    shape), no graph output exposes it;
  - Reshape/Expand shape constants on the stream give d explicitly (rewritten to d-1) or -1/0;
  - readers are single RMS ops (SimplifiedLayerNormalization or RMSNormalization), not the
    decomposed form.
Width d-1 can misalign GEMMs: the pass is opt-in (`optimize --crms`), which keeps it only where
it measured faster.
"""

from __future__ import annotations

import numpy as np

from .. import graph as G
from .. import weights as W
from ..axes import per_axis
from ..norms import LayerNormMatch
from ..pipeline import Analysis, Decline, Pass, mark_changed
from ..axes import AxisError
from .ln_to_rms import ZERO_MEAN_READERS, _Closure, _linear_readers, writer_weights

RMS_OPS = ("SimplifiedLayerNormalization", "RMSNormalization")


def _rms_match(node) -> LayerNormMatch:
    x = node.inputs[0]
    r = G.rank(x)
    axis = int(node.attrs.get("axis", -1))
    axes = (G.normalize_axis(axis, r),) if r is not None else None
    return LayerNormMatch(kind=node.op, name=node.name, x=x, y=node.outputs[0], axes=axes, rank=r,
                          epsilon=float(node.attrs.get("epsilon", 1e-5)), gamma=node.inputs[1], nodes=[node], readers=[node])


def _slice_last(values, axis, d):
    idx = [slice(None)] * values.ndim
    idx[axis] = slice(0, d - 1)
    return values[tuple(idx)]


class CompressRMSStreams(Pass):
    name = "crms"
    description = "opt-in: carry zero-mean streams in d-1 channels and read them with CRMSNorm (Pre-CRMSNorm)"
    opt_in = True

    def analyze(self, graph, ctx):
        a = Analysis()
        names = ctx.state.get(ZERO_MEAN_READERS, set())
        rms = [_rms_match(n) for n in graph.nodes if n.op in RMS_OPS and n.name in names]
        by_reader = {id(m.nodes[0]): m for m in rms}
        done = set()
        tensors = graph.tensors() if rms else {}  # once per analysis (not per stream)
        for seed in rms:
            if id(seed) in done:
                continue
            closure = _Closure(graph, by_reader, seed)
            try:
                s = closure.run()
                for m in s.lns:
                    done.add(id(m))
                reason = self._check(graph, s, tensors)
            except AxisError as exc:
                reason = str(exc)
                s = None
            except Exception as exc:  # an analysis bug must never produce a rewrite
                reason = f"analysis error: {type(exc).__name__}: {exc}"
                s = None
            if reason:
                for m in (s.lns if s else [seed]):
                    done.add(id(m))
                    a.declined.append(Decline(m.name, m.kind, f"not compressed: {reason}"))
                continue
            a.matches.append(s)
        return a

    def _check(self, graph, s, tensors=None):
        if s.centerings or s.layerscales:
            return "the stream is not zero-mean as it stands (it would need new centering)"
        for m in s.lns:
            gv = G.const_value(m.gamma) if m.gamma is not None else None
            if gv is None or per_axis(gv, m.x) is None or (gv.size > 1 and per_axis(gv, m.x)[0] != G.rank(m.x) - 1):
                return f"the scale of {m.kind} '{m.name}' is not a constant per-channel vector (it is folded into weights)"
        axes = set(s.values.values())
        tensors = tensors if tensors is not None else graph.tensors()
        norm_nodes = {id(n) for m in s.lns for n in m.nodes}
        d = None
        for name in s.values:
            t = tensors[name]
            if G.rank(t) is None:
                return f"rank of '{name}' unknown"
            dim = G.static_dim(t, s.values[name])
            if dim is None:
                return f"width of '{name}' unknown"
            d = dim if d is None else d
            if dim != d:
                return "stream values of different widths"
            for c in G.consumers(t):
                if c.op in ("Shape", "Size"):
                    return f"'{name}' is read by {c.op} '{c.name}' (compression changes the shape)"
                # every other reader is one of the stream's norms or carries the stream on (a
                # residual Add, a layout op): a mean-invariant reader that ln_to_rms accepts (an
                # existing x - mean(x)) would read d-1 channels as if they were d
                if id(c) not in norm_nodes and not any(o.name in s.values for o in c.outputs):
                    return f"'{name}' is read by {c.op} '{c.name}', which would see d-1 channels"
            p = G.producer(t)
            if p is not None and p.op in ("Reshape", "Expand") and len(p.inputs) > 1:
                shp = G.const_value(p.inputs[1])
                if shp is None:
                    return f"{p.op} '{p.name}' on the stream has a computed shape"
                ax = s.values[name]
                if p.op == "Reshape" and int(shp[ax]) not in (d, -1, 0) or p.op == "Expand" and int(shp[ax - (len(G.shape(t)) - len(shp))]) not in (d, 1):
                    return f"{p.op} '{p.name}' on the stream has an unexpected shape"
        if d is None or d < 2 or not axes:
            return "empty stream"
        s.width = d
        return None

    def apply(self, graph, matches, ctx):
        namer = G.Namer(graph)
        n = 0
        for s in matches:
            d = s.width
            cache = {}

            def sliced(tensor, axis):
                key = (tensor.name, axis)
                if key not in cache:
                    v = G.const_value(tensor)
                    cache[key] = G.new_const(namer, f"{tensor.name}_crms", np.ascontiguousarray(_slice_last(v, axis, d)))
                return cache[key]

            mark_changed(ctx, *s.values)
            # writers keep d-1 channels
            for node, idx, axis in writer_weights(s):
                node.inputs[idx] = sliced(node.inputs[idx], axis)
            for node, idx, axis in s.constants:
                v = G.const_value(node.inputs[idx])
                if axis is not None and v.shape[axis] == d:
                    node.inputs[idx] = sliced(node.inputs[idx], axis)
            for sub in s.centered:
                out = sub.outputs[0]
                ax = s.values[out.name]
                full = G.new_var(namer, f"{out.name}_full", out.dtype)
                sub.outputs[0] = full
                self._slice_node(graph, namer, full, out, ax, d)
            # shape constants on the stream
            tensors = graph.tensors()
            for name, ax in s.values.items():
                p = G.producer(tensors[name])
                if p is not None and p.op in ("Reshape", "Expand") and len(p.inputs) > 1:
                    shp = np.array(G.const_value(p.inputs[1]))
                    k = ax if p.op == "Reshape" else ax - (G.rank(tensors[name]) - len(shp))
                    if int(shp[k]) == d:
                        shp[k] = d - 1
                        p.inputs[1] = G.new_const(namer, f"{p.inputs[1].name}_crms", shp)
            # readers: CRMSNorm, then fold gamma/beta into linear consumers or decompress
            for m in s.lns:
                self._reader(graph, namer, m, d)
                n += 1
        return n

    @staticmethod
    def _slice_node(graph, namer, x, out, axis, d):
        ints = lambda v: G.new_const(namer, "crms_i", np.asarray(v, np.int64))  # noqa: E731
        G.add_node(graph, namer, "Slice", [x, ints([0]), ints([d - 1]), ints([axis])], [out], base="crms_slice")

    def _reader(self, graph, namer, m, d):
        node = m.nodes[0]
        x, y = node.inputs[0], node.outputs[0]
        gamma = np.broadcast_to(G.f64(G.const_value(m.gamma)).reshape(-1), (d,)).copy()
        dtype = G.tensor_dtype(x) or np.float32
        node.inputs.clear()
        node.outputs.clear()

        def c(v, base):
            return G.new_const(namer, base, np.asarray(v, dtype=dtype))

        ax = G.new_const(namer, "crms_axes", np.asarray([-1], np.int64))
        v = lambda base: G.new_var(namer, f"{m.name}_{base}", dtype)  # noqa: E731
        sq, s1, s, s2, tot, ms, mse, r, ncomp = (v(b) for b in ("sq", "sumsq", "sum", "sum2", "tot", "ms", "mse", "rms", "crms"))
        G.add_node(graph, namer, "Mul", [x, x], [sq])
        G.add_node(graph, namer, "ReduceSum", [sq, ax], [s1], {"keepdims": 1})
        G.add_node(graph, namer, "ReduceSum", [x, ax], [s], {"keepdims": 1})
        G.add_node(graph, namer, "Mul", [s, s], [s2])
        G.add_node(graph, namer, "Add", [s1, s2], [tot])
        G.add_node(graph, namer, "Mul", [tot, c(1.0 / d, "crms_inv_d")], [ms])
        G.add_node(graph, namer, "Add", [ms, c(m.epsilon, "crms_eps")], [mse])
        G.add_node(graph, namer, "Sqrt", [mse], [r])
        G.add_node(graph, namer, "Div", [x, r], [ncomp], base=f"{m.name}_crms")
        # the reader's output: y = RMS(x) * gamma, maybe followed by a beta Add
        beta, out = None, y
        cons = G.consumers(y)
        if len(cons) == 1 and cons[0].op == "Add" and not G.is_graph_output(graph, y):
            other = cons[0].inputs[1] if cons[0].inputs[0] is y else cons[0].inputs[0]
            bv = G.const_value(other)
            pa = per_axis(bv, y) if bv is not None else None
            if pa is not None and pa[0] == G.rank(y) - 1 and bv.size == d:
                beta, out = G.f64(bv).reshape(-1), cons[0].outputs[0]
                cons[0].inputs.clear()
                cons[0].outputs.clear()
        readers = _linear_readers(graph, out)
        if readers:
            self._fold_into_readers(graph, namer, readers, gamma, beta, d)
            G.replace_uses(out, ncomp)
            self._reshapes_to(graph, namer, ncomp, d)
        else:  # decompress: [n_c, -sum n_c] * gamma (+ beta) into the original output tensor
            neg, last, full, scaled = v("neg"), v("last"), v("full"), v("scaled")
            G.add_node(graph, namer, "ReduceSum", [ncomp, ax], [last], {"keepdims": 1})
            G.add_node(graph, namer, "Neg", [last], [neg])
            G.add_node(graph, namer, "Concat", [ncomp, neg], [full], {"axis": -1})
            if beta is None:
                G.add_node(graph, namer, "Mul", [full, c(gamma, "crms_gamma")], [out])
            else:
                G.add_node(graph, namer, "Mul", [full, c(gamma, "crms_gamma")], [scaled])
                G.add_node(graph, namer, "Add", [scaled, c(beta, "crms_beta")], [out])

    @staticmethod
    def _fold_into_readers(graph, namer, readers, gamma, beta, d):
        """W' = diag(gamma) W; W_c = W'[:d-1] - W'[d-1]; bias += beta W."""
        for lin, bias_edge in readers:
            w_t = lin.inputs[1]
            like = G.const_value(w_t)
            trans_b = lin.op == "Gemm" and int(lin.attrs.get("transB", 0))
            if trans_b:  # like is [k, d]: column c of W' is gamma_c W[:, c]; W_c[:, c] = W'[:, c] - W'[:, d-1]
                last = gamma[d - 1] * G.f64(like[:, d - 1:d])
                wc = W.blockwise(like, lambda b, rows: b[:, : d - 1] * gamma[None, : d - 1] - last[rows])
            else:  # like is [d, k]: W_c = (gamma W)[:d-1] - (gamma W)[d-1]
                last = gamma[d - 1] * G.f64(like[d - 1])
                wc = W.blockwise(like[: d - 1], lambda b, rows: b * gamma[rows, None] - last[None, :])
            lin.inputs[1] = G.new_const(namer, f"{w_t.name}_crms", wc)
            if beta is None:
                continue
            shift = W.matvec(like, beta) if trans_b else W.vecmat(beta, like)
            if lin.op == "MatMul":
                add, bi = bias_edge
                bv = G.const_value(add.inputs[bi])
                add.inputs[bi] = G.new_const(namer, f"{add.inputs[bi].name}_crms", G.cast_like(G.f64(bv) + shift, bv))
            else:
                alpha, beta_g = float(lin.attrs.get("alpha", 1.0)), float(lin.attrs.get("beta", 1.0))
                has_c = len(lin.inputs) > 2 and lin.inputs[2].name
                if has_c and beta_g != 0.0:
                    cv = G.const_value(lin.inputs[2])
                    lin.inputs[2] = G.new_const(namer, f"{lin.inputs[2].name}_crms", G.cast_like(G.f64(cv) + alpha * shift / beta_g, cv))
                else:
                    lin.attrs["beta"] = 1.0
                    cc = G.new_const(namer, f"{lin.name}_C_crms", G.cast_like(alpha * shift, like))
                    if has_c:
                        lin.inputs[2] = cc
                    else:
                        lin.inputs.append(cc)

    @staticmethod
    def _reshapes_to(graph, namer, t, d):
        """Reshapes between a compressed reader output and its linear readers: last dim d -> d-1
        (iterative: no recursion depth tied to the graph's)."""
        stack = [t]
        while stack:
            t = stack.pop()
            for c in G.consumers(t):
                if c.op == "Reshape" and c.inputs[0] is t:
                    shp = np.array(G.const_value(c.inputs[1]))
                    if shp is not None and shp.size and int(shp[-1]) == d:
                        shp[-1] = d - 1
                        c.inputs[1] = G.new_const(namer, f"{c.inputs[1].name}_crms", shp)
                    stack.append(c.outputs[0])
