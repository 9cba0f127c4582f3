"""Where a model's weights live and in which precision: ``--device``, ``--dtype``, ``--device-map``.

One :class:`Placement` is given to every model loader (the default model, the tiny families,
``hf:`` checkpoints). Placement uses accelerate: a device map (``"auto"``, a dict, or a JSON file
mapping module names to devices) dispatches the modules and installs accelerate's hooks that move
activations between devices; ``device`` puts the whole model on one device. The two are mutually
exclusive. ``dtype`` (fp32, bf16, fp16) is part of a run's identity; device and device map only
say where the same numbers are computed and are recorded in the run's provenance.

Editors never assume one device: they use :func:`module_device` of the module they touch.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Union

import torch
from torch import nn

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float": "fp32"}
DeviceMap = Union[str, dict[str, Any]]


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype:
    """``"fp32" | "bf16" | "fp16"`` (or a torch dtype) -> the torch dtype; None means fp32."""
    if name is None:
        return torch.float32
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise ValueError(f"dtype {name} is not supported; choose one of {', '.join(DTYPES)}")
        return name
    name = _ALIASES.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def check_device(device: str | int | torch.device, where: str = "--device") -> torch.device:
    """A usable torch device, or a ValueError that names it and says why not (no CUDA, no such
    index, unknown device type)."""
    if isinstance(device, int):
        device = f"cuda:{device}"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{where} {device!r}: not a device (cpu, cuda, cuda:1, mps, ...)") from e
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"{where} {device!r}: CUDA is not available here (torch {torch.__version__}, "
                             "0 CUDA devices)")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"{where} {device!r}: this machine has {n} CUDA device{'s' if n != 1 else ''} "
                             f"(cuda:0{f'..cuda:{n - 1}' if n > 1 else ''})")
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError(f"{where} {device!r}: MPS is not available here")
    elif dev.type != "cpu":
        raise ValueError(f"{where} {device!r}: unsupported device type {dev.type!r} (cpu, cuda, mps)")
    return dev


def read_device_map(path: str | Path) -> dict[str, str]:
    """A device map from a JSON file: an object mapping module names (``""`` = the whole model) to
    devices (``"cpu"``, ``"cuda:0"``, or a GPU index). Errors name the file and the bad entry."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--device-map {path}: no such file (give `auto` or a JSON file)") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"--device-map {path}: not valid JSON ({e})") from e
    return normalise_device_map(raw, str(path))


def normalise_device_map(raw: Any, source: str = "device map") -> dict[str, str]:
    """Check a device-map dict's form (names are strings, values usable devices) and return it with
    every device as a string; offloading to ``disk``/``meta`` is refused (editors change weights)."""
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{source}: a device map is a non-empty JSON object of module name -> device, "
                         f"got {type(raw).__name__}")
    out: dict[str, str] = {}
    for name, dev in raw.items():
        if not isinstance(name, str):
            raise ValueError(f"{source}: entry {name!r}: module names are strings")
        if isinstance(dev, bool) or not isinstance(dev, (str, int)):
            raise ValueError(f"{source}: entry {name!r}: device {dev!r} is not a device name or GPU index")
        if isinstance(dev, str) and dev in ("disk", "meta"):
            raise ValueError(f"{source}: entry {name!r}: offloading to {dev!r} is not supported (editors change "
                             "weights in place); put the module on a device")
        out[name] = str(check_device(dev, where=f"{source}: entry {name!r}: device"))
    on_cpu = [n for n, d in out.items() if d == "cpu"]
    if on_cpu and len(on_cpu) < len(out):
        raise ValueError(f"{source}: entry {on_cpu[0]!r} is on 'cpu' while others are on accelerators: accelerate "
                         "would offload it (its weights kept off the device, its parameters on 'meta'), which "
                         "editors cannot change in place; put every module on an accelerator, or all on 'cpu'")
    return out


def validate_device_map(model: nn.Module, device_map: dict[str, str], source: str = "device map") -> None:
    """Every entry names a module (or parameter) of ``model``, and every parameter and buffer is
    placed by exactly the most specific entry that contains it; otherwise a ValueError naming
    ``source`` and the entry or the unplaced tensor."""
    names = {n for n, _ in model.named_modules()} | {n for n, _ in model.named_parameters()}
    for entry in device_map:
        if entry not in names:
            close = sorted(n for n in names if n and (n.startswith(entry) or entry.startswith(n)))[:3]
            hint = f" (close: {', '.join(close)})" if close else ""
            raise ValueError(f"{source}: entry {entry!r} names no module of the model{hint}")

    def placed(t: str) -> bool:
        return "" in device_map or any(t == e or t.startswith(e + ".") for e in device_map)

    for t, _ in list(model.named_parameters()) + list(model.named_buffers()):
        if not placed(t):
            raise ValueError(f"{source}: no entry places {t!r}; add it, a module containing it, "
                             "or \"\" (the rest of the model)")


