"""Print the table of the bundled trained editors from their ``weights.json``: the command that made
each, its wall time and hardware, the train file's digest, and the validation numbers it recorded
(held-out train cases, one-step protocol, percent).

    .venv/bin/python scripts/training_table.py [--root mmke/assets/editors]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mmke.scoring import METRICS

ROOT = Path(__file__).resolve().parents[1] / "mmke" / "assets" / "editors"


def rows(root: Path) -> list[str]:
    out = ["| weights | wall time | hardware | train file (digest) | " + " / ".join(
        m.replace("_", "-") for m in METRICS) + " | command |", "|---|---|---|---|---|---|"]
    for meta_file in sorted(root.glob("*/weights.json")):
        m = json.loads(meta_file.read_text())
        wall = m.get("train_wall_s_total")
        val = m.get("validation") or {}
        data = m.get("train_data") or {}
        out.append(
            f"| {meta_file.parent.name} | {f'{wall / 60:.0f} min' if wall else '–'} | {m.get('hardware', '–')} "
            f"| {data.get('file', '–')} ({data.get('digest', '–')}) | "
            + " / ".join(f"{100 * val[k]:.1f}" if k in val else "–" for k in METRICS)
            + f" | `{m.get('command', '–')}` |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=ROOT)
    print("\n".join(rows(ap.parse_args().root)))


if __name__ == "__main__":
    main()
