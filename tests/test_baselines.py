"""Peer baselines in the latency tables: built, verified, shown as NOT EQUIVALENT when they
differ (never timed silently), and timed next to normopt when they are equivalent."""

from __future__ import annotations

import onnx
import pytest
from onnx import numpy_helper

from normopt.runtime_tests import baselines as B

from conftest import preln_stream_model, run_cli


def test_both_baselines_build_and_verify():
    m = preln_stream_model()
    out = B.build(["ort-transformers", "onnxscript"], m)
    assert [b.label for b in out] == ["ort-transformers", "onnxscript"]
    for b in out:
        assert b.status == "equivalent" and b.model is not None, b.status


def test_a_baseline_that_differs_is_not_timed(monkeypatch):
    def broken(model, *args):
        bad = onnx.ModelProto()
        bad.CopyFrom(model)
        w = next(i for i in bad.graph.initializer if i.name == "l0_w1")
        arr = numpy_helper.to_array(w).copy()
        arr[0, 0] += 1.0
        w.CopyFrom(numpy_helper.from_array(arr, w.name))
        return bad

    monkeypatch.setattr(B, "ort_transformers", broken)
    b = B.build(["ort-transformers"], preln_stream_model())[0]
    assert b.model is None and b.status.startswith("NOT EQUIVALENT")


def test_unknown_baseline_is_a_usage_error():
    with pytest.raises(Exception, match="unknown baseline"):
        B.parse("ort-transformers,tvm")


def test_model_type_inference():
    assert B.infer_model_type(preln_stream_model()) == "bert"


def test_cli_bench_with_baselines(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(preln_stream_model(d=32), src)
    r = run_cli("bench", src, "--baselines", "ort-transformers,onnxscript", "--runs", "6", "--warmup", "1", "--threads", "1",
                "--format", "csv")
    assert r.returncode == 0, r.stderr
    labels = [ln.split(",")[0] for ln in r.stdout.strip().splitlines()[1:]]
    # normopt's row is what `normopt optimize` writes (tuned, guarded, verified), and says so
    assert labels == ["m.onnx", "ort-transformers", "onnxscript", B.NORMOPT_LABEL]
    assert B.NORMOPT_LABEL == "normopt optimize (tuned)"
    assert "baseline ort-transformers: equivalent" in r.stderr
    assert f"baseline {B.NORMOPT_LABEL}: verified equivalent" in r.stderr


def test_normopt_row_is_the_optimize_output(tmp_path):
    from normopt.runtime_tests.latency import count_norm_ops

    src = tmp_path / "m.onnx"
    onnx.save(preln_stream_model(d=32), src)
    b = B.optimized_by_normopt(str(src), str(tmp_path), threads=1)
    assert b.status == "verified equivalent" and isinstance(b.model, str) and b.model.startswith(str(tmp_path))
    ops = count_norm_ops(onnx.load(b.model))
    assert "LN" not in ops and ops.get("RMS", 0) + ops.get("SkipRMS", 0) == 3  # every LN converted, as optimize does


def test_plot_needs_matplotlib_or_writes_png(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(preln_stream_model(), src)
    png = tmp_path / "r.png"
    r = run_cli("bench", src, src, "--runs", "4", "--warmup", "1", "--plot", png)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert r.returncode == 2 and "matplotlib" in r.stderr
    else:
        assert r.returncode == 0 and png.stat().st_size > 1000
