"""fold_affine: RepBN / PRepBN / BatchNorm / Unified Norm / per-channel chains folded into linear
ops; axis mismatches declined. Each case checks what is left and equivalence against ONNX
Runtime running the original model."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
from onnx import helper

from normopt import graph as G
from normopt import optimize_model
from normopt.api import optimize
from normopt.norms import find_norms
from normopt.runtime_tests.equivalence import compare
from normopt.runtime_tests.inputs import InputOptions

from conftest import init, make_model, vi

AFFINE_KINDS = ("BatchNormalization", "per-channel affine")


def ops(path_or_model):
    m = onnx.load(path_or_model, load_external_data=False) if isinstance(path_or_model, str) else path_or_model
    return collections.Counter(n.op_type for n in m.graph.node)


def leftover_norms(model):
    return [s for s in find_norms(G.to_graph(model)) if s.kind.startswith(AFFINE_KINDS)]


def fold_report(report):
    return next(p for p in report.passes if p.name == "fold_affine")


# --- models from normopt.models ------------------------------------------------------------------

MODELS = [
    # name, builder call, export kwargs, norms folded
    ("slab-repbn", lambda B: B.slab("tiny"), {}, 5),
    ("slab-prepbn-eval", lambda B: B.slab("tiny", norm="prepbn"), {}, 5),
    ("unified-norm-fairseq", lambda B: B.unified("tiny"), {}, 5),
    ("bn-after-linear", lambda B: B.norm_after_linear(), {}, 1),
    # an LN ViT with a BN after its Conv patch embedding: the BN folds backward into the Conv
    # (LN betas that ln_to_rms keeps may fold too, so only the BN is counted)
    ("conv-patch-bn", lambda B: B.vit("tiny", patch_bn=True), {"fold": False}, None),
]


@pytest.mark.usefixtures("torch_available")
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic-batch"])
@pytest.mark.parametrize("name,build,ekw,folded", MODELS, ids=[m[0] for m in MODELS])
def test_models_fold_completely(tmp_path, name, build, ekw, folded, dynamic):
    from normopt.models import builders as B
    from normopt.models.export import example_inputs, export

    model = build(B)
    inputs = example_inputs(model, batch=2, seq=16)
    src = tmp_path / f"{name}.onnx"
    export(model, inputs, str(src), dynamic_axes={k: {0: "batch"} for k in inputs} if dynamic else None, **ekw)
    if not dynamic:  # a dynamic UN export hides the norm behind unfolded Add(eps)->Sqrt until folding
        assert leftover_norms(onnx.load(src)), "the export should contain the norm"
    out = tmp_path / "o.onnx"
    r = optimize(str(src), str(out), input_opts=InputOptions(shapes={"batch": (2,)}) if dynamic else None)
    assert r.verification.equivalent
    # proved too: a dynamic UN export computes γ/β/var's shapes from Shape, and moves the
    # channels through (Un)Squeeze of a tensor with a symbolic batch
    assert r.proof is not None and r.proof.proved, r.proof and r.proof.summary
    rep = fold_report(r.report)
    if folded is None:
        assert sum("BatchNormalization" in m for m in rep.matched) == 1, rep.matched
    else:
        assert rep.applied == folded, (rep.matched, rep.declined)
    after = onnx.load(out)
    assert ops(after)["BatchNormalization"] == 0
    assert leftover_norms(after) == []


@pytest.mark.usefixtures("torch_available")
def test_slab_matches_norm_free_floor_op_counts(tmp_path):
    """After folding, the SLAB model has exactly the ops of the same network without norms."""
    from normopt.models import builders as B
    from normopt.models.export import example_inputs, export

    slab, floor = B.slab("tiny"), B.vit("tiny", norm="none", pool="mean")
    for name, m in [("slab", slab), ("floor", floor)]:
        export(m, example_inputs(m, batch=1), str(tmp_path / f"{name}.onnx"))
    optimize(str(tmp_path / "slab.onnx"), str(tmp_path / "slab.o.onnx"))
    # the floor has nothing to optimize (optimize would copy it unchanged): canonicalize it alike
    floor_out, _ = optimize_model(onnx.load(str(tmp_path / "floor.onnx")))
    onnx.save(floor_out, str(tmp_path / "floor.o.onnx"))
    assert ops(str(tmp_path / "slab.o.onnx")) == ops(str(tmp_path / "floor.o.onnx"))


@pytest.mark.usefixtures("torch_available")
def test_slab_fp16(tmp_path):
    from normopt.models import builders as B
    from normopt.models.export import example_inputs, export

    m = B.slab("tiny")
    src = tmp_path / "s16.onnx"
    export(m, example_inputs(m, batch=2), str(src), fp16=True)
    r = optimize(str(src), str(tmp_path / "o.onnx"))
    assert fold_report(r.report).applied == 5 and r.verification.outputs[0].dtype == "float16"


@pytest.mark.usefixtures("torch_available")
def test_bn_on_wrong_axis_is_declined(tmp_path):
    """BatchNorm1d(N) on [B, N, C] normalizes tokens; its neighbours' channel axis is C.
    ORT's MatmulBNFusion-style folds that ignore the axis would be wrong here."""
    from normopt.models import builders as B
    from normopt.models.export import example_inputs, export

    m = B.norm_after_linear(wrong_axis=True)
    src = tmp_path / "wrong.onnx"
    export(m, example_inputs(m, batch=2), str(src))
    out = tmp_path / "o.onnx"
    r = optimize(str(src), str(out))
    rep = fold_report(r.report)
    assert rep.applied == 0 and len(rep.declined) == 1
    assert "not the channel axis" in rep.declined[0]["reason"] or "not the output channel axis" in rep.declined[0]["reason"]
    assert ops(str(out))["BatchNormalization"] == 1


