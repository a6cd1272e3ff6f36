"""Loading and saving ONNX models: validation of inputs, external data, atomic writes.

Every problem with an input is raised as :class:`NormoptError` with a one-line message,
before anything is written. Outputs are staged in a temporary directory next to the
target and renamed into place only when :meth:`StagedModel.commit` is called, so a failed
verification or a crash never leaves a partial file behind.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from dataclasses import dataclass, field

import onnx

from . import weights as W
from .errors import NormoptError

MIN_OPSET = 13  # the passes' floor: a model below it is upgraded to it (api.prepare_opset)
MIN_LOADABLE_OPSET = 7  # ONNX Runtime's floor for the default domain
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
    weight_bytes: int = 0
    notes: list = field(default_factory=list)


def default_opset(model: onnx.ModelProto) -> int | None:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return None


def load_model(path: str, load_external: bool = False, min_opset: int = MIN_LOADABLE_OPSET) -> LoadedModel:
    """Read and validate a model as a *skeleton* (weights.read_skeleton): tensors over 1 KiB are
    references into the model file or its external-data files, never loaded. Raises
    NormoptError with one line on any bad input. (load_external is accepted for compatibility
    and ignored: weights are always read on demand.)"""
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
        model = W.read_skeleton(path)
    except Exception as exc:  # a wire-format error, protobuf DecodeError, ...
        raise NormoptError(f"{path}: not a valid ONNX model ({type(exc).__name__})") from None
    if model.ir_version <= 0 or not model.HasField("graph") or not model.opset_import:
        raise NormoptError(f"{path}: not a valid ONNX model (no graph, IR version or opset)")
    opset = default_opset(model)
    if opset is None:
        raise NormoptError(f"{path}: the model imports no default-domain (ai.onnx) opset")
    if opset < min_opset:
        raise NormoptError(f"{path}: opset {opset} is not supported (ONNX Runtime needs opset >= {min_opset})")
    if len(model.graph.output) == 0:
        raise NormoptError(f"{path}: the graph has no outputs")
    local = {f.domain for f in model.functions}
    unknown = sorted({n.domain for n in model.graph.node} - KNOWN_DOMAINS - local)
    if unknown:
        op = next(n.op_type for n in model.graph.node if n.domain == unknown[0])
        raise NormoptError(f"{path}: op '{op}' of domain '{unknown[0]}' is unknown to ONNX Runtime")

    me = os.path.abspath(path)
    external = False
    for tensor in W.iter_tensors(model):
        ref = W.external_ref(tensor)
        if ref is None or ref[0] == me:
            continue
        external = True
        location, offset, length = ref
        shown = os.path.relpath(location, os.path.dirname(me))
        if not os.path.isfile(location):
            raise NormoptError(f"{path}: external data file '{shown}' for tensor '{tensor.name}' is missing")
        fsize = os.path.getsize(location)
        needed = offset + (length if length is not None else W.tensor_nbytes(tensor))
        if needed > fsize or offset > fsize:
            raise NormoptError(
                f"{path}: external data file '{shown}' is shorter ({fsize} bytes) than "
                f"tensor '{tensor.name}' needs ({needed} bytes)"
            )
        if length is None:
            W.set_external(tensor, location, offset, W.tensor_nbytes(tensor))
    try:
        check_model(model)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NormoptError(f"{path}: invalid ONNX model: {first}") from None
    return LoadedModel(model=model, path=path, had_external_data=external, opset=opset,
                       weight_bytes=W.weight_bytes(model))


def check_model(model: onnx.ModelProto) -> None:
    """onnx.checker on the model's skeleton (in path mode, weights never loaded), with ORT's
    default-domain contrib ops treated as opaque.

    ORT registers SimplifiedLayerNormalization in the default domain; the ONNX checker has no
    schema for it. We check a copy whose contrib nodes are moved to com.microsoft, which the
    checker does not validate, so everything else is still checked. External references point
    at one empty sentinel file: the checker wants the file to exist, not its bytes."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    moved = False
    for g in _graphs(probe.graph):
        for node in g.node:
            if node.op_type in ORT_DEFAULT_DOMAIN_CONTRIB_OPS and node.domain in ("", "ai.onnx"):
                node.domain = "com.microsoft"
                moved = True
    if moved and not any(i.domain == "com.microsoft" for i in probe.opset_import):
        probe.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    with tempfile.TemporaryDirectory(prefix="normopt-check-") as tmp:
        open(os.path.join(tmp, "w.data"), "wb").close()
        for t in W.iter_tensors(probe):
            ref = W.external_ref(t)
            if ref is not None:
                W.set_external(t, "w.data", ref[1], ref[2] if ref[2] is not None else W.tensor_nbytes(t))
            elif W.tensor_nbytes(t) > W.INLINE_BYTES and t.HasField("raw_data"):
                # an in-memory model's weights: the checker reads dims and type, not bytes
                n = len(t.raw_data)
                W.set_external(t, "w.data", 0, n)
        p = os.path.join(tmp, "check.onnx")
        with open(p, "wb") as f:
            f.write(probe.SerializeToString())
        onnx.checker.check_model(p)


