"""Speed per method and ``hf:`` family: load, edit and evaluation time per case against the bare
forward passes evaluation needs, and IKE against the per-case cost of the reference
implementation it replaces (EasyEdit: every input run alone, the demonstrations recomputed for each).

    .venv/bin/python benchmarks/bench_families.py --cases 3

For each family of :data:`mmke.models.tiny.TINY_FAMILIES`, a tiny random checkpoint is saved with
``save_pretrained`` (:func:`mmke.models.tiny.save_tiny`) and loaded back through ``hf:DIR`` as a
user's would be (``--families default``: the bundled model, a real 135M LM); the data are the
bundled E-VQA-lite records. Per method and family, medians over
``--cases`` cases (after one untimed warm-up case):

- ``load_s``: ``load_model("hf:DIR")`` once the family's transformers modules are imported (median
  of 3: building the model, reading the weights and the processor); ``cold_load_s``: the same
  call as the first thing of a fresh process, after ``import torch, transformers, mmke.registry``
  (``cold_import_s``): what it adds is transformers importing the family's modeling code;
- ``edit_s``: the editor's ``edit``; ``pre_s``: the case's unedited outputs; ``eval_s``: its edited
  outputs and metrics (``run_case`` + ``case_metrics``, as ``mmke run`` does per case);
- ``floor_s``: the forward passes alone of the five inputs with the edit applied, batched as
  evaluation batches them (``adapter.batches``: inputs already tokenised, no metrics);
  ``eval_over_floor`` = eval / floor per case. Each of the two is the fastest of ``--repeats`` runs
  of the case (the edit stays applied), so that a busy machine's noise does not decide a ratio of
  milliseconds.

For IKE, three rows: ``ike`` (the reference layout, image first: mmke runs long rows one at a
time on a CPU), ``ike-prefix`` (mmke's variant, ``image_first=false``: demonstrations before the image, one KV
cache for the five inputs) and the reference's per-case cost on the same model and data
(``ike-reference-cost``: the same retrieval, then each of the five inputs run alone with the
demonstrations, image first, and alone without them, as EasyEdit's multimodal IKE evaluation
does); ``per_case_s`` = pre + edit + eval, and ``reference_over_this`` the reference's median
per-case cost divided by the row's. A fourth, ``ike-reference-as-written``, adds what EasyEdit's
``apply_ike_to_multimodal_model`` also does on every call: build the sentence encoder from its
files and read the pool's stored embeddings (timed here as mmke's own loading of the same MiniLM
and of its cached pool embeddings); ``reference_as_written_over_this`` divides by it. The plain
reference is the headline: it charges the reference only for its model work.

``--lm WIDTH LAYERS`` gives the tiny checkpoints a language model that wide and deep (head size
and vision tower unchanged; :func:`mmke.models.tiny.widen_lm`): at 32 wide and 2 layers a forward
pass takes milliseconds, and fixed per-case costs (the retrieval's sentence encoder, Python) are
as large as the model work.

The tiny checkpoints' context is raised to ``--max-positions`` tokens (RoPE families only: no
weight depends on it) so that IKE's k = 32 demonstrations fit, as on real checkpoints (BLIP-2's
OPT has learned positions: its 256 tokens stay, and IKE keeps fewer demonstrations there; with
``--lm`` it is built with the real OPT's 2,048).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

DEFAULT_METHODS = ["ft-lm", "ft-vision", "ike", "t-patcher", "grace"]


def save_checkpoint(family: str, out: Path, max_positions: int, lm: tuple[int, int] | None = None) -> Path:
    """A tiny ``family`` checkpoint in ``out`` with room for ``max_positions`` tokens (RoPE LMs),
    its LM ``lm=(width, layers)`` where given."""
    from mmke.models.tiny import save_tiny

    save_tiny(family, out, lm=lm)
    f = out / "config.json"
    cfg = json.loads(f.read_text())
    text = cfg.get("text_config", cfg)
    if text.get("model_type") != "opt" and "max_position_embeddings" in text:
        text["max_position_embeddings"] = max(int(text["max_position_embeddings"]), max_positions)
        f.write_text(json.dumps(cfg, indent=2))
    return out


def cold_load(model: str, device: str | None, dtype: str) -> tuple[float, float]:
    """(import seconds, load seconds) of loading ``model`` in a fresh one-thread process."""
    code = ("import time; t0 = time.perf_counter(); import torch, transformers; from mmke.registry import load_model; "
            "t1 = time.perf_counter(); load_model(%r, device=%r, dtype=%r); "
            "print('TIMES', t1 - t0, time.perf_counter() - t1)") % (model, device, dtype)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MMKE_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("TIMES")][-1]
    imp, load = map(float, line.split()[1:])
    return imp, load


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


@torch.no_grad()
def floor(adapter, examples) -> float:
    """Seconds of the forward passes alone, batched as evaluation batches them (each batch is
    prepared, untimed, just before it runs: editors may read the batch last prepared)."""
    total = 0.0
    with adapter.sharing_prefixes():
        for _, b in adapter.batches(examples):
            b = b.to(adapter.device)
            t = time.perf_counter()
            adapter.target_view(b)
            total += time.perf_counter() - t
    return total


@torch.no_grad()
def one_by_one(adapter, examples) -> float:
    """Seconds to score each input on its own (tokenised and run alone, nothing shared or kept)."""
    adapter.forget_prepared()
    t = time.perf_counter()
    for ex in examples:
        adapter.forget_prepared()
        adapter.target_view(adapter.prepare([ex]))
    return time.perf_counter() - t


def retrieval_setup_s(pool: list[str]) -> float:
    """Seconds to build the sentence encoder from its files and read the pool's stored embeddings,
    which EasyEdit's multimodal IKE does on every edit (mmke does both once per editor)."""
    from mmke.retrieval import _encoder, embed

    t = time.perf_counter()
    _encoder.__wrapped__()  # a fresh load, not the process-wide one
    embed(pool)  # from the embedding cache on disk
    return time.perf_counter() - t


