"""A run's identity: the library versions it records, and the check that a directory holds the
very run being resumed (same configuration, same inputs) with a message that says what differs."""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

PLACEMENT_FIELDS = ("device", "device_map")  # RunConfig fields outside a run's identity


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("mmke", "torch", "transformers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


_PROVENANCE_WORDS = {"versions": "library versions", "model_digest": "the model's weights",
                     "editor_weights_digest": "the editor's trained weights", "data_digest": "the data file",
                     "train_data_digest": "the train file", "benchmark": "the benchmark build"}


def check_same_run(out: Path, old: dict[str, Any], mine: dict[str, Any],
                   option_defaults: dict[str, Any] | None = None) -> None:
    """Raise a ValueError saying what differs when ``out`` holds another run. Both sides are
    compared as JSON holds them (a tuple option reads back as a list). ``option_defaults``: the
    method's option defaults; an option the old run's ``method_config`` lacks (added to the method
    later) matches where this run keeps it at its default, which is what the old run ran."""
    old, mine = json.loads(json.dumps(old)), json.loads(json.dumps(mine))
    oc, mc = old.get("config", {}), mine["config"]
    defaults = json.loads(json.dumps(option_defaults or {}))
    om, mm = oc.get("method_config"), mc.get("method_config")
    if isinstance(om, dict) and isinstance(mm, dict):
        added = {k: v for k, v in mm.items() if k not in om and k in defaults and defaults[k] == v}
        oc = {**oc, "method_config": {**om, **added}}
    # a run written before the settings existed was a one-step run
    if oc and "setting" not in oc and "setting" in mc:
        oc = {**oc, "setting": "one-step", "k": 1, "checkpoints": [], "probes": 100}
    if oc and "dtype" not in oc and "dtype" in mc:  # written before --dtype existed: fp32
        oc = {**oc, "dtype": "fp32"}
    if oc and "train_image_root" not in oc and "train_image_root" in mc:  # written before the option existed
        oc = {**oc, "train_image_root": None}
    if oc and "targets" not in oc and "targets" in mc:  # written before --targets existed
        oc = {**oc, "targets": "as-drawn"}
    # where a run computes (device, device map) is not what it computes: a run may resume elsewhere
    oc = {k: v for k, v in oc.items() if k not in PLACEMENT_FIELDS}
    mc = {k: v for k, v in mc.items() if k not in PLACEMENT_FIELDS}
    if oc != mc:
        diff = sorted(k for k in set(oc) | set(mc) if oc.get(k) != mc.get(k))
        raise ValueError(f"{out} holds a run with a different configuration (differs in: "
                         f"{', '.join(diff)}); use another --out or delete the directory")
    op, mp = old.get("provenance", {}), mine["provenance"]
    changed = []
    # where it ran is not compared; nor the train file, for a method that does not read it (a run
    # made before such methods stopped hashing it holds its digest)
    ignored = {"placement"} | ({"train_data_digest"} if mp.get("train_data_digest") is None else set())
    for k in sorted((set(op) | set(mp)) - ignored):
        if op.get(k) != mp.get(k):
            a, b = op.get(k), mp.get(k)
            if isinstance(a, dict) and isinstance(b, dict):
                detail = ", ".join(f"{n} {a.get(n)} -> {b.get(n)}" for n in sorted(set(a) | set(b))
                                   if a.get(n) != b.get(n))
            else:
                detail = f"{a} -> {b}"
            changed.append(f"{_PROVENANCE_WORDS.get(k, k)} ({detail})")
    if changed:
        raise ValueError(f"{out} holds a run of the same configuration made with other inputs: "
                         f"{'; '.join(changed)}; resuming would mix their numbers. Use another --out "
                         "or delete the directory")


__all__ = ["PLACEMENT_FIELDS", "check_same_run", "library_versions"]
