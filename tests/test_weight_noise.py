"""The judge's weight-rounding allowance (equivalence.weight_sensitivity, docs/verification.md).

A fold stores each folded weight rounded to its dtype, so the candidate computes the exact
function of weights within rounding of the exact folded ones. An output that moves by S when the
original's weights move by an ulp cannot be judged tighter than about S, however close to exact
the original happened to land. The long fuzz profile found one (fuzz_2b70bb10db2d): a LayerNorm's
Mean output, a per-token mean that cancels to a small value, 1 ulp from exact in the original
and 70 ulps in the folded candidate, whose stream is as exact as the original's.

These tests pin that the allowance is sound (planted mutants are refused with and without it,
and when it is drawn on every set), that it is drawn only for a set that fails without it, that
the weights it perturbs are restored bit for bit, and that the case is now written and verifies."""

from __future__ import annotations

import os
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from normopt import optimize_model
from normopt.runtime_tests import equivalence as E
from normopt.runtime_tests import exact as X
from normopt.runtime_tests.equivalence import compare, exact_judgement

from conftest import init, make_model, run_cli, vi

CASE = os.path.join(os.path.dirname(__file__), "regressions", "fuzz_2b70bb10db2d.onnx")
MEAN = "layernormalization_227"


@pytest.fixture(scope="module")
def case():
    m = onnx.load(CASE)
    out, _ = optimize_model(m)
    return m, out


def _counting(monkeypatch):
    """Counts every float64 evaluation (ExactRunner._run) and the perturbed ones among them."""
    runs = {"all": 0, "weights": 0}
    real_run, real_noise = X.ExactRunner._run, X.ExactRunner.weight_noise

    def run(self, f):
        runs["all"] += 1
        return real_run(self, f)

    def noise(self, *a, **k):
        before = runs["all"]
        out = real_noise(self, *a, **k)
        runs["weights"] += runs["all"] - before
        return out

    monkeypatch.setattr(X.ExactRunner, "_run", run)
    monkeypatch.setattr(X.ExactRunner, "weight_noise", noise)
    return runs


def test_the_case_fails_without_the_allowance_and_passes_with_it(case, monkeypatch):
    m, out = case
    monkeypatch.setattr(E, "WEIGHT_NOISE", False)
    old = compare(m, out, seeds=2, level="disable")
    assert not old.equivalent
    assert [o.name for o in old.outputs if not o.passed] == [MEAN]
    monkeypatch.setattr(E, "WEIGHT_NOISE", True)
    new = compare(m, out, seeds=2, level="disable")
    assert new.equivalent, new.summary_lines()
    mean = next(o for o in new.outputs if o.name == MEAN)
    assert mean.by_weights == old.outputs[[o.name for o in old.outputs].index(MEAN)].failed_on
    # the user sees it: the row, a note, and the judge line
    text = "\n".join(new.summary_lines())
    assert "within weight rounding on " in text and "passes only within the weight-rounding allowance" in text
    assert "rounding of its weights" in new.judge
    # the numbers: the original lands far closer to exact than weight rounding moves the mean
    assert mean.weight_noise is not None and mean.weight_noise > 10 * mean.err_orig
    assert mean.err_cand < mean.bound


def test_the_case_is_written_and_verifies(tmp_path):
    """`normopt optimize` writes it, and `normopt verify` passes the written model against the
    original (the CLI's load check asks graph outputs for a shape: shape inference gives the
    three the fuzzer left without one)."""
    m = onnx.load(CASE)
    inferred = {o.name: o for o in onnx.shape_inference.infer_shapes(m).graph.output}
    for o in m.graph.output:
        if not o.type.tensor_type.HasField("shape"):
            o.CopyFrom(inferred[o.name])
    src, dst = tmp_path / "case.onnx", tmp_path / "out.onnx"
    onnx.save(m, str(src))
    res = run_cli("optimize", src, "-o", dst)
    assert res.returncode == 0, res.stdout + res.stderr
    assert dst.exists()
    res = run_cli("verify", src, dst)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "EQUIVALENT" in res.stdout


