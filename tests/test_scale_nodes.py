"""Scale with the number of nodes (issue 17): every analysis visits each node a bounded number of
times, with no recursion depth tied to the graph's depth. These tests build long graphs and check
that the passes complete, under a recursion limit far below the graph's depth; they assert no
timings (benchmarks/bench_nodes.py measures). The 100k-node runs are marked slow."""

from __future__ import annotations

import sys

import pytest

from normopt import graph as G
from normopt import optimize_model
from normopt.passes import all_passes
from normopt.pipeline import Context

from node_graphs import elementwise_chain, transformer_like

LOW_LIMIT = 400  # far below the depth of the graphs below (an analysis that recurses per node fails)


def _analyze_all(model):
    """Every pass's analysis on the graph, with a low recursion limit."""
    graph = G.to_graph(model)
    ctx = Context(tune=False)
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(LOW_LIMIT)
    try:
        out = {}
        with G.scope(graph):
            for p in all_passes():
                a = p.analyze(graph, ctx)
                out[p.name] = a
    finally:
        sys.setrecursionlimit(old)
    return out


@pytest.mark.parametrize("ln_at_end", [False, True], ids=["chain", "chain-then-LN"])
def test_long_elementwise_chain_analyses_without_recursion(ln_at_end):
    res = _analyze_all(elementwise_chain(5000, ln_at_end=ln_at_end))
    assert not res["fold_affine"].matches  # scalars only: not a norm
    if ln_at_end:  # the stream runs back to the graph input: one explicit centering for one LN
        (d,) = res["ln_to_rms"].declined
        assert "no mean is saved" in d.reason


def test_long_transformer_analyses_without_recursion():
    res = _analyze_all(transformer_like(5000))
    (stream,) = res["ln_to_rms"].matches  # one residual stream holding every LN
    assert len(stream.lns) > 300


def _optimize(model):
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(LOW_LIMIT * 5)  # library code (shape inference, export) needs some depth
    try:
        out, report = optimize_model(model)
    finally:
        sys.setrecursionlimit(old)
    assert not report.errors, report.errors
    return out, report


def test_transformer_10k_nodes_optimizes():
    m = transformer_like(10000)
    n_ln = sum(1 for n in m.graph.node if n.op_type == "LayerNormalization") + \
        sum(1 for n in m.graph.node if n.op_type == "ReduceMean") // 2
    out, report = _optimize(m)
    ln = next(p for p in report.passes if p.name == "ln_to_rms")
    assert ln.applied == n_ln  # every LN of the stream became an RMSNorm
    assert not any(n.op_type in ("LayerNormalization", "ReduceMean") for n in out.graph.node)


def test_elementwise_chain_20k_nodes_optimizes():
    out, report = _optimize(elementwise_chain(20000))
    assert len(out.graph.node) == 20000


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["transformer", "chain"])
def test_100k_nodes_optimize(kind):
    m = transformer_like(100_000) if kind == "transformer" else elementwise_chain(100_000)
    _, report = _optimize(m)
    assert all(p.error is None for p in report.passes)


# --- rollback (pipeline._Rollback: graph.mark / graph.rewind) ---------------------------------


