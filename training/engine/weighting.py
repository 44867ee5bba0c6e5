"""Multi-task loss weighting: equal weights (EW), DB-MTL and STCH, with LibMTL's semantics.

Each weighting runs the backward pass(es) itself, because DB-MTL needs one gradient per task before it can combine
them. After `backward` every parameter that requires grad and takes part in the losses holds its `.grad` (added to
any gradient already there, like `Tensor.backward`); the caller then clips and steps the optimiser.

- EW: one backward of sum_t L_t.
- weighted: TA-LoRA's objective (Wang et al., shared/papers/ta-lora-sam.md eq. 6), one backward of
  sum_t w_t L_t / sum_t w_t; the orthogonal regulariser is added by the trainer, outside the weighting.
- DB-MTL: Lin et al., "Dual-Balancing for Multi-Task Learning" (2023); LibMTL `weighting/DB_MTL.py`. Losses are
  balanced by taking logs; gradients of the trainable shared parameters are balanced by magnitude: with the EMA
  g_hat_t = (1 - beta) g_t + beta g_hat_t of each task's log-loss gradient (g_hat = 0 before the first step,
  as LibMTL's `grad_buffer` starts at zeros, so the first step's shared gradient is (1 - beta) of the balanced sum),
  alpha_t = max_k ||g_hat_k|| / ||g_hat_t|| and the shared gradient is sum_t alpha_t g_hat_t, so every task contributes
  a gradient of the largest task's norm. Task-specific parameters get plain gradients of sum_t log L_t.
- STCH: Lin et al., "Smooth Tchebycheff Scalarization for Multi-Objective Optimization" (ICML 2024); LibMTL
  `weighting/STCH.py`. Warm-up epochs train on sum_t log L_t while the mean loss of each task over the last warm-up
  epoch is recorded as the nadir; afterwards the loss is T * mu * logsumexp_t(log(L_t / nadir_t) / mu).

Differences from LibMTL, and why:
- DB-MTL's per-task gradients come from T calls of `backward(log L_t)`, reading and clearing the shared gradients
  after each call, as LibMTL's `_compute_grad(mode="backward")` does; the task-specific parameters accumulate
  sum_t grad log L_t on the way, so no extra backward pass is needed.
- alpha uses exact norms with an explicit zero-norm guard (a task whose EMA gradient is zero gets alpha 1, which
  contributes nothing) instead of LibMTL's `+ 1e-8` in the denominator, which caps alpha for small-gradient tasks.
- STCH: LibMTL trains on log losses for epochs 0..warmup_epoch (one more than its name says) and averages over
  epoch `warmup_epoch`; here epochs 0..warmup_epochs-1 are the warm-up and the last of them sets the nadir.
- logs use `log(L + LOG_EPS)` everywhere so a zero loss stays finite.

Data-parallel training: pass `grad_sync`, a callable that averages the given tensors in place across ranks (a
collective: every rank calls it at the same point). DB-MTL calls it once per step on the T x n matrix of per-task
shared gradients before the EMA, so every rank computes the same alpha and the same shared gradient. STCH calls it
once, at the end of the last warm-up epoch, on the running loss sums and step counts, so every rank uses the same
nadir. EW does not use it: the trainer averages gradients after `backward` for EW and STCH (DB-MTL's shared
gradients are then already identical on every rank, and averaging them changes nothing).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Protocol

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

LOG_EPS = 1e-8
"""Added to losses (and STCH's nadir ratios) before taking logs, so a zero loss gives a finite log."""

GradSync = Callable[[Sequence[Tensor]], None]
WeightingName = Literal["ew", "weighted", "dbmtl", "stch"]


class Weighting(Protocol):
    """What the trainer needs from a loss weighting."""

    tasks: tuple[str, ...]

    def backward(
        self, losses: dict[str, Tensor], shared_params: Sequence[nn.Parameter], epoch: int
    ) -> dict[str, float]:
        """Run the backward pass(es); leave `.grad` set on every trainable parameter the losses reach.

        Args:
            losses: scalar loss per task, keyed by the task names given at construction.
            shared_params: parameters used by every task (DB-MTL balances their gradients; others ignore them).
            epoch: 0-based epoch of this step (STCH's warm-up depends on it).

        Returns:
            The per-task weight or coefficient this step used, for logging.
        """
        ...

    def end_epoch(self, epoch: int) -> None:
        """Called once after the last step of `epoch` on every rank."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class _TaskWeighting:
    """Shared bookkeeping: the task order and the check that the losses name exactly those tasks."""

    def __init__(self, tasks: Sequence[str]) -> None:
        tasks = tuple(tasks)
        if not tasks or len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks must be a non-empty list of distinct names, got {list(tasks)}")
        self.tasks = tasks

    def _ordered(self, losses: dict[str, Tensor]) -> list[Tensor]:
        if set(losses) != set(self.tasks):
            raise ValueError(f"losses are keyed {sorted(losses)} but this weighting was built for {list(self.tasks)}")
        return [losses[task] for task in self.tasks]

    def end_epoch(self, epoch: int) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class EqualWeighting(_TaskWeighting):
    """EW: backward of the plain sum of the task losses."""

    def backward(
        self, losses: dict[str, Tensor], shared_params: Sequence[nn.Parameter], epoch: int
    ) -> dict[str, float]:
        ordered = self._ordered(losses)
        torch.stack(ordered).sum().backward()
        return dict.fromkeys(self.tasks, 1.0)


class WeightedMean(_TaskWeighting):
    """TA-LoRA's eq. 6 task term: backward of sum_t w_t L_t / sum_t w_t (equal weights give the mean loss)."""

    def __init__(self, tasks: Sequence[str], weights: Mapping[str, float] | None = None) -> None:
        """
        Args:
            tasks: task names.
            weights: w_t per task name; tasks it leaves out weigh 1. None: every task weighs 1.
        """
        super().__init__(tasks)
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(self.tasks))
        if unknown:
            raise ValueError(f"train.task_weights names {unknown}, not tasks of this run; tasks: {list(self.tasks)}")
        self.weights = {task: float(weights.get(task, 1.0)) for task in self.tasks}
        if any(w < 0 for w in self.weights.values()) or sum(self.weights.values()) <= 0:
            raise ValueError(f"train.task_weights {self.weights} must be >= 0 with a positive sum")

    def backward(
        self, losses: dict[str, Tensor], shared_params: Sequence[nn.Parameter], epoch: int
    ) -> dict[str, float]:
        ordered = self._ordered(losses)
        total = sum(self.weights.values())
        normalised = [self.weights[task] / total for task in self.tasks]
        torch.stack([w * loss for w, loss in zip(normalised, ordered, strict=True)]).sum().backward()
        return dict(zip(self.tasks, normalised, strict=True))


