"""TA-LoRA adapters: Tucker update per task, merge/unmerge/unload equivalence, streams, regulariser, freezing, growth.

Pattern: peft `tests/test_custom_models.py` (a TEST_CASES table over tiny models) with the shared merge helper and
tiny ViT of `test_adapters.py` (`_test_merge_layers` of peft `tests/testing_common.py`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.training.adapters.test_adapters import (
    BATCH,
    DIM,
    TinyViT,
    assert_close,
    assert_streams_match_per_task,
    build,
    check_merge_layers,
    streams,
)
from tests.training.conftest import TINY_OVERRIDES
from training.adapters.layer import AdapterLinear, TaskLinear
from training.adapters.ta_lora import (
    PAPER_RANKS,
    TaskAwareLoraVariant,
    lora_parameter_count,
    orthogonality_terms,
    parameter_growth,
    ta_lora_parameter_count,
    uses_ta_lora,
)
from training.adapters.tuner import (
    AdapterConfig,
    active_tasks,
    adapter_parameters,
    adapter_regularization,
    apply_adapters,
    is_adapter_key,
    iter_adapter_layers,
    mark_only_adapters_trainable,
    merge_and_unload,
    prepare_for_merged_weights,
    unmerge_adapters,
)
from training.builders.backbones import build_backbone
from training.builders.registry import build_model
from training.config import load_config
from training.data.writer import synth_labels
from training.engine.distributed import init_distributed
from training.engine.supervised import TaskTrainer
from training.engine.trainer import seed_everything

pytestmark = pytest.mark.timeout(60)

QKV = ("qkv.q", "qkv.k", "qkv.v")
FACTORS = set(TaskAwareLoraVariant.factor_names)


def build_ta(seed: int = 0, dtype: torch.dtype = torch.float32, **config: object) -> tuple[nn.Module, AdapterConfig]:
    """Tiny ViT with TA-LoRA on the whole qkv (ranks 4, 3, 2), U factors N(0, 1) and a non-zero core G ~ N(0, 0.1)."""
    model, cfg = build(seed, **{"kind": "ta_lora", "targets": QKV, "ta_lora_ranks": (4, 3, 2), **config})
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1] in FACTORS:
                param.copy_(torch.randn(param.shape, generator=generator) * (0.1 if name.endswith("_G") else 1.0))
    return model.to(dtype), cfg


TEST_CASES = [
    # (id, adapter config on top of `build_ta`, dtype)
    ("qkv", {}, torch.float32),
    ("q v slices", {"targets": ("qkv.q", "qkv.v")}, torch.float32),
    ("three tasks", {"tasks": ("seg", "act", "depth")}, torch.float32),
    ("one task", {"tasks": ("seg",)}, torch.float32),
    ("fc1 fc2 proj", {"targets": ("fc1", "fc2", "proj")}, torch.float32),
    ("R3 above T", {"ta_lora_ranks": (2, 5, 4)}, torch.float32),
    ("layer subset", {"layers": (0, 2)}, torch.float32),
    ("scaling 2 + dropout in eval", {"ta_lora_scaling": 2.0, "dropout": 0.1}, torch.float32),
    ("qkv bf16", {}, torch.bfloat16),
    ("fc1 fc2 fp16", {"targets": ("fc1", "fc2")}, torch.float16),
]


@pytest.mark.parametrize(("config", "dtype"), [c[1:] for c in TEST_CASES], ids=[c[0] for c in TEST_CASES])
def test_merged_unmerged_unloaded_agree(config: dict, dtype: torch.dtype) -> None:
    model, cfg = build_ta(dtype=dtype, **config)
    assert all(uses_ta_lora(layer) for _, layer in iter_adapter_layers(model))
    check_merge_layers(model, streams(len(cfg.tasks), dtype=dtype), dtype)


def test_delta_weight_is_the_task_slice_of_the_tucker_tensor() -> None:
    model, cfg = build_ta(tasks=("seg", "act", "depth"), ta_lora_scaling=0.5)
    layer = model.blocks[1].attn.qkv
    g, u1, u2, u3 = (getattr(layer, name) for name in ("ta_lora_G", "ta_lora_U1", "ta_lora_U2", "ta_lora_U3"))
    assert g.shape == (4, 3, 2) and u1.shape == (DIM, 4) and u2.shape == (3 * DIM, 3) and u3.shape == (3, 2)
    # dW(i, j, t) = sum_{m,n,l} G(m, n, l) U1(i, m) U2(j, n) U3(t, l)   (paper eq. 4), d x k x T
    tensor = torch.einsum("mnl,im,jn,tl->ijt", g, u1, u2, u3)
    for t, task in enumerate(cfg.tasks):
        torch.testing.assert_close(layer.delta_weight(task), 0.5 * tensor[:, :, t].T, atol=1e-5, rtol=1e-5)
    # q/v slices: the update covers the adapted rows only, k rows keep the base weight.
    qv, _ = build_ta(targets=("qkv.q", "qkv.v"))
    qv_layer = qv.blocks[0].attn.qkv
    assert qv_layer.ta_lora_U2.shape == (2 * DIM, 3)
    delta = qv_layer.delta_weight("seg")
    assert torch.count_nonzero(delta[DIM : 2 * DIM]) == 0 and torch.count_nonzero(delta[2 * DIM :]) > 0


def test_initialisation_is_a_zero_core_and_standard_normal_factors() -> None:
    torch.manual_seed(0)
    model = TinyViT()
    plain = copy.deepcopy(model)
    apply_adapters(model, AdapterConfig(tasks=("seg", "act"), kind="ta_lora", targets=QKV, ta_lora_ranks=(4, 4, 2)))
    x = streams(2)
    torch.testing.assert_close(model(x), plain(x), atol=0, rtol=0)  # dW starts at exactly zero
    layer = model.blocks[0].attn.qkv
    assert torch.count_nonzero(layer.ta_lora_G) == 0
    assert layer.r == {"ta_lora": (4, 4, 2)} and layer.scaling == {"ta_lora": 0.5} and layer.per_task
    big = AdapterLinear(nn.Linear(256, 768), tasks=("a", "b"), shared_rank=0, task_rank=0, ta_lora_ranks=(16, 16, 2))
    factors = torch.cat([big.ta_lora_U1.flatten(), big.ta_lora_U2.flatten()]).detach()
    assert abs(float(factors.mean())) < 0.02 and abs(float(factors.std()) - 1.0) < 0.02


def test_stacked_streams_match_per_task_forward_in_any_order() -> None:
    model, cfg = build_ta(tasks=("seg", "act", "depth"), targets=("qkv.q", "qkv.v", "fc1"))
    x = streams(3)
    with torch.no_grad():
        stacked = model(x)
        assert_streams_match_per_task(model, cfg.tasks, x, stacked, tol=1e-5)
        with active_tasks(model, ["depth", "seg"]):
            pair = model(torch.cat([x[2 * BATCH :], x[:BATCH]]))
        torch.testing.assert_close(pair[:BATCH], stacked[2 * BATCH :], atol=1e-5, rtol=1e-5)
        layer = model.blocks[0].attn.qkv
        out = layer(x)
        for t, task in enumerate(cfg.tasks):
            rows = slice(t * BATCH, (t + 1) * BATCH)
            reference = F.linear(x[rows], layer.base_layer.weight + layer.delta_weight(task), layer.base_layer.bias)
            torch.testing.assert_close(out[rows], reference, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="not divisible by the 3 active task streams"):
        model(streams(1, batch=4))


def test_a_stream_reaches_only_its_own_row_of_u3() -> None:
    model, _ = build_ta()
    model(streams(2))[:BATCH].square().sum().backward()  # stream 0 = "seg" only
    for path, layer in iter_adapter_layers(model):
        grad = layer.ta_lora_U3.grad
        assert torch.count_nonzero(grad[0]) > 0 and torch.count_nonzero(grad[1]) == 0, path
        assert all(torch.count_nonzero(getattr(layer, n).grad) > 0 for n in ("ta_lora_G", "ta_lora_U1", "ta_lora_U2"))


def test_merge_contract_safe_check_twice_and_exact_unmerge() -> None:
    model, _ = build_ta()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = streams(2)
    out = model(x)
    layer = model.blocks[0].attn.qkv
    layer.merge("seg")
    with pytest.warns(UserWarning, match="'seg' is already merged"):
        layer.merge(["seg", "act"])
    assert layer.merged_adapters == ["seg", "act"] and tuple(layer.merged_weight.shape) == (2, 3 * DIM, DIM)
    torch.testing.assert_close(layer.merged_weight[1], layer.base_layer.weight + layer.delta_weight("act"))
    layer.unmerge()
    assert layer.merged_weight is None and not layer.merged
    with torch.no_grad():
        layer.ta_lora_U3[1, 0] = float("inf")  # only task "act" (row 1) diverged
    with pytest.raises(ValueError, match="'act'"):
        layer.merge(["seg", "act"])
    assert layer.merged_adapters == [] and layer.merged_weight is None  # checked before anything was written
    layer.merge("seg")
    with torch.no_grad():
        layer.ta_lora_U3[1, 0] = before["blocks.0.attn.qkv.ta_lora_U3"][1, 0]
    unmerge_adapters(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(model(x), out)


def test_merge_and_unload_gives_stacked_weights_that_load_strictly() -> None:
    model, cfg = build_ta(layers=(0, 2))
    unloaded = merge_and_unload(model)
    assert uses_ta_lora(model.blocks[0].attn.qkv)  # not in place
    assert isinstance(unloaded.blocks[0].attn.qkv, TaskLinear) and isinstance(unloaded.blocks[1].attn.qkv, nn.Linear)
    state = unloaded.state_dict()
    assert not [key for key in state if is_adapter_key(key) or "ta_lora" in key or "base_layer" in key]
    assert "adapter_config" in vars(model) and "adapter_config" not in vars(unloaded)
    for t, task in enumerate(cfg.tasks):
        layer = model.blocks[2].attn.qkv
        torch.testing.assert_close(state["blocks.2.attn.qkv.weight"][t], layer.weight + layer.delta_weight(task))
    fresh = TinyViT()
    assert prepare_for_merged_weights(fresh, cfg) == ["blocks.0.attn.qkv", "blocks.2.attn.qkv"]
    fresh.load_state_dict(state, strict=True)
    x = streams(2)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model(x), atol=1e-5, rtol=1e-5)
    single = merge_and_unload(model, "act")
    assert not [m for m in single.modules() if isinstance(m, AdapterLinear | TaskLinear)]
    with torch.no_grad(), active_tasks(model, "act"):
        assert_close(single(x[BATCH:]), model(x[BATCH:]), torch.float32)


def _reference_terms(layer: AdapterLinear) -> list[torch.Tensor]:
    """||U1'U1 - I||_F, ||U2'U2 - I||_F, ||G_v'G_v - I||_F per slice v, written out directly."""
    u1, u2, g = layer.ta_lora_U1, layer.ta_lora_U2, layer.ta_lora_G
    terms = [
        torch.linalg.norm(u1.T @ u1 - torch.eye(u1.shape[1])),
        torch.linalg.norm(u2.T @ u2 - torch.eye(u2.shape[1])),
    ]
    terms += [torch.linalg.norm(g[:, :, v].T @ g[:, :, v] - torch.eye(g.shape[1])) for v in range(g.shape[2])]
    return terms


