"""Robustness report: the JSON, the markdown tables (EndoARSS Table VII and Fig. 6 in numbers) and the PNG plot.

Relative figures are corrupted / clean on the same frames; the drop is (clean - corrupted) / clean x 100. Means over
corruptions weigh every corruption equally (so a family with five corruptions weighs more than one with four, as in
the paper's "Mean" row).
"""

from __future__ import annotations

import json
import logging
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from training.eval.corruptions import FAMILIES, FAMILY_OF

logger = logging.getLogger(__name__)

METRIC_LABELS = {"accuracy": "Acc (%)", "miou": "mIoU (%)", "dice": "Dice (%)"}


def _mean(rows: list[Mapping[str, float]], metrics: list[str]) -> dict[str, float]:
    return {m: statistics.fmean(row[m] for row in rows) for m in metrics}


def _relative(values: Mapping[str, float], clean: Mapping[str, float]) -> dict[str, float | None]:
    return {m: (v / clean[m] if clean[m] else None) for m, v in values.items()}


def build_report(
    clean: Mapping[str, float], scores: Mapping[str, Mapping[int, Mapping[str, float]]], meta: Mapping[str, Any]
) -> dict[str, Any]:
    """Group per-(corruption, severity) scores by corruption, family and severity, each also relative to clean.

    Args:
        clean: metric -> value on the uncorrupted frames.
        scores: corruption -> severity -> metric -> value.
        meta: stored as given (checkpoint, split, frames, seed).
    """
    metrics = [m for m in METRIC_LABELS if m in clean]
    if not scores:
        raise ValueError("no corrupted scores to report; pass at least one corruption and severity")
    corruptions: dict[str, Any] = {}
    for name, by_severity in scores.items():
        mean = _mean(list(by_severity.values()), metrics)
        corruptions[name] = {
            "family": FAMILY_OF[name],
            "severities": {str(s): dict(v) for s, v in sorted(by_severity.items())},
            "mean": mean,
            "relative": _relative(mean, clean),
        }
    families: dict[str, Any] = {}
    for family in FAMILIES:
        members = [c["mean"] for c in corruptions.values() if c["family"] == family]
        if members:
            mean = _mean(members, metrics)
            relative = _relative(mean, clean)
            drop = {m: None if r is None else (1.0 - r) * 100.0 for m, r in relative.items()}
            families[family] = {"corruptions": len(members), "mean": mean, "relative": relative, "drop_pct": drop}
    severities: dict[str, Any] = {}
    for severity in sorted({s for by_severity in scores.values() for s in by_severity}):
        rows = [by_severity[severity] for by_severity in scores.values() if severity in by_severity]
        mean = _mean(rows, metrics)
        severities[str(severity)] = {"mean": mean, "relative": _relative(mean, clean)}
    overall = _mean([c["mean"] for c in corruptions.values()], metrics)
    return {
        "meta": dict(meta),
        "metrics": metrics,
        "clean": dict(clean),
        "corruptions": corruptions,
        "families": families,
        "severities": severities,
        "mean_over_corruptions": {"mean": overall, "relative": _relative(overall, clean)},
    }


def _pct(value: float | None) -> str:
    return "N/A" if value is None else f"{value * 100:.2f}"


