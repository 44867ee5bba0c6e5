"""The learned temporal head: TeCNO's two-stage causal dilated TCN, a small ensemble of it, and a hysteresis output.

- **Stages** (TeCNO, Czempiel et al., MICCAI 2020, after MS-TCN): stage 1 reads the standardised pre-logit features;
  each later stage reads the previous stage's class probabilities and refines them. A stage is a 1x1 projection,
  `layers` dilated residual layers (causal conv, kernel k, dilation 2^l, ReLU, 1x1 conv, dropout, residual) and a
  1x1 classifier; its receptive field is r = 1 + (k-1)(2^L - 1) steps (31 for 4 layers of kernel 3) and the head's is
  stages * (r - 1) + 1 (61 steps = 30.5 s at 0.5 s for two stages). The refinement stage smooths a single stage's
  step-or-two flips (MS-TCN's finding); on the demo's 160 clips it added ~1.5 points and ~10 % less flicker.
- **Members**: `members` independently initialised copies trained side by side (grouped convolutions, so one graph
  with the op count of one copy); the output is the mean of their probabilities. With ~100 training clips a single
  copy's held-out accuracy moves by 3-5 points with its seed; the mean of three moves less and flips less.
- **Hysteresis** (`hysteresis` = m, optional): the served probabilities are (p + m e) / (1 + m), e the one-hot of the
  previous served label, so the label changes only when another class leads the current one by more than m. Unlike
  an HMM forward filter, whose belief saturates and lags every true switch, it costs nothing when the TCN switches
  with a clear lead; it only holds through the uncertain steps where flicker happens. `train.fit_hysteresis` picks m
  on the validation clips.

Causality by construction: every dilated conv is left-padded with (k-1) d zeros (TeCNO's causal convolution), so the
output at step t reads steps <= t only, and a fresh stream is zeros before its first step. The step therefore keeps,
per stage and per dilated layer, that layer's last (k-1) d inputs (members * channels values each) and computes one
new column per layer; the state, [members * channels, columns] (channels first, as the convolutions read it), is
those ring buffers side by side:

    stage 1, layer 0 .. L-1        (k-1) 2^l columns each, (k-1)(2^L - 1) per stage (30 for 4 layers of kernel 3)
    stage 2, ...                   the same
    one last column (hysteresis)   the previous served label, one-hot (K values, zero-padded)

so an all-zeros state is exactly the training padding, and stepping from zeros equals `forward` (tested; ONNX parity
is checked at export). One step costs one column per layer, not a window of the receptive field.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.temporal.base import FEATURES, TemporalHead


class _DilatedResidual(nn.Module):
    """Causal dilated conv (left zero padding) -> ReLU -> 1x1 -> dropout, plus the input: N C T -> N C T."""

    def __init__(self, channels: int, kernel_size: int, dilation: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.history = (kernel_size - 1) * dilation  # past columns the conv reads: the step's ring buffer
        self.conv = nn.Conv1d(channels, channels, kernel_size, dilation=dilation, groups=groups)
        self.mix = nn.Conv1d(channels, channels, 1, groups=groups)
        self.drop = nn.Dropout(dropout)

    def _residual(self, window: Tensor) -> Tensor:
        """N C H+T' window -> N C T' residual branch (valid conv)."""
        return self.drop(self.mix(F.relu(self.conv(window))))

    def forward(self, x: Tensor) -> Tensor:
        return x + self._residual(F.pad(x, (self.history, 0)))

    def step(self, x: Tensor, ring: Tensor) -> tuple[Tensor, Tensor]:
        """x N C 1 (this step's input), ring N C H (the last H inputs) -> output N C 1, next ring."""
        window = torch.cat([ring, x], dim=2)
        return x + self._residual(window), window[:, :, 1:]


class _Stage(nn.Module):
    """One TCN stage for every member at once: N Cin T -> N members*K T logits.

    `shared_input`: every member reads the same Cin channels (stage 1's features); otherwise Cin is members * width,
    member i reading its own slice (its previous stage's probabilities).
    """

    def __init__(
        self,
        width: int,
        num_classes: int,
        channels: int,
        layers: int,
        kernel_size: int,
        dropout: float,
        members: int,
        shared_input: bool,
    ) -> None:
        super().__init__()
        inputs, groups = (width, 1) if shared_input else (members * width, members)
        self.proj = nn.Conv1d(inputs, members * channels, 1, groups=groups)
        self.blocks = nn.ModuleList(
            _DilatedResidual(members * channels, kernel_size, 2**i, dropout, members) for i in range(layers)
        )
        self.classifier = nn.Conv1d(members * channels, members * num_classes, 1, groups=members)

    @property
    def history(self) -> int:
        """State columns of this stage: every layer's ring buffer."""
        return sum(block.history for block in self.blocks)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)
        for block in self.blocks:
            x = block(x)
        return self.classifier(x)

    def step(self, x: Tensor, rings: Tensor) -> tuple[Tensor, Tensor]:
        """x N Cin 1, rings N C history (this stage's state columns) -> logits N members*K 1, next rings."""
        x = self.proj(x)
        start, out = 0, []
        for block in self.blocks:
            x, ring = block.step(x, rings[:, :, start : start + block.history])
            out.append(ring)
            start += block.history
        return self.classifier(x), torch.cat(out, dim=2)


