"""Editors with learned weights (MEND, KE, SERAC, UniKE's encoders).

The contract with ``mmke train``: an editor class builds its learnable module from the adapter and
its config (:meth:`TrainedEditor.build_module`), says what one training case costs
(:meth:`TrainedEditor.train_loss`), and at run time loads the module's weights from a directory
written by training: ``weights.safetensors`` (never pickle) + ``weights.json`` (method, task,
model, architecture options, how it was trained). The bundled default model ships trained weights
under ``mmke/assets/editors/<method>-<task>/``; for any other model the user trains them and passes
``--set weights=DIR``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from abc import abstractmethod
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from mmke.editors.base import Editor, EditorConfig
from mmke.io import atomic_save_safetensors, atomic_write_json
from mmke.models.placement import module_device
from mmke.paths import ASSETS

log = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.safetensors"
META_FILE = "weights.json"


class TrainedEditorConfig(EditorConfig):
    #: directory written by ``mmke train``; default: the bundled weights (default model only)
    weights: str | None = None


def bundled_weights_dir(method: str, task: str) -> Path:
    return ASSETS / "editors" / f"{method}-{task}"


def train_command(method: str, task: str, model: str) -> str:
    return f"mmke train --method {method} --task {task} --model {model} --out DIR"


def save_weights(out: str | Path, module: nn.Module, meta: dict[str, Any]) -> None:
    """Write ``weights.safetensors`` + ``weights.json`` into ``out`` (atomically per file)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(module.state_dict(), out / WEIGHTS_FILE)
    atomic_write_json(out / META_FILE, meta, sort_keys=True)


def read_weights(d: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata of a weights directory, with errors that say what is wrong."""
    d = Path(d)
    f, m = d / WEIGHTS_FILE, d / META_FILE
    if not f.exists():
        raise FileNotFoundError(f"{f}: trained editor weights not found")
    try:
        meta = json.loads(m.read_text()) if m.exists() else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{m}: corrupt JSON ({e})") from e
    try:
        state = load_file(str(f))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{f}: unreadable, truncated or corrupt safetensors file ({e}); "
                         "retrain or restore it") from e
    return state, meta


def load_module_weights(d: str | Path, module: nn.Module) -> dict[str, Any]:
    """Load ``d``'s weights into ``module`` strictly (every key, every shape); return the meta."""
    state, meta = read_weights(d)
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise ValueError(f"{Path(d) / WEIGHTS_FILE}: does not match this editor's architecture "
                         f"(missing {missing[:3]}, unexpected {extra[:3]}); were they trained with "
                         "other options or for another model?")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise ValueError(f"{Path(d) / WEIGHTS_FILE}: {k} has shape {tuple(v.shape)}, this editor "
                             f"expects {tuple(own[k].shape)} (trained for another model or options?)")
    module.load_state_dict(state)
    return meta


class TrainedEditor(Editor):
    """Base of editors whose learned module comes from ``mmke train``.

    ``untrained=True`` builds the module without loading weights (what training starts from).
    """

    Config = TrainedEditorConfig
    #: the method whose trained module this editor loads (a variant that only changes how the
    #: module is used shares its method's weights); None: its own name
    weights_of: str | None = None

    def __init__(self, adapter, config=None, *, task=None, train_records=None, untrained: bool = False,
                 model_name: str | None = None, **context: Any) -> None:
        super().__init__(adapter, config, **context)
        self.task = task
        self.train_records = train_records or []
        self.model_name = model_name or adapter.name
        self.module = self.build_module().to(self.home_device())
        self.weights_meta: dict[str, Any] = {}
        if not untrained:
            self.weights_meta = load_module_weights(self.weights_dir(), self.module)
            trained_for = self.weights_meta.get("model")
            if trained_for and trained_for != self.model_name:
                log.warning("%s: weights in %s were trained for model %r, not %r", self.name,
                            self.weights_dir(), trained_for, self.model_name)
        self.module.eval()
        self.module.requires_grad_(False)

    def home_device(self) -> torch.device:
        """Where the learned module lives: by default the device of the LM's last layer (where the
        states it reads end up). Inputs from other devices are moved to it where they meet it."""
        return module_device(self.adapter.lm_layers()[-1])

    @property
    def device(self) -> torch.device:
        """The device of the learned module."""
        return module_device(self.module)

    # ---- what a trainable method implements -------------------------------------------
    @abstractmethod
    def build_module(self) -> nn.Module:
        """The learnable module, freshly initialised, for this adapter and config."""

    @abstractmethod
    def train_loss(self, case) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one training case (:class:`mmke.train.editors.TrainCase`), differentiable in
        ``self.module``, and named parts of it for the log."""

    def fit(self, records: list, out: str | Path, cfg, command: str = "") -> dict[str, Any]:
        """Train ``self.module`` on train-split records and write the weights directory. Default:
        the shared per-case loop (:func:`mmke.train.editors.train_editor`); methods whose training
        is not per edit case (UniKE's contrastive encoders) override this."""
        from mmke.train.editors import train_editor

        return train_editor(self, records, out, cfg, command=command)

    def architecture(self) -> dict[str, Any]:
        """Options that shape the module (saved with the weights)."""
        return {k: v for k, v in self.config.model_dump().items() if k != "weights"}

    @classmethod
    def uses_train_records(cls, config) -> bool:
        return False  # the train split trains the module (``mmke train``); edits do not read it

    def weights_digest(self) -> str | None:
        """sha256 (16 hex) over the weight files of the loaded directory (safetensors files,
        sorted by name); None when the editor runs without trained weights."""
        if not self.weights_meta:
            return None
        h = hashlib.sha256()
        for f in sorted(Path(self.weights_dir()).glob("*.safetensors")):
            h.update(f.name.encode())
            h.update(f.read_bytes())
        return h.hexdigest()[:16]

    # ---- where the weights are ----------------------------------------------------------
    def weights_dir(self) -> Path:
        task = self.task.name if self.task is not None else "vqa"
        method = self.weights_of or self.name
        if self.config.weights:
            d = Path(self.config.weights)
            if not (d / WEIGHTS_FILE).exists():
                raise FileNotFoundError(f"{self.name}: no {WEIGHTS_FILE} in {d}; train with "
                                        f"`{train_command(method, task, self.model_name)}`")
            return d
        d = bundled_weights_dir(method, task)
        if self.model_name != "default" or not (d / WEIGHTS_FILE).exists():
            raise FileNotFoundError(
                f"{self.name} needs trained weights for model {self.model_name!r} on task {task!r}; "
                f"none are bundled. Train them with `{train_command(method, task, self.model_name)}` "
                f"(or mmke.train.editors.train_method) and give the directory as the option weights=DIR "
                f"(`--set weights=DIR` on the command line)")
        return d
