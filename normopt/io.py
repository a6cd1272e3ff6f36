"""Loading and saving ONNX models: validation of inputs, external data, atomic writes.

Every problem with an input is raised as :class:`NormoptError` with a one-line message,
before anything is written. Outputs are staged in a temporary directory next to the
target and renamed into place only when :meth:`StagedModel.commit` is called, so a failed
verification or a crash never leaves a partial file behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field

import onnx
from onnx import external_data_helper

from .errors import NormoptError

MIN_OPSET = 13
TWO_GB = 2**31 - 1
# op domains ONNX Runtime implements (plus the model's own local functions)
KNOWN_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "com.microsoft.nchwc", "ai.onnx.preview.training"}
# ORT contrib ops that ORT registers in the default ONNX domain; the ONNX checker does not know them.
ORT_DEFAULT_DOMAIN_CONTRIB_OPS = {"SimplifiedLayerNormalization"}


@dataclass
class LoadedModel:
    model: onnx.ModelProto
    path: str
    had_external_data: bool
    opset: int
    notes: list = field(default_factory=list)


def default_opset(model: onnx.ModelProto) -> int | None:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return None


def _external_tensors(model: onnx.ModelProto):
    for tensor in external_data_helper._get_all_tensors(model):
        if external_data_helper.uses_external_data(tensor):
            yield tensor


def load_model(path: str, load_external: bool = True) -> LoadedModel:
    """Read and validate a model. Raises NormoptError with one line on any bad input."""
    if not os.path.exists(path):
        raise NormoptError(f"{path}: no such file")
    if os.path.isdir(path):
        raise NormoptError(f"{path}: is a directory, not an ONNX model file")
    size = os.path.getsize(path)
    if size == 0:
        raise NormoptError(f"{path}: empty file, not an ONNX model")
    if size > TWO_GB:
        raise NormoptError(
            f"{path}: {size / 2**30:.1f} GB in one file; protobuf cannot hold a model over 2 GB: "
            "save it with external data (onnx.save_model(..., save_as_external_data=True))"
        )
    try:
        model = onnx.load_model(path, load_external_data=False)
    except Exception as exc:  # protobuf DecodeError, RuntimeWarning-as-error, ...
        raise NormoptError(f"{path}: not a valid ONNX model ({type(exc).__name__})") from None
    if model.ir_version <= 0 or not model.HasField("graph") or not model.opset_import:
        raise NormoptError(f"{path}: not a valid ONNX model (no graph, IR version or opset)")
    opset = default_opset(model)
    if opset is None:
        raise NormoptError(f"{path}: the model imports no default-domain (ai.onnx) opset")
    if opset < MIN_OPSET:
        raise NormoptError(f"{path}: opset {opset} is not supported (normopt needs opset >= {MIN_OPSET})")
    if len(model.graph.output) == 0:
        raise NormoptError(f"{path}: the graph has no outputs")
    local = {f.domain for f in model.functions}
    unknown = sorted({n.domain for n in model.graph.node} - KNOWN_DOMAINS - local)
    if unknown:
        op = next(n.op_type for n in model.graph.node if n.domain == unknown[0])
        raise NormoptError(f"{path}: op '{op}' of domain '{unknown[0]}' is unknown to ONNX Runtime")

    base_dir = os.path.dirname(os.path.abspath(path))
    ext = list(_external_tensors(model))
    for tensor in ext:
        info = external_data_helper.ExternalDataInfo(tensor)
        location = os.path.normpath(os.path.join(base_dir, info.location))
        if not os.path.isfile(location):
            raise NormoptError(
                f"{path}: external data file '{info.location}' for tensor '{tensor.name}' is missing"
            )
        size = os.path.getsize(location)
        offset = info.offset or 0
        needed = offset + (info.length if info.length is not None else 0)
        if needed > size or offset > size:
            raise NormoptError(
                f"{path}: external data file '{info.location}' is shorter ({size} bytes) than "
                f"tensor '{tensor.name}' needs ({needed} bytes)"
            )
    if ext and load_external:
        try:
            external_data_helper.load_external_data_for_model(model, base_dir)
        except Exception as exc:
            raise NormoptError(f"{path}: cannot read external data ({exc})") from None
    try:
        check_model(model)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NormoptError(f"{path}: invalid ONNX model: {first}") from None
    return LoadedModel(model=model, path=path, had_external_data=bool(ext), opset=opset)


def check_model(model: onnx.ModelProto) -> None:
    """onnx.checker on the model, with ORT's default-domain contrib ops treated as opaque.

    ORT registers SimplifiedLayerNormalization in the default domain; the ONNX checker has no
    schema for it. We check a copy whose contrib nodes are moved to com.microsoft, which the
    checker does not validate, so everything else is still checked.
    """
    probe = model
    if any(n.op_type in ORT_DEFAULT_DOMAIN_CONTRIB_OPS and n.domain in ("", "ai.onnx") for n in model.graph.node):
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        for node in probe.graph.node:
            if node.op_type in ORT_DEFAULT_DOMAIN_CONTRIB_OPS and node.domain in ("", "ai.onnx"):
                node.domain = "com.microsoft"
        if not any(i.domain == "com.microsoft" for i in probe.opset_import):
            probe.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    if probe.ByteSize() > TWO_GB:
        with tempfile.TemporaryDirectory() as tmp:
            p = os.path.join(tmp, "check.onnx")
            onnx.save_model(probe, p, save_as_external_data=True, location="check.onnx.data")
            onnx.checker.check_model(p)
    else:
        onnx.checker.check_model(probe)


def check_output_path(in_path: str, out_path: str) -> None:
    if os.path.abspath(in_path) == os.path.abspath(out_path) or (
        os.path.exists(out_path) and os.path.samefile(in_path, out_path)
    ):
        raise NormoptError(f"-o {out_path}: output path is the input path; refusing to overwrite the input")
    out_dir = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(out_dir):
        raise NormoptError(f"-o {out_path}: output directory {out_dir} does not exist")
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise NormoptError(f"-o {out_path}: output directory {out_dir} is not writable")
    if os.path.isdir(out_path):
        raise NormoptError(f"-o {out_path}: is a directory")


class StagedModel:
    """A model written to a temporary directory beside its destination.

    ``path`` can be loaded (for verification) before ``commit`` renames it into place.
    """

    def __init__(self, model: onnx.ModelProto, out_path: str, external_data: bool):
        self.out_path = os.path.abspath(out_path)
        out_dir = os.path.dirname(self.out_path)
        self.name = os.path.basename(self.out_path)
        self.data_name = self.name + ".data"
        try:
            self.tmpdir = tempfile.mkdtemp(prefix=".normopt-", dir=out_dir)
        except OSError as exc:
            raise NormoptError(f"cannot write to {out_dir}: {exc.strerror}") from None
        self.path = os.path.join(self.tmpdir, self.name)
        self.external = external_data or model.ByteSize() > TWO_GB
        try:
            if self.external:
                onnx.save_model(
                    model,
                    self.path,
                    save_as_external_data=True,
                    all_tensors_to_one_file=True,
                    location=self.data_name,
                    size_threshold=1024,
                )
            else:
                onnx.save_model(model, self.path)
        except OSError as exc:
            self.discard()
            raise NormoptError(f"cannot write {out_path}: {exc.strerror or exc}") from None
        except Exception as exc:
            self.discard()
            raise NormoptError(f"cannot serialize the output model: {exc}") from None

    def commit(self) -> str:
        try:
            data = os.path.join(self.tmpdir, self.data_name)
            if os.path.exists(data):
                os.replace(data, os.path.join(os.path.dirname(self.out_path), self.data_name))
            os.replace(self.path, self.out_path)
        finally:
            self.discard()
        return self.out_path

    def discard(self) -> None:
        shutil.rmtree(getattr(self, "tmpdir", ""), ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.discard()
        return False


def save_model(model: onnx.ModelProto, out_path: str, external_data: bool = False) -> str:
    """Write atomically (temp file in the target directory, then rename)."""
    return StagedModel(model, out_path, external_data).commit()
