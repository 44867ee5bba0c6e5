"""Pytest helpers for stream tests: a generated H.264 clip and a real GStreamer RTSP server you can kill and restart.

The server (tests/service/rtsp_server.py) runs under the system python, which has the GStreamer bindings; the
project's python does not need them. Missing bindings skip the RTSP tests with the Debian packages to install.
"""

from __future__ import annotations

import functools
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SYSTEM_PYTHON = "/usr/bin/python3"
SERVER_SCRIPT = Path(__file__).with_name("rtsp_server.py")
APT_PACKAGES = (
    "python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-rtsp gstreamer1.0-plugins-good gstreamer1.0-plugins-bad"
)
CLIP_FPS = 20
CLIP_SECONDS = 2.0
CLIP_SIZE = (96, 128)  # H, W: small, so two CPU cores encode, serve and decode it with room to spare

_GST_CHECK = """
import gi
gi.require_version("Gst", "1.0"); gi.require_version("GstApp", "1.0"); gi.require_version("GstRtspServer", "1.0")
from gi.repository import Gst, GstRtspServer
Gst.init(None)
missing = [e for e in ("qtdemux", "h264parse", "rtph264pay", "appsrc") if Gst.ElementFactory.find(e) is None]
assert not missing, f"GStreamer elements missing: {missing}"
"""


@functools.cache
def rtsp_unavailable() -> str | None:
    """Why the RTSP test server cannot run here, or None when it can."""
    if not Path(SYSTEM_PYTHON).exists():
        return f"{SYSTEM_PYTHON} not found; the RTSP test server needs the system python with GStreamer bindings"
    probe = subprocess.run([SYSTEM_PYTHON, "-c", _GST_CHECK], capture_output=True, text=True, timeout=30)
    if probe.returncode:
        reason = (probe.stderr.strip().splitlines() or ["unknown error"])[-1]
        return f"GStreamer RTSP server unavailable for {SYSTEM_PYTHON} ({reason}); apt-get install {APT_PACKAGES}"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def codec_of(path: Path) -> str:
    """Codec name of the first video stream (ffprobe)."""
    cmd = ["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries", "stream=codec_name", "-of", "csv=p=0"]
    return subprocess.run([*cmd, str(path)], capture_output=True, text=True, check=True).stdout.strip()


def ensure_h264(path: Path) -> Path:
    """`path` if it is H.264, else an H.264 copy (short fixed GOP, so an RTSP client can join within 15 frames)."""
    if shutil.which("ffprobe") is None or codec_of(path) == "h264":
        return path
    out = path.with_name(path.stem + "_h264.mp4")
    subprocess.run(
        ["ffmpeg", "-v", "error", "-y", "-i", str(path), "-c:v", "libx264", "-preset", "ultrafast", "-g", "15",
         "-bf", "0", "-pix_fmt", "yuv420p", str(out)], check=True, timeout=60,
    )  # fmt: skip
    return out


def make_clip(folder: Path) -> Path:
    """A generated endoscopy clip (CLIP_SECONDS at CLIP_FPS, H.264 MP4) from the project's data synthesiser."""
    from training.data.writer import write_clip

    write_clip(folder, 0, seed=3, seconds=CLIP_SECONDS, fps=CLIP_FPS, size=CLIP_SIZE, gop=10)
    return ensure_h264(folder / "clip_000.mp4")


class RtspServer:
    """rtsp_server.py in a subprocess on a fixed port: `start`, `kill` (SIGKILL, like a crashed camera), `restart`."""

    def __init__(self, clip: Path, port: int | None = None, name: str = "cam") -> None:
        self.clip, self.port, self.name = clip, port or free_port(), name
        self.url = f"rtsp://127.0.0.1:{self.port}/{name}"
        self._proc: subprocess.Popen[str] | None = None
        self._log = tempfile.NamedTemporaryFile("w+", prefix="rtsp-server-", suffix=".log", delete=False)

    def start(self, timeout: float = 15.0) -> RtspServer:
        """Start the server and wait for its READY line; retries while the port is still held by the last one."""
        deadline = time.monotonic() + timeout
        while True:
            if self._spawn(deadline):
                return self
            if time.monotonic() > deadline:
                self._log.seek(0)
                raise RuntimeError(f"RTSP test server did not get ready on {self.url}:\n{self._log.read()[-2000:]}")
            time.sleep(0.2)

    def _spawn(self, deadline: float) -> bool:
        cmd = [SYSTEM_PYTHON, str(SERVER_SCRIPT), str(self.clip), "--port", str(self.port), "--name", self.name]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, text=True)
        ready = threading.Event()

        def watch() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:  # keep draining after READY so the server never blocks on a full pipe
                if line.startswith("READY"):
                    ready.set()

        threading.Thread(target=watch, daemon=True).start()
        while not ready.wait(0.05):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                return False
        self._proc = proc
        return True

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the server: clients see the connection drop with no RTSP teardown."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)  # a paused process dies on SIGKILL too, but say so explicitly
            self._proc.kill()
            self._proc.wait(timeout=10)
            self._proc = None

    def pause(self) -> None:
        """SIGSTOP the server: connections stay open but no packet arrives (a hung camera, for the watchdog)."""
        assert self._proc is not None, "server not running"
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._proc is not None, "server not running"
        self._proc.send_signal(signal.SIGCONT)

    def restart(self, timeout: float = 15.0) -> RtspServer:
        """Kill (if running) and start again on the same port and path."""
        self.kill()
        return self.start(timeout)

    def close(self) -> None:
        self.kill()
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)


@pytest.fixture(scope="session")
def video_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2 s, 20 fps, 128x96 H.264 MP4 clip, generated once per test session."""
    return make_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture
def rtsp_server(video_clip: Path) -> Iterator[RtspServer]:
    """A running RTSP server looping `video_clip`; skips when the GStreamer bindings are missing."""
    reason = rtsp_unavailable()
    if reason:
        pytest.skip(reason)
    server = RtspServer(video_clip).start()
    try:
        yield server
    finally:
        server.close()
