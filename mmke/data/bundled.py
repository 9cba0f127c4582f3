"""Where the bundled benchmark lives by default, and building it on first use.

Version 2 (the default, :mod:`mmke.data.build_v2`) lives in ``$MMKE_CACHE/easyvqa-lite/v2-seed-<S>``;
version 1 keeps its original folders ``seed-<S>[-counterfactual]``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from mmke.paths import cache_dir

log = logging.getLogger(__name__)
DEFAULT_SEED = 0
DEFAULT_VERSION = 2


def default_benchmark_dir(seed: int = DEFAULT_SEED, counterfactual: bool = False,
                          version: int = DEFAULT_VERSION) -> Path:
    """``$MMKE_CACHE/easyvqa-lite/v2-seed-<S>`` for version 2, ``.../seed-<S>[-counterfactual]``
    for version 1 (``~/.cache/mmke`` by default). ``counterfactual`` is a version-1 option."""
    if version == 2:
        if counterfactual:
            raise ValueError("counterfactual is a version-1 option: version 2 already mixes "
                             "counterfactual cases into its eval files")
        return cache_dir() / "easyvqa-lite" / f"v2-seed-{seed}"
    if version != 1:
        raise ValueError(f"benchmark version must be 1 or 2, got {version!r}")
    return cache_dir() / "easyvqa-lite" / (f"seed-{seed}" + ("-counterfactual" if counterfactual else ""))


def ensure_benchmark(out: Path, seed: int = DEFAULT_SEED, version: int = DEFAULT_VERSION) -> Path:
    """Build the bundled benchmark (``version``, ``seed``) into ``out`` unless a complete build of
    that version and seed, for the current default model's predictions, is already there."""
    from mmke.data.build import build_benchmark
    from mmke.models.default import weights_digest

    manifest = out / "manifest.json"
    if manifest.exists():
        m = json.loads(manifest.read_text())
        if (m.get("version", 1) == version and m.get("seed") == seed and not m.get("counterfactual")
                and m.get("weights") in (None, weights_digest())):
            return out
        log.info("%s holds another build (version, seed or default-model weights); rebuilding", out)
    log.info("building the bundled benchmark v%d (seed %d) under %s", version, seed, out)
    build_benchmark(out, seed=seed, version=version)
    return out


def benchmark_of(data: str | None) -> dict[str, Any] | None:
    """Version and content hash of the built benchmark a data file belongs to (its manifest)."""
    if data is None:
        return None
    f = Path(data).parent / "manifest.json"
    if not f.exists():
        return None
    try:
        m = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return {"version": m.get("version", 1), "content_hash": m.get("content_hash"), "seed": m.get("seed")}
