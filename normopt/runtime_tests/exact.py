"""The exact reference: a model's function evaluated in float64.

``to_float64(model)`` rewrites a copy of the model so that every floating-point value is
float64: float initializers and Constant values (fp32, fp16, bf16), Cast/CastLike targets,
ops with a dtype attribute, the types of graph inputs, outputs and value_info, subgraphs
included. A Cast to a narrower float (fp16, bf16, fp8) keeps its rounding: it is followed by a
Cast to float64, since the model computes the rounded value there. Tensors that an op requires in float32 (Resize/Upsample scales) stay float32.

``ExactRunner`` evaluates it: with ONNX Runtime (CPU, optimizations off) where every op has a
double kernel, else op by op with onnx.reference (numpy, float64). Where neither can run the
model, ``available`` is False and ``why`` says why; verification then falls back to the fp32
comparison and says so.
"""

from __future__ import annotations

import time

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .. import weights as W

FLOATS = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
# Casts that round: a value cast to one of these is what the model computes there, so the float64
# reference keeps the rounding (Cast to the narrow type, then to float64) instead of dropping it
NARROW = {TensorProto.FLOAT16, TensorProto.BFLOAT16} | {getattr(TensorProto, n) for n in (
    "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ") if hasattr(TensorProto, n)}
KEEP_FLOAT32 = {("Resize", 2), ("Upsample", 1)}  # inputs an op wants in float32 whatever its data's type
DTYPE_ATTRS = {"EyeLike": "dtype", "RandomNormal": "dtype", "RandomUniform": "dtype", "RandomNormalLike": "dtype",
               "RandomUniformLike": "dtype", "Bernoulli": "dtype", "Multinomial": None}


def _array(t: TensorProto) -> np.ndarray:
    ref = W.external_ref(t)
    if ref is not None:
        length = ref[2] if ref[2] is not None else W.tensor_nbytes(t)
        return np.asarray(W.load_array(t, ref[0], ref[1], length))
    return np.asarray(numpy_helper.to_array(t))


def _to_double(t: TensorProto) -> None:
    if t.data_type not in FLOATS or t.data_type == TensorProto.DOUBLE:
        if W.external_ref(t) is not None:  # a non-float tensor by reference: read it in
            t.CopyFrom(numpy_helper.from_array(_array(t), t.name))
        return
    arr = _array(t).astype(np.float64)
    t.CopyFrom(numpy_helper.from_array(arr, t.name))


def _type_to_double(tp) -> None:
    if tp.HasField("tensor_type"):
        if tp.tensor_type.elem_type in FLOATS:
            tp.tensor_type.elem_type = TensorProto.DOUBLE
    elif tp.HasField("sequence_type"):
        _type_to_double(tp.sequence_type.elem_type)
    elif tp.HasField("optional_type"):
        _type_to_double(tp.optional_type.elem_type)


def _keep32(graph) -> set:
    keep = set()
    for n in graph.node:
        for op, i in KEEP_FLOAT32:
            if n.op_type == op and len(n.input) > i and n.input[i]:
                keep.add(n.input[i])
    return keep


# erf in float64, vectorized: ONNX Runtime has no float64 Erf (nor Conv), so a GELU model's
# exact reference evaluates it with onnx.reference, whose Erf calls math.erf once per element
# (0.17 s for one ViT-B GELU; 72 of them made 9 of a verification's 27 s). Here erf is the
# Taylor series about the nearest centre k/32 (|h| <= 1/64), its coefficients exact rationals
# (the Hermite polynomials: erf^(n)(c) = 2/sqrt(pi) (-1)^(n-1) H_(n-1)(c) exp(-c^2)) times
# math.exp, and erf(c) from math.erf; the first omitted term is below 1e-18. Within 2 ulp of
# math.erf everywhere (tests/test_verify_cost.py); from 6.125 on erf rounds to 1, the value at
# the top centre, to which |x| is clamped (a NaN stays NaN through h).
_ERF_STEP, _ERF_TOP, _ERF_TERMS = 32, 6.125, 8
_ERF_CHUNK = 1 << 14  # elements per pass: its few work arrays stay in cache
_erf_table = []


def _erf_coefficients() -> np.ndarray:
    if not _erf_table:
        import math
        from fractions import Fraction

        k_top = int(_ERF_TOP * _ERF_STEP)
        cols = np.zeros((_ERF_TERMS + 1, k_top + 1))
        for k in range(k_top + 1):
            c = Fraction(k, _ERF_STEP)
            herm = [Fraction(1), 2 * c]
            while len(herm) < _ERF_TERMS:
                m = len(herm) - 1
                herm.append(2 * c * herm[m] - 2 * m * herm[m - 1])
            scale = 2.0 / math.sqrt(math.pi) * math.exp(-float(c * c))
            cols[0, k] = math.erf(float(c))
            fact = Fraction(1)
            for n in range(1, _ERF_TERMS + 1):
                fact *= n
                cols[n, k] = float((-1) ** (n - 1) * herm[n - 1] / fact) * scale
        assert cols[0, k_top] == 1.0  # the clamp below relies on erf(top) rounding to 1
        _erf_table.append(cols)
    return _erf_table[0]