@pytest.mark.parametrize("penalty", ["norm", "squared"])
def test_orthogonal_regulariser_is_lambda_times_the_code_or_the_paper_form(penalty: str) -> None:
    model, _ = build_ta(orth_weight=0.25, ta_lora_ranks=(4, 3, 2), orth_penalty=penalty)
    layers = [layer for _, layer in iter_adapter_layers(model)]
    assert all(len(_reference_terms(layer)) == 2 + 2 for layer in layers)
    if penalty == "norm":  # public code: the mean of the norms over slices and layers
        expected = torch.stack([term for layer in layers for term in _reference_terms(layer)]).mean()
    else:  # paper eq. 5 per layer (sum of squared norms), averaged over layers
        expected = torch.stack([torch.stack(_reference_terms(layer)).square().sum() for layer in layers]).mean()
    value = adapter_regularization(model)
    torch.testing.assert_close(value, 0.25 * expected)
    norms = torch.stack(_reference_terms(layers[0]))
    torch.testing.assert_close(orthogonality_terms(layers[0], penalty), norms if penalty == "norm" else norms**2)
    value.backward()
    assert all(layer.ta_lora_U3.grad is None for layer in layers)  # U3 is not regularised
    assert all(torch.count_nonzero(layer.ta_lora_G.grad) > 0 for layer in layers)
    # Orthonormal U1, U2 and core slices with orthonormal columns (R1 >= R2) give zero.
    with torch.no_grad():
        for layer in layers:
            layer.ta_lora_U1.copy_(torch.linalg.qr(torch.randn(DIM, 4)).Q)
            layer.ta_lora_U2.copy_(torch.linalg.qr(torch.randn(3 * DIM, 3)).Q)
            layer.ta_lora_G.copy_(torch.stack([torch.linalg.qr(torch.randn(4, 3)).Q for _ in range(2)], dim=-1))
    assert float(adapter_regularization(model).detach()) < 1e-5


