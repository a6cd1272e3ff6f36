"""Inputs generated from a model's signature, with defaults so a model runs without flags.

Dimensions (a dynamic dim is a name, a stored -1 or 0, or no value at all):
  * ``--shape NAME=2x16`` gives an input's whole shape, ``--shape DIM=16`` a named dimension;
  * otherwise a dim that leads some input (the batch) is 1;
  * a KV-cache length (a name with "past") is 4 where another dim adds to it
    ("past_sequence_length + sequence_length", or a "total..." length), else 0 (Optimum's
    merged decoder names its mask dim after the new tokens alone);
  * a dim named as a sum of others ("a + b") is their sum; a "total" length is past + sequence;
  * any other dim is DEFAULT_SEQ (16), at most what a position table leaves (the rows of the
    table position ids index, less the past); unnamed non-leading dims share that value. The
    trailing dims of a rank-4 float input (an image's height and width) are labelled spatial.
  * settle_plan runs the original once on the plan: where it fails at the default spatial size
    it tries multiples of 32 (32, 64, 128, 224, 256); where every output is empty (a KV cache of
    0 that nothing adds to, a sequence too short) it tries the next sizes; a model that fails
    at every size is bad input (exit 2) with the --shape flag to give.
Values:
  * floats: seeded standard normal (never exactly 0); bool flags (one element, such as
    Optimum's use_cache_branch): seed k takes the k-th of flag_combinations (every combination
    of up to MAX_EXHAUSTIVE flags, else a covering design with every pair of values plus a row
    for each If branch whose flag conditions it misses), so every If branch they select runs,
    nested ones included; seed 0 has every flag True;
    other bools: coin flips;
  * integers: ``--int-range NAME=LO:HI``; else by Hugging Face convention:
    attention_mask all ones (seed 1: the first positions padded with 0), position_ids and
    cache_position the positions after the past, token_type_ids 0; else the rows of the
    Gather table the input indexes (traced through casts, arithmetic such as Keras'
    negative-id fix-up, shape ops, DequantizeLinear tables and If branches);
  * an integer input none of these covers is asked for, all in one message, with the flags.
``inputs_npz`` gives real inputs; names, dtypes and static dims are checked against the model.
The plan's one-line description (``InputPlan.line``) says which defaults were used.
"""

from __future__ import annotations

import ast
import collections
import re
from dataclasses import dataclass, field

import numpy as np
import onnx

from .. import weights as W
from ..errors import NormoptError

DEFAULT_SEQ = 16
DEFAULT_PAST = 4
SPATIAL_SIZES = (32, 64, 128, 224, 256)  # tried when the original fails at the default spatial size
NEXT_SIZES = (32, 64)  # tried for the sequence when every output is empty
MAX_EXHAUSTIVE = 4  # up to this many one-element bool flags, every combination is run
# ops an index can pass through on its way to a Gather (values change at most by arithmetic
# that keeps valid ids valid, as Keras' negative-id handling does)
INDEX_PATH = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Expand", "Identity", "Slice", "Transpose", "Add",
              "Sub", "Mul", "Where", "Less", "Greater", "Not", "Equal", "Neg", "Abs", "Mod", "Concat", "Tile"}
TABLE_PATH = {"DequantizeLinear", "Cast", "Identity", "Reshape"}  # a Gather table may be one of these of a constant


@dataclass
class InputOptions:
    shapes: dict = field(default_factory=dict)  # input name -> tuple, or dim_param -> int
    int_ranges: dict = field(default_factory=dict)  # input name -> (lo, hi)
    inputs_npz: str | None = None


@dataclass
class InputSpec:
    name: str
    dtype: np.dtype
    dims: list  # int (static) or str (named) or None (dynamic, unnamed)


