"""Where things are in each Hugging Face vision-language family: a :class:`FamilyLayout` per
family (the language model's decoder layers, a layer's FFN keys / values and attention output, the
vision encoder and connector, how the last hidden state is computed and how many image tokens an
image takes), looked up from a model's config with :func:`layout_for`. :class:`~mmke.models.hf.HFAdapter`
has no per-family branches; adding a family is one :func:`_register` call here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn


# --------------------------------------------------------------------------------------
# How the last hidden state is computed (per family)
# --------------------------------------------------------------------------------------
def _image_token_id(config) -> int:
    for key in ("image_token_id", "image_token_index"):
        v = getattr(config, key, None)
        if v is not None:
            return int(v)
    raise ValueError(f"{config.model_type}: the config names no image token (image_token_id)")


def blip2_image_features(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Vision encoder -> Q-Former over the learned queries -> language projection: [N, Q, H_lm]."""
    image_embeds = model.vision_model(pixel_values=pixel_values, return_dict=True).last_hidden_state
    image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    queries = model.query_tokens.expand(image_embeds.shape[0], -1, -1)
    q_out = model.qformer(query_embeds=queries, encoder_hidden_states=image_embeds.to(queries.dtype),
                          encoder_attention_mask=image_mask, return_dict=True).last_hidden_state
    proj = model.language_projection
    return proj(q_out.to(proj.weight.dtype))


