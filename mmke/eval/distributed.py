"""Distributed evaluation: ``torchrun --nproc-per-node N -m mmke run ...`` (one node or several
through torchrun's rendezvous) deals a run's groups (:mod:`mmke.eval.settings`; a one-step group is
one case) to ranks, each rank a whole model replica.

Only the standard variables torchrun sets are read (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``; ``MASTER_ADDR``/``MASTER_PORT`` through ``init_process_group``). With
``WORLD_SIZE`` unset or 1 a run is an ordinary one-process run.

The protocol, per run directory:

1. rank 0 creates (or checks) ``run.json``; after a barrier every other rank checks that its own
   configuration and inputs match it (so nodes with another model file or library version are
   refused by name, and a node that cannot see the directory is told it needs a shared one);
2. every rank reads the rows already written — ``cases.jsonl`` and every rank's shard under
   ``shards/`` — and, after a barrier, deals the groups not yet done to ranks (round-robin or
   contiguous); a rank writes only its own shard ``shards/rank-<r>.jsonl`` (same durability as
   ``cases.jsonl``: a killed rank resumes its shard at the first unfinished group and case);
3. after a barrier rank 0 merges ``cases.jsonl`` and every shard into ``cases.jsonl`` in the
   one-process run's order, deletes the shards and writes ``summary.json``; the metrics equal a
   one-process run's on the same configuration; the other ranks return the same summary.

A one-process run resumed in a directory a torchrun run left (killed before its merge) merges the
shards first, so either kind of run resumes the other. A lifelong stream is one sequence of edits
on one model and cannot be dealt to ranks: it is refused under torchrun.

Devices: a rank's model goes to ``cuda:LOCAL_RANK`` (modulo the node's GPUs) when CUDA is
available and no ``--device`` was given (a bare ``--device cuda`` means the same), else where
``--device`` says, else the CPU. ``--device-map`` is refused (each rank would spread its replica
over every GPU of the node). The ranks only meet at barriers (no tensors are exchanged): NCCL when
every local rank has a GPU of its own, gloo otherwise (CPU, or ranks sharing a GPU);
``MMKE_DIST_BACKEND`` overrides. Barriers wait ``MMKE_DIST_TIMEOUT_S`` seconds (default one day:
ranks finish their shards at different times). Ranks other than 0 are quiet (``MMKE_QUIET``).
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence, TypeVar

import torch

from mmke.eval.store import CaseStore, read_rows
from mmke.io import atomic_write_bytes

log = logging.getLogger(__name__)
SHARDS = "shards"
CASES = "cases.jsonl"
SHARD_MODES = ("round-robin", "contiguous")
ShardMode = Literal["round-robin", "contiguous"]
T = TypeVar("T")


# ---- dealing groups to ranks ---------------------------------------------------------------
def share(items: Sequence[T], rank: int, world: int, mode: str = "round-robin") -> list[T]:
    """The items of ``rank`` among ``world`` ranks: round-robin (items rank, rank + world, ...) or
    contiguous (one consecutive block per rank, sizes differing by at most one). Every item goes to
    exactly one rank, in its original order."""
    if mode not in SHARD_MODES:
        raise ValueError(f"--shard {mode!r}: choose one of {', '.join(SHARD_MODES)}")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of {world} ranks")
    if mode == "round-robin":
        return list(items[rank::world])
    base, extra = divmod(len(items), world)
    start = rank * base + min(rank, extra)
    return list(items[start:start + base + (rank < extra)])


# ---- shard files ---------------------------------------------------------------------------
def shard_path(out: str | Path, rank: int) -> Path:
    return Path(out) / SHARDS / f"rank-{rank:05d}.jsonl"


def shard_files(out: str | Path) -> list[Path]:
    folder = Path(out) / SHARDS
    return sorted(folder.glob("rank-*.jsonl")) if folder.is_dir() else []


def has_shards(out: str | Path) -> bool:
    return bool(shard_files(out))


class ShardedStore:
    """One rank's view of a distributed run's results: the rows of ``cases.jsonl`` and of every
    rank's shard as they were when opened (for ``key in store``), plus what this rank writes —
    to its own shard only. Quacks as :class:`~mmke.eval.store.CaseStore` does for the runner."""

    def __init__(self, out: str | Path, rank: int, base: CaseStore) -> None:
        own = shard_path(out, rank)
        own.parent.mkdir(parents=True, exist_ok=True)
        self.own = CaseStore(own)  # drops a partial last line of this rank's own shard only
        self.done: dict[str, dict[str, Any]] = dict(base.done)
        for f in shard_files(out):
            if f != own:
                for row in read_rows(f)[0]:  # others' shards: read, never truncated
                    self.done.setdefault(row["key"], row)
        self.done.update(self.own.done)

    def __contains__(self, key: str) -> bool:
        return key in self.done

    def __len__(self) -> int:
        return len(self.done)

    def add(self, row: dict[str, Any]) -> None:
        self.own.add(row)
        self.done[row["key"]] = row

    def rows(self) -> list[dict[str, Any]]:
        return sorted(self.done.values(), key=lambda r: r["index"])


def stored_rows(out: str | Path) -> dict[str, dict[str, Any]]:
    """Every complete row of ``out`` — ``cases.jsonl``, then each rank's shard — one per key (the
    first written), in file order. Reads only: a run may be writing them meanwhile."""
    out = Path(out)
    rows: dict[str, dict[str, Any]] = {}
    for f in [out / CASES, *shard_files(out)]:
        if f.exists():
            for row in read_rows(f)[0]:
                rows.setdefault(row["key"], row)
    return rows


def merge_shards(out: str | Path, order: Sequence[str]) -> CaseStore:
    """Fold ``cases.jsonl`` and every shard of ``out`` into ``cases.jsonl`` — rows in ``order``
    (the keys of the run's plan: a one-process run's order, so that its summary is reproduced
    exactly), then any others in file order; one row per key — written atomically, then delete the
    shards. Idempotent: killed after the write and before the deletion, a later merge gives the
    same file. Returns the merged store."""
    out = Path(out)
    main = out / CASES
    shards = shard_files(out)
    rows = stored_rows(out)
    ordered = [rows.pop(k) for k in order if k in rows] + list(rows.values())
    atomic_write_bytes(main, b"".join((json.dumps(r, sort_keys=True) + "\n").encode() for r in ordered))
    for f in shards:
        f.unlink(missing_ok=True)
    try:
        (out / SHARDS).rmdir()
    except OSError:  # absent, or holds something that is not ours
        pass
    return CaseStore(main)


# ---- ranks ---------------------------------------------------------------------------------
def _env_int(name: str, default: int | None = None) -> int | None:
    v = os.environ.get(name, "").strip()
    if not v:
        return default
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"environment variable {name}={v!r} is not an integer (torchrun sets it)") from None


def world_from_env() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 when unset)."""
    return _env_int("WORLD_SIZE", 1) or 1


