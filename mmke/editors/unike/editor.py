"""UniKE (Pan et al., "Towards Unified Multimodal Editing with Enhanced Knowledge Collaboration",
NeurIPS 2024): intrinsic and in-context knowledge as key-value memories of the same layers, made to
cooperate through a semantic and a truthfulness space (SPEC §5).

``unike`` follows the paper (§3, with the settings of its appendix: 10 new key-value pairs in each
of the last 4 LM layers, K = 40 retrieved states):

- intrinsic editing (§3.1, Eq. 2): new FFN neurons with T-Patcher-style keys — started from the
  edit's own FFN inputs and trained with T-Patcher's activation and memory losses beside the
  target NLL — and ReLU activations;
- latent IKE (§3.2, Eq. 3): "external knowledge is incorporated as external key-value memory
  through feature shifting in self-attention": the **self-attention output** of each edited layer
  is shifted, h' = (1 - s) h + s h_know;
- collaboration (§3.3, Eqs. 4-7): the semantic encoder gives the dynamic
  s = cos(EncSem(h_know), h_input) (clamped to [0, 1]; see SPEC §5 for why the similarity weighs
  the retrieved knowledge), and the truthfulness direction zeta offsets the new values (Eq. 6).

``unike-plus`` is mmke's variant, measured beside it: closed-form whitened keys with a ramp gate
(keys in the locality memory's whitened metric), neurons gated on the edit's image (they stay
silent on other images and on text-only inputs; :mod:`~mmke.editors.unike.intrinsic`), the shift on
the whole layer's output (the residual stream), and a floor under the dynamic s calibrated on
unrelated inputs at training time. It has its own weights (``unike-plus-<task>``).

One edit, in order:

1. one full forward pass of the edit input caches the inputs of the first edited layer
   (:mod:`~mmke.editors.tail`) and the edit's hidden states at the edited layers;
2. external knowledge: latent IKE retrieves the top-K memory entries per layer and installs the
   shift of the edited layers' outputs (:mod:`~mmke.editors.unike.memory`), with fixed s or the
   dynamic, semantic s; or (variant ``unike-intrinsic-ike``) ordinary prompt IKE;
3. intrinsic knowledge: n_e new neurons per edited FFN (:mod:`~mmke.editors.unike.intrinsic`),
   their values offset by beta * W_zeta zeta (the truthfulness direction of the retrieved
   knowledge), trained on the edit with the external knowledge in place, running only the last
   L layers per step;
4. the trained (frozen) neurons move into each layer's packed :class:`~mmke.editors.patch.NeuronBank`;
   the latent knowledge lives in each layer's :class:`~mmke.editors.unike.memory.LatentBank`: however
   many edits are applied, an edited layer holds one FFN pre-hook, one FFN hook and one latent-IKE
   hook, and later edits train beside them, on the already-edited model.

The variants are this editor with other defaults: ``unike-intrinsic``, ``unike-latent``,
``unike-intrinsic-ike``, ``unike-no-collab``. Every variant shares the ``unike`` weights directory
(encoders + memory, written by ``mmke train --method unike``); ``unike-intrinsic`` and
``unike-intrinsic-ike`` need none.
"""

from __future__ import annotations

import json
import logging
import weakref
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import field_validator, model_validator

from mmke.editors.base import EditHandle, EditRequest, read_saved_edit
from mmke.editors.patch import BankedPatches, PatchHooks, contend
from mmke.editors.trained import TrainedEditor, TrainedEditorConfig, bundled_weights_dir
from mmke.editors.unike.encoders import UniKEEncoders
from mmke.editors.unike.intrinsic import (EditPatch, LocalityMemory, ffn_inputs_at_targets, record_ffn_inputs,
                                          shrink_values, train_patches)
from mmke.editors.unike.memory import BankGate, LatentMemory, LatentShift, site_outputs
from mmke.editors.tail import TailRunner
from mmke.models.base import target_positions
from mmke.models.placement import module_device
from mmke.scoring import LazyInputs

log = logging.getLogger(__name__)
_LOCALITY_CACHE: dict[str, tuple] = {}