def erf64(x, chunk: int = _ERF_CHUNK) -> np.ndarray:
    """erf of every element, computed in float64 (chunk by chunk, in preallocated work arrays)."""
    cols = _erf_coefficients()
    x = np.asarray(x, np.float64)
    flat = x.ravel()
    out = np.empty_like(flat)
    n = min(chunk, flat.size)
    work_a, work_p, work_q, work_i = np.empty(n), np.empty(n), np.empty(n), np.empty(n, np.intp)
    inv = 1.0 / _ERF_STEP
    for s in range(0, flat.size, chunk):
        v = flat[s:s + chunk]
        k = v.size
        a, p, q, idx = work_a[:k], work_p[:k], work_q[:k], work_i[:k]
        np.abs(v, out=a)
        np.minimum(a, _ERF_TOP, out=a)  # past the top erf rounds to 1, its value there; NaN stays
        np.multiply(a, _ERF_STEP, out=p)
        p += 0.5
        with np.errstate(invalid="ignore"):
            idx[...] = p  # the nearest centre (a NaN gets some index, clipped below: its h is NaN)
        np.multiply(idx, inv, out=q)
        np.subtract(a, q, out=a)  # h = |x| - centre, exact (Sterbenz)
        cols[_ERF_TERMS].take(idx, out=p, mode="clip")
        for t in range(_ERF_TERMS - 1, -1, -1):
            p *= a
            cols[t].take(idx, out=q, mode="clip")
            p += q
        np.copysign(p, v, out=out[s:s + k])
    return out.reshape(x.shape)


def _ints(v, n, default):
    return [int(a) for a in v] if v is not None and len(v) else [default] * n


IM2COL_BYTES = 256 << 20


