"""``serac-mm``: SERAC with mmke's image-aware scope classifier — an improvement of ours, not the
published method (that is ``serac``, :mod:`.text`). Everything but the classifier is SERAC's
(:mod:`.editor`).

The reference classifier reads text only, so the edit's question about an unrelated image looks
like the edit itself (MMEdit's SERAC M-Locality collapse). This classifier looks at the image too.
Each input gets two embeddings: a *question* embedding (all-MiniLM-L6-v2 of the prompt text + the
base model's own states of the whole input at ``feature_layer``: last prompt token and mean over
the prompt, image included) and an *image* embedding (the same states for the image alone). The
pair logit is ``s_q cos_q + s_i cos_i + b``, so an input is in scope only if it asks the same thing
about the same content: the same question about another picture is not. An edit is embedded like
an input (its prompt and image; the target is not read).

Training adds to SERAC's objective harder classifier negatives than the reference's: besides a
case's text-only and image locality inputs, the edit question on the unrelated image, the
unrelated question on the edit image, and every input of the other recently seen cases (a replay
buffer of frozen features) unless the two cases share both an answer and a question text; the loss
is a balanced binary cross-entropy over all those pairs.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmke.editors.serac.editor import Features, SERACBase, SERACBaseConfig, cat_features
from mmke.editors.serac.text import TEXT_DIM
from mmke.models.base import Example


class SERACMMConfig(SERACBaseConfig):
    """serac-mm options (see :class:`SERACBaseConfig`). ``feature_layer``, ``text_features`` and
    ``scope_*`` shape the classifier and must match its weights; ``buffer_cases`` only matters to
    training. The bundled weights: ``mmke train --method serac-mm --task vqa|caption --steps 250``
    (about 20 minutes on one CPU core; each ``CARD.md`` holds the exact command and its log)."""

    threshold: float = 0.9
    #: LM layer whose output states feed the classifier (negative counts from the end); None: a
    #: quarter of the way up (layer 7 of SmolLM2's 30). The forward for classification stops there.
    feature_layer: int | None = None
    #: add all-MiniLM-L6-v2 embeddings of the prompt text to the classifier's features
    text_features: bool = True
    scope_hidden: int = 256  # classifier MLP width
    scope_dim: int = 128  # classifier embedding size
    #: recent training cases replayed in the classifier loss: every case's edit is scored against
    #: every buffered input (the features are frozen, so old cases stay valid)
    buffer_cases: int = 64
    #: serac-mm-gated: a stored edit made on an image answers only inputs whose image signature (the
    #: feature layer's output averaged over the image tokens, centred on train inputs) has at least
    #: this cosine with the edit image's; None: the classifier alone decides (serac-mm)
    image_gate: float | None = None
    center_cases: int = 64  # serac-mm-gated: train-split inputs whose mean signature centres the gate


FEATURE_KEYS = ("text", "hidden", "image", "has_image")
"""The features of N inputs: ``text`` [N, 384] (MiniLM; [N, 0] without text features), ``hidden``
[N, 2H] (base-model states of the whole input: last prompt token, mean over the prompt),
``image`` [N, 2H] (the same for the image alone; zeros without an image) and ``has_image`` [N]."""


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


@dataclass
class _BufferedCase:
    """A training case as the classifier loss sees it: features of its inputs (the edit input
    first, then ``n_in - 1`` more in-scope inputs, then out-of-scope ones) and what tells whether
    another case's inputs may be in its scope."""

    features: Features
    n_in: int
    texts: set[str]  # src, rephrase
    answers: set[str]  # alt, pred

    def may_share_scope(self, other: _BufferedCase) -> bool:
        """Whether inputs of ``other`` might be in this case's scope: the same question about the
        same content needs a shared answer, and (up to rephrasings) a shared question text."""
        return bool(self.answers & other.answers) and bool(self.texts & other.texts)


class _StopForward(Exception):
    """Raised by the feature hook once the classifier's layer has run."""


