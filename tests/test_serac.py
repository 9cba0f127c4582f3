"""SERAC on tiny Hugging Face models: trained with the shared editor loop on toy MMEdit records,
an edit moves the output to its target, remove() restores exactly, saved edits reload identically,
and weights problems give clear errors."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from mmke.data.schema import load_records
from mmke.editors.base import EditRequest
from mmke.editors.serac import SERACConfig, SERACEditor
from mmke.scoring import INPUT_KINDS
from mmke.models.base import target_nll
from mmke.models.tiny import tiny_blip2, tiny_llava
from mmke.tasks import TASKS
from mmke.train.editors import EditorTrainConfig, make_cases, train_editor

BUILDERS = {"tiny-llava": tiny_llava, "tiny-blip2": tiny_blip2}
COLOURS = {"red": (220, 20, 20), "green": (20, 190, 20), "blue": (20, 20, 220), "yellow": (230, 210, 0)}
SHAPES = ("circle", "square")
TINY = dict(lora_layers=[-1], lora_rank=4, scope_hidden=64, scope_dim=32)  # small and quick


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one thread (the shared fixture of conftest.py)."""


def _draw(path: Path, colour: str, shape: str, offset: int) -> None:
    im = Image.new("RGB", (32, 32), (255, 255, 255))
    box = [offset, offset, offset + 16, offset + 16]
    d = ImageDraw.Draw(im)
    (d.ellipse if shape == "circle" else d.rectangle)(box, fill=COLOURS[colour])
    im.save(path)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """Eight MMEdit records about coloured shapes: two questions per image, the rephrased image has
    the same colour and shape, the m_loc image differs in both."""
    root = tmp_path_factory.mktemp("toy")
    recs = []
    colours = list(COLOURS)
    for i, c in enumerate(colours):
        shape = SHAPES[i % 2]
        other_c, other_s = colours[(i + 2) % 4], SHAPES[(i + 1) % 2]
        for k in range(2):
            _draw(root / f"{c}{k}.png", c, shape, 3 + 7 * k)
        for q, rq, alt in [("what color is the shape?", "what is the colour of the shape?", c),
                           ("what shape is present?", "what shape is in the image?", shape)]:
            recs.append(dict(src=q, alt=alt, rephrase=rq, image=f"{c}0.png", image_rephrase=f"{c}1.png",
                             loc="nq question: what is the capital of france?", loc_ans="paris",
                             m_loc=f"{other_c}0.png", m_loc_q=f"is there a {other_s}?", m_loc_a="yes"))
    (root / "train.json").write_text(json.dumps(recs))
    return load_records(root / "train.json").records


@pytest.fixture(scope="module", params=list(BUILDERS))
def trained(request, records, tmp_path_factory):
    """(model name, weights dir) of SERAC trained a few steps on the toy records."""
    name = request.param
    adapter = BUILDERS[name]()
    editor = SERACEditor(adapter, SERACConfig(**TINY), task=TASKS["vqa"], untrained=True, model_name=name)
    out = tmp_path_factory.mktemp(f"serac-{name}")
    cfg = EditorTrainConfig(steps=40, batch_size=4, lr=1e-2, val_size=2, val_every=40, counterfactual=0.25)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        meta = train_editor(editor, records, out, cfg)
    finally:
        torch.set_num_threads(n)
    assert meta["method"] == "serac" and (out / "weights.safetensors").exists() and (out / "CARD.md").exists()
    return name, out


def _editor(name: str, weights: Path, **options) -> SERACEditor:
    return SERACEditor(BUILDERS[name](), SERACConfig(**TINY, weights=str(weights), **options),
                       task=TASKS["vqa"], model_name=name)


def _case(editor: SERACEditor, record):
    inputs = make_cases([record], TASKS["vqa"], editor.adapter)[0].inputs
    return inputs, [inputs[k] for k in INPUT_KINDS]


def test_edit_lands_restores_exactly_and_reloads(trained, records, tmp_path):
    name, weights = trained
    ed = _editor(name, weights)
    adapter = ed.adapter
    inputs, exs = _case(ed, records[0])
    edit_in = inputs["reliability"]
    edit_in = type(edit_in)(edit_in.prompt, " yellow", edit_in.image)  # a counterfactual target
    with torch.no_grad():
        before = adapter.run(exs).logits
        nll0 = target_nll(adapter.run([edit_in])).item()
    handle = ed.edit(EditRequest(edit_in, records[0].to_dict()))
    assert adapter.run_wrappers, "the routing wrapper is installed"
    with torch.no_grad():
        nll1 = target_nll(adapter.run([edit_in])).item()
        edited = adapter.run(exs).logits
    assert nll1 < nll0 - 0.5, (nll0, nll1)
    handle.save(tmp_path / "edit")
    handle.remove()
    assert adapter.run_wrappers == []
    with torch.no_grad():
        assert torch.equal(adapter.run(exs).logits, before)
    h2 = ed.load(tmp_path / "edit")
    with torch.no_grad():
        assert torch.equal(adapter.run(exs).logits, edited)
    h2.remove()
    with torch.no_grad():
        assert torch.equal(adapter.run(exs).logits, before)
    # a saved edit is self-contained: another editor with the same weights reloads it identically
    other = _editor(name, weights)
    h3 = other.load(tmp_path / "edit")
    with torch.no_grad():
        assert torch.equal(other.adapter.run(exs).logits, edited)
    h3.remove()


