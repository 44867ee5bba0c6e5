"""SIGTERM during live streams: every NDJSON response ends with its final `{"end": {"reason": "shutdown"}}` line,
and `endostream serve` exits 0 (a drained shutdown is a success for the orchestrator, not a death by signal)."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx

from tests.reliability import START_S
from tests.service.rtsp import RtspServer
from tests.service.server import ServerProcess

STREAMS = 2


def test_sigterm_ends_streams_with_their_final_line_and_exits_0(
    rtsp_server: RtspServer, endoarss_bundle: Path, tmp_path: Path
) -> None:
    env = {"ENDOSTREAM_STREAM_ALLOWLIST": f"rtsp://127.0.0.1:{rtsp_server.port}/"}
    service = ServerProcess(endoarss_bundle, env=env).start(tmp_path, timeout=START_S)
    outputs: list[list[dict]] = [[] for _ in range(STREAMS)]

    def consume(lines: list[dict]) -> None:
        with httpx.stream("POST", f"{service.url}/infer", json={"source": rtsp_server.url}, timeout=30) as reply:
            lines.extend(json.loads(line) for line in reply.iter_lines() if line)

    readers = [threading.Thread(target=consume, args=(out,), daemon=True) for out in outputs]
    try:
        for reader in readers:
            reader.start()
        deadline = time.monotonic() + 20
        while min(len(out) for out in outputs) < 3:
            assert time.monotonic() < deadline, "the streams did not start"
            time.sleep(0.05)
        assert service.proc is not None
        service.proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code = service.proc.wait(15)
        took = time.monotonic() - started
        for reader in readers:
            reader.join(5)
    finally:
        service.stop()
    print(f"SIGTERM during {STREAMS} streams: exit {code} after {took:.2f} s")
    for out in outputs:
        assert out[-1].get("end", {}).get("reason") == "shutdown", out[-1]
        assert sum("activity" in line for line in out) >= 3
    assert code == 0, service.log()[-3000:]
    assert took < 5.0, "the drain should not wait for uvicorn's graceful timeout"
