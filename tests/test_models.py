"""Equivalence and conversion counts on real exports: HF transformers models built from configs
with random weights (TorchScript and dynamo exporters) and normopt's own builders.

Each case asserts the number of LayerNorms converted and equivalence with ONNX Runtime running
the original export (several seeds, fp32 atol 1e-4 / rtol 1e-3; fp16 looser)."""

from __future__ import annotations

import collections
import os

import numpy as np
import onnx
import pytest

from normopt.api import optimize
from normopt.runtime_tests.inputs import InputOptions, input_specs

pytestmark = [pytest.mark.usefixtures("torch_available"), pytest.mark.slow]  # exports: the slow group

# (kind, LNs converted with 2 layers, LNs in the model)
HF_CASES = [
    ("gpt2", 5, 5),
    ("gpt2-lm", 5, 5),  # tied token table read by lm_head
    ("vit", 5, 5),
    ("dinov2", 5, 5),  # LayerScale writers; the position table is Resized at run time, centered there
    ("deit", 5, 5),  # zero cls and distillation tokens beside centered patches
    ("beit", 5, 5),  # LayerScale; a relative position bias gathered from a table per layer
    ("vitmae", 5, 5),  # a random patch shuffle: the dynamic check cannot compare, the proof decides alone
    ("opt", 5, 5),  # do_layer_norm_before=True
    ("clip-vision", 6, 6),  # pooler output: pre_layrnorm + 4 block LNs + post_layernorm
    ("whisper-encoder", 5, 5),  # conv -> gelu front end: one explicit centering
    ("bert", 1, 5),  # Post-LN: only the embedding LN
    ("clip-vision-hidden", 1, 5),  # last_hidden_state exposes the raw stream: only pre_layrnorm
    ("llama", 0, 0),  # already RMSNorm
    ("opt-lm-past", 5, 5),  # KV cache: past_key_values.* in, present.* out
    ("gpt2-lm-past", 5, 5),
]


def _opts(path, kind):
    m = onnx.load(path, load_external_data=False)
    shapes = {}
    for s in input_specs(m):
        shapes[s.name] = tuple(d if isinstance(d, int) else (2 if i == 0 else 16) for i, d in enumerate(s.dims))
    ranges = {"attention_mask": (1, 2)} if any(s.name == "attention_mask" for s in input_specs(m)) else {}
    return InputOptions(shapes=shapes, int_ranges=ranges)


def _run(src, out, opts, **kw):
    r = optimize(str(src), str(out), input_opts=opts, **kw)
    if r.verification is None and not r.unchanged:  # the dynamic check could not run: the proof alone gated it
        assert any(n.startswith("dynamic check not run: ") for n in r.report.notes), r.report.notes
    else:
        assert r.unchanged or r.verification.equivalent  # unchanged: a byte-identical copy
    if not r.unchanged and kw.get("verify", True):  # every output written is proved too
        assert r.proof is not None and r.proof.proved, r.proof and r.proof.summary
    ln = next(p for p in r.report.passes if p.name == "ln_to_rms")
    return r, ln


def _count(path, op):
    return collections.Counter(n.op_type for n in onnx.load(path, load_external_data=False).graph.node)[op]


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("kind,converted,total", HF_CASES, ids=[c[0] for c in HF_CASES])
def test_hf_export(tmp_path, kind, converted, total, dynamo):
    from normopt.models.hf import export_hf

    if kind == "llama" and not dynamo:
        pytest.skip("the TorchScript exporter cannot export LlamaModel (aten::diff) with torch 2.13")
    src = tmp_path / f"{kind}.onnx"
    export_hf(kind, str(src), dynamo=dynamo, dynamic=not (kind == "llama"))  # dynamo: opset 18 by default
    r, ln = _run(src, tmp_path / "out.onnx", None)  # no flags: the input defaults must do
    assert ln.applied == converted, (ln.matched, ln.declined)
    assert len(ln.declined) == total - converted
    assert _count(tmp_path / "out.onnx", "SimplifiedLayerNormalization") == converted
    if dynamo and not r.unchanged:
        assert (tmp_path / "out.onnx.data").exists()  # external data in, external data out


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_hf_levit_batchnorms_fold(tmp_path, dynamo):
    """LeViT puts BatchNorm1d after its Linears (over the flattened tokens, reshaped back by a
    Shape of the Linear's output) and BatchNorm2d after its Conv stem: every one folds."""
    from normopt.models.hf import export_hf

    src = tmp_path / "levit.onnx"
    export_hf("levit", str(src), dynamo=dynamo)
    n_bn = _count(src, "BatchNormalization")
    assert n_bn > 0
    r, _ = _run(src, tmp_path / "o.onnx", None)
    fa = next(p for p in r.report.passes if p.name == "fold_affine")
    assert fa.applied == n_bn, fa.declined
    assert _count(tmp_path / "o.onnx", "BatchNormalization") == 0


