"""WISE: a side memory of one FFN value matrix with routing, sharding and merging (Wang et al.,
"WISE: Rethinking the Knowledge Memory for Lifelong Model Editing of Large Language Models",
NeurIPS 2024; reference: EasyEdit ``WISE.py`` and ``hparams/WISE/llama-7b.yaml``).

- **side memory** (§2.2): a copy W_v' of the value matrix W_v (``down_proj``/``fc2``) of one late
  LM layer (EasyEdit: layer 27 of Llama-2-7B's 32; mmke: the layer at depth 27/32, ``layer``).
  Edits change only W_v'; the main memory W_v is never touched.
- **routing** (§2.3, Eq. 3-4): the activation score of an input is
  Delta(x) = || a(x) (W_v' - W_v)^T ||_2, a(x) the value matrix's input, averaged over positions;
  an input whose score reaches eps runs the layer with the side memory, every other input with the
  main memory. eps = ``act_ratio`` (0.88) x the smallest score of an edit input at the end of its
  training (EasyEdit ``editing_mean_act.min_act() * act_ratio``). With several memories (a merged
  one and the shard being filled) the one with the larger score answers (EasyEdit inference).
  mmke averages over the *target-predicting* positions (EasyEdit: every token, or the largest
  when there are more than 100): image tokens and padding are left out, which the labels give.
- **routing loss** (§2.3, Eq. 5; EasyEdit ``__cal_activation_loss``, ``act_margin`` [5, 20, 10]):
  L_a = [Delta(x_i) - alpha]_+ + [beta - Delta(x_e)]_+ + [gamma - (Delta(x_e) - Delta(x_i))]_+, each
  term averaged over its positive entries, x_e the edit input, x_i ``n_irrelevant`` irrelevant
  inputs drawn from the task's train split (EasyEdit draws them from the data's locality
  prompts); L = NLL(target) + L_a (``objective_optimization: only_label``). The irrelevant inputs
  of an edit are a sample (seeded by the edit) of a pool of ``n_pool`` train inputs (seeded by
  ``seed``) whose value inputs are computed once per editor, on the model without this editor's
  side memories (a side memory does not change its own layer's value input), not per edit.
- **knowledge sharding** (§2.3): each shard of ``save_freq`` edits trains only a random
  subspace of W_v', a fixed random gradient mask with ratio rho (``mask_ratio`` 0.2), seeded per
  shard; SGD with lr 1.0 at most ``n_iter`` (70) steps, each entry kept within
  ``norm_constraint`` (1.0) of W_v (EasyEdit ``edit_lr``, ``n_iter``, ``norm_constraint``). The
  reference's SGD weight decay (1e-5) is left out: it would move entries outside the mask.
  Training stops once every target token is top-1 and the routing loss is 0 (``steps`` in an
  edit's meta: the updates made). One forward captures the edit's value input and the inputs of
  the edited layer; each step runs only the layers from it on (:mod:`mmke.editors.tail`).
- **knowledge merging** (§2.3, Eq. 6): full shards are merged into one side memory by
  TIES-merging (Yadav et al. 2023: trim each task vector W_k - W_v to its top ``density`` (0.53)
  magnitudes, elect signs by the summed vector, average the agreeing entries, scale by
  ``merge_weight`` 1.0; EasyEdit ``merge_alg: ties``, ``densities``, ``weights``). EasyEdit saves a
  shard every ``save_freq`` (500) edits and merges every ``merge_freq`` (1000); mmke merges every
  full shard at once (``save_freq`` is the one option), so that no edit is ever left unrouted.

**mmke variant** ``route_floor=q`` (off by default; report rows name it): the threshold is at
least the q-quantile of the routing scores of held-out locality inputs. eps = max(EasyEdit's eps,
quantile_q over C of max_m Delta_m(c)), C the T-Locality and M-Locality inputs of ``n_calib`` train
records that are not in the irrelevant-input pool (a seeded sample), scored on every memory at each
change. EasyEdit's rule follows the *smallest* edit score, so one weakly routed edit opens the side
memory to every input; the floor keeps about a share q of inputs like the locality probes out of it,
at the price of the edits whose score falls below it.

One side memory per (editor, layer), shared by all its edits, on one hook. Removal is exact in
any order: each edit keeps its own delta (the entries of its shard's mask it changed) and its
end-of-training score; the memories are rebuilt from the surviving edits' deltas in their
original order (shard = W_v + sum of its deltas; merged = TIES of the full shards), the threshold
from their scores. With no edit left the hook is removed: the model is bit for bit the unedited
one. An edit removed from a full shard leaves that shard's other edits in the merged memory.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mmke.editors.base import EditHandle, Editor, EditorConfig, EditRequest, read_saved_edit
from mmke.editors.grace import TappedHook, as_rows, label_tap, resolve_layer
from mmke.editors.tail import TailRunner
from mmke.models.base import Example, ModelAdapter, target_nll, target_positions
from mmke.models.placement import module_device

log = logging.getLogger(__name__)


def ties_merge(base: torch.Tensor, weights: list[torch.Tensor], density: float, scale: float) -> torch.Tensor:
    """TIES-merging of ``weights`` around ``base`` (trim, elect sign, disjoint mean)."""
    taus = []
    for w in weights:
        t = (w - base).flatten()
        k = max(1, int(density * t.numel()))
        thr = t.abs().kthvalue(t.numel() - k + 1).values
        taus.append(torch.where(t.abs() >= thr, t, torch.zeros_like(t)))
    tau = torch.stack(taus)  # [K, P]
    sign = torch.sign(tau.sum(0))
    agree = (torch.sign(tau) == sign[None]) & (tau != 0)
    merged = (tau * agree).sum(0) / agree.sum(0).clamp(min=1)
    return base + scale * merged.view_as(base)


class WiseRecord:
    def __init__(self, rid: int, shard: int, delta: torch.Tensor, act: float) -> None:
        self.rid, self.shard, self.delta, self.act = rid, shard, delta, act


class SideMemory(TappedHook):
    """W_v' at one layer: shards rebuilt from their edits' deltas, the merged memory, the hook."""

    def __init__(self, adapter: ModelAdapter, layer: int, cfg: "WiseConfig") -> None:
        self.adapter, self.layer, self.cfg = adapter, layer, cfg
        self.site = adapter.site(f"lm.ffn_value.{layer}")
        self.main = self.site.weight.detach().float().cpu().clone()  # [H, I]
        self.records: list[WiseRecord] = []
        self.shard, self._next = 0, 0
        self._masks: dict[int, torch.Tensor] = {}
        self._index: dict[int, torch.Tensor] = {}  # flat positions of each shard mask's entries
        self._sums: dict[int, torch.Tensor] = {}  # shard weights, kept up to date as edits are added
        self._merged: tuple[tuple[int, ...], torch.Tensor] | None = None  # (ids of the merged edits, memory)
        self.memories: list[torch.Tensor] = []  # weights routed to (merged, current shard)
        self.threshold = float("inf")
        self.calib: tuple[torch.Tensor, torch.Tensor] | None = None  # value inputs of the route_floor inputs
        self.floor = 0.0  # the route_floor part of the threshold (0 without one)
        self._hook = None
        self.training: tuple[torch.Tensor, torch.Tensor] | None = None  # (weight, labels) while training
        self.suspended = False  # pass every input through (value inputs of the unedited model)

    def mask(self, shard: int) -> torch.Tensor:
        if shard not in self._masks:
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + shard)
            self._masks[shard] = torch.rand(self.main.shape, generator=g) < self.cfg.mask_ratio
        return self._masks[shard]

    def index(self, shard: int) -> torch.Tensor:
        """The flat positions of ``mask(shard)``'s entries, in the order a delta lists them."""
        if shard not in self._index:
            self._index[shard] = self.mask(shard).flatten().nonzero().squeeze(1)
        return self._index[shard]

    def shard_weight(self, shard: int) -> torch.Tensor:
        """W_v plus the deltas of the shard's edits, added in edit order (read-only: cached).

        Adding an edit adds its delta to the cached sum, so an edit costs the same at edit 1,000
        as at edit 1; removing one re-adds the shard's other deltas. ``index_add_`` at the mask's
        positions gives bit for bit what ``w[mask] += delta`` gives, about 30x faster."""
        if shard not in self._sums:
            w = self.main.clone()
            for r in self.records:
                if r.shard == shard:
                    w.view(-1).index_add_(0, self.index(shard), r.delta)
            self._sums[shard] = w
        return self._sums[shard]

    def merged(self) -> torch.Tensor | None:
        """The TIES merge of the full shards (recomputed only when their edits change)."""
        ids = tuple(r.rid for r in self.records if r.shard < self.shard)
        if not ids:
            return None
        if self._merged is None or self._merged[0] != ids:
            shards = sorted({r.shard for r in self.records if r.shard < self.shard})
            full = [self.shard_weight(k) for k in shards]
            self._merged = (ids, ties_merge(self.main, full, self.cfg.density, self.cfg.merge_weight))
        return self._merged[1]

    def rebuild(self) -> None:
        shards = {r.shard for r in self.records}
        merged = self.merged()
        self.memories = []
        if merged is not None:
            self.memories.append(merged)
        if self.shard in shards:
            self.memories.append(self.shard_weight(self.shard))
        self.threshold = self.cfg.act_ratio * min((r.act for r in self.records), default=float("inf"))
        self.floor = 0.0
        if self.calib is not None and self.memories:
            best = torch.stack([self.score_rows(*self.calib, w) for w in self.memories]).max(0).values
            self.floor = float(torch.quantile(best.float().cpu(), self.cfg.route_floor))
            self.threshold = max(self.threshold, self.floor)
        if self.records:
            self._install()
        else:
            self._uninstall()

    def add(self, shard: int, delta: torch.Tensor, act: float) -> int:
        r = WiseRecord(self._next, shard, delta.detach().float().cpu(), float(act))
        self._next += 1
        if shard in self._sums:  # a new tensor: a memory routed to or a caller's ``before`` stays as it was
            w = self._sums[shard].clone()
            w.view(-1).index_add_(0, self.index(shard), r.delta)
            self._sums[shard] = w
        self.records.append(r)
        self.rebuild()
        return r.rid

    def remove(self, rid: int) -> None:
        gone = [r for r in self.records if r.rid == rid]
        self.records = [r for r in self.records if r.rid != rid]
        for r in gone:
            self._sums.pop(r.shard, None)
        self.rebuild()


    def score(self, a3: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Delta per row [B]: mean over target-predicting positions of ||a (W' - W)^T||."""
        at, mask = target_rows(a3, labels)
        return self.score_rows(at, mask, weight)

    def score_rows(self, at: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """:meth:`score` of value inputs already gathered at the target-predicting positions
        (``at`` [B, L, I], ``mask`` [B, L])."""
        diff = weight.to(at.device) - self.main.to(at.device)
        d = torch.linalg.vector_norm(at.float() @ diff.t(), dim=-1)  # [B, L]
        return (d * mask).sum(1) / mask.sum(1).clamp(min=1)

    def _forward(self, mod, args, out):
        a = args[0]
        if self.training is not None:
            weight, labels = self.training
            return F.linear(a, weight.to(a.dtype), None if mod.bias is None else mod.bias)
        if self.suspended or not self.memories:
            return None
        labels = label_tap(self.adapter).current(a.shape[:-1].numel(), tuple(a.shape))
        if labels is None:
            return None
        labels = labels.to(a.device)
        a3, o3 = as_rows(a, labels), as_rows(out, labels)
        with torch.no_grad():
            scores = torch.stack([self.score(a3, labels, w) for w in self.memories])  # [M, B]
        best, which = scores.max(0)
        has = (labels[:, 1:] != -100).any(1)
        route = (best >= self.threshold) & has
        if not bool(route.any()):
            return None
        new = o3.clone()
        for b in route.nonzero(as_tuple=True)[0].tolist():
            w = self.memories[int(which[b])].to(device=a.device, dtype=a.dtype)
            new[b] = F.linear(a3[b], w, mod.bias)
        return new.reshape(out.shape)


def target_rows(a3: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The value inputs [B, L, I] at the target-predicting positions of ``labels`` and their mask."""
    pos, _ids, mask = target_positions(labels.to(a3.device))
    rows = torch.arange(a3.shape[0], device=a3.device)[:, None]
    return a3[rows, pos].float(), mask


class WiseConfig(EditorConfig):
    layer: int | None = None  # LM layer whose FFN value matrix gets a side memory; default: depth 27/32 (EasyEdit)
    mask_ratio: float = 0.2  # rho: the fraction of the side memory each shard may change (EasyEdit mask_ratio)
    n_iter: int = 70  # at most this many SGD steps per edit (EasyEdit n_iter)
    lr: float = 1.0  # SGD learning rate (EasyEdit edit_lr)
    norm_constraint: float = 1.0  # each entry stays within this of the main memory's (EasyEdit)
    alpha: float = 5.0  # routing loss: irrelevant inputs' score below this (EasyEdit act_margin[0])
    beta: float = 20.0  # routing loss: the edit's score above this (act_margin[1])
    gamma: float = 10.0  # routing loss: the edit's score above irrelevant ones by this (act_margin[2])
    act_ratio: float = 0.88  # routing threshold = act_ratio x the smallest edit score (EasyEdit)
    n_irrelevant: int = 8  # irrelevant inputs per edit for the routing loss (drawn from the pool, seeded by the edit)
    n_pool: int = 64  # pool of irrelevant inputs: train-split questions (seeded sample), computed once per editor
    save_freq: int = 500  # edits per shard; a full shard is TIES-merged into the side memory (EasyEdit)
    density: float = 0.53  # TIES: fraction of each shard's task vector kept (EasyEdit densities)
    merge_weight: float = 1.0  # TIES: scale of the merged task vector (EasyEdit weights)
    seed: int = 0  # shard masks and the choice of irrelevant inputs
    route_floor: float | None = None  # mmke variant: threshold >= this quantile of held-out locality inputs' scores (None: EasyEdit's rule)
    n_calib: int = 64  # route_floor: train records (outside the irrelevant pool) whose T-/M-Locality inputs set the floor


class WiseEditor(Editor):
    name = "wise"
    Config = WiseConfig

    def __init__(self, adapter, config=None, *, train_records=None, task=None, **context: Any) -> None:
        super().__init__(adapter, config, **context)
        self.layer = resolve_layer(adapter, self.config.layer, self.name)
        self.memories: dict[int, SideMemory] = {}
        self._pool: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = {}
        tmpl = task.prompt if task is not None else (lambda s: s)
        self.task, self._train = task, list(train_records or [])
        self._irrelevant = [(tmpl(r.src), " " + r.alt.strip(), r.image_path) for r in self._train]
        if not self._irrelevant:
            log.warning("wise: no train records, so no irrelevant inputs for the routing loss")
        q = self.config.route_floor
        if q is not None:
            if not 0.0 < q <= 1.0:
                raise ValueError(f"wise: route_floor must be a quantile in (0, 1], got {q}")
            if task is None or len(self._train) <= self.config.n_pool or self.config.n_calib <= 0:
                raise ValueError("wise: route_floor needs the task and more train records than n_pool "
                                 f"({self.config.n_pool}) and n_calib > 0: its inputs are train records "
                                 "outside the irrelevant-input pool")

    @classmethod
    def uses_train_records(cls, config) -> bool:
        return config.n_irrelevant > 0 or config.route_floor is not None

    def memory(self, layer: int) -> SideMemory:
        if layer not in self.memories:
            mem = SideMemory(self.adapter, layer, self.config)
            if self.config.route_floor is not None:
                mem.calib = self._value_inputs(mem, self.calibration_inputs())
            self.memories[layer] = mem
        return self.memories[layer]

    def _pool_indices(self) -> list[int]:
        """Which train records the irrelevant-input pool draws (the sample :meth:`irrelevant_pool` takes)."""
        rng = random.Random(f"wise-pool:{self.config.seed}")
        return rng.sample(range(len(self._irrelevant)), min(self.config.n_pool, len(self._irrelevant)))

    def calibration_inputs(self) -> list[Example]:
        """``route_floor``'s inputs: the T-Locality and M-Locality inputs of ``n_calib`` train
        records outside the irrelevant-input pool (a sample seeded by ``seed``)."""
        from mmke.scoring import case_inputs

        pool = set(self._pool_indices())
        rest = [r for i, r in enumerate(self._train) if i not in pool]
        picks = random.Random(f"wise-calib:{self.config.seed}").sample(rest, min(self.config.n_calib, len(rest)))
        return [ex for r in picks for ex in case_inputs(r, self.task, self.adapter.load_image,
                                                        kinds=("t_locality", "m_locality")).values()]

    def _value_inputs(self, mem: SideMemory, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
        """Value-matrix inputs of ``examples`` at their target-predicting positions, on the model
        without this editor's side memories: ([N, L, I] padded, mask [N, L])."""
        got: list[tuple[torch.Tensor, torch.Tensor]] = []
        tap = label_tap(self.adapter)
        h = mem.site.register_forward_hook(
            lambda _m, args, _o: got.append(target_rows(as_rows(args[0].detach(), tap.labels), tap.labels)))
        tap.acquire()
        suspended = [(m, m.suspended) for m in self.memories.values()]
        for m, _ in suspended:
            m.suspended = True
        order: list[int] = []  # the example of each captured row: families may run image and text rows apart
        try:
            with torch.no_grad():
                for i in range(0, len(examples), 8):
                    chunk = examples[i:i + 8]
                    for idx in self.adapter.sub_batches(chunk):
                        self.adapter.run([chunk[j] for j in idx])
                        order += [i + j for j in idx]
        finally:
            for m, old in suspended:
                m.suspended = old
            h.remove()
            tap.release()
        rows = [(at[b], mk[b]) for at, mk in got for b in range(at.shape[0])]
        rows = [row for _i, row in sorted(zip(order, rows), key=lambda t: t[0])]
        L = max(int(mk.sum()) for _a, mk in rows)
        at = torch.zeros(len(rows), L, mem.main.shape[1])
        mask = torch.zeros(len(rows), L, dtype=torch.bool)
        for n, (a, mk) in enumerate(rows):
            k = int(mk.sum())
            at[n, :k], mask[n, :k] = a[:k][mk[:k]].cpu(), True
        return at, mask

    def irrelevant_pool(self, mem: SideMemory) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The value inputs of the irrelevant-input pool at ``mem``'s layer: ``n_pool`` train
        inputs (a sample seeded by ``seed``), computed once per editor on the unedited model."""
        if mem.layer not in self._pool:
            if not self._irrelevant or self.config.n_irrelevant <= 0:
                self._pool[mem.layer] = None
            else:
                picks = [self._irrelevant[i] for i in self._pool_indices()]
                exs = [Example(p, t, self.adapter.load_image(i) if i else None) for p, t, i in picks]
                at, mask = self._value_inputs(mem, exs)
                dev = module_device(mem.site)
                self._pool[mem.layer] = (at.to(dev), mask.to(dev))
        return self._pool[mem.layer]

    def edit(self, request: EditRequest) -> EditHandle:
        cfg = self.config
        mem = self.memory(self.layer)
        shard = mem.shard
        pool = self.irrelevant_pool(mem)
        irr = None
        if pool is not None:
            # the irrelevant inputs depend on the edit only, so an edit re-applied gives the same result
            rng = random.Random(f"{cfg.seed}:{request.example.prompt}:{request.example.target}")
            idx = torch.tensor(sorted(rng.sample(range(pool[0].shape[0]), min(cfg.n_irrelevant, pool[0].shape[0]))))
            irr = (pool[0][idx.to(pool[0].device)], pool[1][idx.to(pool[1].device)])
        # one forward: the cached inputs of the last layers and the edit's value input
        runner = TailRunner(self.adapter, self.layer)
        got: list[torch.Tensor] = []
        h = mem.site.register_forward_hook(lambda _m, args, _o: got.append(args[0].detach()))
        try:
            cache, _view = runner.capture([request.example])
        finally:
            h.remove()
        a_e, m_e = target_rows(as_rows(got[0], cache.labels), cache.labels)
        before = mem.shard_weight(shard)
        dev = module_device(mem.site)  # the side memory trains in fp32 on its layer's device
        mask = mem.mask(shard).to(dev)
        main = mem.main.to(dev)
        w = torch.nn.Parameter(before.clone().to(dev))
        steps, fixed, lact = 0, False, 0.0
        mem._install()
        mem.training = (w, cache.labels)
        try:
            with torch.enable_grad():
                while True:
                    view = runner.run(cache)
                    nll = target_nll(view)
                    s_e = mem.score_rows(a_e, m_e, w)  # [1]
                    loss_a = _hinge(cfg.beta - s_e)
                    if irr is not None:
                        s_i = mem.score_rows(irr[0], irr[1], w)  # [n]
                        loss_a = loss_a + _hinge(s_i - cfg.alpha) + _hinge(cfg.gamma - (s_e - s_i))
                    fixed = bool((view.logits.argmax(-1) == view.target_ids)[view.mask].all())
                    lact = float(loss_a.detach())
                    if log.isEnabledFor(logging.DEBUG):
                        log.debug("wise step %d: nll %.3f, edit score %.2f, irrelevant %s, routing loss %.2f",
                                  steps, float(nll), float(s_e), [round(float(x), 1) for x in s_i]
                                  if irr is not None else None, lact)
                    if (fixed and lact == 0.0) or steps >= cfg.n_iter:
                        break
                    loss = nll + loss_a
                    w.grad = None
                    loss.backward()
                    with torch.no_grad():
                        w -= cfg.lr * w.grad * mask
                        w.copy_(torch.maximum(torch.minimum(w, main + cfg.norm_constraint), main - cfg.norm_constraint))
                    steps += 1
        finally:
            mem.training = None
            mem.rebuild()
        delta = (w.detach().cpu() - before)[mem.mask(shard)]
        act = float(mem.score_rows(a_e, m_e, before.index_put((mem.mask(shard),), delta, accumulate=True))[0])
        rid = mem.add(shard, delta, act)
        # the shard is full (its edits, removed ones not counted): merge it, open the next
        if sum(r.shard == mem.shard for r in mem.records) >= cfg.save_freq:
            mem.shard += 1
            mem.rebuild()
        meta = {"layer": self.layer, "shard": shard, "act": act, "threshold": mem.threshold, "floor": mem.floor,
                "route_floor": cfg.route_floor, "steps": steps,
                "fixed": fixed, "routing_loss": lact, "mask_ratio": cfg.mask_ratio, "seed": cfg.seed,
                "n_irrelevant": 0 if irr is None else int(irr[0].shape[0])}
        return EditHandle(self.adapter, self.name, undo=lambda: mem.remove(rid),
                          tensors={"delta": delta}, meta=meta)

    def load(self, path: str | Path) -> EditHandle:
        method, meta, t = read_saved_edit(path)
        if method != self.name:
            raise ValueError(f"{path}: saved by editor {method!r}, not {self.name!r}")
        if (meta.get("mask_ratio"), meta.get("seed")) != (self.config.mask_ratio, self.config.seed):
            raise ValueError(f"{path}: saved with mask_ratio={meta.get('mask_ratio')}, seed={meta.get('seed')}; "
                             f"this editor has {self.config.mask_ratio}, {self.config.seed} (the shard masks differ)")
        layer = resolve_layer(self.adapter, int(meta["layer"]), self.name)
        mem = self.memory(layer)
        shard = int(meta["shard"])
        if t["delta"].numel() != int(mem.mask(shard).sum()):
            raise ValueError(f"{path}: the delta does not fit layer {layer} of {self.adapter.name}")
        rid = mem.add(shard, t["delta"], float(meta["act"]))
        return EditHandle(self.adapter, self.name, undo=lambda: mem.remove(rid), tensors=t, meta=meta)


def _hinge(x: torch.Tensor) -> torch.Tensor:
    """Mean of the positive entries (0 when none): EasyEdit's form of each routing-loss term."""
    pos = x[x > 0]
    return pos.mean() if pos.numel() else x.new_zeros(())
