"""The Python API behind the CLI."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from types import SimpleNamespace

import onnx
import onnx.version_converter

from . import io as nio
from . import paths as P
from . import weights as W
from .errors import InternalError, NormoptError, VerificationFailed
from .passes import build_pipeline
from .pipeline import Context, Report
from .runtime_tests.equivalence import EquivalenceResult, compare
from .runtime_tests.inputs import InputOptions
from .runtime_tests.latency import MAX_CI_WIDTH, MIN_EFFECT, decide  # noqa: F401  (the one rule of every timing decision)
from .runtime_tests.localize import localize


@dataclass
class OptimizeResult:
    output: str | None
    report: Report
    verification: EquivalenceResult | None
    unchanged: bool = False  # no optimizing pass applied: the output is a byte-identical copy of the input
    proof: object = None  # normopt.proof.ProofResult of the output against the input (None: not attempted)


def optimize_model(model: onnx.ModelProto, passes=None, target: str = "ort", opt_in=None, provider: str = "cpu",
                   tune: bool = False, options: dict | None = None, progress=None, threads: int | None = None,
                   shapes: dict | None = None):
    """Run the pipeline in memory. Returns (optimized ModelProto, Report). No verification.
    tune=False (the API default) uses fixed emission defaults; the CLI tunes unless --no-tune.

    `model` may be an in-memory model or a skeleton from normopt.io.load_model; a skeleton's
    result references its weights by path (write it with normopt.io.save_model). Inside
    ``normopt.weights.using(store)`` new large tensors go to the store's spill file."""
    if target not in ("ort", "onnx"):
        raise NormoptError(f"unknown target '{target}' (ort or onnx)")
    sparse = sparse_tensor_names(model)
    if sparse:
        # graphsurgeon has no sparse tensors (it would read them as dense zeros): the model is
        # passed through as it is, never rewritten without its values
        shown = ", ".join(sparse[:3]) + (f", ... ({len(sparse)} in all)" if len(sparse) > 3 else "")
        return model, Report(notes=[f"sparse tensors ({shown}): normopt's graph layer cannot represent them; "
                                    "the model is left unchanged (densify them first to let normopt optimize it)"])
    ctx = Context(target=target, provider=provider, tune=tune, threads=threads, shapes=dict(shapes or {}))
    ctx.state.update(options or {})
    return build_pipeline(passes, opt_in).run(model, ctx, progress=progress)


def sparse_tensor_names(model: onnx.ModelProto) -> list:
    """Names of the model's sparse initializers and sparse attribute tensors (subgraphs and
    functions included)."""
    names = []
    for t, what in nio.all_tensors(model):
        if what == "sparse tensor values":
            names.append(t.name or "(unnamed)")
    return names


def prepare_opset(model: onnx.ModelProto, opset: int | None = None):
    """(model, note or None). --opset N converts the default-domain opset up to N; a model below
    the passes' floor (opset 13) is converted up to it. ONNX's version converter does it on the
    skeleton; the output is written at the new opset and verified against the original input
    like any rewrite."""
    current = nio.default_opset(model)
    target = opset if opset is not None else (nio.MIN_OPSET if current < nio.MIN_OPSET else current)
    if target < current:
        raise NormoptError(f"--opset {target} is below the model's opset {current}; only upgrades are supported")
    if target == current:
        return model, None
    try:
        out = onnx.version_converter.convert_version(model, target)
        nio.check_model(out)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        how = f"--opset {target}" if opset is not None else f"normopt works at opset >= {nio.MIN_OPSET}"
        raise NormoptError(f"{how}: ONNX's version converter cannot upgrade this opset-{current} model ({first})") from None
    why = "as asked (--opset)" if opset is not None else f"normopt's passes need opset >= {nio.MIN_OPSET}"
    return out, f"opset: upgraded from {current} to {target} with onnx.version_converter ({why}); the output is written at opset {target}"


