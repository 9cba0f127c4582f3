"""UniKE's intrinsic editing: n_e new key-value neurons in the FFN of each of the last L layers.

    FFN_edit(q) = FFN(q) + Act(((q - mu) * gamma) K + b) (V + 1 zeta^T)
        q: [.., H] FFN input    K: [H, n]    b: [n]    V: [n, H]    zeta: [H] (truthfulness offset)

``mu`` (the mean FFN input over the locality memory) and ``gamma`` (1 / the edit's distance from
it) are fixed per edit: they put the keys on a scale where "the edit input activates a neuron to
about 1" and let one learning rate fit every layer. Keys start at the edit's own (centred) FFN
inputs at the positions that predict the target and biases between the edit and the memory, so
the neurons fire on the edit, not on the memory, from the first step; values start at 0, so a
fresh patch changes nothing until trained.

Training minimises the target NLL (through :class:`~mmke.editors.tail.TailRunner`, i.e. the
last L layers only) plus T-Patcher's optional activation loss (each neuron's peak pre-activation on
the edit's target positions reaches ``margin``) and memory loss (pre-activations on the locality
memory, FFN inputs of other train-split inputs, stay below ``-mem_margin``).

Whitened keys (``key_init="whitened"``) replace the key training by a closed form: the key is
W u / (u W u), u the edit's centred FFN input and W = (C + ridge I)^-1 the inverse scatter of the
locality memory (ROME's C^-1 k), so a neuron reads "how much of the edit's *unusual* direction an
input has" (1 at the edit). In the raw metric other questions of the same template as the edit sit
almost as close as its paraphrases; in the whitened one they separate (docs/RESULTS.md). The scatter
covers every token position of the memory inputs, not only the answer-predicting ones, so prompt
and answer tokens stay silent too. A ramp (off below ``lo``, full above ``hi``) turns the
similarity into the activation; only the values are trained.

The image gate (``unike-plus``): the new neurons of an edit made on an image fire only on inputs
whose image resembles the edit's. An input's image signature at a patched layer is the mean FFN
input over its image-token positions (``adapter.current_image_mask``; image tokens come before the
question, so the signature does not depend on it); the gate is a ramp of its cosine with the
edit's signature, both centred on the memory's mean signature, and 0 for inputs without an image.
Without it, the edit's own question about another image (benchmark v2's hard M-Locality input)
fires the neurons as strongly as the edit: late-layer states at the answer position carry the
question far more than the image.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from mmke.editors.patch import FFNPatch, key_layer_of
from mmke.editors.tail import TailCache, TailRunner
from mmke.models.base import Example, ModelAdapter, target_nll, target_positions

log = logging.getLogger(__name__)


def relu2(z: torch.Tensor) -> torch.Tensor:
    """Squared ReLU: partial activations (inputs near, not at, the edit) count for much less."""
    return F.relu(z).square()


def ramp(z: torch.Tensor) -> torch.Tensor:
    """ReLU capped at 1: inputs past the upper threshold fire exactly as the edit does."""
    return z.clamp(0.0, 1.0)


ACTIVATIONS = {"relu": F.relu, "relu2": relu2, "ramp": ramp}


class EditPatch(FFNPatch):
    """An :class:`~mmke.editors.patch.FFNPatch` with input centring/scaling and a zeta offset."""

    def __init__(self, hidden: int, n: int, seed: int = 0, act: str = "relu") -> None:
        super().__init__(hidden, n, act=ACTIVATIONS[act], seed=seed)
        self.act_name = act
        self.register_buffer("center", torch.zeros(hidden))  # mu [H]
        self.register_buffer("scale", torch.ones(()))  # gamma []
        self.register_buffer("offset", torch.zeros(hidden))  # beta * W_zeta zeta [H]
        # image gate: the edit's centred image signature (unit, [H]), the centre, the ramp (lo, hi)
        # on the cosine, and whether the gate is on (an edit made on an image, with the option set)
        self.register_buffer("img_key", torch.zeros(hidden))
        self.register_buffer("img_center", torch.zeros(hidden))
        self.register_buffer("img_ramp", torch.tensor([0.0, 1.0]))
        self.register_buffer("gated", torch.zeros(()))
        self.recorded: dict[str, torch.Tensor] = {}  # last call's q and pre-activation, when recording
        self.record = False
        self.last_gate: torch.Tensor | None = None  # [B] the image gate of the last call (None: ungated)

    def pre(self, q: torch.Tensor) -> torch.Tensor:  # [.., H] -> [.., n]
        return ((q - self.center.to(q.dtype)) * self.scale.to(q.dtype)) @ self.key.to(q.dtype) \
            + self.bias.to(q.dtype)

    def image_gate(self, q: torch.Tensor, image_mask: torch.Tensor | None) -> torch.Tensor:
        """Per-row gate [B] in [0, 1] from the rows' image signatures (see the module docstring)."""
        if image_mask is None:  # no image anywhere in the batch
            return q.new_zeros(q.shape[0] if q.dim() == 3 else 1)
        B, T = image_mask.shape
        x = q.reshape(B, T, -1).float()
        m = image_mask.to(x.device, x.dtype)[..., None]  # [B, T, 1]
        n = m.sum(1)  # [B, 1]
        sig = (x * m).sum(1) / n.clamp(min=1)  # [B, H]
        cos = F.cosine_similarity(sig - self.img_center, self.img_key[None], dim=-1)
        lo, hi = self.img_ramp[0], self.img_ramp[1]
        return ((cos - lo) / (hi - lo)).clamp(0, 1) * (n[:, 0] > 0)

    def set_image_gate(self, signature: torch.Tensor, center: torch.Tensor, lo: float, hi: float) -> None:
        """Gate the neurons on the edit's image signature [H] (centred on ``center``)."""
        with torch.no_grad():
            self.img_key.copy_(F.normalize(signature.float() - center.float(), dim=-1))
            self.img_center.copy_(center)
            self.img_ramp.copy_(torch.tensor([lo, hi]))
            self.gated.fill_(1.0)

    def forward(self, q: torch.Tensor, image_mask: torch.Tensor | None = None) -> torch.Tensor:
        z = self.pre(q)  # [B, T, n] (or [B*T, n] where the family flattens tokens)
        if self.record:  # recorded as [B, T, .] (OPT hands its FFN [B*T, H]; image_mask is [B, T])
            bt = tuple(image_mask.shape) if image_mask is not None and q.dim() == 2 else None
            self.recorded = {"q": q, "z": z} if bt is None else {"q": q.reshape(*bt, -1), "z": z.reshape(*bt, -1)}
        a = self.act(z)
        self.last_gate = None
        if bool(self.gated):
            g = self.image_gate(q, image_mask).to(a.dtype)
            a = (a.reshape(len(g), -1, a.shape[-1]) * g[:, None, None]).reshape(a.shape)
            self.last_gate = g
        return a @ self.value.to(q.dtype) + a.sum(-1, keepdim=True) * self.offset.to(q.dtype)

    @torch.no_grad()
    def packed(self) -> dict:
        """Per-neuron form for :class:`~mmke.editors.patch.NeuronBank`: centring and scaling folded
        into the keys and biases, ((q - mu) * gamma) K + b = q (gamma K) + (b - gamma mu K), the zeta
        offset into the values, sum_n a_n zeta = sum_n a_n 1 zeta^T; the image gate as
        (unit signature, centre, (lo, hi)), or None when the neurons are ungated."""
        s, k = self.scale.float(), self.key.detach().float()
        gate = None
        if bool(self.gated):
            gate = (self.img_key.float(), self.img_center.float(), (float(self.img_ramp[0]), float(self.img_ramp[1])))
        return {"key": k * s, "bias": self.bias.detach().float() - s * (self.center.float() @ k),
                "value": self.value.detach().float() + self.offset.float()[None], "act": self.act, "gate": gate}

    def state(self) -> dict[str, torch.Tensor]:
        return {"key": self.key.data, "bias": self.bias.data, "value": self.value.data,
                "center": self.center, "scale": self.scale, "offset": self.offset,
                "img_key": self.img_key, "img_center": self.img_center, "img_ramp": self.img_ramp,
                "gated": self.gated}

    @classmethod
    def from_state(cls, t: dict[str, torch.Tensor], act: str = "relu") -> "EditPatch":
        p = cls(t["key"].shape[0], t["key"].shape[1], act=act)
        with torch.no_grad():
            for k, v in t.items():
                getattr(p, k).copy_(v)
        p.requires_grad_(False)
        return p


