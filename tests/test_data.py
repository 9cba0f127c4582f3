"""MMEdit loader validation and the bundled-benchmark builder."""

import json
import random

import pytest
from PIL import Image

from mmke.data import easyvqa_source as ev
from mmke.data.build import build_benchmark, meaning, paraphrase
from mmke.data.schema import DataError, load_records

FIELDS = dict(src="what color is the shape?", alt="teal", rephrase="what is the color of the shape?",
              image="a.png", image_rephrase="b.png", loc="nq question: capital of france?",
              loc_ans="paris", m_loc="c.png", m_loc_q="what shape is present?", m_loc_a="circle")


@pytest.fixture
def root(tmp_path):
    for n in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (8, 8), (0, 128, 128)).save(tmp_path / n)
    return tmp_path


def write(root, records, name="d.json"):
    f = root / name
    f.write_text(json.dumps(records))
    return f


def expect_error(f, index, field, match, **kw):
    with pytest.raises(DataError) as e:
        load_records(f, **kw)
    err = e.value
    assert err.index == index and err.field == field, str(err)
    msg = str(err)
    assert str(f) in msg and match in msg
    if index is not None:
        assert f"record {index}" in msg
    if field is not None:
        assert f"field '{field}'" in msg
    return err


def test_valid_file_loads_with_extra_fields(root):
    f = write(root, [FIELDS, dict(FIELDS, pred="blue", port_new=[{"q": 1}])])
    res = load_records(f)
    assert len(res.records) == 2 and res.skipped == []
    r = res.records[1]
    assert r.pred == "blue" and r.extra == {"port_new": [{"q": 1}]} and r.index == 1
    assert r.image_path == (root / "a.png").resolve()
    assert r.to_dict()["port_new"] == [{"q": 1}]


@pytest.mark.parametrize("field", ["src", "alt", "rephrase", "image", "image_rephrase", "loc",
                                   "loc_ans", "m_loc", "m_loc_q", "m_loc_a"])
def test_missing_field_names_record_and_field(root, field):
    bad = {k: v for k, v in FIELDS.items() if k != field}
    expect_error(write(root, [FIELDS, bad]), 1, field, "missing")


@pytest.mark.parametrize("value", [3, ["teal"], None, {"a": 1}])
def test_mistyped_field(root, value):
    expect_error(write(root, [FIELDS, FIELDS, dict(FIELDS, alt=value)]), 2, "alt", "expected a string")


def test_empty_target(root):
    expect_error(write(root, [dict(FIELDS, alt="  ")]), 0, "alt", "empty target")


def test_missing_image(root):
    expect_error(write(root, [FIELDS, dict(FIELDS, m_loc="nope.png")]), 1, "m_loc", "not found")


def test_unreadable_image(root):
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    expect_error(write(root, [dict(FIELDS, image_rephrase="broken.png")]), 0, "image_rephrase", "unreadable")


@pytest.mark.parametrize("path", ["../a.png", "/etc/passwd"])
def test_image_path_may_not_leave_root(root, path):
    sub = root / "sub"
    sub.mkdir()
    expect_error(write(root, [dict(FIELDS, image=path)]), 0, "image", "leaves the image root", image_root=sub)


def test_invalid_json_and_non_list(root):
    f = root / "x.json"
    f.write_text("[{\"src\": ")
    expect_error(f, None, None, "invalid JSON")
    f.write_text("\"just a string\"")
    expect_error(f, None, None, "expected a JSON list")
    f.write_text("")
    expect_error(f, None, None, "empty file")
    f.write_text("[]")
    expect_error(f, None, None, "no records")


def test_json_lines_and_bad_line(root):
    f = root / "d.jsonl"
    f.write_text(json.dumps(FIELDS) + "\n" + json.dumps(dict(FIELDS, alt="red")) + "\n")
    assert [r.alt for r in load_records(f).records] == ["teal", "red"]
    f.write_text(json.dumps(FIELDS) + "\n{oops\n" + json.dumps(FIELDS) + "\n")
    expect_error(f, 1, None, "invalid JSON Lines record")


def test_skip_invalid_counts_and_reports(root):
    f = write(root, [FIELDS, dict(FIELDS, alt=""), {"src": "x"}, FIELDS, "not an object"])
    res = load_records(f, skip_invalid=True)
    assert [r.index for r in res.records] == [0, 3]
    assert [(e.index, e.field) for e in res.skipped] == [(1, "alt"), (2, "alt"), (4, None)]