def _graphs(graph):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _graphs(attr.g)
            for g in attr.graphs:
                yield from _graphs(g)


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

    ``path`` can be loaded (for verification) before ``commit`` renames it into place. The model
    may be a skeleton: referenced weights are streamed into the output (write_model)."""

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
        self.external = external_data or W.weight_bytes(model) + model.ByteSize() > TWO_GB
        try:
            write_model(model, self.path, self.external, self.data_name)
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


# ---------------------------------------------------------------------------------------------
# streaming writer


class _Sources:
    """Open source files, by path, for copying referenced regions."""

    def __init__(self):
        self.files = {}

    def fd(self, path):
        if path not in self.files:
            self.files[path] = open(path, "rb")
        return self.files[path].fileno()

    def close(self):
        for f in self.files.values():
            f.close()


def _copy_region(sources, src_path, src_off, length, dst_fd, dst_off):
    """Copy bytes file to file without bringing them into this process (copy_file_range), or
    in 16 MiB blocks where the kernel cannot."""
    src = sources.fd(src_path)
    done = 0
    try:
        while done < length:
            n = os.copy_file_range(src, dst_fd, length - done, src_off + done, dst_off + done)
            if n == 0:
                raise OSError(f"{src_path}: short read at offset {src_off + done}")
            done += n
        return
    except (AttributeError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    while done < length:
        block = os.pread(src, min(16 << 20, length - done), src_off + done)
        if not block:
            raise OSError(f"{src_path}: short read at offset {src_off + done}")
        os.pwrite(dst_fd, block, dst_off + done)
        done += len(block)


def _inline(tensor: onnx.TensorProto) -> None:
    """Replace an absolute external reference by the tensor's bytes."""
    loc, off, length = W.external_ref(tensor)
    data = W.read_bytes(loc, off, length if length is not None else W.tensor_nbytes(tensor))
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.DEFAULT
    tensor.raw_data = data


def _raw_bytes(tensor: onnx.TensorProto) -> bytes:
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return onnx.numpy_helper.to_array(tensor).tobytes()


def _is_ref(tensor) -> bool:
    ref = W.external_ref(tensor)
    return ref is not None and os.path.isabs(ref[0])


