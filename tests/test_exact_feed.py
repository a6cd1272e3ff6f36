"""The float64 reference feeds its large weights instead of embedding them (issue 20).

Embedded float64 weights existed three times at once (the converted proto, its serialized bytes
and ONNX Runtime's copy): a 0.66 GB fp32 GPT-2-small-shaped decoder peaked at 5.4 GB and spent
25 s in the float64 evaluation. Fed, ORT reads the arrays in place. These tests check that the
fed weights compute the same float64 function: in the main graph, read from a subgraph, as an
IR 3 initializer that is also an input (the fed value wins, as in ORT), and in fp16."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from normopt.runtime_tests import exact
from normopt.runtime_tests.equivalence import compare

from conftest import init, make_model, vi

RNG = np.random.default_rng(2020)
K, N = 256, 128  # a 128 KB fp32 weight: above exact.FEED_BYTES


def _model(dtype=np.float32, ir=9, weight_is_input=False):
    w = (RNG.standard_normal((K, N)) / 16).astype(dtype)
    b = RNG.standard_normal(N).astype(dtype)
    tdt = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    then = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["t"])], "then", [], [vi("t", [2, N], tdt)])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["e0"]), helper.make_node("MatMul", ["e0", "W"], ["e"])],
                              "else", [], [vi("e", [2, N], tdt)])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"]),
             helper.make_node("If", ["flag"], ["z"], then_branch=then, else_branch=other)]
    inputs = [vi("x", [2, K], tdt), vi("flag", [], TensorProto.BOOL)]
    if weight_is_input:
        inputs.append(vi("W", [K, N], tdt))
    m = make_model(nodes, inputs, [vi("y", [2, N], tdt), vi("z", [2, N], tdt)], [init("W", w), init("b", b)], ir=ir)
    return m, w.astype(np.float64), b.astype(np.float64)


def _feeds(dtype=np.float32, flag=True):
    return {"x": RNG.standard_normal((2, K)).astype(dtype), "flag": np.array(flag)}


def test_large_weights_are_fed_and_compute_the_float64_function():
    m, w, b = _model()
    runner = exact.ExactRunner(m, ["y", "z"])
    assert runner.available, runner.why
    assert "W" not in {t.name for t in runner.model.graph.initializer}
    assert "W" in {i.name for i in runner.model.graph.input}
    assert "b" in {i.name for i in runner.model.graph.input}  # small ones too (weight noise draws perturb them)
    for flag in (True, False):
        f = _feeds(flag=flag)
        y, z = runner.run(f)
        x = f["x"].astype(np.float64)
        assert y.dtype == np.float64
        np.testing.assert_allclose(y, x @ w + b, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(z, (x if flag else -x) @ w, rtol=1e-12, atol=1e-12)
    runner.close()


def test_fp16_weights_are_fed_in_float64():
    m, w, b = _model(np.float16)
    runner = exact.ExactRunner(m, ["y"])
    assert runner.available, runner.why
    f = _feeds(np.float16)
    (y,) = runner.run(f)
    np.testing.assert_allclose(y, f["x"].astype(np.float64) @ w + b, rtol=1e-12, atol=1e-12)


def test_an_initializer_that_is_an_input_keeps_the_fed_value():
    m, w, b = _model(ir=3, weight_is_input=True)
    m.opset_import[0].version = 9  # IR 3 models run with opsets of their time
    runner = exact.ExactRunner(m, ["y"])
    assert runner.available, runner.why
    f = _feeds()
    (y,) = runner.run(f)
    np.testing.assert_allclose(y, f["x"].astype(np.float64) @ w + b, rtol=1e-12, atol=1e-12)
    other = (RNG.standard_normal((K, N)) / 16).astype(np.float32)
    (y2,) = runner.run({**f, "W": other})
    np.testing.assert_allclose(y2, f["x"].astype(np.float64) @ other.astype(np.float64) + b, rtol=1e-12, atol=1e-12)


def test_compare_with_fed_weights_still_refuses_a_one_column_change():
    m, _, _ = _model()
    bad = onnx.ModelProto()
    bad.CopyFrom(m)
    for t in bad.graph.initializer:
        if t.name == "W":
            arr = onnx.numpy_helper.to_array(t).copy()
            arr[:, 5] *= 1.01
            t.CopyFrom(onnx.numpy_helper.from_array(arr, "W"))
    good = compare(m, m, seeds=2, level="disable")
    assert good.mode == "exact" and good.equivalent, good.summary_lines()
    res = compare(m, bad, seeds=2, level="disable")
    assert res.mode == "exact"
    assert not res.equivalent, res.summary_lines()


def test_fed_scalar_weights_keep_their_rank():
    """Every float initializer and Constant is fed to the float64 session; a scalar one must be
    fed as a scalar. A 0-d weight fed with shape (1,) made a shape computation one rank too high
    (MobileViT's patch sizes: Cast -> Div by a scalar Constant -> Ceil), so its Concat failed and
    verification fell back to the fp32 tolerance check."""
    from onnx import TensorProto, helper, numpy_helper

    from conftest import make_model, vi
    from normopt.runtime_tests.equivalence import compare
    from normopt.runtime_tests.exact import to_float64

    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "i1"], ["d"], axis=0),
             helper.make_node("Cast", ["d"], ["df"], to=TensorProto.FLOAT),
             helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(np.array(2.0, np.float32))),
             helper.make_node("Div", ["df", "two"], ["h"]),
             helper.make_node("Mul", ["h", "half"], ["h2"]),
             helper.make_node("Ceil", ["h2"], ["c"]),
             helper.make_node("Cast", ["c"], ["ci"], to=TensorProto.INT64),
             helper.make_node("Unsqueeze", ["ci", "ax0"], ["cu"]),
             helper.make_node("Concat", ["m1", "cu"], ["shp"], axis=0),
             helper.make_node("Reshape", ["x", "shp"], ["y"])]
    inits = [numpy_helper.from_array(np.array(1, np.int64), "i1"), numpy_helper.from_array(np.array(2.0, np.float32), "half"),
             numpy_helper.from_array(np.array([0], np.int64), "ax0"), numpy_helper.from_array(np.array([-1], np.int64), "m1")]
    m = make_model(nodes, [vi("x", [2, 8])], [vi("y", None)], inits, opset=17)
    weights = {}
    to_float64(m, weights)
    assert weights["half"].shape == () and weights["two"].shape == ()
    res = compare(m, m)
    assert res.equivalent and res.mode != "fallback", res.summary_lines()
