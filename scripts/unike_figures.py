"""UniKE's figures as the paper draws them (SPEC §5, §7), written into ``--out`` (default
``runs/figures``, outside the tracked tree; ``--out docs`` refreshes the ones the docs show):

- ``unike_tsne_<task>.png``: t-SNE of the memory's positive (question + correct answer) and negative
  (question + the model's own wrong answer) states, raw and in the semantic and truthfulness
  spaces of the trained encoders (last edited layer);
- ``unike_k_sweep_<task>.png``: the number K of retrieved states / demonstrations in
  {8, 16, 24, 32, 40}, both with the new neurons: intrinsic + latent IKE (``unike``, K = ``k``)
  vs intrinsic + prompt IKE (``unike-intrinsic-ike``, K = ``ike_k``);
- ``unike_s_sweep_<task>.png``: UniKE with a fixed s in {0.2, 0.5, 0.8} vs the dynamic s;
- ``unike_figures_<task>.json``: every number plotted, with the commands' settings.

    .venv/bin/python scripts/unike_figures.py --task vqa --limit 20
    .venv/bin/python scripts/unike_figures.py --task vqa --only tsne --method unike-plus

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

from mmke.eval.runner import Run, RunConfig
from mmke.io import atomic_write_json
from mmke.registry import load_model
from mmke.scoring import METRICS

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


def tsne_figure(task: str, weights: Path | None, out: Path, seed: int, method: str = "unike") -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    from mmke.editors.trained import bundled_weights_dir, load_module_weights
    from mmke.editors.unike.encoders import UniKEEncoders
    from mmke.editors.unike.memory import LatentMemory

    d = weights or bundled_weights_dir(method, task)
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
    fig.suptitle(f"{method} memory, {task}: {n} train cases, t-SNE")
    fig.tight_layout()
    f = out / f"{method.replace('-', '_')}_tsne_{task}.png"
    fig.savefig(f, dpi=110)
    plt.close(fig)
    root = Path(__file__).resolve().parents[1]
    shown = d.resolve().relative_to(root) if d.resolve().is_relative_to(root) else d  # no home paths in docs
    return {"file": str(f), "layer": mem.layers[j], "n_pairs": n, "weights": str(shown)}


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
    ap.add_argument("--out", type=Path, default=Path("runs/figures"))
    ap.add_argument("--method", default="unike", choices=["unike", "unike-plus"],
                    help="the UniKE whose memory (t-SNE) and s (s sweep) are drawn")
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
        result[f"tsne ({args.method})"] = tsne_figure(args.task, args.weights, args.out, args.seed, args.method)
    adapter = load_model("default") if todo & {"k", "s"} else None
    if "k" in todo:
        ks = [8, 16, 24, 32, 40]
        rows = {"intrinsic + latent IKE (unike)":
                {str(k): run_one(adapter, args.task, "unike", args.limit, {**wcfg, "k": k}) for k in ks},
                "intrinsic + IKE (unike-intrinsic-ike)":
                {str(k): run_one(adapter, args.task, "unike-intrinsic-ike", args.limit, {"ike_k": k}) for k in ks}}
        line_figure(rows, ks, f"K retrieved states (latent IKE) vs K demonstrations (IKE), both with the new "
                              f"neurons, {args.task}, {args.limit} cases",
                    args.out / f"unike_k_sweep_{args.task}.png", "K")
        result["k_sweep"] = rows
    if "s" in todo:
        m = args.method
        rows = {f"s={s}": run_one(adapter, args.task, m, args.limit, {**wcfg, "s": s}) for s in (0.2, 0.5, 0.8)}
        rows["dynamic s"] = run_one(adapter, args.task, m, args.limit, {**wcfg, "s": "dynamic"})
        bar_figure(rows, f"{m} with fixed vs dynamic s, {args.task}, {args.limit} cases",
                   args.out / f"{m.replace('-', '_')}_s_sweep_{args.task}.png")
        result[f"s_sweep ({m})"] = rows
    result["wall_s"] = round(time.time() - t0, 1)
    atomic_write_json(res_f, result)
    log.info("wrote %s (%.0f s)", res_f, time.time() - t0)


if __name__ == "__main__":
    main()