def test_hf_gpt2_opset14_decomposed(tmp_path):
    from normopt.models.hf import export_hf

    src = tmp_path / "gpt2_14.onnx"
    export_hf("gpt2", str(src), opset=14)
    assert _count(src, "LayerNormalization") == 0 and _count(src, "ReduceMean") == 10
    r, ln = _run(src, tmp_path / "o.onnx", _opts(src, "gpt2"))
    assert ln.applied == 5
    assert _count(tmp_path / "o.onnx", "ReduceMean") == 0


def test_hf_gpt2_fp16(tmp_path):
    from normopt.models.hf import export_hf

    src = tmp_path / "gpt2_fp16.onnx"
    export_hf("gpt2", str(src), opset=18, dynamo=True, fp16=True)
    r, ln = _run(src, tmp_path / "o.onnx", _opts(src, "gpt2"))
    assert ln.applied == 5
    assert r.verification.outputs[0].dtype == "float16"


def test_hf_gpt2_lm_logits_keep_tied_table(tmp_path):
    """Left tied, centering the token table moves the logits by whole units: the table must be
    copied. The verification would catch it; here we also check the lm_head's table."""
    from normopt.models.hf import export_hf

    src = tmp_path / "lm.onnx"
    export_hf("gpt2-lm", str(src))
    _run(src, tmp_path / "o.onnx", _opts(src, "gpt2-lm"))
    before = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(src).graph.initializer}
    after = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(tmp_path / "o.onnx").graph.initializer}
    tables = [a for a in after.values() if a.ndim == 2 and a.shape[0] == 512]
    assert any(np.abs(t.astype(np.float64).mean(1)).max() < 1e-5 for t in tables)  # centered copy for the Gather
    originals = [b for b in before.values() if b.ndim == 2 and 512 in b.shape]
    assert any(any(a.shape == o.shape and np.array_equal(a, o) for a in after.values()) for o in originals)


# --- normopt's own builders ------------------------------------------------------------------------

OWN = [
    # name, builder kwargs, converted, total LNs
    ("gpt", dict(kind="gpt"), 5, 5),
    ("gpt-tied-lm", dict(kind="gpt", lm_head=True, tied=True), 5, 5),
    ("gpt-layerscale", dict(kind="gpt", layer_scale=0.5), 5, 5),
    ("vit-cls", dict(kind="vit"), 5, 5),
    ("vit-mean", dict(kind="vit", pool="mean"), 5, 5),
    ("vit-layerscale", dict(kind="vit", layer_scale=0.1), 5, 5),
    ("dual-patchnorm", dict(kind="vit", dual_patchnorm=True), 6, 7),  # the LN on raw patches stays
    ("bert-postln", dict(kind="bert"), 1, 5),
    ("llama", dict(kind="llama"), 0, 0),
]


def _build(kind, **kw):
    from normopt.models import builders as B

    return {"gpt": B.gpt, "vit": B.vit, "bert": B.bert, "llama": B.llama}[kind]("tiny", **kw)


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name,kw,converted,total", OWN, ids=[c[0] for c in OWN])
def test_own_builders(tmp_path, name, kw, converted, total, fp16):
    from normopt.models.export import example_inputs, export

    kw = dict(kw)
    model = _build(kw.pop("kind"), **kw)
    src = tmp_path / f"{name}.onnx"
    export(model, example_inputs(model, batch=2, seq=16), str(src), fp16=fp16)
    r, ln = _run(src, tmp_path / "o.onnx", InputOptions())
    assert ln.applied == converted, (ln.matched, ln.declined)
    assert len(ln.declined) == total - converted


def test_target_onnx_on_gpt(tmp_path):
    from normopt.models.export import example_inputs, export

    model = _build("gpt")
    src = tmp_path / "g.onnx"
    export(model, example_inputs(model, batch=2, seq=16), str(src))
    r, ln = _run(src, tmp_path / "o.onnx", InputOptions(), target="onnx")
    assert ln.applied == 5
    assert _count(tmp_path / "o.onnx", "SimplifiedLayerNormalization") == 0
    assert _count(tmp_path / "o.onnx", "LayerNormalization") == 0


