"""Graph utilities over onnx-graphsurgeon: import/export that keeps the model's identity,
constant lookup, axis and shape helpers, and weight math in float64."""

from __future__ import annotations

import collections
import contextlib
import contextvars
import itertools
import os

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from . import fastgs
from . import shapes as S
from . import weights as W

from onnx_graphsurgeon.logger import G_LOGGER  # noqa: E402

G_LOGGER.severity = G_LOGGER.ERROR  # graphsurgeon's warnings are about its own guesses, not the user's model

# ---------------------------------------------------------------------------------------------
# import / export
#
# The graph normopt rewrites is a *skeleton* (see weights.py): large tensors are RefValues that
# reference file regions, so importing, exporting, refreshing shapes and checking cost time and
# memory in proportion to the graph, never to the weights.


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    """Import a model (a skeleton or an in-memory model) into graphsurgeon, with inferred shapes
    when shape inference works. External tensors with absolute locations become RefValues."""
    graph = _import(model)
    graph.normopt_declared_outputs = {t.name for t in graph.outputs if t.shape is not None}
    graph.normopt_domains = {imp.domain: imp.version for imp in model.opset_import if imp.domain not in ("", "ai.onnx")}
    S.infer(graph, incremental=False)
    return graph


def _import(model: onnx.ModelProto) -> gs.Graph:
    graph = fastgs.import_onnx(model)  # graphsurgeon's import, the same graph, without its per-object overhead
    wrap_refs(graph)
    _keep_overridable_inputs(graph, model)
    return graph


def _keep_overridable_inputs(graph: gs.Graph, model: onnx.ModelProto) -> None:
    """From IR version 4 an initializer that is also a graph input is a default the caller may
    override (ONNX Runtime feeds it; below IR 4 every initializer is listed as an input and is a
    constant). graphsurgeon would read it as a constant and drop the input: here it stays a
    graph input, a run-time value to every pass (never folded, centered or scaled), and its
    default goes back as an initializer on export."""
    declared = [vi.name for vi in model.graph.input]
    have = {t.name for t in graph.inputs}
    missing = [n for n in declared if n not in have]
    graph.normopt_defaults = {}
    if model.ir_version < 4 or not missing:
        return
    inits = {t.name: t for t in model.graph.initializer if t.name in set(missing)}
    types = {vi.name: vi.type.tensor_type for vi in model.graph.input}
    tensors = graph.tensors()
    made = {}
    for name in missing:
        if name not in inits:
            continue
        t = inits[name]
        tt = types[name]
        shape = [_dim(d) for d in tt.shape.dim] if tt.HasField("shape") else list(t.dims)
        made[name] = gs.Variable(name, dtype=onnx.helper.tensor_dtype_to_np_dtype(t.data_type), shape=shape)
        graph.normopt_defaults[name] = t
    old = {id(tensors[n]): v for n, v in made.items() if n in tensors}
    # a default read only inside a subgraph is not in the main graph's tensors: graphsurgeon
    # makes it a constant of the subgraph (exported as the subgraph's own initializer, which
    # would shadow the input a caller feeds). Such a constant is the input, by name, wherever no
    # subgraph declares an initializer of that name itself
    shadowed = {t.name for sg in _subgraph_protos(model.graph) for t in sg.initializer}
    unshadowed = {n: v for n, v in made.items() if n not in shadowed}
    Constant = gs.Constant

    def swap(x):
        if id(x) in old:
            return old[id(x)]
        if isinstance(x, Constant) and x.name in unshadowed:
            return unshadowed[x.name]
        return x

    for g in all_graphs(graph):
        for node in g.nodes:
            for i, x in enumerate(node.inputs):
                y = swap(x)
                if y is not x:
                    node.inputs[i] = y
        g.outputs = [swap(x) for x in g.outputs]
    by_name = {t.name: t for t in graph.inputs}
    by_name.update(made)
    graph.inputs = [by_name[n] for n in declared if n in by_name]


def all_graphs(graph: gs.Graph):
    """The graph and every subgraph (If branches, Loop/Scan bodies), outermost first."""
    yield graph
    Graph = gs.Graph
    for node in graph.nodes:  # graphsurgeon's own walk, entered only at nodes that hold a graph
        attrs = node.attrs
        if attrs:
            for v in attrs.values():
                if isinstance(v, Graph):
                    yield from node.subgraphs(recursive=True)
                    break


