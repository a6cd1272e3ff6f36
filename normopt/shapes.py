"""Shape inference: every value's dtype and shape, inferred once on the skeleton, then kept
current incrementally after each pass.

The engine walks the graph node by node in topological order. For each node it computes its
outputs' (dtype, shape) from its inputs':
  - by its own rule for the ops transformers and CNNs are built of (elementwise with
    broadcasting, MatMul/Gemm, the layout ops, Reshape/Expand/Slice/Gather/Concat, the
    reductions, the norms ONNX Runtime fuses, Resize by integer scales), where a dynamic dim
    is a polynomial over the model's dim names ("batch_size*sequence_length", "2*H");
  - otherwise by ONNX's own per-node inference (onnx.shape_inference.infer_node_outputs),
    which handles every standard op on static dims (Conv, pooling, Resize by fractional
    scales, ...).
Small integer tensors (Shape and what is computed from it, small constants) carry their
values as dims too, so Shape -> Gather -> Concat -> Reshape keeps "batch_size*sequence_length"
where ONNX's inference alone would give a fresh unknown. A dim nothing can express is an
opaque name of its own (``unk__<value>:<axis>``); a value nothing can shape has shape None,
and a pass that needs its shape declines with that reason.

Nothing here needs an optional package (no sympy, no symbolic engine): the output of a run
never depends on what else is installed.

Incremental: :class:`ShapeState` remembers, per node, a signature (op, attributes, input and
output identities) and, per value, what it inferred. After a pass it re-infers only the nodes
whose signature changed or that are new, and the nodes downstream of a value whose inferred
shape or value changed (early cut-off: a rewrite that keeps a value's shape stops there). A
pass need not report what it changed: the signatures are diffed, so a forgotten report cannot
leave a stale shape.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

SMALL_VALUE = 64  # integer tensors up to this many elements carry their values as dims
_INT_TYPES = {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT16, onnx.TensorProto.INT8,
              onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64}
_WIDE_INT = {onnx.TensorProto.INT64, onnx.TensorProto.INT32}  # a cast to these keeps a dim's value
_BIG = 2 ** 62


# ---------------------------------------------------------------------------------------------
# dims: int, or a polynomial with integer coefficients over atomic dim names


class Poly:
    """A dynamic dim: a sum of integer-coefficient monomials over atomic names. Exact integer
    arithmetic only (+, -, *, exact division); anything else becomes an opaque name."""

    __slots__ = ("terms", "_s")

    def __init__(self, terms):
        self.terms = tuple(sorted(((m, c) for m, c in terms if c), key=lambda mc: (not mc[0], mc[0])))  # ((names...), coeff), constant last
        self._s = None

    @staticmethod
    def atom(name: str) -> "Poly":
        return Poly([((name,), 1)])

    def __str__(self):
        if self._s is None:
            parts = []
            for m, c in self.terms:
                body = "*".join(m)
                if not m:
                    parts.append(str(c))
                elif c == 1:
                    parts.append(body)
                elif c == -1:
                    parts.append("-" + body)
                else:
                    parts.append(f"{c}*{body}")
            s = " + ".join(parts).replace("+ -", "- ")
            self._s = s
        return self._s

    def __eq__(self, other):
        return isinstance(other, Poly) and self.terms == other.terms

    def __hash__(self):
        return hash(self.terms)

    def __repr__(self):
        return f"Poly({self})"


def _norm(terms):
    acc = {}
    for m, c in terms:
        acc[m] = acc.get(m, 0) + c
    terms = [(m, c) for m, c in acc.items() if c]
    if not terms:
        return 0
    if len(terms) == 1 and terms[0][0] == ():
        return int(terms[0][1])
    return Poly(terms)


def _terms(d):
    return [((), int(d))] if isinstance(d, int) else list(d.terms)


def d_add(a, b):
    if isinstance(a, int) and isinstance(b, int):
        return a + b
    return _norm(_terms(a) + _terms(b))


def d_neg(a):
    return -a if isinstance(a, int) else _norm([(m, -c) for m, c in a.terms])


def d_sub(a, b):
    return d_add(a, d_neg(b))


def d_mul(a, b):
    if isinstance(a, int) and isinstance(b, int):
        return a * b
    out = []
    for ma, ca in _terms(a):
        for mb, cb in _terms(b):
            out.append((tuple(sorted(ma + mb)), ca * cb))
    return _norm(out)


def d_div(a, b):
    """a / b when it divides exactly (b a monomial), else None."""
    if isinstance(b, int):
        if b == 0:
            return None
        if isinstance(a, int):
            return a // b if a % b == 0 else None
        if all(c % b == 0 for _, c in a.terms):
            return _norm([(m, c // b) for m, c in a.terms])
        return None
    if len(b.terms) != 1:
        return 1 if a == b else None
    mb, cb = b.terms[0]
    out = []
    for m, c in _terms(a):
        rest = list(m)
        for n in mb:
            if n not in rest:
                return None
            rest.remove(n)
        if c % cb:
            return None
        out.append((tuple(rest), c // cb))
    return _norm(out)


def d_prod(dims):
    out = 1
    for d in dims:
        out = d_mul(out, d)
    return out


def parse(name: str):
    """A dim name as the model writes it: an expression of sums and products of names and
    integers ("past_sequence_length + sequence_length", "2*H") is read as one, so it equals the
    same dim computed in the graph; any other name is an atom."""
    import re

    parts = re.split(r"\s+([+-])\s+", name.strip())
    if len(parts) == 1 and "*" not in name:
        return Poly.atom(name)
    signs = [1] + [1 if op == "+" else -1 for op in parts[1::2]]
    out = 0
    for sign, term in zip(signs, parts[0::2]):
        if term.startswith("-"):
            sign, term = -sign, term[1:]
        factors = term.split("*")
        if not term or any(not f or any(c.isspace() for c in f) for f in factors):
            return Poly.atom(name)
        t = sign
        for f in factors:
            t = d_mul(t, int(f) if f.isdigit() else Poly.atom(f))
        out = d_add(out, t)
    return out


def from_gs(d, opaque: str):
    """A dim as graphsurgeon stores it (int, name, None) as an engine dim."""
    if isinstance(d, (int, np.integer)) and int(d) >= 0:
        return int(d)
    if isinstance(d, str) and d:
        return parse(d)
    return Poly.atom(opaque)


def to_gs(d):
    return d if isinstance(d, int) else str(d)


# ---------------------------------------------------------------------------------------------
# what the engine knows of a value


class Info:
    """dtype (ONNX elem type, 0 unknown), shape (list of dims, or None: unknown rank) and, for a
    small integer tensor, its value (a list of dims for rank 1, one dim for rank 0)."""

    __slots__ = ("dtype", "shape", "value")

    def __init__(self, dtype=0, shape=None, value=None):
        self.dtype, self.shape, self.value = int(dtype or 0), shape, value

    def key(self):
        return (self.dtype, None if self.shape is None else tuple(self.shape),
                None if self.value is None else (tuple(self.value) if isinstance(self.value, list) else self.value))

    def __repr__(self):
        return f"Info({self.dtype}, {self.shape}, {self.value})"


def elem_type(dtype) -> int:
    if dtype is None:
        return 0
    if isinstance(dtype, (int, np.integer)):
        return int(dtype)
    try:
        return int(onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
    except Exception:
        return 0


def _const_info(t: gs.Constant) -> Info:
    from . import graph as G

    et = elem_type(G.tensor_dtype(t))
    shape = [int(s) for s in t.shape]
    value = None
    if et in _INT_TYPES and int(np.prod(shape, dtype=np.int64)) <= SMALL_VALUE and len(shape) <= 1:
        try:
            v = np.asarray(G.const_value(t)).astype(np.int64)
            value = int(v) if v.ndim == 0 else [int(x) for x in v.reshape(-1)]
        except Exception:
            value = None
    return Info(et, shape, value)


# ---------------------------------------------------------------------------------------------
# rules


class _Ctx:
    def __init__(self, node, ins, opset):
        self.node, self.ins, self.opset = node, ins, opset

    def attr(self, k, default=None):
        return self.node.attrs.get(k, default)

    def opaque(self, i, axis):
        o = self.node.outputs[i]
        return Poly.atom(f"unk__{o.name}:{axis}")


def _bcast(shapes, cx, out_i=0):
    if any(s is None for s in shapes):
        return None
    if shapes:  # fast path, same result: every other shape is the longest one's, or 1s, aligned right
        top = max(shapes, key=len)
        n = len(top)
        for s in shapes:
            if s is top:
                continue
            k = n - len(s)
            if k < 0:
                break
            for a, d in enumerate(s):
                t = top[k + a]
                if not (d is t or (isinstance(d, int) and (d == 1 or (isinstance(t, int) and d == t)))):
                    break
            else:
                continue
            break
        else:
            return list(top)
    r = max((len(s) for s in shapes), default=0)
    padded = [[1] * (r - len(s)) + list(s) for s in shapes]
    out = []
    for ax in range(r):
        ds = [p[ax] for p in padded]
        ints = {d for d in ds if isinstance(d, int)}
        big = ints - {1}
        if len(big) > 1:
            return None  # invalid broadcast: leave it to nobody
        if big:
            out.append(next(iter(big)))
            continue
        syms = list(dict.fromkeys(d for d in ds if not isinstance(d, int)))
        if not syms:
            out.append(1)
        elif len(syms) == 1:
            out.append(syms[0])  # a dynamic dim broadcast against 1s (a valid model's dim it is)
        else:
            out.append(cx.opaque(out_i, ax))
    return out


def _axis(a, r):
    return a + r if a < 0 else a


_COMPARE = {"Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Not", "IsNaN", "IsInf"}
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Mod", "PRelu", "BitShift",
                "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "BitwiseAnd",
                "BitwiseOr", "BitwiseXor"}
_UNARY = {"Relu", "Sigmoid", "Tanh", "Erf", "Exp", "Log", "Sqrt", "Reciprocal", "Neg", "Abs", "Softmax",
          "LogSoftmax", "Identity", "Gelu", "LeakyRelu", "Elu", "HardSigmoid", "HardSwish", "Clip", "Not", "Sin",
          "Cos", "Tan", "Floor", "Ceil", "Round", "Sign", "IsNaN", "IsInf", "Softplus", "Softsign", "Selu", "Mish",
          "Celu", "Shrink", "ThresholdedRelu", "FastGelu", "BiasGelu", "QuickGelu", "LpNormalization",
          "InstanceNormalization", "Hardmax", "Asin", "Acos", "Atan", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh",
          "BitwiseNot", "CumSum", "Trilu", "RotaryEmbedding", "Swish"}
_NORMS = {"LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization", "SkipLayerNormalization",
          "SkipSimplifiedLayerNormalization"}
_REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
           "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"}


def _vals_bcast(a, b, fn):
    """Elementwise on small values (a dim or a list of dims)."""
    if a is None or b is None:
        return None
    la, lb = isinstance(a, list), isinstance(b, list)
    if not la and not lb:
        return fn(a, b)
    a = a if la else [a]
    b = b if lb else [b]
    if len(a) != len(b) and 1 not in (len(a), len(b)):
        return None
    n = max(len(a), len(b))
    a = a * n if len(a) == 1 else a
    b = b * n if len(b) == 1 else b
    out = [fn(x, y) for x, y in zip(a, b)]
    return None if any(o is None for o in out) else out


def _nonneg(p) -> bool:
    """A dim expression that cannot be negative: every atom is a dim (never negative) and
    every coefficient is positive."""
    return isinstance(p, Poly) and all(c > 0 for _, c in p.terms)


def _equal(p, q):
    if isinstance(p, int) and isinstance(q, int):
        return int(p == q)
    if p == q:
        return 1
    for a, b in ((p, q), (q, p)):
        if isinstance(b, int) and b < 0 and _nonneg(a):
            return 0
    return None


def _int_div(a, b):
    if isinstance(a, int) and isinstance(b, int):
        if b == 0:
            return None
        q = abs(a) // abs(b)
        return q if (a >= 0) == (b >= 0) else -q  # ONNX integer Div truncates
    return d_div(a, b)


def _value_op(op, ins):
    a = ins[0].value
    b = ins[1].value if len(ins) > 1 else None
    if op == "Add":
        return _vals_bcast(a, b, d_add)
    if op == "Sub":
        return _vals_bcast(a, b, d_sub)
    if op == "Mul":
        return _vals_bcast(a, b, d_mul)
    if op == "Div":
        return _vals_bcast(a, b, _int_div)
    if op in ("Max", "Min") and len(ins) == 2:
        f = max if op == "Max" else min
        return _vals_bcast(a, b, lambda x, y: f(x, y) if isinstance(x, int) and isinstance(y, int) else (x if x == y else None))
    return None


def _infer_rule(cx: _Ctx):
    """[Info per output] by the op's own rule, or None where the op has no rule."""
    node, ins, op = cx.node, cx.ins, cx.node.op
    x = ins[0] if ins else None
    n_out = len(node.outputs)

    if op in _ELEMENTWISE or op == "Where":
        if op == "Where":
            shapes = [i.shape for i in ins]
            dt = ins[1].dtype
        else:
            shapes = [i.shape for i in ins]
            dt = onnx.TensorProto.BOOL if op in _COMPARE else x.dtype
        s = _bcast(shapes, cx)
        val = None
        if dt in _INT_TYPES and s is not None and len(s) <= 1:
            if op == "Where":
                c, a, b = (i.value for i in ins)
                if c is not None and a is not None and b is not None:
                    n = s[0] if s else None
                    if isinstance(n, int) or not s:
                        cl = c if isinstance(c, list) else [c] * (n or 1)
                        al = a if isinstance(a, list) else [a] * (n or 1)
                        bl = b if isinstance(b, list) else [b] * (n or 1)
                        if len(cl) == len(al) == len(bl) and all(isinstance(v, int) for v in cl):
                            val = [p if q else r for q, p, r in zip(cl, al, bl)]
                            val = val if s else val[0]
            else:
                val = _value_op(op, ins)
        elif op == "Equal" and s is not None and len(s) <= 1 and ins[0].value is not None and ins[1].value is not None:
            eq = _vals_bcast(ins[0].value, ins[1].value, _equal)
            val = eq
        return [Info(dt, s, val)]
    if op in _UNARY or op == "Cast" or op == "CastLike" or op == "Dropout":
        dt = x.dtype
        if op == "Cast":
            dt = int(cx.attr("to", 0))
        elif op == "CastLike":
            dt = ins[1].dtype
        elif op in _COMPARE:
            dt = onnx.TensorProto.BOOL
        val = x.value if (op == "Identity" or op in ("Cast", "CastLike") and dt in _WIDE_INT) else None
        if op == "Neg" and x.value is not None and dt in _INT_TYPES:
            val = [d_neg(v) for v in x.value] if isinstance(x.value, list) else d_neg(x.value)
        out = [Info(dt, x.shape, val)]
        if op == "Dropout" and n_out > 1:
            out.append(Info(onnx.TensorProto.BOOL, x.shape))
        return out
    if op in _NORMS:
        return _norm_rule(cx)
    if op == "MatMul" or op == "MatMulNBits":
        a = x.shape
        if op == "MatMulNBits":
            if a is None or not a:
                return [Info(x.dtype, None)]
            return [Info(x.dtype, list(a[:-1]) + [int(cx.attr("N"))])]
        b = ins[1].shape
        if a is None or b is None or not a or not b:
            return [Info(x.dtype, None)]
        a1, b1 = len(a) == 1, len(b) == 1
        aa = [1] + list(a) if a1 else list(a)
        bb = list(b) + [1] if b1 else list(b)
        batch = _bcast([aa[:-2], bb[:-2]], cx)
        if batch is None:
            return [Info(x.dtype, None)]
        out = batch + [aa[-2], bb[-1]]
        if a1:
            out.pop(-2)
        if b1:
            out.pop(-1)
        return [Info(x.dtype, out)]
    if op == "Gemm":
        a, b = x.shape, ins[1].shape
        if a is None or b is None or len(a) != 2 or len(b) != 2:
            return [Info(x.dtype, None)]
        m = a[1] if cx.attr("transA", 0) else a[0]
        n = b[0] if cx.attr("transB", 0) else b[1]
        return [Info(x.dtype, [m, n])]
    if op == "Transpose":
        if x.shape is None:
            return [Info(x.dtype, None)]
        perm = cx.attr("perm")
        perm = list(range(len(x.shape)))[::-1] if perm is None else [int(p) for p in perm]
        if sorted(perm) != list(range(len(x.shape))):
            return [Info(x.dtype, None)]
        return [Info(x.dtype, [x.shape[p] for p in perm])]
    if op == "Shape":
        if x.shape is None:
            return [Info(onnx.TensorProto.INT64, None)]
        r = len(x.shape)
        start, end = int(cx.attr("start", 0)), cx.attr("end")
        start = max(0, min(r, _axis(start, r)))
        end = r if end is None else max(0, min(r, _axis(int(end), r)))
        v = list(x.shape[start:end])
        return [Info(onnx.TensorProto.INT64, [len(v)], v if len(v) <= SMALL_VALUE else None)]
    if op == "Size":
        return [Info(onnx.TensorProto.INT64, [], d_prod(x.shape) if x.shape is not None else None)]
    if op == "Constant":
        return None  # by ONNX (attribute forms)
    if op == "Reshape":
        return [_reshape(cx)]
    if op == "Flatten":
        if x.shape is None:
            return [Info(x.dtype, None)]
        r = len(x.shape)
        a = _axis(int(cx.attr("axis", 1)), r)
        return [Info(x.dtype, [d_prod(x.shape[:a]), d_prod(x.shape[a:])])]
    if op in ("Squeeze", "Unsqueeze"):
        return [_squeeze(cx)]
    if op == "Concat":
        return [_concat(cx)]
    if op == "Split":
        return _split(cx)
    if op == "Gather":
        return [_gather(cx)]
    if op == "Slice":
        return [_slice(cx)]
    if op == "Expand":
        s = ins[1].value
        if x.shape is None or not isinstance(s, list):
            return None
        return [Info(x.dtype, _bcast([x.shape, s], cx))]
    if op == "ConstantOfShape":
        s = x.value
        if not isinstance(s, list):
            return None
        v = cx.attr("value")
        dt = elem_type(v.dtype) if isinstance(v, gs.Constant) else onnx.TensorProto.FLOAT
        if isinstance(v, gs.Constant) and v.dtype is not None:
            from . import graph as G

            dt = elem_type(G.tensor_dtype(v))
        val = None
        if dt in _INT_TYPES and len(s) <= 1 and all(isinstance(d, int) for d in s) and d_prod(s) <= SMALL_VALUE:
            from . import graph as G

            fill = int(np.asarray(G.const_value(v)).reshape(-1)[0]) if isinstance(v, gs.Constant) else 0
            val = [fill] * s[0] if s else fill
        return [Info(dt, list(s), val)]
    if op in _REDUCE or op in ("ArgMax", "ArgMin"):
        return [_reduce(cx)]
    if op == "Range":
        start, limit, delta = (i.value for i in ins)
        if all(isinstance(v, int) for v in (start, limit, delta)) and delta:
            n = max(0, -(-(limit - start) // delta))
            return [Info(x.dtype, [n], list(range(start, limit, delta)) if n <= SMALL_VALUE else None)]
        if delta == 1 and start is not None and limit is not None:
            n = d_sub(limit, start)
            if _nonneg(n):
                return [Info(x.dtype, [n])]
        return [Info(x.dtype, [cx.opaque(0, 0)])]
    if op == "Tile":
        reps = ins[1].value
        if x.shape is None or not isinstance(reps, list) or len(reps) != len(x.shape):
            return None
        return [Info(x.dtype, [d_mul(d, r) for d, r in zip(x.shape, reps)])]
    if op == "Resize" or op == "Upsample":
        return _resize(cx)
    if op in ("Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool"):
        if x.shape is None or len(x.shape) < 3:
            return None
        if all(isinstance(d, int) for d in x.shape[2:]):
            return None  # static spatial dims: ONNX's rule
        out_c = x.shape[1]
        if op == "Conv":
            w = ins[1].shape
            out_c = w[0] if w is not None else cx.opaque(0, 1)
        elif op == "ConvTranspose":
            w = ins[1].shape
            out_c = d_mul(w[1], int(cx.attr("group", 1))) if w is not None else cx.opaque(0, 1)
        spatial = [cx.opaque(0, 2 + i) for i in range(len(x.shape) - 2)]
        same = _unit_window(cx, len(x.shape) - 2)
        if same:
            spatial = list(x.shape[2:])
        outs = [Info(x.dtype, [x.shape[0], out_c] + spatial)]
        if n_out > 1:
            outs.append(Info(onnx.TensorProto.INT64, outs[0].shape))
        return outs
    if op in ("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"):
        if x.shape is None:
            return [Info(x.dtype, None)]
        return [Info(x.dtype, list(x.shape[:2]) + [1] * (len(x.shape) - 2))]
    if op == "BatchNormalization":
        # training-mode statistics (running mean/var, saved mean/var): one per channel, shaped
        # like the scale; ONNX's own inference leaves them unshaped below opset 14
        stat = ins[1] if len(ins) > 1 and ins[1].shape is not None else None
        c = list(stat.shape) if stat is not None else ([x.shape[1]] if x.shape is not None and len(x.shape) > 1 else None)
        mean_dt = ins[3].dtype if len(ins) > 3 and ins[3].dtype else x.dtype
        return [Info(x.dtype, x.shape)] + [Info(mean_dt, c) for _ in range(n_out - 1)]
    if op == "GroupQueryAttention":
        return _gqa(cx)
    if op in ("QuantizeLinear", "DequantizeLinear"):
        if cx.attr("output_dtype"):
            dt = int(cx.attr("output_dtype"))
        elif op == "DequantizeLinear":
            dt = ins[1].dtype
        else:
            dt = ins[2].dtype if len(ins) > 2 and node.inputs[2] is not None and node.inputs[2].name and ins[2].dtype else onnx.TensorProto.UINT8
        return [Info(dt, x.shape)]
    return None


def _gqa(cx):
    """com.microsoft GroupQueryAttention: output [B, S, num_heads*head_size]; present key and
    value [B, kv_num_heads, total_sequence_length, head_size]."""
    q = cx.ins[0]
    if q.shape is None or len(q.shape) != 3:
        return None
    nh, kvh = int(cx.attr("num_heads", 0)), int(cx.attr("kv_num_heads", 0))
    packed = len(cx.node.inputs) < 2 or cx.node.inputs[1] is None or not cx.node.inputs[1].name
    hidden = q.shape[2]
    head = d_div(hidden, nh + 2 * kvh) if packed else d_div(hidden, nh)
    if head is None or not nh:
        return None
    outs = [Info(q.dtype, [q.shape[0], q.shape[1], d_mul(head, nh)])]
    for i in (1, 2):
        if i < len(cx.node.outputs):
            outs.append(Info(q.dtype, [q.shape[0], kvh, cx.opaque(i, 2), head]))
    return outs


def _unit_window(cx, nsp):
    """A window op that keeps the spatial dims: kernel 1 (or pool window 1), stride 1,
    dilation 1, no padding (or SAME_* auto padding with stride 1, for odd kernels), no output
    padding."""
    node = cx.node
    if node.op in ("Conv", "ConvTranspose"):
        w = cx.ins[1].shape
        k = cx.attr("kernel_shape") or (list(w[2:]) if w is not None else None)
    else:
        k = cx.attr("kernel_shape")
    if k is None or any(not isinstance(v, int) for v in k):
        return False
    strides = list(cx.attr("strides") or [1] * nsp)
    dil = list(cx.attr("dilations") or [1] * nsp)
    if any(s != 1 for s in strides) or any(d != 1 for d in dil):
        return False
    if node.op == "ConvTranspose" and (any(cx.attr("output_padding") or []) or cx.attr("output_shape")):
        return False
    auto = cx.attr("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    pads = list(cx.attr("pads") or [0] * (2 * nsp))
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        return True
    if auto == "VALID":
        return all(v == 1 for v in k)
    if node.op in ("Conv", "MaxPool", "AveragePool", "LpPool"):
        return all(pads[i] + pads[i + nsp] == k[i] - 1 for i in range(nsp))
    return all(pads[i] + pads[i + nsp] == k[i] - 1 for i in range(nsp))  # ConvTranspose: out = in + k-1 - pads


def _norm_rule(cx):
    node, ins, op = cx.node, cx.ins, cx.node.op
    x = ins[0]
    if x.shape is None:
        s = None
    elif op.startswith("Skip"):
        s = _bcast([x.shape, ins[1].shape], cx) if ins[1].shape is not None else None
        s = x.shape if s is None else s
    else:
        s = x.shape
    out = [Info(x.dtype, s)]
    # statistics outputs: the reduced shape (LayerNormalization: dims from axis on are 1)
    stat_dt = onnx.TensorProto.FLOAT
    if op == "LayerNormalization":
        stat_dt = int(cx.attr("stash_type", 1)) or onnx.TensorProto.FLOAT
    reduced = None
    if s is not None:
        r = len(s)
        a = _axis(int(cx.attr("axis", -1)), r) if op in ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization") else r - 1
        reduced = list(s[:a]) + [1] * (r - a)
    for i in range(1, len(node.outputs)):
        if op.startswith("Skip") and i == 3:
            out.append(Info(x.dtype, s))
        elif op.startswith("Skip"):
            out.append(Info(onnx.TensorProto.FLOAT, None if s is None else list(s[:-1]) + [1]))
        else:
            out.append(Info(stat_dt, reduced))
    return out


def _const_axes(cx, attr="axes", idx=1):
    axes = cx.attr(attr)
    if axes is None and len(cx.ins) > idx and cx.node.inputs[idx] is not None and cx.node.inputs[idx].name:
        v = cx.ins[idx].value
        if v is None:
            return False
        axes = v if isinstance(v, list) else [v]
        if any(not isinstance(a, int) for a in axes):
            return False
    return None if axes is None else [int(a) for a in axes]


def _reshape(cx):
    x, s = cx.ins[0], cx.ins[1]
    target = s.value
    if not isinstance(target, list):
        if s.shape is not None and len(s.shape) == 1 and isinstance(s.shape[0], int):
            return Info(x.dtype, [cx.opaque(0, i) for i in range(s.shape[0])])
        return Info(x.dtype, None)
    allowzero = int(cx.attr("allowzero", 0))
    out, minus = [], None
    for i, d in enumerate(target):
        if isinstance(d, int) and d == 0 and not allowzero:
            if x.shape is None or i >= len(x.shape):
                return Info(x.dtype, None)
            out.append(x.shape[i])
        elif isinstance(d, int) and d == -1:
            if minus is not None:
                return Info(x.dtype, None)
            minus = i
            out.append(None)
        elif isinstance(d, int) and d < 0:
            return Info(x.dtype, None)
        else:
            out.append(d)
    if minus is not None:
        q = None
        if x.shape is not None:
            q = d_div(d_prod(x.shape), d_prod([d for d in out if d is not None]))
        out[minus] = q if q is not None else cx.opaque(0, minus)
    return Info(x.dtype, out, _small_value(x, out))


def _small_value(x, shape):
    """A reshaped small value keeps its elements."""
    if x.value is None or len(shape) > 1:
        return None
    flat = x.value if isinstance(x.value, list) else [x.value]
    if shape == []:
        return flat[0] if len(flat) == 1 else None
    return flat if shape[0] == len(flat) else None


def _squeeze(cx):
    x = cx.ins[0]
    axes = _const_axes(cx)
    if axes is False or x.shape is None and (cx.node.op == "Squeeze" or axes is None):
        return Info(x.dtype, None)
    if cx.node.op == "Squeeze":
        r = len(x.shape)
        if axes is None:
            if any(not isinstance(d, int) for d in x.shape):
                return Info(x.dtype, None)
            out = [d for d in x.shape if d != 1]
        else:
            ax = {_axis(a, r) for a in axes}
            out = [d for i, d in enumerate(x.shape) if i not in ax]
    else:
        r = len(x.shape) + len(axes)
        ax = {_axis(a, r) for a in axes}
        it = iter(x.shape)
        out = [1 if i in ax else next(it) for i in range(r)]
    return Info(x.dtype, out, _small_value(x, out))


def _concat(cx):
    ins = cx.ins
    x = ins[0]
    shapes = [i.shape for i in ins]
    if any(s is None for s in shapes) or len({len(s) for s in shapes}) != 1:
        known = [s for s in shapes if s is not None]
        return Info(x.dtype, [cx.opaque(0, a) for a in range(len(known[0]))] if known else None)
    r = len(shapes[0])
    a = _axis(int(cx.attr("axis", 0)), r)
    out = []
    for ax in range(r):
        if ax == a:
            out.append(_sum([s[ax] for s in shapes]))
        else:
            ds = [s[ax] for s in shapes]
            ints = [d for d in ds if isinstance(d, int)]
            out.append(ints[0] if ints else ds[0])
    val = None
    if r == 1 and all(i.value is not None for i in ins):
        val = []
        for i in ins:
            val += i.value if isinstance(i.value, list) else [i.value]
        if not isinstance(out[0], int) or len(val) != out[0]:
            val = None
    return Info(x.dtype, out, val)


def _sum(ds):
    out = 0
    for d in ds:
        out = d_add(out, d)
    return out


def _split(cx):
    x = cx.ins[0]
    n = len(cx.node.outputs)
    if x.shape is None:
        return [Info(x.dtype, None) for _ in range(n)]
    r = len(x.shape)
    a = _axis(int(cx.attr("axis", 0)), r)
    split = cx.attr("split")
    if split is None and len(cx.ins) > 1 and cx.node.inputs[1] is not None and cx.node.inputs[1].name:
        split = cx.ins[1].value
        if not isinstance(split, list):
            return None
    d = x.shape[a]
    if split is None:
        if isinstance(d, int):
            k = -(-d // n)
            split = [k] * (n - 1) + [d - k * (n - 1)]
        else:
            q = d_div(d, n)
            split = [q if q is not None else cx.opaque(i, a) for i in range(n)]
    outs = []
    for i in range(n):
        s = list(x.shape)
        s[a] = split[i] if i < len(split) else cx.opaque(i, a)
        outs.append(Info(x.dtype, s))
    return outs


def _gather(cx):
    x, idx = cx.ins[0], cx.ins[1]
    if x.shape is None or idx.shape is None:
        return Info(x.dtype, None)
    r = len(x.shape)
    a = _axis(int(cx.attr("axis", 0)), r)
    out = list(x.shape[:a]) + list(idx.shape) + list(x.shape[a + 1:])
    val = None
    if r == 1 and isinstance(x.value, list) and idx.value is not None:
        iv = idx.value
        lst = iv if isinstance(iv, list) else [iv]
        if all(isinstance(i, int) and -len(x.value) <= i < len(x.value) for i in lst):
            picked = [x.value[i] for i in lst]
            val = picked if isinstance(iv, list) else picked[0]
    return Info(x.dtype, out, val)


def _slice(cx):
    x = cx.ins[0]
    if x.shape is None:
        return Info(x.dtype, None)
    r = len(x.shape)
    if len(cx.ins) == 1:  # opset < 10: attributes
        starts, ends, axes, steps = cx.attr("starts"), cx.attr("ends"), cx.attr("axes"), None
        starts, ends = list(starts or []), list(ends or [])
    else:
        def v(i):
            if len(cx.ins) <= i or cx.node.inputs[i] is None or not cx.node.inputs[i].name:
                return None
            val = cx.ins[i].value
            return val if isinstance(val, list) else False

        starts, ends, axes, steps = v(1), v(2), v(3), v(4)
        if starts is False or ends is False or axes is False or steps is False or starts is None or ends is None:
            # bounds computed at run time: the sliced axes are unknown, the others stay
            if isinstance(axes, list) and all(isinstance(a, int) for a in axes):
                cut = {_axis(a, r) for a in axes}
            elif axes is None and cx.ins[1].shape is not None and len(cx.ins[1].shape) == 1 and isinstance(cx.ins[1].shape[0], int):
                cut = set(range(cx.ins[1].shape[0]))
            else:
                cut = set(range(r))
            return Info(x.dtype, [cx.opaque(0, a) if a in cut else d for a, d in enumerate(x.shape)])
    axes = list(range(len(starts))) if axes is None else [_axis(int(a), r) if isinstance(a, int) else None for a in axes]
    steps = [1] * len(starts) if steps is None else steps
    out = list(x.shape)
    sliced = set()
    for s, e, a, st in zip(starts, ends, axes, steps):
        if a is None or not isinstance(st, int) or st == 0:
            return Info(x.dtype, [cx.opaque(0, i) for i in range(r)])
        sliced.add(a)
        out[a] = _slice_len(x.shape[a], s, e, st, cx, a)
    val = None
    if r == 1 and isinstance(x.value, list) and 0 in sliced and all(isinstance(v, int) for v in (starts + ends + steps)):
        a0 = [i for i, a in enumerate(axes) if a == 0][0]
        val = x.value[slice(*_py_slice(len(x.value), starts[a0], ends[a0], steps[a0]))]
        if not isinstance(out[0], int) or len(val) != out[0]:
            val = None
    return Info(x.dtype, out, val)


def _py_slice(n, s, e, st):
    s = max(-_BIG, min(_BIG, s))
    e = max(-_BIG, min(_BIG, e))
    return slice(s, e, st).indices(n)


def _slice_len(d, s, e, st, cx, a):
    if isinstance(d, int) and isinstance(s, int) and isinstance(e, int):
        return len(range(*_py_slice(d, s, e, st)))
    if st == 1 and s == 0 and (e == d or isinstance(e, int) and e >= _BIG // 4):
        return d  # the whole axis
    if st == 1 and isinstance(s, int) and s >= 0 and isinstance(e, int) and e >= _BIG // 4:
        return cx.opaque(0, a)  # d - s only when s <= d, which is not known here
    return cx.opaque(0, a)


def _reduce(cx):
    x = cx.ins[0]
    op = cx.node.op
    keep = int(cx.attr("keepdims", 1))
    dt = onnx.TensorProto.INT64 if op in ("ArgMax", "ArgMin") else x.dtype
    if x.shape is None:
        return Info(dt, None)
    r = len(x.shape)
    if op in ("ArgMax", "ArgMin"):
        axes = [int(cx.attr("axis", 0))]
    else:
        axes = _const_axes(cx)
        if axes is False:  # axes computed at run time: the rank only (keepdims), or nothing
            return Info(dt, [cx.opaque(0, i) for i in range(r)]) if keep else Info(dt, None)
        if axes is None or axes == []:
            if int(cx.attr("noop_with_empty_axes", 0)):
                return Info(dt, list(x.shape))
            axes = list(range(r))
    ax = {_axis(a, r) for a in axes}
    out = [(1 if i in ax else d) for i, d in enumerate(x.shape)] if keep else [d for i, d in enumerate(x.shape) if i not in ax]
    val = None
    if op == "ReduceProd" and isinstance(x.value, list) and r == 1:
        p = d_prod(x.value)
        val = [p] if keep else p
    return Info(dt, out, val)


def _resize(cx):
    x = cx.ins[0]
    if x.shape is None:
        return None
    node = cx.node
    if node.op == "Upsample":
        scales = cx.attr("scales")
        if scales is None and len(cx.ins) > 1:
            scales = None  # float scales are not carried: ONNX's rule
        sizes = None
    else:
        scales_i = 1 if len(cx.ins) == 2 else 2  # opset 10: (X, scales); 11+: (X, roi, scales, sizes)
        sizes = cx.ins[3].value if len(cx.ins) > 3 and node.inputs[3] is not None and node.inputs[3].name else None
        scales = None
        if len(cx.ins) > scales_i and node.inputs[scales_i] is not None and node.inputs[scales_i].name:
            from . import graph as G

            sv = G.const_value(node.inputs[scales_i])
            if sv is not None and np.asarray(sv).size:
                scales = [float(s) for s in np.asarray(sv).reshape(-1)]
        ctm = cx.attr("coordinate_transformation_mode", "half_pixel")
        if int(cx.attr("antialias", 0)) or cx.attr("axes") is not None or ctm in ("tf_crop_and_resize", b"tf_crop_and_resize") \
                or cx.attr("keep_aspect_ratio_policy", "stretch") not in ("stretch", b"stretch"):
            return None  # ONNX's rule (or none)
    if isinstance(sizes, list) and len(sizes) == len(x.shape):
        return [Info(x.dtype, list(sizes))]
    if scales is None or len(scales) != len(x.shape):
        return None
    if all(isinstance(d, int) for d in x.shape):
        return None  # static: ONNX's rule (floor of float products)
    out = []
    for i, (d, s) in enumerate(zip(x.shape, scales)):
        if s == 1.0:
            out.append(d)
        elif float(s).is_integer() and s > 0:
            out.append(d_mul(d, int(s)))  # floor(d * k) = k * d for an integer k
        elif isinstance(d, int):
            out.append(int(np.floor(d * np.float32(s))))
        else:
            out.append(cx.opaque(0, i))
    return [Info(x.dtype, out)]


# ---------------------------------------------------------------------------------------------
# ONNX's per-node inference, for the ops without a rule


def _onnx_node(node, ins, opset, domain_opsets):
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

    domain = node.domain or ""
    try:
        schema = onnx.defs.get_schema(node.op, domain_opsets.get(domain, opset) if domain else opset, domain)
    except Exception:
        return None
    try:
        proto = OnnxExporter.export_node(node)
    except Exception:
        return None
    types, data, back = {}, {}, {}
    for t, info in zip(node.inputs, ins):
        if t is None or not t.name or t.name in types:
            continue
        if not info.dtype:
            return None
        if info.shape is None:
            types[t.name] = onnx.helper.make_tensor_type_proto(info.dtype, None)
        else:
            dims = []
            for d in info.shape:
                if isinstance(d, int):
                    dims.append(d)
                else:
                    s = str(d)
                    back[s] = d
                    dims.append(s)
            types[t.name] = onnx.helper.make_tensor_type_proto(info.dtype, dims)
        arr = None
        if isinstance(t, gs.Constant) and int(np.prod(t.shape, dtype=np.int64)) <= 4096:
            from . import graph as G

            try:
                arr = np.asarray(G.const_value(t))
            except Exception:
                arr = None
        elif info.value is not None and info.shape is not None:
            flat = info.value if isinstance(info.value, list) else [info.value]
            if all(isinstance(v, int) for v in flat):
                arr = np.asarray(info.value, dtype=onnx.helper.tensor_dtype_to_np_dtype(info.dtype))
        if arr is not None:
            try:
                data[t.name] = onnx.numpy_helper.from_array(arr, t.name)
            except Exception:
                pass
    opsets = [onnx.helper.make_opsetid("", opset)] + [onnx.helper.make_opsetid(d, v) for d, v in domain_opsets.items() if d]
    try:
        res = onnx.shape_inference.infer_node_outputs(schema, proto, types, data, opset_imports=opsets)
    except Exception:
        return None
    out = []
    for i, o in enumerate(node.outputs):
        tp = res.get(o.name)
        if tp is None or not tp.HasField("tensor_type"):
            out.append(Info(0, None))
            continue
        tt = tp.tensor_type
        if not tt.HasField("shape"):
            out.append(Info(tt.elem_type, None))
            continue
        dims = []
        for a, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param") and d.dim_param in back:
                dims.append(back[d.dim_param])
            else:
                dims.append(Poly.atom(f"unk__{o.name}:{a}"))
        out.append(Info(tt.elem_type, dims))
    return out


def _constant_node(node):
    """Constant: its value's Info (the value itself when small and integer). A tensor value's
    shape and dtype come without reading it (exporters may hold weights in Constant nodes)."""
    from . import graph as G

    v = node.attrs.get("value")
    if isinstance(v, gs.Constant):
        return [_const_info(v)]
    v = G.const_value(node.outputs[0])
    if v is None:
        return None
    v = np.asarray(v)
    et = elem_type(v.dtype)
    val = None
    if et in _INT_TYPES and v.ndim <= 1 and v.size <= SMALL_VALUE:
        val = int(v) if v.ndim == 0 else [int(a) for a in v.reshape(-1)]
    return [Info(et, list(v.shape), val)]


# ---------------------------------------------------------------------------------------------
# the engine


def _signature(node):
    attrs = []
    if node.attrs:
        for k, v in node.attrs.items():
            if isinstance(v, (gs.Tensor, gs.Graph, np.ndarray)) or (isinstance(v, (list, tuple)) and v and isinstance(v[0], gs.Graph)):
                attrs.append((k, id(v)))
            else:
                attrs.append((k, repr(v)))
    return (node.op, node.domain or "", tuple(map(id, node.inputs)), tuple(map(id, node.outputs)), tuple(attrs))


def _subgraphs(node):
    for v in node.attrs.values():
        if isinstance(v, gs.Graph):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from (x for x in v if isinstance(x, gs.Graph))


class ShapeState:
    """What the engine inferred for one model, kept on its root graph (``graph.normopt_shapes``)."""

    def __init__(self):
        self.info = {}  # id(tensor) -> Info
        self.sig = {}  # id(node) -> signature
        self.alive = {}  # id(node) -> node (keeps ids stable while remembered)
        self.tensors = {}  # id(tensor) -> tensor (likewise)
        self.nodes_inferred = 0  # nodes (re-)inferred, all refreshes together (tests count it)
        self.onnx_calls = 0


def state(graph) -> ShapeState | None:
    return graph.__dict__.get("normopt_shapes")  # (graphsurgeon's __getattr__ logs misses)


def infer(graph: gs.Graph, incremental: bool = True) -> ShapeState:
    """Infer (or, with a state from an earlier call and `incremental`, update) every value's
    dtype and shape, and write them onto the graph's tensors."""
    st = state(graph) if incremental else None
    fresh = st is None
    if fresh:
        st = ShapeState()
        graph.normopt_shapes = st
    opset = graph.opset or 17
    domains = dict(graph.__dict__.get("normopt_domains") or {})
    seen_nodes, seen_tensors = {}, {}
    declared = _declared_outputs(graph)
    _walk(graph, graph, st, opset, domains, set(), seen_nodes, seen_tensors, declared, fresh)
    st.alive = seen_nodes
    # every node and value the walk met has its entry (a signature, an Info): where the counts
    # agree there is nothing else to drop (a fresh inference, or a refresh that removed nothing)
    if len(st.sig) != len(seen_nodes):
        st.sig = {k: v for k, v in st.sig.items() if k in seen_nodes}
    if len(st.info) != len(seen_tensors):
        st.info = {k: v for k, v in st.info.items() if k in seen_tensors}
    st.tensors = seen_tensors
    return st


def _declared_outputs(graph):
    d = graph.__dict__.get("normopt_declared_outputs")
    if d is None:
        d = {t.name for t in graph.outputs if getattr(t, "shape", None) is not None}
        graph.normopt_declared_outputs = d
    return d


def _walk(root, g, st, opset, domains, changed, seen_nodes, seen_tensors, declared, fresh):
    """Infer graph g's nodes in order; `changed` holds ids of values whose Info changed in this
    refresh (their readers are re-inferred)."""
    for t in g.inputs:
        seen_tensors[id(t)] = t
        info = Info(elem_type(t.dtype), None if t.shape is None else
                    [from_gs(d, f"unk__{t.name}:{a}") for a, d in enumerate(t.shape)])
        old = st.info.get(id(t))
        if old is None or old.key() != info.key():
            st.info[id(t)] = info
            changed.add(id(t))
    for node in g.nodes:
        seen_nodes[id(node)] = node
        subs = list(_subgraphs(node)) if node.attrs else []
        for sub in subs:
            sub_changed_before = len(changed)
            _walk(root, sub, st, opset, domains, changed, seen_nodes, seen_tensors, declared, fresh)
            if len(changed) != sub_changed_before:
                st.sig.pop(id(node), None)  # a branch's values changed: the node's outputs may too
        sig = _signature(node)
        inputs_changed = False
        ins = []
        for t in node.inputs:
            if t is None:
                ins.append(Info())
                continue
            seen_tensors[id(t)] = t
            info = st.info.get(id(t))
            if info is None:
                if isinstance(t, gs.Constant):
                    info = _const_info(t)
                else:  # read before produced (outer or dangling): what graphsurgeon says
                    info = Info(elem_type(t.dtype), None if t.shape is None else
                                [from_gs(d, f"unk__{t.name}:{a}") for a, d in enumerate(t.shape)])
                st.info[id(t)] = info
                changed.add(id(t))
            if id(t) in changed:
                inputs_changed = True
            ins.append(info)
        for o in node.outputs:
            seen_tensors[id(o)] = o
        if not fresh and not inputs_changed and st.sig.get(id(node)) == sig and all(id(o) in st.info for o in node.outputs):
            for o in node.outputs:  # a shape a pass wrote onto an unchanged value is put right
                _write(o, st.info[id(o)], g is root and o.name in declared and any(x is o for x in g.outputs))
            continue
        st.sig[id(node)] = sig
        st.nodes_inferred += 1
        outs = _infer_node(node, ins, opset, domains, st, subs)
        for o, info in zip(node.outputs, outs):
            old = st.info.get(id(o))
            if old is not None and old.key() == info.key():
                continue
            st.info[id(o)] = info
            changed.add(id(o))
            _write(o, info, g is root and o.name in declared and any(x is o for x in g.outputs))


def _write(t, info, keep_shape):
    if keep_shape and t.shape is not None and info.shape is None:
        return  # nothing inferred: the output's stated shape is all there is
    # otherwise the passes see what the graph computes: ONNX's checker and ONNX Runtime accept an
    # output declared [1, 16] that the graph computes as [N, 16] (or [2, count] of a NonZero), so
    # a declaration is the model's word, not a fact (Shape of it would fold to the declared dims).
    # The written model declares its outputs as the original did (graph.to_model).
    shape = None if info.shape is None else [to_gs(d) for d in info.shape]
    if info.dtype:
        dt = _NP.get(info.dtype)
        if dt is None:
            try:
                dt = _NP[info.dtype] = onnx.helper.tensor_dtype_to_np_dtype(info.dtype)
            except Exception:
                dt = _NP[info.dtype] = False
        if dt is not False and t.dtype is not dt:
            if type(t) is _Variable:  # a plain field (graphsurgeon's __setattr__ only special-cases inputs/outputs)
                t.__dict__["dtype"] = dt
            else:
                t.dtype = dt
    if t.shape != shape:
        if type(t) is _Variable:
            t.__dict__["shape"] = shape
        else:
            t.shape = shape


_NP = {}
_Variable = gs.Variable



def _infer_node(node, ins, opset, domains, st, subs):
    n = len(node.outputs)
    outs = None
    try:
        if node.op == "Constant":
            outs = _constant_node(node)
        elif subs:
            outs = _subgraph_node(node, ins, st)
        else:
            outs = _infer_rule(_Ctx(node, ins, opset))
    except Exception:
        outs = None
    if outs is None or any(o.shape is None or not o.dtype for o in outs):
        st.onnx_calls += 1
        other = _onnx_node(node, ins, opset, domains) if not subs else None
        if other is not None:
            outs = other if outs is None else [_better(a, b) for a, b in zip(outs, other)]
    if outs is None:
        outs = [Info() for _ in range(n)]
    outs = list(outs) + [Info() for _ in range(n - len(outs))]
    return outs[:n]


def _better(mine, onnx_info):
    """Mine where it knows; ONNX's dtype or shape where mine does not."""
    dt = mine.dtype or onnx_info.dtype
    if mine.shape is None:
        return Info(dt, onnx_info.shape, mine.value)
    if onnx_info.shape is not None and len(onnx_info.shape) == len(mine.shape):
        shape = [b if isinstance(b, int) and not isinstance(a, int) else a for a, b in zip(mine.shape, onnx_info.shape)]
        return Info(dt, shape, mine.value)
    return Info(dt, mine.shape, mine.value)


def _known(st, t):
    info = st.info.get(id(t))
    if info is None and isinstance(t, gs.Constant):
        info = _const_info(t)
    return info


def _subgraph_node(node, ins, st):
    """If: each output is what both branches agree on. Loop/Scan: dtypes from the body; shapes
    of loop-carried values where the body keeps them, scan outputs unknown."""
    if node.op == "If":
        branches = [node.attrs.get("then_branch"), node.attrs.get("else_branch")]
        if any(b is None for b in branches):
            return None
        outs = []
        for i in range(len(node.outputs)):
            cands = [_known(st, b.outputs[i]) if i < len(b.outputs) else None for b in branches]
            if any(c is None for c in cands):
                outs.append(Info())
                continue
            a, b = cands
            dt = a.dtype or b.dtype
            if a.shape is None or b.shape is None or len(a.shape) != len(b.shape):
                outs.append(Info(dt, None))
                continue
            outs.append(Info(dt, [x if x == y else Poly.atom(f"unk__{node.outputs[i].name}:{k}")
                                  for k, (x, y) in enumerate(zip(a.shape, b.shape))]))
        return outs
    body = node.attrs.get("body")
    if body is None:
        return None
    outs = []
    n_state = len(node.inputs) - (2 if node.op == "Loop" else int(node.attrs.get("num_scan_inputs", 0)))
    first = 1 if node.op == "Loop" else 0  # Loop body outputs: cond, carried..., scan...
    for i in range(len(node.outputs)):
        bi = first + i
        bo = _known(st, body.outputs[bi]) if bi < len(body.outputs) else None
        if bo is None:
            outs.append(Info())
            continue
        if i < n_state:
            init = ins[2 + i] if node.op == "Loop" else ins[i]
            same = init.shape is not None and bo.shape is not None and init.key()[1] == bo.key()[1]
            outs.append(Info(bo.dtype, list(init.shape) if same else None))
        else:
            outs.append(Info(bo.dtype, None))
    return outs
