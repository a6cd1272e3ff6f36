"""Weights by reference: a model's tensors stay where they are until a rewrite changes one.

normopt works on a *skeleton*: the model's structure, with every tensor larger than
``INLINE_BYTES`` stored as an external-data reference (absolute path, offset, length) instead
of its bytes. Passes, shape inference, the checker and the pass-to-pass refresh all see the
skeleton, so their time and memory grow with the graph, not with the bytes of the weights.

* :func:`read_skeleton` memory-maps an ``.onnx`` file and walks its protobuf wire format. Each
  large ``raw_data`` becomes a reference into the file itself; tensors already in external data
  keep their reference (made absolute). No weight byte is copied.
* :class:`RefValues` is the onnx-graphsurgeon lazy value behind such a constant. ``load()``
  returns a read-only memory-mapped view; nothing is cached, so reading a weight never keeps
  it resident.
* :class:`WeightStore` holds the spill file: a tensor that a rewrite creates and that is larger
  than ``SPILL_BYTES`` is written there as soon as it exists and referenced like any other.
* Weight math runs in float64 per tensor, in row blocks of at most ``CHUNK_BYTES`` for large
  tensors (:func:`blockwise`, :func:`vecmat`), and is cast back to the model's dtype.
"""

from __future__ import annotations

import contextlib
import contextvars
import mmap
import os
import tempfile

import numpy as np
import onnx
from onnx import TensorProto
from onnx_graphsurgeon.ir.tensor import LazyValues

INLINE_BYTES = 1024  # tensors up to this size stay inline in the skeleton (shape constants, scalars)
INLINE_INT_BYTES = 1 << 20  # int32/int64 tensors up to this size stay inline too: shape inference reads them
SPILL_BYTES = 1 << 20  # new tensors at least this large go to the spill file
CHUNK_BYTES = 64 << 20  # float64 working set of one block of an accumulation (a sum over rows: its grouping is part of its value)
ROW_BLOCK_BYTES = 1 << 20  # float64 working set of one block of row-independent math (blockwise): small enough to stay in cache
ALIGN_LARGE = 1 << 16  # offsets of tensors >= 1 MiB are aligned so ONNX Runtime can mmap them
ALIGN_SMALL = 64

_PACKED = {getattr(TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2", "FLOAT6E2M3", "FLOAT6E3M2") if hasattr(TensorProto, n)}


def np_dtype(data_type: int):
    """numpy dtype of an ONNX element type (bfloat16 and float8 through ml_dtypes), or None."""
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type))
    except Exception:
        return None


# ---------------------------------------------------------------------------------------------
# external references


def external_ref(tensor: TensorProto):
    """(location, offset, length) of an external-data tensor, else None."""
    if tensor.data_location != TensorProto.EXTERNAL:
        return None
    info = {e.key: e.value for e in tensor.external_data}
    if "location" not in info:
        return None
    return info["location"], int(info.get("offset", 0) or 0), (int(info["length"]) if info.get("length") else None)


def set_external(tensor: TensorProto, location: str, offset: int, length: int) -> None:
    tensor.ClearField("raw_data")
    for f in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        tensor.ClearField(f)
    del tensor.external_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(int(offset))), ("length", str(int(length)))):
        e = tensor.external_data.add()
        e.key, e.value = k, v


def tensor_nbytes(tensor: TensorProto) -> int:
    ref = external_ref(tensor)
    if ref is not None and ref[2] is not None:
        return ref[2]
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    if tensor.data_type == TensorProto.STRING:
        return sum(len(s) for s in tensor.string_data)
    n = expected_nbytes(tensor)
    return n if n is not None else element_count(tensor)


