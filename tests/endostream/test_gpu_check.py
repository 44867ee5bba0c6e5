"""`endostream gpu-check`: the CPU mode runs every step end to end; failures, timeouts and the deadline are recorded."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from endostream import gpu_check
from endostream._gpu_check_steps import CPU_PLAN, GPU_PLAN
from endostream._gpu_check_summary import StepRecord, write_summary
from endostream.gpu_check import Step, run_check

MAX_FILES = 8  # what a device run brings back from $OUT


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_cpu_mode_runs_every_step_and_summarizes(tmp_path: Path):
    """The whole CPU mode: a few minutes on 2 idle cores; the budgets leave room for a busy CI machine."""
    out = tmp_path / "out"
    records = run_check(out, CPU_PLAN, deadline_s=gpu_check.CPU_DEADLINE_S, work=tmp_path / "work")
    status = {r.name: r.status for r in records}
    assert status == {
        "wheels": "ok",
        "env": "ok",
        "pytest-gpu": "ok",
        "bundle-tiny": "ok",
        "bundle-vits14": "ok",
        "engine": "ok",
        "http": "ok",
        "ws": "ok",
        "engine-compiled": "skipped",
    }, (out / "gpu-check.log").read_text()[-5000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(
        ["env.json", "engine.json", "http.json", "ws.json", "steps.json", "summary.md", "gpu-check.log"]
    )
    assert len(files) <= MAX_FILES
    engine = json.loads((out / "engine.json").read_text())
    assert [v["variant"] for v in engine["variants"]] == list(CPU_PLAN.engine_variants)
    assert engine["input"] == {"height": 56, "width": 56}
    http = json.loads((out / "http.json").read_text())
    assert list(http) == ["frame_size", "quality", "decode_cpu"] and http["frame_size"] == "1920x1080"
    assert http["decode_cpu"]["env"]["ENDOSTREAM_DECODE"] == "cpu"
    ws = json.loads((out / "ws.json").read_text())
    assert ws["frames"] == CPU_PLAN.ws_frames and ws["answered"] > 0
    summary = (out / "summary.md").read_text()
    assert "not measured" not in summary.split("## Engine with torch.compile")[0]
    assert f"{ws['frames']} frames (1920x1080) at 30 fps" in summary
    assert "| torch-program:bf16 |" in summary and "| cpu | 1 |" in summary
    log = (out / "gpu-check.log").read_text()
    assert "== step pytest-gpu: ok" in log and "-m pytest -m gpu" in log and "== step ws: ok" in log


def test_failures_and_timeouts_are_recorded_and_later_steps_still_run(tmp_path: Path, monkeypatch):
    commands = {
        "fails": [sys.executable, "-c", "import sys; print('broken here'); sys.exit(3)"],
        "hangs": [sys.executable, "-c", "import time; time.sleep(30)"],
        "works": [sys.executable, "-c", "print('fine')"],
    }
    monkeypatch.setattr(gpu_check, "_step_command", lambda name, ctx: commands[name])
    phases = (
        (Step("fails", {"cpu": 10}, "exits 3"), Step("hangs", {"cpu": 1}, "sleeps past its budget")),
        (Step("works", {"cpu": 10}, "prints"),),
    )
    monkeypatch.setattr(gpu_check, "PHASES", phases)
    monkeypatch.setattr(gpu_check, "WHEELS", tmp_path / "no-wheels")
    records = run_check(tmp_path / "out", CPU_PLAN, deadline_s=60, work=tmp_path / "work")
    by_name = {r.name: r for r in records}
    assert by_name["fails"].status == "failed" and "exit code 3: broken here" in by_name["fails"].note
    assert by_name["hangs"].status == "timeout" and by_name["hangs"].seconds < 15
    assert by_name["works"].status == "ok"
    assert by_name["wheels"].note.startswith("no .whl/ folder")
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| fails | failed |" in summary and "not measured" in summary
    steps = json.loads((tmp_path / "out" / "steps.json").read_text())
    assert [s["name"] for s in steps["steps"]] == ["wheels", "fails", "hangs", "works"]


def test_steps_past_the_deadline_are_skipped(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(gpu_check, "_step_command", lambda name, ctx: [sys.executable, "-c", "pass"])
    monkeypatch.setattr(gpu_check, "PHASES", ((Step("late", {"cpu": 10}, "never starts"),),))
    monkeypatch.setattr(gpu_check, "WHEELS", tmp_path / "no-wheels")
    (record,) = [r for r in run_check(tmp_path / "out", CPU_PLAN, deadline_s=0, work=tmp_path) if r.name == "late"]
    assert (record.status, record.note) == ("skipped", "the run's deadline has passed")


def test_broken_wheels_fail_with_pips_reason(tmp_path: Path, monkeypatch):
    wheels = tmp_path / ".whl"
    wheels.mkdir()
    (wheels / "broken-1.0-py3-none-any.whl").write_bytes(b"not a zip")
    monkeypatch.setattr(gpu_check, "WHEELS", wheels)
    assert "not needed" in gpu_check.install_wheels(tmp_path / "site")  # this box has the web stack
    monkeypatch.setattr(gpu_check, "WEB_STACK", ("endostream_no_such_package",))
    with pytest.raises(RuntimeError, match=r"pip could not install the wheels in .*\.whl"):
        gpu_check.install_wheels(tmp_path / "site")


def test_summary_of_a_gpu_run_states_goals_from_the_reports(tmp_path: Path):
    run = {"end_to_end_ms": {"p50": 7.5, "p99": 13.0}, "stage_ms": {"decode": {"mean": 0.6}, "infer": {"mean": 2.0}}}
    run |= {"throughput_fps": 130.0, "mean_batch_size": 1.0, "decoder": "cuda:0", "service_overhead_ms": {"p50": 0.4}}
    run |= {"cpu_ms_per_frame": {"outside_engine": 1.25}}
    http = {"decode_cuda": {"variants": {"batching": {"runs": {"1": run}}}}}
    ws = {"frames": 3000, "frame_size": "1920x1080", "fps": 30.0, "frame_period_ms": 33.333, "dropped": 0, "errors": 0}
    ws |= {"latency_ms": {"p50": 9.0, "p99": 20.0, "max": 40.0}, "within_frame_period": 0.9995}
    ws |= {"send_lag_ms": {"p99": 0.4}, "env": {"ENDOSTREAM_DECODE": "cuda"}}
    (tmp_path / "http.json").write_text(json.dumps(http))
    (tmp_path / "ws.json").write_text(json.dumps(ws))
    write_summary(tmp_path, GPU_PLAN, [StepRecord("http", "ok", 60.0, 150)], 300.0)
    summary = (tmp_path / "summary.md").read_text()
    assert "p50 7.50 ms / p99 13.00 ms against the goal ≤ 8 / ≤ 12 ms: not met" in summary
    assert "99.95 % within 33.333 ms (goal ≥ 99.9 %: met)" in summary
    assert "| cuda | cuda:0 | 1 | 7.50 | 13.00 | 130.0 | 0.60 | 2.00 | 0.40 | 1.25 | 1.00 |" in summary
    assert "machine not probed" in summary and "ViT-S/14 at 448 px" in summary
    assert summary.count("not measured") == 2  # both engine tables: their JSON is missing
