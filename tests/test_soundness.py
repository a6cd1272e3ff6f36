"""Soundness (issue 11): every pattern an adversarial review found, as hand-built graphs. Each
is optimized with verification off and compared with ONNX Runtime running the original, on
unit-normal, per-token-offset and scaled inputs (compare's stress inputs); control flow is
driven both ways. A failing pass is contained; an internal error prints its whole message."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from normopt import io as nio
from normopt import optimize_model
from normopt.cli import main
from normopt.passes import build_pipeline
from normopt.pipeline import Analysis, Context, Pass, Pipeline
from normopt.runtime_tests.equivalence import compare
from normopt.runtime_tests.providers import make_session

from conftest import init, make_model, preln_stream_model, vi

RNG = np.random.default_rng(7)


def _w(*shape, scale=0.3):
    return (scale * RNG.standard_normal(shape)).astype(np.float32)


def _equivalent(model, out, **kw):
    res = compare(model, out, seeds=2, level="disable", **kw)
    assert res.equivalent, res.summary_lines()
    return res


def _ops(m):
    return [n.op_type for n in m.graph.node]


def _optimize_cli(m, tmp_path):
    """`normopt optimize` (verified) exits 0 and writes a model that passes the checker."""
    src, dst = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(m, src)
    r = CliRunner().invoke(main, ["optimize", str(src), "-o", str(dst), "--no-tune"])
    assert r.exit_code == 0, r.output
    out = onnx.load(dst)
    nio.check_model(out)
    return out


# --- 1. a stream value read inside an If branch whose output is a graph output -----------------


def _if_reading_stream(both_branches_expose=False):
    base = preln_stream_model(d=16, n=8, layers=2)
    g = base.graph
    # cond = sum(probe) > 1e4: never true for unit-normal inputs, true for probe * 1e5
    g.input.append(vi("probe", [4]))
    g.initializer.append(init("limit", np.float32(1e4)))
    g.node.extend([helper.make_node("ReduceSum", ["probe"], ["probe_sum"], keepdims=0),
                   helper.make_node("Greater", ["probe_sum", "limit"], ["cond"])])
    then_g = helper.make_graph([helper.make_node("Identity", ["h1"], ["then_out"])], "then", [], [vi("then_out", [1, 8, 16])])
    if both_branches_expose:
        else_nodes = [helper.make_node("Neg", ["h1"], ["else_out"])]
    else:
        else_nodes = [helper.make_node("Constant", [], ["else_out"], value=onnx.numpy_helper.from_array(np.zeros((1, 8, 16), np.float32)))]
    else_g = helper.make_graph(else_nodes, "else", [], [vi("else_out", [1, 8, 16])])
    g.node.append(helper.make_node("If", ["cond"], ["branch_out"], then_branch=then_g, else_branch=else_g))
    g.output.append(vi("branch_out", [1, 8, 16]))
    return base


@pytest.mark.parametrize("both", [False, True], ids=["one-branch-exposes", "both-expose"])
def test_stream_read_inside_if_is_never_rewritten_across(both):
    m = _if_reading_stream(both)
    out, report = optimize_model(m)
    _equivalent(m, out)
    ids = np.random.default_rng(0).integers(0, 32, (1, 8))
    for probe in (np.ones(4, np.float32), np.full(4, 1e5, np.float32)):  # else, then
        feeds = {"ids": ids, "probe": probe}
        a = make_session(m, "cpu", "disable").run(None, feeds)
        b = make_session(out, "cpu", "disable").run(None, feeds)
        for x, y in zip(a, b):
            np.testing.assert_allclose(y, x, atol=1e-4, rtol=1e-3)
    reasons = [d["reason"] for p in report.passes if p.name == "ln_to_rms" for d in p.declined]
    assert any("If" in r for r in reasons), reasons


# --- 2. an existing x - ReduceMean(x) beside LN(x) ------------------------------------------------


def test_existing_centering_is_reused_whole_or_left_alone():
    d, n = 16, 6
    nodes = [helper.make_node("Relu", ["x"], ["h"]),  # not centerable: an explicit centering goes here
             helper.make_node("LayerNormalization", ["h", "g1", "b1"], ["y1"], axis=-1),
             helper.make_node("LayerNormalization", ["h", "g2", "b2"], ["y2"], axis=-1),
             helper.make_node("LayerNormalization", ["h", "g3", "b3"], ["y3"], axis=-1),
             helper.make_node("ReduceMean", ["h"], ["hm"], axes=[-1], keepdims=1),
             helper.make_node("Sub", ["h", "hm"], ["hc"]),
             helper.make_node("MatMul", ["hc", "w"], ["y4"])]
    inits = [init(f"{k}{i}", _w(d) + (1.0 if k == "g" else 0.0)) for i in (1, 2, 3) for k in ("g", "b")] + [init("w", _w(d, d))]
    m = make_model(nodes, [vi("x", [1, n, d])], [vi(f"y{i}", [1, n, d]) for i in (1, 2, 3, 4)], inits)
    out, report = optimize_model(m)
    _equivalent(m, out)
    assert _ops(out).count("SimplifiedLayerNormalization") == 3  # converted, with one centering


# --- 3. a per-token gamma/beta [N, 1] with N == d -----------------------------------------------


@pytest.mark.parametrize("which", ["gamma", "beta"])
def test_per_token_gamma_or_beta_is_not_per_channel(which):
    d = n = 8
    nodes = [helper.make_node("Gather", ["table", "ids"], ["h"], axis=0),
             helper.make_node("ReduceMean", ["h"], ["m"], axes=[-1], keepdims=1), helper.make_node("Sub", ["h", "m"], ["c"]),
             helper.make_node("Pow", ["c", "two"], ["sq"]), helper.make_node("ReduceMean", ["sq"], ["v"], axes=[-1], keepdims=1),
             helper.make_node("Add", ["v", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["s"]),
             helper.make_node("Div", ["c", "s"], ["nrm"]), helper.make_node("Mul", ["nrm", "g"], ["gn"]),
             helper.make_node("Add", ["gn", "b"], ["y"]), helper.make_node("MatMul", ["y", "w"], ["mm"]),
             helper.make_node("Add", ["mm", "bias"], ["out"])]  # a bias, so a beta could fold into it
    g = _w(n, 1) + 1.0 if which == "gamma" else _w(d) + 1.0
    b = _w(n, 1) if which == "beta" else _w(d)
    inits = [init("table", _w(20, d, scale=1.0)), init("two", np.float32(2.0)), init("eps", np.float32(1e-5)), init("g", g),
             init("b", b), init("w", _w(d, 4)), init("bias", _w(4))]
    m = make_model(nodes, [vi("ids", [1, n], TensorProto.INT64)], [vi("out", [1, n, 4])], inits, opset=13)
    out, _ = optimize_model(m)
    _equivalent(m, out)
    # the per-token constant stays an op of its own after the norm, never the norm's scale or beta
    name = "g" if which == "gamma" else "b"
    assert any(name in n.input and n.op_type in ("Mul", "Add") for n in out.graph.node), [(n.op_type, list(n.input)) for n in out.graph.node]
    for n in out.graph.node:
        if n.op_type == "SimplifiedLayerNormalization":
            scale = next(i for i in out.graph.initializer if i.name == n.input[1])
            want = np.ones(8, np.float32) if which == "gamma" else g  # never the [N, 1] values flattened
            assert list(scale.dims) == [8] and np.allclose(onnx.numpy_helper.to_array(scale), want)


# --- 4. Gemm(x, W, C) -> Add(b) -> Mul(s): the backward fold scales C too ---------------------


def test_backward_fold_accounts_for_gemm_c_and_bias_add():
    nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["y0"], transB=1, alpha=0.8, beta=1.5),
             helper.make_node("Add", ["y0", "b"], ["y1"]), helper.make_node("Mul", ["y1", "s"], ["y2"]),
             helper.make_node("Relu", ["y2"], ["y"])]
    inits = [init("w", _w(6, 5)), init("c", _w(6)), init("b", _w(6)), init("s", _w(6) + 1.0)]
    m = make_model(nodes, [vi("x", [3, 5])], [vi("y", [3, 6])], inits)
    out, report = optimize_model(m)
    _equivalent(m, out)
    assert "Mul" not in _ops(out)


@pytest.mark.parametrize("bias_shape", [(1, 1, 6), (4, 6), (6,)], ids=["1x1xd", "Nxd", "d"])
def test_backward_fold_with_bias_of_any_broadcast_shape(bias_shape):
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y0"]), helper.make_node("Add", ["y0", "b"], ["y1"]),
             helper.make_node("Mul", ["y1", "s"], ["y2"]), helper.make_node("Add", ["y2", "t"], ["y3"]),
             helper.make_node("Relu", ["y3"], ["y"])]
    inits = [init("w", _w(5, 6)), init("b", _w(*bias_shape)), init("s", _w(6) + 1.0), init("t", _w(6))]
    m = make_model(nodes, [vi("x", [1, 4, 5])], [vi("y", [1, 4, 6])], inits)
    out, _ = optimize_model(m)
    _equivalent(m, out)


def test_conv_bias_c11_ahead_of_batchnorm():
    nodes = [helper.make_node("Conv", ["x", "w"], ["y0"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["y0", "b"], ["y1"]),
             helper.make_node("BatchNormalization", ["y1", "g", "beta", "rm", "rv"], ["y2"]),
             helper.make_node("Relu", ["y2"], ["y"])]
    c = 4
    inits = [init("w", _w(c, 3, 3, 3)), init("b", _w(c, 1, 1)), init("g", _w(c) + 1.0), init("beta", _w(c)), init("rm", _w(c)),
             init("rv", np.abs(_w(c)) + 0.5)]
    m = make_model(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", [1, c, 8, 8])], inits)
    out, _ = optimize_model(m)
    _equivalent(m, out)
    assert "BatchNormalization" not in _ops(out)


# --- 5. crms with a run-time gamma ---------------------------------------------------------------


def test_crms_with_runtime_gamma_is_declined_not_nan():
    m = preln_stream_model(d=16, n=8, layers=2)
    ln = next(n for n in m.graph.node if n.op_type == "LayerNormalization")
    ln.input[1] = "gamma_in"
    m.graph.input.append(vi("gamma_in", [16]))
    out, report = optimize_model(m, opt_in=["crms"])
    res = _equivalent(m, out)
    assert all(np.isfinite(o.max_abs) for o in res.outputs)


# --- 6. fuse_skip with a per-token [N, 1] bias ---------------------------------------------------


def test_skip_fusion_never_absorbs_a_per_token_bias():
    d = n = 8
    nodes = [helper.make_node("MatMul", ["x", "w"], ["u"]), helper.make_node("Add", ["u", "b"], ["ub"]),
             helper.make_node("Add", ["r", "ub"], ["s"]),
             helper.make_node("SimplifiedLayerNormalization", ["s", "g"], ["y"], axis=-1, epsilon=1e-5)]
    inits = [init("w", _w(d, d)), init("b", _w(n, 1)), init("g", _w(d) + 1.0)]
    m = make_model(nodes, [vi("x", [n, d]), vi("r", [n, d])], [vi("y", [n, d]), vi("s", [n, d])], inits,
                   extra_opsets=[("com.microsoft", 1)])
    out, _ = optimize_model(m, provider="cuda")  # the CUDA defaults fuse Skip ops (they run on CPU too)
    _equivalent(m, out)


# --- 7. patterns that crashed ----------------------------------------------------------------------


def test_affine_chain_over_a_broadcast_data_input():
    # x[B, N, 1] * s[d]: an outer product, not a per-channel affine of x (TF's gamma * rsqrt(var))
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[-1], keepdims=1), helper.make_node("Mul", ["m", "s"], ["ms"]),
             helper.make_node("Add", ["ms", "t"], ["y0"]), helper.make_node("MatMul", ["y0", "w"], ["y"])]
    inits = [init("s", _w(8) + 1.0), init("t", _w(8)), init("w", _w(8, 4))]
    m = make_model(nodes, [vi("x", [2, 5, 8])], [vi("y", [2, 5, 4])], inits)
    out, report = optimize_model(m)
    assert not report.errors, report.errors
    _equivalent(m, out)


def test_if_with_constant_condition_and_several_outputs():
    then_g = helper.make_graph([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["x"], ["b"])], "then", [],
                               [vi("a", [4]), vi("b", [4])])
    else_g = helper.make_graph([helper.make_node("Abs", ["x"], ["c"]), helper.make_node("Exp", ["x"], ["e"])], "else", [],
                               [vi("c", [4]), vi("e", [4])])
    nodes = [helper.make_node("If", ["cond"], ["o1", "o2"], then_branch=then_g, else_branch=else_g),
             helper.make_node("Add", ["o1", "o2"], ["y"])]
    m = make_model(nodes, [vi("x", [4])], [vi("y", [4])], [init("cond", np.array(True))])
    out, report = optimize_model(m)
    assert not report.errors, report.errors
    nio.check_model(out)
    _equivalent(m, out)


# --- contained failures ----------------------------------------------------------------------------


class _Boom(Pass):
    name = "boom"
    description = "a pass that fails half way through its rewrite"

    def analyze(self, graph, ctx):
        return Analysis(matches=[n for n in graph.nodes if n.op == "LayerNormalization"])

    def apply(self, graph, matches, ctx):
        matches[0].op = "Relu"  # damage the graph, then fail
        raise RuntimeError("injected failure\nwith a second line")


def test_a_failing_pass_is_rolled_back_and_the_pipeline_goes_on():
    m = preln_stream_model()
    out, report = Pipeline([_Boom(), *build_pipeline().passes]).run(m, Context(tune=False))
    assert report.errors and report.errors[0].startswith("internal error in boom: RuntimeError: injected failure with a second line")
    boom = report.passes[0]
    assert boom.error and boom.applied == 0
    _equivalent(m, out)
    assert "SimplifiedLayerNormalization" in _ops(out)  # the later passes still ran


def test_cli_exit_0_with_a_failing_pass_and_the_error_on_stderr(tmp_path, monkeypatch):
    from normopt.passes.fold_affine import FoldAffineNorms

    def boom(self, graph, ctx):
        raise RuntimeError("injected")

    monkeypatch.setattr(FoldAffineNorms, "analyze", boom)
    src, dst = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(preln_stream_model(), src)
    r = CliRunner().invoke(main, ["optimize", str(src), "-o", str(dst), "--no-tune"])
    assert r.exit_code == 0, r.output
    assert "internal error in fold_affine: RuntimeError: injected" in r.stderr
    assert dst.exists()


def test_internal_error_message_is_never_cut(tmp_path, monkeypatch):
    import normopt.api

    def broken(*a, **k):
        raise RuntimeError("first part\nsecond part\nthird part")

    monkeypatch.setattr(normopt.api, "optimize", broken)
    src = tmp_path / "m.onnx"
    onnx.save(preln_stream_model(), src)
    r = CliRunner().invoke(main, ["optimize", str(src), "-o", str(tmp_path / "o.onnx")])
    assert r.exit_code == 3
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "first part" in lines[0] and "second part" in lines[0] and "third part" in lines[0], r.stderr


# --- 9. crms and a mean-invariant reader it cannot narrow ------------------------------------------


def test_crms_declines_a_stream_an_existing_centering_reads():
    """ln_to_rms may keep an x - mean(x) beside the stream's LNs (mean-invariant); crms would
    leave it reading d-1 channels as if they were d."""
    m = preln_stream_model(d=16, n=8, layers=2)
    g = m.graph
    g.node.extend([helper.make_node("ReduceMean", ["h1"], ["cm"], axes=[-1], keepdims=1),
                   helper.make_node("Sub", ["h1", "cm"], ["cc"]),
                   helper.make_node("Mul", ["cc", "cc"], ["cq"]),
                   helper.make_node("ReduceMean", ["cq"], ["cvar"], axes=[-1], keepdims=0)])
    g.output.append(vi("cvar", [1, 8]))
    out, report = optimize_model(m, opt_in=["crms"])
    _equivalent(m, out)
    reasons = [d["reason"] for p in report.passes if p.name == "crms" for d in p.declined]
    assert any("d-1 channels" in r for r in reasons), reasons
    assert _ops(out).count("SimplifiedLayerNormalization") == 3  # ln_to_rms still converts


# --- 10. a declared graph-output shape that symbolic inference cannot give --------------------------


def test_a_declared_output_shape_survives_when_inference_gives_none(tmp_path):
    m = preln_stream_model(d=16, n=8, layers=2, opset=18)
    g = m.graph
    g.initializer.append(init("rss_axes", np.array([-1], np.int64)))
    g.node.append(helper.make_node("ReduceSumSquare", ["final", "rss_axes"], ["rss"], keepdims=0))
    g.output.append(vi("rss", [1, 8]))
    out = _optimize_cli(m, tmp_path)
    rss = next(o for o in out.graph.output if o.name == "rss")
    assert [d.dim_value for d in rss.type.tensor_type.shape.dim] == [1, 8]
    _equivalent(m, out)


# --- 11. initializers that are also graph inputs (IR >= 4: overridable defaults) --------------------


def test_overridable_initializers_stay_inputs_and_are_never_rewritten():
    m = preln_stream_model(d=16, n=8, layers=2)
    overridable = ["l1_w2", "l1_b2"]
    for name in overridable:
        t = next(t for t in m.graph.initializer if t.name == name)
        m.graph.input.append(vi(name, list(t.dims)))
    out, report = optimize_model(m)
    assert [i.name for i in out.graph.input] == [i.name for i in m.graph.input]
    assert {t.name for t in out.graph.initializer} >= set(overridable)
    _equivalent(m, out)
    # a caller's own values: the optimized model must compute what the original computes with them
    rng = np.random.default_rng(3)
    feeds = {"ids": rng.integers(0, 32, (1, 8)), "l1_w2": _w(32, 16), "l1_b2": np.full(16, 3.0, np.float32)}
    a = make_session(m, "cpu", "disable").run(None, feeds)
    b = make_session(out, "cpu", "disable").run(None, feeds)
    for x, y in zip(a, b):
        np.testing.assert_allclose(y, x, atol=1e-4, rtol=1e-3)
    assert any("overridable initializers" in n for n in report.notes), report.notes


def test_ir3_initializers_listed_as_inputs_are_constants(tmp_path):
    """Below IR 4 every initializer is listed as an input and is a constant: it is optimized, and
    the output (opset 13 after the upgrade) is a valid model of the IR its opsets need."""
    m = preln_stream_model(d=16, n=8, layers=2, ln_form="div", opset=11)
    have = {i.name for i in m.graph.input}
    for t in m.graph.initializer:
        if t.name not in have:
            m.graph.input.append(vi(t.name, list(t.dims), t.data_type))
    m.ir_version = 3
    out = _optimize_cli(m, tmp_path)
    assert out.ir_version >= 7 and [i.name for i in out.graph.input] == ["ids"]
    assert _ops(out).count("SimplifiedLayerNormalization") == 3
