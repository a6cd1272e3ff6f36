"""The CLI contract: exit codes, one-line errors, nothing written on failure, inputs untouched."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from conftest import make_model, preln_stream_model, run_cli, sha, vi


PIPELINE = ["fold_constants", "remove_identity", "explicit_defaults", "split_skip_layernorm", "ln_to_rms",
            "crms", "refuse_skip_layernorm", "fold_affine", "cancel_layout", "fuse_skip"]


@pytest.fixture
def model_path(tmp_path):
    p = tmp_path / "model.onnx"
    onnx.save(preln_stream_model(), p)
    return p


def assert_bad_input(r, out, inputs_before: dict):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("normopt: error:"), r.stderr
    assert not os.path.exists(out)
    for p, h in inputs_before.items():
        assert sha(p) == h, f"{p} changed"
    d = os.path.dirname(out) or "."
    assert not os.path.isdir(d) or not [f for f in os.listdir(d) if f.startswith(".normopt-")]


# --- issue 2, "done when" ----------------------------------------------------------------------


def test_verify_self_is_equivalent(model_path):
    r = run_cli("verify", model_path, model_path)
    assert r.returncode == 0, r.stderr
    assert "EQUIVALENT" in r.stdout


def test_verify_detects_one_weight_changed_by_005(model_path, tmp_path):
    m = onnx.load(model_path)
    for i in m.graph.initializer:
        if len(i.dims) == 2 and i.data_type == onnx.TensorProto.FLOAT and i.name != "tok_table":
            arr = numpy_helper.to_array(i).copy()
            arr[0, 0] += 0.05
            i.CopyFrom(numpy_helper.from_array(arr, i.name))
            break
    cand = tmp_path / "cand.onnx"
    onnx.save(m, cand)
    r = run_cli("verify", model_path, cand, "--json", tmp_path / "v.json")
    assert r.returncode == 1, r.stdout + r.stderr
    data = json.loads((tmp_path / "v.json").read_text())
    assert data["equivalent"] is False
    assert data["outputs"][0]["max_abs"] > 1e-4


def test_verify_random_bytes_exit_2(model_path, tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    r = run_cli("verify", model_path, junk)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1


def test_optimize_junk_writes_nothing(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(np.random.default_rng(1).bytes(2048))
    out = tmp_path / "out.onnx"
    assert_bad_input(run_cli("optimize", junk, "-o", out), out, {junk: sha(junk)})


def test_bench_prints_medians_p90_ratios(model_path, tmp_path):
    opt = tmp_path / "opt.onnx"
    assert run_cli("optimize", model_path, "-o", opt).returncode == 0
    r = run_cli("bench", model_path, opt, "--runs", "10", "--warmup", "2", "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert "median ms" in r.stdout and "p90 ms" in r.stdout and "95% CI" in r.stdout
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("| ") and ".onnx" in ln]
    assert len(rows) == 2
    lo, hi = rows[1].split("|")[5].strip(" []").split(",")
    assert float(lo) <= float(rows[1].split("|")[4]) <= float(hi)
    r = run_cli("bench", model_path, opt, "--runs", "4", "--warmup", "1", "--format", "json")
    data = json.loads(r.stdout)
    assert [m["label"] for m in data["models"]] == ["model.onnx", "opt.onnx"]


# --- optimize ----------------------------------------------------------------------------------


def test_optimize_writes_verified_output_and_report(model_path, tmp_path):
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    before = sha(model_path)
    r = run_cli("optimize", model_path, "-o", out, "--report", rep, "--no-tune")  # deterministic forms
    assert r.returncode == 0, r.stderr
    assert "ln_to_rms" in r.stdout and "verified" in r.stdout
    assert sha(model_path) == before
    report = json.loads(rep.read_text())
    names = [p["name"] for p in report["passes"]]
    assert names == [p for p in PIPELINE if p != "crms"]  # crms is opt-in
    ln = report["passes"][names.index("ln_to_rms")]
    assert ln["applied"] == 3 and ln["ops_after"].get("SimplifiedLayerNormalization") == 3
    assert ln["ops_before"]["LayerNormalization"] == 3 and ln["seconds"] >= 0
    assert report["verification"]["equivalent"] is True
    assert run_cli("verify", model_path, out).returncode == 0


def test_optimize_refuses_to_write_a_wrong_model(model_path, tmp_path, monkeypatch):
    """A pass that breaks equivalence: optimize exits 1 and writes nothing."""
    import normopt.api as api
    from normopt.errors import VerificationFailed
    from normopt.pipeline import Analysis, Pass, Pipeline

    class Broken(Pass):
        name = "broken"

        def analyze(self, graph, ctx):
            mm = next(n for n in graph.nodes if n.op == "MatMul")
            return Analysis(matches=[mm.inputs[1]])

        def apply(self, graph, matches, ctx):
            v = matches[0].values.copy()
            v[0, 0] += 0.5  # one weight: not a per-token shift that a LayerNorm would absorb
            matches[0].values = v
            return 1

    monkeypatch.setattr(api, "build_pipeline", lambda *a, **k: Pipeline([Broken()]))
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    with pytest.raises(VerificationFailed) as e:
        api.optimize(str(model_path), str(out), report_path=str(rep))
    assert not out.exists()
    assert e.value.result is not None and not e.value.result.equivalent
    report = json.loads(rep.read_text())
    assert report["verification"]["equivalent"] is False
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".normopt-")]


def test_optimize_preserves_identity_of_model(tmp_path):
    m = preln_stream_model()
    m.doc_string = "my model"
    m.graph.doc_string = "graph doc"
    m.producer_name = "exporter-x"
    m.model_version = 7
    helper.set_model_props(m, {"author": "me", "license": "mit"})
    src, out = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(m, src)
    assert run_cli("optimize", src, "-o", out).returncode == 0
    o = onnx.load(out)
    assert o.doc_string == "my model" and o.graph.doc_string == "graph doc"
    assert o.producer_name == "exporter-x" and o.model_version == 7
    assert {p.key: p.value for p in o.metadata_props} == {"author": "me", "license": "mit"}
    assert [i.name for i in o.graph.input] == [i.name for i in m.graph.input]
    assert [i.name for i in o.graph.output] == [i.name for i in m.graph.output]
    assert {(i.domain, i.version) for i in m.opset_import} <= {(i.domain, i.version) for i in o.opset_import}
    from normopt.io import check_model

    check_model(o)


def test_external_data_in_external_data_out(tmp_path):
    m = preln_stream_model(d=64)
    src = tmp_path / "ext.onnx"
    onnx.save(m, src, save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    r = run_cli("optimize", src, "-o", out)
    assert r.returncode == 0, r.stderr
    assert (out.parent / "o.onnx.data").exists()
    assert run_cli("verify", src, out).returncode == 0


# --- bad inputs: one line, exit 2, nothing written, input untouched ---------------------------------


def _opset6(tmp_path):
    m = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [2])], [vi("y", [2])], opset=6, ir=3)
    p = tmp_path / "old.onnx"
    onnx.save(m, p)
    return p


def _no_outputs(tmp_path):
    m = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [2])], [])
    p = tmp_path / "noout.onnx"
    onnx.save(m, p)
    return p


def _missing_external(tmp_path):
    p = tmp_path / "ext.onnx"
    onnx.save(preln_stream_model(d=64), p, save_as_external_data=True, location="ext.bin", size_threshold=0)
    os.remove(tmp_path / "ext.bin")
    return p


def _short_external(tmp_path):
    p = tmp_path / "ext2.onnx"
    onnx.save(preln_stream_model(d=64), p, save_as_external_data=True, location="ext2.bin", size_threshold=0)
    with open(tmp_path / "ext2.bin", "r+b") as f:
        f.truncate(100)
    return p


def _truncated(tmp_path):
    p = tmp_path / "trunc.onnx"
    onnx.save(preln_stream_model(), p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return p


def _json(tmp_path):
    p = tmp_path / "model.json"
    p.write_text(json.dumps({"graph": {"node": []}}))
    return p


def _empty(tmp_path):
    p = tmp_path / "empty.onnx"
    p.write_bytes(b"")
    return p


def _directory(tmp_path):
    p = tmp_path / "adir.onnx"
    p.mkdir()
    return p


@pytest.mark.parametrize(
    "make",
    [_opset6, _no_outputs, _missing_external, _short_external, _truncated, _json, _empty, _directory],
    ids=["opset6", "no-outputs", "missing-external-data", "short-external-data", "truncated", "json", "empty", "directory"],
)
def test_bad_model_inputs(tmp_path, make):
    src = make(tmp_path)
    out = tmp_path / "out.onnx"
    before = {}
    if os.path.isfile(src):
        before[src] = sha(src)
    for f in tmp_path.iterdir():
        if f.is_file() and f != src:
            before[f] = sha(f)
    assert_bad_input(run_cli("optimize", src, "-o", out), out, before)


def test_missing_file(tmp_path):
    out = tmp_path / "out.onnx"
    assert_bad_input(run_cli("optimize", tmp_path / "nope.onnx", "-o", out), out, {})


def test_output_equal_to_input(model_path):
    before = sha(model_path)
    r = run_cli("optimize", model_path, "-o", model_path)
    assert r.returncode == 2 and "input" in r.stderr
    assert sha(model_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only directories")
def test_unwritable_output_dir(model_path, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        assert_bad_input(run_cli("optimize", model_path, "-o", ro / "o.onnx"), ro / "o.onnx", {model_path: sha(model_path)})
    finally:
        ro.chmod(stat.S_IRWXU)


def test_missing_output_dir(model_path, tmp_path):
    out = tmp_path / "no" / "such" / "o.onnx"
    assert_bad_input(run_cli("optimize", model_path, "-o", out), out, {model_path: sha(model_path)})


def test_unknown_shape_name(model_path, tmp_path):
    out = tmp_path / "o.onnx"
    r = run_cli("optimize", model_path, "-o", out, "--shape", "nosuch=1x2")
    assert_bad_input(r, out, {model_path: sha(model_path)})
    assert "nosuch" in r.stderr


def test_dynamic_dim_defaults_are_listed_and_overridable(tmp_path):
    m = preln_stream_model()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    src, out = tmp_path / "dyn.onnx", tmp_path / "o.onnx"
    onnx.save(m, src)
    r = run_cli("optimize", src, "-o", out, "--no-tune", "--report", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("inputs:"))
    assert "batch=1 (batch)" in line and "ids in [0, 32)" in line
    assert json.loads((tmp_path / "r.json").read_text())["verification"]["equivalent"]
    r = run_cli("optimize", src, "-o", out, "--no-tune", "--shape", "batch=3")
    assert r.returncode == 0, r.stderr
    assert "batch=1" not in r.stdout


def test_every_missing_range_in_one_message(tmp_path):
    nodes = [helper.make_node("Cast", ["n"], ["a"], to=onnx.TensorProto.FLOAT), helper.make_node("Cast", ["k"], ["b"], to=onnx.TensorProto.FLOAT),
             helper.make_node("Add", ["a", "b"], ["y"])]
    m = make_model(nodes, [vi("n", [2], onnx.TensorProto.INT64), vi("k", [2], onnx.TensorProto.INT32)], [vi("y", [2])])
    src, out = tmp_path / "ints.onnx", tmp_path / "o.onnx"
    onnx.save(m, src)
    r = run_cli("optimize", src, "-o", out)
    assert_bad_input(r, out, {src: sha(src)})
    assert "--int-range n=LO:HI" in r.stderr and "--int-range k=LO:HI" in r.stderr


def test_unknown_pass(model_path, tmp_path):
    out = tmp_path / "o.onnx"
    assert_bad_input(run_cli("optimize", model_path, "-o", out, "--passes", "nope"), out, {model_path: sha(model_path)})


def test_cuda_provider_without_gpu_is_a_clear_error(model_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("a CUDA provider is available here")
    r = run_cli("verify", model_path, model_path, "--provider", "cuda")
    assert r.returncode == 2 and "onnxruntime-gpu" in r.stderr


# --- passes / inspect --------------------------------------------------------------------------


def test_passes_lists_pipeline_in_order():
    r = run_cli("passes")
    assert r.returncode == 0
    names = [ln.split()[1] for ln in r.stdout.splitlines()]
    assert names == PIPELINE


def test_inspect_lists_norms_with_outcomes(tmp_path):
    src = tmp_path / "exposed.onnx"
    onnx.save(preln_stream_model(expose_stream=True, ln_form="div"), src)
    r = run_cli("inspect", src, "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert len(rows) == 3 and all(row["kind"] == "decomposed LN" for row in rows)
    assert all("graph output" in row["outcome"] for row in rows)
    good = tmp_path / "good.onnx"
    onnx.save(preln_stream_model(), good)
    rows = json.loads(run_cli("inspect", good, "--json").stdout)
    assert all("converts to RMSNorm" in row["outcome"] for row in rows)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_write_failure_even_as_root(model_path):
    """/proc refuses new files even for root: the staged write fails cleanly."""
    out = "/proc/normopt-test-output.onnx"
    assert_bad_input(run_cli("optimize", model_path, "-o", out), out, {model_path: sha(model_path)})


def test_verify_localize_names_first_diverging_node(model_path, tmp_path):
    m = onnx.load(model_path)
    target = next(n for n in m.graph.node if n.op_type == "MatMul" and n.input[1] == "l1_w1")
    w = next(i for i in m.graph.initializer if i.name == "l1_w1")
    arr = numpy_helper.to_array(w).copy()
    arr[:, 0] += 0.5
    w.CopyFrom(numpy_helper.from_array(arr, w.name))
    cand = tmp_path / "cand.onnx"
    onnx.save(m, cand)
    r = run_cli("verify", model_path, cand, "--localize", "--json", tmp_path / "v.json")
    assert r.returncode == 1
    fd = json.loads((tmp_path / "v.json").read_text())["first_divergence"]
    assert fd["node"] == target.name and fd["value"] == target.output[0], fd
    assert "first divergence" in r.stdout


def test_optimize_failure_report_names_first_divergence(model_path, tmp_path, monkeypatch):
    """optimize localizes its own failed verification, skipping values passes changed on purpose."""
    import normopt.api as api
    from normopt.errors import VerificationFailed
    from normopt.passes import all_passes
    from normopt.pipeline import Analysis, Pass, Pipeline

    class Broken(Pass):
        name = "broken"

        def analyze(self, graph, ctx):
            return Analysis(matches=[next(n for n in graph.nodes if n.op == "Relu")])

        def apply(self, graph, matches, ctx):
            matches[0].op = "Sigmoid"  # a wrong rewrite, after ln_to_rms centered the stream
            return 1

    monkeypatch.setattr(api, "build_pipeline", lambda *a, **k: Pipeline(all_passes() + [Broken()]))
    rep = tmp_path / "r.json"
    with pytest.raises(VerificationFailed) as e:
        api.optimize(str(model_path), str(tmp_path / "o.onnx"), report_path=str(rep))
    fd = e.value.result.first_divergence
    assert fd is not None and fd["op"] == "Sigmoid", fd
    assert json.loads(rep.read_text())["verification"]["first_divergence"]["op"] == "Sigmoid"


# --- more bad inputs (issue 6): graphs that are not valid, resources, harness options --------------


def _cycle(tmp_path):
    nodes = [helper.make_node("Relu", ["b"], ["a"]), helper.make_node("Relu", ["a"], ["b"]), helper.make_node("Relu", ["x"], ["y"])]
    return _save(tmp_path, "cycle.onnx", make_model(nodes, [vi("x", [2])], [vi("y", [2]), vi("a", [2])]))


def _dangling(tmp_path):
    nodes = [helper.make_node("Add", ["x", "nowhere"], ["y"])]
    return _save(tmp_path, "dangling.onnx", make_model(nodes, [vi("x", [2])], [vi("y", [2])]))


def _duplicate_outputs(tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["x"], ["y"])]
    return _save(tmp_path, "dup.onnx", make_model(nodes, [vi("x", [2])], [vi("y", [2])]))


def _unknown_domain(tmp_path):
    nodes = [helper.make_node("Frobnicate", ["x"], ["y"], domain="org.example")]
    return _save(tmp_path, "unk.onnx", make_model(nodes, [vi("x", [2])], [vi("y", [2])], extra_opsets=[("org.example", 1)]))


def _over_2gb(tmp_path):
    p = tmp_path / "huge.onnx"
    onnx.save(preln_stream_model(), p)
    with open(p, "r+b") as f:  # sparse: no disk is used
        f.truncate(2**31 + 1024)
    return p


def _save(tmp_path, name, model):
    p = tmp_path / name
    p.write_bytes(model.SerializeToString())  # bypass onnx.save's checks: these are invalid on purpose
    return p


@pytest.mark.parametrize("make", [_cycle, _dangling, _duplicate_outputs, _unknown_domain, _over_2gb],
                         ids=["cycle", "dangling-input", "duplicate-outputs", "unknown-domain-op", "over-2GB-no-external-data"])
def test_bad_graphs(tmp_path, make):
    src = make(tmp_path)
    out = tmp_path / "out.onnx"
    assert_bad_input(run_cli("optimize", src, "-o", out), out, {} if src.stat().st_size > 2**31 else {src: sha(src)})


def test_disk_full(model_path, tmp_path):
    """A write that fails part-way (file size limit, as a full disk does): exit 2, nothing left."""
    import resource
    import signal
    import subprocess
    import sys

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    out = tmp_path / "o.onnx"
    r = subprocess.run([sys.executable, "-m", "normopt.cli", "optimize", str(model_path), "-o", str(out)],
                       capture_output=True, text=True, preexec_fn=limit)
    assert_bad_input(r, out, {model_path: sha(model_path)})


def test_npz_inputs_with_wrong_names_dtypes_shapes(model_path, tmp_path):
    good = {"ids": np.zeros((1, 8), np.int64)}
    for name, feeds in [("names", {"tokens": good["ids"]}), ("dtype", {"ids": good["ids"].astype(np.int32)}),
                        ("shape", {"ids": np.zeros((1, 9), np.int64)})]:
        npz = tmp_path / f"{name}.npz"
        np.savez(npz, **feeds)
        out = tmp_path / "o.onnx"
        r = run_cli("optimize", model_path, "-o", out, "--inputs", npz)
        assert_bad_input(r, out, {model_path: sha(model_path)})
        assert name in r.stderr or "names" in r.stderr
    npz = tmp_path / "good.npz"
    np.savez(npz, **good)
    assert run_cli("verify", model_path, model_path, "--inputs", npz).returncode == 0


def test_unbounded_int_input(tmp_path):
    m = make_model([helper.make_node("Cast", ["n"], ["y"], to=onnx.TensorProto.FLOAT)], [vi("n", [2], onnx.TensorProto.INT64)], [vi("y", [2])])
    src, out = tmp_path / "int.onnx", tmp_path / "o.onnx"
    onnx.save(m, src)
    r = run_cli("optimize", src, "-o", out)
    assert_bad_input(r, out, {src: sha(src)})
    assert "--int-range n=" in r.stderr
    assert run_cli("optimize", src, "-o", out, "--int-range", "n=0:5").returncode == 0



# --- everyday use (issue 13) -------------------------------------------------------------------


def test_no_changes_writes_a_byte_identical_copy(tmp_path):
    m = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [2, 4])], [vi("y", [2, 4])])
    src, out = tmp_path / "relu.onnx", tmp_path / "o.onnx"
    onnx.save(m, src)
    r = run_cli("optimize", src, "-o", out, "--report", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    assert "no changes: wrote a byte-identical copy" in r.stdout and "guard" not in r.stdout
    assert sha(out) == sha(src)
    assert json.loads((tmp_path / "r.json").read_text())["notes"][0].startswith("no changes")
    assert f"report: {tmp_path / 'r.json'}" in r.stdout


def test_no_changes_with_external_data_beside_the_input(tmp_path):
    m = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [vi("x", [2, 64])], [vi("y", [2, 64])],
                   [numpy_helper.from_array(np.ones((64, 64), np.float32), "w")])
    src = tmp_path / "mm.onnx"
    onnx.save(m, src, save_as_external_data=True, location="mm.onnx.data", size_threshold=0)
    data_before = sha(tmp_path / "mm.onnx.data")
    r = run_cli("optimize", src, "-o", tmp_path / "o.onnx")
    assert r.returncode == 0, r.stderr
    assert sha(tmp_path / "o.onnx") == sha(src) and sha(tmp_path / "mm.onnx.data") == data_before
    assert run_cli("verify", src, tmp_path / "o.onnx").returncode == 0


def test_output_files_share_one_umask_mode(tmp_path):
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(preln_stream_model(d=128), src, save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    old = os.umask(0o027)
    try:
        r = run_cli("optimize", src, "-o", out, "--no-tune")
    finally:
        os.umask(old)
    assert r.returncode == 0, r.stderr
    modes = {stat.S_IMODE(os.stat(p).st_mode) for p in (out, str(out) + ".data")}
    assert modes == {0o640}, modes


def test_identical_declines_are_collapsed_and_inspect_keeps_whole_names(tmp_path):
    m = preln_stream_model(layers=3)
    for n in m.graph.node:
        n.name = f"a_rather_long_node_name_that_would_have_been_cut_{n.output[0]}"
    src = tmp_path / "m.onnx"
    onnx.save(m, src)
    r = run_cli("optimize", src, "-o", tmp_path / "o.onnx", "--no-tune")
    assert r.returncode == 0, r.stderr
    assert "left alone by fuse_skip: 3 x SimplifiedLayerNormalization: kept unfused" in r.stdout
    r = run_cli("inspect", src)
    assert "a_rather_long_node_name_that_would_have_been_cut_l0_ln" in r.stdout


def test_progress_in_a_log_goes_to_stdout(tmp_path, model_path):
    r = run_cli("optimize", model_path, "-o", tmp_path / "o.onnx", "--no-tune")
    assert r.returncode == 0 and "pass 1/" not in r.stderr  # stderr is not a terminal here
    assert "normopt: pass 1/10 fold_constants: applied" in r.stdout  # stdout is a pipe: one line per pass


def test_verify_junit_thresholds_and_github_summary(tmp_path, model_path):
    m = onnx.load(model_path)
    for i in m.graph.initializer:
        if i.name == "l0_w2":
            a = numpy_helper.to_array(i).copy()
            a *= 1.001  # a small, approximate difference
            i.CopyFrom(numpy_helper.from_array(a, i.name))
    cand = tmp_path / "cand.onnx"
    onnx.save(m, cand)
    summary = tmp_path / "summary.md"
    env_summary = {"GITHUB_STEP_SUMMARY": str(summary)}
    r = subprocess.run([sys.executable, "-m", "normopt.cli", "verify", model_path, cand, "--junit", tmp_path / "v.xml",
                        "--atol", "1e-6", "--rtol", "1e-6"], capture_output=True, text=True, env={**os.environ, **env_summary})
    assert r.returncode == 1
    xml = (tmp_path / "v.xml").read_text()
    assert 'testsuite name="normopt verify"' in xml and "<failure" in xml
    assert "NOT EQUIVALENT" in summary.read_text()
    r = subprocess.run([sys.executable, "-m", "normopt.cli", "verify", model_path, cand, "--min-cosine", "0.999", "--min-snr", "30"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
    r = subprocess.run([sys.executable, "-m", "normopt.cli", "verify", model_path, cand, "--min-snr", "200"], capture_output=True, text=True)
    assert r.returncode == 1 and "SNR" in r.stdout


def test_bench_sweep_table_verdicts_and_junit(tmp_path, model_path):
    r = run_cli("bench", model_path, model_path, "--runs", "4", "--warmup", "1", "--threads", "1,2", "--junit", tmp_path / "b.xml")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("| threads=1 |") == 2 and r.stdout.count("| threads=2 |") == 2
    verdicts = [ln for ln in r.stdout.splitlines() if ln.startswith("normopt: ") and " vs " in ln]
    assert len(verdicts) == 2 and all(v.endswith(("(threads=1)", "(threads=2)")) for v in verdicts)
    assert (tmp_path / "b.xml").read_text().count("<testcase") == 2
    r = run_cli("bench", model_path, model_path, "--runs", "4", "--warmup", "1", "--max-ratio", "0.01")
    assert r.returncode in (0, 1)  # the same model: measurably slower only by chance