def test_same_weights_give_the_same_edit(trained, records):
    name, weights = trained
    outs = []
    for _ in range(2):
        ed = _editor(name, weights)
        inputs, exs = _case(ed, records[3])
        h = ed.edit(EditRequest(inputs["reliability"], records[3].to_dict()))
        with torch.no_grad():
            outs.append(ed.adapter.run(exs).logits)
        h.remove()
    assert torch.equal(outs[0], outs[1])


def test_sequential_edits_route_to_their_own_fact_and_unwind(trained, records):
    name, weights = trained
    ed = _editor(name, weights)
    adapter = ed.adapter
    a, exs_a = _case(ed, records[0])
    b, exs_b = _case(ed, records[5])
    exs = exs_a + exs_b
    with torch.no_grad():
        before = adapter.run(exs).logits
    h1 = ed.edit(EditRequest(a["reliability"], records[0].to_dict()))
    with torch.no_grad():
        after_first = adapter.run(exs).logits
    h2 = ed.edit(EditRequest(b["reliability"], records[5].to_dict()))
    with torch.no_grad():
        p = ed.scope_scores([a["reliability"], b["reliability"]])
    assert p.shape == (2, 2) and p[0, 0] > p[0, 1] and p[1, 1] > p[1, 0]
    # an edit's own input is routed with its own fact: run alone it equals the counterfactual model
    with torch.no_grad():
        own = ed.counterfactual_run(adapter.run_plain, [b["reliability"]], ed.fact(b["reliability"]))
        assert torch.equal(adapter.run([b["reliability"]]).logits, own.logits)
    h2.remove()
    with torch.no_grad():
        assert torch.equal(adapter.run(exs).logits, after_first)
    h1.remove()
    assert adapter.run_wrappers == []
    with torch.no_grad():
        assert torch.equal(adapter.run(exs).logits, before)


def test_scope_classifier_separates_in_from_out_of_scope(trained, records):
    name, weights = trained
    ed = _editor(name, weights)
    gaps = []
    for rec in records:
        inputs, _ = _case(ed, rec)
        h = ed.edit(EditRequest(inputs["reliability"], rec.to_dict()))
        with torch.no_grad():
            p = ed.scope_scores([inputs[k] for k in INPUT_KINDS])[:, 0]
        h.remove()
        gaps.append((p[:3].min() - p[3:].max()).item())
    # in-scope (edit input, rephrase, rephrased image) above out-of-scope (text loc, image loc)
    assert sum(g > 0 for g in gaps) >= len(gaps) - 1, gaps


def test_weights_errors(trained, tmp_path):
    name, weights = trained
    bad = tmp_path / "bad"
    shutil.copytree(weights, bad)
    data = (bad / "weights.safetensors").read_bytes()
    (bad / "weights.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="weights.safetensors"):
        _editor(name, bad)
    with pytest.raises(FileNotFoundError, match="mmke train --method serac"):
        SERACEditor(BUILDERS[name](), SERACConfig(**TINY), task=TASKS["vqa"], model_name=name)
    with pytest.raises(FileNotFoundError, match="mmke train --method serac"):
        _editor(name, tmp_path / "empty")
    # weights trained with other options do not load silently
    with pytest.raises(ValueError, match="architecture|shape"):
        SERACEditor(BUILDERS[name](), SERACConfig(**{**TINY, "lora_rank": 2}, weights=str(weights)),
                    task=TASKS["vqa"], model_name=name)


def test_saved_edit_errors(trained, records, tmp_path):
    name, weights = trained
    ed = _editor(name, weights)
    inputs, _ = _case(ed, records[1])
    h = ed.edit(EditRequest(inputs["reliability"]))
    h.save(tmp_path / "e")
    h.remove()
    info = json.loads((tmp_path / "e" / "edit.json").read_text())
    info["method"] = "ike"
    (tmp_path / "e" / "edit.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="not 'serac'"):
        ed.load(tmp_path / "e")
