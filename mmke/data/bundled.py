"""Where the bundled benchmark lives by default, and building it on first use."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from mmke.paths import cache_dir

log = logging.getLogger(__name__)
DEFAULT_SEED = 0


def default_benchmark_dir(seed: int = DEFAULT_SEED, counterfactual: bool = False) -> Path:
    """``$MMKE_CACHE/easyvqa-lite/seed-<S>[-counterfactual]`` (``~/.cache/mmke`` by default)."""
    return cache_dir() / "easyvqa-lite" / (f"seed-{seed}" + ("-counterfactual" if counterfactual else ""))


def ensure_benchmark(out: Path, seed: int = DEFAULT_SEED) -> Path:
    """Build the bundled benchmark into ``out`` unless a complete build for the current default
    model's predictions is already there."""
    from mmke.data.build import build_benchmark
    from mmke.models.default import weights_digest

    manifest = out / "manifest.json"
    if manifest.exists():
        m = json.loads(manifest.read_text())
        if (m.get("seed") == seed and not m.get("counterfactual")
                and m.get("weights") in (None, weights_digest())):
            return out
        log.info("%s was built for other default-model weights; rebuilding", out)
    log.info("building the bundled benchmark (seed %d) under %s", seed, out)
    build_benchmark(out, seed=seed)
    return out
