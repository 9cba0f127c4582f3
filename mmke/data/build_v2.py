"""Version 2 of the bundled benchmark ("leak-free"), the default of ``mmke data build``.

What changes from version 1 (:mod:`mmke.data.build`, still buildable with ``version=1``):

- **No leaks.** Train and eval files share no input (:mod:`mmke.data.leaks`): eval uses easy-VQA
  test images, train uses train images, and T-Locality questions come from disjoint pools of
  countries (:func:`mmke.data.textfacts.fact_pools`: eval files draw ``loc`` from the eval pool,
  train files from the train pool). The check runs on the written files; a build that leaks
  raises :class:`LeakError` and writes no ``manifest.json``.
- **E-VQA eval balanced by answer type.** At most :data:`YES_NO_MAX` of ``n_eval_vqa`` cases are
  yes/no (genuine errors of the default model); the rest are split evenly between colour and shape
  answers, the model's genuine errors first, then *counterfactual* edits of questions it answers
  rightly (``alt`` another colour / shape, ``pred`` the model's prediction).
- **E-IC eval**: the test images the model captions wrongly, filled up to ``n_eval_caption``
  with counterfactual captions of images it captions rightly.
- **Hard M-Locality inputs.** A seeded coin per record (eval and train files alike) makes about
  :data:`HARD_FRACTION` of the ``m_loc`` inputs the hard kind: the record's own ``src`` verbatim,
  about an unrelated image (other colour and other shape), with that image's true answer, which
  is not the edit's target where such an image exists (so an edit that ignores the image
  shows). The rest are a random easy-VQA question about an unrelated image that is never ``src``
  or ``rephrase`` (:func:`mmke.data.schema.is_hard_m_loc` tells the kinds apart). Questions that
  presuppose the edit image's shape or colour ("what color is the triangle?") have no answer for
  an unrelated image, so they always get the other kind; the coin's odds are raised for the rest
  of their file so that about half of it is still hard.
- Every record carries ``counterfactual`` (bool) and ``answer_type``
  (``"yes/no" | "colour" | "shape" | "caption"``).
- The manifest has ``"version": 2``, a ``content_hash``, the composition of each file, the fact
  pools, the leak check, the seed and warnings.

Deterministic for a seed; nothing is written outside ``out_dir``; every file is written
atomically, the manifest last.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmke.data import build as b
from mmke.data import easyvqa_source as ev
from mmke.data.leaks import check_benchmark_dir
from mmke.data.schema import is_hard_m_loc, norm_text
from mmke.data.textfacts import EVAL_FRACTION, fact_pools, source_versions
from mmke.models.default import COLOURS, SHAPES

log = logging.getLogger(__name__)

VERSION = 2
N_EVAL_VQA, N_EVAL_CAPTION = 1000, 500
YES_NO_MAX = 0.4  # share of yes/no cases in the E-VQA eval file, at most
HARD_FRACTION = 0.5  # share of hard M-Locality inputs per file (about)
VQA_TYPES = ("yes/no", "colour", "shape")
Facts = tuple[tuple[str, str], ...]


class LeakError(ValueError):
    """A built benchmark's train and eval files share inputs; the build is refused."""


def answer_type(answer: str) -> str:
    """``"yes/no"``, ``"colour"`` or ``"shape"``: the type of an easy-VQA answer."""
    if answer in ("yes", "no"):
        return "yes/no"
    if answer in COLOURS:
        return "colour"
    if answer in SHAPES:
        return "shape"
    raise ValueError(f"not an easy-VQA answer: {answer!r}")


def hard_possible(question: str) -> bool:
    """Whether ``question`` has an answer for every image (so it can be a hard M-Locality
    question about an unrelated image): not one that presupposes a shape or colour."""
    kind, w = b.canonicalise(question)
    return kind in ("contains", "not_contains") or w is None


