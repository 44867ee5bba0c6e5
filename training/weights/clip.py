"""Reading CLIP ViT checkpoints and converting the vision tower to the `training.models.clip` layout.

Sources (detected from keys only each one has):

* ``openai_clip``: OpenAI CLIP and open_clip state dicts (`visual.conv1.weight`, `visual.class_embedding`,
  `visual.transformer.resblocks.N.*`, `visual.proj`), whole models or the visual tower alone, possibly wrapped in
  `state_dict` and prefixed by `module.`. OpenAI's released `ViT-*.pt` files are TorchScript archives; their state dict
  is read with `torch.jit.load`. The architecture is inferred from shapes (`infer_clip_arch`); the head count and the
  activation are not recorded, so `build_backbone` takes them from the named variant (act: QuickGELU for OpenAI, pass
  `act="gelu"` for open_clip weights trained with GELU).
* ``hf_clip``: a Hugging Face `CLIPVisionModel`, `CLIPVisionModelWithProjection` or `CLIPModel` directory
  (`vision_model.*` or, as transformers >= 5 saves `CLIPVisionModel`, unprefixed `embeddings.*`; the projection is
  `visual_projection.weight`); the architecture comes from config.json (`arch_from_hf_clip_config`).
* ``clip``: our own layout (idempotent).

Key maps are data (`{}` = block number) with the tensor transform each key needs, and the `to_*` functions are their
mirror images (torchtitan `state_dict_adapter.py`); loading follows timm `checkpoint_filter_fn`.
"""

from __future__ import annotations

import logging
import math
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from training.layers.pos_embed import resample_pos_embed
from training.models.clip import ACTIVATIONS, CLIPVisionTransformer
from training.weights._io import (
    BackboneCheckpoint,
    Sources,
    load_backbone,
    load_tensor_file,
    resample_patch_kernel,
    unwrap,
)
from training.weights._keys import Op, Part, block_depth, convert_keys, mirror_keys, square_patch

logger = logging.getLogger(__name__)

# Key (without prefix) that only each source's vision tower has.
CLIP_SOURCE_MARKERS = {
    "openai_clip": "class_embedding",
    "hf_clip": "embeddings.class_embedding",
    "clip": "norm_pre.weight",
}
SOURCES = Sources("CLIP vision tower", CLIP_SOURCE_MARKERS, hf_source="hf_clip")
detect_clip_source = SOURCES.detect  # (source, key prefix) of the tower: ('openai_clip', 'visual.'), ...


# OpenAI / open_clip visual tower -> ours.
FROM_OPENAI_MAP: dict[str, Part | Op | str] = {
    "conv1.weight": "patch_embed.proj.weight",
    "class_embedding": Op("cls_token", "token"),
    "positional_embedding": Op("pos_embed", "table"),
    "ln_pre.weight": "norm_pre.weight",
    "ln_pre.bias": "norm_pre.bias",
    "transformer.resblocks.{}.ln_1.weight": "blocks.{}.norm1.weight",
    "transformer.resblocks.{}.ln_1.bias": "blocks.{}.norm1.bias",
    "transformer.resblocks.{}.attn.in_proj_weight": "blocks.{}.attn.qkv.weight",
    "transformer.resblocks.{}.attn.in_proj_bias": "blocks.{}.attn.qkv.bias",
    "transformer.resblocks.{}.attn.out_proj.weight": "blocks.{}.attn.proj.weight",
    "transformer.resblocks.{}.attn.out_proj.bias": "blocks.{}.attn.proj.bias",
    "transformer.resblocks.{}.ln_2.weight": "blocks.{}.norm2.weight",
    "transformer.resblocks.{}.ln_2.bias": "blocks.{}.norm2.bias",
    "transformer.resblocks.{}.mlp.c_fc.weight": "blocks.{}.mlp.fc1.weight",
    "transformer.resblocks.{}.mlp.c_fc.bias": "blocks.{}.mlp.fc1.bias",
    "transformer.resblocks.{}.mlp.c_proj.weight": "blocks.{}.mlp.fc2.weight",
    "transformer.resblocks.{}.mlp.c_proj.bias": "blocks.{}.mlp.fc2.bias",
    "ln_post.weight": "norm.weight",
    "ln_post.bias": "norm.bias",
    "proj": Op("head.weight", "transpose"),  # D out, used as x @ proj
}

