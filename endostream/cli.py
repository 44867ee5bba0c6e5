"""`endostream` command line: data, train, eval, ablate, demo, export, bench, gpu-check, serve.

Each subcommand imports its package lazily, so `endostream serve` will never import torch and `--help` is instant.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from endostream import commands_temporal

logger = logging.getLogger("endostream")

DEFAULT_WORKDIR = Path("endostream-work")


def _setup_logging(verbose: bool) -> None:
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


# ---------------------------------------------------------------------------------------------------------- data
def _add_data(sub: argparse._SubParsersAction) -> None:
    from training.data.writer import add_synth_arguments

    data = sub.add_parser("data", help="generate or inspect datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    synth = data_sub.add_parser("synth", help="render a synthetic endoscopy dataset (EndoARSS layout)")
    add_synth_arguments(synth)
    synth.set_defaults(func=_run_synth)


def _run_synth(args: argparse.Namespace) -> int:
    from training.data.writer import run_synth

    run_synth(args)
    return 0


# --------------------------------------------------------------------------------------------------------- train
def _add_train(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="train a model from a config")
    train.add_argument("--config", required=True, help="shipped config name (tiny, endoarss_vits14, ...) or a .yaml")
    train.add_argument("--data", type=Path, help="dataset folder (overrides data.root)")
    train.add_argument("--out", type=Path, help="run folder (default: runs/<config name>)")
    train.add_argument("--resume", action="store_true", help="continue from RUN/last if present")
    train.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    train.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=3")
    train.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from training.config import load_config
    from training.trainer import train

    overrides = list(args.overrides)
    if args.data is not None:
        overrides.append(f"data.root={args.data}")
    cfg = load_config(args.config, overrides)
    out = args.out or Path("runs") / cfg.name
    result = train(cfg, out, resume=args.resume, device=args.device, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        logger.info("%s", result.summary())
    return 0


# ---------------------------------------------------------------------------------------------------------- eval
def _add_eval(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="evaluate a checkpoint on a dataset split")
    ev.add_argument("checkpoint", type=Path, help="checkpoint directory (RUN/best or RUN/best-merged)")
    ev.add_argument("--data", type=Path, required=True, help="dataset folder")
    ev.add_argument("--split", default="test", help="split to evaluate (default: test)")
    ev.add_argument("--json", type=Path, help="write the result JSON here")
    ev.add_argument("--markdown", type=Path, help="write a markdown table here")
    ev.add_argument("--baseline", type=Path, help="result JSON to compute Δm against")
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--limit", type=int, help="score only this many evenly spaced frames of the split")
    ev.add_argument(
        "--corruptions",
        help="robustness: all, a family (noise, blur, weather, digital) or comma-separated ImageNet-C names; "
        "scores every corrupted version of the split instead of the plain evaluation",
    )
    ev.add_argument("--severities", default="1-5", help="robustness severities, e.g. 1-5 or 1,3,5 (default 1-5)")
    ev.add_argument("--seed", type=int, default=0, help="robustness: base seed of the corruptions (default 0)")
    ev.add_argument(
        "--out", type=Path, help="robustness: folder for robustness.{json,md,png} (default: RUN/robustness_SPLIT)"
    )
    ev.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    if args.corruptions is not None:
        from training.robustness import parse_corruptions, parse_severities, run_robustness

        run_robustness(
            args.checkpoint,
            args.data,
            args.out or args.checkpoint.parent / f"robustness_{args.split}",
            split=args.split,
            corruptions=parse_corruptions(args.corruptions),
            severities=parse_severities(args.severities),
            limit=args.limit,
            seed=args.seed,
            batch_size=args.batch_size,
        )
        return 0
    from training.evaluate import run_evaluation

    run_evaluation(
        args.checkpoint,
        args.data,
        split=args.split,
        json_out=args.json,
        markdown_out=args.markdown,
        baseline=args.baseline,
        batch_size=args.batch_size,
        limit=args.limit,
    )
    return 0


# ------------------------------------------------------------------------------------------------------ ablation
def _add_ablate(sub: argparse._SubParsersAction) -> None:
    ab = sub.add_parser(
        "ablate", help="Table V-style ablation: backbone only / +TESLA / +SMA / all, single-task rows, Δm, seeds"
    )
    ab.add_argument("--config", default="tiny", help="config shared by every row (default: tiny)")
    ab.add_argument("--data", type=Path, required=True, help="dataset folder")
    ab.add_argument("--out", type=Path, default=Path("runs/ablation"), help="one run folder per row goes here")
    ab.add_argument("--split", default="test", help="split the rows are scored on (default: test)")
    ab.add_argument("--seeds", type=int, default=1, help="runs per row (train.seed, +1, ...); mean ± std reported")
    ab.add_argument(
        "--rows",
        help="comma-separated rows to run, by folder name: backbone_only, tesla, sma, all_endoarss, "
        "single_task_<task> (default: all)",
    )
    ab.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    ab.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for every row, e.g. train.epochs=5")
    ab.set_defaults(func=_run_ablate)


def _run_ablate(args: argparse.Namespace) -> int:
    from training.ablation import run_ablation

    run_ablation(
        args.config,
        args.data,
        args.out,
        overrides=list(args.overrides),
        split=args.split,
        progress=not args.no_progress,
        seeds=args.seeds,
        rows=[r.strip() for r in args.rows.split(",") if r.strip()] if args.rows else None,
    )
    return 0


# ---------------------------------------------------------------------------------------------------------- demo
def _add_demo(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser(
        "demo", help="the main job on the embedded default: data -> tiny model -> evaluation -> bundle -> serve"
    )
    demo.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="where data, run, bundle and results go")
    demo.add_argument("--images", type=int, default=4000, help="generated images (train/val/test 70/15/15)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-serve", action="store_true", help="stop after building the bundle")
    demo.add_argument("--port", type=int, default=8000, help="port of the service (default 8000)")
    demo.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    """Each step is skipped when its output exists, so a second run goes straight to serving."""
    from training.demo import run_demo

    bundle = args.workdir / "bundle"
    if not (bundle / "manifest.json").is_file():
        from export.onnx_export import export_onnx

        run_demo(args.workdir, images=args.images, seed=args.seed)
        head = commands_temporal.demo_temporal(args.workdir)
        export_onnx(args.workdir / "runs" / "tiny" / "best-merged", bundle, overwrite=True, temporal_head=head)
    else:
        logger.info("demo bundle %s exists; delete it to rebuild", bundle)
    if args.no_serve:
        return 0
    from service.cli import run_serve
    from service.settings import Settings

    clips = (args.workdir / "data" / "videos").resolve()
    settings = Settings(bundle=bundle, port=args.port, stream_allowlist=[f"file:{clips}/"])
    logger.info("viewer: http://127.0.0.1:%d/  (stream source to try: file:%s/clip_000.mp4)", args.port, clips)
    return run_serve(settings)


# -------------------------------------------------------------------------------------------------------- export
def _add_export(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser("export", help="turn a checkpoint into a bundle (ONNX graph + manifest)")
    export_sub = export.add_subparsers(dest="export_command", required=True)
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
    onnx.add_argument("--features", action=argparse.BooleanOptionalAction, help="<task>_features (default: with head)")
    onnx.set_defaults(func=_run_export_onnx)
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
    quantize.set_defaults(func=_run_export_quantize)
    trt = export_sub.add_parser("trt", help="a TensorRT engine for this GPU (needs TensorRT 10+ and a CUDA GPU)")
    trt.add_argument("bundle", type=Path, help="bundle folder (fp32, or the INT8 bundle for --int8)")
    precision = trt.add_mutually_exclusive_group()
    for name in ("fp32", "fp16", "bf16", "int8"):
        precision.add_argument(f"--{name}", dest="precision", action="store_const", const=name)
    trt.add_argument("--max-batch", type=int, default=8, help="largest batch of the optimisation profile")
    trt.add_argument("--opt-batch", type=int, help="batch the kernels are tuned for (default max/2)")
    trt.add_argument("--workspace", type=float, default=4.0, help="builder workspace in GB (default 4)")
    trt.add_argument("--force", action="store_true", help="rebuild even if a matching engine exists")
    trt.set_defaults(func=_run_export_trt, precision="fp16")
    triton = export_sub.add_parser("triton", help="a Triton Inference Server model repository from a bundle")
    triton.add_argument("bundle", type=Path, help="bundle folder (from `endostream export onnx`)")
    triton.add_argument("--out", type=Path, required=True, help="model repository folder")
    triton.add_argument("--name", help="model name (default: <family>_<name> from the manifest)")
    triton.add_argument("--max-batch", type=int, default=8, help="Triton max_batch_size (default 8)")
    triton.add_argument("--max-queue-delay-us", type=int, default=2000, help="dynamic batching delay (default 2000)")
    triton.add_argument("--instances", type=int, default=1, help="model instances per device")
    triton.add_argument("--kind", choices=["gpu", "cpu"], default="gpu", help="instance kind (default gpu)")
    triton.add_argument("--overwrite", action="store_true", help="replace an existing model folder")
    triton.set_defaults(func=_run_export_triton)


def _run_export_onnx(args: argparse.Namespace) -> int:
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


# --------------------------------------------------------------------------------------------------------- bench
def _add_bench(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks that write JSON")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    engine = bench_sub.add_parser("engine", help="latency (batch 1) and throughput of a bundle per backend")
    engine.add_argument(
        "bundles",
        nargs="+",
        help="bundle folders (from `endostream export onnx`); A+B runs both on every call (one graph per task)",
    )
    engine.add_argument(
        "--backend", default="onnxruntime", help="onnxruntime | torch | torch-program (default onnxruntime)"
    )
    engine.add_argument("--precision", help="fp32 | fp16 | bf16 for torch (default fp32); onnxruntime: the bundle's")
    engine.add_argument(
        "--compare",
        nargs="+",
        metavar="BACKEND[:PRECISION][:FLAG]",
        help="several variants side by side, ratios against the first, e.g. torch onnxruntime, or "
        "torch-program torch-program:fp16:graphs torch-program:bf16:graphs torch-program:fp16:graphs:compile. "
        "torch = eager on the source checkpoint; torch-program = the bundle's model.pt2 in the service's engine, "
        "flags graphs (CUDA graphs, --device cuda), compile or max-autotune (torch.compile)",
    )
    engine.add_argument("--json", type=Path, required=True, help="where the results go")
    engine.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8], help="throughput batch sizes")
    engine.add_argument("--runs", type=int, default=100, help="timed calls at batch 1")
    engine.add_argument("--warmup", type=int, default=10)
    engine.add_argument("--threads", type=int, help="intra-op threads (default: all cores)")
    engine.add_argument("--device", default="cpu", help="cpu or cuda[:N] (torch backend)")
    engine.set_defaults(func=_run_bench_engine)
    http = bench_sub.add_parser(
        "http", help="the service over HTTP: e2e latency split, throughput with/without batching"
    )
    http.add_argument("--bundle", type=Path, default=None, help="bundle folder (default: the demo bundle)")
    http.add_argument("--concurrency", default="1,8", help="comma-separated client counts (default 1,8)")
    http.add_argument("--requests", type=int, default=300, help="requests per concurrency level (default 300)")
    http.add_argument("--size", default="1920x1080", help="generated JPEG frame size WxH (default 1920x1080)")
    http.add_argument("--quality", type=int, default=90, help="JPEG quality of the generated frames")
    http.add_argument("--mask", choices=["png", "rle", "raw", "none"], default="png")
    http.add_argument("--mask-size", choices=["model", "frame"], help="mask size to ask for (default: the server's)")
    http.add_argument("--max-batch", type=int, default=8, help="dynamic batch of the batching variant")
    http.add_argument("--threads", type=int, default=0, help="engine threads (0: backend default)")
    http.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="extra server environment (repeatable)"
    )
    http.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE[,KEY=VALUE]",
        help="one more batching variant with this environment, e.g. spin:ENDOSTREAM_ORT_SPIN_WAIT=1 (repeatable)",
    )
    http.add_argument(
        "--baseline",
        type=Path,
        metavar="CHECKOUT",
        help="also serve from this source tree (e.g. `git worktree add ../before HEAD~1`) and report ratios",
    )
    http.add_argument("--json", type=Path, required=True, help="where the results go")
    http.set_defaults(func=_run_bench_http)
    stream = bench_sub.add_parser("stream", help="a live source through the service: fps, drops, frame age")
    stream.add_argument("--source", required=True, help="rtsp://..., http(s)://... (MJPEG) or file:... URL")
    stream.add_argument("--bundle", type=Path, default=None, help="bundle folder (default: the demo bundle)")
    stream.add_argument("--seconds", type=float, default=60.0)
    stream.add_argument("--mask", choices=["png", "rle", "none"], default="png")
    stream.add_argument("--threads", type=int, default=0)
    stream.add_argument("--json", type=Path, required=True, help="where the results go")
    stream.set_defaults(func=_run_bench_stream)
    overload = bench_sub.add_parser(
        "overload", help="frames offered at a multiple of capacity: accepted latency, 503s, memory"
    )
    overload.add_argument("--bundle", type=Path, default=None, help="bundle folder (default: the demo bundle)")
    overload.add_argument("--factor", type=float, default=3.0, help="offered rate / measured capacity (default 3)")
    overload.add_argument("--seconds", type=float, default=60.0, help="how long the overload lasts (default 60)")
    overload.add_argument("--size", default="1920x1080", help="generated JPEG frame size WxH (default 1920x1080)")
    overload.add_argument("--quality", type=int, default=90, help="JPEG quality of the generated frames")
    overload.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="extra server environment (repeatable)"
    )
    overload.add_argument("--json", type=Path, required=True, help="where the results go")
    overload.set_defaults(func=_run_bench_overload)
    ws = bench_sub.add_parser(
        "ws", help="frames pushed over /ws/infer at a fixed fps: latency per frame, share within a frame period, drops"
    )
    ws.add_argument("--bundle", type=Path, default=None, help="bundle folder (default: the demo bundle)")
    ws.add_argument("--frames", type=int, default=3000, help="timed frames (default 3000)")
    ws.add_argument("--warmup", type=int, default=30, help="frames sent first and left out of the figures")
    ws.add_argument("--fps", type=float, default=30.0, help="send rate; the frame period is 1/fps (default 30)")
    ws.add_argument("--size", default="1920x1080", help="generated JPEG frame size WxH (default 1920x1080)")
    ws.add_argument("--quality", type=int, default=90, help="JPEG quality of the generated frames")
    ws.add_argument("--mask", choices=["png", "rle", "none"], default="png")
    ws.add_argument("--json", type=Path, required=True, help="where the results go")
    ws.set_defaults(func=_run_bench_ws)
    training = bench_sub.add_parser(
        "train", help="training cost of BDTA + MoTE vs a one-stream LoRA baseline on the same frozen backbone"
    )
    training.add_argument(
        "--config", "--bdta-config", dest="bdta_config", default="bdta_vits14", help="BDTA config (default bdta_vits14)"
    )
    training.add_argument(
        "--vs",
        "--lora-config",
        dest="lora_config",
        default="endoarss_vits14",
        help="LoRA baseline config (endoarss family; its shared LoRA is used, TESLA off, BDTA's heads and weighting)",
    )
    training.add_argument("--batch-size", type=int, default=8)
    training.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    training.add_argument("--warmup", type=int, default=1)
    training.add_argument("--device", default="cpu", help="cpu or cuda (peak memory: CUDA allocator / child RSS)")
    training.add_argument("--json", type=Path, required=True, help="where the results go")
    training.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for both configs")
    training.set_defaults(func=_run_bench_train)


def _bench_frames(size: str, quality: int, count: int = 8) -> list[bytes]:
    """Generated endoscopy frames as JPEG bytes at `size` (WxH)."""
    import cv2

    from training.data.synth import render_image

    try:
        width, height = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size {size!r} must look like 1920x1080") from None
    frames = []
    for i in range(count):
        rgb = render_image(11, i, height=height, width=width).image
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
        frames.append(buf.tobytes())
    return frames


def _bench_bundle(bundle: Path | None) -> Path:
    from service.settings import DEFAULT_BUNDLE

    bundle = bundle or DEFAULT_BUNDLE
    if not (bundle / "manifest.json").is_file():
        raise FileNotFoundError(f"{bundle} is not a bundle: pass --bundle or build the demo bundle with `make demo`")
    return bundle


def _write_report(path: Path, report: dict, summary: str) -> None:
    """A bench command's JSON report to `path`, its table to stdout."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(summary)
    print(f"written to {path}")