def wrap_refs(graph: gs.Graph) -> None:
    """Give every constant whose TensorProto is an absolute external reference RefValues, so
    reading it maps the file region instead of loading (and caching) the whole tensor."""
    for g in all_graphs(graph):
        for t in tensor_map(g).values():
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


def infer_shapes(model: onnx.ModelProto, symbolic: bool = True) -> onnx.ModelProto:
    """A copy of the model's structure with every main-graph value's dtype and shape, as
    normopt's own inference gives them (see shapes.py), in value_info (graph outputs without a
    type get one). The weights are not copied: the result's initializers are dropped, so it is
    for reading types, not for running. ``symbolic`` is accepted for compatibility and ignored:
    no optional symbolic engine is used."""
    graph = to_graph(model)
    inferred = onnx.ModelProto()
    inferred.ir_version = model.ir_version
    inferred.opset_import.extend(model.opset_import)
    inferred.graph.name = model.graph.name
    inferred.graph.node.extend(model.graph.node)
    inferred.graph.input.extend(model.graph.input)
    inferred.graph.output.extend(model.graph.output)
    have = {i.name for i in model.graph.input} | {o.name for o in model.graph.output}
    typed = {}
    for node in graph.nodes:
        for o in node.outputs:
            if o.name and o.dtype is not None:
                try:
                    et = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(o.dtype))
                except Exception:
                    continue
                typed[o.name] = onnx.helper.make_tensor_value_info(o.name, et, None if o.shape is None else list(o.shape))
    inferred.graph.value_info.extend(vi for n, vi in typed.items() if n not in have)
    for o in inferred.graph.output:
        if not o.type.WhichOneof("value") and o.name in typed:
            o.type.CopyFrom(typed[o.name].type)
    return inferred


_SUFFIX = "__normopt_g"


def _unique_subgraph_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the model where every name a subgraph defines (its inputs, node outputs and
    initializers) carries a per-subgraph suffix, and every reference resolves lexically."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    counter = itertools.count()

    def visit(graph, outer: dict):
        for node in graph.node:
            for attr in node.attribute:
                for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    k = next(counter)
                    local = {n: f"{n}{_SUFFIX}{k}" for n in [i.name for i in g.input] + [t.name for t in g.initializer]
                             + [o for nd in g.node for o in nd.output] if n}
                    env = {**outer, **local}
                    for vi in list(g.input) + list(g.output) + list(g.value_info):
                        vi.name = env.get(vi.name, vi.name)
                    for t in g.initializer:
                        t.name = env.get(t.name, t.name)
                    for nd in g.node:
                        for i, n in enumerate(nd.input):
                            nd.input[i] = env.get(n, n)
                        for i, n in enumerate(nd.output):
                            nd.output[i] = env.get(n, n)
                    visit(g, env)

    visit(out.graph, {})
    return out


def _restore_subgraph_names(model: onnx.ModelProto) -> None:
    def base(n):
        i = n.rfind(_SUFFIX)
        return n[:i] if i >= 0 and n[i + len(_SUFFIX):].isdigit() else n

    for g in _subgraph_protos(model.graph):
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            vi.name = base(vi.name)
        for t in g.initializer:
            t.name = base(t.name)
        for nd in g.node:
            for i, n in enumerate(nd.input):
                nd.input[i] = base(n)
            for i, n in enumerate(nd.output):
                nd.output[i] = base(n)


def export(graph: gs.Graph) -> onnx.ModelProto:
    """The graph as a ModelProto: a skeleton where constants are references (RefValues). An
    initializer that graphsurgeon copies into each subgraph reading it goes back to the main
    graph, once."""
    model = fastgs.export_onnx(graph, do_type_check=False)
    nested = fastgs._holds_graph(graph)  # the export has subgraph protos only where the graph has subgraphs
    if nested:
        _hoist_subgraph_initializers(model)
    _export_defaults(graph, model)
    for g in (_subgraph_protos(model.graph) if nested else ()):
        # shapes graphsurgeon writes into branches are stale after a rewrite (and ORT rejects a
        # branch whose value_info disagrees with the outer graph): inference derives them again
        del g.value_info[:]
    return model