@dataclass
class InputPlan:
    shapes: dict  # input name -> tuple
    dims: dict  # dim name -> value
    values: dict  # input name -> (kind, argument, description); kind: normal flag coin range ones positions zeros
    defaulted: list  # "name=value (why)" for every dim normopt chose
    flag_paths: list = field(default_factory=list)  # {flag: value} that each If branch needs to run (branch_flag_paths)

    def line(self) -> str:
        parts = list(self.defaulted)
        parts += [f"{name} {desc}" for name, (kind, _, desc) in self.values.items() if desc]
        return "inputs: " + ("; ".join(parts) if parts else "static shapes; floats N(0,1)")


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
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param") and d.dim_param:
                dims.append(d.dim_param)
            else:
                dims.append(None)  # unnamed, or stored as -1 / 0: dynamic
        specs.append(InputSpec(vi.name, dtype, dims))
    return specs


# ---------------------------------------------------------------------------------------------
# what the graph says about integer inputs


def _all_nodes(graph):
    for n in graph.node:
        yield n
        for a in n.attribute:
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from _all_nodes(g)


RANDOM_OPS = ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli")


def random_draws(model: onnx.ModelProto) -> list:
    """The nodes (If/Loop/Scan bodies included) that draw random numbers at run time: a model with
    one computes a different function on every run, so running it twice compares nothing."""
    return [n for n in _all_nodes(model.graph) if n.op_type in RANDOM_OPS and n.domain in ("", "ai.onnx")]


def random_draws_line(model: onnx.ModelProto) -> str | None:
    nodes = random_draws(model)
    if not nodes:
        return None
    shown = ", ".join(f"{n.op_type} '{n.name}'" for n in nodes[:2]) + (f" and {len(nodes) - 2} more" if len(nodes) > 2 else "")
    return f"the input draws random numbers at run time ({shown}): its outputs differ from run to run, so running it compares nothing"


def _tensors(model):
    """Constant tensors by name: initializers of every graph and Constant nodes' values."""
    consts = {i.name: i for i in model.graph.initializer}
    for n in _all_nodes(model.graph):
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = a.t
        for a in n.attribute:
            for sg in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                for i in sg.initializer:
                    consts.setdefault(i.name, i)
    return consts


def _table_rows(name, consts, producer, axis):
    for _ in range(6):
        if name in consts:
            dims = list(consts[name].dims)
            return dims[axis] if len(dims) > axis else None
        p = producer.get(name)
        if p is None or p.op_type not in TABLE_PATH:
            return None
        name = p.input[0]
    return None


def gather_bounds(model: onnx.ModelProto) -> dict:
    """For each graph input, the rows of the smallest Gather table it indexes (subgraphs too)."""
    consts = _tensors(model)
    readers = collections.defaultdict(list)
    producer = {}
    for n in _all_nodes(model.graph):
        for i, name in enumerate(n.input):
            readers[name].append((n, i))
        for o in n.output:
            producer[o] = n
    bounds = {}
    inits = {i.name for i in model.graph.initializer}
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
                if n.op_type in ("Gather", "GatherElements") and i == 1:
                    axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
                    r = _table_rows(n.input[0], consts, producer, axis)
                    if r:
                        rows.append(r)
                elif n.op_type in INDEX_PATH and not (n.op_type == "Where" and i == 0):
                    frontier.extend(o for o in n.output if o)
        if rows:
            bounds[vi.name] = min(rows)
    return bounds


# ---------------------------------------------------------------------------------------------
# the plan


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_.:/]*")


def _expr_names(dim: str):
    """Names a dim expression ('past_sequence_length + sequence_length') is made of, or None."""
    if not any(op in dim for op in ("+", "-", "*", "/")):
        return None
    names = _IDENT.findall(dim)
    return names or None


def _eval(dim: str, values: dict):
    expr = dim
    for n in sorted(_IDENT.findall(dim), key=len, reverse=True):
        if n not in values:
            return None
        expr = re.sub(rf"(?<![A-Za-z0-9_.:/]){re.escape(n)}(?![A-Za-z0-9_.:/])", str(int(values[n])), expr)
    try:
        tree = ast.parse(expr, mode="eval")
        if not all(isinstance(x, (ast.Expression, ast.BinOp, ast.Constant, ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Div,
                                  ast.UnaryOp, ast.USub)) for x in ast.walk(tree)):
            return None
        return int(eval(compile(tree, "<dim>", "eval"), {"__builtins__": {}}))  # noqa: S307 - arithmetic only
    except Exception:
        return None