def bench_method(adapter, model: str, method: str, cases: int, method_config: dict, repeats: int = 1) -> dict:
    """Medians over ``cases`` cases (after one warm-up) of one method on one loaded model; a case's
    evaluation and floor are each the fastest of ``repeats`` runs."""
    from mmke.editors.base import EditRequest
    from mmke.eval.runner import Run, RunConfig
    from mmke.scoring import INPUT_KINDS, case_inputs, case_metrics, run_case
    from mmke.tasks import TASKS

    with tempfile.TemporaryDirectory() as tmp:
        r = Run(RunConfig(model=model, method=method, limit=cases + 1, method_config=method_config), tmp,
                adapter=adapter)
        records, _ = r.load_records()
        editor = r.editor(adapter)
    rows: dict[str, list[float]] = {k: [] for k in ("pre_s", "edit_s", "eval_s", "floor_s", "reference_s",
                                                    "setup_s")}
    reference = method == "ike" and editor.config.image_first
    for i, rec in enumerate(records):
        x = case_inputs(rec, TASKS["vqa"], adapter.load_image)
        exs = [x[k] for k in INPUT_KINDS]
        with torch.no_grad():
            pre, pre_s = timed(lambda: run_case(adapter, x))
        h, edit_s = timed(lambda: editor.edit(EditRequest(x["reliability"], rec.to_dict())))
        with torch.no_grad():  # the fastest of `repeats` runs: what the code costs, not the machine's load
            eval_s = min(timed(lambda: case_metrics(pre, run_case(adapter, x)))[1] for _ in range(repeats))
        floor_s = min(floor(adapter, exs) for _ in range(repeats))
        # with the demonstrations (the fastest of `repeats`, as eval)
        ref_s = min(one_by_one(adapter, exs) for _ in range(repeats)) if reference else 0.0
        h.remove()
        if reference:  # EasyEdit's IKE also scores each input alone without them (its "pre")
            ref_s += edit_s + min(one_by_one(adapter, exs) for _ in range(repeats))
        setup_s = retrieval_setup_s(editor.pool) if reference else 0.0
        if i == 0:
            continue  # warm-up: one-time costs (the retrieval encoder, first-call allocations)
        for k, v in zip(rows, (pre_s, edit_s, eval_s, floor_s, ref_s, setup_s)):
            rows[k].append(v)
    per_case = [p + e + v for p, e, v in zip(rows["pre_s"], rows["edit_s"], rows["eval_s"])]
    out = {k: statistics.median(v) for k, v in rows.items() if k not in ("reference_s", "setup_s")}
    out.update(cases=len(per_case), per_case_s=statistics.median(per_case),
               eval_over_floor=statistics.median(e / f for e, f in zip(rows["eval_s"], rows["floor_s"])))
    if reference:
        out["reference_rows"] = {"per_case_s": statistics.median(rows["reference_s"]),
                                 "as_written_per_case_s": statistics.median(
                                     r + s for r, s in zip(rows["reference_s"], rows["setup_s"]))}
    return out


