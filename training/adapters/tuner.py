"""Put shared LoRA + TESLA adapters (or TA-LoRA) into a ViT backbone, freeze the rest, fold them into per-task weights.

EndoARSS (shared/papers/endoarss.md III-C, III-D; shared/MODEL_NOTES.md §1): LoRA on q and v shared by all tasks,
TESLA per-task low-rank adapters, every task with its own token stream through the backbone, all streams in one
batched pass stacked task-major, (T*B, N, D). The backbone is expected to follow the DINOv2 layout
`blocks[i].attn.qkv` (fused, rows q then k then v), `blocks[i].attn.proj`, `blocks[i].mlp.fc1`, `blocks[i].mlp.fc2`.

`kind="ta_lora"` puts TA-LoRA (shared/papers/ta-lora-sam.md; MODEL_NOTES §3; `training.adapters.ta_lora`) on the same
targets instead: one Tucker-factored update tensor per layer whose slice t is task t's update, the same per-task
streams and merged form, an orthogonal regulariser (`adapter_regularization`, weight `orth_weight`, added once per
step by the trainer) and optionally trainable LayerNorms (`tune_layernorm`). `apply_adapters` records its config on
the model (`model.adapter_config`, as peft keeps `peft_config`), which is where those two are read from.

Freezing and the adapter-only state-dict filter are built from `AdapterLinear.adapter_layer_names`
(litgpt `lora.py`: `mark_only_lora_as_trainable`, `lora_filter`); unloading follows peft
`tuners_utils._unload_and_optionally_merge`, except that several tasks unload to a `TaskLinear` of stacked weights.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from training.adapters.layer import AdapterLinear, TaskLinear, select_tasks
from training.adapters.ta_lora import (
    PAPER_RANKS,
    TA_LORA_ADAPTER,
    OrthPenalty,
    check_ranks,
    orthogonal_regularization,
    uses_ta_lora,
)
from training.adapters.variants import SHARED_ADAPTER

logger = logging.getLogger(__name__)

# Target name -> (module path inside a block, part of the fused qkv rows or None for the whole layer).
TARGETS: dict[str, tuple[str, int | None]] = {
    "qkv.q": ("attn.qkv", 0),
    "qkv.k": ("attn.qkv", 1),
    "qkv.v": ("attn.qkv", 2),
    "proj": ("attn.proj", None),
    "fc1": ("mlp.fc1", None),
    "fc2": ("mlp.fc2", None),
}
_QKV_PARTS = 3
AdapterKind = Literal["lora_tesla", "ta_lora"]
ADAPTER_CONFIG_ATTR = "adapter_config"  # where apply_adapters records its config on the model


@dataclass
class AdapterConfig:
    """Where the adapters go and how large they are; saved in a checkpoint's config.json via `to_dict`."""

    tasks: tuple[str, ...] = field(metadata={"help": "task names; the default stream order of the stacked batch"})
    shared_rank: int = field(default=4, metadata={"help": "rank of the LoRA shared by all tasks (0 = none)"})
    task_rank: int = field(default=4, metadata={"help": "rank of each task's TESLA adapter (0 = none)"})
    alpha: float = field(default=4.0, metadata={"help": "scaling numerator: each adapter adds alpha / rank * B A"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input"})
    targets: tuple[str, ...] = field(
        default=("qkv.q", "qkv.v"), metadata={"help": f"layers to adapt in each block, from {sorted(TARGETS)}"}
    )
    layers: tuple[int, ...] | None = field(default=None, metadata={"help": "block indices to adapt (None = all)"})
    kind: AdapterKind = field(
        default="lora_tesla",
        metadata={
            "help": "lora_tesla: shared LoRA + TESLA (EndoARSS); ta_lora: TA-LoRA, one Tucker-factored update tensor "
            "for all tasks (shared_rank / task_rank are then 0)"
        },
    )
    ta_lora_ranks: tuple[int, int, int] = field(
        default=PAPER_RANKS, metadata={"help": "TA-LoRA core ranks (R1 input, R2 output, R3 task mode)"}
    )
    ta_lora_scaling: float = field(default=0.5, metadata={"help": "TA-LoRA: task t adds scaling * its update"})
    orth_weight: float = field(
        default=1.0, metadata={"help": "lambda of TA-LoRA's orthogonal regulariser, once per step (0 = off)"}
    )
    orth_penalty: OrthPenalty = field(
        default="squared", metadata={"help": "its gaps as squared norms (paper eq. 5) or norms (public code)"}
    )
    tune_layernorm: bool = field(
        default=False, metadata={"help": "also train the LayerNorm scales and biases of the adapted model"}
    )

    def __post_init__(self) -> None:
        self.tasks = (self.tasks,) if isinstance(self.tasks, str) else tuple(self.tasks)
        self.targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        self.layers = None if self.layers is None else tuple(self.layers)
        reserved = (SHARED_ADAPTER, TA_LORA_ADAPTER)
        bad_tasks = [t for t in self.tasks if not isinstance(t, str) or not t or "." in t or t in reserved]
        if not self.tasks or bad_tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(
                f"tasks={list(self.tasks)}: need at least one task, unique non-empty names without '.', "
                f"and none called {SHARED_ADAPTER!r} or {TA_LORA_ADAPTER!r} (reserved adapter names)"
            )
        if self.kind not in get_args(AdapterKind):
            raise ValueError(f"kind={self.kind!r} is not an adapter kind; choose one of {list(get_args(AdapterKind))}")
        self.ta_lora_ranks = check_ranks(self.ta_lora_ranks)
        if not self.ta_lora_scaling > 0:
            raise ValueError(f"ta_lora_scaling={self.ta_lora_scaling!r} must be positive (the paper uses 0.5)")
        if not 0 <= self.orth_weight < float("inf"):
            raise ValueError(f"orth_weight={self.orth_weight!r} must be a finite number >= 0 (the paper uses 1)")
        if self.orth_penalty not in get_args(OrthPenalty):
            raise ValueError(f"orth_penalty={self.orth_penalty!r} must be one of {list(get_args(OrthPenalty))}")
        if not isinstance(self.tune_layernorm, bool):
            raise ValueError(f"tune_layernorm={self.tune_layernorm!r} must be true or false")
        if self.kind == "ta_lora":
            # TA-LoRA replaces both LoRA kinds; their ranks are recorded as 0 so saved configs say what was built.
            self.shared_rank, self.task_rank = 0, 0
        for name in ("shared_rank", "task_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} must be an integer >= 0")
        if self.kind == "lora_tesla" and self.shared_rank == 0 and self.task_rank == 0:
            raise ValueError("shared_rank=0 and task_rank=0: nothing to adapt; set one of them > 0 (or kind=ta_lora)")
        if not self.alpha > 0:
            raise ValueError(f"alpha={self.alpha!r} must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout!r} must be in [0, 1)")
        unknown = [t for t in self.targets if t not in TARGETS]
        if not self.targets or unknown or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets={list(self.targets)}: need unique names from {sorted(TARGETS)}")
        if self.layers is not None:
            bad = [i for i in self.layers if isinstance(i, bool) or not isinstance(i, int) or i < 0]
            if not self.layers or bad or len(set(self.layers)) != len(self.layers):
                raise ValueError(f"layers={list(self.layers)}: need unique block indices >= 0, or None for all blocks")

    @property
    def per_task(self) -> bool:
        """True when tasks get their own weights, i.e. every task needs its own token stream."""
        return self.kind == "ta_lora" or self.task_rank > 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples as lists)."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        """Inverse of `to_dict`; rejects unknown keys."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown adapter config key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**data)


def iter_adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLinear]]:
    """(module path, layer) for every AdapterLinear in `model`."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLinear):
            yield name, module


def apply_adapters(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Wrap the targeted Linears under `model.blocks[i]` in AdapterLinear, in place, and record `config` on `model`.

    Returns:
        The module paths adapted, e.g. ["blocks.0.attn.qkv", ...].

    Raises:
        ValueError: a target is missing, is not an nn.Linear, or is adapted already.
    """
    paths = []
    for path, linear, row_slices in _plan(model, config):
        if isinstance(linear, AdapterLinear):
            raise ValueError(f"{path} already holds adapters; apply_adapters runs once per model")
        layer = AdapterLinear(
            linear,
            tasks=config.tasks,
            shared_rank=config.shared_rank,
            task_rank=config.task_rank,
            alpha=config.alpha,
            dropout=config.dropout,
            row_slices=row_slices,
            ta_lora_ranks=config.ta_lora_ranks if config.kind == "ta_lora" else None,
            ta_lora_scaling=config.ta_lora_scaling,
        )
        _replace_module(model, path, layer)
        paths.append(path)
    setattr(model, ADAPTER_CONFIG_ATTR, config)
    sizes = (
        f"TA-LoRA ranks {config.ta_lora_ranks}"
        if config.kind == "ta_lora"
        else f"shared rank {config.shared_rank}, task rank {config.task_rank}"
    )
    logger.info(
        "adapters on %d layers (%s, tasks %s): %d parameters",
        len(paths),
        sizes,
        list(config.tasks),
        count_adapter_parameters(model),
    )
    return paths