def test_rephrase_image_root(root, tmp_path_factory):
    other = tmp_path_factory.mktemp("rephrased")
    f = write(root, [dict(FIELDS, image_rephrase="only_there.png")])
    expect_error(f, 0, "image_rephrase", "not found")  # defaults to image_root
    Image.new("RGB", (8, 8)).save(other / "only_there.png")
    r = load_records(f, rephrase_image_root=other).records[0]
    assert r.image_rephrase_path == (other / "only_there.png").resolve()
    assert r.image_path == (root / "a.png").resolve()


# ---- builder -----------------------------------------------------------------------------
def fake_predictions():
    qs = ev.questions("test")
    return {"weights": "fake",
            "test_questions": [[0 if k % 7 == 0 else 1, "no"] for k in range(len(qs))],
            "test_captions": {str(i): [0 if i % 5 == 0 else 1, "a red circle"] for i in ev.image_labels("test")}}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    build_benchmark(out, seed=3, predictions=fake_predictions(), n_train_vqa=60, n_train_caption=30, n_eval=40)
    return out


def test_builder_is_deterministic_per_seed(built, tmp_path):
    again = tmp_path / "again"
    build_benchmark(again, seed=3, predictions=fake_predictions(), n_train_vqa=60, n_train_caption=30, n_eval=40)
    other = tmp_path / "other"
    build_benchmark(other, seed=4, predictions=fake_predictions(), n_train_vqa=60, n_train_caption=30, n_eval=40)
    for name in ("vqa_eval.json", "caption_eval.json", "vqa_train.json", "caption_train.json"):
        assert (built / name).read_bytes() == (again / name).read_bytes()
    assert (built / "vqa_eval.json").read_bytes() != (other / "vqa_eval.json").read_bytes()


def test_built_files_load_and_have_the_right_semantics(built):
    labels = ev.image_labels("test")
    wrong = {k for k in range(len(ev.questions("test"))) if k % 7 == 0}
    wrong_q = {(ev.questions("test")[k][0], ev.questions("test")[k][2]) for k in wrong}
    recs = load_records(built / "vqa_eval.json", built).records
    assert 0 < len(recs) <= 40
    lab = lambda p: labels[int(p.split("/")[-1][:-4])]  # noqa: E731
    for r in recs:
        assert (r.src, int(r.image.split("/")[-1][:-4])) in wrong_q  # the model got it wrong
        assert r.rephrase != r.src and meaning(r.rephrase) == meaning(r.src)
        assert r.image_rephrase != r.image and lab(r.image_rephrase) == lab(r.image)
        c, s = lab(r.image)
        mc, ms = lab(r.m_loc)
        assert mc != c and ms != s
        assert r.loc.startswith("nq question:") and r.loc_ans
    caps = load_records(built / "caption_eval.json", built).records
    assert caps and all(r.alt == ev.caption(*lab(r.image)) and r.src != r.rephrase for r in caps)
    assert len(load_records(built / "vqa_train.json", built).records) == 60


def test_counterfactual_targets_differ_from_truth(tmp_path):
    out = tmp_path / "cf"
    m = build_benchmark(out, seed=0, predictions=fake_predictions(), n_train_vqa=10, n_train_caption=10,
                        n_eval=30, counterfactual=True)
    assert m["counterfactual"] is True
    truth = {(q, i): a for q, a, i in ev.questions("test")}
    for r in load_records(out / "vqa_eval.json", out).records:
        assert r.alt != truth[(r.src, int(r.image.split("/")[-1][:-4]))]


def test_builder_writes_only_inside_out_dir(tmp_path):
    out = tmp_path / "inside" / "bench"
    build_benchmark(out, seed=1, predictions=fake_predictions(), n_train_vqa=5, n_train_caption=5, n_eval=5)
    assert [p.name for p in tmp_path.iterdir()] == ["inside"]
    assert [p.name for p in (tmp_path / "inside").iterdir()] == ["bench"]


def test_every_easyvqa_question_has_a_paraphrase():
    rng = random.Random(0)
    for q in {q for sp in ("train", "test") for q, _, _ in ev.questions(sp)}:
        p = paraphrase(q, rng)
        assert p != q and meaning(p) == meaning(q)
