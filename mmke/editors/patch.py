"""Extra FFN key-value neurons, the shared piece of T-Patcher and UniKE's intrinsic editing.

FFN as key-value memory: FFN(q) = Act(q W_K + b_K) W_V + b_V. A patch appends n new pairs
without touching the original weights:

    FFN_edit(q) = FFN(q) + Act(q K + b) V          K: [H, n]  b: [n]  V: [n, H]

Two ways to install patches, both with two hooks on one LM layer (a forward pre-hook on the FFN
key projection captures q, the FFN input; a forward hook on the value projection adds the
neurons' output to the FFN output), for every family whose keys and values are Linear layers
(Llama: up/down, OPT: fc1/fc2):

- :class:`PatchHooks`: hooks of their own per patch: the patch being trained;
- :class:`NeuronBank`: the installed (frozen) edits. One bank per (adapter, layer), found or made
  by :func:`neuron_bank`, holds every installed edit's neurons packed in one key-value block, with
  **one** pre-hook and **one** hook however many edits it holds: ``add(owner, patch)`` appends an
  edit's neurons, ``remove(owner)`` takes exactly those out (any order). With one edit the bank
  runs that edit's own patch (bit for bit what its own hooks computed); with several, the packed
  block. An emptied bank removes its hooks and leaves the registry: the model is exactly the
  unedited one, no parameter was ever changed.

A patch's keys normally read its own layer's FFN input. A patch whose ``key_layer`` is set reads
that (earlier) layer's FFN input instead and still adds to its own layer's FFN output (UniKE's
``key_site="first"``): all of an edit's layers then fire on exactly the same inputs and positions,
decided where no other edit has changed the states yet. Such patches go to banks of their own,
one per (layer, key layer).

The packed block folds each edit's input centring and scaling (UniKE's ``mu`` and ``gamma``) and
its zeta offset into per-neuron keys, biases and values,

    Act_n(((q - mu_e) * gamma_e) K_n + b_n) (V_n + zeta_e) = Act_n(q (gamma_e K_n) + b'_n) V'_n,

so the sum over edits is one matmul for the ungated neurons. An edit's neurons that share key and
bias (UniKE's closed-form keys: one per target position) are packed as one, their values summed.
Neurons gated on their edit's image (unike-plus, :class:`~mmke.editors.unike.intrinsic.EditPatch`)
are computed row by row, each row over only the edits whose image gate is open for it (cheap:
per-edit cosines of the row's image signature): most edits are silent on most inputs, and their
neurons cost nothing there.

**Competing edits** (a patch with ``compete = True``; UniKE's ``compete`` option): among the gated
edits open on a row, at each position only the edit that fires most strongly there adds its
neurons (its strength: its strongest neuron's activation times its image gate; ties go to the
latest edit), as GRACE's nearest key answers alone. An edit then acts on its own input as if it
were alone, wherever no other edit fires there as strongly. While a new patch trains beside the
bank (:class:`PatchHooks`), :attr:`NeuronBank.contender` holds it: the bank's edits then also yield
to it wherever it fires at least as strongly, as they will once it is installed (it is the latest).
"""

from __future__ import annotations

