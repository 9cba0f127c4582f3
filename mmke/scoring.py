"""The evaluation protocol's scoring (SPEC §3): one case's five inputs, and their metrics.

One module for everyone who scores an edit — the runner (``mmke run``), editor training's
validation, benchmarks and editors that need a case's inputs — so that the five inputs, the
metric definitions and the batching are the same everywhere.

Metrics, on logits aligned with target tokens (teacher forcing):

- edit metrics (Reliability, T-/M-Generality): the fraction of target tokens whose top-1
  prediction is the target token (token accuracy, the MMEdit paper's number) and whether all of
  them are (exact match);
- locality (T-/M-Locality): the fraction of target positions where the post-edit top-1
  prediction equals the pre-edit one (exact match: all positions agree). The reference
  implementation's M-Locality variant compares top-10 predictions rank by rank over every text
  position of the question and answer.

Pre- and post-edit outputs of a case come from the same call (:func:`run_case`: one batch of the
five inputs, in the same order, with the same padding), so batching can never show up as a
locality loss; a null edit gives locality exactly 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, overload

import torch
from PIL import Image

from mmke.data.schema import is_hard_m_loc
from mmke.models.base import Example, ModelAdapter, TargetView
from mmke.tasks import VQA_TEMPLATE, TaskSpec

INPUT_KINDS = ("reliability", "t_generality", "m_generality", "t_locality", "m_locality")
EDIT_METRICS = INPUT_KINDS[:3]
LOCALITY_METRICS = INPUT_KINDS[3:]
METRICS = INPUT_KINDS
#: sub-metric: M-Locality over the cases whose unrelated-image question is the edit's own question
HARD_M_LOCALITY = "m_locality_hard"


# ---- metric definitions ----------------------------------------------------------------------
def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x.float() * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def token_accuracy(view: TargetView) -> torch.Tensor:
    """[B] fraction of target tokens predicted (top-1) correctly."""
    return _masked_mean(view.logits.argmax(-1) == view.target_ids, view.mask)


def exact_match(view: TargetView) -> torch.Tensor:
    """[B] 1.0 where every target token is predicted correctly."""
    ok = (view.logits.argmax(-1) == view.target_ids) | ~view.mask
    return ok.all(-1).float()


def agreement(pre: torch.Tensor, post: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example (fraction of agreeing positions, all positions agree) for top-1 ids [B, L]."""
    same = pre == post
    return _masked_mean(same, mask), (same | ~mask).all(-1).float()


