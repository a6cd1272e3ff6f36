"""Pre-CRMSNorm (opt-in crms pass): zero-mean streams carried in d-1 channels. Each case checks
what was compressed and equivalence against ONNX Runtime running the original model."""

from __future__ import annotations

import collections

import onnx
import pytest

from normopt import optimize_model
from normopt.runtime_tests.equivalence import compare
from normopt.runtime_tests.inputs import InputOptions, input_specs

from conftest import preln_stream_model, run_cli


def crms_report(report):
    return next(p for p in report.passes if p.name == "crms")


def widths(model):
    return {tuple(i.dims) for i in model.graph.initializer if len(i.dims) == 2}


@pytest.mark.parametrize("kw", [dict(), dict(ln_form="div"), dict(gemm_writer=True), dict(tied_reader=True), dict(opset=18, ln_form="recip")],
                         ids=["ln-op", "decomposed", "gemm-writer", "tied-head", "opset18"])
def test_hand_built_streams(kw):
    m = preln_stream_model(d=16, **kw)
    out, rep = optimize_model(m, opt_in=["crms"])
    assert crms_report(rep).applied == 3
    assert compare(m, out, seeds=3).equivalent
    c = collections.Counter(n.op_type for n in out.graph.node)
    assert c["SimplifiedLayerNormalization"] == 0 and c["ReduceSum"] >= 6
    assert any(15 in shape for shape in widths(out))  # d-1 wide weights


def test_not_run_unless_asked():
    m = preln_stream_model()
    out, rep = optimize_model(m)
    assert "crms" not in [p.name for p in rep.passes]
    assert collections.Counter(n.op_type for n in out.graph.node)["SimplifiedLayerNormalization"] == 3


def test_exposed_stream_is_never_compressed():
    m = preln_stream_model(expose_stream=True)
    out, rep = optimize_model(m, opt_in=["crms"])
    assert crms_report(rep).applied == 0
    assert compare(m, out).equivalent


@pytest.mark.usefixtures("torch_available")
@pytest.mark.parametrize("name", ["gpt", "gpt-tied-lm", "vit-cls", "vit-mean", "dual-patchnorm"])
def test_builders(tmp_path, name):
    from normopt.models import builders as B
    from normopt.models.export import example_inputs, export

    model = {"gpt": lambda: B.gpt("tiny"), "gpt-tied-lm": lambda: B.gpt("tiny", lm_head=True, tied=True),
             "vit-cls": lambda: B.vit("tiny"), "vit-mean": lambda: B.vit("tiny", pool="mean"),
             "dual-patchnorm": lambda: B.vit("tiny", dual_patchnorm=True)}[name]()
    src = tmp_path / "m.onnx"
    export(model, example_inputs(model, batch=2, seq=16), str(src))
    m = onnx.load(src)
    out, rep = optimize_model(m, opt_in=["crms"])
    expected = 6 if name == "dual-patchnorm" else 5
    assert crms_report(rep).applied == expected, crms_report(rep).declined
    assert compare(m, out, seeds=3).equivalent


@pytest.mark.usefixtures("torch_available")
@pytest.mark.parametrize("kind,compressed", [("whisper-encoder", 5), ("clip-vision", 5), ("gpt2", 0)])
def test_hf_exports(tmp_path, kind, compressed):
    """Whisper and CLIP compress; GPT-2's TorchScript export reads the stream with Shape
    (compression would change it): declined with that reason, still equivalent."""
    from normopt.models.hf import export_hf

    src = tmp_path / "m.onnx"
    export_hf(kind, str(src))
    m = onnx.load(src)
    shapes = {s.name: tuple(d if isinstance(d, int) else (2 if i == 0 else 16) for i, d in enumerate(s.dims)) for s in input_specs(m)}
    opts = InputOptions(shapes=shapes, int_ranges={"attention_mask": (1, 2)} if "attention_mask" in shapes else {})
    out, rep = optimize_model(m, opt_in=["crms"])
    r = crms_report(rep)
    assert r.applied == compressed
    if compressed == 0:
        assert r.declined and all("Shape" in d["reason"] for d in r.declined)
    assert compare(m, out, seeds=2, input_opts=opts).equivalent


def test_crms_is_measured_and_decided(tmp_path, monkeypatch):
    """With --crms, optimize times CRMS against RMS and keeps CRMS only if it is faster. (The
    RMS form is pinned to the single op CRMS compresses; its own timing is tested elsewhere.)"""
    from normopt import api
    from normopt.passes import ln_to_rms

    monkeypatch.setattr(ln_to_rms, "choose_rms_form", lambda ctx, *a: "SimplifiedLayerNormalization")
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(preln_stream_model(d=32), src)
    res = api.optimize(str(src), str(out), opt_in=["crms"], tune=True)
    notes = res.report.notes
    assert any(n.startswith("crms: measured on cpu") and ("kept CRMS" in n or "kept RMS" in n) for n in notes), notes
    assert res.verification.equivalent


def test_cli_crms_flag(tmp_path):
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(preln_stream_model(d=32), src)
    r = run_cli("optimize", src, "-o", out, "--crms", "--no-tune")
    assert r.returncode == 0, r.stderr
    assert collections.Counter(n.op_type for n in onnx.load(out).graph.node)["ReduceSum"] >= 6  # CRMSNorm readers
    assert run_cli("verify", src, out).returncode == 0


def test_passes_lists_crms_as_opt_in():
    r = run_cli("passes")
    line = next(ln for ln in r.stdout.splitlines() if " crms " in ln)
    assert "(opt-in)" in line
