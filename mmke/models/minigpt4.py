"""MiniGPT-4 (Zhu et al., 2023, arXiv 2304.10592) assembled from Hugging Face parts, as the original is.

The original (Vision-CAIR/MiniGPT-4, first release, commit f1a33af) is a frozen BLIP-2 vision side, a
trained linear projection, and a frozen Vicuna::

    image -> ln_vision(EVA ViT-g)   -> Q-Former over 32 learned queries -> llama_proj -> 32 LLaMA embeddings

Parts (original ``minigpt4/models/mini_gpt4.py`` -> :class:`MiniGPT4`): ``visual_encoder`` +
``ln_vision`` (EVA ViT-g, 39 layers, 224 px) -> ``vision_model``, a ``Blip2VisionModel`` whose
``post_layernorm`` is ``ln_vision``; ``query_tokens`` [1, 32, 768] -> ``query_tokens``; ``Qformer.bert``
(query path only) -> ``qformer``, a ``Blip2QFormerModel`` (no text FFNs, as in BLIP-2's generation
checkpoints); ``llama_proj`` (Linear 768 -> LM hidden) -> ``llama_proj``; ``llama_model`` (Vicuna) ->
``language_model``, a ``LlamaForCausalLM``.

The original takes its ViT and Q-Former from LAVIS's ``blip2_pretrained_flant5xxl.pth`` (its
``q_former_model``); Hugging Face's ``Salesforce/blip2-flan-t5-xxl`` was converted from that LAVIS
model (``pretrain_flant5xxl`` in transformers' BLIP-2 conversion script): point ``blip2`` at it. Only
its ``vision_model.*``, ``qformer.*`` and ``query_tokens`` are read (its T5 is never loaded). Images
are resized to 224x224 (bicubic) and normalised with CLIP's mean and std, as the original's
``Blip2ImageEvalProcessor`` does (the BLIP-2 folder's ``preprocessor_config.json``, when present).

**Pointing mmke at a release.** A folder holding ``minigpt4.json``; relative paths are relative to it::

    {"checkpoint": "pretrained_minigpt4.pth",   # the release's checkpoint: {"model": {"llama_proj.weight",
                                                #   "llama_proj.bias"}} (read with weights_only=True), or a
                                                #   .safetensors file with those two tensors
     "llm": "vicuna-7b",                        # a Hugging Face LLaMA/Vicuna folder (weights + tokenizer)
     "blip2": "blip2-flan-t5-xxl",              # a Hugging Face BLIP-2 folder (vision, Q-Former, queries)
     "template": "chat"}                        # optional: "chat", "mmedit" or {"image": ..., "text": ...}

then ``mmke run --model hf:FOLDER ...`` (or ``hf:FOLDER/minigpt4.json``; :func:`load_minigpt4` in
Python). Missing files, unreadable or non-tensor checkpoints, and missing or mis-shaped weights are
errors that name the file and the key.

**Prompt template** (``{prompt}`` is mmke's templated prompt, e.g. ``"Question: ... Short answer:"``;
the target follows it, with its leading space):

- ``chat`` (default): the original's conversation (``minigpt4/conversation/conversation.py``,
  ``CONV_VISION``: system prompt, roles ``Human``/``Assistant``, separator ``###``) with the image
  uploaded and the question asked::

      Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I provide
      it to you. Please answer my questions.###Human: <Img><ImageHere></Img> {prompt}###Assistant:

  A text-only input is the same conversation without the image message (``...###Human:
  {prompt}###Assistant:``), as the original's ``Chat`` renders a question asked before any upload.
- ``mmedit``: the MMEdit reference's editing input (zjunlp/EasyEdit,
  ``easyeditor/trainer/blip2_models/mini_gpt4.py``: ``vqa_prompt = '###Human: <Img><ImageHere></Img> '``
  followed by the question and target, no system prompt, no ``###Assistant:``); text-only inputs
  are the prompt alone. Use it to compare with published MMEdit / UniKE numbers on MiniGPT-4.

As in the original's ``get_context_emb``, BOS comes first and the text segments between images are
tokenised separately. Known differences from the MMEdit reference: it tokenises ``"</Img> "`` apart
from the question (one extra ``"▁"`` token with LLaMA's tokenizer) and gives text-only inputs no BOS;
mmke gives every input BOS and tokenises the text after the image as one segment.

``<ImageHere>`` is added to the tokenizer as a special token (its id lies past the LM's vocabulary);
its placeholders' own embeddings are never looked up: the 32 projected queries replace them (``image_mask`` and every
editor see them as image positions). Edit sites are those of :class:`~mmke.models.hf.HFAdapter`:
LLaMA FFN keys/values (``mlp.up_proj`` / ``mlp.down_proj``), ``vision`` = the ViT, ``connector`` =
queries + Q-Former + ``llama_proj``.
"""

