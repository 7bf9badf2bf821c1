"""Hostile files: a decompression bomb PNG and a truncated JPEG."""

from __future__ import annotations

import struct
import zlib

from tests.support.images import encoded


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(side: int = 12000) -> bytes:
    """A 1-bit PNG of side x side pixels, all zero: tiny on disk, huge once decoded."""
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    row = b"\x00" * (1 + (side + 7) // 8)
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def truncated_jpeg() -> bytes:
    data = encoded(5, "JPEG", size=(256, 256))
    return data[: len(data) // 2]