@dataclass
class Ranks:
    """This process's place among the ranks of a distributed run."""

    rank: int
    world: int
    local_rank: int
    local_world: int
    shard: str = "round-robin"
    device: str | None = None  # where this rank's model goes when the run gives no --device
    backend: str = "gloo"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, shard: str = "round-robin", device: str | None = None) -> "Ranks | None":
        """The ranks torchrun describes in the environment, or None for a one-process run."""
        world = world_from_env()
        if world <= 1:
            return None
        if shard not in SHARD_MODES:
            raise ValueError(f"--shard {shard!r}: choose one of {', '.join(SHARD_MODES)}")
        rank = _env_int("RANK")
        if rank is None:
            raise ValueError(f"WORLD_SIZE={world} but RANK is unset: start distributed runs with torchrun")
        local_rank = _env_int("LOCAL_RANK", 0)
        local_world = _env_int("LOCAL_WORLD_SIZE", world)
        dev, own_gpu = rank_device(device, local_rank, local_world)
        backend = os.environ.get("MMKE_DIST_BACKEND") or ("nccl" if own_gpu else "gloo")
        return cls(rank, world, local_rank, local_world, shard, dev, backend)

    # ---- collective steps ----
    def barrier(self) -> None:
        import torch.distributed as dist

        if self.backend == "nccl" and self.device and self.device.startswith("cuda"):
            dist.barrier(device_ids=[torch.device(self.device).index or 0])
        else:
            dist.barrier()

    def in_turn(self, fn: Callable[[], T]) -> T:
        """``fn()`` on rank 0, then (after a barrier) on every other rank."""
        if self.is_main:
            result = fn()
        self.barrier()
        if not self.is_main:
            result = fn()
        return result

    def share(self, items: Sequence[T]) -> list[T]:
        return share(items, self.rank, self.world, self.shard)

    # ---- checks ----
    def check(self, cfg: Any) -> None:
        """Refuse what cannot be dealt to ranks (``cfg``: a RunConfig)."""
        if cfg.setting == "lifelong":
            raise ValueError(f"--setting lifelong is one stream of {cfg.k} edits applied in order on one model: "
                             f"it cannot be split across the {self.world} ranks of this torchrun run; run it "
                             "without torchrun (sequential and cross-task groups, and one-step cases, are split)")
        if getattr(cfg, "device_map", None) is not None:
            raise ValueError(f"--device-map {cfg.device_map} with torchrun: every one of the {self.world} ranks "
                             "would spread its replica over the same GPUs; use --device-map in one process "
                             "(a model larger than one GPU) or torchrun with one GPU per rank")

    def placed(self, cfg: T) -> T:
        """``cfg`` with this rank's device when it names none (device is not part of a run's
        identity, so every rank's configuration still matches rank 0's run.json)."""
        given = getattr(cfg, "device", None)
        if given is None or given == "cuda":
            dev = rank_device(given, self.local_rank, self.local_world)[0]
            if dev != "cpu" or given is not None:
                return cfg.model_copy(update={"device": dev})
        return cfg

    def check_shared_dir(self, out: Path, run_file: str) -> None:
        if not self.is_main and not (out / run_file).exists():
            raise ValueError(f"{out / run_file}, written by rank 0, is not visible to rank {self.rank}: "
                             "a run on several nodes needs --out on a filesystem every node shares")

    def info(self) -> dict[str, Any]:
        return {"world_size": self.world, "shard": self.shard, "backend": self.backend}


