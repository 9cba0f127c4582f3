"""UniKE's speed on the default model: edit time per case, and the forward time of the five
evaluation inputs with one edit applied relative to the unedited model (target: at most 1.1x).

    .venv/bin/python benchmarks/bench_unike.py --cases 10 --methods unike unike-intrinsic unike-latent

Forward times are the median of ``--repeats`` passes over the same prepared batch, unedited and
edited alternately, so that load from other processes hits both alike.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from mmke.editors.base import EditRequest
from mmke.eval.protocol import INPUT_KINDS, case_inputs
from mmke.eval.runner import Run, RunConfig
from mmke.registry import load_model
from mmke.tasks import TASKS


def forward_s(adapter, batches) -> float:
    t = time.perf_counter()
    for b in batches:
        adapter._target_view(b)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=10)
    ap.add_argument("--task", default="vqa", choices=list(TASKS))
    ap.add_argument("--methods", nargs="+", default=["unike"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_unike.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    adapter = load_model("default")
    rows = []
    for method in args.methods:
        with tempfile.TemporaryDirectory() as tmp:
            r = Run(RunConfig(task=args.task, method=method, limit=args.cases), tmp, adapter=adapter)
            records, _ = r.load_records()
            editor = r.editor(adapter)
            edit_s, ratio = [], []
            for rec in records:
                x = case_inputs(rec, TASKS[args.task], adapter.load_image)
                exs = [x[k] for k in INPUT_KINDS]
                batches = [adapter.prepare([exs[i] for i in g]).to(adapter.device) for g in adapter.sub_batches(exs)]
                t = time.perf_counter()
                h = editor.edit(EditRequest(x["reliability"], rec.to_dict()))
                edit_s.append(time.perf_counter() - t)
                with torch.no_grad():
                    forward_s(adapter, batches)  # warm-up
                    edited, plain = [], []
                    for _ in range(args.repeats):
                        edited.append(forward_s(adapter, batches))
                        h.remove()
                        plain.append(forward_s(adapter, batches))
                        h = _reapply(editor, h)
                    h.remove()
                ratio.append(statistics.median(edited) / statistics.median(plain))
        row = {"method": method, "task": args.task, "cases": len(records),
               "edit_s_median": round(statistics.median(edit_s), 3), "edit_s_max": round(max(edit_s), 3),
               "edited_over_unedited_forward": round(statistics.median(ratio), 3)}
        rows.append(row)
        print(f"{method:<20} edit {row['edit_s_median']:.2f}s (max {row['edit_s_max']:.2f}s)  "
              f"forward with the edit / without: {row['edited_over_unedited_forward']:.3f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": date.today().isoformat(),
                                    "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
                                    "torch": torch.__version__, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


def _reapply(editor, handle):
    """Put a removed edit back exactly (through save + load, the public contract)."""
    with tempfile.TemporaryDirectory() as d:
        handle.save(d)
        return editor.load(d)


if __name__ == "__main__":
    main()
