"""In-context knowledge (``Example.context``) on the ``hf:`` families: placed before the image, run
once per case and shared by its five inputs through one KV cache; the outputs equal the unshared
computation. Long rows run one at a time on a CPU; IKE's query keeps the demonstrations' spacing."""

import pytest
import torch
from PIL import Image

from mmke.data.schema import load_records
from mmke.editors.base import EditRequest
from mmke.editors.ike import IKEConfig, IKEEditor
from mmke.models.base import Example
from mmke.models.hf import HFAdapter
from mmke.models.tiny import TINY_FAMILIES, tiny_family
from mmke.tasks import TASKS

from toydata import write_toy_mmedit

CONTEXT = ("New Fact: Question: what color is the shape? Short answer: red\nPrompt: Question: what colour "
           "is the shape? Short answer: red\n\nNew Fact: nq question: what is the capital of france? paris\n"
           "Prompt: nq question: what is the capital of france? paris\n\n")


def _adapter(family: str) -> HFAdapter:
    model, processor = tiny_family(family)
    return HFAdapter(model, processor=processor)


def _case(context: str) -> list[Example]:
    """Five inputs as a case has them: two on the edit image, one on its rephrase, a text-only
    question and one on an unrelated image."""
    red, red2, blue = (Image.new("RGB", (32, 32), c) for c in ((220, 20, 20), (240, 40, 40), (20, 20, 220)))
    q = "Question: what color is the shape? Short answer:"
    return [Example(q, " red", red, context), Example("Question: what colour is the shape? Short answer:", " red", red,
                                                       context),
            Example(q, " red", red2, context), Example("nq question: what is the capital of france?", " paris", None,
                                                       context),
            Example("Question: what shape is in the image? Short answer:", " circle", blue, context)]


def _unshared(adapter: HFAdapter, examples: list[Example]):
    """Each input alone, through the model's plain forward (no prefix memo: nothing shared)."""
    return [adapter.target_view(adapter.prepare([ex])) for ex in examples]


def _count_shared(adapter: HFAdapter) -> list[int]:
    """Count the forwards that ran on a shared prefix (wrapping the adapter's own method)."""
    calls: list[int] = []
    inner = adapter._hidden_after_prefix

    def counted(inputs, prefix):
        calls.append(prefix)
        return inner(inputs, prefix)

    adapter._hidden_after_prefix = counted
    return calls


@pytest.mark.parametrize("family", list(TINY_FAMILIES))
@pytest.mark.parametrize("row_by_row", [False, True])
def test_shared_prefix_equals_unshared_forward(family, row_by_row, one_thread):
    adapter = _adapter(family)
    adapter.split_rows_from = 1 if row_by_row else None
    exs = _case(CONTEXT)
    calls = _count_shared(adapter)
    with torch.no_grad():
        shared = adapter.run(exs)
        calls_in_run = list(calls)
        ref = _unshared(adapter, exs)
    for i, v in enumerate(ref):
        n = int(v.mask[0].sum())
        assert torch.equal(shared.target_ids[i, :n], v.target_ids[0, :n])
        assert torch.allclose(shared.logits[i, :n], v.logits[0, :n], atol=1e-5, rtol=1e-4), (family, i)
    if adapter.layout.shares_prefix:
        # every batch of the run went through the shared prefix, which ran once for all of them
        batches = 5 if row_by_row else len(adapter.sub_batches(exs))
        assert len(calls_in_run) == batches and len(set(calls_in_run)) == 1
    else:  # a family that cannot share: the plain forward, row by row or batched
        assert calls_in_run == []


@pytest.mark.parametrize("family", ["blip2", "llava", "qwen2-vl"])
def test_context_goes_first_then_the_image(family, one_thread):
    adapter = _adapter(family)
    ex = _case(CONTEXT)[0]
    row = adapter.prepare([ex]).inputs["input_ids"][0].tolist()
    head = adapter._bos + adapter._tok(CONTEXT)
    assert row[: len(head)] == head
    assert adapter.image_token_id not in head and adapter.image_token_id in row[len(head):]
    plain = adapter.prepare([Example(ex.prompt, ex.target, ex.image)]).inputs["input_ids"][0].tolist()
    bos = len(adapter._bos) if plain[: len(adapter._bos)] == adapter._bos else 0
    assert row[len(head):] == plain[bos:]  # the row as the family builds it, after the context
    b = adapter.prepare(_case(CONTEXT))
    assert b.inputs["prefix_len"] == len(head)
    assert "prefix_len" not in adapter.prepare(_case(CONTEXT)[:1] + [Example("a", " b")]).inputs


