"""Causal temporal heads over per-frame inputs, all with one interface: a whole sequence, or one step with a state.

Every head maps a sequence of per-frame inputs (N T D) to per-frame class probabilities (N T K) causally: the output
at step t depends on steps <= t only. `step(x, state)` computes one step from a fixed-size state (N *state_shape);
an all-zeros state is a fresh stream, and running `step` from zeros over a sequence equals `forward` on it. This
is what `temporal_head.onnx` exports (shared contract: inputs `features`, `state`; outputs `probs`, `state_out`).

- `CausalTCN` (learned; input: the activity head's pre-logit features). TeCNO's causal dilated TCN (Czempiel et al.,
  MICCAI 2020, one stage): a 1x1 projection, `layers` dilated residual layers (causal conv, kernel 3, dilation 2^l,
  ReLU, 1x1 conv, dropout, residual) and a 1x1 classifier. Receptive field 1 + (k-1)(2^L - 1) steps: 31 for the
  4 layers `train-temporal` uses, 15.5 s at 0.5 s per step (segments last ~10 s: one segment plus its context).
  Training left-pads every sequence with receptive_field - 1 zero
  *input* frames and runs valid convolutions, so "zero history" is defined on the input; the step's state is
  the ring buffer of the last receptive_field - 1 inputs (zeros = that same padding), which makes step == forward
  exact rather than approximately equal (per-layer padding would need a buffer per layer).
  Optional output filter (`filter_beta`): an `HMMFilter` over the TCN's own probabilities (transitions from the
  training labels). The TCN fixes the per-frame model's long systematic errors (it sees the features, not just
  the argmax) but, trained on ~50 clips, still flips for a step or two at times; the HMM's sticky transitions
  remove those flips. `train.fit_output_filter` decides on the validation clips whether to use it (and its beta)
  by segmental F1. With the filter the state gains one row: the belief, zero-padded to the feature width.
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
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

HEAD_CONFIG = "head.json"
HEAD_WEIGHTS = "head.safetensors"
METHODS = ("tcn", "ema", "hmm")
PROBS = "probs"  # input kinds: per-frame probabilities or the pre-logit features
FEATURES = "features"


class TemporalHead(nn.Module, ABC):
    """Base of the temporal heads (see the module docstring for the interface)."""

    method: str
    input_kind: str  # FEATURES | PROBS

    def __init__(self, input_dim: int, num_classes: int) -> None:
        super().__init__()
        self.input_dim = int(input_dim)
        self.num_classes = int(num_classes)

    @property
    @abstractmethod
    def state_shape(self) -> tuple[int, ...]:
        """Per-stream state shape, without the batch dim."""

    @property
    @abstractmethod
    def receptive_field_frames(self) -> int:
        """Steps of context the head can use."""

    def init_state(self, batch: int) -> Tensor:
        """The fresh-stream state: zeros, N *state_shape."""
        return torch.zeros(batch, *self.state_shape)

    @abstractmethod
    def step(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """One step: x (N D), state (N *state_shape) -> probabilities (N K), next state."""

    def forward(self, x: Tensor) -> Tensor:
        """N T D inputs -> N T K probabilities, causally from a fresh state (a loop over `step`)."""
        state = self.init_state(x.shape[0]).to(x)
        out = []
        for t in range(x.shape[1]):
            probs, state = self.step(x[:, t], state)
            out.append(probs)
        return torch.stack(out, dim=1)

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """Constructor arguments (with `method`), enough for `build_head` to rebuild the head."""


class _DilatedResidual(nn.Module):
    """Causal dilated conv (valid: the caller pads) -> ReLU -> 1x1 -> dropout, plus the input: N C T -> N C T-(k-1)d."""

    def __init__(self, channels: int, kernel_size: int, dilation: int, dropout: float) -> None:
        super().__init__()
        self.trim = (kernel_size - 1) * dilation
        self.conv = nn.Conv1d(channels, channels, kernel_size, dilation=dilation)
        self.mix = nn.Conv1d(channels, channels, 1)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        out = self.drop(self.mix(F.relu(self.conv(x))))  # N C T'
        return x[:, :, self.trim :] + out


class CausalTCN(TemporalHead):
    """TeCNO-style single-stage causal dilated TCN over pre-logit features."""

    method = "tcn"
    input_kind = FEATURES
    feature_mean: Tensor
    feature_std: Tensor

    def __init__(
        self,
        input_dim: int,
        num_classes: int,
        channels: int = 64,
        layers: int = 4,
        kernel_size: int = 3,
        dropout: float = 0.3,
        input_dropout: float = 0.2,
        filter_beta: float | None = None,
    ) -> None:
        """
        Args:
            input_dim: width D of the per-frame features.
            num_classes: classes K.
            channels: width of the temporal layers.
            layers: dilated residual layers (dilations 1, 2, 4, ...).
            kernel_size: temporal kernel of every dilated conv.
            dropout: dropout inside each residual layer.
            input_dropout: dropout on the input features (whole feature channels), a regulariser for few clips.
            filter_beta: add an HMM forward filter with this emission exponent on the output (None: no filter);
                its transitions are set with `output_filter.fit_transitions`.
        """
        super().__init__(input_dim, num_classes)
        if layers < 1 or kernel_size < 2 or channels < 1:
            raise ValueError(
                f"CausalTCN needs layers >= 1, kernel_size >= 2, channels >= 1; got {layers}, {kernel_size}"
            )
        self.channels, self.layers, self.kernel_size = channels, layers, kernel_size
        self.dropout, self.input_dropout = dropout, input_dropout
        # Feature standardisation (fitted on the training clips by `fit_normalisation`); inside the head so the
        # exported step includes it.
        self.register_buffer("feature_mean", torch.zeros(input_dim))
        self.register_buffer("feature_std", torch.ones(input_dim))
        self.in_drop = nn.Dropout1d(input_dropout)
        self.proj = nn.Conv1d(input_dim, channels, 1)
        self.blocks = nn.ModuleList(_DilatedResidual(channels, kernel_size, 2**i, dropout) for i in range(layers))
        self.classifier = nn.Conv1d(channels, num_classes, 1)
        if filter_beta is not None and num_classes > input_dim:
            raise ValueError(f"the output filter's belief ({num_classes}) must fit a state row ({input_dim})")
        self.output_filter = HMMFilter(num_classes, filter_beta) if filter_beta is not None else None

    @property
    def receptive_field_frames(self) -> int:
        """Steps of input the convolutions see (the output filter, when present, adds a decaying memory)."""
        return 1 + (self.kernel_size - 1) * (2**self.layers - 1)

    @property
    def state_shape(self) -> tuple[int, ...]:
        rows = self.receptive_field_frames - 1 + (self.output_filter is not None)
        return (rows, self.input_dim)

    def fit_normalisation(self, features: np.ndarray) -> None:
        """Set the input standardisation from training features (M D)."""
        self.feature_mean.copy_(torch.as_tensor(features.mean(axis=0), dtype=torch.float32))
        self.feature_std.copy_(torch.as_tensor(features.std(axis=0), dtype=torch.float32).clamp_min(1e-4))

    def _logits_valid(self, window: Tensor) -> Tensor:
        """N T' D already left-padded inputs -> N T'-(R-1) K logits (valid convolutions)."""
        x = ((window - self.feature_mean) / self.feature_std).transpose(1, 2)  # N D T'
        x = self.proj(self.in_drop(x))  # N C T'
        for block in self.blocks:
            x = block(x)  # N C T'-trim
        return self.classifier(x).transpose(1, 2)  # N T K

    def logits(self, x: Tensor) -> Tensor:
        """N T D -> N T K logits, causally, with R - 1 zero input frames before the first (the fresh state)."""
        return self._logits_valid(F.pad(x, (0, 0, self.receptive_field_frames - 1, 0)))

    def forward(self, x: Tensor) -> Tensor:
        probs = self.logits(x).softmax(dim=-1)  # N T K
        return probs if self.output_filter is None else self.output_filter(probs)

    def step(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        history = self.receptive_field_frames - 1
        window = torch.cat([state[:, :history], x.unsqueeze(1)], dim=1)  # N R D: the ring buffer plus the new input
        probs = self._logits_valid(window)[:, -1].softmax(dim=-1)  # N K
        if self.output_filter is None:
            return probs, window[:, 1:]
        belief, _ = self.output_filter.step(probs, state[:, history, : self.num_classes])
        row = F.pad(belief, (0, self.input_dim - self.num_classes)).unsqueeze(1)  # N 1 D
        return belief, torch.cat([window[:, 1:], row], dim=1)

    def config(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "input_dim": self.input_dim,
            "num_classes": self.num_classes,
            "channels": self.channels,
            "layers": self.layers,
            "kernel_size": self.kernel_size,
            "dropout": self.dropout,
            "input_dropout": self.input_dropout,
            "filter_beta": None if self.output_filter is None else self.output_filter.beta,
        }


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