def read_bytes(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise OSError(f"{path}: {length} bytes at offset {offset} are past the end of the file")
    return data


def load_array(tensor: TensorProto, path: str, offset: int, length: int) -> np.ndarray:
    """The tensor's values from (path, offset, length): a read-only memmap view when the element
    type maps to numpy one to one, else decoded through onnx.numpy_helper."""
    shape = tuple(int(d) for d in tensor.dims)
    dt = np_dtype(tensor.data_type)
    if dt is not None and tensor.data_type not in _PACKED and dt.kind != "O":
        count = int(np.prod(shape)) if shape else 1
        if count * dt.itemsize != length:
            raise OSError(f"tensor '{tensor.name}': {length} bytes of data for shape {list(shape)} {dt}")
        if length == 0:
            return np.zeros(shape, dt)
        arr = np.memmap(path, dtype=dt, mode="r", offset=offset, shape=(count,))
        return arr.reshape(shape)
    probe = TensorProto()
    probe.CopyFrom(tensor)
    del probe.external_data[:]
    probe.data_location = TensorProto.DEFAULT
    probe.raw_data = read_bytes(path, offset, length)
    return np.asarray(onnx.numpy_helper.to_array(probe))


class RefValues(LazyValues):
    """The values of a constant that live in a file region (an initializer of the input model, an
    external-data file, or the spill file). ``tensor`` is the skeleton TensorProto (dims, type,
    name, an external reference with an absolute location); ``load()`` maps the bytes, read-only,
    and is not cached by normopt's lookups (see graph.const_value)."""

    def __init__(self, tensor: TensorProto):
        super().__init__(tensor)
        loc, off, length = external_ref(tensor)
        self.path, self.offset = loc, off
        self.length = length if length is not None else tensor_nbytes(tensor)
        self.nbytes = self.length

    def load(self):
        return load_array(self.tensor, self.path, self.offset, self.length)

    def __str__(self):
        return f"RefValues(shape={self.shape}, dtype={self.dtype}, {os.path.basename(self.path)}@{self.offset})"


# ---------------------------------------------------------------------------------------------
# the spill file


class WeightStore:
    """Where the tensors that rewrites create are kept: small ones in memory, large ones in one
    spill file (in ``directory``, by default the system's temp dir) referenced by offset."""

    def __init__(self, directory: str | None = None):
        self.directory = directory
        self._dir = None
        self._file = None
        self.path = None
        self.size = 0
        self.spilled = 0

    def _open(self):
        if self._file is None:
            self._dir = tempfile.mkdtemp(prefix=".normopt-spill-", dir=self.directory)
            self.path = os.path.join(self._dir, "spill.data")
            self._file = open(self.path, "wb+")

    def spill(self, name: str, array: np.ndarray) -> TensorProto:
        """Write `array` to the spill file; returns its skeleton TensorProto (absolute reference)."""
        self._open()
        array = np.ascontiguousarray(array)
        align = ALIGN_LARGE if array.nbytes >= (1 << 20) else ALIGN_SMALL
        off = -(-self.size // align) * align
        self._file.seek(off)
        self._file.write(memoryview(array.reshape(-1)).cast("B"))
        self._file.flush()
        self.size = off + array.nbytes
        self.spilled += array.nbytes
        t = TensorProto()
        t.name = name
        t.data_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
        t.dims.extend(array.shape)
        set_external(t, self.path, off, array.nbytes)
        return t

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._dir:
            import shutil

            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __del__(self):  # pragma: no cover - best effort
        with contextlib.suppress(Exception):
            self.close()


_STORE: contextvars.ContextVar = contextvars.ContextVar("normopt_store", default=None)


@contextlib.contextmanager
def using(store: WeightStore):
    """Make `store` the place where new large constants are spilled while the block runs."""
    token = _STORE.set(store)
    try:
        yield store
    finally:
        _STORE.reset(token)


def current_store() -> WeightStore | None:
    return _STORE.get()


# ---------------------------------------------------------------------------------------------
# float64 weight math in bounded blocks


def _rows_per_block(shape, itemsize=8, budget=None) -> int:
    if not shape:
        return 1
    row = int(np.prod(shape[1:])) * itemsize if len(shape) > 1 else itemsize
    return max(1, (CHUNK_BYTES if budget is None else budget) // max(row, 1))


def blockwise(values: np.ndarray, fn, dtype=None) -> np.ndarray:
    """out[rows] = fn(float64 block of values[rows], rows) over blocks of the first axis, cast to
    `dtype` (default: the values' dtype). fn must act on rows independently, so the block size
    (ROW_BLOCK_BYTES, which keeps a block's float64 copy and fn's temporaries in cache) decides
    no value. The cast is the assignment into the output (the same rounding as astype)."""
    values = np.asarray(values) if not isinstance(values, np.ndarray) else values
    dtype = np.dtype(dtype or values.dtype)
    if values.ndim == 0:
        return np.asarray(fn(values.astype(np.float64), slice(None))).astype(dtype)
    step = _rows_per_block(values.shape, budget=ROW_BLOCK_BYTES)
    out = None
    for start in range(0, values.shape[0], step):
        rows = slice(start, min(start + step, values.shape[0]))
        block = np.asarray(fn(np.asarray(values[rows], dtype=np.float64), rows))
        if out is None:
            out = np.empty((values.shape[0],) + block.shape[1:], dtype)
        out[rows] = block
    if out is None:  # zero rows
        out = np.asarray(fn(np.asarray(values, dtype=np.float64), slice(None))).astype(dtype)
    return out


def axis_sum(values: np.ndarray, axis: int) -> np.ndarray:
    """Float64 sum over `axis` (keepdims), accumulated block by block along axis 0."""
    if values.ndim == 0:
        return np.asarray(values, np.float64)
    if axis != 0:
        parts = []
        step = _rows_per_block(values.shape)
        for start in range(0, values.shape[0], step):
            parts.append(np.asarray(values[start:start + step], dtype=np.float64).sum(axis=axis, keepdims=True))
        return np.concatenate(parts, axis=0) if parts else np.zeros(values.shape[:axis] + (1,) + values.shape[axis + 1:])
    acc = np.zeros((1,) + values.shape[1:], np.float64)
    step = _rows_per_block(values.shape)
    for start in range(0, values.shape[0], step):
        acc += np.asarray(values[start:start + step], dtype=np.float64).sum(axis=0, keepdims=True)
    return acc


def vecmat(vec: np.ndarray, w: np.ndarray) -> np.ndarray:
    """float64 vec @ w for a 2-D w, accumulated over row blocks of w."""
    vec = np.asarray(vec, np.float64).reshape(-1)
    acc = np.zeros(w.shape[1], np.float64)
    step = _rows_per_block(w.shape)
    for start in range(0, w.shape[0], step):
        acc += vec[start:start + step] @ np.asarray(w[start:start + step], dtype=np.float64)
    return acc


# ---------------------------------------------------------------------------------------------
# reading a model file as a skeleton (protobuf wire format)


class WireError(ValueError):
    """The file is not a well-formed protobuf: the message says what and at which byte."""


class BadTensor(ValueError):
    """A tensor ONNX Runtime would refuse (its data, dims or type): the message names it."""


SELF = "\x00normopt:self\x00"  # the skeleton walker's location for a tensor's own raw_data region


def _varint(buf, pos, end):
    result = shift = 0
    start = pos
    while True:
        if pos >= end:
            raise WireError(f"truncated at byte {pos} (a number that starts at byte {start} runs past the end of its message)")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise WireError(f"a number at byte {start} is longer than 10 bytes")


def _enc_varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _enc_varint((field << 3) | wire)


def _skip(buf, pos, end, wire, start):
    """End of a field value of `wire` type that starts at `pos` (groups, wire types 3 and 4,
    are skipped to their matching end marker, as protobuf does with unknown fields)."""
    if wire == 0:
        return _varint(buf, pos, end)[1]
    if wire == 1:
        return pos + 8
    if wire == 2:
        n, pos = _varint(buf, pos, end)
        return pos + n
    if wire == 5:
        return pos + 4
    if wire == 3:
        groups = [_varint(buf, start, end)[0] >> 3]
        while groups:
            if pos >= end:
                raise WireError(f"truncated at byte {pos} (the group field {groups[0]} that starts at byte {start} is never closed)")
            at = pos
            key, pos = _varint(buf, pos, end)
            field, w = key >> 3, key & 7
            if w == 4:
                if field != groups[-1]:
                    raise WireError(f"byte {at}: a group's end marker (field {field}) does not match its start (field {groups[-1]})")
                groups.pop()
            elif w == 3:
                groups.append(field)
            elif w in (0, 1, 2, 5):
                pos = _skip(buf, pos, end, w, at)
            else:
                raise WireError(f"byte {at}: invalid protobuf wire type {w}")
            if pos > end:
                raise WireError(f"truncated at byte {end} (a field that starts at byte {at} runs past the end of its message)")
        return pos
    if wire == 4:
        raise WireError(f"byte {start}: a group's end marker without its start")
    raise WireError(f"byte {start}: invalid protobuf wire type {wire}")


def _fields(buf, pos, end):
    """Yield (field, wire type, value start, value end, field start) over a message."""
    while pos < end:
        start = pos
        key = buf[pos]  # one-byte numbers (most keys and lengths) read inline, as _varint would
        if key < 0x80:
            pos += 1
        else:
            key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise WireError(f"byte {start}: field number 0 (not a protobuf message)")
        if wire == 2:
            n = buf[pos] if pos < end else 0x80
            if n < 0x80:
                pos += 1
            else:
                n, pos = _varint(buf, pos, end)
            pos2 = pos + n
        else:
            pos2 = _skip(buf, pos, end, wire, start)
        if pos2 > end:
            raise WireError(f"truncated at byte {end} (the field that starts at byte {start} needs {pos2 - start} bytes)")
        yield field, wire, pos, pos2, start
        pos = pos2


def _ld(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _enc_varint(len(payload)) + payload


class _Walker:
    """Rewrites ModelProto bytes: every TensorProto whose raw_data is larger than the threshold
    becomes an external reference into the file itself; everything else is copied as is."""

    # (message, field) -> submessage kind
    GRAPH = {1: "node", 5: "tensor"}  # GraphProto.node, .initializer
    NODE = {5: "attr"}
    ATTR = {5: "tensor", 6: "graph", 10: "tensor", 11: "graph"}
    MODEL = {7: "graph"}
    FUNCTION = {7: "node"}  # FunctionProto.node
    TABLES = {"model": {**MODEL, 25: "function"}, "graph": GRAPH, "node": NODE, "attr": ATTR, "function": FUNCTION}

    def __init__(self, buf, path, threshold):
        self.buf, self.path, self.threshold = buf, path, threshold
        self.refs = 0

    def message(self, kind, pos, end) -> bytes:
        if kind == "tensor":
            return self.tensor(pos, end)
        buf = self.buf
        if kind == "node" and buf.find(b"\x2a", pos, end) < 0:
            return None  # no byte 0x2a, so no NodeProto.attribute key (field 5, length-delimited): nothing to rewrite
        table = self.TABLES[kind]
        out, copied = None, pos  # out: the pieces so far, once a submessage changed; copied: bytes up to here are in out
        for field, wire, a, b, start in _fields(buf, pos, end):
            if wire != 2:
                continue
            sub = table.get(field)
            if sub is None:
                continue
            new = self.message(sub, a, b)
            if new is not None:
                if out is None:
                    out = []
                out.append(bytes(buf[copied:start]))
                out.append(_ld(field, new))
                copied = b
        if out is None:
            return None
        out.append(bytes(buf[copied:end]))
        return b"".join(out)

    def tensor(self, pos, end):
        raw = None
        external = False
        dtype = 0
        for field, wire, a, b, start in _fields(self.buf, pos, end):
            if field == 9 and wire == 2:
                raw = (a, b, start)
            elif field == 2 and wire == 0:
                dtype = _varint(self.buf, a, b)[0]
            elif field == 14 and wire == 0 and _varint(self.buf, a, b)[0] == TensorProto.EXTERNAL:
                external = True
        limit = max(self.threshold, INLINE_INT_BYTES) if dtype in (TensorProto.INT64, TensorProto.INT32) else self.threshold
        if raw is None or external or raw[1] - raw[0] <= limit:
            return None
        out = []
        for field, wire, a, b, start in _fields(self.buf, pos, end):
            if field in (9, 13, 14):
                continue
            out.append(bytes(self.buf[start:b]))
        for k, v in (("location", SELF), ("offset", str(raw[0])), ("length", str(raw[1] - raw[0]))):
            out.append(_ld(13, _ld(1, k.encode()) + _ld(2, v.encode())))
        out.append(_key(14, 0) + _enc_varint(TensorProto.EXTERNAL))
        self.refs += 1
        return b"".join(out)


def read_skeleton(path: str, threshold: int = INLINE_BYTES) -> onnx.ModelProto:
    """The model at `path` with every tensor over `threshold` bytes as an absolute external
    reference (its own raw_data region, or the external-data file it already names); nothing
    but the structure is read into memory."""
    path = os.path.abspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size == 0:
            raise WireError("empty file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            walker = _Walker(mm, path, threshold)
            new = walker.message("model", 0, size)
            data = bytes(mm) if new is None else new
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as exc:  # protobuf's DecodeError: a field of the wrong type, bad UTF-8, ...
        raise WireError(f"protobuf cannot parse it ({' '.join(str(exc).split()) or type(exc).__name__})") from None
    base = os.path.dirname(path)
    for t in iter_tensors(model):
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        if isinstance(t.name, bytes):
            raise BadTensor("a tensor's name is not UTF-8 text")
        if info.get("location") == SELF:  # our own reference to the tensor's raw_data
            if t.data_type == TensorProto.STRING:
                raise BadTensor(f"tensor '{t.name}': a STRING tensor cannot hold raw_data")
            set_external(t, path, int(info["offset"]), int(info["length"]))
            continue
        loc, off, length = parse_external(t, path)
        set_external(t, loc, off, length)
    return model


def _nonneg(tensor, key, value):
    try:
        v = int(value)
    except ValueError:
        raise BadTensor(f"tensor '{tensor.name}': external data {key} '{value}' is not a number") from None
    if v < 0:
        raise BadTensor(f"tensor '{tensor.name}': external data {key} {v} is negative")
    return v


def parse_external(tensor: TensorProto, model_path: str):
    """(absolute location, offset, length) of a tensor's external data as its model file states
    it, checked as ONNX Runtime checks it: a relative location inside the model's folder, never
    the model file itself, offset and length non-negative integers. A missing length is the
    size the tensor's dims and type need. Raises BadTensor."""
    info = {e.key: e.value for e in tensor.external_data}
    if any(isinstance(v, bytes) for kv in info.items() for v in kv):
        raise BadTensor(f"tensor '{tensor.name}': its external data keys or values are not UTF-8 text")
    where = info.get("location", "")
    if not where:
        raise BadTensor(f"tensor '{tensor.name}': external data without a location")
    if os.path.isabs(where) or where.startswith(("/", "\\")):
        raise BadTensor(f"tensor '{tensor.name}': external data location '{where}' is an absolute path "
                        "(ONNX Runtime reads external data only from the model's folder)")
    rel = os.path.normpath(where)
    if rel == ".." or rel.startswith(".." + os.sep) or rel == ".":
        raise BadTensor(f"tensor '{tensor.name}': external data location '{where}' is outside the model's folder")
    base = os.path.dirname(model_path)
    loc = os.path.join(base, rel)
    if os.path.abspath(loc) == os.path.abspath(model_path) or (
            os.path.exists(loc) and os.path.samefile(loc, model_path)):
        raise BadTensor(f"tensor '{tensor.name}': external data location '{where}' is the model file itself")
    off = _nonneg(tensor, "offset", info.get("offset") or "0")
    if info.get("length") not in (None, ""):
        length = _nonneg(tensor, "length", info["length"])
    else:
        length = expected_nbytes(tensor)
        if length is None:
            raise BadTensor(f"tensor '{tensor.name}': a {TensorProto.DataType.Name(tensor.data_type)} tensor cannot be external data")
    return loc, off, length


_INT4ISH = {getattr(TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(TensorProto, n)}
_INT2ISH = {getattr(TensorProto, n) for n in ("INT2", "UINT2") if hasattr(TensorProto, n)}
_FLOAT6 = {getattr(TensorProto, n) for n in ("FLOAT6E2M3", "FLOAT6E3M2") if hasattr(TensorProto, n)}


def element_count(tensor: TensorProto) -> int:
    n = 1
    for d in tensor.dims:
        n *= int(d)
    return n


def expected_nbytes(tensor: TensorProto):
    """Bytes of the tensor's data as raw_data or external data (packed sub-byte types
    included), or None for STRING (or a type with no fixed size)."""
    n = element_count(tensor)
    if tensor.data_type in _INT4ISH:
        return (n + 1) // 2
    if tensor.data_type in _INT2ISH:
        return (n + 3) // 4
    if tensor.data_type in _FLOAT6:
        return (6 * n + 7) // 8
    dt = np_dtype(tensor.data_type)
    if dt is None or dt.kind == "O" or tensor.data_type == TensorProto.STRING:
        return None
    return n * dt.itemsize


def iter_tensors(model_or_graph):
    """Every TensorProto of a model: initializers and Constant/attribute tensors, subgraphs too."""
    graph = model_or_graph.graph if isinstance(model_or_graph, onnx.ModelProto) else model_or_graph
    yield from _graph_tensors(graph)
    if isinstance(model_or_graph, onnx.ModelProto):
        for fn in model_or_graph.functions:
            for node in fn.node:
                yield from _node_tensors(node)


def _graph_tensors(graph):
    yield from graph.initializer
    for node in graph.node:
        if node.attribute:  # (most nodes have none: no generator for them)
            yield from _node_tensors(node)


def _node_tensors(node):
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("g"):
            yield from _graph_tensors(attr.g)
        for g in attr.graphs:
            yield from _graph_tensors(g)


def weight_bytes(model: onnx.ModelProto) -> int:
    return sum(tensor_nbytes(t) for t in iter_tensors(model))


def matvec(w: np.ndarray, vec: np.ndarray) -> np.ndarray:
    """float64 w @ vec for a 2-D w, block by block over the rows of w."""
    vec = np.asarray(vec, np.float64).reshape(-1)
    out = np.empty(w.shape[0], np.float64)
    step = _rows_per_block(w.shape)
    for start in range(0, w.shape[0], step):
        out[start:start + step] = np.asarray(w[start:start + step], dtype=np.float64) @ vec
    return out


def center(values: np.ndarray, axis) -> np.ndarray:
    """values - mean(values, axis) in float64, cast back; axis None gives zeros (a per-token
    constant is its own mean). Block by block along axis 0, so a large table is never held in
    float64 whole."""
    values = np.asarray(values) if not isinstance(values, np.ndarray) else values
    if axis is None:
        return np.zeros(values.shape, values.dtype)
    axis = axis % max(values.ndim, 1)
    if values.ndim == 0:
        return np.zeros((), values.dtype)
    if axis == 0:
        mean = axis_sum(values, 0) / values.shape[0]
        return blockwise(values, lambda b, rows: b - mean)
    return blockwise(values, lambda b, rows: b - b.mean(axis=axis, keepdims=True))


def scale_axis(values: np.ndarray, vec: np.ndarray, axis: int) -> np.ndarray:
    """values * vec along `axis` (vec has one entry per index of that axis), in float64, cast
    back; block by block along axis 0."""
    values = np.asarray(values) if not isinstance(values, np.ndarray) else values
    vec = np.asarray(vec, np.float64).reshape(-1)
    if values.ndim == 0:
        return np.asarray(values.astype(np.float64) * vec.reshape(()) if vec.size == 1 else values).astype(values.dtype)
    axis = axis % values.ndim
    shape = [1] * values.ndim
    shape[axis] = -1
    v = vec.reshape(shape)
    if axis == 0:
        return blockwise(values, lambda b, rows: b * v[rows])
    return blockwise(values, lambda b, rows: b * v)


def scale_center(values: np.ndarray, vec: np.ndarray, scale_axis: int, center_axis: int) -> np.ndarray:
    """center(values * vec along scale_axis, center_axis), in float64 with one rounding at the
    end: scaling, rounding, then centering would round twice, the first time relative to the
    uncentered element, which a small centered element does not cover. Block by block along
    axis 0 (a mean along axis 0 takes one pass first)."""
    values = np.asarray(values) if not isinstance(values, np.ndarray) else values
    if values.ndim == 0:
        return center(values, center_axis)
    vec = np.asarray(vec, np.float64).reshape(-1)
    sa, ca = scale_axis % values.ndim, center_axis % values.ndim
    shape = [1] * values.ndim
    shape[sa] = -1
    v = vec.reshape(shape)

    def scaled(b, rows):
        return b * (v[rows] if sa == 0 else v)

    if ca == 0:
        total = np.zeros((1,) + values.shape[1:], np.float64)
        step = _rows_per_block(values.shape)
        for start in range(0, values.shape[0], step):
            rows = slice(start, min(start + step, values.shape[0]))
            total += scaled(np.asarray(values[rows], np.float64), rows).sum(axis=0, keepdims=True)
        mean = total / max(values.shape[0], 1)
        return blockwise(values, lambda b, rows: scaled(b, rows) - mean)

    def one(b, rows):
        x = scaled(b, rows)
        return x - x.mean(axis=ca, keepdims=True)

    return blockwise(values, one)


def is_float(dtype) -> bool:
    """A floating-point element type, bfloat16 and the float8 types (ml_dtypes) included."""
    if dtype is None:
        return False
    dt = np.dtype(dtype)
    return dt.kind == "f" or dt.name.startswith(("bfloat16", "float8", "float4"))
