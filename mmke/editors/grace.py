"""GRACE: a discrete key-value codebook at one LM layer (Hartvigsen et al., "Aging with GRACE:
Lifelong Model Editing with Discrete Key-Value Adaptors", NeurIPS 2023).

What the paper prescribes (§3) and what mmke does:

- **adaptor** (§3.1): a codebook C = {(k_i, v_i, eps_i, y_i)} wraps one layer l. For an input
  whose query h^{l-1} is within the deferral radius of its nearest key,
  ``d(h, k_i*) <= eps_i*`` with i* = argmin_i d(h, k_i), the layer's output is *replaced* by the
  value v_i*; every other input passes through the layer unchanged (GRACE's locality). d is the
  Euclidean distance (EasyEdit ``dist_fn: euc``).
- **where** (EasyEdit's reference config for LLMs, the paper being about T5/BERT/GPT2): the FFN
  value projection (``down_proj``/``fc2``) of a late layer, ``model.layers[27].mlp.down_proj`` of
  Llama-2-7B's 32 layers; mmke's default is the layer at the same depth, 27/32, (layer 25 of
  SmolLM2's 30, ``layer`` to change). The query is the input of that projection (the FFN's
  intermediate activation) at the last prompt token, the position predicting the first target
  token (EasyEdit's ``key_id`` = number of prompt tokens - 1), found from the batch's labels.
- **replacement**: EasyEdit's default ``replace_last`` replaces only the query's position, which
  edits only the first target token. mmke replaces the output at *every target-predicting
  position* of a matching input (the last prompt token and the target tokens but the last), with
  the one value vector, so that the value is trained to produce the whole target.
- **codebook maintenance** (§3.2, Algorithm 1; EasyEdit ``eps_expand: coverage``): a new query
  farther than ``eps_init + eps_nearest`` from every key adds a key with radius ``eps_init``;
  within that distance, the *same label* expands the nearest radius to cover the query (the
  nearest value is re-trained), a *different label* adds a key and splits the two radii to
  half the distance (EasyEdit ``split_epsilons_in_half``: nearest ``d/2 - 1e-5``, new ``d/2``).
- **value** (§3.2): a new value starts cold (EasyEdit ``val_init: cold``, uniform [0, 1)) or warm
  (the layer's output at the query position); trained by Adam, lr 1.0, at most 100 steps
  (EasyEdit ``edit_lr``, ``n_iter``) on the target's NLL, stopping once every target token is
  the top-1 prediction (EasyEdit ``reg: early_stop``). Only the layers from l on run per step
  (:mod:`mmke.editors.tail`).
- **deferral radius** ``eps_init``: EasyEdit's 1.0 is for Llama-2's 11008-wide activations;
  mmke's default (10.0) was chosen on held-out train cases for SmolLM2 (see RESULTS).

All edits of one editor share one codebook per layer: N edits are one [N, I] key tensor and one
nearest-neighbour search per forward pass, on one hook. Removal is exact in any order: every
edit keeps its own record (query, label, trained value), and the codebook is the deterministic
replay of Algorithm 1 over the surviving records in their original order (an edit's expansion or
split of another's radius disappears with it); removing the latest edit undoes its one step
instead (the same state, without the replay: a stream unwinds in linear time). With no record
left, the hook is removed and the model is bit for bit the unedited one (no parameter is ever
changed).

``grace-mm`` (:class:`GraceMMEditor`, mmke's variant) gates each entry made on an image on that
image (:class:`ImageGate`): GRACE's key, the last prompt token's activation, is dominated by the
question, so the edit's question about any other picture falls inside the radius.

Rows whose labels cannot be known (a forward not prepared through ``adapter.prepare``) pass
through unchanged: the codebook hook reads the target positions of the batch last prepared.
"""

from __future__ import annotations

import logging
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Literal

import torch

