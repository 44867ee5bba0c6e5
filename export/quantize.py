"""`endostream export quantize`: an INT8 bundle, with its accuracy cost measured.

Two modes, both ONNX Runtime's quantisers:
- `static` (default): QDQ format, calibrated on real frames from a dataset folder. Q/DQ pairs go on the *inputs* of
  the quantised ops only and their outputs stay float: TensorRT's recommended placement, and the pattern ONNX
  Runtime's CPU provider fuses into MatMulIntegerToFloat (an int8 GEMM with a float result, no requantisation).
  Weights are int8 per output channel (per tensor for the stacked per-task weights, the only form ORT's fused kernel
  accepts for a 3-D weight), activations uint8 per tensor from MinMax ranges. `--target cpu` quantises MatMul only:
  with the heads' convolutions quantised too, the demo graph ran at 0.91x fp32 instead of 1.07x (2 threads).
  `--target tensorrt` adds Conv and Gemm.
- `dynamic`: MatMul weights int8, activations quantised per call from their own range (no calibration).
The uint8 input, the normalisation, softmax and argmax stay as they are. When a labelled split is given, the fp32
and INT8 graphs are scored on it and the differences go into the manifest.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnx
from tqdm import tqdm

from export.accuracy import evaluate_graph
from export.checks import check_graph
from export.manifest import Manifest, read_manifest, sha256_file, write_manifest

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
MODES = ("static", "dynamic")
TARGET_OPS = {"cpu": ["MatMul"], "tensorrt": ["MatMul", "Conv", "Gemm"]}  # ops that get Q/DQ on their inputs
MASK_FOLDERS = {"mask", "labels"}  # EndoARSS and EndoVis-18 label folders: not frames


def calibration_frames(folder: Path, height: int, width: int, count: int = 64, seed: int = 0) -> np.ndarray:
    """`count` frames (N H W 3 uint8 RGB) drawn evenly at random from every image under `folder`, resized.

    Masks are skipped: files under a `mask` or `labels` folder are not frames.
    """
    files = sorted(
        p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.parent.name not in MASK_FOLDERS
    )
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder} for calibration")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(files), size=min(count, len(files)), replace=False)
    frames = []
    for index in sorted(chosen):
        bgr = cv2.imread(str(files[index]), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"{files[index]} is not a readable image")
        frames.append(cv2.resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), (width, height), interpolation=cv2.INTER_AREA))
    return np.stack(frames)


class _FrameReader:
    """ONNX Runtime CalibrationDataReader over in-memory frames, one per call, with a progress bar."""

    def __init__(self, name: str, frames: np.ndarray, progress: bool) -> None:
        self.name, self.frames, self.index = name, frames, 0
        self.bar = tqdm(total=len(frames), desc="calibrating", unit="frame", disable=not progress)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.index >= len(self.frames):
            self.bar.close()
            return None
        self.index += 1
        self.bar.update()
        return {self.name: self.frames[self.index - 1 : self.index]}


def quantize_bundle(
    bundle: Path,
    calib: Path | None,
    *,
    mode: str = "static",
    target: str = "cpu",
    out: Path | None = None,
    count: int = 64,
    data: Path | None = None,
    split: str = "test",
    overwrite: bool = False,
    progress: bool = True,
) -> Manifest:
    """Write an INT8 copy of the fp32 `bundle` to `out` (default `<bundle>-int8`); returns its manifest.

    Args:
        calib: folder of frames (any image files below it; masks are skipped) to calibrate activation ranges;
            required for `static`, unused by `dynamic`.
        mode: "static" (QDQ, calibrated) or "dynamic" (MatMul weights int8, activation ranges per call).
        target: static mode's op set: "cpu" (MatMul) or "tensorrt" (MatMul, Conv, Gemm).
        count: calibration frames drawn from `calib`.
        data: labelled dataset (EndoARSS layout) to score fp32 vs INT8 on `split`; None skips the scoring.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if mode not in MODES:
        raise ValueError(f"quantisation mode {mode!r} is not one of {MODES}")
    if target not in TARGET_OPS:
        raise ValueError(f"quantisation target {target!r} is not one of {tuple(TARGET_OPS)}")
    if mode == "static" and calib is None:
        raise ValueError("static quantisation calibrates on frames: pass --calib DIR (e.g. DATA/train)")
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    if manifest.precision != "fp32":
        raise ValueError(f"{bundle} holds an {manifest.precision} graph; quantise the fp32 bundle it came from")
    out = Path(out) if out is not None else bundle.with_name(bundle.name + "-int8")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out} is not empty; pass --overwrite or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    model_out = out / manifest.model_file
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # ORT's symbolic shape inference does not read the exporter's attribute-valued Constant nodes; ONNX shape
        # inference (kept) covers the static shapes the quantiser needs.
        quant_pre_process(str(bundle / manifest.model_file), str(prepared), skip_symbolic_shape=True)
        if mode == "static":
            details = _quantize_static(prepared, model_out, calib, manifest, count, target, progress)
        else:
            details = _quantize_dynamic(prepared, model_out)
    check_graph(model_out)
    checks: dict[str, Any] = {
        **manifest.checks,
        "quantization": {"mode": mode, **details, "fp32_model_sha256": manifest.model_sha256},
    }
    if data is not None:
        fp32 = evaluate_graph(bundle / manifest.model_file, manifest, data, split=split, progress=progress)
        int8 = evaluate_graph(model_out, manifest, data, split=split, progress=progress)
        checks["accuracy"] = {
            "split": split,
            "images": fp32["images"],
            "fp32": fp32,
            "int8": int8,
            "delta": {k: int8[k] - fp32[k] for k in ("activity_accuracy", "miou") if k in fp32},
        }
        logger.info("INT8 vs fp32 on %s/%s: %s", data, split, checks["accuracy"]["delta"])
    if manifest.temporal is not None:  # the temporal head stays fp32 (a few kB); it travels with the graph
        shutil.copy2(bundle / manifest.temporal["graph"], out / manifest.temporal["graph"])
    quantized = replace(manifest, precision="int8", model_sha256=sha256_file(model_out), checks=checks)
    write_manifest(out, quantized)
    return quantized


