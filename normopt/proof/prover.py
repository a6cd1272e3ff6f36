"""The translation validator: node by node, from the graph inputs forward.

For every value of the OPTIMIZED graph the prover records relations (relations.Rel) to values
of the ORIGINAL graph. The base case: each graph input equals the original's input of the same
name and type. Each optimized node is then checked by one of the rules below, whose premises
are its inputs' relations, the op's semantics, and weight facts checked numerically in float64
at a tolerance tied to the weights' dtype. The goal: each graph output equals the original's
output at the same position. The first node no rule justifies is the answer "not proved".

Names are hints only: a node whose name matches an original node's is tried first, but every
correspondence is checked from structure and values, so a wrong hint can cost a proof, never
make a wrong model proved.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from .cancel import check as check_cancelled
from .graphs import GraphView, graph_attrs, infer_types, reduce_axes, row_blocks, same_bytes, tensor_value

SMALL_CONST = 1 << 20  # elements: larger constants are compared block by block
from .relations import COMP_KINDS, Rel, center, eps_of, simplify, tiny_of, tighten, vec

MAX_RELS = 6
W_TOL = 1.0  # weight facts: |actual - expected| <= W_TOL * eps * (|expected| + |pre-centering term|): one or two roundings
LAYOUT = {"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Slice", "Gather", "Concat", "Split", "Expand",
          "Cast", "ReduceMean", "Tile"}
SHAPE_ONLY = {"Shape", "Size"}  # a relation of kind "rel" keeps the shape, so these read it as equal
NORMS = {"SimplifiedLayerNormalization", "RMSNormalization", "LayerNormalization"}


class NotProved(Exception):
    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.where, self.reason = where, reason


@dataclass
class Stats:
    identical: int = 0
    centered_writers: int = 0
    centered_values: int = 0
    norms_converted: int = 0
    affine_folds: int = 0
    shifts_absorbed: int = 0
    layout: int = 0
    constants: int = 0
    subgraphs: int = 0
    nodes: int = 0
    weights_checked: int = 0
    notes: list = field(default_factory=list)

    def line(self) -> str:
        parts = []
        if self.norms_converted:
            parts.append(f"{self.norms_converted} norms read centered streams")
        if self.centered_writers:
            parts.append(f"{self.centered_writers} writers centered")
        if self.affine_folds:
            parts.append(f"{self.affine_folds} affines folded into weights")
        if self.shifts_absorbed:
            parts.append(f"{self.shifts_absorbed} biases/shifts absorbed")
        if self.layout:
            parts.append(f"{self.layout} layout ops carried relations")
        if self.subgraphs:
            parts.append(f"{self.subgraphs} subgraphs proved")
        parts.append(f"{self.identical:,} nodes identical")
        parts.append(f"{self.weights_checked:,} weight facts checked")
        return ", ".join(parts)


def _opsets(model):
    return {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.opset_import}


class Prover:
    def __init__(self, orig: onnx.ModelProto, opt: onnx.ModelProto):
        self.orig_model, self.opt_model = orig, opt
        self.stats = Stats()

    # ================================================================== entry
    def run(self):
        o_types, p_types = infer_types(self.orig_model), infer_types(self.opt_model)
        self.O = GraphView(self.orig_model.graph, _opsets(self.orig_model), types=o_types, forms=True,
                           ir_version=int(self.orig_model.ir_version or 0) or None)
        self.P = GraphView(self.opt_model.graph, _opsets(self.opt_model), types=p_types,
                           ir_version=int(self.opt_model.ir_version or 0) or None,
                           input_shapes={n: self.O.tracker.shape.get(n) for n in self.O.inputs if n not in self.O.inits})
        self._interface(self.O, self.P)
        rels = {}
        for name in self.P.inputs:
            rels[name] = [Rel(name)]
        self.prove_graph(self.O, self.P, rels)
        return self.stats

    def _interface(self, O, P):
        oi = [(n, O.type_of(n)) for n in O.inputs if n not in O.inits]
        pi = [(n, P.type_of(n)) for n in P.inputs if n not in P.inits]
        if [n for n, _ in oi] != [n for n, _ in pi]:
            raise NotProved("graph inputs", f"the inputs differ: {[n for n, _ in oi]} vs {[n for n, _ in pi]}")
        for (n, a), (_, b) in zip(oi, pi):
            if a and b and (a[0] != b[0] or (a[1] is not None and b[1] is not None and len(a[1]) != len(b[1]))):
                raise NotProved(f"input '{n}'", "its type or rank differs from the original's")
        if len(O.outputs) != len(P.outputs):
            raise NotProved("graph outputs", f"{len(P.outputs)} outputs where the original has {len(O.outputs)}")
        for n in O.overridable | P.overridable:
            if (n in O.overridable) != (n in P.overridable):
                raise NotProved(f"initializer '{n}'", "overridable (a graph input) in one model only")
            # a caller who does not feed it gets the default: the defaults are part of the function
            to, tp = next(t for t in O.graph.initializer if t.name == n), next(t for t in P.graph.initializer if t.name == n)
            if to.data_type != tp.data_type or list(to.dims) != list(tp.dims) or not _close(tensor_value(tp), tensor_value(to)):
                raise NotProved(f"initializer '{n}'", "its default (it is also a graph input) differs from the original's")

    def prove_graph(self, O: GraphView, P: GraphView, rels: dict):
        saved, self._outer = self._outer, rels
        try:
            self._prove_graph(O, P, rels)
        finally:
            self._outer = saved

    def _prove_graph(self, O: GraphView, P: GraphView, rels: dict):
        for name in P.overridable:
            rels[name] = [Rel(name)]
        for node in P.nodes:
            check_cancelled()
            self.stats.nodes += 1
            if all(self._is_pconst(P, i) for i in node.input if i) and not graph_attrs(node) and node.op_type != "Constant" \
                    and all(P.is_const(o) for o in node.output if o):
                self.stats.constants += 1
                continue  # a constant subexpression: its values are what readers compare
            if node.op_type == "Constant":
                continue
            outs = self.prove_node(O, P, node, rels)
            for o, rs in zip(node.output, outs):
                if o:
                    rels[o] = tighten(rs)[:MAX_RELS]
        for k, (po, oo) in enumerate(zip(P.outputs, O.outputs)):
            if po != oo:
                raise NotProved(f"output {k} '{po}'", f"named differently from the original's output '{oo}'")
            if P.is_const(po) and not self._rel_of_const(O, P, po, oo):
                raise NotProved(f"output '{po}'", "a constant that differs from the original's output")
            if P.is_const(po):
                continue
            ok = self._eq_to(O, rels.get(po, []), oo)
            if not ok:
                got = rels.get(po) or []
                why = got[0].describe() if got else "no relation"
                raise NotProved(f"output '{po}'", f"not shown equal to the original's output (it is {why})")

    def _read(self, P, name):
        return bool(P.consumers.get(name)) or name in P.outputs

    def _is_pconst(self, P, name):
        return P.is_const(name)

    # ================================================================== helpers
    def fam(self, O, u):
        """u's family: values of the original holding u's elements in u's layout up to a
        per-channel affine (the original's own BatchNorm, scale, shift, Identity, layout pairs)."""
        return O.members(u)

    def rebase(self, O, r: Rel, w: str):
        """r (on u) restated on w, a member of u's family; None if it cannot be."""
        if r.u == w:
            return r
        if r.kind not in ("rel", "comp") or r.full_t or (r.kind == "comp" and r.axis is None):
            return None
        # forms of u and w on one base, with one layout key (an anchor has a second form, on the
        # base it was re-based from)
        for fu in O.forms(r.u):
            ku = O.layout_key(r.u, fu)
            if ku is None:
                continue
            for fw in O.forms(w):
                if fw.base == fu.base and O.layout_key(w, fw) == ku:
                    rr = self._rebase_on(O, r, w, fu, fw)
                    if rr is not None:
                        return rr
        return None

    def _rebase_on(self, O, r: Rel, w: str, fu, fw):
        """r restated on w, given u's and w's forms fu and fw on one base, under one layout key."""
        axes = set()
        if r.axis is not None:
            axes.add(r.axis)
        for name, f in ((r.u, fu), (w, fw)):
            if f.axis is not None and (np.ndim(f.a) or np.ndim(f.t)):
                ax = O.axis_in(name, f.axis, f)
                if ax is None:
                    return None
                axes.add(ax)
        if len(axes) > 1:
            return None
        axis = axes.pop() if axes else None
        shp = O.shape(w)
        d = shp[axis] if axis is not None and shp else None
        if axis is not None and not isinstance(d, int):
            return None
        # v' = P(a u) + t, u = ua b + ut, w = wa b + wt  =>  u = (ua/wa) w + ut - ua wt / wa
        a = np.asarray(1.0 if r.a is None else r.a, np.float64)
        t = np.asarray(0.0 if r.t is None else r.t, np.float64)
        ua, ut = np.asarray(fu.a, np.float64), np.asarray(fu.t, np.float64)
        wa, wt = np.asarray(fw.a, np.float64), np.asarray(fw.t, np.float64)
        if np.any(wa == 0):
            return None
        na = a * ua / wa
        shift = a * ut - a * ua * wt / wa  # inside P
        if r.centered:
            shift = shift - (shift.mean() if shift.ndim else shift)
        nt = t + shift
        eps = eps_of(O.elem(w))
        err = np.asarray(r.err, np.float64)  # the original's forms are exact: restating adds no rounding
        if axis is None:
            if r.kind != "rel":
                return None
            if not np.isclose(float(na), 1.0, rtol=4 * eps, atol=0):
                return None
            if float(nt) != 0.0 and not r.centered:
                return None
            return Rel(w, None, False, how=r.how) if not r.centered else None
        out = Rel(w, axis, r.centered, vec(na, d), vec(nt, d), vec(err, d) if np.ndim(err) else err, kind=r.kind, how=r.how)
        return simplify(out, eps)

    def _eq_to(self, O, rs, w: str) -> bool:
        """Is one of the relations rs, restated on w, "equal to w"? All are restated and
        tightened together first, so an equality that holds only within a looser bound than
        another relation's tight, nonzero shift does not count."""
        return any(u == w and rr.eq for u, rr in self._rels_on(O, rs))

    def _rels_on(self, O, rs, keep=None):
        """(w, rel on w) for every family member w of every relation's value."""
        out = []
        for r in rs:
            for w in self.fam(O, r.u):
                rr = self.rebase(O, r, w)
                if rr is not None:
                    out.append(rr)
        # relations reached along several paths (a relation, and another rebased onto the same
        # family member) bound the same difference: their intersection, never the loosest. The
        # filter comes after: an "equal" kept alone would escape a tight shift that refutes it
        return [(r.u, r) for r in tighten(out) if keep is None or keep(r)]

    def _rel_of_const(self, O, P, pname, oname) -> bool:
        a, b = P.const(pname), O.const(oname)
        return a is not None and b is not None and _close(a, b)

    def _const_input_ok(self, O, P, pname, oname) -> bool:
        if not pname and not oname:
            return True
        if not pname or not oname:
            return False
        if not O.is_const(oname):
            return False
        self.stats.weights_checked += 1
        if same_bytes(P, pname, O, oname):
            return True
        # a constant the original stores is read unchanged: equal values exactly (any encoding);
        # only a constant the original computes (folded by the optimizer, evaluated here) may
        # differ by its evaluation's rounding
        same = _equal if P.is_stored(pname) else _close
        if P.const_size(pname) > SMALL_CONST and P.const_size(pname) == O.const_size(oname):
            # a large constant: value by value, block by block
            pa, oa = row_blocks(P, pname), row_blocks(O, oname)
            for (_, x), (_, y) in zip(pa, oa):
                if not same(x, y):
                    return False
            return P.shape(pname) == O.shape(oname) if P.shape(pname) and O.shape(oname) else True
        a, b = P.const(pname), O.const(oname)
        if a is None or b is None:
            return False
        return same(a, b)

    # ================================================================== nodes
    def prove_node(self, O, P, node, rels):
        ins = list(node.input)
        in_rels = []
        for i in ins:
            if not i:
                in_rels.append(None)
            elif P.is_const(i):
                in_rels.append("const")
            elif i in rels:
                in_rels.append(rels[i])
            else:
                raise NotProved(_where(node), f"reads '{i}', which has no proved relation")
        # 1. identical to an original node (all non-constant inputs equal)
        got = self._identical(O, P, node, in_rels)
        if got is not None:
            self.stats.identical += 1
            if node.op_type == "Sub" and RULES.get("Sub") is not None:
                # x - mean(x) identical to the original's is also x centered: keep both relations
                try:
                    more = RULES["Sub"](self, O, P, node, in_rels)
                except (_Skip, NotProved):
                    more = None
                if more and isinstance(more[0], Rel):
                    got = [got[0] + [r for r in more if r not in got[0]]] + got[1:]
            return got
        # 2. a rule for the op
        rule = RULES.get(node.op_type)
        reasons = []
        rules = [rule] if rule is not None else []
        if any(isinstance(r, list) and any(q.kind in COMP_KINDS for q in r) for r in in_rels):
            rules.insert(0, rule_comp)  # a compressed (CRMSNorm) stream: its own rules first
        if node.op_type in STAT_OPS and any(isinstance(r, list) and any(q.kind == "stat" or q.pure_center or q.eq for q in r)
                                            for r in in_rels):
            rules.append(rule_stat)
        for rule_fn in rules:
            if not (node.domain in ("", "ai.onnx") or node.op_type in ("SkipSimplifiedLayerNormalization", "SkipLayerNormalization")):
                break
            try:
                got = rule_fn(self, O, P, node, in_rels)
            except NotProved:
                raise
            except _Skip as exc:
                reasons.append(str(exc))
                got = None
            if got is not None:
                if got and isinstance(got[0], Rel):
                    got = [got] + [[] for _ in node.output[1:]]
                for o, rs in zip(node.output[1:], got[1:]):
                    if o and not rs and self._read(P, o):
                        raise NotProved(_where(node), f"output '{o}' is read but has no proved relation")
                return got
        rule = rules[0] if rules else None
        if node.op_type in LAYOUT and node.domain in ("", "ai.onnx"):
            try:
                got = self._layout(O, P, node, in_rels)
            except _Skip as exc:
                reasons.append(str(exc))
                got = None
            if got is not None:
                self.stats.layout += 1
                return got
        what = "; ".join(dict.fromkeys(r for r in reasons if r))
        shown = [_show(r) for r in in_rels if r not in (None, "const")]
        if rule is None and node.op_type not in LAYOUT:
            raise NotProved(_where(node), f"no proof rule for {node.op_type} reading {', '.join(shown) or 'constants'}"
                            + (f" ({what})" if what else ""))
        raise NotProved(_where(node), what or f"no original node computes this {node.op_type} of {', '.join(shown)}")

    # ---------------------------------------------------------------- identical
    def _nan_absorbs(self, P, node, in_rels) -> bool:
        """x + c, x - c, x * c, x / c with c a constant that is NaN everywhere is NaN everywhere,
        whatever x: a relation that keeps x's shape is enough (the original's constant is
        compared as NaN too)."""
        if node.op_type not in ("Add", "Sub", "Mul", "Div") or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            return False
        for i, r in zip(node.input, in_rels):
            if r == "const":
                c = P.const(i) if P.const_size(i) <= SMALL_CONST else None
                if c is not None and np.asarray(c).dtype.kind == "f" and np.asarray(c).size and np.all(np.isnan(c)):
                    return True
        return False

    def _candidates(self, O, node, slot_values):
        """Original nodes with node's op that read, at some slot, one of the given values; the
        node of the same name first (a hint)."""
        seen, out = set(), []
        named = [n for n in O.nodes if False]
        for w, slot in slot_values:
            for (n, k) in O.consumers.get(w, ()):
                if n.op_type == node.op_type and (k == slot or slot is None) and id(n) not in seen:
                    seen.add(id(n))
                    out.append(n)
        out.sort(key=lambda n: n.name != node.name)
        del named
        return out

    def _identical(self, O, P, node, in_rels):
        eq_slots = []
        same = (lambda x: x.kind == "rel") if node.op_type in SHAPE_ONLY or self._nan_absorbs(P, node, in_rels) \
            else (lambda x: x.eq)
        for k, (i, r) in enumerate(zip(node.input, in_rels)):
            if r is None or r == "const":
                continue
            ws = [w for w, rr in self._rels_on(O, r, keep=same)]
            if not ws:
                return None
            eq_slots.append((k, ws))
        if not eq_slots:
            cands = [n for n in O.by_name.get(node.name, ()) if n.op_type == node.op_type]
        else:
            k0, ws0 = eq_slots[0]
            cands = self._candidates(O, node, [(w, k0) for w in ws0])
        for cand in cands:
            if (cand.domain or "") not in ((node.domain or ""), "ai.onnx" if not node.domain else node.domain):
                if not ((cand.domain in ("", "ai.onnx")) and (node.domain in ("", "ai.onnx"))):
                    continue
            oattrs, oslots = canonical_signature(O, cand)
            pattrs, pslots = canonical_signature(P, node, like=(O, cand))
            if oattrs != pattrs or len(oslots) != len(pslots):
                continue
            if any(o and (k >= len(cand.output) or not cand.output[k]) for k, o in enumerate(node.output)):
                continue
            ok = True
            for k, (i, r) in enumerate(zip(node.input, in_rels)):
                if k not in pslots:
                    continue  # an operand the signature already holds (axes moved from attribute to input)
                oi = cand.input[k] if k < len(cand.input) else ""
                if r is None:
                    ok = not oi
                elif r == "const":
                    ok = self._const_input_ok(O, P, i, oi)
                else:
                    ok = any(w == oi for w, _ in self._rels_on(O, r, keep=same))
                if not ok and k == 1 and self._same_target_shape(O, P, node, cand):
                    ok = True
                if not ok:
                    break
            if not ok:
                continue
            subs_p, subs_o = graph_attrs(node), graph_attrs(cand)
            if subs_p or subs_o:
                if set(subs_p) != set(subs_o):
                    continue
                self._prove_subgraphs(O, P, node, cand, subs_p, subs_o)
            return [[Rel(cand.output[k], how="identical")] if o else [] for k, o in enumerate(node.output)]
        return None

    def _prove_subgraphs(self, O, P, node, cand, subs_p, subs_o):
        for name in subs_p:
            for gp, go in zip(subs_p[name], subs_o[name]):
                if len(gp.input) != len(go.input) or len(gp.output) != len(go.output):
                    raise NotProved(_where(node), f"body '{name}' has a different signature")
                Ov = GraphView(go, O.opsets, parent=O, types=O.types, forms=True)
                Pv = GraphView(gp, P.opsets, parent=P, types=P.types)
                inner = dict(self._outer)
                for a, b in zip(gp.input, go.input):
                    if a.name != b.name:
                        raise NotProved(_where(node), f"body '{name}' input '{a.name}' is named '{b.name}' in the original")
                    inner[a.name] = [Rel(b.name)]
                self.prove_graph(Ov, Pv, inner)
                self.stats.subgraphs += 1

    _outer: dict = {}

    # ---------------------------------------------------------------- layout / commuting ops
    def _layout(self, O, P, node, in_rels):
        """Ops that move elements along other axes (or cast exactly) carry a per-channel
        relation when the original has the same op on the related value."""
        op = node.op_type
        data_slots = [0] if op not in ("Concat",) else list(range(len(node.input)))
        r0 = in_rels[0]
        if r0 in (None, "const"):
            if op != "Concat":
                raise _Skip(f"{op} of a constant")
        # a non-constant data input names the candidates: the first one, and for a Concat each of
        # its first few (a zero cls token is "equal", the patches beside it "centered": the
        # relation to carry is the patches')
        ks = [k for k in data_slots if in_rels[k] not in (None, "const")]
        found = None
        for w, rr, k0 in ((w, rr, k0) for k0 in (ks[:8] if op == "Concat" else ks[:1]) for w, rr in self._rels_on(O, in_rels[k0])):
            if rr.kind not in ("rel", "comp"):  # a compressed value commutes with ops over other axes too
                continue
            # the original node of the same name first (a hint); every original node of the op
            # reading the related value counts: two original Casts of one value are two values a
            # reader may relate to (a norm of the second one, say)
            cands = sorted(O.consumers.get(w, ()), key=lambda cs: cs[0].name != node.name)
            for cand, slot in cands:
                if cand.op_type != op or slot != k0:
                    continue
                oattrs, oslots = canonical_signature(O, cand)
                pattrs, pslots = canonical_signature(P, node, like=(O, cand))
                if oattrs != pattrs or len(oslots) != len(pslots):
                    continue
                res = self._layout_with(O, P, node, cand, in_rels, rr, data_slots, pslots)
                if res is not None:
                    found = res if found is None else [a + [r for r in b if r.u not in {x.u for x in a}][:MAX_RELS - len(a)]
                                                       for a, b in zip(found, res)]
        if found is not None:
            return found
        raise _Skip(f"no original {op} reads the related value with the same attributes")

    def _layout_with(self, O, P, node, cand, in_rels, rr: Rel, data_slots, pslots):
        op = node.op_type
        if rr.full_t:
            return None
        x = cand.input[0 if op != "Concat" else data_slots[0]]
        err = rr.err  # a Concat's pieces: the largest of their bounds
        for k, (i, r) in enumerate(zip(node.input, in_rels)):
            if k not in pslots:
                continue
            oi = cand.input[k] if k < len(cand.input) else ""
            if k in data_slots:
                if r in (None, "const"):
                    if r is None or not O.is_const(oi):
                        return None
                    continue  # a constant data input of Concat: checked against the relation below
                rk = next((q for w, q in self._rels_on(O, r) if w == oi), None)
                if rk is not None and rk.eq and rr.pure_center and O.is_zero_mean(oi, rr.axis):
                    err = _max_err(err, rk.err)
                    continue  # equal to a zero-mean original value (a zero cls token): centered too
                if rk is None or not _same_form(rk, rr):
                    return None
                err = _max_err(err, rk.err)
            else:
                if r is None:
                    if oi:
                        return None
                elif k == 1 and self._same_target_shape(O, P, node, cand, rr):
                    continue
                elif r == "const":
                    if not self._const_input_ok(O, P, i, oi):
                        return None
                elif not any(w == oi and q.eq for w, q in self._rels_on(O, r)):
                    return None
        y = cand.output[0]
        rin, rout = O.rank(cand.input[0] if op != "Concat" else x), O.rank(y)
        if rr.axis is None:
            axis_out = None
        else:
            if rin is None or rout is None:
                return None
            axis_out = self._map_axis(O, cand, rr.axis, rin, rout)
            if axis_out is None:
                return None
        if op == "Cast":
            src, dst = O.elem(cand.input[0]), O.attrs(cand).get("to")
            if not _exact_widening(src, dst):
                raise _Skip(f"Cast from {src} to {dst} rounds: it does not commute with a centering or shift")
        if op == "Concat":
            for k in data_slots:
                if in_rels[k] == "const":
                    if not self._const_related(O, P, node.input[k], cand.input[k], rr, O.rank(cand.input[k])):
                        raise _Skip(f"constant '{node.input[k]}' is not the original's '{cand.input[k]}' under the same relation")
        if axis_out is not None:  # the channel axis keeps its length (no broadcast along it)
            so, si = O.shape(y), O.shape(x)
            if so is None or si is None or so[axis_out] != si[rr.axis] or not isinstance(so[axis_out], int):
                return None
        if err is None:
            return None
        res = Rel(y, axis_out, rr.centered, rr.a, rr.t, err, rr.kind, how=op)
        outs = [[res]]
        for k in range(1, len(node.output)):
            if node.output[k]:
                if op != "Split" or k >= len(cand.output):
                    return None
                outs.append([Rel(cand.output[k], axis_out, rr.centered, rr.a, rr.t, rr.err, rr.kind, how=op)])
        return outs

    def _same_target_shape(self, O, P, node, cand, rr=None) -> bool:
        """A Reshape's or Expand's shape operand matters only through the output shape it
        gives: two of them (the data input related by the caller) agree when both output shapes
        are known and equal as polynomials of the graph inputs' dims, for every size. For a
        compressed relation the optimized shape has d-1 where the original's has d, at the
        channel axis (mapped through the op) and only there."""
        if node.op_type not in ("Reshape", "Expand") or cand.op_type != node.op_type:
            return False
        a = P.tracker.S(node.output[0])
        b = O.tracker.S(cand.output[0])
        comp_at = None
        if rr is not None and rr.kind == "comp":
            rin, rout = O.rank(cand.input[0]), O.rank(cand.output[0])
            comp_at = self._map_axis(O, cand, rr.axis, rin, rout) if rin is not None and rout is not None else None
            if comp_at is None:
                return False
        if a is None or b is None or len(a) != len(b) or any(d is None for d in a) or any(d is None for d in b):
            return comp_at is not None and self._comp_shape_operand(O, P, node, cand, comp_at, rr)
        for k, (x, y) in enumerate(zip(a, b)):
            if k == comp_at:
                if not (isinstance(x, int) and isinstance(y, int) and not isinstance(x, bool) and x == y - 1):
                    return False
            elif not (x == y and isinstance(x, bool) == isinstance(y, bool)):
                return False
        return True

    def _comp_shape_operand(self, O, P, node, cand, comp_at, rr) -> bool:
        """Shape operands (constants) of a Reshape / Expand on a compressed value: the same
        vector but d-1 for the original's d at the channel's position (right-aligned for
        Expand); -1 and 0 elsewhere then mean the same in both graphs."""
        if len(node.input) < 2 or len(cand.input) < 2:
            return False
        sp, so = P.const(node.input[1]), O.const(cand.input[1])
        if sp is None or so is None:
            return False
        sp, so = [int(x) for x in np.asarray(sp).reshape(-1)], [int(x) for x in np.asarray(so).reshape(-1)]
        rout = O.rank(cand.output[0])
        shp = O.shape(cand.input[0])
        d = shp[rr.axis] if shp is not None else None
        if len(sp) != len(so) or rout is None or not isinstance(d, int) or d < 2:
            return False
        k = comp_at if node.op_type == "Reshape" else comp_at - (rout - len(so))
        if not 0 <= k < len(so):
            return False
        if node.op_type == "Reshape" and rr.axis != k and rr.axis < len(so) and 0 in (so[rr.axis], sp[rr.axis]) \
                and not O.attrs(cand).get("allowzero", 0):
            return False  # a 0 there would copy the channel dim (d in one graph, d-1 in the other)
        if node.op_type == "Expand" and so[k] == 1 and sp[k] == 1:
            return sp == so
        return so[k] == d and sp[k] == d - 1 and all(x == y for i, (x, y) in enumerate(zip(sp, so)) if i != k)

    def _const_related(self, O, P, pname, oname, rr: Rel, rank):
        """Constant pname of the optimized graph relates to the original's constant oname as rr does."""
        c, c0 = P.const(pname), O.const(oname)
        comp = rr.kind == "comp"
        if c is None or c0 is None or (c.shape != c0.shape and not comp):
            return False
        if comp:  # C(P(a c0) + t): zero-mean only when centered (t is then zero-mean too)
            if not rr.centered or np.ndim(c0) != rank or np.ndim(c) != rank:
                return False
            want = list(np.shape(c0))
            want[rr.axis] -= 1
            if list(np.shape(c)) != want:
                return False
        c0 = np.asarray(c0, np.float64)
        exp = c0
        if rr.a is not None:
            exp = exp * _bcast(rr.a, rr.axis, rank)
        if rr.centered:
            exp = center(exp, rr.axis)
        if rr.t is not None:
            exp = exp + _bcast(rr.t, rr.axis, rank)
        scale = np.abs(c0)
        if comp:
            keep = list(range(c0.shape[rr.axis] - 1))
            exp, scale = np.take(exp, keep, axis=rr.axis), np.take(scale, keep, axis=rr.axis)
        self.stats.weights_checked += 1
        return _weights_close(np.asarray(c, np.float64), exp, eps_of(P.elem(pname)), scale, tiny_of(P.elem(pname)))

    def _map_axis(self, O, node, axis, rin, rout):
        op = node.op_type
        a = O.attrs(node)
        if op in ("Identity", "Cast", "Concat", "Split", "Slice", "Tile", "Expand"):
            if op in ("Concat", "Split") and int(a.get("axis", 0)) % rin == axis:
                return None
            if op == "Slice":
                axes = self._slice_axes(O, node, rin)
                if axes is None or axis in axes:
                    return None
            if op == "Tile":
                reps = O.const(node.input[1])
                if reps is None or int(np.asarray(reps).reshape(-1)[axis]) != 1:
                    return None
            if op == "Expand":
                return axis + (rout - rin)
            return axis
        if op == "Transpose":
            perm = list(a.get("perm") or reversed(range(rin)))
            return perm.index(axis)
        if op == "Gather":
            g = int(a.get("axis", 0)) % rin
            if g == axis:
                return None
            ri = O.rank(node.input[1])
            if ri is None:
                return None
            return axis if axis < g else axis - 1 + ri
        if op in ("Squeeze", "Unsqueeze"):
            axes = a.get("axes")
            if len(node.input) > 1 and node.input[1]:
                v = O.const(node.input[1])
                axes = None if v is None else tuple(int(i) for i in np.asarray(v).reshape(-1))
            if op == "Squeeze":
                if axes is None:
                    s = O.shape(node.input[0])
                    if s is None:
                        return None
                    axes = [i for i, d in enumerate(s) if d == 1]
                axes = sorted(int(i) % rin for i in axes)
                if axis in axes:
                    return None
                return axis - sum(1 for i in axes if i < axis)
            if axes is None:
                return None
            axes = sorted(int(i) % rout for i in axes)
            pos = [i for i in range(rout) if i not in axes]
            return pos[axis]
        if op in ("Reshape", "Flatten"):
            si, so = O.shape(node.input[0]), O.shape(node.output[0])
            if si is None or so is None:
                return None
            d = si[axis]
            tail = si[axis + 1:]
            if not isinstance(d, int) or any(not isinstance(t, int) for t in tail):
                return None
            need = int(np.prod(tail)) if tail else 1
            for j in range(len(so) - 1, -1, -1):
                t2 = so[j + 1:]
                if any(not isinstance(t, int) for t in t2):
                    break
                if so[j] == d and (int(np.prod(t2)) if t2 else 1) == need:
                    return j
            return None
        if op == "ReduceMean":
            axes = reduce_axes(O, node)
            if axes is None or axis in axes:
                return None
            if a.get("keepdims", 1):
                return axis
            return axis - sum(1 for i in axes if i < axis)
        return None

    def _slice_axes(self, O, node, r):
        if len(node.input) > 3 and node.input[3]:
            v = O.const(node.input[3])
            return None if v is None else {int(i) % r for i in np.asarray(v).reshape(-1)}
        if len(node.input) >= 3:
            v = O.const(node.input[1])
            return None if v is None else set(range(len(np.asarray(v).reshape(-1))))
        axes = O.attrs(node).get("axes")
        return {int(i) % r for i in axes} if axes else None


class _Skip(Exception):
    pass


AXES_INPUT = {  # op: (the slot holding axes / split sizes from some opset on, the attribute it replaced)
    "Squeeze": (1, "axes"), "Unsqueeze": (1, "axes"), "ReduceSum": (1, "axes"), "ReduceMean": (1, "axes"),
    "ReduceMax": (1, "axes"), "ReduceMin": (1, "axes"), "ReduceProd": (1, "axes"), "ReduceL2": (1, "axes"),
    "ReduceSumSquare": (1, "axes"), "ReduceLogSumExp": (1, "axes"), "Split": (1, "split"),
}
COERCED_2D = {"Softmax", "LogSoftmax", "Hardmax"}  # before opset 13 they flatten at `axis` to 2-D


def canonical_signature(view, node, like=None):
    """(attributes with defaults, the input slots compared as data) of a node, the same for one
    computation across the opsets ONNX's version converter moves between: axes or split sizes as
    an attribute or as a constant input; Softmax over the last axis whether coerced to 2-D
    (opset < 13) or not. Slots dropped from the comparison are folded into the attributes.
    like=(view, node) of the original's counterpart gives the ranks (an optimized graph may
    hold values ONNX's inference cannot shape)."""
    attrs = view.attrs(node)
    rv, rn = like if like is not None else (view, node)
    slots = [k for k, i in enumerate(node.input) if i]
    dom = "" if node.domain in ("", "ai.onnx") else node.domain
    if dom:
        return attrs, slots
    op = node.op_type
    if op in AXES_INPUT:
        slot, key = AXES_INPUT[op]
        if len(node.input) > slot and node.input[slot]:
            v = view.const(node.input[slot])
            if v is not None:
                attrs = dict(attrs)
                attrs[key] = tuple(int(x) for x in np.asarray(v).reshape(-1))
                slots = [k for k in slots if k != slot]
        if key in attrs and key == "axes" and attrs[key] is not None:
            r = rv.rank(rn.output[0] if op == "Unsqueeze" else rn.input[0])
            if r is not None:
                attrs = dict(attrs)
                attrs[key] = tuple(sorted(int(a) % r for a in attrs[key]))
    if op in COERCED_2D:
        r = rv.rank(rn.input[0])
        axis = attrs.get("axis", -1 if view.opset() >= 13 else 1)
        attrs = dict(attrs)
        if r is not None:
            axis = int(axis) % r
            attrs["axis"] = axis if (view.opset() >= 13 or axis == r - 1) else ("coerced", axis)
    return attrs, slots


# ====================================================================== numeric helpers


def _equal(a, b) -> bool:
    """The same values, exactly (NaNs where the other has NaNs)."""
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))