def to_model(graph: gs.Graph, original: onnx.ModelProto, clean: bool = False) -> onnx.ModelProto:
    """Export, restoring what graphsurgeon drops: IR version, producer, doc strings, metadata,
    and every opset import of the original (plus any domain the passes added). The graph is
    cleaned up and sorted first, unless ``clean`` says it is already (the pipeline knows: a
    refresh did it, and no pass changed the structure since; both steps are idempotent)."""
    if not clean:
        _clean_and_sort(graph)
    with _io_value_info_only(graph):
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
    # below IR 4 every initializer must be listed as an input; the graph here keeps them as
    # constants (as that IR meant), so the output takes the IR its opsets need, at least 4
    if model.ir_version < 4:
        model.ir_version = max(4, onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True))
    # graph value_info from shape inference is stale after rewriting: drop it
    del model.graph.value_info[:]
    # the outputs are declared as the original declared them (the passes saw the inferred shapes)
    stated = {o.name: o.type for o in original.graph.output if o.type.tensor_type.HasField("shape")}
    for o in model.graph.output:
        if o.name in stated and o.type.HasField("tensor_type") and o.type.tensor_type.elem_type == stated[o.name].tensor_type.elem_type:
            o.type.tensor_type.shape.CopyFrom(stated[o.name].tensor_type.shape)
    _order_like(model.graph.initializer, original.graph.initializer)
    return model


@contextlib.contextmanager
def _io_value_info_only(root: gs.Graph):
    """graphsurgeon's export writes a ValueInfoProto for every typed value; to_model drops the
    main graph's and export every subgraph's (stale after rewriting). Here only the graphs'
    inputs and outputs get real ones: the others are empty placeholders, dropped as before (at
    100k nodes, seconds of building protos only to delete them)."""
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

    if root.functions:  # (their subgraphs are not in all_graphs: everything real)
        yield
        return
    real = OnnxExporter.__dict__["export_value_info_proto"]
    io = {id(t) for g in all_graphs(root) for t in itertools.chain(g.inputs, g.outputs)}
    placeholder = onnx.ValueInfoProto()

    def export_value_info_proto(tensor, do_type_check=True):
        if id(tensor) in io:
            return real.__func__(tensor, do_type_check)
        return placeholder

    OnnxExporter.export_value_info_proto = staticmethod(export_value_info_proto)
    try:
        yield
    finally:
        OnnxExporter.export_value_info_proto = real


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


def _export_defaults(graph: gs.Graph, model: onnx.ModelProto) -> None:
    """The overridable inputs' defaults back as initializers (see _keep_overridable_inputs)."""
    defaults = getattr(graph, "normopt_defaults", None) or {}
    if not defaults:
        return
    inputs = {i.name for i in model.graph.input}
    have = {t.name for t in model.graph.initializer}
    for name, t in defaults.items():
        if name in inputs and name not in have:
            model.graph.initializer.add().CopyFrom(t)


def snapshot(graph: gs.Graph) -> onnx.ModelProto:
    """The graph's state as a skeleton ModelProto (structure, shapes; weights by reference)."""
    model = fastgs.export_onnx(graph, do_type_check=False)
    _export_defaults(graph, model)
    return model


class Mark:
    """The model's state as it is now, in place (see mark): every graph's fields and node list,
    every node's fields and input/output lists, and every value's fields. Taking it copies a few
    small lists per node (no export, no protobuf); weights are shared, never copied (a pass never
    edits a tensor's values in place)."""

    __slots__ = ("root", "graphs", "nodes", "tensors")


_IO = ("inputs", "outputs")


def mark(root: gs.Graph) -> Mark:
    """The state of the model rooted at `root`, to go back to with rewind (a pass's rollback).
    One walk over the nodes; each node and value is copied once (its __dict__ and I/O lists)."""
    m = Mark()
    m.root = root
    m.graphs, m.nodes, m.tensors = [], [], {}
    tensors = m.tensors
    add_node = m.nodes.append

    def keep(ts):
        for t in ts:
            k = id(t)
            if k not in tensors:
                tensors[k] = (t, t.__class__, dict(t.__dict__))

    for g in all_graphs(root):
        d = dict(g.__dict__)
        d["nodes"], d["inputs"], d["outputs"] = list(g.nodes), list(g.inputs), list(g.outputs)
        m.graphs.append((g, d))
        keep(g.inputs)
        keep(g.outputs)
        for node in g.nodes:
            f = dict(node.__dict__)  # its input/output lists are kept by rewind, not taken from here
            ins, outs = list(f["inputs"]), list(f["outputs"])
            f["attrs"] = dict(f["attrs"])
            add_node((node, f, ins, outs))
            keep(ins)
            keep(outs)
    return m