def _ab(a, b, provider, input_opts, runs=20, threads=None):
    """Paired ratio b / a (median, 95% CI) from interleaved runs on the provider. The input plan
    is the run's (input_opts, settled once); a model that fails to run on it is reported as bad
    input with the --shape flag to give."""
    from .runtime_tests.latency import bench

    try:
        r = bench([("a", a), ("b", b)], provider=provider, runs=runs, warmup=3, input_opts=input_opts, threads=threads).models[1]
    except NormoptError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise NormoptError(f"tuning: a model fails to run on the input plan ({first}); give the sizes it needs with "
                           "--shape DIM=N (or --no-tune)") from None
    return r.ratio, r.ci_low, r.ci_high


def _tuned(model, out, report, target, opt_in, provider, input_opts, threads=None):
    """Whole-model decisions, each an interleaved A/B on the provider, then the guard:
    1. beta folded into the readers' biases (default) or kept as an Add;
    2. Pre-CRMSNorm (--crms) or plain RMSNorm (d-1 widths can misalign GEMMs);
    3. never slower: if the output measures slower than the input, write the input unchanged.
    A variant replaces the default only if it measures faster by MIN_EFFECT with a CI narrower
    than MAX_CI_WIDTH (see decide); a CI wider than that keeps the deterministic default and
    says the machine was too noisy, so noise cannot flip what is written."""
    options, notes = {}, []
    shapes = input_opts.shapes if input_opts else None
    base = {}
    if not (input_opts and input_opts.inputs_npz):
        from .runtime_tests.inputs import plan_inputs

        base = {"tune_dims": dict(plan_inputs(model, input_opts).dims)}  # micro-benchmarks at the run's plan
    noisy = f"the machine was too noisy to decide (95% CI wider than {MAX_CI_WIDTH:.0%} of the ratio)"
    if report.beta_folded:
        kept, kept_report = optimize_model(model, None, target, opt_in, provider, True, {**base, "fold_beta": False},
                                           threads=threads, shapes=shapes)
        r, lo, hi = _ab(out, kept, provider, input_opts, threads=threads)
        d = decide(r, lo, hi)
        use = d == "faster"
        notes.append(f"ln_to_rms: beta kept / beta folded = {r:.3f} [{lo:.3f}, {hi:.3f}] on {provider}; "
                     + ("kept beta as an Add" if use else f"folded beta (the default; {noisy})" if d == "noisy" else "folded beta"))
        if use:
            options, out, report = {"fold_beta": False}, kept, kept_report
    crms = next((p for p in report.passes if p.name == "crms"), None)
    if crms is not None and crms.applied:
        plain, plain_report = optimize_model(model, None, target, None, provider, True, {**base, **options}, threads=threads,
                                             shapes=shapes)
        r, lo, hi = _ab(plain, out, provider, input_opts, threads=threads)
        d = decide(r, lo, hi)
        keep = d == "faster"
        notes.append(f"crms: measured on {provider}, 20 interleaved runs: CRMS / RMS = {r:.3f} [{lo:.3f}, {hi:.3f}]; "
                     + ("kept CRMS" if keep else f"kept RMS ({noisy})" if d == "noisy" else "kept RMS (CRMS not faster)"))
        if not keep:
            out, report = plain, plain_report
    r, lo, hi = _ab(model, out, provider, input_opts, threads=threads)
    verdict = f"output / input = {r:.3f} [{lo:.3f}, {hi:.3f}] on {provider}, 20 interleaved runs"
    d = decide(r, lo, hi)
    if d == "slower":
        notes.append(f"guard: the optimized model measured slower ({verdict}); wrote the input unchanged")
        out = model
    elif d == "noisy":
        notes.append(f"guard: {verdict}; {noisy}: wrote the optimized model (the default)")
    else:
        notes.append(f"guard: {verdict}")
    report.notes.extend(notes)
    return out, report


def _write_report(path, report: Report, plan=None):
    """The JSON report, atomically, at a place checked by the run's plan (normopt.paths)."""
    if not path:
        return
    P.write_bytes(path if plan is None else _planned(plan, path, "--report"),
                  json.dumps(report.to_dict(), indent=2, default=str), plan)


