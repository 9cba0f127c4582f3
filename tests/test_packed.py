"""Packed key-value banks: many edits, one pre-hook + one hook per layer; removal in any order."""

import itertools

import pytest
import torch

from mmke.editors.base import EditRequest
from mmke.editors.patch import BankedPatches, FFNPatch, neuron_bank
from mmke.editors.tpatcher import TPatcherConfig, TPatcherEditor
from mmke.editors.unike import UniKEIntrinsicEditor
from mmke.editors.unike.intrinsic import EditPatch
from mmke.editors.unike.memory import LatentShift, shift
from mmke.models.base import Example
from mmke.models.tiny import tiny_blip2, tiny_llava
from mmke.tasks import TASKS
from tests.toydata import RGB3, colour_image, colour_records

pytestmark = pytest.mark.usefixtures("one_thread")
COLOURS = RGB3


_img = colour_image


def _logits(adapter, exs):
    with torch.no_grad():
        return adapter.run(exs).logits


def _hooks(adapter, layers):
    """(pre-hooks on the FFN keys, hooks on the FFN values, hooks on attention/layer outputs) per layer."""
    return {l: (len(adapter.site(f"lm.ffn_key.{l}")._forward_pre_hooks),
                len(adapter.site(f"lm.ffn_value.{l}")._forward_hooks),
                len(adapter.site(f"lm.attn_out.{l}")._forward_hooks) + len(adapter.lm_layers()[l]._forward_hooks))
            for l in layers}


def _no_hooks(adapter):
    """No hook left anywhere in the LM (transformers adds its own output-capturing hooks to the
    vision tower on the first forward)."""
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in adapter.lm_layers().modules())


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return colour_records(tmp_path_factory.mktemp("imgs"), 9)


def _check_all_orders(adapter, editor, saved, layers, probes, hooks=None):
    """Three saved edits: loaded together they hold 2 hooks per layer (or ``hooks``: layer -> the
    (FFN key pre-hooks, FFN value hooks)); removed in each of the six
    orders, every intermediate model is exactly the one holding only the remaining edits, and the
    last removal leaves the unedited model with no hook at all."""
    before = _logits(adapter, probes)
    assert _no_hooks(adapter)
    for order in itertools.permutations(range(3)):
        handles = [editor.load(d) for d in saved]
        assert {l: v[:2] for l, v in _hooks(adapter, layers).items()} == (hooks or {l: (1, 1) for l in layers})
        left = [0, 1, 2]
        for i in order:
            handles[i].remove()
            left.remove(i)
            got = _logits(adapter, probes)
            # the same edits alone, loaded afresh in their order
            for h in handles:
                if h.active:
                    h.remove()
            assert torch.equal(_logits(adapter, probes), before)
            handles = [editor.load(saved[j]) if j in left else handles[j] for j in range(3)]
            assert torch.equal(_logits(adapter, probes), got)
        assert _no_hooks(adapter)
        assert torch.equal(_logits(adapter, probes), before)


def _save_remove_check(adapter, editor, handles, tmp_path, probes, before, hooks=None):
    """Save the three applied edits, remove them (the unedited model, no hook left), then
    :func:`_check_all_orders` on the saved edits."""
    saved = []
    for i, h in enumerate(handles):
        h.save(tmp_path / f"e{i}")
        saved.append(tmp_path / f"e{i}")
    for h in handles:
        h.remove()
    assert _no_hooks(adapter) and torch.equal(_logits(adapter, probes), before)
    _check_all_orders(adapter, editor, saved, editor.layers, probes, hooks)


def test_unike_intrinsic_edits_share_one_bank_and_unwind_in_any_order(records, tmp_path):
    adapter = tiny_llava()
    cfg = UniKEIntrinsicEditor.Config(layers=2, n_neurons=4, steps=20, memory_size=4, key_init="whitened",
                                      image_gate=(0.3, 0.5))
    ed = UniKEIntrinsicEditor(adapter, cfg, task=TASKS["vqa"], train_records=records)
    exs = [Example("what color is the shape?", " green", _img(COLOURS["red"])),
           Example("what color is the shape?", " red", _img(COLOURS["blue"])),
           Example("is there a circle?", " yes", _img(COLOURS["green"]))]
    probes = exs + [Example("nq question: what is the capital of france?", " paris", None)]
    before = _logits(adapter, probes)
    hs = [ed.edit(EditRequest(exs[0]))]
    v = adapter.run(exs[:1])
    assert bool((v.logits.argmax(-1) == v.target_ids)[v.mask].all())
    one = _logits(adapter, probes)
    hs += [ed.edit(EditRequest(ex)) for ex in exs[1:]]  # sequential: each trains on the edited model
    assert all(v == (1, 1, 0) for v in _hooks(adapter, ed.layers).values())
    # closed-form keys: neuron j takes target position j mod P, so an edit's 4 neurons pack as P
    assert neuron_bank(adapter, ed.layers[0]).num_neurons == sum(min(_n_targets(adapter, ex), 4) for ex in exs) < 12
    assert not torch.equal(_logits(adapter, probes), one)
    _save_remove_check(adapter, ed, hs, tmp_path, probes, before)


