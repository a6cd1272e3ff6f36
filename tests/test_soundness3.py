"""Soundness, third review (issue 17): the pass and analysis mechanisms.

  * a constant's broadcast shape is part of what it computes (axes.keeps_shape / scalar_of);
  * only exact widening float casts commute with per-token centering (axes.exact_widening);
  * "is this value read?" counts graph outputs and subgraph reads (graph.is_read);
  * run-time semantics: a Dropout whose training_mode is fed at run time stays; constant folding
    computes what ONNX Runtime computes, or does not fold.

Each case is a hand-built graph, optimized with verification off and compared with ONNX Runtime
running the original (or, where the difference is a structure, checked structurally)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from normopt import graph as G
from normopt import optimize_model
from normopt.axes import exact_widening, forward_axis, keeps_shape, scalar_of
from normopt.io import check_model
from normopt.pipeline import Analysis, Context, Pass, Pipeline
from normopt.runtime_tests.equivalence import compare
from normopt.runtime_tests.providers import make_session

from conftest import init, make_model, vi

RNG = np.random.default_rng(17)
D, N = 16, 6


def _w(*shape, scale=0.3, offset=0.0):
    return (offset + scale * RNG.standard_normal(shape)).astype(np.float32)


def _optimize(m, **kw):
    out, report = optimize_model(m, **kw)
    assert not report.errors, report.errors
    check_model(out)
    return out, report


def _equivalent(model, out):
    res = compare(model, out, seeds=2, level="disable")
    assert res.equivalent, res.summary_lines()


def _ops(m):
    return [n.op_type for n in m.graph.node]


def _run(m, feeds):
    return make_session(m.SerializeToString(), level="disable").run(None, feeds)


def _decomposed_ln(nodes, inits, x, out, tag, gamma_shape=(D,), eps_shape=(), gamma=None):
    """Decomposed LN (opset 13: axes as attribute) of x over the last axis, with gamma and eps
    constants of the given shapes (a one-element [1, 1, 1, 1] one widens the output)."""
    g = np.full(gamma_shape, 1.3, np.float32) if gamma is None else gamma
    inits += [init(f"{tag}_g", g), init(f"{tag}_b", _w(D, scale=0.2)), init(f"{tag}_two", np.float32(2.0)),
              init(f"{tag}_eps", np.full(eps_shape, 1e-5, np.float32))]
    nodes += [helper.make_node("ReduceMean", [x], [f"{tag}_m"], axes=[-1], keepdims=1),
              helper.make_node("Sub", [x, f"{tag}_m"], [f"{tag}_d"]),
              helper.make_node("Pow", [f"{tag}_d", f"{tag}_two"], [f"{tag}_sq"]),
              helper.make_node("ReduceMean", [f"{tag}_sq"], [f"{tag}_v"], axes=[-1], keepdims=1),
              helper.make_node("Add", [f"{tag}_v", f"{tag}_eps"], [f"{tag}_ve"]),
              helper.make_node("Sqrt", [f"{tag}_ve"], [f"{tag}_s"]),
              helper.make_node("Div", [f"{tag}_d", f"{tag}_s"], [f"{tag}_n"]),
              helper.make_node("Mul", [f"{tag}_n", f"{tag}_g"], [f"{tag}_gn"]),
              helper.make_node("Add", [f"{tag}_gn", f"{tag}_b"], [out])]


# --- 1. rank and broadcast of one-element constants ---------------------------------------------


def test_keeps_shape_counts_rank_and_dims():
    assert keeps_shape((), [1, N, D]) and keeps_shape((1,), [1, N, D]) and keeps_shape((1, 1, 1), [1, N, D])
    assert not keeps_shape((1, 1, 1, 1), [1, N, D])  # one element, but rank 4
    assert keeps_shape((D,), [1, N, D]) and keeps_shape((N, 1), [1, N, D])
    assert not keeps_shape((2, 1, 1), [1, N, D]) and not keeps_shape((D,), [1, N, "d"])


@pytest.mark.parametrize("which", ["gamma", "eps"])
def test_rank_widening_one_element_constant_is_not_a_number(which):
    """LN(x) * [1,1,1,1] (or + eps of shape [1,1,1,1]) is rank 4: an RMSNorm written for it must
    be rank 4 too, or the LN is left alone."""
    nodes, inits = [], [init("W", _w(D, D))]
    nodes.append(helper.make_node("MatMul", ["x", "W"], ["h"]))
    _decomposed_ln(nodes, inits, "h", "y", "ln", gamma_shape=(1, 1, 1, 1) if which == "gamma" else (D,),
                   eps_shape=(1, 1, 1, 1) if which == "eps" else ())
    m = make_model(nodes, [vi("x", [1, N, D])], [vi("y", [1, 1, N, D])], inits, opset=13)
    out, _ = _optimize(m)
    x = RNG.standard_normal((1, N, D)).astype(np.float32)
    (ref,), (got,) = _run(m, {"x": x}), _run(out, {"x": x})
    assert got.shape == ref.shape == (1, 1, N, D)
    _equivalent(m, out)


def test_scalar_of_refuses_widening():
    m = make_model([helper.make_node("Add", ["x", "k"], ["y"])], [vi("x", [1, N, D])], [vi("y", None)],
                   [init("k", np.full((1, 1, 1, 1), 2.0, np.float32))])
    g = G.to_graph(m)
    add = g.nodes[0]
    assert scalar_of(add.inputs[1], add.inputs[0]) is None
    assert scalar_of(add.inputs[1], [1, 1, N, D]) == 2.0


def test_layerscale_of_higher_rank_is_not_folded():
    """s * (x W + b) with s of shape [1, 1, 1, d] widens the writer's output: folding s into W
    would write a rank-3 value where the Mul wrote rank 4."""
    nodes, inits = [], [init("W0", _w(D, D)), init("W1", _w(D, D)), init("b1", _w(D, scale=0.1)),
                        init("s", (0.5 + RNG.random((1, 1, 1, D))).astype(np.float32))]
    nodes.append(helper.make_node("MatMul", ["x", "W0"], ["h0"]))
    nodes.append(helper.make_node("LayerNormalization", ["h0", "ln0_g", "ln0_b"], ["l0"], axis=-1))
    inits += [init("ln0_g", _w(D, offset=1.0, scale=0.1)), init("ln0_b", _w(D, scale=0.1)),
              init("ln1_g", _w(D, offset=1.0, scale=0.1)), init("ln1_b", _w(D, scale=0.1))]
    nodes += [helper.make_node("MatMul", ["l0", "W1"], ["u0"]), helper.make_node("Add", ["u0", "b1"], ["u"]),
              helper.make_node("Mul", ["u", "s"], ["o"]), helper.make_node("Add", ["h0", "o"], ["h1"]),
              helper.make_node("LayerNormalization", ["h1", "ln1_g", "ln1_b"], ["y"], axis=-1)]
    m = make_model(nodes, [vi("x", [1, N, D])], [vi("y", [1, 1, N, D])], inits, opset=17)
    out, _ = _optimize(m)
    _equivalent(m, out)


# --- 2. casts --------------------------------------------------------------------------------------


def test_exact_widening_casts():
    import ml_dtypes

    assert exact_widening(np.float16, np.float32) and exact_widening(ml_dtypes.bfloat16, np.float32)
    assert exact_widening(np.float32, np.float64) and exact_widening(ml_dtypes.float8_e4m3fn, np.float16)
    for src, dst in [(np.float32, np.float16), (np.float32, ml_dtypes.bfloat16), (np.float64, np.float32),
                     (np.float16, ml_dtypes.bfloat16), (np.float32, ml_dtypes.float8_e4m3fn)]:
        assert not exact_widening(src, dst), (src, dst)


def _cast_stream(kind):
    """Pre-LN stream of two blocks and a final LN, every LN reading the stream through casts:
    "roundtrip" fp32 -> fp16 -> fp32, "narrow" fp32 -> fp16 (LN in fp16, cast back), "widen"
    fp16 -> fp32 (an fp16 model keeping its LNs in fp32, cast back). The writer's weight has a
    large column mean, so the stream carries a large per-token mean, and fp16 rounding of it is
    visible."""
    dt = np.float16 if kind == "widen" else np.float32
    et = TensorProto.FLOAT16 if kind == "widen" else TensorProto.FLOAT
    nodes, inits = [], [init("W0", _w(D, D, offset=4.0).astype(dt))]
    nodes.append(helper.make_node("MatMul", ["x", "W0"], ["h0"]))

    def cast_ln(x, i):
        lt = np.float16 if kind == "narrow" else np.float32
        inits.extend([init(f"g{i}", _w(D, offset=1.0, scale=0.1).astype(lt)), init(f"b{i}", _w(D, scale=0.1).astype(lt))])
        if kind == "roundtrip":
            nodes.extend([helper.make_node("Cast", [x], [f"c{i}"], to=TensorProto.FLOAT16),
                          helper.make_node("Cast", [f"c{i}"], [f"cc{i}"], to=TensorProto.FLOAT),
                          helper.make_node("LayerNormalization", [f"cc{i}", f"g{i}", f"b{i}"], [f"l{i}"], axis=-1)])
            return f"l{i}"
        to, back = (TensorProto.FLOAT16, TensorProto.FLOAT) if kind == "narrow" else (TensorProto.FLOAT, TensorProto.FLOAT16)
        nodes.extend([helper.make_node("Cast", [x], [f"cc{i}"], to=to),
                      helper.make_node("LayerNormalization", [f"cc{i}", f"g{i}", f"b{i}"], [f"l{i}"], axis=-1),
                      helper.make_node("Cast", [f"l{i}"], [f"lc{i}"], to=back)])
        return f"lc{i}"

    x = "h0"
    for i in range(2):
        inits.append(init(f"W{i + 1}", _w(D, D).astype(dt)))
        nodes += [helper.make_node("MatMul", [cast_ln(x, i), f"W{i + 1}"], [f"o{i}"]), helper.make_node("Add", [x, f"o{i}"], [f"h{i + 1}"])]
        x = f"h{i + 1}"
    nodes.append(helper.make_node("Relu", [cast_ln(x, 2)], ["y"]))
    return make_model(nodes, [vi("x", [1, N, D], et)], [vi("y", [1, N, D], et)], inits, opset=17)


@pytest.mark.parametrize("kind", ["roundtrip", "narrow"])
def test_narrowing_cast_does_not_commute_with_centering(kind):
    m = _cast_stream(kind)
    out, _ = _optimize(m)
    # centering the writer does not center the cast's output: each LN would need its own
    # explicit centering, which saves no mean, so both stay LayerNorms
    assert _ops(out).count("LayerNormalization") == 3, _ops(out)
    _equivalent(m, out)


def test_widening_cast_still_commutes():
    m = _cast_stream("widen")
    g = G.to_graph(m)
    cast = next(n for n in g.nodes if n.op == "Cast")
    assert forward_axis(cast, cast.inputs[0], 2) == 2
    out, _ = _optimize(m)
    assert "LayerNormalization" not in _ops(out)
    _equivalent(m, out)


def test_narrowing_cast_axis_is_untracked():
    m = _cast_stream("narrow")
    g = G.to_graph(m)
    cast = next(n for n in g.nodes if n.op == "Cast")
    assert forward_axis(cast, cast.inputs[0], 2) is None


# --- 3. values the graph exposes -------------------------------------------------------------------


def test_exposed_mean_of_existing_centering_is_not_folded():
    """h - ReduceMean(h) read by a Pre-LN stream, and the mean is a graph output: centering the
    writer would make that output about 0."""
    nodes, inits = [], [init("W0", _w(D, D, offset=1.0)), init("W1", _w(D, D)), init("g", _w(D, offset=1.0, scale=0.1)),
                        init("b", _w(D, scale=0.1)), init("g2", _w(D, offset=1.0, scale=0.1)), init("b2", _w(D, scale=0.1))]
    nodes += [helper.make_node("MatMul", ["x", "W0"], ["h"]),
              helper.make_node("ReduceMean", ["h"], ["mean"], axes=[-1], keepdims=1),
              helper.make_node("Sub", ["h", "mean"], ["hc"]),
              helper.make_node("LayerNormalization", ["h", "g", "b"], ["l"], axis=-1),
              helper.make_node("MatMul", ["l", "W1"], ["o"]), helper.make_node("Add", ["h", "o"], ["h1"]),
              helper.make_node("LayerNormalization", ["h1", "g2", "b2"], ["y"], axis=-1)]
    m = make_model(nodes, [vi("x", [1, N, D])], [vi("y", [1, N, D]), vi("mean", [1, N, 1]), vi("hc", [1, N, D])], inits, opset=17)
    out, _ = _optimize(m)
    _equivalent(m, out)


def test_layernorm_extra_outputs_that_are_graph_outputs():
    """LayerNormalization's Mean / InvStdDev read only as graph outputs: still read."""
    nodes = [helper.make_node("MatMul", ["x", "W0"], ["h"]),
             helper.make_node("LayerNormalization", ["h", "g", "b"], ["l"], axis=-1),
             helper.make_node("MatMul", ["l", "W1"], ["o"]), helper.make_node("Add", ["h", "o"], ["h1"]),
             helper.make_node("LayerNormalization", ["h1", "g", "b"], ["y", "mu", "isd"], axis=-1)]
    inits = [init("W0", _w(D, D, offset=1.0)), init("W1", _w(D, D)), init("g", _w(D, offset=1.0, scale=0.1)), init("b", _w(D, scale=0.1))]
    m = make_model(nodes, [vi("x", [1, N, D])], [vi("y", [1, N, D]), vi("mu", [1, N, 1]), vi("isd", [1, N, 1])], inits, opset=17)
    out, report = _optimize(m)
    assert [o.name for o in out.graph.output] == ["y", "mu", "isd"]
    _equivalent(m, out)
    # fuse_skip (the CUDA default fuses without timing) leaves such an LN unfused as well
    out2, _ = _optimize(m, provider="cuda", passes=["fuse_skip"])
    assert "SkipLayerNormalization" not in _ops(out2)


