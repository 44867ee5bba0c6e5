"""Frame decoders: encoded bytes -> the engine's input at the model size, on the CPU or on the engine's GPU.

`CpuDecoder` is the path every deployment has: Pillow/libjpeg-turbo (JPEG decoded straight at the smallest DCT
scale that still covers the model input), then OpenCV's area/bilinear resize, giving a numpy H x W x 3 uint8 array.

`TorchDecoder` decodes JPEG with `torchvision.io.decode_jpeg` on the engine's device (nvJPEG on CUDA) and resizes
there, so a frame reaches a GPU engine as a device tensor without a host round trip. PNG and BMP have no GPU decoder
and take the CPU path (the result's `latency_ms.decoder` says which path a frame took). The resize is written as two
small matrix products with OpenCV's own weights (exact pixel-area overlaps when shrinking, half-pixel bilinear when
enlarging), so it agrees with the CPU resize to within one grey level (`RESIZE_TOLERANCE`), on any device.

`stack_frames` builds an engine batch from either kind of frame. torch and torchvision are imported only when a
`TorchDecoder` is built or a batch holds tensors: the CPU service never imports them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from service import imaging

logger = logging.getLogger(__name__)

DecodeMode = Literal["auto", "cpu", "cuda"]
GPU_BACKENDS = ("torch", "tensorrt")  # engines whose `run` takes a tensor on their device
JPEG_END = b"\xff\xd9"  # EOI marker
RESIZE_TOLERANCE = 1  # grey levels between the matrix resize and OpenCV's (OpenCV rounds 11-bit fixed-point weights)


@dataclass(frozen=True)
class Decoded:
    """A frame ready for the engine.

    Attributes:
        model_input: H x W x 3 uint8 RGB at the model size: a numpy array, or a torch tensor on the engine's device.
        width, height: the frame's original size (class fractions and frame-size masks refer to it).
        format: "JPEG" | "PNG" | "BMP".
        device: where it was decoded and resized ("cpu" or e.g. "cuda:0").
        frame: the full decoded RGB frame on the host, kept only when asked for (overlays, viewers).
        decode_s, resize_s: seconds spent decoding and resizing (a GPU's work included: its stream is waited for).
    """

    model_input: Any
    width: int
    height: int
    format: str
    device: str
    frame: np.ndarray | None = None
    decode_s: float = 0.0
    resize_s: float = 0.0


class FrameDecoder(Protocol):
    device: str

    def decode(self, data: bytes, *, keep_frame: bool = False) -> Decoded:
        """Decode and resize one encoded frame; BadInput for anything that is not a usable image."""
        ...


class CpuDecoder:
    """Pillow decode (DCT-scaled for JPEG unless the full frame is kept) + OpenCV resize, on the calling thread."""

    device = "cpu"

    def __init__(self, height: int, width: int, *, max_pixels: int) -> None:
        self.height, self.width, self.max_pixels = height, width, max_pixels

    def decode(self, data: bytes, *, keep_frame: bool = False) -> Decoded:
        # An overlay is drawn on the full frame, so only a frame nobody will look at is decoded at a reduced scale.
        min_size = None if keep_frame else (self.height, self.width)
        t0 = time.perf_counter()
        frame = imaging.decode_image(data, max_pixels=self.max_pixels, min_size=min_size)
        t1 = time.perf_counter()
        resized = imaging.resize_for_model(frame.image, self.height, self.width)
        kept = frame.image if keep_frame else None
        return Decoded(resized, frame.width, frame.height, frame.format, "cpu", kept, t1 - t0, time.perf_counter() - t1)


class TorchDecoder:
    """JPEG through torchvision on `device` (nvJPEG on CUDA); other formats, and kept frames, through `fallback`.

    Each calling thread decodes on its own CUDA stream and waits for it before handing the tensor on, so the decode
    overlaps the engine's work on its stream and the reported decode time is the real one.
    """

    def __init__(
        self,
        device: str,
        height: int,
        width: int,
        *,
        max_pixels: int,
        fallback: CpuDecoder,
        decode_jpeg: Callable[[Any], Any] | None = None,
    ) -> None:
        """
        Args:
            device: torch device the frames are decoded on and handed to the engine on.
            height, width: the model input size.
            max_pixels: frames over this are refused from their header.
            fallback: the decoder for PNG/BMP and for frames whose full-size pixels are kept.
            decode_jpeg: encoded uint8 CPU tensor -> 3 x H x W uint8 RGB tensor on `device`; default torchvision's
                `decode_jpeg` (nvJPEG on CUDA).
        """
        import torch

        if decode_jpeg is None:
            try:
                from torchvision.io import ImageReadMode
                from torchvision.io import decode_jpeg as tv_decode_jpeg
            except ImportError as err:
                raise RuntimeError(
                    "GPU frame decoding needs torchvision (`pip install 'endostream[gpu]'`); set "
                    "ENDOSTREAM_DECODE=cpu to decode on the CPU"
                ) from err
            decode_jpeg = functools.partial(tv_decode_jpeg, mode=ImageReadMode.RGB, device=device)
        self._torch = torch
        self._decode_jpeg = decode_jpeg
        self.device = str(torch.device(device))
        self.height, self.width, self.max_pixels = height, width, max_pixels
        self.fallback = fallback
        self._local = threading.local()

    def decode(self, data: bytes, *, keep_frame: bool = False) -> Decoded:
        # A JPEG without its end-of-image marker is truncated: libjpeg refuses it (a 400 naming the frame) where
        # nvJPEG may return a half-grey image, so it takes the CPU path and gets the same answer as everywhere else.
        if keep_frame or not data.startswith(imaging.JPEG_MAGIC) or not data.rstrip(b"\0").endswith(JPEG_END):
            return self.fallback.decode(data, keep_frame=keep_frame)
        t0 = time.perf_counter()
        width, height = imaging.check_header(data, max_pixels=self.max_pixels)
        torch = self._torch
        stream = self._stream()
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            try:
                chw = self._decode_jpeg(encoded)
            except RuntimeError as err:  # nvJPEG's refusal of a corrupt stream: the frame's fault, a 400
                raise imaging.corrupt("JPEG", err) from None
            if stream is not None:
                stream.synchronize()  # the decode's own time, apart from the resize's
            t1 = time.perf_counter()
            resized = resize_chw(chw, self.height, self.width).permute(1, 2, 0).contiguous()
            if stream is not None:
                stream.synchronize()  # the engine (on its own stream) may use the tensor from now on
        return Decoded(resized, width, height, "JPEG", self.device, None, t1 - t0, time.perf_counter() - t1)

    def _stream(self) -> Any:
        if not self.device.startswith("cuda"):
            return None
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = self._torch.cuda.Stream(self._torch.device(self.device))
        return stream


def make_decoder(
    mode: DecodeMode, *, engine_backend: str, engine_device: str, height: int, width: int, max_pixels: int
) -> FrameDecoder:
    """The decoder for `mode` next to an engine ("auto": on the engine's GPU when it can take device tensors).

    Raises:
        RuntimeError: `mode="cuda"` but the engine does not run on CUDA, or torchvision is missing.
    """
    cpu = CpuDecoder(height, width, max_pixels=max_pixels)
    on_gpu = engine_device.startswith("cuda") and engine_backend in GPU_BACKENDS
    if mode == "cpu":
        return cpu
    if mode == "cuda" and not on_gpu:
        raise RuntimeError(
            f"ENDOSTREAM_DECODE=cuda needs an engine that takes CUDA tensors ({', '.join(GPU_BACKENDS)} on a GPU); "
            f"this one is {engine_backend} on {engine_device}: set ENDOSTREAM_DECODE=cpu or auto"
        )
    if mode not in ("auto", "cuda"):
        raise ValueError(f"decode mode {mode!r} is not one of 'auto', 'cpu', 'cuda'")
    if not on_gpu:
        return cpu
    try:
        decoder = TorchDecoder(engine_device, height, width, max_pixels=max_pixels, fallback=cpu)
    except RuntimeError as err:
        if mode == "cuda":
            raise
        logger.warning("frame decoding on the CPU: %s", err)
        return cpu
    logger.info("frame decoding: JPEG with nvJPEG on %s; PNG, BMP and stream frames on the CPU", decoder.device)
    return decoder


# ------------------------------------------------------------------------------------------------ resize, batch
@functools.lru_cache(maxsize=32)
def resize_weights(src: int, dst: int) -> np.ndarray:
    """dst x src float32 matrix of OpenCV's resize weights along one axis.

    Shrinking: each output pixel averages the input pixels its footprint [i*s, (i+1)*s) overlaps, weighted by the
    overlap (INTER_AREA). Enlarging: half-pixel-centre bilinear, clamped at the borders (INTER_LINEAR).
    """
    weights = np.zeros((dst, src), np.float64)
    scale = src / dst
    if src >= dst:
        for i in range(dst):
            lo, hi = i * scale, (i + 1) * scale
            for j in range(int(np.floor(lo)), min(int(np.ceil(hi)), src)):
                weights[i, j] = min(hi, j + 1) - max(lo, j)
        weights /= scale
    else:
        for i in range(dst):
            x = (i + 0.5) * scale - 0.5
            x0 = int(np.floor(x))
            frac = x - x0
            if x0 < 0:
                x0, frac = 0, 0.0
            if x0 >= src - 1:
                x0, frac = src - 1, 0.0
            weights[i, x0] += 1.0 - frac
            if frac > 0:
                weights[i, x0 + 1] += frac
    return weights.astype(np.float32)


def resize_chw(image: Any, height: int, width: int) -> Any:
    """Resize a 3 x H x W uint8 torch tensor like `imaging.resize_for_model` (within `RESIZE_TOLERANCE`)."""
    import torch

    _, h, w = image.shape
    if (h, w) == (height, width):
        return image
    rows = _device_weights(h, height, str(image.device))
    cols = _device_weights(w, width, str(image.device))
    # (height x h) @ (3 x h x w) @ (w x width): two GEMMs, fp32 accumulation, one rounding at the end
    out = rows @ image.float() @ cols.T
    return out.round_().clamp_(0, 255).to(torch.uint8)


@functools.lru_cache(maxsize=32)
def _device_weights(src: int, dst: int, device: str) -> Any:
    """`resize_weights` as a tensor on `device`, copied there once per frame size, not once per frame."""
    import torch

    return torch.from_numpy(resize_weights(src, dst)).to(device)


def stack_frames(frames: list[Any]) -> Any:
    """One B x H x W x 3 batch from model inputs: numpy when all are arrays, else a tensor on the tensors' device."""
    if all(isinstance(f, np.ndarray) for f in frames):
        return frames[0][None] if len(frames) == 1 else np.stack(frames)
    import torch

    device = next(f.device for f in frames if not isinstance(f, np.ndarray))
    tensors = [torch.from_numpy(f).to(device) if isinstance(f, np.ndarray) else f for f in frames]
    return tensors[0][None] if len(tensors) == 1 else torch.stack(tensors)
