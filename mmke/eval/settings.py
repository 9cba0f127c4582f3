"""Evaluation settings as schedules: each cuts the seeded stream of cases into groups and says, for
each group, after how many of its edits to score what. The runner has one loop for all of them
(apply a group's edits one after another, score at the group's checkpoints, remove the edits and
verify the model, persist) — SPEC §3.

- ``one-step``: groups of one case; the model is restored after every edit (MMEdit's protocol).
- ``sequential`` (K): groups of K consecutive cases of the seeded order; the K edits are applied
  without restoring, then every case of the group is scored (locality against outputs computed
  before the group), then the group is removed and the model checked bit-identical to the original.
- ``cross-task`` (K): ``sequential`` over a stream that interleaves the tasks' cases (E-VQA, E-IC,
  E-VQA, ...); metrics per task and overall.
- ``lifelong`` (K, checkpoints): one stream of K edits; at each checkpoint c, every edit made so
  far is scored (reliability = retention of the earlier edits, T-/M-Generality) and a fixed probe
  set — the locality inputs of the first ``probes`` cases of the stream — gives T-/M-Locality
  against outputs computed before the stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from mmke.scoring import EDIT_METRICS, LOCALITY_METRICS, METRICS

SETTINGS = ("one-step", "sequential", "cross-task", "lifelong")


@dataclass(frozen=True)
class Case:
    """One edit case of a stream: its durable key, task and MMEdit record."""

    key: str
    task: str
    record: Any


@dataclass(frozen=True)
class Scored:
    """At a checkpoint: which cases to score, and on which metrics."""

    case: Case
    metrics: tuple[str, ...]


@dataclass
class Group:
    """Cases edited one after another on one model, then removed; ``checkpoints`` are the numbers
    of the group's edits after which to score (``scored(n)``)."""

    index: int
    cases: list[Case]
    checkpoints: tuple[int, ...]
    probes: list[Case] = field(default_factory=list)  # lifelong: the fixed locality probe set
    lifelong: bool = False

    def row_key(self, n: int, key: str) -> str:
        """The stored row of case ``key`` scored after ``n`` edits (lifelong: one per checkpoint)."""
        return f"cp{n}:{key}" if self.lifelong else key

    def scored(self, n: int) -> list[Scored]:
        if not self.lifelong:
            return [Scored(c, METRICS) for c in self.cases]
        out = {c.key: Scored(c, EDIT_METRICS) for c in self.cases[:n]}
        for c in self.probes:
            both = c.key in out
            out[c.key] = Scored(c, METRICS if both else LOCALITY_METRICS)
        return list(out.values())


def interleave(streams: Sequence[Sequence[Case]]) -> list[Case]:
    """a1, b1, a2, b2, ... (a longer stream's tail last)."""
    out: list[Case] = []
    for i in range(max((len(s) for s in streams), default=0)):
        out += [s[i] for s in streams if i < len(s)]
    return out


def groups(setting: str, cases: list[Case], k: int = 1, checkpoints: Sequence[int] = (),
           probes: int = 100) -> list[Group]:
    """The groups of ``setting`` over the stream ``cases`` (already in its seeded order; cross-task:
    already interleaved)."""
    if setting == "one-step":
        k = 1
    if setting in ("one-step", "sequential", "cross-task"):
        return [Group(i, cases[s:s + k], (len(cases[s:s + k]),)) for i, s in enumerate(range(0, len(cases), k))]
    if setting == "lifelong":
        cps = tuple(sorted({c for c in checkpoints if 1 <= c <= len(cases)} | {len(cases)}))
        return [Group(0, list(cases), cps, probes=list(cases[:probes]), lifelong=True)]
    raise ValueError(f"unknown setting {setting!r}; known: {', '.join(SETTINGS)}")


def parse_checkpoints(text: str | Sequence[int] | None, k: int) -> tuple[int, ...]:
    """``"1,10,100,1000"`` -> (1, 10, 100, 1000); default: powers of ten up to K, and K."""
    if text is None or text == "":
        cps = [10 ** i for i in range(0, 7) if 10 ** i <= k] + [k]
    elif isinstance(text, str):
        try:
            cps = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--checkpoints {text!r}: give comma-separated numbers of edits, e.g. 1,10,100") from None
    else:
        cps = list(text)
    bad = [c for c in cps if c < 1 or c > k]
    if bad:
        raise ValueError(f"--checkpoints {bad}: each must be between 1 and K = {k}")
    return tuple(sorted(set(cps) | {k}))


__all__ = ["SETTINGS", "Case", "Group", "Scored", "groups", "interleave", "parse_checkpoints"]
