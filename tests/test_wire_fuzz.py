"""Mutation fuzzing of the wire format: truncations and byte flips of small models whose tensors
are referenced (raw_data over 1 KiB, and external data).

Each mutant is optimized in-process (normopt.api.optimize, as the CLI runs it) into a scratch
folder whose other files are hashed before and after. The property, for every mutant:
  * success only with an output ONNX Runtime loads (exit 0);
  * otherwise a NormoptError with one line (exit 2): never another exception (exit 3);
  * no case takes more than CASE_SECONDS (a hang fails it), and memory does not grow;
  * the input, its data file and every other file in the folder are unchanged, and no
    temporary file is left behind.
A few mutants go through the CLI in a subprocess too (exit code, one stderr line).

CI runs every truncation at a field boundary of each seed model plus FLIPS seeded byte flips;
NORMOPT_FUZZ=long runs ten times as many flips."""

from __future__ import annotations

import hashlib
import os
import random
import resource
import shutil
import signal

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from conftest import init, make_model, preln_stream_model, run_cli, vi
from normopt import api
from normopt import weights as W
from normopt.errors import NormoptError

LONG = os.environ.get("NORMOPT_FUZZ") == "long"
FLIPS = 400 if LONG else 40  # per seed model
CASE_SECONDS = 30
MEMORY_GROWTH = 400 << 20


def _plain_model():
    """No pass changes it (the unchanged-copy path): a MatMul with a 2 KiB weight, a Transpose
    with an attribute, a Constant with a 1.5 KiB tensor attribute, a small int64 shape."""
    rng = np.random.default_rng(0)
    w = init("w", rng.standard_normal((16, 32)).astype(np.float32))
    shape = init("shape", np.array([32, 4], np.int64))
    nodes = [
        helper.make_node("Constant", [], ["c"], value=onnx.numpy_helper.from_array(
            rng.standard_normal((4, 96)).astype(np.float32), "c")),
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Transpose", ["h"], ["t"], perm=[1, 0]),
        helper.make_node("Reshape", ["t", "shape"], ["r"]),
        helper.make_node("MatMul", ["r", "c"], ["y"]),
    ]
    return make_model(nodes, [vi("x", [4, 16])], [vi("y", [32, 96])], [w, shape])


SEEDS = {
    "preln": lambda: preln_stream_model(d=16, n=4, layers=1, vocab=32),
    "plain": _plain_model,
}


def _seed_files(tmp, name, external):
    model = SEEDS[name]()
    path = os.path.join(tmp, f"{name}{'_ext' if external else ''}.onnx")
    if external:
        onnx.save(model, path, save_as_external_data=True, location=os.path.basename(path) + ".data", size_threshold=1024)
    else:
        onnx.save(model, path)
    return path


# --- field boundaries ---------------------------------------------------------------------------

_MESSAGES = {  # field number -> kind of sub-message, per kind (what normopt's reader walks)
    "model": {7: "graph", 8: "opset", 14: "kv", 25: "function"},
    "graph": {1: "node", 5: "tensor", 11: "value", 12: "value", 13: "value"},
    "node": {5: "attr"},
    "attr": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph"},
    "tensor": {13: "kv"},
    "function": {7: "node"},
    "value": {}, "opset": {}, "kv": {},
}


def field_boundaries(buf: bytes) -> list:
    """Every offset where a field of any (walked) message starts or ends, iteratively."""
    out = {0, len(buf)}
    todo = [("model", 0, len(buf))]
    while todo:
        kind, pos, end = todo.pop()
        for field, wire, a, b, start in W._fields(buf, pos, end):
            out.update((start, a, b))
            sub = _MESSAGES[kind].get(field)
            if sub is not None and wire == 2:
                todo.append((sub, a, b))
    return sorted(out)


def mutants(path: str, rng: random.Random):
    data = open(path, "rb").read()
    for cut in field_boundaries(data)[:-1]:
        yield f"truncated at {cut}", data[:cut]
    for _ in range(FLIPS):
        buf = bytearray(data)
        for _ in range(rng.choice((1, 1, 2, 3))):
            i = rng.randrange(len(buf))
            buf[i] ^= rng.randrange(1, 256)
        yield f"flipped {i}", bytes(buf)


# --- the property -----------------------------------------------------------------------------


