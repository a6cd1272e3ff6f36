"""TensorFlow / Keras exporter corpus: tiny random-init transformers exported to ONNX.

Real exporter outputs (tf2onnx, and Keras 3's own ``model.export(format="onnx")``, which drives
tf2onnx too) of the ways a LayerNorm is written in TensorFlow, for normopt's recognizers:

* ``keras_preln_tf2onnx_opset{13,17,18}``: ``keras.layers.LayerNormalization`` (Keras 3, TF
  backend: ``tf.nn.moments`` then ``x * (gamma * rsqrt(var + eps)) + (-mean * inv + beta)``), Pre-LN
  encoder stack, ``tf2onnx.convert.from_keras``. tf2onnx 1.17 never emits the LayerNormalization
  op (not at 17 either); below opset 18 its GlobalPoolOptimizer turns every
  ``ReduceMean(axes=[2..r-1])`` (here: the last axis of [B, S, D]) into ``GlobalAveragePool``; at
  18 (axes as an input) the means stay ``ReduceMean`` (so the hand-written forms are exported at
  13 and 18 too).
* ``tf_moments_preln_tf2onnx_opset{13,18}``: LN written by hand as ``tf.nn.moments`` +
  ``tf.nn.batch_normalization`` (``x * inv + (beta - mean * inv)``, ``inv = gamma * rsqrt(var + eps)``).
* ``tf_flaxstyle_preln_tf2onnx_opset{13,18}``: flax-style LN written in TF: ``var = max(0, E[x*x] - E[x]^2)``,
  ``y = (x - mean) * (gamma * rsqrt(var + eps)) + beta``.
* ``keras_preln_kerasexport``: the model of the first item through ``model.export(format="onnx")``.
* ``keras_postln_tf2onnx_opset13``: BERT-like Post-LN (``x = LN(x + MHA(x))``), a negative case for
  ln_to_rms (the LN inputs are sums read by attention).
* ``tf_naive_preln_tf2onnx_opset13``/``_opset18``: textbook LN ``rsqrt(var + eps) * gamma * (x - mean) + beta``.
* ``tf_naive_tf1add_preln_tf2onnx_opset13``: the same with TF1's ``Add`` op (``tf.raw_ops.Add``, as
  TF1 graphs have it) and list axes: the only form tf2onnx's layer_normalization_rewriter matches;
  it becomes ``InstanceNormalization`` (channels = the sequence axis, ones/zeros made with
  Shape/Slice/ConstantOfShape) followed by ``Mul gamma``, ``Add beta``.

All models: ``input_ids`` int32 ``[batch, seq]`` (both dynamic), token Embedding + learned
position embedding (keras_hub's ``PositionEmbedding`` form: a slice of a ``[max_len, d]`` table,
broadcast), 2 layers, d_model 32, 4 heads, FFN 64 (GELU, tanh form), head ``Dense(16)``; output
``[batch, seq, 16]`` float32. LN gamma/beta are random (not 1/0) so the affine is exercised.

TensorFlow is imported lazily, inside functions: importing this module needs nothing beyond the
standard library. It needs tensorflow(-cpu), keras 3, tf2onnx, onnx, onnxruntime, numpy — a
separate environment from normopt's (see ``INSTALL``).

Usage (a test-only script, not part of the normopt package; run it as a file from the TF
environment)::

    venv-tf/bin/python tests/corpus_builders/tf_keras.py OUT_DIR

writes ``OUT_DIR/*.onnx``, ``OUT_DIR/ln_forms.md`` (one LN instance per model, node by node) and
``OUT_DIR/manifest.json`` (what :func:`build` returns).
"""

from __future__ import annotations

import json
import os
import sys

# The environment this was built and checked with (2 cores, CPU only, Python 3.11):
INSTALL = (
    "python3 -m venv venv-tf && venv-tf/bin/pip install "
    "tensorflow-cpu==2.21.0 keras==3.15.1 tf2onnx==1.17.0 onnx==1.23.2 onnxruntime==1.32.0 "
    "numpy==2.4.6 protobuf==7.36.2"
)

