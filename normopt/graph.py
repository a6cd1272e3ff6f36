"""Graph utilities over onnx-graphsurgeon: import/export that keeps the model's identity,
constant lookup, axis and shape helpers, and weight math in float64."""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import tempfile

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .io import ORT_DEFAULT_DOMAIN_CONTRIB_OPS, TWO_GB

# ---------------------------------------------------------------------------------------------
# import / export


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    """Import a model into graphsurgeon, with inferred shapes when shape inference works."""
    return gs.import_onnx(infer_shapes(model))


@contextlib.contextmanager
def _scratch_cwd():
    """Run in a throw-away working directory, so a library's stray files never land in the user's."""
    old = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="normopt-") as tmp:
        os.chdir(tmp)
        try:
            yield
        finally:
            os.chdir(old)


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shapes for every value: ONNX Runtime's symbolic shape inference first (it knows ORT's
    contrib ops and resolves more Shape-built dims than ONNX's data propagation), without
    merging conflicting dims on a guess; ONNX shape inference where it fails."""
    if model.ByteSize() > TWO_GB:
        return model
    contrib = any(n.domain == "com.microsoft" or n.op_type in ORT_DEFAULT_DOMAIN_CONTRIB_OPS for n in model.graph.node)
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        with _scratch_cwd():  # on incomplete inference it saves a debug model into the cwd
            out = SymbolicShapeInference.infer_shapes(model, auto_merge=contrib, guess_output_rank=contrib)
        if out is not None:
            return out
    except Exception:
        pass
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:
        return model


def to_model(graph: gs.Graph, original: onnx.ModelProto) -> onnx.ModelProto:
    """Export, restoring what graphsurgeon drops: IR version, producer, doc strings, metadata,
    and every opset import of the original (plus any domain the passes added)."""
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = original.ir_version
    model.producer_name = original.producer_name
    model.producer_version = original.producer_version
    model.domain = original.domain
    model.model_version = original.model_version
    model.doc_string = original.doc_string
    model.graph.doc_string = original.graph.doc_string
    del model.metadata_props[:]
    model.metadata_props.extend(original.metadata_props)
    versions = {imp.domain: imp.version for imp in original.opset_import}
    for imp in model.opset_import:
        versions.setdefault(imp.domain, imp.version)
    used = {n.domain for n in model.graph.node}
    for dom in used:
        if dom not in versions and dom not in ("", "ai.onnx"):
            versions[dom] = 1
    del model.opset_import[:]
    for dom, ver in versions.items():
        model.opset_import.append(onnx.helper.make_opsetid(dom, ver))
    # graph value_info from shape inference is stale after rewriting: drop it
    del model.graph.value_info[:]
    return model


def refresh(graph: gs.Graph) -> gs.Graph:
    """Re-run shape inference on the current graph (after a pass changed it)."""
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    opset = graph.opset
    model = gs.export_onnx(graph, do_type_check=False)
    new = gs.import_onnx(infer_shapes(model))
    new.opset = opset
    return new


# ---------------------------------------------------------------------------------------------
# lookups


def const_value(tensor) -> np.ndarray | None:
    """The value of a constant tensor: an initializer or the output of a Constant node."""
    if tensor is None:
        return None
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        node = tensor.inputs[0]
        val = node.attrs.get("value")
        if isinstance(val, gs.Constant):
            return np.asarray(val.values)
        if val is not None:
            return np.asarray(val)
        for key in ("value_float", "value_int"):
            if key in node.attrs:
                return np.asarray(node.attrs[key])
        for key in ("value_floats", "value_ints"):
            if key in node.attrs:
                return np.asarray(node.attrs[key])
    return None


def producer(tensor):
    return tensor.inputs[0] if tensor is not None and len(tensor.inputs) else None


def consumers(tensor):
    return list(tensor.outputs) if tensor is not None else []


def replace_uses(old, new) -> None:
    """Every node that reads `old` reads `new` instead."""
    for c in list(old.outputs):
        for i, t in enumerate(c.inputs):
            if t is old:
                c.inputs[i] = new


def bypass(graph: gs.Graph, x, y) -> None:
    """A node that computed y from x is gone: y's readers read x. If y is a graph output, x's
    producer writes y instead, so the output keeps its name (x then must have no other role)."""
    if is_graph_output(graph, y):
        prod = producer(x)
        replace_uses(x, y)
        prod.outputs[[i for i, o in enumerate(prod.outputs) if o is x][0]] = y
    else:
        replace_uses(y, x)


def is_graph_output(graph: gs.Graph, tensor) -> bool:
    return any(t is tensor for t in graph.outputs)


def rank(tensor) -> int | None:
    shape = getattr(tensor, "shape", None)
    if shape is None:
        return None
    return len(shape)


def shape(tensor):
    """Shape as a list (ints for static dims, str/None otherwise), or None when unknown."""
    if isinstance(tensor, gs.Constant):
        return list(tensor.values.shape)
    s = getattr(tensor, "shape", None)
    return None if s is None else list(s)


def static_dim(tensor, axis) -> int | None:
    s = shape(tensor)
    if s is None or not -len(s) <= axis < len(s):
        return None
    d = s[axis]
    return d if isinstance(d, (int, np.integer)) and d >= 0 else None


def normalize_axis(axis: int, r: int) -> int:
    return axis + r if axis < 0 else axis


def reduce_axes(node: gs.Node, r: int | None):
    """(axes, keepdims) of a Reduce* node: axes from the attribute (opset < 18) or the second
    input (opset >= 18), normalized to non-negative; None means all axes. Returns (False, _)
    when the axes are not constant."""
    keepdims = int(node.attrs.get("keepdims", 1))
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None and node.inputs[1].name:
        val = const_value(node.inputs[1])
        if val is None:
            return False, keepdims
        axes = [int(a) for a in np.asarray(val).reshape(-1)]
    if axes is None or len(axes) == 0:
        if int(node.attrs.get("noop_with_empty_axes", 0)):
            return (), keepdims
        return None, keepdims
    if r is None:
        if any(a < 0 for a in axes):
            return False, keepdims
        return tuple(sorted(int(a) for a in axes)), keepdims
    return tuple(sorted(normalize_axis(int(a), r) for a in axes)), keepdims


def op_counts(graph: gs.Graph) -> dict:
    return dict(sorted(collections.Counter(n.op for n in graph.nodes).items()))


# ---------------------------------------------------------------------------------------------
# building


class Namer:
    """Unique tensor/node names in a graph."""

    def __init__(self, graph: gs.Graph):
        self.used = set(graph.tensors().keys()) | {n.name for n in graph.nodes if n.name}
        self.counter = itertools.count()

    def __call__(self, base: str) -> str:
        base = base or "normopt"
        name = base
        while name in self.used:
            name = f"{base}_{next(self.counter)}"
        self.used.add(name)
        return name


def new_const(namer: Namer, base: str, array: np.ndarray) -> gs.Constant:
    return gs.Constant(namer(base), np.ascontiguousarray(array))


def new_var(namer: Namer, base: str, dtype=None, shape=None) -> gs.Variable:
    return gs.Variable(namer(base), dtype=dtype, shape=shape)


def add_node(graph: gs.Graph, namer: Namer, op: str, inputs, outputs, attrs=None, domain=None, base=None):
    node = gs.Node(op=op, name=namer(base or op), attrs=attrs or {}, inputs=list(inputs), outputs=list(outputs))
    if domain:
        node.domain = domain
    graph.nodes.append(node)
    return node


def reduce_mean_node(graph, namer, x, out, axes, keepdims=1):
    """ReduceMean in the form the graph's opset wants (axes as attribute < 18, input >= 18)."""
    if (graph.opset or 17) >= 18:
        axes_c = new_const(namer, "normopt_axes", np.asarray(axes, dtype=np.int64))
        return add_node(graph, namer, "ReduceMean", [x, axes_c], [out], {"keepdims": keepdims})
    return add_node(graph, namer, "ReduceMean", [x], [out], {"axes": list(axes), "keepdims": keepdims})


def f64(array: np.ndarray) -> np.ndarray:
    """Weight math is done in float64."""
    return np.asarray(array, dtype=np.float64)


def cast_like(array64: np.ndarray, like: np.ndarray) -> np.ndarray:
    return np.asarray(array64).astype(np.asarray(like).dtype)


def tensor_dtype(tensor):
    if isinstance(tensor, gs.Constant):
        return tensor.values.dtype
    dt = getattr(tensor, "dtype", None)
    if dt is None:
        return None
    try:
        return np.dtype(dt)
    except TypeError:
        try:
            return onnx.helper.tensor_dtype_to_np_dtype(dt)
        except Exception:
            return None
