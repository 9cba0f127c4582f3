"""MMEdit loader validation, the easy-VQA question canonicaliser, the text facts and the bundled-benchmark
builder: version 1 (the original) and version 2 (leak-free, balanced, hard M-Locality inputs)."""

import json
import logging
import random

import pytest
from PIL import Image

from mmke.data import build as build_mod
from mmke.data import build_v2 as v2
from mmke.data import easyvqa_source as ev
from mmke.data import schema, textfacts
from mmke.data.build import answer_of, build_benchmark, canonicalise, paraphrase, surface_forms
from mmke.data.bundled import default_benchmark_dir
from mmke.data.leaks import check_benchmark_dir, find_leaks, image_digest, input_keys
from mmke.data.schema import DataError, is_hard_m_loc, load_records, norm_text
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
@pytest.mark.parametrize("path,rule", [("../a.png", "climbs out"), ("x/../../a.png", "climbs out"),
                                       ("/etc/passwd", "absolute path"), ("", "empty image path"),
                                       ("a\x00.png", "NUL")])
def test_image_path_may_not_leave_root(root, field, path, rule):
    sub = root / "sub"
    sub.mkdir()
    for n in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (8, 8)).save(sub / n)
    expect_error(write(root, [dict(FIELDS, **{field: path})]), 0, field, rule, image_root=sub)


def test_symlinked_images_and_image_roots_are_followed(root, tmp_path_factory):
    """A folder of images linked into the root (the usual way to point at COCO), or a root that is
    itself a link, works; only lexical escapes are refused, each with the rule it broke."""
    outside = tmp_path_factory.mktemp("coco")
    Image.new("RGB", (8, 8)).save(outside / "x.png")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    rec = load_records(write(root, [dict(FIELDS, image="linked/x.png")])).records[0]
    assert rec.image_path.name == "x.png" and rec.image_path.exists()
    link_root = tmp_path_factory.mktemp("links") / "root"
    link_root.symlink_to(root, target_is_directory=True)
    assert len(load_records(write(root, [FIELDS]), image_root=link_root).records) == 1
    expect_error(write(root, [dict(FIELDS, image="/etc/passwd")]), 0, "image", "absolute path")
    expect_error(write(root, [dict(FIELDS, image="../a.png")]), 0, "image", "climbs out")


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


SMALL = dict(version=1, predictions=fake_predictions(), n_train_vqa=60, n_train_caption=30, n_eval=40)


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
    assert "version" not in m  # v1 manifests are as they always were
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
        m = build_benchmark(tmp_path / "b", version=1, seed=0, predictions=preds, n_train_vqa=5,
                            n_train_caption=5, n_eval=5)
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


@pytest.mark.parametrize("version", [1, 2])
def test_predictions_are_checked(tmp_path, monkeypatch, version):
    bad = dict(fake_predictions(), test_questions=[[0, "no"]] * 3)
    with pytest.raises(ValueError, match="one \\[ok, pred\\] per easy-VQA test question"):
        build_benchmark(tmp_path / "b", version=version, predictions=bad)
    monkeypatch.setattr(build_mod, "ASSETS", tmp_path / "no-assets")
    with pytest.raises(FileNotFoundError, match="mmke train base"):
        build_benchmark(tmp_path / "b", version=version)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("kw", [{"n_eval": 0}, {"n_train_vqa": -1}, {"n_train_caption": 2.5},
                                {"n_eval_vqa": 0}, {"n_eval_caption": -3}])
def test_sizes_are_checked(tmp_path, kw, version):
    with pytest.raises(ValueError, match="positive integer"):
        build_benchmark(tmp_path / "b", version=version, predictions=fake_predictions(), **kw)
    assert not (tmp_path / "b").exists()


def test_partly_right_answers_are_not_edit_cases(tmp_path):
    """With token accuracies in the predictions, a wrong answer with some right tokens is left out,
    so pre-edit reliability of E-VQA-lite is 0 by construction."""
    preds = fake_predictions()
    n = len(preds["test_questions"])
    preds["test_questions_token_acc"] = [0.5 if k % 14 == 0 else 0.0 for k in range(n)]
    build_benchmark(tmp_path / "b", version=1, predictions=preds, n_train_vqa=5, n_train_caption=5)
    qs = ev.questions("test")
    half_right = {(qs[k][0], qs[k][2]) for k in range(0, n, 14)}
    recs = load_records(tmp_path / "b" / "vqa_eval.json", tmp_path / "b").records
    assert recs and not any((r.src, image_id(r.image)) in half_right for r in recs)


