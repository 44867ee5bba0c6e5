"""Decoder backends for stream readers: OpenCV (FFmpeg) and PyAV, behind one small `FrameSource` protocol.

OpenCV's FFmpeg backend takes open/read timeouts as open parameters but demuxer options only through the
process-wide OPENCV_FFMPEG_CAPTURE_OPTIONS variable; PyAV takes options per open and exposes packet PTS
(SERVING_NOTES "RTSP with OpenCV/FFmpeg"). Both return RGB uint8 frames.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Literal, Protocol

import cv2
import numpy as np

from service.streams.policy import ffmpeg_options, opencv_options

logger = logging.getLogger(__name__)

Backend = Literal["opencv", "pyav"]

CAPTURE_OPTIONS_ENV = "OPENCV_FFMPEG_CAPTURE_OPTIONS"
# How long FFmpeg probes a network stream before the first frame (microseconds). Its default (5 s, cut short by the
# frame-rate probe) spent 1.4 s of every open on a 20 fps RTSP camera; an RTSP camera announces its codec in the SDP
# and repeats SPS/PPS in band, so 0.25 s is plenty and a restarted camera is back ~1.1 s sooner (first frame 1.6 ->
# 0.6 s, of which 0.5 s is waiting for the next key frame at GOP 10).
NETWORK_PROBE_US = "250000"
# RTSP over TCP (no UDP loss or NAT trouble), no demuxer buffering, low-delay decoding, short probing.
LOW_DELAY_OPTIONS = f"rtsp_transport;tcp|fflags;nobuffer|flags;low_delay|analyzeduration;{NETWORK_PROBE_US}"

_env_lock = threading.Lock()
_env_checked = False


class SourceError(RuntimeError):
    """Opening or reading a stream failed (the message names the source and the FFmpeg reason)."""


def _reason(err: Exception) -> str:
    """FFmpeg's reason without the URL (PyAV errors quote the full URL, credentials included)."""
    return getattr(err, "strerror", None) or type(err).__name__


class FrameSource(Protocol):
    """An open stream. `fps` is the nominal rate (0.0 when the source does not say)."""

    fps: float

    def read(self, deadline: float) -> tuple[np.ndarray, float | None] | None:
        """Next frame as (RGB H x W x 3 uint8, pts in seconds or None); None once the source has no more frames.

        Raises `SourceError` on a read error, or when `deadline` (time.monotonic()) passes with packets arriving
        but no frame decoded (backends that can check between packets do).
        """
        ...

    def close(self) -> None: ...


def configure_opencv_ffmpeg() -> None:
    """Set OPENCV_FFMPEG_CAPTURE_OPTIONS to the low-delay options once, before the first OpenCV open.

    The variable is process-global and OpenCV reads it with getenv() on every open. Changing it while another
    thread opens a capture is a data race (setenv is not thread-safe in glibc), so it is written exactly once,
    under a lock, before any reader opens; call this at start-up if other code opens captures too. An operator's
    own value is kept, with the allowlist confinement (`policy.opencv_options`) appended: it is not optional. The
    options also reach file and HTTP opens, where FFmpeg ignores the RTSP-only ones.
    """
    global _env_checked
    with _env_lock:
        if _env_checked:
            return
        current = os.environ.get(CAPTURE_OPTIONS_ENV)
        confine = opencv_options()
        if current is None:
            os.environ[CAPTURE_OPTIONS_ENV] = f"{LOW_DELAY_OPTIONS}|{confine}"
        elif confine not in current:
            logger.info(
                "keeping the operator's %s=%r (recommended: %r)", CAPTURE_OPTIONS_ENV, current, LOW_DELAY_OPTIONS
            )
            os.environ[CAPTURE_OPTIONS_ENV] = f"{current}|{confine}"  # later keys win in FFmpeg's dictionary
        _env_checked = True


