"""normopt command line: optimize | verify | bench | inspect | passes | demo.

Exit codes: 0 success (written / equivalent); 1 verification failed (nothing written), models
differ, or (bench --max-ratio) a model is measurably slower than allowed; 2 bad input or usage
(one line on stderr, nothing written); 3 internal error; 130 interrupted.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import click

from .errors import InternalError, NormoptError, VerificationFailed
from .reporting import MATCHED_APPLIED, collapsed_declines, github_summary, verify_cases, verify_markdown, write_junit


def _fail(msg: str, code: int):
    click.echo(f"normopt: error: {msg}", err=True)
    sys.exit(code)


def guarded(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except NormoptError as exc:
            _fail(str(exc).splitlines()[0] if str(exc) else "bad input", 2)
        except VerificationFailed as exc:
            if exc.result is not None:
                for line in exc.result.summary_lines():
                    click.echo(line, err=True)
            _fail(str(exc), 1)
        except InternalError as exc:
            _fail(f"internal error: {exc}", 3)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except click.exceptions.Exit:
            raise
        except Exception as exc:  # a bug: one line (the whole message on it), non-zero, nothing written
            if os.environ.get("NORMOPT_DEBUG"):
                raise
            text = " ".join(str(exc).split())
            _fail(f"internal error: {type(exc).__name__}: {text} (set NORMOPT_DEBUG=1 for a traceback)", 3)

    return wrapper


def _parse_shapes(values, sweep: bool = False):
    """--shape NAME=1x128 or DIM=128. With sweep=True a value may list several sizes,
    'sequence=16,128,512', and a dict of name -> [tuples] comes back (the sweep's axes)."""
    shapes = {}
    for v in values:
        if "=" not in v:
            raise NormoptError(f"--shape {v}: expected NAME=1x128 (an input) or DIM=128 (a dynamic dimension)")
        k, s = v.split("=", 1)
        options = []
        for part in s.split(",") if sweep else [s]:
            try:
                dims = tuple(int(x) for x in part.lower().split("x"))
            except ValueError:
                raise NormoptError(f"--shape {v}: '{part}' is not a shape like 1x128") from None
            if any(d < 0 for d in dims):
                raise NormoptError(f"--shape {v}: dimensions must not be negative")
            options.append(dims)
        if not sweep and "," in s:
            raise NormoptError(f"--shape {v}: several sizes are for 'normopt bench' sweeps")
        shapes[k] = options if sweep else options[0]
    return shapes


def _int_ranges(int_range) -> dict:
    """--int-range NAME=LO:HI: integers drawn from LO up to HI, HI excluded."""
    ranges = {}
    for v in int_range:
        try:
            k, rng = v.split("=", 1)
            lo, hi = (int(x) for x in rng.split(":"))
        except ValueError:
            raise NormoptError(f"--int-range {v}: expected NAME=LO:HI") from None
        ranges[k] = (lo, hi)
    return ranges


def _input_opts(shape, int_range, inputs):
    from .runtime_tests.inputs import InputOptions

    if inputs and not os.path.isfile(inputs):
        raise NormoptError(f"--inputs {inputs}: no such file")
    return InputOptions(shapes=_parse_shapes(shape), int_ranges=_int_ranges(int_range), inputs_npz=inputs)


SHAPE_HELP = ("NAME=1x128 for an input, or DIM=128 for a dynamic dimension (defaults: see the 'inputs:' line); "
              "repeat it for several: --shape batch_size=2 --shape sequence_length=64")
INT_RANGE_HELP = ("NAME=LO:HI: integer input NAME is drawn from LO up to HI, HI excluded (input_ids=0:50257 for a "
                  "vocabulary of 50257); repeat it for several inputs")
INPUTS_HELP = "a .npz file of real inputs (one array per input name), used instead of drawn ones"


def input_options(fn):
    fn = click.option("--shape", multiple=True, metavar="NAME=SHAPE", help=SHAPE_HELP)(fn)
    fn = click.option("--int-range", multiple=True, metavar="NAME=LO:HI", help=INT_RANGE_HELP)(fn)
    fn = click.option("--inputs", type=str, default=None, metavar="FILE.npz", help=INPUTS_HELP)(fn)
    return fn


def approx_options(fn):
    fn = click.option("--min-cosine", type=float, default=None, help="approximate: pass a float output whose cosine similarity is at least this")(fn)
    fn = click.option("--min-snr", type=float, default=None, help="approximate: ... whose SNR (dB) is at least this")(fn)
    fn = click.option("--min-top1", type=float, default=None, help="approximate: ... whose argmax agreement over the last axis is at least this")(fn)
    return fn


def _progress(quiet: bool, data_on_stdout: bool = False):
    """Progress of a long run, one line per phase (the inputs chosen, each pass as it starts and
    ends, tuning, writing, verifying), each written and flushed as it happens.

    At a terminal the lines go to stderr. When stdout is not a terminal (a CI log, a pipe, a file)
    they go to stdout, between the run's own lines, so a log shows how far a run got even when
    it is interrupted; a command whose stdout is data (bench's table, CSV or JSON) keeps them on
    stderr. Nothing with --quiet."""
    if quiet:
        return None
    if not sys.stdout.isatty():
        stream = sys.stderr if data_on_stdout else sys.stdout
    elif sys.stderr.isatty():
        stream = sys.stderr  # a terminal
    else:
        return None  # a person watches stdout and stderr goes to a file: keep that file for errors

    terminal = stream.isatty()

    def say(msg):
        if not terminal and msg.endswith(": running ..."):
            return  # a log gets each pass once, when it ends
        click.echo(f"normopt: {msg}", file=stream)  # click.echo flushes
        stream.flush()

    return say


TARGET_HELP = ("how RMSNorms are emitted: ort = SimplifiedLayerNormalization (an ONNX Runtime contrib op); "
               "onnx = the standard RMSNormalization at opset >= 23, below that its decomposed form")
SEEDS_HELP = "seeded random input sets verification compares (two stress inputs, offset and scale, come on top)"
ATOL_HELP = "absolute tolerance of the comparison (default: 1e-4 for fp32 outputs, 1e-2 for fp16)"
RTOL_HELP = "relative tolerance of the comparison (default: 1e-3 for fp32 outputs, 1e-2 for fp16)"
QUIET_HELP = "no progress lines (see 'Progress' in the README)"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="normopt")
def main():
    """Verified ONNX rewrites of transformer normalizations.

    Exit codes: 0 success (written, or equivalent); 1 verification failed or models differ
    (nothing written); 2 bad input or usage (one line on stderr, nothing written); 3 internal
    error; 130 interrupted."""


