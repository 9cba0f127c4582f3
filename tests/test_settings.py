"""Composition and the evaluation settings: every editor takes several edits on one model and
removes any of them in any order; sequential runs resume after a crash mid-group (while editing or
scoring) to identical numbers; cross-task groups hold both tasks; lifelong runs write their curve
and leave the model as it was."""

import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch

from mmke.data.schema import load_records
from mmke.editors.base import EditRequest, WeightLedger
from mmke.editors.trained import TrainedEditor
from mmke.eval.config import task_data
from mmke.eval.report import collect, render
from mmke.eval.runner import Run, RunConfig
from mmke.eval.settings import groups, interleave, parse_checkpoints, Case
from mmke.models.base import state_digest
from mmke.models.tiny import tiny_blip2, tiny_llava
from mmke.registry import METHODS, editor_class
from mmke.scoring import case_inputs
from mmke.tasks import TASKS

from toydata import write_toy_mmedit

# small settings: composition, not quality, is under test
FAST = {
    "ft-lm": {"steps": 3}, "ft-vision": {"steps": 3}, "ike": {"k": 2, "max_context_tokens": 200},
    "ike-prefix": {"k": 2, "max_context_tokens": 200},
    "t-patcher": {"steps": 5, "memory_size": 4},
    "unike": {"layers": 2, "n_neurons": 3, "steps": 3, "memory_size": 4, "k": 4, "memory_entries": 8},
    "serac": {"lora_layers": [-2, -1]}, "serac-mm": {"lora_layers": [-2, -1]},
    "serac-mm-gated": {"lora_layers": [-2, -1]},
    "grace": {}, "wise": {"save_freq": 10},  # one open shard (tests/test_lifelong_editors.py merges)
}
UNIKE_FAMILY = [m for m in METHODS if m.startswith("unike")]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    f = write_toy_mmedit(root, n=16)
    return f, load_records(f, root).records


@pytest.fixture(scope="module")
def unike_weights(toy, tmp_path_factory):
    """UniKE weights (encoders + latent memory) for tiny LLaVA, trained by the real recipe briefly."""
    from mmke.editors.unike import UniKEConfig, UniKEEditor
    from mmke.train.editors import EditorTrainConfig

    torch.manual_seed(0)
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMKE_CACHE", str(tmp_path_factory.mktemp("cache")))
        for site in ("attn", "layer"):  # unike's and unike-plus's latent site
            cfg = UniKEConfig(**FAST["unike"], site=site, enc_steps=5, enc_batch=8)
            ed = UniKEEditor(tiny_llava(), cfg, task=TASKS["vqa"], train_records=toy[1], untrained=True,
                             model_name="tiny-llava")
            out[site] = tmp_path_factory.mktemp(f"unike-{site}")
            ed.fit(toy[1], out[site], EditorTrainConfig(val_size=1, seed=0), command="test")
    return out


def make_editor(name, adapter, records, unike_weights=None):
    cls = editor_class(name)
    opts = dict(FAST.get("unike" if name in UNIKE_FAMILY else name, {}))
    kw = {"task": TASKS["vqa"], "train_records": records, "model_name": "tiny-llava"}
    if name in UNIKE_FAMILY:
        site = cls.Config().site
        if cls.needs_weights(cls.Config(**opts)):
            opts["weights"] = str(unike_weights[site])
        else:
            kw["untrained"] = True
    elif issubclass(cls, TrainedEditor):
        kw["untrained"] = True
    return cls(adapter, cls.Config.from_options(name, opts), **kw)


def _probe(adapter, records):
    """Logits of a fixed batch touching every input kind (edited and unrelated inputs)."""
    xs = [case_inputs(r, TASKS["vqa"], adapter.load_image) for r in records[:3]]
    with torch.no_grad():
        return adapter.run([x[k] for x in xs for k in ("reliability", "t_locality", "m_locality")]).logits.clone()


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _state(adapter):
    return (state_digest(adapter.model), _hooks(adapter.model), len(adapter.input_transforms),
            len(adapter.run_wrappers))


COMPOSABLE = [m for m in METHODS if m != "null"]