def _planned(plan, path, option):
    return next((t for t in plan.writes if t.option == option and t.given == path), None) or P.target_of(path, option)


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
    opset: int | None = None,
    progress=None,
    threads: int | None = None,
) -> OptimizeResult:
    """Optimize IN into OUT. Unless verify=False, OUT is verified against IN with ONNX Runtime
    (CPU) before it is written; a model that differs is never written (VerificationFailed).
    tune=True (the CLI's default) times emission choices and CRMS on `provider` and guards
    against an output slower than the input; tune=False is deterministic.

    Memory: the model is read as a skeleton (weights stay in their files), tensors a pass
    creates are spilled beside the output, the output is streamed tensor by tensor, and the
    two verification sessions are never resident at once."""
    say = progress or (lambda msg: None)
    # ONNX Runtime loads the input once, beside the rest of the input's checks and the passes;
    # joined before any write. It starts as soon as the file has parsed (load_model's
    # on_parsed). Where verification follows (and no tuning, whose sessions come first), that
    # session is kept for verification's runs of the original (_ReferenceJob), if memory holds it
    # beside the passes
    early = []

    def keep_for(weight_bytes) -> bool:
        return verify and not (tune and not passes) and _room_beside_passes(weight_bytes)

    def start_check(path, weight_bytes):
        early.append(nio.OrtCheck(SimpleNamespace(path=path, weight_bytes=weight_bytes), keep=keep_for(weight_bytes)))

    try:
        # every file this run reads and may write, checked before any work (normopt.paths)
        loaded = nio.load_model(in_path, on_parsed=start_check)
        plan = P.Plan()
        plan.read_model(in_path, loaded.model)
        if input_opts and input_opts.inputs_npz:
            plan.read(input_opts.inputs_npz, f"the --inputs file {input_opts.inputs_npz}")
        nio.plan_model_output(plan, in_path, loaded, out_path, nio.needs_external(loaded))
        plan.write(report_path, "--report")
        plan.check()
    except BaseException:
        for c in early:  # bad input: the check's native code is not left running
            c.release()
            c.join()
        raise
    if early:
        ort_check = early[0]
    else:
        ort_check = nio.OrtCheck(loaded, keep=keep_for(loaded.weight_bytes))
    try:
        return _optimize_checked(in_path, out_path, passes, target, verify, report_path, seeds, atol, rtol, input_opts,
                                 opt_in, verify_level, provider, tune, opset, progress, threads, say, loaded, plan,
                                 ort_check)
    except Exception:
        ort_check.result()  # an input ONNX Runtime refuses is the bad input behind any failure
        raise
    finally:
        ort_check.release()
        ort_check.join()  # never exit while the check's native code runs


def _room_beside_passes(weight_bytes: int) -> bool:
    """Memory for a session of the input held while the passes run, and for verification after."""
    avail = available_bytes()
    return avail is None or avail >= 2 * verification_bytes(weight_bytes)


class _ReferenceJob:
    """Verification's runs of the original (equivalence.prepare_reference: the input plan settled,
    the outputs on every input set) in a thread beside the passes and the write, on the session
    io.OrtCheck built of the input file: they depend on the input alone. ``result()`` joins it
    and gives the ref_cache for compare() ({} where it did not complete: compare() then runs the
    original itself); ``waited`` is how long the caller waited for it."""

    def __init__(self, in_path, ort_check, seeds, input_opts):
        import threading

        from .runtime_tests.equivalence import prepare_reference

        self._stop = threading.Event()
        self._cache = {}
        self.waited = 0.0

        def work():
            sess = ort_check.take_session()
            if ort_check.error or self._stop.is_set():
                return
            try:
                self._cache = prepare_reference(in_path, seeds, input_opts, session=sess, stop=self._stop)
            except BaseException:  # never fatal: compare() runs the original itself and says what fails
                self._cache = {}

        self._t = threading.Thread(target=work, name="normopt-reference", daemon=True)
        self._t.start()

    def result(self) -> dict:
        import time

        t0 = time.perf_counter()
        self._t.join()
        self.waited = time.perf_counter() - t0
        cache, self._cache = self._cache, {}
        return cache

    def stop(self) -> None:
        self._stop.set()
        self._t.join()
        self._cache = {}


