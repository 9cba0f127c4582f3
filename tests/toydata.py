"""Small MMEdit-layout data sets written to a temporary folder (images included), for training and
editing tests on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from mmke.data.schema import EditRecord

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "teal": (0, 128, 128),
           "yellow": (230, 230, 0), "brown": (140, 70, 20)}
FACTS = [("what is the capital of france?", "paris"), ("what is the capital of italy?", "rome"),
         ("what is the capital of spain?", "madrid"), ("what is the capital of germany?", "berlin")]


def write_toy_mmedit(root: Path, n: int = 12) -> Path:
    """``root/toy.json`` with ``n`` colour-question records and their images; returns the file."""
    root.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    for i, name in enumerate(names):
        Image.new("RGB", (32, 32), COLOURS[name]).save(root / f"{name}.png")
        Image.new("RGB", (32, 32), tuple(min(255, c + 25) for c in COLOURS[name])).save(root / f"{name}2.png")
    records = []
    for i in range(n):
        c = names[i % len(names)]
        other = names[(i + 3) % len(names)]
        q, a = FACTS[i % len(FACTS)]
        records.append({"src": "what color is the shape?", "alt": c, "rephrase": "what colour is the shape?",
                        "image": f"{c}.png", "image_rephrase": f"{c}2.png",
                        "loc": f"nq question: {q}", "loc_ans": a,
                        "m_loc": f"{other}.png", "m_loc_q": "what shape is in the image?", "m_loc_a": "circle"})
    f = root / "toy.json"
    f.write_text(json.dumps(records))
    return f


RGB3 = {"red": (220, 20, 20), "blue": (20, 20, 220), "green": (20, 200, 20)}


def colour_image(rgb: tuple[int, int, int], size: int = 32) -> Image.Image:
    return Image.new("RGB", (size, size), rgb)


def colour_records(root: Path, n: int = 12) -> list[EditRecord]:
    """``n`` in-memory colour-question records over three colour images written to ``root``: record
    i asks the colour of colour i % 3 and has colour (i + 1) % 3 as its unrelated image."""
    root.mkdir(parents=True, exist_ok=True)
    for name, rgb in RGB3.items():
        colour_image(rgb).save(root / f"{name}.png")
    names, out = list(RGB3), []
    for i in range(n):
        c, o = names[i % 3], names[(i + 1) % 3]
        out.append(EditRecord(
            src="what color is the shape?", alt=c, rephrase="what is the colour of the shape?",
            image=f"{c}.png", image_rephrase=f"{c}.png", loc="nq question: what is the capital of france?",
            loc_ans="paris", m_loc=f"{o}.png", m_loc_q="is there a circle?", m_loc_a="no", index=i,
            image_path=root / f"{c}.png", image_rephrase_path=root / f"{c}.png", m_loc_path=root / f"{o}.png"))
    return out
