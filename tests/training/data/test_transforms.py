"""Transforms keep image and mask aligned and mask values exact; augmentation is reproducible per (seed, epoch,
index) with any number of DataLoader workers; collate builds the batch the trainer expects."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from training.data.transforms import (
    ColorJitter,
    Compose,
    HorizontalFlip,
    RandomScaleCrop,
    Resize,
    TaskDataset,
    build_eval_transform,
    build_train_transform,
    collate,
)


def _square_sample(height: int = 120, width: int = 160, value: int = 3) -> dict:
    """A bright square on black with the same square as class `value` in the mask."""
    image = np.zeros((height, width, 3), np.uint8)
    mask = np.zeros((height, width), np.uint8)
    image[30:70, 90:130] = 255
    mask[30:70, 90:130] = value
    mask[:5, :5] = 255  # an ignore corner
    return {"image": image, "mask": mask, "activity": 1, "name": "square"}


def _bright(sample: dict) -> np.ndarray:
    return sample["image"].mean(axis=2) > 127


def test_flip_keeps_alignment():
    out = HorizontalFlip(p=1.0)(_square_sample(), np.random.default_rng(0))
    assert np.array_equal(_bright(out), out["mask"] == 3)
    assert (out["mask"][30:70, 30:70] == 3).all()


@pytest.mark.parametrize("scale", [(0.5, 0.9), (1.2, 1.5)])
def test_scale_crop_and_resize_keep_alignment_and_values(scale):
    step = Compose([RandomScaleCrop(scale), HorizontalFlip(0.5), Resize((64, 96))])
    for seed in range(20):
        out = step(_square_sample(), np.random.default_rng(seed))
        assert out["image"].shape == (64, 96, 3) and out["mask"].shape == (64, 96)
        assert set(np.unique(out["mask"]).tolist()) <= {0, 3, 255}
        square = out["mask"] == 3
        bright = _bright(out)
        if square.sum() > 20:
            # Same place in both: they may differ only on part of a one-pixel ring (nearest vs area sampling);
            # a half-pixel shift (plain INTER_NEAREST) breaks both checks.
            ys, xs = np.nonzero(square)
            by, bx = np.nonzero(bright)
            perimeter = 2 * (np.ptp(ys) + np.ptp(xs) + 2)
            assert (square ^ bright).sum() <= 0.25 * perimeter, seed
            assert abs(ys.mean() - by.mean()) < 0.25 and abs(xs.mean() - bx.mean()) < 0.25, seed


def test_zoom_out_pads_mask_with_ignore():
    out = RandomScaleCrop((1.5, 1.5))(_square_sample(), np.random.default_rng(1))
    assert out["mask"].shape == (180, 240)
    assert (out["mask"] == 255).sum() == 180 * 240 - 120 * 160 + 25  # padding plus the original ignore corner
    assert np.array_equal(out["mask"] == 3, _bright(out))


def test_resize_mask_is_nearest_and_centred():
    mask = np.repeat(np.repeat(np.arange(4, dtype=np.uint8).reshape(2, 2), 8, 0), 8, 1)  # 16x16 quadrants
    out = Resize((4, 4))({"image": np.zeros((16, 16, 3), np.uint8), "mask": mask})
    assert out["mask"].tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]


def test_color_jitter_touches_image_only_and_zero_is_identity():
    sample = _square_sample()
    sample["image"] = np.random.default_rng(0).integers(0, 256, sample["image"].shape, dtype=np.uint8)
    out = ColorJitter(0.4, 0.4, 0.4, 0.05)(sample, np.random.default_rng(2))
    assert out["mask"] is sample["mask"] and out["image"].dtype == np.uint8
    assert not np.array_equal(out["image"], sample["image"])
    same = ColorJitter(0, 0, 0, 0)(sample, np.random.default_rng(2))
    assert np.abs(same["image"].astype(int) - sample["image"]).max() <= 1


def test_train_transform_never_edits_its_input():
    sample = _square_sample()
    for array in (sample["image"], sample["mask"]):
        array.setflags(write=False)  # like cached dataset arrays
    out = build_train_transform((48, 64), color_jitter=0.3, blur_prob=1.0)(sample, np.random.default_rng(0))
    assert out["image"].shape == (48, 64, 3)


class _Squares:
    def __len__(self) -> int:
        return 6

    def __getitem__(self, index: int) -> dict:
        sample = _square_sample(value=1 + index % 3)
        sample["activity"] = index % 2
        sample["name"] = f"s{index}"
        return sample


def test_task_dataset_is_reproducible_across_workers_and_epochs():
    data = TaskDataset(_Squares(), build_train_transform((32, 40)), seed=5)
    first = [data[i]["image"] for i in range(len(data))]
    assert all(np.array_equal(a, data[i]["image"]) for i, a in enumerate(first))
    loaded = [b["image"] for b in DataLoader(data, batch_size=2, num_workers=2, collate_fn=collate)]
    assert torch.equal(torch.cat(loaded), collate([data[i] for i in range(len(data))])["image"])
    data.set_epoch(1)
    assert any(not np.array_equal(a, data[i]["image"]) for i, a in enumerate(first))


def test_collate_batch_and_full_mask():
    data = TaskDataset(_Squares(), build_eval_transform((32, 40)))
    batch = collate([data[i] for i in range(3)])
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (3, 3, 32, 40)
    assert batch["mask"].dtype == torch.long and batch["mask"].shape == (3, 32, 40)
    assert batch["activity"].tolist() == [0, 1, 0] and batch["name"] == ["s0", "s1", "s2"]
    assert [tuple(m.shape) for m in batch["full_mask"]] == [(120, 160)] * 3
    assert batch["full_mask"][1].max().item() == 255 and (batch["full_mask"][1] == 2).any()
    with pytest.raises(ValueError, match="Resize"):
        collate([_square_sample(), _square_sample(60, 80)])
