"""Latent IKE: in-context knowledge as hidden states, kept in an external memory.

The memory holds, per edited layer l and train-split case i, three hidden states of the unedited
model in the space latent IKE shifts (``site``: the decoder layer's output, i.e. the residual
stream, by default; or the self-attention output):

    sem[l, i]  [H]  at the last token of the question (image + prompt)
    pos[l, i]  [H]  at the last token of question + correct answer
    neg[l, i]  [H]  at the last token of question + the model's own wrong answer (for zeta)

At edit time the edit's question state retrieves the top-K entries by cosine similarity to ``sem``
(taken around the memory mean, see :meth:`LatentMemory.retrieve`); the edit's own (question, new
answer) states join them. At every position t of every later input, each edited layer's output h_t
is shifted towards the knowledge it attends to:

    h_know_t = softmax(cos(h_t, P) / tau) P       P: [K+1, H] the retrieved pos states
    h'_t = (1 - s_t) h_t + s_t h_know_t           s_t fixed, or dynamic (:func:`shift`)

Stored as ``memory.safetensors`` (float16) + ``memory.json`` beside the encoder weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file

from mmke.editors.unike.encoders import UniKEEncoders
from mmke.io import atomic_save_safetensors, atomic_write_json
from mmke.models.base import ModelAdapter

log = logging.getLogger(__name__)

MEMORY_FILE = "memory.safetensors"
MEMORY_META = "memory.json"


@dataclass
class LatentMemory:
    """The external memory of one task: states of ``layers`` (absolute LM layer indices)."""

    layers: list[int]
    sem: torch.Tensor  # [L, N, H]
    pos: torch.Tensor  # [L, N, H]
    neg: torch.Tensor  # [L, N, H]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sem, self.pos, self.neg = (t.detach().cpu().half() for t in (self.sem, self.pos, self.neg))
        self.mean = self.sem.float().mean(1)  # [L, H]
        self._sem_unit = F.normalize(self.sem.float() - self.mean[:, None], dim=-1)  # [L, N, H]
        self._digest: str | None = None

    def __len__(self) -> int:
        return int(self.sem.shape[1])

    def layer_index(self, layer: int) -> int:
        return self.layers.index(layer)

    def retrieve(self, layer: int, query: torch.Tensor, k: int) -> list[int]:
        """Indices of the k entries whose question state is most cosine-similar to ``query`` [H]
        (both taken around the memory mean: the raw states share a large common component)."""
        i = self.layer_index(layer)
        q = F.normalize(query.float().cpu() - self.mean[i], dim=-1)
        return (self._sem_unit[i] @ q).topk(min(k, len(self))).indices.tolist()

    def digest(self) -> str:
        """Content hash (the states never change after construction: computed once)."""
        if self._digest is None:
            h = hashlib.sha256()
            for t in (self.sem, self.pos, self.neg):
                h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
            self._digest = h.hexdigest()[:16]
        return self._digest

    def save(self, d: str | Path) -> None:
        d = Path(d)
        d.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors({k: getattr(self, k).half() for k in ("sem", "pos", "neg")}, d / MEMORY_FILE)
        meta = {**self.meta, "layers": self.layers, "n_entries": len(self), "digest": self.digest()}
        atomic_write_json(d / MEMORY_META, meta, sort_keys=True)

    @classmethod
    def load(cls, d: str | Path) -> "LatentMemory":
        d = Path(d)
        f, m = d / MEMORY_FILE, d / MEMORY_META
        if not f.exists() or not m.exists():
            raise FileNotFoundError(f"{d}: latent-IKE memory ({MEMORY_FILE} + {MEMORY_META}) not found; "
                                    "build it with `mmke train --method unike`")
        try:
            t = load_file(str(f))
            meta = json.loads(m.read_text())
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{f}: unreadable or truncated memory ({e}); rebuild it") from e
        try:
            mem = cls(list(meta["layers"]), t["sem"], t["pos"], t["neg"], meta)
        except KeyError as e:
            raise ValueError(f"{f}: no {e} tensor; rebuild the memory") from e
        if meta.get("digest") not in (None, mem.digest()):
            raise ValueError(f"{f}: contents do not match {m} (digest); rebuild the memory")
        return mem


SITES = ("layer", "attn")


def site_module(adapter: ModelAdapter, layer: int, site: str) -> torch.nn.Module:
    """The module whose output latent IKE reads and shifts: a decoder layer or its attention output."""
    if site == "layer":
        return adapter.lm_layers()[layer]
    if site == "attn":
        return adapter.site(f"lm.attn_out.{layer}")
    raise ValueError(f"unknown latent-IKE site {site!r}; choose one of {SITES}")


def _hidden_of(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@contextmanager
def site_outputs(adapter: ModelAdapter, layers: Sequence[int], site: str) -> Iterator[dict[int, torch.Tensor]]:
    """Record the outputs [B, T, H] of ``layers`` at ``site`` (last forward wins) while open."""
    box: dict[int, torch.Tensor] = {}
    hooks = [site_module(adapter, l, site).register_forward_hook(
        lambda _m, _a, out, l=l: box.__setitem__(l, _hidden_of(out).detach())) for l in layers]
    try:
        yield box
    finally:
        for h in hooks:
            h.remove()


def shift(h: torch.Tensor, P: torch.Tensor, center: torch.Tensor, tau: float, s: float | None,
          semantic=None, floor: float = 0.0, gate: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent IKE on states h [B, T, H] with knowledge P [M, H]: (h', s [B, T]).

    ``s`` None is dynamic: c = cos(semantic(h_know), h - center), where ``semantic`` maps a state
    into the centred question-state space (the trained semantic encoder), and
    s = clamp((c - floor) / (1 - floor), 0, 1); ``floor`` = 0 is the paper's clamped cosine, the
    trained encoders carry a floor calibrated on unrelated inputs (see mmke.train.unike). ``gate``
    [B] scales each row's s (unike-plus: the image gate of the layer's new neurons)."""
    h32 = h.float()
    P_unit = F.normalize(P.float() - center, dim=-1)  # [M, H]
    att = torch.softmax(F.normalize(h32 - center, dim=-1) @ P_unit.t() / tau, -1)  # [B, T, M]
    know = att @ P.float()  # [B, T, H]
    if s is None:
        c = F.cosine_similarity(semantic(know), h32 - center, dim=-1)
        s_t = ((c - floor) / (1 - floor)).clamp(0, 1)
    else:
        s_t = torch.full(h.shape[:-1], float(s), device=h.device)
    if gate is not None:
        s_t = s_t * gate.to(s_t)[:, None]
    return ((1 - s_t[..., None]) * h32 + s_t[..., None] * know).to(h.dtype), s_t