class OpenCVSource:
    """cv2.VideoCapture on FFmpeg. A blocked open or read is bounded by its timeout (FFmpeg interrupt callback)."""

    def __init__(self, target: str, label: str, open_timeout: float, read_timeout: float, network: bool) -> None:
        configure_opencv_ffmpeg()
        params = [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
            max(1, int(open_timeout * 1000)),
            cv2.CAP_PROP_READ_TIMEOUT_MSEC,
            max(1, int(read_timeout * 1000)),
        ]
        started = time.monotonic()
        try:
            self._cap = cv2.VideoCapture(target, cv2.CAP_FFMPEG, params)
        except cv2.error as err:
            raise SourceError(f"OpenCV/FFmpeg refused {label}: {err.msg}") from None
        if not self._cap.isOpened():
            self._cap.release()
            raise SourceError(
                f"OpenCV/FFmpeg could not open {label} after {time.monotonic() - started:.1f} s "
                f"(open timeout {open_timeout:g} s); check that the source is up and the URL is right"
            )
        if not network:
            # fflags=nobuffer (global, see above) makes FFmpeg discard the packets it read while probing the
            # stream: right for live video, but a file would lose its first frames. Rewinding re-reads them.
            self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
        self.fps = float(self._cap.get(cv2.CAP_PROP_FPS) or 0.0)
        if not 0.0 < self.fps < 1000.0:  # FFmpeg reports 90000 or 1000 when it only knows the time base
            self.fps = 0.0
        self._label = label

    def read(self, deadline: float) -> tuple[np.ndarray, float | None] | None:
        ok, bgr = self._cap.read()
        if not ok or bgr is None:
            return None  # EOF, a read timeout and a dropped connection look the same through OpenCV
        pos_ms = self._cap.get(cv2.CAP_PROP_POS_MSEC)
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), (pos_ms / 1000.0 if pos_ms >= 0 else None)

    def close(self) -> None:
        self._cap.release()


class PyAVSource:
    """PyAV demux + decode with per-open options, PTS from the container and a frame deadline between packets."""

    def __init__(self, target: str, label: str, open_timeout: float, read_timeout: float, network: bool) -> None:
        import av  # optional backend: imported on use so OpenCV-only deployments need not ship PyAV

        self._av = av
        options = ffmpeg_options(target)  # no redirect, playlist or other protocol: see streams/policy.py
        if network:
            options["fflags"] = "nobuffer"
            options["analyzeduration"] = NETWORK_PROBE_US
        if target.startswith(("rtsp://", "rtsps://")):
            options["rtsp_transport"] = "tcp"
        try:
            self._container = av.open(target, options=options, timeout=(open_timeout, read_timeout))
        except (av.FFmpegError, OSError) as err:
            raise SourceError(f"PyAV could not open {label}: {_reason(err)}") from None
        if not self._container.streams.video:
            self._container.close()
            raise SourceError(f"{label} has no video stream")
        stream = self._container.streams.video[0]
        # Slice threads, not frame threads: frame threading holds back one frame per thread (latency).
        stream.thread_type = "SLICE"
        stream.codec_context.flags |= int(av.codec.context.Flags.low_delay)
        rate = stream.average_rate or stream.guessed_rate
        self.fps = float(rate) if rate and 0 < float(rate) < 1000 else 0.0
        self._stream = stream
        self._packets = self._container.demux(stream)
        self._pending: list[tuple[np.ndarray, float | None]] = []
        self._label, self._read_timeout = label, read_timeout

    def read(self, deadline: float) -> tuple[np.ndarray, float | None] | None:
        av = self._av
        while not self._pending:
            if time.monotonic() > deadline:
                raise SourceError(f"{self._label}: packets arrive but no frame decoded before the watchdog deadline")
            try:
                packet = next(self._packets)
                frames = packet.decode()  # the final empty packet flushes the decoder
            except StopIteration:
                return None
            except av.error.EOFError:
                return None
            except av.error.ExitError:  # FFmpeg's interrupt callback fired: PyAV's read timeout
                raise SourceError(f"{self._label}: no data for {self._read_timeout:g} s (read timeout)") from None
            except (av.FFmpegError, OSError) as err:
                raise SourceError(f"{self._label}: read failed: {_reason(err)}") from None
            self._pending.extend((f.to_ndarray(format="rgb24"), f.time) for f in frames)
        return self._pending.pop(0)

    def close(self) -> None:
        self._container.close()


def open_source(
    target: str, *, label: str, backend: Backend, open_timeout: float, read_timeout: float, network: bool
) -> FrameSource:
    """Open `target` (a URL, or a local path for file sources) with `backend`; raises `SourceError`.

    Args:
        label: the redacted URL, used in errors and logs.
        network: False for local files (no low-delay demuxer options).
    """
    if backend == "opencv":
        return OpenCVSource(target, label, open_timeout, read_timeout, network)
    if backend == "pyav":
        return PyAVSource(target, label, open_timeout, read_timeout, network)
    raise ValueError(f"unknown stream backend {backend!r}; use 'opencv' or 'pyav'")