def _optimize_checked(in_path, out_path, passes, target, verify, report_path, seeds, atol, rtol, input_opts, opt_in,
                      verify_level, provider, tune, opset, progress, threads, say, loaded, plan, ort_check):
    model, upgrade = prepare_opset(loaded.model, opset)
    inputs_line, plan_notes, tune_dims = None, [], {}
    proof_only = None  # why the dynamic check cannot run (memory, random draws), where the proof alone decides
    if verify or (tune and not passes):
        # one input plan for the run, made before any work and handed to tuning and verification
        # (an integer input without a range, inputs too large, a model failing on it: bad input)
        from .runtime_tests.inputs import plan_inputs

        if verify:
            try:
                check_memory(loaded, input_opts)
            except NormoptError as exc:
                # the dynamic check (and tuning, which runs the same sessions) cannot fit: the
                # proof, which streams the weights and runs no session, is then the gate alone
                proof_only = str(exc).split("; --no-verify")[0].split("; give smaller")[0]
            if proof_only is None:
                from .runtime_tests.inputs import random_draws_line

                proof_only = random_draws_line(model)  # a random draw: the proof, which runs nothing, decides
        input_opts, plan_notes = plan_for_run(model, input_opts, run_model=tune and not passes and proof_only is None,
                                              verify=verify and proof_only is None,
                                              path=in_path if upgrade is None else None)
        if proof_only is not None and tune and not passes:
            plan_notes.append("not tuned: tuning runs the same ONNX Runtime sessions as the dynamic check, which do not fit")
        if proof_only is not None:
            tune = False
        if not (input_opts and input_opts.inputs_npz):
            inputs_line = plan_inputs(model, input_opts).line() if verify and proof_only is None else None
            if inputs_line:
                say(inputs_line)
            tune_dims = dict(plan_inputs(model, input_opts).dims)
    store = W.WeightStore(os.path.dirname(next(t for t in plan.writes if t.option == "-o").final))
    ref_job = None
    try:
        if ort_check.keep:
            if verify and proof_only is None:
                ref_job = _ReferenceJob(in_path, ort_check, seeds, input_opts)
            else:
                ort_check.release()
        with W.using(store):
            out_model, report = optimize_model(model, passes, target, opt_in, provider, tune, progress=progress,
                                               threads=threads, shapes=(input_opts.shapes if input_opts else None),
                                               options={"tune_dims": tune_dims} if tune_dims else None)
            report.notes[:0] = plan_notes
            ort_check.result()
            if not report.changed() and opset is None:
                if ref_job is not None:
                    ref_job.stop()
                # nothing to gain: the input itself, byte for byte (no guard, nothing to verify)
                report.notes.insert(0, "no changes: no optimizing pass applied; the output is a byte-identical copy of the input")
                if inputs_line:
                    report.notes.insert(1, inputs_line)
                written = nio.copy_model_files(in_path, out_path, plan)
                _write_report(report_path, report, plan)
                return OptimizeResult(written, report, None, unchanged=True)
            if tune and not passes:
                say("tuning: timing variants and the output against the input ...")
                out_model, report = _tuned(model, out_model, report, target, opt_in, provider, input_opts, threads)
        if inputs_line:
            report.notes.insert(0, inputs_line)
        if upgrade:
            report.notes.insert(0, upgrade)
        try:
            nio.check_model(out_model)
        except Exception as exc:
            report.notes.append(f"output fails onnx.checker: {exc}")
            _write_report(report_path, report, plan)
            raise InternalError(f"the optimized model fails onnx.checker; nothing was written: {str(exc).splitlines()[0]}") from None
        say("writing the output to a temporary file beside it (moved into place only once checked) ...")
        with nio.StagedModel(out_model, out_path, nio.needs_external(loaded), plan) as staged:
            store.close()  # the output holds its own copy of every spilled tensor now
            del out_model
            result = None
            proof = None
            if verify and proof_only is not None:
                say(f"proving the output against the input (translation validation; {proof_only}: the proof alone decides) ...")
                proof = _prove_staged(in_path, staged.path, report)
                report.notes.append(f"dynamic check not run: {proof_only}; the output is gated by the proof alone")
                if proof.details.get("internal_error"):  # the prover's bug, not the output's: exit 3
                    _write_report(report_path, report, plan)
                    raise InternalError(f"the proof failed ({proof.summary}) and the dynamic check cannot run ({proof_only}); "
                                        "nothing was written")
                if not proof.proved:
                    _write_report(report_path, report, plan)
                    raise VerificationFailed(f"the output is {proof.summary}, and the dynamic check cannot run "
                                             f"({proof_only}); nothing was written (--no-verify writes it unchecked)")
            elif verify:
                # the proof reads the two files on its own (no session, one weight block at a
                # time), so it runs in a thread beside the dynamic check: numpy and ONNX Runtime
                # release the GIL. On a GPT-2-small-shaped decoder (2 cores, 3 interleaved runs)
                # optimize took 10.4 s median this way, 12.2 s proving first, and 12.8 s with the
                # proof in a spawned process (its imports, and no less CPU contention)
                say("proving the output against the input (translation validation) ...")
                prover = _ProofThread(in_path, staged.path)
                say(f"verifying against the input with ONNX Runtime ({provider}), beside the proof ...")
                try:
                    result = _verify_staged(in_path, staged.path, report, report_path, seeds, atol, rtol, input_opts,
                                            verify_level, provider, plan, ref_job)
                except VerificationFailed:
                    # the dynamic check's verdict stands at once: the proof is stopped (within
                    # one node or weight block); one that had already ended adds its line
                    if prover.stop():
                        prover.result(report, quiet=True)
                        _write_report(report_path, report, plan)
                    raise
                except BaseException:
                    # bad input, our bug or Ctrl-C: the proof stops before the staged file goes
                    prover.stop()
                    raise
                proof = prover.result(report)
                if result is not None and proof is not None and "seconds" in proof.details:
                    result.timings["proof (alongside)"] = proof.details["seconds"]
                    report.verification = result.to_dict()
            written = staged.commit()
    finally:
        store.close()
        if ref_job is not None:
            ref_job.stop()  # never go on (or exit) while the original's runs go on beside
    _write_report(report_path, report, plan)
    return OptimizeResult(written, report, result, proof=proof)


