"""Peer optimizers as latency baselines, each checked for equivalence before it is timed.

* ``ort-transformers``: ``onnxruntime.transformers.optimizer.optimize_model`` with the model type
  given or inferred from the graph (a causal mask: gpt2; a 4-D float input: vit; else bert);
* ``onnxscript``: ``onnxscript.optimizer.optimize`` then ``onnxscript.rewriter.ort_fusions``.

A baseline that fails or is not equivalent to the original is reported as such, never timed
silently.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import onnx

from ..errors import NormoptError

KNOWN = ("ort-transformers", "onnxscript")


@dataclass
class Baseline:
    label: str
    model: onnx.ModelProto | None
    status: str  # "equivalent" | "NOT EQUIVALENT: ..." | "failed: ..."


def infer_model_type(model: onnx.ModelProto) -> str:
    ops = {n.op_type for n in model.graph.node}
    if "Trilu" in ops or any("causal" in (n.name or "").lower() for n in model.graph.node):
        return "gpt2"
    inits = {i.name for i in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name not in inits and len(vi.type.tensor_type.shape.dim) == 4 and vi.type.tensor_type.elem_type in (1, 10):
            return "vit"
    return "bert"


def _full(model) -> onnx.ModelProto:
    """A self-contained in-memory model for a peer tool: a path is loaded with its external data;
    a skeleton (weights referenced by normopt) is written out and loaded back."""
    if isinstance(model, str):
        return onnx.load(model)
    from ..weights import external_ref, iter_tensors

    if not any(external_ref(t) is not None for t in iter_tensors(model)):
        return model
    from ..io import write_model

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "in.onnx")
        write_model(model, path, external=True)
        return onnx.load(path)


def ort_transformers(model, model_type: str | None = None, num_heads: int = 0, hidden_size: int = 0) -> onnx.ModelProto:
    from onnxruntime.transformers import optimizer

    model = _full(model)
    with tempfile.TemporaryDirectory() as tmp:  # the optimizer reads a path for large models
        path = os.path.join(tmp, "in.onnx")
        onnx.save_model(model, path, save_as_external_data=model.ByteSize() > 2**31 - 1)
        out = optimizer.optimize_model(path, model_type=model_type or infer_model_type(model), num_heads=num_heads,
                                       hidden_size=hidden_size)
        return out.model


def onnxscript_fusions(model) -> onnx.ModelProto:
    import onnx_ir as ir
    from onnxscript import optimizer
    from onnxscript.rewriter import ort_fusions

    model = _full(model)
    folded = optimizer.optimize(model)
    irm = ir.from_proto(folded)
    irm, _ = ort_fusions.optimize_for_ort(irm)
    return ir.to_proto(irm)


def parse(spec: str) -> list[str]:
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in KNOWN]
    if bad:
        raise NormoptError(f"--baselines: unknown baseline(s) {bad} (known: {', '.join(KNOWN)})")
    return names


def build(names, original: onnx.ModelProto, model_type=None, input_opts=None, num_heads=0, hidden_size=0) -> list[Baseline]:
    from .equivalence import compare

    out = []
    for name in names:
        try:
            m = (ort_transformers(original, model_type, num_heads, hidden_size) if name == "ort-transformers"
                 else onnxscript_fusions(original))
        except Exception as exc:
            out.append(Baseline(name, None, f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"))
            continue
        try:
            res = compare(original, m, seeds=2, input_opts=input_opts)
        except Exception as exc:
            out.append(Baseline(name, None, f"failed to run: {str(exc).splitlines()[0][:120]}"))
            continue
        if res.equivalent:
            out.append(Baseline(name, m, "equivalent"))
        elif any("does not load" in p or "fails to run" in p for p in res.problems):
            out.append(Baseline(name, None, "failed: " + "; ".join(res.problems)[:160]))
        else:
            worst = max(res.outputs, key=lambda o: o.max_abs, default=None)
            detail = f"max abs {worst.max_abs:.3g} on '{worst.name}'" if worst else "; ".join(res.problems)[:120]
            out.append(Baseline(name, None, f"NOT EQUIVALENT ({detail})"))
    return out
