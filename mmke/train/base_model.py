"""Train the default model's vision tower, projector and LM LoRA on the easy-VQA train split.

Two phases, budgeted for a 2-core CPU:

1. *pre-alignment* — the CNN learns each image's colour and shape (cheap: no LM involved); the
   projector starts from the LM's embeddings of those words, so the LM already "reads" the image;
2. *end-to-end* — LoRA on the last LM layers learns to answer questions and write captions
   (loss on the target tokens only). Vision and projector stay frozen here, so the backward pass
   stops at the first LoRA layer. Checkpoints every ``ckpt_every`` steps; a re-run resumes.

Then the model is scored on all easy-VQA test questions and test captions, and its predictions are
saved next to the weights (the benchmark builder uses them to pick the cases the model gets wrong).
"""

from __future__ import annotations

import json
import logging
import math
import platform
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from mmke.data import easyvqa_source as ev
from mmke.io import atomic_save_safetensors, atomic_torch_save, atomic_write_json, atomic_write_text
from mmke.models.base import Example, target_nll
from mmke.models.default import (COLOURS, SHAPES, WEIGHTS_DIR, DefaultAdapter, DefaultVLM,
                                 LoRALinear, add_lora, image_to_tensor, smollm2_dir,
                                 weights_digest)
from mmke.progress import progress
from mmke.train.card import write_card

log = logging.getLogger(__name__)


@dataclass
class BaseTrainConfig:
    out: str = str(WEIGHTS_DIR)
    seed: int = 0
    vision_epochs: int = 4
    vision_lr: float = 2e-3
    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_layers: int = 8
    caption_fraction: float = 0.2
    ckpt_every: int = 25
    eval_batch: int = 64


def _images(split: str, ids: list[int]) -> torch.Tensor:
    return image_to_tensor([Image.open(ev.image_path(split, i)) for i in ids])


def train_vision(model: DefaultVLM, cfg: BaseTrainConfig) -> float:
    """Phase 1: colour and shape classification of the train images. Returns held-out accuracy."""
    labels = ev.image_labels("train")
    ids = sorted(labels)
    x = _images("train", ids)
    y = torch.tensor([[COLOURS.index(c), SHAPES.index(s)] for c, s in (labels[i] for i in ids)])
    n_val = 200
    xv, yv, xt, yt = x[:n_val], y[:n_val], x[n_val:], y[n_val:]
    opt = torch.optim.Adam(model.vision.parameters(), lr=cfg.vision_lr)
    g = torch.Generator().manual_seed(cfg.seed)
    model.vision.train()
    steps = cfg.vision_epochs * math.ceil(len(xt) / 64)
    with progress() as bar:
        task = bar.add_task("vision pre-alignment", total=steps)
        for _ in range(cfg.vision_epochs):
            perm = torch.randperm(len(xt), generator=g)
            for k in range(0, len(xt), 64):
                idx = perm[k:k + 64]
                out = model.vision(xt[idx])
                loss = F.cross_entropy(out[0], yt[idx, 0]) + F.cross_entropy(out[1], yt[idx, 1])
                opt.zero_grad()
                loss.backward()
                opt.step()
                bar.update(task, advance=1, description=f"vision pre-alignment loss={loss.item():.3f}")
    model.vision.eval()
    with torch.no_grad():
        out = model.vision(xv)
        acc = ((out[0].argmax(1) == yv[:, 0]) & (out[1].argmax(1) == yv[:, 1])).float().mean().item()
    log.info("vision held-out accuracy (colour and shape): %.3f", acc)
    return acc


def _samples(split: str, rng: random.Random) -> tuple[list[tuple[str, str, int]], list[tuple[str, str, int]]]:
    qs = [(ev.VQA_TEMPLATE.format(q), " " + a, i) for q, a, i in ev.questions(split)]
    caps = [(p, " " + ev.caption(c, s), i) for i, (c, s) in ev.image_labels(split).items()
            for p in ev.CAPTION_PROMPTS]
    rng.shuffle(qs)
    rng.shuffle(caps)
    return qs, caps