@main.command(epilog=MATCHED_APPLIED)
@click.argument("model", type=str)
@click.option("-o", "--output", "output", required=True, type=str, help="output model path")
@click.option("--passes", default=None, help="comma-separated pass names (default: the whole pipeline)")
@click.option("--report", "report_path", default=None, type=str, help="write the JSON report here")
@click.option("--target", type=click.Choice(["ort", "onnx"]), default="ort", show_default=True, help=TARGET_HELP)
@click.option("--no-verify", is_flag=True, help="skip the ONNX Runtime equivalence check")
@click.option("--crms", is_flag=True, help="opt-in Pre-CRMSNorm: kept only where it measures faster on --provider")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="execution provider the model is tuned for")
@click.option("--threads", type=int, default=None, help="intra-op threads to tune at (the deployment's; default: ORT's)")
@click.option("--opset", type=int, default=None, help="upgrade the model to this opset first (e.g. 23 for RMSNormalization with --target onnx)")
@click.option("--no-tune", is_flag=True, help="fixed emission defaults, no timing (deterministic, for CI)")
@click.option("--verify-level", type=click.Choice(["disable", "basic", "extended", "all"]), default="all", show_default=True,
              help="ORT graph-optimization level of the output's session during verification")
@click.option("--seeds", default=3, show_default=True, help=SEEDS_HELP)
@click.option("--atol", type=float, default=None, help=ATOL_HELP)
@click.option("--rtol", type=float, default=None, help=RTOL_HELP)
@click.option("-q", "--quiet", is_flag=True, help=QUIET_HELP)
@input_options
@guarded
def optimize(model, output, passes, report_path, target, no_verify, crms, provider, threads, opset, no_tune, verify_level, seeds,
             atol, rtol, quiet, shape, int_range, inputs):
    """Optimize MODEL into -o OUTPUT; verified against MODEL before it is written."""
    from .api import optimize as run
    from .runtime_tests.providers import providers_for

    providers_for(provider)
    names = [p.strip() for p in passes.split(",") if p.strip()] if passes else None
    opts = _input_opts(shape, int_range, inputs)
    res = run(model, output, passes=names, target=target, verify=not no_verify, report_path=report_path,
              seeds=seeds, atol=atol, rtol=rtol, input_opts=opts, verify_level=verify_level,
              opt_in=["crms"] if crms else None, provider=provider, tune=not no_tune, opset=opset,
              progress=_progress(quiet), threads=threads)
    for err in res.report.errors:  # a pass that failed: its changes were dropped, the rest ran
        click.echo(f"normopt: {err}", err=True)
    for note in res.report.notes:
        click.echo(note)
    for p in res.report.passes:
        click.echo(p.summary())
    for line in collapsed_declines(res.report):
        click.echo(line)
    if res.unchanged:
        click.echo(f"no changes: wrote a byte-identical copy of the input to {res.output}")
    else:
        if res.verification is not None:
            v = res.verification
            worst = max(v.outputs, key=lambda m: m.max_abs, default=None)
            how = "against the float64 reference" if v.mode == "exact" else (
                "by the fp32 tolerance check (FALLBACK: no float64 reference)" if v.mode == "fallback" else "by tolerance")
            click.echo(f"verified: equivalent {how} on {len(v.inputs)} input sets ({', '.join(v.inputs)})"
                       + (f", max abs diff {worst.max_abs:.3g} on '{worst.name}'" if worst else "")
                       + (f" (error vs exact: output {worst.err_cand:.3g}, input {worst.err_orig:.3g})"
                          if worst is not None and worst.err_cand is not None else ""))
            for note in v.notes:
                click.echo(f"verification: {note}")
            if v.uninformative:
                click.echo("verification: uninformative on every input set: " + ", ".join(v.uninformative))
            if v.timings:
                click.echo("verification time: " + ", ".join(f"{k} {t:.2f} s" for k, t in v.timings.items()))
        elif res.proof is not None and res.proof.proved:
            click.echo("verified: proved equivalent (translation validation); the dynamic check did not fit in memory")
        else:
            click.echo("not verified (--no-verify)")
        click.echo(f"wrote {res.output}")
    if report_path:
        click.echo(f"report: {os.path.abspath(report_path)}")