def markdown_report(report: Mapping[str, Any]) -> str:
    """Four tables: per corruption and severity, per corruption (Table VII), per family, per severity (Fig. 6)."""
    metrics = report["metrics"]
    names = [METRIC_LABELS[m] for m in metrics]
    meta = report["meta"]
    clean = " ".join(f"{METRIC_LABELS[m]} {_pct(report['clean'][m])}" for m in metrics)
    lines = [
        f"# Robustness of {meta.get('checkpoint')} on {meta.get('split')} ({meta.get('frames')} frames, seed "
        f"{meta.get('seed')})",
        "",
        f"Clean: {clean}. Relative = corrupted / clean; drop = (clean - corrupted) / clean x 100.",
        "",
        "## Mean over corruptions, per severity (Fig. 6)",
        "",
        _header(["Severity", *names, *(f"{n} rel." for n in names)]),
    ]
    for severity, row in report["severities"].items():
        lines.append(
            _row([severity, *(_pct(row["mean"][m]) for m in metrics), *(_pct(row["relative"][m]) for m in metrics)])
        )
    overall = report["mean_over_corruptions"]
    lines.append(
        _row(["mean", *(_pct(overall["mean"][m]) for m in metrics), *(_pct(overall["relative"][m]) for m in metrics)])
    )
    lines += ["", "## Per family (mean over its corruptions and severities)", ""]
    lines.append(_header(["Family", "Corruptions", *names, *(f"{n} drop" for n in names)]))
    for family, row in report["families"].items():
        drops = [("N/A" if row["drop_pct"][m] is None else f"{row['drop_pct'][m]:.2f}") for m in metrics]
        lines.append(_row([family, str(row["corruptions"]), *(_pct(row["mean"][m]) for m in metrics), *drops]))
    lines += ["", "## Per corruption (mean over severities, Table VII)", ""]
    lines.append(_header(["Family", "Corruption", *names, *(f"{n} rel." for n in names)]))
    for name, row in report["corruptions"].items():
        cells = [row["family"], name, *(_pct(row["mean"][m]) for m in metrics)]
        lines.append(_row([*cells, *(_pct(row["relative"][m]) for m in metrics)]))
    lines += ["", "## Per corruption and severity", ""]
    lines.append(_header(["Family", "Corruption", "Severity", *names]))
    for name, row in report["corruptions"].items():
        for severity, values in row["severities"].items():
            lines.append(_row([row["family"], name, severity, *(_pct(values[m]) for m in metrics)]))
    return "\n".join(lines) + "\n"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _header(cells: list[str]) -> str:
    return _row(cells) + "\n|" + "|".join([":---"] + ["---:"] * (len(cells) - 1)) + "|"


def plot_report(report: Mapping[str, Any], path: Path) -> Path:
    """PNG: one panel per (metric, family), each corruption of the family as a line over severity 0 (clean) .. 5."""
    try:
        import matplotlib
    except ImportError as err:
        raise RuntimeError(f"the robustness plot needs matplotlib ({err}); `pip install matplotlib`") from err
    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    metrics, families = report["metrics"], list(report["families"])
    fig, axes = plt.subplots(
        len(metrics), len(families), figsize=(3.2 * len(families), 2.6 * len(metrics)), squeeze=False, sharey="row"
    )
    for col, family in enumerate(families):
        members = {n: c for n, c in report["corruptions"].items() if c["family"] == family}
        for row, metric in enumerate(metrics):
            ax = axes[row][col]
            for name, corruption in members.items():
                severities = [0, *(int(s) for s in corruption["severities"])]
                values = [report["clean"][metric], *(v[metric] for v in corruption["severities"].values())]
                ax.plot(severities, [100 * v for v in values], marker="o", markersize=3, label=name)
            ax.axhline(100 * report["clean"][metric], color="grey", linestyle="--", linewidth=0.8)
            ax.set_xticks(range(6))
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(family)
            if row == len(metrics) - 1:
                ax.set_xlabel("severity (0 = clean)")
            if col == 0:
                ax.set_ylabel(METRIC_LABELS[metric])
            if row == 0:
                ax.legend(fontsize=6, loc="lower left")
    fig.suptitle(
        f"{report['meta'].get('checkpoint')} on {report['meta'].get('split')} ({report['meta'].get('frames')} frames)",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(report: Mapping[str, Any], out_dir: Path) -> None:
    """OUT/robustness.json, OUT/robustness.md and OUT/robustness.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "robustness.json").write_text(json.dumps(report, indent=2))
    markdown = markdown_report(report)
    (out_dir / "robustness.md").write_text(markdown)
    plot_report(report, out_dir / "robustness.png")
    logger.info("robustness report in %s:\n%s", out_dir, markdown.split("## Per corruption (")[0])
