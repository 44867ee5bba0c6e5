"""SAK family: distillation loss, TSAP recurrence, MoR routers, frozen unsaved teachers, stage 1 on frames and a video,
stage 2 on labelled data with evaluation (tiny random teachers and students, 32-64 px)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import cv2
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from endostream.cli import main
from training.builders.registry import build_model
from training.checkpoint import load_checkpoint, save_checkpoint
from training.config import load_config
from training.data.synth import render_image
from training.data.unlabeled import UnlabeledFrames
from training.data.writer import write_clip
from training.distill.losses import distillation_losses, feature_distillation_loss, match_sizes
from training.distill.teachers import evenly_spaced_levels
from training.engine.run import train
from training.engine.stage1 import holdout_split
from training.eval.evaluate import run_evaluation
from training.models.sak import SAK, MoRRouter, TSAPAdapter

pytestmark = pytest.mark.timeout(60)

TASKS = [
    {"name": "activity", "kind": "classification", "classes": ["a", "b", "c"]},
    {"name": "segmentation", "kind": "segmentation", "classes": ["bg", "x", "y", "z"]},
]
TEACHERS = (
    "model.sak.teachers=[{key: dino, name: vit_tiny_p8, input_size: 64, overrides: {embed_dim: 48, depth: 4, "
    "num_heads: 2}}, {key: sam, name: sam_tiny, input_size: 64}]"
)
SMALL = [
    "model.image_size=[64, 64]",
    "model.backbone.overrides={embed_dim: 32, depth: 4, num_heads: 2}",
    "model.heads.segmentation_channels=16",
    "model.heads.activity_channels=16",
    "train.batch_size=8",
    "train.eval_batch_size=8",
    "optim.warmup_epochs=0",
    TEACHERS,
]


def _config(tmp: Path, *overrides: str, name: str = "tiny_sak"):
    return load_config(name, [*SMALL, f"model.sak.cache_dir={tmp / 'cache'}", *overrides])


def _images(batch: int = 2, size: int = 64) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------------- distillation
def test_kd_loss_on_hand_made_maps():
    t = torch.tensor([0.1, 0.2, 0.3, 0.4]).view(1, 1, 2, 2)
    assert feature_distillation_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)
    # opposite maps: cosine -1 -> 0.9 * 2; smooth L1 of |2t| < 1 is 0.5 x^2: 0.5 * (0.04+0.16+0.36+0.64) / 4 = 0.15
    assert feature_distillation_loss(-t, t).item() == pytest.approx(0.9 * 2 + 0.1 * 0.15, abs=1e-6)

    teacher = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)
    student = torch.full((1, 1, 1, 1), 2.0)  # smaller: upsampled bilinearly to 2x2 (a constant map)
    cosine = 10 * 2 / (4 * math.sqrt(30))  # <(2,2,2,2), (1,2,3,4)> / (|s| |t|)
    smooth_l1 = (0.5 + 0.0 + 0.5 + 1.5) / 4  # |diff| = 1, 0, 1, 2
    expected = 0.9 * (1 - cosine) + 0.1 * smooth_l1
    assert feature_distillation_loss(student, teacher).item() == pytest.approx(expected, abs=1e-6)
    assert feature_distillation_loss(teacher, student).item() == pytest.approx(expected, abs=1e-6)  # teacher resized
    s, t2 = match_sizes(torch.zeros(1, 3, 4, 6), torch.zeros(1, 3, 2, 2))
    assert s.shape == t2.shape == (1, 3, 4, 6)  # the smaller map goes to the larger one's grid

    # per image cosine over the whole map, averaged over the batch
    pair = torch.stack([t[0], -t[0]])
    assert feature_distillation_loss(pair, torch.stack([t[0], t[0]])).item() == pytest.approx(
        0.9 * (0 + 2) / 2 + 0.1 * 0.15 / 2, abs=1e-6
    )
    terms = distillation_losses({"a": [t, -t]}, {"a": [t, t]})
    assert set(terms) == {"a/0", "a/1"} and terms["a/0"].item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="aligner"):
        feature_distillation_loss(torch.zeros(1, 2, 2, 2), torch.zeros(1, 3, 2, 2))


def test_levels_are_evenly_spaced_blocks():
    assert evenly_spaced_levels(12) == (2, 5, 8, 11)
    assert evenly_spaced_levels(4) == (0, 1, 2, 3)
    with pytest.raises(ValueError, match="at least 4 blocks"):
        evenly_spaced_levels(2)


# ------------------------------------------------------------------------------------------------------- model
def test_tsap_follows_the_recurrence(tmp_path: Path):
    torch.manual_seed(0)
    model = build_model(_config(tmp_path).model, TASKS).eval()
    with torch.no_grad():
        for param in model.paths.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    adapter = model.paths["dino"].steps[2]
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(adapter(x), x + adapter.scale * adapter.up(F.gelu(adapter.down(x))))
    assert isinstance(adapter, TSAPAdapter) and adapter.scale.requires_grad

    images = _images()
    with torch.no_grad():
        stem, experts, grid = model.forward_levels(model.normalize(images))
        backbone, path = model.backbone, model.paths["sam"]
        tokens = backbone.prepare_tokens(model.normalize(images))
        residual = path.steps[0](tokens)  # R_0 = a_0(Z_0)
        expected_stem, expected = [], []
        for index, block in enumerate(backbone.blocks):
            tokens = block(tokens)
            residual = path.steps[index + 1](residual + tokens)  # R_l = a_l(R_{l-1} + Z_l)
            expected_stem.append(tokens[:, 1:])
            expected.append(path.norms[index](residual[:, 1:]))
    assert model.levels == (0, 1, 2, 3) and grid == (8, 8) and len(path.steps) == 5
    for got, want in zip(experts["sam"], expected, strict=True):
        torch.testing.assert_close(got, want)
    for got, want in zip(stem, expected_stem, strict=True):
        torch.testing.assert_close(got, want)


def test_router_gates_sum_to_one_and_are_noisy_only_in_training():
    torch.manual_seed(0)
    router = MoRRouter(16, 3)
    tokens = torch.randn(4, 10, 16)
    router.train()
    noisy = [router(tokens) for _ in range(2)]
    assert noisy[0].shape == (4, 3) and not torch.allclose(noisy[0], noisy[1])
    router.eval()
    clean = router(tokens)
    torch.testing.assert_close(clean, router(tokens))
    for gates in (*noisy, clean):
        torch.testing.assert_close(gates.sum(1), torch.ones(4))
    quiet = router.without_noise().train()
    assert quiet.fc2.out_features == 3 and not quiet.noisy_gating
    torch.testing.assert_close(quiet(tokens), clean)  # no noise even in train mode
    # one gate per image: the mean over tokens, so the token order does not matter
    torch.testing.assert_close(router(tokens.flip(1)), clean)


def test_teachers_are_frozen_get_no_gradients_and_stay_out_of_checkpoints(tmp_path: Path):
    torch.manual_seed(0)
    cfg = _config(tmp_path, "model.sak.cache=false")
    model = build_model(cfg.model, TASKS)
    assert [s.dim for s in cfg.model.sak.teachers] == [48, 64]  # widths recorded for checkpoint rebuilds
    model.train()
    assert all(not m.training for m in model.teachers.modules())
    assert not any(p.requires_grad for p in model.teachers.parameters())
    images = _images()
    outputs = model(images)
    auxiliary = model.auxiliary_losses({"image": images}, outputs)
    assert set(auxiliary) == {"distill.dino", "distill.sam"}
    loss = sum(auxiliary.values()) + sum(v.float().mean() for v in outputs.values())
    loss.backward()
    assert all(p.grad is None for p in model.teachers.parameters())
    assert (
        model.aligners["sam"][3].weight.grad is not None and model.paths["dino"].steps[0].down.weight.grad is not None
    )
    assert model.auxiliary_losses({"image": images}, outputs) == {}  # consumed: one distillation per forward
    model.eval()
    model(images)
    assert model.auxiliary_losses({"image": images}, outputs) == {}  # nothing to distil outside training

    saved = save_checkpoint(model, cfg, {"tasks": TASKS}, tmp_path / "ckpt")
    keys = load_file(str(saved / "model.safetensors")).keys()
    assert keys and not [k for k in keys if k.startswith("teachers.")]
    assert [k for k in keys if k.startswith("aligners.")]  # resumable: aligners are trained weights
    loaded = load_checkpoint(saved).model
    assert isinstance(loaded, SAK) and loaded.teachers is None and loaded.feature_source is None
    model.load_state_dict(load_file(str(saved / "model.safetensors")), strict=True)  # teachers' keys are not asked for
    with torch.inference_mode():
        a, b = model.eval()(images), loaded.eval()(images)
    for task in a:
        torch.testing.assert_close(a[task], b[task])
    with pytest.raises(RuntimeError, match="no teachers"):
        loaded.teacher_features(images)


def test_teacher_inputs_follow_each_teacher(tmp_path: Path):
    model = build_model(_config(tmp_path, "model.image_size=[64, 96]", "model.sak.cache=false").model, TASKS)
    maps = model.teacher_features(torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8))
    # dino keeps the aspect (longer side 64 -> 40x64 px at patch 8: 5x8 cells); SAM pads to 64x64 (4x4 cells of
    # 16 px) and its maps are cropped to the cells the image covers (43x64 px -> 3x4)
    assert [tuple(m.shape) for m in maps["dino"]] == [(2, 48, 5, 8)] * 4
    assert [tuple(m.shape) for m in maps["sam"]] == [(2, 64, 3, 4)] * 4


# --------------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def frames_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("frames")
    stills = root / "stills"
    (stills / "mask").mkdir(parents=True)
    for i in range(6):
        cv2.imwrite(str(stills / f"f{i}.png"), render_image(5, i, 80, 80).image[..., ::-1])  # RGB -> BGR
    cv2.imwrite(str(stills / "mask" / "f0.png"), render_image(5, 0, 80, 80).mask)  # a label folder: skipped
    write_clip(root / "videos", 0, 7, seconds=1.2, fps=10, size=(64, 64))  # 12 frames
    return root


@pytest.fixture(scope="module")
def stage1_run(frames_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("stage1")
    run = tmp / "run"
    args = ["train", "--config", "tiny_sak_stage1", "--data", str(frames_dir), "--out", str(run), "--no-progress"]
    overrides = [*SMALL, f"model.sak.cache_dir={tmp / 'cache'}", "model.sak.video_stride=3", "train.epochs=2"]
    said: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    cli_logger = logging.getLogger("endostream")
    level = cli_logger.level
    cli_logger.addHandler(handler)
    cli_logger.setLevel(logging.INFO)
    try:
        assert main([*args, *overrides]) == 0
    finally:
        cli_logger.removeHandler(handler)
        cli_logger.setLevel(level)
    (run / "cli-said.txt").write_text("\n".join(said))
    return run


def test_unlabeled_frames_from_images_and_videos(frames_dir: Path):
    frames = UnlabeledFrames(frames_dir, (32, 48), video_stride=3)
    assert len(frames) == 6 + 4  # stills + frames 0, 3, 6, 9 of the clip; the mask folder is skipped
    assert frames.names[0] == "stills/f0.png" and frames.names[-1] == "videos/clip_000.mp4#000009"
    assert frames[0]["image"].shape == frames[-1]["image"].shape == (32, 48, 3)
    train_idx, held = holdout_split(frames.names, 0.2)
    assert len(held) == 2 and sorted(train_idx + held) == list(range(10))
    assert holdout_split(frames.names, 0.2) == (train_idx, held)


def test_stage1_distils_on_frames_and_video(stage1_run: Path):
    records = [json.loads(line) for line in (stage1_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert {"loss.distill.dino", "loss.distill.sam"} <= set(records[0])
    assert set(records[-1]["val"]["rep_sim"]) == {"dino", "sam", "mean"} and records[-1]["val"]["images"] == 1
    assert records[-1]["loss.distill.dino"] < records[0]["loss.distill.dino"]
    for folder in ("best", "last"):
        keys = load_file(str(stage1_run / folder / "model.safetensors")).keys()
        assert not [k for k in keys if k.startswith(("teachers.", "heads.", "routers."))]
    assert (stage1_run / "last" / "trainer_state.pt").is_file()
    done = (stage1_run / "cli-said.txt").read_text().splitlines()[-1]  # names what stage 2 starts from
    assert "Rep Sim" in done and done.endswith(str(stage1_run / "best")), done


def test_stage2_trains_from_stage1_and_evaluates(stage1_run: Path, synth_data: Path, tmp_path: Path):
    init = f"model.sak.init_from={stage1_run / 'best'}"
    cfg = _config(tmp_path, init, "train.epochs=2", f"data.root={synth_data}")
    stage1 = load_checkpoint(stage1_run / "best").model
    fresh = build_model(cfg.model, TASKS)
    torch.testing.assert_close(fresh.backbone.state_dict(), stage1.backbone.state_dict())
    torch.testing.assert_close(fresh.paths.state_dict(), stage1.paths.state_dict())

    result = train(cfg, tmp_path / "run", progress=False)
    assert result.epochs_run == 2
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss.activity", "loss.segmentation", "loss.distill.dino", "loss.distill.sam"} <= set(records[0])
    # the teachers ran once per training image (filled before epoch 1); epoch 2 only read the cache
    store = next((tmp_path / "cache").glob("dino-*")) / "64x64"
    assert len((store / "index.txt").read_text().splitlines()) == 34  # the training split of synth_data
    evaluation = run_evaluation(tmp_path / "run" / "best-merged", synth_data, split="test")
    assert 0.0 <= evaluation["activity"]["accuracy"] <= 1.0 and "miou" in evaluation["segmentation"]


def test_lora_stem_with_dbmtl_trains_and_merges(synth_data: Path, tmp_path: Path):
    cfg = _config(
        tmp_path,
        "model.sak.tas=lora",
        "model.adapters.shared_rank=4",
        "train.weighting=dbmtl",
        "train.epochs=1",
        f"data.root={synth_data}",
    )
    train(cfg, tmp_path / "run", progress=False)
    merged_keys = load_file(str(tmp_path / "run" / "best-merged" / "model.safetensors")).keys()
    assert not [k for k in merged_keys if "lora_" in k]
    assert [k for k in load_file(str(tmp_path / "run" / "best" / "model.safetensors")) if "lora_" in k]
    plain, merged = load_checkpoint(tmp_path / "run" / "best"), load_checkpoint(tmp_path / "run" / "best-merged")
    images = _images(3)
    with torch.inference_mode():
        a, b = plain.model.eval()(images), merged.model.eval()(images)
    for task in a:
        torch.testing.assert_close(a[task], b[task], atol=1e-4, rtol=1e-4)
