"""The curve of a lifelong run stopped before its last checkpoint, from the rows it stored.

    .venv/bin/python scripts/lifelong_partial.py runs/ll/vqa-wise

A lifelong run writes a checkpoint's scored rows once every edit up to it is scored, and its
summary.json only at the end. This prints, for every checkpoint whose rows are all stored, what
the summary's curve would hold there (the same aggregation: the mean of the five metrics with its
interval, each metric, M-Locality out of scope). It reads the run's own run.json and records;
nothing is written and no model is loaded.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mmke.eval.runner import RUN_FILE, Run, RunConfig
from mmke.eval.settings import groups
from mmke.eval.store import CaseStore
from mmke.eval.summary import aggregate_partial, mark_scope, scope_marks

SHORT = {"reliability": "Rel", "t_generality": "T-Gen", "m_generality": "M-Gen", "t_locality": "T-Loc",
         "m_locality": "M-Loc"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="the lifelong run's --out directory")
    args = ap.parse_args()
    meta = json.loads((args.run / RUN_FILE).read_text())
    cfg = RunConfig(**meta["config"])
    if cfg.setting != "lifelong":
        raise SystemExit(f"{args.run}: a {cfg.setting} run; this reads lifelong runs (others write rows per group)")
    cases, _ = Run(cfg, args.run).stream()
    (g,) = groups(cfg.setting, cases, cfg.k, cfg.checkpoints, cfg.probes)
    rows = CaseStore(args.run / "cases.jsonl").done
    marks = scope_marks([g])
    edits = sum(f"edit:{c.key}" in rows for c in g.cases)
    print(f"{args.run}: {cfg.method}, {edits} of {cfg.k} edits stored")
    for n in g.checkpoints:
        keys = [g.row_key(n, s.case.key) for s in g.scored(n)]
        if not all(k in rows for k in keys):
            print(f"after {n} edits: not scored (stopped before)")
            continue
        agg = aggregate_partial(mark_scope([rows[k] for k in keys], marks), seed=cfg.seed)
        lo, hi = agg["intervals"]["metrics"]["mean"]
        m = agg["metrics"]
        parts = " ".join(f"{SHORT[k]} {100 * m[k]:.1f}" for k in SHORT if k in m)
        oos = m.get("m_locality_out_of_scope")
        print(f"after {n} edits: mean {100 * agg['mean']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] | {parts}"
              + (f" | M-Loc out of scope {100 * oos:.1f} ({agg.get('n_out_of_scope_m_locality')})" if oos is not None else ""))


if __name__ == "__main__":
    main()
