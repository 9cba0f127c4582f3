"""Which M-Locality inputs lie within the reach of edits made beside them.

A benchmark's own generality inputs say how far an edit should reach: to its rephrased question
(T-Generality, ``rephrase``) and to another image of the same content (M-Generality,
``image_rephrase``). So images linked by ``image_rephrase`` form one content class and questions
linked by ``rephrase`` one question class, closed transitively over a run's records. An
M-Locality input (``m_loc`` image, ``m_loc_q`` question) is *in scope* of a set of edits when one of
them has its content class and question class: an editor with perfect generality must change that
answer, so on it "locality" measures the opposite of locality.

With one edit at a time this never happens (the unrelated image is of other content by
construction), but once many edits are in place it does: on the bundled E-VQA v2, 37 of the 100
lifelong probes are in scope of the first 1,000 edits of the seed-0 stream. The summaries of
sequential, cross-task and lifelong runs therefore also report M-Locality over the inputs out of
scope of every edit in place (``m_locality_out_of_scope``), computed from the stored rows.
Nothing here needs labels: it works on any MMEdit-layout file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

from mmke.data.schema import norm_text

OUT_OF_SCOPE_M_LOCALITY = "m_locality_out_of_scope"


class EditScope:
    """Content classes of images and question classes over ``records`` (MMEdit records: objects
    with the fields as attributes, or dicts), by union-find."""

    def __init__(self, records: Iterable[Any], image_class: Callable[[str], Hashable] | None = None) -> None:
        """``image_class``: an image's content class from its path (labels a benchmark knows, e.g.
        easy-vqa's colour and shape) instead of the classes the records' ``image_rephrase`` links."""
        self._parent: dict[tuple[str, str], tuple[str, str]] = {}
        self._image_class = image_class
        for r in records:
            self._union(("image", _image(r, "image")), ("image", _image(r, "image_rephrase")))
            self._union(("q", norm_text(_get(r, "src"))), ("q", norm_text(_get(r, "rephrase"))))

    def _content(self, image: str) -> Hashable:
        return ("label", self._image_class(image)) if self._image_class is not None else self._find(("image", image))

    def _find(self, x: tuple[str, str]) -> tuple[str, str]:
        parent = self._parent
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def _union(self, a: tuple[str, str], b: tuple[str, str]) -> None:
        self._parent[self._find(a)] = self._find(b)

    def edit_key(self, record: Any) -> tuple:
        """(content class, question class) of an edit's own input."""
        return self._content(_image(record, "image")), self._find(("q", norm_text(_get(record, "src"))))

    def probe_key(self, record: Any) -> tuple:
        """(content class, question class) of a record's M-Locality input."""
        return self._content(_image(record, "m_loc")), self._find(("q", norm_text(_get(record, "m_loc_q"))))

    def covered(self, edits: Sequence[Any]) -> set[tuple]:
        """The (content, question) classes the edits ``edits`` reach."""
        return {self.edit_key(r) for r in edits}


def contradictions(records: Sequence[Any], checkpoints: Sequence[int],
                   image_class: Callable[[str], Hashable] | None = None) -> list[dict[str, Any]]:
    """How a stream of edits (``records`` in edit order) contradicts itself, after the first n of
    them for each n of ``checkpoints``: ``classes``, the distinct (content class, question class)
    pairs edited; ``same_target``, edits of a pair edited before with the same target;
    ``contradicting``, edits of a pair edited before with another target; and the retention an
    editor with perfect generality within each pair can reach at most (``latest_wins``: each pair
    answers its latest target; ``best_consistent``: each pair answers its most frequent one).
    An editor above these keeps edits apart that the benchmark's own generality inputs say are
    one (it must then fail M-Generality on them). ``image_class``: see :class:`EditScope`."""
    scope = EditScope(records, image_class)
    keys = [scope.edit_key(r) for r in records]
    targets = [norm_text(_get(r, "alt")) for r in records]
    out = []
    for n in checkpoints:
        seen: dict[tuple, list[str]] = {}
        same = contra = 0
        for k, t in zip(keys[:n], targets[:n]):
            before = seen.setdefault(k, [])
            if before:
                if any(b != t for b in before):
                    contra += 1
                else:
                    same += 1
            before.append(t)
        latest = sum(ts.count(ts[-1]) for ts in seen.values())
        best = sum(max(ts.count(t) for t in set(ts)) for ts in seen.values())
        out.append({"n_edits": n, "classes": len(seen), "same_target": same, "contradicting": contra,
                    "latest_wins": latest / n, "best_consistent": best / n})
    return out


def one_target_per_pair(records: Sequence[Any], image_class: Callable[[str], Hashable] | None = None
                        ) -> tuple[list[Any], int]:
    """``records`` (a stream, in edit order) made consistent: an edit of a (content class, question
    class) pair edited before gets that pair's first target, so no edit contradicts an earlier one
    (:func:`contradictions` finds none). Returns the records (changed ones copied with the new
    ``alt``; EditRecords or dicts) and how many were changed. A benchmark whose counterfactual
    targets were drawn case by case (MMEdit's, v2's) asks a generalising editor to give one content
    two answers; this is the same stream without that conflict (``--targets one-per-pair``)."""
    scope = EditScope(records, image_class)
    first: dict[tuple, str] = {}
    out, changed = [], 0
    for r in records:
        target = first.setdefault(scope.edit_key(r), _get(r, "alt"))
        if norm_text(target) != norm_text(_get(r, "alt")):
            r = {**r, "alt": target} if isinstance(r, dict) else dataclasses.replace(r, alt=target)
            changed += 1
        out.append(r)
    return out, changed


def _get(record: Any, field: str) -> str:
    return record[field] if isinstance(record, dict) else getattr(record, field)


def _image(record: Any, field: str) -> str:
    """The image of ``field`` as resolved on disk where the record knows it (one file, one name)."""
    path = None if isinstance(record, dict) else getattr(record, f"{field}_path", None)
    return str(path) if path is not None else _get(record, field)


__all__ = ["OUT_OF_SCOPE_M_LOCALITY", "EditScope", "contradictions", "one_target_per_pair"]
