"""GRACE and WISE on tiny random models: edits land, unrelated inputs pass, any removal order
restores exactly, saved edits reload; and a few real edits on the bundled model."""

import itertools

import pytest
import torch
from PIL import Image

from mmke.data.schema import EditRecord
from mmke.editors.base import EditRequest
from mmke.editors.grace import GraceConfig, GraceEditor
from mmke.editors.wise import WiseConfig, WiseEditor, ties_merge
from mmke.models.base import Example, state_digest, target_nll
from mmke.models.tiny import tiny_blip2, tiny_llava
from mmke.registry import METHODS, editor_class
from mmke.tasks import TASKS

pytestmark = pytest.mark.usefixtures("one_thread")

IMG = Image.new("RGB", (32, 32), (0, 128, 128))
EDITS = [Example("what color is the shape?", " red", IMG),
         Example("what shape is present?", " circle", Image.new("RGB", (32, 32), (200, 10, 10))),
         Example("nq question: who wrote hamlet?", " dickens", None)]
OTHER = Example("nq question: what is the capital of france?", " paris", None)
WISE_FAST = dict(layer=-1, alpha=0.5, beta=2.0, gamma=1.0, n_iter=40)


def _logits(adapter, exs):
    with torch.no_grad():
        return adapter.run(exs).logits


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    out = []
    for i, (c, rgb) in enumerate({"red": (220, 20, 20), "blue": (20, 20, 220), "green": (20, 200, 20)}.items()):
        Image.new("RGB", (32, 32), rgb).save(root / f"{c}.png")
        out.append(EditRecord(src=f"nq question: what is the capital of country {i}?", alt="madrid", rephrase="a circle?",
                              image=f"{c}.png", image_rephrase=f"{c}.png", loc="nq question: x?", loc_ans="y",
                              m_loc=f"{c}.png", m_loc_q="what color?", m_loc_a=c, index=i,
                              image_path=root / f"{c}.png", image_rephrase_path=root / f"{c}.png",
                              m_loc_path=root / f"{c}.png"))
    return out


def _editors(records):
    return {"grace": lambda a: GraceEditor(a, GraceConfig(layer=-1, eps_init=1.0)),
            "wise": lambda a: WiseEditor(a, WiseConfig(**WISE_FAST), task=TASKS["vqa"], train_records=records)}


def test_registered_and_options():
    assert editor_class("grace") is GraceEditor and editor_class("wise") is WiseEditor
    assert "grace" in METHODS and "wise" in METHODS
    assert not GraceEditor.uses_train_records(GraceConfig())
    assert WiseEditor.uses_train_records(WiseConfig())
    assert all(doc for _k, _d, doc in GraceConfig.option_docs())
    assert all(doc for _k, _d, doc in WiseConfig.option_docs())
    with pytest.raises(ValueError, match="layer 7 does not exist"):
        GraceEditor(tiny_llava(), GraceConfig(layer=7))
    with pytest.raises(ValueError, match="layer -3 does not exist"):
        WiseEditor(tiny_llava(), WiseConfig(layer=-3))


@pytest.mark.parametrize("method", ["grace", "wise"])
@pytest.mark.parametrize("build", [tiny_llava, tiny_blip2])
def test_edit_lands_locality_and_reload(method, build, records, tmp_path):
    adapter = build()
    ex = EDITS[0]
    before = _logits(adapter, [ex, OTHER])
    nll0 = target_nll(adapter.run([ex])).item()
    ed = _editors(records)[method](adapter)
    h = ed.edit(EditRequest(ex))
    with torch.no_grad():
        v = adapter.run([ex])
    edited = _logits(adapter, [ex, OTHER])
    assert target_nll(v).item() < nll0 - 1.0
    # (top-1 on every token is not asserted: " red" is two tokens on these random models, and
    # GRACE's one value vector, or WISE's routing margins, need not fit both; see the slow test)
    if method == "grace":  # outside every radius: the unrelated input passes through, bit for bit
        assert torch.equal(edited[1], before[1])
    # WISE routes by a learnt score; on these random models its margins are not always met (caveat)
    h.save(tmp_path / "e")
    h.remove()
    assert torch.equal(_logits(adapter, [ex, OTHER]), before)
    h2 = _editors(records)[method](adapter).load(tmp_path / "e")
    assert torch.equal(_logits(adapter, [ex, OTHER]), edited)
    h2.remove()
    assert torch.equal(_logits(adapter, [ex, OTHER]), before) and "prepare" not in adapter.__dict__


