"""How many CPU threads torch uses for mmke's work.

``OMP_NUM_THREADS`` (or ``MMKE_THREADS``) wins when set. Otherwise mmke takes the cores that are
idle when a command starts: all of them on a quiet machine, fewer when other processes are
running (``os.getloadavg``), never fewer than one. On a shared 2-core machine one thread per
process is faster than two threads fighting another job for the same cores (docs/RESULTS.md,
"Threads", has the measurement)."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def default_threads() -> int:
    for var in ("MMKE_THREADS", "OMP_NUM_THREADS"):
        v = os.environ.get(var, "").strip()
        if v.isdigit() and int(v) > 0:
            return int(v)
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return cores
    return max(1, min(cores, int(cores - busy + 0.5)))


def configure_threads() -> int:
    """Set torch's intra-op threads to :func:`default_threads` and return the number."""
    import torch

    n = default_threads()
    torch.set_num_threads(n)
    log.debug("using %d CPU thread(s)", n)
    return n