def test_batchnorm_statistics_outputs_that_are_graph_outputs():
    """BatchNormalization (opset 13) with its running mean/var and saved statistics as graph
    outputs: not an inference-time affine."""
    c = 4
    nodes = [helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["bn", "rm", "rv", "sm", "sv"]),
             helper.make_node("Conv", ["bn", "Wc"], ["y"])]
    inits = [init("g", _w(c, offset=1.0)), init("b", _w(c)), init("m", _w(c)), init("v", (0.5 + RNG.random(c)).astype(np.float32)),
             init("Wc", _w(3, c, 1, 1))]
    outs = [vi("y", [2, 3, 5, 5])] + [vi(n, None) for n in ("rm", "rv", "sm", "sv")]
    m = make_model(nodes, [vi("x", [2, c, 5, 5])], outs, inits, opset=13)
    out, _ = _optimize(m)
    assert "BatchNormalization" in _ops(out)
    _equivalent(m, out)


# --- 4. run-time semantics -------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["input", "true", "false", "absent"])
def test_dropout_training_mode(flag):
    ins = ["x", "ratio"]
    inputs, inits = [vi("x", [2, D])], [init("ratio", np.float32(0.5))]
    if flag == "input":
        inputs.append(vi("training", [], TensorProto.BOOL))
        ins.append("training")
    elif flag in ("true", "false"):
        inits.append(init("training", np.array(flag == "true")))
        ins.append("training")
    nodes = [helper.make_node("Dropout", ins, ["dr"]), helper.make_node("Relu", ["dr"], ["y"])]
    m = make_model(nodes, inputs, [vi("y", [2, D])], inits, opset=13)
    out, _ = _optimize(m)
    assert ("Dropout" in _ops(out)) == (flag in ("input", "true")), _ops(out)
    if flag == "input":  # it drops when the caller says so
        x = np.ones((2, D), np.float32)
        (y,), = [_run(out, {"x": x, "training": np.array(True)})]
        assert np.count_nonzero(y == 0) > 0


