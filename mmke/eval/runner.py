"""One-step evaluation: pre-edit outputs first, then per case edit -> evaluate -> restore.

Composes a model adapter, an editor and MMEdit records; none of them imports this module.

A run directory holds ``run.json`` (the resolved configuration and the provenance of its inputs:
library versions, model digest, editor-weights digest, data digests and benchmark hash),
``cases.jsonl`` (one durable line per finished case) and ``summary.json``. Everything is validated
and loaded before the directory is created or touched, so a failed start leaves nothing behind; a
re-run with the same command resumes, and one whose inputs changed (another model, other editor
weights, other data, other library versions) is refused with a message that says what changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import random
import statistics
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from mmke.data.bundled import benchmark_of
from mmke.data.schema import is_hard_m_loc
from mmke.editors.base import EditRequest
from mmke.eval.stats import bootstrap_ci
from mmke.eval.store import CaseStore
from mmke.io import atomic_write_json, file_digest
from mmke.models.base import state_digest
from mmke.progress import progress
from mmke.registry import HF_PREFIX, MODELS, editor_class, load_model
from mmke.scoring import (EDIT_METRICS, HARD_M_LOCALITY, METRICS, CaseOutputs, case_inputs, case_metrics,
                          run_case)
from mmke.tasks import TASKS

log = logging.getLogger(__name__)
RUN_FILE = "run.json"


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
    limit: int | None = Field(None, ge=1)
    seed: int = 0
    skip_invalid: bool = False
    m_locality: Literal["top1", "reference-top10"] = "top1"
    method_config: dict[str, Any] = Field(default_factory=dict)


def _fingerprint(record) -> str:
    raw = json.dumps(record.to_dict(), sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("mmke", "torch", "transformers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


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
        method_cfg = editor_class(cfg.method).Config.from_options(cfg.method, cfg.method_config)
        if not cfg.model.startswith(HF_PREFIX) and cfg.model not in MODELS:
            raise KeyError(f"unknown model {cfg.model!r}; known: {', '.join(MODELS)} or hf:<path-or-hub-id>")
        cfg = cfg.model_copy(update={"method_config": method_cfg.model_dump()})
        self.cfg = resolve_data(cfg)
        self.out = Path(out)
        self._adapter = adapter

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
        if self.cfg.train_data and cls.uses_train_records(config):
            from mmke.data.schema import load_records

            context["train_records"] = load_records(
                self.cfg.train_data, self.cfg.image_root, self.cfg.rephrase_image_root,
                skip_invalid=True, check_images=False).records
        return cls(adapter, config, **context)

    def provenance(self, adapter, editor) -> dict[str, Any]:
        """What the numbers depend on besides the configuration (checked on resume)."""
        return {"versions": library_versions(), "model_digest": state_digest(adapter.model)[:16],
                "editor_weights_digest": editor.weights_digest(),
                "data_digest": file_digest(self.cfg.data), "train_data_digest": file_digest(self.cfg.train_data),
                "benchmark": benchmark_of(self.cfg.data)}

    def open(self, provenance: dict[str, Any]) -> CaseStore:
        """Create the run directory, or check that an existing one holds this very run."""
        f = self.out / RUN_FILE
        mine = {"config": self.cfg.model_dump(), "provenance": provenance}
        if f.exists():
            old = json.loads(f.read_text())
            check_same_run(self.out, old, mine)
        elif self.out.exists() and (self.out / "cases.jsonl").exists():
            raise ValueError(f"{self.out} holds results without {RUN_FILE} (an older mmke, or not a run); "
                             "use another --out or delete the directory")
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(f, mine)
        return CaseStore(self.out / "cases.jsonl")

    # ---- the protocol ----------------------------------------------------------------
    def inputs(self, adapter, record) -> dict:
        return case_inputs(record, TASKS[self.cfg.task], adapter.load_image, self.cfg.m_locality != "top1")

    @property
    def topk(self) -> int:
        return 10 if self.cfg.m_locality == "reference-top10" else 1

    def pre_edit(self, adapter, pending: list[tuple[str, Any]]) -> dict[str, CaseOutputs]:
        """Unedited outputs of every pending case, computed before any edit, one case per batch
        (exactly as post-edit outputs are computed)."""
        pre: dict[str, CaseOutputs] = {}
        with progress() as bar:
            task = bar.add_task("pre-edit outputs", total=len(pending))
            for key, rec in pending:
                pre[key] = run_case(adapter, self.inputs(adapter, rec), self.topk)
                bar.update(task, advance=1)
        return pre

    def execute(self) -> dict[str, Any]:
        t0 = time.time()
        records, skipped = self.load_records()
        if not records:
            raise ValueError(f"{self.cfg.data}: no valid records to evaluate")
        adapter = self.adapter()
        editor = self.editor(adapter)
        store = self.open(self.provenance(adapter, editor))
        keyed = [(f"{r.index}-{_fingerprint(r)}", r) for r in records]
        pending = [(k, r) for k, r in keyed if k not in store]
        if len(store):
            log.info("resuming: %d of %d cases already done", len(keyed) - len(pending), len(keyed))
        pre = self.pre_edit(adapter, pending)
        ref = self.cfg.m_locality != "top1"
        with progress() as bar:
            ptask = bar.add_task(f"{self.cfg.method} one-step edits", total=len(keyed),
                                 completed=len(keyed) - len(pending))
            for key, rec in pending:
                x = self.inputs(adapter, rec)
                torch.manual_seed(self.cfg.seed)
                ts = time.perf_counter()
                handle = editor.edit(EditRequest(x["reliability"], rec.to_dict()))
                te = time.perf_counter()
                post = run_case(adapter, x, self.topk)
                tv = time.perf_counter()
                handle.remove()
                m, e = case_metrics(pre[key], post, ref)
                store.add({"key": key, "index": rec.index, "metrics": m, "metrics_exact_match": e,
                           "m_loc_hard": is_hard_m_loc(rec),
                           "pre_edit": {k: pre[key][k].acc for k in EDIT_METRICS},
                           "edit_s": te - ts, "eval_s": tv - te, "edit_meta": handle.meta})
                bar.update(ptask, advance=1)
        return self.summarise(store, {k for k, _ in keyed}, len(skipped), time.time() - t0)

    def summarise(self, store: CaseStore, keys: set[str], n_skipped: int, elapsed: float) -> dict[str, Any]:
        rows = [r for r in store.rows() if r["key"] in keys]  # only this run's cases
        run = json.loads((self.out / RUN_FILE).read_text())
        summary = {
            "model": self.cfg.model, "task": self.cfg.task, "method": self.cfg.method,
            "setting": "one-step", "n_cases": len(rows), "n_skipped": n_skipped, "seed": self.cfg.seed,
            **aggregate(rows, seed=self.cfg.seed),
            "pre_edit_metrics": {k: statistics.fmean(r["pre_edit"][k] for r in rows) for k in EDIT_METRICS},
            "timing": {"edit_s_median": statistics.median(r["edit_s"] for r in rows),
                       "eval_s_median": statistics.median(r["eval_s"] for r in rows),
                       "total_s": elapsed},  # wall time of the invocation that finished the run
            "protocol": ("teacher-forced; edit metrics = token accuracy (exact match in metrics_exact_match); "
                         f"locality = {'top-10 rank-by-rank (reference) for M-Loc, ' if self.cfg.m_locality != 'top1' else ''}"
                         "top-1 agreement with pre-edit outputs at the target positions; "
                         f"{HARD_M_LOCALITY} = M-Loc over the cases whose unrelated-image question is the "
                         "edit's own; pre-edit outputs computed before any edit, one case per batch as "
                         "post-edit; model restored after each edit; intervals: 95% percentile bootstrap "
                         "over cases"),
            "config": self.cfg.model_dump(),
            "provenance": run["provenance"],
        }
        atomic_write_json(self.out / "summary.json", summary)
        return summary


def aggregate(rows: list[dict[str, Any]], seed: int = 0) -> dict[str, Any]:
    """Means over cases and their 95% bootstrap intervals: ``metrics`` and
    ``metrics_exact_match`` (the five metrics, plus the hard M-Locality sub-metric when a case has
    one), ``mean`` (of the five metrics) and ``intervals`` (lo/hi for each of them)."""
    out: dict[str, Any] = {}
    intervals: dict[str, Any] = {}
    hard = [r for r in rows if r.get("m_loc_hard")]
    for key in ("metrics", "metrics_exact_match"):
        per_kind = {k: [r[key][k] for r in rows] for k in METRICS}
        if hard:
            per_kind[HARD_M_LOCALITY] = [r[key]["m_locality"] for r in hard]
        per_kind["mean"] = [statistics.fmean(r[key][k] for k in METRICS) for r in rows]
        ivs = {k: bootstrap_ci(v, seed=seed) for k, v in per_kind.items()}
        out[key] = {k: iv.mean for k, iv in ivs.items() if k != "mean"}
        out["mean" if key == "metrics" else "mean_exact_match"] = ivs["mean"].mean
        intervals[key] = {k: [iv.lo, iv.hi] for k, iv in ivs.items()}
    out["n_hard_m_locality"] = len(hard)
    out["intervals"] = intervals
    return out


_PROVENANCE_WORDS = {"versions": "library versions", "model_digest": "the model's weights",
                     "editor_weights_digest": "the editor's trained weights", "data_digest": "the data file",
                     "train_data_digest": "the train file", "benchmark": "the benchmark build"}


def check_same_run(out: Path, old: dict[str, Any], mine: dict[str, Any]) -> None:
    """Raise a ValueError saying what differs when ``out`` holds another run. Both sides are
    compared as JSON holds them (a tuple option reads back as a list)."""
    old, mine = json.loads(json.dumps(old)), json.loads(json.dumps(mine))
    oc, mc = old.get("config", {}), mine["config"]
    if oc != mc:
        diff = sorted(k for k in set(oc) | set(mc) if oc.get(k) != mc.get(k))
        raise ValueError(f"{out} holds a run with a different configuration (differs in: "
                         f"{', '.join(diff)}); use another --out or delete the directory")
    op, mp = old.get("provenance", {}), mine["provenance"]
    changed = []
    for k in sorted(set(op) | set(mp)):
        if op.get(k) != mp.get(k):
            a, b = op.get(k), mp.get(k)
            if isinstance(a, dict) and isinstance(b, dict):
                detail = ", ".join(f"{n} {a.get(n)} -> {b.get(n)}" for n in sorted(set(a) | set(b))
                                   if a.get(n) != b.get(n))
            else:
                detail = f"{a} -> {b}"
            changed.append(f"{_PROVENANCE_WORDS.get(k, k)} ({detail})")
    if changed:
        raise ValueError(f"{out} holds a run of the same configuration made with other inputs: "
                         f"{'; '.join(changed)}; resuming would mix their numbers. Use another --out "
                         "or delete the directory")


def run(cfg: RunConfig, out: str | Path) -> dict[str, Any]:
    """Run (or resume) one configuration and return its summary."""
    return Run(cfg, out).execute()


__all__ = ["RunConfig", "Run", "run", "aggregate", "check_same_run"]
