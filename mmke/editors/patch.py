"""Extra FFN key-value neurons, the shared piece of T-Patcher and UniKE's intrinsic editing.

FFN as key-value memory: FFN(q) = Act(q W_K + b_K) W_V + b_V. A patch appends n new pairs
without touching the original weights:

    FFN_edit(q) = FFN(q) + Act(q K + b) V          K: [H, n]  b: [n]  V: [n, H]

It is installed with two hooks on one LM layer: a forward pre-hook on the FFN key projection
captures q (the FFN input), a forward hook on the value projection adds the patch to the FFN
output. This works for every family whose keys and values are Linear layers (Llama: up/down,
OPT: fc1/fc2). Removing the hooks restores the model exactly: no parameter was changed.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mmke.models.base import ModelAdapter


class FFNPatch(nn.Module):
    """n extra key-value neurons for one FFN."""

    def __init__(self, hidden: int, n: int, act: Callable[[torch.Tensor], torch.Tensor] = F.relu,
                 seed: int = 0) -> None:
        super().__init__()
        # random keys (diverse neurons), zero values: a new patch changes nothing until trained
        g = torch.Generator().manual_seed(seed)
        self.key = nn.Parameter(torch.randn(hidden, n, generator=g) * hidden ** -0.5)
        self.bias = nn.Parameter(torch.zeros(n))
        self.value = nn.Parameter(torch.zeros(n, hidden))
        self.act = act

    def forward(self, q: torch.Tensor, image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """q: [B, T, H] (or [B*T, H]) -> the patch's addition to the FFN output, same shape.
        ``image_mask`` [B, T] (the image-token positions) is for patches that look at the image."""
        return self.act(q @ self.key.to(q.dtype) + self.bias.to(q.dtype)) @ self.value.to(q.dtype)


class PatchHooks:
    """Install FFN patches on LM layers of an adapter; ``remove()`` takes them all out."""

    def __init__(self, adapter: ModelAdapter, patches: dict[int, FFNPatch]) -> None:
        self.patches = patches
        self._handles = []
        for layer, patch in patches.items():
            key = adapter.site(f"lm.ffn_key.{layer}")
            value = adapter.site(f"lm.ffn_value.{layer}")
            box: dict[str, torch.Tensor] = {}

            def capture(_mod, args, box=box):
                box["q"] = args[0]

            def add(_mod, _args, out, box=box, patch=patch):
                return out + patch(box.pop("q"), adapter.current_image_mask).to(out.dtype)

            self._handles.append(key.register_forward_pre_hook(capture))
            self._handles.append(value.register_forward_hook(add))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def ffn_input_dim(adapter: ModelAdapter, layer: int) -> int:
    key = adapter.site(f"lm.ffn_key.{layer}")
    return int(key.in_features)
