"""How fast a live RTSP stream comes back after its camera crashes: kill a real RTSP server N times, restart it, time
the first result the service streams after each restart. Writes JSON; variants run side by side in one run.

The camera is the test suite's GStreamer RTSP server (tests/service/rtsp.py, run by the system python with the
GStreamer bindings: `apt-get install python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-rtsp
gstreamer1.0-plugins-{good,bad,ugly}`). Each variant gets a fresh service (`ENDOSTREAM_*` overrides per variant) and
a fresh camera on a new port; one `POST /infer {"source": ...}` stays open across every restart, so the figure is what
a client sees: from the moment the camera is serving again to the next result line.

    python scripts/bench_camera_restart.py --restarts 10 --also before:ENDOSTREAM_STREAM_BACKOFF_MAX_S=30
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout: tests/ and service/ import

from service.launcher import ServiceProcess  # noqa: E402
from tests.service.rtsp import RtspServer, make_clip, rtsp_unavailable  # noqa: E402

DEFAULT_OUT = Path("endostream-work/bench/camera_restart.json")


class ResultLog:
    """One open `POST /infer` stream from a camera; records when each result line arrived (monotonic seconds)."""

    def __init__(self, service_url: str, camera_url: str, seconds: float) -> None:
        self.times: list[float] = []
        self.end: dict | None = None
        self._body = {"source": camera_url, "max_seconds": seconds}
        self._url = f"{service_url}/infer"
        self._thread = threading.Thread(target=self._consume, daemon=True)

    def start(self) -> ResultLog:
        self._thread.start()
        return self

    def _consume(self) -> None:
        with httpx.stream("POST", self._url, json=self._body, timeout=None) as reply:
            reply.raise_for_status()
            for line in reply.iter_lines():
                if not line:
                    continue
                item = json.loads(line)
                if "end" in item:
                    self.end = item["end"]
                elif "activity" in item:
                    self.times.append(time.monotonic())

    def wait_after(self, moment: float, count: int, timeout: float, what: str) -> None:
        """Block until `count` results arrived after `moment`."""
        wait_until(lambda: sum(t > moment for t in self.times) >= count, timeout, what)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout:g} s")
        time.sleep(0.01)


def run_variant(name: str, env: dict[str, str], args: argparse.Namespace, clip: Path, logs: Path) -> dict:
    """Serve one camera through a fresh service with `env`; kill and restart the camera `args.restarts` times."""
    camera = RtspServer(clip, name=f"cam-{name}").start()
    service = ServiceProcess(
        args.bundle, env={"ENDOSTREAM_STREAM_ALLOWLIST": f"rtsp://127.0.0.1:{camera.port}/", **env}
    ).start(logs)
    recoveries: list[float] = []
    try:
        results = ResultLog(service.url, camera.url, seconds=3600).start()
        wait_until(lambda: len(results.times) >= 10, 30, "10 results before the first kill")
        for index in range(args.restarts):
            camera.kill()  # SIGKILL: the connection drops with no RTSP teardown, as when a camera crashes
            time.sleep(args.down_s)
            camera.start()
            back = time.monotonic()  # the camera answers RTSP again from here on
            results.wait_after(back, 1, args.give_up_s, f"result after restart {index + 1}")
            recoveries.append(min(t for t in results.times if t > back) - back)
            results.wait_after(back, 5, 10, "steady results after the restart")
            print(f"{name}: restart {index + 1}/{args.restarts}: first result {recoveries[-1]:.2f} s", flush=True)
        stream = httpx.get(f"{service.url}/streams", timeout=10).json()[0]
        httpx.delete(f"{service.url}/streams/{stream['id']}", timeout=10)
        results.join(10)
    finally:
        service.stop()
        camera.close()
    return {
        "env": env,
        "recovery_s": [round(r, 3) for r in recoveries],
        "median_s": round(statistics.median(recoveries), 3),
        "max_s": round(max(recoveries), 3),
        "mean_s": round(statistics.fmean(recoveries), 3),
        "reconnects": stream["reconnects"],
    }


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """`NAME:KEY=VALUE[,KEY=VALUE...]` -> (NAME, {KEY: VALUE})."""
    name, _, assignments = text.partition(":")
    env = dict(item.split("=", 1) for item in assignments.split(",") if "=" in item)
    if not name or not env:
        raise argparse.ArgumentTypeError(f"--also {text!r}: expected NAME:ENV=VALUE[,ENV=VALUE]")
    return name, env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=Path("endostream-work/bundle"), help="bundle to serve")
    parser.add_argument("--restarts", type=int, default=10, help="camera kills and restarts per variant")
    parser.add_argument("--down-s", type=float, default=2.0, help="how long the camera stays dead each time")
    parser.add_argument("--give-up-s", type=float, default=60.0, help="fail when a restart gets no result this long")
    parser.add_argument("--also", type=parse_variant, action="append", default=[], help="NAME:ENV=VALUE[,...]")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON report")
    args = parser.parse_args(argv)
    if (reason := rtsp_unavailable()) is not None:
        parser.error(reason)
    if not (args.bundle / "manifest.json").is_file():
        parser.error(f"--bundle {args.bundle}: no manifest.json there; build one with `make demo` or pass a bundle")
    variants = [("default", {}), *args.also]
    with tempfile.TemporaryDirectory(prefix="camera-restart-") as tmp:
        clip = make_clip(Path(tmp))
        report = {name: run_variant(name, env, args, clip, Path(tmp) / "logs") for name, env in variants}
    base = report["default"]["median_s"]
    for name, _ in args.also:
        report[name]["median_ratio_to_default"] = round(report[name]["median_s"] / base, 2) if base else None
    summary = {"restarts": args.restarts, "down_s": args.down_s, "variants": report}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    for name, row in report.items():
        print(f"{name:>10}: median {row['median_s']:.2f} s, max {row['max_s']:.2f} s over {args.restarts} restarts")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
