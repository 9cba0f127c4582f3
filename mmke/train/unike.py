"""Train UniKE's learned parts on a task's train split: the latent-IKE memory and the encoders.

``mmke train --method unike --task vqa`` (reached through :meth:`UniKEEditor.fit`):

1. **triplets** — for each sampled train case: the question (image + prompt), its correct answer,
   and the model's own wrong answer (the most likely, under the model, of the other answers given
   to the same prompt in the split). One forward pass over the question + every candidate answer
   scores the candidates and records the hidden states (latent-IKE site) of the edited layers at the last
   question token (h_sem) and the last answer token (h_pos, h_neg). Cached under the mmke cache
   directory, so a re-run (or the figure script) does not collect them again;
2. **encoders** — per layer, the truthfulness encoder (supervised InfoNCE, Eq. 4), the semantic
   encoder (Eq. 5) and W_zeta (least squares from truthfulness differences to state differences),
   Adam on mini-batches of triplets; a held-out tenth measures them;
3. **validation** — the evaluation protocol on held-out train cases (half with counterfactual
   targets) with the full editor;
4. ``weights.safetensors`` + ``weights.json`` (encoders), ``memory.safetensors`` + ``memory.json``
   (float16 states), ``CARD.md`` and ``train_log.jsonl`` in the output directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import random
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mmke.data.leaks import record_key_digests
from mmke.editors.trained import save_weights
from mmke.editors.unike.encoders import UniKEEncoders, semantic_loss, supcon_loss
from mmke.editors.unike.memory import LatentMemory, shift, site_outputs
from mmke.io import atomic_save_safetensors, atomic_write_json, atomic_write_text
from mmke.models.base import Example, ModelAdapter, state_digest, target_positions
from mmke.paths import cache_dir
from mmke.progress import progress
from mmke.scoring import INPUT_KINDS, case_inputs

log = logging.getLogger(__name__)

TRIPLETS_VERSION = 2  # bump when what collect_triplets stores changes (invalidates the cache)


@dataclass
class Triplets:
    """States of N train cases at the edited layers: sem/pos/neg [L, N, H] (float16), and
    ``calib`` [L, M, H]: every position of unrelated inputs (text-only questions, questions about
    other images) for calibrating dynamic s."""

    sem: torch.Tensor
    pos: torch.Tensor
    neg: torch.Tensor
    reph: torch.Tensor  # [L, N, H] last question token of the record's paraphrase (same image)
    calib: torch.Tensor
    info: list[dict[str, Any]]  # per case: record index, correct and wrong answer, model correct?


def candidate_answers(records: list) -> dict[str, list[str]]:
    """Per prompt, the answers given to it anywhere in the split (sorted); the wrong-answer pool."""
    by_src: dict[str, set[str]] = {}
    for r in records:
        by_src.setdefault(r.src, set()).add(r.alt.strip())
    return {k: sorted(v) for k, v in by_src.items()}


@torch.no_grad()
def collect_triplets(adapter: ModelAdapter, task, records: list, layers: list[int], site: str,
                     pool: dict[str, list[str]], all_answers: list[str], n_calib: int = 64) -> Triplets:
    """(h_sem, h_pos, h_neg) of each record at ``layers`` with the model's own wrong answer, and
    the calibration states of the first ``n_calib`` records' locality inputs."""
    sem, pos, neg, reph, calib, info = [], [], [], [], [], []
    with progress() as bar:
        ptask = bar.add_task("collecting UniKE triplets", total=len(records) + min(n_calib, len(records)))
        for r in records:
            correct = r.alt.strip()
            cands = pool.get(r.src, [])
            if not [c for c in cands if c != correct]:
                cands = all_answers
            cands = [correct] + [c for c in cands if c != correct]
            img = adapter.load_image(r.image_path)
            batch = adapter.prepare([Example(task.prompt(r.src), " " + c, img) for c in cands]).to(adapter.device)
            with site_outputs(adapter, layers, site) as outs:
                v = adapter.target_view(batch)
            logp = torch.log_softmax(v.logits.float(), -1).gather(-1, v.target_ids.unsqueeze(-1)).squeeze(-1)
            score = (logp * v.mask).sum(1)  # [C] log-likelihood of each candidate answer
            w = 1 + int(score[1:].argmax())  # the model's own (most likely) wrong answer
            p, _, mask = target_positions(batch.labels.to(adapter.device))
            last = p.gather(1, (mask.sum(1, keepdim=True) - 1)).squeeze(1) + 1  # [C] last answer token
            st = torch.stack([outs[l].to(p.device) for l in layers])  # [L, C, T, H] (layers may sit apart)
            sem.append(st[:, 0, p[0, 0]].cpu())  # last question token (the same in every row)
            rb = adapter.prepare([Example(task.prompt(r.rephrase), " " + correct, img)]).to(adapter.device)
            with site_outputs(adapter, layers, site) as routs:
                adapter.target_view(rb)
            rp = int(target_positions(rb.labels.to(adapter.device))[0][0, 0])
            reph.append(torch.stack([routs[l][0, rp].cpu() for l in layers]))
            pos.append(st[:, 0, last[0]].cpu())
            neg.append(st[:, w, last[w]].cpu())
            info.append({"index": r.index, "correct": correct, "wrong": cands[w],
                         "model_correct": bool(score.argmax() == 0)})
            bar.update(ptask, advance=1)
        for r in records[:n_calib]:
            x = case_inputs(r, task, adapter.load_image)
            for kind in ("t_locality", "m_locality"):
                with site_outputs(adapter, layers, site) as outs:
                    adapter.target_view(adapter.prepare([x[kind]]).to(adapter.device))
                calib.append(torch.stack([outs[l][0].cpu() for l in layers]))  # [L, T, H]
            bar.update(ptask, advance=1)
    return Triplets(torch.stack(sem, 1).half().cpu(), torch.stack(pos, 1).half().cpu(),
                    torch.stack(neg, 1).half().cpu(), torch.stack(reph, 1).half().cpu(),
                    torch.cat(calib, 1).half().cpu(), info)