def _run_bench_http(args: argparse.Namespace) -> int:
    from service.bench import bench_http, format_http

    concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    report = bench_http(
        _bench_bundle(args.bundle),
        _bench_frames(args.size, args.quality),
        concurrency=concurrency,
        requests=args.requests,
        max_batch=args.max_batch,
        mask=args.mask,
        mask_size=args.mask_size,
        threads=args.threads,
        env=_key_values(args.env, "--env"),
        also={
            name: _key_values(pairs.split(","), "--also") for name, _, pairs in (a.partition(":") for a in args.also)
        },
        baseline=args.baseline,
    )
    report["frame_size"] = args.size
    _write_report(args.json, report, format_http(report))
    return 0


def _key_values(items: list[str], flag: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} {item!r} is not KEY=VALUE (e.g. ENDOSTREAM_ORT_SPIN_WAIT=1)")
        pairs[key.strip()] = value.strip()
    return pairs


def _run_bench_overload(args: argparse.Namespace) -> int:
    from service.bench_overload import bench_overload, format_overload

    report = bench_overload(
        _bench_bundle(args.bundle),
        _bench_frames(args.size, args.quality),
        factor=args.factor,
        seconds=args.seconds,
        env=_key_values(args.env, "--env"),
    )
    _write_report(args.json, report, format_overload(report))
    return 0


