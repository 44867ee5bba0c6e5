"""Streaming evaluation metrics for surgical activity recognition and semantic segmentation.

Both meters accumulate batch by batch (`update`) and report once (`compute`), so a whole split is scored without
holding its predictions in memory. Every value in a `compute()` result is a plain Python number, list, dict or
None (None = undefined, e.g. a class that never occurs), so results go straight into JSON.

Metrics and their sources:
- Accuracy, per-class precision / recall / F1 and macro F1 follow scikit-learn's `precision_recall_fscore_support`
  with `average="macro"` and `zero_division=0`: the macro mean runs over the classes present in the targets or the
  predictions (scikit-learn's `unique_labels(y_true, y_pred)`); a class that occurs in neither is left out.
- IoU and Dice come from a confusion matrix accumulated over the whole split (dataset-level, as in the EndoARSS
  code and the mmsegmentation convention). The means include the background class, as the EndoARSS code and the
  paper's tables do; `*_no_bg` keys give the same means without it. Classes absent from both predictions and
  targets over the whole split are undefined (None) and left out of the means.
- Boundary distances (HD95, average symmetric surface distance, normalised surface Dice): the boundary of a mask is
  the mask XOR its erosion by a 3x3 cross (pixels on the image border count as boundary), and distances between
  the two boundaries come from `scipy.ndimage.distance_transform_edt`, in pixels. HD95 is the 95th percentile and
  the mean is the average of all boundary-to-boundary distances, both directions pooled (Heimann et al. 2009,
  "Comparison and evaluation of methods for liver segmentation from CT datasets"). Surface Dice at a tolerance of
  `boundary_tolerance` pixels follows Nikolov et al. 2021 ("Clinically applicable segmentation of head and neck
  anatomy for radiotherapy"). Per image and class: a class absent from both maps is skipped; a class present in
  only one of them scores the image diagonal as HD95 and mean distance (the largest distance the image allows)
  and 0 surface Dice. Each class averages over the images where it was scored; the reported value averages over
  classes (background included; `*_no_bg` without it), like mIoU.
- SSIM (Wang et al. 2004, "Image quality assessment: from error visibility to structural similarity"): 11x11
  Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, data range 1, valid region only (no padded borders).
  It compares the one-hot target with the class probability maps (or the one-hot prediction when no
  probabilities are given) channel by channel. Scoring rule, the same as for the boundary distances: per image, a
  class is scored when it occurs in the target or in the predicted label map; a class absent from both is left out
  (two empty maps are trivially identical and would score 1, so with 7 classes a prediction that gets every pixel
  wrong scored about 0.7). Each class averages over the images where it was scored, and the reported value
  averages over classes (background included).

Paper-code variants (gkw0010/EndoARSS `LibMTL/eva.py`, see MODEL_NOTES section 1), reported for comparison only:
- `hd_rows_paper_code`: symmetric Hausdorff distance between the two label maps taken as point sets whose points
  are the image rows (each row a W-dimensional vector of class indices), via
  `scipy.spatial.distance.directed_hausdorff`, averaged over images. It is not a boundary distance.
- `ssim_label_map_paper_code`: SSIM on the raw label maps as scikit-image's `structural_similarity` defaults
  compute it (7x7 uniform window, sample covariance, data range = max - min of the predicted map), averaged
  over images; an image whose prediction is a single class has data range 0 (SSIM undefined, NaN upstream) and is
  skipped, as the upstream code skips NaN values.
- The per-class "Acc" column of the EndoARSS code is TP / (TP + FP), i.e. the per-class `precision` reported here.
For both variants, pixels whose target is `ignore_index` take the predicted class, so they never count.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial.distance import directed_hausdorff

logger = logging.getLogger(__name__)

# Wang et al. 2004, section III-C: 11x11 circular-symmetric Gaussian window, sigma 1.5, K1 0.01, K2 0.03.
SSIM_SIGMA = 1.5
SSIM_RADIUS = 5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
# scikit-image `structural_similarity` defaults, used by the EndoARSS evaluation code.
PAPER_SSIM_WINDOW = 7

_CROSS = ndimage.generate_binary_structure(2, 1)


def _confusion(target: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Confusion matrix with targets on rows and predictions on columns (scikit-learn's layout)."""
    index = target.astype(np.int64, copy=False) * num_classes + pred.astype(np.int64, copy=False)
    return np.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _check_labels(values: np.ndarray, num_classes: int, what: str) -> None:
    if values.size == 0:
        return
    if not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"{what} must hold integer class indices, got dtype {values.dtype}; pass argmax(1) of logits")
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise ValueError(f"{what} holds class index {bad}, outside [0, {num_classes - 1}]; check num_classes")


