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
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from . import weights as W
from .io import ORT_DEFAULT_DOMAIN_CONTRIB_OPS, TWO_GB

# ---------------------------------------------------------------------------------------------
# import / export
#
# The graph normopt rewrites is a *skeleton* (see weights.py): large tensors are RefValues that
# reference file regions, so importing, exporting, refreshing shapes and checking cost time and
# memory in proportion to the graph, never to the weights.


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    """Import a model (a skeleton or an in-memory model) into graphsurgeon, with inferred shapes
    when shape inference works. External tensors with absolute locations become RefValues."""
    graph = gs.import_onnx(infer_shapes(model))
    wrap_refs(graph)
    return graph


def all_graphs(graph: gs.Graph):
    """The graph and every subgraph (If branches, Loop/Scan bodies), outermost first."""
    yield graph
    yield from graph.subgraphs(recursive=True)


def wrap_refs(graph: gs.Graph) -> None:
    """Give every constant whose TensorProto is an absolute external reference RefValues, so
    reading it maps the file region instead of loading (and caching) the whole tensor."""
    for g in all_graphs(graph):
        for t in g.tensors().values():
            _wrap(t)
        for node in g.nodes:
            for v in node.attrs.values():
                if isinstance(v, gs.Constant):
                    _wrap(v)


def _wrap(t) -> None:
    if not isinstance(t, gs.Constant):
        return
    lv = t._values
    if isinstance(lv, W.RefValues) or not isinstance(lv, LazyValues) or isinstance(lv, SparseValues):
        return
    ref = W.external_ref(lv.tensor)
    if ref is not None and os.path.isabs(ref[0]):
        t._values = W.RefValues(lv.tensor)


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


def infer_shapes(model: onnx.ModelProto, symbolic: bool = True) -> onnx.ModelProto:
    """Shapes for every value: ONNX Runtime's symbolic shape inference first (it knows ORT's
    contrib ops and resolves more Shape-built dims than ONNX's data propagation), without
    merging conflicting dims on a guess; ONNX shape inference where it fails. On a skeleton
    (large tensors referenced, not loaded) this is cheap whatever the size of the weights."""
    if model.ByteSize() > TWO_GB:  # an in-memory model with its weights: infer on its skeleton
        return model
    contrib = any(n.domain == "com.microsoft" or n.op_type in ORT_DEFAULT_DOMAIN_CONTRIB_OPS for n in model.graph.node)
    if symbolic:
        try:
            from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

            with _scratch_cwd(), _quiet_logging():  # on incomplete inference it saves a debug model into the cwd
                out = SymbolicShapeInference.infer_shapes(model, auto_merge=contrib, guess_output_rank=contrib)
            if out is not None:
                return out
        except Exception:
            pass
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:
        return model


@contextlib.contextmanager
def _quiet_logging():
    import logging

    log = logging.getLogger("onnxruntime.tools.symbolic_shape_infer")
    old = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(old)


def export(graph: gs.Graph) -> onnx.ModelProto:
    """The graph as a ModelProto: a skeleton where constants are references (RefValues). An
    initializer that graphsurgeon copies into each subgraph reading it goes back to the main
    graph, once."""
    model = gs.export_onnx(graph, do_type_check=False)
    _hoist_subgraph_initializers(model)
    return model


def to_model(graph: gs.Graph, original: onnx.ModelProto) -> onnx.ModelProto:
    """Export, restoring what graphsurgeon drops: IR version, producer, doc strings, metadata,
    and every opset import of the original (plus any domain the passes added)."""
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    model = export(graph)
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
    _order_like(model.graph.initializer, original.graph.initializer)
    return model


def _order_like(inits, original) -> None:
    """Initializers in the input's order, the ones a pass created after them (so optimizing an
    optimized model gives the same bytes)."""
    rank_of = {t.name: i for i, t in enumerate(original)}
    order = sorted(range(len(inits)), key=lambda i: (rank_of.get(inits[i].name, len(rank_of)), i))
    if order == list(range(len(inits))):
        return
    items = [onnx.TensorProto() for _ in order]
    for dst, i in zip(items, order):
        dst.CopyFrom(inits[i])
    del inits[:]
    inits.extend(items)


def snapshot(graph: gs.Graph) -> onnx.ModelProto:
    """The graph's state as a skeleton ModelProto (structure, shapes; weights by reference)."""
    model = gs.export_onnx(graph, do_type_check=False)
    return model


def restore(model: onnx.ModelProto) -> gs.Graph:
    """A graph from a snapshot, shapes as they were (no re-inference)."""
    graph = gs.import_onnx(model)
    wrap_refs(graph)
    return graph


def _subgraph_protos(graph_proto):
    for node in graph_proto.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield attr.g
                yield from _subgraph_protos(attr.g)
            for g in attr.graphs:
                yield g
                yield from _subgraph_protos(g)


def _same_tensor(a, b) -> bool:
    ra, rb = W.external_ref(a), W.external_ref(b)
    if ra is not None or rb is not None:
        return ra == rb and list(a.dims) == list(b.dims) and a.data_type == b.data_type
    return a.SerializeToString() == b.SerializeToString()


