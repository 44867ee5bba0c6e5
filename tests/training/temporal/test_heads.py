"""Temporal heads: causality, step == whole-sequence run from a zero state, fitted baselines, save/load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from training.temporal.heads import CausalTCN, EMAFilter, HMMFilter, TemporalHead, load_head, save_head

K, D, T = 4, 12, 40


def _hmm() -> HMMFilter:
    hmm = HMMFilter(K, beta=0.5)
    hmm.fit_transitions([np.array([0] * 10 + [1] * 8 + [2] * 12 + [3] * 5), np.array([2] * 9 + [0] * 9)])
    return hmm


def _heads() -> list[TemporalHead]:
    torch.manual_seed(0)
    tcn = CausalTCN(D, K, channels=8, layers=3)
    tcn.fit_normalisation(np.random.default_rng(0).random((50, D)) * 3)
    filtered = CausalTCN(D, K, channels=8, layers=3, filter_beta=2.0)
    filtered.load_state_dict(tcn.state_dict(), strict=False)
    filtered.output_filter.load_state_dict(_hmm().state_dict())
    return [tcn.eval(), filtered.eval(), EMAFilter(K, alpha=0.7), _hmm()]


def _inputs(head: TemporalHead, seed: int = 0) -> torch.Tensor:
    x = torch.rand(2, T, head.input_dim, generator=torch.Generator().manual_seed(seed))
    return x.softmax(-1) if head.input_kind == "probs" else x


@pytest.mark.parametrize("head", _heads(), ids=["tcn", "tcn_hmm", "ema", "hmm"])
def test_causal(head: TemporalHead) -> None:
    x = _inputs(head)
    changed = x.clone()
    changed[:, 25:] = _inputs(head, seed=1)[:, 25:]
    with torch.no_grad():
        a, b = head(x), head(changed)
    assert torch.equal(a[:, :25], b[:, :25])
    assert not torch.allclose(a[:, 25:], b[:, 25:])
    assert torch.allclose(a.sum(-1), torch.ones(2, T), atol=1e-5)


@pytest.mark.parametrize("head", _heads(), ids=["tcn", "tcn_hmm", "ema", "hmm"])
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
    assert tcn.receptive_field_frames == 1 + 2 * (1 + 2 + 4)
    assert tcn.state_shape == (14, D)
    x = torch.rand(1, T, D)
    changed = x.clone()
    changed[:, 0] += 5.0
    with torch.no_grad():
        a, b = tcn(x), tcn(changed)
    # step 0 reaches outputs 0..14, not 15 and later
    assert not torch.allclose(a[:, 14], b[:, 14])
    assert torch.equal(a[:, 15:], b[:, 15:])


def test_output_filter_state_row() -> None:
    tcn = CausalTCN(D, K, channels=8, layers=3, filter_beta=2.0)
    assert tcn.state_shape == (15, D)  # 14 ring-buffer rows + the belief row
    assert tcn.config()["filter_beta"] == 2.0
    with pytest.raises(ValueError, match="must fit a state row"):
        CausalTCN(3, K, filter_beta=1.0)


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


@pytest.mark.parametrize("head", _heads(), ids=["tcn", "tcn_hmm", "ema", "hmm"])
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