# Hugging Face `CLIPVisionTransformer` (under `vision_model.` or unprefixed) -> ours; the projection sits at the root.
FROM_HF_MAP: dict[str, Part | Op | str] = {
    "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
    "embeddings.class_embedding": Op("cls_token", "token"),
    "embeddings.position_embedding.weight": Op("pos_embed", "table"),
    "pre_layrnorm.weight": "norm_pre.weight",  # sic: transformers' name
    "pre_layrnorm.bias": "norm_pre.bias",
    "encoder.layers.{}.layer_norm1.weight": "blocks.{}.norm1.weight",
    "encoder.layers.{}.layer_norm1.bias": "blocks.{}.norm1.bias",
    "encoder.layers.{}.self_attn.q_proj.weight": Part("blocks.{}.attn.qkv.weight", 0, 3),
    "encoder.layers.{}.self_attn.k_proj.weight": Part("blocks.{}.attn.qkv.weight", 1, 3),
    "encoder.layers.{}.self_attn.v_proj.weight": Part("blocks.{}.attn.qkv.weight", 2, 3),
    "encoder.layers.{}.self_attn.q_proj.bias": Part("blocks.{}.attn.qkv.bias", 0, 3),
    "encoder.layers.{}.self_attn.k_proj.bias": Part("blocks.{}.attn.qkv.bias", 1, 3),
    "encoder.layers.{}.self_attn.v_proj.bias": Part("blocks.{}.attn.qkv.bias", 2, 3),
    "encoder.layers.{}.self_attn.out_proj.weight": "blocks.{}.attn.proj.weight",
    "encoder.layers.{}.self_attn.out_proj.bias": "blocks.{}.attn.proj.bias",
    "encoder.layers.{}.layer_norm2.weight": "blocks.{}.norm2.weight",
    "encoder.layers.{}.layer_norm2.bias": "blocks.{}.norm2.bias",
    "encoder.layers.{}.mlp.fc1.weight": "blocks.{}.mlp.fc1.weight",
    "encoder.layers.{}.mlp.fc1.bias": "blocks.{}.mlp.fc1.bias",
    "encoder.layers.{}.mlp.fc2.weight": "blocks.{}.mlp.fc2.weight",
    "encoder.layers.{}.mlp.fc2.bias": "blocks.{}.mlp.fc2.bias",
    "post_layernorm.weight": "norm.weight",
    "post_layernorm.bias": "norm.bias",
}
HF_PROJECTION = "visual_projection.weight"  # out D, at the model root (beside `vision_model.`)
HF_VISION_PREFIX = "vision_model."
# Not part of the vision tower in transformers' CLIPVisionModel state dicts (a buffer kept by older versions).
HF_IGNORED = ("embeddings.position_ids",)

# CLIPVisionConfig defaults (transformers 5.23, = ViT-B/32) for fields a config.json may omit.
HF_CLIP_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
HF_CLIP_MODEL_TYPES = ("clip", "clip_vision_model")