class SERACMMEditor(SERACBase):
    """SERAC with an image-aware scope classifier (mmke's variant)."""

    name = "serac-mm"
    Config = SERACMMConfig
    config: SERACMMConfig

    def __init__(self, adapter, config: SERACMMConfig | None = None, **kwargs: Any) -> None:
        self._text_cache: dict[str, torch.Tensor] = {}
        self._buffer: deque[_BufferedCase] = deque()
        self._center: torch.Tensor | None = None  # the gate's centre (serac-mm-gated)
        super().__init__(adapter, config, **kwargs)
        if self.config.image_gate is not None:
            records = self.train_records[: self.config.center_cases]
            if not records:
                raise ValueError(f"{self.name}: the image gate is centred on train inputs: give train records "
                                 "(--train-data), or --set image_gate=null for serac-mm")
            self._center = self._image_center(records)

    @classmethod
    def uses_train_records(cls, config) -> bool:
        return config.image_gate is not None

    # ---- module ----------------------------------------------------------------------
    def _feature_layer(self) -> int:
        n = self.adapter.num_lm_layers
        layer = self.config.feature_layer if self.config.feature_layer is not None else n // 4
        if not -n <= layer < n:
            raise ValueError(f"{self.name}: feature_layer {layer} out of range; the LM has {n} layers")
        return layer % n

    def _lm_hidden_size(self) -> int:
        for mod in self.adapter.lm_layers()[0].modules():
            if isinstance(mod, nn.Linear):
                return int(mod.in_features)
        raise ValueError(f"{self.name}: cannot tell the LM hidden size (no Linear layer in an LM layer)")

    def build_scope(self) -> nn.Module:
        cfg = self.config
        return ScopeClassifier(TEXT_DIM if cfg.text_features else 0, self._lm_hidden_size(),
                               cfg.scope_hidden, cfg.scope_dim)

    # ---- features --------------------------------------------------------------------
    def _text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """MiniLM embeddings [N, 384] (or [N, 0] without text features). Each prompt is embedded
        alone and memoised, so a prompt's embedding never depends on the batch it came in."""
        dev = self.device  # the scope classifier's
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
    def _states(self, examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
        """Base-model states at ``feature_layer`` [N, 2H]: at the last prompt token (it has seen
        the image and the whole prompt) and averaged over the prompt, image positions included;
        and the image signature [N, H]: the states averaged over the image-token positions (0
        without an image). The forward stops at the feature layer."""
        adapter = self.adapter
        layer = adapter.lm_layers()[self._feature_layer()]
        H = self.module.scope.lm_hidden
        out = torch.zeros(len(examples), 2 * H, device=self.device)  # features meet the classifier
        sig = torch.zeros(len(examples), H, device=self.device)
        got: list[torch.Tensor] = []

        def stop(_mod, _args, output):
            got.append(output[0] if isinstance(output, tuple) else output)
            raise _StopForward

        handle = layer.register_forward_hook(stop)
        try:
            for idx in adapter.sub_batches(examples):
                # the input itself, without its in-context text (another editor's input transform,
                # if one is installed, still applies: the adapter has no public way around it)
                batch = adapter.prepare([replace(examples[i], context="") for i in idx]).to(adapter.device)
                got.clear()
                try:
                    adapter.forward(batch)
                except _StopForward:
                    pass
                if not got:
                    raise RuntimeError(f"{self.name}: LM layer {self._feature_layer()} did not run")
                h = got[0].float().to(out.device)  # [B, T, H]
                attn = batch.inputs["attention_mask"].bool().to(out.device)
                im = adapter.image_mask(batch).to(out.device)
                for b, i in enumerate(idx):
                    t0 = int((batch.labels[b] != -100).nonzero()[0])  # first target token
                    out[i, :H] = h[b, t0 - 1]
                    out[i, H:] = h[b, :t0][attn[b, :t0]].mean(0)
                    if bool(im[b].any()):
                        sig[i] = h[b][im[b]].mean(0)
        finally:
            handle.remove()
        return out, sig

    def _image_center(self, records) -> torch.Tensor:
        """Mean image signature of the edit inputs of ``records`` (train split), images decoded
        one record at a time."""
        from mmke.scoring import case_inputs
        from mmke.tasks import TASKS

        task = self.task or TASKS["vqa"]
        sigs = []
        for r in records:
            ex = case_inputs(r, task, self.adapter.load_image, kinds=("reliability",))["reliability"]
            if ex.image is not None:
                sigs.append(self._states([ex])[1][0])
        if not sigs:
            raise ValueError(f"{self.name}: none of the {len(records)} train records has an image to centre the gate on")
        return torch.stack(sigs).mean(0)

    def input_features(self, examples: Sequence[Example]) -> Features:
        """The classifier's raw features of some inputs (see :data:`FEATURE_KEYS`). The base
        model's weights are frozen, so these never change during training."""
        n = len(examples)
        with_img = [i for i, ex in enumerate(examples) if ex.image is not None]
        # the image alone: an empty prompt, so the last prompt position closes the image
        alone = [Example("", examples[i].target, examples[i].image) for i in with_img]
        states, sig = self._states(list(examples) + alone)
        image = torch.zeros_like(states[:n])
        image[with_img] = states[n:]
        has = torch.zeros(n, dtype=torch.bool, device=states.device)
        has[with_img] = True
        feats = {"text": self._text_features([ex.prompt for ex in examples]), "hidden": states[:n],
                 "image": image, "has_image": has}
        if self._center is not None:  # the gate's unit signature (0 without an image)
            feats["sig"] = F.normalize(sig[:n] - self._center.to(sig), dim=-1) * has[:, None]
        return feats

    def edit_features(self, example: Example) -> Features:
        return self.input_features([example])

    def feature_shapes(self) -> dict[str, tuple[int, ...]]:
        sc = self.module.scope
        return {"text": (sc.text_dim,), "hidden": (2 * sc.lm_hidden,), "image": (2 * sc.lm_hidden,),
                "has_image": ()} | ({"sig": (sc.lm_hidden,)} if self._center is not None else {})

    def scope_allowed(self, x, e) -> torch.Tensor | None:
        """serac-mm-gated: an edit made on an image is open only to inputs with an image whose
        signature has at least ``image_gate`` cosine with the edit image's; an edit made without an
        image stays open to every input (as in serac-mm)."""
        if self._center is None:
            return None
        cos = x["sig"] @ e["sig"].t()
        return ~e["has_image"].bool()[None, :] | (x["has_image"].bool()[:, None] & (cos >= self.config.image_gate))

    def scope_logits(self, x: Features, e: Features) -> torch.Tensor:
        sc = self.module.scope
        return sc.logits(sc.embed(x), sc.embed(e))

    # ---- training ------------------------------------------------------------------------
    def classifier_loss(self, case) -> tuple[torch.Tensor, dict[str, float]]:
        """Balanced BCE of this and the buffered cases' edits against every buffered input (see
        the module docstring); this case's features join the buffer first."""
        inp, rec = case.inputs, case.record
        edit = inp["reliability"]
        in_scope = [edit, inp["t_generality"], inp["m_generality"]]
        m_loc = inp["m_locality"]
        out_scope = [inp["t_locality"], m_loc]
        if m_loc.image is not None and edit.image is not None:
            out_scope.append(replace(edit, image=m_loc.image))  # the edit question, unrelated image
            if rec.m_loc_q.strip() not in (rec.src.strip(), rec.rephrase.strip()):
                out_scope.append(replace(m_loc, image=edit.image))  # another question, the edit image
        feats = self.input_features(in_scope + out_scope)
        self._buffer.append(_BufferedCase(
            feats, len(in_scope), {rec.src.strip(), rec.rephrase.strip()},
            {rec.alt.strip()} | ({rec.pred.strip()} if rec.pred else set())))
        while len(self._buffer) > max(self.config.buffer_cases, 1):
            self._buffer.popleft()
        loss, acc = self._buffer_loss(list(self._buffer))
        return loss, {"cls_acc": acc}

    def _buffer_loss(self, cases: list[_BufferedCase]) -> tuple[torch.Tensor, float]:
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


class SERACMMGatedConfig(SERACMMConfig):
    """serac-mm-gated options: serac-mm's, with the image gate on (threshold from the train split:
    ``scripts/image_gate_separation.py --site layer-output --layer 7``)."""

    image_gate: float | None = 0.5


class SERACMMGatedEditor(SERACMMEditor):
    """serac-mm whose stored edits made on an image answer only inputs whose image resembles the
    edit's: the classifier's soft "same question and same content" becomes a hard AND on content.
    With many edits stored, some edit's score clears the threshold for almost any input; the gate
    (grace-mm's, on serac-mm's own feature-layer states) keeps unrelated images with the base model.
    It loads serac-mm's trained classifier and counterfactual model."""

    name = "serac-mm-gated"
    Config = SERACMMGatedConfig
    config: SERACMMGatedConfig
    weights_of = "serac-mm"

