"""Where unike-plus's neurons fire after N lifelong edits with ``key_site=first``, computed exactly
without making the edits, and what a question-side gate would change.

    .venv/bin/python scripts/unike_firing_sim.py --edits 1000              # ~15 min, one thread
    .venv/bin/python scripts/unike_firing_sim.py --edits 1000 --question-gate 0.45,0.65 --image-gate 0.5,0.7

With ``key_site=first`` every edited layer's neurons read the first edited layer's FFN input, which
no edit changes (edits add at that layer's FFN output and above). Whether edit e's neurons fire on
an input x is then a function of the unedited model: its key ramp (the whitened similarity of x's
target positions to e's, between ``gate_lo`` and ``gate_hi``) times its image gate (the cosine of
the image signatures, between the ``image_gate`` ends). The edits are the default benchmark's E-VQA
stream in file order (as ``benchmarks/bench_lifelong.py``); the editor is built as ``mmke run``
builds it (its locality memory gives the whitening and the centres).

Printed: for new edits from the 100th on (every ``--every``-th), the median number of earlier edits
whose neurons fire on the new edit's input, asking another question (per window of 250 edits), and
those firing edits by scope (:class:`mmke.eval.scope.EditScope`: content class and question class
by the records' links, and whether the target differs); each edit's own firing on its T-/M-Generality
inputs (mean strength, 1 on its own input); the share of the first N M-Locality probes (every 5th)
on which some edit fires. ``--question-gate LO,HI`` (repeatable) adds a gate on the cosine of the
question signatures (the mean FFN input over the prompt's text tokens, centred on the mean over the
train records the locality memory reads), multiplied in; ``--image-gate LO,HI`` (repeatable) looks
at another image gate instead of the editor's (each alone: no question gate). Nothing is written.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch
import torch.nn.functional as F

from mmke.data.schema import norm_text
from mmke.eval.runner import Run, RunConfig
from mmke.eval.scope import EditScope
from mmke.models.base import target_positions
from mmke.registry import load_model
from mmke.scoring import case_inputs
from mmke.tasks import TASKS

KINDS = ["reliability", "t_generality", "m_generality", "m_locality"]


def ramp(z: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return ((z - lo) / (hi - lo)).clamp(0, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--edits", type=int, default=1000)
    ap.add_argument("--every", type=int, default=3, help="look at every this many new edits")
    ap.add_argument("--question-gate", action="append", default=[], metavar="LO,HI")
    ap.add_argument("--image-gate", action="append", default=[], metavar="LO,HI")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    adapter, task = load_model("default"), TASKS["vqa"]
    with tempfile.TemporaryDirectory() as tmp:
        r = Run(RunConfig(task="vqa", method="unike-plus", method_config={"key_site": "first"}), tmp, adapter=adapter)
        records, _ = r.load_records()
        train, editor = r.train_records(), r.editor(adapter)
    records = records[: args.edits]
    n = len(records)
    cfg, layer = editor.config, editor.layers[0]
    loc = editor.locality()
    W, mu, ic = loc.whitener(layer, cfg.whiten_ridge), loc.center(layer), loc.image_center[layer]
    box: dict = {}
    hook = adapter.site(f"lm.ffn_key.{layer}").register_forward_pre_hook(lambda _m, a: box.__setitem__("q", a[0]))

    @torch.no_grad()
    def features(ex):
        """(FFN inputs at the target positions [P, H], image signature [H] or None, question signature [H])"""
        b = adapter.prepare([ex]).to(adapter.device)
        adapter.target_view(b)
        q = box["q"].reshape(1, -1, box["q"].shape[-1])[0].float()
        im = adapter.image_mask(b)[0]
        text = (~im) & (b.labels[0] == -100)
        if b.inputs.get("attention_mask") is not None:
            text &= b.inputs["attention_mask"][0].bool()
        return q[target_positions(b.labels)[0][0]], (q[im].mean(0) if im.any() else None), q[text].mean(0)

    X = {k: [] for k in KINDS}
    for i, rec in enumerate(records):
        ins = case_inputs(rec, task, adapter.load_image, kinds=KINDS)
        for k in KINDS:
            X[k].append(features(ins[k]))
        if (i + 1) % 100 == 0:
            print(f"features of {i + 1}/{n} cases", flush=True)
    qc = torch.stack([features(case_inputs(t, task, adapter.load_image, kinds=["reliability"])["reliability"])[2]
                      for t in train[: cfg.memory_size]]).mean(0)
    hook.remove()

    def unit(v, c):
        return F.normalize(v - c, dim=-1)

    keys = []
    for q, _, _ in X["reliability"]:  # the closed-form keys of init_patches: 1 at the edit's own input
        u = q - mu
        k = u @ W
        keys.append(k / (u * k).sum(-1, keepdim=True))
    img_e = torch.stack([unit(x[1], ic) for x in X["reliability"]])
    qsig_e = torch.stack([unit(x[2], qc) for x in X["reliability"]])

    def fire(edits: list[int], x, qgate, igate) -> torch.Tensor:
        """Firing strength in [0, 1] of each edit of ``edits`` on input ``x`` (its strongest neuron)."""
        q, img, qs = x
        out = torch.zeros(len(edits))
        if img is None:
            return out
        g = ramp(img_e[edits] @ unit(img, ic), *igate)
        if qgate is not None:
            g = g * ramp(qsig_e[edits] @ unit(qs, qc), *qgate)
        for j, e in enumerate(edits):
            if g[j] > 0:
                out[j] = g[j] * ramp((q - mu) @ keys[e].t(), cfg.gate_lo, cfg.gate_hi).max()
        return out

    scope = EditScope(records)
    ek = [scope.edit_key(rec) for rec in records]
    qtext, target = [norm_text(rec.src) for rec in records], [norm_text(rec.alt) for rec in records]
    def pair(text: str) -> tuple[float, float]:
        lo, hi = (float(v) for v in text.split(","))
        return lo, hi

    own_image = tuple(cfg.image_gate)
    configs = [(None, own_image)] + [(pair(g), own_image) for g in args.question_gate] \
        + [(None, pair(g)) for g in args.image_gate]
    for qgate, igate in configs:
        per_window: dict[int, list[int]] = {}
        by_scope: dict[str, int] = {}
        for i in range(100, n, args.every):
            f = fire(list(range(i)), X["reliability"][i], qgate, igate)
            on = (f > 0).nonzero()[:, 0].tolist()
            per_window.setdefault(i // 250 * 250, []).append(sum(qtext[j] != qtext[i] for j in on))
            for j in on:
                k = (("same" if ek[j][0] == ek[i][0] else "other") + " content, "
                     + ("same" if ek[j][1] == ek[i][1] else "other") + " question class, "
                     + ("same" if target[j] == target[i] else "other") + " target")
                by_scope[k] = by_scope.get(k, 0) + 1
        own = {k: statistics.mean(float(fire([i], X[k][i], qgate, igate)[0]) for i in range(n))
               for k in ("reliability", "t_generality", "m_generality")}
        touched = [int((fire(list(range(n)), X["m_locality"][i], qgate, igate) > 0).sum()) for i in range(0, n, 5)]
        print(f"\nquestion gate {qgate or 'none'}, image gate {igate} (key gate {cfg.gate_lo}-{cfg.gate_hi})")
        print("  earlier edits of another question firing on a new edit, median per window: "
              + ", ".join(f"edits {max(w, 100) + 1}-{min(w + 250, n)}: {statistics.median(v):g}" for w, v in sorted(per_window.items())))
        print("  own firing (mean strength): " + ", ".join(f"{k} {v:.3f}" for k, v in own.items()))
        print(f"  M-Locality probes some edit fires on: {sum(t > 0 for t in touched) / len(touched):.1%} "
              f"(median {statistics.median(touched):g} edits each)")
        print("  earlier edits firing on a new edit, by scope (all of them, summed over the new edits looked at):")
        for k, v in sorted(by_scope.items(), key=lambda kv: -kv[1]):
            print(f"    {k}: {v}")


if __name__ == "__main__":
    main()
