"""FT-LM and FT-Vision: fine-tune the chosen edit sites on the edit case (the MMEdit baselines)."""

from __future__ import annotations

import torch

from mmke.editors.base import EditHandle, Editor, EditorConfig, EditRequest, WeightLedger
from mmke.models.base import target_nll


class FTConfig(EditorConfig):
    sites: list[str] = ["lm.ffn.-1"]
    steps: int = 25
    lr: float = 5e-4
    stop_loss: float = 0.05  # stop early once the edit target's NLL falls below this


class FTVisionConfig(FTConfig):
    sites: list[str] = ["vision", "connector"]
    lr: float = 3e-3


class FTEditor(Editor):
    """Gradient descent on the edit loss, restricted to the parameters of ``config.sites``. Adam
    runs on fp32 master copies of bf16/fp16 parameters (mixed precision), each on its own device."""

    name = "ft-lm"
    Config = FTConfig

    @classmethod
    def uses_train_records(cls, config) -> bool:
        return False

    def edit(self, request: EditRequest) -> EditHandle:
        cfg = self.config
        params = self.adapter.site_parameters(cfg.sites)
        originals = {k: p.detach().clone() for k, p in params.items()}
        flags = {k: p.requires_grad for k, p in params.items()}
        for p in params.values():
            p.requires_grad_(True)
        # Adam steps fp32 masters (each on its parameter's device); a bf16/fp16 parameter gets its
        # master's cast after every step, so small steps accumulate instead of rounding away
        ledger = WeightLedger.of(self.adapter)
        masters = {k: torch.nn.Parameter(ledger.master(k, p).clone()) if p.dtype != torch.float32 else p
                   for k, p in params.items()}
        opt = torch.optim.Adam(masters.values(), lr=cfg.lr)
        steps_run = 0
        try:
            with torch.enable_grad():
                for steps_run in range(1, cfg.steps + 1):
                    loss = target_nll(self.adapter.run([request.example]))
                    if loss.item() < cfg.stop_loss:
                        break
                    opt.zero_grad()
                    for k, p in params.items():
                        if masters[k] is not p:
                            p.grad = None
                    loss.backward()
                    for k, p in params.items():
                        if masters[k] is not p and p.grad is not None:
                            masters[k].grad = p.grad.float()
                    opt.step()
                    with torch.no_grad():
                        for k, p in params.items():
                            if masters[k] is not p:
                                p.copy_(masters[k])
        finally:
            for k, p in params.items():
                p.requires_grad_(flags[k])
                p.grad = None
        for k, p in params.items():
            if masters[k] is not p:
                ledger.set_master(k, p, masters[k].detach())
        new = {k: p.detach().clone() for k, p in params.items()}
        return EditHandle(self.adapter, self.name, params=originals, tensors=new,
                          meta={"steps": steps_run, "sites": cfg.sites})


class FTVisionEditor(FTEditor):
    name = "ft-vision"
    Config = FTVisionConfig
