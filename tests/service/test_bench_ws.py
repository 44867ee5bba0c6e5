"""`endostream bench ws`: the paced WebSocket benchmark against the real service on the tiny bundle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from endostream.cli import main
from service.bench_ws import Session, bench_ws, format_ws, summarize
from tests.service.conftest import encode

pytestmark = pytest.mark.timeout(300)


def test_summary_counts_dropped_frames_as_misses():
    session = Session(seconds=1.0)
    for i in range(6):
        session.sent_at[i] = i * 0.1
    # frame 0 is warm-up; 1 and 2 fast, 3 slow, 4 dropped by the service, 5 failed
    for i, ms in ((0, 500.0), (1, 10.0), (2, 20.0), (3, 50.0)):
        session.answered_at[i] = session.sent_at[i] + ms / 1000
        session.server_ms[i] = {"infer": 2.0, "total": ms / 2}
    session.errors[5] = "invalid_image"
    session.send_lag = [0.0] * 6
    report = summarize(session, fps=30.0, warmup=1)
    assert (report["frames"], report["answered"], report["dropped"], report["errors"]) == (5, 3, 1, 1)
    assert report["error_codes"] == ["invalid_image"]
    assert report["frame_period_ms"] == pytest.approx(33.333, abs=1e-3)
    assert report["within_frame_period"] == pytest.approx(2 / 5)
    assert report["within_frame_period_of_answered"] == pytest.approx(2 / 3)
    assert report["latency_ms"]["max"] == pytest.approx(50.0) and report["latency_ms"]["count"] == 3
    assert report["server_latency_mean_ms"] == {"infer": 2.0, "total": pytest.approx(40 / 3, abs=1e-3)}
    assert report["achieved_fps"] == 3.0


def test_paced_frames_through_the_service(endoarss_bundle: Path, frames, tmp_path: Path):
    encoded = [encode(f) for f in frames[:2]]
    report = bench_ws(
        endoarss_bundle,
        encoded,
        count=40,
        fps=20.0,
        warmup=5,
        mask="rle",
        env={"ENDOSTREAM_THREADS": "1"},
        log_dir=tmp_path,
    )
    assert report["frames"] == 40
    assert report["answered"] + report["dropped"] + report["errors"] == 40
    assert report["errors"] == 0 and report["answered"] >= 20  # 20 fps of tiny frames: the engine keeps up
    lat = report["latency_ms"]
    assert 0 < lat["p50"] <= lat["p99"] <= lat["max"] < 5000
    assert 0 < report["within_frame_period"] <= report["within_frame_period_of_answered"] <= 1
    assert report["server_latency_mean_ms"]["infer"] > 0
    assert report["frame_period_ms"] == 50.0 and report["env"] == {"ENDOSTREAM_THREADS": "1"}
    assert "40 frames at 20 fps" in format_ws(report)


def test_cli_writes_the_report(endoarss_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    out = tmp_path / "ws.json"
    argv = ["bench", "ws", "--bundle", str(endoarss_bundle), "--frames", "10", "--warmup", "2", "--fps", "25"]
    assert main([*argv, "--size", "320x240", "--mask", "none", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["frames"] == 10 and report["frame_size"] == "320x240" and report["mask"] == "none"
    assert "written to" in capsys.readouterr().out


def test_bad_arguments_name_the_value(endoarss_bundle: Path):
    with pytest.raises(ValueError, match="fps=0"):
        bench_ws(endoarss_bundle, [b"x"], fps=0)
    with pytest.raises(ValueError, match="no frames"):
        bench_ws(endoarss_bundle, [])
