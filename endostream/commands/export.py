"""`endostream export onnx|quantize|trt|triton`: a checkpoint into a bundle, and a bundle into what servers load."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    export = sub.add_parser("export", help="turn a checkpoint into a bundle (ONNX graph + manifest)")
    export_sub = export.add_subparsers(dest="export_command", required=True)
    _add_onnx(export_sub)
    _add_quantize(export_sub)
    _add_trt(export_sub)
    _add_triton(export_sub)


def _add_onnx(export_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    onnx = export_sub.add_parser("onnx", help="one ONNX graph for all tasks, uint8 frames in, results out")
    onnx.add_argument("checkpoint", type=Path, help="checkpoint directory (RUN/best or RUN/best-merged)")
    onnx.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    onnx.add_argument("--height", type=int, help="model input height (default: the training size)")
    onnx.add_argument("--width", type=int, help="model input width (default: the training size)")
    onnx.add_argument("--opset", type=int, default=18, help="ONNX opset (17 or newer; default 18)")
    onnx.add_argument("--logits", action="store_true", help="also output every task's logits")
    onnx.add_argument("--tasks", nargs="+", help="export only these tasks (default: all, in one fused graph)")
    onnx.add_argument("--overwrite", action="store_true", help="replace a bundle already in --out")
    onnx.add_argument(
        "--torch-program",
        action="store_true",
        help="also write model.pt2 (torch.export program) for the service's torch backend",
    )
    onnx.add_argument("--temporal-head", type=Path, help="temporal head to bundle (RUN/tcn of train-temporal)")
    onnx.add_argument(
        "--features",
        action=argparse.BooleanOptionalAction,
        help="<task>_features (default: with a head that reads them)",
    )
    onnx.set_defaults(func=run_onnx)


def _add_quantize(export_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    quantize = export_sub.add_parser("quantize", help="an INT8 bundle (static QDQ quantisation, calibrated)")
    quantize.add_argument("bundle", type=Path, help="fp32 bundle folder")
    quantize.add_argument(
        "--mode", choices=["static", "dynamic"], default="static", help="static QDQ, calibrated (default), or dynamic"
    )
    quantize.add_argument(
        "--target",
        choices=["cpu", "tensorrt"],
        default="cpu",
        help="static mode: cpu quantises MatMul (default); tensorrt also Conv and Gemm",
    )
    quantize.add_argument("--calib", type=Path, help="frames to calibrate on, e.g. DATA/train (static mode)")
    quantize.add_argument("--out", type=Path, help="INT8 bundle folder (default: BUNDLE-int8)")
    quantize.add_argument("--frames", type=int, default=64, help="calibration frames (default 64)")
    quantize.add_argument("--data", type=Path, help="labelled dataset: score fp32 vs INT8 on --split into the manifest")
    quantize.add_argument("--split", default="test")
    quantize.add_argument("--overwrite", action="store_true")
    quantize.set_defaults(func=run_quantize)


def _add_trt(export_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    trt = export_sub.add_parser("trt", help="a TensorRT engine for this GPU (needs TensorRT 10+ and a CUDA GPU)")
    trt.add_argument("bundle", type=Path, help="bundle folder (fp32, or the INT8 bundle for --int8)")
    precision = trt.add_mutually_exclusive_group()
    for name in ("fp32", "fp16", "bf16", "int8"):
        precision.add_argument(f"--{name}", dest="precision", action="store_const", const=name)
    trt.add_argument("--max-batch", type=int, default=8, help="largest batch of the optimisation profile")
    trt.add_argument("--opt-batch", type=int, help="batch the kernels are tuned for (default max/2)")
    trt.add_argument("--workspace", type=float, default=4.0, help="builder workspace in GB (default 4)")
    trt.add_argument("--force", action="store_true", help="rebuild even if a matching engine exists")
    trt.set_defaults(func=run_trt, precision="fp16")


def _add_triton(export_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    triton = export_sub.add_parser("triton", help="a Triton Inference Server model repository from a bundle")
    triton.add_argument("bundle", type=Path, help="bundle folder (from `endostream export onnx`)")
    triton.add_argument("--out", type=Path, required=True, help="model repository folder")
    triton.add_argument("--name", help="model name (default: <family>_<name> from the manifest)")
    triton.add_argument("--max-batch", type=int, default=8, help="Triton max_batch_size (default 8)")
    triton.add_argument("--max-queue-delay-us", type=int, default=2000, help="dynamic batching delay (default 2000)")
    triton.add_argument("--instances", type=int, default=1, help="model instances per device")
    triton.add_argument("--kind", choices=["gpu", "cpu"], default="gpu", help="instance kind (default gpu)")
    triton.add_argument("--overwrite", action="store_true", help="replace an existing model folder")
    triton.set_defaults(func=run_triton)


def run_onnx(args: argparse.Namespace) -> int:
    from export.onnx_export import export_onnx

    result = export_onnx(
        args.checkpoint,
        args.out,
        height=args.height,
        width=args.width,
        opset=args.opset,
        logits=args.logits,
        tasks=args.tasks,
        overwrite=args.overwrite,
        torch_program=args.torch_program,
        temporal_head=args.temporal_head,
        features=args.features,
    )
    parity = result.manifest.checks["parity"]
    print(
        f"{result.bundle}: {result.manifest.model_file} ({result.manifest.input.height}x{result.manifest.input.width}, "
        f"opset {result.manifest.opset}), parity max prob diff {parity['max_prob_diff']:.1e}, "
        f"mask agreement {parity['mask_agreement']:.4f}, {result.seconds:.1f} s"
    )
    if "torch_program" in result.manifest.checks:
        print(f"{result.bundle}: {result.manifest.checks['torch_program']['file']} (torch.export program)")
    return 0


def run_quantize(args: argparse.Namespace) -> int:
    from export.quantize import quantize_bundle

    manifest = quantize_bundle(
        args.bundle,
        args.calib,
        mode=args.mode,
        target=args.target,
        out=args.out,
        count=args.frames,
        data=args.data,
        split=args.split,
        overwrite=args.overwrite,
    )
    accuracy = manifest.checks.get("accuracy")
    if accuracy:
        delta = ", ".join(f"{k} {v:+.4f}" for k, v in accuracy["delta"].items())
        print(f"INT8 vs fp32 on {accuracy['split']} ({accuracy['images']} images): {delta}")
    print(f"INT8 bundle: {args.out or args.bundle.with_name(args.bundle.name + '-int8')}")
    return 0


def run_trt(args: argparse.Namespace) -> int:
    from export.tensorrt import EngineSettings, TensorRTUnavailable, build_engine

    settings = EngineSettings(args.precision, args.max_batch, args.opt_batch, args.workspace)
    try:
        path = build_engine(args.bundle, settings, force=args.force)
    except TensorRTUnavailable as err:
        print(f"endostream export trt: {err}", file=sys.stderr)
        return 2
    print(f"engine: {path}")
    return 0


def run_triton(args: argparse.Namespace) -> int:
    from export.triton import write_triton_repository

    folder = write_triton_repository(
        args.bundle,
        args.out,
        name=args.name,
        max_batch=args.max_batch,
        max_queue_delay_us=args.max_queue_delay_us,
        instances=args.instances,
        kind=args.kind,
        overwrite=args.overwrite,
    )
    print(f"Triton model written to {folder}; serve with: tritonserver --model-repository {args.out}")
    return 0