# ---- builder, version 2 ----------------------------------------------------------------------------
EVAL_FILES, TRAIN_FILES = BUILT_FILES[:2], BUILT_FILES[2:]


def fake_predictions_v2():
    """Like the real model: errors on every 5th yes/no question and on shape questions at positions
    divisible by 97, none on colours, captions wrong on every 40th labelled image; a right
    prediction is the true answer, a wrong one another answer."""
    qs = ev.questions("test")

    def wrong(k, a):
        return (a in ("yes", "no") and k % 5 == 0) or (a in SHAPES and k % 97 == 0)

    labels = ev.image_labels("test")
    other = {("red", "circle"): "a blue square"}
    return {"weights": "fake-digest",
            "test_questions": [[0, build_mod.wrong_answer(a, random.Random(k))] if wrong(k, a) else [1, a]
                               for k, (_, a, _) in enumerate(qs)],
            "test_captions": {str(i): [0, other.get(labels[i], "a red circle")] if i % 40 == 0
                              else [1, ev.caption(*labels[i])] for i in labels}}


SMALL_V2 = dict(predictions=fake_predictions_v2(), n_train_vqa=60, n_train_caption=40, n_eval_vqa=50,
                n_eval_caption=40)
TRUTH = {sp: {(q, i): a for q, a, i in ev.questions(sp)} for sp in ev.SPLITS}


def split_of(rel: str) -> str:
    return rel.split("/")[1]


