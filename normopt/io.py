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

from . import paths as P
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
    data_files: list | None = None  # the other files its tensors reference (sorted), as load_model found them


def default_opset(model: onnx.ModelProto) -> int | None:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return None


def load_model(path: str, load_external: bool = False, min_opset: int = MIN_LOADABLE_OPSET,
               on_parsed=None) -> LoadedModel:
    """Read and validate a model as a *skeleton* (weights.read_skeleton): tensors over 1 KiB are
    references into the model file or its external-data files, never loaded. Every tensor is
    checked as ONNX Runtime would check it (validate_tensors), without reading external data.
    Raises NormoptError with one line on any bad input. (load_external is accepted for
    compatibility and ignored: weights are always read on demand.)

    on_parsed(path, weight_bytes), where given, is called once the file has parsed and its
    tensors are listed, before the remaining checks (the text check, the tensor checks, the ONNX
    checker): optimize starts ONNX Runtime's load check there, so that it overlaps them. The
    problems found are the same, in the same order."""
    if not os.path.lexists(path):
        raise NormoptError(f"{path}: no such file")
    if not os.path.exists(path):
        raise NormoptError(f"{path}: a symlink to a file that does not exist")
    if os.path.isdir(path):
        raise NormoptError(f"{path}: is a directory, not an ONNX model file")
    if not os.path.isfile(path):
        raise NormoptError(f"{path}: not a regular file (a device, FIFO or socket), not an ONNX model file")
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
    except W.BadTensor as exc:
        raise NormoptError(f"{path}: {exc}") from None
    except W.WireError as exc:
        raise NormoptError(f"{path}: not a valid ONNX model: {exc}") from None
    except OSError as exc:
        raise NormoptError(f"{path}: cannot read it ({exc.strerror or exc})") from None
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
    tensors = list(all_tensors(model))  # one walk for the checks, the data files and the weight bytes
    try:
        weight_bytes = sum(W.tensor_nbytes(t) for t, what in tensors if what == "tensor")  # weights.weight_bytes(model)
    except Exception:  # a tensor the checks below refuse
        weight_bytes = None
    if on_parsed is not None and weight_bytes is not None and weight_bytes >= 0:
        on_parsed(path, weight_bytes)
    problem = text_problem(model)  # reported before a tensor's problem
    if not problem:
        problem = validate_tensors(model, path, tensors)
    if problem:
        raise NormoptError(f"{path}: {problem}")
    me = os.path.abspath(path)
    dense = [t for t, what in tensors if what == "tensor"]  # weights.iter_tensors(model), in its order
    refs = [W.external_ref(t) for t in dense]
    data_files = sorted({ref[0] for ref in refs if ref is not None and ref[0] != me})
    external = bool(data_files)
    try:
        check_model(model)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NormoptError(f"{path}: invalid ONNX model: {first}") from None
    return LoadedModel(model=model, path=path, had_external_data=external, opset=opset,
                       weight_bytes=weight_bytes if weight_bytes is not None else sum(W.tensor_nbytes(t) for t in dense),
                       data_files=data_files)


