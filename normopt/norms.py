"""Recognizers for normalizations, matched by what they compute rather than by names.

* :func:`find_layernorms` finds LayerNorm in the forms exporters write it:
  - the LayerNormalization op;
  - the decomposed form of opset <= 16 exports: ReduceMean, Sub, Pow(2) | Mul(d, d), ReduceMean,
    Add(eps), Sqrt, Div | Reciprocal+Mul, optional Mul(gamma), optional Add(beta), with axes
    as attribute or input and keepdims=1 (or keepdims=0 followed by an Unsqueeze of the same
    axes); keepdims=0 without it broadcasts wrongly and is not a LayerNorm;
  - com.microsoft SkipLayerNormalization (an Add fused with a LayerNorm).
* Every constant the recognizer meets must leave x's shape as it is (axes.keeps_shape): a
  one-element [1, 1, 1, 1] gamma or eps widens a rank-3 LN to rank 4 and is not a number.
* :func:`find_norms` lists every normalization for ``normopt inspect``: the LN forms above, RMS
  forms, BatchNormalization and per-channel affine chains.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from . import graph as G
from . import weights as W
from .axes import keeps_shape, scalar_of


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
    gamma_value: np.ndarray | None = None  # computed gamma over the normalized dims (decomposed forms)
    beta_value: np.ndarray | None = None

    def gamma_array(self):
        """gamma as a flat array over the normalized dims, or None (no scale, or a run-time one)."""
        if self.gamma_value is not None:
            return self.gamma_value
        v = G.const_value(self.gamma) if self.gamma is not None else None
        return None if v is None else v.reshape(-1)

    def beta_array(self):
        if self.beta_value is not None:
            return self.beta_value
        v = G.const_value(self.beta) if self.beta is not None else None
        return None if v is None else v.reshape(-1)

    def over_last_axis(self) -> bool:
        return self.rank is not None and self.axes == (self.rank - 1,)

    def describe(self) -> str:
        return f"{self.kind} '{self.name}' over axes {self.axes} eps={self.epsilon:g}"


def _const_scalar(tensor):
    """A one-element constant as a number, whatever its rank (inspect only: a matcher asks
    axes.scalar_of, which also checks that the constant does not widen the value it meets)."""
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


def _match_layernorm_op(graph, node) -> LayerNormMatch:
    x = node.inputs[0]
    r = G.rank(x)
    axis = int(node.attrs.get("axis", -1))
    axes = None
    if r is not None:
        a = G.normalize_axis(axis, r)
        axes = tuple(range(a, r))
    used = any(G.is_read(graph, o) for o in node.outputs[1:])  # Mean / InvStdDev: a reader or a graph output
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


# ---------------------------------------------------------------------------------------------
# LayerNorm matched by what it computes
#
# Exporters write LayerNorm in many arrangements: (x - mean) / sqrt(var + eps) * g + b (PyTorch
# opset <= 16, Paddle), (x - mean) * rsqrt(var + eps) * g + b, Keras' x * s + (-mean * s + b) and
# TF's moments form x * s + (b - mean * s) with s = g * rsqrt(var + eps), flax's
# var = max(0, E[x^2] - E[x]^2), means as ReduceMean (axes attribute or input, keepdims 1, or 0
# with the Unsqueeze that restores the axes), as GlobalAveragePool on a rank-3 tensor (tf2onnx
# below opset 18), or as ReduceSum times 1/n. The recognizer finds a mean and a variance of x
# over the same axes, then evaluates the nodes after them as a polynomial in the symbols
#     x, m = mean(x), r = 1 / sqrt(var + eps), and the constants they meet,
# and accepts the furthest value whose polynomial is exactly  c*G*r*x - c*G*r*m + B  (G, B built
# from constants only): LN(x) with gamma = c*G and beta = B, each checked to vary along the
# normalized axes only (a [N, 1] constant is per-token, not per-channel).


def _mean_of(graph, node):
    """(x, axes, out tensor, nodes) when node starts a mean of x over `axes` (keeping them)."""
    if not node.inputs:
        return None
    x = node.inputs[0]
    r = G.rank(x)
    if r is None:
        return None
    if node.op == "GlobalAveragePool":
        if r < 3:
            return None
        return x, tuple(range(2, r)), node.outputs[0], [node]
    if node.op not in ("ReduceMean", "ReduceSum"):
        return None
    axes, keep = G.reduce_axes(node, r)
    if axes is False or axes is None or not axes:
        return None
    nodes, out = [node], node.outputs[0]
    if not keep:
        cons = G.consumers(out)
        if len(cons) != 1 or cons[0].op != "Unsqueeze" or G.is_graph_output(graph, out):
            return None
        u_axes, _ = G.reduce_axes(cons[0], r)  # same attribute/input convention as Reduce*
        if u_axes != axes:
            return None
        nodes.append(cons[0])
        out = cons[0].outputs[0]
    if node.op == "ReduceSum":  # a sum times 1/n (or divided by n) is a mean
        n = 1
        for a in axes:
            dim = G.static_dim(x, a)
            if dim is None:
                return None
            n *= dim
        cons = G.consumers(out)
        if len(cons) != 1 or G.is_graph_output(graph, out) or cons[0].op not in ("Mul", "Div"):
            return None
        k = scalar_of(_other(cons[0], out), out)
        if k is None or (cons[0].op == "Div" and cons[0].inputs[0] is not out):
            return None
        if not np.isclose(k if cons[0].op == "Mul" else 1.0 / k, 1.0 / n, rtol=1e-6, atol=0):
            return None
        nodes.append(cons[0])
        out = cons[0].outputs[0]
    return x, axes, out, nodes


def _square_of(node, t):
    """True when node computes t * t (Mul(t, t) or Pow(t, 2))."""
    if node.op == "Mul" and len(node.inputs) == 2 and node.inputs[0] is t and node.inputs[1] is t:
        return True
    return node.op == "Pow" and node.inputs[0] is t and scalar_of(node.inputs[1], t) == 2.0


def _means_of(graph, t, axes):
    """Means of t over `axes` (their output tensors and nodes)."""
    found = []
    for c in G.consumers(t):
        m = _mean_of(graph, c)
        if m is not None and m[0] is t and m[1] == axes:
            found.append(m)
    return found


def _variances(graph, x, axes, mu):
    """(var tensor, nodes) for var(x) over `axes` computed from mean mu: E[(x - m)^2], or
    E[x^2] - m^2 (optionally clamped at 0 by Max/Relu)."""
    out = []
    for sub in G.consumers(x):  # E[(x - m)^2]
        if sub.op == "Sub" and sub.inputs[0] is x and sub.inputs[1] is mu:
            d = sub.outputs[0]
            for sq in G.consumers(d):
                if _square_of(sq, d):
                    for mean in _means_of(graph, sq.outputs[0], axes):
                        out.append((mean[2], [sub, sq] + mean[3]))
    for sq in G.consumers(x):  # E[x^2] - m^2
        if not _square_of(sq, x):
            continue
        for m2 in _means_of(graph, sq.outputs[0], axes):
            for msq in G.consumers(mu):
                if not _square_of(msq, mu):
                    continue
                for sub in G.consumers(m2[2]):
                    if sub.op == "Sub" and sub.inputs[0] is m2[2] and sub.inputs[1] is msq.outputs[0]:
                        v, nodes = sub.outputs[0], [sq] + m2[3] + [msq, sub]
                        cons = G.consumers(v)
                        if len(cons) == 1 and (cons[0].op == "Relu" or (cons[0].op == "Max" and len(cons[0].inputs) == 2
                                                                           and scalar_of(_other(cons[0], v), v) == 0.0)):
                            nodes.append(cons[0])
                            v = cons[0].outputs[0]
                        out.append((v, nodes))
    return out


class _Poly:
    """A polynomial over symbols (x, m, r, and constants "k<i>"), with negative powers allowed
    for single-term divisors: {monomial: coefficient}, monomial = sorted ((symbol, power), ...)."""

    def __init__(self, terms=None):
        self.t = {k: v for k, v in (terms or {}).items() if v != 0.0}

    @staticmethod
    def sym(name, power=1):
        return _Poly({((name, power),): 1.0})

    @staticmethod
    def num(v):
        return _Poly({(): float(v)})

    def __add__(self, o):
        t = dict(self.t)
        for k, v in o.t.items():
            t[k] = t.get(k, 0.0) + v
        return _Poly(t)

    def __neg__(self):
        return _Poly({k: -v for k, v in self.t.items()})

    def __sub__(self, o):
        return self + (-o)

    def __mul__(self, o):
        t = {}
        for k1, v1 in self.t.items():
            for k2, v2 in o.t.items():
                powers = dict(k1)
                for s_, p_ in k2:
                    powers[s_] = powers.get(s_, 0) + p_
                k = tuple(sorted((s_, p_) for s_, p_ in powers.items() if p_ != 0))
                t[k] = t.get(k, 0.0) + v1 * v2
        return _Poly(t)

    def inverse(self):
        if len(self.t) != 1:
            return None
        (k, v), = self.t.items()
        return _Poly({tuple((s_, -p_) for s_, p_ in k): 1.0 / v})

    def symbols(self):
        return {s_ for k in self.t for s_, _ in k}

    def carries_stats(self) -> bool:
        """A term holds m or r (symbols() & {"m", "r"}, without building the set)."""
        for k in self.t:
            for s_, _ in k:
                if s_ == "m" or s_ == "r":
                    return True
        return False


_SOURCES = ("x", "m", "r")


def _ln_form(poly: _Poly):
    """(c, G monomial, B terms) when poly == c*G*r*x - c*G*r*m + B with G and B over constants:
    exactly one term holds x, exactly one other holds m (a term with both is no LN), and no
    other term holds a source symbol. One pass over the terms."""
    kx = km = None
    rest = {}
    for k, v in poly.t.items():
        has_x = has_m = has_r = False
        for s_, _ in k:
            if s_ == "x":
                has_x = True
            elif s_ == "m":
                has_m = True
            elif s_ == "r":
                has_r = True
        if has_x:
            if has_m or kx is not None:
                return None
            kx, cx = k, v
        elif has_m:
            if km is not None:
                return None
            km, cm = k, v
        elif has_r:
            return None
        else:
            rest[k] = v
    if kx is None or km is None:
        return None
    px, pm = dict(kx), dict(km)
    if px.pop("x", 0) != 1 or px.pop("r", 0) != 1 or pm.pop("m", 0) != 1 or pm.pop("r", 0) != 1:
        return None
    if px != pm or abs(cx + cm) > 1e-9 * abs(cm) or any(s_ in _SOURCES for s_ in px):  # cx == -cm (rtol 1e-9)
        return None
    return cx, tuple(sorted(px.items())), rest


EVAL_OPS = ("Add", "Sub", "Mul", "Div", "Neg", "Reciprocal", "Sqrt", "Pow", "Identity")


def _match_algebraic(graph, mean_node, order=None) -> LayerNormMatch | None:
    found = _mean_of(graph, mean_node)
    if found is None:
        return None
    x, axes, mu, mean_nodes = found
    dt = G.tensor_dtype(x)
    if dt is None or not W.is_float(dt):
        return None
    r = G.rank(x)
    for var, var_nodes in _variances(graph, x, axes, mu):
        for add in G.consumers(var):
            if add.op != "Add" or len(add.inputs) != 2 or G.is_graph_output(graph, var):
                continue
            eps = scalar_of(_other(add, var), var)  # a [1, 1, 1, 1] eps widens the rank: not this LN
            if eps is None or eps < 0:
                continue
            m = _evaluate(graph, x, mu, add.outputs[0], axes, r)
            if m is None:
                continue
            poly_of, producers, consts = m
            match = _furthest(graph, x, mu, mean_nodes + var_nodes + [add], poly_of, producers, consts, axes, r, eps, order)
            if match is not None:
                return match
    return None


def _evaluate(graph, x, mu, ve, axes, r):
    """Polynomials of the values after the mean and variance, up to a bounded depth."""
    poly_of = {id(x): _Poly.sym("x"), id(mu): _Poly.sym("m")}
    consts = {}  # symbol -> constant value
    producers = {}  # id(tensor) -> node
    frontier = [x, mu, ve]
    seen_nodes = set()
    consumers = G.consumers
    for _ in range(24):
        nxt = []
        for t in frontier:
            for node in consumers(t):
                if id(node) in seen_nodes or node.op not in EVAL_OPS or len(node.outputs) != 1:
                    continue
                named = reads_ve = False  # any named input; ve among them
                for i in node.inputs:
                    if i is not None and i.name:
                        named = True
                        if i is ve:
                            reads_ve = True
                            break
                if not named:
                    continue
                out = node.outputs[0]
                if reads_ve:  # sqrt(ve) = 1/r, ve^-0.5 = r
                    if node.op == "Sqrt":
                        poly = _Poly.sym("r", -1)
                    elif node.op == "Pow" and node.inputs[0] is ve and scalar_of(node.inputs[1], ve) == -0.5:
                        poly = _Poly.sym("r")
                    else:
                        continue
                else:
                    args = []
                    for i in node.inputs:
                        if i is None or not i.name:
                            args.append(None)
                        elif id(i) in poly_of:
                            args.append(poly_of[id(i)])
                        else:
                            v = G.const_value(i)
                            if v is None or not W.is_float(v.dtype):
                                args = None
                                break
                            if not keeps_shape(v.shape, x):  # it widens the value (a [1, 1, 1, 1] is not a number)
                                args = None
                                break
                            if v.size == 1:
                                args.append(_Poly.num(v.reshape(-1)[0]))
                            else:
                                key = f"k{len(consts)}"
                                consts[key] = (i, v)
                                args.append(_Poly.sym(key))
                    if args is None:
                        continue
                    for a in args:
                        if a is not None and a.carries_stats():
                            break
                    else:
                        continue  # only the values that carry the statistics
                    poly = _apply(node, args)
                    if poly is None:
                        continue
                seen_nodes.add(id(node))
                poly_of[id(out)] = poly
                producers[id(out)] = node
                nxt.append(out)
        if not nxt:
            break
        frontier = nxt
    return poly_of, producers, consts


def _apply(node, args):
    op = node.op
    if op == "Identity":
        return args[0]
    if op == "Neg":
        return -args[0]
    if op == "Reciprocal":
        return args[0].inverse()
    if len(args) != 2 or args[0] is None or args[1] is None:
        return None
    a, b = args
    if op == "Add":
        return a + b
    if op == "Sub":
        return a - b
    if op == "Mul":
        return a * b
    if op == "Div":
        inv = b.inverse()
        return None if inv is None else a * inv
    if op == "Pow" and node.inputs[1] is not None and scalar_of(node.inputs[1], node.inputs[0]) == 2.0:
        return a * a
    return None


def _furthest(graph, x, mu, stat_nodes, poly_of, producers, consts, axes, r, eps, order=None):
    """The last value in LN form whose region (statistics + evaluated nodes up to it) is
    closed: nothing inside it is read from outside or is a graph output."""
    if order is None:  # node positions: made once per find_layernorms (linear in nodes overall)
        order = {id(n): i for i, n in enumerate(graph.nodes)}
    # the values furthest first (a stable sort: ties keep the evaluation's order); each one's
    # form is computed when it is reached, so the values before the furthest LN are never asked
    cands = sorted(producers, key=lambda t: -order.get(id(producers[t]), -1))
    tensors = {}
    for n in list(producers.values()) + stat_nodes:
        for o in n.outputs:
            tensors[id(o)] = o
    for tid in cands:
        form = _ln_form(poly_of[tid])
        if form is None:
            continue
        y = tensors[tid]
        region = _region(y, producers, stat_nodes, x)
        if region is None or not _closed(graph, region, y, x):
            continue
        c, gmono, rest = form
        gamma = _value(c, gmono, consts, r)
        beta = sum((_value(v, k, consts, r) for k, v in rest.items()), np.zeros(1)) if rest else None
        if gamma is None or (rest and beta is None):
            continue
        if not _per_axes(gamma, x, axes) or (beta is not None and not _per_axes(beta, x, axes)):
            continue
        gamma_tensor = consts[gmono[0][0]][0] if (len(gmono) == 1 and gmono[0][1] == 1 and c == 1.0) else None
        beta_tensor = None
        if rest and len(rest) == 1:
            (k, v), = rest.items()
            if len(k) == 1 and k[0][1] == 1 and v == 1.0:
                beta_tensor = consts[k[0][0]][0]
        readers = [n for n in region if any(i is x for i in n.inputs)]
        return LayerNormMatch(
            kind="decomposed LN", name=region[0].name or y.name, x=x, y=y, axes=tuple(axes), rank=r, epsilon=float(eps),
            gamma=gamma_tensor, beta=beta_tensor, nodes=region, readers=readers,
            gamma_value=_flat(gamma, x, axes), beta_value=None if beta is None else _flat(beta, x, axes))
    return None


def _region(y, producers, stat_nodes, x):
    """The nodes computing y from x: statistics plus evaluated nodes on the way (topological)."""
    nodes, stack, seen = [], [y], set()
    while stack:
        t = stack.pop()
        p = producers.get(id(t))
        if p is None or id(p) in seen:
            continue
        seen.add(id(p))
        nodes.append(p)
        stack.extend(i for i in p.inputs if i is not None and i.name)
    ids = {id(n) for n in nodes}
    return [n for n in stat_nodes if id(n) not in ids] + nodes[::-1]


def _closed(graph, region, y, x) -> bool:
    ids = {id(n) for n in region}
    for n in region:
        for o in n.outputs:
            if o is y:
                continue
            if G.is_graph_output(graph, o) or any(id(c) not in ids for c in G.consumers(o)):
                return False
    return True


def _value(coef, mono, consts, r):
    """coef * prod(constants ** powers), broadcast to rank r (None if a power is not 1 or -1)."""
    v = np.asarray(coef, np.float64)
    for sym, p in mono:
        c = np.asarray(consts[sym][1], np.float64)
        if p == 1:
            v = v * c
        elif p == -1:
            v = v / c
        else:
            v = v * c ** p
    v = np.asarray(v)
    if v.ndim > r:
        return None
    return v.reshape((1,) * (r - v.ndim) + v.shape)


def _per_axes(v, x, axes) -> bool:
    """v (rank-r) varies along the normalized axes only, and does not widen x."""
    shape = G.shape(x)
    if shape is None:
        return False
    for i, d in enumerate(v.shape):
        if d == 1:
            continue
        if i not in axes or shape[i] != d:
            return False
    return True


def _flat(v, x, axes):
    """The per-axes values as one flat array over the normalized dims (a scalar broadcast)."""
    shape = G.shape(x)
    target = [shape[i] if i in axes else 1 for i in range(len(shape))]
    if any(not isinstance(d, int) for d in target):
        return None if np.asarray(v).size != 1 else np.asarray(v).reshape(-1)
    return np.broadcast_to(v, target).reshape(-1).copy()


def find_layernorms(graph: gs.Graph) -> list[LayerNormMatch]:
    found, claimed = [], set()
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if node.op == "LayerNormalization" and node.domain in ("", "ai.onnx", None):
            found.append(_match_layernorm_op(graph, node))
        elif node.op in ("ReduceMean", "ReduceSum", "GlobalAveragePool") and id(node) not in claimed:
            m = _match_algebraic(graph, node, order)
            if m is not None:
                found.append(m)
                claimed.update(id(n) for n in m.nodes)
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


NORM_OPS_WITH_GAMMA = ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization", "SkipLayerNormalization",
                       "SkipSimplifiedLayerNormalization")


def _affine_form(node):
    """(x, the constant) when node is ``x * a``, ``x / a``, ``x + t`` or ``x - t`` with a float
    constant that varies along exactly one axis and is applied elementwise to x's channels along
    it: the constant's rank is at most x's, and x already spans that axis at the constant's full
    extent (static), so the output has x's shape. An outer product is not one: rotary's
    ``positions[B, S, 1] * inv_freq[D]`` or ALiBi's ``slopes[H, 1] * positions[B, 1, S]`` make
    a new axis from a constant, they scale no channel of x. Else None."""
    if node.op not in ("Mul", "Add", "Sub", "Div") or len(node.inputs) != 2:
        return None
    consts = [G.const_value(t) for t in node.inputs]
    if (consts[0] is None) == (consts[1] is None):
        return None
    k = 0 if consts[0] is None else 1  # x's position
    if node.op in ("Sub", "Div") and k != 0:
        return None  # t - x, a / x: not a scale or shift of x
    x, c = node.inputs[k], consts[1 - k]
    if c.size <= 1 or not W.is_float(c.dtype) or sum(1 for s in c.shape if s != 1) != 1:
        return None
    shape = getattr(x, "shape", None)
    if shape is None or c.ndim > len(shape):
        return None
    axis = next(i for i, s in enumerate(c.shape) if s != 1) - c.ndim  # negative: aligned from the right
    if shape[axis] != c.shape[axis]:  # unknown, 1 (broadcast: an outer product) or another size
        return None
    return x, c


def _normalized_output(graph, reduce_node):
    """The value ``x / sqrt(mean(x^2) + eps)`` (Div, or Mul by Reciprocal/Sqrt's inverse) of a
    decomposed RMSNorm whose mean of squares is reduce_node, or None."""
    base = reduce_node.inputs[0]
    base_x = G.producer(base).inputs[0] if G.producer(base) is not None else None
    t = reduce_node.outputs[0]
    for _ in range(4):  # Add(eps) -> Sqrt -> Reciprocal, in any sub-order the exporters write
        for c in G.consumers(t):
            if c.op == "Div" and c.inputs[1] is t and c.inputs[0] is base_x:
                return c.outputs[0]
            if c.op == "Mul" and base_x in c.inputs and t in c.inputs:
                return c.outputs[0]
        nxt = [c for c in G.consumers(t) if c.op in ("Add", "Sqrt", "Reciprocal")]
        if len(nxt) != 1:
            return None
        t = nxt[0].outputs[0]
    return None


def _gamma_of_a_norm(x, norm_outputs) -> bool:
    """x is what a norm writes, so an affine on it is that norm's own γ/β (ORT needs it in place)."""
    p = G.producer(x)
    return id(x) in norm_outputs or (p is not None and p.op in NORM_OPS_WITH_GAMMA)


def _is_per_channel_affine(node, norm_outputs=()) -> bool:
    """A per-channel affine norm: ``a * x + t`` along x's channel axis (see _affine_form) that is
    neither a norm's own γ/β nor a linear op's bias."""
    form = _affine_form(node)
    if form is None:
        return False
    x, _ = form
    if _gamma_of_a_norm(x, norm_outputs):
        return False
    if node.op in ("Add", "Sub") and _from_linear_op(x):
        return False  # a linear op's bias
    return True


LINEAR_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum", "FusedMatMul", "MatMulNBits", "MatMulInteger",
              "QLinearMatMul", "QLinearConv", "ConvInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul")