VOCAB = 64
MAX_LEN = 16
SEQ = 16
D_MODEL = 32
HEADS = 4
FF = 64
LAYERS = 2
N_OUT = 16
SEED = 0

_LAYERS = {}


def _tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    import keras

    return tf, keras


def _layer_classes():
    """Custom Keras layers, defined once tensorflow is imported."""
    if _LAYERS:
        return _LAYERS
    tf, keras = _tf()

    class PositionEmbedding(keras.layers.Layer):
        """keras_hub's PositionEmbedding: a [max_len, d] table, sliced to the sequence, broadcast."""

        def __init__(self, max_len, **kw):
            super().__init__(**kw)
            self.max_len = max_len

        def build(self, input_shape):
            self.position_embeddings = self.add_weight(
                name="embeddings", shape=(self.max_len, input_shape[-1]),
                initializer="glorot_uniform")

        def call(self, x):
            shape = keras.ops.shape(x)
            seq, d = shape[-2], shape[-1]
            pos = keras.ops.slice(self.position_embeddings, (0, 0), (seq, d))
            return keras.ops.broadcast_to(pos, shape)

    class _AffineNorm(keras.layers.Layer):
        """A norm over the last axis with gamma (ones) and beta (zeros) of length d, named as
        the framework it imitates names them."""
        weight_names = ("gamma", "beta")
        default_epsilon = 1e-5

        def __init__(self, epsilon=None, **kw):
            super().__init__(**kw)
            self.epsilon = self.default_epsilon if epsilon is None else epsilon

        def build(self, input_shape):
            d = input_shape[-1]
            g, b = self.weight_names
            self.gamma = self.add_weight(name=g, shape=(d,), initializer="ones")
            self.beta = self.add_weight(name=b, shape=(d,), initializer="zeros")

    class MomentsLayerNorm(_AffineNorm):
        """LN as TF code writes it by hand: tf.nn.moments + tf.nn.batch_normalization."""

        def call(self, x):
            mean, var = tf.nn.moments(x, axes=[-1], keepdims=True)
            return tf.nn.batch_normalization(x, mean, var, offset=self.beta, scale=self.gamma,
                                             variance_epsilon=self.epsilon)

    class FlaxStyleLayerNorm(_AffineNorm):
        """flax.linen.LayerNorm's arithmetic in TF: var = max(0, E[x*x] - E[x]^2),
        y = (x - mean) * (gamma * rsqrt(var + eps)) + beta."""
        weight_names = ("scale", "bias")
        default_epsilon = 1e-6

        def call(self, x):
            mean = tf.reduce_mean(x, axis=-1, keepdims=True)
            mean2 = tf.reduce_mean(x * x, axis=-1, keepdims=True)
            var = tf.maximum(0.0, mean2 - tf.square(mean))
            mul = tf.math.rsqrt(var + self.epsilon) * self.gamma
            return (x - mean) * mul + self.beta

    class NaiveLayerNorm(_AffineNorm):
        """The textbook / tf.contrib.layers.layer_norm arithmetic:
        rsqrt(mean((x - mean)^2) + eps) * gamma * (x - mean) + beta. tf2onnx's
        layer_normalization_rewriter matches this one, and only when its adds are the TF1 Add op
        (``tf1_add``); with TF2's AddV2 it stays decomposed."""

        default_epsilon = 1e-12

        def __init__(self, epsilon=None, tf1_add=False, **kw):
            super().__init__(epsilon, **kw)
            self.tf1_add = tf1_add

        def call(self, x):
            # TF2's `+` is the AddV2 op; TF1 graphs (and tf.raw_ops.Add) have Add, the only one
            # tf2onnx 1.17's layer_normalization_rewriter matches
            add = (lambda a, b: tf.raw_ops.Add(x=a, y=b)) if self.tf1_add else tf.add
            # a list axis, as tf.contrib.layers.layer_norm had: the rewriter fails on a scalar
            # one ('int' object is not iterable, logged, and the LN is left decomposed)
            axis = [-1] if self.tf1_add else -1
            mean = tf.reduce_mean(x, axis=axis, keepdims=True)
            var = tf.reduce_mean(tf.square(x - mean), axis=axis, keepdims=True)
            return add(tf.math.rsqrt(add(var, self.epsilon)) * self.gamma * (x - mean), self.beta)

    _LAYERS.update(PositionEmbedding=PositionEmbedding, MomentsLayerNorm=MomentsLayerNorm,
                   FlaxStyleLayerNorm=FlaxStyleLayerNorm, NaiveLayerNorm=NaiveLayerNorm)
    return _LAYERS


