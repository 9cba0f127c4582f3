"""IKE: in-context editing. The new fact and k demonstrations retrieved from the task's train split
(all-MiniLM-L6-v2 similarity) are put in front of every input (as ``Example.context``, before the
image); no weight changes. Demonstrations follow MMEdit's copy / update / retain kinds."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dataclasses import replace

from mmke.editors.base import EditHandle, Editor, EditorConfig, EditRequest, read_saved_edit
from mmke.models.base import Example
from mmke.retrieval import embed, top_k

log = logging.getLogger(__name__)


class IKEConfig(EditorConfig):
    k: int = 32
    max_context_tokens: int | None = None  # default: the model's context minus room for the input


def _fact(src: str, alt: str) -> str:
    return f"New Fact: {src} {alt}\n"


class IKEEditor(Editor):
    name = "ike"
    Config = IKEConfig

    def __init__(self, adapter, config=None, *, train_records=None, task=None, **context: Any) -> None:
        super().__init__(adapter, config, **context)
        # demonstrations use the task's prompt template, so they look like the inputs they precede
        self.template = task.prompt if task is not None else (lambda s: s)
        if not train_records:
            raise ValueError("ike needs a pool of train records for its demonstrations "
                             "(the task's train split; pass --train-data for your own files)")
        self.pool = train_records
        self.pool_emb = embed([_fact(r.src, r.alt) for r in self.pool])

    def _demo(self, i: int, r) -> str:
        """Demonstrations cycle through MMEdit's three kinds: copy, update (rephrase), retain (loc)."""
        kind = i % 3
        t = self.template
        if kind == 0:
            prompt = f"{t(r.src)} {r.alt}"
        elif kind == 1:
            prompt = f"{t(r.rephrase)} {r.alt}"
        else:
            prompt = f"{r.loc} {r.loc_ans}"
        return f"{_fact(t(r.src), r.alt)}Prompt: {prompt}\n\n"

    def _context(self, record: dict[str, Any], indices: list[int]) -> str:
        budget = self.config.max_context_tokens or max(self.adapter.max_length - 256, 64)
        tok = self.adapter.tokenizer
        fact = _fact(self.template(record["src"]), record["alt"]) + "Prompt:"
        used = len(tok(fact, add_special_tokens=False).input_ids)
        demos: list[str] = []
        # most similar demonstrations sit closest to the input
        for rank, j in enumerate(indices):
            d = self._demo(rank, self.pool[j])
            n = len(tok(d, add_special_tokens=False).input_ids)
            if used + n > budget:
                log.warning("ike: context limit of %d tokens reached; using %d of %d demonstrations",
                            budget, len(demos), len(indices))
                break
            demos.append(d)
            used += n
        return "".join(reversed(demos)) + fact

    def _install(self, ctx: str, meta: dict[str, Any]) -> EditHandle:
        def transform(ex: Example) -> Example:
            return replace(ex, context=ctx + ex.context)

        self.adapter.input_transforms.append(transform)
        return EditHandle(self.adapter, self.name, undo=lambda: self.adapter.input_transforms.remove(transform),
                          meta=meta)

    def edit(self, request: EditRequest) -> EditHandle:
        rec = request.record
        if not rec:
            raise ValueError("ike needs the MMEdit record (src, alt) of the edit")
        q = embed([_fact(rec["src"], rec["alt"])], cache=False)[0]
        idx = top_k(q, self.pool_emb, self.config.k)
        meta = {"src": rec["src"], "alt": rec["alt"], "demos": idx}
        return self._install(self._context(rec, idx), meta)

    def load(self, path: str | Path) -> EditHandle:
        method, meta, _ = read_saved_edit(path)
        if method != self.name:
            raise ValueError(f"{path}: saved by editor {method!r}, not {self.name!r}")
        return self._install(self._context(meta, meta["demos"]), meta)
