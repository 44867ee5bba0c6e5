"""Low-rank adapters on a frozen Linear (shared LoRA + TESLA per-task adapters) and their merged per-task form.

EndoARSS (Huang et al., 2025; shared/papers/endoarss.md III-C, III-D): the frozen DINOv2 projections get a LoRA shared
by all tasks (eq. 2-3, on q and v of attention) and TESLA, one low-rank adapter per task (eq. 5). Every task runs its
own token stream through the backbone; the streams are stacked task-major on the batch axis, (T*B, ..., in) with rows
[t*B:(t+1)*B] belonging to task t, and one pass computes all of them (eq. 6: task t sees W + B_s A_s + B_t A_t).

- `AdapterLinear` wraps (never copies) the original `nn.Linear`, peft-style (`peft/tuners/lora/layer.py`): factors in
  `nn.ParameterDict`s `lora_A` / `lora_B` keyed by adapter name ("shared" and each task name), `r` and `scaling`
  dicts, one `delta_weight(task)` serving forward equivalence, merge and unmerge. It can adapt only some output row
  slices, e.g. q and v of a fused qkv projection. The adapter kinds are strategy objects (`variants.py`).
- `TaskLinear` is the adapter-free merged form: one weight per task stacked (T, out, in) and the shared bias, applied
  with one batched matmul; what merged checkpoints and exported graphs hold.

Both serve a subset of their tasks, in any order, through `set_active_tasks` (see `training.adapters.active_tasks`).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.adapters.ta_lora import TaskAwareLoraVariant
from training.adapters.variants import AdapterVariant, SharedLoraVariant, TeslaVariant

logger = logging.getLogger(__name__)

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def select_tasks(tasks: str | Sequence[str] | None, known: Sequence[str]) -> tuple[str, ...]:
    """Normalise a task selection against the known task names (None = all, in known order).

    Raises:
        ValueError: if the selection is empty, repeats a task or names an unknown one.
    """
    if tasks is None:
        return tuple(known)
    names = (tasks,) if isinstance(tasks, str) else tuple(tasks)
    if not names:
        raise ValueError(f"empty task selection; pass task names from {list(known)} or None for all")
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known tasks are {list(known)}")
    if len(set(names)) != len(names):
        raise ValueError(f"task selection {list(names)} repeats a task; each stream must name a different task")
    return names


def stacked_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Apply per-task weights to task-major stacked streams in one batched matmul.

    Args:
        x: (T*B, ..., in) with rows [t*B:(t+1)*B] belonging to task t.
        weight: (T, out, in) per-task weights.
        bias: (out) shared bias or None.
    """
    if weight.shape[0] == 1:
        return F.linear(x, weight[0], bias)
    streams = weight.shape[0]
    per_task = x.reshape(streams, -1, x.shape[-1])  # T (B N) in
    if bias is None:
        out = torch.bmm(per_task, weight.transpose(1, 2))  # T (B N) out
    else:
        out = torch.baddbmm(bias, per_task, weight.transpose(1, 2))  # T (B N) out
    return out.reshape(*x.shape[:-1], weight.shape[1])  # (T B) N out


class _TaskStreamLayer(nn.Module):
    """Bookkeeping shared by layers whose input is task-major stacked streams."""

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__()
        self.tasks: tuple[str, ...] = select_tasks(tuple(tasks), tuple(tasks))
        self.active_tasks: tuple[str, ...] | None = None

    def set_active_tasks(self, tasks: str | Sequence[str] | None) -> None:
        """Choose which task streams (and in which order) the next inputs stack; None = all tasks."""
        self.active_tasks = None if tasks is None else select_tasks(tasks, self.tasks)

    def streams(self) -> tuple[str, ...]:
        """Tasks of the stacked input streams, in stacking order."""
        return self.active_tasks if self.active_tasks is not None else self.tasks

    def _check_batch(self, x: Tensor, tasks: Sequence[str]) -> None:
        if x.shape[0] % len(tasks):
            raise ValueError(
                f"input batch {x.shape[0]} (shape {tuple(x.shape)}) is not divisible by the {len(tasks)} active task "
                f"streams {list(tasks)}; stack one equal-size stream per task (task-major) or select the streams "
                f"with training.adapters.active_tasks(model, tasks)"
            )


