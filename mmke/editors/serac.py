"""SERAC: semi-parametric editing with a retrieval-augmented counterfactual model (Mitchell et al.,
ICML 2022), in the multimodal form of the MMEdit benchmark.

Edits are kept in an explicit memory beside the model; the base model's weights never change.
Every input the adapter runs is routed:

- a **scope classifier** embeds the input and every stored edit input and scores each pair
  (``sigmoid(scale * cos + bias)``); an input whose best score reaches ``threshold`` is in scope.
  Its features are the all-MiniLM-L6-v2 embedding of the prompt text and the base model's own
  hidden states at ``feature_layer`` (at the last prompt token and averaged over the prompt), which
  have seen the image, so "the same question about another picture" can be told apart;
- in-scope inputs go to the **counterfactual model**: the base model with the edit's fact in its
  context (``Example.context``, before the image where the adapter supports it) and small LoRA
  factors on the last LM layers, active only while it runs, trained to follow the in-context fact
  over what the image shows;
- everything else goes to the base model unchanged.

Routing is a run wrapper (:attr:`ModelAdapter.run_wrappers`), installed with the first stored edit
and removed with the last, so ``remove()`` restores the outputs bit for bit. Training
(:meth:`SERACEditor.train_loss`, driven by :mod:`mmke.train.editors`): binary cross-entropy of the
classifier on in-scope pairs (the edit input vs its rephrase and the same question on the
rephrased image) and out-of-scope pairs (the text-only and image locality inputs, the edit
question on the unrelated image, the unrelated question on the edit image, and the inputs of
recent other cases whose answers differ), plus the target NLL of the counterfactual model on the
three in-scope inputs with the fact in context.
"""

from __future__ import annotations

import logging
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mmke.editors.base import EditHandle, EditRequest, read_saved_edit
from mmke.editors.trained import TrainedEditor, TrainedEditorConfig
from mmke.models.base import Example, ModelAdapter, TargetView, merge_views, target_nll

log = logging.getLogger(__name__)

TEXT_DIM = 384  # all-MiniLM-L6-v2


class SERACConfig(TrainedEditorConfig):
    """SERAC options. All but ``threshold`` and ``fact_template`` shape the trained module."""

    #: scope probability at or above which an input is answered by the counterfactual model
    threshold: float = 0.5
    #: LM layer whose output states feed the classifier (negative counts from the end); None: the
    #: middle layer. The forward pass for classification stops there.
    feature_layer: int | None = None
    #: add all-MiniLM-L6-v2 embeddings of the prompt text to the classifier's features
    text_features: bool = True
    scope_hidden: int = 256  # classifier MLP width
    scope_dim: int = 128  # classifier embedding size
    #: LM layers whose Linear layers get LoRA factors in the counterfactual model
    lora_layers: list[int] = [-4, -3, -2, -1]
    lora_rank: int = 8
    lora_alpha: float = 16.0
    #: how the edit enters the counterfactual model's context (``prompt`` already templated,
    #: ``target`` with its leading space)
    fact_template: str = "New Fact: {prompt}{target}\n"
    cls_weight: float = 1.0  # weight of the classifier loss in training
    cf_weight: float = 1.0  # weight of the counterfactual-model loss in training
    buffer_cases: int = 32  # recent training cases whose inputs serve as extra negatives
    seed: int = 0  # initialisation of the module (training only)