from __future__ import annotations

import functools
import json
import pickle
from pathlib import Path
from typing import Any, Sequence

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from torch import nn

from mmke.models.base import Example
from mmke.models.hf import HFAdapter
from mmke.models.layouts import FamilyLayout, _register

SPEC_FILE = "minigpt4.json"
IMAGE_MARKER = "<ImageHere>"
PROJ_KEYS = ("llama_proj.weight", "llama_proj.bias")
#: CONV_VISION.system of the original (minigpt4/conversation/conversation.py)
SYSTEM = ("Give the following image: <Img>ImageContent</Img>. "
          "You will be able to see the image once I provide it to you. Please answer my questions.")


# ---- Prompt templates -------------------------------------------------------------------------
class Template(BaseModel):
    """How a prompt is wrapped: ``image`` for inputs with an image (one ``<ImageHere>``, one
    ``{prompt}``), ``text`` for text-only inputs (one ``{prompt}``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    image: str
    text: str = "{prompt}"

    @model_validator(mode="after")
    def _check(self) -> "Template":
        if self.image.count(IMAGE_MARKER) != 1 or self.image.count("{prompt}") != 1:
            raise ValueError(f"template.image must contain {IMAGE_MARKER} once and {{prompt}} once: {self.image!r}")
        if self.text.count("{prompt}") != 1 or IMAGE_MARKER in self.text:
            raise ValueError(f"template.text must contain {{prompt}} once and no {IMAGE_MARKER}: {self.text!r}")
        return self


TEMPLATES: dict[str, Template] = {
    "chat": Template(image=f"{SYSTEM}###Human: <Img>{IMAGE_MARKER}</Img> {{prompt}}###Assistant:",
                     text=f"{SYSTEM}###Human: {{prompt}}###Assistant:"),
    "mmedit": Template(image=f"###Human: <Img>{IMAGE_MARKER}</Img> {{prompt}}", text="{prompt}"),
}


def resolve_template(template: str | Template | dict) -> Template:
    """A :class:`Template` from a name of :data:`TEMPLATES`, a dict, or itself."""
    if isinstance(template, Template):
        return template
    if isinstance(template, dict):
        return Template(**template)
    if template not in TEMPLATES:
        raise ValueError(f"unknown MiniGPT-4 template {template!r}; known: {', '.join(TEMPLATES)} "
                         "(or {\"image\": ..., \"text\": ...})")
    return TEMPLATES[template]


# ---- The model --------------------------------------------------------------------------------
@functools.cache
def _config_class():
    from transformers import Blip2QFormerConfig, Blip2VisionConfig, LlamaConfig, PretrainedConfig

    class MiniGPT4Config(PretrainedConfig):
        """The three parts' configs, the number of query tokens and the image placeholder's id."""

        model_type = "minigpt4"

        def __init__(self, text_config: LlamaConfig | None = None, vision_config: Blip2VisionConfig | None = None,
                     qformer_config: Blip2QFormerConfig | None = None, num_query_tokens: int = 32,
                     image_token_id: int | None = None, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            # after PretrainedConfig.__init__, which would reset these (the modules' own) configs' attention
            self.text_config, self.vision_config, self.qformer_config = text_config, vision_config, qformer_config
            self.num_query_tokens = num_query_tokens
            self.image_token_id = image_token_id

    return MiniGPT4Config


class MiniGPT4(nn.Module):
    """Vision encoder + query tokens + Q-Former + ``llama_proj`` + LLaMA (see the module docstring)."""

    def __init__(self, vision_model: nn.Module, qformer: nn.Module, query_tokens: torch.Tensor,
                 llama_proj: nn.Linear, language_model: nn.Module) -> None:
        super().__init__()
        self.config = _config_class()(text_config=language_model.config, vision_config=vision_model.config,
                                      qformer_config=qformer.config, num_query_tokens=query_tokens.shape[1])
        self.vision_model = vision_model
        self.query_tokens = nn.Parameter(query_tokens.detach().clone())
        self.qformer = qformer
        self.llama_proj = llama_proj
        self.language_model = language_model

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``encode_img`` of the original: [N, 3, H, W] -> [N, 32, H_lm]."""
        image_embeds = self.vision_model(pixel_values=pixel_values, return_dict=True).last_hidden_state
        atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        q = self.qformer(query_embeds=queries, encoder_hidden_states=image_embeds, encoder_attention_mask=atts,
                         return_dict=True).last_hidden_state
        return self.llama_proj(q.to(self.llama_proj.weight.device, self.llama_proj.weight.dtype))

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden states [B, T, H_lm]: token embeddings with the projected queries on the
        image placeholders (whose own embedding is never looked up)."""
        mask = input_ids == self.config.image_token_id
        emb = self.get_input_embeddings()(input_ids.masked_fill(mask, 0))
        if pixel_values is not None:
            feats = self.image_features(pixel_values)
            if int(mask.sum()) != feats.shape[0] * feats.shape[1]:
                raise ValueError(f"{int(mask.sum())} image placeholders for {feats.shape[0]} images of "
                                 f"{feats.shape[1]} query tokens")
            emb = emb.masked_scatter(mask.unsqueeze(-1).to(emb.device), feats.to(emb.device, emb.dtype))
        elif bool(mask.any()):
            raise ValueError("image placeholders in a batch without pixel_values")
        return self.language_model.model(inputs_embeds=emb, attention_mask=attention_mask,
                                         return_dict=True).last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V]."""
        return self.get_output_embeddings()(self.hidden(input_ids, attention_mask, pixel_values))


