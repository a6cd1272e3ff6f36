"""normopt.proof: optimize outputs prove; planted mutants of them do not; rewrites without a
rule say so. The prover never runs a model: these tests build small graphs, optimize them in
memory and ask prove(original, optimized)."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from conftest import make_model, preln_stream_model, run_cli, vi
from normopt import io as nio
from normopt.api import optimize_model
from normopt.proof import prove

CORPUS = os.path.join(os.path.dirname(__file__), "corpus")


# ------------------------------------------------------------------------------ models

STREAM_VARIANTS = {
    "op": {},
    "gemm_writer": dict(gemm_writer=True),
    "tied_reader": dict(tied_reader=True),
    "div": dict(ln_form="div"),
    "recip": dict(ln_form="recip"),
    "keepdims0": dict(ln_form="keepdims0"),
    "opset18": dict(ln_form="div", opset=18),
    "fp16": dict(dtype=np.float16),
}

TARGETS = {"ort": {}, "onnx": dict(target="onnx"), "skip_fusion": dict(provider="cuda"), "beta_kept": dict(options={"fold_beta": False})}


@pytest.mark.parametrize("target", sorted(TARGETS))
@pytest.mark.parametrize("variant", sorted(STREAM_VARIANTS))
def test_stream_outputs_prove(variant, target):
    m = preln_stream_model(**STREAM_VARIANTS[variant])
    out, report = optimize_model(m, **TARGETS[target])
    assert any(p.applied for p in report.passes if p.name == "ln_to_rms")
    res = prove(m, out)
    assert res.proved, res.summary
    assert res.summary.startswith("proved: ") and res.details["norms_converted"] >= 1


@pytest.fixture(scope="module")
def builder_models(tmp_path_factory):
    pytest.importorskip("torch")
    from normopt.models import builders as B
    from normopt.models.export import example_inputs, export

    d = tmp_path_factory.mktemp("proof_builders")
    out = {}
    for name, build in [("gpt", B.gpt), ("vit", B.vit), ("slab", B.slab), ("unified", B.unified), ("bert", B.bert),
                        ("norm_after_linear", B.norm_after_linear)]:
        model = build()
        p = str(d / f"{name}.onnx")
        export(model, example_inputs(model), p)
        out[name] = p
    return out


BUILDER_KINDS = {"gpt": "norms_converted", "vit": "norms_converted", "slab": "affine_folds", "unified": "affine_folds",
                 "bert": "norms_converted", "norm_after_linear": "affine_folds"}


@pytest.mark.parametrize("name", sorted(BUILDER_KINDS))
def test_builder_outputs_prove(builder_models, name):
    orig = nio.load_model(builder_models[name]).model
    for kw in ({}, dict(provider="cuda"), dict(target="onnx")):
        out, _ = optimize_model(orig, **kw)
        res = prove(orig, out)
        assert res.proved, (kw, res.summary)
        assert res.details[BUILDER_KINDS[name]] >= 1, res.summary


@pytest.mark.parametrize("name", ["genai_phi_fp32_cpu.onnx", "genai_phi_int4_cpu.onnx", "paddle_preln_enc_op11.onnx",
                                  "paddle_svtr_rec_op11.onnx"])
def test_corpus_outputs_prove(name):
    orig = nio.load_model(os.path.join(CORPUS, name)).model
    out, _ = optimize_model(orig)
    res = prove(orig, out)
    assert res.proved, res.summary


# ------------------------------------------------------------------------------ mutants


def _with_init(model, name, arr):
    m = copy.deepcopy(model)
    for t in m.graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(arr.astype(numpy_helper.to_array(t).dtype), name))
    return m


def _changed_floats(orig, opt):
    o = {t.name: numpy_helper.to_array(t) for t in orig.graph.initializer}
    out = []
    for t in opt.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.dtype.kind == "f" and (t.name not in o or o[t.name].shape != a.shape or not np.array_equal(o[t.name], a)):
            out.append((t.name, a))
    return out


def mutants(orig, opt):
    """(kind, mutant) pairs planted into an optimized model: one per kind and target."""
    orig_inits = {t.name: numpy_helper.to_array(t) for t in orig.graph.initializer}
    changed = _changed_floats(orig, opt)
    floats = [(t.name, numpy_helper.to_array(t)) for t in opt.graph.initializer if t.data_type in (1, 10)]
    for pool in (changed, floats):
        for name, a in [x for x in pool if x[1].ndim >= 2 and x[1].size][:2]:  # an empty tensor has no element to mutate
            b = a.astype(np.float64)
            b[..., 0] *= 1.02
            if not np.array_equal(b.astype(a.dtype), a):  # a zero channel stays itself: no mutant
                yield "channel x1.02", _with_init(opt, name, b)
            b = a.astype(np.float64)
            b.reshape(-1)[b.size // 3] *= 1.0005
            if b.reshape(-1)[b.size // 3] != a.reshape(-1)[a.size // 3]:
                yield "element x1.0005", _with_init(opt, name, b)
        for name, a in [x for x in pool if x[1].ndim == 1 and x[1].size > 2][:2]:
            b = a.copy()
            b[[0, 1]] = b[[1, 0]]
            if not np.array_equal(a, b):
                yield "bias element moved", _with_init(opt, name, b)
    for n in opt.graph.node:
        if any(a.name == "epsilon" for a in n.attribute):
            m = copy.deepcopy(opt)
            node = next(x for x in m.graph.node if x.name == n.name and x.output == n.output)
            next(a for a in node.attribute if a.name == "epsilon").f *= 10
            yield "epsilon changed", m
        if n.op_type == "Transpose" and any(a.name == "perm" for a in n.attribute):
            perm = list(helper.get_attribute_value(next(a for a in n.attribute if a.name == "perm")))
            if len(perm) >= 2 and perm[-1] != perm[-2]:
                m = copy.deepcopy(opt)
                node = next(x for x in m.graph.node if x.output == n.output)
                perm[-1], perm[-2] = perm[-2], perm[-1]
                del node.attribute[:]
                node.attribute.append(helper.make_attribute("perm", perm))
                yield "transpose perm swapped", m
    for t in opt.graph.initializer:
        if t.name.endswith("_centered") and t.name[: -len("_centered")] in orig_inits:
            o = orig_inits[t.name[: -len("_centered")]]
            if o.shape == tuple(t.dims):
                yield "centering dropped", _with_init(opt, t.name, o.astype(np.float64))


def _mutant_check(orig, opt, need):
    res = prove(orig, opt)
    assert res.proved, res.summary
    kinds = {}
    for kind, m in mutants(orig, opt):
        res = prove(orig, m)
        assert not res.proved, f"{kind} mutant proved: {res.summary}"
        assert res.summary.startswith("not proved: ")
        kinds[kind] = kinds.get(kind, 0) + 1
    assert need <= set(kinds), f"mutant kinds planted: {kinds}"
    return kinds


ALL_KINDS = {"channel x1.02", "element x1.0005", "bias element moved", "epsilon changed", "centering dropped"}


@pytest.mark.parametrize("variant", ["op", "div", "gemm_writer"])
def test_stream_mutants_are_refused(variant):
    m = preln_stream_model(**STREAM_VARIANTS[variant])
    out, _ = optimize_model(m)
    _mutant_check(m, out, ALL_KINDS)


@pytest.mark.parametrize("name", ["gpt", "vit", "slab", "unified"])
def test_builder_mutants_are_refused(builder_models, name):
    orig = nio.load_model(builder_models[name]).model
    out, _ = optimize_model(orig)
    # load the output's weights in memory so mutants can edit them
    out = onnx.load_from_string(_inline(out).SerializeToString())
    need = {"channel x1.02", "element x1.0005", "bias element moved", "transpose perm swapped"}
    if name in ("gpt", "vit"):
        need |= {"epsilon changed", "centering dropped"}
    _mutant_check(_inline(orig), out, need)


def test_dynamic_batch_unified_norm_proves_and_its_mutants_are_refused(tmp_path):
    """A dynamic-batch UN export moves its channels through Transpose, Unsqueeze, the affine,
    Squeeze and Transpose of a tensor whose batch is symbolic: (Un)Squeeze map axes by their
    axes, not by matching non-unit dims, which a symbolic dim hides."""
    pytest.importorskip("torch")
    from normopt.models import builders as B
    from normopt.models.export import example_inputs, export

    model = B.unified("tiny")
    inputs = example_inputs(model, batch=2, seq=16)
    src = str(tmp_path / "un.onnx")
    export(model, inputs, src, dynamic_axes={k: {0: "batch"} for k in inputs})
    orig = onnx.load(src)
    assert any(n.op_type == "Squeeze" for n in orig.graph.node)
    out, _ = optimize_model(orig, shapes={"batch": (2,)})
    _mutant_check(orig, onnx.load_from_string(_inline(out).SerializeToString()),
                  {"channel x1.02", "element x1.0005", "bias element moved"})


def _resized_position_table_model(d=16, side=3, seed=0):
    """DINOv2's interpolate_pos_encoding, small: a position grid Resized to a size that float ops
    compute (the tracker follows integers only), added to a Pre-LN stream, and the token count
    read back from a Shape downstream."""
    from onnx import TensorProto as TP, helper as h
    rng = np.random.default_rng(seed)
    n = side * side + 1
    inits = [numpy_helper.from_array(rng.standard_normal((1, n - 1, d)).astype(np.float32) * 0.02, "table"),
             numpy_helper.from_array(rng.standard_normal((1, 1, d)).astype(np.float32) * 0.02, "cls_pos"),
             numpy_helper.from_array(rng.standard_normal((d, d)).astype(np.float32) * 0.1, "W"),
             numpy_helper.from_array(rng.standard_normal((d, d)).astype(np.float32) * 0.1, "W2"),
             numpy_helper.from_array(np.array(float(side), np.float32), "fside"), numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array([1, d], np.int64), "lead"), numpy_helper.from_array(np.array([1, side, side, d], np.int64), "grid"),
             numpy_helper.from_array(np.array([1, -1, d], np.int64), "flat"),
             numpy_helper.from_array(rng.standard_normal(d).astype(np.float32), "g"), numpy_helper.from_array(rng.standard_normal(d).astype(np.float32), "b"),
             numpy_helper.from_array(np.array([0], np.int64), "i0"), numpy_helper.from_array(np.array([1], np.int64), "i1"), numpy_helper.from_array(np.array([2], np.int64), "i2"),
             numpy_helper.from_array(np.array([-1], np.int64), "m1"), numpy_helper.from_array(np.array(0, np.int64), "s0"),
             numpy_helper.from_array(np.array(1, np.int64), "s1")]
    nodes = [
        # the grid side computed by float ops (Pow: the tracker follows only integers), as DINOv2's
        # interpolate_pos_encoding does: sizes = Cast(Pow(side, 1)) -> Resize of the position grid
        h.make_node("Pow", ["fside", "one"], ["sidef"]), h.make_node("Cast", ["sidef"], ["side64"], to=TP.INT64),
        h.make_node("Unsqueeze", ["side64", "i0"], ["side1"]),
        h.make_node("Concat", ["lead", "side1", "side1"], ["sizes"], axis=0),
        h.make_node("Reshape", ["table", "grid"], ["t4"]), h.make_node("Transpose", ["t4"], ["t4t"], perm=[0, 3, 1, 2]),
        h.make_node("Resize", ["t4t", "", "", "sizes"], ["rs"], mode="cubic", coordinate_transformation_mode="half_pixel"),
        h.make_node("Transpose", ["rs"], ["rst"], perm=[0, 2, 3, 1]), h.make_node("Reshape", ["rst", "flat"], ["pos_p"]),
        h.make_node("Concat", ["cls_pos", "pos_p"], ["pos"], axis=1),
        h.make_node("MatMul", ["x", "W"], ["emb"]), h.make_node("Add", ["emb", "pos"], ["s"]),
        h.make_node("LayerNormalization", ["s", "g", "b"], ["y1"], axis=-1, epsilon=1e-5),
        h.make_node("MatMul", ["y1", "W"], ["f"]), h.make_node("Add", ["s", "f"], ["s2"]),
        h.make_node("LayerNormalization", ["s2", "g", "b"], ["y"], axis=-1, epsilon=1e-5),
        # the token count read from the shape: ONNX's inference does not know it past the Resize
        h.make_node("Shape", ["y"], ["ys"]),
        h.make_node("Gather", ["ys", "s0"], ["nb"], axis=0), h.make_node("Gather", ["ys", "s1"], ["nt"], axis=0),
        h.make_node("Unsqueeze", ["nb", "i0"], ["nb1"]), h.make_node("Unsqueeze", ["nt", "i0"], ["nt1"]),
        h.make_node("Concat", ["nb1", "nt1", "m1"], ["ynew"], axis=0),
        h.make_node("MatMul", ["y", "W2"], ["z"]), h.make_node("Reshape", ["z", "ynew"], ["out"]),
    ]
    g = h.make_graph(nodes, "posres", [h.make_tensor_value_info("x", TP.FLOAT, ["batch", n, d])],
                     [h.make_tensor_value_info("out", TP.FLOAT, ["batch", "tok", d])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_a_resized_position_table_centered_at_run_time_proves():
    """The optimizer centers the computed table at run time (Sub(c, ReduceMean(c)), which ONNX
    Runtime sums in its own order): the prover compares that constant at the reduction's rounding
    (GraphView.slack), and the token count past the Resize comes from the evaluated table's shape,
    so the optimizer's folded Shape-Gather is derived too. Both failed before."""
    m = _resized_position_table_model()
    out, _ = optimize_model(m, shapes={"batch": (2,)})
    ops = [n.op_type for n in out.graph.node]
    assert "ReduceMean" in ops and "Resize" in ops and "LayerNormalization" not in ops  # the case meant
    res = prove(m, out)
    assert res.proved, res.summary
    assert _mutant_check(m, out, {"channel x1.02", "element x1.0005"})


