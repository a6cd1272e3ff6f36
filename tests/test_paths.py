"""Output paths (normopt.paths): every path a command writes is resolved and checked before any
work; an output that is an input, a special file, an unwritable place or someone else's data file
is bad input (exit 2, one line, nothing written); every file is written atomically.

Most cases run the CLI in-process (click's runner: exit code, stdout and stderr as a user sees
them); a few run it as a subprocess."""

from __future__ import annotations

import glob
import os
import stat

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from conftest import init, make_model, preln_stream_model, run_cli, sha, vi
from normopt.cli import main


def cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def snapshot(folder) -> dict:
    """Every entry of a folder: its kind and, for regular files, a hash of its bytes."""
    out = {}
    for p in sorted(glob.glob(os.path.join(folder, "**", "*"), recursive=True) +
                    glob.glob(os.path.join(folder, "**", ".*"), recursive=True)):
        st = os.lstat(p)
        if stat.S_ISLNK(st.st_mode):
            out[p] = ("link", os.readlink(p))
        elif stat.S_ISREG(st.st_mode):
            out[p] = ("file", sha(p))
        else:
            out[p] = (stat.S_IFMT(st.st_mode),)
    return out


def assert_refused(result, folder, before, *words):
    code, out, err = result
    assert code == 2, (code, out, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("normopt: error:"), err
    for w in words:
        assert w in lines[0], lines[0]
    assert snapshot(folder) == before, "a file changed, appeared or went"


def loads(path):
    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return True


@pytest.fixture
def work(tmp_path):
    """A folder with a small Pre-LN model (m.onnx, changed by optimize) and the same model with
    its weights as external data (e.onnx + e.onnx.data)."""
    m = preln_stream_model()
    onnx.save(m, tmp_path / "m.onnx")
    onnx.save(m, tmp_path / "e.onnx", save_as_external_data=True, location="e.onnx.data", size_threshold=1024)
    return tmp_path


OPT = ("--no-tune", "--no-verify")


# --- outputs equal to a file the input reads ---------------------------------------------------


def test_output_equal_to_the_inputs_data_file_is_refused(work):
    before = snapshot(work)
    assert_refused(cli("optimize", work / "e.onnx", "-o", work / "e.onnx.data", *OPT), work, before,
                   "e.onnx.data", "reads")


def test_output_data_file_equal_to_the_inputs_data_file_is_refused(work):
    # the input's data is named x.onnx.data; -o x.onnx would write its own data there
    m = preln_stream_model()
    onnx.save(m, work / "a.onnx", save_as_external_data=True, location="x.onnx.data", size_threshold=1024)
    before = snapshot(work)
    assert_refused(cli("optimize", work / "a.onnx", "-o", work / "x.onnx", *OPT), work, before, "x.onnx.data")


def test_output_data_file_equal_to_the_input_model_is_refused(work):
    m = preln_stream_model()
    onnx.save(m, work / "o.onnx.data", save_as_external_data=True, location="w.bin", size_threshold=1024)
    before = snapshot(work)
    assert_refused(cli("optimize", work / "o.onnx.data", "-o", work / "o.onnx", *OPT), work, before, "o.onnx.data")


def test_output_hard_link_to_the_input_is_refused(work):
    os.link(work / "m.onnx", work / "hard.onnx")
    before = snapshot(work)
    assert_refused(cli("optimize", work / "m.onnx", "-o", work / "hard.onnx", *OPT), work, before, "reads")


def test_someone_elses_data_file_beside_the_output_is_refused(work):
    # o.onnx.data exists and is not the data of a model at o.onnx: it may be another model's
    (work / "o.onnx.data").write_bytes(b"another model's weights")
    before = snapshot(work)
    assert_refused(cli("optimize", work / "e.onnx", "-o", work / "o.onnx", *OPT), work, before, "o.onnx.data")


def test_rerun_replaces_the_previous_output_and_its_data(work):
    out = work / "o.onnx"
    assert cli("optimize", work / "e.onnx", "-o", out, *OPT)[0] == 0
    assert (work / "o.onnx.data").exists() and loads(out)
    code, o, e = cli("optimize", work / "e.onnx", "-o", out, *OPT)
    assert code == 0, e
    assert loads(out)
    assert not [f for f in os.listdir(work) if f.startswith(".normopt-")]


def test_report_over_the_input_or_the_output_is_refused(work):
    before = snapshot(work)
    assert_refused(cli("optimize", work / "m.onnx", "-o", work / "o.onnx", "--report", work / "m.onnx", *OPT),
                   work, before, "--report")
    assert_refused(cli("optimize", work / "m.onnx", "-o", work / "o.onnx", "--report", work / "o.onnx", *OPT),
                   work, before, "--report")
    assert_refused(cli("optimize", work / "e.onnx", "-o", work / "o.onnx", "--report", work / "e.onnx.data", *OPT),
                   work, before, "--report")
    assert_refused(cli("optimize", work / "e.onnx", "-o", work / "o.onnx", "--report", work / "o.onnx.data", *OPT),
                   work, before, "--report")


def test_verify_outputs_over_its_inputs_are_refused(work):
    before = snapshot(work)
    assert_refused(cli("verify", work / "m.onnx", work / "e.onnx", "--junit", work / "e.onnx.data"), work, before, "--junit")
    assert_refused(cli("verify", work / "m.onnx", work / "e.onnx", "--json", work / "m.onnx"), work, before, "--json")
    assert_refused(cli("verify", work / "m.onnx", work / "e.onnx", "--json", work / "j", "--junit", work / "j"),
                   work, before, "same file")


def test_bench_outputs_over_its_inputs_are_refused(work):
    before = snapshot(work)
    assert_refused(cli("bench", work / "e.onnx", "--runs", 2, "--warmup", 0, "--output", work / "e.onnx.data"),
                   work, before, "--output")
    assert_refused(cli("bench", work / "m.onnx", "--runs", 2, "--warmup", 0, "--junit", work / "m.onnx"),
                   work, before, "--junit")


# --- special files and links --------------------------------------------------------------------


def _device(folder):
    """A character device of the test's own (a null device made with mknod), so that no test
    depends on, or can harm, the system's /dev/null; /dev/null itself where mknod is not allowed."""
    path = folder / "null"
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        return path
    except (OSError, AttributeError):
        if not stat.S_ISCHR(os.stat("/dev/null").st_mode):
            pytest.skip("no character device to test with")
        return "/dev/null"


@pytest.fixture
def specials(work):
    os.mkfifo(work / "fifo")
    return {"fifo": work / "fifo", "device": _device(work)}


PATH_OPTIONS = [
    ("optimize -o", lambda w, p: ("optimize", w / "m.onnx", "-o", p, *OPT)),
    ("optimize --report", lambda w, p: ("optimize", w / "m.onnx", "-o", w / "o.onnx", "--report", p, *OPT)),
    ("verify --junit", lambda w, p: ("verify", w / "m.onnx", w / "m.onnx", "--seeds", 1, "--junit", p)),
    ("verify --json", lambda w, p: ("verify", w / "m.onnx", w / "m.onnx", "--seeds", 1, "--json", p)),
    ("bench --output", lambda w, p: ("bench", w / "m.onnx", "--runs", 2, "--warmup", 0, "--output", p)),
    ("bench --junit", lambda w, p: ("bench", w / "m.onnx", "--runs", 2, "--warmup", 0, "--junit", p)),
]


@pytest.mark.parametrize("kind", ["fifo", "device"])
@pytest.mark.parametrize("name,args", PATH_OPTIONS, ids=[n for n, _ in PATH_OPTIONS])
def test_special_files_are_refused_and_left_as_they_are(work, specials, kind, name, args):
    path = specials[kind]
    mode = os.stat(path).st_mode
    before = snapshot(work)
    assert_refused(cli(*args(work, path)), work, before, "special file")
    assert os.stat(path).st_mode == mode
    assert not (work / "o.onnx").exists()


@pytest.mark.parametrize("name,args", PATH_OPTIONS, ids=[n for n, _ in PATH_OPTIONS])
def test_a_symlink_output_writes_its_target_and_stays_a_link(work, name, args):
    other = work / "elsewhere"
    other.mkdir()
    target = other / "target.out"
    target.write_bytes(b"old")
    link = work / "link.out"
    os.symlink(target, link)
    code, out, err = cli(*args(work, link))
    assert code == 0, err
    assert os.path.islink(link) and os.readlink(link) == str(target)
    assert target.read_bytes() != b"old"
    if name == "optimize -o":
        assert loads(target)
    assert not [f for f in os.listdir(other) if f.startswith(".normopt-")]
    assert not [f for f in os.listdir(work) if f.startswith(".normopt-")]


def test_a_symlink_output_with_external_data_in_another_folder_is_refused(work):
    other = work / "elsewhere"
    other.mkdir()
    os.symlink(other / "t.onnx", work / "link.onnx")
    before = snapshot(work)
    assert_refused(cli("optimize", work / "e.onnx", "-o", work / "link.onnx", *OPT), work, before, "link")


def test_plot_to_a_special_file_is_refused(work, specials):
    pytest.importorskip("matplotlib")
    before = snapshot(work)
    assert_refused(cli("bench", work / "m.onnx", "--runs", 2, "--warmup", 0, "--plot", specials["fifo"]), work, before)


def test_demo_folder_that_is_a_file_is_refused(work):
    before = snapshot(work)
    assert_refused(cli("demo", "--dir", work / "m.onnx"), work, before, "--dir")


# --- unwritable and missing places: exit 2 before any work ----------------------------------------


def test_unwritable_output_place_is_bad_input(work):
    before = snapshot(work)
    assert_refused(cli("optimize", work / "m.onnx", "-o", "/sys/x.onnx", *OPT), work, before, "/sys")
    assert_refused(cli("optimize", work / "m.onnx", "-o", "/proc/x.onnx", *OPT), work, before, "/proc")
    # a model no pass changes takes the unchanged-copy path
    w = init("w", np.ones((32, 32), np.float32))
    onnx.save(make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [vi("x", [4, 32])], [vi("y", [4, 32])], [w]),
              work / "plain.onnx")
    before = snapshot(work)
    assert_refused(cli("optimize", work / "plain.onnx", "-o", "/sys/x.onnx", *OPT), work, before, "/sys")


