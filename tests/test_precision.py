"""Placement and precision: --dtype, --device, --device-map (accelerate) through every loader, and
editors that do their update math in fp32 and restore low-precision weights bit for bit.

No GPU here: device maps are exercised over the CPU (an explicit map installs accelerate's
device-alignment hooks even when every entry is the CPU, so the same code runs as on a split model);
bf16 runs on the CPU. The default-model tests are marked slow.
"""

import json

import pytest
import torch
from typer.testing import CliRunner

from mmke.cli import app
from mmke.data.schema import load_records
from mmke.editors.base import WeightLedger
from mmke.editors.ft import FTConfig, FTEditor
from mmke.editors.grace import GraceConfig, GraceEditor
from mmke.editors.mend import MENDConfig, MENDEditor
from mmke.editors.tpatcher import TPatcherConfig, TPatcherEditor
from mmke.eval.runner import Run, RunConfig, check_same_run
from mmke.models.base import state_digest, target_nll
from mmke.models.placement import (Placement, module_device, normalise_device_map, parse_dtype,
                                   placement_record, read_device_map)
from mmke.registry import load_model
from mmke.scoring import INPUT_KINDS
from mmke.tasks import TASKS
from mmke.train.editors import make_cases
from tests.toydata import write_toy_mmedit

VQA = TASKS["vqa"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return load_records(write_toy_mmedit(tmp_path_factory.mktemp("toy"))).records


def _case(adapter, toy, i=0):
    return make_cases(toy[i:i + 1], VQA, adapter)[0]


def _nll(adapter, ex) -> float:
    with torch.no_grad():
        return float(target_nll(adapter.run([ex])))


def _edit_lands_and_restores(adapter, editor, case) -> dict:
    """Edit once: the edit's NLL falls, the weights change, and remove() restores them bit for bit
    (outputs identical)."""
    exs = [case.inputs[k] for k in INPUT_KINDS]
    digest = state_digest(adapter.model)
    with torch.no_grad():
        before = adapter.run(exs).logits
    nll0 = _nll(adapter, case.request.example)
    h = editor.edit(case.request)
    nll1 = _nll(adapter, case.request.example)
    h.remove()
    WeightLedger.of(adapter).restore_all()
    assert state_digest(adapter.model) == digest
    with torch.no_grad():
        assert torch.equal(adapter.run(exs).logits, before)
    assert nll1 < nll0, f"{editor.name}: edit NLL {nll0:.3f} -> {nll1:.3f}"
    return h.meta


# ---- options -----------------------------------------------------------------------------------
def test_dtype_names():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("bfloat16") is torch.bfloat16
    assert parse_dtype(None) is torch.float32
    with pytest.raises(ValueError, match="fp8"):
        parse_dtype("fp8")


def test_device_and_device_map_are_mutually_exclusive():
    with pytest.raises(ValueError, match="mutually exclusive"):
        Placement(device="cpu", device_map="auto")
    with pytest.raises(ValueError, match="mutually exclusive"):
        RunConfig(model="tiny-llava", method="null", device="cpu", device_map="auto")


def test_unavailable_device_is_named():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="'cuda:1'.*CUDA is not available"):
        Placement(device="cuda:1")


def test_bad_device_map_file_names_the_file_and_entry(tmp_path):
    bad_json = tmp_path / "broken.json"
    bad_json.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json.*not valid JSON"):
        read_device_map(bad_json)
    bad_dev = tmp_path / "bad_device.json"
    bad_dev.write_text(json.dumps({"model.vision_tower": "cpu", "model.language_model": "tpu9"}))
    with pytest.raises(ValueError, match=r"bad_device\.json: entry 'model\.language_model'.*tpu9"):
        read_device_map(bad_dev)
    with pytest.raises(ValueError, match="entry 'x'.*offload"):
        normalise_device_map({"x": "disk"}, "m.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        read_device_map(tmp_path / "missing.json")
    # names that are no module of the model, and modules no entry places, fail at load
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"model.vision_tower": "cpu", "model.language_modle": "cpu", "lm_head": "cpu",
                                   "model.multi_modal_projector": "cpu"}))
    with pytest.raises(ValueError, match=r"unknown\.json: entry 'model\.language_modle' names no module"):
        load_model("tiny-llava", device_map=str(unknown))
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"model.vision_tower": "cpu", "lm_head": "cpu"}))
    with pytest.raises(ValueError, match=r"partial\.json: no entry places 'model\.multi_modal_projector"):
        load_model("tiny-llava", device_map=str(partial))