@pytest.mark.parametrize("method", COMPOSABLE)
def test_three_edits_removed_in_every_order(method, toy, unike_weights, one_thread):
    """Three edits applied one after another; removed in each of the six orders. Whenever the
    edits left are the first ones applied, the outputs are exactly those recorded after them; once
    all are removed, weights, hooks, transforms and wrappers are exactly the original ones."""
    _, records = toy
    adapter = tiny_llava(seed=0)
    ed = make_editor(method, adapter, records, unike_weights)
    reqs = [EditRequest(case_inputs(r, TASKS["vqa"], adapter.load_image)["reliability"], r.to_dict())
            for r in records[:3]]
    outs = [_probe(adapter, records)]
    original = _state(adapter)  # after a forward: the model installs its own hooks on first use
    for order in itertools.permutations(range(3)):
        handles = []
        for i, req in enumerate(reqs):
            torch.manual_seed(i)
            handles.append(ed.edit(req))
            if order == (0, 1, 2):
                outs.append(_probe(adapter, records))
        left = [0, 1, 2]
        for i in order:
            handles[i].remove()
            left.remove(i)
            if left == list(range(len(left))):  # a prefix of the application order
                assert torch.equal(_probe(adapter, records), outs[len(left)]), (method, order, left)
        assert _state(adapter) == original, (method, order)
    assert torch.equal(_probe(adapter, records), outs[0])


def test_weight_ledger_removes_the_middle_edit_by_its_delta(tmp_path):
    """Removing edit 2 of 3 leaves base + d1 + d3; removing all restores the base bit for bit."""
    adapter = tiny_blip2(seed=0)
    name, p = next(iter(adapter.model.named_parameters()))
    base = p.detach().clone()
    from mmke.editors.base import EditHandle

    handles, deltas = [], []
    for i in range(3):
        before = p.detach().clone()
        with torch.no_grad():
            p.add_(torch.full_like(p, 0.25 * (i + 1)))
        deltas.append(p.detach() - before)
        handles.append(EditHandle(adapter, "test", params={name: before}))
    handles[1].remove()
    assert torch.allclose(p, base + deltas[0] + deltas[2])
    handles[0].remove()
    assert torch.allclose(p, base + deltas[2])
    handles[2].remove()
    assert torch.equal(p, base) and not WeightLedger.of(adapter).chains
    # released edits cannot be removed one by one, but the ledger restores the unedited values
    with torch.no_grad():
        before = p.detach().clone()
        p.add_(1.0)
    h = EditHandle(adapter, "test", params={name: before})
    h.release()
    with pytest.raises(RuntimeError, match="released"):
        h.remove()
    with pytest.raises(RuntimeError, match="released"):
        h.save(tmp_path / "edit")
    WeightLedger.of(adapter).restore_all()
    assert torch.equal(p, base)


def test_schedules_cut_the_stream_as_the_settings_say():
    cases = [Case(str(i), "vqa", None) for i in range(7)]
    seq = groups("sequential", cases, k=3)
    assert [len(g.cases) for g in seq] == [3, 3, 1] and [g.checkpoints for g in seq] == [(3,), (3,), (1,)]
    assert all(len(g.cases) == 1 for g in groups("one-step", cases, k=5))
    (life,) = groups("lifelong", cases, checkpoints=(1, 5), probes=2)
    assert life.checkpoints == (1, 5, 7) and [c.key for c in life.probes] == ["0", "1"]
    assert {s.case.key: s.metrics for s in life.scored(1)}["1"] == ("t_locality", "m_locality")
    assert len(life.scored(5)) == 5
    mixed = interleave([cases[:3], [Case(f"c{i}", "caption", None) for i in range(2)]])
    assert [c.task for c in mixed] == ["vqa", "caption", "vqa", "caption", "vqa"]
    assert parse_checkpoints("1,10", 100) == (1, 10, 100) and parse_checkpoints(None, 1000) == (1, 10, 100, 1000)
    with pytest.raises(ValueError, match="between 1 and K"):
        parse_checkpoints("0,5", 10)


def _run(data, out, adapter, **kw):
    cfg = RunConfig(model="tiny-llava", data=str(data), train_data=str(data), **kw)
    return Run(cfg, out, adapter=adapter).execute()


