"""Canonicalization passes: constant folding, Identity removal, explicit defaults, Reduce axes."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from normopt import graph as G
from normopt import optimize_model
from normopt.runtime_tests.equivalence import compare

from conftest import init, make_model, vi


def ops(m):
    return collections.Counter(n.op_type for n in m.graph.node)


def test_fold_shape_gather_concat_chain():
    # Reshape(x, Concat(Shape(x)[0], [-1])) with a static x: the shape chain folds to a constant
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "i0"], ["s0"], axis=0),
        helper.make_node("Unsqueeze", ["s0", "ax0"], ["s0u"]),
        helper.make_node("Concat", ["s0u", "m1"], ["shp"], axis=0),
        helper.make_node("Reshape", ["x", "shp"], ["r"]),
        helper.make_node("Identity", ["w"], ["wi"]),
        helper.make_node("MatMul", ["r", "wi"], ["y"]),
    ]
    inits = [init("i0", np.int64(0)), init("ax0", np.array([0], np.int64)), init("m1", np.array([-1], np.int64)),
             init("w", np.ones((12, 3), np.float32))]
    m = make_model(nodes, [vi("x", [2, 3, 4])], [vi("y", [2, 3])], inits)
    out, report = optimize_model(m, passes=["fold_constants", "remove_identity"])
    c = ops(out)
    assert c == collections.Counter({"Reshape": 1, "MatMul": 1})
    assert compare(m, out).equivalent


def test_remove_identity_keeps_output_names():
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["y"]),
             helper.make_node("Identity", ["x"], ["z"])]
    m = make_model(nodes, [vi("x", [4])], [vi("y", [4]), vi("z", [4])])
    out, _ = optimize_model(m, passes=["remove_identity"])
    assert [o.name for o in out.graph.output] == ["y", "z"]
    assert ops(out) == collections.Counter({"Relu": 1, "Identity": 1})  # z copies a graph input: kept
    assert compare(m, out).equivalent


def test_explicit_defaults():
    nodes = [helper.make_node("LayerNormalization", ["x", "g"], ["y"]),
             helper.make_node("ReduceMean", ["y"], ["m"], axes=[-1]),
             helper.make_node("SkipLayerNormalization", ["x", "x", "g"], ["s"], domain="com.microsoft")]
    m = make_model(nodes, [vi("x", [2, 4])], [vi("m", [2, 1]), vi("s", [2, 4])], [init("g", np.ones(4, np.float32))],
                   extra_opsets=[("com.microsoft", 1)])
    out, _ = optimize_model(m, passes=["explicit_defaults"])
    attrs = {n.op_type: {a.name: helper.get_attribute_value(a) for a in n.attribute} for n in out.graph.node}
    assert abs(attrs["LayerNormalization"]["epsilon"] - 1e-5) < 1e-12 and attrs["LayerNormalization"]["axis"] == -1
    assert attrs["ReduceMean"]["keepdims"] == 1
    assert abs(attrs["SkipLayerNormalization"]["epsilon"] - 1e-12) < 1e-18
    assert compare(m, out).equivalent


def test_reduce_axes_attribute_and_input():
    x = gs.Variable("x", np.float32, [2, 3, 4])
    n1 = gs.Node("ReduceMean", inputs=[x], outputs=[gs.Variable("a")], attrs={"axes": [-1], "keepdims": 0})
    n2 = gs.Node("ReduceMean", inputs=[x, gs.Constant("ax", np.array([1, -1], np.int64))], outputs=[gs.Variable("b")])
    n3 = gs.Node("ReduceMean", inputs=[x], outputs=[gs.Variable("c")])
    n4 = gs.Node("ReduceMean", inputs=[x, gs.Variable("dyn", np.int64, [1])], outputs=[gs.Variable("d")])
    assert G.reduce_axes(n1, 3) == ((2,), 0)
    assert G.reduce_axes(n2, 3) == ((1, 2), 1)
    assert G.reduce_axes(n3, 3) == (None, 1)
    assert G.reduce_axes(n4, 3)[0] is False


def test_noop_cast_and_eval_dropout_removed():
    nodes = [helper.make_node("Cast", ["x"], ["c"], to=TensorProto.FLOAT),
             helper.make_node("Dropout", ["c"], ["d"]),
             helper.make_node("Cast", ["d"], ["h"], to=TensorProto.FLOAT16),
             helper.make_node("Cast", ["h"], ["y"], to=TensorProto.FLOAT)]
    m = make_model(nodes, [vi("x", [4])], [vi("y", [4])])
    out, _ = optimize_model(m, passes=["remove_identity"])
    assert ops(out) == collections.Counter({"Cast": 2})  # real casts stay
    assert compare(m, out).equivalent


def test_report_describes_node_matches_on_one_line():
    nodes = [helper.make_node("LayerNormalization", ["x", "g"], ["y"], name="ln0")]
    m = make_model(nodes, [vi("x", [2, 4])], [vi("y", [2, 4])], [init("g", np.ones(4, np.float32))])
    _, report = optimize_model(m, passes=["explicit_defaults"])
    assert report.passes[0].matched == ["LayerNormalization 'ln0'"]


def _flatten_rows_model(op="Softmax", flat_axis=3, op_axis=-1, shape_from="shape", opset=13, dims=("b", 3, 4, 5)):
    """Reshape(op(Flatten(x, flat_axis)), Shape(x)): what ONNX's version converter writes for an
    opset-11 Softmax when it does not know the input's rank."""
    nodes = [helper.make_node("Flatten", ["x"], ["f"], axis=flat_axis),
             helper.make_node(op, ["f"], ["s"], axis=op_axis)]
    inits = []
    if shape_from == "shape":
        nodes.append(helper.make_node("Shape", ["x"], ["shp"]))
    else:
        inits.append(init("shp", np.array([2, 3, 4, 5], np.int64)))
    nodes.append(helper.make_node("Reshape", ["s", "shp"], ["y"]))
    return make_model(nodes, [vi("x", list(dims))], [vi("y", list(dims))], inits, opset=opset)


