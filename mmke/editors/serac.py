"""SERAC: semi-parametric editing with a retrieval-augmented counterfactual model (Mitchell et al.,
ICML 2022), in the multimodal form of the MMEdit benchmark.

Edits are kept in an explicit memory beside the model; the base model's weights never change.
Every input the adapter runs is routed:

- a **scope classifier** scores the input against every stored edit input and takes the best
  edit; at or above ``threshold`` the input is in scope. Each input gets two embeddings: a
  *question* embedding (all-MiniLM-L6-v2 of the prompt text + the base model's own states of the
  whole input at ``feature_layer``: last prompt token and mean over the prompt, image included)
  and an *image* embedding (the same states for the image alone). The pair logit is
  ``s_q cos_q + s_i cos_i + b``, so an input is in scope only if it asks the same thing about the
  same content: the same question about another picture is not;
- in-scope inputs go to the **counterfactual model**: the base model with the edit's fact in its
  context (``Example.context``, before the image where the adapter supports it) and small LoRA
  factors on the last LM layers, active only while it runs, trained to follow the in-context fact
  over what the image shows;
- everything else goes to the base model unchanged.

Routing is a run wrapper (:attr:`ModelAdapter.run_wrappers`), installed with the first stored edit
and removed with the last, so ``remove()`` restores the outputs bit for bit.

Training (:meth:`SERACEditor.train_loss`, driven by :mod:`mmke.train.editors`) follows MMEdit's
SERAC objective: the counterfactual model's target NLL on the three in-scope inputs (edit input,
rephrase, rephrased image) with the fact in context, plus a balanced binary cross-entropy of the
classifier. Its positives are a case's rephrase and rephrased image; its negatives the case's
text-only and image locality inputs, the edit question on the unrelated image, the unrelated
question on the edit image, and every input of the other recently seen cases (a replay buffer of
frozen features) unless the two cases share both an answer and a question text.
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
    """SERAC options. ``feature_layer``, ``text_features``, ``scope_*`` and ``lora_*`` shape the
    trained module and must match its weights; ``threshold`` and ``fact_template`` act at run time;
    the loss weights, ``buffer_cases`` and ``seed`` only matter to training. Trained with
    ``mmke train --method serac --task vqa --lr 1e-3`` (300 steps of 4 cases)."""

    #: scope probability at or above which an input is answered by the counterfactual model
    threshold: float = 0.9
    #: LM layer whose output states feed the classifier (negative counts from the end); None: a
    #: quarter of the way up (layer 7 of SmolLM2's 30). The forward for classification stops there.
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
    #: recent training cases replayed in the classifier loss: every case's edit is scored against
    #: every buffered input (the features are frozen, so old cases stay valid)
    buffer_cases: int = 64
    seed: int = 0  # initialisation of the module (training only)


# --------------------------------------------------------------------------------------
# Learned parts
# --------------------------------------------------------------------------------------
Features = dict[str, torch.Tensor]
"""The classifier's raw (frozen) features of N inputs: ``text`` [N, 384] (MiniLM; [N, 0] without
text features), ``hidden`` [N, 2H] (base-model states of the whole input: last prompt token, mean
over the prompt), ``image`` [N, 2H] (the same for the image alone; zeros without an image) and
``has_image`` [N] (bool)."""


def cat_features(parts: Sequence[Features]) -> Features:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


class ScopeClassifier(nn.Module):
    """Scores whether an input falls under an edit, from two embeddings per input:

    - the *question* embedding (MiniLM text + the base model's states of the whole input), and
    - the *image* embedding (the base model's states of the image alone).

    ``logit(x, e) = s_q * cos_q + s_i * cos_i + bias``, where ``cos_i`` is +1 when neither has an
    image and -1 when only one has: an input is in scope only if it asks the same thing *and*
    shows the same content (the sum acts as an AND once the bias is learned)."""

    def __init__(self, text_dim: int, lm_hidden: int, width: int, dim: int) -> None:
        super().__init__()
        self.text_dim, self.lm_hidden = text_dim, lm_hidden
        self.question = nn.Sequential(nn.Linear(text_dim + 2 * lm_hidden, width), nn.GELU(), nn.Linear(width, dim))
        self.image = nn.Sequential(nn.Linear(2 * lm_hidden, width), nn.GELU(), nn.Linear(width, dim))
        self.log_scale = nn.Parameter(torch.full((2,), float(np.log(10.0))))  # s_q, s_i
        self.bias = nn.Parameter(torch.tensor(-10.0))

    def _states(self, x: torch.Tensor) -> torch.Tensor:
        # LLM states have a few huge coordinates: normalise each state (last token, mean) alone
        H = self.lm_hidden
        return torch.cat([F.layer_norm(x[:, :H].float(), (H,)), F.layer_norm(x[:, H:].float(), (H,))], 1)

    def embed(self, f: Features) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unit question and image embeddings [N, dim] and the has-image flags [N]."""
        q_in = torch.cat([f["text"].float(), self._states(f["hidden"])], 1)
        q = F.normalize(self.question(q_in), dim=-1)
        i = F.normalize(self.image(self._states(f["image"])), dim=-1)
        return q, i, f["has_image"].bool()

    def logits(self, x: tuple[torch.Tensor, ...], e: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Scope logits [N, M] of embedded inputs ``x`` against embedded edits ``e``."""
        (qx, ix, hx), (qe, ie, he) = x, e
        cos_i = ix @ ie.t()
        both, either = hx[:, None] & he[None, :], hx[:, None] | he[None, :]
        cos_i = torch.where(both, cos_i, torch.where(either, -1.0, 1.0).to(cos_i.dtype))
        s = self.log_scale.exp()
        return s[0] * (qx @ qe.t()) + s[1] * cos_i + self.bias


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
    raw features of the edit input (one row)."""

    example: Example
    fact: str
    features: Features
    record: dict[str, Any] = field(default_factory=dict)


@dataclass
class _BufferedCase:
    """A training case as the classifier loss sees it: features of its inputs (the edit input
    first, then ``n_in - 1`` more in-scope inputs, then out-of-scope ones) and what tells whether
    another case's inputs may be in its scope."""

    features: Features
    n_in: int
    texts: set[str]  # src, rephrase
    answers: set[str]  # alt, pred

    def may_share_scope(self, other: "_BufferedCase") -> bool:
        """Whether inputs of ``other`` might be in this case's scope: the same question about the
        same content needs a shared answer, and (up to rephrasings) a shared question text."""
        return bool(self.answers & other.answers) and bool(self.texts & other.texts)


class _StopForward(Exception):
    """Raised by the feature hook once the classifier's layer has run."""


def _image_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy())  # [H, W, 3]


FEATURE_KEYS = ("text", "hidden", "image", "has_image")


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
        layer = self.config.feature_layer if self.config.feature_layer is not None else n // 4
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
        for mod in self.adapter.lm_layers()[0].modules():
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
    def _states(self, examples: Sequence[Example]) -> torch.Tensor:
        """Base-model states at ``feature_layer`` [N, 2H]: at the last prompt token (it has seen
        the image and the whole prompt) and averaged over the prompt, image positions included.
        The forward stops at the feature layer."""
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
                # _prepare, not prepare: the scope is decided on the input itself, without the
                # in-context knowledge other editors' input transforms would add
                batch = adapter._prepare([replace(examples[i], context="") for i in idx]).to(adapter.device)
                got.clear()
                try:
                    adapter.forward(batch)
                except _StopForward:
                    pass
                if not got:
                    raise RuntimeError(f"serac: LM layer {self._feature_layer()} did not run")
                h = got[0].float()  # [B, T, H]
                attn = batch.inputs["attention_mask"].bool()
                for b, i in enumerate(idx):
                    t0 = int((batch.labels[b] != -100).nonzero()[0])  # first target token
                    out[i, :H] = h[b, t0 - 1]
                    out[i, H:] = h[b, :t0][attn[b, :t0]].mean(0)
        finally:
            handle.remove()
        return out

    def features(self, examples: Sequence[Example]) -> Features:
        """The classifier's raw features of some inputs (see :data:`Features`). The base model's
        weights are frozen, so these never change during training."""
        n = len(examples)
        with_img = [i for i, ex in enumerate(examples) if ex.image is not None]
        # the image alone: an empty prompt, so the last prompt position closes the image
        alone = [Example("", examples[i].target, examples[i].image) for i in with_img]
        states = self._states(list(examples) + alone)
        image = torch.zeros_like(states[:n])
        image[with_img] = states[n:]
        has = torch.zeros(n, dtype=torch.bool, device=states.device)
        has[with_img] = True
        return {"text": self._text_features([ex.prompt for ex in examples]), "hidden": states[:n],
                "image": image, "has_image": has}

    @torch.no_grad()
    def scope_scores(self, examples: Sequence[Example]) -> torch.Tensor:
        """Scope probabilities [N, M] of the inputs against the M stored edits."""
        if not self._memory:
            return torch.zeros(len(examples), 0)
        sc = self.module.scope
        x = sc.embed(self.features(examples))
        e = sc.embed(cat_features([m.features for m in self._memory]))
        return torch.sigmoid(sc.logits(x, e))

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
        log.debug("serac routing (edit index: inputs; -1 = base model): %s", groups)
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
        """Store the edit in the memory (no weights change; the classifier embeds its input)."""
        ex = request.example
        with torch.no_grad():
            feats = self.features([ex])
        entry = MemoryEntry(ex, self.fact(ex), feats, dict(request.record))
        tensors = {f"features.{k}": v for k, v in feats.items()}
        if ex.image is not None:
            tensors["image"] = _image_tensor(ex.image)
        rec = request.record
        meta = {"prompt": ex.prompt, "target": ex.target, "context": ex.context, "fact": entry.fact,
                "src": rec.get("src"), "alt": rec.get("alt"), "has_image": ex.image is not None}
        return self._install(entry, tensors, meta)

    def load(self, path: str | Path) -> EditHandle:
        """Re-apply a saved edit. Its stored features are used as saved, so outputs are identical
        to the edit's (the image is saved too, for inspection)."""
        method, meta, t = read_saved_edit(path)
        if method != self.name:
            raise ValueError(f"{path}: saved by editor {method!r}, not {self.name!r}")
        f = Path(path) / "edit.safetensors"
        missing = [k for k in FEATURE_KEYS if f"features.{k}" not in t]
        if missing:
            raise ValueError(f"{f}: no tensors {missing} (not a serac edit?)")
        sc = self.module.scope
        feats = {k: t[f"features.{k}"].to(self.adapter.device) for k in FEATURE_KEYS}
        if feats["text"].shape[-1] != sc.text_dim or feats["hidden"].shape[-1] != 2 * sc.lm_hidden:
            raise ValueError(f"{f}: features of sizes {feats['text'].shape[-1]}/{feats['hidden'].shape[-1]}, "
                             f"this editor expects {sc.text_dim}/{2 * sc.lm_hidden} (saved with another "
                             "model or options?)")
        image = Image.fromarray(t["image"].numpy()) if "image" in t else None
        ex = Example(meta["prompt"], meta["target"], image, meta.get("context", ""))
        record = {k: meta[k] for k in ("src", "alt") if meta.get(k) is not None}
        entry = MemoryEntry(ex, meta.get("fact") or self.fact(ex), feats, record)
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
        feats = self.features(in_scope + out_scope)
        self._buffer.append(_BufferedCase(
            feats, len(in_scope), {rec.src.strip(), rec.rephrase.strip()},
            {rec.alt.strip()} | ({rec.pred.strip()} if rec.pred else set())))
        while len(self._buffer) > max(cfg.buffer_cases, 1):
            self._buffer.popleft()
        loss_cls, acc = self._classifier_loss(list(self._buffer))

        loss_cf = target_nll(self.counterfactual_run(self.adapter.run_plain, in_scope, self.fact(edit)))
        loss = cfg.cls_weight * loss_cls + cfg.cf_weight * loss_cf
        return loss, {"cls": loss_cls.item(), "cf": loss_cf.item(), "cls_acc": acc}

    def _classifier_loss(self, cases: list[_BufferedCase]) -> tuple[torch.Tensor, float]:
        """Balanced BCE of every case's edit input against every buffered input: positive for a
        case's own in-scope inputs, negative for its out-of-scope ones and for other cases' inputs
        unless they may share its scope (those pairs are left out)."""
        sc = self.module.scope
        x = sc.embed(cat_features([c.features for c in cases]))  # all inputs
        starts, s = [], 0
        for c in cases:
            starts.append(s)
            s += len(c.features["has_image"])
        anchors = tuple(t[starts] for t in x)  # each case's edit input
        logits = sc.logits(anchors, x)  # [n_cases, n_inputs]
        label = torch.zeros_like(logits)
        use = torch.ones_like(logits, dtype=torch.bool)
        for a, (ca, sa) in enumerate(zip(cases, starts)):
            label[a, sa + 1: sa + ca.n_in] = 1.0
            use[a, sa] = False  # the edit input itself: trivially in scope
            for cb, sb in zip(cases, starts):
                if cb is not ca and ca.may_share_scope(cb):
                    use[a, sb: sb + len(cb.features["has_image"])] = False
        pos, neg = use & (label > 0), use & (label == 0)
        bce = F.binary_cross_entropy_with_logits(logits, label, reduction="none")
        loss = 0.5 * (bce[pos].mean() + bce[neg].mean())
        with torch.no_grad():
            acc = 0.5 * (((logits > 0) == (label > 0))[pos].float().mean()
                         + ((logits > 0) == (label > 0))[neg].float().mean())
        return loss, acc.item()
