"""BDTA + MoTE family: shapes, frozen main branch without gradients, router noise, gamma start, training + eval.

Models are tiny (width-32 ViT with 4 blocks, bypass width 8) so every test runs in seconds on a CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from endostream.cli import main
from tests.training.conftest import TINY_OVERRIDES
from training.builders.registry import build_model
from training.checkpoint import load_checkpoint
from training.config import load_config
from training.engine.run import train
from training.engine.supervised import split_parameters, task_losses
from training.engine.weighting import build_weighting
from training.eval.evaluate import run_evaluation
from training.layers.bdta import BDTA
from training.layers.mote import MoTE, TaskRouter
from training.models.bdta import BDTAMoTE, evenly_spaced_blocks

pytestmark = pytest.mark.timeout(300)

TASKS = [
    {"name": "activity", "kind": "classification", "classes": ["a", "b", "c"]},
    {"name": "segmentation", "kind": "segmentation", "classes": ["bg", "x", "y", "z"]},
]
SMALL = [
    "model.image_size=[32, 48]",
    "model.heads.segmentation_channels=16",
    "model.heads.activity_channels=16",
    "model.backbone.overrides={embed_dim: 32, depth: 4, num_heads: 2}",
    "model.bdta.num_heads=2",
    "model.bdta.mote_dim=16",
]


def _model(*extra: str) -> BDTAMoTE:
    torch.manual_seed(0)
    return build_model(load_config("tiny_bdta", [*SMALL, *extra]).model, TASKS)


def _images(batch: int = 2, height: int = 32, width: int = 48) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8)


def _batch(batch: int = 2) -> dict[str, torch.Tensor]:
    return {"mask": torch.randint(0, 4, (batch, 32, 48)), "activity": torch.randint(0, 3, (batch,))}


def test_forward_shapes_and_task_subsets():
    model = _model().eval()
    assert model.blocks == (0, 1, 2, 3) and len(model.stages) == 4
    images = _images(3)
    with torch.inference_mode():
        out = model(images)
        assert out["activity"].shape == (3, 3)
        assert out["segmentation"].shape == (3, 4, 32, 48)
        for task in model.tasks:  # every task's bypass still runs, so one task alone gives the same logits
            torch.testing.assert_close(model(images, tasks=[task])[task], out[task], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown task"):
        model(images, tasks=["depth"])


def test_backbone_is_frozen_and_gets_no_gradient():
    model = _model().train()
    assert not model.backbone.training, "the main branch stays in eval mode"
    assert not any(p.requires_grad for p in model.backbone.parameters())
    embed, features = model.forward_main(model.normalize(_images()))
    assert len(features) == 4
    assert all(not f.requires_grad and f.grad_fn is None for f in (embed, *features)), "features are detached"
    losses = task_losses(model, model(_images()), _batch())
    sum(losses.values()).backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(not n.startswith("backbone.") for n, _ in trainable)
    assert all(p.grad is not None for n, p in trainable if "router" not in n), "the bypass is trained end to end"


def test_router_noise_only_in_training():
    torch.manual_seed(0)
    router = TaskRouter(16, 3, 8)
    tokens = torch.randn(2, 10, 16)
    router.train()
    assert not torch.allclose(router(tokens), router(tokens)), "training draws fresh noise"
    router.eval()
    torch.testing.assert_close(router(tokens), router(tokens), atol=0, rtol=0)
    torch.testing.assert_close(router(tokens), router.gate(tokens).mean(1).softmax(-1))
    quiet = TaskRouter(16, 3, 8, noisy=False).train()
    torch.testing.assert_close(quiet(tokens), quiet(tokens), atol=0, rtol=0)

    model = _model()
    copy = model.inference_copy(32, 48)
    assert not copy.training and not any(p.requires_grad for p in copy.parameters())
    assert not [k for k in copy.state_dict() if ".noise." in k], "the inference copy carries no noise MLPs"
    assert [k for k in model.state_dict() if ".noise." in k], "the original is untouched"
    with torch.no_grad():
        for gamma in model.mote.gamma.values():
            gamma.normal_()  # routers matter only once gamma is non-zero
    model.eval()
    images = _images()
    with torch.inference_mode():
        a, b = model(images), model.inference_copy(32, 48)(images)
    for task in a:
        torch.testing.assert_close(a[task], b[task], atol=1e-5, rtol=1e-5)


def test_zero_gamma_starts_mote_without_cross_task_mixing():
    """Eq. 11 with gamma = 0: R_t = A'_t, so each task sees only its own experts and routers get zero gradient."""
    torch.manual_seed(0)
    tasks = ("activity", "segmentation")
    mote = MoTE([12, 12], 8, tasks, router_hidden_dim=6).train()
    assert all(torch.equal(g, torch.zeros_like(g)) for g in mote.gamma.values())
    experts = [torch.randn(2, 3, 20, 12, requires_grad=True) for _ in range(2)]  # stages x (T B L C)
    general = [torch.randn(3, 20, 12) for _ in range(2)]
    out = mote(experts, general, [(4, 5), (4, 5)])
    for k, task in enumerate(tasks):
        own = torch.cat([mote.reduce[task][i](experts[i][k]) for i in range(2)], dim=-1)
        torch.testing.assert_close(out[task], mote.fuse[task](own))
    sum(o.square().sum() for o in out.values()).backward()
    assert all(e.grad[0].abs().sum() > 0 and e.grad[1].abs().sum() > 0 for e in experts)
    for name, param in mote.named_parameters():
        if name.startswith("router."):
            assert param.grad is None or not param.grad.any(), name
        if name.startswith("gamma."):
            assert param.grad.abs().sum() > 0, "gamma learns to open the cross-task path"
    # activity's output does not move when only segmentation's experts change
    shifted = [e.detach().clone() for e in experts]
    for stage in shifted:
        stage[1] += 1.0
    torch.testing.assert_close(mote(shifted, general, [(4, 5), (4, 5)])["activity"], out["activity"])


