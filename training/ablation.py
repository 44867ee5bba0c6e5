"""Component ablation in the shape of the EndoARSS paper's Table V: backbone only, +TESLA, +SMA, all.

Every row trains the same config with one switch set differently, for the same budget and seed, and is scored on
the test split of the same data; Δm is taken against the first row (backbone only: the shared LoRA and heads, no
task adapters, no SMA). Rows whose run already holds a merged best checkpoint are only re-evaluated, so an
interrupted ablation resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from training.config import load_config
from training.evaluate import run_evaluation
from training.report import delta_m, markdown_table
from training.trainer import train

logger = logging.getLogger(__name__)

# Row name -> config overrides. TESLA off = task rank 0 (one shared stream); SMA off = no SMA module.
ABLATION_ROWS: dict[str, tuple[str, ...]] = {
    "backbone only": ("model.adapters.task_rank=0", "model.sma.enabled=false"),
    "+TESLA": ("model.sma.enabled=false",),
    "+SMA": ("model.adapters.task_rank=0",),
    "all (EndoARSS)": (),
}


def _slug(row: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in row.lower()).strip("_").replace("__", "_")


def run_ablation(
    config: str,
    data: Path,
    out: Path,
    *,
    overrides: list[str] | None = None,
    split: str = "test",
    progress: bool = True,
) -> dict[str, Any]:
    """Train and evaluate every row of ABLATION_ROWS; writes OUT/ablation.json and OUT/ablation.md.

    Args:
        config: shipped config name or YAML path, shared by all rows.
        data: dataset folder (train/val for training, `split` for the scores).
        out: one run folder per row goes under it.
        overrides: key=value overrides applied to every row before the row's own switches.
    """
    results: dict[str, Any] = {}
    for row, switches in ABLATION_ROWS.items():
        run_dir = out / _slug(row)
        started = time.perf_counter()
        if not (run_dir / "best-merged" / "model.safetensors").is_file():
            cfg = load_config(config, [*(overrides or []), f"data.root={data}", *switches])
            logger.info("ablation row %r: %s", row, " ".join(switches) or "(config as is)")
            train(cfg, run_dir, resume=True, progress=progress)
        result = run_evaluation(run_dir / "best-merged", data, split=split, json_out=run_dir / f"eval_{split}.json")
        result["meta"]["row"] = row
        result["meta"]["switches"] = list(switches)
        result["meta"]["seconds"] = round(time.perf_counter() - started, 1)
        results[row] = result
    baseline = next(iter(results.values()))
    for result in results.values():
        result["delta_m"] = delta_m(result, baseline)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps(results, indent=2))
    table = markdown_table(results)
    (out / "ablation.md").write_text(table + "\n")
    logger.info("ablation on %s/%s:\n%s", data, split, table)
    return results
