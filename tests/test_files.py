"""Input files: every file ONNX Runtime would refuse is bad input (exit 2, one line that says what
is wrong, nothing written), also when no pass changes the model; tensor kinds the graph layer
cannot hold (sparse, STRING) and protobuf group fields keep a valid model valid."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from conftest import init, make_model, preln_stream_model, sha, vi
from normopt import weights as W
from normopt.cli import main
from normopt.errors import NormoptError


def cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def ort_refuses(path) -> bool:
    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception:
        return True
    return False


def plain(w_shape=(32, 32)):
    """A model no pass changes (the unchanged-copy path): y = x @ w."""
    w = init("w", np.arange(np.prod(w_shape), dtype=np.float32).reshape(w_shape) / 100)
    return make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [vi("x", [4, w_shape[0]])],
                      [vi("y", [4, w_shape[1]])], [w])


def external(tmp_path, model, name="m.onnx", **entries):
    """Save with the weight w as external data in w.bin, then set its entries (key=value)."""
    p = tmp_path / name
    onnx.save(model, p, save_as_external_data=True, location="w.bin", size_threshold=0, all_tensors_to_one_file=True)
    m = onnx.load(p, load_external_data=False)
    t = next(t for t in m.graph.initializer if t.name == "w")
    info = {e.key: e.value for e in t.external_data}
    info.update({k: str(v) for k, v in entries.items()})
    del t.external_data[:]
    for k, v in info.items():
        e = t.external_data.add()
        e.key, e.value = k, v
    with open(p, "wb") as f:
        f.write(m.SerializeToString())
    return p


def _hashes(folder):
    return {p: (sha(folder / p) if os.path.isfile(folder / p) else "special") for p in os.listdir(folder)}


def assert_refused(tmp_path, path, *words):
    before = _hashes(tmp_path)
    out = tmp_path / "out.onnx"
    code, o, err = cli("optimize", path, "-o", out, "--no-tune", "--no-verify")
    assert code == 2, (code, o, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("normopt: error:"), err
    for w in words:
        assert w in lines[0], lines[0]
    assert "WireError" not in lines[0] and "DecodeError" not in lines[0]
    assert _hashes(tmp_path) == before
    return lines[0]


# --- external data ---------------------------------------------------------------------------


def test_external_data_pointing_into_the_model_file_itself(tmp_path):
    # the model file is large enough (a second, inline weight) for the region to exist
    m = plain()
    m.graph.initializer.append(init("pad", np.zeros(4096, np.float32)))
    p = external(tmp_path, m, location="m.onnx", offset=0)
    m2 = onnx.load(p, load_external_data=False)  # pad went external too: put it back inline
    for t in m2.graph.initializer:
        if t.name == "pad":
            t.CopyFrom(init("pad", np.zeros(4096, np.float32)))
    p.write_bytes(m2.SerializeToString())
    assert os.path.getsize(p) > 4096
    # ONNX Runtime 1.32 reads the model's own protobuf bytes as the weight here; no exporter
    # writes that, and a copy of it would compute garbage: refused as a corrupt reference
    assert_refused(tmp_path, p, "model file itself")


@pytest.mark.parametrize("key,value,words", [
    ("offset", -16, "negative"),
    ("length", -4096, "negative"),
    ("length", 2048, "length 2048"),
    ("offset", "12abc", "not a number"),
    ("location", "../w.bin", "outside"),
    ("location", "/etc/passwd", "absolute"),
    ("offset", 1 << 20, "past the end"),
])
def test_bad_external_references(tmp_path, key, value, words):
    p = external(tmp_path, plain(), **{key: value})
    assert ort_refuses(p)
    assert_refused(tmp_path, p, words)


def test_missing_and_special_external_data_files(tmp_path):
    p = external(tmp_path, plain(), location="gone.bin")
    assert_refused(tmp_path, p, "missing")
    os.mkfifo(tmp_path / "fifo.bin")
    p = external(tmp_path, plain(), name="f.onnx", location="fifo.bin")
    assert_refused(tmp_path, p, "not a regular file")


# --- tensors ---------------------------------------------------------------------------------


def _with_tensor(tmp_path, tensor, name="t.onnx"):
    """y = x @ w, plus an extra output reading the given tensor through Identity."""
    m = plain()
    m.graph.initializer.append(tensor)
    m.graph.node.append(helper.make_node("Identity", [tensor.name], ["z"]))
    m.graph.output.append(helper.make_tensor_value_info("z", tensor.data_type, None))
    p = tmp_path / name
    p.write_bytes(m.SerializeToString())
    return p


def _raw(name, dtype, dims, nbytes):
    t = TensorProto()
    t.name, t.data_type = name, dtype
    t.dims.extend(dims)
    t.raw_data = bytes(nbytes)
    return t


def _typed(name, dtype, dims, field, values):
    t = TensorProto()
    t.name, t.data_type = name, dtype
    t.dims.extend(dims)
    getattr(t, field).extend(values)
    return t


@pytest.mark.parametrize("tensor,words", [
    (_raw("r", TensorProto.FLOAT, [4], 12), "raw_data holds 12 bytes"),  # inline
    (_raw("r", TensorProto.FLOAT, [32, 32], 4100), "raw_data holds 4100 bytes"),  # referenced (over 1 KiB)
    (_raw("r", TensorProto.FLOAT, [-2, 4], 32), "negative"),
    (_raw("r", TensorProto.FLOAT, [1 << 40, 1 << 40], 16), "overflow"),
    (_raw("r", TensorProto.STRING, [3], 12), "STRING"),
    (_raw("r", TensorProto.STRING, [600], 2400), "STRING"),  # referenced
    (_raw("r", 99, [4], 16), "unknown data_type 99"),
    (_typed("r", TensorProto.FLOAT, [4], "float_data", [1.0, 2.0, 3.0]), "holds 3 values"),
    (_typed("r", TensorProto.INT64, [2, 2], "int64_data", [1, 2, 3]), "holds 3 values"),
    (_typed("r", TensorProto.INT64, [2], "float_data", [1.0, 2.0]), "holds 0 values in int64_data"),
])
def test_tensors_ort_refuses(tmp_path, tensor, words):
    p = _with_tensor(tmp_path, tensor)
    assert ort_refuses(p)
    assert_refused(tmp_path, p, "'r'", words)


def test_constant_attribute_and_subgraph_tensors_are_checked(tmp_path):
    bad = _raw("c", TensorProto.FLOAT, [8], 28)
    m = plain()
    m.graph.node.append(helper.make_node("Constant", [], ["z"], value=bad))
    m.graph.output.append(vi("z", [8]))
    p = tmp_path / "c.onnx"
    p.write_bytes(m.SerializeToString())
    assert ort_refuses(p)
    assert_refused(tmp_path, p, "'c'")
    # inside an If branch
    then = helper.make_graph([helper.make_node("Constant", [], ["b"], value=_raw("c2", TensorProto.FLOAT, [8], 4))],
                             "then", [], [vi("b", [8])])
    other = helper.make_graph([helper.make_node("Constant", [], ["b2"], value=init("c3", np.ones(8, np.float32)))],
                              "else", [], [vi("b2", [8])])
    m = plain()
    m.graph.input.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    m.graph.node.append(helper.make_node("If", ["cond"], ["z"], then_branch=then, else_branch=other))
    m.graph.output.append(vi("z", [8]))
    p = tmp_path / "s.onnx"
    p.write_bytes(m.SerializeToString())
    assert ort_refuses(p)
    assert_refused(tmp_path, p, "'c2'")


def test_an_attribute_ort_refuses_is_refused_when_nothing_changes(tmp_path):
    # Transpose's perm flipped to one that is not a permutation: ORT refuses the model at load
    m = plain()
    m.graph.node.append(helper.make_node("Transpose", ["y"], ["z"], perm=[1, 0]))
    m.graph.output.append(vi("z", [32, 4]))
    data = bytearray(m.SerializeToString())
    key = bytes(helper.make_attribute("perm", [1, 0]).SerializeToString())
    at = data.find(key)
    flipped = key.replace(b"\x40\x01\x40\x00", b"\x40\x01\x40\x01")
    assert at >= 0 and flipped != key
    data[at:at + len(key)] = flipped
    p = tmp_path / "a.onnx"
    p.write_bytes(bytes(data))
    assert ort_refuses(p)
    assert_refused(tmp_path, p)


def test_ort_refusal_beyond_our_own_checks_is_bad_input(tmp_path):
    # a type mismatch only ORT's type inference sees (Add of float and int64)
    m = plain()
    m.graph.initializer.append(init("k", np.ones((4, 32), np.int64)))
    m.graph.node.append(helper.make_node("Add", ["y", "k"], ["z"]))
    m.graph.output.append(vi("z", [4, 32]))
    p = tmp_path / "k.onnx"
    p.write_bytes(m.SerializeToString())
    assert ort_refuses(p)
    assert_refused(tmp_path, p, "ONNX Runtime")


# --- messages ----------------------------------------------------------------------------------


def test_truncated_model_says_where(tmp_path):
    data = preln_stream_model().SerializeToString()
    p = tmp_path / "cut.onnx"
    p.write_bytes(data[: len(data) // 2])
    line = assert_refused(tmp_path, p, "truncated at byte")
    assert "WireError" not in line


def test_garbage_says_what(tmp_path):
    p = tmp_path / "g.onnx"
    p.write_bytes(b"\xff" * 64)
    assert_refused(tmp_path, p, "not a valid ONNX model")


# --- tensor kinds -----------------------------------------------------------------------------


def _outputs(path, feeds):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def test_sparse_initializer_keeps_its_values(tmp_path):
    """A sparse initializer added to a Pre-LN stream: never read as zeros."""
    m = preln_stream_model()
    dense = np.zeros((1, 8, 16), np.float32)
    dense[0, 1, 3], dense[0, 5, 7] = 2.5, -1.25
    idx = np.flatnonzero(dense).astype(np.int64)
    sp = helper.make_sparse_tensor(numpy_helper.from_array(dense.reshape(-1)[idx], "sp"),
                                   numpy_helper.from_array(idx, "sp_idx"), list(dense.shape))
    m.graph.sparse_initializer.append(sp)
    old = m.graph.node[1].output[0]  # h0 = tok + pos
    m.graph.node[1].output[0] = "h0_pre"
    m.graph.node.insert(2, helper.make_node("Add", ["h0_pre", "sp"], [old]))
    src = tmp_path / "sp.onnx"
    onnx.save(m, src)
    out = tmp_path / "o.onnx"
    code, o, err = cli("optimize", src, "-o", out, "--no-tune")
    assert code == 0, (o, err)
    assert "sparse" in o
    feeds = {"ids": np.arange(8, dtype=np.int64).reshape(1, 8) % 32}
    np.testing.assert_array_equal(_outputs(out, feeds)[0], _outputs(src, feeds)[0])


def test_string_initializer_over_1kib_stays_strings(tmp_path):
    """A STRING initializer of 2 KiB and more, in a model written with external data."""
    m = preln_stream_model()
    words = np.array([f"token-{i:05d}" for i in range(300)], dtype=object)
    m.graph.initializer.append(numpy_helper.from_array(words, "vocab"))
    m.graph.node.append(helper.make_node("Identity", ["vocab"], ["vocab_out"]))
    m.graph.output.append(helper.make_tensor_value_info("vocab_out", TensorProto.STRING, [300]))
    src = tmp_path / "s.onnx"
    onnx.save(m, src, save_as_external_data=True, location="s.onnx.data", size_threshold=1024)
    out = tmp_path / "o.onnx"
    code, o, err = cli("optimize", src, "-o", out, "--no-tune")
    assert code == 0, (o, err)
    feeds = {"ids": np.arange(8, dtype=np.int64).reshape(1, 8) % 32}
    got = _outputs(out, feeds)
    assert list(got[1]) == list(words)
    t = next(t for t in onnx.load(out, load_external_data=False).graph.initializer if t.name == "vocab")
    assert t.data_location != TensorProto.EXTERNAL and len(t.string_data) == 300


def test_string_tensor_writer_never_writes_pointers(tmp_path):
    from normopt.io import write_model

    m = plain()
    m.graph.initializer.append(numpy_helper.from_array(np.array(["x" * 20] * 100, dtype=object), "s"))
    m.graph.node.append(helper.make_node("Identity", ["s"], ["z"]))
    m.graph.output.append(helper.make_tensor_value_info("z", TensorProto.STRING, [100]))
    assert W.tensor_nbytes(m.graph.initializer[-1]) == 2000
    write_model(m, str(tmp_path / "w.onnx"), external=True)
    z = _outputs(tmp_path / "w.onnx", {"x": np.ones((4, 32), np.float32)})[1]
    assert list(z) == ["x" * 20] * 100


def _group(field: int) -> bytes:
    """An unknown group field (wire types 3/4) holding a varint and a nested group."""
    inner = W._key(2, 0) + W._enc_varint(5) + W._key(3, 3) + W._key(1, 5) + b"\0\0\0\0" + W._key(3, 4)
    return W._key(field, 3) + inner + W._key(field, 4)


def test_protobuf_group_fields_are_skipped_like_onnx_and_ort_do(tmp_path):
    m = preln_stream_model()
    g = onnx.GraphProto()
    g.CopyFrom(m.graph)
    del g.initializer[:]
    inits = b"".join(W._ld(5, t.SerializeToString() + _group(900)) for t in m.graph.initializer)
    graph = g.SerializeToString() + inits + _group(901)
    m.ClearField("graph")
    data = m.SerializeToString() + W._ld(7, graph) + _group(902)
    src = tmp_path / "grp.onnx"
    src.write_bytes(data)
    onnx.checker.check_model(onnx.load(src))  # onnx reads it
    feeds = {"ids": np.arange(8, dtype=np.int64).reshape(1, 8) % 32}
    ref = _outputs(src, feeds)  # ORT runs it
    out = tmp_path / "o.onnx"
    code, o, err = cli("optimize", src, "-o", out, "--no-tune")
    assert code == 0, (o, err)
    np.testing.assert_allclose(_outputs(out, feeds)[0], ref[0], rtol=1e-4, atol=1e-4)


def test_an_unclosed_group_is_a_truncation(tmp_path):
    data = plain().SerializeToString() + W._key(903, 3) + W._key(1, 0) + b"\x01"
    p = tmp_path / "g.onnx"
    p.write_bytes(data)
    assert_refused(tmp_path, p, "never closed")


def test_a_tensor_type_without_a_shape_is_valid(tmp_path):
    """The IR lets a graph input's, output's or value_info's tensor type omit its shape (any
    shape), and ONNX Runtime loads such a model; the ONNX checker wants the field present. A
    model ORT loads is not refused: optimize writes it (verified), inspect and verify read it."""
    s = preln_stream_model(d=16, n=8, layers=1, expose_stream=True)
    m = onnx.shape_inference.infer_shapes(s)
    for vinfo in list(m.graph.output)[1:]:
        vinfo.type.tensor_type.ClearField("shape")  # outputs of any shape
    if len(m.graph.value_info):
        m.graph.value_info[0].type.tensor_type.ClearField("shape")
    p = tmp_path / "noshape.onnx"
    p.write_bytes(m.SerializeToString())
    assert not ort_refuses(p)
    with pytest.raises(Exception, match="shape"):
        onnx.checker.check_model(str(p))  # the checker alone refuses it
    out = tmp_path / "out.onnx"
    code, o, err = cli("optimize", p, "-o", out, "--no-tune")
    assert code == 0, err
    assert os.path.exists(out) and not ort_refuses(out)
    assert cli("inspect", p)[0] == 0
    code, o, err = cli("verify", p, out)
    assert code == 0, err


def test_the_load_check_starts_once_the_input_has_parsed(tmp_path, monkeypatch):
    """load_model hands the path and the weight bytes to on_parsed before its remaining checks
    (optimize starts ONNX Runtime's load check there); a model those checks refuse is still
    refused with the same line, and optimize joins the check it started before raising."""
    from normopt import api
    from normopt import io as nio

    p = tmp_path / "m.onnx"
    p.write_bytes(plain().SerializeToString())
    seen = []
    loaded = nio.load_model(str(p), on_parsed=lambda path, wb: seen.append((path, wb)))
    assert seen == [(str(p), loaded.weight_bytes)]
    # a tensor the checks refuse (raw_data of the wrong size): on_parsed ran, the refusal stands
    bad = _with_tensor(tmp_path, _raw("r", TensorProto.FLOAT, [4], 12))
    started = []
    real = nio.OrtCheck

    class Spy(real):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            started.append(self)

    monkeypatch.setattr(nio, "OrtCheck", Spy)
    with pytest.raises(NormoptError, match="raw_data holds 12 bytes"):
        api.optimize(str(bad), str(tmp_path / "o.onnx"), verify=False, tune=False)
    assert started and all(c.thread is None for c in started)  # joined
    assert not os.path.exists(tmp_path / "o.onnx")
