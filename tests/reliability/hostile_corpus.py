"""A corpus of hostile and broken frames, built from valid ones: every defect class a careless client or an attacker
sends, in each accepted format, plus other formats under an image content type. Deterministic for a seed.

Each item is (name, bytes). None of them may cost the service a 5xx or a connection; most must be refused with a
400 naming the frame, and random mutations that still decode may be answered 200.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator

import numpy as np
from PIL import Image


def _encode(image: np.ndarray, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **params)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes, crc: int | None = None) -> bytes:
    crc = zlib.crc32(kind + data) if crc is None else crc
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc & 0xFFFFFFFF)


def _png(
    width: int, height: int, depth: int = 8, colour: int = 2, extra: bytes = b"", idat: bytes | None = None
) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    if idat is None:
        row = b"\0" + b"\x80" * (width * 3)
        idat = zlib.compress(row * height)
    return (
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + extra + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    )


def _bmp(header_size: int = 40, bits: int = 24, compression: int = 0, width: int = 8, height: int = 8) -> bytes:
    pixels = bytes(min(max(width * abs(height) * max(bits, 8) // 8, 0), 4096))  # declared sizes may lie
    offset = 14 + header_size
    info = struct.pack("<IiiHHIIiiII", header_size, width, height, 1, bits, compression, len(pixels), 0, 0, 0, 0)
    # a header size the format does not have: the declared size, with the standard fields cut or padded to it
    info = info[:header_size].ljust(header_size, b"\0")
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + info + pixels


def structured(valid: dict[str, bytes]) -> Iterator[tuple[str, bytes]]:
    """Named defects: truncations, chunk bombs, odd headers, foreign formats. `valid`: format -> a good frame."""
    for fmt, data in valid.items():
        for share in (0.0001, 0.01, 0.1, 0.5, 0.9, 0.999):
            yield f"{fmt} truncated to {share:.2%}", data[: max(int(len(data) * share), 1)]
        yield f"{fmt} header only", data[:64]
        yield f"{fmt} with a zeroed body", data[:100] + bytes(len(data) - 100)
        yield f"{fmt} twice", data + data
    # PNG: chunk bombs and broken chunks (Pillow refuses decompressed text over its MAX_TEXT_CHUNK with ValueError)
    bomb = zlib.compress(b"\0" * (8 << 20), 9)
    yield "PNG zTXt bomb", _png(8, 8, extra=_png_chunk(b"zTXt", b"k\0\0" + bomb))
    yield "PNG iCCP bomb", _png(8, 8, extra=_png_chunk(b"iCCP", b"p\0\0" + bomb))
    yield "PNG iTXt bomb", _png(8, 8, extra=_png_chunk(b"iTXt", b"k\0\1\0\0\0" + bomb))
    yield "PNG huge tEXt", _png(8, 8, extra=_png_chunk(b"tEXt", b"k\0" + b"a" * (2 << 20)))
    yield "PNG bad IHDR crc", _png(8, 8)[:29] + b"\0\0\0\0" + _png(8, 8)[33:]
    yield "PNG bad IDAT", _png(8, 8, idat=b"not zlib at all")
    yield "PNG IDAT bomb", _png(8, 8, idat=zlib.compress(b"\0" * (32 << 20), 9))
    yield "PNG zero size", _png(0, 0)
    yield "PNG 30000x30000 header", _png(30000, 30000, idat=zlib.compress(b"\0"))
    for depth, colour in ((3, 2), (16, 3), (1, 2), (8, 5), (7, 0)):
        yield f"PNG depth {depth} colour {colour}", _png(8, 8, depth, colour)
    # BMP: unsupported header sizes, compressions, bit depths, sizes
    for header_size in (12, 16, 52, 56, 64, 108, 124, 200, 7):
        yield f"BMP header size {header_size}", _bmp(header_size=header_size)
    for compression in (1, 2, 3, 4, 5, 6, 99):
        yield f"BMP compression {compression}", _bmp(compression=compression)
    for bits in (0, 2, 7, 12, 48, 64):
        yield f"BMP {bits} bits", _bmp(bits=bits)
    for width, height in ((-8, 8), (8, -8), (0, 8), (1 << 30, 1), (65535, 65535)):
        yield f"BMP {width}x{height}", _bmp(width=width, height=height)
    # other formats and non-images under an image content type
    image = np.full((16, 16, 3), 90, np.uint8)
    for fmt in ("WEBP", "GIF", "TIFF", "ICO", "PPM", "TGA", "PCX", "EPS", "PDF", "JPEG2000"):
        try:
            yield f"{fmt} body", _encode(image, fmt)
        except (KeyError, OSError):  # a format this Pillow cannot write: nothing to send
            continue
    yield "SVG", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'
    yield "HTML", b"<html><body>hello</body></html>"
    yield "JSON", b'{"source": "rtsp://10.0.0.1/"}'
    yield "zeros", bytes(4096)
    yield "one byte", b"\xff"
    yield "JPEG SOI only", b"\xff\xd8"
    yield "JPEG SOI + EOI", b"\xff\xd8\xff\xd9"


def mutated(valid: dict[str, bytes], count: int, seed: int = 0) -> Iterator[tuple[str, bytes]]:
    """`count` random mutations: flipped bytes in the header region, spliced or dropped blocks, random tails."""
    rng = np.random.default_rng(seed)
    formats = sorted(valid)
    for i in range(count):
        fmt = formats[i % len(formats)]
        data = bytearray(valid[fmt])
        kind = i % 4
        if kind == 0:  # header bytes flipped
            for pos in rng.integers(0, min(len(data), 256), size=int(rng.integers(1, 8))):
                data[pos] = int(rng.integers(0, 256))
        elif kind == 1:  # bytes anywhere
            for pos in rng.integers(0, len(data), size=int(rng.integers(1, 32))):
                data[pos] = int(rng.integers(0, 256))
        elif kind == 2:  # a block dropped
            start = int(rng.integers(0, len(data)))
            del data[start : start + int(rng.integers(1, 4096))]
        else:  # random tail
            cut = int(rng.integers(8, len(data)))
            data[cut:] = rng.integers(0, 256, size=int(rng.integers(0, 2048)), dtype=np.uint8).tobytes()
        yield f"{fmt} mutation {i} (kind {kind})", bytes(data)