def _hidden(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    return model.hidden(inputs["input_ids"], inputs["attention_mask"], inputs.get("pixel_values"))


_register(FamilyLayout(
    family="minigpt4", model_types=("minigpt4",),
    lm_layers="language_model.model.layers",
    ffn_key="mlp.up_proj", ffn_value="mlp.down_proj", attn_out="self_attn.o_proj", ffn=("mlp",),
    vision="vision_model", connector=("query_tokens", "qformer", "llama_proj"),
    hidden=_hidden, image_tokens=lambda m: int(m.config.num_query_tokens), tested=True))


# ---- The adapter ------------------------------------------------------------------------------
def add_image_token(tokenizer: Any) -> int:
    """Register ``<ImageHere>`` as a special token of ``tokenizer`` (in place) and return its id."""
    from tokenizers import AddedToken

    if IMAGE_MARKER not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_MARKER, special=True, normalized=False)], special_tokens=True)
    return int(tokenizer.convert_tokens_to_ids(IMAGE_MARKER))


class MiniGPT4Adapter(HFAdapter):
    """:class:`HFAdapter` for :class:`MiniGPT4`: the prompt goes into ``template`` (a name of
    :data:`TEMPLATES` or a :class:`Template`), and the text between image placeholders is
    tokenised segment by segment, as the original does. A prompt that already contains
    ``<ImageHere>`` is used as it is. ``tokenizer`` gains the ``<ImageHere>`` token."""

    def __init__(self, model: MiniGPT4, tokenizer: Any, image_processor: Any, *,
                 template: str | Template | dict = "chat", name: str | None = None) -> None:
        self.template = resolve_template(template)
        model.config.image_token_id = add_image_token(tokenizer)
        super().__init__(model, tokenizer, image_processor, use_processor=False, name=name or "minigpt4")

    def _text(self, ex: Example, expanded: str) -> tuple[str, bool]:
        marker = self.image_token
        if ex.image is None:
            return self.template.text.replace("{prompt}", ex.prompt.replace(marker, ""), 1), False
        if marker in ex.prompt:
            return super()._text(ex, expanded)
        return self.template.image.replace(marker, expanded, 1).replace("{prompt}", ex.prompt, 1), False

    def _tok(self, s: str) -> list[int]:
        marker = self.image_token
        if marker not in s:
            return super()._tok(s)
        ids: list[int] = []
        for i, seg in enumerate(s.split(marker)):
            if i:
                ids.append(self.image_token_id)
            ids += super()._tok(seg)
        return ids


