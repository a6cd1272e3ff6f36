"""remove_identity: drop Identity nodes, no-op Casts and inference-mode Dropout.

Identity: Identity(x) = x; Cast(x, to=T) = x when x already has type T; Dropout(x) = x when
training_mode is absent or a constant false (a run-time training_mode may be true: that
Dropout stays), is_test is not 0 (opset < 7), and its mask output is unread (no node, no graph
output).

Preconditions: an Identity whose output is a graph output is kept when its input is a graph
input or an initializer, or is itself a graph output (the output name must survive); otherwise
the producer is renamed to write the graph output directly.
"""

from __future__ import annotations

import numpy as np
import onnx

from .. import graph as G
from ..pipeline import Analysis, Decline, Pass


def _dropout_active(node):
    """Why Dropout may drop at run time (None when it is the identity): training_mode (opset
    >= 12) is true or a run-time value, which the caller decides; is_test = 0 (opset < 7).
    The ratio only matters in training mode."""
    if "is_test" in node.attrs and not int(node.attrs["is_test"]):
        return "is_test is 0 (training mode)"
    if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
        tm = G.const_value(node.inputs[2])
        if tm is None:
            return f"training_mode '{node.inputs[2].name}' is a run-time value (it may be true)"
        if tm.size != 1 or bool(np.asarray(tm).reshape(-1)[0]):
            return "training_mode is true"
    return None


class RemoveIdentity(Pass):
    name = "remove_identity"
    description = "remove Identity nodes, no-op Casts and inference-mode Dropout (canonicalization)"

    def analyze(self, graph, ctx):
        a = Analysis()
        for node in graph.nodes:
            if node.op == "Dropout":
                why = _dropout_active(node)
                if why:
                    a.declined.append(Decline(node.name, "Dropout", why))
                    continue
                if len(node.outputs) > 1 and G.is_read(graph, node.outputs[1]):
                    a.declined.append(Decline(node.name, "Dropout", "its mask output is read"))
                    continue
            elif node.op == "Cast":
                src = G.tensor_dtype(node.inputs[0])
                try:
                    to = onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs.get("to", 0)))
                except Exception:
                    continue
                if src is None or np.dtype(src) != np.dtype(to):
                    continue
            elif node.op != "Identity":
                continue
            x, y = node.inputs[0], node.outputs[0]
            if G.is_graph_output(graph, y):
                if G.producer(x) is None or G.is_graph_output(graph, x):
                    a.declined.append(Decline(node.name, node.op, "it copies a graph input, initializer or output to a graph output"))
                    continue
            a.matches.append(node)
        return a

    def apply(self, graph, matches, ctx):
        for node in matches:
            x, y = node.inputs[0], node.outputs[0]
            node.outputs.clear()
            node.inputs.clear()
            G.bypass(graph, x, y)
        return len(matches)
