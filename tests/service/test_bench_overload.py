"""`endostream bench overload` on the tiny bundle: an open-loop load above capacity, refused at the door."""

from __future__ import annotations

from pathlib import Path

from service.bench_overload import bench_overload, format_overload
from tests.service.conftest import encode


def test_overload_is_refused_quickly_and_memory_is_kept(endoarss_bundle: Path, frames, tmp_path: Path) -> None:
    report = bench_overload(
        endoarss_bundle,
        [encode(frames[3])],  # 1080p
        factor=4.0,
        seconds=3.0,
        calibration_requests=30,
        env={"ENDOSTREAM_MAX_CONCURRENT_REQUESTS": "2"},
        log_dir=tmp_path,
    )
    load = report["load"]
    assert report["capacity_fps"] > 0 and load["offered_fps"] == round(4.0 * report["capacity_fps"], 2)
    assert set(load["statuses"]) <= {"200", "503"}, load["statuses"]
    assert load["statuses"]["503"] > 0 and load["statuses"]["200"] > 0
    assert report["refused_share_with_retry_after"] == 1.0
    assert load["refused_ms"]["p50"] < load["accepted_ms"]["p50"]  # a refusal is cheaper than a frame
    assert 0.5 < report["rss_after_vs_before"] < 2.0
    assert "x the unloaded p99" in format_overload(report)