def _run_bench_ws(args: argparse.Namespace) -> int:
    from service.bench_ws import bench_ws, format_ws

    report = bench_ws(
        _bench_bundle(args.bundle),
        _bench_frames(args.size, args.quality),
        count=args.frames,
        fps=args.fps,
        warmup=args.warmup,
        mask=args.mask,
    )
    report["frame_size"] = args.size
    _write_report(args.json, report, format_ws(report))
    return 0


def _run_bench_stream(args: argparse.Namespace) -> int:
    from service.bench import bench_stream, format_stream

    report = bench_stream(
        _bench_bundle(args.bundle), args.source, seconds=args.seconds, mask=args.mask, threads=args.threads
    )
    _write_report(args.json, report, format_stream(report))
    return 0


def _run_bench_train(args: argparse.Namespace) -> int:
    from training.train_cost import bench_train_cost

    report = bench_train_cost(
        bdta_config=args.bdta_config,
        lora_config=args.lora_config,
        overrides=args.overrides,
        batch_size=args.batch_size,
        steps=args.steps,
        warmup=args.warmup,
        device=args.device,
    )
    rows = [
        f"{name:<24} bdta {report['bdta'][name]!s:>14}  lora {report['lora'][name]!s:>14}  ratio {ratio:.3f}"
        for name, ratio in report["ratio"].items()
    ]
    _write_report(args.json, report, "\n".join(rows))
    return 0


