"""How a lifelong run's stream of edits contradicts itself, at each checkpoint: distinct (content
class, question class) pairs edited, edits that repeat a pair with the same target or contradict it
with another, and the highest retention an editor with perfect generality within each pair can
reach (:func:`mmke.eval.scope.contradictions`). Then, per run given, retention at the last
checkpoint split into the edits whose target is still their pair's latest and those a later edit
of the same pair overrode.

    .venv/bin/python scripts/stream_conflicts.py runs/ll/vqa-grace runs/ll/vqa-serac-mm

Reads each run's ``run.json`` and its data file (the stream is rebuilt in the run's seeded order);
the stream table is the first run's. Prints Markdown. Content classes are those the records'
``image_rephrase`` links (labels-free, any MMEdit-layout file); ``--easyvqa-labels`` (the bundled
benchmark) uses easy-vqa's own colour-shape labels instead, which the links only partly reveal,
and adds how many of the probe set's M-Locality inputs are then in scope at each checkpoint, and
each run's M-Locality at its last checkpoint over the probes out of scope by the labels, in scope by
the labels only, and in scope by the links. ``--by-target`` adds each run's retention at its last
checkpoint per target answer (an editor that collapses a question type onto one answer keeps the
edits to that answer and no other).
"""

from __future__ import annotations

import argparse
from functools import lru_cache
from pathlib import Path

from mmke.data.schema import norm_text
from mmke.eval.runner import run_stream
from mmke.eval.scope import EditScope, contradictions
from mmke.eval.store import CaseStore


def easyvqa_class(image: str) -> tuple[str, str]:
    """easy-vqa's (colour, shape) of an image of the bundled benchmark (``images/<split>/<id>.png``)."""
    p = Path(image)
    return _labels(p.parent.name)[int(p.stem)]


@lru_cache(maxsize=None)
def _labels(split: str) -> dict:
    from mmke.data import easyvqa_source as ev

    return ev.image_labels(split)


def stream(run_dir: Path):
    cfg, cases = run_stream(run_dir)
    if cfg.setting != "lifelong":
        raise SystemExit(f"{run_dir}: a {cfg.setting} run; this reads lifelong runs")
    return cfg, cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dirs", type=Path, nargs="+")
    ap.add_argument("--easyvqa-labels", action="store_true",
                    help="content classes from easy-vqa's colour-shape labels (the bundled benchmark)")
    ap.add_argument("--by-target", action="store_true",
                    help="each run's retention at its last checkpoint per target answer")
    args = ap.parse_args()
    cfg, cases = stream(args.run_dirs[0])
    records = [c.record for c in cases[: cfg.k]]
    image_class = easyvqa_class if args.easyvqa_labels else None
    classes = "easy-vqa colour-shape labels" if image_class else "image_rephrase links"
    print(f"{args.run_dirs[0]}: {len(records)} edits in stream order (seed {cfg.seed}); content classes: "
          f"{classes}\n")
    print("| edits | pairs edited | same pair, same target | same pair, other target | "
          "retention bound: latest wins | retention bound: best per pair |")
    print("|---|---|---|---|---|---|")
    for c in contradictions(records, cfg.checkpoints, image_class):
        print(f"| {c['n_edits']} | {c['classes']} | {c['same_target']} | {c['contradicting']} | "
              f"{100 * c['latest_wins']:.1f} | {100 * c['best_consistent']:.1f} |")
    if image_class is not None:  # the probes (the first cases' M-Locality inputs) in scope
        probes = records[: cfg.probes]
        both = {"links": EditScope(records), "labels": EditScope(records, image_class)}
        print(f"\n| edits | probes in scope of the edits so far, of {len(probes)}: by links | by labels |")
        print("|---|---|---|")
        for n in cfg.checkpoints:
            counts = [sum(sc.probe_key(p) in cov for p in probes)
                      for sc in both.values() for cov in [sc.covered(records[:n])]]
            print(f"| {n} | {counts[0]} | {counts[1]} |")
    print("\n| run | retention | on edits still their pair's latest target | on edits a later edit overrode |")
    print("|---|---|---|---|")
    for d in args.run_dirs:
        cfg, cases = stream(d)
        n = cfg.checkpoints[-1]
        scope = EditScope((c.record for c in cases), image_class)
        latest = {scope.edit_key(c.record): norm_text(c.record.alt) for c in cases[:n]}
        rel = {r["key"]: r["metrics"]["reliability"] for r in CaseStore(d / "cases.jsonl").rows()
               if r.get("checkpoint") == n and "reliability" in r["metrics"]}
        kept, over = [], []
        for c in cases[:n]:
            v = rel.get(f"cp{n}:{c.key}")
            if v is not None:
                (kept if norm_text(c.record.alt) == latest[scope.edit_key(c.record)] else over).append(v)
        mean = lambda v: f"{100 * sum(v) / len(v):.1f} (n = {len(v)})" if v else "–"  # noqa: E731
        print(f"| {d} | {mean(kept + over)} | {mean(kept)} | {mean(over)} |")
    if image_class is not None:
        _m_locality_by_scope(args.run_dirs, image_class)
    if args.by_target:
        _retention_by_target(args.run_dirs)


