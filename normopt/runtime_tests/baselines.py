"""Peer optimizers as latency baselines, each checked for equivalence before it is timed.

* ``ort-transformers``: ``onnxruntime.transformers.optimizer.optimize_model`` with the model type
  given or inferred from the graph (a causal mask: gpt2; a 4-D float input: vit; else bert);
* ``onnxscript``: ``onnxscript.optimizer.optimize`` then ``onnxscript.rewriter.ort_fusions``.

A baseline that fails or is not equivalent to the original is reported as such, never timed
silently. Both need the ``baselines`` extra (torch, onnxscript, onnx-ir); a plain install is told
so before anything runs (``require``).

normopt's own row is what ``normopt optimize`` writes with the same provider and threads: tuned,
guarded and verified (``optimized_by_normopt``), labelled ``NORMOPT_LABEL``.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import onnx

from ..errors import NormoptError

KNOWN = ("ort-transformers", "onnxscript")
# the modules each baseline imports when it runs (ort-transformers' optimize_model imports torch)
NEEDS = {"ort-transformers": ("torch",), "onnxscript": ("onnxscript", "onnx_ir")}
EXTRA_HINT = "pip install torch==2.13.0 'normopt[baselines]' (from a clone: pip install -e '.[baselines]')"
NORMOPT_LABEL = "normopt optimize (tuned)"


@dataclass
class Baseline:
    label: str
    model: onnx.ModelProto | str | None  # a model, or the path of one
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


def require(names) -> None:
    """A usage error naming the extra when a baseline's modules are not installed."""
    import importlib.util

    missing = {}
    for name in names:
        for mod in NEEDS[name]:
            try:
                found = importlib.util.find_spec(mod) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                missing.setdefault(name, []).append(mod)
    if missing:
        what = "; ".join(f"{n} needs {', '.join(m)}" for n, m in missing.items())
        raise NormoptError(f"--baselines: {what}, which the 'baselines' extra installs: {EXTRA_HINT}")


def optimized_by_normopt(path: str, workdir: str, provider: str = "cpu", threads: int | None = None,
                         input_opts=None) -> Baseline:
    """The first model as `normopt optimize` writes it (tuned on `provider` at `threads`, with the
    guard against a slower output, verified before it is written), into `workdir`."""
    from ..api import optimize
    from ..errors import VerificationFailed

    out = os.path.join(workdir, "normopt.onnx")
    try:
        res = optimize(path, out, provider=provider, tune=True, threads=threads, input_opts=input_opts)
    except VerificationFailed as exc:
        return Baseline(NORMOPT_LABEL, None, f"NOT EQUIVALENT ({str(exc).splitlines()[0][:120]})")
    status = "no changes (a copy of the input)" if res.unchanged else "verified equivalent"
    return Baseline(NORMOPT_LABEL, res.output, status)


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
