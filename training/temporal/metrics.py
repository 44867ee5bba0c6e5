"""Frame and segment metrics of per-frame label sequences, as used by MS-TCN (Farha & Gall, CVPR 2019) and TeCNO.

- Frame accuracy and macro-F1 (per-class F1 over all frames of all clips, averaged over the classes present in the
  ground truth or the prediction).
- Segmental edit score (per clip, then averaged): 100 * (1 - Levenshtein(predicted segment labels, true segment
  labels) / max(number of predicted segments, number of true segments)), MS-TCN's `edit_score`.
- Segmental F1@k (k = 10, 25, 50 % IoU): each predicted segment is a true positive when its IoU with the
  best-overlapping unmatched true segment of the same label is >= k; otherwise a false positive; unmatched true
  segments are false negatives. TP/FP/FN are summed over clips, then F1 = 2PR/(P+R) in %, MS-TCN's `f_score`
  (no class is excluded: "idle" is an activity here, not background).
- Label switches per minute: changes of label between consecutive steps. `switches_per_min` counts the predicted
  sequence's, `gt_switches_per_min` the ground truth's, and `spurious_switches_per_min` =
  sum over clips of max(0, predicted switches - true switches) / total minutes: the switches beyond those the
  activity itself makes (a perfect or merely lagging prediction scores 0; every flicker adds two).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

OVERLAPS = (0.10, 0.25, 0.50)


def segments(labels: Sequence[int] | np.ndarray) -> list[tuple[int, int, int]]:
    """Runs of equal labels as (label, start, end), end exclusive."""
    labels = np.asarray(labels)
    if labels.size == 0:
        return []
    bounds = np.flatnonzero(np.diff(labels)) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [labels.size]])
    return [(int(labels[s]), int(s), int(e)) for s, e in zip(starts, ends, strict=True)]


def levenshtein(a: Sequence[int], b: Sequence[int]) -> int:
    """Edit distance (insertions, deletions, substitutions, each cost 1)."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        previous, row[0] = row[0], i
        for j, y in enumerate(b, start=1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (x != y))
    return row[-1]


def edit_score(pred: Sequence[int] | np.ndarray, truth: Sequence[int] | np.ndarray) -> float:
    """Segmental edit score of one clip, in % (100 = the same sequence of segment labels)."""
    p = [s[0] for s in segments(pred)]
    t = [s[0] for s in segments(truth)]
    longest = max(len(p), len(t))
    return 100.0 if longest == 0 else 100.0 * (1.0 - levenshtein(p, t) / longest)


def overlap_counts(
    pred: Sequence[int] | np.ndarray, truth: Sequence[int] | np.ndarray, overlap: float
) -> tuple[int, int, int]:
    """(TP, FP, FN) of one clip at IoU threshold `overlap` (MS-TCN's matching)."""
    p, t = segments(pred), segments(truth)
    hits = np.zeros(len(t), dtype=bool)
    tp = fp = 0
    for label, start, end in p:
        best, best_iou = -1, -1.0
        for j, (t_label, t_start, t_end) in enumerate(t):
            if t_label != label:
                continue
            inter = min(end, t_end) - max(start, t_start)
            union = max(end, t_end) - min(start, t_start)
            iou = max(0, inter) / union
            if iou > best_iou:
                best, best_iou = j, iou
        if best >= 0 and best_iou >= overlap and not hits[best]:
            tp += 1
            hits[best] = True
        else:
            fp += 1
    return tp, fp, int(len(t) - hits.sum())


def switches(labels: Sequence[int] | np.ndarray) -> int:
    """Label changes between consecutive steps."""
    labels = np.asarray(labels)
    return int((labels[1:] != labels[:-1]).sum())


def macro_f1(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean per-class F1 (in %) over the classes that occur in `truth` or `pred`."""
    scores = []
    for c in np.union1d(np.unique(truth), np.unique(pred)):
        tp = float(((pred == c) & (truth == c)).sum())
        denom = float((pred == c).sum() + (truth == c).sum())
        scores.append(2 * tp / denom if denom else 0.0)
    return 100.0 * float(np.mean(scores)) if scores else 0.0


def sequence_metrics(
    preds: Sequence[np.ndarray], truths: Sequence[np.ndarray], frame_interval_s: float
) -> dict[str, float]:
    """All metrics over clips (one predicted and one true label sequence per clip, at `frame_interval_s`)."""
    if len(preds) != len(truths) or not preds:
        raise ValueError(f"need one prediction per clip: {len(preds)} predictions, {len(truths)} clips")
    for p, t in zip(preds, truths, strict=True):
        if len(p) != len(t):
            raise ValueError(f"a prediction of {len(p)} steps for a clip of {len(t)}")
    flat_p, flat_t = np.concatenate(preds), np.concatenate(truths)
    minutes = flat_t.size * frame_interval_s / 60.0
    out = {
        "frame_accuracy": 100.0 * float((flat_p == flat_t).mean()),
        "macro_f1": macro_f1(flat_p, flat_t),
        "edit": float(np.mean([edit_score(p, t) for p, t in zip(preds, truths, strict=True)])),
    }
    for k in OVERLAPS:
        tp = fp = fn = 0
        for p, t in zip(preds, truths, strict=True):
            a, b, c = overlap_counts(p, t, k)
            tp, fp, fn = tp + a, fp + b, fn + c
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[f"f1@{int(round(k * 100))}"] = 100.0 * f1
    pred_sw = [switches(p) for p in preds]
    true_sw = [switches(t) for t in truths]
    out["switches_per_min"] = sum(pred_sw) / minutes
    out["gt_switches_per_min"] = sum(true_sw) / minutes
    out["spurious_switches_per_min"] = sum(max(0, a - b) for a, b in zip(pred_sw, true_sw, strict=True)) / minutes
    return out
