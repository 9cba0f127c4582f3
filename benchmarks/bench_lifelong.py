"""Lifelong editing speed: N sequential edits on the default model, none removed.

    .venv/bin/python benchmarks/bench_lifelong.py --method unike-plus --edits 1000

Reports the median edit time in windows around edit 1, 10, 100 and 1,000 (and its ratio to the
window at edit 1), and the median time per optimisation step (UniKE, T-Patcher and GRACE stop early;
later edits need more steps where earlier edits' neurons fire on them: ``scripts/unike_interference.py``
shows which; the time per step is the cost of the mechanism, the edit time that of the edit as users
run it; NLL0 is the target's NLL when the edit's training starts, with every earlier edit in place),
and the inference cost with every edit applied: the median over ``--repeats``
forward passes of a fixed batch of ``--probes`` inputs, unedited (before the first edit) and
edited (after the last), in the same process. Edit cases are the bundled benchmark's eval records,
cycled if N exceeds them (a speed benchmark: what the edits teach does not matter).
Progress goes to stdout every ``--every`` edits; the numbers go to ``--out`` (JSON).
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
from mmke.editors.grace import label_tap
from mmke.eval.runner import Run, RunConfig
from mmke.eval.scope import one_target_per_pair
from mmke.io import atomic_write_json
from mmke.registry import load_model, parse_option_sets
from mmke.scoring import INPUT_KINDS, case_inputs
from mmke.tasks import TASKS

WINDOWS = {1: (1, 5), 10: (8, 12), 100: (96, 105), 1000: (991, 1000)}
METHODS = ["unike-plus", "unike", "t-patcher", "grace", "grace-mm", "wise"]


def forward_time(adapter, batches) -> float:
    """Forward passes as evaluation runs them: ``target_view`` marks each batch's image tokens, so
    image-gated neurons (unike-plus) run; ``_target_view`` alone would leave them all shut. The
    batches are prepared once, so the label tap is told each one's labels (evaluation prepares
    each batch right before its forward); without them GRACE's and WISE's hooks pass it through."""
    tap = label_tap(adapter)
    t = time.perf_counter()
    with torch.no_grad():
        for b in batches:
            with tap.forced(b.labels):
                adapter.target_view(b)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", default="unike-plus", choices=METHODS,
                    help="editors that change the model's forward (the in-context ones change the input instead)")
    ap.add_argument("--task", default="vqa", choices=list(TASKS))
    ap.add_argument("--edits", type=int, default=1000)
    ap.add_argument("--probes", type=int, default=16, help="inputs of the fixed inference batch")
    ap.add_argument("--repeats", type=int, default=7, help="timed forward passes (median)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="method option, as `mmke run --set` (repeatable), e.g. steps=50")
    ap.add_argument("--targets", default="as-drawn", choices=["as-drawn", "one-per-pair"],
                    help="one-per-pair: an edit of a (content, question) pair edited before takes that pair's "
                         "first target (`mmke run --targets`), so no edit fights an earlier one")
    ap.add_argument("--every", type=int, default=50, help="progress line every this many edits")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON of the numbers (default: runs/bench/lifelong-<method>-<edits>.json)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sets = parse_option_sets(args.sets)
    tag = "".join(f"-{k}={v}" for k, v in sets.items()) + ("" if args.targets == "as-drawn" else f"-{args.targets}")
    out = args.out or Path(f"runs/bench/lifelong-{args.method}{tag}-{args.edits}.json")
    torch.manual_seed(0)
    adapter = load_model("default")
    task = TASKS[args.task]
    with tempfile.TemporaryDirectory() as tmp:
        r = Run(RunConfig(task=args.task, method=args.method, method_config=sets), tmp, adapter=adapter)
        records, _ = r.load_records()
        editor = r.editor(adapter)
    if args.targets == "one-per-pair":
        records, n = one_target_per_pair(records)
        print(f"--targets one-per-pair: {n} of {len(records)} edits take their pair's first target", flush=True)

    # the fixed probe batch: every input kind of the first cases, batched as evaluation batches them
    probe_ex = []
    for rec in records:
        x = case_inputs(rec, task, adapter.load_image)
        probe_ex += [x[k] for k in INPUT_KINDS]
        if len(probe_ex) >= args.probes:
            break
    probe_ex = probe_ex[: args.probes]
    batches = [adapter.prepare([probe_ex[i] for i in g]).to(adapter.device) for g in adapter.sub_batches(probe_ex)]

    def infer() -> float:
        forward_time(adapter, batches)  # warm-up
        return statistics.median(forward_time(adapter, batches) for _ in range(args.repeats))

    unedited = infer()
    print(f"unedited forward of {len(probe_ex)} probes: {unedited * 1e3:.1f} ms "
          f"({torch.get_num_threads()} threads)", flush=True)
    times, steps, start_nll, handles = [], [], [], []
    t_all = time.perf_counter()
    for i in range(args.edits):
        rec = records[i % len(records)]
        ex = case_inputs(rec, task, adapter.load_image)["reliability"]
        t = time.perf_counter()
        handles.append(editor.edit(EditRequest(ex, rec.to_dict())))
        times.append(time.perf_counter() - t)
        steps.append(int(handles[-1].meta.get("steps", 0)))
        start_nll.append(float(handles[-1].meta.get("start_nll", float("nan"))))
        if (i + 1) % args.every == 0 or i + 1 == args.edits:
            recent = statistics.median(times[-args.every:])
            print(f"edit {i + 1}/{args.edits}: median of the last {min(args.every, len(times))} "
                  f"{recent * 1e3:.0f} ms, {statistics.median(steps[-args.every:]):.0f} steps, "
                  f"target NLL before training {statistics.median(start_nll[-args.every:]):.2f} "
                  f"({time.perf_counter() - t_all:.0f} s elapsed)", flush=True)
    edited = infer()
    windows = {}
    for at, (lo, hi) in WINDOWS.items():
        if lo <= len(times):  # the last window ends at the last edit
            hi = min(hi, len(times))
            windows[at] = {"edits": [lo, hi], "median_s": statistics.median(times[lo - 1: hi]),
                           "median_steps": statistics.median(steps[lo - 1: hi]),
                           "median_start_nll": statistics.median(start_nll[lo - 1: hi]),
                           "median_s_per_step": statistics.median(t / max(n, 1) for t, n in
                                                                  zip(times[lo - 1: hi], steps[lo - 1: hi]))}
    base, base_step = windows[1]["median_s"], windows[1]["median_s_per_step"]
    for w in windows.values():
        w["ratio_to_edit_1"] = w["median_s"] / base
        w["per_step_ratio_to_edit_1"] = w["median_s_per_step"] / base_step
    row = {"method": args.method, "method_config": sets, "targets": args.targets, "task": args.task, "edits": args.edits, "probes": len(probe_ex),
           "repeats": args.repeats, "edit_time_windows": windows,
           "unedited_forward_s": unedited, "edited_forward_s": edited, "inference_ratio": edited / unedited,
           "edit_times_s": times, "edit_steps": steps, "edit_start_nll": start_nll}
    print(f"\n{'edit':>6} {'window':>10} {'median ms':>10} {'x edit 1':>9} {'steps':>6} {'ms/step':>8} {'x edit 1':>9} "
          f"{'NLL0':>6}")
    for at, w in windows.items():
        print(f"{at:>6} {w['edits'][0]:>4}-{w['edits'][1]:<5} {w['median_s'] * 1e3:>10.1f} {w['ratio_to_edit_1']:>9.2f} "
              f"{w['median_steps']:>6.0f} {w['median_s_per_step'] * 1e3:>8.1f} {w['per_step_ratio_to_edit_1']:>9.2f} "
              f"{w['median_start_nll']:>6.2f}")
    print(f"inference, {len(probe_ex)} probes: unedited {unedited * 1e3:.1f} ms, with {args.edits} edits "
          f"{edited * 1e3:.1f} ms: {edited / unedited:.2f}x")
    atomic_write_json(out, {"date": date.today().isoformat(),
                            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
                            "torch": torch.__version__, **row})
    for h in reversed(handles):
        h.remove()
    # the unedited forward again, now: load from other processes over a long run skews the first
    unedited_after = infer()
    row.update(unedited_after_forward_s=unedited_after, inference_ratio_after=edited / unedited_after)
    print(f"unedited again after removing every edit: {unedited_after * 1e3:.1f} ms: "
          f"{edited / unedited_after:.2f}x")
    atomic_write_json(out, {"date": date.today().isoformat(),
                            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
                            "torch": torch.__version__, **row})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
