"""What a run stopped before its end adds up to, from the rows it stored.

    .venv/bin/python scripts/partial_run.py runs/ll/vqa-wise            # lifelong: per checkpoint
    .venv/bin/python scripts/partial_run.py runs/seq/k20/vqa-ike        # sequential / cross-task: the finished groups

A run writes each scored case as it is scored and its summary.json only at the end. For a lifelong
run this prints, for every checkpoint whose rows are all stored, what the summary's curve would
hold there (the same aggregation: the mean of the five metrics with its interval, each metric,
M-Locality out of scope). For a sequential or cross-task run it prints the same aggregation as the
summary over the cases of the groups whose rows are all stored, and how far each unfinished group
got. It reads the run's own run.json and records (with the shards of a torchrun run not merged
yet), also while the run is writing them; nothing is written and no model is loaded.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mmke.eval.distributed import stored_rows
from mmke.eval.runner import RUN_FILE, Run, RunConfig
from mmke.eval.settings import groups
from mmke.eval.summary import aggregate, aggregate_partial, mark_scope, scope_marks

SHORT = {"reliability": "Rel", "t_generality": "T-Gen", "m_generality": "M-Gen", "t_locality": "T-Loc",
         "m_locality": "M-Loc"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="the run's --out directory")
    args = ap.parse_args()
    meta = json.loads((args.run / RUN_FILE).read_text())
    cfg = RunConfig(**meta["config"])
    cases, _ = Run(cfg, args.run).stream()
    plan = groups(cfg.setting, cases, cfg.k, cfg.checkpoints, cfg.probes)
    rows = stored_rows(args.run)  # cases.jsonl and, of a torchrun run not merged yet, every rank's shard
    marks = scope_marks(plan)
    if cfg.setting == "lifelong":
        lifelong(args.run, cfg, plan[0], rows, marks)
        return
    done, partial = [], []
    for g in plan:
        keys = [g.row_key(g.checkpoints[-1], s.case.key) for s in g.scored(g.checkpoints[-1])]
        have = [k for k in keys if k in rows]
        if len(have) == len(keys):
            done += [rows[k] for k in keys]
        elif have:  # one group per rank of a torchrun run may be under way
            partial.append(f"group {g.index + 1}: {len(have)} of {len(keys)} cases scored")
    n_done = len({r["group"] for r in done})
    print(f"{args.run}: {cfg.method}, {cfg.setting}, K = {cfg.k}: {n_done} of {len(plan)} groups stored "
          f"({len(done)} of {len(cases)} cases)" + (f"; {', '.join(partial)} (not counted)" if partial else ""))
    if done:
        agg = aggregate(mark_scope(done, marks), seed=cfg.seed)
        print(line("finished groups", agg, agg["metrics"]))


def line(label: str, agg: dict, m: dict) -> str:
    lo, hi = agg["intervals"]["metrics"]["mean"]
    parts = " ".join(f"{SHORT[k]} {100 * m[k]:.1f}" for k in SHORT if k in m)
    oos = m.get("m_locality_out_of_scope")
    return (f"{label}: mean {100 * agg['mean']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] | {parts}"
            + (f" | M-Loc out of scope {100 * oos:.1f} ({agg.get('n_out_of_scope_m_locality')})" if oos is not None else ""))


def lifelong(run: Path, cfg: RunConfig, g, rows: dict, marks: dict) -> None:
    edits = sum(f"edit:{c.key}" in rows for c in g.cases)
    print(f"{run}: {cfg.method}, {edits} of {cfg.k} edits stored")
    for n in g.checkpoints:
        keys = [g.row_key(n, s.case.key) for s in g.scored(n)]
        if not all(k in rows for k in keys):
            print(f"after {n} edits: not scored (stopped before)")
            continue
        agg = aggregate_partial(mark_scope([rows[k] for k in keys], marks), seed=cfg.seed)
        print(line(f"after {n} edits", agg, agg["metrics"]))


if __name__ == "__main__":
    main()