def rewind(m: Mark) -> gs.Graph:
    """Put the model back as mark(root) found it, on the same objects, as a fresh import of that
    state would give it: each value's readers and producers in node order (a subgraph's nodes
    before the node that owns it), and no shape state (the next refresh infers every value)."""
    for t, cls, f in m.tensors.values():
        list.clear(t.inputs)
        list.clear(t.outputs)
        if t.__class__ is not cls:
            t.__class__ = cls
        io = {k: t.__dict__[k] for k in _IO}
        t.__dict__.clear()
        t.__dict__.update(f)
        t.__dict__.update(io)
    for g, d in m.graphs:
        g.__dict__.clear()
        g.__dict__.update(d)
        g.__dict__.pop("normopt_shapes", None)
    saved = {id(node): (node, f, ins, outs) for node, f, ins, outs in m.nodes}
    Graph = gs.Graph
    end = object()
    stack = [iter(m.root.nodes)]
    while stack:  # graphsurgeon's import order: a node's subgraphs, then the node
        item = next(stack[-1], end)
        if item is end:
            stack.pop()
            continue
        if isinstance(item, _Wire):
            _wire(item.node, item.ins, item.outs)
            continue
        entry = saved.pop(id(item), None)
        if entry is None:
            continue
        node, f, ins, outs = entry
        io = {k: node.__dict__[k] for k in _IO}
        node.__dict__.clear()
        node.__dict__.update(f)
        node.__dict__.update(io)
        list.clear(node.inputs)
        list.extend(node.inputs, ins)
        list.clear(node.outputs)
        list.extend(node.outputs, outs)
        subs = [v for v in node.attrs.values() if isinstance(v, Graph)]
        if subs:
            stack.append(iter([*(n for sub in subs for n in sub.nodes), _Wire(node, ins, outs)]))
        else:
            _wire(node, ins, outs)
    return m.root


class _Wire:
    """A node to wire after its subgraphs' nodes (see rewind)."""

    __slots__ = ("node", "ins", "outs")

    def __init__(self, node, ins, outs):
        self.node, self.ins, self.outs = node, ins, outs


def _wire(node, ins, outs) -> None:
    for t in ins:
        list.append(t.outputs, node)
    for t in outs:
        list.append(t.inputs, node)


def restore(model: onnx.ModelProto, like: gs.Graph | None = None) -> gs.Graph:
    """A graph from a snapshot, shapes as they were (no re-inference). With `like` (the graph
    the snapshot was taken of), what import recorded about the model (its declared output
    shapes, its opset domains) carries over; the next refresh infers the whole graph."""
    graph = _import(model)
    if like is not None:
        for k in ("normopt_declared_outputs", "normopt_domains"):
            if k in like.__dict__:
                setattr(graph, k, like.__dict__[k])
    return graph


def _subgraph_protos(graph_proto):
    """Every subgraph, depth first, in node and attribute order."""
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
    """graphsurgeon exports an outer initializer into every subgraph that reads it. Put each one
    back in the main graph once, but only where its name means that one tensor everywhere in the
    model (sibling branches may define the same name differently: those stay where they are)."""
    main = model.graph
    subs = list(_subgraph_protos(main))
    if not subs:
        return
    other_defs = collections.Counter()  # definitions that are not initializers
    inits = collections.defaultdict(list)  # name -> [(graph, TensorProto)]
    for g in [main] + subs:
        other_defs.update(i.name for i in g.input)
        other_defs.update(o for n in g.node for o in n.output)
        for t in g.initializer:
            inits[t.name].append((g, t))
    hoist = set()
    for name, defs in inits.items():
        if other_defs[name] or not any(g is not main for g, _ in defs):
            continue
        first = defs[0][1]
        if all(_same_tensor(first, t) for _, t in defs[1:]):
            hoist.add(name)
    if not hoist:
        return
    have = {t.name for t in main.initializer}
    for name in sorted(hoist):
        if name not in have:
            main.initializer.add().CopyFrom(next(t for g, t in inits[name] if g is not main))
    for g in subs:
        if any(t.name in hoist for t in g.initializer):
            kept = []
            for t in g.initializer:
                if t.name not in hoist:
                    k = onnx.TensorProto()
                    k.CopyFrom(t)
                    kept.append(k)
            del g.initializer[:]
            g.initializer.extend(kept)


