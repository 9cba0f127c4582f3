"""Data: the MMEdit record and its strict loader, and the bundled easy-VQA benchmark builder.

``from mmke.data import load_records, build_benchmark``. The builder is imported lazily: it pulls in
the easy-VQA reader and the default model's module (torch), which loading a file does not need.
"""

from __future__ import annotations

from typing import Any

from mmke.data.schema import DataError, EditRecord, LoadResult, load_records

__all__ = ["DataError", "EditRecord", "LoadResult", "load_records", "build_benchmark"]


def __getattr__(name: str) -> Any:
    if name == "build_benchmark":
        from mmke.data.build import build_benchmark

        return build_benchmark
    raise AttributeError(f"module 'mmke.data' has no attribute {name!r}")