def test_sequential_run_killed_mid_group_resumes_to_identical_numbers(toy, tmp_path, monkeypatch, one_thread):
    data, _ = toy
    kw = dict(method="ft-lm", setting="sequential", k=3, limit=9, method_config={"steps": 3})
    full = _run(data, tmp_path / "full", tiny_llava(seed=0), **kw)
    assert full["setting"] == "sequential" and full["k"] == 3 and full["n_groups"] == 3

    from mmke.editors.ft import FTEditor

    real, calls = FTEditor.edit, {"n": 0}

    def crashing(self, request):
        calls["n"] += 1
        if calls["n"] == 5:  # the second edit of the second group
            raise KeyboardInterrupt
        return real(self, request)

    adapter = tiny_llava(seed=0)
    digest = state_digest(adapter.model)
    monkeypatch.setattr(FTEditor, "edit", crashing)
    with pytest.raises(KeyboardInterrupt):
        _run(data, tmp_path / "cut", adapter, **kw)
    assert state_digest(adapter.model) == digest  # the interrupted group's edits were taken out
    rows = (tmp_path / "cut" / "cases.jsonl").read_text().splitlines()
    assert len(rows) == 3  # the first group only: a group is written whole
    with open(tmp_path / "cut" / "cases.jsonl", "a") as f:
        f.write('{"key": "partial')  # and a torn line, as a kill during the write leaves
    monkeypatch.setattr(FTEditor, "edit", real)
    resumed = _run(data, tmp_path / "cut", adapter, **kw)
    assert resumed["metrics"] == full["metrics"] and resumed["intervals"] == full["intervals"]
    per_case = lambda d: {r["key"]: r["metrics"] for r in map(json.loads, (d / "cases.jsonl").read_text().splitlines())}
    assert per_case(tmp_path / "cut") == per_case(tmp_path / "full")


def test_sequential_run_killed_while_scoring_keeps_the_scored_cases_and_resumes_to_identical_numbers(
        toy, tmp_path, monkeypatch, one_thread):
    """Scored rows are written one by one: a kill part-way through a group's scoring keeps them,
    and the resumed run re-applies the group's edits and scores only the rest."""
    import mmke.eval.runner as runner
    from mmke.editors.ft import FTEditor

    data, _ = toy
    kw = dict(method="ft-lm", setting="sequential", k=3, limit=9, method_config={"steps": 3})
    full = _run(data, tmp_path / "full", tiny_llava(seed=0), **kw)
    real_case, calls = runner.run_case, {"n": 0}

    def crashing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 11:  # group 1: 3 unedited + 3 scored; group 2: 3 unedited, then its 2nd scored case
            raise KeyboardInterrupt
        return real_case(*a, **k)

    adapter = tiny_llava(seed=0)
    digest = state_digest(adapter.model)
    monkeypatch.setattr(runner, "run_case", crashing)
    with pytest.raises(KeyboardInterrupt):
        _run(data, tmp_path / "cut", adapter, **kw)
    assert state_digest(adapter.model) == digest
    keys = lambda d: [json.loads(x)["key"] for x in (d / "cases.jsonl").read_text().splitlines()]
    assert len(keys(tmp_path / "cut")) == 4  # group 1 and the first scored case of group 2
    monkeypatch.setattr(runner, "run_case", real_case)
    real_edit, edits = FTEditor.edit, {"n": 0}

    def counting(self, request):
        edits["n"] += 1
        return real_edit(self, request)

    monkeypatch.setattr(FTEditor, "edit", counting)
    resumed = _run(data, tmp_path / "cut", adapter, **kw)
    assert edits["n"] == 6  # group 2's edits again, then group 3's; group 1 is not redone
    assert resumed["metrics"] == full["metrics"] and resumed["intervals"] == full["intervals"]
    assert sorted(keys(tmp_path / "cut")) == sorted(keys(tmp_path / "full"))  # none twice, none lost
    per_case = lambda d: {r["key"]: r["metrics"] for r in map(json.loads, (d / "cases.jsonl").read_text().splitlines())}
    assert per_case(tmp_path / "cut") == per_case(tmp_path / "full")