# --- hand-built graphs -----------------------------------------------------------------------------

def _bn_inits(rng, c, tag="bn"):
    return [init(f"{tag}_g", (1 + 0.2 * rng.standard_normal(c)).astype(np.float32)),
            init(f"{tag}_b", (0.2 * rng.standard_normal(c)).astype(np.float32)),
            init(f"{tag}_m", (0.3 * rng.standard_normal(c)).astype(np.float32)),
            init(f"{tag}_v", (0.5 + rng.random(c)).astype(np.float32))]


def test_forward_into_gemm_with_transa_transb_alpha_beta():
    rng = np.random.default_rng(0)
    k, n, m = 6, 5, 4
    # x: [K, M]; Gemm with transA reads it as A^T: the channel axis of x is 0
    nodes = [helper.make_node("Unsqueeze", ["x", "ax"], ["x4"]),
             helper.make_node("BatchNormalization", ["x4", "bn_g", "bn_b", "bn_m", "bn_v"], ["y4"], epsilon=1e-3),
             helper.make_node("Squeeze", ["y4", "ax"], ["y"]),
             helper.make_node("Gemm", ["y", "W", "C"], ["out"], transA=1, transB=1, alpha=0.6, beta=1.7)]
    # BN normalizes axis 1 of [1, K, M] -> axis 0 of x after the Squeeze
    inits = _bn_inits(rng, k) + [init("ax", np.array([0], np.int64)), init("W", rng.standard_normal((n, k)).astype(np.float32)),
                                 init("C", rng.standard_normal(n).astype(np.float32))]
    model = make_model(nodes, [vi("x", [k, m])], [vi("out", [m, n])], inits)
    out, rep = optimize_model(model)
    assert fold_report(rep).applied == 1
    assert ops(out)["BatchNormalization"] == 0
    assert compare(model, out).equivalent


