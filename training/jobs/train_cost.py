"""Training cost of BDTA + MoTE against a LoRA baseline on the same frozen backbone: what `endostream bench train` runs.

The paper's efficiency claim (shared/papers/bdta-mote.md section 3.4, Table 2: ~30 % of the parameters, ~50 % of the
memory, ~60 % of the training time of LoRA-style multi-task PEFT such as MTLoRA) as a measurement on our backbones.
The baseline is the comparison the paper makes, and nothing else differs:
- LoRA on q and v of the same frozen ViT, inserted serially (gradients flow back through the backbone), one token
  stream: no TESLA task streams, whose second full backbone pass would mix stream cost into the comparison;
- heads of the same shape: the LoRA model's 384-wide tokens go through a 1x1 projection to BDTA's MoTE width (96 for
  ViT-S, r = 4) before heads identical to BDTA's; the projection counts as adaptation, like MoTE;
- the loss weighting of the shipped BDTA config (DB-MTL for `bdta_vits14`, with its per-task backward passes) for
  both models, through the trainer's own weighting code.
Parameters are reported as adaptation (trainable, heads excluded) and heads apart, so a ratio of trainable
parameters cannot come from the heads.

Figures per model:
- step time: interleaved AdamW steps (one of each model per round, so load from other processes hits both alike);
- peak memory of training: `peak_step_memory_mib`, what a step adds at its peak above the memory held before it
  (activations, gradients, optimiser state, allocator slack), and `peak_memory_mib`, that plus the model's weights
  and buffers. On CUDA both come from `torch.cuda.max_memory_allocated`. On CPU torch keeps no allocator
  statistics, so each model steps in a fresh child process (spawn) and the step figure is its peak resident set
  above the resident set just before the first step (Linux: the peak is reset through /proc/self/clear_refs and read
  from VmHWM); the interpreter and libraries, the same for both, are not counted;
- saved activations: the distinct tensors autograd keeps for backward, weights excluded (what section 3.4 is about).
"""

from __future__ import annotations

import copy
import logging
import multiprocessing
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from training.builders.backbones import build_backbone
from training.builders.registry import build_model
from training.config import ModelConfig, TrainConfig, load_config
from training.data.writer import synth_labels
from training.engine.supervised import split_parameters, task_losses
from training.engine.weighting import build_weighting
from training.models.heads import ProjectedHead

logger = logging.getLogger(__name__)

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def saved_activation_bytes(model: nn.Module, run: Callable[[], Any]) -> int:
    """Bytes of the distinct tensors autograd keeps for backward while `run()` executes, weights excluded."""
    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(seen.values())


def training_step(
    model: nn.Module, batch: dict[str, Tensor], train_cfg: TrainConfig | None = None
) -> Callable[[], None]:
    """One AdamW step of `model` on `batch` with the trainer's `task_losses` and loss weighting, as a closure.

    Args:
        train_cfg: its `weighting` (and DB-MTL beta / STCH settings) are used; None: equal weights.
    """

    train_cfg = train_cfg or TrainConfig(weighting="ew")
    weighting = build_weighting(
        train_cfg.weighting,
        model.tasks,
        beta=train_cfg.dbmtl_beta,
        mu=train_cfg.stch_mu,
        warmup_epochs=train_cfg.stch_warmup_epochs,
        task_weights=train_cfg.task_weights,
    )
    shared, params = split_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        losses = task_losses(model, model(batch["image"]), batch)
        optimizer.zero_grad(set_to_none=True)
        weighting.backward(losses, shared, epoch=0)
        optimizer.step()

    return step


def head_parameter_count(model: nn.Module) -> int:
    """Trainable parameters of the task heads proper (a `ProjectedHead`'s projection is adaptation, not head)."""
    total = 0
    for head in model.heads.values():
        inner = head.head if isinstance(head, ProjectedHead) else head
        total += sum(p.numel() for p in inner.parameters() if p.requires_grad)
    return total


