"""Where an axis goes through ops that move or select data without mixing channels.

Shared by the passes that carry a per-axis property through the graph (TVM FoldScaleAxis
style): ln_to_rms carries "zero-mean along axis a"; fold_affine carries "per-channel affine
along axis a". Each caller says which ops commute with its property (``ops``): per-token
Mul/Div and ReduceSum commute with centering but not with an affine; Concat commutes with
centering only when every input is centered too.
"""

from __future__ import annotations

import numpy as np

from . import graph as G
from . import weights as W

COMMUTING_RESHAPES = ("Reshape", "Squeeze", "Unsqueeze", "Flatten")
LAYOUT_OPS = frozenset(COMMUTING_RESHAPES + ("Transpose", "Gather", "Slice", "Expand", "Tile", "ReduceMean"))
CENTERING_OPS = LAYOUT_OPS | {"Concat", "ReduceSum", "Mul", "Div", "Cast"}  # Cast: exact widening float casts only
VALUE_INDEPENDENT = ("Shape", "Size")  # read only the shape, never the values


class AxisError(Exception):
    """An axis or rank cannot be tracked."""


# ---------------------------------------------------------------------------------------------
# axis mapping through ops that commute with per-token centering


def reshape_map(src, dst, a):
    """Axis of `dst` that holds axis `a` of `src` through a row-major reshape, or None.

    Axis a survives as axis b when the dims are equal and either the products of the dims
    after them are equal (static), or the dims before them are the same list (static or the
    same symbolic names): the element count is preserved, so then the suffixes match too, and
    (outer, channel, inner) indexing is the same on both sides."""
    ss, ds = G.shape(src), G.shape(dst)
    if ss is None or ds is None or a >= len(ss):
        return None
    n = ss[a]
    if not isinstance(n, int):
        return None

    def known(v):
        return isinstance(v, int) or (isinstance(v, str) and v and not v.startswith("unk__"))

    inner = ss[a + 1:]
    inner_p = int(np.prod(inner)) if all(isinstance(v, int) for v in inner) else None
    for b in range(len(ds) - 1, -1, -1):
        if ds[b] != n:
            continue
        tail = ds[b + 1:]
        if inner_p is not None and all(isinstance(v, int) for v in tail) and (int(np.prod(tail)) if tail else 1) == inner_p:
            return b
        if ss[:a] == ds[:b] and all(known(v) for v in ss[:a]):
            return b
    return None


# Exact widening float casts: every value of the source type is a value of the target type, so
# Cast(x - m) = Cast(x) - Cast(m) holds exactly and centering commutes with the cast. A
# narrowing cast (fp32 -> fp16/bf16/fp8, fp64 -> fp32, fp16 <-> bf16) rounds: Cast(x - m) is not
# Cast(x) - m, and a round trip fp32 -> fp16 -> fp32 is not the identity either.
_FLOAT_BITS = {  # name -> (mantissa bits, smallest normal exponent, largest exponent)
    "float64": (52, -1022, 1023), "float32": (23, -126, 127), "float16": (10, -14, 15), "bfloat16": (7, -126, 127),
    "float8_e4m3fn": (3, -6, 8), "float8_e4m3fnuz": (3, -7, 7), "float8_e5m2": (2, -14, 15), "float8_e5m2fnuz": (2, -15, 15),
}


def exact_widening(src, dst) -> bool:
    """Every value of float type `src` is exactly representable in float type `dst` (the same
    type included): mantissa at least as wide, and an exponent range (subnormals included) that
    covers the source's."""
    if src is None or dst is None:
        return False
    a, b = _FLOAT_BITS.get(np.dtype(src).name), _FLOAT_BITS.get(np.dtype(dst).name)
    if a is None or b is None:
        return False
    if a == b:
        return np.dtype(src).name == np.dtype(dst).name
    (ma, lo_a, hi_a), (mb, lo_b, hi_b) = a, b
    # the smallest subnormal of src (2^(lo_a - ma)) must be representable in dst
    return mb >= ma and hi_b >= hi_a and lo_b - mb <= lo_a - ma


