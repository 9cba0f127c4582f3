"""What every SERAC variant shares: the edit memory, the counterfactual model, the routing and the
training objective. Only the scope classifier differs between variants (:mod:`.text` is the
published method, :mod:`.image` mmke's image-aware variant); a variant subclasses
:class:`SERACBase` and supplies the classifier through five methods (``build_scope``,
``input_features``, ``edit_features``, ``scope_logits``, ``classifier_loss``).

SERAC (Mitchell et al., "Memory-Based Model Editing at Scale", ICML 2022) keeps edits in an
explicit memory beside the model; the base model's weights never change. Every input the adapter
runs is routed:

- the **scope classifier** g(z_e, x) scores the input x against every stored edit z_e and takes
  the best edit; at or above ``threshold`` the input is in scope;
- in-scope inputs go to the **counterfactual model**: the base model with the edit's fact in its
  context (``Example.context``, before the image where the adapter supports it) and small LoRA
  factors on the last LM layers, active only while it runs. This is the MMEdit reference's
  MiniGPT-4 configuration (the base LLM with the edit prepended and its last layer trainable);
  its BLIP-2 configuration uses a separate OPT-125m instead;
- everything else goes to the base model unchanged.

Routing is a run wrapper (:attr:`ModelAdapter.run_wrappers`), installed with the first stored edit
and removed with the last, so ``remove()`` restores the outputs bit for bit.

Training (:meth:`SERACBase.train_loss`, driven by :mod:`mmke.train.editors`) is the paper's
§3.2 objective: the classifier's loss on in- and out-of-scope pairs (the variant's
``classifier_loss``) plus the counterfactual model's target NLL on the three in-scope inputs (edit
input, rephrase, rephrased image) with the fact in context.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from mmke.editors.base import EditHandle, EditRequest, read_saved_edit
from mmke.editors.trained import TrainedEditor, TrainedEditorConfig
from mmke.models.base import Example, ModelAdapter, TargetView, merge_views, target_nll

log = logging.getLogger(__name__)

Features = dict[str, torch.Tensor]
"""Frozen classifier features of N inputs or edits: named tensors with N rows. What they hold is
the variant's business (text embeddings, base-model states, ...); the memory stores an edit's
features and saved edits carry them as ``features.<name>``."""


def cat_features(parts: Sequence[Features]) -> Features:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


class SERACBaseConfig(TrainedEditorConfig):
    """Options every SERAC variant has. ``lora_*`` shape the counterfactual model's factors and
    must match the weights; ``threshold`` and ``fact_template`` act at run time; the loss weights
    and ``seed`` only matter to training."""

    #: scope probability at or above which an input is answered by the counterfactual model
    threshold: float = 0.5
    #: LM layers whose Linear layers get LoRA factors in the counterfactual model
    lora_layers: list[int] = [-4, -3, -2, -1]
    lora_rank: int = 8
    lora_alpha: float = 16.0
    #: how the edit enters the counterfactual model's context (``prompt`` already templated,
    #: ``target`` with its leading space)
    fact_template: str = "New Fact: {prompt}{target}\n"
    cls_weight: float = 1.0  # weight of the classifier loss in training
    cf_weight: float = 1.0  # weight of the counterfactual-model loss in training
    seed: int = 0  # initialisation of the module (training only)


class LoRAFactor(nn.Module):
    """Low-rank update of one Linear layer: x -> (x A^T B^T) * scale; zero at initialisation."""

    def __init__(self, d_in: int, d_out: int, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        self.scale = alpha / rank
        self.A = nn.Parameter(torch.randn(rank, d_in, generator=generator) * d_in ** -0.5)
        self.B = nn.Parameter(torch.zeros(d_out, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the factors live with the editor's module; the layer (x) may sit on another device
        return (x @ self.A.t().to(x.device, x.dtype)) @ self.B.t().to(x.device, x.dtype) * self.scale


class SERACModule(nn.Module):
    """Everything SERAC learns: the scope classifier and the counterfactual model's LoRA factors
    (keyed ``l{layer}_{linear path with _}``)."""

    def __init__(self, scope: nn.Module, lora: dict[str, LoRAFactor]) -> None:
        super().__init__()
        self.scope = scope
        self.lora = nn.ModuleDict(lora)


@dataclass
class MemoryEntry:
    """One stored edit: its input, the fact the counterfactual model sees, and the classifier's
    features of the edit (one row)."""

    example: Example
    fact: str
    features: Features
    record: dict[str, Any] = field(default_factory=dict)


def _image_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy())  # [H, W, 3]


class SERACBase(TrainedEditor):
    """Scope classifier + counterfactual model over an explicit edit memory; a variant supplies
    the classifier."""

    Config = SERACBaseConfig
    config: SERACBaseConfig

    def __init__(self, adapter: ModelAdapter, config: SERACBaseConfig | None = None, **kwargs: Any) -> None:
        self._memory: list[MemoryEntry] = []
        self._installed = False
        super().__init__(adapter, config, **kwargs)

    # ---- the scope classifier: what a variant implements ---------------------------------
    @abstractmethod
    def build_scope(self) -> nn.Module:
        """The classifier's learnable module, freshly initialised (seeded by the caller)."""

    @abstractmethod
    def input_features(self, examples: Sequence[Example]) -> Features:
        """The classifier's features of inputs to be routed."""

    @abstractmethod
    def edit_features(self, example: Example) -> Features:
        """The classifier's features of one edit (stored in the memory and in saved edits)."""

    @abstractmethod
    def feature_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-row shape of each edit feature, to check saved edits against this editor."""

    @abstractmethod
    def scope_logits(self, x: Features, e: Features) -> torch.Tensor:
        """Scope logits [N, M] of N inputs against M edits, differentiable in ``module.scope``."""

    @abstractmethod
    def classifier_loss(self, case) -> tuple[torch.Tensor, dict[str, float]]:
        """The classifier's loss on one training case and named parts of it for the log."""

    # ---- module ----------------------------------------------------------------------
    def _lora_targets(self) -> dict[str, nn.Linear]:
        """The Linear layers of the counterfactual model's LoRA, keyed like the module's factors."""
        layers = self.adapter.lm_layers()
        n = len(layers)
        out: dict[str, nn.Linear] = {}
        for i in self.config.lora_layers:
            if not -n <= i < n:
                raise ValueError(f"{self.name}: lora_layers entry {i} out of range; the LM has {n} layers")
            for path, mod in layers[i % n].named_modules():
                if isinstance(mod, nn.Linear):
                    out[f"l{i % n}_{path.replace('.', '_')}"] = mod
        if not out and self.config.lora_layers:
            raise ValueError(f"{self.name}: the chosen lora_layers contain no Linear layers")
        return out

    def build_module(self) -> nn.Module:
        cfg = self.config
        gen = torch.Generator().manual_seed(cfg.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            scope = self.build_scope()
        lora = {k: LoRAFactor(m.in_features, m.out_features, cfg.lora_rank, cfg.lora_alpha, gen)
                for k, m in self._lora_targets().items()}
        return SERACModule(scope, lora)

    @torch.no_grad()
    def scope_scores(self, examples: Sequence[Example]) -> torch.Tensor:
        """Scope probabilities [N, M] of the inputs against the M stored edits."""
        if not self._memory:
            return torch.zeros(len(examples), 0)
        x, e = self.input_features(examples), cat_features([m.features for m in self._memory])
        scores = torch.sigmoid(self.scope_logits(x, e))
        allowed = self.scope_allowed(x, e)
        return scores if allowed is None else scores * allowed.to(scores)

    def scope_allowed(self, x: Features, e: Features) -> torch.Tensor | None:
        """[N, M] which stored edits may answer which inputs whatever the classifier says (a
        variant's hard gate); None: all of them."""
        return None

    # ---- counterfactual model ---------------------------------------------------------
    @contextmanager
    def lora_active(self) -> Iterator[None]:
        """The base model becomes the counterfactual model while inside (LoRA hooks installed)."""
        handles = []
        try:
            for key, mod in self._lora_targets().items():
                f = self.module.lora[key]
                handles.append(mod.register_forward_hook(
                    lambda _m, args, out, f=f: out + f(args[0]).to(out.dtype)))
            yield
        finally:
            for h in handles:
                h.remove()

    def fact(self, example: Example) -> str:
        """The text by which an edit enters the counterfactual model's context."""
        return self.config.fact_template.format(prompt=example.prompt, target=example.target)

    def counterfactual_run(self, run: Callable[[Sequence[Example]], TargetView], examples: Sequence[Example],
                           fact: str) -> TargetView:
        """Run ``examples`` through the counterfactual model with ``fact`` in context."""
        with self.lora_active():
            return run([replace(ex, context=fact + ex.context) for ex in examples])

    # ---- routing -------------------------------------------------------------------------
    def _route(self, inner: Callable[[Sequence[Example]], TargetView], examples: Sequence[Example]) -> TargetView:
        """The run wrapper: in-scope inputs to the counterfactual model (with the best-scoring
        edit's fact), the rest to ``inner``, merged in the original order."""
        if not self._memory or not examples:
            return inner(examples)
        best, which = self.scope_scores(examples).max(1)
        groups: dict[int, list[int]] = {}
        for i, (s, j) in enumerate(zip(best.tolist(), which.tolist())):
            groups.setdefault(j if s >= self.config.threshold else -1, []).append(i)
        log.debug("%s routing (edit index: inputs; -1 = base model): %s", self.name, groups)
        if list(groups) == [-1]:
            return inner(examples)
        views, order = [], []
        for j, idx in sorted(groups.items()):
            sub = [examples[i] for i in idx]
            views.append(inner(sub) if j < 0 else self.counterfactual_run(inner, sub, self._memory[j].fact))
            order.append(idx)
        return merge_views(views, order, len(examples))

    def _install(self, entry: MemoryEntry, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> EditHandle:
        self._memory.append(entry)
        if not self._installed:
            self.adapter.run_wrappers.append(self._route)
            self._installed = True

        def undo() -> None:
            self._memory.remove(entry)
            if not self._memory and self._installed:
                self.adapter.run_wrappers.remove(self._route)
                self._installed = False

        return EditHandle(self.adapter, self.name, undo=undo, tensors=tensors, meta=meta)

    # ---- the editor contract --------------------------------------------------------------
    def edit(self, request: EditRequest) -> EditHandle:
        """Store the edit in the memory (no weights change; the classifier embeds the edit)."""
        ex = request.example
        with torch.no_grad():
            feats = self.edit_features(ex)
        entry = MemoryEntry(ex, self.fact(ex), feats, dict(request.record))
        tensors = {f"features.{k}": v for k, v in feats.items()}
        if ex.image is not None:
            tensors["image"] = _image_tensor(ex.image)  # for inspection; never read back
        rec = request.record
        meta = {"prompt": ex.prompt, "target": ex.target, "context": ex.context, "fact": entry.fact,
                "src": rec.get("src"), "alt": rec.get("alt"), "has_image": ex.image is not None}
        return self._install(entry, tensors, meta)

    def load(self, path: str | Path) -> EditHandle:
        """Re-apply a saved edit. Its stored features are used as saved, so outputs are identical
        to the edit's."""
        method, meta, t = read_saved_edit(path)
        if method != self.name:
            raise ValueError(f"{path}: saved by editor {method!r}, not {self.name!r}")
        f = Path(path) / "edit.safetensors"
        shapes = self.feature_shapes()
        missing = [f"features.{k}" for k in shapes if f"features.{k}" not in t]
        if missing:
            raise ValueError(f"{f}: no tensors {missing} (not a {self.name} edit, or saved by an "
                             "older version of it)")
        feats = {k: t[f"features.{k}"].to(self.device) for k in shapes}
        for k, shape in shapes.items():
            if tuple(feats[k].shape[1:]) != shape:
                raise ValueError(f"{f}: features.{k} has rows of shape {tuple(feats[k].shape[1:])}, this "
                                 f"editor expects {shape} (saved with another model or options?)")
        image = Image.fromarray(t["image"].numpy()) if "image" in t else None
        ex = Example(meta["prompt"], meta["target"], image, meta.get("context", ""))
        record = {k: meta[k] for k in ("src", "alt") if meta.get(k) is not None}
        entry = MemoryEntry(ex, meta.get("fact") or self.fact(ex), feats, record)
        return self._install(entry, t, meta)

    # ---- training ------------------------------------------------------------------------
    def train_loss(self, case) -> tuple[torch.Tensor, dict[str, float]]:
        """The classifier's loss + the counterfactual model's NLL on the in-scope inputs (edit
        input, rephrase, rephrased image) with the edit's fact in context."""
        cfg = self.config
        inp = case.inputs
        edit = inp["reliability"]
        loss_cls, logs = self.classifier_loss(case)
        in_scope = [edit, inp["t_generality"], inp["m_generality"]]
        loss_cf = target_nll(self.counterfactual_run(self.adapter.run_plain, in_scope, self.fact(edit)))
        loss = cfg.cls_weight * loss_cls + cfg.cf_weight * loss_cf
        return loss, {"cls": loss_cls.item(), "cf": loss_cf.item(), **logs}
