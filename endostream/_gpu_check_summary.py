"""summary.md and steps.json of `endostream gpu-check`: the steps' outcomes and the figures the issue asks for.

Figures come only from the JSON the steps wrote; a figure whose step failed reads "not measured", never a number.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from endostream._gpu_check_steps import Plan

E2E_GOAL_MS = (8.0, 12.0)  # p50, p99 at one client with GPU decoding (issue 21)
WITHIN_GOAL = 0.999  # share of stream frames answered within one frame period


@dataclass
class StepRecord:
    name: str
    status: str  # ok | failed | timeout | skipped
    seconds: float
    budget_s: float
    note: str = ""


def _load(out: Path, name: str) -> dict[str, Any] | None:
    path = out / name
    return json.loads(path.read_text()) if path.is_file() else None


def _header(plan: Plan, env: dict[str, Any] | None, total_s: float) -> list[str]:
    when = datetime.now(UTC).isoformat(timespec="seconds")
    if env is None:
        machine = "machine not probed (env step failed)"
    else:
        gpu = env.get("gpu")
        device = f"{gpu['name']} (sm {gpu['capability']}, {gpu['memory_gib']} GiB)" if gpu else "no GPU"
        machine = f"{device}, torch {env['torch']} (CUDA {env['torch_cuda']}), {env['cpus']} CPUs"
    return [
        f"# endostream gpu-check, {plan.mode} mode",
        "",
        f"{machine}; {when}; {total_s:.0f} s in all.",
        f"Bundle timed: EndoARSS ViT-S/14 at {plan.vits_size} px, 2 tasks (activity + segmentation), SMA + shared "
        f"LoRA + TESLA, random-init weights (latency does not depend on weight values). Frames: "
        f"{plan.frame_size[0]}x{plan.frame_size[1]} JPEG q{plan.jpeg_quality}.",
        "",
    ]


def _steps_table(records: list[StepRecord]) -> list[str]:
    lines = ["## Steps", "", "| step | status | seconds | budget | note |", "|:--|:--|--:|--:|:--|"]
    for r in records:
        note = r.note.replace("|", "/").replace("\n", " ")[:200]
        lines.append(f"| {r.name} | {r.status} | {r.seconds:.1f} | {r.budget_s:.0f} | {note} |")
    return [*lines, ""]


def _engine_table(report: dict[str, Any] | None, title: str) -> list[str]:
    if report is None:
        return [f"## {title}", "", "not measured (see the steps above)", ""]
    first = report["variants"][0]["variant"]
    lines = [
        f"## {title}",
        "",
        f"`bench engine --device {report['machine']['device']}`, batch-1 latency, throughput at the best batch; "
        f"ratios against `{first}`.",
        "",
        "| variant | p50 ms | p99 ms | max ms | best fps (batch) | × p50 | × fps |",
        "|:--|--:|--:|--:|--:|--:|--:|",
    ]
    for v in report["variants"]:
        b, ratio = v["batch1"], report["ratios_vs_first"][v["variant"]]
        lines.append(
            f"| {v['variant']} | {b['p50']:.2f} | {b['p99']:.2f} | {b['max']:.2f} | {v['best_fps']:.1f} "
            f"({v['best_batch']}) | {ratio['batch1_p50_speedup']:.2f} | {ratio['throughput_speedup']:.2f} |"
        )
    return [*lines, ""]


def _http_table(report: dict[str, Any] | None, plan: Plan) -> list[str]:
    title = "## Service over HTTP (`bench http`, dynamic batching on)"
    if report is None:
        return [title, "", "not measured (see the steps above)", ""]
    lines = [
        title,
        "",
        f"torch backend, {plan.service_precision}, CUDA graphs where on CUDA. Client on the same machine.",
        "",
        "| decode asked | decoded on | clients | e2e p50 ms | e2e p99 ms | fps | decode ms | infer ms "
        "| overhead p50 ms | CPU ms/frame outside engine | batch |",
        "|:--|:--|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    verdicts = []
    for decode in plan.decode_modes:
        result = report.get(f"decode_{decode}")
        if result is None:
            continue
        for clients, run in result["variants"]["batching"]["runs"].items():
            e2e, stage = run["end_to_end_ms"], run["stage_ms"]
            cpu = run.get("cpu_ms_per_frame", {}).get("outside_engine", float("nan"))
            lines.append(
                f"| {decode} | {run['decoder']} | {clients} | {e2e.get('p50', 0):.2f} | {e2e.get('p99', 0):.2f} | "
                f"{run['throughput_fps']:.1f} | {stage['decode'].get('mean', 0):.2f} | "
                f"{stage['infer'].get('mean', 0):.2f} | {run['service_overhead_ms'].get('p50', 0):.2f} | {cpu:.2f} | "
                f"{run['mean_batch_size'] or 0:.2f} |"
            )
            if decode == "cuda" and clients == "1":
                p50, p99 = e2e.get("p50", float("inf")), e2e.get("p99", float("inf"))
                met = p50 <= E2E_GOAL_MS[0] and p99 <= E2E_GOAL_MS[1]
                verdicts.append(
                    f"One client with GPU decoding: p50 {p50:.2f} ms / p99 {p99:.2f} ms against the goal "
                    f"≤ {E2E_GOAL_MS[0]:g} / ≤ {E2E_GOAL_MS[1]:g} ms: {'met' if met else 'not met'}."
                )
    return [*lines, "", *verdicts, ""]


def _ws_lines(report: dict[str, Any] | None) -> list[str]:
    title = "## Stream over WebSocket (`bench ws`)"
    if report is None:
        return [title, "", "not measured (see the steps above)", ""]
    lat, share = report["latency_ms"], report["within_frame_period"]
    verdict = "met" if share >= WITHIN_GOAL else "not met"
    decode = report.get("env", {}).get("ENDOSTREAM_DECODE", "default")
    return [
        title,
        "",
        f"{report['frames']} frames ({report['frame_size']}) at {report['fps']:g} fps, decode {decode}: latency "
        f"send -> result p50 {lat.get('p50')} / p99 {lat.get('p99')} / max {lat.get('max')} ms; "
        f"{100 * share:.2f} % within {report['frame_period_ms']} ms (goal ≥ {100 * WITHIN_GOAL:g} %: {verdict}); "
        f"{report['dropped']} dropped, {report['errors']} errors; client send lag p99 "
        f"{report['send_lag_ms'].get('p99')} ms.",
        "",
    ]


def write_summary(out: Path, plan: Plan, records: list[StepRecord], total_s: float) -> Path:
    """Write `summary.md` and `steps.json` into `out`; returns the summary's path."""
    env = _load(out, "env.json")
    lines = [
        *_header(plan, env, total_s),
        *_steps_table(records),
        *_engine_table(_load(out, "engine.json"), "Engine (torch program: eager, CUDA graphs, fp16/bf16)"),
        *_engine_table(_load(out, "engine-compiled.json"), "Engine with torch.compile"),
        *_http_table(_load(out, "http.json"), plan),
        *_ws_lines(_load(out, "ws.json")),
    ]
    (out / "steps.json").write_text(
        json.dumps({"mode": plan.mode, "seconds": round(total_s, 1), "steps": [asdict(r) for r in records]}, indent=2)
        + "\n"
    )
    path = out / "summary.md"
    path.write_text("\n".join(lines))
    return path