def test_first_layer_keys_one_scope_for_every_layer(records, tmp_path):
    """key_site="first": every edited layer's neurons read the first edited layer's FFN input, so an
    edit's keys are the same at every layer; banks of their own (both capture at the first layer),
    beside own-layer edits, and every removal order restores exactly."""
    adapter = tiny_llava()
    kw = dict(layers=2, n_neurons=4, steps=20, memory_size=4, key_init="whitened", image_gate=(0.3, 0.5))
    ed = UniKEIntrinsicEditor(adapter, UniKEIntrinsicEditor.Config(key_site="first", **kw), task=TASKS["vqa"],
                              train_records=records)
    own = UniKEIntrinsicEditor(adapter, UniKEIntrinsicEditor.Config(**kw), task=TASKS["vqa"], train_records=records)
    first, second = ed.layers
    exs = [Example("what color is the shape?", " green", _img(COLOURS["red"])),
           Example("what color is the shape?", " red", _img(COLOURS["blue"])),
           Example("is there a circle?", " yes", _img(COLOURS["green"]))]
    probes = exs + [Example("nq question: what is the capital of france?", " paris", None)]
    before = _logits(adapter, probes)
    hs = []
    for i, ex in enumerate(exs):
        hs.append(ed.edit(EditRequest(ex)))
        if i == 0:
            v = adapter.run([ex])
            assert bool((v.logits.argmax(-1) == v.target_ids)[v.mask].all())
        assert hs[-1].meta["key_site"] == "first"
        t = hs[-1].tensors  # the same keys, biases and centres at both layers: one scope
        for k in ("key", "bias", "center", "img_key"):
            assert torch.equal(t[f"patch.{first}.{k}"], t[f"patch.{second}.{k}"]), k
    # both banks capture the first layer's FFN input; nothing captures at the second
    assert {l: v[:2] for l, v in _hooks(adapter, ed.layers).items()} == {first: (2, 1), second: (0, 1)}
    assert neuron_bank(adapter, second, first).num_neurons == sum(min(_n_targets(adapter, ex), 4) for ex in exs)
    with_three = _logits(adapter, probes)
    h_own = own.edit(EditRequest(exs[0]))  # an own-layer edit: the first layer's bank, and its own above
    assert {l: v[:2] for l, v in _hooks(adapter, ed.layers).items()} == {first: (2, 1), second: (1, 2)}
    h_own.remove()
    assert torch.equal(_logits(adapter, probes), with_three)
    _save_remove_check(adapter, ed, hs, tmp_path, probes, before, hooks={first: (2, 1), second: (0, 1)})
    with pytest.raises(ValueError, match="keyed on layer"):  # a bank takes only patches keyed on its layer
        p = EditPatch(int(adapter.site(f"lm.ffn_key.{second}").in_features), 2)
        p.key_layer = first
        neuron_bank(adapter, second).add(object(), p)


def test_tpatcher_edits_share_one_bank_and_unwind_in_any_order(tmp_path):
    adapter = tiny_blip2()  # OPT: the FFN flattens tokens
    ed = TPatcherEditor(adapter, TPatcherConfig(steps=40, lr=5e-2))
    img = _img((0, 128, 128))
    exs = [Example("what color is the shape?", " red", img), Example("what shape is present?", " circle", img),
           Example("nq question: what is the capital of france?", " rome", None)]
    saved, hs = [], []
    for i, ex in enumerate(exs):
        hs.append(ed.edit(EditRequest(ex)))  # sequential: each trains on the edited model
        assert hs[-1].meta["neurons"] >= 1
        hs[-1].save(tmp_path / f"e{i}")
        saved.append(tmp_path / f"e{i}")
    assert _hooks(adapter, [ed.layer])[ed.layer][:2] == (1, 1)
    for h in hs:
        h.remove()
    _check_all_orders(adapter, ed, saved, [ed.layer], exs)


