"""Transforms on sample dicts (numpy/OpenCV), a batch collate function and a seeded torch Dataset adapter.

A transform is called as `transform(sample, rng)` with a numpy Generator and returns a new dict; it never edits the
input arrays (datasets may cache them read-only). Geometric steps move image and mask together; the mask is
resampled with `INTER_NEAREST_EXACT`, which samples the pixel centres the image's bilinear/area resize uses (plain
`INTER_NEAREST` is shifted by half a pixel) and never invents class values. Photometric steps touch the image only.
`TaskDataset` seeds the Generator from (seed, epoch, index), so augmentations are reproducible with any number of
DataLoader workers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

Sample = dict[str, Any]
IGNORE_INDEX = 255


class Transform(Protocol):
    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample: ...


def _size(size: int | Sequence[int]) -> tuple[int, int]:
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    if height < 1 or width < 1:
        raise ValueError(f"size must be positive (height, width); got {size}")
    return int(height), int(width)


@dataclass
class Compose:
    """Apply `steps` in order with one Generator (a fresh unseeded one when none is given)."""

    steps: Sequence[Transform]

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        rng = rng if rng is not None else np.random.default_rng()
        for step in self.steps:
            sample = step(sample, rng)
        return sample


@dataclass
class HorizontalFlip:
    p: float = 0.5

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        if rng.random() >= self.p:
            return sample
        image = np.ascontiguousarray(sample["image"][:, ::-1])
        return {**sample, "image": image, "mask": np.ascontiguousarray(sample["mask"][:, ::-1])}


@dataclass
class RandomScaleCrop:
    """Crop a window of `s` times the image side (s uniform in `scale`) at a random place.

    s > 1 zooms out instead: the image is placed at a random offset on a larger canvas (black image, mask
    `fill_mask`, by default ignored). Aspect ratio is kept; a later `Resize` brings the window to the model size.
    """

    scale: tuple[float, float] = (0.75, 1.0)
    fill_mask: int = IGNORE_INDEX

    def __post_init__(self) -> None:
        lo, hi = self.scale
        if not 0 < lo <= hi:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high; got {self.scale}")

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        image, mask = sample["image"], sample["mask"]
        height, width = mask.shape
        s = rng.uniform(*self.scale)
        ch, cw = max(1, round(s * height)), max(1, round(s * width))
        if ch <= height and cw <= width:
            y0, x0 = int(rng.integers(0, height - ch + 1)), int(rng.integers(0, width - cw + 1))
            return {
                **sample,
                "image": image[y0 : y0 + ch, x0 : x0 + cw].copy(),
                "mask": mask[y0 : y0 + ch, x0 : x0 + cw].copy(),
            }
        ch, cw = max(ch, height), max(cw, width)
        y0, x0 = int(rng.integers(0, ch - height + 1)), int(rng.integers(0, cw - width + 1))
        canvas = np.zeros((ch, cw, image.shape[2]), image.dtype)
        canvas[y0 : y0 + height, x0 : x0 + width] = image
        labels = np.full((ch, cw), self.fill_mask, mask.dtype)
        labels[y0 : y0 + height, x0 : x0 + width] = mask
        return {**sample, "image": canvas, "mask": labels}


@dataclass
class ColorJitter:
    """Brightness, contrast, saturation (factors 1 +- value) and hue (turns, +- value), as one affine colour map."""

    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.02

    def __post_init__(self) -> None:
        if min(self.brightness, self.contrast, self.saturation, self.hue) < 0 or self.hue > 0.5:
            raise ValueError(f"jitter strengths must be >= 0 (hue <= 0.5); got {self}")

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        b = rng.uniform(1 - self.brightness, 1 + self.brightness)
        c = rng.uniform(1 - self.contrast, 1 + self.contrast)
        s = rng.uniform(1 - self.saturation, 1 + self.saturation)
        h = rng.uniform(-self.hue, self.hue) * 2 * math.pi
        luma = np.array([0.299, 0.587, 0.114])
        # Saturation: blend with the grey value; hue: rotate the chroma plane of YIQ.
        sat = s * np.eye(3) + (1 - s) * np.outer(np.ones(3), luma)
        to_yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
        rot = np.array([[1, 0, 0], [0, math.cos(h), -math.sin(h)], [0, math.sin(h), math.cos(h)]])
        hue = np.linalg.inv(to_yiq) @ rot @ to_yiq
        image = sample["image"]
        mean_luma = float(image.reshape(-1, 3).mean(axis=0) @ luma)
        linear = hue @ sat
        # x -> H S (c b x + (1 - c) b m): brightness, then contrast about the mean grey level, then colour.
        matrix = np.concatenate([c * b * linear, ((1 - c) * b * mean_luma * linear @ np.ones(3))[:, None]], axis=1)
        out = cv2.transform(image.astype(np.float32), matrix.astype(np.float32))
        return {**sample, "image": np.clip(out + 0.5, 0, 255).astype(np.uint8)}


@dataclass
class GaussianBlur:
    p: float = 0.1
    sigma: tuple[float, float] = (0.1, 1.5)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        if rng.random() >= self.p:
            return sample
        return {**sample, "image": cv2.GaussianBlur(sample["image"], (0, 0), rng.uniform(*self.sigma))}


@dataclass
class Resize:
    """Resize to (height, width): image with area (shrinking) or bilinear (growing) filtering, mask nearest."""

    size: tuple[int, int]

    def __post_init__(self) -> None:
        self.size = _size(self.size)

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        height, width = self.size
        image, mask = sample["image"], sample["mask"]
        if mask.shape == (height, width):
            return sample
        shrink = height <= mask.shape[0] and width <= mask.shape[1]
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        mask = cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST_EXACT)
        return {**sample, "image": image, "mask": mask}


@dataclass
class KeepFullMask:
    """Store the mask as `full_mask` before resizing, so evaluation can score at the label's own resolution."""

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        return {**sample, "full_mask": sample["mask"]}


