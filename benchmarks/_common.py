"""Shared by the benchmark scripts."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time


def write_table(lines: list[str], path: str) -> str:
    """Write the markdown table to `path` (creating its folder) and return it."""
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return text


def model_bytes(path: str) -> int:
    """The model file plus its `<path>.data` external-data file, if any."""
    return os.path.getsize(path) + (os.path.getsize(path + ".data") if os.path.exists(path + ".data") else 0)


def remove_model(path: str) -> None:
    """Remove a model file and its `<path>.data` external-data file, where they exist."""
    for p in (path, path + ".data"):
        if os.path.exists(p):
            os.remove(p)


def run_measured(cmd):
    """(exit code, wall s, peak RSS bytes, stdout, stderr) of one process (peak RSS from
    os.wait4). Its output goes to temporary files: a pipe read only after the exit would block a
    process that writes more than the pipe holds."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        return os.waitstatus_to_exitcode(status), wall, usage.ru_maxrss * 1024, out.read(), err.read()
