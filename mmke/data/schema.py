"""The MMEdit record and a strict loader (SPEC §1).

A data file is a JSON list of objects or JSON Lines (told apart by content, not by extension).
Every record is validated; a problem raises :class:`DataError` naming the file, the record index
and the field, or with ``skip_invalid`` the record is skipped, logged and returned in
``LoadResult.skipped``. Image paths are untrusted input: they must be relative and stay inside
their root, and the files must be images PIL can read.

:func:`is_hard_m_loc` is the one rule for telling the hard kind of M-Locality input (the edit's
own question about an unrelated image) from the other kind; :func:`norm_text` is its comparison.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

REQUIRED = ("src", "alt", "rephrase", "image", "image_rephrase", "loc", "loc_ans",
            "m_loc", "m_loc_q", "m_loc_a")
OPTIONAL = ("pred",)
IMAGE_FIELDS = ("image", "image_rephrase", "m_loc")
NON_EMPTY = {"src": "empty prompt", "alt": "empty target"}


class DataError(ValueError):
    """A problem with a data file: ``"{file}: record {index}: field '{field}': {problem}"``.

    ``index`` and ``field`` are None for file-level problems (invalid JSON, no records, ...) and
    ``field`` is None for record-level ones (not an object, an unparsable JSON Lines line).
    """

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
    """One validated edit case. The string fields are the MMEdit JSON fields as written; the
    ``*_path`` fields are the resolved absolute image paths (always set by :func:`load_records`);
    ``index`` is the record's position in its file; ``extra`` holds any other fields
    (VLKEB ``port_new``, MMKE-Bench ``knowledge_type``, ...) unchanged."""

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
        d: dict[str, Any] = {k: getattr(self, k) for k in REQUIRED}
        if self.pred is not None:
            d["pred"] = self.pred
        d.update(self.extra)
        return d


@dataclass
class LoadResult:
    """What :func:`load_records` read: the valid records and the errors of skipped ones."""

    path: Path
    records: list[EditRecord]
    skipped: list[DataError]


def norm_text(text: str) -> str:
    """A question as compared across records: lower case, whitespace collapsed, stripped."""
    return " ".join(text.lower().split())


def is_hard_m_loc(record: EditRecord | dict[str, Any]) -> bool:
    """True if the record's M-Locality question is its edit prompt (``src``) or the prompt's
    paraphrase (``rephrase``), compared with :func:`norm_text`: the same question about an
    unrelated image, which an edit that ignores the image would wrongly change."""
    get = record.get if isinstance(record, dict) else lambda k: getattr(record, k)
    q = norm_text(get("m_loc_q"))
    return q == norm_text(get("src")) or q == norm_text(get("rephrase"))


# ---- reading the file ------------------------------------------------------------------------
def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(path, None, None, "file not found") from None
    except UnicodeDecodeError as e:
        raise DataError(path, None, None, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(path, None, None, f"cannot read the file ({e.strerror or e})") from None


def _json_lines(path: Path, lines: list[str]) -> list[tuple[int, Any]]:
    """(record index, object) per non-blank line; an unparsable line becomes its DataError."""
    out: list[tuple[int, Any]] = []
    for i, line in enumerate(lines):
        try:
            out.append((i, json.loads(line)))
        except json.JSONDecodeError as e:
            out.append((i, DataError(path, i, None, f"invalid JSON Lines record: {e.msg} "
                                                    f"at column {e.colno}")))
    return out


def _read_raw(path: Path) -> list[tuple[int, Any]]:
    """(index, parsed object or DataError) pairs from a JSON list or a JSON Lines file."""
    text = _read_text(path)
    if not text.strip():
        raise DataError(path, None, None, "empty file: no records")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("[") or len(lines) == 1:
            raise DataError(path, None, None, f"invalid JSON at line {e.lineno} column {e.colno}: "
                                              f"{e.msg}") from None
        return _json_lines(path, lines)
    if isinstance(data, list):
        if not data:
            raise DataError(path, None, None, "empty list: no records")
        return list(enumerate(data))
    if isinstance(data, dict) and len(lines) == 1:  # JSON Lines with a single record
        return [(0, data)]
    raise DataError(path, None, None, f"expected a JSON list of records or JSON Lines, "
                                      f"got a top-level JSON {type(data).__name__}")


# ---- validating a record ---------------------------------------------------------------------
def _resolve(root: Path, rel: str) -> tuple[Path | None, str]:
    """``(root/rel, "")`` if ``rel`` names a place inside ``root``, else ``(None, the rule broken)``.

    The check is lexical: an absolute path, or a ``..`` that climbs out of the root, is refused;
    symbolic links inside the root (a folder of images linked to COCO, say) are followed, since
    they are the user's own choice of where the images live."""
    if not rel:
        return None, "empty image path"
    if "\x00" in rel:
        return None, f"{rel!r} contains a NUL character"
    pr = PurePosixPath(rel.replace("\\", "/"))
    if pr.is_absolute() or PureWindowsPath(rel).drive or PureWindowsPath(rel).is_absolute():
        return None, f"{rel!r} is an absolute path; image paths must be relative to the image root {root}"
    parts: list[str] = []
    for part in pr.parts:
        if part == "..":
            if not parts:
                return None, f"{rel!r} climbs out of the image root {root} with '..'"
            parts.pop()
        elif part not in ("", "."):
            parts.append(part)
    if not parts:
        return None, f"{rel!r} names the image root itself, not an image file"
    return root.joinpath(*parts), ""


