"""`endostream bench engine`: latency and throughput of a bundle on several backends, side by side in one run.

Each variant (bundle or group of bundles x backend + precision) gets a warm-up, then timed calls at batch 1
(p50/p95/p99/max) and a throughput sweep over batch sizes. Frames are generated endoscopy frames at the bundles' input
size, so every variant sees the same inputs. The variants' calls are interleaved in rounds, so a change in the
machine's speed during the run (other load, clocks) lands on all of them alike. Ratios against the first variant are
reported (> 1 = faster than it), next to the accuracy cost an INT8 bundle's manifest records.

Variants are `BACKEND[:PRECISION][:FLAG...]`:
- `onnxruntime` runs the bundle's graph as it is;
- `torch[:fp16|bf16]` runs PyTorch eager on the bundle's *source checkpoint* (the model before export);
- `torch-program[:fp16|bf16][:graphs][:compile|:max-autotune]` runs the bundle's `model.pt2` through the service's
  own `TorchEngine`, exactly as `endostream serve --backend torch` would: autocast with weights cast once, CUDA
  graphs per batch size (`graphs`, CUDA only), `torch.compile` (`compile`: Inductor default; `max-autotune`: also
  benchmarks GEMM kernels, minutes of compiling). Its timings include the copy of the outputs to the host.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from export.checks import onnxruntime_session
from export.graph import BundleGraph, prepare_for_export
from export.manifest import Manifest, read_manifest
from export.onnx_export import generated_frames
from service.engines.base import EngineOptions

BACKENDS = ("onnxruntime", "torch", "torch-program")  # tensorrt joins with its engine builder
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
PROGRAM_FLAGS = ("graphs", "compile", "max-autotune")  # torch-program only
DEFAULT_BATCHES = (1, 2, 4, 8)
ROUNDS = 10

Runner = Callable[[np.ndarray], Any]


@dataclass
class LatencyStats:
    """Per-call wall time in milliseconds."""

    runs: int
    mean: float
    p50: float
    p95: float
    p99: float
    max: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> LatencyStats:
        ms = np.asarray(seconds) * 1000.0
        q = np.percentile(ms, [50, 95, 99])
        return cls(len(ms), float(ms.mean()), float(q[0]), float(q[1]), float(q[2]), float(ms.max()))


@dataclass
class VariantResult:
    variant: str
    backend: str
    precision: str
    batch1: LatencyStats
    throughput_fps: dict[int, float] = field(default_factory=dict)  # batch -> frames per second
    best_batch: int = 1
    best_fps: float = 0.0


def onnxruntime_runner(bundle: Path, manifest: Manifest, threads: int | None, *, spinning: bool = True) -> Runner:
    session = onnxruntime_session(bundle / manifest.model_file, threads=threads, spinning=spinning)
    name = manifest.input.name
    return lambda frames: session.run(None, {name: frames})


def torch_runner(manifest: Manifest, precision: str, device: str) -> Runner:
    """PyTorch eager on the bundle's source checkpoint: the same merged model and wrapper that were exported."""
    from training.checkpoint import load_checkpoint

    source = Path(manifest.checks.get("source_checkpoint", ""))
    if not (source / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"the torch backend runs the bundle's source checkpoint, but {source} is not there any more; "
            f"benchmark on the machine that exported the bundle or restore the checkpoint"
        )
    ckpt = load_checkpoint(source)
    model = prepare_for_export(ckpt.model, manifest.input.height, manifest.input.width)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    graph = BundleGraph(model).to(device=device, dtype=dtype).eval()

    def run(frames: np.ndarray) -> Any:
        with torch.inference_mode():
            out = graph(torch.from_numpy(frames).to(device))
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            return out

    return run


def time_interleaved(
    runners: Sequence[Runner], frames: np.ndarray, warmup: int, runs: int, rounds: int = ROUNDS
) -> list[list[float]]:
    """Per runner, `runs` timed calls on `frames`, taken in `rounds` alternating slices after `warmup` calls each.

    Each slice starts with one untimed call: the first call after a switch runs while the previous variant's worker
    threads still spin-wait and its own caches are cold (torch at 112 px: 75 ms against 43 ms steady), which would
    land in every variant's tail percentiles once per round.
    """
    for run in runners:
        for _ in range(warmup):
            run(frames)
    seconds: list[list[float]] = [[] for _ in runners]
    for index in range(rounds):
        share = runs // rounds + (1 if index < runs % rounds else 0)
        for run, timings in zip(runners, seconds, strict=True):
            if share:
                run(frames)  # settle after the switch, untimed
            for _ in range(share):
                start = time.perf_counter()
                run(frames)
                timings.append(time.perf_counter() - start)
    return seconds