def test_defaults_are_the_papers_eq5_and_ranks() -> None:
    """Without orth_penalty the regulariser is eq. 5, the sum of squared Frobenius norms (the mean of unsquared norms
    before); the default ranks are the paper's (32, 32, 8)."""
    assert AdapterConfig(tasks=("seg", "act"), kind="ta_lora").ta_lora_ranks == PAPER_RANKS == (32, 32, 8)
    model, _ = build_ta(ta_lora_ranks=(4, 3, 2))  # orth_penalty left at its default
    layers = [layer for _, layer in iter_adapter_layers(model)]
    expected = torch.stack([torch.stack(_reference_terms(layer)).square().sum() for layer in layers]).mean()
    torch.testing.assert_close(adapter_regularization(model), expected)


def test_regulariser_is_a_constant_zero_where_it_does_not_apply() -> None:
    lora_tesla, _ = build()
    no_weight, _ = build_ta(orth_weight=0.0)
    merged = merge_and_unload(build_ta()[0])
    for model in (lora_tesla, no_weight, merged, TinyViT()):
        value = adapter_regularization(model)
        assert float(value) == 0.0 and not value.requires_grad


@pytest.mark.parametrize("tune_layernorm", [False, True])
def test_only_factors_train_and_the_frozen_base_stays_byte_identical(tune_layernorm: bool) -> None:
    model, _ = build_ta(tune_layernorm=tune_layernorm, dropout=0.1)
    model.train()
    mark_only_adapters_trainable(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    norms = {name for name in model.state_dict() if ".norm" in name}
    factors = {name for name in model.state_dict() if name.rsplit(".", 1)[-1] in FACTORS}
    assert len(factors) == 4 * 3 and trainable == (factors | norms if tune_layernorm else factors)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    tuned = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(2):
        optimizer.zero_grad()
        loss = model(streams(2, seed=step)).square().mean() + adapter_regularization(model)
        loss.backward()
        optimizer.step()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[name], value) for name, value in frozen.items())
    assert all(not torch.equal(params[name], value) for name, value in tuned.items())


