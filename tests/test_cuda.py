"""The CUDA check (benchmarks/cuda_check.sh runs `pytest -m cuda tests/test_cuda.py`).

Tests marked ``cuda`` run on the execution provider NORMOPT_TEST_PROVIDER names: ``cuda`` (the
default: they skip, saying why, where onnxruntime-gpu or the device is missing) or ``cpu`` (the
CPU dry run CI makes, so the same tests never rot on machines without a GPU). They cover
verification on the provider (reference on the CPU EP, candidate on the provider under
ORT_ENABLE_ALL), every op normopt emits (SimplifiedLayerNormalization,
SkipSimplifiedLayerNormalization with output 3, SkipLayerNormalization, RMSNormalization at
opset 23), fp16 and bf16 models, the tuning micro-benchmarks, the guard and the latency harness.

The unmarked tests at the end check the CUDA plumbing on any machine (a silent CPU fallback is
an error; bfloat16 feeds go through OrtValues)."""

from __future__ import annotations

import collections
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from normopt import api
from normopt.models.llm import write_decoder
from normopt.passes import fuse_skip
from normopt.runtime_tests import latency, micro, providers
from normopt.runtime_tests.equivalence import compare
from normopt.runtime_tests.inputs import make_feeds

PROVIDER = os.environ.get("NORMOPT_TEST_PROVIDER", "cuda")
EP = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
CPU_NO_BF16 = "ONNX Runtime's CPU EP has no bfloat16 kernels (LayerNormalization, MatMul, Softmax): bf16 models are checked on CUDA only"


@pytest.fixture(scope="module")
def provider():
    if PROVIDER not in EP:
        pytest.fail(f"NORMOPT_TEST_PROVIDER must be cpu or cuda, not {PROVIDER!r}")
    if PROVIDER == "cuda":
        ok, why = providers.cuda_usable()
        if not ok:
            pytest.skip(f"NORMOPT_TEST_PROVIDER=cuda (the default) but CUDA is unavailable: {why}. "
                        "NORMOPT_TEST_PROVIDER=cpu runs these tests on the CPU EP")
    return PROVIDER


def decoder(tmp_path, name="dec", dtype="float32", opset=17, kv_cache=True, arch="opt", layers=2, seed=0):
    path = str(tmp_path / f"{name}.onnx")
    write_decoder(path, arch=arch, layers=layers, d=64, heads=4, vocab=256, positions=64, dtype=dtype, opset=opset,
                  kv_cache=kv_cache, seed=seed)
    return path


def ops_of(path_or_model) -> collections.Counter:
    m = path_or_model if isinstance(path_or_model, onnx.ModelProto) else onnx.load(path_or_model, load_external_data=False)
    return collections.Counter(n.op_type for n in m.graph.node)


def optimize(src, dst, provider, **kw):
    kw.setdefault("tune", False)
    kw.setdefault("seeds", 1)  # optimize's own check; check_on() then verifies on the provider
    res = api.optimize(src, dst, provider=provider, **kw)
    assert not res.report.errors, res.report.errors
    return res


def check_on(provider, ref, cand):
    """compare() with the candidate on the provider; the original on the provider must agree
    with its CPU reference too (else the provider, not the rewrite, is what differs)."""
    base = compare(ref, ref, seeds=1, provider=provider, level="all", stress=False)
    assert base.equivalent, "the ORIGINAL differs on " + provider + ":\n" + "\n".join(base.summary_lines())
    res = compare(ref, cand, seeds=2, provider=provider, level="all")
    assert res.provider == provider and res.level == "all"
    assert res.equivalent, "\n".join(res.summary_lines())
    assert res.outputs and all(m.cosine > 0.999 for m in res.outputs)
    return res


# ------------------------------------------------------------------------------------------
# verification on the provider


