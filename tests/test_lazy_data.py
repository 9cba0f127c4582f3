"""Data at scale (issue 11): images decoded per case and let go (memory bounded for a 10,000-case
file), --train-image-root for the train split, the train split read only by methods that use it,
and no third-party progress bars or deprecation warnings in a run's output."""

from __future__ import annotations

import gc
import json
import tracemalloc
import warnings
import weakref
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from mmke.cli import app
from mmke.data.schema import DataError, load_records
from mmke.eval.runner import Run, RunConfig
from mmke.models.tiny import tiny_llava
from mmke.scoring import INPUT_KINDS, LazyInputs, case_inputs
from mmke.tasks import TASKS

from tests.toydata import write_toy_mmedit

N_BIG = 10_000
N_IMAGES = 40


def _record(i: int, n_images: int = N_IMAGES, prefix: str = "img/") -> dict:
    return {"src": "what color is the shape?", "alt": "red", "rephrase": "what colour is the shape?",
            "image": f"{prefix}{i % n_images}.png", "image_rephrase": f"{prefix}{(i + 1) % n_images}.png",
            "loc": "nq question: what is the capital of france?", "loc_ans": "paris",
            "m_loc": f"{prefix}{(i + 7) % n_images}.png", "m_loc_q": "is there a circle?", "m_loc_a": "no"}


def _write(root: Path, n: int, name: str = "data.json", n_images: int = N_IMAGES) -> Path:
    """``root/name`` with ``n`` records over ``n_images`` small images under ``root/img``: each
    record names three different images."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        if not (root / "img" / f"{i}.png").exists():
            Image.new("RGB", (24, 24), (6 * i % 256, 90, 200 - 4 * i % 200)).save(root / "img" / f"{i}.png")
    f = root / name
    f.write_text(json.dumps([_record(i, n_images) for i in range(n)]))
    return f


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    return _write(tmp_path_factory.mktemp("big"), N_BIG)


class DecodeCounter:
    """Wraps an adapter's ``load_image`` (the real one runs) and counts the decoded images that are
    alive: the peak over a run is how many images it ever held at once."""

    def __init__(self, adapter) -> None:
        self.inner, self.live, self.peak, self.decoded = adapter.load_image, {}, 0, 0
        adapter.load_image = self

    def __call__(self, path):
        im = self.inner(path)
        k = id(im)
        self.live[k] = weakref.ref(im, lambda _r, k=k: self.live.pop(k, None))
        self.decoded += 1
        self.peak = max(self.peak, len(self.live))
        return im

    def reset(self) -> None:
        self.peak, self.decoded = len(self.live), 0


def _pil_images_alive() -> int:
    gc.collect()
    return sum(isinstance(o, Image.Image) for o in gc.get_objects())


# ---- 1. lazy decoding ------------------------------------------------------------------------
def test_validating_10000_records_keeps_no_decoded_image(big):
    before = _pil_images_alive()
    tracemalloc.start()
    res = load_records(big)  # every record validated, every image opened and verified
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(res.records) == N_BIG and not res.skipped
    assert _pil_images_alive() == before  # nothing decoded is kept by the records or the checker
    # what remains is the records themselves (10 short strings and 3 paths each, ~1.7 kB): measured
    # 19.7 MB peak / 16.5 MB kept for 10,000 records (2.7 / 2.4 MB for 1,000), tracemalloc
    assert peak < 60e6, f"loading {N_BIG} records peaked at {peak / 1e6:.1f} MB of Python allocations"
    assert all(r.image_path.parent == big.parent / "img" for r in res.records[:5])


@pytest.mark.parametrize("setting", ["one-step", "sequential"])
def test_run_holds_one_case_of_images_however_many_cases(big, tmp_path, setting, one_thread):
    """On the 10,000-record file, 4 and 24 cases: the most decoded images alive at once is the
    same, one case's three, while the number decoded grows with the cases."""
    adapter = tiny_llava(seed=0)
    counter = DecodeCounter(adapter)
    peaks, decoded = {}, {}
    for n in (4, 24):
        counter.reset()
        kw = {"setting": "sequential", "k": 4} if setting == "sequential" else {}
        cfg = RunConfig(model="tiny-llava", method="null", data=str(big), image_root=str(big.parent),
                        limit=n, **kw)
        s = Run(cfg, tmp_path / f"{setting}-{n}", adapter=adapter).execute()
        assert s["n_cases"] == n
        peaks[n], decoded[n] = counter.peak, counter.decoded
    assert peaks[4] == peaks[24] == 3, peaks
    assert decoded[24] > decoded[4]
    if setting == "one-step":  # a one-step case is decoded once for its pre-edit outputs, edit and scoring
        assert decoded[24] == 3 * 24, decoded
    assert not counter.live  # nothing is left behind after a run


