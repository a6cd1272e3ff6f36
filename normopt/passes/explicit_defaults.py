"""explicit_defaults: write every default attribute that a later pass reads.

Identity: an attribute left out means its schema default, so writing the default changes
nothing. Peers read a missing LayerNorm epsilon as 1e-12 instead of the default 1e-5
(normopt-math.md section 4); making defaults explicit removes that class of bug:

* LayerNormalization: epsilon 1e-5, axis -1, stash_type 1;
* BatchNormalization: epsilon 1e-5;
* ReduceMean / ReduceSum: keepdims 1 (axes stay where the opset puts them: attribute before
  opset 18, input from 18; ``graph.reduce_axes`` reads both);
* com.microsoft SkipLayerNormalization: epsilon 1e-12 (its contrib schema default);
* Gemm: alpha 1, beta 1, transA 0, transB 0.
"""

from __future__ import annotations

from ..pipeline import Analysis, Pass

DEFAULTS = {
    ("", "LayerNormalization"): {"epsilon": 1e-5, "axis": -1, "stash_type": 1},
    ("", "BatchNormalization"): {"epsilon": 1e-5},
    ("", "ReduceMean"): {"keepdims": 1},
    ("", "ReduceSum"): {"keepdims": 1},
    ("", "Gemm"): {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 0},
    ("com.microsoft", "SkipLayerNormalization"): {"epsilon": 1e-12},
}


def _domain(node):
    d = getattr(node, "domain", None) or ""
    return "" if d == "ai.onnx" else d


class ExplicitDefaults(Pass):
    name = "explicit_defaults"
    description = "make default attributes explicit (LN epsilon 1e-5, axis -1; keepdims; Gemm alpha/beta) (canonicalization)"
    keeps_shapes = True  # a default written out changes no value, shape or dtype: no re-inference

    def analyze(self, graph, ctx):
        matches = []
        for node in graph.nodes:
            defaults = DEFAULTS.get((_domain(node), node.op))
            if defaults and any(k not in node.attrs for k in defaults):
                matches.append(node)
        return Analysis(matches=matches)

    def apply(self, graph, matches, ctx):
        for node in matches:
            for k, v in DEFAULTS[(_domain(node), node.op)].items():
                node.attrs.setdefault(k, v)
        return len(matches)
