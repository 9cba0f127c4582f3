"""Registries of models, methods and tasks: adding one is one entry here plus its own file."""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from typing import Any

from mmke.tasks import TASKS  # noqa: F401  (the task registry lives with the task specs)


@dataclass(frozen=True)
class Entry:
    name: str
    target: str  # "module:attribute", imported on first use
    description: str

    def load(self) -> Any:
        mod, attr = self.target.split(":")
        return getattr(importlib.import_module(mod), attr)


METHODS: dict[str, Entry] = {e.name: e for e in [
    Entry("null", "mmke.editors.null:NullEditor",
          "changes nothing: the unedited model, and the protocol's check (locality exactly 1)"),
    Entry("ft-lm", "mmke.editors.ft:FTEditor", "fine-tune the last LM FFN layer on the edit"),
    Entry("ft-vision", "mmke.editors.ft:FTVisionEditor", "fine-tune the vision tower and connector on the edit"),
    Entry("ike", "mmke.editors.ike:IKEEditor",
          "in-context editing: the new fact + k=32 retrieved demonstrations after the image (MMEdit reference)"),
    Entry("ike-prefix", "mmke.editors.ike:IKEPrefixEditor",
          "mmke's IKE: the same demonstrations before the image, one shared KV cache for a case's five inputs"),
    Entry("t-patcher", "mmke.editors.tpatcher:TPatcherEditor",
          "one new neuron per mistaken target token in the last LM FFN layer (activation + memory losses)"),
    Entry("mend", "mmke.editors.mend:MENDEditor",
          "trained low-rank transform of the edit gradient at both FFN matrices of the last three LM layers"),
    Entry("mend-vision", "mmke.editors.mend:MENDVisionEditor",
          "MEND placed on the vision side (connector and last vision layers)"),
    Entry("ke", "mmke.editors.ke:KEEditor",
          "Knowledge Editor: a hyper-network conditioned on the edit's text maps the gradient to an update"),
    Entry("serac", "mmke.editors.serac:SERACEditor",
          "trained text-only scope classifier + counterfactual model answering in-scope inputs with the edit in view"),
    Entry("serac-mm", "mmke.editors.serac:SERACMMEditor",
          "SERAC with mmke's image-aware scope classifier: the edit's question about another image is out of scope"),
    Entry("serac-mm-gated", "mmke.editors.serac:SERACMMGatedEditor",
          "serac-mm whose edits made on an image answer only inputs whose image resembles the edit's (a hard gate)"),
    Entry("grace", "mmke.editors.grace:GraceEditor",
          "GRACE: a shared codebook of keys and values with deferral radii at one late LM FFN value projection"),
    Entry("grace-mm", "mmke.editors.grace:GraceMMEditor",
          "mmke's GRACE: each codebook entry made on an image answers only inputs whose image resembles the edit's"),
    Entry("wise", "mmke.editors.wise:WiseEditor",
          "WISE: a routed side memory of one late LM FFN value matrix, trained in masked shards, TIES-merged"),
    Entry("unike", "mmke.editors.unike:UniKEEditor",
          "UniKE (the paper): new FFN neurons + latent IKE at the self-attention output, collaborating "
          "through semantic/truthfulness encoders"),
    Entry("unike-plus", "mmke.editors.unike:UniKEPlusEditor",
          "mmke's UniKE: whitened keys with a ramp gate, the shift on the layer output, a calibrated floor under s"),
    Entry("unike-intrinsic", "mmke.editors.unike:UniKEIntrinsicEditor",
          "UniKE ablation: intrinsic editing only (new FFN neurons in the last layers)"),
    Entry("unike-latent", "mmke.editors.unike:UniKELatentEditor", "UniKE ablation: latent IKE only"),
    Entry("unike-intrinsic-ike", "mmke.editors.unike:UniKEIntrinsicIKEEditor",
          "UniKE ablation: intrinsic editing + ordinary prompt IKE"),
    Entry("unike-no-collab", "mmke.editors.unike:UniKENoCollabEditor",
          "UniKE ablation: intrinsic editing + latent IKE, fixed s, no truthfulness guidance"),
]}

MODELS: dict[str, Entry] = {e.name: e for e in [
    Entry("default", "mmke.models.default:DefaultAdapter",
          "SmolLM2-135M-Instruct + bundled vision tower (runs on a CPU)"),
    Entry("tiny-blip2", "mmke.models.tiny:tiny_blip2", "random tiny BLIP-2 OPT (tests, no download)"),
    Entry("tiny-llava", "mmke.models.tiny:tiny_llava", "random tiny LLaVA (tests, no download)"),
    Entry("tiny-minigpt4", "mmke.models.minigpt4:tiny_minigpt4",
          "random tiny MiniGPT-4 (tests, no download); a real release loads as hf:<folder with minigpt4.json>"),
]}
HF_PREFIX = "hf:"  # --model hf:<local path or hub id> loads through AutoModelForImageTextToText
# (or, for a folder holding minigpt4.json, as MiniGPT-4 from its release's parts: mmke.models.minigpt4)


def load_model(name: str, *, device: str | None = None, dtype: str = "fp32", device_map: Any = None,
               **kwargs: Any):
    """Build a model adapter from a registry name or ``hf:<path-or-id>``, in ``dtype`` (fp32, bf16,
    fp16) on ``device`` or spread by ``device_map`` (``"auto"``, a dict or a JSON file; accelerate)
    — see :mod:`mmke.models.placement`. ``hf:`` checkpoints load straight into place; registered
    models are built on the CPU in fp32, then cast and placed."""
    from mmke.models.placement import Placement, place_model

    placement = Placement(device=device, dtype=dtype, device_map=device_map)
    if name.startswith(HF_PREFIX):
        from mmke.models.hf import load_hf

        return load_hf(name[len(HF_PREFIX):], placement=placement, **kwargs)
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(MODELS)} or hf:<path-or-hub-id>")
    adapter = MODELS[name].load()(**kwargs)
    place_model(adapter.model, placement, no_split={type(layer).__name__ for layer in adapter.lm_layers()})
    return adapter


def parse_option_sets(sets: list[str]) -> dict[str, Any]:
    """``["steps=50", "layer=ffn"]`` (``mmke run --set``) -> {"steps": 50, "layer": "ffn"}: each value
    read as JSON where it is JSON, else kept as text."""
    out: dict[str, Any] = {}
    for s in sets:
        if "=" not in s:
            raise ValueError(f"--set expects key=value, got {s!r}")
        k, v = s.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def editor_class(method: str):
    if method not in METHODS:
        raise KeyError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    return METHODS[method].load()
