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
    ax.set_ylabel(f"latency / {labels[0]}")
    ax.set_title(f"{result.provider.upper()}, {result.threads or 'default'} thread(s); 95% CI", fontsize=9)
    lo = min(m.ci_low for m in result.models)
    ax.set_ylim(max(0.0, lo - 0.05), max(m.ci_high for m in result.models) + 0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