@dataclass
class LocalityMemory:
    """FFN inputs of other inputs at the positions that predict their targets, per patched layer;
    each row's input (to skip the edit input itself) and the unedited model's top-1 token there."""

    q: dict[int, torch.Tensor]  # layer -> [N_pos, H]
    owner: list[tuple[str, str]]  # row -> (prompt, target) of its input
    top1: torch.Tensor  # [N_pos] the unedited model's prediction at the row
    gold: torch.Tensor  # [N_pos] the input's own target token at the row
    # layer -> (count, sum [H], sum of outer products [H, H]) of the FFN inputs at *every* position
    # of the memory inputs (float64): what the whitened keys must also stay silent on
    moments: dict[int, tuple[int, torch.Tensor, torch.Tensor]] | None = None
    # layer -> [H] mean image signature (mean FFN input over image-token positions) of the inputs
    image_center: dict[int, torch.Tensor] | None = None
    _whiteners: dict[tuple[int, float], torch.Tensor] = field(default_factory=dict, repr=False)

    def center(self, layer: int) -> torch.Tensor:
        return self.q[layer].mean(0)

    def whitener(self, layer: int, ridge: float) -> torch.Tensor:
        """(C + ridge * mean variance * I)^-1 [H, H]: the metric in which a key tells the edit from
        the memory's typical variation (ROME's C^-1 k). C is the scatter around the target rows'
        mean of the target rows and of every position of the memory inputs (:attr:`moments`): a
        key in this metric is silent on prompt and answer tokens as well, not only on the
        positions that predict a target."""
        cached = self._whiteners
        if (layer, ridge) not in cached:
            x = self.q[layer].double()
            mu = x.mean(0)
            n, c = len(x), (x - mu).T @ (x - mu)
            if self.moments is not None:  # the scatter of every position around the same mean
                m, s1, s2 = self.moments[layer]
                n, c = n + m, c + s2 - torch.outer(mu, s1) - torch.outer(s1, mu) + m * torch.outer(mu, mu)
            c = c / max(n - 1, 1)
            eye = torch.eye(c.shape[0], dtype=c.dtype)
            cached[(layer, ridge)] = torch.linalg.inv(c + ridge * c.diagonal().mean() * eye).float()
        return cached[(layer, ridge)]

    def rows_to_keep(self, prompt: str, target: str, target_ids: torch.Tensor, skip_same: str) -> torch.Tensor:
        """Rows the new neurons must stay silent on: not the edit input's own, and none where the
        model already predicts (``skip_same="prediction"``) or should predict (``"answer"``) one of
        the target's tokens: firing there pushes a prediction the row already makes."""
        keep = torch.tensor([o != (prompt, target) for o in self.owner], dtype=torch.bool)
        if skip_same != "none":
            keep &= ~torch.isin(self.top1 if skip_same == "prediction" else self.gold, target_ids.cpu())
        return keep


