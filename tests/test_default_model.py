"""The bundled default model through the adapter, and the foundation editors on it."""


import pytest
import torch
from PIL import Image

from mmke.data import easyvqa_source as ev
from mmke.editors.base import EditRequest
from mmke.editors.ft import FTEditor, FTVisionEditor
from mmke.models.base import Example, state_digest, target_nll
from mmke.tasks import VQA_TEMPLATE

pytestmark = pytest.mark.slow




@pytest.fixture(scope="module")
def adapter(default_adapter):
    return default_adapter


@pytest.fixture(scope="module")
def case():
    q, a, i = ev.questions("test")[1]  # "what color is the shape?"-style question
    img = Image.open(ev.image_path("test", i)).convert("RGB")
    wrong = " triangle" if a != "triangle" else " circle"
    return Example(VQA_TEMPLATE.format(q), wrong, img)


def test_only_target_tokens_are_labelled(adapter, case):
    ex2 = Example("a photo of", " a teal circle", case.image)
    ex3 = Example("nq question: what is the capital of france?", " paris", None)
    for ex in (case, ex2, ex3):
        b = adapter.prepare([ex])
        n_target = len(adapter.tokenizer(ex.target, add_special_tokens=False).input_ids)
        assert int((b.labels != -100).sum()) == n_target
    v = adapter.run([case, ex2, ex3])
    assert v.mask.sum(1).tolist() == [len(adapter.tokenizer(e.target, add_special_tokens=False).input_ids)
                                      for e in (case, ex2, ex3)]


def test_batched_equals_single(adapter, case):
    ex2 = Example("a photo of", " a teal circle", case.image)
    with torch.no_grad():
        both = adapter.run([case, ex2])
        one = adapter.run([ex2])
    n = int(one.mask[0].sum())
    assert torch.allclose(both.logits[1, :n], one.logits[0, :n], atol=1e-4)


@pytest.mark.parametrize("cls", [FTEditor, FTVisionEditor])
def test_ft_edit_moves_target_and_restores_exactly(adapter, case, cls):
    before = state_digest(adapter.model)
    with torch.no_grad():
        nll0 = target_nll(adapter.run([case])).item()
    h = cls(adapter).edit(EditRequest(case))
    with torch.no_grad():
        nll1 = target_nll(adapter.run([case])).item()
    assert nll1 < nll0 - 0.5
    assert state_digest(adapter.model) != before
    h.remove()
    assert state_digest(adapter.model) == before


def test_ft_lm_reaches_target(adapter, case):
    h = FTEditor(adapter).edit(EditRequest(case))
    try:
        with torch.no_grad():
            v = adapter.run([case])
        assert bool((v.logits.argmax(-1) == v.target_ids)[v.mask].all())
    finally:
        h.remove()


def test_saved_edit_reloads_to_identical_outputs(adapter, case, tmp_path):
    ed = FTEditor(adapter)
    h = ed.edit(EditRequest(case))
    with torch.no_grad():
        edited = adapter.run([case]).logits
    h.save(tmp_path / "edit")
    h.remove()
    h2 = ed.load(tmp_path / "edit")
    with torch.no_grad():
        assert torch.equal(adapter.run([case]).logits, edited)
    h2.remove()


def test_corrupt_saved_edit_is_a_clear_error(adapter, case, tmp_path):
    ed = FTEditor(adapter)
    h = ed.edit(EditRequest(case))
    h.save(tmp_path / "edit")
    h.remove()
    f = tmp_path / "edit" / "edit.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated"):
        ed.load(tmp_path / "edit")


def test_shared_context_kv_cache_matches_full_forward(adapter, case):
    ctx = "New Fact: what color is the shape? teal\nPrompt: what color is the shape? teal\n\n"
    exs = [Example(case.prompt, case.target, case.image, context=ctx),
           Example("nq question: what is the capital of france?", " paris", None, context=ctx),
           Example("a photo of", " a red circle", case.image, context=ctx)]
    with torch.no_grad():
        batched = adapter.run(exs)  # one prefix pass, KV cache shared by the three rows
        for i, ex in enumerate(exs):
            b = adapter.prepare([ex])
            assert b.inputs["prefix_len"] > 0
            full = adapter.forward(b)  # one row outside a run: the plain full-sequence forward
            n = int(b.labels[0].ne(-100).sum())
            single = adapter.run([ex])  # one row inside a run: the prefix path
            assert torch.allclose(batched.logits[i, :n], single.logits[0, :n], atol=1e-4)
            assert torch.allclose(single.logits[0, :n], full[0][b.labels[0].roll(-1).ne(-100)][:n], atol=1e-4)


