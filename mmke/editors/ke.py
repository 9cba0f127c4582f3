"""KE: the Knowledge Editor hyper-network (De Cao et al., EMNLP 2021), as MMEdit uses it.

A network conditioned on the edit maps the fine-tuning gradient G = dL/dW of a Linear layer to an
update. Per site it predicts vectors alpha, beta [out], gamma, delta [in] and a gate eta from the
condition c, and

    dW = -step * sigmoid(eta) * ( (softmax(alpha) gamma^T) * G / ||G||  +  softmax(beta) delta^T )

(softmax outputs scaled by ``out`` so that they average 1). The original conditions on an LSTM
over the edit's text; here c is the mean of the model's own last-layer hidden states over the edit
input (image, prompt and target), so the condition sees the image. The update is low-rank
(G = sum_t delta_t u_t^T has rank <= tokens), so it is applied without forming G during training.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mmke.editors.gradients import Captured, HyperNetConfig, HyperNetEditor, LowRank
from mmke.editors.patch import ffn_input_dim


class KEConfig(HyperNetConfig):
    hidden: int = 128  # width of the condition network
    init_step: float = 1.0  # initial Frobenius norm of the update (learned)


class KEModule(nn.Module):
    def __init__(self, cond_dim: int, shapes: list[tuple[int, int]], hidden: int, init_step: float) -> None:
        super().__init__()
        self.shapes = shapes
        self.cond = nn.Sequential(nn.LayerNorm(cond_dim), nn.Linear(cond_dim, hidden), nn.Tanh())
        # one head per site: alpha [out], gamma [in], beta [out], delta [in], eta [1]
        self.heads = nn.ModuleList(nn.Linear(hidden, 2 * (o + i) + 1) for o, i in shapes)
        for h in self.heads:  # zero heads: alpha = beta = 0, gamma = 1, delta = 0 at init
            nn.init.zeros_(h.weight)
            nn.init.zeros_(h.bias)
        self.log_step = nn.Parameter(torch.full((len(shapes),), math.log(2 * init_step)))  # sigmoid(0)=1/2

    def forward(self, site: int, c: Captured, cond: torch.Tensor) -> LowRank:
        o, i = self.shapes[site]
        p = self.heads[site](self.cond(cond))
        alpha, gamma, beta, delta, eta = torch.split(p, [o, i, o, i, 1])
        gamma = gamma + 1.0
        D, U = c.delta.float(), c.u.float()  # [N, out], [N, in]
        # ||G||_F^2 = sum((D D^T) * (U U^T)) without forming G
        g_norm = ((D @ D.T) * (U @ U.T)).sum().clamp(min=1e-20).sqrt()
        a = torch.softmax(alpha, 0) * o
        b = torch.softmax(beta, 0) * o
        scale = -self.log_step[site].exp() * torch.sigmoid(eta)
        left = torch.cat([(a[:, None] * D.T) / g_norm, b[:, None]], 1) * scale  # [out, N + 1]
        right = torch.cat([U * gamma[None], delta[None]], 0)  # [N + 1, in]
        return LowRank(left, right)


class KEEditor(HyperNetEditor):
    name = "ke"
    Config = KEConfig
    conditions_on_hidden = True

    def build_module(self) -> nn.Module:
        hidden = ffn_input_dim(self.adapter, -1)  # the FFN reads the hidden state: its width is H
        return KEModule(hidden, [s.shape for s in self.sites], self.config.hidden, self.config.init_step)

    def updates(self, captured: dict[str, Captured], hidden: torch.Tensor | None) -> dict[str, LowRank]:
        if hidden is None:
            raise RuntimeError("ke: no hidden states captured for the condition")
        cond = hidden.float().reshape(-1, hidden.shape[-1]).mean(0)  # [H]
        return {s.name: self.module(i, captured[s.name], cond) for i, s in enumerate(self.sites)}