def test_cli_rejects_device_with_device_map_and_a_bad_map(tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["run", "--method", "null", "--model", "tiny-llava", "--out", str(tmp_path / "r"),
                            "--device", "cpu", "--device-map", "auto"])
    assert r.exit_code == 2 and "mutually exclusive" in r.output
    bad = tmp_path / "map.json"
    bad.write_text(json.dumps({"": 3.5}))
    r = runner.invoke(app, ["run", "--method", "null", "--model", "tiny-llava", "--out", str(tmp_path / "r"),
                            "--device-map", str(bad)])
    assert r.exit_code == 2 and "map.json" in r.output and "3.5" in r.output
    r = runner.invoke(app, ["train", "--method", "mend", "--model", "tiny-llava", "--device", "cpu",
                            "--device-map", "auto"])
    assert r.exit_code == 2 and "mutually exclusive" in r.output
    assert not (tmp_path / "r").exists()


# ---- device maps over the CPU ------------------------------------------------------------------
def _full_map(adapter) -> dict:
    """Every top-level part of the model (modules and loose parameters such as BLIP-2's query
    tokens) on the CPU, one entry each (a real map's shape)."""
    m = adapter.model
    return {n: "cpu" for n in [n for n, _ in m.named_children()] + [n for n, _ in m.named_parameters(recurse=False)]}


@pytest.mark.parametrize("family", ["tiny-llava", "tiny-blip2"])
def test_explicit_device_map_dispatches_with_hooks_and_edits(family, toy):
    plain = load_model(family)
    dm = {**_full_map(plain)}
    adapter = load_model(family, device_map=dm)
    assert adapter.model.hf_device_map == dm
    assert any(hasattr(m, "_hf_hook") for m in adapter.model.modules())  # accelerate's hooks are in
    case = _case(adapter, toy)
    with torch.no_grad():  # placement changes where, not what
        assert torch.equal(adapter.run([case.request.example]).logits, plain.run([case.request.example]).logits)
    _edit_lands_and_restores(adapter, FTEditor(adapter, FTConfig(steps=5, lr=1e-2)), case)
    _edit_lands_and_restores(adapter, MENDEditor(adapter, MENDConfig(rank=8, edit_lr=1.0), task=VQA, untrained=True),
                             case)
    _edit_lands_and_restores(adapter, TPatcherEditor(adapter, TPatcherConfig(steps=20)), case)
    rec = placement_record(adapter.model)
    assert rec["devices"] == ["cpu"] and rec["device_map"] == dm


def test_auto_device_map_on_cpu_edits(toy):
    adapter = load_model("tiny-llava", device_map="auto")
    assert set(adapter.model.hf_device_map.values()) == {"cpu"}
    _edit_lands_and_restores(adapter, FTEditor(adapter, FTConfig(steps=5, lr=1e-2)), _case(adapter, toy))


def test_hf_checkpoint_loads_in_dtype_and_with_a_device_map(tmp_path, toy):
    from mmke.models.tiny import tiny_llava, tiny_processor

    a = tiny_llava()
    a.model.save_pretrained(tmp_path / "ckpt")
    tiny_processor(a).save_pretrained(tmp_path / "ckpt")
    b = load_model(f"hf:{tmp_path / 'ckpt'}", dtype="bf16")
    assert {p.dtype for p in b.model.parameters()} == {torch.bfloat16}
    c = load_model(f"hf:{tmp_path / 'ckpt'}", device_map=_full_map(a))
    assert {p.dtype for p in c.model.parameters()} == {torch.float32}  # fp32 unless asked
    case = _case(c, toy)
    with torch.no_grad():
        assert torch.equal(c.run([case.request.example]).logits, a.run([case.request.example]).logits)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model.vision_tower": "cpu", "lm_head": "cpu", "model.nothing": "cpu"}))
    with pytest.raises(ValueError, match=r"bad\.json: entry 'model\.nothing' names no module"):
        load_model(f"hf:{tmp_path / 'ckpt'}", device_map=str(bad))


