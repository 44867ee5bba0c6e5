"""`endostream gpu-check` (`scripts/gpu-check`): the whole GPU path proven in one run, results in one folder.

On a bare GPU machine: install the wheels that travel in `.whl/` into a temporary site folder; probe the machine;
build two bundles with `model.pt2` (demo `tiny` trained for a few steps, EndoARSS ViT-S/14 at 448 px random-init)
while `pytest -m gpu` runs; `bench engine` over the torch engine's variants; the service on the GPU under `bench
http` (1080p JPEG q90, 1 and 8 clients, GPU decoding on and off) and `bench ws` (>= 3000 frames at 30 fps); last
the torch.compile comparison, the slowest step. `--cpu` runs the same steps at small sizes on a machine without a
GPU (CI), so that the GPU run is not where the script's bugs are found.

Each step runs in its own child process with a time budget, and never past the run's deadline; a step that fails or
runs out of time is recorded and the next one still runs. The output folder (argument, else `$OUT`, else
`endostream-work/gpu-check`) gets every JSON, `gpu-check.log` and `summary.md`; the summary is printed last.
At most 8 files are written there, the number a device run brings back.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from endostream._gpu_check_steps import CPU_PLAN, GPU_PLAN, STEPS, Plan, StepContext
from endostream._gpu_check_summary import StepRecord, write_summary

logger = logging.getLogger("endostream.gpu_check")

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / ".whl"
LOG_FILE = "gpu-check.log"
DEFAULT_OUT = Path("endostream-work/gpu-check")
GPU_DEADLINE_S = 540.0
CPU_DEADLINE_S = 1800.0


@dataclass(frozen=True)
class Step:
    name: str
    budget_s: dict[str, float]  # mode -> seconds
    what: str  # one line for the progress output and the summary


# Phases run one after the other; the steps of one phase run at the same time. Only the bundles and the GPU tests
# share a phase: nothing in them is timed, and every timed step later has the machine to itself.
PHASES: tuple[tuple[Step, ...], ...] = (
    (Step("env", {"gpu": 60, "cpu": 180}, "machine, GPU and package versions"),),
    (
        Step("pytest-gpu", {"gpu": 240, "cpu": 600}, "pytest -m gpu (tests/service, tests/export)"),
        Step("bundle-tiny", {"gpu": 150, "cpu": 600}, "demo tiny: generated data, one short epoch, export + model.pt2"),
        Step("bundle-vits14", {"gpu": 240, "cpu": 600}, "ViT-S/14 random-init, 2 tasks, SMA + TESLA: export + pt2"),
    ),
    (Step("engine", {"gpu": 120, "cpu": 600}, "bench engine: fp32 eager vs fp32/fp16/bf16 + CUDA graphs"),),
    (Step("http", {"gpu": 150, "cpu": 600}, "bench http: 1080p JPEG q90, GPU decoding on/off"),),
    (Step("ws", {"gpu": 150, "cpu": 600}, "bench ws: 1080p JPEG paced at 30 fps over /ws/infer"),),
    (Step("engine-compiled", {"gpu": 240, "cpu": 0}, "bench engine: torch.compile vs CUDA graphs vs eager"),),
)


WEB_STACK = ("fastapi", "uvicorn", "pydantic_settings", "websockets")  # what the wheels bring; present: no install


def install_wheels(site: Path) -> str:
    """pip-install every wheel in `.whl/` into `site` (no index, no dependencies): what the device machine lacks.

    Skipped when the service's web stack imports already (a development box, CI): the wheels are built for the GPU
    machine's Python 3.12 and need not match this one.
    """
    wheels = sorted(WHEELS.glob("*.whl"))
    if not wheels:
        return "no .whl/ folder: using the installed packages"
    if all(importlib.util.find_spec(name) for name in WEB_STACK):
        return f"{', '.join(WEB_STACK)} are installed: the {len(wheels)} wheels in .whl/ are not needed"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir"]
    result = subprocess.run(
        [*cmd, "--target", str(site), *map(str, wheels)], capture_output=True, text=True, timeout=300
    )
    if result.returncode != 0:
        raise RuntimeError(f"pip could not install the wheels in {WHEELS}: {result.stderr.strip()[-2000:]}")
    return f"{len(wheels)} wheels from .whl/ into {site}"


def _step_command(name: str, ctx: StepContext) -> list[str]:
    if name == "pytest-gpu":
        return [
            sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-ra", "-p", "no:cacheprovider",
            "--continue-on-collection-errors", "tests/service", "tests/export",
            # no gpu tests in them, and they import packages the GPU machine lacks (playwright, tritonclient)
            "--ignore=tests/service/test_viewer.py", "--ignore=tests/export/test_triton.py",
        ]  # fmt: skip
    base = [sys.executable, "-m", "endostream.gpu_check", "--step", name, str(ctx.out)]
    return [*base, "--work", str(ctx.work), *(["--cpu"] if ctx.plan.mode == "cpu" else [])]


def _skip_reason(name: str, plan: Plan) -> str:
    if name == "engine-compiled" and not plan.compiled_variants:
        return "CPU mode: Inductor's C++ compile takes minutes on 2 cores (tests/service covers compile as `slow`)"
    return ""


def run_check(out: Path, plan: Plan, *, deadline_s: float, work: Path | None = None) -> list[StepRecord]:
    """Run every phase, write summary.md into `out` and return what each step did."""
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    work = work or Path(tempfile.mkdtemp(prefix="endostream-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    log_path = out / LOG_FILE
    records: list[StepRecord] = []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if plan.step_threads:
        env["OMP_NUM_THREADS"] = str(plan.step_threads)
    try:
        t0 = time.monotonic()
        note = install_wheels(work / "site")
        if (work / "site").is_dir():
            env["PYTHONPATH"] = os.pathsep.join([str(work / "site"), str(REPO), env.get("PYTHONPATH", "")]).rstrip(
                os.pathsep
            )
        records.append(StepRecord("wheels", "ok", time.monotonic() - t0, 60, note))
    except (RuntimeError, subprocess.TimeoutExpired) as err:
        records.append(StepRecord("wheels", "failed", time.monotonic() - t0, 60, str(err)))
    env["PYTHONPATH"] = env.get("PYTHONPATH") or str(REPO)
    _progress(f"wheels: {records[-1].status} ({records[-1].note})")
    ctx = StepContext(plan, out, work)
    with log_path.open("a") as log:
        log.write(f"== endostream gpu-check, mode {plan.mode}, work folder {work}\n")
        for phase in PHASES:
            records.extend(_run_phase(phase, ctx, env, log, started + deadline_s))
            # after every phase: a run stopped from outside still leaves the summary of what it finished
            write_summary(out, plan, records, time.monotonic() - started)
    return records


def _run_phase(phase: Sequence[Step], ctx: StepContext, env: dict[str, str], log, deadline: float) -> list[StepRecord]:
    """Start the phase's steps together; each gets min(its budget, time left); logs are appended one after another."""
    running = []
    records = []
    for step in phase:
        budget = step.budget_s[ctx.plan.mode]
        left = deadline - time.monotonic()
        reason = _skip_reason(step.name, ctx.plan) or ("" if left > 10 else "the run's deadline has passed")
        if reason:
            records.append(StepRecord(step.name, "skipped", 0.0, budget, reason))
            _progress(f"{step.name}: skipped ({reason})")
            continue
        step_log = ctx.work / f"{step.name}.log"
        handle = step_log.open("w")
        # its own process group: a step stopped at its budget takes the servers it started with it
        command = _step_command(step.name, ctx)
        proc = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _progress(f"{step.name}: started, budget {min(budget, left):.0f} s: {step.what}")
        running.append((step, shlex.join(command), proc, handle, step_log, time.monotonic(), min(budget, left)))
    for step, shown, proc, handle, step_log, begun, limit in running:
        try:
            code = proc.wait(timeout=max(1.0, begun + limit - time.monotonic()))
            status = "ok" if code == 0 else "failed"
            note = "" if code == 0 else f"exit code {code}: {_last_line(step_log)}"
        except subprocess.TimeoutExpired:
            _stop(proc)
            status, note = "timeout", f"stopped after {limit:.0f} s"
        handle.close()
        seconds = time.monotonic() - begun
        if step.name == "pytest-gpu":
            note = f"{_last_line(step_log)}" + (f"; {note}" if note else "")
        output = step_log.read_text(errors="replace")
        log.write(f"\n== step {step.name}: {status} in {seconds:.1f} s\n$ {shown}\n{output}")
        log.flush()
        records.append(StepRecord(step.name, status, seconds, step.budget_s[ctx.plan.mode], note))
        _progress(f"{step.name}: {status} in {seconds:.1f} s" + (f" ({note})" if note else ""))
    return records


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the step's process group (the step and any server it started), SIGKILL after 10 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(10)
            return
        except subprocess.TimeoutExpired:
            continue


