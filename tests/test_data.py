"""MMEdit loader validation, the easy-VQA question canonicaliser and the bundled-benchmark builder."""

import json
import logging
import random

import pytest
from PIL import Image

from mmke.data import build as build_mod
from mmke.data import easyvqa_source as ev
from mmke.data import schema
from mmke.data.build import build_benchmark, canonicalise, paraphrase, surface_forms
from mmke.data.schema import DataError, load_records
from mmke.data.textfacts import capital_questions
from mmke.models.default import COLOURS, SHAPES

FIELDS = dict(src="what color is the shape?", alt="teal", rephrase="what is the color of the shape?",
              image="a.png", image_rephrase="b.png", loc="nq question: what is the capital of france?",
              loc_ans="paris", m_loc="c.png", m_loc_q="what shape is present?", m_loc_a="circle")
BUILT_FILES = ("vqa_eval.json", "caption_eval.json", "vqa_train.json", "caption_train.json")


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
    """load_records(f) raises a DataError for (index, field) whose message names all three."""
    with pytest.raises(DataError) as e:
        load_records(f, **kw)
    err = e.value
    assert (err.index, err.field) == (index, field), str(err)
    msg = str(err)
    assert msg.startswith(f"{f}: ") and err.file == str(f) and match in msg and match in err.problem
    if index is not None:
        assert f"record {index}" in msg
    if field is not None:
        assert f"field '{field}'" in msg
    if index is not None and field is not None:
        assert msg == f"{f}: record {index}: field '{field}': {err.problem}"
    return err


# ---- loader: valid files ---------------------------------------------------------------------
def test_valid_file_loads_with_extra_fields(root):
    f = write(root, [FIELDS, dict(FIELDS, pred="blue", port_new=[{"q": 1}], knowledge_type="entity")])
    res = load_records(f)
    assert len(res.records) == 2 and res.skipped == [] and res.path == f
    r0, r1 = res.records
    assert r0.pred is None and r0.extra == {} and r0.index == 0
    assert r1.pred == "blue" and r1.index == 1
    assert r1.extra == {"port_new": [{"q": 1}], "knowledge_type": "entity"}
    assert r1.image_path == (root / "a.png").resolve() and r1.image_path.is_absolute()
    assert r1.image_rephrase_path == (root / "b.png").resolve()
    assert r1.m_loc_path == (root / "c.png").resolve()
    assert r1.to_dict() == dict(FIELDS, pred="blue", port_new=[{"q": 1}], knowledge_type="entity")
    assert r0.to_dict() == FIELDS


def test_json_lines_detected_by_content(root):
    lines = json.dumps(FIELDS) + "\n\n" + json.dumps(dict(FIELDS, alt="red")) + "\n"
    for name in ("d.jsonl", "d.json"):
        f = root / name
        f.write_text(lines)
        res = load_records(f)
        assert [(r.index, r.alt) for r in res.records] == [(0, "teal"), (1, "red")]
    f = root / "one.jsonl"  # a single record on one line
    f.write_text(json.dumps(FIELDS) + "\n")
    assert len(load_records(f).records) == 1
    f = root / "list.jsonl"  # a JSON list with a .jsonl name
    f.write_text(json.dumps([FIELDS, FIELDS], indent=2))
    assert len(load_records(f).records) == 2


def test_image_verification_is_cached_per_path(root, monkeypatch):
    opened = []
    real_open = schema.Image.open
    monkeypatch.setattr(schema.Image, "open", lambda p, *a, **k: opened.append(p) or real_open(p, *a, **k))
    load_records(write(root, [FIELDS] * 5))
    assert sorted(p.name for p in opened) == ["a.png", "b.png", "c.png"]


def test_check_images_false_skips_opening_but_still_confines(root):
    f = write(root, [dict(FIELDS, image="not_there.png")])
    assert load_records(f, check_images=False).records[0].image_path == (root / "not_there.png").resolve()
    expect_error(write(root, [dict(FIELDS, image="../x.png")]), 0, "image", "image root", check_images=False)


