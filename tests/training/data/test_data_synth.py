"""Synthetic data: determinism, on-disk layout and labels.json, class coverage, activity balance, the activity rule
re-derived independently from geometry and from saved masks, and MP4 clips."""

import argparse
import json
from collections import Counter
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from scipy import ndimage

from endostream.commands.data import add_synth_arguments
from training.data.labels import read_labels
from training.data.scene import (
    ACTIVITIES,
    BLOOD,
    CAUTERY_REACH,
    CUT_BAND,
    GRASP_DEPTH,
    INSTRUMENT_CLASS,
    INSTRUMENTS,
    LESION,
    SEGMENTATION_CLASSES,
    plan_clip,
    sample_scene,
)
from training.data.synth import frame_rng, render_image
from training.data.video import probe_mp4, read_mp4
from training.data.writer import SPLITS, run_synth, synthesize_dataset, write_clip, write_clips

SIZE = 96


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "data"
    synthesize_dataset(root, images=20, seed=7, height=SIZE, width=SIZE, progress=False)
    return root


def test_same_seed_gives_identical_bytes_and_other_seed_differs(small_set: Path, tmp_path: Path):
    again = tmp_path / "again"  # also with two worker processes: files must not depend on the worker count
    synthesize_dataset(again, images=20, seed=7, height=SIZE, width=SIZE, progress=False, workers=2)
    assert _files(small_set) == _files(again)
    other = tmp_path / "other"
    synthesize_dataset(other, images=20, seed=8, height=SIZE, width=SIZE, progress=False)
    by_index = {Path(k).name: v for k, v in _files(other).items() if "/image/" in k}
    ours = {Path(k).name: v for k, v in _files(small_set).items() if "/image/" in k}
    assert sum(by_index[name] != data for name, data in ours.items()) == len(ours)


def test_frame_depends_only_on_seed_and_index():
    first = render_image(3, 5, SIZE, SIZE)
    _ = [render_image(3, i, SIZE, SIZE) for i in range(3)]  # rendering other frames first changes nothing
    again = render_image(3, 5, SIZE, SIZE)
    assert np.array_equal(first.image, again.image) and np.array_equal(first.mask, again.mask)


def test_layout_labels_and_summary(small_set: Path):
    labels = read_labels(small_set)
    assert [(t.name, t.kind) for t in labels.tasks] == [
        ("activity", "classification"),
        ("segmentation", "segmentation"),
    ]
    assert labels.activity.classes == ACTIVITIES
    assert labels.segmentation.classes == SEGMENTATION_CLASSES
    assert len(labels.segmentation.colors) == len(SEGMENTATION_CLASSES)
    assert labels.source["seed"] == 7 and labels.source["generator"] == "endostream.synth"
    raw = json.loads((small_set / "labels.json").read_text())
    assert set(raw) == {"tasks", "source"}
    summary = json.loads((small_set / "summary.json").read_text())
    total = 0
    for split in SPLITS:
        for activity in ACTIVITIES:
            images = sorted((small_set / split / activity / "image").glob("*.png"))
            masks = sorted((small_set / split / activity / "mask").glob("*.png"))
            assert [p.name for p in images] == [p.name for p in masks]
            assert summary["activities"][split][activity] == len(images)
            total += len(images)
            for image_path, mask_path in zip(images, masks, strict=True):
                image = cv2.imread(str(image_path), cv2.IMREAD_UNCHANGED)
                mask = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED)
                assert image.shape == (SIZE, SIZE, 3) and mask.shape == (SIZE, SIZE) and mask.dtype == np.uint8
                assert mask.max() < len(SEGMENTATION_CLASSES)
    assert total == 20
    assert [sum(summary["activities"][s].values()) for s in SPLITS] == [14, 3, 3]


def test_refuses_non_empty_folder_without_overwrite(small_set: Path, tmp_path: Path):
    with pytest.raises(ValueError, match="overwrite"):
        synthesize_dataset(small_set, images=2, seed=0, height=SIZE, width=SIZE, progress=False)
    with pytest.raises(ValueError, match="fractions"):
        synthesize_dataset(tmp_path / "x", images=2, seed=0, splits=(0.5, 0.2, 0.2), progress=False)
    target = tmp_path / "over"
    synthesize_dataset(target, images=6, seed=0, height=64, width=64, progress=False)
    synthesize_dataset(target, images=2, seed=0, height=64, width=64, progress=False, overwrite=True)
    assert len(list(target.rglob("image/*.png"))) == 2


def test_every_class_and_instrument_appears_in_50_images():
    seen: set[int] = set()
    kinds: Counter = Counter()
    for i in range(50):
        frame = render_image(11, i, 128, 128)
        seen |= set(np.unique(frame.mask).tolist())
        kinds.update(p.kind for p in frame.scene.instruments)
    assert seen == set(range(len(SEGMENTATION_CLASSES)))
    assert set(kinds) == set(INSTRUMENTS)


def test_activities_are_balanced_and_distractors_common():
    # Labels come from scene sampling (render_image renders exactly this scene), so sampling suffices here.
    scenes = [sample_scene(frame_rng(2, i), 128, 128) for i in range(300)]
    counts = Counter(s.activity for s in scenes)
    assert set(counts) == set(ACTIVITIES)
    assert min(counts.values()) >= 0.08 * 300, counts
    with_distractor = sum(len(s.instruments) > 1 for s in scenes)
    assert with_distractor >= 0.3 * 300, with_distractor
    engaged = [s for s in scenes if s.activity != "idle"]
    assert sum(len(s.instruments) > 1 for s in engaged) >= 0.3 * len(engaged)


