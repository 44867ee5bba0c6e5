"""`endostream bench http` and `endostream bench stream`: the service measured from outside, as a client sees it.

bench http starts the service on loopback once per variant (dynamic batching on, off, extra settings, and optionally
a baseline checkout such as the previous commit), sends the same encoded frames at each concurrency, and reports
end-to-end percentiles, the server's own per-stage split, the service overhead (server total minus decode,
preprocess, queue and inference), the time nobody attributed, the client-minus-server gap, throughput against the
same bundle's engine alone (same threads, measured in the same run), and the server's CPU milliseconds per frame
outside the engine's threads (from /proc: what decides how many streams a GPU box's CPUs can feed).
With `temporal`, every request belongs to a session stepped once per frame (client timestamps one head interval
apart) and a `no_temporal` variant (ENDOSTREAM_TEMPORAL=0, sessions ignored) runs beside it: the report's `temporal`
section is what the temporal step adds per frame (its own time, and the postprocess, server and end-to-end p50s).
bench stream reads a live source through `POST /infer` for a fixed time and reports processed fps, dropped frames
and frame age p50/p99. The client runs on the same machine as the server: on a 2-core box it competes for the cores,
and the JSON says so.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import platform
import statistics
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service import proc_cpu
from service.bench_client import RawConnection, post_request
from service.launcher import ServiceProcess
from service.postprocess import RAW_MEDIA_TYPE

STAGES = ("decode", "preprocess", "queue", "infer", "postprocess", "encode")
ENGINE_PATH = ("decode", "preprocess", "infer")  # what a frame cannot do without; the rest is the service's overhead


@dataclass(frozen=True)
class ServerVariant:
    """One server configuration `bench http` measures: flags, extra environment, and the checkout it runs from."""

    name: str
    max_batch: int
    env: Mapping[str, str] = field(default_factory=dict)
    checkout: Path | None = None  # another source tree (e.g. the previous commit); None: this one


def percentiles(values: Sequence[float], points: Sequence[float] = (50, 95, 99)) -> dict[str, float]:
    """count, mean, the percentiles `points` (keys p50, p99, p99_9, ...) and max of `values`, rounded to 3 places."""
    if not values:
        return {"count": 0}
    arr = np.asarray(values, float)
    stats = {"count": len(arr), "mean": round(float(arr.mean()), 3)}
    for point, value in zip(points, np.percentile(arr, list(points)), strict=True):
        stats[f"p{point:g}".replace(".", "_")] = round(float(value), 3)
    return {**stats, "max": round(float(arr.max()), 3)}


async def _drive(
    url: str,
    frames: Sequence[bytes],
    concurrency: int,
    requests: int,
    params: Mapping[str, str],
    session_step_s: float | None = None,
) -> dict[str, Any]:
    """`requests` POSTs spread over `concurrency` clients; each client sends its next frame when answered.

    Each client is one keep-alive connection writing prebuilt requests (`bench_client`), so the client's own CPU
    stays out of what is measured on a machine it shares with the server. With `session_step_s` each client is a
    temporal session of its own whose frames are that many seconds apart (`t`); those requests are built per frame
    (a few microseconds of the client's time).
    """
    prepared = [post_request(f, params) for f in frames]
    latencies: list[float] = []
    replies: list[dict[str, Any]] = []
    statuses: dict[int, int] = {}
    counter = iter(range(requests))
    run_id = uuid.uuid4().hex[:8]  # new sessions for every run: no state carried over from the warm-up

    async def worker(client: int) -> None:
        conn = await RawConnection.open(url)
        sent = 0
        try:
            for i in counter:
                raw = prepared[i % len(prepared)]
                if session_step_s is not None:
                    session = {"session": f"bench-{run_id}-{client}", "t": f"{sent * session_step_s:.6f}"}
                    raw = post_request(frames[i % len(frames)], {**params, **session})
                    sent += 1
                started = time.perf_counter()
                status, headers, body = await conn.request(raw)
                elapsed = (time.perf_counter() - started) * 1000
                statuses[status] = statuses.get(status, 0) + 1
                if status != 200:
                    continue
                latencies.append(elapsed)
                if headers.get("content-type", "").startswith(RAW_MEDIA_TYPE):
                    size = int.from_bytes(body[:4], "little")
                    replies.append(json.loads(body[4 : 4 + size])["latency_ms"])
                else:
                    replies.append(json.loads(body)["latency_ms"])
        finally:
            conn.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in range(concurrency)))
    wall = time.perf_counter() - started
    return {
        "concurrency": concurrency,
        "requests": requests,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "throughput_fps": round(len(latencies) / wall, 2),
        **_split(latencies, replies),
    }


def _split(e2e: Sequence[float], replies: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Where each request's time went, from the client's clock and the server's `latency_ms`."""
    total = [r["total"] for r in replies]
    stages = {s: [r[s] for r in replies] for s in STAGES}
    # a server that does not report it (an older checkout) leaves it to the arithmetic
    stages["unattributed"] = [r.get("unattributed", r["total"] - sum(r[s] for s in STAGES)) for r in replies]
    overhead = [r["total"] - sum(r[s] for s in ("decode", "preprocess", "queue", "infer")) for r in replies]
    engine_path = [sum(r[s] for s in ENGINE_PATH) for r in replies]
    return {
        "end_to_end_ms": percentiles(e2e),
        "server_total_ms": percentiles(total),
        "stage_ms": {
            s: {k: v for k, v in percentiles(values).items() if k in ("mean", "p50")} for s, values in stages.items()
        },  # fmt: skip
        # server total - decode - preprocess - queue - infer: postprocess, encode and every hand-off
        "service_overhead_ms": percentiles(overhead),
        "client_minus_server_ms": percentiles([c - t for c, t in zip(e2e, total, strict=True)]),
        # what the client waits beyond the work a frame cannot avoid (HTTP, JSON, hops, queue, postprocess)
        "e2e_minus_engine_path_ms": percentiles([c - p for c, p in zip(e2e, engine_path, strict=True)]),
        # the temporal head's own time per frame (part of postprocess), where it ran
        "temporal_step_ms": percentiles([r["temporal"] for r in replies if "temporal" in r]),
        "mean_batch_size": round(statistics.fmean(r["batch_size"] for r in replies), 2) if replies else None,
        "decoder": replies[0].get("decoder", "cpu") if replies else None,
    }


def _measured(server: ServiceProcess, engine: frozenset[int], run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """`run()` (one concurrency level) with the server's CPU time split into engine threads and the rest."""
    pid = server.proc.pid if server.proc else 0
    before = proc_cpu.sample(pid, engine) if proc_cpu.supported() else None
    result = run()
    if before is not None:
        used = proc_cpu.sample(pid, engine) - before
        frames = max(result["statuses"].get("200", 0), 1)
        result["cpu_ms_per_frame"] = {
            "process": round(used.process_s * 1000 / frames, 3),
            "engine": round(used.engine_s * 1000 / frames, 3),
            "outside_engine": round((used.process_s - used.engine_s) * 1000 / frames, 3),
        }
    return result


def engine_only(
    bundle: Path, frames: Sequence[bytes], *, env: Mapping[str, str], batches: Sequence[int], seconds: float = 3.0
) -> dict[str, Any]:
    """Frames per second of the bundle's engine alone, opened as a server with `env` opens it (backend, device,
    precision, threads, spinning: the ENDOSTREAM_* values), at each batch size."""
    from service.bundle import load_bundle
    from service.decoding import CpuDecoder
    from service.engines import EngineOptions, open_engine, warm_up
    from service.settings import Settings

    # this process's ENDOSTREAM_* variables, then `env` on top: what the servers it starts will see
    settings = Settings(**{k.removeprefix("ENDOSTREAM_").lower(): v for k, v in env.items()})
    loaded = load_bundle(bundle)
    spec = loaded.manifest.input
    decoder = CpuDecoder(spec.height, spec.width, max_pixels=1 << 30)
    inputs = [decoder.decode(f).model_input for f in frames]
    options = EngineOptions(
        device=settings.device,
        threads=settings.threads,
        precision=settings.precision,
        cuda_graphs=settings.cuda_graphs,
        max_batch=max(batches),
        spin_wait=settings.ort_spin_wait,
        compile=settings.compile,
    )
    engine = open_engine(loaded, settings.backend, options)
    try:
        warm_up(engine, spec.height, spec.width, batches=tuple(batches), runs=3)
        fps = {}
        for batch in batches:
            stacked = np.stack([inputs[i % len(inputs)] for i in range(batch)])
            calls, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                engine.run(stacked)
                calls += 1
            fps[str(batch)] = round(calls * batch / (time.perf_counter() - started), 2)
    finally:
        engine.close()
    best = max(fps, key=fps.__getitem__)
    return {
        "backend": engine.backend,
        "device": engine.device,
        "precision": engine.precision,
        "threads": settings.threads,
        "spin_wait": settings.ort_spin_wait,
        "fps": fps,
        "best_batch": int(best),
        "best_fps": fps[best],
    }


def bench_http(
    bundle: Path,
    frames: Sequence[bytes],
    *,
    concurrency: Sequence[int] = (1, 8),
    requests: int = 300,
    warmup: int = 20,
    max_batch: int = 8,
    max_queue_delay_ms: float = 2.0,
    mask: str = "png",
    mask_size: str | None = None,
    threads: int = 0,
    env: Mapping[str, str] | None = None,
    also: Mapping[str, Mapping[str, str]] | None = None,
    baseline: Path | None = None,
    engine_seconds: float = 3.0,
    temporal: bool = False,
    log_dir: Path = Path("endostream-work/bench-logs"),
) -> dict[str, Any]:
    """Measure the service with dynamic batching (`max_batch`) and without (batch 1), at each concurrency.

    Args:
        env: extra environment for every server (e.g. ENDOSTREAM_DECODE, ENDOSTREAM_BACKEND).
        also: more batching variants, name -> extra environment (e.g. {"spin": {"ENDOSTREAM_ORT_SPIN_WAIT": "1"}}).
        baseline: a checkout of another commit, run with batching under the same client load ("baseline"); its
            ratios against this checkout go into the report.
        engine_seconds: per batch size, for the engine-only throughput of the same bundle and threads.
        temporal: send every client's frames as a temporal session, one head step per frame, and also serve a
            `no_temporal` variant (ENDOSTREAM_TEMPORAL=0); the bundle needs a temporal head.
    """
    bundle = bundle.resolve()
    # Closed-loop clients keep `concurrency` requests in flight by design: this measures the frame path at that
    # concurrency, so the latency-adaptive admission (which would refuse what queues; `bench overload` measures it)
    # is fixed at the ceiling unless `env` says otherwise.
    base_env = {
        "ENDOSTREAM_ADMISSION_LATENCY_TOLERANCE": "0",
        **({"ENDOSTREAM_THREADS": str(threads)} if threads else {}),
        **(env or {}),
    }
    variants = [ServerVariant("batching", max_batch, base_env), ServerVariant("no_batching", 1, base_env)]
    if temporal:
        variants.append(ServerVariant("no_temporal", max_batch, {**base_env, "ENDOSTREAM_TEMPORAL": "0"}))
    variants += [ServerVariant(name, max_batch, {**base_env, **extra}) for name, extra in (also or {}).items()]
    step = _temporal_interval(bundle) if temporal else None
    if baseline is not None:
        variants.append(ServerVariant("baseline", max_batch, base_env, baseline.resolve()))
    params = {"mask": mask, **({"mask_size": mask_size} if mask_size else {})}
    report: dict[str, Any] = {
        "bundle": str(bundle),
        "frame_bytes_mean": int(statistics.fmean(len(f) for f in frames)),
        "params": params,
        "machine": _machine(),
        "engine_only": engine_only(
            bundle, frames, env=base_env, batches=sorted({1, max_batch // 2 or 1, max_batch}), seconds=engine_seconds
        ),
        "variants": {},
    }
    for variant in variants:
        args = ["--max-batch", str(variant.max_batch), "--max-queue-delay-ms", str(max_queue_delay_ms)]
        server = ServiceProcess(bundle, args=args, env=variant.env, cwd=variant.checkout)
        with server.start(log_dir):
            assert server.proc is not None
            engine = proc_cpu.engine_threads(server.proc.pid) if proc_cpu.supported() else frozenset()
            asyncio.run(_drive(server.url, frames, 1, warmup, params, step))
            runs = {}
            for conc in concurrency:
                drive = _drive(server.url, frames, conc, requests, params, step)
                runs[str(conc)] = _measured(server, engine, functools.partial(asyncio.run, drive))
        report["variants"][variant.name] = {
            "max_batch": variant.max_batch,
            "env": dict(variant.env),
            "checkout": str(variant.checkout) if variant.checkout else None,
            "engine_threads": len(engine),
            "runs": runs,
        }
    report["ratios"] = _ratios(report, str(max(concurrency)))
    if temporal:
        report["temporal"] = _temporal_cost(report["variants"]["batching"], report["variants"]["no_temporal"])
    return report


def _temporal_interval(bundle: Path) -> float:
    from service.bundle import load_bundle

    spec = load_bundle(bundle).manifest.temporal
    if spec is None:
        raise ValueError(f"{bundle} has no temporal head (manifest.temporal): bench --temporal needs a bundle with one")
    return spec.frame_interval_s


def _temporal_cost(on: Mapping[str, Any], off: Mapping[str, Any]) -> dict[str, Any]:
    """Per concurrency: the temporal step's own p50, and the p50s it adds (same batching, temporal on - off)."""
    out = {}
    for conc, run in on["runs"].items():
        base = off["runs"][conc]
        out[conc] = {
            "step_ms_p50": run["temporal_step_ms"].get("p50"),
            "step_ms_p99": run["temporal_step_ms"].get("p99"),
            "postprocess_p50_added_ms": round(
                run["stage_ms"]["postprocess"]["p50"] - base["stage_ms"]["postprocess"]["p50"], 3
            ),
            "server_total_p50_added_ms": round(run["server_total_ms"]["p50"] - base["server_total_ms"]["p50"], 3),
            "e2e_p50_added_ms": round(run["end_to_end_ms"]["p50"] - base["end_to_end_ms"]["p50"], 3),
        }
    return out


def _ratios(report: dict[str, Any], top: str) -> dict[str, Any]:
    variants = report["variants"]
    fps = {name: v["runs"][top]["throughput_fps"] for name, v in variants.items()}
    best_service = max(fps[name] for name in variants if name != "baseline")
    ratios: dict[str, Any] = {
        "concurrency": int(top),
        "batching_vs_no_batching": round(fps["batching"] / fps["no_batching"], 3),
        "service_vs_engine_only": round(best_service / report["engine_only"]["best_fps"], 3),
    }
    if "baseline" in variants:
        now, before = variants["batching"]["runs"], variants["baseline"]["runs"]
        ratios["vs_baseline"] = {
            conc: {
                "e2e_p50_speedup": round(before[conc]["end_to_end_ms"]["p50"] / now[conc]["end_to_end_ms"]["p50"], 3),
                "throughput": round(now[conc]["throughput_fps"] / before[conc]["throughput_fps"], 3),
                "cpu_outside_engine_saving": _cpu_ratio(before[conc], now[conc]),
            }
            for conc in now
        }
    return ratios


def _cpu_ratio(before: Mapping[str, Any], now: Mapping[str, Any]) -> float | None:
    if "cpu_ms_per_frame" not in before or "cpu_ms_per_frame" not in now:
        return None
    return round(before["cpu_ms_per_frame"]["outside_engine"] / max(now["cpu_ms_per_frame"]["outside_engine"], 1e-6), 3)


def format_http(report: dict[str, Any]) -> str:
    """The table `bench http` prints: one row per variant and concurrency, then the ratios."""
    lines = [
        "variant       conc  thr fps  e2e p50  e2e p99  decode  infer  ovh p50  ovh mean  unattr  e2e-srv"
        "  e2e-path  cpu/frame out  batch"
    ]
    for name, variant in report["variants"].items():
        for conc, run in variant["runs"].items():
            e2e, stage = run["end_to_end_ms"], run["stage_ms"]
            cpu = run.get("cpu_ms_per_frame", {}).get("outside_engine", float("nan"))
            overhead = run["service_overhead_ms"]
            cells = [
                f"{name:<13} {conc:>4} {run['throughput_fps']:>8.1f}",
                f"{e2e.get('p50', 0):>8.2f} {e2e.get('p99', 0):>8.2f}",
                f"{stage['decode'].get('mean', 0):>7.2f} {stage['infer'].get('mean', 0):>6.2f}",
                f"{overhead.get('p50', 0):>8.2f} {overhead.get('mean', 0):>9.2f}",
                f"{stage['unattributed'].get('mean', 0):>7.2f} {run['client_minus_server_ms'].get('p50', 0):>8.2f}",
                f"{run['e2e_minus_engine_path_ms'].get('p50', 0):>9.2f} {cpu:>14.2f}",
                f"{run['mean_batch_size'] or 0:>6.2f}",
            ]
            lines.append(" ".join(cells))
    engine = report["engine_only"]
    ratios = report["ratios"]
    lines.append(
        f"engine only ({engine['backend']} on {engine['device']}, {engine['precision']}, "
        f"{engine['threads'] or 'default'} threads): "
        + ", ".join(f"batch {b}: {fps:.1f} fps" for b, fps in engine["fps"].items())
    )
    lines.append(
        f"at concurrency {ratios['concurrency']}: batching / no batching = {ratios['batching_vs_no_batching']:.2f}x, "
        f"service / engine only = {ratios['service_vs_engine_only']:.2f}x"
    )
    for conc, cost in report.get("temporal", {}).items():
        lines.append(
            f"temporal step at concurrency {conc}: {cost['step_ms_p50']:.3f} ms p50 itself; adds "
            f"{cost['postprocess_p50_added_ms']:+.3f} ms to postprocess p50, {cost['server_total_p50_added_ms']:+.3f} "
            f"ms to the server's p50, {cost['e2e_p50_added_ms']:+.3f} ms to the client's p50 (vs no_temporal)"
        )
    for conc, r in ratios.get("vs_baseline", {}).items():
        saving = r["cpu_outside_engine_saving"]
        lines.append(
            f"vs baseline at concurrency {conc}: e2e p50 {r['e2e_p50_speedup']:.2f}x faster, throughput "
            f"{r['throughput']:.2f}x, CPU outside the engine {saving if saving is not None else float('nan'):.2f}x less"
        )
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
        "frame_age_ms": percentiles(ages),
        "service_total_ms": percentiles(totals),
        "infer_ms": percentiles(infers),
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