def topk_agreement(pre: torch.Tensor, post: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference-implementation variant: top-k ids [B, L, k] compared rank by rank."""
    same = (pre == post).float().mean(-1)  # [B, L] fraction of ranks that agree
    return _masked_mean(same, mask), ((same == 1) | ~mask).all(-1).float()


# ---- the five inputs of a case ---------------------------------------------------------------
def case_inputs(record, task: TaskSpec, load_image: Callable[[str], Image.Image],
                reference_m_locality: bool = False, kinds: Sequence[str] = INPUT_KINDS) -> dict[str, Example]:
    """The five inputs of one case (or those of them in ``kinds``). Edit targets get a leading
    space; locality inputs are scored against the pre-edit model at the positions of their gold
    answer.

    The unrelated-image question is a VQA question in the VQA template (MMEdit's convention, for
    both tasks), except the hard kind — the edit's own question about another image — which keeps
    the task's template (a caption prompt stays a caption prompt). With ``reference_m_locality``
    the M-Locality input scores every text position (the reference implementation's variant) by
    making the whole question + answer the scored span.

    Images are decoded here, on every call, and only those the wanted kinds show (an image path
    named twice is decoded once): hold the result only while the case is in use.
    :class:`LazyInputs` gives many records' inputs without holding their images."""
    want = set(kinds)
    unknown = want - set(INPUT_KINDS)
    if unknown:
        raise ValueError(f"unknown input kinds {sorted(unknown)}; known: {', '.join(INPUT_KINDS)}")
    decoded: dict = {}

    def image(path) -> Image.Image:
        if path not in decoded:
            decoded[path] = load_image(path)
        return decoded[path]

    target = " " + record.alt.strip()
    out: dict[str, Example] = {}
    if "reliability" in want:
        out["reliability"] = Example(task.prompt(record.src), target, image(record.image_path))
    if "t_generality" in want:
        out["t_generality"] = Example(task.prompt(record.rephrase), target, image(record.image_path))
    if "m_generality" in want:
        out["m_generality"] = Example(task.prompt(record.src), target, image(record.image_rephrase_path))
    if "t_locality" in want:
        out["t_locality"] = Example(record.loc, " " + record.loc_ans.strip(), None)
    if "m_locality" in want:
        m_q = task.prompt(record.m_loc_q) if is_hard_m_loc(record) else VQA_TEMPLATE.format(record.m_loc_q)
        m_img = image(record.m_loc_path)
        out["m_locality"] = (Example("", m_q + " " + record.m_loc_a.strip(), m_img) if reference_m_locality
                             else Example(m_q, " " + record.m_loc_a.strip(), m_img))
    return {k: out[k] for k in INPUT_KINDS if k in out}


class LazyInputs(Sequence):
    """The ``kinds`` inputs of many records as one flat sequence (record 0's kinds, then record
    1's, ...), built by :func:`case_inputs` when an item or a slice is read and not kept: memories
    built from a train split (locality memories, memory losses) decode a few images at a time
    instead of holding every record's images for the editor's lifetime."""

    def __init__(self, records: Sequence, task: TaskSpec, load_image: Callable[[str], Image.Image],
                 kinds: Sequence[str] = ("reliability",)) -> None:
        unknown = [k for k in kinds if k not in INPUT_KINDS]
        if unknown or not kinds:
            raise ValueError(f"LazyInputs: unknown input kinds {unknown or list(kinds)}; "
                             f"known: {', '.join(INPUT_KINDS)}")
        self.records, self.task, self.load_image, self.kinds = list(records), task, load_image, tuple(kinds)

    def __len__(self) -> int:
        return len(self.records) * len(self.kinds)

    @overload
    def __getitem__(self, i: int) -> Example: ...
    @overload
    def __getitem__(self, i: slice) -> list[Example]: ...

    def __getitem__(self, i):
        n = len(self.kinds)
        if isinstance(i, slice):
            out, built = [], {}
            for j in range(*i.indices(len(self))):  # each record's images decoded once per slice
                r = j // n
                if r not in built:
                    built = {r: case_inputs(self.records[r], self.task, self.load_image, kinds=self.kinds)}
                out.append(built[r][self.kinds[j % n]])
            return out
        if not -len(self) <= i < len(self):
            raise IndexError(f"LazyInputs index {i} out of range for {len(self)} inputs")
        i %= len(self)
        kind = self.kinds[i % n]
        return case_inputs(self.records[i // n], self.task, self.load_image, kinds=(kind,))[kind]


# ---- scoring -----------------------------------------------------------------------------------
@dataclass
class InputOutputs:
    """What the model said on one input, at its target positions: token accuracy and exact match
    against the input's target, and the top-1 (and top-k) predicted ids ``[L]`` / ``[L, k]``."""

    acc: float
    em: float
    top1: torch.Tensor
    topk: torch.Tensor | None = None


CaseOutputs = dict[str, InputOutputs]


@torch.no_grad()
def run_case(adapter: ModelAdapter, inputs: dict[str, Example], topk: int = 1) -> CaseOutputs:
    """The outputs of one case's five inputs (or those of them in ``inputs``): one batched forward
    in ``INPUT_KINDS`` order. The one path for pre-edit and post-edit outputs alike."""
    kinds = [k for k in INPUT_KINDS if k in inputs]
    v = adapter.run([inputs[k] for k in kinds])
    acc, em = token_accuracy(v), exact_match(v)
    top1 = v.logits.argmax(-1)
    tk = v.logits.topk(topk, -1).indices if topk > 1 else None
    out: CaseOutputs = {}
    for i, kind in enumerate(kinds):
        n = int(v.mask[i].sum())  # targets are left-aligned: keep their span only
        out[kind] = InputOutputs(acc[i].item(), em[i].item(), top1[i, :n].cpu(),
                                 tk[i, :n].cpu() if tk is not None else None)
    return out


def case_metrics(pre: CaseOutputs, post: CaseOutputs, reference_m_locality: bool = False
                 ) -> tuple[dict[str, float], dict[str, float]]:
    """(token-level metrics, exact-match metrics) of one case from its pre- and post-edit outputs
    (of the kinds ``post`` holds; locality needs the same kinds in ``pre``)."""
    m, e = {}, {}
    for kind in EDIT_METRICS:
        if kind in post:
            m[kind], e[kind] = post[kind].acc, post[kind].em
    for kind in LOCALITY_METRICS:
        if kind not in post:
            continue
        a, b = pre[kind], post[kind]
        if kind == "m_locality" and reference_m_locality:
            if a.topk is None or b.topk is None:
                raise ValueError("reference M-Locality needs top-10 outputs (run_case(..., topk=10))")
            pa, pb = a.topk, b.topk
            fn = topk_agreement
        else:
            pa, pb, fn = a.top1, b.top1, agreement
        if pa.shape != pb.shape:  # a different tokenisation of the same input cannot happen: fail loudly
            raise RuntimeError(f"{kind}: pre- and post-edit outputs cover {tuple(pa.shape)} vs "
                               f"{tuple(pb.shape)} positions")
        mask = torch.ones(1, pa.shape[0], dtype=torch.bool)
        x, y = fn(pa[None], pb[None], mask)
        m[kind], e[kind] = x.item(), y.item()
    return m, e
