"""scripts/bench_camera_restart.py end to end at a small size: a real RTSP camera killed and restarted under the
real service, one JSON report with a recovery time per restart and per variant."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.service.rtsp import rtsp_unavailable

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_camera_restart.py"


def test_camera_restart_bench_reports_every_restart(endoarss_bundle: Path, tmp_path: Path) -> None:
    if reason := rtsp_unavailable():
        pytest.skip(reason)
    out = tmp_path / "restart.json"
    cmd = [sys.executable, str(SCRIPT), "--bundle", str(endoarss_bundle), "--restarts", "2", "--down-s", "0.5",
           "--also", "slow:ENDOSTREAM_STREAM_BACKOFF_MAX_S=3", "--out", str(out)]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(out.read_text())
    assert report["restarts"] == 2 and set(report["variants"]) == {"default", "slow"}
    for row in report["variants"].values():
        assert len(row["recovery_s"]) == 2 and all(0 < r < 60 for r in row["recovery_s"])
        assert row["max_s"] == max(row["recovery_s"]) and row["reconnects"] >= 2
    assert report["variants"]["slow"]["env"] == {"ENDOSTREAM_STREAM_BACKOFF_MAX_S": "3"}
    assert report["variants"]["slow"]["median_ratio_to_default"] > 0
    assert "median" in run.stdout


def test_variant_syntax_errors_name_the_bad_value() -> None:
    run = subprocess.run([sys.executable, str(SCRIPT), "--also", "nokey"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "'nokey'" in run.stderr
