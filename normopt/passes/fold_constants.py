"""fold_constants: evaluate subgraphs whose inputs are all known.

Identity: a node whose inputs are constants computes a constant; Shape of a tensor whose
shape is static is a constant. Folding Shape/Gather/Concat chains built from static shapes,
Add(eps)->Sqrt on constants, and Identity on initializers lets later passes see plain
constants (Unified Norm's TorchScript export needs this; see normopt-math.md section 2).

Preconditions: none beyond ONNX semantics. The evaluation is onnx-graphsurgeon's
``fold_constants`` (it runs the constant subgraph with ONNX Runtime). Tensors larger than
``SIZE_LIMIT`` bytes are not materialized, so folding never blows up model size.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from .. import graph as G
from ..pipeline import Analysis, Pass

SIZE_LIMIT = 64 * 1024 * 1024


def _foldable(node) -> bool:
    if node.op in ("Constant",):
        return False
    if node.op == "Shape":
        return G.shape(node.inputs[0]) is not None and all(isinstance(d, int) for d in G.shape(node.inputs[0]))
    ins = [t for t in node.inputs if t is not None and t.name]
    return bool(ins) and all(G.const_value(t) is not None for t in ins)


class FoldConstants(Pass):
    repeat = True  # folding a chain makes shapes static that let the next round fold more
    name = "fold_constants"
    description = "fold constant subgraphs and static-shape Shape/Gather/Concat chains (canonicalization)"

    def analyze(self, graph, ctx):
        matches = [n for n in graph.nodes if _foldable(n)]
        return Analysis(matches=[f"{n.op} '{n.name}'" for n in matches] or (["shape chains"] if any(n.op == "Shape" for n in graph.nodes) else []))

    def apply(self, graph, matches, ctx):
        before = len(graph.nodes)
        try:
            graph.fold_constants(fold_shapes=True, size_threshold=SIZE_LIMIT, error_ok=True)
        except Exception as exc:  # folding is an optimization; never fail the pipeline on it
            ctx.notes.append(f"fold_constants: skipped ({type(exc).__name__}: {exc})")
            return 0
        graph.cleanup(remove_unused_graph_inputs=False)
        # a Constant node folded into an initializer keeps its value; turn the rest into initializers
        for node in list(graph.nodes):
            if node.op == "Constant" and len(node.outputs) == 1:
                val = G.const_value(node.outputs[0])
                out = node.outputs[0]
                if val is not None and not G.is_graph_output(graph, out):
                    G.replace_uses(out, gs.Constant(out.name, val))
                    node.outputs.clear()
        graph.cleanup(remove_unused_graph_inputs=False)
        return max(0, before - len(graph.nodes))
