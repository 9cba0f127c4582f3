"""Shared fixtures. The default model loads once per session (a 45 s GGUF conversion the very
first time on a machine, cached afterwards)."""

import os

import pytest

os.environ.setdefault("MMKE_QUIET", "1")


@pytest.fixture(scope="session")
def default_adapter():
    from mmke.models.default import DefaultAdapter

    return DefaultAdapter()
