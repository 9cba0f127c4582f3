"""Hugging Face families (BLIP-2 OPT, LLaVA) through HFAdapter, on tiny random instances (offline)."""

from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torch import nn

from mmke.editors.base import EditRequest
from mmke.editors.ft import FTConfig, FTEditor
from mmke.models.base import Example, state_digest, target_nll
from mmke.models.hf import HFAdapter, load_hf
from mmke.models.layouts import ModuleGroup, layout_for
from mmke.models.tiny import tiny_blip2, tiny_llava, tiny_processor

FAMILIES = {"blip2": tiny_blip2, "llava": tiny_llava}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny models: threads only add contention on a busy CPU
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=list(FAMILIES))
def adapter(request):
    return FAMILIES[request.param](seed=0)


def image(colour=(200, 30, 40), size=(40, 52)):
    return Image.new("RGB", size, colour)


def examples():
    red, blue = image(), image((20, 40, 220), (64, 48))
    return [
        Example("What is the color?", " red", red),
        Example("Question: what shape is in the image? Answer:", " a blue circle", blue),
        Example("Is it", " yes", red),
        Example("nq question: what is the capital of france?", " paris", None),
        Example("who", " london is the capital", None),
    ]


def n_target(adapter, ex):
    return len(adapter.tokenizer(ex.target, add_special_tokens=False).input_ids)




def test_tiny_models_are_deterministic():
    for build in FAMILIES.values():
        assert state_digest(build(seed=1).model) == state_digest(build(seed=1).model)
        assert state_digest(build(seed=1).model) != state_digest(build(seed=2).model)


def test_forward_finite_and_aligned(adapter):
    exs = examples()
    for sub in (exs[:3], exs[3:]):  # image rows, text-only rows
        batch = adapter.prepare(sub)
        with torch.no_grad():
            logits = adapter.forward(batch)
        assert logits.shape[:2] == batch.labels.shape
        assert logits.shape[-1] == adapter.model.config.get_text_config().vocab_size
        assert torch.isfinite(logits).all()
    with torch.no_grad():
        v = adapter.run(exs)
    assert torch.isfinite(v.logits[v.mask]).all()


def test_only_target_tokens_are_labelled(adapter):
    exs = examples()
    for sub in (exs[:3], exs[3:]):
        batch = adapter.prepare(sub)
        lab = batch.labels
        assert (lab != -100).sum(1).tolist() == [n_target(adapter, e) for e in sub]
        ids, attn = batch.inputs["input_ids"], batch.inputs["attention_mask"]
        # rows of different lengths: padding exists and is never labelled nor attended
        assert (attn == 0).any()
        assert ((lab != -100) & (attn == 0)).sum() == 0
        # image placeholders are never labelled, and the labelled tokens are the target's
        assert ((lab != -100) & (ids == adapter.image_token_id)).sum() == 0
        for b, e in enumerate(sub):
            tgt = adapter.tokenizer(e.target, add_special_tokens=False).input_ids
            assert lab[b][lab[b] != -100].tolist() == tgt
            # the target is the last thing in the row, right after the prompt
            n = int(attn[b].sum())
            assert ids[b, n - len(tgt): n].tolist() == tgt
    v = adapter.run(exs)
    assert v.mask.sum(1).tolist() == [n_target(adapter, e) for e in exs]