@pytest.fixture(scope="module")
def built_v2(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_v2")
    manifest = build_benchmark(out, seed=5, **SMALL_V2)
    recs = {name: load_records(out / name, image_root=out).records for name in BUILT_FILES}
    return out, manifest, recs


def test_v2_vqa_eval_is_balanced_by_answer_type(built_v2):
    _, m, recs = built_v2
    rs = recs["vqa_eval.json"]
    types = [r.extra["answer_type"] for r in rs]
    assert len(rs) == 50 and types.count("yes/no") == 20 <= 0.4 * len(rs)
    assert types.count("colour") == types.count("shape") == 15
    assert len({(r.src, r.image) for r in rs}) == len(rs)
    shape_errors = m["candidates"]["vqa_eval"]["shape"]["genuine"]
    assert 0 < shape_errors < 15 and m["candidates"]["vqa_eval"]["colour"]["genuine"] == 0
    genuine = {t: sum(1 for r in rs if r.extra["answer_type"] == t and not r.extra["counterfactual"])
               for t in v2.VQA_TYPES}
    assert genuine == {"yes/no": 20, "colour": 0, "shape": shape_errors}  # genuine errors first
    preds = fake_predictions_v2()["test_questions"]
    pos = {(q, i): k for k, (q, _, i) in enumerate(ev.questions("test"))}
    for r in rs:
        true = TRUTH["test"][(r.src, image_id(r.image))]
        ok, pred = preds[pos[(r.src, image_id(r.image))]]
        assert r.extra["answer_type"] == v2.answer_type(true) and r.pred == pred
        assert isinstance(r.extra["counterfactual"], bool)
        if r.extra["counterfactual"]:  # a right answer edited towards another of its type
            assert ok == 1 and r.alt != r.pred and r.alt != true
            assert v2.answer_type(r.alt) == v2.answer_type(true)
        else:  # a genuine error, edited towards the truth
            assert ok == 0 and r.alt == true != r.pred
        assert r.rephrase != r.src and canonicalise(r.rephrase) == canonicalise(r.src)
        assert r.image_rephrase != r.image and labels_of(r.image_rephrase) == labels_of(r.image)


def test_v2_caption_eval(built_v2):
    _, m, recs = built_v2
    rs = recs["caption_eval.json"]
    assert len(rs) == 40 and m["counts"]["caption_eval"] == 40
    assert {r.extra["answer_type"] for r in rs} == {"caption"}
    n_genuine = m["candidates"]["caption_eval"]["caption"]["genuine"]
    assert sum(not r.extra["counterfactual"] for r in rs) == n_genuine < 40
    for r in rs:
        truth = ev.caption(*labels_of(r.image))
        assert r.src == ev.CAPTION_PROMPTS[0] and r.rephrase in ev.CAPTION_PROMPTS[1:]
        if r.extra["counterfactual"]:
            assert image_id(r.image) % 40 != 0 and r.pred == truth and r.alt not in (truth, r.pred)
            assert len(r.alt.split()) == 3 and r.alt.split()[1:] != truth.split()[1:]
        else:
            assert image_id(r.image) % 40 == 0 and r.alt == truth != r.pred


def test_v2_train_records(built_v2):
    _, m, recs = built_v2
    assert m["counts"]["vqa_train"] == 60 and m["counts"]["caption_train"] == 40
    for r in recs["vqa_train.json"]:
        assert TRUTH["train"][(r.src, image_id(r.image))] == r.alt and r.pred is None
        assert r.extra == {"counterfactual": False, "answer_type": v2.answer_type(r.alt)}
    for r in recs["caption_train.json"]:
        assert r.alt == ev.caption(*labels_of(r.image)) and {r.src, r.rephrase} <= set(ev.CAPTION_PROMPTS)
        assert r.extra == {"counterfactual": False, "answer_type": "caption"}


def test_v2_hard_m_loc(built_v2):
    _, m, recs = built_v2
    for name, rs in recs.items():
        hard = [r for r in rs if is_hard_m_loc(r)]
        assert 0.3 <= len(hard) / len(rs) <= 0.7, name
        assert m["composition"][name[:-5]]["hard_m_loc_fraction"] == round(len(hard) / len(rs), 4)
        for r in rs:
            (c, s), (mc, ms) = labels_of(r.image), labels_of(r.m_loc)
            assert mc != c and ms != s and split_of(r.m_loc) == split_of(r.image)
            if is_hard_m_loc(r):  # the edit's own prompt, verbatim, with the unrelated image's answer
                assert r.m_loc_q == r.src
                want = ev.caption(mc, ms) if "caption" in name else answer_of(canonicalise(r.src), mc, ms)
                assert r.m_loc_a == want and r.m_loc_a != r.alt  # an image-blind edit would show
                if "vqa" in name:
                    assert TRUTH[split_of(r.m_loc)].get((r.src, image_id(r.m_loc)), want) == want
            else:  # a real easy-VQA question about the unrelated image, never the prompt or its paraphrase
                assert norm_text(r.m_loc_q) not in {norm_text(r.src), norm_text(r.rephrase)}
                assert TRUTH[split_of(r.m_loc)][(r.m_loc_q, image_id(r.m_loc))] == r.m_loc_a


def test_answer_of_agrees_with_easyvqa():
    for sp in ev.SPLITS:
        labels = ev.image_labels(sp)
        for q, a, i in ev.questions(sp):
            if i in labels:
                assert answer_of(canonicalise(q), *labels[i]) == a, (q, a, labels[i])
    assert answer_of(("color", "triangle"), "red", "circle") is None
    assert answer_of(("shape", "blue"), "red", "circle") is None


def test_is_hard_m_loc_rule():
    rec = dict(FIELDS, m_loc_q="  What COLOR is the   shape? ")
    assert is_hard_m_loc(rec) and is_hard_m_loc(dict(FIELDS, m_loc_q="what is the color of the shape?"))
    assert not is_hard_m_loc(FIELDS)
    assert is_hard_m_loc(schema.EditRecord(**dict(FIELDS, m_loc_q=FIELDS["src"].upper())))
    assert norm_text(" A \t b\n") == "a b"


def test_v2_loc_from_disjoint_pools(built_v2):
    _, _, recs = built_v2
    pools = textfacts.fact_pools(5)
    ev_facts, tr_facts = dict(pools.eval), dict(pools.train)
    train_locs = {r.loc for name in TRAIN_FILES for r in recs[name]}
    for name in EVAL_FILES:
        for r in recs[name]:
            assert ev_facts[r.loc] == r.loc_ans and r.loc not in train_locs
    for name in TRAIN_FILES:
        assert all(tr_facts[r.loc] == r.loc_ans for r in recs[name])


def test_fact_pools():
    facts = textfacts.country_facts()
    pools = textfacts.fact_pools(0)
    assert pools.eval and pools.train and not set(pools.eval_countries) & set(pools.train_countries)
    assert not {q for q, _ in pools.eval} & {q for q, _ in pools.train}
    assert 0.25 < len(pools.eval_countries) / (len(pools.eval_countries) + len(pools.train_countries)) < 0.35
    assert {f.kind for f in facts} == set(textfacts.KINDS) and len(facts) > 1000
    for codes in (pools.eval_countries, pools.train_countries):
        assert len({f.kind for f in facts if f.code in set(codes)}) >= 5
    for q, a in pools.eval + pools.train:
        assert q.startswith("nq question: ") and q == q.lower() and a and a == a.lower() and a == a.strip()
    d = {f.question: f.answer for f in facts}
    assert d["nq question: what is the currency of ethiopia?"] == "ethiopian birr"
    assert d["nq question: what is the capital of france?"] == "paris"
    assert d["nq question: what is the calling code of france?"] == "+33"
    assert len(d) == len(facts)  # one answer per question
    textfacts.fact_pools.cache_clear()
    textfacts.country_facts.cache_clear()
    assert textfacts.fact_pools(0) == pools and textfacts.fact_pools(1) != pools
    assert capital_questions() == sorted({(f.question, f.answer) for f in facts if f.kind == "capital"})


def test_v2_manifest(built_v2):
    out, m, recs = built_v2
    assert json.loads((out / "manifest.json").read_text()) == m
    assert m["version"] == 2 and m["seed"] == 5 and m["weights"] == "fake-digest" and m["warnings"] == []
    assert m["counts"] == {"vqa_eval": 50, "caption_eval": 40, "vqa_train": 60, "caption_train": 40}
    comp = m["composition"]["vqa_eval"]
    assert comp["answer_types"] == {"colour": 15, "shape": 15, "yes/no": 20}
    cf = sum(r.extra["counterfactual"] for r in recs["vqa_eval.json"])
    assert comp["counterfactual_fraction"] == round(cf / 50, 4) and 0 < cf < 50
    assert m["composition"]["caption_eval"]["answer_types"] == {"caption": 40}
    lc = m["leak_check"]
    assert lc["shared"] == 0 and lc["eval_inputs"] > 0 and lc["train_inputs"] > 0
    assert lc == {k: v for k, v in check_benchmark_dir(out).items() if k != "leaks"}
    fp = m["fact_pools"]
    assert set(fp["versions"]) == {"countryinfo", "pycountry"}
    pools = textfacts.fact_pools(5)
    assert fp["eval"]["countries"] == len(pools.eval_countries) and fp["eval"]["questions"] == len(pools.eval)
    assert fp["train"]["countries"] == len(pools.train_countries) and len(fp["train"]["kinds"]) >= 5
    import hashlib

    h = hashlib.sha256()
    images = [p.relative_to(out).as_posix() for p in (out / "images").rglob("*.png")]
    rels = sorted(list(BUILT_FILES) + images)
    for rel in rels:
        data = (out / rel).read_bytes()
        h.update(f"{rel}\0{len(data)}\0".encode() + data)
    assert m["content_hash"] == h.hexdigest()


def test_v2_is_deterministic_per_seed(built_v2, tmp_path):
    out, _, _ = built_v2
    build_benchmark(tmp_path / "again", seed=5, **SMALL_V2)
    build_benchmark(tmp_path / "other", seed=6, **SMALL_V2)
    for name in BUILT_FILES + ("manifest.json",):
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
        assert (out / name).read_bytes() != (tmp_path / "other" / name).read_bytes(), name


def test_v2_copies_only_used_images_and_writes_only_inside(built_v2, tmp_path, monkeypatch):
    out, _, _ = built_v2
    used = {rel for name in BUILT_FILES for r in json.loads((out / name).read_text())
            for rel in (r["image"], r["image_rephrase"], r["m_loc"])}
    assert {p.relative_to(out).as_posix() for p in (out / "images").rglob("*") if p.is_file()} == used
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    inner = tmp_path / "inside" / "bench"
    m = build_benchmark(inner, seed=1, **dict(SMALL_V2, n_eval_vqa=None, n_eval_caption=None, n_eval=12))
    assert m["counts"]["vqa_eval"] == m["counts"]["caption_eval"] == 12  # n_eval sets both
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "inside"] and list(cwd.iterdir()) == []
    assert sorted(p.name for p in inner.iterdir()) == sorted(BUILT_FILES + ("images", "manifest.json"))
    assert not [p for p in inner.rglob("*.tmp")]


