"""Online temporal activity: the bundle's temporal head stepped once per `frame_interval_s` of each source's time.

A stream, a WebSocket connection or an HTTP session owns one `TemporalState`; the head (`temporal_head.onnx`, the
bundle contract in README "Temporal activity in results") maps (per-frame input, state) -> (probabilities, state).
The stepping rule follows the contract's item 4 and the online setting of TeCNO (Czempiel et al., MICCAI 2020):
causal, one step per fixed time interval, so the head sees the same time scale it was trained at whatever the
source's frame rate:

- a fresh state (all zeros) steps once on its first frame;
- a frame less than one interval after the last step does not step: it gets the latest temporal answer;
- a frame k >= 1 intervals after the last step steps k times: k - 1 times on the last input seen before it (a
  zero-order hold over the frames that were dropped or never sent) and once on its own input; at most
  `receptive_field_frames` steps in all, since the head cannot tell more steps of one input from that many;
- a gap (either way: a source clock that restarted) longer than `reset_after_s` resets the state to zeros;
- an HTTP frame older than the newest one seen (out of order: concurrent requests of one session) neither steps
  nor moves time back; it gets the latest answer. Stream and WebSocket frames are processed one after another,
  so for them time going back means the source's clock restarted (a camera reconnect): the state resets;
- a state whose clock changes (client timestamps vs arrival time, stream PTS vs capture time) starts fresh.

Each state has a lock, so results built concurrently (HTTP frames of one session, worker-thread results) update
it one at a time. The head runs where the result is built: a step costs tens of microseconds (one small ONNX
Runtime call with one thread), less than the thread hop that running it elsewhere would cost.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from service.bundle import Bundle, TemporalSpec
from service.errors import BadInput
from service.metrics import ServiceMetrics

logger = logging.getLogger(__name__)

Clock = Literal["source", "arrival"]
SESSION_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_EPS = 1e-9  # 0.6 / 0.2 is 2.9999999999999996 in floats: a frame exactly k intervals later steps k times


class TemporalHead:
    """`temporal_head.onnx` in its own ONNX Runtime session: one thread, sequential, no spinning between calls."""

    def __init__(self, path: Path, spec: TemporalSpec) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        if set(inputs) != {"features", "state"} or not {"probs", "state_out"} <= outputs:
            raise ValueError(
                f"{path}: a temporal head takes `features` and `state` and gives `probs` and `state_out`; this graph "
                f"takes {sorted(inputs)} and gives {sorted(outputs)}; re-export the bundle"
            )
        width = inputs["features"][1] if len(inputs["features"]) == 2 else None
        if isinstance(width, int) and width != spec.input_dim:
            raise ValueError(
                f"{path}: features width {width} differs from the manifest's temporal.input_dim {spec.input_dim}; "
                "re-export the bundle"
            )
        state_dims = list(inputs["state"][1:])
        if all(isinstance(d, int) for d in state_dims) and state_dims != list(spec.state_shape):
            raise ValueError(
                f"{path}: state shape {state_dims} differs from the manifest's temporal.state_shape "
                f"{spec.state_shape}; re-export the bundle"
            )
        self.spec = spec
        self.fresh = np.zeros((1, *spec.state_shape), np.float32)

    def step(self, features: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """features: float32 1 x D; state: 1 x *state_shape -> (probabilities K, the next state)."""
        probs, state_out = self.session.run(("probs", "state_out"), {"features": features, "state": state})
        return probs[0], state_out


@dataclass(eq=False)
class TemporalState:
    """One source's temporal state: the head's state array and the bookkeeping of the stepping rule."""

    source_kind: str  # "http" | "websocket" | "stream": the metrics' label
    state: np.ndarray | None = None  # None: fresh (the head's all-zeros state)
    clock: Clock | None = None
    last_step_t: float = 0.0  # source time of the last step (advanced by whole intervals, so no drift)
    last_t: float = -math.inf  # newest frame time seen
    last_input: np.ndarray | None = None
    steps: int = 0  # head steps since the last reset
    answer: dict[str, Any] | None = None  # the latest temporal answer, without the per-frame fields
    frame_label: int | None = None  # the previous per-frame label, for the switch counter
    touched: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
class Track:
    """A frame's place in its source's time: whose state, when (seconds), and on which clock."""

    state: TemporalState
    time: float
    clock: Clock


class TemporalTracker:
    """Steps states with the bundle's head and turns its probabilities into the `activity_temporal` answer.

    Args:
        head: the loaded head.
        bundle: its bundle (the task's classes and the outputs the head reads).
        reset_after_s: a gap longer than this between frames of one source resets its state.
        metrics: label switches are counted here.
    """

    def __init__(self, head: TemporalHead, bundle: Bundle, *, reset_after_s: float, metrics: ServiceMetrics) -> None:
        spec = head.spec
        self.head = head
        self.spec = spec
        task = bundle.task(spec.task)
        self.task = task.name
        self.classes = task.classes
        self.frame_output = task.output
        self.interval = spec.frame_interval_s
        self.receptive_field = spec.receptive_field_frames
        self.reset_after_s = max(reset_after_s, self.interval)
        self.metrics = metrics

    def describe(self) -> dict[str, Any]:
        """What `/model` says about the head."""
        return {
            "task": self.task,
            "method": self.spec.method,
            "input_output": self.spec.input_output,
            "frame_interval_s": self.interval,
            "receptive_field_frames": self.receptive_field,
            "reset_after_s": self.reset_after_s,
        }

    def observe(self, track: Track, outputs: dict[str, np.ndarray]) -> dict[str, Any]:
        """Advance `track.state` to `track.time` with this frame's outputs; returns the frame's temporal answer."""
        state = track.state
        with state.lock:
            frame_index = int(outputs[self.frame_output].argmax())
            if state.frame_label is not None and frame_index != state.frame_label:
                self.metrics.label_switches.labels(state.source_kind, "frame").inc()
            state.frame_label = frame_index
            stepped, held, reset = self._advance(state, outputs[self.spec.input_output], track.time, track.clock)
            state.touched = time.monotonic()
            assert state.answer is not None
            return {**state.answer, "stepped": stepped, "held": held, "reset": reset}

    def _advance(self, state: TemporalState, raw: np.ndarray, t: float, clock: Clock) -> tuple[int, int, bool]:
        """The stepping rule (module docstring); returns (head steps taken, of which on held input, reset?)."""
        x = np.asarray(raw, np.float32).reshape(1, -1).copy()  # kept as the held input: no view into the batch
        reset = state.state is None or state.clock != clock or abs(t - state.last_step_t) > self.reset_after_s
        # a stream's or WebSocket's frames come one after another: time going back is a restarted source clock
        reset = reset or (t < state.last_t and state.source_kind != "http")
        if reset:
            state.state, state.clock, state.steps = self.head.fresh, clock, 0
            state.last_step_t, state.last_t = t, t
            state.last_input = x
            self._step(state, x)
            return 1, 0, True
        if t < state.last_t:  # out of order: too late to change the past
            return 0, 0, False
        state.last_t = t
        k = int((t - state.last_step_t) / self.interval + _EPS)
        if k < 1:
            state.last_input = x
            return 0, 0, False
        state.last_step_t += k * self.interval
        held = min(k, self.receptive_field) - 1
        held_input = state.last_input if state.last_input is not None else x
        for _ in range(held):
            self._step(state, held_input, answer=False)
        self._step(state, x)
        state.last_input = x
        return held + 1, held, False

    def _step(self, state: TemporalState, x: np.ndarray, *, answer: bool = True) -> None:
        assert state.state is not None
        probs, state.state = self.head.step(x, state.state)
        state.steps += 1
        if not answer:
            return
        index = int(probs.argmax())
        previous = state.answer["index"] if state.answer is not None and state.steps > 1 else None
        if previous is not None and previous != index:
            self.metrics.label_switches.labels(state.source_kind, "temporal").inc()
        rounded = [round(p, 6) for p in probs.astype(float).tolist()]
        state.answer = {
            "task": self.task,
            "label": self.classes[index],
            "index": index,
            "confidence": rounded[index],
            "probabilities": dict(zip(self.classes, rounded, strict=True)),
            "method": self.spec.method,
            "frame_interval_s": self.interval,
            "context_frames": min(state.steps, self.receptive_field),
            "steps": state.steps,
        }


class SessionStore:
    """HTTP sessions' states by id: least recently used first, expired after `ttl_s` idle, at most `max_sessions`.

    Expired sessions are dropped from the old end whenever a session is looked up (the order is by last use, so
    that is where they are); beyond the bound the least recently used one goes. Both are counted as evictions.
    """

    def __init__(self, *, ttl_s: float, max_sessions: int, metrics: ServiceMetrics) -> None:
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self.metrics = metrics
        self._states: OrderedDict[str, TemporalState] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, session: str, now: float | None = None) -> TemporalState:
        """The session's state (a fresh one for a new or expired id); marks it used."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._expire(now)
            state = self._states.get(session)
            if state is None:
                state = self._states[session] = TemporalState("http")
                if len(self._states) > self.max_sessions:
                    self._states.popitem(last=False)
                    self.metrics.temporal_evictions.labels("capacity").inc()
            else:
                self._states.move_to_end(session)
            state.touched = now
            self.metrics.temporal_sessions.set(len(self._states))
            return state

    def refresh(self, now: float | None = None) -> None:
        """Drop expired sessions and update the gauge (at scrape time: lookups alone leave idle ones counted)."""
        with self._lock:
            self._expire(time.monotonic() if now is None else now)
            self.metrics.temporal_sessions.set(len(self._states))

    def _expire(self, now: float) -> None:
        while self._states:
            oldest = next(iter(self._states.values()))
            if now - oldest.touched <= self.ttl_s:
                return
            self._states.popitem(last=False)
            self.metrics.temporal_evictions.labels("expired").inc()

    def __len__(self) -> int:
        with self._lock:
            return len(self._states)

    def __contains__(self, session: object) -> bool:
        with self._lock:
            return session in self._states


def parse_session(value: str | None) -> str | None:
    """A session id from `X-Session-Id` or `?session=`: 1-64 of A-Z a-z 0-9 . _ : - (BadInput otherwise)."""
    if value is None:
        return None
    if not SESSION_ID.fullmatch(value):
        raise BadInput(
            "bad_session",
            f"session id {value[:80]!r} is not 1-64 characters of letters, digits, '.', '_', ':' or '-'; "
            "send a short id such as a UUID",
            param="session",
            value=value[:80],
        )
    return value


def parse_frame_time(value: str | None) -> float | None:
    """A client timestamp (`X-Frame-Time` or `?t=`): seconds, finite, >= 0 (BadInput otherwise)."""
    if value is None:
        return None
    try:
        t = float(value)
    except ValueError:
        t = math.nan
    if not math.isfinite(t) or t < 0:
        raise BadInput(
            "bad_frame_time",
            f"frame time {value[:40]!r} is not a finite number of seconds >= 0 (e.g. the capture time, 12.345)",
            param="t",
            value=value[:40],
        )
    return t


def open_tracker(
    bundle: Bundle, *, enabled: bool, reset_after_s: float, metrics: ServiceMetrics
) -> TemporalTracker | None:
    """The tracker for `bundle`'s temporal head; None when it has none or the operator turned it off."""
    path = bundle.temporal_graph_path
    spec = bundle.manifest.temporal
    if spec is None or path is None:
        return None
    if not enabled:
        logger.info("temporal head %s present but turned off (ENDOSTREAM_TEMPORAL=0)", spec.method)
        return None
    tracker = TemporalTracker(TemporalHead(path, spec), bundle, reset_after_s=reset_after_s, metrics=metrics)
    logger.info(
        "temporal head: %s on %s, one step per %.3f s, %d frames of context",
        spec.method,
        spec.input_output,
        spec.frame_interval_s,
        spec.receptive_field_frames,
    )
    return tracker
