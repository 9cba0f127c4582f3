"""One method against every other method of a results folder: the paired difference of the mean of
the five metrics (A - B) on the cases both runs share, its 95% bootstrap interval and the sign-flip
p-value (the ``mean`` row of ``mmke compare``), per task, as a Markdown table.

    .venv/bin/python scripts/compare_against.py unike-plus runs/v2

Run folders are ``<root>/<task>-<method>`` (what ``mmke run --method a,b --task vqa,caption``
writes). "A beats B" holds where the whole interval is above 0.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mmke.eval.report import compare


def table(a: str, root: Path, tasks: list[str]) -> list[str]:
    out = ["| task | B | A mean | B mean | A - B [95% CI] | p | shared cases | A beats B |",
           "|---|---|---|---|---|---|---|---|"]
    for task in tasks:
        mine = root / f"{task}-{a}"
        if not (mine / "summary.json").exists():
            raise SystemExit(f"{mine}: no finished run of {a} on {task}")
        others = sorted(d for d in root.glob(f"{task}-*") if d != mine and (d / "summary.json").exists())
        for d in others:
            r = compare(mine, d)["rows"]["mean"]
            beats = "yes" if r["lo"] > 0 else ("no (B beats A)" if r["hi"] < 0 else "no (interval holds 0)")
            out.append(f"| {task} | {d.name.removeprefix(task + '-')} | {100 * r['a']:.1f} | {100 * r['b']:.1f} | "
                       f"{100 * r['diff']:+.1f} [{100 * r['lo']:+.1f}, {100 * r['hi']:+.1f}] | {r['p_value']:.2g} | "
                       f"{r['n']} | {beats} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("method")
    ap.add_argument("root", type=Path)
    ap.add_argument("--tasks", default="vqa,caption")
    args = ap.parse_args()
    print("\n".join(table(args.method, args.root, args.tasks.split(","))))


if __name__ == "__main__":
    main()
