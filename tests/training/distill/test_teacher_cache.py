"""Teacher feature cache: one teacher pass per image, later objects and runs read from disk, keys follow the teacher."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from training.builders.backbones import build_backbone
from training.builders.registry import build_model
from training.config import load_config
from training.distill.cache import FeatureStore, TeacherFeatureCache, image_key, teacher_fingerprint

pytestmark = pytest.mark.timeout(60)

TASKS = [
    {"name": "activity", "kind": "classification", "classes": ["a", "b", "c"]},
    {"name": "segmentation", "kind": "segmentation", "classes": ["bg", "x", "y"]},
]
DINO = "{key: dino, name: vit_tiny_p8, input_size: 32, overrides: {embed_dim: 24, depth: 4, num_heads: 2}}"


class CountingTeacher:
    """A stand-in `compute`: deterministic maps per image, two levels of different sizes; counts images and calls."""

    def __init__(self, scale: float = 1.0) -> None:
        self.calls = 0
        self.images = 0
        self.scale = scale

    def __call__(self, images: torch.Tensor, teachers: Sequence[str]) -> dict[str, list[torch.Tensor]]:
        self.calls += 1
        self.images += len(images)
        x = images.float() / 255 * self.scale
        return {
            t: [x[:, :2, ::4, ::4] + i, x.mean(1, keepdim=True)[:, :, ::8, ::8] * (i + 2)]
            for i, t in enumerate(teachers)
        }


def _images(count: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)


def _cache(root: Path, teacher: CountingTeacher, fingerprints: dict[str, str] | None = None) -> TeacherFeatureCache:
    return TeacherFeatureCache(root, fingerprints or {"a": "f" * 64, "b": "e" * 64}, teacher, dtype="float16")


def test_first_pass_computes_and_writes_a_new_cache_object_only_reads(tmp_path: Path):
    images = _images(6)
    first = CountingTeacher()
    cache = _cache(tmp_path, first)
    maps = cache(images[:4])
    maps = {k: [torch.cat([a, b]) for a, b in zip(v, cache(images[4:])[k], strict=True)] for k, v in maps.items()}
    assert first.images == 6 and first.calls == 2
    assert maps["a"][0].shape == (6, 2, 8, 8) and maps["b"][1].shape == (6, 1, 4, 4)
    assert maps["a"][0].dtype == torch.float32
    expected = first(images, ["a", "b"])
    for key in ("a", "b"):
        for got, want in zip(maps[key], expected[key], strict=True):
            torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-3)  # float16 on disk
    store = tmp_path / f"a-{'f' * 16}" / "32x32"
    assert {p.name for p in store.iterdir()} >= {"meta.json", "index.txt", "level0.bin", "level1.bin"}
    assert len((store / "index.txt").read_text().splitlines()) == 6
    assert json.loads((store / "meta.json").read_text())["shapes"] == [[2, 8, 8], [1, 4, 4]]

    second = CountingTeacher()
    again = _cache(tmp_path, second)  # a new object, as a later epoch in another process or a later run would build
    reread = again(images[[5, 0, 3]])
    assert second.calls == 0 and again.computed == 0 and again.read_back == 3
    torch.testing.assert_close(reread["b"][1], maps["b"][1][[5, 0, 3]], atol=0, rtol=0)  # bit-identical targets


def test_only_unseen_images_reach_the_teacher(tmp_path: Path):
    images = _images(5)
    teacher = CountingTeacher()
    cache = _cache(tmp_path, teacher)
    cache(images[:3])
    cache(torch.cat([images[1:2], images[3:5], images[3:4]]))  # 1 known, 2 new (one of them twice)
    assert teacher.calls == 2 and teacher.images == 3 + 3  # the duplicate is computed with its batch, stored once
    keys = [image_key(i) for i in images]
    assert all(row is not None for row in FeatureStore(tmp_path / f"a-{'f' * 16}" / "32x32", "f" * 64, {}).rows(keys))
    assert len(cache.store("b", (32, 32))) == 5


def test_keys_change_with_the_teacher_fingerprint_and_the_resolution(tmp_path: Path):
    images = _images(2, size=32)
    teacher = CountingTeacher()
    _cache(tmp_path, teacher)(images)
    other = CountingTeacher(scale=2.0)
    maps = _cache(tmp_path, other, {"a": "0" * 64, "b": "e" * 64})(images)  # teacher a changed, b did not
    assert other.calls == 1 and other.images == 2
    torch.testing.assert_close(maps["a"][1], other(images, ["a"])["a"][1], atol=2e-3, rtol=1e-3)
    larger = torch.nn.functional.interpolate(images.float(), size=(64, 64)).round().to(torch.uint8)
    assert image_key(larger[0]) != image_key(images[0])
    third = CountingTeacher()
    _cache(tmp_path, third)(larger)
    assert third.images == 2  # the same frames at another resolution are other images, in another store
    assert {p.name for p in (tmp_path / f"a-{'f' * 16}").iterdir()} == {"32x32", "64x64"}
    with pytest.raises(RuntimeError, match="belongs to fingerprint"):
        FeatureStore(tmp_path / f"a-{'f' * 16}" / "32x32", "1" * 64, {})


def test_fingerprint_follows_weights_and_view():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    view = {"input_size": 224}
    assert teacher_fingerprint(a, view) == teacher_fingerprint(a, dict(view))
    assert teacher_fingerprint(a, view) != teacher_fingerprint(b, view)
    assert teacher_fingerprint(a, view) != teacher_fingerprint(a, {"input_size": 448})


def test_builder_keys_the_cache_by_teacher_weights_and_input_size(tmp_path: Path):
    def stores(*overrides: str) -> set[str]:
        cfg = load_config(
            "tiny_sak",
            [
                "model.image_size=[32, 32]",
                "model.backbone.overrides={embed_dim: 16, depth: 4, num_heads: 2}",
                f"model.sak.cache_dir={tmp_path}",
                f"model.sak.teachers=[{DINO}]",
                *overrides,
            ],
        )
        model = build_model(cfg.model, TASKS)
        return {folder.name for folder in model.feature_source.folders.values()}

    base = stores()
    assert stores() == base  # same spec, same weights (seeded), same store
    assert stores(f"model.sak.teachers=[{DINO[:-1]}, seed: 5}}]") != base  # other weights
    assert stores(f"model.sak.teachers=[{DINO.replace('input_size: 32', 'input_size: 48')}]") != base  # other view

    torch.manual_seed(3)
    teacher = build_backbone("vit_tiny_p8", embed_dim=24, depth=4, num_heads=2)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pth")
    with_checkpoint = f"model.sak.teachers=[{DINO[:-1]}, checkpoint: {tmp_path / 'teacher.pth'}}}]"
    from_file = stores(with_checkpoint)
    assert from_file != base and stores(with_checkpoint) == from_file  # keyed by the checkpoint's weights
    with torch.no_grad():
        teacher.blocks[0].mlp.fc1.weight[0, 0] += 1.0
    torch.save(teacher.state_dict(), tmp_path / "teacher.pth")
    assert stores(with_checkpoint) != from_file  # the same path holding other weights is another teacher


def test_fill_runs_the_teachers_once_over_a_dataset(tmp_path: Path):
    frames = [{"image": np.asarray(img.permute(1, 2, 0))} for img in _images(7)]
    teacher = CountingTeacher()
    cache = _cache(tmp_path, teacher)
    cache.fill(frames, batch_size=3, progress=False)
    assert teacher.calls == 3 and teacher.images == 7
    cache.fill(frames, batch_size=3, progress=False)
    batch = torch.stack([torch.from_numpy(f["image"]).permute(2, 0, 1) for f in frames[:4]])
    cache(batch)  # what training reads: the same bytes as the filled samples (H W 3 -> 3 H W, contiguous)
    assert teacher.calls == 3 and cache.read_back == 7 + 4
