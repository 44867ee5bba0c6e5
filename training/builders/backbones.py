"""Backbone registry: one small factory per variant, a plain dict listing them, and `build_backbone`.

DINOv2 variants follow dinov2 `hub/backbones.py` (`dinov2_vit{s,b,l,g}14`, `*_reg` with 4 registers; img 518, patch
14; ViT-g/14 = width 1536, 40 blocks, 24 heads, SwiGLU FFN) with the interpolation convention each release uses.
LayerScale starts at 1e-5 (the DINOv2 training value; checkpoints overwrite it). The tiny variants exist for tests and
CPU training. Pattern: SAM `build_sam.py` (`sam_model_registry`), timm `_builder.py` (`load_pretrained`).

`ENCODERS` lists the encoders with their own forward contracts (teachers and SAM-based families): the SAM image
encoder (`training.models.sam_encoder`, `forward_features(x)["image_embeddings"]`; sizes of SAM `build_sam.py`) and
the CLIP vision tower (`training.models.clip`, `x_norm_clstoken` = pooled output, `x_norm_patchtokens` = last hidden
patch tokens; sizes of OpenAI `clip/model.py`). `build_backbone` and `describe` serve both dicts; each family has its
own checkpoint loader (`training.weights.sam`, `training.weights.clip`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.models.clip import CLIPVisionTransformer
from training.models.sam_encoder import SamImageEncoder
from training.models.vit import VisionTransformer
from training.weights import load_checked
from training.weights.clip import clip_checkpoint_filter_fn, load_clip_weights
from training.weights.dinov2 import checkpoint_filter_fn, load_backbone_weights
from training.weights.sam import load_sam_weights, sam_checkpoint_filter_fn

logger = logging.getLogger(__name__)

# Original DINOv2 release conventions (dinov2 hub/backbones.py).
_DINOV2 = {"img_size": 518, "patch_size": 14, "init_values": 1e-5, "interpolate_offset": 0.1}
_DINOV2_REG = {**_DINOV2, "num_register_tokens": 4, "interpolate_offset": 0.0, "interpolate_antialias": True}
_SIZES = {
    "s": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "b": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "l": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
    "g": {"embed_dim": 1536, "depth": 40, "num_heads": 24, "ffn_layer": "swiglu"},
}
# Tiny variants: size-based position resampling (no historical offset), LayerScale 1 so every block contributes.
_TINY = {"init_values": 1.0, "interpolate_offset": 0.0}


def _build(*defaults: dict[str, Any], overrides: dict[str, Any]) -> VisionTransformer:
    kwargs: dict[str, Any] = {}
    for part in defaults:
        kwargs.update(part)
    kwargs.update(overrides)
    return VisionTransformer(**kwargs)


def dinov2_vits14(**kwargs: Any) -> VisionTransformer:
    """DINOv2 ViT-S/14 (22M parameters)."""
    return _build(_DINOV2, _SIZES["s"], overrides=kwargs)


def dinov2_vitb14(**kwargs: Any) -> VisionTransformer:
    """DINOv2 ViT-B/14 (87M parameters)."""
    return _build(_DINOV2, _SIZES["b"], overrides=kwargs)


def dinov2_vitl14(**kwargs: Any) -> VisionTransformer:
    """DINOv2 ViT-L/14 (304M parameters)."""
    return _build(_DINOV2, _SIZES["l"], overrides=kwargs)


def dinov2_vitg14(**kwargs: Any) -> VisionTransformer:
    """DINOv2 ViT-g/14 (1.1B parameters, SwiGLU FFN)."""
    return _build(_DINOV2, _SIZES["g"], overrides=kwargs)


def dinov2_vits14_reg(**kwargs: Any) -> VisionTransformer:
    """DINOv2 ViT-S/14 with 4 register tokens."""
    return _build(_DINOV2_REG, _SIZES["s"], overrides=kwargs)


def dinov2_vitb14_reg(**kwargs: Any) -> VisionTransformer:
    """DINOv2 ViT-B/14 with 4 register tokens."""
    return _build(_DINOV2_REG, _SIZES["b"], overrides=kwargs)


def dinov2_vitl14_reg(**kwargs: Any) -> VisionTransformer:
    """DINOv2 ViT-L/14 with 4 register tokens."""
    return _build(_DINOV2_REG, _SIZES["l"], overrides=kwargs)


def dinov2_vitg14_reg(**kwargs: Any) -> VisionTransformer:
    """DINOv2 ViT-g/14 with 4 register tokens."""
    return _build(_DINOV2_REG, _SIZES["g"], overrides=kwargs)


def vit_tiny_p8(**kwargs: Any) -> VisionTransformer:
    """Tiny ViT for tests and CPU training: patch 8, width 128, 4 blocks, 4 heads, 128 px."""
    size = {"img_size": 128, "patch_size": 8, "embed_dim": 128, "depth": 4, "num_heads": 4}
    return _build(_TINY, size, overrides=kwargs)


def vit_tiny_p14(**kwargs: Any) -> VisionTransformer:
    """Tiny ViT with DINOv2's patch size: patch 14, width 64, 2 blocks, 2 heads, 112 px."""
    size = {"img_size": 112, "patch_size": 14, "embed_dim": 64, "depth": 2, "num_heads": 2}
    return _build(_TINY, size, overrides=kwargs)


