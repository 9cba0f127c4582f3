"""The bundled trained editors on the default model: `mmke run` loads them by default, the edit
lands, and the CLI explains what to do when weights are missing."""

import pytest
from typer.testing import CliRunner

from mmke.cli import app
from mmke.editors.trained import bundled_weights_dir, read_weights
from mmke.eval.runner import Run, RunConfig

pytestmark = pytest.mark.slow
TRAINED = ["mend", "mend-vision", "ke", "serac"]


@pytest.mark.parametrize("method", TRAINED)
@pytest.mark.parametrize("task", ["vqa", "caption"])
def test_bundled_weights_exist_with_card(method, task):
    d = bundled_weights_dir(method, task)
    _, meta = read_weights(d)
    assert meta["method"] == method and meta["task"] == task and meta["model"] == "default"
    assert "mmke train --method" in meta["command"]
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
    r = CliRunner().invoke(app, ["train", "--method", "mend", "--model", "tiny-llava"])
    assert r.exit_code == 2 and "--out is required" in r.output
