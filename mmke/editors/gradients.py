"""Gradient hyper-network editors (MEND, KE): the machinery they share.

For a Linear layer y = x W^T + b, the gradient of the edit loss is a sum of per-token outer
products, dL/dW = sum_t delta_t u_t^T, with u_t the layer input and delta_t = dL/dy_t. MEND
transforms (u, delta) per token; KE transforms the whole matrix, conditioned on the edit. This
module resolves edit sites to Linear layers, captures (u, delta) for one example, and applies a
weight update either *functionally* through forward hooks (training: the loss reaches the
hyper-network) or *in place* (edit time: the handle keeps the originals and restores them exactly).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from mmke.editors.base import EditHandle, EditRequest
from mmke.editors.trained import TrainedEditor, TrainedEditorConfig
from mmke.models.base import Example, ModelAdapter, kl_at_targets, target_nll


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


def capture(adapter: ModelAdapter, sites: list[LinearSite], example: Example,
            hidden_hook: nn.Module | None = None) -> tuple[dict[str, Captured], torch.Tensor, torch.Tensor | None]:
    """Run the edit example once with gradients and return, per site, the inputs u and the output
    gradients delta of the target NLL (the model's own parameters get no gradient), the loss, and
    optionally the output of ``hidden_hook`` (a module whose output conditions KE)."""
    inputs: dict[str, torch.Tensor] = {}
    probes: dict[str, torch.Tensor] = {}
    handles = []
    box: dict[str, torch.Tensor] = {}

    def make(name: str):
        def hook(_m, args, out):
            inputs[name] = args[0].detach()
            # out + zero probe: dL/dprobe = dL/dout, and the graph through later sites is kept
            probe = torch.zeros_like(out, requires_grad=True)
            probes[name] = probe
            return out + probe
        return hook

    for s in sites:
        handles.append(s.module.register_forward_hook(make(s.name)))
    if hidden_hook is not None:
        handles.append(hidden_hook.register_forward_hook(
            lambda _m, _a, out: box.__setitem__("h", (out[0] if isinstance(out, tuple) else out).detach())))
    try:
        with torch.enable_grad():
            loss = target_nll(adapter.run([example]))
            grads = torch.autograd.grad(loss, [probes[s.name] for s in sites], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    out: dict[str, Captured] = {}
    for s, g in zip(sites, grads):
        x = inputs[s.name]
        g = torch.zeros_like(probes[s.name]) if g is None else g
        out[s.name] = Captured(x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]))
    return out, loss.detach(), box.get("h")


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
        """x dW^T without forming dW: x [..., in] -> [..., out]."""
        return (x @ self.right.to(x.dtype).T) @ self.left.to(x.dtype).T

    def dense(self) -> torch.Tensor:
        return self.left @ self.right


class HyperNetConfig(TrainedEditorConfig):
    """Options shared by MEND and KE."""

    sites: list[str] = ["lm.ffn_value.-3", "lm.ffn_value.-2", "lm.ffn_value.-1"]
    last_linears: int = 3  # Linear layers taken from a non-Linear site (connector, vision)
    edit_weight: float = 1.0  # c_edit: edit loss on the edit input and its rephrasings
    loc_weight: float = 1.0  # c_loc: KL to the unedited model on the locality inputs


class HyperNetEditor(TrainedEditor):
    """A trained network maps the edit loss's gradient at Linear sites to a weight update.

    Subclasses implement :meth:`updates`. Training (MMEdit objective): the update computed from
    the edit input is applied functionally; the loss is c_edit * NLL of the target on the edit
    input, its rephrased prompt and its rephrased image, plus c_loc * KL(unedited || edited) on the
    text-only and the unrelated-image inputs. At edit time the update is added to the weights in
    place; ``remove()`` copies the originals back (bit-exact).
    """

    Config = HyperNetConfig
    #: KE conditions on the hidden states of the last LM layer; MEND on nothing
    conditions_on_hidden: bool = False

    def __init__(self, adapter: ModelAdapter, config=None, **context) -> None:
        config = config or self.Config()
        self.sites = linear_sites(adapter, config.sites, config.last_linears)
        super().__init__(adapter, config, **context)

    def updates(self, captured: dict[str, Captured], hidden: torch.Tensor | None) -> dict[str, LowRank]:
        """Weight update per site name, differentiable in ``self.module``."""
        raise NotImplementedError

    def _updates_for(self, example: Example) -> tuple[dict[str, LowRank], torch.Tensor]:
        hook = self.adapter.lm_layers()[-1] if self.conditions_on_hidden else None
        cap, loss, hidden = capture(self.adapter, self.sites, example, hook)
        return self.updates(cap, hidden), loss

    def train_loss(self, case) -> tuple[torch.Tensor, dict[str, float]]:
        x = case.inputs
        cfg = self.config
        with torch.no_grad():
            pre = self.adapter.run([x["t_locality"], x["m_locality"]])
        ups, _ = self._updates_for(x["reliability"])
        with functional_updates(self.sites, {k: u.apply for k, u in ups.items()}):
            l_edit = target_nll(self.adapter.run([x["reliability"], x["t_generality"], x["m_generality"]]))
            l_loc = kl_at_targets(pre, self.adapter.run([x["t_locality"], x["m_locality"]]))
        loss = cfg.edit_weight * l_edit + cfg.loc_weight * l_loc
        return loss, {"edit_nll": l_edit.item(), "loc_kl": l_loc.item()}

    def edit(self, request: EditRequest) -> EditHandle:
        with torch.no_grad():
            ups, loss = self._updates_for(request.example)
            params = weight_params(self.adapter, self.sites)
            originals = {k: p.detach().clone() for k, p in params.items()}
            for s in self.sites:
                params[s.name + ".weight"].add_(ups[s.name].dense().to(params[s.name + ".weight"].dtype))
            new = {k: p.detach().clone() for k, p in params.items()}
        return EditHandle(self.adapter, self.name, params=originals, tensors=new,
                          meta={"sites": [s.name for s in self.sites], "pre_edit_nll": loss.item()})
