"""Tables from run directories, and paired comparisons of two runs.

- :func:`render` — one table per task (methods as rows; Rel, T-Gen, M-Gen, T-Loc, M-Loc, the
  hard M-Loc sub-metric and the mean of the five), every cell with its 95% bootstrap interval
  over cases. Rows are keyed by the run's whole configuration (model, method and its options, data,
  setting, locality variant, sample size and seed): two runs of one method that differ anywhere
  get two rows, labelled by what differs, never one merged row. ``compact`` gives the paper's
  layout (both tasks side by side, no intervals).
- :func:`compare` — two runs on their shared cases: per metric, the paired difference A - B with
  its bootstrap interval and the sign-flip test's p-value.
"""

from __future__ import annotations

import functools
import html
import json
import logging
import statistics
from pathlib import Path
from typing import Any, Iterable

from mmke.eval.stats import Interval, bootstrap_ci, fmt_interval, mean_of_means_ci, paired_difference
from mmke.eval.scope import OUT_OF_SCOPE_M_LOCALITY
from mmke.scoring import HARD_M_LOCALITY, METRICS
from mmke.tasks import TASKS

log = logging.getLogger(__name__)

SHORT = {"reliability": "Rel", "t_generality": "T-Gen", "m_generality": "M-Gen",
         "t_locality": "T-Loc", "m_locality": "M-Loc", HARD_M_LOCALITY: "M-Loc hard",
         OUT_OF_SCOPE_M_LOCALITY: "M-Loc out of scope", "mean": "Mean"}
COLUMNS = list(METRICS) + [HARD_M_LOCALITY, "mean"]


def columns(cells: list[dict[str, Any]]) -> list[str]:
    """The report's columns for a table of these cells: M-Loc out of scope (of the other edits in
    place, :mod:`mmke.eval.scope`) appears where a run has it (sequential, cross-task, lifelong)."""
    extra = [OUT_OF_SCOPE_M_LOCALITY] if any(OUT_OF_SCOPE_M_LOCALITY in c for c in cells) else []
    return list(METRICS) + [HARD_M_LOCALITY] + extra + ["mean"]

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


