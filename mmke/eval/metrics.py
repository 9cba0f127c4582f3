"""Metric definitions (SPEC §3), on logits aligned with target tokens.

Edit metrics (Reliability, T-/M-Generality): under teacher forcing, the fraction of target tokens
whose top-1 prediction is the target token (token accuracy, the MMEdit paper's number) and whether
all of them are (exact match).

Locality (T-/M-Locality): the fraction of target positions where the post-edit top-1 prediction
equals the pre-edit top-1 prediction (exact match: all positions agree). The reference
implementation's M-Locality variant compares the top-10 predictions rank by rank
(``topk_agreement`` with k=10).
"""

from __future__ import annotations

import torch

from mmke.models.base import TargetView

EDIT_METRICS = ("reliability", "t_generality", "m_generality")
LOCALITY_METRICS = ("t_locality", "m_locality")
METRICS = EDIT_METRICS + LOCALITY_METRICS


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