def test_backward_into_gemm_and_conv():
    rng = np.random.default_rng(1)
    # Conv (no consumer linear after the BN: Relu) -> BN folds backward into the Conv
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "bn_g", "bn_b", "bn_m", "bn_v"], ["y"]),
             helper.make_node("Relu", ["y"], ["out"])]
    inits = _bn_inits(rng, 4) + [init("W", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)),
                                 init("B", rng.standard_normal(4).astype(np.float32))]
    model = make_model(nodes, [vi("x", [1, 3, 8, 8])], [vi("out", [1, 4, 8, 8])], inits)
    out, rep = optimize_model(model)
    assert fold_report(rep).applied == 1 and ops(out)["BatchNormalization"] == 0
    assert compare(model, out).equivalent
    # Gemm with transB, alpha, beta, then a per-channel Mul/Add chain (Unified-Norm-like)
    nodes = [helper.make_node("Gemm", ["x", "W", "C"], ["g"], transB=1, alpha=0.5, beta=2.0),
             helper.make_node("Div", ["g", "s"], ["g1"]), helper.make_node("Mul", ["g1", "w"], ["g2"]),
             helper.make_node("Add", ["g2", "b"], ["y"]), helper.make_node("Relu", ["y"], ["out"])]
    inits = [init("W", rng.standard_normal((5, 6)).astype(np.float32)), init("C", rng.standard_normal(5).astype(np.float32)),
             init("s", (0.5 + rng.random(5)).astype(np.float32)), init("w", rng.standard_normal(5).astype(np.float32)),
             init("b", rng.standard_normal(5).astype(np.float32))]
    model = make_model(nodes, [vi("x", [4, 6])], [vi("out", [4, 5])], inits)
    out, rep = optimize_model(model)
    assert fold_report(rep).applied == 1 and ops(out) == collections.Counter({"Gemm": 1, "Relu": 1})
    assert compare(model, out).equivalent


def test_backward_fold_past_a_shape_reader():
    """LeViT's Linear+BatchNorm1d: y = MatMul(x, W); Reshape(BN(Flatten(y)), Shape(y)). The Shape
    reads y's shape alone, which the fold keeps: the BN folds backward into the MatMul (it was
    declined as "read elsewhere"). A value reader beside it still blocks the fold."""
    from normopt.proof import prove

    rng = np.random.default_rng(5)
    d, c = 8, 6
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"]), helper.make_node("Flatten", ["y"], ["f"], axis=2),
             helper.make_node("BatchNormalization", ["f", "bn_g", "bn_b", "bn_m", "bn_v"], ["fb"], epsilon=1e-5),
             helper.make_node("Shape", ["y"], ["ys"]), helper.make_node("Reshape", ["fb", "ys"], ["r"]),
             helper.make_node("Relu", ["r"], ["out"])]
    inits = _bn_inits(rng, c) + [init("W", rng.standard_normal((d, c)).astype(np.float32))]
    model = make_model(nodes, [vi("x", ["batch", 5, d])], [vi("out", ["batch", 5, c])], inits)
    out, rep = optimize_model(model, shapes={"batch": (2,)})
    assert fold_report(rep).applied == 1 and ops(out)["BatchNormalization"] == 0, fold_report(rep).declined
    assert compare(model, out, input_opts=InputOptions(shapes={"batch": (2,)})).equivalent
    assert prove(model, out).proved
    # y also read for its values (a second output): the fold would change what that reader sees
    model.graph.node.append(helper.make_node("Neg", ["y"], ["y_neg"]))
    model.graph.output.append(vi("y_neg", ["batch", 5, c]))
    out, rep = optimize_model(model, shapes={"batch": (2,)})
    assert ops(out)["BatchNormalization"] == 1


