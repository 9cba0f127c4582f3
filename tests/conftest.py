"""Shared fixtures. The default model loads once per session (a 45 s GGUF conversion the very
first time on a machine, cached afterwards)."""

import os

import pytest

os.environ.setdefault("MMKE_QUIET", "1")


@pytest.fixture(scope="session")
def default_adapter():
    from mmke.models.default import DefaultAdapter

    return DefaultAdapter()


@pytest.fixture
def one_thread():
    """Run a test on one thread: tiny models are faster so, and CI shares two cores."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