def _split_variant(text: str) -> tuple[str, str | None, tuple[str, ...]]:
    backend, *parts = text.split(":")
    if backend not in BACKENDS:
        raise ValueError(
            f"unknown backend {backend!r} in {text!r}; this release has {BACKENDS} (e.g. torch:fp32, "
            f"torch-program:fp16:graphs)"
        )
    precision = parts.pop(0) if parts and parts[0] not in PROGRAM_FLAGS else None
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} in {text!r}; use fp32, fp16, bf16 or int8")
    flags = tuple(parts)
    if flags and backend != "torch-program":
        raise ValueError(f"{text!r}: flags {list(flags)} apply to torch-program variants only")
    unknown = [f for f in flags if f not in PROGRAM_FLAGS]
    if unknown or len(set(flags)) != len(flags) or {"compile", "max-autotune"} <= set(flags):
        raise ValueError(
            f"bad flags {list(flags)} in {text!r}: use graphs and at most one of compile, max-autotune, "
            f"e.g. torch-program:bf16:graphs:compile"
        )
    return backend, precision, flags


def parse_variant(text: str) -> tuple[str, str | None]:
    """`onnxruntime`, `torch:fp16` or `torch-program:fp16:graphs` -> (backend, precision); None = the bundle's own
    (torch backends: fp32). The torch-program flags are read by `program_options`."""
    backend, precision, _ = _split_variant(text)
    return backend, precision


def program_options(text: str, device: str, max_batch: int, threads: int | None) -> EngineOptions:
    """The `TorchEngine` options a `torch-program[...]` variant names (see the module docstring)."""
    _, precision, flags = _split_variant(text)
    kind = device.split(":")[0]
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r} must be cpu or cuda[:N]")
    if "graphs" in flags and kind != "cuda":
        raise ValueError(f"{text!r}: CUDA graphs need --device cuda; drop ':graphs' to time it on {device}")
    compile_mode = "max-autotune" if "max-autotune" in flags else "default" if "compile" in flags else "off"
    return EngineOptions(
        device=kind,  # type: ignore[arg-type]
        threads=threads or 0,
        precision=precision or "fp32",
        cuda_graphs="graphs" in flags,
        max_batch=max_batch,
        compile=compile_mode,  # type: ignore[arg-type]
    )


def torch_program_runner(bundle: Path, options: EngineOptions) -> Runner:
    """The bundle's `model.pt2` in the service's `TorchEngine`; each call returns host (numpy) outputs."""
    from service.bundle import load_bundle
    from service.engines.torch_backend import TorchEngine

    return TorchEngine(load_bundle(bundle), options).run


def parse_bundle_group(spec: str | Path) -> list[Path]:
    """ "bundles/all" -> one bundle; "bundles/act+bundles/seg" -> bundles run one after the other on every call."""
    return [Path(part) for part in str(spec).split("+")]


def _group_runner(
    bundles: list[Path],
    manifests: list[Manifest],
    variant: str,
    precision: str,
    threads: int | None,
    device: str,
    max_batch: int,
) -> Runner:
    backend, _ = parse_variant(variant)
    runners = []
    for bundle, manifest in zip(bundles, manifests, strict=True):
        if backend == "torch-program":
            if manifest.precision == "int8":
                raise ValueError(f"{bundle} holds an INT8 graph and no torch program of it; bench it with onnxruntime")
            runners.append(torch_program_runner(bundle, program_options(variant, device, max_batch, threads)))
        elif backend == "onnxruntime":
            if precision != manifest.precision:
                raise ValueError(f"{bundle} holds an {manifest.precision} graph; onnxruntime runs it as it is")
            # A group's sessions run back to back on the same cores, and each session's workers spin-wait after its
            # run, through the next session's run. Without spinning the tiny per-task pair took 8.8 ms instead of
            # 15.5 ms at batch 1 on 2 cores (a lone session is fastest with spinning), so a group runs without it.
            runners.append(onnxruntime_runner(bundle, manifest, threads, spinning=len(bundles) == 1))
        else:
            if precision == "int8" or manifest.precision == "int8":
                raise ValueError(
                    f"the torch backend runs a bundle's fp32 source checkpoint in fp32, fp16 or bf16, so it would not "
                    f"time the INT8 graph of {bundle}; bench that bundle with onnxruntime only"
                )
            runners.append(torch_runner(manifest, precision, device))
    if len(runners) == 1:
        return runners[0]
    return lambda frames: [run(frames) for run in runners]


