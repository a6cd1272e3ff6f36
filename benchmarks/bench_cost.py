"""Optimize's own cost (issue 20): wall time and peak RSS of `normopt optimize --no-tune`, with
and without verification, as a ratio to the I/O floor of the same file.

The I/O floor is what reading and writing the model costs anyway: `onnx.load` (weights
included) + `onnx.shape_inference.infer_shapes` + `onnx.save`, in a process of its own, timed in
the same run as normopt and interleaved with it (floor, --no-verify, verified; then again), so
both see the same machine state. Each configuration runs --runs times (default 3, after one
warm-up round that is not counted); the table gives medians, the range, the largest peak RSS
(os.wait4's ru_maxrss) and the ratios of the medians.

Corpus (random weights, nothing downloaded; each model is built once into --dir):
  * det-db: a DBNet-shaped text detector (strided conv backbone, FPN neck with nearest
    Resize by 2, all levels resized to 1/4 and concatenated, a DB head with two ConvTranspose
    x2), exported by torch at opset 11 with dynamic H and W (normopt upgrades it to 13), run
    with --shape x=1x3x320x320; det-db-sizes: the same with Resize to Shape-computed sizes;
  * pitch-crepe: a CREPE-shaped pitch CNN (six Conv2d/ReLU/BatchNorm/MaxPool blocks, a Linear to
    360 bins), run with --shape frames=16x1024;
  * vit-base, bert-base, gpt2-small: Hugging Face ViTModel / BertModel / GPT2Model at full
    size (12 x 768) from configs (normopt.models.hf, TorchScript exporter);
  * llm-gpt2-small (652 MB in one protobuf) and llm-opt-350m (external data): normopt.models.llm
    decoders with a KV cache.
--small builds every model at toy size instead (a smoke test of the script, not a benchmark).

    python benchmarks/bench_cost.py --dir /path/with/space [--only det-db vit-base] [--runs 3] [--small]

Targets (issue 20): --no-verify <= 3x the floor on every model (moonshot 1.5x); verified <= 3x
its --no-verify time; llm-gpt2-small verified <= 10 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from _common import model_bytes, remove_model, run_measured, write_table

FLOOR = r"""
import os, sys, onnx
src, dst = sys.argv[1], sys.argv[2]
external = os.path.exists(src + ".data")
m = onnx.load(src)
if m.ByteSize() < 2**31 - 1:
    m = onnx.shape_inference.infer_shapes(m)
    if external:
        onnx.save(m, dst, save_as_external_data=True, location=os.path.basename(dst) + ".data")
    else:
        onnx.save(m, dst)
else:  # over protobuf's limit: infer on the file
    onnx.save(m, dst, save_as_external_data=True, location=os.path.basename(dst) + ".data")
    onnx.shape_inference.infer_shapes_path(dst, dst)
