"""What normopt tells people and CI: collapsed decline lines, speed verdicts, norm-op changes,
JUnit XML (``--junit``) and the GitHub Actions step summary (``$GITHUB_STEP_SUMMARY``)."""

from __future__ import annotations

import collections
import os
import xml.etree.ElementTree as ET

MATCHED_APPLIED = ("matched = candidates a pass's analysis accepted (a whole residual stream counts once); "
                   "applied = rewrites made (each LayerNorm of a stream counts once); declined = candidates left "
                   "alone, each with its reason")


def collapsed_declines(report, limit: int = 20) -> list[str]:
    """One line per distinct (pass, kind, reason): 'N x kind: reason' when it repeats."""
    groups = collections.OrderedDict()
    for name, d in report.declined():
        groups.setdefault((name, d["kind"], d["reason"]), []).append(d["target"])
    lines = []
    for (name, kind, reason), targets in groups.items():
        if len(targets) == 1:
            lines.append(f"  left alone by {name}: {kind} '{targets[0]}': {reason}")
        else:
            lines.append(f"  left alone by {name}: {len(targets)} x {kind}: {reason}")
    if len(lines) > limit:
        lines = lines[:limit] + [f"  ... {len(lines) - limit} more in the report (--report FILE)"]
    return lines


def verdict(label: str, ratio: float, lo: float, hi: float) -> str:
    """'label: 6.1% faster [4.0%, 8.2%]', '... slower ...', or 'no measurable change'."""
    if lo <= 1.0 <= hi:
        return f"{label}: no measurable change ({ratio:.3f}x, 95% CI [{lo:.3f}, {hi:.3f}] spans 1.00)"
    if ratio < 1.0:
        return f"{label}: {100 * (1 - ratio):.1f}% faster [{100 * (1 - hi):.1f}%, {100 * (1 - lo):.1f}%]"
    return f"{label}: {100 * (ratio - 1):.1f}% slower [{100 * (lo - 1):.1f}%, {100 * (hi - 1):.1f}%]"


NORM_KIND = {"LayerNormalization": "LN", "decomposed LN": "LN", "SkipLayerNormalization": "SkipLN",
             "SimplifiedLayerNormalization": "RMS", "RMSNormalization": "RMS", "SkipSimplifiedLayerNormalization": "SkipRMS",
             "BatchNormalization": "BN", "per-channel affine": "affine", "InstanceNormalization": "IN",
             "GroupNormalization": "GN"}


def norm_kind(kind: str) -> str:
    if kind.startswith("RMS ("):
        return "SkipRMS" if "Skip" in kind else "RMS"
    return NORM_KIND.get(kind, kind)


def norm_summary(counts: dict) -> str:
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "none"


def norm_change(first: dict, this: dict) -> str:
    """'7 LN -> 7 RMS' (what changed from the first model), or the counts when nothing did."""
    if first == this:
        return norm_summary(this)
    gone = {k: first.get(k, 0) - this.get(k, 0) for k in first if first.get(k, 0) > this.get(k, 0)}
    new = {k: this.get(k, 0) - first.get(k, 0) for k in this if this.get(k, 0) > first.get(k, 0)}
    return f"{norm_summary(gone) if gone else '0'} -> {norm_summary(new) if new else '0'}"


# ---------------------------------------------------------------------------------------------
# CI


def write_junit(path, suite: str, cases: list, plan=None, times: list | None = None, elapsed: float | None = None) -> None:
    """cases: [(name, failure message or None, {property: value})]. `path` is a path or a
    normopt.paths.Target from the command's checked plan; written atomically. Each case's `time`
    (seconds) is times[i] when given (bench: the time that model ran), else an even share of
    `elapsed` (verify: every output is compared in the same runs, so the check's wall time is
    split between them)."""
    from . import paths as P

    if times is None:
        share = (elapsed or 0.0) / max(1, len(cases))
        times = [share] * len(cases)
    root = ET.Element("testsuites")
    ts = ET.SubElement(root, "testsuite", name=suite, tests=str(len(cases)),
                       failures=str(sum(1 for _, f, _ in cases if f)), errors="0", skipped="0",
                       time=f"{sum(times):.6f}")
    for (name, failure, props), t in zip(cases, times):
        tc = ET.SubElement(ts, "testcase", classname=suite.replace(" ", "."), name=name, time=f"{t:.6f}")
        if props:
            pe = ET.SubElement(tc, "properties")
            for k, v in props.items():
                ET.SubElement(pe, "property", name=str(k), value=str(v))
        if failure:
            f = ET.SubElement(tc, "failure", message=failure)
            f.text = failure
    P.write_bytes(P.target_of(path, "--junit"), ET.tostring(root, encoding="utf-8", xml_declaration=True), plan)


def github_summary(markdown: str) -> None:
    """Append to the GitHub Actions job summary when running there."""
    path = os.environ.get("GITHUB_STEP_SUMMARY")
    if not path:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(markdown.rstrip() + "\n\n")


def verify_markdown(title: str, result) -> str:
    from .runtime_tests.equivalence import fmt_cosine

    exact = getattr(result, "mode", "") == "exact"
    verdict = result.verdict() if hasattr(result, "verdict") else ("EQUIVALENT" if result.equivalent else "NOT EQUIVALENT")
    rows = [f"### {title}: {verdict}", ""]
    if getattr(result, "judge", ""):
        rows += [result.judge, ""]
    if exact:
        rows += ["| output | input set | max abs | cosine | orig err vs exact | cand err vs exact | bound | result |",
                 "|---|---|---:|---:|---:|---:|---:|---|"]
    else:
        rows += ["| output | input set | max abs | max rel | cosine | SNR dB | top-1 | result |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for m in result.outputs:
        ok = ("ok" if m.compared_on else "not compared") if m.passed else "DIFFERS"
        if exact:
            f = (lambda v: "" if v is None else f"{v:.3g}")
            rows.append(f"| {m.name} | {m.worst_input or ''} | {m.max_abs:.3g} | {fmt_cosine(m.cosine)} | {f(m.err_orig)} | "
                        f"{f(m.err_cand)} | {f(m.bound)} | {ok} |")
        else:
            snr = "inf" if m.snr_db == float("inf") else f"{m.snr_db:.1f}"
            top1 = "" if m.top1 is None else f"{m.top1:.4f}"
            rows.append(f"| {m.name} | {m.worst_input or ''} | {m.max_abs:.3g} | {m.max_rel:.3g} | {fmt_cosine(m.cosine)} | {snr} | "
                        f"{top1} | {ok} |")
    rows += [f"- problem: {p}" for p in result.problems]
    if getattr(result, "uninformative", None):
        rows.append("- uninformative on every input set: " + ", ".join(result.uninformative))
    return "\n".join(rows)


def verify_cases(result) -> list:
    cases = []
    for m in result.outputs:
        failure = None if m.passed else f"output '{m.name}' differs: max abs {m.max_abs:.3g}, cosine {m.cosine}, failed on {m.failed_on}"
        cases.append((f"output {m.name}", failure, {"max_abs": m.max_abs, "max_rel": m.max_rel, "cosine": m.cosine,
                                                     "snr_db": m.snr_db, "top1": m.top1, "err_orig": m.err_orig,
                                                     "err_cand": m.err_cand, "input_set": m.worst_input}))
    for p in result.problems:
        cases.append(("structure", p, {}))
    return cases