@main.command()
@click.argument("reference", type=str)
@click.argument("candidate", type=str)
@click.option("--atol", type=float, default=None, help=ATOL_HELP)
@click.option("--rtol", type=float, default=None, help=RTOL_HELP)
@click.option("--seeds", default=3, show_default=True, help=SEEDS_HELP)
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="execution provider the candidate runs on (the reference always runs on the CPU)")
@click.option("--level", type=click.Choice(["disable", "basic", "extended", "all"]), default="all", show_default=True,
              help="graph optimization level of the candidate's session")
@click.option("--json", "json_path", default=None, help="write per-output metrics as JSON")
@click.option("--junit", "junit_path", default=None, help="write a JUnit XML report (one test case per output)")
@click.option("--localize", is_flag=True, help="when they differ, name the first node whose value diverges")
@click.option("--report", "report_path", default=None,
              help="normopt optimize's JSON report for CANDIDATE: values it changed on purpose are not blamed by --localize")
@click.option("--prove", is_flag=True,
              help="prove CANDIDATE equivalent from the two graphs and their weights, running neither model (exit 0 proved, 1 not proved)")
@approx_options
@input_options
@guarded
def verify(reference, candidate, atol, rtol, seeds, provider, level, json_path, junit_path, localize, report_path, prove, min_cosine,
           min_snr, min_top1, shape, int_range, inputs):
    """Check that CANDIDATE computes the same as REFERENCE (exit 0 equivalent, 1 differs).

    Each output is judged against REFERENCE evaluated in float64: CANDIDATE passes when it is no
    further from that exact answer than 10x REFERENCE's own error (plus 32 ulps of the output's
    RMS); --atol/--rtol ask for a fixed-tolerance check instead. A check that compared nothing
    (empty or uninformative outputs) does not pass.

    With --min-cosine / --min-snr / --min-top1 the comparison is approximate (a model that
    differs by design, such as fp16 or int8 against fp32): a float output passes when it meets
    every threshold given. A markdown summary is appended to $GITHUB_STEP_SUMMARY when set."""
    import time

    from .api import verify as run
    from .runtime_tests.equivalence import Thresholds
    from .runtime_tests.providers import providers_for

    t0 = time.perf_counter()
    providers_for(provider)
    from . import io as nio
    from . import paths as P

    plan = P.Plan()
    for m in (reference, candidate):
        plan.read_model(m, nio.load_model(m).model)
    plan.read(report_path, f"the --report file {report_path}")
    plan.read(inputs, f"the --inputs file {inputs}")
    json_t = plan.write(json_path, "--json")
    junit_t = plan.write(junit_path, "--junit")
    plan.check()
    if prove:
        _prove_command(reference, candidate, json_t, junit_t, plan)
    changed = None
    if report_path:
        try:
            with open(report_path) as f:
                changed = json.load(f)["changed_values"]
        except (OSError, ValueError, KeyError):
            raise NormoptError(f"--report {report_path}: not a normopt optimize report (JSON with changed_values)") from None
    res = run(reference, candidate, seeds=seeds, atol=atol, rtol=rtol, input_opts=_input_opts(shape, int_range, inputs),
              provider=provider, level=level, localize_divergence=localize, changed_values=changed,
              thresholds=Thresholds(min_cosine, min_snr, min_top1))
    for line in res.summary_lines():
        click.echo(line)
    if json_t:
        P.write_bytes(json_t, json.dumps(res.to_dict(), indent=2, default=str), plan)
    if junit_t:
        write_junit(junit_t, "normopt verify", verify_cases(res), plan, elapsed=time.perf_counter() - t0)
    github_summary(verify_markdown(f"normopt verify {os.path.basename(candidate)} against {os.path.basename(reference)}", res))
    sys.exit(0 if res.equivalent else 1)


