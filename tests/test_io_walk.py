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


def _expected(model):
    """The plain nested walks: iter_tensors, then every graph's sparse initializers, then every
    node's sparse attributes (the graphs' nodes, graph by graph, then the functions' nodes)."""
    out = [(t.name, "tensor") for t in W.iter_tensors(model)]
    graphs = list(nio._graphs(model.graph))
    for fn in model.functions:
        for n in fn.node:
            for a in n.attribute:
                if a.HasField("g"):
                    graphs.extend(nio._graphs(a.g))
                for sg in a.graphs:
                    graphs.extend(nio._graphs(sg))
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


def _text_problem_reference(model):
    """io.text_problem as it was (graphs listed first, then every check in its order)."""
    def bad(*xs):
        return any(isinstance(x, bytes) for x in xs)

    if bad(model.producer_name, model.producer_version, model.domain, model.doc_string) or any(
            bad(o.domain) for o in model.opset_import) or any(bad(p.key, p.value) for p in model.metadata_props):
        return "the model's header holds text that is not UTF-8"
    graphs = list(nio._graphs(model.graph))
    for fn in model.functions:
        if bad(fn.name, fn.domain, *fn.input, *fn.output, *fn.attribute):
            return "a function's name or signature is not UTF-8 text"
        for node in fn.node:
            for attr in node.attribute:
                if attr.HasField("g"):
                    graphs.extend(nio._graphs(attr.g))
                graphs.extend(g2 for g in attr.graphs for g2 in nio._graphs(g))
    nodes = [n for g in graphs for n in g.node] + [n for fn in model.functions for n in fn.node]
    for g in graphs:
        if bad(g.name, g.doc_string) or any(bad(v.name) for v in list(g.input) + list(g.output) + list(g.value_info)):
            return "a graph's name or value name is not UTF-8 text"
        if any(bad(t.name) for t in g.initializer) or any(bad(s.values.name) for s in g.sparse_initializer):
            return "an initializer's name is not UTF-8 text"
    for n in nodes:
        if bytes in set(map(type, (n.name, n.op_type, n.domain, n.doc_string, *n.input, *n.output))):
            return f"node {n.name!r}: a name, op type or domain is not UTF-8 text"
        for a in n.attribute:
            if bad(a.name, a.ref_attr_name, a.doc_string) or (a.HasField("t") and bad(a.t.name)):
                return f"node {n.name!r}: an attribute name is not UTF-8 text"
    return None


def test_text_problem_finds_the_same_first_problem_as_the_plain_walks():
    """Names in every kind of place (graph names, value names, initializers, nodes of the main
    graph, of nested branches, of functions and their branches) made invalid UTF-8, one or two
    at a time: the one-walk check reports what the plain walks report."""
    import itertools

    model = _model()
    # node names: "n<i>" on every node of every graph and function, a marker we can corrupt
    k = itertools.count()
    graphs = list(nio._graphs(model.graph)) + [g for fn in model.functions for n in fn.node for a in n.attribute
                                               for g in ([a.g] if a.HasField("g") else []) + list(a.graphs)]
    for g in graphs:
        g.name = f"G{next(k):03d}"
        for n in g.node:
            n.name = f"N{next(k):03d}"
    for n in model.functions[0].node:
        n.name = f"N{next(k):03d}"
    data = model.SerializeToString()
    markers = sorted({data[i:i + 4] for i in range(len(data) - 3) if data[i:i + 1] in (b"G", b"N") and data[i + 1:i + 4].isdigit()})
    assert len(markers) > 20
    singles = [(m,) for m in markers]
    pairs = [(markers[i], markers[j]) for i in range(0, len(markers), 3) for j in range(len(markers) - 1, i, -4)]
    compared = 0
    for chosen in singles + pairs:
        broken = data
        for m in chosen:
            broken = broken.replace(m, b"\xff" + m[1:])
        mp = onnx.ModelProto()
        mp.ParseFromString(broken)
        want = _text_problem_reference(mp)
        assert want is not None
        assert nio.text_problem(mp) == want, chosen
        compared += 1
    assert nio.text_problem(model) is None
    assert compared > len(markers)


def test_load_model_lists_the_data_files_the_output_plan_needs(tmp_path):
    from normopt import paths as P

    model = _model()
    model.graph.initializer.append(numpy_helper.from_array(np.arange(600, dtype=np.float32), "big"))
    path = str(tmp_path / "m.onnx")
    onnx.save(model, path, save_as_external_data=True, location="m.bin", size_threshold=1024)
    loaded = nio.load_model(path)
    assert loaded.data_files == [str(tmp_path / "m.bin")] and loaded.had_external_data
    plans = []
    for files in (loaded.data_files, None):  # from load_model, and from a walk of the model
        loaded.data_files = files
        plan = P.Plan()
        nio.plan_model_output(plan, path, loaded, str(tmp_path / "out" / "o.onnx"), True)
        plans.append([(t.option, t.given, t.source) for t in plan.writes])
    assert plans[0] == plans[1] and any(src for _, _, src in plans[0])