# ---- reading runs ------------------------------------------------------------------------------
def collect(dirs: Iterable[Path]) -> list[dict[str, Any]]:
    """All summary.json files in the given run directories (or one level below them); each
    summary gets ``_dir``, the run directory it came from."""
    out = []
    for d in dirs:
        d = Path(d)
        files = [d] if d.is_file() else ([d / "summary.json"] if (d / "summary.json").exists()
                                         else sorted(d.glob("*/summary.json")))
        if not files:
            unfinished = (d / "run.json").exists()  # a run writes its summary at its end
            raise FileNotFoundError(f"{d}: no summary.json here or in its subdirectories" + (
                " (a run not finished: `mmke run` with its command resumes it, and "
                "`python scripts/partial_run.py DIR` sums up the cases it has stored)" if unfinished else ""))
        for f in files:
            try:
                s = json.loads(f.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{f}: corrupt summary ({e})") from e
            s["_dir"] = str(f.parent)
            out.append(s)
    return out


def case_rows(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-case rows of a run (its ``cases.jsonl``), in case order."""
    from mmke.eval.store import CaseStore

    f = Path(run_dir) / "cases.jsonl"
    if not f.exists():
        raise FileNotFoundError(f"{run_dir}: no cases.jsonl (not a run directory?)")
    return CaseStore(f).rows()


def _cell_intervals(s: dict[str, Any], exact_match: bool) -> dict[str, Interval]:
    """Interval per column of one summary (from its stored intervals, or computed from its cases
    for summaries written before intervals existed)."""
    key = "metrics_exact_match" if exact_match else "metrics"
    means = dict(s[key])
    means["mean"] = s.get("mean_exact_match" if exact_match else "mean",
                          sum(s[key][k] for k in METRICS) / len(METRICS))
    ivs = s.get("intervals", {}).get(key)
    if ivs is None:
        try:
            rows = case_rows(s["_dir"])
        except (KeyError, FileNotFoundError):
            return {k: Interval(v, v, v, s["n_cases"]) for k, v in means.items()}
        from mmke.eval.summary import aggregate

        ivs = aggregate(rows, seed=s.get("seed", 0))["intervals"][key]
    n_sub = {HARD_M_LOCALITY: s.get("n_hard_m_locality", 0),
             OUT_OF_SCOPE_M_LOCALITY: s.get("n_out_of_scope_m_locality", 0)}
    return {k: Interval(means[k], ivs[k][0], ivs[k][1], n_sub.get(k, s["n_cases"])) for k in means if k in ivs}


# ---- row keys ---------------------------------------------------------------------------------
def _data_identity(s: dict[str, Any]) -> str:
    """What data a run used, comparable across the two tasks of one benchmark build."""
    prov = s.get("provenance") or {}
    bench = prov.get("benchmark")
    if bench and bench.get("content_hash"):
        return f"benchmark v{bench.get('version')} {bench['content_hash'][:12]}"
    data = (s.get("config") or {}).get("data")
    if not data:
        return "bundled"
    # a user's files: the folder and the name less its task prefix (vqa_dev.json and
    # caption_dev.json are one dataset; vqa_dev_sameimg.json is another)
    stem = Path(data).name.split(".")[0]
    for task in ("vqa_", "caption_"):
        stem = stem.removeprefix(task)
    return str(Path(data).parent / stem)


@functools.lru_cache(maxsize=None)
def _option_defaults(method: str) -> str:
    """The method's option defaults (JSON), {} for a method this mmke does not know."""
    try:
        from mmke.registry import editor_class

        return json.dumps(editor_class(method).Config().model_dump())
    except Exception:  # noqa: BLE001 - an unknown or unbuildable method: compare the options as written
        return "{}"


def row_key(s: dict[str, Any]) -> dict[str, Any]:
    """The configuration that identifies a table row (everything but the task). An option the run's
    method gained after the run was made reads as its default (what the run ran)."""
    cfg = s.get("config") or {}
    options = cfg.get("method_config", {})
    if options:
        options = {**json.loads(_option_defaults(s["method"])), **options}
    return {"model": s["model"], "method": s["method"],
            "options": json.dumps(options, sort_keys=True),
            "data": _data_identity(s), "setting": s.get("setting", "one-step"), "k": s.get("k", 1),
            "m_locality": cfg.get("m_locality", "top1"),
            "targets": cfg.get("targets", "as-drawn"), "limit": cfg.get("limit"), "seed": s.get("seed", 0)}


def _labels(keys: list[dict[str, Any]]) -> list[str]:
    """Row labels: the method (and model when several), plus the options it ran away from the
    method's defaults and whatever else differs between rows of the same method."""
    models = {k["model"] for k in keys}
    out = []
    for k in keys:
        same = [o for o in keys if o["method"] == k["method"] and o["model"] == k["model"]]
        differ = [f for f in k if f not in ("model", "method", "options")
                  and len({json.dumps(o[f]) for o in same}) > 1]
        label = k["method"] if len(models) == 1 else f"{k['model']} / {k['method']}"
        # options: those set away from the default (a lone grace-mm at eps_init=2.5 says so), and
        # those in which this method's rows differ
        mine, others = json.loads(k["options"]), [json.loads(o["options"]) for o in same]
        defaults = json.loads(_option_defaults(k["method"]))
        parts = [f"{a}={json.dumps(mine.get(a))}" for a in sorted({a for o in others for a in o})
                 if len({json.dumps(o.get(a)) for o in others}) > 1
                 or (a in defaults and json.dumps(mine.get(a)) != json.dumps(defaults[a]))]
        for f in differ:
            parts.append(f"{f}={k[f]}")
        if parts:
            label += " (" + ", ".join(parts) + ")"
        out.append(label)
    return out


def table_rows(summaries: list[dict[str, Any]], exact_match: bool = False):
    """(labels, rows) where rows[i][task] is (intervals per column, n label, run dir). The n label is
    the case count, or for a lifelong run "edits (probes)": its locality columns are over the probes. Two runs
    with the same key and task are an error: which one should the row show?"""
    keys: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    for s in summaries:
        k = row_key(s)
        if k not in keys:
            keys.append(k)
            rows.append({})
        row = rows[keys.index(k)]
        if s["task"] in row:
            raise ValueError(f"two runs of the same configuration and task: {row[s['task']][2]} and "
                             f"{s['_dir']}; report one of them")
        n = f"{s['n_cases']} ({s['n_probes']} probes)" if "n_probes" in s else s["n_cases"]
        row[s["task"]] = (_cell_intervals(s, exact_match), n, s.get("_dir"))
    return _labels(keys), rows


# ---- rendering --------------------------------------------------------------------------------
def render(summaries: list[dict[str, Any]], *, fmt: str = "markdown", exact_match: bool = False,
           reference: bool = False, compact: bool = False) -> str:
    """The report: markdown (default) or a standalone HTML page; numbers in percent."""
    if fmt not in ("markdown", "html"):
        raise ValueError(f"unknown format {fmt!r}; use markdown or html")
    summaries = expand_cross_task(summaries)
    what = "exact match" if exact_match else "token accuracy"
    settings = sorted({s.get("setting", "one-step") for s in summaries})
    tables: list[tuple[str, list[str], list[list[str]]]] = []
    sections: list[tuple[str, int]] = []
    for s in summaries:
        sec = section_of(s)
        if sec not in sections:
            sections.append(sec)
    sections.sort(key=lambda sec: (_SETTING_ORDER.index(sec[0]) if sec[0] in _SETTING_ORDER else 9, sec[1]))
    for sec in sections:
        part = [s for s in summaries if section_of(s) == sec]
        title = "" if sections == [("one-step", 1)] else _section_title(sec)
        tables += _tables(part, exact_match, reference and sec == ("one-step", 1), compact, title)
    note = (f"{what}, percent, with 95% bootstrap intervals over cases; setting: {', '.join(settings)}; "
            f"Mean = mean of the five metrics; M-Loc hard = M-Loc on the cases whose unrelated-image "
            f"question is the edit's own; n = cases"
            + ("; lifelong rows: after the stream's last edit, reliability = retention of every edit, "
               "locality over the probe set (n = edits (probes))" if "lifelong" in settings else "")
            + ("; M-Loc out of scope = M-Loc on the inputs that no other edit in place reaches by its own "
               "generality (an edit of the same question class on an image of the same content class)"
               if any(s.get("n_out_of_scope_m_locality") is not None for s in summaries) else ""))
    if compact:
        note = f"{what}, percent; setting: {', '.join(settings)}; Mean = mean of the five metrics; n = cases per task"
    if fmt == "html":
        return _html_page(tables, note)
    parts = []
    for title, header, body in tables:
        lines = ([f"### {title}", ""] if title else []) + ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        parts.append("\n".join(lines + ["| " + " | ".join(r) + " |" for r in body]))
    return "\n\n".join(parts) + f"\n\n({note})"


_SETTING_ORDER = ["one-step", "sequential", "cross-task", "lifelong"]


def section_of(s: dict[str, Any]) -> tuple[str, int]:
    """(setting, K) of a summary: reports group rows by them."""
    return s.get("setting", "one-step"), int(s.get("k", 1) or 1)


def _section_title(sec: tuple[str, int]) -> str:
    setting, k = sec
    return {"one-step": "one-step", "lifelong": f"lifelong, {k} edits"}.get(setting, f"{setting}, K = {k}")


def _task_title(task: str) -> str:
    if task in TASKS:
        return f"{TASKS[task].title} ({task})"
    return " + ".join(TASKS[t].title for t in task.split("+") if t in TASKS) + f" ({task}, overall)"


def expand_cross_task(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A cross-task summary is one row per task (from its ``per_task`` metrics) plus its overall row."""
    out = []
    for s in summaries:
        out.append(s)
        for t, agg in (s.get("per_task") or {}).items():
            sub = {**s, **agg, "task": t, "per_task": None}
            sub["n_cases"] = agg.get("n_cases", s["n_cases"] // max(1, len(s["per_task"])))
            out.append(sub)
    return out


def _tables(summaries: list[dict[str, Any]], exact_match: bool, reference: bool, compact: bool, section: str
            ) -> list[tuple[str, list[str], list[list[str]]]]:
    """The tables of one (setting, K) section: one per task, or the compact layout."""
    known = [t for t in TASKS if any(s["task"] == t for s in summaries)]
    tasks = known + sorted({s["task"] for s in summaries} - set(known)) or list(TASKS)
    labels, rows = table_rows(summaries, exact_match)
    suffix = f" — {section}" if section else ""
    tables: list[tuple[str, list[str], list[list[str]]]] = []
    if compact:
        tasks = [t for t in tasks if t in TASKS]
        header = ["Method"] + [f"{TASKS[t].title} {SHORT[m]}" for t in tasks for m in METRICS] + \
                 [f"{TASKS[t].title} Mean" for t in tasks] + ["n"]
        body = []
        for label, row in zip(labels, rows):
            cells = [label]
            for t in tasks:
                cells += [f"{100 * row[t][0][m].mean:.1f}" for m in METRICS] if t in row else ["–"] * len(METRICS)
            cells += [f"{100 * row[t][0]['mean'].mean:.1f}" if t in row else "–" for t in tasks]
            body.append(cells + [_n_cell(row, tasks)])
        body += _reference_rows(tasks, compact=True) if reference else []
        tables.append((section, header, body))
    else:
        for t in tasks:
            cols = columns([row[t][0] for row in rows if t in row])
            header = ["Method"] + [SHORT[c] for c in cols] + ["n"]
            body = []
            for label, row in zip(labels, rows):
                if t not in row:
                    continue
                ivs, n, _ = row[t]
                subs = [f"{ivs[c].n} {word}" for c, word in ((HARD_M_LOCALITY, "hard"),
                                                             (OUT_OF_SCOPE_M_LOCALITY, "out of scope"))
                        if c in ivs and ivs[c].n]
                body.append([label] + [fmt_interval(ivs.get(c)) for c in cols] + [_n_label(n, subs)])
            ns = {row[t][1] for row in rows if t in row}
            title = _task_title(t) + suffix + (" — rows differ in case counts: compare only rows of "
                                               "the same n, or use `mmke compare`" if len(ns) > 1 else "")
            body += _reference_rows([t], compact=False) if reference and t in TASKS else []
            tables.append((title, header, body))
    return tables


def _n_label(n: Any, subs: list[str]) -> str:
    """``"100 (48 hard)"``; a lifelong ``"1000 (100 probes)"`` becomes ``"1000 (100 probes; 63 out of scope)"``."""
    text = str(n)
    if not subs:
        return text
    return text[:-1] + "; " + ", ".join(subs) + ")" if text.endswith(")") else f"{text} ({', '.join(subs)})"


def _n_cell(row: dict, tasks: list[str]) -> str:
    ns = [str(row[t][1]) if t in row else "–" for t in tasks]
    return "/".join(ns)


def _reference_rows(tasks: list[str], compact: bool) -> list[list[str]]:
    body = []
    for backbone, methods in REFERENCE.items():
        for method, vals in methods.items():
            row = [f"paper ({backbone}): {method}"]
            for t in tasks:
                row += [f"{v:.1f}" for v in vals[t]] + ([] if compact else ["–"])
            mean = [f"{sum(vals[t]) / len(METRICS):.1f}" for t in tasks]
            body.append(row + mean + ["reference"])
    return body


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem;color:#222}
table{border-collapse:collapse;margin:1rem 0 2rem;font-size:.9rem}
th,td{border:1px solid #ccc;padding:.3rem .6rem;text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}
tr:nth-child(even) td{background:#fafafa}caption{caption-side:bottom;text-align:left;color:#555;padding-top:.4rem}"""


def _html_page(tables: list[tuple[str, list[str], list[list[str]]]], note: str) -> str:
    e = html.escape
    parts = []
    for title, header, body in tables:
        th = "".join(f"<th>{e(h)}</th>" for h in header)
        trs = "\n".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in body)
        parts.append((f"<h2>{e(title)}</h2>\n" if title else "")
                     + f"<table>\n<caption>{e(note)}</caption>\n<thead><tr>{th}</tr></thead>\n<tbody>\n{trs}\n</tbody>\n</table>")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>mmke report</title>\n<style>\n{_CSS}\n</style>\n</head>\n<body>\n<h1>mmke report</h1>\n"
            + "\n".join(parts) + "\n</body>\n</html>\n")


def summary_line(s: dict[str, Any]) -> str:
    ivs = _cell_intervals(s, False) if "intervals" in s else None
    vals = " ".join(f"{SHORT[k]} {100 * s['metrics'][k]:.1f}" for k in METRICS)
    mean = f" | mean {fmt_interval(ivs['mean'])}" if ivs else ""
    setting = "" if section_of(s) == ("one-step", 1) else f", {_section_title(section_of(s))}"
    return f"{s['model']} {s['method']} {s['task']} ({s['n_cases']} cases{setting}): {vals}{mean}"


# ---- paired comparison -------------------------------------------------------------------------
def compare(dir_a: str | Path, dir_b: str | Path, *, exact_match: bool = False, seed: int = 0,
            checkpoint: int | None = None) -> dict[str, Any]:
    """Paired differences A - B on the cases both runs evaluated (matched by case key: record
    index and content), per metric and for the mean of the five. Two lifelong runs are paired at
    one checkpoint (``checkpoint``; default the last both reached), each metric over the cases that
    carry it there (edits so far, probes), the mean of the five metric differences with its
    interval from resampling each metric's cases independently."""
    sa, sb = (collect([Path(d)])[0] for d in (dir_a, dir_b))
    if sa["task"] != sb["task"]:
        raise ValueError(f"{dir_a} is a {sa['task']} run and {dir_b} a {sb['task']} run: nothing to pair")
    lifelong = [s.get("setting") == "lifelong" for s in (sa, sb)]
    if any(lifelong) and not all(lifelong):
        raise ValueError(f"{dir_a if lifelong[0] else dir_b} is a lifelong run: it pairs only with another "
                         "lifelong run")
    ra = {r["key"]: r for r in case_rows(dir_a) if "metrics" in r}
    rb = {r["key"]: r for r in case_rows(dir_b) if "metrics" in r}
    if all(lifelong):
        both = sorted(set(sa.get("checkpoints", [])) & set(sb.get("checkpoints", [])))
        if not both:
            raise ValueError(f"{dir_a} and {dir_b} share no lifelong checkpoint")
        if checkpoint is None:
            checkpoint = both[-1]
        elif checkpoint not in both:
            raise ValueError(f"checkpoint {checkpoint}: the checkpoints both runs reached are "
                             f"{', '.join(map(str, both))}")
        ra = {k: r for k, r in ra.items() if r.get("checkpoint") == checkpoint}
        rb = {k: r for k, r in rb.items() if r.get("checkpoint") == checkpoint}
    elif checkpoint is not None:
        raise ValueError("--checkpoint is for two lifelong runs")
    shared = sorted(set(ra) & set(rb), key=lambda k: ra[k]["index"])
    if not shared:
        raise ValueError(f"{dir_a} and {dir_b} share no case (other data, or other samples?)")
    key = "metrics_exact_match" if exact_match else "metrics"
    label_a, label_b = _labels([row_key(sa), row_key(sb)])  # a method's options and what else differs
    out: dict[str, Any] = {"a": str(dir_a), "b": str(dir_b), "method_a": sa["method"], "method_b": sb["method"],
                           "label_a": label_a, "label_b": label_b,
                           "task": sa["task"], "n_shared": len(shared), "n_a": len(ra), "n_b": len(rb),
                           "metric": "exact match" if exact_match else "token accuracy", "rows": {},
                           **({"checkpoint": checkpoint} if all(lifelong) else {})}

    def pairs(metric: str, cases: list[str]) -> tuple[list[float], list[float]]:
        cases = [c for c in cases if metric in ra[c][key] and metric in rb[c][key]]
        return [ra[c][key][metric] for c in cases], [rb[c][key][metric] for c in cases]

    def paired(a: list[float], b: list[float]) -> dict[str, Any]:
        pd = paired_difference(a, b, seed=seed)
        return {"a": sum(a) / len(a), "b": sum(b) / len(b), "diff": pd.diff.mean, "lo": pd.diff.lo,
                "hi": pd.diff.hi, "p_value": pd.p_value, "n": len(a),
                "a_ci": bootstrap_ci(a, seed=seed).as_dict(), "b_ci": bootstrap_ci(b, seed=seed).as_dict()}

    cols = {k: pairs(k, shared) for k in METRICS}
    cols[HARD_M_LOCALITY] = pairs("m_locality", [c for c in shared if ra[c].get("m_loc_hard")])
    cols[OUT_OF_SCOPE_M_LOCALITY] = pairs("m_locality", _out_of_scope_in_both(dir_a, dir_b, shared))
    out["rows"] = {k: paired(a, b) for k, (a, b) in cols.items() if a}
    if not all(lifelong):
        out["rows"]["mean"] = paired(*([statistics.fmean(r[c][key][k] for k in METRICS) for c in shared]
                                       for r in (ra, rb)))
        return out
    # each metric on its own cases (edits so far, probes): the mean of the five metrics' differences
    a, b = ([cols[k][i] for k in METRICS] for i in (0, 1))
    d = mean_of_means_ci([[x - y for x, y in zip(*cols[k])] for k in METRICS], seed=seed)
    ca, cb = mean_of_means_ci(a, seed=seed), mean_of_means_ci(b, seed=seed)
    out["rows"]["mean"] = {"a": ca.mean, "b": cb.mean, "diff": d.mean, "lo": d.lo, "hi": d.hi, "p_value": None,
                           "n": len(shared), "a_ci": ca.as_dict(), "b_ci": cb.as_dict()}
    return out


def _out_of_scope_in_both(dir_a: str | Path, dir_b: str | Path, shared: list[str]) -> list[str]:
    """The shared cases whose M-Locality input is out of scope of the other edits in place in both
    runs (sequential and cross-task runs; empty for others)."""
    from mmke.eval.runner import run_scope_marks

    ma = run_scope_marks(dir_a)
    mb = run_scope_marks(dir_b) if ma is not None else None
    if ma is None or mb is None:
        return []
    return [c for c in shared if ma.get(c) is False and mb.get(c) is False]


def compare_verdict(r: dict[str, Any], name_a: str, name_b: str, alpha: float = 0.05) -> str:
    """One row's verdict: "X higher" only where the 95% interval of A - B excludes 0. Where the
    sign-flip test's p-value falls on the other side of ``alpha`` (small n, skewed differences),
    the verdict says so rather than letting one statistic speak for both."""
    p = r.get("p_value")
    if r["lo"] > 0 or r["hi"] < 0:
        v = f"{name_a if r['lo'] > 0 else name_b} higher"
        return v if p is None or p < alpha else f"{v}, weak: sign-flip p {p:.2g}"
    v = "no difference shown"
    return v if p is None or p >= alpha else f"{v}, borderline: sign-flip p {p:.2g}"


def render_compare(c: dict[str, Any]) -> str:
    """Markdown table of :func:`compare`'s result, with a one-line verdict per metric."""
    a, b = c.get("label_a", c["method_a"]), c.get("label_b", c["method_b"])
    name_a, name_b = (f"A ({a})", f"B ({b})") if a == b else (a, b)  # two runs of one method: by side
    after = f" after {c['checkpoint']} edits" if "checkpoint" in c else ""
    lines = [f"{c['a']} ({a}) vs {c['b']} ({b}), task {c['task']}{after}: {c['n_shared']} shared cases "
             f"(of {c['n_a']} / {c['n_b']}); {c['metric']}, percent; 95% paired bootstrap interval of A - B, "
             "two-sided sign-flip p-value", "",
             f"| metric | A ({a}) | B ({b}) | A - B [95% CI] | p | n | verdict |", "|---|---|---|---|---|---|---|"]
    for k, r in c["rows"].items():
        verdict = compare_verdict(r, name_a, name_b)
        p = "–" if r["p_value"] is None else f"{r['p_value']:.3g}"
        lines.append(f"| {SHORT[k]} | {100 * r['a']:.1f} | {100 * r['b']:.1f} | {100 * r['diff']:+.1f} "
                     f"[{100 * r['lo']:+.1f}, {100 * r['hi']:+.1f}] | {p} | {r['n']} | {verdict} |")
    return "\n".join(lines)