def rank_device(device: str | None, local_rank: int, local_world: int) -> tuple[str, bool]:
    """(this rank's device, whether every local rank has a GPU of its own). No ``device`` (or a
    bare ``cuda``): ``cuda:LOCAL_RANK`` modulo the node's GPUs when CUDA is available, else CPU."""
    if device not in (None, "cuda"):
        return device, False
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        if device == "cuda":
            raise ValueError("--device cuda: CUDA is not available here")
        return "cpu", False
    n = torch.cuda.device_count()
    if local_world > n:
        log.warning("%d ranks on this node share its %d GPU(s) (rank-local GPU = LOCAL_RANK mod %d)",
                    local_world, n, n)
    return f"cuda:{local_rank % n}", local_world <= n


# ---- the session ---------------------------------------------------------------------------
_ACTIVE: Ranks | None = None


def current() -> Ranks | None:
    """The ranks of the distributed session this process is in (:func:`session`), or — when the
    caller set up torch.distributed itself with more than one rank — ranks read from it; None in a
    one-process run."""
    if _ACTIVE is not None:
        return _ACTIVE
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        local_rank = _env_int("LOCAL_RANK", 0) or 0
        local_world = _env_int("LOCAL_WORLD_SIZE", dist.get_world_size()) or dist.get_world_size()
        backend = dist.get_backend()
        dev = rank_device(None, local_rank, local_world)[0] if backend == "nccl" else None
        return Ranks(dist.get_rank(), dist.get_world_size(), local_rank, local_world,
                     device=dev, backend=backend)
    return None


def timeout_s() -> float:
    v = os.environ.get("MMKE_DIST_TIMEOUT_S", "").strip()
    try:
        return float(v) if v else 86400.0
    except ValueError:
        raise ValueError(f"MMKE_DIST_TIMEOUT_S={v!r} is not a number of seconds") from None


@contextmanager
def session(shard: str = "round-robin", device: str | None = None) -> Iterator[Ranks | None]:
    """Join the torchrun job the environment describes (``init_process_group``) for the duration
    of the block and yield its :class:`Ranks`; yield None in a one-process run. Ranks other than 0
    are quiet (``MMKE_QUIET=1``) within the block."""
    global _ACTIVE
    ranks = Ranks.from_env(shard, device)
    if ranks is None:
        yield None
        return
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this torch build")
    owned = not dist.is_initialized()
    if ranks.device and ranks.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(ranks.device))
    if owned:
        dist.init_process_group(ranks.backend, timeout=timedelta(seconds=timeout_s()))
    else:
        ranks.backend = dist.get_backend()
    quiet = os.environ.get("MMKE_QUIET")
    if not ranks.is_main:
        os.environ["MMKE_QUIET"] = "1"
    log.debug("rank %d of %d (local %d), %s, device %s", ranks.rank, ranks.world, ranks.local_rank,
              ranks.backend, ranks.device)
    _ACTIVE = ranks
    try:
        yield ranks
    finally:
        _ACTIVE = None
        if quiet is None:
            os.environ.pop("MMKE_QUIET", None)
        else:
            os.environ["MMKE_QUIET"] = quiet
        if owned and dist.is_initialized():
            dist.destroy_process_group()


def finish(ranks: Ranks, out: Path, order: Sequence[str], summarise: Callable[[CaseStore], dict[str, Any]],
           summary_file: str = "summary.json") -> dict[str, Any]:
    """After every rank's groups: rank 0 merges the shards (in ``order``), checks that every row of
    the plan is there, and summarises; every rank returns that summary."""
    ranks.barrier()  # every shard complete
    if ranks.is_main:
        store = merge_shards(out, order)
        missing = [k for k in order if k not in store]
        if missing:
            raise RuntimeError(f"{out}: {len(missing)} of {len(order)} results are missing after merging the "
                               f"shards of {ranks.world} ranks (first: {missing[0]}); on several nodes --out "
                               "must be on a filesystem every node shares")
        summary = summarise(store)
    ranks.barrier()  # summary.json written
    if not ranks.is_main:
        summary = json.loads((out / summary_file).read_text())
    return summary


__all__ = ["Ranks", "ShardedStore", "current", "finish", "has_shards", "merge_shards", "rank_device",
           "session", "share", "shard_files", "shard_path", "world_from_env"]