def text_problem(model: onnx.ModelProto) -> str | None:
    """The first name or type string that is not UTF-8 text (protobuf hands such a string over
    as bytes; ONNX requires UTF-8), or None. Names of nodes, values, tensors, attributes, ops,
    domains, functions and metadata are checked.

    "First" in this order: the header; the functions' signatures; every graph's own names
    (graphs in preorder, the main graph's tree, then the subgraphs in functions), then its
    initializers' names; then the nodes, graph by graph in that order, then the functions' own
    nodes. One walk over the nodes gives it: a graph's names are checked when the walk enters
    it (the first bad one is the answer), and each graph keeps its first bad node."""
    def bad(*xs):
        return any(isinstance(x, bytes) for x in xs)

    if bad(model.producer_name, model.producer_version, model.domain, model.doc_string) or any(
            bad(o.domain) for o in model.opset_import) or any(bad(p.key, p.value) for p in model.metadata_props):
        return "the model's header holds text that is not UTF-8"
    for fn in model.functions:
        if bad(fn.name, fn.domain, *fn.input, *fn.output, *fn.attribute):
            return "a function's name or signature is not UTF-8 text"

    def node_problem(n):
        if bytes in set(map(type, (n.name, n.op_type, n.domain, n.doc_string, *n.input, *n.output))):
            return f"node {n.name!r}: a name, op type or domain is not UTF-8 text"
        for a in n.attribute:
            if bad(a.name, a.ref_attr_name, a.doc_string) or (a.HasField("t") and bad(a.t.name)):
                return f"node {n.name!r}: an attribute name is not UTF-8 text"
        return None

    count = [0]  # graphs entered (a graph's place in the order)
    first = {}  # graph's place -> its first bad node
    best = [None]  # the lowest place in `first`: a node of a later graph cannot be the answer

    def subgraphs(n):  # (recursion depth: the nesting of subgraphs, never the graph's depth)
        for a in n.attribute:
            if a.HasField("g"):
                problem = graph(a.g)
                if problem:
                    return problem
            for sg in a.graphs:
                problem = graph(sg)
                if problem:
                    return problem
        return None

    def graph(g):
        place = count[0]
        count[0] += 1
        if bad(g.name, g.doc_string) or any(bad(v.name) for v in list(g.input) + list(g.output) + list(g.value_info)):
            return "a graph's name or value name is not UTF-8 text"
        if any(bad(t.name) for t in g.initializer) or any(bad(s.values.name) for s in g.sparse_initializer):
            return "an initializer's name is not UTF-8 text"
        for n in g.node:
            if place not in first and (best[0] is None or place < best[0]):
                problem = node_problem(n)
                if problem:
                    first[place] = problem
                    best[0] = place if best[0] is None else min(best[0], place)
            if len(n.attribute):
                problem = subgraphs(n)
                if problem:
                    return problem
        return None

    problem = graph(model.graph)
    if problem:
        return problem
    for fn in model.functions:  # the subgraphs of the functions' nodes follow the main graph's tree
        for n in fn.node:
            problem = subgraphs(n)
            if problem:
                return problem
    if first:
        return first[min(first)]
    for fn in model.functions:
        for n in fn.node:
            problem = node_problem(n)
            if problem:
                return problem
    return None


KNOWN_DTYPES = set(onnx.TensorProto.DataType.values()) - {onnx.TensorProto.UNDEFINED}
_T = onnx.TensorProto
# where a tensor's values are when they are not raw bytes: field, values per element
_TYPED_FIELD = {_T.FLOAT: ("float_data", 1), _T.COMPLEX64: ("float_data", 2), _T.DOUBLE: ("double_data", 1),
                _T.COMPLEX128: ("double_data", 2), _T.INT64: ("int64_data", 1), _T.UINT32: ("uint64_data", 1),
                _T.UINT64: ("uint64_data", 1), _T.STRING: ("string_data", 1)}
MAX_ELEMENT_BYTES = 1 << 62  # a tensor's dims beyond this overflow ONNX Runtime's size arithmetic


def all_tensors(model: onnx.ModelProto):
    """(tensor, what) for every TensorProto of the model: initializers, Constant and other
    attribute tensors, subgraphs, functions (in weights.iter_tensors' order), then the values
    and indices of sparse tensors. One walk over the nodes (see _tensor_lists)."""
    dense, sparse = _tensor_lists(model)
    for t in dense:
        yield t, "tensor"
    for s in sparse:
        yield s.values, "sparse tensor values"
        yield s.indices, "sparse tensor indices"


