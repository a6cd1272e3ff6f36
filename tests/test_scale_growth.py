"""Linear work in nodes (issue 17), checked by counting, not timing: every pass's analysis and the
whole pipeline are run at two sizes, and the number of graph queries (producer, consumers,
constant lookups, graph-output checks, shape lookups) and of nodes shape inference visits must
grow about as the graph does. A search that re-walks a chain from each of its nodes, or a
refresh that re-infers everything after each change, grows with the square and fails here at
any machine speed."""

from __future__ import annotations

import collections

import pytest

from normopt import graph as G
from normopt import optimize_model
from normopt import shapes as S
from normopt.passes import all_passes
from normopt.pipeline import Context

from node_graphs import elementwise_chain, transformer_like

QUERIES = ("producer", "consumers", "const_value", "const_info", "is_graph_output", "is_read", "only_reader", "shape", "rank",
           "static_dim")
SMALL, LARGE = 1500, 6000  # 4x the nodes
SLACK = 1.6  # counts may grow by 4 x SLACK (a quadratic search grows 16x)


class _Counter:
    def __init__(self, monkeypatch):
        self.n = collections.Counter()
        for name in QUERIES:
            real = getattr(G, name)

            def counted(*a, _real=real, _name=name, **k):
                self.n[_name] += 1
                return _real(*a, **k)

            monkeypatch.setattr(G, name, counted)

    def take(self):
        out, self.n = self.n, collections.Counter()
        return out


BUILD = {"transformer": transformer_like, "chain": elementwise_chain}


def _per_pass_counts(build, n, counter):
    graph = G.to_graph(build(n))
    counter.take()
    ctx = Context(tune=False)
    out = {}
    with G.scope(graph):
        for p in all_passes():
            p.analyze(graph, ctx)
            out[p.name] = sum(counter.take().values())
    return len(graph.nodes), out


@pytest.mark.parametrize("kind", sorted(BUILD))
def test_every_analysis_asks_linearly_many_queries(kind, monkeypatch):
    counter = _Counter(monkeypatch)
    n1, small = _per_pass_counts(BUILD[kind], SMALL, counter)
    n2, large = _per_pass_counts(BUILD[kind], LARGE, counter)
    growth = n2 / n1
    for name in small:
        assert large[name] <= growth * SLACK * small[name] + 200, (name, small[name], large[name])


@pytest.mark.parametrize("kind", sorted(BUILD))
def test_the_pipeline_grows_linearly(kind, monkeypatch):
    """Import, every pass, the refreshes and the export: queries and shape-inferred nodes."""
    counter = _Counter(monkeypatch)
    inferred = []
    real_infer = S.infer

    def infer(graph, incremental=True):
        st = real_infer(graph, incremental)
        inferred.append(st.nodes_inferred)
        return st

    monkeypatch.setattr(S, "infer", infer)
    totals = []
    for n in (SMALL, LARGE):
        model = BUILD[kind](n)
        inferred.clear()
        counter.take()
        optimize_model(model)
        totals.append((len(model.graph.node), sum(counter.take().values()), max(inferred)))
    (n1, q1, i1), (n2, q2, i2) = totals
    growth = n2 / n1
    assert q2 <= growth * SLACK * q1 + 200, totals
    assert i2 <= growth * SLACK * i1 + 200, totals


def test_the_collector_never_rescans_the_graph():
    """Python's cyclic collector must never scan the imported graph or a pass's rollback mark
    (each holds several objects per node): the graph is frozen before the collector is back on
    after the import, and a pass's mark is freed before it comes back after the pass. Checked
    on a chain that ends in one Identity (so remove_identity rewrites, and takes a mark of every
    node): the objects any collection scans stay well under the number of nodes."""
    import gc

    from onnx import helper

    model = elementwise_chain(LARGE)
    last = model.graph.output[0].name
    model.graph.node.append(helper.make_node("Identity", [last], ["y"], name="id"))
    model.graph.output[0].name = "y"
    scanned = []

    def watch(phase, info):
        if phase == "start":
            scanned.append(sum(len(gc.get_objects(generation=g)) for g in range(info["generation"] + 1)))

    was = gc.isenabled()
    gc.enable()
    gc.collect()  # from a clean young generation (other tests leave theirs)
    gc.callbacks.append(watch)
    try:
        out, report = optimize_model(model)
    finally:
        gc.callbacks.remove(watch)
        if not was:
            gc.disable()
    assert any(p.name == "remove_identity" and p.applied for p in report.passes)  # a mark was taken
    assert max(scanned, default=0) < LARGE, (len(scanned), max(scanned, default=0), LARGE)