def test_partial_run_script_aggregates_the_finished_groups_of_a_stopped_run(toy, tmp_path, monkeypatch, capsys,
                                                                            one_thread):
    """``scripts/partial_run.py`` on a sequential run stopped in its second group: the summary's
    aggregation over the first group's cases, and how far the second got; then on a torchrun run's
    shards, not merged yet, which it reads without changing a byte."""
    import runpy

    from mmke.eval.summary import aggregate

    data, _ = toy
    out = tmp_path / "seq"
    _run(data, out, tiny_llava(seed=0), method="ft-lm", setting="sequential", k=3, limit=9, method_config={"steps": 2})
    lines = (out / "cases.jsonl").read_text().splitlines(keepends=True)
    (out / "cases.jsonl").write_text("".join(lines[:4]))  # group 1, and one case of group 2
    (out / "summary.json").unlink()
    monkeypatch.setattr("sys.argv", ["partial_run.py", str(out)])
    runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "partial_run.py"), run_name="__main__")
    text = capsys.readouterr().out
    assert "1 of 3 groups stored (3 of 9 cases); group 2: 1 of 3 cases scored (not counted)" in text
    first = [json.loads(x) for x in lines[:3]]
    assert f"mean {100 * aggregate(first)['mean']:.1f} [" in text
    # a torchrun run not merged yet: group 2 finished in one rank's shard, group 3 begun in another's
    (out / "shards").mkdir()
    (out / "shards" / "rank-00001.jsonl").write_text("".join(lines[3:6]))
    (out / "shards" / "rank-00002.jsonl").write_text("".join(lines[6:8]) + lines[8][:20])  # a partial last line
    before = {f.name: f.read_bytes() for f in [out / "cases.jsonl", *(out / "shards").iterdir()]}
    runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "partial_run.py"), run_name="__main__")
    text = capsys.readouterr().out
    assert "2 of 3 groups stored (6 of 9 cases); group 3: 2 of 3 cases scored (not counted)" in text
    assert f"mean {100 * aggregate([json.loads(x) for x in lines[:6]])['mean']:.1f} [" in text
    assert {f.name: f.read_bytes() for f in [out / "cases.jsonl", *(out / "shards").iterdir()]} == before  # read only


def test_cross_task_groups_hold_both_tasks_and_report_per_task(toy, tmp_path, one_thread):
    data, _ = toy
    folder = tmp_path / "mm"
    shutil.copytree(data.parent, folder)
    shutil.copy(data, folder / "vqa_eval.json")
    recs = json.loads(data.read_text())
    for r in recs:
        r["src"] = r["rephrase"] = "a photo of"  # captions
    (folder / "caption_eval.json").write_text(json.dumps(recs))
    s = Run(RunConfig(model="tiny-llava", method="ft-lm", task="vqa+caption", setting="cross-task", k=4,
                      limit=3, data=str(folder / "vqa_eval.json"), train_data=str(folder / "vqa_eval.json"),
                      method_config={"steps": 2}), tmp_path / "ct", adapter=tiny_llava(seed=0)).execute()
    rows = [json.loads(x) for x in (tmp_path / "ct" / "cases.jsonl").read_text().splitlines()]
    by_group = {}
    for r in rows:
        by_group.setdefault(r["group"], set()).add(r["task"])
    assert by_group[0] == {"vqa", "caption"} and len(rows) == 6
    assert set(s["per_task"]) == {"vqa", "caption"} and s["per_task"]["caption"]["n_cases"] == 3
    text = render(collect([tmp_path / "ct"]))
    assert "E-IC (caption) — cross-task, K = 4" in text and "overall" in text
    with pytest.raises(ValueError, match="no E-IC eval file for .*looked for .*caption_eval.json"):
        RunConfig(task="vqa+caption", setting="cross-task", data=str(data))
    # MMEdit's layout: editing-data/vqa/vqa_eval.json, editing-data/caption/caption_eval_edit.json
    mmedit = tmp_path / "editing-data"
    (mmedit / "vqa").mkdir(parents=True)
    (mmedit / "caption").mkdir()
    shutil.copy(data, mmedit / "vqa" / "vqa_eval.json")
    (mmedit / "caption" / "caption_eval_edit.json").write_text(json.dumps(recs))
    cfg = RunConfig(task="vqa+caption", setting="cross-task", data=str(mmedit / "vqa" / "vqa_eval.json"))
    assert task_data(cfg) == {"vqa": str(mmedit / "vqa" / "vqa_eval.json"),
                              "caption": str(mmedit / "caption" / "caption_eval_edit.json")}
    with pytest.raises(ValueError, match="need --setting cross-task"):
        RunConfig(task="vqa+caption", setting="sequential")


