"""The one interface every model family sits behind.

An adapter turns (image, prompt, target) triples into a teacher-forced batch whose labels are
-100 everywhere but the target tokens, runs the forward pass, and names the places an editor may
change ("edit sites"). Editors and the evaluation layer only ever talk to this interface.

Edit-site names (``i`` is a layer index, negative counts from the end):

- ``lm.ffn_key.{i}``   first FFN projection of LM layer i (keys; for gated FFNs the up projection)
- ``lm.ffn_value.{i}`` second FFN projection of LM layer i (values; down / fc2)
- ``lm.attn_out.{i}``  attention output projection of LM layer i
- ``lm.ffn.{i}``       the whole FFN block of LM layer i
- ``vision``           the vision encoder
- ``connector``        the vision-language connector (projector / Q-Former + projection)
"""

from __future__ import annotations

import hashlib
import re
import weakref
from abc import ABC, abstractmethod
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from PIL import Image
from torch import nn


@dataclass
class Example:
    """One model input: an optional image, a prompt (already templated) and a target string.

    ``target`` is scored as given: callers add the leading space (SPEC: ``" " + alt``).
    ``context`` is in-context knowledge (IKE demonstrations) placed before everything else,
    the image included, so that inputs sharing it can share its computation.
    """

    prompt: str
    target: str
    image: Image.Image | None = None
    context: str = ""


@dataclass
class Batch:
    """A teacher-forced batch. ``labels[b, t]`` is the token at position t for target positions
    and -100 elsewhere (prompt, image, padding); ``logits[b, t-1]`` predicts ``labels[b, t]``.
    ``inputs["prefix_len"]``, where an adapter sets it, is the number of leading tokens every row
    shares (a common ``Example.context``), which the adapter may run once for all rows."""

    inputs: dict[str, Any]
    labels: torch.Tensor  # [B, T]

    def to(self, device: torch.device | str) -> "Batch":
        moved = {k: v.to(device) if torch.is_tensor(v) else v for k, v in self.inputs.items()}
        return Batch(moved, self.labels.to(device))


@dataclass
class TargetView:
    """Logits aligned with the target tokens: ``logits[b, j]`` predicts ``target_ids[b, j]``."""

    logits: torch.Tensor  # [B, L, V]
    target_ids: torch.Tensor  # [B, L] (pad = 0 where mask is False)
    mask: torch.Tensor  # [B, L] bool


def target_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For teacher-forced ``labels`` [B, T]: the positions [B, L] whose outputs predict target
    tokens (left-aligned, padded with 0), the target ids [B, L] and the mask [B, L]."""
    mask = labels[:, 1:] != -100
    L = max(int(mask.sum(1).max()), 1) if mask.numel() else 1
    B = labels.shape[0]
    pos = torch.zeros(B, L, dtype=torch.long, device=labels.device)
    ids = torch.zeros(B, L, dtype=torch.long, device=labels.device)
    out_mask = torch.zeros(B, L, dtype=torch.bool, device=labels.device)
    for b in range(B):
        p = mask[b].nonzero(as_tuple=True)[0]
        pos[b, : p.numel()] = p
        ids[b, : p.numel()] = labels[b, p + 1]
        out_mask[b, : p.numel()] = True
    return pos, ids, out_mask


def _gather(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return x.gather(1, pos.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def target_view(logits: torch.Tensor, labels: torch.Tensor) -> TargetView:
    """Gather the logits that predict target tokens, left-aligned, padded to the longest target."""
    pos, ids, mask = target_positions(labels.to(logits.device))
    return TargetView(_gather(logits, pos), ids, mask)


def head_at_targets(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module) -> TargetView:
    """Like :func:`target_view` from last hidden states, running the (large) LM head only at the
    positions that predict target tokens."""
    pos, ids, mask = target_positions(labels.to(hidden.device))
    dev = head.weight.device
    return TargetView(head(_gather(hidden, pos).to(dev)), ids.to(dev), mask.to(dev))


def state_digest(model: nn.Module) -> str:
    """SHA-256 over every tensor of a model's state dict: equal digests = bit-identical models."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def target_nll(view: TargetView) -> torch.Tensor:
    """Mean negative log-likelihood of the target tokens (the edit loss)."""
    logp = torch.log_softmax(view.logits.float(), -1)
    tok = logp.gather(-1, view.target_ids.unsqueeze(-1)).squeeze(-1)
    return -(tok * view.mask).sum() / view.mask.sum().clamp(min=1)