def _hoist_subgraph_initializers(model: onnx.ModelProto) -> None:
    main = model.graph
    subs = list(_subgraph_protos(main))
    if not subs:
        return
    names_main = {i.name for i in main.input} | {o for n in main.node for o in n.output}
    main_inits = {i.name: i for i in main.initializer}
    defined_in_subs = collections.Counter()
    for g in subs:  # names a subgraph defines itself (inputs, node outputs): hoisting must not shadow them
        defined_in_subs.update(i.name for i in g.input)
        defined_in_subs.update(o for n in g.node for o in n.output)
    for g in subs:
        keep = []
        for init in g.initializer:
            name = init.name
            if name in names_main or defined_in_subs[name]:
                keep.append(init)
                continue
            if name in main_inits:
                if not _same_tensor(main_inits[name], init):
                    keep.append(init)
                continue  # the same tensor is already in the main graph
            new = main.initializer.add()
            new.CopyFrom(init)
            main_inits[name] = new
        if len(keep) != len(g.initializer):
            kept = [onnx.TensorProto() for _ in keep]
            for k, t in zip(kept, keep):
                k.CopyFrom(t)
            del g.initializer[:]
            g.initializer.extend(kept)


def refresh(graph: gs.Graph) -> gs.Graph:
    """After a pass: clean up, sort, and re-infer every value's shape on the skeleton. The graph
    objects stay the same (no re-import); shapes that inference no longer gives are dropped."""
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    for sub in graph.subgraphs(recursive=True):
        sub.cleanup(remove_unused_graph_inputs=False).toposort()
    model = export(graph)
    inferred = infer_shapes(model)
    infos = {}
    for g in [inferred.graph, *_subgraph_protos(inferred.graph)]:
        for vi in list(g.value_info) + list(g.output) + list(g.input):
            if vi.type.HasField("tensor_type"):
                infos[vi.name] = vi.type.tensor_type
    for g in all_graphs(graph):
        io_names = {t.name for t in g.inputs}
        for t in g.tensors().values():
            if not isinstance(t, gs.Variable) or t.name in io_names:
                continue
            tt = infos.get(t.name)
            if tt is None:
                t.shape = None
                continue
            if tt.elem_type:
                t.dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
            t.shape = [_dim(d) for d in tt.shape.dim] if tt.HasField("shape") else None
    return graph


def _dim(d):
    if d.HasField("dim_value"):
        return int(d.dim_value)
    if d.HasField("dim_param"):
        return d.dim_param
    return None


# ---------------------------------------------------------------------------------------------
# lookups


def const_value(tensor) -> np.ndarray | None:
    """The value of a constant tensor: an initializer or the output of a Constant node. A
    referenced weight comes back as a read-only memory-mapped view and is not cached."""
    if tensor is None:
        return None
    if isinstance(tensor, gs.Constant):
        return _values(tensor)
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        node = tensor.inputs[0]
        val = node.attrs.get("value")
        if isinstance(val, gs.Constant):
            return _values(val)
        if val is not None:
            return np.asarray(val)
        for key in ("value_float", "value_int"):
            if key in node.attrs:
                return np.asarray(node.attrs[key])
        for key in ("value_floats", "value_ints"):
            if key in node.attrs:
                return np.asarray(node.attrs[key])
    return None


def _values(c: gs.Constant) -> np.ndarray:
    if isinstance(c._values, W.RefValues):
        return c._values.load()
    return np.asarray(c.values)


def const_info(tensor):
    """(shape tuple, numpy dtype) of a constant without reading its values, or None."""
    if isinstance(tensor, gs.Constant):
        return tuple(tensor.shape), tensor_dtype(tensor)
    v = const_value(tensor) if tensor is not None and len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant" else None
    return None if v is None else (tuple(v.shape), v.dtype)


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
        return list(tensor.shape)
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
        self.used = set()
        for g in all_graphs(graph):  # names are unique across subgraphs too (outer scope is visible)
            self.used |= set(g.tensors().keys()) | {n.name for n in g.nodes if n.name}
        self.counter = itertools.count()

    def __call__(self, base: str) -> str:
        base = base or "normopt"
        name = base
        while name in self.used:
            name = f"{base}_{next(self.counter)}"
        self.used.add(name)
        return name


def new_const(namer: Namer, base: str, array: np.ndarray) -> gs.Constant:
    """A new constant. One of at least weights.SPILL_BYTES goes to the active weight store's
    spill file at once and is referenced from there (the caller's array can then be freed)."""
    name = namer(base)
    array = np.asarray(array)
    store = W.current_store()
    if store is not None and array.nbytes >= W.SPILL_BYTES:
        return gs.Constant(name, W.RefValues(store.spill(name, array)))
    return gs.Constant(name, _contiguous(array))


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
        dt = tensor.dtype
        if isinstance(dt, (int, np.integer)):
            return W.np_dtype(int(dt))
        return np.dtype(dt)
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


def _contiguous(value) -> np.ndarray:
    """A C-contiguous array of the same shape (np.ascontiguousarray would make a 0-d array 1-d)."""
    value = np.asarray(value)
    return value if value.flags["C_CONTIGUOUS"] else value.copy(order="C")