def _conv_fast(x, w, b, auto_pad, dilations, group, pads, strides):
    """Conv as one matrix product per kernel offset over strided views of the padded input
    (onnx.reference's im2col is 10x slower on a detector's 3x3 convolutions), or None where the
    attributes are not the plain case (then onnx.reference's own kernel runs)."""
    nd = x.ndim - 2
    k = list(w.shape[2:])
    if nd < 1 or len(k) != nd:
        return None
    d, st = _ints(dilations, nd, 1), _ints(strides, nd, 1)
    g = int(group or 1)
    size = x.shape[2:]
    eff = [(k[i] - 1) * d[i] + 1 for i in range(nd)]
    mode = (auto_pad or "NOTSET")
    if isinstance(mode, bytes):
        mode = mode.decode()
    if mode == "NOTSET":
        p = _ints(pads, 2 * nd, 0)
        begin, end = p[:nd], p[nd:]
    elif mode == "VALID":
        begin, end = [0] * nd, [0] * nd
    elif mode in ("SAME_UPPER", "SAME_LOWER"):
        out = [-(-size[i] // st[i]) for i in range(nd)]
        total = [max(0, (out[i] - 1) * st[i] + eff[i] - size[i]) for i in range(nd)]
        small = [t // 2 for t in total]
        big = [t - t // 2 for t in total]
        begin, end = (small, big) if mode == "SAME_UPPER" else (big, small)
    else:
        return None
    if min(begin + end) < 0 or x.shape[1] != w.shape[1] * g or w.shape[0] % g:
        return None
    out = [(size[i] + begin[i] + end[i] - eff[i]) // st[i] + 1 for i in range(nd)]
    if min(out) < 1:
        return None
    xp = np.pad(x, [(0, 0), (0, 0)] + [(begin[i], end[i]) for i in range(nd)])
    n, c = x.shape[0], x.shape[1] // g
    m = w.shape[0] // g
    wg = w.reshape(g, m, c, *k)
    def view(off):  # the input under kernel offset `off`, at every output position
        return xp[(slice(None), slice(None)) + tuple(slice(off[i] * d[i], off[i] * d[i] + (out[i] - 1) * st[i] + 1, st[i])
                                                     for i in range(nd))].reshape(n, g, c, -1)

    kk = int(np.prod(k))
    if kk * x.shape[0] * x.shape[1] * int(np.prod(out)) * xp.itemsize <= IM2COL_BYTES:
        # im2col: one product per group over channels x kernel
        cols = np.stack([view(off) for off in np.ndindex(*k)], axis=3).reshape(n, g, c * kk, -1)
        y = np.matmul(wg.reshape(g, m, c * kk), cols)
    else:  # one product per kernel offset, summed
        y = np.zeros((n, g, m, int(np.prod(out))), dtype=np.result_type(x, w))
        for off in np.ndindex(*k):
            y += np.matmul(wg[(slice(None), slice(None), slice(None)) + off], view(off))
    y = y.reshape(n, g * m, *out)
    if b is not None:
        y += b.reshape((1, -1) + (1,) * nd)
    return y.astype(x.dtype, copy=False)


def _conv_transpose_fast(x, w, b, auto_pad, dilations, group, output_padding, output_shape, pads, strides):
    """ConvTranspose with explicit (or no) pads and no output_shape: one matrix product per kernel
    offset, added into the output at that offset's strided positions (onnx.reference's col2im
    loops in Python: 5 s for one of a detector's x2 upsamplings). None elsewhere."""
    nd = x.ndim - 2
    k = list(w.shape[2:])
    mode = auto_pad or "NOTSET"
    if isinstance(mode, bytes):
        mode = mode.decode()
    if nd < 1 or len(k) != nd or mode != "NOTSET" or (output_shape is not None and len(output_shape)):
        return None
    d, st = _ints(dilations, nd, 1), _ints(strides, nd, 1)
    op = _ints(output_padding, nd, 0)[:nd]
    p = _ints(pads, 2 * nd, 0)
    g = int(group or 1)
    if min(p + op) < 0 or x.shape[1] % g or w.shape[0] != x.shape[1]:
        return None
    size = x.shape[2:]
    full = [st[i] * (size[i] - 1) + (k[i] - 1) * d[i] + 1 + op[i] for i in range(nd)]
    out = [full[i] - p[i] - p[nd + i] for i in range(nd)]
    if min(out) < 1:
        return None
    n, c = x.shape[0], x.shape[1] // g
    m = w.shape[1]
    wg = w.reshape(g, c, m, *k)
    xg = x.reshape(n, g, c, -1)
    y = np.zeros((n, g, m, *full), dtype=np.result_type(x, w))
    for off in np.ndindex(*k):
        part = np.matmul(np.swapaxes(wg[(slice(None), slice(None), slice(None)) + off], 1, 2), xg)
        where = tuple(slice(off[i] * d[i], off[i] * d[i] + (size[i] - 1) * st[i] + 1, st[i]) for i in range(nd))
        y[(slice(None), slice(None), slice(None)) + where] += part.reshape(n, g, m, *size)
    y = y.reshape(n, g * m, *full)[(slice(None), slice(None)) + tuple(slice(p[i], p[i] + out[i]) for i in range(nd))]
    if b is not None:
        y = y + b.reshape((1, -1) + (1,) * nd)
    return np.ascontiguousarray(y).astype(x.dtype, copy=False)


def _corrected_ops():
    """onnx.reference kernels replaced where they do not compute ONNX Runtime's function:
    BatchNormalization below opset 14 (onnx 1.23 evaluates it 0.16 away from
    scale * (x - mean) / sqrt(var + eps) + bias on unit-normal inputs); and Erf, by erf64 (the
    same function, vectorized)."""
    from onnx.reference.op_run import OpRun

    class Erf(OpRun):
        op_domain = ""

        def _run(self, x):
            return (erf64(x).astype(x.dtype, copy=False),)

    class BatchNormalization(OpRun):
        op_domain = ""

        def _run(self, x, scale, bias, mean, var, epsilon=None, momentum=None, spatial=None, is_test=None,
                 training_mode=None, consumed_inputs=None):
            if training_mode or len([o for o in self.onnx_node.output if o]) > 1:
                raise NotImplementedError("BatchNormalization in training mode")
            eps = np.asarray(1e-5 if epsilon is None else epsilon, x.dtype)
            shape = [1, -1] + [1] * (x.ndim - 2)
            y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps) * scale.reshape(shape) + bias.reshape(shape)
            return (y.astype(x.dtype),)

    from onnx.reference.ops.op_conv import Conv as _Conv
    from onnx.reference.ops.op_conv_transpose import ConvTranspose as _ConvTranspose

    class Conv(_Conv):
        op_domain = ""

        def _run(self, X, W, B=None, auto_pad=None, dilations=None, group=None, kernel_shape=None, pads=None,
                 strides=None):
            if kernel_shape is None or list(kernel_shape) == list(W.shape[2:]):
                y = _conv_fast(X, W, B, auto_pad, dilations, group, pads, strides)
                if y is not None:
                    return (y,)
            return super()._run(X, W, B, auto_pad=auto_pad, dilations=dilations, group=group,
                                kernel_shape=kernel_shape, pads=pads, strides=strides)

    class ConvTranspose(_ConvTranspose):
        op_domain = ""

        def _run(self, X, W, B=None, auto_pad=None, dilations=None, group=None, kernel_shape=None,
                 output_padding=None, output_shape=None, pads=None, strides=None):
            if kernel_shape is None or list(kernel_shape) == list(W.shape[2:]):
                y = _conv_transpose_fast(X, W, B, auto_pad, dilations, group, output_padding, output_shape, pads, strides)
                if y is not None:
                    return (y,)
            return super()._run(X, W, B, auto_pad=auto_pad, dilations=dilations, group=group,
                                kernel_shape=kernel_shape, output_padding=output_padding, output_shape=output_shape,
                                pads=pads, strides=strides)

    return [BatchNormalization, Erf, Conv, ConvTranspose]


def reference_evaluator(model: onnx.ModelProto):
    """onnx.reference's evaluator with the corrected kernels (_corrected_ops)."""
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model, new_ops=_corrected_ops())


def materialized(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with every tensor read in from its file (types unchanged), for
    evaluators that cannot follow normopt's weight references (onnx.reference)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    stack = [out.graph]
    while stack:
        g = stack.pop()
        tensors = list(g.initializer) + [st.values for st in g.sparse_initializer] + [st.indices for st in g.sparse_initializer]
        for n in g.node:
            for a in n.attribute:
                if a.HasField("g"):
                    stack.append(a.g)
                stack.extend(a.graphs)
                if a.HasField("t"):
                    tensors.append(a.t)
                tensors.extend(a.tensors)
        for t in tensors:
            if W.external_ref(t) is not None:
                t.CopyFrom(numpy_helper.from_array(_array(t), t.name))
    return out


# main-graph float initializers of this size or more: counted as fed by the memory estimate
# (equivalence._float64_fits; smaller ones are fed too, see _feed_weights)
FEED_BYTES = 1 << 16


def to_float64(model: onnx.ModelProto, weights: dict | None = None, dtypes: dict | None = None) -> onnx.ModelProto:
    """A copy of `model` computing in float64 (weights read in from their files).

    With a ``weights`` dict, each main-graph float initializer becomes a graph input instead,
    and its float64 values go into ``weights`` (name -> array), to be fed at every run: ONNX
    Runtime reads a fed array in place, where an embedded one would exist three times (the
    proto, its serialized bytes, and the session's copy); and a fed weight can be perturbed
    between runs without building anything again (ExactRunner.weight_noise)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if weights is not None:
        _feed_weights(out.graph, weights, dtypes=dtypes)
    stack = [out.graph]
    while stack:  # every graph, subgraphs included, without recursion
        g = stack.pop()
        keep = _keep32(g)
        for t in g.initializer:
            if t.name in keep:
                if W.external_ref(t) is not None:
                    t.CopyFrom(numpy_helper.from_array(_array(t), t.name))
                continue
            _to_double(t)
        for st in g.sparse_initializer:
            _to_double(st.values)
            if W.external_ref(st.indices) is not None:
                st.indices.CopyFrom(numpy_helper.from_array(_array(st.indices), st.indices.name))
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            if vi.name not in keep:
                _type_to_double(vi.type)
        for n in g.node:
            out_names = set(n.output)
            for a in n.attribute:
                if a.HasField("g"):
                    stack.append(a.g)
                stack.extend(a.graphs)
                if a.name == "to" and n.op_type == "Cast" and a.i in FLOATS and a.i not in NARROW:
                    a.i = TensorProto.DOUBLE
                if DTYPE_ATTRS.get(n.op_type) == a.name and a.i in FLOATS:
                    a.i = TensorProto.DOUBLE
                if a.HasField("t") and not (out_names & keep):
                    _to_double(a.t)
                for t in a.tensors:
                    _to_double(t)
            if n.op_type == "Constant" and not (out_names & keep):
                for a in n.attribute:
                    if a.name == "value_float":
                        a.CopyFrom(onnx.helper.make_attribute("value", numpy_helper.from_array(np.float64(a.f))))
                    elif a.name == "value_floats":
                        a.CopyFrom(onnx.helper.make_attribute("value", numpy_helper.from_array(np.asarray(a.floats, np.float64))))
    stack = [out.graph]
    while stack:  # then, graph by graph (its nodes may be replaced), the rounding of narrowing casts
        g = stack.pop()
        _keep_rounding(g)
        for n in g.node:
            for a in n.attribute:
                if a.HasField("g"):
                    stack.append(a.g)
                stack.extend(a.graphs)
    for fn in out.functions:
        for n in fn.node:
            for a in n.attribute:
                if a.name == "to" and n.op_type == "Cast" and a.i in FLOATS:
                    a.i = TensorProto.DOUBLE
                if a.HasField("t"):
                    _to_double(a.t)
    return out


def _feed_weights(g, weights: dict, native: bool = False, dtypes: dict | None = None) -> None:
    """Moves g's float initializers and float Constant nodes, as float64, into ``weights``; each
    becomes a float64 graph input of its shape (integer tensors stay: quantized kernels may want
    them constant). Tensors an op wants in float32 stay (KEEP_FLOAT32). Small ones are fed too: a fed weight can be
    perturbed at run time (ExactRunner.weight_noise), and feeding a few hundred small arrays
    costs microseconds a run. native: in their own type instead (the model at its own
    precision, _Split's check). dtypes: gets each fed weight's own numpy dtype."""
    keep = _keep32(g)
    inputs = {i.name for i in g.input}
    kept = []
    for t in g.initializer:
        if t.name in keep or t.data_type not in FLOATS:
            kept.append(t)
            continue
        src = _array(t)
        if dtypes is not None:
            dtypes[t.name] = np.asarray(src).dtype
        arr = np.asarray(src) if native else _as_float64(src)
        weights[t.name] = arr
        if t.name not in inputs:  # an initializer that is also an input (IR < 4) keeps its input entry
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type if native else TensorProto.DOUBLE,
                                                              list(arr.shape)))
    if len(kept) != len(g.initializer):
        del g.initializer[:]
        g.initializer.extend(kept)
    # float Constant nodes of the main graph likewise (their values are weights too)
    outs = {o.name for o in g.output}
    nodes, moved = [], False
    for n in g.node:
        arr = _constant_float(n) if n.op_type == "Constant" and n.domain in ("", "ai.onnx") else None
        name = n.output[0] if n.output else ""
        if arr is None or not name or name in keep or name in outs or name in weights or name in inputs:
            nodes.append(n)
            continue
        if dtypes is not None:
            dtypes[name] = arr.dtype
        weights[name] = arr if native else _as_float64(arr)
        g.input.append(onnx.helper.make_tensor_value_info(
            name, onnx.helper.np_dtype_to_tensor_dtype(arr.dtype) if native else TensorProto.DOUBLE, list(arr.shape)))
        moved = True
    if moved:
        del g.node[:]
        g.node.extend(nodes)


def _as_float64(a) -> np.ndarray:
    """A C-contiguous float64 copy of `a` of its own shape (np.ascontiguousarray makes a 0-d
    array 1-d: a scalar weight fed with shape (1,) broadcasts what reads it a rank up)."""
    return np.array(a, dtype=np.float64, order="C", copy=True)


def _constant_float(n) -> np.ndarray | None:
    """The float value of a Constant node (a `value` tensor, value_float or value_floats), or None."""
    if len(n.attribute) != 1:
        return None
    a = n.attribute[0]
    if a.name == "value" and a.HasField("t") and a.t.data_type in FLOATS and W.external_ref(a.t) is None:
        return np.asarray(numpy_helper.to_array(a.t))
    if a.name == "value_float":
        return np.asarray(a.f, np.float32)
    if a.name == "value_floats":
        return np.asarray(list(a.floats), np.float32)
    return None


def _keep_rounding(g) -> None:
    """Each Cast to a narrow float type (fp16, bf16, fp8) stays, followed by a Cast to float64:
    an fp32 model's fp32 -> fp16 -> fp32 round trip rounds, and a candidate that drops it
    computes another function (issue 17's cast rule), so the reference must not drop it either.
    Arithmetic between such casts is still exact."""
    def narrowing(n):
        return n.op_type == "Cast" and n.output and n.output[0] and any(a.name == "to" and a.i in NARROW for a in n.attribute)

    if not any(narrowing(n) for n in g.node):
        return
    names = {o for n in g.node for o in n.output} | {i.name for i in g.input} | {t.name for t in g.initializer}
    nodes = []
    for n in g.node:
        n = onnx.NodeProto.FromString(n.SerializeToString()) if narrowing(n) else n
        nodes.append(n)
        if narrowing(n):
            out = n.output[0]
            narrow = f"{out}__narrow"
            while narrow in names:
                narrow += "_"
            names.add(narrow)
            n.output[0] = narrow
            nodes.append(onnx.helper.make_node("Cast", [narrow], [out], to=TensorProto.DOUBLE))
    nodes = [onnx.NodeProto.FromString(n.SerializeToString()) for n in nodes]
    del g.node[:]
    g.node.extend(nodes)


# ---------------------------------------------------------------------------------------------
# ONNX Runtime where it has a float64 kernel, onnx.reference for the nodes where it has none


_kernels = []


def _double_kernels():
    """{(domain, op): [(first, last) opset range]} of ONNX Runtime's CPU kernels that take
    float64, or None where this onnxruntime does not list its kernels."""
    if _kernels:
        return _kernels[0]
    _kernels.append(_list_double_kernels())
    return _kernels[0]


def _list_double_kernels():
    try:
        from onnxruntime.capi import _pybind_state as C

        defs = C.get_all_opkernel_def()
    except Exception:
        return None
    out = {}
    for d in defs:
        if d.provider == "CPUExecutionProvider" and any("tensor(double)" in v for v in d.type_constraints.values()):
            out.setdefault((d.domain or "", d.op_name), []).append(tuple(d.version_range))
    return out


def _subgraphs(node):
    for a in node.attribute:
        if a.HasField("g"):
            yield a.g
        yield from a.graphs


def _outer_reads(node) -> set:
    """The names a node's subgraphs read from the enclosing scopes."""
    used, defined = set(), set()
    stack = list(_subgraphs(node))
    while stack:
        g = stack.pop()
        defined.update(i.name for i in g.input)
        defined.update(t.name for t in g.initializer)
        for n in g.node:
            used.update(i for i in n.input if i)
            defined.update(o for o in n.output if o)
            stack.extend(_subgraphs(n))
        used.update(o.name for o in g.output)
    return used - defined


class _Split:
    """A float64 model run step by step: maximal runs of nodes that ONNX Runtime has float64
    kernels for, each one session (ORT_DISABLE_ALL), and each other node alone by onnx.reference
    (corrected kernels: Erf, BatchNormalization). The same float64 values as onnx.reference op by
    op, at ONNX Runtime's speed where it can: a ViT's MatMuls in ORT, its Conv and Erfs in numpy.
    ``plan(model)`` is None where the model does not split (no such node, control flow around
    one, an initializer that is also an input): then onnx.reference runs it whole."""

    @staticmethod
    def plan(model: onnx.ModelProto):
        kernels = _double_kernels()
        if kernels is None:
            return None
        g = model.graph
        if {t.name for t in g.initializer} & {i.name for i in g.input}:
            return None
        opsets = {(o.domain or ""): o.version for o in model.opset_import}

        def has_kernel(n):
            dom = "" if n.domain in ("", "ai.onnx") else n.domain
            if dom == "" and n.op_type == "Constant":  # ONNX Runtime makes it an initializer: no kernel
                return True
            try:
                since = onnx.defs.get_schema(n.op_type, opsets.get(dom, 1), dom).since_version
            except Exception:
                return False
            return any(lo <= since <= hi for lo, hi in kernels.get((dom, n.op_type), ()))

        def ort_runs(n):
            """True: ONNX Runtime runs it (and its branches); False: onnx.reference runs it
            alone; None: a branch holds a node without a float64 kernel (no split)."""
            inner = list(_subgraphs(n))
            if not has_kernel(n):
                return None if inner else False
            while inner:
                sg = inner.pop()
                for m in sg.node:
                    if not has_kernel(m):
                        return None
                    inner.extend(_subgraphs(m))
            return True

        steps = []
        for n in g.node:
            ok = ort_runs(n)
            if ok is None:
                return None
            if ok and steps and steps[-1][0] == "ort":
                steps[-1][1].append(n)
            else:
                steps.append(("ort" if ok else "ref", [n]))
        if not any(kind == "ref" for kind, _ in steps) or all(kind == "ref" for kind, _ in steps):
            return None
        return steps

    def __init__(self, model: onnx.ModelProto, steps, outputs):
        g = model.graph
        self.outputs = list(outputs)
        self.inits = {t.name: t for t in g.initializer}
        self.opsets = list(model.opset_import)
        self.functions = list(model.functions)
        self.ir = model.ir_version
        self.steps = []  # [kind, nodes, names read, names kept for later, its runner once built]
        for kind, nodes in steps:
            reads, made = [], set()
            for n in nodes:
                for name in list(n.input) + sorted(_outer_reads(n)):
                    if name and name not in made and name not in reads:
                        reads.append(name)
                made.update(o for o in n.output if o)
            self.steps.append([kind, nodes, reads, None, None])
        last = {}
        for k, (_, _, reads, _, _) in enumerate(self.steps):
            for name in reads:
                last[name] = k
        want = set(self.outputs)
        for k, step in enumerate(self.steps):
            step[3] = [o for n in step[1] for o in n.output if o and (o in want or last.get(o, -1) > k)]
        self.last = last
        self.sessions = 0

    def _build(self, step, env):
        kind, nodes, reads, outs, _ = step
        inputs = []
        inits = []
        for name in reads:
            if name in self.inits:
                inits.append(self.inits[name])
                continue
            v = env[name]
            if not isinstance(v, np.ndarray):
                raise TypeError(f"value '{name}' is not a tensor")
            inputs.append(onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), None))
        outputs = []
        for name in outs:
            vi = onnx.ValueInfoProto()
            vi.name = name
            outputs.append(vi)
        graph = onnx.helper.make_graph(nodes, "step", inputs, outputs, inits)
        m = onnx.helper.make_model(graph, opset_imports=self.opsets, ir_version=self.ir)
        m.functions.extend(self.functions)
        if kind == "ort":
            from .providers import make_session

            sess = make_session(m, "cpu", "disable", spin=False)
            names = [i.name for i in inputs]
            self.sessions += 1
            return lambda e: sess.run(outs, {n: e[n] for n in names})
        ev = reference_evaluator(m)
        names = [i.name for i in inputs]
        return lambda e: ev.run(outs, {n: e[n] for n in names})

    def run(self, feeds: dict, names: list) -> list:
        env = dict(feeds)
        for name, t in self.inits.items():
            if name in names:
                env[name] = _array(t)
        want = set(names)
        for k, step in enumerate(self.steps):
            if not step[3]:  # nothing it computes is read
                continue
            if step[4] is None:
                step[4] = self._build(step, env)
            vals = step[4](env)
            for name, v in zip(step[3], vals):
                env[name] = np.asarray(v) if not isinstance(v, (list, np.ndarray)) else v
            for name in step[2]:
                if self.last.get(name) == k and name not in want and name in env:
                    del env[name]
        return [env[n] for n in names]


# The weights that weight_noise perturbs: those whose every use is continuous arithmetic on their
# value (a weight matrix, a bias, a norm's scale, an embedding table), where rounding the weight
# moves the function by a rounding-sized amount, as a fold that rounds its weight does. A weight
# read as an exponent (Pow(x, 2.0) of a negative x is NaN at 2.0 + 1 ulp), a threshold of a
# comparison, a Cast to an integer, or inside a subgraph is left as it is.
CONTINUOUS = {
    "MatMul": None, "Gemm": None, "Add": None, "Sub": None, "Mul": None, "Div": None, "Sum": None, "Mean": None,
    "Max": None, "Min": None, "Neg": None, "Abs": None, "Sqrt": None, "Reciprocal": None, "Exp": None,
    "Log": None, "Tanh": None, "Sigmoid": None, "Erf": None, "Relu": None, "Einsum": None, "Concat": None,
    "Conv": {1, 2}, "ConvTranspose": {1, 2}, "BatchNormalization": {1, 2, 3, 4}, "LayerNormalization": {1, 2},
    "InstanceNormalization": {1, 2}, "GroupNormalization": {1, 2}, "RMSNormalization": {1},
    "SimplifiedLayerNormalization": {1}, "PRelu": {1}, "Clip": {1, 2}, "Pow": {0}, "Where": {1, 2},
    "Gather": {0}, "GatherElements": {0}, "GatherND": {0},
    "ReduceMean": {0}, "ReduceSum": {0}, "ReduceMax": {0}, "ReduceMin": {0}, "Softmax": {0},
}
# ops whose data input passes a weight's values on unchanged (their readers are judged instead)
PASS_ON = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Expand", "Flatten", "Tile", "Slice",
           "Split", "Concat"}


def continuous_weights(graph, names) -> set:
    """The names (initializers of `graph`) whose every use in the main graph is continuous
    arithmetic (CONTINUOUS), through value-preserving ops (PASS_ON, a Cast to a float type);
    a name a subgraph reads is not."""
    readers = {}
    inner = set()
    for n in graph.node:
        for i, name in enumerate(n.input):
            if name:
                readers.setdefault(name, []).append((n, i))
        if any(True for _ in _subgraphs(n)):
            inner |= _outer_reads(n)
    out = set()
    for name in names:
        ok, stack, seen = True, [name], set()
        while stack and ok:
            v = stack.pop()
            if v in seen:
                continue
            seen.add(v)
            if v in inner:
                ok = False
                break
            for n, i in readers.get(v, ()):
                dom = n.domain in ("", "ai.onnx", "com.microsoft")
                to_float = n.op_type in ("Cast", "CastLike") and i == 0 and all(
                    a.i in FLOATS for a in n.attribute if a.name == "to")
                if dom and (n.op_type in PASS_ON and i == 0 or to_float or n.op_type == "Concat"):
                    stack.extend(o for o in n.output if o)
                    continue
                allowed = CONTINUOUS.get(n.op_type, ()) if dom else ()
                if not (allowed is None or i in allowed):
                    ok = False
                    break
        if ok:
            out.add(name)
    return out


NOISE_CHUNK = 1 << 20  # a weight is perturbed this many elements at a time (the draw's work arrays stay small)


def _chunks(size: int, seed: int, k: int):
    """(offset, generator) per chunk of weight k: the same draws at every call."""
    for lo in range(0, size, NOISE_CHUNK):
        yield lo, np.random.default_rng([seed, k, lo])


def _factor(rng, shape, eps: float) -> np.ndarray:
    """1 + r per element, r uniform in [-eps/2, eps/2]: the relative rounding of storing a value
    in a dtype of that eps (at most half an ulp)."""
    return 1 + (eps / 2) * rng.uniform(-1.0, 1.0, shape)


def _ulp(dtype) -> float:
    """eps of a float dtype (bf16 too)."""
    try:
        return float(np.finfo(dtype).eps)
    except Exception:
        return {"bfloat16": 2.0 ** -7}.get(np.dtype(dtype).name, 2.0 ** -3)


def double_feeds(feeds: dict) -> dict:
    return {k: (np.asarray(v, np.float64) if W.is_float(np.asarray(v).dtype) else v) for k, v in feeds.items()}


class ExactRunner:
    """Runs a model in float64: ONNX Runtime where it has the kernels, else onnx.reference."""

    def __init__(self, model: onnx.ModelProto, outputs: list, first_feeds: dict | None = None, reference_fits=None):
        """reference_fits: None, or a callable giving None or why onnx.reference's evaluation
        (which holds more memory than ONNX Runtime's) would not fit; asked before it starts."""
        self.available, self.why, self.engine = False, "", ""
        self.outputs = list(outputs)
        self.seconds = 0.0
        self._first = None  # (feeds, outputs) of the trial run, reused by run()
        self._sess = self._ref = None  # the float64 session (ONNX Runtime), else the evaluator
        self._split = None  # else ONNX Runtime and onnx.reference node by node (_Split)
        self._weights = {}  # the fed float64 weights (to_float64)
        self._dtypes = {}  # their own dtypes (each one's ulp: weight_noise)
        self.weight_runs = 0  # runs with perturbed weights (weight_noise)
        self._graph = model.graph  # the original's main graph: which weights weight_noise perturbs
        self._noisy = None
        t0 = time.perf_counter()
        try:
            self.model = to_float64(model, self._weights, self._dtypes)
        except Exception as exc:
            self.why = f"the model cannot be converted to float64 ({type(exc).__name__}: {str(exc)[:160]})"
            return
        from .providers import make_session

        errors = []
        try:
            self._sess = make_session(self.model, "cpu", "disable", spin=False)  # as equivalence.SPIN
            if first_feeds is not None:
                self._first = (first_feeds, self._run(self._feeds(first_feeds)))
            self.engine, self.available = "ONNX Runtime (float64 kernels)", True
        except Exception as exc:
            self._sess = None
            errors.append(str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__)
        if not self.available:
            steps = _Split.plan(self.model)
            if steps is not None:
                try:
                    self._split = _Split(self.model, steps, self.outputs)
                    if first_feeds is not None:
                        self._first = (first_feeds, self._run(self._feeds(first_feeds)))
                    ref_ops = [n.op_type for kind, nodes in steps if kind == "ref" for n in nodes]
                    self.engine = (f"ONNX Runtime (float64 kernels) with onnx.reference for the {len(ref_ops)} node(s) "
                                   f"it has none for: {', '.join(sorted(set(ref_ops)))}")
                    self.available = True
                except Exception as exc:
                    self._split = None
                    self._first = None
                    errors.append(f"split: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''}")
        if not self.available and reference_fits is not None:
            too_big = reference_fits()
            if too_big is not None:
                self.why = "; ".join(errors + [f"onnx.reference: {too_big}"])
                self.model = None
                self._weights = {}
                self.seconds += time.perf_counter() - t0
                return
        if not self.available:
            try:
                self._ref = reference_evaluator(self.model)
                if first_feeds is not None:
                    self._first = (first_feeds, self._run(self._feeds(first_feeds)))
                self.engine, self.available = "onnx.reference (float64, op by op)", True
            except Exception as exc:
                self._ref = None
                errors.append(f"onnx.reference: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''}")
                self.why = "; ".join(errors)
                self.model = None
                self._weights = {}
        self.seconds += time.perf_counter() - t0

    def disagreement(self, native_model: onnx.ModelProto, feeds: dict, ort_vals: list, k: float, floor_ulps: float):
        """onnx.reference only: does the evaluator compute ONNX Runtime's function? It evaluates
        the original at its own precision too; where that answer is further from ORT's than
        precision explains (k x its distance to its own float64 answer + floor_ulps ulp x RMS),
        an op means something else to the evaluator (as BatchNormalization did below opset 14) and its float64
        answer is not the exact value of ORT's function. The reason, or None."""
        if self._ref is None and self._split is None:
            return None
        t0 = time.perf_counter()
        try:
            if self._split is not None:  # the same split at the model's own precision
                fed = {}
                nm = onnx.ModelProto()
                nm.CopyFrom(native_model)
                _feed_weights(nm.graph, fed, native=True)
                nm = materialized(nm)
                steps = _Split.plan(nm)
                if steps is None:
                    return "the model does not split at its own precision as it does in float64"
                native = [np.asarray(v) for v in _Split(nm, steps, self.outputs).run({**fed, **feeds}, self.outputs)]
            else:
                native = [np.asarray(v) for v in reference_evaluator(materialized(native_model)).run(self.outputs, feeds)]
        except Exception as exc:
            return f"onnx.reference cannot evaluate the original at its own precision ({type(exc).__name__})"
        finally:
            self.seconds += time.perf_counter() - t0
        high = self.run(feeds)
        for name, o, n, h in zip(self.outputs, ort_vals, native, high):
            o = np.asarray(o)
            if o.dtype.kind != "f" or not o.size or np.shape(n) != o.shape or np.shape(h) != o.shape:
                continue
            o64, n64, h64 = (np.asarray(x, np.float64) for x in (o, n, h))
            finite = np.isfinite(o64) & np.isfinite(n64) & np.isfinite(h64)
            if not finite.any():
                continue
            sem = float(np.abs(o64 - n64)[finite].max())
            prec = float(np.abs(n64 - h64)[finite].max())
            rms = float(np.sqrt(np.mean(np.square(h64[finite]))))
            if sem > k * prec + floor_ulps * float(np.finfo(o.dtype).eps) * rms:
                return (f"onnx.reference disagrees with ONNX Runtime on the original's '{name}' at its own precision "
                        f"(max diff {sem:.3g}, against {prec:.3g} from precision), so its float64 answer is not ORT's function")
        return None

    def _feeds(self, feeds: dict) -> dict:
        f = dict(self._weights)
        f.update(double_feeds(feeds))  # a fed input that has an initializer (IR < 4) keeps the fed value
        return f

    def run(self, feeds: dict) -> list:
        if self._first is not None and self._first[0] is feeds:
            return self._first[1]
        t0 = time.perf_counter()
        try:
            return self._run(self._feeds(feeds))
        finally:
            self.seconds += time.perf_counter() - t0

    def _run(self, f: dict) -> list:
        """One float64 evaluation (every one goes through here)."""
        if self._sess is not None:
            return [np.asarray(v) for v in self._sess.run(self.outputs, f)]
        if self._split is not None:
            return [np.asarray(v) for v in self._split.run(f, self.outputs)]
        return [np.asarray(v) for v in self._ref.run(self.outputs, f)]

    def weight_noise(self, feeds: dict, base: list, draws: int, seed: int) -> list:
        """Per fetched value, the elementwise worst |change| of the float64 function on `feeds`
        when every continuous fed float weight (continuous_weights) moves as far as storing it
        in its own dtype can round it: w x (1 + r), r uniform in [-eps/2, eps/2] of that dtype
        (half an ulp, relative), over `draws` draws; `base`: the unperturbed float64 values (run(feeds)). None where a value is not a
        finite float array. The same session runs it: the weights are perturbed in place and
        restored exactly after each draw (no second copy of the weights, nothing built)."""
        worst = [None if not (np.asarray(b).dtype.kind == "f" and np.asarray(b).size and np.isfinite(b).all())
                 else np.zeros(np.shape(b)) for b in base]
        t0 = time.perf_counter()
        try:
            for draw in range(draws):
                undo = self._perturb(30_000 + seed + draw)
                try:
                    moved = self._run(self._feeds(feeds))
                finally:
                    undo()
                self.weight_runs += 1
                for j, (b, m) in enumerate(zip(base, moved)):
                    if worst[j] is None:
                        continue
                    m = np.asarray(m, np.float64)
                    if m.shape != worst[j].shape or not np.isfinite(m).all():
                        worst[j] = None
                        continue
                    np.maximum(worst[j], np.abs(m - np.asarray(b, np.float64)), out=worst[j])
        finally:
            self.seconds += time.perf_counter() - t0
        return worst

    def _perturb(self, seed: int):
        """Perturbs every continuous fed weight by up to half an ulp of its own dtype; returns the
        function that restores them, bit for bit. A weight held as the float64 copy of a narrower
        float (fp32, fp16, bf16) is scaled in place by (1 + r), and restored by dividing by the same
        factor (the same draw again) and rounding to its own dtype: the quotient is within
        1e-14 of the original, which lies on that dtype's grid, so the rounding gives it back
        exactly. Any other (a float64 weight, an array it does not own) is replaced by a
        perturbed copy, and put back."""
        in_place, swapped = [], []
        if self._noisy is None:
            self._noisy = continuous_weights(self._graph, self._weights) if self._graph is not None else set()
        for k, name in enumerate(sorted(self._weights)):
            if name not in self._noisy:
                continue
            w = self._weights[name]
            dt = self._dtypes.get(name, np.dtype(np.float64))
            eps = _ulp(dt)
            if dt != np.float64 and w.dtype == np.float64 and w.flags.writeable and w.flags.owndata and w.flags.c_contiguous:
                flat = w.reshape(-1)
                for lo, rng in _chunks(flat.size, seed, k):
                    flat[lo:lo + NOISE_CHUNK] *= _factor(rng, min(NOISE_CHUNK, flat.size - lo), eps)
                in_place.append((k, name, dt, eps))
            else:
                rng = np.random.default_rng([seed, k])
                swapped.append((name, w))
                self._weights[name] = np.asarray(w, np.float64) * _factor(rng, w.shape, eps)

        def undo():
            for k, name, dt, eps in in_place:
                flat = self._weights[name].reshape(-1)
                for lo, rng in _chunks(flat.size, seed, k):
                    part = flat[lo:lo + NOISE_CHUNK]
                    part /= _factor(rng, part.size, eps)
                    part[...] = part.astype(dt).astype(np.float64)
            for name, w in swapped:
                self._weights[name] = w
        return undo

    def close(self):
        self._graph = None
        self._first = None
        self._sess = None
        self._split = None
        self._ref = None
        self.model = None
        self._weights = {}