def _timed(step: Callable[[], None], device: torch.device) -> float:
    started = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def _peak_cuda_mib(step: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """(peak allocated CUDA memory of one more step, the same above what was allocated before it), MiB."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return peak / 2**20, (peak - before) / 2**20


def _status_kib(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{_STATUS} has no {field} line")


def cpu_peak_supported() -> str | None:
    """None when the CPU peak can be measured here, else why not."""
    if not _STATUS.is_file() or not _CLEAR_REFS.exists():
        return "the CPU peak needs Linux /proc/self/status and /proc/self/clear_refs"
    return None


def _child_peak_mib(
    cfg: ModelConfig,
    tasks: list[dict[str, Any]],
    batch: dict[str, Tensor],
    seed: int,
    steps: int,
    threads: int,
    train_cfg: TrainConfig | None = None,
) -> float:
    """In a fresh process: build the model, then the peak resident set of `steps` training steps above the set before.

    Two steps at least: the first allocates gradients and optimiser state, the second runs with them in place.
    """

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = build_model(cfg, tasks, load_backbone_weights=False).train()
    step = training_step(model, batch, train_cfg)
    before = _status_kib("VmRSS")
    _CLEAR_REFS.write_text("5")  # resets VmHWM to the current resident set
    for _ in range(steps):
        step()
    return (_status_kib("VmHWM") - before) / 1024


def cpu_peak_step_mib(
    cfg: ModelConfig,
    tasks: list[dict[str, Any]],
    batch: dict[str, Tensor],
    *,
    seed: int = 0,
    steps: int = 2,
    train_cfg: TrainConfig | None = None,
) -> float:
    """Peak memory of training steps on CPU above the built model, measured in a fresh child process (see module)."""
    reason = cpu_peak_supported()
    if reason:
        raise RuntimeError(reason)
    context = multiprocessing.get_context("spawn")  # a clean heap: nothing freed by the other model is reused
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        future = pool.submit(
            _child_peak_mib, cfg, tasks, batch, seed, max(2, steps), torch.get_num_threads(), train_cfg
        )
        return future.result()


def bench_train_cost(
    *,
    bdta_config: str = "bdta_vits14",
    lora_config: str = "endoarss_vits14",
    overrides: Sequence[str] = (),
    batch_size: int = 8,
    steps: int = 3,
    warmup: int = 1,
    lora_sma: bool = False,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Training cost of BDTA + MoTE against the fair LoRA baseline (module docstring) on the same frozen backbone.

    Both models are built with random weights (nothing is read from disk); `overrides` (`key=value`, as on the
    command line) apply to both. The LoRA model takes the BDTA config's backbone, image size and heads (behind a
    projection to BDTA's head width), one token stream, and both train with the BDTA config's loss weighting. Each
    model runs `warmup` + `steps` AdamW steps on one random uint8 batch (the trainer's `task_losses`).

    Args:
        bdta_config: config name or path of the BDTA model.
        lora_config: config name or path of the LoRA model (family endoarss; its shared LoRA rank and targets are
            used, TESLA is switched off).
        overrides: `key=value` overrides for both configs (e.g. `model.image_size=[112, 112]`).
        batch_size: images per step.
        steps: timed steps (the median is reported).
        warmup: untimed steps before them.
        lora_sma: keep EndoARSS's SMA in the LoRA model (False compares the adapter topologies alone).
        device: "cpu" or a CUDA device.
        seed: seed of the weights and the batch.

    Returns:
        {"setup": ..., "bdta": figures, "lora": figures, "ratio": bdta / lora for each figure}; figures are
        trainable_params, adaptation_params (trainable, heads excluded), head_params, total_params, step_seconds
        (median), step_seconds_min, peak_memory_mib and peak_step_memory_mib (see the module docstring; absent where
        they cannot be measured) and saved_activation_mib.
    """

    bdta_full = load_config(bdta_config, list(overrides))
    train_cfg = bdta_full.train
    lora_model = load_config(lora_config, list(overrides)).model
    bdta_cfg, lora_cfg, head_width = _paired_configs(bdta_full.model, lora_model, lora_config)
    lora_cfg.sma.enabled = lora_sma
    tasks = synth_labels({}).to_dict()["tasks"]
    target = torch.device(device)
    batch = _random_batch(batch_size, tuple(bdta_cfg.image_size), seed)
    configs = {"bdta": bdta_cfg, "lora": lora_cfg}
    figures: dict[str, dict[str, Any]] = {}
    if target.type == "cpu":  # before this process builds anything: the children start from the same clean state
        if (reason := cpu_peak_supported()) is None:
            for name, cfg in configs.items():
                mib = cpu_peak_step_mib(cfg, tasks, batch, seed=seed, train_cfg=train_cfg)
                figures[name] = {"peak_step_memory_mib": mib}
                logger.info("bench %s: peak step memory %.1f MiB above the built model (child process)", name, mib)
        else:
            logger.warning("no peak memory figure: %s", reason)
    batch = {k: v.to(target) for k, v in batch.items()}
    steps_of, weight_mib = {}, {}
    for name, cfg in configs.items():
        torch.manual_seed(seed)
        model = build_model(cfg, tasks, load_backbone_weights=False).to(target).train()
        steps_of[name] = training_step(model, batch, train_cfg)
        weight_mib[name] = sum(t.nbytes for t in (*model.parameters(), *model.buffers())) / 2**20
        figures.setdefault(name, {}).update(_model_figures(model, batch))
    _time_steps(steps_of, figures, weight_mib, target, warmup=warmup, steps=steps)
    numeric = [k for k, v in figures["bdta"].items() if isinstance(v, int | float) and k in figures["lora"]]
    return {
        "setup": {
            "backbone": bdta_cfg.backbone.name,
            "backbone_overrides": dict(bdta_cfg.backbone.overrides),
            "image_size": list(bdta_cfg.image_size),
            "batch_size": batch_size,
            "steps": steps,
            "device": str(target),
            "threads": torch.get_num_threads(),
            "lora": {
                "shared_rank": lora_cfg.adapters.shared_rank,
                "task_rank": lora_cfg.adapters.task_rank,
                "targets": list(lora_cfg.adapters.targets),
            },
            "head_input_width": head_width,
            "weighting": train_cfg.weighting,
            "lora_sma": lora_cfg.sma.enabled,
            "peak_memory": "torch.cuda.max_memory_allocated" if target.type == "cuda" else "child-process VmHWM",
        },
        **figures,
        "ratio": {k: figures["bdta"][k] / figures["lora"][k] for k in numeric if figures["lora"][k]},
    }


def _paired_configs(
    bdta_cfg: ModelConfig, lora_cfg: ModelConfig, lora_name: str
) -> tuple[ModelConfig, ModelConfig, int]:
    """(BDTA config, the LoRA baseline on BDTA's backbone, image size and heads, the heads' input width)."""
    if bdta_cfg.family != "bdta" or lora_cfg.family != "endoarss":
        raise ValueError(f"compare a bdta config with an endoarss one, got {bdta_cfg.family} and {lora_cfg.family}")
    if lora_cfg.adapters.kind != "lora_tesla" or lora_cfg.adapters.shared_rank < 1:
        raise ValueError(f"{lora_name}: the baseline needs shared LoRA (adapters.shared_rank >= 1, kind lora_tesla)")
    embed_dim = build_backbone(bdta_cfg.backbone.name, None, **dict(bdta_cfg.backbone.overrides)).embed_dim
    head_width = bdta_cfg.bdta.mote_dim or embed_dim // bdta_cfg.bdta.reduction
    lora_cfg.backbone = copy.deepcopy(bdta_cfg.backbone)  # frozen, as the bdta builder requires
    lora_cfg.image_size, lora_cfg.heads = bdta_cfg.image_size, copy.deepcopy(bdta_cfg.heads)
    lora_cfg.heads.input_dim = head_width  # BDTA's heads read MoTE's head_width channels
    lora_cfg.adapters.task_rank = 0  # one stream: no TESLA second pass
    return bdta_cfg, lora_cfg, head_width


def _random_batch(batch_size: int, size: tuple[int, int], seed: int) -> dict[str, Tensor]:
    """One random uint8 batch with activity labels and masks of two classes."""
    height, width = size
    generator = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randint(0, 256, (batch_size, 3, height, width), dtype=torch.uint8, generator=generator),
        "activity": torch.randint(0, 2, (batch_size,), generator=generator),
        "mask": torch.randint(0, 2, (batch_size, height, width), generator=generator),
    }