# ---- Loading a release ------------------------------------------------------------------------
class MiniGPT4Spec(BaseModel):
    """The contents of ``minigpt4.json`` (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")
    checkpoint: str
    llm: str
    blip2: str
    template: str | Template = "chat"


def read_spec(path: str | Path) -> tuple[Path, MiniGPT4Spec]:
    """(the JSON file, its validated contents) of a folder holding ``minigpt4.json`` or the file itself."""
    p = Path(path).expanduser()
    f = p / SPEC_FILE if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"{f}: no such file (a MiniGPT-4 folder holds {SPEC_FILE}: checkpoint, llm, blip2)")
    try:
        raw = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{f}: a JSON object with checkpoint, llm and blip2 is expected, got {type(raw).__name__}")
    try:
        spec = MiniGPT4Spec(**raw)
    except ValidationError as e:
        errs = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'file'}: {err['msg']}" for err in e.errors())
        raise ValueError(f"{f}: {errs} (fields: checkpoint, llm, blip2, template)") from None
    if isinstance(spec.template, str):
        resolve_template(spec.template)  # an unknown name fails here, naming the choices
    return f, spec


def _rel(f: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else f.parent / p


def _last_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.lstrip().startswith("Check the doc")]
    return lines[-1] if lines else type(e).__name__


def load_projection(path: Path, d_in: int, d_out: int) -> dict[str, torch.Tensor]:
    """``llama_proj.weight`` [d_out, d_in] and ``llama_proj.bias`` [d_out] from the release's
    checkpoint (``torch.load(weights_only=True)``; its ``"model"`` dict) or a .safetensors file."""
    if not path.is_file():
        raise FileNotFoundError(f"MiniGPT-4 checkpoint {path}: no such file (the release's pretrained_minigpt4.pth)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"MiniGPT-4 checkpoint {path}: not a readable safetensors file ({e})") from e
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            glob = next((ln.split("GLOBAL", 1)[1].split()[0] for ln in str(e).splitlines() if "Unsupported global" in ln
                         and "GLOBAL" in ln), None)
            if glob is not None:
                raise ValueError(f"MiniGPT-4 checkpoint {path}: holds a {glob} object, not only tensors and plain "
                                 "containers; mmke reads checkpoints with torch.load(weights_only=True) and never "
                                 "unpickles arbitrary objects (save its 'model' dict of tensors alone)") from e
            raise ValueError(f"MiniGPT-4 checkpoint {path}: not a readable PyTorch checkpoint "
                             f"(torch.load(weights_only=True) failed: {_last_line(e)})") from e
        except Exception as e:  # truncated / corrupted archives raise RuntimeError, EOFError, ...
            raise ValueError(f"MiniGPT-4 checkpoint {path}: not a readable PyTorch checkpoint "
                             f"({type(e).__name__}: {_last_line(e)})") from e
        if not isinstance(obj, dict):
            raise ValueError(f"MiniGPT-4 checkpoint {path}: a dict with 'model' is expected, got {type(obj).__name__}")
        state = obj["model"] if isinstance(obj.get("model"), dict) else obj
    missing = [k for k in PROJ_KEYS if k not in state]
    if missing:
        have = ", ".join(sorted(map(str, state))[:5]) or "none"
        raise ValueError(f"MiniGPT-4 checkpoint {path}: no {' or '.join(missing)} (keys found: {have}); the "
                         "release's file holds {'model': {'llama_proj.weight', 'llama_proj.bias'}}")
    for k, shape in {"llama_proj.weight": (d_out, d_in), "llama_proj.bias": (d_out,)}.items():
        t = state[k]
        if not torch.is_tensor(t) or tuple(t.shape) != shape:
            got = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
            raise ValueError(f"MiniGPT-4 checkpoint {path}: {k} is {got}, expected {shape} (Q-Former hidden "
                             f"{d_in} -> LM hidden {d_out}): does the checkpoint belong to this LLM?")
    return {k: state[k] for k in PROJ_KEYS}


def read_prefixed(folder: Path, prefixes: Sequence[str]) -> dict[str, torch.Tensor]:
    """The tensors of a Hugging Face checkpoint folder whose names start with ``prefixes``, reading
    only the shards that hold them (safetensors, or ``pytorch_model*.bin`` with weights_only)."""
    from safetensors import safe_open

    pre = tuple(prefixes)
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = folder / index_name
        if index.is_file():
            files = sorted({v for k, v in json.loads(index.read_text())["weight_map"].items() if k.startswith(pre)})
        elif (folder / single).is_file():
            files = [single]
        else:
            continue
        out: dict[str, torch.Tensor] = {}
        for name in files:
            if name.endswith(".safetensors"):
                with safe_open(str(folder / name), framework="pt") as f:
                    out.update({k: f.get_tensor(k) for k in f.keys() if k.startswith(pre)})
            else:
                state = torch.load(folder / name, map_location="cpu", weights_only=True)
                out.update({k: v for k, v in state.items() if k.startswith(pre)})
        return out
    raise FileNotFoundError(f"{folder}: no model.safetensors[.index.json] or pytorch_model.bin[.index.json] "
                            "(a Hugging Face BLIP-2 checkpoint folder is expected)")


def _load_part(cls: type, config: Any, state: dict[str, torch.Tensor], prefix: str, folder: Path) -> nn.Module:
    """``cls(config)`` built without initialisation (on ``meta``) and given the checkpoint's tensors."""
    with torch.device("meta"):
        module = cls(config)
    own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    expected = set(module.state_dict())
    missing = sorted(expected - set(own))
    if missing:
        raise ValueError(f"{folder}: the BLIP-2 checkpoint lacks {len(missing)} {prefix}* tensors "
                         f"(first: {prefix}{missing[0]})")
    module.load_state_dict({k: own[k] for k in expected}, strict=True, assign=True)
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:  # a tensor the checkpoint does not hold (a non-persistent buffer of a newer transformers)
        raise ValueError(f"{cls.__name__}: {left[0]!r} is not in the checkpoint and cannot be loaded from {folder}")
    return module.eval()


