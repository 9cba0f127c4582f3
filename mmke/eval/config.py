"""What determines a run's numbers (:class:`RunConfig`, written to run.json and summary.json as
``config``), and the data files a configuration resolves to: the bundled benchmark's when none is
given, a train file found beside the eval file, each task's file of a cross-task run."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mmke.eval.settings import parse_checkpoints
from mmke.tasks import TASKS

log = logging.getLogger(__name__)


class RunConfig(BaseModel):
    """Everything that determines a run's numbers (written to summary.json as ``config``)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = "default"
    task: str = "vqa"  # a task name; cross-task: several joined by "+" (vqa+caption)
    method: str = "ft-lm"
    data: str | None = None  # MMEdit eval file; default: the bundled benchmark's
    train_data: str | None = None  # MMEdit train file (IKE demonstrations); default: bundled
    # root of the train file's `image` and `m_loc` paths (and of `image_rephrase` unless
    # rephrase_image_root is given); default: image_root
    train_image_root: str | None = None
    image_root: str | None = None
    rephrase_image_root: str | None = None
    limit: int | None = Field(None, ge=1)  # cases per task (lifelong: the stream is K cases)
    seed: int = 0
    skip_invalid: bool = False
    m_locality: Literal["top1", "reference-top10"] = "top1"
    setting: Literal["one-step", "sequential", "cross-task", "lifelong"] = "one-step"
    k: int = Field(1, ge=1)  # edits per group (sequential, cross-task); edits in the stream (lifelong)
    checkpoints: tuple[int, ...] = ()  # lifelong: score after these numbers of edits (K always)
    probes: int = Field(100, ge=1)  # lifelong: locality probe cases (the first of the stream)
    # the stream's targets: as drawn in the file, or one per (content, question) pair (an edit of a
    # pair edited before gets its first target: mmke.eval.scope.one_target_per_pair)
    targets: Literal["as-drawn", "one-per-pair"] = "as-drawn"
    method_config: dict[str, Any] = Field(default_factory=dict)
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # the model's weights (part of the run's identity)
    # where the model runs (recorded in provenance, not part of the identity): one device, or a
    # device map ("auto" or a JSON file of module -> device); mutually exclusive
    device: str | None = None
    device_map: str | None = None

    @model_validator(mode="after")
    def _placement(self):
        from mmke.models.placement import Placement

        Placement(device=self.device, dtype=self.dtype, device_map=self.device_map).resolved_map()
        return self

    @field_validator("task")
    @classmethod
    def _task(cls, v: str) -> str:
        unknown = [t for t in v.split("+") if t not in TASKS]
        if unknown or not v:
            raise ValueError(f"unknown task {'+'.join(unknown) or v!r}; known: {', '.join(TASKS)} "
                             "(cross-task: vqa+caption)")
        return v

    @model_validator(mode="after")
    def _setting(self):
        tasks = self.tasks
        if self.setting == "cross-task":
            if len(tasks) < 2:
                raise ValueError("--setting cross-task needs two tasks: --task vqa+caption")
            if self.data is not None:  # the first task's file; the others found beside it
                for t in tasks[1:]:
                    other_task_file(Path(self.data), t)
        elif len(tasks) > 1:
            raise ValueError(f"--task {self.task}: several tasks in one stream need --setting cross-task")
        if self.setting == "one-step" and self.targets != "as-drawn":
            raise ValueError("--targets one-per-pair is for a stream of edits (--setting sequential, cross-task or "
                             "lifelong); one-step edits never meet one another")
        if self.setting == "one-step" and self.k != 1:
            raise ValueError("--k is for --setting sequential, cross-task or lifelong (one-step edits one at a time)")
        if self.setting == "lifelong":
            if self.limit is not None and self.limit != self.k:
                raise ValueError(f"--setting lifelong edits a stream of K = {self.k} cases; drop --limit "
                                 f"({self.limit}) or make it K")
            object.__setattr__(self, "checkpoints", parse_checkpoints(self.checkpoints or None, self.k))
        elif self.checkpoints:
            raise ValueError("--checkpoints is for --setting lifelong")
        return self

    @property
    def tasks(self) -> list[str]:
        return [t for t in self.task.split("+") if t]

    @property
    def editor_task(self) -> str:
        """The task whose editor weights and train split the editor gets (cross-task: the first)."""
        return self.tasks[0]


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
    eval_f, train_f = TASKS[cfg.editor_task].files()
    update = {"data": str(bench / eval_f), "train_data": str(bench / train_f),
              "image_root": str(bench), "rephrase_image_root": None}
    if cfg.train_data is not None:  # the user's train file beside the bundled eval split
        update.update(train_data=cfg.train_data,
                      train_image_root=cfg.train_image_root or str(Path(cfg.train_data).parent))
    return cfg.model_copy(update=update)


def task_data(cfg: RunConfig) -> dict[str, str]:
    """The eval file of each task of a (resolved) run: cross-task reads the first task's file and
    the other tasks' ``<task>_eval.json`` beside it (the bundled benchmark's layout, and MMEdit's)."""
    if len(cfg.tasks) == 1:
        return {cfg.task: cfg.data}
    if cfg.data is None:
        raise ValueError("task_data needs a resolved configuration (resolve_data)")
    return {t: cfg.data if i == 0 else str(other_task_file(Path(cfg.data), t)) for i, t in enumerate(cfg.tasks)}


def other_task_file(first: Path, task: str) -> Path:
    """A cross-task run's eval file of ``task``, found from the first task's: in the same folder
    (mmke's layout, the bundled benchmark's: ``<task>_eval.json``), or in the folder ``<task>``
    beside it (MMEdit's ``editing-data/vqa/vqa_eval.json`` and
    ``editing-data/caption/caption_eval_edit.json``). Only reads: nothing is written there."""
    names = (TASKS[task].files()[0], f"{task}_eval_edit.json")
    places = [folder / n for folder in (first.parent, first.parent.parent / task) for n in names]
    for f in places:
        if f.is_file():
            return f
    raise ValueError(f"--setting cross-task: no {TASKS[task].title} eval file for {first}; looked for "
                     + ", ".join(str(f) for f in places) + " (put it in one of those places, or a link to it)")


__all__ = ["RunConfig", "other_task_file", "resolve_data", "task_data"]
