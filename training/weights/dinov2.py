"""Reading DINOv2 checkpoints and converting them to the `training.models.vit.VisionTransformer` layout.

Sources (detected from keys only each one has):

* ``dinov2``: original DINOv2 / our own layout (`cls_token`, `pos_embed`, `patch_embed.proj.*`, `blocks.N.*`,
  possibly chunked `blocks.C.N.*`, possibly wrapped in `model` / `state_dict` / `teacher` and prefixed by `backbone.`).
  The architecture is inferred from tensor shapes (`infer_arch`).
* ``hf_dinov2``: a Hugging Face `Dinov2Model` / `Dinov2WithRegistersModel` directory (`config.json` +
  `model.safetensors`, a sharded `model.safetensors.index.json`, or `pytorch_model.bin`). The architecture comes from
  config.json (`arch_from_hf_config`). Both the hub key layout (`attention.attention.query`, `mlp.weights_in`) and the
  module names of transformers >= 5 (`attention.q_proj`, `mlp.gate_proj`) are accepted.

Each source is reproduced exactly, including its position-embedding interpolation convention (original DINOv2:
scale-factor offset 0.1 without registers, size-based + antialias with registers, as dinov2 `hub/backbones.py` builds
them; Hugging Face: size-based, antialiased only with registers, as transformers 5.23 `modeling_dinov2*.py` does).

Pattern: timm `vision_transformer.py` `checkpoint_filter_fn` / `_convert_dinov2`; key maps kept as data with `{}` for
the layer number and mirrored by the to-functions, after torchtitan `state_dict_adapter.py`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from training.layers.pos_embed import resample_pos_embed
from training.models.vit import VisionTransformer, remap_legacy_keys
from training.weights._io import BackboneCheckpoint, Sources, load_backbone, resample_patch_kernel
from training.weights._keys import Part, block_depth, convert_keys, mirror_keys, square_patch

logger = logging.getLogger(__name__)

Source = Literal["dinov2", "hf_dinov2"]

# Key (without prefix) that identifies each source.
SOURCE_MARKERS: dict[Source, str] = {
    "hf_dinov2": "embeddings.patch_embeddings.projection.weight",
    "dinov2": "patch_embed.proj.weight",
}
# A DINOv2 training checkpoint holds a student and a teacher: the teacher is the model DINOv2 evaluates and releases.
SOURCES = Sources("DINOv2 backbone", SOURCE_MARKERS, hf_source="hf_dinov2", prefer="teacher")


# Hugging Face hub layout -> ours. `{}` is the layer number; None = dropped (pre-training only).
FROM_HF_MAP: dict[str, str | Part | None] = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": None,
    "embeddings.register_tokens": "register_tokens",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "encoder.layer.{}.norm1.weight": "blocks.{}.norm1.weight",
    "encoder.layer.{}.norm1.bias": "blocks.{}.norm1.bias",
    "encoder.layer.{}.attention.attention.query.weight": Part("blocks.{}.attn.qkv.weight", 0, 3),
    "encoder.layer.{}.attention.attention.key.weight": Part("blocks.{}.attn.qkv.weight", 1, 3),
    "encoder.layer.{}.attention.attention.value.weight": Part("blocks.{}.attn.qkv.weight", 2, 3),
    "encoder.layer.{}.attention.attention.query.bias": Part("blocks.{}.attn.qkv.bias", 0, 3),
    "encoder.layer.{}.attention.attention.key.bias": Part("blocks.{}.attn.qkv.bias", 1, 3),
    "encoder.layer.{}.attention.attention.value.bias": Part("blocks.{}.attn.qkv.bias", 2, 3),
    "encoder.layer.{}.attention.output.dense.weight": "blocks.{}.attn.proj.weight",
    "encoder.layer.{}.attention.output.dense.bias": "blocks.{}.attn.proj.bias",
    "encoder.layer.{}.layer_scale1.lambda1": "blocks.{}.ls1.gamma",
    "encoder.layer.{}.norm2.weight": "blocks.{}.norm2.weight",
    "encoder.layer.{}.norm2.bias": "blocks.{}.norm2.bias",
    "encoder.layer.{}.mlp.fc1.weight": "blocks.{}.mlp.fc1.weight",
    "encoder.layer.{}.mlp.fc1.bias": "blocks.{}.mlp.fc1.bias",
    "encoder.layer.{}.mlp.fc2.weight": "blocks.{}.mlp.fc2.weight",
    "encoder.layer.{}.mlp.fc2.bias": "blocks.{}.mlp.fc2.bias",
    "encoder.layer.{}.mlp.weights_in.weight": "blocks.{}.mlp.w12.weight",
    "encoder.layer.{}.mlp.weights_in.bias": "blocks.{}.mlp.w12.bias",
    "encoder.layer.{}.mlp.weights_out.weight": "blocks.{}.mlp.w3.weight",
    "encoder.layer.{}.mlp.weights_out.bias": "blocks.{}.mlp.w3.bias",
    "encoder.layer.{}.layer_scale2.lambda1": "blocks.{}.ls2.gamma",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}

# Module names of transformers >= 5 (`Dinov2Model().state_dict()`); files written by save_pretrained use the hub
# layout above. Load-only: the mirror writes the hub layout.
FROM_HF_V5_ALIASES: dict[str, str | Part | None] = {
    "encoder.layer.{}.attention.q_proj.weight": Part("blocks.{}.attn.qkv.weight", 0, 3),
    "encoder.layer.{}.attention.k_proj.weight": Part("blocks.{}.attn.qkv.weight", 1, 3),
    "encoder.layer.{}.attention.v_proj.weight": Part("blocks.{}.attn.qkv.weight", 2, 3),
    "encoder.layer.{}.attention.q_proj.bias": Part("blocks.{}.attn.qkv.bias", 0, 3),
    "encoder.layer.{}.attention.k_proj.bias": Part("blocks.{}.attn.qkv.bias", 1, 3),
    "encoder.layer.{}.attention.v_proj.bias": Part("blocks.{}.attn.qkv.bias", 2, 3),
    "encoder.layer.{}.attention.o_proj.weight": "blocks.{}.attn.proj.weight",
    "encoder.layer.{}.attention.o_proj.bias": "blocks.{}.attn.proj.bias",
    "encoder.layer.{}.mlp.gate_proj.weight": Part("blocks.{}.mlp.w12.weight", 0, 2),
    "encoder.layer.{}.mlp.up_proj.weight": Part("blocks.{}.mlp.w12.weight", 1, 2),
    "encoder.layer.{}.mlp.gate_proj.bias": Part("blocks.{}.mlp.w12.bias", 0, 2),
    "encoder.layer.{}.mlp.up_proj.bias": Part("blocks.{}.mlp.w12.bias", 1, 2),
    "encoder.layer.{}.mlp.down_proj.weight": "blocks.{}.mlp.w3.weight",
    "encoder.layer.{}.mlp.down_proj.bias": "blocks.{}.mlp.w3.bias",
}

# Defaults of Dinov2Config / Dinov2WithRegistersConfig (transformers 5.23) for fields a config.json may omit.
HF_CONFIG_DEFAULTS: dict[str, dict[str, Any]] = {
    "dinov2": {"patch_size": 14, "num_register_tokens": 0},
    "dinov2_with_registers": {"patch_size": 16, "num_register_tokens": 4},
}
HF_COMMON_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "mlp_ratio": 4,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-6,
    "image_size": 224,
    "num_channels": 3,
    "qkv_bias": True,
    "layerscale_value": 1.0,
    "use_swiglu_ffn": False,
}

# ---------------------------------------------------------------------------------------------------------------
# Source -> ours


def _convert_hf_dinov2(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face DINOv2 keys (hub or transformers >= 5 names) -> our layout; q/k/v and gate/value are fused."""
    return convert_keys(state_dict, {**FROM_HF_MAP, **FROM_HF_V5_ALIASES}, "Hugging Face DINOv2 checkpoint")