def _quantize_static(
    prepared: Path, model_out: Path, calib: Path, manifest: Manifest, count: int, target: str, progress: bool
) -> dict[str, Any]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    ops = TARGET_OPS[target]
    frames = calibration_frames(calib, manifest.input.height, manifest.input.width, count)
    stacked = stacked_matmul_weights(onnx.load(str(prepared)))
    logger.info("calibrating on %d frames from %s (%s: Q/DQ on the inputs of %s)", len(frames), calib, target, ops)
    quantize_static(
        str(prepared),
        str(model_out),
        _FrameReader(manifest.input.name, frames, progress),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=ops,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={
            "OpTypesToExcludeOutputQuantization": ops,
            "TensorQuantOverrides": {name: [{"symmetric": True}] for name in stacked},  # per tensor
        },
    )
    return {
        "format": "QDQ",
        "target": target,
        "ops": ops,
        "placement": "inputs",
        "weights": "int8 per channel (stacked per-task weights per tensor)",
        "activations": "uint8 per tensor, MinMax",
        "calibration_frames": len(frames),
        "calibration_source": str(calib),
    }


def stacked_matmul_weights(model: onnx.ModelProto) -> list[str]:
    """Initializers of rank 3+ that feed a MatMul: the per-task weights stacked along a leading task axis.

    ORT's per-channel default axis for MatMul weights is 1, the reduction axis of a 3-D weight, and its fused int8
    kernel takes a 3-D weight's scales only as (tasks, 1, columns), which a DequantizeLinear axis cannot express.
    """
    ranks = {init.name: len(init.dims) for init in model.graph.initializer}
    matmul_inputs = {name for node in model.graph.node if node.op_type == "MatMul" for name in node.input}
    return sorted(name for name in matmul_inputs if ranks.get(name, 0) >= 3)


def _quantize_dynamic(prepared: Path, model_out: Path) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(prepared), str(model_out), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8)
    return {"format": "integer MatMul", "ops": ["MatMul"], "weights": "int8 per tensor", "activations": "dynamic"}