def _prove_command(reference, candidate, json_t, junit_t, plan):
    """verify --prove: one line (proved: ... / not proved: <where>: <reason>), exit 0 or 1. The
    --json/--junit targets come from the command's checked plan (normopt.paths)."""
    import time

    from . import paths as P
    from .proof import prove

    t0 = time.perf_counter()
    res = prove(reference, candidate)
    click.echo(res.summary)
    if json_t:
        P.write_bytes(json_t, json.dumps({"proof": res.to_dict()}, indent=2, default=str), plan)
    if junit_t:
        write_junit(junit_t, "normopt verify", [("proof", None if res.proved else res.summary, {})], plan,
                    elapsed=time.perf_counter() - t0)
    github_summary(f"### normopt verify --prove {os.path.basename(candidate)} against {os.path.basename(reference)}\n\n"
                   f"- {res.summary}")
    sys.exit(0 if res.proved else 3 if res.details.get("internal_error") else 1)


@main.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="execution provider every model runs on")
@click.option("--threads", default=None, help="intra-op threads, or a list to sweep: 1,2 (default: ORT's)")
@click.option("--runs", default=50, show_default=True,
              help="timed rounds; each round runs every model once, in rotating order (at least 2)")
@click.option("--warmup", default=5, show_default=True, help="untimed runs of each model before the timed rounds")
@click.option("--level", type=click.Choice(["disable", "basic", "extended", "all"]), default="all", show_default=True,
              help="ORT graph-optimization level of every model's session")
