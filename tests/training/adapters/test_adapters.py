"""Shared LoRA + TESLA adapters: merge/unmerge/unload equivalence, batched streams, gradient separation, freezing.

Pattern: peft `tests/test_custom_models.py` (a TEST_CASES table over tiny models defined here) and
`tests/testing_common.py` `_test_merge_layers` (one helper asserting merged, unmerged and unloaded outputs agree).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.adapters.layer import AdapterLinear, TaskLinear
from training.adapters.tuner import (
    AdapterConfig,
    active_tasks,
    adapter_parameters,
    adapter_state_dict,
    apply_adapters,
    count_adapter_parameters,
    iter_adapter_layers,
    mark_only_adapters_trainable,
    merge_adapters,
    merge_and_unload,
    prepare_for_merged_weights,
    unmerge_adapters,
)

pytestmark = pytest.mark.timeout(60)

DIM, HEADS, DEPTH, TOKENS, BATCH = 8, 2, 3, 5, 2
TOLERANCES = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}  # atol = rtol


class TinyAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(*qkv.unbind(0))  # B h N d
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class TinyMlp(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TinyBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = TinyAttention(dim, heads)
        self.mlp = TinyMlp(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    def __init__(self, dim: int = DIM, heads: int = HEADS, depth: int = DEPTH) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(TinyBlock(dim, heads) for _ in range(depth))

    def forward(self, x: Tensor) -> Tensor:  # (T B) N D
        for block in self.blocks:
            x = block(x)
        return x


def randomize_adapters(model: nn.Module, seed: int = 0) -> None:
    """B starts at zero (delta 0), which would make every equivalence trivially true: give all factors values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter_parameters(model):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def build(seed: int = 0, dtype: torch.dtype = torch.float32, **config: object) -> tuple[nn.Module, AdapterConfig]:
    torch.manual_seed(seed)
    cfg = AdapterConfig(**{"tasks": ("seg", "act"), **config})
    model = TinyViT()
    apply_adapters(model, cfg)
    randomize_adapters(model, seed)
    return model.to(dtype).eval(), cfg


def streams(num_tasks: int, batch: int = BATCH, dtype: torch.dtype = torch.float32, seed: int = 1) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_tasks * batch, TOKENS, DIM, generator=generator).to(dtype)  # (T B) N D


def assert_streams_match_per_task(
    model: nn.Module, tasks: Sequence[str], x: Tensor, stacked: Tensor, tol: float
) -> None:
    """Stream t of the batched forward `stacked` (T B, ...) equals the model run on stream t alone, task t active."""
    for t, task in enumerate(tasks):
        with active_tasks(model, task):
            alone = model(x[t * BATCH : (t + 1) * BATCH])
        torch.testing.assert_close(stacked[t * BATCH : (t + 1) * BATCH], alone, atol=tol, rtol=tol)


def assert_close(actual: Tensor, expected: Tensor, dtype: torch.dtype) -> None:
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=tol)


def check_merge_layers(model: nn.Module, x: Tensor, dtype: torch.dtype) -> None:
    """Unmerged, merged in place, unmerged again and unloaded outputs agree within the dtype's tolerance."""
    with torch.no_grad():
        unmerged = model(x)
        base = copy.deepcopy(model)
        for param in adapter_parameters(base):
            param.zero_()
        # The adapters must matter, or the comparisons below could not fail.
        assert not torch.allclose(unmerged.float(), base(x).float(), atol=10 * TOLERANCES[dtype])
        merge_adapters(model)
        assert all(layer.merged for _, layer in iter_adapter_layers(model))
        merged = model(x)
        unmerge_adapters(model)
        again = model(x)
        unloaded = merge_and_unload(model)(x)
    assert_close(merged, unmerged, dtype)
    assert torch.equal(again, unmerged)
    assert_close(unloaded, unmerged, dtype)


