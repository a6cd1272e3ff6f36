"""The prover's own symbolic shape tracker (independent of the optimizer's shape inference).

Every dim is an integer polynomial in the graph inputs' dims (a named dim_param is its name, an
unnamed one ``?input:k``), so facts hold for every size the inputs can take: ``Shape(x)[1] * 8``
is the polynomial ``8*seq``, the same in both graphs because both read the same inputs. Small
integer tensors (shape vectors, indices) carry their values as such polynomials, so a shape
subgraph (Shape, Gather, Slice, Concat, Cast, Unsqueeze, arithmetic, Equal/Where of the -1
tricks exporters emit, ReduceProd, Range, ConstantOfShape, ...) evaluates to an exact value where
its dims are static, and to a symbolic one where they are not.

Only what is true for all sizes is derived: a dim is >= 0, so ``Equal(seq, -1)`` is false; a
division is kept only when it is exact as polynomials; a Slice of a symbolic dim is known only
when it keeps the whole dim. Anything else is unknown (None), which can cost a proof, never make
one. Dims are assumed < 2**31 (an end index >= 2**31 - 1 means "to the end").
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

MAX_VALS = 64  # integer tensors up to this many elements carry their values
BIG = 2 ** 31 - 1


class Sym:
    """An integer polynomial over dim names: {monomial (sorted names): coefficient}."""

    __slots__ = ("terms",)

    def __init__(self, terms):
        self.terms = {m: c for m, c in terms.items() if c}

    @staticmethod
    def var(name):
        return Sym({(name,): 1})

    def __eq__(self, other):
        return isinstance(other, Sym) and self.terms == other.terms

    def __hash__(self):
        return hash(frozenset(self.terms.items()))

    def __repr__(self):
        parts = []
        for m, c in sorted(self.terms.items()):
            s = "*".join(m)
            parts.append(str(c) if not m else (s if c == 1 else f"{c}*{s}"))
        return "+".join(parts) or "0"


def norm(x):
    if isinstance(x, Sym):
        if not x.terms:
            return 0
        if set(x.terms) == {()}:
            return int(x.terms[()])
        return x
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    return None


def _terms(x):
    return x.terms if isinstance(x, Sym) else ({(): int(x)} if x else {})


def add(a, b, sign=1):
    if a is None or b is None or isinstance(a, bool) or isinstance(b, bool):
        return None
    t = dict(_terms(a))
    for m, c in _terms(b).items():
        t[m] = t.get(m, 0) + sign * c
    return norm(Sym(t))


def mul(a, b):
    if a is None or b is None or isinstance(a, bool) or isinstance(b, bool):
        return None
    t = {}
    for ma, ca in _terms(a).items():
        for mb, cb in _terms(b).items():
            m = tuple(sorted(ma + mb))
            t[m] = t.get(m, 0) + ca * cb
    return norm(Sym(t))


def div(a, b):
    """Exact division only (integer division of ints as ONNX does, truncating)."""
    if a is None or b is None or isinstance(a, bool) or isinstance(b, bool):
        return None
    if isinstance(a, int) and isinstance(b, int):
        if b == 0:
            return None
        q = abs(a) // abs(b)
        return q if (a >= 0) == (b > 0) else -q
    tb = _terms(b)
    if len(tb) != 1:
        return None
    (mb, cb), = tb.items()
    out = {}
    for m, c in _terms(a).items():
        rest = list(m)
        for n in mb:
            if n not in rest:
                return None
            rest.remove(n)
        if c % cb:
            return None
        out[tuple(rest)] = c // cb
    return norm(Sym(out))


def sign(x):
    """1 / 0 / -1 when the sign of x holds for every size (dims >= 0); None otherwise."""
    x = norm(x)
    if x is None or isinstance(x, bool):
        return None
    if isinstance(x, int):
        return (x > 0) - (x < 0)
    c0 = x.terms.get((), 0)
    others = [c for m, c in x.terms.items() if m]
    if all(c >= 0 for c in others) and c0 > 0:
        return 1
    if all(c <= 0 for c in others) and c0 < 0:
        return -1
    return None


def cmp(op, a, b):
    if a is None or b is None:
        return None
    if isinstance(a, bool) or isinstance(b, bool):
        return (a == b) if op == "Equal" and isinstance(a, bool) and isinstance(b, bool) else None
    d = add(a, b, -1)
    if d == 0:
        s = 0
    else:
        s = sign(d)
        if s is None:
            return None
    return {"Equal": s == 0, "Less": s < 0, "Greater": s > 0, "LessOrEqual": s <= 0, "GreaterOrEqual": s >= 0}[op]


def nonneg(x) -> bool:
    x = norm(x)
    if isinstance(x, bool) or x is None:
        return False
    return x >= 0 if isinstance(x, int) else all(c >= 0 for c in x.terms.values())


MINS = {}  # the name of a min(c, e) atom -> (c, e): a Slice [0:e] of a static dim c


def min_atom(c: int, e):
    name = f"min({c},{e!r})"
    MINS[name] = (c, e)
    return Sym.var(name)


def _min_of(x):
    if isinstance(x, Sym) and len(x.terms) == 1:
        (m, k), = x.terms.items()
        if k == 1 and len(m) == 1 and m[0] in MINS:
            return MINS[m[0]]
    return None


def bcast(a, b):
    if a is None or b is None:
        return None
    if len(a) < len(b):
        a, b = b, a
    b = [1] * (len(a) - len(b)) + list(b)
    out = []
    for x, y in zip(a, b):
        if x == y:
            out.append(x)
        elif x == 1:
            out.append(y)
        elif y == 1:
            out.append(x)
        elif isinstance(x, int) and isinstance(y, Sym):
            out.append(x)  # y must be x (or 1)
        elif isinstance(y, int) and isinstance(x, Sym):
            out.append(y)
        elif _min_of(x) is not None and _min_of(x)[1] == y:
            out.append(y)  # min(c, e) against e: e whenever the broadcast is valid (c >= e, or c == 1)
        elif _min_of(y) is not None and _min_of(y)[1] == x:
            out.append(x)
        else:
            out.append(None)
    return out


def prod(dims):
    p = 1
    for d in dims:
        p = mul(p, d)
    return p


UNARY = {"Identity", "Relu", "Sigmoid", "Tanh", "Erf", "Sqrt", "Neg", "Exp", "Log", "Abs", "Reciprocal", "Softmax", "LogSoftmax",
         "Gelu", "LeakyRelu", "Elu", "Softplus", "HardSigmoid", "Not", "IsNaN", "IsInf", "Floor", "Ceil", "Round", "Sign", "Cast",
         "Dropout", "LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization", "Trilu", "Sin", "Cos",
         "DequantizeLinear", "QuantizeLinear", "BatchNormalization", "InstanceNormalization", "CastLike", "Hardmax",
         "HardSwish", "Mish", "Selu", "ThresholdedRelu", "Celu", "PRelu", "Clip", "CumSum", "FastGelu", "QuickGelu",
         "BiasGelu", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization"}
BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mod", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual",
          "And", "Or", "Xor", "BitShift", "Where", "Sum", "Mean"}


def shape_range(start, end, r):
    """The dims [start, end) a Shape of a rank-r value takes (ONNX's clamping; end None: r)."""
    start, end = int(start or 0), r if end is None else int(end)
    return max(0, min(r, start + r if start < 0 else start)), max(0, min(r, end + r if end < 0 else end))


class Tracker:
    """shape[name]: list of dims (int, Sym or None) or None; value[name]: flat list of ints /
    bools / Syms (None for unknown elements) of a small integer tensor, row-major."""

    def __init__(self, graph, opsets, parent=None):
        self.opset = opsets.get("", opsets.get("ai.onnx", 0))
        self.parent = parent
        self.shape, self.value = {}, {}
        self.fixed = {}  # name -> shape of an evaluated constant, taken as it is (GraphView sets it)
        for vi in graph.input:
            tt = vi.type.tensor_type
            if not vi.type.HasField("tensor_type") or not tt.HasField("shape"):
                continue
            self.shape[vi.name] = [d.dim_value if d.HasField("dim_value") else Sym.var(d.dim_param or f"?{vi.name}:{k}")
                                   for k, d in enumerate(tt.shape.dim)]
        fed = {vi.name for vi in graph.input}
        for t in graph.initializer:
            self.shape[t.name] = [int(d) for d in t.dims]
            if t.name not in fed:  # an initializer that is also a graph input is a default: a caller may feed another
                self._const(t.name, t)

    def _const(self, name, t):
        n = int(np.prod(t.dims)) if len(t.dims) else 1
        if n > MAX_VALS or t.data_type not in (onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.BOOL,
                                                onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16):
            return
        if t.data_location == onnx.TensorProto.EXTERNAL:
            return
        try:
            a = numpy_helper.to_array(t)
        except Exception:
            return
        self.value[name] = [bool(x) if a.dtype == np.bool_ else int(x) for x in a.reshape(-1)]

    def S(self, name):
        if name in self.shape:
            return self.shape[name]
        return self.parent.S(name) if self.parent else None

    def V(self, name):
        if name in self.value:
            return self.value[name]
        if name in self.shape:
            return None
        return self.parent.V(name) if self.parent else None

    def run(self, nodes):
        for node in nodes:
            if node.domain not in ("", "ai.onnx") and not (node.domain == "com.microsoft" and node.op_type in UNARY):
                continue
            if node.output and node.output[0] in self.fixed:
                self.shape[node.output[0]] = list(self.fixed[node.output[0]])  # an evaluated constant's own shape
                continue
            try:
                self._node(node)
            except Exception:
                continue  # what is not understood stays unknown
            for o in node.output:
                v = self.value.get(o)
                if v is not None and ((v and all(x is None for x in v)) or len(v) > MAX_VALS):
                    del self.value[o]

    def _set(self, name, shape, value=None):
        if not name:
            return
        self.shape[name] = None if shape is None else [norm(d) if d is not None else None for d in shape]
        if value is not None:
            self.value[name] = [norm(v) if v is not None else None for v in value]

    def _attr(self, node, key, default=None):
        for a in node.attribute:
            if a.name == key:
                return onnx.helper.get_attribute_value(a)
        return default

    def _ints(self, name):
        v = self.V(name) if name else None
        if v is None or any(not isinstance(x, int) or isinstance(x, bool) for x in v):
            return None
        return v

    def _node(self, node):
        op, ins, outs = node.op_type, list(node.input), list(node.output)
        S, V = self.S, self.V
        x = ins[0] if ins else ""
        if op == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    self.shape[outs[0]] = [int(d) for d in a.t.dims]
                    self._const(outs[0], a.t)
                elif a.name in ("value_int", "value_ints"):
                    v = onnx.helper.get_attribute_value(a)
                    v = [int(v)] if a.name == "value_int" else [int(i) for i in v]
                    self._set(outs[0], [] if a.name == "value_int" else [len(v)], v)
                elif a.name in ("value_float", "value_floats"):
                    v = onnx.helper.get_attribute_value(a)
                    self._set(outs[0], [] if a.name == "value_float" else [len(v)])
            return
        if op == "Shape":
            s = S(x)
            if s is None:
                return
            start, end = shape_range(self._attr(node, "start", 0), self._attr(node, "end"), len(s))
            part = s[start:end]
            self._set(outs[0], [len(part)], part)
            return
        if op == "Size":
            s = S(x)
            self._set(outs[0], [], [prod(s) if s is not None and None not in s else None])
            return
        if op in UNARY:
            s = S(x)
            if op in ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization"):
                self._set(outs[0], s)
                if len(outs) > 3:
                    self._set(outs[3], s)
                return
            self._set(outs[0], s)
            v = V(x)
            if op in ("Identity",) or (op == "Cast" and self._attr(node, "to") in (6, 7)):
                if v is not None:
                    self._set(outs[0], s, [int(t) if isinstance(t, bool) else t for t in v])
            elif op == "Cast" and self._attr(node, "to") == 9 and v is not None:
                self._set(outs[0], s, [None if t is None else (bool(t) if isinstance(t, (int, bool)) else
                                                             (True if sign(t) == 1 else None)) for t in v])
            elif op == "Neg" and v is not None:
                self._set(outs[0], s, [mul(t, -1) for t in v])
            elif op == "Not" and v is not None:
                self._set(outs[0], s, [None if not isinstance(t, bool) else not t for t in v])
            return
        if op in BINARY and len(ins) >= 2:
            shapes = [S(i) for i in ins]
            out = shapes[0]
            for s in shapes[1:]:
                out = bcast(out, s)
            self._set(outs[0], out)
            vals = [V(i) for i in ins]
            if (op in ("Sum", "Mean") and len(ins) != 2) or (op != "Where" and len(ins) != 2):
                return
            if out is None or None in out or any(v is None for v in vals) or any(not isinstance(d, int) for d in out):
                return
            n = int(np.prod(out)) if out else 1
            if n > MAX_VALS:
                return
            full = [self._bvals(v, s, out) for v, s in zip(vals, shapes)]
            if any(f is None for f in full):
                return
            res = [self._elem(op, *args) for args in zip(*full)]
            self._set(outs[0], out, res)
            return
        if op == "Gather":
            s, si = S(x), S(ins[1])
            axis = int(self._attr(node, "axis", 0))
            if s is None or si is None:
                return
            axis %= len(s)
            self._set(outs[0], s[:axis] + si + s[axis + 1:])
            v, idx = V(x), self._ints(ins[1])
            if v is not None and idx is not None and len(s) == 1:
                n = len(v)
                self._set(outs[0], si, [v[i] if -n <= i < n else None for i in idx])
            return
        if op == "Concat":
            shapes = [S(i) for i in ins]
            if any(s is None for s in shapes):
                return
            r = len(shapes[0])
            axis = int(self._attr(node, "axis", 0)) % r
            out = list(shapes[0])
            for s in shapes[1:]:
                out[axis] = add(out[axis], s[axis])
                for k in range(r):
                    if k != axis and out[k] != s[k]:
                        out[k] = out[k] if isinstance(out[k], int) else (s[k] if isinstance(s[k], int) else None)
            vals = [V(i) for i in ins]
            self._set(outs[0], out, [t for v in vals for t in v] if r == 1 and all(v is not None for v in vals) else None)
            return
        if op in ("Unsqueeze", "Squeeze"):
            s = S(x)
            axes = self._attr(node, "axes")
            if len(ins) > 1 and ins[1]:
                axes = self._ints(ins[1])
            if s is None:
                return
            if op == "Squeeze":
                if axes is None:
                    if any(not isinstance(d, int) for d in s):
                        return
                    axes = [k for k, d in enumerate(s) if d == 1]
                ax = {int(a) % len(s) for a in axes}
                new = [d for k, d in enumerate(s) if k not in ax]
            else:
                if axes is None:
                    return
                r = len(s) + len(axes)
                ax = {int(a) % r for a in axes}
                it = iter(s)
                new = [1 if k in ax else next(it) for k in range(r)]
            self._set(outs[0], new, V(x))
            return
        if op == "Slice":
            self._slice(node)
            return
        if op in ("ReduceProd", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceMean", "ReduceL2", "ReduceSumSquare", "ArgMax",
                  "ArgMin", "ReduceLogSumExp"):
            s = S(x)
            if s is None:
                return
            keep = int(self._attr(node, "keepdims", 1))
            if op in ("ArgMax", "ArgMin"):
                axes = [int(self._attr(node, "axis", 0))]
            else:
                axes = self._attr(node, "axes")
                if len(ins) > 1 and ins[1]:
                    axes = self._ints(ins[1])
                    if axes is None:
                        return
                if not axes:
                    if self._attr(node, "noop_with_empty_axes", 0):
                        self._set(outs[0], s, V(x))
                        return
                    axes = list(range(len(s)))
            ax = {int(a) % len(s) for a in axes} if s else set()
            new = [1 if k in ax else d for k, d in enumerate(s)] if keep else [d for k, d in enumerate(s) if k not in ax]
            v = V(x)
            val = None
            if v is not None and len(s) == 1 and op in ("ReduceProd", "ReduceSum") and 0 in ax:
                acc = 1 if op == "ReduceProd" else 0
                for t in v:
                    acc = mul(acc, t) if op == "ReduceProd" else add(acc, t)
                val = [acc]
            self._set(outs[0], new, val)
            return
        if op == "Range":
            a, b, c = (self._ints(i) for i in ins[:3])
            if a and b and c and c[0] != 0:
                vals = list(range(a[0], b[0], c[0]))
                self._set(outs[0], [len(vals)], vals if len(vals) <= MAX_VALS else None)
            elif a and c and c[0] == 1 and V(ins[1]) is not None:
                n = add(V(ins[1])[0], a[0], -1)  # max(0, limit - start): known when it is >= 0 for every size
                self._set(outs[0], [n if nonneg(n) else None])
            return
        if op == "ConstantOfShape":
            v = V(x)
            if v is None:
                return
            fill = 0
            for a in node.attribute:
                if a.name == "value":
                    arr = numpy_helper.to_array(a.t).reshape(-1)
                    fill = int(arr[0]) if arr.dtype.kind in "iub" else None
            n = prod(v) if None not in v else None
            self._set(outs[0], v, [fill] * n if isinstance(n, int) and n <= MAX_VALS and fill is not None else None)
            return
        if op == "Expand":
            s, shp = S(x), V(ins[1])
            if s is None or shp is None:
                return
            out = bcast(s, shp)
            v = V(x)
            val = None
            if v is not None and out is not None and all(isinstance(d, int) for d in out) and int(np.prod(out) if out else 1) <= MAX_VALS:
                val = self._bvals(v, s, out)
            self._set(outs[0], out, val)
            return
        if op == "Reshape":
            s, shp = S(x), V(ins[1])
            if shp is None:
                return
            allowzero = int(self._attr(node, "allowzero", 0))
            dims = []
            for k, d in enumerate(shp):
                if d == 0 and not allowzero and not isinstance(d, bool):
                    dims.append(s[k] if s is not None and k < len(s) else None)
                else:
                    dims.append(d)
            if -1 in dims:
                k = dims.index(-1)
                rest = [d for j, d in enumerate(dims) if j != k]
                total = prod(s) if s is not None and None not in s else None
                known = prod(rest) if None not in rest else None
                dims[k] = div(total, known) if total is not None and known not in (None, 0) else None
            dims = [d if d is None or not isinstance(d, int) or d >= 0 else None for d in dims]
            self._set(outs[0], dims, V(x))
            return
        if op == "Transpose":
            s = S(x)
            if s is None:
                return
            perm = self._attr(node, "perm") or list(reversed(range(len(s))))
            self._set(outs[0], [s[p] for p in perm])
            return
        if op == "Flatten":
            s = S(x)
            if s is None:
                return
            axis = int(self._attr(node, "axis", 1)) % (len(s) + 1) if s else 0
            a, b = s[:axis], s[axis:]
            self._set(outs[0], [prod(a) if None not in a else None, prod(b) if None not in b else None])
            return
        if op in ("MatMul", "MatMulInteger"):
            a, b = S(ins[0]), S(ins[1])
            if a is None or b is None or not a or not b:
                return
            if len(a) == 1 and len(b) == 1:
                self._set(outs[0], [])
            elif len(b) == 1:
                self._set(outs[0], a[:-1])
            elif len(a) == 1:
                self._set(outs[0], b[:-2] + b[-1:])
            else:
                batch = bcast(a[:-2], b[:-2])
                self._set(outs[0], None if batch is None else batch + [a[-2], b[-1]])
            return
        if op in ("Conv", "MaxPool", "AveragePool") and len(outs) >= 1:
            # batch kept as it is; channels from the weight (Conv) or the input (pooling); each
            # spatial dim from the integer formula, computed only where it is an integer
            s = S(x)
            if s is None or len(s) < 3:
                return
            sp = s[2:]
            if op == "Conv":
                w = S(ins[1]) if len(ins) > 1 else None
                if w is None or len(w) != len(s) or not isinstance(w[0], int):
                    return
                kernel = self._attr(node, "kernel_shape") or list(w[2:])
                chan = w[0]
            else:
                kernel = self._attr(node, "kernel_shape")
                chan = s[1]
            n = len(sp)
            if not kernel or len(kernel) != n or not all(isinstance(d, int) and not isinstance(d, bool) for d in sp):
                return
            strides = self._attr(node, "strides") or [1] * n
            dil = self._attr(node, "dilations") or [1] * n
            pads = self._attr(node, "pads") or [0] * (2 * n)
            auto = self._attr(node, "auto_pad", b"NOTSET")
            auto = auto.decode() if isinstance(auto, bytes) else str(auto)
            ceil = int(self._attr(node, "ceil_mode", 0) or 0)
            out = []
            for i in range(n):
                k = (kernel[i] - 1) * dil[i] + 1
                if auto in ("SAME_UPPER", "SAME_LOWER"):
                    out.append(-(-sp[i] // strides[i]))
                elif auto == "VALID":
                    out.append((sp[i] - k) // strides[i] + 1)
                elif auto == "NOTSET":
                    span = sp[i] + pads[i] + pads[i + n] - k
                    d = (-(-span // strides[i]) if ceil else span // strides[i]) + 1
                    if ceil and (d - 1) * strides[i] >= sp[i] + pads[i]:
                        d -= 1  # the last window must start inside the input or its left pad
                    out.append(d)
                else:
                    return
            if any(d <= 0 for d in out):
                return
            self._set(outs[0], [s[0], chan] + out)
            return
        if op == "Gemm":
            a, b = S(ins[0]), S(ins[1])
            if a is None or b is None or len(a) != 2 or len(b) != 2:
                return
            m = a[1] if self._attr(node, "transA", 0) else a[0]
            n = b[0] if self._attr(node, "transB", 0) else b[1]
            self._set(outs[0], [m, n])
            return
        if op == "Split":
            s = S(x)
            if s is None:
                return
            axis = int(self._attr(node, "axis", 0)) % len(s)
            sizes = self._attr(node, "split")
            if len(ins) > 1 and ins[1]:
                sizes = self._ints(ins[1])
            if sizes is None:
                n = int(self._attr(node, "num_outputs", len(outs)))
                if not isinstance(s[axis], int) or s[axis] % n:
                    return
                sizes = [s[axis] // n] * n
            for o, d in zip(outs, sizes):
                self._set(o, s[:axis] + [int(d)] + s[axis + 1:])
            return
        if op == "Einsum":
            eq = self._attr(node, "equation")
            eq = (eq.decode() if isinstance(eq, bytes) else eq).replace(" ", "")
            if "..." in eq or "->" not in eq:
                return
            lhs, rhs = eq.split("->")
            dims = {}
            for term, i in zip(lhs.split(","), ins):
                s = S(i)
                if s is None or len(s) != len(term):
                    return
                for ch, d in zip(term, s):
                    if ch not in dims or (not isinstance(dims[ch], int) and isinstance(d, int) and d != 1):
                        dims[ch] = d
                    elif dims[ch] == 1 and d is not None:
                        dims[ch] = d
            self._set(outs[0], [dims.get(ch) for ch in rhs])
            return
        if op in ("GlobalAveragePool", "GlobalMaxPool"):
            s = S(x)
            if s is not None and len(s) >= 2:
                self._set(outs[0], s[:2] + [1] * (len(s) - 2))
            return
        if op in ("RandomUniformLike", "RandomNormalLike", "Bernoulli"):
            self._set(outs[0], S(x))  # the input's shape (its values are drawn)
            return
        if op == "GatherElements":
            self._set(outs[0], S(ins[1]))  # the indices' shape
            return
        if op == "TopK":
            s, k = S(x), V(ins[1]) if len(ins) > 1 else None
            if s is None or k is None or len(k) != 1:
                return
            ax = self._attr(node, "axis", -1)
            ax = ax + len(s) if ax < 0 else ax
            if not 0 <= ax < len(s):
                return
            out = list(s)
            out[ax] = k[0]
            for o in outs[:2]:
                self._set(o, out)
            return
        if op == "Tile":
            s, reps = S(x), V(ins[1])
            if s is None or reps is None or len(reps) != len(s):
                return
            self._set(outs[0], [mul(d, r) for d, r in zip(s, reps)])
            return
        if op == "Resize" and self.opset >= 11 and len(ins) > 3 and ins[3]:
            # by `sizes`: the output dims are those values (on `axes`, opset 18, the others kept);
            # a policy that keeps the aspect ratio rescales them, so it is left unknown
            s, sizes = S(x), V(ins[3])
            if s is None or sizes is None or any(v is None for v in sizes):
                return
            if (self._attr(node, "keep_aspect_ratio_policy", b"stretch") or b"stretch") not in (b"stretch", "stretch"):
                return
            axes = self._attr(node, "axes")
            if axes is None:
                if len(sizes) != len(s):
                    return
                self._set(outs[0], list(sizes))
                return
            out = list(s)
            if len(axes) != len(sizes):
                return
            for a, v in zip(axes, sizes):
                if not -len(s) <= a < len(s):
                    return
                out[a % len(s)] = v
            self._set(outs[0], out)
            return

    def _slice(self, node):
        ins, outs = list(node.input), list(node.output)
        s = self.S(ins[0])
        if s is None:
            return
        r = len(s)
        if len(ins) >= 3:
            starts, ends = self.V(ins[1]), self.V(ins[2])
            axes = self._ints(ins[3]) if len(ins) > 3 and ins[3] else list(range(len(starts or [])))
            steps = self._ints(ins[4]) if len(ins) > 4 and ins[4] else [1] * len(starts or [])
        else:
            starts, ends = self._attr(node, "starts"), self._attr(node, "ends")
            axes = self._attr(node, "axes") or list(range(len(starts or [])))
            steps = [1] * len(starts or [])
        if starts is None or ends is None or axes is None or steps is None:
            self._set(outs[0], [None] * r)
            return
        out = list(s)
        picks = {}
        for st, en, ax, sp in zip(starts, ends, axes, steps):
            ax = int(ax) % r
            d = s[ax]
            if sp == 0 or isinstance(sp, bool) or not isinstance(sp, int):
                return
            if isinstance(d, int) and isinstance(st, int) and isinstance(en, int) and not isinstance(st, bool) \
                    and not isinstance(en, bool):
                idx = _slice_indices(d, int(st), int(en), int(sp))
                out[ax] = len(idx)
                picks[ax] = idx
            elif sp == 1 and st == 0 and ((isinstance(en, int) and en >= BIG) or en == d
                                          or (isinstance(en, Sym) and sign(add(en, d, -1)) == 1)):
                out[ax] = d
            elif sp == 1 and st == 0 and isinstance(d, int) and isinstance(en, Sym) and nonneg(en):
                out[ax] = min_atom(d, en)
            else:
                out[ax] = None
        val = None
        v = self.V(ins[0])
        if v is not None and r == 1 and 0 in picks:
            val = [v[i] for i in picks[0]]
        elif v is not None and r == 1 and out[0] == s[0]:
            val = v
        self._set(outs[0], out, val)

    @staticmethod
    def _bvals(v, s, out):
        if s is None or None in s or any(not isinstance(d, int) for d in s):
            return None
        arr = np.empty(len(v), dtype=object)
        arr[:] = v
        try:
            return list(np.broadcast_to(arr.reshape(s), out).reshape(-1))
        except ValueError:
            return None

    @staticmethod
    def _elem(op, a, b=None, c=None):
        if op in ("Add", "Sum"):
            return add(a, b)
        if op == "Sub":
            return add(a, b, -1)
        if op == "Mul":
            return mul(a, b)
        if op == "Div":
            return div(a, b)
        if op in ("Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual"):
            return cmp(op, a, b)
        if op in ("Max", "Min"):
            if a == b:
                return a
            s = sign(add(a, b, -1)) if not (isinstance(a, bool) or isinstance(b, bool)) else None
            if s is None:
                return None
            return (a if s > 0 else b) if op == "Max" else (b if s > 0 else a)
        if op == "Where":
            if isinstance(a, bool):
                return b if a else c
            return None
        if op in ("And", "Or", "Xor"):
            if not isinstance(a, bool) or not isinstance(b, bool):
                return None
            return {"And": a and b, "Or": a or b, "Xor": a != b}[op]
        if op == "Mod" and isinstance(a, int) and isinstance(b, int) and b:
            return a % b if (a >= 0 and b > 0) else None
        return None


def _slice_indices(d, st, en, sp):
    """The indices ONNX's Slice picks along a dim of length d."""
    if st < 0:
        st += d
    if en < 0:
        en += d
    if sp > 0:
        st, en = max(0, min(d, st)), max(0, min(d, en))
    else:
        st, en = max(-1, min(d - 1, st)), max(-1, min(d - 1, en))
    return list(range(st, en, sp))


def to_dim(d):
    """A tracked dim as the prover's shape vocabulary: an int, or a canonical string naming the
    polynomial (equal strings: equal dims for every size), or None."""
    if d is None or isinstance(d, bool):
        return None
    if isinstance(d, int):
        return d if d >= 0 else None
    if len(d.terms) == 1 and next(iter(d.terms.values())) == 1 and len(next(iter(d.terms))) == 1:
        return next(iter(d.terms))[0]
    return f"({d!r})"
