"""Tiny random instances of the Hugging Face families, built offline from configs (tests, demos).

Weights are random (seeded), so outputs mean nothing; what they exercise is the adapter plumbing:
image placeholders, label masking, padding, edit sites, and editors. Each builds in well under a
second on a CPU.

:func:`tiny_blip2` / :func:`tiny_llava` return adapters directly. :func:`save_tiny` writes any
supported family (BLIP-2 OPT, LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL,
Idefics3, SmolVLM: the exact transformers model class with its own processor class) as a
checkpoint directory for ``hf:DIR``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from mmke.models.hf import HFAdapter

IMAGE_TOKEN = "<image>"
SPECIALS = ["<pad>", "<s>", "</s>", IMAGE_TOKEN]  # ids 0..3
PAD_ID, BOS_ID, EOS_ID, IMAGE_ID = range(4)
VOCAB_SIZE = 512
# Larger than the usual 0.02 so that logits are not near-uniform: an edit can then make a target
# clearly the argmax, as on a trained model.
INIT_STD = 0.2

# Words seen in tests and demos; any other text still tokenises (byte-level fallback).
_CORPUS_WORDS = """what is the color colour shape of this in image a an photo picture question answer
red green blue yellow black gray grey teal brown white orange purple pink circle rectangle triangle
square paris london berlin rome madrid capital france england germany italy spain who where which
how many there are on it you see animal dog cat bird car tree house man woman sky yes no one two
three four five nq""".split()
_CORPUS = [" ".join(_CORPUS_WORDS), " ".join(w.capitalize() for w in _CORPUS_WORDS),
           "Question: What is in the image? Answer:", "nq question: what is the capital of france?",
           "USER: <image>\nWhat is this? ASSISTANT:"]


def tiny_tokenizer(extra_specials: Sequence[str] = ()):
    """A byte-level BPE tokenizer trained in memory on a small fixed corpus (deterministic), with
    ``<pad>``/``<s>``/``</s>``, BOS added by the post-processor, and ``<image>`` as a special token.
    ``extra_specials`` (a family's image-marker tokens) are added after the trained vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", BOS_ID)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   additional_special_tokens=[IMAGE_TOKEN, *extra_specials])
    assert fast.convert_tokens_to_ids(IMAGE_TOKEN) == IMAGE_ID
    return fast


def _image_processor(kind: str, size: int):
    import transformers

    if kind == "blip":
        cls = getattr(transformers, "BlipImageProcessorPil", None) or transformers.BlipImageProcessor
        return cls(size={"height": size, "width": size})
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def _build(cls, config, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
        if hasattr(model, "query_tokens"):  # BLIP-2 initialises its queries to zeros: make them distinct
            torch.nn.init.normal_(model.query_tokens, std=INIT_STD)
    return model.eval()


def tiny_blip2(seed: int = 0) -> HFAdapter:
    """BLIP-2 with an OPT language model: 30x30 images, 6x6 patches, 4 query tokens, 2 layers each."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    tok = tiny_tokenizer()
    size = 30
    config = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=size, patch_size=6),
        qformer_config=dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, encoder_hidden_size=32, max_position_embeddings=64),
        text_config=dict(model_type="opt", vocab_size=len(tok), hidden_size=32, ffn_dim=64,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=256,
                         word_embed_proj_dim=32, pad_token_id=PAD_ID, bos_token_id=BOS_ID,
                         eos_token_id=EOS_ID, init_std=INIT_STD),
        num_query_tokens=4, image_token_index=IMAGE_ID, initializer_range=INIT_STD)
    model = _build(Blip2ForConditionalGeneration, config, seed)
    return HFAdapter(model, tok, _image_processor("blip", size), name="tiny-blip2")


def tiny_llava(seed: int = 0) -> HFAdapter:
    """LLaVA with a CLIP vision tower (32x32 images, 8x8 patches -> 16 image tokens) and a Llama LM
    of 2 layers."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    tok = tiny_tokenizer()
    size, patch = 32, 8
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, image_size=size, patch_size=patch,
                           projection_dim=32),
        text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=256, pad_token_id=PAD_ID, bos_token_id=BOS_ID,
                         eos_token_id=EOS_ID, initializer_range=INIT_STD),
        image_token_index=IMAGE_ID, image_seq_length=(size // patch) ** 2,
        vision_feature_layer=-1, vision_feature_select_strategy="default")
    model = _build(LlavaForConditionalGeneration, config, seed)
    return HFAdapter(model, tok, _image_processor("clip", size), name="tiny-llava")


