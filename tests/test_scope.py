"""M-Locality inputs within other edits' reach (:mod:`mmke.eval.scope`): content classes of images
(``image`` ~ ``image_rephrase``) and question classes (``src`` ~ ``rephrase``), and the
``m_locality_out_of_scope`` sub-metric of sequential and lifelong summaries."""

import dataclasses
import json

from mmke.eval.report import render
from mmke.eval.runner import Run, RunConfig
from mmke.eval.scope import OUT_OF_SCOPE_M_LOCALITY, EditScope
from mmke.models.tiny import tiny_llava

from toydata import COLOURS, colour_records, write_toy_mmedit


def rec(image, image_rephrase, src, rephrase, m_loc, m_loc_q):
    return {"image": image, "image_rephrase": image_rephrase, "src": src, "rephrase": rephrase,
            "m_loc": m_loc, "m_loc_q": m_loc_q}


def test_classes_close_over_rephrases_and_decide_scope():
    a = rec("a.png", "a2.png", "What color is it?", "what colour is it?", "c.png", "what colour is it?")
    b = rec("a2.png", "a3.png", "what shape is it?", "which shape is it?", "a3.png", "WHAT COLOR IS IT?")
    c = rec("c.png", "c2.png", "what shape is it?", "what shape is it?", "a.png", "what size is it?")
    s = EditScope([a, b, c])
    # a's probe asks a's question about c.png: no edit asks that question about c.png's content
    assert s.probe_key(a) not in s.covered([a])  # other content
    assert s.probe_key(a) not in s.covered([c])  # c.png's class, but the shape question
    # b's probe: a3.png (linked to a.png through a2.png) with a's question (case and spacing aside)
    assert s.probe_key(b) in s.covered([a])
    assert s.probe_key(b) not in s.covered([b, c])
    assert s.probe_key(c) not in s.covered([a, b, c])  # a question no edit asks


def test_lifelong_summary_splits_m_locality_by_scope(tmp_path, one_thread):
    """Every probe asks the edit question about another colour's image: at the stream's end every
    colour is edited, so no probe is out of scope; after the first edit, only the probes whose
    image has the first edit's colour are in scope."""
    f = write_toy_mmedit(tmp_path, n=len(COLOURS))
    records = json.loads(f.read_text())
    for r in records:
        r["m_loc_q"] = "what colour is the shape?"  # the rephrase: the edit's question class
    f.write_text(json.dumps(records))
    cfg = RunConfig(model="tiny-llava", data=str(f), method="null", setting="lifelong", k=len(records),
                    checkpoints=(1,), probes=len(records))
    s = Run(cfg, tmp_path / "ll", adapter=tiny_llava(seed=0)).execute()
    rows = [json.loads(line) for line in (tmp_path / "ll" / "cases.jsonl").read_text().splitlines()]
    first = next(r for r in rows if r.get("edit") == 1)["key"].split(":", 1)[1].split("-")[0]
    first_colour = records[int(first)]["image"]
    in_scope = sum(r["m_loc"] == first_colour for r in records)
    assert in_scope == 1
    c1, last = s["curve"]
    assert c1["n_out_of_scope_m_locality"] == len(records) - in_scope
    assert c1["metrics"][OUT_OF_SCOPE_M_LOCALITY] == 1.0  # a null edit changes nothing
    assert last["n_out_of_scope_m_locality"] == 0 and OUT_OF_SCOPE_M_LOCALITY not in last["metrics"]
    assert s["n_out_of_scope_m_locality"] == 0


def test_sequential_summary_and_report_show_out_of_scope_m_locality(tmp_path, one_thread):
    f = write_toy_mmedit(tmp_path, n=4)  # probes ask "what shape ...", which no edit asks
    cfg = RunConfig(model="tiny-llava", data=str(f), method="null", setting="sequential", k=2)
    s = Run(cfg, tmp_path / "seq", adapter=tiny_llava(seed=0)).execute()
    assert s["n_out_of_scope_m_locality"] == 4 and s["metrics"][OUT_OF_SCOPE_M_LOCALITY] == 1.0
    again = Run(cfg, tmp_path / "seq", adapter=tiny_llava(seed=0)).execute()  # nothing left to do
    assert again["metrics"] == s["metrics"]
    # the wall time is every invocation's, not the last one's
    assert again["timing"]["invocations"] == 2 and again["timing"]["total_s"] > s["timing"]["total_s"]
    s["_dir"] = str(tmp_path / "seq")
    text = render([s])
    assert "M-Loc out of scope" in text and "4 out of scope" in text
    one = Run(RunConfig(model="tiny-llava", data=str(f), method="null", limit=2), tmp_path / "one",
              adapter=tiny_llava(seed=0)).execute()
    assert "n_out_of_scope_m_locality" not in one  # one edit at a time: nothing else in place
    assert "out of scope" not in render([{**one, "_dir": str(tmp_path / "one")}])


