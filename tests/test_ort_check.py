"""io.OrtCheck: the load check of the input, in a thread or (a check alone of a large graph, on
Linux) in a forked child. Both ways give the same answer: a model ONNX Runtime refuses is bad
input with its reason, a model it loads passes, and a kernel its CPU build lacks is no defect
of the file."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from normopt import io as nio
from normopt.errors import NormoptError

FORKED = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the forked check is Linux only")


def _save(tmp_path, nodes, inputs, outputs, inits=(), name="m.onnx"):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    path = str(tmp_path / name)
    onnx.save(model, path)
    return path


def _refused(tmp_path):
    # loads as a skeleton and passes onnx.checker, but the Add mixes float and int64: ORT refuses it
    return _save(tmp_path, [helper.make_node("Add", ["x", "y"], ["z"])],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]), helper.make_tensor_value_info("y", TensorProto.INT64, [2])],
                 [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])])


def _good(tmp_path):
    return _save(tmp_path, [helper.make_node("Relu", ["x"], ["y"])], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], name="good.onnx")


def _answers(path, forked, monkeypatch):
    monkeypatch.setattr(nio, "FORK_CHECK_NODES", 1 if forked else 10**9)
    check = nio.OrtCheck(nio.load_model(path))
    assert (check.child is not None) == forked and (check.thread is not None) == (not forked)
    try:
        check.result()
    except NormoptError as exc:
        return str(exc)
    return None


@FORKED
def test_the_forked_check_refuses_what_the_threaded_one_refuses(tmp_path, monkeypatch):
    path = _refused(tmp_path)
    threaded, forked = _answers(path, False, monkeypatch), _answers(path, True, monkeypatch)
    assert threaded is not None and "ONNX Runtime refuses to load it" in threaded
    assert forked == threaded


@FORKED
def test_the_forked_check_passes_what_loads(tmp_path, monkeypatch):
    path = _good(tmp_path)
    assert _answers(path, False, monkeypatch) is None and _answers(path, True, monkeypatch) is None


@FORKED
def test_a_child_that_dies_is_a_failed_check(tmp_path, monkeypatch):
    path = _good(tmp_path)
    monkeypatch.setattr(nio, "FORK_CHECK_NODES", 1)

    def crash(self):
        import os

        os._exit(9)

    monkeypatch.setattr(nio.OrtCheck, "_build", crash)
    check = nio.OrtCheck(nio.load_model(path))
    with pytest.raises(NormoptError, match="failed while loading it"):
        check.result()


def test_a_kept_session_is_never_forked(tmp_path, monkeypatch):
    monkeypatch.setattr(nio, "FORK_CHECK_NODES", 1)
    check = nio.OrtCheck(nio.load_model(_good(tmp_path)), keep=True)
    assert check.child is None
    assert check.take_session() is not None


@FORKED
def test_optimize_refuses_a_model_the_forked_check_refuses(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from normopt.cli import main

    monkeypatch.setattr(nio, "FORK_CHECK_NODES", 1)
    path = _refused(tmp_path)
    out = tmp_path / "o.onnx"
    r = CliRunner().invoke(main, ["optimize", path, "-o", str(out), "--no-verify", "--no-tune", "-q"], catch_exceptions=False)
    assert r.exit_code == 2 and "ONNX Runtime refuses to load it" in r.stderr
    assert not out.exists()