def test_slack_is_the_reductions_rounding_not_a_free_pass():
    """A run-time-centered constant moved by more than its sum's rounding is refused: one
    element of the table x(1 + 1e-4), and the whole table shifted by a channel vector."""
    m = _resized_position_table_model()
    out, _ = optimize_model(m, shapes={"batch": (2,)})
    for how in ("element", "channel"):
        bad = copy.deepcopy(out)
        t = next(t for t in bad.graph.initializer if list(t.dims) == [1, 16, 3, 3])  # the grid the Resize reads
        v = numpy_helper.to_array(t).astype(np.float32).copy()
        if how == "element":
            v[0, 3, 1, 2] *= 1 + 1e-4
        else:
            v[0, 5] += 1e-3
        t.CopyFrom(numpy_helper.from_array(v, t.name))
        assert not prove(m, bad).proved, how


def test_random_draws_leave_the_proof_to_decide_alone(tmp_path):
    """A model that draws random numbers (ViT-MAE's patch shuffle) differs from itself run to run:
    the dynamic check compares nothing and says so; optimize lets the proof decide alone, and
    writes the output only when it proves."""
    from normopt.api import optimize
    from normopt.runtime_tests.equivalence import compare

    m = preln_stream_model()
    m.graph.node.extend([helper.make_node("RandomUniformLike", ["final"], ["noise"], low=0.0, high=1.0),
                         helper.make_node("Add", ["final", "noise"], ["noisy"])])
    m.graph.output.append(helper.make_tensor_value_info("noisy", onnx.TensorProto.FLOAT, [1, 8, 16]))
    src = tmp_path / "m.onnx"
    onnx.save(m, src)
    res = compare(m, m)
    assert not res.equivalent and any(p.startswith("nothing was compared: the input draws random numbers") for p in res.problems)
    r = optimize(str(src), str(tmp_path / "o.onnx"))
    assert r.verification is None and r.proof is not None and r.proof.proved, r.proof
    assert any(n.startswith("dynamic check not run: the input draws random numbers") for n in r.report.notes)
    assert (tmp_path / "o.onnx").exists()