def test_lazy_inputs_decode_on_access_and_match_case_inputs(tmp_path):
    f = _write(tmp_path, 30, n_images=10)
    recs = load_records(f).records
    adapter = tiny_llava(seed=0)
    counter = DecodeCounter(adapter)
    kinds = ("reliability", "t_locality", "m_locality")
    lazy = LazyInputs(recs, TASKS["vqa"], adapter.load_image, kinds)
    assert len(lazy) == 90 and counter.decoded == 0  # nothing decoded until read
    chunk = lazy[3:9]  # records 1 and 2: two images each (t_locality has none)
    assert counter.decoded == 4
    full = case_inputs(recs[1], TASKS["vqa"], Image.open)
    for got, kind in zip(chunk[:3], kinds):
        assert (got.prompt, got.target) == (full[kind].prompt, full[kind].target)
        assert (got.image is None) == (full[kind].image is None)
    assert lazy[-1].prompt == full["m_locality"].prompt and lazy[-1].image is not None
    del chunk, got
    assert not counter.live
    with pytest.raises(ValueError, match="unknown input kinds"):
        LazyInputs(recs, TASKS["vqa"], adapter.load_image, ("reliabilty",))
    with pytest.raises(IndexError):
        lazy[90]


def test_case_inputs_decode_only_the_images_of_the_wanted_kinds(tmp_path):
    rec = load_records(_write(tmp_path, 1, n_images=10)).records[0]
    seen = []
    x = case_inputs(rec, TASKS["vqa"], lambda p: seen.append(p) or Image.open(p), kinds=("reliability",))
    assert list(x) == ["reliability"] and seen == [rec.image_path]
    seen.clear()
    x = case_inputs(rec, TASKS["vqa"], lambda p: seen.append(p) or Image.open(p))
    assert list(x) == list(INPUT_KINDS) and sorted(seen) == sorted({rec.image_path, rec.image_rephrase_path,
                                                                   rec.m_loc_path})
    assert x["reliability"].image is x["t_generality"].image  # one image decoded once