def test_trainer_step_adds_the_regulariser_and_keeps_the_frozen_backbone(synth_data: Path, tmp_path: Path) -> None:
    overrides = [*TINY_OVERRIDES, f"data.root={synth_data}", "model.backbone.freeze=true"]
    cfg = load_config("tiny_talora", [*overrides, "model.adapters.tune_layernorm=true", "train.epochs=1"])
    trainer = TaskTrainer(cfg, tmp_path, init_distributed("cpu"), progress=False)
    assert trainer.model.per_task_streams
    backbone = trainer.model.backbone
    frozen = {n: p.detach().clone() for n, p in backbone.named_parameters() if not p.requires_grad}
    norms = {n: p.detach().clone() for n, p in backbone.named_parameters() if p.requires_grad and "norm" in n}
    assert frozen and norms and all("base_layer" in n or "norm" not in n for n in frozen)
    regulariser = float(adapter_regularization(trainer.model).detach())
    stats = trainer.train_epoch(0)
    assert set(stats) == {"loss.activity", "loss.segmentation", "regularization"}
    assert 0 < stats["regularization"] <= regulariser * 1.01  # lambda = 1; it starts large (N(0, 1) factors)
    params = dict(backbone.named_parameters())
    assert all(torch.equal(params[n], value) for n, value in frozen.items())
    assert all(not torch.equal(params[n], value) for n, value in norms.items())