def _plain(graph: gs.Graph) -> bool:
    """No functions, no subgraphs, no node listed twice: where cleanup/toposort below are exact."""
    if graph.functions:
        return False
    Graph = gs.Graph
    for node in graph.nodes:
        if node.attrs:
            for v in node.attrs.values():
                if isinstance(v, Graph):
                    return False
    return len({id(n) for n in graph.nodes}) == len(graph.nodes)


def _local_names(graph: gs.Graph) -> set:
    """graphsurgeon's local tensors (by name): nodes' non-empty outputs, graph inputs, constants."""
    Constant = gs.Constant
    nodes = graph.nodes
    local = {t.name for n in nodes for t in n.outputs if t.name != ""}
    local.update(t.name for t in graph.inputs)
    local.update(t.name for n in nodes for t in n.inputs if t.name != "" and isinstance(t, Constant))
    local.update(t.name for t in graph.outputs if t.name != "" and isinstance(t, Constant))
    return local


def cleanup(graph: gs.Graph, plain: bool | None = None) -> gs.Graph:
    """graphsurgeon's Graph.cleanup(remove_unused_graph_inputs=False), with the same result, in
    one walk back from the outputs over the graph's own lists (no tensor map, no node ids).
    Graphs that are not plain (see _plain; `plain` is its answer when the caller has it), or
    with a producer outside the graph, go to graphsurgeon itself."""
    if not (_plain(graph) if plain is None else plain):
        return graph.cleanup(remove_unused_graph_inputs=False)
    members = {id(n) for n in graph.nodes}
    for t in graph.outputs:  # a producer outside the graph: graphsurgeon reports it
        for p in t.inputs:
            if id(p) not in members:
                return graph.cleanup(remove_unused_graph_inputs=False)
    for inp in graph.inputs:
        inp.inputs.clear()
    local = _local_names(graph)
    seen = set()

    def keep(t):
        if t.name == "":
            return True
        if t.name not in local or t.name in seen:
            return False
        seen.add(t.name)
        return True

    used = set()
    todo = [t for t in graph.outputs if keep(t)]
    push, see = todo.append, seen.add
    i = 0
    while i < len(todo):
        t = todo[i]
        i += 1
        for node in t.inputs:
            k = id(node)
            if k in used:  # its inputs are queued already (keep is inline below)
                continue
            if k not in members:  # graphsurgeon reports it
                return graph.cleanup(remove_unused_graph_inputs=False)
            used.add(k)
            for x in node.inputs:
                name = x.name
                if name == "":
                    push(x)
                elif name in local and name not in seen:
                    see(name)
                    push(x)
    graph.inputs = list(graph.inputs)
    nodes = []
    for node in graph.nodes:
        if id(node) in used:
            nodes.append(node)
        else:
            node.inputs.clear()
            node.outputs.clear()
    graph.nodes = nodes
    return graph


