"""The contract every editor follows: ``edit(request) -> EditHandle`` with ``remove()`` and ``save()``.

An edit either changes parameters or installs something beside the model (a prompt transform, a
hook, a memory entry); ``remove()`` undoes exactly what ``edit`` did, in any order. Handles are
saved as safetensors (tensors) + JSON (everything else).

Edits compose: many can be applied to one model, and removing any of them, in any order, leaves the
model with the others. Parameter edits go through the model's :class:`WeightLedger`, which keeps,
per parameter, the chain of edits that changed it as the value before each (so an edit's delta is
the difference between its "before" and the next one's); removing an edit re-adds the later edits'
deltas to its own "before". Removing the most recent edit restores the previous state bit for bit,
and removing every edit, in any order, restores the unedited parameters bit for bit (the first
"before" of a chain is the unedited value and is never recomputed). Hook and memory editors compose
by construction: each edit's hook or entry is removed on its own.
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
            # the comment beside the field, and the comment-only lines that continue it
            for m in re.finditer(r"^\s+(\w+):[^\n#]*?#\s*(.+)$((?:\n[ \t]+#(?! -).*$)*)", src, re.M):
                more = [ln.strip().lstrip("#").strip() for ln in m.group(3).splitlines() if ln.strip()]
                notes[m.group(1)] = " ".join([m.group(2).strip(), *more])
        return [(k, f.default, notes.get(k, "")) for k, f in cls.model_fields.items()]


class WeightLedger:
    """The parameter edits applied to one model, as chains of "before" values per parameter.

    For a parameter changed by edits h1..hn (in order) with values b1..bn before each and c now,
    edit hi's delta is b(i+1) - bi (b(n+1) = c). Removing hi sets the parameter to
    bi + sum of the later deltas, and the later edits' "before" values move down accordingly. The
    unedited value b1 is only ever copied, so removing every edit restores it exactly, in any order.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.chains: dict[str, list[tuple[int, torch.Tensor]]] = {}  # parameter -> [(edit id, before)]
        self.base: dict[str, torch.Tensor] = {}  # unedited values of parameters whose edits were released
        # fp32 running values of bf16/fp16 parameters that edits changed: the parameter is its
        # master cast, so edits below the parameter's precision accumulate instead of vanishing
        self.masters: dict[str, torch.Tensor] = {}

    def master(self, name: str, param: torch.Tensor) -> torch.Tensor:
        """The fp32 value of parameter ``name`` (its master when the parameter is bf16/fp16 and the
        master still casts to it; else the parameter itself in fp32, a fresh master). An fp32
        parameter is its own master (returned as is, not copied)."""
        if param.dtype == torch.float32:
            return param.data
        m = self.masters.get(name)
        if m is None or m.device != param.device or not torch.equal(m.to(param.dtype), param.data):
            m = param.detach().float().clone()  # changed outside the ledger (e.g. loaded): start over
            self.masters[name] = m
        return m

    def set_master(self, name: str, param: torch.Tensor, value: torch.Tensor) -> None:
        """Set parameter ``name`` to the fp32 ``value``: kept as its master, the parameter its cast."""
        with torch.no_grad():
            if param.dtype == torch.float32:
                param.copy_(value)
                return
            self.masters[name] = value.detach().to(param.device, torch.float32).clone()
            param.copy_(self.masters[name])

    def add_deltas(self, params: dict[str, torch.nn.Parameter], deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Add fp32 ``deltas`` to ``params`` through their fp32 masters (the sum is formed in fp32
        and rounded once into the parameter) and return the parameters' values before (for
        :class:`EditHandle`)."""
        befores = {k: p.detach().clone() for k, p in params.items()}
        with torch.no_grad():
            for k, p in params.items():
                m = self.master(k, p)
                self.set_master(k, p, m + deltas[k].to(m.device, torch.float32))
        return befores

    @staticmethod
    def of(adapter: ModelAdapter) -> "WeightLedger":
        """The ledger of ``adapter``'s model (one per model, created on first use)."""
        ledger = getattr(adapter.model, "_mmke_weight_ledger", None)
        if ledger is None:
            ledger = WeightLedger(adapter.model)
            object.__setattr__(adapter.model, "_mmke_weight_ledger", ledger)  # not a submodule
        return ledger

    def record(self, edit_id: int, befores: dict[str, torch.Tensor]) -> None:
        """Note that edit ``edit_id`` changed these parameters from the given values (already applied)."""
        for name, before in befores.items():
            self.chains.setdefault(name, []).append((edit_id, before))

    def remove(self, edit_id: int) -> None:
        named = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, chain in list(self.chains.items()):
                ids = [e for e, _ in chain]
                if edit_id not in ids:
                    continue
                i = ids.index(edit_id)
                p = named[name]
                befores = [b for _, b in chain] + [p.detach().clone()]
                value = befores[i].clone()  # exactly the model before edit i ...
                later: list[tuple[int, torch.Tensor]] = []
                if i + 1 < len(befores) - 1:  # ... plus every later edit's delta, in order, in fp32
                    value = value.float()
                    for j in range(i + 1, len(chain)):
                        later.append((chain[j][0], value.to(p.dtype)))
                        value = value + (befores[j + 1].float() - befores[j].float())
                p.copy_(value)
                self.masters.pop(name, None)  # the parameter is exactly what it now holds
                self.chains[name] = chain[:i] + later
                if not self.chains[name]:
                    del self.chains[name]

    def release(self, edit_id: int) -> None:
        """Make edit ``edit_id`` and every earlier edit of the same parameters permanent: their
        "before" values are dropped (memory for long edit streams), keeping only the unedited value
        for :meth:`restore_all`."""
        for name, chain in list(self.chains.items()):
            ids = [e for e, _ in chain]
            if edit_id in ids:
                i = ids.index(edit_id)
                self.base.setdefault(name, chain[0][1])
                self.chains[name] = chain[i + 1:]
                if not self.chains[name]:
                    del self.chains[name]

    def restore_all(self) -> None:
        """Put every parameter any edit changed back to its unedited value (released edits too)."""
        named = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, chain in self.chains.items():
                self.base.setdefault(name, chain[0][1])
            for name, value in self.base.items():
                named[name].copy_(value)
        self.chains.clear()
        self.base.clear()
        self.masters.clear()