def _blip2_hidden(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """BLIP-2 with a decoder-only LM: embed, put the projected queries on the image placeholders,
    run the LM's base model. Without pixels this is the OPT model on the text alone."""
    ids, attn = inputs["input_ids"], inputs["attention_mask"]
    emb = model.get_input_embeddings()(ids)
    pixels = inputs.get("pixel_values")
    if pixels is not None:
        feats = blip2_image_features(model, pixels)
        mask = ids == _image_token_id(model.config)
        if int(mask.sum()) != feats.shape[0] * feats.shape[1]:
            raise ValueError(f"{int(mask.sum())} image placeholders for {feats.shape[0]} images of "
                             f"{feats.shape[1]} query tokens")
        emb = emb.masked_scatter(mask.unsqueeze(-1).to(emb.device), feats.to(emb.device, emb.dtype))
    lm = model.language_model
    cache = {k: inputs[k] for k in ("cache", "use_cache") if k in inputs}  # a shared prefix (HFAdapter)
    return lm.base_model(inputs_embeds=emb, attention_mask=attn, return_dict=True, **cache).last_hidden_state


def _native_hidden(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """Families whose ``model.model`` (the base VLM) merges image features itself."""
    kwargs = {k: v for k, v in inputs.items() if v is not None}
    return model.model(**kwargs, return_dict=True).last_hidden_state


def _mrope_positions(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor | None:
    """Qwen2-VL / Qwen2.5-VL: M-RoPE position ids [3, B, T] of whole rows (the model's own
    ``get_rope_index``); None for text-only rows (plain positions)."""
    if inputs.get("image_grid_thw") is None:
        return None
    kw = {k: inputs[k] for k in ("image_grid_thw", "second_per_grid_ts") if inputs.get(k) is not None}
    pos, _ = model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                        attention_mask=inputs["attention_mask"], **kw)
    return pos


# --------------------------------------------------------------------------------------
# Number of image placeholders (fixed-count families)
# --------------------------------------------------------------------------------------
def _blip2_image_tokens(model: nn.Module) -> int:
    return int(model.config.num_query_tokens)


def _llava_image_tokens(model: nn.Module) -> int:
    cfg = model.config
    vc = cfg.vision_config
    n = (int(vc.image_size) // int(vc.patch_size)) ** 2
    tower = model.model.vision_tower
    has_cls = hasattr(getattr(tower, "vision_model", tower), "embeddings") and hasattr(
        getattr(tower, "vision_model", tower).embeddings, "class_embedding")
    n += int(has_cls)
    if cfg.vision_feature_select_strategy == "default":  # LLaVA drops the first feature
        n -= 1
    return n


# --------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FamilyLayout:
    """Where one family keeps its parts. Paths are dotted attribute paths from the top model
    (``lm_layers``, ``vision``, ``connector``) or from one decoder layer (the ``ffn*`` and
    ``attn_out`` entries). A site given as several paths is exposed as a :class:`ModuleGroup`."""

    family: str
    model_types: tuple[str, ...]
    lm_layers: str
    ffn_key: str
    ffn_value: str
    attn_out: str
    ffn: tuple[str, ...]
    vision: str | tuple[str, ...]
    connector: tuple[str, ...]
    hidden: Callable[[nn.Module, dict[str, Any]], torch.Tensor]
    # placeholders per image; None: the processor expands the image marker (count depends on image)
    image_tokens: Callable[[nn.Module], int] | None
    image_text: str = "{image}"  # where the image goes when the prompt has no marker
    image_before_bos: bool = False  # BLIP-2 puts its query placeholders before BOS
    tested: bool = False  # covered by tests on a tiny random instance (else: a warning on load)
    # a text prefix shared by every row (Example.context) runs once and its KV cache is reused
    shares_prefix: bool = True
    # position ids of whole rows, for families whose positions do not follow from the cache length
    # alone (M-RoPE); the rows after a shared prefix get their slice of them
    positions: Callable[[nn.Module, dict[str, Any]], torch.Tensor | None] | None = None


_LLAMA_LIKE = dict(ffn_key="mlp.up_proj", ffn_value="mlp.down_proj", attn_out="self_attn.o_proj",
                   ffn=("mlp",))

LAYOUTS: dict[str, FamilyLayout] = {}


def _register(layout: FamilyLayout) -> None:
    for t in layout.model_types:
        LAYOUTS[t] = layout


_register(FamilyLayout(
    family="blip2-opt", model_types=("blip-2",),
    lm_layers="language_model.model.decoder.layers",
    ffn_key="fc1", ffn_value="fc2", attn_out="self_attn.out_proj",
    ffn=("fc1", "fc2"),  # OPT has no FFN submodule: the two projections are grouped
    vision="vision_model",
    connector=("query_tokens", "qformer", "language_projection"),
    hidden=_blip2_hidden, image_tokens=_blip2_image_tokens, image_before_bos=True, tested=True))

_register(FamilyLayout(
    family="llava", model_types=("llava",),
    lm_layers="model.language_model.layers", **_LLAMA_LIKE,
    vision="model.vision_tower", connector=("model.multi_modal_projector",),
    hidden=_native_hidden, image_tokens=_llava_image_tokens, image_text="{image}\n", tested=True))

# The families below expand the image marker with their own processor (the number of image tokens
# depends on the image); each is checked on a tiny random instance of its exact transformers class
# saved with save_pretrained (tests/test_families.py): outputs equal the model's own forward.
_register(FamilyLayout(  # LLaVA-NeXT (v1.6) and LLaVA-OneVision: any-resolution tiles + image_newline
    family="llava-next", model_types=("llava_next", "llava_onevision"),
    lm_layers="model.language_model.layers", **_LLAMA_LIKE,
    vision="model.vision_tower", connector=("model.multi_modal_projector", "model.image_newline"),
    hidden=_native_hidden, image_tokens=None, image_text="{image}\n", tested=True))

_register(FamilyLayout(  # Qwen2-VL / Qwen2.5-VL: the patch merger (the connector) sits inside
    # model.visual, so the vision site is the patch embedding + blocks, apart from it
    family="qwen2-vl", model_types=("qwen2_vl", "qwen2_5_vl"),
    lm_layers="model.language_model.layers", **_LLAMA_LIKE,
    vision=("model.visual.patch_embed", "model.visual.blocks"), connector=("model.visual.merger",),
    hidden=_native_hidden, image_tokens=None, image_text="<|vision_start|>{image}<|vision_end|>", tested=True,
    positions=_mrope_positions))

_register(FamilyLayout(  # Idefics3 / SmolVLM: image split into tiles; pixel_attention_mask from the processor
    family="idefics3", model_types=("idefics3", "smolvlm"),
    lm_layers="model.text_model.layers", **_LLAMA_LIKE,
    vision="model.vision_model", connector=("model.connector",),
    hidden=_native_hidden, image_tokens=None, image_text="{image}", tested=True))


def layout_for(config) -> FamilyLayout:
    """The layout of a model config, or a clear error listing the supported families."""
    mt = getattr(config, "model_type", None)
    if mt not in LAYOUTS:
        fams = sorted({f"{lay.family} ({', '.join(lay.model_types)})" for lay in LAYOUTS.values()})
        raise ValueError(f"unsupported model_type {mt!r}; supported families: {'; '.join(fams)}")
    layout = LAYOUTS[mt]
    if mt == "blip-2" and not getattr(config, "use_decoder_only_language_model", True):
        raise ValueError("BLIP-2 with an encoder-decoder language model (Flan-T5) is not supported; "
                         "use a BLIP-2 OPT checkpoint")
    return layout


class ModuleGroup(nn.Module):
    """Several modules (and loose parameters) of a model exposed as one edit site.

    Not registered in the model (its state_dict is unchanged); it only gathers parameters, so
    ``parameters()`` works but it has no ``forward`` and cannot carry hooks."""

    def __init__(self, modules: dict[str, nn.Module], params: dict[str, nn.Parameter]) -> None:
        super().__init__()
        for k, m in modules.items():
            self.add_module(k.replace(".", "_"), m)
        for k, p in params.items():
            self.register_parameter(k.replace(".", "_"), p)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("ModuleGroup only groups the parameters of several modules; it has no forward")


def _resolve(root: nn.Module, paths: Sequence[str]) -> nn.Module:
    modules: dict[str, nn.Module] = {}
    params: dict[str, nn.Parameter] = {}
    for p in paths:
        obj: Any = root
        for part in p.split("."):
            obj = getattr(obj, part)
        if isinstance(obj, nn.Parameter):
            params[p] = obj
        elif isinstance(obj, nn.Module):
            modules[p] = obj
        else:
            raise TypeError(f"{p} is a {type(obj).__name__}, not a module or parameter")
    if len(modules) == 1 and not params:
        return next(iter(modules.values()))
    return ModuleGroup(modules, params)
