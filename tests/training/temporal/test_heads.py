"""Temporal heads: causality, step == whole-sequence run from a zero state, fitted baselines, save/load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from training.temporal.heads import (
    CausalTCN,
    EMAFilter,
    HMMFilter,
    TemporalHead,
    build_head,
    load_head,
    save_head,
)
from training.temporal.train import pick_within_budget

K, D, T = 4, 12, 40


def _hmm() -> HMMFilter:
    hmm = HMMFilter(K, beta=0.5)
    hmm.fit_transitions([np.array([0] * 10 + [1] * 8 + [2] * 12 + [3] * 5), np.array([2] * 9 + [0] * 9)])
    return hmm


IDS = ["tcn", "tcn_hysteresis", "tcn_1stage", "ema", "hmm"]


def _heads() -> list[TemporalHead]:
    torch.manual_seed(0)
    tcn = CausalTCN(D, K, channels=8, layers=3)  # two stages, three members
    tcn.fit_normalisation(np.random.default_rng(0).random((50, D)) * 3)
    held = CausalTCN(D, K, channels=8, layers=3, hysteresis=0.3)
    held.load_state_dict(tcn.state_dict())
    single = CausalTCN(D, K, channels=8, layers=3, stages=1, members=1)
    single.fit_normalisation(np.random.default_rng(0).random((50, D)) * 3)
    return [tcn.eval(), held.eval(), single.eval(), EMAFilter(K, alpha=0.7), _hmm()]


def _inputs(head: TemporalHead, seed: int = 0) -> torch.Tensor:
    x = torch.rand(2, T, head.input_dim, generator=torch.Generator().manual_seed(seed))
    return x.softmax(-1) if head.input_kind == "probs" else x


@pytest.mark.parametrize("head", _heads(), ids=IDS)
def test_causal(head: TemporalHead) -> None:
    x = _inputs(head)
    changed = x.clone()
    changed[:, 25:] = _inputs(head, seed=1)[:, 25:]
    with torch.no_grad():
        a, b = head(x), head(changed)
    assert torch.equal(a[:, :25], b[:, :25])
    assert not torch.allclose(a[:, 25:], b[:, 25:])
    assert torch.allclose(a.sum(-1), torch.ones(2, T), atol=1e-5)


@pytest.mark.parametrize("head", _heads(), ids=IDS)
def test_step_from_zeros_equals_sequence(head: TemporalHead) -> None:
    x = _inputs(head)
    with torch.no_grad():
        whole = head(x)
        state = torch.zeros(2, *head.state_shape)
        for t in range(T):
            probs, state = head.step(x[:, t], state)
            assert torch.allclose(probs, whole[:, t], atol=1e-6), t
    assert state.shape == (2, *head.state_shape)


def test_tcn_receptive_field() -> None:
    tcn = CausalTCN(D, K, channels=8, layers=3).eval()
    stage = 1 + 2 * (1 + 2 + 4)  # 15 steps per stage
    assert tcn.receptive_field_frames == 2 * (stage - 1) + 1 == 29
    # every layer's ring buffer, 2 + 4 + 8 columns per stage, members x channels = 24 values each
    assert tcn.state_shape == (24, 28)
    x = torch.rand(1, T, D)
    changed = x.clone()
    changed[:, 0] += 5.0
    with torch.no_grad():
        a, b = tcn(x), tcn(changed)
    # step 0 reaches outputs 0..28 through both stages, not 29 and later
    assert not torch.equal(a[:, 28], b[:, 28])
    assert torch.equal(a[:, 29:], b[:, 29:])


def test_members_are_independent_models() -> None:
    torch.manual_seed(0)
    tcn = CausalTCN(D, K, channels=8, layers=2, members=3).eval()
    logits = tcn.stage_logits(torch.rand(2, T, D))
    assert [lg.shape for lg in logits] == [(2, T, 3, K)] * 2
    assert not torch.allclose(logits[1][:, :, 0], logits[1][:, :, 1])  # own initialisation each
    # member 0's weights move member 0's logits only (grouped convolutions)
    with torch.no_grad():
        before = tcn.stage_logits(torch.ones(1, T, D))[1]
        tcn.stage_nets[1].classifier.weight[:K] += 1.0
        after = tcn.stage_logits(torch.ones(1, T, D))[1]
    assert not torch.allclose(before[:, :, 0], after[:, :, 0])
    assert torch.equal(before[:, :, 1:], after[:, :, 1:])


def test_hysteresis_holds_the_label_until_another_class_leads_by_the_margin() -> None:
    tcn = CausalTCN(D, 2, channels=4, layers=1, stages=1, members=1, hysteresis=0.3)
    assert tcn.state_shape == (4, 3)  # a 2-column ring buffer + the previous label
    fresh = torch.zeros(1, 2)
    out, label = tcn._hold(torch.tensor([[0.6, 0.4]]), fresh)
    assert torch.allclose(out, torch.tensor([[0.6, 0.4]])) and label.tolist() == [[1.0, 0.0]]  # fresh: no bonus
    out, label = tcn._hold(torch.tensor([[0.4, 0.6]]), label)  # class 1 leads by 0.2 < 0.3: held
    assert torch.allclose(out, torch.tensor([[0.7, 0.6]]) / 1.3) and label.tolist() == [[1.0, 0.0]]
    out, label = tcn._hold(torch.tensor([[0.3, 0.7]]), label)  # leads by 0.4: switches
    assert label.tolist() == [[0.0, 1.0]] and torch.allclose(out.sum(-1), torch.ones(1))


def test_tcn_arguments() -> None:
    assert CausalTCN(D, K, hysteresis=0.2).config()["hysteresis"] == 0.2
    with pytest.raises(ValueError, match="hysteresis column"):
        CausalTCN(D, K, channels=1, members=2, hysteresis=0.2)  # a state column of 2 cannot hold 4 classes
    with pytest.raises(ValueError, match="hysteresis"):
        CausalTCN(D, K, hysteresis=1.5)
    with pytest.raises(ValueError, match="stages=0"):
        CausalTCN(D, K, stages=0)
    old = {"method": "tcn", "input_dim": D, "num_classes": K, "filter_beta": 2.0}
    with pytest.raises(ValueError, match="retrain it with `endostream train-temporal`"):
        build_head(old)


def test_pick_within_budget() -> None:
    scores = {
        "none": {"frame_accuracy": 80.0, "spurious_switches_per_min": 4.0},
        "0.2": {"frame_accuracy": 78.0, "spurious_switches_per_min": 1.2},
        "0.4": {"frame_accuracy": 76.0, "spurious_switches_per_min": 0.5},
    }
    assert pick_within_budget(scores, 1.3) == "0.2"  # the most accurate within the budget
    assert pick_within_budget(scores, 5.0) == "none"
    assert pick_within_budget(scores, 0.1) == "0.4"  # none within: the least flickering


def test_ema_and_hmm_values() -> None:
    ema = EMAFilter(2, alpha=0.5)
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]])
    assert torch.allclose(ema(x)[0], torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.25, 0.75]]))
    assert ema.receptive_field_frames == 7  # 0.5^7 < 0.01 <= 0.5^6
    hmm = HMMFilter(2, beta=1.0)
    hmm.fit_transitions([np.array([0, 0, 0, 1])])  # counts + 1: [[3, 2], [1, 1]]
    assert torch.allclose(hmm.transitions, torch.tensor([[0.6, 0.4], [0.5, 0.5]]))
    assert torch.allclose(hmm.initial, torch.tensor([4 / 6, 2 / 6]))
    out = hmm(torch.tensor([[[0.5, 0.5], [0.2, 0.8]]]))[0]
    assert torch.allclose(out[0], torch.tensor([4 / 6, 2 / 6]))
    predicted = torch.tensor([4 / 6 * 0.6 + 2 / 6 * 0.5, 4 / 6 * 0.4 + 2 / 6 * 0.5])
    want = predicted * torch.tensor([0.2, 0.8])
    assert torch.allclose(out[1], want / want.sum())


@pytest.mark.parametrize("head", _heads(), ids=IDS)
def test_save_load_roundtrip(head: TemporalHead, tmp_path: Path) -> None:
    save_head(head, tmp_path, {"task": "activity"})
    loaded, body = load_head(tmp_path)
    x = _inputs(head)
    with torch.no_grad():
        assert torch.equal(loaded(x), head(x))
    assert body["task"] == "activity" and body["receptive_field_frames"] == head.receptive_field_frames


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="alpha"):
        EMAFilter(3, alpha=1.0)
    with pytest.raises(FileNotFoundError, match="train-temporal"):
        load_head(Path("/nonexistent"))