@torch.no_grad()
def ffn_inputs_at_targets(adapter: ModelAdapter, layers: Sequence[int], examples: Sequence[Example],
                          batch_size: int = 16) -> LocalityMemory:
    """FFN inputs of the unedited model at each example's target-predicting positions."""
    qs: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    owner: list[tuple[str, str]] = []
    top1: list[torch.Tensor] = []
    gold: list[torch.Tensor] = []
    moments = {l: [0, 0.0, 0.0] for l in layers}
    img_sum = {l: 0.0 for l in layers}
    n_img = 0
    box: dict[int, torch.Tensor] = {}
    hooks = [adapter.site(f"lm.ffn_key.{l}").register_forward_pre_hook(
        lambda _m, args, l=l: box.__setitem__(l, args[0].detach())) for l in layers]
    try:
        for s in range(0, len(examples), batch_size):
            chunk = list(examples[s:s + batch_size])
            for idx in adapter.sub_batches(chunk):
                sub = [chunk[i] for i in idx]
                batch = adapter.prepare(sub).to(adapter.device)
                view = adapter.target_view(batch)
                pos0, _, mask0 = target_positions(batch.labels.to(adapter.device))
                attn0 = batch.inputs.get("attention_mask")
                im0 = adapter.image_mask(batch).to(adapter.device)
                has0 = im0.any(1)
                n_img += int(has0.sum())
                for l in layers:
                    dev = box[l].device  # layers may sit on different devices: meet each where it is
                    pos, mask, im, has = pos0.to(dev), mask0.to(dev), im0.to(dev), has0.to(dev)
                    attn = attn0.to(dev) if attn0 is not None else None
                    xb = box[l].reshape(*im.shape, -1)  # [B, T, H] (OPT hands its FFN [B*T, H])
                    x = xb.float()
                    sig = (x * im[..., None]).sum(1) / im.sum(1, keepdim=True).clamp(min=1)
                    img_sum[l] = img_sum[l] + sig[has].sum(0)
                    q = xb.gather(1, pos.unsqueeze(-1).expand(-1, -1, xb.shape[-1]))
                    qs[l].append(q[mask].float())
                    every = xb
                    every = every[attn.bool()] if attn is not None and attn.shape == every.shape[:2] \
                        else every.reshape(-1, every.shape[-1])
                    every = every.double()
                    mo = moments[l]
                    mo[0] += len(every)
                    mo[1] = mo[1] + every.sum(0)
                    mo[2] = mo[2] + every.T @ every
                top1.append(view.logits.argmax(-1)[mask0.to(view.logits.device)].cpu())
                gold.append(view.target_ids[mask0.to(view.logits.device)].cpu())
                for b, ex in enumerate(sub):
                    owner += [(ex.prompt, ex.target)] * int(mask0[b].sum())
    finally:
        for h in hooks:
            h.remove()
    return LocalityMemory({l: torch.cat(v, 0) for l, v in qs.items()}, owner, torch.cat(top1), torch.cat(gold),
                          {l: (m[0], m[1].cpu(), m[2].cpu()) for l, m in moments.items()},
                          {l: (img_sum[l] / n_img).cpu() for l in layers} if n_img else None)


