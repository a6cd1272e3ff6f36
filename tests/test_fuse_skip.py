"""fuse_skip: residual Add + (Simplified)LayerNormalization -> ORT Skip ops, decided by timing
on the EP (or fixed defaults with --no-tune); the final guard in optimize."""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import pytest

from normopt import optimize_model
from normopt.passes import fuse_skip
from normopt.runtime_tests.equivalence import compare

from conftest import preln_stream_model, run_cli


def ops(m):
    return collections.Counter(n.op_type for n in m.graph.node)


def force(monkeypatch, fuse: bool):
    """Make the measurement say the fused form is faster (or slower); the RMS form stays the
    default SimplifiedLayerNormalization (its own timing is not under test here)."""
    from normopt.passes import ln_to_rms

    monkeypatch.setattr(fuse_skip, "time_family", lambda *a, **k: (1.0, 0.5) if fuse else (0.5, 1.0))
    monkeypatch.setattr(ln_to_rms, "choose_rms_form", lambda ctx, *a: "SimplifiedLayerNormalization")


@pytest.mark.parametrize("ln_form", ["op", "div"])
def test_fused_when_faster_and_equivalent(monkeypatch, ln_form):
    force(monkeypatch, True)
    m = preln_stream_model(ln_form=ln_form, layers=3)
    out, rep = optimize_model(m, tune=True)
    r = next(p for p in rep.passes if p.name == "fuse_skip")
    # every norm but the first reads a residual Add: 3 fused (the first reads the embedding sum of
    # a Gather and a constant, which the pass leaves alone)
    assert r.applied == ops(out)["SkipSimplifiedLayerNormalization"] == 3
    assert compare(m, out, seeds=3).equivalent
    assert any("fuse_skip: fused" in n for n in rep.notes)


def test_kept_unfused_when_slower(monkeypatch):
    force(monkeypatch, False)
    m = preln_stream_model(layers=3)
    out, rep = optimize_model(m, tune=True)
    assert ops(out)["SkipSimplifiedLayerNormalization"] == 0
    assert all("kept unfused" in d["reason"] or "no Skip fusion" in d["reason"] for d in next(p for p in rep.passes if p.name == "fuse_skip").declined)


def test_layernorm_that_stays_gets_skiplayernorm(monkeypatch):
    force(monkeypatch, True)
    m = preln_stream_model(expose_stream=True, layers=2)  # the stream is exposed: LNs stay LNs
    out, rep = optimize_model(m, tune=True)
    assert ops(out)["SkipLayerNormalization"] >= 1 and ops(out)["LayerNormalization"] >= 1
    assert compare(m, out, seeds=3).equivalent


def test_no_tune_defaults_are_deterministic():
    m = preln_stream_model(layers=3)
    a, _ = optimize_model(m, tune=False, provider="cpu")
    b, _ = optimize_model(m, tune=False, provider="cpu")
    assert a.SerializeToString() == b.SerializeToString()
    assert ops(a)["SkipSimplifiedLayerNormalization"] == 0  # CPU default: unfused


def test_micro_benchmark_runs_both_forms():
    for op in ("SimplifiedLayerNormalization", "LayerNormalization"):
        unfused, fused = fuse_skip.time_family(op, (1, 16, 32), np.float32, op == "LayerNormalization", "cpu", runs=6)
        assert unfused > 0 and fused > 0


def test_cli_records_decisions_and_guard(tmp_path):
    src, out, rep = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "r.json"
    onnx.save(preln_stream_model(layers=3), src)
    r = run_cli("optimize", src, "-o", out, "--report", rep)
    assert r.returncode == 0, r.stderr
    notes = json.loads(rep.read_text())["notes"]
    # the RMS form is measured; the Skip family is measured when the form is a fused op
    assert any(n.startswith("ln_to_rms: emits ") and "measured on cpu" in n for n in notes), notes
    if any("emits SimplifiedLayerNormalization" in n for n in notes):
        assert any(n.startswith("fuse_skip: ") and "measured on cpu" in n for n in notes), notes
    assert any(n.startswith("guard: ") for n in notes), notes
    assert run_cli("verify", src, out).returncode == 0
    r = run_cli("optimize", src, "-o", tmp_path / "o2.onnx", "--no-tune", "--report", rep)
    notes = json.loads(rep.read_text())["notes"]
    assert any("--no-tune default" in n for n in notes) and not any(n.startswith("guard") for n in notes)


def test_guard_writes_input_when_output_is_slower(tmp_path, monkeypatch):
    import normopt.api as api
    from normopt.runtime_tests import latency

    real = latency.bench

    def slower(models, **kw):  # report the output as 20% slower, with a tight CI
        res = real(models, **{**kw, "runs": 2})
        res.models[1].ratio, res.models[1].ci_low, res.models[1].ci_high = 1.2, 1.17, 1.23
        return res

    monkeypatch.setattr(latency, "bench", slower)
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(preln_stream_model(), src)
    res = api.optimize(str(src), str(out), tune=True)
    assert any("wrote the input unchanged" in n for n in res.report.notes)
    assert ops(onnx.load(out)) == ops(onnx.load(src))


def test_opset23_upgrade_gives_rmsnormalization(tmp_path):
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(preln_stream_model(opset=17), src)
    r = run_cli("optimize", src, "-o", out, "--target", "onnx", "--opset", "23", "--no-tune")
    assert r.returncode == 0, r.stderr
    o = onnx.load(out)
    assert next(i.version for i in o.opset_import if i.domain in ("", "ai.onnx")) == 23
    assert ops(o)["RMSNormalization"] == 3 and all(n.domain in ("", "ai.onnx") for n in o.graph.node)
    assert run_cli("verify", src, out).returncode == 0
    r = run_cli("optimize", src, "-o", tmp_path / "x.onnx", "--opset", "15")
    assert r.returncode == 2 and "below" in r.stderr


def test_tuned_cli_records_rms_form_and_beta_decisions(tmp_path):
    src, out, rep = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "r.json"
    m = preln_stream_model(opset=23, layers=2)
    m.ir_version = 10
    onnx.save(m, src)
    r = run_cli("optimize", src, "-o", out, "--report", rep)
    assert r.returncode == 0, r.stderr
    notes = json.loads(rep.read_text())["notes"]
    assert any(n.startswith("ln_to_rms: emits ") and "RMSNormalization" in n for n in notes), notes
    assert any(n.startswith("ln_to_rms: beta kept / beta folded") for n in notes), notes
    assert run_cli("verify", src, out).returncode == 0


def test_beta_kept_variant_is_equivalent():
    m = preln_stream_model(layers=2)
    out, rep = optimize_model(m, options={"fold_beta": False})
    assert rep.beta_folded == 0 and ops(out)["Add"] == ops(m)["Add"] + 3
    assert compare(m, out, seeds=2).equivalent
