"""Data-parallel training with torchrun: 2 CPU processes (gloo) end with identical weights."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("weighting", ["ew", "dbmtl"])
def test_two_cpu_ranks_end_identical(synth_data: Path, tmp_path: Path, weighting: str):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # rendezvous on a free local port
        "--nproc-per-node",
        "2",
        str(REPO / "tests" / "training" / "engine" / "_ddp_worker.py"),
        str(synth_data),
        str(tmp_path),
        weighting,
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    assert (tmp_path / "run" / "best-merged" / "model.safetensors").is_file()  # rank 0 wrote the checkpoints