def _tensor_lists(model: onnx.ModelProto, graphs: list | None = None, attribute_tensors: list | None = None):
    """(dense, sparse) in one walk over every graph's nodes (only nodes with attributes are
    entered): dense, every TensorProto in weights.iter_tensors' order (a graph's initializers,
    then its nodes' attribute tensors, a subgraph's in place); sparse, every SparseTensorProto:
    the sparse initializers of every graph, graphs in preorder (the main graph's, then those in
    functions), then the sparse attributes of their nodes, graph by graph, then those of the
    functions' own nodes. ``graphs``, where given, gets the main graph and its subgraphs, in
    _graphs' order (the functions' subgraphs are not added); ``attribute_tensors``, the tensor
    attributes (t, tensors) of those graphs' nodes (a subgraph's where it is met)."""
    dense, sparse_inits, per_graph, fn_tail = [], [], [], []
    sink = [graphs if graphs is not None else []]  # where each graph met goes
    attr_sink = [attribute_tensors if attribute_tensors is not None else []]

    def node_tensors(node, mine):
        for attr in node.attribute:
            if attr.HasField("t"):
                dense.append(attr.t)
                attr_sink[0].append(attr.t)
            if len(attr.tensors):
                dense.extend(attr.tensors)
                attr_sink[0].extend(attr.tensors)
            if attr.HasField("sparse_tensor"):
                mine.append(attr.sparse_tensor)
            if len(attr.sparse_tensors):
                mine.extend(attr.sparse_tensors)
            if attr.HasField("g"):
                graph_tensors(attr.g)
            for g in attr.graphs:
                graph_tensors(g)

    def graph_tensors(g):  # recursion depth: the nesting of subgraphs, never the graph's depth
        dense.extend(g.initializer)
        if len(g.sparse_initializer):
            sparse_inits.extend(g.sparse_initializer)
        mine = []
        per_graph.append(mine)
        sink[0].append(g)
        for node in g.node:
            if node.attribute:  # (most nodes have none)
                node_tensors(node, mine)

    graph_tensors(model.graph)
    sink[0] = attr_sink[0] = []  # the functions' subgraphs and nodes are not the caller's
    for fn in model.functions:
        for node in fn.node:
            node_tensors(node, fn_tail)
    sparse = sparse_inits
    for mine in per_graph:
        sparse.extend(mine)
    sparse.extend(fn_tail)
    return dense, sparse


def validate_tensors(model: onnx.ModelProto, path: str, tensors=None) -> str | None:
    """The first problem that makes ONNX Runtime refuse one of the model's tensors, in words, or
    None: an unknown data_type, a negative or overflowing dim, a STRING tensor with raw or
    external data, a data size that does not match dims x type (raw_data, the typed fields, or
    external data: length, and the file's size against offset + length, never read), an
    external-data file that is missing or not a regular file. ``tensors``: all_tensors(model)
    as a list, where the caller has it."""
    for t, what in (all_tensors(model) if tensors is None else tensors):
        problem = tensor_problem(t, path)
        if problem:
            return f"{what} '{t.name}': {problem}" if t.name or what == "tensor" else f"{what}: {problem}"
    return None


def tensor_problem(t: onnx.TensorProto, path: str) -> str | None:
    if t.data_type not in KNOWN_DTYPES:
        return f"unknown data_type {t.data_type}"
    dims = list(t.dims)
    if any(d < 0 for d in dims):
        return f"negative dimension in dims {dims}"
    n = W.element_count(t)
    dt = W.np_dtype(t.data_type)
    if n * max(1, dt.itemsize if dt is not None else 1) >= MAX_ELEMENT_BYTES:
        return f"dims {dims} overflow ({n} elements)"
    type_name = _T.DataType.Name(t.data_type)
    ref = W.external_ref(t)
    if t.data_location == _T.EXTERNAL and ref is None:
        return "marked as external data without a location"
    if t.data_type == _T.STRING:
        if ref is not None:
            return "a STRING tensor cannot be external data"
        if t.HasField("raw_data"):
            return "a STRING tensor cannot hold raw_data"
    expected = W.expected_nbytes(t)
    if ref is not None:
        loc, off, length = ref
        shown = os.path.relpath(loc, os.path.dirname(os.path.abspath(path)))
        if length != expected:
            if loc == os.path.abspath(path):
                return f"raw_data holds {length} bytes, but dims {dims} of {type_name} need {expected}"
            return f"external data length {length} does not match dims {dims} of {type_name} ({expected} bytes)"
        try:
            st = os.stat(loc)
        except OSError:
            return f"external data file '{shown}' is missing"
        if not os.path.isfile(loc):
            return f"external data file '{shown}' is not a regular file"
        if off + length > st.st_size:
            return (f"the data runs past the end of the file '{shown}' "
                    f"(offset {off} + length {length} > {st.st_size} bytes)")
        return None
    if t.HasField("raw_data"):
        if len(t.raw_data) != expected:
            return f"raw_data holds {len(t.raw_data)} bytes, but dims {dims} of {type_name} need {expected}"
        return None
    name, per = _TYPED_FIELD.get(t.data_type, ("int32_data", 1))
    want = n * per
    if t.data_type in W._INT4ISH:
        want = (n + 1) // 2
    elif t.data_type in W._INT2ISH | W._FLOAT6:
        return None  # packing of the typed field not checked here (the checker and ORT see it)
    have = len(getattr(t, name))
    if have != want:
        return f"holds {have} values in {name}, but dims {dims} need {want}"
    return None


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
    graphs = []
    tensors, _ = _tensor_lists(probe, graphs)  # one walk: weights.iter_tensors(probe) and _graphs(probe.graph)
    for g in graphs:
        for node in g.node:
            if node.op_type in ORT_DEFAULT_DOMAIN_CONTRIB_OPS and node.domain in ("", "ai.onnx"):
                node.domain = "com.microsoft"
                moved = True
        # the IR lets a tensor's type omit its shape (any shape), and ONNX Runtime loads such a
        # model; the checker wants the field present: it gets one it does not read (no shape
        # inference runs here)
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            if vi.type.HasField("tensor_type") and not vi.type.tensor_type.HasField("shape"):
                vi.type.tensor_type.shape.SetInParent()
    if moved and not any(i.domain == "com.microsoft" for i in probe.opset_import):
        probe.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    with tempfile.TemporaryDirectory(prefix="normopt-check-") as tmp:
        open(os.path.join(tmp, "w.data"), "wb").close()
        for t in tensors:
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