# ---- bf16 on the CPU, tiny families ------------------------------------------------------------
@pytest.mark.parametrize("family", ["tiny-llava", "tiny-blip2"])
def test_bf16_edits_land_and_restore_bit_for_bit(family, toy):
    adapter = load_model(family, dtype="bf16")
    assert {p.dtype for p in adapter.model.parameters()} == {torch.bfloat16}
    case = _case(adapter, toy)
    _edit_lands_and_restores(adapter, FTEditor(adapter, FTConfig(steps=5, lr=1e-2)), case)
    _edit_lands_and_restores(adapter, MENDEditor(adapter, MENDConfig(rank=8, edit_lr=1.0), task=VQA, untrained=True),
                             case)
    _edit_lands_and_restores(adapter, TPatcherEditor(adapter, TPatcherConfig(steps=20)), case)
    _edit_lands_and_restores(adapter, GraceEditor(adapter, GraceConfig(n_iter=20)), case)


def test_small_updates_accumulate_through_the_fp32_master(toy):
    """Deltas far below bf16's resolution vanish when added to bf16 weights one by one; through the
    ledger's fp32 master they accumulate, and removing every edit restores the weights exactly."""
    adapter = load_model("tiny-llava", dtype="bf16")
    name, p = next((k, v) for k, v in adapter.model.named_parameters() if v.dim() == 2)
    ledger = WeightLedger.of(adapter)
    original = p.detach().clone()
    tiny = torch.full(p.shape, 1e-3) * p.detach().float().abs().clamp(min=1e-2)  # ~1/1000 of each weight
    naive = p.detach().clone()
    for _ in range(20):
        naive += tiny.to(naive.dtype)  # the old way: rounded away at every step
    from mmke.editors.base import EditHandle

    handles = []
    for _ in range(20):
        befores = ledger.add_deltas({name: p}, {name: tiny})
        handles.append(EditHandle(adapter, "probe", params=befores))
    exact = original.float() + 20 * tiny
    err_master = (p.detach().float() - exact).abs().mean()
    err_naive = (naive.float() - exact).abs().mean()
    assert err_master < 0.2 * err_naive
    for h in handles[::2] + handles[1::2]:  # any order
        h.remove()
    assert torch.equal(p.detach(), original)


def test_ft_keeps_fp32_masters_for_adam(toy):
    adapter = load_model("tiny-llava", dtype="bf16")
    ed = FTEditor(adapter, FTConfig(steps=3, lr=1e-2))
    h = ed.edit(_case(adapter, toy).request)
    ledger = WeightLedger.of(adapter)
    named = dict(adapter.model.named_parameters())
    edited = list(h.tensors)
    assert edited and all(ledger.masters[k].dtype == torch.float32 for k in edited)
    assert all(torch.equal(ledger.masters[k].to(torch.bfloat16), named[k].detach()) for k in edited)
    assert all(module_device(named[k]) == ledger.masters[k].device for k in edited)
    h.remove()
    assert not ledger.masters


# ---- run identity ------------------------------------------------------------------------------
def test_dtype_is_identity_placement_is_not(tmp_path):
    cfg = RunConfig(model="tiny-llava", method="null").model_dump()
    prov = {"model_digest": "x", "placement": {"devices": ["cpu"]}}
    old = {"config": cfg, "provenance": prov}
    moved = {"config": {**cfg, "device_map": "auto"}, "provenance": {**prov, "placement": {"devices": ["cuda:0"]}}}
    check_same_run(tmp_path, old, moved)  # another device: the same run, resumable
    with pytest.raises(ValueError, match="differs in: dtype"):
        check_same_run(tmp_path, old, {"config": {**cfg, "dtype": "bf16"}, "provenance": prov})
    legacy = {k: v for k, v in cfg.items() if k not in ("dtype", "device", "device_map")}
    check_same_run(tmp_path, {"config": legacy, "provenance": prov}, old)  # before --dtype: fp32


