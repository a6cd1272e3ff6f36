"""normopt.fastgs: the same graph as onnx-graphsurgeon's own import, object by object (fields and
their order, every value's producer and reader lists in order, attributes, subgraphs and their
outer-scope references), on real exports, shape-inferred models with value_info, subgraphs,
optional inputs and outputs, duplicate reads and every attribute type; and linear work in nodes."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from normopt import fastgs

from conftest import make_model, preln_stream_model, vi
from node_graphs import elementwise_chain, transformer_like

CORPUS = os.path.join(os.path.dirname(__file__), "corpus")


class _Walk:
    """A canonical description of a gs.Graph: objects numbered in the order they are met."""

    def __init__(self):
        self.ids = {}
        self.out = []

    def ref(self, obj):
        k = id(obj)
        if k not in self.ids:
            self.ids[k] = (type(obj).__name__, len(self.ids))
        return self.ids[k]

    def value(self, v):
        if isinstance(v, gs.Graph):
            return ("graph", self.graph(v))
        if isinstance(v, gs.Tensor):
            return ("tensor", self.ref(v))
        if isinstance(v, (list, tuple)):
            return (type(v).__name__, [self.value(x) for x in v])
        if isinstance(v, dict):
            return (type(v).__name__, [(k, self.value(x)) for k, x in v.items()])
        if isinstance(v, np.ndarray):
            return ("array", v.dtype.str, v.shape, v.tobytes())
        if isinstance(v, gs.Node.AttributeRef):
            return ("ref", v.name, v.type)
        return (type(v).__name__, repr(v))

    def tensor(self, t):
        d = {}
        for k, v in t.__dict__.items():
            if k in ("inputs", "outputs"):
                d[k] = (type(v).__name__, v.field_name, v.parent_obj is t, [self.ref(n) for n in v])
            elif k == "_values":
                lv = v
                d[k] = (type(lv).__name__, getattr(lv, "tensor", None) is not None and lv.tensor.SerializeToString(),
                        getattr(lv, "shape", None), str(getattr(lv, "dtype", None)))
            else:
                d[k] = self.value(v)
        return (type(t).__name__, list(d.items()))

    def node(self, n):
        d = []
        for k, v in n.__dict__.items():
            if k in ("inputs", "outputs"):
                d.append((k, type(v).__name__, v.field_name, v.parent_obj is n, [self.ref(t) for t in v]))
            else:
                d.append((k, self.value(v)))
        return d

    def graph(self, g):
        rec = [self.ref(g)]
        for k, v in g.__dict__.items():
            if k in ("nodes", "inputs", "outputs"):
                rec.append((k, [self.ref(x) for x in v]))
            elif k == "_functions":  # one list, shared by the graph and its subgraphs
                rec.append((k, len(v), self.ref(v)))
            elif k == "import_domains":
                rec.append((k, None if v is None else [(i.domain, i.version) for i in v]))
            else:
                rec.append((k, self.value(v)))
        rec.append([self.node(n) for n in g.nodes])
        self.out.append(rec)
        return rec[0]


def describe(graph):
    w = _Walk()
    w.graph(graph)
    # every tensor met, in the order met (their reader/producer lists refer to nodes by number)
    seen, tensors = set(), []
    stack = [graph]
    while stack:
        g = stack.pop()
        for t in list(g.inputs) + [x for n in g.nodes for x in list(n.inputs) + list(n.outputs)] + list(g.outputs):
            if id(t) not in seen:
                seen.add(id(t))
                tensors.append(t)
        for n in g.nodes:
            for v in n.attrs.values():
                if isinstance(v, gs.Graph):
                    stack.append(v)
                if isinstance(v, gs.Tensor) and id(v) not in seen:
                    seen.add(id(v))
                    tensors.append(v)
    return w.out, [w.tensor(t) for t in tensors]


def same_as_graphsurgeon(model):
    a = gs.import_onnx(model)
    b = fastgs.import_onnx(model)
    da, db = describe(a), describe(b)
    assert da[0] == db[0]
    assert da[1] == db[1]


def _corpus_models():
    return sorted(f for f in os.listdir(CORPUS) if f.endswith(".onnx"))


@pytest.mark.parametrize("name", _corpus_models())
def test_real_exports(name):
    model = onnx.load(os.path.join(CORPUS, name), load_external_data=False)
    same_as_graphsurgeon(model)


@pytest.mark.parametrize("name", ["optimum_opt_decoder_model_merged.onnx", "optimum_gpt2_with_past.onnx"])
def test_shape_inferred_exports_with_value_info(name):
    model = onnx.shape_inference.infer_shapes(onnx.load(os.path.join(CORPUS, name), load_external_data=False))
    graphs = [model.graph] + [a.g for n in model.graph.node for a in n.attribute if a.HasField("g")]
    assert sum(len(g.value_info) for g in graphs) > 10
    same_as_graphsurgeon(model)


@pytest.mark.parametrize("build", [lambda: transformer_like(300), lambda: elementwise_chain(300), preln_stream_model],
                         ids=["transformer", "chain", "preln"])
def test_builders(build):
    same_as_graphsurgeon(build())


def _branch(name, op, outer):
    return helper.make_graph([helper.make_node("MatMul", [outer, "W"], [f"{name}_m"]),
                              helper.make_node(op, [f"{name}_m"], [f"{name}_y"])],
                             name, [], [vi(f"{name}_y", [2, 4])],
                             [numpy_helper.from_array(np.ones((4, 4), np.float32), "W")] if name == "then" else [])


def test_odd_graphs():
    """Subgraphs reading outer values and shadowing an outer initializer, optional inputs and
    outputs left empty, a value read twice by one node, a value_info that only adds a dtype, a
    name declared twice, every attribute type, a Constant node's tensor attribute, a Loop."""
    W = numpy_helper.from_array(np.full((4, 4), 2.0, np.float32), "W")
    body = helper.make_graph([helper.make_node("Add", ["lx", "x"], ["ly"]), helper.make_node("Identity", ["lc"], ["lc_out"])],
                             "body", [vi("it", [], TensorProto.INT64), vi("lc", [], TensorProto.BOOL), vi("lx", [2, 4])],
                             [vi("lc_out", [], TensorProto.BOOL), vi("ly", [2, 4])])
    nodes = [
        helper.make_node("If", ["c"], ["y"], then_branch=_branch("then", "Relu", "x"), else_branch=_branch("else", "Neg", "x")),
        helper.make_node("Mul", ["x", "x"], ["xx"]),
        helper.make_node("Clip", ["xx", "", "hi"], ["clipped"]),
        helper.make_node("Dropout", ["clipped"], ["d", ""]),
        helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.arange(3, dtype=np.int64), "kv")),
        helper.make_node("Constant", [], ["kf"], value_floats=[1.0, 2.5]),
        helper.make_node("Constant", [], ["ks"], value_string="abc"),
        helper.make_node("Constant", [], ["kss"], value_strings=["a", "b"]),
        helper.make_node("Constant", [], ["ki"], value_int=3),
        helper.make_node("Loop", ["n", "cond", "x"], ["lout"], body=body),
        helper.make_node("Cast", ["d"], ["dc"], to=TensorProto.FLOAT16, saturate=1),
        helper.make_node("LeakyRelu", ["x"], ["lr"], alpha=0.2),
    ]
    hi = numpy_helper.from_array(np.array(3.0, np.float32), "hi")
    m = make_model(nodes, [vi("x", [2, 4]), vi("c", [], TensorProto.BOOL), vi("n", [], TensorProto.INT64),
                           vi("cond", [], TensorProto.BOOL)],
                   [vi("y", [2, 4]), vi("dc", [2, 4], TensorProto.FLOAT16), vi("lout", [2, 4]), vi("lr", None)],
                   [W, hi], opset=17, ir=8)
    m.graph.value_info.extend([helper.make_tensor_value_info("xx", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("xx", TensorProto.FLOAT, [2, 4]),
                               helper.make_tensor_value_info("d", TensorProto.FLOAT, []),
                               onnx.ValueInfoProto(name="clipped")])
    m.graph.input.append(helper.make_tensor_value_info("hi", TensorProto.FLOAT, []))  # an initializer listed as input
    m.graph.output.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]))  # an input that is an output
    same_as_graphsurgeon(m)