def _float_cast(node) -> bool:
    """A Cast that commutes with per-token centering: an exact widening float cast."""
    src, dst = G.tensor_dtype(node.inputs[0]), G.tensor_dtype(node.outputs[0])
    return src is not None and dst is not None and W.is_float(src) and W.is_float(dst) and exact_widening(src, dst)


# ---------------------------------------------------------------------------------------------
# broadcast of constants: a constant's shape is part of what it computes


def keeps_shape(const_shape, data) -> bool:
    """Broadcasting a constant of shape `const_shape` against `data` (a tensor, or a shape list)
    in an elementwise op leaves the result with data's shape: the constant's rank is at most
    data's, and each of its dims is 1 or data's static dim there. A one-element [1, 1, 1, 1]
    constant widens a rank-3 value to rank 4: it is not a bare number."""
    ds = data if isinstance(data, (list, tuple)) else G.shape(data)
    if ds is None or const_shape is None:
        return False
    cs = tuple(const_shape)
    if len(cs) > len(ds):
        return False
    for c, d in zip(reversed(cs), reversed(list(ds))):
        if c != 1 and not (isinstance(d, (int, np.integer)) and int(d) == int(c)):
            return False
    return True


def const_shape(tensor):
    info = G.const_info(tensor)
    return None if info is None else info[0]


def scalar_of(tensor, data):
    """The number a one-element constant `tensor` stands for where it meets `data` (a tensor or
    a shape) elementwise, or None: not constant, more than one element, or a broadcast that
    widens data's rank."""
    v = G.const_value(tensor)
    if v is None or v.size != 1:
        return None
    if not keeps_shape(v.shape, data):
        return None
    return float(np.asarray(v, np.float64).reshape(-1)[0]) if v.dtype.kind in "fiub" or W.is_float(v.dtype) else None


def broadcast_axis(inp, out, a):
    """Axis of a broadcasting input that lines up with output axis a: None when the input
    lacks that axis, -1 when it has size 1 there (broadcast along a)."""
    ri, ro = G.rank(inp), G.rank(out)
    if ri is None or ro is None:
        raise AxisError(f"rank of '{inp.name}' unknown")
    ai = a - (ro - ri)
    if ai < 0:
        return None
    s = G.shape(inp)
    if s is not None and s[ai] == 1 and G.static_dim(out, a) != 1:
        return -1
    return ai


def forward_axis(node, t, a, ops=CENTERING_OPS):
    """Where axis a of input t goes in node's output, if node commutes with per-token
    centering along a (or, with ops=LAYOUT_OPS, with a per-channel affine); else None."""
    op, out = node.op, node.outputs[0]
    if op not in ops:
        return None
    if op == "Cast":  # an fp16 export that keeps its norms in fp32: same values, another float width
        return a if _float_cast(node) and node.inputs[0] is t else None
    if op == "Transpose":
        perm = node.attrs.get("perm")
        r = G.rank(t)
        if perm is None and r is not None:
            perm = list(reversed(range(r)))
        return list(perm).index(a) if perm is not None else None
    if op in COMMUTING_RESHAPES:
        return reshape_map(t, out, a) if node.inputs[0] is t else None
    if op == "Gather":
        if node.inputs[0] is not t:
            return None
        r = G.rank(t)
        g = G.normalize_axis(int(node.attrs.get("axis", 0)), r)
        q = G.rank(node.inputs[1]) if G.const_value(node.inputs[1]) is None else G.const_value(node.inputs[1]).ndim
        if g == a or q is None:
            return None
        return a if a < g else a + q - 1
    if op == "Slice":
        if node.inputs[0] is not t:
            return None
        r = G.rank(t)
        starts = G.const_value(node.inputs[1])
        axes = G.const_value(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3].name else None
        if axes is None:
            if len(node.inputs) > 3 and node.inputs[3].name:
                return None
            if starts is None:
                return None
            axes = np.arange(starts.size)
        axes = [G.normalize_axis(int(x), r) for x in np.asarray(axes).reshape(-1)]
        return None if a in axes else a
    if op == "Concat":
        r = G.rank(t)
        return None if G.normalize_axis(int(node.attrs["axis"]), r) == a else a
    if op == "Expand":
        if node.inputs[0] is not t:
            return None
        ro, ri = G.rank(out), G.rank(t)
        if ro is None or ri is None or G.static_dim(t, a) in (None, 1):
            return None
        return a + (ro - ri)
    if op == "Tile":
        reps = G.const_value(node.inputs[1])
        if node.inputs[0] is not t or reps is None or int(reps.reshape(-1)[a]) != 1:
            return None
        return a
    if op in ("ReduceMean", "ReduceSum"):
        r = G.rank(t)
        axes, keep = G.reduce_axes(node, r)
        if axes is False or axes is None or a in axes:
            return None
        return a if keep else a - sum(1 for x in axes if x < a)
    if op in ("Mul", "Div"):
        if op == "Div" and node.inputs[0] is not t:
            return None
        other = node.inputs[1] if node.inputs[0] is t else node.inputs[0]
        if other is t:
            return None
        ao = G.rank(out)
        if ao is None or G.rank(t) is None:
            return None
        a_out = a + (ao - G.rank(t))
        try:
            ax = broadcast_axis(other, out, a_out)
        except AxisError:
            return None
        return a_out if ax in (None, -1) else None  # other is per-token (size 1 along a)
    return None


