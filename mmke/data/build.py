"""Build the bundled benchmark (E-VQA-lite, E-IC-lite) from the easy-VQA package (SPEC §1).

:func:`build_benchmark` builds **version 2** by default (:mod:`mmke.data.build_v2`: leak-free
splits, disjoint T-Locality pools, eval sets balanced by answer type, hard M-Locality inputs);
``version=1`` builds the original benchmark, described here, byte for byte as before.

Version 1: eval cases are the easy-VQA **test** cases the default model gets wrong (its
``predictions.json``); with ``counterfactual`` they are cases it gets right, with a chosen wrong
answer as the target. Every record has all MMEdit fields:

- ``rephrase``: another phrasing of the question with the same meaning, hence the same answer for
  the same image (see :func:`canonicalise`); for captions another caption prompt;
- ``image_rephrase``: another image with the same colour and shape;
- ``m_loc``/``m_loc_q``/``m_loc_a``: a real easy-VQA question and answer about an image that
  differs in colour *and* shape;
- ``loc``/``loc_ans``: an NQ-style country-capital question (:mod:`mmke.data.textfacts`), one
  pool for every split.

Train files are built the same way from the easy-VQA **train** split (retrieval pools, editor
training data), without ``pred``. The output is deterministic for a seed; nothing is written
outside ``out_dir``, and every file is written atomically (a temporary file in the same folder,
then ``os.replace``), ``manifest.json`` last.

This module also holds what both versions share: the question canonicaliser and paraphraser,
:func:`answer_of` (the answer a question has for an image label), counterfactual answers, the
per-split lookups and the predictions reader.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from mmke.data import easyvqa_source as ev
from mmke.data.textfacts import capital_questions
from mmke.data.textfacts import source_version as facts_source
from mmke.io import atomic_write_bytes, atomic_write_json
from mmke.models.default import COLOURS, SHAPES
from mmke.paths import ASSETS

log = logging.getLogger(__name__)

MIN_CASES_WARNING = 50  # fewer eval cases than this: warn and say so in the manifest
FILES = ("vqa_eval.json", "caption_eval.json", "vqa_train.json", "caption_train.json")

# ---- question meanings ---------------------------------------------------------------------
# A meaning is (kind, argument):
#   ("contains", w)      is there a <w>?            w a colour ("red shape") or a shape
#   ("not_contains", w)  does the image not contain a <w>?
#   ("color", None|s)    what color is the shape / the <s>?
#   ("shape", None|c)    what shape is in the image / what is the <c> shape?
Meaning = tuple[str, str | None]

_C, _S = "|".join(COLOURS), "|".join(SHAPES)
_OBJ = rf"(?:(?P<c>{_C}) shape|(?P<s>{_S}))"  # "red shape" or "circle"
_PATTERNS: list[tuple[str, re.Pattern[str]]] = [(kind, re.compile(p)) for kind, p in [
    ("contains", rf"is there an? {_OBJ}(?: in the image)?\?"),
    ("contains", rf"does the image contain an? {_OBJ}\?"),
    ("contains", rf"is an? {_OBJ} present\?"),
    ("contains", rf"can you see an? {_OBJ}\?"),  # mmke fallback
    ("not_contains", rf"is there not an? {_OBJ}(?: in the image)?\?"),
    ("not_contains", rf"does the image not contain an? {_OBJ}\?"),
    ("not_contains", rf"is no {_OBJ} present\?"),
    ("not_contains", rf"is there no {_OBJ}\?"),  # mmke fallback
    ("color", rf"what colou?r is the (?:shape|(?P<s>{_S}))\?"),
    ("color", rf"what is the colou?r of the (?:shape|(?P<s>{_S}))\?"),
    ("color", rf"which colou?r is the (?:shape|(?P<s>{_S}))\?"),  # mmke fallback
    ("shape", r"what shape (?:is in the image|does the image contain|is present)\?"),
    ("shape", rf"what is the (?P<c>{_C}) shape\?"),
    ("shape", rf"which shape is (?:shown|(?P<c>{_C}))\?"),  # mmke fallback
]]


def canonicalise(question: str) -> Meaning:
    """The meaning of an easy-VQA question: ``("contains", "red")`` for "is a red shape present?",
    ``("color", None)`` for "what is the color of the shape?", ``("shape", "blue")`` for
    "what is the blue shape?". Questions with the same meaning have the same answer for the same
    image. Raises ValueError for a question outside easy-VQA's (and mmke's fallback) forms."""
    q = " ".join(question.lower().split())
    for kind, pattern in _PATTERNS:
        m = pattern.fullmatch(q)
        if m:
            groups = m.groupdict()
            return kind, groups.get("c") or groups.get("s")
    raise ValueError(f"not an easy-VQA question form: {question!r}")


def _fallback_form(meaning: Meaning) -> str:
    """mmke's own phrasing of a meaning, used when easy-VQA has a single form of it (in easy-VQA
    1.0 only "what is the <colour> shape?", whose fallback is "which shape is <colour>?")."""
    kind, w = meaning
    noun = f"{w} shape" if w in COLOURS else w
    if kind == "contains":
        return f"can you see a {noun}?"
    if kind == "not_contains":
        return f"is there no {noun}?"
    if kind == "color":
        return f"which color is the {w or 'shape'}?"
    return f"which shape is {w or 'shown'}?"


@lru_cache(maxsize=1)
def _observed_forms() -> dict[Meaning, tuple[str, ...]]:
    """Every distinct easy-VQA question (both splits), grouped by meaning, sorted."""
    forms: dict[Meaning, set[str]] = {}
    for split in ev.SPLITS:
        for q, _, _ in ev.questions(split):
            forms.setdefault(canonicalise(q), set()).add(q)
    return {m: tuple(sorted(qs)) for m, qs in forms.items()}


def surface_forms(meaning: Meaning) -> list[str]:
    """The phrasings of a meaning: easy-VQA's own, plus mmke's fallback if it has only one."""
    forms = list(_observed_forms().get(meaning, ()))
    if len(forms) < 2:
        forms.append(_fallback_form(meaning))
    return forms


def paraphrase(question: str, rng: random.Random) -> str:
    """Another phrasing with the same meaning (so the same answer for the same image)."""
    return rng.choice([f for f in surface_forms(canonicalise(question)) if f != question])


meaning = canonicalise  # short alias


def answer_of(meaning: Meaning, colour: str, shape: str) -> str | None:
    """The answer of a question with this meaning for an image of one ``colour`` ``shape``, or
    None when the question presupposes what the image lacks ("what color is the triangle?" about
    a circle)."""
    kind, w = meaning
    if kind == "contains":
        return "yes" if w in (colour, shape) else "no"
    if kind == "not_contains":
        return "no" if w in (colour, shape) else "yes"
    if kind == "color":
        return colour if w in (None, shape) else None
    if kind == "shape":
        return shape if w in (None, colour) else None
    raise ValueError(f"unknown question meaning {meaning!r}")


# ---- counterfactual answers ----------------------------------------------------------------
def wrong_answer(answer: str, rng: random.Random) -> str:
    """A counterfactual answer of the same type: yes<->no, another colour, another shape."""
    if answer in ("yes", "no"):
        return "no" if answer == "yes" else "yes"
    pool = COLOURS if answer in COLOURS else SHAPES if answer in SHAPES else None
    if pool is None:
        raise ValueError(f"not an easy-VQA answer: {answer!r}")
    return rng.choice([a for a in pool if a != answer])


def wrong_caption(colour: str, shape: str, rng: random.Random) -> str:
    """A caption with the colour or the shape changed."""
    if rng.random() < 0.5:
        return ev.caption(wrong_answer(colour, rng), shape)
    return ev.caption(colour, wrong_answer(shape, rng))


# ---- per-split lookups ---------------------------------------------------------------------
class _Split:
    """Labels, images by label and questions by image of one easy-VQA split; remembers which
    images the records use so that only those are copied."""

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
        self._pools: dict[tuple[str, str], list[int]] = {}

    def rel(self, i: int) -> str:
        """The record's path of image ``i``, relative to the benchmark directory."""
        self.used.add(i)
        return f"images/{self.split}/{i}.png"

    def same_content(self, i: int, rng: random.Random) -> int | None:
        """Another image with the same (colour, shape), or None if there is none."""
        others = [j for j in self.by_label[self.labels[i]] if j != i]
        return rng.choice(others) if others else None

    def unrelated(self, i: int, rng: random.Random) -> int | None:
        """An image of another colour and another shape (that has questions), or None."""
        pool = self._unrelated_pool(self.labels[i])
        return rng.choice(pool) if pool else None

    def _unrelated_pool(self, label: tuple[str, str]) -> list[int]:
        if label not in self._pools:
            c, s = label
            self._pools[label] = [j for lab in sorted(self.by_label) if lab[0] != c and lab[1] != s
                                  for j in self.by_label[lab] if j in self.questions_of]
        return self._pools[label]