def _n_targets(adapter, ex) -> int:
    """The number of target tokens of ``ex`` (the positions an edit's closed-form keys come from)."""
    return int((adapter.prepare([ex]).labels != -100).sum())


def _edit_patch(H, n, seed, act, gated):
    g = torch.Generator().manual_seed(seed)
    p = EditPatch(H, n, seed=seed, act=act)
    with torch.no_grad():
        p.key.copy_(torch.randn(H, n, generator=g))
        p.bias.copy_(torch.randn(n, generator=g) * 0.5)
        p.value.copy_(torch.randn(n, H, generator=g))
        p.center.copy_(torch.randn(H, generator=g))
        p.scale.fill_(0.5 + seed)
        p.offset.copy_(torch.randn(H, generator=g) * 0.1)
        if gated:
            p.set_image_gate(torch.randn(H, generator=g), torch.randn(H, generator=g) * 0.1, -0.5, 0.5)
    return p.requires_grad_(False)


def test_bank_output_is_the_sum_of_the_separate_patches():
    adapter = tiny_llava()
    layer = adapter.num_lm_layers - 1
    H = int(adapter.site(f"lm.ffn_key.{layer}").in_features)
    plain = FFNPatch(H, 3, seed=7).requires_grad_(False)
    with torch.no_grad():
        plain.value.normal_()
    patches = [plain, _edit_patch(H, 4, 1, "ramp", True), _edit_patch(H, 2, 2, "relu2", False),
               _edit_patch(H, 5, 3, "relu", True)]
    banked = [BankedPatches(adapter, {layer: p}) for p in patches]
    bank = neuron_bank(adapter, layer)
    assert len(bank) == 4 and bank.num_neurons == 14
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 6, H, generator=g)
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[0, :2] = mask[1, 1:3] = True  # row 2: no image (gated neurons silent)
    want = sum(p(q, mask) for p in patches)
    got = bank(q, mask)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    # the gate each edit had separately is the bank's gate of that edit
    for b, p in zip(banked[1:], patches[1:]):
        gp = p.last_gate
        gb = bank.gate_of(b.owner)
        assert (gp is None) == (gb is None) and (gp is None or torch.allclose(gb, gp, atol=1e-5))
    # without any image mask: only the ungated neurons
    assert torch.allclose(bank(q, None), patches[0](q) + patches[2](q), atol=1e-4, rtol=1e-4)
    for b in banked[::-1]:
        b.remove()
    assert _no_hooks(adapter) and not adapter._neuron_banks


def test_neurons_sharing_a_key_pack_as_one():
    """An edit whose neurons repeat keys and biases (UniKE's closed-form keys, one per target
    position) packs each group as one neuron with the summed value: the same output, fewer neurons;
    neurons that differ only in value or bias stay apart."""
    adapter = tiny_llava()
    layer = adapter.num_lm_layers - 1
    H = int(adapter.site(f"lm.ffn_key.{layer}").in_features)
    dup, other = _edit_patch(H, 6, 1, "ramp", True), _edit_patch(H, 4, 2, "relu", False)
    with torch.no_grad():  # neurons 0, 2, 4 and 1, 3, 5 share key and bias: 2 distinct of 6
        dup.key.copy_(dup.key[:, [0, 1, 0, 1, 0, 1]])
        dup.bias.copy_(dup.bias[[0, 1, 0, 1, 0, 1]])
        other.key.copy_(other.key[:, [0, 0, 2, 3]])  # same key, other bias: stays apart
        other.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    banked = [BankedPatches(adapter, {layer: p}) for p in (dup, other)]
    bank = neuron_bank(adapter, layer)
    assert bank.num_neurons == 2 + 4
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 5, H, generator=g)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[:, :2] = True
    assert torch.allclose(bank(q, mask), dup(q, mask) + other(q, mask), atol=1e-4, rtol=1e-4)
    banked[1].remove()
    assert torch.equal(bank(q, mask), dup(q, mask))  # one edit left: its own patch, exactly
    banked[0].remove()
    assert _no_hooks(adapter) and not adapter._neuron_banks