def _hard_odds(feasible: int, total: int) -> float:
    """The coin's odds that make about HARD_FRACTION of ``total`` records hard when only
    ``feasible`` of them can be."""
    return 0.0 if feasible == 0 else min(1.0, HARD_FRACTION * total / feasible)


def _usable(sp: b._Split, i: int) -> bool:
    """Image ``i`` has another image of its label and an unrelated image (so a full record)."""
    return len(sp.by_label[sp.labels[i]]) > 1 and bool(sp._unrelated_pool(sp.labels[i]))


def _counterfactual_alt(answer: str, pred: str, rng: random.Random) -> str:
    """Another answer of the same type as ``answer``, never the model's ``pred``."""
    pool = COLOURS if answer in COLOURS else SHAPES
    return rng.choice([a for a in pool if a not in (answer, pred)])


def _counterfactual_caption(colour: str, shape: str, pred: str, rng: random.Random) -> str:
    """A caption with the colour or the shape changed, never the model's ``pred``."""
    for _ in range(100):
        alt = b.wrong_caption(colour, shape, rng)
        if alt != pred:
            return alt
    raise RuntimeError(f"no counterfactual caption for {colour} {shape} other than {pred!r}")


# ---- the fields every record shares -------------------------------------------------------
def _hard_answer(src: str, label: tuple[str, str], caption: bool) -> str:
    """The true answer of ``src`` for an image with ``label`` (for captions its caption)."""
    answer = ev.caption(*label) if caption else b.answer_of(b.canonicalise(src), *label)
    assert answer is not None  # hard_possible(src) was checked
    return answer


def _m_loc(sp: b._Split, i: int, src: str, rephrase: str, alt: str, hard: bool, caption: bool,
           rng: random.Random) -> tuple[int, str, str]:
    """(unrelated image, question, answer) for M-Locality. Hard: ``src`` itself about an
    unrelated image (other colour and other shape), with that image's true answer (for captions
    its caption); where possible one whose answer is not the edit target ``alt``, so that an edit
    which ignores the image shows. Otherwise a random easy-VQA question about an unrelated image
    that is neither ``src`` nor ``rephrase``."""
    if hard:
        pool = sp._unrelated_pool(sp.labels[i])
        labels = {lab for lab in sp.by_label if _hard_answer(src, lab, caption) != alt}
        m = rng.choice([j for j in pool if sp.labels[j] in labels] or pool)
        return m, src, _hard_answer(src, sp.labels[m], caption)
    m = sp.unrelated(i, rng)
    assert m is not None  # _usable(sp, i) was checked
    taboo = {norm_text(src), norm_text(rephrase)}

    def others() -> Iterator[int]:  # the first unrelated image, then (rarely needed) all of them
        yield m
        pool = sp._unrelated_pool(sp.labels[i])
        yield from rng.sample(pool, len(pool))

    for j in others():
        choices = [(q, a) for q, a in sp.questions_of[j] if norm_text(q) not in taboo]
        if choices:
            q, a = rng.choice(choices)
            return j, q, a
    raise RuntimeError(f"no M-Locality question for image {i} of the {sp.split} split")


def _record(sp: b._Split, i: int, *, src: str, alt: str, rephrase: str, pred: str | None,
            hard: bool, caption: bool, counterfactual: bool, kind: str, facts: Facts,
            rng: random.Random) -> dict[str, Any]:
    """A v2 record of image ``i`` (MMEdit fields in the usual order, then ``pred``,
    ``counterfactual`` and ``answer_type``)."""
    j = sp.same_content(i, rng)
    assert j is not None  # _usable(sp, i) was checked
    m, m_q, m_a = _m_loc(sp, i, src, rephrase, alt, hard, caption, rng)
    loc, loc_ans = rng.choice(facts)
    rec: dict[str, Any] = {"src": src, "alt": alt, "rephrase": rephrase, "image": sp.rel(i),
                           "image_rephrase": sp.rel(j), "loc": loc, "loc_ans": loc_ans,
                           "m_loc": sp.rel(m), "m_loc_q": m_q, "m_loc_a": m_a}
    if pred is not None:
        rec["pred"] = pred
    rec["counterfactual"] = counterfactual
    rec["answer_type"] = kind
    return rec


