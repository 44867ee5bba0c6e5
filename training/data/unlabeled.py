"""Unlabeled frames for SAK stage 1 (distillation only): every image and every n-th video frame under a folder.

Sample dicts hold `image` (H W 3 uint8 RGB at the model size) and `name` (`relative/path.png`, or
`relative/clip.mp4#000042` for frame 42 of a video). Folders named like label folders (`mask`, `masks`, `labels`) and
hidden folders are skipped, so an EndoARSS-layout dataset can be used as it is (its `image/` frames are taken).

Images are decoded when asked for (and kept in memory with `cache=True`); videos are decoded once, in order, when the
dataset is built, and only the kept frames, already resized, stay in memory (96 x 96 RGB is 27 KB a frame).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from training.data.datasets import IMAGE_SUFFIXES, read_image
from training.data.video import read_mp4

logger = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".mov", ".m4v", ".mkv", ".avi", ".webm")
SKIPPED_FOLDERS = ("mask", "masks", "label", "labels")


def resize_frame(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """RGB H W 3 -> `size` (height, width): area filter to shrink, bilinear to grow (as the eval transform)."""
    height, width = size
    if frame.shape[:2] == (height, width):
        return np.ascontiguousarray(frame)
    shrink = height <= frame.shape[0] and width <= frame.shape[1]
    return cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


class UnlabeledFrames:
    """Frames from a folder of images and/or videos (or one video file), resized to the model size.

    Args:
        root: folder searched recursively, or a single image or video file.
        size: (height, width) of the returned images.
        video_stride: keep every n-th frame of each video (frames 0, n, 2n, ...).
        max_frames_per_video: stop reading a video after this many kept frames (None = all).
        cache: keep decoded still images in memory.
    """

    def __init__(
        self,
        root: Path | str,
        size: Sequence[int],
        *,
        video_stride: int = 1,
        max_frames_per_video: int | None = None,
        cache: bool = True,
    ) -> None:
        self.root = Path(root)
        self.size = (int(size[0]), int(size[1]))
        if video_stride < 1:
            raise ValueError(f"video_stride must be at least 1, got {video_stride}")
        if not self.root.exists():
            raise FileNotFoundError(f"frame source {self.root} not found: give a folder of images and/or videos")
        self.cache = cache
        self._images: list[tuple[Path, str]] = []
        self._frames: list[tuple[np.ndarray, str]] = []
        self._decoded: dict[int, np.ndarray] = {}
        files = [self.root] if self.root.is_file() else sorted(self._walk(self.root))
        videos = 0
        for path in files:
            suffix = path.suffix.lower()
            name = path.name if path == self.root else path.relative_to(self.root).as_posix()
            if suffix in IMAGE_SUFFIXES:
                self._images.append((path, name))
            elif suffix in VIDEO_SUFFIXES:
                self._frames += self._read_video(path, name, video_stride, max_frames_per_video)
                videos += 1
        if not self._images and not self._frames:
            raise FileNotFoundError(
                f"no images ({', '.join(IMAGE_SUFFIXES)}) or videos ({', '.join(VIDEO_SUFFIXES)}) under {self.root}"
            )
        logger.info(
            "unlabeled frames from %s: %d images, %d frames of %d videos (every %d-th)",
            self.root,
            len(self._images),
            len(self._frames),
            videos,
            video_stride,
        )

    @staticmethod
    def _walk(folder: Path) -> list[Path]:
        found = []
        for path in folder.iterdir():
            if path.name.startswith("."):
                continue
            if path.is_dir():
                if path.name.lower() not in SKIPPED_FOLDERS:
                    found += UnlabeledFrames._walk(path)
            elif path.is_file():
                found.append(path)
        return found

    def _read_video(self, path: Path, name: str, stride: int, limit: int | None) -> list[tuple[np.ndarray, str]]:
        frames = []
        for index, frame in enumerate(read_mp4(path)):
            if index % stride:
                continue
            frames.append((resize_frame(frame, self.size), f"{name}#{index:06d}"))
            if limit is not None and len(frames) >= limit:
                break
        if not frames:
            logger.warning("video %s holds no frames; skipped", path)
        return frames

    def __len__(self) -> int:
        return len(self._images) + len(self._frames)

    @property
    def names(self) -> list[str]:
        return [name for _, name in self._images] + [name for _, name in self._frames]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} frames")
        index %= len(self)
        if index >= len(self._images):
            frame, name = self._frames[index - len(self._images)]
            return {"image": frame, "name": name}
        path, name = self._images[index]
        image = self._decoded.get(index)
        if image is None:
            image = resize_frame(read_image(path), self.size)
            if self.cache:
                self._decoded[index] = image
        return {"image": image, "name": name}