class UniKEConfig(TrainedEditorConfig):
    # ---- intrinsic editing ----
    intrinsic: bool = True
    layers: int = 4  # the last L LM layers get new neurons (and the latent-IKE shift)
    n_neurons: int = 10  # n_e per layer
    steps: int = 25
    lr: float = 0.05  # Adam on the new values
    key_lr: float = 0.005  # ... and on the new keys and biases
    act_weight: float = 1.0
    margin: float = 0.25  # pre-activation the new neurons keep on the edit (activation loss)
    act: Literal["relu", "relu2", "ramp"] | None = None  # activation of the new neurons; None: "ramp"
    # with whitened keys, "relu" (T-Patcher's) with trained ones
    key_init: Literal["trained", "whitened"] = "trained"  # keys: trained from the edit's input with
    # T-Patcher's losses (the paper), or closed-form and fixed in the locality memory's whitened metric
    # (ROME's C^-1 k; unike-plus)
    whiten_ridge: float = 0.1  # whitened keys: ridge added to the covariance, times its mean variance
    gate_lo: float = 0.25  # whitened keys: a neuron is off below this similarity to the edit (1 = the edit)
    gate_hi: float = 0.45  # ... and, with act="ramp", fires as on the edit above this one
    shrink_to: float | None = None  # after training, shrink the new values while P(target) stays >= this
    image_gate: tuple[float, float] | None = None  # (lo, hi): the neurons fire only on images whose
    # signature has a cosine above lo with the edit image's (fully above hi); unike-plus
    key_site: Literal["own", "first"] = "own"  # the FFN input the new neurons' keys read: their own
    # layer's (the paper), or the first edited layer's at every edited layer, so that an edit's
    # neurons fire on the same inputs in all its layers, decided before any other edit has changed
    # the states (earlier edits' neurons cannot then key later ones into firing: lifelong)
    compete: bool = False  # installed edits' image-gated neurons compete: at each position only the
    # edit firing most strongly there adds (ties: the latest), as GRACE's nearest key answers alone;
    # a new edit trains with the earlier ones yielding to it where it fires as strongly (lifelong)
    shift_key_weight: float = 1.0  # with latent IKE: weight of the shift's direction in the initial keys
    mem_weight: float = 1.0
    mem_margin: float = 0.0
    mem_tol: float = 0.0  # stop once the memory loss is at most this (and the edit is learnt)
    memory_size: int = 256  # train cases whose inputs the new neurons must stay silent on
    mem_skip_same: Literal["answer", "prediction", "none"] = "answer"  # ... except where the answer is
    # (or the model predicts) a token of the edit's target: firing there changes no top-1 output
    memory_kinds: list[str] = ["reliability", "t_locality", "m_locality"]  # which inputs of each case
    stop_loss: float = 0.05
    seed: int = 0
    # ---- external knowledge ----
    external: Literal["latent", "ike", "none"] = "latent"
    site: Literal["layer", "attn"] = "attn"  # latent IKE shifts the self-attention output (the paper) or
    # the whole layer's output (unike-plus)
    k: int = 40  # retrieved memory entries (latent IKE, zeta)
    s: float | Literal["dynamic"] = "dynamic"  # mixing weight of the latent knowledge
    s_calibrated: bool = False  # dynamic s above a floor calibrated on unrelated inputs (unike-plus),
    # instead of the paper's plain (clamped) cosine
    tau: float = 0.1  # temperature of the attention over retrieved states (cosine scores)
    zeta: Literal["truthfulness", "semantic", "random", "none"] = "truthfulness"
    beta: float = 0.1  # weight of the zeta offset, relative to the retrieved |h_pos - h_neg|
    ike_k: int = 32  # demonstrations of prompt IKE (external = "ike")
    # ---- architecture of the trained part (encoders, memory) ----
    enc_hidden: int = 128
    tru_dim: int = 64
    memory_entries: int = 512  # train cases stored in the latent-IKE memory
    # ---- encoder training (`mmke train --method unike`) ----
    enc_steps: int = 500
    enc_lr: float = 1e-3
    enc_batch: int = 128  # triplets per step
    enc_tau: float = 0.1  # temperature of both contrastive losses
    s_quantile: float = 0.99  # dynamic s is 0 on this fraction of unrelated inputs (calibrated floor)

    @model_validator(mode="after")
    def _gate(self):
        if not 0.0 <= self.gate_lo < self.gate_hi <= 1.0:
            raise ValueError("need 0 <= gate_lo < gate_hi <= 1")
        if self.image_gate is not None:
            lo, hi = self.image_gate
            if not -1.0 <= lo < hi <= 1.0:
                raise ValueError("image_gate needs -1 <= lo < hi <= 1 (cosines)")
            if self.external == "latent" and self.site != "layer":
                raise ValueError("image_gate gates the latent shift with the layer's new neurons, which run "
                                 "before the layer output but after its attention: it needs site='layer'")
        if self.compete and (self.image_gate is None or not self.intrinsic):
            raise ValueError("compete ranks the edits' image-gated neurons: it needs intrinsic editing and an "
                             "image_gate (unike-plus has one; for unike set e.g. image_gate=[0.3,0.5])")
        return self

    @field_validator("s")
    @classmethod
    def _s_range(cls, v):
        if not isinstance(v, str) and not 0.0 <= v <= 1.0:
            raise ValueError("s must be 'dynamic' or a number in [0, 1]")
        return v