def bench_engine(
    bundles: Sequence[str | Path],
    variants: Sequence[str],
    *,
    batches: Sequence[int] = DEFAULT_BATCHES,
    warmup: int = 10,
    runs: int = 100,
    threads: int | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Benchmark every bundle group x variant (e.g. ["onnxruntime", "torch"]) side by side on the same frames.

    Args:
        bundles: bundle folders; "a+b" is a group whose bundles all run on every call (e.g. one graph per task,
            to compare with the fused graph). All must take the same input size.
        threads: intra-op threads for both runtimes (default: what each runtime picks, all cores).
        runs: timed calls at batch 1; the throughput sweep uses max(10, runs // 4) calls per batch size.
    """
    groups = {str(spec): parse_bundle_group(spec) for spec in bundles}
    manifests = {spec: [read_manifest(b) for b in paths] for spec, paths in groups.items()}
    sizes = {(m.input.height, m.input.width) for group in manifests.values() for m in group}
    if len(sizes) != 1:
        raise ValueError(f"bundles compared side by side must share one input size; got {sorted(sizes)}")
    ((height, width),) = sizes
    if threads:
        torch.set_num_threads(threads)
    frames = generated_frames(max(batches), height, width)
    labels: list[tuple[str, str, str]] = []  # (variant, backend, precision)
    runners: list[Runner] = []
    for spec, paths in groups.items():
        for text in variants:
            backend, asked = parse_variant(text)
            precision = asked or (manifests[spec][0].precision if backend == "onnxruntime" else "fp32")
            runners.append(_group_runner(paths, manifests[spec], text, precision, threads, device, max(batches)))
            labels.append((text if len(groups) == 1 else f"{spec} {text}", backend, precision))
    with tqdm(total=1 + len(batches), desc="timing: batch 1 latency, then throughput", disable=not progress) as bar:
        latency = time_interleaved(runners, frames[:1], warmup, runs)
        results = [VariantResult(*label, LatencyStats.of(s)) for label, s in zip(labels, latency, strict=True)]
        bar.update()
        for batch in batches:
            calls = time_interleaved(runners, frames[:batch], max(2, warmup // 2), max(10, runs // 4))
            for result, seconds in zip(results, calls, strict=True):
                result.throughput_fps[batch] = batch / statistics.median(seconds)
            bar.update()
    for result in results:
        result.best_batch = max(result.throughput_fps, key=result.throughput_fps.get)
        result.best_fps = result.throughput_fps[result.best_batch]
    first = results[0]
    return {
        "bundles": {
            spec: [
                {
                    "family": m.family,
                    "name": m.name,
                    "precision": m.precision,
                    "tasks": [t.name for t in m.tasks],
                    "accuracy": m.checks.get("accuracy"),
                }
                for m in group
            ]
            for spec, group in manifests.items()
        },
        "input": {"height": height, "width": width},
        "machine": _machine(threads, device),
        "settings": {
            "batches": list(batches),
            "warmup": warmup,
            "runs": runs,
            "onnxruntime_spinning": {"single bundle": True, "bundle group": False},
        },
        "variants": [asdict(r) for r in results],
        "ratios_vs_first": {
            r.variant: {
                "batch1_p50_speedup": first.batch1.p50 / r.batch1.p50,
                "throughput_speedup": r.best_fps / first.best_fps,
            }
            for r in results
        },
    }


def _machine(threads: int | None, device: str) -> dict[str, Any]:
    import onnxruntime

    info = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": threads or "default",
        "device": device,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def format_table(report: dict[str, Any]) -> str:
    """Markdown: one row per variant, batch-1 percentiles, best throughput, ratios against the first variant; then a
    line per bundle whose manifest scored it against its fp32 graph (INT8)."""
    lines = [
        "| Variant | p50 (ms) | p95 (ms) | p99 (ms) | max (ms) | best fps (batch) | ×p50 vs first | ×fps vs first |",
        "|:---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v in report["variants"]:
        b, ratio = v["batch1"], report["ratios_vs_first"][v["variant"]]
        lines.append(
            f"| {v['variant']} | {b['p50']:.2f} | {b['p95']:.2f} | {b['p99']:.2f} | {b['max']:.2f} | "
            f"{v['best_fps']:.1f} ({v['best_batch']}) | {ratio['batch1_p50_speedup']:.2f} | "
            f"{ratio['throughput_speedup']:.2f} |"
        )
    costs = [
        f"{spec} ({bundle['precision']}) vs its fp32 graph on {accuracy['split']} ({accuracy['images']} images): "
        + ", ".join(f"{k} {100 * v:+.2f} pt" for k, v in accuracy["delta"].items())
        for spec, group in report["bundles"].items()
        for bundle in group
        if (accuracy := bundle.get("accuracy"))
    ]
    return "\n".join(lines + ([""] + costs if costs else []))
