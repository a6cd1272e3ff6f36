"""``normopt inspect``: every normalization in a model, with its place, its kind, and the pass
that would rewrite it or the reason none would (a dry run of the pipeline in memory; nothing
is written)."""

from __future__ import annotations

from . import graph as G
from . import io as nio
from .norms import find_norms
from .passes import build_pipeline
from .pipeline import Context, Report

def inspect_model(path: str, target: str = "ort") -> list[dict]:
    from .api import prepare_opset

    loaded = nio.load_model(path)
    model, _ = prepare_opset(loaded.model)  # as optimize sees it
    graph = G.to_graph(model)
    sites = find_norms(graph)
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
