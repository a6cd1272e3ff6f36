"""ln_to_rms: fold the redundant mean of Pre-LN transformers (Pre-RMSNorm, arXiv 2305.14858).

Identity (normopt-math.md section 1)::

    LN(x) = RMSNorm(x - mean(x))        (same eps)
    LN(x + c*1) = LN(x)                 for any per-token scalar c

So if every value written into a residual stream is zero-mean along d, every LayerNorm that
reads the stream computes the same as an RMSNorm with the same gamma, beta and epsilon.

How the pass proves it (two phases, like TVM's FoldScaleAxis):

1. *Demand* flows backward from each LN's input: "this tensor must be zero-mean along axis a".
   It passes through residual Adds (both operands), and through ops that commute with
   per-token centering (Transpose, Reshape/Squeeze/Unsqueeze/Flatten that keep the axis,
   Gather/Slice/Concat/Expand/Tile along other axes, Reduce over other axes, Mul/Div by a
   per-token value, and exact widening float Casts only: a narrowing Cast rounds, so
   Cast(x - m) != Cast(x) - m). It ends at a *writer*, centered along a:
     - a constant (position embedding, cls token, bias): subtract its mean over a;
     - a Gather from a constant table (token/position embeddings): center every row;
     - MatMul with a constant [k, d] weight: W <- W - mean over the output axis;
     - Gemm: B centered along its output axis (transB honoured), C via its own demand;
       alpha and beta are scalars, so they commute with centering;
     - Conv (group 1) on the channel axis: W and B centered over output channels;
     - LayerScale Mul(linear, s) with s per-channel: s is folded into the linear first;
     - anything else (GELU front end, a LayerNorm output, a graph input): one explicit
       centering x - ReduceMean(x) is inserted, and only mean-invariant readers use it.
2. *Changed* flows forward from every tensor whose value changes: each reader must be
   mean-invariant: an LN over exactly the last axis (it becomes an RMSNorm), a residual Add
   (its other operand is then demanded), or a commuting op (its output is checked in turn).
   A graph output, a Post-LN sum read by attention, a classifier on the raw stream, or any
   other reader makes the stream non-equivalent: the whole stream is left alone, with a reason.

An existing x - ReduceMean(x) reads x as one mean-invariant unit only while its mean has no
other observer (no other reader, not a graph output: the mean changes when x is centered).
The demand and the forward check are one work loop (a stack and a queue), never recursion.

Preconditions, per stream (a connected set of LNs, writers and readers):
  - every reader of every changed value is mean-invariant (phase 2);
  - every writer is centerable (phase 1) and every axis is tracked through static shapes;
  - an LN converts only when it normalizes exactly the last axis and its mean/inv-std
    outputs are unread (no reader, not a graph output: graph.is_read);
  - explicit centerings cost one mean each; the stream converts only if it removes more LN
    means than the centerings it adds.
Initializers are never edited in place: every centered weight is a new tensor (a tied table,
such as GPT-2's token embedding read by lm_head, keeps its original for the other readers).
Weight math is done in float64 and cast back to the model's dtype.

Emission (``ctx.target``): ``ort`` gives SimplifiedLayerNormalization (ONNX domain, ORT
contrib); ``onnx`` gives RMSNormalization at opset >= 23, else the decomposed form
Pow/ReduceMean/Add/Sqrt/Div/Mul that ORT's SimplifiedLayerNormFusion recognizes. beta is
folded into the consumers' biases when every consumer is a linear op with constant weights
and a bias (so an op is removed); otherwise it stays as an Add.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from .. import graph as G
from .. import weights as W
from ..axes import AxisError as _Fail  # a stream that cannot convert (an untraceable axis is one)
from ..axes import backward_axis as _backward_axis, broadcast_axis as _broadcast_axis
from ..axes import VALUE_INDEPENDENT, forward_axis as _forward_axis, keeps_shape as _keeps_shape, reshape_map as _reshape_map
from ..norms import LayerNormMatch, find_layernorms
from ..pipeline import Analysis, Decline, Pass, mark_changed, tuning_shape

ZERO_MEAN_READERS = "zero_mean_readers"  # ctx.state key: RMS nodes that read a proved zero-mean stream

# ---------------------------------------------------------------------------------------------
# analysis results


@dataclass(eq=False)
class Stream:
    """One connected residual stream and everything needed to make it zero-mean."""

    lns: list = field(default_factory=list)  # LayerNormMatch to convert
    constants: list = field(default_factory=list)  # (node, input index, axis or None)
    tables: list = field(default_factory=list)  # Gather nodes (axis 0, rows centered on last axis)
    linears: list = field(default_factory=list)  # (node, kind)
    layerscales: list = field(default_factory=list)  # (mul node, s input index, linear node, bias edge or None)
    centerings: dict = field(default_factory=dict)  # tensor name -> (tensor, axis, [(node, idx)])
    centered: list = field(default_factory=list)  # Sub nodes x - ReduceMean(x) already in the graph
    values: dict = field(default_factory=dict)  # tensor name -> axis (values made zero-mean)

    def describe(self) -> str:
        names = ", ".join(m.name for m in self.lns[:4]) + (" ..." if len(self.lns) > 4 else "")
        return (
            f"stream: {len(self.lns)} LN -> RMSNorm [{names}]; centered {len(self.tables)} tables, "
            f"{len(self.linears)} linear writers, {len(self.constants)} constants, "
            f"{len(self.layerscales)} LayerScales folded, {len(self.centerings)} explicit centerings"
        )


QUANTIZED_OPS = {
    "MatMulInteger", "QLinearMatMul", "MatMulNBits", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm",
    "QLinearConv", "ConvInteger", "QAttention", "QOrderedMatMul", "MatMulFpQ4", "MatMulBnb4", "GatherBlockQuantized",
    "DequantizeLinear", "DynamicQuantizeLSTM", "QLinearAdd", "QLinearMul",
}


def quantized_writer(t, depth=6):
    """The quantized op that writes t, if any: t is (through Cast and Add/Mul by constants, such
    as the scale and bias after MatMulInteger) the output of an integer or n-bit op, or of a
    float MatMul/Gemm/Conv whose weight is DequantizeLinear of a constant (QDQ)."""
    for _ in range(depth):
        p = G.producer(t)
        if p is None:
            return None
        if p.op in QUANTIZED_OPS:
            return p
        if p.op in ("MatMul", "Gemm", "Conv") and len(p.inputs) > 1:
            wp = G.producer(p.inputs[1])
            return p if wp is not None and wp.op == "DequantizeLinear" else None
        if p.op in ("Cast", "Identity") or (p.op in ("Add", "Mul") and len(p.inputs) == 2):
            ins = [i for i in p.inputs if G.const_value(i) is None]
            if len(ins) == 1:
                t = ins[0]
                continue
            if p.op == "Mul" and len(ins) == 2:  # MatMulInteger's output times its dynamic scale
                found = [quantized_writer(i, depth - 1) for i in ins]
                return next((f for f in found if f is not None), None)
        return None
    return None


def _centering_unit(graph, c, t, a) -> bool:
    """c is part of an existing centering of t along a: the Sub(t, ReduceMean(t)) itself, or a
    ReduceMean(t) whose every reader is such a Sub and that is no graph output (its value
    changes when t does). The pair reads t as one unit."""
    if c.op == "Sub" and len(c.inputs) == 2 and c.inputs[0] is t:
        return _is_centering(c, a)
    if c.op == "ReduceMean" and c.inputs and c.inputs[0] is t:
        if G.is_graph_output(graph, c.outputs[0]):
            return False  # the mean itself is observed: it is not internal to the centering
        readers = G.consumers(c.outputs[0])
        return bool(readers) and all(r.op == "Sub" and r.inputs[0] is t and r.inputs[1] is c.outputs[0] and _is_centering(r, a)
                                     for r in readers)
    return False


def _is_centering(node, a) -> bool:
    """Sub(x, ReduceMean(x, axes=[a], keepdims=1))."""
    if node.op != "Sub" or len(node.inputs) != 2:
        return False
    m = G.producer(node.inputs[1])
    if m is None or m.op != "ReduceMean" or m.inputs[0] is not node.inputs[0]:
        return False
    axes, keep = G.reduce_axes(m, G.rank(node.inputs[0]))
    return bool(keep) and axes == (a,)


class _Closure:
    def __init__(self, graph, ln_by_reader, seed: LayerNormMatch):
        self.graph = graph
        self.ln_by_reader = ln_by_reader
        self.s = Stream()
        self.ln_ids = set()  # ids of self.s.lns
        self.removed = set()  # ids of nodes that the rewrite removes (LayerScale Muls)
        self.work = collections.deque()
        self.pending = []  # demands not yet followed (a stack: no recursion depth tied to graph depth)
        self.seed = seed

    # -- phase 1: demand ---------------------------------------------------------------------
    def demand(self, t, a, edge):
        """t must be zero-mean along a (followed later, by run's loop)."""
        self.pending.append((t, a, edge))

    def _demand(self, t, a, edge):
        if t.name in self.s.values:
            if self.s.values[t.name] != a:
                raise _Fail(f"'{t.name}' would need centering along two axes")
            return
        if t.name in self.s.centerings:
            if self.s.centerings[t.name][1] != a:
                raise _Fail(f"'{t.name}' would need centering along two axes")
            if edge:
                self.s.centerings[t.name][2].append(edge)
            return
        if G.const_value(t) is not None:
            if edge is None:
                raise _Fail(f"'{t.name}' is a constant read directly by a LayerNorm")
            self.s.constants.append((edge[0], edge[1], a))
            return
        p = G.producer(t)
        if p is None:
            return self.center(t, a, edge)
        if _is_centering(p, a):  # already x - ReduceMean(x) along a: zero-mean as it stands
            self.s.centered.append(p)
            self.mark(t, a)
            return
        op = p.op
        if op in ("Add", "Sub") and len(p.inputs) == 2:
            self.mark(t, a)
            for i, inp in reversed(list(enumerate(p.inputs))):  # a stack: input 0 is followed first
                ai = _broadcast_axis(inp, t, a)
                if ai is None or ai == -1:
                    if G.const_value(inp) is None:
                        raise _Fail(f"'{p.name}' adds a non-constant per-token value '{inp.name}' to the stream")
                    self.s.constants.append((p, i, None))
                else:
                    self.demand(inp, ai, (p, i))
            return
        back = _backward_axis(p, a)
        if back is not None:
            self.mark(t, a)
            for i, ai in reversed(back):
                self.demand(p.inputs[i], ai, (p, i))
            return
        if op == "Gather" and G.const_value(p.inputs[0]) is not None and G.rank(t) is not None:
            table = G.const_value(p.inputs[0])
            if int(p.attrs.get("axis", 0)) == 0 and table.ndim == 2 and a == G.rank(t) - 1 and self._invariant(t, a):
                self.s.tables.append(p)
                self.mark(t, a)
                return
        kind = self._linear_kind(p, t, a)
        if kind and self._invariant(t, a) and self._add_linear(p, kind, t, a):
            self.mark(t, a)
            return
        if op == "Mul" and self._layerscale(p, t, a):
            return
        q = quantized_writer(t)
        if q is not None:
            raise _Fail(f"stream writer {q.op} '{q.name}' computes with quantized weights: centering them is not exact "
                        "(run normopt before quantizing)")
        return self.center(t, a, edge)

    def mark(self, t, a):
        self.s.values[t.name] = a
        self.work.append((t, a))

    def center(self, t, a, edge):
        r = G.rank(t)
        if r is None:
            raise _Fail(f"rank of writer '{t.name}' unknown")
        self.s.centerings[t.name] = (t, a, [edge] if edge else [])
        # readers of the centered value that are mean-invariant read it too (CLIP's first LN);
        # an existing centering of t stays whole on t (redirecting half of it is x - 2 mean)
        for c in G.consumers(t):
            if edge and c is edge[0]:
                continue
            if self._unit(c, t, a):
                continue
            if self._reader_ok(c, t, a):
                for i, inp in enumerate(c.inputs):
                    if inp is t:
                        self.s.centerings[t.name][2].append((c, i))
                self._changed_reader(c, t, a)

    def _add_linear(self, p, kind, t, a) -> bool:
        """Record a linear writer; its additive constant (Gemm C, Conv B) is centered too."""
        if len(p.inputs) > 2 and p.inputs[2].name:
            c = p.inputs[2]
            if G.const_value(c) is None:
                return False
            if kind == "Gemm":
                ai = _broadcast_axis(c, t, a)
                self.s.constants.append((p, 2, None if ai in (None, -1) else ai))
            elif kind == "Conv":
                self.s.constants.append((p, 2, 0))
        self.s.linears.append((p, kind))
        return True

    def _linear_kind(self, p, t, a):
        r = G.rank(t)
        if p.op == "MatMul" and p.inputs[1] is not None:
            w = G.const_value(p.inputs[1])
            if w is not None and w.ndim == 2 and r is not None and a == r - 1 and G.const_value(p.inputs[0]) is None:
                return "MatMul"
        if p.op == "Gemm" and a == 1:
            b = G.const_value(p.inputs[1])
            if b is not None and b.ndim == 2:
                return "Gemm"
        if p.op == "Conv" and a == 1 and int(p.attrs.get("group", 1)) == 1:
            w = G.const_value(p.inputs[1])
            if w is not None:
                return "Conv"
        return None

    def _layerscale(self, mul, t, a) -> bool:
        """Mul(u, s) with s per-channel along a and u = linear(+bias) read only by the Mul."""
        for si in (0, 1):
            s, u = mul.inputs[si], mul.inputs[1 - si]
            sv = G.const_value(s)
            if sv is None or G.const_value(u) is not None:
                continue
            ai = _broadcast_axis(s, t, a)
            if ai in (None, -1) or sum(1 for d in sv.shape if d != 1) > 1 or not _keeps_shape(sv.shape, u):
                continue  # s must be one vector along a that leaves u's shape (and rank) as it is
            if len(G.consumers(u)) != 1 or G.is_graph_output(self.graph, u):
                continue
            p = G.producer(u)
            bias_edge = None
            lin = p
            if p is not None and p.op == "Add":
                for bi in (0, 1):
                    if G.const_value(p.inputs[bi]) is not None and G.const_value(p.inputs[1 - bi]) is None:
                        lin = G.producer(p.inputs[1 - bi])
                        bias_edge = (p, bi)
                        mid = p.inputs[1 - bi]  # the linear's own output changes too
                        if len(G.consumers(mid)) != 1 or G.is_graph_output(self.graph, mid):
                            lin = None
                        break
                else:
                    lin = None
            kind = None if lin is None else self._linear_kind(lin, lin.outputs[0], a)
            if kind is None or not self._add_linear(lin, kind, lin.outputs[0], a):
                continue
            self.s.layerscales.append((mul, si, lin, bias_edge))
            self.removed.add(id(mul))
            self.mark(t, a)
            # after folding, u carries t's value (the Mul is removed); u's readers are internal
            self.s.values[u.name] = a
            if bias_edge is not None:
                ai = _broadcast_axis(p.inputs[bias_edge[1]], u, a)
                self.s.constants.append((bias_edge[0], bias_edge[1], None if ai in (None, -1) else ai))
                self.s.values[lin.outputs[0].name] = a
            return True
        return False

    # -- phase 2: every reader of a changed value must be mean-invariant ---------------------
    def _reader_ok(self, c, t, a) -> bool:
        if id(c) in self.removed or c.op in VALUE_INDEPENDENT:
            return True
        ln = self.ln_by_reader.get(id(c))
        if ln is not None and ln.x is t:
            return ln.over_last_axis() and a == ln.rank - 1 and not ln.extra_outputs_used
        if self._unit(c, t, a):
            return True  # t - mean(t) is the same for t + c: its output does not change
        if c.op in ("Add",) and len(c.inputs) == 2:
            return True
        if c.op == "Sub" and len(c.inputs) == 2:
            return True
        try:
            return _forward_axis(c, t, a) is not None
        except Exception:
            return False

    def _invariant(self, t, a) -> bool:
        """Shallow check: may t's value change (every reader is mean-invariant)?"""
        if G.is_graph_output(self.graph, t):
            return False
        return all(self._reader_ok(c, t, a) for c in G.consumers(t))

    def _unit(self, c, t, a) -> bool:
        """c is part of an existing centering of t that is not the start of a LayerNorm."""
        return id(c) not in self.ln_by_reader and _centering_unit(self.graph, c, t, a)

    def _changed_reader(self, c, t, a):
        if id(c) in self.removed or c.op in VALUE_INDEPENDENT or self._unit(c, t, a):
            return
        ln = self.ln_by_reader.get(id(c))
        if ln is not None and ln.x is t:
            if id(ln) not in self.ln_ids:  # a set: a list test would be quadratic in the LNs of a stream
                self.ln_ids.add(id(ln))
                self.s.lns.append(ln)
            return
        out = c.outputs[0]
        if c.op in ("Add", "Sub"):
            self.demand(out, a + (G.rank(out) - G.rank(t)), None)
            return
        b = _forward_axis(c, t, a)
        self.demand(out, b, None)

    def changed(self, t, a):
        if G.is_graph_output(self.graph, t):
            raise _Fail(f"stream value '{t.name}' is a graph output (the raw stream is exposed)")
        for c in G.consumers(t):
            if not self._reader_ok(c, t, a):
                ln = self.ln_by_reader.get(id(c))
                if ln is not None:
                    raise _Fail(f"stream value '{t.name}' is read by {ln.kind} '{ln.name}', which does not normalize exactly the last axis (or exposes its mean)")
                if c.op in ("QuantizeLinear", "DynamicQuantizeLinear"):
                    raise _Fail(f"stream value '{t.name}' is quantized by {c.op} '{c.name}': a quantized stream cannot be "
                                "centered exactly (run normopt before quantizing)")
                if c.op == "Cast":
                    raise _Fail(f"stream value '{t.name}' is read by Cast '{c.name}', which is not an exact widening float cast "
                                "(a narrowing cast rounds: Cast(x - m) != Cast(x) - m)")
                raise _Fail(f"stream value '{t.name}' is read by {c.op} '{c.name}', which is not invariant to the per-token mean")
            self._changed_reader(c, t, a)

    def run(self) -> Stream:
        self.demand(self.seed.x, self.seed.rank - 1, None)
        while self.pending or self.work:  # each value is marked once: linear in the stream's size
            if self.pending:
                self._demand(*self.pending.pop())
                continue
            t, a = self.work.popleft()
            self.changed(t, a)
        if id(self.seed) not in self.ln_ids:
            self.ln_ids.add(id(self.seed))
            self.s.lns.append(self.seed)
        return self.s


# ---------------------------------------------------------------------------------------------
# rewriting helpers


def writer_weights(s: Stream):
    """(node, input index, output-channel axis of that weight) for every table and linear
    writer of a stream: tables [rows, d] on axis 1; MatMul W [k, d] on 1; Gemm B on 0 with
    transB, else 1; Conv W [Cout, ...] on 0."""
    for g in s.tables:
        yield g, 0, 1
    for lin, kind in s.linears:
        if kind == "MatMul":
            yield lin, 1, 1
        elif kind == "Gemm":
            yield lin, 1, 0 if int(lin.attrs.get("transB", 0)) else 1
        else:
            yield lin, 1, 0


def _center(values: np.ndarray, axis) -> np.ndarray:
    """values minus their mean along axis (float64, block by block; cast back)."""
    return W.center(values, axis)


MARGIN = 0.05  # a tuned choice leaves its default only for a form measured at least 5% faster
RMS_FORMS = {"ort": ["SimplifiedLayerNormalization", "RMSNormalization", "decomposed"], "onnx": ["RMSNormalization", "decomposed"]}


def _rms_micro(form, shape, dtype, opset):
    from onnx import helper, numpy_helper

    et = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    d = shape[-1]
    inits = [numpy_helper.from_array(np.ones(d, dtype), "g")]
    if form == "decomposed":
        inits += [numpy_helper.from_array(np.asarray(2.0, dtype), "two"), numpy_helper.from_array(np.asarray(1e-5, dtype), "eps")]
        rm = (helper.make_node("ReduceMean", ["sq", "ax"], ["ms"], keepdims=1) if opset >= 18
              else helper.make_node("ReduceMean", ["sq"], ["ms"], axes=[-1], keepdims=1))
        if opset >= 18:
            inits.append(numpy_helper.from_array(np.asarray([-1], np.int64), "ax"))
        nodes = [helper.make_node("Pow", ["x", "two"], ["sq"]), rm, helper.make_node("Add", ["ms", "eps"], ["mse"]),
                 helper.make_node("Sqrt", ["mse"], ["r"]), helper.make_node("Div", ["x", "r"], ["n"]),
                 helper.make_node("Mul", ["n", "g"], ["y"])]
    else:
        nodes = [helper.make_node(form, ["x", "g"], ["y"], axis=-1, epsilon=1e-5)]
    g = helper.make_graph(nodes, "rms", [helper.make_tensor_value_info("x", et, shape)], [helper.make_tensor_value_info("y", et, shape)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=helper.find_min_ir_version_for([helper.make_opsetid("", opset)]))


def choose_rms_form(ctx, shape, dtype, opset):
    """The RMS form to emit: timed on the provider when ctx.tune (cached per shape), else the
    default (ort: SimplifiedLayerNormalization; onnx: RMSNormalization at opset >= 23, else
    decomposed)."""
    forms = [f for f in RMS_FORMS[ctx.target] if f != "RMSNormalization" or opset >= 23]
    if not ctx.tune or len(forms) == 1:
        return forms[0]
    key = ("rms_form", ctx.target, tuple(shape), str(np.dtype(dtype)), opset)
    if key not in ctx.state:
        from ..runtime_tests.micro import time_models

        ms = time_models([_rms_micro(f, shape, dtype, opset) for f in forms], {"x": shape}, dtype, ctx.provider, threads=ctx.threads)
        # leave the default (forms[0]) only for a form at least MARGIN faster: noise never flips it
        alt = int(np.argmin(ms[1:])) + 1
        best = forms[alt] if ms[alt] < (1 - MARGIN) * ms[0] else forms[0]
        ctx.state[key] = best
        ctx.notes.append(f"ln_to_rms: emits {best} at {list(shape)} {np.dtype(dtype)} (measured on {ctx.provider}: "
                         + ", ".join(f"{f} {t * 1000:.1f} us" for f, t in zip(forms, ms)) + ")")
    return ctx.state[key]


def _emit_rms(graph, namer, ln: LayerNormMatch, x, out, target, opset, form=None):
    """Emit RMSNorm(x) * gamma into tensor `out` (beta handled by the caller)."""
    dtype = G.tensor_dtype(x) or np.float32
    d = G.static_dim(x, -1)
    gamma = ln.gamma
    gv = G.const_value(gamma) if gamma is not None else None
    if ln.gamma_value is not None and (gamma is None or gv is None or gv.ndim != 1):
        gamma = G.new_const(namer, f"{ln.name}_gamma", np.broadcast_to(ln.gamma_value, (d,)).astype(dtype))  # computed gamma
    elif gamma is None:
        if d is None:
            raise _Fail("width unknown")
        gamma = G.new_const(namer, f"{ln.name}_gamma", np.ones(d, dtype=dtype))
    elif gv is not None and gv.ndim != 1:
        gamma = G.new_const(namer, f"{ln.name}_gamma", gv.reshape(-1))
    eps = float(ln.epsilon)
    form = form or ("SimplifiedLayerNormalization" if target == "ort" else ("RMSNormalization" if opset >= 23 else "decomposed"))
    if form == "SimplifiedLayerNormalization":
        return G.add_node(graph, namer, "SimplifiedLayerNormalization", [x, gamma], [out],
                          {"axis": -1, "epsilon": eps, "stash_type": 1}, base=f"{ln.name}_rms")
    elif form == "RMSNormalization":
        return G.add_node(graph, namer, "RMSNormalization", [x, gamma], [out],
                          {"axis": -1, "epsilon": eps, "stash_type": 1}, base=f"{ln.name}_rms")
    else:  # decomposed, in the form ORT's SimplifiedLayerNormFusion recognizes
        two = G.new_const(namer, "normopt_two", np.asarray(2.0, dtype=dtype))
        epsc = G.new_const(namer, "normopt_eps", np.asarray(eps, dtype=dtype))
        sq = G.new_var(namer, f"{ln.name}_sq", dtype)
        ms = G.new_var(namer, f"{ln.name}_ms", dtype)
        mse = G.new_var(namer, f"{ln.name}_mse", dtype)
        rms = G.new_var(namer, f"{ln.name}_rms", dtype)
        nrm = G.new_var(namer, f"{ln.name}_normed", dtype)
        G.add_node(graph, namer, "Pow", [x, two], [sq])
        G.reduce_mean_node(graph, namer, sq, ms, [-1], 1)
        G.add_node(graph, namer, "Add", [ms, epsc], [mse])
        G.add_node(graph, namer, "Sqrt", [mse], [rms])
        G.add_node(graph, namer, "Div", [x, rms], [nrm])
        G.add_node(graph, namer, "Mul", [nrm, gamma], [out])
    return None  # decomposed: not a single RMS node


def _linear_readers(graph, y):
    """Consumers of y, through Reshapes that keep the last axis, that can absorb a per-channel
    beta into a bias: [(linear node, bias edge)] or None if any consumer cannot."""
    found, stack, seen = [], [y], set()
    while stack:  # iterative: a long chain of Reshapes costs no recursion depth
        y = stack.pop()
        if id(y) in seen:
            continue
        seen.add(id(y))
        if G.is_graph_output(graph, y):
            return None
        for c in G.consumers(y):
            if not _linear_reader(graph, c, y, stack, found):
                return None
    return found


def _linear_reader(graph, c, y, stack, found) -> bool:
    """One consumer c of y for _linear_readers: a Reshape keeping the last axis (its output is
    pushed on the stack), or a linear op that absorbs beta (appended to found)."""
    r = G.rank(y)
    if c.op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze"):
        if r is None or c.inputs[0] is not y or _reshape_map(y, c.outputs[0], r - 1) != (G.rank(c.outputs[0]) or 0) - 1:
            return False
        stack.append(c.outputs[0])
        return True
    if c.op == "MatMul" and c.inputs[0] is y and G.const_value(c.inputs[1]) is not None and G.const_value(c.inputs[1]).ndim == 2:
        mo = c.outputs[0]
        cons = G.consumers(mo)
        if len(cons) == 1 and cons[0].op == "Add" and not G.is_graph_output(graph, mo):
            add = cons[0]
            bi = 1 if add.inputs[0] is mo else 0
            bv = G.const_value(add.inputs[bi])
            if bv is not None and bv.ndim <= 1:
                found.append((c, (add, bi)))
                return True
        return False
    if c.op == "Gemm" and c.inputs[0] is y and not int(c.attrs.get("transA", 0)) and G.const_value(c.inputs[1]) is not None:
        if len(c.inputs) > 2 and c.inputs[2].name and G.const_value(c.inputs[2]) is None:
            return False
        found.append((c, None))
        return True
    return False


def _fold_beta(graph, namer, beta_v, readers):
    """b' = b + beta . W for every linear reader (float64, new tensors)."""
    b64 = G.f64(beta_v).reshape(-1)
    for lin, bias_edge in readers:
        if lin.op == "MatMul":
            w = G.const_value(lin.inputs[1])
            add, bi = bias_edge
            bv = G.const_value(add.inputs[bi])
            nb = G.f64(bv).reshape(-1) + W.vecmat(b64, w)
            add.inputs[bi] = G.new_const(namer, f"{add.inputs[bi].name}_beta", G.cast_like(nb.reshape(bv.shape if bv.ndim else (-1,)), bv))
        else:  # Gemm: alpha*(y+beta)B' + beta_g*C = alpha*yB' + (alpha*beta.B' + beta_g*C)
            w = G.const_value(lin.inputs[1])
            alpha = float(lin.attrs.get("alpha", 1.0))
            beta_g = float(lin.attrs.get("beta", 1.0))
            shift = alpha * (W.matvec(w, b64) if int(lin.attrs.get("transB", 0)) else W.vecmat(b64, w))
            has_c = len(lin.inputs) > 2 and lin.inputs[2].name
            if has_c and beta_g != 0.0:
                like = G.const_value(lin.inputs[2])
                nc = G.f64(like) + shift / beta_g
            else:  # no C (or beta_g = 0, so C contributes nothing): C = shift with beta 1
                like = G.const_value(lin.inputs[1])
                nc = shift
                lin.attrs["beta"] = 1.0
            c = G.new_const(namer, f"{lin.name}_C_beta", G.cast_like(nc, like))
            if has_c:
                lin.inputs[2] = c
            else:
                while len(lin.inputs) < 2:
                    lin.inputs.append(gs.Variable.empty())
                lin.inputs.append(c)


def _fold_layerscale(namer, mul, si, lin, bias_edge, scaled_from=None):
    """s * (x W + b) = x (W diag(s)) + s * b: scale the linear's output channels, then let the
    linear write the Mul's output directly (the Mul is removed). ``scaled_from`` records each
    scaled constant's source (values, s, axis), so that centering it afterwards computes
    center(s * v) from the source in float64 and rounds once."""
    sv = G.f64(G.const_value(mul.inputs[si])).reshape(-1)

    def scaled(tensor, axis):
        v = G.const_value(tensor)
        if v.ndim == 0 or v.shape[axis] == 1:  # a scalar bias (or C) broadcast over the channels
            v64 = G.f64(v) * sv.reshape((1,) * max(v.ndim - 1, 0) + (-1,))
            out = G.new_const(namer, f"{tensor.name}_ls", G.cast_like(v64, v))
            src = (v64, np.ones(v64.shape[-1]), -1, v.dtype)  # already scaled, in float64
        else:
            out = G.new_const(namer, f"{tensor.name}_ls", W.scale_axis(v, sv, axis))
            src = (v, sv, axis, v.dtype)
        if scaled_from is not None:
            scaled_from[id(out)] = src
        return out

    if lin.op == "MatMul":
        w_axis = 1
    elif lin.op == "Gemm":
        w_axis = 0 if int(lin.attrs.get("transB", 0)) else 1
    else:  # Conv: output channels are axis 0 of the weight
        w_axis = 0
    lin.inputs[1] = scaled(lin.inputs[1], w_axis)
    if lin.op in ("Gemm", "Conv") and len(lin.inputs) > 2 and lin.inputs[2].name:
        lin.inputs[2] = scaled(lin.inputs[2], -1)  # Gemm C / Conv B, on the last axis
    if bias_edge is not None:
        add, bi = bias_edge
        add.inputs[bi] = scaled(add.inputs[bi], -1)
    u, t = mul.inputs[1 - si], mul.outputs[0]
    mul.inputs.clear()
    mul.outputs.clear()
    pu = G.producer(u)
    pu.outputs[[i for i, o in enumerate(pu.outputs) if o is u][0]] = t


# ---------------------------------------------------------------------------------------------


class LayerNormToRMSNorm(Pass):
    name = "ln_to_rms"
    description = "fold the redundant mean of Pre-LN streams: LayerNorm -> RMSNorm (Pre-RMSNorm, arXiv 2305.14858)"

    def analyze(self, graph, ctx):
        lns = find_layernorms(graph)
        ln_by_reader = {}
        for m in lns:
            for r in m.readers:
                ln_by_reader[id(r)] = m
        a = Analysis()
        done = set()
        for seed in lns:
            if id(seed) in done:
                continue
            if seed.extra_outputs_used:
                a.declined.append(Decline(seed.name, seed.kind, "its Mean/InvStdDev outputs are read"))
                done.add(id(seed))
                continue
            if not seed.over_last_axis():
                a.declined.append(Decline(seed.name, seed.kind, f"normalizes axes {seed.axes}, not exactly the last axis (or the rank is unknown)"))
                done.add(id(seed))
                continue
            closure = _Closure(graph, ln_by_reader, seed)
            try:
                stream = closure.run()
            except _Fail as exc:
                # every LN the stream reached is left alone for the same reason: those found, and
                # every LN that reads a value of the stream (it is the same connected stream, so
                # walking it again from that LN would only meet the same failure)
                members = set(id(m) for m in closure.s.lns) | {id(seed)}
                reached = set(closure.s.values) | set(closure.s.centerings)
                members |= {id(m) for m in lns if m.x is not None and m.x.name in reached}
                for m in lns:
                    if id(m) in members and id(m) not in done:
                        done.add(id(m))
                        a.declined.append(Decline(m.name, m.kind, f"stream not convertible: {exc}"))
                continue
            except Exception as exc:  # an analysis bug must never produce a rewrite
                done.add(id(seed))
                a.declined.append(Decline(seed.name, seed.kind, f"analysis error: {type(exc).__name__}: {exc}"))
                continue
            for m in stream.lns:
                done.add(id(m))
            k, mc = len(stream.lns), len(stream.centerings)
            if mc >= k:
                for m in stream.lns:
                    a.declined.append(Decline(m.name, m.kind, f"stream needs {mc} explicit centering(s) to convert {k} LN(s): no mean is saved"))
                continue
            a.matches.append(stream)
        return a

    def apply(self, graph, matches, ctx):
        tensors = G.tensor_map(graph)
        namer = G.Namer(graph, tensors)  # (the names in use: this map's, and the other graphs')
        opset = graph.opset or 17
        n = 0
        for s in matches:
            cache = ctx.memo.setdefault("centered", {})  # shared by every graph: a table both If branches read is centered once
            # the stream values are now zero-mean (centered), and so is the mean an existing
            # x - mean(x) takes of one (its difference is the same)
            means = [c.outputs[0].name for name, a in s.values.items() if name in tensors
                     for c in G.consumers(tensors[name]) if c.op == "ReduceMean" and _centering_unit(graph, c, tensors[name], a)]
            mark_changed(ctx, *s.values, *means)

            scaled_from = {}  # id(LayerScale-scaled constant) -> (source values, s, axis, dtype)

            def centered_const(tensor, axis):
                key = (id(tensor), axis)
                if key not in cache:
                    src = scaled_from.get(id(tensor))
                    if src is not None:  # scaled then centered: from the source, one rounding
                        v, sv, s_axis, dt = src
                        vals = W.scale_center(v, sv, s_axis, axis).astype(dt, copy=False)
                    else:
                        vals = _center(G.const_value(tensor), axis)
                    cache[key] = (tensor, G.new_const(namer, f"{tensor.name}_centered", vals))
                return cache[key][1]

            # 1. LayerScale folds: Mul(linear(x) [+ b], s) -> linear with W*s, b*s
            for mul, si, lin, bias_edge in s.layerscales:
                _fold_layerscale(namer, mul, si, lin, bias_edge, scaled_from)
            # 2. writers: tables, linears, constants
            for node, idx, axis in writer_weights(s):
                node.inputs[idx] = centered_const(node.inputs[idx], axis)
            for node, idx, axis in s.constants:
                node.inputs[idx] = centered_const(node.inputs[idx], axis)
            # 3. explicit centerings: x_c = x - ReduceMean(x, axis); mean-invariant readers read x_c
            for name, (t, axis, edges) in s.centerings.items():
                dtype = G.tensor_dtype(t)
                mean = G.new_var(namer, f"{name}_mean", dtype)
                xc = G.new_var(namer, f"{name}_centered", dtype, G.shape(t))
                G.reduce_mean_node(graph, namer, t, mean, [axis], 1)
                G.add_node(graph, namer, "Sub", [t, mean], [xc], base=f"{name}_center")
                for node, idx in edges:
                    if node is not None and node.inputs[idx] is t:
                        node.inputs[idx] = xc
            # 4. every LN becomes an RMSNorm; beta folded into linear readers or kept as an Add
            for ln in s.lns:
                y = ln.y
                x = ln.readers[0].inputs[0]  # after step 3 this may be the explicitly centered value
                shp = tuning_shape(ctx, G.shape(x) or [None, None, G.static_dim(x, -1) or 1])
                form = choose_rms_form(ctx, shp, G.tensor_dtype(x) or np.float32, opset)
                for node in ln.nodes:
                    node.outputs.clear()
                    node.inputs.clear()
                beta_v = ln.beta_array()  # constant beta over d, or None (none, or a run-time tensor)
                bv_own = G.const_value(ln.beta) if ln.beta is not None else None
                # the Add keeps the LN's own beta tensor where it is a 1-D constant or a run-time value
                beta_t = ln.beta if ln.beta is not None and (bv_own is None or bv_own.ndim == 1) else None
                if (beta_v is None and beta_t is None) or (beta_v is not None and not np.any(beta_v)):
                    rms = _emit_rms(graph, namer, ln, x, y, ctx.target, opset, form)
                else:
                    readers = _linear_readers(graph, y) if beta_v is not None and ctx.state.get("fold_beta", True) else None
                    if readers:
                        ctx.state["beta_folded"] = ctx.state.get("beta_folded", 0) + 1
                        # y (and what its readers see before their bias) no longer includes beta
                        mark_changed(ctx, y.name, *(lin.inputs[0].name for lin, _ in readers), *(lin.outputs[0].name for lin, _ in readers))
                        _fold_beta(graph, namer, beta_v, readers)
                        rms = _emit_rms(graph, namer, ln, x, y, ctx.target, opset, form)
                    else:
                        mid = G.new_var(namer, f"{ln.name}_rms_out", G.tensor_dtype(x))
                        rms = _emit_rms(graph, namer, ln, x, mid, ctx.target, opset, form)
                        if beta_t is None:  # a computed beta (or one of another shape): a new 1-D constant
                            beta_t = G.new_const(namer, f"{ln.name}_beta", np.asarray(beta_v).reshape(-1).astype(G.tensor_dtype(x) or np.float32))
                        G.add_node(graph, namer, "Add", [mid, beta_t], [y], base=f"{ln.name}_beta")
                if rms is not None:  # for the opt-in crms pass: streams proved zero-mean
                    ctx.state.setdefault(ZERO_MEAN_READERS, set()).add(rms.name)
                n += 1
        return n
