"""EndoARSS assembly: batched per-task streams, gradient separation, frozen base, switchable SMA, paper config."""

import logging

import pytest
import torch
import torch.nn.functional as F

from training.adapters.tuner import merged_copy
from training.builders.registry import build_model
from training.config import load_config
from training.engine.supervised import split_parameters, task_losses
from training.engine.weighting import build_weighting

TASKS = [
    {"name": "activity", "kind": "classification", "classes": ["a", "b", "c"]},
    {"name": "segmentation", "kind": "segmentation", "classes": ["bg", "x", "y", "z"]},
]
SMALL = ["model.image_size=[32, 48]", "model.backbone.overrides={embed_dim: 32, depth: 2, num_heads: 2}"]


def _randomise_adapters(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)


def _images(batch: int = 2, height: int = 32, width: int = 48) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8)


def test_outputs_and_streams():
    model = build_model(load_config("tiny", SMALL).model, TASKS).eval()
    assert model.per_task_streams
    out = model(_images())
    assert out["activity"].shape == (2, 3)
    assert out["segmentation"].shape == (2, 4, 32, 48)
    single = build_model(load_config("tiny", [*SMALL, "model.adapters.task_rank=0"]).model, TASKS)
    assert not single.per_task_streams  # no per-task weights: one shared stream feeds both heads


def test_a_frozen_backbone_left_at_random_init_is_reported(caplog: pytest.LogCaptureFixture):
    frozen = load_config("tiny", [*SMALL, "model.backbone.freeze=true"]).model
    with caplog.at_level(logging.WARNING, logger="training.builders.shared"):
        build_model(frozen, TASKS)
        assert "vit_tiny_p8 is frozen at its random init" in caplog.text and "model.backbone.checkpoint" in caplog.text
        caplog.clear()
        build_model(load_config("tiny", SMALL).model, TASKS)  # trained from scratch on purpose
        build_model(frozen, TASKS, load_backbone_weights=False)  # a full checkpoint is loaded next
    assert "random init" not in caplog.text


def test_batched_streams_equal_one_task_at_a_time():
    model = build_model(load_config("tiny", SMALL).model, TASKS).eval()
    _randomise_adapters(model)
    images = _images(3)
    with torch.inference_mode():
        both = model(images)
        for task in model.tasks:
            alone = model(images, tasks=[task])
            torch.testing.assert_close(alone[task], both[task], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown task"):
        model(images, tasks=["depth"])


def test_task_gradient_separation():
    model = build_model(load_config("tiny", SMALL).model, TASKS).train()
    _randomise_adapters(model)
    out = model(_images())
    F.cross_entropy(out["segmentation"], torch.randint(0, 4, (2, 32, 48))).backward()
    names = model.task_parameter_names()
    params = dict(model.named_parameters())
    activity_adapter = [n for n in names["activity"] if "lora_" in n]
    seg_adapter = [n for n in names["segmentation"] if "lora_" in n]
    assert activity_adapter and seg_adapter
    assert all(params[n].grad is None or not params[n].grad.any() for n in activity_adapter)
    assert any(params[n].grad is not None and params[n].grad.any() for n in seg_adapter)


def test_sma_switch_and_identity_start():
    on = build_model(load_config("tiny", SMALL).model, TASKS)
    off = build_model(load_config("tiny", [*SMALL, "model.sma.enabled=false"]).model, TASKS)
    assert on.sma is not None and off.sma is None
    x = on.normalize(_images())
    torch.testing.assert_close(on.sma(x), x, atol=1e-6, rtol=0)


def test_merged_copy_matches_and_leaves_model_untouched():
    model = build_model(load_config("tiny", SMALL).model, TASKS).eval()
    _randomise_adapters(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = merged_copy(model)
    assert not [k for k in merged.state_dict() if "lora_" in k]
    images = _images()
    with torch.inference_mode():
        a, b = model(images), merged(images)
    for task in a:
        torch.testing.assert_close(a[task], b[task], atol=1e-5, rtol=1e-5)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_paper_config_builds_and_takes_one_training_step():
    """endoarss_vits14: frozen ViT-S/14 + LoRA/TESLA + SMA; one DB-MTL step on CPU, base weights untouched."""
    torch.manual_seed(0)
    cfg = load_config("endoarss_vits14")
    model = build_model(cfg.model, TASKS).train()
    frozen = {n: p.detach().clone() for n, p in model.backbone.named_parameters() if not p.requires_grad}
    assert frozen and all("lora_" not in n for n in frozen)
    shared, params = split_parameters(model)
    optimizer = torch.optim.Adam(params, lr=1e-3)
    weighting = build_weighting("dbmtl", model.tasks)
    images = _images(2, 224, 224)
    batch = {"mask": torch.randint(0, 4, (2, 224, 224)), "activity": torch.tensor([0, 2])}
    losses = task_losses(model, model(images), batch)
    weighting.backward(losses, shared, epoch=0)
    optimizer.step()
    for name, p in model.backbone.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    assert all(torch.isfinite(loss) for loss in losses.values())
