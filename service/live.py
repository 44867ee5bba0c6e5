"""Latest-frame-wins delivery for pushed frames (WebSocket): a capture box faster than the engine gets its newest
frame processed next, older pending ones are dropped and counted, and nothing queues without bound."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Pushed:
    data: bytes
    index: int  # 0-based position in the session's frame sequence
    dropped_before: int  # frames replaced by newer ones since the previous frame was taken
    received_at: float  # time.monotonic() when it arrived (the temporal state's clock)


class LatestSlot:
    """One-slot mailbox: `put` never blocks and replaces an untaken frame; `get` waits for the next frame."""

    def __init__(self) -> None:
        self._item: tuple[bytes, int, float] | None = None
        self._event = asyncio.Event()
        self._closed = False
        self._count = 0
        self._dropped_since_take = 0
        self.dropped = 0

    def put(self, data: bytes) -> bool:
        """Store a frame; returns True when it replaced one that was never processed."""
        replaced = self._item is not None
        if replaced:
            self.dropped += 1
            self._dropped_since_take += 1
        self._item = (data, self._count, time.monotonic())
        self._count += 1
        self._event.set()
        return replaced

    def close(self) -> None:
        self._closed = True
        self._event.set()

    async def get(self) -> Pushed | None:
        """The newest untaken frame, or None once closed and drained."""
        while self._item is None:
            if self._closed:
                return None
            self._event.clear()
            await self._event.wait()
        data, index, received_at = self._item
        self._item = None
        pushed = Pushed(data, index, self._dropped_since_take, received_at)
        self._dropped_since_take = 0
        return pushed
