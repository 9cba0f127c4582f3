"""Paper-style tables from run summaries: methods as rows, one column group per task."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from mmke.eval.metrics import METRICS
from mmke.tasks import TASKS

SHORT = {"reliability": "Rel", "t_generality": "T-Gen", "m_generality": "M-Gen",
         "t_locality": "T-Loc", "m_locality": "M-Loc"}

# SPEC §6: the MMEdit paper's numbers as reported in the UniKE paper (percent). Reference rows only.
REFERENCE: dict[str, dict[str, dict[str, list[float]]]] = {
    "BLIP-2 OPT": {
        "ft-lm": {"vqa": [58.7, 54.2, 49.4, 67.7, 63.1], "caption": [61.1, 52.1, 51.6, 55.0, 49.5]},
        "ke": {"vqa": [85.3, 77.4, 75.3, 93.8, 66.4], "caption": [50.5, 49.0, 46.3, 95.0, 64.3]},
        "t-patcher": {"vqa": [85.6, 80.3, 74.6, 90.5, 89.7], "caption": [85.6, 73.4, 70.0, 91.1, 82.0]},
        "mend": {"vqa": [99.4, 98.8, 79.1, 99.9, 96.6], "caption": [96.1, 95.8, 74.2, 94.5, 70.8]},
        "ike": {"vqa": [99.7, 93.9, 93.6, 48.8, 2.5], "caption": [96.7, 78.2, 87.6, 49.0, 3.0]},
        "serac": {"vqa": [99.4, 99.4, 86.8, 96.8, 2.9], "caption": [99.7, 98.9, 89.2, 95.7, 7.5]},
        "unike": {"vqa": [98.8, 98.4, 94.8, 98.3, 96.7], "caption": [98.3, 96.3, 93.2, 95.8, 85.7]},
    },
    "MiniGPT-4": {
        "ft-lm": {"vqa": [70.1, 65.7, 63.9, 72.6, 65.8], "caption": [67.4, 65.1, 62.8, 63.5, 52.7]},
        "ke": {"vqa": [91.8, 89.0, 60.8, 96.9, 67.8], "caption": [96.6, 67.8, 57.4, 97.3, 64.4]},
        "t-patcher": {"vqa": [83.0, 68.2, 66.0, 84.8, 82.0], "caption": [83.8, 72.3, 67.7, 93.9, 83.6]},
        "mend": {"vqa": [98.8, 98.6, 82.2, 98.2, 81.1], "caption": [96.6, 96.1, 76.3, 98.4, 75.3]},
        "ike": {"vqa": [100.0, 94.9, 90.5, 50.3, 3.7], "caption": [90.9, 81.6, 88.5, 52.2, 4.7]},
        "serac": {"vqa": [87.7, 87.6, 85.9, 97.5, 14.2], "caption": [91.8, 91.4, 91.0, 97.9, 7.2]},
        "unike": {"vqa": [98.0, 97.4, 92.8, 98.7, 88.8], "caption": [96.8, 95.7, 92.4, 98.9, 87.3]},
    },
}


def collect(dirs: Iterable[Path]) -> list[dict[str, Any]]:
    """All summary.json files in the given run directories (or one level below them)."""
    out = []
    for d in dirs:
        d = Path(d)
        files = [d] if d.is_file() else ([d / "summary.json"] if (d / "summary.json").exists()
                                         else sorted(d.glob("*/summary.json")))
        if not files:
            raise FileNotFoundError(f"{d}: no summary.json here or in its subdirectories")
        for f in files:
            out.append(json.loads(f.read_text()))
    return out


def summary_line(s: dict[str, Any]) -> str:
    vals = " ".join(f"{SHORT[k]} {100 * s['metrics'][k]:.1f}" for k in METRICS)
    return f"{s['model']} {s['method']} {s['task']} ({s['n_cases']} cases): {vals}"


def _rows(summaries: list[dict[str, Any]], exact_match: bool) -> tuple[list[str], dict]:
    key = "metrics_exact_match" if exact_match else "metrics"
    models = {s["model"] for s in summaries}
    table: dict[str, dict[str, dict]] = {}
    for s in summaries:
        label = s["method"] if len(models) == 1 else f"{s['model']} / {s['method']}"
        table.setdefault(label, {})[s["task"]] = {"values": [100 * s[key][m] for m in METRICS],
                                                  "n": s["n_cases"]}
    return list(table), table


def render(summaries: list[dict[str, Any]], *, fmt: str = "markdown", exact_match: bool = False,
           reference: bool = False) -> str:
    """Markdown (default) or HTML table; numbers in percent; n = cases per cell."""
    tasks = [t for t in TASKS if any(s["task"] == t for s in summaries)] or list(TASKS)
    labels, table = _rows(summaries, exact_match)
    header = (["Method"] + [f"{TASKS[t].title} {SHORT[m]}" for t in tasks for m in METRICS]
              + [f"{TASKS[t].title} Mean" for t in tasks] + ["n"])
    body = []
    for label in labels:
        row, means, ns = [label], [], []
        for t in tasks:
            cell = table[label].get(t)
            row += [f"{v:.1f}" for v in cell["values"]] if cell else ["–"] * len(METRICS)
            means.append(f"{sum(cell['values']) / len(METRICS):.1f}" if cell else "–")
            ns.append(str(cell["n"]) if cell else "–")
        body.append(row + means + ["/".join(ns)])
    if reference:
        for backbone, methods in REFERENCE.items():
            for method, vals in methods.items():
                row = [f"paper ({backbone}): {method}"]
                for t in tasks:
                    row += [f"{v:.1f}" for v in vals[t]]
                body.append(row + [f"{sum(vals[t]) / len(METRICS):.1f}" for t in tasks] + ["reference"])
    note = ("exact match" if exact_match else "token accuracy") + ", percent; one-step editing; Mean = mean of the five metrics"
    if fmt == "html":
        th = "".join(f"<th>{h}</th>" for h in header)
        trs = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in body)
        return f"<table><caption>{note}</caption><tr>{th}</tr>{trs}</table>"
    if fmt != "markdown":
        raise ValueError(f"unknown format {fmt!r}; use markdown or html")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines) + f"\n\n({note})"