# ---- loader: record errors ---------------------------------------------------------------------
@pytest.mark.parametrize("field", ["src", "alt", "rephrase", "image", "image_rephrase", "loc",
                                   "loc_ans", "m_loc", "m_loc_q", "m_loc_a"])
def test_missing_field_names_record_and_field(root, field):
    bad = {k: v for k, v in FIELDS.items() if k != field}
    expect_error(write(root, [FIELDS, bad]), 1, field, "missing")


@pytest.mark.parametrize("value,got", [(3, "int"), (["teal"], "list"), ({"a": 1}, "dict"), (True, "bool")])
def test_mistyped_field(root, value, got):
    expect_error(write(root, [FIELDS, FIELDS, dict(FIELDS, alt=value)]), 2, "alt", f"expected a string, got {got}")


@pytest.mark.parametrize("field", ["src", "loc_ans", "m_loc"])
def test_null_field(root, field):
    expect_error(write(root, [dict(FIELDS, **{field: None})]), 0, field, "expected a string, got null")


def test_optional_pred_may_be_null_but_not_mistyped(root):
    assert load_records(write(root, [dict(FIELDS, pred=None)])).records[0].pred is None
    expect_error(write(root, [dict(FIELDS, pred=["x"])]), 0, "pred", "expected a string")


@pytest.mark.parametrize("value", ["", "  ", "\n\t"])
def test_empty_target(root, value):
    expect_error(write(root, [FIELDS, dict(FIELDS, alt=value)]), 1, "alt", "empty target")


def test_empty_src(root):
    expect_error(write(root, [dict(FIELDS, src=" ")]), 0, "src", "empty")


def test_record_not_an_object(root):
    expect_error(write(root, [FIELDS, ["a", "list"]]), 1, None, "expected a JSON object")


@pytest.mark.parametrize("field", ["image", "image_rephrase", "m_loc"])
def test_missing_image_file(root, field):
    expect_error(write(root, [FIELDS, dict(FIELDS, **{field: "nope.png"})]), 1, field, "image file not found")


@pytest.mark.parametrize("content", [b"\x89PNG not really", b"", b"hello, I am text"])
def test_unreadable_image(root, content):
    (root / "broken.png").write_bytes(content)
    expect_error(write(root, [dict(FIELDS, image_rephrase="broken.png")]), 0, "image_rephrase", "unreadable")


def test_corrupt_png_body(root):
    data = bytearray((root / "a.png").read_bytes())
    data[40:60] = b"\x00" * 20  # damage the chunk data: the CRC no longer matches
    (root / "bad.png").write_bytes(bytes(data))
    expect_error(write(root, [dict(FIELDS, m_loc="bad.png")]), 0, "m_loc", "unreadable")


def test_image_path_that_is_a_folder(root):
    (root / "folder").mkdir()
    expect_error(write(root, [dict(FIELDS, image="folder")]), 0, "image", "not found")


@pytest.mark.parametrize("field", ["image", "image_rephrase", "m_loc"])
@pytest.mark.parametrize("path", ["../a.png", "x/../../a.png", "/etc/passwd", "", "a\x00.png"])
def test_image_path_may_not_leave_root(root, field, path):
    sub = root / "sub"
    sub.mkdir()
    for n in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (8, 8)).save(sub / n)
    expect_error(write(root, [dict(FIELDS, **{field: path})]), 0, field, "image root", image_root=sub)


