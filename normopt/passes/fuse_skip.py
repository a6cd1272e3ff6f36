"""fuse_skip: emit ONNX Runtime's Skip norm ops where they measure faster (target ort).

Identities (ORT contrib schemas, com.microsoft):

    SkipSimplifiedLayerNormalization(a, s, gamma, bias?) = RMSNorm(a + s + bias) * gamma,
        output 3 = a + s + bias (continues a Pre-LN stream)
    SkipLayerNormalization(a, s, gamma, beta?, bias?)    = LN(a + s + bias; gamma, beta),
        output 3 likewise

so ``Add(a, s) -> [Simplified]LayerNormalization`` is one fused op, and a constant bias Add that
feeds the residual Add (the writer's bias) can be absorbed into the ``bias`` input.

Whether the fused op is faster depends on the EP: on ORT 1.31 CPU, SkipLayerNormalization took
about 720 us against 171 us for Add + LayerNormalization at [1, 128, 768]. So each family is
decided by timing both forms at the model's shapes on the chosen EP (ORT_ENABLE_ALL,
interleaved); the timings and the decision go in the report. With ``--no-tune`` the fixed
defaults are: no Skip fusion on CPU, Skip fusion on CUDA.

Preconditions: the Add has two non-constant inputs of the same static shape [.., d] (rank 2 or
3), d matching gamma; the norm normalizes the last axis; the norm's extra outputs are unused;
the sum may have other readers (it becomes output 3); fp32/fp16 only (no fp64 kernel).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from .. import graph as G
from ..axes import per_axis
from ..pipeline import Analysis, Decline, Pass, tuning_shape

FUSED = {"SimplifiedLayerNormalization": "SkipSimplifiedLayerNormalization", "LayerNormalization": "SkipLayerNormalization"}
DEFAULT_FUSE = {"cpu": False, "cuda": True}
MARGIN = 0.05  # a tuned choice leaves the default only for a form measured at least 5% faster


def _candidate(graph, norm):
    x = norm.inputs[0]
    add = G.producer(x)
    if add is None or add.op != "Add" or len(add.inputs) != 2:
        return None, "its input is not an Add"
    a, s = add.inputs
    if G.const_value(a) is not None or G.const_value(s) is not None:
        return None, "the Add has a constant input"
    sa, ss = G.shape(a), G.shape(s)
    if sa is None or sa != ss or len(sa) not in (2, 3) or not isinstance(sa[-1], int) or any(v is None for v in sa):
        return None, "the Add's inputs are not of one known rank-2/3 shape"
    if int(norm.attrs.get("axis", -1)) not in (-1, len(sa) - 1):
        return None, "it does not normalize the last axis"
    if any(G.is_read(graph, o) for o in norm.outputs[1:]):
        return None, "its extra outputs are read (by a node or as graph outputs)"
    # the Skip ops take gamma (and beta) as one vector over d: a [1, 1, d] or one-element scale
    # broadcasts differently (it may widen the output's rank)
    for t in norm.inputs[1:3]:
        if t is not None and t.name and G.shape(t) != [sa[-1]]:
            return None, f"'{t.name}' is not a vector of the normalized width {sa[-1]}"
    dt = G.tensor_dtype(x)
    if dt is None or np.dtype(dt) not in (np.float32, np.float16):
        return None, "dtype is not fp32/fp16"
    return add, None


def _micro_model(op, shape, dtype, beta):
    et = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    d = shape[-1]
    inits = [onnx.numpy_helper.from_array(np.ones(d, dtype), "g")]
    if beta:
        inits.append(onnx.numpy_helper.from_array(np.zeros(d, dtype), "b"))
    ins = [helper.make_tensor_value_info(n, et, shape) for n in ("a", "s")]
    outs = [helper.make_tensor_value_info("y", et, shape), helper.make_tensor_value_info("sum", et, shape)]
    norm_in = ["g"] + (["b"] if beta else [])
    if op in FUSED.values():
        nodes = [helper.make_node(op, ["a", "s"] + norm_in, ["y", "", "", "sum"], domain="com.microsoft", epsilon=1e-5)]
    else:
        nodes = [helper.make_node("Add", ["a", "s"], ["sum"]),
                 helper.make_node(op, ["sum"] + norm_in, ["y"], axis=-1, epsilon=1e-5)]
    g = helper.make_graph(nodes, "micro", ins, outs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)], ir_version=8)


def time_family(norm_op, shape, dtype, beta, provider, runs=60, threads=None):
    """Median ms of the unfused (Add + norm) and fused (Skip) forms, interleaved."""
    from ..runtime_tests.micro import time_models

    models = [_micro_model(op, shape, dtype, beta) for op in (norm_op, FUSED[norm_op])]
    unfused, fused = time_models(models, {"a": shape, "s": shape}, dtype, provider, runs, threads=threads)
    return unfused, fused


class FuseSkipNorms(Pass):
    name = "fuse_skip"
    description = "fuse residual Add + (Simplified)LayerNormalization into ORT Skip ops where that measures faster (target ort)"

    def analyze(self, graph, ctx):
        a = Analysis()
        if ctx.target != "ort":
            return a
        groups = {}
        for norm in graph.nodes:
            if norm.op not in FUSED or (norm.domain or "") not in ("", "ai.onnx"):
                continue
            add, why = _candidate(graph, norm)
            if add is None:
                a.declined.append(Decline(norm.name, norm.op, f"no Skip fusion: {why}"))
                continue
            beta = norm.op == "LayerNormalization" and len(norm.inputs) > 2 and bool(norm.inputs[2].name)
            # dynamic dims are timed at the user's --shape sizes, else a representative size
            shape = tuning_shape(ctx, G.shape(norm.inputs[0]))
            key = (norm.op, shape, str(np.dtype(G.tensor_dtype(norm.inputs[0]))), beta)
            groups.setdefault(key, []).append((norm, add))
        decisions = ctx.state.setdefault("fuse_skip_decisions", [])
        for (op, shape, dtype, beta), members in groups.items():
            if ctx.tune:
                unfused, fused = time_family(op, shape, dtype, beta, ctx.provider, threads=ctx.threads)
                # leave the provider's default only for a form at least MARGIN faster
                default = DEFAULT_FUSE.get(ctx.provider, False)
                if default:  # fused by default: unfuse only if Add + norm is MARGIN faster
                    fuse = not unfused < (1 - MARGIN) * fused
                else:  # unfused by default: fuse only if the Skip op is MARGIN faster
                    fuse = fused < (1 - MARGIN) * unfused
                why = f"measured on {ctx.provider} at {list(shape)} {dtype}: Add+{op} {unfused * 1000:.1f} us, {FUSED[op]} {fused * 1000:.1f} us"
            else:
                fuse = DEFAULT_FUSE.get(ctx.provider, False)
                why = f"--no-tune default on {ctx.provider}"
            decisions.append({"family": f"Add+{op} -> {FUSED[op]}", "shape": list(shape), "dtype": dtype, "fuse": fuse, "why": why})
            ctx.notes.append(f"fuse_skip: {'fused' if fuse else 'kept unfused'} {len(members)} x Add+{op} ({why})")
            for norm, add in members:
                if fuse:
                    a.matches.append((norm, add))
                else:
                    a.declined.append(Decline(norm.name, norm.op, f"kept unfused: {why}"))
        return a

    def apply(self, graph, matches, ctx):
        namer = G.Namer(graph)
        n = 0
        for norm, add in matches:
            if not add.outputs or not norm.outputs:
                continue
            a, s = add.inputs
            total, y = add.outputs[0], norm.outputs[0]
            bias = None
            # absorb a writer's constant bias: a = Add(u, b) read only here
            for i, t in enumerate((a, s)):
                p = G.producer(t)
                if p is not None and p.op == "Add" and G.only_reader(graph, t, add):
                    bi = [k for k in (0, 1) if G.const_value(p.inputs[k]) is not None]
                    pa = per_axis(G.const_value(p.inputs[bi[0]]), p.inputs[1 - bi[0]]) if len(bi) == 1 else None
                    # the Skip op's bias is one vector over the last axis: a per-token [N, 1] bias is not one
                    if pa is not None and pa[0] == len(G.shape(t)) - 1 and G.const_value(p.inputs[1 - bi[0]]) is None:
                        bias = p.inputs[bi[0]]
                        u = p.inputs[1 - bi[0]]
                        p.inputs.clear()
                        p.outputs.clear()
                        a, s = (u, s) if i == 0 else (a, u)
                        if G.const_value(bias).ndim != 1:
                            bias = G.new_const(namer, f"{bias.name}_1d", G.const_value(bias).reshape(-1))
                        break
            gamma = norm.inputs[1]
            beta = norm.inputs[2] if norm.op == "LayerNormalization" and len(norm.inputs) > 2 and norm.inputs[2].name else None
            eps = float(norm.attrs.get("epsilon", 1e-5))
            ins = [a, s, gamma]
            if norm.op == "LayerNormalization":
                if beta is not None or bias is not None:
                    ins.append(beta if beta is not None else G.new_const(namer, "normopt_zero_beta", np.zeros_like(G.const_value(gamma))))
            if bias is not None:
                ins.append(bias)
            for node in (add, norm):
                node.inputs.clear()
                node.outputs.clear()
            outs = [y, G.new_var(namer, "normopt_unused_mean"), G.new_var(namer, "normopt_unused_inv_std"), total]
            G.add_node(graph, namer, FUSED[norm.op], ins, outs, {"epsilon": eps}, domain="com.microsoft", base=f"{norm.name}_skip")
            n += 1
        return n
