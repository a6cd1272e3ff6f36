"""The counts people read: bench's norm-op column and `inspect` list every LayerNorm the matcher
finds (also where only canonicalization makes it recognizable), count a norm's own γ as part of
it, never call an outer product (rotary's positions × inv_freq, ALiBi's slopes × positions) or a
linear op's bias behind a Reshape a per-channel affine norm; JUnit cases carry a time."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import onnx
from onnx import TensorProto, helper

from normopt.api import optimize_model
from normopt.reporting import norm_change, write_junit
from normopt.runtime_tests.latency import count_norm_ops

from conftest import init, make_model, preln_stream_model, run_cli, vi

RNG = np.random.default_rng(7)


def _f(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def test_outer_products_are_not_affine_norms():
    d, h = 16, 4
    nodes = [
        # rotary: positions [B, S, 1] (from integer ids) times inv_freq [d/2]: a new axis, no channel scaled
        helper.make_node("Cast", ["pos_ids"], ["pos_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["pos_f", "ax2"], ["pos"]),
        helper.make_node("Mul", ["pos", "inv_freq"], ["freqs"]),
        # ALiBi: slopes [H, 1] times positions [B, 1, S]
        helper.make_node("Unsqueeze", ["pos_f", "ax1"], ["pos_b1s"]),
        helper.make_node("Mul", ["slopes", "pos_b1s"], ["alibi"]),
        # a per-channel affine of a stream [B, S, d]: this one is a norm (inference BatchNorm's form)
        helper.make_node("Mul", ["x", "a"], ["xa"]),
        helper.make_node("Add", ["xa", "t"], ["y"]),
        # a linear op's bias behind a Reshape (tf2onnx's MatMul -> Reshape -> BiasAdd)
        helper.make_node("MatMul", ["y", "w"], ["lin"]),
        helper.make_node("Reshape", ["lin", "shape"], ["lin_r"]),
        helper.make_node("Add", ["lin_r", "bias"], ["out"]),
    ]
    m = make_model(nodes, [vi("pos_ids", [2, 8], TensorProto.INT64), vi("x", [2, 8, d])],
                   [vi("freqs", [2, 8, d // 2]), vi("alibi", [2, h, 8]), vi("out", [2, 8, d])],
                   [init("inv_freq", _f(d // 2)), init("slopes", _f(h, 1)), init("ax2", np.array([2], np.int64)),
                    init("ax1", np.array([1], np.int64)), init("a", _f(d)), init("t", _f(d)), init("w", _f(d, d)),
                    init("shape", np.array([2, 8, d], np.int64)), init("bias", _f(d))])
    onnx.checker.check_model(m)
    assert count_norm_ops(m) == {"affine": 1}


def test_a_decomposed_gamma_is_part_of_its_rmsnorm():
    m = preln_stream_model(d=32, layers=3)
    out, _ = optimize_model(m, target="onnx")  # opset 17: the decomposed Pow/ReduceMean/.../Div, then γ Mul
    assert "Div" in {n.op_type for n in out.graph.node}
    before, after = count_norm_ops(m), count_norm_ops(out)
    assert before == {"LN": 4} and after == {"RMS": 4}, (before, after)
    assert norm_change(before, after) == "4 LN -> 4 RMS"


def _identity_wrapped(m: onnx.ModelProto) -> onnx.ModelProto:
    """Every initializer read through an Identity, as paddle2onnx writes weights."""
    m2 = onnx.ModelProto()
    m2.CopyFrom(m)
    g = m2.graph
    names = {i.name for i in g.initializer}
    for n in g.node:
        for k, name in enumerate(n.input):
            if name in names:
                n.input[k] = name + "_id"
    ids = [helper.make_node("Identity", [nm], [nm + "_id"], name=nm + "_identity") for nm in sorted(names)]
    nodes = ids + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    onnx.checker.check_model(m2)
    return m2


def test_every_layernorm_the_matcher_finds_is_counted():
    m = preln_stream_model(d=32, layers=3, ln_form="div")
    assert count_norm_ops(m) == {"LN": 4}
    assert count_norm_ops(_identity_wrapped(m)) == {"LN": 4}


def test_inspect_lists_canonicalized_layernorms_and_no_rotary_affine(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(_identity_wrapped(preln_stream_model(d=32, layers=3, ln_form="div")), src)
    r = run_cli("inspect", src)
    assert r.returncode == 0, r.stderr
    rows = [ln for ln in r.stdout.splitlines()[1:] if ln.strip()]
    assert len(rows) == 4 and all(ln.startswith("decomposed LN") for ln in rows), r.stdout
    assert all("converts to RMSNorm" in ln for ln in rows), r.stdout


def test_junit_cases_carry_a_time(tmp_path):
    path = tmp_path / "j.xml"
    write_junit(str(path), "normopt bench", [("a", None, {"median_ms": 2.5}), ("b", "slow", {})], times=[0.25, 1.5])
    suite = ET.parse(path).getroot().find("testsuite")
    assert [float(tc.get("time")) for tc in suite.findall("testcase")] == [0.25, 1.5]
    assert float(suite.get("time")) == 1.75
    write_junit(str(path), "normopt verify", [("c", None, {})])
    tc = ET.parse(path).getroot().find("testsuite").find("testcase")
    assert float(tc.get("time")) >= 0


def test_cli_junit_files_have_times(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(preln_stream_model(), src)
    r = run_cli("verify", src, src, "--junit", tmp_path / "v.xml")
    assert r.returncode == 0, r.stderr
    r = run_cli("bench", src, src, "--runs", "3", "--warmup", "1", "--threads", "1", "--junit", tmp_path / "b.xml")
    assert r.returncode == 0, r.stderr
    for name in ("v.xml", "b.xml"):
        cases = ET.parse(tmp_path / name).getroot().iter("testcase")
        times = [float(tc.get("time")) for tc in cases]
        assert times and all(t >= 0 for t in times) and sum(times) > 0, name