def test_symlink_out_of_root_is_refused(root, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside") / "secret.png"
    Image.new("RGB", (8, 8)).save(outside)
    (root / "link.png").symlink_to(outside)
    expect_error(write(root, [dict(FIELDS, image="link.png")]), 0, "image", "image root")


def test_dotdot_inside_root_is_fine(root):
    (root / "x").mkdir()
    assert load_records(write(root, [dict(FIELDS, image="x/../a.png")])).records[0].image_path == (root / "a.png").resolve()


# ---- loader: file-level errors -----------------------------------------------------------------
@pytest.mark.parametrize("text,match", [
    ("", "empty file"), ("  \n\n", "empty file"), ("[]", "empty list"),
    ("[{\"src\": ", "invalid JSON"), ("{oops", "invalid JSON"),
    ("\"just a string\"", "expected a JSON list"), ("42", "expected a JSON list"),
    ("{\n  \"src\": \"a pretty-printed single object\"\n}", "expected a JSON list"),
])
def test_file_level_errors(root, text, match):
    f = root / "x.json"
    f.write_text(text)
    err = expect_error(f, None, None, match)
    assert str(err) == f"{f}: {err.problem}"


def test_missing_file_and_non_utf8(root):
    expect_error(root / "absent.json", None, None, "file not found")
    f = root / "latin1.json"
    f.write_bytes(b"[\xff\xfe]")
    expect_error(f, None, None, "not UTF-8")


def test_bad_json_lines_line_is_a_record_error(root):
    f = root / "d.jsonl"
    f.write_text(json.dumps(FIELDS) + "\n\n{oops\n" + json.dumps(FIELDS) + "\n")
    expect_error(f, 1, None, "invalid JSON Lines record")
    res = load_records(f, skip_invalid=True)
    assert [r.index for r in res.records] == [0, 2] and [e.index for e in res.skipped] == [1]


# ---- loader: skip_invalid and image roots ---------------------------------------------------------
def test_skip_invalid_counts_logs_and_reports(root, caplog):
    f = write(root, [FIELDS, dict(FIELDS, alt=""), {"src": "x"}, FIELDS, "not an object",
                     dict(FIELDS, image="gone.png")])
    with caplog.at_level(logging.WARNING, logger="mmke.data.schema"):
        res = load_records(f, skip_invalid=True)
    assert [r.index for r in res.records] == [0, 3]
    assert [(e.index, e.field) for e in res.skipped] == [(1, "alt"), (2, "alt"), (4, None), (5, "image")]
    assert all(isinstance(e, DataError) for e in res.skipped)
    logged = caplog.text
    assert all(str(e) in logged for e in res.skipped) and "skipped 4 invalid record(s) of 6" in logged
    expect_error(f, 1, "alt", "empty target")  # without skip_invalid the first error raises


def test_file_level_errors_raise_even_with_skip_invalid(root):
    f = root / "x.json"
    f.write_text("[]")
    with pytest.raises(DataError):
        load_records(f, skip_invalid=True)


def test_rephrase_image_root_defaults_to_image_root_and_is_honoured(root, tmp_path_factory):
    images = tmp_path_factory.mktemp("images")
    for n in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (8, 8)).save(images / n)
    f = write(root, [dict(FIELDS, image_rephrase="only_there.png")])
    expect_error(f, 0, "image_rephrase", "not found", image_root=images)  # defaults to image_root
    other = tmp_path_factory.mktemp("rephrased")
    Image.new("RGB", (8, 8)).save(other / "only_there.png")
    r = load_records(f, image_root=images, rephrase_image_root=other).records[0]
    assert r.image_rephrase_path == (other / "only_there.png").resolve()
    assert r.image_path == (images / "a.png").resolve() and r.m_loc_path == (images / "c.png").resolve()
    r = load_records(write(root, [FIELDS]), image_root=images).records[0]
    assert r.image_rephrase_path == (images / "b.png").resolve()


# ---- canonicaliser ------------------------------------------------------------------------------
@pytest.mark.parametrize("question,meaning", [
    ("is there a red shape?", ("contains", "red")),
    ("is there a red shape in the image?", ("contains", "red")),
    ("does the image contain a red shape?", ("contains", "red")),
    ("is a red shape present?", ("contains", "red")),
    ("is there a circle?", ("contains", "circle")),
    ("is there not a teal shape?", ("not_contains", "teal")),
    ("does the image not contain a triangle?", ("not_contains", "triangle")),
    ("is no gray shape present?", ("not_contains", "gray")),
    ("what color is the shape?", ("color", None)),
    ("what is the color of the shape?", ("color", None)),
    ("what color is the triangle?", ("color", "triangle")),
    ("what is the color of the triangle?", ("color", "triangle")),
    ("what shape is in the image?", ("shape", None)),
    ("what shape does the image contain?", ("shape", None)),
    ("what shape is present?", ("shape", None)),
    ("what is the blue shape?", ("shape", "blue")),
])
def test_canonicalise_examples(question, meaning):
    assert canonicalise(question) == meaning


