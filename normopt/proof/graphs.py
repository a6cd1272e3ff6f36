"""What the prover knows about one graph, derived from the graph alone.

A :class:`GraphView` indexes a GraphProto (producers, consumers, static shapes and element
types from ONNX shape inference, constants) and, for the ORIGINAL graph, the per-channel affine
forms: for each value ``w`` a form ``w = L(a * b + t)`` over a *base* value ``b``, where ``L``
is a layout (Transpose / Squeeze / Unsqueeze / unit Reshape) and ``a``, ``t`` are vectors along
one axis of ``b``. They come from the ORIGINAL's own per-channel ops (Mul/Add/Sub/Div by a
constant, inference BatchNormalization, a sum of two forms of one base, Identity, inference
Dropout, a Cast to the same type). A value whose layout is the identity belongs to its base's
*family*; family members are the values a rewrite may relate an optimized value to (this is how
BatchNorm, RepBN and Unified Norm folds and cancelled layout pairs are seen).

Weights are never held: a large initializer is read on demand (a read-only memory map of its
file region, through normopt.weights) and dropped after use.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from .cancel import check as check_cancelled
from .. import weights as W

OPAQUE = "same layout, rank unknown"
SMALL = 1 << 16  # elements: constants this small are cached and may be evaluated
EVAL_LIMIT = 1 << 20  # elements: constant subexpressions up to this size are evaluated


def attr_dict(node) -> dict:
    out = {}
    for a in node.attribute:
        if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            continue
        v = onnx.helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode("utf-8", "replace")
        elif isinstance(v, onnx.TensorProto):
            v = ("tensor", v.data_type, tuple(v.dims), _tensor_bytes(v))
        elif isinstance(v, list):
            v = tuple(x.decode() if isinstance(x, bytes) else x for x in v)
        out[a.name] = v
    return out


def graph_attrs(node) -> dict:
    out = {}
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out[a.name] = [a.g]
        elif a.type == onnx.AttributeProto.GRAPHS:
            out[a.name] = list(a.graphs)
    return out


def _tensor_bytes(t) -> bytes:
    ref = W.external_ref(t)
    if ref is not None:
        return np.ascontiguousarray(W.load_array(t, ref[0], ref[1], ref[2] if ref[2] is not None else W.tensor_nbytes(t))).tobytes()
    return np.ascontiguousarray(numpy_helper.to_array(t)).tobytes()


def tensor_value(t: onnx.TensorProto) -> np.ndarray:
    """The tensor's values (a read-only memory map for a referenced weight)."""
    ref = W.external_ref(t)
    if ref is not None:
        length = ref[2] if ref[2] is not None else W.tensor_nbytes(t)
        return W.load_array(t, ref[0], ref[1], length)
    return np.asarray(numpy_helper.to_array(t))


BLOCK_BYTES = 1 << 20  # bytes of a stored tensor read at once: small enough that a block's float64 temporaries stay in cache (16 MB blocks made the weight checks of a GPT-2-small proof 2x slower)


def _tensor_of(view, name):
    while view is not None:
        if name in view.inits:
            return view.inits[name]
        if name in view.producer or name in view.inputs:
            return None
        view = view.parent
    return None


