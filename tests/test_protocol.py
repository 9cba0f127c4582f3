"""Protocol guards: the null editor changes nothing on every model family, pre- and post-edit
outputs share one batching path, intervals are right on hand-computed examples, runs refuse
changed inputs on resume, writes are atomic, and reports never merge what differs."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from mmke.cli import app
from mmke.eval.report import collect, compare, compare_verdict, render, render_compare
from mmke.eval.runner import Run, RunConfig, check_same_run
from mmke.eval.stats import bootstrap_ci, paired_difference, sign_flip_p_value
from mmke.io import atomic_write_json
from mmke.models.tiny import tiny_blip2, tiny_llava
from mmke.scoring import HARD_M_LOCALITY, METRICS

from toydata import write_toy_mmedit

TINY = {"tiny-blip2": tiny_blip2, "tiny-llava": tiny_llava}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Toy MMEdit data whose even records have a hard M-Locality input (the edit's own question)."""
    root = tmp_path_factory.mktemp("toy")
    f = write_toy_mmedit(root, n=6)
    recs = json.loads(f.read_text())
    for i, r in enumerate(recs):
        if i % 2 == 0:
            r["m_loc_q"], r["m_loc_a"] = r["src"], "red"
    f.write_text(json.dumps(recs))
    return f


def _run(model, adapter, data, out, method="null", **kw):
    cfg = RunConfig(model=model, method=method, data=str(data), train_data=str(data), **kw)
    return Run(cfg, out, adapter=adapter).execute()


def _check_null(summary, out):
    assert summary["n_cases"] == 6 and summary["n_hard_m_locality"] == 3
    for row in (json.loads(x) for x in (out / "cases.jsonl").read_text().splitlines()):
        for kind in ("t_locality", "m_locality"):
            assert row["metrics"][kind] == 1.0 and row["metrics_exact_match"][kind] == 1.0
        for kind in ("reliability", "t_generality", "m_generality"):
            assert row["metrics"][kind] == row["pre_edit"][kind]
    assert summary["metrics"][HARD_M_LOCALITY] == 1.0
    assert summary["metrics"]["reliability"] == summary["pre_edit_metrics"]["reliability"]


@pytest.mark.parametrize("model", list(TINY))
def test_null_editor_changes_nothing_on_tiny_families(model, toy, tmp_path, one_thread):
    adapter = TINY[model](seed=0)
    out = tmp_path / model
    _check_null(_run(model, adapter, toy, out), out)
    s = _run(model, adapter, toy, tmp_path / "ref", m_locality="reference-top10")
    assert s["metrics"]["m_locality"] == 1.0 and s["metrics"]["t_locality"] == 1.0


@pytest.mark.slow
def test_null_editor_changes_nothing_on_the_default_model(default_adapter, toy, tmp_path):
    _check_null(_run("default", default_adapter, toy, tmp_path / "d"), tmp_path / "d")


# ---- intervals (hand-computed) --------------------------------------------------------------
def test_bootstrap_interval_hand_computed():
    # [0, 0, 1]: the 27 equally likely resamples have 0/1/2/3 ones with probability 8/12/6/1 (/27):
    # means 0, 1/3, 2/3, 1 with cumulative shares .296, .741, .963, 1 -> 2.5%: 0, 97.5%: 1
    iv = bootstrap_ci([0, 0, 1])
    assert (iv.mean, iv.lo, iv.hi, iv.n) == (pytest.approx(1 / 3), 0.0, 1.0, 3)
    # [0, 1, 1, 1]: 4^4 resamples; P(all four draws are 1) = (3/4)^4 = .316 > .025, so the upper
    # end is 1; the lower end is the smallest mean whose cumulative share reaches .025:
    # P(mean 0) = (1/4)^4 = .004, P(mean <= .25) = .004 + 4 (1/4)^3 (3/4) = .051 -> .25
    iv = bootstrap_ci([0, 1, 1, 1])
    assert (iv.lo, iv.hi) == (0.25, 1.0)
    assert bootstrap_ci([0.5] * 40).lo == bootstrap_ci([0.5] * 40).hi == 0.5
    a = bootstrap_ci(list(range(100)), seed=3)
    assert a == bootstrap_ci(list(range(100)), seed=3) and a.lo < 49.5 < a.hi  # seeded, contains the mean


