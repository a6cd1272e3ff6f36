"""normopt.proof on the exporter corpus (tests/corpus): every model's optimized output proves,
and mutants planted into each output are refused, shape constants included. The prover derives
shape-computed constants itself (normopt/proof/symshape.py), so these also test that tracker:
what it derives must be true for every input size.

Each model is optimized once per module; every proof runs without ONNX Runtime."""

from __future__ import annotations

import copy
import os

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from conftest import make_model, vi
from normopt import io as nio
from normopt.api import optimize_model
from normopt.proof import prove
from test_proof import _inline, _with_init, mutants

CORPUS = os.path.join(os.path.dirname(__file__), "corpus")
NAMES = sorted(f for f in os.listdir(CORPUS) if f.endswith(".onnx"))


@pytest.fixture(scope="module")
def optimized():
    cache = {}

    def get(name):
        if name not in cache:
            orig = _inline(nio.load_model(os.path.join(CORPUS, name)).model)
            out, _ = optimize_model(orig)
            cache[name] = (orig, onnx.load_from_string(_inline(out).SerializeToString()))
        return cache[name]

    return get


def shape_mutants(opt, orig):
    """Integer constants of the output (folded shape vectors, axes, indices) with two different
    entries swapped, where the original holds no such constant under that name."""
    known = {t.name for t in orig.graph.initializer}
    for t in opt.graph.initializer:
        if t.data_type != onnx.TensorProto.INT64 or t.name in known:
            continue
        a = numpy_helper.to_array(t)
        if a.ndim != 1 or a.size < 2:
            continue
        for i in range(a.size - 1):
            if a[i] != a[i + 1] and a[i] > 0 and a[i + 1] > 0:
                b = a.copy()
                b[[i, i + 1]] = b[[i + 1, i]]
                yield "shape constant changed", _with_init(opt, t.name, b)
                break
    for t in opt.graph.initializer:  # a quantized weight element one step off
        if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) and len(t.dims) >= 2:
            a = numpy_helper.to_array(t)
            b = a.copy()
            k = b.size // 3
            v = int(b.reshape(-1)[k])
            b.reshape(-1)[k] = v + 1 if v < 100 else v - 1
            yield "quantized element changed", _with_init(opt, t.name, b)


KINDS = {"channel x1.02", "element x1.0005", "bias element moved", "epsilon changed", "transpose perm swapped",
         "centering dropped"}


@pytest.mark.parametrize("name", NAMES)
def test_corpus_output_proves_and_its_mutants_are_refused(optimized, name):
    orig, out = optimized(name)
    res = prove(orig, out)
    assert res.proved, res.summary
    planted = {}
    for kind, m in list(mutants(orig, out)) + list(shape_mutants(out, orig)):
        if planted.get(kind, 0) >= 1:
            continue  # one of each kind per model keeps the suite fast
        r = prove(orig, m)
        assert not r.proved, f"{name}: {kind} mutant proved: {r.summary}"
        planted[kind] = planted.get(kind, 0) + 1
    # every model gets weight mutants; the normalized ones also norm and centering mutants
    if any(t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 2 for t in out.graph.initializer):
        assert {"channel x1.02", "element x1.0005"} <= set(planted), planted
    else:
        assert "quantized element changed" in planted, planted
    if res.details["norms_converted"]:
        assert {"epsilon changed", "centering dropped"} & set(planted), planted


def test_every_mutant_kind_is_planted_somewhere(optimized):
    """The six kinds of the issue (and shape-constant changes) each occur in the corpus's outputs."""
    seen = set()
    for name in ("keras_preln_kerasexport.onnx", "optimum_bloom_with_past.onnx", "tf_naive_preln_tf2onnx_opset18.onnx"):
        orig, out = optimized(name)
        seen |= {k for k, _ in mutants(orig, out)} | {k for k, _ in shape_mutants(out, orig)}
    assert KINDS | {"shape constant changed"} <= seen, seen


