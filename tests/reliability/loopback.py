"""Loopback network fixtures for fault tests: a dead port, a black hole that accepts and never answers, an HTTP
origin that redirects and serves HLS playlists, and a sink that counts every connection it gets. 127.0.0.1 only."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Callable

LOOPBACK = "127.0.0.1"


def closed_port() -> int:
    """A port nothing listens on: connecting is refused at once (a camera that is switched off)."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


class BlackHole:
    """Accepts TCP connections and never sends a byte (a hung camera): every open blocks until its timeout."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind((LOOPBACK, 0))
        self._sock.listen(64)
        self.port = int(self._sock.getsockname()[1])
        self.accepted = 0
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.accepted += 1
            self._held.append(conn)

    def close(self) -> None:
        self._sock.close()
        for conn in self._held:
            conn.close()


class Sink:
    """Counts every TCP connection (whatever protocol it speaks): an SSRF target that must stay untouched."""

    def __init__(self) -> None:
        self._hole = BlackHole()
        self.port = self._hole.port
        self.url = f"http://{LOOPBACK}:{self.port}"

    @property
    def hits(self) -> int:
        return self._hole.accepted

    def close(self) -> None:
        self._hole.close()


Route = Callable[[http.server.BaseHTTPRequestHandler], None]


class HttpOrigin:
    """A threaded HTTP server; `routes` maps a path to a handler that writes the whole response."""

    def __init__(self, routes: dict[str, Route]) -> None:
        table = routes

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                route = table.get(self.path.split("?")[0])
                if route is None:
                    self.send_error(404)
                else:
                    route(self)

            def log_message(self, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self.url = f"http://{LOOPBACK}:{self.port}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def redirect_to(location: str, status: int = 302) -> Route:
    def route(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    return route


def serve_bytes(body: bytes, content_type: str) -> Route:
    def route(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    return route


def hls_playlist(*uris: str) -> bytes:
    """A media playlist (VOD, 2 s segments) naming `uris`, or a master playlist when they end in .m3u8."""
    if uris and all(u.endswith(".m3u8") for u in uris):
        lines = ["#EXTM3U"] + [f"#EXT-X-STREAM-INF:BANDWIDTH=500000\n{u}" for u in uris]
    else:
        lines = ["#EXTM3U", "#EXT-X-VERSION:3", "#EXT-X-TARGETDURATION:2", "#EXT-X-MEDIA-SEQUENCE:0"]
        lines += [f"#EXTINF:2.0,\n{u}" for u in uris] + ["#EXT-X-ENDLIST"]
    return ("\n".join(lines) + "\n").encode()