def recorded_configs(model: nn.Module) -> Iterator[tuple[nn.Module, AdapterConfig]]:
    """(module, config) for every module of `model` that `apply_adapters` adapted."""
    for module in model.modules():
        config = module.__dict__.get(ADAPTER_CONFIG_ATTR)
        if isinstance(config, AdapterConfig):
            yield module, config


def adapter_regularization(model: nn.Module) -> Tensor:
    """The adapters' regulariser to add to the loss once per step: lambda * TA-LoRA's orthogonal term (eq. 6).

    Summed over the modules `apply_adapters` adapted with `kind="ta_lora"` and `orth_weight` > 0 (the mean over their
    TA-LoRA layers times their `orth_weight`). A zero tensor without gradient when there is none (LoRA/TESLA models,
    merged models), so callers can test `.requires_grad` before calling `backward`.
    """
    terms = []
    for module, config in recorded_configs(model):
        layers = [layer for _, layer in iter_adapter_layers(module) if uses_ta_lora(layer)]
        if config.kind == "ta_lora" and config.orth_weight > 0 and layers:
            terms.append(config.orth_weight * orthogonal_regularization(layers, config.orth_penalty))
    return torch.stack(terms).sum() if terms else torch.zeros(())


def is_adapter_key(name: str) -> bool:
    """True for parameter / state-dict names that belong to an adapter factor."""
    return not set(name.split(".")).isdisjoint(AdapterLinear.adapter_layer_names)