def test_bdta_stage_shapes_and_bidirectional_coupling():
    torch.manual_seed(0)
    stage = BDTA(32, ("a", "b", "c"), reduction=4, num_heads=2)
    general = torch.randn(2, 12, 32)
    tasks = torch.randn(3, 2, 12, 32)
    out = stage(general, tasks)
    assert out.shape == (3, 2, 12, 32)
    changed = tasks.clone()
    changed[2] += 1.0
    moved = stage(general, changed)
    assert not torch.allclose(moved[0], out[0]), "T2G shares every task's features with the others"
    with pytest.raises(ValueError, match="divisor"):
        BDTA(30, ("a",), reduction=4)


def test_task_parameter_names_cover_per_task_parts_only():
    model = _model()
    names = model.task_parameter_names()
    assert set(names) == {"activity", "segmentation"}
    owned = {n for v in names.values() for n in v}
    assert not set(names["activity"]) & set(names["segmentation"])
    for task in model.tasks:
        for part in (
            f"heads.{task}.",
            f".g2t_bottleneck.{task}.",
            f".t2g_bottleneck.{task}.",
            f"mote.reduce.{task}.",
            f"mote.router.{task}.",
            f"mote.fuse.{task}.",
        ):
            assert any(part in n for n in names[task]), part
        assert f"mote.gamma.{task}" in names[task]
    shared = [n for n, p in model.named_parameters() if p.requires_grad and n not in owned]
    assert shared and all(".g2t." in n or ".t2g." in n or ".down_" in n or ".up." in n for n in shared)
    assert not [n for n in owned if n.startswith("backbone.")]


def test_dbmtl_step_uses_the_shared_split():
    model = _model().train()
    shared, params = split_parameters(model)
    assert 0 < len(shared) < len(params)
    weighting = build_weighting("dbmtl", model.tasks)
    losses = task_losses(model, model(_images()), _batch())
    weighting.backward(losses, shared, epoch=0)
    assert all(p.grad is not None for p in shared)


