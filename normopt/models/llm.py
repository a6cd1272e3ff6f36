"""LLM-shaped decoders written tensor by tensor (no torch; a 13 GB model never sits in memory).

:func:`write_decoder` builds a Pre-LN decoder in the shape of OPT / GPT-2 / GPT-J-style parallel
blocks / BLOOM's embedding LayerNorm, with Hugging Face's input and output names:

* inputs ``input_ids`` [batch_size, sequence_length], ``attention_mask``
  [batch_size, past_sequence_length + sequence_length], ``position_ids``, and with a KV cache
  ``past_key_values.{i}.key|value`` [batch_size, heads, past_sequence_length, head_dim];
* outputs ``logits`` and, with a KV cache, ``present.{i}.key|value``;
* the causal mask is a constant lower-triangular table sliced by run-time shapes (Shape/Gather/
  Concat/Slice), the padding mask comes from ``attention_mask``;
* LayerNorm as the ``LayerNormalization`` op (opset >= 17) or decomposed;
* fp32, fp16 or bf16 weights; the head tied (Transpose of the token table) or separate.

Weights are seeded uniform values of std 0.02 (LN gamma near 1), generated and written one
tensor at a time into ``<name>.data`` at 64 KiB-aligned offsets; ``single_file=True`` streams
them into one protobuf instead (normopt.io.write_model).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from .. import weights as W

ARCHS = ("opt", "gpt2", "parallel", "bloom")
# parameter shapes of real models, for benchmarks
SHAPES = {
    "gpt2-small": dict(arch="gpt2", layers=12, d=768, heads=12, ffn=3072, vocab=50257, positions=1024),
    "opt-350m": dict(arch="opt", layers=24, d=1024, heads=16, ffn=4096, vocab=50272, positions=2050),
    "opt-1.3b": dict(arch="opt", layers=24, d=2048, heads=32, ffn=8192, vocab=50272, positions=2050),
    "opt-6.7b": dict(arch="opt", layers=32, d=4096, heads=32, ffn=16384, vocab=50272, positions=2050),
}


@dataclass
class DecoderSpec:
    arch: str = "opt"
    layers: int = 2
    d: int = 64
    heads: int = 4
    ffn: int | None = None
    vocab: int = 1000
    positions: int = 128
    dtype: str = "float32"
    kv_cache: bool = True
    head: str = "separate"  # "separate" | "tied"
    ln_form: str = "op"  # "op" | "decomposed"
    opset: int = 17
    seed: int = 0


class _Writer:
    def __init__(self, data_path, spec):
        self.data_path = data_path
        self.f = open(data_path, "wb")
        self.end = 0
        self.rng = np.random.default_rng(spec.seed)
        if spec.dtype == "bfloat16":
            import ml_dtypes

            self.dtype = np.dtype(ml_dtypes.bfloat16)
        else:
            self.dtype = np.dtype(spec.dtype)
        self.inits = []
        self.bytes = 0

    def tensor(self, name, shape, kind="w", dtype=None):
        """kind: 'w' weights (std 0.02), 'b' biases (std 0.01), 'g' LN gamma (1 + 0.1 u), 'e' embeddings."""
        dtype = np.dtype(dtype or self.dtype)
        n = int(np.prod(shape))
        std = {"w": 0.02, "b": 0.01, "g": 0.1, "e": 0.02}[kind]
        a = std * np.sqrt(3.0)
        block = 1 << 24
        align = W.ALIGN_LARGE if n * dtype.itemsize >= (1 << 20) else W.ALIGN_SMALL
        off = -(-self.end // align) * align
        self.f.seek(off)
        for start in range(0, n, block):
            m = min(block, n - start)
            v = self.rng.random(m, dtype=np.float32) * (2 * a) - a
            if kind == "g":
                v += 1.0
            self.f.write(v.astype(dtype).tobytes())
        length = n * dtype.itemsize
        self.end = off + length
        self.bytes += length
        t = TensorProto()
        t.name = name
        t.data_type = helper.np_dtype_to_tensor_dtype(dtype)
        t.dims.extend(shape)
        W.set_external(t, os.path.basename(self.data_path), off, length)
        self.inits.append(t)
        return name

    def array(self, name, arr):
        arr = np.ascontiguousarray(arr)
        off = -(-self.end // W.ALIGN_LARGE) * W.ALIGN_LARGE
        self.f.seek(off)
        self.f.write(arr.tobytes())
        self.end = off + arr.nbytes
        self.bytes += arr.nbytes
        t = TensorProto()
        t.name = name
        t.data_type = helper.np_dtype_to_tensor_dtype(arr.dtype)
        t.dims.extend(arr.shape)
        W.set_external(t, os.path.basename(self.data_path), off, arr.nbytes)
        self.inits.append(t)
        return name

    def close(self):
        self.f.truncate(self.end)
        self.f.close()


def write_decoder(path: str, spec: DecoderSpec | None = None, single_file: bool = False, **kw) -> dict:
    """Write the decoder to `path` (+ `path`.data). Returns a summary dict (bytes of weights,
    number of LayerNorms, input names)."""
    spec = spec or DecoderSpec(**kw)
    if spec.arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}")
    if spec.ln_form == "op" and spec.opset < 17:
        raise ValueError("the LayerNormalization op needs opset >= 17")
    path = os.path.abspath(path)
    data_path = path + ".data"
    w = _Writer(data_path, spec)
    et = helper.np_dtype_to_tensor_dtype(w.dtype)
    d, h, L = spec.d, spec.heads, spec.layers
    hd = d // h
    ffn = spec.ffn or 4 * d
    nodes, small = [], []
    count = [0]

    def nm(base):
        count[0] += 1
        return f"{base}_{count[0]}"

    def node(op, ins, base=None, **attrs):
        out = nm(base or op.lower())
        nodes.append(helper.make_node(op, ins, [out], name=nm("n_" + op), **attrs))
        return out

    def const(arr, base="c"):
        name = nm(base)
        small.append(onnx.numpy_helper.from_array(np.asarray(arr), name))
        return name

    def scalar(v):
        return const(np.asarray(v, dtype=w.dtype), "s")

    def ints(v):
        return const(np.asarray(v, np.int64), "i")

    def exponent(v):
        # Pow's exponent type T1 takes bfloat16 only from opset 15 on: a float32 exponent before
        if spec.opset < 15 and "bfloat16" in str(w.dtype):
            return const(np.asarray(v, np.float32), "s")
        return scalar(v)

    def reduce_mean(x, axis=-1):
        if spec.opset >= 18:
            return node("ReduceMean", [x, ints([axis])], keepdims=1)
        return node("ReduceMean", [x], axes=[axis], keepdims=1)

    n_ln = [0]

    def layer_norm(x, tag):
        n_ln[0] += 1
        g = w.tensor(f"{tag}.weight", [d], "g")
        b = w.tensor(f"{tag}.bias", [d], "b")
        if spec.ln_form == "op":
            return node("LayerNormalization", [x, g, b], base=tag, axis=-1, epsilon=1e-5)
        m = reduce_mean(x)
        c = node("Sub", [x, m])
        v = reduce_mean(node("Pow", [c, exponent(2.0)]))
        s = node("Sqrt", [node("Add", [v, scalar(1e-5)])])
        return node("Add", [node("Mul", [node("Div", [c, s]), g]), b], base=tag)

    def linear(x, k, n, tag, bias=True):
        y = node("MatMul", [x, w.tensor(f"{tag}.weight", [k, n])])
        return node("Add", [y, w.tensor(f"{tag}.bias", [n], "b")]) if bias else y

    def gelu(x):  # tanh approximation, as GPT-2 exports it
        x3 = node("Pow", [x, exponent(3.0)])
        inner = node("Mul", [node("Add", [x, node("Mul", [x3, scalar(0.044715)])]), scalar(np.sqrt(2 / np.pi))])
        return node("Mul", [node("Mul", [x, scalar(0.5)]), node("Add", [node("Tanh", [inner]), scalar(1.0)])])

    # inputs
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                            ["batch_size", "past_sequence_length + sequence_length" if spec.kv_cache else "sequence_length"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"])]
    outputs = []
    if spec.kv_cache:
        for i in range(L):
            for kind in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", et,
                                                            ["batch_size", h, "past_sequence_length", hd]))
    # embeddings
    table = w.tensor("embed_tokens.weight", [spec.vocab, d], "e")
    x = node("Gather", [table, "input_ids"], axis=0)
    pos_offset = 2 if spec.arch == "opt" else 0
    pos_table = w.tensor("embed_positions.weight", [spec.positions + pos_offset, d], "e")
    pid = node("Add", ["position_ids", ints(pos_offset)]) if pos_offset else "position_ids"
    x = node("Add", [x, node("Gather", [pos_table, pid], axis=0)], base="hidden")
    if spec.arch == "bloom":
        x = layer_norm(x, "word_embeddings_layernorm")
    # masks: padding from attention_mask, causal from a sliced constant table
    total = node("Unsqueeze", [node("Gather", [node("Shape", ["attention_mask"]), ints(1)], axis=0), ints([0])])
    if spec.kv_cache:
        past = node("Unsqueeze", [node("Gather", [node("Shape", ["past_key_values.0.key"]), ints(2)], axis=0), ints([0])])
    else:
        past = ints([0])
    w.array("causal_table", np.triu(np.full((spec.positions, spec.positions), -1e4, np.float32), k=1).astype(w.dtype))
    causal = node("Slice", ["causal_table", node("Concat", [past, ints([0])], axis=0),
                            node("Concat", [total, total], axis=0), ints([0, 1])])
    pad = node("Mul", [node("Sub", [scalar(1.0), node("Cast", ["attention_mask"], to=et)]), scalar(-1e4)])
    pad = node("Unsqueeze", [pad, ints([1, 2])])
    mask = node("Add", [causal, pad], base="mask")  # [b, 1, s, T]

    def attention(hn, i):
        def heads(t):
            return node("Transpose", [node("Reshape", [t, ints([0, 0, h, hd])])], perm=[0, 2, 1, 3])

        q = heads(linear(hn, d, d, f"layers.{i}.q_proj"))
        k = heads(linear(hn, d, d, f"layers.{i}.k_proj"))
        v = heads(linear(hn, d, d, f"layers.{i}.v_proj"))
        if spec.kv_cache:
            k = node("Concat", [f"past_key_values.{i}.key", k], axis=2)
            v = node("Concat", [f"past_key_values.{i}.value", v], axis=2)
            for kind, t in (("key", k), ("value", v)):
                name = f"present.{i}.{kind}"
                nodes.append(helper.make_node("Identity", [t], [name], name=nm("n_present")))
                outputs.append(helper.make_tensor_value_info(name, et, ["batch_size", h, "past_sequence_length + sequence_length", hd]))
        s = node("Mul", [node("MatMul", [q, node("Transpose", [k], perm=[0, 1, 3, 2])]), scalar(1.0 / np.sqrt(hd))])
        p = node("Softmax", [node("Add", [s, mask])], axis=-1)
        o = node("Reshape", [node("Transpose", [node("MatMul", [p, v])], perm=[0, 2, 1, 3]), ints([0, 0, d])])
        return linear(o, d, d, f"layers.{i}.out_proj")

    def mlp(hn, i):
        a = linear(hn, d, ffn, f"layers.{i}.fc1")
        a = node("Relu", [a]) if spec.arch in ("opt", "bloom") else gelu(a)
        return linear(a, ffn, d, f"layers.{i}.fc2")

    for i in range(L):
        if spec.arch == "parallel":  # GPT-J / Phi: one LN feeds attention and MLP side by side
            hn = layer_norm(x, f"layers.{i}.input_layernorm")
            x = node("Add", [node("Add", [x, attention(hn, i)]), mlp(hn, i)], base="hidden")
        else:
            x = node("Add", [x, attention(layer_norm(x, f"layers.{i}.self_attn_layer_norm"), i)], base="hidden")
            x = node("Add", [x, mlp(layer_norm(x, f"layers.{i}.final_layer_norm"), i)], base="hidden")
    x = layer_norm(x, "final_layer_norm")
    if spec.head == "tied":
        head_w = node("Transpose", [table], perm=[1, 0])
    else:
        head_w = w.tensor("lm_head.weight", [d, spec.vocab])
    nodes.append(helper.make_node("MatMul", [x, head_w], ["logits"], name="lm_head"))
    outputs.insert(0, helper.make_tensor_value_info("logits", et, ["batch_size", "sequence_length", spec.vocab]))
    w.close()
    graph = helper.make_graph(nodes, f"{spec.arch}_decoder", inputs, outputs, w.inits + small)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", spec.opset)],
                              ir_version=min(10, helper.find_min_ir_version_for([helper.make_opsetid("", spec.opset)]) + 1),
                              producer_name="normopt.models.llm")
    summary = {"path": path, "weight_bytes": w.bytes, "layernorms": n_ln[0], "inputs": [i.name for i in inputs],
               "spec": spec.__dict__.copy()}
    if single_file:
        from ..io import write_model

        base = os.path.dirname(path)
        for t in model.graph.initializer:  # absolute references for the streaming writer
            ref = W.external_ref(t)
            if ref is not None:
                W.set_external(t, os.path.join(base, ref[0]), ref[1], ref[2])
        write_model(model, path, external=False)
        os.remove(data_path)
    else:
        with open(path, "wb") as f:
            f.write(model.SerializeToString())
    return summary


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description="write an LLM-shaped decoder, weights tensor by tensor")
    ap.add_argument("path")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None)
    ap.add_argument("--arch", choices=ARCHS, default="opt")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("--tied", action="store_true")
    ap.add_argument("--decomposed", action="store_true")
    ap.add_argument("--opset", type=int, default=17)
    ap.add_argument("--single-file", action="store_true")
    a = ap.parse_args(argv)
    kw = dict(SHAPES[a.shape]) if a.shape else dict(arch=a.arch, layers=a.layers, d=a.d, heads=a.heads, vocab=a.vocab)
    spec = DecoderSpec(**kw, dtype=a.dtype, kv_cache=not a.no_cache, head="tied" if a.tied else "separate",
                       ln_form="decomposed" if a.decomposed else "op", opset=a.opset)
    print(write_decoder(a.path, spec, single_file=a.single_file))


if __name__ == "__main__":
    main()