def module_device(module: nn.Module | torch.Tensor) -> torch.device:
    """The device of a module's (first) parameter or buffer, CPU for a module with neither: where
    an editor creates the tensors that work with that module."""
    if isinstance(module, torch.Tensor):
        return module.device
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def module_dtype(module: nn.Module) -> torch.dtype:
    for t in module.parameters():
        return t.dtype
    return torch.float32


@dataclass(frozen=True)
class Placement:
    """Where and in which precision a model is loaded. ``device_map``: ``"auto"``, a dict, or the
    path of a JSON file (read and checked by :meth:`resolved_map`)."""

    device: str | None = None
    dtype: str = "fp32"
    device_map: DeviceMap | None = None

    def __post_init__(self) -> None:
        parse_dtype(self.dtype)
        if self.device is not None and self.device_map is not None:
            raise ValueError("--device and --device-map are mutually exclusive: --device puts the whole model "
                             "on one device, --device-map spreads it over several (give one)")
        if self.device is not None:
            check_device(self.device)
        if isinstance(self.device_map, dict):
            normalise_device_map(self.device_map)

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype)

    def resolved_map(self) -> DeviceMap | None:
        """``"auto"``, a checked dict, or None."""
        dm = self.device_map
        if dm is None or isinstance(dm, dict):
            return None if dm is None else normalise_device_map(dm)
        if dm == "auto":
            return "auto"
        return read_device_map(dm)

    @property
    def source(self) -> str:
        """How the device map is named in errors."""
        return f"--device-map {self.device_map}" if isinstance(self.device_map, (str, Path)) else "device map"

    def is_default(self) -> bool:
        return self.device is None and self.device_map is None and self.dtype == "fp32"


def _no_split(model: nn.Module, no_split: Iterable[str] = ()) -> list[str]:
    """Module classes accelerate must keep whole: the model's own list plus ``no_split``."""
    names = set(no_split)
    for m in model.modules():
        names |= set(getattr(m, "_no_split_modules", None) or [])
    return sorted(names)


def place_model(model: nn.Module, placement: Placement, no_split: Iterable[str] = ()) -> nn.Module:
    """Cast ``model`` to the placement's dtype and put it where the placement says (in place;
    returns ``model``). A device map is dispatched with accelerate; an explicit map always installs
    accelerate's device-alignment hooks (also when every entry is one device) so that it runs
    the same code as a split model."""
    from accelerate import dispatch_model, infer_auto_device_map

    model.to(placement.torch_dtype)
    dm = placement.resolved_map()
    if dm is None:
        if placement.device is not None:
            model.to(check_device(placement.device))
        return model
    model.to("cpu")
    if dm == "auto":
        dm = infer_auto_device_map(model, no_split_module_classes=_no_split(model, no_split),
                                   dtype=placement.torch_dtype)
        dm = normalise_device_map(dm, "--device-map auto (accelerate's plan)")
        force = False
    else:
        validate_device_map(model, dm, placement.source)
        force = True
    devices = sorted(set(dm.values()))
    main = "cpu" if devices == ["cpu"] else next(d for d in devices if d != "cpu")
    quiet = logging.getLogger("accelerate.big_modeling")
    level = quiet.level
    if main == "cpu":  # accelerate warns of "offloaded" parameters whenever a map names the CPU
        quiet.setLevel(logging.ERROR)
    params = dict(model.named_parameters())
    loose = {k: d for k, d in dm.items() if k in params}  # entries naming a parameter, not a module
    try:
        with warnings.catch_warnings():  # accelerate places modules only; loose parameters are moved below
            warnings.filterwarnings("ignore", message="The following device_map keys do not match")
            dispatch_model(model, device_map=dm, main_device=main, force_hooks=force)
    finally:
        quiet.setLevel(level)
    with torch.no_grad():
        for k, d in loose.items():
            params[k].data = params[k].data.to(d)
    check_not_offloaded(model, placement.source)
    return model


def check_not_offloaded(model: nn.Module, source: str) -> None:
    """Refuse a model some of whose parameters accelerate offloaded (left on ``meta``, loaded per
    forward pass): an editor cannot change such weights in place."""
    off = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if off:
        raise ValueError(f"{source}: {len(off)} parameters were offloaded by accelerate (first: {off[0]!r}), "
                         "so editors cannot change them in place; give the model more accelerator memory "
                         "or a device map that keeps every module on a device")


def placement_record(model: nn.Module) -> dict[str, Any]:
    """Where a loaded model sits (for provenance): its devices, dtypes and device map if any."""
    devices = sorted({str(p.device) for p in model.parameters()})
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
    rec: dict[str, Any] = {"devices": devices, "dtypes": dtypes}
    dm = getattr(model, "hf_device_map", None)
    if dm:
        rec["device_map"] = {k: str(v) for k, v in dm.items()}
    return rec