def test_paired_test_hand_computed():
    # sign flips of [1, 1, 1]: only the two same-sign assignments of 8 reach |mean| 1
    assert sign_flip_p_value([1, 1, 1]) == 0.25
    # [1, 2]: means 1.5, -0.5, 0.5, -1.5 -> 2 of 4 reach 1.5
    assert sign_flip_p_value([1, 2]) == 0.5
    assert sign_flip_p_value([0, 0, 0]) == 1.0
    d = paired_difference([1.0] * 30, [0.0] * 30)
    assert d.excludes_zero and d.diff.mean == 1.0 and d.p_value < 0.001
    d = paired_difference([1, 0, 1, 0] * 5, [0, 1, 0, 1] * 5)
    assert not d.excludes_zero and d.p_value > 0.5


# ---- resume refuses changed inputs ------------------------------------------------------------
def test_resume_refuses_changed_inputs_and_failed_start_writes_nothing(toy, tmp_path, one_thread):
    adapter = tiny_llava(seed=0)
    out = tmp_path / "r"
    with pytest.raises(Exception):
        _run("tiny-llava", adapter, tmp_path / "missing.json", out)
    assert not out.exists()  # a failed start leaves nothing
    _run("tiny-llava", adapter, toy, out, limit=2)
    with pytest.raises(ValueError, match="different configuration"):
        _run("tiny-llava", adapter, toy, out, limit=3)
    with pytest.raises(ValueError, match="the model's weights"):
        _run("tiny-llava", tiny_llava(seed=1), toy, out, limit=2)
    run = json.loads((out / "run.json").read_text())
    run["provenance"]["versions"]["torch"] = "0.0.1"
    atomic_write_json(out / "run.json", run)
    with pytest.raises(ValueError, match=r"library versions \(torch 0.0.1 -> "):
        _run("tiny-llava", adapter, toy, out, limit=2)
    # an option held as a tuple reads back from run.json as a list: the same run, resumable
    mine = {"config": {"method_config": {"image_gate": (0.3, 0.5)}}, "provenance": {}}
    check_same_run(out, json.loads(json.dumps(mine)), mine)


# ---- atomic writes ------------------------------------------------------------------------------
_WRITER = """
import sys, time
from pathlib import Path
from mmke.io import atomic_write_bytes
def chunks():
    yield b'{"new": ' + b'1' * 100000
    Path(sys.argv[2]).touch()  # half written: tell the test
    time.sleep(60)
    yield b'}'
atomic_write_bytes(sys.argv[1], chunks())
"""


def test_kill_during_write_leaves_the_old_file(tmp_path):
    f = tmp_path / "summary.json"
    atomic_write_json(f, {"old": True})
    marker = tmp_path / "half"
    p = subprocess.Popen([sys.executable, "-c", _WRITER, str(f), str(marker)])
    deadline = time.time() + 60
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the writer never got half-way"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert json.loads(f.read_text()) == {"old": True}
    assert [x.name for x in tmp_path.iterdir() if x.name.startswith(".summary.json")]  # the orphaned temp
    atomic_write_json(f, {"new": 1})
    assert json.loads(f.read_text()) == {"new": 1}


def test_racing_folder_writers_leave_one_whole_folder_and_no_temp(tmp_path):
    from mmke.io import atomic_publish_dir

    out = tmp_path / "cache" / "model"

    def slow(tmp):  # started first, finishes second: another process published meanwhile
        (tmp / "weights").write_text("slow")
        atomic_publish_dir(out, fast)
        assert (out / "weights").read_text() == "fast" and (out / "tokenizer").exists()
        (tmp / "tokenizer").write_text("slow")

    def fast(tmp):
        (tmp / "weights").write_text("fast")
        (tmp / "tokenizer").write_text("fast")

    assert atomic_publish_dir(out, slow) == out
    assert {f.name: f.read_text() for f in out.iterdir()} == {"weights": "fast", "tokenizer": "fast"}
    assert sorted(p.name for p in out.parent.iterdir()) == ["model"]  # neither writer's temp is left

    def broken(tmp):
        (tmp / "weights").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_publish_dir(tmp_path / "other", broken)
    assert not (tmp_path / "other").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