def _close(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return False
    if a.dtype != b.dtype:
        return False
    if a.dtype.kind in "biu" or a.dtype.kind in "OSU":
        return bool(np.array_equal(a, b))
    if np.array_equal(a, b):
        return True
    eps = float(np.finfo(a.dtype).eps) if a.dtype.kind == "f" else 1e-7
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    same_inf = (np.isinf(a64) & (a64 == b64)) | (np.isnan(a64) & np.isnan(b64))
    diff = np.where(same_inf, 0.0, np.abs(a64 - b64))
    tiny = float(np.finfo(a.dtype).smallest_subnormal) if a.dtype.kind == "f" else 0.0
    scale = np.where(same_inf, 0.0, np.abs(b64))
    return bool(np.all(diff <= 4 * eps * scale + 2 * tiny + 1e-300) and not np.any(np.isnan(a64) != np.isnan(b64)))


def _weights_close(actual, expected, eps, scale=None, tiny=0.0) -> bool:
    actual = np.asarray(actual, np.float64)
    bound = W_TOL * eps * np.abs(expected)
    if scale is not None:
        bound = bound + W_TOL * eps * np.asarray(scale, np.float64)
    bound = bound + 1e-3 * eps * (float(np.max(np.abs(expected))) if expected.size else 0.0) + 2 * tiny
    return bool(np.all(np.abs(actual - expected) <= bound))


def _bcast(v, axis, rank):
    v = np.asarray(v, np.float64)
    if v.ndim == 0:
        return v
    shape = [1] * rank
    shape[axis] = v.size
    return v.reshape(shape)


def _max_err(e1, e2):
    """The larger of two bounds (scalars or per-channel vectors of one length); None when they
    do not combine."""
    if e1 is None or e2 is None:
        return None
    a, b = np.asarray(e1, np.float64), np.asarray(e2, np.float64)
    if a.ndim == 0 and b.ndim == 0:
        return float(max(a, b))
    try:
        return np.maximum(a, b)
    except ValueError:
        return None


def _same_form(r1: Rel, r2: Rel) -> bool:
    if r1.kind != r2.kind or r1.centered != r2.centered or r1.axis != r2.axis:
        return False
    for x, y in ((r1.a, r2.a), (r1.t, r2.t)):
        if (x is None) != (y is None):
            return False
        if x is not None and not np.allclose(x, y, rtol=1e-6, atol=1e-6 * (np.max(np.abs(y)) + 1e-30)):
            return False
    return True


def _trailing_empty(a, b):
    n = max(len(a), len(b))
    a, b = list(a) + [""] * (n - len(a)), list(b) + [""] * (n - len(b))
    return all((x == "") == (y == "") for x, y in zip(a, b))


def _exact_widening(src, dst) -> bool:
    T = onnx.TensorProto
    if src == dst:
        return True
    widen = {(T.FLOAT16, T.FLOAT), (T.FLOAT16, T.DOUBLE), (T.FLOAT, T.DOUBLE), (T.BFLOAT16, T.FLOAT), (T.BFLOAT16, T.DOUBLE)}
    return (src, dst) in widen


def _where(node) -> str:
    return f"{node.op_type} '{node.name}'" if node.name else f"{node.op_type} writing '{node.output[0]}'"


def _show(rs) -> str:
    return rs[0].describe() if rs else "?"


from .rules import RULES, STAT_OPS, rule_stat  # noqa: E402  (the rules use the helpers above)


def rule_comp(prover, O, P, node, in_rels):
    """The compressed-stream (CRMSNorm) rules (imported on first use: they build on the rules)."""
    from .compressed import rule_comp as rule

    return rule(prover, O, P, node, in_rels)
