"""cancel_layout: remove layout op pairs that undo each other.

Identity: Transpose(Transpose(x, p1), p2) = x when p2 composed with p1 is the identity;
Squeeze(Unsqueeze(x, axes), axes) = x; Reshape(Reshape(x, s1), s2) = x when s2 is x's
static shape. Folding SLAB's RepBN or Unified Norm leaves exactly such pairs around where
the norm was (Transpose(0,2,1) -> Transpose(0,2,1)); they cost a copy each at run time.

Preconditions: the intermediate tensor has no other reader and is not a graph output; the
result is not a graph output that would lose its name.
"""

from __future__ import annotations

from .. import graph as G
from ..pipeline import Analysis, Pass


def _undoes(first, second) -> bool:
    if first.op == "Transpose" and second.op == "Transpose":
        p1, p2 = first.attrs.get("perm"), second.attrs.get("perm")
        if p1 is None or p2 is None or len(p1) != len(p2):
            return False
        return [p1[i] for i in p2] == list(range(len(p1)))
    if first.op == "Unsqueeze" and second.op == "Squeeze":
        r = G.rank(second.inputs[0])
        a1, _ = G.reduce_axes(first, r)
        a2, _ = G.reduce_axes(second, r)
        return a1 not in (None, False) and a1 == a2
    if first.op == "Reshape" and second.op == "Reshape":
        s_in, s_out = G.shape(first.inputs[0]), G.shape(second.outputs[0])
        return s_in is not None and s_in == s_out and all(isinstance(d, int) for d in s_in)
    return False


class CancelLayoutPairs(Pass):
    name = "cancel_layout"
    description = "remove Transpose/Transpose, Unsqueeze/Squeeze and Reshape/Reshape pairs that undo each other"
    repeat = True

    def analyze(self, graph, ctx):
        a = Analysis()
        for second in graph.nodes:
            if second.op not in ("Transpose", "Squeeze", "Reshape") or not second.inputs:
                continue
            mid = second.inputs[0]
            first = G.producer(mid)
            if first is None or len(G.consumers(mid)) != 1 or G.is_graph_output(graph, mid):
                continue
            if G.is_graph_output(graph, second.outputs[0]):
                continue
            if _undoes(first, second):
                a.matches.append((first, second))
        return a

    def apply(self, graph, matches, ctx):
        n = 0
        for first, second in matches:
            if not first.inputs or not second.outputs:
                continue  # overlapped with an earlier pair this round
            x, y = first.inputs[0], second.outputs[0]
            G.replace_uses(y, x)
            for node in (first, second):
                node.inputs.clear()
                node.outputs.clear()
            n += 1
        return n
