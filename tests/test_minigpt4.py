"""MiniGPT-4 assembled from Hugging Face parts (mmke.models.minigpt4), on a tiny random instance saved
in the original release's layout and loaded back through ``hf:DIR``: the forward equals the
original's own computation, every editor of the matrix lands and restores exactly, ``mmke run``
works, and broken releases fail with errors that name the file and the key."""

import json
import shutil

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from mmke.editors.base import EditRequest
from mmke.models.base import Example, state_digest, target_nll
from mmke.models.minigpt4 import SYSTEM, TEMPLATES, MiniGPT4Adapter, save_release, tiny_minigpt4
from mmke.registry import editor_class, load_model
from mmke.tasks import TASKS
from tests.toydata import colour_image, colour_records, write_toy_mmedit

pytestmark = pytest.mark.usefixtures("one_thread")

RED = colour_image((220, 20, 20))
EDIT = Example("Question: what color is the shape? Short answer:", " blue", RED)
OTHER = Example("nq question: what is the capital of france?", " paris", None)
M_LOC = Example("Question: is there a circle? Short answer:", " no", colour_image((20, 20, 220)))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A tiny random MiniGPT-4 written in the release's layout (folder with minigpt4.json)."""
    return save_release(tiny_minigpt4(seed=0), tmp_path_factory.mktemp("minigpt4"))


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return colour_records(tmp_path_factory.mktemp("imgs"), 12)


def _load(release) -> MiniGPT4Adapter:
    return load_model(f"hf:{release}")


def _logits(adapter, exs):
    with torch.no_grad():
        return adapter.run(exs).logits


# ---- loading and the forward pass -------------------------------------------------------------------
def _reference(release, ex: Example, template: str) -> torch.Tensor:
    """The original's computation, from the release's files with plain transformers classes:
    ``encode_img`` (ViT -> Q-Former over the queries -> llama_proj), then ``get_context_emb`` (the
    conversation split at <ImageHere>, BOS on the first segment only) followed by the target, all as
    input embeddings of the LLaMA; returns the logits that predict the target tokens."""
    from transformers import AutoTokenizer, Blip2ForConditionalGeneration, LlamaForCausalLM

    blip = Blip2ForConditionalGeneration.from_pretrained(release / "blip2").eval()
    lm = LlamaForCausalLM.from_pretrained(release / "vicuna").eval()
    tok = AutoTokenizer.from_pretrained(release / "vicuna")
    proj = torch.load(release / "pretrained_minigpt4.pth", weights_only=True)["model"]
    tmpl = TEMPLATES[template]
    with torch.no_grad():
        if ex.image is None:
            segs, imgs = [tmpl.text.replace("{prompt}", ex.prompt)], []
        else:
            segs = tmpl.image.replace("{prompt}", ex.prompt).split("<ImageHere>")
            pix = torch.tensor(__import__("numpy").array(ex.image.resize((32, 32), Image.BICUBIC)),
                               dtype=torch.float32).permute(2, 0, 1)[None] / 255
            mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
            std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
            feats = blip.vision_model(pixel_values=(pix - mean) / std).last_hidden_state
            q = blip.qformer(query_embeds=blip.query_tokens, encoder_hidden_states=feats).last_hidden_state
            imgs = [q @ proj["llama_proj.weight"].T + proj["llama_proj.bias"]]
        last = tok(segs[-1], add_special_tokens=False).input_ids
        joint = tok(segs[-1] + ex.target, add_special_tokens=False).input_ids
        assert joint[: len(last)] == last
        n_target = len(joint) - len(last)
        ids = [[tok.bos_token_id] + tok(s, add_special_tokens=False).input_ids for s in segs[:-1]] + [joint]
        if len(segs) == 1:
            ids = [[tok.bos_token_id] + joint]
        emb = lm.get_input_embeddings()
        parts = [emb(torch.tensor([ids[0]]))]
        for img, seg in zip(imgs, ids[1:]):
            parts += [img, emb(torch.tensor([seg]))]
        logits = lm(inputs_embeds=torch.cat(parts, 1)).logits[0]
    return logits[-n_target - 1: -1]