def test_conv_with_padding_is_not_a_forward_target():
    """Zero padding of a*x+t is not a*pad(x)+t: forward fold into a padded Conv is declined."""
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Mul", ["x", "a"], ["xa"]), helper.make_node("Add", ["xa", "t"], ["y"]),
             helper.make_node("Conv", ["y", "W"], ["out"], pads=[1, 1, 1, 1])]
    inits = [init("a", (0.5 + rng.random((1, 3, 1, 1))).astype(np.float32)), init("t", rng.standard_normal((1, 3, 1, 1)).astype(np.float32)),
             init("W", rng.standard_normal((4, 3, 3, 3)).astype(np.float32))]
    model = make_model(nodes, [vi("x", [1, 3, 6, 6])], [vi("out", [1, 4, 6, 6])], inits)
    out, rep = optimize_model(model)
    r = fold_report(rep)
    assert r.applied == 0 and r.declined and "graph input" in r.declined[0]["reason"]
    # the forward side names the padding, not "neither a linear op nor a layout op"
    assert "pads its input with zeros" in r.declined[0]["reason"], r.declined[0]["reason"]
    assert compare(model, out).equivalent


def test_transpose_that_moves_the_channel_axis_is_declined():
    """BN over axis 1 of [B, C, N] then Transpose(0, 2, 1) is fine; Transpose(1, 0, 2) puts the
    channel on axis 0, which the MatMul does not contract: declined, never folded."""
    rng = np.random.default_rng(3)
    for perm, folds in [([0, 2, 1], True), ([1, 0, 2], False)]:
        nodes = [helper.make_node("BatchNormalization", ["x", "bn_g", "bn_b", "bn_m", "bn_v"], ["y"]),
                 helper.make_node("Transpose", ["y"], ["yt"], perm=perm),
                 helper.make_node("MatMul", ["yt", "W"], ["out"])]
        inits = _bn_inits(rng, 4) + [init("W", rng.standard_normal((4 if folds else 6, 3)).astype(np.float32))]
        shape_out = [2, 6, 3] if folds else [4, 2, 3]
        model = make_model(nodes, [vi("x", [2, 4, 6])], [vi("out", shape_out)], inits)
        out, rep = optimize_model(model)
        assert (fold_report(rep).applied == 1) == folds, fold_report(rep).declined
        assert compare(model, out).equivalent


def test_shared_weight_is_copied():
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("Mul", ["x", "a"], ["xa"]), helper.make_node("Add", ["xa", "t"], ["y"]),
             helper.make_node("MatMul", ["y", "W"], ["o1"]), helper.make_node("MatMul", ["x", "W"], ["o2"])]
    inits = [init("a", (0.5 + rng.random(4)).astype(np.float32)), init("t", rng.standard_normal(4).astype(np.float32)),
             init("W", rng.standard_normal((4, 3)).astype(np.float32))]
    model = make_model(nodes, [vi("x", [2, 4])], [vi("o1", [2, 3]), vi("o2", [2, 3])], inits)
    out, rep = optimize_model(model)
    assert fold_report(rep).applied == 1
    w = {i.name: onnx.numpy_helper.to_array(i) for i in out.graph.initializer}
    mm2 = next(n for n in out.graph.node if n.output[0] == "o2")
    assert np.array_equal(w[mm2.input[1]], onnx.numpy_helper.to_array(inits[2]))
    assert compare(model, out).equivalent


def test_rms_gamma_is_left_to_the_norm():
    """The gamma Mul of a decomposed RMSNorm is per-channel, but ORT fuses the RMSNorm only
    with it in place: it is not taken as an affine norm."""
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("Mul", ["x", "x"], ["sq"]), helper.make_node("ReduceMean", ["sq"], ["ms"], axes=[-1]),
             helper.make_node("Add", ["ms", "eps"], ["mse"]), helper.make_node("Sqrt", ["mse"], ["r"]),
             helper.make_node("Div", ["x", "r"], ["n"]), helper.make_node("Mul", ["n", "g"], ["y"]),
             helper.make_node("MatMul", ["y", "W"], ["out"])]
    inits = [init("eps", np.float32(1e-6)), init("g", rng.standard_normal(4).astype(np.float32)),
             init("W", rng.standard_normal((4, 3)).astype(np.float32))]
    model = make_model(nodes, [vi("x", [2, 4])], [vi("out", [2, 3])], inits)
    out, rep = optimize_model(model)
    assert fold_report(rep).applied == 0 and ops(out)["Mul"] == 2


