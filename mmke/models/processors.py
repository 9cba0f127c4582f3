"""Loading a checkpoint's processor, without the video part where that part cannot be built.

The processors of Qwen2-VL / Qwen2.5-VL, LLaVA-OneVision and SmolVLM bundle a video processor that
needs torchvision (``AutoProcessor.from_pretrained`` fails without it: "Qwen2VLVideoProcessor
requires the Torchvision library"). mmke passes images and text only, so it builds the family's own
processor class from the image processor and tokenizer alone, reading the same files; nothing of
the image path changes (tests compare it with the full processor's output).
"""

from __future__ import annotations

import logging
import types
from typing import Any

log = logging.getLogger(__name__)


def image_only_processor_class(cls: type) -> type:
    """``cls`` (a transformers processor class) without its video processor: the same class, name
    and ``__call__`` for text and images, constructed (and loaded with ``from_pretrained``) from
    its image processor and tokenizer alone. mmke never passes videos; this spares the
    torchvision dependency of the video processors of Qwen2-VL, LLaVA-OneVision and SmolVLM."""
    base = cls.get_attributes()
    if "video_processor" not in base:
        return cls
    attrs = [a for a in base if a != "video_processor"]
    # The family's own __init__ (same code, so the same signature and accepted options), with
    # video_processor defaulting to None: ProcessorMixin zips the sub-processors it is handed
    # with get_attributes(), so a video processor given or not is dropped.
    init = cls.__init__
    code = init.__code__
    names = code.co_varnames[: code.co_argcount]
    defaults = init.__defaults__ or ()
    kwdefaults = dict(init.__kwdefaults__ or {})
    if "video_processor" in names:
        first = len(names) - len(defaults)
        defaults = (None,) * max(0, first - names.index("video_processor")) + defaults
    else:
        kwdefaults.setdefault("video_processor", None)
    new_init = types.FunctionType(code, init.__globals__, init.__name__, defaults, init.__closure__)
    new_init.__kwdefaults__ = kwdefaults or None
    new_init.__qualname__, new_init.__doc__ = init.__qualname__, init.__doc__
    return type(cls.__name__, (cls,), {
        "__init__": new_init, "__module__": cls.__module__, "without_video_of": cls,
        "__doc__": f"{cls.__name__} for text and images only (no video processor)",
        "get_attributes": classmethod(lambda c: list(attrs))})


def load_processor(name_or_path: str, model_type: str) -> Any:
    """The checkpoint's processor through ``AutoProcessor``; where that fails because the family's
    video processor cannot be built here (Qwen2-VL, LLaVA-OneVision and SmolVLM need torchvision
    for it), the same processor class without the video part, from the same files."""
    import transformers
    from transformers import AutoProcessor
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    try:
        return AutoProcessor.from_pretrained(name_or_path)
    except (ImportError, OSError, ValueError) as err:
        cls = getattr(transformers, PROCESSOR_MAPPING_NAMES.get(model_type) or "", None)
        if cls is None or "video_processor" not in cls.get_attributes():
            raise
        try:
            processor = image_only_processor_class(cls).from_pretrained(name_or_path)
        except Exception as again:
            raise again from err
        log.info("%s: %s loaded without its video processor (%s)", name_or_path, cls.__name__,
                 str(err).strip().splitlines()[0])
        return processor