def _gelu_tanh(x):
    _, keras = _tf()
    return keras.activations.gelu(x, approximate=True)


def make_model(ln: str = "keras", pre_ln: bool = True, seed: int = SEED):
    """The Keras functional encoder. ``ln``: 'keras' | 'moments' | 'flax' | 'naive' | 'naive_tf1'."""
    import numpy as np

    tf, keras = _tf()
    L = _layer_classes()
    keras.utils.set_random_seed(seed)

    def norm(name):
        if ln == "keras":
            return keras.layers.LayerNormalization(name=name)  # epsilon 1e-3 (Keras default)
        if ln == "moments":
            return L["MomentsLayerNorm"](epsilon=1e-5, name=name)
        if ln == "flax":
            return L["FlaxStyleLayerNorm"](epsilon=1e-6, name=name)
        if ln == "naive":
            return L["NaiveLayerNorm"](epsilon=1e-12, name=name)
        if ln == "naive_tf1":
            return L["NaiveLayerNorm"](epsilon=1e-12, tf1_add=True, name=name)
        raise ValueError(ln)

    def ffn(h, i):
        # tanh GELU: the exact one ("gelu") is tf.nn.gelu -> Erfc in TF 2.21, which tf2onnx 1.17
        # leaves unconverted (it writes a model ONNX Runtime rejects: no op Erfc)
        h = keras.layers.Dense(FF, activation=_gelu_tanh, name=f"ffn{i}_up")(h)
        return keras.layers.Dense(D_MODEL, name=f"ffn{i}_down")(h)

    def mha(h, i):
        return keras.layers.MultiHeadAttention(
            num_heads=HEADS, key_dim=D_MODEL // HEADS, name=f"mha{i}")(h, h)

    ids = keras.Input((None,), dtype="int32", name="input_ids")
    tok = keras.layers.Embedding(VOCAB, D_MODEL, name="tok_emb")(ids)
    pos = L["PositionEmbedding"](MAX_LEN, name="pos_emb")(tok)
    x = keras.layers.Add(name="emb_add")([tok, pos])
    for i in range(LAYERS):
        if pre_ln:
            x = keras.layers.Add(name=f"res_attn{i}")([x, mha(norm(f"ln_attn{i}")(x), i)])
            x = keras.layers.Add(name=f"res_ffn{i}")([x, ffn(norm(f"ln_ffn{i}")(x), i)])
        else:
            x = norm(f"ln_attn{i}")(keras.layers.Add(name=f"res_attn{i}")([x, mha(x, i)]))
            x = norm(f"ln_ffn{i}")(keras.layers.Add(name=f"res_ffn{i}")([x, ffn(x, i)]))
    if pre_ln:
        x = norm("ln_final")(x)
    out = keras.layers.Dense(N_OUT, name="head")(x)
    model = keras.Model(ids, out, name=f"{ln}_{'preln' if pre_ln else 'postln'}")

    # non-trivial LN affine (the initializers give gamma = 1, beta = 0) and non-zero biases
    # (zero-initialized biases would vanish: tf2onnx drops an Add of zeros)
    rng = np.random.default_rng(seed + 1)
    for layer in model.layers:
        if layer.name.startswith("ln_"):
            g, b = layer.weights  # gamma, beta in build order
            g.assign((1.0 + 0.2 * rng.standard_normal(g.shape)).astype("float32"))
            b.assign((0.2 * rng.standard_normal(b.shape)).astype("float32"))
        else:
            for w in layer.weights:
                if not np.any(np.asarray(w)):
                    w.assign((0.1 * rng.standard_normal(w.shape)).astype("float32"))
    model(np.zeros((1, SEQ), np.int32))  # mark as called (Keras export needs it)
    return model


def ln_count(model) -> int:
    return sum(1 for layer in model.layers if layer.name.startswith("ln_"))


def _export_tf2onnx(model, path, opset):
    tf, _ = _tf()
    import tf2onnx

    spec = [tf.TensorSpec((None, None), tf.int32, name="input_ids")]
    tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset, output_path=path)


