"""UniKE on tiny random models and toy tensors: each component, the edit contract, and training."""

import math

import pytest
import torch

from mmke.editors.base import EditRequest
from mmke.editors.trained import save_weights
from mmke.editors.unike import UniKEConfig, UniKEEditor, UniKEIntrinsicEditor
from mmke.editors.unike.intrinsic import EditPatch, LocalityMemory, ffn_inputs_at_targets
from mmke.editors.unike.encoders import UniKEEncoders, semantic_loss, supcon_loss
from mmke.editors.unike.memory import LatentMemory, shift
from mmke.editors.tail import TailRunner
from mmke.models.base import Example, target_nll
from mmke.models.tiny import tiny_blip2, tiny_llava
from mmke.tasks import TASKS
from tests.toydata import colour_image, colour_records

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = dict(layers=2, n_neurons=4, steps=40, lr=0.05, memory_size=4)


_img = colour_image


def _logits(adapter, exs):
    with torch.no_grad():
        return adapter.run(exs).logits


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """Twelve toy MMEdit records with real image files (train split of a fake task)."""
    return colour_records(tmp_path_factory.mktemp("imgs"), 12)


@pytest.mark.parametrize("build", [tiny_llava, tiny_blip2])
def test_tail_runner_matches_the_full_forward(build):
    adapter = build()
    ex = Example("what color is the shape?", " red", _img((0, 128, 128)))
    runner = TailRunner(adapter, -2)
    cache, full = runner.capture([ex])
    assert runner.enabled and cache.hidden is not None
    assert torch.allclose(runner.run(cache).logits, full.logits, atol=1e-5)


@pytest.mark.parametrize("key_init", ["trained", "whitened"])
def test_intrinsic_neurons_fire_on_the_edit_and_restore_exactly(records, key_init):
    adapter = tiny_llava()
    ex = Example("what color is the shape?", " red", _img((0, 128, 128)))
    other = Example("nq question: what is the capital of france?", " paris", None)
    before = _logits(adapter, [ex, other])
    nll0 = target_nll(adapter.run([ex])).item()
    cfg = UniKEIntrinsicEditor.Config(**FAST, key_init=key_init)
    ed = UniKEIntrinsicEditor(adapter, cfg, task=TASKS["vqa"], train_records=records)
    assert ed.memory is None  # the intrinsic variant needs no trained weights
    h = ed.edit(EditRequest(ex))
    assert h.meta["key_init"] == key_init and h.meta["act"] == ("ramp" if key_init == "whitened" else "relu")
    with torch.no_grad():
        v = adapter.run([ex])
    assert target_nll(v).item() < nll0 - 1.0
    assert bool((v.logits.argmax(-1) == v.target_ids)[v.mask].all())
    assert len(ed.layers) == 2 and all(f"patch.{l}.key" in h.tensors for l in ed.layers)
    h.remove()
    assert torch.equal(_logits(adapter, [ex, other]), before)
    if key_init == "whitened":
        # closed-form keys: the edit's own FFN input (unedited model) sits at similarity 1, i.e. at
        # pre-activation (1 - lo) / (hi - lo), past the ramp's top: every neuron fires fully
        q = ffn_inputs_at_targets(adapter, ed.layers, [ex]).q
        for layer in ed.layers:
            patch = EditPatch.from_state({k.split(".", 2)[2]: t for k, t in h.tensors.items()
                                          if k.startswith(f"patch.{layer}.")}, h.meta["act"])
            z = patch.pre(q[layer])  # [P target positions, n neurons]; neuron j is keyed to position j mod P
            own = z[torch.arange(z.shape[1]) % z.shape[0], torch.arange(z.shape[1])]
            assert torch.allclose(own, torch.full_like(own, (1 - cfg.gate_lo) / (cfg.gate_hi - cfg.gate_lo)), atol=1e-3)
            assert bool((patch(q[layer][None]) != 0).any())


def test_without_train_records_keys_fall_back_to_training():
    adapter = tiny_llava()
    ex = Example("what color is the shape?", " red", _img((0, 128, 128)))
    ed = UniKEIntrinsicEditor(adapter, UniKEIntrinsicEditor.Config(**FAST), task=TASKS["vqa"], train_records=None)
    h = ed.edit(EditRequest(ex))  # no locality memory to whiten with: keys trained from the edit
    assert h.meta["key_init"] == "trained" and h.meta["act"] == "relu"
    v = adapter.run([ex])
    assert bool((v.logits.argmax(-1) == v.target_ids)[v.mask].all())
    h.remove()


