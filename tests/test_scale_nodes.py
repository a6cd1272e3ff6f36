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