class _ProofThread:
    """_prove_staged in a thread: ``result(report)`` joins it and gives its ProofResult (or
    raises what it raised: bad input stays bad input). ``stop()`` cancels it and waits for the
    thread to end, so that no proof still reads the staged output or writes temporary files
    while the run unwinds and the interpreter exits."""

    def __init__(self, in_path, staged_path):
        import threading

        self._out, self._err = None, None
        self._report = Report()
        self._cancel = threading.Event()

        def work():
            try:
                self._out = _prove_staged(in_path, staged_path, self._report, cancel=self._cancel)
            except BaseException as exc:  # handed to the caller by result()
                self._err = exc

        self._t = threading.Thread(target=work, name="normopt-prove", daemon=True)
        self._t.start()

    def stop(self) -> bool:
        """Cancel and join; True when the proof had ended with a verdict of its own."""
        from .proof.cancel import Cancelled

        self._cancel.set()
        self._t.join()
        return self._out is not None and not isinstance(self._err, Cancelled)

    def result(self, report, quiet=False):
        self._t.join()
        report.notes.extend(self._report.notes)
        if self._err is not None and not quiet:
            raise self._err
        return self._out


def _prove_staged(in_path, staged_path, report, cancel=None):
    """The translation validator on the staged output (normopt.proof): its one-line verdict goes
    into the report's notes. The dynamic check below remains the gate for writing."""
    from .proof import ProofResult, prove

    import time

    t0 = time.perf_counter()
    try:
        res = prove(in_path, staged_path, cancel=cancel)
    except (NormoptError, KeyboardInterrupt):
        raise
    except Exception as exc:  # the prover's own bug never hides or replaces the dynamic check
        res = ProofResult(False, f"not proved: internal error in the prover: {type(exc).__name__}: {exc}",
                          details={"internal_error": True})
    res.details["seconds"] = time.perf_counter() - t0
    report.notes.append(res.summary)
    return res


