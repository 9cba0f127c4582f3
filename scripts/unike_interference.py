"""Why later lifelong UniKE edits need more steps: earlier edits' neurons firing on a new edit.

    .venv/bin/python scripts/unike_interference.py --edits 150 --next 10
    .venv/bin/python scripts/unike_interference.py --edits 0 --key-sims 150   # keys alone, held-out train

Applies the first ``--edits`` edits of the default benchmark's E-VQA stream (the lifelong order of
``benchmarks/bench_lifelong.py``: the eval records in file order), then makes each of the next
``--next`` edits twice: on that edited model and on a second, unedited copy (each removed again).
Per edit it prints the target's NLL when training starts and the optimisation steps in both, and,
at every edited layer, how many earlier edits' neurons add more than ``--min-norm`` at the edit's
target positions (split by whether the earlier edit asked the same question), and the norm of all
they add against the norm of the layer's output there (one full forward pass of the edit input,
image mask set, as evaluation runs it).

``--key-sims N`` (whitened keys only: unike-plus) prints percentiles of the similarity that gates a
neuron (1 at its own edit; the neuron is off below ``gate_lo``, fully on above ``gate_hi``) at the
first edited layer, for the keys of N held-out train records (after the records the locality
memory reads) against: their own T-Generality and M-Generality inputs, other records asking the
same question, and records asking another question. Nothing is written.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch

from mmke.editors.base import EditRequest
from mmke.editors.patch import neuron_bank
from mmke.eval.runner import Run, RunConfig
from mmke.models.base import target_positions
from mmke.registry import load_model, parse_option_sets
from mmke.scoring import case_inputs
from mmke.tasks import TASKS


def make_editor(method: str, sets: dict, adapter):
    with tempfile.TemporaryDirectory() as tmp:
        r = Run(RunConfig(task="vqa", method=method, method_config=sets), tmp, adapter=adapter)
        records, _ = r.load_records()
        return records, r.train_records(), r.editor(adapter)


@torch.no_grad()
def layer_inputs(adapter, layers: list[int], ex):
    """One full forward of ``ex``: per layer its FFN input and its output at the target positions."""
    box: dict = {}
    hooks = []
    for l in layers:
        hooks.append(adapter.site(f"lm.ffn_key.{l}").register_forward_pre_hook(
            lambda _m, a, l=l: box.__setitem__(("q", l), a[0])))
        hooks.append(adapter.lm_layers()[l].register_forward_hook(
            lambda _m, _a, o, l=l: box.__setitem__(("h", l), o[0] if isinstance(o, tuple) else o)))
    b = adapter.prepare([ex]).to(adapter.device)
    try:
        adapter.target_view(b)
    finally:
        for h in hooks:
            h.remove()
    pos = target_positions(b.labels)[0][0]
    H = box[("q", layers[0])].shape[-1]
    return ({l: box[("q", l)].reshape(1, -1, H)[0, pos].float() for l in layers},
            {l: box[("h", l)].reshape(1, -1, H)[0, pos].float() for l in layers})


@torch.no_grad()
def per_edit_output(bank, q: torch.Tensor) -> tuple[list, torch.Tensor]:
    """Every installed edit's addition [E, H] (summed over the target positions ``q`` [P, H]) as the
    bank's last forward ran it (its image gates), and the edits' owners in that order."""
    owners, outs = [], []
    gated = sorted(bank._gate_col, key=bank._gate_col.get)
    ungated = [o for o in bank.entries if o not in bank._gate_col]
    for grp, who, gates in ((bank._ungated, ungated, None), (bank._gated, gated, bank.last_gates)):
        if not grp.size:
            continue
        ed = grp.edit.get()
        a = bank._act(q @ grp.key_t.get().t() + grp.bias.get(), grp.act.get())  # [P, N]
        if gates is not None:
            a = a * gates[0][ed]
        out = torch.zeros(len(who), q.shape[-1])
        out.index_add_(0, ed, (a.sum(0)[:, None] * grp.value.get()))
        owners += who
        outs.append(out)
    return owners, (torch.cat(outs) if outs else torch.zeros(0, q.shape[-1]))


def key_sims(editor, adapter, train, n: int) -> None:
    cfg = editor.config
    if cfg.key_init != "whitened":
        print(f"--key-sims: {editor.name} trains its keys (no closed-form similarity); skipped")
        return
    loc = editor.locality()
    layer = editor.layers[0]
    recs = train[cfg.memory_size: cfg.memory_size + n]
    W, mu = loc.whitener(layer, cfg.whiten_ridge), loc.center(layer)
    task = TASKS["vqa"]
    kinds = ("reliability", "t_generality", "m_generality")
    ins = [case_inputs(r, task, adapter.load_image) for r in recs]
    Q = {k: torch.stack([layer_inputs(adapter, [layer], x[k])[0][layer][0] for x in ins]) for k in kinds}
    u = Q["reliability"] - mu
    K = u @ W
    K = K / (u * K).sum(-1, keepdim=True)  # sim(own input) = 1, as init_patches builds the keys

    def sim(X):
        return (X - mu) @ K.t()  # [inputs, keys]

    S = sim(Q["reliability"])
    same_q = torch.tensor([[a.src == b.src for a in recs] for b in recs])
    eye = torch.eye(len(recs), dtype=torch.bool)

    def pct(t):
        t = t.flatten().sort().values
        return " ".join(f"{float(t[int(p * (len(t) - 1))]):6.2f}" for p in (0.01, 0.1, 0.5, 0.9, 0.99)) + f"  (n={len(t)})"

    print(f"\nwhitened similarity to {len(recs)} held-out train edits' keys, layer {layer}, first target position "
          f"(gate {cfg.gate_lo}-{cfg.gate_hi}); percentiles 1 / 10 / 50 / 90 / 99")
    print(f"  {'T-Generality input':<32}{pct(sim(Q['t_generality']).diagonal())}")
    print(f"  {'M-Generality input':<32}{pct(sim(Q['m_generality']).diagonal())}")
    print(f"  {'same question, other record':<32}{pct(S[same_q & ~eye])}")
    print(f"  {'another question':<32}{pct(S[~same_q])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", default="unike-plus", choices=["unike-plus", "unike"])
    ap.add_argument("--edits", type=int, default=150, help="earlier edits applied first")
    ap.add_argument("--next", type=int, default=10, help="edits examined after them")
    ap.add_argument("--min-norm", type=float, default=1.0, help="an earlier edit 'fires' above this output norm")
    ap.add_argument("--key-sims", type=int, default=0, metavar="N", help="also the key similarities of N train records")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sets = parse_option_sets(args.sets)
    task = TASKS["vqa"]
    adapter = load_model("default")
    records, train, editor = make_editor(args.method, sets, adapter)
    if args.key_sims:
        key_sims(editor, adapter, train, args.key_sims)
    if not args.next:
        return
    fresh_adapter = load_model("default")
    _, _, fresh = make_editor(args.method, sets, fresh_adapter)
    if args.edits + args.next > len(records):
        raise SystemExit(f"--edits + --next must be at most {len(records)}")
    for i in range(args.edits):
        rec = records[i]
        editor.edit(EditRequest(case_inputs(rec, task, adapter.load_image)["reliability"], rec.to_dict()))
    owner_rec = {}  # bank owner -> the record whose edit installed it
    layers = editor.layers
    key_layer = {l: layers[0] if editor.config.key_site == "first" else l for l in layers}  # whose FFN input keys read
    banks = {l: neuron_bank(adapter, l, key_layer[l]) for l in layers} if args.edits else {}
    for j, o in enumerate(next(iter(banks.values())).entries if banks else []):
        owner_rec[o] = records[j]
    print(f"\n{args.method} after {args.edits} edits, the next {args.next} edits (lifelong | on the unedited model); "
          f"earlier edits adding more than {args.min_norm} at the target positions, same / other question:")
    print(f"{'edit':>5} {'NLL0':>12} {'steps':>9}  " + "  ".join(f"L{l}: fire s/o, |added| / |h|" for l in layers))
    rows = []
    for i in range(args.edits, args.edits + args.next):
        rec = records[i]
        ex = case_inputs(rec, task, adapter.load_image)["reliability"]
        cells, row = [], {}
        if banks:
            q, h = layer_inputs(adapter, layers, ex)
            for l in layers:
                owners, out = per_edit_output(banks[l], q[key_layer[l]])
                norms = out.norm(dim=-1)
                fire = [o for o, n in zip(owners, norms.tolist()) if n > args.min_norm]
                same = sum(owner_rec[o].src == rec.src for o in fire)
                added, hn = float(out.sum(0).norm()), float(h[l].norm(dim=-1).mean())
                row[l] = (same, len(fire) - same, added / hn)
                cells.append(f"{same:>4}/{len(fire) - same:<3} {added:7.0f} / {hn:4.0f}")
        req = EditRequest(ex, rec.to_dict())
        h1 = editor.edit(req)
        h1.remove()
        h0 = fresh.edit(req)
        h0.remove()
        row.update(steps=(h1.meta["steps"], h0.meta["steps"]), nll=(h1.meta["start_nll"], h0.meta["start_nll"]))
        rows.append(row)
        print(f"{i + 1:>5} {h1.meta['start_nll']:5.2f} | {h0.meta['start_nll']:4.2f} {h1.meta['steps']:>3} | "
              f"{h0.meta['steps']:<3}  " + "  ".join(cells), flush=True)
    med = statistics.median
    print(f"\nmedian: NLL0 {med(r['nll'][0] for r in rows):.2f} lifelong vs {med(r['nll'][1] for r in rows):.2f} "
          f"unedited, steps {med(r['steps'][0] for r in rows):.0f} vs {med(r['steps'][1] for r in rows):.0f}")
    for l in layers if banks else []:
        print(f"  layer {l}: earlier edits firing per new edit, same question {med(r[l][0] for r in rows):.0f}, "
              f"another {med(r[l][1] for r in rows):.0f}; |added| / |layer output| {med(r[l][2] for r in rows):.2f}")


if __name__ == "__main__":
    main()