def _inline(model):
    from normopt.proof.graphs import tensor_value

    m = copy.deepcopy(model)
    for t in m.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            arr = np.array(tensor_value(t))
            t.CopyFrom(numpy_helper.from_array(arr, t.name))
    return m


def test_tiny_element_change_below_any_dynamic_tolerance_is_refused():
    """A single weight element off by 1e-5 relative changes outputs by far less than a dynamic
    check's tolerance; the proof still refuses it (its tolerance is the weight dtype's rounding)."""
    m = preln_stream_model()
    out, _ = optimize_model(m)
    name, a = next((n, a) for n, a in _changed_floats(m, out) if a.ndim == 2)
    b = a.astype(np.float64)
    b[1, 1] *= 1 + 1e-5
    res = prove(m, _with_init(out, name, b))
    assert not res.proved and name in res.summary


# ------------------------------------------------------------------------------ honesty


def _relu_model():
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["y"], name="relu")]
    return make_model(nodes, [vi("x", [2, 8])], [vi("y", [2, 8])], [w])


def test_unsupported_rewrite_says_no_proof_rule():
    """Relu(h) = Max(h, 0) is true, but the validator has no rule for it: "not proved", never "proved"."""
    m = _relu_model()
    opt = copy.deepcopy(m)
    del opt.graph.node[1]
    opt.graph.initializer.append(numpy_helper.from_array(np.zeros((), np.float32), "zero"))
    opt.graph.node.append(helper.make_node("Max", ["h", "zero"], ["y"], name="relu"))
    res = prove(m, opt)
    assert not res.proved
    assert "no proof rule for Max" in res.summary or "Max" in res.summary


def test_names_are_only_hints():
    m = preln_stream_model()
    out, _ = optimize_model(m)
    shuffled = copy.deepcopy(out)
    names = [n.name for n in shuffled.graph.node]
    for n, new in zip(shuffled.graph.node, names[::-1]):
        n.name = new
    assert prove(m, shuffled).proved
    # a wrong model whose node names all match the original's is still refused
    name, a = next((n, a) for n, a in _changed_floats(m, out) if a.ndim == 2)
    b = a.astype(np.float64)
    b[:, 0] *= 1.02
    assert not prove(m, _with_init(out, name, b)).proved


def test_identical_model_proves_and_a_different_one_does_not():
    m = _relu_model()
    assert prove(m, copy.deepcopy(m)).proved
    other = copy.deepcopy(m)
    other.graph.node[1].op_type = "Sigmoid"
    res = prove(m, other)
    assert not res.proved and "Sigmoid" in res.summary