def test_whitener_is_the_ridge_inverse_of_the_target_and_every_position_scatter():
    g = torch.Generator().manual_seed(0)
    H = 8
    rows = torch.randn(30, H, generator=g)  # FFN inputs at target positions
    every = 3.0 * torch.randn(100, H, generator=g) + 1.0  # ... at every position
    ev = every.double()
    mem = LocalityMemory({5: rows}, [("p", "t")] * 30, torch.zeros(30), torch.zeros(30),
                         {5: (len(every), ev.sum(0), ev.T @ ev)})
    mu = rows.double().mean(0)
    x = torch.cat([rows.double(), ev]) - mu
    c = x.T @ x / (len(x) - 1)
    want = torch.linalg.inv(c + 0.1 * c.diagonal().mean() * torch.eye(H, dtype=c.dtype))
    assert torch.allclose(mem.whitener(5, 0.1).double(), want, atol=1e-5)
    # without the every-position moments: the target rows' own covariance
    plain = LocalityMemory({5: rows}, [("p", "t")] * 30, torch.zeros(30), torch.zeros(30))
    c0 = torch.cov(rows.double().T)
    assert torch.allclose(plain.whitener(5, 0.1).double(),
                          torch.linalg.inv(c0 + 0.1 * c0.diagonal().mean() * torch.eye(H, dtype=c0.dtype)), atol=1e-5)


def test_retrieval_returns_the_nearest_stored_states():
    g = torch.Generator().manual_seed(0)
    L, N, H = 2, 50, 16
    sem = torch.randn(L, N, H, generator=g)
    mem = LatentMemory([3, 4], sem, torch.randn(L, N, H, generator=g), torch.randn(L, N, H, generator=g))
    for j, layer in enumerate(mem.layers):
        q = mem.sem[j, 17].float() + 0.01 * torch.randn(H, generator=g)
        got = mem.retrieve(layer, q, 5)
        assert got[0] == 17
        centred = torch.nn.functional.normalize(mem.sem[j].float() - mem.mean[j], dim=-1)
        sims = centred @ torch.nn.functional.normalize(q - mem.mean[j], dim=0)
        assert got == sims.topk(5).indices.tolist()


def test_dynamic_s_is_in_unit_interval_and_shrinks_for_unrelated_inputs():
    g = torch.Generator().manual_seed(0)
    H = 16
    P = torch.randn(6, H, generator=g)  # retrieved knowledge states
    related = P[2] + 0.1 * torch.randn(H, generator=g)
    r = torch.randn(H, generator=g)
    unrelated = r - P.t() @ torch.linalg.solve(P @ P.t(), P @ r)  # orthogonal to every stored state
    h = torch.stack([related, unrelated])[None]  # [1, 2, H]
    # semantic encoder = identity: s = cos(h_know, h)
    new, s = shift(h, P, torch.zeros(H), tau=0.1, s=None, semantic=lambda x: x)
    assert s.shape == (1, 2) and bool(((s >= 0) & (s <= 1)).all())
    assert s[0, 0] > 0.9 and s[0, 1] < 1e-4
    assert torch.allclose(new[0, 1], h[0, 1], atol=1e-4)  # s ~ 0: left alone
    fixed, s_fixed = shift(h, P, torch.zeros(H), tau=0.1, s=0.5)
    assert bool((s_fixed == 0.5).all()) and not torch.allclose(fixed, h)


def test_contrastive_losses_decrease_on_separable_toy_data():
    g = torch.Generator().manual_seed(0)
    H, B = 24, 32
    truth_dir = torch.randn(H, generator=g) * 3
    hs = torch.randn(B, H, generator=g) * 2  # one state per question
    hp = hs + truth_dir + 0.3 * torch.randn(B, H, generator=g)  # correct-answer states
    hn = hs - truth_dir + 0.3 * torch.randn(B, H, generator=g)  # wrong-answer states
    torch.manual_seed(0)
    enc = UniKEEncoders(H, 1, enc_hidden=32, tru_dim=8)
    opt = torch.optim.Adam(enc.parameters(), lr=3e-3)
    labels = torch.cat([torch.ones(B), torch.zeros(B)])

    def losses():
        tru = supcon_loss(torch.cat([enc.truth(0, hp), enc.truth(0, hn)]), labels)
        sem = semantic_loss(enc.centred(0, hs), enc.semantic(0, hp), enc.semantic(0, hn))
        return tru, sem

    tru0, sem0 = (float(x.detach()) for x in losses())
    for _ in range(200):
        tru, sem = losses()
        opt.zero_grad()
        (tru + sem).backward()
        opt.step()
    tru1, sem1 = (float(x.detach()) for x in losses())
    # supervised InfoNCE cannot go below log(B - 1) (every positive equally likely): most of the gap closes
    floor = math.log(B - 1)
    assert tru1 - floor < 0.2 * (tru0 - floor)
    assert sem1 < 0.5 * sem0


