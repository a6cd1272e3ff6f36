"""Issue 17 (third review, continued): first-divergence localization on correct outputs, and the
regressions the long fuzz profile found."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from normopt import optimize_model
from normopt.runtime_tests.localize import _deliberate, localize

RNG = np.random.default_rng(17)


def _init(name, a):
    return numpy_helper.from_array(np.asarray(a, dtype=np.float32), name)


def _layerscale_block(d=8, n=6):
    """x -> LN -> W1 -> Relu -> W2 (+b) -> *ls -> + x -> LN -> out: a Pre-LN block whose second
    linear carries a LayerScale. ln_to_rms folds ls into W2 and then centers W2, so the value
    W2 writes is a per-channel scale followed by a per-token shift of the original's."""
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g0", "b0"], ["ln0"], axis=-1, epsilon=1e-5),
        helper.make_node("MatMul", ["ln0", "W1"], ["h"]),
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("MatMul", ["hr", "W2"], ["w2_out"]),
        helper.make_node("Add", ["w2_out", "b2"], ["w2_b"]),
        helper.make_node("Mul", ["w2_b", "ls"], ["scaled"]),
        helper.make_node("Add", ["x", "scaled"], ["res"]),
        helper.make_node("LayerNormalization", ["res", "g1", "b1"], ["y"], axis=-1, epsilon=1e-5),
    ]
    inits = [_init("g0", RNG.uniform(0.5, 1.5, d)), _init("b0", RNG.normal(size=d) * 0.1),
             _init("W1", RNG.normal(size=(d, 2 * d))), _init("W2", RNG.normal(size=(2 * d, d))),
             _init("b2", RNG.normal(size=d)), _init("ls", RNG.uniform(0.2, 3.0, d)),
             _init("g1", RNG.uniform(0.5, 1.5, d)), _init("b1", RNG.normal(size=d) * 0.1)]
    graph = helper.make_graph(nodes, "ls_block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n, d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n, d])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_localize_passes_over_a_layerscale_folded_then_centered_writer():
    model = _layerscale_block()
    out, report = optimize_model(model)
    assert any(n.op_type in ("SimplifiedLayerNormalization", "RMSNormalization") for n in out.graph.node)
    assert not any(n.op_type == "Mul" and "ls" in n.input for n in out.graph.node), "LayerScale was not folded"
    assert "w2_out" in report.changed_values
    assert localize(model, out, level="disable", skip=report.changed_values) is None


def test_localize_still_blames_a_broken_weight_behind_the_fold():
    """The composite is recognized only as that composite: one wrong element of the folded
    weight is blamed where it enters."""
    model = _layerscale_block()
    out, report = optimize_model(model)
    mm = [n for n in out.graph.node if n.op_type == "MatMul" and n.output[0] == "w2_out"][0]
    init = [i for i in out.graph.initializer if i.name == mm.input[1]][0]
    w = numpy_helper.to_array(init).copy()
    w[3, 2] += 1.0
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    fd = localize(model, out, level="disable", skip=report.changed_values)
    assert fd is not None and fd["value"] == "w2_out", fd


def _center(x):
    return x - x.mean(axis=-1, keepdims=True)


def test_deliberate_accepts_affine_then_per_token_shift():
    r = RNG.normal(size=(2, 16, 32)) * 3 + RNG.normal(size=(2, 16, 1)) * 50  # large per-token offsets
    a, t = RNG.uniform(0.1, 4.0, 32), RNG.normal(size=32)
    c = _center(a * r + t)
    assert _deliberate(r.astype(np.float32), c.astype(np.float32), 1e-4, 1e-3)


def test_deliberate_accepts_the_simple_changes_still():
    r = RNG.normal(size=(16, 24))
    for c in (_center(r), r + RNG.normal(size=24), r * RNG.uniform(0.5, 2, 24) + 1.0):
        assert _deliberate(r.astype(np.float32), c.astype(np.float32), 1e-4, 1e-3)


def test_deliberate_refuses_what_no_pass_makes():
    r = RNG.normal(size=(16, 24))
    a = RNG.uniform(0.5, 2, 24)
    mixing = r + 0.05 * r[:, :1] * RNG.normal(size=24)  # a channel leaking into the others
    one = _center(a * r).copy()
    one[5, 7] += 0.01  # one element off
    shuffled = _center(a * r)[:, ::-1]
    for c in (mixing, one, shuffled):
        assert not _deliberate(r.astype(np.float32), c.astype(np.float32), 1e-4, 1e-3)


def test_deliberate_two_way_fit_on_wide_values():
    """More channels than the per-token part is solved on: every channel is still checked."""
    r = RNG.normal(size=(12, 600))
    a, t = RNG.uniform(0.1, 4.0, 600), RNG.normal(size=600)
    c = _center(a * r + t)
    assert _deliberate(r.astype(np.float32), c.astype(np.float32), 1e-4, 1e-3)
    c[4, 599] += 0.05  # a channel the per-token fit did not use... or did; either way blamed
    c[4, 301] += 0.05
    assert not _deliberate(r.astype(np.float32), c.astype(np.float32), 1e-4, 1e-3)