def test_norm_models_untouched_by_ln_pass(tmp_path):
    """RepBN (SLAB) and Unified-Norm models have no LayerNorm: nothing converts, still equivalent."""
    from normopt.models import builders as B
    from normopt.models.export import example_inputs, export

    for name, model in [("slab", B.slab("tiny")), ("un", B.unified("tiny"))]:
        src = tmp_path / f"{name}.onnx"
        export(model, example_inputs(model, batch=2), str(src))
        r, ln = _run(src, tmp_path / f"{name}.o.onnx", InputOptions())
        assert ln.applied == 0 and not ln.declined


@pytest.mark.parametrize("kind,model_type,converted", [("gpt2", "gpt2", 5), ("bert", "bert", 1)])
def test_ort_transformers_optimized_exports(tmp_path, kind, model_type, converted):
    """Graphs already passed through onnxruntime.transformers.optimizer carry
    com.microsoft SkipLayerNormalization: streams that convert are split and converted; the
    SkipLNs of streams left alone come back as they were."""
    from onnxruntime.transformers import optimizer

    from normopt.models.hf import export_hf

    src = tmp_path / f"{kind}.onnx"
    export_hf(kind, str(src), opset=17)
    fused = tmp_path / f"{kind}.ort.onnx"
    optimizer.optimize_model(str(src), model_type=model_type, num_heads=4, hidden_size=64).save_model_to_file(str(fused))
    n_skip = _count(fused, "SkipLayerNormalization")
    assert n_skip > 0
    out = tmp_path / "o.onnx"
    r, ln = _run(fused, out, _opts(fused, kind))
    assert ln.applied == converted, (ln.matched, ln.declined)
    after = collections.Counter(n.op_type for n in onnx.load(out).graph.node)
    assert after["LayerNormalization"] + after["SkipLayerNormalization"] + after["SimplifiedLayerNormalization"] >= converted
    if kind == "bert":
        # only the embedding LN converts; every Post-LN SkipLN is restored unchanged in kind
        assert after["SkipLayerNormalization"] == n_skip
    from normopt.inspect import inspect_model

    rows = [r for r in inspect_model(str(fused)) if r["kind"] == "SkipLayerNormalization"]
    assert len(rows) == n_skip
    assert all("ln_to_rms" in r["outcome"] for r in rows), rows


@pytest.mark.parametrize("name", ["gpt2-hf", "gpt-tied-lm", "slab", "unified", "bert-postln", "dual-patchnorm"])
def test_idempotent_and_deterministic(tmp_path, name):
    """optimize(optimize(m)) leaves the graph unchanged; two runs give byte-identical files."""
    from normopt.models import builders as B
    from normopt.models.export import example_inputs, export
    from normopt.models.hf import export_hf

    src = tmp_path / "m.onnx"
    opts = InputOptions()
    if name == "gpt2-hf":
        export_hf("gpt2", str(src))
        opts = _opts(src, "gpt2")
    else:
        model = {"gpt-tied-lm": lambda: B.gpt("tiny", lm_head=True, tied=True), "slab": lambda: B.slab("tiny"),
                 "unified": lambda: B.unified("tiny"), "bert-postln": lambda: B.bert("tiny"),
                 "dual-patchnorm": lambda: B.vit("tiny", dual_patchnorm=True)}[name]()
        export(model, example_inputs(model, batch=2, seq=16), str(src))
    a, b, c = (tmp_path / f"{k}.onnx" for k in "abc")
    optimize(str(src), str(a), input_opts=opts)
    optimize(str(src), str(b), input_opts=opts)
    assert a.read_bytes() == b.read_bytes()
    r = optimize(str(a), str(c), input_opts=opts)
    assert onnx.load(c).graph.SerializeToString() == onnx.load(a).graph.SerializeToString()
    assert all(p.applied == 0 for p in r.report.passes), [(p.name, p.matched) for p in r.report.passes if p.applied]


def test_optimize_writes_nothing_but_its_output(tmp_path):
    """No stray files in the working directory. ORT's symbolic shape inference saves a debug
    model into the cwd when its inference is incomplete, as it is on this BERT export."""
    import subprocess
    import sys

    from normopt.models.hf import export_hf

    work = tmp_path / "work"
    work.mkdir()
    export_hf("bert", str(work / "m.onnx"))
    r = subprocess.run([sys.executable, "-m", "normopt.cli", "optimize", "m.onnx", "-o", "o.onnx", "--shape", "batch_size=2"],
                       cwd=work, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(work)) == ["m.onnx", "o.onnx"]