@pytest.fixture(scope="module")
def trained_dir(records, tmp_path_factory):
    """A UniKE weights directory for tiny LLaVA, trained by the real recipe on the toy records."""
    from mmke.train.editors import EditorTrainConfig

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the encoders' initialisation: a deterministic fixture
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMKE_CACHE", str(tmp_path_factory.mktemp("cache")))  # the triplet cache goes there
        adapter = tiny_llava()
        cfg = UniKEConfig(**FAST, k=4, memory_entries=8, enc_steps=20, enc_batch=8)
        ed = UniKEEditor(adapter, cfg, task=TASKS["vqa"], train_records=records, untrained=True,
                         model_name="tiny-llava")
        out = tmp_path_factory.mktemp("unike-weights")
        try:
            meta = ed.fit(records, out, EditorTrainConfig(val_size=1, seed=0), command="test")
        finally:
            torch.set_num_threads(threads)
    assert (out / "memory.safetensors").exists() and (out / "CARD.md").exists()
    assert meta["encoders"]["after"]["tru_acc"] >= 0.0 and set(meta["validation"]) >= {"reliability"}
    return out


def _full(adapter, records, d, **kw):
    cfg = UniKEConfig(**{**FAST, "k": 4, "memory_entries": 8, "weights": str(d), **kw})
    return UniKEEditor(adapter, cfg, task=TASKS["vqa"], train_records=records, model_name="tiny-llava")


def test_saved_unike_edit_reloads_to_identical_outputs(records, trained_dir, tmp_path):
    adapter = tiny_llava()
    ed = _full(adapter, records, trained_dir)
    ex = Example("what color is the shape?", " blue", _img((200, 10, 10)))
    other = Example("nq question: what is the capital of france?", " paris", None)
    before = _logits(adapter, [ex, other])
    h = ed.edit(EditRequest(ex))
    edited = _logits(adapter, [ex, other])
    v = adapter.run([ex])
    assert bool((v.logits.argmax(-1) == v.target_ids)[v.mask].all())
    assert {f"latent.{l}.indices" for l in ed.layers} <= set(h.tensors) and h.meta["s"] == "dynamic"
    h.save(tmp_path / "e")
    h.remove()
    assert torch.equal(_logits(adapter, [ex, other]), before)
    h2 = _full(adapter, records, trained_dir).load(tmp_path / "e")
    assert torch.equal(_logits(adapter, [ex, other]), edited)
    h2.remove()
    assert torch.equal(_logits(adapter, [ex, other]), before)


@pytest.mark.parametrize("zeta", ["truthfulness", "semantic", "random", "none"])
def test_zeta_options_and_fixed_s(records, trained_dir, zeta):
    adapter = tiny_llava()
    ed = _full(adapter, records, trained_dir, zeta=zeta, s=0.3, steps=3)
    h = ed.edit(EditRequest(Example("what color is the shape?", " blue", _img((200, 10, 10)))))
    offsets = [h.tensors[f"patch.{l}.offset"] for l in ed.layers]
    assert all(bool((o == 0).all()) for o in offsets) == (zeta == "none")
    h.remove()


def test_sequential_edits_accumulate_and_unwind(records, trained_dir):
    adapter = tiny_llava()
    ed = _full(adapter, records, trained_dir)
    a = Example("what color is the shape?", " blue", _img((200, 10, 10)))
    b = Example("is there a circle?", " yes", _img((10, 200, 10)))
    before = _logits(adapter, [a, b])
    h1 = ed.edit(EditRequest(a))
    after_first = _logits(adapter, [a, b])
    h2 = ed.edit(EditRequest(b))
    v = adapter.run([a, b])
    assert bool((v.logits.argmax(-1) == v.target_ids)[v.mask].all())  # both edits hold
    h2.remove()
    assert torch.equal(_logits(adapter, [a, b]), after_first)
    h1.remove()
    assert torch.equal(_logits(adapter, [a, b]), before)


def test_variants_need_weights_only_where_they_use_them(records, tmp_path):
    adapter = tiny_llava()
    with pytest.raises(FileNotFoundError, match="unike"):
        UniKEEditor(adapter, UniKEConfig(**FAST, weights=str(tmp_path)), task=TASKS["vqa"], train_records=records)
    # weights without a memory: a clear error too
    ed = UniKEEditor(adapter, UniKEConfig(**FAST), task=TASKS["vqa"], train_records=records, untrained=True)
    save_weights(tmp_path, ed.module, {"method": "unike"})
    with pytest.raises(FileNotFoundError, match="memory"):
        UniKEEditor(adapter, UniKEConfig(**FAST, weights=str(tmp_path)), task=TASKS["vqa"], train_records=records)
    with pytest.raises(ValueError, match="s must be"):
        UniKEConfig(s=1.5)


