"""UniKE's intrinsic editing: n_e new key-value neurons in the FFN of each of the last L layers.

    FFN_edit(q) = FFN(q) + Act(((q - mu) * gamma) K + b) (V + 1 zeta^T)
        q: [.., H] FFN input    K: [H, n]    b: [n]    V: [n, H]    zeta: [H] (truthfulness offset)

``mu`` (the mean FFN input over the locality memory) and ``gamma`` (1 / the edit's distance from
it) are fixed per edit: they put the keys on a scale where "the edit input activates a neuron to
about 1" and let one learning rate fit every layer. Keys start at the edit's own (centred) FFN
inputs at the positions that predict the target, so the neurons fire on the edit from the first
step; values start at 0, so a fresh patch changes nothing until trained.

Training minimises the target NLL (through :class:`~mmke.editors.unike.tail.TailRunner`, i.e. the
last L layers only) plus T-Patcher's optional activation loss (each neuron's peak pre-activation on
the edit's target positions reaches ``margin``) and memory loss (pre-activations on the locality
memory, FFN inputs of other train-split inputs, stay below ``-mem_margin``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from mmke.editors.patch import FFNPatch
from mmke.editors.unike.tail import TailCache, TailRunner
from mmke.models.base import Example, ModelAdapter, target_nll, target_positions

log = logging.getLogger(__name__)


class EditPatch(FFNPatch):
    """An :class:`~mmke.editors.patch.FFNPatch` with input centring/scaling and a zeta offset."""

    def __init__(self, hidden: int, n: int, seed: int = 0) -> None:
        super().__init__(hidden, n, act=F.relu, seed=seed)
        self.register_buffer("center", torch.zeros(hidden))  # mu [H]
        self.register_buffer("scale", torch.ones(()))  # gamma []
        self.register_buffer("offset", torch.zeros(hidden))  # beta * W_zeta zeta [H]
        self.recorded: dict[str, torch.Tensor] = {}  # last call's q and pre-activation, when recording
        self.record = False

    def pre(self, q: torch.Tensor) -> torch.Tensor:  # [.., H] -> [.., n]
        return ((q - self.center.to(q.dtype)) * self.scale.to(q.dtype)) @ self.key.to(q.dtype) \
            + self.bias.to(q.dtype)

    def forward(self, q: torch.Tensor) -> torch.Tensor:  # [B, T, H] -> [B, T, H]
        z = self.pre(q)
        if self.record:
            self.recorded = {"q": q, "z": z}
        a = self.act(z)
        return a @ self.value.to(q.dtype) + a.sum(-1, keepdim=True) * self.offset.to(q.dtype)

    def state(self) -> dict[str, torch.Tensor]:
        return {"key": self.key.data, "bias": self.bias.data, "value": self.value.data,
                "center": self.center, "scale": self.scale, "offset": self.offset}

    @classmethod
    def from_state(cls, t: dict[str, torch.Tensor]) -> "EditPatch":
        p = cls(t["key"].shape[0], t["key"].shape[1])
        with torch.no_grad():
            for k, v in t.items():
                getattr(p, k).copy_(v)
        p.requires_grad_(False)
        return p


@dataclass
class LocalityMemory:
    """FFN inputs of other inputs at the positions that predict their targets, per patched layer,
    and which input each row came from (to skip inputs identical to the edit)."""

    q: dict[int, torch.Tensor]  # layer -> [N_pos, H]
    owner: list[tuple[str, str]]  # row -> (prompt, target) of its input

    def center(self, layer: int) -> torch.Tensor:
        return self.q[layer].mean(0)

    def rows_except(self, prompt: str, target: str) -> torch.Tensor:
        return torch.tensor([o != (prompt, target) for o in self.owner], dtype=torch.bool)


@torch.no_grad()
def ffn_inputs_at_targets(adapter: ModelAdapter, layers: Sequence[int], examples: Sequence[Example],
                          batch_size: int = 16) -> LocalityMemory:
    """FFN inputs of the unedited model at each example's target-predicting positions."""
    qs: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    owner: list[tuple[str, str]] = []
    box: dict[int, torch.Tensor] = {}
    hooks = [adapter.site(f"lm.ffn_key.{l}").register_forward_pre_hook(
        lambda _m, args, l=l: box.__setitem__(l, args[0].detach())) for l in layers]
    try:
        for s in range(0, len(examples), batch_size):
            chunk = list(examples[s:s + batch_size])
            for idx in adapter.sub_batches(chunk):
                sub = [chunk[i] for i in idx]
                batch = adapter.prepare(sub).to(adapter.device)
                adapter.target_view(batch)
                pos, _, mask = target_positions(batch.labels.to(adapter.device))
                for l in layers:
                    q = box[l].gather(1, pos.unsqueeze(-1).expand(-1, -1, box[l].shape[-1]))
                    qs[l].append(q[mask].float())
                for b, ex in enumerate(sub):
                    owner += [(ex.prompt, ex.target)] * int(mask[b].sum())
    finally:
        for h in hooks:
            h.remove()
    return LocalityMemory({l: torch.cat(v, 0) for l, v in qs.items()}, owner)