def test_compare_pairs_out_of_scope_m_locality_over_cases_out_of_scope_in_both(tmp_path, one_thread):
    """`mmke compare` of two sequential runs adds the out-of-scope M-Loc row over the cases whose
    probe is out of scope in both runs; a one-step run has no such row to pair."""
    from mmke.eval.report import compare

    f = write_toy_mmedit(tmp_path, n=len(COLOURS))
    records = json.loads(f.read_text())
    for r in records[::2]:  # the edit's own question about its own image: in scope in any group
        r["m_loc"], r["m_loc_q"] = r["image"], r["rephrase"]
    f.write_text(json.dumps(records))
    n_free = len(records[1::2])
    for out in ("a", "b"):
        cfg = RunConfig(model="tiny-llava", data=str(f), method="null", setting="sequential", k=2)
        s = Run(cfg, tmp_path / out, adapter=tiny_llava(seed=0)).execute()
        assert s["n_out_of_scope_m_locality"] == n_free
    c = compare(tmp_path / "a", tmp_path / "b")
    assert c["rows"][OUT_OF_SCOPE_M_LOCALITY]["n"] == n_free and c["rows"][OUT_OF_SCOPE_M_LOCALITY]["diff"] == 0.0
    Run(RunConfig(model="tiny-llava", data=str(f), method="null"), tmp_path / "one",
        adapter=tiny_llava(seed=0)).execute()
    assert OUT_OF_SCOPE_M_LOCALITY not in compare(tmp_path / "a", tmp_path / "one")["rows"]


def test_contradictions_count_pairs_repeats_and_retention_bounds():
    """Edits of one (content, question) pair: a repeat with the same target, one with another;
    an editor with perfect generality within the pair keeps at most the latest or the commonest."""
    from mmke.eval.scope import contradictions

    def e(image, image_rephrase, alt, src="what color is it?"):
        return {**rec(image, image_rephrase, src, src, "z.png", "what size?"), "alt": alt}

    stream = [e("a.png", "a2.png", "red"), e("a2.png", "a3.png", " Red"),  # same pair, same target
              e("a3.png", "a4.png", "blue"),  # the pair again (a3 ~ a2 ~ a), another target
              e("b.png", "b2.png", "red"),  # another pair
              e("a.png", "a2.png", "red", src="what shape is it?")]  # another question class
    first, last = contradictions(stream, [2, 5])
    assert first == {"n_edits": 2, "classes": 1, "same_target": 1, "contradicting": 0,
                     "latest_wins": 1.0, "best_consistent": 1.0}
    assert (last["classes"], last["same_target"], last["contradicting"]) == (3, 1, 1)
    assert last["latest_wins"] == 3 / 5 and last["best_consistent"] == 4 / 5


def test_image_class_labels_replace_the_rephrase_links():
    """With labels (e.g. easy-vqa's colour and shape), images of one label are one content class
    whether or not any record links them."""
    a = rec("red-1.png", "red-2.png", "what color is it?", "what colour is it?", "red-9.png", "what color is it?")
    assert EditScope([a]).probe_key(a) not in EditScope([a]).covered([a])  # red-9 is linked to nothing
    labelled = EditScope([a], image_class=lambda path: path.split("-")[0])
    assert labelled.probe_key(a) in labelled.covered([a])


def test_one_target_per_pair_gives_later_edits_of_a_pair_its_first_target(tmp_path):
    from mmke.eval.scope import contradictions, one_target_per_pair

    def e(image, image_rephrase, alt, src="what color is it?"):
        return {**rec(image, image_rephrase, src, src, "z.png", "what size?"), "alt": alt}

    stream = [e("a.png", "a2.png", "red"), e("a2.png", "a3.png", " Red"), e("a3.png", "a4.png", "blue"),
              e("b.png", "b2.png", "green"), e("a.png", "a2.png", "blue", src="what shape is it?")]
    out, changed = one_target_per_pair(stream)
    assert changed == 1 and [r["alt"] for r in out] == ["red", " Red", "red", "green", "blue"]
    assert stream[2]["alt"] == "blue"  # the input is not changed
    assert contradictions(out, [5])[0]["contradicting"] == 0
    records = colour_records(tmp_path, n=6)
    records[4] = dataclasses.replace(records[4], alt="red")  # records[1] asked it of blue first
    out, changed = one_target_per_pair(records)
    assert changed == 1 and out[4].alt == "blue" and out[4].image_path == records[4].image_path


