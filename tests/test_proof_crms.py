"""normopt.proof on CRMSNorm outputs (`optimize --crms`): streams carried in d-1 channels prove
from the two graphs and their weights; planted mutants of the compressed weights, tables,
biases and the CRMS constants are refused."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import preln_stream_model, with_initializer
from normopt.api import optimize_model
from normopt.proof import prove

VARIANTS = {
    "op": dict(d=16),
    "decomposed": dict(d=16, ln_form="div"),
    "gemm_writer": dict(d=16, gemm_writer=True),
    "tied_reader": dict(d=16, tied_reader=True),
    "opset18_recip": dict(d=16, opset=18, ln_form="recip"),
    "keepdims0": dict(d=16, ln_form="keepdims0"),
    "fp16": dict(d=16, dtype=np.float16),
}


def _crms(m, **kw):
    out, rep = optimize_model(m, opt_in=["crms"], **kw)
    assert next(p for p in rep.passes if p.name == "crms").applied >= 1
    return out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_crms_outputs_prove(variant):
    m = preln_stream_model(**VARIANTS[variant])
    out = _crms(m)
    res = prove(m, out)
    assert res.proved, res.summary
    assert res.details["norms_converted"] >= 3 and res.details["writers_centered"] >= 3


@pytest.mark.usefixtures("torch_available")
@pytest.mark.parametrize("name", ["gpt", "vit-cls", "dual-patchnorm"])
def test_crms_builder_outputs_prove(tmp_path, name):
    """Conv patch embeddings, Reshape / Transpose on the compressed stream, a cls token Concat, a
    decompressed final norm and a Dual PatchNorm's explicit centering + Slice."""
    from normopt.models import builders as B
    from normopt.models.export import example_inputs, export

    model = {"gpt": lambda: B.gpt("tiny"), "vit-cls": lambda: B.vit("tiny"),
             "dual-patchnorm": lambda: B.vit("tiny", dual_patchnorm=True)}[name]()
    src = tmp_path / "m.onnx"
    export(model, example_inputs(model, batch=2, seq=16), str(src))
    m = onnx.load(src)
    out = _crms(m)
    res = prove(m, out)
    assert res.proved, res.summary
    for kind, mm in list(crms_mutants(m, out))[:12]:
        r = prove(m, mm)
        assert not r.proved, f"{kind} mutant proved: {r.summary}"


# ------------------------------------------------------------------------------ mutants


