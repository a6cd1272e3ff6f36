"""fold_constants: evaluate nodes whose inputs are all known.

Identity: a node whose inputs are constants computes a constant; Shape (and Size) of a tensor
whose shape is static is a constant. Folding Shape/Gather/Concat chains built from static
shapes, Add(eps)->Sqrt on constants, Reshape/Identity of weights and Constant nodes lets later
passes see plain constants (Unified Norm's TorchScript export, Paddle's Constant -> Identity ->
Reshape weights; see normopt-math.md section 2).

Preconditions, per node (a node that fails one is left to run as it is):
  - the default ONNX domain, no subgraph attribute, not control flow (If/Loop/Scan: a constant
    condition is left to ONNX Runtime rather than inlined);
  - deterministic (no Random*, Multinomial, Bernoulli);
  - not a quantization op (DequantizeLinear of int8 weights stays: folding it would turn a
    quantized model into a float one);
  - the output is at most ``MAX_BYTES``, except Identity/Reshape/Squeeze/Unsqueeze/Flatten of a
    weight, which become the same bytes under a new shape (no copy);
  - no input is a weight (over ``SHARED_BYTES``) that other nodes read too: a tied embedding's
    Transpose for the LM head stays, or the model would carry the table twice;
  - the output is not a graph output (its name must keep a producer);
  - the op is on the vetted allowlist ``FOLDABLE``: ops whose ONNX reference result is the
    result ONNX Runtime computes (data movement, shape arithmetic, exact float arithmetic).
    Left to run: transcendental ops, Mod (sign conventions), Resize, anything not listed;
  - never over an empty tensor, except pure data movement (ReduceMean of an empty tensor is
    NaN in onnx.reference and 0 in ONNX Runtime): arithmetic and reductions with an empty
    input or output stay;
  - value checks where reference and runtime part ways: integer Div by zero (undefined),
    Cast of a non-finite or out-of-range float to an integer (undefined), Cast to or from
    bfloat16 / float8 / string, Min/Max over NaN, integer Pow, float Range.
Evaluation is ONNX's reference implementation (onnx.reference), node by node in topological
order, so a chain folds in one sweep.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from .. import graph as G
from .. import weights as W
from ..pipeline import Analysis, Pass

MAX_BYTES = 1 << 20  # larger computed results stay computed (ONNX Runtime folds them at load)
SHARED_BYTES = 64 << 10  # a constant this large that other nodes read is not folded into a second copy
NEVER = {
    "If", "Loop", "Scan", "DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear", "RandomNormal",
    "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli", "Constant",
}
ALIASING = {"Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten"}  # same bytes, new shape
# data movement: the output's elements are copies of the inputs' (or the shape): exact anywhere,
# an empty tensor included
MOVEMENT = ALIASING | {"Shape", "Size", "Transpose", "Concat", "Gather", "Slice", "Expand", "Tile", "ConstantOfShape", "Cast"}
# arithmetic whose reference result is ONNX Runtime's (IEEE-exact ops, comparisons, selection,
# integer arithmetic with C semantics); reductions over non-empty inputs
ARITHMETIC = {
    "Add", "Sub", "Mul", "Div", "Neg", "Abs", "Sqrt", "Reciprocal", "Pow", "Min", "Max", "Sum",
    "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or", "Xor", "Where",
    "Range", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "Floor", "Ceil", "Sign",
}
FOLDABLE = MOVEMENT | ARITHMETIC
_NARROW_FLOATS = ("bfloat16", "float8", "float4")  # their rounding/saturation modes differ between implementations


def _inputs(node):
    return [t for t in node.inputs if t is not None and t.name]


def _nbytes(t) -> int:
    info = G.const_info(t)
    if info is None or info[1] is None:
        return 0
    return int(np.prod(info[0])) * np.dtype(info[1]).itemsize if info[0] else np.dtype(info[1]).itemsize


def _foldable(graph, node) -> bool:
    if (node.domain or "") not in ("", "ai.onnx") or node.op in NEVER or node.op not in FOLDABLE:
        return False
    if any(isinstance(v, gs.Graph) for v in node.attrs.values()):
        return False
    if any(G.is_graph_output(graph, o) for o in node.outputs) or len(node.outputs) != 1:
        return False
    if node.op in ("Shape", "Size"):
        s = G.shape(node.inputs[0])
        return s is not None and all(isinstance(d, int) and d >= 0 for d in s)
    if _partial_shape(node) is not None:
        return True
    ins = _inputs(node)
    if not ins or any(G.const_value(t) is None for t in ins):
        return False
    if node.op in ALIASING and isinstance(ins[0], gs.Constant) and isinstance(ins[0]._values, W.RefValues):
        return True
    if any(_nbytes(t) > SHARED_BYTES and len(t.outputs) > 1 for t in ins):
        return False  # a weight something else reads too: folding would store it twice
    return sum(_nbytes(t) for t in ins) <= 4 * MAX_BYTES


def _partial_shape(node):
    """Gather(Shape(x), idx) or Slice(Shape(x), ...) that selects only static dims of x: the dims
    as an int64 array (the rest of x's shape may be dynamic)."""
    if node.op not in ("Gather", "Slice") or not node.inputs:
        return None
    src = G.producer(node.inputs[0])
    if src is None or src.op != "Shape" or not src.inputs:
        return None
    dims = G.shape(src.inputs[0])
    if dims is None:
        return None
    start, end = int(src.attrs.get("start", 0)), src.attrs.get("end")
    dims = dims[start:None if end is None else int(end)]
    idx = np.arange(len(dims))
    try:
        if node.op == "Gather":
            which = G.const_value(node.inputs[1])
            if which is None or int(node.attrs.get("axis", 0)) != 0:
                return None
            sel = idx[np.asarray(which, np.int64)]
        else:
            args = [G.const_value(t) if t is not None and t.name else None for t in node.inputs[1:]]
            if any(a is None for a, t in zip(args, node.inputs[1:]) if t is not None and t.name):
                return None
            starts, ends = args[0], args[1]
            axes = args[2] if len(args) > 2 else None
            steps = args[3] if len(args) > 3 else None
            if axes is not None and [int(a) for a in np.asarray(axes).reshape(-1)] not in ([0], [-1]):
                return None
            step = int(np.asarray(steps).reshape(-1)[0]) if steps is not None else 1
            sel = idx[int(np.asarray(starts).reshape(-1)[0]):int(np.asarray(ends).reshape(-1)[0]):step]
    except (IndexError, ValueError, TypeError):
        return None
    picked = np.asarray([dims[i] for i in np.asarray(sel).reshape(-1)], dtype=object).reshape(np.shape(sel))
    if not all(isinstance(d, int) and d >= 0 for d in picked.reshape(-1)):
        return None
    return picked.astype(np.int64)


def _constant_nodes(graph):
    """Constant nodes whose value can become an initializer of the same name."""
    for node in graph.nodes:
        if node.op == "Constant" and len(node.outputs) == 1 and not G.is_graph_output(graph, node.outputs[0]):
            if G.const_value(node.outputs[0]) is not None:
                yield node


def _evaluate(node, values, opset):
    from onnx.reference import ReferenceEvaluator

    proto = OnnxExporter.export_node(node)
    names = [t.name for t in node.inputs]
    del proto.input[:]
    proto.input.extend(names)
    feeds = {t.name: v for t, v in zip(node.inputs, values) if t is not None and t.name}
    ins = [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for n, v in feeds.items()]
    outs = [onnx.helper.make_empty_tensor_value_info(o) for o in proto.output]
    g = onnx.helper.make_graph([proto], "fold", ins, outs)
    m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", opset)])
    return ReferenceEvaluator(m).run(None, feeds)[0]


class FoldConstants(Pass):
    repeat = True  # folding a chain makes shapes static that let the next round fold more
    name = "fold_constants"
    description = "fold constant subgraphs and static-shape Shape/Gather/Concat chains (canonicalization)"

    def analyze(self, graph, ctx):
        matches = [n for n in graph.nodes if _foldable(graph, n)]
        matches += list(_constant_nodes(graph))
        return Analysis(matches=matches)

    def apply(self, graph, matches, ctx):
        opset = graph.opset or 17
        n = 0
        for node in list(_constant_nodes(graph)):  # Constant nodes become initializers
            out = node.outputs[0]
            G.replace_uses(out, _constant(out.name, G.const_value(out)))
            node.outputs.clear()
            n += 1
        for node in list(graph.nodes):  # topological: a chain folds in this one sweep
            if not node.outputs or not _foldable(graph, node):
                continue
            out = node.outputs[0]
            try:
                value = self._value(node, opset)
            except Exception:
                continue  # not evaluable here: ONNX Runtime computes it at run time
            if value is None:
                continue
            G.replace_uses(out, value if isinstance(value, gs.Constant) else _constant(out.name, value))
            node.outputs.clear()
            node.inputs.clear()
            n += 1
        graph.cleanup(remove_unused_graph_inputs=False)
        return n

    @staticmethod
    def _value(node, opset):
        if node.op in ("Shape", "Size"):
            s = G.shape(node.inputs[0])
            if node.op == "Size":
                return np.asarray(int(np.prod(s)), np.int64)
            start, end = int(node.attrs.get("start", 0)), node.attrs.get("end")
            return np.asarray(s[start:end if end is None else int(end)], np.int64)
        part = _partial_shape(node)
        if part is not None:
            return part
        ins = node.inputs
        src = ins[0]
        if node.op in ALIASING and isinstance(src, gs.Constant) and isinstance(src._values, W.RefValues):
            # the same bytes under the output's static shape
            out_shape = G.shape(node.outputs[0])
            if out_shape is None or not all(isinstance(d, int) for d in out_shape):
                return None
            ref = src._values
            t = onnx.TensorProto()
            t.CopyFrom(ref.tensor)
            t.name = node.outputs[0].name
            del t.dims[:]
            t.dims.extend(out_shape)
            return gs.Constant(t.name, W.RefValues(t))
        values = [G.const_value(t) if t is not None and t.name else None for t in ins]
        if not _same_as_runtime(node, values):
            return None
        out = np.asarray(_evaluate(node, values, opset))
        if out.nbytes > MAX_BYTES:
            return None
        if out.size == 0 and node.op not in MOVEMENT:
            return None  # arithmetic with an empty result: left to ONNX Runtime
        return out


def _same_as_runtime(node, values) -> bool:
    """Would onnx.reference compute what ONNX Runtime computes on these values?"""
    given = [v for v in values if v is not None]
    if node.op not in MOVEMENT and any(np.asarray(v).size == 0 for v in given):
        return False  # e.g. ReduceMean over an empty tensor: NaN in the reference, 0 in ORT
    if any(np.asarray(v).dtype.kind in "OSU" for v in given):
        return False  # strings
    if node.op == "Div" and len(given) == 2 and np.asarray(given[0]).dtype.kind in "iu":
        if np.any(np.asarray(given[1]) == 0):
            return False  # integer division by zero is undefined
    if node.op == "Cast":
        src = np.asarray(given[0]).dtype
        dst = W.np_dtype(int(node.attrs.get("to", 0)))
        if dst is None:
            return False
        if any(d.name.startswith(_NARROW_FLOATS) for d in (src, dst)) or dst.kind in "OSU":
            return False
        if src.kind == "f" and dst.kind in "iu":
            v = np.asarray(given[0], np.float64)
            info = np.iinfo(dst)
            if not np.all(np.isfinite(v)) or np.any(v <= info.min - 1.0) or np.any(v >= info.max + 1.0):
                return False  # out of range: undefined behaviour in C++, wraps in numpy
    if node.op in ("Min", "Max", "ReduceMax", "ReduceMin") and any(
            np.asarray(v).dtype.kind == "f" and np.isnan(np.asarray(v)).any() for v in given):
        return False  # NaN propagation differs (numpy propagates, ORT's kernels may not)
    if node.op == "Pow" and any(np.asarray(v).dtype.kind in "iu" for v in given):
        return False  # integer Pow: overflow and negative exponents differ
    if node.op == "Range" and any(np.asarray(v).dtype.kind == "f" for v in given):
        return False  # float Range: the element count depends on rounding
    return True


def _constant(name, value):
    return gs.Constant(name, _contiguous(value))


def _contiguous(value) -> np.ndarray:
    """A C-contiguous array of the same shape (np.ascontiguousarray would make a 0-d array 1-d)."""
    value = np.asarray(value)
    return value if value.flags["C_CONTIGUOUS"] else value.copy(order="C")