class _StopBeforeStep(Exception):
    pass


def test_regulariser_gradient_is_added_after_the_task_gradients_are_clipped(synth_data: Path, tmp_path: Path) -> None:
    """The clip sees the task gradients only: the heads get the same gradient with or without the regulariser."""

    def first_step_head_grads(orth_weight: float) -> dict[str, torch.Tensor]:
        overrides = [*TINY_OVERRIDES, f"data.root={synth_data}", "optim.grad_clip=0.01", "train.epochs=1"]
        cfg = load_config("tiny_talora", [*overrides, f"model.adapters.orth_weight={orth_weight}"])
        seed_everything(cfg.train.seed)
        trainer = TaskTrainer(cfg, tmp_path / str(orth_weight), init_distributed("cpu"), progress=False)
        grads: dict[str, torch.Tensor] = {}

        def record() -> None:
            named = trainer.model.named_parameters()
            grads.update({n: p.grad.clone() for n, p in named if n.startswith("heads.") and p.grad is not None})
            raise _StopBeforeStep

        trainer.optimizer.step = record  # type: ignore[method-assign]
        with pytest.raises(_StopBeforeStep):
            trainer.train_epoch(0)
        return grads

    with_regulariser, without = first_step_head_grads(1.0), first_step_head_grads(0.0)
    assert with_regulariser.keys() == without.keys() and with_regulariser
    for name, grad in without.items():
        torch.testing.assert_close(with_regulariser[name], grad, msg=name)