class AdapterLinear(_TaskStreamLayer):
    """A frozen `nn.Linear` plus a shared LoRA and per-task TESLA adapters (or TA-LoRA) on some of its output rows."""

    adapter_layer_names: tuple[str, ...] = ("lora_A", "lora_B", *TaskAwareLoraVariant.factor_names)

    def __init__(
        self,
        base_layer: nn.Linear,
        *,
        tasks: Sequence[str],
        shared_rank: int = 4,
        task_rank: int = 4,
        alpha: float = 4.0,
        dropout: float = 0.0,
        row_slices: Sequence[tuple[int, int]] | None = None,
        ta_lora_ranks: tuple[int, int, int] | None = None,
        ta_lora_scaling: float = 0.5,
    ) -> None:
        """
        Args:
            base_layer: the layer to adapt; kept as `base_layer` and never modified.
            tasks: task names, in the default stream order.
            shared_rank: rank of the LoRA shared by all tasks (0 = none).
            task_rank: rank of each task's TESLA adapter (0 = none).
            alpha: scaling numerator; each adapter adds (alpha / rank) * B A.
            dropout: dropout on the adapter input (one mask shared by the shared and task adapters).
            row_slices: equal-size [start, stop) output row ranges to adapt, each with its own factors (q and v of
                a fused qkv: [(0, D), (2D, 3D)]); None = all rows.
            ta_lora_ranks: (R1, R2, R3) of a TA-LoRA update tensor over all tasks (`ta_lora.py`); None = none.
            ta_lora_scaling: TA-LoRA's scaling s (task t adds s * its slice of the update tensor).
        """
        super().__init__(tasks)
        if not isinstance(base_layer, nn.Linear):
            raise ValueError(f"AdapterLinear wraps an nn.Linear, got {type(base_layer).__name__}")
        if shared_rank < 0 or task_rank < 0 or (shared_rank + task_rank == 0 and ta_lora_ranks is None):
            raise ValueError(
                f"shared_rank={shared_rank}, task_rank={task_rank}, ta_lora_ranks={ta_lora_ranks}: ranks must be "
                f">= 0 and some adapter must be present"
            )
        if alpha <= 0:
            raise ValueError(f"alpha={alpha} must be positive")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout} must be in [0, 1)")
        self.base_layer = base_layer
        self.row_slices = _check_row_slices(row_slices, base_layer.out_features)
        rows = torch.cat([torch.arange(start, stop) for start, stop in self.row_slices])
        full = rows.numel() == base_layer.out_features and bool((rows == torch.arange(rows.numel())).all())
        # None when every row is adapted in order: the delta is then added without scattering.
        self.register_buffer("row_index", None if full else rows.to(base_layer.weight.device), persistent=False)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.r: dict[str, int | tuple[int, ...]] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # The adapter kinds present are data (variant, size, scaling); the forward and delta code iterate over them.
        kinds: list[tuple[type[AdapterVariant], int | tuple[int, int, int] | None, float]] = [
            (SharedLoraVariant, shared_rank, alpha),
            (TeslaVariant, task_rank, alpha),
            (TaskAwareLoraVariant, ta_lora_ranks, ta_lora_scaling),
        ]
        used = [(variant, size, scale) for variant, size, scale in kinds if size]
        self.variants: tuple[type[AdapterVariant], ...] = tuple(variant for variant, _, _ in used)
        for variant, size, scale in used:
            variant.init(self, self.tasks, size, scale)
        self.register_buffer("merged_weight", None, persistent=False)  # T out in, rows follow merged_adapters
        self.merged_adapters: list[str] = []

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def per_task(self) -> bool:
        """True when some task has its own weights, i.e. the input must be stacked task streams."""
        return any(variant.per_task for variant in self.variants)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def add_adapter(self, name: str, *, rank: int, alpha: float) -> None:
        """Create one adapter's factors: A (S*r, in) kaiming-uniform, B (S, o, r) zeros, so its delta starts at 0."""
        if not name or "." in name or name in self.lora_A:
            raise ValueError(f"adapter name {name!r} must be non-empty, contain no '.', and not exist already")
        weight = self.base_layer.weight
        slices = len(self.row_slices)
        size = self.row_slices[0][1] - self.row_slices[0][0]
        lora_a = torch.empty(slices * rank, self.in_features, device=weight.device, dtype=weight.dtype)
        nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))  # the nn.Linear default, as in LoRA (Hu et al., 2021)
        self.lora_A[name] = nn.Parameter(lora_a)
        self.lora_B[name] = nn.Parameter(torch.zeros(slices, size, rank, device=weight.device, dtype=weight.dtype))
        self.r[name] = rank
        self.scaling[name] = alpha / rank

    def delta_weight(self, task: str) -> Tensor:
        """Scaled weight update (out, in) of `task`: shared LoRA + its TESLA adapter, zero on non-adapted rows.

        fp16/bf16 factors are multiplied in fp32 and the result cast back (half matmuls lose precision, and CPU
        kernels for them are slow or missing).
        """
        select_tasks(task, self.tasks)
        weight = self.base_layer.weight
        compute = torch.float32 if weight.dtype in _LOW_PRECISION else weight.dtype
        parts = sum(variant.delta(self, task, compute) for variant in self.variants)  # S o in
        parts = parts.reshape(-1, self.in_features)  # (S o) in
        if self.row_index is None:
            return parts.to(weight.dtype)
        full = torch.zeros(self.out_features, self.in_features, device=weight.device, dtype=compute)
        return full.index_add(0, self.row_index, parts).to(weight.dtype)

    @torch.no_grad()
    def build_merged_weights(self, tasks: Sequence[str], *, safe: bool = True) -> Tensor:
        """Per-task merged weights W + delta_weight(t), stacked (T, out, in); the base weight is not touched.

        Raises:
            ValueError: `safe` and a merged weight holds NaN or inf (names the task).
        """
        merged = []
        for task in tasks:
            weight = self.base_layer.weight + self.delta_weight(task)
            if safe and not torch.isfinite(weight).all():
                raise ValueError(
                    f"NaN or inf in the merged weight of task {task!r}: its adapter diverged; nothing was merged. "
                    f"Inspect its factors (lora_A/lora_B[{task!r}] and 'shared', or ta_lora_*) or load an earlier "
                    f"checkpoint"
                )
            merged.append(weight)
        return torch.stack(merged)

    def merge(self, tasks: str | Sequence[str] | None = None, safe: bool = True) -> None:
        """Build merged per-task weights for `tasks` (None = all); forward then uses them and no adapter factor.

        Non-destructive: the base weight stays as it is, so `unmerge` restores the layer exactly. Merging an already
        merged task only warns.
        """
        todo = []
        for task in select_tasks(tasks, self.tasks):
            if task in self.merged_adapters:
                warnings.warn(f"task {task!r} is already merged; skipping it", UserWarning, stacklevel=2)
            else:
                todo.append(task)
        if not todo:
            return
        merged = self.build_merged_weights(todo, safe=safe)  # everything checked before anything is written
        self.merged_weight = merged if self.merged_weight is None else torch.cat([self.merged_weight, merged])
        self.merged_adapters.extend(todo)

    def unmerge(self) -> None:
        """Drop the merged weights, last merged first; forward uses the adapter factors again."""
        if not self.merged_adapters:
            warnings.warn("unmerge() called but no task is merged", UserWarning, stacklevel=2)
            return
        while self.merged_adapters:
            task = self.merged_adapters.pop()
            self.merged_weight = self.merged_weight[:-1]
            logger.debug("unmerged task %r", task)
        self.merged_weight = None

    def forward(self, x: Tensor) -> Tensor:
        tasks = self.streams()
        if self.per_task:
            self._check_batch(x, tasks)
        if self.merged_adapters:
            return self._forward_merged(x, tasks)
        out = self.base_layer(x)  # (T B) N out
        adapter_in = self.lora_dropout(x).reshape(-1, self.in_features).to(self._factor_dtype())  # M in
        delta = sum(variant.forward(self, adapter_in, tasks) for variant in self.variants)  # M S o
        delta = delta.reshape(*out.shape[:-1], -1).to(out.dtype)  # (T B) N (S o)
        if self.row_index is None:
            return out + delta
        return add_to_rows(out, delta, self.row_slices)

    def _factor_dtype(self) -> torch.dtype:
        """dtype of the adapter factors (the adapter input is cast to it)."""
        for name, param in self.named_parameters():
            if name.split(".")[0] in self.adapter_layer_names:
                return param.dtype
        return self.base_layer.weight.dtype

    def _forward_merged(self, x: Tensor, tasks: Sequence[str]) -> Tensor:
        if not self.per_task:  # shared LoRA only: every merged task holds the same weight
            return F.linear(x, self.merged_weight[0], self.bias)
        missing = [task for task in tasks if task not in self.merged_adapters]
        if missing:
            raise RuntimeError(
                f"task stream(s) {missing} are not merged (merged: {self.merged_adapters}); "
                f"call merge({missing}) or unmerge() first"
            )
        index = [self.merged_adapters.index(task) for task in tasks]
        weight = self.merged_weight if index == list(range(len(self.merged_adapters))) else self.merged_weight[index]
        return stacked_linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{name}={rank}" for name, rank in self.r.items())
        merged = f", merged={self.merged_adapters}" if self.merged_adapters else ""
        return f"tasks={list(self.tasks)}, rows={list(self.row_slices)}, r=({ranks}){merged}"