def data_name_for(out_path: str) -> str:
    """The file name of a written model's external data: '<model file name>.data'."""
    return os.path.basename(out_path) + ".data"


def needs_external(loaded: LoadedModel) -> bool:
    """Is the output written with external data? When the input has it, or would not fit one
    protobuf."""
    return loaded.had_external_data or loaded.weight_bytes + loaded.model.ByteSize() > TWO_GB


def plan_model_output(plan: P.Plan, in_path: str, loaded: LoadedModel, out_path: str, external: bool) -> P.Target:
    """Add the files `optimize` may write for OUT to the plan: the model, its data file (when
    written with external data), and the data files an unchanged copy of the input needs beside
    it (the input's own names, unless they are the input's files themselves)."""
    target = plan.write(out_path, "-o")
    given_dir = os.path.dirname(os.path.abspath(out_path))
    copies = []
    me = os.path.abspath(in_path)
    base = os.path.dirname(me)
    files = loaded.data_files if os.path.abspath(loaded.path) == me else None
    if files is None:
        files = sorted({W.external_ref(t)[0] for t in W.iter_tensors(loaded.model)
                        if W.external_ref(t) is not None and W.external_ref(t)[0] != me})
    for src in files:
        dst = os.path.join(given_dir, os.path.relpath(src, base))
        if not P._same(dst, src):
            copies.append((src, dst))
    if (external or copies) and os.path.realpath(given_dir) != os.path.dirname(target.final):
        raise NormoptError(f"-o {out_path}: is a link into another folder, and the output has external data that "
                           "must sit beside the model file: give the link's target as -o")
    data = None
    if external:
        data = plan.write(os.path.join(given_dir, data_name_for(out_path)), "the output's data file", owner=out_path)
    for src, dst in copies:
        if data is not None and P._same(dst, data.given):
            data.source = src  # the same place on either path: one target, which the unchanged copy fills
            continue
        plan.write(dst, "the unchanged copy's data file", owner=out_path, required=False, mkdirs=True, source=src)
    return target


def check_output_path(in_path: str, out_path: str) -> None:
    """Refuse an output path that is the input, an input's data file, a special file, or in a
    folder that is missing or cannot be written (see normopt.paths)."""
    loaded = load_model(in_path)
    plan = P.Plan()
    plan.read_model(in_path, loaded.model)
    plan_model_output(plan, in_path, loaded, out_path, needs_external(loaded))
    plan.check()


ORT_CHECK_BYTES = 2 << 30  # inputs with more weight bytes are checked without a session (docs/files.md)


def ort_check(loaded: LoadedModel) -> None:
    """ONNX Runtime loads the input once (graph optimizations off, one thread): a model it
    refuses is bad input, not something to pass on. A model whose weights exceed
    ORT_CHECK_BYTES gets the skeleton checks and the ONNX checker only. A kernel ORT's CPU
    build lacks is not a defect of the file."""
    OrtCheck(loaded).result()