# ------------------------------------------------------------------------------ shape tracker


def _reshape_model(batch="b"):
    """y = Reshape(x, Concat(Shape(x)[0:2], [2, 4])): the shape is computed from x at run time."""
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Slice", ["s", "st", "en"], ["bs"], name="slice"),
             helper.make_node("Concat", ["bs", "tail"], ["shp"], axis=0, name="concat"),
             helper.make_node("Reshape", ["x", "shp"], ["y"], name="reshape")]
    inits = [numpy_helper.from_array(np.array([0], np.int64), "st"), numpy_helper.from_array(np.array([2], np.int64), "en"),
             numpy_helper.from_array(np.array([2, 4], np.int64), "tail")]
    return make_model(nodes, [vi("x", [batch, 3, 8])], [vi("y", [batch, 3, 2, 4])], inits)


def _folded(m, shape):
    opt = copy.deepcopy(m)
    keep = [n for n in opt.graph.node if n.op_type == "Reshape"]
    del opt.graph.node[:]
    opt.graph.node.extend(keep)
    del opt.graph.initializer[:]
    opt.graph.initializer.append(numpy_helper.from_array(np.array(shape, np.int64), "shp"))
    return opt


def test_a_shape_fold_valid_for_every_size_proves():
    m = _reshape_model()
    # -1 and 0 give the same output shape as the computed one for every batch size
    for shape in ([-1, 3, 2, 4], [0, 3, 2, 4], [0, 0, 2, 4], [-1, 3, 8 // 4, 4]):
        res = prove(m, _folded(m, shape))
        assert res.proved, (shape, res.summary)


def test_a_shape_fold_valid_for_one_size_only_is_refused():
    """Folding the symbolic batch to a number is right for that batch only: refused. With a
    static batch the same constant is right: proved."""
    m = _reshape_model()
    for shape in ([1, 3, 2, 4], [2, 3, 2, 4], [-1, 3, 4, 2], [0, 3, 4, 2], [-1, 2, 4]):
        res = prove(m, _folded(m, shape))
        assert not res.proved, (shape, res.summary)
    static = _reshape_model(batch=2)
    assert prove(static, _folded(static, [2, 3, 2, 4])).proved
    assert not prove(static, _folded(static, [2, 3, 4, 2])).proved


def test_tracker_facts_hold_for_every_size():
    from normopt.proof.symshape import Sym, cmp, div, mul

    b, s = Sym.var("b"), Sym.var("s")
    assert cmp("Equal", s, -1) is False  # a dim is never -1: tf2onnx's -1 guards fold
    assert cmp("Equal", s, 1) is None  # but may be 1
    assert cmp("Equal", mul(b, 4), mul(4, b)) is True
    assert div(mul(b, 8), 4) == mul(b, 2)
    assert div(mul(b, 6), 4) is None  # not exact for every b
    assert div(b, s) is None


# ------------------------------------------------------------------------------ fuzzer stragglers


def test_a_reduction_over_an_empty_tensor_is_not_taken_for_a_nan_constant():
    """ReduceMean of an empty tensor is 0 in ONNX Runtime (NaN in onnx.reference): the prover
    does not evaluate arithmetic over empty tensors, so neither a fold of it to NaN (which would
    make x + NaN 'NaN whatever x', absorbing any change upstream) nor a mutant behind it proves."""
    d = 8
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((d, d)).astype(np.float32), "w")
    empty = numpy_helper.from_array(np.zeros((0, d), np.float32), "empty")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("ReduceMean", ["empty"], ["nan"], axes=[0], keepdims=0, name="rm"),
             helper.make_node("Add", ["h", "nan"], ["y"], name="add")]
    m = make_model(nodes, [vi("x", [2, d])], [vi("y", [2, d])], [w, empty], opset=17)
    with np.errstate(all="ignore"):
        assert prove(m, copy.deepcopy(m)).proved
        folded = copy.deepcopy(m)
        del folded.graph.node[1]
        del folded.graph.initializer[1]
        folded.graph.initializer.append(numpy_helper.from_array(np.full(d, np.nan, np.float32), "nan"))
        assert not prove(m, folded).proved
        bad = copy.deepcopy(m)
        arr = numpy_helper.to_array(bad.graph.initializer[0]).copy()
        arr[:, 0] *= 1.02
        bad.graph.initializer[0].CopyFrom(numpy_helper.from_array(arr, "w"))
        assert not prove(m, bad).proved