def toposort(graph: gs.Graph, plain: bool | None = None) -> gs.Graph:
    """graphsurgeon's Graph.toposort, in the same order, without its per-node recursion and
    helper objects: each node's level is one more than its highest local producer's, and the
    nodes are stably sorted by level in the order their levels were settled (a depth-first
    walk over producers from each node in list order). Graphs with subgraphs or functions,
    duplicate node entries, producers outside the graph, or cycles go to graphsurgeon itself
    (which sorts or reports them). `plain` is _plain's answer where the caller has it.

    A node whose producers are all settled when the walk reaches it is settled at once (the
    depth-first walk from it would settle it alone, at the same level): in a list already in
    topological order (the common case: every earlier list was sorted) that is every node, and
    after a pass that appended new nodes behind their readers, all but the few whose
    producers come later. Only those start a depth-first walk."""
    if not (_plain(graph) if plain is None else plain):
        return graph.toposort()
    nodes = graph.nodes
    local = _local_names(graph)
    members = None  # made when a walk first needs it

    def producers(node):
        found = {}
        for t in node.inputs:
            if t.name in local:
                for p in t.inputs:
                    found[id(p)] = p
        return list(found.values())

    level = {}  # id(node) -> level, in the order levels were settled
    order = []
    settle = order.append
    get = level.get
    for start in nodes:
        k = id(start)
        if k in level:
            continue
        lv = -1
        for t in start.inputs:  # every producer settled: start's level is known now
            if t.name in local:
                for p in t.inputs:
                    pl = get(id(p))
                    if pl is None:
                        break  # a producer not settled yet (later in the list, outside the graph, or a cycle)
                    if pl > lv:
                        lv = pl
                else:
                    continue
                break
        else:
            level[k] = lv + 1
            settle(start)
            continue
        if members is None:
            members = {id(n) for n in nodes}
        active = {k}
        stack = [[start, iter(producers(start)), -1]]
        while stack:
            top = stack[-1]
            for p in top[1]:
                lv = level.get(id(p))
                if lv is not None:
                    if lv > top[2]:
                        top[2] = lv
                    continue
                if id(p) in active or id(p) not in members:
                    return graph.toposort()  # a cycle, or a producer not in the graph
                active.add(id(p))
                stack.append([p, iter(producers(p)), -1])
                break
            else:
                stack.pop()
                active.discard(id(top[0]))
                lv = top[2] + 1
                level[id(top[0])] = lv
                settle(top[0])
                if stack and lv > stack[-1][2]:
                    stack[-1][2] = lv
    order.sort(key=lambda n: level[id(n)])
    graph.nodes = order
    return graph


def refresh(graph: gs.Graph, incremental: bool = True) -> gs.Graph:
    """After a pass: clean up, sort, and bring every value's shape up to date. The graph
    objects stay the same (no re-import). Incremental (see shapes.py): only the nodes the pass
    changed or added, and what is downstream of a value whose shape changed, are inferred again;
    incremental=False infers the whole graph afresh (the two give the same shapes)."""
    for g in all_graphs(graph):
        _clean_and_sort(g)
    S.infer(graph, incremental=incremental)
    return graph


def _clean_and_sort(g: gs.Graph) -> gs.Graph:
    """toposort(cleanup(g)), asking _plain once (cleanup only drops nodes, which keeps a plain
    graph plain)."""
    plain = _plain(g)
    return toposort(cleanup(g, plain), plain)


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


# ---------------------------------------------------------------------------------------------
# use-def that sees subgraphs
#
# graphsurgeon shares an outer value's Tensor with the subgraph nodes that read it (outer-scope
# references), so tensor.outputs lists readers in every graph. An analysis runs on one graph at
# a time, its *scope* (see Scope): from there
#   - a value produced outside the graph (an outer value read by a branch) has no producer: it
#     is an input, as a graph input is;
#   - a read inside a nested subgraph is a read by the If/Loop/Scan node that owns it, which no
#     pass treats as transparent: a rewrite never crosses into or out of a subgraph;
#   - readers in other graphs are not this graph's business (and are never rewired).


class Scope:
    """The graph an analysis runs on, within the model's graph tree."""

    def __init__(self, root: gs.Graph, graph: gs.Graph | None = None):
        graph = graph if graph is not None else root
        self.root, self.graph = root, graph
        inner = set()
        self.owner = {}  # id(node in a nested subgraph) -> the node of `graph` that owns it
        for node in graph.nodes:
            if not node.attrs:  # (most nodes: no generator for them)
                continue
            for sub in _node_subgraphs(node):
                for g in all_graphs(sub):
                    for n in g.nodes:
                        self.owner[id(n)] = node
                        inner.add(id(g))
        mine = {id(graph)} | inner
        if graph is root:  # every other graph is nested in the root, so in `inner`: nothing is foreign
            self.foreign = set()
        else:
            self.foreign = {id(n) for g in all_graphs(root) if id(g) not in mine for n in g.nodes}
        self.plain = not self.owner and not self.foreign  # one graph, no subgraphs: readers are tensor.outputs


def _node_subgraphs(node):
    for v in node.attrs.values():
        if isinstance(v, gs.Graph):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from (x for x in v if isinstance(x, gs.Graph))


_SCOPE: contextvars.ContextVar = contextvars.ContextVar("normopt_scope", default=None)