def mark_only_adapters_trainable(model: nn.Module) -> None:
    """Freeze every parameter of `model` except the adapter factors (and LayerNorms where `tune_layernorm`).

    LayerNorm tuning (TA-LoRA / mSAM, after FullLoRA-AT) is read from the config `apply_adapters` recorded: every
    LayerNorm inside a module adapted with `tune_layernorm=True` keeps its scale and bias trainable.
    """
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter_key(name))
    for owner, config in recorded_configs(model):
        if config.tune_layernorm:
            unfreeze_layer_norms(owner)


def unfreeze_layer_norms(model: nn.Module) -> None:
    """Make the scale and bias of every LayerNorm below `model` trainable (nn.LayerNorm, and channel-first variants
    by name: SAM's neck uses a `LayerNorm2d` class)."""
    for module in model.modules():
        if isinstance(module, nn.LayerNorm) or type(module).__name__.startswith("LayerNorm"):
            module.requires_grad_(True)


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter factors of `model` (what the optimizer of a frozen backbone needs)."""
    return [param for name, param in model.named_parameters() if is_adapter_key(name)]


def count_adapter_parameters(model: nn.Module) -> int:
    return sum(param.numel() for param in adapter_parameters(model))


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter-only part of `model.state_dict()`."""
    return {key: value for key, value in model.state_dict().items() if is_adapter_key(key)}


@contextmanager
def active_tasks(model: nn.Module, tasks: str | Sequence[str] | None) -> Iterator[None]:
    """Run only some task streams (in the given order) through every adapter / merged layer of `model`.

    E.g. `with active_tasks(model, "segmentation"): model(x)` with x a single stream of batch B.

    Raises:
        ValueError: a task is unknown to some layer (nothing is changed then).
    """
    layers = [module for module in model.modules() if isinstance(module, AdapterLinear | TaskLinear)]
    previous = [layer.active_tasks for layer in layers]
    try:
        for layer in layers:
            layer.set_active_tasks(tasks)
        yield
    finally:
        for layer, before in zip(layers, previous, strict=True):
            layer.active_tasks = before


def merge_adapters(model: nn.Module, tasks: str | Sequence[str] | None = None, safe: bool = True) -> None:
    """`AdapterLinear.merge(tasks, safe)` on every adapter layer of `model` (e.g. merge one task, export, unmerge).

    Raises:
        ValueError: a merged weight is not finite; that layer is left as it was, earlier layers stay merged
            (`unmerge_adapters` resets them).
    """
    for _, layer in iter_adapter_layers(model):
        layer.merge(tasks, safe=safe)


def unmerge_adapters(model: nn.Module) -> None:
    """`AdapterLinear.unmerge()` on every merged adapter layer of `model`."""
    for _, layer in iter_adapter_layers(model):
        if layer.merged:
            layer.unmerge()


