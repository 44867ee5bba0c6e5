"""Segmental metrics on hand-made sequences with values worked out by hand (MS-TCN definitions)."""

from __future__ import annotations

import numpy as np
import pytest

from training.temporal.metrics import (
    edit_score,
    levenshtein,
    macro_f1,
    overlap_counts,
    segments,
    sequence_metrics,
    switches,
)


def test_segments_and_switches() -> None:
    assert segments([0, 0, 1, 1, 1, 0]) == [(0, 0, 2), (1, 2, 5), (0, 5, 6)]
    assert segments([]) == []
    assert switches([0, 0, 1, 1, 1, 0]) == 2
    assert switches([3, 3, 3]) == 0


def test_levenshtein() -> None:
    assert levenshtein([0, 1, 2], [0, 1, 2]) == 0
    assert levenshtein([0, 1, 2], [0, 2]) == 1
    assert levenshtein([0, 1, 0, 1], [1, 0]) == 2
    assert levenshtein([], [1, 2]) == 2


def test_edit_score() -> None:
    truth = [0] * 5 + [1] * 5 + [2] * 5  # segments A B C
    assert edit_score(truth, truth) == 100.0
    # A B A B C (a flicker inserts two segments): distance 2, longest 5 -> 60
    flicker = [0] * 5 + [1, 1, 0, 1, 1] + [2] * 5
    assert edit_score(flicker, truth) == pytest.approx(60.0)
    # timing does not matter, only the order of segment labels
    assert edit_score([0] + [1] * 13 + [2], truth) == 100.0


def test_overlap_counts_at_thresholds() -> None:
    truth = [0] * 10 + [1] * 10
    pred = [0] * 14 + [1] * 6  # IoU(0) = 10/14, IoU(1) = 6/10
    assert overlap_counts(pred, truth, 0.5) == (2, 0, 0)
    assert overlap_counts(pred, truth, 0.65) == (1, 1, 1)  # segment 1 (0.6) fails, its truth is missed
    # a spurious short segment of a label already matched is a false positive
    pred2 = [0] * 10 + [1] * 4 + [0] + [1] * 5
    tp, fp, fn = overlap_counts(pred2, truth, 0.1)
    assert (tp, fp, fn) == (2, 2, 0)


def test_macro_f1() -> None:
    truth = np.array([0, 0, 1, 1])
    pred = np.array([0, 1, 1, 1])
    # class 0: P 1, R 0.5 -> 2/3; class 1: P 2/3, R 1 -> 0.8
    assert macro_f1(pred, truth) == pytest.approx(100 * (2 / 3 + 0.8) / 2)


def test_sequence_metrics_switches_per_minute() -> None:
    truth = np.array([0] * 150 + [1] * 150)  # 300 steps at 0.2 s = 1 min, one true switch
    flicker = truth.copy()
    flicker[[20, 40, 200]] = [1, 1, 0]  # three single-step flickers: 6 extra switches
    m = sequence_metrics([flicker], [truth], 0.2)
    assert m["gt_switches_per_min"] == pytest.approx(1.0)
    assert m["switches_per_min"] == pytest.approx(7.0)
    assert m["spurious_switches_per_min"] == pytest.approx(6.0)
    assert m["frame_accuracy"] == pytest.approx(100 * 297 / 300)
    perfect = sequence_metrics([truth], [truth], 0.2)
    assert perfect["spurious_switches_per_min"] == 0.0
    assert perfect["edit"] == perfect["f1@50"] == 100.0
    with pytest.raises(ValueError, match="prediction of"):
        sequence_metrics([truth[:-1]], [truth], 0.2)
