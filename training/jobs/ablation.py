"""Component ablation in the shape of the EndoARSS paper's Table V, with single-task baselines, seeds and spread.

Rows: backbone only, +TESLA, +SMA, all (EndoARSS), and one single-task row per task of the dataset (the `all`
config with one task head: same backbone, adapters, SMA and budget). Every row trains the same config with its
switches, for the same budget, and is scored on the test split of the same data. Δm (training/eval/report.py) of each
multi-task row is taken against the single-task rows, as the papers define it; without single-task rows it falls
back to the first row as the reference for both tasks (Table V style).

Seeds: `seeds=N` trains every row N times (train.seed, +1, ..., +N-1). Δm is computed per seed against the
single-task rows of the same seed, and every figure is reported as mean ± sample std (n - 1) over the seeds.

Resume: each row's folder holds `ablation_row.json` with the SHA-256 of its resolved config and whether training
finished. A row whose config is unchanged resumes from its own RUN/last state (or, when finished, is only re-scored);
a row whose resolved config changed, or whose folder has no such record, is retrained from scratch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from training.config import ExperimentConfig, load_config
from training.data.labels import read_labels
from training.engine.run import train
from training.eval.evaluate import run_evaluation
from training.eval.report import DELTA_M_METRICS, TABLE_COLUMNS, delta_m, load_result, same_baseline

logger = logging.getLogger(__name__)

# Row name -> config overrides. TESLA off = task rank 0 (one shared stream); SMA off = no SMA module.
ABLATION_ROWS: dict[str, tuple[str, ...]] = {
    "backbone only": ("model.adapters.task_rank=0", "model.sma.enabled=false"),
    "+TESLA": ("model.sma.enabled=false",),
    "+SMA": ("model.adapters.task_rank=0",),
    "all (EndoARSS)": (),
}
SINGLE_TASK_PREFIX = "single-task "
ROW_STATE = "ablation_row.json"
# Result section of each task kind (the key Δm groups metrics by).
_SECTION_OF_KIND = {"classification": "activity", "segmentation": "segmentation"}


def slug(row: str) -> str:
    """Folder name of a row: "all (EndoARSS)" -> "all_endoarss"."""
    return "".join(c if c.isalnum() else "_" for c in row.lower()).strip("_").replace("__", "_")


def single_task_rows(data: Path) -> dict[str, tuple[tuple[str, ...], str]]:
    """Row name -> (overrides, result section) of one single-task row per task of the dataset at `data`."""
    return {
        f"{SINGLE_TASK_PREFIX}{task.name}": ((f"train.tasks=[{task.name}]",), _SECTION_OF_KIND[task.kind])
        for task in read_labels(data).tasks
    }


def config_fingerprint(cfg: ExperimentConfig) -> str:
    """SHA-256 of the resolved config: a row is reused only when this is unchanged."""
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()


def run_row(cfg: ExperimentConfig, run_dir: Path, *, split: str = "test", progress: bool = True) -> dict[str, Any]:
    """Train `cfg` into `run_dir` unless done with this exact config, then score it on `split` (see module)."""
    state_path = run_dir / ROW_STATE
    fingerprint = config_fingerprint(cfg)
    state = json.loads(state_path.read_text()) if state_path.is_file() else None
    if run_dir.exists() and (state is None or state.get("config_sha256") != fingerprint):
        why = "has no ablation record" if state is None else "was trained with another resolved config"
        logger.warning("%s %s: retraining it from scratch", run_dir, why)
        shutil.rmtree(run_dir)
        state = None
    if state is None:
        state = {"config_sha256": fingerprint, "finished": False, "evaluated": []}
    if not state["finished"]:
        run_dir.mkdir(parents=True, exist_ok=True)
        state_path.write_text(json.dumps(state, indent=2))
        train(cfg, run_dir, resume=True, progress=progress)  # resume=True continues from RUN/last when present
        state.update(finished=True, evaluated=[])
        state_path.write_text(json.dumps(state, indent=2))
    eval_path = run_dir / f"eval_{split}.json"
    if split in state["evaluated"] and eval_path.is_file():
        return load_result(eval_path)
    result = run_evaluation(run_dir / "best-merged", Path(cfg.data.root), split=split, json_out=eval_path)
    state["evaluated"] = [*state["evaluated"], split]
    state_path.write_text(json.dumps(state, indent=2))
    return result


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if len(finite) != len(values) or not finite:
        return None, None
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else None


def summarize(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample std over seeds of every table metric and of Δm: {"section.key": {"mean", "std"}}."""
    keys = {(section, key) for _, section, key, _ in TABLE_COLUMNS} | {(s, k) for s, k, _ in DELTA_M_METRICS}
    summary: dict[str, Any] = {}
    for section, key in sorted(keys):
        if all(section in r for r in results):
            mean, std = _mean_std([r[section].get(key) for r in results])
            summary[f"{section}.{key}"] = {"mean": mean, "std": std}
    if all(r.get("delta_m") is not None for r in results):
        mean, std = _mean_std([r["delta_m"] for r in results])
        summary["delta_m"] = {"mean": mean, "std": std}
    return summary