@torch.no_grad()
def init_patches(patches: dict[int, EditPatch], pos: torch.Tensor, memory: LocalityMemory | None,
                 threshold: float) -> None:
    """Keys from the edit's recorded FFN inputs at ``pos`` (its target-predicting positions [P]),
    centred on the memory mean; neuron j takes position j mod P. The edit's pre-activation starts
    at ``1 - threshold``."""
    for layer, p in patches.items():
        q = p.recorded["q"][0, pos].float()  # [P, H]
        mu = memory.center(layer).to(q) if memory is not None else torch.zeros_like(q[0])
        u = q - mu  # [P, H]
        n = p.key.shape[1]
        g = torch.Generator().manual_seed(layer)
        dirs = u[torch.arange(n) % u.shape[0]]  # [n, H]
        dirs = F.normalize(dirs, dim=-1) + 0.05 * torch.randn(dirs.shape, generator=g) / dirs.shape[1] ** 0.5
        p.center.copy_(mu)
        p.scale.copy_(1.0 / u.norm(dim=-1).mean().clamp(min=1e-6))
        p.key.copy_(F.normalize(dirs, dim=-1).t())
        p.bias.fill_(-threshold)
        p.value.zero_()


def train_patches(runner: TailRunner, cache: TailCache, patches: dict[int, EditPatch],
                  memory: LocalityMemory | None, keep_rows: torch.Tensor | None, *, steps: int, lr: float,
                  act_weight: float, margin: float, mem_weight: float, mem_margin: float,
                  stop_loss: float, threshold: float) -> tuple[int, float]:
    """Initialise and optimise the installed ``patches`` on the cached edit. Returns (steps, NLL)."""
    pos = target_positions(cache.labels)[0][0]  # [P] positions predicting the target tokens
    for p in patches.values():
        p.record = True
    with torch.no_grad():
        runner.run(cache)  # records each layer's FFN inputs (values are still 0: no effect)
    init_patches(patches, pos, memory, threshold)
    mem = {l: memory.q[l][keep_rows] if keep_rows is not None else memory.q[l] for l in patches} \
        if memory is not None and mem_weight > 0 else None
    params = [t for p in patches.values() for t in (p.key, p.bias, p.value)]
    for t in params:
        t.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    step, nll_v = 0, float("nan")
    try:
        with torch.enable_grad():
            for step in range(1, steps + 1):
                nll = target_nll(runner.run(cache))
                z_edit = torch.cat([p.recorded["z"][0, pos] for p in patches.values()], -1)  # [P, L*n]
                loss_act = torch.relu(margin - z_edit.amax(0)).mean()
                nll_v = float(nll.detach())
                if nll_v < stop_loss and float(loss_act.detach()) == 0.0:
                    break
                loss = nll + act_weight * loss_act
                if mem is not None:
                    loss = loss + mem_weight * torch.stack(
                        [torch.relu(patches[l].pre(m) + mem_margin).mean() for l, m in mem.items()]).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
    finally:
        for p in patches.values():
            p.record = False
            p.recorded = {}
        for t in params:
            t.requires_grad_(False)
    return step, nll_v