# ops that only move or relabel a linear op's output values (its channel axis is kept or moved)
_RELABEL = ("Reshape", "Squeeze", "Unsqueeze", "Flatten", "Transpose", "Cast", "Identity")


def _from_linear_op(x, steps: int = 6) -> bool:
    """x is a linear op's output, seen through layout ops, Casts and a rescale by a scalar (the
    dequantization of an integer MatMul): a shift of it is that op's bias, as tf2onnx's
    MatMul -> Reshape -> BiasAdd and the quantizers' MatMulInteger -> Cast -> Mul(scale) -> Add write."""
    for _ in range(steps):
        p = G.producer(x)
        if p is None:
            return False
        if p.op in LINEAR_OPS:
            return True
        if p.op in _RELABEL:
            x = p.inputs[0]
            continue
        if p.op == "Mul" and len(p.inputs) == 2:
            scalar = [t for t in p.inputs if getattr(t, "shape", None) is not None and all(d == 1 for d in t.shape)]
            rest = [t for t in p.inputs if not any(t is u for u in scalar)]
            if scalar and len(rest) == 1:
                x = rest[0]
                continue
        return False
    return False


def find_norms(graph: gs.Graph) -> list[NormSite]:
    sites = []
    ln_nodes = set()
    for m in find_layernorms(graph):
        ln_nodes.update(id(n) for n in m.nodes)
        sites.append(NormSite(m.kind, m.name, m.x.name, f"axes={m.axes} eps={m.epsilon:g}"))
    norm_outputs = set()  # what decomposed RMSNorms write: an affine on them is their γ/β
    for node in graph.nodes:
        if id(node) not in ln_nodes and _is_rms_decomposed(graph, node):
            out = _normalized_output(graph, node)
            if out is not None:
                norm_outputs.add(id(out))
    gamma = set()  # affine chains that are a norm's γ/β: not norms of their own
    for node in graph.nodes:
        if id(node) in ln_nodes:
            continue
        form = _affine_form(node)
        if form is not None:
            p = G.producer(form[0])
            if _gamma_of_a_norm(form[0], norm_outputs) or (p is not None and id(p) in gamma):
                gamma.add(id(node))
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
        elif _is_per_channel_affine(node, norm_outputs):
            p = G.producer(_affine_form(node)[0])
            if p is not None and _affine_form(p) is not None and id(p) not in ln_nodes:
                continue  # report a chain once, at its first op
            sites.append(NormSite("per-channel affine", node.name, node.inputs[0].name, node.op))
    return sites