def _convert_dinov2_original(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Original DINOv2 keys -> our layout: unchunk `blocks.C.N.*`, drop the pre-training mask token."""
    out = dict(state_dict)
    remap_legacy_keys(out)
    return out


_CONVERTERS = {"hf_dinov2": _convert_hf_dinov2, "dinov2": _convert_dinov2_original}


def detect_source(state_dict: Mapping[str, Any]) -> tuple[Source, str]:
    """Source and key prefix (e.g. 'backbone.', 'dinov2.', '') of the backbone tensors in `state_dict`.

    When several prefixes hold a backbone (a DINOv2 training checkpoint has a student and a teacher), the teacher is
    taken: it is the model DINOv2 evaluates and releases.
    """
    return SOURCES.detect(state_dict)  # type: ignore[return-value]


def checkpoint_filter_fn(checkpoint: Mapping[str, Any], model: VisionTransformer | None = None) -> dict[str, Tensor]:
    """Convert any supported checkpoint to our layout, optionally resampled to `model`'s embeddings.

    Unwraps training checkpoints, detects the source, keeps the backbone's keys without prefix and converts them;
    with `model`, resamples the position embedding (with the model's interpolation convention) and the patch
    embedding kernel (FlexiViT pseudo-inverse) where their shapes differ. Idempotent on our layout.

    Args:
        checkpoint: a state dict or a training checkpoint that wraps one.
        model: the model the result will be loaded into.
    """
    source, tensors = SOURCES.extract(checkpoint)
    out = _CONVERTERS[source](tensors)
    if model is None:
        return out
    pos_embed = out.get("pos_embed")
    if pos_embed is not None and pos_embed.shape != model.pos_embed.shape:
        logger.info("resampling pos_embed %s -> %s", tuple(pos_embed.shape), tuple(model.pos_embed.shape))
        out["pos_embed"] = resample_pos_embed(
            pos_embed,
            model.pos_grid,
            num_prefix_tokens=1,
            interpolate_offset=model.interpolate_offset,
            antialias=model.interpolate_antialias,
        )
    resample_patch_kernel(out, model.patch_size)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Ours -> source (mirrors; used to write checkpoints for other tools and to fabricate test checkpoints)


def to_hf_dinov2(state_dict: Mapping[str, Tensor], *, mask_token: bool = True) -> dict[str, Tensor]:
    """Our layout -> Hugging Face hub layout (what `save_pretrained` writes); fused tensors are split.

    Args:
        state_dict: weights in our layout.
        mask_token: add a zero `embeddings.mask_token` (Dinov2Model with `use_mask_token`, and every
            Dinov2WithRegistersModel, expects one).
    """
    out = mirror_keys(state_dict, FROM_HF_MAP, "Hugging Face DINOv2")
    if mask_token:
        out["embeddings.mask_token"] = torch.zeros_like(state_dict["cls_token"]).reshape(1, -1)
    return out


def to_dinov2_original(
    state_dict: Mapping[str, Tensor], *, block_chunks: int = 0, mask_token: bool = True
) -> dict[str, Tensor]:
    """Our layout -> original DINOv2 layout (`dinov2_vit*14_pretrain.pth`).

    Args:
        state_dict: weights in our layout.
        block_chunks: write `blocks.C.N.*` keys as dinov2 does with `block_chunks > 0` (N stays global).
        mask_token: add a zero `mask_token` (1 D), present in every released DINOv2 checkpoint.
    """
    out: dict[str, Tensor] = {}
    depth = 1 + max((int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.")), default=-1)
    chunk_size = math.ceil(depth / block_chunks) if block_chunks else 0
    for key, tensor in state_dict.items():
        if block_chunks and key.startswith("blocks."):
            _, number, rest = key.split(".", 2)
            key = f"blocks.{int(number) // chunk_size}.{number}.{rest}"
        out[key] = tensor
    if mask_token:
        out["mask_token"] = torch.zeros_like(state_dict["cls_token"]).reshape(1, -1)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Architecture


def infer_arch(state_dict: Mapping[str, Tensor], path: Path | str = "checkpoint") -> dict[str, Any]:
    """VisionTransformer kwargs from tensor shapes of a state dict in our layout.

    The head count is not stored in the weights: it is guessed as embed_dim // 64, the head width of every DINOv2
    size (`build_backbone` keeps the named variant's count when the width matches, and `num_heads=` overrides it).
    The interpolation convention is the one dinov2 `hub/backbones.py` uses: offset 0.1 without registers,
    size-based + antialias with registers.
    """
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        if key not in state_dict:
            raise ValueError(f"not a DINOv2 backbone state dict: {key!r} is missing")
    embed_dim = state_dict["cls_token"].shape[-1]
    depth = block_depth(state_dict, path)
    patch = square_patch(state_dict, path)  # D C p p
    patch_size = patch.shape[-1]
    num_grid = state_dict["pos_embed"].shape[1] - 1
    side = math.isqrt(num_grid)
    if side * side != num_grid:
        raise ValueError(f"pos_embed has {num_grid} patch positions, not a square grid")
    num_register_tokens = state_dict["register_tokens"].shape[1] if "register_tokens" in state_dict else 0
    if "blocks.0.mlp.w12.weight" in state_dict:  # SwiGLU: w12 holds gate and value rows
        ffn_layer, ffn_in = "swiglu", "blocks.0.mlp.w12"
        hidden = state_dict[f"{ffn_in}.weight"].shape[0] // 2
    elif "blocks.0.mlp.fc1.weight" in state_dict:
        ffn_layer, ffn_in = "mlp", "blocks.0.mlp.fc1"
        hidden = state_dict[f"{ffn_in}.weight"].shape[0]
    else:
        raise ValueError("blocks.0.mlp has neither fc1 (MLP) nor w12 (SwiGLU) weights")
    arch: dict[str, Any] = {
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": max(embed_dim // 64, 1),
        "patch_size": patch_size,
        "in_chans": patch.shape[1],
        "img_size": side * patch_size,
        "num_register_tokens": num_register_tokens,
        "ffn_layer": ffn_layer,
        "mlp_hidden_dim": hidden,
        "qkv_bias": "blocks.0.attn.qkv.bias" in state_dict,
        "proj_bias": "blocks.0.attn.proj.bias" in state_dict,
        "ffn_bias": f"{ffn_in}.bias" in state_dict,
        "interpolate_offset": 0.0 if num_register_tokens else 0.1,
        "interpolate_antialias": bool(num_register_tokens),
    }
    if "blocks.0.ls1.gamma" not in state_dict:
        arch["init_values"] = None
    return arch


def arch_from_hf_config(config: Mapping[str, Any], path: Path | str = "config.json") -> dict[str, Any]:
    """VisionTransformer kwargs from a Dinov2Config / Dinov2WithRegistersConfig dict (config.json)."""
    model_type = config.get("model_type")
    if model_type not in HF_CONFIG_DEFAULTS:
        supported = list(HF_CONFIG_DEFAULTS)
        raise ValueError(f"{path}: model_type {model_type!r} is not supported; expected one of {supported}")
    cfg = {**HF_COMMON_DEFAULTS, **HF_CONFIG_DEFAULTS[model_type], **config}
    if cfg["hidden_act"] != "gelu":
        raise ValueError(f"{path}: hidden_act {cfg['hidden_act']!r} is not supported; DINOv2 uses 'gelu'")
    patch = cfg["patch_size"]
    patch_h, patch_w = (patch, patch) if isinstance(patch, int) else patch
    if patch_h != patch_w:
        raise ValueError(f"{path}: patch_size {patch} is not square")
    image = cfg["image_size"]
    image_size = image if isinstance(image, int) else (int(image[0]), int(image[1]))
    registers = int(cfg["num_register_tokens"]) if model_type == "dinov2_with_registers" else 0
    return {
        "embed_dim": int(cfg["hidden_size"]),
        "depth": int(cfg["num_hidden_layers"]),
        "num_heads": int(cfg["num_attention_heads"]),
        "mlp_ratio": float(cfg["mlp_ratio"]),
        "ffn_layer": "swiglu" if cfg["use_swiglu_ffn"] else "mlp",
        "patch_size": int(patch_h),
        "in_chans": int(cfg["num_channels"]),
        "img_size": image_size,
        "qkv_bias": bool(cfg["qkv_bias"]),
        "init_values": float(cfg["layerscale_value"]),
        "layer_norm_eps": float(cfg["layer_norm_eps"]),
        "num_register_tokens": registers,
        "interpolate_offset": 0.0,
        "interpolate_antialias": model_type == "dinov2_with_registers",
    }


# ---------------------------------------------------------------------------------------------------------------
# Files


def load_backbone_weights(path: str | Path) -> BackboneCheckpoint:
    """Read a DINOv2 checkpoint file or Hugging Face directory and convert it to our layout.

    Args:
        path: an original DINOv2 / our-layout `.pth`, `.pt`, `.bin` or `.safetensors` file, or a Hugging Face
            model directory.

    Returns:
        converted state dict, VisionTransformer kwargs of its architecture, source name and the weight file read.
    """
    return load_backbone(
        path,
        SOURCES,
        label="DINOv2",
        help="a DINOv2 .pth file or a Hugging Face folder",
        filter_fn=checkpoint_filter_fn,
        arch_from_config=lambda config, _, where: arch_from_hf_config(config, where),
        arch_from_tensors=infer_arch,
    )
