"""The pass interface, the ordered pipeline and its report.

A pass analyzes first: ``analyze(graph, ctx)`` returns an :class:`Analysis` holding its
matches and, for every candidate it leaves alone, a :class:`Decline` with the reason. Only
then does ``apply(graph, matches, ctx)`` rewrite. The pipeline records, per pass, what was
matched, applied and declined, the node counts by op type before and after, and the wall time.
"""

from __future__ import annotations

import copy
import time
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


MAX_ROUNDS = 8
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


class Pipeline:
    def __init__(self, passes):
        self.passes = list(passes)

    def names(self):
        return [p.name for p in self.passes]

    def run_graph(self, graph: gs.Graph, ctx: Context, report: Report, on_analysis=None, progress=None) -> gs.Graph:
        """Run every pass; on_analysis(pass, analysis), if given, sees each analysis before apply;
        progress(message) hears each pass start and end.

        A pass that raises never ends the run: the graph and the pass state go back to what
        they were before the pass (a snapshot of the skeleton: structure only, weights by
        reference), the report records ``internal error in <pass>: <message>``, and the next
        pass runs."""
        for i, p in enumerate(self.passes, 1):
            if progress:
                progress(f"pass {i}/{len(self.passes)} {p.name} ...")
            t0 = time.perf_counter()
            before = G.op_counts(graph)
            snapshot, state = G.snapshot(graph), copy.deepcopy(ctx.state)
            notes_before = len(ctx.notes)
            try:
                graph, pr = self._run_pass(p, graph, ctx, on_analysis)
            except Exception as exc:
                graph = G.restore(snapshot)
                ctx.state.clear()
                ctx.state.update(state)
                del ctx.notes[notes_before:]
                msg = f"internal error in {p.name}: {type(exc).__name__}: {_one_line(exc)}; its changes were dropped"
                report.errors.append(msg)
                pr = PassReport(p.name, p.description, [], 0, [], before, before, 0.0, error=msg)
            pr.ops_before = before
            pr.ops_after = G.op_counts(graph)
            pr.seconds = time.perf_counter() - t0
            report.passes.append(pr)
            if progress:
                progress(f"pass {i}/{len(self.passes)} {p.name}: applied {pr.applied} in {pr.seconds:.1f} s"
                         + (" (FAILED, changes dropped)" if pr.error else ""))
        return graph

    def _run_pass(self, p, graph, ctx, on_analysis):
        analysis = p.analyze(graph, ctx)
        if on_analysis is not None:
            on_analysis(p, analysis)
        applied = 0
        matched = list(analysis.matches)
        for _ in range(MAX_ROUNDS if p.repeat else 1):
            if not analysis.matches:
                break
            done = p.apply(graph, analysis.matches, ctx) or 0
            graph = G.refresh(graph)
            applied += done
            if not p.repeat or done == 0:
                break
            analysis = p.analyze(graph, ctx)
            matched += analysis.matches
        return graph, PassReport(
            name=p.name,
            description=p.description,
            matched=[describe(m) for m in matched],
            applied=int(applied),
            declined=[asdict(d) for d in analysis.declined],
            ops_before={},
            ops_after={},
            seconds=0.0,
        )

    def run(self, model: onnx.ModelProto, ctx: Context | None = None, progress=None) -> tuple[onnx.ModelProto, Report]:
        ctx = ctx or Context()
        report = Report()
        graph = G.to_graph(model)
        graph = self.run_graph(graph, ctx, report, progress=progress)
        out = G.to_model(graph, model)
        report.notes.extend(ctx.notes)
        report.changed_values = sorted(ctx.state.get(CHANGED, ()))
        report.beta_folded = ctx.state.get("beta_folded", 0)
        return out, report


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
