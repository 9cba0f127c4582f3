"""Train an editor's learned module (MEND, KE, SERAC, UniKE encoders) on a task's train split.

One recipe for every trainable method: the method says what one case costs
(:meth:`~mmke.editors.trained.TrainedEditor.train_loss`: for hyper-network editors the MMEdit
objective, an edit loss on the rephrased inputs plus a KL locality loss on unrelated inputs); this
loop batches cases, steps Adam, checkpoints (resumable: a re-run continues where it stopped),
validates on a held-out slice with the evaluation protocol's metrics, and writes
``weights.safetensors``, ``weights.json``, ``train_log.jsonl`` and ``CARD.md`` into the output
directory.

Training cases are the train split's records; with ``counterfactual`` > 0 that fraction of them
gets a wrong answer as the target (another answer given to the same question elsewhere in the
split), because the model already knows most train-split facts and an editor that only ever sees
known targets learns to do nothing.
"""

from __future__ import annotations

import json
import logging
import platform
import random
import statistics
import time
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from pydantic import BaseModel, ConfigDict

from mmke.editors.base import EditRequest
from mmke.editors.trained import META_FILE, TrainedEditor, save_weights
from mmke.data.bundled import benchmark_of
from mmke.io import atomic_torch_save, atomic_write_json, atomic_write_text, file_digest
from mmke.paths import cache_dir
from mmke.models.base import Example, ModelAdapter
from mmke.models.placement import placement_record
from mmke.progress import progress
from mmke.scoring import INPUT_KINDS, case_inputs, case_metrics, run_case
from mmke.tasks import TaskSpec

log = logging.getLogger(__name__)