@pytest.mark.parametrize("question", ["is there a red?", "is there a circle shape?", "what is the circle shape?",
                                      "how many shapes are there?", "is there a purple shape?"])
def test_canonicalise_rejects_other_questions(question):
    with pytest.raises(ValueError, match="not an easy-VQA question"):
        canonicalise(question)


def test_every_easyvqa_question_canonicalises_and_has_a_paraphrase():
    questions = {q for sp in ev.SPLITS for q, _, _ in ev.questions(sp)}
    assert len(questions) > 100
    meanings = {canonicalise(q) for q in questions}
    assert len(meanings) == 2 * len(COLOURS + SHAPES) + 2 + len(SHAPES) + len(COLOURS)
    rng = random.Random(0)
    for q in questions:
        p = paraphrase(q, rng)
        assert p != q and canonicalise(p) == canonicalise(q)
    assert surface_forms(("shape", "blue")) == ["what is the blue shape?", "which shape is blue?"]


def test_same_meaning_same_answer_in_easyvqa():
    """The premise of T-Generality: on one image, questions with one meaning have one answer."""
    answers: dict = {}
    for q, a, i in ev.questions("train"):
        answers.setdefault((i, canonicalise(q)), set()).add(a)
    assert all(len(v) == 1 for v in answers.values())


def test_capital_facts():
    facts = capital_questions()
    assert len(facts) > 150 and facts == sorted(set(facts))
    d = dict(facts)
    assert d["nq question: what is the capital of france?"] == "paris"
    assert all(q.startswith("nq question: what is the capital of ") and a and a == a.lower() for q, a in facts)


# ---- builder ------------------------------------------------------------------------------------
def fake_predictions():
    """Every 7th test question and every 7th labelled test image wrong (predicted "no" / "a red circle")."""
    qs = ev.questions("test")
    return {"weights": "fake-digest",
            "test_questions": [[0 if k % 7 == 0 else 1, "no"] for k in range(len(qs))],
            "test_captions": {str(i): [0 if i % 7 == 0 else 1, "a red circle"] for i in ev.image_labels("test")}}


SMALL = dict(predictions=fake_predictions(), n_train_vqa=60, n_train_caption=30, n_eval=40)


def image_id(rel: str) -> int:
    return int(rel.rsplit("/", 1)[1].removesuffix(".png"))


def labels_of(rel: str) -> tuple[str, str]:
    split = rel.split("/")[1]
    return ev.image_labels(split)[image_id(rel)]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    manifest = build_benchmark(out, seed=3, **SMALL)
    return out, manifest


def test_builder_is_deterministic_per_seed(built, tmp_path):
    out, _ = built
    build_benchmark(tmp_path / "again", seed=3, **SMALL)
    build_benchmark(tmp_path / "other", seed=4, **SMALL)
    for name in BUILT_FILES + ("manifest.json",):
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    for name in BUILT_FILES:
        assert (out / name).read_bytes() != (tmp_path / "other" / name).read_bytes(), name


def test_other_seed_changes_order_even_with_all_cases(tmp_path):
    kw = dict(SMALL, n_eval=None, n_train_vqa=5, n_train_caption=5)
    a = build_benchmark(tmp_path / "a", seed=0, **kw)
    b = build_benchmark(tmp_path / "b", seed=1, **kw)
    assert a["counts"] == b["counts"]
    ra = json.loads((tmp_path / "a" / "caption_eval.json").read_text())
    rb = json.loads((tmp_path / "b" / "caption_eval.json").read_text())
    assert sorted(r["image"] for r in ra) == sorted(r["image"] for r in rb)  # same selection (all)
    assert [r["image"] for r in ra] != [r["image"] for r in rb]  # another order


