"""MEND: Model Editor Networks with Gradient Decomposition (Mitchell et al., ICLR 2022).

The edit loss's gradient at a Linear layer is a sum of rank-1 terms, dL/dW = sum_t delta_t u_t^T.
MEND never forms that matrix: a small trained network g transforms each token's pair (u_t, delta_t)
into (u~_t, delta~_t), and the update is dW = -lr_l * sum_t delta~_t u~_t^T.

    z = [norm(u); norm(delta)]                      (running mean / std, per site)
    z' = z + W2 act(W1 (z * (1 + scale_l) + shift_l))   (low-rank residual MLP, shared by sites of
                                                     one shape; scale_l, shift_l per site; W2 = 0 at
                                                     init, so an untrained MEND is a normalised
                                                     gradient step)
    u~, delta~ = split(z')

Defaults follow the reference: the last three LM FFN layers (their value projections here).
``mend-vision`` places the same editor on the connector and the last vision-tower Linear layers,
to measure MMEdit's finding that editing the vision side is harder.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmke.editors.gradients import Captured, HyperNetConfig, HyperNetEditor, LowRank


class MENDConfig(HyperNetConfig):
    rank: int = 256  # hidden width of the per-shape MLP
    init_lr: float = 1e-3  # initial per-site edit learning rate (learned)
    norm_momentum: float = 0.01  # running statistics of u and delta (after a warm-up average)


class MENDVisionConfig(MENDConfig):
    sites: list[str] = ["connector", "vision"]
    init_lr: float = 0.1  # visual features are few and small: a larger initial step


class RunningNorm(nn.Module):
    """Per-dimension standardisation with running statistics updated in training mode."""

    def __init__(self, dim: int, momentum: float) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.ones(dim))
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, dim]
        if self.training:
            with torch.no_grad():
                w = max(1.0 / float(self.count + 1), self.momentum)  # plain average while warming up
                self.mean.lerp_(x.mean(0), w)
                self.var.lerp_(x.var(0, unbiased=False) if x.shape[0] > 1 else (x[0] - self.mean) ** 2, w)
                self.count += 1
        return (x - self.mean) / (self.var.sqrt() + 1e-8)


class GradientNet(nn.Module):
    """g for one (in, out) shape: low-rank residual MLP on [u; delta], with per-site modulation."""

    def __init__(self, n_in: int, n_out: int, rank: int, n_sites: int) -> None:
        super().__init__()
        d = n_in + n_out
        self.n_in = n_in
        self.down = nn.Linear(d, rank)
        self.up = nn.Linear(rank, d)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scale = nn.Parameter(torch.zeros(n_sites, d))
        self.shift = nn.Parameter(torch.zeros(n_sites, d))

    def forward(self, u: torch.Tensor, delta: torch.Tensor, site: int) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.cat([u, delta], -1)  # [N, in + out]
        h = z * (1 + self.scale[site]) + self.shift[site]
        z = z + self.up(F.gelu(self.down(h)))
        return z[:, : self.n_in], z[:, self.n_in:]


class MENDModule(nn.Module):
    def __init__(self, shapes: list[tuple[int, int]], rank: int, init_lr: float, momentum: float) -> None:
        super().__init__()
        kinds = sorted(set(shapes))
        self.kind_of = [kinds.index(s) for s in shapes]
        self.index_in_kind = [self.kind_of[:i].count(k) for i, k in enumerate(self.kind_of)]
        self.nets = nn.ModuleList(GradientNet(i, o, rank, self.kind_of.count(k))
                                  for k, (o, i) in enumerate(kinds))
        self.u_norm = nn.ModuleList(RunningNorm(i, momentum) for o, i in shapes)
        self.d_norm = nn.ModuleList(RunningNorm(o, momentum) for o, i in shapes)
        self.log_lr = nn.Parameter(torch.full((len(shapes),), math.log(init_lr)))

    def forward(self, site: int, c: Captured) -> LowRank:
        u = self.u_norm[site](c.u.float())
        d = self.d_norm[site](c.delta.float())
        u2, d2 = self.nets[self.kind_of[site]](u, d, self.index_in_kind[site])
        # dW = -lr * sum_t d2_t u2_t^T  ->  left [out, N], right [N, in]
        return LowRank(-self.log_lr[site].exp() * d2.T, u2)


class MENDEditor(HyperNetEditor):
    name = "mend"
    Config = MENDConfig

    def build_module(self) -> nn.Module:
        cfg = self.config
        return MENDModule([s.shape for s in self.sites], cfg.rank, cfg.init_lr, cfg.norm_momentum)

    def updates(self, captured: dict[str, Captured], hidden: torch.Tensor | None) -> dict[str, LowRank]:
        return {s.name: self.module(i, captured[s.name]) for i, s in enumerate(self.sites)}


class MENDVisionEditor(MENDEditor):
    name = "mend-vision"
    Config = MENDVisionConfig