def test_latent_bank_one_hook_and_the_single_edit_shift_exactly():
    adapter = tiny_llava()
    layer = adapter.num_lm_layers - 1
    H = int(adapter.site(f"lm.attn_out.{layer}").out_features)
    g = torch.Generator().manual_seed(0)
    center = torch.randn(H, generator=g) * 0.1
    base = torch.randn(6, H, generator=g)  # a shared memory: edits retrieve overlapping rows
    knows = [torch.cat([base[i:i + 3], torch.randn(1, H, generator=g)]) for i in range(3)]
    ex = Example("what color is the shape?", " red", _img((0, 128, 128)))
    before = _logits(adapter, [ex])
    box = {}
    rec = adapter.lm_layers()[layer].register_forward_hook(lambda _m, _a, out: box.__setitem__("h", out))
    shifts = [LatentShift(adapter, {layer: k}, {layer: center}, s=0.5, encoders=None, enc_index={layer: 0},
                          tau=0.1, site="layer") for k in knows[:1]]
    with torch.no_grad():
        adapter.run([ex])
    h_in = box["h"][0] if isinstance(box["h"], tuple) else box["h"]  # the layer's output before the bank
    rec.remove()
    # one edit: exactly shift() of its knowledge
    out = {}
    tap = adapter.lm_layers()[layer].register_forward_hook(lambda _m, _a, o: out.__setitem__("h", o), prepend=False)
    with torch.no_grad():
        adapter.run([ex])
    tap.remove()
    got = out["h"][0] if isinstance(out["h"], tuple) else out["h"]
    assert torch.equal(got, shift(h_in, knows[0], center, 0.1, 0.5)[0])
    shifts += [LatentShift(adapter, {layer: k}, {layer: center}, s=0.5, encoders=None, enc_index={layer: 0},
                           tau=0.1, site="layer") for k in knows[1:]]
    assert len(adapter.lm_layers()[layer]._forward_hooks) == 1
    bank = next(iter(adapter._latent_banks.values()))
    assert len(bank._pool) == 5 + 3  # rows shared between edits are stored once
    # every position takes exactly one edit's shift (all fixed s = 0.5 and ungated here)
    new, s = bank.packed_shift(h_in)
    assert bool((s == 0.5).all())
    alone = torch.stack([shift(h_in, k, center, 0.1, 0.5)[0] for k in knows])  # [3, B, T, H]
    match = (alone - new[None]).abs().amax(-1) < 1e-5  # [3, B, T]
    assert bool(match.any(0).all())
    for order in itertools.permutations(range(3)):
        hs = [LatentShift(adapter, {layer: k}, {layer: center}, s=0.5, encoders=None, enc_index={layer: 0},
                          tau=0.1, site="layer") for k in knows] if order != (0, 1, 2) else shifts
        for i in order:
            hs[i].remove()
            live = getattr(adapter, "_latent_banks", {}).get(bank.key)
            if live is not None:  # the pool is the one the remaining edits would build on their own
                want = list(dict.fromkeys(r.numpy().tobytes() for e in live.entries.values() for r in e["know"]))
                assert [r.numpy().tobytes() for r in live._pool] == want
                assert live._rows == {b: j for j, b in enumerate(want)}
        assert _no_hooks(adapter) and torch.equal(_logits(adapter, [ex]), before)


def _strength(p, q, mask):
    """[B, T]: how strongly patch p fires at each position (its strongest neuron times its gate)."""
    s = p.act(p.pre(q)).amax(-1)
    return s * p.image_gate(q, mask)[:, None] if bool(p.gated) else s