class DBMTL(_TaskWeighting):
    """DB-MTL: log losses plus magnitude-balanced EMA gradients on the trainable shared parameters."""

    def __init__(self, tasks: Sequence[str], beta: float = 0.9, grad_sync: GradSync | None = None) -> None:
        """
        Args:
            tasks: task names; the order fixes the rows of the gradient EMA.
            beta: EMA factor of the per-task gradients (LibMTL default 0.9).
            grad_sync: in-place cross-rank average, applied to the per-task gradients before the EMA.
        """
        super().__init__(tasks)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"DB-MTL beta must be in [0, 1), got {beta}")
        self.beta = beta
        self.grad_sync = grad_sync
        self.step = 0
        self.grad_ema: Tensor | None = None  # T n, float32, over the flattened trainable shared parameters

    def backward(
        self, losses: dict[str, Tensor], shared_params: Sequence[nn.Parameter], epoch: int
    ) -> dict[str, float]:
        log_losses = [torch.log(loss + LOG_EPS) for loss in self._ordered(losses)]
        shared = [p for p in shared_params if p.requires_grad]
        # Keep any gradient already accumulated (e.g. gradient accumulation) out of the per-task reads.
        previous = [p.grad for p in shared]
        for p in shared:
            p.grad = None
        rows = []
        for index, log_loss in enumerate(log_losses):
            # Task-specific parameters accumulate grad log L_t here, i.e. grad sum_t log L_t after the loop.
            log_loss.backward(retain_graph=index < len(log_losses) - 1)
            rows.append(_take_flat_grads(shared, log_loss.device))
        grads = torch.stack(rows)  # T n
        if self.grad_sync is not None:
            self.grad_sync([grads])
        if self.grad_ema is None:
            self.grad_ema = torch.zeros_like(grads)  # LibMTL DB_MTL.init_param: grad_buffer = zeros
        else:
            if self.grad_ema.shape != grads.shape:
                raise RuntimeError(
                    f"DB-MTL gradient EMA has shape {tuple(self.grad_ema.shape)} but this step's shared gradients "
                    f"have {tuple(grads.shape)}: the set of trainable shared parameters changed since the EMA started"
                )
        self.grad_ema = torch.lerp(grads, self.grad_ema.to(grads.device), self.beta)  # (1-b) g + b g_hat
        self.step += 1
        norms = torch.linalg.vector_norm(self.grad_ema, dim=1)  # T
        nonzero = norms > 0
        alpha = torch.where(nonzero, norms.max() / torch.where(nonzero, norms, torch.ones_like(norms)), 1.0)
        combined = alpha @ self.grad_ema  # n
        offset = 0
        for p, old in zip(shared, previous, strict=True):
            grad = combined[offset : offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
            p.grad = grad if old is None else old + grad
        return dict(zip(self.tasks, alpha.tolist(), strict=True))

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "grad_ema": self.grad_ema}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.grad_ema = state["grad_ema"]


