"""Execution providers and session construction."""

from __future__ import annotations

import os
import tempfile

import onnx
import onnxruntime as ort

from ..errors import NormoptError

ort.set_default_logger_severity(4)  # ONNX Runtime's own log lines (warnings, and errors we report ourselves in one line) never reach the terminal

LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class SessionError(NormoptError):
    """ONNX Runtime could not load or run a model."""


def cuda_available() -> bool:
    return "CUDAExecutionProvider" in ort.get_available_providers()


def providers_for(provider: str) -> list[str]:
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    if provider == "cuda":
        if not cuda_available():
            raise NormoptError(
                "--provider cuda needs onnxruntime-gpu with CUDAExecutionProvider "
                f"(available: {', '.join(ort.get_available_providers())})"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise NormoptError(f"unknown provider '{provider}' (cpu or cuda)")


def make_session(model, provider="cpu", level="all", threads: int | None = None, profile_prefix=None,
                 spin: bool = True):
    """An InferenceSession from a path (external data resolved beside it) or a ModelProto.

    spin=False turns off intra-op thread spinning: with several sessions run in turn, a
    session's idle workers otherwise keep spinning and steal the cores of the next one."""
    so = ort.SessionOptions()
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = LEVELS[level]
    so.log_severity_level = 4
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    name = "<in-memory model>" if isinstance(model, onnx.ModelProto) else model
    try:
        if isinstance(model, onnx.ModelProto) and _needs_file(model):
            # a skeleton (weights referenced by absolute path) or a model over 2 GB: ONNX Runtime
            # reads it from files; the temporary copy can go once the session holds the weights
            from ..io import write_model

            with tempfile.TemporaryDirectory(prefix="normopt-session-") as tmp:
                path = os.path.join(tmp, "model.onnx")
                write_model(model, path, external=True)
                return ort.InferenceSession(path, sess_options=so, providers=providers_for(provider))
        src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
        return ort.InferenceSession(src, sess_options=so, providers=providers_for(provider))
    except NormoptError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SessionError(f"{name}: ONNX Runtime cannot load the model: {first[:300]}") from None


def _needs_file(model: onnx.ModelProto) -> bool:
    from .. import weights as W

    return any(W.external_ref(t) is not None for t in W.iter_tensors(model)) or model.ByteSize() > 2**31 - 1