def test_manifest(built):
    out, m = built
    assert json.loads((out / "manifest.json").read_text()) == m
    assert m["seed"] == 3 and m["counterfactual"] is False and m["weights"] == "fake-digest"
    assert m["counts"] == {"vqa_eval": 40, "caption_eval": 40, "vqa_train": 60, "caption_train": 30}
    assert m["candidates"]["vqa_eval"] > 40 and "easy-vqa" in m["source"] and "countryinfo" in m["text_facts"]
    assert m["warnings"] == []


def test_loader_accepts_built_files(built):
    out, m = built
    for name in BUILT_FILES:
        res = load_records(out / name, image_root=out)
        assert res.skipped == [] and len(res.records) == m["counts"][name[:-5]]
        assert all(r.image.startswith("images/test/" if "eval" in name else "images/train/") for r in res.records)
        assert all((r.pred is not None) == ("eval" in name) for r in res.records)
    assert len(load_records(out / "vqa_eval.json").records) == 40  # image_root defaults to out


def test_vqa_eval_records(built):
    out, _ = built
    questions = ev.questions("test")
    wrong = {(questions[k][0], questions[k][2]): questions[k][1] for k in range(0, len(questions), 7)}
    facts = dict(capital_questions())
    recs = load_records(out / "vqa_eval.json", out).records
    assert len({(r.src, r.image) for r in recs}) == len(recs)
    for r in recs:
        assert wrong[(r.src, image_id(r.image))] == r.alt  # a wrong case, with the true answer as target
        assert r.pred == "no"
        assert r.rephrase != r.src and canonicalise(r.rephrase) == canonicalise(r.src)
        assert r.image_rephrase != r.image and labels_of(r.image_rephrase) == labels_of(r.image)
        (c, s), (mc, ms) = labels_of(r.image), labels_of(r.m_loc)
        assert mc != c and ms != s
        assert (r.m_loc_q, r.m_loc_a, image_id(r.m_loc)) in set(questions)
        assert facts[r.loc] == r.loc_ans


def test_caption_eval_records(built):
    out, _ = built
    recs = load_records(out / "caption_eval.json", out).records
    for r in recs:
        assert image_id(r.image) % 7 == 0 and r.pred == "a red circle"
        assert r.src == ev.CAPTION_PROMPTS[0] and r.rephrase in ev.CAPTION_PROMPTS[1:]
        assert r.alt == ev.caption(*labels_of(r.image))
        assert r.image_rephrase != r.image and labels_of(r.image_rephrase) == labels_of(r.image)
        (c, s), (mc, ms) = labels_of(r.image), labels_of(r.m_loc)
        assert mc != c and ms != s


def test_train_records(built):
    out, _ = built
    truth = {(q, i): a for q, a, i in ev.questions("train")}
    for r in load_records(out / "vqa_train.json", out).records:
        assert truth[(r.src, image_id(r.image))] == r.alt and r.pred is None
        assert canonicalise(r.rephrase) == canonicalise(r.src) and r.rephrase != r.src
    for r in load_records(out / "caption_train.json", out).records:
        assert r.alt == ev.caption(*labels_of(r.image)) and r.src != r.rephrase
        assert {r.src, r.rephrase} <= set(ev.CAPTION_PROMPTS)


def test_only_used_images_are_copied(built):
    out, _ = built
    used = {rel for name in BUILT_FILES for r in json.loads((out / name).read_text())
            for rel in (r["image"], r["image_rephrase"], r["m_loc"])}
    copied = {p.relative_to(out).as_posix() for p in (out / "images").rglob("*") if p.is_file()}
    assert copied == used
    some = sorted(used)[0]
    assert (out / some).read_bytes() == ev.image_path(some.split("/")[1], image_id(some)).read_bytes()


