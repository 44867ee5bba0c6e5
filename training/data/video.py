"""MP4 helpers on PyAV: H.264 (libx264, yuv420p) writing with a fixed GOP, and frame reading.

Clips are written so RTSP servers (e.g. MediaMTX, GStreamer rtsp-server) can re-stream them without
re-encoding: yuv420p, closed fixed-length GOPs (`keyint_min = g`, scene-cut detection off, so a client can join at
every GOP boundary), no B-frames (lower latency and monotonic timestamps), time base 1/fps.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VideoInfo:
    frames: int
    fps: float
    width: int
    height: int
    codec: str
    pix_fmt: str


def write_mp4(
    path: Path | str,
    frames: Iterable[np.ndarray],
    *,
    fps: int = 30,
    gop: int = 30,
    crf: int = 20,
    preset: str = "veryfast",
) -> int:
    """Encode RGB uint8 frames (H W 3, even H and W, all the same size) into an H.264 MP4; returns the frame count.

    Args:
        path: output file (.mp4); parent folders are created.
        frames: iterable of RGB frames, consumed lazily (a generator renders while encoding).
        fps: frame rate; frame i gets pts i in time base 1/fps.
        gop: keyframe interval in frames (fixed; scene-cut keyframes are disabled).
        crf: x264 constant rate factor (lower is better quality).
        preset: x264 speed preset.
    """
    if fps <= 0 or gop <= 0:
        raise ValueError(f"fps and gop must be positive; got fps={fps}, gop={gop}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with av.open(str(path), mode="w") as container:
        stream = None
        for frame in frames:
            if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
                raise ValueError(f"frames must be H x W x 3 uint8 RGB; got {frame.dtype} {frame.shape}")
            height, width = frame.shape[:2]
            if stream is None:
                if height % 2 or width % 2:
                    raise ValueError(f"yuv420p needs even frame sizes; got {width}x{height}")
                stream = container.add_stream(
                    "libx264",
                    rate=fps,
                    options={
                        "crf": str(crf),
                        "preset": preset,
                        "g": str(gop),
                        "keyint_min": str(gop),
                        "sc_threshold": "0",
                        "bf": "0",
                    },
                )
                stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
                stream.time_base = Fraction(1, fps)
                stream.codec_context.gop_size = gop
            elif (height, width) != (stream.height, stream.width):
                raise ValueError(f"frame {count} is {width}x{height}; the clip is {stream.width}x{stream.height}")
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            video_frame.pts = count
            for packet in stream.encode(video_frame):
                container.mux(packet)
            count += 1
        if stream is None:
            raise ValueError(f"no frames to write to {path}")
        for packet in stream.encode():
            container.mux(packet)
    return count


def read_mp4(path: Path | str) -> Iterator[np.ndarray]:
    """Decode a video file into RGB uint8 frames (H W 3)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video {path} not found")
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            yield frame.to_ndarray(format="rgb24")


def probe_mp4(path: Path | str) -> VideoInfo:
    """Frame count (by decoding, so it is exact), rate, size, codec and pixel format of a video file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video {path} not found")
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        codec, pix_fmt = stream.codec_context.name, str(stream.codec_context.pix_fmt)
        width, height = stream.codec_context.width, stream.codec_context.height
        fps = float(stream.average_rate) if stream.average_rate else 0.0
        frames = sum(1 for _ in container.decode(video=0))
    return VideoInfo(frames, fps, width, height, codec, pix_fmt)
