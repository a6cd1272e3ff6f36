"""``normopt inspect``: every normalization in a model, with its place, its kind, and the pass
that would rewrite it or the reason none would (a dry run of the pipeline in memory; nothing
is written)."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from . import graph as G
from . import io as nio
from .norms import find_norms
from .passes import build_pipeline
from .pipeline import Context, Report

# the passes that put a graph in the form the recognizers read (constants folded, so an exporter's
# Identity-wrapped or Constant -> Reshape γ is a constant; defaults explicit), and change no norm
CANONICALIZE = ["fold_constants", "remove_identity", "explicit_defaults"]


def canonical_graph(model) -> gs.Graph:
    """MODEL as the passes see it: its opset prepared as optimize prepares it, canonicalized."""
    from .api import prepare_opset

    model, _ = prepare_opset(model)
    graph = G.to_graph(model)
    return build_pipeline(CANONICALIZE).run_graph(graph, Context(), Report())


def norm_sites(graph: gs.Graph) -> list:
    """Every normalization the recognizers find, in the graph and in every subgraph."""
    sites = []
    for sub in G.all_graphs(graph):
        with G.scope(graph, sub):
            sites += find_norms(sub)
    return sites


def count_norms(model) -> dict:
    """Normalizations by short kind ({"LN": 25, "RMS": 3, ...}), as `inspect` lists them: every
    LayerNorm the matcher finds (the op, SkipLayerNormalization, decomposed forms), If branches
    included, on the canonicalized graph."""
    import collections

    from .reporting import norm_kind

    return dict(collections.Counter(norm_kind(s.kind) for s in norm_sites(canonical_graph(model))))


def inspect_model(path: str, target: str = "ort") -> list[dict]:
    from .api import prepare_opset

    loaded = nio.load_model(path)
    model, _ = prepare_opset(loaded.model)  # as optimize sees it
    sites = norm_sites(canonical_graph(model))
    graph = G.to_graph(model)
    outcome = {}

    def record(p, analysis):
        for m in analysis.matches:
            for ln in getattr(m, "lns", []):
                outcome.setdefault(ln.name, f"{p.name}: converts to RMSNorm")
            plan = getattr(m, "plan", None)
            if plan:  # an affine norm
                lins = [lin.name for lin, _ in plan[1]] if plan[0] == "forward" else [plan[1][0].name]
                outcome.setdefault(m.name, f"{p.name}: folds {plan[0]} into {', '.join(lins)}")
        for d in analysis.declined:
            outcome.setdefault(d.target, f"left alone by {p.name}: {d.reason}")

    build_pipeline().run_graph(graph, Context(target=target), Report(), on_analysis=record)
    rows = []
    for s in sites:
        out = outcome.get(s.node)
        if out is None and s.kind == "SkipLayerNormalization":
            # split into Add + LayerNormalization named after it, then converted or re-fused
            split = [v for k, v in outcome.items() if k.startswith(s.node + "_ln")]
            out = split[0] if split else None
        if out is None:
            if s.kind.startswith("RMS"):
                out = "already RMSNorm: nothing to do"
            else:
                out = "no pass rewrites this kind"
        rows.append({"kind": s.kind, "node": s.node, "input": s.input, "detail": s.detail, "outcome": out})
    return rows
