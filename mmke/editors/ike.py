"""IKE: in-context knowledge editing (Zheng et al., "Can We Edit Factual Knowledge by In-Context
Learning?", EMNLP 2023), in the multimodal form of the MMEdit reference (EasyEdit
``easyeditor/models/ike/ike_main.py`` and ``multimodal_evaluate.py``, hparams ``IKE/blip2.yaml``).

No weight changes: the new fact and k demonstrations are put in front of every input. Several
applied edits share one context (their demonstrations, each edit's share of the budget, then every
edit's copy demonstration and the latest new fact): IKE's memory is its context, and it grows.

- **Demonstration pool** (paper §3.2; reference ``encode_ike_facts_multimodal``): three sentences per
  train record, with new_fact = "{prompt} {answer}":
  copy ``"New Fact: {new_fact}\\nPrompt: {new_fact}\\n\\n"``,
  update ``"New Fact: {new_fact}\\nPrompt: {rephrase} {answer}\\n\\n"``,
  retain ``"New Fact: {new_fact}\\nPrompt: {loc} {loc answer}\\n\\n"``.
- **Retrieval**: the k = 32 pool sentences most cosine-similar (all-MiniLM-L6-v2, as the reference)
  to the query ``"New Fact: {edit new_fact}\\nPrompt: {edit new_fact}\\n\\n"``, most similar first,
  followed by the edit's own copy demonstration.
- **Input**: ``"".join(demonstrations) + "New Fact: {edit prompt} {edit answer}\\nPrompt: {input}"``,
  scored on ``" " + target``. The image comes first, before all of this text, as in the reference
  for BLIP-2 and MiniGPT-4 (``image_first``). ``image_first=False`` is mmke's layout: the
  demonstrations go before the image (``Example.context``), the query ``"New Fact: ...\\nPrompt:
  {input}"`` after it, so the five inputs of a case share one prefix whose KV cache adapters
  compute once (the default model and the ``hf:`` families). In the published layout the default
  model still reuses, for an input of 2,048 tokens or more, the KV cache of the head it shares with
  an input on the same image scored just before it (a case's Rel and T-Gen; a group's text-only
  T-Loc inputs): ``DefaultVLM.long_row``.

In both layouts the query and the input are one piece of text, tokenised together: the input's
first word carries its leading space exactly as in the demonstrations (``Prompt: Question: ...``).

Prompts are in the task's template (``"Question: {} Short answer:"`` for VQA), as every method's
inputs are in mmke's protocol; the reference feeds the raw question. Demonstrations that would not
fit the model's context are dropped, least similar first, with a warning.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from mmke.editors.base import EditHandle, Editor, EditorConfig, EditRequest, read_saved_edit
from mmke.models.base import Example
from mmke.retrieval import embed, top_k

log = logging.getLogger(__name__)


class IKEConfig(EditorConfig):
    k: int = 32
    image_first: bool = True  # the reference's layout; False: demonstrations before the image, query after
    max_context_tokens: int | None = None  # default: the model's context minus room for the input


def demo(new_fact: str, prompt: str) -> str:
    """One demonstration (or the query): ``"New Fact: {new_fact}\\nPrompt: {prompt}\\n\\n"``."""
    return f"New Fact: {new_fact}\nPrompt: {prompt}\n\n"


def pool_sentences(records, template) -> list[str]:
    """The reference's three demonstrations (copy, update, retain) of every train record."""
    out = []
    for r in records:
        nf = f"{template(r.src)} {r.alt.strip()}"
        out += [demo(nf, nf), demo(nf, f"{template(r.rephrase)} {r.alt.strip()}"),
                demo(nf, f"{r.loc} {r.loc_ans.strip()}")]
    return out


