"""Causal temporal heads over per-frame inputs, all with one interface: a whole sequence, or one step with a state.

Every head maps a sequence of per-frame inputs (N T D) to per-frame class probabilities (N T K) causally: the output
at step t depends on steps <= t only. `step(x, state)` computes one step from a fixed-size state (N *state_shape);
an all-zeros state is a fresh stream, and running `step` from zeros over a sequence equals `forward` on it. This
is what `temporal_head.onnx` exports (shared contract: inputs `features`, `state`; outputs `probs`, `state_out`).

- `CausalTCN` (learned; input: the activity head's pre-logit features; training/temporal/tcn.py): TeCNO's two-stage
  causal dilated TCN, three members averaged, with an optional hysteresis on the served label.
- `EMAFilter` (training-free; input: per-frame probabilities): p_t = a p_{t-1} + (1 - a) x_t, p_0 = x_0.
  State: the last output (K); zeros = fresh (a probability vector never sums to 0).
- `HMMFilter` (training-free; input: per-frame probabilities): the HMM forward filter
  b_t ∝ e_t ⊙ (A^T b_{t-1}), b_0 ∝ e_0 ⊙ pi, with the transition matrix A estimated from the training clips' label
  sequences (counts + 1) and pi their label frequencies. The per-frame classifier was trained on class-balanced
  still frames, so its posterior is proportional to the likelihood p(x | y) and e_t = x_t^beta; beta (< 1 softens an
  overconfident classifier) is chosen on the validation clips. State: the last belief (K); zeros = fresh.

`receptive_field_frames` is exact for the TCN; for the filters (infinite memory) it is the effective memory: the
steps after which an old input's weight falls under 1 % (EMA: a^n < 0.01; HMM: the mean self-transition).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from training.temporal.base import PROBS, TemporalHead
from training.temporal.tcn import CausalTCN

HEAD_CONFIG = "head.json"
HEAD_WEIGHTS = "head.safetensors"
METHODS = ("tcn", "ema", "hmm")


def _fresh(state: Tensor) -> Tensor:
    """N 1 bool: the state is all zeros (a fresh stream)."""
    return state.abs().sum(dim=-1, keepdim=True) == 0


class EMAFilter(TemporalHead):
    """Causal exponential moving average of per-frame probabilities."""

    method = "ema"
    input_kind = PROBS

    def __init__(self, num_classes: int, alpha: float = 0.8) -> None:
        """
        Args:
            num_classes: classes K (the input width too).
            alpha: weight of the previous average, in [0, 1).
        """
        super().__init__(num_classes, num_classes)
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"EMA alpha must be in [0, 1), got {alpha}")
        self.alpha = float(alpha)

    @property
    def state_shape(self) -> tuple[int, ...]:
        return (self.num_classes,)

    @property
    def receptive_field_frames(self) -> int:
        return 1 if self.alpha == 0 else max(1, math.ceil(math.log(0.01) / math.log(self.alpha)))

    def step(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        out = torch.where(_fresh(state), x, self.alpha * state + (1.0 - self.alpha) * x)
        return out, out

    def config(self) -> dict[str, Any]:
        return {"method": self.method, "num_classes": self.num_classes, "alpha": self.alpha}


class HMMFilter(TemporalHead):
    """HMM forward filter over per-frame probabilities, transitions from training label sequences."""

    method = "hmm"
    input_kind = PROBS
    transitions: Tensor
    initial: Tensor

    def __init__(self, num_classes: int, beta: float = 1.0) -> None:
        """
        Args:
            num_classes: classes K (the input width too).
            beta: emission exponent (e_t = x_t^beta); set the transitions with `fit_transitions`.
        """
        super().__init__(num_classes, num_classes)
        if beta <= 0:
            raise ValueError(f"HMM beta must be positive, got {beta}")
        self.beta = float(beta)
        self.register_buffer("transitions", torch.full((num_classes, num_classes), 1.0 / num_classes))
        self.register_buffer("initial", torch.full((num_classes,), 1.0 / num_classes))

    def fit_transitions(self, sequences: list[np.ndarray]) -> None:
        """Estimate A (row i: next-label distribution after label i, counts + 1) and pi from label sequences."""
        k = self.num_classes
        counts = np.ones((k, k))
        freq = np.ones(k)
        for seq in sequences:
            np.add.at(counts, (seq[:-1], seq[1:]), 1)
            freq += np.bincount(seq, minlength=k)
        self.transitions.copy_(torch.as_tensor(counts / counts.sum(axis=1, keepdims=True), dtype=torch.float32))
        self.initial.copy_(torch.as_tensor(freq / freq.sum(), dtype=torch.float32))

    @property
    def state_shape(self) -> tuple[int, ...]:
        return (self.num_classes,)

    @property
    def receptive_field_frames(self) -> int:
        stay = float(torch.diagonal(self.transitions).mean())
        return max(1, math.ceil(math.log(0.01) / math.log(stay))) if 0 < stay < 1 else 1

    def step(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        predicted = torch.where(_fresh(state), self.initial.expand_as(state), state @ self.transitions)  # N K
        belief = predicted * x.clamp_min(1e-8) ** self.beta
        belief = belief / belief.sum(dim=-1, keepdim=True)
        return belief, belief

    def config(self) -> dict[str, Any]:
        return {"method": self.method, "num_classes": self.num_classes, "beta": self.beta}


def build_head(config: dict[str, Any]) -> TemporalHead:
    """A head from its `config()` (weights and fitted buffers come from `load_head`)."""
    body = dict(config)
    method = body.pop("method", None)
    if method == "tcn":
        if "filter_beta" in body:  # heads trained before the two-stage TCN carried an HMM output filter
            raise ValueError(
                "this TCN head was trained with an HMM output filter (filter_beta), which the TCN no longer has; "
                "retrain it with `endostream train-temporal` (bundles exported from it still serve)"
            )
        return CausalTCN(**body)
    if method == "ema":
        return EMAFilter(**body)
    if method == "hmm":
        return HMMFilter(**body)
    raise ValueError(f"unknown temporal head method {method!r}; expected one of {METHODS}")


def save_head(head: TemporalHead, out: Path, meta: dict[str, Any] | None = None) -> Path:
    """Write `out/head.json` (config, receptive field, state shape, `meta`) and `out/head.safetensors`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(out / HEAD_WEIGHTS))
    body = {
        "config": head.config(),
        "input_kind": head.input_kind,
        "receptive_field_frames": head.receptive_field_frames,
        "state_shape": list(head.state_shape),
        **(meta or {}),
    }
    (out / HEAD_CONFIG).write_text(json.dumps(body, indent=1) + "\n")
    return out


def load_head(path: Path) -> tuple[TemporalHead, dict[str, Any]]:
    """A head saved by `save_head` (eval mode) and its head.json body."""
    path = Path(path)
    if not (path / HEAD_CONFIG).is_file():
        raise FileNotFoundError(
            f"{path} holds no temporal head ({HEAD_CONFIG}); train one with `endostream train-temporal`"
        )
    body = json.loads((path / HEAD_CONFIG).read_text())
    head = build_head(body["config"])
    head.load_state_dict(load_file(str(path / HEAD_WEIGHTS)), strict=True)
    return head.eval(), body