def test_no_leaks_between_v2_train_and_eval(built_v2):
    _, _, recs = built_v2
    for e in EVAL_FILES:
        for t in TRAIN_FILES:
            assert find_leaks(recs[e], recs[t]) == [], (e, t)
    keys = input_keys(recs["vqa_eval.json"][0])
    assert any(k[0] == "text" for k in keys) and sum(k[0] == "image" for k in keys) >= 3


def test_leak_check_finds_injected_leaks(built_v2, tmp_path):
    import shutil

    out, _, _ = built_v2
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    e_vqa = json.loads((bad / "vqa_eval.json").read_text())[0]
    e_cap = json.loads((bad / "caption_eval.json").read_text())[0]
    vqa_train = json.loads((bad / "vqa_train.json").read_text())
    # the eval image under another file name, with the eval prompt
    shutil.copyfile(bad / e_vqa["image"], bad / "images" / "train" / "copy.png")
    vqa_train[0].update(image="images/train/copy.png", src=e_vqa["src"])
    (bad / "vqa_train.json").write_text(json.dumps(vqa_train))
    cap_train = json.loads((bad / "caption_train.json").read_text())
    cap_train[1]["loc"] = "  " + e_cap["loc"].upper()
    (bad / "caption_train.json").write_text(json.dumps(cap_train))
    got = check_benchmark_dir(bad)
    image_key = ("image", image_digest(out / e_vqa["image"]), norm_text(e_vqa["src"]))
    text_key = ("text", norm_text(e_cap["loc"]))
    assert got["shared"] == len(got["leaks"]) >= 2 and {image_key, text_key} <= set(got["leaks"])
    assert got["leaks"] == sorted(got["leaks"])
    loaded = {n: load_records(bad / n, image_root=bad).records for n in BUILT_FILES}
    assert image_key in find_leaks(loaded["vqa_eval.json"], loaded["vqa_train.json"])
    assert text_key in find_leaks(loaded["caption_eval.json"], loaded["caption_train.json"])


