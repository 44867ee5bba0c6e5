"""The shipped dashboard and alert rules against a real Prometheus fed by the real service (no Docker needed).

The service runs as a process on loopback with the tiny bundle and a temporal head (tests/service/temporal_bundle.py);
Debian's `prometheus` runs with the shipped deploy/prometheus/prometheus.yml, rewritten only where it must be (targets
-> loopback ports, intervals -> 1 s, the rule file -> its absolute path), and loads the shipped
deploy/prometheus/alerts.yml. Traffic: single frames and multipart batches through POST /infer (some corrupt -> 400, a
wrong type -> 415, a forbidden source -> 403, batches larger than the queue -> 503), a WebSocket burst (frames dropped
to stay live), a file: stream playing a generated clip, an RTSP source that never answers (stream down, reconnects), and
an HTTP temporal session cycling through different frames (activity label switches of both answers). Then every PromQL
expression of the dashboard and of the rules is evaluated through /api/v1/query at one instant while both streams are
live, and each must return data, except the GPU panels (dcgm-exporter needs an NVIDIA GPU): those must only parse. Alert
expressions are conditions, so their operands are evaluated instead (tests/deploy/promql.py explains how).

The value every panel query returned is printed at the end of the run (terminal summary) and written to
`prometheus-values.json` in the test's temporary folder.
"""

from __future__ import annotations

import http.server
import json
import shutil
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from service.launcher import stop_process
from tests.deploy.conftest import VALUES_KEY
from tests.deploy.promql import dashboard_queries, dashboard_variable_queries, rule_queries
from tests.service.server import ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_CONFIG = ROOT / "deploy/prometheus/prometheus.yml"
ALERTS = ROOT / "deploy/prometheus/alerts.yml"
DASHBOARD = ROOT / "deploy/grafana/dashboards/endostream.json"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
# Panels that read NVIDIA dcgm-exporter: no data without an NVIDIA GPU, so they are only checked to parse here.
GPU_PANELS = {"GPU utilisation", "GPU memory used"}
CLIP_FPS, CLIP_SECONDS, STREAM_SECONDS = 15, 30, 28
QUEUE_LIMIT = 8

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(
        not Path(PROMETHEUS).is_file() or not Path(PROMTOOL).is_file(),
        reason="Prometheus is not installed (Debian: apt-get install prometheus)",
    ),
]


# ---------------------------------------------------------------------------------------------------- promtool
def test_promtool_check_config() -> None:
    out = subprocess.run([PROMTOOL, "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_check_rules() -> None:
    out = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# ----------------------------------------------------------------------------------------------------- fixtures
def _jpeg(seed: int, index: int, height: int = 120, width: int = 160) -> bytes:
    import cv2

    from training.data.synth import render_image

    rgb = render_image(seed, index, height=height, width=width).image
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes()


def _write_clip(path: Path) -> Path:
    """A generated endoscopy clip (MPEG-4 part 2 through OpenCV: no encoder beyond opencv-python-headless)."""
    import cv2

    from training.data.synth import render_image

    frames = [render_image(3, i % 24, height=96, width=128).image for i in range(24)]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), CLIP_FPS, (128, 96))
    assert writer.isOpened(), "OpenCV cannot write mp4v here"
    for i in range(CLIP_FPS * CLIP_SECONDS):
        writer.write(cv2.cvtColor(frames[i % len(frames)], cv2.COLOR_RGB2BGR))
    writer.release()
    return path


