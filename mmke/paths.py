"""Where mmke keeps caches and bundled assets."""

from __future__ import annotations

import os
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"


def cache_dir() -> Path:
    """Cache root: ``$MMKE_CACHE`` or ``~/.cache/mmke``. Holds converted weights, never user data."""
    root = Path(os.environ.get("MMKE_CACHE", Path.home() / ".cache" / "mmke"))
    root.mkdir(parents=True, exist_ok=True)
    return root