def _take_flat_grads(params: Sequence[nn.Parameter], device: torch.device) -> Tensor:
    """Concatenate the parameters' gradients (zeros where a task did not reach one) as float32; clear them."""
    if not params:
        return torch.zeros(0, device=device)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params])
    for p in params:
        p.grad = None
    return flat


class STCH(_TaskWeighting):
    """Smooth Tchebycheff scalarisation of nadir-normalised losses after a log-loss warm-up."""

    def __init__(
        self, tasks: Sequence[str], mu: float = 1.0, warmup_epochs: int = 4, grad_sync: GradSync | None = None
    ) -> None:
        """
        Args:
            tasks: task names.
            mu: smoothing of the max; logsumexp approaches the Tchebycheff max as mu -> 0.
            warmup_epochs: epochs trained on sum log L_t; the last one's mean losses become the nadir.
            grad_sync: in-place cross-rank average, applied to the nadir statistics at the end of the warm-up.
        """
        super().__init__(tasks)
        if mu <= 0:
            raise ValueError(f"STCH mu must be positive, got {mu}")
        if warmup_epochs < 1:
            raise ValueError(f"STCH warmup_epochs must be at least 1 (the nadir comes from it), got {warmup_epochs}")
        self.mu = mu
        self.warmup_epochs = warmup_epochs
        self.grad_sync = grad_sync
        self.loss_sum: Tensor | None = None  # T, running sum over the last warm-up epoch
        self.loss_count = 0
        self.nadir: Tensor | None = None  # T

    def backward(
        self, losses: dict[str, Tensor], shared_params: Sequence[nn.Parameter], epoch: int
    ) -> dict[str, float]:
        stacked = torch.stack(self._ordered(losses))  # T
        if epoch < self.warmup_epochs:
            if epoch == self.warmup_epochs - 1:
                detached = stacked.detach().float()
                self.loss_sum = detached if self.loss_sum is None else self.loss_sum.to(detached.device) + detached
                self.loss_count += 1
            torch.log(stacked + LOG_EPS).sum().backward()
            return dict.fromkeys(self.tasks, 1.0)
        if self.nadir is None:
            # end_epoch normally finalises it; this covers callers that skipped end_epoch.
            self._finalise_nadir()
        nadir = self.nadir.to(stacked.device)
        scaled = torch.log(stacked / nadir + LOG_EPS) / self.mu  # T
        num_tasks = len(self.tasks)
        (num_tasks * self.mu * torch.logsumexp(scaled, dim=0)).backward()
        # d loss / d log(L_t / nadir_t) = T * softmax_t: the weight each task's log loss gets this step.
        weights = num_tasks * torch.softmax(scaled.detach(), dim=0)
        return dict(zip(self.tasks, weights.tolist(), strict=True))

    def end_epoch(self, epoch: int) -> None:
        if epoch == self.warmup_epochs - 1 and self.nadir is None:
            self._finalise_nadir()

    def _finalise_nadir(self) -> None:
        if self.loss_sum is None or self.loss_count == 0:
            raise RuntimeError(
                f"STCH has no losses from its last warm-up epoch ({self.warmup_epochs - 1}) to set the nadir: "
                "call backward for every step of the warm-up epochs, or resume from a state saved after them"
            )
        stats = torch.cat([self.loss_sum, self.loss_sum.new_tensor([float(self.loss_count)])])  # T+1
        if self.grad_sync is not None:
            self.grad_sync([stats])
        # A zero mean loss would make every later ratio infinite; clamp to the log epsilon.
        self.nadir = (stats[:-1] / stats[-1]).clamp_min(LOG_EPS)
        logger.info(
            "STCH nadir from %d warm-up steps: %s",
            self.loss_count,
            ", ".join(f"{t}={v:.4g}" for t, v in zip(self.tasks, self.nadir.tolist(), strict=True)),
        )

    def state_dict(self) -> dict[str, Any]:
        return {"loss_sum": self.loss_sum, "loss_count": self.loss_count, "nadir": self.nadir}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_sum = state["loss_sum"]
        self.loss_count = int(state["loss_count"])
        self.nadir = state["nadir"]


