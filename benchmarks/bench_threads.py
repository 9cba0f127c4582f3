"""Threads on a small shared CPU: wall time of one fixed mmke job with 1 thread and with every core,
alone and while a second copy of the job runs beside it (the situation of two runs, or a run and
the test suite, sharing a laptop). Every configuration is measured in this one run, alternately,
so the ratios compare like with like.

    .venv/bin/python benchmarks/bench_threads.py [--method ft-lm] [--cases 8] [--repeats 2]

The job is ``mmke run --method M --task vqa --limit N`` in a fresh process (model load included),
into a temporary directory. "loaded" starts a second identical job with 1 thread at the same time
and times the first one only. Raw output: ``--out`` (default runs/bench/bench_threads.json).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from mmke.io import atomic_write_json

MMKE = [sys.executable, "-m", "mmke.cli"]


def job(method: str, cases: int, threads: int, out: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MMKE_THREADS": str(threads)}
    return subprocess.Popen([*MMKE, "run", "--method", method, "--task", "vqa", "--limit", str(cases),
                             "--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def timed(method: str, cases: int, threads: int, loaded: bool) -> float:
    with tempfile.TemporaryDirectory() as d:
        other = job(method, cases, 1, Path(d) / "other") if loaded else None
        t = time.perf_counter()
        p = job(method, cases, threads, Path(d) / "main")
        _, err = p.communicate()
        wall = time.perf_counter() - t
        if other is not None:
            other.communicate()
        if p.returncode:
            raise SystemExit(f"the benchmark job failed:\n{err.decode()[-2000:]}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", default="ft-lm")
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/bench_threads.json"))
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    configs = [(t, loaded) for loaded in (False, True) for t in sorted({1, cores})]
    walls: dict[str, list[float]] = {f"{t} thread(s), {'loaded' if ld else 'alone'}": [] for t, ld in configs}
    for _ in range(args.repeats):
        for t, ld in configs:
            walls[f"{t} thread(s), {'loaded' if ld else 'alone'}"].append(timed(args.method, args.cases, t, ld))
    med = {k: statistics.median(v) for k, v in walls.items()}
    result = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {cores} cores",
              "job": f"mmke run --method {args.method} --task vqa --limit {args.cases}",
              "repeats": args.repeats, "wall_s": walls, "median_s": med}
    atomic_write_json(args.out, result)
    print(f"{result['job']} on {result['machine']} (median of {args.repeats}):")
    print("| threads, machine | wall s | vs 1 thread in the same state |")
    print("|---|---|---|")
    for k, v in med.items():
        base = med[f"1 thread(s), {k.split(', ')[1]}"]
        print(f"| {k} | {v:.1f} | {v / base:.2f}x |")


if __name__ == "__main__":
    main()