def _context_fields(sp: _Split, i: int, rng: random.Random,
                    facts: list[tuple[str, str]]) -> dict[str, str] | None:
    """The fields every record of image ``i`` shares: image_rephrase, m_loc*, loc*."""
    j, m = sp.same_content(i, rng), sp.unrelated(i, rng)
    if j is None or m is None:
        return None
    m_q, m_a = rng.choice(sp.questions_of[m])
    loc, loc_ans = rng.choice(facts)
    return {"image": sp.rel(i), "image_rephrase": sp.rel(j), "loc": loc, "loc_ans": loc_ans,
            "m_loc": sp.rel(m), "m_loc_q": m_q, "m_loc_a": m_a}


def _record(src: str, alt: str, rephrase: str, ctx: dict[str, str], pred: str | None) -> dict[str, str]:
    """An MMEdit record with its fields in the usual order."""
    rec = {"src": src, "alt": alt, "rephrase": rephrase, "image": ctx["image"],
           "image_rephrase": ctx["image_rephrase"], "loc": ctx["loc"], "loc_ans": ctx["loc_ans"],
           "m_loc": ctx["m_loc"], "m_loc_q": ctx["m_loc_q"], "m_loc_a": ctx["m_loc_a"]}
    if pred is not None:
        rec["pred"] = pred
    return rec