class EditHandle:
    """Undo record of one applied edit. ``params``: the values of the parameters the edit changed,
    as they were just before it (the edit is already applied)."""

    _next_id = 0

    def __init__(self, adapter: ModelAdapter, method: str, *, params: dict[str, torch.Tensor] | None = None,
                 undo: Callable[[], None] | None = None, meta: dict[str, Any] | None = None,
                 tensors: dict[str, torch.Tensor] | None = None) -> None:
        self.adapter = adapter
        self.method = method
        EditHandle._next_id += 1
        self.id = EditHandle._next_id
        self._params = bool(params)
        if params:
            WeightLedger.of(adapter).record(self.id, params)
        self._undo = undo
        self.meta = meta or {}
        # what the edit *is*, for saving: new parameter values or added tensors
        self.tensors = tensors if tensors is not None else {}
        self.active = True
        self.released = False

    def remove(self) -> None:
        """Take this edit out: the model is left exactly as it would be with the other applied
        edits only (bit for bit once every edit is removed, in any order)."""
        if not self.active:
            return
        if self.released:
            raise RuntimeError(f"{self.method} edit {self.id} was released (made permanent) and cannot be "
                               "removed on its own; restore the model with WeightLedger.restore_all")
        if self._params:
            WeightLedger.of(self.adapter).remove(self.id)
        if self._undo is not None:
            self._undo()
        self.active = False

    def release(self) -> None:
        """Make a parameter edit permanent (with every earlier edit of the same parameters), freeing
        the copies kept for undo and for saving (a released edit cannot be saved): for long edit
        streams that are never undone one by one — 1,000 MEND edits would otherwise hold 21 GB of
        copies on the default model. The unedited values stay with the model's ledger
        (:meth:`WeightLedger.restore_all`). No-op for edits that change no parameter."""
        if self._params and self.active:
            WeightLedger.of(self.adapter).release(self.id)
            self.released = True
            self.tensors = {}

    def save(self, path: str | Path) -> None:
        """Write ``path/edit.safetensors`` and ``path/edit.json``."""
        if self.released:
            raise RuntimeError(f"{self.method} edit {self.id} was released: its tensors are gone; save before release()")
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
        for k, v in tensors.items():
            if named[k].shape != v.shape:
                raise ValueError(f"{path}: {k} has shape {tuple(v.shape)}, model has {tuple(named[k].shape)}")
        originals = {k: named[k].detach().clone() for k in tensors}
        with torch.no_grad():
            for k, v in tensors.items():
                named[k].copy_(v)
        return EditHandle(self.adapter, self.name, params=originals, meta=meta, tensors=tensors)
