"""From an MMEdit record to the five evaluation inputs (SPEC §3)."""

from __future__ import annotations

from typing import Callable

from PIL import Image

from mmke.models.base import Example
from mmke.tasks import VQA_TEMPLATE, TaskSpec

INPUT_KINDS = ("reliability", "t_generality", "m_generality", "t_locality", "m_locality")


def case_inputs(record, task: TaskSpec, load_image: Callable[[str], Image.Image],
                reference_m_locality: bool = False) -> dict[str, Example]:
    """The five inputs of one case. Edit targets get a leading space; locality inputs are scored
    against the pre-edit model at the positions of their gold answer. With
    ``reference_m_locality`` the M-Locality input scores every text position (the reference
    implementation's variant) by making the whole question + answer the scored span."""
    img = load_image(record.image_path)
    target = " " + record.alt.strip()
    m_img = load_image(record.m_loc_path)
    m_q = VQA_TEMPLATE.format(record.m_loc_q)
    m_loc = (Example("", m_q + " " + record.m_loc_a.strip(), m_img) if reference_m_locality
             else Example(m_q, " " + record.m_loc_a.strip(), m_img))
    return {
        "reliability": Example(task.prompt(record.src), target, img),
        "t_generality": Example(task.prompt(record.rephrase), target, img),
        "m_generality": Example(task.prompt(record.src), target, load_image(record.image_rephrase_path)),
        "t_locality": Example(record.loc, " " + record.loc_ans.strip(), None),
        "m_locality": m_loc,
    }
