"""Build the bundled benchmark (E-VQA-lite, E-IC-lite) from the easy-VQA package.

Eval cases are the ones the default model gets wrong (its committed ``predictions.json``); with
``counterfactual`` they are cases it gets right, with a chosen wrong answer as the target. Every
record has all MMEdit fields: ``rephrase`` is another phrasing with the same meaning, so the same
answer; ``image_rephrase`` another image with the same colour and shape; ``m_loc*`` a real
easy-VQA question about an image differing in colour and shape; ``loc*`` a country-capital
question. Deterministic for a seed. Nothing is written outside ``out_dir``.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Any

from mmke import __version__
from mmke.data import easyvqa_source as ev
from mmke.data.textfacts import capital_questions
from mmke.models.default import COLOURS, SHAPES
from mmke.paths import ASSETS

log = logging.getLogger(__name__)
MIN_CASES_WARNING = 50

# ---- question meanings and their surface forms -------------------------------------------
Meaning = tuple[str, str]


def _forms(kind: str, w: str) -> list[str]:
    """Every surface form of a meaning (easy-VQA's own phrasings, plus one written here for
    ``shape_of`` which easy-VQA phrases only one way)."""
    noun = f"{w} shape" if w in COLOURS else w
    if kind == "has":
        return [f"is there a {noun}?", f"is there a {noun} in the image?",
                f"does the image contain a {noun}?", f"is a {noun} present?"]
    if kind == "not":
        return [f"is there not a {noun}?", f"is there not a {noun} in the image?",
                f"does the image not contain a {noun}?", f"is no {noun} present?"]
    if kind == "colour":
        return [f"what color is the {w}?", f"what is the color of the {w}?"]
    if kind == "shape":
        return ["what shape is in the image?", "what shape does the image contain?", "what shape is present?"]
    if kind == "shape_of":
        return [f"what is the {w} shape?", f"which shape is {w}?"]  # the second is mmke's
    raise ValueError(kind)


@lru_cache(maxsize=1)
def _surface_table() -> dict[str, Meaning]:
    table: dict[str, Meaning] = {}
    for w in COLOURS + SHAPES:
        for kind in ("has", "not"):
            for f in _forms(kind, w):
                table[f] = (kind, w)
    for w in SHAPES + ["shape"]:
        for f in _forms("colour", w):
            table[f] = ("colour", w)
    for f in _forms("shape", ""):
        table[f] = ("shape", "")
    for c in COLOURS:
        for f in _forms("shape_of", c):
            table[f] = ("shape_of", c)
    return table


def meaning(question: str) -> Meaning:
    """The meaning of an easy-VQA question, e.g. ("has", "red") for "is a red shape present?"."""
    try:
        return _surface_table()[question]
    except KeyError:
        raise ValueError(f"not an easy-VQA question form: {question!r}") from None


def paraphrase(question: str, rng: random.Random) -> str:
    """Another surface form of the same meaning (so the same answer for the same image)."""
    kind, w = meaning(question)
    others = [f for f in _forms(kind, w) if f != question]
    return rng.choice(others)


# ---- answers ----------------------------------------------------------------------------
def wrong_answer(answer: str, rng: random.Random) -> str:
    """A counterfactual answer of the same type."""
    if answer in ("yes", "no"):
        return "no" if answer == "yes" else "yes"
    pool = COLOURS if answer in COLOURS else SHAPES
    return rng.choice([a for a in pool if a != answer])


def wrong_caption(colour: str, shape: str, rng: random.Random) -> str:
    if rng.random() < 0.5:
        return ev.caption(wrong_answer(colour, rng), shape)
    return ev.caption(colour, wrong_answer(shape, rng))


# ---- builder ----------------------------------------------------------------------------
class _Split:
    """Per-split lookups: labels, images by label, questions by image."""

    def __init__(self, split: str) -> None:
        self.split = split
        self.labels = ev.image_labels(split)
        self.by_label: dict[tuple[str, str], list[int]] = {}
        for i in sorted(self.labels):
            self.by_label.setdefault(self.labels[i], []).append(i)
        self.questions_of: dict[int, list[tuple[str, str]]] = {}
        for q, a, i in ev.questions(split):
            self.questions_of.setdefault(i, []).append((q, a))
        self.used: set[int] = set()

    def rel(self, i: int) -> str:
        self.used.add(i)
        return f"images/{self.split}/{i}.png"

    def same_content(self, i: int, rng: random.Random) -> int | None:
        others = [j for j in self.by_label[self.labels[i]] if j != i]
        return rng.choice(others) if others else None

    def unrelated(self, i: int, rng: random.Random) -> int:
        c, s = self.labels[i]
        pool = [lab for lab in self.by_label if lab[0] != c and lab[1] != s]
        j = rng.choice(self.by_label[rng.choice(sorted(pool))])
        return j


def _common(sp: _Split, i: int, rng: random.Random, facts: list[tuple[str, str]]) -> dict[str, Any] | None:
    j = sp.same_content(i, rng)
    if j is None:
        return None
    m = sp.unrelated(i, rng)
    m_q, m_a = rng.choice(sp.questions_of[m])
    loc, loc_ans = rng.choice(facts)
    return {"image": sp.rel(i), "image_rephrase": sp.rel(j), "loc": loc, "loc_ans": loc_ans,
            "m_loc": sp.rel(m), "m_loc_q": m_q, "m_loc_a": m_a}


def _vqa_records(sp: _Split, items: list[tuple[int, str, str, int]], preds: dict[int, str] | None,
                 counterfactual: bool, rng: random.Random, facts) -> list[dict[str, Any]]:
    out = []
    for qi, q, a, i in items:
        base = _common(sp, i, rng, facts)
        if base is None:
            continue
        rec = {"src": q, "alt": wrong_answer(a, rng) if counterfactual else a,
               "rephrase": paraphrase(q, rng), **base}
        if preds is not None:
            rec["pred"] = preds[qi]
        out.append(rec)
    return out


def _caption_records(sp: _Split, ids: list[int], preds: dict[int, str] | None, counterfactual: bool,
                     rng: random.Random, facts) -> list[dict[str, Any]]:
    out = []
    for i in ids:
        base = _common(sp, i, rng, facts)
        if base is None:
            continue
        src = ev.CAPTION_PROMPTS[0] if preds is not None else rng.choice(ev.CAPTION_PROMPTS)
        c, s = sp.labels[i]
        rec = {"src": src, "alt": wrong_caption(c, s, rng) if counterfactual else ev.caption(c, s),
               "rephrase": rng.choice([p for p in ev.CAPTION_PROMPTS if p != src]), **base}
        if preds is not None:
            rec["pred"] = preds[i]
        out.append(rec)
    return out


def load_predictions() -> dict[str, Any]:
    f = ASSETS / "default" / "predictions.json"
    if not f.exists():
        raise FileNotFoundError(f"{f} is missing: train the default model first (`mmke train base`)")
    return json.loads(f.read_text())


def _write(out: Path, name: str, records: list[dict[str, Any]]) -> None:
    (out / name).write_text(json.dumps(records, indent=1, sort_keys=True) + "\n")


def build_benchmark(out_dir: str | Path, *, seed: int = 0, predictions: dict[str, Any] | None = None,
                    n_train_vqa: int = 2000, n_train_caption: int = 1000, n_eval: int | None = None,
                    counterfactual: bool = False) -> dict[str, Any]:
    """Write {vqa,caption}_{train,eval}.json, the images they use and manifest.json to out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    preds = predictions if predictions is not None else load_predictions()
    facts = capital_questions()
    test, train = _Split("test"), _Split("train")
    want_ok = 1 if counterfactual else 0

    # E-VQA-lite eval: test questions the model gets wrong (or right, for counterfactuals)
    tq = ev.questions("test")
    cands = [(k, q, a, i) for k, ((q, a, i), (ok, _)) in enumerate(zip(tq, preds["test_questions"]))
             if ok == want_ok and i in test.labels]
    rng = random.Random(seed)
    rng.shuffle(cands)
    vqa_eval = _vqa_records(test, sorted(cands[:n_eval] if n_eval else cands), 
                            {k: p for k, (_, p) in enumerate(preds["test_questions"])}, counterfactual,
                            random.Random(seed + 1), facts)
    # E-IC-lite eval: test images whose caption the model gets wrong (or right)
    caps = preds["test_captions"]
    cap_ids = [i for i in sorted(test.labels) if caps.get(str(i), [1])[0] == want_ok]
    rng.shuffle(cap_ids)
    cap_eval = _caption_records(test, sorted(cap_ids[:n_eval] if n_eval else cap_ids),
                                {int(k): v[1] for k, v in caps.items()}, counterfactual,
                                random.Random(seed + 2), facts)
    # train splits: any train question / labelled train image (retrieval pools, editor training)
    trq = [(k, q, a, i) for k, (q, a, i) in enumerate(ev.questions("train")) if i in train.labels]
    trq = sorted(random.Random(seed + 3).sample(trq, min(n_train_vqa, len(trq))))
    vqa_train = _vqa_records(train, trq, None, counterfactual, random.Random(seed + 4), facts)
    tr_ids = sorted(random.Random(seed + 5).sample(sorted(train.labels), min(n_train_caption, len(train.labels))))
    cap_train = _caption_records(train, tr_ids, None, counterfactual, random.Random(seed + 6), facts)

    for name, recs in (("vqa_eval.json", vqa_eval), ("caption_eval.json", cap_eval),
                       ("vqa_train.json", vqa_train), ("caption_train.json", cap_train)):
        _write(out, name, recs)
    for sp in (test, train):
        d = out / "images" / sp.split
        d.mkdir(parents=True, exist_ok=True)
        for i in sorted(sp.used):
            dst = d / f"{i}.png"
            if not dst.exists():
                shutil.copyfile(ev.image_path(sp.split, i), dst)
    for name, recs in (("vqa_eval", vqa_eval), ("caption_eval", cap_eval)):
        if len(recs) < MIN_CASES_WARNING:
            log.warning("%s has only %d cases (the default model gets few of them wrong); "
                        "--counterfactual gives more", name, len(recs))
    manifest = {
        "source": "easy-vqa 1.0 (package easy-vqa)", "mmke_version": __version__, "seed": seed,
        "counterfactual": counterfactual, "weights": preds.get("weights"),
        "counts": {"vqa_eval": len(vqa_eval), "caption_eval": len(cap_eval),
                   "vqa_train": len(vqa_train), "caption_train": len(cap_train)},
        "eval_cases": ("cases the default model gets right, targets set to a chosen wrong answer"
                       if counterfactual else "cases the default model gets wrong"),
        "files": {"vqa": ["vqa_eval.json", "vqa_train.json"],
                  "caption": ["caption_eval.json", "caption_train.json"]},
        "image_root": ".",
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest
