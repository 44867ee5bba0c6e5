"""The temporal head's own ONNX graph: one time step with explicit state in and out (see training/temporal/heads.py).

Graph inputs `features` float32 [N, input_dim] and `state` float32 [N, *state_shape]; outputs `probs` float32 [N, K]
and `state_out` [N, *state_shape]; N is a dynamic batch of independent streams and an all-zeros state is a fresh
stream. The export is checked like the main graph: `onnx.checker`, then parity with PyTorch, here by running the ONNX
step frame by frame over generated sequences (batch 1 and 3, from zeros) against the PyTorch head run causally over
the whole sequence at once. The manifest's `temporal` section records the graph with its receptive field and parity.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from export.checks import check_graph, onnxruntime_session
from export.exporter_logs import quiet_exporter_logs
from training.temporal.heads import TemporalHead

logger = logging.getLogger(__name__)

HEAD_FILE = "temporal_head.onnx"
STEP_INPUTS = ("features", "state")
STEP_OUTPUTS = ("probs", "state_out")
STEP_TOLERANCE = 1e-4  # max |ONNX - PyTorch| probability over a whole sequence, like the main graph's
PARITY_STEPS = 48  # at least; parity runs past a head's receptive field, so every ring buffer in its state wraps
_BATCH = torch.export.Dim("batch", min=1, max=1024)


class HeadStep(nn.Module):
    """`head.step` as a module (what is exported)."""

    def __init__(self, head: TemporalHead) -> None:
        super().__init__()
        self.head = head

    def forward(self, features: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        return self.head.step(features, state)


@dataclass
class HeadExport:
    path: Path
    parity_max_abs_diff: float
    seconds: float


def parity_inputs(head: TemporalHead, batch: int, steps: int | None = None, seed: int = 0) -> np.ndarray:
    """N T D test inputs: probability vectors for the filters, non-negative feature-like values for learned heads.

    Sequences hold runs of a repeated input with noise, so filters and TCNs see both steady states and switches."""
    if steps is None:
        steps = max(PARITY_STEPS, head.receptive_field_frames + 16)
    rng = np.random.default_rng(seed)
    runs = rng.integers(3, 12, size=steps)
    base = rng.random((steps, batch, head.input_dim)).astype(np.float32)
    x = np.concatenate([np.repeat(base[i : i + 1], n, axis=0) for i, n in enumerate(runs)])[:steps]
    x = x + 0.05 * rng.random(x.shape).astype(np.float32)
    x = x.transpose(1, 0, 2)  # N T D
    if head.input_kind == "probs":
        x = np.exp(4 * x) / np.exp(4 * x).sum(-1, keepdims=True)
    return np.ascontiguousarray(x, dtype=np.float32)


def step_parity(head: TemporalHead, path: Path, batches: tuple[int, ...] = (1, 3)) -> float:
    """Max |probability| difference between the ONNX step run frame by frame and `head` on whole sequences."""
    session = onnxruntime_session(path)
    diff = 0.0
    for batch in batches:
        x = parity_inputs(head, batch)
        with torch.no_grad():
            want = head.eval()(torch.from_numpy(x)).numpy()  # N T K
        state = np.zeros((batch, *head.state_shape), dtype=np.float32)
        for t in range(x.shape[1]):
            probs, state = session.run(None, {"features": x[:, t], "state": state})
            diff = max(diff, float(np.abs(probs - want[:, t]).max()))
    return diff


def export_head(head: TemporalHead, path: Path, opset: int) -> HeadExport:
    """Export `head.step` to `path`, run `onnx.checker` and the step parity check; the file is removed on failure."""
    started = time.perf_counter()
    head = head.eval()
    path = Path(path)
    x = torch.zeros(2, head.input_dim)
    state = head.init_state(2)

    try:
        with torch.no_grad(), quiet_exporter_logs():
            torch.onnx.export(
                HeadStep(head).eval(),
                (x, state),
                str(path),
                input_names=list(STEP_INPUTS),
                output_names=list(STEP_OUTPUTS),
                dynamic_shapes={"features": {0: _BATCH}, "state": {0: _BATCH}},
                opset_version=opset,
                external_data=False,
                dynamo=True,
                verbose=False,
            )
        check_graph(path)
        diff = step_parity(head, path)
        if not diff <= STEP_TOLERANCE:
            raise ValueError(
                f"the temporal head's ONNX step disagrees with PyTorch: max probability difference {diff:.2e} "
                f"(limit {STEP_TOLERANCE:g})"
            )
    except Exception:
        path.unlink(missing_ok=True)
        raise
    logger.info("temporal head (%s) exported to %s, step parity %.1e", head.method, path, diff)
    return HeadExport(path, diff, time.perf_counter() - started)


def step_latency(path: Path, *, runs: int = 300, warmup: int = 30, threads: int = 1) -> dict[str, Any]:
    """p50 / p95 / mean milliseconds of one ONNX Runtime step at batch 1 (CPU, `threads` intra-op threads)."""
    session = onnxruntime_session(path, threads=threads)
    inputs = {i.name: i for i in session.get_inputs()}
    dim = int(inputs["features"].shape[1])
    shape = [1, *(int(d) for d in inputs["state"].shape[1:])]
    feed = {
        "features": np.random.default_rng(0).random((1, dim), dtype=np.float32),
        "state": np.zeros(shape, np.float32),
    }
    times = []
    for i in range(warmup + runs):
        start = time.perf_counter()
        _, feed["state"] = session.run(None, feed)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    values = np.array(times)
    return {
        "p50": float(np.percentile(values, 50)),
        "p95": float(np.percentile(values, 95)),
        "mean": float(values.mean()),
        "runs": runs,
        "batch": 1,
        "threads": threads,
    }


def manifest_section(
    head: TemporalHead, task: str, input_output: str, frame_interval_s: float, parity: float, graph: str = HEAD_FILE
) -> dict[str, Any]:
    """The manifest's `temporal` entry (shared contract, field for field)."""
    return {
        "task": task,
        "method": head.method,
        "graph": graph,
        "input_output": input_output,
        "input_dim": head.input_dim,
        "state_shape": list(head.state_shape),
        "frame_interval_s": frame_interval_s,
        "receptive_field_frames": head.receptive_field_frames,
        "parity_max_abs_diff": parity,
        # beyond the contract (ignored by readers that do not know it): the learned head's hysteresis margin
        "hysteresis": head.config().get("hysteresis"),
    }