def test_image_placeholders(adapter):
    ex = examples()[0]
    ids = adapter.prepare([ex]).inputs["input_ids"][0]
    n = int((ids == adapter.image_token_id).sum())
    cfg = adapter.model.config
    if cfg.model_type == "blip-2":
        assert n == cfg.num_query_tokens
        assert ids[: n].eq(adapter.image_token_id).all() and ids[n] == adapter.tokenizer.bos_token_id
    else:
        vc = cfg.vision_config
        assert n == (vc.image_size // vc.patch_size) ** 2  # "default" strategy drops CLS
        assert ids[0] == adapter.tokenizer.bos_token_id and ids[1: n + 1].eq(adapter.image_token_id).all()
    assert adapter.prepare([examples()[3]]).inputs["input_ids"].ne(adapter.image_token_id).all()
    # a prompt containing the image marker gets the placeholders there
    marked = Example(f"USER: {adapter.image_token}\nWhat is it? ASSISTANT:", " red", ex.image)
    ids = adapter.prepare([marked]).inputs["input_ids"][0].tolist()
    head = adapter.tokenizer("USER: ", add_special_tokens=False).input_ids
    first = ids.index(adapter.image_token_id)
    assert ids[first - len(head): first] == head and ids.count(adapter.image_token_id) == n


def test_image_changes_outputs(adapter):
    a = Example("What is the color?", " red", image())
    b = Example("What is the color?", " red", image((10, 200, 10), (30, 30)))
    with torch.no_grad():
        va, vb = adapter.run([a]), adapter.run([b])
    assert not torch.allclose(va.logits, vb.logits)


def test_single_equals_batched(adapter):
    exs = examples()
    with torch.no_grad():
        both = adapter.run(exs)
        for i, ex in enumerate(exs):
            one = adapter.run([ex])
            n = int(one.mask[0].sum())
            assert torch.equal(both.target_ids[i, :n], one.target_ids[0, :n])
            assert torch.allclose(both.logits[i, :n], one.logits[0, :n], atol=1e-5), i
            # and the full-logit path agrees with the target-only path
            batch = adapter.prepare([ex])
            full = adapter.forward(batch)[0, :-1][batch.labels[0, 1:] != -100]
            assert torch.allclose(full, one.logits[0, :n], atol=1e-5)


EXPECTED = {
    "blip2": dict(
        key=("language_model.model.decoder.layers.1.fc1", nn.Linear),
        value=("language_model.model.decoder.layers.1.fc2", nn.Linear),
        attn=("language_model.model.decoder.layers.1.self_attn.out_proj", nn.Linear),
        vision="Blip2VisionModel",
        ffn_params={f"language_model.model.decoder.layers.1.{m}.{p}" for m in ("fc1", "fc2")
                    for p in ("weight", "bias")},
        connector_prefixes=("query_tokens", "qformer.", "language_projection."),
    ),
    "llava": dict(
        key=("model.language_model.layers.1.mlp.up_proj", nn.Linear),
        value=("model.language_model.layers.1.mlp.down_proj", nn.Linear),
        attn=("model.language_model.layers.1.self_attn.o_proj", nn.Linear),
        vision="CLIPVisionModel",
        ffn_params={f"model.language_model.layers.1.mlp.{m}_proj.weight" for m in ("gate", "up", "down")},
        connector_prefixes=("model.multi_modal_projector.",),
    ),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_edit_sites(family):
    adapter = FAMILIES[family]()
    exp = EXPECTED[family]
    mods = dict(adapter.model.named_modules())
    for kind, key in (("ffn_key", "key"), ("ffn_value", "value"), ("attn_out", "attn")):
        path, cls = exp[key]
        for name in (f"lm.{kind}.-1", f"lm.{kind}.1"):
            m = adapter.site(name)
            assert isinstance(m, cls) and m is mods[path], name
        assert adapter.site(f"lm.{kind}.0") is mods[path.replace(".1.", ".0.")]
        assert set(adapter.site_parameters([f"lm.{kind}.-1"])) == {
            f"{path}.{p}" for p, _ in mods[path].named_parameters()}
    assert type(adapter.site("vision")).__name__ == exp["vision"]
    assert set(adapter.site_parameters(["lm.ffn.-1"])) == exp["ffn_params"]
    vision = adapter.site_parameters(["vision"])
    assert vision and all(k.startswith(("vision_model.", "model.vision_tower.")) for k in vision)
    conn = adapter.site_parameters(["connector"])
    for prefix in exp["connector_prefixes"]:
        assert any(k.startswith(prefix) for k in conn), prefix
    assert all(k.startswith(exp["connector_prefixes"]) for k in conn)
    assert not set(conn) & set(vision)
    if family == "blip2":
        assert isinstance(adapter.site("connector"), ModuleGroup)
        assert isinstance(adapter.site("lm.ffn.0"), ModuleGroup)
    else:
        assert adapter.site("connector") is adapter.model.model.multi_modal_projector
        assert adapter.site("lm.ffn.0") is adapter.model.model.language_model.layers[0].mlp
    # grouping never changes the model's own parameters
    assert len(adapter.model.state_dict()) == len(FAMILIES[family]().model.state_dict())
    assert len(adapter.sites()) == 4 * 2 + 2
    for bad in ("lm.ffn.2", "lm.mlp.0", "qformer"):
        with pytest.raises(KeyError):
            adapter.site(bad)
    assert adapter.max_length == 256


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("with_image", [True, False])
def test_ft_edit_remove_save_load(family, with_image, tmp_path):
    adapter = FAMILIES[family]()
    ex = Example("What is the color of the shape?", " a blue circle", image() if with_image else None)
    before_hash = state_digest(adapter.model)
    with torch.no_grad():
        v0 = adapter.run([ex])
    nll0 = target_nll(v0).item()
    editor = FTEditor(adapter, FTConfig(sites=["lm.ffn.-1"], steps=40, lr=3e-2))
    handle = editor.edit(EditRequest(ex))
    with torch.no_grad():
        v1 = adapter.run([ex])
    assert target_nll(v1).item() < nll0 - 1.0
    assert torch.equal(v1.logits.argmax(-1)[v1.mask], v1.target_ids[v1.mask])
    assert set(handle.tensors) == set(adapter.site_parameters(["lm.ffn.-1"]))
    assert not any(p.requires_grad for p in adapter.model.parameters())
    handle.save(tmp_path / "edit")
    handle.remove()
    assert state_digest(adapter.model) == before_hash
    with torch.no_grad():
        assert torch.equal(adapter.run([ex]).logits, v0.logits)
    loaded = editor.load(tmp_path / "edit")
    with torch.no_grad():
        assert torch.equal(adapter.run([ex]).logits, v1.logits)
    loaded.remove()
    assert state_digest(adapter.model) == before_hash


@pytest.mark.parametrize("family", list(FAMILIES))
def test_processor_expansion_matches(family):
    """use_processor=True (the path of families whose image-token count depends on the image)
    gives the same ids, labels, pixels and outputs as the adapter's own expansion."""
    own = FAMILIES[family]()
    via = HFAdapter(own.model, processor=tiny_processor(own), use_processor=True)
    exs = examples()
    for sub in (exs, exs[:3]):
        a, b = own.prepare(sub), via.prepare(sub)
        assert torch.equal(a.inputs["input_ids"], b.inputs["input_ids"])
        assert torch.equal(a.labels, b.labels)
    assert torch.equal(own.prepare(exs[:3]).inputs["pixel_values"], via.prepare(exs[:3]).inputs["pixel_values"])
    with torch.no_grad():
        assert torch.allclose(own.run(exs).logits, via.run(exs).logits, atol=1e-6)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_load_hf_local_checkpoint(family, tmp_path):
    a = FAMILIES[family]()
    a.model.save_pretrained(tmp_path)
    tiny_processor(a).save_pretrained(tmp_path)
    b = load_hf(str(tmp_path))
    assert isinstance(b, HFAdapter) and b.layout.family == a.layout.family
    exs = examples()
    with torch.no_grad():
        assert torch.equal(a.run(exs).logits, b.run(exs).logits)


def test_unsupported_family_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="supported families.*llava"):
        layout_for(SimpleNamespace(model_type="bert"))
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="unsupported model_type 'bert'"):
        load_hf(str(tmp_path))
    t5 = SimpleNamespace(model_type="blip-2", use_decoder_only_language_model=False)
    with pytest.raises(ValueError, match="Flan-T5"):
        layout_for(t5)


def test_too_long_input_is_rejected():
    adapter = tiny_llava()
    with pytest.raises(ValueError, match="exceeds"):
        adapter.prepare([Example("red " * 300, " blue", None)])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_ft_vision_edit(family):
    """FT-Vision trains the vision encoder + connector (BLIP-2: queries, Q-Former, projection)."""
    from mmke.editors.ft import FTVisionEditor

    adapter = FAMILIES[family]()
    ex = Example("What is the color?", " blue", image())
    before = state_digest(adapter.model)
    with torch.no_grad():
        nll0 = target_nll(adapter.run([ex])).item()
    handle = FTVisionEditor(adapter).edit(EditRequest(ex))
    with torch.no_grad():
        assert target_nll(adapter.run([ex])).item() < nll0
    assert set(handle.tensors) == set(adapter.site_parameters(["vision", "connector"]))
    if family == "blip2":
        assert "query_tokens" in handle.tensors
    handle.remove()
    assert state_digest(adapter.model) == before