def _verify_staged(in_path, staged_path, report, report_path, seeds, atol, rtol, input_opts, verify_level, provider,
                   plan=None, ref_job=None):
    kw = dict(seeds=seeds, atol=atol, rtol=rtol)
    # every session once: the original, its float64 evaluation and their outputs are kept by input
    # set in ref_cache, so the checks below reuse them (and the settled input plan); the original's
    # outputs may have been made beside the passes already (_ReferenceJob)
    ref_cache = ref_job.result() if ref_job is not None else {}
    result = compare(in_path, staged_path, level=verify_level, ref_cache=ref_cache, input_opts=input_opts, **kw)
    if ref_job is not None and ref_job.waited:  # the original's time on the main path: the wait for it too
        for k in ("original", "total"):
            result.timings[k] = round(result.timings.get(k, 0.0) + ref_job.waited, 3)
    input_opts = result.input_options or input_opts
    report.verification = result.to_dict()
    if not result.equivalent:
        msg = "the optimized model is not equivalent to the input; nothing was written"
        if any(p.startswith("nothing was compared") for p in result.problems):
            msg = "verification compared nothing (see the problems above); nothing was written"
        elif verify_level != "disable" and compare(in_path, in_path, level=verify_level, ref_cache=ref_cache,
                                                   input_opts=input_opts, **kw).equivalent is False:
            # ONNX Runtime's own graph optimizations change the input's results
            ok_exact = compare(in_path, staged_path, level="disable", ref_cache=ref_cache, input_opts=input_opts, **kw).equivalent
            msg = (
                f"ONNX Runtime's graph optimizations (level '{verify_level}') change the results of the INPUT model "
                f"itself; normopt's output is {'equivalent' if ok_exact else 'NOT equivalent'} to it under ORT_DISABLE_ALL"
                + ("; pass --verify-level disable to accept it" if ok_exact else "")
                + "; nothing was written"
            )
            report.notes.append(msg)
        try:
            result.first_divergence = localize(in_path, staged_path, input_opts, atol, rtol, level=verify_level,
                                               skip=report.changed_values)
        except Exception as exc:  # localization is a diagnostic: never mask the failure
            result.first_divergence = {"error": f"{type(exc).__name__}: {exc}"}
        report.verification = result.to_dict()
        _write_report(report_path, report, plan)
        raise VerificationFailed(msg, result)
    if verify_level != "disable":
        # every output must also load and run with ORT's optimizations off
        exact = compare(in_path, staged_path, level="disable", ref_cache=ref_cache, input_opts=input_opts,
                        map_candidate=True, **{**kw, "seeds": 1, "stress": False})
        result.timings["ORT_DISABLE_ALL check"] = exact.timings.get("total", 0.0)
        report.verification = result.to_dict()
        if not exact.equivalent:
            _write_report(report_path, report, plan)
            raise VerificationFailed("the optimized model differs under ORT_DISABLE_ALL; nothing was written", exact)
    return result


def plan_for_run(model, input_opts, run_model=True, verify=True, path=None):
    """The run's one input plan: (InputOptions, notes). Integer inputs without a range, and
    inputs too large to hold, are bad input; with run_model the original runs once on the plan
    (inputs.settle_plan), so a default that makes it fail or gives only empty outputs is
    replaced here, before tuning, and the same plan goes to tuning and verification."""
    from .runtime_tests.inputs import plan_inputs, settle_plan
    from .runtime_tests.providers import make_session

    if verify:
        check_input_memory(model, input_opts)
    if not (input_opts and input_opts.inputs_npz):
        plan_inputs(model, input_opts)
    if not run_model:
        return input_opts, []
    outs = [o.name for o in model.graph.output]
    try:
        sess = make_session(path or model, "cpu", "disable", spin=False)  # the file itself where it is the model: no copy
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise NormoptError(f"ONNX Runtime cannot load the input model: {first}") from None
    opts, notes = settle_plan(model, input_opts, lambda f: sess.run(outs, f))
    del sess
    return opts, notes