@dataclass(frozen=True)
class _Question:
    """An easy-VQA question of a split, with its position in ``questions(split)``."""

    pos: int
    text: str
    answer: str
    image: int


def _vqa_records(sp: _Split, items: list[_Question], preds: list[str] | None, counterfactual: bool,
                 rng: random.Random, facts: list[tuple[str, str]]) -> list[dict[str, str]]:
    """E-VQA records for ``items``; ``preds`` (by question position) only for eval records."""
    out = []
    for it in items:
        ctx = _context_fields(sp, it.image, rng, facts)
        if ctx is None:
            continue
        alt = wrong_answer(it.answer, rng) if counterfactual else it.answer
        pred = preds[it.pos] if preds is not None else None
        out.append(_record(it.text, alt, paraphrase(it.text, rng), ctx, pred))
    return out


def _caption_records(sp: _Split, ids: list[int], preds: dict[int, str] | None,
                     counterfactual: bool, rng: random.Random,
                     facts: list[tuple[str, str]]) -> list[dict[str, str]]:
    """Eval records (``preds`` given) use the prompt the predictions were made with,
    CAPTION_PROMPTS[0]; train records use any caption prompt, for variety."""
    out = []
    for i in ids:
        ctx = _context_fields(sp, i, rng, facts)
        if ctx is None:
            continue
        src = ev.CAPTION_PROMPTS[0] if preds is not None else rng.choice(ev.CAPTION_PROMPTS)
        c, s = sp.labels[i]
        alt = wrong_caption(c, s, rng) if counterfactual else ev.caption(c, s)
        rephrase = rng.choice([p for p in ev.CAPTION_PROMPTS if p != src])
        out.append(_record(src, alt, rephrase, ctx, preds[i] if preds is not None else None))
    return out


# ---- predictions ---------------------------------------------------------------------------
def load_predictions() -> dict[str, Any]:
    """The default model's committed teacher-forced predictions on the easy-VQA test split."""
    f = ASSETS / "default" / "predictions.json"
    if not f.exists():
        raise FileNotFoundError(f"{f} is missing: the bundled benchmark picks the cases the default "
                                f"model gets wrong; train the default model first (`mmke train base`)")
    return json.loads(f.read_text())