def _retention_by_target(run_dirs: list[Path]) -> None:
    """Per run, retention at the last checkpoint per target answer, most frequent targets first."""
    for d in run_dirs:
        cfg, cases = stream(d)
        n = cfg.checkpoints[-1]
        rel = {r["key"]: r["metrics"]["reliability"] for r in CaseStore(d / "cases.jsonl").rows()
               if r.get("checkpoint") == n and "reliability" in r["metrics"]}
        by: dict[str, list[float]] = {}
        for c in cases[:n]:
            v = rel.get(f"cp{n}:{c.key}")
            if v is not None:
                by.setdefault(norm_text(c.record.alt), []).append(v)
        print(f"\n{d}, retention after {n} edits per target answer:\n")
        print("| target | edits | retention |")
        print("|---|---|---|")
        for t, v in sorted(by.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            print(f"| {t} | {len(v)} | {100 * sum(v) / len(v):.1f} |")


def _m_locality_by_scope(run_dirs: list[Path], image_class) -> None:
    """Per run, M-Locality at the last checkpoint over the probes split by whether the edits so far
    reach them by the records' links and by the labels (in scope by links is in scope by labels
    wherever the links join images of one label, as on the bundled benchmark)."""
    print("\n| run | M-Loc | out of scope by labels | in scope by labels only | in scope by links |")
    print("|---|---|---|---|---|")
    for d in run_dirs:
        cfg, cases = stream(d)
        n = cfg.checkpoints[-1]
        records = [c.record for c in cases]
        links, labels = EditScope(records), EditScope(records, image_class)
        cov_links, cov_labels = links.covered(records[:n]), labels.covered(records[:n])
        mloc = {r["key"]: r["metrics"]["m_locality"] for r in CaseStore(d / "cases.jsonl").rows()
                if r.get("checkpoint") == n and "m_locality" in r["metrics"]}
        split: dict[str, list[float]] = {"all": [], "out": [], "labels only": [], "links": []}
        for c in cases[: cfg.probes]:
            v = mloc.get(f"cp{n}:{c.key}")
            if v is None:
                continue
            split["all"].append(v)
            in_links, in_labels = links.probe_key(c.record) in cov_links, labels.probe_key(c.record) in cov_labels
            split["links" if in_links else "labels only" if in_labels else "out"].append(v)
        mean = lambda v: f"{100 * sum(v) / len(v):.1f} (n = {len(v)})" if v else "–"  # noqa: E731
        print(f"| {d} | {' | '.join(mean(v) for v in split.values())} |")


if __name__ == "__main__":
    main()
