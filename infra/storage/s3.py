"""Cloudflare R2 (or any S3 API) through aiobotocore."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from aiobotocore.config import AioConfig
from aiobotocore.httpsession import AIOHTTPSession
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError
from botocore.handlers import add_expect_header

from infra.storage.base import (
    ObjectInfo,
    ObjectNotFoundError,
    ObjectStore,
    ObjectTooLargeError,
    PreconditionFailedError,
    StorageError,
    StorageUnavailableError,
    StoredObject,
)
from infra.storage.keys import validate_key, validate_prefix

_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
# S3 and R2 answer a failed condition with 412 PreconditionFailed; S3 with 409 ConditionalRequestConflict when
# two conditional writes race
_CONDITION_FAILED = {"PreconditionFailed", "ConditionalRequestConflict", "412"}
# transient whatever their HTTP status: S3 answers a slow upload with 400 RequestTimeout, and a conflicting
# operation still in progress with 409 OperationAborted
_TRANSIENT = {"RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete", "SlowDown", "OperationAborted"}


def _refused_condition(exc: Exception, translated: Exception) -> bool:
    """Whether a conditional put failed its condition (an If-Match on a deleted object counts as failed)."""
    if isinstance(translated, ObjectNotFoundError):
        return True
    if not isinstance(exc, ClientError):
        return False
    code = str(exc.response.get("Error", {}).get("Code", ""))
    return code in _CONDITION_FAILED or (code not in _TRANSIENT and _status(exc) in (409, 412))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _total_size(content_range: str | None) -> int | None:
    """The object's size from a ranged GET's Content-Range ("bytes 0-99/5000"), when it says."""
    total = (content_range or "").rpartition("/")[2]
    return int(total) if total.isdigit() else None


PART_BYTES = 64 * 1024 * 1024
# Each call of an upload in parts (its start, a part, its completion) ends within this long after the one before
# ended, else the upload fails and is aborted: 64 MiB in an hour is 18 KiB/s, slower than any uplink a backup is
# sent over. So an upload that goes on has begun or sent a part within the last two of these (a part's time may be
# when its call began).
PART_SECONDS = 3600.0
# An incomplete upload in parts that has done nothing for this long, as the store's clock dates its start and parts,
# is abandoned (its process stopped, or its abort went unanswered): two PART_SECONDS, and an hour for the store's
# clock against this host's.
ABANDONED_AFTER = timedelta(seconds=2 * PART_SECONDS) + timedelta(hours=1)

log = structlog.get_logger(__name__)


class _PoolBoundedSession(AIOHTTPSession):
    """aiobotocore's HTTP session, whose wait for a free connection of its pool counts towards the connect timeout
    (aiohttp's `connect`: aiobotocore sets only the socket's), so a call queued behind a pool of calls to a store
    that does not answer gives up within the timeout too, instead of waiting for each of them in turn."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        timeout = self._timeout
        self._timeout = aiohttp.ClientTimeout(
            connect=timeout.sock_connect, sock_connect=timeout.sock_connect, sock_read=timeout.sock_read
        )


def _stall_bounded(timeout_seconds: float) -> Callable[[tuple[Any, ...]], socket.socket]:
    """A socket factory for the store's connections: bytes sent may go unacknowledged (a server that stopped
    reading, a network that drops them) at most `timeout_seconds` before the kernel drops the connection
    (TCP_USER_TIMEOUT, Linux), so an upload to a hung store fails instead of waiting for good, while one of any
    size goes on as long as the store takes its bytes."""

    def make(addr_info: tuple[Any, ...]) -> socket.socket:
        family, kind, proto = addr_info[:3]
        sock = socket.socket(family=family, type=kind, proto=proto)
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, round(timeout_seconds * 1000))
        return sock

    return make


