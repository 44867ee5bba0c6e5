"""CPU time of a process and of some of its threads, from Linux's /proc (what `bench http` splits per frame).

The engine's threads are the ones a freshly started service has once it reports ready: the engine worker and the
runtime's own pool (ONNX Runtime's intra-op threads, torch's), all created while the engine opens and warms up.
Request threads (the frame pool, asyncio's executor) only start with the first request, and the main thread is the
event loop. So `engine_threads(pid)`, called after `/readyz` and before any frame, names the engine's threads, and
everything else the process spends is the CPU cost of serving frames outside the engine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_seconds(path: Path) -> float:
    """utime + stime of a /proc stat file, in seconds (fields 14 and 15, counted after the command's parentheses)."""
    text = path.read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def engine_threads(pid: int) -> frozenset[int]:
    """Thread ids of `pid` other than its main thread: the engine's, when called as the module docstring says."""
    return frozenset(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid)


@dataclass(frozen=True)
class CpuSample:
    process_s: float  # every thread, ended ones included
    engine_s: float  # the engine threads still alive

    def __sub__(self, other: CpuSample) -> CpuSample:
        return CpuSample(self.process_s - other.process_s, self.engine_s - other.engine_s)


def sample(pid: int, engine: frozenset[int]) -> CpuSample:
    """CPU seconds used so far by process `pid` and by its `engine` threads."""
    engine_s = 0.0
    for tid in engine:
        try:
            engine_s += _stat_seconds(Path(f"/proc/{pid}/task/{tid}/stat"))
        except FileNotFoundError:  # a runtime thread that ended: its time stays in the process total
            continue
    return CpuSample(_stat_seconds(Path(f"/proc/{pid}/stat")), engine_s)


def supported() -> bool:
    return Path("/proc/self/task").is_dir()