from mmke.editors.base import EditHandle, Editor, EditorConfig, EditRequest, read_saved_edit
from mmke.editors.tail import TailRunner
from mmke.models.base import ModelAdapter, target_nll, target_positions
from mmke.models.placement import module_device

log = logging.getLogger(__name__)


# ---- the labels of the batch being run ---------------------------------------------------
class LabelTap:
    """Remembers the labels of the batch an adapter last prepared, so that a hook inside the LM
    knows which positions predict target tokens. Installed (as an instance attribute shadowing
    ``adapter.prepare``) while at least one user holds it; removed with the last."""

    def __init__(self, adapter: ModelAdapter) -> None:
        self.adapter = adapter
        self.users = 0
        self.labels: torch.Tensor | None = None
        self._forced: list[torch.Tensor] = []
        self._warned = False

    def acquire(self) -> None:
        if self.users == 0:
            self.adapter.prepare = self._prepare  # type: ignore[method-assign]
        self.users += 1

    def release(self) -> None:
        self.users -= 1
        if self.users == 0:
            self.adapter.__dict__.pop("prepare", None)
            self.labels = None

    def _prepare(self, examples):
        batch = type(self.adapter).prepare(self.adapter, examples)
        self.labels = batch.labels
        return batch

    @contextmanager
    def forced(self, labels: torch.Tensor) -> Iterator[None]:
        """Use ``labels`` for the forwards inside (a cached tail run prepares nothing)."""
        self._forced.append(labels)
        try:
            yield
        finally:
            self._forced.pop()

    def current(self, n_tokens: int, shape: tuple[int, ...]) -> torch.Tensor | None:
        """Labels [B, T] of the batch now running (``n_tokens`` = B*T), or None if unknown."""
        lab = self._forced[-1] if self._forced else self.labels
        if lab is None or lab.numel() != n_tokens:
            if not self._warned:
                log.warning("%s: a forward of %s without known labels; lifelong editors pass it through",
                            self.adapter.name, tuple(shape))
                self._warned = True
            return None
        return lab


_TAPS: "weakref.WeakKeyDictionary[ModelAdapter, LabelTap]" = weakref.WeakKeyDictionary()


def label_tap(adapter: ModelAdapter) -> LabelTap:
    if adapter not in _TAPS:
        _TAPS[adapter] = LabelTap(adapter)
    return _TAPS[adapter]