@pytest.mark.cuda
def test_session_runs_on_the_provider(provider):
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    sess = providers.make_session(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), provider)
    assert sess.get_providers()[0] == EP[provider]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_verify_decoder_on_provider(provider, dtype, tmp_path):
    """optimize --provider P (Skip fusion on by default under CUDA), then verify on P."""
    src = decoder(tmp_path, dtype=dtype)
    dst = str(tmp_path / "out.onnx")
    res = optimize(src, dst, provider)
    assert res.verification is not None and res.verification.equivalent
    ops = ops_of(dst)
    assert "LayerNormalization" not in ops and ops["SimplifiedLayerNormalization"] + ops["SkipSimplifiedLayerNormalization"] == 5
    # the --no-tune defaults: every residual Add + norm fused into the Skip op on CUDA, none on the CPU
    fused = {"cuda": True, "cpu": False}[provider]
    assert fuse_skip.DEFAULT_FUSE[provider] is fused
    assert ops["SkipSimplifiedLayerNormalization" if fused else "SimplifiedLayerNormalization"] == 5, ops
    check_on(provider, src, dst)


# ------------------------------------------------------------------------------------------
# every emitted op on the provider


def skip_ln_model(dtype, d=32, n=8):
    """a + b -> LayerNormalization(gamma, beta), the sum also read by a later residual Add: the
    stream (graph inputs) is not zero-mean, so ln_to_rms leaves the LN, and fuse_skip can make it
    SkipLayerNormalization with output 3."""
    rng = np.random.default_rng(3)
    et = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits = [numpy_helper.from_array((1 + 0.1 * rng.standard_normal(d)).astype(dtype), "g"),
             numpy_helper.from_array((0.1 * rng.standard_normal(d)).astype(dtype), "beta"),
             numpy_helper.from_array((rng.standard_normal((d, d)) / np.sqrt(d)).astype(dtype), "w")]
    nodes = [helper.make_node("Add", ["a", "b"], ["s"]),
             helper.make_node("LayerNormalization", ["s", "g", "beta"], ["y"], axis=-1, epsilon=1e-5),
             helper.make_node("MatMul", ["y", "w"], ["m"]),
             helper.make_node("Add", ["s", "m"], ["z"])]
    g = helper.make_graph(nodes, "skipln", [helper.make_tensor_value_info(k, et, [2, n, d]) for k in ("a", "b")],
                          [helper.make_tensor_value_info("z", et, [2, n, d]), helper.make_tensor_value_info("y", et, [2, n, d])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def output3_read(path, op):
    m = onnx.load(path, load_external_data=False)
    reads = {i for n in m.graph.node for i in n.input} | {o.name for o in m.graph.output}
    nodes = [n for n in m.graph.node if n.op_type == op]
    return any(len(n.output) > 3 and n.output[3] and n.output[3] in reads for n in nodes)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("op", ["SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "SkipLayerNormalization",
                                "RMSNormalization"])
def test_emitted_op_on_provider(provider, op, dtype, tmp_path, monkeypatch):
    # the Skip forms are forced (their default depends on the provider); the others are kept unfused
    monkeypatch.setitem(fuse_skip.DEFAULT_FUSE, provider, op.startswith("Skip"))
    kw = {}
    if op == "SkipLayerNormalization":
        src = str(tmp_path / "skipln.onnx")
        onnx.save(skip_ln_model(dtype), src)
    elif op == "RMSNormalization":
        src = decoder(tmp_path, dtype=dtype, opset=23)
        kw["target"] = "onnx"
    else:
        src = decoder(tmp_path, dtype=dtype)
    dst = str(tmp_path / "out.onnx")
    optimize(src, dst, provider, **kw)
    ops = ops_of(dst)
    assert ops[op] >= 1, ops
    if op.startswith("Skip"):
        assert output3_read(dst, op), f"no {op} carries the stream on through its output 3 (the sum)"
    if op == "RMSNormalization":
        assert onnx.load(dst, load_external_data=False).opset_import[0].version >= 23
    check_on(provider, src, dst)


# ------------------------------------------------------------------------------------------
# bf16: no CPU kernels, so the reference is the fp32 twin of the model (same seeded weights)


def with_float_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every bfloat16 graph output cast to float32 (numpy has no bfloat16 for
    ONNX Runtime's outputs); the graph inside is unchanged."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for out in m.graph.output:
        if out.type.tensor_type.elem_type != TensorProto.BFLOAT16:
            continue
        inner = out.name + "_bf16"
        for n in m.graph.node:
            n.output[:] = [inner if o == out.name else o for o in n.output]
            n.input[:] = [inner if i == out.name else i for i in n.input]
        m.graph.node.append(helper.make_node("Cast", [inner], [out.name], to=TensorProto.FLOAT))
        out.type.tensor_type.elem_type = TensorProto.FLOAT
    return m


def run_bound(model, feeds, provider, level):
    """Outputs (float numpy) of `model` on the provider, inputs as OrtValues (bf16 included)."""
    sess = providers.make_session(model, provider, level)
    binding = sess.io_binding()
    values = {k: providers.to_ortvalue(v, provider) for k, v in feeds.items()}
    for k, v in values.items():
        binding.bind_ortvalue_input(k, v)
    for o in sess.get_outputs():
        binding.bind_output(o.name, "cpu")
    sess.run_with_iobinding(binding)
    return [np.asarray(a, np.float64) for a in binding.copy_outputs_to_cpu()]


@pytest.mark.cuda
def test_bf16_decoder(provider, tmp_path):
    if provider == "cpu":
        pytest.skip(CPU_NO_BF16)
    import ml_dtypes

    src = decoder(tmp_path, "bf16", dtype="bfloat16")
    twin = decoder(tmp_path, "fp32", dtype="float32")
    dst = str(tmp_path / "out.onnx")
    # tuned on CUDA (bf16 micro-benchmarks), written unverified: CPU verification cannot run bf16
    res = optimize(src, dst, provider, tune=True, verify=False)
    assert any("measured on cuda" in n for n in res.report.notes), res.report.notes
    ops = ops_of(dst)
    assert "LayerNormalization" not in ops and ops["SimplifiedLayerNormalization"] + ops["SkipSimplifiedLayerNormalization"] >= 1
    ref_model = onnx.load(twin)
    errs = {}
    for label, path, level in (("original", src, "disable"), ("normopt", dst, "all")):
        m = with_float_outputs(onnx.load(path))
        outs_all = []
        for seed in range(2):
            feeds32 = make_feeds(ref_model, seed)
            feeds = {k: (v.astype(ml_dtypes.bfloat16) if v.dtype == np.float32 else v) for k, v in feeds32.items()}
            ref = run_bound(ref_model, {k: (v.astype(np.float32) if v.dtype == ml_dtypes.bfloat16 else v) for k, v in feeds.items()},
                            "cpu", "disable")
            got = run_bound(m, feeds, provider, level)
            outs_all.append(max(float(np.max(np.abs(g - r))) / max(float(np.sqrt(np.mean(r * r))), 1e-6) for g, r in zip(got, ref)))
            assert all(np.isfinite(g).all() for g in got)
        errs[label] = max(outs_all)
    # as exact as the original bf16 model against the fp32 function, within bf16 rounding
    assert errs["normopt"] <= 2 * errs["original"] + 0.02, errs


# ------------------------------------------------------------------------------------------
# tuning micro-benchmarks, the guard and the latency harness on the provider


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_tuning_and_guard_on_provider(provider, dtype, tmp_path):
    src = decoder(tmp_path, dtype=dtype)
    dst = str(tmp_path / "out.onnx")
    res = optimize(src, dst, provider, tune=True)
    notes = "\n".join(res.report.notes)
    assert f"ln_to_rms: emits" in notes and f"(measured on {provider}:" in notes, notes
    assert f"fuse_skip:" in notes and f"measured on {provider} at" in notes, notes
    assert f"guard: " in notes and f"on {provider}, 20 interleaved runs" in notes, notes
    assert res.verification.equivalent
    check_on(provider, src, dst)


@pytest.mark.cuda
def test_micro_benchmarks_on_provider(provider):
    shape = (1, 16, 64)
    for op in ("SimplifiedLayerNormalization", "LayerNormalization"):
        unfused, fused = fuse_skip.time_family(op, shape, np.float16, op == "LayerNormalization", provider, runs=10)
        assert 0 < unfused < 1e3 and 0 < fused < 1e3


@pytest.mark.cuda
def test_bench_binds_to_the_provider(provider, tmp_path):
    src = decoder(tmp_path, dtype="float16")
    dst = str(tmp_path / "out.onnx")
    optimize(src, dst, provider)
    res = latency.bench([("original", src), ("normopt", dst)], provider=provider, runs=6, warmup=2)
    assert res.provider == provider and all(len(m.times_ms) == 6 and m.median_ms > 0 for m in res.models)
    assert res.models[1].ci_low <= res.models[1].ratio <= res.models[1].ci_high
    proto = onnx.load(src, load_external_data=False)
    runner = latency.Runner(providers.make_session(src, provider), make_feeds(proto, 0), provider)
    runner()
    assert runner.cuda == (provider == "cuda")
    if provider == "cuda":  # outputs stay on the device: the timing holds no copy back to the host
        assert all(v.device_name().lower() == "cuda" for v in runner.binding.get_outputs())


def cast_model(dtype_to=TensorProto.FLOAT):
    g = helper.make_graph([helper.make_node("Cast", ["x"], ["y"], to=dtype_to)], "cast",
                          [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [2, 8])],
                          [helper.make_tensor_value_info("y", dtype_to, [2, 8])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.cuda
def test_bf16_feeds_bound_on_provider(provider):
    import ml_dtypes

    x = (np.arange(16).reshape(2, 8) / 4).astype(ml_dtypes.bfloat16)
    out = run_bound(cast_model(), {"x": x}, provider, "all")
    np.testing.assert_array_equal(out[0], x.astype(np.float64))
    assert micro.time_models([cast_model(), cast_model()], {"x": (2, 8)}, ml_dtypes.bfloat16, provider, runs=4, warmup=1)[0] > 0


# ------------------------------------------------------------------------------------------
# plumbing, on any machine (not marked cuda)


class _FakeSession:
    def __init__(self, *a, **k):
        pass

    def get_providers(self):
        return ["CPUExecutionProvider"]


def test_silent_cpu_fallback_is_an_error(monkeypatch):
    """ONNX Runtime falls back to the CPU EP with only a log line when the CUDA EP cannot be
    created; a session asked for on CUDA that did so must not time or verify the CPU."""
    monkeypatch.setattr(providers, "providers_for", lambda p: [("CUDAExecutionProvider", {}), "CPUExecutionProvider"])
    monkeypatch.setattr(providers.ort, "InferenceSession", _FakeSession)
    with pytest.raises(providers.SessionError, match="CUDA execution provider could not be created"):
        providers.make_session(cast_model(), "cuda")
    assert providers.make_session(cast_model(), "cpu").get_providers() == ["CPUExecutionProvider"]


def test_cuda_sessions_keep_fp32_precision():
    if not providers.cuda_available():
        assert providers.providers_for("cpu") == ["CPUExecutionProvider"]
        with pytest.raises(Exception, match="onnxruntime-gpu"):
            providers.providers_for("cuda")
    else:
        ep, opts = providers.providers_for("cuda")[0]
        assert ep == "CUDAExecutionProvider" and opts["use_tf32"] == "0"


def test_bf16_feeds_on_cpu():
    """bfloat16 feeds reach ONNX Runtime as OrtValues (its numpy conversion refuses them)."""
    import ml_dtypes

    x = (np.arange(16).reshape(2, 8) / 4).astype(ml_dtypes.bfloat16)
    runner = latency.Runner(providers.make_session(cast_model(), "cpu"), {"x": x}, "cpu")
    assert runner() > 0
    assert micro.time_models([cast_model()], {"x": (2, 8)}, ml_dtypes.bfloat16, "cpu", runs=3, warmup=1)[0] > 0
    assert ort.get_device()  # the check reads onnxruntime's build


def test_decoder_writer_and_check_need_no_torch(tmp_path):
    """The CUDA check installs no torch: the LLM writer, the encoder writer, the API and the
    harness import without it (torch is made unimportable in a fresh interpreter)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys; sys.modules['torch'] = None; sys.path.insert(0, 'benchmarks'); "
            "import normopt.models.llm, normopt.api, normopt.cli, normopt.runtime_tests.latency, cuda_models; "
            f"normopt.models.llm.write_decoder({str(tmp_path / 'd.onnx')!r}, layers=1, d=32, heads=2, vocab=64, positions=32); "
            "cuda_models.encoder('tiny', norm='repbn'); import normopt.models as M; "
            "assert 'normopt.models.builders' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