def test_the_export_sorts_only_a_graph_that_changed_since_its_refresh(monkeypatch):
    """Every pass that may change the structure ends with a refresh (cleanup + toposort), and a
    pass that keeps shapes never changes it: the export then skips a second cleanup and sort of
    the main graph (both idempotent), and writes the same bytes as with them."""
    model = transformer_like(SMALL)
    forced = optimize_model_bytes(model, monkeypatch, force_clean=True)
    calls = []
    real = G._clean_and_sort

    def counted(g):
        calls.append(g)
        return real(g)

    monkeypatch.setattr(G, "_clean_and_sort", counted)
    out, report = optimize_model(model)
    refreshes = sum(1 for p in report.passes if p.applied and not _pass(p.name).keeps_shapes)
    assert refreshes >= 1
    assert len(calls) == refreshes, (len(calls), refreshes)
    assert out.SerializeToString() == forced


def _pass(name):
    return next(p for p in all_passes() if p.name == name)


def optimize_model_bytes(model, monkeypatch, force_clean):
    real = G.to_model

    def to_model(graph, original, clean=False):
        return real(graph, original, clean=False if force_clean else clean)

    with monkeypatch.context() as m:
        m.setattr(G, "to_model", to_model)
        out, _ = optimize_model(model)
    return out.SerializeToString()


def test_passes_that_rewrite_nothing_share_the_structure_walks(monkeypatch):
    """The branches to run in and each graph's Scope depend on the structure only: found once
    for a run of passes that rewrite nothing (each was a walk of every node, per pass), found
    again after a pass that rewrites."""
    from normopt import pipeline as PL

    counts = collections.Counter()
    real_scope, real_subs = G.Scope, PL.subgraphs_to_run

    class CountedScope(real_scope):
        def __init__(self, *a, **k):
            counts["scope"] += 1
            super().__init__(*a, **k)

    def subs(root):
        counts["subgraphs"] += 1
        return real_subs(root)

    monkeypatch.setattr(G, "Scope", CountedScope)
    monkeypatch.setattr(PL, "subgraphs_to_run", subs)
    _, report = optimize_model(elementwise_chain(200))
    assert not any(p.applied for p in report.passes)
    assert counts == {"scope": 1, "subgraphs": 1}, counts
    counts.clear()
    _, report = optimize_model(transformer_like(SMALL))
    rewrote = sum(1 for p in report.passes if p.applied)
    assert rewrote >= 1 and counts["subgraphs"] <= rewrote + 1 and counts["scope"] <= 2 * rewrote + 1, (counts, rewrote)


# --- per-node constants (docs/scale-nodes.md): the same answer, asked once ----------------------


def test_the_affine_search_asks_a_shared_constant_once_per_shape(monkeypatch):
    """On a chain of scalar-constant ops (two shared scalars, one shape), the chain walk asks
    the per-channel question once per constant and data shape, not once per node; the affines
    found (none here: scalars only) are what the plain question gives."""
    from normopt.passes import fold_affine as FA

    graph = G.to_graph(elementwise_chain(400))
    calls = collections.Counter()
    real = FA._per_channel

    def counted(value, data):
        calls["n"] += 1
        return real(value, data)

    monkeypatch.setattr(FA, "_per_channel", counted)
    with G.scope(graph):
        found = FA.find_affines(graph, [])
    assert found == []
    assert calls["n"] <= 2  # "k" and "s", each met with the one shape [1, 4, 8]