class IKEEditor(Editor):
    name = "ike"
    Config = IKEConfig

    def __init__(self, adapter, config=None, *, train_records=None, task=None, **context: Any) -> None:
        super().__init__(adapter, config, **context)
        # demonstrations use the task's prompt template, so they look like the inputs they precede
        self.template = task.prompt if task is not None else (lambda s: s)
        if not train_records:
            raise ValueError("ike needs a pool of train records for its demonstrations (the task's train "
                             "split: IKEEditor(..., train_records=...), or --train-data on the command line)")
        self.pool = pool_sentences(train_records, self.template)
        self.pool_emb = embed(self.pool)
        self._active: list[tuple[dict[str, Any], list[int]]] = []  # (meta, demonstrations) of applied edits
        self._transform = None

    def _new_fact(self, record: dict[str, Any]) -> str:
        return f"{self.template(record['src'])} {record['alt'].strip()}"

    def _context(self, record: dict[str, Any], indices: list[int]) -> tuple[str, int]:
        """The demonstrations (most similar first), the edit's copy demonstration and the new fact,
        ending in "Prompt: " so that the input follows; and how many demonstrations fitted."""
        demos, query, used = self._joint_context([(record, indices)])
        return demos + query, used[0]

    def _joint_context(self, edits: list[tuple[dict[str, Any], list[int]]]) -> tuple[str, str, list[int]]:
        """The context of several active edits (sequential editing: IKE's memory is its context),
        as (demonstrations, query head, demonstrations used per edit): every edit's demonstrations,
        each edit's share of the token budget (most similar first), then every edit's copy
        demonstration; the query head "New Fact: {the latest edit's fact}\nPrompt: " that the input
        follows. With one edit this is exactly the single-edit context."""
        facts = [self._new_fact(r) for r, _ in edits]
        query = f"New Fact: {facts[-1]}\nPrompt: "
        tail = "".join(demo(nf, nf) for nf in facts) + query
        budget = self.config.max_context_tokens or max(self.adapter.max_length - 256, 64)
        tok = self.adapter.tokenizer
        share = (budget - len(tok(tail, add_special_tokens=False).input_ids)) / len(edits)
        parts, used_n = [], []
        for _, indices in edits:
            used, demos = 0, []
            for j in indices:
                n = len(tok(self.pool[j], add_special_tokens=False).input_ids)
                if used + n > share:
                    break
                demos.append(self.pool[j])
                used += n
            parts.append("".join(demos))
            used_n.append(len(demos))
        if any(u < len(ix) for u, (_, ix) in zip(used_n, edits)):
            # a warning once per editor, then debug: each edit's count is in its meta (``n_demos_used``)
            said = getattr(self, "_said_limit", False)
            log.log(logging.DEBUG if said else logging.WARNING,
                    "ike: context limit of %d tokens reached; using %d-%d of %d demonstrations per edit%s%s",
                    budget, min(used_n), max(used_n), max(len(ix) for _, ix in edits),
                    f" with {len(edits)} active edits" if len(edits) > 1 else "",
                    "" if said else " (not repeated: each edit's count is in its meta, n_demos_used)")
            self._said_limit = True
        return "".join(parts) + tail[: -len(query)], query, used_n

    def _install(self, meta: dict[str, Any]) -> EditHandle:
        """Add an edit to the active ones; one input transform serves them all."""
        entry = (meta, list(meta["demos"]))
        self._active.append(entry)
        self._refresh()

        def undo() -> None:
            self._active.remove(entry)
            self._refresh()

        return EditHandle(self.adapter, self.name, undo=undo, meta=meta)

    def _refresh(self) -> None:
        if self._transform is not None:
            self.adapter.input_transforms.remove(self._transform)
            self._transform = None
        if not self._active:
            return
        demos, query, used = self._joint_context(self._active)
        self._active[-1][0]["n_demos_used"] = used[-1]
        if self.config.image_first:
            def transform(ex: Example) -> Example:  # text after the image: part of the prompt
                return replace(ex, prompt=demos + query + ex.prompt)
        else:
            def transform(ex: Example) -> Example:  # demonstrations before the image, query after it
                return replace(ex, prompt=query + ex.prompt, context=demos + ex.context)

        self._transform = transform
        self.adapter.input_transforms.append(transform)

    def edit(self, request: EditRequest) -> EditHandle:
        rec = request.record
        if not rec or "src" not in rec or "alt" not in rec:
            raise ValueError("ike needs the MMEdit record (src, alt) of the edit: EditRequest(example, record)")
        nf = self._new_fact(rec)
        q = embed([demo(nf, nf)], cache=False)[0]
        idx = top_k(q, self.pool_emb, self.config.k)
        meta = {"src": rec["src"], "alt": rec["alt"], "demos": idx, "image_first": self.config.image_first}
        return self._install(meta)

    def load(self, path: str | Path) -> EditHandle:
        method, meta, _ = read_saved_edit(path)
        if method != self.name:
            raise ValueError(f"{path}: saved by editor {method!r}, not {self.name!r}")
        return self._install(meta)


class IKEPrefixConfig(IKEConfig):
    image_first: bool = False


class IKEPrefixEditor(IKEEditor):
    """mmke's IKE: the same demonstrations and query, but the demonstrations go before the image
    (``image_first=False``) so that the five inputs of a case share one prefix whose KV cache is
    computed once. The published layout (image first) stays ``ike``."""

    name = "ike-prefix"
    Config = IKEPrefixConfig
