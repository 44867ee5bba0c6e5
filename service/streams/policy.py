"""What FFmpeg may open for a stream source: the only network or file access is to the URL the allowlist checked.

`sources.validate_source` checks the URL a client submits, but FFmpeg then opens more URLs by itself: its HTTP
protocol follows redirects (up to 8, to any host), and playlist and reference demuxers (HLS, DASH, concat, SDP, ...)
open every URL their playlist names, over any protocol FFmpeg has. Either one turns an allowlisted origin into a
proxy to any host (server-side request forgery). Validating each URL FFmpeg opens is impossible from PyAV or OpenCV,
so the options below make FFmpeg open nothing but the first URL:

- `max_redirects=0`: an HTTP redirect is an error (list the final URL of a camera behind a redirect instead);
- `format_whitelist`: only single-stream container demuxers; no demuxer that reads URLs out of its input;
- `protocol_whitelist`: only the protocols the source's scheme needs (inherited by every nested open).

FFmpeg's RTSP demuxer also follows RTSP 3xx redirects, with no option to refuse them; only the network (egress
rules for the service) stops an allowlisted RTSP server from redirecting elsewhere. See README "Operations".
"""

from __future__ import annotations

from urllib.parse import urlsplit

# Container demuxers that read one input and open nothing else (FFmpeg matches any name in "mov,mp4,m4a,...").
DEMUXERS = ("rtsp", "mpjpeg", "mjpeg", "mov", "matroska", "avi", "mpegts", "flv", "h264", "hevc")
# The protocols each source scheme needs; FFmpeg checks nested opens (TLS under HTTPS, TCP under RTSP) against it.
PROTOCOLS = {
    "rtsp": ("tcp",),  # RTSP over TCP (rtsp_transport=tcp): no UDP/RTP sockets to other ports or hosts
    "rtsps": ("tls", "tcp"),
    "http": ("http", "tcp"),
    "https": ("https", "tls", "tcp"),
    "file": ("file",),
}


def ffmpeg_options(target: str) -> dict[str, str]:
    """FFmpeg open options that confine an open of `target` (a URL or a local path) to `target` itself."""
    scheme = urlsplit(target).scheme.lower() or "file"
    protocols = PROTOCOLS.get(scheme)
    if protocols is None:
        raise ValueError(f"no FFmpeg policy for scheme {scheme!r}; stream sources use one of {sorted(PROTOCOLS)}")
    options = {"protocol_whitelist": ",".join(protocols), "format_whitelist": ",".join(DEMUXERS)}
    if scheme in ("http", "https"):
        options["max_redirects"] = "0"
    return options


def opencv_options() -> str:
    """The same confinement for OpenCV, whose FFmpeg options are one process-wide string for every scheme."""
    protocols = sorted({p for names in PROTOCOLS.values() for p in names})
    # OPENCV_FFMPEG_CAPTURE_OPTIONS separates keys and values with ';' and pairs with '|', so commas are safe
    return f"protocol_whitelist;{','.join(protocols)}|format_whitelist;{','.join(DEMUXERS)}|max_redirects;0"
