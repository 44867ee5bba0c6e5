"""The steps of `endostream gpu-check`, one function each; every step runs in its own child process.

A step reads the plan (sizes for the GPU run or the small CPU run), builds or measures one thing and writes its JSON
into the output folder (bundles go to the work folder). Steps find each other's results only through those folders,
so a failed step leaves the others runnable. See `endostream.gpu_check` for the order, budgets and the summary.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import platform
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TINY_BUNDLE = "bundle-tiny"
VITS_BUNDLE = "bundle-vits14"


@dataclass(frozen=True)
class Plan:
    """What one run measures, and at which sizes."""

    mode: str  # "gpu" | "cpu"
    device: str  # engine device of the benches
    vits_size: int  # ViT-S/14 input size (a multiple of 14)
    synth_images: int  # generated frames the tiny model trains on (one epoch = a few steps)
    engine_variants: tuple[str, ...]
    compiled_variants: tuple[str, ...]  # empty: the compiled bench is skipped
    engine_batches: tuple[int, ...]
    compiled_batches: tuple[int, ...]  # each batch size the compiled variant sees can cost a compile
    engine_runs: int
    engine_warmup: int
    engine_threads: int | None  # intra-op CPU threads of the benches' engines (None: the runtime's default)
    step_threads: int | None  # OMP_NUM_THREADS of every step process (None: unset)
    service_precision: str
    service_env: tuple[tuple[str, str], ...]  # more ENDOSTREAM_* settings for every server the run starts
    http_max_batch: int
    decode_modes: tuple[str, ...]  # ENDOSTREAM_DECODE values for bench http
    http_concurrency: tuple[int, ...]
    http_requests: int
    http_warmup: int
    ws_frames: int
    ws_warmup: int
    frame_size: tuple[int, int] = (1920, 1080)  # width, height of the generated JPEG frames
    jpeg_quality: int = 90
    fps: float = 30.0


GPU_PLAN = Plan(
    mode="gpu",
    device="cuda",
    vits_size=448,
    synth_images=96,
    engine_variants=(
        "torch-program",  # fp32 eager: the baseline every ratio is taken against
        "torch-program:fp32:graphs",
        "torch-program:fp16:graphs",
        "torch-program:bf16:graphs",
    ),
    compiled_variants=("torch-program", "torch-program:fp16:graphs", "torch-program:fp16:graphs:compile"),
    engine_batches=(1, 8),
    compiled_batches=(1,),
    engine_runs=100,
    engine_warmup=5,
    engine_threads=None,
    step_threads=None,
    service_precision="fp16",
    service_env=(),
    http_max_batch=8,
    decode_modes=("cuda", "cpu"),
    http_concurrency=(1, 8),
    http_requests=200,
    http_warmup=20,
    ws_frames=3000,
    ws_warmup=30,
)

# The CPU run exercises every step that can run without a GPU, at sizes that take about two minutes on 2 cores.
CPU_PLAN = Plan(
    mode="cpu",
    device="cpu",
    vits_size=56,
    synth_images=24,
    engine_variants=("torch-program", "torch-program:bf16"),
    compiled_variants=(),  # Inductor's C++ compile takes minutes on 2 cores: tests/service covers it (slow)
    engine_batches=(1, 2),
    compiled_batches=(1,),
    engine_runs=6,
    engine_warmup=1,
    # one thread: two OpenMP threads on 2 busy cores wait on each other at every barrier (a CI box runs other jobs)
    engine_threads=1,
    step_threads=1,  # the bundle builds and the tests run side by side: one thread each
    service_precision="fp32",
    # one warm-up call per batch size and batches of at most 2: the servers are ready in seconds on 2 cores
    service_env=(("ENDOSTREAM_WARMUP_RUNS", "1"), ("ENDOSTREAM_MAX_BATCH", "2"), ("ENDOSTREAM_THREADS", "1")),
    http_max_batch=2,
    decode_modes=("cpu",),
    http_concurrency=(1, 2),
    http_requests=8,
    http_warmup=2,
    ws_frames=300,
    ws_warmup=10,
)


@dataclass(frozen=True)
class StepContext:
    plan: Plan
    out: Path  # what comes back: JSON, log, summary
    work: Path  # bundles, data, server logs


def _write(path: Path, report: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    logger.info("written %s", path)


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def step_env(ctx: StepContext) -> None:
    """What this machine runs: GPU, driver-side CUDA, package versions (env.json)."""
    import torch

    info: dict[str, Any] = {
        "mode": ctx.plan.mode,
        "plan": asdict(ctx.plan),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "packages": {
            name: _version(name)
            for name in (
                "torchvision",
                "triton",
                "onnx",
                "onnxruntime",
                "onnxscript",
                "opencv-python-headless",
                "numpy",
                "fastapi",
                "starlette",
                "uvicorn",
                "pydantic",
                "pydantic-settings",
                "websockets",
                "httpx",
            )
        },
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "count": torch.cuda.device_count(),
        }
    elif ctx.plan.mode == "gpu":
        raise RuntimeError("torch sees no CUDA GPU: run the CPU mode (--cpu) on machines without one")
    _write(ctx.out / "env.json", info)


def step_bundle_tiny(ctx: StepContext) -> None:
    """The demo `tiny` config trained for one short epoch on generated frames, exported with model.pt2."""
    from export.onnx_export import export_onnx
    from training.config import load_config
    from training.data.writer import synthesize_dataset
    from training.engine.run import train

    data = ctx.work / "data"
    synthesize_dataset(data, images=ctx.plan.synth_images, seed=0, height=96, width=96, progress=False, overwrite=True)
    overrides = [f"data.root={data}", "train.epochs=1", "train.batch_size=16", "optim.warmup_epochs=0"]
    result = train(load_config("tiny", overrides), ctx.work / "run-tiny", progress=False)
    logger.info("%s", result.summary())
    export_onnx(result.checkpoint, ctx.work / TINY_BUNDLE, overwrite=True, torch_program=True)


def step_bundle_vits(ctx: StepContext) -> None:
    """EndoARSS ViT-S/14 (SMA + shared LoRA + TESLA, activity + segmentation) with random-init weights, exported at
    the plan's size with model.pt2. Latency does not depend on the weights' values; no DINOv2 weights are here."""
    import torch

    from export.onnx_export import export_onnx
    from training.builders.registry import build_model
    from training.checkpoint import save_checkpoint
    from training.config import load_config
    from training.data.writer import synth_labels

    torch.manual_seed(0)
    size = ctx.plan.vits_size
    cfg = load_config("endoarss_vits14", [f"model.image_size=[{size}, {size}]"])
    labels = synth_labels({"note": "random-init weights, for timing only"}).to_dict()
    model = build_model(cfg.model, labels["tasks"]).eval()
    checkpoint = save_checkpoint(model, cfg, labels, ctx.work / "ckpt-vits14")
    export_onnx(checkpoint, ctx.work / VITS_BUNDLE, overwrite=True, torch_program=True)


def _bench_engine(ctx: StepContext, variants: tuple[str, ...], batches: tuple[int, ...], name: str) -> None:
    from export.bench import bench_engine, format_table

    report = bench_engine(
        [ctx.work / VITS_BUNDLE],
        variants,
        batches=batches,
        runs=ctx.plan.engine_runs,
        warmup=ctx.plan.engine_warmup,
        threads=ctx.plan.engine_threads,
        device=ctx.plan.device,
        progress=False,
    )
    logger.info("bench engine (%s):\n%s", name, format_table(report))
    _write(ctx.out / f"{name}.json", report)


def step_engine(ctx: StepContext) -> None:
    """The torch engine's variants side by side on the ViT-S/14 bundle (engine.json)."""
    _bench_engine(ctx, ctx.plan.engine_variants, ctx.plan.engine_batches, "engine")


