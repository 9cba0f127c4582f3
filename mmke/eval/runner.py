"""One-step evaluation: pre-edit outputs first, then per case edit -> evaluate -> restore.

Composes a model adapter, an editor and MMEdit records; none of them imports this module.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import statistics
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from mmke.editors.base import EditRequest
from mmke.eval.metrics import (EDIT_METRICS, LOCALITY_METRICS, METRICS, agreement, exact_match,
                               token_accuracy, topk_agreement)
from mmke.eval.protocol import INPUT_KINDS, case_inputs
from mmke.eval.store import CaseStore
from mmke.progress import progress
from mmke.registry import HF_PREFIX, MODELS, editor_class, load_model
from mmke.tasks import TASKS

log = logging.getLogger(__name__)


class RunConfig(BaseModel):
    """Everything that determines a run's numbers (written to summary.json as ``config``)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = "default"
    task: Literal["vqa", "caption"] = "vqa"
    method: str = "ft-lm"
    data: str | None = None  # MMEdit eval file; default: the bundled benchmark's
    train_data: str | None = None  # MMEdit train file (IKE demonstrations); default: bundled
    image_root: str | None = None
    rephrase_image_root: str | None = None
    limit: int | None = None
    seed: int = 0
    skip_invalid: bool = False
    m_locality: Literal["top1", "reference-top10"] = "top1"
    method_config: dict[str, Any] = Field(default_factory=dict)
    eval_batch: int = 32  # cases per pre-edit batch


