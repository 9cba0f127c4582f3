"""SERAC on tiny Hugging Face models, both variants: ``serac`` (the published method, a text-only
scope classifier) and ``serac-mm`` (mmke's image-aware classifier). Trained with the shared editor
loop on toy MMEdit records: an edit lands, remove() restores exactly, saved edits reload
identically, weights problems give clear errors; ``serac`` never looks at the image, ``serac-mm``
puts the edit's question about another image out of scope."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from mmke.data.schema import load_records
from mmke.editors.base import EditRequest
from mmke.editors.serac import SERACConfig, SERACEditor, SERACMMConfig, SERACMMEditor
from mmke.editors.trained import load_module_weights
from mmke.models.base import target_nll
from mmke.models.tiny import tiny_blip2, tiny_llava
from mmke.registry import METHODS, editor_class
from mmke.scoring import INPUT_KINDS
from mmke.tasks import TASKS
from mmke.train.editors import EditorTrainConfig, make_cases, train_editor

BUILDERS = {"tiny-llava": tiny_llava, "tiny-blip2": tiny_blip2}
COLOURS = {"red": (220, 20, 20), "green": (20, 190, 20), "blue": (20, 20, 220), "yellow": (230, 210, 0)}
SHAPES = ("circle", "square")
# small and quick; per variant: (editor, config, options, training steps per model). serac-mm's
# image embedding needs 80 steps to settle on tiny-llava; on tiny-blip2, whose random vision side
# barely reaches the LM states, longer training only lowers its scores below the 0.9 threshold
VARIANTS = {
    "serac": (SERACEditor, SERACConfig, dict(lora_layers=[-1], lora_rank=4, scope_hidden=64),
              {"tiny-llava": 30, "tiny-blip2": 30}),
    "serac-mm": (SERACMMEditor, SERACMMConfig, dict(lora_layers=[-1], lora_rank=4, scope_hidden=64, scope_dim=32),
                 {"tiny-llava": 80, "tiny-blip2": 40}),
}


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


def _make(variant: str, model: str, weights: Path | None = None, **options):
    cls, cfg_cls, tiny, _ = VARIANTS[variant]
    cfg = cfg_cls(**{**tiny, **options}, **({"weights": str(weights)} if weights else {}))
    return cls(BUILDERS[model](), cfg, task=TASKS["vqa"], untrained=weights is None, model_name=model)


@pytest.fixture(scope="module", params=[(v, m) for v in VARIANTS for m in BUILDERS], ids=lambda p: "-".join(p))
def trained(request, records, tmp_path_factory):
    """(variant, model name, weights dir) of SERAC trained a few steps on the toy records."""
    variant, name = request.param
    editor = _make(variant, name)
    out = tmp_path_factory.mktemp(f"{variant}-{name}")
    steps = VARIANTS[variant][3][name]
    cfg = EditorTrainConfig(steps=steps, batch_size=4, lr=1e-2, val_size=2, val_every=steps, counterfactual=0.25)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        meta = train_editor(editor, records, out, cfg)
    finally:
        torch.set_num_threads(n)
    assert meta["method"] == variant and (out / "weights.safetensors").exists() and (out / "CARD.md").exists()
    return variant, name, out


def _editor(trained, **options):
    variant, name, weights = trained
    return _make(variant, name, weights, **options)


def _case(editor, record):
    inputs = make_cases([record], TASKS["vqa"], editor.adapter)[0].inputs
    return inputs, [inputs[k] for k in INPUT_KINDS]


# ---- both variants -------------------------------------------------------------------------------
def test_edit_lands_restores_exactly_and_reloads(trained, records, tmp_path):
    ed = _editor(trained)
    adapter = ed.adapter
    inputs, exs = _case(ed, records[0])
    edit_in = replace(inputs["reliability"], target=" yellow")  # a counterfactual target
    with torch.no_grad():
        before = adapter.run(exs).logits
        nll0 = target_nll(adapter.run([edit_in])).item()
    handle = ed.edit(EditRequest(edit_in, records[0].to_dict()))
    assert adapter.run_wrappers, "the routing wrapper is installed"
    with torch.no_grad():
        nll1 = target_nll(adapter.run([edit_in])).item()
        edited = adapter.run(exs).logits
        # the in-scope input is answered by the counterfactual model, with the edit's fact
        own = ed.counterfactual_run(adapter.run_plain, [edit_in], ed.fact(edit_in))
        assert torch.equal(adapter.run([edit_in]).logits, own.logits)
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
    other = _editor(trained)
    h3 = other.load(tmp_path / "edit")
    with torch.no_grad():
        assert torch.equal(other.adapter.run(exs).logits, edited)
    h3.remove()


def test_same_weights_give_the_same_edit(trained, records):
    outs = []
    for _ in range(2):
        ed = _editor(trained)
        inputs, exs = _case(ed, records[3])
        h = ed.edit(EditRequest(inputs["reliability"], records[3].to_dict()))
        with torch.no_grad():
            outs.append(ed.adapter.run(exs).logits)
        h.remove()
    assert torch.equal(outs[0], outs[1])


def test_sequential_edits_route_to_their_own_fact_and_unwind(trained, records):
    ed = _editor(trained)
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
    ed = _editor(trained)
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


def test_weights_load_strictly_and_errors(trained, tmp_path):
    variant, name, weights = trained
    ed = _editor(trained)
    assert ed.weights_meta["method"] == variant
    load_module_weights(weights, _make(variant, name).module)  # strict: every key, every shape
    bad = tmp_path / "bad"
    shutil.copytree(weights, bad)
    data = (bad / "weights.safetensors").read_bytes()
    (bad / "weights.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="weights.safetensors"):
        _make(variant, name, bad)
    cls, cfg_cls, tiny, _ = VARIANTS[variant]
    with pytest.raises(FileNotFoundError, match=f"mmke train --method {variant} "):
        cls(BUILDERS[name](), cfg_cls(**tiny), task=TASKS["vqa"], model_name=name)
    with pytest.raises(FileNotFoundError, match=f"mmke train --method {variant} "):
        _make(variant, name, tmp_path / "empty")
    # weights trained with other options, or for the other variant, do not load silently
    with pytest.raises(ValueError, match="architecture|shape"):
        _make(variant, name, weights, lora_rank=2)
    other = "serac-mm" if variant == "serac" else "serac"
    with pytest.raises(ValueError, match="architecture|shape"):
        _make(other, name, weights)


def test_saved_edit_errors(trained, records, tmp_path):
    variant = trained[0]
    ed = _editor(trained)
    inputs, _ = _case(ed, records[1])
    h = ed.edit(EditRequest(inputs["reliability"]))
    h.save(tmp_path / "e")
    h.remove()
    info = json.loads((tmp_path / "e" / "edit.json").read_text())
    info["method"] = "ike"
    (tmp_path / "e" / "edit.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=f"not '{variant}'"):
        ed.load(tmp_path / "e")
    # the other variant's edit, relabelled, is refused for its features
    info["method"] = "serac-mm" if variant == "serac" else "serac"
    (tmp_path / "e" / "edit.json").write_text(json.dumps(info))
    other = _make(info["method"], trained[1])
    with pytest.raises(ValueError, match="no tensors"):
        other.load(tmp_path / "e")


# ---- serac: the classifier reads text only ---------------------------------------------------
@pytest.mark.parametrize("model", list(BUILDERS))
def test_serac_scope_ignores_the_image(records, model):
    ed = _make("serac", model)  # untrained: the decision rule, not the weights, is under test
    inputs, _ = _case(ed, records[0])
    edit_in = inputs["reliability"]
    m_img = inputs["m_locality"].image
    h = ed.edit(EditRequest(edit_in, records[0].to_dict()))
    with torch.no_grad():
        p = ed.scope_scores([edit_in, replace(edit_in, image=m_img), replace(edit_in, image=None),
                             inputs["m_generality"]])[:, 0]
        # the edit's question about an unrelated image looks like the edit: it goes to the
        # counterfactual model (MMEdit's M-Locality collapse, expected of the published method)
        hard = replace(edit_in, image=m_img, target=inputs["m_locality"].target)
        own = ed.counterfactual_run(ed.adapter.run_plain, [hard], ed.fact(edit_in))
        assert torch.equal(ed.adapter.run([hard]).logits, own.logits)
    h.remove()
    assert p[0] >= ed.config.threshold == 0.5
    assert torch.equal(p, p[:1].expand(4)), p  # same prompt, any image or none: the same score


def test_serac_descriptor_is_prompt_and_target(records):
    ed = _make("serac", "tiny-llava")
    inputs, _ = _case(ed, records[0])
    edit_in = inputs["reliability"]
    h = ed.edit(EditRequest(edit_in, records[0].to_dict()))
    assert ed.descriptor(edit_in) == edit_in.prompt + edit_in.target
    feats = ed._memory[0].features
    assert set(feats) == {"descriptor"} and torch.equal(feats["descriptor"], ed._embed([ed.descriptor(edit_in)]))
    h.remove()


# ---- serac-mm: the classifier sees the image -------------------------------------------------
def test_serac_mm_puts_the_edit_question_about_another_image_out_of_scope(trained, records):
    if trained[:2] != ("serac-mm", "tiny-llava"):
        # tiny-blip2's random vision side barely reaches the LM states (another picture changes
        # them by ~1e-6): no classifier reading those states can tell the images apart there
        pytest.skip("serac-mm on tiny-llava only")
    ed = _editor(trained)
    outside = []
    for rec in records:
        inputs, _ = _case(ed, rec)
        edit_in = inputs["reliability"]
        h = ed.edit(EditRequest(edit_in, rec.to_dict()))
        with torch.no_grad():
            p = ed.scope_scores([edit_in, replace(edit_in, image=inputs["m_locality"].image)])[:, 0]
        h.remove()
        outside.append(bool(p[1] < ed.config.threshold <= p[0]))
    assert sum(outside) >= len(outside) - 1, outside


# ---- registry ------------------------------------------------------------------------------------
def test_registry_lists_both_variants():
    assert editor_class("serac") is SERACEditor and editor_class("serac-mm") is SERACMMEditor
    assert SERACEditor.name == "serac" and SERACMMEditor.name == "serac-mm"
    for m in ("serac", "serac-mm"):
        assert METHODS[m].description
    assert "image" in METHODS["serac-mm"].description


# ---- serac-mm-gated: a hard image gate on serac-mm's classifier -------------------------------
def _gated(trained, records, **options):
    from mmke.editors.serac import SERACMMGatedConfig, SERACMMGatedEditor

    _, name, weights = trained
    cfg = SERACMMGatedConfig(**{**VARIANTS["serac-mm"][2], "weights": str(weights), **options})
    return SERACMMGatedEditor(BUILDERS[name](), cfg, task=TASKS["vqa"], train_records=records, model_name=name)


def test_serac_mm_gated_masks_serac_mm_scores_by_image_and_reloads(trained, records, tmp_path):
    """The gate only removes edits from the classifier's choice: where open, the scores are
    serac-mm's; an image-made edit is shut to text-only inputs and, above the threshold, to any
    image but its own. A saved edit keeps its signature and reloads to the same scores."""
    from mmke.editors.serac import SERACMMGatedEditor

    if trained[0] != "serac-mm":
        pytest.skip("the gate sits on serac-mm's classifier")
    plain = _editor(trained)
    rec = records[0]
    inputs, _ = _case(plain, rec)
    edit_in = inputs["reliability"]
    probes = [edit_in, replace(edit_in, image=inputs["m_locality"].image), inputs["t_locality"]]
    h = plain.edit(EditRequest(edit_in, rec.to_dict()))
    base = plain.scope_scores(probes)[:, 0]
    h.remove()
    for gate, expect in ((-1.0, [True, True, False]), (0.999, [True, None, False]), (1.5, [False, False, False])):
        ed = _gated(trained, records, image_gate=gate)
        h = ed.edit(EditRequest(edit_in, rec.to_dict()))
        assert "features.sig" in h.tensors
        got = ed.scope_scores(probes)[:, 0]
        for g, b, e in zip(got.tolist(), base.tolist(), expect):
            if e is not None:
                assert g == pytest.approx(b if e else 0.0, abs=1e-6), (gate, got, base)
        if gate == 0.999:
            h.save(tmp_path / "e")
            h.remove()
            ed2 = _gated(trained, records, image_gate=gate)
            again = ed2.load(tmp_path / "e")
            assert torch.allclose(ed2.scope_scores(probes)[:, 0], got)
            again.remove()
        else:
            h.remove()
    assert editor_class("serac-mm-gated") is SERACMMGatedEditor and SERACMMGatedEditor.weights_of == "serac-mm"
    assert SERACMMGatedEditor.uses_train_records(SERACMMGatedEditor.Config())


def test_serac_mm_gated_needs_train_records_and_is_not_trained_on_its_own(trained):
    from mmke.editors.serac import SERACMMGatedEditor
    from mmke.train.editors import train_method

    if trained[:2] != ("serac-mm", "tiny-llava"):
        pytest.skip("one model is enough")
    with pytest.raises(ValueError, match="train records"):
        SERACMMGatedEditor(tiny_llava(), SERACMMGatedEditor.Config(
            **{**VARIANTS["serac-mm"][2], "weights": str(trained[2])}), task=TASKS["vqa"], model_name="tiny-llava")
    with pytest.raises(ValueError, match="train serac-mm"):
        train_method("serac-mm-gated", "vqa", adapter=tiny_llava())
