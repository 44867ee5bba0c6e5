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

import json
import logging
import math
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from training.layers.patch_embed import resample_patch_embed
from training.layers.pos_embed import resample_pos_embed
from training.models.vit import VisionTransformer, remap_legacy_keys

logger = logging.getLogger(__name__)

Source = Literal["dinov2", "hf_dinov2"]

HF_DIRECTORY_HELP = "a Hugging Face model directory needs config.json and model.safetensors or pytorch_model.bin"
HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Keys that wrap a state dict in training checkpoints (dinov2 saves {"model": ...} and {"teacher": ...}).
WRAPPER_KEYS = ("model", "state_dict", "teacher", "module")
# Key (without prefix) that identifies each source.
SOURCE_MARKERS: dict[Source, str] = {
    "hf_dinov2": "embeddings.patch_embeddings.projection.weight",
    "dinov2": "patch_embed.proj.weight",
}


class Part(NamedTuple):
    """Slice `index` of `count` equal row blocks of a fused tensor (q/k/v of qkv, gate/value of w12)."""

    target: str
    index: int
    count: int


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

_LAYER_NUMBER = re.compile(r"^(.*?\.)(\d+)(\..*)$")


class BackboneCheckpoint(NamedTuple):
    """A checkpoint converted to our layout, with the architecture it needs and where it came from."""

    state_dict: dict[str, Tensor]
    arch: dict[str, Any]
    source: Source
    path: Path


# ---------------------------------------------------------------------------------------------------------------
# Key templates


def _template(key: str) -> tuple[str, str | None]:
    """'encoder.layer.3.norm1.weight' -> ('encoder.layer.{}.norm1.weight', '3'); keys without a number unchanged."""
    match = _LAYER_NUMBER.match(key)
    if match is None:
        return key, None
    return f"{match.group(1)}{{}}{match.group(3)}", match.group(2)


def _fill(template: str, number: str | None) -> str:
    return template.format(number) if number is not None else template


# ---------------------------------------------------------------------------------------------------------------
# Source -> ours


