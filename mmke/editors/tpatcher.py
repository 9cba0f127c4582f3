"""T-Patcher: one new neuron per mistake in the last FFN layer (Huang et al., "Transformer-Patcher:
One Mistake worth One Neuron", ICLR 2023).

Per edit (paper §3; reference code ZeroYuHuang/Transformer-Patcher, ``src/models/patch.py``):

- **where**: the FFN of the last LM layer (``layer``); the patch appends key-value pairs to it,
  FFN_p(q) = FFN(q) + Act(q K + b) V, the original weights frozen (:mod:`mmke.editors.patch`);
- **how many**: one neuron per mistake — each target position whose teacher-forced top-1
  prediction is wrong gets its own neuron, at most ``max_neurons`` (reference
  ``max_add_neuron_num`` = 5); for a one-token answer that is one neuron at the last prompt token;
- **keys**: neuron i starts from the FFN input h_i at its own mistake's position,
  k_i = h_i / ||h_i||^2 and b_i = 0, so its pre-activation there is 1 (``use_init_weight``);
- **values**: v = e * a with e ~ N(0, 1) and a = ``amplify`` (10) at the start, both trained
  (reference ``ModifyLinearInput`` with ``amplify``); once trained, the patch keeps the product;
- **loss** (paper Eq. 3-5): L = NLL(target) + a * L_act + m * L_mem, with
  L_act = mean_i exp(margin_act - z_i(own position))  (reference ``top5_exp``, ``act_margin_val`` 0)
  L_mem = mean_i [mean top-k exp(z_mem - z_i + m1) + mean top-k exp(z_mem - m2)]  (``top1000_exp``,
  ``margin_val1`` 3, ``margin_val2`` -3), z_mem the neuron's pre-activations at every position of
  a memory of other inputs (the task's train split, as the reference's training-set memory);
  a = ``act_weight`` 1, m = ``mem_weight`` 5 (reference ``alc``, ``mlc``); Adam, lr 1e-2;
- stopping (reference ``joint_validation`` with ``use_val``): once every target token is the
  top-1 prediction, training goes on while the memory loss still improves (by more than 1e-3)
  and stops after ``patience`` steps without improvement, or after ``steps``; Adam with weight
  decay 0.01, lr 1e-2.

The FFN input of the patched layer does not depend on the patch, so the memory's inputs are
computed once, and each step runs only the patched layer onwards (:mod:`mmke.editors.tail`).
Sequential edits accumulate: each edit trains beside the earlier ones (on the already-edited model),
then its frozen neurons join the layer's packed bank (:class:`~mmke.editors.patch.NeuronBank`: one
key-value block and two hooks for all edits; removing an edit takes exactly its neurons out).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mmke.editors.base import EditHandle, Editor, EditorConfig, EditRequest, read_saved_edit
from mmke.editors.patch import BankedPatches, FFNPatch, PatchHooks, ffn_input_dim
from mmke.editors.tail import TailRunner
from mmke.models.base import Example, target_nll, target_positions
from mmke.models.placement import module_device
from mmke.scoring import LazyInputs
from mmke.tasks import TASKS

log = logging.getLogger(__name__)


class TPatcherConfig(EditorConfig):
    layer: int = -1  # the last LM layer
    max_neurons: int = 5  # neurons per edit: one per mistaken target token, at most this many
    steps: int = 200  # at most this many optimisation steps per edit
    lr: float = 1e-2  # Adam (reference)
    act_weight: float = 1.0  # alc
    act_margin: float = 0.0  # act_margin_val
    mem_weight: float = 5.0  # mlc
    mem_margin_edit: float = 3.0  # margin_val1: memory pre-activations this far below the edit's
    mem_margin_abs: float = -3.0  # margin_val2: ... and below this value
    mem_top: int = 1000  # the top-k memory activations each memory term averages (top1000_exp)
    memory_size: int = 256  # train-split inputs whose every position forms the memory
    amplify: float = 10.0  # amplify_con: the values' trained scale starts here
    seed: int = 0  # the values' random start
    patience: int = 10  # steps without memory-loss improvement, once the edit holds, before stopping
    weight_decay: float = 0.01  # Adam's weight decay (reference)
    max_exp: float = 30.0  # exponents are clamped here (numerical safety only)


class AmplifiedPatch(FFNPatch):
    """The patch being trained: values parametrised as e * a (T-Patcher's ``amplify``)."""

    def __init__(self, q: torch.Tensor, amplify: float, seed: int) -> None:
        n, hidden = q.shape
        super().__init__(hidden, n, act=F.relu)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.key.copy_((q / q.pow(2).sum(-1, keepdim=True)).t())  # k_i = h_i / |h_i|^2: z_i = 1
            self.bias.zero_()
            self.value.copy_(torch.randn(n, hidden, generator=g))
        self.amp = nn.Parameter(torch.full((n, hidden), float(amplify)))

    def forward(self, q: torch.Tensor, image_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.act(q @ self.key.to(q.dtype) + self.bias.to(q.dtype)) @ (self.value * self.amp).to(q.dtype)

    def frozen(self) -> FFNPatch:
        """The trained patch as a plain key-value patch (values = e * a), gradients off."""
        p = FFNPatch(self.key.shape[0], self.key.shape[1], act=F.relu).to(self.key.device)
        with torch.no_grad():
            p.key.copy_(self.key)
            p.bias.copy_(self.bias)
            p.value.copy_(self.value * self.amp)
        return p.requires_grad_(False)


def _exp_top(x: torch.Tensor, k: int, cap: float) -> torch.Tensor:
    """mean over the top-k entries of each column of exp(x) ([N, n] -> [n])."""
    top = x.topk(min(k, x.shape[0]), dim=0).values
    return top.clamp(max=cap).exp().mean(0)


class TPatcherEditor(Editor):
    name = "t-patcher"
    Config = TPatcherConfig

    def __init__(self, adapter, config=None, *, train_records=None, task=None, **context: Any) -> None:
        super().__init__(adapter, config, **context)
        self.layer = self.config.layer % adapter.num_lm_layers
        self.hidden = ffn_input_dim(adapter, self.layer)
        self.runner = TailRunner(adapter, self.layer)
        self._memory_q: torch.Tensor | None = None
        self._memory_src: Sequence[Example] = []
        if train_records:
            # decoded one at a time when the memory is first built, never all held at once
            # (without a task the prompt is used as is, as the caption template does)
            self._memory_src = LazyInputs(train_records[: self.config.memory_size], task or TASKS["caption"],
                                          adapter.load_image, ("reliability",))
        else:
            log.warning("t-patcher: no train records, so no memory loss (the patch may fire elsewhere)")

    def layer_device(self) -> torch.device:
        return module_device(self.adapter.site(f"lm.ffn_key.{self.layer}"))

    @torch.no_grad()
    def ffn_inputs(self, examples: list[Example]) -> torch.Tensor:
        """FFN inputs at the patched layer for every position of each example: [N, H]. One
        example per forward, so no position is padding."""
        key = self.adapter.site(f"lm.ffn_key.{self.layer}")
        got: list[torch.Tensor] = []
        h = key.register_forward_pre_hook(lambda _m, args: got.append(args[0].detach().reshape(-1, args[0].shape[-1])))
        try:
            for ex in examples:
                self.adapter.run([ex])
        finally:
            h.remove()
        return torch.cat([g.to(self.layer_device()) for g in got], 0).float()

    def memory(self) -> torch.Tensor | None:
        if self._memory_q is None and self._memory_src:
            self._memory_q = self.ffn_inputs(self._memory_src)
        return self._memory_q

    def _edit_inputs(self, request: EditRequest):
        """The cached edit batch, the positions of its mistakes [P] (at most ``max_neurons``) and
        the FFN inputs there [P, H]."""
        cache, view = self.runner.capture([request.example])
        pos = target_positions(cache.labels.to(view.logits.device))[0][0]  # [L] positions predicting targets
        wrong = (view.logits[0].argmax(-1) != view.target_ids[0]) & view.mask[0]
        err = pos[wrong][: self.config.max_neurons]
        key = self.adapter.site(f"lm.ffn_key.{self.layer}")
        box: dict[str, torch.Tensor] = {}
        hook = key.register_forward_pre_hook(lambda _m, args: box.__setitem__("q", args[0].detach()))
        try:
            with torch.no_grad():
                self.runner.run(cache)
        finally:
            hook.remove()
        q = box["q"].reshape(*cache.labels.shape, -1)  # [1, T, H] (OPT flattens tokens before fc1)
        return cache, err, q[0, err.to(q.device)].float()

    def edit(self, request: EditRequest) -> EditHandle:
        cfg = self.config
        cache, err, q = self._edit_inputs(request)
        if len(err) == 0:  # no mistake, no neuron (the reference patches mistakes only)
            return EditHandle(self.adapter, self.name, undo=lambda: None, tensors={},
                              meta={"layer": self.layer, "neurons": 0, "steps": 0})
        n = len(err)
        # fp32 neurons on the patched layer's device (the forward casts them to the layer's dtype)
        patch = AmplifiedPatch(q.cpu(), cfg.amplify, cfg.seed).to(self.layer_device())
        hooks = PatchHooks(self.adapter, {self.layer: patch})
        mem = self.memory()
        opt = torch.optim.Adam(patch.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps, fixed, best, since = 0, False, float("inf"), 0
        try:
            with torch.enable_grad():
                for steps in range(1, cfg.steps + 1):
                    view = self.runner.run(cache)
                    nll = target_nll(view)
                    z_own = (q @ patch.key + patch.bias).diagonal()  # [n] each neuron at its mistake
                    loss_act = (cfg.act_margin - z_own).clamp(max=cfg.max_exp).exp().mean()
                    loss_mem = nll.new_zeros(())
                    if mem is not None:
                        z_mem = mem @ patch.key + patch.bias  # [N, n]
                        loss_mem = (_exp_top(z_mem - z_own[None] + cfg.mem_margin_edit, cfg.mem_top, cfg.max_exp)
                                    + _exp_top(z_mem - cfg.mem_margin_abs, cfg.mem_top, cfg.max_exp)).mean()
                    fixed = bool((view.logits.argmax(-1) == view.target_ids)[view.mask].all())
                    if fixed:  # the edit holds: go on while the memory loss still improves
                        ml = float(loss_mem.detach())
                        best, since = (ml, 0) if ml < best - 1e-3 else (best, since + 1)
                        if mem is None or since >= cfg.patience:
                            break
                    loss = nll + cfg.act_weight * loss_act + cfg.mem_weight * loss_mem
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        finally:
            hooks.remove()
        final = patch.frozen()
        banked = BankedPatches(self.adapter, {self.layer: final})
        tensors = {"key": final.key.data, "bias": final.bias.data, "value": final.value.data}
        return EditHandle(self.adapter, self.name, undo=banked.remove, tensors=tensors,
                          meta={"layer": self.layer, "neurons": n, "positions": err.tolist(), "steps": steps,
                                "fixed": fixed})

    def load(self, path: str | Path) -> EditHandle:
        method, meta, t = read_saved_edit(path)
        if method != self.name:
            raise ValueError(f"{path}: saved by editor {method!r}, not {self.name!r}")
        if not t:  # an edit that needed no neuron
            return EditHandle(self.adapter, self.name, undo=lambda: None, tensors={}, meta=meta)
        patch = FFNPatch(t["key"].shape[0], t["key"].shape[1], act=F.relu).to(
            module_device(self.adapter.site(f"lm.ffn_key.{int(meta['layer'])}")))
        with torch.no_grad():
            patch.key.copy_(t["key"])
            patch.bias.copy_(t["bias"])
            patch.value.copy_(t["value"])
        patch.requires_grad_(False)
        banked = BankedPatches(self.adapter, {int(meta["layer"]): patch})
        return EditHandle(self.adapter, self.name, undo=banked.remove, tensors=t, meta=meta)
