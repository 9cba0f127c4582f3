"""What a run's stored rows add up to: means over cases with seeded 95% bootstrap intervals, the
hard and out-of-scope M-Locality sub-metrics, and the scope marks of rows scored with other edits
in place (:mod:`mmke.eval.scope`). Pure functions of rows: ``mmke report`` recomputes them from
``cases.jsonl`` for summaries written before intervals existed."""

from __future__ import annotations

import statistics
from typing import Any

from mmke.eval.scope import OUT_OF_SCOPE_M_LOCALITY, EditScope
from mmke.eval.settings import Group
from mmke.eval.stats import bootstrap_ci, mean_of_means_ci
from mmke.scoring import HARD_M_LOCALITY, METRICS


def aggregate(rows: list[dict[str, Any]], seed: int = 0) -> dict[str, Any]:
    """Means over cases and their 95% bootstrap intervals: ``metrics`` and
    ``metrics_exact_match`` (the five metrics, plus the hard M-Locality sub-metric when a case has
    one), ``mean`` (of the five metrics) and ``intervals`` (lo/hi for each of them)."""
    out: dict[str, Any] = {}
    intervals: dict[str, Any] = {}
    hard = [r for r in rows if r.get("m_loc_hard")]
    free = _out_of_scope(rows)
    for key in ("metrics", "metrics_exact_match"):
        per_kind = {k: [r[key][k] for r in rows] for k in METRICS}
        if hard:
            per_kind[HARD_M_LOCALITY] = [r[key]["m_locality"] for r in hard]
        if free:
            per_kind[OUT_OF_SCOPE_M_LOCALITY] = [r[key]["m_locality"] for r in free]
        per_kind["mean"] = [statistics.fmean(r[key][k] for k in METRICS) for r in rows]
        ivs = {k: bootstrap_ci(v, seed=seed) for k, v in per_kind.items()}
        out[key] = {k: iv.mean for k, iv in ivs.items() if k != "mean"}
        out["mean" if key == "metrics" else "mean_exact_match"] = ivs["mean"].mean
        intervals[key] = {k: [iv.lo, iv.hi] for k, iv in ivs.items()}
    out["n_hard_m_locality"] = len(hard)
    if free is not None:
        out["n_out_of_scope_m_locality"] = len(free)
    out["intervals"] = intervals
    return out


def scope_marks(plan: list[Group]) -> dict[str, bool]:
    """Per stored row key of a sequential, cross-task or lifelong plan: whether the row's M-Locality
    input lies in the scope of the edits in place when it was scored (:mod:`mmke.eval.scope`): its
    group's edits; in a lifelong stream, the first n edits at checkpoint n."""
    scope = EditScope(c.record for g in plan for c in g.cases)
    marks = {}
    for g in plan:
        for n in g.checkpoints:
            covered = scope.covered([c.record for c in g.cases[:n]])  # once per group and checkpoint
            marks.update({g.row_key(n, s.case.key): scope.probe_key(s.case.record) in covered
                          for s in g.scored(n)})
    return marks


def with_scope(rows: list[dict[str, Any]], plan: list[Group]) -> list[dict[str, Any]]:
    """Rows of a sequential, cross-task or lifelong run, those with an M-Locality score marked
    ``m_loc_in_scope`` (:func:`scope_marks`)."""
    return mark_scope(rows, scope_marks(plan))


def mark_scope(rows: list[dict[str, Any]], marks: dict[str, bool]) -> list[dict[str, Any]]:
    """``rows``, those with an M-Locality score marked ``m_loc_in_scope`` from ``marks`` (by row key)."""
    return [{**r, "m_loc_in_scope": marks[r["key"]]} if "m_locality" in r["metrics"] else r for r in rows]


def _out_of_scope(rows: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The rows whose M-Locality input is out of every edit's scope; None where rows are unmarked."""
    marked = [r for r in rows if "m_loc_in_scope" in r]
    return [r for r in marked if not r["m_loc_in_scope"]] if marked else None


def aggregate_partial(rows: list[dict[str, Any]], seed: int = 0, resamples: int = 2000) -> dict[str, Any]:
    """:func:`aggregate` for rows that hold some of the metrics each (a lifelong checkpoint: edit
    metrics over the edits so far, locality over the probe set): every metric over the rows that
    have it; the mean of the five metric means, its interval from resampling each metric's rows
    independently (seeded)."""
    out: dict[str, Any] = {}
    intervals: dict[str, Any] = {}
    hard = [r for r in rows if r.get("m_loc_hard")]
    free = _out_of_scope(rows)
    for key in ("metrics", "metrics_exact_match"):
        per_kind = {k: [r[key][k] for r in rows if k in r[key]] for k in METRICS}
        ivs = {k: bootstrap_ci(v, seed=seed) for k, v in per_kind.items()}
        if hard:
            ivs[HARD_M_LOCALITY] = bootstrap_ci([r[key]["m_locality"] for r in hard], seed=seed)
        if free:
            ivs[OUT_OF_SCOPE_M_LOCALITY] = bootstrap_ci([r[key]["m_locality"] for r in free], seed=seed)
        mean = mean_of_means_ci(list(per_kind.values()), resamples=resamples, seed=seed)
        out[key] = {k: iv.mean for k, iv in ivs.items()}
        out["mean" if key == "metrics" else "mean_exact_match"] = statistics.fmean(ivs[k].mean for k in METRICS)
        intervals[key] = {k: [iv.lo, iv.hi] for k, iv in ivs.items()}
        intervals[key]["mean"] = [mean.lo, mean.hi]
    out["n"] = {k: len([r for r in rows if k in r["metrics"]]) for k in METRICS}
    out["n_hard_m_locality"] = len(hard)
    if free is not None:
        out["n_out_of_scope_m_locality"] = len(free)
    out["intervals"] = intervals
    return out


__all__ = ["aggregate", "aggregate_partial", "mark_scope", "scope_marks", "with_scope"]