def test_an_existing_centering_is_also_a_centered_relation():
    """The optimizer may read the original's own x - ReduceMean(x) node by name (the node is
    identical) while a norm needs x centered: both relations are kept."""
    # the same x - ReduceMean(x) nodes in both graphs, read by an LN (original) / RMS (optimized)
    d = 16
    rng = np.random.default_rng(1)
    g = numpy_helper.from_array((1 + 0.1 * rng.standard_normal(d)).astype(np.float32), "g")
    ax = numpy_helper.from_array(np.array([-1], np.int64), "ax")
    cw = numpy_helper.from_array(rng.standard_normal((d, d)).astype(np.float32), "cw")
    base = [helper.make_node("ReduceMean", ["x", "ax"], ["mu"], keepdims=1, name="rm"),
            helper.make_node("Sub", ["x", "mu"], ["xc"], name="sub"),
            helper.make_node("MatMul", ["xc", "cw"], ["y1"], name="mm")]
    o = make_model(base + [helper.make_node("LayerNormalization", ["x", "g"], ["y2"], axis=-1, epsilon=1e-5, name="ln")],
                   [vi("x", [2, d])], [vi("y1", [2, d]), vi("y2", [2, d])], [g, ax, cw], opset=18)
    p = make_model(base + [helper.make_node("SimplifiedLayerNormalization", ["xc", "g"], ["y2"], axis=-1, epsilon=1e-5,
                                            name="ln")],
                   [vi("x", [2, d])], [vi("y1", [2, d]), vi("y2", [2, d])], [g, ax, cw], opset=18)
    assert prove(o, p).proved
    wrong = copy.deepcopy(p)
    wrong.graph.node[-1].input[0] = "x"  # RMS of the uncentered value
    assert not prove(o, wrong).proved


def test_fp16_centered_weight_elements_off_by_16_ulps_are_refused():
    """fp16 weight facts are judged at the rounding of one or two float64 -> fp16 casts: a
    centered writer weight element 16 ulps off is refused, for each element tried (the bound
    used to be 3 eps of three terms, which let such changes through)."""
    from conftest import preln_stream_model

    m = preln_stream_model(dtype=np.float16)
    out, _ = optimize_model(m)
    assert prove(m, out).proved
    name = next(t.name for t in out.graph.initializer if t.name.endswith("w2_centered"))
    a = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == name))
    for k in range(0, a.size, max(1, a.size // 24)):
        b = a.copy().reshape(-1)
        v = b[k]
        for _ in range(16):
            v = np.nextafter(v, np.float16(np.inf) if v >= 0 else np.float16(-np.inf))
        b[k] = v
        res = prove(m, _with_init(out, name, b.reshape(a.shape).astype(np.float64)))
        assert not res.proved, (k, res.summary)


def test_tracker_derives_only_what_holds_for_every_size():
    """Range(0, s - 4) has s - 4 elements only when s >= 4: unknown. A Slice [0:e] of a static dim
    16 is min(16, e), and broadcasting it against e gives e."""
    from normopt.proof.symshape import Sym, Tracker, add, to_dim

    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "one"], ["n"], axis=0),
             helper.make_node("Sub", ["n", "four"], ["n4"]), helper.make_node("Add", ["n", "four"], ["n8"]),
             helper.make_node("Range", ["zero", "n4", "one"], ["r_unknown"]),
             helper.make_node("Range", ["zero", "n8", "one"], ["r_known"]),
             helper.make_node("Unsqueeze", ["n", "zero1"], ["e"]),
             helper.make_node("Slice", ["table", "zero1", "e", "zero1"], ["sl"]),
             helper.make_node("Add", ["x", "sl"], ["y"])]
    inits = [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in
             (("one", 1), ("four", 4), ("zero", 0), ("zero1", [0]))]
    inits.append(numpy_helper.from_array(np.zeros((16, 8), np.float32), "table"))
    m = make_model(nodes, [vi("x", [2, "seq", 8])], [vi("y", [2, "seq", 8])], inits, opset=17)
    t = Tracker(m.graph, {"": 17})
    t.run(m.graph.node)
    seq = Sym.var("seq")
    assert t.S("r_unknown") == [None]
    assert t.S("r_known") == [add(seq, 4)]
    assert to_dim(t.S("sl")[0]) == "min(16,seq)"
    assert t.S("y") == [2, seq, 8]


