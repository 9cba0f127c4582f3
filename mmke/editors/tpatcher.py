"""T-Patcher: a few new neurons in the last LM FFN layer per edit (Huang et al., ICLR 2023).

Trained on the edit with three terms: the edit loss (target NLL), an activation loss (the new
neurons fire on the edit input: their peak activation exceeds ``margin``) and a memory loss (they
stay silent on a memory of other inputs: the task's train questions). The FFN input at the patched
layer does not depend on the patch, so the memory's FFN inputs are computed once and cached.
Sequential edits accumulate: each edit's neurons are separate hooks.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from mmke.editors.base import EditHandle, Editor, EditorConfig, EditRequest, read_saved_edit
from mmke.editors.patch import FFNPatch, PatchHooks, ffn_input_dim
from mmke.models.base import Example, target_nll

log = logging.getLogger(__name__)


class TPatcherConfig(EditorConfig):
    layer: int = -1
    n_neurons: int = 16
    steps: int = 60
    lr: float = 3e-2
    act_weight: float = 1.0
    mem_weight: float = 0.3
    margin: float = 1.0
    memory_size: int = 64  # train inputs the patch must stay silent on
    stop_loss: float = 0.05
    seed: int = 0  # initialisation of the new keys: the same edit gives the same patch


class TPatcherEditor(Editor):
    name = "t-patcher"
    Config = TPatcherConfig

    def __init__(self, adapter, config=None, *, train_records=None, task=None, **context: Any) -> None:
        super().__init__(adapter, config, **context)
        self.layer = self.config.layer % adapter.num_lm_layers
        self.hidden = ffn_input_dim(adapter, self.layer)
        self._memory_q: torch.Tensor | None = None
        self._memory_src = []
        if train_records:
            recs = train_records[: self.config.memory_size]
            tmpl = task.prompt if task is not None else (lambda s: s)
            self._memory_src = [Example(tmpl(r.src), " " + r.alt, adapter.load_image(r.image_path)) for r in recs]
        else:
            log.warning("t-patcher: no train records, so no memory loss (the patch may fire elsewhere)")

    @torch.no_grad()
    def ffn_inputs(self, examples: list[Example]) -> torch.Tensor:
        """FFN inputs at the patched layer for every position of each example: [N, H]. One
        example per forward, so no position is padding."""
        key = self.adapter.site(f"lm.ffn_key.{self.layer}")
        got: list[torch.Tensor] = []
        h = key.register_forward_pre_hook(lambda _m, args: got.append(args[0].detach().reshape(-1, args[0].shape[-1])))
        try:
            for ex in examples:
                self.adapter.run([ex])
        finally:
            h.remove()
        return torch.cat(got, 0)

    def memory(self) -> torch.Tensor | None:
        if self._memory_q is None and self._memory_src:
            self._memory_q = self.ffn_inputs(self._memory_src)
        return self._memory_q

    def edit(self, request: EditRequest) -> EditHandle:
        cfg = self.config
        ex = request.example
        q_edit = self.ffn_inputs([ex])  # [T, H]
        patch = FFNPatch(self.hidden, cfg.n_neurons, seed=cfg.seed).to(self.adapter.device)
        hooks = PatchHooks(self.adapter, {self.layer: patch})
        mem = self.memory()
        opt = torch.optim.Adam(patch.parameters(), lr=cfg.lr)
        steps = 0
        try:
            with torch.enable_grad():
                for steps in range(1, cfg.steps + 1):
                    nll = target_nll(self.adapter.run([ex]))
                    a_edit = patch.act(q_edit @ patch.key + patch.bias)  # [T, n]
                    loss_act = torch.relu(cfg.margin - a_edit.amax(0)).mean()
                    loss_mem = patch.act(mem @ patch.key + patch.bias).mean() if mem is not None else 0.0
                    if nll.item() < cfg.stop_loss and float(loss_act.detach()) == 0.0:
                        break
                    loss = nll + cfg.act_weight * loss_act + cfg.mem_weight * loss_mem
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        except BaseException:
            hooks.remove()
            raise
        for p in patch.parameters():
            p.requires_grad_(False)
        tensors = {"key": patch.key.data, "bias": patch.bias.data, "value": patch.value.data}
        return EditHandle(self.adapter, self.name, undo=hooks.remove, tensors=tensors,
                          meta={"layer": self.layer, "steps": steps})

    def load(self, path: str | Path) -> EditHandle:
        method, meta, t = read_saved_edit(path)
        if method != self.name:
            raise ValueError(f"{path}: saved by editor {method!r}, not {self.name!r}")
        patch = FFNPatch(t["key"].shape[0], t["key"].shape[1]).to(self.adapter.device)
        with torch.no_grad():
            patch.key.copy_(t["key"])
            patch.bias.copy_(t["bias"])
            patch.value.copy_(t["value"])
        patch.requires_grad_(False)
        hooks = PatchHooks(self.adapter, {int(meta["layer"]): patch})
        return EditHandle(self.adapter, self.name, undo=hooks.remove, tensors=t, meta=meta)