# One ONNX Runtime session holds about its model's weights (external data is memory-mapped;
# prepacked MatMul weights replace the originals): measured 0.94x at ORT_ENABLE_ALL for a 5.7 GB
# fp32 OPT-1.3B-shaped decoder. Margin on top, plus normopt's own footprint.
SESSION_FACTOR = 1.25
SESSION_OVERHEAD = 768 << 20


def verification_bytes(weight_bytes: int) -> int:
    return int(SESSION_FACTOR * weight_bytes + SESSION_OVERHEAD)


def available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


INPUT_COPIES = 8  # inputs are held per input set (5 or more) and as float64 for the exact reference


def input_bytes(model, input_opts=None) -> int:
    """Bytes of one input set of the plan (computed from shapes, nothing allocated)."""
    import numpy as np

    from .runtime_tests.inputs import input_specs, plan_inputs

    if input_opts and input_opts.inputs_npz:
        try:
            return os.path.getsize(input_opts.inputs_npz)
        except OSError:
            return 0
    plan = plan_inputs(model, input_opts)
    total = 0
    for s in input_specs(model):
        n = 1
        for d in plan.shapes.get(s.name, ()):
            n *= int(d)
        total += n * max(np.dtype(s.dtype).itemsize, 1)
    return total


def check_input_memory(model, input_opts=None, hint=None) -> None:
    """The inputs of verification (several sets, and a float64 copy) must fit in memory."""
    ib = input_bytes(model, input_opts)
    need = INPUT_COPIES * ib
    avail = available_bytes()
    if avail is not None and need > avail:
        raise NormoptError(
            f"verification needs about {need / 2**30:.1f} GB of memory for its inputs (one input set is "
            f"{ib / 2**30:.1f} GB; several sets and a float64 copy are held) and {avail / 2**30:.1f} GB is available; "
            "give smaller --shape sizes, or " + (hint or "--no-verify to skip the equivalence check and write the output unverified")
        )


def check_memory(loaded, input_opts=None, hint=None) -> None:
    """Before verification: one ONNX Runtime session at a time, and the inputs, must fit in memory."""
    need = verification_bytes(loaded.weight_bytes)
    avail = available_bytes()
    if avail is not None and need > avail:
        raise NormoptError(
            f"verification needs about {need / 2**30:.1f} GB of memory (one ONNX Runtime session at a time, "
            f"{loaded.weight_bytes / 2**30:.1f} GB of weights) and {avail / 2**30:.1f} GB is available; "
            + (hint or "--no-verify to skip the equivalence check and write the output unverified")
        )
    check_input_memory(loaded.model, input_opts, hint)


def verify(reference: str, candidate: str, localize_divergence: bool = False, changed_values=None, **kwargs) -> EquivalenceResult:
    """compare() two model files (any opset ONNX Runtime runs), judged against the float64
    evaluation of `reference` unless atol/rtol or thresholds are given (see compare). Bad input
    (an input plan or weights too large for memory, a reference that fails on every size
    tried) raises NormoptError. With localize_divergence, a
    failed comparison names the first value that differs; values an optimize report lists as
    changed on purpose (changed_values) are not compared, and without a report the changes
    normopt makes on purpose (per-token or per-channel shifts, per-channel scales) are
    recognized and passed over."""
    loaded = nio.load_model(reference)
    nio.load_model(candidate)
    check_memory(loaded, kwargs.get("input_opts"),
                 hint="--prove to check the pair without running it (no session; the weights are streamed)")
    result = compare(reference, candidate, **kwargs)
    if localize_divergence and not result.equivalent and not result.problems:
        result.first_divergence = localize(reference, candidate, result.input_options or kwargs.get("input_opts"),
                                           kwargs.get("atol"), kwargs.get("rtol"),
                                           kwargs.get("provider", "cpu"), kwargs.get("level", "all"),
                                           skip=changed_values or (), detect=changed_values is None)
        if result.first_divergence is None:
            result.first_divergence = {"error": "every shared intermediate value agrees (or was changed on purpose); "
                                                "the difference is in the outputs' last ops"}
    return result