def _triplet_cache(adapter: ModelAdapter, model_name: str, task, records: list, layers: list[int], site: str) -> Path:
    key = json.dumps([TRIPLETS_VERSION, model_name, state_digest(adapter.model), task.name, layers, site,
                      [(r.src, r.alt, str(r.image)) for r in records]])
    return cache_dir() / "unike" / f"triplets-{hashlib.sha256(key.encode()).hexdigest()[:20]}"


def load_or_collect(editor, records: list, all_records: list) -> Triplets:
    """Triplets of ``records`` from the cache, or collected (and cached)."""
    adapter, task = editor.adapter, editor.task
    site = editor.config.site
    base = _triplet_cache(adapter, editor.model_name, task, records, editor.layers, site)
    f, m = base.with_suffix(".safetensors"), base.with_suffix(".json")
    if f.exists() and m.exists():
        t = load_file(str(f))
        log.info("unike: triplets from the cache %s", f)
        return Triplets(t["sem"], t["pos"], t["neg"], t["reph"], t["calib"], json.loads(m.read_text()))
    pool = candidate_answers(all_records)
    answers = sorted({r.alt.strip() for r in all_records})
    tr = collect_triplets(adapter, task, records, editor.layers, site, pool, answers)
    atomic_save_safetensors({"sem": tr.sem, "pos": tr.pos, "neg": tr.neg, "reph": tr.reph, "calib": tr.calib}, f)
    atomic_write_json(m, tr.info, indent=None)
    return tr


def encoder_losses(enc: UniKEEncoders, j: int, hs: torch.Tensor, hp: torch.Tensor, hn: torch.Tensor,
                   hr: torch.Tensor, tau: float) -> dict[str, torch.Tensor]:
    """Losses of layer j on a batch of triplets (raw states [B, H]; hr: the paraphrases' states)."""
    zp, zn = enc.truth(j, hp), enc.truth(j, hn)  # [B, D]
    labels = torch.cat([torch.ones(len(hp)), torch.zeros(len(hn))]).to(hp.device)
    tru = supcon_loss(torch.cat([zp, zn]), labels, tau)
    owner = torch.arange(len(hs), device=hs.device).repeat(2)
    sem = semantic_loss(enc.centred(j, torch.cat([hs, hr])), enc.semantic(j, hp), enc.semantic(j, hn), owner, tau)
    target = (hp - hn).float()
    zeta = F.mse_loss(enc.zeta_map[j]((zp - zn).detach()), target) / target.pow(2).mean().clamp(min=1e-8)
    return {"tru": tru, "sem": sem, "zeta": zeta}