def _is_past(name):
    return "past" in name.lower()


def _is_total(name):
    return "total" in name.lower()


def _named(name, *words):
    n = name.lower()
    return any(w in n for w in words)


_PLANS: dict = {}


def plan_inputs(model: onnx.ModelProto, opts: InputOptions | None = None) -> InputPlan:
    key = (id(model), repr(sorted((opts or InputOptions()).shapes.items())), repr(sorted((opts or InputOptions()).int_ranges.items())))
    cached = _PLANS.get(key)
    if cached is not None and cached[0] is model:
        return cached[1]
    plan = _plan(model, opts or InputOptions())
    if len(_PLANS) > 64:
        _PLANS.clear()
    _PLANS[key] = (model, plan)
    return plan


def _plan(model, opts):
    specs = input_specs(model)
    check_shape_names(model, opts)
    bounds = None
    dims, defaulted = {}, []
    # user-given named dims
    for k, v in opts.shapes.items():
        if not any(s.name == k for s in specs):
            v = v[0] if isinstance(v, (tuple, list)) else v
            dims[k] = int(v)
    names, leading, exprs = [], set(), []
    spatial, other_use = set(), set()
    for s in specs:
        if s.name in opts.shapes:
            continue
        image = W.is_float(s.dtype) and len(s.dims) == 4
        for i, d in enumerate(s.dims):
            if isinstance(d, str) and d not in names:
                (exprs if _expr_names(d) else names).append(d)
            if i == 0 and isinstance(d, str):
                leading.add(d)
            if isinstance(d, str):
                (spatial if image and i >= 2 else other_use).add(d)
    spatial -= other_use
    used_in_exprs = {n for e in exprs for n in _expr_names(e)}
    any_total = any(_is_total(n) for n in names)
    # the sequence bound: rows of the table that position ids index
    pos_bound = None
    if any(np.issubdtype(s.dtype, np.integer) and _named(s.name, "position") for s in specs):
        bounds = gather_bounds(model)
        rows = [bounds[s.name] for s in specs if s.name in bounds and _named(s.name, "position")]
        pos_bound = min(rows) if rows else None

    def choose(n):
        if n in dims:
            return
        if n in leading and not _is_past(n):
            dims[n], why = 1, "batch"
        elif _is_past(n):
            dims[n] = DEFAULT_PAST if (n in used_in_exprs or any_total) else 0
            why = "KV cache" if dims[n] else "KV cache; no dim adds to it"
        elif _is_total(n):
            return  # after the others
        else:
            dims[n] = DEFAULT_SEQ
            why = "spatial" if n in spatial else "sequence"
        defaulted.append(f"{n}={dims[n]} ({why})")

    for n in names:
        choose(n)
    past = sum(v for k, v in dims.items() if _is_past(k))
    if pos_bound is not None:  # positions run past .. past + seq - 1 and must index the table
        for n in names:
            if dims.get(n) == DEFAULT_SEQ and f"{n}={DEFAULT_SEQ} (sequence)" in defaulted and DEFAULT_SEQ + past > pos_bound:
                dims[n] = max(1, pos_bound - past)
                defaulted[defaulted.index(f"{n}={DEFAULT_SEQ} (sequence)")] = f"{n}={dims[n]} (position table has {pos_bound} rows)"
    seq = next((dims[n] for n in names if not _is_past(n) and not _is_total(n) and n not in leading and n in dims), DEFAULT_SEQ)
    for n in names:
        if n not in dims and _is_total(n):
            dims[n] = past + seq
            defaulted.append(f"{n}={dims[n]} (past + sequence)")
    for e in exprs:
        if e not in dims:
            v = _eval(e, dims)
            dims[e] = v if v is not None else DEFAULT_SEQ
            defaulted.append(f"'{e}'={dims[e]}")
    shapes = {}
    unnamed_note = unnamed_spatial = False
    for s in specs:
        if s.name in opts.shapes:
            shapes[s.name] = resolve_shape(s, opts.shapes)
            continue
        shp = []
        image = W.is_float(s.dtype) and len(s.dims) == 4
        for i, d in enumerate(s.dims):
            if isinstance(d, int):
                shp.append(d)
            elif isinstance(d, str):
                shp.append(dims[d])
            else:
                shp.append(1 if i == 0 else seq)
                if image and i >= 2:
                    unnamed_spatial = True
                else:
                    unnamed_note = True
        shapes[s.name] = tuple(shp)
    if unnamed_note:
        defaulted.append(f"unnamed dims: leading 1, others {seq}")
    if unnamed_spatial:
        defaulted.append(f"unnamed spatial dims {seq}")
    # values
    values, missing = {}, []
    for s in specs:
        if W.is_float(s.dtype):
            values[s.name] = ("normal", None, "")
        elif s.dtype == np.bool_:
            values[s.name] = ("flag", None, "True/False by flag combination") if int(np.prod(shapes[s.name])) == 1 else ("coin", None, "")
        elif np.issubdtype(s.dtype, np.integer):
            if s.name in opts.int_ranges:
                lo, hi = opts.int_ranges[s.name]
                if hi <= lo:
                    raise NormoptError(f"--int-range {s.name}={lo}:{hi} is empty")
                values[s.name] = ("range", (lo, hi), f"in [{lo}, {hi}) (--int-range)")
            elif _named(s.name, "attention_mask"):
                values[s.name] = ("ones", None, "all ones (seed 1 left-padded)")
            elif _named(s.name, "position_ids", "cache_position"):
                values[s.name] = ("positions", None, f"positions {past}..")
            elif _named(s.name, "token_type_ids"):
                values[s.name] = ("zeros", None, "zeros")
            else:
                if bounds is None:
                    bounds = gather_bounds(model)
                if s.name in bounds:
                    values[s.name] = ("range", (0, bounds[s.name]), f"in [0, {bounds[s.name]}) (Gather table rows)")
                else:
                    missing.append(s.name)
        else:
            raise NormoptError(f"input '{s.name}' has unsupported dtype {s.dtype}")
    if missing:
        flags = " ".join(f"--int-range {n}=LO:HI" for n in missing)
        what = ", ".join(f"'{n}'" for n in missing)
        raise NormoptError(f"integer input(s) {what} index no Gather table, so their range is unknown; give {flags}")
    flags = {n for n, (kind, _, _) in values.items() if kind == "flag"}
    return InputPlan(shapes, dims, values, defaulted, branch_flag_paths(model, flags) if flags else [])