def backward_axis(node, out_axis, ops=CENTERING_OPS):
    """For a commuting node whose output must be zero-mean along out_axis: list of
    (input index, input axis) to demand, or None when it does not commute."""
    op, out = node.op, node.outputs[0]
    if op not in ops:
        return None
    if op == "Cast":
        return [(0, out_axis)] if _float_cast(node) else None
    if op == "Transpose":
        perm = node.attrs.get("perm")
        if perm is None:
            r = G.rank(out)
            perm = list(reversed(range(r))) if r is not None else None
        return None if perm is None else [(0, list(perm)[out_axis])]
    if op in COMMUTING_RESHAPES:
        b = reshape_map(out, node.inputs[0], out_axis)
        return None if b is None else [(0, b)]
    if op in ("Gather", "Slice", "Expand", "Tile", "ReduceMean", "ReduceSum"):
        t = node.inputs[0]
        r = G.rank(t)
        if r is None:
            return None
        for a in range(r):
            try:
                if forward_axis(node, t, a, ops) == out_axis:
                    return [(0, a)]
            except Exception:
                return None
        return None
    if op == "Concat":
        return None if forward_axis(node, node.inputs[0], out_axis, ops) is None else [(i, out_axis) for i in range(len(node.inputs))]
    if op in ("Mul", "Div"):  # x * s with s per-token (size 1 along the axis)
        ro = G.rank(out)
        for i in ([0] if op == "Div" else [0, 1]):
            t = node.inputs[i]
            rt = G.rank(t)
            if ro is None or rt is None or out_axis - (ro - rt) < 0:
                continue
            a = out_axis - (ro - rt)
            if G.static_dim(t, a) != 1 and forward_axis(node, t, a, ops) == out_axis:
                return [(i, a)]
        return None
    return None


# ---------------------------------------------------------------------------------------------
# per-axis constants


def per_axis(value, data):
    """How a constant `value` that meets `data` in a broadcasting op varies, checked against the
    data's static shape: (None, scalar) when it is one number; (axis, vector) when it varies along
    exactly one axis of the data, and the data is not broadcast along that axis (its static dim
    there equals the vector's length); None otherwise (several axes, the data's dim unknown or 1,
    a constant of higher rank than the data). A [N, 1] constant with N == d is per-token, not
    per-channel: it varies along axis -2."""
    v = np.asarray(value)
    r = G.rank(data)
    if r is None or not keeps_shape(v.shape, data):
        return None
    if v.size == 1:
        return (None, v.reshape(()))
    shape = (1,) * (r - v.ndim) + v.shape
    axes = [i for i, s in enumerate(shape) if s != 1]
    if len(axes) != 1:
        return None
    axis = axes[0]
    if G.static_dim(data, axis) != shape[axis]:
        return None
    return axis, v.reshape(-1)
