"""normopt.proof: a translation validator for normopt's rewrites.

``prove(original, optimized)`` shows, without running either model, that the optimized model
computes the original's function up to floating-point rounding, or names the first node where
that cannot be shown. It is independent of the optimizer: it imports nothing from
normopt.passes and re-derives every fact from the two graphs and their weights (see
docs/proof.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

__all__ = ["prove", "ProofResult"]


@dataclass
class ProofResult:
    proved: bool
    summary: str  # "proved: ..." or "not proved: <where>: <reason>"
    where: str | None = None
    reason: str | None = None
    details: dict = field(default_factory=dict)

    def line(self) -> str:
        return self.summary

    def to_dict(self) -> dict:
        return {"proved": self.proved, "summary": self.summary, "where": self.where, "reason": self.reason, **self.details}

    def __bool__(self) -> bool:
        return self.proved


def _load(m):
    from .. import io as nio

    if isinstance(m, onnx.ModelProto):
        return m
    return nio.load_model(str(m)).model


def prove(original, optimized, cancel=None) -> ProofResult:
    """Prove that `optimized` computes `original`'s function. Each argument is a path or an
    onnx.ModelProto (an in-memory model or a normopt skeleton). Bad input (a file that does not
    load) raises normopt.errors.NormoptError; everything else is a ProofResult. `cancel`, a
    threading.Event, stops the proof (raising cancel.Cancelled) within one node or weight block
    of being set."""
    from . import cancel as _cancel
    from .prover import Prover

    _cancel.install(cancel)
    try:
        orig = _load(original)
        _cancel.check()
        opt = _load(optimized)
        _cancel.check()
        return _run(Prover(orig, opt))
    finally:
        _cancel.install(None)


def _run(p) -> ProofResult:
    from ..errors import NormoptError
    from .cancel import Cancelled
    from .prover import NotProved

    try:
        stats = p.run()
    except (NormoptError, KeyboardInterrupt, Cancelled):
        raise
    except NotProved as exc:
        s = p.stats
        return ProofResult(False, f"not proved: {exc.where}: {exc.reason}", exc.where, exc.reason,
                           {"nodes_checked": s.nodes, "weights_checked": s.weights_checked})
    except Exception as exc:  # the prover's own bug: never "proved"
        text = " ".join(str(exc).split()) or type(exc).__name__
        return ProofResult(False, f"not proved: internal error in the prover: {type(exc).__name__}: {text}", None, text,
                           {"internal_error": True})
    return ProofResult(True, f"proved: {stats.line()}", details={
        "nodes": stats.nodes, "identical": stats.identical, "norms_converted": stats.norms_converted,
        "writers_centered": stats.centered_writers, "affine_folds": stats.affine_folds,
        "shifts_absorbed": stats.shifts_absorbed, "layout": stats.layout, "subgraphs": stats.subgraphs,
        "weights_checked": stats.weights_checked})