def test_missing_report_folder_fails_before_the_model_is_written(work):
    before = snapshot(work)
    assert_refused(cli("optimize", work / "m.onnx", "-o", work / "o.onnx", "--report", "/missing/r.json", "--no-tune"),
                   work, before, "/missing")


def test_verify_junit_in_a_missing_folder_fails_before_verification(work):
    before = snapshot(work)
    r = cli("verify", work / "m.onnx", work / "m.onnx", "--junit", "/missing/j.xml")
    assert_refused(r, work, before, "/missing")
    assert "EQUIVALENT" not in r[1]


def test_bench_output_in_a_missing_folder_fails_before_the_benchmark(work):
    before = snapshot(work)
    r = cli("bench", work / "m.onnx", "--runs", 2, "--warmup", 0, "--output", "/missing/o.md")
    assert_refused(r, work, before, "/missing")
    assert "median" not in r[1]


def test_missing_input_when_the_output_exists_is_bad_input(work):
    (work / "o.onnx").write_bytes(b"previous")
    before = snapshot(work)
    assert_refused(cli("optimize", work / "nothere.onnx", "-o", work / "o.onnx", *OPT), work, before, "no such file")


def test_output_in_a_folder_that_is_a_file_is_refused(work):
    before = snapshot(work)
    assert_refused(cli("optimize", work / "m.onnx", "-o", work / "m.onnx" / "x.onnx", *OPT), work, before)