def _half_then_raise(pass_obj):
    """The pass applies half its matches, then raises (a pass bug mid-rewrite)."""
    real = pass_obj.apply

    def apply(graph, matches, ctx):
        real(graph, list(matches)[: max(1, len(matches) // 2)], ctx)
        raise RuntimeError("injected failure after a partial rewrite")

    pass_obj.apply = apply
    return pass_obj


def _run_with_failure(model, failing, rollback_cls=None):
    from normopt import pipeline as PL
    from normopt.passes import all_passes as ap

    passes = [(_half_then_raise(p) if p.name == failing else p) for p in ap() if p.name != "crms"]
    old = PL._Rollback
    if rollback_cls is not None:
        PL._Rollback = rollback_cls
    try:
        out, report = PL.Pipeline(passes).run(model, Context(tune=False))
    finally:
        PL._Rollback = old
    return out, report


class _ExportRollback:
    """The reference: a snapshot exported to a skeleton and imported back on failure."""

    def __init__(self, root):
        self.root, self.snapshot = root, None

    def take(self):
        if self.snapshot is None:
            self.snapshot = G.snapshot(self.root)

    def restore(self):
        return self.root if self.snapshot is None else G.restore(self.snapshot, like=self.root)


@pytest.mark.parametrize("failing", ["explicit_defaults", "ln_to_rms"])
def test_rollback_in_place_gives_the_same_output_as_a_reimported_snapshot(failing):
    """A pass that fails half-way is rolled back in place (no export): every later pass sees the
    graph as a fresh import of the marked state would give it, so the output bytes are the same
    as with an exported-and-imported snapshot."""
    m = transformer_like(400)
    out, report = _run_with_failure(m, failing)
    ref, ref_report = _run_with_failure(m, failing, _ExportRollback)
    assert any(failing in e for e in report.errors), report.errors
    assert report.errors == ref_report.errors
    assert [(p.name, p.applied) for p in report.passes] == [(p.name, p.applied) for p in ref_report.passes]
    assert out.SerializeToString() == ref.SerializeToString()


def test_rollback_takes_no_export():
    """Taking the rollback mark exports nothing (an export is seconds at 100k nodes)."""
    from normopt import fastgs as gs  # the export normopt uses (graphsurgeon's, the same bytes)
    from normopt import pipeline as PL

    calls = []
    real = gs.export_onnx

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    graph = G.to_graph(transformer_like(300))
    passes = [p for p in all_passes() if p.name != "crms"]
    gs.export_onnx = counting
    try:
        report = PL.Report()
        PL.Pipeline(passes).run_graph(graph, Context(tune=False), report)
    finally:
        gs.export_onnx = real
    assert any(p.applied for p in report.passes)
    assert not calls


def _corpus(name):
    import os

    import onnx

    return onnx.load(os.path.join(os.path.dirname(__file__), "corpus", name))


@pytest.mark.parametrize("which", ["transformer", "if-branches"])
def test_rewind_restores_fields_lists_and_reader_order(which):
    """mark/rewind on the same objects: nodes, their attributes and inputs, values' dtypes and
    shapes, and each value's readers in node order, as a fresh import gives them."""
    model = transformer_like(200) if which == "transformer" else _corpus("optimum_opt_decoder_model_merged.onnx")
    g = G.to_graph(model)
    before = G.export(g).SerializeToString()
    m = G.mark(g)
    # a rewrite: detach a node, rewire a reader, rename a value, change a shape and an attribute
    import onnx_graphsurgeon as gs

    graphs = list(G.all_graphs(g))
    assert (len(graphs) > 1) == (which == "if-branches")
    host = max(graphs, key=lambda x: len(x.nodes))  # a branch for the merged decoder
    two = next(n for n in host.nodes if len(n.inputs) >= 2 and n.outputs)
    two.inputs[1] = host.nodes[0].outputs[0]
    two.outputs[0].name = "renamed"
    two.outputs[0].shape = [7]
    with_attr = next(n for n in host.nodes if any(not isinstance(v, gs.Graph) for v in n.attrs.values()))
    with_attr.attrs[next(k for k, v in with_attr.attrs.items() if not isinstance(v, gs.Graph))] = 0.5
    host.nodes[0].inputs.clear()
    del host.nodes[0]
    host.outputs = host.outputs[:1]
    del host.nodes[3]
    g.outputs = []
    G.rewind(m)
    assert G.export(g).SerializeToString() == before
    fresh = G.restore(G.snapshot(g))
    readers = {t.name: [n.name for n in t.outputs] for t in fresh.tensors().values()}
    assert {t.name: [n.name for n in t.outputs] for t in g.tensors().values()} == readers
    assert "normopt_shapes" not in g.__dict__  # the next refresh infers every value afresh


# --- toposort (graph.toposort: graphsurgeon's order, without recursion) -----------------------


def _names(g):
    return [n.name or f"#{i}" for i, n in enumerate(g.nodes)]


@pytest.mark.parametrize("seed", range(6))
def test_toposort_gives_graphsurgeons_order(seed):
    """On shuffled node lists (residual diamonds, producers shared by many readers), the
    order is graphsurgeon's own, tie-breaks included."""
    import numpy as np

    model = transformer_like(300, seed=seed)
    rng = np.random.default_rng(seed)
    a = G.to_graph(model)
    for i, n in enumerate(a.nodes):
        n.name = n.name or f"n{i}"
    perm = rng.permutation(len(a.nodes))
    a.nodes = [a.nodes[i] for i in perm]
    b = G.restore(G.snapshot(a))  # the same shuffled graph, other objects
    a.toposort()
    G.toposort(b)
    assert _names(a) == _names(b)


def _two_chains(n=50):
    """Two independent chains from the input, joined at the end, listed chain after chain: a
    topological order that is not the level order."""
    from onnx import TensorProto, helper

    nodes = []
    for c in "ab":
        prev = "x"
        for i in range(n):
            nodes.append(helper.make_node("Relu" if c == "a" else "Neg", [prev], [f"{c}{i}"], name=f"{c}{i}"))
            prev = f"{c}{i}"
    nodes.append(helper.make_node("Add", [f"a{n - 1}", f"b{n - 1}"], ["y"], name="join"))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("which", ["two-chains", "as-exported", "rewritten"])
def test_toposort_of_a_sorted_list_gives_graphsurgeons_order(which):
    """A list already in topological order (the one-pass path) still gets graphsurgeon's order:
    nodes stably sorted by level, which can differ from the list's own order (two chains
    listed one after the other); after the passes (new nodes appended), too."""
    from normopt import optimize_model

    model = _two_chains() if which == "two-chains" else transformer_like(300)
    if which == "rewritten":
        model, _ = optimize_model(model)
    a = G.to_graph(model)
    for i, n in enumerate(a.nodes):
        n.name = n.name or f"n{i}"
    b = G.restore(G.snapshot(a))
    before = _names(b)
    a.toposort()
    G.toposort(b)
    assert _names(a) == _names(b)
    if which == "two-chains":
        assert _names(b) != before and _names(b)[:4] == ["a0", "b0", "a1", "b1"]


def test_toposort_has_no_recursion_tied_to_depth():
    """A 3000-node chain listed backwards sorts under a recursion limit of 400."""
    g = G.to_graph(elementwise_chain(3000))
    want = _names(g)
    g.nodes = g.nodes[::-1]
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(LOW_LIMIT)
    try:
        G.toposort(g)
    finally:
        sys.setrecursionlimit(old)
    assert _names(g) == want


@pytest.mark.parametrize("seed", range(4))
def test_cleanup_gives_graphsurgeons_result(seed):
    """Dead nodes (unread chains, a node feeding a graph input, a dead reader of a live value)
    are dropped as graphsurgeon drops them: same nodes, same readers lists, same inputs."""
    import numpy as np
    import onnx_graphsurgeon as gs

    def damaged():
        g = G.to_graph(transformer_like(300, seed=seed))
        rng = np.random.default_rng(seed)
        for i in rng.choice(len(g.nodes), 12, replace=False):  # detach some values from their readers
            n = g.nodes[int(i)]
            if n.outputs and n.outputs[0].outputs:
                reader = n.outputs[0].outputs[0]
                reader.inputs[reader.inputs.index(n.outputs[0])] = g.inputs[0]
        dead = gs.Node("Relu", "dead_reader", inputs=[g.nodes[5].outputs[0]], outputs=[gs.Variable("dead_out")])
        g.nodes.insert(7, dead)
        feeds = gs.Node("Identity", "feeds_input", inputs=[g.nodes[2].outputs[0]], outputs=[g.inputs[0]])
        g.nodes.append(feeds)
        return g

    a, b = damaged(), damaged()
    n_before = len(a.nodes)
    a.cleanup(remove_unused_graph_inputs=False)
    G.cleanup(b)
    assert _names(a) == _names(b)
    assert len(a.nodes) < n_before - 1  # the inserted dead reader and more went
    ra = {t.name: ([n.name for n in t.inputs], [n.name for n in t.outputs]) for t in a.tensors().values()}
    rb = {t.name: ([n.name for n in t.inputs], [n.name for n in t.outputs]) for t in b.tensors().values()}
    assert ra == rb
    assert [t.name for t in a.inputs] == [t.name for t in b.inputs]


@pytest.mark.parametrize("which", ["transformer", "if-branches"])
def test_to_model_same_bytes_without_interior_value_info(which):
    """to_model builds no ValueInfoProto for interior values (it drops them): same bytes as an
    export that builds them all, and graphsurgeon's exporter is itself again afterwards."""
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

    model = transformer_like(300) if which == "transformer" else _corpus("optimum_opt_decoder_model_merged.onnx")
    real = OnnxExporter.__dict__["export_value_info_proto"]
    calls = []

    def counting(tensor, do_type_check=True):
        calls.append(tensor.name)
        return real.__func__(tensor, do_type_check)

    ref = G.to_model(G.to_graph(model), model)
    OnnxExporter.export_value_info_proto = staticmethod(counting)
    try:
        g = G.to_graph(model)
        ios = {t.name for x in G.all_graphs(g) for t in list(x.inputs) + list(x.outputs)}
        out = G.to_model(g, model)
    finally:
        OnnxExporter.export_value_info_proto = real
    assert out.SerializeToString() == ref.SerializeToString()
    assert calls and set(calls) <= ios  # graph inputs and outputs only
    assert OnnxExporter.__dict__["export_value_info_proto"] is real


def test_nothing_applied_takes_no_export():
    """A graph no pass rewrites (a chain of scalar ops) comes back as the input itself: the
    export would only rebuild it (10 s at 100k nodes), and the file API writes the input's bytes
    anyway. A graph a pass rewrites is still exported."""
    from normopt import fastgs as gs  # the export normopt uses (graphsurgeon's, the same bytes)

    calls = []
    real = gs.export_onnx

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    chain = elementwise_chain(300)
    gs.export_onnx = counting
    try:
        out, report = optimize_model(chain)
        assert not any(p.applied for p in report.passes) and not calls
        assert out is chain
        out2, report2 = optimize_model(transformer_like(300))
        assert any(p.applied for p in report2.passes) and calls
    finally:
        gs.export_onnx = real


def test_passes_run_with_the_collector_paused():
    """A pass's new objects and its rollback mark stay alive until it ends: the cyclic collector
    does not rescan them during the pass (seconds of ln_to_rms at 100k nodes), and it is on
    again after the run."""
    import gc

    from normopt import pipeline as PL
    from normopt.pipeline import Analysis, Pass

    seen = []

    class Probe(Pass):
        name = "probe"

        def analyze(self, graph, ctx):
            seen.append(("analyze", gc.isenabled()))
            return Analysis(matches=[1])

        def apply(self, graph, matches, ctx):
            seen.append(("apply", gc.isenabled()))
            return 0

    assert gc.isenabled()
    PL.Pipeline([Probe()]).run(transformer_like(100), Context(tune=False))
    assert seen == [("analyze", False), ("apply", False)]
    assert gc.isenabled()