def merge_and_unload(model: nn.Module, tasks: str | Sequence[str] | None = None) -> nn.Module:
    """A copy of `model` with every adapter folded into plain weights and no adapter tensor left.

    Does NOT work in place: `model` keeps its adapters and the result is a deep copy. Each AdapterLinear becomes a
    `TaskLinear` with one merged weight per task (several tasks, layers with TESLA adapters) or an `nn.Linear` holding
    the merged weight (one task, or a layer with only the shared LoRA, which is the same for every task).

    Args:
        model: a model with adapters (`apply_adapters`).
        tasks: the tasks to keep, in stream order (None = all). The result expects exactly these streams.

    Raises:
        ValueError: a task is unknown, or a merged weight is not finite (names the task).
    """
    unloaded = copy.deepcopy(model)
    for path, layer in list(iter_adapter_layers(unloaded)):
        names = select_tasks(tasks, layer.tasks)
        weights = layer.build_merged_weights(names, safe=True)  # T out in
        base = layer.base_layer
        if len(names) > 1 and layer.per_task:
            replacement: nn.Module = TaskLinear.from_weights(weights, base.bias, names)
        else:
            replacement = base
            with torch.no_grad():
                base.weight.copy_(weights[0])  # the copy's own tensor: the caller's model is untouched
        for param, source in zip(replacement.parameters(), base.parameters(), strict=True):
            param.requires_grad_(source.requires_grad)
        _replace_module(unloaded, path, replacement)
    for module, _ in list(recorded_configs(unloaded)):
        del module.__dict__[ADAPTER_CONFIG_ATTR]  # no adapter left: nothing to regularise
    return unloaded


def merged_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose `backbone` holds per-task merged weights and no adapter factors.

    Does not work in place: the training model keeps its adapters. The tasks merged are `model.tasks`, or only the
    first one when `model.per_task_streams` is False (one shared stem: every task's fold is the same).
    A model without adapter layers (a family whose adaptation lives outside the backbone) is its own merged form
    and is returned as it is.
    """
    if next(iter_adapter_layers(model), None) is None:
        return model
    merged = copy.copy(model)  # shallow: share heads/SMA modules; only the backbone is replaced
    merged._modules = dict(model._modules)
    tasks = model.tasks if model.per_task_streams else model.tasks[0]
    merged._modules["backbone"] = merge_and_unload(model.backbone, tasks)
    return merged


def prepare_for_merged_weights(
    model: nn.Module, config: AdapterConfig, tasks: str | Sequence[str] | None = None
) -> list[str]:
    """Give a plain backbone the layout of `merge_and_unload(adapted, tasks)` so a merged state dict loads strictly.

    The targeted Linears become TaskLinear shells (every task starting from the base weight), in place. When the
    merged form keeps plain Linears (one task, or no TESLA adapter) nothing changes.

    Returns:
        The module paths replaced.
    """
    names = select_tasks(tasks, config.tasks)
    if not config.per_task or len(names) == 1:
        return []
    paths = []
    for path, linear, _ in _plan(model, config):
        _replace_module(model, path, TaskLinear.from_linear(linear, names))
        paths.append(path)
    return paths


def _plan(model: nn.Module, config: AdapterConfig) -> list[tuple[str, nn.Linear, list[tuple[int, int]] | None]]:
    """(path, linear, row slices or None for all rows) for every targeted Linear, checked before anything changes."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList | nn.Sequential):
        raise ValueError(f"{type(model).__name__} has no `blocks` ModuleList; adapters expect a ViT backbone")
    indices = range(len(blocks)) if config.layers is None else config.layers
    out_of_range = [i for i in indices if i >= len(blocks)]
    if out_of_range:
        raise ValueError(f"adapter layers {out_of_range} do not exist: the model has {len(blocks)} blocks")
    plan = []
    for index in indices:
        parts: dict[str, list[int | None]] = {}
        for target in config.targets:
            sub, part = TARGETS[target]
            parts.setdefault(sub, []).append(part)
        for sub, wanted in parts.items():
            path = f"blocks.{index}.{sub}"
            try:
                linear = model.get_submodule(path)
            except AttributeError as err:
                raise ValueError(f"adapter target {path} does not exist in {type(model).__name__}: {err}") from err
            if not isinstance(linear, nn.Linear | AdapterLinear):
                raise ValueError(f"adapter target {path} is a {type(linear).__name__}, not an nn.Linear")
            plan.append((path, linear, _qkv_slices(path, linear.out_features, wanted)))
    return plan


def _qkv_slices(path: str, out_features: int, parts: list[int | None]) -> list[tuple[int, int]] | None:
    if parts == [None]:
        return None
    if out_features % _QKV_PARTS:
        raise ValueError(f"{path} has {out_features} outputs, not a fused q/k/v projection (divisible by 3)")
    size = out_features // _QKV_PARTS
    return [(part * size, (part + 1) * size) for part in sorted(p for p in parts if p is not None)]


def _replace_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, module)