def test_hooks_turn_sharing_off(one_thread):
    """An installed hook may look at whole rows (an image gate, a label tap): the prefix is then
    not shared, and outputs are the hooked model's own."""
    adapter = _adapter("llava")
    exs = _case(CONTEXT)
    calls = _count_shared(adapter)
    layer = adapter.site("lm.ffn_value.-1")
    h = layer.register_forward_hook(lambda _m, _a, out: out * 1.5)
    try:
        with torch.no_grad():
            hooked = adapter.run(exs)
            ref = _unshared(adapter, exs)
    finally:
        h.remove()
    assert calls == []
    for i, v in enumerate(ref):
        n = int(v.mask[0].sum())
        assert torch.allclose(hooked.logits[i, :n], v.logits[0, :n], atol=1e-5, rtol=1e-4)


def test_long_rows_run_one_at_a_time_on_cpu(one_thread):
    adapter = _adapter("llava")
    exs = _case("")
    adapter.split_rows_from = 10_000
    assert [idx for idx, _ in adapter.batches(exs)] == [[0, 1, 2, 4], [3]]
    adapter.split_rows_from = 5
    assert [idx for idx, _ in adapter.batches(exs)] == [[0], [1], [2], [4], [3]]
    # tokens of a shared prefix do not count: they run once either way
    adapter.split_rows_from = len(adapter._tok(CONTEXT)) + 5
    assert [idx for idx, _ in adapter.batches(_case(CONTEXT))] == [[0, 1, 2, 4], [3]]


@pytest.mark.parametrize("family", ["llava", "qwen2-vl", "idefics3"])
def test_ike_query_is_spaced_as_its_demonstrations(family, tmp_path, one_thread):
    """Demonstrations read "Prompt: Question: ..."; so does the query, token for token, in both
    layouts (before: the context ended in "Prompt: " and was tokenised apart from the input)."""
    adapter = _adapter(family)
    vqa = TASKS["vqa"]
    recs = load_records(write_toy_mmedit(tmp_path, n=4)).records
    x = Example(vqa.prompt("what color is the shape?"), " teal", Image.new("RGB", (32, 32), (0, 128, 128)))
    spaced = adapter._tok("\nPrompt: " + x.prompt)
    for image_first in (True, False):
        ed = IKEEditor(adapter, IKEConfig(k=2, image_first=image_first, max_context_tokens=150),
                       train_records=recs, task=vqa)
        h = ed.edit(EditRequest(x, {"src": "what color is the shape?", "alt": "teal"}))
        row = adapter.prepare([x]).inputs["input_ids"][0].tolist()
        h.remove()
        assert any(row[i: i + len(spaced)] == spaced for i in range(len(row))), (family, image_first)


def test_full_logits_with_a_shared_prefix(one_thread):
    """``forward`` (logits at every position, the prefix's included) on a shared prefix equals
    each row run alone."""
    adapter = _adapter("llava")
    exs = [ex for ex in _case(CONTEXT) if ex.image is not None]
    calls = _count_shared(adapter)
    with torch.no_grad():
        batch = adapter.prepare(exs)
        logits = adapter.forward(batch)
        assert len(calls) == 1
        for i, ex in enumerate(exs):
            alone = adapter.forward(adapter.prepare([ex]))
            n = alone.shape[1]
            assert torch.allclose(logits[i, :n], alone[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["qwen2-vl", "llava"])
def test_a_case_is_tokenised_once_for_its_unedited_and_edited_runs(family):
    """``prepare`` keeps its last batches: the same inputs (same texts, same image objects) give
    the same batch without tokenising again; another image object, a context or a new target does
    not hit; outputs are unchanged; a from-scratch timing can drop what was kept."""
    a = _adapter(family)
    calls = []
    real = a._prepare
    a._prepare = lambda exs: calls.append(len(exs)) or real(exs)
    case = _case("")
    with torch.no_grad():
        first = a.run(case)
        n = len(calls)
        second = a.run(case)
    assert len(calls) == n  # nothing prepared again
    assert torch.equal(first.logits, second.logits)
    same_pixels = [Example(ex.prompt, ex.target, ex.image.copy() if ex.image else None) for ex in case]
    a.prepare(same_pixels[:1])
    assert len(calls) == n + 1  # a new image object is prepared (identity, not pixels, is the key)
    a.prepare([Example(case[0].prompt, " blue", case[0].image)])
    a.prepare([Example(case[0].prompt, case[0].target, case[0].image, CONTEXT)])
    assert len(calls) == n + 3
    kept_contexts = "_context_memo" in a.__dict__  # hf adapters keep tokenised contexts too
    a.forget_prepared()
    assert "_prepared" not in a.__dict__ and "_context_memo" not in a.__dict__
    a.prepare(case[:1])
    assert len(calls) == n + 4
    for i in range(a.prepared_memo_size + 1):  # bounded
        a.prepare([Example(f"q{i}", " x")])
    assert len(a.__dict__["_prepared"]) == a.prepared_memo_size
    assert kept_contexts
