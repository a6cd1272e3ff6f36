"""The README's commands run as written: its GitHub Actions job (on a small model), its export
recipe (docs/recipes/export_hf.py on tiny random-init configs, then optimized and verified), the
extras its install lines name, and its links, which stay inside the repository."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shlex
import subprocess
import sys
import tomllib

import onnx
import pytest

from conftest import preln_stream_model, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "docs", "recipes", "export_hf.py")


def _read(*parts):
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


def _blocks(text, lang):
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_docs_point_only_inside_the_repository():
    for name in ["README.md"] + [os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md")]:
        text = _read(name)
        assert "../shared" not in text and "/work/" not in text, name
        for target in re.findall(r"\]\(([^)#]+)\)", text):
            if "://" in target:
                continue
            base = os.path.dirname(os.path.join(ROOT, name))
            assert os.path.exists(os.path.normpath(os.path.join(base, target))), (name, target)
    assert os.path.isfile(os.path.join(ROOT, "docs", "math.md"))


def test_every_extra_the_docs_install_exists():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extras = set(tomllib.load(f)["project"]["optional-dependencies"])
    named = set()
    for name in ("README.md", os.path.join("docs", "pypi.md")):
        for group in re.findall(r"(?:\.|normopt)\[([a-z0-9_,-]+)\]", _read(name)):
            named.update(group.split(","))
    assert named and named <= extras, named - extras


def _actions_job():
    block = next(b for b in _blocks(_read("README.md"), "yaml") if "jobs:" in b)
    steps = []
    for line in block.splitlines():
        m = re.match(r"\s*- (run|uses): (.*)$", line)
        if m:
            steps.append((m.group(1), m.group(2).strip()))
    return steps


def test_github_actions_example_runs_as_written(tmp_path):
    """`uses:` steps are GitHub's (checkout, set-up-python, upload) and are skipped; a `pip install`
    step is this test's environment, so it checks normopt is installed there; every other `run:`
    line runs in a folder holding model.onnx, with `normopt` as this interpreter's CLI."""
    steps = _actions_job()
    assert [k for k, _ in steps].count("run") >= 4
    onnx.save(preln_stream_model(d=32), tmp_path / "model.onnx")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("GITHUB_STEP_SUMMARY", None)
    for kind, cmd in steps:
        if kind == "uses":
            assert cmd.startswith("actions/"), cmd
            continue
        argv = shlex.split(cmd, comments=True)
        if argv[:2] == ["pip", "install"]:
            assert argv[2:] in (["."], ["-e", "."]), "the job must install what exists: the repository"
            assert importlib.metadata.version("normopt")
            continue
        assert argv[0] == "normopt", cmd
        r = subprocess.run([sys.executable, "-m", "normopt.cli", *argv[1:]], cwd=tmp_path, env=env,
                           capture_output=True, text=True)
        gate = argv[1] == "bench" and r.returncode == 1 and "slower than --max-ratio" in r.stderr
        assert r.returncode == 0 or gate, (cmd, r.stdout[-1500:], r.stderr[-1500:])
    for name in ("model.opt.onnx", "report.json", "verify.xml", "bench.xml"):
        assert (tmp_path / name).is_file(), name


def test_readme_shows_the_recipe_as_the_script_has_it():
    script = _read("docs", "recipes", "export_hf.py")
    shown = next(b for b in _blocks(_read("README.md"), "python") if "class Logits" in b)
    assert shown.strip() in script


def _export_and_optimize(tmp_path, model_type, *flags):
    path = tmp_path / f"{model_type}.onnx"
    r = subprocess.run([sys.executable, RECIPE, "--tiny", model_type, str(path), *flags], capture_output=True, text=True,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 0, r.stderr[-3000:]
    m = onnx.load(path)
    assert [i.name for i in m.graph.input] == ["input_ids", "attention_mask"]  # no cache, no logits_to_keep
    assert [o.name for o in m.graph.output] == ["logits"]
    r = run_cli("optimize", path, "-o", tmp_path / "o.onnx", "--no-tune")
    assert r.returncode == 0, r.stderr
    assert "verified: equivalent" in r.stdout
    assert "LayerNormalization 5->0" in r.stdout, r.stdout  # 2 layers: 2 LNs each and the final one


def test_export_recipe_gpt2(tmp_path):
    pytest.importorskip("transformers")
    _export_and_optimize(tmp_path, "gpt2")


@pytest.mark.slow
@pytest.mark.parametrize("model_type,flags", [("gpt_neox", ()), ("opt", ()), ("gpt2", ("--dynamo",))],
                         ids=["gpt_neox", "opt", "gpt2-dynamo"])
def test_export_recipe(tmp_path, model_type, flags):
    pytest.importorskip("transformers")
    _export_and_optimize(tmp_path, model_type, *flags)


@pytest.mark.slow
def test_demo_shows_its_declines_and_names_its_report(tmp_path):
    pytest.importorskip("torch")
    from normopt.demo import run_demo

    lines = []
    run_demo(str(tmp_path / "normopt-demo"), runs=3, threads=1, echo=lines.append)
    text = "\n".join(lines)
    report = tmp_path / "normopt-demo" / "report.json"
    assert report.is_file() and str(report) in text
    import json

    declined = [d for p in json.loads(report.read_text())["passes"] for d in p["declined"]]
    assert declined and all(d["reason"] for d in declined)
    assert "left alone by" in text  # the reasons are printed, not only written
    assert "normopt-demo/report.json" in _read("README.md")