def _convert_hf_dinov2(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face DINOv2 keys (hub or transformers >= 5 names) -> our layout; q/k/v and gate/value are fused."""
    mapping = {**FROM_HF_MAP, **FROM_HF_V5_ALIASES}
    out: dict[str, Tensor] = {}
    parts: dict[str, dict[int, tuple[str, Tensor]]] = {}
    counts: dict[str, int] = {}
    unknown = []
    for key, tensor in state_dict.items():
        template, number = _template(key)
        if template not in mapping:
            unknown.append(key)
            continue
        target = mapping[template]
        if target is None:
            continue
        if isinstance(target, Part):
            name = _fill(target.target, number)
            parts.setdefault(name, {})[target.index] = (key, tensor)
            counts[name] = target.count
        else:
            out[_fill(target, number)] = tensor
    if unknown:
        raise ValueError(f"unrecognised keys in a Hugging Face DINOv2 checkpoint: {sorted(unknown)[:10]}")
    for name, pieces in parts.items():
        if sorted(pieces) != list(range(counts[name])):
            present = [key for key, _ in pieces.values()]
            raise ValueError(f"{name} needs {counts[name]} parts; the checkpoint has only {present}")
        shapes = {tuple(t.shape) for _, t in pieces.values()}
        if len(shapes) != 1:
            raise ValueError(f"parts of {name} differ in shape: { {k: tuple(t.shape) for k, t in pieces.values()} }")
        out[name] = torch.cat([pieces[i][1] for i in range(counts[name])], dim=0)
    return out


def _convert_dinov2_original(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Original DINOv2 keys -> our layout: unchunk `blocks.C.N.*`, drop the pre-training mask token."""
    out = dict(state_dict)
    remap_legacy_keys(out)
    return out


_CONVERTERS = {"hf_dinov2": _convert_hf_dinov2, "dinov2": _convert_dinov2_original}


def _unwrap(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
    """Descend through `model` / `state_dict` / `teacher` / `module` wrappers to the tensors."""
    while True:
        for key in WRAPPER_KEYS:
            if isinstance(checkpoint.get(key), Mapping):
                checkpoint = checkpoint[key]
                break
        else:
            return checkpoint


def find_prefixes(state_dict: Mapping[str, Any], markers: Mapping[str, str]) -> dict[str, Any]:
    """Key prefix -> source for every key ending in one of `markers` (source -> a key only that source has).

    Longer markers are tried first, so a marker that ends another one ('class_embedding' in
    'embeddings.class_embedding') does not claim its keys.
    """
    ordered = sorted(markers.items(), key=lambda item: -len(item[1]))
    found: dict[str, Any] = {}
    for key in state_dict:
        for source, marker in ordered:
            if key == marker or key.endswith("." + marker):
                found.setdefault(key[: len(key) - len(marker)], source)
                break
    return found


def detect_source(state_dict: Mapping[str, Any]) -> tuple[Source, str]:
    """Source and key prefix (e.g. 'backbone.', 'dinov2.', '') of the backbone tensors in `state_dict`.

    When several prefixes hold a backbone (a DINOv2 training checkpoint has a student and a teacher), the teacher is
    taken: it is the model DINOv2 evaluates and releases.
    """
    found = find_prefixes(state_dict, SOURCE_MARKERS)
    if not found:
        markers = " or ".join(SOURCE_MARKERS.values())
        first = list(state_dict)[:5]
        raise ValueError(f"no DINOv2 backbone found: expected a key ending in {markers}; first keys: {first}")
    if len(found) > 1:
        teacher = [prefix for prefix in found if "teacher" in prefix]
        if len(teacher) != 1:
            raise ValueError(f"several backbones in one checkpoint (prefixes {sorted(found)}); save one backbone alone")
        return found[teacher[0]], teacher[0]
    prefix, source = next(iter(found.items()))
    return source, prefix


def checkpoint_filter_fn(checkpoint: Mapping[str, Any], model: VisionTransformer | None = None) -> dict[str, Tensor]:
    """Convert any supported checkpoint to our layout, optionally resampled to `model`'s embeddings.

    Unwraps training checkpoints, detects the source, keeps the backbone's keys without prefix and converts them;
    with `model`, resamples the position embedding (with the model's interpolation convention) and the patch
    embedding kernel (FlexiViT pseudo-inverse) where their shapes differ. Idempotent on our layout.

    Args:
        checkpoint: a state dict or a training checkpoint that wraps one.
        model: the model the result will be loaded into.
    """
    state_dict = _unwrap(checkpoint)
    source, prefix = detect_source(state_dict)
    tensors = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix) and isinstance(v, Tensor)}
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
    patch = out.get("patch_embed.proj.weight")
    kernel = (model.patch_size, model.patch_size)
    if patch is not None and tuple(patch.shape[-2:]) != kernel:
        logger.info("resampling patch_embed.proj.weight %s -> kernel %s", tuple(patch.shape), kernel)
        out["patch_embed.proj.weight"] = resample_patch_embed(patch, kernel)
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
    simple: dict[str, str] = {}
    fused: dict[str, list[tuple[str, Part]]] = {}
    for hf_key, target in FROM_HF_MAP.items():
        if isinstance(target, Part):
            fused.setdefault(target.target, []).append((hf_key, target))
        elif target is not None:
            simple[target] = hf_key
    out: dict[str, Tensor] = {}
    for key, tensor in state_dict.items():
        template, number = _template(key)
        if template in simple:
            out[_fill(simple[template], number)] = tensor
        elif template in fused:
            for hf_key, part in fused[template]:
                out[_fill(hf_key, number)] = tensor.chunk(part.count, dim=0)[part.index].clone()
        else:
            raise ValueError(f"{key} has no Hugging Face DINOv2 equivalent")
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