def step_engine_compiled(ctx: StepContext) -> None:
    """torch.compile against eager and CUDA graphs at batch 1 (one compile), last because compiling takes the longest
    (engine-compiled.json)."""
    _bench_engine(ctx, ctx.plan.compiled_variants, ctx.plan.compiled_batches, "engine-compiled")


def _frames(plan: Plan, count: int = 8) -> list[bytes]:
    import cv2

    from training.data.synth import render_image

    width, height = plan.frame_size
    frames = []
    for i in range(count):
        rgb = render_image(11, i, height=height, width=width).image
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, plan.jpeg_quality])
        if not ok:
            raise RuntimeError("OpenCV could not encode a generated frame as JPEG")
        frames.append(buf.tobytes())
    return frames


def _service_env(plan: Plan, decode: str) -> dict[str, str]:
    return {
        "ENDOSTREAM_BACKEND": "torch",
        "ENDOSTREAM_DEVICE": plan.device,
        "ENDOSTREAM_PRECISION": plan.service_precision,
        "ENDOSTREAM_DECODE": decode,
        **dict(plan.service_env),
    }


def step_http(ctx: StepContext) -> None:
    """bench http on the ViT-S/14 bundle, 1080p JPEG, once per decode mode (http.json)."""
    from service.bench import bench_http, format_http

    plan = ctx.plan
    frames = _frames(plan)
    report: dict[str, Any] = {"frame_size": "x".join(map(str, plan.frame_size)), "quality": plan.jpeg_quality}
    for decode in plan.decode_modes:
        env = _service_env(plan, decode)
        result = bench_http(
            ctx.work / VITS_BUNDLE,
            frames,
            env=env,
            concurrency=plan.http_concurrency,
            requests=plan.http_requests,
            warmup=plan.http_warmup,
            max_batch=plan.http_max_batch,
            log_dir=ctx.work / "server-logs",
        )
        result["env"] = env
        logger.info("bench http, decode %s:\n%s", decode, format_http(result))
        report[f"decode_{decode}"] = result
    _write(ctx.out / "http.json", report)


def step_ws(ctx: StepContext) -> None:
    """bench ws: 1080p JPEG frames pushed at 30 fps over /ws/infer, GPU decoding where there is a GPU (ws.json)."""
    from service.bench_ws import bench_ws, format_ws

    plan = ctx.plan
    env = _service_env(plan, plan.decode_modes[0])
    report = bench_ws(
        ctx.work / VITS_BUNDLE,
        _frames(plan),
        count=plan.ws_frames,
        fps=plan.fps,
        warmup=plan.ws_warmup,
        env=env,
        log_dir=ctx.work / "server-logs",
    )
    report["frame_size"] = "x".join(map(str, plan.frame_size))
    logger.info("bench ws: %s", format_ws(report))
    _write(ctx.out / "ws.json", report)


STEPS: dict[str, Callable[[StepContext], None]] = {
    "env": step_env,
    "bundle-tiny": step_bundle_tiny,
    "bundle-vits14": step_bundle_vits,
    "engine": step_engine,
    "http": step_http,
    "ws": step_ws,
    "engine-compiled": step_engine_compiled,
}