def _blip2_image_processor(folder: Path | None, size: int):
    import transformers

    cls = getattr(transformers, "BlipImageProcessorPil", None) or transformers.BlipImageProcessor
    if folder is not None and (folder / "preprocessor_config.json").is_file():
        proc = cls.from_pretrained(str(folder))
        got = (proc.size.get("height"), proc.size.get("width"))
        if got != (size, size):
            raise ValueError(f"{folder}/preprocessor_config.json: images of {got}, but the vision encoder "
                             f"takes {size}x{size}")
        return proc
    return cls(size={"height": size, "width": size})  # bicubic, CLIP mean/std: Blip2ImageEvalProcessor


def load_minigpt4(path: str | Path, *, placement: Any = None, device: str | None = None, dtype: Any = None,
                  device_map: Any = None) -> MiniGPT4Adapter:
    """Assemble MiniGPT-4 from a release described by ``minigpt4.json`` (a folder holding it, or the
    file): BLIP-2's vision encoder, queries and Q-Former from the ``blip2`` folder, ``llama_proj``
    from ``checkpoint``, LLaMA/Vicuna and its tokenizer from ``llm``; then cast and placed as
    ``placement`` (or ``device`` / ``dtype`` / ``device_map``) says."""
    from transformers import (AutoConfig, AutoTokenizer, Blip2Config, Blip2QFormerModel, Blip2VisionModel,
                              LlamaForCausalLM)

    from mmke.models.placement import Placement, dtype_name, parse_dtype, place_model

    if placement is None:
        placement = Placement(device=device, device_map=device_map,
                              dtype=dtype_name(parse_dtype(dtype)) if dtype is not None else "fp32")
    f, spec = read_spec(path)
    llm, blip2, ckpt = _rel(f, spec.llm), _rel(f, spec.blip2), _rel(f, spec.checkpoint)
    for what, d in (("llm", llm), ("blip2", blip2)):
        if not (d / "config.json").is_file():
            raise FileNotFoundError(f"{f}: {what} {d}: no config.json there (a Hugging Face checkpoint folder)")
    bcfg = AutoConfig.from_pretrained(str(blip2))
    if not isinstance(bcfg, Blip2Config):
        raise ValueError(f"{f}: blip2 {blip2} is a {bcfg.model_type!r} checkpoint, not BLIP-2 ('blip-2')")
    lcfg = AutoConfig.from_pretrained(str(llm))
    if lcfg.model_type != "llama":
        raise ValueError(f"{f}: llm {llm} is a {lcfg.model_type!r} model; MiniGPT-4 uses LLaMA/Vicuna ('llama')")
    proj = load_projection(ckpt, bcfg.qformer_config.hidden_size, lcfg.hidden_size)

    state = read_prefixed(blip2, ("vision_model.", "qformer.", "query_tokens"))
    if "query_tokens" not in state:
        raise ValueError(f"{blip2}: the BLIP-2 checkpoint has no query_tokens")
    vision = _load_part(Blip2VisionModel, bcfg.vision_config, state, "vision_model.", blip2)
    qformer = _load_part(Blip2QFormerModel, bcfg.qformer_config, state, "qformer.", blip2)
    lin = nn.Linear(*reversed(proj["llama_proj.weight"].shape))
    lin.load_state_dict({"weight": proj["llama_proj.weight"], "bias": proj["llama_proj.bias"]})
    lm = LlamaForCausalLM.from_pretrained(str(llm), dtype=placement.torch_dtype)
    model = MiniGPT4(vision, qformer, state["query_tokens"], lin, lm).eval()
    place_model(model, placement, no_split={type(layer).__name__ for layer in lm.model.layers})
    tok = AutoTokenizer.from_pretrained(str(llm))
    proc = _blip2_image_processor(blip2, int(bcfg.vision_config.image_size))
    return MiniGPT4Adapter(model, tok, proc, template=spec.template, name=f"hf:{path}")