def _cell(stats: dict[str, float | None] | None, scale: float, signed: bool = False) -> str:
    if not stats or stats["mean"] is None:
        return "N/A"
    text = f"{stats['mean'] * scale:+.2f}" if signed else f"{stats['mean'] * scale:.2f}"
    return text if stats["std"] is None else f"{text} ± {stats['std'] * scale:.2f}"


def summary_table(rows: dict[str, dict[str, Any]]) -> str:
    """Markdown table of `run_ablation`'s rows in the paper's units, mean ± std over seeds."""
    header = ["Run", "Seeds"] + [c[0] for c in TABLE_COLUMNS] + ["Δm (%)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    for name, row in rows.items():
        summary = row["summary"]
        cells = [name, str(len(row["seeds"]))]
        cells += [_cell(summary.get(f"{section}.{key}"), scale) for _, section, key, scale in TABLE_COLUMNS]
        cells.append(_cell(summary.get("delta_m"), 1.0, signed=True))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_ablation(
    config: str,
    data: Path,
    out: Path,
    *,
    overrides: list[str] | None = None,
    split: str = "test",
    progress: bool = True,
    seeds: int = 1,
    rows: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Train and evaluate the ablation rows; writes OUT/ablation.json and OUT/ablation.md.

    Args:
        config: shipped config name or YAML path, shared by all rows.
        data: dataset folder (train/val for training, `split` for the scores).
        out: one folder per row and seed goes under it (OUT/<row>/seed<k>).
        overrides: key=value overrides applied to every row before the row's own switches.
        seeds: runs per row, with train.seed, train.seed + 1, ...
        rows: row names or folder names to run (default: every multi-task and single-task row).

    Returns:
        {"setup": ..., "rows": {row: {"seeds": [result per seed], "summary": mean/std per metric}}}.
    """
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds={seeds!r} must be a positive number of runs per row")
    stl = single_task_rows(data)
    every = {**ABLATION_ROWS, **{name: switches for name, (switches, _) in stl.items()}}
    chosen = list(every) if not rows else _pick_rows(rows, every)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in chosen}
    for index in range(seeds):
        for name in chosen:
            cfg = load_config(config, [*(overrides or []), f"data.root={data}", *every[name]])
            cfg.train.seed += index
            logger.info("ablation row %r seed %d: %s", name, cfg.train.seed, " ".join(every[name]) or "(config as is)")
            started = time.perf_counter()
            result = run_row(cfg, out / slug(name) / f"seed{cfg.train.seed}", split=split, progress=progress)
            result["meta"].update(row=name, switches=list(every[name]), seed=cfg.train.seed)
            result["meta"]["seconds"] = round(time.perf_counter() - started, 1)
            results[name].append(result)
    _add_delta_m(results, {n: section for n, (_, section) in stl.items() if n in results})
    report = {
        "setup": {"config": config, "data": str(data), "split": split, "seeds": seeds, "overrides": overrides or []},
        "rows": {name: {"seeds": runs, "summary": summarize(runs)} for name, runs in results.items()},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps(report, indent=2))
    table = summary_table(report["rows"])
    (out / "ablation.md").write_text(table + "\n")
    logger.info("ablation on %s/%s, %d seed(s):\n%s", data, split, seeds, table)
    return report


def _pick_rows(rows: Sequence[str], every: dict[str, tuple[str, ...]]) -> list[str]:
    by_slug = {slug(name): name for name in every}
    unknown = [r for r in rows if r not in every and r not in by_slug]
    if unknown:
        raise ValueError(f"unknown ablation rows {unknown}; choose from {sorted(by_slug)}")
    wanted = {r if r in every else by_slug[r] for r in rows}
    return [name for name in every if name in wanted]


def _add_delta_m(results: dict[str, list[dict[str, Any]]], stl_sections: dict[str, str]) -> None:
    """Δm per seed of every multi-task row: against the single-task rows of that seed, or the first row without them."""
    multi = [name for name in results if name not in stl_sections]
    covered = set(stl_sections.values())
    for index in range(len(next(iter(results.values())))):
        if stl_sections and covered == {"activity", "segmentation"}:
            baselines = {section: results[name][index] for name, section in stl_sections.items()}
        elif multi:
            baselines = same_baseline(results[multi[0]][index])
        else:
            return
        for name in multi:
            results[name][index]["delta_m"] = delta_m(results[name][index], baselines)
