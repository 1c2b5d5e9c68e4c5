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
        f = raw.fields or {}

        def text(key: bytes) -> str:
            return f.get(key, b"").decode("utf-8", "replace")

        return cls(
            stream=text(names.DL_STREAM),
            group=text(names.DL_GROUP),
            consumer=text(names.DL_CONSUMER),
            source_id=text(names.DL_ENTRY_ID),
            reason=text(names.DL_REASON),
            deliveries=int(text(names.DL_DELIVERIES) or 0),
            message_id=text(names.DL_MESSAGE_ID),
            payload=f.get(names.DL_PAYLOAD, b""),
            at=float(text(names.DL_AT) or 0.0),
            entry_id=raw.entry_id,
        )


def decode_entry(
    raw: RawEntry, kind: str | None, stream: str, group: str = "", consumer: str = ""
) -> Delivery[Any] | DeadLetter:
    """The message an entry of ``stream`` carries, or why it carries none.

    ``kind`` is the message kind the stream carries (None: any); a message of another kind is
    rejected like a corrupt one.
    """

    def reject(reason: str, payload: bytes = b"") -> DeadLetter:
        origin = (stream, group, consumer, raw.entry_id)
        return DeadLetter(*origin, reason, raw.delivery_count, "", payload, time.time())

    if raw.fields is None:
        return reject(TRIMMED)
    payload = raw.fields.get(names.PAYLOAD_FIELD)
    if payload is None:
        have = sorted(k.decode("utf-8", "replace") for k in raw.fields)
        return reject(f"entry has no 'p' field (fields: {have})")
    try:
        msg = decode(payload, expect=kind)
    except SchemaError as exc:
        return reject(f"undecodable: {exc}", payload)
    return Delivery(stream, group, consumer, raw.entry_id, msg, payload, raw.delivery_count)