def _check_predictions(preds: dict[str, Any]) -> tuple[list[tuple[int, str]], dict[int, tuple[int, str]]]:
    """(per test question: (ok, pred)), (per test image id: (ok, caption)), checked for shape."""
    n = len(ev.questions("test"))
    tq, tc = preds.get("test_questions"), preds.get("test_captions")
    if not isinstance(tq, list) or len(tq) != n:
        got = len(tq) if isinstance(tq, list) else type(tq).__name__
        raise ValueError(f"predictions['test_questions'] must list one [ok, pred] per easy-VQA test "
                         f"question ({n}), got {got}")
    if not isinstance(tc, dict):
        raise ValueError("predictions['test_captions'] must map image ids to [ok, caption]")
    try:
        questions = [(int(ok), str(p)) for ok, p in tq]
        captions = {int(k): (int(v[0]), str(v[1])) for k, v in tc.items()}
    except (TypeError, ValueError) as e:
        raise ValueError(f"malformed predictions entry ({e}); expected [ok, prediction] pairs") from e
    missing = [i for i in ev.image_labels("test") if i not in captions]
    if missing:
        log.warning("predictions have no caption for %d labelled test images; they are left out",
                    len(missing))
    return questions, captions


# ---- builder -------------------------------------------------------------------------------
def _pick(items: list[Any], n: int | None, rng: random.Random) -> list[Any]:
    """Up to ``n`` items (all if None) in a seed-dependent order."""
    items = list(items)
    rng.shuffle(items)
    return items if n is None else items[:n]


def _write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON atomically (builds racing on one folder each write their own temporary file)."""
    atomic_write_json(path, data, ensure_ascii=False)


def _copy_images(out: Path, splits: list[_Split]) -> None:
    """Copy the images the records use to ``out/images/<split>/<id>.png``, each atomically."""
    for sp in splits:
        d = out / "images" / sp.split
        for i in sorted(sp.used):
            atomic_write_bytes(d / f"{i}.png", Path(ev.image_path(sp.split, i)).read_bytes())


def _start_output(out: Path) -> None:
    """Create ``out`` and remove a previous build's manifest.json: until the new manifest is
    written last, the folder does not claim to hold a complete build."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)


def _check_sizes(**sizes: int | None) -> None:
    for name, n in sizes.items():
        if n is not None and (not isinstance(n, int) or n < 1):
            raise ValueError(f"{name} must be a positive integer, got {n!r}")


def _easyvqa_version() -> str:
    try:
        return importlib.metadata.version("easy-vqa")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def build_benchmark(out_dir: str | Path, *, version: int = 2, seed: int = 0,
                    predictions: dict[str, Any] | None = None, n_train_vqa: int = 2000,
                    n_train_caption: int = 1000, n_eval: int | None = None,
                    n_eval_vqa: int | None = None, n_eval_caption: int | None = None,
                    counterfactual: bool = False) -> dict[str, Any]:
    """Write ``{vqa,caption}_{eval,train}.json``, the images they use (``images/{train,test}/``)
    and ``manifest.json`` under ``out_dir``; return the manifest.

    ``version``: 2 (the default, :func:`mmke.data.build_v2.build_v2`) or 1.
    ``predictions``: the default model's correctness on the test split (see ``load_predictions``,
    the default). Version 1: ``n_eval`` caps the eval records of both tasks (None: all
    candidates; ``n_eval_vqa`` / ``n_eval_caption`` override it per task); ``counterfactual``:
    edit cases the model gets right, towards a chosen wrong answer. Version 2: ``n_eval`` sets
    both ``n_eval_vqa`` and ``n_eval_caption`` (defaults 1000 and 500); ``counterfactual`` is
    refused (version 2 mixes counterfactual cases into every eval file).
    """
    if version not in (1, 2) or isinstance(version, bool):
        raise ValueError(f"benchmark version must be 1 or 2, got {version!r}")
    _check_sizes(n_train_vqa=n_train_vqa, n_train_caption=n_train_caption, n_eval=n_eval,
                 n_eval_vqa=n_eval_vqa, n_eval_caption=n_eval_caption)
    if version == 2:
        if counterfactual:
            raise ValueError("counterfactual is a version-1 option: version 2 already mixes "
                             "counterfactual cases into its eval files; use version 1 for an "
                             "all-counterfactual build")
        from mmke.data.build_v2 import build_v2

        return build_v2(out_dir, seed=seed, predictions=predictions, n_train_vqa=n_train_vqa,
                        n_train_caption=n_train_caption, n_eval=n_eval, n_eval_vqa=n_eval_vqa,
                        n_eval_caption=n_eval_caption)
    return _build_v1(out_dir, seed=seed, predictions=predictions, n_train_vqa=n_train_vqa,
                     n_train_caption=n_train_caption, n_eval_vqa=n_eval if n_eval_vqa is None else n_eval_vqa,
                     n_eval_caption=n_eval if n_eval_caption is None else n_eval_caption, n_eval=n_eval,
                     counterfactual=counterfactual)


