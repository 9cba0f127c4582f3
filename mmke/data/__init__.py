"""Data: the MMEdit record and its strict loader, and the bundled easy-VQA benchmark builder.

``from mmke.data import load_records, build_benchmark``. The builder (version 2 by default,
``version=1`` for the original benchmark) and the train/eval leak check (``find_leaks``,
``check_benchmark_dir``) are imported lazily: they pull in the easy-VQA reader and the default
model's module (torch), which loading a file does not need. ``is_hard_m_loc`` tells the hard kind
of M-Locality input (the edit's own question about an unrelated image) from the other kind.
"""

from __future__ import annotations

from typing import Any

from mmke.data.schema import DataError, EditRecord, LoadResult, is_hard_m_loc, load_records, norm_text

__all__ = ["DataError", "EditRecord", "LoadResult", "load_records", "is_hard_m_loc", "norm_text",
           "build_benchmark", "find_leaks", "check_benchmark_dir"]


def __getattr__(name: str) -> Any:
    if name == "build_benchmark":
        from mmke.data.build import build_benchmark

        return build_benchmark
    if name in ("find_leaks", "check_benchmark_dir"):
        from mmke.data import leaks

        return getattr(leaks, name)
    raise AttributeError(f"module 'mmke.data' has no attribute {name!r}")
