"""Which stream URLs the service may open: scheme check, normalisation, allowlist, credential redaction.

A stream URL comes from an API client and is handed to FFmpeg, so an unchecked one lets a client make the server
read local files or reach internal hosts (SSRF). The operator lists allowed prefixes in ENDOSTREAM_STREAM_ALLOWLIST;
a URL is allowed when its normalised form starts with a normalised prefix on a path-segment boundary.

Normalisation: lower-case scheme and host, default port dropped, credentials removed (they are kept for opening but
never take part in matching, so `http://allowed.example@evil/` is matched as host `evil`), dot segments resolved
(`file:/data/../etc/passwd` is `/etc/passwd`; file paths also resolve symlinks). Encoded dots, slashes and
backslashes, several `@`, whitespace and control characters are refused outright rather than guessed at, because
FFmpeg and this module could read them differently.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Sequence
from urllib.parse import SplitResult, quote, unquote, urlsplit, urlunsplit

ALLOWED_SCHEMES = ("rtsp", "rtsps", "http", "https", "file")
DEFAULT_PORTS = {"rtsp": 554, "rtsps": 322, "http": 80, "https": 443}
ALLOWLIST_ENV = "ENDOSTREAM_STREAM_ALLOWLIST"

_FORBIDDEN = re.compile(r"[\x00-\x20\x7f\\]")
_ENCODED_PATH = re.compile(r"%(2e|2f|5c|00)", re.IGNORECASE)
_SECRET_QUERY = re.compile(r"(?i)\b(password|passwd|pwd|token|access_token|key|secret|signature|sig|auth)=([^&#]*)")


class SourceNotAllowed(ValueError):
    """The URL is malformed, uses another scheme, or matches no allowlist prefix."""


def redact(url: str) -> str:
    """`url` with credentials and secret-looking query values replaced by `***` (for logs, errors and the API)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    query = _SECRET_QUERY.sub(r"\1=***", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _reject(url: str, why: str) -> SourceNotAllowed:
    return SourceNotAllowed(f"stream source {redact(url)!r} is not allowed: {why}")


def _split(url: str) -> SplitResult:
    if not isinstance(url, str) or not url:
        raise SourceNotAllowed(f"stream source must be a non-empty URL string; got {url!r}")
    if _FORBIDDEN.search(url):
        raise _reject(url, "it contains whitespace, control characters or backslashes")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a non-numeric or out-of-range port
    except ValueError as err:
        raise _reject(url, f"it does not parse as a URL ({err})") from None
    if _ENCODED_PATH.search(parts.path):
        raise _reject(url, "its path contains encoded dots, slashes, backslashes or NUL")
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        raise _reject(url, f"scheme {parts.scheme or '(none)'!r} is not one of {', '.join(ALLOWED_SCHEMES)}")
    if parts.netloc.count("@") > 1:
        raise _reject(url, "it has more than one '@' in the host part")
    return parts


def _file_path(parts: SplitResult, url: str) -> str:
    if parts.hostname not in (None, "", "localhost"):
        raise _reject(url, f"file URLs must name a local path (file:///path), not host {parts.hostname!r}")
    if parts.query or parts.fragment:
        raise _reject(url, "file URLs take no query or fragment")
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise _reject(url, "file URLs need an absolute path (file:///data/clip.mp4)")
    # realpath, not only normpath: a symlink inside an allowed folder must not lead out of it.
    return os.path.realpath(path)


def normalize(url: str, *, keep_credentials: bool = False) -> str:
    """Canonical form of a stream URL; raises `SourceNotAllowed` for malformed URLs and other schemes.

    Args:
        url: rtsp, rtsps, http, https or file URL.
        keep_credentials: keep `user:pass@` (for opening the stream); matching always drops them.
    """
    parts = _split(url)
    scheme = parts.scheme.lower()
    if scheme == "file":
        return "file://" + quote(_file_path(parts, url))
    host = (parts.hostname or "").lower()
    if not host:
        raise _reject(url, "it names no host")
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    port = parts.port
    netloc = host if port in (None, DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    if keep_credentials and "@" in parts.netloc:
        netloc = parts.netloc.rpartition("@")[0] + "@" + netloc
    path = posixpath.normpath(parts.path) if parts.path else ""
    if path == ".":
        path = ""
    if path.startswith("//"):  # normpath keeps a leading '//' (POSIX); it is one root for a URL path
        path = "/" + path.lstrip("/")
    if parts.path.endswith("/") and path != "/" and path:
        path += "/"
    return urlunsplit((scheme, netloc, path, parts.query, ""))


def _prefix_match(url: str, prefix: str) -> bool:
    if not url.startswith(prefix):
        return False
    if len(url) == len(prefix) or prefix.endswith("/"):
        return True
    # A prefix matches whole path segments only: rtsp://cam1 must not allow rtsp://cam10 or rtsp://cam1.evil.net.
    return url[len(prefix)] in "/?"


def is_allowed(url: str, allowlist: Sequence[str]) -> bool:
    """Whether `url` starts with one of the `allowlist` prefixes (both normalised); an empty list allows nothing."""
    try:
        target = normalize(url)
    except SourceNotAllowed:
        return False
    for entry in allowlist:
        try:
            prefix = normalize(entry.strip())
        except SourceNotAllowed:
            continue  # a bad allowlist entry allows nothing; check_allowlist reports it at start-up
        if _prefix_match(target, prefix):
            return True
    return False


def check_allowlist(allowlist: Sequence[str]) -> list[str]:
    """Normalised allowlist entries; raises ValueError naming the first entry that is not a valid prefix."""
    out = []
    for entry in allowlist:
        try:
            out.append(normalize(entry.strip()))
        except SourceNotAllowed as err:
            raise ValueError(f"{ALLOWLIST_ENV} entry {redact(entry)!r} is invalid: {err}") from None
    return out


def validate_source(url: str, allowlist: Sequence[str]) -> str:
    """The URL to open (normalised, credentials kept); raises `SourceNotAllowed` naming the fix if not allowed."""
    target = normalize(url, keep_credentials=True)
    if not is_allowed(url, allowlist):
        where = "the allowlist is empty" if not allowlist else "it matches no allowlist prefix"
        raise _reject(url, f"{where}; add a prefix such as {redact(_suggest(url))!r} to {ALLOWLIST_ENV}")
    return target


def _suggest(url: str) -> str:
    """A prefix an operator could allowlist: the host for network URLs, the folder for files."""
    target = normalize(url)
    parts = urlsplit(target)
    if parts.scheme == "file":
        return "file://" + posixpath.dirname(parts.path) + "/"
    return f"{parts.scheme}://{parts.netloc}/"
