"""Atomic file writes: every JSON, text and safetensors file mmke writes goes through here.

A write goes to a temporary file in the destination's folder, is flushed and fsynced, and then
replaces the destination with ``os.replace`` (atomic on POSIX and Windows). A process killed at any
moment (even SIGKILL) leaves either the old file or the new one, never a torn mix; at worst an
orphaned ``.<name>.<random>.tmp`` file stays behind, which nothing reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_save_safetensors",
           "atomic_torch_save", "atomic_publish_dir", "file_digest"]


def atomic_write_bytes(path: str | Path, data: bytes | Iterable[bytes], mode: int = 0o644) -> Path:
    """Write ``data`` (bytes, or an iterable of chunks) to ``path`` atomically; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in ([data] if isinstance(data, (bytes, bytearray)) else data):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_publish_dir(out: str | Path, write: Callable[[Path], None]) -> Path:
    """Make folder ``out`` whole or not at all: ``write`` fills a private temporary folder beside it,
    which is then renamed to ``out``. Processes racing to make the same folder each write their own;
    the first rename wins and the others' copies are removed (the contents must not depend on who
    writes them, e.g. a cache)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        write(tmp)
        try:
            os.rename(tmp, out)
        except OSError:
            if not out.is_dir():  # not another process's finished folder: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def atomic_write_text(path: str | Path, text: str) -> Path:
    """UTF-8 text, atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, **kwargs: Any) -> Path:
    """JSON (``indent=1`` unless given), atomically, with a trailing newline."""
    kwargs.setdefault("indent", 1)
    return atomic_write_text(path, json.dumps(obj, **kwargs) + "\n")


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path,
                            metadata: dict[str, str] | None = None) -> Path:
    """A safetensors file (tensors made contiguous and moved to the CPU), atomically."""
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    return atomic_write_bytes(path, data)


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """A ``torch.save`` checkpoint (tensors and plain containers only, so that it loads with
    ``weights_only=True``), atomically."""
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def file_digest(path: str | Path | None) -> str | None:
    """sha256 (16 hex) of a file's bytes, or None without a file."""
    if path is None:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]
