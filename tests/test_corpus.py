"""Real exporter outputs (issue 12): models made from random-init networks by tf2onnx, Keras 3,
paddle2onnx, Hugging Face Optimum (a merged decoder with its If), onnxruntime-genai's model builder
(SkipLayerNormalization, GroupQueryAttention, MatMulNBits) and onnxruntime.quantization (QDQ and
dynamic int8). Each is optimized as a user would, with no flags: it must verify equivalent, with
the number of LayerNorms converted to RMSNorm asserted and the reason for the others checked.

* ``tests/corpus/`` holds a committed subset (built by ``tests/corpus_builders/*.py``), always run;
* the ``exporters`` group (``pytest -m exporters``) runs the same checks on corpora built fresh
  by the exporters themselves, in the folders ``NORMOPT_CORPUS_DIRS`` names (os.pathsep-separated,
  each with the builder's manifest.json); ``.ci/run`` builds them in one virtualenv per exporter.
"""

from __future__ import annotations

import glob
import json
import os

import pytest

from normopt.api import optimize

from conftest import run_cli

HERE = os.path.join(os.path.dirname(__file__), "corpus")
QUANTIZED = "quantized weights"
POST_LN = "not invariant to the per-token mean"

# name -> (LNs converted to RMSNorm, substring every other LN's reason has, or None when all convert)
EXPECTED = {
    # tf2onnx / Keras 3: four algebraic LN forms, GlobalAveragePool means below opset 18
    "keras_preln_tf2onnx_opset13": (5, None),
    "keras_preln_tf2onnx_opset17": (5, None),
    "keras_preln_tf2onnx_opset18": (5, None),
    "keras_preln_kerasexport": (5, None),
    "tf_moments_preln_tf2onnx_opset13": (5, None),
    "tf_moments_preln_tf2onnx_opset18": (5, None),
    "tf_flaxstyle_preln_tf2onnx_opset13": (5, None),
    "tf_flaxstyle_preln_tf2onnx_opset18": (5, None),
    "tf_naive_preln_tf2onnx_opset13": (5, None),
    "tf_naive_preln_tf2onnx_opset18": (5, None),
    "keras_postln_tf2onnx_opset13": (0, "stream not convertible"),  # Post-LN: the sums are read raw
    # paddle2onnx (opset 11 upgraded to 13; Identity-wrapped weights; raw Constant -> Reshape gammas)
    "paddle_preln_enc_op11": (5, None),
    "paddle_preln_enc_op13": (5, None),
    "paddle_preln_enc_op17": (5, None),
    "paddle_preln_enc_op11_nofold": (5, None),
    "paddle_preln_enc_dyn_op11": (5, None),
    "paddle_preln_enc_dyn_op17": (5, None),
    "paddle_preln_enc_dyn_op11_nofold": (5, None),
    "paddle_svtr_rec_op11": (5, None),
    # Optimum: with past, and the merged decoder whose two branches sit inside an If
    "optimum_opt_decoder_model_merged": (10, None),
    "optimum_gpt2_with_past": (5, None),
    "optimum_bloom_with_past": (6, None),
    "optimum_gpt_neox_decoder_model": (5, None),
    # onnxruntime-genai: SkipLayerNormalization chains, GroupQueryAttention, MatMulNBits
    "genai_phi_fp32_cpu": (3, None),
    "genai_phi_int4_cpu": (0, QUANTIZED),
    "genai_phi_int8_cpu": (0, QUANTIZED),
    # onnxruntime.quantization: quantized stream writers are declined (normopt first, then quantize)
    "ortquant_gpt2_dynamic_int8": (0, QUANTIZED),
    "ortquant_gpt2_static_qdq": (0, QUANTIZED),
}
# the Hugging Face builder's names (every file it writes); the committed copies have their own names
for arch, per_graph in (("opt", 5), ("gpt2", 5), ("gpt_neox", 5), ("bloom", 6)):
    for kind, n in (("cli_model", per_graph), ("decoder_model", per_graph), ("decoder_with_past_model", per_graph),
                    ("decoder_model_merged", 2 * per_graph)):  # the merged decoder: both If branches
        EXPECTED[f"optimum_{arch}_{kind}"] = (n, None)
EXPECTED["genai_phi_fp16_cuda"] = (3, None)
ALIASES = {"ortquant_gpt2_dynamic": "ortquant_gpt2_dynamic_int8", "ortquant_gpt2_qdq": "ortquant_gpt2_static_qdq",
           "optimum_gpt2_with_past": "optimum_gpt2_cli_model", "optimum_bloom_with_past": "optimum_bloom_cli_model"}


def check(path, name, tmp_path):
    out = tmp_path / f"{os.path.basename(path)}.opt.onnx"
    res = optimize(str(path), str(out))  # no flags: the input defaults must do
    assert res.unchanged or res.verification.equivalent
    # every rewritten output is proved too (the validator, beside the dynamic check)
    assert res.unchanged or (res.proof is not None and res.proof.proved), getattr(res.proof, "summary", "no proof")
    ln = next(p for p in res.report.passes if p.name == "ln_to_rms")
    assert not res.report.errors, res.report.errors
    expected = EXPECTED.get(ALIASES.get(name, name))
    if expected is None:
        return ln.applied
    converted, reason = expected
    assert ln.applied == converted, (name, ln.applied, [d["reason"] for d in ln.declined])
    if reason is None:
        assert not ln.declined, ln.declined
    else:
        assert ln.declined and all(reason in d["reason"] for d in ln.declined), ln.declined
    return ln.applied


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(HERE, "*.onnx"))), ids=lambda p: os.path.basename(p)[:-5])
def test_committed_corpus(path, tmp_path):
    name = os.path.basename(path)[:-5]
    assert name in EXPECTED, f"add {name} to EXPECTED"
    check(path, name, tmp_path)


def test_cli_runs_an_optimum_merged_decoder_without_flags(tmp_path):
    src = os.path.join(HERE, "optimum_opt_decoder_model_merged.onnx")
    r = run_cli("optimize", src, "-o", tmp_path / "o.onnx", "--no-tune")
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("inputs:"))
    assert "past_sequence_length=0" in line and "use_cache_branch True/False by flag combination" in line


def _fresh_corpus():
    dirs = [d for d in os.environ.get("NORMOPT_CORPUS_DIRS", "").split(os.pathsep) if d]
    items = []
    for d in dirs:
        with open(os.path.join(d, "manifest.json")) as f:
            manifest = json.load(f)
        entries = manifest if isinstance(manifest, list) else manifest.get("models", [])
        items += [(e["path"], e["name"]) for e in entries if os.path.exists(e["path"])]
    return items


@pytest.mark.exporters
@pytest.mark.parametrize("item", _fresh_corpus() or [None], ids=lambda i: i[1] if i else "none")
def test_fresh_exporter_corpus(item, tmp_path):
    if item is None:
        pytest.skip("no fresh corpus: NORMOPT_CORPUS_DIRS names none (.ci/run builds them with the exporters)")
    path, name = item
    if name == "genai_phi_fp16_cpu":
        pytest.skip("onnxruntime-genai's fp16 CPU build runs only at past 0 or sequence 1, even in plain ONNX Runtime")
    check(path, name, tmp_path)
