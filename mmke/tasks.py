"""Edit tasks: how prompts are templated (SPEC §1) and how reports title them."""

from __future__ import annotations

from dataclasses import dataclass

VQA_TEMPLATE = "Question: {} Short answer:"


@dataclass(frozen=True)
class TaskSpec:
    """A task: how its prompts are templated and which bundled files hold it."""

    name: str
    title: str  # column-group title in reports
    template: str  # applied to src / rephrase
    description: str

    def prompt(self, text: str) -> str:
        return self.template.format(text)

    def files(self) -> tuple[str, str]:
        """(eval, train) file names in a built benchmark directory."""
        return f"{self.name}_eval.json", f"{self.name}_train.json"


TASKS: dict[str, TaskSpec] = {
    "vqa": TaskSpec("vqa", "E-VQA", VQA_TEMPLATE, "editing visual question answering"),
    "caption": TaskSpec("caption", "E-IC", "{}", "editing image captioning"),
}