BACKBONES: dict[str, Callable[..., VisionTransformer]] = {
    "dinov2_vits14": dinov2_vits14,
    "dinov2_vitb14": dinov2_vitb14,
    "dinov2_vitl14": dinov2_vitl14,
    "dinov2_vitg14": dinov2_vitg14,
    "dinov2_vits14_reg": dinov2_vits14_reg,
    "dinov2_vitb14_reg": dinov2_vitb14_reg,
    "dinov2_vitl14_reg": dinov2_vitl14_reg,
    "dinov2_vitg14_reg": dinov2_vitg14_reg,
    "vit_tiny_p8": vit_tiny_p8,
    "vit_tiny_p14": vit_tiny_p14,
}


# SAM `build_sam.py`: ViT-B/L/H image encoders (1024 px, patch 16, window 14, neck to 256 channels).
_SAM = {"img_size": 1024, "patch_size": 16, "window_size": 14, "out_chans": 256}
_SAM_SIZES = {
    "b": {"embed_dim": 768, "depth": 12, "num_heads": 12, "global_attn_indexes": (2, 5, 8, 11)},
    "l": {"embed_dim": 1024, "depth": 24, "num_heads": 16, "global_attn_indexes": (5, 11, 17, 23)},
    "h": {"embed_dim": 1280, "depth": 32, "num_heads": 16, "global_attn_indexes": (7, 15, 23, 31)},
}


def sam_vitb(**kwargs: Any) -> SamImageEncoder:
    """SAM ViT-B image encoder (`sam_vit_b_01ec64.pth`, 90M parameters)."""
    return SamImageEncoder(**{**_SAM, **_SAM_SIZES["b"], **kwargs})


def sam_vitl(**kwargs: Any) -> SamImageEncoder:
    """SAM ViT-L image encoder (`sam_vit_l_0b3195.pth`, 308M parameters)."""
    return SamImageEncoder(**{**_SAM, **_SAM_SIZES["l"], **kwargs})


def sam_vith(**kwargs: Any) -> SamImageEncoder:
    """SAM ViT-H image encoder (`sam_vit_h_4b8939.pth`, 637M parameters)."""
    return SamImageEncoder(**{**_SAM, **_SAM_SIZES["h"], **kwargs})


def sam_tiny(**kwargs: Any) -> SamImageEncoder:
    """Tiny SAM encoder for tests and CPU training: width 64, 4 blocks (1 and 3 global), window 4, 128 px, 32 ch."""
    size = {"img_size": 128, "embed_dim": 64, "depth": 4, "num_heads": 2, "window_size": 4, "out_chans": 32}
    return SamImageEncoder(**{**_SAM, "global_attn_indexes": (1, 3), **size, **kwargs})


# OpenAI `clip/model.py` vision towers (224 px unless named; heads = width // 64; QuickGELU, LayerNorm eps 1e-5).
_CLIP_SIZES = {
    "b": {"embed_dim": 768, "depth": 12, "num_heads": 12, "output_dim": 512},
    "l": {"embed_dim": 1024, "depth": 24, "num_heads": 16, "output_dim": 768},
}