def test_if_branches_are_proved_like_graphs():
    """Both branches of an If are proved, including one no input would take."""
    w = numpy_helper.from_array(np.arange(16, dtype=np.float32).reshape(4, 4) / 10, "w")

    def branch(op, tag):
        return helper.make_graph([helper.make_node(op, ["x"], [f"o_{tag}"])], f"b_{tag}", [], [vi(f"o_{tag}", [2, 4])])

    def model(else_op):
        nodes = [helper.make_node("If", ["c"], ["r"], name="if", then_branch=branch("Relu", "t"), else_branch=branch(else_op, "e")),
                 helper.make_node("MatMul", ["r", "w"], ["y"], name="mm")]
        return make_model(nodes, [vi("c", [], onnx.TensorProto.BOOL), vi("x", [2, 4])], [vi("y", [2, 4])], [w])

    assert prove(model("Tanh"), model("Tanh")).proved
    res = prove(model("Tanh"), model("Sigmoid"))
    assert not res.proved and "Sigmoid" in res.summary


# ------------------------------------------------------------------------------ CLI and API


def test_cli_verify_prove(tmp_path):
    m = preln_stream_model()
    out, _ = optimize_model(m)
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(m, a)
    onnx.save(out, b)
    r = run_cli("verify", a, b, "--prove", "--json", tmp_path / "p.json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("proved: ")
    assert json.load(open(tmp_path / "p.json"))["proof"]["proved"] is True
    name, arr = next((n, x) for n, x in _changed_floats(m, out) if x.ndim == 2)
    bad = arr.astype(np.float64)
    bad[0, :] *= 1.02
    onnx.save(_with_init(out, name, bad), tmp_path / "c.onnx")
    r = run_cli("verify", a, tmp_path / "c.onnx", "--prove")
    assert r.returncode == 1 and r.stdout.startswith("not proved: "), r.stdout + r.stderr
    r = run_cli("verify", a, tmp_path / "missing.onnx", "--prove")
    assert r.returncode == 2 and "no such file" in r.stderr


def test_optimize_proves_its_output(tmp_path):
    from normopt.api import optimize

    src = tmp_path / "m.onnx"
    onnx.save(preln_stream_model(), src)
    res = optimize(str(src), str(tmp_path / "o.onnx"), seeds=1)
    assert res.proof is not None and res.proof.proved, res.proof
    assert any(n.startswith("proved: ") for n in res.report.notes)
    res = optimize(str(src), str(tmp_path / "o2.onnx"), verify=False)
    assert res.proof is None


def test_overridable_default_is_part_of_the_function():
    """An initializer that is also a graph input keeps its default for callers that do not feed
    it: a changed default is refused even though the value is a graph input."""
    m = _relu_model()
    m.graph.input.append(vi("w", [8, 8]))
    assert prove(m, copy.deepcopy(m)).proved
    other = copy.deepcopy(m)
    w = numpy_helper.to_array(other.graph.initializer[0]).copy()
    w[0, 0] *= 1.0005
    other.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "w"))
    res = prove(m, other)
    assert not res.proved and "'w'" in res.summary


def test_opset_upgrade_by_the_version_converter_proves():
    """optimize upgrades an opset-11 model to 13 with ONNX's version converter (Squeeze/Unsqueeze
    axes become inputs, Softmax stops coercing to 2-D) and proves the output against the input."""
    from normopt.api import prepare_opset

    orig = nio.load_model(os.path.join(CORPUS, "paddle_preln_enc_op11.onnx")).model
    upgraded, note = prepare_opset(orig)
    assert note and nio.default_opset(upgraded) == 13
    out, _ = optimize_model(upgraded)
    res = prove(orig, out)
    assert res.proved, res.summary


def test_run_time_gamma():
    """A LayerNorm whose gamma is a graph input converts with the same run-time gamma; a
    different run-time value in its place is refused."""
    rng = np.random.default_rng(3)
    d = 8
    inits = [numpy_helper.from_array(rng.standard_normal((d, d)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((d, d)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.standard_normal(d).astype(np.float32), "beta")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["x", "h"], ["s"]),
             helper.make_node("LayerNormalization", ["s", "g", "beta"], ["n"], axis=-1, epsilon=1e-5),
             helper.make_node("MatMul", ["n", "w2"], ["y"])]
    m = make_model(nodes, [vi("x", [2, 3, d]), vi("g", [d])], [vi("y", [2, 3, d])], inits)
    # x is a graph input (not centered), so nothing converts unless the optimizer centers it;
    # hand-build the conversion: s' = s - mean(s), RMS(s', g), + beta
    opt = copy.deepcopy(m)
    del opt.graph.node[2:]
    opt.graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), "ax"))
    opt.graph.node.extend([
        helper.make_node("ReduceMean", ["s"], ["mu"], axes=[-1], keepdims=1),
        helper.make_node("Sub", ["s", "mu"], ["sc"]),
        helper.make_node("SimplifiedLayerNormalization", ["sc", "g"], ["n0"], axis=-1, epsilon=1e-5),
        helper.make_node("Add", ["n0", "beta"], ["n"]),
        helper.make_node("MatMul", ["n", "w2"], ["y"])])
    res = prove(m, opt)
    assert res.proved, res.summary
    wrong = copy.deepcopy(opt)
    wrong.graph.node[4].input[1] = "x"  # another run-time value as gamma
    assert not prove(m, wrong).proved


