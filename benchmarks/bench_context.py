"""Forward time of the default model's LM against context length, on the CPU: what a long
in-context prompt costs (IKE with many edits' demonstrations fills the 7,936-token budget, and in
its published layout every scored input is one such forward).

    .venv/bin/python benchmarks/bench_context.py [--tokens 500 2000 8000] [--threads 1] [--repeats 1]

Random token ids, no image, no KV cache, ``torch.no_grad``; the median of ``--repeats`` timed
forwards after one untimed warm-up at the shortest length. Raw output: ``--out`` (default
runs/bench/bench_context.json).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch

from mmke.io import atomic_write_json
from mmke.models.default import load_default


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[500, 2000, 8000])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/bench_context.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, _tok = load_default()
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
    atomic_write_json(args.out, {"date": date.today().isoformat(), "threads": args.threads,
                                 "attention": model.lm.config._attn_implementation,
                                 "machine": platform.machine(), "torch": torch.__version__, "rows": rows})
    print(f"attention: {model.lm.config._attn_implementation}; raw numbers: {args.out}")


if __name__ == "__main__":
    main()
