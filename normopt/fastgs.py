"""onnx-graphsurgeon's import, linear and lean: the same gs.Graph as ``gs.import_onnx`` (the
same objects, fields, field order, reader and producer lists, in the same order), built without
graphsurgeon's per-tensor and per-node constructor machinery.

graphsurgeon's importer spends most of its time in object construction: every Variable and
Node goes through ``__setattr__`` overrides that try to synchronize lists that do not exist yet,
and every node builds two closures per call. At 100k nodes that was most of a run's import
time. Here each object's ``__dict__`` is filled directly, and each value's reader and producer
lists are appended to exactly as graphsurgeon's SynchronizedList.extend appends them.

Everything graphsurgeon decides is decided here the same way (the lookup order of a name:
this graph's tensors, then the outer graph's; value_info overwriting only a missing dtype or
shape; optional inputs and outputs as fresh unnamed Variables; attributes by type). Models this
module does not mirror field for field (local functions, sparse initializers) go to graphsurgeon
itself. tests/test_fastgs.py compares the two imports object by object.

The export likewise: ``export_onnx`` gives graphsurgeon's ModelProto byte for byte, with each
NodeProto built in place in the graph (graphsurgeon builds it with onnx.helper.make_node and then
copies it in) and the tensor map walked once.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import onnx
from onnx_graphsurgeon.importers import onnx_importer as _gsi
from onnx_graphsurgeon.importers.onnx_importer import OnnxImporter
from onnx_graphsurgeon.ir.graph import Graph
from onnx_graphsurgeon.ir.node import Node
from onnx_graphsurgeon.ir.tensor import Constant, Variable
from onnx_graphsurgeon.util.misc import SynchronizedList

_ATTR_TYPE = {v: k for k, v in onnx.AttributeProto.AttributeType.items()}
_PY_FIELD = dict(_gsi.ONNX_PYTHON_ATTR_MAPPING)
_AttributeRef = Node.AttributeRef
_ValueInfoProto = onnx.ValueInfoProto


def import_onnx(model: onnx.ModelProto) -> Graph:
    """gs.import_onnx(model), the same graph."""
    if model.functions or _has_sparse(model.graph):
        import onnx_graphsurgeon as gs

        return gs.import_onnx(model)
    opset = OnnxImporter.get_opset(model)
    domains = OnnxImporter.get_import_domains(model)
    return _import_graph(model.graph, None, opset, domains, model.producer_name, model.producer_version, [],
                         model.ir_version)


def _has_sparse(graph_proto) -> bool:
    if len(graph_proto.sparse_initializer):
        return True
    for node in graph_proto.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.SPARSE_TENSOR or attr.type == onnx.AttributeProto.SPARSE_TENSORS:
                return True
            if attr.HasField("g") and _has_sparse(attr.g):
                return True
            for g in attr.graphs:
                if _has_sparse(g):
                    return True
    return False


def _sync_list(parent, field):
    sl = SynchronizedList.__new__(SynchronizedList)
    sl.parent_obj = parent
    sl.field_name = field
    return sl


def _variable(name):
    """Variable(name), as its constructor leaves it (fields in the same order)."""
    v = Variable.__new__(Variable)
    d = v.__dict__
    d["name"] = name
    d["inputs"] = _sync_list(v, "outputs")
    d["outputs"] = _sync_list(v, "inputs")
    d["dtype"] = None
    d["shape"] = None
    d["type"] = "tensor_type"
    return v


def _value_info_tensor(vi):
    """OnnxImporter.import_tensor(ValueInfoProto)."""
    v = _variable(vi.name)
    if vi.type.ByteSize() > 0:
        d = v.__dict__
        d["dtype"] = _gsi.get_onnx_tensor_dtype(vi)
        d["shape"] = _gsi.get_onnx_tensor_shape(vi)
        d["type"] = _gsi.get_onnx_tensor_type(vi)
    return v


def _import_tensor(t):
    if isinstance(t, _ValueInfoProto):
        return _value_info_tensor(t)
    return OnnxImporter.import_tensor(t)


def _import_attributes(attrs, outer, local, opset, domains):
    out = OrderedDict()
    for attr in attrs:
        kind = _ATTR_TYPE.get(attr.type)
        if kind is None or kind not in _PY_FIELD:
            continue  # graphsurgeon warns and skips it
        if attr.ref_attr_name:
            out[attr.name] = _AttributeRef(attr.ref_attr_name, _gsi.misc.convert_from_onnx_attr_type(attr.type))
            continue
        value = getattr(attr, _PY_FIELD[kind])
        if kind == "INT" or kind == "FLOAT":
            pass
        elif kind == "INTS" or kind == "FLOATS":
            value = list(value)
        elif kind == "STRING":
            value = value.decode()
        elif kind == "TENSOR":
            value = OnnxImporter.import_tensor(value)
        elif kind == "GRAPH":
            combined = OrderedDict(outer)
            combined.update(local)
            value = _import_graph(value, combined, opset, domains)
        elif kind == "STRINGS":
            value = [p.decode() for p in value]
        out[attr.name] = value
    return out


def _import_graph(g, outer, opset, domains, producer_name=None, producer_version=None, functions=None,
                  ir_version=None) -> Graph:
    outer = outer if outer is not None else {}
    local = OrderedDict()

    def get_tensor(proto, overwrite=False, check_outer=True):
        name = proto.name
        if name in local:
            if overwrite:
                t = _import_tensor(proto)
                have = local[name]
                if isinstance(have, Variable):
                    have.dtype = have.dtype or t.dtype
                    have.shape = have.shape or t.shape
            return local[name]
        if check_outer and name in outer:
            return outer[name]
        t = local[name] = _import_tensor(proto)
        return t

    for init in g.initializer:
        get_tensor(init)
    for vi in g.value_info:
        get_tensor(vi, overwrite=True)
    init_names = {t.name for t in g.initializer}
    inputs = [get_tensor(i, check_outer=False) for i in g.input if i.name not in init_names]
    outputs = [get_tensor(o, check_outer=False) for o in g.output]

    nodes = []
    append_node = nodes.append
    list_append = list.append
    list_extend = list.extend
    new_node = Node.__new__
    new_list = SynchronizedList.__new__
    SL = SynchronizedList
    nested = False
    for onnx_node in g.node:
        if len(onnx_node.attribute):
            attrs = _import_attributes(onnx_node.attribute, outer, local, opset, domains)
            nested = nested or any(type(v) is Graph for v in attrs.values())
        else:
            attrs = OrderedDict()
        ins = []
        for name in onnx_node.input:
            t = local.get(name)
            if t is None:
                if name in outer:
                    t = outer[name]
                elif not name:
                    t = _variable("")
                else:
                    t = local[name] = _variable(name)
            ins.append(t)
        outs = []
        for name in onnx_node.output:
            t = local.get(name)
            if t is None:
                if not name:
                    t = _variable("")
                else:
                    t = local[name] = _variable(name)
            outs.append(t)
        node = new_node(Node)
        d = node.__dict__
        d["op"] = onnx_node.op_type
        d["name"] = onnx_node.name
        d["attrs"] = attrs
        sl = d["inputs"] = new_list(SL)  # _sync_list(node, "outputs"), inline
        sl.parent_obj = node
        sl.field_name = "outputs"
        list_extend(sl, ins)
        for t in ins:
            list_append(t.__dict__["outputs"], node)
        sl = d["outputs"] = new_list(SL)
        sl.parent_obj = node
        sl.field_name = "inputs"
        list_extend(sl, outs)
        for t in outs:
            list_append(t.__dict__["inputs"], node)
        d["domain"] = onnx_node.domain if onnx_node.HasField("domain") else None
        append_node(node)

    # the constructor walks every node for subgraphs (to share the function list with them):
    # built empty, given its nodes, and the walk done only where a node holds a subgraph
    graph = Graph(nodes=[], inputs=inputs, outputs=outputs, name=g.name, doc_string=g.doc_string,
                  producer_name=producer_name, producer_version=producer_version, opset=opset,
                  import_domains=domains, functions=functions, ir_version=ir_version)
    graph.nodes = nodes
    if nested:
        graph._merge_subgraph_functions()
    return graph


# ---------------------------------------------------------------------------------------------
# export: gs.export_onnx, the same ModelProto


def export_onnx(graph: Graph, do_type_check: bool = True, **kwargs) -> onnx.ModelProto:
    """gs.export_onnx(graph, do_type_check, **kwargs), the same model (byte for byte). The
    value_info of each value still goes through OnnxExporter.export_value_info_proto (so a
    caller that replaces it, as graph._io_value_info_only does, is heard)."""
    from onnx_graphsurgeon.exporters import onnx_exporter as gse

    if graph.functions:
        return gse.export_onnx(graph, do_type_check=do_type_check, **kwargs)
    onnx_graph = _export_graph(graph, do_type_check)
    kwargs["functions"] = []
    if "opset_imports" not in kwargs:
        kwargs["opset_imports"] = _update_import_domains(graph)
    model = onnx.helper.make_model(onnx_graph, **kwargs)
    model.producer_name = graph.producer_name
    model.producer_version = graph.producer_version
    if graph.ir_version is not None:
        model.ir_version = graph.ir_version
    return model


def _holds_graph(graph: Graph) -> bool:
    for node in graph.nodes:
        if node.attrs:
            for v in node.attrs.values():
                if isinstance(v, Graph):
                    return True
    return False


def _update_import_domains(graph: Graph):
    """onnx_exporter.update_import_domains: the graph's opset imports, plus version 1 of any
    domain a node uses that is not imported. graphsurgeon walks every node for subgraphs (a
    generator per node); here only a graph with one does."""
    from onnx_graphsurgeon.exporters import onnx_exporter as gse

    if _holds_graph(graph):
        return gse.update_import_domains(graph)
    if graph.import_domains is None:
        graph.import_domains = [onnx.helper.make_opsetid("", graph.opset)]
    used = {node.domain for node in graph.nodes}  # (built as graphsurgeon builds it: the same set, the same order)
    used.discard(None)
    current = {opsetid.domain for opsetid in graph.import_domains}
    for domain in used:
        if domain not in current:
            graph.import_domains.append(onnx.helper.make_opsetid(domain, 1))
            current.add(domain)
    return graph.import_domains


def _export_attributes(attrs, into) -> None:
    """OnnxExporter.export_attributes, appended to `into` (subgraphs exported here too)."""
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter as X
    from onnx_graphsurgeon.exporters.onnx_exporter import dtype_to_onnx
    from onnx_graphsurgeon.ir.tensor import Tensor

    make_attribute = onnx.helper.make_attribute
    for key, val in attrs.items():
        if isinstance(val, Tensor):
            val = X.export_tensor_proto(val)
        elif isinstance(val, Graph):
            val = _export_graph(val, do_type_check=False)
        elif isinstance(val, _AttributeRef):
            a = onnx.AttributeProto()
            a.name = key
            a.type = _gsi.misc.convert_to_onnx_attr_type(val.type)
            if val.type == Tensor:
                a.t.CopyFrom(X.export_tensor_proto(Constant("", np.array([0], dtype=np.float32))))
            a.ref_attr_name = val.name
            into.append(a)
            continue
        elif isinstance(val, type):
            try:
                val = dtype_to_onnx(val)
            except TypeError:
                pass
        into.append(make_attribute(key, val))


def _export_graph(graph: Graph, do_type_check=True) -> onnx.GraphProto:
    """OnnxExporter.export_graph: the same GraphProto, its NodeProtos built in place (no
    make_node, no copy into the graph). graphsurgeon's duplicate-name checks only log."""
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter as X
    from onnx_graphsurgeon.ir.tensor import SparseValues

    out = onnx.GraphProto()
    add = out.node.add
    for node in graph.nodes:
        n = add()
        n.op_type = node.op
        n.input.extend([t.name for t in node.inputs])
        n.output.extend([t.name for t in node.outputs])
        if node.name:
            n.name = node.name
        if node.domain is not None:
            n.domain = node.domain
        if node.attrs:
            attrs = []
            _export_attributes(node.attrs, attrs)
            n.attribute.extend(attrs)
    out.name = graph.name
    out.input.extend([X.export_value_info_proto(t, do_type_check) for t in graph.inputs])
    out.output.extend([X.export_value_info_proto(t, do_type_check) for t in graph.outputs])
    tensor_map = _tensor_map(graph)
    out.initializer.extend([X.export_tensor_proto(t) for t in tensor_map.values()
                            if isinstance(t, Constant) and not isinstance(t._values, SparseValues)])
    out.sparse_initializer.extend([X.export_sparse_tensor_proto(t) for t in tensor_map.values()
                                   if isinstance(t, Constant) and isinstance(t._values, SparseValues)])
    for t in list(graph.inputs) + list(graph.outputs):
        tensor_map.pop(t.name, None)
    out.value_info.extend([X.export_value_info_proto(t, do_type_check) for t in tensor_map.values()
                           if isinstance(t, Variable) and (t.dtype is not None or t.shape is not None)])
    if graph.doc_string:
        out.doc_string = graph.doc_string
    return out


def _tensor_map(graph: Graph) -> dict:
    """Graph.tensors(): every non-empty tensor by name, the last met of a name winning, in
    first-met order."""
    out = {}
    for t in graph.inputs:
        if t.name != "":
            out[t.name] = t
    for node in graph.nodes:
        for t in node.inputs:
            if t.name != "":
                out[t.name] = t
        for t in node.outputs:
            if t.name != "":
                out[t.name] = t
    for t in graph.outputs:
        if t.name != "":
            out[t.name] = t
    return out
