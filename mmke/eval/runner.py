"""Evaluation runs in every setting (:mod:`mmke.eval.settings`): one loop — per group of cases,
unedited outputs, then the group's edits one after another (scoring at the group's checkpoints),
then the edits removed and the model verified — for one-step, sequential, cross-task and lifelong.

Composes a model adapter, an editor and MMEdit records; none of them imports this module.

A run directory holds ``run.json`` (the resolved configuration and the provenance of its inputs:
library versions, model digest, editor-weights digest, data digests and benchmark hash),
``cases.jsonl`` (durable lines, one per scored case, written as it is scored: a killed run resumes
at the first unfinished group, re-applies that group's edits and scores only its cases not yet
written; under torchrun each rank writes its own shard under ``shards/`` and rank 0 merges them,
:mod:`mmke.eval.distributed`) and ``summary.json``.
Everything is validated and loaded before the directory is created or touched, so a failed start
leaves nothing behind; a re-run with the same command resumes, and one whose inputs changed
(another model, other editor weights, other data, other library versions) is refused with a
message that says what changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from mmke.data.bundled import benchmark_of
from mmke.data.schema import is_hard_m_loc
from mmke.editors.base import EditRequest, WeightLedger
from mmke.eval import distributed
from mmke.eval.config import RunConfig, resolve_data, task_data
from mmke.eval.provenance import check_same_run, library_versions
from mmke.eval.scope import one_target_per_pair
from mmke.eval.settings import Case, Group, groups, interleave
from mmke.eval.store import CaseStore
from mmke.eval.summary import aggregate, aggregate_partial, mark_scope, scope_marks, with_scope
from mmke.io import atomic_write_json, file_digest
from mmke.models.base import state_digest
from mmke.models.placement import placement_record
from mmke.progress import progress
from mmke.registry import HF_PREFIX, MODELS, editor_class, load_model
from mmke.scoring import (EDIT_METRICS, HARD_M_LOCALITY, METRICS, CaseOutputs, case_inputs,
                          case_metrics, run_case)
from mmke.tasks import TASKS

log = logging.getLogger(__name__)
RUN_FILE = "run.json"


def _fingerprint(record) -> str:
    raw = json.dumps(record.to_dict(), sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


class Run:
    """A resumable run (any setting) writing ``cases.jsonl`` and ``summary.json`` under ``out``."""

    def __init__(self, cfg: RunConfig, out: str | Path, adapter=None) -> None:
        # validate names and method options first, and record the method's full option set
        method_cfg = editor_class(cfg.method).Config.from_options(cfg.method, cfg.method_config)
        if not cfg.model.startswith(HF_PREFIX) and cfg.model not in MODELS:
            raise KeyError(f"unknown model {cfg.model!r}; known: {', '.join(MODELS)} or hf:<path-or-hub-id>")
        cfg = cfg.model_copy(update={"method_config": method_cfg.model_dump()})
        self.cfg = resolve_data(cfg)
        self.out = Path(out)
        self._adapter = adapter
        self._held: tuple[str, dict] | None = None  # (key, inputs) of the case a one-case group holds
        self.retargeted = 0  # edits whose target --targets one-per-pair changed (set by stream())

    # ---- pieces ----------------------------------------------------------------------
    def load_records(self, task: str | None = None):
        """(records of the sample in the seeded order, skipped) of one task's eval file."""
        from mmke.data.schema import load_records

        data = task_data(self.cfg)[task or self.cfg.task]
        res = load_records(data, self.cfg.image_root, self.cfg.rephrase_image_root,
                           skip_invalid=self.cfg.skip_invalid)
        order = list(range(len(res.records)))
        random.Random(self.cfg.seed).shuffle(order)
        n = self.cfg.k if self.cfg.setting == "lifelong" else self.cfg.limit
        if n is not None:
            if self.cfg.setting == "lifelong" and n > len(order):
                raise ValueError(f"{data}: --setting lifelong --k {n} needs {n} cases; the file has {len(order)} "
                                 "valid ones")
            order = order[:n]
        if self.cfg.setting == "one-step":
            order = sorted(order)
        return [res.records[i] for i in order], res.skipped

    def stream(self) -> tuple[list[Case], int]:
        """The run's cases in stream order (cross-task: the tasks interleaved) and the number of
        skipped records."""
        streams, skipped = [], 0
        self.retargeted = 0
        for t in self.cfg.tasks:
            recs, sk = self.load_records(t)
            skipped += len(sk)
            if self.cfg.targets == "one-per-pair":
                recs, n = one_target_per_pair(recs)
                self.retargeted += n
            prefix = f"{t}:" if len(self.cfg.tasks) > 1 else ""
            streams.append([Case(f"{prefix}{r.index}-{_fingerprint(r)}", t, r) for r in recs])
        return interleave(streams), skipped

    def adapter(self):
        if self._adapter is None:
            self._adapter = load_model(self.cfg.model, device=self.cfg.device, dtype=self.cfg.dtype,
                                       device_map=self.cfg.device_map)
        return self._adapter

    def editor(self, adapter):
        """The method's editor; the train split is read only for a method that declares it reads it
        (:meth:`~mmke.editors.base.Editor.uses_train_records`), its images never decoded here."""
        cls = editor_class(self.cfg.method)
        config = cls.Config(**self.cfg.method_config)
        context: dict[str, Any] = {"task": TASKS[self.cfg.editor_task], "model_name": self.cfg.model}
        if self.cfg.train_data and cls.uses_train_records(config):
            context["train_records"] = self.train_records()
        return cls(adapter, config, **context)

    def train_records(self) -> list:
        """The train split's valid records (invalid ones skipped with a warning), their images
        resolved against --train-image-root (default: --image-root) and confined to it."""
        from mmke.data.schema import DataError, load_records

        cfg = self.cfg
        root = cfg.train_image_root or cfg.image_root
        try:
            records = load_records(cfg.train_data, root, cfg.rephrase_image_root or root,
                                   skip_invalid=True, check_images=False).records
        except DataError as e:  # a file-level problem: say which option names the file and who reads it
            raise DataError(e.file, e.index, e.field, f"{e.problem} (--train-data: the train split "
                                                      f"{cfg.method} reads)") from None
        if records and not records[0].image_path.is_file():  # images are not checked one by one here
            log.warning("%s: record %d's image %s does not exist: the train split's images resolve against "
                        "--train-image-root (default: --image-root); a method that reads them will fail",
                        cfg.train_data, records[0].index, records[0].image_path)
        return records

    def provenance(self, adapter, editor) -> dict[str, Any]:
        """What the numbers depend on besides the configuration (checked on resume)."""
        return {"versions": library_versions(), "model_digest": state_digest(adapter.model)[:16],
                "editor_weights_digest": editor.weights_digest(),
                "data_digest": "+".join(file_digest(f) for f in task_data(self.cfg).values()),
                # only a method that reads the train split depends on it (the others never open it)
                "train_data_digest": (file_digest(self.cfg.train_data)
                                      if editor.uses_train_records(editor.config) else None),
                "benchmark": benchmark_of(self.cfg.data),
                # where it ran: recorded, not compared (a resumed run takes the thread count it started with)
                "placement": {**placement_record(adapter.model), "threads": torch.get_num_threads()}}

    def _resume_threads(self) -> None:
        """Resume with the CPU thread count the run started with. Sums on the CPU are split by
        thread, so their last bits depend on the count; over many edits that can change a
        stream's results (docs/RESULTS.md, "Threads"). A resumed run then gives the numbers of an
        unbroken one, whatever ``MMKE_THREADS`` or the machine's load says now."""
        try:
            n = json.loads((self.out / RUN_FILE).read_text())["provenance"]["placement"]["threads"]
        except (OSError, ValueError, KeyError, TypeError):  # a new run, or one recorded before threads were
            return
        if isinstance(n, int) and n > 0 and n != torch.get_num_threads():
            log.warning("%s started with %d CPU thread(s): resuming with %d, not %d, so that its numbers are "
                        "those of an unbroken run", self.out, n, n, torch.get_num_threads())
            torch.set_num_threads(n)

    def open(self, provenance: dict[str, Any]) -> CaseStore:
        """Create the run directory, or check that an existing one holds this very run."""
        f = self.out / RUN_FILE
        mine = {"config": self.cfg.model_dump(), "provenance": provenance}
        if f.exists():
            old = json.loads(f.read_text())
            check_same_run(self.out, old, mine, editor_class(self.cfg.method).Config().model_dump())
        elif self.out.exists() and (self.out / "cases.jsonl").exists():
            raise ValueError(f"{self.out} holds results without {RUN_FILE} (an older mmke, or not a run); "
                             "use another --out or delete the directory")
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(f, mine)
        return CaseStore(self.out / "cases.jsonl")

    # ---- the protocol ----------------------------------------------------------------
    def inputs(self, adapter, case: Case, kinds: tuple[str, ...] = METRICS) -> dict:
        """A case's inputs (of ``kinds``), its images decoded now and let go with the returned dict;
        the case a one-step group holds (:meth:`run_group`) is decoded once for all its uses."""
        if self._held is not None and self._held[0] == case.key:
            return {k: self._held[1][k] for k in kinds}
        return case_inputs(case.record, TASKS[case.task], adapter.load_image, self.cfg.m_locality != "top1",
                           kinds=kinds)

    @property
    def topk(self) -> int:
        return 10 if self.cfg.m_locality == "reference-top10" else 1

    def pre_edit(self, adapter, cases: list[Case], label: str = "pre-edit outputs") -> dict[str, CaseOutputs]:
        """Unedited outputs of ``cases``, one case per batch (exactly as post-edit outputs)."""
        pre: dict[str, CaseOutputs] = {}
        with progress() as bar:
            task = bar.add_task(label, total=len(cases))
            for c in cases:
                pre[c.key] = run_case(adapter, self.inputs(adapter, c), self.topk)
                bar.update(task, advance=1)
        return pre

    def _done(self, group: Group, store: CaseStore, n: int) -> bool:
        keys = [s.case.key for s in group.scored(n)]
        return all(group.row_key(n, k) in store for k in keys)

    def execute(self) -> dict[str, Any]:
        """Run the groups not done yet, then summarise. Under torchrun (:mod:`mmke.eval.distributed`)
        this rank runs its share of them into its own shard and rank 0 merges and summarises."""
        t0 = time.time()
        ranks = distributed.current()
        if ranks is not None:
            ranks.check(self.cfg)
            self.cfg = ranks.placed(self.cfg)  # this rank's GPU when no --device is given
        cases, n_skipped = self.stream()
        if not cases:
            raise ValueError(f"{self.cfg.data}: no valid records to evaluate")
        self._resume_threads()
        adapter = self.adapter()
        editor = self.editor(adapter)
        provenance = self.provenance(adapter, editor)
        if ranks is None:
            store = self.open(provenance)
        else:  # rank 0 creates the directory; the others then check it holds their very run
            def open_shared() -> CaseStore:
                ranks.check_shared_dir(self.out, RUN_FILE)
                return self.open(provenance)

            store = ranks.in_turn(open_shared)
        cfg = self.cfg
        plan = groups(cfg.setting, cases, cfg.k, cfg.checkpoints, cfg.probes)
        order = [] if cfg.setting == "lifelong" else [c.key for g in plan for c in g.cases]
        if ranks is not None:
            store = distributed.ShardedStore(self.out, ranks.rank, store)
        elif distributed.has_shards(self.out):  # left by a torchrun run killed before its merge
            store = distributed.merge_shards(self.out, order)
        todo = [g for g in plan if not self._done(g, store, g.checkpoints[-1])]
        if len(todo) < len(plan):
            log.info("resuming: %d of %d groups already done", len(plan) - len(todo), len(plan))
        n_todo = len(todo)
        if ranks is not None:
            ranks.barrier()  # every rank has read the results before any rank writes
            todo = ranks.share(todo)
        # one-step checks its restores cheaply (hooks, transforms); longer groups by the weights' digest
        self._strict, self._original = cfg.setting != "one-step", None
        with progress() as bar:
            unit = "one-step edits" if cfg.setting == "one-step" else f"{cfg.setting} edits (K = {cfg.k})"
            if ranks is None:
                ptask = bar.add_task(f"{cfg.method} {unit}", total=len(cases),
                                     completed=sum(len(g.cases) for g in plan if g not in todo))
            else:
                ptask = bar.add_task(f"{cfg.method} {unit}, rank {ranks.rank}'s {len(todo)} of {n_todo} groups "
                                     f"({ranks.world} ranks)", total=sum(len(g.cases) for g in todo))
            for g in todo:
                self.run_group(adapter, editor, store, g, bar, ptask)
                self.verify(adapter, self._original, g)
        if ranks is None:
            return self.summarise(store, plan, n_skipped, time.time() - t0)
        return distributed.finish(ranks, self.out, order, lambda merged: self.summarise(
            merged, plan, n_skipped, time.time() - t0, extra={"distributed": ranks.info()}))

    def run_group(self, adapter, editor, store: CaseStore, g: Group, bar, ptask) -> None:
        """Unedited outputs, the group's edits one after another, scoring at its checkpoints,
        then every edit removed. Scored rows are written one by one (:meth:`score`)."""
        cfg = self.cfg
        # a one-case group decodes its images once, for its unedited outputs, edit and scoring; a
        # longer group decodes a case's images at each use, so memory never grows with K
        one = len(g.cases) == 1 and not g.lifelong
        self._held = (g.cases[0].key, self.inputs(adapter, g.cases[0])) if one else None
        pre = (self.pre_edit(adapter, g.probes, "unedited outputs of the locality probes")
               if g.lifelong else {c.key: run_case(adapter, self.inputs(adapter, c), self.topk) for c in g.cases})
        if self._original is None:  # after a forward: a model may install its own hooks on first use
            self._original = (state_digest(adapter.model) if self._strict else None, _hooks(adapter.model))
        handles, edit_s, metas = [], {}, {}
        try:
            for i, c in enumerate(g.cases, 1):
                x = self.inputs(adapter, c, ("reliability",))["reliability"]  # the edit's input only
                torch.manual_seed(cfg.seed)
                ts = time.perf_counter()
                h = editor.edit(EditRequest(x, c.record.to_dict()))
                del x  # let its image go before the next case's is decoded
                edit_s[c.key] = time.perf_counter() - ts
                metas[c.key] = h.meta
                handles.append(h)
                if g.lifelong:
                    h.release()  # a stream is never undone edit by edit: keep no per-edit copies
                    ekey = f"edit:{c.key}"
                    if ekey not in store:
                        store.add({"key": ekey, "index": i, "edit": i, "edit_s": edit_s[c.key], "edit_meta": h.meta})
                bar.update(ptask, advance=1)
                if i in g.checkpoints and not self._done(g, store, i):
                    self.score(adapter, store, g, i, pre, edit_s, metas)
        finally:
            self._held = None
            for h in reversed(handles):
                if not h.released:
                    h.remove()
            WeightLedger.of(adapter).restore_all()

    def score(self, adapter, store: CaseStore, g: Group, n: int, pre: dict[str, CaseOutputs],
              edit_s: dict[str, float], metas: dict[str, Any]) -> None:
        """Score the cases of checkpoint ``n`` with the group's edits in place, each row written
        durably as soon as it is scored: a run killed here resumes by re-applying the group's edits
        (deterministic: same seed, same thread count) and scoring only the cases not written yet.
        That keeps the hours of a long-context method's scoring (IKE at K = 20) across a kill."""
        ref = self.cfg.m_locality != "top1"
        scored = g.scored(n)
        done = sum(g.row_key(n, s.case.key) in store for s in scored)
        if done:
            log.info("resuming the scoring of %s: %d of %d cases already written",
                     f"checkpoint {n}" if g.lifelong else f"group {g.index + 1}", done, len(scored))
        # the model does not change while a checkpoint is scored: a prefix shared by its cases' inputs
        # (the in-context knowledge of every edit in place) is computed once for all of them
        with progress() as bar, adapter.sharing_prefixes():
            label = f"scoring after {n} edits" if g.lifelong else f"scoring group {g.index + 1}"
            task = bar.add_task(label, total=len(scored), completed=done) if len(scored) > 1 else None
            for s in scored:
                c = s.case
                if g.row_key(n, c.key) in store:
                    continue
                tv = time.perf_counter()
                # a lifelong edit that is no probe: its edit inputs only; the images go with the call
                post = run_case(adapter, self.inputs(adapter, c, METRICS if c.key in pre else EDIT_METRICS),
                                self.topk)  # the same batch as its unedited outputs
                m, e = case_metrics(pre.get(c.key, {}), post, ref)
                row = {"key": g.row_key(n, c.key), "index": c.record.index, "task": c.task,
                       "metrics": {k: m[k] for k in s.metrics}, "metrics_exact_match": {k: e[k] for k in s.metrics},
                       "m_loc_hard": is_hard_m_loc(c.record) and "m_locality" in s.metrics,
                       "eval_s": time.perf_counter() - tv}
                if c.key in pre:
                    row["pre_edit"] = {k: pre[c.key][k].acc for k in EDIT_METRICS}
                if g.lifelong:
                    row["checkpoint"] = n
                else:
                    row.update(group=g.index, edit_s=edit_s[c.key], edit_meta=metas[c.key])
                store.add(row)
                if task is not None:
                    bar.update(task, advance=1)

    def verify(self, adapter, original: tuple[str | None, int], g: Group) -> None:
        """After a group: the model must be the original one (no hook, transform or wrapper left;
        with ``original[0]``, bit-identical weights)."""
        left = []
        if adapter.input_transforms or adapter.run_wrappers:
            left.append(f"{len(adapter.input_transforms)} input transforms, {len(adapter.run_wrappers)} run wrappers")
        if _hooks(adapter.model) != original[1]:
            left.append(f"{_hooks(adapter.model) - original[1]} hooks")
        if original[0] is not None and state_digest(adapter.model) != original[0]:
            left.append("changed weights (digest differs)")
        if left:
            raise RuntimeError(f"{self.cfg.method}: after removing the edits of group {g.index + 1} the model is not "
                               f"the original: {'; '.join(left)} — the editor's remove() is incomplete")

    def summarise(self, store: CaseStore, plan: list[Group], n_skipped: int, elapsed: float,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
        cfg = self.cfg
        run = json.loads((self.out / RUN_FILE).read_text())
        summary: dict[str, Any] = {"model": cfg.model, "task": cfg.task, "method": cfg.method,
                                   "setting": cfg.setting, "k": cfg.k}
        if cfg.setting == "lifelong":
            summary.update(self._lifelong_summary(store, plan[0]))
        else:
            keys = {c.key for g in plan for c in g.cases}
            rows = [r for r in store.rows() if r["key"] in keys]  # only this run's cases
            if cfg.setting != "one-step":
                rows = with_scope(rows, plan)
            summary.update({"n_cases": len(rows), "n_groups": len(plan), **aggregate(rows, seed=cfg.seed),
                            "pre_edit_metrics": {k: statistics.fmean(r["pre_edit"][k] for r in rows)
                                                 for k in EDIT_METRICS},
                            "timing": {"edit_s_median": statistics.median(r["edit_s"] for r in rows),
                                       "eval_s_median": statistics.median(r["eval_s"] for r in rows)}})
            if len(cfg.tasks) > 1:
                per = {t: [r for r in rows if r.get("task") == t] for t in cfg.tasks}
                summary["per_task"] = {t: {**aggregate(r, seed=cfg.seed), "n_cases": len(r)} for t, r in per.items()}
        if cfg.targets != "as-drawn":
            summary["n_retargeted"] = self.retargeted
        summary.update({
            "n_skipped": n_skipped, "seed": cfg.seed,
            "protocol": self.protocol(),
            "config": cfg.model_dump(mode="json"),
            "provenance": run["provenance"],
        })
        summary["timing"].update(self._wall_time(elapsed))
        summary.update(extra or {})
        atomic_write_json(self.out / "summary.json", summary)
        return summary

    def _wall_time(self, elapsed: float) -> dict[str, Any]:
        """``total_s``: wall seconds of every invocation that reached its summary, this one's
        ``elapsed`` added to those of the summary it replaces (a resumed or re-summarised run keeps
        its earlier time; an invocation killed before its summary is not counted)."""
        try:
            before = json.loads((self.out / "summary.json").read_text()).get("timing", {})
        except (OSError, ValueError):
            before = {}
        return {"total_s": float(before.get("total_s", 0.0)) + elapsed,
                "invocations": int(before.get("invocations", 1 if "total_s" in before else 0)) + 1}

    def _lifelong_summary(self, store: CaseStore, g: Group) -> dict[str, Any]:
        rows = store.done
        edit_s = [rows[f"edit:{c.key}"]["edit_s"] for c in g.cases]
        curve = []
        marks = scope_marks([g])  # every checkpoint's rows, once
        for n in g.checkpoints:
            cp = mark_scope([rows[g.row_key(n, s.case.key)] for s in g.scored(n)], marks)
            agg = aggregate_partial(cp, seed=self.cfg.seed)
            agg["n_edits"] = n
            agg["edit_s_median"] = statistics.median(edit_s[max(0, n - 5):n])  # edits n-4..n
            curve.append(agg)
        last = curve[-1]
        return {"n_cases": len(g.cases), "n_probes": len(g.probes), "checkpoints": list(g.checkpoints),
                **{k: last[k] for k in ("metrics", "metrics_exact_match", "mean", "mean_exact_match",
                                        "intervals", "n_hard_m_locality", "n_out_of_scope_m_locality") if k in last},
                "curve": curve,
                # unedited outputs are computed for the probes only (locality needs them)
                "pre_edit_metrics": {k: statistics.fmean(rows[g.row_key(g.checkpoints[-1], c.key)]["pre_edit"][k]
                                                         for c in g.probes) for k in EDIT_METRICS},
                "timing": {"edit_s_median": statistics.median(edit_s), "edit_s_total": sum(edit_s)}}

    def protocol(self) -> str:
        cfg = self.cfg
        setting = {
            "one-step": "one-step: model restored after each edit",
            "sequential": f"sequential: groups of K = {cfg.k} edits applied one after another, every case of "
                          "a group scored after its K-th edit against outputs computed before the group; "
                          "the group's edits removed and the weights checked bit-identical after each group",
            "cross-task": f"cross-task: sequential groups of K = {cfg.k} over a stream interleaving "
                          f"{' and '.join(cfg.tasks)} cases; metrics per task and overall",
            "lifelong": f"lifelong: one stream of K = {cfg.k} edits; at each checkpoint reliability and "
                        "generality over every edit so far (reliability = retention), locality over the "
                        f"first {cfg.probes} cases' locality inputs against outputs computed before the stream",
        }[cfg.setting]
        if cfg.targets == "one-per-pair":
            setting += ("; targets one per (content, question) pair: an edit of a pair edited earlier in the "
                        "stream takes that pair's first target")
        return ("teacher-forced; edit metrics = token accuracy (exact match in metrics_exact_match); "
                f"locality = {'top-10 rank-by-rank (reference) for M-Loc, ' if cfg.m_locality != 'top1' else ''}"
                "top-1 agreement with pre-edit outputs at the target positions; "
                f"{HARD_M_LOCALITY} = M-Loc over the cases whose unrelated-image question is the "
                "edit's own; pre-edit outputs one case per batch as post-edit; "
                f"{setting}; intervals: 95% percentile bootstrap over cases")


def run_stream(run_dir: str | Path) -> tuple[RunConfig, list[Case]]:
    """The configuration of a run directory (its ``run.json``) and its cases in stream order, read
    again from its data files."""
    cfg = RunConfig(**json.loads((Path(run_dir) / RUN_FILE).read_text())["config"])
    cases, _ = Run(cfg, run_dir).stream()
    return cfg, cases


def run_scope_marks(run_dir: str | Path) -> dict[str, bool] | None:
    """:func:`~mmke.eval.summary.scope_marks` of a finished sequential, cross-task or lifelong run
    (:func:`run_stream`); None for one-step runs, or where the run's data can no longer be read."""
    try:
        cfg, cases = run_stream(run_dir)
    except (OSError, ValueError, KeyError) as e:
        log.warning("%s: no scope marks (%s)", run_dir, e)
        return None
    if cfg.setting == "one-step":
        return None
    return scope_marks(groups(cfg.setting, cases, cfg.k, cfg.checkpoints, cfg.probes))


def run(cfg: RunConfig, out: str | Path) -> dict[str, Any]:
    """Run (or resume) one configuration and return its summary."""
    return Run(cfg, out).execute()


__all__ = ["RunConfig", "Run", "run", "aggregate", "aggregate_partial", "check_same_run"]
