"""A LayerNorm whose beta is a run-time value (a graph input, or computed), converted to
RMS + Add(beta): the RMS output is y - beta, and the Add of the same value (equal in both graphs)
turns it back into y. Mutants that drop, replace or double the beta are refused."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import preln_stream_model
from normopt.api import optimize_model
from normopt.proof import prove


def rt_beta_model(d=16, computed=False, dtype=np.float32):
    """The stream model with the first and the final LN's beta fed at run time (through an
    Identity, or computed by a Relu)."""
    m = preln_stream_model(d=d, dtype=dtype)
    et = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    for tag in ("lf_b", "l0_b"):
        t = next(t for t in m.graph.initializer if t.name == tag)
        m.graph.initializer.remove(t)
        m.graph.input.append(helper.make_tensor_value_info(tag + "_in", et, [d]))
        m.graph.node.insert(0, helper.make_node("Relu" if computed else "Identity", [tag + "_in"], [tag]))
    return m


def _adds_of_beta(opt):
    return [n for n in opt.graph.node if n.op_type == "Add" and any(i.startswith(("lf_b", "l0_b")) for i in n.input)]


@pytest.mark.parametrize("computed", [False, True], ids=["input", "computed"])
@pytest.mark.parametrize("kw", [{}, dict(target="onnx"), dict(provider="cuda"), dict(opt_in=["crms"])],
                         ids=["ort", "onnx", "cuda", "crms"])
def test_runtime_beta_outputs_prove(computed, kw):
    m = rt_beta_model(computed=computed)
    out, _ = optimize_model(m, **kw)
    assert _adds_of_beta(out), "the optimizer kept the run-time beta as an Add"
    res = prove(m, out)
    assert res.proved, res.summary


def test_runtime_beta_fp16_proves():
    m = rt_beta_model(dtype=np.float16)
    out, _ = optimize_model(m)
    assert prove(m, out).proved


def _mutants(opt):
    adds = _adds_of_beta(opt)
    for add in adds:
        k = next(i for i, x in enumerate(add.input) if x.startswith(("lf_b", "l0_b")))
        m = copy.deepcopy(opt)
        a = next(n for n in m.graph.node if list(n.output) == list(add.output))
        a.op_type = "Identity"  # the beta dropped
        del a.input[k]
        yield "beta dropped", m
        m = copy.deepcopy(opt)
        a = next(n for n in m.graph.node if list(n.output) == list(add.output))
        other = "lf_b_in" if a.input[k].startswith("l0_b") else "l0_b_in"
        a.input[k] = other  # another run-time value
        yield "another beta", m
        m = copy.deepcopy(opt)
        a = next(n for n in m.graph.node if list(n.output) == list(add.output))
        a.op_type = "Sub"  # beta subtracted
        if k == 0:
            a.input[0], a.input[1] = a.input[1], a.input[0]
        yield "beta subtracted", m
    for t in opt.graph.initializer:
        if (t.name.endswith("_g") and t.name[:2] in ("lf", "l0")) or t.name.startswith("crms_gamma"):
            g = numpy_helper.to_array(t).astype(np.float64)
            g[0] *= 1.02
            m = copy.deepcopy(opt)
            next(x for x in m.graph.initializer if x.name == t.name).CopyFrom(numpy_helper.from_array(g.astype(np.float32), t.name))
            yield "gamma channel x1.02", m
    for n in opt.graph.node:
        if n.op_type == "Neg":  # a CRMSNorm's last channel: +sum of the others instead of -sum
            m = copy.deepcopy(opt)
            next(x for x in m.graph.node if list(x.output) == list(n.output)).op_type = "Identity"
            yield "last channel sign", m


@pytest.mark.parametrize("crms", [False, True], ids=["plain", "crms"])
@pytest.mark.parametrize("computed", [False, True], ids=["input", "computed"])
def test_runtime_beta_mutants_are_refused(computed, crms):
    """With --crms the stream is carried in d-1 channels and the norm's RMS is computed from them;
    the compressed relation then carries the run-time beta to the Concat that restores the last
    channel (it was "Div of two computed values" before: not proved)."""
    m = rt_beta_model(computed=computed)
    out, _ = optimize_model(m, opt_in=["crms"] if crms else None)
    res = prove(m, out)
    assert res.proved, res.summary
    kinds = set()
    for kind, mm in _mutants(out):
        res = prove(m, mm)
        assert not res.proved, f"{kind}: {res.summary}"
        kinds.add(kind)
    want = {"beta dropped", "another beta", "beta subtracted", "gamma channel x1.02"}
    assert kinds == (want | {"last channel sign"} if crms else want), kinds


def test_a_runtime_beta_is_never_taken_for_zero():
    """An RMS norm (or a LayerNorm without beta) in place of a LayerNorm with a run-time beta
    is not the original's norm: the beta was silently read as zero before."""
    m = rt_beta_model()
    wrong = copy.deepcopy(m)
    for n in wrong.graph.node:
        if n.op_type == "LayerNormalization" and n.input[2] == "lf_b":
            del n.input[2]
    res = prove(m, wrong)
    assert not res.proved, res.summary
