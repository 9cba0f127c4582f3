"""Every supported Hugging Face VLM family through ``hf:DIR``, offline.

Per family, a tiny random instance of the exact transformers class and its own processor class is
saved with ``save_pretrained`` (:func:`mmke.models.tiny.save_tiny`) and loaded back through
``load_model("hf:DIR")``. Checked: the adapter's outputs equal the model's own forward (image
placeholders, M-RoPE positions, tiles, padding), the edit sites, an edit of every method in the
matrix that lands and is removed exactly, ``mmke train`` of MEND and UniKE, and ``mmke run``.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from mmke.cli import app
from mmke.data.schema import load_records
from mmke.editors.base import EditRequest
from mmke.models import layouts
from mmke.models.base import Example, state_digest, target_nll
from mmke.models.hf import HFAdapter
from mmke.models.processors import image_only_processor_class, load_processor
from mmke.models.tiny import TINY_FAMILIES, save_tiny, tiny_family
from mmke.registry import editor_class, load_model
from mmke.tasks import TASKS

from toydata import write_toy_mmedit

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILIES = list(TINY_FAMILIES)
# the exact classes each tiny checkpoint must load as: (model, processor)
CLASSES = {
    "blip2": ("Blip2ForConditionalGeneration", "Blip2Processor"),
    "llava": ("LlavaForConditionalGeneration", "LlavaProcessor"),
    "llava-next": ("LlavaNextForConditionalGeneration", "LlavaNextProcessor"),
    "llava-onevision": ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionProcessor"),
    "qwen2-vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"),
    "qwen2.5-vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"),
    "idefics3": ("Idefics3ForConditionalGeneration", "Idefics3Processor"),
    "smolvlm": ("SmolVLMForConditionalGeneration", "SmolVLMProcessor"),
}
# How each family's own processor is asked for one image before the text (written out here, not
# taken from the adapter's layout, so that a wrong layout shows up as different outputs).
MARKER = {"blip2": "", "llava": "<image>\n", "llava-next": "<image>\n", "llava-onevision": "<image>\n",
          "qwen2-vl": "<|vision_start|><|image_pad|><|vision_end|>",
          "qwen2.5-vl": "<|vision_start|><|image_pad|><|vision_end|>", "idefics3": "<image>", "smolvlm": "<image>"}
VIDEO_FAMILIES = ["llava-onevision", "qwen2-vl", "qwen2.5-vl", "smolvlm"]  # processors with a video part


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    """family -> a saved tiny checkpoint directory (built once per session, on first use)."""
    root = tmp_path_factory.mktemp("families")
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = save_tiny(family, root / family, seed=0)
        return made[family]
    return get


def _load(ckpt, family: str) -> HFAdapter:
    return load_model(f"hf:{ckpt(family)}")


def image(colour=(200, 30, 40), size=(40, 52)) -> Image.Image:
    return Image.new("RGB", size, colour)


EXAMPLES = [Example("What is the color?", " a red", image()),
            Example("Question: what shape is in the image? Answer:", " blue circle", image((20, 40, 220), (64, 30))),
            Example("Is it", " yes", image((20, 240, 20), (20, 20))),
            Example("nq question: what is the capital of france?", " paris", None),
            Example("who", " london is the capital", None)]


def _own_forward(adapter: HFAdapter, family: str, ex: Example) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits predicting the target tokens, the target ids) from the model's own forward on what
    the family's own processor (or tokenizer, without an image) makes of prompt + target."""
    text = ex.prompt + ex.target
    model = adapter.model
    if ex.image is None:
        inputs = adapter.tokenizer([text], return_tensors="pt")
        if family == "blip2":  # text alone goes through the OPT model (as MMEdit does)
            model = model.language_model
    else:
        proc = adapter.processor if adapter.processor is not None else tiny_family(family)[1]
        inputs = proc(text=[MARKER[family] + text], images=[ex.image], return_tensors="pt")
    n = len(adapter.tokenizer(ex.target, add_special_tokens=False).input_ids)
    with torch.no_grad():
        logits = model(**inputs).logits[0]
    return logits[-n - 1:-1], inputs["input_ids"][0, -n:]


