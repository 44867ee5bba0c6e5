"""The frozen teachers of SAK's multi-teacher distillation: their views of the image and their features.

Paper: Lu, Cao and Wang (ICLR 2025; shared/papers/sak.md, section 3.4); the loss is in `losses.py`.

Teachers see the same ImageNet-normalised image as the student, resized per teacher: `keep_aspect` scales the longer
side to the teacher's input size (sides rounded to its patch size), `longest_pad` is SAM's preprocessing (longer side
to the input size, zero padding to a square). Their features are raw block outputs at evenly spaced blocks (the
public code's `forward_intermediates(norm=False)`); where padding was added, the feature map is cropped back to the
image's own cells, so the student is never asked to reproduce the teacher's view of the padding.
"""

from __future__ import annotations

import inspect
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ResizeMode = Literal["keep_aspect", "longest_pad"]


def evenly_spaced_levels(depth: int, count: int = 4) -> tuple[int, ...]:
    """0-based indices of `count` evenly spaced blocks ending at the last: depth 12 -> (2, 5, 8, 11) = L/4 ... L.

    Raises:
        ValueError: fewer blocks than levels.
    """
    if count < 1 or depth < count:
        raise ValueError(f"{count} feature levels need a model with at least {count} blocks; this one has {depth}")
    return tuple(depth * (i + 1) // count - 1 for i in range(count))


@dataclass(frozen=True)
class TeacherView:
    """How one teacher sees the image and which of its features are the targets.

    Attributes:
        input_size: longer side of the teacher's input in pixels.
        resize: "keep_aspect" (longer side to `input_size`, both sides rounded to the patch size) or "longest_pad"
            (SAM: longer side to `input_size`, zero-padded to `input_size` square).
        levels: teacher block indices, one per student level.
        norm: apply the teacher's final norm to the block outputs (`forward_intermediates(norm=True)`).
        max_grid: area-downsample the maps to at most this many cells per side (None = as the teacher gives them).
    """

    input_size: int
    resize: ResizeMode
    levels: tuple[int, ...]
    norm: bool = False
    max_grid: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_size": self.input_size,
            "resize": self.resize,
            "levels": list(self.levels),
            "norm": self.norm,
            "max_grid": self.max_grid,
        }


def teacher_input(x: Tensor, view: TeacherView, patch_size: int) -> tuple[Tensor, tuple[int, int]]:
    """Resize a normalised B 3 H W image for a teacher.

    Returns:
        (teacher input, (rows, cols) of patch cells that cover the image itself: the padding's cells are outside).
    """
    height, width = x.shape[-2:]
    scale = view.input_size / max(height, width)
    if view.resize == "longest_pad":
        new_h, new_w = max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))
        resized = _resize(x, (new_h, new_w))
        side = math.ceil(view.input_size / patch_size) * patch_size
        padded = F.pad(resized, (0, side - new_w, 0, side - new_h))  # zeros = the mean colour after normalisation
        return padded, (math.ceil(new_h / patch_size), math.ceil(new_w / patch_size))
    new_h = max(1, round(height * scale / patch_size)) * patch_size
    new_w = max(1, round(width * scale / patch_size)) * patch_size
    return _resize(x, (new_h, new_w)), (new_h // patch_size, new_w // patch_size)


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def teacher_feature_maps(teacher: nn.Module, x: Tensor, view: TeacherView) -> list[Tensor]:
    """The teacher's B C h w block outputs at `view.levels` for a normalised B 3 H W image (no gradients).

    Works with any encoder whose `forward_intermediates(x, indices, ...)` returns B C h w maps (our DINOv2/CLIP ViT,
    the SAM image encoder); `norm` and `reshape` are passed where the encoder accepts them.
    """
    patch = int(teacher.patch_size)
    image, (rows, cols) = teacher_input(x, view, patch)
    accepted = inspect.signature(teacher.forward_intermediates).parameters
    kwargs = {name: value for name, value in (("norm", view.norm), ("reshape", True)) if name in accepted}
    with torch.no_grad():
        maps = teacher.forward_intermediates(image, list(view.levels), **kwargs)
    if len(maps) != len(view.levels):
        raise ValueError(f"teacher levels {list(view.levels)} repeat a block; give distinct block indices")
    maps = [m[..., :rows, :cols] for m in maps]  # drop the cells of SAM's zero padding
    if view.max_grid is not None and max(rows, cols) > view.max_grid:
        scale = view.max_grid / max(rows, cols)
        size = (max(1, round(rows * scale)), max(1, round(cols * scale)))
        maps = [F.adaptive_avg_pool2d(m, size) for m in maps]
    return [m.float().contiguous() for m in maps]


class TeacherBank(nn.ModuleDict):
    """Frozen teachers keyed by teacher key, with the view each one uses.

    Teachers are always in eval mode (`train()` leaves them there), never require gradients, and are left out of
    `state_dict()`: student checkpoints never hold them. Loading a student state dict into a model that has teachers
    must ignore their keys; `training.models.sak.SAK` does that with a load hook.
    """

    def __init__(self, teachers: Mapping[str, nn.Module] | None = None, views: Mapping[str, TeacherView] | None = None):
        super().__init__()
        self.views: dict[str, TeacherView] = {}
        for key, teacher in (teachers or {}).items():
            self.add(key, teacher, (views or {})[key])

    def add(self, key: str, teacher: nn.Module, view: TeacherView) -> None:
        if not hasattr(teacher, "forward_intermediates") or not hasattr(teacher, "patch_size"):
            raise ValueError(f"teacher {key!r} ({type(teacher).__name__}) has no forward_intermediates / patch_size")
        teacher.requires_grad_(False)
        teacher.eval()
        self[key] = teacher
        self.views[key] = view

    def train(self, mode: bool = True) -> TeacherBank:
        return super().train(False)

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        return OrderedDict() if destination is None else destination

    def forward(self, x: Tensor, keys: Sequence[str] | None = None) -> dict[str, list[Tensor]]:
        """Normalised B 3 H W image -> teacher key -> its target maps (float32, one per level)."""
        keys = list(self.keys()) if keys is None else list(keys)
        return {key: teacher_feature_maps(self[key], x, self.views[key]) for key in keys}