WEIGHTINGS: dict[str, type[_TaskWeighting]] = {
    "ew": EqualWeighting,
    "weighted": WeightedMean,
    "dbmtl": DBMTL,
    "stch": STCH,
}


def build_weighting(
    name: WeightingName,
    tasks: Sequence[str],
    *,
    beta: float = 0.9,
    mu: float = 1.0,
    warmup_epochs: int = 4,
    grad_sync: GradSync | None = None,
    task_weights: Mapping[str, float] | None = None,
) -> Weighting:
    """Build a loss weighting by name; options that the chosen method does not use are ignored.

    Args:
        name: "ew", "dbmtl" or "stch".
        tasks: task names, the keys of the loss dicts passed to `backward`.
        beta: DB-MTL gradient EMA factor.
        mu: STCH smoothing.
        warmup_epochs: STCH log-loss warm-up epochs.
        grad_sync: in-place cross-rank average for data-parallel runs (DB-MTL gradients, STCH nadir).
        task_weights: w_t of `weighted`; the other methods refuse them rather than ignore them.
    """
    if task_weights and name != "weighted":
        raise ValueError(f"train.task_weights only applies to train.weighting=weighted, not {name!r}; drop one of them")
    if name == "ew":
        return EqualWeighting(tasks)
    if name == "weighted":
        return WeightedMean(tasks, task_weights)
    if name == "dbmtl":
        return DBMTL(tasks, beta=beta, grad_sync=grad_sync)
    if name == "stch":
        return STCH(tasks, mu=mu, warmup_epochs=warmup_epochs, grad_sync=grad_sync)
    raise ValueError(f"unknown loss weighting {name!r}; choose one of {sorted(WEIGHTINGS)}")