def _empty_reduce_model(op="ReduceMean"):
    """x + op(empty [0, d] constant over axis 0): ORT gives 0 for ReduceMean/ReduceSum."""
    nodes = [helper.make_node(op, ["e", "ax"], ["r"], keepdims=0), helper.make_node("Add", ["x", "r"], ["y"])]
    inits = [init("e", np.zeros((0, D), np.float32)), init("ax", np.array([0], np.int64))]
    return make_model(nodes, [vi("x", [1, N, D])], [vi("y", [1, N, D])], inits, opset=18)


@pytest.mark.parametrize("op", ["ReduceMean", "ReduceSum"])
def test_empty_reduction_is_not_folded_to_a_different_value(op):
    m = _empty_reduce_model(op)
    out, _ = _optimize(m)
    x = RNG.standard_normal((1, N, D)).astype(np.float32)
    (ref,), (got,) = _run(m, {"x": x}), _run(out, {"x": x})
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got, ref)


def test_folds_only_what_ort_computes_alike():
    """Constant Mod (sign rules), Cast of an out-of-range float to int8, integer Div by zero,
    float Range: left for ONNX Runtime. Plain shape arithmetic still folds."""
    nodes = [helper.make_node("Mod", ["a", "b"], ["mod"], fmod=0),
             helper.make_node("Cast", ["big"], ["bigi"], to=TensorProto.INT8),
             helper.make_node("Cast", ["mod"], ["modf"], to=TensorProto.FLOAT),
             helper.make_node("Cast", ["bigi"], ["bigf"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["x", "modf"], ["s1"]), helper.make_node("Add", ["s1", "bigf"], ["s2"]),
             helper.make_node("Shape", ["x"], ["shp"]), helper.make_node("Mul", ["shp", "one"], ["shp2"]),
             helper.make_node("Reshape", ["s2", "shp2"], ["y"])]
    inits = [init("a", np.array([-7, 7], np.int64)), init("b", np.array([3, -3], np.int64)),
             init("big", np.array([300.0, -1e10], np.float32)), init("one", np.array([1, 1], np.int64))]
    m = make_model(nodes, [vi("x", [N, 2])], [vi("y", [N, 2])], inits, opset=13)
    out, _ = _optimize(m, passes=["fold_constants"])
    ops = _ops(out)
    assert "Mod" in ops and ops.count("Cast") >= 2 and "Shape" not in ops and "Mul" not in ops


@pytest.mark.parametrize("gshape", [(1, D), (1,)], ids=["1xd", "one-element"])
def test_fuse_skip_needs_vector_gamma(gshape):
    """SkipLayerNormalization takes gamma as a vector of width d; a [1, d] or one-element scale
    that LayerNormalization broadcasts is not one: the Add + LN stays as it is."""
    nodes = [helper.make_node("Add", ["a", "s"], ["h"]),
             helper.make_node("LayerNormalization", ["h", "g", "b"], ["y"], axis=-1)]
    inits = [init("g", np.full(gshape, 1.3, np.float32)), init("b", _w(D, scale=0.1))]
    m = make_model(nodes, [vi("a", [1, N, D]), vi("s", [1, N, D])], [vi("y", [1, N, D])], inits, opset=17)
    out, _ = _optimize(m, provider="cuda", passes=["fuse_skip"])
    assert "SkipLayerNormalization" not in _ops(out)
    _equivalent(m, out)


@pytest.mark.parametrize("case", ["ratio-input", "is_test-0", "is_test-1"])
def test_dropout_ratio_and_old_is_test(case):
    """In inference mode the ratio does not matter (a run-time ratio is removable); before
    opset 7, is_test = 0 means training."""
    if case == "ratio-input":
        nodes = [helper.make_node("Dropout", ["x", "ratio"], ["dr"]), helper.make_node("Relu", ["dr"], ["y"])]
        m = make_model(nodes, [vi("x", [2, D]), vi("ratio", [])], [vi("y", [2, D])], opset=13)
        keep = False
    else:
        nodes = [helper.make_node("Dropout", ["x"], ["dr"], is_test=int(case.endswith("1"))), helper.make_node("Relu", ["dr"], ["y"])]
        m = make_model(nodes, [vi("x", [2, D])], [vi("y", [2, D])], opset=6, ir=3)
        keep = case == "is_test-0"
    out, _ = optimize_model(m, passes=["remove_identity"])
    assert ("Dropout" in _ops(out)) == keep


# --- containment with the on-demand snapshot ----------------------------------------------------


class _FailsInBranch(Pass):
    """Rewrites the main graph, then fails on the second graph it runs on (an If branch): the
    snapshot taken before the first rewrite must undo the main graph's change too."""

    name = "fails_in_branch"

    def analyze(self, graph, ctx):
        return Analysis(matches=[n for n in graph.nodes if n.op in ("Relu", "Neg")])

    def apply(self, graph, matches, ctx):
        for n in matches:
            if n.op == "Neg":
                raise RuntimeError("injected failure in a branch")
            n.op = "Sigmoid"
        return len(matches)


class _FailsInAnalysis(Pass):
    name = "fails_in_analysis"

    def analyze(self, graph, ctx):
        raise RuntimeError("injected analysis failure")


def test_failing_pass_is_rolled_back_with_on_demand_snapshot():
    then_g = helper.make_graph([helper.make_node("Neg", ["r"], ["t"])], "then", [], [vi("t", [2, D])])
    else_g = helper.make_graph([helper.make_node("Identity", ["r"], ["e"])], "else", [], [vi("e", [2, D])])
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("If", ["flag"], ["y"], then_branch=then_g, else_branch=else_g)]
    m = make_model(nodes, [vi("x", [2, D]), vi("flag", [], TensorProto.BOOL)], [vi("y", [2, D])], opset=17)
    for p in (_FailsInBranch(), _FailsInAnalysis()):
        out, report = Pipeline([p]).run(m, Context(tune=False))
        assert len(report.errors) == 1 and "injected" in report.errors[0]
        assert _ops(out) == ["Relu", "If"], _ops(out)
