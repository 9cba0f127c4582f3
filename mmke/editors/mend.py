"""MEND: Model Editor Networks with Gradient Decomposition (Mitchell et al., "Fast Model Editing at
Scale", ICLR 2022), in the MMEdit reference configuration (EasyEdit ``trainer/algs/MEND.py``,
``trainer/algs/local_nn.py``, ``hparams/TRAINING/MEND/minigpt4.yaml`` and ``blip2.yaml``).

Paper §3.1. The edit loss's gradient at a Linear layer is a sum of rank-1 terms,
dL/dW = sum_t delta_t u_t^T. MEND never forms that matrix: a trained network g maps each token's
pair to (u~_t, delta~_t), and the edit is the paper's descent step with a learned per-layer rate

    W~ = W - alpha_l * sum_t delta~_t u~_t^T

    z = [norm(u); norm(delta)]                               (``combine: True``, ``norm: True``)
    h = z + relu(s1_l * (U1 V1 z + b1) + o1_l)               (§3.1, the editor MLP: ``IDMLP`` with
    g(z) = h + relu(s2_l * (U2 V2 h + b2) + o2_l)             ``n_hidden: 1``, ``act: relu``)
    u~, delta~ = split(g(z))

- One g per distinct weight shape (``shared: True``); the layers of one shape are told apart by
  their own scale s_l and shift o_l (``mode_scale`` / ``mode_shift``), initialised to 1 and 0.
- ``init: id``: U = 0 and b = 0 at init, so g is the identity and an untrained MEND is a gradient
  step of size ``edit_lr`` on the normalised factors. V is N(0, 1) as in the reference.
- ``norm``: u and delta are standardised by running mean / std (Welford, over every token seen in
  training, one pair of statistics per shape as in the reference); tokens whose u or delta is all
  zero are left out, as the reference does. Before any statistics exist (an untrained editor) the
  factors are used as they are, so untrained MEND is exactly W - edit_lr * dL/dW.
- alpha_l: learned, initialised to ``edit_lr: 1e-4`` (the reference trains them with their own
  optimiser at ``lr_lr: 1e-4``; mmke's training loop has one learning rate: train with
  ``--lr 1e-4`` to match). ``one_sided: False`` (both u and delta are transformed).
- Sites: both FFN matrices of the last three LM layers (``inner_params`` of minigpt4.yaml: layers
  29-31 ``up_proj`` and ``down_proj`` of Vicuna-7B; ``gate_proj`` is not edited). For OPT these are
  ``fc1``/``fc2``; note that EasyEdit's blip2.yaml edits OPT-2.7B layers 9-11 (of 32), not the last
  three: mmke uses the last three for every family.
- ``rank``: the reference uses 1920 for Vicuna-7B (d = in + out = 15104, so rank ~ d / 8); mmke's
  default 256 keeps that ratio for SmolLM2's FFN (d = 2112) and keeps training on a CPU. Set
  ``rank=1920`` for the reference width (capped at d, as the reference does).

Deviation in sign: the reference code adds ``lr * g`` (its learned lrs and MLP absorb the sign);
mmke takes the paper's descent step, so an untrained editor moves toward the target.

Training objective: paper §3.2 (L_MEND = c_e L_e + L_loc, L_e the NLL of the new target on an
equivalent input after the edit, L_loc = KL(p_W(.|x_loc) || p_W~(.|x_loc))), in the MMEdit
trainer's multimodal form with its weights cedit = iedit = 0.1, cloc = 1 (:mod:`mmke.editors.gradients`).
``mend-vision`` places the same editor on the connector and the last vision-tower Linear layers,
to measure MMEdit's finding that editing the vision side is harder (the reference's vision config,
blip2-vision.yaml, edits the last two Q-Former FFN outputs with the same options).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from mmke.editors.base import EditRequest
from mmke.editors.gradients import Captured, EditGradients, HyperNetConfig, HyperNetEditor, LowRank


class MENDConfig(HyperNetConfig):
    rank: int = 256  # U V rank of each MLP layer (reference: 1920 for a 7B LM; capped at in + out)
    n_hidden: int = 1  # hidden layers of the editor MLP (it has n_hidden + 1 residual layers)
    edit_lr: float = 1e-4  # initial per-site step alpha_l (learned)
    norm: bool = True  # standardise u and delta with running statistics


class MENDVisionConfig(MENDConfig):
    sites: list[str] = Field(default_factory=lambda: ["connector", "vision"])


class RunningMoments(nn.Module):
    """Mean and standard deviation over every row seen in training (Welford / Chan merging)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros(()))
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("m2", torch.zeros(dim))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:  # x: [N, dim]
        n = x.shape[0]
        if n == 0:
            return
        mean_b = x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
        k = float(self.count)
        total = k + n
        d = mean_b - self.mean
        self.mean += d * (n / total)
        self.m2 += m2_b + d ** 2 * (k * n / total)
        self.count += n

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        if self.count < 2:  # no statistics yet (untrained): leave the factors as they are
            return x
        return (x - self.mean) / ((self.m2 / (self.count - 1)).sqrt() + 1e-7)


