"""The bundled trained editors on the default model: `mmke run` loads them by default, the edit
lands, and the CLI explains what to do when weights are missing."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmke.cli import app
from mmke.editors.trained import bundled_weights_dir, read_weights
from mmke.eval.runner import Run, RunConfig

pytestmark = pytest.mark.slow
TRAINED = ["mend", "mend-vision", "ke", "serac", "serac-mm", "unike", "unike-plus"]


@pytest.mark.parametrize("method", TRAINED)
@pytest.mark.parametrize("task", ["vqa", "caption"])
def test_bundled_weights_exist_with_card(method, task):
    d = bundled_weights_dir(method, task)
    _, meta = read_weights(d)
    assert meta["method"] == method and meta["task"] == task and meta["model"] == "default"
    assert "mmke train --method" in meta["command"] and "--replace-bundled" in meta["command"]
    assert (d / "CARD.md").exists() and (d / "train_log.jsonl").exists()


@pytest.mark.parametrize("method", TRAINED)
def test_run_loads_bundled_weights(method, default_adapter, tmp_path):
    s = Run(RunConfig(method=method, task="vqa", limit=2), tmp_path / method, adapter=default_adapter).execute()
    assert s["n_cases"] == 2 and s["method"] == method
    if method != "mend-vision":  # the vision side is the hard one (MMEdit's finding): no promise
        assert s["metrics"]["reliability"] > s["pre_edit_metrics"]["reliability"]


def test_train_cli_rejects_untrainable_and_unknown():
    r = CliRunner().invoke(app, ["train", "--method", "ft-lm"])
    assert r.exit_code == 2 and "nothing to train" in r.output
    r = CliRunner().invoke(app, ["train", "--method", "nope"])
    assert r.exit_code == 2 and "unknown method" in r.output
    r = CliRunner().invoke(app, ["train", "--method", "mend", "--model", "tiny-llava", "--replace-bundled"])
    assert r.exit_code == 2 and "--replace-bundled" in r.output


def test_train_without_out_never_touches_the_tracked_tree(tmp_path, monkeypatch):
    """`mmke train` without --out writes under the mmke cache and says where; the shipped weights
    (and everything else git tracks) stay as they were."""
    import subprocess

    from mmke.paths import cache_dir

    repo = Path(__file__).resolve().parents[1]
    status = lambda: subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=repo,  # noqa: E731
                                    capture_output=True, text=True).stdout
    before = status()
    bench = cache_dir() / "easyvqa-lite"  # reuse the built benchmark, train into a fresh cache
    monkeypatch.setenv("MMKE_CACHE", str(tmp_path))
    (tmp_path / "easyvqa-lite").symlink_to(bench)
    r = CliRunner().invoke(app, ["train", "--method", "mend", "--task", "vqa", "--model", "tiny-llava",
                                 "--steps", "1", "--val-size", "2", "--val-every", "1"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "trained" / "tiny-llava" / "mend-vqa"
    assert (out / "weights.safetensors").exists() and str(out) in r.output.replace("\n", "")
    assert status() == before