class SilentRtspServer:
    """Accepts TCP connections and never answers: each RTSP open waits for its timeout, as with a dead camera."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


class FlappingMjpegCamera:
    """MJPEG over HTTP that serves `burst` seconds of frames per connection, then hangs up: a flapping camera.

    The reader gets frames (stream up), loses them (reconnecting), reopens after its backoff, and so on: reconnects
    climb while the stream keeps delivering.
    """

    def __init__(self, frame: bytes, burst: float = 1.0, fps: float = 15.0) -> None:
        part = b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n%s\r\n" % (len(frame), frame)

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server hook name
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                until = time.monotonic() + burst
                with suppress(OSError):
                    while time.monotonic() < until:
                        self.wfile.write(part)
                        time.sleep(1.0 / fps)

            def log_message(self, *args: object) -> None:
                pass

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Prometheus:
    """The Prometheus server on loopback with the shipped config, rewritten for this run."""

    def __init__(self, workdir: Path, service_port: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
        config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
        config["rule_files"] = [str((PROMETHEUS_CONFIG.parent / f).resolve()) for f in config["rule_files"]]
        closed = free_port()  # nothing listens here: the dcgm target is down, as on a CPU-only box
        targets = {"endostream": service_port, "prometheus": self.port}
        for job in config["scrape_configs"]:
            for static in job["static_configs"]:
                static["targets"] = [f"127.0.0.1:{targets.get(job['job_name'], closed)}"]
        self.config = workdir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = workdir / "prometheus.log"
        self.proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={self.config}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log_path.open("wb"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"prometheus not ready after 30 s:\n{self.log_path.read_text()}")

    def api(self, path: str, **params: Any) -> Any:
        reply = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = reply.json()
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body}")
        return body["data"]

    def query(self, promql: str, at: float | None = None) -> dict[str, Any]:
        """The full API answer (status, data or error) of an instant query."""
        params = {"query": promql, **({"time": f"{at:.3f}"} if at is not None else {})}
        return httpx.get(f"{self.url}/api/v1/query", params=params, timeout=10).json()

    def stop(self) -> None:
        stop_process(self.proc)


class Streams:
    """Stream requests (POST /infer with a source) consumed in background threads."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.lines: dict[str, list[dict[str, Any]]] = {}
        self.threads: list[threading.Thread] = []

    def open(self, name: str, source: str, seconds: float) -> None:
        self.lines[name] = []

        def consume() -> None:
            with httpx.stream(
                "POST", f"{self.base}/infer", json={"source": source, "max_seconds": seconds}, timeout=60
            ) as reply:
                for line in reply.iter_lines():
                    if line:
                        self.lines[name].append(json.loads(line))

        thread = threading.Thread(target=consume, daemon=True)
        thread.start()
        self.threads.append(thread)

    def stop_all(self) -> None:
        for stream in httpx.get(f"{self.base}/streams", timeout=5).json():
            httpx.delete(f"{self.base}/streams/{stream['id']}", timeout=5)
        for thread in self.threads:
            thread.join(10)


