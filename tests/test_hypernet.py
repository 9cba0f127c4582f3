"""MEND, MEND-vision and KE on tiny Hugging Face models: training writes loadable weights, an edit
moves the output toward the target and restores exactly, trained weights give the same edit twice,
saved edits reload, and broken weight files fail clearly."""

import json

import pytest
import torch

from mmke.data.schema import load_records
from mmke.editors.base import EditRequest
from mmke.editors.ke import KEConfig, KEEditor
from mmke.editors.mend import MENDConfig, MENDEditor, MENDVisionConfig, MENDVisionEditor
from mmke.scoring import INPUT_KINDS
from mmke.models.base import state_digest, target_nll
from mmke.models.tiny import tiny_blip2, tiny_llava
from mmke.tasks import TASKS
from mmke.train.editors import EditorTrainConfig, make_cases, train_editor
from tests.toydata import write_toy_mmedit

LM_SITES = ["lm.ffn_value.-2", "lm.ffn_value.-1"]
EDITORS = {
    "mend": (MENDEditor, lambda **kw: MENDConfig(sites=LM_SITES, rank=16, init_lr=0.05, **kw)),
    "ke": (KEEditor, lambda **kw: KEConfig(sites=LM_SITES, hidden=16, init_step=2.0, **kw)),
    "mend-vision": (MENDVisionEditor, lambda **kw: MENDVisionConfig(rank=16, init_lr=0.05, **kw)),
}
TRAIN = EditorTrainConfig(steps=3, batch_size=2, val_size=2, val_every=3, ckpt_every=1, counterfactual=1.0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    f = write_toy_mmedit(tmp_path_factory.mktemp("toy"))
    return load_records(f).records


def _train(name, adapter, records, out, cfg=TRAIN):
    cls, make = EDITORS[name]
    ed = cls(adapter, make(), task=TASKS["vqa"], untrained=True)
    return train_editor(ed, records, out, cfg)


def _load(name, adapter, out):
    cls, make = EDITORS[name]
    return cls(adapter, make(weights=str(out)), task=TASKS["vqa"])


@pytest.mark.parametrize("name,build", [("mend", tiny_llava), ("ke", tiny_llava), ("mend", tiny_blip2),
                                        ("mend-vision", tiny_llava)])
def test_trained_editor_edits_restores_and_reloads(name, build, toy, tmp_path):
    adapter = build()
    meta = _train(name, adapter, toy, tmp_path / "w")
    assert meta["method"] == name and set(meta["validation"]) == set(INPUT_KINDS)
    assert (tmp_path / "w" / "CARD.md").exists() and len((tmp_path / "w" / "train_log.jsonl").read_text().splitlines()) == 3
    ed = _load(name, adapter, tmp_path / "w")
    case = make_cases(toy[:1], TASKS["vqa"], adapter)[0]
    exs = [case.inputs[k] for k in INPUT_KINDS]
    digest = state_digest(adapter.model)
    with torch.no_grad():
        before = adapter.run(exs).logits
        nll0 = target_nll(adapter.run([case.inputs["reliability"]])).item()
    h = ed.edit(case.request)
    with torch.no_grad():
        edited = adapter.run(exs).logits
        nll1 = target_nll(adapter.run([case.inputs["reliability"]])).item()
    assert nll1 < nll0  # the edit moves the model toward the target
    h.save(tmp_path / "edit")
    h.remove()
    assert state_digest(adapter.model) == digest
    with torch.no_grad():
        assert torch.equal(adapter.run(exs).logits, before)
    # determinism: the same trained weights give the same edit
    h2 = _load(name, adapter, tmp_path / "w").edit(case.request)
    with torch.no_grad():
        assert torch.equal(adapter.run(exs).logits, edited)
    h2.remove()
    # a saved edit reloads to identical outputs
    h3 = ed.load(tmp_path / "edit")
    with torch.no_grad():
        assert torch.equal(adapter.run(exs).logits, edited)
    h3.remove()
    assert state_digest(adapter.model) == digest


def test_training_resumes_from_checkpoint(toy, tmp_path):
    adapter = tiny_llava()
    _train("mend", adapter, toy, tmp_path, TRAIN.model_copy(update={"steps": 2, "val_every": 2}))
    _train("mend", adapter, toy, tmp_path, TRAIN.model_copy(update={"steps": 4, "val_every": 2}))
    steps = [json.loads(x)["step"] for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # the second call did steps 3 and 4 only
    assert json.loads((tmp_path / "weights.json").read_text())["train_config"]["steps"] == 4


def test_broken_or_missing_weights_fail_clearly(toy, tmp_path):
    adapter = tiny_llava()
    _train("ke", adapter, toy, tmp_path / "w", TRAIN.model_copy(update={"steps": 1, "val_every": 1}))
    f = tmp_path / "w" / "weights.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncated
    with pytest.raises(ValueError, match="weights.safetensors"):
        _load("ke", adapter, tmp_path / "w")
    f.write_bytes(b"\x00" * 64)  # garbage
    with pytest.raises(ValueError, match="corrupt"):
        _load("ke", adapter, tmp_path / "w")
    with pytest.raises(FileNotFoundError, match="mmke train --method mend"):
        MENDEditor(adapter, MENDConfig(sites=LM_SITES), task=TASKS["vqa"])  # nothing bundled for tiny-llava
    # weights trained with other options do not load silently
    _train("mend", adapter, toy, tmp_path / "m", TRAIN.model_copy(update={"steps": 1, "val_every": 1}))
    with pytest.raises(ValueError, match="shape|architecture"):
        MENDEditor(adapter, MENDConfig(sites=LM_SITES, rank=8, weights=str(tmp_path / "m")), task=TASKS["vqa"])


def test_sequential_hypernet_edits_unwind(toy):
    adapter = tiny_llava()
    ed = MENDEditor(adapter, MENDConfig(sites=LM_SITES, rank=16, init_lr=0.05), task=TASKS["vqa"], untrained=True)
    cases = make_cases(toy[:2], TASKS["vqa"], adapter)
    digest = state_digest(adapter.model)
    h1 = ed.edit(cases[0].request)
    d1 = state_digest(adapter.model)
    h2 = ed.edit(cases[1].request)
    assert state_digest(adapter.model) not in (digest, d1)
    h2.remove()
    assert state_digest(adapter.model) == d1
    h1.remove()
    assert state_digest(adapter.model) == digest


def test_edit_request_passes_through_untrained_equals_gradient_step(toy):
    """An untrained MEND (identity network) is a normalised gradient step: the loss goes down."""
    adapter = tiny_llava()
    ed = MENDEditor(adapter, MENDConfig(sites=LM_SITES, rank=16, init_lr=0.05), task=TASKS["vqa"], untrained=True)
    ex = make_cases(toy[:1], TASKS["vqa"], adapter)[0].inputs["reliability"]
    with torch.no_grad():
        nll0 = target_nll(adapter.run([ex])).item()
    h = ed.edit(EditRequest(ex))
    with torch.no_grad():
        assert target_nll(adapter.run([ex])).item() < nll0
    h.remove()
