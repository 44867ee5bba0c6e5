"""Generated clips for the temporal head: frames rendered small, at the head's time step, with per-frame labels.

`endostream data synth --video N` writes 640x480 30 fps mp4 clips for the stream demo; rendering those costs ~15 fps
on 2 cores and the head only needs one frame per `frame_interval_s` (default 0.5 s: activity segments last ~10 s,
TeCNO runs at 1 fps, and at 0.2 s the same budget held half as many clips, whose scenes are what the head must
generalise over; with 40 clips at 0.2 s the held-out scores swung by several points between 6-clip splits).
So the temporal clips are planned and rendered
in memory at the head's step (fps = 1 / frame_interval_s) and at `render_size` (a little above the model input, then
INTER_AREA-resized to it, as the still frames are), from the same `plan_clip` / `render_clip` as the mp4 clips.
Per-frame smoke build-up and jaw motion in `render_clip` advance per rendered frame, so at 2 fps they settle in more
seconds than at 30 fps; the activity rule and its labels are unchanged.

`plan_clip` gives 3-4 activity segments per clip whatever its length, and the label rule adds short approach/leave
transitions, so a 40 s clip holds ~4-8 labelled segments. Clips are split by clip index: train, then val, then test.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np

from training.data.scene import ACTIVITIES, plan_clip
from training.data.synth import frame_rng, render_clip

CLIP_STREAM = 2  # seed stream of temporal clips (0: still frames, 1: the mp4 demo clips)
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ClipSetSpec:
    """Which clips to generate; every field enters the feature cache's fingerprint."""

    seed: int = 7
    clips: int = 160
    seconds: float = 40.0
    frame_interval_s: float = 0.5
    render_size: int = 128
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)

    def __post_init__(self) -> None:
        # One spelling per value (40 and 40.0 are the same clip set, and must hash alike in the feature cache).
        for name, kind in (("seed", int), ("clips", int), ("seconds", float), ("frame_interval_s", float)):
            object.__setattr__(self, name, kind(getattr(self, name)))
        object.__setattr__(self, "render_size", int(self.render_size))
        object.__setattr__(self, "fractions", tuple(float(f) for f in self.fractions))
        if self.clips < 3:
            raise ValueError(f"clips must be at least 3 (one per split), got {self.clips}")
        if not 0.02 <= self.frame_interval_s <= 5.0:
            raise ValueError(f"frame_interval_s must be in [0.02, 5] s, got {self.frame_interval_s}")
        if abs(1.0 / self.frame_interval_s - round(1.0 / self.frame_interval_s)) > 1e-6:
            raise ValueError(
                f"frame_interval_s {self.frame_interval_s} must be 1/n s (clips are planned at whole fps): try 0.2"
            )
        if self.seconds < 3 * self.frame_interval_s:
            raise ValueError(f"seconds {self.seconds} is too short for frame_interval_s {self.frame_interval_s}")
        if len(self.fractions) != 3 or min(self.fractions) <= 0:
            raise ValueError(f"fractions must be three positive numbers (train, val, test), got {self.fractions}")

    @property
    def fps(self) -> float:
        return 1.0 / self.frame_interval_s

    @property
    def frames(self) -> int:
        return int(round(self.seconds / self.frame_interval_s))

    def split_of(self) -> list[str]:
        """Split per clip index: the first ~70 % train, then val, then test (at least one clip each)."""
        total = sum(self.fractions)
        val = max(1, int(round(self.clips * self.fractions[1] / total)))
        test = max(1, int(round(self.clips * self.fractions[2] / total)))
        train = self.clips - val - test
        if train < 1:
            raise ValueError(f"{self.clips} clips leave no training clip with fractions {self.fractions}")
        return ["train"] * train + ["val"] * val + ["test"] * test

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def render_temporal_clip(spec: ClipSetSpec, index: int, size: tuple[int, int]) -> tuple[np.ndarray, list[str]]:
    """Clip `index` of `spec`: frames (T H W 3 uint8 RGB at `size` = (H, W)) and one activity name per frame."""
    rng = frame_rng(spec.seed, index, stream=CLIP_STREAM)
    fps = int(round(spec.fps))  # a whole number (checked by the spec)
    plan = plan_clip(rng, spec.render_size, spec.render_size, spec.frames, fps)
    frames, labels = [], []
    for frame in render_clip(plan, rng):
        image = frame.image
        if image.shape[:2] != size:
            image = cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA)
        frames.append(image)
        labels.append(frame.activity)
    unknown = sorted(set(labels) - set(ACTIVITIES))
    if unknown:
        raise ValueError(f"clip {index} has activities {unknown} outside {ACTIVITIES}")
    return np.stack(frames), labels