def test_not_drawn_where_everything_passes(monkeypatch):
    """A candidate that passes without the allowance costs no float64 run more: one per input
    set (the plan's trial run is seed 0's)."""
    runs = _counting(monkeypatch)
    m, w = _mlp()
    res = compare(m, _with(m, "W1", w["W1"] * 1.0), seeds=2)
    assert res.equivalent, res.summary_lines()
    assert runs["all"] == len(res.inputs) and runs["weights"] == 0
    assert "weight noise draws" not in res.timings and "rounding of its weights" not in res.judge


def test_drawn_only_on_the_sets_that_fail_without_it(case, monkeypatch):
    m, out = case
    monkeypatch.setattr(E, "WEIGHT_NOISE", False)
    failing = {s for o in compare(m, out, seeds=2, level="disable").outputs for s in o.failed_on}
    assert failing
    monkeypatch.setattr(E, "WEIGHT_NOISE", True)
    runs = _counting(monkeypatch)
    res = compare(m, out, seeds=2, level="disable")
    assert res.equivalent
    assert runs["weights"] == E.NOISE_DRAWS * len(failing)
    assert runs["all"] == len(res.inputs) + runs["weights"]
    # a second comparison against the same reference reuses the draws
    cache = {}
    compare(m, out, seeds=2, level="disable", ref_cache=cache)
    n = runs["weights"]
    again = compare(m, out, seeds=2, level="disable", ref_cache=cache)
    assert again.equivalent and runs["weights"] == n


# ---------------------------------------------------------------------------------------------
# soundness: planted mutants


def _refused_everywhere(orig, mutant, monkeypatch, what):
    """Refused without the allowance, with it (lazily, as optimize runs), and with it (and the
    input noise) drawn on every input set."""
    for weight_noise, eager in ((False, False), (True, False), (True, True)):
        monkeypatch.setattr(E, "WEIGHT_NOISE", weight_noise)
        monkeypatch.setattr(E, "EAGER_NOISE", eager)
        res = compare(orig, mutant, seeds=2, level="disable")
        assert res.mode == "exact"
        assert not res.equivalent, f"{what} accepted (weight noise {weight_noise}, eager {eager}): {res.summary_lines()}"


def _planted(orig, out):
    from test_fuzz import _reaches_an_output
    from test_proof import mutants

    kinds = {"channel x1.02", "element x1.0005", "bias element moved", "epsilon changed", "centering dropped"}
    return [(kind, m) for kind, m in mutants(orig, out) if kind in kinds and _reaches_an_output(out, m)]


def test_the_cases_mutants_are_refused(case, monkeypatch):
    m, out = case
    planted = _planted(m, out)
    kinds = {k for k, _ in planted}
    assert {"channel x1.02", "element x1.0005", "bias element moved", "epsilon changed"} <= kinds, kinds
    for kind, mutant in planted:
        _refused_everywhere(m, mutant, monkeypatch, kind)