@pytest.mark.parametrize("method", ["grace", "wise"])
def test_three_edits_removed_in_every_order(method, records):
    adapter = tiny_llava()
    exs = EDITS + [OTHER]
    before, digest = _logits(adapter, exs), state_digest(adapter.model)
    make = _editors(records)[method]
    if method == "wise":  # shards of two edits: the third edit's shard sits beside a TIES-merged one
        make = lambda a: WiseEditor(a, WiseConfig(**WISE_FAST, save_freq=2), task=TASKS["vqa"],
                                    train_records=records)
    ed = make(adapter)
    handles = [ed.edit(EditRequest(e)) for e in EDITS]
    all_three = _logits(adapter, exs)
    assert not torch.equal(all_three, before)
    saved = [h.tensors for h in handles]
    left_of: dict[frozenset, torch.Tensor] = {}
    for order in itertools.permutations(range(3)):
        for i in order:
            handles[i].remove()
            survivors = frozenset(set(range(3)) - set(order[: order.index(i) + 1]))
            now = _logits(adapter, exs)
            # the state after a removal depends only on which edits survive, not on the order
            assert torch.equal(left_of.setdefault(survivors, now), now)
        assert torch.equal(_logits(adapter, exs), before)
        assert state_digest(adapter.model) == digest and "prepare" not in adapter.__dict__
        handles = [ed.load(_save(h, n)) for n, h in enumerate(handles)]  # re-apply the same three
        assert [h.tensors.keys() for h in handles] == [s.keys() for s in saved]
        assert torch.equal(_logits(adapter, exs), all_three)
    for h in handles:
        h.remove()


def test_wise_memories_kept_up_to_date_equal_a_rebuild_from_the_deltas(records):
    """The side memory adds each edit's delta to its shard's cached sum (and caches the merge):
    after adds and a removal, every memory is bit for bit the one rebuilt from the deltas."""
    adapter = tiny_llava()
    ed = WiseEditor(adapter, WiseConfig(**WISE_FAST, save_freq=2), task=TASKS["vqa"], train_records=records)
    handles = [ed.edit(EditRequest(e)) for e in EDITS]
    mem = ed.memories[ed.layer]

    def check():
        ref: dict[int, torch.Tensor] = {}
        for r in mem.records:
            ref.setdefault(r.shard, mem.main.clone())[mem.mask(r.shard)] += r.delta
        full = [ref[k] for k in sorted(ref) if k < mem.shard]
        want = ([ties_merge(mem.main, full, mem.cfg.density, mem.cfg.merge_weight)] if full else []) + (
            [ref[mem.shard]] if mem.shard in ref else [])
        assert len(mem.memories) == len(want) and all(torch.equal(m, w) for m, w in zip(mem.memories, want))

    assert mem.shard == 1 and len(mem.memories) == 2  # a merged shard of two edits beside the third's
    check()
    handles[0].remove()  # from the merged shard
    check()
    handles[2].remove()
    check()
    handles[1].remove()
    assert mem.memories == [] and mem.records == []


