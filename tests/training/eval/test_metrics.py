"""Evaluation metrics against hand computations and slow, independent reference implementations."""

import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist, directed_hausdorff

from training.eval.metrics import (
    ClassificationMeter,
    SegmentationMeter,
    boundary_distances,
    hd_rows_paper_code,
    ssim_label_map_paper_code,
    ssim_per_channel,
)

pytestmark = pytest.mark.timeout(60)


# ----------------------------------------------------------------------------------------------- references
def reference_boundary(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask (outside the image counts as outside)."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def reference_surface_distances(p: np.ndarray, t: np.ndarray) -> np.ndarray:
    """All boundary-to-nearest-boundary distances of both directions, by brute force."""
    bp, bt = np.argwhere(reference_boundary(p)), np.argwhere(reference_boundary(t))
    d = cdist(bp, bt)
    return np.concatenate([d.min(1), d.min(0)])


def reference_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al. 2004 on one (H, W) pair: explicit 11x11 Gaussian window (sigma 1.5) at every valid position."""
    ax = np.arange(-5, 6)
    g = np.exp(-(ax[:, None] ** 2 + ax[None, :] ** 2) / (2 * 1.5**2))
    w = g / g.sum()
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            a, b = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
            ma, mb = (w * a).sum(), (w * b).sum()
            va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
            cov = (w * (a - ma) * (b - mb)).sum()
            values.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(values))


def reference_ssim_gaussian_filter(x: np.ndarray, y: np.ndarray) -> float:
    """The same with scipy.ndimage.gaussian_filter on the full image, then the valid 5-px-cropped region."""
    f = lambda a: ndimage.gaussian_filter(a, 1.5, truncate=3.5)[5:-5, 5:-5]  # noqa: E731
    mx, my = f(x), f(y)
    vx, vy, cov = f(x * x) - mx**2, f(y * y) - my**2, f(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    return float(((2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))).mean())


def reference_skimage_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """scikit-image structural_similarity defaults written out: 7x7 uniform window, sample covariance,
    reflect padding, data range of y, mean without the 3-px border."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    r = y.max() - y.min()
    c1, c2 = (0.01 * r) ** 2, (0.03 * r) ** 2
    xp, yp = np.pad(x, 3, mode="symmetric"), np.pad(y, 3, mode="symmetric")
    values = []
    for i in range(3, x.shape[0] - 3):
        for j in range(3, x.shape[1] - 3):
            a, b = xp[i : i + 7, j : j + 7].ravel(), yp[i : i + 7, j : j + 7].ravel()
            cov = np.cov(a, b)  # ddof=1: sample covariance
            values.append(
                (2 * a.mean() * b.mean() + c1)
                * (2 * cov[0, 1] + c2)
                / ((a.mean() ** 2 + b.mean() ** 2 + c1) * (cov[0, 0] + cov[1, 1] + c2))
            )
    return float(np.mean(values))


def random_label_maps(rng: np.random.Generator, n: int, h: int, w: int, classes: int) -> np.ndarray:
    """Overlapping discs of random classes on background 0."""
    out = np.zeros((n, h, w), dtype=np.int64)
    yy, xx = np.mgrid[:h, :w]
    for i in range(n):
        for _ in range(classes + 1):
            cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(2, max(h, w) // 3)
            out[i][(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(1, classes)
    return out


# ------------------------------------------------------------------------------------------- classification
def test_classification_matches_hand_computation():
    meter = ClassificationMeter(4, class_names=["mark", "inject", "dissect", "idle"])
    meter.update(np.array([0, 1, 1, 1, 0, 2]), np.array([0, 0, 1, 1, 2, 2]))
    out = meter.compute()
    assert out["confusion_matrix"] == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    assert out["accuracy"] == pytest.approx(4 / 6)
    # class 0: P 1/2 R 1/2; class 1: P 2/3 R 1 -> F1 0.8; class 2: P 1 R 1/2 -> F1 2/3; class 3 absent (left out).
    assert out["f1_macro"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert out["precision_macro"] == pytest.approx((0.5 + 2 / 3 + 1) / 3)
    assert out["per_class"]["inject"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert out["per_class"]["idle"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert out["num_samples"] == 6


def test_macro_f1_counts_classes_only_predicted():
    # scikit-learn macro semantics: labels = classes in targets or predictions; zero_division=0.
    meter = ClassificationMeter(4)
    meter.update(np.array([0, 3]), np.array([0, 0]))
    out = meter.compute()
    assert out["per_class"]["0"]["f1"] == pytest.approx(2 / 3)
    assert out["f1_macro"] == pytest.approx((2 / 3 + 0.0) / 2)


def test_classification_streaming_equals_single_batch():
    rng = np.random.default_rng(0)
    pred, target = rng.integers(0, 5, 97), rng.integers(0, 5, 97)
    whole, parts = ClassificationMeter(5), ClassificationMeter(5)
    whole.update(pred, target)
    for chunk in np.array_split(np.arange(97), 7):
        parts.update(pred[chunk], target[chunk])
    assert whole.compute() == parts.compute()
    parts.reset()
    with pytest.raises(RuntimeError, match="update"):
        parts.compute()


def test_classification_rejects_bad_input():
    meter = ClassificationMeter(3)
    with pytest.raises(ValueError, match="class index 3"):
        meter.update(np.array([0, 3]), np.array([0, 1]))
    with pytest.raises(ValueError, match="shape"):
        meter.update(np.array([0, 1]), np.array([0]))
    with pytest.raises(ValueError, match="integer"):
        meter.update(np.array([0.2, 0.9]), np.array([0, 1]))
    with pytest.raises(ValueError, match="class_names"):
        ClassificationMeter(3, class_names=["a", "b"])


# ------------------------------------------------------------------------------------- segmentation: overlap
def test_iou_dice_match_hand_computation():
    target = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0], [2, 2, 0, 0]])
    pred = np.array([[0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0], [2, 0, 0, 0]])
    meter = SegmentationMeter(4, boundary=False, ssim=False)
    meter.update(pred[None], target[None])
    out = meter.compute()
    assert out["confusion_matrix"] == [[9, 1, 0, 0], [0, 4, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    iou, dice = [9 / 11, 4 / 5, 1 / 2], [18 / 20, 8 / 9, 2 / 3]
    assert out["miou"] == pytest.approx(np.mean(iou))  # class 3 absent everywhere: left out
    assert out["miou_no_bg"] == pytest.approx(np.mean(iou[1:]))
    assert out["dice"] == pytest.approx(np.mean(dice))
    assert out["dice_no_bg"] == pytest.approx(np.mean(dice[1:]))
    assert out["pixel_accuracy"] == pytest.approx(14 / 16)
    assert out["per_class"]["2"]["precision"] == pytest.approx(1.0)  # the EndoARSS code's per-class "Acc"
    assert out["per_class"]["2"]["recall"] == pytest.approx(0.5)
    assert out["per_class"]["3"]["iou"] is None and out["per_class"]["3"]["pixels"] == 0
    assert out["hd95"] is None and out["ssim"] is None and out["hd_rows_paper_code"] is None


def test_ignore_index_pixels_do_not_count():
    target = np.array([[0, 1], [1, 255]])
    meter = SegmentationMeter(2, boundary=False, ssim=False)
    meter.update(np.array([[[0, 1], [1, 0]]]), target[None])
    assert meter.compute()["miou"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="ignore_index"):
        SegmentationMeter(3, ignore_index=1)
    with pytest.raises(ValueError, match="class index 7"):
        meter.update(np.array([[[0, 1], [1, 0]]]), np.array([[[0, 7], [1, 0]]]))


# ----------------------------------------------------------------------------------- segmentation: boundary
@pytest.mark.parametrize("k", [1, 3, 6])
def test_parallel_lines_are_k_apart(k: int):
    target, pred = np.zeros((32, 32), np.int64), np.zeros((32, 32), np.int64)
    target[10], pred[10 + k] = 1, 1  # full-width 1-px lines: every boundary pixel is exactly k from the other
    meter = SegmentationMeter(2, ssim=False)
    meter.update(pred[None], target[None])
    fg = meter.compute()["per_class"]["1"]
    assert fg["hd95"] == pytest.approx(k)
    assert fg["hd_mean"] == pytest.approx(k)
    assert fg["surface_dice"] == (1.0 if k <= 2 else 0.0)  # default tolerance 2 px


@pytest.mark.parametrize("k", [1, 2, 4])
def test_squares_offset_by_k(k: int):
    target, pred = np.zeros((48, 48), np.int64), np.zeros((48, 48), np.int64)
    target[10:30, 10:30] = 1
    pred[10:30, 10 + k : 30 + k] = 1
    meter = SegmentationMeter(2, ssim=False)
    meter.update(pred[None], target[None])
    fg = meter.compute()["per_class"]["1"]
    reference = reference_surface_distances(pred == 1, target == 1)
    assert reference.max() == pytest.approx(k)  # the shifted edges are the farthest apart
    assert fg["hd95"] == pytest.approx(k)  # more than 5% of boundary pixels sit on the shifted edges
    assert fg["hd95"] == pytest.approx(np.percentile(reference, 95))
    assert fg["hd_mean"] == pytest.approx(reference.mean())
    assert 0 < fg["hd_mean"] < k


def test_identical_masks_score_zero_distance():
    rng = np.random.default_rng(1)
    maps = random_label_maps(rng, 3, 40, 56, 5)
    meter = SegmentationMeter(5, ssim=False)
    meter.update(maps, maps)
    out = meter.compute()
    assert out["hd95"] == 0.0 and out["hd_mean"] == 0.0 and out["surface_dice"] == 1.0
    assert out["hd_rows_paper_code"] == 0.0 and out["miou"] == 1.0


def test_absent_and_one_sided_classes():
    target, pred = np.zeros((30, 40), np.int64), np.zeros((30, 40), np.int64)
    target[5:10, 5:10] = pred[5:10, 5:10] = 1
    pred[20:25, 20:25] = 2  # class 2 only predicted, class 3 nowhere
    meter = SegmentationMeter(4, ssim=False)
    meter.update(pred[None], target[None])
    out = meter.compute()["per_class"]
    assert out["1"]["hd95"] == 0.0
    assert out["2"]["hd95"] == pytest.approx(math.hypot(30, 40))  # penalty: the image diagonal
    assert out["2"]["hd_mean"] == pytest.approx(50.0)
    assert out["2"]["surface_dice"] == 0.0
    assert out["3"]["hd95"] is None and out["3"]["iou"] is None


def test_boundary_metrics_match_brute_force_with_cropping():
    rng = np.random.default_rng(2)
    maps = random_label_maps(rng, 6, 33, 47, 4)
    checked = 0
    for p_map, t_map in zip(maps[:3], maps[3:], strict=True):
        meter = SegmentationMeter(4, boundary_tolerance=1.5, ssim=False)
        meter.update(p_map[None], t_map[None])
        per_class = meter.compute()["per_class"]
        for c in range(4):
            p, t = p_map == c, t_map == c
            if not (p.any() and t.any()):
                continue
            reference = reference_surface_distances(p, t)
            to_target, to_pred = boundary_distances(p, t)
            np.testing.assert_allclose(np.concatenate([to_target, to_pred]), reference)
            assert per_class[str(c)]["hd95"] == pytest.approx(np.percentile(reference, 95))
            assert per_class[str(c)]["hd_mean"] == pytest.approx(reference.mean())
            assert per_class[str(c)]["surface_dice"] == pytest.approx((reference <= 1.5).mean())
            checked += 1
    assert checked >= 6


# --------------------------------------------------------------------------------------- segmentation: SSIM
def test_ssim_identical_is_one():
    rng = np.random.default_rng(3)
    maps = random_label_maps(rng, 2, 24, 30, 4)
    one_hot = (maps[:, None] == np.arange(4)[None, :, None, None]).astype(np.float32)
    meter = SegmentationMeter(4, boundary=False)
    meter.update(maps, maps, probs=one_hot)
    assert meter.compute()["ssim"] == pytest.approx(1.0, abs=1e-12)
    meter.reset()
    meter.update(maps, maps)  # no probs: the one-hot prediction
    out = meter.compute()
    assert out["ssim"] == pytest.approx(1.0, abs=1e-12)
    assert out["ssim_label_map_paper_code"] == pytest.approx(1.0)


def test_ssim_matches_slow_references():
    rng = np.random.default_rng(4)
    target = random_label_maps(rng, 1, 20, 23, 3)[0]
    logits = 3.0 * (target[None] == np.arange(3)[:, None, None]) + rng.normal(0, 1.5, (3, 20, 23))
    probs = np.exp(logits) / np.exp(logits).sum(0)
    one_hot = (target[None] == np.arange(3)[:, None, None]).astype(np.float64)
    ours = ssim_per_channel(one_hot.astype(bool), probs)
    for c in range(3):
        assert ours[c] == pytest.approx(reference_ssim(one_hot[c], probs[c]), abs=1e-9)
        assert ours[c] == pytest.approx(reference_ssim_gaussian_filter(one_hot[c], probs[c]), abs=1e-9)
    np.testing.assert_allclose(ours, ssim_per_channel(one_hot, probs), atol=1e-12)  # binary shortcut is exact
    assert ours.max() < 1.0
    meter = SegmentationMeter(3, boundary=False)
    meter.update(probs.argmax(0)[None], target[None], probs=probs[None])
    assert meter.compute()["ssim"] == pytest.approx(ours.mean(), abs=1e-12)


def _fully_wrong(num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Target: background with a lesion square; prediction: every pixel a class the target does not have there."""
    target = np.zeros((1, 32, 32), np.int64)
    target[0, 8:20, 8:20] = 1
    pred = np.where(target == 0, 2, 0)  # background -> class 2, lesion -> background: mIoU 0
    return pred, target


@pytest.mark.parametrize("num_classes", [3, 7, 13])
def test_ssim_of_a_fully_wrong_prediction_is_low_whatever_the_class_count(num_classes: int):
    pred, target = _fully_wrong(num_classes)
    meter = SegmentationMeter(num_classes, boundary=False)
    meter.update(pred, target)
    out = meter.compute()
    assert out["miou"] == 0.0
    # Averaging over all classes gave 0.70 with 7 classes and 0.84 with 13: the absent classes scored 1 each.
    assert out["ssim"] < 0.15
    assert [out["per_class"][str(c)]["ssim"] is None for c in range(num_classes)] == [False] * 3 + [True] * (
        num_classes - 3
    )


def test_ssim_leaves_out_classes_absent_from_both_maps():
    rng = np.random.default_rng(8)
    target = random_label_maps(rng, 2, 24, 30, 3)
    pred = np.where(rng.random(target.shape) < 0.2, rng.integers(0, 3, target.shape), target)
    few, many = SegmentationMeter(3, boundary=False), SegmentationMeter(9, boundary=False)
    few.update(pred, target)
    many.update(pred, target)
    assert many.compute()["ssim"] == pytest.approx(few.compute()["ssim"], abs=1e-12)
    # A class is averaged over the images where it occurs only: image 1 has no class 2 in either map.
    pred_wrong, target_wrong = _fully_wrong(3)
    single = SegmentationMeter(3, boundary=False)
    single.update(pred_wrong, target_wrong)
    meter = SegmentationMeter(3, boundary=False)
    meter.update(np.concatenate([pred_wrong, target_wrong]), np.concatenate([target_wrong, target_wrong]))
    expected = single.compute()["per_class"]["2"]["ssim"]
    assert expected < 0.15 and meter.compute()["per_class"]["2"]["ssim"] == pytest.approx(expected, abs=1e-12)


def test_ssim_needs_images_larger_than_the_window():
    meter = SegmentationMeter(2, boundary=False)
    with pytest.raises(ValueError, match="ssim=False"):
        meter.update(np.zeros((1, 8, 30), np.int64), np.zeros((1, 8, 30), np.int64))


# -------------------------------------------------------------------------------------- paper-code variants
def test_hd_rows_paper_code_matches_scipy_and_brute_force():
    rng = np.random.default_rng(5)
    target, pred = rng.integers(0, 6, (2, 20, 17))
    expected = max(directed_hausdorff(target, pred)[0], directed_hausdorff(pred, target)[0])
    rows = cdist(target.astype(float), pred.astype(float))
    assert hd_rows_paper_code(target, pred) == pytest.approx(expected)
    assert hd_rows_paper_code(target, pred) == pytest.approx(max(rows.min(1).max(), rows.min(0).max()))
    meter = SegmentationMeter(6, ssim=False)
    meter.update(np.stack([pred, target]), np.stack([target, target]))
    assert meter.compute()["hd_rows_paper_code"] == pytest.approx(expected / 2)


def test_ssim_label_map_paper_code_matches_written_out_skimage():
    rng = np.random.default_rng(6)
    target = random_label_maps(rng, 1, 18, 21, 5)[0]
    pred = np.where(rng.random(target.shape) < 0.1, rng.integers(0, 5, target.shape), target)
    assert ssim_label_map_paper_code(target, pred) == pytest.approx(reference_skimage_ssim(target, pred), abs=1e-9)
    assert math.isnan(ssim_label_map_paper_code(target, np.zeros_like(pred)))
    meter = SegmentationMeter(5, boundary=False)
    meter.update(np.zeros((1, 18, 21), np.int64), target[None])  # constant prediction: skipped, as upstream
    assert meter.compute()["ssim_label_map_paper_code"] is None


# ------------------------------------------------------------------------------------------------ streaming
def test_segmentation_streaming_equals_single_batch():
    rng = np.random.default_rng(7)
    target = random_label_maps(rng, 6, 26, 31, 4)
    target[0, :3, :3] = 255
    logits = 2.0 * (target[:, None] == np.arange(4)[None, :, None, None]) + rng.normal(0, 1.0, (6, 4, 26, 31))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    pred = probs.argmax(1)
    whole, parts = SegmentationMeter(4), SegmentationMeter(4)
    whole.update(pred, target, probs=probs)
    for idx in ([0, 1], [2], [3, 4, 5]):
        parts.update(pred[idx], target[idx], probs=probs[idx])
    a, b = whole.compute(), parts.compute()
    assert a == b
    assert a["num_images"] == 6 and 0 < a["ssim"] < 1 and a["hd95"] > 0
    for key in ("miou", "dice", "hd95", "hd_mean", "ssim", "pixel_accuracy"):
        assert isinstance(a[key], float), key
    with pytest.raises(ValueError, match="probs shape"):
        parts.update(pred[:1], target[:1], probs=probs[:1, :3])