def _fuzz_examples():
    pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings

    from fuzz_graphs import transformer_graphs

    found = []

    @settings(max_examples=10, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(transformer_graphs())
    def collect(model):
        found.append(model)

    collect()
    return found


def test_fuzzed_outputs_prove_and_fp32_mutants_are_refused():
    """Deterministic examples of the fuzzer's graphs: each optimized output proves, and every
    planted mutant of an fp32 output is refused (in fp16 a x1.0005 change is one ulp: rounding)."""
    checked = 0
    for model in _fuzz_examples():
        out, _ = optimize_model(model)
        res = prove(model, out)
        assert res.proved, res.summary
        if not any(t.data_type == onnx.TensorProto.FLOAT for t in out.graph.initializer):
            continue
        if any(t.data_type == onnx.TensorProto.FLOAT16 for t in out.graph.initializer):
            continue
        for kind, m in mutants(model, out):
            r = prove(model, m)
            assert not r.proved, f"{kind}: {r.summary}"
            checked += 1
    assert checked > 0


def test_the_validator_imports_nothing_of_the_optimizer():
    """normopt.proof re-derives every fact: no module of it imports the passes or the optimizer's
    graph mechanisms (it may read files through normopt.io / normopt.weights)."""
    import ast
    import glob

    allowed = {"normopt.io", "normopt.weights", "normopt.errors"}
    here = os.path.join(os.path.dirname(__file__), "..", "normopt", "proof")
    for path in glob.glob(os.path.join(here, "*.py")):
        tree = ast.parse(open(path).read())
        for n in ast.walk(tree):
            if isinstance(n, ast.ImportFrom) and n.level >= 2:
                mods = [f"normopt.{n.module}" if n.module else f"normopt.{a.name}" for a in n.names] if not n.module else [f"normopt.{n.module}"]
                for mod in mods:
                    assert mod in allowed, f"{os.path.basename(path)} imports {mod}"
            if isinstance(n, ast.ImportFrom) and n.level == 0 and (n.module or "").startswith("normopt"):
                assert n.module in allowed, f"{os.path.basename(path)} imports {n.module}"
            if isinstance(n, ast.Import):
                for a in n.names:
                    assert not a.name.startswith("normopt") or a.name in allowed, a.name


def test_a_layerscale_bias_scaled_then_centered_proves():
    """A fuzzed model (tests/proof_cases): a LayerScale folded into a writer's bias, and the bias
    then centered. The optimizer rounded twice (the scaled bias to fp32, then its centering), so
    one small centered element (-0.0012, scaled value 0.022) was 5 ulps off and did not prove.
    It now computes center(s * b) from the source in float64 and rounds once: the output proves
    under the prover's one-rounding bound, and every planted mutant is refused."""
    m = onnx.load(os.path.join(os.path.dirname(__file__), "proof_cases", "fuzz_layerscale_centered_bias.onnx"))
    out, _ = optimize_model(m)
    res = prove(m, out)
    assert res.proved, res.summary
    for kind, mm in mutants(m, out):
        assert not prove(m, mm).proved, kind
    o = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    p = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    exp = o["b_95"].astype(np.float64) * o["ls_98"].astype(np.float64)
    exp = (exp - exp.mean(axis=-1, keepdims=True)).astype(np.float32)
    assert np.array_equal(p["b_95_ls_centered"], exp)  # one rounding: the correctly rounded value


def test_a_fused_skip_norm_with_a_run_time_gamma_proves():
    """A fuzzed model (tests/proof_cases): a LayerNormalization whose gamma is a graph input, fused
    into SkipLayerNormalization (the CUDA defaults). Its scale is a run-time value equal to the
    original's, as for a plain norm: the output proves. A gamma negated on the way, or a beta
    replaced by a run-time value (once read as no beta at all), is refused."""
    m = onnx.load(os.path.join(os.path.dirname(__file__), "proof_cases", "fuzz_skip_runtime_gamma.onnx"))
    out, _ = optimize_model(m, provider="cuda")
    skip = [n for n in out.graph.node if n.op_type == "SkipLayerNormalization"]
    assert skip and not any(t.name == skip[0].input[2] for t in out.graph.initializer)
    res = prove(m, out)
    assert res.proved, res.summary
    neg = copy.deepcopy(out)
    node = next(n for n in neg.graph.node if n.op_type == "SkipLayerNormalization")
    g = node.input[2]
    neg.graph.node.insert(0, helper.make_node("Neg", [g], ["g_neg"]))
    node.input[2] = "g_neg"
    assert not prove(m, neg).proved
    rt_beta = copy.deepcopy(out)
    node = next(n for n in rt_beta.graph.node if n.op_type == "SkipLayerNormalization")
    if len(node.input) > 3 and node.input[3]:
        rt_beta.graph.node.insert(0, helper.make_node("Abs", [g], ["b_rt"]))
        node.input[3] = "b_rt"
        assert not prove(m, rt_beta).proved


def test_a_fused_skip_norm_with_a_run_time_beta_proves():
    """A fuzzed model (tests/proof_cases): a LayerNormalization whose beta is a graph input, fused
    into SkipLayerNormalization with that beta. The norm without it is "y - r" for the original's
    run-time beta r, and the Skip's beta, equal to r, adds it back: the output proves. A beta
    replaced by another run-time value, or dropped, is refused."""
    m = onnx.load(os.path.join(os.path.dirname(__file__), "proof_cases", "fuzz_skip_runtime_beta.onnx"))
    out, _ = optimize_model(m, provider="cuda")
    res = prove(m, out)
    assert res.proved, res.summary
    inits = {t.name for t in out.graph.initializer}
    skips = [n for n in out.graph.node if n.op_type == "SkipLayerNormalization" and len(n.input) > 3 and n.input[3] not in inits]
    assert skips
    for how in ("other", "dropped"):
        bad = copy.deepcopy(out)
        node = next(n for n in bad.graph.node if list(n.output) == list(skips[0].output))
        if how == "other":
            bad.graph.node.insert(0, helper.make_node("Abs", [node.input[3]], ["b_other"]))
            node.input[3] = "b_other"
        else:
            node.input[3] = ""
        assert not prove(m, bad).proved, how


def test_an_overridable_initializer_read_only_in_a_branch_stays_an_input():
    """A fuzzed model (tests/proof_cases): `zeros_40` is an initializer and a graph input (a
    default the caller may override) read only inside an If branch. The graph layer made it the
    branch's own initializer, which shadows the input: a caller who fed it got the default. The
    prover refused the output ("a constant that differs"); it now stays the input and proves, and
    ONNX Runtime gives the same outputs as the original when the input is fed."""
    from normopt.runtime_tests.providers import make_session

    m = onnx.load(os.path.join(os.path.dirname(__file__), "proof_cases", "fuzz_overridable_in_branch.onnx"))
    out, _ = optimize_model(m)
    assert not [t.name for n in out.graph.node for a in n.attribute if a.HasField("g") for t in a.g.initializer]
    res = prove(m, out)
    assert res.proved, res.summary
    rng = np.random.default_rng(0)
    feeds = {}
    for i in m.graph.input:
        tt = i.type.tensor_type
        shape = [d.dim_value or 1 for d in tt.shape.dim]
        dt = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        feeds[i.name] = (rng.standard_normal(shape).astype(dt) if dt.kind == "f" else np.zeros(shape, dt))
    feeds["zeros_40"] = np.full_like(feeds["zeros_40"], 0.75)  # override the default
    names = [o.name for o in m.graph.output]
    a = make_session(m, "cpu", "disable").run(names, feeds)
    b = make_session(out, "cpu", "disable").run(names, feeds)
    assert any(np.any(x == 0.75) for x in a), "the fed value reaches an output of the original"
    for x, y in zip(a, b):
        np.testing.assert_allclose(y.astype(np.float64), x.astype(np.float64), rtol=2e-2, atol=2e-2)


def _repbn(nodes, inits, x, name, ch, rng):
    """A RepBN (BN(x) + eta x) over axis 1 of x, ch channels: its output's name."""
    for k, arr in (("g", rng.uniform(0.5, 1.5, ch)), ("b", rng.normal(size=ch)), ("m", rng.normal(size=ch)),
                   ("v", rng.uniform(0.5, 2.0, ch)), ("eta", np.array([0.3]))):
        inits.append(numpy_helper.from_array(arr.astype(np.float32), f"{name}_{k}"))
    nodes += [helper.make_node("BatchNormalization", [x] + [f"{name}_{k}" for k in "gbmv"], [f"{name}_bn"]),
              helper.make_node("Mul", [x, f"{name}_eta"], [f"{name}_em"]),
              helper.make_node("Add", [f"{name}_bn", f"{name}_em"], [name])]
    return name


@pytest.mark.parametrize("order", ["bn_first", "mul_first"])
def test_a_repbn_folded_across_a_cancelled_transpose_pair_after_a_token_affine_proves(order):
    """A RepBN over tokens (axis 1 of [1, 3, 8]) that stays (a residual reads it), then a RepBN
    over channels between a Transpose pair, folded forward into the next MatMul, the pair
    cancelled. The original's per-channel forms hold one affine along one axis: the second
    RepBN's axis does not compose with the first's, and its output had no form at all, so the
    folded weight was "not the original's under any checked relation". The value the second
    RepBN reads is now re-based at its layout anchor (the first RepBN's output), and the fold
    proves; every planted mutant of the output is refused. With "mul_first" the RepBN's Mul comes
    before its BatchNormalization in node order (the re-basing does not depend on it)."""
    rng = np.random.default_rng(3)
    nodes, inits = [], []
    t = _repbn(nodes, inits, "x", "tok", 3, rng)  # axis 1 of [1, 3, 8]: the tokens
    nodes.append(helper.make_node("Transpose", [t], ["t1"], perm=[0, 2, 1]))
    ch = _repbn(nodes, inits, "t1", "chn", 8, rng)
    if order == "mul_first":
        nodes[-3], nodes[-2] = nodes[-2], nodes[-3]
    nodes += [helper.make_node("Transpose", [ch], ["t2"], perm=[0, 2, 1]),
              helper.make_node("MatMul", ["t2", "W"], ["mm"]),
              helper.make_node("Add", ["mm", "bias"], ["h"]),
              helper.make_node("MatMul", ["h", "W2"], ["mm2"]),
              helper.make_node("Add", [t, "mm2"], ["y"])]
    inits += [numpy_helper.from_array(rng.normal(size=(8, 16)).astype(np.float32), "W"),
              numpy_helper.from_array(rng.normal(size=(3, 16)).astype(np.float32), "bias"),
              numpy_helper.from_array(rng.normal(size=(16, 8)).astype(np.float32), "W2")]
    g = helper.make_graph(nodes, "g", [vi("x", [1, 3, 8])], [vi("y", [1, 3, 8])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])
    out, rep = optimize_model(m)
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("BatchNormalization") == 1 and "Transpose" not in ops, ops  # folded, pair cancelled
    _mutant_check(m, out, {"channel x1.02", "element x1.0005"})


def test_a_re_based_value_stays_in_its_former_family():
    """Conv -> BatchNormalization (channels, folded into the Conv) -> Mul by a per-position
    constant (the other axis). The Mul's axis does not compose with the BatchNormalization's, so
    the BatchNormalization's output is re-based (an anchor); it keeps its form on the Conv's
    output as a second form, so the BatchNormalization fold still proves (with the anchor's own
    form alone, the Mul's constant was "not a scale the original explains"). Mutants refused."""
    rng = np.random.default_rng(0)

    def f(a, n):
        return numpy_helper.from_array(np.asarray(a, np.float32), n)

    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y0"]),
             helper.make_node("Mul", ["y0", "pos"], ["y"])]
    inits = [f(rng.normal(size=(6, 4, 1)), "W"), f(rng.normal(size=6), "B"), f(rng.uniform(.5, 1.5, 6), "g"),
             f(rng.normal(size=6), "b"), f(rng.normal(size=6), "m"), f(rng.uniform(.5, 2, 6), "v"),
             f(rng.normal(size=10), "pos")]
    g = helper.make_graph(nodes, "g", [vi("x", [1, 4, 10])], [vi("y", [1, 6, 10])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])
    out, _ = optimize_model(m)
    assert [n.op_type for n in out.graph.node] == ["Conv", "Mul"]
    _mutant_check(m, out, {"channel x1.02", "element x1.0005"})