def clip_checkpoint_filter_fn(
    checkpoint: Mapping[str, Any], model: CLIPVisionTransformer | None = None
) -> dict[str, Tensor]:
    """Convert a CLIP checkpoint (any supported source) to our layout, optionally resampled to `model`.

    Only the vision tower (and its projection) is kept; the text tower, `logit_scale` and `text_projection` are
    skipped. With `model`, the position grid is resampled (bicubic by size, the convention the model uses at run time)
    and the patch kernel with FlexiViT's pseudo-inverse where shapes differ; a projection the model does not have
    (`output_dim=None`) is dropped.

    Args:
        checkpoint: a state dict, possibly a whole CLIP model or wrapped in `state_dict` / `model`.
        model: the tower the result will be loaded into.
    """
    source, tensors = SOURCES.extract(checkpoint)
    if source == "hf_clip":
        tensors = {k: v for k, v in tensors.items() if k not in HF_IGNORED and not k.startswith(HF_PROJECTION)}
        out = convert_keys(tensors, FROM_HF_MAP, "Hugging Face CLIP vision tower")
        projection = _hf_projection(checkpoint)
        if projection is not None:
            out["head.weight"] = projection
    elif source == "openai_clip":
        out = convert_keys(tensors, FROM_OPENAI_MAP, "OpenAI / open_clip vision tower")
    else:
        out = dict(tensors)
    if model is None:
        return out
    if model.output_dim is None and "head.weight" in out:
        logger.info("dropping the image-text projection: the model has output_dim=None")
        del out["head.weight"]
    pos_embed = out.get("pos_embed")
    if pos_embed is not None and pos_embed.shape != model.pos_embed.shape:
        logger.info("resampling pos_embed %s -> %s", tuple(pos_embed.shape), tuple(model.pos_embed.shape))
        out["pos_embed"] = resample_pos_embed(pos_embed, model.pos_grid, num_prefix_tokens=1)
    resample_patch_kernel(out, model.patch_size)
    return out


def _hf_projection(checkpoint: Mapping[str, Any]) -> Tensor | None:
    """`visual_projection.weight` of a Hugging Face CLIP state dict: at the root, beside `vision_model.`."""
    state_dict = unwrap(checkpoint)
    _, prefix = SOURCES.detect(state_dict)
    projection = state_dict.get(prefix.removesuffix(HF_VISION_PREFIX) + HF_PROJECTION)
    return projection if isinstance(projection, Tensor) else None


def to_openai_clip(state_dict: Mapping[str, Tensor], *, prefix: str = "visual.") -> dict[str, Tensor]:
    """Our layout -> OpenAI / open_clip visual keys under `prefix`; mirror of FROM_OPENAI_MAP."""
    return {prefix + k: v for k, v in mirror_keys(state_dict, FROM_OPENAI_MAP, "OpenAI CLIP").items()}


def to_hf_clip(state_dict: Mapping[str, Tensor], *, prefix: str = HF_VISION_PREFIX) -> dict[str, Tensor]:
    """Our layout -> Hugging Face keys (`vision_model.*` + root `visual_projection.weight`); mirror of FROM_HF_MAP."""
    tower = {k: v for k, v in state_dict.items() if k != "head.weight"}
    out = {prefix + k: v for k, v in mirror_keys(tower, FROM_HF_MAP, "Hugging Face CLIP").items()}
    if "head.weight" in state_dict:
        out[prefix.removesuffix(HF_VISION_PREFIX) + HF_PROJECTION] = state_dict["head.weight"]
    return out


def infer_clip_arch(state_dict: Mapping[str, Tensor], path: Path | str = "checkpoint") -> dict[str, Any]:
    """CLIPVisionTransformer kwargs from the tensor shapes of a state dict in our layout.

    `num_heads` and `act` are not recorded in the weights and are left out (`build_backbone` takes them from the
    named variant, or guesses 64-wide heads when the width differs).
    """
    for key in ("patch_embed.proj.weight", "pos_embed", "cls_token", "blocks.0.mlp.fc1.weight"):
        if key not in state_dict:
            raise ValueError(f"{path}: not a CLIP vision tower state dict: {key!r} is missing")
    patch = square_patch(state_dict, path)  # D C p p
    depth = block_depth(state_dict, path)
    num_grid = state_dict["pos_embed"].shape[1] - 1
    side = math.isqrt(num_grid)
    if side * side != num_grid:
        raise ValueError(f"{path}: pos_embed has {num_grid} patch positions, not a square grid")
    head = state_dict.get("head.weight")
    return {
        "img_size": side * patch.shape[-1],
        "patch_size": patch.shape[-1],
        "in_chans": patch.shape[1],
        "embed_dim": patch.shape[0],
        "depth": depth,
        "mlp_hidden_dim": state_dict["blocks.0.mlp.fc1.weight"].shape[0],
        "output_dim": head.shape[0] if head is not None else None,
    }


