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
