"""`endostream data synth`: write a synthetic dataset in the EndoARSS on-disk layout, plus optional MP4 clips.

Layout (the one the public EndoARSS code reads for MTLESD / MTLEndovis, with named activity folders)::

    DIR/labels.json                               tasks, class names, colours, generator parameters (labels.py)
    DIR/summary.json                              counts per split / activity, class pixel shares, clips
    DIR/<split>/<activity>/image/<name>.png       RGB frame           (split: train, val, test)
    DIR/<split>/<activity>/mask/<name>.png        uint8 class index, same size
    DIR/videos/clip_XXX.mp4                       H.264 (libx264, yuv420p, fixed GOP), see video.py
    DIR/videos/clip_XXX.json                      per-frame activity labels and timestamps, segments

Frame i is rendered from a Generator seeded by (seed, i) alone, so PNG bytes do not depend on how many images are
asked for or in which order they are produced. labels.json is written last: a folder with labels.json is complete.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import multiprocessing
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from training.data.labels import LABELS_FILE, LabelSpec, TaskSpec, write_labels
from training.data.scene import ACTIVITIES, SEGMENTATION_CLASSES, SEGMENTATION_COLORS, plan_clip
from training.data.synth import frame_rng, render_clip, render_image
from training.data.video import write_mp4

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
SUMMARY_FILE = "summary.json"
VIDEO_DIR = "videos"
GENERATOR = "endostream.synth"
GENERATOR_VERSION = 1
CLIP_STREAM = 1  # seed stream of clips, apart from still frames (stream 0)
PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1]


@dataclass
class DatasetSummary:
    """What was written: counts per split and activity, class statistics, clips."""

    root: Path
    images: int
    seed: int
    size: tuple[int, int]
    activities: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> activity -> images
    class_pixels: dict[str, dict[str, float]] = field(default_factory=dict)  # split -> class -> pixel share
    class_images: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> class -> images holding it
    distractor_fraction: float = 0.0  # share of frames with more than one instrument
    videos: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (without `root`, so the file is the same wherever the dataset lives)."""
        out = asdict(self)
        del out["root"]
        out["size"] = list(self.size)
        return out


def synth_labels(source: dict[str, Any]) -> LabelSpec:
    """The label spec of generated data: activity classification + segmentation with display colours."""
    return LabelSpec(
        tasks=(
            TaskSpec("activity", "classification", ACTIVITIES),
            TaskSpec("segmentation", "segmentation", SEGMENTATION_CLASSES, SEGMENTATION_COLORS),
        ),
        source=source,
    )


def assign_splits(images: int, seed: int, fractions: tuple[float, float, float]) -> list[str]:
    """Split name per image index: a seeded permutation cut at the rounded fractions."""
    if len(fractions) != len(SPLITS) or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(
            f"splits must be three non-negative fractions (train, val, test) summing to 1; got {fractions}"
        )
    n_train = int(round(fractions[0] * images))
    n_val = min(images - n_train, int(round(fractions[1] * images)))
    order = np.random.default_rng(np.random.SeedSequence([seed, 2])).permutation(images)
    names = [""] * images
    for rank, index in enumerate(order):
        names[index] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    return names


def _prepare(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"{out} is not empty; pass --overwrite (overwrite=True) to replace a generated dataset")
        for name in (*SPLITS, VIDEO_DIR):
            if (out / name).is_dir():
                shutil.rmtree(out / name)
        for name in (LABELS_FILE, SUMMARY_FILE):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _write_png(path: Path, array: np.ndarray) -> None:
    image = cv2.cvtColor(array, cv2.COLOR_RGB2BGR) if array.ndim == 3 else array
    if not cv2.imwrite(str(path), image, PNG_PARAMS):
        raise RuntimeError(f"could not write {path}; check free space and permissions")


def _render_to_disk(job: tuple[Path, int, int, int, int, str]) -> tuple[str, str, np.ndarray, int]:
    """Render frame `index` and write its image and mask; returns (split, activity, class histogram, instruments)."""
    out, seed, index, height, width, split = job
    frame = render_image(seed, index, height, width)
    folder = out / split / frame.activity
    (folder / "image").mkdir(parents=True, exist_ok=True)
    (folder / "mask").mkdir(parents=True, exist_ok=True)
    _write_png(folder / "image" / f"{index:05d}.png", frame.image)
    _write_png(folder / "mask" / f"{index:05d}.png", frame.mask)
    histogram = np.bincount(frame.mask.ravel(), minlength=len(SEGMENTATION_CLASSES))
    return split, frame.activity, histogram, len(frame.scene.instruments)


def _single_threaded_worker() -> None:
    cv2.setNumThreads(1)  # one process per core; OpenCV's own threads would oversubscribe