def test_targets_one_per_pair_runs_a_stream_that_never_contradicts_itself(tmp_path, one_thread):
    """Records i and i + 6 of the toy file edit one pair; the later ones get another target. With
    --targets one-per-pair every second edit of a pair takes its first target, the summary counts
    them, the report tells the two runs apart, and one-step refuses the option."""
    import pytest

    from mmke.eval.runner import run_stream
    from mmke.eval.scope import contradictions

    f = write_toy_mmedit(tmp_path, n=12)
    records = json.loads(f.read_text())
    names = list(COLOURS)
    for i, r in enumerate(records[6:]):
        r["alt"] = names[(i + 1) % len(names)]
    f.write_text(json.dumps(records))
    summaries = []
    for targets in ("as-drawn", "one-per-pair"):
        cfg = RunConfig(model="tiny-llava", data=str(f), method="null", setting="lifelong", k=12,
                        checkpoints=(6,), probes=2, targets=targets)
        s = Run(cfg, tmp_path / targets, adapter=tiny_llava(seed=0)).execute()
        _, cases = run_stream(tmp_path / targets)
        conflicts = contradictions([c.record for c in cases], [12])[0]
        summaries.append({**s, "_dir": str(tmp_path / targets)})
        if targets == "as-drawn":
            assert conflicts["contradicting"] == 6 and "n_retargeted" not in s
        else:
            assert conflicts["contradicting"] == 0 and s["n_retargeted"] == 6
            assert "first target" in s["protocol"]
    text = render(summaries)
    assert "targets=as-drawn" in text and "targets=one-per-pair" in text
    with pytest.raises(ValueError, match="one-per-pair is for a stream"):
        RunConfig(model="tiny-llava", data=str(f), method="null", targets="one-per-pair")
    # the targets are part of a run's identity; a run.json written before the option is as-drawn
    from mmke.eval.runner import check_same_run

    run = json.loads((tmp_path / "as-drawn" / "run.json").read_text())
    with pytest.raises(ValueError, match="differs in: targets"):
        check_same_run(tmp_path, run, {**run, "config": {**run["config"], "targets": "one-per-pair"}})
    legacy = {k: v for k, v in run["config"].items() if k != "targets"}
    check_same_run(tmp_path, {**run, "config": legacy}, run)


def test_compare_pairs_two_lifelong_runs_at_a_checkpoint(tmp_path, one_thread):
    """Lifelong rows carry the edit metrics (edits so far) or the locality ones (probes) per
    checkpoint: `mmke compare` pairs them at one checkpoint, metric by metric, and refuses to pair a
    lifelong run with a sequential one."""
    import pytest

    from mmke.eval.report import compare, render_compare

    f = write_toy_mmedit(tmp_path, n=6)
    for out in ("a", "b"):
        cfg = RunConfig(model="tiny-llava", data=str(f), method="null", setting="lifelong", k=6,
                        checkpoints=(2,), probes=3)
        Run(cfg, tmp_path / out, adapter=tiny_llava(seed=0)).execute()
    c = compare(tmp_path / "a", tmp_path / "b")
    assert c["checkpoint"] == 6 and c["rows"]["reliability"]["n"] == 6 and c["rows"]["m_locality"]["n"] == 3
    assert all(r["diff"] == 0.0 for r in c["rows"].values()) and c["rows"]["mean"]["p_value"] is None
    assert OUT_OF_SCOPE_M_LOCALITY in c["rows"]  # the probes ask "what shape", which no edit asks
    early = compare(tmp_path / "a", tmp_path / "b", checkpoint=2)
    assert early["rows"]["reliability"]["n"] == 2 and "after 2 edits" in render_compare(early)
    with pytest.raises(ValueError, match="checkpoints both runs reached are 2, 6"):
        compare(tmp_path / "a", tmp_path / "b", checkpoint=3)
    Run(RunConfig(model="tiny-llava", data=str(f), method="null", setting="sequential", k=2), tmp_path / "seq",
        adapter=tiny_llava(seed=0)).execute()
    with pytest.raises(ValueError, match="lifelong run: it pairs only with another lifelong run"):
        compare(tmp_path / "a", tmp_path / "seq")
