"""Forward time of the default model's LM against context length, on the CPU: what a long
in-context prompt costs (IKE with many edits' demonstrations fills the 7,936-token budget, and in
its published layout every scored input is one such forward).

    .venv/bin/python benchmarks/bench_context.py [--tokens 500 2000 8000] [--threads 1] [--repeats 1]

Random token ids, no image, no KV cache, ``torch.no_grad``; the median of ``--repeats`` timed
forwards after one untimed warm-up at the shortest length.

Then, at the longest length, what a scored input of IKE's published layout costs through the
adapter (the image, then the demonstrations, then the input) alone, and after another input on the
same image inside one memo, when it reuses that input's KV cache for the head they share
(``DefaultVLM.long_row``): the ratio of the two, measured in this run. Raw output: ``--out``
(default runs/bench/bench_context.json).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch

from mmke.data import easyvqa_source as ev
from mmke.io import atomic_write_json
from mmke.models.base import Example
from mmke.models.default import DefaultAdapter, load_default
from mmke.tasks import VQA_TEMPLATE


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def reuse_row(model, tok, tokens: int) -> dict:
    """Seconds for one IKE-layout input of about ``tokens`` tokens, alone and reusing the head it
    shares with an input on the same image scored before it."""
    from PIL import Image

    adapter = DefaultAdapter(model, tok)
    (q1, a1, i), (q2, _a2, _i2) = ev.questions("test")[:2]
    image = Image.open(ev.image_path("test", i)).convert("RGB")
    fact = f"New Fact: {VQA_TEMPLATE.format(q1)} {a1}\nPrompt: {VQA_TEMPLATE.format(q2)} {a1}\n\n"
    query = f"New Fact: {VQA_TEMPLATE.format(q1)} {a1}\nPrompt: "

    def size(ex: Example) -> float:
        try:
            return len(adapter.prepare([ex]).inputs["input_ids"][0])
        except ValueError:  # longer than the model's context
            return float("inf")

    repeats = max(1, tokens // len(tok(fact, add_special_tokens=False).input_ids))
    while True:  # the most demonstrations that keep both inputs within ``tokens``
        first, second = (Example(fact * repeats + query + VQA_TEMPLATE.format(q), f" {a1}", image) for q in (q1, q2))
        n = max(size(first), size(second))
        if n <= tokens or repeats == 1:
            break
        repeats -= 1
    alone = timed(lambda: adapter.run([second]))
    with adapter.sharing_prefixes():
        adapter.run([first])
        reused = timed(lambda: adapter.run([second]))
    return {"tokens": n, "alone_s": alone, "reusing_s": reused, "ratio": alone / reused}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[500, 2000, 8000])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/bench_context.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_default()
    lm = model.lm.model
    vocab = model.lm.config.vocab_size
    g = torch.Generator().manual_seed(0)
    rows = []
    with torch.no_grad():
        lm(input_ids=torch.randint(0, vocab, (1, min(args.tokens)), generator=g))  # warm-up
        for n in args.tokens:
            ids = torch.randint(0, vocab, (1, n), generator=g)
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                lm(input_ids=ids)
                times.append(time.perf_counter() - t)
            rows.append({"tokens": n, "forward_s": statistics.median(times)})
            print(f"{n:>6} tokens: {rows[-1]['forward_s']:.2f} s a forward", flush=True)
        reuse = reuse_row(model, tok, max(args.tokens))
    print(f"IKE-layout input of {reuse['tokens']} tokens: {reuse['alone_s']:.2f} s alone, {reuse['reusing_s']:.2f} s "
          f"reusing the head shared with an input on the same image ({reuse['ratio']:.1f}x)", flush=True)
    atomic_write_json(args.out, {"date": date.today().isoformat(), "threads": args.threads, "reuse": reuse,
                                 "attention": model.lm.config._attn_implementation,
                                 "machine": platform.machine(), "torch": torch.__version__, "rows": rows})
    print(f"attention: {model.lm.config._attn_implementation}; raw numbers: {args.out}")


if __name__ == "__main__":
    main()