def test_an_overridable_shape_initializer_is_not_folded():
    """A shape vector that is an initializer AND a graph input is only a default: a Reshape
    reading a value computed from it is not the constant its default would give."""
    m = _reshape_model(batch=2)
    m.graph.input.append(vi("tail", [2], onnx.TensorProto.INT64))
    opt = _folded(m, [2, 3, 2, 4])  # keeps the input list: x and tail
    opt.graph.initializer.append(numpy_helper.from_array(np.array([2, 4], np.int64), "tail"))
    res = prove(m, opt)
    assert not res.proved, res.summary


def test_tracker_shapes_a_resize_by_sizes():
    """A Resize by `sizes` (a shape computed at run time, as DETR's mask does) has those sizes as
    its dims, on `axes` where given; a policy that keeps the aspect ratio is left unknown."""
    from normopt.proof.symshape import Sym, Tracker

    def model(opset=18, **attrs):
        nodes = [helper.make_node("Shape", ["x"], ["s"]),
                 helper.make_node("Slice", ["s", "zero1", "two1"], ["bc"]),
                 helper.make_node("Concat", ["bc", "hw"], ["sizes"], axis=0),
                 helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="nearest", **attrs),
                 helper.make_node("Resize", ["x", "", "", "hw"], ["z"], mode="nearest", axes=[2, 3])]
        inits = [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in
                 (("zero1", [0]), ("two1", [2]), ("hw", [64, 48]))]
        return make_model(nodes, [vi("x", ["b", 3, 8, 8])], [vi("y", None), vi("z", None)], inits, opset=opset)

    m = model()
    t = Tracker(m.graph, {"": 18})
    t.run(m.graph.node)
    assert t.S("y") == [Sym.var("b"), 3, 64, 48]
    assert t.S("z") == [Sym.var("b"), 3, 64, 48]
    m = model(keep_aspect_ratio_policy="not_larger")
    t = Tracker(m.graph, {"": 18})
    t.run(m.graph.node)
    assert t.S("y") is None


def test_an_overridable_initializer_is_not_propagated_as_a_value_by_shape_inference():
    """ONNX's data propagation takes an initializer's value as fixed, even one listed as a graph
    input (a default a caller may override): the prover's types infer it as an input instead,
    so a Reshape to it has no static shape."""
    from normopt.proof.graphs import infer_types

    nodes = [helper.make_node("Reshape", ["x", "tail"], ["y"])]
    m = make_model(nodes, [vi("x", [2, 3, 8]), vi("tail", [3], onnx.TensorProto.INT64)], [vi("y", None)],
                   [numpy_helper.from_array(np.array([2, 3, 8], np.int64), "tail")])
    shape = infer_types(m).get("y")
    assert shape is None or shape[1] is None or any(not isinstance(d, int) for d in shape[1]), shape
    m.graph.input.pop()  # not an input: a constant, and its value is the shape
    assert infer_types(m)["y"][1] == (2, 3, 8)