def test_intrinsic_ike_variant_edits_with_a_prompt_and_restores(records, tmp_path):
    from mmke.editors.unike import UniKEIntrinsicIKEEditor

    adapter = tiny_llava()
    ex = Example("what color is the shape?", " blue", _img((200, 10, 10)))
    before = _logits(adapter, [ex])
    ed = UniKEIntrinsicIKEEditor(adapter, UniKEIntrinsicIKEEditor.Config(**FAST, ike_k=2), task=TASKS["vqa"],
                                 train_records=records)
    rec = {"src": "what color is the shape?", "alt": "blue"}
    h = ed.edit(EditRequest(ex, rec))
    assert len(adapter.input_transforms) == 1 and h.ike_handle is not None
    v = adapter.run([ex])
    assert bool((v.logits.argmax(-1) == v.target_ids)[v.mask].all())
    edited = _logits(adapter, [ex])
    h.save(tmp_path / "e")
    h.remove()
    assert not adapter.input_transforms and torch.equal(_logits(adapter, [ex]), before)
    h2 = ed.load(tmp_path / "e")
    assert torch.equal(_logits(adapter, [ex]), edited)
    h2.remove()


def test_unike_is_the_papers_method_and_unike_plus_the_named_variant(records, trained_dir):
    from mmke.editors.unike import UniKEPlusEditor
    from mmke.editors.unike.memory import LatentShift

    paper, plus = UniKEConfig(), UniKEPlusEditor.Config()
    assert (paper.site, paper.key_init, paper.s_calibrated, paper.layers, paper.n_neurons, paper.k) == \
        ("attn", "trained", False, 4, 10, 40)
    assert (plus.site, plus.key_init, plus.s_calibrated) == ("layer", "whitened", True)
    assert UniKEPlusEditor.weights_name == "unike-plus" != UniKEEditor.weights_name
    adapter = tiny_llava()
    ed = _full(adapter, records, trained_dir)
    h = ed.edit(EditRequest(Example("what color is the shape?", " blue", _img((200, 10, 10)))))
    for l in ed.layers:  # latent IKE shifts the self-attention output, not the layer output
        assert adapter.site(f"lm.attn_out.{l}")._forward_hooks and not adapter.lm_layers()[l]._forward_hooks
    h.remove()
    # the memory was built at the attention output: unike-plus (layer output) refuses it clearly
    with pytest.raises(ValueError, match="site 'attn'"):
        UniKEPlusEditor(adapter, UniKEPlusEditor.Config(**FAST, k=4, memory_entries=8, weights=str(trained_dir)),
                        task=TASKS["vqa"], train_records=records, model_name="tiny-llava")
    # the paper's s ignores the calibrated floor the encoders carry; unike-plus applies it
    enc = ed.module
    enc.s_floor.fill_(0.5)
    ex = Example("what color is the shape?", " blue", _img((200, 10, 10)))
    got = {}
    for calibrated in (False, True):
        l = ed.layers[-1]
        sh = LatentShift(adapter, {l: ed.memory.pos[-1, :4].float()}, {l: ed.memory.mean[-1]}, s=None, encoders=enc,
                         enc_index={l: len(ed.layers) - 1}, tau=0.1, site="attn", calibrated=calibrated)
        with torch.no_grad():
            adapter.run([ex])
        got[calibrated] = sh.last_s[l]
        sh.remove()
    enc.s_floor.zero_()
    raw = got[False]
    assert torch.allclose(got[True], ((raw - 0.5) / 0.5).clamp(0, 1), atol=1e-6)


def test_image_gate_keeps_neurons_silent_on_other_images_and_text(records):
    """unike-plus's gate: the edit's own image passes, another image and a text-only input do not."""
    adapter = tiny_llava()
    red, blue = _img((220, 20, 20)), _img((20, 20, 220))
    ex = Example("what color is the shape?", " green", red)
    other_img = Example("what color is the shape?", " green", blue)
    text = Example("what color is the shape?", " green", None)
    before = _logits(adapter, [other_img, text])
    cfg = UniKEIntrinsicEditor.Config(**FAST, key_init="whitened", image_gate=(0.3, 0.5))
    ed = UniKEIntrinsicEditor(adapter, cfg, task=TASKS["vqa"], train_records=records)
    h = ed.edit(EditRequest(ex))
    assert h.meta["image_gate"] and all(float(h.tensors[f"patch.{l}.gated"]) == 1.0 for l in ed.layers)
    v = adapter.run([ex])
    assert bool((v.logits.argmax(-1) == v.target_ids)[v.mask].all())  # the edit holds on its image
    # tiny random models: images that differ a lot get distant signatures; the neurons stay silent
    patch = ed.layers[-1]
    sig_cos = float(h.tensors[f"patch.{patch}.img_key"].norm())
    assert abs(sig_cos - 1.0) < 1e-4
    after = _logits(adapter, [other_img, text])
    assert torch.equal(after[1], before[1])  # text-only: gate 0, bit for bit unchanged
    h.remove()
