"""``normopt inspect``: every normalization in a model, with its place, its kind, and the pass
that would rewrite it or the reason none would (a dry run of the pipeline, nothing written)."""

from __future__ import annotations

from . import graph as G
from . import io as nio
from .norms import find_norms
from .passes import build_pipeline
from .pipeline import Context, Report

PASS_FOR_KIND = {
    "BatchNormalization": "no pass yet folds BatchNormalization (affine-norm folding is planned)",
    "per-channel affine": "no pass yet folds per-channel affine chains (affine-norm folding is planned)",
    "SkipLayerNormalization": "no pass rewrites SkipLayerNormalization yet",
}


def inspect_model(path: str, target: str = "ort") -> list[dict]:
    loaded = nio.load_model(path)
    graph = G.to_graph(loaded.model)
    pipe = build_pipeline()
    report = Report()
    # canonicalize like the pipeline does, then list norms on that graph
    canon = [p for p in pipe.passes if p.name in ("fold_constants", "remove_identity", "explicit_defaults")]
    rest = [p for p in pipe.passes if p not in canon]
    from .pipeline import Pipeline

    graph = Pipeline(canon).run_graph(graph, Context(target=target), report)
    sites = find_norms(graph)
    ctx = Context(target=target)
    outcome = {}
    for p in rest:
        analysis = p.analyze(graph, ctx)
        for m in analysis.matches:
            for ln in getattr(m, "lns", []):
                outcome.setdefault(ln.name, f"{p.name}: converts to RMSNorm ({m.describe().split(';')[0]})")
        for d in analysis.declined:
            outcome.setdefault(d.target, f"left alone by {p.name}: {d.reason}")
    rows = []
    for s in sites:
        out = outcome.get(s.node)
        if out is None:
            if s.kind.startswith("RMS"):
                out = "already RMSNorm: nothing to do"
            else:
                out = PASS_FOR_KIND.get(s.kind, "no pass rewrites this kind")
        rows.append({"kind": s.kind, "node": s.node, "input": s.input, "detail": s.detail, "outcome": out})
    return rows