@pytest.fixture(scope="module")
def builder_models(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from normopt.api import optimize
    from normopt.models import builders as B
    from normopt.models.export import example_inputs, export

    d = tmp_path_factory.mktemp("wn")
    out = {}
    torch.manual_seed(0)  # the same weights at every run
    for name, model in {"vit": B.vit(layers=2), "unified": B.unified(layers=2)}.items():
        src, dst = str(d / f"{name}.onnx"), str(d / f"{name}_opt.onnx")
        export(model, example_inputs(model, batch=1), src)
        assert optimize(src, dst, verify=False, tune=False).report.changed()
        out[name] = (onnx.load(src), onnx.load(dst))
    return out


@pytest.mark.parametrize("name", ["vit", "unified"])
def test_builder_models_mutants_are_refused(builder_models, name, monkeypatch):
    orig, out = builder_models[name]
    assert compare(orig, out, seeds=2, level="disable").equivalent
    planted = [(k, m) for k, m in _planted(orig, out) if k != "element x1.0005"]
    # one element x1.0005: where the planter's element (a third into a tensor) reaches the output
    # at a few ulps, no judge can tell it from rounding (the judge without the allowance accepts
    # some); so the element of each matrix with the largest |w|, kept where it moves the output
    # most, far beyond rounding
    from test_fuzz import _outputs_pair

    best = None
    for t in out.graph.initializer:
        a = onnx.numpy_helper.to_array(t)
        if a.ndim == 2 and a.dtype == np.float32 and a.size:
            b = a.astype(np.float64)
            b.reshape(-1)[int(np.argmax(np.abs(a)))] *= 1.0005
            mutant = _with(out, t.name, b)
            moved = max(float(np.abs(x.astype(np.float64) - y).max() / np.sqrt(np.mean(np.square(x.astype(np.float64)))))
                        for x, y in _outputs_pair(out, mutant) if x.dtype.kind == "f" and x.size)
            if best is None or moved > best[0]:
                best = (moved, mutant)
    assert best[0] > 2e-5, best[0]  # 170 ulps of the output RMS
    planted.append(("element x1.0005", best[1]))
    kinds = {k for k, _ in planted}
    assert {"channel x1.02", "element x1.0005", "bias element moved"} <= kinds, kinds
    if name == "vit":
        assert {"epsilon changed", "centering dropped"} <= kinds, kinds
    for kind, mutant in planted:
        _refused_everywhere(orig, mutant, monkeypatch, f"{name} {kind}")


# ---------------------------------------------------------------------------------------------
# the mechanism


def _mlp():
    rng = np.random.default_rng(7)
    w = {"W1": rng.standard_normal((16, 32)).astype(np.float32) / 4, "b1": rng.standard_normal(32).astype(np.float32),
         "W2": rng.standard_normal((32, 16)).astype(np.float32) / 4, "two": np.array(2.0, np.float32),
         "limit": np.array(0.5, np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["r", "W2"], ["y"]),
             helper.make_node("Pow", ["y", "two"], ["p"]),  # y < 0 somewhere: y ** (2 + 1 ulp) is NaN there
             helper.make_node("Greater", ["y", "limit"], ["g"])]
    m = make_model(nodes, [vi("x", [4, 16])], [vi("y", [4, 16]), vi("p", [4, 16]), vi("g", [4, 16], TensorProto.BOOL)],
                   [init(k, v) for k, v in w.items()])
    return m, w


def _with(m, name, arr):
    c = onnx.ModelProto()
    c.CopyFrom(m)
    t = next(t for t in c.graph.initializer if t.name == name)
    t.CopyFrom(onnx.numpy_helper.from_array(np.asarray(arr, np.float32), name))
    return c


def test_weight_noise_moves_continuous_weights_and_restores_them_bit_for_bit():
    m, w = _mlp()
    runner = X.ExactRunner(m, ["y", "p", "g"])
    assert runner.available
    assert X.continuous_weights(m.graph, runner._weights) == {"W1", "b1", "W2"}  # not an exponent, not a threshold
    before = {k: v.copy() for k, v in runner._weights.items()}
    feeds = {"x": np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)}
    base = runner.run(feeds)
    moved = runner.weight_noise(feeds, base, 3, 0)
    assert runner.weight_runs == 3
    for k, v in before.items():
        assert np.array_equal(runner._weights[k], v), k  # restored exactly
    assert [np.array_equal(a, b) for a, b in zip(runner.run(feeds), base)] == [True] * 3
    y, p, g = moved
    assert g is None  # not a float
    x64 = feeds["x"].astype(np.float64)
    # about an ulp of each weight: the movement is of the order of eps x |the products summed|
    scale = np.abs(np.maximum(x64 @ w["W1"].astype(np.float64) + w["b1"], 0)) @ np.abs(w["W2"].astype(np.float64))
    assert 0 < y.max() < 20 * float(np.finfo(np.float32).eps) * scale.max()
    assert np.isfinite(p).all()  # the exponent stayed 2