class _ImageCheck:
    """Checks that each image file exists and PIL can read it, once per path per load."""

    def __init__(self) -> None:
        self.seen: dict[Path, str | None] = {}

    def __call__(self, p: Path) -> str | None:
        """None if ``p`` is a readable image, otherwise the problem."""
        if p not in self.seen:
            self.seen[p] = self._problem(p)
        return self.seen[p]

    @staticmethod
    def _problem(p: Path) -> str | None:
        if not p.is_file():
            return f"image file not found: {p}"
        try:
            with Image.open(p) as im:
                im.verify()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            return f"unreadable image {p}: {e}"
        return None


def _check_types(obj: dict[str, Any], path: Path, index: int) -> None:
    for f in REQUIRED:
        if f not in obj:
            raise DataError(path, index, f, "missing")
    for f in REQUIRED + OPTIONAL:
        if f in obj and not isinstance(obj[f], str) and not (f in OPTIONAL and obj[f] is None):
            got = "null" if obj[f] is None else type(obj[f]).__name__
            raise DataError(path, index, f, f"expected a string, got {got}")
    for f, problem in NON_EMPTY.items():
        if not obj[f].strip():
            raise DataError(path, index, f, problem)


def validate(obj: Any, path: Path, index: int, image_root: Path, rephrase_root: Path,
             check: _ImageCheck | None) -> EditRecord:
    """Turn one parsed object into an EditRecord or raise the DataError for its first problem."""
    if not isinstance(obj, dict):
        raise DataError(path, index, None, f"expected a JSON object, got {type(obj).__name__}")
    _check_types(obj, path, index)
    paths: dict[str, Path] = {}
    for f in IMAGE_FIELDS:
        root = rephrase_root if f == "image_rephrase" else image_root
        p, rule = _resolve(root, obj[f])
        if p is None:
            raise DataError(path, index, f, rule)
        problem = check(p) if check else None
        if problem:
            raise DataError(path, index, f, problem)
        paths[f] = p
    extra = {k: v for k, v in obj.items() if k not in REQUIRED + OPTIONAL}
    return EditRecord(**{f: obj[f] for f in REQUIRED}, pred=obj.get("pred"), index=index,
                      extra=extra, image_path=paths["image"],
                      image_rephrase_path=paths["image_rephrase"], m_loc_path=paths["m_loc"])


def load_records(path: str | Path, image_root: str | Path | None = None,
                 rephrase_image_root: str | Path | None = None, *, skip_invalid: bool = False,
                 check_images: bool = True) -> LoadResult:
    """Load and validate an MMEdit file (JSON list or JSON Lines).

    ``image`` and ``m_loc`` resolve against ``image_root`` (default: the file's folder),
    ``image_rephrase`` against ``rephrase_image_root`` (default: ``image_root``). The first invalid
    record raises :class:`DataError`, unless ``skip_invalid``: then invalid records are logged and
    returned in ``skipped``. File-level problems always raise. ``check_images=False`` skips
    opening the images (paths are still resolved and confined to their root).
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    reroot = Path(rephrase_image_root) if rephrase_image_root is not None else root
    root, reroot = root.resolve(), reroot.resolve()
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
            log.warning("skipping invalid record: %s", e)
            skipped.append(e)
    if skipped:
        log.warning("%s: skipped %d invalid record(s) of %d", path, len(skipped),
                    len(skipped) + len(records))
    if not records:
        log.warning("%s: no valid records", path)
    return LoadResult(path, records, skipped)
