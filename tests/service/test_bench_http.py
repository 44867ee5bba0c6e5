"""`endostream bench http` end to end on the tiny bundle: every figure the frame-path issue is judged by is in the
JSON and the table, the arithmetic between them holds, and a baseline checkout runs beside this one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from endostream.cli import main
from service import proc_cpu
from service.bench import bench_http, format_http
from tests.service.conftest import encode

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def report(endoarss_bundle: Path, frames, tmp_path_factory: pytest.TempPathFactory) -> dict:
    jpegs = [encode(f) for f in frames[:3]]
    return bench_http(
        endoarss_bundle,
        jpegs,
        concurrency=(1, 3),
        requests=24,
        warmup=4,
        max_batch=4,
        also={"spin": {"ENDOSTREAM_ORT_SPIN_WAIT": "1"}},
        baseline=REPO,  # any checkout works; this one keeps the test independent of git history
        engine_seconds=0.3,
        log_dir=tmp_path_factory.mktemp("bench-logs"),
    )


def test_every_variant_and_level_is_measured(report: dict) -> None:
    assert list(report["variants"]) == ["batching", "no_batching", "spin", "baseline"]
    assert report["variants"]["spin"]["env"]["ENDOSTREAM_ORT_SPIN_WAIT"] == "1"
    assert report["variants"]["baseline"]["checkout"] == str(REPO)
    for variant in report["variants"].values():
        assert variant["engine_threads"] >= 1  # at least the engine worker
        for conc, run in variant["runs"].items():
            assert run["statuses"] == {"200": 24}, conc
            assert run["throughput_fps"] > 0 and run["decoder"] == "cpu"
            for key in ("end_to_end_ms", "server_total_ms", "service_overhead_ms", "client_minus_server_ms"):
                assert run[key]["count"] == 24 and run[key]["p50"] <= run[key]["max"], key
            stage = run["stage_ms"]
            assert set(stage) == {"decode", "preprocess", "queue", "infer", "postprocess", "encode", "unattributed"}
            # the stages and the unattributed time add up to the server's total
            parts = sum(s["mean"] for s in stage.values())
            assert parts == pytest.approx(run["server_total_ms"]["mean"], abs=0.05)
            # overhead is the total without decode, preprocess, queue and inference
            engine_side = sum(stage[s]["mean"] for s in ("decode", "preprocess", "queue", "infer"))
            assert run["service_overhead_ms"]["mean"] == pytest.approx(
                run["server_total_ms"]["mean"] - engine_side, abs=0.05
            )
            assert run["end_to_end_ms"]["mean"] >= run["server_total_ms"]["mean"]


@pytest.mark.skipif(not proc_cpu.supported(), reason="/proc is Linux-only")
def test_cpu_per_frame_is_split_at_the_engine_threads(report: dict) -> None:
    for variant in report["variants"].values():
        for run in variant["runs"].values():
            cpu = run["cpu_ms_per_frame"]
            assert cpu["engine"] > 0 and cpu["outside_engine"] > 0
            assert cpu["process"] == pytest.approx(cpu["engine"] + cpu["outside_engine"], abs=0.01)


def test_engine_only_and_ratios(report: dict) -> None:
    engine = report["engine_only"]
    assert set(engine["fps"]) == {"1", "2", "4"} and engine["best_fps"] == max(engine["fps"].values())
    ratios = report["ratios"]
    assert ratios["concurrency"] == 3
    fps = {name: v["runs"]["3"]["throughput_fps"] for name, v in report["variants"].items()}
    assert ratios["batching_vs_no_batching"] == pytest.approx(fps["batching"] / fps["no_batching"], abs=1e-3)
    best = max(fps["batching"], fps["no_batching"], fps["spin"])
    assert ratios["service_vs_engine_only"] == pytest.approx(best / engine["best_fps"], abs=1e-3)
    assert set(ratios["vs_baseline"]) == {"1", "3"}
    table = format_http(report)
    assert "service / engine only" in table and "vs baseline at concurrency 3" in table


def test_cli_rejects_bad_pairs_naming_them(endoarss_bundle: Path, tmp_path: Path, capsys) -> None:
    args = ["bench", "http", "--bundle", str(endoarss_bundle), "--json", str(tmp_path / "r.json"), "--also", "x:y"]
    assert main(args) == 2
    assert "--also 'y' is not KEY=VALUE" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_report_is_json(report: dict, tmp_path: Path) -> None:
    path = tmp_path / "http.json"
    path.write_text(json.dumps(report))
    assert json.loads(path.read_text())["ratios"] == report["ratios"]


def test_temporal_comparison(temporal_bundle: Path, frames, tmp_path: Path) -> None:
    """`--temporal`: sessions stepped once per frame beside a no_temporal variant, and the added p50s reported."""
    report = bench_http(
        temporal_bundle,
        [encode(f) for f in frames[:2]],
        concurrency=(2,),
        requests=16,
        warmup=2,
        max_batch=2,
        temporal=True,
        engine_seconds=0.2,
        log_dir=tmp_path,
    )
    assert list(report["variants"]) == ["batching", "no_batching", "no_temporal"]
    on, off = report["variants"]["batching"]["runs"]["2"], report["variants"]["no_temporal"]["runs"]["2"]
    assert on["statuses"] == off["statuses"] == {"200": 16}
    assert on["temporal_step_ms"]["count"] == 16 and off["temporal_step_ms"]["count"] == 0  # turned off: ignored
    cost = report["temporal"]["2"]
    assert 0 < cost["step_ms_p50"] <= on["stage_ms"]["postprocess"]["p50"] + 1e-3
    assert cost["e2e_p50_added_ms"] == pytest.approx(on["end_to_end_ms"]["p50"] - off["end_to_end_ms"]["p50"], abs=1e-3)
    assert "temporal step at concurrency 2" in format_http(report)


def test_temporal_comparison_needs_a_head(endoarss_bundle: Path) -> None:
    with pytest.raises(ValueError, match="no temporal head"):
        bench_http(endoarss_bundle, [b"x"], temporal=True, engine_seconds=0.1)
