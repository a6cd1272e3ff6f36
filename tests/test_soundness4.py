"""Soundness, fourth review: hand-built graphs where verification's input plan or the passes'
analyses could miss what a model computes.

  * nested If branches gated by several bool flags: with more flags than are enumerated
    exhaustively, the covering design (every pair of values) does not reach a branch that
    needs three flags at once; the plan must cover every branch's own flag conditions."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from normopt.runtime_tests.equivalence import compare
from normopt.runtime_tests.inputs import flag_combinations, plan_inputs

from conftest import init, make_model, vi

RNG = np.random.default_rng(4)
D = 8


def _branch(name, out, body_nodes, inits=()):
    return helper.make_graph(body_nodes, name, [], [vi(out, None)], list(inits))


def _nested_flags(weight, n_flags=5):
    """y = If(f0){ If(f1){ If(f2){ x W0 } else { x W } } else {x} } else {x}: the x W branch
    runs only with f0 = True, f1 = True, f2 = False; f3, f4 are unused flags beyond the
    exhaustive limit."""
    w0 = (0.3 * np.arange(D * D).reshape(D, D) / (D * D)).astype(np.float32)
    inner_then = _branch("t2", "o2t", [helper.make_node("MatMul", ["x", "W0"], ["o2t"])], [init("W0", w0)])
    inner_else = _branch("e2", "o2e", [helper.make_node("MatMul", ["x", "Wm"], ["o2e"])], [init("Wm", weight)])
    mid_then = _branch("t1", "o1t", [helper.make_node("If", ["f2"], ["o1t"], then_branch=inner_then, else_branch=inner_else)])
    ident = lambda n, o: _branch(n, o, [helper.make_node("Identity", ["x"], [o])])
    mid = _branch("t0", "o0t", [helper.make_node("If", ["f1"], ["o0t"], then_branch=mid_then, else_branch=ident("e1", "o1e"))])
    nodes = [helper.make_node("If", ["f0"], ["y0"], then_branch=mid, else_branch=ident("e0", "o0e"))]
    # the unused flags still reach the output, so they are real inputs
    extra = []
    for k in range(3, n_flags):
        nodes.append(helper.make_node("Cast", [f"f{k}"], [f"c{k}"], to=TensorProto.FLOAT))
        extra.append(f"c{k}")
    acc = "y0"
    for i, c in enumerate(extra):
        nodes.append(helper.make_node("Add", [acc, c], [f"acc{i}"]))
        acc = f"acc{i}"
    nodes.append(helper.make_node("Identity", [acc], ["y"]))
    inputs = [vi("x", [2, D])] + [vi(f"f{k}", [1], TensorProto.BOOL) for k in range(n_flags)]
    return make_model(nodes, inputs, [vi("y", [2, D])], [], opset=17)


def test_plan_reaches_a_branch_under_three_flags():
    m = _nested_flags(np.eye(D, dtype=np.float32))
    rows = flag_combinations(plan_inputs(m))
    assert any(r["f0"] and r["f1"] and not r["f2"] for r in rows), rows


def test_mutant_in_a_three_flag_branch_is_refused():
    w = (0.3 * RNG.standard_normal((D, D))).astype(np.float32)
    w2 = w.copy()
    w2[:, 1] *= 1.5
    res = compare(_nested_flags(w), _nested_flags(w2), seeds=2, level="disable")
    assert not res.equivalent, res.summary_lines()


# --- a graph output's declared shape is the model's word, not a fact the passes may use ---------
# ONNX's strict checker and ONNX Runtime both accept an output declared [1, 16] that the graph
# computes as [N, 16] (ORT warns and returns [N, 16]). Shape inference kept the declared shape on
# the tensor, so fold_constants folded Shape(h) to [1, 16]: y = x * prod(shape(h)) came out 16 x
# where it is 48 x at N = 3.


def _declared_output_model():
    nodes = [helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Shape", ["h"], ["s"]),
             helper.make_node("Cast", ["s"], ["sf"], to=TensorProto.FLOAT),
             helper.make_node("ReduceProd", ["sf"], ["p"], keepdims=0), helper.make_node("Mul", ["x", "p"], ["y"])]
    return make_model(nodes, [vi("x", ["N", 16])], [vi("h", [1, 16]), vi("y", ["N", 16])], [], opset=17)


def test_declared_output_shape_does_not_override_what_the_graph_computes():
    from normopt import optimize_model
    from normopt.runtime_tests.providers import make_session

    m = _declared_output_model()
    onnx.checker.check_model(m, full_check=True)  # valid by ONNX's own strict inference
    out, report = optimize_model(m)
    x = RNG.standard_normal((3, 16)).astype(np.float32)
    ref = make_session(m.SerializeToString(), level="disable").run(None, {"x": x})
    got = make_session(out.SerializeToString(), level="disable").run(None, {"x": x})
    for r, g in zip(ref, got):
        np.testing.assert_allclose(g, r, rtol=1e-6)


def test_consistent_declared_output_names_are_kept():
    from normopt import optimize_model

    m = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", ["N", 16])], [vi("y", ["batch", 16])], [], opset=17)
    out, _ = optimize_model(m)
    dims = out.graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 16]


def test_declared_static_output_dim_the_engine_cannot_infer_is_not_trusted():
    """NonZero's count is unknown to inference; an output declared [2, 5] is the model's word
    only (ORT returns [2, count]): folding Shape of it to [2, 5] gave 10 where it is 2 * count."""
    from normopt import optimize_model
    from normopt.runtime_tests.providers import make_session

    nodes = [helper.make_node("NonZero", ["x"], ["nz"]), helper.make_node("Cast", ["nz"], ["h"], to=TensorProto.FLOAT),
             helper.make_node("Shape", ["h"], ["s"]), helper.make_node("Cast", ["s"], ["sf"], to=TensorProto.FLOAT),
             helper.make_node("ReduceProd", ["sf"], ["y"], keepdims=0)]
    m = make_model(nodes, [vi("x", [4, 4])], [vi("h", [2, 5]), vi("y", [])], [], opset=17)
    onnx.checker.check_model(m, full_check=True)
    out, _ = optimize_model(m)
    x = (RNG.standard_normal((4, 4)) > 0).astype(np.float32)
    ref = make_session(m.SerializeToString(), level="disable").run(None, {"x": x})
    got = make_session(out.SerializeToString(), level="disable").run(None, {"x": x})
    for r, g in zip(ref, got):
        np.testing.assert_allclose(g, r)
    # the written model declares its outputs as the original did
    assert out.graph.output[0].type == m.graph.output[0].type
