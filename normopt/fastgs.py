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
"""

from __future__ import annotations

from collections import OrderedDict

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
        sl = d["inputs"] = _sync_list(node, "outputs")
        list_extend(sl, ins)
        for t in ins:
            list_append(t.__dict__["outputs"], node)
        sl = d["outputs"] = _sync_list(node, "inputs")
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
