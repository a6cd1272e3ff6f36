"""The judge, fourth review: an error must be judged where it is, not against the original's
worst error elsewhere in the same output.

An output that concatenates a well-conditioned part (a MatMul) with an ill-conditioned one
((x + s) - s with s = 3e5 x, whose fp32 error is ~2% of its RMS) has a global original error
set by the ill-conditioned half. A mutant that scales one MatMul column by 1.05 is ~1e5 times
further from exact than the original *on that column*, yet under 10x the original's worst
error anywhere: a judge by the output's global max error accepted it."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from normopt.runtime_tests.equivalence import compare, exact_judgement

from conftest import init, make_model, vi

RNG = np.random.default_rng(404)
D, N = 16, 16


def _masked(weight):
    inits = [init("W", weight), init("k", np.float32(3e5))]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]),
             helper.make_node("Mul", ["x", "k"], ["s"]),
             helper.make_node("Add", ["x", "s"], ["p"]), helper.make_node("Sub", ["p", "s"], ["z"]),
             helper.make_node("Concat", ["h", "z"], ["y"], axis=-1)]
    return make_model(nodes, [vi("x", [1, N, D])], [vi("y", [1, N, 2 * D])], inits)


W0 = (0.3 * RNG.standard_normal((D, D))).astype(np.float32)


def test_mutant_under_another_parts_error_is_refused():
    w1 = W0.copy()
    w1[:, 3] *= 1.05
    res = compare(_masked(W0), _masked(w1), seeds=3, level="disable")
    assert res.mode == "exact"
    assert not res.equivalent, res.summary_lines()


def test_same_model_still_passes():
    w1 = W0.copy()  # a copy of the weights: the same function, the same fp32 evaluation
    res = compare(_masked(W0), _masked(w1), seeds=3, level="disable")
    assert res.equivalent, res.summary_lines()


def test_blockwise_judgement_units():
    rng = np.random.default_rng(0)
    e = rng.standard_normal((1, 32, 16))
    o = e + 1e-7 * rng.standard_normal(e.shape)
    o[..., 8:] += 1e-2 * rng.standard_normal((1, 32, 8))  # half the channels: a large original error
    c = o.copy()
    c[..., 8:] = e[..., 8:] + 1e-2 * rng.standard_normal((1, 32, 8))  # as inexact as the original there: fine
    assert exact_judgement(o, c, e)[0]
    c[..., 2] = e[..., 2] * 1.01  # one accurate channel 1% off: 1e5 x the original's error there
    assert not exact_judgement(o, c, e)[0]
    # a candidate 2x the original's error on every channel stays within the bound
    c2 = e + 2 * (o - e)
    assert exact_judgement(o, c2, e)[0]


# --- narrowing casts are part of the function ---------------------------------------------------
# The float64 reference used to turn every float Cast into a Cast to float64, so an fp32 model's
# own fp32 -> fp16 -> fp32 round trip vanished from "the exact function": a candidate that drops
# the round trip (the rewrite issue 17 calls wrong: 5e-4 off here) came out closer to exact than
# the original, and any error under 10x the fp16 rounding passed.


def _roundtrip(keep_cast: bool, weight=None):
    weight = W0 if weight is None else weight
    nodes = ([helper.make_node("Cast", ["x"], ["h"], to=TensorProto.FLOAT16),
              helper.make_node("Cast", ["h"], ["xr"], to=TensorProto.FLOAT)] if keep_cast
             else [helper.make_node("Identity", ["x"], ["xr"])])
    nodes.append(helper.make_node("MatMul", ["xr", "W"], ["y"]))
    return make_model(nodes, [vi("x", [4, D])], [vi("y", [4, D])], [init("W", weight)])


def test_dropping_a_narrowing_round_trip_is_refused():
    res = compare(_roundtrip(True), _roundtrip(False), seeds=2, level="disable")
    assert res.mode == "exact"
    assert not res.equivalent, res.summary_lines()


def test_model_with_narrowing_cast_passes_against_itself():
    res = compare(_roundtrip(True), _roundtrip(True, W0.copy()), seeds=2, level="disable")
    assert res.mode == "exact"
    assert res.equivalent, res.summary_lines()


def test_float64_reference_keeps_the_rounding_of_narrowing_casts():
    from normopt.runtime_tests.exact import ExactRunner

    x = np.full((4, D), 1.0 + 2.0 ** -13, np.float32)  # rounds to 1.0 in fp16
    runner = ExactRunner(_roundtrip(True, np.eye(D, dtype=np.float32)), ["y"])
    assert runner.available, runner.why
    (y,) = runner.run({"x": x})
    assert y.dtype == np.float64
    np.testing.assert_array_equal(y, np.ones((4, D)))


def test_narrowing_cast_inside_a_branch_keeps_its_rounding_too():
    from normopt.runtime_tests.exact import ExactRunner

    def branch(name, cast):
        nodes = ([helper.make_node("Cast", ["x"], [f"{name}h"], to=TensorProto.FLOAT16),
                  helper.make_node("Cast", [f"{name}h"], [f"{name}o"], to=TensorProto.FLOAT)] if cast
                 else [helper.make_node("Identity", ["x"], [f"{name}o"])])
        return helper.make_graph(nodes, name, [], [vi(f"{name}o", None)])

    m = make_model([helper.make_node("If", ["f"], ["y"], then_branch=branch("t", True), else_branch=branch("e", False))],
                   [vi("x", [2, D]), vi("f", [1], TensorProto.BOOL)], [vi("y", [2, D])])
    x = np.full((2, D), 1.0 + 2.0 ** -13, np.float32)
    runner = ExactRunner(m, ["y"])
    assert runner.available, runner.why
    np.testing.assert_array_equal(runner.run({"x": x, "f": np.array([True])})[0], np.ones((2, D)))
    np.testing.assert_array_equal(runner.run({"x": x, "f": np.array([False])})[0], x.astype(np.float64))


def test_rounding_concentrated_in_one_channel_by_an_exact_rewrite_passes():
    """crms rebuilds the last channel of a full-width output as minus the sum of the d - 1
    others: ~sqrt(d) ulps there, 17x the original's error in that channel at d = 256 (and
    within the global bound). The per-block check must not refuse it (K_BLOCK)."""
    from conftest import preln_stream_model
    from normopt import optimize_model

    m = preln_stream_model(d=256, n=32, layers=2)
    out, _ = optimize_model(m, opt_in=["crms"])
    assert "Concat" in [n.op_type for n in out.graph.node]  # the rebuilt channel is there
    res = compare(m, out, seeds=2, level="disable")
    assert res.mode == "exact"
    assert res.equivalent, res.summary_lines()