def test_an_option_added_later_matches_an_old_run_at_its_default(tmp_path):
    """A run.json written before a method gained an option resumes where the option is at its
    default (what the old run ran), and not where it is set to something else."""
    from mmke.editors.unike import UniKEPlusEditor

    defaults = UniKEPlusEditor.Config().model_dump()
    cfg = RunConfig(model="tiny-llava", method="unike-plus", method_config=defaults).model_dump()
    prov = {"model_digest": "x"}
    mine = {"config": cfg, "provenance": prov}
    legacy = {**cfg, "method_config": {k: v for k, v in defaults.items() if k != "key_site"}}
    check_same_run(tmp_path, {"config": legacy, "provenance": prov}, mine, defaults)
    changed = {**cfg, "method_config": {**defaults, "key_site": "first"}}
    with pytest.raises(ValueError, match="differs in: method_config"):
        check_same_run(tmp_path, {"config": legacy, "provenance": prov}, {"config": changed, "provenance": prov},
                       defaults)
    with pytest.raises(ValueError, match="differs in: method_config"):  # without the defaults: strict
        check_same_run(tmp_path, {"config": legacy, "provenance": prov}, mine)


def test_run_records_placement_and_refuses_another_dtype(tmp_path):
    data = write_toy_mmedit(tmp_path / "d", n=2)
    kw = dict(model="tiny-llava", method="null", data=str(data), image_root=str(data.parent))
    s = Run(RunConfig(**kw, device_map="auto"), tmp_path / "run").execute()
    assert s["config"]["dtype"] == "fp32"
    assert s["provenance"]["placement"]["device_map"] == {"": "cpu"}
    Run(RunConfig(**kw, device="cpu"), tmp_path / "run").execute()  # resumes elsewhere
    with pytest.raises(ValueError, match="differs in: dtype"):
        Run(RunConfig(**kw, dtype="bf16"), tmp_path / "run").execute()


# ---- the default model in bf16 (slow) ----------------------------------------------------------
@pytest.fixture(scope="module")
def default_bf16():
    return load_model("default", dtype="bf16")


def _run(adapter, method, out, **kw):
    cfg = RunConfig(method=method, dtype="bf16", limit=3, **kw)
    return Run(cfg, out, adapter=adapter).execute()


@pytest.mark.slow
def test_default_bf16_null_edit_keeps_locality(default_bf16, tmp_path):
    assert {p.dtype for p in default_bf16.model.parameters()} == {torch.bfloat16}
    s = _run(default_bf16, "null", tmp_path / "null")
    assert s["metrics"]["t_locality"] == 1.0 and s["metrics"]["m_locality"] == 1.0
    assert s["config"]["dtype"] == "bf16"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ft-lm", "mend", "unike"])
def test_default_bf16_edits_land_and_restore(default_bf16, method, tmp_path):
    digest = state_digest(default_bf16.model)
    # sequential groups: the runner checks the weights bit-identical after each group's removal
    s = _run(default_bf16, method, tmp_path / method, setting="sequential", k=3)
    assert s["metrics"]["reliability"] > s["pre_edit_metrics"]["reliability"] + 0.3, s["metrics"]
    assert state_digest(default_bf16.model) == digest


def test_report_reads_an_option_added_later_as_its_default():
    """Report rows and plot labels: a run made before an option existed is the run at the option's
    default, one row with a run that states the default, and labelled with it beside another value."""
    from mmke.editors.unike import UniKEPlusEditor
    from mmke.eval.report import _labels, row_key

    defaults = json.loads(json.dumps(UniKEPlusEditor.Config().model_dump()))
    legacy = {k: v for k, v in defaults.items() if k != "key_site"}

    def summary(options):
        return {"model": "default", "method": "unike-plus", "task": "vqa", "config": {"method_config": options}}

    assert row_key(summary(legacy)) == row_key(summary(defaults))
    labels = _labels([row_key(summary(legacy)), row_key(summary({**defaults, "key_site": "first"}))])
    assert labels == ['unike-plus (key_site="own")', 'unike-plus (key_site="first")']
    # alone, a run at the defaults is the method's name; one with an option set away from it says so
    assert _labels([row_key(summary(legacy))]) == ["unike-plus"]
    assert _labels([row_key(summary({**defaults, "key_site": "first", "compete": True}))]) == [
        'unike-plus (compete=true, key_site="first")']