@click.option("--baselines", default=None,
              help="ort-transformers,onnxscript: also time the first MODEL as these peer optimizers write it (each checked "
                   "for equivalence first), and as `normopt optimize` writes it (tuned for --provider and the first "
                   "--threads, guarded, verified). Needs the 'baselines' extra: pip install 'normopt[baselines]'")
@click.option("--model-type", default=None, help="model type for ort-transformers (inferred when not given)")
@click.option("--num-heads", type=int, default=0, help="attention heads, for ort-transformers (0: let it detect)")
@click.option("--hidden-size", type=int, default=0, help="hidden size, for ort-transformers (0: let it detect)")
@click.option("--plot", "plot_path", default=None,
              help="also write a chart of the ratios (needs matplotlib: pip install 'normopt[plot]')")
@click.option("--spin", is_flag=True, help="keep ORT's intra-op thread spinning on (off by default: spinning idle sessions disturb interleaved runs)")
@click.option("--format", "fmt", type=click.Choice(["md", "csv", "json"]), default="md", show_default=True,
              help="the table's format on stdout (and in --output): markdown, CSV or JSON")
@click.option("--output", default=None, help="also write the table here")
@click.option("--junit", "junit_path", default=None, help="write a JUnit XML report (one test case per model and configuration)")
@click.option("--max-ratio", type=float, default=None,
              help="fail (exit 1) when a model is measurably slower than this ratio to the first (its CI's lower bound above it)")
@click.option("-q", "--quiet", is_flag=True, help=QUIET_HELP)
@click.option("--shape", multiple=True, metavar="NAME=SHAPE",
              help=SHAPE_HELP + "; several sizes sweep: --shape sequence_length=16,128,512")