def test_models_graphsurgeon_is_left_to():
    """Local functions: graphsurgeon imports them itself."""
    f = helper.make_function("local", "f", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])],
                             [helper.make_opsetid("", 17)])
    m = make_model([helper.make_node("f", ["x"], ["y"], domain="local")], [vi("x", [2])], [vi("y", [2])],
                   extra_opsets=[("local", 1)])
    m.functions.append(f)
    g = fastgs.import_onnx(m)
    assert len(g.functions) == 1 and g.nodes[0].op == "f"


# --- export -----------------------------------------------------------------------------------


def _both_exports(graph):
    from onnx_graphsurgeon.exporters.onnx_exporter import export_onnx as gs_export

    return gs_export(graph, do_type_check=False).SerializeToString(), fastgs.export_onnx(graph, do_type_check=False).SerializeToString()


@pytest.mark.parametrize("name", _corpus_models())
def test_export_same_bytes_real_exports(name):
    from normopt import graph as G

    model = onnx.load(os.path.join(CORPUS, name), load_external_data=False)
    g = G.to_graph(model)  # typed values everywhere: value_info for each
    a, b = _both_exports(g)
    assert a == b


def test_export_same_bytes_after_rewrites():
    """After the passes (new constants, new nodes with attributes and domains, removed ones)."""
    from normopt import graph as G
    from normopt import optimize_model

    for model in (transformer_like(400), preln_stream_model(), elementwise_chain(200)):
        out, _ = optimize_model(model)
        g = G.to_graph(out)
        a, b = _both_exports(g)
        assert a == b


def test_export_same_bytes_odd_graphs():
    W = numpy_helper.from_array(np.full((4, 4), 2.0, np.float32), "W")
    nodes = [
        helper.make_node("If", ["c"], ["y"], then_branch=_branch("then", "Relu", "x"), else_branch=_branch("else", "Neg", "x")),
        helper.make_node("Clip", ["x", "", "hi"], ["clipped"], name="clip"),
        helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.arange(3, dtype=np.int64), "kv")),
        helper.make_node("Constant", [], ["ks"], value_strings=["a", "b"]),
        helper.make_node("Cast", ["clipped"], ["dc"], to=TensorProto.FLOAT16, domain=""),
        helper.make_node("LeakyRelu", ["x"], ["lr"], alpha=0.2, name="clip"),  # a duplicate node name
    ]
    hi = numpy_helper.from_array(np.array(3.0, np.float32), "hi")
    m = make_model(nodes, [vi("x", [2, 4]), vi("c", [], TensorProto.BOOL)],
                   [vi("y", [2, 4]), vi("dc", [2, 4], TensorProto.FLOAT16), vi("lr", None)], [W, hi])
    m.graph.doc_string = "doc"
    g = fastgs.import_onnx(m)
    g.nodes[4].attrs["to"] = np.float16  # a numpy type as an attribute value
    a, b = _both_exports(g)
    assert a == b
