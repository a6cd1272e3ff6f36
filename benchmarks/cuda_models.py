"""ViT/DeiT-shaped encoders written with onnx.helper, without torch (the CUDA check installs no
torch). The graph is what torch.onnx.export (TorchScript) writes for normopt.models.builders'
Encoder: Conv patch embedding, Reshape + Transpose to [B, N, C], a cls token (ViT) or mean
pooling (DeiT/SLAB), learned positions, Pre-norm blocks (attention with separate q/k/v
projections, exact-erf GELU MLP), a final norm, a Gemm head.

norm:
  * "ln": LayerNormalization (opset 17), gamma near 1, beta small;
  * "repbn": SLAB's RepBN at inference, as torch exports it: Transpose(0, 2, 1) ->
    BatchNormalization (running statistics) + alpha * x -> Transpose(0, 2, 1);
  * "none": no norm at all (the norm-free floor an affine-norm model is measured against).
Weights are seeded normal values (std 0.02); BN statistics are seeded (mean ~ 0.1 N(0, 1),
var in [0.5, 1.5]), so every norm does something.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SIZES = {
    "vit-b16": dict(layers=12, d=768, heads=12, image=224, patch=16, classes=1000, pool="cls"),
    "deit-s": dict(layers=12, d=384, heads=6, image=224, patch=16, classes=1000, pool="mean"),
    "tiny": dict(layers=2, d=64, heads=4, image=32, patch=8, classes=10, pool="cls"),
}


def encoder(size: str = "tiny", norm: str = "ln", dtype: str = "float32", batch: int = 1, seed: int = 0, **kw) -> onnx.ModelProto:
    cfg = dict(SIZES[size])
    cfg.update(kw)
    L, d, h, image, patch, classes, pool = (cfg[k] for k in ("layers", "d", "heads", "image", "patch", "classes", "pool"))
    npd = np.dtype(dtype)
    et = helper.np_dtype_to_tensor_dtype(npd)
    rng = np.random.default_rng(seed)
    n_patch = (image // patch) ** 2
    n_tok = n_patch + (1 if pool == "cls" else 0)
    hd = d // h
    nodes, inits = [], []
    count = [0]

    def nm(base):
        count[0] += 1
        return f"{base}_{count[0]}"

    def const(arr, base="w"):
        name = nm(base)
        inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def w(shape, std=0.02, base="w"):
        return const((std * rng.standard_normal(shape)).astype(npd), base)

    def node(op, ins, **attrs):
        out = nm(op.lower())
        nodes.append(helper.make_node(op, ins, [out], name=nm("n_" + op), **attrs))
        return out

    def ints(v):
        return const(np.asarray(v, np.int64), "i")

    def scalar(v):
        return const(np.asarray(v, npd), "s")

    def norm_op(x, tag):
        if norm == "none":
            return x
        if norm == "ln":
            g = const((1 + 0.1 * rng.standard_normal(d)).astype(npd), f"{tag}.weight")
            b = const((0.1 * rng.standard_normal(d)).astype(npd), f"{tag}.bias")
            return node("LayerNormalization", [x, g, b], axis=-1, epsilon=1e-5)
        if norm == "repbn":
            t = node("Transpose", [x], perm=[0, 2, 1])
            stats = [const((1 + 0.1 * rng.standard_normal(d)).astype(npd), f"{tag}.bn.weight"),
                     const((0.1 * rng.standard_normal(d)).astype(npd), f"{tag}.bn.bias"),
                     const((0.1 * rng.standard_normal(d)).astype(npd), f"{tag}.bn.running_mean"),
                     const(rng.uniform(0.5, 1.5, d).astype(npd), f"{tag}.bn.running_var")]
            bn = node("BatchNormalization", [t] + stats, epsilon=1e-5, momentum=0.9)
            alpha = const(np.asarray([1.0 + 0.1 * rng.standard_normal()], npd), f"{tag}.alpha")
            return node("Transpose", [node("Add", [bn, node("Mul", [alpha, t])])], perm=[0, 2, 1])
        raise ValueError(f"norm must be ln, repbn or none, not {norm!r}")

    def linear(x, k, n):
        return node("Add", [w([n], base="b"), node("MatMul", [x, w([k, n])])])

    def heads(t):
        return node("Transpose", [node("Reshape", [t, ints([batch, n_tok, h, hd])])], perm=[0, 2, 1, 3])

    x = node("Conv", ["pixel_values", w([d, 3, patch, patch]), w([d], base="b")], kernel_shape=[patch, patch],
             strides=[patch, patch])
    x = node("Transpose", [node("Reshape", [x, ints([batch, d, n_patch])])], perm=[0, 2, 1])
    if pool == "cls":
        x = node("Concat", [w([batch, 1, d], base="cls"), x], axis=1)
    x = node("Add", [x, w([1, n_tok, d], base="pos")])
    for i in range(L):
        hn = norm_op(x, f"blocks.{i}.n1")
        q, k, v = (heads(linear(hn, d, d)) for _ in range(3))
        s = node("Div", [node("MatMul", [q, node("Transpose", [k], perm=[0, 1, 3, 2])]), scalar(np.sqrt(hd))])
        o = node("MatMul", [node("Softmax", [s], axis=-1), v])
        o = node("Reshape", [node("Transpose", [o], perm=[0, 2, 1, 3]), ints([batch, n_tok, d])])
        x = node("Add", [x, linear(o, d, d)])
        a = linear(norm_op(x, f"blocks.{i}.n2"), d, 4 * d)
        a = node("Mul", [node("Mul", [a, node("Add", [node("Erf", [node("Div", [a, scalar(np.sqrt(2.0))])]), scalar(1.0)])]),
                         scalar(0.5)])
        x = node("Add", [x, linear(a, 4 * d, d)])
    x = norm_op(x, "norm")
    if pool == "cls":
        x = node("Squeeze", [node("Gather", [x, ints([0])], axis=1), ints([1])])
    else:
        x = node("ReduceMean", [x], axes=[1], keepdims=0)
    nodes.append(helper.make_node("Gemm", [x, w([classes, d]), w([classes], base="b")], ["logits"], transB=1, name="head"))
    graph = helper.make_graph(nodes, f"{size}_{norm}", [helper.make_tensor_value_info("pixel_values", et, [batch, 3, image, image])],
                              [helper.make_tensor_value_info("logits", et, [batch, classes])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8,
                             producer_name="normopt.benchmarks.cuda_models")