def infer_arch(state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
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
    numbers = {int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.")}
    depth = max(numbers, default=-1) + 1
    if depth == 0 or numbers != set(range(depth)):
        raise ValueError(f"blocks must be numbered 0..N-1; found {sorted(numbers)}")
    patch = state_dict["patch_embed.proj.weight"]  # D C p p
    if patch.shape[-1] != patch.shape[-2]:
        raise ValueError(f"patch_embed.proj.weight {tuple(patch.shape)} has a non-square kernel")
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


def _load_tensor_file(path: Path) -> Mapping[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise RuntimeError(
            f"{path} holds objects other than tensors and plain containers, so it is not loaded ({err}); "
            "re-save it as a plain state dict (torch.save(model.state_dict(), ...))"
        ) from err
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, expected a state dict")
    return checkpoint


def _read_sharded(index_path: Path) -> dict[str, Tensor]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as err:
        raise ValueError(f"{index_path} is not a valid shard index (needs a 'weight_map'): {err}") from err
    tensors: dict[str, Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise FileNotFoundError(f"{shard_path} not found: listed in {index_path}")
        tensors.update(_load_tensor_file(shard_path))
    return tensors


def read_hf_directory(directory: Path) -> tuple[dict[str, Tensor], dict[str, Any], Path]:
    """Tensors, config dict and weight-file path of a Hugging Face model directory."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: {HF_DIRECTORY_HELP}")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from err
    for name in HF_WEIGHT_FILES:
        weights_path = directory / name
        if weights_path.is_file():
            break
    else:
        raise FileNotFoundError(f"{directory / 'model.safetensors'} not found: {HF_DIRECTORY_HELP}")
    if name.endswith(".index.json"):
        return _read_sharded(weights_path), config, weights_path
    return dict(_load_tensor_file(weights_path)), config, weights_path


def load_backbone_weights(path: str | Path) -> BackboneCheckpoint:
    """Read a DINOv2 checkpoint file or Hugging Face directory and convert it to our layout.

    Args:
        path: an original DINOv2 / our-layout `.pth`, `.pt`, `.bin` or `.safetensors` file, or a Hugging Face
            model directory.

    Returns:
        converted state dict, VisionTransformer kwargs of its architecture, source name and the weight file read.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist: pass a DINOv2 .pth file or a Hugging Face folder")
    if path.is_dir():
        tensors, config, weights_path = read_hf_directory(path)
        source, _ = detect_source(tensors)
        if source != "hf_dinov2":
            raise ValueError(f"{weights_path} does not hold Hugging Face DINOv2 keys (found the {source!r} layout)")
        return BackboneCheckpoint(
            checkpoint_filter_fn(tensors), arch_from_hf_config(config, path / "config.json"), source, weights_path
        )
    checkpoint = _load_tensor_file(path)
    source, _ = detect_source(_unwrap(checkpoint))
    if source != "dinov2":
        raise ValueError(
            f"{path} holds Hugging Face DINOv2 keys: pass its directory (with config.json) instead of the file"
        )
    state_dict = checkpoint_filter_fn(checkpoint)
    return BackboneCheckpoint(state_dict, infer_arch(state_dict), source, path)


def load_checked(model: nn.Module, state_dict: Mapping[str, Tensor], path: Path | str) -> None:
    """`model.load_state_dict(state_dict, strict=True)` with errors that name the file, keys and shapes."""
    expected = model.state_dict()
    mismatched = [
        f"{key}: checkpoint {tuple(tensor.shape)}, model expects {tuple(expected[key].shape)}"
        for key, tensor in state_dict.items()
        if key in expected and tensor.shape != expected[key].shape
    ]
    if mismatched:
        raise ValueError(f"{path}: shape mismatch for {len(mismatched)} tensor(s): " + "; ".join(mismatched[:10]))
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise RuntimeError(
            f"{path}: keys do not match the model after conversion: "
            f"missing {missing[:10]}, unexpected {unexpected[:10]}"
        )
    model.load_state_dict(state_dict, strict=True)