class TaskLinear(_TaskStreamLayer):
    """Adapter-free merged layer: one weight per task, stacked (T, out, in), and one shared bias."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        tasks: Sequence[str],
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """
        Args:
            in_features: input width.
            out_features: output width.
            tasks: task names, one weight each, in the default stream order.
            bias: learn a bias shared by all tasks (the frozen base layer's bias is shared by every task).
            device: parameter device.
            dtype: parameter dtype.
        """
        super().__init__(tasks)
        self.in_features = in_features
        self.out_features = out_features
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(len(self.tasks), out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation, independently per task."""
        for weight in self.weight:
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_weights(cls, weight: Tensor, bias: Tensor | None, tasks: Sequence[str]) -> TaskLinear:
        """A TaskLinear holding copies of `weight` (T, out, in) and `bias` (out)."""
        if weight.dim() != 3 or weight.shape[0] != len(tasks):
            raise ValueError(f"weight of shape {tuple(weight.shape)} must be (T, out, in) with T = {len(tasks)} tasks")
        _, out_features, in_features = weight.shape
        layer = cls(
            in_features, out_features, tasks=tasks, bias=bias is not None, device=weight.device, dtype=weight.dtype
        )
        with torch.no_grad():
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, tasks: Sequence[str]) -> TaskLinear:
        """Every task starts with `linear`'s weight: the merged form of adapters that are still zero."""
        weight = linear.weight.detach().unsqueeze(0).expand(len(tasks), -1, -1)
        return cls.from_weights(weight, None if linear.bias is None else linear.bias.detach(), tasks)

    def forward(self, x: Tensor) -> Tensor:
        tasks = self.streams()
        self._check_batch(x, tasks)
        if tasks == self.tasks:
            return stacked_linear(x, self.weight, self.bias)
        index = [self.tasks.index(task) for task in tasks]
        return stacked_linear(x, self.weight[index], self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tasks={list(self.tasks)}"


def add_to_rows(out: Tensor, delta: Tensor, row_slices: Sequence[tuple[int, int]]) -> Tensor:
    """`out` (... out) plus `delta` (... S*o) added on the S row ranges, chunk i on row_slices[i].

    Built with slices and one concatenation rather than index_add along the last axis, whose backward (an
    index_select over the feature axis) cost a third of the adapter layer's training time on CPU.
    """
    size = row_slices[0][1] - row_slices[0][0]
    pieces, cursor = [], 0
    for start, stop, chunk in sorted((start, stop, i) for i, (start, stop) in enumerate(row_slices)):
        if start > cursor:
            pieces.append(out[..., cursor:start])
        pieces.append(out[..., start:stop] + delta[..., chunk * size : (chunk + 1) * size])
        cursor = stop
    if cursor < out.shape[-1]:
        pieces.append(out[..., cursor:])
    return torch.cat(pieces, dim=-1)


def _check_row_slices(row_slices: Sequence[tuple[int, int]] | None, out_features: int) -> tuple[tuple[int, int], ...]:
    if row_slices is None:
        return ((0, out_features),)
    slices = tuple((int(start), int(stop)) for start, stop in row_slices)
    if not slices:
        raise ValueError("row_slices is empty; pass None to adapt every output row")
    sizes = {stop - start for start, stop in slices}
    ordered = sorted(slices)
    in_range = all(0 <= start < stop <= out_features for start, stop in slices)
    disjoint = all(prev[1] <= cur[0] for prev, cur in zip(ordered, ordered[1:], strict=False))
    if len(sizes) != 1 or not in_range or not disjoint:
        raise ValueError(
            f"row_slices {list(slices)} must be disjoint, equal-size [start, stop) ranges within {out_features} rows"
        )
    return slices