def _build_v1(out_dir: str | Path, *, seed: int, predictions: dict[str, Any] | None,
              n_train_vqa: int, n_train_caption: int, n_eval_vqa: int | None,
              n_eval_caption: int | None, n_eval: int | None, counterfactual: bool) -> dict[str, Any]:
    """The version-1 build (see the module docstring)."""
    from mmke import __version__

    out = Path(out_dir)
    raw = predictions if predictions is not None else load_predictions()
    q_preds, c_preds = _check_predictions(raw)
    facts = capital_questions()
    test, train = _Split("test"), _Split("train")
    want_ok = 1 if counterfactual else 0
    rng = lambda stream: random.Random(f"{seed}:{stream}")  # noqa: E731  one stream per file

    # eval: test cases the model gets wrong (or right, for counterfactuals)
    # "wrong" = not one answer token right, where the predictions say (pre-edit Rel 0 by construction)
    tok_acc = raw.get("test_questions_token_acc")
    vqa_cands = [_Question(k, q, a, i) for k, (q, a, i) in enumerate(ev.questions("test"))
                 if q_preds[k][0] == want_ok and i in test.labels
                 and (counterfactual or tok_acc is None or tok_acc[k] == 0)]
    cap_cands = [i for i in sorted(test.labels) if i in c_preds and c_preds[i][0] == want_ok]
    vqa_eval = _vqa_records(test, _pick(vqa_cands, n_eval_vqa, rng("vqa_eval/pick")),
                            [p for _, p in q_preds], counterfactual, rng("vqa_eval"), facts)
    cap_eval = _caption_records(test, _pick(cap_cands, n_eval_caption, rng("caption_eval/pick")),
                                {i: p for i, (_, p) in c_preds.items()}, counterfactual,
                                rng("caption_eval"), facts)
    # train: any train question / labelled train image (retrieval pools, editor training)
    tr_q = [_Question(k, q, a, i) for k, (q, a, i) in enumerate(ev.questions("train")) if i in train.labels]
    vqa_train = _vqa_records(train, _pick(tr_q, n_train_vqa, rng("vqa_train/pick")), None,
                             counterfactual, rng("vqa_train"), facts)
    cap_train = _caption_records(train, _pick(sorted(train.labels), n_train_caption,
                                              rng("caption_train/pick")),
                                 None, counterfactual, rng("caption_train"), facts)

    _start_output(out)
    _copy_images(out, [test, train])
    records = dict(zip(FILES, (vqa_eval, cap_eval, vqa_train, cap_train)))
    for name, recs in records.items():
        _write_json(out / name, recs)
    warnings = _few_cases_warnings(vqa_eval=len(vqa_cands), caption_eval=len(cap_cands),
                                   counterfactual=counterfactual)
    manifest = {
        "source": f"easy-vqa {_easyvqa_version()} (package easy-vqa)",
        "text_facts": facts_source(),
        "mmke_version": __version__,
        "seed": seed,
        "counterfactual": counterfactual,
        "weights": raw.get("weights"),
        "eval_cases": ("cases the default model gets right, targets set to a chosen wrong answer"
                       if counterfactual else "cases the default model gets wrong"),
        "counts": {name[:-5]: len(recs) for name, recs in records.items()},
        "candidates": {"vqa_eval": len(vqa_cands), "caption_eval": len(cap_cands)},
        "n_eval": n_eval,
        "warnings": warnings,
        "files": {"vqa": ["vqa_eval.json", "vqa_train.json"],
                  "caption": ["caption_eval.json", "caption_train.json"]},
        "image_root": ".",
    }
    _write_json(out / "manifest.json", manifest)  # last: its presence marks a complete build
    log.info("built the benchmark under %s: %s", out, manifest["counts"])
    return manifest


def _few_cases_warnings(*, counterfactual: bool, **candidates: int) -> list[str]:
    """Warn (log and manifest) about eval tasks with fewer candidate cases than MIN_CASES_WARNING."""
    warnings = []
    for name, n in candidates.items():
        if n < MIN_CASES_WARNING:
            what = "right" if counterfactual else "wrong"
            hint = "" if counterfactual else "; --counterfactual gives more cases"
            msg = (f"{name}: only {n} cases the default model gets {what} "
                   f"(fewer than {MIN_CASES_WARNING}){hint}")
            log.warning(msg)
            warnings.append(msg)
    return warnings
