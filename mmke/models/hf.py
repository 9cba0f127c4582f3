"""Hugging Face vision-language models (``AutoModelForImageTextToText``) behind one adapter.

Each supported family has a :class:`~mmke.models.layouts.FamilyLayout`: where the language model's decoder layers are,
which submodules of a layer are the FFN keys / values / attention output, where the vision encoder
and the connector are, how the last hidden state is computed, and how image tokens enter the
sequence. The adapter itself has no per-family branches; adding a family is one layout entry.

Sequences are built as ``[image placeholders] + prompt + target`` (right-padded) with labels -100
everywhere but the target tokens:

- BLIP-2 (OPT): ``num_query_tokens`` image tokens *before* BOS, then the text (as ``Blip2Processor``
  does); the Q-Former outputs, projected, replace the placeholder embeddings.
- LLaVA: BOS, then one image token per vision feature (``(image_size / patch_size)^2``, plus CLS
  when ``vision_feature_select_strategy == "full"`` and the tower has one), then the text.
  A prompt that contains the image token string (``"<image>"``) gets the placeholders there instead.
- LLaVA-NeXT / OneVision, Qwen2-VL / Qwen2.5-VL, Idefics3 / SmolVLM: the number of image tokens
  depends on the image, so the model's own processor expands the image marker (one image per row)
  and the target tokens are appended to what it returns, with its other outputs (``image_sizes``,
  ``image_grid_thw``, ``pixel_attention_mask``; per-token ones such as Qwen's ``mm_token_type_ids``,
  from which the model computes its M-RoPE positions, padded alongside the ids).

Every family above is tested on a tiny random instance of its exact transformers class saved with
``save_pretrained`` and loaded back (:func:`mmke.models.tiny.save_tiny`); a layout not marked
``tested`` loads with a warning. Processors whose video part needs torchvision are loaded without
it (:func:`mmke.models.processors.image_only_processor_class`).

Text-only examples run through the same path without pixels (BLIP-2: the OPT model on the text
alone, as MMEdit does for text locality).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from mmke.models.base import (Batch, Example, ModelAdapter, TargetView, expanded_cache, has_editor_hooks,
                              head_at_targets, prefix_kv)
from mmke.models.layouts import _image_token_id, _resolve, layout_for


# --------------------------------------------------------------------------------------
# The adapter
# --------------------------------------------------------------------------------------
class HFAdapter(ModelAdapter):
    """One Hugging Face image-text-to-text model.

    ``model``: e.g. ``Blip2ForConditionalGeneration`` / ``LlavaForConditionalGeneration``.
    ``tokenizer`` and ``image_processor`` default to the parts of ``processor``.
    ``use_processor``: expand image tokens with ``processor`` instead of the layout's count
    (default: only for families whose count depends on the image). The model is put in eval mode
    and its parameters frozen; editors enable gradients on the sites they change.

    ``Example.context`` (in-context knowledge) is placed first: BOS, the context, then the row as
    the family builds it (image included). When every row of a batch has the same context, it is a
    shared prefix that runs once, its KV cache reused by every row (and, within one :meth:`run`,
    by every batch), for the families whose layout allows it (``shares_prefix``).
    """

    supports_context = True

    def __init__(self, model: nn.Module, tokenizer: Any = None, image_processor: Any = None, *,
                 processor: Any = None, use_processor: bool | None = None, name: str | None = None) -> None:
        super().__init__()
        self.layout = layout_for(model.config)
        if not self.layout.tested:
            warnings.warn(f"{model.config.model_type}: the {self.layout.family!r} layout of mmke is untested (no "
                          "tiny instance of this family runs through mmke's tests); check its edit sites and "
                          "that its outputs match the model's own forward before trusting results", stacklevel=2)
        self.model = model
        self.processor = processor
        self.tokenizer = tokenizer if tokenizer is not None else getattr(processor, "tokenizer", None)
        self.image_processor = (image_processor if image_processor is not None
                                else getattr(processor, "image_processor", None))
        if self.tokenizer is None:
            raise ValueError("HFAdapter needs a tokenizer (or a processor that has one)")
        self.use_processor = self.layout.image_tokens is None if use_processor is None else use_processor
        if self.use_processor and processor is None:
            raise ValueError(f"{self.layout.family}: image tokens are expanded by the model's processor; "
                             "pass processor=AutoProcessor.from_pretrained(...)")
        if not self.use_processor and self.image_processor is None:
            raise ValueError("HFAdapter needs an image processor (or a processor that has one)")
        self.name = name or f"hf-{self.layout.family}"
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)

        self.image_token_id = _image_token_id(model.config)
        self.image_token = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        self.num_image_tokens = self.layout.image_tokens(model) if self.layout.image_tokens else None
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        self.pad_id = int(pad)
        self._bos = self._special_prefix()
        # fail early if a layout path does not exist in this model
        for kind in ("ffn_key", "ffn_value", "attn_out", "ffn"):
            self._layer_site(self.lm_layers()[0], kind)
        self.vision_module(), self.connector_module()

    # ---- tokenisation -------------------------------------------------------------------
    def _special_prefix(self) -> list[int]:
        """The ids the tokenizer puts before any text (BOS where it uses one)."""
        probe = "a b"
        plain = self.tokenizer(probe, add_special_tokens=False).input_ids
        full = self.tokenizer(probe).input_ids
        for s in range(len(full) - len(plain) + 1):
            if full[s: s + len(plain)] == plain:
                return list(full[:s])
        return []

    def _tok(self, s: str) -> list[int]:
        return list(self.tokenizer(s, add_special_tokens=False).input_ids) if s else []

    def _split(self, text: str, target: str) -> tuple[list[int], list[int]]:
        """Token ids of ``text`` and ``target``, tokenised jointly when the prompt's tokens are a
        prefix of the joint tokenisation (the usual case: the target starts with a space)."""
        p = self._tok(text)
        full = self._tok(text + target)
        if full[: len(p)] == p and len(full) > len(p):
            t = full[len(p):]
        else:
            t = self._tok(target)
        if not t:
            raise ValueError(f"target {target!r} has no tokens")
        return p, t

    def _text(self, ex: Example, expanded: str) -> tuple[str, bool]:
        """The prompt with the image marker in place; returns (text, placeholders_go_before_bos)."""
        marker = self.image_token
        if ex.image is None:
            return ex.prompt.replace(marker, ""), False
        if marker in ex.prompt:
            head, tail = ex.prompt.split(marker, 1)
            return head + expanded + tail.replace(marker, ""), False
        if self.layout.image_before_bos:
            return ex.prompt, True
        return self.layout.image_text.format(image=expanded) + ex.prompt, False

    def _prepare(self, examples: Sequence[Example]) -> Batch:
        rows: list[list[int]] = []
        n_ctx: list[int] = []  # tokens before the target (image + prompt)
        extra_tok: list[dict[str, list[int]]] = []  # per-token processor outputs, per row
        images = [ex.image for ex in examples if ex.image is not None]
        image_rows = [i for i, ex in enumerate(examples) if ex.image is not None]
        proc_out: dict[str, Any] = {}
        proc_rows: dict[int, tuple[list[int], dict[str, list[int]]]] = {}
        if images and self.use_processor:
            proc_out, proc_rows = self._process(examples, image_rows)
        # in-context knowledge goes first, the image included: BOS + context, then the row as the
        # family builds it without its own leading BOS (tokenised apart, so every row starts with
        # exactly the same ids and a shared context is a shared prefix)
        heads = {c: self._context_ids(c) for c in {ex.context for ex in examples} if c}
        for i, ex in enumerate(examples):
            n = self.num_image_tokens or 0
            text, before = self._text(ex, self.image_token * (1 if self.use_processor else n))
            ptext, target = self._split(text, ex.target)
            if i in proc_rows:
                ctx, extra = proc_rows[i]
            else:
                pre = [self.image_token_id] * n if before else []
                ctx, extra = pre + self._bos + ptext, {}
                if ex.image is not None and ctx.count(self.image_token_id) != n:
                    raise ValueError(f"the tokenizer split the image token {self.image_token!r}: "
                                     f"{ctx.count(self.image_token_id)} placeholders, expected {n}")
            if ex.context:
                head, cut = heads[ex.context], len(self._bos) if ctx[: len(self._bos)] == self._bos else 0
                ctx = head + ctx[cut:]
                extra = {k: [0] * len(head) + v[cut:] for k, v in extra.items()}
            seq = ctx + target
            if len(seq) > self.max_length:
                raise ValueError(f"input of {len(seq)} tokens exceeds the model's {self.max_length}")
            rows.append(seq)
            n_ctx.append(len(ctx))
            extra_tok.append(extra)
        B, T = len(rows), max(len(r) for r in rows)
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        attn = torch.zeros(B, T, dtype=torch.long)
        labels = torch.full((B, T), -100, dtype=torch.long)
        extra_keys = sorted({k for e in extra_tok for k in e})
        extras = {k: torch.zeros(B, T, dtype=torch.long) for k in extra_keys}
        for b, (r, c) in enumerate(zip(rows, n_ctx)):
            input_ids[b, : len(r)] = torch.tensor(r)
            attn[b, : len(r)] = 1
            labels[b, c: len(r)] = torch.tensor(r[c:])
            for k, v in extra_tok[b].items():
                extras[k][b, : len(v)] = torch.tensor(v)
        inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attn, **extras}
        if len(heads) == 1 and all(ex.context for ex in examples):  # one context shared by every row
            inputs["prefix_len"] = len(next(iter(heads.values())))
        if images:
            if self.use_processor:
                inputs.update(proc_out)
            else:
                inputs["pixel_values"] = self.image_processor(
                    [im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        return Batch(inputs, labels)

    def forget_prepared(self) -> None:
        super().forget_prepared()
        self.__dict__.pop("_context_memo", None)

    def _context_ids(self, context: str) -> list[int]:
        """BOS + the ids of an in-context prefix (image markers dropped), kept for the few latest
        contexts: IKE's demonstrations are thousands of tokens, shared by a case's batches."""
        memo = self.__dict__.setdefault("_context_memo", {})
        if context not in memo:
            if len(memo) >= 4:
                memo.pop(next(iter(memo)))
            memo[context] = self._bos + self._tok(context.replace(self.image_token, ""))
        return memo[context]

    def _process(self, examples: Sequence[Example], image_rows: list[int]):
        """Run the model's processor on the image rows (marker -> the family's image tokens).
        Returns the non-token outputs (pixels, grids, ...) and, per row, the context ids and any
        per-token outputs (e.g. ``mm_token_type_ids``), unpadded."""
        texts = [self._text(examples[i], self.image_token)[0] for i in image_rows]
        # images nested per row: SmolVLM's processor needs it, the other families accept it
        out = self.processor(text=texts, images=[[examples[i].image.convert("RGB")] for i in image_rows],
                             return_tensors="pt", padding=True)
        ids, mask = out["input_ids"], out["attention_mask"].bool()
        per_token = [k for k, v in out.items() if torch.is_tensor(v) and v.shape == ids.shape
                     and k not in ("input_ids", "attention_mask")]
        rows = {}
        for j, i in enumerate(image_rows):
            m = mask[j]
            rows[i] = (ids[j][m].tolist(), {k: out[k][j][m].tolist() for k in per_token})
        rest = {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask", *per_token)}
        return rest, rows

    # ---- forward ------------------------------------------------------------------------
    def _hidden(self, batch: Batch, keep_prefix: bool = True) -> tuple[torch.Tensor, int]:
        """Last hidden states [B, T - s, H] from position s on, and s: 0, or (``keep_prefix=False``)
        the length of a shared prefix that was run once and whose positions predict no target."""
        inputs = dict(batch.inputs)
        prefix = int(inputs.pop("prefix_len", 0) or 0)
        vis_dtype = next(self.vision_module().parameters()).dtype
        for k, v in inputs.items():
            if torch.is_tensor(v) and v.is_floating_point():
                inputs[k] = v.to(vis_dtype)
        if prefix and self._shares_prefix(inputs["input_ids"].shape[0]):
            h_pre, h_rest = self._hidden_after_prefix(inputs, prefix)
            if not keep_prefix and bool((batch.labels[:, : prefix + 1] == -100).all()):
                return h_rest, prefix
            return torch.cat([h_pre.expand(h_rest.shape[0], -1, -1).to(h_rest.device), h_rest], 1), 0
        return self.layout.hidden(self.model, inputs), 0

    def _shares_prefix(self, rows: int) -> bool:
        """Whether a prefix shared by every row runs once: the family's positions allow it, there is
        something to share (several rows, or a run that reuses prefixes across batches), and no
        hook is installed — editors' hooks may look at whole rows (an image gate spans the row, a
        label tap needs the full batch), so the model is then run as is."""
        if not self.layout.shares_prefix or (rows == 1 and self._prefix_memo is None):
            return False
        return not has_editor_hooks(self.model)

    def _hidden_after_prefix(self, inputs: dict[str, Any], prefix: int) -> torch.Tensor:
        """Last hidden states [B, T, H] of rows that share their first ``prefix`` tokens (text only,
        before any image): the prefix runs once (or is taken from this run's memo, see
        :meth:`~mmke.models.base.ModelAdapter.sharing_prefixes`), the rest of the rows on its KV
        cache, repeated per row: (the prefix's [1, P, H], the rest's [B, T - P, H]). Equal to the
        full forward up to float rounding."""
        from transformers import DynamicCache

        ids = inputs["input_ids"]
        B, T = ids.shape

        def run_prefix():
            cache = DynamicCache(config=self.model.config)
            return self.layout.hidden(self.model, {"input_ids": ids[:1, :prefix],
                                                   "attention_mask": inputs["attention_mask"][:1, :prefix],
                                                   "cache": cache, "use_cache": True}), cache

        h_pre, kv = prefix_kv(self._prefix_memo, ids, prefix, run_prefix)
        cache = expanded_cache(kv, B, self.model.config)
        # per-token inputs lose the prefix; the attention mask covers cache + rest, as in decoding
        rest = {k: v[:, prefix:] if torch.is_tensor(v) and v.shape == ids.shape and k != "attention_mask" else v
                for k, v in inputs.items()}
        if self.layout.positions is not None:  # explicit positions: the rows' own, past the prefix
            pos = self.layout.positions(self.model, inputs)
            rest["position_ids"] = (pos[..., prefix:] if pos is not None else
                                    torch.arange(prefix, T, device=ids.device).expand(B, -1))
        h_rest = self.layout.hidden(self.model, {**rest, "cache": cache, "use_cache": True})
        return h_pre, h_rest

    def _forward(self, batch: Batch) -> torch.Tensor:
        return self.model.get_output_embeddings()(self._hidden(batch)[0])

    def _target_view(self, batch: Batch) -> TargetView:
        # Only the positions that predict target tokens go through the LM head.
        h, start = self._hidden(batch, keep_prefix=False)  # a shared prefix predicts no target: skipped
        return head_at_targets(h, batch.labels[:, start:], self.model.get_output_embeddings())

    # ---- layout -------------------------------------------------------------------------
    def lm_layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.layout.lm_layers)

    def _layer_site(self, layer: nn.Module, kind: str) -> nn.Module:
        lay = self.layout
        paths = {"ffn_key": (lay.ffn_key,), "ffn_value": (lay.ffn_value,), "attn_out": (lay.attn_out,),
                 "ffn": lay.ffn}[kind]
        return _resolve(layer, paths)

    def vision_module(self) -> nn.Module:
        vision = self.layout.vision
        return _resolve(self.model, (vision,) if isinstance(vision, str) else vision)

    def connector_module(self) -> nn.Module:
        return _resolve(self.model, self.layout.connector)

    @property
    def max_length(self) -> int:
        return int(self.model.config.get_text_config().max_position_embeddings)


def load_hf(name_or_path: str, *, placement: Any = None, device: str | None = None,
            device_map: str | dict | None = None, dtype: Any = None, **model_kwargs: Any) -> HFAdapter:
    """Load a real checkpoint (local path or hub id) through ``AutoModelForImageTextToText`` and
    ``AutoProcessor``, in ``dtype`` (fp32 unless given: never whatever the checkpoint was saved
    in) on ``device``, or straight into place by ``device_map`` (``"auto"`` spreads it over the
    available GPUs; a dict or JSON file is checked against the model's modules first). ``placement``
    (:class:`~mmke.models.placement.Placement`) gives all three at once."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from mmke.models.placement import (Placement, check_not_offloaded, dtype_name, parse_dtype,
                                       validate_device_map)

    if placement is None:
        placement = Placement(device=device, device_map=device_map,
                              dtype=dtype_name(parse_dtype(dtype)) if dtype is not None else "fp32")
    local = Path(name_or_path).expanduser()
    if local.exists():
        name_or_path = str(local)
    elif name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.count("/") != 1:
        raise FileNotFoundError(f"hf:{name_or_path}: no such directory (a local checkpoint folder, or a "
                                "hub id of the form org/name)")
    if (local / "minigpt4.json").is_file() or (local.is_file() and local.suffix == ".json"):
        from mmke.models.minigpt4 import load_minigpt4  # MiniGPT-4, assembled from its release's parts

        return load_minigpt4(local, placement=placement)
    config = AutoConfig.from_pretrained(name_or_path)
    layout_for(config)  # unsupported families fail before the weights load
    kwargs = dict(model_kwargs)
    kwargs["dtype"] = placement.torch_dtype
    dm = placement.resolved_map()
    if isinstance(dm, dict):  # check names and coverage on a weightless skeleton before loading
        with torch.device("meta"):
            skeleton = AutoModelForImageTextToText.from_config(config)
        validate_device_map(skeleton, dm, placement.source)
        del skeleton
    if dm is not None:
        kwargs["device_map"] = dm
    model = AutoModelForImageTextToText.from_pretrained(name_or_path, **kwargs)
    if placement.device is not None:
        model.to(placement.device)
    check_not_offloaded(model, placement.source)
    from mmke.models.processors import load_processor

    processor = load_processor(name_or_path, config.model_type)
    return HFAdapter(model, processor=processor, name=f"hf:{name_or_path}")