@click.option("--int-range", multiple=True, metavar="NAME=LO:HI", help=INT_RANGE_HELP)
@click.option("--inputs", type=str, default=None, metavar="FILE.npz", help=INPUTS_HELP)
@guarded
def bench(models, provider, threads, runs, warmup, level, baselines, model_type, num_heads, hidden_size, plot_path, spin, fmt, output,
          junit_path, max_ratio, quiet, shape, int_range, inputs):
    """Latency of MODELS, interleaved; ratios are paired against the first model.

    --shape DIM=16,128,512 and --threads 1,2 sweep: one table over every configuration (and,
    with --plot, the ratio against the swept size, one line per thread count). Each model
    compared with the first gets a verdict line. A markdown summary is appended to
    $GITHUB_STEP_SUMMARY when set."""
    import itertools

    from . import io as nio
    from .runtime_tests.inputs import InputOptions
    from .runtime_tests.latency import bench as run
    from .runtime_tests.providers import providers_for

    providers_for(provider)
    if runs < 2:
        raise NormoptError("--runs must be at least 2")
    try:
        thread_list = [int(t) for t in str(threads).split(",")] if threads else [None]
    except ValueError:
        raise NormoptError(f"--threads {threads}: expected N or a list like 1,2") from None
    if inputs and not os.path.isfile(inputs):
        raise NormoptError(f"--inputs {inputs}: no such file")
    sweep = _parse_shapes(shape, sweep=True)
    ranges = _int_ranges(int_range)
    from . import paths as P

    plan = P.Plan()
    for m in models:
        plan.read_model(m, nio.load_model(m).model)
    plan.read(inputs, f"the --inputs file {inputs}")
    output_t = plan.write(output, "--output")
    junit_t = plan.write(junit_path, "--junit")
    plot_t = plan.write(plot_path, "--plot")
    if plot_path:
        try:
            import matplotlib  # noqa: F401
            from matplotlib.figure import Figure
        except ImportError:
            raise NormoptError("--plot needs matplotlib: pip install -e '.[plot]' (from a clone) or pip install 'normopt[plot]'") from None
        ext = os.path.splitext(plot_path)[1].lstrip(".").lower()
        kinds = Figure().canvas.get_supported_filetypes()
        if ext not in kinds:
            raise NormoptError(f"--plot {plot_path}: give a file name ending in one of {', '.join('.' + k for k in sorted(kinds))}")
    plan.check()
    labels = [os.path.basename(m) for m in models]
    if len(set(labels)) < len(labels):
        labels = list(models)
    entries = list(zip(labels, models))
    skipped = []
    first_opts = InputOptions({k: v[0] for k, v in sweep.items()}, ranges, inputs)
    if baselines:
        import tempfile

        from .runtime_tests import baselines as B

        names = B.parse(baselines)
        B.require(names)
        workdir = tempfile.TemporaryDirectory(prefix="normopt-bench-")
        click.get_current_context().call_on_close(workdir.cleanup)
        built = B.build(names, models[0], model_type, first_opts, num_heads, hidden_size)
        # normopt's row: what `normopt optimize` writes (tuned on this provider and thread count, guarded)
        built.append(B.optimized_by_normopt(models[0], workdir.name, provider, thread_list[0], first_opts))
        for b in built:
            click.echo(f"baseline {b.label}: {b.status}", err=True)
            if b.model is not None:
                entries.append((b.label, b.model))
            else:
                skipped.append((b.label, b.status))
    keys = list(sweep)
    configs = [dict(zip(keys, combo)) for combo in itertools.product(*(sweep[k] for k in keys))] or [{}]
    results = []
    say = _progress(quiet, data_on_stdout=True)
    for t in thread_list:
        for cfg in configs:
            opts = InputOptions(dict(cfg), ranges, inputs)
            tag = _config_tag(cfg, t, len(configs) > 1 or len(thread_list) > 1)
            if say:
                say(f"benchmarking{' ' + tag if tag else ''}: {runs} interleaved runs")
            res = run(entries, provider=provider, threads=t, runs=runs, warmup=warmup, input_opts=opts, level=level, spin=spin)
            res.not_timed = skipped
            results.append((cfg, t, tag, res))
    click.echo(_bench_text(results, fmt))
    if fmt == "md":
        for _, _, tag, res in results:
            for line in res.verdicts():
                click.echo(f"normopt: {line}" + (f" ({tag})" if tag else ""))
    if output_t:
        P.write_bytes(output_t, _bench_text(results, fmt) + "\n", plan)
    if plot_t:
        from .runtime_tests.plot import plot_ratios, plot_sweep

        draw = (lambda tmp: plot_ratios(results[0][3], tmp)) if len(results) == 1 else (lambda tmp: plot_sweep(results, tmp))
        P.write_with(plot_t, draw, plan, suffix=os.path.splitext(plot_path)[1])
    slow = []
    cases = []
    times = []  # each case's time: the seconds its model ran in that configuration
    for cfg, t, tag, res in results:
        for m in res.models[1:]:
            times.append(sum(m.times_ms) / 1000.0)
            bad = max_ratio is not None and m.ci_low > max_ratio
            if bad:
                slow.append(f"{m.label}{' (' + tag + ')' if tag else ''}: ratio {m.ratio:.3f}, CI [{m.ci_low:.3f}, {m.ci_high:.3f}] above {max_ratio}")
            cases.append((f"{m.label}{' ' + tag if tag else ''}", slow[-1] if bad else None,
                          {"median_ms": m.median_ms, "ratio": m.ratio, "ci_low": m.ci_low, "ci_high": m.ci_high}))
    if junit_t:
        write_junit(junit_t, "normopt bench", cases, plan, times=times)
    github_summary("### normopt bench\n\n" + _bench_text(results, "md") + "\n\n" +
                   "\n".join(f"- {line}" + (f" ({tag})" if tag else "") for _, _, tag, r in results for line in r.verdicts()))
    if slow:
        _fail("slower than --max-ratio: " + "; ".join(slow), 1)