def branch_flag_paths(model: onnx.ModelProto, flags: set) -> list:
    """[{flag: value}] that each If branch needs to run: the conditions of every If on the way
    to it (the branch's own included) that are a flag, possibly through Not (which flips it),
    Identity or Cast. Nested Ifs conjoin their conditions, so a branch three Ifs deep needs
    three flags at once, which a design covering pairs of flags need not reach. Branches whose
    conditions contradict each other never run and need nothing. Walked with an explicit stack
    (no recursion depth tied to nesting)."""
    out, seen = [], set()
    stack = [(model.graph, {}, {})]  # (graph, producers visible in it, conditions to reach it)
    while stack:
        g, outer, need = stack.pop()
        prod = dict(outer)
        for n in g.node:
            for o in n.output:
                if o:
                    prod[o] = n
        for n in g.node:
            subs = {a.name: a.g for a in n.attribute if a.type == onnx.AttributeProto.GRAPH}
            subs.update({f"{a.name}{i}": sg for a in n.attribute if a.type == onnx.AttributeProto.GRAPHS for i, sg in enumerate(a.graphs)})
            if not subs:
                continue
            lit = _flag_literal(n.input[0], prod, flags) if n.op_type == "If" and n.input else None
            for key, sub in subs.items():
                sub_need = dict(need)
                if lit is not None:
                    flag, value = lit
                    value = value if key == "then_branch" else not value
                    if sub_need.get(flag, value) != value:
                        continue  # contradictory: this branch never runs
                    sub_need[flag] = value
                    frozen = tuple(sorted(sub_need.items()))
                    if frozen not in seen:
                        seen.add(frozen)
                        out.append(dict(sub_need))
                stack.append((sub, prod, sub_need))
    return out