def write_model(model: onnx.ModelProto, path: str, external: bool, data_name: str | None = None) -> None:
    """Write `model` (a skeleton with absolute references, or an in-memory model) to `path`,
    streaming referenced weights tensor by tensor; the caller's model is not modified.

    external=True: tensors of at least 1 KiB go to `data_name` beside `path`, each region
    copied once (tensors sharing a region share it), at 64 KiB-aligned offsets for tensors of
    1 MiB or more so ONNX Runtime can memory-map them. external=False: one protobuf; the main
    graph's referenced initializers are appended to it as they are read."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    sources = _Sources()
    try:
        for t in _attribute_tensors(out):  # Constant/attribute tensors stay inline
            if _is_ref(t):
                _inline(t)
        if external:
            _write_external(out, path, data_name or os.path.basename(path) + ".data", sources)
        else:
            _write_single(out, path, sources)
    finally:
        sources.close()


def _attribute_tensors(model):
    for g in _graphs(model.graph):
        for node in g.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors


def _write_external(out, path, data_name, sources):
    data_path = os.path.join(os.path.dirname(path), data_name)
    written = {}
    with open(data_path, "wb") as data:
        fd = data.fileno()
        end = 0
        for g in _graphs(out.graph):
            for t in g.initializer:
                n = W.tensor_nbytes(t)
                if n < W.INLINE_BYTES:
                    if _is_ref(t):
                        _inline(t)
                    continue
                ref = W.external_ref(t) if _is_ref(t) else None
                key = (ref[0], ref[1], n) if ref else None
                if key is not None and key in written:
                    W.set_external(t, data_name, written[key], n)
                    continue
                align = W.ALIGN_LARGE if n >= (1 << 20) else W.ALIGN_SMALL
                off = -(-end // align) * align
                if ref:
                    _copy_region(sources, ref[0], ref[1], n, fd, off)
                    written[key] = off
                else:
                    raw = _raw_bytes(t)
                    os.pwrite(fd, raw, off)
                    n = len(raw)
                W.set_external(t, data_name, off, n)
                end = off + n
        os.ftruncate(fd, end)
    with open(path, "wb") as f:
        f.write(out.SerializeToString())


def _write_single(out, path, sources):
    """One protobuf: the graph without its initializers, then every main-graph initializer as its
    own field entry, in order; a referenced one is its header followed by its bytes, copied from
    their file (protobuf reads repeated fields in the order they appear, wherever they are)."""
    main = out.graph
    for g in list(_graphs(main))[1:]:
        for t in g.initializer:
            if _is_ref(t):
                _inline(t)
    entries = []  # (prefix bytes, (loc, off, n) or None)
    for t in main.initializer:
        if _is_ref(t):
            loc, off, n = W.external_ref(t)
            head = onnx.TensorProto()
            head.CopyFrom(t)
            del head.external_data[:]
            head.ClearField("data_location")
            hb = head.SerializeToString()
            raw_hdr = W._key(9, 2) + W._enc_varint(n)
            entry_len = len(hb) + len(raw_hdr) + n
            entries.append((W._key(5, 2) + W._enc_varint(entry_len) + hb + raw_hdr, (loc, off, n)))
        else:
            tb = t.SerializeToString()
            entries.append((W._key(5, 2) + W._enc_varint(len(tb)) + tb, None))
    del main.initializer[:]
    graph_bytes = main.SerializeToString()
    graph_len = len(graph_bytes) + sum(len(h) + (r[2] if r else 0) for h, r in entries)
    out.ClearField("graph")
    model_bytes = out.SerializeToString()
    with open(path, "wb") as f:
        f.write(model_bytes + W._key(7, 2) + W._enc_varint(graph_len) + graph_bytes)
        f.flush()
        fd = f.fileno()
        pos = f.tell()
        for h, ref in entries:
            os.pwrite(fd, h, pos)
            pos += len(h)
            if ref:
                _copy_region(sources, ref[0], ref[1], ref[2], fd, pos)
                pos += ref[2]
        os.ftruncate(fd, pos)


def copy_model_files(in_path: str, out_path: str) -> str:
    """A byte-identical copy of a model and the external-data files it names, written atomically
    (used when no pass changed anything). Written into the input's own directory, the copy reads
    the input's data files where they are (the same names): they are never rewritten."""
    loaded = load_model(in_path)
    base = os.path.dirname(os.path.abspath(in_path))
    out_dir = os.path.dirname(os.path.abspath(out_path))
    files = sorted({W.external_ref(t)[0] for t in W.iter_tensors(loaded.model)
                    if W.external_ref(t) is not None and W.external_ref(t)[0] != os.path.abspath(in_path)})
    tmp = tempfile.mkdtemp(prefix=".normopt-", dir=out_dir)
    try:
        moves = []
        for src in files:
            rel = os.path.relpath(src, base)
            if os.path.abspath(os.path.join(out_dir, rel)) == src:
                continue  # the same directory: the input's data file is already where the copy looks
            dst = os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copyfile(src, dst)
            moves.append((dst, os.path.join(out_dir, rel)))
        staged = os.path.join(tmp, os.path.basename(out_path))
        shutil.copyfile(in_path, staged)
        for src, dst in moves:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.replace(src, dst)
        os.replace(staged, os.path.abspath(out_path))
    except OSError as exc:
        raise NormoptError(f"cannot write {out_path}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return os.path.abspath(out_path)