def row_blocks(view, name, block_bytes=BLOCK_BYTES):
    """(first row, rows) of a constant along its axis 0, as stored. A weight in a file is read
    block by block with plain reads (no mapping stays resident), so a pass over a large tensor
    holds one block at a time."""
    t = _tensor_of(view, name)
    ref = W.external_ref(t) if t is not None else None
    if ref is None:
        arr = view.const(name)
        if arr is None:
            return
        arr = np.asarray(arr)
        if arr.ndim == 0:
            yield 0, arr.reshape(1)
            return
        step = max(1, block_bytes // max(1, arr[:1].nbytes))
        for s in range(0, arr.shape[0], step):
            check_cancelled()
            yield s, arr[s:s + step]
        return
    dt = W.np_dtype(t.data_type)
    shape = tuple(int(d) for d in t.dims)
    if dt is None or dt.kind == "O" or not shape:
        arr = tensor_value(t)
        yield 0, np.asarray(arr).reshape(shape[:1] + shape[1:] if shape else (1,))
        return
    row = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    row_bytes = row * dt.itemsize
    step = max(1, block_bytes // max(1, row_bytes))
    path, offset = ref[0], ref[1]
    for s in range(0, shape[0], step):
        check_cancelled()
        n = min(step, shape[0] - s)
        buf = W.read_bytes(path, offset + s * row_bytes, n * row_bytes)
        yield s, np.frombuffer(buf, dtype=dt).reshape((n,) + shape[1:])


def last_row(view, name):
    """The last row (along axis 0) of a constant, reading only that row from a file."""
    t = _tensor_of(view, name)
    ref = W.external_ref(t) if t is not None else None
    dt = W.np_dtype(t.data_type) if t is not None else None
    shape = tuple(int(d) for d in t.dims) if t is not None else ()
    if ref is None or dt is None or dt.kind == "O" or not shape:
        arr = view.const(name)
        return None if arr is None or np.ndim(arr) == 0 else np.asarray(arr)[-1]
    row = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    buf = W.read_bytes(ref[0], ref[1] + (shape[0] - 1) * row * dt.itemsize, row * dt.itemsize)
    return np.frombuffer(buf, dtype=dt).reshape(shape[1:])


def same_bytes(view_a, name_a, view_b, name_b) -> bool:
    """Two stored constants with the same type, shape and bytes (read block by block)."""
    ta, tb = _tensor_of(view_a, name_a), _tensor_of(view_b, name_b)
    if ta is None or tb is None or ta.data_type != tb.data_type or list(ta.dims) != list(tb.dims):
        return False
    ra, rb = W.external_ref(ta), W.external_ref(tb)
    if ra is not None and ra == rb:
        return True
    for (_, a), (_, b) in zip(row_blocks(view_a, name_a), row_blocks(view_b, name_b)):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if not np.array_equal(np.ascontiguousarray(a).reshape(-1).view(np.uint8),
                              np.ascontiguousarray(b).reshape(-1).view(np.uint8)):
            return False  # bytes, not values: -0.0 and 0.0, and NaN payloads, differ
    return True


def schema_defaults(op: str, domain: str, opset: int) -> dict:
    try:
        s = onnx.defs.get_schema(op, opset, domain or "")
    except Exception:
        return {}
    out = {}
    for name, a in s.attributes.items():
        if a.default_value is not None and a.default_value.type != 0:
            try:
                v = onnx.helper.get_attribute_value(a.default_value)
            except Exception:
                continue
            if isinstance(v, bytes):
                v = v.decode()
            elif isinstance(v, list):
                v = tuple(v)
            out[name] = v
    return out


# contrib ops (com.microsoft or ORT's default-domain SimplifiedLayerNormalization): defaults by hand
CONTRIB_DEFAULTS = {
    "SimplifiedLayerNormalization": {"axis": -1, "epsilon": 1e-5, "stash_type": 1},
    "SkipLayerNormalization": {"epsilon": 1e-12},
    "SkipSimplifiedLayerNormalization": {"epsilon": 1e-12},
}


@dataclass
class Form:
    """w = L(a * b + t): b the base value, axis the channel axis of b (None: scalars only),
    a and t float64 vectors of length d (or scalars), perm[i] the axis of b that axis i of w
    shows (None for an inserted unit axis)."""

    base: str
    axis: int | None
    a: np.ndarray | float
    t: np.ndarray | float
    perm: tuple | None


# ops whose outputs are copies of their inputs' elements (or their shapes): exact on empty tensors too
_MOVES_DATA = {"Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Shape", "Size", "Transpose", "Concat",
               "Gather", "Slice", "Expand", "Tile", "ConstantOfShape", "Cast"}

class GraphView:
    def __init__(self, graph: onnx.GraphProto, opsets: dict, parent: "GraphView | None" = None, types: dict | None = None,
                 forms: bool = False, input_shapes: dict | None = None, ir_version: int | None = None):
        self.graph = graph
        self.parent = parent
        self.opsets = opsets
        self.nodes = expand_skip_norms(graph.node) if forms else list(graph.node)
        # below IR 4 every initializer is listed as an input and is a constant (ONNX Runtime takes
        # no feed for it); from IR 4 on, an initializer listed as an input is a default a caller
        # may override
        self.ir_version = ir_version if ir_version is not None else getattr(parent, "ir_version", None)
        const_inits = self.ir_version is not None and self.ir_version < 4
        input_names = {i.name for i in graph.input}
        init_names = {t.name for t in graph.initializer}
        self.overridable = set() if const_inits else {t.name for t in graph.initializer if t.name in input_names}
        self.inits = {t.name: t for t in graph.initializer if const_inits or t.name not in input_names}
        self.inputs = [i.name for i in graph.input if not (const_inits and i.name in init_names)]
        self.outputs = [o.name for o in graph.output]
        self.producer = {}
        self.consumers = defaultdict(list)
        self.by_name = defaultdict(list)
        for node in self.nodes:
            self.by_name[node.name].append(node)
        for node in self.nodes:
            for k, o in enumerate(node.output):
                if o:
                    self.producer[o] = (node, k)
            for k, i in enumerate(node.input):
                if i:
                    self.consumers[i].append((node, k))
            for subs in graph_attrs(node).values():
                for g in subs:
                    for name in _outer_refs(g):
                        self.consumers[name].append((node, -1))
        self.sub_types = getattr(types, "sub", None) or (parent.sub_types if parent is not None else {})
        self.types = dict(types or {})
        if parent is not None:
            own = self.sub_types.get(graph_key(graph), {})
            for n in graph.node:  # a name the body defines has the body's type, or none known
                for o in n.output:
                    if o:
                        self.types[o] = own.get(o)
            self.types.update(own)
        for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
            self.types.setdefault(vi.name, _type_of(vi))
        for t in graph.initializer:
            self.types[t.name] = (t.data_type, tuple(int(d) for d in t.dims))
        for node in self.nodes:  # values the Skip expansion computes: the type of what they sum
            # (its own names, and a contrib op's outputs, which ONNX's inference cannot type)
            expanded = node.doc_string == _EXPANSION
            for o in node.output:
                if o and node.input and ("__proof_" in o or (expanded and self.types.get(o) is None)):
                    t = self.type_of(node.input[0])
                    if t is not None:
                        self.types[o] = t
        self._small = {}
        self._slack = {}  # evaluated float constants: elementwise bound on |evaluated - run-time value|
        self._partial = {}  # Shape outputs with some dynamic dims: [int or None]
        self._track_shapes(input_shapes)
        self.form = {}
        self.family = defaultdict(list)
        self._evaluate_constants()
        # a float constant the tracker could not shape (a position table resized by a shape that
        # ONNX's float ops compute) has its evaluated shape now: shapes are tracked once more
        # from those, so the dims downstream (the token count a Shape reads) are known too
        fixed = {}
        for name, v in self._small.items():
            if name in self.producer and np.asarray(v).dtype.kind == "f":
                ts = self.tracker.shape.get(name)
                if ts is None or len(ts) != np.ndim(v) or any(not isinstance(d, int) for d in ts):
                    fixed[name] = [int(d) for d in np.shape(v)]
        if fixed:
            self._track_shapes(input_shapes, fixed)
            self._evaluate_constants()
        self.ln_sites = defaultdict(list)
        if forms:
            self._build_forms()
            self._find_ln_sites()
            self._alg_done = set()
            self._find_ln_algebra()

    # ------------------------------------------------------------------ lookups
    def type_of(self, name):
        if name in self.types:
            return self.types[name]
        return self.parent.type_of(name) if self.parent else None

    def shape(self, name):
        t = self.type_of(name)
        return t[1] if t else None

    def rank(self, name):
        s = self.shape(name)
        return len(s) if s is not None else None

    def elem(self, name):
        t = self.type_of(name)
        return t[0] if t else None

    def is_const(self, name) -> bool:
        if not name:
            return False
        if name in self.inits or name in self._small:
            return True
        if name in self.producer or name in self.inputs:
            return False
        return self.parent.is_const(name) if self.parent else False

    def is_stored(self, name) -> bool:
        """A constant the model stores (an initializer), not one computed from other constants."""
        if name in self.inits:
            return True
        if name in self.producer or name in self.inputs or name in self._small:
            return False
        return self.parent.is_stored(name) if self.parent else False

    def const(self, name):
        """The constant's values (float arrays as stored), or None."""
        if name in self._small:
            return self._small[name]
        if name in self.inits:
            return tensor_value(self.inits[name])
        if name in self.producer or name in self.inputs:
            return None
        return self.parent.const(name) if self.parent else None

    def slack(self, name):
        """Bound on |const(name) - what ONNX Runtime computes| elementwise (0.0: the same values).
        A float reduction's summation order is ONNX Runtime's own, so a ReduceMean / ReduceSum of
        constants that the prover evaluates (onnx.reference, numpy's order) may differ from the
        run-time value by the sum's rounding; that bound is carried through data movement and
        Add / Sub / Mul / Neg, so a constant the optimizer left to be centered at run time
        (its Sub(c, ReduceMean(c))) is compared at the rounding it really has."""
        if name in self._slack:
            return self._slack[name]
        if name in self.producer or name in self.inputs or name in self.inits or name in self._small:
            return 0.0
        return self.parent.slack(name) if self.parent else 0.0

    def _node_slack(self, node, vals):
        """The slack of node's first output (see slack), or None for none."""
        ins = list(node.input)
        sl = [self.slack(i) if i else 0.0 for i in ins]
        op = node.op_type
        r = np.asarray(vals[0]) if vals and vals[0] is not None else None
        if r is None or r.dtype.kind != "f":
            return None
        eps = float(np.finfo(r.dtype).eps) if r.dtype != np.float64 else float(np.finfo(np.float64).eps)
        absr = np.abs(r.astype(np.float64))
        if op in ("ReduceMean", "ReduceSum") and ins and ins[0]:
            x = np.asarray(self.const(ins[0]))
            if x.size == 0:
                return None  # a reduction of nothing is exact (ONNX Runtime's 0, see _evaluate_constants)
            n = max(1, x.size // max(1, r.size))
            absx = np.abs(x.astype(np.float64))
            vx = _eval_node(node, [absx] + [self.const(i) if i else None for i in ins[1:]], self.opsets)[0]
            out = n * eps * np.asarray(vx, np.float64) + eps * absr
            if np.any(np.asarray(sl[0]) != 0):
                out = out + np.asarray(_eval_node(node, [np.broadcast_to(np.asarray(sl[0], np.float64), x.shape).copy()]
                                                  + [self.const(i) if i else None for i in ins[1:]], self.opsets)[0])
            return out
        if all(np.all(np.asarray(v) == 0) for v in sl):
            return None
        if op in _MOVES_DATA and op not in ("Shape", "Size", "ConstantOfShape"):
            data = range(len(ins)) if op == "Concat" else (0,)
            feeds = []
            for k, i in enumerate(ins):
                v = self.const(i) if i else None
                if k in data and v is not None:
                    v = np.broadcast_to(np.asarray(sl[k], np.float64), np.shape(v)).copy()
                feeds.append(v)
            try:
                out = np.asarray(_eval_node(node, feeds, self.opsets)[0], np.float64)
            except Exception:
                return None
            return out + (eps * absr if op == "Cast" else 0.0)
        if op in ("Add", "Sub", "Mul", "Neg") and all(self.const(i) is not None for i in ins if i):
            s0 = np.asarray(sl[0], np.float64)
            if op == "Neg":
                return s0 + 0 * absr
            s1 = np.asarray(sl[1], np.float64)
            if op in ("Add", "Sub"):
                return s0 + s1 + eps * absr
            a, b = (np.abs(np.asarray(self.const(i), np.float64)) for i in ins[:2])
            return b * s0 + a * s1 + s0 * s1 + eps * absr
        return None  # other ops keep the assumption every evaluation makes: reference = run time

    def const_size(self, name) -> int:
        if name in self._small:
            return int(self._small[name].size)
        if name in self.inits:
            return int(np.prod(self.inits[name].dims)) if len(self.inits[name].dims) else 1
        if self.parent and name not in self.producer:
            return self.parent.const_size(name)
        return -1

    def get_form(self, name):
        if name in self.form:
            return self.form[name]
        if self.parent and name not in self.producer and name not in self.inputs:
            return self.parent.get_form(name)
        return Form(name, None, 1.0, 0.0, None)

    def get_family(self, base):
        fam = list(self.family.get(base, ()))
        if self.parent:
            fam += self.parent.get_family(base)
        return fam

    def opset(self, domain=""):
        return self.opsets.get(domain or "", self.opsets.get("ai.onnx", 0))

    def attrs(self, node) -> dict:
        """The node's attributes with the schema's defaults filled in."""
        dom = "" if node.domain in ("", "ai.onnx") else node.domain
        if node.op_type in CONTRIB_DEFAULTS and (dom == "com.microsoft" or node.op_type == "SimplifiedLayerNormalization"):
            out = dict(CONTRIB_DEFAULTS[node.op_type])
        else:
            out = schema_defaults(node.op_type, dom, self.opset(dom))
        out.update(attr_dict(node))
        return out

    # ------------------------------------------------------------------ symbolic shapes
    def _track_shapes(self, input_shapes=None, fixed=None):
        """The prover's own symbolic shapes and shape values (symshape): dims ONNX's inference
        left unknown are filled in; an integer value computed from shapes that is static for
        every input size becomes a constant, a partly symbolic one a partial shape vector."""
        from .symshape import Tracker, to_dim

        self.tracker = Tracker(self.graph, self.opsets, parent=getattr(self.parent, "tracker", None))
        for name, shp in (input_shapes or {}).items():  # the original's declared input dims name the sizes
            if name in self.inputs and name not in self.inits:
                self.tracker.shape[name] = list(shp) if shp is not None else None
        self.tracker.fixed = dict(fixed or {})  # evaluated constants' shapes (see __init__)
        self.tracker.run(self.nodes)
        produced = set(self.producer)
        for name, s in self.tracker.shape.items():
            if s is None or name not in produced:
                continue
            t = self.types.get(name)
            if t is None:
                t = self._same_elem_type(name)  # a contrib op's output: ONNX's inference leaves it untyped
            old = t[1] if t is not None else None
            new = [to_dim(d) for d in s]
            if old is not None and len(old) != len(new):
                continue  # disagreement: keep ONNX's (a proof may be lost, never made)
            if old is not None:
                new = [o if isinstance(o, int) else (n if n is not None else o) for o, n in zip(old, new)]
            if t is None or not t[0]:
                continue
            self.types[name] = (t[0], tuple(new))
        for name, v in self.tracker.value.items():
            if name not in produced or name in self.inits:
                continue
            s = self.tracker.shape.get(name)
            if s is None or any(not isinstance(d, int) for d in s):
                continue
            t = self.types.get(name)
            if all(isinstance(x, int) and not isinstance(x, bool) for x in v):
                dt = np.int32 if t is not None and t[0] == onnx.TensorProto.INT32 else np.int64
                if t is None or t[0] in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
                    self._small[name] = np.array(v, dt).reshape(s)
            elif all(isinstance(x, bool) for x in v):
                if t is None or t[0] == onnx.TensorProto.BOOL:
                    self._small[name] = np.array(v, np.bool_).reshape(s)
            elif len(s) <= 1 and not any(isinstance(x, bool) for x in v):
                self._partial[name] = [to_dim(x) if x is not None else None for x in v]

    def _same_elem_type(self, name):
        """(elem type of input 0, None) for the first output of an op that keeps its input's element
        type (elementwise, normalization, linear and layout ops, their contrib forms included)."""
        prod = self.producer.get(name)
        if prod is None or prod[1] != 0 or prod[0].domain not in ("", "ai.onnx", "com.microsoft") or not prod[0].input:
            return None
        if prod[0].op_type not in _SAME_ELEM:
            return None
        e = self.elem(prod[0].input[0])
        return (e, None) if e else None

    # ------------------------------------------------------------------ constants
    def _evaluate_constants(self):
        """Constant nodes, and small nodes whose inputs are all constants (Shape of a static
        shape included), evaluated with ONNX's reference implementation."""
        for node in self.nodes:
            if node.op_type == "Constant":
                attrs = {a.name: a for a in node.attribute}
                try:
                    if "value" in attrs:
                        self._small[node.output[0]] = tensor_value(attrs["value"].t)
                    else:
                        a = next(iter(attrs.values()))
                        v = onnx.helper.get_attribute_value(a)
                        self._small[node.output[0]] = np.asarray(v)
                except Exception:
                    pass
                continue
            if node.domain not in ("", "ai.onnx") or graph_attrs(node) or node.op_type in _NO_EVAL:
                continue
            if node.output and all(not o or o in self._small or o in self._partial for o in node.output) and not (
                    any(o in self._partial for o in node.output) and all(self.is_const(i) for i in node.input if i)):
                continue  # the shape tracker knows it (a partial value of constants is evaluated whole)
            if node.op_type in ("Shape", "Size") and node.input:
                s = self.shape(node.input[0])
                if (s is None or any(not isinstance(d, int) for d in s)) and self.is_const(node.input[0]):
                    s = [int(d) for d in np.shape(self.const(node.input[0]))]  # an evaluated constant's own shape
                if s is not None:
                    # a symbolic dim is kept as its name (or a name for this dim), so equal dims cancel
                    s = [d if isinstance(d, int) and d >= 0 else (d if isinstance(d, str) and d else f"{node.input[0]}#{k}")
                         for k, d in enumerate(s)]
                    a = self.attrs(node)
                    if node.op_type == "Size":
                        if all(d is not None for d in s):
                            self._small[node.output[0]] = np.array(int(np.prod(s)), np.int64)
                    else:
                        from .symshape import shape_range

                        start, end = shape_range(a.get("start", 0), a.get("end"), len(s))
                        part = s[start:end]
                        if all(isinstance(d, int) for d in part):
                            self._small[node.output[0]] = np.array(part, np.int64)
                            self._partial.pop(node.output[0], None)
                        else:
                            self._partial[node.output[0]] = part
                continue
            if node.op_type in ("Gather", "Slice") and node.input and node.input[0] in self._partial:
                self._partial_index(node)
                continue
            if node.input and any(i in self._partial for i in node.input) and self._partial_op(node):
                continue
            if node.op_type == "Reshape" and len(node.input) > 1:
                self._refine_reshape(node)
            if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1:
                self._refine_linear(node)
            self._refine_shape(node)
            ins = [i for i in node.input if i]
            if not ins or not all(self.is_const(i) for i in ins):
                continue
            if any(self.const_size(i) > EVAL_LIMIT or self.const_size(i) < 0 for i in ins):
                continue
            nan_is_zero = False
            if node.op_type not in _MOVES_DATA and any(self.const_size(i) == 0 for i in ins):
                # arithmetic over an empty tensor: onnx.reference and ONNX Runtime disagree there
                # (ReduceMean of nothing is NaN to one, 0 to the other), and a NaN taken for a
                # constant would absorb whatever reads it; left as a run-time value. The
                # reductions are evaluated as ONNX Runtime computes them (checked against it):
                # the others agree, and a ReduceMean of nothing is 0 there (NaN to onnx.reference;
                # the input is empty, so every NaN it gives is one of those)
                if node.op_type not in _EMPTY_REDUCE or node.domain not in ("", "ai.onnx") or \
                        self.const_size(node.input[0]) != 0:
                    continue
                nan_is_zero = node.op_type == "ReduceMean"
            try:
                vals = _eval_node(node, [self.const(i) if i else None for i in node.input], self.opsets)
                if nan_is_zero:
                    vals = [np.where(np.isnan(v), np.zeros((), np.asarray(v).dtype), v) if v is not None else v for v in vals]
            except Exception:
                continue
            for o, v in zip(node.output, vals):
                if o and v is not None and np.asarray(v).size <= EVAL_LIMIT:
                    self._small[o] = np.asarray(v)
                    self._partial.pop(o, None)
            if node.output and node.output[0] in self._small:
                try:
                    sl = self._node_slack(node, vals)
                except Exception:
                    sl = None
                if sl is not None and np.all(np.isfinite(sl)):
                    self._slack[node.output[0]] = sl

    def _pvals(self, name):
        """A 1-D int shape vector as [int or None], from a partial or a small constant."""
        if name in self._partial and name not in self._small:  # a value evaluated whole wins over its partial one
            return list(self._partial[name])
        v = self.const(name) if name else None
        if v is None or np.asarray(v).dtype.kind not in "iu" or np.asarray(v).ndim > 1 or np.asarray(v).size > 64:
            return None
        return [int(x) for x in np.asarray(v).reshape(-1)]

    def _set_partial(self, name, vals, scalar=False):
        if all(isinstance(v, (int, np.integer)) for v in vals):
            arr = np.array(vals, np.int64)
            self._small[name] = arr.reshape(()) if scalar else arr
        else:
            self._partial[name] = vals

    def _partial_op(self, node):
        """Shape arithmetic on partly static shape vectors (Concat, Unsqueeze, Squeeze, Cast,
        Identity, elementwise Add/Sub/Mul/Div with a constant): what is static stays static."""
        op, ins, out = node.op_type, list(node.input), node.output[0]
        if op == "Concat" and self.attrs(node).get("axis", 0) == 0:
            parts = [self._pvals(i) for i in ins]
            if any(p is None for p in parts):
                return False
            self._set_partial(out, [v for p in parts for v in p])
            return True
        if op == "ReduceProd":
            vals = self._pvals(ins[0])
            if vals is None or not all(isinstance(v, (int, np.integer)) for v in vals):
                return False
            keep = self.attrs(node).get("keepdims", 1)
            self._set_partial(out, [int(np.prod(vals))], scalar=not keep)
            return True
        if op in ("Unsqueeze", "Squeeze", "Cast", "Identity"):
            vals = self._pvals(ins[0])
            if vals is None or (op == "Cast" and self.attrs(node).get("to") not in (6, 7)):
                return False
            self._set_partial(out, vals, scalar=(op == "Squeeze"))
            return True
        if op in ("Add", "Sub", "Mul", "Div") and len(ins) == 2:
            a, b = self._pvals(ins[0]), self._pvals(ins[1])
            if a is None or b is None:
                return False
            if len(a) == 1 and len(b) > 1:
                a = a * len(b)
            if len(b) == 1 and len(a) > 1:
                b = b * len(a)
            if len(a) != len(b):
                return False
            f = {"Add": lambda x, y: x + y, "Sub": lambda x, y: x - y, "Mul": lambda x, y: x * y,
                 "Div": lambda x, y: x // y if y else None}[op]
            num = (int, np.integer)
            self._set_partial(out, [f(x, y) if isinstance(x, num) and isinstance(y, num) else None for x, y in zip(a, b)],
                              scalar=(self.rank(ins[0]) == 0 and self.rank(ins[1]) in (0, None)))
            return True
        return False

    def _refine_shape(self, node):
        """Shapes ONNX's inference left unknown, for the ops that move dims plainly: unary
        elementwise ops, broadcasting binary ops, Transpose, Squeeze / Unsqueeze with constant axes."""
        if not node.output or not node.output[0] or node.domain not in ("", "ai.onnx"):
            return
        out = node.output[0]
        t_out = self.type_of(out)
        fixed = _FIXED_TYPE.get(node.op_type)
        if node.op_type == "Cast":
            fixed = self.attrs(node).get("to")
        if fixed and (t_out is None or not t_out[0]):
            t_out = (fixed, t_out[1] if t_out else None)
            self.types[out] = t_out
        if t_out is not None and t_out[1] is not None:
            return
        op, ins = node.op_type, [i for i in node.input]
        t_in = self.type_of(ins[0]) if ins and ins[0] else None
        if t_in is None or t_in[1] is None:
            return
        sin, elem = list(t_in[1]), (t_out[0] if t_out and t_out[0] else t_in[0])
        new = None
        if op in _UNARY:
            new = sin
        elif op in ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where") and len(ins) >= 2:
            shapes = [self.shape(i) for i in ins]
            if any(sh is None for sh in shapes):
                return
            r = max(len(sh) for sh in shapes)
            padded = [[1] * (r - len(sh)) + list(sh) for sh in shapes]
            new = []
            for dims in zip(*padded):
                real = [d for d in dims if d != 1]
                if not real:
                    new.append(1)
                elif all(d == real[0] for d in real):
                    new.append(real[0])
                else:
                    ints = [d for d in real if isinstance(d, int)]
                    new.append(ints[0] if ints and all(d == ints[0] for d in ints) and len(ints) == len(real) else None)
            if op == "Where":
                elem = self.elem(ins[1]) or elem
        elif op == "Transpose":
            perm = self.attrs(node).get("perm") or tuple(reversed(range(len(sin))))
            new = [sin[p] for p in perm]
        elif op in ("Squeeze", "Unsqueeze"):
            axes = self.attrs(node).get("axes")
            if len(ins) > 1 and ins[1]:
                v = self.const(ins[1])
                axes = None if v is None else [int(a) for a in np.asarray(v).reshape(-1)]
            if axes is None:
                return
            if op == "Squeeze":
                ax = {a % len(sin) for a in axes}
                new = [d for k, d in enumerate(sin) if k not in ax]
            else:
                r = len(sin) + len(axes)
                ax = {a % r for a in axes}
                it = iter(sin)
                new = [1 if k in ax else next(it) for k in range(r)]
        if new is not None:
            self.types[out] = (elem, tuple(new))

    def _refine_linear(self, node):
        """The output channel count of a MatMul / Gemm with a constant 2-D weight, where inference left it symbolic."""
        w = node.input[1]
        if w not in self.inits or len(self.inits[w].dims) != 2:
            return
        dims = [int(d) for d in self.inits[w].dims]
        n = dims[0] if node.op_type == "Gemm" and self.attrs(node).get("transB", 0) else dims[1]
        t = self.type_of(node.output[0])
        if t is None or t[1] is None or not t[1] or isinstance(t[1][-1], int):
            return
        self.types[node.output[0]] = (t[0], tuple(t[1][:-1]) + (n,))

    def _refine_reshape(self, node):
        """Static dims of a Reshape's output that its shape vector fixes, where inference left
        them symbolic (0 copies the input's dim unless allowzero; -1 from the element count)."""
        vals = self._pvals(node.input[1])
        t_in, t_out = self.type_of(node.input[0]), self.type_of(node.output[0])
        if vals is None or t_in is None or t_in[1] is None:
            return
        sin = list(t_in[1])
        allowzero = self.attrs(node).get("allowzero", 0)
        dims = []
        for k, v in enumerate(vals):
            if v is None:
                dims.append(None)
            elif v == 0 and not allowzero:
                dims.append(sin[k] if k < len(sin) else None)
            elif v == -1:
                dims.append(-1)
            else:
                dims.append(v)
        if -1 in dims:
            known = [d for d in dims if not (isinstance(d, int) and d == -1)]
            num = [d for d in sin if isinstance(d, int)]
            sym = [d for d in sin if not isinstance(d, int)]
            den_num = [d for d in known if isinstance(d, int)]
            den_sym = [d for d in known if not isinstance(d, int)]
            ok = None not in sym and None not in den_sym
            for d in den_sym if ok else ():
                if d in sym:
                    sym.remove(d)
                else:
                    ok = False
            rest = int(np.prod(den_num)) if den_num else 1
            if ok and not sym and rest and int(np.prod(num)) % rest == 0:
                dims[dims.index(-1)] = int(np.prod(num)) // rest
            else:
                dims[dims.index(-1)] = None
        old = list(t_out[1]) if t_out and t_out[1] is not None and len(t_out[1]) == len(dims) else [None] * len(dims)
        new = tuple(d if (isinstance(d, int) and d >= 0) or (isinstance(d, str) and "#" not in d) else o for d, o in zip(dims, old))
        elem = t_out[0] if t_out else t_in[0]
        self.types[node.output[0]] = (elem, new)

    def _partial_index(self, node):
        """Gather / Slice of a partly static shape: a constant when every dim picked is static."""
        dims = self._partial[node.input[0]]
        try:
            if node.op_type == "Gather":
                idx = self.const(node.input[1]) if len(node.input) > 1 else None
                if idx is None or self.attrs(node).get("axis", 0) != 0:
                    return
                idx = np.asarray(idx)
                picked = [dims[int(i)] for i in idx.reshape(-1)]
                self._set_partial(node.output[0], picked, scalar=(idx.ndim == 0))
                return
            vals = [self.const(i) if i else None for i in node.input[1:]]
            if len(vals) < 2 or vals[0] is None or vals[1] is None or any(v is None for v, i in zip(vals, node.input[1:]) if i):
                return
            starts, ends = int(np.asarray(vals[0]).reshape(-1)[0]), int(np.asarray(vals[1]).reshape(-1)[0])
            if len(vals) > 2 and vals[2] is not None and int(np.asarray(vals[2]).reshape(-1)[0]) != 0:
                return
            step = int(np.asarray(vals[3]).reshape(-1)[0]) if len(vals) > 3 and vals[3] is not None else 1
            self._set_partial(node.output[0], dims[slice(starts, ends, step)])
        except (IndexError, ValueError, TypeError):
            return

    # ------------------------------------------------------------------ affine forms
    def _identity_perm(self, name):
        r = self.rank(name)
        return tuple(range(r)) if r is not None else None

    def is_identity_layout(self, name, f: Form) -> bool:
        if f.perm == OPAQUE:
            return self._identity_perm(f.base) is None
        if f.perm is None:
            return False
        s, sb = self.shape(name), self.shape(f.base)
        if s is None or sb is None or tuple(s) != tuple(sb):
            return False
        seen = [p for p in f.perm if p is not None and sb[p] != 1]
        return seen == sorted(seen) and len(seen) == sum(1 for d in sb if d != 1)

    def layout_key(self, name, f: Form | None = None):
        """(base, shape, order of the base's non-unit axes): values with one key hold the same
        elements in the same places up to their per-channel affines."""
        f = f or self.get_form(name)
        perm = f.perm if f.perm is not None else (self._identity_perm(name) if f.base == name else None)
        if perm == OPAQUE or (perm is None and f.base == name):
            return (f.base, OPAQUE) if self._identity_perm(f.base) is None else None
        if perm is None:
            return None
        # the layout ops tracked (Identity, Transpose, (Un)Squeeze, unit Reshape) fix the shape by
        # the base's shape and this map, so equal keys mean equal shapes (symbolic dims included)
        sb = self.shape(f.base)
        return (f.base, tuple(None if p is None or (sb is not None and sb[p] == 1) else p for p in perm))

    _LAYOUT_ONLY = ("Identity", "Transpose", "Squeeze", "Unsqueeze", "Reshape", "Dropout", "Cast")
    _AFFINE_OPS = ("BatchNormalization", "Mul", "Add", "Sub", "Div")

    def _build_forms(self, rounds: int = 4):
        """Each value's form on its base. A form holds one per-channel affine along one axis of
        its base: an affine along another axis does not compose with it (a RepBN over tokens, then
        one over channels). The value that affine reads is then re-based: its nearest ancestor
        through layout ops alone (the "anchor") becomes a base of its own, and the forms are
        built again, so the values after the anchor relate to it and to each other (a Transpose
        pair around the second affine included). An anchor keeps its form on its former base as
        a second form (`outer_form`), so it stays a member of that family too. Each round is
        linear in nodes; a round that finds no new anchor is the last."""
        self.anchors = set()
        for _ in range(rounds):
            new = self._build_forms_once()
            if not new:
                break
            self.anchors |= new
        else:
            self._build_forms_once()  # the last anchors found take effect

    def _layout_anchor(self, x):
        """x's nearest ancestor through layout-only ops that keep x's base and affine."""
        v, steps = x, 0
        while steps < 256:
            prod = self.producer.get(v)
            if prod is None or prod[0].op_type not in self._LAYOUT_ONLY or not prod[0].input or not prod[0].input[0]:
                break
            u = prod[0].input[0]
            if u in self.anchors:
                return u
            fv, fu = self.form.get(v), self.get_form(u)
            if fv is None or fv.base != fu.base or fv.axis != fu.axis or not (
                    np.array_equal(fv.a, fu.a) and np.array_equal(fv.t, fu.t)):
                break
            v, steps = u, steps + 1
        return v

    def _conflict_anchor(self, node):
        """The anchor to re-base at when node is an affine op whose input's form it cannot compose
        with, but which has a form on that input alone; None otherwise."""
        if node.op_type not in self._AFFINE_OPS or node.domain not in ("", "ai.onnx"):
            return None
        ins = [i for i in node.input[:2] if i]
        if node.op_type == "BatchNormalization":
            xs = ins[:1]
        else:
            xs = [i for i in ins if not self.is_const(i)]
        if len(xs) != 1 or xs[0] not in self.form or self.form[xs[0]].base == xs[0]:
            return None
        x = xs[0]
        saved = self.form.pop(x)
        try:
            f = self._form_of(node)
        except Exception:
            f = None
        finally:
            self.form[x] = saved
        return None if f is None else self._layout_anchor(x)

    def _build_forms_once(self):
        self.keyed = defaultdict(list)
        self.form = {}
        self.outer_form = {}
        self.family = defaultdict(list)
        new = set()
        for node in self.nodes:
            if not node.output or not node.output[0]:
                continue
            y = node.output[0]
            try:
                f = self._form_of(node)
            except Exception:
                f = None
            if y in self.anchors:  # a base of its own; its form on the former base is its second
                if f is not None and f.base != y:
                    self.outer_form[y] = f
                    self._key_in(y, f)
                continue
            if f is None:
                a = self._conflict_anchor(node)
                if a is not None and a not in self.anchors:
                    new.add(a)
                continue
            self.form[y] = f
            self._key_in(y, f)
            if f.base != y and self.is_identity_layout(y, f):
                self.family[f.base].append(y)
        return new

    def _key_in(self, y, f):
        """y joins the values of its layout key under form f (the key's base first)."""
        key = self.layout_key(y, f)
        if key is not None:
            if not self.keyed[key] and self.layout_key(key[0]) == key:
                self.keyed[key].append(key[0])
            self.keyed[key].append(y)

    def forms(self, name):
        """name's forms: on its base, and for an anchor also on its former base."""
        out = [self.get_form(name)]
        view = self
        while view.parent is not None and name not in view.producer and name not in view.inputs:
            view = view.parent  # the graph that defines name
        o = getattr(view, "outer_form", {}).get(name)
        if o is not None:
            out.append(o)
        return out

    def form_on(self, name, base):
        """name's form whose base is `base` (name itself: the identity), or None."""
        if name == base:
            return Form(name, None, 1.0, 0.0, None)
        for f in self.forms(name):
            if f.base == base:
                return f
        return None

    def members(self, name):
        """Values of this graph (and enclosing ones) with one of name's layout keys (an anchor
        has two), name first."""
        out = [name]
        for f in self.forms(name):
            key = self.layout_key(name, f)
            view = self
            while view is not None and key is not None:
                out += [w for w in getattr(view, "keyed", {}).get(key, ()) if w not in out]
                view = view.parent
        return out

    def axis_in(self, name, base_axis, f: Form | None = None):
        """Position in `name` of the base's axis `base_axis` (under form f, default name's own)."""
        if base_axis is None:
            return None
        f = f or self.get_form(name)
        perm = f.perm if f.perm is not None else (self._identity_perm(name) if f.base == name else None)
        if perm is None or perm == OPAQUE or base_axis not in perm:
            return None
        return perm.index(base_axis)

    def _channel_vec(self, k: np.ndarray, x: str, f: Form):
        """(axis of the base, vector or scalar) when constant k broadcast against x varies only
        along one axis of x that maps to an axis of the base; None otherwise."""
        r = self.rank(x)
        if r is None or k.ndim > r:
            return None
        if k.size == 1:
            return f.axis, float(np.asarray(k, np.float64).reshape(-1)[0])
        shp = (1,) * (r - k.ndim) + tuple(k.shape)
        xs = self.shape(x)
        varying = [i for i, d in enumerate(shp) if d != 1]
        if len(varying) != 1:
            return None
        i = varying[0]
        if xs is None or xs[i] != shp[i] or f.perm is None or f.perm[i] is None:
            return None
        axis = f.perm[i]
        if f.axis is not None and f.axis != axis:
            return None
        return axis, np.asarray(k, np.float64).reshape(-1)

    def _form_of(self, node):
        op, ins = node.op_type, list(node.input)
        if node.domain not in ("", "ai.onnx") or not ins or not ins[0]:
            return None
        x = ins[0]
        if self.is_const(x) and op not in ("Mul", "Add", "Sub"):
            return None
        fx = self.get_form(x)
        if fx.perm is None:
            fx = Form(fx.base, fx.axis, fx.a, fx.t, self._identity_perm(x)) if fx.base == x else fx
        if op in ("Identity",) or (op == "Dropout" and _dropout_inference(self, node)) or (
                op == "Cast" and self.elem(x) is not None and self.attrs(node).get("to") == self.elem(x)):
            # the same values: with an unknown rank the layout is "the base's, whatever it is"
            return fx if fx.perm is not None else Form(fx.base, fx.axis, fx.a, fx.t, OPAQUE)
        if fx.perm == OPAQUE:
            return None
        if op == "Transpose":
            if fx.perm is None:
                return None
            perm = self.attrs(node).get("perm") or tuple(reversed(range(len(fx.perm))))
            return Form(fx.base, fx.axis, fx.a, fx.t, tuple(fx.perm[p] for p in perm))
        if op in ("Unsqueeze", "Squeeze", "Reshape"):
            return self._layout_form(node, fx)
        if op == "BatchNormalization":
            a = self.attrs(node)
            if a.get("training_mode", 0) or any(o for o in node.output[1:]) or len(ins) < 5 or fx.perm is None or len(fx.perm) < 2:
                return None
            vals = [self.const(i) for i in ins[1:5]]
            if any(v is None for v in vals) or fx.perm[1] is None:
                return None
            axis = fx.perm[1]
            if fx.axis is not None and fx.axis != axis:
                return None
            g, b, m, v = (np.asarray(t, np.float64).reshape(-1) for t in vals)
            s = g / np.sqrt(v + float(a.get("epsilon", 1e-5)))
            return Form(fx.base, axis, fx.a * s, fx.t * s + (b - s * m), fx.perm)
        if op in ("Mul", "Add", "Sub", "Div") and len(ins) == 2:
            c0, c1 = self.is_const(ins[0]), self.is_const(ins[1])
            if c0 == c1:
                if c0 or op not in ("Add", "Sub"):
                    return None
                f0, f1 = self.get_form(ins[0]), self.get_form(ins[1])
                if f0.base != f1.base or f0.perm is None or f0.perm != f1.perm or self.shape(ins[0]) != self.shape(ins[1]):
                    return None
                if f0.axis is not None and f1.axis is not None and f0.axis != f1.axis:
                    return None
                axis = f0.axis if f0.axis is not None else f1.axis
                sign = 1.0 if op == "Add" else -1.0
                return Form(f0.base, axis, f0.a + sign * f1.a, f0.t + sign * f1.t, f0.perm)
            xi = 1 if c0 else 0
            x = ins[xi]
            fx = self.get_form(x)
            if fx.perm is None:
                fx = Form(fx.base, fx.axis, fx.a, fx.t, self._identity_perm(x))
            if fx.perm is None or self.shape(y := node.output[0]) != self.shape(x):
                return None
            k = self.const(ins[1 - xi])
            if k is None or not np.issubdtype(np.asarray(k).dtype, np.floating):
                return None
            cv = self._channel_vec(np.asarray(k), x, fx)
            if cv is None:
                return None
            axis, kv = cv
            a, t = fx.a, fx.t
            if op == "Mul":
                a, t = a * kv, t * kv
            elif op == "Add":
                t = t + kv
            elif op == "Sub":
                a, t = (a, t - kv) if xi == 0 else (-a, kv - t)
            else:
                if xi != 0 or np.any(np.asarray(kv) == 0):
                    return None
                a, t = a / kv, t / kv
            return Form(fx.base, axis, a, t, fx.perm)
        return None

    def _squeeze_axes(self, node, rank_in):
        """(Un)Squeeze's axes, normalized, from the attribute or the constant input; None when
        not known (a Squeeze without axes drops the unit dims, which a symbolic dim hides)."""
        axes = self.attrs(node).get("axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            v = self.const(node.input[1])
            axes = None if v is None else [int(a) for a in np.asarray(v).reshape(-1)]
        if axes is None:
            return None
        r = rank_in + len(axes) if node.op_type == "Unsqueeze" else rank_in
        norm = sorted({a + r if a < 0 else a for a in axes})
        if len(norm) != len(axes) or any(not 0 <= a < r for a in norm):
            return None
        return norm

    def _layout_form(self, node, fx):
        if fx.perm is None:
            return None
        op, x, y = node.op_type, node.input[0], node.output[0]
        if op in ("Unsqueeze", "Squeeze"):
            # the axes say where unit axes go in or come out, whatever the other dims are
            # (a symbolic batch included); a squeezed axis is 1 whenever the node runs
            axes = self._squeeze_axes(node, len(fx.perm))
            if axes is not None:
                if op == "Unsqueeze":
                    it = iter(fx.perm)
                    perm = tuple(None if i in axes else next(it) for i in range(len(fx.perm) + len(axes)))
                else:
                    sx = self.shape(x)
                    if sx is not None and any(isinstance(sx[a], int) and sx[a] != 1 for a in axes):
                        return None
                    if fx.axis is not None and any(fx.perm[a] == fx.axis for a in axes):
                        return None  # the affine's own axis goes: its channels would have nowhere to be
                    perm = tuple(p for i, p in enumerate(fx.perm) if i not in axes)
                return Form(fx.base, fx.axis, fx.a, fx.t, perm)
        sx, sy = self.shape(x), self.shape(y)
        if sx is None or sy is None or any(not isinstance(d, int) for d in tuple(sx) + tuple(sy)):
            return None
        if [d for d in sx if d != 1] != [d for d in sy if d != 1]:
            return None
        sb = self.shape(fx.base)
        kept = [p for p, d in zip(fx.perm, sx) if d != 1]
        it = iter(kept)
        perm = tuple(next(it) if d != 1 else None for d in sy)
        # a unit axis of the base that the layout drops is fine; its values are unchanged
        del sb
        return Form(fx.base, fx.axis, fx.a, fx.t, perm)

    def _only(self, name, ops):
        return [n for n, k in self.consumers.get(name, ()) if n.op_type in ops and n.domain in ("", "ai.onnx")]

    def _mean_over_last(self, node, x):
        """node is ReduceMean(x) over x's last axis alone; returns the keepdims-1 value or None."""
        if node.op_type != "ReduceMean" or node.input[0] != x:
            return None
        r = self.rank(x)
        axes = reduce_axes(self, node)
        if r is None or axes != (r - 1,):
            return None
        if self.attrs(node).get("keepdims", 1):
            return node.output[0]
        for u in self._only(node.output[0], ("Unsqueeze",)):
            ax = self.attrs(u).get("axes")
            if len(u.input) > 1 and u.input[1]:
                v = self.const(u.input[1])
                ax = None if v is None else [int(i) for i in np.asarray(v).reshape(-1)]
            if ax is not None and len(ax) == 1 and int(ax[0]) % r == r - 1:
                return u.output[0]
        return None

    def _find_ln_sites(self):
        """Decomposed LayerNorms of the ORIGINAL: n = (x - mean x) / sqrt(mean((x - mean x)^2) + eps),
        over the last axis (Pow or Mul for the square, Div or Reciprocal-Mul, keepdims 0 + Unsqueeze).
        ln_sites[x] lists (n, eps); the gamma / beta after n are per-channel forms of n."""
        for node in self.nodes:
            if node.op_type != "ReduceMean" or node.domain not in ("", "ai.onnx"):
                continue
            x = node.input[0]
            mu = self._mean_over_last(node, x)
            if mu is None:
                continue
            for sub in self._only(mu, ("Sub",)):
                if sub.input[0] != x or sub.input[1] != mu:
                    continue
                c = sub.output[0]
                for sq in self._only(c, ("Pow", "Mul")):
                    if sq.op_type == "Pow" and not (sq.input[0] == c and _is_two(self.const(sq.input[1]))):
                        continue
                    if sq.op_type == "Mul" and not (sq.input[0] == c and sq.input[1] == c):
                        continue
                    for vn in self._only(sq.output[0], ("ReduceMean",)):
                        v = self._mean_over_last(vn, sq.output[0])
                        if v is None:
                            continue
                        for add in self._only(v, ("Add",)):
                            other = add.input[1] if add.input[0] == v else add.input[0]
                            e = self.const(other)
                            if e is None or np.asarray(e).size != 1:
                                continue
                            eps = float(np.asarray(e).reshape(-1)[0])
                            for sq_node in self._only(add.output[0], ("Sqrt",)):
                                s = sq_node.output[0]
                                for dv in self._only(s, ("Div",)):
                                    if dv.input[0] == c and dv.input[1] == s:
                                        self.ln_sites[x].append((dv.output[0], eps))
                                for rc in self._only(s, ("Reciprocal",)):
                                    for mul in self._only(rc.output[0], ("Mul",)):
                                        if set(mul.input) == {c, rc.output[0]}:
                                            self.ln_sites[x].append((mul.output[0], eps))

    # ---------------------------------------------------------------- LayerNorms written as algebra
    def _find_ln_algebra(self):
        """LayerNorms the exporters write as algebra (tf2onnx: rsqrt(var + eps) * gamma times x and
        mean separately, var as mean(x^2) - mean(x)^2 under Max(., 0), GlobalAveragePool means):
        every value from a mean over x's last axis is tracked as a polynomial in x, mean(x),
        mean(x^2) and r = 1/sqrt(var(x) + eps) with per-channel coefficients; a value equal to
        gamma * r * (x - mean x) + beta is a LayerNorm site of x."""
        for node in self.nodes:
            if node.domain not in ("", "ai.onnx"):
                continue
            x = node.input[0] if node.input else ""
            if not x or self._mean_kind(node) is None or x in self._alg_done:
                continue
            self._alg_done.add(x)
            try:
                self._ln_algebra_from(x)
            except Exception:
                continue

    def _mean_kind(self, node):
        r = self.rank(node.input[0]) if node.input else None
        if r is None or r < 2:
            return None
        if node.op_type == "ReduceMean" and reduce_axes(self, node) == (r - 1,):
            return "keep" if self.attrs(node).get("keepdims", 1) else "drop"
        if node.op_type == "GlobalAveragePool" and r == 3:
            return "keep"
        return None

    def _ln_algebra_from(self, x):
        d = self.shape(x)[-1]
        if not isinstance(d, int):
            return
        r = self.rank(x)
        expr = {x: {(1, 0, 0, None): np.float64(1.0)}}
        frontier = [x]
        seen_nodes = set()
        budget = 64
        while frontier and budget > 0:
            v = frontier.pop(0)
            for n, _k in self.consumers.get(v, ()):
                if id(n) in seen_nodes or n.domain not in ("", "ai.onnx") or not n.output or not n.output[0]:
                    continue
                ins = [i for i in n.input if i]
                if not all(i in expr or self.is_const(i) for i in ins):
                    continue
                seen_nodes.add(id(n))
                budget -= 1
                e = self._alg_step(n, expr, d, r)
                if e is None:
                    continue
                y = n.output[0]
                expr[y] = e
                frontier.append(y)
                site = _ln_form(e)
                if site is not None:
                    eps, g, b = site
                    self.ln_sites[x].append((y, eps, g, b))

    def _alg_const(self, name, d, r):
        c = self.const(name)
        if c is None:
            return None
        c = np.asarray(c, np.float64)
        if c.ndim > r:
            return None
        if c.size == 1:
            return c.reshape(())
        full = c.reshape((1,) * (r - c.ndim) + c.shape)
        if any(k != 1 for k in full.shape[:-1]) or full.shape[-1] != d:
            return None
        return full.reshape(-1)

    def _alg_step(self, n, expr, d, r):
        op, ins = n.op_type, list(n.input)

        def get(i):
            if i in expr:
                return expr[i]
            c = self._alg_const(i, d, r)
            return None if c is None else {(0, 0, 0, None): c}

        if op in ("Identity",) or (op == "Cast" and self.attrs(n).get("to") == self.elem(ins[0])):
            return get(ins[0])
        if op == "Unsqueeze" or op == "Squeeze":
            e = get(ins[0])
            return e if e is not None and all(m[0] == 0 for m in e) else None  # per-token values only
        if op in ("Add", "Sub", "Mul") and len(ins) == 2:
            a, b = get(ins[0]), get(ins[1])
            if a is None or b is None:
                return None
            if op == "Mul":
                return _poly_mul(a, b)
            return _poly_add(a, b, 1.0 if op == "Add" else -1.0)
        if op == "Neg":
            e = get(ins[0])
            return None if e is None else {m: -c for m, c in e.items()}
        if op == "Pow" and len(ins) == 2:
            e, k = get(ins[0]), self.const(ins[1])
            if e is None or k is None or np.asarray(k).size != 1 or float(np.asarray(k).reshape(-1)[0]) != 2.0:
                return None
            return _poly_mul(e, e)
        if op in ("ReduceMean", "GlobalAveragePool"):
            if self._mean_kind(n) is None:
                return None
            return _poly_mean(get(ins[0]))
        if op == "Max" and len(ins) == 2:  # max(var, 0) = var
            a, b = get(ins[0]), get(ins[1])
            for p, q in ((a, b), (b, a)):
                if p is not None and q is not None and set(q) == {(0, 0, 0, None)} and np.all(q[(0, 0, 0, None)] == 0) \
                        and _variance(p) is not None and _variance(p) == 0.0:
                    return p
            return None
        if op == "Sqrt":
            e = get(ins[0])
            eps = _variance(e) if e is not None else None
            return None if eps is None else {("sqrt", eps): np.float64(1.0)}
        if op == "Reciprocal":
            e = get(ins[0])
            if e is None or len(e) != 1 or next(iter(e))[0] != "sqrt":
                return None
            return {(0, 0, 0, next(iter(e))[1]): np.float64(1.0) / e[next(iter(e))]}
        if op == "Div" and len(ins) == 2:
            a, b = get(ins[0]), get(ins[1])
            if a is None or b is None:
                return None
            if len(b) == 1 and next(iter(b))[0] == "sqrt":
                key = next(iter(b))
                return _poly_mul(a, {(0, 0, 0, key[1]): np.float64(1.0) / b[key]})
            if set(b) == {(0, 0, 0, None)} and np.all(b[(0, 0, 0, None)] != 0):
                return {m: c / b[(0, 0, 0, None)] for m, c in a.items()}
        return None

    def zero_mean_axis(self, name):
        """Axis along which the ORIGINAL value is zero-mean by construction: x - ReduceMean(x)."""
        p = self.producer.get(name)
        if p is None or p[0].op_type != "Sub" or p[0].domain not in ("", "ai.onnx"):
            return None
        x, m = p[0].input[0], p[0].input[1]
        q = self.producer.get(m)
        if q is None or q[0].op_type != "ReduceMean" or q[0].input[0] != x:
            return None
        axes = reduce_axes(self, q[0])
        r = self.rank(x)
        if axes is None or r is None or len(axes) != 1 or not self.attrs(q[0]).get("keepdims", 1):
            return None
        return axes[0] % r


    def is_zero_mean(self, name, axis) -> bool:
        """The ORIGINAL value is zero-mean along `axis` for every input: x - ReduceMean(x) over it
        (zero_mean_axis), a constant whose mean along it is exactly 0 (a zero cls token, summed
        exactly), or an Identity / Expand of one (Expand keeping that axis, not broadcasting
        along it). Its relation "equal" is then also "centered along axis"."""
        v, a = name, axis
        for _ in range(64):
            r = self.rank(v)
            if r is None or a is None or not 0 <= a < r:
                return False
            if self.zero_mean_axis(v) == a:
                return True
            if self.is_const(v):
                c = self.const(v)
                if c is None or np.ndim(c) != r or np.size(c) > 1 << 20:
                    return False
                c64 = np.moveaxis(np.asarray(c, np.float64), a, -1).reshape(-1, np.shape(c)[a])
                if not np.all(np.isfinite(c64)):
                    return False
                return all(math.fsum(row) == 0.0 for row in c64)
            p = self.producer.get(v)
            if p is None or p[0].domain not in ("", "ai.onnx") or not p[0].input:
                return False
            n = p[0]
            if n.op_type == "Identity":
                v = n.input[0]
                continue
            if n.op_type == "Expand":
                x = n.input[0]
                rin, sin, sout = self.rank(x), self.shape(x), self.shape(v)
                ai = a - (r - rin) if rin is not None else -1
                if ai < 0 or sin is None or sout is None or not isinstance(sout[a], int) or sin[ai] != sout[a]:
                    return False
                v, a = x, ai
                continue
            return False
        return False


_EXPANSION = "normopt.proof: expansion of a com.microsoft Skip norm"
# ops whose first output has the element type of their first input
_SAME_ELEM = {
    "Identity", "Relu", "Sigmoid", "Tanh", "Erf", "Sqrt", "Neg", "Exp", "Log", "Abs", "Reciprocal", "Softmax", "LogSoftmax",
    "Gelu", "LeakyRelu", "Elu", "Softplus", "HardSigmoid", "Floor", "Ceil", "Round", "Sign", "Dropout", "LayerNormalization",
    "SimplifiedLayerNormalization", "RMSNormalization", "Trilu", "Sin", "Cos", "BatchNormalization", "InstanceNormalization",
    "HardSwish", "Mish", "Selu", "ThresholdedRelu", "Celu", "PRelu", "Clip", "CumSum", "FastGelu", "QuickGelu", "BiasGelu",
    "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean",
    "MatMul", "Gemm", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Concat", "Gather", "Slice", "Expand", "Tile",
}


def expand_skip_norms(nodes):
    """The ORIGINAL's com.microsoft Skip(Simplified)LayerNormalization as their definition:
    s = input + skip (+ bias), output 3 = s, output 0 = (Simplified)LayerNormalization(s) over the
    last axis with the node's epsilon (contrib default 1e-12). Nodes whose mean / inv_std outputs
    are set stay as they are."""
    out = []
    for k, n in enumerate(nodes):
        if n.domain != "com.microsoft" or n.op_type not in ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization") \
                or any(o for o in n.output[1:3]) or len(n.input) < 3:
            out.append(n)
            continue
        simplified = n.op_type == "SkipSimplifiedLayerNormalization"
        start = len(out)
        eps = 1e-12
        for a in n.attribute:
            if a.name == "epsilon":
                eps = a.f
        ins = list(n.input)
        bias = ins[3] if simplified and len(ins) > 3 else (ins[4] if not simplified and len(ins) > 4 else "")
        beta = "" if simplified or len(ins) < 4 else ins[3]
        final = n.output[3] if len(n.output) > 3 and n.output[3] else f"{n.output[0]}__proof_sum"
        s1 = final if not bias else f"{final}__proof_pre_bias"
        out.append(onnx.helper.make_node("Add", [ins[0], ins[1]], [s1], name=f"{n.name}/add"))
        if bias:
            out.append(onnx.helper.make_node("Add", [s1, bias], [final], name=f"{n.name}/bias"))
        if n.output[0]:
            if simplified:
                out.append(onnx.helper.make_node("SimplifiedLayerNormalization", [final, ins[2]], [n.output[0]], name=n.name,
                                                 axis=-1, epsilon=eps))
            else:
                out.append(onnx.helper.make_node("LayerNormalization", [final, ins[2]] + ([beta] if beta else []), [n.output[0]],
                                                 name=n.name, axis=-1, epsilon=eps))
        for m in out[start:]:
            m.doc_string = _EXPANSION
    return out


# polynomials: {(power of x, power of mean x, power of mean x^2, eps of r or None): coef}, r = 1/sqrt(var + eps)


def _poly_add(a, b, sign):
    out = dict(a)
    for m, c in b.items():
        if m[0] == "sqrt":
            return None
        out[m] = out.get(m, 0.0) + sign * c
    return {m: c for m, c in out.items() if np.any(c != 0)}


def _poly_mul(a, b):
    out = {}
    for ma, ca in a.items():
        for mb, cb in b.items():
            if ma[0] == "sqrt" or mb[0] == "sqrt" or (ma[3] is not None and mb[3] is not None):
                return None
            m = (ma[0] + mb[0], ma[1] + mb[1], ma[2] + mb[2], ma[3] if ma[3] is not None else mb[3])
            if m[0] > 2:
                return None
            out[m] = out.get(m, 0.0) + ca * cb
    return {m: c for m, c in out.items() if np.any(c != 0)}


def _poly_mean(e):
    """mean over the last axis: x -> mean x, x^2 -> mean x^2 (scalar coefficients only)."""
    if e is None:
        return None
    out = {}
    for m, c in e.items():
        if m[0] == "sqrt":
            return None
        if m[0] == 0:
            key, val = m, np.float64(np.mean(c))
        elif np.ndim(c) == 0 or np.ptp(c) == 0:
            cc = np.float64(np.asarray(c).reshape(-1)[0])
            key, val = ((0, m[1] + 1, m[2], m[3]) if m[0] == 1 else (0, m[1], m[2] + 1, m[3])), cc
        else:
            return None
        out[key] = out.get(key, 0.0) + val
    return {m: c for m, c in out.items() if np.any(c != 0)}


def _variance(e):
    """eps when e = mean(x^2) - mean(x)^2 + eps (a variance plus a scalar), else None."""
    if e is None:
        return None
    keys = set(e)
    need = {(0, 0, 1, None), (0, 2, 0, None)}
    if not need <= keys or not keys <= need | {(0, 0, 0, None)}:
        return None
    if not (np.ndim(e[(0, 0, 1, None)]) == 0 and float(e[(0, 0, 1, None)]) == 1.0 and float(e[(0, 2, 0, None)]) == -1.0):
        return None
    eps = e.get((0, 0, 0, None), 0.0)
    if np.ndim(eps) != 0 or float(eps) < 0:
        return None
    return float(eps)


def _ln_form(e):
    """(eps, gamma, beta) when e = gamma * r * (x - mean x) + beta."""
    rx = [m for m in e if m[0] == 1 and m[1] == 0 and m[2] == 0 and m[3] is not None]
    if len(rx) != 1:
        return None
    eps = rx[0][3]
    g = e[rx[0]]
    rmu = (0, 1, 0, eps)
    allowed = {rx[0], rmu, (0, 0, 0, None)}
    if set(e) - allowed or rmu not in e:
        return None
    if not np.allclose(e[rmu], -np.asarray(g), rtol=1e-12, atol=0):
        return None
    return eps, np.asarray(g, np.float64), np.asarray(e.get((0, 0, 0, None), 0.0), np.float64)


_FIXED_TYPE = {op: onnx.TensorProto.BOOL for op in ("Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And",
                                                    "Or", "Xor", "IsNaN", "IsInf")}
_FIXED_TYPE.update({"Shape": onnx.TensorProto.INT64, "Size": onnx.TensorProto.INT64})
_UNARY = {"Identity", "Relu", "Sigmoid", "Tanh", "Erf", "Sqrt", "Neg", "Exp", "Log", "Abs", "Reciprocal", "Softmax",
          "Gelu", "LeakyRelu", "Elu", "Softplus", "HardSigmoid", "Not", "IsNaN", "Floor", "Ceil", "Round", "Sign"}


def _is_two(v) -> bool:
    return v is not None and np.asarray(v).size == 1 and float(np.asarray(v).reshape(-1)[0]) == 2.0


_NO_EVAL = {"If", "Loop", "Scan", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
            "Bernoulli", "DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear"}


def reduce_axes(view, node):
    """The reduction axes of a Reduce* node (attribute or, from opset 18, input), normalized;
    () when all axes are reduced; None when unknown."""
    a = view.attrs(node)
    r = view.rank(node.input[0])
    axes = a.get("axes")
    if len(node.input) > 1 and node.input[1]:
        v = view.const(node.input[1])
        if v is None:
            return None
        axes = tuple(int(i) for i in np.asarray(v).reshape(-1))
    if axes is None or len(axes) == 0:
        if a.get("noop_with_empty_axes", 0):
            return None
        return tuple(range(r)) if r is not None else None
    if r is None:
        return None
    return tuple(sorted(int(i) % r for i in axes))


def _dropout_inference(view, node) -> bool:
    if len(node.output) > 1 and node.output[1]:
        return False
    if len(node.input) > 2 and node.input[2]:
        v = view.const(node.input[2])
        return v is not None and not bool(np.asarray(v).reshape(-1)[0])
    return True


def _type_of(vi):
    tt = vi.type.tensor_type
    if not vi.type.HasField("tensor_type"):
        return None
    shape = None
    if tt.HasField("shape"):
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
    return (tt.elem_type, shape)


def _outer_refs(g: onnx.GraphProto):
    """Names a subgraph reads from its enclosing scopes."""
    local = {i.name for i in g.input} | {t.name for t in g.initializer}
    refs = []
    for n in g.node:
        local.update(o for o in n.output if o)
    for n in g.node:
        for i in n.input:
            if i and i not in local:
                refs.append(i)
        for subs in graph_attrs(n).values():
            for sg in subs:
                refs.extend(r for r in _outer_refs(sg) if r not in local)
    for o in g.output:
        if o.name not in local:
            refs.append(o.name)
    return list(dict.fromkeys(refs))


# reductions whose value on an empty tensor onnx.reference gives as ONNX Runtime does (ReduceMean:
# after its NaN is read as ONNX Runtime's 0)
_EMPTY_REDUCE = ("ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceSumSquare",
                 "ReduceLogSum", "ReduceLogSumExp", "ReduceMean")


def _eval_node(node, values, opsets):
    from onnx.reference import ReferenceEvaluator

    ins = []
    feeds = {}
    for k, (name, v) in enumerate(zip(node.input, values)):
        if not name:
            ins.append("")
            continue
        nm = f"i{k}"
        ins.append(nm)
        feeds[nm] = np.asarray(v)
    n2 = onnx.helper.make_node(node.op_type, ins, [f"o{k}" if o else "" for k, o in enumerate(node.output)], domain=node.domain)
    n2.attribute.extend(node.attribute)
    g = onnx.helper.make_graph([n2], "c", [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                                           for n, v in feeds.items()],
                               [onnx.helper.make_tensor_value_info(f"o{k}", 0, None) for k, o in enumerate(node.output) if o])
    m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in opsets.items()])
    import warnings

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # "mean of empty slice" and the like
        out = ReferenceEvaluator(m).run(None, feeds)
    it = iter(out)
    return [next(it) if o else None for o in node.output]


def infer_types(model: onnx.ModelProto) -> dict:
    """name -> (elem_type, shape) from ONNX shape inference on the skeleton (weights stay where they are).
    An initializer that is also a graph input (IR >= 4) is only a default a caller may override:
    ONNX's data propagation would take its value as fixed, so it is inferred as an input."""
    inputs = {i.name for i in model.graph.input}
    if (model.ir_version or 0) >= 4 and any(t.name in inputs for t in model.graph.initializer):
        plain = onnx.ModelProto()
        plain.CopyFrom(model)
        kept = [t for t in plain.graph.initializer if t.name not in inputs]
        del plain.graph.initializer[:]
        plain.graph.initializer.extend(kept)
        types = infer_types(plain)
        for t in model.graph.initializer:  # the defaults' own types (declared by their input entries too)
            types.setdefault(t.name, (t.data_type, tuple(int(d) for d in t.dims)))
        return types
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception:
        inferred = model
    out = TypeTable()

    def visit(g, top):
        own = {}
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            t = _type_of(vi)
            if t is not None:
                out.setdefault(vi.name, t)
                own.setdefault(vi.name, t)
        for t in g.initializer:
            out[t.name] = (t.data_type, tuple(int(d) for d in t.dims))
            own[t.name] = out[t.name]
        if not top:
            # sibling bodies (an If's branches) may reuse names: each body keeps its own types
            key = graph_key(g)
            if key in out.sub:
                prev = out.sub[key]
                own = {k: v for k, v in own.items() if prev.get(k, v) == v}
                own.update({k: None for k in prev if k not in own})
            out.sub[key] = own
        for n in g.node:
            for subs in graph_attrs(n).values():
                for sg in subs:
                    visit(sg, False)

    visit(inferred.graph, True)
    return out


class TypeTable(dict):
    """name -> type of the main graph; .sub: graph_key(body) -> the body's own name -> type."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.sub = {}


def graph_key(g):
    return (g.name, tuple(o for n in g.node for o in n.output), tuple(i.name for i in g.input))
