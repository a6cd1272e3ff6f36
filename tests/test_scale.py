"""Weights by reference (issue 10), at CI size: the skeleton never holds the weights, outputs are
streamed tensor by tensor, verification and the memory check, LLM-shaped decoders with a KV cache
in fp32 / fp16 / bf16. The large models (652 MB, 5.7 GB, 13.7 GB) are in benchmarks/bench_scale.py."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from normopt import graph as G
from normopt import io as nio
from normopt import weights as W
from normopt.api import optimize, optimize_model
from normopt.errors import NormoptError, VerificationFailed
from normopt.models.llm import DecoderSpec, write_decoder
from normopt.runtime_tests.equivalence import compare

from conftest import preln_stream_model, vi


def _values(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_skeleton_references_raw_data_in_place(tmp_path):
    m = preln_stream_model(d=64, vocab=512)
    p = tmp_path / "m.onnx"
    onnx.save(m, p)
    sk = W.read_skeleton(str(p))
    assert sk.ByteSize() < 20_000 < os.path.getsize(p)  # the structure only
    table = next(t for t in sk.graph.initializer if t.name == "tok_table")
    loc, off, n = W.external_ref(table)
    assert loc == str(p) and n == 512 * 64 * 4
    full = _values(onnx.load(p))
    for t in sk.graph.initializer:
        ref = W.external_ref(t)
        got = W.load_array(t, *ref) if ref else numpy_helper.to_array(t)
        assert np.array_equal(got, full[t.name]), t.name


def test_reading_a_weight_neither_loads_nor_caches_it(tmp_path):
    p = tmp_path / "m.onnx"
    onnx.save(preln_stream_model(d=64, vocab=512), p)
    graph = G.to_graph(nio.load_model(str(p)).model)
    table = next(t for t in graph.tensors().values() if t.name == "tok_table")
    assert isinstance(table._values, W.RefValues)
    v = G.const_value(table)
    assert isinstance(v.base, np.memmap) or isinstance(v, np.memmap)
    assert isinstance(table._values, W.RefValues)  # still a reference afterwards


@pytest.mark.parametrize("external", [False, True], ids=["one-protobuf", "external-data"])
def test_streaming_writer_round_trips_every_tensor(tmp_path, external):
    m = preln_stream_model(d=256, vocab=2048)  # a 2 MiB table: aligned in external data
    src = tmp_path / "m.onnx"
    onnx.save(m, src)
    sk = nio.load_model(str(src)).model
    out = tmp_path / "o.onnx"
    nio.write_model(sk, str(out), external)
    back = onnx.load(out)
    assert [t.name for t in back.graph.initializer] == [t.name for t in m.graph.initializer]  # order kept
    ref, got = _values(m), _values(back)
    assert all(np.array_equal(ref[k], got[k]) for k in ref)
    if external:
        table = next(t for t in onnx.load(out, load_external_data=False).graph.initializer if t.name == "tok_table")
        assert W.external_ref(table)[1] % W.ALIGN_LARGE == 0
    else:
        assert not os.path.exists(str(out) + ".data")
        assert back.SerializeToString() == onnx.load(src).SerializeToString()  # the same bytes as onnx.save


def test_new_large_tensors_are_spilled_not_held(tmp_path, monkeypatch):
    monkeypatch.setattr(W, "SPILL_BYTES", 1024)
    p = tmp_path / "m.onnx"
    onnx.save(preln_stream_model(d=64, vocab=512), p)
    store = W.WeightStore(str(tmp_path))
    with W.using(store):
        out, _ = optimize_model(nio.load_model(str(p)).model)
    assert store.spilled > 0
    spilled = [t for t in out.graph.initializer if W.external_ref(t) and W.external_ref(t)[0] == store.path]
    assert spilled  # the centered table lives in the spill file, referenced by the skeleton
    nio.write_model(out, str(tmp_path / "o.onnx"), external=True)
    store.close()
    assert compare(str(p), str(tmp_path / "o.onnx")).equivalent
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".normopt-spill")]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("arch", ["opt", "gpt2", "parallel", "bloom"])
def test_llm_shaped_decoders_with_kv_cache(tmp_path, arch, dtype):
    spec = DecoderSpec(arch=arch, layers=2, d=64, heads=4, vocab=500, positions=64, dtype=dtype,
                       ln_form="op" if arch != "gpt2" else "decomposed", opset=17 if arch != "gpt2" else 14)
    src = tmp_path / f"{arch}.onnx"
    info = write_decoder(str(src), spec)
    if dtype == "bfloat16":  # ONNX Runtime's CPU kernels do not run bf16: rewrite, check, write
        res = optimize(str(src), str(tmp_path / "o.onnx"), verify=False)
        ln = next(p for p in res.report.passes if p.name == "ln_to_rms")
        assert ln.applied == info["layernorms"]
        nio.check_model(onnx.load(tmp_path / "o.onnx", load_external_data=False))
        return
    res = optimize(str(src), str(tmp_path / "o.onnx"))  # no flags: the KV-cache defaults must do
    ln = next(p for p in res.report.passes if p.name == "ln_to_rms")
    assert ln.applied == info["layernorms"], ln.declined
    assert res.verification.equivalent and "offset" in res.verification.inputs
    assert os.path.exists(tmp_path / "o.onnx.data")  # external data in, external data out


def test_optimum_style_merged_decoder_shares_weights_once(tmp_path):
    """Weights read by both If branches stay in the main graph, once (graphsurgeon alone copies
    them into each branch)."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32), "W")

    def branch(name, op):
        return helper.make_graph([helper.make_node("MatMul", ["x", "W"], [f"{name}_m"]), helper.make_node(op, [f"{name}_m"], [f"{name}_y"])],
                                 name, [], [vi(f"{name}_y", [2, 64])])

    g = helper.make_graph([helper.make_node("If", ["c"], ["y"], then_branch=branch("then", "Relu"), else_branch=branch("else", "Neg"))],
                          "g", [vi("x", [2, 64]), vi("c", [], onnx.TensorProto.BOOL)], [vi("y", [2, 64])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    out, _ = optimize_model(m)
    branches = [a.g for a in out.graph.node[0].attribute]
    assert [t.name for t in out.graph.initializer] == ["W"] and not any(b.initializer for b in branches)
    assert compare(m, out).equivalent


def test_memory_check_names_the_need_and_no_verify(tmp_path, monkeypatch):
    import normopt.api as api

    p = tmp_path / "m.onnx"
    onnx.save(preln_stream_model(), p)
    monkeypatch.setattr(api, "available_bytes", lambda: 1024)
    with pytest.raises(NormoptError, match="verification needs about .* GB of memory.*--prove to check the pair without running it"):
        api.verify(str(p), str(p))
    assert optimize(str(p), str(tmp_path / "o.onnx"), verify=False).output


def test_a_dynamic_check_that_does_not_fit_leaves_the_proof_as_the_gate(tmp_path, monkeypatch):
    """Where no ONNX Runtime session fits, optimize proves its output (no session, weights
    streamed) and writes it only if proved; tuning, which runs the same sessions, is off."""
    import normopt.api as api
    import normopt.proof as proof

    p = tmp_path / "m.onnx"
    onnx.save(preln_stream_model(), p)
    monkeypatch.setattr(api, "available_bytes", lambda: 1024)
    res = optimize(str(p), str(tmp_path / "o.onnx"), tune=True)
    assert res.verification is None and res.proof is not None and res.proof.proved
    assert any("gated by the proof alone" in n and "GB of memory" in n for n in res.report.notes), res.report.notes
    assert any(n.startswith("not tuned") for n in res.report.notes)
    assert compare(str(p), str(tmp_path / "o.onnx")).equivalent  # (memory is patched only for optimize's check)

    def refused(a, b, cancel=None):
        return proof.ProofResult(False, "not proved: x: planted")

    monkeypatch.setattr(proof, "prove", refused)
    out = tmp_path / "o2.onnx"
    with pytest.raises(VerificationFailed, match="not proved: x: planted.*nothing was written"):
        optimize(str(p), str(out))
    assert not os.path.exists(out) and not [f for f in os.listdir(tmp_path) if f.startswith("o2")]


def test_progress_messages(tmp_path):
    msgs = []
    p = tmp_path / "m.onnx"
    onnx.save(preln_stream_model(), p)
    optimize(str(p), str(tmp_path / "o.onnx"), progress=msgs.append)
    assert any(m.startswith("pass 1/") for m in msgs) and any("verifying" in m for m in msgs) and any("writing" in m for m in msgs)


def test_opset_11_model_is_upgraded_and_written_at_13(tmp_path):
    p = tmp_path / "m11.onnx"
    onnx.save(preln_stream_model(opset=13, ln_form="div"), p)
    model = onnx.load(p)
    model.opset_import[0].version = 11
    for n in model.graph.node:  # Unsqueeze/Squeeze/ReduceSum take axes as attributes at 11: none here
        assert n.op_type not in ("Unsqueeze", "Squeeze")
    onnx.save(model, p)
    res = optimize(str(p), str(tmp_path / "o.onnx"))
    assert res.report.notes[0].startswith("opset: upgraded from 11 to 13")
    assert nio.default_opset(onnx.load(tmp_path / "o.onnx", load_external_data=False)) == 13
    assert res.verification.equivalent


def test_bad_input_found_by_the_dynamic_check_writes_no_report(tmp_path):
    """The proof runs in a thread beside the dynamic check; bad input the dynamic check finds
    (an --inputs file whose names are not the model's) is still exit 2 with nothing written,
    the --report included, and the proof is stopped before the process exits (a proof thread
    still loading the staged file raced the interpreter's cleanup of temporary directories)."""
    from conftest import run_cli

    p = tmp_path / "m.onnx"
    onnx.save(preln_stream_model(), p)
    npz = tmp_path / "wrong.npz"
    np.savez(npz, idz=np.zeros((1, 8), np.int64))
    r = run_cli("optimize", p, "-o", tmp_path / "o.onnx", "--report", tmp_path / "r.json", "--inputs", npz, "--no-tune")
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "wrong.npz"]


def test_bad_input_stops_the_proof_thread(tmp_path, monkeypatch):
    """When the dynamic check ends the run, optimize cancels the proof and waits for its thread:
    none is left running once optimize has raised. A stand-in proof that only stops when
    cancelled (or after 60 s) makes the race certain."""
    import threading
    import time

    import normopt.proof as proof_pkg
    from normopt.errors import NormoptError
    from normopt.proof import cancel
    from normopt.runtime_tests.inputs import InputOptions

    def slow_prove(original, optimized, cancel=None):
        cancel_mod_install(cancel)
        t0 = time.time()
        while time.time() - t0 < 60:
            cancel_mod_check()
            time.sleep(0.01)
        raise AssertionError("the proof was never cancelled")

    cancel_mod_install, cancel_mod_check = cancel.install, cancel.check
    monkeypatch.setattr(proof_pkg, "prove", slow_prove)
    p = tmp_path / "m.onnx"
    onnx.save(preln_stream_model(), p)
    npz = tmp_path / "wrong.npz"
    np.savez(npz, idz=np.zeros((1, 8), np.int64))
    t0 = time.time()
    with pytest.raises(NormoptError):
        optimize(str(p), str(tmp_path / "o.onnx"), input_opts=InputOptions(inputs_npz=str(npz)), tune=False)
    assert time.time() - t0 < 50
    assert not [t for t in threading.enumerate() if t.name == "normopt-prove" and t.is_alive()]
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "wrong.npz"]
