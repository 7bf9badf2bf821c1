"""Object-storage event notifications, as Cloudflare R2 and S3/MinIO send them, read into one shape.

R2 (through a Queue and a forwarder) sends one JSON object per event:
    {"account", "action": "PutObject" | "CopyObject" | "CompleteMultipartUpload" | "DeleteObject" |
     "LifecycleDeletion", "bucket", "object": {"key", "size", "eTag"}, "eventTime", "copySource"}
S3 and MinIO send {"Records": [{"eventName": "ObjectCreated:Put" | "s3:ObjectRemoved:Delete" | ...,
"s3": {"bucket": {"name"}, "object": {"key" (URL-encoded), "size", "eTag"}}, "eventTime"}]}.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote_plus

import msgspec

from contract.messages import ContractError, undecodable

BUCKET_EVENT = "bucket.event"

Action = Literal["created", "removed", "other"]

_R2_ACTIONS: dict[str, Action] = {
    "PutObject": "created",
    "CopyObject": "created",
    "CompleteMultipartUpload": "created",
    "DeleteObject": "removed",
    "LifecycleDeletion": "removed",
}
_EVENT_NAMESPACE = uuid.UUID("0c7d6a51-2f7e-4b8e-9d61-3f0b8d7c9a24")


@dataclass(frozen=True, slots=True)
class ObjectEvent:
    action: Action
    name: str  # the event's own name: PutObject, ObjectCreated:Put, ...
    bucket: str
    key: str
    size: int | None = None
    etag: str | None = None
    time: str | None = None


class _R2Object(msgspec.Struct):
    key: str
    size: int | None = None
    eTag: str | None = None


class _R2Event(msgspec.Struct):
    action: str
    bucket: str
    object: _R2Object
    eventTime: str | None = None
    account: str | None = None


class _S3Bucket(msgspec.Struct):
    name: str


class _S3Object(msgspec.Struct):
    key: str
    size: int | None = None
    eTag: str | None = None


class _S3Entity(msgspec.Struct):
    bucket: _S3Bucket
    object: _S3Object


class _S3Record(msgspec.Struct):
    eventName: str
    s3: _S3Entity
    eventTime: str | None = None


class _S3Notification(msgspec.Struct):
    Records: list[_S3Record]


def _s3_action(event_name: str) -> Action:
    name = event_name.removeprefix("s3:")
    if name.startswith("ObjectCreated:"):
        return "created"
    if name.startswith("ObjectRemoved:"):
        return "removed"
    return "other"


def parse_bucket_event(body: bytes) -> list[ObjectEvent]:
    """The events in one notification message, or ContractError if it is neither format."""
    try:
        document = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise ContractError("malformed_body", f"bucket event is not valid JSON: {exc}") from None
    except (RecursionError, UnicodeDecodeError) as exc:
        raise ContractError("malformed_body", f"bucket event is not valid JSON: {undecodable(exc)}") from None
    if not isinstance(document, dict):
        raise ContractError("schema_violation", "bucket event must be a JSON object")
    try:
        if "Records" in document:
            notification = msgspec.convert(document, _S3Notification)
            return [
                ObjectEvent(
                    action=_s3_action(record.eventName),
                    name=record.eventName,
                    bucket=record.s3.bucket.name,
                    key=unquote_plus(record.s3.object.key),
                    size=record.s3.object.size,
                    etag=record.s3.object.eTag,
                    time=record.eventTime,
                )
                for record in notification.Records
            ]
        if "action" in document:
            event = msgspec.convert(document, _R2Event)
            return [
                ObjectEvent(
                    action=_R2_ACTIONS.get(event.action, "other"),
                    name=event.action,
                    bucket=event.bucket,
                    key=event.object.key,
                    size=event.object.size,
                    etag=event.object.eTag,
                    time=event.eventTime,
                )
            ]
        if document.get("Event") == "s3:TestEvent":
            return []
    except msgspec.ValidationError as exc:
        raise ContractError("schema_violation", f"bucket event is invalid: {exc}") from None
    raise ContractError(
        "unknown_event_format",
        "bucket event is neither an R2 notification (`action`, `bucket`, `object`) nor S3 `Records`",
    )


def event_message_id(body: bytes) -> str:
    """A stable id for a notification that came without a message_id (MinIO sends none)."""
    return str(uuid.uuid5(_EVENT_NAMESPACE, hashlib.sha256(body).hexdigest()))
