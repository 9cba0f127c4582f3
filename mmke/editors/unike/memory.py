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

**Many edits.** Installed edits do not each hook the layer: a :class:`LatentBank` per layer (and
shift configuration) keeps every edit's knowledge rows in one deduplicated tensor (the retrieved
rows come from one memory, so 1,000 edits hold about ``len(memory)`` + 1,000 distinct rows) with one
hook. With one edit the bank applies exactly that edit's shift (the formula above, bit for bit). With
several, each position t takes the shift of **one** edit: among the edits whose row gate is open
(unike-plus: the image gate of the edit's neurons in the same layer; every edit where ungated), the
edit e whose own knowledge state (its last row: the edit's question + new answer) has the highest
cosine with h_t; then, as for a single edit,

    h'_t = (1 - s_e,t g_e) h_t + s_e,t g_e softmax(cos(h_t, P_e) / tau) P_e

with s_e,t that edit's fixed or dynamic s and g_e its row gate. Positions of rows with no open
gate are left alone. The cost is one cosine against every distinct row and one softmax within the
chosen edit, whatever the number of edits (no per-edit attention or semantic encoding).
"""

from __future__ import annotations

import hashlib
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Iterator, Sequence

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file

from mmke.editors.unike.encoders import UniKEEncoders
from mmke.io import atomic_save_safetensors, atomic_write_json
from mmke.models.base import ModelAdapter
from mmke.models.placement import module_device

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


class BankGate:
    """A latent entry's row gate read from the neuron bank that holds the same edit's neurons
    (:meth:`~mmke.editors.patch.NeuronBank.gate_of`); the latent bank gathers these in one go."""

    def __init__(self, bank, owner: Hashable) -> None:
        self.bank, self.owner = bank, owner

    def __call__(self) -> torch.Tensor | None:
        return self.bank.gate_of(self.owner)


class LatentBank:
    """Every installed edit's latent-IKE knowledge of one layer (and one shift configuration:
    site, centre, tau, s, encoder): the rows of all edits in one deduplicated tensor, one hook.
    See the module docstring for how several edits' shifts combine."""

    def __init__(self, adapter: ModelAdapter, layer: int, site: str, key: tuple, center: torch.Tensor, *,
                 tau: float, s: float | None, semantic: Callable | None, floor: float) -> None:
        self.adapter, self.layer, self.key = adapter, layer, key
        self.center, self.tau, self.s, self.semantic, self.floor = center.float(), tau, s, semantic, floor
        self.entries: dict[Hashable, dict[str, Any]] = {}  # owner -> {"know": [M, H], "idx": [M], "gate": ...}
        self._rows: dict[bytes, int] = {}
        self._pool: list[torch.Tensor] = []  # unique knowledge rows [H]
        self._packed: dict[str, Any] | None = None
        self.last_s: torch.Tensor | None = None  # [B, T] the applied s of the last forward
        self._handle = site_module(adapter, layer, site).register_forward_hook(self._hook)

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, owner: Hashable, know: torch.Tensor, gate: Callable | None = None) -> None:
        know = know.float().to(self.center.device)
        before = len(self._pool)
        idx = []
        for row in know:
            b = row.detach().cpu().numpy().tobytes()
            if b not in self._rows:
                self._rows[b] = len(self._pool)
                self._pool.append(row.detach())
            idx.append(self._rows[b])
        self.entries[owner] = {"know": know, "idx": torch.tensor(idx, dtype=torch.long), "gate": gate,
                               "pool_before": before}
        self._packed = None

    def set_gate(self, owner: Hashable, gate: Callable | None) -> None:
        self.entries[owner]["gate"] = gate
        if self._packed is not None:
            self._packed.pop("calls", None)

    def remove(self, owner: Hashable) -> None:
        last = next(reversed(self.entries), None) == owner
        e = self.entries.pop(owner, None)
        if e is None:
            return
        self._packed = None
        if last and self.entries:  # the latest edit (a stream undone from its end): drop the rows it added
            cut = e["pool_before"]
            del self._pool[cut:]
            self._rows = {b: i for b, i in self._rows.items() if i < cut}
            return
        if not self.entries:
            self._handle.remove()
            banks = getattr(self.adapter, "_latent_banks", {})
            if banks.get(self.key) is self:
                del banks[self.key]
            return
        # the pool the remaining edits would have on their own (the same rows, in their order)
        self._rows, self._pool = {}, []
        old = list(self.entries.items())
        self.entries = {}
        for o, e in old:
            self.add(o, e["know"], e["gate"])

    # ---- the hook ------------------------------------------------------------------------
    def _hook(self, _mod, _args, out):  # out: [B, T, H] (or a tuple whose first item it is)
        h = _hidden_of(out)
        if len(self.entries) == 1:  # one edit: exactly its own shift
            e = next(iter(self.entries.values()))
            gate = e["gate"]() if e["gate"] is not None else None
            new, s = shift(h, e["know"], self.center, self.tau, self.s, self.semantic, self.floor, gate)
        else:
            new, s = self.packed_shift(h)
        self.last_s = s.detach()
        return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new

    def _pack(self) -> dict[str, Any]:
        if self._packed is None:
            P = torch.stack(self._pool)  # [U, H]
            idx = [e["idx"] for e in self.entries.values()]
            M = max(len(i) for i in idx)
            member = torch.zeros(len(idx), M, dtype=torch.long)
            valid = torch.zeros(len(idx), M, dtype=torch.bool)
            for j, i in enumerate(idx):
                member[j, : len(i)] = i
                valid[j, : len(i)] = True
            dev = P.device
            self._packed = {"P": P, "Pu": F.normalize(P - self.center, dim=-1), "member": member.to(dev),
                            "valid": valid.to(dev), "own": torch.stack([i[-1] for i in idx]).to(dev),
                            "owners": list(self.entries)}
        return self._packed

    def _gates(self, B: int, device) -> torch.Tensor:
        """[B, E] each edit's row gate (1 where the edit is ungated)."""
        pk = self._pack()
        G = torch.ones(B, len(pk["owners"]), device=device)
        if "calls" not in pk:  # sort the gates once per change of the bank's contents
            calls, groups = [], {}
            for j, e in enumerate(self.entries.values()):
                g = e["gate"]
                if isinstance(g, BankGate):
                    groups.setdefault(id(g.bank), (g.bank, [], [], {}))
                    groups[id(g.bank)][1].append(j)
                    groups[id(g.bank)][2].append(g)
                elif g is not None:
                    calls.append((j, g))
            pk["calls"], pk["groups"] = calls, list(groups.values())
        for j, g in pk["calls"]:
            v = g()
            if v is not None:
                G[:, j] = v.to(G)
        for bank, js, gates, cache in pk["groups"]:
            if len(bank) <= 1 or bank.last_gates is None:  # the bank runs its one patch: ask it
                for j, g in zip(js, gates):
                    v = g()
                    if v is not None:
                        G[:, j] = v.to(G)
                continue
            if cache.get("version") != bank.version:
                cols = bank.gate_columns([g.owner for g in gates])
                has = cols >= 0
                cache.update(version=bank.version, cols=cols[has].to(device),
                             js=torch.tensor(js, dtype=torch.long)[has].to(device))
            if len(cache["cols"]):
                G[:, cache["js"]] = bank.last_gates[:, cache["cols"]].to(G)
        return G

    def packed_shift(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Several edits: each position takes the shift of one edit, the one (among those whose row
        gate is open) whose own knowledge state it is most similar to (module docstring)."""
        B, T = h.shape[:2]
        pk = self._pack()
        G = self._gates(B, h.device)
        open_ = G > 0
        rows = open_.any(1).nonzero()[:, 0]
        s_all = torch.zeros(B, T, device=h.device)
        if len(rows) == 0:
            return h, s_all
        x = h[rows].float()  # [b, T, H]
        xc = x - self.center
        S = F.normalize(xc, dim=-1) @ pk["Pu"].t() / self.tau  # [b, T, U] every knowledge row
        route = S[..., pk["own"]].masked_fill(~open_[rows][:, None, :], float("-inf"))  # [b, T, E]
        e = route.argmax(-1)  # [b, T] the edit each position takes
        idx, valid = pk["member"][e], pk["valid"][e]  # [b, T, M]
        w = torch.softmax(S.gather(-1, idx).masked_fill(~valid, float("-inf")), -1)
        W = torch.zeros_like(S).scatter_add_(-1, idx, w * valid)
        know = W @ pk["P"]  # [b, T, H]: softmax(cos(h, P_e) / tau) P_e of the chosen edit e
        if self.s is None:
            c = F.cosine_similarity(self.semantic(know), xc, dim=-1)
            s_t = ((c - self.floor) / (1 - self.floor)).clamp(0, 1)
        else:
            s_t = torch.full(e.shape, float(self.s), device=h.device)
        s_t = s_t * G[rows].gather(1, e.reshape(len(rows), -1)).reshape(e.shape)
        new = ((1 - s_t[..., None]) * x + s_t[..., None] * know).to(h.dtype)
        out = h.clone()
        out[rows] = new
        s_all[rows] = s_t
        return out, s_all


def latent_bank(adapter: ModelAdapter, layer: int, site: str, center: torch.Tensor, *, tau: float,
                s: float | None, encoders: UniKEEncoders | None, enc_index: int, floor: float) -> LatentBank:
    """The latent bank of ``layer`` for one shift configuration (made on first use, registered on
    the adapter): edits of one editor share it; another configuration gets a bank (and hook) of its own."""
    c = center.detach().float().cpu().contiguous()
    key = (layer, site, float(tau), s, id(encoders) if encoders is not None else None, enc_index, float(floor),
           hashlib.sha256(c.numpy().tobytes()).hexdigest())
    banks = adapter.__dict__.setdefault("_latent_banks", {})
    if key not in banks:
        # the encoders live on their own device; states come from this layer's
        semantic = (lambda x, enc=encoders, i=enc_index: enc.semantic(i, x.to(module_device(enc))).to(x.device)) \
            if encoders is not None else None
        banks[key] = LatentBank(adapter, layer, site, key, center.float(), tau=tau, s=s, semantic=semantic,
                                floor=floor)
    return banks[key]


class LatentShift:
    """One edit's latent IKE: its knowledge rows in each edited layer's :class:`LatentBank` (the
    banks hook the layers' outputs at ``site``); ``remove()`` takes them out."""

    def __init__(self, adapter: ModelAdapter, know: dict[int, torch.Tensor], center: dict[int, torch.Tensor], *,
                 s: float | None, encoders: UniKEEncoders | None, enc_index: dict[int, int], tau: float,
                 site: str, calibrated: bool = False,
                 row_gate: dict[int, Callable[[], torch.Tensor | None]] | None = None) -> None:
        if s is None and encoders is None:
            raise ValueError("dynamic s needs the trained semantic encoder")
        self.know = know  # layer -> [M, H] retrieved h_pos (+ the edit's own, last)
        self.center = center  # layer -> [H] memory mean of the question states
        self.s, self.encoders, self.tau, self.calibrated = s, encoders, tau, calibrated
        self.owner = object()
        row_gate = row_gate or {}
        enc = encoders if s is None else None
        self.banks: dict[int, LatentBank] = {}
        for l in know:
            i = enc_index[l]
            floor = float(encoders.s_floor[i]) if encoders is not None and calibrated else 0.0
            bank = latent_bank(adapter, l, site, center[l], tau=tau, s=s, encoders=enc, enc_index=i, floor=floor)
            bank.add(self.owner, know[l], row_gate.get(l))
            self.banks[l] = bank

    @property
    def last_s(self) -> dict[int, torch.Tensor]:
        """layer -> [B, T] the s applied in the last forward (inspection)."""
        return {l: b.last_s for l, b in self.banks.items() if b.last_s is not None}

    def set_gates(self, gates: dict[int, Callable[[], torch.Tensor | None] | None]) -> None:
        """Read each layer's row gate from ``gates`` from now on (e.g. the neuron bank, once the
        edit's trained neurons moved there)."""
        for l, g in gates.items():
            self.banks[l].set_gate(self.owner, g)

    def remove(self) -> None:
        for b in self.banks.values():
            b.remove(self.owner)
        self.banks = {}
