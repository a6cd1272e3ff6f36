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
