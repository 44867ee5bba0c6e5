"""The loader skeleton every foreign checkpoint goes through: files and Hugging Face folders in, a source and its
tensors (prefix stripped) out, and a strict load with errors that name the file, the keys and the shapes.

A source module (`dinov2`, `clip`, `sam`, `sam_decoder`) describes its checkpoints with `Sources` (a key only each
source has) and converts the tensors with its key map (`_keys.py`); reading, unwrapping, detecting, prefix stripping,
the file-or-folder checks and the final `load_checked` live here once. Pattern: timm `_builder.py` `load_pretrained`
and `checkpoint_filter_fn`.
"""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from training.layers.patch_embed import resample_patch_embed

logger = logging.getLogger(__name__)

HF_DIRECTORY_HELP = "a Hugging Face model directory needs config.json and model.safetensors or pytorch_model.bin"
HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Keys that wrap a state dict in training checkpoints (dinov2 saves {"model": ...} and {"teacher": ...}).
WRAPPER_KEYS = ("model", "state_dict", "teacher", "module")


class BackboneCheckpoint(NamedTuple):
    """A checkpoint converted to our layout, with the architecture it needs and where it came from."""

    state_dict: dict[str, Tensor]
    arch: dict[str, Any]
    source: str
    path: Path


# ---------------------------------------------------------------------------------------------------------- files
def load_tensor_file(path: Path) -> Mapping[str, Any]:
    """A state dict (or a training checkpoint wrapping one) from a `.safetensors` or a torch file (tensors only)."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    if path.suffix == ".safetensors":
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
        tensors.update(load_tensor_file(shard_path))
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
    return dict(load_tensor_file(weights_path)), config, weights_path


def unwrap(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
    """Descend through `model` / `state_dict` / `teacher` / `module` wrappers to the tensors."""
    while True:
        for key in WRAPPER_KEYS:
            if isinstance(checkpoint.get(key), Mapping):
                checkpoint = checkpoint[key]
                break
        else:
            return checkpoint


class OpenedCheckpoint(NamedTuple):
    """A file or Hugging Face folder read and unwrapped: its tensors, config.json (folders only), the file read."""

    state_dict: Mapping[str, Any]
    config: dict[str, Any] | None
    weights_path: Path


def open_checkpoint(
    path: str | Path, help: str, read_file: Callable[[Path], Mapping[str, Any]] = load_tensor_file
) -> OpenedCheckpoint:
    """Read a checkpoint file (with `read_file`) or a Hugging Face model folder; `help` says what to pass instead."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist: pass {help}")
    if path.is_dir():
        tensors, config, weights_path = read_hf_directory(path)
        return OpenedCheckpoint(tensors, config, weights_path)
    return OpenedCheckpoint(unwrap(read_file(path)), None, path)


# --------------------------------------------------------------------------------------------------------- sources
def find_prefixes(state_dict: Mapping[str, Any], markers: Mapping[str, str]) -> dict[str, str]:
    """Key prefix -> source for every key ending in one of `markers` (source -> a key only that source has).

    Longer markers are tried first, so a marker that ends another one ('class_embedding' in
    'embeddings.class_embedding') does not claim its keys.
    """
    ordered = sorted(markers.items(), key=lambda item: -len(item[1]))
    found: dict[str, str] = {}
    for key in state_dict:
        for source, marker in ordered:
            if key == marker or key.endswith("." + marker):
                found.setdefault(key[: len(key) - len(marker)], source)
                break
    return found


def strip_prefix(state_dict: Mapping[str, Any], prefix: str) -> dict[str, Tensor]:
    """The tensors under `prefix`, without it."""
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix) and isinstance(v, Tensor)}


