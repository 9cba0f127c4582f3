"""How well a new neuron's key tells an edit's paraphrase from other questions, raw vs whitened.

For each evaluation case and each edited layer, the key is built from the edit's FFN input u (at
the position predicting the first target token, centred on the locality memory's mean), as UniKE
builds it, and every other input is scored by its similarity to the edit (1 = the edit itself):

    raw:       sim(x) = (x - mu) . u / |u|^2                       (the direction of the edit)
    whitened:  sim(x) = (x - mu) W u / (u W u),  W = (C + ridge I)^-1  (``key_init="whitened"``)

A neuron gated at ``lo`` fires where sim > lo. The script prints, per key kind, how often it fires
on the T-Generality input (wanted) and on the locality inputs (unwanted: M-Locality at the
answer-predicting position and at any position up to it, T-Locality at any such position), on the
unedited model (no latent-IKE shift).

    .venv/bin/python scripts/unike_key_separation.py --task vqa --limit 50
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from mmke.data.schema import load_records
from mmke.editors.unike.intrinsic import ffn_inputs_at_targets
from mmke.io import atomic_write_json
from mmke.scoring import case_inputs
from mmke.eval.runner import Run, RunConfig
from mmke.models.base import target_positions
from mmke.registry import load_model
from mmke.tasks import TASKS


@torch.no_grad()
def every_position(adapter, layers, ex) -> tuple[torch.Tensor, torch.Tensor]:
    """FFN inputs [L, T, H] of one example at every position, and its answer-predicting positions."""
    box = {}
    hooks = [adapter.site(f"lm.ffn_key.{l}").register_forward_pre_hook(
        lambda _m, a, l=l: box.__setitem__(l, a[0][0].detach().double())) for l in layers]
    try:
        batch = adapter.prepare([ex]).to(adapter.device)
        adapter.target_view(batch)
    finally:
        for h in hooks:
            h.remove()
    return torch.stack([box[l] for l in layers]), target_positions(batch.labels)[0][0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="vqa", choices=list(TASKS))
    ap.add_argument("--limit", type=int, default=50, help="evaluation cases (the runs' seeded sample)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--memory-size", type=int, default=256)
    ap.add_argument("--ridge", type=float, default=0.1)
    ap.add_argument("--lo", type=float, default=0.25)
    ap.add_argument("--out", type=Path, default=None, help="also write the numbers here (JSON)")
    args = ap.parse_args()
    adapter = load_model("default")
    task = TASKS[args.task]
    n = adapter.num_lm_layers
    layers = list(range(n - args.layers, n))
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(RunConfig(task=args.task, method="ike", limit=args.limit), tmp, adapter=adapter)
        records, _ = run.load_records()
    train = load_records(run.cfg.train_data, run.cfg.image_root, run.cfg.rephrase_image_root, skip_invalid=True).records
    mem_inputs = []
    for r in train[: args.memory_size]:
        x = case_inputs(r, task, adapter.load_image)
        mem_inputs += [x[k] for k in ("reliability", "t_locality", "m_locality")]
    memory = ffn_inputs_at_targets(adapter, layers, mem_inputs)
    mus = [memory.center(l).double() for l in layers]
    metrics = {k: {"raw": 0, "whitened": 0} for k in
               ("t_generality", "m_locality_answer", "m_locality_any", "t_locality_any")}
    for rec in records:
        x = case_inputs(rec, task, adapter.load_image)
        q = {k: every_position(adapter, layers, x[k]) for k in ("reliability", "t_generality", "m_locality",
                                                                 "t_locality")}
        for j, l in enumerate(layers):
            e, pos = q["reliability"]
            u = e[j, pos[0]] - mus[j]
            keys = {"raw": u / (u @ u), "whitened": memory.whitener(l, args.ridge).double() @ u}
            keys["whitened"] = keys["whitened"] / (u @ keys["whitened"])
            for kind, k in keys.items():
                def sim(name):
                    h, p = q[name]
                    return (h[j] - mus[j]) @ k, p
                s, p = sim("t_generality")
                metrics["t_generality"][kind] += float(s[p[0]] > args.lo)
                s, p = sim("m_locality")
                metrics["m_locality_answer"][kind] += float(s[p[0]] > args.lo)
                metrics["m_locality_any"][kind] += float(s[: int(p.max()) + 1].max() > args.lo)
                s, p = sim("t_locality")
                metrics["t_locality_any"][kind] += float(s[: int(p.max()) + 1].max() > args.lo)
    total = len(records) * len(layers)
    table = {m: {k: round(100 * v / total, 1) for k, v in by.items()} for m, by in metrics.items()}
    print(f"{args.task}, {len(records)} cases x {len(layers)} layers, ridge {args.ridge}, fires where sim > {args.lo}")
    print(f"{'input':<20} {'raw key %':>10} {'whitened key %':>15}")
    for m, by in table.items():
        print(f"{m:<20} {by['raw']:>10} {by['whitened']:>15}")
    if args.out:
        atomic_write_json(args.out, {"args": {k: str(v) for k, v in vars(args).items()}, "fires_percent": table})


if __name__ == "__main__":
    main()
