"""Gradient hyper-network editors (MEND, KE): the machinery they share, and their training objective.

For a Linear layer y = x W^T + b, the gradient of the edit loss is a sum of per-token outer
products, dL/dW = sum_t delta_t u_t^T, with u_t the layer input and delta_t = dL/dy_t. MEND
transforms (u, delta) per token; KE reweights the whole matrix, conditioned on the edit's text.
This module resolves edit sites to Linear layers, captures (u, delta) for one example, and applies
a weight update either *functionally* through forward hooks (training: the loss reaches the
hyper-network) or *in place* (edit time: the handle keeps the originals and restores them exactly).

Training objective (both methods): the MMEdit reference trainer (EasyEdit
``trainer/MultimodalTrainer.py``, ``edit_step``). The update is computed from the edit input
(image + prompt + new target), applied, and

    L = c_edit * NLL(target | rephrased prompt, image)          (T-Generality input, ``cedit`` 0.1)
      + c_image_edit * NLL(target | prompt, rephrased image)    (M-Generality input, ``iedit`` 0.1)
      + c_loc * (KL_text + KL_image)                            (``cloc`` 1.0)

where KL_text / KL_image are the mean KL(unedited || edited) of the next-token distributions over
every text position of the text-only locality input (question + answer) and of the unrelated-image
input (templated question + answer): the reference masks its KL with the attention mask, so the
question's positions count as well as the answer's. Image positions stay out (they predict no
text). The edit input itself is not a loss term in the reference (it only feeds the gradient).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from mmke.editors.base import EditHandle, EditRequest, WeightLedger
from mmke.editors.trained import TrainedEditor, TrainedEditorConfig
from mmke.models.base import Example, ModelAdapter, TargetView, kl_at_targets, target_nll
from mmke.models.placement import module_device


def last_ffn_sites(adapter: ModelAdapter, n: int = 3) -> list[str]:
    """The reference's edit sites (EasyEdit hparams/TRAINING/MEND/minigpt4.yaml ``inner_params``):
    both FFN matrices (keys = up projection / fc1, values = down projection / fc2) of the last
    ``n`` LM layers, or of every layer of an LM with fewer."""
    k = min(n, adapter.num_lm_layers)
    return [f"lm.{kind}.{i}" for i in range(-k, 0) for kind in ("ffn_key", "ffn_value")]


@dataclass
class LinearSite:
    """One editable Linear layer: its parameter name in the model and the module."""

    name: str  # e.g. "lm.model.layers.29.mlp.down_proj"
    module: nn.Linear

    @property
    def shape(self) -> tuple[int, int]:  # (out, in)
        return tuple(self.module.weight.shape)  # type: ignore[return-value]


def linear_sites(adapter: ModelAdapter, sites: Sequence[str], last_linears: int = 3) -> list[LinearSite]:
    """Resolve edit-site names to Linear layers. A site that is a Linear is itself; any other site
    (``connector``, ``vision``) contributes its last ``last_linears`` Linear submodules."""
    names = {id(m): n for n, m in adapter.model.named_modules()}
    out: list[LinearSite] = []
    for s in sites:
        mod = adapter.site(s)
        found = [mod] if isinstance(mod, nn.Linear) else \
            [m for m in mod.modules() if isinstance(m, nn.Linear)][-last_linears:]
        if not found:
            raise ValueError(f"edit site {s!r} has no Linear layer to edit")
        out += [LinearSite(names[id(m)], m) for m in found if all(o.module is not m for o in out)]
    return out


@dataclass
class Captured:
    """Per-token layer inputs and output gradients of one Linear: u [N, in], delta [N, out]."""

    u: torch.Tensor
    delta: torch.Tensor


@dataclass
class EditGradients:
    """What one backward pass over the edit input gives: (u, delta) per site, the edit loss, and
    the model's top-1 predictions at the target positions (teacher forced), ids ``[L]``."""

    captured: dict[str, Captured]
    loss: torch.Tensor
    pred_ids: torch.Tensor


def capture(adapter: ModelAdapter, sites: list[LinearSite], example: Example) -> EditGradients:
    """Run the edit example once with gradients of the target NLL (the model's own parameters get
    none) and collect, per site, the layer inputs u and the output gradients delta."""
    inputs: dict[str, torch.Tensor] = {}
    probes: dict[str, torch.Tensor] = {}

    def make(name: str):
        def hook(_m, args, out):
            inputs[name] = args[0].detach()
            # out + zero probe: dL/dprobe = dL/dout, and the graph through later sites is kept
            probe = torch.zeros_like(out, requires_grad=True)
            probes[name] = probe
            return out + probe
        return hook

    handles = [s.module.register_forward_hook(make(s.name)) for s in sites]
    try:
        with torch.enable_grad():
            view = adapter.run([example])
            loss = target_nll(view)
            grads = torch.autograd.grad(loss, [probes[s.name] for s in sites], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    out: dict[str, Captured] = {}
    for s, g in zip(sites, grads):
        x = inputs[s.name]
        g = torch.zeros_like(probes[s.name]) if g is None else g
        out[s.name] = Captured(x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]))
    pred = view.logits[0].detach().argmax(-1)[view.mask[0]]
    return EditGradients(out, loss.detach(), pred)


#: a functional update of one Linear: maps its input x [..., in] to the change of its output
Delta = Callable[[torch.Tensor], torch.Tensor]


