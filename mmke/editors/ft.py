"""FT-LM and FT-Vision: fine-tune the chosen edit sites on the edit case (the MMEdit baselines)."""

from __future__ import annotations

import torch

from mmke.editors.base import EditHandle, Editor, EditorConfig, EditRequest
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
    """Gradient descent on the edit loss, restricted to the parameters of ``config.sites``."""

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
        opt = torch.optim.Adam(params.values(), lr=cfg.lr)
        steps_run = 0
        try:
            with torch.enable_grad():
                for steps_run in range(1, cfg.steps + 1):
                    loss = target_nll(self.adapter.run([request.example]))
                    if loss.item() < cfg.stop_loss:
                        break
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        finally:
            for k, p in params.items():
                p.requires_grad_(flags[k])
                p.grad = None
        new = {k: p.detach().clone() for k, p in params.items()}
        return EditHandle(self.adapter, self.name, params=originals, tensors=new,
                          meta={"steps": steps_run, "sites": cfg.sites})


class FTVisionEditor(FTEditor):
    name = "ft-vision"
    Config = FTVisionConfig
