"""Build the mSAM family (`model.family: msam`) from a typed config (registered in `registry.FAMILIES`).

mSAM (shared/papers/ta-lora-sam.md §3.3; shared/MODEL_NOTES.md §3): a SAM image encoder (frozen, adapters from
`model.adapters` on its qkv, TA-LoRA in the shipped configs, LayerNorms trainable with `tune_layernorm`), the prompt
encoder removed, and per task C_t no-mask rows + a copy of SAM's mask decoder (`training.models.msam`).

Weights: the encoder from `model.backbone.checkpoint` (`training.build_backbone`); every decoder copy, the grid
position encoding and the no-mask rows from `model.msam.decoder_checkpoint`, or, when that is unset, from the backbone
checkpoint if it is a whole SAM (official `sam_vit_*.pth` or a Hugging Face `SamModel` folder). Each no-mask row
starts as SAM's single no-mask embedding plus N(0, `no_mask_noise`) so the rows of a task differ; without a SAM
decoder everything is randomly initialised (the tiny CPU config).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from training.adapters.tuner import mark_only_adapters_trainable, unfreeze_layer_norms
from training.builders.shared import attach_adapters, build_configured_backbone, check_image_size
from training.config import ModelConfig
from training.models.msam import MSAM, SINGLE_MASK
from training.models.sam_decoder import DensePositionEncoding, SamMaskDecoder
from training.models.sam_encoder import SamImageEncoder
from training.weights import load_checked
from training.weights.sam_decoder import DecoderCheckpoint, load_sam_decoder_weights

logger = logging.getLogger(__name__)

# Decoder fields a checkpoint's tensors fix (a mismatch with the config is an error); num_heads only when recorded.
_SHAPE_FIELDS = (
    "transformer_dim",
    "depth",
    "mlp_dim",
    "attention_downsample_rate",
    "num_multimask_outputs",
    "iou_head_depth",
    "iou_head_hidden_dim",
    "num_heads",
)


def build(
    cfg: ModelConfig,
    tasks: Sequence[dict[str, Any]],
    *,
    load_backbone_weights: bool = True,
    merged: bool = False,
) -> MSAM:
    """mSAM (paper): SAM encoder + adapters on qkv (per-task streams) + per-task no-mask rows and mask decoders.

    Args:
        cfg: model section; `cfg.msam` sets the decoders, `cfg.adapters` the encoder adapters.
        tasks: dicts with `name`, `kind` and `classes` (labels.json).
        load_backbone_weights: read the encoder and decoder checkpoints named by the config (False when a full
            checkpoint follows).
        merged: build the adapter-free merged form (per-task stacked qkv weights) that merged checkpoints hold.
    """
    if cfg.sma.enabled:
        raise ValueError("model.family msam has no SMA (SAM sees the normalised image): set model.sma.enabled=false")
    backbone = build_configured_backbone(cfg.backbone, load_weights=load_backbone_weights, frozen=cfg.backbone.freeze)
    if not isinstance(backbone, SamImageEncoder):
        raise ValueError(
            f"model.family msam needs a SAM image encoder (sam_vitb, sam_vitl, sam_vith, sam_tiny); "
            f"model.backbone.name {cfg.backbone.name!r} builds a {type(backbone).__name__}"
        )
    height, width = check_image_size(cfg, backbone.patch_size)
    names = [t["name"] for t in tasks]
    adapters, per_task_streams = attach_adapters(backbone, cfg, names, merged=merged)
    if cfg.backbone.freeze and not merged:
        mark_only_adapters_trainable(backbone)  # LayerNorms stay trainable when adapters.tune_layernorm
        if adapters is None and cfg.adapters.tune_layernorm:
            unfreeze_layer_norms(backbone)

    loaded = _read_decoder(cfg, load_backbone_weights)
    kwargs = decoder_kwargs(cfg, backbone.out_chans, loaded)
    decoders = nn.ModuleDict()
    no_mask_embed = nn.ParameterDict()
    classifiers = nn.ModuleDict()
    section = cfg.msam
    channels = backbone.out_chans
    for task in tasks:
        name, kind, count = task["name"], task["kind"], len(task["classes"])
        decoder = SamMaskDecoder(**kwargs)
        if loaded is not None:
            load_checked(decoder, loaded.state_dict, loaded.path)
        _freeze_unused(decoder, kind)
        decoders[name] = decoder
        if loaded is not None and loaded.no_mask_embed is not None:
            rows = loaded.no_mask_embed.reshape(1, channels).float().expand(count, channels)
            rows = rows + section.no_mask_noise * torch.randn(count, channels)
        else:
            rows = torch.randn(count, channels)  # nn.Embedding's N(0, 1), SAM's init of its no-mask embedding
        no_mask_embed[name] = nn.Parameter(rows)
        if kind == "classification":
            classifiers[name] = nn.Linear(2 * channels * count, count)  # IoU + single-mask token of each row
    pe_layer = DensePositionEncoding(channels // 2)
    if loaded is not None and loaded.positional_encoding is not None:
        load_checked(pe_layer, {"positional_encoding_gaussian_matrix": loaded.positional_encoding}, loaded.path)
    return MSAM(
        backbone=backbone,
        decoders=decoders,
        no_mask_embed=no_mask_embed,
        classifiers=classifiers,
        task_kinds={t["name"]: t["kind"] for t in tasks},
        pe_layer=pe_layer,
        per_task_streams=per_task_streams,
        classifier_dropout=section.classifier_dropout,
        pixel_mean=tuple(cfg.pixel_mean),
        pixel_std=tuple(cfg.pixel_std),
    )


def _read_decoder(cfg: ModelConfig, load_weights: bool) -> DecoderCheckpoint | None:
    """The SAM decoder to start from: `msam.decoder_checkpoint`, else the backbone checkpoint if it holds one."""
    if not load_weights:
        return None
    if cfg.msam.decoder_checkpoint is not None:
        return load_sam_decoder_weights(cfg.msam.decoder_checkpoint)
    if cfg.backbone.checkpoint is None:
        return None
    loaded = load_sam_decoder_weights(cfg.backbone.checkpoint, required=False)
    if loaded is None:
        logger.warning(
            "%s has no SAM mask decoder: the mSAM decoders start from random weights "
            "(set model.msam.decoder_checkpoint to a whole-SAM checkpoint to start from SAM's)",
            cfg.backbone.checkpoint,
        )
    return loaded


def decoder_kwargs(cfg: ModelConfig, transformer_dim: int, loaded: DecoderCheckpoint | None = None) -> dict[str, Any]:
    """SamMaskDecoder kwargs of `cfg.msam` at the encoder width, checked against a checkpoint's architecture.

    Raises:
        ValueError: the checkpoint's decoder has another shape than the config describes (names the override).
    """
    section = cfg.msam
    kwargs: dict[str, Any] = {
        "transformer_dim": transformer_dim,
        "depth": section.depth,
        "num_heads": section.num_heads,
        "mlp_dim": section.mlp_dim,
        "attention_downsample_rate": section.attention_downsample_rate,
        "num_multimask_outputs": section.num_multimask_outputs,
        "iou_head_depth": section.iou_head_depth,
        "iou_head_hidden_dim": section.iou_head_hidden_dim,
        "layer_norm_eps": section.layer_norm_eps,
    }
    if loaded is None:
        return kwargs
    differ = {k: loaded.arch[k] for k in _SHAPE_FIELDS if k in loaded.arch and loaded.arch[k] != kwargs[k]}
    if "transformer_dim" in differ:
        raise ValueError(
            f"{loaded.path}: the mask decoder is {differ['transformer_dim']} wide but the encoder outputs "
            f"{transformer_dim} channels; use the encoder of the same SAM checkpoint"
        )
    if differ:
        fixes = " ".join(f"model.msam.{key}={value}" for key, value in differ.items())
        raise ValueError(f"{loaded.path}: its mask decoder differs from model.msam ({differ}); set {fixes}")
    eps = loaded.arch.get("layer_norm_eps")
    if eps is not None and eps != section.layer_norm_eps:
        logger.info(
            "%s was built with decoder LayerNorm eps %g; using model.msam.layer_norm_eps=%g",
            loaded.path,
            eps,
            section.layer_norm_eps,
        )
    return kwargs


def _freeze_unused(decoder: SamMaskDecoder, kind: str) -> None:
    """Freeze the decoder parts a task never uses (kept for SAM's layout), so they get neither updates nor decay.

    Segmentation uses the single-mask output only: the other hypernetworks and the IoU head are unused.
    Classification pools the transformer's tokens: upscaling, hypernetworks and IoU head are unused.
    """
    decoder.iou_prediction_head.requires_grad_(False)
    for index, mlp in enumerate(decoder.output_hypernetworks_mlps):
        mlp.requires_grad_(kind == "segmentation" and index == SINGLE_MASK)
    if kind == "classification":
        decoder.output_upscaling.requires_grad_(False)
