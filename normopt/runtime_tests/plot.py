"""A bar chart of the paired latency ratios with their 95% CIs (matplotlib, optional)."""

from __future__ import annotations


def plot_ratios(result, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [m.label for m in result.models]
    ratios = [m.ratio for m in result.models]
    err = [[m.ratio - m.ci_low for m in result.models], [m.ci_high - m.ratio for m in result.models]]
    fig, ax = plt.subplots(figsize=(max(4, 1.4 * len(labels)), 3.8))
    ax.bar(range(len(labels)), ratios, yerr=err, capsize=4, color=["#888888"] + ["#3b78b0"] * (len(labels) - 1))
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_ylabel(f"latency / {labels[0]} (lower is better)")
    lo = min(m.ci_low for m in result.models)
    bottom = max(0.0, lo - 0.05)
    ax.set_ylim(bottom, max(m.ci_high for m in result.models) + 0.05)
    note = f"; y axis starts at {bottom:.2f}" if bottom > 0 else ""
    ax.set_title(f"{result.provider.upper()}, {result.threads or 'default'} thread(s); 95% CI{note}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_sweep(results, path: str) -> str:
    """Ratio to the first model against the swept size, one line per thread count (and per
    model after the first); results: [(config, threads, tag, BenchResult)]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    swept = [k for k in results[0][0]] if results[0][0] else []
    key = swept[0] if swept else None
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    series = {}
    for cfg, threads, _, res in results:
        x = int(cfg[key][-1]) if key else 0
        for m in res.models[1:]:
            series.setdefault((m.label, threads), []).append((x, m.ratio, m.ci_low, m.ci_high))
    for (label, threads), pts in series.items():
        pts.sort()
        xs = [p[0] for p in pts]
        ax.errorbar(xs, [p[1] for p in pts], yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]], capsize=3,
                    marker="o", label=f"{label}, {threads or 'default'} thread(s)")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel(key or "configuration")
    if key and len({p[0] for pts in series.values() for p in pts}) > 2:
        ax.set_xscale("log", base=2)
    ax.set_ylabel(f"latency / {results[0][3].models[0].label} (lower is better)")
    ax.set_title(f"{results[0][3].provider.upper()}; 95% CI; y axis not from 0", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
