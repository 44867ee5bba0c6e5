"""Toy-size end to end: clip features (cached), `endostream train-temporal`, and a bundle with the temporal head."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from endostream.cli import main
from export.checks import onnxruntime_session
from export.manifest import read_manifest, sha256_file
from export.onnx_export import export_onnx, generated_frames
from tests.checkpoints import make_checkpoint
from training.checkpoint import load_checkpoint
from training.temporal import features as features_module
from training.temporal.clips import ClipSetSpec
from training.temporal.features import build_feature_set, store_fingerprint
from training.temporal.heads import load_head

SPEC = ClipSetSpec(seed=3, clips=4, seconds=3.0, frame_interval_s=0.5, render_size=64)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tckpt") / "best", [])


@pytest.fixture(scope="module")
def run(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("trun")
    args = ["train-temporal", str(ckpt), "--out", str(root / "run"), "--cache-dir", str(root / "cache")]
    args += ["--clips", "4", "--seconds", "3", "--frame-interval", "0.5", "--render-size", "64", "--seed", "3"]
    args += ["--epochs", "2", "--layers", "2"]
    assert main(args) == 0
    return root / "run"


def test_feature_cache_is_reused(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = build_feature_set(ckpt, SPEC, cache_dir=tmp_path, progress=False)
    assert [c.split for c in first.clips] == ["train", "train", "val", "test"]
    assert first.clips[0].features.shape == (6, first.feature_dim)
    assert first.clips[0].probs.shape == (6, 5)
    np.testing.assert_allclose(first.clips[0].probs.sum(1), 1.0, atol=1e-5)

    def no_render(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached clip was rendered again")

    monkeypatch.setattr(features_module, "render_temporal_clip", no_render)
    second = build_feature_set(ckpt, SPEC, cache_dir=tmp_path, progress=False)
    assert second.store == first.store
    for a, b in zip(first.clips, second.clips, strict=True):
        np.testing.assert_array_equal(a.features, b.features)
        np.testing.assert_array_equal(a.labels, b.labels)
    with pytest.raises(AssertionError, match="rendered again"):  # another clip set is another store
        build_feature_set(ckpt, ClipSetSpec(**{**SPEC.to_dict(), "seed": 4}), cache_dir=tmp_path, progress=False)


def test_spec_spelling_does_not_change_the_store() -> None:
    a = ClipSetSpec(clips=4, seconds=3, frame_interval_s=0.5, fractions=(7, 1.5, 1.5))
    b = ClipSetSpec(clips=4, seconds=3.0, frame_interval_s=0.5, fractions=(7.0, 1.5, 1.5))
    assert store_fingerprint("x", "activity", (64, 64), a) == store_fingerprint("x", "activity", (64, 64), b)
    assert store_fingerprint("x", "activity", (64, 64), a) != store_fingerprint("y", "activity", (64, 64), a)
    with pytest.raises(ValueError, match="1/n"):
        ClipSetSpec(frame_interval_s=0.3)


def test_features_match_the_model(ckpt: Path, tmp_path: Path) -> None:
    data = build_feature_set(ckpt, SPEC, cache_dir=tmp_path, progress=False)
    model = load_checkpoint(ckpt).model.eval()
    frames = torch.from_numpy(generated_frames(2, 64, 64)).permute(0, 3, 1, 2)
    with torch.no_grad():
        logits, pre = model.forward_with_pre_logits(frames, ["activity"])
        assert torch.allclose(model.heads["activity"].classify(pre["activity"]), model(frames)["activity"])
    assert pre["activity"].shape[1] == data.feature_dim


def test_train_temporal_writes_heads_and_report(run: Path) -> None:
    report = json.loads((run / "eval.json").read_text())
    assert set(report["methods"]) == {"per-frame", "ema", "hmm", "tcn_raw", "tcn"}
    for metrics in report["methods"].values():
        assert {"frame_accuracy", "macro_f1", "edit", "f1@10", "f1@25", "f1@50", "spurious_switches_per_min"} <= set(
            metrics
        )
    assert report["clips"] == 1 and report["frames"] == 6
    for method in ("ema", "hmm", "tcn_raw", "tcn"):
        assert report["latency_ms"][method]["p50"] > 0
        assert report["step_parity_max_abs_diff"][method] <= 1e-4
        assert (run / method / "temporal_head.onnx").is_file()
    assert "| tcn |" in (run / "eval.md").read_text()
    assert (run / "timeline.png").stat().st_size > 1000


def test_bundle_with_temporal_head(ckpt: Path, run: Path, tmp_path: Path) -> None:
    result = export_onnx(ckpt, tmp_path, temporal_head=run / "tcn")
    manifest = read_manifest(tmp_path, verify=True)
    body = json.loads((tmp_path / "manifest.json").read_text())
    head, _ = load_head(run / "tcn")
    temporal = body["temporal"]
    assert temporal["method"] == "tcn" and temporal["task"] == "activity"
    assert temporal["input_output"] == "activity_features" and temporal["graph"] == "temporal_head.onnx"
    assert temporal["input_dim"] == head.input_dim and temporal["state_shape"] == list(head.state_shape)
    assert temporal["hysteresis"] == head.config()["hysteresis"]
    assert temporal["receptive_field_frames"] == head.receptive_field_frames == 13  # two stages of 7
    assert temporal["frame_interval_s"] == 0.5 and temporal["parity_max_abs_diff"] <= 1e-4
    assert temporal["graph_sha256"] == sha256_file(tmp_path / "temporal_head.onnx")
    activity = next(t for t in body["tasks"] if t["name"] == "activity")
    assert activity["features_output"] == "activity_features"
    assert result.manifest.checks["parity"]["max_feature_rel_diff"] <= 1e-4
    assert manifest.temporal == temporal

    # main graph features -> ONNX head step by step == the PyTorch head over the whole sequence
    main_graph = onnxruntime_session(tmp_path / "model.onnx")
    step = onnxruntime_session(tmp_path / "temporal_head.onnx")
    frames = generated_frames(9, 64, 64)
    names = [o.name for o in main_graph.get_outputs()]
    feats = main_graph.run(None, {"frames": frames})[names.index("activity_features")]
    with torch.no_grad():
        want = head(torch.from_numpy(feats)[None])[0].numpy()
    state = np.zeros((1, *head.state_shape), np.float32)
    for t in range(len(feats)):
        probs, state = step.run(None, {"features": feats[t : t + 1], "state": state})
        np.testing.assert_allclose(probs[0], want[t], atol=1e-5)


def test_bundle_without_temporal_head_is_unchanged(ckpt: Path, tmp_path: Path) -> None:
    export_onnx(ckpt, tmp_path)
    body = json.loads((tmp_path / "manifest.json").read_text())
    assert "temporal" not in body and "files" not in body
    assert all("features_output" not in t for t in body["tasks"])
    assert "max_feature_rel_diff" not in body["checks"]["parity"]
    assert [o.name for o in onnxruntime_session(tmp_path / "model.onnx").get_outputs()] == [
        "activity_probs",
        "segmentation",
    ]


def test_hmm_head_reads_probabilities(ckpt: Path, run: Path, tmp_path: Path) -> None:
    export_onnx(ckpt, tmp_path, temporal_head=run / "hmm", features=False)
    temporal = json.loads((tmp_path / "manifest.json").read_text())["temporal"]
    assert temporal["method"] == "hmm" and temporal["input_output"] == "activity_probs"
    assert temporal["state_shape"] == [5] and temporal["input_dim"] == 5


def test_demo_keeps_a_finished_temporal_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from endostream.commands import temporal as commands_temporal

    calls: list[Path] = []

    def fake(checkpoint: Path, out: Path, **kwargs: object) -> dict:
        calls.append(checkpoint)
        out.mkdir(parents=True)
        (out / commands_temporal.EVAL_JSON).write_text("{}")
        return {}

    monkeypatch.setattr(commands_temporal, "train_and_report", fake)
    assert commands_temporal.demo_temporal(tmp_path) == tmp_path / "temporal" / "tcn"
    assert calls == [tmp_path / "runs" / "tiny" / "best-merged"]
    commands_temporal.demo_temporal(tmp_path)  # eval.json exists: nothing is trained again
    assert len(calls) == 1


def test_timeline_rows_are_one_clip(ckpt: Path, tmp_path: Path) -> None:
    from training.temporal.heads import EMAFilter
    from training.temporal.pipeline import timeline_rows

    spec = ClipSetSpec(seed=3, clips=5, seconds=3.0, frame_interval_s=0.5, render_size=64, fractions=(1, 1, 3))
    data = build_feature_set(ckpt, spec, cache_dir=tmp_path, progress=False)
    clip, rows = timeline_rows(data, {"ema": EMAFilter(5, 0.0)}, "test")  # alpha 0: the per-frame labels
    assert clip.split == "test"
    np.testing.assert_array_equal(rows["ground truth"], clip.labels)
    np.testing.assert_array_equal(rows["per-frame"], clip.probs.argmax(1))
    np.testing.assert_array_equal(rows["ema"], clip.probs.argmax(1))


def test_export_cli_with_a_baseline_head(ckpt: Path, run: Path, tmp_path: Path) -> None:
    args = ["export", "onnx", str(ckpt), "--out", str(tmp_path), "--temporal-head", str(run / "ema"), "--no-features"]
    assert main(args) == 0
    body = json.loads((tmp_path / "manifest.json").read_text())
    assert body["temporal"]["method"] == "ema" and body["temporal"]["input_output"] == "activity_probs"
    assert all("features_output" not in t for t in body["tasks"])
    wrong = ["export", "onnx", str(ckpt), "--out", str(tmp_path / "b"), "--temporal-head", str(run / "tcn")]
    assert main([*wrong, "--no-features"]) == 2  # the TCN reads features the graph would not have
    assert not (tmp_path / "b" / "model.onnx").exists()


def test_quantized_bundle_keeps_the_temporal_head(ckpt: Path, run: Path, tmp_path: Path) -> None:
    from export.quantize import quantize_bundle

    export_onnx(ckpt, tmp_path / "fp32", temporal_head=run / "tcn")
    quantized = quantize_bundle(tmp_path / "fp32", None, out=tmp_path / "int8", mode="dynamic", progress=False)
    assert quantized.temporal is not None
    assert read_manifest(tmp_path / "int8", verify=True).temporal == quantized.temporal
