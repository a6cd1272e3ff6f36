"""Shared helpers: small hand-built ONNX graphs, CLI runner, file hashing."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

RNG = np.random.default_rng(1234)


def sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def run_cli(*args, cwd=None):
    """Run the normopt CLI in a subprocess; returns CompletedProcess (text)."""
    return subprocess.run([sys.executable, "-m", "normopt.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def init(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def with_initializer(model, name, arr):
    """A copy of `model` whose initializer `name` holds `arr` (in the initializer's dtype)."""
    import copy

    m = copy.deepcopy(model)
    for t in m.graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(np.asarray(arr).astype(numpy_helper.to_array(t).dtype), name))
    return m


def make_model(nodes, inputs, outputs, inits=(), opset=17, extra_opsets=(), ir=9, **kw):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    ops = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
    m = helper.make_model(g, opset_imports=ops, ir_version=ir, **kw)
    return m


def vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def preln_stream_model(d=16, n=8, layers=2, ln_form="op", opset=17, dtype=np.float32, expose_stream=False,
                       gemm_writer=False, tied_reader=False, ln_axis=-1, vocab=32, seed=0):
    """A hand-built Pre-LN stream: token Gather + position constant, then `layers` blocks of
    x = x + Linear(gelu(Linear(LN(x)))), a final LN and a head. Variants exercise the pass's
    preconditions and LN forms.

    ln_form: "op" | "div" | "recip" | "keepdims0" (decomposed variants)."""
    rng = np.random.default_rng(seed)
    et = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes, inits = [], []
    table = rng.standard_normal((vocab, d)).astype(dtype)
    inits.append(init("tok_table", table))
    inits.append(init("pos", (0.1 * rng.standard_normal((1, n, d))).astype(dtype)))
    nodes.append(helper.make_node("Gather", ["tok_table", "ids"], ["tok"], axis=0))
    nodes.append(helper.make_node("Add", ["tok", "pos"], ["h0"]))
    x = "h0"

    def ln(inp, out, tag):
        g = init(f"{tag}_g", (1 + 0.2 * rng.standard_normal(d)).astype(dtype))
        b = init(f"{tag}_b", (0.2 * rng.standard_normal(d)).astype(dtype))
        inits.extend([g, b])
        if ln_form == "op":
            nodes.append(helper.make_node("LayerNormalization", [inp, g.name, b.name], [out], axis=ln_axis, epsilon=1e-5))
            return
        axes_kw = {}
        axes_in = []
        if opset >= 18:
            inits.append(init(f"{tag}_axes", np.array([ln_axis], np.int64)))
            axes_in = [f"{tag}_axes"]
        else:
            axes_kw = {"axes": [ln_axis]}
        keep = 0 if ln_form == "keepdims0" else 1
        nodes.append(helper.make_node("ReduceMean", [inp] + axes_in, [f"{tag}_m"], keepdims=keep, **axes_kw))
        m = f"{tag}_m"
        if keep == 0:
            if opset >= 13:
                inits.append(init(f"{tag}_uax", np.array([ln_axis], np.int64)))
                nodes.append(helper.make_node("Unsqueeze", [m, f"{tag}_uax"], [f"{tag}_mu"]))
            m = f"{tag}_mu"
        nodes.append(helper.make_node("Sub", [inp, m], [f"{tag}_d"]))
        inits.append(init(f"{tag}_two", np.array(2.0, dtype)))
        nodes.append(helper.make_node("Pow", [f"{tag}_d", f"{tag}_two"], [f"{tag}_sq"]))
        nodes.append(helper.make_node("ReduceMean", [f"{tag}_sq"] + axes_in, [f"{tag}_v"], keepdims=1, **axes_kw))
        inits.append(init(f"{tag}_eps", np.array(1e-5, dtype)))
        nodes.append(helper.make_node("Add", [f"{tag}_v", f"{tag}_eps"], [f"{tag}_ve"]))
        nodes.append(helper.make_node("Sqrt", [f"{tag}_ve"], [f"{tag}_s"]))
        if ln_form == "recip":
            nodes.append(helper.make_node("Reciprocal", [f"{tag}_s"], [f"{tag}_r"]))
            nodes.append(helper.make_node("Mul", [f"{tag}_d", f"{tag}_r"], [f"{tag}_n"]))
        else:
            nodes.append(helper.make_node("Div", [f"{tag}_d", f"{tag}_s"], [f"{tag}_n"]))
        nodes.append(helper.make_node("Mul", [f"{tag}_n", g.name], [f"{tag}_gn"]))
        nodes.append(helper.make_node("Add", [f"{tag}_gn", b.name], [out]))

    for i in range(layers):
        ln(x, f"l{i}_ln", f"l{i}")
        w1 = init(f"l{i}_w1", (rng.standard_normal((d, 2 * d)) / np.sqrt(d)).astype(dtype))
        b1 = init(f"l{i}_b1", (0.1 * rng.standard_normal(2 * d)).astype(dtype))
        inits.extend([w1, b1])
        nodes.append(helper.make_node("MatMul", [f"l{i}_ln", w1.name], [f"l{i}_h"]))
        nodes.append(helper.make_node("Add", [f"l{i}_h", b1.name], [f"l{i}_hb"]))
        nodes.append(helper.make_node("Relu", [f"l{i}_hb"], [f"l{i}_a"]))
        if gemm_writer:
            # Gemm on [n, 2d] with transB, alpha, beta: y = alpha * a @ W^T + beta * C
            w2 = init(f"l{i}_w2", (rng.standard_normal((d, 2 * d)) / np.sqrt(2 * d)).astype(dtype))
            c2 = init(f"l{i}_c2", (0.1 * rng.standard_normal(d)).astype(dtype))
            inits.extend([w2, c2, init(f"l{i}_s2", np.array([n, 2 * d], np.int64)), init(f"l{i}_s3", np.array([1, n, d], np.int64))])
            nodes.append(helper.make_node("Reshape", [f"l{i}_a", f"l{i}_s2"], [f"l{i}_a2"]))
            nodes.append(helper.make_node("Gemm", [f"l{i}_a2", w2.name, c2.name], [f"l{i}_o2"], transB=1, alpha=0.7, beta=1.3))
            nodes.append(helper.make_node("Reshape", [f"l{i}_o2", f"l{i}_s3"], [f"l{i}_o"]))
        else:
            w2 = init(f"l{i}_w2", (rng.standard_normal((2 * d, d)) / np.sqrt(2 * d)).astype(dtype))
            b2 = init(f"l{i}_b2", (0.1 * rng.standard_normal(d)).astype(dtype))
            inits.extend([w2, b2])
            nodes.append(helper.make_node("MatMul", [f"l{i}_a", w2.name], [f"l{i}_mm"]))
            nodes.append(helper.make_node("Add", [f"l{i}_mm", b2.name], [f"l{i}_o"]))
        nodes.append(helper.make_node("Add", [x, f"l{i}_o"], [f"h{i + 1}"]))
        x = f"h{i + 1}"
    ln(x, "final", "lf")
    outputs = [vi("final", [1, n, d], et)]
    if tied_reader:
        # the token table is also read by an lm_head (transposed), like GPT-2's tied weights
        nodes.append(helper.make_node("Transpose", ["tok_table"], ["tok_table_T"], perm=[1, 0]))
        nodes.append(helper.make_node("MatMul", ["final", "tok_table_T"], ["logits"]))
        outputs = [vi("logits", [1, n, vocab], et)]
    if expose_stream:
        outputs.append(vi(x, [1, n, d], et))
    return make_model(nodes, [vi("ids", [1, n], TensorProto.INT64)], outputs, inits, opset=opset)


@pytest.fixture
def stream_model(tmp_path):
    def _make(name="m.onnx", **kw):
        p = tmp_path / name
        onnx.save(preln_stream_model(**kw), p)
        return str(p)

    return _make


@pytest.fixture(scope="session")
def torch_available():
    try:
        import torch  # noqa: F401
    except ImportError:
        pytest.skip("torch is not installed (pip install torch==2.13.0 'normopt[models]')")
    return True
