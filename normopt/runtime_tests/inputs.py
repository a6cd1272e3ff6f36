"""Inputs generated from a model's signature.

* floats: seeded standard normal;
* integers that index a Gather table (token ids), possibly through Cast/Reshape/Unsqueeze/
  Squeeze/Flatten/Expand: uniform in [0, rows of the smallest such table);
  ``int_ranges={name: (lo, hi)}`` overrides; an integer input with neither is an error;
* bool: seeded coin flips;
* dynamic dimensions: ``shapes`` maps an input name to a full shape, or a symbolic dimension
  name (dim_param) to a size; a dynamic dimension left unresolved is an error naming it;
* ``inputs_npz``: real inputs; names, dtypes and static dims are checked against the model.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import numpy as np
import onnx

from ..errors import NormoptError

PASS_THROUGH = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Expand", "Identity", "Slice", "Transpose"}


@dataclass
class InputOptions:
    shapes: dict = field(default_factory=dict)  # input name -> tuple, or dim_param -> int
    int_ranges: dict = field(default_factory=dict)  # input name -> (lo, hi)
    inputs_npz: str | None = None


@dataclass
class InputSpec:
    name: str
    dtype: np.dtype
    dims: list  # int or str (symbolic) or None


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    inits = {i.name for i in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        dims = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param"):
                dims.append(d.dim_param)
            else:
                dims.append(None)
        specs.append(InputSpec(vi.name, dtype, dims))
    return specs


def gather_bounds(model: onnx.ModelProto) -> dict:
    """For each graph input, the rows of the smallest constant Gather table it indexes."""
    inits = {i.name: i for i in model.graph.initializer}
    consts = dict(inits)
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = a.t
    readers = collections.defaultdict(list)
    for n in model.graph.node:
        for i, name in enumerate(n.input):
            readers[name].append((n, i))
    bounds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        seen, frontier, rows = set(), [vi.name], []
        while frontier:
            t = frontier.pop()
            if t in seen:
                continue
            seen.add(t)
            for n, i in readers.get(t, []):
                if n.op_type == "Gather" and i == 1 and n.input[0] in consts:
                    axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
                    dims = list(consts[n.input[0]].dims)
                    rows.append(dims[axis])
                elif n.op_type in PASS_THROUGH and i == 0:
                    frontier.extend(n.output)
        if rows:
            bounds[vi.name] = min(rows)
    return bounds


def resolve_shape(spec: InputSpec, shapes: dict) -> tuple:
    if spec.name in shapes:
        v = shapes[spec.name]
        shp = tuple(int(x) for x in (v if isinstance(v, (tuple, list)) else (v,)))
        if len(shp) != len(spec.dims) or any(isinstance(d, int) and d != s for d, s in zip(spec.dims, shp)):
            raise NormoptError(f"--shape {spec.name}={'x'.join(map(str, shp))} does not fit the model's shape {_fmt(spec.dims)}")
        return shp
    out = []
    for i, d in enumerate(spec.dims):
        if isinstance(d, int) and d > 0:
            out.append(d)
        elif isinstance(d, str) and d in shapes:
            v = shapes[d]
            if isinstance(v, (tuple, list)):
                if len(v) != 1:
                    raise NormoptError(f"--shape {d}=...: '{d}' is a dynamic dimension; give one number")
                v = v[0]
            out.append(int(v))
        else:
            label = f"'{d}'" if isinstance(d, str) and d else f"#{i}"
            raise NormoptError(
                f"input '{spec.name}' has dynamic dimension {label} (shape {_fmt(spec.dims)}); "
                f"give it with --shape {spec.name}=... or --shape {d if isinstance(d, str) and d else 'DIM'}=N"
            )
    return tuple(out)


def _fmt(dims) -> str:
    return "[" + ", ".join(str(d) if d not in (None, "") else "?" for d in dims) + "]"


def check_shape_names(model: onnx.ModelProto, opts: InputOptions) -> None:
    specs = input_specs(model)
    names = {s.name for s in specs}
    dim_names = {d for s in specs for d in s.dims if isinstance(d, str)}
    for key in opts.shapes:
        if key not in names and key not in dim_names:
            raise NormoptError(f"--shape {key}: the model has no input or dynamic dimension named '{key}'")
    for key in opts.int_ranges:
        if key not in names:
            raise NormoptError(f"--int-range {key}: the model has no input named '{key}'")


def load_npz(path: str, model: onnx.ModelProto) -> dict:
    try:
        data = np.load(path, allow_pickle=False)
        feeds = {k: data[k] for k in data.files}
    except Exception as exc:
        raise NormoptError(f"--inputs {path}: cannot read npz ({type(exc).__name__})") from None
    specs = {s.name: s for s in input_specs(model)}
    missing = sorted(set(specs) - set(feeds))
    extra = sorted(set(feeds) - set(specs))
    if missing or extra:
        raise NormoptError(f"--inputs {path}: names do not match the model (missing {missing}, unexpected {extra})")
    for name, arr in feeds.items():
        s = specs[name]
        if arr.dtype != s.dtype:
            raise NormoptError(f"--inputs {path}: '{name}' has dtype {arr.dtype}, the model wants {s.dtype}")
        if arr.ndim != len(s.dims) or any(isinstance(d, int) and d > 0 and d != v for d, v in zip(s.dims, arr.shape)):
            raise NormoptError(f"--inputs {path}: '{name}' has shape {list(arr.shape)}, the model wants {_fmt(s.dims)}")
    return feeds


def make_feeds(model: onnx.ModelProto, seed: int, opts: InputOptions | None = None) -> dict:
    opts = opts or InputOptions()
    if opts.inputs_npz:
        return load_npz(opts.inputs_npz, model)
    check_shape_names(model, opts)
    rng = np.random.default_rng(seed)
    bounds = None
    feeds = {}
    for spec in input_specs(model):
        shp = resolve_shape(spec, opts.shapes)
        if np.issubdtype(spec.dtype, np.floating):
            feeds[spec.name] = rng.standard_normal(shp).astype(spec.dtype)
        elif spec.dtype == np.bool_:
            if int(np.prod(shp)) == 1:  # a flag (an If condition such as use_cache_branch): both values across seeds
                feeds[spec.name] = np.full(shp, seed % 2 == 0, np.bool_)
            else:
                feeds[spec.name] = rng.integers(0, 2, shp).astype(np.bool_)
        elif np.issubdtype(spec.dtype, np.integer):
            if spec.name in opts.int_ranges:
                lo, hi = opts.int_ranges[spec.name]
            else:
                if bounds is None:
                    bounds = gather_bounds(model)
                if spec.name not in bounds:
                    raise NormoptError(
                        f"integer input '{spec.name}' indexes no Gather table, so its range is unknown; "
                        f"give it with --int-range {spec.name}=LO:HI"
                    )
                lo, hi = 0, bounds[spec.name]
            if hi <= lo:
                raise NormoptError(f"--int-range {spec.name}={lo}:{hi} is empty")
            feeds[spec.name] = rng.integers(lo, hi, shp).astype(spec.dtype)
        else:
            raise NormoptError(f"input '{spec.name}' has unsupported dtype {spec.dtype}")
    return feeds


# stress inputs: a per-token offset (constant along the last axis, so a LayerNorm ignores it) and
# a scale, large for the dtype; a rewrite that gets a mean or a scale wrong shows there
STRESS = ("offset", "scale")
_STRESS_SIZE = {"offset": {2: 4.0, 4: 50.0, 8: 50.0}, "scale": {2: 16.0, 4: 1000.0, 8: 1000.0}}


def stress_feeds(feeds: dict, kind: str, seed: int) -> dict:
    rng = np.random.default_rng(10_000 + seed)
    out = {}
    for name, v in feeds.items():
        if not np.issubdtype(v.dtype, np.floating) or v.ndim == 0:
            out[name] = v
            continue
        size = _STRESS_SIZE[kind].get(v.dtype.itemsize, _STRESS_SIZE[kind][4])
        x = v.astype(np.float64)
        if kind == "offset":
            x = x + size * rng.standard_normal(v.shape[:-1] + (1,))
        else:
            x = x * size
        out[name] = x.astype(v.dtype)
    return out