@contextlib.contextmanager
def _pool(workers: int) -> Iterator[Any]:
    """A process pool for `workers` > 1, else None (render in this process)."""
    if workers <= 1:
        yield None
        return
    # spawn, not fork: a forked child inherits the parent's OpenCV/OpenMP thread-pool locks in whatever state
    # they were, and hangs on its first cv2 call when the parent (a trainer, a test run) had used them.
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_single_threaded_worker) as pool:
        yield pool


def _segments(labels: list[str], fps: int) -> list[dict[str, Any]]:
    segments: list[dict[str, Any]] = []
    for i, activity in enumerate(labels):
        if segments and segments[-1]["activity"] == activity:
            segments[-1]["end_frame"] = i + 1
        else:
            segments.append({"activity": activity, "start_frame": i, "end_frame": i + 1})
    for s in segments:  # end_frame is exclusive
        s["start_time"], s["end_time"] = round(s["start_frame"] / fps, 4), round(s["end_frame"] / fps, 4)
    return segments


def write_clip(
    folder: Path,
    index: int,
    seed: int,
    *,
    seconds: float = 6.0,
    fps: int = 30,
    size: tuple[int, int] = (480, 640),
    gop: int = 30,
    progress: bool = False,
) -> dict[str, Any]:
    """Render clip `index` of `seed` to `folder/clip_XXX.mp4` + `.json`; returns the JSON record."""
    height, width = size
    frames = int(round(seconds * fps))
    if frames < 1:
        raise ValueError(f"a clip needs at least one frame; got {seconds} s at {fps} fps")
    rng = frame_rng(seed, index, stream=CLIP_STREAM)
    plan = plan_clip(rng, height, width, frames, fps)
    name = f"clip_{index:03d}"
    labels: list[str] = []

    def rendered():
        for frame in tqdm(render_clip(plan, rng), total=frames, desc=name, disable=not progress, leave=False):
            labels.append(frame.activity)
            yield frame.image

    write_mp4(folder / f"{name}.mp4", rendered(), fps=fps, gop=gop)
    record = {
        "name": name,
        "video": f"{name}.mp4",
        "fps": fps,
        "frames": frames,
        "width": width,
        "height": height,
        "codec": "h264",
        "pix_fmt": "yuv420p",
        "gop": gop,
        "seed": seed,
        "index": index,
        "activities": list(ACTIVITIES),
        "instruments": [t.kind for t in plan.tracks],
        "labels": [
            {"frame": i, "time": round(i / fps, 4), "activity": a, "activity_index": ACTIVITIES.index(a)}
            for i, a in enumerate(labels)
        ],
        "segments": _segments(labels, fps),
    }
    (folder / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def synthesize_dataset(
    out: Path,
    images: int,
    seed: int,
    height: int = 256,
    width: int = 256,
    splits: tuple[float, float, float] = (0.7, 0.15, 0.15),
    videos: int = 0,
    video_seconds: float = 6.0,
    fps: int = 30,
    video_size: tuple[int, int] = (480, 640),
    progress: bool = True,
    overwrite: bool = False,
    workers: int = 1,
) -> DatasetSummary:
    """Render `images` labelled frames (and `videos` clips) into `out`; see the module docstring for the layout.

    Args:
        out: dataset folder; must be empty or absent unless `overwrite`.
        images: number of still frames, split into train/val/test by `splits`.
        seed: non-negative seed; the same seed gives byte-identical PNGs.
        height: still frame height in pixels (at least 64).
        width: still frame width in pixels (at least 64).
        splits: train, val, test fractions.
        videos: number of MP4 clips under `out/videos`.
        video_seconds: clip length.
        fps: clip frame rate.
        video_size: clip (height, width), both even.
        progress: show tqdm progress bars.
        overwrite: replace the generated parts of a non-empty `out`.
        workers: processes rendering still frames and clips; the files do not depend on it.
    """
    out = Path(out)
    _check_request(images, videos, seed, workers, (height, width), video_size)
    split_of = assign_splits(images, seed, splits)
    _prepare(out, overwrite)
    started = time.perf_counter()
    summary = DatasetSummary(out, images, seed, (height, width))
    pixels = {s: np.zeros(len(SEGMENTATION_CLASSES), np.int64) for s in SPLITS}
    holding = {s: np.zeros(len(SEGMENTATION_CLASSES), np.int64) for s in SPLITS}
    counts = {s: dict.fromkeys(ACTIVITIES, 0) for s in SPLITS}
    distractors = 0
    jobs = ((out, seed, index, height, width, split_of[index]) for index in range(images))
    with _pool(workers) as pool:
        results = pool.imap(_render_to_disk, jobs, chunksize=8) if pool is not None else map(_render_to_disk, jobs)
        for split, activity, histogram, instruments in tqdm(
            results, total=images, desc="synth images", disable=not progress, dynamic_ncols=True
        ):
            counts[split][activity] += 1
            pixels[split] += histogram
            holding[split] += histogram > 0
            distractors += instruments > 1
    image_seconds = time.perf_counter() - started
    if images:
        logger.info("rendered %d images in %.1f s (%.1f ms each)", images, image_seconds, 1000 * image_seconds / images)
    for split in SPLITS:
        summary.activities[split] = counts[split]
        total = max(1, int(pixels[split].sum()))
        named = zip(SEGMENTATION_CLASSES, pixels[split], holding[split], strict=True)
        shares = [(c, round(int(n) / total, 5), int(k)) for c, n, k in named]
        summary.class_pixels[split] = {c: share for c, share, _ in shares}
        summary.class_images[split] = {c: k for c, _, k in shares}
    summary.distractor_fraction = round(distractors / max(1, images), 4)
    if videos:
        summary.videos = _write_clips(out / VIDEO_DIR, videos, seed, video_seconds, fps, video_size, progress, workers)
    (out / SUMMARY_FILE).write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    source = {
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        "seed": seed,
        "images": images,
        "height": height,
        "width": width,
        "splits": dict(zip(SPLITS, splits, strict=True)),
        "videos": videos,
        "video_seconds": video_seconds,
        "fps": fps,
        "video_size": list(video_size),
    }
    write_labels(out, synth_labels(source))
    return summary


def _check_request(
    images: int, videos: int, seed: int, workers: int, size: tuple[int, int], video_size: tuple[int, int]
) -> None:
    """Raise on a request `synthesize_dataset` cannot fulfil, naming the bad value."""
    height, width = size
    if images < 0 or videos < 0:
        raise ValueError(f"images and videos must be non-negative; got images={images}, videos={videos}")
    if images == 0 and videos == 0:
        raise ValueError("nothing to generate: give --images N (and/or --video K)")
    if seed < 0:
        raise ValueError(f"seed must be non-negative; got {seed}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1; got {workers}")
    if min(height, width) < 64:
        raise ValueError(f"image size {height}x{width} is too small; use at least 64x64")
    if video_size[0] % 2 or video_size[1] % 2 or min(video_size) < 64:
        raise ValueError(f"video size {video_size} must be even and at least 64 (H.264 yuv420p)")


def _clip_job(job: tuple[Path, int, int, float, int, tuple[int, int], bool]) -> tuple[dict[str, Any], float]:
    folder, index, seed, seconds, fps, size, progress = job
    started = time.perf_counter()
    record = write_clip(folder, index, seed, seconds=seconds, fps=fps, size=size, progress=progress)
    return record, time.perf_counter() - started


def write_clips(
    folder: Path,
    videos: int,
    seed: int,
    *,
    seconds: float = 6.0,
    fps: int = 30,
    size: tuple[int, int] = (480, 640),
    workers: int = 1,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Write clips 0 .. `videos` - 1 of `seed` into `folder` (`write_clip`), `workers` at a time; their records.

    The files do not depend on `workers`: each clip has its own random stream."""
    folder.mkdir(parents=True, exist_ok=True)
    workers = max(1, min(workers, videos))
    jobs = [(folder, clip, seed, seconds, fps, size, progress and workers == 1) for clip in range(videos)]
    records = []
    with _pool(workers) as pool:
        results = pool.imap(_clip_job, jobs) if pool is not None else map(_clip_job, jobs)
        for record, seconds_taken in tqdm(results, total=videos, desc="synth clips", disable=not progress):
            logger.info("clip %s: %d frames in %.1f s", record["name"], record["frames"], seconds_taken)
            records.append(record)
    return records


def _write_clips(
    folder: Path,
    videos: int,
    seed: int,
    seconds: float,
    fps: int,
    size: tuple[int, int],
    progress: bool,
    workers: int = 1,
) -> list[dict[str, Any]]:
    """Write `videos` labelled clips into `folder`; their summary entries."""
    entries = []
    for record in write_clips(
        folder, videos, seed, seconds=seconds, fps=fps, size=size, workers=workers, progress=progress
    ):
        frames = [entry["activity"] for entry in record["labels"]]
        entries.append(
            {
                "name": record["name"],
                "frames": record["frames"],
                "activities": {a: frames.count(a) for a in ACTIVITIES if a in frames},
                "segments": len(record["segments"]),
            }
        )
    return entries


def run_synth(args: argparse.Namespace) -> DatasetSummary:
    """Run `endostream data synth` from parsed arguments."""
    summary = synthesize_dataset(
        args.out,
        images=args.images,
        seed=args.seed,
        height=args.height,
        width=args.width,
        splits=tuple(args.splits),
        videos=args.video,
        video_seconds=args.video_seconds,
        fps=args.fps,
        video_size=tuple(args.video_size),
        progress=not args.no_progress,
        overwrite=args.overwrite,
        workers=args.workers,
    )
    for split in SPLITS:
        logger.info("%s: %s", split, summary.activities[split])
    logger.info("wrote %s (%d images, %d clips)", args.out, summary.images, len(summary.videos))
    return summary
