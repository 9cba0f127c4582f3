"""End-to-end runs on the bundled benchmark: summary schema, resume after SIGKILL, reports, CLI."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmke.cli import app
from mmke.eval.report import collect, render
from mmke.eval.runner import Run, RunConfig

pytestmark = pytest.mark.slow
METRIC_KEYS = {"reliability", "t_generality", "m_generality", "t_locality", "m_locality"}


def check_summary(s, *, n, task="vqa", method="ft-lm"):
    assert {"model", "task", "method", "setting", "n_cases", "n_skipped", "seed", "metrics",
            "metrics_exact_match", "timing", "config"} <= set(s)
    assert s["setting"] == "one-step" and s["n_cases"] == n and s["task"] == task and s["method"] == method
    for key in ("metrics", "metrics_exact_match"):
        assert set(s[key]) - {"m_locality_hard"} == METRIC_KEYS
        assert all(0.0 <= v <= 1.0 for v in s[key].values())
        assert all(lo <= s[key][k] <= hi for k, (lo, hi) in s["intervals"][key].items() if k in s[key])
    assert {"versions", "model_digest", "editor_weights_digest", "data_digest", "benchmark"} <= set(s["provenance"])
    assert set(s["timing"]) >= {"edit_s_median", "eval_s_median", "total_s"}
    assert s["config"]["method"] == method


def test_ft_lm_run_on_bundled_vqa(default_adapter, tmp_path):
    s = Run(RunConfig(method="ft-lm", task="vqa", limit=3), tmp_path / "r", adapter=default_adapter).execute()
    check_summary(s, n=3)
    assert s["pre_edit_metrics"]["reliability"] < 1.0  # edit cases are ones the model gets wrong
    assert s["metrics"]["reliability"] > s["pre_edit_metrics"]["reliability"]
    assert json.loads((tmp_path / "r" / "summary.json").read_text()) == s
    assert len((tmp_path / "r" / "cases.jsonl").read_text().splitlines()) == 3


def test_ike_and_caption_runs(default_adapter, tmp_path):
    s = Run(RunConfig(method="ike", task="caption", limit=2, method_config={"k": 4}),
            tmp_path / "ike", adapter=default_adapter).execute()
    check_summary(s, n=2, task="caption", method="ike")
    s2 = Run(RunConfig(method="ft-vision", task="caption", limit=2), tmp_path / "ftv",
             adapter=default_adapter).execute()
    check_summary(s2, n=2, task="caption", method="ft-vision")
    table = render(collect([tmp_path]))
    assert "E-IC (caption)" in table and "ike" in table and "ft-vision" in table


def test_other_config_in_same_dir_is_refused(default_adapter, tmp_path):
    Run(RunConfig(method="null", limit=1), tmp_path, adapter=default_adapter).execute()
    with pytest.raises(ValueError, match="different configuration"):
        Run(RunConfig(method="null", limit=2), tmp_path, adapter=default_adapter).execute()


def test_resumed_run_takes_the_thread_count_it_started_with(default_adapter, tmp_path, caplog):
    """CPU sums depend on the thread count: a run records it and a resumed run uses it again."""
    import torch

    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        Run(RunConfig(method="null", limit=1), tmp_path, adapter=default_adapter).execute()
        assert json.loads((tmp_path / "run.json").read_text())["provenance"]["placement"]["threads"] == 1
        torch.set_num_threads(2)
        with caplog.at_level("WARNING"):
            s = Run(RunConfig(method="null", limit=2), tmp_path / "other", adapter=default_adapter).execute()
        assert torch.get_num_threads() == 2 and s["provenance"]["placement"]["threads"] == 2  # a new run: as set
        with caplog.at_level("WARNING"):
            s = Run(RunConfig(method="null", limit=1), tmp_path, adapter=default_adapter).execute()
        assert torch.get_num_threads() == 1 and s["provenance"]["placement"]["threads"] == 1
        assert "started with 1 CPU thread(s): resuming with 1, not 2" in caplog.text
    finally:
        torch.set_num_threads(old)


def _cli(out: Path, limit: int) -> list[str]:
    return [sys.executable, "-m", "mmke.cli", "run", "--method", "ft-lm", "--task", "vqa",
            "--limit", str(limit), "--out", str(out)]


def test_resume_after_sigkill_loses_and_duplicates_nothing(tmp_path):
    env = dict(os.environ, MMKE_QUIET="1")
    out = tmp_path / "killed"
    p = subprocess.Popen(_cli(out, 5), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cases = out / "cases.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        if cases.exists() and len(cases.read_bytes().splitlines()) >= 2:
            break
        time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.wait()
    n_before = len(cases.read_bytes().splitlines())
    assert 1 <= n_before < 5, "the run should have been killed part-way"
    subprocess.run(_cli(out, 5), env=env, check=True, capture_output=True)
    rows = [json.loads(x) for x in cases.read_text().splitlines()]
    assert len(rows) == 5 and len({r["key"] for r in rows}) == 5
    resumed = json.loads((out / "summary.json").read_text())
    clean = tmp_path / "clean"
    subprocess.run(_cli(clean, 5), env=env, check=True, capture_output=True)
    fresh = json.loads((clean / "summary.json").read_text())
    assert resumed["n_cases"] == fresh["n_cases"] == 5
    assert resumed["metrics"] == fresh["metrics"]
    assert resumed["metrics_exact_match"] == fresh["metrics_exact_match"]


def test_cli_names_the_broken_record(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"src": "q", "alt": ""}]))
    r = CliRunner().invoke(app, ["run", "--method", "ft-lm", "--data", str(bad), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2
    assert "bad.json" in r.output and "record 0" in r.output and "field '" in r.output
    r = CliRunner().invoke(app, ["run", "--method", "nope", "--out", str(tmp_path / "o2")])
    assert r.exit_code == 2 and "unknown method" in r.output


def test_cli_list():
    r = CliRunner().invoke(app, ["list", "methods"])
    assert r.exit_code == 0 and "ft-lm" in r.output and "ike" in r.output
    r = CliRunner().invoke(app, ["list", "tasks"])
    assert "E-VQA" in r.output and "E-IC" in r.output


def test_skip_invalid_is_counted_and_train_split_found_beside_data(default_adapter, tmp_path):
    from mmke.data.bundled import default_benchmark_dir, ensure_benchmark

    bench = ensure_benchmark(default_benchmark_dir())
    recs = json.loads((bench / "vqa_eval.json").read_text())[:3]
    recs.insert(1, dict(recs[0], image="images/test/does-not-exist.png"))
    data = tmp_path / "vqa_eval.json"
    data.write_text(json.dumps(recs))
    (tmp_path / "vqa_train.json").write_text((bench / "vqa_train.json").read_text())
    cfg = RunConfig(method="ike", data=str(data), image_root=str(bench), skip_invalid=True,
                    method_config={"k": 2})
    r = Run(cfg, tmp_path / "out", adapter=default_adapter)
    assert r.cfg.train_data == str(tmp_path / "vqa_train.json")
    s = r.execute()
    assert s["n_skipped"] == 1 and s["n_cases"] == 3


def test_reference_m_locality_variant(default_adapter, tmp_path):
    s = Run(RunConfig(method="ft-lm", limit=2, m_locality="reference-top10"), tmp_path,
            adapter=default_adapter).execute()
    check_summary(s, n=2)
    assert "top-10" in s["protocol"] and s["config"]["m_locality"] == "reference-top10"
