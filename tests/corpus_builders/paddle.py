"""PaddlePaddle exporter corpus: tiny random-init transformers exported with paddle2onnx.

Real paddle2onnx outputs of the ways a LayerNorm reaches ONNX from Paddle, for normopt's
recognizers. Every model is built in dygraph, put in eval mode, traced with
``paddle.jit.to_static`` + ``paddle.jit.save`` (PIR: ``model.json`` + ``model.pdiparams``) and
converted with ``paddle2onnx.export`` (the Python API the ``paddle2onnx`` CLI calls), with the
CLI's default post-pass (``optimize_tool="polygraphy"``: Polygraphy constant folding) unless the
name says ``nofold``:

* ``paddle_preln_enc_op11``: Pre-LN encoder (``paddle.nn.TransformerEncoderLayer`` with
  ``normalize_before=True``; token ``Embedding`` + learned position ``Embedding`` added; final
  ``paddle.nn.LayerNorm``; ``Linear`` head), static ``input_ids`` int64 ``[2, 16]``, opset 11.
  LN is decomposed (ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul/Add).
* ``paddle_preln_enc_op13``: the same model at opset 13 (same decomposed form).
* ``paddle_preln_enc_op17``: the same model at opset 17 (``LayerNormalization``, ``axis=2``).
* ``paddle_preln_enc_op11_nofold``: opset 11 with ``optimize_tool=None``: the exporter's raw
  graph: no initializers at all (every weight is a ``Constant`` node), LN gamma/beta reach the
  Mul/Add through ``Identity`` + ``Reshape(·, [-1])``, dead ``Shape -> Slice`` nodes per LN, the
  position lookup not folded.
* ``paddle_svtr_rec_op11``: text-recognizer-like (PaddleOCR SVTR/CRNN style): Conv+BN+ReLU
  backbone over ``x`` float32 ``[1, 3, 32, 128]`` -> AvgPool to height 1 -> ``Im2Seq``
  (squeeze + transpose) -> 2 SVTR-style Pre-LN blocks (qkv Linear, ``reshape((0, -1, 3, H, hd))``,
  GELU MLP, LN epsilon 1e-6) -> final LN -> ``Linear`` CTC head + softmax. Opset 11.
* ``paddle_preln_enc_dyn_op11`` / ``paddle_preln_enc_dyn_op17`` / ``paddle_preln_enc_dyn_op11_nofold``:
  the encoder with ``InputSpec([None, None])``. Paddle's -1 dims come out as
  ``dim_param: "DynamicDimension.N"`` (never ``dim_value: -1``, never empty): the input is
  ``[DynamicDimension.0, DynamicDimension.1]``; the raw graph names the output's dims afresh
  (``DynamicDimension.2/3``), Polygraphy's shape inference ties them back to ``.0/.1``. The
  position ids are ``Range(0, Squeeze(Slice(Shape(input_ids), 1, 2)), 1)``, then a Gather of the
  position table (in the static models Polygraphy folds that lookup to a ``[16, 64]`` initializer).

Sizes: d_model 64 (encoder) / 32 (recognizer), 2 layers, 4 heads, seq 16, all parameters and
BN statistics drawn from a seeded numpy generator (LN gamma = 1 + 0.1 N(0,1), beta = 0.1 N(0,1),
so the affine is exercised).

Paddle is imported lazily, inside functions: importing this module needs only the standard
library. It needs paddlepaddle, paddle2onnx, onnx, onnxruntime, numpy, and Polygraphy's
dependencies onnx-graphsurgeon and sympy (without them paddle2onnx's Polygraphy step pip-installs
them at run time) — a separate environment from normopt's (see ``INSTALL``).

Usage (a test-only script, not part of the normopt package; run it as a file from the Paddle
environment)::

    venv-paddle/bin/python tests/corpus_builders/paddle.py OUT_DIR   # OUT_DIR/*.onnx, ln_forms.md, manifest.json
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

# The environment this was built and checked with (2 cores, CPU only, Python 3.11.7):
INSTALL = (
    "python3 -m venv venv-paddle && venv-paddle/bin/pip install "
    "paddlepaddle==3.3.1 paddle2onnx==2.1.0 onnx==1.17.0 onnxruntime==1.32.0 numpy==2.4.6 "
    "protobuf==7.36.2 onnx-graphsurgeon==0.6.1 sympy==1.14.0"
)
# paddle2onnx 2.1.0 pins onnx==1.17.0 (an unpinned `pip install onnx` next to it resolves to 1.17.0).

VOCAB = 100
MAX_LEN = 64
SEQ = 16
BATCH = 2
D_MODEL = 64
HEADS = 4
FF = 128
LAYERS = 2
SEED = 0

REC_D = 32
REC_HEADS = 4
REC_CLASSES = 40
REC_IMAGE = (1, 3, 32, 128)

EXPORTER = "paddle2onnx"


# ----------------------------------------------------------------------------------------------
# models


def _paddle():
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import paddle

    return paddle


def _classes():
    paddle = _paddle()
    nn = paddle.nn

    class PreLNEncoder(nn.Layer):
        """Token + learned position embeddings, Pre-LN TransformerEncoderLayers, final LN, head."""

        def __init__(self, vocab=VOCAB, d=D_MODEL, heads=HEADS, ff=FF, layers=LAYERS, max_len=MAX_LEN):
            super().__init__()
            self.tok = nn.Embedding(vocab, d)
            self.pos = nn.Embedding(max_len, d)
            self.layers = nn.LayerList([
                nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, activation="relu",
                                           normalize_before=True)
                for _ in range(layers)
            ])
            self.norm = nn.LayerNorm(d)
            self.head = nn.Linear(d, vocab)

        def forward(self, input_ids):
            pos_ids = paddle.arange(paddle.shape(input_ids)[1], dtype="int64")
            x = self.tok(input_ids) + self.pos(pos_ids)
            for layer in self.layers:
                x = layer(x)
            return self.head(self.norm(x))

    class SVTRAttention(nn.Layer):
        """PaddleOCR SVTR's global mixer (ppocr/modeling/backbones/rec_svtrnet.py Attention)."""

        def __init__(self, dim, heads):
            super().__init__()
            self.heads = heads
            self.dim = dim
            self.scale = (dim // heads) ** -0.5
            self.qkv = nn.Linear(dim, dim * 3)
            self.proj = nn.Linear(dim, dim)

        def forward(self, x):
            qkv = self.qkv(x).reshape((0, -1, 3, self.heads, self.dim // self.heads)).transpose((2, 0, 3, 1, 4))
            q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
            attn = nn.functional.softmax(q.matmul(k.transpose((0, 1, 3, 2))), axis=-1)
            x = attn.matmul(v).transpose((0, 2, 1, 3)).reshape((0, -1, self.dim))
            return self.proj(x)

    class SVTRBlock(nn.Layer):
        """SVTR Block with prenorm=False, i.e. x + mixer(norm1(x)); x + mlp(norm2(x))."""

        def __init__(self, dim, heads, eps=1e-6):
            super().__init__()
            self.norm1 = nn.LayerNorm(dim, epsilon=eps)
            self.mixer = SVTRAttention(dim, heads)
            self.norm2 = nn.LayerNorm(dim, epsilon=eps)
            self.fc1 = nn.Linear(dim, dim * 4)
            self.act = nn.GELU()
            self.fc2 = nn.Linear(dim * 4, dim)

        def forward(self, x):
            x = x + self.mixer(self.norm1(x))
            return x + self.fc2(self.act(self.fc1(self.norm2(x))))

    class TextRecognizer(nn.Layer):
        """Conv backbone -> Im2Seq -> 2 Pre-LN blocks -> LN -> CTC head (softmax at inference)."""

        def __init__(self, d=REC_D, heads=REC_HEADS, classes=REC_CLASSES, layers=LAYERS):
            super().__init__()

            def cbr(cin, cout, stride):
                return [nn.Conv2D(cin, cout, 3, stride=stride, padding=1, bias_attr=False),
                        nn.BatchNorm2D(cout), nn.ReLU()]

            self.backbone = nn.Sequential(*cbr(3, 16, 2), *cbr(16, d, 2), *cbr(d, d, (2, 1)))
            self.pool = nn.AvgPool2D(kernel_size=(4, 2), stride=(4, 2))  # [N, d, 4, 32] -> [N, d, 1, 16]
            self.blocks = nn.LayerList([SVTRBlock(d, heads) for _ in range(layers)])
            self.norm = nn.LayerNorm(d, epsilon=1e-6)
            self.fc = nn.Linear(d, classes)

        def forward(self, x):
            x = self.pool(self.backbone(x))
            x = x.squeeze(axis=2).transpose((0, 2, 1))  # PaddleOCR Im2Seq: [N, C, 1, W] -> [N, W, C]
            for blk in self.blocks:
                x = blk(x)
            return nn.functional.softmax(self.fc(self.norm(x)), axis=2)

    return PreLNEncoder, TextRecognizer


def randomize(layer, seed: int = SEED):
    """Seeded numpy values for every parameter and BN statistic (LN gamma near 1, beta near 0)."""
    import numpy as np

    paddle = _paddle()
    rng = np.random.default_rng(seed)
    # BatchNorm's _mean/_variance are parameters in Paddle (stop_gradient), not buffers
    tensors = dict(layer.named_parameters())
    tensors.update(dict(layer.named_buffers()))
    for name, p in sorted(tensors.items()):
        shape = list(p.shape)
        owner = _owner(layer, name)
        if name.endswith("_mean"):
            v = 0.1 * rng.standard_normal(shape)
        elif name.endswith("_variance"):
            v = 0.5 + rng.random(shape)
        elif isinstance(owner, (paddle.nn.LayerNorm, paddle.nn.BatchNorm2D)) and name.endswith("weight"):
            v = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name.endswith("bias"):
            v = 0.1 * rng.standard_normal(shape)
        elif isinstance(owner, paddle.nn.Embedding):
            v = 0.5 * rng.standard_normal(shape)
        else:  # Linear [in, out] / Conv [out, in, kh, kw]
            fan_in = shape[0] if len(shape) == 2 else int(np.prod(shape[1:]))
            v = rng.standard_normal(shape) / np.sqrt(max(fan_in, 1))
        p.set_value(v.astype("float32"))
    layer.eval()
    return layer


def _owner(layer, pname):
    obj = layer
    for part in pname.split(".")[:-1]:
        obj = getattr(obj, part) if not part.isdigit() else obj[int(part)]
    return obj


def make_encoder(seed: int = SEED):
    paddle = _paddle()
    paddle.seed(seed)
    enc, _ = _classes()
    return randomize(enc(), seed)


def make_recognizer(seed: int = SEED):
    paddle = _paddle()
    paddle.seed(seed)
    _, rec = _classes()
    return randomize(rec(), seed)


# ----------------------------------------------------------------------------------------------
# export


def export(layer, input_spec, path: str, opset: int, optimize_tool: str | None = "polygraphy"):
    """paddle.jit.to_static + paddle.jit.save, then paddle2onnx.export (Python API) to ``path``."""
    paddle = _paddle()
    import paddle2onnx

    with tempfile.TemporaryDirectory() as tmp:
        static = paddle.jit.to_static(layer, input_spec=input_spec, full_graph=True)
        prefix = os.path.join(tmp, "model")
        paddle.jit.save(static, prefix)
        model_file = prefix + (".json" if os.path.exists(prefix + ".json") else ".pdmodel")
        paddle2onnx.export(model_file, prefix + ".pdiparams", save_file=path, opset_version=opset,
                           auto_upgrade_opset=False, enable_onnx_checker=True,
                           optimize_tool=str(optimize_tool))
    if not os.path.exists(path):
        raise RuntimeError(f"paddle2onnx wrote nothing to {path}")
    return path


def _inputs_for(kind, shape, seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    if kind == "enc":
        return {"input_ids": rng.integers(0, VOCAB, size=shape, dtype=np.int64)}
    return {"x": rng.standard_normal(shape).astype(np.float32)}


def max_abs_diff(layer, path, kind, shapes, seed=123):
    """Worst |ONNX (onnxruntime CPU) - Paddle dygraph| over the given input shapes."""
    import numpy as np
    import onnxruntime as ort

    paddle = _paddle()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    worst = 0.0
    for i, shape in enumerate(shapes):
        feeds = _inputs_for(kind, shape, seed + i)
        got = sess.run(None, feeds)[0]
        with paddle.no_grad():
            ref = layer(*[paddle.to_tensor(v) for v in feeds.values()]).numpy()
        if got.shape != ref.shape:
            raise AssertionError(f"{path}: ONNX output {got.shape} vs Paddle {ref.shape} for {shape}")
        if not (np.isfinite(got).all() and np.isfinite(ref).all()):
            raise AssertionError(f"{path}: non-finite output for {shape} (onnx {np.isfinite(got).all()}, paddle {np.isfinite(ref).all()})")
        worst = max(worst, float(np.max(np.abs(got.astype(np.float64) - ref))))
    return worst


# ----------------------------------------------------------------------------------------------
# graph description (onnx only)


def _opset(m):
    return next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))


def io_signature(path):
    """[(name, dtype, dims)] of inputs and outputs; a dim is an int (dim_value, -1 kept),
    'param:NAME' for dim_param, or '?' for a dim with neither."""
    import onnx

    m = onnx.load(path, load_external_data=False)
    init = {t.name for t in m.graph.initializer}

    def sig(vis):
        out = []
        for vi in vis:
            if vi.name in init:
                continue
            tt = vi.type.tensor_type
            dims = []
            for d in tt.shape.dim:
                if d.HasField("dim_value"):
                    dims.append(d.dim_value)
                elif d.HasField("dim_param"):
                    dims.append("param:" + d.dim_param)
                else:
                    dims.append("?")
            out.append((vi.name, onnx.TensorProto.DataType.Name(tt.elem_type).lower(), dims))
        return out

    return {"inputs": sig(m.graph.input), "outputs": sig(m.graph.output)}


_LN_OPS = {"ReduceMean", "Sub", "Pow", "Mul", "Add", "Sqrt", "Div", "Reciprocal", "Cast", "Identity",
           "Unsqueeze", "Squeeze"}


def _index(m):
    producers, consumers = {}, {}
    for n in m.graph.node:
        for o in n.output:
            producers[o] = n
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return producers, consumers


def find_lns(m):
    """Each LN in the graph as (kind, first node): the LayerNormalization op, or a decomposed
    ReduceMean(x) whose output a Sub(x, mean) reads, followed (through Pow/Mul) by a second
    ReduceMean."""
    producers, consumers = _index(m)
    found = []
    for n in m.graph.node:
        if n.op_type == "LayerNormalization":
            found.append(("op", n))
        elif n.op_type == "ReduceMean":
            x = n.input[0]
            subs = [c for c in consumers.get(n.output[0], []) if c.op_type == "Sub" and c.input[0] == x]
            for s in subs:
                sq = [c for c in consumers.get(s.output[0], []) if c.op_type in ("Pow", "Mul")]
                if any(c2.op_type == "ReduceMean" for q in sq for c2 in consumers.get(q.output[0], [])):
                    found.append(("decomposed", n))
                    break
    return found


def _const_chain(value, producers, init, depth=0):
    """The nodes computing ``value`` from initializers and Constants only, or None if it is not
    constant (an initializer alone gives [])."""
    if value in init:
        return []
    p = producers.get(value)
    if p is None or depth > 8:
        return None
    chain = []
    for i in p.input:
        if not i:
            continue
        c = _const_chain(i, producers, init, depth + 1)
        if c is None:
            return None
        chain.extend(c)
    return chain + [p]


def _ln_nodes(m, kind, first):
    """The nodes of one LN, in graph order: the core ops, Identity/Cast producers of its input and
    consumers of its output, and the nodes that produce its constant operands."""
    producers, consumers = _index(m)
    order = {id(n): i for i, n in enumerate(m.graph.node)}
    init = {t.name for t in m.graph.initializer}
    core = [first]
    if kind == "decomposed":
        seen = {id(first)}
        vals = set(first.output)
        x = first.input[0]
        frontier = [c for c in consumers.get(first.output[0], [])]
        while frontier:
            n = frontier.pop()
            if id(n) in seen or n.op_type not in _LN_OPS or n.op_type in ("Identity",):
                continue
            # every operand must be the LN input, a value of the LN itself, or a constant
            if not all(not i or i in vals or i == x or _const_chain(i, producers, init) is not None
                       for i in n.input):
                continue
            seen.add(id(n))
            core.append(n)
            vals.update(n.output)
            for o in n.output:
                frontier.extend(consumers.get(o, []))
    wrap_in, wrap_out = [], []
    x = first.input[0]
    p = producers.get(x)
    while p is not None and p.op_type in ("Identity", "Cast") and len(wrap_in) < 3:
        wrap_in.insert(0, p)
        p = producers.get(p.input[0])
    core_ids = {id(n) for n in core}
    last = [n for n in core if not any(id(c) in core_ids for o in n.output for c in consumers.get(o, []))]
    for n in last:
        cs = consumers.get(n.output[0], [])
        while len(cs) == 1 and cs[0].op_type in ("Identity", "Cast") and len(wrap_out) < 3:
            wrap_out.append(cs[0])
            cs = consumers.get(cs[0].output[0], [])
    const = []
    for n in core:
        for i in n.input:
            if id(producers.get(i)) not in core_ids:
                const.extend(_const_chain(i, producers, init) or [])
    nodes = {id(n): n for n in wrap_in + const + core + wrap_out}
    return sorted(nodes.values(), key=lambda n: order[id(n)]), core_ids


def _fmt_value(a):
    import numpy as np

    a = np.asarray(a)
    if a.size == 1:
        v = a.reshape(()).item()
        return f"{a.dtype}{list(a.shape)} = {v!r}"
    head = ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in a.ravel()[:3].tolist())
    return f"{a.dtype}{list(a.shape)} [{head}, ...]"


def describe_ln(path, which: int = 0) -> dict:
    """One LN of the model (the ``which``-th found) as a list of text lines plus a one-line form."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(path)
    lns = find_lns(m)
    if not lns:
        return {"count": 0, "form": "no LayerNorm found", "lines": []}
    kind, first = lns[which]
    nodes, core_ids = _ln_nodes(m, kind, first)
    inits = {t.name: t for t in m.graph.initializer}
    producers, _ = _index(m)
    lines = []
    for n in nodes:
        ins = []
        for i in n.input:
            if i in inits:
                ins.append(f"{i} <initializer {_fmt_value(numpy_helper.to_array(inits[i]))}>")
            elif i in producers and producers[i].op_type == "Constant":
                ins.append(f"{i} <Constant>")
            else:
                ins.append(i)
        attrs = []
        for a in n.attribute:
            v = onnx.helper.get_attribute_value(a)
            if isinstance(v, onnx.TensorProto):
                v = _fmt_value(numpy_helper.to_array(v))
            elif isinstance(v, bytes):
                v = v.decode()
            attrs.append(f"{a.name}={v}")
        if n.op_type == "Cast":
            attrs = [f"to={onnx.TensorProto.DataType.Name(onnx.helper.get_attribute_value(a))}"
                     if a.name == "to" else f"{a.name}={onnx.helper.get_attribute_value(a)}" for a in n.attribute]
        role = "" if id(n) in core_ids else "  (wrapper/const)"
        lines.append(f"{n.op_type}({', '.join(ins)}) -> {', '.join(n.output)}"
                     + (f"  [{', '.join(attrs)}]" if attrs else "") + role)
    core = [n for n in nodes if id(n) in core_ids]
    return {"count": len(lns), "kind": kind, "form": _form(m, kind, core, nodes, core_ids), "lines": lines}


def _form(m, kind, core, nodes, core_ids):
    import onnx

    def attr(n, name):
        for a in n.attribute:
            if a.name == name:
                return onnx.helper.get_attribute_value(a)
        return None

    if kind == "op":
        n = core[0]
        s = f"LayerNormalization(axis={attr(n, 'axis')}, epsilon={attr(n, 'epsilon'):.3g}), gamma/beta initializers"
    else:
        ops = []
        for n in core:
            t = n.op_type
            if t == "ReduceMean":
                axes = attr(n, "axes")
                t += f"(axes={axes}" + (f", keepdims={attr(n, 'keepdims')}" if attr(n, "keepdims") is not None else "") + ")"
            ops.append(t)
        s = "decomposed: " + " -> ".join(ops)
    wraps = sorted({n.op_type for n in nodes if id(n) not in core_ids})
    if wraps:
        s += "; also " + "/".join(wraps) + " around it"
    return s


# ----------------------------------------------------------------------------------------------
# build


def _variants():
    """(name, kind, opset, dynamic, optimize_tool, notes)."""
    return [
        ("paddle_preln_enc_op11", "enc", 11, False, "polygraphy",
         "Pre-LN TransformerEncoderLayer stack, static [2,16]; Paddle's usual opset"),
        ("paddle_preln_enc_op13", "enc", 13, False, "polygraphy", "as op11, opset 13"),
        ("paddle_preln_enc_op17", "enc", 17, False, "polygraphy", "as op11, opset 17 (LayerNormalization op)"),
        ("paddle_preln_enc_op11_nofold", "enc", 11, False, None,
         "as op11 with optimize_tool=None: the raw exporter graph, no Polygraphy folding"),
        ("paddle_svtr_rec_op11", "rec", 11, False, "polygraphy",
         "SVTR/CRNN-like recognizer: Conv+BN backbone, Im2Seq, 2 SVTR Pre-LN blocks (eps 1e-6), CTC head + softmax"),
        ("paddle_preln_enc_dyn_op11", "enc", 11, True, "polygraphy",
         "encoder with InputSpec([None, None]) (dynamic batch and sequence)"),
        ("paddle_preln_enc_dyn_op17", "enc", 17, True, "polygraphy", "dynamic encoder at opset 17"),
        ("paddle_preln_enc_dyn_op11_nofold", "enc", 11, True, None,
         "dynamic encoder, optimize_tool=None (raw exporter graph, weights as Constant nodes)"),
    ]


def build(out_dir: str, only: list[str] | None = None) -> list[dict]:
    """Build, export, check (onnxruntime vs Paddle) every model; write ``ln_forms.md`` and
    ``manifest.json`` next to them. Returns one dict per model written."""
    paddle = _paddle()
    import paddle2onnx

    os.makedirs(out_dir, exist_ok=True)
    records = []
    for name, kind, opset, dynamic, tool, notes in _variants():
        if only and name not in only:
            continue
        layer = make_encoder() if kind == "enc" else make_recognizer()
        if kind == "enc":
            shape = [None, None] if dynamic else [BATCH, SEQ]
            spec = [paddle.static.InputSpec(shape, "int64", "input_ids")]
            check = [(BATCH, SEQ), (3, 9), (1, 1)] if dynamic else [(BATCH, SEQ)]
        else:
            spec = [paddle.static.InputSpec(list(REC_IMAGE), "float32", "x")]
            check = [REC_IMAGE]
        path = os.path.join(out_dir, name + ".onnx")
        export(layer, spec, path, opset, tool)
        import onnx

        m = onnx.load(path)
        diff = max_abs_diff(layer, path, kind, check)
        ln = describe_ln(path)
        records.append({
            "name": name,
            "path": os.path.abspath(path),
            "exporter": EXPORTER + (" (optimize_tool=None)" if tool is None else " (optimize_tool=polygraphy)"),
            "exporter_version": f"paddle2onnx {paddle2onnx.__version__}, paddlepaddle {paddle.__version__}",
            "opset": _opset(m),
            "ln_count": ln["count"],
            "ln_form": ln["form"],
            "notes": notes,
            "io": io_signature(path),
            "checked_shapes": [list(s) for s in check],
            "max_abs_diff": diff,
            "ln_lines": ln["lines"],
        })
    write_ln_forms(records, os.path.join(out_dir, "ln_forms.md"))
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump([{k: v for k, v in r.items() if k != "ln_lines"} for r in records], f, indent=1)
    return records


QUIRKS = """\
## paddle2onnx quirks seen here (paddle2onnx 2.1.0, paddlepaddle 3.3.1)

- Opset <= 16: LN is always decomposed as
  `ReduceMean(x, axes=[-1]) -> Sub(x, mean) -> Pow(d, 2.0) -> ReduceMean(axes=[-1]) -> Add(eps) -> Sqrt -> Div(d, sqrt) -> Mul(gamma) -> Add(beta)`.
  `keepdims` is absent (default 1); axes is the attribute `[-1]` (negative); the Pow exponent and
  eps are rank-0 float32 tensors; eps is float32 (1e-5 -> 9.999999747e-06, 1e-6 -> 9.99999997e-07).
  Opset 13 gives the same graph as opset 11 (ReduceMean axes stays an attribute until 18).
- Opset 17: `LayerNormalization(x, gamma, beta)` with `axis=2` (the positive last axis of a rank-3
  input, not -1) and epsilon; gamma/beta are the Paddle parameters themselves (`layer_norm_N.w_0/b_0`).
- Every Paddle op's result goes through an `Identity` (`p2o.pd_op.<op>.<k>.0`), and the input of
  each decomposed LN through a second `Identity` (`auto.cast.N`, a no-op "cast" to float32). No
  `Cast` nodes appear in these fp32 models. Polygraphy keeps the Identities (about 1 in 4 nodes).
- Default CLI/API post-pass (`optimize_tool="polygraphy"`): constants folded into initializers, full
  `value_info` written. Static models: the position lookup `Gather(pos_table, Range(0, seq))` is
  folded to one `[seq, d]` initializer (`p2o.pd_op.embedding.1.0`) added to the token Gather.
  In the decomposed LN, gamma/beta become new initializers `helper.reshape.N` (copies, names
  unrelated to the Paddle parameter names).
- `optimize_tool=None` (raw exporter output): the graph has **no initializers**: every weight is a
  `Constant` node; LN gamma/beta reach Mul/Add as `Constant -> Identity -> Reshape(., Constant[-1])`;
  each LN leaves a dead `Shape(x) -> Slice(2:3)` (output unused); Squeeze/Range scaffolding for the
  positions stays even when static.
- Dynamic dims (`InputSpec([None, None])`): `dim_param: "DynamicDimension.N"`, never `dim_value: -1`
  and never empty. Raw output names the graph output's dims `DynamicDimension.2/.3` (unlinked to the
  input's `.0/.1`); after Polygraphy they are `.0/.1` like the input.
- Reshapes use Paddle's 0-means-copy constants (`[0, 0, 4, 16]`, `[0, 0, 64]`, SVTR `[0, -1, 3, 4, 8]`,
  `[0, -1, 32]`), constant initializers even in the dynamic models (opset >= 14 adds `allowzero=0`).
  The only Shape-computed value is the position Range in the dynamic models.
