"""`endostream bench engine|http|stream|overload|ws|train`: benchmarks that write a JSON report and print a table.

The measuring code lives with what it measures (export/bench.py, service/bench*.py, training/train_cost.py); this
module parses the flags, generates the JPEG frames the service benches send, and writes the report.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = sub.add_parser("bench", help="benchmarks that write JSON")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    _add_engine(bench_sub)
    _add_http(bench_sub)
    _add_stream(bench_sub)
    _add_overload(bench_sub)
    _add_ws(bench_sub)
    _add_train(bench_sub)


def _add_engine(bench_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    engine.set_defaults(func=run_engine)


def _add_http(bench_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    http.add_argument(
        "--temporal",
        action="store_true",
        help="each client is a temporal session stepped once per frame, beside a no_temporal variant "
        "(ENDOSTREAM_TEMPORAL=0): reports what the temporal step adds per frame (the bundle needs a temporal head)",
    )
    http.add_argument("--json", type=Path, required=True, help="where the results go")
    http.set_defaults(func=run_http)


def _add_stream(bench_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    stream = bench_sub.add_parser("stream", help="a live source through the service: fps, drops, frame age")
    stream.add_argument("--source", required=True, help="rtsp://..., http(s)://... (MJPEG) or file:... URL")
    stream.add_argument("--bundle", type=Path, default=None, help="bundle folder (default: the demo bundle)")
    stream.add_argument("--seconds", type=float, default=60.0)
    stream.add_argument("--mask", choices=["png", "rle", "none"], default="png")
    stream.add_argument("--threads", type=int, default=0)
    stream.add_argument("--json", type=Path, required=True, help="where the results go")
    stream.set_defaults(func=run_stream)


def _add_overload(bench_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    overload.set_defaults(func=run_overload)


def _add_ws(bench_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    ws.set_defaults(func=run_ws)


def _add_train(bench_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    training.set_defaults(func=run_train)


# ------------------------------------------------------------------------------------------------------- runners
def run_engine(args: argparse.Namespace) -> int:
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


def run_http(args: argparse.Namespace) -> int:
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
        temporal=args.temporal,
    )
    report["frame_size"] = args.size
    _write_report(args.json, report, format_http(report))
    return 0


def run_stream(args: argparse.Namespace) -> int:
    from service.bench import bench_stream, format_stream

    report = bench_stream(
        _bench_bundle(args.bundle), args.source, seconds=args.seconds, mask=args.mask, threads=args.threads
    )
    _write_report(args.json, report, format_stream(report))
    return 0


def run_overload(args: argparse.Namespace) -> int:
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


def run_ws(args: argparse.Namespace) -> int:
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


def run_train(args: argparse.Namespace) -> int:
    from training.jobs.train_cost import bench_train_cost

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


# ------------------------------------------------------------------------------------------------------- helpers
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


def _key_values(items: list[str], flag: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} {item!r} is not KEY=VALUE (e.g. ENDOSTREAM_ORT_SPIN_WAIT=1)")
        pairs[key.strip()] = value.strip()
    return pairs


def _write_report(path: Path, report: dict[str, Any], summary: str) -> None:
    """A bench command's JSON report to `path`, its table to stdout."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(summary)
    print(f"written to {path}")