def kl_at_targets(pre: TargetView, post: TargetView) -> torch.Tensor:
    """Mean KL(pre || post) of the next-token distributions at the target positions: the locality
    loss of hyper-network editor training (pre = the unedited model's view)."""
    lp = torch.log_softmax(pre.logits.float(), -1)
    lq = torch.log_softmax(post.logits.float(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return (kl * pre.mask).sum() / pre.mask.sum().clamp(min=1)


_SITE = re.compile(r"^lm\.(ffn_key|ffn_value|attn_out|ffn)\.(-?\d+)$")

InputTransform = Callable[[Example], Example]
RunWrapper = Callable[[Callable[[Sequence[Example]], "TargetView"], Sequence[Example]], "TargetView"]


#: hooks of these libraries (transformers' output capture, accelerate's placement) are per position
_LIBRARY_HOOKS = ("transformers.", "accelerate.")


def has_editor_hooks(model: nn.Module) -> bool:
    """Whether an editor's forward (pre-)hook is installed anywhere in ``model`` (library hooks
    aside). Editors' hooks may look at whole rows (an image gate spans the row, a label tap needs
    the full batch), so adapters then run rows as they are instead of sharing a prefix's cache."""
    return any(not getattr(h, "__module__", "").startswith(_LIBRARY_HOOKS)
               for m in model.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values()))


def prefix_kv(memo: dict[Any, Any] | None, ids: torch.Tensor, prefix: int,
              run_prefix: Callable[[], tuple[torch.Tensor, Any]]) -> tuple[torch.Tensor, list]:
    """(last hidden states [1, P, H], per-layer (keys, values)) of the ``prefix`` first tokens of
    ``ids``' rows: from ``memo`` (an adapter's :meth:`ModelAdapter.sharing_prefixes`) when it holds
    them, else from ``run_prefix()`` (returns the hidden states and the filled KV cache), kept there."""
    key = (ids.device, tuple(ids[0, :prefix].tolist()))
    if memo is not None and key in memo:
        return memo[key]
    h, cache = run_prefix()
    out = (h, [(layer.keys, layer.values) for layer in cache.layers])
    if memo is not None:
        memo[key] = out
    return out


def expanded_cache(kv: list, rows: int, config: Any) -> Any:
    """A fresh KV cache holding ``kv`` (from :func:`prefix_kv`) repeated for ``rows`` rows (views:
    the kept tensors are never written to)."""
    from transformers import DynamicCache

    return DynamicCache([(k.expand(rows, *k.shape[1:]), v.expand(rows, *v.shape[1:])) for k, v in kv], config=config)


def merge_views(views: Sequence[TargetView], groups: Sequence[Sequence[int]], n: int) -> TargetView:
    """Reassemble the views of sub-batches (``groups[g]`` = original indices of ``views[g]``'s
    rows) into one view of ``n`` rows in the original order, padded to the longest target."""
    L = max(v.logits.shape[1] for v in views)
    first = views[0]
    logits = first.logits.new_zeros(n, L, first.logits.shape[-1])
    ids = first.target_ids.new_zeros(n, L)
    mask = first.mask.new_zeros(n, L)
    for v, idx in zip(views, groups):
        for j, i in enumerate(idx):
            lj = v.logits.shape[1]
            logits[i, :lj] = v.logits[j]
            ids[i, :lj] = v.target_ids[j]
            mask[i, :lj] = v.mask[j]
    return TargetView(logits, ids, mask)


class ModelAdapter(ABC):
    """Wraps one vision-language model. Subclasses implement ``prepare``, ``forward`` and the
    layout hooks (``lm_layers``, ``_layer_site``, ``vision_module``, ``connector_module``)."""

    name: str = "base"
    model: nn.Module
    tokenizer: Any

    def __init__(self) -> None:
        # Input transforms installed by in-context editors (IKE, SERAC): each maps an Example to
        # the Example the model sees. Removing an edit pops its transform; weights are untouched.
        self.input_transforms: list[InputTransform] = []
        # Run wrappers installed by routing editors (SERAC): ``wrapper(inner_run, examples)`` returns
        # the TargetView of ``examples``, calling ``inner_run`` for whatever it does not answer itself.
        self.run_wrappers: list[RunWrapper] = []
        #: [B, T] image-token positions of the batch being run (set for the duration of a forward
        #: pass): hooks that need to know which positions are image tokens read it here
        self.current_image_mask: torch.Tensor | None = None
        #: shared-prefix outputs (hidden states, KV cache) computed so far by the current
        #: :meth:`run_plain` call, for adapters that reuse them across its batches; None outside one
        self._prefix_memo: dict[Any, Any] | None = None

    # ---- inputs and forward -------------------------------------------------------------
    @abstractmethod
    def _prepare(self, examples: Sequence[Example]) -> Batch:
        """Tokenise and collate; image and prompt positions get label -100."""

    @abstractmethod
    def _forward(self, batch: Batch) -> torch.Tensor:
        """Return logits [B, T, V] aligned with ``batch.labels``."""

    #: adapters that place ``Example.context`` themselves set this; otherwise it is prepended
    #: to the prompt text
    supports_context: bool = False
    #: adapters whose forward handles image and text-only rows in one batch set this
    mixed_batches: bool = False
    #: on a CPU, a batch whose longest row holds at least this many tokens past its shared prefix
    #: is run row by row (None: never): there, padding and the masked attention of a padded batch
    #: cost more than one call per row. Measured on 5 rows (lengths 1, 1, 0.9, 0.3, 0.95 x L, one
    #: thread): a 2-layer tiny Llama breaks even near L = 512 (0.7x at 256, 1.9x at 1024, 3.5x at
    #: 1600 batched / row by row), SmolLM2-135M near L = 128 (0.53x at 24, 1.37x at 512). Accelerators
    #: always batch.
    split_rows_from: int | None = 256

    #: how many recently prepared batches :meth:`prepare` keeps for reuse
    prepared_memo_size: int = 8

    def prepare(self, examples: Sequence[Example]) -> Batch:
        """Build a teacher-forced batch, applying any installed input transforms first.

        The last few batches are kept, keyed by what they were built from (prompt, target, context
        and the image object): a case's inputs are tokenised and their images processed once for its
        unedited and edited runs. Images are held weakly, so a batch is forgotten when its images go
        (a run still holds one case's images at a time). Batches are read-only."""
        out = []
        for ex in examples:
            for fn in self.input_transforms:
                ex = fn(ex)
            if ex.context and not self.supports_context:
                ex = Example(ex.context + ex.prompt, ex.target, ex.image)
            out.append(ex)
        memo = self.__dict__.setdefault("_prepared", OrderedDict())
        for k in [k for k, (_, refs) in memo.items() if any(r() is None for r in refs)]:
            del memo[k]  # its images are gone (and an id may be reused)
        key = tuple((ex.prompt, ex.target, ex.context, id(ex.image) if ex.image is not None else None)
                    for ex in out)
        if key in memo:
            memo.move_to_end(key)
            return memo[key][0]
        batch = self._prepare(out)
        memo[key] = (batch, [weakref.ref(ex.image) for ex in out if ex.image is not None])
        while len(memo) > self.prepared_memo_size:
            memo.popitem(last=False)
        return batch

    def forget_prepared(self) -> None:
        """Drop every kept batch (benchmarks timing a from-scratch cost); adapters that keep more
        (tokenised contexts) drop that too."""
        self.__dict__.pop("_prepared", None)

    def image_mask(self, batch: Batch) -> torch.Tensor:
        """[B, T] True at the positions that hold image tokens. Families whose image tokens are
        ``image_token_id`` placeholders in ``input_ids`` get this for free; others override it."""
        ids = batch.inputs["input_ids"]
        tok = getattr(self, "image_token_id", None)
        return ids == tok if tok is not None else torch.zeros_like(ids, dtype=torch.bool)

    @contextmanager
    def running(self, batch: Batch | torch.Tensor) -> Iterator[None]:
        """Mark ``batch`` (or its image mask) as the one being run (see :attr:`current_image_mask`)."""
        prev = self.current_image_mask
        self.current_image_mask = batch if torch.is_tensor(batch) else self.image_mask(batch)
        try:
            yield
        finally:
            self.current_image_mask = prev

    def forward(self, batch: Batch) -> torch.Tensor:
        batch = batch.to(self.device)
        with self.running(batch):
            return self._forward(batch)

    def _target_view(self, batch: Batch) -> TargetView:
        """Logits at target positions; adapters may override to skip the LM head elsewhere."""
        return target_view(self._forward(batch), batch.labels)

    def target_view(self, batch: Batch) -> TargetView:
        batch = batch.to(self.device)
        with self.running(batch):
            return self._target_view(batch)

    def sub_batches(self, examples: Sequence[Example]) -> list[list[int]]:
        """Indices of the examples run together: all at once where the forward handles image and
        text-only rows together, else one group per kind (some families need pixels per row)."""
        groups: dict[bool, list[int]] = {}
        for i, ex in enumerate(examples):
            groups.setdefault(self.mixed_batches or ex.image is not None, []).append(i)
        return list(groups.values())

    def run(self, examples: Sequence[Example]) -> TargetView:
        """Prepare + forward + align with targets, through any installed run wrappers (editors
        that route some inputs elsewhere, such as SERAC, wrap the plain run)."""
        fn: Callable[[Sequence[Example]], TargetView] = self.run_plain
        for wrapper in self.run_wrappers:
            fn = partial(wrapper, fn)
        return fn(examples)

    def run_plain(self, examples: Sequence[Example]) -> TargetView:
        """:meth:`run` without wrappers: the batches of :meth:`batches`, merged in order, with
        prefixes shared across them (:meth:`sharing_prefixes`)."""
        views, groups = [], []
        with self.sharing_prefixes():
            for idx, batch in self.batches(examples):
                views.append(self.target_view(batch))
                groups.append(idx)
        return merge_views(views, groups, len(examples))

    def batches(self, examples: Sequence[Example]) -> Iterator[tuple[list[int], Batch]]:
        """The batches evaluation runs for ``examples``, each with the indices of its rows: image
        and text-only examples apart where the family needs pixels for every row
        (:meth:`sub_batches`), and a sub-batch of long rows one row at a time on a CPU
        (:attr:`split_rows_from`). Lazy: run each batch before asking for the next (an editor may
        read the batch last prepared while it runs)."""
        for idx in self.sub_batches(examples):
            batch = self.prepare([examples[i] for i in idx])
            if len(idx) > 1 and self.runs_row_by_row(batch):
                for i in idx:
                    yield [i], self.prepare([examples[i]])
            else:
                yield list(idx), batch

    def runs_row_by_row(self, batch: Batch) -> bool:
        """Whether ``batch`` is faster run one row at a time (see :attr:`split_rows_from`)."""
        attn = batch.inputs.get("attention_mask")
        if self.split_rows_from is None or attn is None or self.device.type != "cpu":
            return False
        unshared = int(attn.sum(1).max()) - int(batch.inputs.get("prefix_len") or 0)
        return unshared >= self.split_rows_from

    @contextmanager
    def sharing_prefixes(self) -> Iterator[None]:
        """Inside, a prefix shared by rows (a common ``Example.context``) is computed once and
        reused by every batch that starts with it (adapters that support it); the model must not
        change inside. Nested uses share the outermost memo."""
        if self._prefix_memo is not None:
            yield
            return
        self._prefix_memo = {}
        try:
            yield
        finally:
            self._prefix_memo = None

    @torch.no_grad()
    def generate(self, example: Example, max_new_tokens: int = 8, stop: str = "\n") -> str:
        """The model's greedy answer to ``example`` (its prompt and image; its target is ignored),
        as text — with every installed edit in effect. Token by token: each step scores a
        placeholder after the answer so far and takes the top-1 prediction for it."""
        tok = self.tokenizer
        eos = getattr(tok, "eos_token_id", None)
        pad = tok.eos_token or tok.pad_token or "."
        ids: list[int] = []
        for _ in range(max_new_tokens):
            so_far = tok.decode(ids)
            v = self.run([Example(example.prompt, so_far + pad, example.image, example.context)])
            n = int(v.mask[0].sum())
            nxt = int(v.logits[0, n - 1].argmax())  # the position predicting the placeholder
            if nxt == eos:
                break
            ids.append(nxt)
            if stop and stop in tok.decode(ids):
                break
        return tok.decode(ids).split(stop)[0] if stop else tok.decode(ids)

    # ---- layout -------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @abstractmethod
    def lm_layers(self) -> nn.ModuleList:
        """The decoder layers of the language model."""

    @abstractmethod
    def _layer_site(self, layer: nn.Module, kind: str) -> nn.Module:
        """Map a site kind (ffn_key, ffn_value, attn_out, ffn) to a submodule of one LM layer."""

    @abstractmethod
    def vision_module(self) -> nn.Module: ...

    @abstractmethod
    def connector_module(self) -> nn.Module: ...

    @property
    def num_lm_layers(self) -> int:
        return len(self.lm_layers())

    def sites(self) -> list[str]:
        """All edit-site names this model exposes."""
        n = self.num_lm_layers
        names = [f"lm.{k}.{i}" for i in range(n) for k in ("ffn_key", "ffn_value", "attn_out", "ffn")]
        return names + ["vision", "connector"]

    def site(self, name: str) -> nn.Module:
        """Resolve an edit-site name to a module."""
        if name == "vision":
            return self.vision_module()
        if name == "connector":
            return self.connector_module()
        m = _SITE.match(name)
        if not m:
            raise KeyError(f"unknown edit site {name!r}; known kinds: lm.ffn_key.i, lm.ffn_value.i, "
                           "lm.attn_out.i, lm.ffn.i, vision, connector")
        layers = self.lm_layers()
        i = int(m.group(2))
        if not -len(layers) <= i < len(layers):
            raise KeyError(f"edit site {name!r}: the LM has {len(layers)} layers")
        return self._layer_site(layers[i], m.group(1))

    def site_parameters(self, names: Sequence[str]) -> dict[str, nn.Parameter]:
        """Parameters of the given sites, keyed by their full name in ``self.model``."""
        wanted = {id(p) for n in names for p in self.site(n).parameters()}
        return {k: p for k, p in self.model.named_parameters() if id(p) in wanted}

    # ---- helpers ------------------------------------------------------------------------
    def load_image(self, path: str | Path) -> Image.Image:
        return Image.open(path).convert("RGB")

    @property
    def max_length(self) -> int:
        """Longest token sequence the language model accepts."""
        return 2048