"""


def _det(path, sizes: bool, width: int):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    torch.manual_seed(0)

    def cbr(i, o, s=1):
        return nn.Sequential(nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU())

    class DB(nn.Module):
        def __init__(self, w):
            super().__init__()
            self.stem = cbr(3, w, 2)
            chans = [w * 2 ** i for i in range(4)]
            self.stages = nn.ModuleList([nn.Sequential(cbr(chans[i - 1] if i else w, chans[i], 2), cbr(chans[i], chans[i]), cbr(chans[i], chans[i]))
                                         for i in range(4)])
            self.lat = nn.ModuleList([nn.Conv2d(c, w * 4, 1) for c in chans])
            self.smooth = nn.ModuleList([nn.Conv2d(w * 4, w, 3, padding=1) for _ in chans])
            self.head = nn.Sequential(nn.Conv2d(w * 4, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
                                      nn.ConvTranspose2d(w, w, 2, 2), nn.BatchNorm2d(w), nn.ReLU(),
                                      nn.ConvTranspose2d(w, 1, 2, 2), nn.Sigmoid())

        def forward(self, x):
            x = self.stem(x)
            feats = []
            for st in self.stages:
                x = st(x)
                feats.append(x)
            p = [lat(f) for lat, f in zip(self.lat, feats)]
            for i in range(3, 0, -1):
                up = (F.interpolate(p[i], size=p[i - 1].shape[-2:], mode="nearest") if sizes
                      else F.interpolate(p[i], scale_factor=2.0, mode="nearest"))
                p[i - 1] = p[i - 1] + up
            outs = [sm(q) for sm, q in zip(self.smooth, p)]
            outs = [outs[0]] + [(F.interpolate(o, size=outs[0].shape[-2:], mode="nearest") if sizes
                                 else F.interpolate(o, scale_factor=float(2 ** i), mode="nearest")) for i, o in enumerate(outs[1:], 1)]
            return self.head(torch.cat(outs, 1))

    m = DB(width).eval()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2)
    from normopt.models.export import export

    export(m, {"x": torch.randn(1, 3, 320, 320)}, path, opset=11, output_names=["maps"],
           dynamic_axes={"x": {0: "N", 2: "H", 3: "W"}, "maps": {0: "N", 2: "H", 3: "W"}})


def _pitch(path, small: bool):
    """A CREPE-shaped pitch CNN: a 1024-sample audio frame, six Conv2d (k x 1) -> ReLU ->
    BatchNorm -> MaxPool(2 x 1) -> Dropout blocks (CREPE's "small" capacity: 256, 32, 32, 32,
    64, 128 filters; widths 512, 64, ...; stride 4 first), Flatten, Linear to 360 pitch bins,
    Sigmoid; exported with a dynamic number of frames, run with --shape frames=16x1024."""
    import torch
    import torch.nn as nn

    torch.manual_seed(0)
    cap = 1 if small else 8
    filters = [c * cap for c in (32, 4, 4, 4, 8, 16)]
    widths = [512, 64, 64, 64, 64, 64]
    layers, cin = [], 1
    for i, (f, w) in enumerate(zip(filters, widths)):
        stride = 4 if i == 0 else 1
        layers += [nn.Conv2d(cin, f, (w, 1), (stride, 1), padding=((w - 1) // 2, 0)), nn.ReLU(), nn.BatchNorm2d(f),
                   nn.MaxPool2d((2, 1)), nn.Dropout(0.25)]
        cin = f

    class Crepe(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(*layers)
            with torch.no_grad():
                n = self.body(torch.zeros(1, 1, 1024, 1)).numel()
            self.head = nn.Linear(n, 360)

        def forward(self, frames):
            x = self.body(frames.reshape(-1, 1, 1024, 1))
            return torch.sigmoid(self.head(x.flatten(1)))

    m = Crepe().eval()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2)
    from normopt.models.export import export

    export(m, {"frames": torch.randn(16, 1024)}, path, opset=13, output_names=["pitch"],
           dynamic_axes={"frames": {0: "N"}, "pitch": {0: "N"}})


def build(name, path, small):
    from normopt.models.hf import export_hf

    full = dict(hidden=768, layers=12, heads=12)
    tiny = dict(hidden=64, layers=2, heads=4)
    cfg = tiny if small else full
    if name == "pitch-crepe":
        _pitch(path, small)
    elif name in ("det-db", "det-db-sizes"):
        _det(path, name.endswith("sizes"), 8 if small else 32)
    elif name == "vit-base":
        export_hf("vit", path, config={**cfg, "image": 32 if small else 224, "patch": 8 if small else 16})
    elif name == "bert-base":
        export_hf("bert", path, config={**cfg, **({} if small else {"vocab": 30522, "positions": 512}), "seq": 16 if small else 128})
    elif name == "gpt2-small":
        export_hf("gpt2", path, config={**cfg, **({} if small else {"vocab": 50257, "positions": 1024}), "seq": 16 if small else 128})
    elif name.startswith("llm-"):
        from normopt.models.llm import SHAPES, DecoderSpec, write_decoder

        shape = name[len("llm-"):]
        spec = DecoderSpec() if small else DecoderSpec(**SHAPES[shape])
        write_decoder(path, spec, single_file=(shape == "gpt2-small"))
    else:
        raise SystemExit(f"unknown model {name}")


CASES = {  # name: extra optimize arguments
    "det-db": ["--shape", "x=1x3x320x320"],
    "det-db-sizes": ["--shape", "x=1x3x320x320"],
    "pitch-crepe": ["--shape", "frames=16x1024"],
    "vit-base": [],
    "bert-base": [],
    "gpt2-small": [],
    "llm-gpt2-small": [],
    "llm-opt-350m": [],
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/normopt-cost")
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--small", action="store_true", help="toy-sized models: a smoke test of this script")
    ap.add_argument("--keep", action="store_true", help="keep the generated models")
    ap.add_argument("--out", default=None)
    ap.add_argument("--build", nargs=2, metavar=("NAME", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build:
        build(args.build[0], args.build[1], args.small)
        return
    out_md = args.out or os.path.join(os.path.dirname(__file__), "results", "cost-small.md" if args.small else "cost.md")
    os.makedirs(args.dir, exist_ok=True)
    py = sys.executable
    lines = [f"| model | size | floor s | --no-verify s | verified s | no-verify / floor | verified / no-verify | peak RSS floor / no-verify / verified | slowest phases (no-verify) | verification phases s (verified) |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|---|"]
    names = [n for n in CASES if not args.only or n in args.only]
    for name in names:
        src = os.path.join(args.dir, f"{name}{'-small' if args.small else ''}.onnx")
        if not os.path.exists(src):
            t0 = time.perf_counter()
            # in a process of its own: a child's ru_maxrss starts from its parent's, so this
            # process never imports torch or onnx (the peak RSS figures stay the child's)
            subprocess.run([py, os.path.abspath(__file__), "--build", name, src] + (["--small"] if args.small else []), check=True)
            print(f"{name}: built in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        dst = os.path.join(args.dir, f"{name}.out.onnx")
        floor_dst = os.path.join(args.dir, f"{name}.floor.onnx")
        report = os.path.join(args.dir, f"{name}.report.json")
        base = [py, "-m", "normopt.cli", "optimize", src, "-o", dst, "--no-tune", "-q", "--report", report, *CASES[name]]
        cmds = {"floor": [py, "-c", FLOOR, src, floor_dst], "noverify": base + ["--no-verify"], "verify": base}
        res = {k: [] for k in cmds}
        reports = {}
        failed = None
        for round_ in range(args.runs + 1):  # round 0 warms the page cache and is not counted
            for k, cmd in cmds.items():
                remove_model(dst if k != "floor" else floor_dst)
                code, wall, rss, _, err = run_measured(cmd)
                if code != 0:
                    failed = f"{k}: exit {code}: {err.strip().splitlines()[-1] if err.strip() else ''}"
                    break
                if round_:
                    res[k].append((wall, rss))
                    if k in ("noverify", "verify"):
                        reports.setdefault(k, []).append((wall, json.load(open(report))))
            if failed:
                break
        for p in (dst, floor_dst):
            remove_model(p)
        if failed:
            print(f"{name}: {failed}", file=sys.stderr)
            lines.append(f"| {name} | {model_bytes(src) / 2**20:.1f} MB | failed: {failed} | | | | | | | |")
            continue
        med = {k: statistics.median(w for w, _ in v) for k, v in res.items()}
        rng = {k: (min(w for w, _ in v), max(w for w, _ in v)) for k, v in res.items()}
        rss = {k: max(r for _, r in v) for k, v in res.items()}
        walls = sorted(reports["noverify"], key=lambda x: x[0])
        rep = walls[len(walls) // 2][1]
        slowest = ", ".join(f"{p['name']} {p['seconds']:.2f}" for p in sorted(rep["passes"], key=lambda p: -p["seconds"])[:3])
        # the verified run of median wall time: its verification phases (report "verification.timings")
        vwalls = sorted(reports["verify"], key=lambda x: x[0])
        vt = (vwalls[len(vwalls) // 2][1].get("verification") or {}).get("timings") or {}
        phases = ", ".join(f"{k} {v:.2f}" for k, v in vt.items() if k != "total") or "-"

        def cell(k):
            return f"{med[k]:.2f} ({rng[k][0]:.2f}-{rng[k][1]:.2f})"

        lines.append(f"| {name} | {model_bytes(src) / 2**20:.1f} MB | {cell('floor')} | {cell('noverify')} | {cell('verify')} | "
                     f"{med['noverify'] / med['floor']:.2f}x | {med['verify'] / med['noverify']:.2f}x | "
                     f"{rss['floor'] / 2**20:.0f} / {rss['noverify'] / 2**20:.0f} / {rss['verify'] / 2**20:.0f} MB | {slowest} | {phases} |")
        print(lines[-1], file=sys.stderr)
        if not args.keep:
            remove_model(src)
    import platform

    import onnxruntime as ort

    head = (f"machine: {platform.machine()}, {os.cpu_count()} cores, onnxruntime {ort.__version__}; median of {args.runs} "
            "interleaved runs after a warm-up round (range in parentheses); floor = onnx.load + "
            "onnx.shape_inference.infer_shapes + onnx.save of the same file; normopt = `normopt optimize --no-tune`"
            + (" -- TOY SIZES (--small): a smoke test, not a benchmark" if args.small else "") + "\n\n")
    print(write_table([head] + lines, out_md))


if __name__ == "__main__":
    main()