ALL_TARGETS = ("qkv.q", "qkv.k", "qkv.v", "proj", "fc1", "fc2")
TEST_CASES = [
    # (id, adapter config, dtype)
    ("shared-only qv", {"shared_rank": 4, "task_rank": 0}, torch.float32),
    ("task-only qv", {"shared_rank": 0, "task_rank": 4}, torch.float32),
    ("shared+task qv", {}, torch.float32),
    ("shared+task q", {"targets": ("qkv.q",), "shared_rank": 2, "task_rank": 3}, torch.float32),
    ("shared+task fc1 fc2", {"targets": ("fc1", "fc2")}, torch.float32),
    ("all targets", {"targets": ALL_TARGETS, "alpha": 8.0}, torch.float32),
    ("three tasks qv", {"tasks": ("seg", "act", "depth")}, torch.float32),
    ("three tasks task-only fc1", {"tasks": ("seg", "act", "depth"), "shared_rank": 0, "targets": ("fc1",)}, None),
    ("layer subset", {"layers": (0, 2)}, torch.float32),
    ("dropout in eval", {"dropout": 0.2}, torch.float32),
    ("shared+task qv bf16", {}, torch.bfloat16),
    ("shared+task fc1 fc2 fp16", {"targets": ("fc1", "fc2")}, torch.float16),
]


@pytest.mark.parametrize(("config", "dtype"), [c[1:] for c in TEST_CASES], ids=[c[0] for c in TEST_CASES])
def test_merged_unmerged_unloaded_agree(config: dict, dtype: torch.dtype | None) -> None:
    dtype = dtype or torch.float32
    model, cfg = build(dtype=dtype, **config)
    check_merge_layers(model, streams(len(cfg.tasks), dtype=dtype), dtype)


def test_apply_adapters_returns_paths_and_wraps_without_copying() -> None:
    model = TinyViT()
    qkv = model.blocks[1].attn.qkv
    paths = apply_adapters(model, AdapterConfig(tasks=("seg", "act"), targets=("qkv.q", "qkv.v", "fc2"), layers=(1,)))
    assert paths == ["blocks.1.attn.qkv", "blocks.1.mlp.fc2"]
    layer = model.blocks[1].attn.qkv
    assert isinstance(layer, AdapterLinear) and layer.base_layer is qkv
    assert layer.row_slices == ((0, DIM), (2 * DIM, 3 * DIM))
    assert tuple(layer.lora_A["shared"].shape) == (2 * 4, DIM)  # q and v stacked: one matmul for A
    assert tuple(layer.lora_B["seg"].shape) == (2, DIM, 4)
    assert layer.scaling == {"shared": 1.0, "seg": 1.0, "act": 1.0}
    assert isinstance(model.blocks[0].attn.qkv, nn.Linear)
    # q+v on qkv: 3 adapters x (8*8 + 2*8*4); fc2 (16 -> 8): 3 x (4*16 + 8*4).
    assert count_adapter_parameters(model) == 3 * (64 + 64) + 3 * (64 + 32)
    assert sorted(adapter_state_dict(model)) == sorted(
        f"blocks.1.{sub}.{factor}.{name}"
        for sub in ("attn.qkv", "mlp.fc2")
        for factor in ("lora_A", "lora_B")
        for name in ("shared", "seg", "act")
    )


def test_adapters_start_as_identity() -> None:
    torch.manual_seed(0)
    model = TinyViT()
    plain = copy.deepcopy(model)
    apply_adapters(model, AdapterConfig(tasks=("seg", "act"), targets=ALL_TARGETS))
    x = streams(2)
    torch.testing.assert_close(model(x), plain(x), atol=0, rtol=0)