@pytest.mark.parametrize("template", ["chat", "mmedit"])
def test_forward_equals_the_originals_computation(release, template, tmp_path):
    if template != "chat":  # the same parts with another template in minigpt4.json
        release = save_release(tiny_minigpt4(seed=0), tmp_path / "r", template=template)
    adapter = _load(release)
    assert isinstance(adapter, MiniGPT4Adapter) and adapter.layout.family == "minigpt4"
    assert adapter.num_image_tokens == 32 and adapter.template == TEMPLATES[template]
    exs = [EDIT, OTHER, M_LOC]
    with torch.no_grad():
        v = adapter.run(exs)
    for i, ex in enumerate(exs):
        ref = _reference(release, ex, template)
        n = int(v.mask[i].sum())
        assert n == ref.shape[0]
        assert torch.allclose(v.logits[i, :n], ref, atol=1e-5), (template, i)
    # the sequence the LM sees: BOS, the template, 32 placeholders where <ImageHere> was
    ids = adapter.prepare([EDIT]).inputs["input_ids"][0]
    assert int((ids == adapter.image_token_id).sum()) == 32 and ids[0] == adapter.tokenizer.bos_token_id
    text = adapter.tokenizer.decode(ids[1:], skip_special_tokens=False).replace("<ImageHere>" * 32, "<ImageHere>")
    assert text == TEMPLATES[template].image.replace("{prompt}", EDIT.prompt) + EDIT.target
    if template == "chat":
        assert text.startswith(SYSTEM + "###Human: <Img><ImageHere></Img> Question:")
        assert text.endswith("Short answer:###Assistant: blue")


def test_loads_equal_the_built_model_and_expose_the_sites(release):
    built, loaded = tiny_minigpt4(seed=0), _load(release)
    assert state_digest(built.model) == state_digest(loaded.model)
    exs = [EDIT, OTHER]
    assert torch.equal(_logits(built, exs), _logits(loaded, exs))
    m = loaded.model
    assert loaded.site("lm.ffn_key.-1") is m.language_model.model.layers[1].mlp.up_proj
    assert loaded.site("lm.ffn_value.0") is m.language_model.model.layers[0].mlp.down_proj
    assert loaded.site("lm.attn_out.1") is m.language_model.model.layers[1].self_attn.o_proj
    assert loaded.site("vision") is m.vision_model
    conn = loaded.site_parameters(["connector"])
    assert "query_tokens" in conn and any(k.startswith("qformer.") for k in conn)
    assert {"llama_proj.weight", "llama_proj.bias"} <= set(conn)
    assert not set(conn) & set(loaded.site_parameters(["vision"]))
    assert loaded.max_length == 1024 and not any(p.requires_grad for p in m.parameters())
    # the registry's tiny instance is the same model
    assert state_digest(load_model("tiny-minigpt4").model) == state_digest(built.model)


def test_placement_dtype_and_device_map(release):
    """``--dtype bf16`` loads every part in bf16; a device map (here all on the CPU) goes through
    accelerate's dispatch and computes the same numbers as the plain load."""
    plain = _logits(_load(release), [EDIT, OTHER])
    bf16 = load_model(f"hf:{release}", dtype="bf16")
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    low = _logits(bf16, [EDIT, OTHER])
    assert low.dtype == torch.bfloat16 and torch.allclose(low.float(), plain, atol=0.1)
    mapped = load_model(f"hf:{release}", device_map={"": "cpu"})
    assert mapped.model.hf_device_map == {"": "cpu"}
    assert torch.equal(_logits(mapped, [EDIT, OTHER]), plain)