def test_the_memoized_affine_search_finds_what_the_plain_one_finds():
    """Chains with per-channel constants of several widths and axes, and shared scalars, found
    with and without the memo: the same affines (nodes, axis, a, t)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from normopt.passes import fold_affine as FA

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.asarray(2.0, np.float32), "two"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "v8"),
             numpy_helper.from_array(rng.standard_normal((4, 1)).astype(np.float32), "tok"),
             numpy_helper.from_array(rng.standard_normal((1, 4, 1)).astype(np.float32), "v4")]
    nodes, x = [], "x"
    for i, (op, c) in enumerate([("Mul", "v8"), ("Add", "two"), ("Sub", "v8"), ("Relu", None), ("Mul", "tok"),
                                 ("Add", "v8"), ("Relu", None), ("Div", "v4"), ("Mul", "two"), ("Relu", None),
                                 ("Mul", "v8"), ("Mul", "v8")]):
        nodes.append(helper.make_node(op, [x] if c is None else [x, c], [f"y{i}"]))
        x = f"y{i}"
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 4, 8])], inits)
    graph = G.to_graph(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))

    def summary(found):
        return [(a.kind, [n.name for n in a.nodes], a.axis, a.a.tolist(), a.t.tolist()) for a in found]

    with G.scope(graph):
        memo = summary(FA.find_affines(graph, []))
        plain, walked, claimed = [], set(), set()
        for node in graph.nodes:
            if id(node) in walked or node.op not in FA.ELEMENTWISE:
                continue
            aff = FA._chain(graph, node, claimed, walked)  # the plain question at every node
            if aff is not None:
                plain.append(aff)
                claimed.update(id(n) for n in aff.nodes)
    assert memo == summary(plain) and len(memo) >= 3


def test_toposort_of_a_list_with_appended_nodes_gives_graphsurgeons_order():
    """A sorted list with some nodes moved to its end (behind their readers, as a pass appends
    new nodes): settled on the way where their producers are, walked depth-first where not;
    graphsurgeon's order, tie-breaks included."""
    import numpy as np

    for seed in range(4):
        a = G.to_graph(transformer_like(400, seed=seed))
        for i, n in enumerate(a.nodes):
            n.name = n.name or f"n{i}"
        rng = np.random.default_rng(seed)
        moved = set(rng.choice(len(a.nodes), size=len(a.nodes) // 10, replace=False).tolist())
        a.nodes = [n for i, n in enumerate(a.nodes) if i not in moved] + [a.nodes[i] for i in sorted(moved)]
        b = G.restore(G.snapshot(a))
        a.toposort()
        G.toposort(b)
        assert [n.name for n in a.nodes] == [n.name for n in b.nodes]


def test_the_layernorm_matcher_asks_the_form_of_the_furthest_value_first(monkeypatch):
    """Each decomposed LN of the stack is accepted at its furthest value (x - m) / s * g + b: the
    form test is asked of that value alone, not of every value evaluated before it."""
    from normopt import norms

    graph = G.to_graph(transformer_like(300))
    calls = collections.Counter()
    real = norms._ln_form

    def counted(poly):
        calls["n"] += 1
        return real(poly)

    monkeypatch.setattr(norms, "_ln_form", counted)
    with G.scope(graph):
        found = norms.find_layernorms(graph)
    decomposed = [m for m in found if m.kind == "decomposed LN"]
    assert len(decomposed) >= 5 and all(m.beta is not None and m.gamma is not None for m in decomposed)
    assert calls["n"] == len(decomposed)


def test_ln_to_rms_apply_maps_the_tensors_once(monkeypatch):
    """The rewrite's name lookup and its Namer share one tensor map of the graph; the names the
    Namer avoids are the same."""
    from normopt.passes.ln_to_rms import LayerNormToRMSNorm

    graph = G.to_graph(transformer_like(300))
    ctx = Context(tune=False)
    p = LayerNormToRMSNorm()
    calls = collections.Counter()
    real = G.tensor_map

    def counted(g):
        calls["n"] += 1
        return real(g)

    with G.scope(graph):
        a = p.analyze(graph, ctx)
        assert a.matches
        assert G.Namer(graph, real(graph)).used == G.Namer(graph).used
        monkeypatch.setattr(G, "tensor_map", counted)
        p.apply(graph, a.matches, ctx)
    assert calls["n"] == 1