@torch.no_grad()
def record_ffn_inputs(runner: TailRunner, cache: TailCache, patches: dict[int, EditPatch]) -> dict[int, torch.Tensor]:
    """FFN inputs [B, T, H] of the patched layers on the cached batch, under the current hooks."""
    for p in patches.values():
        p.record = True
    try:
        runner.run(cache)
        return {l: p.recorded["q"].detach() for l, p in patches.items()}
    finally:
        for p in patches.values():
            p.record = False
            p.recorded = {}


@torch.no_grad()
def init_patches(patches: dict[int, EditPatch], pos: torch.Tensor, memory: dict[int, torch.Tensor] | None,
                 center: dict[int, torch.Tensor] | None, margin: float,
                 q_base: dict[int, torch.Tensor] | None = None, shift_weight: float = 0.0,
                 whiten: dict[int, torch.Tensor] | None = None, gate: tuple[float, float] = (0.25, 0.45)) -> None:
    """Keys from the edit's recorded FFN inputs at ``pos`` (its target-predicting positions [P]),
    centred on the locality memory's mean; neuron j takes position j mod P. Each bias sits halfway
    between the edit's pre-activation (about 1) and the highest one over the memory rows
    ``memory[layer]`` [N, H], but at most 1 - ``margin``: the neuron fires on the edit and, where
    the key alone can tell them apart, on no memory row.

    ``whiten`` (layer -> (C + ridge I)^-1 [H, H], :meth:`LocalityMemory.whitener`) gives closed-form
    keys instead: neuron j's pre-activation is (sim - lo) / (hi - lo) with sim = (q - mu) W u_j /
    (u_j W u_j) the whitened similarity to the edit's own input u_j (1 at the edit) and
    ``gate`` = (lo, hi); with the ``ramp`` activation the neuron is off below lo and fires fully
    above hi."""
    for layer, p in patches.items():
        q = p.recorded["q"][0, pos].float()  # [P, H]
        mu = center[layer].to(q) if center is not None else torch.zeros_like(q[0])
        u = q - mu  # [P, H]
        n = p.key.shape[1]
        own = torch.arange(n) % u.shape[0]  # neuron -> its position
        p.center.copy_(mu)
        p.value.zero_()
        if whiten is not None:
            lo, hi = gate
            k = u[own] @ whiten[layer].to(u)  # [n, H] (W is symmetric)
            k = k / (u[own] * k).sum(-1, keepdim=True)
            p.scale.fill_(1.0 / (hi - lo))
            p.key.copy_(k.t())
            p.bias.fill_(-lo / (hi - lo))
            continue
        g = torch.Generator().manual_seed(layer)
        dirs = F.normalize(u[own], dim=-1) + 0.05 * torch.randn(n, u.shape[1], generator=g) / u.shape[1] ** 0.5
        if q_base is not None and shift_weight > 0:
            # what latent IKE added to the edit's FFN inputs: inputs it leaves alone (s ~ 0) lack it
            d = q - q_base[layer][0, pos].float().to(q)  # [P, H]
            if bool((d.norm(dim=-1) > 1e-3 * u.norm(dim=-1)).all()):
                dirs = dirs + shift_weight * F.normalize(d[own], dim=-1)
        p.scale.copy_(1.0 / u.norm(dim=-1).mean().clamp(min=1e-6))
        p.key.copy_(F.normalize(dirs, dim=-1).t())
        p.bias.zero_()
        z_edit = p.pre(q)[own, torch.arange(n)]  # [n]
        bias = z_edit - margin
        if memory is not None and len(memory[layer]):
            z_mem = p.pre(memory[layer].to(q)).amax(0)  # [n]
            bias = torch.minimum(bias, (z_edit + z_mem) / 2)
        p.bias.copy_(-bias)


