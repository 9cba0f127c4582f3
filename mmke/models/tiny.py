"""Tiny random instances of the Hugging Face families, built offline from configs (tests, demos).

Weights are random (seeded), so outputs mean nothing; what they exercise is the adapter plumbing:
image placeholders, label masking, padding, edit sites, and editors. Each builds in well under a
second on a CPU.
"""

from __future__ import annotations

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


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained in memory on a small fixed corpus (deterministic), with
    ``<pad>``/``<s>``/``</s>``, BOS added by the post-processor, and ``<image>`` as a special token."""
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
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", additional_special_tokens=[IMAGE_TOKEN])
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