class OrtCheck:
    """ort_check beside the passes, started before they run and joined before anything is
    written: session creation is native code that releases the GIL, so it overlaps with the
    pipeline instead of adding to it. ``result()`` raises NormoptError if ORT refuses the input.

    keep=True (optimize, where verification follows): in a thread, the session built with the
    options verification's session of the original has (providers.session_options:
    ORT_DISABLE_ALL, the default threads) and kept, for ``take_session()`` to hand on, so that
    the input's file is loaded once per run, not once for this check and again for
    verification; ``release()`` drops it.

    The check runs in a thread of this process, never a forked child: a fork beside the caller's
    threads (an application calling the API from a pool) can hang the child on a lock one of them
    held. On a 100k-node graph the session's destructor holds the GIL about a second while it
    frees the graph; that stall is the price."""

    def __init__(self, loaded, keep: bool = False):
        """loaded: a LoadedModel, or anything with its `path` and `weight_bytes` (load_model's
        on_parsed hands those over before the model is fully checked)."""
        import threading

        self.loaded, self.error = loaded, None
        self.keep, self.session = keep, None
        self.seconds = 0.0
        self.thread = None
        self._lock = threading.Lock()
        if loaded.weight_bytes <= ORT_CHECK_BYTES:
            self.thread = threading.Thread(target=self._run, name="normopt-ort-check", daemon=True)
            self.thread.start()

    def _build(self):
        """(session, None), (None, None) where ORT lacks a kernel (no defect of the file), or
        (None, error)."""
        import onnxruntime as ort

        from .runtime_tests.providers import session_options

        # a kept session has verification's options (the default threads); a check alone, one thread
        so = session_options("disable", threads=None if self.keep else 1, spin=False)  # equivalence.SPIN
        try:
            return ort.InferenceSession(os.path.abspath(self.loaded.path), sess_options=so,
                                        providers=["CPUExecutionProvider"]), None
        except Exception as exc:
            if type(exc).__name__ == "NotImplemented":
                return None, None
            first = " ".join(str(exc).strip().splitlines()[0].split()) if str(exc).strip() else type(exc).__name__
            return None, f"{self.loaded.path}: ONNX Runtime refuses to load it: {first[:300]}"

    def _run(self):
        import time

        t0 = time.perf_counter()
        try:
            sess, self.error = self._build()
        finally:
            self.seconds = time.perf_counter() - t0
        with self._lock:
            if self.keep:
                self.session = sess
        del sess

    def join(self) -> None:
        t = self.thread  # joined from the main thread and from verification's (take_session)
        if t is not None:
            t.join()
            self.thread = None

    def result(self) -> None:
        self.join()
        if self.error:
            raise NormoptError(self.error)

    def take_session(self):
        """The kept session (joined first), or None; the caller owns it from here."""
        self.join()
        with self._lock:
            sess, self.session, self.keep = self.session, None, False
        return sess

    def release(self) -> None:
        """Drop the kept session, now or as soon as it is built."""
        with self._lock:
            self.keep, self.session = False, None