def test_the_converters_flatten_softmax_reshape_becomes_one_softmax():
    """cancel_layout folds Flatten(x, last) / Softmax (LogSoftmax, Hardmax) over the last axis /
    Reshape(Shape(x)) into one op over x's last axis (the version converter's opset-13 form of
    an opset-11 Softmax it could not shape). It is proved by the validator against the original
    and equivalent under ONNX Runtime running the original, with a dynamic batch."""
    from normopt.proof import prove

    for op, shape_from, dims in (("Softmax", "shape", ("b", 3, 4, 5)), ("LogSoftmax", "shape", ("b", 3, 4, 5)),
                                 ("Hardmax", "shape", ("b", 3, 4, 5)), ("Softmax", "const", (2, 3, 4, 5))):
        m = _flatten_rows_model(op=op, shape_from=shape_from, dims=dims)
        out, report = optimize_model(m, passes=["cancel_layout"])
        assert ops(out) == collections.Counter({op: 1}), (op, ops(out))
        node = out.graph.node[0]
        assert [a.i for a in node.attribute if a.name == "axis"] == [3]
        assert compare(m, out).equivalent
        res = prove(m, out)
        assert res.proved, res.summary
        bad = onnx.ModelProto()
        bad.CopyFrom(out)
        next(a for a in bad.graph.node[0].attribute if a.name == "axis").i = 2  # over another axis
        assert not prove(m, bad).proved
        bad.CopyFrom(out)
        bad.graph.node[0].op_type = "LogSoftmax" if op != "LogSoftmax" else "Softmax"  # another op
        assert not prove(m, bad).proved


def test_a_flatten_not_at_the_last_axis_is_left_alone():
    """Flatten at axis 2 (rows of 4*5 values): the op is over two axes of x, not one; the pattern
    stays, with a reason; so does a Softmax over axis 0 of the 2-D input."""
    for kw in (dict(flat_axis=2), dict(op_axis=0)):
        m = _flatten_rows_model(**kw)
        out, report = optimize_model(m, passes=["cancel_layout"])
        assert ops(out)["Flatten"] == 1 and ops(out)["Reshape"] == 1
        p = next(p for p in report.passes if p.name == "cancel_layout")
        assert p.applied == 0 and p.declined, p.declined
        assert compare(m, out).equivalent