def test_text_between_images_is_tokenised_segment_by_segment():
    """With a LLaMA-style (Metaspace) tokenizer, "</Img> ..." after the placeholders is tokenised on
    its own, with its word-start marker, as the original's get_context_emb does; a joint call would
    drop the marker after the special token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    raw.train_from_iterator(["###Human: <Img></Img> Question: what color is it? Short answer: red"] * 3,
                            trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"],
                                                show_progress=False))
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    base = tiny_minigpt4()
    adapter = MiniGPT4Adapter(base.model, tok, base.image_processor, template="mmedit")
    plain = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731
    text = "###Human: <Img><ImageHere></Img> Question: what"
    want = plain("###Human: <Img>") + [adapter.image_token_id] + plain("</Img> Question: what")
    assert adapter._tok(text) == want != plain(text)
    ids = adapter.prepare([Example("Question: what", " red", RED)]).inputs["input_ids"][0].tolist()
    n = adapter.num_image_tokens
    assert ids == [1] + plain("###Human: <Img>") + [adapter.image_token_id] * n + plain("</Img> Question: what red")


# ---- every editor of the matrix: the edit lands, removal restores exactly --------------------------
@pytest.fixture(scope="module")
def trained(release, records, tmp_path_factory):
    """SERAC and UniKE weights for the tiny MiniGPT-4, trained a few steps by the real recipes."""
    from mmke.editors.serac import SERACConfig, SERACEditor
    from mmke.editors.unike import UniKEConfig, UniKEEditor
    from mmke.train.editors import EditorTrainConfig, train_editor

    out = {}
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MMKE_CACHE", str(tmp_path_factory.mktemp("cache")))
            d = tmp_path_factory.mktemp("serac")
            ed = SERACEditor(_load(release), SERACConfig(**SERAC_FAST), task=TASKS["vqa"], untrained=True,
                             model_name="tiny-minigpt4")
            train_editor(ed, records, d, EditorTrainConfig(steps=30, batch_size=4, lr=1e-2, val_size=2, val_every=30,
                                                           counterfactual=0.25))
            out["serac"] = d
            d = tmp_path_factory.mktemp("unike")
            ed = UniKEEditor(_load(release), UniKEConfig(**UNIKE_FAST), task=TASKS["vqa"], train_records=records,
                             untrained=True, model_name="tiny-minigpt4")
            ed.fit(records, d, EditorTrainConfig(val_size=1, seed=0), command="test")
            out["unike"] = d
    finally:
        torch.set_num_threads(n)
    return out


SERAC_FAST = dict(lora_layers=[-1], lora_rank=4, scope_hidden=64)
UNIKE_FAST = dict(layers=2, n_neurons=4, steps=40, lr=0.05, memory_size=4, k=4, memory_entries=8, enc_steps=20,
                  enc_batch=8)
OPTIONS = {"ft-lm": dict(steps=40, lr=3e-2), "ft-vision": {}, "ike": dict(k=2, max_context_tokens=200),
           "t-patcher": dict(steps=60, lr=5e-2), "grace": dict(layer=-1, eps_init=1.0), "serac": SERAC_FAST,
           "unike": UNIKE_FAST}


@pytest.mark.parametrize("method", list(OPTIONS))
def test_edit_lands_and_restores_exactly(method, release, records, trained, tmp_path):
    adapter = _load(release)
    cls = editor_class(method)
    options = dict(OPTIONS[method], **({"weights": str(trained[method])} if method in trained else {}))
    ed = cls(adapter, cls.Config(**options), task=TASKS["vqa"], train_records=records, model_name="tiny-minigpt4")
    exs = [EDIT, OTHER, M_LOC]
    digest, before = state_digest(adapter.model), _logits(adapter, exs)
    with torch.no_grad():
        nll0 = target_nll(adapter.run([EDIT])).item()
    request = EditRequest(EDIT, {"src": "what color is the shape?", "alt": "blue", "pred": "red"})
    h = ed.edit(request)
    edited = _logits(adapter, exs)
    with torch.no_grad():
        nll1 = target_nll(adapter.run([EDIT])).item()
    if method == "ike":  # in-context: the model now reads the new fact after the image (no weight changes)
        seen = adapter.tokenizer.decode(adapter.prepare([EDIT]).inputs["input_ids"][0])
        assert "New Fact: Question: what color is the shape? Short answer: blue" in seen
        assert seen.index("</Img>") < seen.index("New Fact") and not torch.equal(edited[0], before[0])
    elif method == "serac":  # the in-scope edit input is answered by the counterfactual model, fact in view
        with torch.no_grad():
            own = ed.counterfactual_run(adapter.run_plain, [EDIT], ed.fact(EDIT))
            assert torch.equal(adapter.run([EDIT]).logits, own.logits)
        assert nll1 < nll0, (nll0, nll1)
    else:
        assert nll1 < nll0 - 1.0, (method, nll0, nll1)
    if method in ("ft-lm", "t-patcher"):
        v = adapter.run([EDIT])
        assert bool((v.logits.argmax(-1) == v.target_ids)[v.mask].all())
    h.remove()
    assert torch.equal(_logits(adapter, exs), before), method
    assert state_digest(adapter.model) == digest
    assert not adapter.input_transforms and not adapter.run_wrappers


# ---- the command line --------------------------------------------------------------------------------
def test_mmke_run_on_the_saved_release(release, tmp_path):
    from mmke.cli import app

    data = write_toy_mmedit(tmp_path / "data", n=2)
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["run", "--model", f"hf:{release}", "--method", "ft-lm", "--data", str(data),
                                 "--image-root", str(data.parent), "--out", str(out), "--set", "steps=3"])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_cases"] == 2 and summary["model"] == f"hf:{release}"
    assert set(summary["metrics"]) >= {"reliability", "t_locality", "m_locality"}
    # the same through the JSON file itself
    r = CliRunner().invoke(app, ["run", "--model", f"hf:{release / 'minigpt4.json'}", "--method", "null",
                                 "--data", str(data), "--out", str(tmp_path / "run2")])
    assert r.exit_code == 0, r.output


# ---- broken releases ---------------------------------------------------------------------------------
def _copy(release, tmp_path):
    return shutil.copytree(release, tmp_path / "r")


def test_projection_checkpoint_problems_are_clear(release, tmp_path):
    r = _copy(release, tmp_path)
    ckpt = r / "pretrained_minigpt4.pth"
    good = torch.load(ckpt, weights_only=True)
    ckpt.unlink()
    with pytest.raises(FileNotFoundError, match=r"pretrained_minigpt4\.pth: no such file"):
        _load(r)
    ckpt.write_bytes(b"\x00garbage, not a checkpoint" * 10)
    with pytest.raises(ValueError, match=r"pretrained_minigpt4\.pth: not a readable PyTorch checkpoint"):
        _load(r)
    ckpt.write_bytes((release / "pretrained_minigpt4.pth").read_bytes()[:300])  # truncated
    with pytest.raises(ValueError, match=r"not a readable PyTorch checkpoint \(RuntimeError: .*zip archive"):
        _load(r)
    torch.save({"model": {"llama_proj.weight": good["model"]["llama_proj.weight"]}}, ckpt)
    with pytest.raises(ValueError, match=r"no llama_proj\.bias"):
        _load(r)
    torch.save({"model": {"llama_proj.weight": torch.zeros(64, 32), "llama_proj.bias": torch.zeros(64)}}, ckpt)
    with pytest.raises(ValueError, match=r"llama_proj\.weight is \(64, 32\), expected \(32, 32\)"):
        _load(r)
    torch.save({"model": good["model"], "extra": Image.new("RGB", (2, 2))}, ckpt)  # an arbitrary object
    with pytest.raises(ValueError, match="holds a PIL.Image.Image object.*never unpickles"):
        _load(r)
    from safetensors.torch import save_file

    save_file(good["model"], r / "proj.safetensors")  # the projection as safetensors works too
    spec = json.loads((r / "minigpt4.json").read_text())
    (r / "minigpt4.json").write_text(json.dumps({**spec, "checkpoint": "proj.safetensors"}))
    assert torch.equal(_logits(_load(r), [EDIT]), _logits(_load(release), [EDIT]))


def test_description_and_part_problems_are_clear(release, tmp_path):
    r = _copy(release, tmp_path)
    spec_f = r / "minigpt4.json"
    spec = json.loads(spec_f.read_text())
    spec_f.write_text(json.dumps({"llm": "vicuna", "blip2": "blip2", "templet": "chat"}))
    with pytest.raises(ValueError, match=r"minigpt4\.json: checkpoint: Field required.*templet"):
        _load(r)
    spec_f.write_text(json.dumps({**spec, "template": "vicuna_v1"}))
    with pytest.raises(ValueError, match="unknown MiniGPT-4 template 'vicuna_v1'; known: chat, mmedit"):
        _load(r)
    spec_f.write_text(json.dumps({**spec, "template": {"image": "{prompt} no image marker"}}))
    with pytest.raises(ValueError, match="template.image must contain <ImageHere> once"):
        _load(r)
    spec_f.write_text(json.dumps({**spec, "llm": "no-such-dir"}))
    with pytest.raises(FileNotFoundError, match=r"llm .*no-such-dir: no config\.json"):
        _load(r)
    spec_f.write_text(json.dumps({**spec, "llm": "blip2"}))
    with pytest.raises(ValueError, match="is a 'blip-2' model; MiniGPT-4 uses LLaMA/Vicuna"):
        _load(r)
    spec_f.write_text(json.dumps(spec))
    # a BLIP-2 checkpoint without its Q-Former weights
    from safetensors.torch import load_file, save_file

    st = r / "blip2" / "model.safetensors"
    save_file({k: v for k, v in load_file(st).items() if not k.startswith("qformer.")}, st)
    with pytest.raises(ValueError, match=r"lacks \d+ qformer\.\* tensors \(first: qformer\."):
        _load(r)