# ---- Tiny random instance and the release layout (tests, demos) -------------------------------
def tiny_minigpt4(seed: int = 0, template: str | Template | dict = "chat") -> MiniGPT4Adapter:
    """A random tiny MiniGPT-4 (no download): 32x32 images in 8x8 patches, a 2-layer ViT and
    Q-Former, 32 query tokens as the original, a 2-layer LLaMA of hidden size 32."""
    from transformers import Blip2Config, Blip2QFormerModel, Blip2VisionModel, LlamaConfig, LlamaForCausalLM

    from mmke.models.tiny import BOS_ID, EOS_ID, INIT_STD, PAD_ID, tiny_tokenizer

    tok = tiny_tokenizer()
    size = 32
    bcfg = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=size, patch_size=8, initializer_range=INIT_STD),
        qformer_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            encoder_hidden_size=32, initializer_range=INIT_STD, cross_attention_frequency=1),
        num_query_tokens=32)
    lcfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                       pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, initializer_range=INIT_STD)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vision, qformer = Blip2VisionModel(bcfg.vision_config), Blip2QFormerModel(bcfg.qformer_config)
        queries, proj = torch.randn(1, bcfg.num_query_tokens, 32) * INIT_STD, nn.Linear(32, 32)
        lm = LlamaForCausalLM(lcfg)
    model = MiniGPT4(vision, qformer, queries, proj, lm).eval()
    return MiniGPT4Adapter(model, tok, _blip2_image_processor(None, size), template=template, name="tiny-minigpt4")


def save_release(adapter: MiniGPT4Adapter, root: str | Path, template: str | dict | None = None) -> Path:
    """Write ``adapter``'s model in the release's layout under ``root``: ``pretrained_minigpt4.pth``
    (``{"model": {llama_proj.*}}``), ``vicuna/`` (LLaMA + tokenizer), ``blip2/`` (a BLIP-2 checkpoint
    whose vision encoder, queries and Q-Former are the model's and whose OPT language model is a
    small random one mmke never reads) and ``minigpt4.json``. Returns ``root``."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    m = adapter.model
    proj = m.llama_proj.state_dict(prefix="llama_proj.")
    torch.save({"model": {k: v.detach().cpu().clone() for k, v in proj.items()}}, root / "pretrained_minigpt4.pth")
    m.language_model.save_pretrained(root / "vicuna")
    adapter.tokenizer.save_pretrained(root / "vicuna")
    cfg = m.config
    bcfg = Blip2Config(vision_config=cfg.vision_config.to_dict(), qformer_config=cfg.qformer_config.to_dict(),
                       text_config=dict(model_type="opt", vocab_size=64, hidden_size=16, ffn_dim=32,
                                        num_hidden_layers=1, num_attention_heads=2, word_embed_proj_dim=16),
                       num_query_tokens=cfg.num_query_tokens)
    blip = Blip2ForConditionalGeneration(bcfg)
    blip.vision_model.load_state_dict(m.vision_model.state_dict())
    blip.qformer.load_state_dict(m.qformer.state_dict())
    with torch.no_grad():
        blip.query_tokens.copy_(m.query_tokens)
    blip.save_pretrained(root / "blip2")
    adapter.image_processor.save_pretrained(root / "blip2")
    spec = {"checkpoint": "pretrained_minigpt4.pth", "llm": "vicuna", "blip2": "blip2"}
    if template is not None:
        spec["template"] = template
    (root / SPEC_FILE).write_text(json.dumps(spec, indent=2))
    return root