# ---- reports and comparisons ----------------------------------------------------------------------
def test_report_keeps_differing_runs_apart_and_compare_pairs_cases(toy, tmp_path, one_thread):
    adapter = tiny_llava(seed=0)
    _run("tiny-llava", adapter, toy, tmp_path / "runs" / "null")
    _run("tiny-llava", adapter, toy, tmp_path / "runs" / "ft", method="ft-lm", method_config={"steps": 3})
    _run("tiny-llava", adapter, toy, tmp_path / "runs" / "ft4", method="ft-lm", limit=4,
         method_config={"steps": 3})
    _run("tiny-llava", adapter, toy, tmp_path / "runs" / "ft4s", method="ft-lm", limit=4,
         method_config={"steps": 2})
    sums = collect([tmp_path / "runs"])
    table = render(sums)
    rows = [r for r in table.splitlines() if r.startswith("| ft-lm")]
    assert len(rows) == 3 and any("limit=4" in r for r in rows) and any("limit=None" in r for r in rows)
    # a label names the options that differ between the method's rows, not all of them
    assert sum("steps=2" in r for r in rows) == 1 and sum("steps=3" in r for r in rows) == 2
    assert not any("lr=" in r for r in rows)
    assert "[" in rows[0] and "M-Loc hard" in table  # intervals and the hard sub-metric
    page = render(sums, fmt="html")
    assert page.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in page and page.rstrip().endswith("</html>")
    from html.parser import HTMLParser

    class Tags(HTMLParser):
        seen: list = []

        def handle_starttag(self, tag, attrs):
            self.seen.append(tag)

    parser = Tags()
    parser.feed(page)
    assert {"html", "head", "body", "table", "style", "title"} <= set(parser.seen)
    c = compare(tmp_path / "runs" / "ft", tmp_path / "runs" / "null")
    assert c["n_shared"] == 6 and set(c["rows"]) == set(METRICS) | {HARD_M_LOCALITY, "mean"}
    assert c["rows"]["t_locality"]["b"] == 1.0 and c["rows"]["t_locality"]["diff"] <= 0
    assert "A - B" in render_compare(c)
    # the verdict follows the interval and flags a sign-flip p on the other side of 0.05
    assert compare_verdict({"lo": 0.01, "hi": 0.09, "p_value": 0.01}, "a", "b") == "a higher"
    assert compare_verdict({"lo": -0.2, "hi": -0.01, "p_value": None}, "a", "b") == "b higher"
    assert compare_verdict({"lo": 0.011, "hi": 0.088, "p_value": 0.123}, "a", "b") == "a higher, weak: sign-flip p 0.12"
    assert compare_verdict({"lo": -0.01, "hi": 0.1, "p_value": 0.3}, "a", "b") == "no difference shown"
    assert compare_verdict({"lo": -0.01, "hi": 0.1, "p_value": 0.04}, "a", "b") == (
        "no difference shown, borderline: sign-flip p 0.04")
    r = CliRunner().invoke(app, ["compare", str(tmp_path / "runs" / "ft4"), str(tmp_path / "runs" / "null")])
    assert r.exit_code == 0 and "4 shared cases" in r.output
    # two runs of one method are named by the options in which they differ
    c = compare(tmp_path / "runs" / "ft4s", tmp_path / "runs" / "ft4")
    assert (c["label_a"], c["label_b"]) == ("ft-lm (steps=2)", "ft-lm (steps=3)")
    assert "| A (ft-lm (steps=2)) | B (ft-lm (steps=3)) |" in render_compare(c)
    r = CliRunner().invoke(app, ["compare", str(tmp_path / "runs" / "ft"), str(tmp_path / "nope")])
    assert r.exit_code == 2 and "no summary.json" in r.output and "partial_run" not in r.output
    (tmp_path / "stopped").mkdir()  # a run stopped before its end: run.json and rows, no summary
    shutil.copy(tmp_path / "runs" / "ft" / "run.json", tmp_path / "stopped" / "run.json")
    r = CliRunner().invoke(app, ["report", str(tmp_path / "stopped")])
    assert r.exit_code == 2 and "a run not finished" in r.output and "scripts/partial_run.py" in r.output


def test_pre_and_post_use_one_batching_path(toy, one_thread):
    """run_case is the only scoring path: the same five inputs, the same batch, the same outputs."""
    from mmke.data.schema import load_records
    from mmke.scoring import case_inputs, run_case
    from mmke.tasks import TASKS

    adapter = tiny_blip2(seed=0)
    rec = load_records(toy).records[0]
    x = case_inputs(rec, TASKS["vqa"], adapter.load_image)
    a, b = run_case(adapter, x), run_case(adapter, x)
    for k in a:
        assert torch.equal(a[k].top1, b[k].top1) and a[k].acc == b[k].acc