@pytest.mark.usefixtures("torch_available")
def test_inspect_reports_folds_and_declines(tmp_path):
    from normopt.inspect import inspect_model
    from normopt.models import builders as B
    from normopt.models.export import example_inputs, export

    for wrong, expect in [(False, "fold_affine: folds backward into"), (True, "left alone by fold_affine")]:
        m = B.norm_after_linear(wrong_axis=wrong)
        src = tmp_path / f"m{wrong}.onnx"
        export(m, example_inputs(m, batch=2), str(src))
        rows = [r for r in inspect_model(str(src)) if r["kind"] == "BatchNormalization"]
        assert len(rows) == 1 and rows[0]["outcome"].startswith(expect), rows


def test_inspect_lists_the_affine_chains_optimize_folds(tmp_path):
    """A held-out trial: MobileBERT's NoNorm (a Linear, then Mul and Add by per-channel
    constants) is no norm the recognizers list, so `inspect` printed "no normalizations found"
    while `optimize` folded it. inspect now lists fold_affine's affine chains too, with the
    linear op they fold into (an unnamed one by its op and output)."""
    from normopt.inspect import inspect_model

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Mul", ["xw", "a"], ["xa"], name="nonorm_mul"),
             helper.make_node("Add", ["xa", "t"], ["y"], name="nonorm_add")]
    inits = [init("W", rng.standard_normal((8, 8)).astype(np.float32)),
             init("a", (0.5 + rng.random(8)).astype(np.float32)), init("t", rng.standard_normal(8).astype(np.float32))]
    src = tmp_path / "nonorm.onnx"
    onnx.save(make_model(nodes, [vi("x", [2, 8])], [vi("y", [2, 8])], inits), src)
    rows = inspect_model(str(src))
    assert len(rows) == 1 and rows[0]["kind"].startswith("per-channel affine"), rows
    assert rows[0]["outcome"] == "fold_affine: folds backward into <MatMul writing 'xw'>", rows


@pytest.mark.usefixtures("torch_available")
def test_rms_beta_folds_through_token_gather_into_head(tmp_path):
    """The beta Add ln_to_rms keeps after the final SimplifiedLayerNormalization (its reader is
    a cls-token Gather, not a linear op) folds forward through the Gather into the head."""
    from normopt.models import builders as B
    from normopt.models.export import example_inputs, export

    m = B.vit("tiny")
    src = tmp_path / "vit.onnx"
    export(m, example_inputs(m, batch=2), str(src))
    r = optimize(str(src), str(tmp_path / "o.onnx"))
    assert fold_report(r.report).applied == 1
    out = onnx.load(tmp_path / "o.onnx")
    assert leftover_norms(out) == []
    assert ops(out)["SimplifiedLayerNormalization"] == 5


def test_beta_not_folded_into_a_wide_biasless_head():
    """An LM head has no bias and a vocabulary far wider than d: folding beta into it would add
    an Add over the logits to remove one over d channels. Declined with that reason."""
    rng = np.random.default_rng(6)
    d, vocab = 8, 64
    nodes = [helper.make_node("SimplifiedLayerNormalization", ["x", "g"], ["n"], axis=-1, epsilon=1e-5),
             helper.make_node("Add", ["n", "beta"], ["y"]), helper.make_node("MatMul", ["y", "W"], ["logits"])]
    inits = [init("g", np.ones(d, np.float32)), init("beta", rng.standard_normal(d).astype(np.float32)),
             init("W", rng.standard_normal((d, vocab)).astype(np.float32))]
    model = make_model(nodes, [vi("x", [2, d])], [vi("logits", [2, vocab])], inits)
    out, rep = optimize_model(model)
    r = fold_report(rep)
    assert r.applied == 0 and "output channels" in r.declined[0]["reason"]
    assert ops(out)["Add"] == 1 and compare(model, out).equivalent
