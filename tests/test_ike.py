"""IKE follows the MMEdit reference layout: three demonstrations per train record, retrieval by
the reference query, the edit's own copy demonstration last, the image before all text."""

import json

import torch
from PIL import Image

from mmke.data.schema import load_records
from mmke.editors.base import EditRequest
from mmke.editors.ike import IKEConfig, IKEEditor, demo, pool_sentences
from mmke.models.base import Example
from mmke.models.tiny import tiny_llava
from mmke.tasks import TASKS

from toydata import write_toy_mmedit


def test_reference_layout(tmp_path, one_thread):
    f = write_toy_mmedit(tmp_path, n=4)
    recs = load_records(f).records
    vqa = TASKS["vqa"]
    pool = pool_sentences(recs, vqa.prompt)
    assert len(pool) == 3 * len(recs)
    r = recs[0]
    nf = f"Question: {r.src} Short answer: {r.alt}"
    assert pool[:3] == [demo(nf, nf), demo(nf, f"Question: {r.rephrase} Short answer: {r.alt}"),
                        demo(nf, f"{r.loc} {r.loc_ans}")]
    assert pool[0] == f"New Fact: {nf}\nPrompt: {nf}\n\n"

    adapter = tiny_llava(seed=0)
    img = Image.new("RGB", (32, 32), (0, 128, 128))
    ed = IKEEditor(adapter, IKEConfig(k=2, max_context_tokens=150), train_records=recs, task=vqa)
    x = Example(vqa.prompt("what color is the shape?"), " teal", img)
    h = ed.edit(EditRequest(x, {"src": "what color is the shape?", "alt": "teal"}))
    assert len(h.meta["demos"]) == 2 and h.meta["n_demos_used"] >= 1
    seen = x
    for fn in adapter.input_transforms:
        seen = fn(seen)
    new_fact = "Question: what color is the shape? Short answer: teal"
    assert seen.context == "" and seen.image is img  # image first: all text after it
    assert seen.prompt.endswith(f"{demo(new_fact, new_fact)}New Fact: {new_fact}\nPrompt: {x.prompt}")
    assert seen.prompt.startswith("".join(pool[j] for j in h.meta["demos"][:h.meta["n_demos_used"]]))
    h.remove()
    ed2 = IKEEditor(adapter, IKEConfig(k=2, image_first=False, max_context_tokens=150), train_records=recs, task=vqa)
    h2 = ed2.edit(EditRequest(x, {"src": "what color is the shape?", "alt": "teal"}))
    seen2 = adapter.input_transforms[0](x)
    # demonstrations before the image (the shared prefix), the query after it, joined to the input
    assert seen2.context.endswith(demo(new_fact, new_fact)) and "New Fact" not in seen2.context.split("\n\n")[-1]
    assert seen2.prompt == f"New Fact: {new_fact}\nPrompt: {x.prompt}"
    with torch.no_grad():
        adapter.run([x])
    h2.remove()
    assert json.dumps(h2.meta)  # meta is JSON (saved edits)


def test_context_limit_is_said_once_and_counted_per_edit(tmp_path, caplog, one_thread):
    """Edits sharing a small budget: one warning for the editor, each edit's count in its meta."""
    import logging

    f = write_toy_mmedit(tmp_path, n=8)
    recs = load_records(f).records
    vqa = TASKS["vqa"]
    adapter = tiny_llava(seed=0)
    ed = IKEEditor(adapter, IKEConfig(k=4, max_context_tokens=200), train_records=recs, task=vqa)
    img = Image.new("RGB", (32, 32), (0, 128, 128))
    handles = []
    with caplog.at_level(logging.DEBUG, logger="mmke.editors.ike"):
        for alt in ("teal", "red", "blue"):
            x = Example(vqa.prompt("what color is the shape?"), f" {alt}", img)
            handles.append(ed.edit(EditRequest(x, {"src": "what color is the shape?", "alt": alt})))
    said = [r for r in caplog.records if "context limit" in r.getMessage()]
    assert [r.levelno for r in said][:1] == [logging.WARNING]
    assert all(r.levelno == logging.DEBUG for r in said[1:]) and len(said) >= 2
    assert [h.meta["n_demos_used"] for h in handles][-1] < 4  # three edits share 200 tokens
    for h in reversed(handles):
        h.remove()
    assert not adapter.input_transforms