def test_lifelong_run_writes_its_curve_and_restores_the_model(toy, tmp_path, one_thread):
    data, _ = toy
    adapter = tiny_llava(seed=0)
    digest = state_digest(adapter.model)
    s = _run(data, tmp_path / "ll", adapter, method="ft-lm", setting="lifelong", k=6, checkpoints=(1, 3),
             probes=2, method_config={"steps": 3})
    assert [c["n_edits"] for c in s["curve"]] == [1, 3, 6]
    assert [c["n"]["reliability"] for c in s["curve"]] == [1, 3, 6]
    assert all(c["n"]["t_locality"] == 2 for c in s["curve"])
    assert s["metrics"] == s["curve"][-1]["metrics"] and state_digest(adapter.model) == digest
    assert not WeightLedger.of(adapter).chains and not WeightLedger.of(adapter).base
    again = _run(data, tmp_path / "ll", adapter, method="ft-lm", setting="lifelong", k=6, checkpoints=(1, 3),
                 probes=2, method_config={"steps": 3})
    assert again["curve"] == s["curve"]  # nothing left to do: the stored curve
    with pytest.raises(ValueError, match="needs 20 cases"):
        _run(data, tmp_path / "big", adapter, method="ft-lm", setting="lifelong", k=20)


def test_plot_draws_lifelong_curves_and_bars(toy, tmp_path, one_thread):
    from typer.testing import CliRunner

    from mmke.cli import app

    data, _ = toy
    adapter = tiny_llava(seed=0)
    s = _run(data, tmp_path / "runs" / "ll", adapter, method="null", setting="lifelong", k=4, checkpoints=(1, 2),
             probes=2)
    # the protocol's own check, lifelong too: a null edit leaves locality exactly 1 at every checkpoint
    assert all(p["metrics"]["t_locality"] == p["metrics"]["m_locality"] == 1.0 for p in s["curve"])
    assert s["metrics"]["reliability"] == s["pre_edit_metrics"]["reliability"] or s["n_probes"] < s["n_cases"]
    _run(data, tmp_path / "runs" / "seq", adapter, method="null", setting="sequential", k=2, limit=4)
    # the lifelong row's n says what its columns are over: the edits, and the probes for locality
    assert "| 4 (2 probes; 2 out of scope) |" in render(collect([tmp_path / "runs" / "ll"]))
    r = CliRunner().invoke(app, ["plot", str(tmp_path / "runs"), "--out", str(tmp_path / "fig.png")])
    assert r.exit_code == 0, r.output
    for f in ("fig.png", "fig-bars.png"):
        assert (tmp_path / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = CliRunner().invoke(app, ["plot", str(tmp_path / "runs"), "--out", str(tmp_path / "fig.txt")])
    assert r.exit_code == 2 and ".png, .pdf or .svg" in r.output


def test_progress_lines_of_a_log_say_where_a_sequential_run_is(toy, tmp_path, capsys, monkeypatch, one_thread):
    """In a log (no terminal), a group's scoring has its own line, and starting it first prints
    the edits counted since the last line (they are not held back until the next minute)."""
    from mmke.progress import LineProgress

    monkeypatch.delenv("MMKE_QUIET", raising=False)  # the suite runs quiet
    with LineProgress() as outer:
        t = outer.add_task("edits", total=10)
        for _ in range(3):
            outer.update(t, advance=1)
        with LineProgress() as inner:
            inner.add_task("scoring", total=2)
    lines = capsys.readouterr().err.splitlines()
    assert [ln.split(" (")[0] for ln in lines] == ["edits: 0/10", "edits: 3/10", "scoring: 0/2"]
    cfg = RunConfig(model="tiny-llava", data=str(toy[0]), method="null", setting="sequential", k=2, limit=4)
    Run(cfg, tmp_path / "seq", adapter=tiny_llava(seed=0)).execute()
    err = capsys.readouterr().err
    assert "scoring group 1: 0/2" in err and "scoring group 2: 0/2" in err
    assert err.index("edits (K = 2): 2/4") < err.index("scoring group 1: 0/2")
