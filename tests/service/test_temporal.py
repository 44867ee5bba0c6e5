"""The temporal step on its own: the stepping rule (interval, hold, cap, reset, out of order), the session store
(LRU bound, TTL expiry), id and time validation, one state per key under concurrency, and bundle checks."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from service.bundle import load_bundle
from service.errors import BadInput
from service.metrics import ServiceMetrics
from service.temporal import (
    SessionStore,
    TemporalState,
    TemporalTracker,
    Track,
    open_tracker,
    parse_frame_time,
    parse_session,
)
from tests.service.temporal_bundle import ALPHA, FIELD, INTERVAL, ema_reference

A = np.array([0.6, 0.1, 0.1, 0.1, 0.1], np.float32)
B = np.array([0.1, 0.1, 0.1, 0.1, 0.6], np.float32)
C = np.array([0.1, 0.6, 0.1, 0.1, 0.1], np.float32)


@pytest.fixture(scope="module")
def tracker(temporal_bundle: Path) -> TemporalTracker:
    bundle = load_bundle(temporal_bundle)
    made = open_tracker(bundle, enabled=True, reset_after_s=2.0, metrics=ServiceMetrics())
    assert made is not None
    return made


def _see(tracker: TemporalTracker, state: TemporalState, t: float, x: np.ndarray, clock: str = "source") -> dict:
    return tracker.observe(Track(state, t, clock), {"activity_probs": x})  # type: ignore[arg-type]


def _probs(answer: dict) -> np.ndarray:
    return np.array(list(answer["probabilities"].values()))


def test_first_frame_steps_once_from_a_fresh_state(tracker: TemporalTracker) -> None:
    state = TemporalState("stream")
    answer = _see(tracker, state, 5.0, A)
    assert (answer["stepped"], answer["held"], answer["reset"], answer["steps"]) == (1, 0, True, 1)
    assert answer["context_frames"] == 1 and answer["method"] == "ema" and answer["frame_interval_s"] == INTERVAL
    np.testing.assert_allclose(_probs(answer), A, atol=1e-6)  # a fresh EMA answers with the frame's probabilities
    assert answer["label"] == "grasping" and answer["confidence"] == pytest.approx(0.6)


def test_frames_within_one_interval_do_not_step(tracker: TemporalTracker) -> None:
    state = TemporalState("stream")
    _see(tracker, state, 0.0, A)
    for t in (0.03, 0.06, 0.099):
        answer = _see(tracker, state, t, B)
        assert answer["stepped"] == 0 and answer["steps"] == 1
        np.testing.assert_allclose(_probs(answer), A, atol=1e-6)  # the latest answer, unchanged
    answer = _see(tracker, state, 0.1, C)  # exactly one interval after the first step
    assert answer["stepped"] == 1 and answer["held"] == 0 and answer["steps"] == 2
    np.testing.assert_allclose(_probs(answer), ema_reference([A, C], ALPHA), atol=1e-6)


def test_steps_keep_their_phase(tracker: TemporalTracker) -> None:
    """Steps land on the grid started by the first frame: 20 fps frames step every other frame, no drift."""
    state = TemporalState("stream")
    stepped = [_see(tracker, state, i * 0.05, A)["stepped"] for i in range(40)]
    assert stepped == [1, 0] * 20
    assert state.steps == 20


def test_a_gap_holds_the_last_input(tracker: TemporalTracker) -> None:
    state = TemporalState("stream")
    _see(tracker, state, 0.0, A)
    _see(tracker, state, 0.04, B)  # no step, but B is now the last input seen
    answer = _see(tracker, state, 0.31, C)  # 3 intervals: two steps on B (held), then one on C
    assert (answer["stepped"], answer["held"], answer["steps"]) == (3, 2, 4)
    np.testing.assert_allclose(_probs(answer), ema_reference([A, B, B, C], ALPHA), atol=1e-6)
    answer = _see(tracker, state, 0.41, A)  # the grid is 0.0, 0.1, ...: 0.41 is one interval after 0.3
    assert answer["stepped"] == 1


def test_a_long_gap_is_capped_at_the_receptive_field(tracker: TemporalTracker) -> None:
    state = TemporalState("stream")
    _see(tracker, state, 0.0, A)
    answer = _see(tracker, state, 1.5, B)  # 15 intervals, under the 2 s reset: at most 8 steps
    assert (answer["stepped"], answer["held"], answer["reset"]) == (FIELD, FIELD - 1, False)
    assert answer["context_frames"] == FIELD and answer["steps"] == FIELD + 1
    np.testing.assert_allclose(_probs(answer), ema_reference([A] * FIELD + [B], ALPHA), atol=1e-6)
    assert _see(tracker, state, 1.6, B)["stepped"] == 1  # time moved on by all 15 intervals, not 8


def test_a_gap_beyond_the_reset_timeout_starts_fresh(tracker: TemporalTracker) -> None:
    state = TemporalState("stream")
    for i in range(5):
        _see(tracker, state, i * INTERVAL, A)
    answer = _see(tracker, state, 0.4 + 2.5, B)
    assert answer["reset"] and answer["steps"] == 1 and answer["context_frames"] == 1
    np.testing.assert_allclose(_probs(answer), B, atol=1e-6)


def test_a_stream_clock_going_back_resets_but_an_http_one_is_out_of_order(tracker: TemporalTracker) -> None:
    stream, http = TemporalState("stream"), TemporalState("http")
    for state in (stream, http):
        _see(tracker, state, 10.0, A)
        _see(tracker, state, 10.1, A)
    restarted = _see(tracker, stream, 0.5, B)  # a camera reconnect restarts its PTS
    assert restarted["reset"] and restarted["steps"] == 1
    late = _see(tracker, http, 10.05, B)  # a concurrent request that arrived late: no step, no time travel
    assert (late["stepped"], late["reset"], late["steps"]) == (0, False, 2)
    assert _see(tracker, http, 10.2, C)["stepped"] == 1


def test_changing_clock_starts_fresh(tracker: TemporalTracker) -> None:
    state = TemporalState("http")
    _see(tracker, state, 1.0, A, "source")
    _see(tracker, state, 1.1, A, "source")
    assert _see(tracker, state, 1.2, B, "arrival")["reset"]


def test_label_switches_are_counted_per_answer(temporal_bundle: Path) -> None:
    metrics = ServiceMetrics()
    tracker = open_tracker(load_bundle(temporal_bundle), enabled=True, reset_after_s=5.0, metrics=metrics)
    assert tracker is not None
    state = TemporalState("websocket")
    # per-frame labels A B A B ...: 9 frame switches; the EMA (alpha 0.5) lags and switches less
    for i in range(10):
        _see(tracker, state, i * INTERVAL, A if i % 2 == 0 else B)
    frame = metrics.label_switches.labels("websocket", "frame")._value.get()
    temporal = metrics.label_switches.labels("websocket", "temporal")._value.get()
    assert frame == 9
    assert 0 < temporal < frame


def test_concurrent_observers_of_one_state_never_interleave(temporal_bundle: Path) -> None:
    """Threads stepping one state: every step is taken once and its count seen by exactly one frame."""
    tracker = open_tracker(load_bundle(temporal_bundle), enabled=True, reset_after_s=100.0, metrics=ServiceMetrics())
    assert tracker is not None
    state = TemporalState("http")
    _see(tracker, state, 0.0, A)
    seen: list[tuple[int, int]] = []  # (steps after the frame, steps the frame took)
    lock = threading.Lock()

    def work(offset: int) -> None:
        for i in range(50):
            answer = _see(tracker, state, 0.1 * (1 + offset + 4 * i), B)
            if answer["stepped"]:
                with lock:
                    seen.append((answer["steps"], answer["stepped"]))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    counts = [steps for steps, _ in seen]
    assert len(counts) == len(set(counts))  # no two frames saw the same step count
    assert state.steps == 1 + sum(took for _, took in seen)
    assert state.state is not None
    np.testing.assert_allclose(state.state[0], ema_reference([A] + [B] * (state.steps - 1)), atol=1e-6)


def test_store_bound_and_ttl() -> None:
    metrics = ServiceMetrics()
    store = SessionStore(ttl_s=10.0, max_sessions=3, metrics=metrics)
    first = store.get("a", now=0.0)
    store.get("b", now=1.0)
    store.get("c", now=2.0)
    assert store.get("a", now=3.0) is first  # a is now the most recently used
    store.get("d", now=4.0)  # over the bound: b, the least recently used, goes
    assert "b" not in store and {"a", "c", "d"} <= {k for k in ("a", "c", "d") if k in store}
    assert metrics.temporal_evictions.labels("capacity")._value.get() == 1
    store.get("d", now=13.5)  # a (3.0) and c (2.0) idle past 10 s: expired
    assert len(store) == 1 and "a" not in store and "c" not in store
    assert metrics.temporal_evictions.labels("expired")._value.get() == 2
    assert store.get("a", now=14.0) is not first  # an expired id starts afresh
    assert metrics.temporal_sessions._value.get() == 2
    store.refresh(now=30.0)  # a scrape long after: both idle past the TTL
    assert len(store) == 0 and metrics.temporal_sessions._value.get() == 0
    assert metrics.temporal_evictions.labels("expired")._value.get() == 4


@pytest.mark.parametrize("bad", ["", "x" * 65, "has space", "semi;colon", "ünï", "a/b"])
def test_bad_session_ids_are_refused(bad: str) -> None:
    with pytest.raises(BadInput) as err:
        parse_session(bad)
    assert err.value.code == "bad_session" and err.value.param == "session" and repr(bad[:80]) in err.value.message


def test_good_session_ids_and_times() -> None:
    assert parse_session("0b6f2c6e-4a1f-4e0f-9d2e-1f2a3b4c5d6e") == "0b6f2c6e-4a1f-4e0f-9d2e-1f2a3b4c5d6e"
    assert parse_session("or.42:cam_1") == "or.42:cam_1"
    assert parse_session(None) is None and parse_frame_time(None) is None
    assert parse_frame_time("12.5") == 12.5


@pytest.mark.parametrize("bad", ["abc", "-1", "nan", "inf", ""])
def test_bad_frame_times_are_refused(bad: str) -> None:
    with pytest.raises(BadInput) as err:
        parse_frame_time(bad)
    assert err.value.code == "bad_frame_time" and err.value.param == "t"


def test_bundles_without_a_head_or_turned_off_get_no_tracker(endoarss_bundle: Path, temporal_bundle: Path) -> None:
    assert open_tracker(load_bundle(endoarss_bundle), enabled=True, reset_after_s=5, metrics=ServiceMetrics()) is None
    assert open_tracker(load_bundle(temporal_bundle), enabled=False, reset_after_s=5, metrics=ServiceMetrics()) is None


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("task", "segmentation", "not a classification task"),
        ("input_output", "activity_features", "not an output of task"),
        ("graph", "../elsewhere.onnx", "missing from"),
        ("graph_sha256", None, "no sha256"),
    ],
)
def test_malformed_temporal_blocks_are_refused(
    temporal_bundle: Path, tmp_path: Path, field: str, value: object, message: str
) -> None:
    bundle = tmp_path / "b"
    shutil.copytree(temporal_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["temporal"][field] = value
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_bundle(bundle)


def test_a_features_output_the_graph_lacks_stops_the_engine(temporal_bundle: Path, tmp_path: Path) -> None:
    """A head reading pre-logit features the graph does not produce fails at engine start, not on every frame."""
    from service.engines import EngineOptions, open_engine

    bundle = tmp_path / "b"
    shutil.copytree(temporal_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["tasks"][0]["features_output"] = "activity_features"
    manifest["temporal"]["input_output"] = "activity_features"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    loaded = load_bundle(bundle)
    with pytest.raises(ValueError, match=r"\['activity_features'\] that the graph lacks"):
        open_engine(loaded, "onnxruntime", EngineOptions(device="cpu", threads=1))