class CausalTCN(TemporalHead):
    """TeCNO-style multi-stage causal dilated TCN over pre-logit features (see the module docstring)."""

    method = "tcn"
    input_kind = FEATURES
    feature_mean: Tensor
    feature_std: Tensor

    def __init__(
        self,
        input_dim: int,
        num_classes: int,
        channels: int = 32,
        layers: int = 4,
        kernel_size: int = 3,
        stages: int = 2,
        members: int = 3,
        dropout: float = 0.3,
        input_dropout: float = 0.2,
        hysteresis: float | None = None,
    ) -> None:
        """
        Args:
            input_dim: width D of the per-frame features.
            num_classes: classes K.
            channels: width of every member's temporal layers.
            layers: dilated residual layers per stage (dilations 1, 2, 4, ...).
            kernel_size: temporal kernel of every dilated conv.
            stages: 1 (features -> probabilities) plus refinement stages (probabilities -> probabilities).
            members: independently initialised copies whose probabilities are averaged.
            dropout: dropout inside each residual layer.
            input_dropout: dropout on the input features (whole feature channels), a regulariser for few clips.
            hysteresis: margin m of the served label (None: plain argmax of the mean probabilities).
        """
        super().__init__(input_dim, num_classes)
        if layers < 1 or kernel_size < 2 or channels < 1 or stages < 1 or members < 1:
            raise ValueError(
                "CausalTCN needs layers >= 1, kernel_size >= 2, channels >= 1, stages >= 1, members >= 1; got "
                f"layers={layers}, kernel_size={kernel_size}, channels={channels}, stages={stages}, members={members}"
            )
        if hysteresis is not None and members * channels < num_classes:
            raise ValueError(
                f"the hysteresis column must fit a state column: members x channels = {members} x {channels} < "
                f"{num_classes} classes"
            )
        if hysteresis is not None and not 0.0 <= hysteresis < 1.0:
            raise ValueError(f"hysteresis must be in [0, 1) (a probability margin), got {hysteresis}")
        self.channels, self.layers, self.kernel_size = channels, layers, kernel_size
        self.stages, self.members = stages, members
        self.dropout, self.input_dropout = dropout, input_dropout
        self.hysteresis = None if hysteresis is None else float(hysteresis)
        # Feature standardisation (fitted on the training clips by `fit_normalisation`); inside the head so the
        # exported step includes it.
        self.register_buffer("feature_mean", torch.zeros(input_dim))
        self.register_buffer("feature_std", torch.ones(input_dim))
        self.in_drop = nn.Dropout1d(input_dropout)
        self.stage_nets = nn.ModuleList(
            _Stage(
                input_dim if s == 0 else num_classes,
                num_classes,
                channels,
                layers,
                kernel_size,
                dropout,
                members,
                shared_input=s == 0,
            )
            for s in range(stages)
        )

    @property
    def stage_field(self) -> int:
        """Receptive field of one stage, in steps."""
        return 1 + (self.kernel_size - 1) * (2**self.layers - 1)

    @property
    def receptive_field_frames(self) -> int:
        """Steps of input the stages see together (the hysteresis column only remembers the last label)."""
        return self.stages * (self.stage_field - 1) + 1

    @property
    def state_shape(self) -> tuple[int, ...]:
        columns = self.stages * (self.stage_field - 1) + (self.hysteresis is not None)
        return (self.members * self.channels, columns)

    def fit_normalisation(self, features: np.ndarray) -> None:
        """Set the input standardisation from training features (M D)."""
        self.feature_mean.copy_(torch.as_tensor(features.mean(axis=0), dtype=torch.float32))
        self.feature_std.copy_(torch.as_tensor(features.std(axis=0), dtype=torch.float32).clamp_min(1e-4))

    def _member_probs(self, logits: Tensor) -> Tensor:
        """N members*K T logits -> N members*K T probabilities, a softmax per member."""
        n, _, t = logits.shape
        return logits.view(n, self.members, self.num_classes, t).softmax(dim=2).view(n, -1, t)

    def _normalised(self, x: Tensor) -> Tensor:
        """N T D raw features -> N D T standardised (and channel-dropped in training)."""
        return self.in_drop(((x - self.feature_mean) / self.feature_std).transpose(1, 2))

    def stage_logits(self, x: Tensor) -> list[Tensor]:
        """N T D -> each stage's logits, N T members K, causally from a fresh state (what training supervises)."""
        logits = [self.stage_nets[0](self._normalised(x))]
        for net in self.stage_nets[1:]:
            logits.append(net(self._member_probs(logits[-1])))
        n, t = x.shape[:2]
        return [lg.view(n, self.members, self.num_classes, t).permute(0, 3, 1, 2) for lg in logits]

    def mean_probs(self, x: Tensor) -> Tensor:
        """N T D -> N T K: the members' mean probabilities of the last stage, before the hysteresis."""
        return self.stage_logits(x)[-1].softmax(dim=-1).mean(dim=2)

    def _hold(self, probs: Tensor, previous: Tensor) -> tuple[Tensor, Tensor]:
        """Hysteresis: (p + m e) / (1 + m |e|), e the last label's one-hot (zeros when fresh) -> out, its one-hot."""
        assert self.hysteresis is not None
        out = (probs + self.hysteresis * previous) / (1.0 + self.hysteresis * previous.sum(dim=-1, keepdim=True))
        return out, (out == out.amax(dim=-1, keepdim=True)).to(out.dtype)

    def forward(self, x: Tensor) -> Tensor:
        probs = self.mean_probs(x)  # N T K
        if self.hysteresis is None:
            return probs
        previous = torch.zeros_like(probs[:, 0])
        out = []
        for t in range(probs.shape[1]):
            held, previous = self._hold(probs[:, t], previous)
            out.append(held)
        return torch.stack(out, dim=1)

    def step(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        cols = self.stage_field - 1
        logits, rings = self.stage_nets[0].step(self._normalised(x.unsqueeze(1)), state[:, :, :cols])
        parts = [rings]
        for s, net in enumerate(self.stage_nets[1:], start=1):
            logits, rings = net.step(self._member_probs(logits), state[:, :, s * cols : (s + 1) * cols])
            parts.append(rings)
        probs = logits.view(x.shape[0], self.members, self.num_classes).softmax(dim=-1).mean(dim=1)  # N K
        if self.hysteresis is not None:
            previous = state[:, : self.num_classes, self.stages * cols]
            probs, label = self._hold(probs, previous)
            parts.append(F.pad(label, (0, state.shape[1] - self.num_classes)).unsqueeze(2))
        return probs, torch.cat(parts, dim=2)

    def config(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "input_dim": self.input_dim,
            "num_classes": self.num_classes,
            "channels": self.channels,
            "layers": self.layers,
            "kernel_size": self.kernel_size,
            "stages": self.stages,
            "members": self.members,
            "dropout": self.dropout,
            "input_dropout": self.input_dropout,
            "hysteresis": self.hysteresis,
        }
