"""Frames between the index client and the engine process: a 4-byte length, then a msgpack body."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import msgspec

from infra.vectors.base import ImageFilter

_LENGTH = struct.Struct(">I")
MAX_FRAME = 1 << 30

# The version of the ops below: bump it whenever an op is added, removed or changed (its fields, its reply or what
# it does), so that a client and an engine of different code tell each other apart at the handshake.
PROTOCOL_VERSION = 1


class Handshake(msgspec.Struct, tag="handshake"):
    """A client's first request, with its PROTOCOL_VERSION; the reply is a Greeting. Never changed, so that code
    of any version can ask it. An engine from before versions drops the connection instead (as on any request it
    cannot decode): that engine speaks version 0."""

    protocol: int


class Greeting(msgspec.Struct):
    protocol: int


class Create(msgspec.Struct, tag="create"):
    model_id: str
    dim: int


class Upsert(msgspec.Struct, tag="upsert"):
    """Points in one block: `vectors` holds len(ids) float32 rows (native byte order), one per id."""

    ids: list[str]
    vectors: bytes
    payloads: list[dict[str, Any]]


class Delete(msgspec.Struct, tag="delete"):
    ids: list[str]


class Retrieve(msgspec.Struct, tag="retrieve"):
    ids: list[str]


class Vector(msgspec.Struct, tag="vector"):
    """One point's vector: float32 bytes (native byte order), or None when there is no such point."""

    id: str


class Search(msgspec.Struct, tag="search"):
    vector: bytes
    limit: int
    filter: ImageFilter | None = None


class Newest(msgspec.Struct, tag="newest"):
    """Points newest first (created_us descending; those of one microsecond in no set order)."""

    limit: int
    filter: ImageFilter | None = None


class InIdOrder(msgspec.Struct, tag="in_id_order"):
    """Points in id order, from `start_id` (inclusive) when given."""

    limit: int
    start_id: str | None = None
    filter: ImageFilter | None = None


class Count(msgspec.Struct, tag="count"):
    filter: ImageFilter | None = None


class Describe(msgspec.Struct, tag="describe"):
    pass


class Snapshot(msgspec.Struct, tag="snapshot"):
    pass


class Install(msgspec.Struct, tag="install"):
    source: str
    model_id: str
    dim: int
    replace: bool = False


class MarkMigrated(msgspec.Struct, tag="mark_migrated"):
    source: str


class Build(msgspec.Struct, tag="build"):
    wait: bool = False


class Shutdown(msgspec.Struct, tag="shutdown"):
    pass


Operation = (
    Handshake
    | Create
    | Upsert
    | Delete
    | Retrieve
    | Vector
    | Search
    | Newest
    | InIdOrder
    | Count
    | Describe
    | Snapshot
    | Install
    | MarkMigrated
    | Build
    | Shutdown
)


class Request(msgspec.Struct, array_like=True):
    id: int
    op: Operation


class Failure(msgspec.Struct):
    kind: str  # mismatch | no_index | exists | invalid | unavailable
    message: str


class Reply(msgspec.Struct, array_like=True):
    id: int
    result: Any = None
    error: Failure | None = None


class Hello(msgspec.Struct, kw_only=True):
    """The engine's first line on stdout: ready (with what it holds), or why it could not start."""

    ready: bool
    has_index: bool = False
    model_id: str | None = None
    dim: int | None = None
    error: str | None = None
    kind: str | None = None


_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(Request)
_reply_decoder = msgspec.msgpack.Decoder(Reply)


def frame(message: Request | Reply) -> bytes:
    body = _encoder.encode(message)
    return _LENGTH.pack(len(body)) + body


async def _read_body(reader: asyncio.StreamReader) -> bytes | None:
    try:
        header = await reader.readexactly(_LENGTH.size)
    except asyncio.IncompleteReadError:
        return None
    (length,) = _LENGTH.unpack(header)
    if length > MAX_FRAME:
        raise ValueError(f"frame of {length} bytes is over the {MAX_FRAME}-byte limit")
    return await reader.readexactly(length)


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    body = await _read_body(reader)
    return None if body is None else _request_decoder.decode(body)


async def read_reply(reader: asyncio.StreamReader) -> Reply | None:
    body = await _read_body(reader)
    return None if body is None else _reply_decoder.decode(body)
