"""The Python API behind the CLI."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import onnx

from . import io as nio
from .errors import NormoptError, VerificationFailed
from .passes import build_pipeline
from .pipeline import Context, Report
from .runtime_tests.equivalence import EquivalenceResult, compare
from .runtime_tests.inputs import InputOptions
from .runtime_tests.localize import localize


@dataclass
class OptimizeResult:
    output: str | None
    report: Report
    verification: EquivalenceResult | None


def optimize_model(model: onnx.ModelProto, passes=None, target: str = "ort", opt_in=None, provider: str = "cpu",
                   tune: bool = False):
    """Run the pipeline in memory. Returns (optimized ModelProto, Report). No verification.
    tune=False (the API default) uses fixed emission defaults; the CLI tunes unless --no-tune."""
    if target not in ("ort", "onnx"):
        raise NormoptError(f"unknown target '{target}' (ort or onnx)")
    ctx = Context(target=target, provider=provider, tune=tune)
    out, report = build_pipeline(passes, opt_in).run(model, ctx)
    return out, report


def _never_slower(model, out_model, report, provider, input_opts, runs=20):
    """The final guard: time input and output interleaved on the provider; if the output is
    measurably slower (the paired CI lies above 1), write the input's graph unchanged."""
    from .runtime_tests.latency import bench

    res = bench([("input", model), ("output", out_model)], provider=provider, runs=runs, warmup=3, input_opts=input_opts)
    r = res.models[1]
    verdict = f"output / input = {r.ratio:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}] on {provider}, {runs} interleaved runs"
    if r.ci_low > 1.0:
        report.notes.append(f"guard: the optimized model measured slower ({verdict}); wrote the input unchanged")
        return model
    report.notes.append(f"guard: {verdict}")
    return out_model


def _keep_crms_if_faster(model, crms_model, crms_report, target, provider, input_opts, runs=20, tune=True):
    """Pre-CRMSNorm's d-1 width can misalign GEMMs: time the CRMS and the plain RMS variants
    interleaved on the provider and keep CRMS only if it is faster (CI's upper bound < 1)."""
    from .runtime_tests.latency import bench

    crms = next((p for p in crms_report.passes if p.name == "crms"), None)
    if crms is None or crms.applied == 0:
        return crms_model, crms_report
    plain_model, plain_report = optimize_model(model, None, target, None, provider, tune)
    res = bench([("rms", plain_model), ("crms", crms_model)], provider=provider, runs=runs, warmup=3, input_opts=input_opts)
    r = res.models[1]
    keep = r.ci_high < 1.0
    note = (f"crms: measured on {provider}, {runs} interleaved runs: CRMS / RMS = {r.ratio:.3f} "
            f"[{r.ci_low:.3f}, {r.ci_high:.3f}]; {'kept CRMS' if keep else 'kept RMS (CRMS not faster)'}")
    (crms_report if keep else plain_report).notes.append(note)
    return (crms_model, crms_report) if keep else (plain_model, plain_report)


def _write_report(path, report: Report):
    if not path:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report.to_dict(), f, indent=2, default=str)
    os.replace(tmp, path)


def optimize(
    in_path: str,
    out_path: str,
    passes=None,
    target: str = "ort",
    verify: bool = True,
    report_path: str | None = None,
    seeds: int = 3,
    atol: float | None = None,
    rtol: float | None = None,
    input_opts: InputOptions | None = None,
    opt_in=None,
    verify_level: str = "all",
    provider: str = "cpu",
    tune: bool = False,
) -> OptimizeResult:
    """Optimize IN into OUT. Unless verify=False, OUT is verified against IN with ONNX Runtime
    (CPU) before it is written; a model that differs is never written (VerificationFailed).
    tune=True (the CLI's default) times emission choices and CRMS on `provider` and guards
    against an output slower than the input; tune=False is deterministic."""
    nio.check_output_path(in_path, out_path)
    loaded = nio.load_model(in_path)
    if verify:
        # resolve inputs before any work: a dynamic dim without --shape is a usage error
        from .runtime_tests.inputs import make_feeds

        make_feeds(loaded.model, 0, input_opts)
    out_model, report = optimize_model(loaded.model, passes, target, opt_in, provider, tune)
    if opt_in and "crms" in opt_in and not passes:
        out_model, report = _keep_crms_if_faster(loaded.model, out_model, report, target, provider, input_opts, tune=tune)
    if tune and not passes:
        out_model = _never_slower(loaded.model, out_model, report, provider, input_opts)
    try:
        nio.check_model(out_model)
    except Exception as exc:
        report.notes.append(f"output fails onnx.checker: {exc}")
        _write_report(report_path, report)
        raise VerificationFailed(f"internal error: the optimized model fails onnx.checker: {str(exc).splitlines()[0]}") from None
    with nio.StagedModel(out_model, out_path, loaded.had_external_data) as staged:
        result = None
        if verify:
            kw = dict(seeds=seeds, atol=atol, rtol=rtol, input_opts=input_opts)
            result = compare(in_path, staged.path, level=verify_level, **kw)
            report.verification = result.to_dict()
            if not result.equivalent:
                msg = "the optimized model is not equivalent to the input; nothing was written"
                if verify_level != "disable" and compare(in_path, in_path, level=verify_level, **kw).equivalent is False:
                    # ONNX Runtime's own graph optimizations change the input's results
                    ok_exact = compare(in_path, staged.path, level="disable", **kw).equivalent
                    msg = (
                        f"ONNX Runtime's graph optimizations (level '{verify_level}') change the results of the INPUT model "
                        f"itself; normopt's output is {'equivalent' if ok_exact else 'NOT equivalent'} to it under ORT_DISABLE_ALL"
                        + ("; pass --verify-level disable to accept it" if ok_exact else "")
                        + "; nothing was written"
                    )
                    report.notes.append(msg)
                try:
                    result.first_divergence = localize(in_path, staged.path, input_opts, atol, rtol, level=verify_level,
                                                       skip=report.changed_values)
                except Exception as exc:  # localization is a diagnostic: never mask the failure
                    result.first_divergence = {"error": f"{type(exc).__name__}: {exc}"}
                report.verification = result.to_dict()
                _write_report(report_path, report)
                raise VerificationFailed(msg, result)
        written = staged.commit()
    _write_report(report_path, report)
    return OptimizeResult(written, report, result)


def verify(reference: str, candidate: str, localize_divergence: bool = False, **kwargs) -> EquivalenceResult:
    nio.load_model(reference)
    nio.load_model(candidate)
    result = compare(reference, candidate, **kwargs)
    if localize_divergence and not result.equivalent and not result.problems:
        result.first_divergence = localize(reference, candidate, kwargs.get("input_opts"), kwargs.get("atol"), kwargs.get("rtol"),
                                           kwargs.get("provider", "cpu"), kwargs.get("level", "all"))
    return result
