"""What a person or a CI log sees from the CLI: progress as it happens (a plain line per phase when
stdout is not a terminal), pass numbers as `normopt passes` lists them, and a help text for every
option of every command."""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
import textwrap
import time

import click
import onnx
import pytest

from normopt.cli import main
from normopt.passes import all_passes, build_pipeline

from conftest import preln_stream_model, run_cli

# the CLI with fuse_skip (the last pass) held until a file appears: the run is still going when
# the test reads what has reached the pipe so far
HELD_CLI = textwrap.dedent("""
    import os, sys, time
    from normopt.passes import fuse_skip
    orig = fuse_skip.FuseSkipNorms.analyze
    def held(self, graph, ctx):
        t0 = time.time()
        while not os.path.exists(os.environ["NORMOPT_TEST_RELEASE"]) and time.time() - t0 < 120:
            time.sleep(0.05)
        return orig(self, graph, ctx)
    fuse_skip.FuseSkipNorms.analyze = held
    from normopt.cli import main
    sys.argv = ["normopt"] + sys.argv[1:]
    main()
""")


@pytest.fixture
def model_path(tmp_path):
    p = tmp_path / "model.onnx"
    onnx.save(preln_stream_model(), p)
    return p


def _read_until(proc, needle: str, timeout: float) -> str:
    """What the pipe carries until a line containing needle (or the timeout, or the end)."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    seen, deadline = "", time.time() + timeout
    while needle not in seen and time.time() < deadline:
        if not sel.select(timeout=max(0.0, deadline - time.time())):
            break
        chunk = os.read(proc.stdout.fileno(), 65536).decode()
        if not chunk:
            break
        seen += chunk
    return seen


def _held_optimize(tmp_path, out, release):
    """`normopt optimize` of a small Pre-LN model in a child whose fuse_skip pass waits until the
    file `release` exists; stdout and stderr are pipes."""
    src = tmp_path / "m.onnx"
    onnx.save(preln_stream_model(d=32), src)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "NORMOPT_TEST_RELEASE": str(release)}
    return subprocess.Popen([sys.executable, "-c", HELD_CLI, "optimize", str(src), "-o", str(out), "--no-tune"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def test_progress_reaches_a_pipe_while_optimize_runs(tmp_path):
    out, release = tmp_path / "o.onnx", tmp_path / "release"
    proc = _held_optimize(tmp_path, out, release)
    try:
        seen = _read_until(proc, "cancel_layout: applied", timeout=90)
        still_running = proc.poll() is None
        written_early = out.exists()
    finally:
        release.touch()
        rest, err = proc.communicate(timeout=120)
    assert still_running, "the run ended before its progress was read"
    lines = seen.splitlines()
    assert lines and lines[0].startswith("normopt: inputs: "), seen  # the inputs plan comes first
    n = len(all_passes())
    done = [ln for ln in lines if ln.startswith("normopt: pass ") and ": applied " in ln]
    assert [ln.split()[2] for ln in done] == [f"{i}/{n}" for i, p in enumerate(all_passes(), 1)
                                              if not p.opt_in and p.name != "fuse_skip"], seen
    assert not written_early  # nothing written yet: fuse_skip is still held
    assert proc.returncode == 0, err
    tail = rest.decode()
    assert "normopt: writing the output" in tail and "normopt: verifying" in tail and "wrote " in tail


def test_interrupted_run_has_logged_how_far_it_got(tmp_path):
    out, release = tmp_path / "o.onnx", tmp_path / "never"
    proc = _held_optimize(tmp_path, out, release)
    try:
        seen = _read_until(proc, "cancel_layout: applied", timeout=90)
    finally:
        proc.send_signal(2)  # SIGINT, as Ctrl-C or a CI cancel
        rest, err = proc.communicate(timeout=60)
    assert "normopt: pass 5/10 ln_to_rms: applied 3" in seen + rest.decode()
    assert proc.returncode == 130 and not out.exists()


def test_quiet_prints_no_progress(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(preln_stream_model(), src)
    r = run_cli("optimize", src, "-o", tmp_path / "o.onnx", "--no-tune", "-q")
    assert r.returncode == 0, r.stderr
    assert "normopt: pass" not in r.stdout + r.stderr and "wrote " in r.stdout


def test_bench_keeps_its_data_on_stdout(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(preln_stream_model(), src)
    r = run_cli("bench", src, "--runs", "3", "--warmup", "1", "--threads", "1", "--format", "csv")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].startswith("model,") and "normopt: benchmarking" in r.stderr


def test_pass_numbers_are_those_normopt_passes_lists(model_path):
    listed = [ln.split()[:2] for ln in run_cli("passes").stdout.splitlines()]
    place = {name: num.rstrip(".") for num, name in listed}
    for opt_in in (None, ["crms"]):
        said = []
        m = onnx.load(model_path)
        build_pipeline(opt_in=opt_in).run(m, progress=said.append)
        ends = [s.split() for s in said if ": applied " in s]
        assert ends, said
        for _, frac, name, *_ in ends:
            k, n = frac.split("/")
            assert n == str(len(listed)) and k == place[name.rstrip(":")], (frac, name)


def _all_options():
    for name, cmd in main.commands.items():
        for p in cmd.params:
            if isinstance(p, click.Option) and "--help" not in p.opts:
                yield name, p


def test_every_option_has_a_help_text():
    missing = [f"{cmd} {p.opts[-1]}" for cmd, p in _all_options() if not (p.help or "").strip()]
    assert not missing, missing


def test_repeatable_options_say_so_and_int_range_says_hi_is_excluded():
    for cmd, p in _all_options():
        if p.multiple:
            assert "repeat" in p.help, (cmd, p.opts)
        if p.name == "int_range":
            assert "HI excluded" in p.help, cmd
    r = run_cli("optimize", "--help")
    assert "HI excluded" in " ".join(r.stdout.split())