def _export_keras(model, path):
    model.export(path, format="onnx", verbose=False)


def _random_ids(batch, seq, seed):
    import numpy as np

    return np.random.default_rng(seed).integers(0, VOCAB, size=(batch, seq), dtype=np.int32)


def max_abs_diff(model, path, shapes=((2, SEQ), (3, 8)), seed=123):
    """Max |ONNX Runtime (CPU) - Keras| over random inputs of each (batch, seq) in ``shapes``."""
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    worst = 0.0
    for i, (b, s) in enumerate(shapes):
        ids = _random_ids(b, s, seed + i)
        ref = np.asarray(model(ids, training=False))
        got = sess.run(None, {name: ids})[0]
        if got.shape != ref.shape:
            raise AssertionError(f"{path}: shape {got.shape} != {ref.shape}")
        worst = max(worst, float(np.max(np.abs(got - ref))))
    return worst


def _opset(path):
    import onnx

    m = onnx.load(path, load_external_data=False)
    return next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))


_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Neg", "Sqrt", "Reciprocal", "Max", "Pow", "Cast",
                "Shape", "Slice", "Gather", "ConstantOfShape", "InstanceNormalization",
                "ReduceMean", "GlobalAveragePool", "Identity"}


def ln_nodes(model, scope: str = "ln_attn0"):
    """The nodes of one LN instance, in graph order, and its input tensor.

    tf2onnx keeps TF's name scopes (``<model>_1/ln_attn0_1/moments/mean``); the nodes it makes
    itself (``Shape__12``, and the InstanceNormalization rewrite's Shape/Slice/ConstantOfShape,
    Mul and Add) are unscoped, so they are added by dataflow: producers whose inputs are only
    constants, the LN input and region values (backward), and unscoped elementwise consumers of
    region values (forward)."""
    g = model.graph
    inits = {i.name for i in g.initializer}
    tag = (f"/{scope}_", f"/{scope}/")
    nodes = list(g.node)
    region = [n for n in nodes if any(t in n.name for t in tag)]
    ids = {id(n) for n in region}
    produced = {o for n in region for o in n.output}
    # the LN input: a non-constant input of the region produced outside it; the first seen
    x = next(i for n in region for i in n.input if i not in inits and i not in produced)
    producer = {o: n for n in nodes for o in n.output}

    def add(n):
        region.append(n)
        ids.add(id(n))
        produced.update(n.output)

    def unscoped(n):
        return "/" not in n.name and n.op_type in _ELEMENTWISE

    # backward: unscoped producers of region inputs (stopping at X and constants)
    stack = [i for n in region for i in n.input]
    while stack:
        i = stack.pop()
        p = producer.get(i)
        if i == x or i in inits or p is None or id(p) in ids or not unscoped(p):
            continue
        add(p)
        stack.extend(p.input)
    # forward: unscoped elementwise consumers whose inputs are all region values or constants
    changed = True
    while changed:
        changed = False
        known = produced | inits | {x}
        for n in nodes:
            if id(n) in ids or not unscoped(n):
                continue
            ins = [i for i in n.input if i]
            if any(i in produced for i in ins) and all(i in known for i in ins):
                add(n)
                changed = True
    order = {id(n): k for k, n in enumerate(nodes)}
    return sorted(region, key=lambda n: order[id(n)]), x