def test_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="freeze=true"):
        _model("model.backbone.freeze=false")
    with pytest.raises(ValueError, match="sma.enabled=false"):
        _model("model.sma.enabled=true")
    with pytest.raises(ValueError, match="at least that many blocks"):
        _model("model.bdta.stages=5")
    assert evenly_spaced_blocks(12, 4) == (2, 5, 8, 11)
    assert _model("model.bdta.blocks=[1, 3]").blocks == (1, 3)


def test_paper_config_builds_with_four_stages():
    model = build_model(load_config("bdta_vits14").model, TASKS, load_backbone_weights=False)
    assert model.blocks == (2, 5, 8, 11)
    assert model.stages[0].hidden_dim == 96  # 384 / r, r = 4
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable < 0.2 * sum(p.numel() for p in model.backbone.parameters())


@pytest.fixture(scope="module")
def run_dir(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bdta-run")
    overrides = [
        *TINY_OVERRIDES,
        "model.backbone.overrides={embed_dim: 32, depth: 4, num_heads: 2}",
        "model.bdta.num_heads=2",
        "model.bdta.mote_dim=16",
        "train.epochs=1",
        f"data.root={synth_data}",
    ]
    result = train(load_config("tiny_bdta", overrides), out, progress=False)
    assert result.epochs_run == 1 and result.best_epoch == 1
    return out


def test_training_run_checkpoints_and_eval(run_dir: Path, synth_data: Path, tmp_path: Path):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and all(torch.isfinite(torch.tensor(v)) for k, v in records[0].items() if "loss" in k)
    plain, merged = load_checkpoint(run_dir / "best"), load_checkpoint(run_dir / "best-merged")
    assert isinstance(plain.model, BDTAMoTE) and merged.merged
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.inference_mode():
        a, b = plain.model.eval()(images), merged.model.eval()(images)
    for task in a:
        torch.testing.assert_close(a[task], b[task], atol=1e-5, rtol=1e-5)
    gammas = [g for n, g in plain.model.named_parameters() if n.startswith("mote.gamma.")]
    assert any(g.abs().sum() > 0 for g in gammas), "training moved gamma off zero"
    result = run_evaluation(run_dir / "best-merged", synth_data, split="test", json_out=tmp_path / "eval.json")
    assert 0.0 <= result["activity"]["accuracy"] <= 1.0 and 0.0 <= result["segmentation"]["miou"] <= 1.0
    assert json.loads((tmp_path / "eval.json").read_text())["meta"]["merged"] is True


def test_bench_train_reports_both_models_and_ratios(tmp_path: Path):
    out = tmp_path / "train.json"
    args = ["bench", "train", "--config", "tiny_bdta", "--vs", "endoarss_vits14", "--batch-size", "2", "--steps", "1"]
    assert main([*args, "--warmup", "0", "--json", str(out), *SMALL]) == 0
    report = json.loads(out.read_text())
    assert report["setup"]["backbone"] == "vit_tiny_p8" and report["setup"]["image_size"] == [32, 48]
    for name in ("bdta", "lora"):
        figures = report[name]
        assert figures["trainable_params"] > 0 and figures["step_seconds"] > 0
        assert figures["saved_activation_mib"] > 0 and len(figures["step_seconds_all"]) == 1
        assert 0 < figures["peak_step_memory_mib"] < figures["peak_memory_mib"]  # measured in a child process
    ratio = report["ratio"]
    assert set(ratio) >= {"trainable_params", "adaptation_params", "step_seconds", "saved_activation_mib"}
    assert {"peak_memory_mib", "peak_step_memory_mib"} <= set(ratio)
    assert report["bdta"]["adaptation_params"] < report["bdta"]["trainable_params"]
    assert ratio["trainable_params"] == pytest.approx(
        report["bdta"]["trainable_params"] / report["lora"]["trainable_params"]
    )