class StagedModel:
    """A model written to a temporary directory beside its destination.

    ``path`` can be loaded (for verification) before ``commit`` renames it into place. The model
    may be a skeleton: referenced weights are streamed into the output (write_model). Its
    places come from a checked :class:`normopt.paths.Plan` (one is made when none is given)."""

    def __init__(self, model: onnx.ModelProto, out_path: str, external_data: bool, plan: P.Plan | None = None):
        self.external = external_data or W.weight_bytes(model) + model.ByteSize() > TWO_GB
        if plan is None:
            plan = P.Plan()
            for t in W.iter_tensors(model):  # a skeleton reads its weights from these files
                ref = W.external_ref(t)
                if ref is not None and os.path.isabs(ref[0]):
                    plan.read(ref[0], f"the file {ref[0]} that holds the model's weights")
            plan.write(out_path, "-o")
        self.plan = plan
        self.target = next(t for t in plan.writes if t.option == "-o")
        self.out_path = self.target.final
        self.data_name = data_name_for(self.target.given)
        self.data_target = next((t for t in plan.writes if t.option == "the output's data file"), None)
        if self.external and self.data_target is None:
            # decided here (the rewritten model outgrew one protobuf): plan and check it now
            extra = P.Plan(reads=plan.reads)
            self.data_target = extra.write(os.path.join(os.path.dirname(os.path.abspath(self.target.given)),
                                                        self.data_name), "the output's data file", owner=self.target.given)
            plan.writes.append(self.data_target)
        if self.data_target is not None:
            P.Plan(reads=plan.reads, writes=[w for w in plan.writes if w is not self.data_target] + [self.data_target]).check()
        else:
            plan.check()
        out_dir = os.path.dirname(self.out_path)
        self.name = os.path.basename(self.target.given)
        try:
            self.tmpdir = tempfile.mkdtemp(prefix=".normopt-", dir=out_dir)
        except OSError as exc:
            raise NormoptError(f"-o {out_path}: cannot write in {out_dir} ({exc.strerror})") from None
        self.path = os.path.join(self.tmpdir, self.name)
        try:
            write_model(model, self.path, self.external, self.data_name)
        except OSError as exc:
            self.discard()
            raise NormoptError(f"-o {out_path}: cannot write it ({exc.strerror or exc})") from None
        except Exception as exc:
            self.discard()
            raise NormoptError(f"cannot serialize the output model: {exc}") from None

    def commit(self) -> str:
        try:
            data = os.path.join(self.tmpdir, self.data_name)
            if os.path.exists(data):
                os.chmod(data, P._mode_for(self.data_target.final))
                P.replace_into(data, self.data_target, self.plan)
            os.chmod(self.path, P._mode_for(self.out_path))
            P.replace_into(self.path, self.target, self.plan)
        finally:
            self.discard()
        return os.path.abspath(self.target.given)

    def discard(self) -> None:
        shutil.rmtree(getattr(self, "tmpdir", ""), ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.discard()
        return False


def save_model(model: onnx.ModelProto, out_path: str, external_data: bool = False) -> str:
    """Write atomically (temp file in the target directory, then rename); the path is checked
    as any output is (normopt.paths)."""
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
    graphs, attribute_tensors = [], []
    tensors, _ = _tensor_lists(out, graphs, attribute_tensors)  # one walk: iter_tensors, _graphs, _attribute_tensors
    for t in tensors:
        if t.data_location == onnx.TensorProto.EXTERNAL and W.external_ref(t) is None:
            # a constant a pass gave new values keeps graphsurgeon's copy of its old location flag
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
    try:
        for t in attribute_tensors:  # Constant/attribute tensors stay inline
            if _is_ref(t):
                _inline(t)
        if external:
            _write_external(out, path, data_name or os.path.basename(path) + ".data", sources, graphs)
        else:
            _write_single(out, path, sources, graphs)
    finally:
        sources.close()


def _write_external(out, path, data_name, sources, graphs=None):
    data_path = os.path.join(os.path.dirname(path), data_name)
    written = {}
    with open(data_path, "wb") as data:
        fd = data.fileno()
        end = 0
        for g in (_graphs(out.graph) if graphs is None else graphs):
            for t in g.initializer:
                n = W.tensor_nbytes(t)
                if t.data_type == onnx.TensorProto.STRING:
                    continue  # strings are never external data (ONNX Runtime reads them from string_data only)
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


def _write_single(out, path, sources, graphs=None):
    """One protobuf: the graph without its initializers, then every main-graph initializer as its
    own field entry, in order; a referenced one is its header followed by its bytes, copied from
    their file (protobuf reads repeated fields in the order they appear, wherever they are)."""
    main = out.graph
    for g in (list(_graphs(main)) if graphs is None else graphs)[1:]:
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


def copy_model_files(in_path: str, out_path: str, plan: P.Plan | None = None) -> str:
    """A byte-identical copy of a model and the external-data files it names, each written
    atomically (used when no pass changed anything). Written into the input's own directory, the
    copy reads the input's data files where they are (the same names): they are never rewritten.
    The places come from the plan made by plan_model_output (one is made when none is given)."""
    if plan is None:
        loaded = load_model(in_path)
        plan = P.Plan()
        plan.read_model(in_path, loaded.model)
        plan_model_output(plan, in_path, loaded, out_path, False)
        plan.check()
    for t in plan.writes:
        if t.source is not None:
            try:
                os.makedirs(os.path.dirname(t.final), exist_ok=True)
            except OSError as exc:
                raise NormoptError(f"-o {out_path}: cannot make the folder for {t.given} ({exc.strerror})") from None
            P.write_with(t, lambda tmp, src=t.source: shutil.copyfile(src, tmp), plan)
    target = next(t for t in plan.writes if t.option == "-o")
    P.write_with(target, lambda tmp: shutil.copyfile(in_path, tmp), plan)
    return os.path.abspath(out_path)
