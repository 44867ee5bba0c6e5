"""`endostream bench overload`: the service offered more frames than it can take, as an open-loop load.

First the unloaded latency (one client) and the capacity (frames/s with `capacity_clients` closed-loop clients) are
measured; then frames arrive at `factor` x capacity for `seconds`, each on its own schedule whatever the answers (an
open loop: a camera does not slow down because the server does). Reported: accepted frames' latency against the
unloaded p99, how fast refusals (503) come back and whether they carry Retry-After, anything else that came back,
and the server's resident memory before and after the load.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from service.bench import _drive, _machine, percentiles
from service.bench_client import RawConnection, post_request
from service.launcher import ServiceProcess

# uvicorn closes a keep-alive connection after 5 s idle; reusing one that old races its close (all 7 connection errors
# of a 60 s run came on connections idle 5.1-16.5 s), which measures the client, not the service
REUSE_IDLE_S = 4.0


def rss_bytes(pid: int) -> int:
    """Resident set size of `pid` (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


async def _open_loop(url: str, frames: Sequence[bytes], rate: float, seconds: float, max_open: int) -> dict[str, Any]:
    """`rate` frames per second for `seconds`, each sent at its time on an idle keep-alive connection (a new one when
    none is idle, up to `max_open`); a frame due while `max_open` connections are all busy is counted, not sent."""
    requests = [post_request(f) for f in frames]
    accepted: list[float] = []
    refused: list[float] = []
    statuses: dict[str, int] = {}
    retry_after = 0
    client_dropped = 0
    idle: list[tuple[RawConnection, float]] = []  # keep-alive connections and since when they are idle
    errors_after_idle_s: list[float] = []  # per connection error: how long its connection had been idle (-1: new)
    open_count = 0

    async def one(raw: bytes) -> None:
        nonlocal retry_after, open_count
        started = time.perf_counter()
        conn, idle_since = idle.pop() if idle else (None, None)
        while conn is not None and idle_since is not None and started - idle_since > REUSE_IDLE_S:
            conn.close()  # the server may be closing it right now: a real client would not reuse it either
            open_count -= 1
            conn, idle_since = idle.pop() if idle else (None, None)
        if conn is None:
            open_count += 1
            conn = await RawConnection.open(url)
        try:
            status, headers, _ = await conn.request(raw)
        except (ConnectionError, asyncio.IncompleteReadError):
            statuses["connection_error"] = statuses.get("connection_error", 0) + 1
            errors_after_idle_s.append(round(started - idle_since, 3) if idle_since is not None else -1.0)
            open_count -= 1
            return
        elapsed = (time.perf_counter() - started) * 1000
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        if headers.get("connection") == "close":
            conn.close()
            open_count -= 1
        else:
            idle.append((conn, time.perf_counter()))
        if status == 200:
            accepted.append(elapsed)
        elif status == 503:
            refused.append(elapsed)
            retry_after += "retry-after" in headers

    tasks = []
    start = time.perf_counter()
    for i in range(int(rate * seconds)):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if not idle and open_count >= max_open:
            client_dropped += 1
            continue
        tasks.append(asyncio.create_task(one(requests[i % len(requests)])))
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - start
    for conn, _ in idle:
        conn.close()
    return {
        "offered_fps": round(rate, 2),
        "sent": len(tasks),
        "client_dropped": client_dropped,
        "connections_opened": len(idle),
        "statuses": dict(sorted(statuses.items())),
        "accepted_fps": round(len(accepted) / wall, 2),
        "accepted_ms": percentiles(accepted),
        "refused_ms": percentiles(refused),
        "refused_with_retry_after": retry_after,
        "connection_errors_after_idle_s": sorted(errors_after_idle_s),
    }


def bench_overload(
    bundle: Path,
    frames: Sequence[bytes],
    *,
    factor: float = 3.0,
    seconds: float = 60.0,
    capacity_clients: int = 8,
    calibration_requests: int = 200,
    max_open: int = 256,
    env: Mapping[str, str] | None = None,
    log_dir: Path = Path("endostream-work/bench-logs"),
) -> dict[str, Any]:
    """Unloaded latency, capacity, then `factor` x capacity for `seconds` (see the module docstring)."""
    with ServiceProcess(bundle.resolve(), env=dict(env or {})).start(log_dir) as server:
        assert server.proc is not None
        pid = server.proc.pid
        asyncio.run(_drive(server.url, frames, 1, 20, {"mask": "png"}))  # warm every path once
        unloaded = asyncio.run(_drive(server.url, frames, 1, calibration_requests, {"mask": "png"}))
        capacity = asyncio.run(_drive(server.url, frames, capacity_clients, calibration_requests, {"mask": "png"}))
        rss_before = rss_bytes(pid)
        rate = factor * capacity["throughput_fps"]
        load = asyncio.run(_open_loop(server.url, frames, rate, seconds, max_open))
        time.sleep(1.0)  # let the last answers' buffers go
        rss_after = rss_bytes(pid)
    unloaded_p99 = unloaded["end_to_end_ms"]["p99"]
    refused = load["statuses"].get("503", 0)
    return {
        "bundle": str(bundle),
        "factor": factor,
        "seconds": seconds,
        "unloaded_ms": unloaded["end_to_end_ms"],
        "capacity_fps": capacity["throughput_fps"],
        "load": load,
        "accepted_p99_vs_unloaded_p99": round(load["accepted_ms"].get("p99", 0.0) / unloaded_p99, 3),
        "refused_share_with_retry_after": round(load["refused_with_retry_after"] / refused, 4) if refused else None,
        "rss_before_bytes": rss_before,
        "rss_after_bytes": rss_after,
        "rss_after_vs_before": round(rss_after / rss_before, 4),
        "machine": _machine(),
    }


def format_overload(report: dict[str, Any]) -> str:
    load = report["load"]
    accepted, refused = load["accepted_ms"], load["refused_ms"]
    return "\n".join(
        [
            f"unloaded: e2e p50 {report['unloaded_ms']['p50']:.1f} ms, p99 {report['unloaded_ms']['p99']:.1f} ms; "
            f"capacity {report['capacity_fps']:.1f} fps",
            f"offered {load['offered_fps']:.1f} fps ({report['factor']:g}x) for {report['seconds']:g} s: "
            f"statuses {load['statuses']}, {load['client_dropped']} not sent (all connections busy)",
            f"accepted {load['accepted_fps']:.1f} fps: p50 {accepted.get('p50', 0):.1f} ms, p99 "
            f"{accepted.get('p99', 0):.1f} ms = {report['accepted_p99_vs_unloaded_p99']:.2f}x the unloaded p99",
            f"refused: p50 {refused.get('p50', 0):.1f} ms, p99 {refused.get('p99', 0):.1f} ms, with Retry-After: "
            f"{report['refused_share_with_retry_after']}",
            f"server RSS {report['rss_before_bytes'] / 2**20:.0f} -> {report['rss_after_bytes'] / 2**20:.0f} MiB "
            f"({report['rss_after_vs_before']:.3f}x)",
        ]
    )