def _orig_name(name, orig):
    base = name
    for suffix in ("_crms", "_centered", "_beta"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return base if base in orig else None


def crms_mutants(orig, opt):
    """(kind, mutant): a channel x1.02, one element x1.0005 (fp32), a bias element moved, a
    dropped channel (the stream keeps channels 1..d-1 instead of 0..d-2), the CRMS epsilon and
    1/d constants changed."""
    o = {t.name: numpy_helper.to_array(t) for t in orig.graph.initializer}
    for t in opt.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.dtype.kind != "f" or (t.name in o and o[t.name].shape == a.shape and np.array_equal(o[t.name], a)):
            continue
        b = a.astype(np.float64)
        if a.ndim >= 1 and a.size > 2:
            c = b.copy()
            c[..., 0] *= 1.02
            if not np.array_equal(c.astype(a.dtype), a):
                yield f"channel x1.02 of {t.name}", with_initializer(opt, t.name, c)
            if a.dtype == np.float32:
                c = b.copy()
                k = b.size // 3
                c.reshape(-1)[k] *= 1.0005
                if c.reshape(-1)[k] != 0:
                    yield f"element x1.0005 of {t.name}", with_initializer(opt, t.name, c)
        if a.ndim == 1 and a.size > 2 and a[0] != a[1]:
            c = b.copy()
            c[[0, 1]] = c[[1, 0]]
            yield f"bias element moved in {t.name}", with_initializer(opt, t.name, c)
        on = _orig_name(t.name, o)
        if on is not None and o[on].ndim == a.ndim:
            diff = [k for k in range(a.ndim) if o[on].shape[k] == a.shape[k] + 1]
            if len(diff) == 1 and all(o[on].shape[k] == a.shape[k] for k in range(a.ndim) if k != diff[0]):
                k = diff[0]
                full = np.concatenate([b, -b.sum(axis=k, keepdims=True)], axis=k)  # the d channels of a zero-mean stream
                yield f"dropped channel in {t.name}", with_initializer(opt, t.name, np.delete(full, 0, axis=k))
        if t.name.startswith("crms_eps"):
            yield f"epsilon changed in {t.name}", with_initializer(opt, t.name, b * 10)
        if t.name.startswith("crms_inv_d"):
            d = round(1.0 / float(b))
            yield f"1/d changed in {t.name}", with_initializer(opt, t.name, np.asarray(1.0 / (d - 1)))


@pytest.mark.parametrize("variant", ["op", "gemm_writer", "decomposed", "tied_reader", "fp16"])
def test_crms_mutants_are_refused(variant):
    m = preln_stream_model(**VARIANTS[variant])
    out = _crms(m)
    assert prove(m, out).proved
    kinds = set()
    for kind, mm in crms_mutants(m, out):
        res = prove(m, mm)
        assert not res.proved, f"{kind} mutant proved: {res.summary}"
        assert res.summary.startswith("not proved: ")
        kinds.add(kind.split(" of ")[0].split(" in ")[0])
    need = {"channel x1.02", "bias element moved", "dropped channel", "epsilon changed", "1/d changed"}
    if variant != "fp16":
        need.add("element x1.0005")
    assert need <= kinds, kinds


def test_a_compressed_stream_exposed_as_an_output_is_not_proved():
    """The d-1 channels are not the original's d: a graph output reading them never proves."""
    m = preln_stream_model(d=16)
    out = _crms(m)
    bad = copy.deepcopy(out)
    h1 = next(n.output[0] for n in bad.graph.node if n.op_type == "Add" and n.output[0] == "h1")
    bad.graph.output[0].name = h1
    m2 = copy.deepcopy(m)
    m2.graph.output[0].name = "h1"
    res = prove(m2, bad)
    assert not res.proved and "h1" in res.summary


def test_a_wrong_last_channel_in_the_decompression_is_refused():
    """Concat(x_c, +sum x_c) instead of -sum: the decompressed value is not F."""
    m = preln_stream_model(d=16)
    out = _crms(m)
    bad = copy.deepcopy(out)
    neg = next(n for n in bad.graph.node if n.op_type == "Neg")
    neg.op_type = "Identity"
    res = prove(m, bad)
    assert not res.proved


@pytest.mark.usefixtures("torch_available")
@pytest.mark.parametrize("kind", ["whisper-encoder", "clip-vision"])
def test_crms_hf_outputs_prove(tmp_path, kind):
    """Whisper's conv front end (an explicit centering, compressed, then GELU's x 0.5 on the
    compressed stream) and CLIP's expanded cls token."""
    from normopt.models.hf import export_hf

    src = tmp_path / "m.onnx"
    export_hf(kind, str(src))
    m = onnx.load(src)
    out = _crms(m)
    res = prove(m, out)
    assert res.proved, res.summary


def test_a_layerscale_writer_centered_after_its_own_rounding_proves():
    """A fuzzed model (kept under tests/proof_cases): the LayerScale folded into a writer, W diag(c)
    rounded to fp32, then centered. One weight element's error exceeded the bound of one rounding
    of the result and one of the intermediate (the row's mean moves by the mean of the
    intermediate's roundings): that centering is now followed exactly, with and without --crms."""
    import os

    m = onnx.load(os.path.join(os.path.dirname(__file__), "proof_cases", "fuzz_layerscale_writer.onnx"))
    for opt_in in ([], ["crms"]):
        out, _ = optimize_model(m, opt_in=opt_in)
        res = prove(m, out)
        assert res.proved, (opt_in, res.summary)


def test_a_compressed_stream_read_by_two_norms_proves():
    """A fuzzed fp16 model (kept under tests/proof_cases): two decomposed LayerNorms read one
    stream, so its CRMSNorm output relates to both originals' outputs; the Reshape before a
    Gemm reader must keep both (it kept the first only, and the reader's weight was not that
    norm's)."""
    import os

    m = onnx.load(os.path.join(os.path.dirname(__file__), "proof_cases", "fuzz_crms_two_norms_one_stream.onnx"))
    out = _crms(m)
    res = prove(m, out)
    assert res.proved, res.summary
    for kind, mm in crms_mutants(m, out):
        if "1.0005" not in kind:
            assert not prove(m, mm).proved, kind


def test_a_layerscale_writer_with_a_full_bias_proves():
    """A fuzzed model (tests/proof_cases): MatMul, a bias of shape [tokens, d], then a
    LayerScale, into the stream. The compressed relation is stated on the MatMul output with
    the LayerScale as its scale, and the bias (cast after the scale, then centered) as a shift."""
    import os

    m = onnx.load(os.path.join(os.path.dirname(__file__), "proof_cases", "fuzz_crms_layerscale_full_bias.onnx"))
    out = _crms(m)
    res = prove(m, out)
    assert res.proved, res.summary
    for kind, mm in crms_mutants(m, out):
        assert not prove(m, mm).proved, kind