def _flag_literal(name, prod, flags):
    """(flag, value that makes `name` True), or None when `name` is not a flag through
    Not / Identity / Cast."""
    value = True
    for _ in range(64):
        if name in flags:
            return name, value
        n = prod.get(name)
        if n is None or n.op_type not in ("Not", "Identity", "Cast") or not n.input:
            return None
        if n.op_type == "Not":
            value = not value
        name = n.input[0]
    return None


def flag_combinations(plan: InputPlan) -> list:
    """[{flag: bool}], one per seeded draw (cycled): every combination of the one-element bool
    inputs when there are at most MAX_EXHAUSTIVE, else a greedy covering design in which every
    pair of flags takes all four value pairs and every If branch's own flag conditions
    (plan.flag_paths: nested Ifs need three or more flags at once) hold in some row. The first combination has every flag True, the
    second every flag False."""
    flags = [n for n, (kind, _, _) in plan.values.items() if kind == "flag"]
    k = len(flags)
    if k == 0:
        return [{}]
    if k <= MAX_EXHAUSTIVE:
        return [{f: not bool((i >> b) & 1) for b, f in enumerate(flags)} for i in range(2 ** k)]
    rows = [[True] * k, [False] * k]
    need = {(a, b, va, vb) for a in range(k) for b in range(a + 1, k) for va in (0, 1) for vb in (0, 1)}

    def covered(row):
        return {(a, b, int(row[a]), int(row[b])) for a in range(k) for b in range(a + 1, k)}

    for row in rows:
        need -= covered(row)
    idx = {f: i for i, f in enumerate(flags)}
    for path in plan.flag_paths:  # every If branch's own conditions, however many flags they join
        want = [(idx[f], v) for f, v in path.items() if f in idx]
        if len(want) > 2 and not any(all(r[i] == v for i, v in want) for r in rows):
            row = [True] * k
            for i, v in want:
                row[i] = bool(v)
            rows.append(row)
            need -= covered(row)
    rng = np.random.default_rng(0)
    while need:
        best, gain = None, -1
        for _ in range(32):
            cand = [bool(x) for x in rng.integers(0, 2, k)]
            a, b, va, vb = min(need)
            cand[a], cand[b] = bool(va), bool(vb)
            g = len(covered(cand) & need)
            if g > gain:
                best, gain = cand, g
        rows.append(best)
        need -= covered(best)
    return [dict(zip(flags, r)) for r in rows]


def spatial_dims(plan: InputPlan) -> list:
    return [d.split("=")[0] for d in plan.defaulted if d.endswith("(spatial)")]


def _run_first(run, model, opts):
    """(outputs or None, error line) of the original on seed 0 of the plan."""
    try:
        feeds = make_feeds(model, 0, opts)
    except MemoryError:
        raise
    try:
        return run(feeds), ""
    except Exception as exc:
        return None, (str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__)