@contextlib.contextmanager
def scope(root: gs.Graph, graph: gs.Graph | None = None, prepared: Scope | None = None):
    """Run an analysis or a rewrite on `graph` (default: the root) of the model rooted at `root`.
    ``prepared``: Scope(root, graph) built earlier, where the caller knows that no node was
    added, removed or rewired since (a Scope only reads the structure, and never changes)."""
    token = _SCOPE.set(prepared if prepared is not None else Scope(root, graph))
    try:
        yield
    finally:
        _SCOPE.reset(token)


def tensor_map(graph: gs.Graph) -> dict:
    """{name: tensor} for every named tensor that graph's inputs, nodes and outputs use (this
    graph only), the same map as graphsurgeon's Graph.tensors() (where two tensor objects share
    a name, the last one met wins) without its per-tensor bookkeeping: a plain walk, linear in
    nodes and cheap at 100k nodes (Graph.tensors() took seconds there)."""
    out = {}
    for t in graph.inputs:
        if t.name:
            out[t.name] = t
    for node in graph.nodes:
        for t in node.inputs:
            if t.name:
                out[t.name] = t
        for t in node.outputs:
            if t.name:
                out[t.name] = t
    for t in graph.outputs:
        if t.name:
            out[t.name] = t
    return out


def producer(tensor):
    if tensor is None or not len(tensor.inputs):
        return None
    p = tensor.inputs[0]
    sc = _SCOPE.get()
    if sc is not None and id(p) in sc.foreign:
        return None  # produced in an outer graph: an input here
    return p


def consumers(tensor):
    """The nodes of the current graph that read `tensor`; a read inside a nested subgraph is
    reported as a read by the node that owns that subgraph (once)."""
    if tensor is None:
        return []
    sc = _SCOPE.get()
    outs = tensor.outputs
    if sc is None:
        return list(outs)
    if sc.plain and len(outs) < 2:  # the common case, without the bookkeeping below
        return list(outs)
    out, seen = [], set()
    for c in outs:
        if id(c) in sc.foreign:
            continue
        c = sc.owner.get(id(c), c)
        if id(c) not in seen:
            seen.add(id(c))
            out.append(c)
    return out


def replace_uses(old, new) -> None:
    """Every node of the current graph (and its subgraphs) that reads `old` reads `new` instead."""
    sc = _SCOPE.get()
    for c in list(old.outputs):
        if sc is not None and id(c) in sc.foreign:
            continue
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
    for t in graph.outputs:  # (a loop, not any() over a generator: asked of every value, often)
        if t is tensor:
            return True
    return False


def is_read(graph: gs.Graph, tensor) -> bool:
    """Does anything observe `tensor`: a node of the current graph (a read inside a nested
    subgraph counts, as a read by its owner) or the graph's outputs? The one question every
    "is this value used?" check asks (an optional output left empty is never read)."""
    if tensor is None or not getattr(tensor, "name", ""):
        return False
    return is_graph_output(graph, tensor) or bool(consumers(tensor))


def only_reader(graph: gs.Graph, tensor, node) -> bool:
    """`node` is the one observer of `tensor` (not a graph output, no other reader)."""
    cons = consumers(tensor)
    return len(cons) == 1 and cons[0] is node and not is_graph_output(graph, tensor)


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

    def __init__(self, graph: gs.Graph, tensors: dict | None = None):
        """``tensors``: tensor_map(graph), where the caller has made it (it is not made again)."""
        self.used = set()
        sc = _SCOPE.get()
        root = sc.root if sc is not None else graph
        used = self.used
        for g in all_graphs(root):  # names are unique across subgraphs too (outer scope is visible)
            used.update(tensors if tensors is not None and g is graph else tensor_map(g))
            used.update(n.name for n in g.nodes if n.name)
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


SHAPE_ONLY = ("Shape", "Size")  # readers of a tensor's shape alone, never of its values


def value_readers(tensor):
    """consumers(tensor) less the nodes that read only its shape (Shape, Size): the readers a
    rewrite that changes the values but keeps the shape and type must answer for (LeViT's
    Reshape(BN(Flatten(y)), Shape(y)) reads y's shape beside the BN that folds into y's MatMul)."""
    return [c for c in consumers(tensor) if not (c.op in SHAPE_ONLY and (c.domain or "") in ("", "ai.onnx"))]