class S3Store(ObjectStore):
    name = "r2"
    part_bytes = PART_BYTES  # files larger than this go up in parts of this size (S3's minimum part: 5 MiB)
    part_seconds = PART_SECONDS
    abandoned_after = ABANDONED_AFTER

    def __init__(self, client: Any, bucket: str, stack: contextlib.AsyncExitStack) -> None:
        self._client = client
        self.bucket = bucket
        self._stack = stack

    @classmethod
    async def connect(
        cls,
        *,
        endpoint_url: str,
        bucket: str,
        access_key_id: str,
        secret_access_key: str,
        region: str = "auto",
        timeout_seconds: float,
        max_connections: int,
    ) -> S3Store:
        """A client for the bucket. A store that does not answer for `timeout_seconds` (R2_TIMEOUT_SECONDS) is
        unavailable: to connect (a free pooled connection included), to start its answer or send its next part,
        or to take the next bytes of an upload; a transfer of any size takes as long as it needs while bytes flow.
        At most `max_connections` (R2_MAX_CONNECTIONS) calls are in flight at once; a further one waits for one of
        them to end, and that wait counts towards the connect timeout, so the pool must hold what a process runs
        at once (botocore's 10 failed healthy calls queued behind long transfers)."""
        config = AioConfig(
            max_pool_connections=max_connections,
            connect_timeout=timeout_seconds,
            read_timeout=timeout_seconds,
            # one try per call (botocore's max_attempts would count the retries after it): the processor retries
            # transient failures itself (processor/retrying.py) and the API answers 503 with Retry-After; retries
            # at both levels multiplied into 13 s per job attempt
            retries={"total_max_attempts": 1, "mode": "standard"},
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            http_session_cls=_PoolBoundedSession,
            connector_args={"socket_factory": _stall_bounded(timeout_seconds)},
        )
        stack = contextlib.AsyncExitStack()
        client = await stack.enter_async_context(
            get_session().create_client(
                "s3",
                endpoint_url=endpoint_url,
                region_name=region,
                aws_access_key_id=access_key_id,
                aws_secret_access_key=secret_access_key,
                config=config,
            )
        )
        # botocore asks for "100 Continue" before the body of each PUT, and aiohttp waits for it with no timeout
        # (its read timeout starts once the body is sent): a hung store held every write for good
        client.meta.events.unregister("before-call.s3", add_expect_header)
        return cls(client, bucket, stack)

    @staticmethod
    def _translate(exc: Exception, key: str) -> Exception:
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _NOT_FOUND:
                return ObjectNotFoundError(key)
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code == "NoSuchBucket":
                return StorageUnavailableError(f"bucket does not exist: {exc}")
            if code in _TRANSIENT or status >= 500 or status in (408, 429):
                return StorageUnavailableError(f"object store error on {key!r}: {exc}")
            return StorageError(f"object store refused {key!r}: {exc}")
        return StorageUnavailableError(f"object store unreachable ({type(exc).__name__}: {exc})")

    async def put(
        self,
        key: str,
        data: bytes,
        content_type: str,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
        durable: bool = True,
        background: bool = False,
    ) -> str:
        validate_key(key)
        conditions: dict[str, str] = {}
        if if_none_match:
            conditions["IfNoneMatch"] = "*"
        if if_match is not None:
            conditions["IfMatch"] = f'"{if_match}"'
        try:
            response = await self._client.put_object(
                Bucket=self.bucket, Key=key, Body=data, ContentType=content_type, **conditions
            )
        except (ClientError, BotoCoreError, OSError) as exc:
            translated = self._translate(exc, key)
            if conditions and _refused_condition(exc, translated):
                raise PreconditionFailedError(
                    key, "If-None-Match: *" if if_none_match else f"If-Match: {if_match}"
                ) from exc
            raise translated from exc
        return str(response.get("ETag", "")).strip('"')

    async def put_file(self, key: str, path: Path, content_type: str) -> None:
        validate_key(key)
        try:
            if (await asyncio.to_thread(path.stat)).st_size <= self.part_bytes:
                data = await asyncio.to_thread(path.read_bytes)
                await self._client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)
                return
            await self._put_parts(key, path, content_type)
        except (ClientError, BotoCoreError) as exc:
            raise self._translate(exc, key) from exc

    async def _put_parts(self, key: str, path: Path, content_type: str) -> None:
        """A multipart upload: the object appears only when complete_multipart_upload succeeds. Each call ends within
        `part_seconds` of the one before, else the upload fails (StorageUnavailableError); a failed upload is aborted,
        and one whose abort fails too (the store not answering) is left to remove_abandoned_writes."""
        loop = asyncio.get_running_loop()
        async with self._call_of(key, loop.time() + self.part_seconds):
            upload = await self._client.create_multipart_upload(Bucket=self.bucket, Key=key, ContentType=content_type)
        upload_id = upload["UploadId"]
        try:
            parts = []
            deadline = loop.time() + self.part_seconds
            with path.open("rb") as fh:
                while chunk := await asyncio.to_thread(fh.read, self.part_bytes):
                    number = len(parts) + 1
                    async with self._call_of(key, deadline):
                        sent = await self._client.upload_part(
                            Bucket=self.bucket, Key=key, PartNumber=number, UploadId=upload_id, Body=chunk
                        )
                    parts.append({"ETag": sent["ETag"], "PartNumber": number})
                    deadline = loop.time() + self.part_seconds
            async with self._call_of(key, deadline):
                await self._client.complete_multipart_upload(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
                )
        except BaseException:
            try:
                await self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except (ClientError, BotoCoreError, OSError) as exc:
                # its parts stay in the bucket until remove_abandoned_writes aborts it
                log.warning("multipart_upload_left", key=key, upload_id=upload_id, error=str(self._translate(exc, key)))
            raise

    @contextlib.asynccontextmanager
    async def _call_of(self, key: str, deadline: float) -> AsyncIterator[None]:
        """One call of an upload in parts, which must end by `deadline` (the event loop's clock), else the upload
        fails: remove_abandoned_writes counts on it."""
        try:
            async with asyncio.timeout_at(deadline) as call:
                yield
        except TimeoutError as exc:
            if not call.expired():
                raise
            raise StorageUnavailableError(
                f"object store took over {self.part_seconds:g} s for a call of the upload in parts of {key!r}"
            ) from exc

    async def remove_abandoned_writes(self, prefix: str) -> int:
        """Abort the incomplete uploads in parts under `prefix` that have done nothing for `abandoned_after`: neither
        begun nor sent a part since, as the store dates them (ListMultipartUploads, ListParts). An upload that goes on
        has begun or sent a part within two `part_seconds` (_put_parts), so it is never one of them; returns how many
        it aborted."""
        validate_prefix(prefix)
        idle_since = datetime.now(tz=UTC) - self.abandoned_after
        removed = 0
        try:
            uploads = self._client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=prefix)
            abandoned = [
                upload
                async for page in uploads
                for upload in page.get("Uploads", [])
                if upload["Initiated"] < idle_since
            ]
            for upload in abandoned:
                key, upload_id = upload["Key"], upload["UploadId"]
                if await self._sent_a_part_since(key, upload_id, idle_since):
                    continue
                try:
                    await self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
                except ClientError as exc:
                    if str(exc.response.get("Error", {}).get("Code", "")) != "NoSuchUpload":
                        raise
                    continue  # aborted or completed meanwhile (another processor's sweep)
                removed += 1
                log.info(
                    "multipart_upload_aborted", key=key, upload_id=upload_id, begun=upload["Initiated"].isoformat()
                )
        except (ClientError, BotoCoreError, OSError) as exc:
            raise self._translate(exc, prefix) from exc
        return removed

    async def _sent_a_part_since(self, key: str, upload_id: str, since: datetime) -> bool:
        """Whether the upload sent a part at or after `since`, as the store dates it (ListParts); False when it is
        gone."""
        pages = self._client.get_paginator("list_parts").paginate(Bucket=self.bucket, Key=key, UploadId=upload_id)
        try:
            async for page in pages:
                if any(part["LastModified"] >= since for part in page.get("Parts", [])):
                    return True
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code", "")) != "NoSuchUpload":
                raise
        return False

    async def get_file(self, key: str, path: Path) -> int:
        validate_key(key)
        size = 0
        try:
            response = await self._client.get_object(Bucket=self.bucket, Key=key)
            async with response["Body"] as body:
                with path.open("wb") as fh:
                    async for chunk in body.iter_chunks(1 << 20):
                        await asyncio.to_thread(fh.write, chunk)
                        size += len(chunk)
        except (ClientError, BotoCoreError) as exc:
            raise self._translate(exc, key) from exc
        return size

    async def get(self, key: str, *, max_bytes: int | None = None) -> StoredObject:
        """As ObjectStore.get; with max_bytes, one ranged GET of the first max_bytes + 1 bytes (the ETag is the whole
        object's, and Content-Range says its size)."""
        validate_key(key)
        bounded = {} if max_bytes is None else {"Range": f"bytes=0-{max_bytes}"}
        try:
            try:
                response = await self._client.get_object(Bucket=self.bucket, Key=key, **bounded)
            except ClientError as exc:
                if not bounded or _status(exc) != 416:
                    raise
                # no byte of an empty object is in range: it is read whole
                response = await self._client.get_object(Bucket=self.bucket, Key=key)
            async with response["Body"] as body:
                data = await body.read()
        except (ClientError, BotoCoreError, OSError) as exc:
            raise self._translate(exc, key) from exc
        if max_bytes is not None and len(data) > max_bytes:
            raise ObjectTooLargeError(key, max_bytes, _total_size(response.get("ContentRange")))
        return StoredObject(
            key=key,
            data=data,
            content_type=response.get("ContentType") or "application/octet-stream",
            etag=str(response.get("ETag", "")).strip('"'),
        )

    async def exists(self, key: str) -> bool:
        return await self.size(key) is not None

    async def size(self, key: str) -> int | None:
        validate_key(key)
        try:
            head = await self._client.head_object(Bucket=self.bucket, Key=key)
        except (ClientError, BotoCoreError, OSError) as exc:
            translated = self._translate(exc, key)
            if isinstance(translated, ObjectNotFoundError):
                return None
            raise translated from exc
        return int(head["ContentLength"])

    async def delete(self, key: str, *, if_match: str | None = None) -> bool:
        """As ObjectStore.delete. A conditional one sends If-Match, and is refused here already when the HEAD made
        first finds another version: a store that ignores If-Match on a delete then leaves only the moment between
        the two requests for a write to be lost."""
        validate_key(key)
        try:
            head = await self._client.head_object(Bucket=self.bucket, Key=key)
        except (ClientError, BotoCoreError, OSError) as exc:
            translated = self._translate(exc, key)
            if not isinstance(translated, ObjectNotFoundError):
                raise translated from exc
            head = None
        condition = {} if if_match is None else {"IfMatch": f'"{if_match}"'}
        if condition and (head is None or str(head.get("ETag", "")).strip('"') != if_match):
            raise PreconditionFailedError(key, f"If-Match: {if_match}")
        try:
            await self._client.delete_object(Bucket=self.bucket, Key=key, **condition)
        except (ClientError, BotoCoreError, OSError) as exc:
            translated = self._translate(exc, key)
            if condition and _refused_condition(exc, translated):
                raise PreconditionFailedError(key, f"If-Match: {if_match}") from exc
            raise translated from exc
        return head is not None

    async def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        validate_prefix(prefix)
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    yield ObjectInfo(key=item["Key"], size=int(item["Size"]), modified=item["LastModified"])
        except (ClientError, BotoCoreError, OSError) as exc:
            raise self._translate(exc, prefix) from exc

    async def presigned_get_url(self, key: str, ttl_seconds: int) -> str:
        validate_key(key)
        return await self._client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=ttl_seconds
        )

    async def ping(self) -> None:
        try:
            await self._client.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError, OSError) as exc:
            # a ClientError has a response; a dropped connection's error (ConnectionClosedError) has None
            code = str(((getattr(exc, "response", None) or {}).get("Error") or {}).get("Code", ""))
            if code in _NOT_FOUND | {"NoSuchBucket"}:
                raise StorageUnavailableError(f"bucket {self.bucket!r} does not exist") from exc
            raise self._translate(exc, self.bucket) from exc

    async def close(self) -> None:
        await self._stack.aclose()