def test_apply_adapters_errors_name_the_problem() -> None:
    model = TinyViT()
    del model.blocks[1].mlp.fc1
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.fc1"):
        apply_adapters(model, AdapterConfig(tasks=("seg",), targets=("fc1",)))
    with pytest.raises(ValueError, match=r"\[7\]"):
        apply_adapters(TinyViT(), AdapterConfig(tasks=("seg",), layers=(0, 7)))
    with pytest.raises(ValueError, match="no `blocks`"):
        apply_adapters(nn.Linear(2, 2), AdapterConfig(tasks=("seg",)))
    twice = TinyViT()
    apply_adapters(twice, AdapterConfig(tasks=("seg",)))
    with pytest.raises(ValueError, match="already holds adapters"):
        apply_adapters(twice, AdapterConfig(tasks=("seg",)))


def test_unmerge_restores_base_weights_exactly() -> None:
    model, _ = build(targets=ALL_TARGETS)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = streams(2)
    out = model(x)
    merge_adapters(model, "seg")
    merge_adapters(model, ["act"])
    layer = model.blocks[0].attn.qkv
    assert layer.merged_adapters == ["seg", "act"] and tuple(layer.merged_weight.shape) == (2, 3 * DIM, DIM)
    unmerge_adapters(model)
    assert layer.merged_adapters == [] and layer.merged_weight is None
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(model(x), out)


def test_merging_twice_only_warns() -> None:
    model, _ = build()
    layer = model.blocks[0].attn.qkv
    layer.merge("seg")
    with pytest.warns(UserWarning, match="'seg' is already merged"):
        layer.merge(["seg", "act"])
    assert layer.merged_adapters == ["seg", "act"]
    torch.testing.assert_close(layer.merged_weight[1], layer.base_layer.weight + layer.delta_weight("act"))


def test_non_finite_delta_raises_naming_the_task_and_writes_nothing() -> None:
    model, _ = build()
    layer = model.blocks[0].attn.qkv
    layer.merge("seg")
    weight, merged = layer.base_layer.weight.clone(), layer.merged_weight.clone()
    with torch.no_grad():
        layer.lora_B["act"][0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="'act'"):
        layer.merge("act")
    assert layer.merged_adapters == ["seg"]
    assert torch.equal(layer.merged_weight, merged) and torch.equal(layer.base_layer.weight, weight)
    layer.merge("act", safe=False)  # unsafe merge skips the check
    assert layer.merged_adapters == ["seg", "act"]


def test_stacked_forward_matches_per_task_loop() -> None:
    model, cfg = build(tasks=("seg", "act", "depth"), targets=ALL_TARGETS)
    x = streams(3)
    with torch.no_grad():
        stacked = model(x)
        assert_streams_match_per_task(model, cfg.tasks, x, stacked, tol=1e-6)  # model level, one stream at a time
        # Layer level: the batched adapter equals W + delta_weight(t) applied to stream t.
        layer = model.blocks[0].attn.qkv
        out = layer(x)
        for t, task in enumerate(cfg.tasks):
            rows = slice(t * BATCH, (t + 1) * BATCH)
            reference = F.linear(x[rows], layer.base_layer.weight + layer.delta_weight(task), layer.base_layer.bias)
            torch.testing.assert_close(out[rows], reference, atol=1e-6, rtol=1e-6)
        # With the default q/v targets the k rows of the fused qkv keep the base weight.
        qv, _ = build()
        delta = qv.blocks[0].attn.qkv.delta_weight("seg")
        assert torch.count_nonzero(delta[DIM : 2 * DIM]) == 0 and torch.count_nonzero(delta[:DIM]) > 0


def test_task_gradients_are_separated_by_stream() -> None:
    model, _ = build(targets=("qkv.q", "qkv.v", "fc1"))
    loss = model(streams(2))[:BATCH].square().sum()  # stream 0 = "seg" only
    loss.backward()
    for path, layer in iter_adapter_layers(model):
        for factor in (layer.lora_A, layer.lora_B):
            assert factor["act"].grad is None or torch.count_nonzero(factor["act"].grad) == 0, path
            assert torch.count_nonzero(factor["seg"].grad) > 0, path
            assert torch.count_nonzero(factor["shared"].grad) > 0, path


