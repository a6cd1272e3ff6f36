"""The pass interface, the ordered pipeline and its report.

A pass analyzes first: ``analyze(graph, ctx)`` returns an :class:`Analysis` holding its
matches and, for every candidate it leaves alone, a :class:`Decline` with the reason. Only
then does ``apply(graph, matches, ctx)`` rewrite. The pipeline records, per pass, what was
matched, applied and declined, the node counts by op type before and after, and the wall time.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import time

import numpy as np
from dataclasses import asdict, dataclass, field

import onnx
import onnx_graphsurgeon as gs

from . import graph as G


@dataclass
class Decline:
    target: str  # the node (or tensor) left alone
    kind: str  # what it is, e.g. "LayerNormalization"
    reason: str


@dataclass
class Analysis:
    matches: list = field(default_factory=list)
    declined: list = field(default_factory=list)


@dataclass
class Context:
    target: str = "ort"  # "ort": ORT contrib ops; "onnx": standard ops only
    provider: str = "cpu"
    tune: bool = True  # decide emission forms by timing them on the provider (False: fixed defaults)
    notes: list = field(default_factory=list)
    state: dict = field(default_factory=dict)  # what one pass leaves for a later one, by node name
    threads: int | None = None  # intra-op threads the tuning micro-benchmarks run with (the deployment's)
    shapes: dict = field(default_factory=dict)  # --shape values: dynamic dims are tuned at these sizes
    memo: dict = field(default_factory=dict)  # objects a pass shares between graphs of one run (not part of rollback)


MAX_ROUNDS = 8
CANONICAL = {"fold_constants", "remove_identity", "explicit_defaults", "split_skip_layernorm", "refuse_skip_layernorm",
             "cancel_layout"}  # passes whose rewrites alone do not make a model faster (ORT does them at load)
TUNE_DIM = 128  # a dynamic dim the user gave no --shape for is timed at this size (a leading one at 1)


def tuning_shape(ctx, shape) -> tuple:
    """A value's shape for a tuning micro-benchmark: static dims as they are, named dynamic dims
    at the size the user gave with --shape, other dynamic dims at TUNE_DIM (the leading one 1)."""
    out = []
    for i, d in enumerate(shape or ()):
        if isinstance(d, int) and d > 0:
            out.append(d)
        elif isinstance(d, str) and d in ctx.shapes and isinstance(ctx.shapes[d], (int, np.integer)):
            out.append(int(ctx.shapes[d]))
        elif isinstance(d, str) and d in ctx.shapes and len(ctx.shapes[d]) == 1:
            out.append(int(ctx.shapes[d][0]))
        elif isinstance(d, str) and d in ctx.state.get("tune_dims", {}):  # the run's input plan
            out.append(int(ctx.state["tune_dims"][d]))
        else:
            plan = [v for v in ctx.state.get("tune_dims", {}).values() if v > 1]
            out.append(1 if i == 0 else (max(plan) if plan else TUNE_DIM))
    return tuple(out)
CHANGED = "changed_values"  # ctx.state key: names of values a pass changes on purpose


def mark_changed(ctx, *names) -> None:
    """Record values whose contents a rewrite changes by design (first-divergence
    localization does not compare them)."""
    ctx.state.setdefault(CHANGED, set()).update(n for n in names if n)


class Pass:
    """Base class. Subclasses set ``name`` and ``description`` and implement analyze/apply."""

    name = "pass"
    description = ""
    opt_in = False
    repeat = False  # re-analyze and apply until nothing more applies (at most MAX_ROUNDS)
    keeps_shapes = False  # True: apply never changes the structure, a dtype or a shape (no re-inference after it)

    def analyze(self, graph: gs.Graph, ctx: Context) -> Analysis:  # pragma: no cover - abstract
        raise NotImplementedError

    def apply(self, graph: gs.Graph, matches: list, ctx: Context) -> int:  # pragma: no cover
        raise NotImplementedError


@dataclass
class PassReport:
    name: str
    description: str
    matched: list
    applied: int
    declined: list
    ops_before: dict
    ops_after: dict
    seconds: float
    error: str | None = None  # "internal error in <pass>: ..." when the pass raised (its changes dropped)

    def summary(self) -> str:
        delta = []
        for op in sorted(set(self.ops_before) | set(self.ops_after)):
            b, a = self.ops_before.get(op, 0), self.ops_after.get(op, 0)
            if a != b:
                delta.append(f"{op} {b}->{a}")
        s = f"{self.name:<22} matched {len(self.matched):>3}  applied {self.applied:>3}  declined {len(self.declined):>3}  {self.seconds*1000:7.1f} ms"
        if delta:
            s += "  [" + ", ".join(delta) + "]"
        if self.error:
            s += "  FAILED"
        return s


@dataclass
class Report:
    passes: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    verification: dict | None = None
    changed_values: list = field(default_factory=list)  # tensors whose values passes changed on purpose
    beta_folded: int = 0  # LN betas ln_to_rms folded into linear readers (the beta A/B needs it)
    errors: list = field(default_factory=list)  # "internal error in <pass>: ..." (changes dropped, run went on)

    def to_dict(self) -> dict:
        return {
            "passes": [asdict(p) for p in self.passes],
            "errors": list(self.errors),
            "notes": list(self.notes),
            "verification": self.verification,
            "changed_values": list(self.changed_values),
        }

    def declined(self):
        for p in self.passes:
            for d in p.declined:
                yield p.name, d

    def changed(self) -> bool:
        """Did an optimizing pass (not only canonicalization) rewrite anything?"""
        return any(p.applied and p.name not in CANONICAL for p in self.passes)


class Pipeline:
    def __init__(self, passes, numbering: tuple[dict, int] | None = None):
        """numbering: (pass name -> its place in the full pipeline, the full pipeline's length),
        so that progress says 'pass 7/10' as `normopt passes` lists it, opt-in passes included."""
        self.passes = list(passes)
        self.numbering = numbering

    def _place(self, i: int, p) -> str:
        if self.numbering is None:
            return f"{i}/{len(self.passes)}"
        places, total = self.numbering
        return f"{places.get(p.name, i)}/{total}"

    def names(self):
        return [p.name for p in self.passes]

    def run_graph(self, graph: gs.Graph, ctx: Context, report: Report, on_analysis=None, progress=None) -> gs.Graph:
        """Run every pass; on_analysis(pass, analysis), if given, sees each analysis before apply;
        progress(message) hears each pass start and end.

        A pass that raises never ends the run: the graph and the pass state go back to what
        they were before the pass (graph.mark/rewind: the graph objects' fields and lists, weights
        shared), the report records ``internal error in <pass>: <message>``, and the next pass
        runs. An analysis only reads the graph, so the mark is taken just before the pass's
        first apply: a pass with nothing to apply costs nothing."""
        counts = None  # the op counts after the last pass (still true when the last pass rewrote nothing)
        # is the main graph cleaned up and sorted as it stands? After a refresh (every pass that
        # may change the structure ends with one), until the next such pass; a pass that keeps
        # shapes never changes the structure, and one that failed is rewound to its mark
        clean = False
        # what only the structure decides (the branches to run in, each graph's Scope), kept
        # from pass to pass until one rewrites (an analysis only reads the graph)
        known = {}
        for i, p in enumerate(self.passes, 1):
            if progress:
                progress(f"pass {self._place(i, p)} {p.name}: running ...")
            t0 = time.perf_counter()
            before = dict(counts) if counts is not None else G.op_counts(graph)
            rollback, state = _Rollback(graph), copy.deepcopy(ctx.state)
            notes_before = len(ctx.notes)
            touched = True  # the pass reached apply (a mark was taken)
            try:
                with _collector_paused():  # a pass's objects (new nodes, its rollback mark) stay alive while it runs
                    graph, pr = self._run_everywhere(p, graph, ctx, on_analysis, rollback, known)
                    touched = rollback.snapshot is not None
                    # the mark (a copy of every node's fields) is freed here, by reference counting,
                    # before the collector is back on: kept longer, the next collection rescanned it
                    rollback = state = None
            except Exception as exc:
                graph = rollback.restore()
                ctx.state.clear()
                ctx.state.update(state)
                del ctx.notes[notes_before:]
                msg = f"internal error in {p.name}: {type(exc).__name__}: {_one_line(exc)}; its changes were dropped"
                report.errors.append(msg)
                pr = PassReport(p.name, p.description, [], 0, [], before, before, 0.0, error=msg)
            pr.ops_before = before
            # a pass that never reached apply (no mark taken) only read the graph: same counts
            counts = before if not touched and not pr.error else G.op_counts(graph)
            if touched or pr.error:
                known.clear()
            if touched and not pr.error and not p.keeps_shapes:
                clean = True  # (_run_pass refreshed the model after its last apply)
            pr.ops_after = counts
            pr.seconds = time.perf_counter() - t0
            report.passes.append(pr)
            if progress:
                progress(f"pass {self._place(i, p)} {p.name}: applied {pr.applied} in {pr.seconds:.1f} s"
                         + (" (FAILED, changes dropped)" if pr.error else ""))
        graph.__dict__["normopt_clean"] = clean  # for _run_imported's export
        return graph

    def _run_everywhere(self, p, root, ctx, on_analysis, rollback=None, known=None):
        """The pass on the main graph, then branch by branch on every If whose condition
        verification can drive (see subgraphs_to_run); its report covers them all. ``known``
        (run_graph's): the branches and scopes of a graph no pass has rewritten since they were
        found, to reuse; a scope is found again once this pass has rewritten (taken its mark)."""
        known = {} if known is None or rollback is None else known
        matched, declined, applied = [], [], 0
        if "subgraphs" not in known:
            known["subgraphs"] = subgraphs_to_run(root)
        graphs, skipped = known["subgraphs"]
        for g in [root] + graphs:
            if g is not root:
                g.opset = root.opset
            reuse = rollback is not None and rollback.snapshot is None  # nothing rewritten yet (that we know of)
            sc = known.get(id(g)) if reuse else None
            if sc is None:
                sc = G.Scope(root, g)
                if reuse:
                    known[id(g)] = sc
            with G.scope(root, g, prepared=sc):
                m, d, n = self._run_pass(p, root, g, ctx, on_analysis, rollback)
            matched += m
            declined += d
            applied += n
        if p.name == "ln_to_rms":  # say once why a subgraph was not looked into
            declined += [asdict(d) for d in skipped]
        return root, PassReport(p.name, p.description, matched, int(applied), declined, {}, {}, 0.0)

    def _run_pass(self, p, root, graph, ctx, on_analysis, rollback=None):
        analysis = p.analyze(graph, ctx)
        if on_analysis is not None:
            on_analysis(p, analysis)
        applied = 0
        matched = list(analysis.matches)
        for _ in range(MAX_ROUNDS if p.repeat else 1):
            if not analysis.matches:
                break
            if rollback is not None:
                rollback.take()
            done = p.apply(graph, analysis.matches, ctx) or 0
            if not p.keeps_shapes:  # shape inference over the whole model: only where shapes may change
                G.refresh(root)
            applied += done
            if not p.repeat or done == 0:
                break
            analysis = p.analyze(graph, ctx)
            matched += analysis.matches
        return [describe(m) for m in matched], [asdict(d) for d in analysis.declined], applied

    def run(self, model: onnx.ModelProto, ctx: Context | None = None, progress=None) -> tuple[onnx.ModelProto, Report]:
        ctx = ctx or Context()
        report = Report()
        with _collector_paused():  # import: a million objects that all stay alive (scanning them is waste)
            graph = G.to_graph(model)
            # the imported graph lives for the whole run: collections skip it (see _collector_paused).
            # Frozen before the collector is back on: else its first collection scans the whole import
            gc.freeze()
        try:
            return self._run_imported(graph, model, ctx, report, progress)
        finally:
            gc.unfreeze()

    def _run_imported(self, graph, model, ctx, report, progress):
        defaults = sorted(getattr(graph, "normopt_defaults", {}))
        if defaults:
            shown = ", ".join(defaults[:5]) + (f", ... ({len(defaults)} in all)" if len(defaults) > 5 else "")
            report.notes.append(f"overridable initializers: {shown} are also graph inputs (IR >= 4), so a caller may "
                                "feed them; they stay inputs and every pass treats them as run-time values (re-export "
                                "without keep_initializers_as_inputs to let them be optimized)")
        graph = self.run_graph(graph, ctx, report, progress=progress)
        if not any(p.applied for p in report.passes) and not report.errors:
            out = model  # no pass rewrote anything: the input as it is (an export would only rebuild it; 10 s at 100k nodes)
        else:
            with _collector_paused():
                out = G.to_model(graph, model, clean=graph.__dict__.pop("normopt_clean", False))
        report.notes.extend(ctx.notes)
        report.changed_values = sorted(ctx.state.get(CHANGED, ()))
        report.beta_folded = ctx.state.get("beta_folded", 0)
        return out, report


@contextlib.contextmanager
def _collector_paused():
    """Python's cyclic garbage collector off for a step that builds objects which all stay alive
    (graph import, export): its full collections rescan every live object each time the heap
    grows by a quarter, seconds of a 100k-node run. Outputs never depend on it; memory is
    unchanged (nothing built here is garbage). Each pass runs with it off too: what a pass
    builds (new nodes and values, the rollback mark's copy of every node's fields) lives until
    the pass ends, and collections during a pass rescanned it again and again (two thirds of
    ln_to_rms's time on a 100k-node stack). Between the passes the collector runs, with the
    imported graph frozen (gc.freeze): the cycles a pass leaves are collected then (objects of
    the imported graph that a pass drops wait for the end of the run); weights are never among them (the model holds its own; large new ones are
    spilled)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class _Rollback:
    """The model's state before a pass, taken on demand (before the pass first rewrites)."""

    def __init__(self, root):
        self.root, self.snapshot = root, None

    def take(self):
        if self.snapshot is None:
            self.snapshot = G.mark(self.root)

    def restore(self):
        """The graph as it was before the pass (graph.rewind puts the marked state back on the
        same objects), or the graph itself when the pass failed before rewriting anything."""
        return self.root if self.snapshot is None else G.rewind(self.snapshot)


def subgraphs_to_run(root):
    """([If branches the passes run in], [Decline for each subgraph left alone]).

    Control-flow policy: no rewrite crosses an If/Loop/Scan boundary (an outer value read
    inside a subgraph is read by the owning node, which no pass sees through; see graph.Scope).
    Inside an If branch the passes run on the branch as on a graph of its own, but only where
    verification runs both branches: the condition is a one-element bool graph input (a flag),
    possibly through Not/Identity or a bool-to-bool Cast, whose combinations the harness
    enumerates (inputs.flag_combinations), or a constant. A Cast of any other input is not
    drivable (a float input is never exactly 0, token_type_ids default to 0), nor is a condition
    computed at run time; those branches, and every Loop/Scan body, are left alone with that
    reason. Nested Ifs are visited inside the branches that are run."""
    runs, skipped = [], []
    flags = set()
    for t in root.inputs:
        shape = getattr(t, "shape", None)
        one = shape is not None and all(isinstance(d, (int, np.integer)) and d == 1 for d in shape)
        if one and np.dtype(t.dtype if t.dtype is not None else np.float32) == np.bool_:
            flags.add(id(t))

    def is_bool(t):
        return t is not None and t.dtype is not None and np.dtype(t.dtype) == np.bool_

    def drivable(cond):
        for _ in range(8):
            if cond is None:
                return False
            if isinstance(cond, gs.Constant) or G.const_value(cond) is not None:
                return True
            if id(cond) in flags:
                return True
            prod = cond.inputs[0] if cond.inputs else None
            if prod is None or prod.op not in ("Not", "Identity", "Cast") or not prod.inputs:
                return False
            if prod.op == "Cast" and not is_bool(prod.inputs[0]):
                return False  # Cast(float) is never 0 and Cast(token_type_ids) never 1 under verification
            cond = prod.inputs[0]
        return False

    def visit(g):
        for node in g.nodes:
            if not node.attrs:
                continue
            subs = [(k, v) for k, v in node.attrs.items() if isinstance(v, gs.Graph)]
            if not subs:
                continue
            if node.op == "If" and drivable(node.inputs[0] if node.inputs else None):
                for _, sub in subs:
                    runs.append(sub)
                    visit(sub)
            else:
                why = ("its condition is not a bool flag input or a constant, so verification cannot drive both branches"
                       if node.op == "If" else f"{node.op} bodies are left alone")
                skipped.append(Decline(node.name, node.op, f"subgraphs not rewritten: {why}"))

    visit(root)
    return runs, skipped


def _one_line(exc) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def describe(match) -> str:
    """One line per match: its describe(), a node as "Op 'name'", a tuple of those joined."""
    d = getattr(match, "describe", None)
    if callable(d):
        return d()
    if isinstance(match, gs.Node):
        return f"{match.op} '{match.name}'"
    if isinstance(match, tuple):
        return " + ".join(describe(m) for m in match)
    return str(match)
