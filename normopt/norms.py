"""Recognizers for normalizations, matched by what they compute rather than by names.

* :func:`find_layernorms` finds LayerNorm in the forms exporters write it:
  - the LayerNormalization op;
  - the decomposed form of opset <= 16 exports: ReduceMean, Sub, Pow(2) | Mul(d, d), ReduceMean,
    Add(eps), Sqrt, Div | Reciprocal+Mul, optional Mul(gamma), optional Add(beta), with axes
    as attribute or input and keepdims=1 (or keepdims=0 followed by an Unsqueeze of the same
    axes); keepdims=0 without it broadcasts wrongly and is not a LayerNorm;
  - com.microsoft SkipLayerNormalization (an Add fused with a LayerNorm).
* :func:`find_norms` lists every normalization for ``normopt inspect``: the LN forms above, RMS
  forms, BatchNormalization and per-channel affine chains.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from . import graph as G


@dataclass(eq=False)
class LayerNormMatch:
    kind: str  # "LayerNormalization" | "decomposed LN" | "SkipLayerNormalization"
    name: str  # anchor node name
    x: object  # input tensor being normalized
    y: object  # normalized output tensor
    axes: tuple | None  # normalized axes (non-negative), None when the rank is unknown
    rank: int | None
    epsilon: float
    gamma: object = None
    beta: object = None
    nodes: list = field(default_factory=list)
    readers: list = field(default_factory=list)  # nodes that read x directly
    extra_outputs_used: bool = False

    def over_last_axis(self) -> bool:
        return self.rank is not None and self.axes == (self.rank - 1,)

    def describe(self) -> str:
        return f"{self.kind} '{self.name}' over axes {self.axes} eps={self.epsilon:g}"


def _only_consumer(tensor, node, graph) -> bool:
    return len(tensor.outputs) == 1 and tensor.outputs[0] is node and not G.is_graph_output(graph, tensor)


def _const_scalar(tensor):
    v = G.const_value(tensor)
    if v is None or v.size != 1:
        return None
    return float(v.reshape(-1)[0])


def _other(node, tensor):
    """For a binary node with `tensor` as one input, return the other input."""
    a, b = node.inputs[0], node.inputs[1]
    if a is tensor:
        return b
    if b is tensor:
        return a
    return None


def _match_layernorm_op(node) -> LayerNormMatch:
    x = node.inputs[0]
    r = G.rank(x)
    axis = int(node.attrs.get("axis", -1))
    axes = None
    if r is not None:
        a = G.normalize_axis(axis, r)
        axes = tuple(range(a, r))
    used = any(len(o.outputs) or False for o in node.outputs[1:])
    return LayerNormMatch(
        kind="LayerNormalization",
        name=node.name,
        x=x,
        y=node.outputs[0],
        axes=axes,
        rank=r,
        epsilon=float(node.attrs.get("epsilon", 1e-5)),
        gamma=node.inputs[1] if len(node.inputs) > 1 else None,
        beta=node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None,
        nodes=[node],
        readers=[node],
        extra_outputs_used=used,
    )


def _match_decomposed(graph, mean1) -> LayerNormMatch | None:
    x = mean1.inputs[0]
    r = G.rank(x)
    axes, keep = G.reduce_axes(mean1, r)
    if axes is False or axes is None or r is None:
        return None
    nodes = [mean1]
    m = mean1.outputs[0]
    if not keep:
        # keepdims=0 is only a LayerNorm when the reduced axes are put back before the Sub
        cons = G.consumers(m)
        if len(cons) != 1 or cons[0].op != "Unsqueeze":
            return None
        unsq = cons[0]
        u_axes, _ = G.reduce_axes(unsq, r)  # same attribute/input convention as Reduce*
        if u_axes != axes:
            return None
        nodes.append(unsq)
        m = unsq.outputs[0]
    subs = [c for c in G.consumers(m) if c.op == "Sub" and c.inputs[0] is x and c.inputs[1] is m]
    if len(subs) != 1 or not _only_consumer(m, subs[0], graph):
        return None
    sub = subs[0]
    nodes.append(sub)
    d = sub.outputs[0]
    sq = None
    norm_node = None
    for c in G.consumers(d):
        if c.op == "Pow" and c.inputs[0] is d and _const_scalar(c.inputs[1]) == 2.0:
            sq = c
        elif c.op == "Mul" and c.inputs[0] is d and c.inputs[1] is d:
            sq = c
        elif (c.op == "Div" and c.inputs[0] is d) or (c.op == "Mul" and any(t is d for t in c.inputs)):
            norm_node = c
    if sq is None or norm_node is None or len(G.consumers(d)) != 2 or G.is_graph_output(graph, d):
        return None
    nodes.append(sq)
    var_in = sq.outputs[0]
    c = G.consumers(var_in)
    if len(c) != 1 or c[0].op != "ReduceMean" or G.is_graph_output(graph, var_in):
        return None
    mean2 = c[0]
    axes2, keep2 = G.reduce_axes(mean2, r)
    if axes2 != axes or not keep2:
        return None
    nodes.append(mean2)
    var = mean2.outputs[0]
    c = G.consumers(var)
    if len(c) != 1 or c[0].op != "Add" or G.is_graph_output(graph, var):
        return None
    add_eps = c[0]
    eps = _const_scalar(_other(add_eps, var))
    if eps is None:
        return None
    nodes.append(add_eps)
    c = G.consumers(add_eps.outputs[0])
    if len(c) != 1 or c[0].op != "Sqrt" or G.is_graph_output(graph, add_eps.outputs[0]):
        return None
    sqrt = c[0]
    nodes.append(sqrt)
    s = sqrt.outputs[0]
    if G.is_graph_output(graph, s):
        return None
    if norm_node.op == "Div":
        if norm_node.inputs[1] is not s or len(G.consumers(s)) != 1:
            return None
    else:  # Mul(d, Reciprocal(sqrt))
        c = G.consumers(s)
        if len(c) != 1 or c[0].op != "Reciprocal":
            return None
        recip = c[0]
        if _other(norm_node, d) is not recip.outputs[0] or len(G.consumers(recip.outputs[0])) != 1:
            return None
        nodes.append(recip)
    nodes.append(norm_node)
    y = norm_node.outputs[0]
    gamma = beta = None
    c = G.consumers(y)
    if len(c) == 1 and c[0].op == "Mul" and not G.is_graph_output(graph, y):
        g = _other(c[0], y)
        gv = G.const_value(g)
        if gv is not None and gv.size > 1:
            gamma = g
            nodes.append(c[0])
            y = c[0].outputs[0]
    c = G.consumers(y)
    if len(c) == 1 and c[0].op == "Add" and not G.is_graph_output(graph, y):
        b = _other(c[0], y)
        bv = G.const_value(b)
        if bv is not None and bv.size > 1:
            beta = b
            nodes.append(c[0])
            y = c[0].outputs[0]
    return LayerNormMatch(
        kind="decomposed LN",
        name=mean1.name or sub.name,
        x=x,
        y=y,
        axes=axes,
        rank=r,
        epsilon=eps,
        gamma=gamma,
        beta=beta,
        nodes=nodes,
        readers=[mean1, sub],
    )


def find_layernorms(graph: gs.Graph) -> list[LayerNormMatch]:
    found = []
    for node in list(graph.nodes):
        if node.op == "LayerNormalization" and node.domain in ("", "ai.onnx", None):
            found.append(_match_layernorm_op(node))
        elif node.op == "ReduceMean":
            m = _match_decomposed(graph, node)
            if m is not None:
                found.append(m)
    return found


# ---------------------------------------------------------------------------------------------
# inspect: every normalization in the graph


@dataclass
class NormSite:
    kind: str
    node: str
    input: str
    detail: str = ""


def _is_rms_decomposed(graph, node) -> bool:
    """ReduceMean(x*x) / ReduceMean(Pow(x, 2)) over a tensor that is not mean-subtracted."""
    if node.op != "ReduceMean":
        return False
    p = G.producer(node.inputs[0])
    if p is None:
        return False
    if p.op == "Pow" and _const_scalar(p.inputs[1]) == 2.0:
        base = p.inputs[0]
    elif p.op == "Mul" and p.inputs[0] is p.inputs[1]:
        base = p.inputs[0]
    else:
        return False
    bp = G.producer(base)
    return not (bp is not None and bp.op == "Sub")


def _is_per_channel_affine(node) -> bool:
    if node.op not in ("Mul", "Add", "Sub", "Div") or len(node.inputs) != 2:
        return False
    consts = [G.const_value(t) for t in node.inputs]
    if all(c is None for c in consts) or all(c is not None for c in consts):
        return False
    c = next(v for v in consts if v is not None)
    if c.size <= 1 or not np.issubdtype(c.dtype, np.floating):
        return False
    # exactly one non-unit axis: per-channel
    if sum(1 for s in c.shape if s != 1) != 1:
        return False
    if node.op in ("Add", "Sub"):
        p = G.producer(next(t for t, v in zip(node.inputs, consts) if v is None))
        if p is not None and p.op in ("MatMul", "Gemm", "Conv", "ConvTranspose"):
            return False  # a linear op's bias
        if p is not None and p.op in ("SimplifiedLayerNormalization", "RMSNormalization", "LayerNormalization"):
            return False  # a norm's beta
    return True


def find_norms(graph: gs.Graph) -> list[NormSite]:
    sites = []
    ln_nodes = set()
    for m in find_layernorms(graph):
        ln_nodes.update(id(n) for n in m.nodes)
        sites.append(NormSite(m.kind, m.name, m.x.name, f"axes={m.axes} eps={m.epsilon:g}"))
    for node in graph.nodes:
        if id(node) in ln_nodes:
            continue
        if node.op == "SkipLayerNormalization":
            sites.append(NormSite("SkipLayerNormalization", node.name, node.inputs[0].name, f"eps={node.attrs.get('epsilon', 1e-12):g}"))
        elif node.op in ("SimplifiedLayerNormalization", "RMSNormalization", "SkipSimplifiedLayerNormalization"):
            sites.append(NormSite(f"RMS ({node.op})", node.name, node.inputs[0].name, f"eps={node.attrs.get('epsilon', 1e-5):g}"))
        elif _is_rms_decomposed(graph, node):
            sites.append(NormSite("RMS (decomposed)", node.name, node.inputs[0].name))
        elif node.op == "BatchNormalization":
            sites.append(NormSite("BatchNormalization", node.name, node.inputs[0].name, f"eps={node.attrs.get('epsilon', 1e-5):g}"))
        elif node.op in ("InstanceNormalization", "GroupNormalization"):
            sites.append(NormSite(node.op, node.name, node.inputs[0].name))
        elif _is_per_channel_affine(node):
            p = G.producer(node.inputs[0])
            if p is not None and _is_per_channel_affine(p):
                continue  # report a chain once, at its first op
            sites.append(NormSite("per-channel affine", node.name, node.inputs[0].name, node.op))
    return sites