def _model_figures(model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Any]:
    """Parameter counts and the activations one forward saves for backward."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    heads = head_parameter_count(model)
    saved = saved_activation_bytes(model, lambda m=model: task_losses(m, m(batch["image"]), batch))
    return {
        "trainable_params": trainable,
        "adaptation_params": trainable - heads,  # BDTA + MoTE, or LoRA + the projection to the head width
        "head_params": heads,
        "total_params": sum(p.numel() for p in model.parameters()),
        "saved_activation_mib": saved / 2**20,
    }


def _time_steps(
    steps_of: dict[str, Callable[[], None]],
    figures: dict[str, dict[str, Any]],
    weight_mib: dict[str, float],
    target: torch.device,
    *,
    warmup: int,
    steps: int,
) -> None:
    """Run `warmup` untimed then `steps` timed steps of each model, interleaved; add times and peaks to `figures`."""
    for _ in range(warmup):
        for step in steps_of.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps_of}
    for _ in range(steps):
        for name, step in steps_of.items():
            times[name].append(_timed(step, target))
    for name, step in steps_of.items():
        figures[name]["step_seconds"] = statistics.median(times[name])
        figures[name]["step_seconds_min"] = min(times[name])
        figures[name]["step_seconds_all"] = [round(t, 4) for t in times[name]]
        if target.type == "cuda":
            figures[name]["peak_memory_mib"], figures[name]["peak_step_memory_mib"] = _peak_cuda_mib(step, target)
        elif "peak_step_memory_mib" in figures[name]:
            figures[name]["peak_memory_mib"] = figures[name]["peak_step_memory_mib"] + weight_mib[name]
        logger.info("bench %s: %s", name, {k: v for k, v in figures[name].items() if k != "step_seconds_all"})