# --------------------------------------------------------------------------------------
# Learned parts
# --------------------------------------------------------------------------------------
class ScopeClassifier(nn.Module):
    """Embeds an input's features; the scope logit of (input, edit) is
    ``exp(log_scale) * cos(embed(input), embed(edit)) + bias``."""

    def __init__(self, text_dim: int, lm_hidden: int, width: int, dim: int) -> None:
        super().__init__()
        self.text_dim, self.lm_hidden = text_dim, lm_hidden
        self.mlp = nn.Sequential(nn.Linear(text_dim + 2 * lm_hidden, width), nn.GELU(), nn.Linear(width, dim))
        self.log_scale = nn.Parameter(torch.tensor(float(np.log(10.0))))
        self.bias = nn.Parameter(torch.tensor(-5.0))

    def embed(self, text: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """text [N, text_dim], hidden [N, 2H] (last-token and mean states) -> unit vectors [N, dim]."""
        H = self.lm_hidden
        # LLM states have a few huge coordinates: normalise each state before the MLP
        h = torch.cat([F.layer_norm(hidden[:, :H], (H,)), F.layer_norm(hidden[:, H:], (H,))], 1)
        x = torch.cat([text, h], 1) if self.text_dim else h
        return F.normalize(self.mlp(x.to(self.mlp[0].weight.dtype)), dim=-1)

    def logits(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Scope logits [N, M] of embedded inputs ``q`` [N, d] against embedded edits ``k`` [M, d]."""
        return self.log_scale.exp() * (q @ k.t()) + self.bias


class LoRAFactor(nn.Module):
    """Low-rank update of one Linear layer: x -> (x A^T B^T) * scale; zero at initialisation."""

    def __init__(self, d_in: int, d_out: int, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        self.scale = alpha / rank
        self.A = nn.Parameter(torch.randn(rank, d_in, generator=generator) * d_in ** -0.5)
        self.B = nn.Parameter(torch.zeros(d_out, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.A.t().to(x.dtype)) @ self.B.t().to(x.dtype) * self.scale


class SERACModule(nn.Module):
    """Everything SERAC learns: the scope classifier and the counterfactual model's LoRA factors
    (keyed ``l{layer}_{linear path with _}``)."""

    def __init__(self, scope: ScopeClassifier, lora: dict[str, LoRAFactor]) -> None:
        super().__init__()
        self.scope = scope
        self.lora = nn.ModuleDict(lora)


# --------------------------------------------------------------------------------------
# The edit memory
# --------------------------------------------------------------------------------------
@dataclass
class MemoryEntry:
    """One stored edit: its input, the fact the counterfactual model sees, and the classifier's
    raw features of the edit input (text [1, 384 or 0], hidden [1, 2H])."""

    example: Example
    fact: str
    text: torch.Tensor
    hidden: torch.Tensor
    record: dict[str, Any] = field(default_factory=dict)


@dataclass
class _BufferedCase:
    answers: set[str]
    edit: tuple[torch.Tensor, torch.Tensor]  # raw features of the edit input [1, .]
    scope: tuple[torch.Tensor, torch.Tensor]  # raw features of its in-scope inputs [3, .]


class _StopForward(Exception):
    """Raised by the feature hook once the classifier's layer has run."""


def _image_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy())  # [H, W, 3]


class SERACEditor(TrainedEditor):
    """SERAC: scope classifier + counterfactual model over an explicit edit memory."""

    name = "serac"
    Config = SERACConfig
    config: SERACConfig

    def __init__(self, adapter: ModelAdapter, config: SERACConfig | None = None, **kwargs: Any) -> None:
        self._memory: list[MemoryEntry] = []
        self._installed = False
        self._text_cache: dict[str, torch.Tensor] = {}
        self._buffer: deque[_BufferedCase] = deque()
        super().__init__(adapter, config, **kwargs)

    # ---- module ----------------------------------------------------------------------
    def _feature_layer(self) -> int:
        n = self.adapter.num_lm_layers
        layer = self.config.feature_layer if self.config.feature_layer is not None else n // 2
        if not -n <= layer < n:
            raise ValueError(f"serac: feature_layer {layer} out of range; the LM has {n} layers")
        return layer % n

    def _lora_targets(self) -> dict[str, nn.Linear]:
        """The Linear layers of the counterfactual model's LoRA, keyed like the module's factors."""
        layers = self.adapter.lm_layers()
        n = len(layers)
        out: dict[str, nn.Linear] = {}
        for i in self.config.lora_layers:
            if not -n <= i < n:
                raise ValueError(f"serac: lora_layers entry {i} out of range; the LM has {n} layers")
            for path, mod in layers[i % n].named_modules():
                if isinstance(mod, nn.Linear):
                    out[f"l{i % n}_{path.replace('.', '_')}"] = mod
        if not out and self.config.lora_layers:
            raise ValueError("serac: the chosen lora_layers contain no Linear layers")
        return out

    def _lm_hidden_size(self) -> int:
        layer = self.adapter.lm_layers()[0]
        for mod in layer.modules():
            if isinstance(mod, nn.Linear):
                return int(mod.in_features)
        raise ValueError("serac: cannot tell the LM hidden size (no Linear layer in an LM layer)")

    def build_module(self) -> nn.Module:
        cfg = self.config
        gen = torch.Generator().manual_seed(cfg.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            scope = ScopeClassifier(TEXT_DIM if cfg.text_features else 0, self._lm_hidden_size(),
                                    cfg.scope_hidden, cfg.scope_dim)
        lora = {k: LoRAFactor(m.in_features, m.out_features, cfg.lora_rank, cfg.lora_alpha, gen)
                for k, m in self._lora_targets().items()}
        return SERACModule(scope, lora)

    # ---- features --------------------------------------------------------------------
    def _text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """MiniLM embeddings [N, 384] (or [N, 0] without text features). Each prompt is embedded
        alone and memoised, so a prompt's embedding never depends on the batch it came in."""
        dev = self.adapter.device
        if not self.config.text_features:
            return torch.zeros(len(prompts), 0, device=dev)
        from mmke.retrieval import embed

        for p in dict.fromkeys(prompts):
            if p not in self._text_cache:
                if len(self._text_cache) > 100_000:
                    self._text_cache.clear()
                self._text_cache[p] = embed([p], cache=False)[0].to(dev)
        return torch.stack([self._text_cache[p] for p in prompts])

    @torch.no_grad()
    def _hidden_features(self, examples: Sequence[Example]) -> torch.Tensor:
        """Base-model states at ``feature_layer`` [N, 2H]: at the last prompt token (it has seen
        the image and the whole prompt) and averaged over the prompt, image positions included.
        The scope is decided on the input itself: in-context knowledge from other editors is left
        out. The forward stops at the feature layer."""
        adapter = self.adapter
        layer = adapter.lm_layers()[self._feature_layer()]
        H = self.module.scope.lm_hidden
        out = torch.zeros(len(examples), 2 * H, device=adapter.device)
        got: list[torch.Tensor] = []

        def stop(_mod, _args, output):
            got.append(output[0] if isinstance(output, tuple) else output)
            raise _StopForward

        handle = layer.register_forward_hook(stop)
        try:
            for idx in adapter.sub_batches(examples):
                # _prepare: the raw input, without other editors' input transforms
                batch = adapter._prepare([replace(examples[i], context="") for i in idx]).to(adapter.device)
                got.clear()
                try:
                    adapter.forward(batch)
                except _StopForward:
                    pass
                if not got:
                    raise RuntimeError(f"serac: LM layer {self._feature_layer()} did not run")
                h = got[0].float()  # [B, T, H]
                labels = batch.labels
                attn = batch.inputs["attention_mask"].bool()
                for b, i in enumerate(idx):
                    t0 = int((labels[b] != -100).nonzero()[0])  # first target token
                    keep = attn[b, :t0]
                    out[i, :H] = h[b, t0 - 1]
                    out[i, H:] = h[b, :t0][keep].mean(0)
        finally:
            handle.remove()
        return out

    def features(self, examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
        """The classifier's raw (frozen) features of some inputs: (text [N, 384], hidden [N, 2H])."""
        return self._text_features([ex.prompt for ex in examples]), self._hidden_features(examples)

    def scope_scores(self, examples: Sequence[Example], entries: Sequence[MemoryEntry] | None = None
                     ) -> torch.Tensor:
        """Scope probabilities [N, M] of the inputs against stored edits (default: the memory)."""
        entries = self._memory if entries is None else entries
        if not entries:
            return torch.zeros(len(examples), 0)
        sc = self.module.scope
        q = sc.embed(*self.features(examples))
        k = sc.embed(torch.cat([e.text for e in entries]), torch.cat([e.hidden for e in entries]))
        return torch.sigmoid(sc.logits(q, k))

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
        with torch.no_grad():
            p = self.scope_scores(examples)
        best, which = p.max(1)
        groups: dict[int, list[int]] = {}
        for i, (s, j) in enumerate(zip(best.tolist(), which.tolist())):
            groups.setdefault(j if s >= self.config.threshold else -1, []).append(i)
        log.debug("serac routing: %s", {k: len(v) for k, v in groups.items()})
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
        """Store the edit in the memory (no weights change; the classifier embeds it)."""
        ex = request.example
        text, hidden = self.features([ex])
        entry = MemoryEntry(ex, self.fact(ex), text, hidden, dict(request.record))
        tensors = {"text_features": text, "hidden_features": hidden}
        if ex.image is not None:
            tensors["image"] = _image_tensor(ex.image)
        rec = request.record
        meta = {"prompt": ex.prompt, "target": ex.target, "context": ex.context, "fact": entry.fact,
                "src": rec.get("src"), "alt": rec.get("alt"), "has_image": ex.image is not None}
        return self._install(entry, tensors, meta)

    def load(self, path: str | Path) -> EditHandle:
        """Re-apply a saved edit: the stored features are used as saved, so outputs are identical."""
        method, meta, t = read_saved_edit(path)
        if method != self.name:
            raise ValueError(f"{path}: saved by editor {method!r}, not {self.name!r}")
        for k in ("text_features", "hidden_features"):
            if k not in t:
                raise ValueError(f"{Path(path) / 'edit.safetensors'}: no {k!r} tensor (not a serac edit?)")
        sc = self.module.scope
        if t["text_features"].shape[-1] != sc.text_dim or t["hidden_features"].shape[-1] != 2 * sc.lm_hidden:
            raise ValueError(f"{path}: features of sizes {t['text_features'].shape[-1]}/"
                             f"{t['hidden_features'].shape[-1]}, this editor expects {sc.text_dim}/"
                             f"{2 * sc.lm_hidden} (saved with another model or options?)")
        dev = self.adapter.device
        image = Image.fromarray(t["image"].numpy()) if "image" in t else None
        ex = Example(meta["prompt"], meta["target"], image, meta.get("context", ""))
        record = {k: meta[k] for k in ("src", "alt") if meta.get(k) is not None}
        entry = MemoryEntry(ex, meta.get("fact") or self.fact(ex), t["text_features"].to(dev),
                            t["hidden_features"].to(dev), record)
        return self._install(entry, t, meta)

    # ---- training ------------------------------------------------------------------------
    def train_loss(self, case) -> tuple[torch.Tensor, dict[str, float]]:
        """Classifier BCE on in/out-of-scope pairs + counterfactual-model NLL on the in-scope
        inputs with the fact in context (see the module docstring)."""
        cfg = self.config
        inp, rec = case.inputs, case.record
        edit = inp["reliability"]
        in_scope = [edit, inp["t_generality"], inp["m_generality"]]
        m_loc = inp["m_locality"]
        out_scope = [inp["t_locality"], m_loc]
        if m_loc.image is not None and edit.image is not None:
            out_scope.append(replace(edit, image=m_loc.image))  # the edit question, unrelated image
            if rec.m_loc_q.strip() not in (rec.src.strip(), rec.rephrase.strip()):
                out_scope.append(replace(m_loc, image=edit.image))  # another question, the edit image
        text, hidden = self.features(in_scope + out_scope)
        n_in = len(in_scope)
        answers = {rec.alt.strip()} | ({rec.pred.strip()} if rec.pred else set())

        sc = self.module.scope
        q = sc.embed(text, hidden)  # [n_in + n_out, d]
        pos = sc.logits(q[:1], q[1:n_in]).reshape(-1)
        neg = [sc.logits(q[:1], q[n_in:]).reshape(-1)]
        # other recent cases: out of scope whenever no answer is shared (a shared answer is
        # necessary for the same question about the same content)
        others = [b for b in self._buffer if not (b.answers & answers)]
        if others:
            bk = sc.embed(torch.cat([b.edit[0] for b in others]), torch.cat([b.edit[1] for b in others]))
            bq = sc.embed(torch.cat([b.scope[0] for b in others]), torch.cat([b.scope[1] for b in others]))
            neg.append(sc.logits(q[:1], bq).reshape(-1))  # this edit vs their inputs
            neg.append(sc.logits(q[:n_in], bk).reshape(-1))  # their edits vs this case's inputs
        neg_t = torch.cat(neg)
        loss_cls = 0.5 * (F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos))
                          + F.binary_cross_entropy_with_logits(neg_t, torch.zeros_like(neg_t)))
        self._buffer.append(_BufferedCase(answers, (text[:1], hidden[:1]), (text[:n_in], hidden[:n_in])))
        while len(self._buffer) > cfg.buffer_cases:
            self._buffer.popleft()

        loss_cf = target_nll(self.counterfactual_run(self.adapter.run_plain, in_scope, self.fact(edit)))
        loss = cfg.cls_weight * loss_cls + cfg.cf_weight * loss_cf
        with torch.no_grad():
            acc = torch.cat([(pos > 0).float(), (neg_t < 0).float()]).mean()
        return loss, {"cls": loss_cls.item(), "cf": loss_cf.item(), "cls_acc": acc.item()}
