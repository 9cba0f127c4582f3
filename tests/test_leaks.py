"""No evaluation input of any kind appears in a train split or in an editor's memory, on the
benchmark `mmke run` uses by default and the weights mmke ships (the builder's own leak tests on
small builds are in test_data.py)."""

import json

import pytest

from mmke.data.bundled import default_benchmark_dir, ensure_benchmark
from mmke.data.leaks import EVAL_FILES, _keys, check_benchmark_dir, key_digest
from mmke.data.schema import load_records
from mmke.editors.trained import bundled_weights_dir
from mmke.io import file_digest
from mmke.paths import ASSETS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bench():
    return ensure_benchmark(default_benchmark_dir())


@pytest.fixture(scope="module")
def eval_digests(bench):
    """Digests of every input of every eval file of the default benchmark."""
    recs = [r for name in EVAL_FILES for r in load_records(bench / name, bench).records]
    return {key_digest(k) for k in _keys(recs)}


def test_default_benchmark_train_and_eval_share_no_input(bench):
    got = check_benchmark_dir(bench)
    assert got["shared"] == 0 and got["eval_inputs"] > 1000 and got["train_inputs"] > 1000
    manifest = json.loads((bench / "manifest.json").read_text())
    assert manifest["version"] == 2 and manifest["leak_check"]["shared"] == 0


def _shipped(kind: str) -> list:
    return sorted(p for p in (ASSETS / "editors").glob(f"*/{kind}"))


def test_no_eval_input_in_any_shipped_editor_memory(eval_digests):
    memories = _shipped("memory.json")
    assert memories, "no shipped latent-IKE memory found"
    for m in memories:
        keys = json.loads(m.read_text()).get("input_keys")
        assert keys, f"{m}: the memory does not record its inputs"
        assert not set(keys) & eval_digests, f"{m}: holds evaluation inputs"


def test_shipped_editors_were_trained_on_the_leak_free_train_split(bench):
    """Every shipped trained editor records the train file it saw; it must be the default
    benchmark's train split for its task, which shares no input with the eval files."""
    metas = _shipped("weights.json")
    assert metas
    for f in metas:
        meta = json.loads(f.read_text())
        d = f.parent
        assert d == bundled_weights_dir(meta["method"], meta["task"])
        data = meta.get("train_data") or {}
        want = bench / f"{meta['task']}_train.json"
        assert data.get("digest") == file_digest(want), (
            f"{d.name}: trained on {data.get('file')} ({data.get('digest')}), not on {want} — retrain it")