def test_counterfactual(tmp_path):
    out = tmp_path / "cf"
    m = build_benchmark(out, seed=0, **dict(SMALL, n_eval=30), counterfactual=True)
    assert m["counterfactual"] is True and "right" in m["eval_cases"]
    truth = {(q, i): a for q, a, i in ev.questions("test")}
    qs = ev.questions("test")
    right = {(qs[k][0], qs[k][2]) for k in range(len(qs)) if k % 7 != 0}
    for r in load_records(out / "vqa_eval.json", out).records:
        true = truth[(r.src, image_id(r.image))]
        assert (r.src, image_id(r.image)) in right and r.alt != true
        assert (true in COLOURS) == (r.alt in COLOURS) and (true in SHAPES) == (r.alt in SHAPES)
        assert canonicalise(r.rephrase) == canonicalise(r.src) and labels_of(r.image_rephrase) == labels_of(r.image)
    for r in load_records(out / "caption_eval.json", out).records:
        c, s = labels_of(r.image)
        assert image_id(r.image) % 7 != 0 and r.alt != ev.caption(c, s)
        words = r.alt.split()
        assert (words[1] == c) != (words[2] == s)  # exactly one of colour / shape changed
    truth_train = {(q, i): a for q, a, i in ev.questions("train")}
    assert all(r.alt != truth_train[(r.src, image_id(r.image))]
               for r in load_records(out / "vqa_train.json", out).records)


def test_few_cases_are_warned_and_reported(tmp_path, caplog):
    preds = fake_predictions()
    preds["test_captions"] = {k: [1 if int(k) % 100 else 0, "x"] for k in preds["test_captions"]}
    with caplog.at_level(logging.WARNING, logger="mmke.data.build"):
        m = build_benchmark(tmp_path / "b", seed=0, predictions=preds, n_train_vqa=5, n_train_caption=5, n_eval=5)
    assert m["candidates"]["caption_eval"] < 50 and m["counts"]["caption_eval"] <= 5
    assert any("caption_eval" in w for w in m["warnings"]) and "caption_eval: only" in caplog.text


def test_builder_writes_only_inside_out_dir(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = tmp_path / "inside" / "bench"
    build_benchmark(out, seed=1, **dict(SMALL, n_eval=5, n_train_vqa=5, n_train_caption=5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "inside"]
    assert list(cwd.iterdir()) == [] and [p.name for p in (tmp_path / "inside").iterdir()] == ["bench"]
    assert sorted(p.name for p in out.iterdir()) == sorted(BUILT_FILES + ("images", "manifest.json"))


def test_predictions_are_checked(tmp_path, monkeypatch):
    bad = dict(fake_predictions(), test_questions=[[0, "no"]] * 3)
    with pytest.raises(ValueError, match="one \\[ok, pred\\] per easy-VQA test question"):
        build_benchmark(tmp_path / "b", predictions=bad)
    monkeypatch.setattr(build_mod, "ASSETS", tmp_path / "no-assets")
    with pytest.raises(FileNotFoundError, match="mmke train base"):
        build_benchmark(tmp_path / "b")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("kw", [{"n_eval": 0}, {"n_train_vqa": -1}, {"n_train_caption": 2.5}])
def test_sizes_are_checked(tmp_path, kw):
    with pytest.raises(ValueError, match="positive integer"):
        build_benchmark(tmp_path / "b", predictions=fake_predictions(), **kw)


def test_partly_right_answers_are_not_edit_cases(tmp_path):
    """With token accuracies in the predictions, a wrong answer with some right tokens is left out,
    so pre-edit reliability of E-VQA-lite is 0 by construction."""
    preds = fake_predictions()
    n = len(preds["test_questions"])
    preds["test_questions_token_acc"] = [0.5 if k % 14 == 0 else 0.0 for k in range(n)]
    build_benchmark(tmp_path / "b", predictions=preds, n_train_vqa=5, n_train_caption=5)
    qs = ev.questions("test")
    half_right = {(qs[k][0], qs[k][2]) for k in range(0, n, 14)}
    recs = load_records(tmp_path / "b" / "vqa_eval.json", tmp_path / "b").records
    assert recs and not any((r.src, image_id(r.image)) in half_right for r in recs)
