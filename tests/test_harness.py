"""The ORT harness: generated inputs, equivalence metrics and failures, latency statistics."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from normopt.errors import NormoptError
from normopt.runtime_tests import InputOptions, bench, compare, make_feeds
from normopt.runtime_tests.latency import bootstrap_ratio

from normopt.runtime_tests.inputs import DEFAULT_SEQ, plan_inputs

from conftest import init, make_model, preln_stream_model, vi


def test_token_ids_bounded_by_gather_rows():
    m = preln_stream_model(vocab=7)
    for seed in range(5):
        ids = make_feeds(m, seed)["ids"]
        assert ids.dtype == np.int64 and ids.min() >= 0 and ids.max() < 7
    ids = make_feeds(m, 0, InputOptions(int_ranges={"ids": (3, 4)}))["ids"]
    assert (ids == 3).all()


def test_int_input_without_gather_needs_a_range():
    m = make_model([helper.make_node("Cast", ["n"], ["y"], to=TensorProto.FLOAT)], [vi("n", [2], TensorProto.INT64)], [vi("y", [2])])
    with pytest.raises(NormoptError, match="--int-range n="):
        make_feeds(m, 0)
    assert make_feeds(m, 0, InputOptions(int_ranges={"n": (0, 5)}))["n"].max() < 5


def test_seeds_give_different_float_inputs_and_same_for_same_seed():
    m = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [4, 4])], [vi("y", [4, 4])])
    a, b, c = make_feeds(m, 0)["x"], make_feeds(m, 0)["x"], make_feeds(m, 1)["x"]
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_shape_for_input_and_for_dim_name():
    m = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", ["b", "s", 4])], [vi("y", ["b", "s", 4])])
    assert make_feeds(m, 0, InputOptions(shapes={"x": (2, 3, 4)}))["x"].shape == (2, 3, 4)
    assert make_feeds(m, 0, InputOptions(shapes={"b": (5,), "s": (6,)}))["x"].shape == (5, 6, 4)
    # a dim left out gets its default (a leading one 1, another DEFAULT_SEQ) and the plan says so
    assert make_feeds(m, 0, InputOptions(shapes={"b": (5,)}))["x"].shape == (5, DEFAULT_SEQ, 4)
    assert make_feeds(m, 0)["x"].shape == (1, DEFAULT_SEQ, 4)
    assert f"s={DEFAULT_SEQ} (sequence)" in plan_inputs(m, InputOptions(shapes={"b": (5,)})).line()
    with pytest.raises(NormoptError, match="does not fit"):
        make_feeds(m, 0, InputOptions(shapes={"x": (2, 3, 5)}))


def test_npz_inputs_checked(tmp_path):
    m = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [2, 2])], [vi("y", [2, 2])])
    good = tmp_path / "good.npz"
    np.savez(good, x=np.ones((2, 2), np.float32))
    assert make_feeds(m, 0, InputOptions(inputs_npz=str(good)))["x"].sum() == 4
    for name, kw, msg in [("names", {"z": np.ones((2, 2), np.float32)}, "names"),
                          ("dtype", {"x": np.ones((2, 2), np.float64)}, "dtype"),
                          ("shape", {"x": np.ones((3, 2), np.float32)}, "shape")]:
        p = tmp_path / f"{name}.npz"
        np.savez(p, **kw)
        with pytest.raises(NormoptError, match=msg):
            make_feeds(m, 0, InputOptions(inputs_npz=str(p)))


def _two_output_model(scale=1.0, names=("a", "b")):
    return make_model(
        [helper.make_node("Mul", ["x", "s"], [names[0]]), helper.make_node("Relu", ["x"], [names[1]])],
        [vi("x", [3, 5])], [vi(names[0], [3, 5]), vi(names[1], [3, 5])], [init("s", np.float32(scale))])


def test_metrics_per_output_and_tolerances():
    ref = _two_output_model(1.0)
    # the explicit tolerance mode: rel error 5e-4 < rtol 1e-3 passes; at 5e-3 it fails
    res = compare(ref, _two_output_model(1.0 + 5e-4), atol=1e-4, rtol=1e-3)
    assert res.mode == "tolerance"
    a = next(o for o in res.outputs if o.name == "a")
    b = next(o for o in res.outputs if o.name == "b")
    assert b.passed and b.max_abs == 0 and b.cosine == pytest.approx(1.0)
    assert a.passed and 0 < a.max_rel <= 5.1e-4
    res = compare(ref, _two_output_model(1.0 + 5e-3), atol=1e-4, rtol=1e-3)
    assert not res.equivalent and not next(o for o in res.outputs if o.name == "a").passed
    assert compare(ref, _two_output_model(1.0 + 5e-3), rtol=1e-2).equivalent
    # the default judges against float64: a 5e-4 scale error is thousands of times further from
    # exact than the original's rounding (0 here), so it is refused; the unchanged output passes
    res = compare(ref, _two_output_model(1.0 + 5e-4))
    assert res.mode == "exact" and not res.equivalent
    a = next(o for o in res.outputs if o.name == "a")
    assert a.err_cand > 100 * a.bound and a.err_orig == 0
    assert next(o for o in res.outputs if o.name == "b").passed
    assert compare(ref, _two_output_model(1.0)).equivalent


def test_missing_and_extra_outputs_fail():
    res = compare(_two_output_model(), _two_output_model(names=("a", "c")))
    assert not res.equivalent
    assert any("lacks" in p for p in res.problems) and any("extra" in p for p in res.problems)


def test_fp16_outputs_get_looser_default_tolerance():
    def m(scale):
        return make_model([helper.make_node("Mul", ["x", "s"], ["y"])], [vi("x", [8], TensorProto.FLOAT16)],
                          [vi("y", [8], TensorProto.FLOAT16)], [init("s", np.float16(scale))])

    res = compare(m(1.0), m(1.0 + 2 ** -9), exact=False)
    assert res.outputs[0].atol == 1e-2 and res.equivalent


def test_bootstrap_ratio_ci():
    rng = np.random.default_rng(0)
    a = 10 + rng.standard_normal(200) * 0.1
    b = a * 0.9
    r, lo, hi = bootstrap_ratio(a, b)
    assert r == pytest.approx(0.9) and lo <= r <= hi and hi - lo < 0.01
    r, lo, hi = bootstrap_ratio(a, a * (1 + 0.05 * rng.standard_normal(200)))
    assert lo < 1.0 < hi


def test_bench_interleaves_and_reports(tmp_path):
    p = tmp_path / "m.onnx"
    onnx.save(preln_stream_model(), p)
    calls = []
    res = bench([("A", str(p)), ("B", str(p))], threads=1, runs=6, warmup=1, progress=lambda i, n: calls.append(i))
    assert calls == list(range(1, 7))
    assert [m.label for m in res.models] == ["A", "B"]
    assert all(len(m.times_ms) == 6 and m.median_ms > 0 and m.p90_ms >= m.median_ms * 0.5 for m in res.models)
    assert res.models[1].ci_low <= res.models[1].ratio <= res.models[1].ci_high
    assert res.models[0].norm_ops == {"LN": 3}
    assert res.norm_column(res.models[1]) == "3 LN"  # nothing changed against the first model
    assert "| A |" in res.markdown() and res.csv().count("\n") == 2


@pytest.mark.cuda
def test_cuda_equivalence_and_bench(tmp_path):
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("no CUDAExecutionProvider here (needs onnxruntime-gpu on a GPU machine)")
    from normopt import optimize_model

    m = preln_stream_model()
    out, _ = optimize_model(m)
    p, q = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(m, p)
    onnx.save(out, q)
    assert compare(str(p), str(q), provider="cuda").equivalent
    res = bench([("orig", str(p)), ("opt", str(q))], provider="cuda", runs=10, warmup=2)
    assert res.provider == "cuda" and res.models[1].median_ms > 0
