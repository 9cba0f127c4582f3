"""The MMEdit record and a strict loader (SPEC §1).

A data file is a JSON list of objects or JSON Lines. Every record is validated; a problem raises
:class:`DataError` naming the file, the record index and the field, or with ``skip_invalid`` the
record is skipped, logged and returned in ``LoadResult.skipped``. Image paths are untrusted: they
must stay inside their root.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

REQUIRED = ("src", "alt", "rephrase", "image", "image_rephrase", "loc", "loc_ans",
            "m_loc", "m_loc_q", "m_loc_a")
OPTIONAL = ("pred",)
NON_EMPTY = ("src", "alt")
IMAGE_FIELDS = ("image", "image_rephrase", "m_loc")


class DataError(ValueError):
    """A problem with a data file, naming the file, the record index and the field."""

    def __init__(self, file: str | Path, index: int | None, field: str | None, problem: str) -> None:
        self.file, self.index, self.field, self.problem = str(file), index, field, problem
        where = [self.file]
        if index is not None:
            where.append(f"record {index}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(": ".join(where + [problem]))


@dataclass
class EditRecord:
    src: str
    alt: str
    rephrase: str
    image: str
    image_rephrase: str
    loc: str
    loc_ans: str
    m_loc: str
    m_loc_q: str
    m_loc_a: str
    pred: str | None = None
    index: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    image_path: Path | None = None
    image_rephrase_path: Path | None = None
    m_loc_path: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        """The MMEdit JSON fields (and any extra fields) of this record."""
        d = {k: getattr(self, k) for k in REQUIRED}
        if self.pred is not None:
            d["pred"] = self.pred
        d.update(self.extra)
        return d


@dataclass
class LoadResult:
    path: Path
    records: list[EditRecord]
    skipped: list[DataError]


def _read_raw(path: Path) -> list[tuple[int, Any]]:
    """(index, parsed object) pairs from a JSON list or JSON Lines file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(path, None, None, "file not found") from None
    except UnicodeDecodeError as e:
        raise DataError(path, None, None, f"not UTF-8 text ({e})") from None
    if not text.strip():
        raise DataError(path, None, None, "empty file")
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(path, None, None, f"invalid JSON at line {e.lineno}: {e.msg}") from None
        if not data:
            raise DataError(path, None, None, "empty list: no records")
        return list(enumerate(data))
    out: list[tuple[int, Any]] = []
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) == 1:  # a single JSON value that is not a list
        try:
            value = json.loads(lines[0])
        except json.JSONDecodeError as e:
            raise DataError(path, None, None, f"invalid JSON: {e.msg}") from None
        if not isinstance(value, dict):
            raise DataError(path, None, None, f"expected a JSON list of records or JSON Lines, "
                                              f"got a JSON {type(value).__name__}")
        return [(0, value)]
    for i, ln in enumerate(lines):
        try:
            out.append((i, json.loads(ln)))
        except json.JSONDecodeError as e:
            out.append((i, DataError(path, i, None, f"invalid JSON Lines record: {e.msg}")))
    return out


def _resolve(root: Path, rel: str) -> Path | None:
    """``root/rel`` if it stays inside ``root`` (absolute paths and escaping ``..`` are refused)."""
    if Path(rel).is_absolute():
        return None
    p = (root / rel).resolve()
    try:
        p.relative_to(root.resolve())
    except ValueError:
        return None
    return p


class _ImageCheck:
    """Checks each image file once per load."""

    def __init__(self) -> None:
        self.seen: dict[Path, str | None] = {}

    def __call__(self, p: Path) -> str | None:
        if p not in self.seen:
            if not p.is_file():
                self.seen[p] = f"image file not found: {p}"
            else:
                try:
                    with Image.open(p) as im:
                        im.verify()
                    self.seen[p] = None
                except (UnidentifiedImageError, OSError, SyntaxError) as e:
                    self.seen[p] = f"unreadable image {p}: {e}"
        return self.seen[p]


def validate(obj: Any, path: Path, index: int, image_root: Path, rephrase_root: Path,
             check: _ImageCheck | None) -> EditRecord:
    """Turn one parsed object into an EditRecord or raise the DataError for its first problem."""
    if not isinstance(obj, dict):
        raise DataError(path, index, None, f"expected a JSON object, got {type(obj).__name__}")
    for f in REQUIRED:
        if f not in obj:
            raise DataError(path, index, f, "missing")
    for f in REQUIRED + OPTIONAL:
        if f in obj and not isinstance(obj[f], str):
            if f in OPTIONAL and obj[f] is None:
                continue
            raise DataError(path, index, f, f"expected a string, got {type(obj[f]).__name__}")
    for f in NON_EMPTY:
        if not obj[f].strip():
            raise DataError(path, index, f, "empty target" if f == "alt" else "empty")
    paths: dict[str, Path] = {}
    for f in IMAGE_FIELDS:
        root = rephrase_root if f == "image_rephrase" else image_root
        p = _resolve(root, obj[f])
        if p is None:
            raise DataError(path, index, f, f"path {obj[f]!r} leaves the image root {root}")
        problem = check(p) if check else None
        if problem:
            raise DataError(path, index, f, problem)
        paths[f] = p
    extra = {k: v for k, v in obj.items() if k not in REQUIRED + OPTIONAL}
    return EditRecord(**{f: obj[f] for f in REQUIRED}, pred=obj.get("pred"), index=index, extra=extra,
                      image_path=paths["image"], image_rephrase_path=paths["image_rephrase"],
                      m_loc_path=paths["m_loc"])


def load_records(path: str | Path, image_root: str | Path | None = None,
                 rephrase_image_root: str | Path | None = None, *, skip_invalid: bool = False,
                 check_images: bool = True) -> LoadResult:
    """Load and validate an MMEdit file. ``image_root`` defaults to the file's folder and
    ``rephrase_image_root`` to ``image_root``."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    reroot = Path(rephrase_image_root) if rephrase_image_root is not None else root
    check = _ImageCheck() if check_images else None
    records: list[EditRecord] = []
    skipped: list[DataError] = []
    for index, obj in _read_raw(path):
        try:
            if isinstance(obj, DataError):
                raise obj
            records.append(validate(obj, path, index, root, reroot, check))
        except DataError as e:
            if not skip_invalid:
                raise
            log.warning("skipping %s", e)
            skipped.append(e)
    if skipped:
        log.warning("%s: skipped %d invalid record(s) of %d", path, len(skipped), len(skipped) + len(records))
    return LoadResult(path, records, skipped)