def test_unike_locality_memory_is_built_without_holding_the_train_images(tmp_path, one_thread):
    from mmke.editors.unike import UniKEEditor
    from mmke.editors.unike.editor import UniKEConfig

    recs = load_records(_write(tmp_path, 64, n_images=20)).records
    adapter = tiny_llava(seed=0)
    counter = DecodeCounter(adapter)
    ed = UniKEEditor(adapter, UniKEConfig(external="none", zeta="none", layers=1, memory_size=64),
                     task=TASKS["vqa"], train_records=recs, model_name="tiny-llava")
    assert counter.decoded == 0  # the memory's inputs are not decoded at construction
    loc = ed.locality()
    # reliability and m_locality images, once per record, again for a record split by a chunk edge
    assert loc is not None and 64 * 2 <= counter.decoded <= 64 * 2 + 2 * (64 * 3 // 16)
    # a chunk of 16 inputs (at most 6 records, 12 images) at a time, the next built before the last
    # is let go: never the 128 images of the whole memory
    assert counter.peak <= 2 * 12, counter.peak
    assert not counter.live


# ---- 2. --train-image-root -------------------------------------------------------------------
@pytest.fixture
def split_roots(tmp_path):
    """Eval data under ``eval/`` (its images there), a train file under ``train/`` whose images are
    under ``train-images/`` only; record 2 of the train file climbs out of its root."""
    data = write_toy_mmedit(tmp_path / "eval", n=4)
    troot = tmp_path / "train-images"
    _write(troot, 0, n_images=N_IMAGES)
    recs = [_record(i) for i in range(12)]
    recs[2]["image"] = "../eval/red.png"  # exists, but outside the train image root
    (tmp_path / "train").mkdir()
    train = tmp_path / "train" / "train.json"
    train.write_text(json.dumps(recs))
    return data, train, troot


def test_train_image_root_resolves_and_confines_the_train_split(split_roots, tmp_path):
    data, train, troot = split_roots
    kw = dict(model="tiny-llava", method="t-patcher", data=str(data), train_data=str(train),
              image_root=str(data.parent))
    recs = Run(RunConfig(**kw, train_image_root=str(troot)), tmp_path / "a").train_records()
    assert len(recs) == 11 and 2 not in {r.index for r in recs}  # the escaping record is refused
    assert all(p.is_file() and troot.resolve() in p.parents
               for r in recs for p in (r.image_path, r.image_rephrase_path, r.m_loc_path))
    # default as before: the train images resolve against --image-root (where they are not)
    recs = Run(RunConfig(**kw), tmp_path / "b").train_records()
    assert recs[0].image_path == data.parent.resolve() / "img" / "0.png" and not recs[0].image_path.exists()


def test_run_with_train_image_root_decodes_train_images_from_it(split_roots, tmp_path, one_thread):
    """t-patcher's memory loss reads train-split images: from --train-image-root they load; without
    it they are looked for under --image-root and the editor fails naming the missing file."""
    data, train, troot = split_roots
    args = ["run", "--model", "tiny-llava", "--method", "t-patcher", "--data", str(data), "--train-data",
            str(train), "--limit", "1", "--set", "steps=2", "--set", "memory_size=4"]
    r = CliRunner().invoke(app, args + ["--train-image-root", str(troot), "--out", str(tmp_path / "ok")])
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "ok" / "summary.json").read_text())
    assert s["config"]["train_image_root"] == str(troot) and s["provenance"]["train_data_digest"]
    r = CliRunner().invoke(app, args + ["--out", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "does not exist" in r.output and str(Path("eval", "img", "0.png")) in r.output


def test_a_run_made_before_train_image_root_resumes(tmp_path, one_thread):
    data = write_toy_mmedit(tmp_path / "d", n=4)
    adapter = tiny_llava(seed=0)
    cfg = RunConfig(model="tiny-llava", method="null", data=str(data), limit=2)
    Run(cfg, tmp_path / "r", adapter=adapter).execute()
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    del run["config"]["train_image_root"]  # as an older mmke wrote it
    (tmp_path / "r" / "run.json").write_text(json.dumps(run))
    assert Run(cfg, tmp_path / "r", adapter=adapter).execute()["n_cases"] == 2
    with pytest.raises(ValueError, match="differs in: train_image_root"):
        Run(cfg.model_copy(update={"train_image_root": str(tmp_path)}), tmp_path / "r", adapter=adapter).execute()


def test_train_command_takes_train_image_root(split_roots, tmp_path, one_thread):
    _, train, troot = split_roots
    r = CliRunner().invoke(app, ["train", "--method", "mend", "--model", "tiny-llava", "--train-data", str(train),
                                 "--train-image-root", str(troot), "--steps", "1", "--val-size", "2",
                                 "--val-every", "1", "--out", str(tmp_path / "mend")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "mend" / "weights.safetensors").exists()


# ---- 3. the train split only for methods that read it ----------------------------------------
def test_a_method_that_does_not_read_the_train_split_never_opens_it(tmp_path, one_thread):
    data = write_toy_mmedit(tmp_path / "d", n=4)
    missing = tmp_path / "nowhere" / "train.json"
    cfg = RunConfig(model="tiny-llava", method="ft-lm", data=str(data), train_data=str(missing), limit=1,
                    method_config={"steps": 1})
    s = Run(cfg, tmp_path / "ft", adapter=tiny_llava(seed=0)).execute()
    assert s["n_cases"] == 1 and s["provenance"]["train_data_digest"] is None


def test_ike_names_a_missing_train_file(tmp_path):
    data = write_toy_mmedit(tmp_path / "d", n=4)
    missing = tmp_path / "nowhere" / "train.json"
    cfg = RunConfig(model="tiny-llava", method="ike", data=str(data), train_data=str(missing), limit=1)
    with pytest.raises(DataError, match=r"train\.json: file not found \(--train-data: the train split ike reads\)"):
        Run(cfg, tmp_path / "ike", adapter=tiny_llava(seed=0)).execute()
    assert not (tmp_path / "ike").exists()  # a failed start leaves nothing behind


def test_unike_declares_the_train_split_only_where_it_reads_it():
    from mmke.editors.unike import UniKEEditor
    from mmke.editors.unike.editor import UniKEConfig

    assert UniKEEditor.uses_train_records(UniKEConfig())  # the new neurons' locality memory
    assert not UniKEEditor.uses_train_records(UniKEConfig(mem_weight=0.0))  # no memory loss, trained keys
    assert UniKEEditor.uses_train_records(UniKEConfig(intrinsic=False, external="ike"))  # demonstrations
    assert not UniKEEditor.uses_train_records(UniKEConfig(intrinsic=False, external="latent"))


# ---- 4. quiet output -------------------------------------------------------------------------
def test_sentence_embeddings_print_nothing(capfd):
    from mmke import retrieval

    retrieval._encoder.cache_clear()  # the load too: no transformers "Loading weights" bar
    e = retrieval.embed([f"question number {i}" for i in range(80)], cache=False)
    assert e.shape == (80, 384)
    out, err = capfd.readouterr()
    assert "Batches" not in err + out and "Loading weights" not in err + out


@pytest.mark.slow
def test_default_model_shared_prefix_forward_is_warning_free(default_adapter, capfd):
    """The shared-prefix forward (IKE inputs) passes its KV cache by transformers' current name: no
    `past_key_values` FutureWarning, no deprecation log line."""
    from mmke.models.base import Example

    ctx = "New Fact: what color is the shape? teal\nPrompt: what color is the shape? teal\n\n"
    exs = [Example("Question: what color is it? Short answer:", " teal", None, context=ctx),
           Example("nq question: what is the capital of france?", " paris", None, context=ctx)]
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        default_adapter.run(exs)
    assert not [w for w in got if "past_key_values" in str(w.message) or issubclass(w.category, FutureWarning)]
    assert "deprecated" not in capfd.readouterr().err
