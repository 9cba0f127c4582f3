"""Speed of each editor on the default model: median edit time and evaluation time per case, the
ratio of evaluation time to the bare forward passes evaluation needs (its floor), and the cost of
inference with one edit applied relative to the unedited model.

    .venv/bin/python benchmarks/bench_edit.py --cases 10

The floor is measured in the same run, on the same edited model and the same five inputs: the
model's forward pass alone (inputs already tokenised and collated), no metric computation. The
unedited forward time is the same measurement with the edit removed, so "edited / unedited"
is the inference overhead an applied edit adds (hooks, extra neurons, routing, longer contexts).
Both are the median of ``--repeats`` passes, edited and unedited alternately (the edit is removed
and put back through save + load, the public contract), so that load from other processes hits
both alike.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from mmke.editors.base import EditRequest
from mmke.eval.runner import Run, RunConfig
from mmke.eval.settings import Case
from mmke.io import atomic_write_json
from mmke.registry import load_model
from mmke.scoring import INPUT_KINDS, case_metrics, run_case
from mmke.tasks import TASKS


DEFAULT_METHODS = ["ft-lm", "ft-vision", "ike", "t-patcher", "mend", "mend-vision", "ke", "serac", "serac-mm",
                   "unike", "unike-plus"]


def bare_forward(adapter, examples) -> float:
    """Seconds for the model forward passes alone, batched exactly as evaluation batches them.
    With a routing editor installed (SERAC) the routed forward is the forward: it is timed whole."""
    if adapter.run_wrappers:
        t = time.perf_counter()
        adapter.run(examples)
        return time.perf_counter() - t
    batches = [adapter.prepare([examples[i] for i in g]).to(adapter.device)
               for g in adapter.sub_batches(examples)]
    t = time.perf_counter()
    for b in batches:
        adapter.target_view(b)  # marks the image tokens: image-gated neurons (unike-plus) run as in evaluation
    return time.perf_counter() - t


def reapply(editor, handle):
    """Put a removed edit back exactly, through save + load."""
    with tempfile.TemporaryDirectory() as d:
        handle.save(d)
        return editor.load(d)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=10)
    ap.add_argument("--task", default="vqa", choices=list(TASKS))
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    ap.add_argument("--repeats", type=int, default=3, help="edited/unedited forward pairs per case")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/bench_edit.json"),
                    help="where the measured numbers go (default: under runs/, outside the tracked tree)")
    args = ap.parse_args()
    torch.manual_seed(0)
    adapter = load_model("default")
    rows = []
    for method in args.methods:
        with tempfile.TemporaryDirectory() as tmp:
            r = Run(RunConfig(task=args.task, method=method, limit=args.cases), tmp, adapter=adapter)
            records, _ = r.load_records()
            editor = r.editor(adapter)
            inputs = [r.inputs(adapter, Case(str(i), args.task, rec)) for i, rec in enumerate(records)]
            pre = [run_case(adapter, x) for x in inputs]
            edit_s, eval_s, floor_s, base_s, ratio = [], [], [], [], []
            for i, (rec, x) in enumerate(zip(records, inputs)):
                exs = [x[k] for k in INPUT_KINDS]
                with torch.no_grad():
                    bare_forward(adapter, exs)  # warm-up, same shapes
                t = time.perf_counter()
                h = editor.edit(EditRequest(x["reliability"], rec.to_dict()))
                edit_s.append(time.perf_counter() - t)
                with torch.no_grad():
                    bare_forward(adapter, exs)  # warm-up, same shapes
                    t = time.perf_counter()
                    case_metrics(pre[i], run_case(adapter, x))
                    eval_s.append(time.perf_counter() - t)
                    edited, plain = [], []
                    for _ in range(args.repeats):
                        edited.append(bare_forward(adapter, exs))
                        h.remove()
                        plain.append(bare_forward(adapter, exs))
                        h = reapply(editor, h)
                    h.remove()
                floor_s.append(statistics.median(edited))
                base_s.append(statistics.median(plain))
                ratio.append(floor_s[-1] / base_s[-1])
        row = {"method": method, "task": args.task, "cases": len(records),
               "edit_s_median": statistics.median(edit_s), "eval_s_median": statistics.median(eval_s),
               "forward_floor_s_median": statistics.median(floor_s),
               "eval_over_floor": statistics.median(e / f for e, f in zip(eval_s, floor_s)),
               "unedited_forward_s_median": statistics.median(base_s),
               "edited_over_unedited": statistics.median(ratio), "repeats": args.repeats}
        rows.append(row)
        print(f"{method:<12} edit {row['edit_s_median']:.3f}s  eval {row['eval_s_median']:.3f}s  "
              f"floor {row['forward_floor_s_median']:.3f}s  eval/floor {row['eval_over_floor']:.2f}x  "
              f"edited/unedited forward {row['edited_over_unedited']:.2f}x")
    atomic_write_json(args.out, {"date": date.today().isoformat(),
                                 "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
                                 "torch": torch.__version__, "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
