"""A generator of random transformer-like ONNX graphs for property-based tests (hypothesis).

Ingredients, drawn per example:
  depth 1-6, width 8-96, tokens 1-8; opset 13-23; fp32 or fp16;
  blocks Pre-LN, Post-LN or parallel (x + f(N1(x)) + g(N2(x)));
  norms: LayerNormalization op (opset >= 17), decomposed LN (Div or Reciprocal, keepdims 0+Unsqueeze
  or 1, axes as attribute or input by opset, epsilon given or left to the default), decomposed
  RMSNorm, RMSNormalization op (opset >= 23), SLAB RepBN (Transpose-BN-Mul-Add-Transpose),
  Unified Norm (Div/Mul/Add by constants), BatchNormalization, or none;
  a norm over an axis other than the last; a Transpose whose perm moves the channel axis;
  writers MatMul+bias (bias [d], [1, 1, d] or [n, d]) or Gemm (transB, alpha, beta, and sometimes
  a bias Add after it), optional LayerScale;
  shared weights between blocks, a token table tied to the head;
  extra graph outputs that expose the stream or an intermediate value;
  hazards after a block (issue 11): an If reading the stream whose condition depends on the
  input's magnitude (the stress inputs flip it) or on a boolean flag input (verification drives
  both; the passes run inside such a branch, which holds a norm of its own), a Loop reading the
  stream, an If with a constant condition and several outputs, an existing x - ReduceMean(x),
  a per-token [n, 1] constant after a norm (n == d is the trap), a broadcast x[B,N,1] * s[d],
  a run-time gamma/beta (graph inputs), fp16 LNs kept in fp32 through Casts;
  an initializer that is also a graph input (an overridable default);
  hazards of issue 17: a one-element [1, 1, 1, 1] gamma or eps that widens a norm's output to
  rank 4, a norm reading the stream through a narrowing round-trip Cast (fp32 -> fp16 -> fp32,
  fp16 -> bf16 -> fp16), an existing x - ReduceMean(x) whose mean is a graph output,
  LayerNormalization's Mean / InvStdDev as graph outputs, a Dropout whose training_mode is a
  graph input (ratio 0, so either mode computes the same), and an empty tensor (a ReduceMean
  over a [0, d] constant, 0 in ONNX Runtime, added to the stream).
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

NORMS = ["ln_op", "ln_dec", "rms_dec", "rms_op", "repbn", "un", "bn", "none"]
HAZARDS = ["if_magnitude", "if_flag", "if_const", "loop", "centering", "per_token", "broadcast",
           "rank_widen", "narrow_cast", "exposed_mean", "extra_outputs", "dropout_flag", "empty"]


class Builder:
    def __init__(self, opset, dtype, seed):
        self.opset, self.dtype = opset, np.dtype(dtype)
        self.et = helper.np_dtype_to_tensor_dtype(self.dtype)
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.count = [], [], 0
        self.inputs = []  # extra graph inputs (flags, probes, run-time gammas)

    def name(self, base):
        self.count += 1
        return f"{base}_{self.count}"

    def const(self, arr, base="c", dtype=None):
        n = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(arr, dtype=dtype or self.dtype), n))
        return n

    def ints(self, vals):
        return self.const(np.asarray(vals, np.int64), "i", np.int64)

    def node(self, op, inputs, base=None, n_out=1, **attrs):
        outs = [self.name(base or op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.name("n_" + op), **attrs))
        return outs[0] if n_out == 1 else outs

    def rand(self, *shape, scale=1.0):
        return (scale * self.rng.standard_normal(shape)).astype(self.dtype)

    def reduce_mean(self, x, axis, keepdims=1):
        if self.opset >= 18:
            return self.node("ReduceMean", [x, self.ints([axis])], keepdims=keepdims)
        return self.node("ReduceMean", [x], axes=[axis], keepdims=keepdims)

    # -- norms ---------------------------------------------------------------------------------
    def input(self, base, elem, shape):
        name = self.name(base)
        self.inputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def norm(self, x, kind, d, axis, variant):
        g = self.const(1 + 0.2 * self.rng.standard_normal(d), "gamma")
        b = self.const(0.2 * self.rng.standard_normal(d), "beta")
        eps = variant.get("eps")
        if kind == "ln_op" and axis == -1 and variant.get("runtime"):  # gamma / beta fed at run time
            if variant["runtime"] in ("gamma", "both"):
                g = self.input("gamma_in", self.et, [d])
            if variant["runtime"] in ("beta", "both"):
                b = self.input("beta_in", self.et, [d])
        if kind == "ln_op" and axis == -1 and variant.get("cast") and self.dtype == np.float16:
            # an fp16 export that keeps LayerNorm in fp32 between Casts
            g32 = self.const(1 + 0.2 * self.rng.standard_normal(d), "gamma32", np.float32)
            b32 = self.const(0.2 * self.rng.standard_normal(d), "beta32", np.float32)
            x32 = self.node("Cast", [x], to=TensorProto.FLOAT)
            y32 = self.node("LayerNormalization", [x32, g32, b32], **({"epsilon": eps} if eps is not None else {}))
            return self.node("Cast", [y32], to=TensorProto.FLOAT16)
        if kind == "ln_op":
            kw = {"epsilon": eps} if eps is not None else {}
            if axis != -1:
                kw["axis"] = axis  # gamma must then cover the normalized axes
                g = self.const(1 + 0.2 * self.rng.standard_normal(variant["norm_shape"]), "gamma")
                b = self.const(0.2 * self.rng.standard_normal(variant["norm_shape"]), "beta")
            return self.node("LayerNormalization", [x, g, b], **kw)
        if kind in ("ln_dec", "rms_dec"):
            e = self.const(np.full((1, 1, 1, 1) if variant.get("eps4") else (), eps if eps is not None else 1e-5), "eps")
            keep = variant.get("keepdims", 1)
            if kind == "ln_dec":
                m = self.reduce_mean(x, axis, keep)
                if not keep:
                    m = self.node("Unsqueeze", [m, self.ints([axis])])
                c = self.node("Sub", [x, m])
            else:
                c = x
            sq = self.node("Pow", [c, self.const(2.0, "two")]) if variant.get("pow", True) else self.node("Mul", [c, c])
            v = self.reduce_mean(sq, axis, 1)
            s = self.node("Sqrt", [self.node("Add", [v, e])])
            if variant.get("recip"):
                n = self.node("Mul", [c, self.node("Reciprocal", [s])])
            else:
                n = self.node("Div", [c, s])
            if axis != -1:
                return n  # no per-channel gamma on a non-last axis
            y = self.node("Mul", [n, g])
            return self.node("Add", [y, b]) if kind == "ln_dec" else y
        if kind == "rms_op":
            return self.node("RMSNormalization", [x, g], axis=-1, **({"epsilon": eps} if eps is not None else {}))
        if kind in ("repbn", "bn"):
            perm = variant.get("perm", [0, 2, 1])
            xt = self.node("Transpose", [x], perm=perm)
            c = d if perm == [0, 2, 1] else variant["tokens"]
            bn = self.node("BatchNormalization", [xt, self.const(1 + 0.2 * self.rng.standard_normal(c), "bn_g"),
                                                  self.const(0.2 * self.rng.standard_normal(c), "bn_b"),
                                                  self.const(0.3 * self.rng.standard_normal(c), "bn_m"),
                                                  self.const(0.5 + self.rng.random(c), "bn_v")])
            if kind == "repbn":
                bn = self.node("Add", [bn, self.node("Mul", [xt, self.const(0.1 + 0.4 * self.rng.random(1), "eta")])])
            return self.node("Transpose", [bn], perm=perm)
        if kind == "un":
            s = self.const(np.sqrt(0.5 + self.rng.random(d)), "un_s")
            return self.node("Add", [self.node("Mul", [self.node("Div", [x, s]), g]), b])
        return x

    # -- writers -------------------------------------------------------------------------------
    def linear(self, x, d_in, d_out, kind, shared, n):
        if kind == "gemm":
            trans_b = int(self.rng.integers(0, 2))
            w = shared.get(("gemm", d_in, d_out, trans_b)) or self.const(self.rand(*((d_out, d_in) if trans_b else (d_in, d_out)), scale=1 / np.sqrt(d_in)), "W")
            shared[("gemm", d_in, d_out, trans_b)] = w
            x2 = self.node("Reshape", [x, self.ints([n, d_in])])
            y = self.node("Gemm", [x2, w, self.const(self.rand(d_out, scale=0.1), "C")], transB=trans_b,
                          alpha=float(self.rng.choice([1.0, 0.5, 1.5])), beta=float(self.rng.choice([1.0, 0.7, 2.0])))
            if self.rng.integers(0, 3) == 0:  # a bias Add after the Gemm's own C
                y = self.node("Add", [y, self.const(self.rand(d_out, scale=0.1), "gemm_b")])
            return self.node("Reshape", [y, self.ints([1, n, d_out])])
        w = shared.get(("mm", d_in, d_out)) or self.const(self.rand(d_in, d_out, scale=1 / np.sqrt(d_in)), "W")
        shared[("mm", d_in, d_out)] = w
        bias_shape = [(d_out,), (1, 1, d_out), (n, d_out)][int(self.rng.integers(0, 3))]
        return self.node("Add", [self.node("MatMul", [x, w]), self.const(self.rand(*bias_shape, scale=0.1), "b")])

    # -- hazards (issue 11) ---------------------------------------------------------------------
    def hazard(self, kind, x, d, n, cfg, shared, norm_kind):
        """Returns (new stream, [extra graph outputs with their shapes])."""
        vt = lambda name, shape=(1, n, d): helper.make_tensor_value_info(name, self.et, list(shape))  # noqa: E731
        if kind in ("if_magnitude", "if_flag", "if_const"):
            if kind == "if_magnitude":  # true only for large inputs (the x1000 stress input)
                cond = self.node("Greater", [self.node("ReduceMax", [self.node("Abs", [x])], keepdims=0),
                                             self.const(200.0, "limit")])
            elif kind == "if_flag":
                cond = self.input("flag", TensorProto.BOOL, [])
            else:
                cond = self.const(np.array(bool(self.rng.integers(0, 2))), "cond", np.bool_)
            outer_nodes = self.nodes
            self.nodes = []
            t_out = self.node("Relu", [x]) if kind != "if_flag" else self.node(
                "Add", [x, self.sublayer(self.norm(x, norm_kind, d, -1, {"eps": 1e-5}), d, n, cfg, shared)])
            t2 = self.node("Neg", [x])
            then_nodes, self.nodes = self.nodes, []
            e_out = self.node("Mul", [x, self.const(0.5, "half")]) if kind != "if_magnitude" else self.node(
                "Identity", [self.const(np.zeros((1, n, d)), "zeros")])
            e2 = self.node("Abs", [x])
            else_nodes = self.nodes
            self.nodes = outer_nodes
            then_g = helper.make_graph(then_nodes, self.name("then"), [], [vt(t_out), vt(t2)])
            else_g = helper.make_graph(else_nodes, self.name("else"), [], [vt(e_out), vt(e2)])
            o1, o2 = self.name("if_a"), self.name("if_b")
            self.nodes.append(helper.make_node("If", [cond], [o1, o2], name=self.name("n_If"), then_branch=then_g, else_branch=else_g))
            if kind == "if_const" and self.rng.integers(0, 2):
                return self.node("Add", [x, o1]), [(o2, (1, n, d))]  # the branch writes the stream
            return x, [(o1, (1, n, d)), (o2, (1, n, d))]
        if kind == "loop":
            v_in, v_out, cond_in, cond_out, it = (self.name(k) for k in ("v_in", "v_out", "c_in", "c_out", "it"))
            body = helper.make_graph(
                [helper.make_node("Identity", [cond_in], [cond_out]),
                 helper.make_node("Add", [self.node_free("Mul", [v_in, self.const(0.5, "half")], "lm"), x], [v_out])],
                self.name("body"), [helper.make_tensor_value_info(it, TensorProto.INT64, []),
                                    helper.make_tensor_value_info(cond_in, TensorProto.BOOL, []), vt(v_in)],
                [helper.make_tensor_value_info(cond_out, TensorProto.BOOL, []), vt(v_out)])
            body.node.insert(0, self._pending.pop())
            out = self.name("loop_out")
            self.nodes.append(helper.make_node("Loop", [self.const(np.array(2, np.int64), "trip", np.int64),
                                                        self.const(np.array(True), "true", np.bool_), x], [out],
                                               name=self.name("n_Loop"), body=body))
            return x, [(out, (1, n, d))]
        if kind == "centering":
            c = self.node("Sub", [x, self.reduce_mean(x, -1, 1)])
            return x, [(self.node("MatMul", [c, self.const(self.rand(d, d, scale=0.3), "cw")]), (1, n, d))]
        if kind == "per_token":
            y = self.norm(x, norm_kind, d, -1, {"eps": 1e-5})
            c = self.const(1 + 0.3 * self.rng.standard_normal((n, 1)), "per_token")
            return x, [(self.node("Mul", [y, c]), (1, n, d))]
        if kind == "broadcast":  # x[B,N,1] * s[d]: a per-token value spread over the channels
            m = self.reduce_mean(x, -1, 1)
            return self.node("Add", [x, self.node("Mul", [m, self.const(self.rand(d, scale=0.5), "s")])]), []
        if kind == "rank_widen":  # a one-element constant of rank 4 after (or inside) a norm: the output is rank 4
            eps4 = norm_kind in ("ln_dec", "rms_dec") and bool(self.rng.integers(0, 2))
            y = self.norm(x, norm_kind, d, -1, {"eps": 1e-5, "eps4": eps4})
            if not eps4:
                y = self.node("Mul", [y, self.const(np.full((1, 1, 1, 1), 1.25), "g4")])
            return x, [(y, (1, 1, n, d))]
        if kind == "narrow_cast":  # a norm of the stream rounded to a narrower float and back
            lo, hi = (TensorProto.BFLOAT16, TensorProto.FLOAT16) if self.dtype == np.float16 else (TensorProto.FLOAT16, TensorProto.FLOAT)
            c = self.node("Cast", [self.node("Cast", [x], to=lo)], to=hi)
            return x, [(self.norm(c, norm_kind, d, -1, {"eps": 1e-5}), (1, n, d))]
        if kind == "exposed_mean":  # x - mean(x) whose mean is a graph output
            m = self.reduce_mean(x, -1, 1)
            c = self.node("Sub", [x, m])
            return x, [(m, (1, n, 1)), (self.node("MatMul", [c, self.const(self.rand(d, d, scale=0.3), "cw")]), (1, n, d))]
        if kind == "extra_outputs" and self.opset >= 17 and self.dtype == np.float32:  # LN's Mean / InvStdDev exposed
            g = self.const(1 + 0.2 * self.rng.standard_normal(d), "gamma")
            b = self.const(0.2 * self.rng.standard_normal(d), "beta")
            y, mu, isd = self.node("LayerNormalization", [x, g, b], n_out=3, axis=-1)
            return self.node("Add", [x, self.sublayer(y, d, n, cfg, shared)]), [(mu, (1, n, 1)), (isd, (1, n, 1))]
        if kind == "dropout_flag" and self.opset >= 12:  # training_mode fed at run time (ratio 0: same either way)
            flag = self.input("training", TensorProto.BOOL, [])
            y = self.norm(x, norm_kind, d, -1, {"eps": 1e-5})
            return x, [(self.node("Dropout", [y, self.const(0.0, "ratio"), flag]), (1, n, d))]
        if kind == "empty":  # ReduceMean over an empty [0, d] constant: 0 in ONNX Runtime (NaN in onnx.reference)
            e = self.const(np.zeros((0, d)), "empty")
            if self.opset >= 18:
                r = self.node("ReduceMean", [e, self.ints([0])], keepdims=0)
            else:
                r = self.node("ReduceMean", [e], axes=[0], keepdims=0)
            return self.node("Add", [x, r]), []
        return x, []

    def node_free(self, op, inputs, base):
        """A node for a subgraph body (kept aside until the body is built)."""
        out = self.name(base)
        self._pending = getattr(self, "_pending", [])
        self._pending.append(helper.make_node(op, inputs, [out], name=self.name("n_" + op)))
        return out

    def sublayer(self, x, d, n, cfg, shared):
        h = self.linear(x, d, 2 * d, cfg["writer"], shared if cfg["share"] else {}, n)
        h = self.node("Relu", [h])
        y = self.linear(h, 2 * d, d, cfg["writer"], shared if cfg["share"] else {}, n)
        if cfg["layer_scale"]:
            y = self.node("Mul", [y, self.const(0.1 + self.rng.random(d), "ls")])
        return y


@st.composite
def transformer_graphs(draw):
    opset = draw(st.integers(13, 23))
    dtype = draw(st.sampled_from([np.float32, np.float16]))
    depth = draw(st.integers(1, 6))
    d = draw(st.sampled_from([8, 16, 24, 32, 48, 64, 96]))
    n = draw(st.sampled_from([1, 3, 8]))
    seed = draw(st.integers(0, 2**16))
    b = Builder(opset, dtype, seed)
    vocab = draw(st.sampled_from([8, 32]))
    use_ids = draw(st.booleans())
    tied = use_ids and draw(st.booleans())
    inputs = []
    if use_ids:
        table = b.const(b.rand(vocab, d), "table")
        inputs.append(helper.make_tensor_value_info("ids", TensorProto.INT64, [1, n]))
        x = b.node("Add", [b.node("Gather", [table, "ids"], axis=0), b.const(b.rand(1, n, d, scale=0.1), "pos")])
    else:
        table = None
        inputs.append(helper.make_tensor_value_info("x", b.et, [1, n, d]))
        x = "x"
    allowed = [k for k in NORMS if (k != "ln_op" or opset >= 17) and (k != "rms_op" or opset >= 23)]
    if dtype == np.float16:
        allowed = [k for k in allowed if k not in ("repbn", "bn")]  # no fp16 BatchNormalization kernel on ORT CPU
    shared, extra_outputs, hazard_outputs = {}, [], []
    family = draw(st.sampled_from(allowed))  # one norm kind per model, with occasional odd blocks out

    def draw_norm():
        kind = family if draw(st.integers(0, 7)) else draw(st.sampled_from(allowed))
        variant = {"eps": draw(st.sampled_from([None, 1e-5, 1e-6, 1e-3])), "keepdims": draw(st.sampled_from([0, 1])),
                   "recip": draw(st.booleans()), "pow": draw(st.booleans()), "tokens": n,
                   "runtime": draw(st.sampled_from([None] * 8 + ["gamma", "beta", "both"])),
                   "cast": draw(st.integers(0, 3)) == 0}
        axis = -1
        if kind in ("ln_op", "ln_dec", "rms_dec") and n > 1 and draw(st.integers(0, 9)) == 0:
            # a norm over an axis other than the last; not over a single token, where RMSNorm is
            # x / sqrt(x^2 + eps), a sign function no tolerance can compare (found by the fuzzer)
            axis = -2
            variant["norm_shape"] = (n, d)
        if kind in ("repbn", "bn") and draw(st.integers(0, 5)) == 0:
            # no channel move: BN's axis 1 is then the token axis, not the linear ops' channels
            variant["perm"] = [0, 1, 2]
        if kind == "ln_op" and axis != -1 and variant["eps"] is None:
            variant["eps"] = 1e-5
        return kind, axis, variant

    for i in range(depth):
        layout = draw(st.sampled_from(["pre", "pre", "pre", "pre", "post", "parallel"]))
        cfg = {"writer": draw(st.sampled_from(["matmul", "gemm"])), "share": draw(st.booleans()),
               "layer_scale": draw(st.booleans())}
        k1, a1, v1 = draw_norm()
        if layout == "pre":
            x = b.node("Add", [x, b.sublayer(b.norm(x, k1, d, a1, v1), d, n, cfg, shared)])
        elif layout == "post":
            x = b.norm(b.node("Add", [x, b.sublayer(x, d, n, cfg, shared)]), k1, d, a1, v1)
        else:
            k2, a2, v2 = draw_norm()
            f = b.sublayer(b.norm(x, k1, d, a1, v1), d, n, cfg, shared)
            g = b.sublayer(b.norm(x, k2, d, a2, v2), d, n, cfg, shared)
            x = b.node("Add", [b.node("Add", [x, f]), g])
        if draw(st.integers(0, 11)) == 0:
            extra_outputs.append(x)  # expose the raw stream
        if draw(st.integers(0, 3)) == 0:
            hz = draw(st.sampled_from(HAZARDS))
            kind = family if family in ("ln_op", "ln_dec", "rms_dec", "rms_op") else ("ln_op" if opset >= 17 else "ln_dec")
            x, outs_hz = b.hazard(hz, x, d, n, cfg, shared, kind)
            hazard_outputs.extend(outs_hz)
    if draw(st.integers(0, 3)):  # a final norm, mostly
        kf, af, vf = draw_norm()
        x = b.norm(x, kf, d, af, vf)
    outputs = [x]
    if tied:
        outputs = [b.node("MatMul", [x, b.node("Transpose", [table], perm=[1, 0])])]
        out_dims = [[1, n, vocab]]
    else:
        out_dims = [[1, n, d]]
    if draw(st.integers(0, 4)) == 0 and b.nodes:
        inter = b.nodes[draw(st.integers(0, len(b.nodes) - 1))].output[0]  # an intermediate value
        if inter not in outputs:
            extra_outputs.append(inter)
    outs = [helper.make_tensor_value_info(o, b.et, dims) for o, dims in zip(outputs, out_dims)]
    for o, dims in hazard_outputs:
        if o not in outputs:
            outs.append(helper.make_tensor_value_info(o, b.et, list(dims)))
            outputs.append(o)
    for o in dict.fromkeys(extra_outputs):
        if o not in outputs:
            outs.append(helper.make_tensor_value_info(o, b.et, None))
    overridable = []  # an initializer listed as a graph input too (IR >= 4): a default a caller may feed
    if b.inits and draw(st.integers(0, 9)) == 0:
        t = b.inits[draw(st.integers(0, len(b.inits) - 1))]
        overridable.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    graph = helper.make_graph(b.nodes, "fuzz", inputs + b.inputs + overridable, outs, b.inits)
    ops = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=ops, ir_version=helper.find_min_ir_version_for(ops))
    return model
