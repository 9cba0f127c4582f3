"""How a WISE run's routing threshold compares with its edits' own scores, at each checkpoint.

    .venv/bin/python scripts/wise_routing.py runs/ll/vqa-wise runs/ll/vqa-wise-floor0.95

Reads the edit meta a lifelong (or any) wise run stored with each edit, in stream order: each
edit's score at the end of its training (``act``), the threshold once it was added, and with
``route_floor`` the floor part of it (the quantile of held-out locality inputs' scores). Prints,
after N edits: EasyEdit's threshold (act_ratio x the smallest score so far), the floor, the
threshold in force, the median and smallest edit score so far, and the share of the edits so far
whose own score, as it was at the end of their training, reaches the threshold in force, and the
share that ran all ``n_iter`` steps without meeting the routing margins and the target. Later
edits of a shard change the memory, and with it every input's score (edit inputs' and others'
alike), so this is a guide to routing, not a measurement of it. Nothing is loaded but the rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from mmke.eval.runner import RUN_FILE, Run, RunConfig
from mmke.eval.store import CaseStore


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", type=Path, nargs="+", help="wise runs' --out directories")
    args = ap.parse_args()
    for d in args.runs:
        cfg = RunConfig(**json.loads((d / RUN_FILE).read_text())["config"])
        cases, _ = Run(cfg, d).stream()
        rows = CaseStore(d / "cases.jsonl").done
        metas = [rows[f"edit:{c.key}"].get("edit_meta") for c in cases if f"edit:{c.key}" in rows]
        metas = [m for m in metas if m and "act" in m and "threshold" in m]
        if not metas:
            raise SystemExit(f"{d}: no wise edit meta (act, threshold) stored")
        q = metas[0].get("route_floor")
        print(f"\n{d}: {cfg.method}{f', route_floor={q}' if q is not None else ''}, {len(metas)} edits stored\n")
        print("| edits | EasyEdit threshold | floor | threshold | median edit score | smallest | edits reaching it "
              "| edits at the step cap |")
        print("|---|---|---|---|---|---|---|---|")
        ratio = float((cfg.method_config or {}).get("act_ratio", 0.88))
        cap = int((cfg.method_config or {}).get("n_iter", 70))
        for n in [c for c in (cfg.checkpoints or [len(metas)]) if c <= len(metas)]:
            acts = [m["act"] for m in metas[:n]]
            thr = metas[n - 1]["threshold"]
            print(f"| {n} | {ratio * min(acts):.1f} | {metas[n - 1].get('floor', 0.0):.1f} | {thr:.1f} | "
                  f"{statistics.median(acts):.1f} | {min(acts):.1f} | {100 * sum(a >= thr for a in acts) / n:.1f}% | "
                  f"{100 * sum(m.get('steps', 0) >= cap for m in metas[:n]) / n:.1f}% |")


if __name__ == "__main__":
    main()