@torch.no_grad()
def encoder_metrics(enc: UniKEEncoders, tr: Triplets, train_idx: torch.Tensor, test_idx: torch.Tensor) -> dict:
    """Held-out measures, averaged over layers: truthfulness nearest-centroid accuracy; semantic
    top-1 (a question's own answer encoding is the nearest of all held-out ones); dynamic s for a
    question's own knowledge vs another question's; W_zeta's explained variance."""
    out: dict[str, list[float]] = {"tru_acc": [], "sem_top1": [], "s_own": [], "s_other": [], "zeta_r2": []}
    for j in range(tr.sem.shape[0]):
        hs, hp, hn = (t[j].float() for t in (tr.sem, tr.pos, tr.neg))
        c_p = F.normalize(enc.truth(j, hp[train_idx]), dim=-1).mean(0)
        c_n = F.normalize(enc.truth(j, hn[train_idx]), dim=-1).mean(0)
        zp, zn = (F.normalize(enc.truth(j, h[test_idx]), dim=-1) for h in (hp, hn))
        acc = torch.cat([(zp @ c_p > zp @ c_n), (zn @ c_n > zn @ c_p)]).float().mean()
        a = F.normalize(enc.centred(j, hs[test_idx]), dim=-1)
        e = F.normalize(enc.semantic(j, hp[test_idx]), dim=-1)
        sim = a @ e.t()  # [n, n]
        n = len(test_idx)
        top1 = (sim.argmax(1) == torch.arange(n)).float().mean()
        own = sim.diagonal().clamp(0, 1).mean()
        other = (sim.clamp(0, 1).sum() - sim.diagonal().clamp(0, 1).sum()) / max(n * (n - 1), 1)
        d = hp[test_idx] - hn[test_idx]
        pred = enc.zeta_map[j](enc.truth(j, hp[test_idx]) - enc.truth(j, hn[test_idx]))
        r2 = 1 - (pred - d).pow(2).sum() / (d - d.mean(0)).pow(2).sum().clamp(min=1e-8)
        for k, v in zip(out, (acc, top1, own, other, r2)):
            out[k].append(float(v))
    return {k: round(sum(v) / len(v), 4) for k, v in out.items()}