def settle_plan(model: onnx.ModelProto, opts: InputOptions | None, run) -> tuple:
    """(InputOptions, notes): the plan the whole run uses. `run(feeds) -> list of outputs` runs
    the original. The defaults stand where the original runs on them and some output is
    non-empty; otherwise the usual sizes are tried (spatial dims: multiples of 32; past and
    sequence: the next sizes) and the first that works is fixed in the options. Raises
    NormoptError (bad input) when the original fails at every size tried."""
    opts = opts or InputOptions()
    if opts.inputs_npz:
        return opts, []
    plan = plan_inputs(model, opts)
    outs, err = _run_first(run, model, opts)
    if outs is not None and (not outs or any(np.asarray(o).size for o in outs)):
        return opts, []
    tried = []
    alternatives = []
    spatial = spatial_dims(plan)
    if outs is None and spatial:
        alternatives += [{d: n for d in spatial} for n in SPATIAL_SIZES]
    if outs is not None:  # every output empty: a zero KV cache, a too-short sequence
        pasts = [d.split("=")[0] for d in plan.defaulted if d.split("=")[0] in plan.dims and plan.dims[d.split("=")[0]] == 0]
        seqs = [d.split("=")[0] for d in plan.defaulted if d.endswith(("(sequence)", "(spatial)"))]
        base = {d: DEFAULT_PAST for d in pasts}
        if base:
            alternatives.append(base)
        alternatives += [{**base, **{d: n for d in seqs}} for n in NEXT_SIZES if seqs]
    for alt in alternatives:
        trial = InputOptions(shapes={**opts.shapes, **{d: v for d, v in alt.items()}}, int_ranges=dict(opts.int_ranges),
                             inputs_npz=None)
        try:
            plan_inputs(model, trial)
        except NormoptError:
            continue
        o2, e2 = _run_first(run, model, trial)
        tried.append(", ".join(f"{d}={v}" for d, v in alt.items()))
        if o2 is not None and any(np.asarray(o).size for o in o2):
            why = f"fails at the defaults ({err})" if outs is None else "gives only empty outputs at the defaults"
            return trial, [f"inputs: the original {why}; using {tried[-1]}"]
    if outs is None:
        flags = " ".join(f"--shape {d.split('=')[0]}=N" for d in plan.defaulted if "=" in d and not d.startswith("unnamed"))
        also = f" (also tried {'; '.join(tried)})" if tried else ""
        raise NormoptError(f"the input model fails to run with the default {plan.line()}: {err}{also}; "
                           f"give the sizes it needs: {flags or '--shape INPUT=AxB'} (or --inputs feeds.npz)")
    return opts, ["inputs: every output of the original is empty at the defaults and at the next sizes"]


def resolve_shape(spec: InputSpec, shapes: dict) -> tuple:
    if spec.name in shapes:
        v = shapes[spec.name]
        shp = tuple(int(x) for x in (v if isinstance(v, (tuple, list)) else (v,)))
        if len(shp) != len(spec.dims) or any(isinstance(d, int) and d != s for d, s in zip(spec.dims, shp)):
            raise NormoptError(f"--shape {spec.name}={'x'.join(map(str, shp))} does not fit the model's shape {_fmt(spec.dims)}")
        return shp
    raise KeyError(spec.name)


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
    plan = plan_inputs(model, opts)
    rng = np.random.default_rng(seed)
    combos = flag_combinations(plan)
    combo = combos[seed % len(combos)]
    feeds = {}
    past = sum(v for k, v in plan.dims.items() if _is_past(k))
    for spec in input_specs(model):
        shp = plan.shapes[spec.name]
        kind, detail, _ = plan.values[spec.name]
        if kind == "normal":
            v = rng.standard_normal(shp).astype(spec.dtype)
            v[v == 0] = np.asarray(1e-3, spec.dtype)  # a float input is never exactly 0
            feeds[spec.name] = v
        elif kind == "flag":
            feeds[spec.name] = np.full(shp, combo[spec.name], np.bool_)
        elif kind == "coin":
            feeds[spec.name] = rng.integers(0, 2, shp).astype(np.bool_)
        elif kind == "range":
            lo, hi = detail
            feeds[spec.name] = rng.integers(lo, hi, shp).astype(spec.dtype)
        elif kind == "ones":
            v = np.ones(shp, spec.dtype)
            if seed == 1 and len(shp) and shp[-1] > 1:
                v[..., : min(2, shp[-1] - 1)] = 0  # left padding
            feeds[spec.name] = v
        elif kind == "positions":
            n = shp[-1] if shp else 1
            feeds[spec.name] = np.broadcast_to(np.arange(past, past + n), shp).astype(spec.dtype).copy()
        else:  # zeros
            feeds[spec.name] = np.zeros(shp, spec.dtype)
    return feeds


# stress inputs: a per-token offset (constant along the last axis, so a LayerNorm ignores it) and
# a scale, large for the dtype; a rewrite that gets a mean or a scale wrong shows there
STRESS = ("offset", "scale")
_STRESS_SIZE = {"offset": {2: 4.0, 4: 50.0, 8: 50.0}, "scale": {2: 16.0, 4: 1000.0, 8: 1000.0}}


def stress_feeds(feeds: dict, kind: str, seed: int) -> dict:
    rng = np.random.default_rng(10_000 + seed)
    out = {}
    for name, v in feeds.items():
        if not W.is_float(v.dtype) or v.ndim == 0:
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