def test_wise_route_floor_keeps_held_out_locality_inputs_below_the_threshold(records, tmp_path):
    """The ``route_floor`` variant: its inputs are train records outside the irrelevant pool; the
    threshold is the larger of EasyEdit's and the quantile of their scores; inputs below it run
    the main memory bit for bit; removing every edit restores the model."""
    recs = []
    for i in range(6):
        Image.new("RGB", (32, 32), (40 * i, 90, 200 - 30 * i)).save(tmp_path / f"{i}.png")
        recs.append(EditRecord(src=f"what is shown {i}?", alt="blue", rephrase="shown?", image=f"{i}.png",
                               image_rephrase=f"{i}.png", loc=f"nq question: who is person {i}?", loc_ans="ann",
                               m_loc=f"{i}.png", m_loc_q=f"what color {i}?", m_loc_a="red", index=i,
                               image_path=tmp_path / f"{i}.png", image_rephrase_path=tmp_path / f"{i}.png",
                               m_loc_path=tmp_path / f"{i}.png"))
    with pytest.raises(ValueError, match="quantile in"):
        WiseEditor(tiny_llava(), WiseConfig(route_floor=1.5), task=TASKS["vqa"], train_records=recs)
    with pytest.raises(ValueError, match="more train records than n_pool"):
        WiseEditor(tiny_llava(), WiseConfig(route_floor=0.9), task=TASKS["vqa"], train_records=recs)
    adapter = tiny_llava()
    # a low act_ratio puts EasyEdit's threshold below the floor, so the floor decides
    cfg = WiseConfig(**WISE_FAST, n_pool=2, n_calib=3, route_floor=0.5, act_ratio=0.1)
    ed = WiseEditor(adapter, cfg, task=TASKS["vqa"], train_records=recs)
    assert WiseEditor.uses_train_records(WiseConfig(n_irrelevant=0, route_floor=0.5))
    pool = set(ed._pool_indices())
    calib = ed.calibration_inputs()
    assert len(pool) == 2 and len(calib) == 6  # 3 records x (T-Loc, M-Loc)
    used = {p for ex in calib for p in range(6) if f"person {p}?" in ex.prompt or f"color {p}?" in ex.prompt}
    assert len(used) == 3 and not used & pool
    before = _logits(adapter, calib)
    plain = WiseEditor(tiny_llava(), WiseConfig(**WISE_FAST, n_pool=2, act_ratio=0.1), task=TASKS["vqa"],
                       train_records=recs)
    hp = plain.edit(EditRequest(EDITS[0]))
    h = ed.edit(EditRequest(EDITS[0]))
    mem = ed.memories[ed.layer]
    best = torch.stack([mem.score_rows(*mem.calib, w) for w in mem.memories]).max(0).values
    assert mem.floor == pytest.approx(float(torch.quantile(best, 0.5)))
    # the same edit (same pool, same steps): EasyEdit's threshold, raised to the floor where it is lower
    assert h.meta["act"] == pytest.approx(hp.meta["act"])
    assert hp.meta["threshold"] < mem.floor and mem.threshold == mem.floor
    assert h.meta["floor"] == mem.floor and h.meta["route_floor"] == 0.5
    after = _logits(adapter, calib)
    below = (best < mem.threshold).tolist()
    assert any(below) and any((best >= hp.meta["threshold"]) & (best < mem.threshold))
    for n, low in enumerate(below):  # routed by EasyEdit's threshold alone, kept out by the floor
        if low:
            assert torch.equal(after[n], before[n])
    h.remove()
    assert mem.floor == 0.0 and torch.equal(_logits(adapter, calib), before)


_TMP = {}


def _save(h, n):
    import tempfile
    from pathlib import Path

    d = Path(_TMP.setdefault("d", tempfile.mkdtemp())) / f"{id(h)}-{n}"
    h.save(d)
    return d


def test_grace_codebook_split_and_expand():
    adapter = tiny_llava()
    ed = GraceEditor(adapter, GraceConfig(layer=-1, eps_init=1e6, n_iter=5))
    h1 = ed.edit(EditRequest(EDITS[0]))
    h2 = ed.edit(EditRequest(Example("what colour is the shape?", " red", IMG)))  # same label: expand
    h3 = ed.edit(EditRequest(EDITS[1]))  # another label nearby: split
    book = ed.books[ed.layer]
    assert (h1.meta["op"], h2.meta["op"], h3.meta["op"]) == ("new", "expand", "split")
    assert len(book.labels) == 2 and float(book.eps[1]) == pytest.approx(h3.meta["dist"] / 2)
    h1.remove()  # the survivors are replayed: h2 now owns its own key
    assert book.labels == [" red", " circle"]
    h2.remove()
    h3.remove()
    assert not book.records and book._hook is None


def test_ties_merge():
    base = torch.zeros(4)
    a, b = torch.tensor([1.0, -2.0, 0.0, 0.1]), torch.tensor([3.0, 2.0, 1.0, 0.0])
    m = ties_merge(base, [a, b], density=0.75, scale=1.0)
    # a keeps 1, -2, 0.1 and b keeps 3, 2, 1; signs elected: +, 0 (tie -> 0), +, +
    assert torch.allclose(m, torch.tensor([2.0, 0.0, 1.0, 0.1]))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["grace", "wise"])
def test_real_edits_on_the_default_model(method, default_adapter):
    from mmke.data.bundled import default_benchmark_dir, ensure_benchmark
    from mmke.data.schema import load_records

    bench = ensure_benchmark(default_benchmark_dir())
    task = TASKS["vqa"]
    recs = load_records(bench / "vqa_eval.json", bench).records[:4]
    train = load_records(bench / "vqa_train.json", bench, check_images=False).records[:64]
    ed = (GraceEditor(default_adapter) if method == "grace"
          else WiseEditor(default_adapter, task=task, train_records=train))
    digest = state_digest(default_adapter.model)
    exs = [Example(task.prompt(r.src), " " + r.alt.strip(), default_adapter.load_image(r.image_path)) for r in recs]
    def lands(e) -> bool:
        with torch.no_grad():
            v = default_adapter.run([e])
        return bool((v.logits.argmax(-1) == v.target_ids)[v.mask].all())

    ok = 0
    for e in exs:  # one edit at a time (one-step)
        h = ed.edit(EditRequest(e))
        ok += lands(e)
        h.remove()
    assert ok >= 3 and state_digest(default_adapter.model) == digest
    if method == "grace":  # GRACE keeps every edit of a stream: all four hold together
        handles = [ed.edit(EditRequest(e)) for e in exs]
        assert sum(lands(e) for e in exs) >= 3
        for h in reversed(handles):
            h.remove()
        assert state_digest(default_adapter.model) == digest


