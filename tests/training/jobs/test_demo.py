"""The demo's skip rule: only a run that trained every epoch is kept; an interrupted one resumes."""

from __future__ import annotations

from pathlib import Path

from training.jobs.demo import _finished


def test_an_interrupted_run_is_not_taken_for_a_finished_one(tmp_path: Path) -> None:
    run = tmp_path / "tiny"
    (run / "best-merged").mkdir(parents=True)
    (run / "best-merged" / "model.safetensors").write_bytes(b"x")  # written after the first improving epoch
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n')
    assert not _finished(run, epochs=8)
    (run / "metrics.jsonl").write_text("".join(f'{{"epoch": {e}}}\n' for e in range(1, 9)))
    assert _finished(run, epochs=8)
    (run / "best-merged" / "model.safetensors").unlink()
    assert not _finished(run, epochs=8)
