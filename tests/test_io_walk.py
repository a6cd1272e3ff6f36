"""normopt.io's one-walk tensor enumeration (all_tensors, used by load_model's checks and by the
sparse-tensor test) gives every tensor of a model, in the order of a plain nested walk:
initializers and attribute tensors of every graph and function (weights.iter_tensors' order),
then the values and indices of every sparse tensor, sparse initializers of every graph first."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from normopt import io as nio
from normopt import weights as W


def _sparse(name, n=4):
    values = numpy_helper.from_array(np.arange(2, dtype=np.float32) + n, name)
    indices = numpy_helper.from_array(np.asarray([0, n - 1], np.int64), f"{name}_idx")
    return helper.make_sparse_tensor(values, indices, [n])


def _branch(tag, nested=None):
    nodes = [helper.make_node("Constant", [], [f"{tag}_c"], value=numpy_helper.from_array(np.ones(2, np.float32), f"{tag}_ct")),
             helper.make_node("Constant", [], [f"{tag}_s"], sparse_value=_sparse(f"{tag}_sv")),
             helper.make_node("Add", [f"{tag}_c", f"{tag}_i"], [f"{tag}_o"])]
    if nested is not None:
        nodes.append(helper.make_node("If", ["cond"], [f"{tag}_n"], then_branch=nested[0], else_branch=nested[1]))
    g = helper.make_graph(nodes, tag, [], [helper.make_tensor_value_info(f"{tag}_o", TensorProto.FLOAT, [2])],
                          [numpy_helper.from_array(np.full(2, 3, np.float32), f"{tag}_i")])
    g.sparse_initializer.append(_sparse(f"{tag}_si"))
    return g


def _model():
    inner = (_branch("tt"), _branch("te"))
    main_nodes = [helper.make_node("Constant", [], ["c0"], value=numpy_helper.from_array(np.zeros(3, np.float32), "c0t")),
                  helper.make_node("If", ["cond"], ["y"], then_branch=_branch("t", inner), else_branch=_branch("e")),
                  helper.make_node("Constant", [], ["s0"], sparse_value=_sparse("s0v")),
                  helper.make_node("MyFn", ["y"], ["z"], domain="local")]
    g = helper.make_graph(main_nodes, "main", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])],
                          [numpy_helper.from_array(np.ones(2, np.float32), "w0")])
    g.sparse_initializer.append(_sparse("main_si"))
    fn = helper.make_function("local", "MyFn", ["a"], ["b"],
                              [helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.ones(2, np.float32), "fk")),
                               helper.make_node("Constant", [], ["ks"], sparse_value=_sparse("fks")),
                               helper.make_node("If", ["a"], ["b"], then_branch=_branch("ft"), else_branch=_branch("fe"))],
                              [helper.make_opsetid("", 17)])
    return helper.make_model(g, functions=[fn], opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])


def _graphs(g):
    yield g
    for n in g.node:
        for a in n.attribute:
            if a.HasField("g"):
                yield from _graphs(a.g)
            for sg in a.graphs:
                yield from _graphs(sg)


def _expected(model):
    """The plain nested walks: iter_tensors, then every graph's sparse initializers, then every
    node's sparse attributes (the graphs' nodes, graph by graph, then the functions' nodes)."""
    out = [(t.name, "tensor") for t in W.iter_tensors(model)]
    graphs = list(_graphs(model.graph))
    for fn in model.functions:
        for n in fn.node:
            for a in n.attribute:
                if a.HasField("g"):
                    graphs.extend(_graphs(a.g))
                for sg in a.graphs:
                    graphs.extend(_graphs(sg))
    sparse = [s for g in graphs for s in g.sparse_initializer]
    for n in [n for g in graphs for n in g.node] + [n for fn in model.functions for n in fn.node]:
        for a in n.attribute:
            if a.HasField("sparse_tensor"):
                sparse.append(a.sparse_tensor)
            sparse.extend(a.sparse_tensors)
    for s in sparse:
        out += [(s.values.name, "sparse tensor values"), (s.indices.name, "sparse tensor indices")]
    return out


def test_all_tensors_gives_every_tensor_in_walk_order():
    model = _model()
    got = [(t.name, what) for t, what in nio.all_tensors(model)]
    want = _expected(model)
    assert got == want
    names = {n for n, _ in got}
    # every tensor is there: main, branches, nested branches, the function and its branches
    assert {"w0", "c0t", "t_ct", "tt_ct", "te_i", "fk", "ft_ct", "fe_i"} <= names
    assert {"main_si", "t_si", "tt_si", "ft_si", "s0v", "tt_sv", "fks", "fe_sv"} <= names


def test_load_model_weight_bytes_and_checks_from_the_one_walk(tmp_path):
    model = _model()
    big = numpy_helper.from_array(np.arange(600, dtype=np.float32), "big")  # over 1 KiB: a reference
    model.graph.initializer.append(big)
    path = str(tmp_path / "m.onnx")
    onnx.save(model, path)
    loaded = nio.load_model(path)
    assert loaded.weight_bytes == W.weight_bytes(loaded.model)
    assert not loaded.had_external_data
    # a bad tensor deep in a function's branch is still found
    bad = _model()
    bad.functions[0].node[2].attribute[0].g.initializer[0].dims[:] = [5]
    onnx.save(bad, path)
    try:
        nio.load_model(path)
    except nio.NormoptError as exc:
        assert "fe_i" in str(exc)  # (attributes are sorted by name: else_branch first)
    else:
        raise AssertionError("the bad tensor was not found")


def test_the_walk_lists_the_graphs_as_io_graphs_does():
    model = _model()
    graphs = []
    nio._tensor_lists(model, graphs)
    assert [g.name for g in graphs] == [g.name for g in nio._graphs(model.graph)]


def test_check_model_still_checks_every_graph_and_accepts_contrib_ops():
    from normopt.errors import NormoptError  # noqa: F401

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    g = helper.make_graph([helper.make_node("SimplifiedLayerNormalization", ["x", "w"], ["y"], axis=-1, epsilon=1e-5)],
                          "g", [x], [y], [numpy_helper.from_array(np.ones(4, np.float32), "w")])
    nio.check_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))  # ORT's contrib op: accepted
    bad = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], bogus=1)], "b", [x], [y])
    try:
        nio.check_model(helper.make_model(bad, opset_imports=[helper.make_opsetid("", 17)]))
    except Exception as exc:
        assert "bogus" in str(exc)
    else:
        raise AssertionError("the checker accepted an unknown attribute")


def test_the_walk_lists_every_attribute_tensor_of_the_graphs():
    model = _model()
    want = []
    for g in nio._graphs(model.graph):
        for n in g.node:
            for a in n.attribute:
                if a.HasField("t"):
                    want.append(a.t.name)
                want.extend(t.name for t in a.tensors)
    got = []
    nio._tensor_lists(model, attribute_tensors=got)
    assert sorted(t.name for t in got) == sorted(want) and len(want) >= 5  # (the functions' own are not among them)