# ---- a new user's mistakes: one line, exit 2, nothing written ------------------------------------
@pytest.mark.parametrize("args,says", [
    (["--limit", "0"], "--limit"), (["--limit", "-1"], "--limit"), (["--task", "vq"], "--task"),
    (["--set", "stepz=3"], "unknown option 'stepz'; valid: lr, sites, steps, stop_loss"),
    (["--model", "hf:/no/such/dir"], "no such directory"), (["--method", "nope"], "unknown method"),
])
def test_cli_mistakes_are_one_line_and_leave_nothing(args, says, tmp_path):
    out = tmp_path / "run"
    base = {"--method": "ft-lm", "--out": str(out)}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    r = CliRunner().invoke(app, ["run"] + [x for kv in base.items() for x in kv])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and says in lines[0] and "pydantic" not in r.output and "Traceback" not in r.output
    assert not out.exists()


def test_list_options_explains_a_method():
    r = CliRunner().invoke(app, ["list", "options", "t-patcher"])
    assert r.exit_code == 0 and "max_neurons" in r.output and "one per mistaken target token" in r.output
    assert CliRunner().invoke(app, ["list", "options", "nope"]).exit_code == 2
    # a meaning whose comment continues on the next lines is given whole; section rules are not
    from mmke.editors.unike.editor import UniKEPlusConfig

    docs = {k: d for k, _v, d in UniKEPlusConfig.option_docs()}
    assert docs["image_gate"].endswith("above lo with the edit image's (fully above hi); unike-plus")
    assert "----" not in docs["stop_loss"] + docs["seed"] + docs["s_quantile"]


def test_generate_shows_the_edited_answer_as_text(one_thread):
    from mmke.editors.base import EditRequest
    from mmke.editors.ft import FTConfig, FTEditor
    from mmke.models.base import Example
    from PIL import Image

    adapter = tiny_llava(seed=0)
    ex = Example("what color is the shape?", " red", Image.new("RGB", (32, 32), (0, 128, 128)))
    before = adapter.generate(ex, max_new_tokens=2)
    h = FTEditor(adapter, FTConfig(steps=40, lr=5e-3)).edit(EditRequest(ex))
    n = len(adapter.tokenizer(" red", add_special_tokens=False).input_ids)
    after = adapter.generate(ex, max_new_tokens=n)
    assert isinstance(before, str) and after.strip() == "red"
    h.remove()
    assert adapter.generate(ex, max_new_tokens=2) == before


def test_report_labels_runs_on_other_data_and_symlinked_roots_run(toy, tmp_path, one_thread):
    """Two runs of one method on different data are two labelled rows; an image root that is a
    symbolic link runs like the folder it points to."""
    adapter = tiny_llava(seed=0)
    other = tmp_path / "other"
    other.mkdir()
    link = tmp_path / "linked-root"
    link.symlink_to(toy.parent, target_is_directory=True)
    data2 = other / "toy.json"
    data2.write_text(toy.read_text())
    cfg = dict(model="tiny-llava", method="null", train_data=str(toy))
    Run(RunConfig(**cfg, data=str(toy)), tmp_path / "runs" / "a", adapter=adapter).execute()
    s = Run(RunConfig(**cfg, data=str(data2), image_root=str(link)), tmp_path / "runs" / "b",
            adapter=adapter).execute()
    assert s["n_cases"] == 6
    rows = [r for r in render(collect([tmp_path / "runs"])).splitlines() if r.startswith("| null")]
    assert len(rows) == 2 and all("data=" in r for r in rows)
    # another file in the same folder is another dataset too
    data3 = toy.parent / "vqa_toy_sameimg.json"
    data3.write_text(toy.read_text())
    Run(RunConfig(**cfg, data=str(data3)), tmp_path / "runs" / "c", adapter=adapter).execute()
    rows = [r for r in render(collect([tmp_path / "runs"])).splitlines() if r.startswith("| null")]
    assert len(rows) == 3 and sum("toy_sameimg" in r for r in rows) == 1


def test_thread_default_respects_the_environment_and_the_load(monkeypatch):
    import os

    from mmke import threads

    monkeypatch.delenv("MMKE_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.0, 0.0))
    assert threads.default_threads() == 4  # a quiet machine: every core
    monkeypatch.setattr(os, "getloadavg", lambda: (2.8, 0.0, 0.0))
    assert threads.default_threads() == 1  # three busy processes on four cores: one thread
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 0.0, 0.0))
    assert threads.default_threads() == 1  # never fewer than one