def _hashes(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[p] = hashlib.sha256(fh.read()).hexdigest()
    return out


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def check_mutant(scratch, name, data, data_file=None, verify=False):
    """One mutant: written into `scratch` (beside a bystander file and, for external seeds, the
    seed's data file), optimized into out.onnx. Returns 'ok' or 'refused'; asserts the property."""
    src = os.path.join(scratch, "in.onnx")
    with open(src, "wb") as f:
        f.write(data)
    if data_file:
        shutil.copyfile(data_file, os.path.join(scratch, os.path.basename(data_file)))
    with open(os.path.join(scratch, "bystander.txt"), "w") as f:
        f.write("someone else's file")
    out = os.path.join(scratch, "out.onnx")
    before = _hashes(scratch)
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_SECONDS)
    try:
        api.optimize(src, out, verify=verify, tune=False, seeds=1)
        outcome = "ok"
    except NormoptError as exc:
        assert "\n" not in str(exc) and str(exc), (name, str(exc))
        outcome = "refused"
    except _Timeout:
        raise AssertionError(f"{name}: no result in {CASE_SECONDS} s")
    except Exception as exc:  # exit 3 in the CLI
        raise AssertionError(f"{name}: {type(exc).__name__}: {exc}") from exc
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    after = _hashes(scratch)
    for p, h in before.items():
        assert after.get(p) == h, f"{name}: {p} changed or went"
    made = sorted(set(after) - set(before))
    leftovers = [p for p in os.listdir(scratch) if p.startswith(".normopt-")]
    assert not leftovers, (name, leftovers)
    if outcome == "ok":
        assert out in made, (name, made)
        ort.InferenceSession(out, providers=["CPUExecutionProvider"])  # raises if ORT refuses it
    else:
        assert not made, (name, made)
    for p in made:
        os.remove(p)
    return outcome


def _maxrss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external"])
@pytest.mark.parametrize("seed_name", sorted(SEEDS))
def test_wire_mutants(tmp_path, seed_name, external):
    seeds = tmp_path / "seed"
    seeds.mkdir()
    path = _seed_files(str(seeds), seed_name, external)
    data_file = path + ".data" if external else None
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    rng = random.Random(f"{seed_name}-{external}")
    counts = {"ok": 0, "refused": 0}
    check_mutant(str(scratch), "warm-up", open(path, "rb").read(), data_file)
    rss0 = _maxrss()
    for name, data in mutants(path, rng):
        counts[check_mutant(str(scratch), name, data, data_file)] += 1
    assert _maxrss() - rss0 < MEMORY_GROWTH, "memory grew over the mutants"
    assert counts["refused"] > 0 and counts["ok"] > 0, counts  # the mutants reach both outcomes
    print(seed_name, "external" if external else "inline", counts)


def test_a_few_mutants_through_the_cli(tmp_path):
    """Exit codes and one stderr line, as a user sees them (a subprocess each)."""
    path = _seed_files(str(tmp_path), "preln", False)
    data = open(path, "rb").read()
    cuts = field_boundaries(data)
    cases = [data[:cuts[len(cuts) // 2]]]
    rng = random.Random(7)
    for _ in range(2):
        buf = bytearray(data)
        buf[rng.randrange(len(buf))] ^= 0xFF
        cases.append(bytes(buf))
    for i, case in enumerate(cases):
        src = tmp_path / f"mut{i}.onnx"
        src.write_bytes(case)
        out = tmp_path / f"out{i}.onnx"
        r = run_cli("optimize", src, "-o", out, "--no-tune", "--no-verify")
        assert r.returncode in (0, 2), (i, r.returncode, r.stderr)
        if r.returncode == 2:
            lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
            assert len(lines) == 1 and lines[0].startswith("normopt: error:"), r.stderr
            assert "WireError" not in lines[0] and not out.exists()
        else:
            ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])


def test_verified_mutants_never_exit_3(tmp_path):
    """A handful of flips with verification on: it runs ORT on the mutant too."""
    path = _seed_files(str(tmp_path), "preln", True)
    data = open(path, "rb").read()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    rng = random.Random(11)
    for k in range(6):
        buf = bytearray(data)
        buf[rng.randrange(len(buf))] ^= rng.randrange(1, 256)
        check_mutant(str(scratch), f"verified flip {k}", bytes(buf), path + ".data", verify=True)
