"""Held-out train cases for choosing settings: never the evaluation cases.

Takes the default benchmark's train split of a task, drops every record an editor memory holds
(the first ``--memory-size`` records, which UniKE's and T-Patcher's locality memories read, and
the records of the shipped UniKE latent-IKE memories), samples ``--n`` of the rest (seeded) and
gives each a counterfactual target (another answer of the same type, or a caption with the colour
or the shape changed), since the model already knows the train split's true answers. Writes
``<out>/<task>_dev.json`` in the MMEdit layout with the benchmark directory as image root (E-VQA
balanced by answer type as the evaluation file: 40% yes/no, 30% colour, 30% shape):

    .venv/bin/python scripts/dev_split.py --task vqa --n 100
    .venv/bin/mmke run --method unike-plus --task vqa --data runs/dev/vqa_dev.json \\
        --image-root ~/.cache/mmke/easyvqa-lite/v2-seed-0 --out runs/dev/vqa-unike-plus

It also writes ``<out>/<task>_dev_sameimg.json``: the same cases with the M-Locality input
replaced by another question about the edit's own image (a different meaning, its true answer).
The benchmark's M-Locality uses unrelated images; this file measures what it cannot — whether an
edit leaks into other questions about the same picture — so that a setting is not chosen for
being blind there.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from mmke.data import easyvqa_source as ev
from mmke.data.build import wrong_answer, wrong_caption
from mmke.data.bundled import default_benchmark_dir, ensure_benchmark
from mmke.editors.trained import bundled_weights_dir
from mmke.io import atomic_write_json


def held_out(task: str, n: int, memory_size: int, seed: int) -> tuple[list[dict], Path]:
    bench = ensure_benchmark(default_benchmark_dir())
    records = json.loads((bench / f"{task}_train.json").read_text())
    used = set(range(memory_size))
    for method in ("unike", "unike-plus"):
        f = bundled_weights_dir(method, task) / "memory.json"
        if f.exists():
            used |= set(json.loads(f.read_text()).get("records", []))
    free = [i for i in range(len(records)) if i not in used]
    rng = random.Random(f"dev:{task}:{seed}")
    if task == "vqa":  # balanced by answer type as the evaluation file is: 40% yes/no, 30% colour, 30% shape
        by_type: dict[str, list[int]] = {}
        for i in free:
            by_type.setdefault(records[i].get("answer_type", "?"), []).append(i)
        want = {"yes/no": round(0.4 * n), "colour": round(0.3 * n)}
        want["shape"] = n - sum(want.values())
        picked = [i for t, k in want.items() for i in rng.sample(by_type.get(t, []), min(k, len(by_type.get(t, []))))]
    else:
        picked = rng.sample(free, min(n, len(free)))
    out = []
    for i in sorted(picked):
        r = dict(records[i])
        if task == "vqa":
            r["pred"], r["alt"] = r["alt"], wrong_answer(r["alt"], rng)
        else:
            colour, shape = r["alt"].split()[1:]
            r["pred"], r["alt"] = r["alt"], wrong_caption(colour, shape, rng)
            assert r["pred"] == ev.caption(colour, shape)
        r["counterfactual"] = True
        r["train_index"] = i
        out.append(r)
    return out, bench


def same_image_locality(records: list[dict]) -> list[dict]:
    """The records with ``m_loc*`` = another question about the edit image (another meaning)."""
    from mmke.data.build import canonicalise

    by_image: dict[int, list[tuple[str, str]]] = {}
    for q, a, i in ev.questions("train"):
        by_image.setdefault(i, []).append((q, a))
    out = []
    for r in records:
        i = int(Path(r["image"]).stem)
        try:
            own = canonicalise(r["src"])
        except ValueError:  # a caption prompt: any question about the image is another meaning
            own = None
        others = [(q, a) for q, a in by_image.get(i, []) if canonicalise(q) != own]
        if others:
            q, a = others[len(out) % len(others)]
            out.append(dict(r, m_loc=r["image"], m_loc_q=q, m_loc_a=a))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="vqa", choices=["vqa", "caption"])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--memory-size", type=int, default=256, help="leading train records the memories read")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/dev"))
    args = ap.parse_args()
    recs, bench = held_out(args.task, args.n, args.memory_size, args.seed)
    f = atomic_write_json(args.out / f"{args.task}_dev.json", recs)
    same = same_image_locality(recs)
    g = atomic_write_json(args.out / f"{args.task}_dev_sameimg.json", same)
    print(f"wrote {len(recs)} held-out train cases to {f} and {len(same)} to {g} (image root {bench})")


if __name__ == "__main__":
    main()