class UniKEEditor(TrainedEditor):
    """Full UniKE: intrinsic neurons + latent IKE with dynamic s + truthfulness-guided values."""

    name = "unike"
    Config = UniKEConfig
    #: the weights directory (encoders + memory) this editor reads: the ablations share unike's
    weights_name = "unike"

    def __init__(self, adapter, config=None, *, task=None, train_records=None, untrained: bool = False,
                 model_name: str | None = None, **context: Any) -> None:
        cfg = config or self.Config()
        self.n_layers = adapter.num_lm_layers
        self.layers = [(self.n_layers - cfg.layers + j) for j in range(cfg.layers)]  # absolute indices
        needs = self.needs_weights(cfg)
        super().__init__(adapter, cfg, task=task, train_records=train_records,
                         untrained=untrained or not needs, model_name=model_name, **context)
        self.memory: LatentMemory | None = None
        if needs and not untrained:
            self.memory = LatentMemory.load(self.weights_dir())
            if self.memory.layers != self.layers or self.memory.meta.get("site", "layer") != cfg.site:
                raise ValueError(f"{self.weights_dir()}: memory holds layers {self.memory.layers} at site "
                                 f"{self.memory.meta.get('site', 'layer')!r}; this editor edits {self.layers} "
                                 f"at {cfg.site!r} (other `layers` or `site` option?)")
        self.runner = TailRunner(adapter, self.layers[0])
        self._locality: LocalityMemory | None = None
        self._loc_examples = self._locality_examples(train_records or [])
        self.ike = None
        if cfg.external == "ike":
            from mmke.editors.ike import IKEConfig, IKEEditor

            self.ike = IKEEditor(adapter, IKEConfig(k=cfg.ike_k), train_records=train_records, task=task)

    # ---- what needs what ----------------------------------------------------------------
    @classmethod
    def uses_train_records(cls, config) -> bool:
        """The new neurons' locality memory (when the memory loss or whitened keys use it) and
        prompt IKE's demonstrations come from the train split."""
        memory = config.intrinsic and (config.mem_weight > 0 or config.key_init == "whitened")
        return memory or config.external == "ike"

    @staticmethod
    def needs_weights(cfg: UniKEConfig) -> bool:
        """Latent IKE and zeta read the memory (and the encoders); the rest needs nothing trained."""
        return cfg.external == "latent" or (cfg.intrinsic and cfg.zeta != "none")

    def build_module(self) -> UniKEEncoders:
        cfg = self.config
        hidden = int(self.adapter.site(f"lm.attn_out.{self.layers[0]}").out_features)  # the LM width
        return UniKEEncoders(hidden, cfg.layers, cfg.enc_hidden, cfg.tru_dim)

    def architecture(self) -> dict[str, Any]:
        keys = ("layers", "site", "enc_hidden", "tru_dim", "memory_entries")
        return {k: getattr(self.config, k) for k in keys}

    def weights_dir(self) -> Path:
        if self.config.weights or self.model_name != "default":
            return super().weights_dir()
        task = self.task.name if self.task is not None else "vqa"
        d = bundled_weights_dir(self.weights_name, task)
        if not (d / "weights.safetensors").exists():
            raise FileNotFoundError(f"{self.name} needs the {self.weights_name} weights and memory in {d}; build "
                                    f"them with `mmke train --method {self.weights_name} --task {task}`")
        return d

    def fit(self, records: list, out, cfg, command: str = "") -> dict[str, Any]:
        if self.name != self.weights_name:
            raise ValueError(f"{self.name} shares the weights of `{self.weights_name}`: train "
                             f"`--method {self.weights_name}`")
        from mmke.train.unike import fit_unike

        return fit_unike(self, records, out, cfg, command=command)

    def train_loss(self, case):  # pragma: no cover - UniKE trains through fit()
        raise NotImplementedError("UniKE's encoders are trained contrastively by fit(), not per edit case")

    # ---- locality memory of the new neurons ---------------------------------------------
    def _locality_examples(self, records: list) -> Sequence:
        cfg = self.config
        wanted = cfg.intrinsic and (cfg.mem_weight > 0 or cfg.key_init == "whitened")
        if not wanted or not records:
            if wanted:
                log.warning("%s: no train records, so no locality memory: keys are trained from the edit "
                            "alone (new neurons may fire elsewhere)", self.name)
            return []
        if self.task is None:
            raise ValueError(f"{self.name} needs the task to template its locality memory")
        recs = records[: self.config.memory_size]
        # built (images decoded) a few at a time when the memory is computed, never all held
        out = LazyInputs(recs, self.task, self.adapter.load_image, self.config.memory_kinds)
        # what the memory is built from: the same records, task and kinds give the same memory
        self._loc_key = (self.task.name, tuple(self.config.memory_kinds),
                         tuple(json.dumps(r.to_dict(), sort_keys=True) + str(r.image_path) for r in recs))
        return out

    def locality(self) -> LocalityMemory | None:
        """The locality memory of the unedited model (built once per process for a model, layers and
        memory inputs: UniKE's variants and repeated runs share it)."""
        if self._locality is None and self._loc_examples:
            key = (tuple(self.layers), self._loc_key)
            cached = _LOCALITY_CACHE.get("entry")
            if cached is not None and cached[0]() is self.adapter.model and cached[1] == key:
                self._locality = cached[2]
            else:
                if self.adapter.input_transforms or self.adapter.run_wrappers:
                    raise RuntimeError(f"{self.name}: the locality memory must be built on the unedited model; "
                                       "another editor's edit is installed")
                self._locality = ffn_inputs_at_targets(self.adapter, self.layers, self._loc_examples)
                # one entry (it holds [N, H] inputs and [H, H] moments per layer); the model by weak
                # reference, so a new model at a recycled address never matches
                _LOCALITY_CACHE["entry"] = (weakref.ref(self.adapter.model), key, self._locality)
        return self._locality

    # ---- the edit -----------------------------------------------------------------------
    def edit(self, request: EditRequest) -> EditHandle:
        cfg = self.config
        undo: list = []
        tensors: dict[str, torch.Tensor] = {}
        ike_handle = None
        loc = self.locality()  # built once, before anything of this edit (an IKE prompt) is installed
        # whitened keys need the locality memory; without train records the keys are trained
        whiten = cfg.whiten_ridge if cfg.key_init == "whitened" and loc is not None else None
        act = cfg.act or ("ramp" if whiten is not None else "relu")
        meta: dict[str, Any] = {"layers": self.layers, "s": cfg.s, "external": cfg.external,
                                "intrinsic": cfg.intrinsic, "zeta": cfg.zeta, "act": act}
        try:
            if self.ike is not None:
                ike_handle = self.ike.edit(request)
                undo.append(ike_handle.remove)
            ex = request.example
            with site_outputs(self.adapter, self.layers if self.memory is not None else [], cfg.site) as outs:
                cache, _ = self.runner.capture([ex])
            retrieved: dict[int, list[int]] = {}
            if self.memory is not None:
                pos = target_positions(cache.labels)[0][0]
                ends = torch.stack([pos[0], pos[-1] + 1])  # last question token, last answer token
                # [L, 2, H] on the CPU (layers may sit on different devices; the memory is on the CPU)
                st = torch.stack([outs[l][0, ends.to(outs[l].device)].cpu() for l in self.layers])
                for j, l in enumerate(self.layers):
                    retrieved[l] = self.memory.retrieve(l, st[j, 0], cfg.k)
                    tensors[f"latent.{l}.indices"] = torch.tensor(retrieved[l])
                    tensors[f"latent.{l}.edit_sem"] = st[j, 0].cpu()
                    tensors[f"latent.{l}.edit_pos"] = st[j, 1].cpu()
                meta["memory"] = self.memory.digest()
            patches: dict[int, EditPatch] = {}
            q_base = None
            latent = train_hooks = None
            if cfg.intrinsic:
                # the patches train beside the banks of the earlier edits (hooks of their own)
                patches = {l: EditPatch(self.ffn_width(l), cfg.n_neurons, seed=cfg.seed + l, act=act)
                           .to(self.ffn_device(l)) for l in self.layers}
                self._key_layers(patches, cfg.key_site, cfg.compete)
                meta["key_site"] = cfg.key_site
                if cfg.compete:
                    meta["compete"] = True
                train_hooks = PatchHooks(self.adapter, patches)
                undo.append(contend(self.adapter, patches))
                undo.append(train_hooks.remove)
                if cfg.external == "latent" and whiten is None:  # trained keys start from the shift
                    q_base = record_ffn_inputs(self.runner, cache, patches)  # before the shift
            if cfg.external == "latent":
                latent = self._install_latent(tensors, self._gates(patches))
                undo.append(latent.remove)
            if cfg.intrinsic:
                if cfg.zeta != "none":
                    self._set_offsets(patches, retrieved)
                keep = None
                meta["key_init"] = "whitened" if whiten is not None else "trained"
                if loc is not None and whiten is None:  # rows for the memory loss of trained keys
                    tids = target_positions(cache.labels)[1][0]
                    keep = loc.rows_to_keep(ex.prompt, ex.target, tids, cfg.mem_skip_same)
                steps, nll, start_nll = train_patches(
                    self.runner, cache, patches, loc, keep, steps=cfg.steps, lr=cfg.lr, key_lr=cfg.key_lr,
                    act_weight=cfg.act_weight, margin=cfg.margin, mem_weight=cfg.mem_weight,
                    mem_margin=cfg.mem_margin, stop_loss=cfg.stop_loss, mem_tol=cfg.mem_tol,
                    q_base=q_base, shift_weight=cfg.shift_key_weight,
                    whiten=whiten, gate=(cfg.gate_lo, cfg.gate_hi), image_gate=cfg.image_gate)
                if cfg.shrink_to is not None:
                    meta["value_scale"] = round(shrink_values(self.runner, cache, patches, cfg.shrink_to), 4)
                for l, p in patches.items():
                    tensors.update({f"patch.{l}.{k}": v.detach().cpu() for k, v in p.state().items()})
                meta.update(steps=steps, start_nll=round(start_nll, 4), final_nll=round(nll, 4),
                            image_gate=bool(next(iter(patches.values())).gated) if patches else False)
                # trained: the frozen neurons move into the layers' packed banks
                train_hooks.remove()
                contend(self.adapter, {})
                banked = BankedPatches(self.adapter, patches)
                undo.append(banked.remove)
                if latent is not None and self._gates(patches) is not None:
                    latent.set_gates(self._gates(patches, banked))
        except BaseException:
            for fn in reversed(undo):
                fn()
            raise
        return UniKEHandle(self.adapter, self.name, undo=_chain(undo), tensors=tensors, meta=meta,
                           ike_handle=ike_handle)

    def ffn_width(self, layer: int) -> int:
        return int(self.adapter.site(f"lm.ffn_key.{layer}").in_features)

    def _key_layers(self, patches: dict[int, EditPatch], key_site: str, compete: bool = False) -> None:
        """``key_site="first"``: every patch's keys read the first edited layer's FFN input;
        ``compete``: the patches compete in their banks (:mod:`mmke.editors.patch`)."""
        for p in patches.values():
            p.compete = compete
            if key_site == "first":
                p.key_layer = self.layers[0]

    def ffn_device(self, layer: int) -> torch.device:
        """Where layer ``layer``'s new neurons live: its FFN's device (they train in fp32 there)."""
        return module_device(self.adapter.site(f"lm.ffn_key.{layer}"))

    def _gates(self, patches: dict[int, EditPatch], banked: BankedPatches | None = None) -> dict | None:
        """With the image gate, each layer's shift is gated like the layer's new neurons, whose gate
        the same forward computed just before (site ``layer``: the FFN runs first): read from the
        patches being trained, or from the neuron banks once ``banked``."""
        if not patches or self.config.image_gate is None:
            return None
        if banked is None:
            return {l: (lambda p=p: p.last_gate) for l, p in patches.items()}
        return {l: BankGate(banked.banks[l], banked.owner) for l in patches}

    def _install_latent(self, tensors: dict[str, torch.Tensor], gates: dict | None = None) -> LatentShift:
        """The latent-IKE shift from the retrieved indices and the edit's own states in ``tensors``,
        each layer's row gated by ``gates`` (:meth:`_gates`)."""
        mem = self.memory
        know, center = {}, {}
        for j, l in enumerate(self.layers):
            dev = module_device(self.adapter.lm_layers()[l])  # where the shift's hook sees the states
            idx = tensors[f"latent.{l}.indices"].long()
            know[l] = torch.cat([mem.pos[j, idx].float(), tensors[f"latent.{l}.edit_pos"][None].float()]).to(dev)
            center[l] = mem.mean[j].to(dev)
        s = None if self.config.s == "dynamic" else float(self.config.s)
        enc = self.module if s is None else None
        return LatentShift(self.adapter, know, center, s=s, encoders=enc,
                           enc_index={l: j for j, l in enumerate(self.layers)}, tau=self.config.tau,
                           site=self.config.site, calibrated=self.config.s_calibrated, row_gate=gates)

    @torch.no_grad()
    def _set_offsets(self, patches: dict[int, EditPatch], retrieved: dict[int, list[int]]) -> None:
        """zeta (SPEC §5.3), per layer: a direction in the hidden space, scaled to beta times the
        mean |h_pos - h_neg| of the retrieved entries, added to every new neuron's value.
        truthfulness: W_zeta (mean EncTru(h_pos) - mean EncTru(h_neg)); semantic: mean EncSem(h_pos)
        - mean EncSem(h_neg); random: a seeded random direction."""
        mem, enc, cfg = self.memory, self.module, self.config
        for j, l in enumerate(self.layers):
            idx = torch.tensor(retrieved[l])
            hp, hn = mem.pos[j, idx].float(), mem.neg[j, idx].float()  # [K, H]
            if cfg.zeta == "truthfulness":
                v = enc.zeta_map[j](enc.truth(j, hp).mean(0) - enc.truth(j, hn).mean(0))
            elif cfg.zeta == "semantic":
                v = enc.semantic(j, hp).mean(0) - enc.semantic(j, hn).mean(0)
            else:
                v = torch.randn(hp.shape[-1], generator=torch.Generator().manual_seed(cfg.seed + l))
            scale = cfg.beta * (hp - hn).norm(dim=-1).mean()
            patches[l].offset.copy_((F.normalize(v, dim=-1) * scale).to(patches[l].offset))

    # ---- saved edits --------------------------------------------------------------------
    def load(self, path: str | Path) -> EditHandle:
        method, meta, t = read_saved_edit(path)
        if method != self.name:
            raise ValueError(f"{path}: saved by editor {method!r}, not {self.name!r}")
        if meta.get("layers") != self.layers:
            raise ValueError(f"{path}: edit of layers {meta.get('layers')}, this editor edits {self.layers}")
        undo: list = []
        ike_handle = None
        try:
            if meta.get("external") == "ike":
                if self.ike is None:
                    raise ValueError(f"{path}: an edit with prompt IKE; load it with external='ike'")
                ike_handle = self.ike.load(Path(path) / "ike")
                undo.append(ike_handle.remove)
            patches: dict[int, EditPatch] = {}
            if meta.get("intrinsic"):
                patches = {l: EditPatch.from_state({k.split(".", 2)[2]: v for k, v in t.items()
                                                    if k.startswith(f"patch.{l}.")}, meta.get("act", "relu"))
                           .to(self.ffn_device(l))
                           for l in self.layers}
                self._key_layers(patches, meta.get("key_site", "own"), bool(meta.get("compete", False)))
                banked = BankedPatches(self.adapter, patches)
                undo.append(banked.remove)
            if meta.get("external") == "latent":
                if self.memory is None or self.memory.digest() != meta.get("memory"):
                    raise ValueError(f"{path}: the edit's latent-IKE memory ({meta.get('memory')}) is not this "
                                     "editor's; load it with the weights it was made with")
                if meta.get("s") != self.config.s:
                    raise ValueError(f"{path}: saved with s={meta.get('s')!r}, this editor has s={self.config.s!r}")
                undo.append(self._install_latent(t, self._gates(patches, banked) if patches else None).remove)
        except BaseException:
            for fn in reversed(undo):
                fn()
            raise
        return UniKEHandle(self.adapter, self.name, undo=_chain(undo), tensors=t, meta=meta, ike_handle=ike_handle)