def _grace_mm(adapter, records, **kw):
    from mmke.editors.grace import GraceMMEditor

    return GraceMMEditor(adapter, GraceMMEditor.Config(layer=-1, eps_init=1e6, **kw), task=TASKS["vqa"],
                         train_records=records)


@pytest.mark.parametrize("build", [tiny_llava, tiny_blip2])
def test_grace_mm_entry_answers_only_inputs_with_a_similar_image(build, records, tmp_path):
    """With a radius that takes every query, GRACE answers the edit's question about any image;
    grace-mm only about an image whose signature passes the gate (the edit's own), and never a
    text-only input. The edit is saved with its signature, reloads to the same outputs and
    unwinds exactly."""
    from mmke.editors.grace import GraceMMEditor

    adapter = build()
    red, blue = (Image.open(r.image_path).convert("RGB") for r in records[:2])
    edit = Example("what color is the shape?", " red", blue)
    other = Example("what color is the shape?", " red", red)  # the same question, another image
    probes = [edit, other, OTHER]
    before = _logits(adapter, probes)
    plain = GraceEditor(adapter, GraceConfig(layer=-1, eps_init=1e6))
    h = plain.edit(EditRequest(edit))
    after = _logits(adapter, probes)
    assert not torch.equal(after[1], before[1])  # GRACE: the question alone matches the key
    h.remove()
    ed = _grace_mm(adapter, records)
    assert GraceMMEditor.uses_train_records(ed.config) and editor_class("grace-mm") is GraceMMEditor
    h = ed.edit(EditRequest(edit))
    assert h.meta["image_gated"] and "sig" in h.tensors
    after = _logits(adapter, probes)
    assert not torch.equal(after[0], before[0])  # the edit's own input takes the value
    assert torch.equal(after[1], before[1]) and torch.equal(after[2], before[2])  # gate closed
    h.save(tmp_path / "e")
    h.remove()
    assert torch.equal(_logits(adapter, probes), before)
    h2 = _grace_mm(adapter, records).load(tmp_path / "e")
    assert torch.equal(_logits(adapter, probes), after)
    h2.remove()
    assert torch.equal(_logits(adapter, probes), before) and "prepare" not in adapter.__dict__


def test_grace_mm_text_edits_stay_ungated_and_the_gate_needs_train_records(records):
    adapter = tiny_llava()
    ed = _grace_mm(adapter, records)
    h = ed.edit(EditRequest(EDITS[2]))  # no image: an ordinary GRACE entry, open for every input
    assert not h.meta["image_gated"] and "sig" not in h.tensors
    assert ed.book(ed.layer).open_for(None, 1).all()
    h.remove()
    from mmke.editors.grace import GraceMMEditor

    with pytest.raises(ValueError, match="train"):
        GraceMMEditor(adapter, GraceMMEditor.Config(layer=-1))


def test_grace_codebook_undoing_the_latest_edit_equals_replaying_the_rest():
    """Removing the latest record undoes its step of Algorithm 1 (new, expand or split) in O(1);
    the codebook is then exactly the replay of the records left."""
    from mmke.editors.grace import Codebook

    adapter = tiny_llava()
    g = torch.Generator().manual_seed(0)
    base = torch.randn(8, generator=g)
    steps = [(base, "a"), (base + 0.1, "a"), (base + 0.2, "b"), (base + 5.0, "c"), (base + 0.15, "a"),
             (base + 5.1, "c")]  # new, expand, split, new, expand/split, expand
    book = Codebook(adapter, adapter.num_lm_layers - 1, eps_init=1.0)
    rids, ops = [], []
    for k, label in steps:
        ops.append(book.plan(k, label)[0])
        rids.append(book.add(k, torch.randn(8, generator=g), label))
    assert {"new", "expand", "split"} <= set(ops)
    while rids:
        book.remove(rids.pop())
        replay = Codebook(adapter, book.layer, eps_init=1.0)
        for r in book.records:
            replay.add(r.key, r.value, r.label)
        for name in ("keys", "values", "eps"):
            assert torch.equal(getattr(book, name), getattr(replay, name)), (name, len(rids))
        assert book.labels == replay.labels
        for r in list(replay.records)[::-1]:
            replay.remove(r.rid)
    assert book._hook is None and "prepare" not in adapter.__dict__