def _fingerprint(record) -> str:
    raw = json.dumps(record.to_dict(), sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def resolve_data(cfg: RunConfig) -> RunConfig:
    """Fill in the bundled benchmark's files when no data file is given (building it if needed)."""
    if cfg.data is not None:
        if cfg.train_data is None:  # MMEdit / mmke layout: <task>_eval.json beside <task>_train.json
            data = Path(cfg.data)
            sibling = data.with_name(data.name.replace("_eval", "_train").replace("eval", "train"))
            if sibling != data and sibling.exists():
                log.info("using %s as the train split (retrieval pools); --train-data overrides", sibling)
                return cfg.model_copy(update={"train_data": str(sibling)})
        return cfg
    from mmke.data.bundled import default_benchmark_dir, ensure_benchmark

    bench = ensure_benchmark(default_benchmark_dir())
    eval_f, train_f = TASKS[cfg.task].files()
    return cfg.model_copy(update={"data": str(bench / eval_f), "train_data": str(bench / train_f),
                                  "image_root": str(bench), "rephrase_image_root": None})


class Run:
    """A resumable one-step run writing ``cases.jsonl`` and ``summary.json`` under ``out``."""

    def __init__(self, cfg: RunConfig, out: str | Path, adapter=None) -> None:
        # validate names and method options first, and record the method's full option set
        method_cfg = editor_class(cfg.method).Config(**cfg.method_config)
        if not cfg.model.startswith(HF_PREFIX) and cfg.model not in MODELS:
            raise KeyError(f"unknown model {cfg.model!r}; known: {', '.join(MODELS)} or hf:<path-or-hub-id>")
        cfg = cfg.model_copy(update={"method_config": method_cfg.model_dump()})
        self.cfg = resolve_data(cfg)
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self._check_config()
        self._adapter = adapter

    def _check_config(self) -> None:
        f = self.out / "config.json"
        mine = self.cfg.model_dump()
        if f.exists():
            old = json.loads(f.read_text())
            if old != mine:
                diff = sorted(k for k in set(old) | set(mine) if old.get(k) != mine.get(k))
                raise ValueError(f"{self.out} holds a run with a different configuration (differs in: "
                                 f"{', '.join(diff)}); use another --out or delete the directory")
        else:
            f.write_text(json.dumps(mine, indent=1))

    # ---- pieces ----------------------------------------------------------------------
    def load_records(self):
        from mmke.data.schema import load_records

        res = load_records(self.cfg.data, self.cfg.image_root, self.cfg.rephrase_image_root,
                           skip_invalid=self.cfg.skip_invalid)
        order = list(range(len(res.records)))
        random.Random(self.cfg.seed).shuffle(order)
        if self.cfg.limit is not None:
            order = order[: self.cfg.limit]
        return [res.records[i] for i in sorted(order)], res.skipped

    def adapter(self):
        if self._adapter is None:
            self._adapter = load_model(self.cfg.model)
        return self._adapter

    def editor(self, adapter):
        cls = editor_class(self.cfg.method)
        config = cls.Config(**self.cfg.method_config)
        context: dict[str, Any] = {"task": TASKS[self.cfg.task], "model_name": self.cfg.model}
        if self.cfg.train_data:
            from mmke.data.schema import load_records

            context["train_records"] = load_records(
                self.cfg.train_data, self.cfg.image_root, self.cfg.rephrase_image_root,
                skip_invalid=True, check_images=False).records
        return cls(adapter, config, **context)

    # ---- the protocol ----------------------------------------------------------------
    @torch.no_grad()
    def pre_edit(self, adapter, cases: list[tuple[str, dict]]) -> dict[str, dict[str, Any]]:
        """Unedited outputs of every pending case, computed before any edit."""
        pre: dict[str, dict[str, Any]] = {}
        k = 10 if self.cfg.m_locality == "reference-top10" else 1
        B = self.cfg.eval_batch
        with progress() as bar:
            task = bar.add_task("pre-edit outputs", total=len(cases))
            for s in range(0, len(cases), B):
                chunk = cases[s:s + B]
                exs = [inp[kind] for _, inp in chunk for kind in INPUT_KINDS]
                v = adapter.run(exs)
                acc, em = token_accuracy(v), exact_match(v)
                top1 = v.logits.argmax(-1)
                topk = v.logits.topk(k, -1).indices
                for j, (key, _) in enumerate(chunk):
                    row = {}
                    for n, kind in enumerate(INPUT_KINDS):
                        i = j * len(INPUT_KINDS) + n
                        n_tok = int(v.mask[i].sum())  # targets are left-aligned: keep their span only
                        row[kind] = {"acc": acc[i].item(), "em": em[i].item(),
                                     "top1": top1[i, :n_tok].cpu(), "topk": topk[i, :n_tok].cpu()}
                    pre[key] = row
                bar.update(task, advance=len(chunk))
        return pre

    def score(self, adapter, inputs: dict, pre: dict) -> tuple[dict, dict]:
        """Post-edit metrics of one case: one batched forward over the five inputs."""
        v = adapter.run([inputs[kind] for kind in INPUT_KINDS])
        acc, em = token_accuracy(v), exact_match(v)
        top1 = v.logits.argmax(-1)
        m, e = {}, {}
        for i, kind in enumerate(INPUT_KINDS):
            if kind in EDIT_METRICS:
                m[kind], e[kind] = acc[i].item(), em[i].item()
                continue
            p = pre[kind]
            L = p["top1"].shape[0]
            mask = torch.ones(1, L, dtype=torch.bool, device=top1.device)
            if kind == "m_locality" and self.cfg.m_locality == "reference-top10":
                post_k = v.logits[i, :L].topk(p["topk"].shape[-1], -1).indices
                a, x = topk_agreement(p["topk"][None].to(top1.device), post_k[None], mask)
            else:
                a, x = agreement(p["top1"][None].to(top1.device), top1[i, :L][None], mask)
            m[kind], e[kind] = a.item(), x.item()
        return m, e

    def execute(self) -> dict[str, Any]:
        t0 = time.time()
        records, skipped = self.load_records()
        if not records:
            raise ValueError(f"{self.cfg.data}: no valid records to evaluate")
        store = CaseStore(self.out / "cases.jsonl")
        adapter = self.adapter()
        editor = self.editor(adapter)
        task = TASKS[self.cfg.task]
        ref = self.cfg.m_locality == "reference-top10"
        keyed = [(f"{r.index}-{_fingerprint(r)}", r) for r in records]
        pending = [(k, r) for k, r in keyed if k not in store]
        if len(store):
            log.info("resuming: %d of %d cases already done", len(keyed) - len(pending), len(keyed))
        inputs = {k: case_inputs(r, task, adapter.load_image, ref) for k, r in pending}
        pre = self.pre_edit(adapter, [(k, inputs[k]) for k, _ in pending])
        with progress() as bar:
            ptask = bar.add_task(f"{self.cfg.method} one-step edits", total=len(keyed),
                                 completed=len(keyed) - len(pending))
            for key, rec in pending:
                torch.manual_seed(self.cfg.seed)
                ts = time.perf_counter()
                handle = editor.edit(EditRequest(inputs[key]["reliability"], rec.to_dict()))
                te = time.perf_counter()
                with torch.no_grad():
                    post, post_em = self.score(adapter, inputs[key], pre[key])
                tv = time.perf_counter()
                handle.remove()
                store.add({"key": key, "index": rec.index, "metrics": post, "metrics_exact_match": post_em,
                           "pre_edit": {k: pre[key][k]["acc"] for k in EDIT_METRICS},
                           "edit_s": te - ts, "eval_s": tv - te, "edit_meta": handle.meta})
                bar.update(ptask, advance=1)
        return self.summarise(store, {k for k, _ in keyed}, len(skipped), time.time() - t0)

    def summarise(self, store: CaseStore, keys: set[str], n_skipped: int, elapsed: float) -> dict[str, Any]:
        rows = [r for r in store.rows() if r["key"] in keys]  # only this run's cases
        mean = lambda key, kind: statistics.fmean(r[key][kind] for r in rows)  # noqa: E731
        summary = {
            "model": self.cfg.model, "task": self.cfg.task, "method": self.cfg.method,
            "setting": "one-step", "n_cases": len(rows), "n_skipped": n_skipped, "seed": self.cfg.seed,
            "metrics": {k: mean("metrics", k) for k in METRICS},
            "metrics_exact_match": {k: mean("metrics_exact_match", k) for k in METRICS},
            "pre_edit_metrics": {k: mean("pre_edit", k) for k in EDIT_METRICS},
            "timing": {"edit_s_median": statistics.median(r["edit_s"] for r in rows),
                       "eval_s_median": statistics.median(r["eval_s"] for r in rows),
                       "total_s": elapsed},  # wall time of the invocation that finished the run
            "protocol": ("teacher-forced; edit metrics = token accuracy (exact match in metrics_exact_match); "
                         f"locality = {'top-10 rank-by-rank (reference) for M-Loc, ' if self.cfg.m_locality != 'top1' else ''}"
                         "top-1 agreement with pre-edit outputs at the target positions; "
                         "pre-edit outputs computed before any edit; model restored after each edit"),
            "config": self.cfg.model_dump(),
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary


def run(cfg: RunConfig, out: str | Path) -> dict[str, Any]:
    """Run (or resume) one configuration and return its summary."""
    return Run(cfg, out).execute()


__all__ = ["RunConfig", "Run", "run", "LOCALITY_METRICS"]
