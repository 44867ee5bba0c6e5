"""Cast a program's GEMM and convolution weights to fp16/bf16 once, so autocast stops casting them on every call.

Under `torch.autocast` each `linear`/`conv2d`/`baddbmm`/... casts its float32 weight to the low dtype on every call
(the weight cache must stay off around a CUDA graph capture, and it is emptied when the autocast region exits
anyway). For ViT-S that is one extra kernel and a read of 44 MB plus a write of 22 MB per call, captured into the
CUDA graph and replayed with it. Casting those weights ahead of time gives bit-identical results, because autocast
would have produced the same low-precision copies, and a weight that is already in the low dtype is passed through.

Only weights whose every consumer is an op that autocast runs in the low dtype (directly, or through view ops such
as `transpose`) are cast. Norm weights, batch-norm statistics, the pixel mean/std and anything else stay float32,
so the numerics of the ops autocast keeps in float32 (layer/group norm, softmax, the normalisation) do not change.
Autocast op lists: https://pytorch.org/docs/stable/amp.html#autocast-op-reference
"""

from __future__ import annotations

from typing import Any

# Ops that autocast runs in the low dtype on CUDA (fp16/bf16) and on CPU (bf16), named as in an exported program.
LOW_PRECISION_OPS = frozenset(
    {
        "aten.linear.default",
        "aten.conv1d.default",
        "aten.conv2d.default",
        "aten.conv3d.default",
        "aten.conv_transpose2d.input",
        "aten.matmul.default",
        "aten.mm.default",
        "aten.bmm.default",
        "aten.addmm.default",
        "aten.baddbmm.default",
    }
)
# Ops that only reshape their input: a weight seen through them still ends in a low-precision op.
VIEW_OPS = frozenset(
    {
        "aten.transpose.int",
        "aten.permute.default",
        "aten.reshape.default",
        "aten.view.default",
        "aten.t.default",
        "aten.unsqueeze.default",
        "aten.expand.default",
    }
)


def _feeds_low_precision_only(node: Any) -> bool:
    if not node.users:
        return False
    for user in node.users:
        target = str(user.target)
        if target in LOW_PRECISION_OPS:
            continue
        if target in VIEW_OPS and user.args and user.args[0] is node and _feeds_low_precision_only(user):
            continue
        return False
    return True


def _owner(module: Any, target: str) -> tuple[Any, str]:
    *path, name = target.split(".")
    for part in path:
        module = getattr(module, part)
    return module, name


def precast_gemm_weights(module: Any, dtype: Any) -> int:
    """Cast, in place, the float32 attributes of the graph module `module` that feed only low-precision ops.

    Returns:
        how many tensors were cast (0 when the program has no such weights).
    """
    import torch

    cast = 0
    for node in module.graph.nodes:
        if node.op != "get_attr" or not _feeds_low_precision_only(node):
            continue
        owner, name = _owner(module, node.target)
        value = getattr(owner, name)
        if not isinstance(value, torch.Tensor) or value.dtype != torch.float32:
            continue
        low = value.detach().to(dtype)
        if isinstance(value, torch.nn.Parameter):
            setattr(owner, name, torch.nn.Parameter(low, requires_grad=False))
        elif name in getattr(owner, "_buffers", {}):
            owner._buffers[name] = low
        else:
            setattr(owner, name, low)
        cast += 1
    return cast
