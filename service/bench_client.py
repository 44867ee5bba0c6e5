"""The benches' HTTP client: keep-alive HTTP/1.1 connections that send prebuilt requests.

The benches run on the same machine as the service. httpx (pure-Python h11) spends 2-3 ms of CPU sending one
1080p JPEG and reading its reply; on a 2-core box that is time taken from the server and added to every latency
the bench reports. Writing a request prepared once and reading the reply's head and body costs microseconds, so
what the bench measures is the service, and what a capture box's own client costs stays out of it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping


class RawConnection:
    """One keep-alive connection; `request` writes prebuilt bytes and returns (status, headers, body)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, url: str) -> RawConnection:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        return cls(*await asyncio.open_connection(host, int(port)))

    async def request(self, raw: bytes) -> tuple[int, dict[str, str], bytes]:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return int(lines[0].split(" ", 2)[1]), headers, body

    def close(self) -> None:
        self.writer.close()


def post_request(body: bytes, params: Mapping[str, str] | None = None, content_type: str = "image/jpeg") -> bytes:
    """A complete `POST /infer` request carrying `body`, ready to write."""
    query = "&".join(f"{k}={v}" for k, v in (params or {}).items())
    target = f"/infer?{query}" if query else "/infer"
    head = (
        f"POST {target} HTTP/1.1\r\nHost: bench\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body