- Weights are `[in, out]` MatMul initializers + separate bias Add (no Gemm, no transposed weights).
- `paddle.scale` (attention's `q * head_dim**-0.5`) is `Mul(s) -> Add(0.0)`; GELU is the exact erf form
  `Div(sqrt2) -> Erf -> Add(1) -> Mul(x) -> Mul(0.5)`; SVTR's qkv split is 3 x `Slice -> Squeeze`.
- BatchNorm2D is a `BatchNormalization` node (not folded into the Conv), with `momentum` written.
- ONNX `producer_name` is empty; IR version 6 at opsets 11/13, 8 at opset 17; output is `fetch_name_0`.
"""


def _op_hist(path):
    import collections

    import onnx

    m = onnx.load(path)
    return dict(sorted(collections.Counter(n.op_type for n in m.graph.node).items()))


def write_ln_forms(records, path):
    out = ["# LayerNorm as paddle2onnx writes it", "",
           "Generated by `tests/corpus_builders/paddle.py` (`describe_ln`): the first LN found in each",
           "model, nodes in graph order. `(wrapper/const)` marks nodes around the LN that are not",
           "part of its arithmetic (Identity/Cast wrappers, constant producers).", "", QUIRKS]
    for r in records:
        out += [f"## {r['name']}", "",
                f"- opset {r['opset']}, {r['exporter']}, {r['exporter_version']}",
                f"- notes: {r['notes']}",
                f"- ops: {_op_hist(r['path'])}",
                f"- inputs: {r['io']['inputs']}; outputs: {r['io']['outputs']}",
                f"- LNs found: {r['ln_count']}; form: {r['ln_form']}",
                f"- ONNX vs Paddle max abs diff: {r['max_abs_diff']:.3g} over shapes {r['checked_shapes']}",
                "", "```"] + r["ln_lines"] + ["```", ""]
    with open(path, "w") as f:
        f.write("\n".join(out))


def _main(argv):
    out_dir = argv[1] if len(argv) > 1 else "corpus_paddle"
    recs = build(out_dir, argv[2:] or None)
    for r in recs:
        print(f"{r['name']}: opset {r['opset']} LNs {r['ln_count']} diff {r['max_abs_diff']:.3g} | {r['ln_form']}")


if __name__ == "__main__":
    # Run as a file, this module's folder is sys.path[0] and its name would shadow the real paddle.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    _main(sys.argv)
