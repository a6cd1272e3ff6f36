"""split_skip_layernorm / refuse_skip_layernorm: let ln_to_rms see through com.microsoft
SkipLayerNormalization (graphs already passed through onnxruntime.transformers.optimizer).

Identity (ORT contrib schema)::

    SkipLayerNormalization(input, skip, gamma, beta?, bias?) =
        LayerNorm(s; gamma, beta, epsilon) over the last axis,   s = input + skip (+ bias)
    output 3 (input_skip_bias_sum) = s

``split_skip_layernorm`` rewrites each one as Add(input, skip) [-> Add(bias)] ->
LayerNormalization, with the sum written to output 3's tensor, so the residual stream is made
of plain Adds again. ``refuse_skip_layernorm``, at the end of the pipeline, fuses back every
split LN that is still a LayerNormalization, so a stream left alone is left as it came.

Preconditions: outputs 1 and 2 (mean, inv_std_var) are unused; the default-domain opset is at
least 17 (LayerNormalization); gamma (and beta, bias) have the shape [d] of the last axis.
"""

from __future__ import annotations

from .. import graph as G
from ..pipeline import Analysis, Decline, Pass

TAG = "normopt_split_skip"


def _used(graph, t) -> bool:
    return G.is_read(graph, t)


class SplitSkipLayerNorm(Pass):
    name = "split_skip_layernorm"
    description = "split com.microsoft SkipLayerNormalization into Add + LayerNormalization (re-fused at the end if not converted)"

    def analyze(self, graph, ctx):
        a = Analysis()
        for node in graph.nodes:
            if node.op != "SkipLayerNormalization":
                continue
            if any(_used(graph, o) for o in node.outputs[1:3]):
                a.declined.append(Decline(node.name, "SkipLayerNormalization", "its mean/inv_std outputs are read"))
            elif (graph.opset or 0) < 17:
                a.declined.append(Decline(node.name, "SkipLayerNormalization", f"opset {graph.opset} < 17 has no LayerNormalization to split into"))
            else:
                a.matches.append(node)
        return a

    def apply(self, graph, matches, ctx):
        namer = G.Namer(graph)
        for node in matches:
            ins = list(node.inputs) + [None] * (5 - len(node.inputs))
            x, skip, gamma, beta, bias = ins[:5]
            outs = list(node.outputs) + [None] * (4 - len(node.outputs))
            y, total = outs[0], outs[3]
            eps = float(node.attrs.get("epsilon", 1e-12))
            dtype = G.tensor_dtype(x)
            if total is None or not total.name:
                total = G.new_var(namer, f"{node.name}_sum", dtype, G.shape(x))
            has_bias = bias is not None and bias.name
            first = G.new_var(namer, f"{node.name}_xs", dtype, G.shape(x)) if has_bias else total
            node.inputs.clear()
            node.outputs.clear()
            G.add_node(graph, namer, "Add", [x, skip], [first], base=f"{node.name}_add")
            if has_bias:
                G.add_node(graph, namer, "Add", [first, bias], [total], base=f"{node.name}_bias")
            ln_in = [total, gamma] + ([beta] if beta is not None and beta.name else [])
            ln = G.add_node(graph, namer, "LayerNormalization", ln_in, [y], {"axis": -1, "epsilon": eps, "stash_type": 1},
                            base=f"{node.name}_ln")
            ctx.state.setdefault(TAG, set()).add(ln.name)  # for refuse_skip_layernorm
        return len(matches)


class RefuseSkipLayerNorm(Pass):
    name = "refuse_skip_layernorm"
    description = "fuse back the SkipLayerNormalizations that ln_to_rms left as LayerNorm"

    def analyze(self, graph, ctx):
        a = Analysis()
        for node in graph.nodes:
            if node.op == "LayerNormalization" and node.name in ctx.state.get(TAG, ()):
                a.matches.append(node)
        return a

    def apply(self, graph, matches, ctx):
        import onnx_graphsurgeon as gs

        namer = G.Namer(graph)
        n = 0
        for ln in matches:
            parts = _sum_parts(graph, ln.inputs[0])
            if parts is None:
                continue  # the sum was rewritten (stream converted): keep the plain LN
            x, skip, bias, adds = parts
            gamma = ln.inputs[1]
            beta = ln.inputs[2] if len(ln.inputs) > 2 else None
            ins = [x, skip, gamma]
            if beta is not None or bias is not None:
                ins.append(beta if beta is not None else gs.Variable.empty())
            if bias is not None:
                ins.append(bias)
            total, y = ln.inputs[0], ln.outputs[0]
            eps = float(ln.attrs.get("epsilon", 1e-12))
            for node in [ln] + adds:
                node.inputs.clear()
                node.outputs.clear()
            outs = [y, G.new_var(namer, "normopt_unused_mean"), G.new_var(namer, "normopt_unused_inv_std"), total]
            G.add_node(graph, namer, "SkipLayerNormalization", ins, outs, {"epsilon": eps}, domain="com.microsoft", base="SkipLayerNorm")
            n += 1
        return n


def _sum_parts(graph, total):
    """(input, skip, bias or None, [Add nodes]) when `total` is Add(input, skip) [+ bias]."""
    add = G.producer(total)
    if add is None or add.op != "Add":
        return None
    a, b = add.inputs
    inner = G.producer(a)
    if G.const_value(b) is not None and inner is not None and inner.op == "Add" and G.only_reader(graph, a, add):
        return inner.inputs[0], inner.inputs[1], b, [add, inner]
    return a, b, None, [add]