@pytest.mark.parametrize("name", ["vit_tiny_p14", "clip_tiny", "sam_tiny"])
def test_any_of_our_encoders_takes_ta_lora_on_qkv(name: str) -> None:
    """DINOv2, CLIP and SAM (windowed blocks) encoders: task-major streams, one task alone, merged == unmerged."""
    torch.manual_seed(0)
    encoder = build_backbone(name).eval()
    config = AdapterConfig(tasks=("seg", "act"), kind="ta_lora", targets=QKV, ta_lora_ranks=(4, 4, 2))
    assert apply_adapters(encoder, config) == [f"blocks.{i}.attn.qkv" for i in range(len(encoder.blocks))]
    with torch.no_grad():
        for _, layer in iter_adapter_layers(encoder):
            layer.ta_lora_G.normal_(0, 0.05)
    size = encoder.patch_size * 4
    images = torch.randn(2, 3, size, size)

    def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = model.forward_features(x)
        return out["image_embeddings"] if "image_embeddings" in out else out["x_norm_patchtokens"]

    with torch.no_grad():
        both = features(encoder, torch.cat([images, images]))  # (T B) ...: stream "seg", then stream "act"
        with active_tasks(encoder, "act"):
            alone = features(encoder, images)
        unloaded = features(merge_and_unload(encoder), torch.cat([images, images]))
    torch.testing.assert_close(both[2:], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unloaded, both, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(both[:2], both[2:], atol=1e-3)  # each task its own slice of the update


def test_tiny_talora_config_builds_a_per_task_stream_model() -> None:
    cfg = load_config("tiny_talora")
    section = cfg.model.adapters
    assert (section.kind, section.ta_lora_ranks, section.ta_lora_scaling, section.dropout) == (
        "ta_lora",
        (8, 8, 2),
        0.5,
        0.1,
    )
    tasks = synth_labels({}).to_dict()["tasks"]
    model = build_model(cfg.model, tasks)
    layers = dict(iter_adapter_layers(model))
    assert model.per_task_streams and sorted(layers) == [f"backbone.blocks.{i}.attn.qkv" for i in range(4)]
    assert all(uses_ta_lora(layer) and layer.row_index is None for layer in layers.values())  # whole qkv
    merged = build_model(cfg.model, tasks, merged=True, load_backbone_weights=False)
    assert isinstance(merged.backbone.blocks[0].attn.qkv, TaskLinear)
    default = build_model(load_config("tiny").model, tasks)  # the LoRA/TESLA config has no regulariser
    assert not adapter_regularization(default).requires_grad


CONFIG_ERRORS = [
    ({"kind": "tucker"}, "kind='tucker'"),
    ({"kind": "ta_lora", "ta_lora_ranks": (4, 4)}, r"ranks \(4, 4\)"),
    ({"kind": "ta_lora", "ta_lora_ranks": (4, 0, 2)}, r"ranks \(4, 0, 2\)"),
    ({"kind": "ta_lora", "ta_lora_ranks": (4, 2.5, 2)}, "three positive integers"),
    ({"kind": "ta_lora", "ta_lora_scaling": 0.0}, "ta_lora_scaling=0.0"),
    ({"kind": "ta_lora", "orth_weight": -1.0}, "orth_weight=-1.0"),
    ({"kind": "ta_lora", "orth_weight": float("nan")}, "orth_weight=nan"),
    ({"kind": "ta_lora", "orth_penalty": "l1"}, "orth_penalty='l1'"),
    ({"kind": "ta_lora", "tune_layernorm": "yes"}, "tune_layernorm='yes'"),
    ({"kind": "ta_lora", "tasks": ("seg", "ta_lora")}, "'ta_lora'"),
]


@pytest.mark.parametrize(("overrides", "message"), CONFIG_ERRORS)
def test_config_rejects_bad_values(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AdapterConfig(**{"tasks": ("seg", "act"), **overrides})


def test_config_kind_round_trips_and_replaces_the_lora_ranks() -> None:
    cfg = AdapterConfig(tasks=["seg", "act"], kind="ta_lora", ta_lora_ranks=[8, 8, 2], tune_layernorm=True)
    assert (cfg.shared_rank, cfg.task_rank, cfg.ta_lora_ranks, cfg.per_task) == (0, 0, (8, 8, 2), True)
    assert AdapterConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert not AdapterConfig(tasks=["seg"], task_rank=0).per_task
    with pytest.raises(ValueError, match="some adapter must be present"):
        AdapterLinear(nn.Linear(4, 4), tasks=("seg",), shared_rank=0, task_rank=0)


def test_parameter_counts_match_the_layers_built() -> None:
    d, k = 24, 72
    for tasks in (1, 3):
        names = tuple(f"t{i}" for i in range(tasks))
        ta = AdapterLinear(nn.Linear(d, k), tasks=names, shared_rank=0, task_rank=0, ta_lora_ranks=(5, 4, 3))
        lora = AdapterLinear(nn.Linear(d, k), tasks=names, shared_rank=0, task_rank=6)
        assert sum(p.numel() for p in adapter_parameters(ta)) == ta_lora_parameter_count(d, k, tasks, (5, 4, 3))
        assert sum(p.numel() for p in adapter_parameters(lora)) == lora_parameter_count(d, k, tasks, 6)


def test_parameter_growth_table_is_sublinear_in_the_number_of_tasks() -> None:
    table = parameter_growth()
    assert [row["tasks"] for row in table] == [1, 2, 4, 8, 16]
    assert all(set(row) == {"tasks", "ta_lora", "lora", "ratio"} for row in table)
    assert all(isinstance(row["ta_lora"], int) and isinstance(row["lora"], int) for row in table)
    # ViT-S/14 qkv (384 -> 1152) in 12 blocks at ranks (32, 32, 4) against rank-32 LoRA per task.
    assert table[0]["ta_lora"] == 12 * ta_lora_parameter_count(384, 1152, 1, PAPER_RANKS)
    assert table[1]["lora"] == 12 * 2 * 32 * (384 + 1152)
    for before, after in zip(table, table[1:], strict=False):
        added = after["tasks"] - before["tasks"]
        ta_growth = (after["ta_lora"] - before["ta_lora"]) / added
        lora_growth = (after["lora"] - before["lora"]) / added
        assert ta_growth == 12 * PAPER_RANKS[2] < lora_growth  # R3 numbers per layer per task vs r (d + k)
        assert after["ratio"] < before["ratio"]
    assert table[-1]["ratio"] < 0.1
    with pytest.raises(ValueError, match="positive integers"):
        parameter_growth((1, 0))
