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


def _label(node) -> str:
    """A node's name, or for an unnamed one its op and what it writes."""
    if node.name:
        return node.name
    out = node.outputs[0].name if node.outputs else ""
    return f"<{node.op} writing '{out}'>"


def inspect_model(path: str, target: str = "ort") -> list[dict]:
    from .api import prepare_opset

    loaded = nio.load_model(path)
    model, _ = prepare_opset(loaded.model)  # as optimize sees it
    canon = canonical_graph(model)
    sites = norm_sites(canon)
    present = {n.name for sub in G.all_graphs(canon) for n in sub.nodes}  # nodes of the input, not ones a pass makes
    graph = G.to_graph(model)
    outcome = {}
    affines = {}  # fold_affine's per-channel affine chains (a NoNorm, a RepBN's affine): name -> (kind, input)

    def record(p, analysis):
        for m in analysis.matches:
            for ln in getattr(m, "lns", []):
                outcome.setdefault(ln.name, f"{p.name}: converts to RMSNorm")
            plan = getattr(m, "plan", None)
            if plan:  # an affine norm
                lins = [_label(lin) for lin, _ in plan[1]] if plan[0] == "forward" else [_label(plan[1][0])]
                outcome.setdefault(m.name, f"{p.name}: folds {plan[0]} into {', '.join(lins)}")
                x = getattr(m, "x", None)
                affines.setdefault(m.name, (getattr(m, "kind", "affine"), getattr(x, "name", "")))
        for d in analysis.declined:
            outcome.setdefault(d.target, f"left alone by {p.name}: {d.reason}")
            if p.name == "fold_affine" and d.kind.startswith("per-channel affine"):
                affines.setdefault(d.target, (d.kind, ""))

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
    # affine chains no recognizer lists as a norm (MobileBERT's NoNorm: Mul -> Add after a Linear)
    listed = {s.node for s in sites}
    for name, (kind, x) in affines.items():
        if name not in listed and name in present:
            rows.append({"kind": kind, "node": name, "input": x, "detail": "", "outcome": outcome[name]})
    return rows