class EditorTrainConfig(BaseModel):
    """Options of the shared training loop (method options go to the editor's own config)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = 300  # optimiser steps
    batch_size: int = 4  # edit cases per step
    lr: float = 1e-3
    val_size: int = 24  # held-out train cases scored with the evaluation protocol
    val_every: int = 100
    ckpt_every: int = 25
    counterfactual: float = 0.5  # fraction of cases with a wrong answer as the target
    seed: int = 0
    max_train_records: int | None = None


@dataclass
class TrainCase:
    """One training case: the record (target possibly counterfactual) and its five inputs."""

    record: Any  # EditRecord
    inputs: dict[str, Example]

    @property
    def request(self) -> EditRequest:
        return EditRequest(self.inputs["reliability"], self.record.to_dict())


def counterfactual_records(records: list, fraction: float, seed: int) -> list:
    """A copy of ``records`` where ``fraction`` of them carry another answer given to the same
    question (prompt) elsewhere in the split, or any other answer if there is none."""
    rng = random.Random(seed)
    by_src: dict[str, set[str]] = {}
    for r in records:
        by_src.setdefault(r.src, set()).add(r.alt)
    all_alts = sorted({r.alt for r in records})
    out = []
    for r in records:
        if rng.random() < fraction:
            pool = sorted(by_src[r.src] - {r.alt}) or [a for a in all_alts if a != r.alt]
            if pool:
                r = replace(r, alt=rng.choice(pool), pred=r.alt)
        out.append(r)
    return out


def make_cases(records: list, task: TaskSpec, adapter: ModelAdapter) -> list[TrainCase]:
    """The cases of ``records``, every image decoded now (a few records: tests, one batch)."""
    return [TrainCase(r, case_inputs(r, task, adapter.load_image)) for r in records]


def iter_cases(records: Iterable, task: TaskSpec, adapter: ModelAdapter) -> Iterator[TrainCase]:
    """The cases of ``records`` one at a time, each one's images decoded when it is reached and
    let go after (a validation slice or a batch is never held decoded)."""
    for r in records:
        yield TrainCase(r, case_inputs(r, task, adapter.load_image))


@torch.no_grad()
def validate(editor: TrainedEditor, cases: Iterable[TrainCase]) -> dict[str, float]:
    """The evaluation protocol on held-out train cases: edit, score the five inputs, restore."""
    scores: dict[str, list[float]] = {k: [] for k in INPUT_KINDS}
    for c in cases:
        pre = run_case(editor.adapter, c.inputs)
        handle = editor.edit(c.request)
        post = run_case(editor.adapter, c.inputs)
        handle.remove()
        for k, v in case_metrics(pre, post)[0].items():
            scores[k].append(v)
    return {k: statistics.fmean(v) for k, v in scores.items()}


def _checkpoint(ck: Path, editor: TrainedEditor, opt, step: int) -> None:
    atomic_torch_save({"module": editor.module.state_dict(), "opt": opt.state_dict(), "step": step}, ck / "last.pt")


def train_editor(editor: TrainedEditor, train_records: list, out: str | Path,
                 cfg: EditorTrainConfig, *, command: str = "") -> dict[str, Any]:
    """Train ``editor.module`` (built with ``untrained=True``) and write the weights directory.

    Resumes from ``out/checkpoints/last.pt`` (a plain tensor checkpoint, loaded with
    ``weights_only=True``) when it exists.
    """
    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ck = out / "checkpoints"
    log_f = out / "train_log.jsonl"
    adapter, task = editor.adapter, editor.task
    records = list(train_records)
    random.Random(cfg.seed).shuffle(records)
    if cfg.max_train_records:
        records = records[: cfg.max_train_records]
    if len(records) <= cfg.val_size:
        raise ValueError(f"need more than {cfg.val_size} train records, got {len(records)}")
    records = counterfactual_records(records, cfg.counterfactual, cfg.seed)
    val_records = records[: cfg.val_size]  # decoded case by case at each validation
    pool = records[cfg.val_size:]

    editor.module.train()
    params = [p for p in editor.module.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    start = 0
    if (ck / "last.pt").exists():
        st = torch.load(ck / "last.pt", weights_only=True)
        editor.module.load_state_dict(st["module"])
        opt.load_state_dict(st["opt"])
        start = int(st["step"])
        log.info("resuming %s training at step %d of %d", editor.name, start, cfg.steps)
    elif log_f.exists():
        log_f.unlink()  # a fresh run: no stale log lines
    torch.manual_seed(cfg.seed)
    val: dict[str, float] = {}
    recent: list[float] = []
    with progress() as bar:
        ptask = bar.add_task(f"training {editor.name}", total=cfg.steps, completed=start)
        for step in range(start, cfg.steps):
            # the batch of a step depends only on (seed, step): a resumed run sees the same data
            batch = random.Random(cfg.seed * 1_000_003 + step).sample(pool, min(cfg.batch_size, len(pool)))
            opt.zero_grad()
            parts: dict[str, float] = {}
            total = 0.0
            for c in iter_cases(batch, task, adapter):
                loss, logs = editor.train_loss(c)
                (loss / len(batch)).backward()
                total += loss.item() / len(batch)
                for k, v in logs.items():
                    parts[k] = parts.get(k, 0.0) + v / len(batch)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            recent.append(total)
            bar.update(ptask, advance=1, description=f"training {editor.name} loss={total:.3f}")
            done = step + 1
            row: dict[str, Any] = {"step": done, "loss": total, **parts, "elapsed_s": round(time.time() - t0, 1)}
            if done % cfg.val_every == 0 or done == cfg.steps:
                editor.module.eval()
                val = validate(editor, iter_cases(val_records, task, adapter))
                editor.module.train()
                row["val"] = val
                log.info("step %d: val %s", done, {k: round(v, 3) for k, v in val.items()})
            if done % cfg.ckpt_every == 0 or done == cfg.steps or "val" in row:
                _checkpoint(ck, editor, opt, done)
            with open(log_f, "a") as f:
                f.write(json.dumps(row) + "\n")
    editor.module.eval()
    for p in params:
        p.requires_grad_(False)
    if not val:  # resumed after the last step: validate once for the card
        val = validate(editor, iter_cases(val_records, task, adapter))
    wall = time.time() - t0
    meta = {
        "method": editor.name, "task": task.name, "model": editor.model_name,
        "architecture": editor.architecture(), "train_config": cfg.model_dump(),
        "n_train_records": len(pool), "validation": val, "command": command,
        "train_wall_s_this_invocation": round(wall, 1),
        "train_wall_s_total": _total_wall(log_f),
        "hardware": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"
                    if adapter.device.type == "cpu" else f"{adapter.device}, torch {torch.__version__}",
        "date": date.today().isoformat(),
    }
    save_weights(out, editor.module, meta)
    write_editor_card(out, meta)
    return meta


def _total_wall(log_f: Path) -> float:
    """Training wall time over every invocation (resumes included), from the log."""
    total, last = 0.0, 0.0
    for line in log_f.read_text().splitlines() if log_f.exists() else []:
        e = json.loads(line)["elapsed_s"]
        if e < last:  # a new invocation started its clock again
            total += last
        last = e
    return round(total + last, 1)


def write_editor_card(out: Path, meta: dict[str, Any]) -> Path:
    """CARD.md from the measured metadata (never typed in)."""
    val = meta["validation"]
    arch = "\n".join(f"- `{k}` = `{json.dumps(v)}`" for k, v in meta["architecture"].items())
    tc = meta["train_config"]
    text = f"""# {meta['method']} for `{meta['model']}` on the `{meta['task']}` task

Trained editor weights (`weights.safetensors`; metadata in `weights.json`, loss and validation per
step in `train_log.jsonl`).

