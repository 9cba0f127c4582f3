"""Progress of long loops: rich bars with an ETA on a terminal; in a log file (stderr not a
terminal) a plain line when a phase starts, about once a minute, and when it ends — so that a
background run's log shows where it is. ``MMKE_QUIET=1`` silences both."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Any, Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

console = Console(stderr=True)
LOG_EVERY_S = float(os.environ.get("MMKE_PROGRESS_EVERY", 60))


class LineProgress:
    """The subset of :class:`rich.progress.Progress` mmke uses, printing lines instead of a bar.
    A phase that starts (in this or a nested progress) first prints the unprinted counts of those
    still open: a burst of quick steps before a long phase is not lost until that phase ends."""

    _open: list["LineProgress"] = []  # entered and not exited, outermost first

    def __init__(self, every_s: float = LOG_EVERY_S) -> None:
        self.every_s = every_s
        self.tasks: dict[int, dict[str, Any]] = {}

    def __enter__(self) -> "LineProgress":
        LineProgress._open.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self in LineProgress._open:
            LineProgress._open.remove(self)
        self._flush()

    def _flush(self) -> None:
        for tid, t in self.tasks.items():
            if t["done"] != t["last_done"]:
                self._line(tid)

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **_: Any) -> int:
        for p in LineProgress._open:
            p._flush()
        tid = len(self.tasks)
        now = time.monotonic()
        self.tasks[tid] = {"desc": description, "total": total, "done": completed, "start": now, "start_done": completed,
                           "last": now, "last_done": None}
        self._line(tid)
        return tid

    def update(self, task_id: int, *, advance: float = 0, completed: float | None = None,
               description: str | None = None, **_: Any) -> None:
        t = self.tasks[task_id]
        t["done"] = completed if completed is not None else t["done"] + advance
        if description is not None:
            t["desc"] = description
        if time.monotonic() - t["last"] >= self.every_s or (t["total"] is not None and t["done"] >= t["total"]):
            self._line(task_id)

    def _line(self, task_id: int) -> None:
        t = self.tasks[task_id]
        now = time.monotonic()
        elapsed = now - t["start"]
        rate = (t["done"] - t["start_done"]) / elapsed if elapsed > 0 else 0.0
        eta = f", eta {_hms((t['total'] - t['done']) / rate)}" if rate > 0 and t["total"] else ""
        total = f"/{t['total']:g}" if t["total"] is not None else ""
        console.print(f"{t['desc']}: {t['done']:g}{total} ({_hms(elapsed)} elapsed{eta})", highlight=False)
        t["last"], t["last_done"] = now, t["done"]


def _hms(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def progress() -> Progress | LineProgress:
    quiet = bool(os.environ.get("MMKE_QUIET"))
    if not quiet and not console.is_terminal:
        return LineProgress()
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                    console=console, disable=quiet)


@contextmanager
def quiet_loading() -> Iterator[None]:
    """No transformers "Loading weights" bar while loading a model in the middle of mmke's own
    progress; the setting is restored after."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()