# --- writes are atomic and keep what they must ----------------------------------------------------


def test_unchanged_copy_into_another_folder_refuses_someone_elses_data_file(tmp_path):
    # a model no pass changes, with external data: the copy needs w.bin beside it
    w = init("w", np.ones((32, 32), np.float32))
    m = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [vi("x", [4, 32])], [vi("y", [4, 32])], [w])
    src = tmp_path / "src"
    src.mkdir()
    onnx.save(m, src / "m.onnx", save_as_external_data=True, location="w.bin", size_threshold=0)
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "w.bin").write_bytes(b"not yours")
    before = snapshot(tmp_path)
    assert_refused(cli("optimize", src / "m.onnx", "-o", dst / "o.onnx", *OPT), tmp_path, before, "w.bin")
    os.remove(dst / "w.bin")
    code, out, err = cli("optimize", src / "m.onnx", "-o", dst / "o.onnx", *OPT)
    assert code == 0 and "no changes" in out, err
    assert sha(dst / "w.bin") == sha(src / "w.bin") and loads(dst / "o.onnx")
    # and again: the copy at -o references its w.bin, which is replaced with it
    assert cli("optimize", src / "m.onnx", "-o", dst / "o.onnx", *OPT)[0] == 0


def test_report_keeps_the_mode_of_the_file_it_replaces(work):
    rep = work / "r.json"
    rep.write_text("{}")
    os.chmod(rep, 0o640)
    assert cli("optimize", work / "m.onnx", "-o", work / "o.onnx", "--report", rep, *OPT)[0] == 0
    assert stat.S_IMODE(os.stat(rep).st_mode) == 0o640
    assert '"passes"' in rep.read_text()