def clip_vitb32(**kwargs: Any) -> CLIPVisionTransformer:
    """CLIP ViT-B/32 vision tower (OpenAI `ViT-B-32.pt`, 88M parameters with the projection)."""
    return CLIPVisionTransformer(**{"img_size": 224, "patch_size": 32, **_CLIP_SIZES["b"], **kwargs})


def clip_vitb16(**kwargs: Any) -> CLIPVisionTransformer:
    """CLIP ViT-B/16 vision tower (OpenAI `ViT-B-16.pt`, 86M parameters with the projection)."""
    return CLIPVisionTransformer(**{"img_size": 224, "patch_size": 16, **_CLIP_SIZES["b"], **kwargs})


def clip_vitl14(**kwargs: Any) -> CLIPVisionTransformer:
    """CLIP ViT-L/14 vision tower (OpenAI `ViT-L-14.pt`, 304M parameters with the projection)."""
    return CLIPVisionTransformer(**{"img_size": 224, "patch_size": 14, **_CLIP_SIZES["l"], **kwargs})


def clip_vitl14_336(**kwargs: Any) -> CLIPVisionTransformer:
    """CLIP ViT-L/14 at 336 px (OpenAI `ViT-L-14-336px.pt`)."""
    return CLIPVisionTransformer(**{"img_size": 336, "patch_size": 14, **_CLIP_SIZES["l"], **kwargs})


def clip_tiny(**kwargs: Any) -> CLIPVisionTransformer:
    """Tiny CLIP tower for tests and CPU training: patch 8, width 64, 2 blocks, 2 heads, 64 px, projection 32."""
    size = {"img_size": 64, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, "output_dim": 32}
    return CLIPVisionTransformer(**{**size, **kwargs})


ENCODERS: dict[str, Callable[..., nn.Module]] = {
    "sam_vitb": sam_vitb,
    "sam_vitl": sam_vitl,
    "sam_vith": sam_vith,
    "sam_tiny": sam_tiny,
    "clip_vitb32": clip_vitb32,
    "clip_vitb16": clip_vitb16,
    "clip_vitl14": clip_vitl14,
    "clip_vitl14_336": clip_vitl14_336,
    "clip_tiny": clip_tiny,
}
Backbone = VisionTransformer | SamImageEncoder | CLIPVisionTransformer
# Checkpoint reader and converter per model class (encoders other than the DINOv2-layout ViT).
_LOADERS: dict[type[nn.Module], tuple[Callable[..., Any], Callable[..., dict[str, torch.Tensor]]]] = {
    SamImageEncoder: (load_sam_weights, sam_checkpoint_filter_fn),
    CLIPVisionTransformer: (load_clip_weights, clip_checkpoint_filter_fn),
}


def describe(model: Backbone) -> dict[str, Any]:
    """The architecture fields that decide which weights fit (compared between a checkpoint and a variant).

    For the encoders in `ENCODERS` these are the complete constructor kwargs of the model (`model.describe()`).
    """
    if not isinstance(model, VisionTransformer):
        return model.describe()
    return {
        "embed_dim": model.embed_dim,
        "depth": len(model.blocks),
        "num_heads": model.num_heads,
        "patch_size": model.patch_size,
        "img_size": model.img_size,
        "num_register_tokens": model.num_register_tokens,
        "ffn_layer": model.ffn_layer,
        "mlp_hidden_dim": model.mlp_hidden_dim,
    }


def _factory(name: str) -> Callable[..., Any]:
    if name in ENCODERS:
        return ENCODERS[name]
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join([*BACKBONES, *ENCODERS])}")
    return BACKBONES[name]