def _config_tag(cfg, threads, show):
    if not show:
        return ""
    parts = [f"{k}={'x'.join(map(str, v))}" for k, v in cfg.items()]
    if threads:
        parts.append(f"threads={threads}")
    return ", ".join(parts)


def _bench_text(results, fmt):
    if len(results) == 1:
        res = results[0][3]
        return {"md": res.markdown, "csv": res.csv, "json": res.json}[fmt]()
    if fmt == "json":
        return json.dumps([{"config": {k: list(v) for k, v in cfg.items()}, "threads": t, **res.to_dict()}
                           for cfg, t, _, res in results], indent=2)
    if fmt == "csv":
        rows = ["config,model,median_ms,p90_ms,ratio,ci_low,ci_high,norm_ops,provider,threads,machine"]
        for cfg, t, tag, res in results:
            rows += res.csv_rows(f"\"{tag}\",")
        return "\n".join(rows)
    head = results[0][3].header()
    rows = ["| configuration | model | median ms | p90 ms | ratio vs first | 95% CI | norm ops |",
            "|---|---|---:|---:|---:|---|---|"]
    for cfg, t, tag, res in results:
        rows += [r.replace("| ", f"| {tag} | ", 1) for r in res.rows()]
    return head.replace(f"threads: {results[0][3].threads or 'default'}; ", "") + "\n\n" + "\n".join(rows)


@main.command()
@click.argument("model", type=str)
@click.option("--target", type=click.Choice(["ort", "onnx"]), default="ort", show_default=True, help=TARGET_HELP)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@guarded
def inspect(model, target, as_json):
    """List every normalization in MODEL and which pass would rewrite it, or why none would."""
    from .inspect import inspect_model

    rows = inspect_model(model, target)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no normalizations found")
        return
    wk = max(len("kind"), *(len(r["kind"]) for r in rows))
    wn = max(len("node"), *(len(r["node"]) for r in rows))
    wi = max(len("input"), *(len(r["input"]) for r in rows))
    click.echo(f"{'kind':<{wk}}  {'node':<{wn}}  {'input':<{wi}}  outcome")
    for r in rows:
        click.echo(f"{r['kind']:<{wk}}  {r['node']:<{wn}}  {r['input']:<{wi}}  {r['outcome']}")


@main.command()
def passes():
    """List the passes in pipeline order."""
    from .passes import all_passes

    for i, p in enumerate(all_passes(), 1):
        click.echo(f"{i:>2}. {p.name:<22} {p.description}" + ("  (opt-in)" if p.opt_in else ""))


@main.command()
@click.option("--dir", "workdir", default="normopt-demo", show_default=True, help="where the demo writes its models")
@click.option("--runs", default=30, show_default=True, help="timed rounds of the benchmark")
@click.option("--threads", type=int, default=1, show_default=True, help="intra-op threads of the benchmark")
@guarded
def demo(workdir, runs, threads):
    """Build a small Pre-LN transformer, optimize it, verify it and bench it."""
    from . import paths as P
    from .demo import run_demo

    P.check_folder(workdir, "--dir", ("gpt_preln.onnx", "gpt_preln.opt.onnx", "gpt_preln.opt.onnx.data", "report.json"))
    run_demo(workdir, runs=runs, threads=threads, echo=click.echo)


if __name__ == "__main__":
    main()
