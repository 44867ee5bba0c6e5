"""Worker for test_distributed: train a few steps on one torchrun rank, then dump this rank's parameters."""

import sys
from pathlib import Path

import torch

from tests.training.conftest import TINY_OVERRIDES
from training.config import load_config
from training.engine.distributed import init_distributed
from training.engine.supervised import TaskTrainer

data, out, weighting = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
torch.set_num_threads(1)
ctx = init_distributed("cpu")
torch.manual_seed(ctx.rank)  # different init per rank: the broadcast must make them equal
cfg = load_config("tiny", [*TINY_OVERRIDES, "train.epochs=1", f"train.weighting={weighting}", f"data.root={data}"])
trainer = TaskTrainer(cfg, out / "run", ctx, progress=False)
trainer.fit()
torch.save({k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, out / f"rank{ctx.rank}.pt")
