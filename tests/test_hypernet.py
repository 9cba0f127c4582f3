"""MEND, MEND-vision and KE on tiny Hugging Face models: the reference sites and objective, KE's
text-only condition and update formula, training that writes strictly loadable weights, edits that
restore bit for bit, saved edits that reload, and broken weight files that fail clearly. Nothing
here reads the bundled weights."""

import json

import pytest
import torch

from mmke.data.schema import load_records
from mmke.editors.base import EditRequest
from mmke.editors.gradients import Captured, capture, last_ffn_sites
from mmke.editors.ke import ConditionedParameter, KEConfig, KEEditor
from mmke.editors.mend import MENDConfig, MENDEditor, MENDVisionConfig, MENDVisionEditor
from mmke.models.base import Example, state_digest, target_nll
from mmke.models.hf import HFAdapter
from mmke.models.tiny import _build, _image_processor, tiny_blip2, tiny_llava, tiny_tokenizer
from mmke.scoring import INPUT_KINDS
from mmke.tasks import TASKS, VQA_TEMPLATE
from mmke.train.editors import EditorTrainConfig, make_cases, train_editor
from tests.toydata import write_toy_mmedit

EDITORS = {
    "mend": (MENDEditor, lambda **kw: MENDConfig(rank=16, **kw)),
    "ke": (KEEditor, lambda **kw: KEConfig(hidden=16, condition_dim=32, **kw)),
    "mend-vision": (MENDVisionEditor, lambda **kw: MENDVisionConfig(rank=16, **kw)),
}
TRAIN = EditorTrainConfig(steps=3, batch_size=2, val_size=2, val_every=3, ckpt_every=1, counterfactual=1.0)
VQA = TASKS["vqa"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    f = write_toy_mmedit(tmp_path_factory.mktemp("toy"))
    return load_records(f).records


def deep_llava(layers: int = 4) -> HFAdapter:
    """tiny_llava with more LM layers than the three MEND edits."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    a = tiny_llava()
    cfg = LlavaConfig(**{**a.model.config.to_dict(), "text_config": {
        **a.model.config.text_config.to_dict(), "num_hidden_layers": layers}})
    return HFAdapter(_build(LlavaForConditionalGeneration, cfg, 0), tiny_tokenizer(), _image_processor("clip", 32))


def _editor(name, adapter, **kw):
    cls, make = EDITORS[name]
    return cls(adapter, make(**kw), task=VQA, untrained=True)


def _train(name, adapter, records, out, cfg=TRAIN):
    return train_editor(_editor(name, adapter), records, out, cfg)


def _load(name, adapter, out):
    cls, make = EDITORS[name]
    return cls(adapter, make(weights=str(out)), task=VQA)


# ---- MEND: sites, the update, the objective ---------------------------------------------------
@pytest.mark.parametrize("build", [tiny_llava, tiny_blip2, deep_llava])
@pytest.mark.parametrize("name", ["mend", "ke"])
def test_default_sites_are_both_ffn_matrices_of_the_last_three_layers(name, build, toy):
    adapter = build()
    ed = _editor(name, adapter)
    n = adapter.num_lm_layers
    layers = list(range(max(0, n - 3), n))
    want = [f"lm.{k}.{i - n}" for i in layers for k in ("ffn_key", "ffn_value")]
    assert ed.site_names == last_ffn_sites(adapter) == want
    proj = ("fc1", "fc2") if "blip" in adapter.name else ("mlp.up_proj", "mlp.down_proj")
    assert [s.name.rsplit("layers.", 1)[1] for s in ed.sites] == [f"{i}.{p}" for i in layers for p in proj]
    # an edit changes exactly those weights, and remove() restores the model bit for bit
    before = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    digest = state_digest(adapter.model)
    h = ed.edit(make_cases(toy[:1], VQA, adapter)[0].request)
    changed = {k for k, v in adapter.model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {s.name + ".weight" for s in ed.sites}
    assert ed.architecture()["sites"] == want
    h.remove()
    assert state_digest(adapter.model) == digest


@pytest.mark.parametrize("build", [tiny_llava, tiny_blip2])
def test_untrained_mend_is_a_descent_step_on_the_gradient(build, toy):
    """Identity MLP, no statistics yet: the update is exactly -edit_lr * dL/dW, and it lowers the loss."""
    adapter = build()
    ed = _editor("mend", adapter, edit_lr=0.05)
    ex = make_cases(toy[:1], VQA, adapter)[0].inputs["reliability"]
    ups, _ = ed.updates_for(EditRequest(ex))
    weights = [s.module.weight for s in ed.sites]
    for w in weights:
        w.requires_grad_(True)
    try:
        grads = torch.autograd.grad(target_nll(adapter.run([ex])), weights)
    finally:
        for w in weights:
            w.requires_grad_(False)
    for s, g in zip(ed.sites, grads):
        torch.testing.assert_close(ups[s.name].dense(), -0.05 * g, rtol=1e-4, atol=1e-7)
    with torch.no_grad():
        nll0 = target_nll(adapter.run([ex])).item()
    h = ed.edit(EditRequest(ex))
    with torch.no_grad():
        assert target_nll(adapter.run([ex])).item() < nll0
    h.remove()


def test_mend_shares_one_network_per_shape_with_per_layer_modulation():
    adapter = deep_llava(4)
    mod = _editor("mend", adapter).module
    assert len(mod.nets) == 2  # up (64x32) and down (32x64) projections
    assert mod.kind_of == [0, 1, 0, 1, 0, 1] or mod.kind_of == [1, 0, 1, 0, 1, 0]
    assert mod.mode_of == [0, 0, 1, 1, 2, 2]
    layer = mod.nets[0].mlp[0]
    assert layer.mode_scale.shape[0] == 3 and torch.equal(layer.u, torch.zeros_like(layer.u))
    assert len(mod.nets[0].mlp) == 2  # n_hidden = 1
    assert torch.equal(mod.edit_lrs, torch.full((6,), 1e-4))


@pytest.mark.parametrize("build", [tiny_llava, tiny_blip2])
@pytest.mark.parametrize("name", ["mend", "ke"])
def test_objective_has_reference_weights_and_kl_over_every_text_position(name, build, toy):
    adapter = build()
    ed = _editor(name, adapter)
    assert (ed.config.c_edit, ed.config.c_image_edit, ed.config.c_loc) == (0.1, 0.1, 1.0)
    case = make_cases(toy[:1], VQA, adapter)[0]
    loss, logs = ed.train_loss(case)
    assert set(logs) == {"edit_nll", "image_edit_nll", "loc_kl", "image_loc_kl"}
    want = 0.1 * logs["edit_nll"] + 0.1 * logs["image_edit_nll"] + logs["loc_kl"] + logs["image_loc_kl"]
    assert loss.item() == pytest.approx(want, rel=1e-5, abs=1e-7)
    # the locality KL is taken over every text token of question + answer (image positions excluded)
    r = case.record
    texts = [r.loc + " " + r.loc_ans, VQA_TEMPLATE.format(r.m_loc_q) + " " + r.m_loc_a]
    n_text = [len(adapter.tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
    with torch.no_grad():
        view = adapter.run(ed.locality_inputs(case.inputs))
    assert view.mask.sum(1).tolist() == n_text
    answer_only = _editor(name, adapter, loc_all_positions=False)
    with torch.no_grad():
        n_ans = answer_only.adapter.run(answer_only.locality_inputs(case.inputs)).mask.sum(1).tolist()
    assert n_ans == [len(adapter.tokenizer(" " + a, add_special_tokens=False).input_ids)
                     for a in (r.loc_ans, r.m_loc_a)]
    assert all(a < b for a, b in zip(n_ans, n_text))


@pytest.mark.parametrize("name", ["mend", "ke"])
def test_the_objective_trains(name, toy):
    """A few Adam steps on two fixed cases lower the training loss (the gradient reaches the module)."""
    adapter = tiny_llava()
    torch.manual_seed(0)
    ed = _editor(name, adapter)
    cases = make_cases(toy[:2], VQA, adapter)
    ed.module.train()
    params = list(ed.module.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=1e-3)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        total = sum(ed.train_loss(c)[0] for c in cases) / len(cases)
        total.backward()
        opt.step()
        losses.append(total.item())
    assert losses[-1] < losses[0]


# ---- KE: the condition and the update -----------------------------------------------------------
def test_ke_condition_is_the_edit_text_not_the_image(toy, tmp_path):
    from PIL import Image

    adapter = tiny_llava()
    ed = _editor("ke", adapter)
    case = make_cases(toy[:1], VQA, adapter)[0]
    record = {**case.record.to_dict(), "pred": "blue"}
    ex = case.inputs["reliability"]
    other = Example(ex.prompt, ex.target, Image.new("RGB", (32, 32), (250, 250, 250)))
    g1, g2 = capture(adapter, ed.sites, ex), capture(adapter, ed.sites, other)
    assert not torch.equal(g1.captured[ed.sites[-1].name].u, g2.captured[ed.sites[-1].name].u)  # the image matters...
    text = adapter.tokenizer.decode(ed.condition_ids(EditRequest(ex, record), g1))
    assert f"blue >> {record['alt']} || {record['src']}" in text
    c1 = ed.condition(EditRequest(ex, record), g1)
    c2 = ed.condition(EditRequest(other, record), g2)
    assert torch.equal(c1, c2)  # ...but not to the condition: same text, same condition
    for p in ed.module.params:  # hence the same mask a, offset b and gate from every weight's network
        assert all(torch.equal(x, y) for x, y in zip(p.factors(c1), p.factors(c2)))
    c3 = ed.condition(EditRequest(ex, {**record, "alt": "purple"}), g1)
    assert not torch.equal(c1, c3)  # another new answer: another condition
    # without a recorded pred, the model's own prediction at the target positions stands in
    no_pred = {k: v for k, v in record.items() if k != "pred"}
    guess = adapter.tokenizer.decode(g1.pred_ids.tolist(), skip_special_tokens=True).strip()
    text = adapter.tokenizer.decode(ed.condition_ids(EditRequest(ex, no_pred), g1))
    assert f"{guess} >> {record['alt']} || {record['src']}" in text


def test_ke_update_is_sigmoid_norm_times_masked_gradient_plus_offset():
    torch.manual_seed(0)
    out, inp, n = 3, 4, 5
    p = ConditionedParameter((out, inp), condition_dim=6, hidden=7, max_scale=1.0)
    cond = torch.randn(6)
    U, D = torch.randn(n, inp), torch.randn(n, out)
    with torch.no_grad():
        got = p(cond, Captured(U, D)).dense()
        row_a, col_a, row_b, col_b, eta = p.factors(cond)
        G = D.T @ U  # dL/dW = sum_t delta_t u_t^T
        a = torch.outer(row_a.softmax(-1), col_a)
        b = torch.outer(row_b.softmax(-1), col_b)
        want = torch.sigmoid(eta) * (G * a + b)
    torch.testing.assert_close(got, want)


def test_ke_embedding_is_the_lms_frozen_unless_trained():
    adapter = tiny_llava()
    frozen = _editor("ke", adapter).module
    emb = adapter.model.get_input_embeddings().weight
    assert frozen.condition.embedding.data_ptr() == emb.data_ptr()
    assert not any("embedding" in k for k in frozen.state_dict())
    trained = _editor("ke", adapter, train_embedding=True).module
    assert torch.equal(trained.state_dict()["condition.embedding"], emb)


# ---- training, loading, edits -----------------------------------------------------------------
@pytest.mark.parametrize("name,build", [("mend", tiny_llava), ("ke", tiny_llava), ("mend", tiny_blip2),
                                        ("ke", tiny_blip2), ("mend-vision", tiny_llava),
                                        ("mend-vision", tiny_blip2)])
def test_trained_editor_edits_restores_and_reloads(name, build, toy, tmp_path):
    adapter = build()
    meta = _train(name, adapter, toy, tmp_path / "w")
    assert meta["method"] == name and set(meta["validation"]) == set(INPUT_KINDS)
    assert (tmp_path / "w" / "CARD.md").exists()
    assert len((tmp_path / "w" / "train_log.jsonl").read_text().splitlines()) == 3
    ed = _load(name, adapter, tmp_path / "w")  # strict: every key, every shape
    case = make_cases(toy[:1], VQA, adapter)[0]
    exs = [case.inputs[k] for k in INPUT_KINDS]
    digest = state_digest(adapter.model)
    with torch.no_grad():
        before = adapter.run(exs).logits
    h = ed.edit(case.request)
    assert state_digest(adapter.model) != digest
    with torch.no_grad():
        edited = adapter.run(exs).logits
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
        MENDEditor(adapter, MENDConfig(), task=VQA)  # nothing bundled for tiny-llava
    # weights trained with other options (or an older architecture) do not load silently
    _train("mend", adapter, toy, tmp_path / "m", TRAIN.model_copy(update={"steps": 1, "val_every": 1}))
    with pytest.raises(ValueError, match="shape|architecture"):
        MENDEditor(adapter, MENDConfig(rank=8, weights=str(tmp_path / "m")), task=VQA)
    with pytest.raises(ValueError, match="architecture"):
        MENDEditor(adapter, MENDConfig(rank=16, sites=["lm.ffn_value.-1"], weights=str(tmp_path / "m")), task=VQA)


def test_sequential_hypernet_edits_unwind(toy):
    adapter = tiny_llava()
    ed = _editor("mend", adapter, edit_lr=0.05)
    cases = make_cases(toy[:2], VQA, adapter)
    digest = state_digest(adapter.model)
    h1 = ed.edit(cases[0].request)
    d1 = state_digest(adapter.model)
    h2 = ed.edit(cases[1].request)
    assert state_digest(adapter.model) not in (digest, d1)
    h2.remove()
    assert state_digest(adapter.model) == d1
    h1.remove()
    assert state_digest(adapter.model) == digest