def _lora_state(loras: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in loras.items():
        out[name + ".A"] = m.A.detach().clone()
        out[name + ".B"] = m.B.detach().clone()
    return out


def train_base(cfg: BaseTrainConfig) -> dict:
    """Run both phases (resuming from checkpoints), evaluate, and write weights + card data."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    t0 = time.time()
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out / "checkpoints"
    ckpt_dir.mkdir(exist_ok=True)

    d = smollm2_dir()
    lm = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(d)
    model = DefaultVLM(lm)
    model.projector.init_from_embeddings(lm.get_input_embeddings(), tok)
    for p in model.parameters():
        p.requires_grad_(False)

    # ---- phase 1 ----
    vis_ckpt = ckpt_dir / "vision.safetensors"
    if vis_ckpt.exists():
        model.vision.load_state_dict(load_file(str(vis_ckpt)))
        vision_acc = json.loads((ckpt_dir / "vision.json").read_text())["acc"]
    else:
        for p in model.vision.parameters():
            p.requires_grad_(True)
        vision_acc = train_vision(model, cfg)
        for p in model.vision.parameters():
            p.requires_grad_(False)
        atomic_save_safetensors(model.vision.state_dict(), vis_ckpt)
        atomic_write_json(ckpt_dir / "vision.json", {"acc": vision_acc})

    # ---- phase 2 ----
    loras = add_lora(lm, cfg.lora_layers, cfg.lora_r, cfg.lora_alpha)
    params = [p for m in loras.values() for p in (m.A, m.B)]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    adapter = DefaultAdapter(model, tok)
    start = 0
    state_f = ckpt_dir / "lora.safetensors"
    if state_f.exists():
        st = load_file(str(state_f))
        for name, m in loras.items():
            m.A.data.copy_(st[name + ".A"])
            m.B.data.copy_(st[name + ".B"])
        extra = torch.load(ckpt_dir / "optim.pt", weights_only=True)
        opt.load_state_dict(extra["opt"])
        sched.load_state_dict(extra["sched"])
        start = int(extra["step"])
        log.info("resuming end-to-end training at step %d", start)
    qs, caps = _samples("train", random.Random(cfg.seed))
    n_cap = int(round(cfg.batch_size * cfg.caption_fraction))
    losses: list[float] = []
    model.lm.train()
    with progress() as bar:
        task = bar.add_task("end-to-end (LoRA)", total=cfg.steps, completed=start)
        for step in range(start, cfg.steps):
            # deterministic batch for a step, whatever the resume point
            brng = random.Random(cfg.seed * 100003 + step)
            batch = brng.sample(qs, cfg.batch_size - n_cap) + brng.sample(caps, n_cap)
            exs = [Example(p, t, Image.open(ev.image_path("train", i))) for p, t, i in batch]
            loss = target_nll(adapter.run(exs))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update(task, advance=1, description=f"end-to-end (LoRA) loss={loss.item():.3f}")
            if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps:
                atomic_save_safetensors(_lora_state(loras), state_f)
                atomic_torch_save({"opt": opt.state_dict(), "sched": sched.state_dict(), "step": step + 1},
                                  ckpt_dir / "optim.pt")
                with open(ckpt_dir / "train_log.jsonl", "a") as f:
                    f.write(json.dumps({"step": step + 1, "loss_mean_recent": sum(losses[-25:]) / len(losses[-25:]),
                                        "elapsed_s": time.time() - t0}) + "\n")
    model.lm.eval()
    train_s = time.time() - t0

    # ---- write the weights: vision + projector + LoRA factors ----
    state = {f"vision.{k}": v for k, v in model.vision.state_dict().items()}
    state.update({f"projector.{k}": v for k, v in model.projector.state_dict().items()})
    state.update(_lora_state(loras))
    atomic_save_safetensors(state, out / "model.safetensors")
    atomic_write_json(out / "config.json",
                      {"lora_r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "lora_layers": cfg.lora_layers,
                       "lora_targets": ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]})

    # ---- evaluate on the test split with the merged model, as users load it ----
    from mmke.models.default import load_default
    model2, tok2 = load_default(out)
    adapter2 = DefaultAdapter(model2, tok2)
    result = evaluate_base(adapter2, cfg.eval_batch)
    result.update({"train_config": asdict(cfg), "vision_heldout_acc": vision_acc,
                   "train_wall_s": round(train_s, 1), "total_wall_s": round(time.time() - t0, 1),
                   "hardware": f"{platform.processor() or platform.machine()}, "
                               f"{torch.get_num_threads()} threads, torch {torch.__version__}",
                   "final_loss_mean_last25": sum(losses[-25:]) / max(len(losses[-25:]), 1) if losses else None})
    preds = result.pop("predictions")
    preds["weights"] = weights_digest(out)
    atomic_write_json(out / "predictions.json", preds, indent=None)
    atomic_write_json(out / "metrics.json", result)
    if (ckpt_dir / "train_log.jsonl").exists():
        atomic_write_text(out / "train_log.jsonl", (ckpt_dir / "train_log.jsonl").read_text())
    write_card(out, f"mmke train base --steps {cfg.steps} --seed {cfg.seed}"
                    + (" --replace-bundled" if Path(cfg.out) == WEIGHTS_DIR else f" --out {cfg.out}"))
    return result


@torch.no_grad()
def predict(adapter: DefaultAdapter, items: list[Example], batch: int,
            label: str) -> list[tuple[bool, str, float]]:
    """Per item, under teacher forcing: exact match of the target, the model's top-1 tokens at the
    target positions (decoded), and the fraction of target tokens it gets right."""
    out: list[tuple[bool, str, float]] = []
    with progress() as bar:
        task = bar.add_task(label, total=len(items))
        for k in range(0, len(items), batch):
            v = adapter.run(items[k:k + batch])
            pred = v.logits.argmax(-1)
            right = pred == v.target_ids
            ok = (right | ~v.mask).all(1)
            for b in range(pred.shape[0]):
                n = int(v.mask[b].sum())
                out.append((bool(ok[b]), adapter.tokenizer.decode(pred[b, :n]).strip(),
                            float(right[b, :n].float().mean())))
            bar.update(task, advance=pred.shape[0])
    return out


def caption_predictions(adapter: DefaultAdapter, batch: int = 64) -> dict[str, dict[str, list]]:
    """{caption prompt: {image_id: [ok, predicted caption]}} on every labelled test image."""
    labels = ev.image_labels("test")
    ids = sorted(labels)
    images = {i: Image.open(ev.image_path("test", i)) for i in ids}
    out = {}
    for prompt in ev.CAPTION_PROMPTS:
        items = [Example(prompt, " " + ev.caption(*labels[i]), images[i]) for i in ids]
        res = predict(adapter, items, batch, f"test captions ({prompt!r})")
        out[prompt] = {str(i): [int(ok), p] for i, (ok, p, _) in zip(ids, res)}
    return out


def evaluate_base(adapter: DefaultAdapter, batch: int = 64) -> dict:
    """Answer accuracy on all test questions and caption accuracy on all labelled test images."""
    qs = ev.questions("test")
    q_items = [Example(ev.VQA_TEMPLATE.format(q), " " + a, Image.open(ev.image_path("test", i)))
               for q, a, i in qs]
    qp = predict(adapter, q_items, batch, "test questions")
    caps = caption_predictions(adapter, batch)
    first = caps[ev.CAPTION_PROMPTS[0]]
    n_all = sum(len(v) for v in caps.values())
    return {
        "test_question_accuracy": sum(ok for ok, _, _ in qp) / len(qp),
        "n_test_questions": len(qp),
        "test_caption_accuracy": sum(v[0] for v in first.values()) / len(first),
        "n_test_captions": len(first),
        "test_caption_accuracy_all_prompts": sum(v[0] for c in caps.values() for v in c.values()) / n_all,
        "n_test_caption_pairs": n_all,
        "predictions": {"test_questions": [[int(ok), p] for ok, p, _ in qp],
                        "test_questions_token_acc": [acc for _, _, acc in qp],
                        "test_captions": first, "test_captions_by_prompt": caps},
    }
