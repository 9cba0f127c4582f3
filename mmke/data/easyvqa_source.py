"""Read the easy-VQA dataset shipped by the ``easy-vqa`` package (no download)."""

from __future__ import annotations

import importlib.util
import json
import re
from functools import lru_cache
from pathlib import Path

from mmke.models.default import COLOURS, SHAPES
from mmke.tasks import VQA_TEMPLATE  # noqa: F401  (re-exported for the builder)

CAPTION_PROMPTS = ("a photo of", "a picture of", "an image of", "a drawing of")
SPLITS = ("train", "test")


def package_dir() -> Path:
    spec = importlib.util.find_spec("easy_vqa")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the bundled benchmark needs the package easy-vqa: pip install easy-vqa")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


@lru_cache(maxsize=None)
def questions(split: str) -> list[tuple[str, str, int]]:
    """(question, answer, image_id) triples of a split, in the package's order."""
    if split not in SPLITS:
        raise ValueError(f"easy-VQA split must be one of {SPLITS}, got {split!r}")
    raw = json.loads((package_dir() / split / "questions.json").read_text())
    return [(q, a, int(i)) for q, a, i in raw]


def image_path(split: str, image_id: int) -> Path:
    return package_dir() / split / "images" / f"{image_id}.png"


@lru_cache(maxsize=None)
def image_ids(split: str) -> list[int]:
    return sorted(int(p.stem) for p in (package_dir() / split / "images").glob("*.png"))


_COLOUR_SHAPE_Q = re.compile(r"what is the (\w+) shape\?")
_SHAPE_COLOUR_Q = re.compile(r"what (?:color is the|is the color of the) (\w+)\?")
_CONTAINS = re.compile(r"(?:does the image contain|is there|is) an? (\w+)(?: shape)?(?: in the image| present)?\?")
_NOT_CONTAINS = re.compile(
    r"(?:does the image not contain|is there not|is no) an? ?(\w+)(?: shape)?(?: in the image| present)?\?")


@lru_cache(maxsize=None)
def image_labels(split: str) -> dict[int, tuple[str, str]]:
    """(colour, shape) of each image that the split's questions determine."""
    colour: dict[int, str] = {}
    shape: dict[int, str] = {}
    for q, a, i in questions(split):
        if a in COLOURS:
            colour[i] = a
            m = _SHAPE_COLOUR_Q.fullmatch(q)
            if m and m.group(1) in SHAPES:
                shape[i] = m.group(1)
        elif a in SHAPES:
            shape[i] = a
            m = _COLOUR_SHAPE_Q.fullmatch(q)
            if m and m.group(1) in COLOURS:
                colour[i] = m.group(1)
        else:
            m = (_CONTAINS if a == "yes" else _NOT_CONTAINS).fullmatch(q)
            if m and a in ("yes", "no"):
                w = m.group(1)
                (colour if w in COLOURS else shape if w in SHAPES else {})[i] = w
    return {i: (colour[i], shape[i]) for i in colour if i in shape}


def caption(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"
