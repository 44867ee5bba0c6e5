"""`endostream bench http` and `endostream bench stream`: the service measured from outside, as a client sees it.

bench http starts the service twice on loopback (dynamic batching on, then off), sends the same encoded frames at
each concurrency, and reports end-to-end p50/p99, the server's own per-stage split (decode / preprocess / infer /
everything else = service overhead) and throughput, with the batching/no-batching ratio. bench stream reads a live
source through `POST /infer` for a fixed time and reports processed fps, dropped frames and frame age p50/p99.
The client runs on the same machine as the server: on a 2-core box it competes for the cores, and the JSON says so.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service.launcher import ServiceProcess

STAGES = ("decode", "preprocess", "queue", "infer", "postprocess", "encode")
logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request would time the log, not the service


def _percentiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"count": 0}
    arr = np.asarray(values, float)
    p50, p95, p99 = np.percentile(arr, [50, 95, 99])
    return {
        "count": len(arr),
        "mean": round(float(arr.mean()), 3),
        "p50": round(float(p50), 3),
        "p95": round(float(p95), 3),
        "p99": round(float(p99), 3),
        "max": round(float(arr.max()), 3),
    }


async def _drive(url: str, frames: Sequence[bytes], concurrency: int, requests: int, mask: str) -> dict[str, Any]:
    """`requests` POSTs spread over `concurrency` clients; each client sends its next frame when answered."""
    import httpx

    latencies: list[float] = []
    stages: dict[str, list[float]] = {s: [] for s in STAGES}
    server_total: list[float] = []
    batch_sizes: list[int] = []
    statuses: dict[int, int] = {}
    counter = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def worker() -> None:
            for i in counter:
                body = frames[i % len(frames)]
                started = time.perf_counter()
                reply = await client.post(
                    "/infer", content=body, params={"mask": mask}, headers={"content-type": "image/jpeg"}
                )
                elapsed = (time.perf_counter() - started) * 1000
                statuses[reply.status_code] = statuses.get(reply.status_code, 0) + 1
                if reply.status_code != 200:
                    continue
                latency = reply.json()["latency_ms"]
                latencies.append(elapsed)
                server_total.append(latency["total"])
                batch_sizes.append(latency["batch_size"])
                for stage in STAGES:
                    stages[stage].append(latency[stage])

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started

    split = {s: round(statistics.fmean(v), 3) if v else None for s, v in stages.items()}
    e2e = _percentiles(latencies)
    named = sum(split[s] or 0.0 for s in ("decode", "preprocess", "infer"))
    return {
        "concurrency": concurrency,
        "requests": requests,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "throughput_fps": round(len(latencies) / wall, 2),
        "end_to_end_ms": e2e,
        "server_total_ms": _percentiles(server_total),
        "stage_mean_ms": split,
        # everything that is not decode, preprocess or the engine: HTTP, queueing, postprocess, encode, transfer
        "rest_mean_ms": round(e2e.get("mean", 0.0) - named, 3) if latencies else None,
        "mean_batch_size": round(statistics.fmean(batch_sizes), 2) if batch_sizes else None,
    }


def bench_http(
    bundle: Path,
    frames: Sequence[bytes],
    *,
    concurrency: Sequence[int] = (1, 8),
    requests: int = 200,
    warmup: int = 20,
    max_batch: int = 8,
    max_queue_delay_ms: float = 2.0,
    mask: str = "png",
    threads: int = 0,
    log_dir: Path = Path("endostream-work/bench-logs"),
) -> dict[str, Any]:
    """Measure the service with dynamic batching (`max_batch`) and without (batch 1), at each concurrency."""
    variants = {"batching": max_batch, "no_batching": 1}
    report: dict[str, Any] = {
        "bundle": str(bundle),
        "frame_bytes_mean": int(statistics.fmean(len(f) for f in frames)),
        "mask": mask,
        "machine": _machine(),
        "variants": {},
    }
    for name, batch in variants.items():
        args = ["--max-batch", str(batch), "--max-queue-delay-ms", str(max_queue_delay_ms)]
        env = {"ENDOSTREAM_THREADS": str(threads)} if threads else {}
        with ServiceProcess(bundle, args=args, env=env).start(log_dir) as server:
            asyncio.run(_drive(server.url, frames, 1, warmup, mask))
            runs = {str(c): asyncio.run(_drive(server.url, frames, c, requests, mask)) for c in concurrency}
        report["variants"][name] = {"max_batch": batch, "runs": runs}
    top = str(max(concurrency))
    with_b = report["variants"]["batching"]["runs"][top]["throughput_fps"]
    without = report["variants"]["no_batching"]["runs"][top]["throughput_fps"]
    report["batching_throughput_ratio"] = {"concurrency": int(top), "ratio": round(with_b / without, 3)}
    return report


def format_http(report: dict[str, Any]) -> str:
    lines = [
        "variant      conc  thr fps   e2e p50   e2e p99   decode  preproc   infer    rest  batch",
    ]
    for name, variant in report["variants"].items():
        for conc, run in variant["runs"].items():
            e2e, split = run["end_to_end_ms"], run["stage_mean_ms"]
            lines.append(
                f"{name:<12} {conc:>4} {run['throughput_fps']:>8.1f}"
                f" {e2e.get('p50', 0):>9.2f} {e2e.get('p99', 0):>9.2f} {split['decode'] or 0:>8.2f}"
                f" {split['preprocess'] or 0:>8.2f} {split['infer'] or 0:>7.2f}"
                f" {run['rest_mean_ms'] or 0:>7.2f} {run['mean_batch_size'] or 0:>6.2f}"
            )
    ratio = report["batching_throughput_ratio"]
    lines.append(f"throughput at concurrency {ratio['concurrency']}: batching / no batching = {ratio['ratio']:.2f}x")
    return "\n".join(lines)


def bench_stream(
    bundle: Path,
    source: str,
    *,
    seconds: float = 60.0,
    mask: str = "png",
    threads: int = 0,
    log_dir: Path = Path("endostream-work/bench-logs"),
) -> dict[str, Any]:
    """Read `source` through the service for `seconds`; frame age is measured at the client (same clock)."""
    import httpx

    prefix = source.rsplit("/", 1)[0] + "/"
    env = {"ENDOSTREAM_STREAM_ALLOWLIST": prefix, **({"ENDOSTREAM_THREADS": str(threads)} if threads else {})}
    ages: list[float] = []
    totals: list[float] = []
    infers: list[float] = []
    dropped = 0
    processed = 0
    end: dict[str, Any] | None = None
    with ServiceProcess(bundle, env=env).start(log_dir) as server:
        body = {"source": source, "max_seconds": seconds}
        first_at = None
        with httpx.stream("POST", f"{server.url}/infer", params={"mask": mask}, json=body, timeout=seconds + 30) as r:
            if r.status_code != 200:
                raise ValueError(f"the service refused the stream: {r.status_code} {r.read().decode()}")
            for line in r.iter_lines():
                if not line:
                    continue
                now = time.time()
                item = json.loads(line)
                if "end" in item or ("error" in item and "frame" not in item):
                    end = item
                    break
                if "error" in item:
                    continue
                first_at = first_at or time.monotonic()
                processed += 1
                dropped += item["frame"]["dropped_before"] if processed > 1 else 0
                ages.append((now - item["frame"]["captured_at"]) * 1000)
                totals.append(item["latency_ms"]["total"])
                infers.append(item["latency_ms"]["infer"])
        elapsed = time.monotonic() - first_at if first_at else 0.0
        streams_metrics = httpx.get(f"{server.url}/metrics").text
    return {
        "bundle": str(bundle),
        "source": source,
        "seconds": round(elapsed, 2),
        "processed": processed,
        "processed_fps": round(processed / elapsed, 2) if elapsed else 0.0,
        "dropped": dropped,
        "frame_age_ms": _percentiles(ages),
        "service_total_ms": _percentiles(totals),
        "infer_ms": _percentiles(infers),
        "end": end,
        "reconnects": _reconnects(streams_metrics),
        "machine": _machine(),
    }


def _reconnects(metrics_text: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics_text.splitlines()
        if line.startswith("endostream_stream_reconnects_total{")
    )


def format_stream(report: dict[str, Any]) -> str:
    age = report["frame_age_ms"]
    return (
        f"{report['source']}: {report['processed']} frames in {report['seconds']} s = {report['processed_fps']} fps "
        f"processed, {report['dropped']} dropped, frame age p50 {age.get('p50')} ms / p99 {age.get('p99')} ms"
    )


def _machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
