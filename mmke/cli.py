"""The ``mmke`` command line: data build, run, report, train, list."""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import typer
from rich.logging import RichHandler

from mmke.progress import console

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Knowledge editing for multimodal LLMs: build data, run editors, report.")
data_app = typer.Typer(no_args_is_help=True, help="Build and inspect benchmark data.")
app.add_typer(data_app, name="data")


def _setup_logging(verbose: bool) -> None:
    from mmke.threads import configure_threads

    configure_threads()
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)], force=True)
    for noisy in ("transformers", "sentence_transformers", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import warnings

    for category in (FutureWarning, DeprecationWarning, UserWarning):  # third-party notices, once per run
        warnings.filterwarnings("ignore", category=category, module=r"(transformers|torch|sentence_transformers)")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


@contextmanager
def _user_errors():
    """Problems with the user's inputs (data, names, options) end the command with a one-line
    message and exit code 2 instead of a traceback."""
    from pydantic import ValidationError

    from mmke.data.schema import DataError

    rank = os.environ.get("RANK", "0")  # under torchrun, ranks other than 0 say which they are
    where = f"rank {rank}: " if os.environ.get("WORLD_SIZE", "1") not in ("", "1") and rank != "0" else ""
    try:
        yield
    except ValidationError as e:
        typer.secho(f"error: {where}{validation_message(e)}", fg="red", err=True)
        raise typer.Exit(2) from e
    except (DataError, KeyError, ValueError, FileNotFoundError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        typer.secho(f"error: {where}{msg}", fg="red", err=True)
        raise typer.Exit(2) from e


def validation_message(e) -> str:
    """One line per problem of a pydantic ValidationError, named as the command line names it
    (``--limit``), without pydantic's links."""
    parts = []
    for err in e.errors():
        where = ".".join(str(x) for x in err.get("loc", ()))
        name = f"--{where.replace('_', '-')}" if where and "." not in where else where
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{name}: {msg}" if name else msg)
    return "; ".join(parts)


@data_app.command("build")
def data_build(
    out: Optional[Path] = typer.Option(None, help="output directory (default: the cache location "
                                                   "`mmke run` uses)"),
    version: str = typer.Option("2", "--version", help="benchmark version: 2 (leak-free, balanced; "
                                                     "the default) or 1 (the original)"),
    seed: int = typer.Option(0, help="selection seed; same seed, same files"),
    counterfactual: bool = typer.Option(False, help="version 1 only: targets are chosen wrong "
                                                    "answers on cases the model gets right"),
    n_eval: Optional[int] = typer.Option(None, help="eval records per task (version 1: a cap, "
                                                    "default all; version 2: default 1000 / 500)"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Build E-VQA-lite and E-IC-lite (train + eval) from the easy-vqa package."""
    _setup_logging(verbose)
    if version.strip() not in ("1", "2"):
        typer.secho(f"error: --version must be 1 or 2, got {version!r}", fg="red", err=True)
        raise typer.Exit(2)
    from mmke.data.build import build_benchmark
    from mmke.data.bundled import default_benchmark_dir

    v = int(version)
    with _user_errors():
        out = out or default_benchmark_dir(seed, counterfactual, v)
        manifest = build_benchmark(out, version=v, seed=seed, counterfactual=counterfactual,
                                   n_eval=n_eval)
    console.print(f"wrote the benchmark to [bold]{out}[/bold]")
    console.print_json(json.dumps({k: v for k, v in manifest.items() if k != "files"}))


_DEFAULT_K = {"sequential": 10, "cross-task": 10, "lifelong": 1000}
_DEVICE_HELP = "put the whole model on this device: cpu, cuda, cuda:1, mps (default: cpu)"
_DTYPE_HELP = "the model's weights: fp32 (default), bf16 or fp16; editors do their update math in fp32"
_DEVICE_MAP_HELP = ("spread the model over devices with accelerate: `auto`, or a JSON file of module name -> "
                    "device (e.g. {\"lm.model.layers.0\": \"cuda:0\", ...}); not with --device")


def _parse_checkpoints(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise typer.BadParameter(f"--checkpoints {text!r}: comma-separated numbers of edits, e.g. 1,10,100") from None


@app.command("run")
def run_cmd(
    method: str = typer.Option(..., help="editing method (`mmke list methods`); several, comma-separated, "
                                         "run one after another on one loaded model"),
    task: str = typer.Option("vqa", help="vqa or caption (or both: vqa,caption)"),
    model: str = typer.Option("default", help="model name (`mmke list models`) or hf:<path-or-id>"),
    out: Path = typer.Option(..., help="run directory: summary.json and the per-case store (several "
                                       "methods or tasks: one sub-directory <task>-<method> each)"),
    limit: Optional[int] = typer.Option(None, help="evaluate N cases (a seeded sample; N >= 1)"),
    seed: int = typer.Option(0),
    data: Optional[Path] = typer.Option(None, help="MMEdit eval file (JSON list or JSON Lines); "
                                                   "default: the bundled benchmark"),
    train_data: Optional[Path] = typer.Option(None, help="MMEdit train file (IKE demonstrations, memories); read "
                                                         "only by methods that use it"),
    train_image_root: Optional[Path] = typer.Option(None, help="root of the --train-data images (default: "
                                                               "--image-root; with the bundled eval split: the "
                                                               "train file's folder)"),
    image_root: Optional[Path] = typer.Option(None, help="root of `image` and `m_loc` paths "
                                                         "(default: the data file's folder)"),
    rephrase_image_root: Optional[Path] = typer.Option(None, help="root of `image_rephrase` paths "
                                                                  "(default: --image-root)"),
    skip_invalid: bool = typer.Option(False, help="skip malformed records (reported and counted)"),
    m_locality: str = typer.Option("top1", help="top1 (default) or reference-top10"),
    setting: str = typer.Option("one-step", help="one-step, sequential (groups of K edits), cross-task "
                                                 "(--task vqa+caption, groups interleaving both) or lifelong "
                                                 "(one stream of K edits scored at --checkpoints)"),
    k: Optional[int] = typer.Option(None, "--k", help="edits per group (sequential, cross-task; default 10) or "
                                                      "in the stream (lifelong; default 1000)"),
    checkpoints: Optional[str] = typer.Option(None, help="lifelong: score after these numbers of edits, e.g. "
                                                         "1,10,100,1000 (default: powers of ten and K)"),
    probes: int = typer.Option(100, help="lifelong: locality probe cases (the first of the stream)"),
    targets: str = typer.Option("as-drawn", help="sequential, cross-task, lifelong: as-drawn (the file's "
                                                 "targets) or one-per-pair (an edit of a content-question pair "
                                                 "edited earlier takes that pair's first target, so the stream "
                                                 "never contradicts itself)"),
    set_: List[str] = typer.Option([], "--set", help="method option key=value (repeatable)"),
    device: Optional[str] = typer.Option(None, help=_DEVICE_HELP),
    dtype: str = typer.Option("fp32", help=_DTYPE_HELP),
    device_map: Optional[str] = typer.Option(None, help=_DEVICE_MAP_HELP),
    shard: str = typer.Option("round-robin", help="under torchrun: how the run's groups are dealt to ranks, "
                                                  "round-robin or contiguous"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run (or resume) editing evaluations in a setting and write DIR/summary.json. Under
    `torchrun --nproc-per-node N -m mmke run ...` the cases are shared among N model replicas."""
    _setup_logging(verbose)
    from mmke.eval import distributed
    from mmke.eval.report import summary_line
    from mmke.eval.runner import Run, RunConfig
    from mmke.registry import parse_option_sets

    methods = [m.strip() for m in method.split(",") if m.strip()]
    tasks = [t.strip() for t in task.split(",") if t.strip()]
    several = len(methods) * len(tasks) > 1
    if several and data is not None:
        raise typer.BadParameter("--data holds one task: give one --task and one --method with it")
    with _user_errors():  # validate every configuration before running any
        runs = [(RunConfig(model=model, task=t, method=m,
                           data=str(data) if data else None,
                           train_data=str(train_data) if train_data else None,
                           image_root=str(image_root) if image_root else (str(data.parent) if data else None),
                           rephrase_image_root=str(rephrase_image_root) if rephrase_image_root else None,
                           train_image_root=str(train_image_root) if train_image_root else None,
                           limit=limit, seed=seed, skip_invalid=skip_invalid, m_locality=m_locality,
                           setting=setting, k=k if k is not None else _DEFAULT_K.get(setting, 1),
                           checkpoints=_parse_checkpoints(checkpoints), probes=probes, targets=targets,
                           method_config=parse_option_sets(set_), device=device, dtype=dtype,
                           device_map=device_map),
                 out / f"{t}-{m}" if several else out) for t in tasks for m in methods]
        ranks = distributed.Ranks.from_env(shard, device)  # torchrun's ranks, or None
        for cfg, _ in runs if ranks is not None else ():
            ranks.check(cfg)  # what cannot be split is refused before any process group or model
    if ranks is not None and not ranks.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # rank 0 reports; the others only warn
    with _user_errors(), distributed.session(shard, device) as ranks:
        def make() -> list[Run]:  # may build the bundled benchmark: rank 0 first
            return [Run(cfg, d) for cfg, d in runs]

        plans = make() if ranks is None else ranks.in_turn(make)
        adapter = None
        for k, r in enumerate(plans, 1):
            if several and (ranks is None or ranks.is_main):
                console.rule(f"run {k} of {len(plans)}: {r.cfg.method} on {r.cfg.task}")
            r = Run(r.cfg, r.out, adapter=adapter)
            summary = r.execute()
            adapter = r.adapter()  # load the model once for every run
            if ranks is None or ranks.is_main:
                console.print(summary_line(summary))
                console.print(f"summary: {r.out / 'summary.json'}")


@app.command("report")
def report_cmd(
    dirs: List[Path] = typer.Argument(..., help="run directories (or parents of run directories)"),
    fmt: str = typer.Option("markdown", "--format", help="markdown or html (a standalone page)"),
    exact_match: bool = typer.Option(False, help="report exact match instead of token accuracy"),
    reference: bool = typer.Option(False, help="append the papers' numbers as labelled reference rows"),
    compact: bool = typer.Option(False, help="the paper's layout: both tasks side by side, no intervals"),
    out: Optional[Path] = typer.Option(None, help="write the report to this file instead of printing it"),
) -> None:
    """Tables of runs: one per task, every cell with its 95% bootstrap interval over cases."""
    from mmke.eval.report import collect, render

    with _user_errors():
        text = render(collect(dirs), fmt=fmt, exact_match=exact_match, reference=reference, compact=compact)
    if out is None:
        typer.echo(text)
        return
    from mmke.io import atomic_write_text

    atomic_write_text(out, text)
    console.print(f"wrote {out}")


@app.command("plot")
def plot_cmd(
    dirs: List[Path] = typer.Argument(..., help="run directories (or parents of run directories)"),
    out: Path = typer.Option(..., help="figure file (.png, .pdf or .svg)"),
) -> None:
    """Figures: metric-vs-edits curves of lifelong runs; grouped bars (with intervals) of the others."""
    from mmke.eval.plot import plot
    from mmke.eval.report import collect

    with _user_errors():
        files = plot(collect(dirs), out)
    for f in files:
        console.print(f"wrote {f}")


@app.command("compare")
def compare_cmd(
    run_a: Path = typer.Argument(..., help="run directory A"),
    run_b: Path = typer.Argument(..., help="run directory B"),
    exact_match: bool = typer.Option(False, help="compare exact match instead of token accuracy"),
    as_json: bool = typer.Option(False, "--json", help="print the numbers as JSON"),
    checkpoint: Optional[int] = typer.Option(None, help="two lifelong runs: pair them after this many edits "
                                                        "(default: the last checkpoint both reached)"),
) -> None:
    """Paired differences A - B on the shared cases: per metric, a 95% bootstrap interval and a p-value."""
    from mmke.eval.report import compare, render_compare

    with _user_errors():
        c = compare(run_a, run_b, exact_match=exact_match, checkpoint=checkpoint)
    typer.echo(json.dumps(c, indent=1) if as_json else render_compare(c))


@app.command("train")
def train_cmd(
    what: Optional[str] = typer.Argument(None, help="`base`: the default model's vision tower, projector "
                                                    "and LoRA; omit it and give --method to train an editor"),
    method: Optional[str] = typer.Option(None, help="trainable editor: mend, mend-vision, ke, serac, unike"),
    task: str = typer.Option("vqa", help="vqa or caption (editors are trained per task)"),
    model: str = typer.Option("default", help="model name or hf:<path-or-id>"),
    out: Optional[Path] = typer.Option(None, help="output directory (default: a user directory under the "
                                                   "mmke cache, printed; pass it to `mmke run --set weights=DIR`)"),
    replace_bundled: bool = typer.Option(False, help="overwrite the weights shipped with mmke for the "
                                                     "default model (maintainers only)"),
    steps: Optional[int] = typer.Option(None, help="optimiser steps (base: 500; editors: 300)"),
    batch_size: Optional[int] = typer.Option(None, help="edit cases per step (editors)"),
    lr: Optional[float] = typer.Option(None, help="learning rate (editors)"),
    val_size: Optional[int] = typer.Option(None, help="held-out train cases for validation (editors)"),
    val_every: Optional[int] = typer.Option(None, help="validate every N steps (editors)"),
    counterfactual: Optional[float] = typer.Option(None, help="fraction of training cases with a wrong "
                                                              "answer as the target (editors)"),
    train_data: Optional[Path] = typer.Option(None, help="MMEdit train file (default: the bundled split)"),
    image_root: Optional[Path] = typer.Option(None, "--train-image-root", "--image-root",
                                              help="root of the --train-data images (default: its folder)"),
    seed: int = typer.Option(0),
    set_: List[str] = typer.Option([], "--set", help="editor option key=value (repeatable)"),
    device: Optional[str] = typer.Option(None, help=_DEVICE_HELP + " (editors)"),
    dtype: str = typer.Option("fp32", help=_DTYPE_HELP + " (editors)"),
    device_map: Optional[str] = typer.Option(None, help=_DEVICE_MAP_HELP + " (editors)"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Train a trainable component (resumable: a re-run continues from its checkpoints)."""
    _setup_logging(verbose)
    with _user_errors():  # a bad --device / --dtype / --device-map fails before anything loads
        from mmke.models.placement import Placement

        Placement(device=device, dtype=dtype, device_map=device_map).resolved_map()
    if what is not None and method is not None:
        raise typer.BadParameter("give either `base` or --method, not both")
    if what is None and method is None:
        raise typer.BadParameter("what to train? `mmke train base` or `mmke train --method mend|ke|serac|...`")
    if what is not None:
        if what != "base":
            raise typer.BadParameter(f"cannot train {what!r}; use `base`, or --method for an editor")
        from mmke.models.default import WEIGHTS_DIR
        from mmke.paths import cache_dir
        from mmke.train.base_model import BaseTrainConfig, train_base

        if replace_bundled and out is not None:
            raise typer.BadParameter("give either --out or --replace-bundled")
        if device is not None or device_map is not None or dtype != "fp32":
            raise typer.BadParameter("`mmke train base` trains on the CPU in fp32; --device, --dtype and "
                                     "--device-map are for editor training (--method)")
        target = WEIGHTS_DIR if replace_bundled else (out or cache_dir() / "trained" / "default-base")
        console.print(f"training the default model's vision tower, projector and LoRA into {target}")
        result = train_base(BaseTrainConfig(steps=steps or 500, seed=seed, out=str(target)))
        console.print_json(json.dumps({k: v for k, v in result.items() if k != "train_config"}))
        console.print(f"weights in {target}" + ("" if replace_bundled else
                      " (load them with mmke.models.default.DefaultAdapter(weights_dir=...))"))
        return
    from mmke.registry import parse_option_sets
    from mmke.train.editors import EditorTrainConfig, train_method

    given = {"steps": steps, "batch_size": batch_size, "lr": lr, "val_size": val_size,
             "val_every": val_every, "counterfactual": counterfactual, "seed": seed}
    with _user_errors():
        cfg = EditorTrainConfig(**{k: v for k, v in given.items() if v is not None})
        meta = train_method(method, task, model, out, cfg, parse_option_sets(set_),
                            str(train_data) if train_data else None, str(image_root) if image_root else None,
                            replace_bundled=replace_bundled, device=device, dtype=dtype, device_map=device_map)
    console.print_json(json.dumps({k: meta[k] for k in ("method", "task", "model", "validation",
                                                         "train_wall_s_total")}))
    where = meta["command"].split(" --out ")[-1] if " --out " in meta["command"] else "the bundled weights"
    console.print(f"weights in {where}; use them with `mmke run --method {method} --task {task} "
                  f"--set weights={where}`" if " --out " in meta["command"] else f"weights in {where}")


@app.command("list")
def list_cmd(what: str = typer.Argument(..., help="methods, models, tasks, or options"),
             method: Optional[str] = typer.Argument(None, help="with `options`: the method")) -> None:
    """List registered methods, models or tasks, or the options of one method."""
    from mmke.registry import METHODS, MODELS, TASKS

    if what == "options":
        if method is None:
            raise typer.BadParameter("`mmke list options METHOD`, e.g. `mmke list options ft-lm`")
        from mmke.registry import editor_class

        with _user_errors():
            cls = editor_class(method)
        typer.echo(f"options of {method} (--set key=value):")
        for name, default, doc in cls.Config.option_docs():
            typer.echo(f"  {name:<18} {json.dumps(default):<22} {doc}")
        return
    table = {"methods": {k: v.description for k, v in METHODS.items()},
             "models": {k: v.description for k, v in MODELS.items()} | {"hf:<path-or-id>": "a Hugging Face VLM: "
                                                                        "BLIP-2 OPT, LLaVA-1.5/NeXT/OneVision, Qwen2-VL, "
                                                                        "Qwen2.5-VL, Idefics3, SmolVLM; or a MiniGPT-4 "
                                                                        "folder holding minigpt4.json"},
             "tasks": {k: f"{v.title}: {v.description}" for k, v in TASKS.items()}}
    if what not in table:
        typer.secho(f"error: choose one of {', '.join(table)}, options", fg="red", err=True)
        raise typer.Exit(2)
    width = max(len(k) for k in table[what]) + 2
    for k, v in table[what].items():
        typer.echo(f"{k:<{width}}{v}")


def main() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    main()