def tiny_processor(adapter: HFAdapter):
    """The family's own processor (``Blip2Processor`` / ``LlavaProcessor``) for a tiny adapter, built
    from its tokenizer and image processor: for exercising ``use_processor=True`` and ``load_hf``."""
    cfg = adapter.model.config
    if cfg.model_type == "blip-2":
        from transformers import Blip2Processor

        return Blip2Processor(image_processor=adapter.image_processor, tokenizer=adapter.tokenizer,
                              num_query_tokens=cfg.num_query_tokens)
    from transformers import LlavaProcessor

    return LlavaProcessor(image_processor=adapter.image_processor, tokenizer=adapter.tokenizer,
                          patch_size=cfg.vision_config.patch_size, num_additional_image_tokens=1,
                          vision_feature_select_strategy=cfg.vision_feature_select_strategy)


# --------------------------------------------------------------------------------------
# Every supported family as a checkpoint directory (model + processor), loaded with ``hf:DIR``
# --------------------------------------------------------------------------------------
_SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
_QWEN_SPECIALS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
_IDEFICS_SPECIALS = ("<fake_token_around_image>", "<global-img>", "<end_of_utterance>",
                     *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)))


def _lm(model_type: str, tok, **extra: Any) -> dict:
    """A 2-layer language-model config of ``model_type`` over the tiny tokenizer's vocabulary."""
    return dict(model_type=model_type, vocab_size=len(tok), num_key_value_heads=2, max_position_embeddings=512,
                pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, initializer_range=INIT_STD,
                tie_word_embeddings=False, **_SMALL, **extra)


def _tiny_blip2(tok, seed: int):  # tiny_blip2 builds the same default tokenizer itself
    from transformers import Blip2Processor

    a = tiny_blip2(seed)
    return a.model, Blip2Processor(image_processor=a.image_processor, tokenizer=a.tokenizer,
                                   num_query_tokens=a.model.config.num_query_tokens)


def _tiny_llava(tok, seed: int):  # (as _tiny_blip2)
    a = tiny_llava(seed)
    return a.model, tiny_processor(a)


_PINPOINTS = [[32, 64], [64, 32], [64, 64]]  # any-resolution grids (in pixels) of LLaVA-NeXT / OneVision


def _tiny_llava_next(tok, seed: int):
    """LLaVA-NeXT (llava-v1.6): CLIP tower on 32x32 tiles, any-resolution grids, image_newline."""
    import transformers as tf

    size, patch = 32, 8
    config = tf.LlavaNextConfig(
        vision_config=dict(model_type="clip_vision_model", image_size=size, patch_size=patch, projection_dim=32,
                           **_SMALL),
        text_config=_lm("llama", tok), image_token_index=IMAGE_ID, image_grid_pinpoints=_PINPOINTS,
        vision_feature_select_strategy="default", vision_feature_layer=-2, image_seq_length=(size // patch) ** 2)
    model = _build(tf.LlavaNextForConditionalGeneration, config, seed)
    ip = tf.LlavaNextImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                       image_grid_pinpoints=_PINPOINTS)
    return model, tf.LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=patch,
                                        vision_feature_select_strategy="default", num_additional_image_tokens=1)


