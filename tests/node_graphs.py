"""Graphs with many nodes (issue 17, scale): a Pre-LN transformer-like stack and an elementwise
chain, sized by node count. Small widths keep the weights tiny: the point is the node count.
Shared by tests/test_scale_nodes.py and benchmarks/bench_nodes.py."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _model(nodes, inputs, outputs, inits, opset=17):
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)


def transformer_like(n_nodes: int, d: int = 8, n: int = 4, seed: int = 0) -> onnx.ModelProto:
    """Pre-LN blocks x = x + W2 relu(W1 LN(x) + b1) + b2 until about n_nodes nodes; the LNs
    alternate between the LayerNormalization op and the decomposed opset-13 form, so both the
    LN matcher and the stream analysis see long graphs. A final LN feeds the output."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    inits.append(numpy_helper.from_array(rng.standard_normal((32, d)).astype(np.float32), "table"))
    nodes.append(helper.make_node("Gather", ["table", "ids"], ["h0"], axis=0))
    # small shared constants (a real export has one per layer; sharing keeps the file small)
    for name, arr in [("w1", rng.standard_normal((d, 2 * d)) / np.sqrt(d)), ("b1", 0.1 * rng.standard_normal(2 * d)),
                      ("w2", rng.standard_normal((2 * d, d)) / np.sqrt(2 * d)), ("b2", 0.1 * rng.standard_normal(d)),
                      ("g", 1 + 0.1 * rng.standard_normal(d)), ("b", 0.1 * rng.standard_normal(d)),
                      ("two", np.array(2.0)), ("eps", np.array(1e-5))]:
        inits.append(numpy_helper.from_array(np.asarray(arr, np.float32), name))
    x, i = "h0", 0

    def ln(inp, out, tag, decomposed):
        if not decomposed:
            nodes.append(helper.make_node("LayerNormalization", [inp, "g", "b"], [out], axis=-1, epsilon=1e-5))
            return
        nodes.extend([
            helper.make_node("ReduceMean", [inp], [f"{tag}_m"], axes=[-1], keepdims=1),
            helper.make_node("Sub", [inp, f"{tag}_m"], [f"{tag}_d"]),
            helper.make_node("Pow", [f"{tag}_d", "two"], [f"{tag}_sq"]),
            helper.make_node("ReduceMean", [f"{tag}_sq"], [f"{tag}_v"], axes=[-1], keepdims=1),
            helper.make_node("Add", [f"{tag}_v", "eps"], [f"{tag}_ve"]),
            helper.make_node("Sqrt", [f"{tag}_ve"], [f"{tag}_s"]),
            helper.make_node("Div", [f"{tag}_d", f"{tag}_s"], [f"{tag}_n"]),
            helper.make_node("Mul", [f"{tag}_n", "g"], [f"{tag}_gn"]),
            helper.make_node("Add", [f"{tag}_gn", "b"], [out]),
        ])

    while len(nodes) < n_nodes:
        ln(x, f"l{i}_ln", f"l{i}", decomposed=bool(i % 2))
        nodes.extend([
            helper.make_node("MatMul", [f"l{i}_ln", "w1"], [f"l{i}_h"]),
            helper.make_node("Add", [f"l{i}_h", "b1"], [f"l{i}_hb"]),
            helper.make_node("Relu", [f"l{i}_hb"], [f"l{i}_a"]),
            helper.make_node("MatMul", [f"l{i}_a", "w2"], [f"l{i}_o"]),
            helper.make_node("Add", [f"l{i}_o", "b2"], [f"l{i}_ob"]),
            helper.make_node("Add", [x, f"l{i}_ob"], [f"h{i + 1}"]),
        ])
        x, i = f"h{i + 1}", i + 1
    ln(x, "final", "lf", decomposed=False)
    return _model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, n])],
                  [helper.make_tensor_value_info("final", TensorProto.FLOAT, [1, n, d])], inits)


def elementwise_chain(n_nodes: int, d: int = 8, ops=("Add", "Mul", "Sub", "Div"), ln_at_end: bool = False) -> onnx.ModelProto:
    """x -> op(., scalar constant) -> ... n_nodes times: scalar Adds/Muls are no norm, but every
    analysis that walks chains sees the whole length. With ln_at_end the chain ends in a
    LayerNormalization (opset 17), whose stream analysis walks the chain back to x."""
    nodes = []
    inits = [numpy_helper.from_array(np.asarray(1.0001, np.float32), "k"), numpy_helper.from_array(np.asarray(1e-4, np.float32), "s")]
    x = "x"
    for i in range(n_nodes):
        op = ops[i % len(ops)]
        nodes.append(helper.make_node(op, [x, "k" if op in ("Mul", "Div") else "s"], [f"v{i}"]))
        x = f"v{i}"
    if ln_at_end:
        inits += [numpy_helper.from_array(np.ones(d, np.float32), "g"), numpy_helper.from_array(np.zeros(d, np.float32), "b")]
        nodes.append(helper.make_node("LayerNormalization", [x, "g", "b"], ["y"], axis=-1))
        x = "y"
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, d])],
                  [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 4, d])], inits)
