"""Distributed evaluation (torchrun, gloo on CPU): groups dealt to ranks, per-rank shards, the merge
into the one-process layout and summary, resume across one-process and torchrun runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmke.cli import app
from mmke.eval import distributed
from mmke.eval.distributed import Ranks, ShardedStore, merge_shards, shard_path, share
from mmke.eval.runner import Run, RunConfig
from mmke.eval.store import CaseStore
from mmke.models.tiny import tiny_llava

from toydata import write_toy_mmedit

TIMING = ("edit_s", "eval_s")
SAME = ("n_cases", "n_groups", "metrics", "metrics_exact_match", "mean", "mean_exact_match", "intervals",
        "pre_edit_metrics", "n_hard_m_locality", "config", "protocol", "n_skipped")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy_mmedit(tmp_path_factory.mktemp("toy"), n=6)


def _cfg(toy, **kw):
    # lr 0.01: edits land on the tiny model and disturb some locality outputs, so the numbers are not
    # all 0 or 1 and a case scored on the wrong model, or lost, would show
    return RunConfig(model="tiny-llava", method="ft-lm", data=str(toy), image_root=str(toy.parent),
                     method_config={"lr": 0.01}, **kw)


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "cases.jsonl").read_text().splitlines()]


def _untimed(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _same_summary(a: dict, b: dict) -> None:
    for k in SAME:
        assert a.get(k) == b.get(k), k
    assert a["provenance"]["model_digest"] == b["provenance"]["model_digest"]


def _torchrun(out: Path, toy: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MMKE_THREADS="1")
    env.pop("MMKE_QUIET", None)  # rank 0 prints, the others must not
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "mmke", "run", "--model", "tiny-llava", "--method", "ft-lm", "--data", str(toy),
           "--out", str(out), "--set", "lr=0.01", *extra]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


# ---- unit: dealing, stores, merge --------------------------------------------------------------
@pytest.mark.parametrize("mode", ["round-robin", "contiguous"])
@pytest.mark.parametrize("n,world", [(7, 2), (6, 3), (2, 4), (0, 2), (10, 1)])
def test_share_deals_every_item_to_exactly_one_rank(mode, n, world):
    items = list(range(n))
    parts = [share(items, r, world, mode) for r in range(world)]
    assert sorted(x for p in parts for x in p) == items
    assert all(p == sorted(p) for p in parts)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    if mode == "contiguous":
        assert [x for p in parts for x in p] == items
    else:
        assert parts[0] == items[::world]


def test_share_names_bad_arguments():
    with pytest.raises(ValueError, match="--shard 'blocks'"):
        share([1, 2], 0, 2, "blocks")
    with pytest.raises(ValueError, match="rank 2 is outside a world of 2"):
        share([1, 2], 2, 2)


def _write(path: Path, rows: list[dict], partial: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + partial)


def test_merge_orders_rows_as_the_plan_drops_partial_lines_and_is_idempotent(tmp_path):
    row = lambda k, i: {"key": k, "index": i, "v": k}  # noqa: E731
    _write(tmp_path / "cases.jsonl", [row("a", 0)])
    _write(shard_path(tmp_path, 1), [row("d", 3), row("b", 1)], partial='{"key": "e", "ind')
    _write(shard_path(tmp_path, 0), [row("c", 2), row("a", 0)])  # "a" twice: one row kept
    store = merge_shards(tmp_path, ["a", "b", "c", "d", "e"])
    assert [r["key"] for r in _rows(tmp_path)] == ["a", "b", "c", "d"]
    assert len(store) == 4 and "e" not in store
    assert not (tmp_path / "shards").exists()
    before = (tmp_path / "cases.jsonl").read_bytes()
    merge_shards(tmp_path, ["a", "b", "c", "d"])
    assert (tmp_path / "cases.jsonl").read_bytes() == before
    # rows the plan does not name follow in file order
    _write(shard_path(tmp_path, 0), [row("z", 9), row("y", 8)])
    merge_shards(tmp_path, ["d", "c"])
    assert [r["key"] for r in _rows(tmp_path)] == ["d", "c", "a", "b", "z", "y"]


def test_sharded_store_reads_everything_and_writes_its_own_shard_only(tmp_path):
    _write(tmp_path / "cases.jsonl", [{"key": "a", "index": 0}])
    other = shard_path(tmp_path, 1)
    _write(other, [{"key": "b", "index": 1}], partial='{"key": "c"')
    _write(shard_path(tmp_path, 0), [{"key": "d", "index": 3}], partial='{"key"')
    s = ShardedStore(tmp_path, 0, CaseStore(tmp_path / "cases.jsonl"))
    assert all(k in s for k in "abd") and "c" not in s and len(s) == 3
    assert other.read_text().endswith('{"key": "c"')  # another rank's file is never truncated
    assert shard_path(tmp_path, 0).read_text().endswith("}\n")  # its own partial line is dropped
    s.add({"key": "e", "index": 4})
    assert "e" in s and [r["key"] for r in _rows(tmp_path)] == ["a"]
    assert [json.loads(x)["key"] for x in shard_path(tmp_path, 0).read_text().splitlines()] == ["d", "e"]


# ---- unit: ranks from the environment and what cannot be split --------------------------------
def test_ranks_from_env(monkeypatch, toy):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MMKE_DIST_BACKEND"):
        monkeypatch.delenv(var, raising=False)
    assert Ranks.from_env() is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert Ranks.from_env() is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="RANK is unset"):
        Ranks.from_env()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    r = Ranks.from_env("contiguous")
    assert (r.rank, r.world, r.local_rank, r.shard, r.is_main) == (1, 2, 1, "contiguous", False)
    if not __import__("torch").cuda.is_available():
        assert (r.device, r.backend) == ("cpu", "gloo")
        assert r.placed(_cfg(toy)).device is None  # the CPU: the configuration is left as given
    assert r.placed(_cfg(toy, device="cpu")).device == "cpu"
    with pytest.raises(ValueError, match="--shard 'x'"):
        Ranks.from_env("x")
    with pytest.raises(ValueError, match="cannot be split across the 2 ranks"):
        r.check(_cfg(toy, setting="lifelong", k=3))
    with pytest.raises(ValueError, match="--device-map auto with torchrun"):
        r.check(_cfg(toy, device_map="auto"))
    r.check(_cfg(toy, setting="sequential", k=2))


def test_cli_refuses_lifelong_under_torchrun_before_starting(monkeypatch, toy, tmp_path):
    for var, v in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(var, v)
    r = CliRunner().invoke(app, ["run", "--model", "tiny-llava", "--method", "ft-lm", "--data", str(toy),
                                 "--setting", "lifelong", "--k", "3", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2
    assert "rank 1: --setting lifelong" in r.output and "cannot be split" in r.output
    assert not (tmp_path / "o").exists()
    assert distributed.current() is None


# ---- one-process runs resume what torchrun left ----------------------------------------------
def test_one_process_run_resumes_a_killed_torchrun_directory(toy, tmp_path, one_thread):
    adapter = tiny_llava()
    ref = Run(_cfg(toy), tmp_path / "ref", adapter=adapter).execute()
    rows = _rows(tmp_path / "ref")
    out = tmp_path / "killed"
    out.mkdir()
    (out / "run.json").write_bytes((tmp_path / "ref" / "run.json").read_bytes())
    # as a torchrun run leaves it: rank 0 finished rows 0, 2; rank 1 rows 1, 3 and half a line
    _write(shard_path(out, 0), [rows[0], rows[2]])
    _write(shard_path(out, 1), [rows[1], rows[3]], partial=json.dumps(rows[5])[:40])
    s = Run(_cfg(toy), out, adapter=adapter).execute()
    _same_summary(s, ref)
    assert "distributed" not in s and not (out / "shards").exists()
    got = _rows(out)
    assert got[:4] == rows[:4]  # kept as written (timings included): not redone
    assert _untimed(got) == _untimed(rows)


# ---- torchrun, 2 processes, gloo ----------------------------------------------------------------
def test_torchrun_two_ranks_give_the_one_process_summary(toy, tmp_path, one_thread):
    ref = Run(_cfg(toy), tmp_path / "ref", adapter=tiny_llava()).execute()
    out = tmp_path / "dist"
    r = _torchrun(out, toy)
    s = json.loads((out / "summary.json").read_text())
    _same_summary(s, ref)
    assert s["distributed"] == {"world_size": 2, "shard": "round-robin", "backend": "gloo"}
    assert _untimed(_rows(out)) == _untimed(_rows(tmp_path / "ref"))
    assert not (out / "shards").exists()
    log = r.stdout + r.stderr
    assert log.count("summary:") == 1  # rank 0 reports, rank 1 is quiet
    assert "rank 0's 3 of 6 groups (2 ranks)" in log and "rank 1's" not in log


def test_torchrun_resumes_a_one_process_directory_and_its_own_shards(toy, tmp_path, one_thread):
    """Sequential groups of 2 dealt contiguously; the directory holds group 0 from a one-process run
    and group 1 in rank 1's shard (with a partial line after it): only group 2 is run again."""
    ref = Run(_cfg(toy, setting="sequential", k=2), tmp_path / "ref", adapter=tiny_llava()).execute()
    rows = _rows(tmp_path / "ref")
    out = tmp_path / "resumed"
    out.mkdir()
    (out / "run.json").write_bytes((tmp_path / "ref" / "run.json").read_bytes())
    _write(out / "cases.jsonl", rows[:2])
    _write(shard_path(out, 1), rows[2:4], partial=json.dumps(rows[4])[:30])
    _torchrun(out, toy, "--setting", "sequential", "--k", "2", "--shard", "contiguous")
    s = json.loads((out / "summary.json").read_text())
    _same_summary(s, ref)
    assert s["n_groups"] == 3 and s["distributed"]["shard"] == "contiguous"
    got = _rows(out)
    assert got[:4] == rows[:4]  # groups 0 and 1 not redone
    assert _untimed(got) == _untimed(rows)
