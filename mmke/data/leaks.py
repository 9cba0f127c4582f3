"""Train/eval leak checks: do a benchmark's train and eval files share an input?

An *input* is what a model is asked during evaluation or training, as a hashable key:

- ``("text", norm(loc))``: the text-only T-Locality question;
- ``("image", image_digest(path), norm(question))``: an image-question pair, one per
  (image, src), (image, rephrase), (image_rephrase, src) and (m_loc, m_loc_q).

Images are compared by content (:func:`image_digest`: the decoded RGB pixels and the size), so the
same picture under another file name still counts as shared. Questions are compared with
:func:`mmke.data.schema.norm_text` (lower case, whitespace collapsed, stripped).
The v2 builder (:mod:`mmke.data.build_v2`) refuses to finish a build whose check is not clean.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

from PIL import Image

from mmke.data.schema import EditRecord, load_records, norm_text

Key = tuple[str, ...]
EVAL_FILES = ("vqa_eval.json", "caption_eval.json")
TRAIN_FILES = ("vqa_train.json", "caption_train.json")


@cache
def _digest(path: str) -> str:
    with Image.open(path) as im:
        rgb = im.convert("RGB")
        h = hashlib.sha256(f"{rgb.size[0]}x{rgb.size[1]}:".encode())
        h.update(rgb.tobytes())
    return h.hexdigest()


def image_digest(path: str | Path) -> str:
    """sha256 of an image's size and decoded RGB pixels (file name and encoding do not matter);
    memoised per path."""
    return _digest(str(path))


def input_keys(record: EditRecord) -> set[Key]:
    """The keys of every input ``record`` produces (see the module docstring). The record's image
    paths must be resolved (as :func:`mmke.data.schema.load_records` does)."""
    paths = {"image": record.image_path, "image_rephrase": record.image_rephrase_path,
             "m_loc": record.m_loc_path}
    missing = [f for f, p in paths.items() if p is None]
    if missing:
        raise ValueError(f"record {record.index}: unresolved image path(s) {missing}; "
                         f"load the file with load_records")
    image, rephrased, m_loc = (image_digest(p) for p in paths.values())  # type: ignore[arg-type]
    return {("text", norm_text(record.loc)),
            ("image", image, norm_text(record.src)),
            ("image", image, norm_text(record.rephrase)),
            ("image", rephrased, norm_text(record.src)),
            ("image", m_loc, norm_text(record.m_loc_q))}


def key_digest(key: Key) -> str:
    """A short, stable digest of an input key (16 hex): what editor memories record about the
    inputs they hold, so that a leak test can check them without the inputs themselves."""
    return hashlib.sha256("\x1f".join(key).encode()).hexdigest()[:16]


def record_key_digests(records: Iterable[EditRecord]) -> list[str]:
    """Sorted digests of every input key of ``records``."""
    return sorted({key_digest(k) for k in _keys(records)})


def _keys(records: Iterable[EditRecord]) -> set[Key]:
    out: set[Key] = set()
    for r in records:
        out |= input_keys(r)
    return out


def find_leaks(eval_records: Iterable[EditRecord], train_records: Iterable[EditRecord]) -> list[Key]:
    """The input keys that eval and train records share, sorted; empty when the split is clean."""
    return sorted(_keys(eval_records) & _keys(train_records))


def check_benchmark_dir(path: str | Path) -> dict[str, Any]:
    """Check a built benchmark directory: every eval file against every train file (those of
    ``*_eval.json`` / ``*_train.json`` that exist; images resolve against ``path``). Returns
    ``{"eval_inputs": N, "train_inputs": M, "shared": K, "leaks": [...]}`` (distinct inputs)."""
    root = Path(path)
    ev_keys, tr_keys = set(), set()
    for names, keys in ((EVAL_FILES, ev_keys), (TRAIN_FILES, tr_keys)):
        for name in names:
            if (root / name).exists():
                keys |= _keys(load_records(root / name, image_root=root).records)
    leaks = sorted(ev_keys & tr_keys)
    return {"eval_inputs": len(ev_keys), "train_inputs": len(tr_keys), "shared": len(leaks),
            "leaks": leaks}