def test_v2_build_refuses_a_leak(tmp_path, monkeypatch):
    pools = textfacts.fact_pools(0)
    leaky = textfacts.FactPools(pools.eval_countries, pools.train_countries, pools.eval, pools.eval)
    monkeypatch.setattr(v2, "fact_pools", lambda seed: leaky)
    out = tmp_path / "b"
    out.mkdir()
    (out / "manifest.json").write_text("{}")  # a previous build's manifest must not survive
    with pytest.raises(v2.LeakError, match="share"):
        build_benchmark(out, seed=0, **dict(SMALL_V2, n_eval=10, n_train_vqa=30, n_train_caption=30,
                                            n_eval_vqa=None, n_eval_caption=None))
    assert not (out / "manifest.json").exists()


def test_v2_options_and_locations(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="version-1 option"):
        build_benchmark(tmp_path / "b", counterfactual=True, predictions=fake_predictions())
    with pytest.raises(ValueError, match="1 or 2"):
        build_benchmark(tmp_path / "b", version=3, predictions=fake_predictions())
    assert not (tmp_path / "b").exists()
    monkeypatch.setenv("MMKE_CACHE", str(tmp_path / "cache"))
    assert default_benchmark_dir().name == "v2-seed-0" and default_benchmark_dir(7).name == "v2-seed-7"
    assert default_benchmark_dir(version=1).name == "seed-0"
    assert default_benchmark_dir(2, True, version=1).name == "seed-2-counterfactual"
    with pytest.raises(ValueError, match="version-1 option"):
        default_benchmark_dir(counterfactual=True)


def test_ensure_benchmark_rebuilds_on_version_seed_or_weights(tmp_path, monkeypatch):
    from mmke.data import bundled
    from mmke.models import default as default_model

    calls = []

    def fake_build(out, *, seed, version):
        calls.append((seed, version))
        out.mkdir(parents=True, exist_ok=True)
        (out / "manifest.json").write_text(json.dumps({"version": version, "seed": seed, "weights": "w"}))

    monkeypatch.setattr(build_mod, "build_benchmark", fake_build)
    monkeypatch.setattr(default_model, "weights_digest", lambda: "w")
    out = tmp_path / "b"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"seed": 0, "weights": "w", "counterfactual": False}))  # v1
    bundled.ensure_benchmark(out)
    assert calls == [(0, 2)]
    bundled.ensure_benchmark(out)  # up to date
    bundled.ensure_benchmark(out, seed=1)
    monkeypatch.setattr(default_model, "weights_digest", lambda: "other")
    bundled.ensure_benchmark(out, seed=1)
    bundled.ensure_benchmark(out, seed=1, version=1)
    assert calls == [(0, 2), (1, 2), (1, 2), (1, 1)]


def test_cli_version_option(tmp_path):
    from typer.testing import CliRunner

    from mmke.cli import app

    for args, msg in ((["--version", "3"], "--version must be 1 or 2"),
                      (["--version", "x"], "--version must be 1 or 2"),
                      (["--counterfactual"], "version-1 option")):
        res = CliRunner().invoke(app, ["data", "build", "--out", str(tmp_path / "b"), *args])
        assert res.exit_code == 2 and msg in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()
