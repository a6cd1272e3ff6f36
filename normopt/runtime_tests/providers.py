"""Execution providers and session construction."""

from __future__ import annotations

import os
import tempfile

import numpy as np
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


CUDA = "CUDAExecutionProvider"
# CUDA EP options for every session normopt makes: device 0, and TF32 off, so fp32 MatMuls keep
# fp32 precision (ORT's default lets them round inputs to TF32's 10-bit mantissa on Ampere and
# later, which the original model itself would then fail an fp32 equivalence check by)
CUDA_OPTIONS = {"device_id": "0", "use_tf32": "0"}
_cuda_state: dict = {}


def preload_cuda_libraries() -> None:
    """Load CUDA and cuDNN from the nvidia-* pip packages (onnxruntime-gpu[cuda,cudnn]) where
    onnxruntime-gpu has preload_dlls (1.21+); without it the CUDA EP finds them only on the
    system library path. Once per process; harmless where they are already loaded."""
    if "preloaded" in _cuda_state:
        return
    _cuda_state["preloaded"] = True
    fn = getattr(ort, "preload_dlls", None)
    if fn is not None and CUDA in ort.get_available_providers():
        try:
            fn(directory="")  # nvidia site packages first, then the default library path
        except TypeError:
            fn()
        except Exception:
            pass  # reported by cuda_usable() when a session cannot get the CUDA EP


def cuda_available() -> bool:
    """This onnxruntime is built with the CUDA EP (onnxruntime-gpu). Whether it can run, with the
    CUDA libraries and a device present, is cuda_usable()."""
    return CUDA in ort.get_available_providers()


def cuda_usable() -> tuple[bool, str]:
    """(True, device line) if a session really gets the CUDA EP, else (False, why). ONNX Runtime
    lists CUDAExecutionProvider whenever onnxruntime-gpu is installed, and falls back to the CPU
    EP with only a log line when the CUDA libraries or the device are missing."""
    if "usable" not in _cuda_state:
        if not cuda_available():
            _cuda_state["usable"] = (False, "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu instead of "
                                            f"onnxruntime; available: {', '.join(ort.get_available_providers())})")
        else:
            from onnx import TensorProto, helper

            g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
            probe = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
            try:
                make_session(probe, "cuda", "disable").run(None, {"x": np.ones(1, np.float32)})  # libraries load lazily
                _cuda_state["usable"] = (True, f"onnxruntime {ort.__version__}, {CUDA} (device 0)")
            except Exception as exc:
                _cuda_state["usable"] = (False, str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__)
    return _cuda_state["usable"]


def providers_for(provider: str) -> list[str]:
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    if provider == "cuda":
        preload_cuda_libraries()
        if not cuda_available():
            raise NormoptError(
                "--provider cuda needs onnxruntime-gpu with CUDAExecutionProvider "
                f"(available: {', '.join(ort.get_available_providers())})"
            )
        return [(CUDA, dict(CUDA_OPTIONS)), "CPUExecutionProvider"]
    raise NormoptError(f"unknown provider '{provider}' (cpu or cuda)")


# element types whose bytes ONNX Runtime can take from a numpy array as they are in the file
_MAPPABLE = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16,
             onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
             onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64,
             onnx.TensorProto.BOOL}
MAPPED_LOCATION = "normopt-mapped-initializer"


def _mapped_source(model):
    """(serialized skeleton, initializer names, OrtValues) for building a session whose weights
    are the file's own bytes, memory-mapped and handed to ONNX Runtime as external initializers:
    ONNX Runtime then does not parse the weights out of a 650 MB protobuf (a GPT-2-small-shaped
    decoder's session: 1.3-3.0 s -> 1.0-1.1 s, alternated, shared cores; the same values, bit for
    bit), and a model copy with extra outputs needs no temporary file. None where the model does
    not fit that (a tensor by reference outside the main graph's initializers, a sparse
    initializer, an element type not mapped one to one), or a file whose weights are in
    external-data files."""
    from .. import weights as W

    proto = W.read_skeleton(model) if isinstance(model, str) else model
    if proto.graph.sparse_initializer:
        return None
    main = [t for t in proto.graph.initializer if W.external_ref(t) is not None]
    if not main or sum(1 for t in W.iter_tensors(proto) if W.external_ref(t) is not None) != len(main):
        return None
    if any(t.data_type not in _MAPPABLE for t in main):
        return None
    if isinstance(model, str) and any(os.path.realpath(W.external_ref(t)[0]) != os.path.realpath(model) for t in main):
        # weights in external-data files: ONNX Runtime maps those itself (faster than these
        # mappings: 1.2-1.4 s against 2.2-2.6 s for an OPT-350m-shaped decoder's 1.6 GB)
        return None
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    names, values = [], []
    for t in out.graph.initializer:
        ref = W.external_ref(t)
        if ref is None:
            continue
        length = ref[2] if ref[2] is not None else W.tensor_nbytes(t)
        values.append(to_ortvalue(W.load_array(t, ref[0], ref[1], length)))
        names.append(t.name)
        del t.external_data[:]
        t.data_location = onnx.TensorProto.EXTERNAL
        e = t.external_data.add()
        e.key, e.value = "location", MAPPED_LOCATION
    return out.SerializeToString(), names, values