def _unrecorded_fields(arch: dict[str, Any], variant: VisionTransformer) -> dict[str, Any]:
    """Fields that original-layout weights do not record, taken from the named variant where it fits the weights.

    The head count comes from the variant when the width matches (else the embed_dim // 64 guess of `infer_arch`
    stands); the position-resampling convention when the register count matches (else the DINOv2 release convention
    for that register count stands).
    """
    fields: dict[str, Any] = {}
    if arch["embed_dim"] == variant.embed_dim:
        fields["num_heads"] = variant.num_heads
    if arch["num_register_tokens"] == variant.num_register_tokens:
        fields["interpolate_offset"] = variant.interpolate_offset
        fields["interpolate_antialias"] = variant.interpolate_antialias
    return fields


def build_backbone(name: str, checkpoint: str | Path | None = None, **overrides: Any) -> Backbone:
    """Build a registered backbone or encoder, optionally loading a checkpoint of its family into it.

    With a checkpoint, its architecture wins over the name (a warning lists what differs from the named variant):
    a Hugging Face directory's config.json, or the tensor shapes of an original `.pth` (see `_unrecorded_fields` for
    what shapes cannot tell). `overrides` win over both (e.g. `num_heads`, or `interpolate_offset`). Position and
    patch embeddings are resampled when an override changes `img_size` or `patch_size`. Weights load with strict=True.

    Args:
        name: registry key, see `BACKBONES` and `ENCODERS`.
        checkpoint: original DINOv2 / SAM / CLIP or our-layout file, or Hugging Face model directory; None = random
            init.
        overrides: constructor keyword arguments of the named model class.
    """
    factory = _factory(name)
    if checkpoint is None:
        return factory(**overrides)
    with torch.device("meta"):
        model_class = type(factory(**overrides))
    if model_class is not VisionTransformer:
        return _build_encoder(name, factory, _LOADERS[model_class], checkpoint, overrides)
    loaded = load_backbone_weights(checkpoint)
    arch = dict(loaded.arch)
    with torch.device("meta"):  # shapes only, nothing allocated
        variant = factory(**overrides)
        if loaded.source == "dinov2":
            arch.update(_unrecorded_fields(arch, variant))
        named, found = describe(variant), describe(factory(**arch))
    _warn_arch_differences(checkpoint, name, named, found, overrides)
    model = factory(**{**arch, **overrides})
    state_dict = checkpoint_filter_fn(loaded.state_dict, model)
    load_checked(model, state_dict, loaded.path)
    logger.info(
        "loaded %s from %s (%s layout; position resampling offset=%s antialias=%s)",
        name,
        loaded.path,
        loaded.source,
        model.interpolate_offset,
        model.interpolate_antialias,
    )
    return model


def _warn_arch_differences(
    checkpoint: str | Path, name: str, named: dict[str, Any], found: dict[str, Any], overrides: dict[str, Any]
) -> None:
    """Warn where the checkpoint's architecture departs from the named variant's (overridden keys aside)."""
    differences = {key: (named[key], found[key]) for key in named if named[key] != found[key] and key not in overrides}
    if differences:
        listed = ", ".join(f"{key} {value} -> {actual}" for key, (value, actual) in differences.items())
        logger.warning("checkpoint %s differs from %s: %s; using the checkpoint's", checkpoint, name, listed)


def _build_encoder(
    name: str,
    factory: Callable[..., Any],
    loader: tuple[Callable[..., Any], Callable[..., dict[str, torch.Tensor]]],
    checkpoint: str | Path,
    overrides: dict[str, Any],
) -> Any:
    """`build_backbone` for the `ENCODERS`: read with the family's loader; checkpoint arch, then overrides, win."""
    load_weights, filter_fn = loader
    loaded = load_weights(checkpoint)
    arch = dict(loaded.arch)
    with torch.device("meta"):
        variant = factory(**overrides)
        if "num_heads" not in arch and arch.get("embed_dim") != variant.embed_dim:
            # Not recorded in the file: the named variant's count stands when the width fits, else 64-wide heads.
            arch["num_heads"] = max(arch["embed_dim"] // 64, 1)
        named, found = describe(variant), describe(factory(**arch))
    _warn_arch_differences(checkpoint, name, named, found, overrides)
    model = factory(**{**arch, **overrides})
    load_checked(model, filter_fn(loaded.state_dict, model), loaded.path)
    logger.info("loaded %s from %s (%s layout)", name, loaded.path, loaded.source)
    return model