def train_patches(runner: TailRunner, cache: TailCache, patches: dict[int, EditPatch],
                  memory: LocalityMemory | None, keep_rows: torch.Tensor | None, *, steps: int, lr: float,
                  key_lr: float, act_weight: float, margin: float, mem_weight: float, mem_margin: float,
                  stop_loss: float, mem_tol: float = 0.0, q_base: dict[int, torch.Tensor] | None = None,
                  shift_weight: float = 0.0, whiten: float | None = None,
                  gate: tuple[float, float] = (0.25, 0.45),
                  image_gate: tuple[float, float] | None = None) -> tuple[int, float, float]:
    """Initialise and optimise the installed ``patches`` on the cached edit. Returns (steps, the
    target's NLL at the last step, and at the first: with every earlier edit in place and the new
    values still 0, so it shows how far earlier edits pull the target away or toward it).
    ``q_base``: the edit's FFN inputs without latent IKE (:func:`init_patches`). ``whiten`` (the
    ridge of :meth:`LocalityMemory.whitener`): closed-form keys, fixed; only the values train (the
    activation and memory losses, which move keys, are off). ``image_gate`` (lo, hi): gate the
    neurons on the edit's image (see :meth:`EditPatch.set_image_gate`); needs the memory's image
    centre and an edit with an image, and is off otherwise."""
    pos = target_positions(cache.labels)[0][0]  # [P] positions predicting the target tokens
    src = {l: key_layer_of(p, l) for l, p in patches.items()}  # whose FFN inputs each patch's keys read
    for p in patches.values():
        p.record = True
    with torch.no_grad():
        runner.run(cache)  # records each layer's FFN inputs (values are still 0: no effect)
    im = cache.image_mask
    if (image_gate is not None and memory is not None and memory.image_center is not None
            and im is not None and bool(im[0].any())):
        for l, p in patches.items():
            x = p.recorded["q"].reshape(*im.shape, -1)[0].float()  # [T, H] the edit's FFN inputs
            p.set_image_gate(x[im[0].to(x.device)].mean(0), memory.image_center[src[l]].to(x), *image_gate)
    mem = {l: memory.q[src[l]][keep_rows] if keep_rows is not None else memory.q[src[l]] for l in patches} \
        if memory is not None else None
    if whiten is not None and memory is None:
        raise ValueError("whitened keys need the locality memory (train records)")
    W = {l: memory.whitener(src[l], whiten) for l in patches} if whiten is not None else None
    init_patches(patches, pos, mem, {l: memory.center(src[l]) for l in patches} if memory is not None else None,
                 margin, q_base, shift_weight, whiten=W, gate=gate)
    if mem_weight <= 0 or W is not None:
        mem = None
    if W is not None:
        act_weight = 0.0
    keys = [t for p in patches.values() for t in (p.key, p.bias)] if W is None else []
    values = [p.value for p in patches.values()]
    params = keys + values
    for t in params:
        t.requires_grad_(True)
    # keys are unit vectors (entries ~ H^-1/2): they move far slower than the values
    opt = torch.optim.Adam([{"params": values, "lr": lr}] + ([{"params": keys, "lr": key_lr}] if keys else []))
    step, nll_v, start = 0, float("nan"), float("nan")
    try:
        with torch.enable_grad():
            for step in range(1, steps + 1):
                nll = target_nll(runner.run(cache))
                z_edit = torch.cat([p.recorded["z"][0, pos] for p in patches.values()], -1)  # [P, L*n]
                loss_act = torch.relu(margin - z_edit.amax(0)).mean()
                loss_mem = torch.stack([torch.relu(patches[l].pre(m) + mem_margin).mean()
                                        for l, m in mem.items()]).mean() if mem is not None else nll.new_zeros(())
                nll_v = float(nll.detach())
                if step == 1:
                    start = nll_v
                log.debug("step %d: nll %.4f act %.4f mem %.5f", step, nll_v, float(loss_act.detach()),
                          float(loss_mem.detach()))
                act_met = act_weight == 0 or float(loss_act.detach()) == 0.0
                if nll_v < stop_loss and act_met and float(loss_mem.detach()) <= mem_tol:
                    break
                # the NLL is a hinge at stop_loss: once the target is reached the values stop growing
                # (over-confident values flip other inputs on the faintest activation)
                loss = torch.relu(nll - stop_loss) + act_weight * loss_act + mem_weight * loss_mem
                opt.zero_grad()
                loss.backward()
                opt.step()
    finally:
        for p in patches.values():
            p.record = False
            p.recorded = {}
        for t in params:
            t.requires_grad_(False)
    return step, nll_v, start


@torch.no_grad()
def shrink_values(runner: TailRunner, cache: TailCache, patches: dict[int, EditPatch], p_min: float,
                  iters: int = 7) -> float:
    """Scale every new value (and zeta offset) by the smallest c in (0, 1] that keeps each target
    token the top-1 prediction with probability >= ``p_min`` (bisection on the cached edit).
    Optimisation overshoots; the weakest sufficient edit disturbs neighbouring inputs least."""
    base = {l: (p.value.detach().clone(), p.offset.clone()) for l, p in patches.items()}

    def ok(c: float) -> bool:
        for l, p in patches.items():
            p.value.copy_(base[l][0] * c)
            p.offset.copy_(base[l][1] * c)
        v = runner.run(cache)
        prob = torch.softmax(v.logits.float(), -1)
        tgt = prob.gather(-1, v.target_ids.unsqueeze(-1)).squeeze(-1)
        hit = (v.logits.argmax(-1) == v.target_ids) & (tgt >= p_min)
        return bool(hit[v.mask].all())

    lo, hi = 0.0, 1.0
    if not ok(hi):
        return 1.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    ok(hi)  # leave the patches at the smallest sufficient scale found
    return hi
