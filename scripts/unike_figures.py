"""UniKE's figures (SPEC §7, issue 4), written into docs/:

- ``unike_tsne_<task>.png``: t-SNE of the memory's positive (question + correct answer) and negative
  (question + the model's own wrong answer) states, raw and in the semantic and truthfulness
  spaces of the trained encoders (last edited layer);
- ``unike_k_sweep_<task>.png``: number of retrieved states / demonstrations K in {8, 16, 24, 32, 40},
  latent IKE (``unike-latent``) vs prompt IKE (``ike``);
- ``unike_s_sweep_<task>.png``: full UniKE with a fixed s in {0.2, 0.5, 0.8} vs the dynamic s;
- ``unike_figures_<task>.json``: every number plotted, with the commands' settings.

    .venv/bin/python scripts/unike_figures.py --task vqa --limit 20
    .venv/bin/python scripts/unike_figures.py --task vqa --only tsne

Needs the ``figures`` extra (scikit-learn, matplotlib): ``pip install -e .[figures]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from mmke.scoring import METRICS
from mmke.eval.runner import Run, RunConfig
from mmke.registry import load_model

log = logging.getLogger("unike_figures")
LABELS = {"reliability": "Rel", "t_generality": "T-Gen", "m_generality": "M-Gen", "t_locality": "T-Loc",
          "m_locality": "M-Loc"}


def run_one(adapter, task: str, method: str, limit: int, method_config: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        s = Run(RunConfig(task=task, method=method, limit=limit, method_config=method_config), tmp,
                adapter=adapter).execute()
    row = {k: round(100 * s["metrics"][k], 2) for k in METRICS}
    row["mean"] = round(statistics.fmean(row[k] for k in METRICS), 2)
    row["edit_s_median"] = round(s["timing"]["edit_s_median"], 3)
    log.info("%s %s %s: %s", task, method, method_config, row)
    return row


def tsne_figure(task: str, weights: Path | None, out: Path, seed: int) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    from mmke.editors.trained import bundled_weights_dir, load_module_weights
    from mmke.editors.unike.encoders import UniKEEncoders
    from mmke.editors.unike.memory import LatentMemory

    d = weights or bundled_weights_dir("unike", task)
    mem = LatentMemory.load(d)
    meta = json.loads((d / "weights.json").read_text())
    arch = meta["architecture"]
    enc = UniKEEncoders(mem.sem.shape[-1], arch["layers"], arch["enc_hidden"], arch["tru_dim"])
    load_module_weights(d, enc)
    j = len(mem.layers) - 1
    hp, hn = mem.pos[j].float(), mem.neg[j].float()
    n = len(hp)
    with torch.no_grad():
        spaces = {"raw hidden states": torch.cat([hp, hn]) - mem.mean[j],
                  "semantic space": torch.cat([enc.semantic(j, hp), enc.semantic(j, hn)]),
                  "truthfulness space": torch.cat([enc.truth(j, hp), enc.truth(j, hn)])}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    for ax, (title, x) in zip(axes, spaces.items()):
        emb = TSNE(n_components=2, init="pca", random_state=seed, perplexity=30).fit_transform(x.numpy())
        ax.scatter(emb[:n, 0], emb[:n, 1], s=5, c="tab:blue", label="positive (correct answer)")
        ax.scatter(emb[n:, 0], emb[n:, 1], s=5, c="tab:red", label="negative (model's own wrong answer)")
        ax.set_title(f"{title} (layer {mem.layers[j]})")
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].legend(loc="best", fontsize=8)
    fig.suptitle(f"UniKE memory, {task}: {n} train cases, t-SNE")
    fig.tight_layout()
    f = out / f"unike_tsne_{task}.png"
    fig.savefig(f, dpi=110)
    plt.close(fig)
    return {"file": str(f), "layer": mem.layers[j], "n_pairs": n, "weights": str(d)}


def line_figure(rows: dict, xs: list, title: str, f: Path, xlabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 6, figsize=(18, 3.4), sharex=True)
    for ax, key in zip(axes, list(METRICS) + ["mean"]):
        for method, by_x in rows.items():
            ax.plot(xs, [by_x[str(x)][key] for x in xs], marker="o", label=method)
        ax.set_title(LABELS.get(key, "mean of five"))
        ax.set_xlabel(xlabel)
        ax.set_ylim(-2, 102)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(f, dpi=110)
    plt.close(fig)


def bar_figure(rows: dict, title: str, f: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(METRICS) + ["mean"]
    fig, ax = plt.subplots(figsize=(10, 3.8))
    w = 0.8 / len(rows)
    for i, (name, row) in enumerate(rows.items()):
        ax.bar([k + i * w for k in range(len(keys))], [row[k] for k in keys], width=w, label=name)
    ax.set_xticks([k + 0.4 - w / 2 for k in range(len(keys))], [LABELS.get(k, "mean") for k in keys])
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8, ncol=len(rows))
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(f, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="vqa", choices=["vqa", "caption"])
    ap.add_argument("--limit", type=int, default=20, help="eval cases per configuration")
    ap.add_argument("--weights", type=Path, default=None, help="UniKE weights dir (default: bundled)")
    ap.add_argument("--out", type=Path, default=Path("docs"))
    ap.add_argument("--only", choices=["tsne", "k", "s"], nargs="*", default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    todo = set(args.only or ["tsne", "k", "s"])
    wcfg = {"weights": str(args.weights)} if args.weights else {}
    res_f = args.out / f"unike_figures_{args.task}.json"
    result = json.loads(res_f.read_text()) if res_f.exists() else {}
    result.update({"date": date.today().isoformat(), "task": args.task, "limit": args.limit,
                   "threads": torch.get_num_threads()})
    t0 = time.time()
    if "tsne" in todo:
        result["tsne"] = tsne_figure(args.task, args.weights, args.out, args.seed)
    adapter = load_model("default") if todo & {"k", "s"} else None
    if "k" in todo:
        ks = [8, 16, 24, 32, 40]
        rows = {"unike-latent": {str(k): run_one(adapter, args.task, "unike-latent", args.limit, {**wcfg, "k": k})
                                 for k in ks},
                "ike": {str(k): run_one(adapter, args.task, "ike", args.limit, {"k": k}) for k in ks}}
        line_figure(rows, ks, f"Retrieved states (latent IKE) vs demonstrations (IKE), {args.task}, "
                              f"{args.limit} cases", args.out / f"unike_k_sweep_{args.task}.png", "K")
        result["k_sweep"] = rows
    if "s" in todo:
        rows = {f"s={s}": run_one(adapter, args.task, "unike", args.limit, {**wcfg, "s": s}) for s in (0.2, 0.5, 0.8)}
        rows["dynamic s"] = run_one(adapter, args.task, "unike", args.limit, {**wcfg, "s": "dynamic"})
        bar_figure(rows, f"UniKE with fixed vs dynamic s, {args.task}, {args.limit} cases",
                   args.out / f"unike_s_sweep_{args.task}.png")
        result["s_sweep"] = rows
    result["wall_s"] = round(time.time() - t0, 1)
    res_f.write_text(json.dumps(result, indent=1))
    log.info("wrote %s (%.0f s)", res_f, time.time() - t0)


if __name__ == "__main__":
    main()