from typing import Any, Callable, Hashable

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
        #: the LM layer whose FFN input the keys read (None: the patch's own layer)
        self.key_layer: int | None = None
        #: in a bank, only the strongest firing edit acts at each position (see the module docstring)
        self.compete = False

    def forward(self, q: torch.Tensor, image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """q: [B, T, H] (or [B*T, H]) -> the patch's addition to the FFN output, same shape.
        ``image_mask`` [B, T] (the image-token positions) is for patches that look at the image."""
        return self.act(q @ self.key.to(q.dtype) + self.bias.to(q.dtype)) @ self.value.to(q.dtype)

    def packed(self) -> dict[str, Any]:
        """This patch in the bank's per-neuron form (see :class:`NeuronBank`): keys, biases and values
        with any centring, scaling and offset folded in, the activation and the image gate."""
        return {"key": self.key.detach(), "bias": self.bias.detach(), "value": self.value.detach(),
                "act": self.act, "gate": None}


class PatchHooks:
    """Install FFN patches on LM layers of an adapter with hooks of their own (a patch being
    trained); ``remove()`` takes them all out."""

    def __init__(self, adapter: ModelAdapter, patches: dict[int, FFNPatch]) -> None:
        self.patches = patches
        self._handles = []
        for layer, patch in patches.items():
            key = adapter.site(f"lm.ffn_key.{key_layer_of(patch, layer)}")
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


# ---- the packed bank of installed edits ---------------------------------------------------------
class _Grow:
    """An append-only tensor along dim 0 with doubling capacity (amortised O(new) appends)."""

    def __init__(self) -> None:
        self.buf: torch.Tensor | None = None
        self.n = 0

    def append(self, t: torch.Tensor) -> None:
        if self.buf is None:
            self.buf = torch.empty((max(len(t), 8), *t.shape[1:]), dtype=t.dtype, device=t.device)
        elif self.n + len(t) > len(self.buf):
            new = torch.empty((max(2 * len(self.buf), self.n + len(t)), *t.shape[1:]), dtype=t.dtype,
                              device=t.device)
            new[: self.n] = self.buf[: self.n]
            self.buf = new
        self.buf[self.n: self.n + len(t)] = t
        self.n += len(t)

    def get(self) -> torch.Tensor:
        return self.buf[: self.n]


class _Group:
    """Packed neurons of one kind (ungated, or image-gated): keys stored transposed [N, H]."""

    def __init__(self) -> None:
        self.key_t, self.bias, self.value, self.act, self.edit = _Grow(), _Grow(), _Grow(), _Grow(), _Grow()
        # gated: per edit (gate column) the unit image key, its centre and the ramp
        self.img_key, self.img_center, self.lo, self.hi = _Grow(), _Grow(), _Grow(), _Grow()
        self.n_edits = 0
        self.same_center = True

    @property
    def size(self) -> int:
        return self.bias.n


class NeuronBank:
    """Every installed edit's neurons of one LM layer, packed; one pre-hook + one hook in all."""

    def __init__(self, adapter: ModelAdapter, layer: int, key_layer: int | None = None) -> None:
        self.adapter, self.layer = adapter, layer
        self.key_layer = layer if key_layer is None else key_layer  # whose FFN input the keys read
        self.entries: dict[Hashable, FFNPatch] = {}  # owner -> its (frozen) patch, in insertion order
        self._slices: dict[Hashable, slice] = {}
        self._handles: list = []
        self._box: dict[str, torch.Tensor] = {}
        self._acts: list[Callable] = []  # activation functions (codes index this list)
        self._reset_packed()
        #: [B, E_gated] the image gates of the last packed forward (column per gated edit)
        self.last_gates: torch.Tensor | None = None
        self._gate_col: dict[Hashable, int] = {}
        #: a patch training beside the bank (competing edits yield to it where it fires as strongly)
        self.contender: FFNPatch | None = None

    # ---- membership ----------------------------------------------------------------------
    def _reset_packed(self) -> None:
        self._ungated, self._gated = _Group(), _Group()
        self._gate_col = {}
        self._n = 0
        self.version = getattr(self, "version", 0) + 1  # changes with the bank's contents

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def compete(self) -> bool:
        """Whether the bank's edits compete (all of them do, or none)."""
        return bool(self.entries) and bool(getattr(next(iter(self.entries.values())), "compete", False))

    @property
    def num_neurons(self) -> int:
        """Neurons in the packed block (an edit's neurons with one key and bias count once)."""
        return self._n

    def add(self, owner: Hashable, patch: FFNPatch) -> slice:
        """Install ``patch`` (frozen) as the neurons of edit ``owner``; returns its neurons' slice."""
        if owner in self.entries:
            raise KeyError(f"edit {owner!r} is already in the bank of layer {self.layer}")
        if key_layer_of(patch, self.layer) != self.key_layer:
            raise ValueError(f"a patch keyed on layer {key_layer_of(patch, self.layer)}'s FFN input cannot join the "
                             f"bank of layer {self.layer} keyed on layer {self.key_layer}'s (use neuron_bank)")
        if self.entries and bool(getattr(patch, "compete", False)) != self.compete:
            raise ValueError(f"the bank of layer {self.layer} holds edits with compete={self.compete}; an edit with "
                             f"compete={not self.compete} cannot join it (remove them first)")
        patch.requires_grad_(False)
        self.entries[owner] = patch
        sl = self._pack(owner, patch)
        if not self._handles:
            key = self.adapter.site(f"lm.ffn_key.{self.key_layer}")
            value = self.adapter.site(f"lm.ffn_value.{self.layer}")
            self._handles = [key.register_forward_pre_hook(self._capture), value.register_forward_hook(self._add)]
        return sl

    def remove(self, owner: Hashable) -> None:
        """Take edit ``owner``'s neurons out; the last one out removes the hooks (and the bank)."""
        if owner not in self.entries:
            return
        latest = next(reversed(self.entries)) == owner
        del self.entries[owner]
        if latest and self.entries:  # a stream undone from its end: cut its neurons off the ends
            self._unpack_latest(owner)
        else:
            self._reset_packed()
            for o, p in self.entries.items():  # the layout the remaining edits would have on their own
                self._pack(o, p)
        if not self.entries:
            for h in self._handles:
                h.remove()
            self._handles = []
            self.last_gates = None
            banks = getattr(self.adapter, "_neuron_banks", {})
            if banks.get(self._registry_key) is self:
                del banks[self._registry_key]

    def _unpack_latest(self, owner: Hashable) -> None:
        """Take the latest edit's neurons off the end of its group: the packed block is then the
        one the remaining edits would have had on their own (they were packed in this order)."""
        sl = self._slices.pop(owner)
        k = sl.stop - sl.start
        col = self._gate_col.pop(owner, None)
        grp = self._gated if col is not None else self._ungated
        for g in (grp.key_t, grp.bias, grp.value, grp.act, grp.edit):
            g.n -= k
        if col is not None:
            for g in (grp.img_key, grp.img_center, grp.lo, grp.hi):
                g.n -= 1
            if grp.img_center.n:  # as a fresh packing would find it
                c = grp.img_center.get()
                grp.same_center = bool((c == c[0]).all())
        grp.n_edits -= 1
        self._n -= k
        self.version += 1

    def _act_code(self, fn: Callable) -> int:
        for i, f in enumerate(self._acts):
            if f is fn:
                return i
        self._acts.append(fn)
        return len(self._acts) - 1

    @torch.no_grad()
    def _pack(self, owner: Hashable, patch: FFNPatch) -> slice:
        d = patch.packed()
        key_t, bias, value = _merge_duplicates(d["key"].t().float(), d["bias"].float(), d["value"].float())
        n = int(bias.shape[0])
        gate = d["gate"]
        grp = self._gated if gate is not None else self._ungated
        grp.key_t.append(key_t)
        grp.bias.append(bias)
        grp.value.append(value)
        grp.act.append(torch.full((n,), self._act_code(d["act"]), dtype=torch.long, device=d["bias"].device))
        grp.edit.append(torch.full((n,), grp.n_edits, dtype=torch.long, device=d["bias"].device))
        if gate is not None:
            key, center, (lo, hi) = gate
            if grp.n_edits and not torch.equal(grp.img_center.buf[0], center.float()):
                grp.same_center = False
            grp.img_key.append(key.float()[None])
            grp.img_center.append(center.float()[None])
            grp.lo.append(torch.tensor([float(lo)], device=key.device))
            grp.hi.append(torch.tensor([float(hi)], device=key.device))
            self._gate_col[owner] = grp.n_edits
        grp.n_edits += 1
        sl = slice(self._n, self._n + n)
        self._slices[owner] = sl
        self._n += n
        self.version += 1
        return sl

    # ---- the hooks -----------------------------------------------------------------------
    def _capture(self, _mod, args) -> None:
        self._box["q"] = args[0]

    def _add(self, _mod, _args, out):
        q = self._box.pop("q")
        return out + self(q, self.adapter.current_image_mask).to(out.dtype)

    def __call__(self, q: torch.Tensor, image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """All the bank's neurons' addition to the FFN output for FFN inputs q [B, T, H] (or [B*T, H])."""
        if len(self.entries) == 1 and not (self.contender is not None and self.compete):
            return next(iter(self.entries.values()))(q, image_mask)  # exactly as its own hooks ran it
        return self.packed_forward(q, image_mask)

    def gate_of(self, owner: Hashable) -> torch.Tensor | None:
        """Edit ``owner``'s image gate [B] in the last forward (None: an ungated edit)."""
        if len(self.entries) == 1:
            return getattr(self.entries[owner], "last_gate", None)
        col = self._gate_col.get(owner)
        return None if col is None or self.last_gates is None else self.last_gates[:, col]

    def gate_columns(self, owners: list[Hashable]) -> torch.Tensor:
        """Gate columns of ``owners`` (-1: ungated) for :attr:`last_gates`."""
        return torch.tensor([self._gate_col.get(o, -1) for o in owners], dtype=torch.long)

    def _act(self, z: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        if len(self._acts) == 1:
            return self._acts[0](z)
        a = torch.empty_like(z)
        for i, fn in enumerate(self._acts):
            m = codes == i
            if bool(m.any()):
                cols = m.nonzero()[:, 0]
                a[..., cols] = fn(z[..., cols])
        return a

    def _image_gates(self, q: torch.Tensor, image_mask: torch.Tensor | None, B: int) -> torch.Tensor:
        g = self._gated
        if image_mask is None:
            return q.new_zeros((B, g.n_edits), dtype=torch.float32)
        return _ramp_gates(q, image_mask, g.img_key.get(), g.img_center.get(), g.lo.get(), g.hi.get(), g.same_center)

    def _contender_strength(self, q: torch.Tensor, image_mask: torch.Tensor | None, B: int) -> torch.Tensor:
        """[B, T]: how strongly :attr:`contender` fires at each position (its strongest neuron's
        activation times its image gate), as the bank would count it once installed."""
        d = self.contender.packed()
        x = q.reshape(B, -1, q.shape[-1]).float()
        s = d["act"](x @ d["key"].float().to(x.device) + d["bias"].float().to(x.device)).amax(-1)
        if d["gate"] is not None:
            key, center, (lo, hi) = d["gate"]
            if image_mask is None:
                return torch.zeros_like(s)
            t = lambda v: torch.tensor([float(v)], device=x.device)  # noqa: E731
            s = s * _ramp_gates(q, image_mask, key.float()[None].to(x.device), center.float()[None].to(x.device),
                                t(lo), t(hi), True)
        return s

    def packed_forward(self, q: torch.Tensor, image_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.zeros_like(q)
        u = self._ungated
        if u.size:
            z = q @ u.key_t.get().t().to(q.dtype) + u.bias.get().to(q.dtype)
            out = out + self._act(z, u.act.get()) @ u.value.get().to(q.dtype)
        g = self._gated
        if not g.size:
            self.last_gates = None
            return out
        B = image_mask.shape[0] if image_mask is not None else (q.shape[0] if q.dim() == 3 else 1)
        G = self._image_gates(q, image_mask, B)  # [B, E_gated]
        self.last_gates = G
        open_ = G > 0
        if not bool(open_.any()):
            return out
        x = q.reshape(B, -1, q.shape[-1])
        compete = self.compete
        floor = self._contender_strength(q, image_mask, B) if compete and self.contender is not None else None
        K, b, V, acts, edit = g.key_t.get(), g.bias.get(), g.value.get(), g.act.get(), g.edit.get()
        rows = []
        for r in range(B):
            cols = open_[r][edit].nonzero()[:, 0]
            if len(cols) == 0:
                rows.append(torch.zeros_like(x[r]))
                continue
            z = x[r] @ K[cols].t().to(q.dtype) + b[cols].to(q.dtype)  # [T, n_open]
            a = self._act(z, acts[cols]) * G[r, edit[cols]].to(q.dtype)
            if compete:
                a = _strongest_only(a, edit[cols], None if floor is None else floor[r])
            rows.append(a @ V[cols].to(q.dtype))
        return out + torch.stack(rows).reshape(q.shape)

    def remove_all(self) -> None:
        for o in list(self.entries):
            self.remove(o)

    @property
    def _registry_key(self) -> int | tuple[int, int]:
        return bank_key(self.layer, self.key_layer)


def _ramp_gates(q: torch.Tensor, image_mask: torch.Tensor, keys: torch.Tensor, centers: torch.Tensor,
                lo: torch.Tensor, hi: torch.Tensor, same_center: bool) -> torch.Tensor:
    """[B, E] image gates: the cosine of each row's image signature (mean FFN input over its image
    tokens) to each edit's unit key, both centred on the edit's centre, ramped from lo to hi."""
    x = q.reshape(*image_mask.shape, -1).float()
    m = image_mask.to(x.device, x.dtype)[..., None]
    n = m.sum(1)  # [B, 1]
    sig = (x * m).sum(1) / n.clamp(min=1)  # [B, H]
    if same_center:
        d = sig - centers[0]
        cos = (d @ keys.t()) / (d.norm(dim=-1, keepdim=True) * keys.norm(dim=-1)[None]).clamp(min=1e-8)
    else:  # |sig - c|^2 = |sig|^2 - 2 sig.c + |c|^2
        num = sig @ keys.t() - (centers * keys).sum(-1)[None]
        d2 = (sig.pow(2).sum(-1, keepdim=True) - 2 * sig @ centers.t() + centers.pow(2).sum(-1)[None]).clamp(min=0)
        cos = num / (d2.sqrt() * keys.norm(dim=-1)[None]).clamp(min=1e-8)
    return ((cos - lo) / (hi - lo)).clamp(0, 1) * (n > 0)


def _strongest_only(a: torch.Tensor, edit: torch.Tensor, floor: torch.Tensor | None) -> torch.Tensor:
    """Competing edits: ``a`` [T, n] the (gated) activations of one row's open neurons, ``edit`` [n]
    their edits (packed order: older first). At each position only the neurons of the edit whose
    strongest neuron fires most there are kept (ties: the latest edit), and none where that is not
    above ``floor`` [T] (a contender's strength: it is later than every edit of the bank)."""
    uniq, local = torch.unique(edit, return_inverse=True)  # ascending: older first
    T, E = a.shape[0], len(uniq)
    s = a.new_zeros(T, E).scatter_reduce(1, local.expand(T, -1), a, "amax", include_self=True)
    win = E - 1 - s.flip(1).argmax(1)  # [T]: the strongest, the latest among equals
    keep = local[None, :] == win[:, None]
    if floor is not None:
        best = s.gather(1, win[:, None])[:, 0]
        keep = keep & (best > floor.to(best.dtype))[:, None]
    return a * keep


def _merge_duplicates(key_t: torch.Tensor, bias: torch.Tensor, value: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One edit's neurons (keys [n, H], biases [n], values [n, H]) with every group of neurons that
    share key and bias merged into one whose value is the group's sum: they fire alike, so
    sum_j Act(q k + b) v_j = Act(q k + b) sum_j v_j. UniKE's closed-form (whitened) keys give each of
    an edit's n neurons the key of one of its P target positions (P is usually 1-3), so its n
    neurons pack as P; trained keys (T-Patcher, the paper's UniKE) are all distinct and stay."""
    rows = torch.cat([key_t, bias[:, None]], 1)
    uniq, inverse = torch.unique(rows, dim=0, return_inverse=True)
    if len(uniq) == len(rows):
        return key_t, bias, value
    merged = torch.zeros(len(uniq), value.shape[1], dtype=value.dtype, device=value.device)
    return uniq[:, :-1].contiguous(), uniq[:, -1].contiguous(), merged.index_add_(0, inverse, value)


def key_layer_of(patch: FFNPatch, layer: int) -> int:
    """The layer whose FFN input ``patch`` (installed at ``layer``) reads."""
    k = getattr(patch, "key_layer", None)
    return layer if k is None else int(k)


def bank_key(layer: int, key_layer: int | None = None) -> int | tuple[int, int]:
    """A bank's key in the adapter's registry: the layer, or (layer, key layer) for banks whose
    keys read another layer's FFN input."""
    return layer if key_layer is None or key_layer == layer else (layer, key_layer)


def neuron_bank(adapter: ModelAdapter, layer: int, key_layer: int | None = None) -> NeuronBank:
    """The bank of installed neurons of ``layer`` whose keys read ``key_layer``'s FFN input (default:
    its own), made on first use and registered on the adapter."""
    banks = adapter.__dict__.setdefault("_neuron_banks", {})
    k = bank_key(layer, key_layer)
    if k not in banks:
        banks[k] = NeuronBank(adapter, layer, key_layer)
    return banks[k]


def contend(adapter: ModelAdapter, patches: dict[int, FFNPatch]) -> Callable[[], None]:
    """Make each competing patch of ``patches`` (training beside the banks) the contender of its
    layer's bank, and no other patch any bank's; returns the function that clears them."""
    banks = getattr(adapter, "_neuron_banks", {})
    for b in banks.values():
        b.contender = None
    for layer, p in patches.items():
        b = banks.get(bank_key(layer, key_layer_of(p, layer)))
        if b is not None and p.compete:
            b.contender = p
    return lambda: contend(adapter, {})


class BankedPatches:
    """An edit's frozen patches moved into the layers' banks; ``remove()`` takes them out."""

    def __init__(self, adapter: ModelAdapter, patches: dict[int, FFNPatch], owner: Hashable | None = None) -> None:
        self.owner = owner if owner is not None else object()
        self.patches = patches
        self.banks = {l: neuron_bank(adapter, l, key_layer_of(p, l)) for l, p in patches.items()}
        self.slices = {l: self.banks[l].add(self.owner, p) for l, p in patches.items()}

    def remove(self) -> None:
        for b in self.banks.values():
            b.remove(self.owner)
        self.banks = {}


def ffn_input_dim(adapter: ModelAdapter, layer: int) -> int:
    key = adapter.site(f"lm.ffn_key.{layer}")
    return int(key.in_features)