def _class_names(num_classes: int, class_names: Sequence[str] | None) -> list[str]:
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if class_names is None:
        return [str(i) for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f"class_names has {len(class_names)} names for num_classes={num_classes}; give one per class")
    return [str(name) for name in class_names]


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0 where den == 0 (scikit-learn's zero_division=0)."""
    out = np.zeros(num.shape, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _num(value: float | np.floating | None) -> float | None:
    """JSON-safe number: NaN (undefined) becomes None."""
    if value is None or not math.isfinite(float(value)):
        return None
    return float(value)


def _masked_mean(values: np.ndarray, keep: np.ndarray) -> float | None:
    """Mean of the defined (finite) values where `keep`; None when there are none."""
    chosen = values[keep & np.isfinite(values)]
    return float(chosen.mean()) if chosen.size else None


class ClassificationMeter:
    """Accuracy, macro F1 and per-class precision / recall / F1 accumulated over batches.

    Macro means follow scikit-learn (`average="macro"`, `zero_division=0`): they run over the classes that occur in
    the targets or the predictions seen so far; a class that occurs in neither has support 0, scores 0 and is left
    out. The per-class "Acc" of the EndoARSS code is TP / (TP + FP), i.e. `precision` here.
    """

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None) -> None:
        """
        Args:
            num_classes: number of activity classes.
            class_names: keys for `per_class` (default: the class index as a string).
        """
        self.num_classes = num_classes
        self.class_names = _class_names(num_classes, class_names)
        self.confusion = np.zeros((num_classes, num_classes), dtype=np.int64)

    def reset(self) -> None:
        self.confusion[:] = 0

    def update(self, pred: np.ndarray, target: np.ndarray) -> None:
        """Add a batch.

        Args:
            pred: predicted class indices, any shape (usually (B,)).
            target: true class indices, same shape as `pred`.
        """
        pred, target = np.asarray(pred), np.asarray(target)
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {pred.shape} != target shape {target.shape}")
        _check_labels(pred, self.num_classes, "pred")
        _check_labels(target, self.num_classes, "target")
        self.confusion += _confusion(target.reshape(-1), pred.reshape(-1), self.num_classes)

    def compute(self) -> dict[str, Any]:
        """Metrics over everything seen since construction or `reset()` (fractions in [0, 1])."""
        cm = self.confusion
        total = int(cm.sum())
        if total == 0:
            raise RuntimeError("ClassificationMeter.compute() before any update(); feed at least one batch")
        tp = np.diag(cm).astype(np.float64)
        predicted, support = cm.sum(0), cm.sum(1)
        precision, recall = _ratio(tp, predicted), _ratio(tp, support)
        f1 = _ratio(2 * tp, predicted + support)  # == 2PR / (P + R), and 0 where both are 0
        present = (predicted + support) > 0
        return {
            "accuracy": float(tp.sum() / total),
            "f1_macro": float(f1[present].mean()),
            "precision_macro": float(precision[present].mean()),
            "recall_macro": float(recall[present].mean()),
            "num_samples": total,
            "per_class": {
                name: {
                    "precision": float(precision[i]),
                    "recall": float(recall[i]),
                    "f1": float(f1[i]),
                    "support": int(support[i]),
                }
                for i, name in enumerate(self.class_names)
            },
            "confusion_matrix": cm.tolist(),
        }


def _boundary(mask: np.ndarray) -> np.ndarray:
    # border_value=0: mask pixels on the image edge are boundary, as in medpy's surface distances.
    return mask & ~ndimage.binary_erosion(mask, structure=_CROSS, border_value=0)


def boundary_distances(pred_mask: np.ndarray, target_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distances (px) from each boundary pixel of one mask to the nearest boundary pixel of the other.

    Both masks must be non-empty. The work is cropped to the union's bounding box plus one pixel: every boundary
    pixel lies inside it, so the distance transform of the crop gives the same distances as the full image.

    Returns:
        (pred boundary -> target boundary, target boundary -> pred boundary), 1-D float arrays.
    """
    if not (pred_mask.any() and target_mask.any()):
        raise ValueError("boundary_distances needs two non-empty masks; score a missing class as a penalty instead")
    rows = np.flatnonzero((pred_mask | target_mask).any(1))
    cols = np.flatnonzero((pred_mask | target_mask).any(0))
    r0, r1 = max(rows[0] - 1, 0), rows[-1] + 2
    c0, c1 = max(cols[0] - 1, 0), cols[-1] + 2
    bp = _boundary(pred_mask[r0:r1, c0:c1])
    bt = _boundary(target_mask[r0:r1, c0:c1])
    to_target = ndimage.distance_transform_edt(~bt)[bp]
    to_pred = ndimage.distance_transform_edt(~bp)[bt]
    return to_target, to_pred


def _gaussian_valid(stack: np.ndarray) -> np.ndarray:
    """Gaussian window means of each (H, W) map of a (N, H, W) stack, valid region only: (N, H - 10, W - 10)."""
    # truncate * sigma + 0.5 gives radius 5, the 11x11 window; separable, so crop each axis after its pass.
    r, truncate = SSIM_RADIUS, SSIM_RADIUS / SSIM_SIGMA
    out = ndimage.gaussian_filter1d(stack, SSIM_SIGMA, axis=2, truncate=truncate)[:, :, r:-r]
    return ndimage.gaussian_filter1d(out, SSIM_SIGMA, axis=1, truncate=truncate)[:, r:-r, :]


def ssim_per_channel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Mean SSIM (Wang et al. 2004) of each channel pair of two (C, H, W) maps with values in [0, 1].

    Boolean maps are read as binary, so E[x^2] = E[x] saves a filter pass. A channel that is zero in both maps
    scores exactly 1 (zero means, variances and covariance) and is not filtered; `SegmentationMeter` does not score
    such channels at all (module docstring).

    Returns:
        (C,) mean of the SSIM map over the valid region (windows fully inside the image).
    """
    if x.shape != y.shape or x.ndim != 3:
        raise ValueError(f"expected two (C, H, W) maps of the same shape, got {x.shape} and {y.shape}")
    if min(x.shape[1:]) <= 2 * SSIM_RADIUS:
        raise ValueError(f"SSIM needs images larger than 11x11 px, got {x.shape[1:]}; disable it with ssim=False")
    result = np.ones(x.shape[0])
    active = np.flatnonzero(x.any(axis=(1, 2)) | y.any(axis=(1, 2)))
    if active.size == 0:
        return result
    xa, ya = x[active].astype(np.float64), y[active].astype(np.float64)
    maps = [xa, ya, xa * ya]
    if x.dtype != bool:
        maps.append(xa * xa)
    if y.dtype != bool:
        maps.append(ya * ya)
    filtered = np.split(_gaussian_valid(np.concatenate(maps)), len(maps))
    mx, my, mxy = filtered[:3]
    mxx = mx if x.dtype == bool else filtered[3]
    myy = my if y.dtype == bool else filtered[-1]
    c1, c2 = SSIM_K1**2, SSIM_K2**2  # data range 1
    numerator = (2 * mx * my + c1) * (2 * (mxy - mx * my) + c2)
    denominator = (mx * mx + my * my + c1) * ((mxx - mx * mx) + (myy - my * my) + c2)
    result[active] = (numerator / denominator).mean(axis=(1, 2))
    return result


def ssim_label_map_paper_code(target: np.ndarray, pred: np.ndarray) -> float:
    """SSIM of two (H, W) label maps with scikit-image's defaults, as the EndoARSS code calls it.

    7x7 uniform window, sample covariance (N / (N - 1)), K1 0.01, K2 0.03, data range = max - min of `pred`,
    mean over the map without its 3-pixel border. NaN when the prediction is constant (data range 0).
    """
    x, y = target.astype(np.float64), pred.astype(np.float64)
    data_range = y.max() - y.min()
    if data_range == 0:
        return float("nan")
    n = PAPER_SSIM_WINDOW**2
    cov_norm = n / (n - 1)
    mx, my, mxx, myy, mxy = (ndimage.uniform_filter(a, size=PAPER_SSIM_WINDOW) for a in (x, y, x * x, y * y, x * y))
    var_x, var_y, cov = cov_norm * (mxx - mx * mx), cov_norm * (myy - my * my), cov_norm * (mxy - mx * my)
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ssim_map = (2 * mx * my + c1) * (2 * cov + c2) / ((mx * mx + my * my + c1) * (var_x + var_y + c2))
    pad = (PAPER_SSIM_WINDOW - 1) // 2
    return float(ssim_map[pad:-pad, pad:-pad].mean())


def hd_rows_paper_code(target: np.ndarray, pred: np.ndarray) -> float:
    """Symmetric Hausdorff distance between two (H, W) label maps read as H points in W dimensions (EndoARSS code)."""
    a, b = target.astype(np.float64), pred.astype(np.float64)
    return max(directed_hausdorff(a, b)[0], directed_hausdorff(b, a)[0])


class SegmentationMeter:
    """Confusion-matrix, boundary-distance and SSIM metrics for semantic segmentation, accumulated over batches.

    See the module docstring for the definitions and for the paper-code variants. Keys of `compute()`: `miou`,
    `miou_no_bg`, `dice`, `dice_no_bg`, `pixel_accuracy`, `hd95`, `hd95_no_bg`, `hd_mean`, `hd_mean_no_bg`,
    `surface_dice`, `ssim`, `hd_rows_paper_code`, `ssim_label_map_paper_code`, `per_class`, `confusion_matrix`,
    `num_images`, `boundary_tolerance`. Values of switched-off groups (`boundary=False`, `ssim=False`) are None.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int | None = 255,
        boundary_tolerance: float = 2.0,
        *,
        boundary: bool = True,
        ssim: bool = True,
        class_names: Sequence[str] | None = None,
        background_index: int | None = 0,
    ) -> None:
        """
        Args:
            num_classes: number of segmentation classes, background included.
            ignore_index: target value of unlabeled pixels, excluded everywhere (None: every pixel is labeled).
            boundary_tolerance: distance (px) within which boundary pixels count as matched for surface Dice.
            boundary: compute HD95, mean surface distance, surface Dice and the paper-code row Hausdorff
                (per image and class; the slow part together with SSIM).
            ssim: compute SSIM and the paper-code label-map SSIM (images must be larger than 11x11 px).
            class_names: keys for `per_class` (default: the class index as a string).
            background_index: class left out of the `*_no_bg` means (None: no background class).
        """
        self.num_classes = num_classes
        self.class_names = _class_names(num_classes, class_names)
        if ignore_index is not None and 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index={ignore_index} is a valid class index; use a value >= num_classes")
        if boundary_tolerance < 0:
            raise ValueError(f"boundary_tolerance must be >= 0 px, got {boundary_tolerance}")
        if background_index is not None and not 0 <= background_index < num_classes:
            raise ValueError(f"background_index={background_index} outside [0, {num_classes - 1}]; or pass None")
        self.ignore_index = ignore_index
        self.boundary_tolerance = float(boundary_tolerance)
        self.boundary = boundary
        self.ssim = ssim
        self.background_index = background_index
        self.reset()

    def reset(self) -> None:
        c = self.num_classes
        self.confusion = np.zeros((c, c), dtype=np.int64)
        self.num_images = 0
        # Per-class sums over the images where the class was scored, and how many there were.
        self._hd95_sum, self._hd_mean_sum, self._nsd_sum = np.zeros(c), np.zeros(c), np.zeros(c)
        self._boundary_count = np.zeros(c, dtype=np.int64)
        self._ssim_sum, self._ssim_count = np.zeros(c), np.zeros(c, dtype=np.int64)
        self._hd_rows_sum, self._hd_rows_count = 0.0, 0
        self._ssim_lm_sum, self._ssim_lm_count = 0.0, 0

    def update(self, pred: np.ndarray, target: np.ndarray, probs: np.ndarray | None = None) -> None:
        """Add a batch of label maps.

        Args:
            pred: (B, H, W) predicted class indices ((H, W) is read as one image).
            target: (B, H, W) true class indices, `ignore_index` for unlabeled pixels.
            probs: (B, C, H, W) class probabilities for SSIM; None uses the one-hot prediction.
        """
        pred, target = np.asarray(pred), np.asarray(target)
        if pred.ndim == 2:
            pred, target = pred[None], target[None]
            probs = None if probs is None else np.asarray(probs)[None]
        if pred.ndim != 3 or pred.shape != target.shape:
            raise ValueError(f"expected pred and target of shape (B, H, W), got {pred.shape} and {target.shape}")
        if probs is not None:
            probs = np.asarray(probs)
            expected = (pred.shape[0], self.num_classes, *pred.shape[1:])
            if probs.shape != expected:
                raise ValueError(f"probs shape {probs.shape} != {expected} (B, num_classes, H, W)")
        valid = np.ones(target.shape, dtype=bool) if self.ignore_index is None else target != self.ignore_index
        _check_labels(pred, self.num_classes, "pred")
        _check_labels(target[valid], self.num_classes, "target (outside ignore_index)")
        self.confusion += _confusion(target[valid], pred[valid], self.num_classes)
        for i in range(pred.shape[0]):
            self.num_images += 1
            if not (self.boundary or self.ssim):
                continue
            # Paper-code variants see the raw label maps; unlabeled pixels take the prediction so they never count.
            target_map = np.where(valid[i], target[i], pred[i])
            if self.boundary:
                self._update_boundary(pred[i], target[i], valid[i])
                self._hd_rows_sum += hd_rows_paper_code(target_map, pred[i])
                self._hd_rows_count += 1
            if self.ssim:
                self._update_ssim(pred[i], target[i], valid[i], None if probs is None else probs[i])
                value = ssim_label_map_paper_code(target_map, pred[i])
                if not math.isnan(value):
                    self._ssim_lm_sum += value
                    self._ssim_lm_count += 1

    def _update_boundary(self, pred: np.ndarray, target: np.ndarray, valid: np.ndarray) -> None:
        diagonal = math.hypot(*pred.shape)
        for c in range(self.num_classes):
            p, t = (pred == c) & valid, (target == c) & valid
            in_pred, in_target = bool(p.any()), bool(t.any())
            if not (in_pred or in_target):
                continue
            self._boundary_count[c] += 1
            if in_pred != in_target:
                self._hd95_sum[c] += diagonal
                self._hd_mean_sum[c] += diagonal
                continue  # surface Dice 0
            to_target, to_pred = boundary_distances(p, t)
            pooled = np.concatenate([to_target, to_pred])
            self._hd95_sum[c] += np.percentile(pooled, 95)
            self._hd_mean_sum[c] += pooled.mean()
            self._nsd_sum[c] += np.count_nonzero(pooled <= self.boundary_tolerance) / pooled.size

    def _update_ssim(self, pred: np.ndarray, target: np.ndarray, valid: np.ndarray, probs: np.ndarray | None) -> None:
        classes = np.arange(self.num_classes)[:, None, None]
        # Unlabeled pixels are zero in both maps, so they agree and carry no structure.
        one_hot_target = (target == classes) & valid
        one_hot_pred = (pred == classes) & valid
        # Only classes in the target or the predicted label map are scored (module docstring): probability maps are
        # never exactly zero, so presence is read from the label maps.
        scored = np.flatnonzero(one_hot_target.any(axis=(1, 2)) | one_hot_pred.any(axis=(1, 2)))
        if scored.size == 0:
            return
        y = one_hot_pred if probs is None else np.where(valid, probs, 0.0)
        self._ssim_sum[scored] += ssim_per_channel(one_hot_target[scored], y[scored])
        self._ssim_count[scored] += 1

    def compute(self) -> dict[str, Any]:
        """Metrics over everything seen since construction or `reset()` (fractions in [0, 1], distances in px)."""
        cm = self.confusion
        if self.num_images == 0:
            raise RuntimeError("SegmentationMeter.compute() before any update(); feed at least one batch")
        total = cm.sum()
        tp = np.diag(cm).astype(np.float64)
        predicted, support = cm.sum(0), cm.sum(1)
        union = predicted + support - tp
        present = union > 0
        foreground = np.ones(self.num_classes, dtype=bool)
        if self.background_index is not None:
            foreground[self.background_index] = False
        nan = np.full(self.num_classes, np.nan)
        iou = np.where(present, _ratio(tp, union), np.nan)
        dice = np.where(present, _ratio(2 * tp, predicted + support), np.nan)
        precision = np.where(present, _ratio(tp, predicted), np.nan)
        recall = np.where(present, _ratio(tp, support), np.nan)

        scored = self._boundary_count > 0
        count = np.maximum(self._boundary_count, 1)
        hd95 = np.where(scored, self._hd95_sum / count, np.nan) if self.boundary else nan
        hd_mean = np.where(scored, self._hd_mean_sum / count, np.nan) if self.boundary else nan
        nsd = np.where(scored, self._nsd_sum / count, np.nan) if self.boundary else nan
        ssim_scored = self._ssim_count > 0
        ssim = np.where(ssim_scored, self._ssim_sum / np.maximum(self._ssim_count, 1), np.nan) if self.ssim else nan

        skipped = self.num_images - self._ssim_lm_count
        if self.ssim and skipped:
            logger.debug("ssim_label_map_paper_code skipped %d image(s) predicted as a single class", skipped)
        every = np.ones(self.num_classes, dtype=bool)
        return {
            "miou": _masked_mean(iou, every),
            "miou_no_bg": _masked_mean(iou, foreground),
            "dice": _masked_mean(dice, every),
            "dice_no_bg": _masked_mean(dice, foreground),
            "pixel_accuracy": float(tp.sum() / total) if total else None,
            "hd95": _masked_mean(hd95, every),
            "hd95_no_bg": _masked_mean(hd95, foreground),
            "hd_mean": _masked_mean(hd_mean, every),
            "hd_mean_no_bg": _masked_mean(hd_mean, foreground),
            "surface_dice": _masked_mean(nsd, every),
            "ssim": _masked_mean(ssim, every),
            "hd_rows_paper_code": self._hd_rows_sum / self._hd_rows_count if self._hd_rows_count else None,
            "ssim_label_map_paper_code": self._ssim_lm_sum / self._ssim_lm_count if self._ssim_lm_count else None,
            "per_class": {
                name: {
                    "iou": _num(iou[i]),
                    "dice": _num(dice[i]),
                    "precision": _num(precision[i]),
                    "recall": _num(recall[i]),
                    "hd95": _num(hd95[i]),
                    "hd_mean": _num(hd_mean[i]),
                    "surface_dice": _num(nsd[i]),
                    "ssim": _num(ssim[i]),
                    "pixels": int(support[i]),
                }
                for i, name in enumerate(self.class_names)
            },
            "confusion_matrix": cm.tolist(),
            "num_images": self.num_images,
            "boundary_tolerance": self.boundary_tolerance,
        }