# ---- E-VQA -----------------------------------------------------------------------------------
def _vqa_records(sp: b._Split, items: list[tuple[b._Question, bool]], preds: list[str] | None,
                 facts: Facts, rng: random.Random) -> list[dict[str, Any]]:
    """E-VQA records for (question, counterfactual) items, in the items' order; ``preds`` (by
    question position) only for eval records."""
    odds = _hard_odds(sum(hard_possible(q.text) for q, _ in items), len(items))
    out = []
    for q, cf in items:
        pred = preds[q.pos] if preds is not None else None
        alt = _counterfactual_alt(q.answer, pred or q.answer, rng) if cf else q.answer
        rephrase = b.paraphrase(q.text, rng)
        hard = hard_possible(q.text) and rng.random() < odds
        out.append(_record(sp, q.image, src=q.text, alt=alt, rephrase=rephrase, pred=pred,
                           hard=hard, caption=False, counterfactual=cf,
                           kind=answer_type(q.answer), facts=facts, rng=rng))
    return out


def _vqa_quotas(n: int, available: dict[str, int]) -> dict[str, int]:
    """Cases per answer type: yes/no at most YES_NO_MAX of ``n``; the rest split evenly between
    colour and shape, one type's shortfall going to the other."""
    yes_no = min(int(YES_NO_MAX * n), available["yes/no"])
    rest = n - yes_no
    colour = min(rest // 2, available["colour"])
    shape = min(rest - colour, available["shape"])
    colour = min(rest - shape, available["colour"])
    return {"yes/no": yes_no, "colour": colour, "shape": shape}


def _vqa_eval_items(sp: b._Split, q_preds: list[tuple[int, str]], tok_acc: list[float] | None,
                    n: int, rng: random.Random) -> tuple[list[tuple[b._Question, bool]], dict]:
    """The E-VQA eval (question, counterfactual) items, shuffled, and the candidate counts."""
    cands: dict[str, dict[bool, list[b._Question]]] = {t: {False: [], True: []} for t in VQA_TYPES}
    for k, (q, a, i) in enumerate(ev.questions("test")):
        if i not in sp.labels or not _usable(sp, i):
            continue
        ok, kind = q_preds[k][0], answer_type(a)
        if ok == 0 and (tok_acc is None or tok_acc[k] == 0):
            cands[kind][False].append(b._Question(k, q, a, i))
        elif ok == 1 and kind != "yes/no":
            cands[kind][True].append(b._Question(k, q, a, i))
    quotas = _vqa_quotas(n, {t: len(c[False]) + len(c[True]) for t, c in cands.items()})
    items: list[tuple[b._Question, bool]] = []
    for kind in VQA_TYPES:
        ordered = ([(q, False) for q in b._pick(cands[kind][False], None, rng)]
                   + [(q, True) for q in b._pick(cands[kind][True], None, rng)])
        items += ordered[:quotas[kind]]
    rng.shuffle(items)
    counts = {t: {"genuine": len(c[False]), "counterfactual": len(c[True])} for t, c in cands.items()}
    return items, counts


# ---- E-IC ------------------------------------------------------------------------------------
def _caption_records(sp: b._Split, items: list[tuple[int, bool]], preds: dict[int, str] | None,
                     facts: Facts, rng: random.Random) -> list[dict[str, Any]]:
    """E-IC records for (image, counterfactual) items. Eval records (``preds`` given) use the
    prompt the predictions were made with, CAPTION_PROMPTS[0]; train records any caption prompt."""
    odds = _hard_odds(len(items), len(items))
    out = []
    for i, cf in items:
        src = ev.CAPTION_PROMPTS[0] if preds is not None else rng.choice(ev.CAPTION_PROMPTS)
        c, s = sp.labels[i]
        pred = preds[i] if preds is not None else None
        alt = _counterfactual_caption(c, s, pred or ev.caption(c, s), rng) if cf else ev.caption(c, s)
        rephrase = rng.choice([p for p in ev.CAPTION_PROMPTS if p != src])
        hard = rng.random() < odds
        out.append(_record(sp, i, src=src, alt=alt, rephrase=rephrase, pred=pred, hard=hard,
                           caption=True, counterfactual=cf, kind="caption", facts=facts, rng=rng))
    return out


def _caption_eval_items(sp: b._Split, c_preds: dict[int, tuple[int, str]], n: int,
                        rng: random.Random) -> tuple[list[tuple[int, bool]], dict]:
    """The E-IC eval (image, counterfactual) items: genuine errors first, counterfactual to
    fill ``n``, shuffled; and the candidate counts."""
    usable = [i for i in sorted(sp.labels) if i in c_preds and _usable(sp, i)]
    genuine = [i for i in usable if c_preds[i][0] == 0]
    right = [i for i in usable if c_preds[i][0] == 1]
    items = ([(i, False) for i in b._pick(genuine, None, rng)]
             + [(i, True) for i in b._pick(right, None, rng)])[:n]
    rng.shuffle(items)
    return items, {"caption": {"genuine": len(genuine), "counterfactual": len(right)}}


# ---- manifest parts --------------------------------------------------------------------------
def _composition(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Answer types, genuine cases per type, counterfactual and hard-M-Locality fractions."""
    n = len(records) or 1
    types: dict[str, int] = {}
    genuine: dict[str, int] = {}
    for r in records:
        types[r["answer_type"]] = types.get(r["answer_type"], 0) + 1
        genuine[r["answer_type"]] = genuine.get(r["answer_type"], 0) + (not r["counterfactual"])
    return {"records": len(records), "answer_types": dict(sorted(types.items())),
            "genuine": dict(sorted(genuine.items())),
            "counterfactual_fraction": round(sum(r["counterfactual"] for r in records) / n, 4),
            "hard_m_loc_fraction": round(sum(is_hard_m_loc(r) for r in records) / n, 4)}


def content_hash(out: Path, rel_paths: list[str]) -> str:
    """sha256 over the files at ``rel_paths`` (relative to ``out``) in sorted path order: each
    contributes its path, its size and its bytes."""
    h = hashlib.sha256()
    for rel in sorted(rel_paths):
        data = (out / rel).read_bytes()
        h.update(f"{rel}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def _shortfall_warnings(wanted: dict[str, int], got: dict[str, int]) -> list[str]:
    warnings = []
    for name, n in wanted.items():
        if got[name] < n:
            msg = f"{name}: only {got[name]} cases of the {n} asked for (too few candidates)"
            log.warning(msg)
            warnings.append(msg)
    return warnings


# ---- builder ---------------------------------------------------------------------------------
def build_v2(out_dir: str | Path, *, seed: int = 0, predictions: dict[str, Any] | None = None,
             n_train_vqa: int = 2000, n_train_caption: int = 1000, n_eval: int | None = None,
             n_eval_vqa: int | None = None, n_eval_caption: int | None = None) -> dict[str, Any]:
    """Write the version-2 benchmark under ``out_dir`` (the four JSON files, the images they use,
    ``manifest.json`` last) and return the manifest. ``n_eval`` sets both eval sizes unless
    ``n_eval_vqa`` / ``n_eval_caption`` are given (defaults 1000 / 500). Raises LeakError (and
    writes no manifest) if the written train and eval files share an input."""
    from mmke import __version__

    n_vqa = n_eval_vqa if n_eval_vqa is not None else n_eval if n_eval is not None else N_EVAL_VQA
    n_cap = (n_eval_caption if n_eval_caption is not None
             else n_eval if n_eval is not None else N_EVAL_CAPTION)
    b._check_sizes(n_train_vqa=n_train_vqa, n_train_caption=n_train_caption, n_eval_vqa=n_vqa,
                   n_eval_caption=n_cap)
    out = Path(out_dir)
    raw = predictions if predictions is not None else b.load_predictions()
    q_preds, c_preds = b._check_predictions(raw)
    pools = fact_pools(seed)
    test, train = b._Split("test"), b._Split("train")

    def rng(stream: str) -> random.Random:  # one random stream per file
        return random.Random(f"v2:{seed}:{stream}")

    vqa_items, vqa_cands = _vqa_eval_items(test, q_preds, raw.get("test_questions_token_acc"),
                                           n_vqa, rng("vqa_eval/pick"))
    vqa_eval = _vqa_records(test, vqa_items, [p for _, p in q_preds], pools.eval, rng("vqa_eval"))
    cap_items, cap_cands = _caption_eval_items(test, c_preds, n_cap, rng("caption_eval/pick"))
    cap_eval = _caption_records(test, cap_items, {i: p for i, (_, p) in c_preds.items()},
                                pools.eval, rng("caption_eval"))
    tr_q = [b._Question(k, q, a, i) for k, (q, a, i) in enumerate(ev.questions("train"))
            if i in train.labels and _usable(train, i)]
    vqa_train = _vqa_records(train, [(q, False) for q in b._pick(tr_q, n_train_vqa, rng("vqa_train/pick"))],
                             None, pools.train, rng("vqa_train"))
    tr_images = [i for i in sorted(train.labels) if _usable(train, i)]
    cap_train = _caption_records(train, [(i, False) for i in b._pick(tr_images, n_train_caption,
                                                                       rng("caption_train/pick"))],
                                 None, pools.train, rng("caption_train"))

    b._start_output(out)
    b._copy_images(out, [test, train])
    records = dict(zip(b.FILES, (vqa_eval, cap_eval, vqa_train, cap_train)))
    for name, recs in records.items():
        b._write_json(out / name, recs)
    leak = check_benchmark_dir(out)
    if leak["shared"]:
        raise LeakError(f"{out}: the train and eval files share {leak['shared']} input(s), e.g. "
                        f"{leak['leaks'][:3]}; no manifest written")
    images = [f"images/{sp.split}/{i}.png" for sp in (test, train) for i in sp.used]
    counts = {name[:-5]: len(recs) for name, recs in records.items()}
    wanted = {"vqa_eval": n_vqa, "caption_eval": n_cap, "vqa_train": n_train_vqa,
              "caption_train": n_train_caption}
    manifest = {
        "version": VERSION,
        "source": f"easy-vqa {b._easyvqa_version()} (package easy-vqa)",
        "mmke_version": __version__,
        "seed": seed,
        "weights": raw.get("weights"),
        "content_hash": content_hash(out, list(b.FILES) + images),
        "eval_cases": ("E-VQA: the default model's errors (yes/no at most "
                       f"{YES_NO_MAX:.0%}), colour and shape answers filled with counterfactual "
                       "edits of right answers; E-IC: its caption errors filled with "
                       "counterfactual captions"),
        "counts": counts,
        "sizes": wanted,
        "candidates": {"vqa_eval": vqa_cands, "caption_eval": cap_cands},
        "composition": {name[:-5]: _composition(recs) for name, recs in records.items()},
        "fact_pools": {"versions": source_versions(), "eval_fraction": EVAL_FRACTION,
                       **pools.summary()},
        "leak_check": {k: leak[k] for k in ("eval_inputs", "train_inputs", "shared")},
        "warnings": _shortfall_warnings(wanted, counts),
        "files": {"vqa": ["vqa_eval.json", "vqa_train.json"],
                  "caption": ["caption_eval.json", "caption_train.json"]},
        "image_root": ".",
    }
    b._write_json(out / "manifest.json", manifest)  # last: its presence marks a complete build
    log.info("built the v2 benchmark under %s: %s", out, counts)
    return manifest
