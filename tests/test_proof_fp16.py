"""fp16 biases and shifted constants: a bias that absorbed a moved beta (b' = b + beta W), a
centered bias and a centered position table are judged at the rounding of their own casts, so
single elements changed by 2% or by 16 ulps are refused (in fp16 such changes used to prove)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from onnx import helper, numpy_helper

from conftest import make_model, preln_stream_model, vi, with_initializer
from normopt.api import optimize_model
from normopt.proof import prove


def _ulps(v, n):
    v = np.float16(v)
    for _ in range(n):
        v = np.nextafter(v, np.float16(np.inf) if v >= 0 else np.float16(-np.inf))
    return v


def _shift_tensors(orig, out):
    o = {t.name: numpy_helper.to_array(t) for t in orig.graph.initializer}
    for t in out.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.dtype != np.float16 or (t.name in o and np.array_equal(o[t.name], a)):
            continue
        if a.ndim == 1 or t.name.startswith("pos"):
            yield t.name, a


OPTIONS = {"default": ({}, []), "crms": ({}, ["crms"]), "onnx": (dict(target="onnx"), []),
           "skip_fusion": (dict(provider="cuda"), [])}


@pytest.mark.parametrize("how", sorted(OPTIONS))
@pytest.mark.parametrize("change", ["2%", "16 ulps"])
def test_fp16_bias_elements_changed_are_refused(how, change):
    kw, opt_in = OPTIONS[how]
    m = preln_stream_model(d=16, dtype=np.float16)
    out, _ = optimize_model(m, opt_in=opt_in, **kw)
    assert prove(m, out).proved
    names = list(_shift_tensors(m, out))
    assert any(n.endswith("_beta") for n, _ in names) or how == "crms" or kw.get("target") == "onnx", names
    tried = 0
    for name, a in names:
        for k in range(0, a.size, max(1, a.size // 6)):
            b = a.copy().reshape(-1)
            if b[k] == 0:
                continue
            b[k] = np.float16(float(b[k]) * 1.02) if change == "2%" else _ulps(b[k], 16)
            res = prove(m, with_initializer(out, name, b.reshape(a.shape)))
            assert not res.proved, (name, k, float(a.reshape(-1)[k]), res.summary)
            tried += 1
    assert tried >= 6


def _ln_after_bias(b):
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w")
    bias = numpy_helper.from_array(np.asarray(b, np.float32), "b")
    g = numpy_helper.from_array(np.ones(8, np.float32), "g")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["hb"]),
             helper.make_node("LayerNormalization", ["hb", "g"], ["y"], axis=-1, epsilon=1e-5)]
    return make_model(nodes, [vi("x", [2, 8])], [vi("y", [2, 8])], [w, bias, g])


def test_a_layernorm_absorbs_only_a_uniform_shift():
    """LN(u + c 1) = LN(u): a bias moved by one value for every channel proves; one channel moved
    by 16 ulps more than the others is refused, although a larger channel's rounding bound would
    cover it (the shift must be one value within every channel's own bound)."""
    b = np.array([0.001] * 7 + [10.0])
    m = _ln_after_bias(b)
    ok = copy.deepcopy(m)
    ok.graph.initializer[1].CopyFrom(numpy_helper.from_array((b + 0.5).astype(np.float32), "b"))
    assert prove(m, ok).proved
    bad = copy.deepcopy(m)
    bb = (b + 0.5).astype(np.float32)
    bb[0] = _ulps32(bb[0], 16)
    bad.graph.initializer[1].CopyFrom(numpy_helper.from_array(bb, "b"))
    res = prove(m, bad)
    assert not res.proved, res.summary


def _ulps32(v, n):
    v = np.float32(v)
    for _ in range(n):
        v = np.nextafter(v, np.float32(np.inf))
    return v