def _run_bench_engine(args: argparse.Namespace) -> int:
    from export.bench import bench_engine, format_table

    variants = args.compare or [f"{args.backend}:{args.precision}" if args.precision else args.backend]
    report = bench_engine(
        args.bundles,
        variants,
        batches=args.batches,
        warmup=args.warmup,
        runs=args.runs,
        threads=args.threads,
        device=args.device,
    )
    _write_report(args.json, report, format_table(report))
    return 0


def _run_export_quantize(args: argparse.Namespace) -> int:
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


def _run_export_trt(args: argparse.Namespace) -> int:
    from export.tensorrt import EngineSettings, TensorRTUnavailable, build_engine

    settings = EngineSettings(args.precision, args.max_batch, args.opt_batch, args.workspace)
    try:
        path = build_engine(args.bundle, settings, force=args.force)
    except TensorRTUnavailable as err:
        print(f"endostream export trt: {err}", file=sys.stderr)
        return 2
    print(f"engine: {path}")
    return 0


def _run_export_triton(args: argparse.Namespace) -> int:
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


# ----------------------------------------------------------------------------------------------------- gpu-check
def _add_gpu_check(sub: argparse._SubParsersAction) -> None:
    from endostream.gpu_check import add_arguments

    check = sub.add_parser(
        "gpu-check",
        help="the GPU path in one run: bundles, pytest -m gpu, bench engine/http/ws, summary.md (--cpu: small, no GPU)",
    )
    add_arguments(check)
    check.set_defaults(func=_run_gpu_check)


def _run_gpu_check(args: argparse.Namespace) -> int:
    from endostream.gpu_check import run_from_args

    return run_from_args(args)


# --------------------------------------------------------------------------------------------------------- serve
def _add_serve(sub: argparse._SubParsersAction) -> None:
    from service.cli import add_serve_arguments

    serve = sub.add_parser("serve", help="the inference service: HTTP, WebSocket and RTSP frames in, results out")
    add_serve_arguments(serve)
    serve.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from service.cli import run_serve, settings_from_args

    return run_serve(settings_from_args(args))


def _version() -> str:
    from endostream import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="endostream", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"endostream {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_data(sub)
    _add_train(sub)
    _add_eval(sub)
    _add_ablate(sub)
    _add_demo(sub)
    _add_export(sub)
    _add_bench(sub)
    _add_gpu_check(sub)
    _add_serve(sub)
    commands_temporal.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError) as err:
        # User errors: one clear line, no traceback (run with -v for the traceback).
        if args.verbose:
            raise
        print(f"endostream {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
