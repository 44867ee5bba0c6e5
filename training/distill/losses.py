"""The distillation loss of SAK and the Rep Sim score (teachers and their views: `teachers.py`).

Paper: Lu, Cao and Wang, "Swiss Army Knife: Synergizing Biases in Knowledge from Vision Foundation Models for
Multi-Task Learning" (ICLR 2025; shared/papers/sak.md, section 3.4, eq. 5). For every teacher k and level l the
student's (aligned) Teacher-Specific Adapter Path output R and the teacher's block output T are compared after the
smaller map is resized bilinearly to the larger one:

    L = sum_k sum_l  0.9 * (1 - cos(flatten(R), flatten(T))) + 0.1 * SmoothL1(R, T)

with the cosine taken over each image's whole flattened map (C*h*w values) and averaged over the batch, as the public
code does with `CosineEmbeddingLoss` on `flatten(1)` (shared/MODEL_NOTES.md §2).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

COSINE_WEIGHT = 0.9
SMOOTH_L1_WEIGHT = 0.1


def match_sizes(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Resize the smaller (by area) of two B C h w maps bilinearly to the other's size; equal sizes pass through."""
    if student.shape[-2:] == teacher.shape[-2:]:
        return student, teacher
    if student.shape[-2] * student.shape[-1] < teacher.shape[-2] * teacher.shape[-1]:
        return F.interpolate(student, size=teacher.shape[-2:], mode="bilinear", align_corners=False), teacher
    return student, F.interpolate(teacher, size=student.shape[-2:], mode="bilinear", align_corners=False)


def feature_distillation_loss(
    student: Tensor,
    teacher: Tensor,
    *,
    cosine_weight: float = COSINE_WEIGHT,
    smooth_l1_weight: float = SMOOTH_L1_WEIGHT,
) -> Tensor:
    """0.9 * (1 - cosine over each flattened map) + 0.1 * SmoothL1 between two B C h w maps (sizes matched first).

    Raises:
        ValueError: batch or channel counts differ (an aligner is missing or has the wrong width).
    """
    if student.shape[:2] != teacher.shape[:2]:
        raise ValueError(
            f"student map {tuple(student.shape)} and teacher map {tuple(teacher.shape)} differ in batch or channels; "
            "the student needs an aligner to the teacher's width (model.sak.aligners=true)"
        )
    student, teacher = match_sizes(student.float(), teacher.float())
    cosine = F.cosine_similarity(student.flatten(1), teacher.flatten(1), dim=1)  # B
    return cosine_weight * (1.0 - cosine).mean() + smooth_l1_weight * F.smooth_l1_loss(student, teacher)


def distillation_losses(
    student: Mapping[str, Sequence[Tensor]], teacher: Mapping[str, Sequence[Tensor]]
) -> dict[str, Tensor]:
    """One loss per (teacher, level), keyed `"<teacher>/<level>"`; their sum is eq. 5.

    Args:
        student: teacher key -> aligned student maps (B C_k h w), one per level.
        teacher: teacher key -> teacher maps (B C_k h' w'), one per level, same keys and level counts.
    """
    if set(student) != set(teacher):
        raise ValueError(f"student features for {sorted(student)} but teacher features for {sorted(teacher)}")
    losses: dict[str, Tensor] = {}
    for key, maps in student.items():
        if len(maps) != len(teacher[key]):
            raise ValueError(f"teacher {key!r}: {len(maps)} student levels but {len(teacher[key])} teacher levels")
        for level, (s, t) in enumerate(zip(maps, teacher[key], strict=True)):
            losses[f"{key}/{level}"] = feature_distillation_loss(s, t)
    return losses


@torch.no_grad()
def representation_similarity(
    student: Mapping[str, Sequence[Tensor]], teacher: Mapping[str, Sequence[Tensor]]
) -> dict[str, Tensor]:
    """The paper's "Rep Sim": per teacher, the cosine between student and teacher maps, per image, mean over levels.

    Returns:
        teacher key -> B similarities (sum them over batches and divide by the image count for the dataset mean).
    """
    out = {}
    for key, maps in student.items():
        per_level = []
        for s, t in zip(maps, teacher[key], strict=True):
            s, t = match_sizes(s.float(), t.float())
            per_level.append(F.cosine_similarity(s.flatten(1), t.flatten(1), dim=1))
        out[key] = torch.stack(per_level).mean(0)
    return out
