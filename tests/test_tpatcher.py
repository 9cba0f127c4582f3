"""T-Patcher on tiny Hugging Face models: the edit lands, and removal restores exactly."""

import pytest
import torch
from PIL import Image

from mmke.editors.base import EditRequest
from mmke.editors.tpatcher import TPatcherConfig, TPatcherEditor
from mmke.models.base import Example, target_nll
from mmke.models.tiny import tiny_blip2, tiny_llava


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("build", [tiny_llava, tiny_blip2])
def test_patch_edits_restores_and_reloads(build, tmp_path):
    adapter = build()
    img = Image.new("RGB", (32, 32), (0, 128, 128))
    ex = Example("what color is the shape?", " red", img)
    other = Example("nq question: what is the capital of france?", " paris", None)
    with torch.no_grad():
        before = adapter.run([ex, other]).logits
        nll0 = target_nll(adapter.run([ex])).item()
    ed = TPatcherEditor(adapter, TPatcherConfig(steps=60, lr=5e-2))
    h = ed.edit(EditRequest(ex))
    with torch.no_grad():
        v = adapter.run([ex])
        edited = adapter.run([ex, other]).logits
    assert target_nll(v).item() < nll0 - 1.0
    assert bool((v.logits.argmax(-1) == v.target_ids)[v.mask].all())
    h.save(tmp_path / "e")
    h.remove()
    with torch.no_grad():
        assert torch.equal(adapter.run([ex, other]).logits, before)
    h2 = ed.load(tmp_path / "e")
    with torch.no_grad():
        assert torch.equal(adapter.run([ex, other]).logits, edited)
    h2.remove()


def test_sequential_patches_accumulate_and_unwind():
    adapter = tiny_llava()
    img = Image.new("RGB", (32, 32), (200, 10, 10))
    a = Example("what color is the shape?", " blue", img)
    b = Example("what shape is present?", " circle", img)
    with torch.no_grad():
        before = adapter.run([a, b]).logits
    ed = TPatcherEditor(adapter, TPatcherConfig(steps=60, lr=5e-2))
    h1 = ed.edit(EditRequest(a))
    with torch.no_grad():
        after_first = adapter.run([a, b]).logits
    h2 = ed.edit(EditRequest(b))  # trained with the first patch in place: both are active
    with torch.no_grad():
        v = adapter.run([b])
        both = adapter.run([a, b]).logits
    assert bool((v.logits.argmax(-1) == v.target_ids)[v.mask].all())
    assert not torch.equal(both, after_first)
    h2.remove()
    with torch.no_grad():
        assert torch.equal(adapter.run([a, b]).logits, after_first)
    h1.remove()
    with torch.no_grad():
        assert torch.equal(adapter.run([a, b]).logits, before)


def test_one_neuron_per_mistake_at_its_position():
    """The paper's rule: as many neurons as wrongly predicted target tokens (capped), each keyed
    to the FFN input at its own mistake's position; a correct prediction adds none."""
    adapter = tiny_llava()
    img = Image.new("RGB", (32, 32), (0, 128, 128))
    ex = Example("what color is the shape?", " red blue circle", img)
    with torch.no_grad():
        v = adapter.run([ex])
    n_wrong = int(((v.logits.argmax(-1) != v.target_ids) & v.mask).sum())
    assert n_wrong >= 2
    ed = TPatcherEditor(adapter, TPatcherConfig(steps=80, max_neurons=5))
    h = ed.edit(EditRequest(ex))
    assert h.meta["neurons"] == min(n_wrong, 5) == h.tensors["key"].shape[1]
    h.remove()
    capped = TPatcherEditor(adapter, TPatcherConfig(steps=1, max_neurons=1)).edit(EditRequest(ex))
    assert capped.meta["neurons"] == 1 and len(capped.meta["positions"]) == 1
    capped.remove()
    # an edit the model already satisfies needs no neuron and changes nothing
    with torch.no_grad():
        pred = adapter.run([Example("what color is the shape?", " red", img)]).logits.argmax(-1)[0, 0]
    done = Example("what color is the shape?", adapter.tokenizer.decode([int(pred)]), img)
    with torch.no_grad():
        ok = adapter.run([done])
    if bool((ok.logits.argmax(-1) == ok.target_ids)[ok.mask].all()):
        h0 = ed.edit(EditRequest(done))
        assert h0.meta["neurons"] == 0 and h0.tensors == {}
        h0.remove()
