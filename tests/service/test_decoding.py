"""The frame decoder seam: the CPU decoder, the torch decoder's routing and resize (run on the CPU here with an
injected JPEG decoder), batches of mixed frames, the `auto|cpu|cuda` choice, and nvJPEG itself on a GPU."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from service import imaging
from service.decoding import (
    RESIZE_TOLERANCE,
    CpuDecoder,
    TorchDecoder,
    make_decoder,
    resize_chw,
    stack_frames,
)
from service.errors import BadInput
from tests.service.conftest import encode

MODEL = 64


def _pil_decode_jpeg(encoded: torch.Tensor) -> torch.Tensor:
    """Stand-in for torchvision's decode_jpeg on the CPU: full-size libjpeg decode, 3 x H x W uint8."""
    rgb = np.asarray(Image.open(io.BytesIO(encoded.numpy().tobytes())).convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


def _torch_decoder(calls: list[int] | None = None, max_pixels: int = 4096 * 4096) -> TorchDecoder:
    def decode(encoded: torch.Tensor) -> torch.Tensor:
        if calls is not None:
            calls.append(1)
        return _pil_decode_jpeg(encoded)

    fallback = CpuDecoder(MODEL, MODEL, max_pixels=max_pixels)
    return TorchDecoder("cpu", MODEL, MODEL, max_pixels=max_pixels, fallback=fallback, decode_jpeg=decode)


@pytest.mark.parametrize("size", [(1080, 1920), (480, 640), (135, 240), (40, 50), (MODEL, MODEL)])
def test_matrix_resize_agrees_with_opencv(size: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(size))
    smooth = cv2.GaussianBlur(rng.integers(0, 256, (*size, 3), dtype=np.uint8), (0, 0), 3)
    for image in (rng.integers(0, 256, (*size, 3), dtype=np.uint8), smooth):  # noise is the worst case
        expected = imaging.resize_for_model(image, MODEL, MODEL)
        got = resize_chw(torch.from_numpy(image).permute(2, 0, 1), MODEL, MODEL).permute(1, 2, 0).numpy()
        assert got.dtype == np.uint8 and got.shape == expected.shape
        assert np.abs(got.astype(int) - expected).max() <= RESIZE_TOLERANCE


def test_torch_decoder_gives_the_model_input_as_a_tensor(frames) -> None:
    data = encode(frames[3], ".jpg")  # 1080p
    decoded = _torch_decoder().decode(data)
    assert isinstance(decoded.model_input, torch.Tensor)
    assert tuple(decoded.model_input.shape) == (MODEL, MODEL, 3) and decoded.model_input.dtype == torch.uint8
    assert (decoded.width, decoded.height, decoded.format, decoded.device) == (1920, 1080, "JPEG", "cpu")
    assert decoded.decode_s > 0 and decoded.resize_s > 0
    # the same pixels through the CPU path at full scale (the CPU decoder's DCT shortcut aside)
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    expected = imaging.resize_for_model(full, MODEL, MODEL)
    assert np.abs(decoded.model_input.numpy().astype(int) - expected).max() <= RESIZE_TOLERANCE


def test_torch_decoder_sends_png_bmp_and_kept_frames_to_the_cpu(frames) -> None:
    calls: list[int] = []
    decoder = _torch_decoder(calls)
    for ext in (".png", ".bmp"):
        decoded = decoder.decode(encode(frames[0], ext))
        assert isinstance(decoded.model_input, np.ndarray) and decoded.device == "cpu"
    kept = decoder.decode(encode(frames[0], ".jpg"), keep_frame=True)
    assert kept.frame is not None and kept.frame.shape == frames[0].shape
    truncated = encode(frames[0], ".jpg")[:-2000]  # no end-of-image marker: libjpeg's answer, not nvJPEG's guess
    with pytest.raises(BadInput) as err:
        decoder.decode(truncated)
    assert err.value.code == "corrupt_image"
    assert calls == []


def test_torch_decoder_refuses_bad_frames_before_decoding(frames) -> None:
    calls: list[int] = []
    decoder = _torch_decoder(calls, max_pixels=640 * 480)
    with pytest.raises(BadInput) as err:
        decoder.decode(encode(frames[3], ".jpg"))
    assert err.value.code == "too_many_pixels" and calls == []

    def refuse(encoded: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("nvjpeg: corrupt stream")

    strict = TorchDecoder(
        "cpu", MODEL, MODEL, max_pixels=4096 * 4096, fallback=CpuDecoder(MODEL, MODEL, max_pixels=1), decode_jpeg=refuse
    )
    with pytest.raises(BadInput) as err:
        strict.decode(encode(frames[0], ".jpg"))
    assert err.value.code == "corrupt_image" and "corrupt stream" in err.value.message


def test_cpu_decoder_matches_the_imaging_helpers(frames) -> None:
    data = encode(frames[1], ".png")
    decoded = CpuDecoder(MODEL, MODEL, max_pixels=4096 * 4096).decode(data)
    np.testing.assert_array_equal(decoded.model_input, imaging.resize_for_model(frames[1], MODEL, MODEL))
    assert decoded.frame is None and decoded.device == "cpu"


def test_batches_of_arrays_stay_numpy_and_mixed_batches_become_tensors() -> None:
    arrays = [np.full((MODEL, MODEL, 3), i, np.uint8) for i in range(3)]
    batch = stack_frames(arrays)
    assert isinstance(batch, np.ndarray) and batch.shape == (3, MODEL, MODEL, 3)
    assert stack_frames(arrays[:1]).shape == (1, MODEL, MODEL, 3)
    mixed = stack_frames([torch.from_numpy(arrays[0]), arrays[1], arrays[2]])
    assert isinstance(mixed, torch.Tensor) and tuple(mixed.shape) == (3, MODEL, MODEL, 3)
    assert [int(mixed[i, 0, 0, 0]) for i in range(3)] == [0, 1, 2]


def test_decode_mode_choice() -> None:
    kwargs = {"height": MODEL, "width": MODEL, "max_pixels": 1 << 20}
    assert isinstance(make_decoder("auto", engine_backend="onnxruntime", engine_device="cpu", **kwargs), CpuDecoder)
    assert isinstance(make_decoder("cpu", engine_backend="torch", engine_device="cuda:0", **kwargs), CpuDecoder)
    assert isinstance(make_decoder("auto", engine_backend="onnxruntime", engine_device="cuda:0", **kwargs), CpuDecoder)
    with pytest.raises(RuntimeError, match="ENDOSTREAM_DECODE=cpu or auto"):
        make_decoder("cuda", engine_backend="onnxruntime", engine_device="cpu", **kwargs)


# --------------------------------------------------------------------------------------------------------- GPU
NVJPEG_MEAN_TOLERANCE = 1.0  # grey levels: nvJPEG's IDCT and colour conversion round differently from libjpeg-turbo


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nvjpeg_decode_and_gpu_resize_agree_with_the_cpu(frames) -> None:
    fallback = CpuDecoder(MODEL, MODEL, max_pixels=4096 * 4096)
    decoder = TorchDecoder("cuda", MODEL, MODEL, max_pixels=4096 * 4096, fallback=fallback)
    for frame in (frames[0], frames[3]):
        data = encode(frame, ".jpg")
        decoded = decoder.decode(data)
        assert decoded.model_input.is_cuda and decoded.device.startswith("cuda")
        full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        expected = imaging.resize_for_model(full, MODEL, MODEL).astype(int)
        got = decoded.model_input.cpu().numpy().astype(int)
        assert np.abs(got - expected).mean() <= NVJPEG_MEAN_TOLERANCE
        # the resize alone, on the GPU, from the same decoded pixels: within the stated tolerance of OpenCV
        chw = torch.from_numpy(full.copy()).permute(2, 0, 1).cuda()
        gpu = resize_chw(chw, MODEL, MODEL).permute(1, 2, 0).cpu().numpy().astype(int)
        assert np.abs(gpu - expected).max() <= RESIZE_TOLERANCE
    with pytest.raises(BadInput):
        decoder.decode(encode(frames[0], ".jpg")[:300])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_decodes_on_the_gpu_next_to_a_cuda_engine() -> None:
    decoder = make_decoder("auto", engine_backend="torch", engine_device="cuda:0", height=MODEL, width=MODEL,
                           max_pixels=1 << 22)  # fmt: skip
    assert isinstance(decoder, TorchDecoder) and decoder.device == "cuda:0"