def _hooks(model: nn.Module) -> list[str]:
    """The hooks on the model's modules other than transformers' own (it installs output-capturing
    hooks on the first forward pass)."""
    return [f"{name}: {fn}" for name, m in model.named_modules()
            for fn in (*m._forward_hooks.values(), *m._forward_pre_hooks.values(), *m._backward_hooks.values())
            if not getattr(fn, "__module__", "").startswith("transformers.")]


# --------------------------------------------------------------------------------------------
# Loading and the forward pass
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_loads_as_the_exact_classes(ckpt, family):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a tested family loads without the untested warning
        a = _load(ckpt, family)
    model_cls, proc_cls = CLASSES[family]
    assert type(a.model).__name__ == model_cls
    assert type(a.processor).__name__ == proc_cls
    assert a.layout.tested and a.model.config.model_type in a.layout.model_types
    # the saved weights reload bit for bit
    assert state_digest(a.model) == state_digest(tiny_family(family, seed=0)[0])
    assert not any(p.requires_grad for p in a.model.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_equals_the_models_own(ckpt, family):
    """Single examples: the adapter's target logits equal the model's own forward on the
    processor's output (catches wrong placeholders, positions, tiles, image sizes)."""
    a = _load(ckpt, family)
    for ex in EXAMPLES:
        with torch.no_grad():
            v = a.run([ex])
        ref, ids = _own_forward(a, family, ex)
        n = int(v.mask[0].sum())
        assert n == len(ids) and torch.equal(v.target_ids[0, :n], ids), ex
        assert torch.allclose(v.logits[0, :n], ref, atol=1e-5), (ex, (v.logits[0, :n] - ref).abs().max())


@pytest.mark.parametrize("family", FAMILIES)
def test_a_wider_deeper_lm_loads_and_runs_as_its_own_forward(tmp_path, family):
    """``save_tiny(lm=(width, layers))`` (the speed benchmark's larger checkpoints): the same classes
    with an LM of that width and depth, loaded through ``hf:`` and run as the model's own forward."""
    a = load_model(f"hf:{save_tiny(family, tmp_path / family, lm=(64, 3))}")
    assert type(a.model).__name__ == CLASSES[family][0]
    assert a.num_lm_layers == 3 and a.site("lm.ffn_key.2").in_features == 64
    for ex in (EXAMPLES[1], EXAMPLES[3]):
        with torch.no_grad():
            v = a.run([ex])
        ref, ids = _own_forward(a, family, ex)
        n = int(v.mask[0].sum())
        assert torch.equal(v.target_ids[0, :n], ids) and torch.allclose(v.logits[0, :n], ref, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_batches_are_right_padded_and_equal_single_runs(ckpt, family):
    a = _load(ckpt, family)
    images = EXAMPLES[:3]
    batch = a.prepare(images)
    attn, labels = batch.inputs["attention_mask"], batch.labels
    lengths = attn.sum(1)
    assert len(set(lengths.tolist())) > 1  # rows of different lengths
    for b, n in enumerate(lengths.tolist()):  # right padding: ones then zeros, never labelled
        assert attn[b, :n].all() and not attn[b, n:].any()
        assert (labels[b, n:] == -100).all() and (labels[b, :n] != -100).sum() > 0
    if "mm_token_type_ids" in batch.inputs:  # Qwen: image tokens marked, padding and text 0
        ids, types = batch.inputs["input_ids"], batch.inputs["mm_token_type_ids"]
        assert torch.equal(types == 1, ids == a.image_token_id)
    with torch.no_grad():
        both = a.run(EXAMPLES)
        for i, ex in enumerate(EXAMPLES):
            one = a.run([ex])
            n = int(one.mask[0].sum())
            assert torch.equal(both.target_ids[i, :n], one.target_ids[0, :n])
            assert torch.allclose(both.logits[i, :n], one.logits[0, :n], atol=1e-5), (i, family)


@pytest.mark.parametrize("family", FAMILIES)
def test_edit_sites(ckpt, family):
    a = _load(ckpt, family)
    mods = {id(m): n for n, m in a.model.named_modules()}
    layers = a.lm_layers()
    assert len(layers) == 2 and a.num_lm_layers == 2
    for kind in ("ffn_key", "ffn_value", "attn_out"):
        m = a.site(f"lm.{kind}.-1")
        assert isinstance(m, nn.Linear) and mods[id(m)].startswith(mods[id(layers[1])] + ".")
    assert a.site("lm.ffn_key.0") is not a.site("lm.ffn_key.1")
    ffn = a.site_parameters(["lm.ffn.-1"])
    assert set(a.site_parameters(["lm.ffn_key.-1", "lm.ffn_value.-1"])) <= set(ffn)
    vision, conn = a.site_parameters(["vision"]), a.site_parameters(["connector"])
    assert vision and conn and not set(vision) & set(conn)
    assert not set(vision) & set(a.site_parameters(["lm.ffn.0", "lm.ffn.1"]))
    # together, vision + connector + LM layers + embeddings/head/norms are the whole model
    lm = {k for k, _ in a.model.named_parameters() if k.startswith(mods[id(layers)] + ".")}
    rest = set(dict(a.model.named_parameters())) - set(vision) - set(conn) - lm
    assert all(any(w in k for w in ("embed", "lm_head", "norm", "pos")) for k in rest), sorted(rest)


@pytest.mark.parametrize("family", FAMILIES)
def test_last_layers_fast_path(ckpt, family):
    """UniKE and T-Patcher rerun only the last layers from cached inputs (rotary / M-RoPE
    position embeddings and masks included): it must match the full forward on every family."""
    from mmke.editors.tail import TailRunner

    a = _load(ckpt, family)
    for idx in a.sub_batches(EXAMPLES):
        runner = TailRunner(a, -1)
        cache, full = runner.capture([EXAMPLES[i] for i in idx])
        assert runner.enabled and cache.hidden is not None, family
        assert torch.allclose(runner.run(cache).logits, full.logits, atol=1e-5)


def test_untested_layout_warns(ckpt, monkeypatch):
    a = _load(ckpt, "llava")
    monkeypatch.setitem(layouts.LAYOUTS, "llava", replace(a.layout, tested=False))
    with pytest.warns(UserWarning, match="'llava' layout of mmke is untested"):
        HFAdapter(a.model, processor=a.processor)


# --------------------------------------------------------------------------------------------
# Processors with a video part, without torchvision
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_processor_without_its_video_part(ckpt, family, tmp_path):
    """The saved directory lists a video processor, as a real checkpoint does; without
    torchvision mmke loads the family's processor class without it, and the result processes
    images exactly as the family's processor does."""
    import importlib.util

    from transformers import AutoProcessor

    d = ckpt(family)
    assert "video_processor" in json.loads((d / "processor_config.json").read_text())
    if importlib.util.find_spec("torchvision") is None:
        with pytest.raises(ImportError, match="(?i)torchvision"):
            AutoProcessor.from_pretrained(d)
    proc = load_processor(str(d), json.loads((d / "config.json").read_text())["model_type"])
    assert type(proc).__name__ == CLASSES[family][1] and not hasattr(proc, "video_processor")
    own = tiny_family(family)[1]
    text = [MARKER[family] + "What is it?"]
    x, y = proc(text=text, images=[image()], return_tensors="pt"), own(text=text, images=[image()], return_tensors="pt")
    assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)

    # the older layout of released checkpoints: preprocessor_config.json + video_preprocessor_config.json
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    cfg = json.loads((d / "processor_config.json").read_text())
    (legacy / "preprocessor_config.json").write_text(json.dumps({**cfg.pop("image_processor"),
                                                                 "processor_class": cfg["processor_class"]}))
    (legacy / "video_preprocessor_config.json").write_text(json.dumps(cfg.pop("video_processor")))
    (legacy / "processor_config.json").write_text(json.dumps(cfg))
    for f in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        (legacy / f).write_bytes((d / f).read_bytes())
    old = load_processor(str(legacy), json.loads((d / "config.json").read_text())["model_type"])
    z = old(text=text, images=[image()], return_tensors="pt")
    assert set(z) == set(y) and all(torch.equal(z[k], y[k]) for k in z)


def test_image_only_class_keeps_the_family_signature():
    import inspect

    from transformers import Qwen2VLProcessor, SmolVLMProcessor

    for cls in (Qwen2VLProcessor, SmolVLMProcessor):
        sub = image_only_processor_class(cls)
        assert sub.__name__ == cls.__name__ and issubclass(sub, cls) and sub.without_video_of is cls
        assert "video_processor" not in sub.get_attributes() and "video_processor" in cls.get_attributes()
        assert list(inspect.signature(sub.__init__).parameters) == list(inspect.signature(cls.__init__).parameters)
    from transformers import LlavaProcessor

    assert image_only_processor_class(LlavaProcessor) is LlavaProcessor


# --------------------------------------------------------------------------------------------
# Training (`mmke train`), the edit matrix, and `mmke run`
# --------------------------------------------------------------------------------------------
# small options for 2-layer models; the same for training and editing (UniKE checks that the
# weights were trained with the options they are used with)
UNIKE = dict(layers=2, n_neurons=4, steps=40, lr=0.05, memory_size=4, k=4, memory_entries=8, enc_batch=8)
SERAC = dict(lora_layers=[-1], lora_rank=4, scope_hidden=64)
TRAIN = {  # method -> (mmke train options, --set options)
    "mend": (["--steps", "2", "--val-size", "1", "--val-every", "2"], {"rank": 8}),
    "unike": (["--val-size", "1"], {**UNIKE, "enc_steps": 2}),
    "serac": (["--steps", "30", "--batch-size", "4", "--lr", "1e-2", "--val-size", "1", "--val-every", "30",
               "--counterfactual", "0.25"], SERAC),
}


@pytest.fixture(scope="session")
def toy(tmp_path_factory) -> Path:
    """Fourteen toy MMEdit records (colour questions) with their 32x32 images beside them."""
    return write_toy_mmedit(tmp_path_factory.mktemp("toy"), n=14)


def _sets(opts: dict) -> list[str]:
    return [x for k, v in opts.items() for x in ("--set", f"{k}={json.dumps(v)}")]


@pytest.fixture(scope="session")
def trained(ckpt, toy, tmp_path_factory):
    """(family, method) -> the weights directory `mmke train` wrote (trained once per session;
    UniKE's triplet cache in a temporary mmke cache)."""
    made: dict[tuple[str, str], Path] = {}
    cache = tmp_path_factory.mktemp("cache")

    def get(family: str, method: str) -> Path:
        if (family, method) not in made:
            out = tmp_path_factory.mktemp(f"{method}-{family}")
            opts, sets = TRAIN[method]
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("MMKE_CACHE", str(cache))
                r = CliRunner().invoke(app, ["train", "--method", method, "--task", "vqa", "--model",
                                             f"hf:{ckpt(family)}", "--train-data", str(toy), "--image-root",
                                             str(toy.parent), "--out", str(out), *opts, *_sets(sets)])
            assert r.exit_code == 0, r.output + repr(r.exception)
            made[family, method] = out
        return made[family, method]
    return get


@pytest.mark.parametrize("method", ["mend", "unike"])
@pytest.mark.parametrize("family", FAMILIES)
def test_mmke_train(trained, ckpt, family, method):
    out = trained(family, method)
    assert (out / "CARD.md").exists() and (out / "weights.safetensors").exists()
    meta = json.loads((out / "weights.json").read_text())
    assert meta["method"] == method and meta["model"] == f"hf:{ckpt(family)}" and meta["task"] == "vqa"
    assert set(meta["validation"]) >= {"reliability", "t_locality", "m_locality"}
    if method == "unike":
        assert (out / "memory.safetensors").exists()


def _editor(method: str, adapter, family: str, trained, records):
    opts = {"ft-lm": dict(steps=40, lr=3e-2), "ft-vision": {}, "ike": dict(k=2), "t-patcher": dict(steps=60, lr=5e-2),
            "grace": dict(layer=-1, eps_init=1.0), "unike": UNIKE, "serac": SERAC}[method]
    cls = editor_class(method)
    if method in ("unike", "serac"):
        opts = {**opts, "weights": str(trained(family, method))}
    kw = dict(task=TASKS["vqa"], model_name=adapter.name)
    if cls.uses_train_records(cls.Config(**opts)):
        kw["train_records"] = records
    return cls(adapter, cls.Config(**opts), **kw)


MATRIX = ["ft-lm", "ft-vision", "ike", "t-patcher", "unike", "serac", "grace"]


@pytest.mark.parametrize("method", MATRIX)
@pytest.mark.parametrize("family", FAMILIES)
def test_edit_lands_and_restores_exactly(ckpt, trained, toy, family, method):
    from mmke.train.editors import make_cases

    a = _load(ckpt, family)
    records = load_records(toy).records
    inputs = make_cases([records[0]], TASKS["vqa"], a)[0].inputs
    edit_in = inputs["reliability"]  # " red": the random model does not predict it
    probes = [edit_in, inputs["t_locality"], inputs["m_locality"]]
    digest = state_digest(a.model)
    kinds = [type(m) for m in a.model.modules()]
    with torch.no_grad():
        before = a.run(probes).logits
        v0 = a.run([edit_in])
    nll0 = target_nll(v0).item()
    assert not bool((v0.logits.argmax(-1) == v0.target_ids)[v0.mask].all())
    # what editors read from the train split at edit time (IKE's demonstrations, T-Patcher's and
    # UniKE's memories of other inputs): other questions than the edit's, as an eval case meets
    others = [replace(r, src=r.m_loc_q, rephrase=r.m_loc_q, alt=r.m_loc_a) for r in records[1:]]
    ed = _editor(method, a, family, trained, others)
    handle = ed.edit(EditRequest(edit_in, records[0].to_dict()))
    with torch.no_grad():
        v = a.run([edit_in])
        after = a.run(probes).logits
    nll1 = target_nll(v).item()
    hit = bool((v.logits.argmax(-1) == v.target_ids)[v.mask].all())
    if method == "ike":
        # a random model has no reason to follow its context: IKE lands on trained models only.
        # Here: the model sees the new fact and its outputs change.
        seen = edit_in
        for fn in a.input_transforms:
            seen = fn(seen)
        assert "red" in seen.context + seen.prompt.removesuffix(edit_in.prompt) and not torch.equal(after, before)
    elif method == "serac":
        # in scope: answered by the counterfactual model with the fact in view (its LoRA, trained
        # 30 steps on these records, has learnt their answers; reading the fact takes longer);
        # the text-only locality input stays with the base model
        with torch.no_grad():
            own = ed.counterfactual_run(a.run_plain, [edit_in], ed.fact(edit_in))
        assert torch.equal(v.logits, own.logits) and torch.equal(after[1], before[1])
        assert nll1 < nll0 - 2.0, (nll0, nll1)
    elif method == "ft-vision":  # the vision side is the hard one (MMEdit's finding)
        assert nll1 < nll0 - 0.5, (nll0, nll1)
    else:
        assert hit or nll1 < nll0 - 2.0, (nll0, nll1)
    handle.remove()
    assert state_digest(a.model) == digest
    assert _hooks(a.model) == [] and [type(m) for m in a.model.modules()] == kinds
    assert a.input_transforms == [] and a.run_wrappers == []
    with torch.no_grad():
        assert torch.equal(a.run(probes).logits, before)


@pytest.mark.parametrize("family", FAMILIES)
def test_mmke_run(ckpt, toy, family, tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["run", "--model", f"hf:{ckpt(family)}", "--method", "ft-lm", "--data", str(toy),
                                 "--image-root", str(toy.parent), "--out", str(out), "--limit", "2",
                                 "--set", "steps=5", "--set", "lr=0.03"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    s = json.loads((out / "summary.json").read_text())
    assert s["n_cases"] == 2 and s["method"] == "ft-lm"
    assert s["metrics"]["reliability"] >= s["pre_edit_metrics"]["reliability"]