def test_a_shared_context_runs_once_for_every_batch_inside_sharing_prefixes(adapter, case, monkeypatch):
    """Inside ``sharing_prefixes`` (a run, or a whole checkpoint's scoring) the prefix is computed
    once and reused by later batches that start with it; outside, every batch runs its own; with an
    editor's hook installed rows run whole."""
    import mmke.models.default as default

    runs = []
    real = default.prefix_kv
    monkeypatch.setattr(default, "prefix_kv", lambda memo, ids, P, run: real(memo, ids, P, lambda: runs.append(P) or run()))
    ctx = "New Fact: what color is the shape? teal\nPrompt: what color is the shape? teal\n\n"
    a = [Example(case.prompt, case.target, case.image, context=ctx), Example("a photo of", " a red circle", case.image, context=ctx)]
    b = [Example("nq question: what is the capital of france?", " paris", None, context=ctx)]
    with torch.no_grad():
        with adapter.sharing_prefixes():
            first, second = adapter.run(a), adapter.run(b)
        assert len(runs) == 1
        again = adapter.run(b)  # a run of its own: the prefix again
        assert len(runs) == 2 and torch.allclose(again.logits, second.logits, atol=1e-5)
        h = adapter.model.lm.model.layers[0].register_forward_hook(lambda m, i, o: None)
        try:
            whole = adapter.run(a)
        finally:
            h.remove()
        assert len(runs) == 2 and torch.allclose(whole.logits, first.logits, atol=1e-4)


def test_a_long_row_reuses_the_kv_cache_of_the_head_it_shares_with_an_earlier_row(adapter, case, monkeypatch):
    """IKE's published layout puts the image first and the demonstrations after it, so no row shares
    a text prefix; inside one memo a long row reuses the KV cache of the longest head it shares with
    a recent row that saw the same image (or no image), and only its own tail runs. The outputs are
    those of the rows run alone."""
    import functools

    from mmke.models.default import DefaultVLM

    monkeypatch.setattr(DefaultVLM, "long_row", 96)
    monkeypatch.setattr(DefaultVLM, "min_shared", 32)
    head = "".join(f"New Fact: what shape is in the image? {s}\nPrompt: what shape is in the image? {s}\n\n"
                   for s in ("circle", "triangle", "rectangle", "circle"))
    other = Image.new("RGB", case.image.size, (200, 30, 30))
    q1, q2, q3 = case.prompt, "Question: which shape is shown? Short answer:", "nq question: who wrote hamlet?"
    exs = [Example(head + q1, case.target, case.image), Example(head + q2, case.target, case.image),
           Example(head + q3, " shakespeare", None), Example(head + q1, " paris", None),
           Example(head + q1, case.target, other), Example("a photo of", " a red circle", case.image)]
    lm = adapter.model.lm.model
    real, ran = lm.forward, []

    @functools.wraps(real)
    def counting(*a, **k):
        ran.append(k["inputs_embeds"].shape[1])
        return real(*a, **k)

    with torch.no_grad():
        alone = [adapter.run([ex]).logits for ex in exs]  # each run its own memo: every row whole
        rows = [len(adapter.prepare([ex]).inputs["input_ids"][0]) for ex in exs]
        monkeypatch.setattr(lm, "forward", counting)
        with adapter.sharing_prefixes():
            shared = [adapter.run([ex]).logits for ex in exs]
    assert ran[0] == rows[0] and ran[2] == rows[2] and ran[4] == rows[4] and ran[5] == rows[5]  # run whole
    assert ran[1] < rows[1] // 4 and ran[3] < rows[3] // 4  # only their tails: same image, same text-only head
    for a, b in zip(alone, shared):
        assert torch.allclose(a, b, atol=1e-4) and torch.equal(a.argmax(-1), b.argmax(-1))


def test_ike_changes_outputs_and_removal_restores_them(adapter, case, tmp_path):
    from mmke.data.schema import load_records
    from mmke.data.bundled import default_benchmark_dir, ensure_benchmark
    from mmke.editors.ike import IKEConfig, IKEEditor

    bench = ensure_benchmark(default_benchmark_dir())
    pool = load_records(bench / "vqa_train.json", bench, check_images=False).records
    ed = IKEEditor(adapter, IKEConfig(k=4), train_records=pool)
    with torch.no_grad():
        before = adapter.run([case]).logits
    rec = {"src": "what color is the shape?", "alt": case.target.strip()}
    h = ed.edit(EditRequest(case, rec))
    with torch.no_grad():
        during = adapter.run([case]).logits
    assert not torch.equal(before, during)
    h.save(tmp_path / "ike")
    h.remove()
    assert adapter.input_transforms == []
    with torch.no_grad():
        assert torch.equal(adapter.run([case]).logits, before)
    h2 = ed.load(tmp_path / "ike")
    with torch.no_grad():
        assert torch.equal(adapter.run([case]).logits, during)
    h2.remove()
