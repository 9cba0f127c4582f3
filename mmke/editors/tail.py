"""Run only the last LM layers from cached inputs: the fast path of edits that change only the
last layers (UniKE, T-Patcher).

Every edit step of UniKE changes only the last L layers (new FFN neurons, latent-IKE shifts), so
the inputs of the first edited layer do not change from step to step. One full forward pass
captures them (hidden states plus the layer's keyword arguments: attention mask, rotary
embeddings, position ids); every step then runs the last L layers, the final norm and the LM head
at the target positions only. For SmolLM2 (30 layers, L = 4) a step costs about a seventh of a
full forward + backward.

The tail needs the language model's final norm (and OPT's optional output projection). It is
found by name next to the decoder layers; :meth:`TailRunner.capture` checks the tail's logits
against the full forward pass and falls back to full passes when they differ, so an unknown
layout is slow, never wrong.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from mmke.models.base import Example, ModelAdapter, TargetView, head_at_targets

log = logging.getLogger(__name__)

_NORMS = ("norm", "final_layer_norm", "final_layernorm", "ln_f")


def lm_head(adapter: ModelAdapter) -> nn.Module:
    """The LM's output projection (vocabulary logits)."""
    m = adapter.model
    for cand in (m, getattr(m, "lm", None), getattr(m, "language_model", None)):
        get = getattr(cand, "get_output_embeddings", None)
        head = get() if callable(get) else None
        if head is not None:
            return head
    raise ValueError(f"{adapter.name}: cannot find the LM head (get_output_embeddings)")


def _final_modules(adapter: ModelAdapter) -> list[nn.Module] | None:
    """Modules applied after the last decoder layer (final norm, OPT's project_out), or None."""
    layers = adapter.lm_layers()
    for mod in adapter.model.modules():
        if any(child is layers for child in mod.children()):
            out = [getattr(mod, n) for n in _NORMS if isinstance(getattr(mod, n, None), nn.Module)][:1]
            if not out:
                return None
            proj = getattr(mod, "project_out", None)
            return out + ([proj] if isinstance(proj, nn.Module) else [])
    return None


@dataclass
class TailCache:
    """Inputs of the first edited layer for one batch, and what the tail needs to finish."""

    examples: list[Example]
    hidden: torch.Tensor | None  # [B, T, H] input of layer ``first``; None: full passes (fallback)
    kwargs: dict[str, Any] = field(default_factory=dict)
    labels: torch.Tensor | None = None  # [B, T]
    image_mask: torch.Tensor | None = None  # [B, T] image-token positions


class TailRunner:
    """Run the LM from layer ``first`` on: ``capture`` once, ``run`` many times."""

    def __init__(self, adapter: ModelAdapter, first: int) -> None:
        self.adapter = adapter
        self.first = first % adapter.num_lm_layers
        self.finals = _final_modules(adapter)
        self.head = lm_head(adapter)
        self.enabled = self.finals is not None

    @torch.no_grad()
    def capture(self, examples: Sequence[Example]) -> tuple[TailCache, TargetView]:
        """One full forward over ``examples`` (one sub-batch): the cache and the full pass's view."""
        examples = list(examples)
        batch = self.adapter.prepare(examples).to(self.adapter.device)
        layer = self.adapter.lm_layers()[self.first]
        box: dict[str, Any] = {}

        def grab(_m, args, kwargs):
            box["hidden"] = (args[0] if args else kwargs["hidden_states"]).detach()
            box["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}

        h = layer.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            view = self.adapter.target_view(batch)
        finally:
            h.remove()
        cache = TailCache(examples, None, labels=batch.labels, image_mask=self.adapter.image_mask(batch))
        if not self.enabled or "hidden" not in box:
            return cache, view
        kwargs = {}
        for k, v in box["kwargs"].items():
            if k in ("use_cache", "output_attentions"):
                v = False
            elif v is not None and type(v).__name__.endswith("Cache"):
                v = None  # a full-sequence pass: no KV cache to extend
            kwargs[k] = v
        cache.hidden, cache.kwargs = box["hidden"], kwargs
        tail = self.run(cache)
        if not torch.allclose(tail.logits, view.logits, atol=1e-3, rtol=1e-3):
            log.warning("the last-layers fast path differs from the full forward on %s; "
                        "using full forward passes (slower)", self.adapter.name)
            self.enabled = False
            cache.hidden = None
        return cache, view

    def run(self, cache: TailCache) -> TargetView:
        """The target view of the cached batch under the model's current hooks (differentiable)."""
        if cache.hidden is None:
            return self.adapter.run(cache.examples)
        h = cache.hidden
        with self.adapter.running(cache.image_mask):
            for layer in self.adapter.lm_layers()[self.first:]:
                out = layer(h, **cache.kwargs)
                h = out[0] if isinstance(out, tuple) else out
        for mod in self.finals or []:
            h = mod(h)
        return head_at_targets(h, cache.labels, self.head)
