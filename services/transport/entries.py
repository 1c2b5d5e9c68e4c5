"""Stream entries and what they hold: the one place that turns an entry into a message.

Every entry of a message stream is decoded by :func:`decode_entry`, whichever way it was read
(a consumer group's delivery, the newest weights, a follower, the unacked recount), into either
a :class:`Delivery` or a :class:`DeadLetter` that says why the entry carries no usable message.
Dead-letter records themselves are written and read back through :class:`DeadLetter`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from services.core.schemas import (
    Message,
    PromptMessage,
    SchemaError,
    ScoredGroup,
    WeightAnnouncement,
    WireLimits,
    clip,
    decode,
)
from services.transport import names

M = TypeVar("M", PromptMessage, ScoredGroup, WeightAnnouncement)

TRIMMED = "trimmed from the stream (MAXLEN) before it was acknowledged"


@dataclass(frozen=True)
class RawEntry:
    """A stream entry as a backend returns it; ``fields`` is None when it was trimmed away."""

    entry_id: str
    fields: dict[bytes, bytes] | None
    delivery_count: int = 1  # 0 for reads outside a consumer group


def message_id(msg: Message) -> str:
    """The stable id a message is known by everywhere (a prompt and its group share it)."""
    if isinstance(msg, PromptMessage):
        return msg.prompt_id
    if isinstance(msg, ScoredGroup):
        return msg.group_id
    return f"weights:{msg.version}"


@dataclass(frozen=True)
class Delivery(Generic[M]):
    """One entry handed to a consumer: decoded and validated, still pending until acked."""

    stream: str
    group: str  # "" for reads outside a consumer group (latest, follow, unacked)
    consumer: str
    entry_id: str
    message: M
    raw: bytes
    delivery_count: int  # 1 on first delivery; grows with every redelivery

    @property
    def message_id(self) -> str:
        return message_id(self.message)


@dataclass(frozen=True)
class DeadLetter:
    """An entry given up on: where it came from and why (a record of the dead-letter stream)."""

    stream: str
    group: str
    consumer: str
    source_id: str  # id the entry had in its own stream ("" when it never had one)
    reason: str
    deliveries: int
    message_id: str  # prompt/group id when the payload decoded, else ""
    payload: bytes
    at: float
    entry_id: str = ""  # id in the dead-letter stream, once written

    @classmethod
    def of(cls, delivery: Delivery[M], reason: str) -> DeadLetter:
        d = delivery
        origin = (d.stream, d.group, d.consumer, d.entry_id)
        return cls(*origin, reason, d.delivery_count, d.message_id, d.raw, time.time())

    @classmethod
    def of_payload(cls, stream: str, payload: bytes, reason: str) -> DeadLetter:
        """A payload that never made it into a stream."""
        try:
            mid = message_id(decode(payload))
        except SchemaError:
            mid = ""
        return cls(stream, "", "", "", reason, 0, mid, bytes(payload), time.time())

    def fields(self) -> dict[bytes, bytes]:
        return {
            names.DL_STREAM: self.stream.encode(),
            names.DL_GROUP: self.group.encode(),
            names.DL_CONSUMER: self.consumer.encode(),
            names.DL_ENTRY_ID: self.source_id.encode(),
            names.DL_REASON: self.reason.encode(),
            names.DL_DELIVERIES: str(self.deliveries).encode(),
            names.DL_MESSAGE_ID: self.message_id.encode(),
            names.DL_PAYLOAD: self.payload,
            names.DL_AT: repr(self.at).encode(),
        }

    @classmethod
    def from_entry(cls, raw: RawEntry) -> DeadLetter:
        """A record read back; fields a foreign writer left out or garbled read as empty."""
        f = raw.fields if isinstance(raw.fields, dict) else {}

        def blob(key: bytes) -> bytes:
            value = f.get(key, b"")
            return bytes(value) if isinstance(value, (bytes, bytearray)) else b""

        def text(key: bytes) -> str:
            return blob(key).decode("utf-8", "replace")

        return cls(
            stream=text(names.DL_STREAM),
            group=text(names.DL_GROUP),
            consumer=text(names.DL_CONSUMER),
            source_id=text(names.DL_ENTRY_ID),
            reason=text(names.DL_REASON),
            deliveries=_number(text(names.DL_DELIVERIES), int, 0),
            message_id=text(names.DL_MESSAGE_ID),
            payload=blob(names.DL_PAYLOAD),
            at=_number(text(names.DL_AT), float, 0.0),
            entry_id=raw.entry_id,
        )


_N = TypeVar("_N", int, float)


def _number(text: str, kind: type[_N], default: _N) -> _N:
    """A number of a record written by anyone: ``default`` where it is none."""
    try:
        return kind(text) if text and len(text) <= 64 else default
    except ValueError:
        return default


def decode_entry(
    raw: RawEntry,
    kind: str | None,
    stream: str,
    group: str = "",
    consumer: str = "",
    *,
    limits: WireLimits | None = None,
    max_deliveries: int | None = None,
) -> Delivery[Any] | DeadLetter:
    """The message an entry of ``stream`` carries, or why it carries none; never raises.

    ``kind`` is the message kind the stream carries (None: any); a message of another kind is
    rejected like a corrupt one. ``limits`` bounds every field. An entry delivered more than
    ``max_deliveries`` times is given up on before its payload is decoded again: if decoding
    is what kept failing, it must not get another chance to.
    """
    try:
        return _decode_entry(raw, kind, stream, group, consumer, limits, max_deliveries)
    except Exception as exc:  # whatever the entry holds, it becomes a dead letter, not a wedge
        reason = clip(f"undecodable: {type(exc).__name__}: {exc}")
        payload = raw.fields.get(names.PAYLOAD_FIELD) if isinstance(raw.fields, dict) else None
        return _reject(raw, stream, group, consumer, reason, payload)


def _reject(
    raw: RawEntry, stream: str, group: str, consumer: str, reason: str, payload: object = b""
) -> DeadLetter:
    kept = bytes(payload) if isinstance(payload, (bytes, bytearray)) else b""
    origin = (stream, group, consumer, raw.entry_id)
    return DeadLetter(*origin, reason, raw.delivery_count, "", kept, time.time())


def _decode_entry(
    raw: RawEntry,
    kind: str | None,
    stream: str,
    group: str,
    consumer: str,
    limits: WireLimits | None,
    max_deliveries: int | None,
) -> Delivery[Any] | DeadLetter:
    if raw.fields is None:
        return _reject(raw, stream, group, consumer, TRIMMED)
    payload = raw.fields.get(names.PAYLOAD_FIELD)
    if max_deliveries is not None and raw.delivery_count > max_deliveries:
        reason = (
            f"delivered {raw.delivery_count} times, more than max_deliveries={max_deliveries} "
            "(not decoded again)"
        )
        return _reject(raw, stream, group, consumer, reason, payload)
    if payload is None:
        have = sorted(repr(k) for k in raw.fields)
        reason = clip(f"entry has no 'p' field (fields: {', '.join(have)})")
        return _reject(raw, stream, group, consumer, reason)
    try:
        msg = decode(payload, expect=kind, limits=limits)
    except SchemaError as exc:
        return _reject(raw, stream, group, consumer, clip(f"undecodable: {exc}"), payload)
    return Delivery(stream, group, consumer, raw.entry_id, msg, payload, raw.delivery_count)