def session_options(level="all", threads: int | None = None, profile_prefix=None, spin: bool = True):
    """The SessionOptions of make_session (io.OrtCheck builds the input's session with them too,
    so that verification can run the original on it)."""
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
    return so


def make_session(model, provider="cpu", level="all", threads: int | None = None, profile_prefix=None,
                 spin: bool = True, mapped: bool = False):
    """An InferenceSession from a path (external data resolved beside it) or a ModelProto.

    spin=False turns off intra-op thread spinning: with several sessions run in turn, a
    session's idle workers otherwise keep spinning and steal the cores of the next one.
    mapped=True: the weights are memory-mapped from their files and handed over as external
    initializers (_mapped_source), where the model allows it; ONNX Runtime then does not load
    the file itself, so a check that the file loads must build one session without it."""
    so = session_options(level, threads, profile_prefix, spin)
    name = "<in-memory model>" if isinstance(model, onnx.ModelProto) else model
    providers = providers_for(provider)
    source = None
    if mapped:
        try:
            source = _mapped_source(model)
        except Exception:  # a file the skeleton reader refuses: ONNX Runtime says why below
            source = None
    try:
        if source is not None:
            so.add_external_initializers(source[1], source[2])
            sess = _check_ep(ort.InferenceSession(source[0], sess_options=so, providers=providers), provider)
            sess._normopt_initializers = (so, source[2])  # the mapped weights live as long as the session
            return sess
        if isinstance(model, onnx.ModelProto) and _needs_file(model):
            # a skeleton (weights referenced by absolute path) or a model over 2 GB: ONNX Runtime
            # reads it from files; the temporary copy can go once the session holds the weights
            from ..io import write_model

            with tempfile.TemporaryDirectory(prefix="normopt-session-") as tmp:
                path = os.path.join(tmp, "model.onnx")
                write_model(model, path, external=True)
                return _check_ep(ort.InferenceSession(path, sess_options=so, providers=providers), provider)
        src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
        return _check_ep(ort.InferenceSession(src, sess_options=so, providers=providers), provider)
    except NormoptError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SessionError(f"{name}: ONNX Runtime cannot load the model: {first[:300]}") from None


def _check_ep(sess, provider):
    """The session runs on the EP asked for: ONNX Runtime silently falls back to the CPU EP when
    the CUDA EP cannot be created (missing CUDA/cuDNN libraries, no device), which would time and
    verify the CPU while reporting CUDA."""
    if provider == "cuda" and CUDA not in sess.get_providers():
        raise SessionError("the CUDA execution provider could not be created (ONNX Runtime fell back to "
                           f"{', '.join(sess.get_providers())}): are the CUDA and cuDNN libraries that this onnxruntime-gpu "
                           "needs installed (pip install 'onnxruntime-gpu[cuda,cudnn]'), and is an NVIDIA device visible?")
    return sess


def to_ortvalue(arr, device: str = "cpu"):
    """An OrtValue of a numpy array on `device` ("cpu" or "cuda"), bfloat16 (ml_dtypes) included,
    which onnxruntime's numpy conversion does not take."""
    arr = np.ascontiguousarray(arr)
    dev = "cuda" if device == "cuda" else "cpu"
    if arr.dtype.name == "bfloat16":
        from onnx import TensorProto

        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(arr.view(np.uint16), TensorProto.BFLOAT16) if dev == "cpu" else \
            _bf16_on_device(arr)
    return ort.OrtValue.ortvalue_from_numpy(arr, dev, 0)


def _bf16_on_device(arr):
    from onnx import TensorProto

    out = ort.OrtValue.ortvalue_from_shape_and_type(list(arr.shape), TensorProto.BFLOAT16, "cuda", 0)
    out.update_inplace(arr.view(np.uint16))
    return out


def _needs_file(model: onnx.ModelProto) -> bool:
    from .. import weights as W

    return any(W.external_ref(t) is not None for t in W.iter_tensors(model)) or model.ByteSize() > 2**31 - 1