def _drive_frames(base: str) -> dict[str, int]:
    """Uploads, batches, bad requests and a WebSocket burst; returns status code counts."""
    frames = [_jpeg(7, i) for i in range(6)]
    statuses: dict[str, int] = {}
    lock = threading.Lock()

    def count(code: int) -> None:
        with lock:
            statuses[str(code)] = statuses.get(str(code), 0) + 1

    def uploads(offset: int) -> None:
        with httpx.Client(base_url=base, timeout=30) as client:
            for i in range(15):
                reply = client.post("/infer", content=frames[(i + offset) % 6], headers={"content-type": "image/jpeg"})
                count(reply.status_code)

    def batch(size: int) -> None:
        parts = [("frame", (f"{i}.jpg", frames[i % 6], "image/jpeg")) for i in range(size)]
        count(httpx.post(f"{base}/infer", files=parts, timeout=30).status_code)

    workers = [threading.Thread(target=uploads, args=(k,)) for k in range(2)]
    workers += [threading.Thread(target=batch, args=(4,)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    for _ in range(2):
        batch(3 * QUEUE_LIMIT)  # more frames than the queue holds: 503 + Retry-After
    with httpx.Client(base_url=base, timeout=30) as client:
        for i in range(3):
            count(
                client.post("/infer", content=b"not a jpeg %d" % i, headers={"content-type": "image/jpeg"}).status_code
            )
        count(client.post("/infer", content=b"hello", headers={"content-type": "text/plain"}).status_code)
        count(client.post("/infer", json={"source": "file:/etc/passwd"}).status_code)
    _websocket_burst(base, frames)
    return statuses


def _temporal_session(base: str, count: int = 24) -> None:
    """One HTTP session cycling through the frames, one head step each: labels switch in both answers."""
    frames = [_jpeg(7, i) for i in range(6)]
    with httpx.Client(base_url=base, timeout=30) as client:
        for i in range(count):
            headers = {"content-type": "image/jpeg", "X-Session-Id": "flicker", "X-Frame-Time": f"{0.1 * i:.1f}"}
            client.post("/infer", content=frames[(i // 2) % len(frames)], headers=headers, params={"mask": "none"})


def _websocket_burst(base: str, frames: list[bytes], count: int = 40) -> None:
    """Frames pushed faster than the engine takes them: the latest wins and the rest count as dropped."""
    from websockets.sync.client import connect

    with connect(base.replace("http://", "ws://") + "/ws/infer?mask=none", open_timeout=10) as ws:
        for i in range(count):
            ws.send(frames[i % len(frames)])
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                ws.recv(timeout=0.5)
            except TimeoutError:
                break


def _wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.25)
    raise TimeoutError(f"waited {timeout} s for {what}")


def _summary(answer: dict[str, Any]) -> str:
    """Compact text of an instant query's result: `labels=value` per series (at most 4)."""
    if answer.get("status") != "success":
        return f"ERROR {answer.get('error')}"
    data = answer["data"]
    if data["resultType"] == "scalar":
        return _number(data["result"][1])
    items = []
    for series in data["result"][:4]:
        labels = {k: v for k, v in series["metric"].items() if k not in ("__name__", "job", "instance")}
        name = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        items.append(f"{name + '=' if name else ''}{_number(series['value'][1])}")
    more = len(data["result"]) - 4
    return "; ".join(items) + (f"; +{more} more" if more > 0 else "") if items else "(no data)"


def _number(text: str) -> str:
    try:
        return f"{float(text):.4g}"
    except ValueError:
        return text


@pytest.fixture(scope="module")
def run(
    temporal_bundle: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[dict]:
    """Service + Prometheus + traffic, then every query evaluated at one instant while the streams are live."""
    workdir = tmp_path_factory.mktemp("prometheus")
    clip = _write_clip(workdir / "clip.mp4")
    dead = SilentRtspServer()
    flapping = FlappingMjpegCamera(_jpeg(5, 1, 96, 128))
    service = ServerProcess(
        temporal_bundle,
        env={
            "ENDOSTREAM_STREAM_ALLOWLIST": (
                f"file:{workdir}/,rtsp://127.0.0.1:{dead.port}/,http://127.0.0.1:{flapping.port}/"
            ),
            # 3 opens of 8 s each (backoff between) before the dead camera's request gives up: ~25 s of "down",
            # far longer than the run needs on a slow machine (the streams are deleted once the queries are done)
            "ENDOSTREAM_STREAM_OPEN_TIMEOUT_S": "8",
            "ENDOSTREAM_QUEUE_LIMIT": str(QUEUE_LIMIT),
            "ENDOSTREAM_MAX_BATCH": "8",
            # six closed-loop clients at once are overload for the latency-adaptive admission, which would refuse
            # most uploads; the 503s this run needs come from the queue limit
            "ENDOSTREAM_ADMISSION_LATENCY_TOLERANCE": "0",
        },
    ).start(workdir)
    prometheus = Prometheus(workdir, service.port)
    streams = Streams(service.url)
    try:
        # Counters must be seen before and after they move, or rate() has nothing to show: first one scrape ...
        _wait_until(lambda: bool(prometheus.query('up{job="endostream"} == 1')["data"]["result"]), 10, "a scrape")
        streams.open("file", f"file:{clip}", STREAM_SECONDS)
        streams.open("dead", f"rtsp://127.0.0.1:{dead.port}/endoscope", STREAM_SECONDS)
        streams.open("flapping", f"http://127.0.0.1:{flapping.port}/camera.mjpg", STREAM_SECONDS)
        # ... then the same traffic twice with scrapes in between: series created by the first round (a status
        # class, a rejection reason) already exist when the second moves them.
        session = threading.Thread(target=_temporal_session, args=(service.url,))
        session.start()  # beside the first round: the dead camera's stream must still be down when it is over
        statuses = _drive_frames(service.url)
        session.join(60)
        time.sleep(1.5)
        for code, n in _drive_frames(service.url).items():
            statuses[code] = statuses.get(code, 0) + n
        traffic_done = time.time()

        def ready() -> bool:
            checks = (
                "count(endostream_stream_up) >= 3 and count(endostream_stream_up == 0) >= 1",
                "sum(increase(endostream_stream_reconnects_total[1m])) > 0",
                f'timestamp(up{{job="endostream"}}) > {traffic_done + 1.0}',
                "count(count_over_time(endostream_frame_age_seconds_count[1m]) >= 3) >= 2",
            )
            return all(prometheus.query(check).get("data", {}).get("result") for check in checks)

        _wait_until(ready, 15, "scrapes of the three streams (one down, one reconnecting) after the traffic")
        at = time.time()
        answers = [(q, prometheus.query(q.promql, at)) for q in dashboard_queries(DASHBOARD) + rule_queries(ALERTS)]
        variables = {
            name: prometheus.api("series", **{"match[]": definition.split("(")[1].split(",")[0], "start": at - 60})
            for name, definition in dashboard_variable_queries(DASHBOARD).items()
        }
        _wait_until(
            lambda: any(a["labels"]["alertname"] == "EndostreamStreamDown" for a in prometheus.api("alerts")["alerts"]),
            10,
            "the stream-down alert to be pending",
        )
        result = {
            "at": at,
            "answers": answers,
            "variables": variables,
            "rules": prometheus.api("rules")["groups"],
            "alerts": prometheus.api("alerts")["alerts"],
            "statuses": statuses,
        }
        streams.stop_all()
        result["streams"] = streams.lines
        values = [
            {"source": q.source, "panel": q.owner, "ref": q.ref, "promql": q.promql, "value": _summary(a)}
            for q, a in answers
        ]
        (workdir / "prometheus-values.json").write_text(json.dumps(values, indent=2))
        request.config.stash[VALUES_KEY] = values
        yield result
    finally:
        with suppress(httpx.HTTPError):
            streams.stop_all()
        prometheus.stop()
        service.stop()
        dead.close()
        flapping.close()


# -------------------------------------------------------------------------------------------------------- tests
def test_traffic_covered_every_status_class(run: dict) -> None:
    statuses = run["statuses"]
    assert statuses.get("200", 0) >= 30, statuses
    assert {"400", "403", "415", "503"} <= set(statuses), statuses
    file_lines = run["streams"]["file"]
    assert sum(1 for line in file_lines if "frame" in line and "error" not in line) >= 20, file_lines[-3:]


def test_every_dashboard_query_returns_data(run: dict) -> None:
    answers = [(q, a) for q, a in run["answers"] if q.source == "dashboard"]
    assert len(answers) >= 30
    errors = [f"{q.owner} [{q.ref}]: {a}" for q, a in answers if a.get("status") != "success"]
    assert not errors, "queries Prometheus refused:\n" + "\n".join(errors)
    gpu = {q.owner for q, _ in answers if q.gpu}
    assert gpu == GPU_PANELS, f"GPU (dcgm) panels changed: update GPU_PANELS and the report; found {sorted(gpu)}"
    empty = [f"{q.owner} [{q.ref}]: {q.promql}" for q, a in answers if not q.gpu and not a["data"]["result"]]
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)


def test_label_switches_of_both_answers_were_counted(run: dict) -> None:
    """The flicker panel shows real switches, not zero series: the traffic changed both labels."""
    panel = [a for q, a in run["answers"] if q.owner.startswith("Activity label switches")]
    assert panel, "the dashboard lost its label-switch panel"
    moved = {
        (s["metric"]["source_kind"], s["metric"]["answer"])
        for s in panel[0]["data"]["result"]
        if float(s["value"][1]) > 0
    }
    assert {("http", "frame"), ("http", "temporal")} <= moved, moved
    assert ("stream", "frame") in moved, moved


def test_gpu_panels_say_they_need_dcgm(run: dict) -> None:
    panels = {p["title"]: p for p in _all_panels(json.loads(DASHBOARD.read_text())["panels"])}
    for title in GPU_PANELS:
        assert "dcgm-exporter" in panels[title]["description"], title


def test_every_rule_expression_returns_data(run: dict) -> None:
    answers = [(q, a) for q, a in run["answers"] if q.source == "rules"]
    names = {q.owner for q, _ in answers}
    assert len(names) == sum(len(g["rules"]) for g in yaml.safe_load(ALERTS.read_text())["groups"])
    errors = [f"{q.owner} {q.ref}: {a}" for q, a in answers if a.get("status") != "success"]
    assert not errors, "\n".join(errors)
    empty = [f"{q.owner} {q.ref}: {q.promql}" for q, a in answers if not a["data"]["result"]]
    assert not empty, "rule expressions (alert conditions stripped to their series) without data:\n" + "\n".join(empty)


def test_prometheus_evaluated_every_rule_without_error(run: dict) -> None:
    rules = [rule for group in run["rules"] for rule in group["rules"]]
    assert len(rules) == sum(len(g["rules"]) for g in yaml.safe_load(ALERTS.read_text())["groups"])
    bad = [f"{r['name']}: {r.get('health')} {r.get('lastError')}" for r in rules if r.get("health") != "ok"]
    assert not bad, "\n".join(bad)


def test_stream_down_alert_pending_for_the_dead_camera(run: dict) -> None:
    down = [a for a in run["alerts"] if a["labels"]["alertname"] == "EndostreamStreamDown"]
    assert down and all(a["state"] in ("pending", "firing") for a in down), run["alerts"]


def test_dashboard_variables_have_values(run: dict) -> None:
    assert run["variables"]["instance"], "no series for the instance variable"
    streams = {series["stream"] for series in run["variables"]["stream"]}
    assert len(streams) >= 3, streams


def _all_panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for panel in panels:
        out.append(panel)
        out.extend(_all_panels(panel.get("panels", [])))
    return out


def test_summary_lists_every_query(run: dict, request: pytest.FixtureRequest) -> None:
    values = request.config.stash[VALUES_KEY]
    assert len(values) == len(run["answers"])
    assert all(not v["value"].startswith("ERROR") for v in values)