def test_frozen_backbone_stays_frozen_under_adam() -> None:
    model, _ = build(targets=ALL_TARGETS)
    model.train()
    mark_only_adapters_trainable(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {name for name in model.state_dict() if ".lora_" in name}
    base = {name: p.clone() for name, p in model.named_parameters() if not p.requires_grad}
    adapters = {name: p.clone() for name, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.Adam(adapter_parameters(model), lr=1e-2)
    for step in range(3):
        optimizer.zero_grad()
        model(streams(2, seed=step)).square().mean().backward()
        optimizer.step()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[name], value) for name, value in base.items())
    assert all(not torch.equal(params[name], value) for name, value in adapters.items())


def test_merge_and_unload_all_tasks_round_trips_through_strict_load() -> None:
    model, cfg = build(targets=("qkv.q", "qkv.v", "fc1", "fc2"), layers=(0, 2))
    unloaded = merge_and_unload(model)
    assert isinstance(model.blocks[0].attn.qkv, AdapterLinear) and not model.blocks[0].attn.qkv.merged  # not in place
    assert isinstance(unloaded.blocks[0].attn.qkv, TaskLinear) and isinstance(unloaded.blocks[1].attn.qkv, nn.Linear)
    state = unloaded.state_dict()
    assert not [key for key in state if "lora_" in key or "base_layer" in key]
    assert tuple(state["blocks.2.mlp.fc1.weight"].shape) == (2, 2 * DIM, DIM)
    fresh = TinyViT()
    paths = prepare_for_merged_weights(fresh, cfg)
    assert paths == [f"blocks.{i}.{sub}" for i in (0, 2) for sub in ("attn.qkv", "mlp.fc1", "mlp.fc2")]
    fresh.load_state_dict(state, strict=True)
    x = streams(2)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), unloaded(x), atol=0, rtol=0)
        with active_tasks(fresh, ["act"]):  # TaskLinear serves a single stream too
            torch.testing.assert_close(fresh(x[BATCH:]), unloaded(x)[BATCH:], atol=1e-6, rtol=1e-6)


def test_merge_and_unload_single_task_gives_plain_linears() -> None:
    model, cfg = build(targets=ALL_TARGETS)
    unloaded = merge_and_unload(model, "act")
    assert not [m for m in unloaded.modules() if isinstance(m, AdapterLinear | TaskLinear)]
    assert not [key for key in unloaded.state_dict() if "lora_" in key]
    x = streams(1)
    with torch.no_grad(), active_tasks(model, "act"):
        assert_close(unloaded(x), model(x), torch.float32)
    fresh = TinyViT()
    assert prepare_for_merged_weights(fresh, cfg, "act") == []  # same layout as the plain backbone
    fresh.load_state_dict(unloaded.state_dict(), strict=True)


def test_shared_only_layers_accept_any_batch() -> None:
    # Without TESLA every stream sees the same weights, so the model runs one stream of any batch size.
    model, _ = build(shared_rank=4, task_rank=0)
    x = streams(1, batch=3)
    assert model(x).shape == x.shape
    unloaded = merge_and_unload(model)
    assert not [m for m in unloaded.modules() if isinstance(m, TaskLinear)]
    assert_close(unloaded(x), model(x), torch.float32)