def _last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip()[:300] if lines else "(no output)"


def _progress(message: str) -> None:
    logger.info("gpu-check: %s", message)


def _output_folder(arg: Path | None) -> Path:
    if arg is not None:
        return arg
    return Path(os.environ["OUT"]) if os.environ.get("OUT") else DEFAULT_OUT


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="endostream gpu-check", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", nargs="?", type=Path, help=f"output folder (default: $OUT, else {DEFAULT_OUT})")
    parser.add_argument(
        "--cpu",
        "--dry-run",
        dest="cpu",
        action="store_true",
        help="every step that runs without a GPU, at small sizes (ViT-S/14 at 56 px, 300 ws frames): about 2 min",
    )
    parser.add_argument("--work", type=Path, help="folder for data, bundles and server logs (default: a temp folder)")
    parser.add_argument(
        "--deadline",
        type=float,
        help="seconds after which no step starts or runs on (default 540: a device run's 10 minutes less the "
        "machine's start; --cpu: 1800, for busy CI machines)",
    )
    parser.add_argument("--step", choices=sorted(STEPS), help=argparse.SUPPRESS)  # one step, in a child process


def run_from_args(args: argparse.Namespace) -> int:
    """Exit code 0 when every step that ran passed (skipped steps do not fail the run)."""
    plan = CPU_PLAN if args.cpu else GPU_PLAN
    out = _output_folder(args.out)
    if args.step:
        out.mkdir(parents=True, exist_ok=True)
        STEPS[args.step](StepContext(plan, out, args.work or out))
        return 0
    deadline = args.deadline or (CPU_DEADLINE_S if args.cpu else GPU_DEADLINE_S)
    records = run_check(out, plan, deadline_s=deadline, work=args.work)
    print((out / "summary.md").read_text())  # noqa: T201 - the summary is this command's output, printed last
    return 0 if all(r.status in ("ok", "skipped") for r in records) else 1


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%X")
    return run_from_args(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
