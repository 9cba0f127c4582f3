"""The contract every editor follows: ``edit(request) -> EditHandle`` with ``remove()`` and ``save()``.

An edit either changes parameters (the handle keeps the originals and restores them bit for bit)
or installs something beside the model (a prompt transform, a hook); ``remove()`` undoes exactly
what ``edit`` did. Handles are saved as safetensors (tensors) + JSON (everything else).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors.torch import load_file

from mmke.io import atomic_save_safetensors, atomic_write_json
from mmke.models.base import Example, ModelAdapter


@dataclass
class EditRequest:
    """What to teach: the edit input (image + templated prompt) and the new target (with its
    leading space); ``record`` is the raw MMEdit record when one exists (IKE reads its fields)."""

    example: Example
    record: dict[str, Any] = field(default_factory=dict)


class EditorConfig(BaseModel):
    """Base of every editor's config (pydantic: validated, with defaults that work)."""

    model_config = ConfigDict(extra="forbid")

    @classmethod
    def from_options(cls, method: str, options: dict[str, Any]) -> "EditorConfig":
        """Validate user options (``--set key=value``) with errors that name the option and list
        the valid ones."""
        unknown = sorted(set(options) - set(cls.model_fields))
        if unknown:
            raise ValueError(f"{method}: unknown option{'s' if len(unknown) > 1 else ''} "
                             f"{', '.join(map(repr, unknown))}; valid: {', '.join(sorted(cls.model_fields))} "
                             f"(`mmke list options {method}` explains them)")
        try:
            return cls(**options)
        except ValidationError as e:
            msg = "; ".join(f"option {'.'.join(map(str, x['loc'])) or '?'!r}: {x['msg']}" for x in e.errors())
            raise ValueError(f"{method}: {msg}") from None

    @classmethod
    def option_docs(cls) -> list[tuple[str, Any, str]]:
        """(name, default, one-line meaning) of every option, the meaning taken from the comment
        beside the field in the config class (or its bases)."""
        import inspect
        import re

        notes: dict[str, str] = {}
        for klass in reversed(cls.__mro__):
            try:
                src = inspect.getsource(klass)
            except (OSError, TypeError):
                continue
            for m in re.finditer(r"^\s+(\w+):[^\n#]*?#\s*(.+)$", src, re.M):
                notes[m.group(1)] = m.group(2).strip()
        return [(k, f.default, notes.get(k, "")) for k, f in cls.model_fields.items()]


class EditHandle:
    """Undo record of one applied edit."""

    def __init__(self, adapter: ModelAdapter, method: str, *, params: dict[str, torch.Tensor] | None = None,
                 undo: Callable[[], None] | None = None, meta: dict[str, Any] | None = None,
                 tensors: dict[str, torch.Tensor] | None = None) -> None:
        self.adapter = adapter
        self.method = method
        self._originals = params or {}  # parameter name -> original value (clone)
        self._undo = undo
        self.meta = meta or {}
        # what the edit *is*, for saving: new parameter values or added tensors
        self.tensors = tensors if tensors is not None else {}
        self.active = True

    def remove(self) -> None:
        """Restore the model exactly as it was before this edit."""
        if not self.active:
            return
        if self._originals:
            named = dict(self.adapter.model.named_parameters())
            with torch.no_grad():
                for name, value in self._originals.items():
                    named[name].copy_(value)
        if self._undo is not None:
            self._undo()
        self.active = False

    def save(self, path: str | Path) -> None:
        """Write ``path/edit.safetensors`` and ``path/edit.json``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors(self.tensors, path / "edit.safetensors")
        atomic_write_json(path / "edit.json", {"method": self.method, "meta": self.meta})


def read_saved_edit(path: str | Path) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """Read a saved edit (method, meta, tensors), with clear errors for missing or corrupt files."""
    path = Path(path)
    try:
        info = json.loads((path / "edit.json").read_text())
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: not a saved edit (edit.json missing)") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / 'edit.json'}: corrupt JSON: {e}") from e
    try:
        tensors = load_file(str(path / "edit.safetensors"))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: edit.safetensors missing") from e
    except Exception as e:  # safetensors raises its own error types for truncation
        raise ValueError(f"{path / 'edit.safetensors'}: unreadable or truncated ({e})") from e
    return info["method"], info.get("meta", {}), tensors


class Editor(ABC):
    """An editing method bound to one model adapter."""

    name: ClassVar[str]
    Config: ClassVar[type[EditorConfig]] = EditorConfig

    def __init__(self, adapter: ModelAdapter, config: EditorConfig | None = None, **context: Any) -> None:
        self.adapter = adapter
        self.config = config or self.Config()
        self.context = context  # e.g. train_records for IKE retrieval

    @abstractmethod
    def edit(self, request: EditRequest) -> EditHandle:
        """Apply one edit and return its handle."""

    @classmethod
    def uses_train_records(cls, config: EditorConfig) -> bool:
        """Whether the editor reads the task's train split at edit time (retrieval pools,
        locality memories); the runner loads it only for those that do."""
        return True

    def weights_digest(self) -> str | None:
        """Content hash of the trained weights this editor loaded (None: it has none). Recorded
        with every run, so that a resumed run cannot mix numbers of two sets of weights."""
        return None

    def load(self, path: str | Path) -> EditHandle:
        """Re-apply a saved edit. Default: parameter edits (tensors are new parameter values)."""
        method, meta, tensors = read_saved_edit(path)
        if method != self.name:
            raise ValueError(f"{path}: saved by editor {method!r}, not {self.name!r}")
        named = dict(self.adapter.model.named_parameters())
        missing = [k for k in tensors if k not in named]
        if missing:
            raise ValueError(f"{path}: parameters {missing[:3]} do not exist in this model")
        originals = {k: named[k].detach().clone() for k in tensors}
        with torch.no_grad():
            for k, v in tensors.items():
                if named[k].shape != v.shape:
                    raise ValueError(f"{path}: {k} has shape {tuple(v.shape)}, model has {tuple(named[k].shape)}")
                named[k].copy_(v)
        return EditHandle(self.adapter, self.name, params=originals, meta=meta, tensors=tensors)