def _chain(fns: list):
    def undo() -> None:
        for fn in reversed(fns):
            fn()
    return undo


class UniKEHandle(EditHandle):
    """A UniKE edit; saving also writes the prompt-IKE part (variant unike-intrinsic-ike)."""

    def __init__(self, *args: Any, ike_handle: EditHandle | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ike_handle = ike_handle

    def save(self, path: str | Path) -> None:
        super().save(path)
        if self.ike_handle is not None:
            self.ike_handle.save(Path(path) / "ike")


# ---- mmke's variant ---------------------------------------------------------------------
class UniKEPlusConfig(UniKEConfig):
    key_init: Literal["trained", "whitened"] = "whitened"
    site: Literal["layer", "attn"] = "layer"
    s_calibrated: bool = True
    image_gate: tuple[float, float] | None = (0.3, 0.5)


class UniKEPlusEditor(UniKEEditor):
    """mmke's UniKE: whitened keys with a ramp gate, neurons gated on the edit's image, the shift on
    the layer output, calibrated s."""

    name = "unike-plus"
    Config = UniKEPlusConfig
    weights_name = "unike-plus"


# ---- the ablation variants of the paper's method (SPEC §5, §6) -----------------------------
class UniKEIntrinsicConfig(UniKEConfig):
    external: Literal["latent", "ike", "none"] = "none"
    zeta: Literal["truthfulness", "semantic", "random", "none"] = "none"


class UniKELatentConfig(UniKEConfig):
    intrinsic: bool = False
    zeta: Literal["truthfulness", "semantic", "random", "none"] = "none"


class UniKEIntrinsicIKEConfig(UniKEConfig):
    external: Literal["latent", "ike", "none"] = "ike"
    zeta: Literal["truthfulness", "semantic", "random", "none"] = "none"


class UniKENoCollabConfig(UniKEConfig):
    s: float | Literal["dynamic"] = 0.5
    zeta: Literal["truthfulness", "semantic", "random", "none"] = "none"


class UniKEIntrinsicEditor(UniKEEditor):
    """Intrinsic editing only: new FFN neurons in the last L layers."""

    name = "unike-intrinsic"
    Config = UniKEIntrinsicConfig


class UniKELatentEditor(UniKEEditor):
    """Latent IKE only (dynamic s)."""

    name = "unike-latent"
    Config = UniKELatentConfig


class UniKEIntrinsicIKEEditor(UniKEEditor):
    """New FFN neurons + ordinary prompt IKE."""

    name = "unike-intrinsic-ike"
    Config = UniKEIntrinsicIKEConfig


class UniKENoCollabEditor(UniKEEditor):
    """New FFN neurons + latent IKE with a fixed s and no zeta (no knowledge collaboration)."""

    name = "unike-no-collab"
    Config = UniKENoCollabConfig