**Reproduce**
```bash
{meta['command']}
```

**Training**: {tc['steps']} steps of {tc['batch_size']} edit cases (Adam, lr {tc['lr']}, seed
{tc['seed']}) on {meta['n_train_records']} train-split records, {int(100 * tc['counterfactual'])}%
with a counterfactual target. Wall time {meta['train_wall_s_total']:.0f} s on {meta['hardware']}
({meta['date']}).

**Validation** ({tc['val_size']} held-out train-split cases, one-step protocol, token accuracy /
top-1 agreement, percent):

| Rel | T-Gen | M-Gen | T-Loc | M-Loc |
|---|---|---|---|---|
| {' | '.join(f"{100 * val[k]:.1f}" for k in INPUT_KINDS)} |

**Architecture options**
{arch}
"""
    return atomic_write_text(out / "CARD.md", text)


def train_method(method: str, task: str, model: str = "default", out: str | Path | None = None,
                 cfg: EditorTrainConfig | None = None, method_config: dict[str, Any] | None = None,
                 train_data: str | None = None, image_root: str | None = None,
                 adapter: ModelAdapter | None = None, replace_bundled: bool = False, *,
                 device: str | None = None, dtype: str = "fp32", device_map: str | None = None) -> dict[str, Any]:
    """``mmke train --method M``: build the editor untrained on the model, train it on the task's
    train split (the bundled one by default) and write its weights directory: ``out``, or a user
    directory under the mmke cache (:func:`default_train_dir`); the weights shipped with mmke are
    replaced only with ``replace_bundled``. ``device`` / ``dtype`` / ``device_map`` place the model
    (:func:`mmke.registry.load_model`); the editor's own module trains in fp32 either way."""
    from mmke.data.schema import load_records
    from mmke.editors.trained import bundled_weights_dir
    from mmke.registry import editor_class, load_model
    from mmke.tasks import TASKS

    cfg = cfg or EditorTrainConfig()
    if task not in TASKS:
        raise KeyError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    cls = editor_class(method)
    if not issubclass(cls, TrainedEditor):
        raise ValueError(f"{method} has nothing to train (trainable: MEND, KE, SERAC, UniKE)")
    if cls.weights_of is not None and cls.weights_of != method:
        raise ValueError(f"{method} uses {cls.weights_of}'s trained module: train {cls.weights_of} "
                         f"(`mmke train --method {cls.weights_of}`) and pass its directory with --set weights=DIR")
    config = cls.Config(**(method_config or {}))
    if replace_bundled:
        if model != "default" or out is not None:
            raise ValueError("--replace-bundled rewrites the weights shipped for the default model: use it "
                             "with --model default and without --out")
        out = bundled_weights_dir(method, task)
    elif out is None:
        out = default_train_dir(method, task, model)
    log.info("training %s for %s on %s: writing to %s", method, model, task, out)
    if train_data is None:
        from mmke.data.bundled import default_benchmark_dir, ensure_benchmark

        bench = ensure_benchmark(default_benchmark_dir())
        train_data, image_root = str(bench / TASKS[task].files()[1]), str(bench)
    records = load_records(train_data, image_root or str(Path(train_data).parent), None,
                           skip_invalid=True).records
    adapter = adapter or load_model(model, device=device, dtype=dtype, device_map=device_map)
    editor = cls(adapter, config, task=TASKS[task], train_records=records, untrained=True, model_name=model)
    sets = " ".join(f"--set {k}={json.dumps(v)}" for k, v in (method_config or {}).items())
    defaults = EditorTrainConfig().model_dump()
    opts = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in cfg.model_dump().items() if v != defaults[k])
    where = "--replace-bundled" if replace_bundled else f"--out {out}"
    place = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in (("device", device), ("dtype", dtype),
                                                                  ("device_map", device_map))
                     if v is not None and not (k == "dtype" and v == "fp32"))
    command = " ".join(x for x in (f"mmke train --method {method} --task {task} --model {model}", opts, sets,
                                   place, where) if x)
    meta = editor.fit(records, out, cfg, command=command)
    # what the editor was trained on: the leak test checks bundled weights against the eval files
    meta["train_data"] = {"file": Path(train_data).name, "digest": file_digest(train_data),
                          "benchmark": benchmark_of(train_data)}
    meta["model_placement"] = placement_record(adapter.model)  # the model's devices and dtype in training
    atomic_write_json(Path(out) / META_FILE, meta, sort_keys=True)
    return meta


def default_train_dir(method: str, task: str, model: str) -> Path:
    """Where ``mmke train`` writes without ``--out``: a user directory under the mmke cache, never
    the weights shipped with the package."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model)
    return cache_dir() / "trained" / safe / f"{method}-{task}"