class LRLinear(nn.Module):
    """One residual layer of the editor MLP: x + relu(s_m * (U V x + b) + o_m) (reference
    ``local_nn.LRLinear`` with ``init: id``)."""

    def __init__(self, dim: int, rank: int, n_modes: int) -> None:
        super().__init__()
        mid = min(rank, dim)
        self.u = nn.Parameter(torch.zeros(dim, mid))
        self.v = nn.Parameter(torch.randn(mid, dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.mode_scale = nn.Parameter(torch.ones(n_modes, dim))
        self.mode_shift = nn.Parameter(torch.zeros(n_modes, dim))

    def forward(self, x: torch.Tensor, mode: int) -> torch.Tensor:  # x: [N, dim]
        pre = (x @ self.v.T) @ self.u.T + self.bias
        return (pre * self.mode_scale[mode] + self.mode_shift[mode]).clamp(min=0) + x


class GradientTransform(nn.Module):
    """g for one weight shape (out, in): normalise u [N, in] and delta [N, out], transform
    [u; delta] jointly, split back."""

    def __init__(self, n_in: int, n_out: int, rank: int, n_hidden: int, n_modes: int, norm: bool) -> None:
        super().__init__()
        self.n_in, self.norm = n_in, norm
        self.u_stats = RunningMoments(n_in)
        self.d_stats = RunningMoments(n_out)
        self.mlp = nn.ModuleList(LRLinear(n_in + n_out, rank, n_modes) for _ in range(n_hidden + 1))

    def forward(self, u: torch.Tensor, delta: torch.Tensor, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
        keep = (u != 0).any(-1) & (delta != 0).any(-1)  # tokens that carry gradient
        u, delta = u[keep].float(), delta[keep].float()
        if self.training:
            self.u_stats.update(u)
            self.d_stats.update(delta)
        if self.norm:
            u, delta = self.u_stats.normalise(u), self.d_stats.normalise(delta)
        z = torch.cat([u, delta], -1)  # [N, in + out]
        for layer in self.mlp:
            z = layer(z, mode)
        return z[:, : self.n_in], z[:, self.n_in:]


class MENDModule(nn.Module):
    """One :class:`GradientTransform` per distinct shape of the edited weights, and the per-site
    learned step sizes."""

    def __init__(self, shapes: list[tuple[int, int]], cfg: MENDConfig) -> None:
        super().__init__()
        kinds = sorted(set(shapes))
        self.kind_of = [kinds.index(s) for s in shapes]
        self.mode_of = [self.kind_of[:i].count(k) for i, k in enumerate(self.kind_of)]
        self.nets = nn.ModuleList(GradientTransform(i, o, cfg.rank, cfg.n_hidden, self.kind_of.count(k), cfg.norm)
                                  for k, (o, i) in enumerate(kinds))
        self.edit_lrs = nn.Parameter(torch.full((len(shapes),), cfg.edit_lr))

    def forward(self, site: int, c: Captured) -> LowRank:
        u2, d2 = self.nets[self.kind_of[site]](c.u, c.delta, self.mode_of[site])
        # W~ = W - alpha * sum_t d2_t u2_t^T  ->  left [out, N], right [N, in]
        return LowRank(-self.edit_lrs[site] * d2.T, u2)


class MENDEditor(HyperNetEditor):
    name = "mend"
    Config = MENDConfig

    def build_module(self) -> nn.Module:
        return MENDModule([s.shape for s in self.sites], self.config)

    def updates(self, grads: EditGradients, request: EditRequest) -> dict[str, LowRank]:
        return {s.name: self.module(i, grads.captured[s.name]) for i, s in enumerate(self.sites)}


class MENDVisionEditor(MENDEditor):
    name = "mend-vision"
    Config = MENDVisionConfig
