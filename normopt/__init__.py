"""normopt: verified ONNX rewrites of transformer normalizations.

Python API::

    import normopt
    result = normopt.optimize("model.onnx", "model.opt.onnx")   # verifies before writing
    result.report.passes, result.verification

    model, report = normopt.optimize_model(onnx_model)           # in memory, no verification
    normopt.verify("a.onnx", "b.onnx")                            # EquivalenceResult
"""

from __future__ import annotations

__version__ = "0.1.0"

from .api import OptimizeResult, optimize, optimize_model, verify  # noqa: E402,F401
from .errors import InternalError, NormoptError, VerificationFailed  # noqa: E402,F401
