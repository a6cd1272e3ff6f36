"""What a plain `pip install` gets: the wheel's contents and metadata (built here from the working
tree, with a `normopt-demo/` folder beside it as the demo leaves one), the extras, and the error a
plain install gives for `bench --baselines`."""

from __future__ import annotations

import email
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile

import onnx
import pytest

from conftest import preln_stream_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel built (no build isolation: this venv's setuptools) from a copy of the tree, in which
    the demo has written its folder and the corpus builders sit where tests use them."""
    import importlib.metadata

    major = int(importlib.metadata.version("setuptools").split(".")[0])
    if major < 77:  # the 'test' extra brings a recent one; licence expressions need 77
        pytest.skip(f"setuptools {major} is older than the build needs (77): pip install -e '.[test]'")
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "LICENSE", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    for d in ("normopt", "docs", os.path.join("tests", "corpus_builders")):
        shutil.copytree(os.path.join(ROOT, d), src / d, ignore=shutil.ignore_patterns("__pycache__"))
    (src / "normopt-demo").mkdir()
    (src / "normopt-demo" / "report.json").write_text("{}")
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = [p for p in out.iterdir() if p.suffix == ".whl"]
    return zipfile.ZipFile(whl)


def _dist_info(zf, name):
    (path,) = [n for n in zf.namelist() if n.endswith(".dist-info/" + name)]
    return zf.read(path).decode()


def test_wheel_holds_only_the_optimizer(wheel):
    names = wheel.namelist()
    assert _dist_info(wheel, "top_level.txt").split() == ["normopt"]
    tops = {n.split("/")[0] for n in names}
    assert tops == {"normopt", next(t for t in tops if t.endswith(".dist-info"))}, tops
    assert not [n for n in names if "corpus" in n], "exporter corpus builders are test material"
    assert "normopt/cli.py" in names and "normopt/passes/ln_to_rms.py" in names


def test_wheel_metadata(wheel):
    meta = email.message_from_string(_dist_info(wheel, "METADATA"))
    assert meta["License-Expression"] == "Apache-2.0"
    assert "LICENSE" in meta.get_all("License-File")
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in wheel.namelist())
    assert meta["Requires-Python"] == ">=3.10"
    assert meta["Author"] or meta["Author-email"]
    classifiers = meta.get_all("Classifier")
    assert "Programming Language :: Python :: 3" in classifiers and len(classifiers) >= 5
    extras = set(meta.get_all("Provides-Extra"))
    assert "baselines" in extras and "gpu" not in extras
    requires = meta.get_all("Requires-Dist")
    assert not [r for r in requires if r.startswith("onnxruntime-gpu")]  # it conflicts with onnxruntime
    body = meta.get_payload()
    assert meta["Description-Content-Type"] == "text/markdown"
    first_code = body[body.index("```"):].splitlines()[1]
    assert "-e" not in first_code.split() and "venv" not in first_code  # a user's install, not a developer's
    assert "pip install --no-deps normopt" in body and "onnxruntime-gpu" in body


def test_pypi_page_names_every_runtime_dependency_for_the_gpu_install():
    """The GPU recipe installs normopt with --no-deps, so it must list every other dependency."""
    deps = [d.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip() for d in _pyproject()["project"]["dependencies"]]
    with open(os.path.join(ROOT, "docs", "pypi.md")) as f:
        page = f.read()
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    for text in (page, readme):
        line = next(ln for ln in text.splitlines() if ln.startswith("pip install onnx "))
        assert sorted(line.split()[2:]) == sorted(d for d in deps if d != "onnxruntime"), line


def test_bench_baselines_names_the_extra_when_it_is_missing(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(preln_stream_model(), src)
    code = ("import sys; sys.modules['torch'] = None; sys.modules['onnx_ir'] = None; "
            "sys.argv = ['normopt'] + sys.argv[1:]; from normopt.cli import main; main()")
    r = subprocess.run([sys.executable, "-c", code, "bench", str(src), "--baselines", "ort-transformers,onnxscript",
                        "--runs", "2", "--warmup", "1"], capture_output=True, text=True)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "normopt[baselines]" in lines[0] and "torch" in lines[0] and "onnx_ir" in lines[0], r.stderr
    with open(os.path.join(ROOT, "README.md")) as f:
        assert "normopt[baselines]" in f.read()
