"""Figures of runs (``mmke plot``), drawn from their summary.json files with matplotlib.

- lifelong runs: metric against the number of edits (log scale), one line per run, with the 95%
  interval as a band; three panels: retention (reliability of every edit so far), generality
  (T-Gen solid, M-Gen dashed) and locality on the probe set (T-Loc solid, M-Loc dashed, M-Loc out
  of scope of the edits so far dotted: :mod:`mmke.eval.scope`);
- other runs (one-step, sequential, cross-task): grouped bars, one group per metric (and the mean
  of the five), one bar per run, interval whiskers; one panel per task and setting.

Given both kinds, two files are written: ``FILE`` (the curves) and ``FILE-bars.png``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmke.eval.report import SHORT, _cell_intervals, _labels, _section_title, _task_title, expand_cross_task, \
    row_key, section_of
from mmke.eval.scope import OUT_OF_SCOPE_M_LOCALITY
from mmke.scoring import METRICS


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("mmke plot needs matplotlib: pip install -e '.[figures]' (scripts/setup.sh installs it)") \
            from None
    return plt


def _run_labels(summaries: list[dict[str, Any]]) -> list[str]:
    """Labels that tell the runs apart (the report's row labels, plus the task where it varies)."""
    labels = _labels([row_key(s) for s in summaries])
    if len({s["task"] for s in summaries}) > 1:
        labels = [f"{lab} [{s['task']}]" for lab, s in zip(labels, summaries)]
    return labels


def plot_lifelong(summaries: list[dict[str, Any]], out: Path) -> Path:
    plt = _pyplot()
    panels = [("Retention (Rel)", ["reliability"]), ("Generality", ["t_generality", "m_generality"]),
              ("Locality (probe set)", ["t_locality", "m_locality", OUT_OF_SCOPE_M_LOCALITY])]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharex=True)
    labels = _run_labels(summaries)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if len(summaries) > len(colours):  # one colour per run: the default cycle has 10
        colours = [plt.get_cmap("tab20")(k) for k in range(20)]
    for i, (s, label) in enumerate(zip(summaries, labels)):
        c = colours[i % len(colours)]
        xs = [p["n_edits"] for p in s["curve"]]
        for ax, (_, metrics) in zip(axes, panels):
            for j, m in enumerate(metrics):
                pts = [(x, p) for x, p in zip(xs, s["curve"]) if m in p["metrics"]]
                if not pts:  # a run summarised before the metric existed
                    continue
                ys = [100 * p["metrics"][m] for _, p in pts]
                lo = [100 * p["intervals"]["metrics"][m][0] for _, p in pts]
                hi = [100 * p["intervals"]["metrics"][m][1] for _, p in pts]
                ax.plot([x for x, _ in pts], ys, ("-o", "--s", ":^")[j], color=c, ms=4,
                        label=label if j == 0 else None)
                if j < 2:
                    ax.fill_between([x for x, _ in pts], lo, hi, color=c, alpha=0.12, lw=0)
    for ax, (title, metrics) in zip(axes, panels):
        ax.set_xscale("log")
        styles = ("solid", "dashed", "dotted")
        ax.set_title(title + ("  (" + ", ".join(f"{SHORT[m]} {st}" for m, st in zip(metrics, styles)) + ")"
                              if len(metrics) > 1 else ""), fontsize=9)
        ax.set_xlabel("number of edits")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("percent (95% interval band)")
    axes[0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_bars(summaries: list[dict[str, Any]], out: Path) -> Path:
    plt = _pyplot()
    import numpy as np

    summaries = expand_cross_task(summaries)
    panels: list[tuple[str, str, int]] = []
    for s in summaries:
        p = (s["task"], *section_of(s))
        if p not in panels:
            panels.append(p)
    cols = list(METRICS) + ["mean"]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 1.6 * len(cols) + 2), 3.6 * len(panels)), squeeze=False)
    for ax, (task, setting, k) in zip(axes[:, 0], panels):
        part = [s for s in summaries if (s["task"], *section_of(s)) == (task, setting, k)]
        labels = _run_labels(part)
        width = 0.8 / len(part)
        x = np.arange(len(cols))
        for i, (s, label) in enumerate(zip(part, labels)):
            ivs = _cell_intervals(s, False)
            mean = [100 * ivs[c].mean for c in cols]
            err = [[100 * (ivs[c].mean - ivs[c].lo) for c in cols], [100 * (ivs[c].hi - ivs[c].mean) for c in cols]]
            ax.bar(x - 0.4 + width * (i + 0.5), mean, width, yerr=err, capsize=2, label=label)
        ax.set_xticks(x, [SHORT[c] for c in cols])
        ax.set_ylim(0, 105)
        ax.set_ylabel("percent")
        ax.set_title(f"{_task_title(task)} — {_section_title((setting, k))}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot(summaries: list[dict[str, Any]], out: str | Path) -> list[Path]:
    """Draw the figures of ``summaries`` (from :func:`mmke.eval.report.collect`); returns the files."""
    out = Path(out)
    if out.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise ValueError(f"{out}: give a .png, .pdf or .svg file")
    out.parent.mkdir(parents=True, exist_ok=True)
    life = [s for s in summaries if s.get("setting") == "lifelong"]
    rest = [s for s in summaries if s.get("setting") != "lifelong"]
    written = []
    if life:
        written.append(plot_lifelong(life, out))
    if rest:
        written.append(plot_bars(rest, out if not life else out.with_name(f"{out.stem}-bars{out.suffix}")))
    return written


__all__ = ["plot", "plot_lifelong", "plot_bars"]