@pytest.mark.parametrize("cshape", [[4, 16], [4, 1]], ids=["MxN", "Mx1"])
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_a_gemm_whose_c_is_a_full_tensor_proves_after_a_fold(direction, cshape):
    """A per-channel affine folded into a Gemm whose C is not one value per output channel
    ([M, N], or [M, 1]: one per row). The prover took a Gemm's bias as per-channel only ("not a
    per-channel constant"); the C is now carried as a full shift, element by element. Planted
    mutants (a weight channel, one weight element, one element of the full C) are refused."""
    rng = np.random.default_rng(1)
    M, K, N = 4, 8, 16

    def f(a, n):
        return numpy_helper.from_array(np.asarray(a, np.float32), n)

    if direction == "forward":
        nodes = [helper.make_node("Mul", ["x", "s"], ["xs"]), helper.make_node("Add", ["xs", "t"], ["xa"]),
                 helper.make_node("Gemm", ["xa", "W", "C"], ["y"], alpha=0.5, beta=2.0)]
        inits = [f(rng.uniform(.5, 1.5, K), "s"), f(rng.normal(size=K), "t")]
    else:
        nodes = [helper.make_node("Gemm", ["x", "W", "C"], ["g"], beta=1.5),
                 helper.make_node("Mul", ["g", "s"], ["gs"]), helper.make_node("Add", ["gs", "t"], ["y"])]
        inits = [f(rng.uniform(.5, 1.5, N), "s"), f(rng.normal(size=N), "t")]
    inits += [f(rng.normal(size=(K, N)), "W"), f(rng.normal(size=cshape), "C")]
    g = helper.make_graph(nodes, "g", [vi("x", [M, K])], [vi("y", [M, N])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    out, _ = optimize_model(m)
    assert [n.op_type for n in out.graph.node] == ["Gemm"]
    _mutant_check(m, out, {"channel x1.02", "element x1.0005"})
    c_name = out.graph.node[0].input[2]
    c = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == c_name)).astype(np.float64)
    c.reshape(-1)[-1] *= 1.0005
    assert not prove(m, _with_init(out, c_name, c)).proved