def _rederive(tissue: np.ndarray, instruments, fov, size: float) -> str:
    """The activity rule written independently (scipy distance transforms) from the tissue map and the tips."""
    lesion, blood = tissue == LESION, tissue == BLOOD
    inside = ndimage.distance_transform_edt(lesion)
    outside = ndimage.distance_transform_edt(~lesion)
    engaged = set()
    for pose in instruments:
        x, y = int(round(pose.tip[0])), int(round(pose.tip[1]))
        if np.hypot(pose.tip[0] - fov.cx, pose.tip[1] - fov.cy) > fov.radius:
            continue
        sd = (inside[y, x] - 0.5 if lesion[y, x] else 0.5 - outside[y, x]) if lesion.any() else -np.inf
        if pose.kind == "grasper" and sd >= GRASP_DEPTH * size:
            engaged.add("grasping")
        if pose.kind == "scissors" and abs(sd) <= CUT_BAND * size:
            engaged.add("cutting")
        if pose.kind == "hook" and sd >= -CAUTERY_REACH * size:
            engaged.add("cauterization")
        if pose.kind == "suction_tube" and blood[y, x]:
            engaged.add("suction")
    for activity in ("cauterization", "cutting", "grasping", "suction"):
        if activity in engaged:
            return activity
    return "idle"


def test_activity_rule_matches_geometry_and_saved_masks():
    size = 128
    for i in range(40):
        frame = render_image(5, i, size, size)
        scene = frame.scene
        assert frame.activity == _rederive(scene.tissue, scene.instruments, scene.fov, size)
        # From the saved mask alone: the acting instrument is visible and touches its target class.
        if frame.activity == "idle":
            continue
        actor = scene.instruments[scene.actor]
        assert (frame.mask == INSTRUMENT_CLASS[actor.kind]).any()
        target = BLOOD if frame.activity == "suction" else LESION
        ys, xs = np.nonzero(frame.mask == target)
        assert len(xs) > 0
        assert np.min(np.hypot(xs - actor.tip[0], ys - actor.tip[1])) < 0.08 * size


def test_clip_decodes_with_labels_and_smooth_motion(tmp_path: Path):
    height, width, fps, seconds = 96, 128, 10, 3.0
    record = write_clip(tmp_path, 0, 0, seconds=seconds, fps=fps, size=(height, width), gop=10)
    info = probe_mp4(tmp_path / "clip_000.mp4")
    assert (info.frames, info.width, info.height) == (30, width, height)
    assert info.codec == "h264" and info.pix_fmt == "yuv420p" and info.fps == pytest.approx(fps)
    with av.open(str(tmp_path / "clip_000.mp4")) as container:  # fixed GOP: a keyframe every `gop` frames
        packets = [p for p in container.demux(video=0) if p.size > 0]
        assert [i for i, p in enumerate(packets) if p.is_keyframe] == [0, 10, 20]
    frames = list(read_mp4(tmp_path / "clip_000.mp4"))
    assert len(frames) == 30 and frames[0].shape == (height, width, 3)
    saved = json.loads((tmp_path / "clip_000.json").read_text())
    assert saved == record
    labels = saved["labels"]
    assert [e["frame"] for e in labels] == list(range(30))
    assert [e["time"] for e in labels] == pytest.approx([i / fps for i in range(30)])
    assert all(ACTIVITIES[e["activity_index"]] == e["activity"] for e in labels)
    assert len({e["activity"] for e in labels}) >= 2  # the activity changes within the clip
    segments = saved["segments"]
    assert segments[0]["start_frame"] == 0 and segments[-1]["end_frame"] == 30
    assert all(a["end_frame"] == b["start_frame"] for a, b in zip(segments, segments[1:], strict=False))
    # Coherent motion: neighbouring frames look alike, instrument tips move a few pixels per frame at most.
    steps = [np.abs(a.astype(int) - b.astype(int)).mean() for a, b in zip(frames, frames[1:], strict=False)]
    assert max(steps) < 20
    for index in range(3):  # at 30 fps a tip moves at most ~4% of the frame per frame, the camera less
        plan = plan_clip(frame_rng(0, index, stream=1), 480, 640, 180, 30)
        for track in plan.tracks:
            assert np.hypot(*np.diff(track.tips, axis=0).T).max() < 0.05 * 480
        assert np.abs(np.diff(plan.cameras[:, :, 2], axis=0)).max() < 0.005 * 480


def test_cli_arguments_run(tmp_path: Path):
    parser = argparse.ArgumentParser()
    add_synth_arguments(parser)  # the flags of `endostream data synth`
    args = parser.parse_args(
        ["--out", str(tmp_path / "cli"), "--images", "5", "--seed", "1", "--height", "64", "--width", "80"]
        + ["--no-progress"]
    )
    summary = run_synth(args)
    assert summary.images == 5 and summary.size == (64, 80)
    image = next((tmp_path / "cli").rglob("image/*.png"))
    assert cv2.imread(str(image)).shape == (64, 80, 3)


def test_clips_in_parallel_are_the_clips_written_one_by_one(tmp_path: Path):
    kwargs = {"seconds": 0.5, "fps": 10, "size": (48, 64)}
    alone = write_clips(tmp_path / "one", 2, 5, workers=1, **kwargs)
    together = write_clips(tmp_path / "two", 2, 5, workers=2, **kwargs)
    assert [r["name"] for r in together] == ["clip_000", "clip_001"]
    assert together == alone
    for name in ("clip_000", "clip_001"):
        a, b = list(read_mp4(tmp_path / "one" / f"{name}.mp4")), list(read_mp4(tmp_path / "two" / f"{name}.mp4"))
        assert len(a) == len(b) == 5 and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