def test_competing_edits_strongest_alone_ties_to_the_latest_and_a_contender_wins_ties():
    """compete=True: at each position only the edit firing most strongly adds its neurons (ties:
    the latest); a contender (a patch training beside the bank) silences the bank's edits wherever
    it fires at least as strongly; competing and plain edits do not share a bank."""
    adapter = tiny_llava()
    layer = adapter.num_lm_layers - 1
    H = int(adapter.site(f"lm.ffn_key.{layer}").in_features)
    patches = [_edit_patch(H, 3, s, "ramp", True) for s in (1, 2, 3)]
    twin = _edit_patch(H, 3, 4, "ramp", True)  # patch 0's keys, biases, centring and gate; other values
    with torch.no_grad():
        for k in ("key", "bias", "center", "scale", "img_key", "img_center", "img_ramp"):
            getattr(twin, k).copy_(getattr(patches[0], k))
    patches.append(twin)
    for p in patches:
        p.compete = True
    banked = [BankedPatches(adapter, {layer: p}) for p in patches]
    bank = neuron_bank(adapter, layer)
    assert bank.compete
    g = torch.Generator().manual_seed(5)
    q = torch.randn(3, 6, H, generator=g) * 3
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[0, :2] = mask[1, 1:3] = mask[2, 4:] = True

    def expected(contender=None):
        s = torch.stack([_strength(p, q, mask) for p in patches])  # [E, B, T]
        best = s.max(0).values
        win = len(patches) - 1 - s.flip(0).argmax(0)  # the latest of the strongest
        keep = [(win == e) & (best > 0) for e in range(len(patches))]
        if contender is not None:
            keep = [k & (best > _strength(contender, q, mask)) for k in keep]
        return sum(k[..., None] * p(q, mask) for k, p in zip(keep, patches))

    want = expected()
    assert not torch.allclose(want, sum(p(q, mask) for p in patches), atol=1e-3)  # competition changed it
    assert torch.allclose(bank(q, mask), want, atol=1e-4, rtol=1e-4)
    # where patch 0 and its twin fire strongest, the twin (the later) alone adds
    s0 = _strength(patches[0], q, mask)
    tied = (s0 > 0) & (s0 >= torch.stack([_strength(p, q, mask) for p in patches]).max(0).values)
    assert bool(tied.any())
    assert torch.allclose(bank(q, mask)[tied], twin(q, mask)[tied], atol=1e-4, rtol=1e-4)
    contender = _edit_patch(H, 3, 6, "ramp", True)
    contender.compete = True
    bank.contender = contender
    got = bank(q, mask)
    bank.contender = None
    assert torch.allclose(got, expected(contender), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, want, atol=1e-3)
    plain = _edit_patch(H, 3, 7, "ramp", True)
    with pytest.raises(ValueError, match="compete"):
        BankedPatches(adapter, {layer: plain})
    for b in banked[1:]:
        b.remove()
    # one edit left: its own patch, unless a contender trains beside it
    assert torch.equal(bank(q, mask), patches[0](q, mask))
    bank.contender = contender
    s0, sc = _strength(patches[0], q, mask), _strength(contender, q, mask)
    assert torch.allclose(bank(q, mask), ((s0 > sc) & (s0 > 0))[..., None] * patches[0](q, mask), atol=1e-4, rtol=1e-4)
    bank.contender = None
    banked[0].remove()
    assert _no_hooks(adapter) and not adapter._neuron_banks


@pytest.mark.parametrize("family", [tiny_llava, tiny_blip2])  # BLIP-2's OPT hands its FFN [B*T, H]
def test_competing_unike_edits_the_latest_wins_its_own_input_and_trains_as_if_alone(records, tmp_path, family):
    """unike with compete=True: a second edit of the same input (another target) starts from
    nearly the NLL the unedited model gives (the first edit yields to it wherever it fires as
    strongly: at the prompt's positions; the answer positions differ with the target), far nearer
    than without competition; it answers its own target once installed, and every removal order
    restores exactly."""
    adapter = family()
    kw = dict(layers=2, n_neurons=4, steps=20, memory_size=4, key_init="whitened", image_gate=(0.3, 0.5),
              key_site="first")
    ed = UniKEIntrinsicEditor(adapter, UniKEIntrinsicEditor.Config(compete=True, **kw), task=TASKS["vqa"],
                              train_records=records)
    img = _img(COLOURS["red"])
    exs = [Example("what color is the shape?", " green", img), Example("what color is the shape?", " blue", img),
           Example("is there a circle?", " yes", _img(COLOURS["green"]))]
    probes = exs + [Example("nq question: what is the capital of france?", " paris", None)]
    before = _logits(adapter, probes)
    alone = ed.edit(EditRequest(exs[1]))
    nll_alone = alone.meta["start_nll"]
    alone.remove()
    plain = UniKEIntrinsicEditor(adapter, UniKEIntrinsicEditor.Config(**kw), task=TASKS["vqa"], train_records=records)
    hs = [plain.edit(EditRequest(ex)) for ex in exs[:2]]
    nll_plain = hs[1].meta["start_nll"]
    for h in hs[::-1]:
        h.remove()
    assert torch.equal(_logits(adapter, probes), before)
    hs = [ed.edit(EditRequest(exs[0]))]
    hs.append(ed.edit(EditRequest(exs[1])))
    assert hs[1].meta["compete"] is True
    assert abs(hs[1].meta["start_nll"] - nll_alone) < abs(nll_plain - nll_alone) / 4
    v = adapter.run(exs[1:2])
    assert bool((v.logits.argmax(-1) == v.target_ids)[v.mask].all())  # the latest wins
    hs.append(ed.edit(EditRequest(exs[2])))
    assert all(b.contender is None for b in adapter._neuron_banks.values())
    with pytest.raises(ValueError, match="compete ranks the edits' image-gated neurons"):
        UniKEIntrinsicEditor.Config(compete=True)  # no image gate: nothing would compete
    _save_remove_check(adapter, ed, hs, tmp_path, probes, before,
                       hooks={ed.layers[0]: (2, 1), ed.layers[1]: (0, 1)})
