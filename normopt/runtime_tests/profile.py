"""Kernel time per inference of selected nodes, from ONNX Runtime's profiler, on the graph ORT
actually runs (after its own fusions)."""

from __future__ import annotations

import collections
import json
import os
import tempfile

import onnx
import onnxruntime as ort

from .providers import make_session


def kernel_ms(path: str, feeds: dict, select, threads: int = 1, runs: int = 20, level: str = "all"):
    """(total ms per inference, {op: ms}) over the nodes that ``select(graph_proto)`` names in
    ORT's optimized graph."""
    from .providers import LEVELS

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = LEVELS[level]
        so.intra_op_num_threads = threads
        so.optimized_model_filepath = os.path.join(tmp, "ort_optimized.onnx")
        so.log_severity_level = 4
        ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        names = set(select(onnx.load(so.optimized_model_filepath, load_external_data=False)))
        sess = make_session(path, "cpu", level, threads, profile_prefix=os.path.join(tmp, "warm"), spin=False)
        for _ in range(3):
            sess.run(None, feeds)
        sess.end_profiling()
        sess = make_session(path, "cpu", level, threads, profile_prefix=os.path.join(tmp, "prof"), spin=False)
        for _ in range(runs):
            sess.run(None, feeds)
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    total = collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("cat") == "Node" and name.endswith("_kernel_time") and name[: -len("_kernel_time")] in names:
            total[e.get("args", {}).get("op_name", "?")] += e["dur"]
    per = {op: us / runs / 1000.0 for op, us in total.items()}
    return sum(per.values()), per
