"""fold_affine: fold inference-time affine norms into adjacent MatMul / Gemm / Conv.

Identity (normopt-math.md section 2). At inference RepBN, PRepBN (lambda = 0), BatchNorm and
Unified Norm are each a per-channel affine y = a * x + t along one axis:

    BatchNormalization(g, b, rm, rv, eps):  a = g / sqrt(rv + eps),        t = b - a * rm
    RepBN = BN(x) + eta * x:                a = g / sqrt(rv + eps) + eta,  t = b - g * rm / sqrt(rv + eps)
    Unified Norm (inference):               a = w / sqrt(rv + eps),        t = b   (no mean subtraction)
    chains of Mul / Div / Add / Sub by per-channel constants compose the same way.

Fold forward into a consumer:   (a * x + t) W + c = x (diag(a) W) + (t W + c)
Fold backward into a producer:  a * (x W + c) + t = x (W diag(a)) + (a * c + t)

Preconditions, checked per affine (a failed one is declined with its reason):
  - BatchNormalization is an affine only at inference: training_mode 0 (is_test not 0 before
    opset 7), spatial 1, one statistic per channel, and no extra output (running mean / var,
    saved statistics) read by a node or the graph's outputs;
  - every constant of a chain leaves the value's shape as it is (axes.keeps_shape: a
    [1, 1, 1, 1] scalar widens a rank-3 value, so it is not a scalar of the chain);
  - the affine's axis, carried through every Transpose / Reshape / Squeeze / Unsqueeze /
    Gather / Slice / Expand / Tile / ReduceMean (over other axes) on the way, is the channel
    axis of the linear op: MatMul's input feature axis (the last) with a constant 2-D weight;
    Gemm's A feature axis (transA honoured; transB, alpha, beta honoured); Conv's channel
    axis 1 with group 1 and no padding (zero padding of a*x+t is not a*pad(x)+t);
    a mismatch is never folded (ORT's MatmulBNFusion ignores the Transpose perm here);
  - forward: every consumer path of the affine's output ends in such a linear op, and no
    intermediate is a graph output;
  - backward (only when forward is impossible): the producer path is single-consumer and
    starts at such a linear op, on its output channel axis;
  - weights are new tensors (an initializer read elsewhere is never edited), computed in
    float64 and cast back to the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from .. import graph as G
from .. import weights as W
from ..axes import LAYOUT_OPS, VALUE_INDEPENDENT, AxisError, forward_axis, keeps_shape, per_axis
from ..pipeline import Analysis, Decline, Pass, mark_changed

ELEMENTWISE = ("Mul", "Div", "Add", "Sub")


@dataclass(eq=False)
class Affine:
    kind: str
    name: str
    x: object
    y: object
    axis: int
    a: np.ndarray
    t: np.ndarray
    nodes: list = field(default_factory=list)
    plan: tuple | None = None  # ("forward", [(linear, feature axis)]) | ("backward", (linear, path))

    def describe(self) -> str:
        return f"{self.kind} '{self.name}' (axis {self.axis}, {len(self.a)} channels) folded {self.plan[0] if self.plan else ''}"


# ---------------------------------------------------------------------------------------------
# recognizers


def _per_channel(value, data):
    """(axis, vector) for a constant that varies along one axis of `data` (checked against the
    data's static shape), or a scalar (axis None); see axes.per_axis."""
    return per_axis(value, data)


def _bn(graph, node):
    """BatchNormalization at inference, or None. Training mode (training_mode=1, or is_test=0
    before opset 7), spatial=0 (per-element statistics), or an extra output (running mean /
    var, saved statistics) that a node or the graph's outputs read are not an affine."""
    if int(node.attrs.get("training_mode", 0)) or any(G.is_read(graph, o) for o in node.outputs[1:]):
        return None
    if ("is_test" in node.attrs and not int(node.attrs["is_test"])) or int(node.attrs.get("spatial", 1)) != 1:
        return None
    vals = [G.const_value(t) for t in node.inputs[1:5]]
    if any(v is None for v in vals) or G.rank(node.inputs[0]) is None:
        return None
    g, b, rm, rv = (G.f64(v).reshape(-1) for v in vals)
    c = G.static_dim(node.inputs[0], 1)
    if c is None or any(len(v) != c for v in (g, b, rm, rv)):
        return None  # the statistics must be one value per channel of x
    eps = float(node.attrs.get("epsilon", 1e-5))
    inv = g / np.sqrt(rv + eps)
    x, y = node.inputs[0], node.outputs[0]
    aff = Affine("BatchNormalization", node.name, x, y, 1, inv, b - inv * rm, [node])
    # SLAB RepBN: Add(BN(x), Mul(x, eta)) with both reading the same x
    cons = G.consumers(y)
    if len(cons) == 1 and cons[0].op == "Add" and not G.is_graph_output(graph, y):
        add = cons[0]
        other = add.inputs[1] if add.inputs[0] is y else add.inputs[0]
        mul = G.producer(other)
        if mul is not None and mul.op == "Mul" and len(G.consumers(other)) == 1 and not G.is_graph_output(graph, other):
            for xi in (0, 1):
                eta = G.const_value(mul.inputs[1 - xi])
                if mul.inputs[xi] is x and eta is not None:
                    pc = _per_channel(eta, x)
                    if pc is not None and pc[0] in (None, 1):
                        aff.kind = "RepBN"
                        aff.a = aff.a + G.f64(pc[1])
                        aff.y = add.outputs[0]
                        aff.nodes += [mul, add]
                    break
    return aff


def _const_inputs(node):
    """[(input index, value)] of the node's constant inputs."""
    out = []
    for i, inp in enumerate(node.inputs):
        v = G.const_value(inp)
        if v is not None:
            out.append((i, v))
    return out


def _memo_const_inputs():
    """_const_inputs, each node's computed once (an analysis asks it of a node several times:
    the unshaped check, the norm tails, the chain walk)."""
    memo = {}

    def const_inputs(node):
        r = memo.get(id(node))
        if r is None:
            r = memo[id(node)] = _const_inputs(node)
        return r

    return const_inputs


def _plain_per_channel(const_tensor, value, data):
    return _per_channel(value, data)


_MISSING = object()


def _memo_per_channel():
    """_per_channel(value, data) for the value of `const_tensor`, computed once per constant and
    data shape: the answer depends on the data through its shape alone (its rank, and its
    static dims where they meet the constant's), and a chain of 100k nodes by one shared
    scalar asks the same question at every node. The vectors it hands out are shared, and
    never written (the affine's arithmetic makes new arrays)."""
    memo = {}

    def per_channel(const_tensor, value, data):
        shape = getattr(data, "shape", None)
        key = (id(const_tensor), None if shape is None else tuple(shape))
        r = memo.get(key, _MISSING)
        if r is _MISSING:
            r = memo[key] = _per_channel(value, data)
        return r

    return per_channel


def _chain(graph, node, in_chain, walked=None, const_inputs=_const_inputs, per_channel=_plain_per_channel):
    """A maximal chain of Mul/Div/Add/Sub by per-channel constants starting at node. Every
    node the walk takes is added to `walked`: a chain that starts later inside it would stop
    where this one stops, so it is never walked again (linear in nodes). The walk records each
    step; the affine (a, t) is computed only for a chain that is one (not scalars only)."""
    nodes, steps, width, axis, x = [], [], 1, None, None
    cur = node
    while cur is not None and cur.op in ELEMENTWISE and id(cur) not in in_chain:
        ci = const_inputs(cur)
        if len(ci) != 1 or len(cur.inputs) != 2:
            break
        c_idx, c_val = ci[0]
        v_in = cur.inputs[1 - c_idx]
        if x is not None and v_in is not nodes[-1].outputs[0]:
            break
        dt = G.tensor_dtype(v_in)
        if dt is None or not W.is_float(dt):
            break  # integer arithmetic (shape computations) is not a norm
        pc = per_channel(cur.inputs[c_idx], c_val, v_in)
        if pc is None or G.rank(v_in) != G.rank(cur.outputs[0]):
            break
        ax, vec = pc
        if ax is not None:
            if axis is not None and ax != axis:
                break
            if width != 1 and len(vec) != width:
                break
        if cur.op == "Div" and c_idx == 0:  # c / x is not affine
            break
        if x is None:
            x = v_in
        steps.append((cur.op, c_idx, vec))
        if ax is not None and len(vec) != 1:
            width = len(vec)
        axis = ax if ax is not None else axis
        nodes.append(cur)
        if walked is not None:
            walked.add(id(cur))
        out = cur.outputs[0]
        cons = G.consumers(out)
        if len(cons) != 1 or G.is_graph_output(graph, out):
            break
        cur = cons[0]
    if not nodes or axis is None:
        return None  # nothing, or scalars only (a scaling, not a norm)
    d = G.static_dim(x, axis)
    if d is None:
        return None
    a, t = np.ones(1), np.zeros(1)
    for op, c_idx, vec in steps:
        c = G.f64(vec)
        if op == "Mul":
            a, t = a * c, t * c
        elif op == "Div":
            a, t = a / c, t / c
        elif op == "Add":
            t = t + c
        else:  # Sub
            a, t = (a, t - c) if c_idx == 1 else (-a, c - t)
    a = np.broadcast_to(a, (d,)).copy()
    t = np.broadcast_to(t, (d,)).copy()
    kind = "per-channel affine (" + "/".join(n.op for n in nodes) + ")"
    return Affine(kind, nodes[0].name, x, nodes[-1].outputs[0], axis, a, t, nodes)


def _is_linear_bias(node):
    """Add(linear(x), const): a linear op's own bias, not a norm."""
    if node.op != "Add":
        return False
    for i in (0, 1):
        p = G.producer(node.inputs[i])
        if p is not None and p.op in ("MatMul", "Gemm", "Conv") and G.const_value(node.inputs[1 - i]) is not None:
            return True
    return False


def _has_reduce_ancestor(t, depth=5) -> bool:
    """A Reduce* within `depth` producers of t (iterative; bounded by depth, not graph depth)."""
    stack, seen = [(t, depth)], set()
    while stack:
        t, d = stack.pop()
        p = G.producer(t)
        if p is None or d == 0 or (id(p), d) in seen:
            continue
        seen.add((id(p), d))
        if p.op in ("ReduceMean", "ReduceSumSquare", "ReduceL2", "ReduceSum"):
            return True
        stack.extend((i, d - 1) for i in p.inputs if G.const_value(i) is None)
    return False


def _unshaped_candidate(node, const_inputs=_const_inputs):
    """A BatchNormalization, or an elementwise op of one value and one constant, whose data
    input has no inferred shape: its per-channel structure cannot be checked."""
    if node.op == "BatchNormalization":
        return node.inputs[0] if node.inputs and G.rank(node.inputs[0]) is None else None
    if node.op not in ELEMENTWISE or len(node.inputs) != 2:
        return None
    ci = const_inputs(node)
    if len(ci) != 1:
        return None
    v = node.inputs[1 - ci[0][0]]
    dt = G.tensor_dtype(v)
    return v if G.rank(v) is None and (dt is None or W.is_float(dt)) else None


def _norm_tails(graph, const_inputs=_const_inputs) -> set:
    """ids of the nodes that are gamma/beta of a decomposed norm (x * f(reduce(x)) or
    x / f(reduce(x)), then Muls after it): left to the norm, which ORT fuses only with its
    gamma Mul in place. (An Add after a fused norm op, such as the beta ln_to_rms keeps after
    SimplifiedLayerNormalization, is a plain shift and may fold.) One pass in topological
    order: a node's answer reads its producers' answers (no recursion along Mul chains)."""
    tails = set()
    for node in graph.nodes:
        for inp in node.inputs:
            p = G.producer(inp)
            if p is None:
                continue
            if p.op in ("Div", "Mul") and not const_inputs(p) \
                    and any(_has_reduce_ancestor(q) for q in p.inputs):
                tails.add(id(node))
                break
            if p.op == "Mul" and id(p) in tails:  # beta after gamma
                tails.add(id(node))
                break
    return tails


def find_affines(graph, unshaped=None) -> list[Affine]:
    """The affine candidates; `unshaped`, if given, collects (node, value) for each candidate
    left out because its data's shape is unknown (the caller declines it with that reason)."""
    found, claimed = [], set()
    const_inputs = _memo_const_inputs()  # an analysis only reads the graph: each node's answer holds throughout
    for node in graph.nodes:
        if unshaped is not None and (node.op in ELEMENTWISE or node.op == "BatchNormalization"):
            v = _unshaped_candidate(node, const_inputs)
            if v is not None:
                unshaped.append((node, v))
                claimed.add(id(node))
                continue
        if node.op == "BatchNormalization":
            aff = _bn(graph, node)
            if aff is not None:
                found.append(aff)
                claimed.update(id(n) for n in aff.nodes)
    tails = _norm_tails(graph, const_inputs)
    walked = set()
    per_channel = _memo_per_channel()  # likewise: constants and shapes hold throughout the analysis
    for node in graph.nodes:
        # nodes come in topological order: a chain that starts earlier has claimed (or walked) its nodes
        if id(node) in claimed or id(node) in walked or node.op not in ELEMENTWISE or _is_linear_bias(node) or id(node) in tails:
            continue
        aff = _chain(graph, node, claimed, walked, const_inputs, per_channel)
        if aff is not None:
            found.append(aff)
            claimed.update(id(n) for n in aff.nodes)
    return found


# ---------------------------------------------------------------------------------------------
# feasibility


def _linear_entry(node, t):
    """(feature axis of `t` as input A of a linear op with constant weights, None) where the fold
    can enter the op; (None, why not) for a MatMul/Gemm/Conv reading t as A that it cannot
    enter; (None, None) for any other op."""
    if node.op not in ("MatMul", "Gemm", "Conv") or not node.inputs or node.inputs[0] is not t:
        return None, None
    w = G.const_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None:
        return None, "its weight is not a constant"
    if node.op == "MatMul":
        if w.ndim != 2:
            return None, f"its weight has rank {w.ndim}, not 2"
        r = G.rank(t)
        return (r - 1, None) if r is not None else (None, f"the rank of '{t.name}' is unknown")
    if node.op == "Conv":
        if int(node.attrs.get("group", 1)) != 1:
            return None, f"it is grouped (group={int(node.attrs.get('group', 1))})"
        pads = node.attrs.get("pads", [])
        if any(pads) or node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID", b"NOTSET", b"VALID"):
            return None, ("it pads its input with zeros, and a shift folded into it would reach the padding too "
                          "(the border would differ)")
    if len(node.inputs) > 2 and node.inputs[2].name and G.const_value(node.inputs[2]) is None:
        return None, "its bias is not a constant"
    if node.op == "Gemm":
        return (0 if int(node.attrs.get("transA", 0)) else 1), None
    return 1, None


def _linear_input_axis(node, t):
    """The feature axis of `t` as input A of a linear op with constant weights, else None."""
    return _linear_entry(node, t)[0]


def _between(src, dst_tensors):
    """Names of the tensors on the layout paths from src to the given tensors."""
    names, stack = set(), [src]
    targets = {t.name for t in dst_tensors}
    while stack:
        t = stack.pop()
        names.add(t.name)
        if t.name in targets:
            continue
        for c in G.consumers(t):
            if c.op in LAYOUT_OPS and c.inputs[0] is t:
                stack.append(c.outputs[0])
    return names


def _forward_plan(graph, t, axis):
    """[(linear node, its input tensor)] covering every consumer path of t, or a reason.
    Iterative (a long run of layout ops costs no recursion depth); every value on the way
    must reach at least one linear op."""
    targets, stack = [], [(t, axis)]
    while stack:
        t, axis = stack.pop()
        if G.is_graph_output(graph, t):
            return f"'{t.name}' is a graph output"
        reaches = False
        for c in G.consumers(t):
            if c.op in VALUE_INDEPENDENT:
                continue  # reads the shape only, which the fold does not change
            la, why = _linear_entry(c, t)
            if la is not None:
                if la != axis:
                    return f"axis {axis} of '{t.name}' is not the channel axis ({la}) of {c.op} '{c.name}'"
                targets.append((c, t))
                reaches = True
                continue
            try:
                b = forward_axis(c, t, axis, LAYOUT_OPS)
            except (AxisError, TypeError, KeyError):
                b = None
            if b is None or c.inputs[0] is not t or len(c.outputs) != 1:
                if why:
                    return f"'{t.name}' is read by {c.op} '{c.name}', which cannot take the fold: {why}"
                return f"'{t.name}' is read by {c.op} '{c.name}', which is neither a linear op on the channel axis nor a layout op"
            stack.append((c.outputs[0], b))
            reaches = True
        if not reaches:
            return f"'{t.name}' has no readers"
    return targets


def _needs_new_bias(graph, lin) -> bool:
    """A MatMul whose output is not already followed by a constant bias Add (Gemm and Conv take
    the shift in their C / B input at no cost)."""
    if lin.op != "MatMul":
        return False
    cons = G.consumers(lin.outputs[0])
    if len(cons) == 1 and cons[0].op == "Add" and not G.is_graph_output(graph, lin.outputs[0]):
        add = cons[0]
        other = add.inputs[1] if add.inputs[0] is lin.outputs[0] else add.inputs[0]
        bv = G.const_value(other)
        return bv is None or bv.ndim > 1
    return True


def _forward_cost_ok(graph, targets, aff):
    """Folding t forward into a bias-less MatMul adds an Add over its outputs. Fold only if
    the elements those new Adds touch are at most those of the affine ops removed (an LM
    head's vocabulary is far wider than the norm it would absorb)."""
    if not np.any(aff.t):
        return targets
    added = sum(int(G.const_value(lin.inputs[1]).shape[1]) for lin, _ in targets if _needs_new_bias(graph, lin))
    removed = len(aff.a) * len(aff.nodes)
    if added > removed:
        return f"folding would add bias Adds over {added} output channels to remove {len(aff.nodes)} op(s) over {len(aff.a)} channels"
    return targets


def _backward_plan(graph, x, axis):
    """(linear node, bias Add or None, out axis) producing x through single-consumer layout ops."""
    t, a = x, axis
    for _ in range(16):
        # the fold changes t's values and keeps its shape and type: a Shape beside is no reader
        if G.is_graph_output(graph, t) or len(G.value_readers(t)) != 1:
            return f"'{t.name}' is read elsewhere or is a graph output"
        p = G.producer(t)
        if p is None:
            return f"'{t.name}' is a graph input"
        if p.op == "Add":
            ci = [i for i in (0, 1) if G.const_value(p.inputs[i]) is not None]
            lin = G.producer(p.inputs[1 - ci[0]]) if len(ci) == 1 else None
            mid = p.inputs[1 - ci[0]] if len(ci) == 1 else None
            if lin is not None and lin.op in ("MatMul", "Gemm", "Conv") and len(G.value_readers(mid)) == 1 \
                    and not G.is_graph_output(graph, mid):
                return _check_out_axis(graph, lin, p.inputs[1 - ci[0]], a, (p, ci[0]))
            return f"'{t.name}' is produced by Add '{p.name}', not a linear op"
        if p.op in ("MatMul", "Gemm", "Conv"):
            return _check_out_axis(graph, p, t, a, None)
        if p.op in ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten"):
            src = p.inputs[0]
            r = G.rank(src)
            found = None
            for b in range(r or 0):
                try:
                    if forward_axis(p, src, b, LAYOUT_OPS) == a:
                        found = b
                        break
                except (AxisError, TypeError):
                    break
            if found is None:
                return f"axis {a} cannot be traced through {p.op} '{p.name}'"
            t, a = src, found
            continue
        return f"'{t.name}' is produced by {p.op} '{p.name}', not a linear op"
    return "producer chain too long"


def _check_out_axis(graph, lin, out, a, bias_edge):
    r = G.rank(out)
    if lin.op == "MatMul":
        w = G.const_value(lin.inputs[1])
        ok = w is not None and w.ndim == 2 and r is not None and a == r - 1
    else:  # Gemm and Conv: output channels on axis 1; C / B, if any, must be constant
        ok = G.const_value(lin.inputs[1]) is not None and a == 1 and (len(lin.inputs) < 3 or not lin.inputs[2].name or G.const_value(lin.inputs[2]) is not None)
    if not ok:
        return f"axis {a} is not the output channel axis of {lin.op} '{lin.name}' (or its weights are not constant)"
    if bias_edge is not None:
        # the bias must broadcast into the linear output without widening it (Add(u, b) is u's shape)
        b = G.const_info(bias_edge[0].inputs[bias_edge[1]])
        if b is None or not keeps_shape(b[0], out):
            return (f"bias of '{bias_edge[0].name}' (shape {list(b[0]) if b else '?'}) does not broadcast into "
                    f"{lin.op} '{lin.name}' output {G.shape(out)} without widening it")
    return (lin, bias_edge, r, a)


# ---------------------------------------------------------------------------------------------
# rewriting


def _new(namer, like_tensor, values64, suffix):
    like = G.const_value(like_tensor)
    return G.new_const(namer, f"{like_tensor.name}_{suffix}", G.cast_like(values64, like))


def _add_bias_after(graph, namer, lin, shift64, dtype_like):
    """lin's output y becomes lin' -> Add(shift) -> y."""
    y = lin.outputs[0]
    mid = G.new_var(namer, f"{y.name}_nobias", y.dtype, y.shape)
    lin.outputs[0] = mid
    c = G.new_const(namer, f"{lin.name}_bias", G.cast_like(shift64, dtype_like))
    G.add_node(graph, namer, "Add", [mid, c], [y], base=f"{lin.name}_bias_add")


def _fold_forward(graph, namer, lin, a, t):
    """(a*x + t) W + c = x (diag(a) W) + (t W + c): the linear op's input channels are scaled,
    t W joins its bias. Weight math in float64, block by block."""
    w_t = lin.inputs[1]
    w = G.const_value(w_t)
    like = w
    if lin.op == "MatMul":
        lin.inputs[1] = G.new_const(namer, f"{w_t.name}_fa", W.scale_axis(w, a, 0))
        shift = W.vecmat(t, w)
        cons = G.consumers(lin.outputs[0])
        if len(cons) == 1 and cons[0].op == "Add" and not G.is_graph_output(graph, lin.outputs[0]):
            add = cons[0]
            bi = 1 if add.inputs[0] is lin.outputs[0] else 0
            bv = G.const_value(add.inputs[bi])
            if bv is not None and bv.ndim <= 1:
                add.inputs[bi] = _new(namer, add.inputs[bi], np.broadcast_to(G.f64(bv), shift.shape) + shift, "fa")
                return
        if np.any(shift):
            _add_bias_after(graph, namer, lin, shift, like)
    elif lin.op == "Gemm":
        trans_b = int(lin.attrs.get("transB", 0))  # B' = B^T when transB: the input channels are its axis 1
        lin.inputs[1] = G.new_const(namer, f"{w_t.name}_fa", W.scale_axis(w, a, 1 if trans_b else 0))
        alpha, beta = float(lin.attrs.get("alpha", 1.0)), float(lin.attrs.get("beta", 1.0))
        shift = alpha * (W.matvec(w, t) if trans_b else W.vecmat(t, w))
        _gemm_add_c(namer, lin, shift, beta, like)
    else:  # Conv without padding: bias += sum over (cin, k) of W * t[cin]
        lin.inputs[1] = G.new_const(namer, f"{w_t.name}_fa", W.scale_axis(w, a, 1))
        tk = t.reshape((1, -1) + (1,) * (w.ndim - 2))
        shift = np.concatenate([(G.f64(w[i:i + 256]) * tk).reshape(min(256, w.shape[0] - i), -1).sum(1)
                                for i in range(0, w.shape[0], 256)])
        if len(lin.inputs) > 2 and lin.inputs[2].name:
            lin.inputs[2] = _new(namer, lin.inputs[2], G.f64(G.const_value(lin.inputs[2])) + shift, "fa")
        else:
            while len(lin.inputs) < 2:
                lin.inputs.append(gs.Variable.empty())
            lin.inputs.append(G.new_const(namer, f"{lin.name}_B", G.cast_like(shift, like)))


def _gemm_add_c(namer, lin, shift, beta, like):
    has_c = len(lin.inputs) > 2 and lin.inputs[2].name
    if has_c and beta != 0.0:
        cv = G.f64(G.const_value(lin.inputs[2]))
        nc = cv + shift / beta
        lin.inputs[2] = _new(namer, lin.inputs[2], np.broadcast_to(nc, np.broadcast_shapes(cv.shape, shift.shape)), "fa")
        return
    lin.attrs["beta"] = 1.0
    c = G.new_const(namer, f"{lin.name}_C", G.cast_like(shift, like))
    if has_c:
        lin.inputs[2] = c
    else:
        lin.inputs.append(c)


def _along(vec, rank, axis):
    """vec as an array of the given rank that varies along `axis` only."""
    shape = [1] * rank
    shape[axis] = -1
    return np.asarray(vec, np.float64).reshape(shape)


def _scaled_bias(bias, a, t, rank, axis):
    """a*b + t for a bias b that broadcasts against a linear output of `rank` whose channels
    are on `axis` (b may be [d], [1, 1, d], [N, d], [C, 1, 1], a scalar ...)."""
    b = G.f64(bias)
    b = b.reshape((1,) * (rank - b.ndim) + b.shape)
    out = _along(a, rank, axis) * b + _along(t, rank, axis)
    while out.ndim > max(bias.ndim, 1) and out.shape[0] == 1:
        out = out[0]  # keep the bias's own rank where the result allows it
    return out


def _fold_backward(graph, namer, lin, bias_edge, a, t, rank, axis):
    """a*(x W + c) + t = x (W diag(a)) + (a*c + t), for every bias the linear output carries:
    its own (Gemm C, Conv B) and a following constant Add. t goes into exactly one of them."""
    w_t = lin.inputs[1]
    w = G.const_value(w_t)
    like = w
    if lin.op == "MatMul":
        w_axis = 1
    elif lin.op == "Gemm":
        w_axis = 0 if int(lin.attrs.get("transB", 0)) else 1
    else:
        w_axis = 0
    lin.inputs[1] = G.new_const(namer, f"{w_t.name}_fb", W.scale_axis(w, a, w_axis))
    zero = np.zeros_like(t)
    has_own = lin.op in ("Gemm", "Conv") and len(lin.inputs) > 2 and lin.inputs[2].name
    t_own = zero if bias_edge is not None else t  # t goes to the bias Add when there is one
    if lin.op == "Gemm":
        beta = float(lin.attrs.get("beta", 1.0))
        if has_own and beta != 0.0:
            cv = G.const_value(lin.inputs[2])
            lin.inputs[2] = _new(namer, lin.inputs[2], _scaled_bias(cv, a, t_own / beta, 2, 1), "fb")
        elif np.any(t_own):
            _gemm_add_c(namer, lin, t_own, 0.0, like)
    elif lin.op == "Conv":
        if has_own:  # Conv's B is per output channel by definition
            lin.inputs[2] = _new(namer, lin.inputs[2], a * G.f64(G.const_value(lin.inputs[2])).reshape(-1) + t_own, "fb")
        elif np.any(t_own):
            while len(lin.inputs) < 2:
                lin.inputs.append(gs.Variable.empty())
            lin.inputs.append(G.new_const(namer, f"{lin.name}_B", G.cast_like(t_own, like)))
    if bias_edge is not None:
        add, bi = bias_edge
        bv = G.const_value(add.inputs[bi])
        add.inputs[bi] = _new(namer, add.inputs[bi], _scaled_bias(bv, a, t, rank, axis), "fb")
    elif lin.op == "MatMul" and np.any(t):
        _add_bias_after(graph, namer, lin, t, like)


def _remove(graph, aff):
    """Drop the affine's nodes. Its readers read x; where y is a graph output (possible only
    for a backward fold, where x has no other reader), x's producer writes y instead, so the
    output keeps its name and its producer."""
    for n in aff.nodes:
        n.inputs.clear()
        n.outputs.clear()
    G.bypass(graph, aff.x, aff.y)


class FoldAffineNorms(Pass):
    repeat = True  # two folds into one linear op are applied in successive rounds
    name = "fold_affine"
    description = "fold RepBN/PRepBN, BatchNorm, Unified Norm and per-channel affine chains into adjacent MatMul/Gemm/Conv (SLAB, arXiv 2405.11582)"

    def analyze(self, graph, ctx):
        a = Analysis()
        unshaped = []
        affines = find_affines(graph, unshaped)
        for node, v in unshaped:
            a.declined.append(Decline(node.name, node.op, f"the shape of '{v.name}' could not be inferred, so its per-channel structure cannot be checked"))
        for aff in affines:
            p = G.producer(aff.x)
            if not ctx.state.get("fold_beta", True) and p is not None and p.op in ("SimplifiedLayerNormalization", "RMSNormalization", "LayerNormalization"):
                a.declined.append(Decline(aff.name, aff.kind, "a norm's beta, kept as an Add (measured faster)"))
                continue
            fwd = _forward_plan(graph, aff.y, aff.axis)
            if not isinstance(fwd, str):
                fwd = _forward_cost_ok(graph, fwd, aff)
            if not isinstance(fwd, str):
                aff.plan = ("forward", fwd)
                a.matches.append(aff)
                continue
            bwd = _backward_plan(graph, aff.x, aff.axis)
            if not isinstance(bwd, str):
                aff.plan = ("backward", bwd)
                a.matches.append(aff)
                continue
            a.declined.append(Decline(aff.name, aff.kind, f"forward: {fwd}; backward: {bwd}"))
        return a

    def apply(self, graph, matches, ctx):
        namer = G.Namer(graph)
        touched = set()
        n = 0
        for aff in matches:
            lins = [lin for lin, _ in aff.plan[1]] if aff.plan[0] == "forward" else [aff.plan[1][0]]
            if any(id(lin) in touched for lin in lins):
                continue  # a second fold into the same linear op waits for the next round
            touched.update(id(lin) for lin in lins)
            if aff.plan[0] == "forward":
                # the readers' inputs now carry x, and a MatMul's output lacks t.W until its bias
                mark_changed(ctx, *_between(aff.y, [t for _, t in aff.plan[1]]), *(lin.outputs[0].name for lin, _ in aff.plan[1]))
                for lin, _ in aff.plan[1]:
                    _fold_forward(graph, namer, lin, aff.a, aff.t)
            else:
                lin, bias_edge, rank, axis = aff.plan[1]
                # the linear's output (and its bias Add, layout ops) now carry the affine's result
                after = bias_edge[0].outputs[0] if bias_edge else lin.outputs[0]
                mark_changed(ctx, lin.outputs[0].name, after.name, *_between(after, [aff.x]))
                _fold_backward(graph, namer, lin, bias_edge, aff.a, aff.t, rank, axis)
            _remove(graph, aff)
            n += 1
        return n
