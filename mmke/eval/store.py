"""Per-case results store: one JSON line per finished case, appended and fsynced.

A run killed at any point (even SIGKILL) leaves at most one partial last line; reopening the store
drops it, so a re-run redoes only the unfinished cases and counts none twice.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class CaseStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.done: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            self._recover()

    def _recover(self) -> None:
        rows, good_bytes = read_rows(self.path)
        for row in rows:
            self.done[row["key"]] = row
        if good_bytes != self.path.stat().st_size:
            log.warning("%s: dropping a partial last line left by an interrupted run", self.path)
            with open(self.path, "r+b") as f:
                f.truncate(good_bytes)

    def __contains__(self, key: str) -> bool:
        return key in self.done

    def __len__(self) -> int:
        return len(self.done)

    def add(self, row: dict[str, Any]) -> None:
        """Append one finished case durably."""
        line = (json.dumps(row, sort_keys=True) + "\n").encode()
        with open(self.path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.done[row["key"]] = row

    def rows(self) -> list[dict[str, Any]]:
        return sorted(self.done.values(), key=lambda r: r["index"])


def read_rows(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """The complete rows of a store file, in file order, and the number of bytes they take; stops
    at a partial or unreadable line (an interrupted write). Reads only: the file is not changed."""
    rows, good_bytes = [], 0
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break  # partial line from an interrupted write
            try:
                row = json.loads(raw)
            except json.JSONDecodeError:
                break
            rows.append(row)
            good_bytes += len(raw)
    return rows, good_bytes