def _tiny_llava_onevision(tok, seed: int):
    """LLaVA-OneVision: SigLIP tower (no CLS) on 32x32 tiles, a Qwen2 LM, anyres_max_9."""
    import transformers as tf

    from mmke.models.processors import image_only_processor_class

    size, patch = 32, 8
    config = tf.LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", image_size=size, patch_size=patch, vision_use_head=False,
                           **_SMALL),
        text_config=_lm("qwen2", tok), image_token_index=IMAGE_ID,
        video_token_index=tok.convert_tokens_to_ids("<video>"), image_grid_pinpoints=_PINPOINTS,
        vision_feature_select_strategy="full", vision_feature_layer=-1)
    model = _build(tf.LlavaOnevisionForConditionalGeneration, config, seed)
    ip = tf.LlavaOnevisionImageProcessorPil(size={"height": size, "width": size}, image_grid_pinpoints=_PINPOINTS)
    cls = image_only_processor_class(tf.LlavaOnevisionProcessor)
    return model, cls(image_processor=ip, tokenizer=tok, num_image_tokens=(size // patch) ** 2,
                      vision_feature_select_strategy="full")


def _tiny_qwen2_vl(tok, seed: int, v2_5: bool = False):
    """Qwen2-VL / Qwen2.5-VL: 4-pixel patches merged 2x2 (one token per 8x8 pixels, images resized
    to at most 32x32 pixels), M-RoPE over (time, height, width) sections of the head dimension."""
    import transformers as tf

    from mmke.models.processors import image_only_processor_class

    patch, merge = 4, 2
    ids = {t: tok.convert_tokens_to_ids(t) for t in _QWEN_SPECIALS}
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}  # sums to head_dim / 2
    vision = dict(depth=2, hidden_size=32, num_heads=2, patch_size=patch, spatial_merge_size=merge,
                  temporal_patch_size=2, initializer_range=INIT_STD)
    if v2_5:
        vision.update(intermediate_size=64, out_hidden_size=32, window_size=2 * patch * merge,
                      fullatt_block_indexes=[1])
        cfg_cls, model_cls, proc_cls = tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLForConditionalGeneration, tf.Qwen2_5_VLProcessor
    else:
        vision.update(embed_dim=32, mlp_ratio=2)
        cfg_cls, model_cls, proc_cls = tf.Qwen2VLConfig, tf.Qwen2VLForConditionalGeneration, tf.Qwen2VLProcessor
    text = _lm("qwen2_5_vl_text" if v2_5 else "qwen2_vl_text", tok, rope_parameters=rope)
    config = cfg_cls(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                     video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                     vision_end_token_id=ids["<|vision_end|>"])
    model = _build(model_cls, config, seed)
    ip = tf.Qwen2VLImageProcessorPil(size={"shortest_edge": 8 * 8, "longest_edge": 32 * 32}, patch_size=patch,
                                     merge_size=merge, temporal_patch_size=2)
    return model, image_only_processor_class(proc_cls)(image_processor=ip, tokenizer=tok)