def test_fp16_weights_are_restored_exactly():
    runner = X.ExactRunner.__new__(X.ExactRunner)
    rng = np.random.default_rng(3)
    a = (rng.standard_normal(5000) * np.exp(rng.uniform(-8, 8, 5000))).astype(np.float16)
    b = (rng.standard_normal(5000) * np.exp(rng.uniform(-60, 60, 5000))).astype(np.float32)
    a[:3], b[:3] = [65504, 6e-8, -0.0], [np.finfo(np.float32).max, 1e-45, np.inf]
    runner._weights = {"a": a.astype(np.float64), "b": b.astype(np.float64)}
    runner._dtypes = {"a": np.dtype(np.float16), "b": np.dtype(np.float32)}
    runner._noisy, runner._graph = {"a", "b"}, None
    keep = {k: v.copy() for k, v in runner._weights.items()}
    undo = runner._perturb(11)
    nz = keep["a"] != 0
    rel = np.abs(runner._weights["a"][nz] / keep["a"][nz] - 1)
    assert 0 < np.median(rel) < 2 * 2.0 ** -10
    undo()
    for k in keep:
        assert np.array_equal(runner._weights[k], keep[k]) and np.array_equal(np.signbit(runner._weights[k]), np.signbit(keep[k]))


def test_a_sensitive_block_does_not_excuse_another():
    """The weight sensitivity is per element: a block judged on its own takes the sensitivity
    of its own elements, not the output's largest (which would excuse an error elsewhere)."""
    rng = np.random.default_rng(5)
    e = rng.standard_normal((64, 32))
    o = e + 1e-7 * rng.standard_normal(e.shape)
    c = o.copy()
    c[:, 1] += 5e-5  # a planted error in channel 1, far above the original's error there
    ws = np.full(e.shape, 1e-7)
    ws[:, 0] = 1e-3  # channel 0 is very sensitive to its weights
    ok_scalar_style = exact_judgement(o, c, e, sensitivity=1e-3)[0]
    assert ok_scalar_style  # a whole-output number would excuse channel 1
    ok, err_o, err_c, bound, why = exact_judgement(o, c, e, weights=ws)
    assert not ok and "channel 1" in why
    assert exact_judgement(o, o + 1e-6 * (np.arange(32) == 0), e, weights=ws)[0]  # channel 0's own allowance


def test_float_constant_nodes_are_weights_too():
    """A float Constant node's value is fed like an initializer, so the draws move it (and put
    it back); the function is unchanged."""
    rng = np.random.default_rng(9)
    w = rng.standard_normal((8, 8)).astype(np.float32)
    nodes = [helper.make_node("Constant", [], ["W"], value=onnx.numpy_helper.from_array(w, "W")),
             helper.make_node("Constant", [], ["c"], value_float=0.25),
             helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "c"], ["y"])]
    m = make_model(nodes, [vi("x", [2, 8])], [vi("y", [2, 8])])
    runner = X.ExactRunner(m, ["y"])
    assert {"W", "c"} <= set(runner._weights) and not any(n.op_type == "Constant" for n in runner.model.graph.node)
    feeds = {"x": rng.standard_normal((2, 8)).astype(np.float32)}
    (y,) = runner.run(feeds)
    np.testing.assert_allclose(y, feeds["x"].astype(np.float64) @ w.astype(np.float64) + 0.25, rtol=1e-12, atol=1e-12)
    (moved,) = runner.weight_noise(feeds, [y], 3, 0)
    assert 0 < moved.max() < 1e-5
    assert np.array_equal(runner.run(feeds)[0], y)


def test_a_big_models_draws_build_their_own_runner(case, monkeypatch):
    """Over BIG_BYTES the float64 session is freed before the candidate's is built (never two
    at once); the draws then build one of their own, with the same verdict and numbers."""
    m, out = case
    small = compare(m, out, seeds=2, level="disable")
    monkeypatch.setattr(E, "BIG_BYTES", -1)
    built = []
    real = X.ExactRunner.__init__

    def init_(self, *a, **k):
        built.append(1)
        real(self, *a, **k)

    monkeypatch.setattr(X.ExactRunner, "__init__", init_)
    big = compare(m, out, seeds=2, level="disable")
    assert big.equivalent and len(built) == 2  # the exact answer's, then the draws'
    assert [(o.name, o.by_weights, o.bound) for o in big.outputs] == [(o.name, o.by_weights, o.bound) for o in small.outputs]