@contextmanager
def functional_updates(sites: list[LinearSite], deltas: dict[str, Delta]) -> Iterator[None]:
    """While active, each site's output is y + deltas[name](x): a differentiable weight update that
    never touches the parameters (training)."""
    handles = []
    for s in sites:
        if s.name in deltas:
            fn = deltas[s.name]
            handles.append(s.module.register_forward_hook(lambda _m, args, out, fn=fn: out + fn(args[0]).to(out.dtype)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def weight_params(adapter: ModelAdapter, sites: list[LinearSite]) -> dict[str, nn.Parameter]:
    named = dict(adapter.model.named_parameters())
    return {s.name + ".weight": named[s.name + ".weight"] for s in sites}


@dataclass
class LowRank:
    """A weight update in factored form, dW = left @ right (left [out, r], right [r, in])."""

    left: torch.Tensor
    right: torch.Tensor

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x dW^T without forming dW: x [..., in] -> [..., out] (on x's device, in x's dtype)."""
        return (x @ self.right.to(x.device, x.dtype).T) @ self.left.to(x.device, x.dtype).T

    def dense(self) -> torch.Tensor:
        """dW [out, in], in fp32."""
        return self.left.float() @ self.right.float()


# ---- the training objective ---------------------------------------------------------------------
def whole_text(ex: Example) -> Example:
    """The same input with every text token (prompt and answer) a scored position, so that a loss
    over "target positions" covers the whole question + answer (image positions stay out)."""
    return Example("", ex.prompt + ex.target, ex.image, ex.context)


def view_row(view: TargetView, i: int) -> TargetView:
    return TargetView(view.logits[i: i + 1], view.target_ids[i: i + 1], view.mask[i: i + 1])


class HyperNetConfig(TrainedEditorConfig):
    """Options shared by MEND and KE: edit sites and the training objective's weights (the MMEdit
    reference trainer's ``cedit``, ``iedit``, ``cloc``)."""

    #: edit sites; None: both FFN matrices of the last three LM layers (:func:`last_ffn_sites`)
    sites: list[str] | None = None
    last_linears: int = 3  # Linear layers taken from a non-Linear site (connector, vision)
    c_edit: float = 0.1  # NLL of the target on the rephrased-prompt input (T-Generality)
    c_image_edit: float = 0.1  # NLL of the target on the rephrased-image input (M-Generality)
    c_loc: float = 1.0  # KL(unedited || edited) on the text-only and the unrelated-image inputs
    #: KL over every text position of the locality inputs (the reference); False: answer positions only
    loc_all_positions: bool = True


class HyperNetEditor(TrainedEditor):
    """A trained network maps the edit loss's gradient at Linear sites to a weight update.

    Subclasses implement :meth:`updates`. Training: the module-level objective above, with the
    update applied functionally. At edit time the update is added to the weights in place;
    ``remove()`` copies the originals back (bit-exact).
    """

    Config = HyperNetConfig

    def __init__(self, adapter: ModelAdapter, config=None, **context) -> None:
        config = config or self.Config()
        self.site_names = config.sites if config.sites is not None else last_ffn_sites(adapter)
        self.sites = linear_sites(adapter, self.site_names, config.last_linears)
        super().__init__(adapter, config, **context)

    def architecture(self) -> dict:
        return {**super().architecture(), "sites": self.site_names}

    def updates(self, grads: EditGradients, request: EditRequest) -> dict[str, LowRank]:
        """Weight update per site name, differentiable in ``self.module``."""
        raise NotImplementedError

    def home_device(self) -> torch.device:
        return module_device(self.sites[0].module)

    def updates_for(self, request: EditRequest) -> tuple[dict[str, LowRank], torch.Tensor]:
        """The update of an edit request, and the edit loss before it. The captured factors are
        moved to the hyper-network's device (sites may sit on other devices) and taken in fp32."""
        grads = capture(self.adapter, self.sites, request.example)
        dev = self.device
        grads.captured = {k: Captured(c.u.to(dev, torch.float32), c.delta.to(dev, torch.float32))
                          for k, c in grads.captured.items()}
        return self.updates(grads, request), grads.loss

    def locality_inputs(self, inputs: dict[str, Example]) -> list[Example]:
        """The text-only and unrelated-image inputs the locality KL is taken over."""
        loc = [inputs["t_locality"], inputs["m_locality"]]
        return [whole_text(x) for x in loc] if self.config.loc_all_positions else loc

    def train_loss(self, case) -> tuple[torch.Tensor, dict[str, float]]:
        x = case.inputs
        cfg = self.config
        loc = self.locality_inputs(x)
        with torch.no_grad():
            pre = self.adapter.run(loc)
        ups, _ = self.updates_for(case.request)
        with functional_updates(self.sites, {k: u.apply for k, u in ups.items()}):
            gen = self.adapter.run([x["t_generality"], x["m_generality"]])
            post = self.adapter.run(loc)
        parts = {
            "edit_nll": target_nll(view_row(gen, 0)),
            "image_edit_nll": target_nll(view_row(gen, 1)),
            "loc_kl": kl_at_targets(view_row(pre, 0), view_row(post, 0)),
            "image_loc_kl": kl_at_targets(view_row(pre, 1), view_row(post, 1)),
        }
        loss = (cfg.c_edit * parts["edit_nll"] + cfg.c_image_edit * parts["image_edit_nll"]
                + cfg.c_loc * (parts["loc_kl"] + parts["image_loc_kl"]))
        return loss, {k: v.item() for k, v in parts.items()}

    def edit(self, request: EditRequest) -> EditHandle:
        with torch.no_grad():
            ups, loss = self.updates_for(request)
            params = weight_params(self.adapter, self.sites)
            # the update in fp32 on each weight's device, added through the weight's fp32 master
            deltas = {s.name + ".weight": ups[s.name].dense().float() for s in self.sites}
            originals = WeightLedger.of(self.adapter).add_deltas(params, deltas)
            new = {k: p.detach().clone() for k, p in params.items()}
        return EditHandle(self.adapter, self.name, params=originals, tensors=new,
                          meta={"sites": [s.name for s in self.sites], "pre_edit_nll": loss.item()})