def train_encoders(enc: UniKEEncoders, tr: Triplets, *, steps: int, lr: float, batch: int, tau: float,
                   seed: int, log_f: Path) -> dict[str, Any]:
    """Fit the encoders on 90% of the triplets; measure them on the rest."""
    N = tr.sem.shape[1]
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(N, generator=g)
    n_test = max(N // 10, 2)
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    with torch.no_grad():
        enc.state_mean.copy_(tr.sem.float().mean(1))
    params = list(enc.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    enc.train()
    before = encoder_metrics(enc, tr, train_idx, test_idx)
    t0 = time.time()
    with progress() as bar, open(log_f, "w") as logf:
        ptask = bar.add_task("training UniKE encoders", total=steps)
        for step in range(1, steps + 1):
            idx = train_idx[torch.randint(len(train_idx), (min(batch, len(train_idx)),), generator=g)]
            parts: dict[str, float] = {}
            loss = torch.zeros(())
            for j in range(tr.sem.shape[0]):
                ls = encoder_losses(enc, j, tr.sem[j, idx].float(), tr.pos[j, idx].float(),
                                    tr.neg[j, idx].float(), tr.reph[j, idx].float(), tau)
                for k, v in ls.items():
                    loss = loss + v
                    parts[k] = parts.get(k, 0.0) + float(v.detach()) / tr.sem.shape[0]
            opt.zero_grad()
            loss.backward()
            opt.step()
            bar.update(ptask, advance=1, description=f"training UniKE encoders loss={float(loss.detach()):.3f}")
            if step % 50 == 0 or step == steps or step == 1:
                logf.write(json.dumps({"step": step, **{k: round(v, 4) for k, v in parts.items()},
                                       "elapsed_s": round(time.time() - t0, 1)}) + "\n")
    enc.eval()
    for p in params:
        p.requires_grad_(False)
    return {"before": before, "after": encoder_metrics(enc, tr, train_idx, test_idx),
            "n_train": len(train_idx), "n_test": n_test, "test_idx": test_idx}


@torch.no_grad()
def calibrate_floor(enc: UniKEEncoders, tr: Triplets, mem: LatentMemory, test_idx: torch.Tensor, *, k: int,
                    tau: float, quantile: float, n_edits: int = 8, seed: int = 0) -> dict[str, Any]:
    """Set ``enc.s_floor`` per layer to the ``quantile`` of the cosine behind dynamic s on inputs
    unrelated to an edit, and report s for the edit's own question before and after.

    An "edit" is a held-out question q: its knowledge P is the top-k memory entries for its state
    (its own entry among them, as an edit's own states are). Unrelated inputs are every position
    of text-only and other-image questions (``tr.calib``) and the other held-out questions."""
    g = torch.Generator().manual_seed(seed)
    edits = test_idx[torch.randperm(len(test_idx), generator=g)[:n_edits]]
    report: dict[str, list[float]] = {"floor": [], "s_own_raw": [], "s_own": [], "s_paraphrase": [],
                                      "s_unrelated_mean": []}
    for j, layer in enumerate(mem.layers):
        mu = mem.mean[j]
        sem = lambda x: enc.semantic(j, x)  # noqa: E731
        own, para, other = [], [], []
        for q in edits.tolist():
            P = mem.pos[j, mem.retrieve(layer, mem.sem[j, q], k)].float()
            hs = mem.sem[j, q].float()[None, None]
            own.append(shift(hs, P, mu, tau, None, sem)[1].flatten())
            para.append(shift(tr.reph[j, q].float()[None, None], P, mu, tau, None, sem)[1].flatten())
            rest = mem.sem[j, test_idx[test_idx != q]].float()
            x = torch.cat([tr.calib[j].float(), rest])[None]  # [1, M, H]
            other.append(shift(x, P, mu, tau, None, sem)[1].flatten())
        # raw cosines (floor 0) of unrelated inputs; clamp(., 0, 1) keeps the quantile meaningful
        floor = float(torch.quantile(torch.cat(other), quantile))
        floor = min(max(floor, 0.0), 0.95)
        enc.s_floor[j] = floor
        own_t = torch.cat(own)
        report["floor"].append(floor)
        report["s_own_raw"].append(float(own_t.mean()))
        report["s_own"].append(float(((own_t - floor) / (1 - floor)).clamp(0, 1).mean()))
        report["s_paraphrase"].append(float(((torch.cat(para) - floor) / (1 - floor)).clamp(0, 1).mean()))
        report["s_unrelated_mean"].append(float(((torch.cat(other) - floor) / (1 - floor)).clamp(0, 1).mean()))
    return {k2: [round(v, 4) for v in vs] for k2, vs in report.items()}


def fit_unike(editor, records: list, out: str | Path, cfg, command: str = "") -> dict[str, Any]:
    """Build the memory, train the encoders, validate, and write the weights directory."""
    from mmke.train.editors import counterfactual_records, iter_cases, validate

    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ec = editor.config
    recs = list(records)
    random.Random(cfg.seed).shuffle(recs)
    if cfg.max_train_records:
        recs = recs[: cfg.max_train_records]
    if len(recs) <= cfg.val_size + 10:
        raise ValueError(f"need more than {cfg.val_size + 10} train records, got {len(recs)}")
    val_recs, mem_recs = recs[: cfg.val_size], recs[cfg.val_size: cfg.val_size + ec.memory_entries]
    tr = load_or_collect(editor, mem_recs, records)
    t_collect = time.time() - t0
    metrics = train_encoders(editor.module, tr, steps=ec.enc_steps, lr=ec.enc_lr, batch=ec.enc_batch,
                             tau=ec.enc_tau, seed=cfg.seed, log_f=out / "train_log.jsonl")
    t_enc = time.time() - t0 - t_collect
    editor.memory = LatentMemory(editor.layers, tr.sem, tr.pos, tr.neg, {
        "task": editor.task.name, "model": editor.model_name, "site": ec.site,
        "records": [i["index"] for i in tr.info],
        "input_keys": record_key_digests(mem_recs),  # for the leak test: no eval input in the memory
        "model_correct_fraction": round(sum(i["model_correct"] for i in tr.info) / len(tr.info), 4)})
    metrics["dynamic_s"] = calibrate_floor(editor.module, tr, editor.memory, metrics.pop("test_idx"), k=ec.k,
                                           tau=ec.tau, quantile=ec.s_quantile, seed=cfg.seed)
    val = {}
    if cfg.val_size:
        val_cases = iter_cases(counterfactual_records(val_recs, cfg.counterfactual, cfg.seed), editor.task,
                               editor.adapter)  # decoded one case at a time
        val = validate(editor, val_cases)
    wall = time.time() - t0
    meta = {
        "method": editor.name, "task": editor.task.name, "model": editor.model_name,
        "architecture": editor.architecture(),
        "train_config": {"enc_steps": ec.enc_steps, "enc_lr": ec.enc_lr, "enc_batch": ec.enc_batch,
                         "enc_tau": ec.enc_tau, "s_quantile": ec.s_quantile, "seed": cfg.seed, "val_size": cfg.val_size,
                         "counterfactual": cfg.counterfactual},
        "n_memory_entries": len(editor.memory), "encoders": metrics, "validation": val,
        "command": command, "wall_s": {"triplets": round(t_collect, 1), "encoders": round(t_enc, 1),
                                       "total": round(wall, 1)},
        "train_wall_s_total": round(wall, 1),
        "hardware": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"
                    if editor.adapter.device.type == "cpu" else f"{editor.adapter.device}, torch {torch.__version__}",
        "date": date.today().isoformat(),
    }
    editor.memory.save(out)
    save_weights(out, editor.module, meta)
    write_card(out, meta)
    return meta


def write_card(out: Path, meta: dict[str, Any]) -> Path:
    """CARD.md from the measured metadata."""
    enc, val, tc = meta["encoders"], meta["validation"], meta["train_config"]
    rows = "\n".join(f"| {k} | {enc['before'][k]:.3f} | {enc['after'][k]:.3f} |" for k in enc["after"])
    val_row = " | ".join(f"{100 * val[k]:.1f}" for k in INPUT_KINDS) if val else "not run"
    arch = "\n".join(f"- `{k}` = `{json.dumps(v)}`" for k, v in meta["architecture"].items())
    text = f"""# UniKE encoders and latent-IKE memory for `{meta['model']}` on the `{meta['task']}` task

`weights.safetensors` (semantic and truthfulness encoders and W_zeta per edited layer; metadata in
`weights.json`), `memory.safetensors` (float16 hidden states h_sem, h_pos, h_neg of
{meta['n_memory_entries']} train cases at the edited layers, site `{meta['architecture']['site']}`; `memory.json`),
`train_log.jsonl` (encoder losses). Every UniKE variant reads this directory.

**Reproduce**
```bash
{meta['command']}
```

**Training**: triplets (question + image, correct answer, the model's own most likely wrong
answer) from {meta['n_memory_entries']} train-split cases; encoders trained {tc['enc_steps']} steps of
{tc['enc_batch']} triplets (Adam, lr {tc['enc_lr']}, temperature {tc['enc_tau']}, seed {tc['seed']}).
Wall time {meta['wall_s']['total']:.0f} s ({meta['wall_s']['triplets']:.0f} s collecting triplets,
{meta['wall_s']['encoders']:.0f} s training encoders, the rest validation) on {meta['hardware']}
({meta['date']}).

**Encoders** (held-out {enc['n_test']} triplets, mean over layers; before / after training):

| measure | before | after |
|---|---|---|
{rows}

`tru_acc`: positive vs negative by nearest centroid in the truthfulness space; `sem_top1`: a
question's own answer encoding is the nearest to its state; `s_own` / `s_other`: dynamic s for a
question's own knowledge / another question's; `zeta_r2`: variance of h_pos - h_neg explained by
W_zeta (EncTru(h_pos) - EncTru(h_neg)).

**Dynamic s** (per layer; the floor is the {tc['s_quantile']} quantile of the cosine on inputs unrelated
to an edit: every position of text-only and other-image questions, and other questions):
floor {enc['dynamic_s']['floor']}, s on the edit's own question {enc['dynamic_s']['s_own']}
(raw cosine {enc['dynamic_s']['s_own_raw']}), on its paraphrase {enc['dynamic_s']['s_paraphrase']}, mean s on
unrelated inputs {enc['dynamic_s']['s_unrelated_mean']}.

**Validation** ({tc['val_size']} held-out train cases, {int(100 * tc['counterfactual'])}% with a
counterfactual target, one-step protocol, full UniKE, percent):

| Rel | T-Gen | M-Gen | T-Loc | M-Loc |
|---|---|---|---|---|
| {val_row} |

**Architecture options**
{arch}
"""
    return atomic_write_text(out / "CARD.md", text)
