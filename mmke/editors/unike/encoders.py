"""UniKE's knowledge disentanglement: a semantic and a truthfulness encoder per edited layer.

Both read hidden states of the latent-IKE space (an edited layer's output, [.., H]):

- ``tru[l]``: H -> D. Truthful answer states (question + correct answer) cluster together, apart
  from untruthful ones (question + the model's own wrong answer): supervised InfoNCE, paper Eq. 4.
- ``sem[l]``: H -> H, into the space of raw question states. A question's raw state h_sem is close
  to the encodings of both its correct and its wrong answer state and far from other questions'
  (paper Eq. 5); mmke adds the state of a paraphrase of the question (same image) as a second
  anchor with the same positives, so that semantics, not wording, decide. Dynamic
  s = cos(sem(h_know), h_input) uses it.
- ``zeta_map[l]`` (W_zeta): D -> H, brings a truthfulness-space direction back to the hidden space
  (fitted so that W_zeta (tru(h_pos) - tru(h_neg)) ~ h_pos - h_neg).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))


class UniKEEncoders(nn.Module):
    """The learned part of UniKE (the module ``mmke train --method unike`` writes)."""

    def __init__(self, hidden: int, n_layers: int, enc_hidden: int = 128, tru_dim: int = 64) -> None:
        super().__init__()
        self.sem = nn.ModuleList(mlp(hidden, enc_hidden, hidden) for _ in range(n_layers))
        self.tru = nn.ModuleList(mlp(hidden, enc_hidden, tru_dim) for _ in range(n_layers))
        self.zeta_map = nn.ModuleList(nn.Linear(tru_dim, hidden, bias=False) for _ in range(n_layers))
        # per-layer mean of the raw states: semantic similarities are taken around it, since the
        # raw states of all inputs share a large common component (every cosine would be near 1)
        self.register_buffer("state_mean", torch.zeros(n_layers, hidden))
        # dynamic s = clamp((cos - floor) / (1 - floor), 0, 1): the floor is calibrated after training
        # on inputs unrelated to the retrieved knowledge, so that s ~ 0 for them
        self.register_buffer("s_floor", torch.zeros(n_layers))

    def semantic(self, i: int, h: torch.Tensor) -> torch.Tensor:  # [.., H] -> [.., H] (centred space)
        return self.sem[i](h.float() - self.state_mean[i])

    def centred(self, i: int, h: torch.Tensor) -> torch.Tensor:  # raw state -> centred raw state
        return h.float() - self.state_mean[i]

    def truth(self, i: int, h: torch.Tensor) -> torch.Tensor:  # [.., H] -> [.., D]
        return self.tru[i](h.float() - self.state_mean[i])


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """Supervised InfoNCE (paper Eq. 4): z [N, D], labels [N] (1 truthful, 0 not). Each anchor is
    pulled to the other samples of its label and pushed from the rest."""
    z = F.normalize(z, dim=-1)
    sim = z @ z.t() / tau  # [N, N]
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(eye, float("-inf"))
    pos = (labels[:, None] == labels[None, :]) & ~eye
    logp = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    n_pos = pos.sum(1).clamp(min=1)
    return -(logp.masked_fill(~pos, 0).sum(1) / n_pos).mean()


def semantic_loss(anchors: torch.Tensor, e_pos: torch.Tensor, e_neg: torch.Tensor, owner: torch.Tensor | None = None,
                  tau: float = 0.1) -> torch.Tensor:
    """Paper Eq. 5: each anchor (a raw, centred question state [A, H]) is close to the semantic
    encodings of its own question's correct and wrong answer states (e_pos[owner[a]],
    e_neg[owner[a]], [B, H]) and far from every other question's. ``owner`` (default: anchor a is
    question a) lets paraphrases of a question be anchors of the same question too."""
    owner = torch.arange(len(anchors), device=anchors.device) if owner is None else owner
    a = F.normalize(anchors, dim=-1)
    e = F.normalize(torch.cat([e_pos, e_neg], 0), dim=-1)  # [2B, H]
    sim = a @ e.t() / tau  # [A, 2B]
    idx = torch.arange(len(a), device=a.device)
    own = torch.logsumexp(torch.stack([sim[idx, owner], sim[idx, owner + len(e_pos)]], 1), 1)
    return (torch.logsumexp(sim, 1) - own).mean()