def resolve_layer(adapter: ModelAdapter, layer: int | None, method: str) -> int:
    """The LM layer index (default: depth 27/32, EasyEdit's layer 27 of 32), checked."""
    n = adapter.num_lm_layers
    if layer is None:
        return min(n - 1, (27 * n) // 32)
    if not -n <= layer < n:
        raise ValueError(f"{method}: layer {layer} does not exist; the LM of {adapter.name} has {n} layers "
                         f"(0..{n - 1}, or -{n}..-1 from the end)")
    return layer % n


def as_rows(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, T, D] view of a projection's input/output (OPT flattens tokens to [B*T, D])."""
    return x.reshape(*labels.shape, x.shape[-1])


# ---- the codebook -------------------------------------------------------------------------
class TappedHook:
    """A forward hook on ``self.site`` (``self._forward``) that needs the batch's labels: installing
    it holds the adapter's label tap, removing it lets go."""

    adapter: ModelAdapter
    site: torch.nn.Module
    _hook: Any = None

    def _install(self) -> None:
        if self._hook is None:
            label_tap(self.adapter).acquire()
            self._hook = self.site.register_forward_hook(self._forward)

    def _uninstall(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
            label_tap(self.adapter).release()


class GraceRecord:
    """One edit as the codebook sees it (``sig``: its image signature, grace-mm; None: ungated)."""

    def __init__(self, rid: int, key: torch.Tensor, value: torch.Tensor, label: str,
                 sig: torch.Tensor | None = None) -> None:
        self.rid, self.key, self.value, self.label, self.sig = rid, key, value, label, sig


class ImageGate:
    """grace-mm's gate: an entry made on an image answers only inputs whose image resembles it.

    An input's image signature is the mean of the wrapped projection's input over its image-token
    positions, centred on ``center`` (the mean signature of train-split inputs) and scaled to unit
    length; an entry is open for an input when the cosine of their signatures is at least
    ``threshold``. Inputs without an image open no image-made entry; entries made without an image
    stay open for every input (GRACE's own behaviour)."""

    def __init__(self, center: torch.Tensor, threshold: float) -> None:
        self.center, self.threshold = center.float().cpu(), float(threshold)

    def signatures(self, a3: torch.Tensor, image_mask: torch.Tensor | None) -> torch.Tensor | None:
        """[B, I] unit signatures of rows ``a3`` [B, T, I] (zero rows: no image); None: no image at all."""
        if image_mask is None or image_mask.shape != a3.shape[:2] or not bool(image_mask.any()):
            return None
        m = image_mask.to(a3.device, torch.float32)[..., None]
        n = m.sum(1)
        sig = (a3.float() * m).sum(1) / n.clamp(min=1) - self.center.to(a3.device)
        return torch.nn.functional.normalize(sig, dim=-1) * (n > 0)


class Codebook(TappedHook):
    """Keys, values, radii and labels at one layer, rebuilt from the surviving records."""

    def __init__(self, adapter: ModelAdapter, layer: int, eps_init: float, gate: ImageGate | None = None) -> None:
        self.adapter, self.layer, self.eps_init, self.gate = adapter, layer, eps_init, gate
        self.site = adapter.site(f"lm.ffn_value.{layer}")
        self.records: list[GraceRecord] = []
        self._next = 0
        self._clear()
        self._hook = None
        self.training: tuple[torch.Tensor, torch.Tensor] | None = None  # (value, labels) while training
        self.probe: dict[str, torch.Tensor] | None = None

    def _clear(self) -> None:
        self.keys = torch.zeros(0, 0)
        self.values = torch.zeros(0, 0)
        self.eps = torch.zeros(0)
        self.labels: list[str] = []
        self.sigs = torch.zeros(0, 0)  # [N, I] entries' unit image signatures (grace-mm; 0: ungated)
        self.gated = torch.zeros(0, dtype=torch.bool)  # [N] entries made on an image (grace-mm)
        # per applied record: (entries before it, the entry it changed, that entry's eps and value
        # before): undoing the latest record restores exactly the state before it
        self._undo: list[tuple[int, int, float | None, torch.Tensor | None]] = []

    def open_for(self, sigs: torch.Tensor | None, rows: int) -> torch.Tensor:
        """[rows, N] which entries may answer inputs with image signatures ``sigs`` [rows, I]
        (zero rows or None: no image); every entry where there is no gate."""
        n = len(self.labels)
        if self.gate is None or not bool(self.gated.any()):
            return torch.ones(rows, n, dtype=torch.bool)
        if sigs is None:
            return ~self.gated[None].expand(rows, -1)
        cos = sigs.float().cpu() @ self.sigs.t()
        return ~self.gated[None] | (cos >= self.gate.threshold)

    # Algorithm 1, one query at a time
    def plan(self, key: torch.Tensor, label: str, sig: torch.Tensor | None = None) -> tuple[str, int, float]:
        """What adding ``key`` with ``label`` (made on an image of signature ``sig``) does:
        ("new", -1, d), ("expand", j, d), ("split", j, d). Entries the gate keeps closed for
        ``sig`` are not candidates (grace-mm)."""
        if len(self.labels) == 0:
            return "new", -1, float("inf")
        d = torch.linalg.vector_norm(self.keys - key[None], dim=-1)
        d = d.masked_fill(~self.open_for(None if sig is None else sig[None], 1)[0], float("inf"))
        j = int(d.argmin())
        dj = float(d[j])
        if dj > self.eps_init + float(self.eps[j]):
            return "new", -1, dj
        if self.labels[j] != label:
            return "split", j, dj
        return "expand", j, dj

    def _apply(self, r: GraceRecord) -> None:
        op, j, d = self.plan(r.key, r.label, r.sig)
        self._undo.append((len(self.labels), j, float(self.eps[j]) if j >= 0 else None,
                           self.values[j].clone() if op == "expand" else None))
        if op == "expand":
            if d > float(self.eps[j]):
                self.eps[j] = d
            self.values[j] = r.value
            return
        eps = self.eps_init if op == "new" else d / 2
        if op == "split":
            self.eps[j] = d / 2 - 1e-5
        sig = r.sig if r.sig is not None else torch.zeros_like(r.key)
        if len(self.labels) == 0:
            self.keys, self.values = r.key[None].clone(), r.value[None].clone()
            self.eps = torch.tensor([eps])
            self.sigs = sig[None].clone()
        else:
            self.keys = torch.cat([self.keys, r.key[None]])
            self.values = torch.cat([self.values, r.value[None]])
            self.eps = torch.cat([self.eps, torch.tensor([eps])])
            self.sigs = torch.cat([self.sigs, sig[None]])
        self.gated = torch.cat([self.gated, torch.tensor([r.sig is not None])])
        self.labels.append(r.label)

    def add(self, key: torch.Tensor, value: torch.Tensor, label: str, sig: torch.Tensor | None = None) -> int:
        r = GraceRecord(self._next, key.detach().float().cpu(), value.detach().float().cpu(), label,
                        None if sig is None else sig.detach().float().cpu())
        self._next += 1
        self.records.append(r)
        self._apply(r)
        self._install()
        return r.rid

    def remove(self, rid: int) -> None:
        if self.records and self.records[-1].rid == rid:  # the latest (a stream undone from its end)
            self.records.pop()
            self._unapply()
        else:  # Algorithm 1 replayed over the surviving records
            self.records = [r for r in self.records if r.rid != rid]
            self._clear()
            for r in self.records:
                self._apply(r)
        if not self.records:
            self._clear()
            self._uninstall()

    def _unapply(self) -> None:
        """Undo the latest :meth:`_apply`: drop the entry it appended, give back the radius (and
        the value) of the entry it expanded or split."""
        n, j, eps, value = self._undo.pop()
        self.keys, self.values, self.eps, self.sigs = self.keys[:n], self.values[:n], self.eps[:n], self.sigs[:n]
        self.gated, self.labels = self.gated[:n], self.labels[:n]
        if j >= 0:
            self.eps[j] = eps
            if value is not None:
                self.values[j] = value


    def ensure_hook(self) -> None:
        """Install the hook even with an empty codebook (while an edit is being trained)."""
        self._install()

    def release_if_empty(self) -> None:
        if not self.records:
            self._uninstall()

    def _forward(self, _mod, args, out):
        a = args[0]
        tap = label_tap(self.adapter)
        if self.training is not None:
            value, labels = self.training
        else:
            labels = tap.current(a.shape[:-1].numel(), tuple(a.shape))
            value = None
        if labels is None:
            return None
        labels = labels.to(a.device)
        a3, o3 = as_rows(a, labels), as_rows(out, labels)
        pos, _ids, mask = target_positions(labels)
        if self.probe is not None:
            self.probe["q"] = a3[0, pos[0, 0]].detach().float()
            self.probe["out"] = o3[0, pos[0, 0]].detach().float()
            if self.gate is not None:
                sigs = self.gate.signatures(a3[:1].detach(), self.adapter.current_image_mask)
                self.probe["sig"] = None if sigs is None or not bool(sigs[0].any()) else sigs[0]
        if value is not None:  # training: the edit's own row takes the trained value
            new = o3.clone()
            p = pos[0][mask[0]]
            new[0, p] = value.to(new.dtype).expand(len(p), -1)
            return new.reshape(out.shape)
        if len(self.labels) == 0:
            return None
        rows = torch.arange(a3.shape[0], device=a.device)
        q = a3[rows, pos[:, 0]].float()  # [B, I] queries at the last prompt token
        keys = self.keys.to(q.device)
        d = torch.cdist(q, keys, compute_mode="donot_use_mm_for_euclid_dist")  # [B, N]
        if self.gate is not None and bool(self.gated.any()):
            sigs = self.gate.signatures(a3, self.adapter.current_image_mask)
            d = d.masked_fill(~self.open_for(sigs, len(q)).to(d.device), float("inf"))
        dmin, idx = d.min(1)
        hit = (dmin <= self.eps.to(q.device)[idx]) & mask[:, 0]
        if not bool(hit.any()):
            return None
        new = o3.clone()
        values = self.values.to(device=new.device, dtype=new.dtype)
        for b in hit.nonzero(as_tuple=True)[0].tolist():
            p = pos[b][mask[b]]
            new[b, p] = values[idx[b]].expand(len(p), -1)
        return new.reshape(out.shape)


# ---- the editor ---------------------------------------------------------------------------
class GraceConfig(EditorConfig):
    layer: int | None = None  # LM layer whose FFN value projection is wrapped; default: depth 27/32 (EasyEdit)
    eps_init: float = 10.0  # initial deferral radius (Euclidean, on the projection's input); EasyEdit 1.0
    n_iter: int = 100  # at most this many value-training steps (EasyEdit n_iter)
    lr: float = 1.0  # Adam learning rate of the value (EasyEdit edit_lr)
    val_init: Literal["cold", "warm"] = "cold"  # new values: uniform [0, 1) (cold) or the layer's output (warm)
    seed: int = 0  # cold values' random start
    image_gate: float | None = None  # grace-mm: an entry made on an image answers only inputs whose
    # image signature has at least this cosine with its own (None: GRACE as published)
    center_cases: int = 64  # grace-mm: train-split inputs whose mean image signature centres the gate


class GraceEditor(Editor):
    name = "grace"
    Config = GraceConfig

    def __init__(self, adapter, config=None, *, train_records=None, task=None, **context: Any) -> None:
        super().__init__(adapter, config, **context)
        self.layer = resolve_layer(adapter, self.config.layer, self.name)
        self.books: dict[int, Codebook] = {}
        self.gate: ImageGate | None = None
        if self.config.image_gate is not None:
            if not train_records:
                raise ValueError(f"{self.name}: the image gate is centred on train-split inputs: give the "
                                 "train records (--train-data), or --set image_gate=null for plain GRACE")
            self.gate = ImageGate(self._image_center(train_records[: self.config.center_cases], task),
                                  self.config.image_gate)

    @classmethod
    def uses_train_records(cls, config) -> bool:
        return config.image_gate is not None

    @torch.no_grad()
    def _image_center(self, records, task) -> torch.Tensor:
        """Mean image signature (the wrapped projection's input averaged over image-token
        positions) of the edit inputs of ``records``, on the unedited model; images decoded one
        record at a time."""
        from mmke.scoring import case_inputs
        from mmke.tasks import TASKS

        site = self.adapter.site(f"lm.ffn_value.{self.layer}")
        box: dict[str, torch.Tensor] = {}
        h = site.register_forward_pre_hook(lambda _m, args: box.__setitem__("a", args[0].detach()))
        total, n = None, 0
        try:
            for r in records:
                ex = case_inputs(r, task or TASKS["vqa"], self.adapter.load_image, kinds=("reliability",))["reliability"]
                batch = self.adapter.prepare([ex])
                im = self.adapter.image_mask(batch)
                if not bool(im.any()):
                    continue
                self.adapter.forward(batch)
                a = box["a"].reshape(*im.shape, -1)[0].float()
                sig = a[im[0].to(a.device)].mean(0).cpu()
                total, n = (sig if total is None else total + sig), n + 1
        finally:
            h.remove()
        if n == 0:
            raise ValueError(f"{self.name}: none of the {len(records)} train records has an image to centre the gate on")
        return total / n

    def book(self, layer: int) -> Codebook:
        if layer not in self.books:
            self.books[layer] = Codebook(self.adapter, layer, self.config.eps_init, self.gate)
        return self.books[layer]

    def edit(self, request: EditRequest) -> EditHandle:
        cfg = self.config
        book = self.book(self.layer)
        label = request.example.target
        runner = TailRunner(self.adapter, self.layer)
        book.ensure_hook()
        try:
            book.probe = {}
            try:
                cache, _view = runner.capture([request.example])
            finally:
                probe, book.probe = book.probe, None
            if "q" not in probe:
                raise ValueError(f"{self.name}: the edit example has no target token")
            key = probe["q"].cpu()
            sig = probe.get("sig")
            sig = None if sig is None else sig.cpu()
            op, j, dist = book.plan(key, label, sig)
            if op == "expand":
                init = book.values[j].clone()
            elif cfg.val_init == "warm":
                init = probe["out"].cpu()
            else:
                init = torch.rand(probe["out"].shape[-1], generator=torch.Generator().manual_seed(cfg.seed))
            # trained in fp32 on the wrapped layer's device
            value = torch.nn.Parameter(init.float().to(module_device(self.adapter.site(f"lm.ffn_value.{self.layer}"))))
            opt = torch.optim.Adam([value], lr=cfg.lr)
            steps, fixed = 0, False
            book.training = (value, cache.labels)
            try:
                with torch.enable_grad():
                    for steps in range(1, cfg.n_iter + 1):
                        view = runner.run(cache)
                        fixed = bool((view.logits.argmax(-1) == view.target_ids)[view.mask].all())
                        if fixed:
                            break
                        loss = target_nll(view)
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
            finally:
                book.training = None
        finally:
            book.release_if_empty()
        rid = book.add(key, value.detach(), label, sig)
        meta = {"layer": self.layer, "label": label, "op": op, "dist": None if op == "new" else dist, "eps_init": cfg.eps_init,
                "steps": steps, "fixed": fixed, "codebook_size": len(book.labels), "image_gated": sig is not None}
        tensors = {"key": key, "value": value.detach().float().cpu()}
        if sig is not None:
            tensors["sig"] = sig
        return EditHandle(self.adapter, self.name, undo=lambda: book.remove(rid), tensors=tensors, meta=meta)

    def load(self, path: str | Path) -> EditHandle:
        method, meta, t = read_saved_edit(path)
        if method != self.name:
            raise ValueError(f"{path}: saved by editor {method!r}, not {self.name!r}")
        layer = resolve_layer(self.adapter, int(meta["layer"]), self.name)
        site = self.adapter.site(f"lm.ffn_value.{layer}")
        if t["key"].shape[-1] != site.in_features or t["value"].shape[-1] != site.out_features:
            raise ValueError(f"{path}: key/value sizes {tuple(t['key'].shape)}/{tuple(t['value'].shape)} do not "
                             f"fit layer {layer} of {self.adapter.name}")
        book = self.book(layer)
        rid = book.add(t["key"], t["value"], meta["label"], t.get("sig") if self.gate is not None else None)
        return EditHandle(self.adapter, self.name, undo=lambda: book.remove(rid), tensors=t, meta=meta)


class GraceMMConfig(GraceConfig):
    image_gate: float | None = 0.5


class GraceMMEditor(GraceEditor):
    """mmke's GRACE for images: each codebook entry made on an image answers only inputs whose
    image resembles the edit's (:class:`ImageGate`); Algorithm 1 compares a new edit only with the
    entries open for its image. The edit's question about an unrelated image then falls through
    to the unedited layer, where GRACE's question-dominated key would take the entry's value."""

    name = "grace-mm"
    Config = GraceMMConfig
