"""cancel_layout: remove layout op pairs that undo each other.

Identity: Transpose(Transpose(x, p1), p2) = x when p2 composed with p1 is the identity;
Squeeze(Unsqueeze(x, axes), axes) = x; Reshape(Reshape(x, s1), s2) = x when s2 is x's
static shape. Folding SLAB's RepBN or Unified Norm leaves exactly such pairs around where
the norm was (Transpose(0,2,1) -> Transpose(0,2,1)); they cost a copy each at run time.

Also Reshape(op(Flatten(x, r-1)), Shape(x)) = op(x) along the last axis, for op a Softmax,
LogSoftmax or Hardmax over the last axis of its 2-D input: the pattern ONNX's version converter
writes for such an op when it upgrades a model to opset 13 without knowing the input's rank.
Flattening at the last axis keeps every row of x, the op acts row by row, and the Reshape to
x's own shape puts the rows back.

Preconditions: the intermediate tensor has no other reader and is not a graph output; the
result is not a graph output that would lose its name. For the Flatten pattern: x's rank is
known, the Flatten's axis is its last, the op's axis is the last of its 2-D input, and the
Reshape's shape is Shape(x) (the whole shape) or a constant equal to x's static shape.
"""

from __future__ import annotations

from .. import graph as G
from ..pipeline import Analysis, Decline, Pass


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


_ROW_OPS = ("Softmax", "LogSoftmax", "Hardmax")


def _flatten_around_rows(graph, reshape):
    """(flatten, op, reshape, reason): the converter's Flatten / row op / Reshape(Shape(x)) pattern
    ending at this Reshape, or a reason it is not one (None: not even its shape)."""
    op = G.producer(reshape.inputs[0]) if reshape.inputs else None
    if op is None or op.op not in _ROW_OPS or (op.domain or "") not in ("", "ai.onnx") or len(op.inputs) != 1:
        return None
    flat = G.producer(op.inputs[0])
    if flat is None or flat.op != "Flatten" or not flat.inputs:
        return None
    x = flat.inputs[0]
    r = G.rank(x)
    if r is None or r < 1:
        return "the rank of the Flatten's input is unknown"
    if int(flat.attrs.get("axis", 1)) % r != r - 1:
        return "the Flatten is not at the last axis"
    if int(op.attrs.get("axis", -1)) not in (-1, 1):
        return f"the {op.op} is not over the last axis of its 2-D input"
    if not G.only_reader(graph, op.inputs[0], op) or not G.only_reader(graph, reshape.inputs[0], reshape):
        return "an intermediate value has another reader or is a graph output"
    target = reshape.inputs[1] if len(reshape.inputs) > 1 else None
    sh = G.producer(target) if target is not None else None
    whole = sh is not None and sh.op == "Shape" and sh.inputs and sh.inputs[0] is x and \
        int(sh.attrs.get("start", 0)) == 0 and sh.attrs.get("end") is None
    if not whole:
        s_in = G.shape(x)
        c = G.const_value(target) if target is not None else None
        if c is None or s_in is None or not all(isinstance(d, int) for d in s_in) or \
                [int(v) for v in c.reshape(-1)] != list(s_in):
            return "the Reshape's shape is not Shape(x) nor x's static shape"
    return flat, op, reshape


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
            if second.op == "Reshape":  # the row op keeps writing the Reshape's output: its name stays
                got = _flatten_around_rows(graph, second)
                if isinstance(got, tuple):
                    a.matches.append(got)
                    continue
                if got is not None:
                    a.declined.append(Decline(second.name, "Flatten/%s/Reshape" % first.op, got))
                    continue
            if G.is_graph_output(graph, second.outputs[0]):
                continue
            if _undoes(first, second):
                a.matches.append((first, second))
        return a

    def apply(self, graph, matches, ctx):
        n = 0
        for match in matches:
            if len(match) == 3:
                n += self._apply_rows(*match)
                continue
            first, second = match
            if not first.inputs or not second.outputs:
                continue  # overlapped with an earlier pair this round
            x, y = first.inputs[0], second.outputs[0]
            G.replace_uses(y, x)
            for node in (first, second):
                node.inputs.clear()
                node.outputs.clear()
            n += 1
        return n

    @staticmethod
    def _apply_rows(flat, op, reshape) -> int:
        """op(x) over x's last axis in place of Reshape(op(Flatten(x)), Shape(x))."""
        if not flat.inputs or not op.inputs or not reshape.outputs:
            return 0  # overlapped with an earlier match this round
        x, y = flat.inputs[0], reshape.outputs[0]
        r = G.rank(x)
        for node in (flat, reshape):
            node.inputs.clear()
            node.outputs.clear()
        op.inputs[0] = x
        op.outputs[0] = y
        op.attrs["axis"] = r - 1
        return 1