def _short(name, x, inits_arr, local):
    import numpy as np

    if name == x:
        return "X"
    if name in inits_arr:
        a = inits_arr[name]
        if a.size == 1:
            return f"const {a.dtype}{list(a.shape)}={a.reshape(-1)[0].item():.9g}"
        if a.size <= 4:
            return f"const {a.dtype}{list(a.shape)}={np.asarray(a).tolist()}"
        return f"const {a.dtype}{list(a.shape)}"
    return local.get(name, name)


def describe_ln(path, scope: str = "ln_attn0") -> tuple[str, list[str]]:
    """(op sequence, markdown lines) of one LN instance of the ONNX model at ``path``."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(path)
    region, x = ln_nodes(model, scope)
    inits_arr = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    local = {}
    lines = []
    for k, n in enumerate(region):
        for o in n.output:
            local[o] = f"%{k}"
        ins = ", ".join(_short(i, x, inits_arr, local) for i in n.input)
        attrs = []
        for a in n.attribute:
            v = onnx.helper.get_attribute_value(a)
            if isinstance(v, bytes):
                v = v.decode()
            if hasattr(v, "dims"):
                t = numpy_helper.to_array(v)
                v = f"tensor {t.dtype}{list(t.shape)}" + (f"={t.tolist()}" if t.size <= 4 else "")
            attrs.append(f"{a.name}={v}")
        attr = f" {{{', '.join(attrs)}}}" if attrs else ""
        lines.append(f"%{k} = {n.op_type}({ins}){attr}    # {n.name}")
    seq = " -> ".join(n.op_type for n in region)
    return seq, lines


def ln_form_of(path, scope: str = "ln_attn0") -> str:
    """A short, computed description of the LN form in the exported graph."""
    import onnx

    model = onnx.load(path)
    hist = {}
    for n in model.graph.node:
        hist[n.op_type] = hist.get(n.op_type, 0) + 1
    seq, _ = describe_ln(path, scope)
    kind = "LayerNormalization op" if hist.get("LayerNormalization") else \
        "InstanceNormalization rewrite" if hist.get("InstanceNormalization") else "decomposed"
    return f"{kind}: {seq}"


def _tf2onnx_version():
    import tf2onnx

    return tf2onnx.__version__


SPECS = [
    # name, ln, pre_ln, exporter, opset
    ("keras_preln_tf2onnx_opset13", "keras", True, "tf2onnx", 13),
    ("keras_preln_tf2onnx_opset17", "keras", True, "tf2onnx", 17),
    ("keras_preln_tf2onnx_opset18", "keras", True, "tf2onnx", 18),
    ("tf_moments_preln_tf2onnx_opset13", "moments", True, "tf2onnx", 13),
    ("tf_moments_preln_tf2onnx_opset18", "moments", True, "tf2onnx", 18),
    ("tf_flaxstyle_preln_tf2onnx_opset13", "flax", True, "tf2onnx", 13),
    ("tf_flaxstyle_preln_tf2onnx_opset18", "flax", True, "tf2onnx", 18),
    ("keras_preln_kerasexport", "keras", True, "keras.export", None),
    ("keras_postln_tf2onnx_opset13", "keras", False, "tf2onnx", 13),
    ("tf_naive_preln_tf2onnx_opset13", "naive", True, "tf2onnx", 13),
    ("tf_naive_preln_tf2onnx_opset18", "naive", True, "tf2onnx", 18),
    ("tf_naive_tf1add_preln_tf2onnx_opset13", "naive_tf1", True, "tf2onnx", 13),
]

_NOTES = {
    "keras": "keras.layers.LayerNormalization (Keras 3, TF backend), epsilon 1e-3 (Keras default)",
    "moments": "hand-written tf.nn.moments + tf.nn.batch_normalization, epsilon 1e-5",
    "flax": "hand-written flax-style LN in TF (var = max(0, E[x*x] - E[x]^2)), epsilon 1e-6",
    "naive": "hand-written textbook LN rsqrt(var + eps) * gamma * (x - mean) + beta, epsilon 1e-12 "
             "(TF2 AddV2: tf2onnx's layer_normalization_rewriter does not match it)",
    "naive_tf1": "the textbook LN of 'naive' with its two adds as the TF1 Add op (tf.raw_ops.Add, "
                 "as in TF1 graphs): tf2onnx's layer_normalization_rewriter turns it into "
                 "InstanceNormalization over [B, S, D] with S channels, then Mul gamma, Add beta",
}


def build(out_dir: str) -> list[dict]:
    """Write every model of :data:`SPECS` to ``out_dir``; one dict per model written."""
    tf, keras = _tf()
    os.makedirs(out_dir, exist_ok=True)
    entries = []
    models = {}
    for name, ln, pre_ln, exporter, opset in SPECS:
        key = (ln, pre_ln)
        if key not in models:
            models[key] = make_model(ln, pre_ln)
        model = models[key]
        path = os.path.join(out_dir, name + ".onnx")
        if exporter == "tf2onnx":
            _export_tf2onnx(model, path, opset)
            version = _tf2onnx_version()
        else:
            _export_keras(model, path)
            version = f"keras {keras.__version__} (tf2onnx {_tf2onnx_version()})"
        diff = max_abs_diff(model, path)
        notes = [_NOTES[ln], "Pre-LN" if pre_ln else "Post-LN (negative case for ln_to_rms)",
                 f"tensorflow {tf.__version__}", f"max |ort - keras| = {diff:.3g}"]
        entries.append({
            "name": name,
            "path": path,
            "exporter": exporter,
            "exporter_version": version,
            "opset": _opset(path),
            "ln_count": ln_count(model),
            "ln_form": ln_form_of(path),
            "notes": "; ".join(notes),
            "max_abs_diff": diff,
        })
    return entries


QUIRKS = [
    "## Exporter quirks seen (tensorflow-cpu 2.21.0, keras 3.15.1, tf2onnx 1.17.0)",
    "",
    "- No `LayerNormalization` op at any opset (13, 15, 17, 18): always decomposed.",
    "- Opset < 18: tf2onnx's GlobalPoolOptimizer rewrites `ReduceMean(axes=[2..rank-1])` into",
    "  `GlobalAveragePool`, so on a rank-3 [B, S, D] stream every LN mean and variance is a",
    "  `GlobalAveragePool` (no axes, no keepdims attribute; output [B, S, 1]). At opset 18 the",
    "  axes are an input and the means stay `ReduceMean(x, [-1])` with `keepdims=1` and",
    "  `noop_with_empty_axes=1`.",
    "- `Rsqrt` is `Sqrt` then `Reciprocal`; `tf.square` / `SquaredDifference` is `Sub` then",
    "  `Mul(d, d)` (never `Pow`).",
    "- Keras' LayerNormalization's gamma/beta are `[1, 1, D]` initializers; hand-written TF LNs",
    "  (`tf.nn.batch_normalization`, flax-style, textbook) keep `[D]`.",
    "- The epsilon scalar initializer is shared across LN layers (tf2onnx deduplicates equal",
    "  constants; its name belongs to whichever layer it kept, e.g. `ln_final_1/add/y:0` read by",
    "  `ln_attn0`). Other small int64 constants are shared across unrelated nodes too.",
    "- Weights are plain initializers (no `Identity` wrappers, no `Cast`s on them). Dense layers",
    "  are `Reshape(x, [-1, D]) -> MatMul(W [in, out]) -> Reshape(back, dynamic shape) -> Add(bias)`",
    "  (TF Tensordot); of the 16 `Cast`s, 15 are int32/int64 shape arithmetic and one casts",
    "  `input_ids` to float for the Embedding's negative-id test (`Less(float(ids), 0.0)`).",
    "- Keras MultiHeadAttention's einsums are decomposed by tf2onnx's EinsumOptimizer into",
    "  Unsqueeze/Reshape/`Gemm(transB=1)` with pre-transposed, folded `[32, 32]` weights",
    "  (`const_fold_opt__N`)/Squeeze/Transpose chains with dynamic shape computations; the",
    "  decomposition is NOT deterministic: exporting the same model repeatedly leaves 0, 1 or 2",
    "  `Einsum` ops (e.g. `abcd,cde->abe` for the attention output) and 309-341 nodes.",
    "- Keras 3's `Embedding` wraps negative ids (`ids < 0 ? ids + vocab : ids`) as",
    "  Cast/Less/Not/Cast/Mul/Add arithmetic (a lowered `SelectV2`) before the `Gather`, so the",
    "  int input does not feed the Gather directly.",
    "- The position table (keras_hub PositionEmbedding style) is `Slice(table, [0, 0], size)` with",
    "  a size computed from Shape (int32, with an `Equal(-1)`/`Mul(INT_MAX)`/`Add` fix-up), then",
    "  `Expand` to [B, S, D].",
    "- Dynamic dims are named `unk__N` (N differs per export); input `input_ids` int32",
    "  [unk, unk]; output `head` (tf2onnx from_keras) or `Identity:0` (Keras' own export).",
    "- Exact GELU (`tf.nn.gelu`, Keras' default `gelu`) lowers to `Erfc`, which tf2onnx 1.17 leaves",
    "  unconverted: it writes a model ONNX Runtime rejects. These models use the tanh GELU.",
    "- tf2onnx's layer_normalization_rewriter (LN -> InstanceNormalization) matches only the TF1",
    "  `Add` op (TF2 emits `AddV2`) and fails on a scalar reduction axis ('int' object is not",
    "  iterable, logged, LN left decomposed).",
    "- Zero-valued biases disappear (tf2onnx drops an `Add` of zeros): the builder randomizes",
    "  every all-zero weight.",
]


def write_ln_forms(entries: list[dict], path: str, scope: str = "ln_attn0") -> None:
    """Markdown dump of one LN instance (``scope``) per model, for writing recognizers."""
    import onnx

    out = ["# How one LayerNorm appears in each TF/Keras export",
           "",
           f"One instance per model (the `{scope}` layer: the first LN). `X` is the LN input;",
           "`const dtype[shape]=v` is an initializer (value shown for scalars and up to 4",
           "elements); `%k` is the output of line k. The trailing comment is the ONNX node name",
           "(tf2onnx keeps TF's name scopes; `Name__N` nodes are made by tf2onnx itself).",
           ""] + QUIRKS + [""]
    for e in entries:
        m = onnx.load(e["path"])
        seq, lines = describe_ln(e["path"], scope)
        ins = []
        for i in m.graph.input:
            t = i.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in t.shape.dim]
            ins.append(f"`{i.name}` {onnx.TensorProto.DataType.Name(t.elem_type)} {dims}")
        outs = []
        for o in m.graph.output:
            t = o.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in t.shape.dim]
            outs.append(f"`{o.name}` {onnx.TensorProto.DataType.Name(t.elem_type)} {dims}")
        out += [f"## {e['name']}",
                "",
                f"- file: `{os.path.basename(e['path'])}`; exporter: {e['exporter']} "
                f"{e['exporter_version']}; opset {e['opset']}; LNs in the source model: "
                f"{e['ln_count']}",
                f"- inputs: {', '.join(ins)}; outputs: {', '.join(outs)}",
                f"- {e['notes']}",
                f"- op sequence: {seq}",
                "",
                "```"] + lines + ["```", ""]
    with open(path, "w") as f:
        f.write("\n".join(out))


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "corpus_tf"
    entries = build(out)
    write_ln_forms(entries, os.path.join(out, "ln_forms.md"))
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(entries, f, indent=1)
    print(json.dumps(entries, indent=1))