def arch_from_hf_clip_config(
    config: Mapping[str, Any], tensors: Mapping[str, Tensor], path: Path | str = "config.json"
) -> dict[str, Any]:
    """CLIPVisionTransformer kwargs from a CLIPConfig (its `vision_config`) or CLIPVisionConfig dict.

    The projection exists when the weights hold one (`CLIPModel`, `CLIPVisionModelWithProjection`), not when the
    config merely names a `projection_dim` (`CLIPVisionModel`).
    """
    model_type = config.get("model_type")
    if model_type not in HF_CLIP_MODEL_TYPES:
        raise ValueError(
            f"{path}: model_type {model_type!r} is not a CLIP model; expected one of {HF_CLIP_MODEL_TYPES}"
        )
    vision = config.get("vision_config", {}) if model_type == "clip" else config
    cfg = {**HF_CLIP_VISION_DEFAULTS, **vision}
    if cfg["hidden_act"] not in ACTIVATIONS:
        raise ValueError(
            f"{path}: hidden_act {cfg['hidden_act']!r} is not supported; expected one of {sorted(ACTIVATIONS)}"
        )
    image, patch = cfg["image_size"], cfg["patch_size"]
    if not isinstance(patch, int):
        if patch[0] != patch[1]:
            raise ValueError(f"{path}: patch_size {patch} is not square")
        patch = patch[0]
    head = tensors.get("head.weight")
    return {
        "img_size": image if isinstance(image, int) else (int(image[0]), int(image[1])),
        "patch_size": int(patch),
        "in_chans": int(cfg["num_channels"]),
        "embed_dim": int(cfg["hidden_size"]),
        "depth": int(cfg["num_hidden_layers"]),
        "num_heads": int(cfg["num_attention_heads"]),
        "mlp_hidden_dim": int(cfg["intermediate_size"]),
        "output_dim": head.shape[0] if head is not None else None,
        "act": cfg["hidden_act"],
        "layer_norm_eps": float(cfg["layer_norm_eps"]),
    }


def _read_file(path: Path) -> Mapping[str, Any]:
    """A state dict from a tensor file, or from a TorchScript archive (OpenAI's released `ViT-*.pt`)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            scripted = any(name.endswith("/constants.pkl") for name in archive.namelist())
        if scripted:
            logger.info("%s is a TorchScript archive (OpenAI CLIP release): reading its state dict", path)
            return torch.jit.load(str(path), map_location="cpu").state_dict()
    return load_tensor_file(path)


def load_clip_weights(path: str | Path) -> BackboneCheckpoint:
    """Read a CLIP checkpoint file or Hugging Face directory and convert its vision tower to our layout.

    Args:
        path: OpenAI `ViT-*.pt` (TorchScript or state dict), open_clip `.bin` / `.pt` / `.safetensors`, a file in
            our layout, or a Hugging Face `CLIPModel` / `CLIPVisionModel[WithProjection]` directory.

    Returns:
        converted state dict, CLIPVisionTransformer kwargs, source name and the weight file read.
    """
    return load_backbone(
        path,
        SOURCES,
        label="CLIP",
        help="a CLIP .pt/.bin file or a Hugging Face folder",
        filter_fn=clip_checkpoint_filter_fn,
        arch_from_config=arch_from_hf_clip_config,
        arch_from_tensors=infer_clip_arch,
        read_file=_read_file,
    )