class LatentShift:
    """The hooks of one edit's latent IKE: shift each edited layer's output at ``site``."""

    def __init__(self, adapter: ModelAdapter, know: dict[int, torch.Tensor], center: dict[int, torch.Tensor], *,
                 s: float | None, encoders: UniKEEncoders | None, enc_index: dict[int, int], tau: float,
                 site: str, calibrated: bool = False,
                 row_gate: dict[int, Callable[[], torch.Tensor | None]] | None = None) -> None:
        if s is None and encoders is None:
            raise ValueError("dynamic s needs the trained semantic encoder")
        self.know = know  # layer -> [M, H] retrieved h_pos (+ the edit's own)
        self.center = center  # layer -> [H] memory mean of the question states
        self.s, self.encoders, self.tau, self.calibrated = s, encoders, tau, calibrated
        # layer -> the current forward's per-row gate (set earlier in the same layer's forward)
        self.row_gate = row_gate or {}
        self.last_s: dict[int, torch.Tensor] = {}  # layer -> [B, T] of the last forward (inspection)
        self._handles = [site_module(adapter, l, site).register_forward_hook(self._hook(l, enc_index[l]))
                         for l in know]

    def _hook(self, layer: int, i: int):
        P, center = self.know[layer], self.center[layer].float()
        enc = self.encoders
        semantic = (lambda x: enc.semantic(i, x)) if enc is not None else None
        floor = float(enc.s_floor[i]) if enc is not None and self.calibrated else 0.0

        gate_of = self.row_gate.get(layer)

        def hook(_mod, _args, out):  # out: [B, T, H] (or a tuple whose first item it is)
            gate = gate_of() if gate_of is not None else None
            new, s = shift(_hidden_of(out), P, center, self.tau, self.s, semantic, floor, gate)
            self.last_s[layer] = s.detach()
            return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
