"""normopt command line: optimize | verify | bench | inspect | passes | demo.

Exit codes: 0 success (written / equivalent); 1 verification failed (nothing written) or
models differ; 2 bad input or usage (one line on stderr, nothing written); 3 internal error.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import click

from .errors import NormoptError, VerificationFailed


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


def _parse_shapes(values) -> dict:
    shapes = {}
    for v in values:
        if "=" not in v:
            raise NormoptError(f"--shape {v}: expected NAME=1x128 (an input) or DIM=128 (a dynamic dimension)")
        k, s = v.split("=", 1)
        try:
            dims = tuple(int(x) for x in s.lower().split("x"))
        except ValueError:
            raise NormoptError(f"--shape {v}: '{s}' is not a shape like 1x128") from None
        if any(d < 0 for d in dims):
            raise NormoptError(f"--shape {v}: dimensions must not be negative")
        shapes[k] = dims
    return shapes


def _input_opts(shape, int_range, inputs):
    from .runtime_tests.inputs import InputOptions

    ranges = {}
    for v in int_range:
        try:
            k, rng = v.split("=", 1)
            lo, hi = (int(x) for x in rng.split(":"))
        except ValueError:
            raise NormoptError(f"--int-range {v}: expected NAME=LO:HI") from None
        ranges[k] = (lo, hi)
    if inputs and not os.path.isfile(inputs):
        raise NormoptError(f"--inputs {inputs}: no such file")
    return InputOptions(shapes=_parse_shapes(shape), int_ranges=ranges, inputs_npz=inputs)


def input_options(fn):
    fn = click.option("--shape", multiple=True, help="NAME=1x128 for an input, or DIM=128 for a dynamic dimension name")(fn)
    fn = click.option("--int-range", multiple=True, help="NAME=LO:HI range for an integer input")(fn)
    fn = click.option("--inputs", type=str, default=None, help="feeds.npz with real inputs")(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="normopt")
def main():
    """Verified ONNX rewrites of transformer normalizations."""


@main.command()
@click.argument("model", type=str)
@click.option("-o", "--output", "output", required=True, type=str, help="output model path")
@click.option("--passes", default=None, help="comma-separated pass names (default: the whole pipeline)")
@click.option("--report", "report_path", default=None, type=str, help="write the JSON report here")
@click.option("--target", type=click.Choice(["ort", "onnx"]), default="ort", show_default=True)
@click.option("--no-verify", is_flag=True, help="skip the ONNX Runtime equivalence check")
@click.option("--crms", is_flag=True, help="opt-in Pre-CRMSNorm: kept only where it measures faster on --provider")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="execution provider the model is tuned for (CRMS decision)")
@click.option("--opset", type=int, default=None, help="upgrade the model to this opset first (e.g. 23 for RMSNormalization with --target onnx)")
@click.option("--no-tune", is_flag=True, help="fixed emission defaults, no timing (deterministic, for CI)")
@click.option("--verify-level", type=click.Choice(["disable", "basic", "extended", "all"]), default="all", show_default=True,
              help="ORT graph-optimization level of the output's session during verification")
@click.option("--seeds", default=3, show_default=True)
@click.option("--atol", type=float, default=None)
@click.option("--rtol", type=float, default=None)
@input_options
@guarded
def optimize(model, output, passes, report_path, target, no_verify, crms, provider, opset, no_tune, verify_level, seeds, atol, rtol,
             shape, int_range, inputs):
    """Optimize MODEL into -o OUTPUT; verified against MODEL before it is written."""
    from .api import optimize as run
    from .runtime_tests.providers import providers_for

    providers_for(provider)
    names = [p.strip() for p in passes.split(",") if p.strip()] if passes else None
    opts = _input_opts(shape, int_range, inputs)
    res = run(model, output, passes=names, target=target, verify=not no_verify, report_path=report_path,
              seeds=seeds, atol=atol, rtol=rtol, input_opts=opts, verify_level=verify_level,
              opt_in=["crms"] if crms else None, provider=provider, tune=not no_tune, opset=opset)
    for err in res.report.errors:  # a pass that failed: its changes were dropped, the rest ran
        click.echo(f"normopt: {err}", err=True)
    for note in res.report.notes:
        click.echo(note)
    for p in res.report.passes:
        click.echo(p.summary())
    declined = list(res.report.declined())
    for name, d in declined[:20]:
        click.echo(f"  left alone by {name}: {d['kind']} '{d['target']}': {d['reason']}")
    if len(declined) > 20:
        click.echo(f"  ... {len(declined) - 20} more in the report")
    if res.verification is not None:
        worst = max(res.verification.outputs, key=lambda m: m.max_abs, default=None)
        click.echo(f"verified: equivalent on {res.verification.seeds} seeds" + (f" (max abs diff {worst.max_abs:.3g} on '{worst.name}')" if worst else ""))
    else:
        click.echo("not verified (--no-verify)")
    click.echo(f"wrote {res.output}")


@main.command()
@click.argument("reference", type=str)
@click.argument("candidate", type=str)
@click.option("--atol", type=float, default=None)
@click.option("--rtol", type=float, default=None)
@click.option("--seeds", default=3, show_default=True)
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--level", type=click.Choice(["disable", "basic", "extended", "all"]), default="all", show_default=True,
              help="graph optimization level of the candidate's session")
@click.option("--json", "json_path", default=None, help="write per-output metrics as JSON")
@click.option("--localize", is_flag=True, help="when they differ, name the first node whose value diverges")
@input_options
@guarded
def verify(reference, candidate, atol, rtol, seeds, provider, level, json_path, localize, shape, int_range, inputs):
    """Check that CANDIDATE computes the same as REFERENCE (exit 0 equivalent, 1 differs)."""
    from .api import verify as run
    from .runtime_tests.providers import providers_for

    providers_for(provider)
    res = run(reference, candidate, seeds=seeds, atol=atol, rtol=rtol, input_opts=_input_opts(shape, int_range, inputs),
              provider=provider, level=level, localize_divergence=localize)
    for line in res.summary_lines():
        click.echo(line)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(res.to_dict(), f, indent=2, default=str)
    sys.exit(0 if res.equivalent else 1)


@main.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", type=int, default=None, help="intra-op threads (default: ORT's)")
@click.option("--runs", default=50, show_default=True)
@click.option("--warmup", default=5, show_default=True)
@click.option("--level", type=click.Choice(["disable", "basic", "extended", "all"]), default="all", show_default=True)
@click.option("--baselines", default=None, help="ort-transformers,onnxscript: add the first MODEL optimized by peers, and by normopt")
@click.option("--model-type", default=None, help="model type for ort-transformers (inferred when not given)")
@click.option("--num-heads", type=int, default=0, help="attention heads, for ort-transformers (0: let it detect)")
@click.option("--hidden-size", type=int, default=0, help="hidden size, for ort-transformers (0: let it detect)")
@click.option("--plot", "plot_path", default=None, help="also write a bar chart of the paired ratios (needs matplotlib)")
@click.option("--spin", is_flag=True, help="keep ORT's intra-op thread spinning on (off by default: spinning idle sessions disturb interleaved runs)")
@click.option("--format", "fmt", type=click.Choice(["md", "csv", "json"]), default="md", show_default=True)
@click.option("--output", default=None, help="also write the table here")
@input_options
@guarded
def bench(models, provider, threads, runs, warmup, level, baselines, model_type, num_heads, hidden_size, plot_path, spin, fmt, output,
          shape, int_range, inputs):
    """Latency of MODELS, interleaved; ratios are paired against the first model."""
    from . import io as nio
    from .runtime_tests.latency import bench as run
    from .runtime_tests.providers import providers_for

    providers_for(provider)
    if runs < 2:
        raise NormoptError("--runs must be at least 2")
    for m in models:
        nio.load_model(m, load_external=False)
    if plot_path:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise NormoptError("--plot needs matplotlib: pip install 'normopt[plot]'") from None
    labels = [os.path.basename(m) for m in models]
    if len(set(labels)) < len(labels):
        labels = list(models)
    entries = list(zip(labels, models))
    skipped = []
    if baselines:
        from .api import optimize_model
        from .runtime_tests import baselines as B
        from .runtime_tests.equivalence import compare

        names = B.parse(baselines)
        original = nio.load_model(models[0]).model
        opts = _input_opts(shape, int_range, inputs)
        for b in B.build(names, models[0], model_type, opts, num_heads, hidden_size):
            click.echo(f"baseline {b.label}: {b.status}", err=True)
            if b.model is not None:
                entries.append((b.label, b.model))
            else:
                skipped.append((b.label, b.status))
        ours, _ = optimize_model(original)
        res = compare(original, ours, input_opts=opts)
        if res.equivalent:
            entries.append(("normopt", ours))
        else:
            skipped.append(("normopt", "NOT EQUIVALENT"))
    with click.progressbar(length=runs, label="benchmarking", file=sys.stderr) as bar:
        last = [0]

        def progress(i, total):
            bar.update(i - last[0])
            last[0] = i

        res = run(entries, provider=provider, threads=threads, runs=runs, warmup=warmup,
                  input_opts=_input_opts(shape, int_range, inputs), level=level, progress=progress, spin=spin)
    res.not_timed = skipped
    text = {"md": res.markdown, "csv": res.csv, "json": res.json}[fmt]()
    if plot_path:
        from .runtime_tests.plot import plot_ratios

        plot_ratios(res, plot_path)
    click.echo(text)
    if output:
        with open(output, "w") as f:
            f.write(text + "\n")


@main.command()
@click.argument("model", type=str)
@click.option("--target", type=click.Choice(["ort", "onnx"]), default="ort", show_default=True)
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
    click.echo(f"{'kind':<24} {'node':<40} {'input':<32} outcome")
    for r in rows:
        click.echo(f"{r['kind']:<24} {r['node'][:40]:<40} {r['input'][:32]:<32} {r['outcome']}")


@main.command()
def passes():
    """List the passes in pipeline order."""
    from .passes import all_passes

    for i, p in enumerate(all_passes(), 1):
        click.echo(f"{i:>2}. {p.name:<22} {p.description}" + ("  (opt-in)" if p.opt_in else ""))


@main.command()
@click.option("--dir", "workdir", default="normopt-demo", show_default=True, help="where the demo writes its models")
@click.option("--runs", default=30, show_default=True)
@click.option("--threads", type=int, default=1, show_default=True)
@guarded
def demo(workdir, runs, threads):
    """Build a small Pre-LN transformer, optimize it, verify it and bench it."""
    from .demo import run_demo

    run_demo(workdir, runs=runs, threads=threads, echo=click.echo)


if __name__ == "__main__":
    main()