def build_train_transform(
    size: int | Sequence[int],
    *,
    hflip: bool = True,
    scale: tuple[float, float] = (0.75, 1.0),
    color_jitter: float = 0.2,
    blur_prob: float = 0.1,
) -> Compose:
    """Scale-crop, flip, resize to `size` (height, width), colour jitter and blur (photometric steps image only).

    Args:
        size: model input (height, width) or one int for square inputs.
        hflip: random horizontal flips (p = 0.5).
        scale: side fraction range of the random crop; (1, 1) disables it.
        color_jitter: brightness/contrast/saturation strength; hue gets a tenth of it (turns). 0 disables.
        blur_prob: probability of a Gaussian blur (sigma 0.1-1.5 px).
    """
    steps: list[Transform] = []
    if tuple(scale) != (1.0, 1.0):
        steps.append(RandomScaleCrop(tuple(scale)))  # type: ignore[arg-type]
    if hflip:
        steps.append(HorizontalFlip(0.5))
    steps.append(Resize(_size(size)))
    if color_jitter > 0:
        steps.append(ColorJitter(color_jitter, color_jitter, color_jitter, min(0.5, color_jitter / 10)))
    if blur_prob > 0:
        steps.append(GaussianBlur(blur_prob))
    return Compose(steps)


def build_eval_transform(size: int | Sequence[int]) -> Compose:
    """Resize to `size`, keeping the original mask as `full_mask`."""
    return Compose([KeepFullMask(), Resize(_size(size))])


def collate(batch: Sequence[Sample]) -> dict[str, Any]:
    """Batch sample dicts: `image` uint8 B 3 H W (the model normalises), `mask` long B H W, `activity` long B,
    `name` list; `full_mask` (list of uint8 H_i W_i tensors) when every sample has one."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    shapes = {s["image"].shape for s in batch}
    if len(shapes) > 1:
        raise ValueError(f"images in a batch differ in size {sorted(shapes)}; end the transform with Resize")
    images = torch.from_numpy(np.stack([s["image"] for s in batch])).permute(0, 3, 1, 2).contiguous()
    out: dict[str, Any] = {
        "image": images,
        "mask": torch.from_numpy(np.stack([s["mask"] for s in batch])).long(),
        "activity": torch.tensor([int(s["activity"]) for s in batch], dtype=torch.long),
        "name": [s["name"] for s in batch],
    }
    if all("full_mask" in s for s in batch):
        out["full_mask"] = [torch.from_numpy(np.array(s["full_mask"], copy=True)) for s in batch]
    return out


class TaskDataset(Dataset):
    """Torch adapter: `dataset[i]` through `transform`, seeded per (seed, epoch, index).

    Call `set_epoch` before each epoch (the trainer does); DataLoader workers are re-created every epoch unless
    `persistent_workers=True`, in which case they keep the epoch they started with.

    Args:
        dataset: any indexable of sample dicts (EndoARSSFolder, EndoVis18, ...).
        transform: `transform(sample, rng)`; None returns samples unchanged.
        seed: non-negative base seed of the augmentation stream.
    """

    def __init__(self, dataset: Any, transform: Transform | None = None, seed: int = 0) -> None:
        if seed < 0:
            raise ValueError(f"seed must be non-negative; got {seed}")
        self.dataset, self.transform, self.seed = dataset, transform, int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def labels(self) -> Any:
        return getattr(self.dataset, "labels", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Sample:
        sample = self.dataset[index]
        if self.transform is None:
            return sample
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, int(index)]))
        return self.transform(sample, rng)