def _tiny_idefics3(tok, seed: int, smolvlm: bool = False):
    """Idefics3 / SmolVLM: images split into 32x32 tiles (plus a global view), 8-pixel patches,
    pixel shuffle by 2: 4 image tokens per tile between ``<fake_token_around_image>`` markers."""
    import transformers as tf

    from mmke.models.processors import image_only_processor_class

    size, patch, scale = 32, 8, 2
    vision = dict(image_size=size, patch_size=patch, initializer_range=INIT_STD, **_SMALL)
    if smolvlm:
        cfg_cls, model_cls = tf.SmolVLMConfig, tf.SmolVLMForConditionalGeneration
        ip_cls, proc_cls = tf.SmolVLMImageProcessorPil, image_only_processor_class(tf.SmolVLMProcessor)
    else:
        cfg_cls, model_cls = tf.Idefics3Config, tf.Idefics3ForConditionalGeneration
        ip_cls, proc_cls = tf.Idefics3ImageProcessorPil, tf.Idefics3Processor
    config = cfg_cls(vision_config=vision, text_config=_lm("llama", tok), image_token_id=IMAGE_ID,
                     scale_factor=scale, pad_token_id=PAD_ID)
    model = _build(model_cls, config, seed)
    ip = ip_cls(size={"longest_edge": 2 * size}, max_image_size={"longest_edge": size}, do_image_splitting=True)
    return model, proc_cls(image_processor=ip, tokenizer=tok, image_seq_len=(size // patch) ** 2 // scale ** 2)


#: family name -> (builder(tokenizer, seed) -> (model, processor), extra special tokens)
TINY_FAMILIES: dict[str, tuple[Any, tuple[str, ...]]] = {
    "blip2": (_tiny_blip2, ()),
    "llava": (_tiny_llava, ()),
    "llava-next": (_tiny_llava_next, ()),
    "llava-onevision": (_tiny_llava_onevision, ("<video>",)),
    "qwen2-vl": (_tiny_qwen2_vl, _QWEN_SPECIALS),
    "qwen2.5-vl": (lambda tok, seed: _tiny_qwen2_vl(tok, seed, v2_5=True), _QWEN_SPECIALS),
    "idefics3": (_tiny_idefics3, _IDEFICS_SPECIALS),
    "smolvlm": (lambda tok, seed: _tiny_idefics3(tok, seed, smolvlm=True), (*_IDEFICS_SPECIALS, "<video>")),
}


def tiny_family(family: str, seed: int = 0, lm: tuple[int, int] | None = None) -> tuple[torch.nn.Module, Any]:
    """A tiny random ``(model, processor)`` of one family: the exact transformers model class
    (e.g. ``Qwen2VLForConditionalGeneration``) and its own processor class, built offline.
    ``lm=(width, layers)``: the same family with a language model of that hidden size and depth
    (:func:`widen_lm`), for timing where the LM's forward pass costs something."""
    if family not in TINY_FAMILIES:
        raise KeyError(f"unknown tiny family {family!r}; known: {', '.join(TINY_FAMILIES)}")
    build, specials = TINY_FAMILIES[family]
    model, processor = build(tiny_tokenizer(specials), seed)
    if lm is not None:
        model = widen_lm(model, *lm, seed=seed)
    return model, processor


def widen_lm(model: torch.nn.Module, width: int, layers: int, seed: int = 0) -> torch.nn.Module:
    """A fresh random model of ``model``'s class and config, but with a language model ``width``
    wide (FFN twice that) and ``layers`` deep. The head size is kept (so are Qwen2-VL's M-RoPE
    sections), with more heads; OPT gets the real OPT's 2,048 learned positions; the vision tower
    is unchanged, its projection into the LM follows the new width."""
    import copy

    cfg = copy.deepcopy(model.config)
    t = cfg.text_config
    head = t.hidden_size // t.num_attention_heads
    if width % head:
        raise ValueError(f"width {width} is not a multiple of the head size {head}")
    t.hidden_size, t.num_attention_heads, t.num_hidden_layers = width, width // head, layers
    if t.model_type == "opt":  # learned positions: as many as the real OPT's (room for IKE's demonstrations)
        t.ffn_dim, t.word_embed_proj_dim = 2 * width, width
        t.max_position_embeddings = max(t.max_position_embeddings, 2048)
    else:
        t.intermediate_size = 2 * width
    if getattr(t, "layer_types", None) is not None:
        t.layer_types = [t.layer_types[0]] * layers
    v = getattr(cfg, "vision_config", None)
    if cfg.model_type == "qwen2_vl":  # the merger's output is the LM's width
        v.hidden_size = width
    elif cfg.model_type == "qwen2_5_vl":
        v.out_hidden_size = width
    return _build(type(model), cfg, seed)


def save_tiny(family: str, out_dir: str | Path, seed: int = 0, lm: tuple[int, int] | None = None) -> Path:
    """Save a tiny random checkpoint of ``family`` (model + processor, ``save_pretrained``) into
    ``out_dir``, loadable with ``mmke.registry.load_model("hf:" + str(out_dir))``; returns the path.
    ``lm=(width, layers)``: with a larger language model (:func:`widen_lm`).

    Families whose processor has a video part (Qwen2-VL, LLaVA-OneVision, SmolVLM) are built here
    without it (it needs torchvision); its entry is added to ``processor_config.json`` as a full
    save writes it, so that the directory loads (or fails to) as a real checkpoint does."""
    import json

    model, processor = tiny_family(family, seed, lm)
    out = Path(out_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    if getattr(type(processor), "without_video_of", None) is not None:
        cfg_file = out / "processor_config.json"
        cfg = json.loads(cfg_file.read_text())
        image = cfg["image_processor"]
        video = {k: image[k] for k in ("size", "patch_size", "merge_size", "temporal_patch_size", "image_mean",
                                       "image_std", "do_normalize", "do_rescale", "do_resize") if k in image}
        video["video_processor_type"] = image["image_processor_type"].replace("ImageProcessor", "VideoProcessor")
        cfg["video_processor"] = video
        cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out