@pytest.mark.parametrize("op", ["ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2",
                                "ReduceLogSumExp"])
def test_the_validator_reads_a_reduction_of_an_empty_constant_as_onnx_runtime_computes_it(op):
    """A reduction of an empty constant is a constant, with ONNX Runtime's value (onnx.reference
    gives NaN for a ReduceMean of nothing, ONNX Runtime 0). It was left a run-time value, so an
    output whose stream adds such a mean (centered by the optimizer) did not prove
    (tests/regressions/fuzz_7c7b664b04b3)."""
    import onnxruntime as ort

    from normopt.proof.graphs import GraphView

    node = helper.make_node(op, ["e", "ax"], ["y"], keepdims=0)
    g = helper.make_graph([node], "g", [], [vi("y", [3])],
                          [numpy_helper.from_array(np.zeros((0, 3), np.float32), "e"),
                           numpy_helper.from_array(np.array([0], np.int64), "ax")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]
    got = GraphView(m.graph, {"": 18}).const("y")
    assert got is not None and np.array_equal(np.asarray(got), want), (got, want)


@pytest.mark.parametrize("crms", [False, True], ids=["plain", "crms"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32], ids=["fp16", "fp32"])
def test_a_layerscale_writer_with_a_full_token_bias_proves(dtype, crms):
    """A LayerScale writer (MatMul + a [tokens, d] bias, times a per-channel scale) into a Pre-LN
    stream, in fp16 and fp32, with and without --crms: the full bias is centered with the writer
    and carried element by element. fp32 mutants are refused (fp16 one-element mutants of x1.0005
    are below half an fp16 ulp, so are not changes at all)."""
    rng = np.random.default_rng(5)
    et = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))

    def f(a, n):
        return numpy_helper.from_array(np.asarray(a, dtype), n)

    d, T = 8, 3
    nodes = [helper.make_node("LayerNormalization", ["x", "g0", "b0"], ["n0"], axis=-1),
             helper.make_node("MatMul", ["n0", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["m2"]), helper.make_node("Add", ["m2", "bf"], ["m3"]),
             helper.make_node("Mul", ["m3", "ls"], ["m4"]), helper.make_node("Add", ["x", "m4"], ["x1"]),
             helper.make_node("LayerNormalization", ["x1", "g1", "b1"], ["y"], axis=-1)]
    inits = [f(rng.uniform(.5, 1.5, d), "g0"), f(rng.normal(size=d), "b0"), f(rng.normal(size=(d, 16)), "W1"),
             f(rng.normal(size=(16, d)), "W2"), f(rng.normal(size=(T, d)), "bf"), f(rng.uniform(.1, 1, d), "ls"),
             f(rng.uniform(.5, 1.5, d), "g1"), f(rng.normal(size=d), "b1")]
    g = helper.make_graph(nodes, "g", [vi("x", [1, T, d], et)], [vi("y", [1, T, d], et)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    out, _ = optimize_model(m, opt_in=["crms"] if crms else None)
    assert "LayerNormalization" not in [n.op_type for n in out.graph.node]
    res = prove(m, out)
    assert res.proved, res.summary
    if dtype == np.float32:
        _mutant_check(m, out, {"channel x1.02", "element x1.0005"})


def test_two_original_casts_of_one_value_are_both_related():
    """An fp16 stream read by two fp32 LayerNorms through two Casts of the same value (mixed
    precision). The optimized second norm reads the second Cast; the validator related that
    Cast only to the first original Cast (the first candidate found), so the norm related to
    the first LayerNorm (another gamma) and the output did not prove (the long fuzz profile,
    tests/regressions/fuzz_6b8d70e9408b). Every original node of the op is a candidate now, the
    one of the same name first."""
    rng = np.random.default_rng(2)
    d = 8
    f16 = lambda a, n: numpy_helper.from_array(np.asarray(a, np.float16), n)  # noqa: E731
    f32 = lambda a, n: numpy_helper.from_array(np.asarray(a, np.float32), n)  # noqa: E731
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["x", "m"], ["s"])]
    inits = [f16(rng.normal(size=(d, d)) * 0.3, "W")]
    outs = []
    for k in (1, 2):
        nodes += [helper.make_node("Cast", ["s"], [f"c{k}"], to=1),
                  helper.make_node("LayerNormalization", [f"c{k}", f"g{k}", f"b{k}"], [f"n{k}"], axis=-1),
                  helper.make_node("Cast", [f"n{k}"], [f"y{k}"], to=10)]
        inits += [f32(rng.uniform(.5, 1.5, d), f"g{k}"), f32(rng.normal(size=d), f"b{k}")]
        outs.append(vi(f"y{k}", [1, 3, d], onnx.TensorProto.FLOAT16))
    g = helper.make_graph(nodes, "g", [vi("x", [1, 3, d], onnx.TensorProto.FLOAT16)], outs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    out, _ = optimize_model(m)
    assert "LayerNormalization" not in [n.op_type for n in out.graph.node]
    res = prove(m, out)
    assert res.proved, res.summary


def test_a_shape_re_pointed_at_a_value_of_the_same_shape_proves():
    """Shape(x') where the original takes Shape(u) of another value with the same shape for every
    input size (a dynamic batch): the same vector. A Shape of a value of another shape (a
    Transpose of it) is refused."""
    nodes_o = [helper.make_node("Relu", ["x"], ["u"]), helper.make_node("Shape", ["u"], ["s"]),
               helper.make_node("Reshape", ["x", "s"], ["y"])]
    m = make_model(nodes_o, [vi("x", ["b", 4, 4])], [vi("y", ["b", 4, 4])], opset=17)
    good = make_model([helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Reshape", ["x", "s"], ["y"])],
                      [vi("x", ["b", 4, 4])], [vi("y", ["b", 4, 4])], opset=17)
    res = prove(m, good)
    assert res.proved, res.summary
    for bad_nodes in ([helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0, 2]), helper.make_node("Shape", ["t"], ["s"])],
                      [helper.make_node("Shape", ["x"], ["s"], start=1)]):  # another shape; part of the shape
        bad = make_model(bad_nodes + [helper.make_node("Reshape", ["x", "s"], ["y"])],
                         [vi("x", ["b", 4, 4])], [vi("y", ["b", 4, 4])], opset=17)
        assert not prove(m, bad).proved


def test_below_ir4_an_initializer_listed_as_an_input_is_a_constant():
    """Below IR 4 every initializer is listed as an input and is a constant (ONNX Runtime takes no
    feed for it), so an output that drops those inputs (written at a newer IR) computes the same
    function and proves; the validator read them as overridable inputs and refused ("the inputs
    differ"). From IR 4 on, such an input is a default a caller may override: dropping it is
    refused."""
    m = preln_stream_model(d=16, n=8, layers=2, ln_form="div", opset=13)
    have = {i.name for i in m.graph.input}
    for t in m.graph.initializer:
        if t.name not in have:
            m.graph.input.append(vi(t.name, list(t.dims), t.data_type))
    plain = preln_stream_model(d=16, n=8, layers=2, ln_form="div", opset=13)
    out, _ = optimize_model(plain)
    m.ir_version = 3
    res = prove(m, out)
    assert res.proved, res.summary
    m.ir_version = 7
    res = prove(m, out)
    assert not res.proved and ("overridable" in res.summary or "inputs differ" in res.summary), res.summary


@pytest.mark.parametrize("op,attrs", [
    ("Conv", dict(kernel_shape=[3, 3])), ("Conv", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])),
    ("Conv", dict(kernel_shape=[3, 3], dilations=[2, 2], strides=[2, 1])), ("Conv", dict(kernel_shape=[3, 3], auto_pad="SAME_UPPER", strides=[2, 2])),
    ("MaxPool", dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)), ("MaxPool", dict(kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)),
    ("AveragePool", dict(kernel_shape=[3, 2], strides=[2, 2], auto_pad="VALID")),
], ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}{v[k]}" for k in v))
def test_the_validators_shape_tracker_shapes_conv_and_pooling_as_onnx_runtime_does(op, attrs):
    """The prover's own shape tracker gives Conv and pooling outputs (a dynamic batch, static
    spatial dims) the shape ONNX Runtime computes; without it a torch export with a patch Conv and
    a dynamic batch had no tracked shapes downstream (a re-pointed Shape did not prove)."""
    import onnxruntime as ort

    from normopt.proof.graphs import GraphView

    inits = []
    ins = ["x"]
    if op == "Conv":
        inits.append(numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w"))
        ins.append("w")
    node = helper.make_node(op, ins, ["y"], **attrs)
    g = helper.make_graph([node], "g", [vi("x", ["b", 3, 11, 10])], [vi("y", None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    got = GraphView(m.graph, {"": 17}).tracker.S("y")
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": np.zeros((2, 3, 11, 10), np.float32)})[0].shape
    assert got is not None and [2] + list(got[1:]) == list(want) and str(got[0]) == "b", (got, want)


def test_a_scalar_shape_value_minus_a_constant_proves():
    """A held-out trial: a Shape -> Gather (scalar index) -> Sub(1) beside a folded LayerNorm.
    The Sub's constant, relative to a rank-0 value, was taken as a per-channel shift along the
    last axis, which a scalar does not have: the prover raised IndexError (an internal error,
    never proved). A rank-0 value takes no shift relation; its Sub is the original's own."""
    rng = np.random.default_rng(0)
    f = lambda *s: numpy_helper.from_array(rng.standard_normal(s).astype(np.float32))
    E, W = f(16, 8), f(8, 8)
    E.name, W.name = "E", "W"
    g, b = numpy_helper.from_array(np.ones(8, np.float32), "g"), numpy_helper.from_array(np.zeros(8, np.float32), "b")
    idx, one = numpy_helper.from_array(np.array(1, np.int64), "idx"), numpy_helper.from_array(np.array(1, np.int64), "one")
    nodes = [helper.make_node("Gather", ["E", "ids"], ["x"], axis=0),
             helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1, epsilon=1e-5),
             helper.make_node("MatMul", ["y", "W"], ["out"]),
             helper.make_node("Shape", ["y"], ["s"]),
             helper.make_node("Gather", ["s", "idx"], ["s1"], axis=0),
             helper.make_node("Sub", ["s1", "one"], ["n"])]
    m = make_model(nodes, [vi("ids", ["batch", "seq"], onnx.TensorProto.INT64)],
                   [vi("out", ["batch", "seq", 8]), vi("n", [], onnx.TensorProto.INT64)], [E, W, g, b, idx, one])
    out, report = optimize_model(m)
    assert any(p.applied for p in report.passes if p.name == "ln_to_rms"), "the LayerNorm is converted"
    res = prove(m, out)
    assert res.proved, res.summary
    for kind, mm in mutants(m, out):
        assert not prove(m, mm).proved, kind


def test_a_detr_mask_resized_by_a_run_time_size_proves():
    """A held-out trial (tests/proof_cases, a random-weight DETR encoder export): the pixel mask
    is resized to the feature map by a Resize whose `sizes` are computed from shapes, and a
    Where reads the result. The optimizer's shapes fold the mask's shape vectors to constants;
    the prover's tracker had no Resize rule, so the original's side stayed symbolic and the Where
    did not prove. Resize by sizes is now shaped by those sizes."""
    m = onnx.load(os.path.join(os.path.dirname(__file__), "proof_cases", "heldout_detr_mask_resize.onnx"))
    out, _ = optimize_model(m)
    res = prove(m, out)
    assert res.proved, res.summary