def test_active_tasks_subset_order_and_errors() -> None:
    model, _ = build(tasks=("seg", "act", "depth"))
    x = streams(3)
    with torch.no_grad():
        full = model(x)
        with active_tasks(model, ["depth", "seg"]):  # reordered subset
            pair = model(torch.cat([x[2 * BATCH :], x[:BATCH]]))
        torch.testing.assert_close(pair[:BATCH], full[2 * BATCH :], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(pair[BATCH:], full[:BATCH], atol=1e-6, rtol=1e-6)
    layers = [layer for _, layer in iter_adapter_layers(model)]
    assert all(layer.active_tasks is None for layer in layers)  # restored on exit
    with pytest.raises(ValueError, match="unknown task.*'phase'"), active_tasks(model, ["seg", "phase"]):
        pass
    assert all(layer.active_tasks is None for layer in layers)
    with pytest.raises(ValueError, match="not divisible by the 3 active task streams"):
        model(streams(1, batch=4))


def test_merged_forward_needs_its_streams_merged() -> None:
    model, _ = build()
    x = streams(2)
    with torch.no_grad():
        unmerged = model(x)
        merge_adapters(model, "act")
        with pytest.raises(RuntimeError, match=r"\['seg'\] are not merged"):
            model(x)
        merge_adapters(model, "seg")  # merged order (act, seg) differs from the stream order (seg, act)
        assert_close(model(x), unmerged, torch.float32)
        unmerge_adapters(model)
    with torch.no_grad(), active_tasks(model, "seg"):
        merged = model(streams(1))
        unmerge_adapters(model)
        assert_close(merged, model(streams(1)), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_delta_is_computed_in_fp32(dtype: torch.dtype) -> None:
    model, _ = build(targets=("qkv.q", "qkv.v"))
    layer = model.blocks[0].attn.qkv
    with torch.no_grad():
        for param in adapter_parameters(layer):
            param.mul_(7.0)  # large enough products that half-precision accumulation would round differently
    low = copy.deepcopy(layer).to(dtype)
    reference = copy.deepcopy(low).float()  # the same (rounded) factors, multiplied in fp32
    for task in ("seg", "act"):
        delta = low.delta_weight(task)
        assert delta.dtype == dtype
        assert torch.equal(delta, reference.delta_weight(task).to(dtype))


CONFIG_ERRORS = [
    ({"tasks": ()}, "tasks=\\[\\]"),
    ({"tasks": ("seg", "seg")}, "tasks="),
    ({"tasks": ("shared",)}, "'shared'"),
    ({"tasks": ("a.b",)}, "a.b"),
    ({"shared_rank": -1}, "shared_rank=-1"),
    ({"task_rank": 2.5}, "task_rank=2.5"),
    ({"shared_rank": 0, "task_rank": 0}, "nothing to adapt"),
    ({"alpha": 0.0}, "alpha=0.0"),
    ({"dropout": 1.0}, "dropout=1.0"),
    ({"targets": ("qkv.x",)}, "qkv.x"),
    ({"targets": ()}, "targets=\\[\\]"),
    ({"layers": (0, -1)}, "layers=\\[0, -1\\]"),
    ({"layers": ()}, "layers=\\[\\]"),
]


@pytest.mark.parametrize(("overrides", "message"), CONFIG_ERRORS)
def test_config_rejects_bad_values(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AdapterConfig(**{"tasks": ("seg", "act"), **overrides})


def test_config_round_trips_through_json() -> None:
    cfg = AdapterConfig(tasks=["seg", "act"], targets=["fc1"], layers=[0, 3], alpha=2.0)
    assert cfg.tasks == ("seg", "act") and cfg.layers == (0, 3)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert AdapterConfig.from_dict(data) == cfg
    with pytest.raises(ValueError, match="'rank'"):
        AdapterConfig.from_dict({**data, "rank": 4})


def test_adapter_linear_shape_checks() -> None:
    with pytest.raises(ValueError, match="equal-size"):
        AdapterLinear(nn.Linear(4, 12), tasks=("seg",), row_slices=[(0, 4), (4, 6)])
    with pytest.raises(ValueError, match="equal-size"):
        AdapterLinear(nn.Linear(4, 12), tasks=("seg",), row_slices=[(0, 8), (4, 12)])
    layer = AdapterLinear(nn.Linear(4, 12), tasks=("seg",), shared_rank=2, task_rank=0, alpha=1.0)
    assert layer.row_index is None and math.isclose(layer.scaling["shared"], 0.5)
