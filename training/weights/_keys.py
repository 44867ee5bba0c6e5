"""Key maps as data, applied and mirrored by one pair of functions.

A map goes from a source's keys to ours; `{}` stands for a number between dots (a block or layer index; several are
allowed, filled in order). A target is our key, `None` (dropped: pre-training only), a `Part` (one row block of a
fused tensor: q/k/v of qkv, gate/value of w12) or an `Op` (the same tensor stored in another shape).
`convert_keys` applies a map (exact keys first, then templates; unknown keys raise) and `mirror_keys` is its inverse,
after torchtitan `state_dict_adapter.py` (`from_hf_map`, to/from functions as mirror images).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from torch import Tensor

_NUMBER = re.compile(r"(?<=\.)\d+(?=\.)")  # a number between dots: a block or layer index


class Part(NamedTuple):
    """Slice `index` of `count` equal row blocks of a fused tensor (q/k/v of qkv, gate/value of w12)."""

    target: str
    index: int
    count: int


class Op(NamedTuple):
    """A tensor stored in another shape: `token` (D <-> 1 1 D), `table` (N D <-> 1 N D), `transpose` (2-D)."""

    target: str
    kind: Literal["token", "table", "transpose"]


Target = str | Part | Op | None
KeyMap = Mapping[str, Target]


def key_template(key: str) -> tuple[str, list[str]]:
    """'a.3.b.1.weight' -> ('a.{}.b.{}.weight', ['3', '1']); keys without a number come back unchanged."""
    return _NUMBER.sub("{}", key), _NUMBER.findall(key)


def _lookup(key: str, mapping: Mapping[str, object]) -> tuple[str, list[str]] | None:
    if key in mapping:
        return key, []
    template, numbers = key_template(key)
    return (template, numbers) if template in mapping else None


def _to_ours(tensor: Tensor, kind: str) -> Tensor:
    if kind == "token":
        return tensor.reshape(1, 1, -1)
    if kind == "table":
        return tensor.unsqueeze(0)
    return tensor.T.contiguous()


def _from_ours(tensor: Tensor, kind: str) -> Tensor:
    if kind == "token":
        return tensor.reshape(-1)
    if kind == "table":
        return tensor[0]
    return tensor.T.contiguous()


def convert_keys(tensors: Mapping[str, Tensor], mapping: KeyMap, what: str) -> dict[str, Tensor]:
    """Apply a key map: renames, shape ops, drops and fused parts (concatenated in row order).

    Raises:
        ValueError: keys the map does not know (named with `what`), missing or unequal parts of a fused tensor.
    """
    out: dict[str, Tensor] = {}
    parts: dict[str, dict[int, tuple[str, Tensor]]] = {}
    counts: dict[str, int] = {}
    unknown = []
    for key, tensor in tensors.items():
        found = _lookup(key, mapping)
        if found is None:
            unknown.append(key)
            continue
        template, numbers = found
        target = mapping[template]
        if target is None:
            continue
        if isinstance(target, Part):
            name = target.target.format(*numbers)
            parts.setdefault(name, {})[target.index] = (key, tensor)
            counts[name] = target.count
        elif isinstance(target, Op):
            out[target.target.format(*numbers)] = _to_ours(tensor, target.kind)
        else:
            out[target.format(*numbers)] = tensor
    if unknown:
        raise ValueError(f"unrecognised keys in a {what}: {sorted(unknown)[:10]}")
    for name, pieces in parts.items():
        if sorted(pieces) != list(range(counts[name])):
            present = [key for key, _ in pieces.values()]
            raise ValueError(f"{name} needs {counts[name]} parts; the checkpoint has only {present}")
        shapes = {tuple(t.shape) for _, t in pieces.values()}
        if len(shapes) != 1:
            raise ValueError(f"parts of {name} differ in shape: { {k: tuple(t.shape) for k, t in pieces.values()} }")
        out[name] = torch.cat([pieces[i][1] for i in range(counts[name])], dim=0)
    return out


def mirror_keys(state_dict: Mapping[str, Tensor], mapping: KeyMap, what: str) -> dict[str, Tensor]:
    """Our layout -> a source layout: the inverse of `convert_keys` for `mapping` (dropped keys are not written).

    Raises:
        ValueError: a key of ours the map has no source key for.
    """
    inverse: dict[str, list[tuple[str, Target]]] = {}
    for theirs, target in mapping.items():
        if target is not None:
            inverse.setdefault(target if isinstance(target, str) else target.target, []).append((theirs, target))
    out: dict[str, Tensor] = {}
    for key, tensor in state_dict.items():
        found = _lookup(key, inverse)
        if found is None:
            raise ValueError(f"{key} has no {what} equivalent")
        template, numbers = found
        for theirs, target in inverse[template]:
            if isinstance(target, Part):
                value = tensor.chunk(target.count, dim=0)[target.index].clone()
            elif isinstance(target, Op):
                value = _from_ours(tensor, target.kind)
            else:
                value = tensor
            out[theirs.format(*numbers)] = value
    return out


def block_depth(state_dict: Mapping[str, Tensor], path: Path | str, prefix: str = "blocks.") -> int:
    """Number of `blocks.N.*` in a state dict of our layout; raises unless they are numbered 0..N-1."""
    numbers = {int(k.split(".")[1]) for k in state_dict if k.startswith(prefix)}
    depth = max(numbers, default=-1) + 1
    if depth == 0 or numbers != set(range(depth)):
        raise ValueError(f"{path}: blocks must be numbered 0..N-1; found {sorted(numbers)}")
    return depth


def square_patch(state_dict: Mapping[str, Tensor], path: Path | str) -> Tensor:
    """`patch_embed.proj.weight` (D C p p); raises when its kernel is not square."""
    patch = state_dict["patch_embed.proj.weight"]
    if patch.shape[-1] != patch.shape[-2]:
        raise ValueError(f"{path}: patch_embed.proj.weight {tuple(patch.shape)} has a non-square kernel")
    return patch