def test_cli_subprocess_refuses_a_fifo_without_hanging(work, specials):
    before = snapshot(work)
    r = run_cli("optimize", work / "m.onnx", "-o", specials["fifo"], *OPT)
    assert_refused((r.returncode, r.stdout, r.stderr), work, before, "FIFO")
    r = run_cli("optimize", specials["fifo"], "-o", work / "o.onnx", *OPT)  # a FIFO as the input: never read
    assert_refused((r.returncode, r.stdout, r.stderr), work, before, "not a regular file")


def test_api_save_model_never_writes_over_the_files_a_skeleton_reads(tmp_path):
    from normopt import io as nio
    from normopt.errors import NormoptError

    onnx.save(preln_stream_model(), tmp_path / "m.onnx")
    skeleton = nio.load_model(str(tmp_path / "m.onnx")).model  # weights referenced in m.onnx
    h = sha(tmp_path / "m.onnx")
    with pytest.raises(NormoptError, match="weights"):
        nio.save_model(skeleton, str(tmp_path / "m.onnx"))
    assert sha(tmp_path / "m.onnx") == h
    nio.save_model(skeleton, str(tmp_path / "copy.onnx"))
    assert loads(tmp_path / "copy.onnx")


@pytest.mark.parametrize("maker", ["changed", "unchanged"])
def test_optimize_into_another_folder_under_the_same_name(tmp_path, maker):
    """in/m.onnx + in/m.onnx.data -> out/m.onnx: the output's data file and the unchanged copy's
    data file are the same place (one target, not a collision)."""
    if maker == "changed":
        m = preln_stream_model()
    else:
        w = init("w", np.ones((32, 32), np.float32))
        m = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [vi("x", [4, 32])], [vi("y", [4, 32])], [w])
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    onnx.save(m, tmp_path / "in" / "m.onnx", save_as_external_data=True, location="m.onnx.data", size_threshold=1024)
    for _ in range(2):  # and again over the first run's output
        code, out, err = cli("optimize", tmp_path / "in" / "m.onnx", "-o", tmp_path / "out" / "m.onnx", *OPT)
        assert code == 0, err
        assert loads(tmp_path / "out" / "m.onnx") and (tmp_path / "out" / "m.onnx.data").exists()
