"""Build the BDTA + MoTE family (`model.family: bdta`) from a typed config, and measure its training cost.

`build` is registered in `training.factory.FAMILIES`. `bench_bdta_memory` is the paper's efficiency claim (section
3.4, Table 2: ~30 % of the parameters, ~50 % of the memory, ~60 % of the training time of LoRA-style multi-task
PEFT) as a measurement on our backbones: the same frozen ViT, batch and heads, once with the BDTA bypass and once
with EndoARSS's shared LoRA + TESLA adapters inside the backbone.
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from training.backbones import build_backbone
from training.config import ModelConfig, load_config
from training.factory import build_task_heads, check_image_size
from training.layers.bdta import BDTA
from training.layers.mote import MoTE
from training.models.bdta import BDTAMoTE, evenly_spaced_blocks

logger = logging.getLogger(__name__)


def build(
    cfg: ModelConfig,
    tasks: Sequence[dict[str, Any]],
    *,
    load_backbone_weights: bool = True,
    merged: bool = False,
) -> BDTAMoTE:
    """BDTA + MoTE (paper): frozen ViT + BDTA bypass at `cfg.bdta` stages + MoTE + ASPP / activity heads.

    Args:
        cfg: model section; `cfg.bdta` sets the bypass branch, `cfg.heads` the heads.
        tasks: dicts with `name`, `kind` and `classes` (labels.json).
        load_backbone_weights: read the backbone checkpoint named by the config (False when a full checkpoint follows).
        merged: accepted for the `FAMILIES` signature; this family has no adapter factors to fold, so its merged
            and unmerged checkpoints hold the same architecture.
    """
    del merged  # same architecture either way
    if not cfg.backbone.freeze:
        raise ValueError(
            "model.family bdta keeps the backbone frozen (the main branch runs without gradients); "
            "set model.backbone.freeze=true"
        )
    if cfg.sma.enabled or cfg.adapters.shared_rank or cfg.adapters.task_rank:
        raise ValueError(
            "model.family bdta has no SMA and no backbone adapters (its adaptation is the bypass branch): set "
            "model.sma.enabled=false model.adapters.shared_rank=0 model.adapters.task_rank=0"
        )
    section = cfg.bdta
    checkpoint = cfg.backbone.checkpoint if load_backbone_weights else None
    backbone = build_backbone(cfg.backbone.name, checkpoint, **dict(cfg.backbone.overrides))
    height, width = check_image_size(cfg, backbone.patch_size)
    patch = backbone.patch_size
    blocks = (
        tuple(section.blocks)
        if section.blocks is not None
        else evenly_spaced_blocks(len(backbone.blocks), section.stages)
    )
    names = [t["name"] for t in tasks]
    dim = backbone.embed_dim
    if dim % section.reduction:
        raise ValueError(f"model.bdta.reduction {section.reduction} must divide the backbone width {dim}")
    stages = nn.ModuleList(
        BDTA(
            dim,
            names,
            reduction=section.reduction,
            num_heads=section.num_heads,
            ffn_ratio=section.ffn_ratio,
            bottleneck_ratio=section.bottleneck_ratio,
        )
        for _ in blocks
    )
    mote_dim = section.mote_dim or dim // section.reduction
    mote = MoTE(
        [dim] * len(blocks),
        mote_dim,
        names,
        router_hidden_dim=max(1, round(dim * section.router_ratio)),
        noisy_gating=section.noisy_gating,
    )
    grid = (height // patch, width // patch)
    heads = build_task_heads(cfg, tasks, mote_dim, grid)
    return BDTAMoTE(
        backbone=backbone,
        stages=stages,
        mote=mote,
        heads=heads,
        task_kinds={t["name"]: t["kind"] for t in tasks},
        blocks=blocks,
        pixel_mean=tuple(cfg.pixel_mean),
        pixel_std=tuple(cfg.pixel_std),
    )


# ---------------------------------------------------------------------------------------------------- measurement


def _saved_activation_bytes(model: nn.Module, run: Any) -> int:
    """Bytes of the distinct tensors autograd keeps for backward while `run()` executes, weights excluded.

    This is the activation memory the paper's section 3.4 is about (a CPU stand-in for the peak GPU memory of a
    training step, whose other parts — weights, gradients, optimiser state — are counted by the parameter figures).
    """
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


def _training_step(model: nn.Module, batch: dict[str, Tensor]) -> Callable[[], None]:
    """One AdamW step of `model` on `batch` with equal-weight task losses, as a closure."""
    from training.trainer import task_losses  # the trainer imports the factory, which lazily imports this module

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        losses = task_losses(model, model(batch["image"]), batch)
        optimizer.zero_grad(set_to_none=True)
        torch.stack(list(losses.values())).sum().backward()
        optimizer.step()

    return step


def _timed(step: Callable[[], None], device: torch.device) -> float:
    started = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def _peak_cuda_mib(step: Callable[[], None], device: torch.device) -> float:
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def bench_bdta_memory(
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
    """Training cost of BDTA + MoTE against EndoARSS's LoRA + TESLA on the same frozen backbone, batch and heads.

    Both models are built with random weights (nothing is read from disk); `overrides` (`key=value`, as on the
    command line) apply to both, and the LoRA model takes the BDTA config's backbone, image size and heads so only
    the adaptation differs. Each model runs `warmup` + `steps` AdamW steps on one random uint8 batch (equal-weight
    cross-entropy, the trainer's `task_losses`).

    Args:
        bdta_config: config name or path of the BDTA model.
        lora_config: config name or path of the LoRA model (family endoarss).
        overrides: `key=value` overrides for both configs (e.g. `model.image_size=[112, 112]`).
        batch_size: images per step.
        steps: timed steps (the median is reported).
        warmup: untimed steps before them.
        lora_sma: keep EndoARSS's SMA in the LoRA model (False compares the adapter topologies alone).
        device: "cpu" or a CUDA device (adds peak allocated memory).
        seed: seed of the weights and the batch.

    Returns:
        {"setup": ..., "bdta": figures, "lora": figures, "ratio": bdta / lora for each figure}; figures are
        trainable_params, adaptation_params (trainable minus heads), total_params, step_seconds (median),
        step_seconds_min, saved_activation_mib (tensors kept for backward, weights excluded) and, on CUDA,
        peak_memory_mib.
    """
    from training.data.writer import synth_labels
    from training.factory import build_model
    from training.trainer import task_losses

    bdta_cfg = load_config(bdta_config, list(overrides)).model
    lora_cfg = load_config(lora_config, list(overrides)).model
    if bdta_cfg.family != "bdta" or lora_cfg.family != "endoarss":
        raise ValueError(f"compare a bdta config with an endoarss one, got {bdta_cfg.family} and {lora_cfg.family}")
    lora_cfg.backbone = copy.deepcopy(bdta_cfg.backbone)  # frozen, as the bdta builder requires
    lora_cfg.image_size, lora_cfg.heads = bdta_cfg.image_size, copy.deepcopy(bdta_cfg.heads)
    lora_cfg.sma.enabled = lora_sma
    tasks = synth_labels({}).to_dict()["tasks"]
    target = torch.device(device)
    height, width = bdta_cfg.image_size
    generator = torch.Generator().manual_seed(seed)
    batch = {
        "image": torch.randint(0, 256, (batch_size, 3, height, width), dtype=torch.uint8, generator=generator),
        "activity": torch.randint(0, 2, (batch_size,), generator=generator),
        "mask": torch.randint(0, 2, (batch_size, height, width), generator=generator),
    }
    batch = {k: v.to(target) for k, v in batch.items()}
    models, steps_of, figures = {}, {}, {}
    for name, cfg in (("bdta", bdta_cfg), ("lora", lora_cfg)):
        torch.manual_seed(seed)
        models[name] = model = build_model(cfg, tasks, load_backbone_weights=False).to(target).train()
        steps_of[name] = _training_step(model, batch)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        heads = sum(p.numel() for p in model.heads.parameters() if p.requires_grad)
        saved = _saved_activation_bytes(model, lambda m=model: task_losses(m, m(batch["image"]), batch))
        figures[name] = {
            "trainable_params": trainable,
            "adaptation_params": trainable - heads,  # trainable, heads excluded (BDTA + MoTE, or LoRA + TESLA)
            "total_params": sum(p.numel() for p in model.parameters()),
            "saved_activation_mib": saved / 2**20,
        }
    for _ in range(warmup):
        for step in steps_of.values():
            step()
    # Interleaved (one step of each model per round), so load from other processes hits both alike.
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(steps):
        for name, step in steps_of.items():
            times[name].append(_timed(step, target))
    for name, step in steps_of.items():
        figures[name]["step_seconds"] = statistics.median(times[name])
        figures[name]["step_seconds_min"] = min(times[name])
        figures[name]["step_seconds_all"] = [round(t, 4) for t in times[name]]
        if target.type == "cuda":
            figures[name]["peak_memory_mib"] = _peak_cuda_mib(step, target)
        logger.info("bench %s: %s", name, {k: v for k, v in figures[name].items() if k != "step_seconds_all"})
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
            "lora": {"shared_rank": lora_cfg.adapters.shared_rank, "task_rank": lora_cfg.adapters.task_rank},
            "lora_sma": lora_sma,
        },
        **figures,
        "ratio": {k: figures["bdta"][k] / figures["lora"][k] for k in numeric if figures["lora"][k]},
    }
