"""`endostream bench engine`: side-by-side variants on one bundle, JSON report with percentiles and ratios."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from endostream.cli import main
from export import bench as bench_module
from export.bench import bench_engine, format_table, parse_variant, program_options, time_interleaved
from export.onnx_export import export_onnx
from export.quantize import quantize_bundle

pytestmark = pytest.mark.timeout(300)


def test_compare_reports_every_variant_with_consistent_statistics(endoarss_bundle: Path):
    report = bench_engine(
        [endoarss_bundle], ["torch", "onnxruntime"], batches=(1, 2), warmup=1, runs=8, threads=1, progress=False
    )
    names = [v["variant"] for v in report["variants"]]
    assert names == ["torch", "onnxruntime"]
    for variant in report["variants"]:
        stats = variant["batch1"]
        assert stats["runs"] == 8
        assert 0 < stats["p50"] <= stats["p95"] <= stats["p99"] <= stats["max"]
        assert set(variant["throughput_fps"]) == {1, 2} and variant["best_fps"] == max(
            variant["throughput_fps"].values()
        )
    torch_p50 = report["variants"][0]["batch1"]["p50"]
    ort_p50 = report["variants"][1]["batch1"]["p50"]
    assert report["ratios_vs_first"]["torch"]["batch1_p50_speedup"] == 1.0
    assert report["ratios_vs_first"]["onnxruntime"]["batch1_p50_speedup"] == pytest.approx(torch_p50 / ort_p50)
    assert report["machine"]["threads"] == 1 and report["input"]["height"] == 64
    table = format_table(report)
    assert table.count("\n") == 3 and "| onnxruntime |" in table


def test_cli_writes_json(endoarss_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    out = tmp_path / "bench" / "engine.json"
    code = main(
        [
            "bench",
            "engine",
            str(endoarss_bundle),
            "--json",
            str(out),
            "--runs",
            "4",
            "--warmup",
            "1",
            "--batches",
            "1",
            "--threads",
            "1",
        ]
    )
    assert code == 0
    report = json.loads(out.read_text())
    assert [v["variant"] for v in report["variants"]] == ["onnxruntime"]
    assert report["variants"][0]["precision"] == "fp32"
    assert "| onnxruntime |" in capsys.readouterr().out


def test_bad_variants_and_missing_source_are_explained(endoarss_bundle: Path, tmp_path: Path):
    assert parse_variant("torch:fp16") == ("torch", "fp16")
    with pytest.raises(ValueError, match="unknown backend 'tensorflow'"):
        parse_variant("tensorflow")
    with pytest.raises(ValueError, match="unknown precision 'int4'"):
        parse_variant("torch:int4")
    moved = tmp_path / "bundle"
    shutil.copytree(endoarss_bundle, moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["checks"]["source_checkpoint"] = str(tmp_path / "gone")
    (moved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FileNotFoundError, match="source checkpoint"):
        bench_engine([moved], ["torch"], batches=(1,), warmup=0, runs=1, progress=False)


def test_torch_program_variants_run_the_service_engine(pt2_bundle: Path):
    variants = ["torch", "torch-program", "torch-program:bf16"]
    report = bench_engine([pt2_bundle], variants, batches=(1, 2), warmup=1, runs=4, threads=1, progress=False)
    assert [(v["variant"], v["backend"], v["precision"]) for v in report["variants"]] == [
        ("torch", "torch", "fp32"),
        ("torch-program", "torch-program", "fp32"),
        ("torch-program:bf16", "torch-program", "bf16"),
    ]
    assert all(v["batch1"]["runs"] == 4 and set(v["throughput_fps"]) == {1, 2} for v in report["variants"])
    assert set(report["ratios_vs_first"]) == set(variants)


def test_torch_program_flags_become_engine_options():
    options = program_options("torch-program:fp16:graphs:compile", "cuda:0", 8, None)
    assert (options.device, options.precision, options.cuda_graphs) == ("cuda", "fp16", True)
    assert options.compile == "default"
    assert options.max_batch == 8 and options.threads == 0
    plain = program_options("torch-program", "cpu", 4, 2)
    assert (plain.precision, plain.cuda_graphs, plain.compile, plain.threads) == ("fp32", False, "off", 2)
    assert program_options("torch-program:max-autotune", "cpu", 1, None).compile == "max-autotune"
    assert parse_variant("torch-program:bf16:graphs") == ("torch-program", "bf16")
    with pytest.raises(ValueError, match="CUDA graphs need --device cuda"):
        program_options("torch-program:fp16:graphs", "cpu", 8, None)
    with pytest.raises(ValueError, match="apply to torch-program variants only"):
        parse_variant("torch:fp16:graphs")
    with pytest.raises(ValueError, match="at most one of compile, max-autotune"):
        parse_variant("torch-program:compile:max-autotune")
    with pytest.raises(ValueError, match=r"bad flags \['graph'\]"):
        parse_variant("torch-program:fp16:graph")


def test_per_task_graphs_run_as_a_group_next_to_the_fused_graph(
    endoarss_ckpt: Path, endoarss_bundle: Path, tmp_path: Path
):
    for task in ("activity", "segmentation"):
        export_onnx(endoarss_ckpt, tmp_path / task, tasks=[task])
    split = f"{tmp_path / 'activity'}+{tmp_path / 'segmentation'}"
    report = bench_engine([endoarss_bundle, split], ["onnxruntime"], batches=(1,), warmup=1, runs=4, progress=False)
    assert [v["variant"] for v in report["variants"]] == [f"{endoarss_bundle} onnxruntime", f"{split} onnxruntime"]
    assert [m["tasks"] for m in report["bundles"][split]] == [["activity"], ["segmentation"]]
    assert report["settings"]["onnxruntime_spinning"] == {"single bundle": True, "bundle group": False}
    with pytest.raises(ValueError, match="one input size"):
        export_onnx(endoarss_ckpt, tmp_path / "small", height=32, width=32)
        bench_engine([endoarss_bundle, tmp_path / "small"], ["onnxruntime"], batches=(1,), runs=1, progress=False)


def test_group_sessions_do_not_spin_while_a_lone_session_does(endoarss_bundle: Path, monkeypatch: pytest.MonkeyPatch):
    made: list = []
    real = bench_module.onnxruntime_session
    monkeypatch.setattr(bench_module, "onnxruntime_session", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    group = f"{endoarss_bundle}+{endoarss_bundle}"
    bench_engine([endoarss_bundle, group], ["onnxruntime"], batches=(1,), warmup=0, runs=1, progress=False)
    assert [_spin_setting(session) for session in made] == ["default", "0", "0"]


def _spin_setting(session) -> str:
    try:
        return session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
    except RuntimeError:  # never set: ONNX Runtime spins
        return "default"


def test_variants_are_timed_in_alternating_rounds():
    order: list[str] = []
    runners = [lambda frames, name=name: order.append(name) for name in "ab"]
    seconds = time_interleaved(runners, np.zeros(1), warmup=1, runs=5, rounds=2)
    assert [len(s) for s in seconds] == [5, 5]
    # warm-up, then round shares 3 and 2, each after one untimed call
    assert "".join(order) == "ab" + "aaaabbbb" + "aaabbb"


def test_int8_bundle_runs_next_to_its_fp32_graph_with_its_accuracy_cost(
    endoarss_bundle: Path, labelled_data: Path, tmp_path: Path
):
    quantize_bundle(endoarss_bundle, None, mode="dynamic", out=tmp_path / "int8", data=labelled_data, progress=False)
    report = bench_engine(
        [endoarss_bundle, tmp_path / "int8"], ["onnxruntime"], batches=(1,), warmup=1, runs=2, progress=False
    )
    assert [v["precision"] for v in report["variants"]] == ["fp32", "int8"]
    accuracy = report["bundles"][str(tmp_path / "int8")][0]["accuracy"]
    assert report["bundles"][str(endoarss_bundle)][0]["accuracy"] is None
    miou = 100 * accuracy["delta"]["miou"]
    assert f"{tmp_path / 'int8'} (int8) vs its fp32 graph on test ({accuracy['images']} images)" in format_table(report)
    assert f"miou {miou:+.2f} pt" in format_table(report)
    with pytest.raises(ValueError, match="would not time the INT8 graph"):
        bench_engine([tmp_path / "int8"], ["torch"], batches=(1,), warmup=0, runs=1, progress=False)
