"""The null editor: applies nothing. It is the protocol's own check — with it every locality
metric is exactly 1 and every post-edit metric equals the pre-edit one, on any model (a
difference would be an artefact of the evaluation, such as batching) — and its run is the
"unedited model" row of a table."""

from __future__ import annotations

from mmke.editors.base import EditHandle, Editor, EditorConfig, EditRequest


class NullEditor(Editor):
    name = "null"
    Config = EditorConfig

    @classmethod
    def uses_train_records(cls, config) -> bool:
        return False

    def edit(self, request: EditRequest) -> EditHandle:
        return EditHandle(self.adapter, self.name, meta={})