@dataclass(frozen=True)
class Sources:
    """The checkpoint layouts of one kind of module (e.g. a CLIP vision tower), told apart by a key each one has.

    Attributes:
        what: the module, for errors ("CLIP vision tower").
        markers: source name -> a key (without prefix) only that source has.
        hf_source: the source that comes as a Hugging Face folder (with config.json), not as a lone file.
        prefer: when several prefixes hold the module, take the one containing this word (None: an error).
    """

    what: str
    markers: Mapping[str, str]
    hf_source: str
    prefer: str | None = None

    def find(self, state_dict: Mapping[str, Any]) -> tuple[str, str] | None:
        """(source, key prefix) of the module in `state_dict`, or None when it holds none."""
        found = find_prefixes(state_dict, self.markers)
        if not found:
            return None
        if len(found) > 1:
            chosen = [prefix for prefix in found if self.prefer and self.prefer in prefix]
            if len(chosen) != 1:
                raise ValueError(
                    f"several {self.what}s in one checkpoint (prefixes {sorted(found)}); save one {self.what} alone"
                )
            return found[chosen[0]], chosen[0]
        prefix, source = next(iter(found.items()))
        return source, prefix

    def detect(self, state_dict: Mapping[str, Any]) -> tuple[str, str]:
        """(source, key prefix) of the module in `state_dict`; raises when there is none."""
        found = self.find(state_dict)
        if found is None:
            markers = " or ".join(self.markers.values())
            raise ValueError(
                f"no {self.what} found: expected a key ending in {markers}; first keys: {list(state_dict)[:5]}"
            )
        return found

    def extract(self, checkpoint: Mapping[str, Any]) -> tuple[str, dict[str, Tensor]]:
        """Unwrap, detect the source and strip its prefix: (source, the module's tensors)."""
        state_dict = unwrap(checkpoint)
        source, prefix = self.detect(state_dict)
        return source, strip_prefix(state_dict, prefix)

    def check_form(self, opened: OpenedCheckpoint, label: str) -> str:
        """The source of an opened checkpoint; Hugging Face layouts must come as folders, the others as files."""
        source, _ = self.detect(opened.state_dict)
        if opened.config is not None and source != self.hf_source:
            raise ValueError(
                f"{opened.weights_path} does not hold Hugging Face {label} keys (found the {source!r} layout)"
            )
        if opened.config is None and source == self.hf_source:
            raise ValueError(
                f"{opened.weights_path} holds Hugging Face {label} keys: pass its directory (with config.json) "
                "instead of the file"
            )
        return source


# ------------------------------------------------------------------------------------------------------ loading
def resample_patch_kernel(out: dict[str, Tensor], patch_size: int) -> None:
    """Resample `patch_embed.proj.weight` in place to a `patch_size` kernel (FlexiViT pseudo-inverse) if it differs."""
    patch = out.get("patch_embed.proj.weight")
    kernel = (patch_size, patch_size)
    if patch is not None and tuple(patch.shape[-2:]) != kernel:
        logger.info("resampling patch_embed.proj.weight %s -> kernel %s", tuple(patch.shape), kernel)
        out["patch_embed.proj.weight"] = resample_patch_embed(patch, kernel)


def load_backbone(
    path: str | Path,
    sources: Sources,
    *,
    label: str,
    help: str,
    filter_fn: Callable[[Mapping[str, Any]], dict[str, Tensor]],
    arch_from_config: Callable[[Mapping[str, Any], dict[str, Tensor], Path], dict[str, Any]],
    arch_from_tensors: Callable[[dict[str, Tensor], Path], dict[str, Any]],
    read_file: Callable[[Path], Mapping[str, Any]] = load_tensor_file,
) -> BackboneCheckpoint:
    """The whole read of a backbone checkpoint: open the file or folder, check its form, convert, read the arch.

    Args:
        path: a checkpoint file or a Hugging Face model folder.
        sources: the layouts the source module knows.
        label: the model family in errors ("CLIP").
        help: what to pass instead when `path` does not exist.
        filter_fn: the source module's conversion to our layout.
        arch_from_config: constructor kwargs from a folder's config.json (config, converted tensors, its path).
        arch_from_tensors: constructor kwargs from the converted tensors of a lone file (tensors, file path).
        read_file: how a lone file is read.
    """
    opened = open_checkpoint(path, help, read_file)
    source = sources.check_form(opened, label)
    state_dict = filter_fn(opened.state_dict)
    if opened.config is not None:
        arch = arch_from_config(opened.config, state_dict, Path(path).expanduser() / "config.json")
    else:
        arch = arch_from_tensors(state_dict, opened.weights_path)
    return BackboneCheckpoint(state_dict, arch, source, opened.weights_path)


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