def main() -> None:
    from mmke.io import atomic_write_json
    from mmke.models.tiny import TINY_FAMILIES
    from mmke.registry import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=3, help="timed cases per method (after one warm-up)")
    ap.add_argument("--families", nargs="+", default=list(TINY_FAMILIES), choices=[*TINY_FAMILIES, "default"],
                    help="tiny hf: families (default: all), and/or `default` (the bundled model)")
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    ap.add_argument("--repeats", type=int, default=3, help="a case's evaluation and floor are each the fastest "
                                                           "of this many runs (milliseconds on the tiny checkpoints)")
    ap.add_argument("--max-positions", type=int, default=4096)
    ap.add_argument("--lm", type=int, nargs=2, metavar=("WIDTH", "LAYERS"), default=None,
                    help="the tiny checkpoints' language model this wide and deep (default: 32 wide, 2 layers), "
                         "e.g. --lm 512 8: where the LM's forward pass, not fixed per-case costs, dominates")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: comparable, and fair "
                                                           "to a shared machine)")
    ap.add_argument("--device", default=None, help="run the models on this device (e.g. cuda)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--out", type=Path, default=Path("runs/bench/bench_families.json"),
                    help="where the measured numbers go (default: under runs/, outside the tracked tree)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            model = "default" if family == "default" else \
                f"hf:{save_checkpoint(family, Path(tmp) / family, args.max_positions, args.lm)}"
            load = lambda: load_model(model, device=args.device, dtype=args.dtype)  # noqa: E731
            cold_import, cold = cold_load(model, args.device, args.dtype)
            adapter, _ = timed(load)
            load_s = statistics.median(timed(load)[1] for _ in range(3))
            print(f"{family}: load {load_s:.3f}s; in a fresh process {cold:.3f}s after {cold_import:.3f}s of "
                  "imports", flush=True)
            plan = [(m, m, {}) for m in args.methods]
            if "ike" in args.methods and "ike-prefix" not in args.methods:  # mmke's layout beside it
                plan.insert(args.methods.index("ike") + 1, ("ike-prefix", "ike-prefix", {}))
            for label, method, mcfg in plan:
                row = {"family": family, "method": label, "load_s": load_s, "cold_load_s": cold,
                       "cold_import_s": cold_import}
                try:
                    row.update(bench_method(adapter, model, method, args.cases, mcfg, args.repeats))
                except Exception as e:  # a method this family or setup cannot run: say why, go on
                    row["error"] = f"{type(e).__name__}: {e}"
                    print(f"  {label:<12} skipped: {row['error'][:160]}", flush=True)
                    rows.append(row)
                    continue
                ref = row.pop("reference_rows", None)
                rows.append(row)
                print(f"  {label:<12} edit {row['edit_s']:.4f}s  pre {row['pre_s']:.4f}s  eval {row['eval_s']:.4f}s  "
                      f"floor {row['floor_s']:.4f}s  eval/floor {row['eval_over_floor']:.2f}x  "
                      f"per case {row['per_case_s']:.4f}s", flush=True)
                if ref is not None:
                    for name, key in (("ike-reference-cost", "per_case_s"),
                                      ("ike-reference-as-written", "as_written_per_case_s")):
                        rows.append({"family": family, "method": name, "cases": row["cases"], "per_case_s": ref[key]})
                        print(f"  {name:<12} per case {ref[key]:.4f}s", flush=True)
            # IKE ratios against the reference cost, both layouts, per family
            by = {r["method"]: r for r in rows if r["family"] == family and "per_case_s" in r}
            for ref, col in (("ike-reference-cost", "reference_over_this"),
                             ("ike-reference-as-written", "reference_as_written_over_this")):
                for label in ("ike", "ike-prefix"):
                    if ref in by and label in by:
                        by[label][col] = by[ref]["per_case_s"] / by[label]["per_case_s"]
                        print(f"  {ref} / {label}: {by[label][col]:.2f}x", flush=True)
            del adapter
    import transformers

    atomic_write_json(args.out, {
        "date": date.today().isoformat(), "command": "benchmarks/bench_families.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items() if v is not None and k != "out"),
        "machine": f"{platform.machine()}, {args.threads} thread(s), device {args.device or 'cpu'}, {args.dtype}",
        "torch": torch.__version__, "transformers": transformers.__version__, "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
