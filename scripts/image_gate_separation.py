"""How well an image signature tells an edit's image from the benchmark's other images, on the
train split (never the eval split): grace-mm's gate threshold is chosen from this.

    .venv/bin/python scripts/image_gate_separation.py --cases 150

For each train case, the signature of its edit input's image (the mean of GRACE's wrapped FFN
value projection's input over the image-token positions, at GRACE's default layer of the bundled
model) is compared by cosine, centred on the mean signature of the cases' edit inputs, with the
signature of its M-Generality image (the same content: the gate should open) and of its
M-Locality image (other content: the gate should stay shut). Prints quantiles of both and the
probability that a random "same" pair scores above a random "other" pair (AUC).
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import torch.nn.functional as F

from mmke.editors.grace import resolve_layer
from mmke.eval.runner import Run, RunConfig
from mmke.registry import load_model
from mmke.scoring import case_inputs
from mmke.tasks import TASKS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="vqa", choices=list(TASKS))
    ap.add_argument("--cases", type=int, default=150, help="train cases (the first ones of the train split)")
    ap.add_argument("--layer", type=int, default=None, help="LM layer (default: GRACE's)")
    ap.add_argument("--site", default="ffn-input", choices=["ffn-input", "layer-output"],
                    help="ffn-input: the input of the layer's FFN value projection (grace-mm's gate); "
                         "layer-output: the layer's output states")
    args = ap.parse_args()
    torch.set_num_threads(1)
    adapter = load_model("default")
    with tempfile.TemporaryDirectory() as tmp:
        train = Run(RunConfig(task=args.task, method="grace-mm"), tmp, adapter=adapter).train_records()[: args.cases]
    layer = resolve_layer(adapter, args.layer, "grace")
    box: dict[str, torch.Tensor] = {}
    if args.site == "ffn-input":
        hook = adapter.site(f"lm.ffn_value.{layer}").register_forward_pre_hook(
            lambda _m, a: box.__setitem__("a", a[0].detach()))
    else:
        hook = adapter.lm_layers()[layer].register_forward_hook(
            lambda _m, _a, out: box.__setitem__("a", (out[0] if isinstance(out, tuple) else out).detach()))

    @torch.no_grad()
    def signature(ex) -> torch.Tensor:
        batch = adapter.prepare([ex])
        im = adapter.image_mask(batch)
        adapter.forward(batch)
        return box["a"].reshape(*im.shape, -1)[0].float()[im[0]].mean(0)

    sigs = {"edit": [], "same": [], "other": []}
    for rec in train:
        x = case_inputs(rec, TASKS[args.task], adapter.load_image,
                        kinds=("reliability", "m_generality", "m_locality"))
        for name, kind in (("edit", "reliability"), ("same", "m_generality"), ("other", "m_locality")):
            sigs[name].append(signature(x[kind]))
    hook.remove()
    center = torch.stack(sigs["edit"]).mean(0)
    unit = {k: F.normalize(torch.stack(v) - center, dim=-1) for k, v in sigs.items()}
    same = (unit["edit"] * unit["same"]).sum(-1)
    other = (unit["edit"] * unit["other"]).sum(-1)
    q = torch.tensor([0.01, 0.1, 0.5, 0.9, 0.99])
    site = "value-projection input" if args.site == "ffn-input" else "output states"
    print(f"{len(train)} train cases, layer {layer} ({site}), centred on the edit inputs' mean")
    print("quantiles             " + "  ".join(f"{float(v):>5.2f}" for v in q))
    for name, c in (("same content (open)", same), ("other content (shut)", other)):
        print(f"{name:<22}" + "  ".join(f"{float(v):>5.2f}" for v in c.quantile(q)))
    print(f"AUC {float((same[:, None] > other[None]).float().mean()):.4f}")


if __name__ == "__main__":
    main()
