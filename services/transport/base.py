"""The bus interface: what a consumer receives, and the delivery rules every implementation keeps.

An implementation provides a few stream primitives (append, read new entries, claim, ack, ...).
Everything that decides *what* a consumer sees — decoding, dead-lettering, the delivery limit,
reclaiming a dead consumer's entries, renewing the entries a live one still holds — is written
once here, so :class:`~services.transport.redis_bus.RedisBus` and
:class:`~services.transport.memory_bus.MemoryBus` cannot drift apart.

The rule the API is built around: **acknowledge only after the effect is durable.** ``read``
hands out deliveries that stay pending (and are redelivered if this process dies) until
``ack``; ``processing`` wraps the common case of an effect that is durable when the block ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, overload

from services.core.schemas import (
    KIND_PROMPT,
    KIND_SCORED_GROUP,
    KIND_WEIGHTS,
    Message,
    PromptMessage,
    SchemaError,
    ScoredGroup,
    WeightAnnouncement,
    decode,
    encode,
)
from services.transport import names

log = logging.getLogger(__name__)

M = TypeVar("M", PromptMessage, ScoredGroup, WeightAnnouncement)

KIND_OF: Mapping[type, str] = {
    PromptMessage: KIND_PROMPT,
    ScoredGroup: KIND_SCORED_GROUP,
    WeightAnnouncement: KIND_WEIGHTS,
}


class BusError(RuntimeError):
    """The bus cannot do what was asked; the message says what to fix."""


class BusUnavailable(BusError):
    """Redis stayed unreachable past the reconnect deadline."""


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
    group: str  # "" for reads outside a consumer group (latest, follow)
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
    """A record in the dead-letter stream: where an entry came from and why it was given up."""

    entry_id: str  # id in the dead-letter stream
    stream: str
    group: str
    consumer: str
    source_id: str  # id the entry had in its own stream ("" when it never had one)
    reason: str
    deliveries: int
    message_id: str  # prompt/group id when the payload decoded, else ""
    payload: bytes
    at: float


@dataclass(frozen=True)
class GroupStats:
    name: str
    consumers: int
    pending: int  # delivered, not yet acknowledged
    last_delivered_id: str
    lag: int | None  # entries not yet delivered; None where Redis (< 7) does not report it


@dataclass(frozen=True)
class StreamStats:
    stream: str
    length: int
    groups: tuple[GroupStats, ...] = ()

    def group(self, name: str) -> GroupStats | None:
        return next((g for g in self.groups if g.name == name), None)


@dataclass(frozen=True)
class RawEntry:
    """A stream entry as a primitive returns it; ``fields`` is None when it was trimmed away."""

    entry_id: str
    fields: dict[bytes, bytes] | None
    delivery_count: int = 1


@dataclass(frozen=True)
class ClaimResult:
    entries: list[RawEntry]
    trimmed: list[str] = field(default_factory=list)  # pending ids whose entry no longer exists


def id_key(entry_id: str) -> tuple[int, int]:
    """Sort key of a stream id ``ms-seq``."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class Bus(ABC):
    """Producer and consumer of versioned messages over streams with consumer groups.

    Guarantees (docs/bus.md has the full statement): an entry is pending from its delivery
    until ``ack``; entries of a consumer that stops renewing them are reclaimed after
    ``claim_idle_ms`` and redelivered to another consumer; an entry that cannot be decoded, or
    was delivered more than ``max_deliveries`` times, goes to the dead-letter stream with the
    reason and is acknowledged, so it never blocks the pipeline. Publishing is at-least-once:
    consumers recognise a repeat by the message's stable id.
    """

    def __init__(
        self,
        *,
        dead_letter_stream: str = "mapo:dead",
        maxlen: int = 100_000,
        block_ms: int = 1000,
        claim_idle_ms: int = 60_000,
        max_deliveries: int = 5,
        batch: int = 32,
        kinds: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_deliveries < 1 or claim_idle_ms < 1 or maxlen < 1 or batch < 1:
            raise BusError("max_deliveries, claim_idle_ms, maxlen and batch must be >= 1")
        self.dead_letter_stream = dead_letter_stream
        self.maxlen = maxlen
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        self.max_deliveries = max_deliveries
        self.batch = batch
        # Which message kind each known stream carries, so a read rejects foreign messages.
        self.kinds: dict[str, str] = dict(kinds or {})
        self._clock = clock
        # Entries this process holds: (stream, group) -> {entry_id: (consumer, last renewal)}.
        self._held: dict[tuple[str, str], dict[str, tuple[str, float]]] = {}
        self._last_reclaim: dict[tuple[str, str], float] = {}
        self._reclaim_cursor: dict[tuple[str, str], str] = {}
        # Consumers whose own pending entries must be taken back (start-up, after a reconnect).
        self._recover_from: dict[tuple[str, str, str], str] = {}
        self._recovered_epoch: dict[tuple[str, str, str], int] = {}
        self._epoch = 0  # bumped by an implementation whenever it had to reconnect

    # ------------------------------------------------------------------ primitives

    @abstractmethod
    async def _add(self, stream: str, fields: Sequence[dict[bytes, bytes]]) -> list[str]:
        """Append entries (capped at ~maxlen) in one round trip; return their ids."""

    @abstractmethod
    async def _ensure_group(self, stream: str, group: str, start_id: str) -> None: ...

    @abstractmethod
    async def _read_new(
        self, stream: str, group: str, consumer: str, count: int, block_ms: int
    ) -> list[RawEntry]:
        """Entries never delivered to the group (XREADGROUP >); block_ms 0 does not block."""

    @abstractmethod
    async def _autoclaim_ids(
        self, stream: str, group: str, consumer: str, min_idle_ms: int, cursor: str, count: int
    ) -> tuple[str, list[str], list[str]]:
        """Claim idle pending ids (XAUTOCLAIM JUSTID): (next cursor, ids, trimmed ids)."""

    @abstractmethod
    async def _claim(
        self, stream: str, group: str, consumer: str, ids: Sequence[str]
    ) -> ClaimResult:
        """Take ``ids`` for ``consumer`` counting a delivery; return entries with their counts."""

    @abstractmethod
    async def _own_pending(
        self, stream: str, group: str, consumer: str, after: str, count: int
    ) -> list[str]:
        """Ids pending for ``consumer`` with id > ``after`` ("-" for all), oldest first."""

    @abstractmethod
    async def _touch(
        self, stream: str, group: str, consumer: str, ids: Sequence[str], idle_ms: int
    ) -> None:
        """Set the idle time of pending ids without counting a delivery (XCLAIM IDLE JUSTID)."""

    @abstractmethod
    async def _ack(self, stream: str, group: str, ids: Sequence[str]) -> int: ...

    @abstractmethod
    async def _dead_letter(
        self, records: Sequence[dict[bytes, bytes]], acks: Sequence[tuple[str, str, str]]
    ) -> list[str]:
        """Append dead-letter records and ack (stream, group, id) triples atomically."""

    @abstractmethod
    async def _newest(self, stream: str, count: int) -> list[RawEntry]: ...

    @abstractmethod
    async def _read_after(
        self, stream: str, after: str, count: int, block_ms: int
    ) -> list[RawEntry]: ...

    @abstractmethod
    async def _range(self, stream: str, after: str, count: int) -> list[RawEntry]:
        """Entries with id > ``after`` ("-" for all), oldest first."""

    @abstractmethod
    async def _unacked(
        self, stream: str, group: str, limit: int, *, pending: bool
    ) -> list[RawEntry]:
        """Entries the group has not acknowledged: the pending ones, oldest first, up to
        ``limit`` (none unless ``pending``), then the undelivered ones, up to ``limit`` of
        their own. The last delivered id is read before the pending list, so an entry
        delivered meanwhile shows up twice rather than not at all."""

    @abstractmethod
    async def stats(self, stream: str) -> StreamStats:
        """Length, and pending / last delivered id / lag (Redis 7+) of each group."""

    @abstractmethod
    async def close(self) -> None:
        """Release held entries for prompt redelivery and close connections."""

    # ------------------------------------------------------------------ producing

    async def publish(self, stream: str, msg: Message) -> str:
        """Append one message; returns its entry id. At-least-once: see the class docstring."""
        return (await self.publish_many(stream, [msg]))[0]

    async def publish_many(self, stream: str, msgs: Sequence[Message]) -> list[str]:
        """Append several messages in one round trip (the cheap way to publish a batch)."""
        return await self.publish_encoded(stream, [encode(m) for m in msgs])

    async def publish_encoded(self, stream: str, payloads: Sequence[bytes]) -> list[str]:
        """Append payloads already produced by ``schemas.encode`` (not re-validated here)."""
        if not payloads:
            return []
        return await self._add(stream, [{names.PAYLOAD_FIELD: bytes(p)} for p in payloads])

    async def ensure_group(self, stream: str, group: str, start_id: str = "0") -> None:
        """Create the group (and the stream) if missing; an existing group is left as it is.

        The default start ``0`` means entries published before the group existed are still
        delivered, so a producer that starts first loses nothing.
        """
        await self._ensure_group(stream, group, start_id)

    # ------------------------------------------------------------------ consuming

    @overload
    async def read(
        self,
        stream: str,
        group: str,
        consumer: str,
        count: int | None = None,
        block_ms: int | None = None,
        *,
        expect: type[M],
    ) -> list[Delivery[M]]: ...

    @overload
    async def read(
        self,
        stream: str,
        group: str,
        consumer: str,
        count: int | None = None,
        block_ms: int | None = None,
        *,
        expect: None = None,
    ) -> list[Delivery[Any]]: ...

    async def read(
        self,
        stream: str,
        group: str,
        consumer: str,
        count: int | None = None,
        block_ms: int | None = None,
        *,
        expect: type[M] | None = None,
    ) -> list[Delivery[M]] | list[Delivery[Any]]:
        """Up to ``count`` deliveries for ``consumer``: its own unfinished entries after a
        restart or reconnect, then entries reclaimed from consumers idle past
        ``claim_idle_ms``, then new ones (waiting up to ``block_ms`` only when there is none).

        Undecodable entries and entries past ``max_deliveries`` are dead-lettered and acked
        here, never returned. Every returned delivery stays pending until :meth:`ack`.
        """
        count = count or self.batch
        block = self.block_ms if block_ms is None else block_ms
        kind = self._expected_kind(stream, expect)
        key = (stream, group)
        await self._renew_due(key)

        entries: list[RawEntry] = []
        trimmed: list[str] = []
        ckey = (stream, group, consumer)
        if self._recovered_epoch.get(ckey) != self._epoch:
            self._recovered_epoch[ckey] = self._epoch
            self._recover_from[ckey] = "-"
        if ckey in self._recover_from:
            claim = await self._recover_own(ckey, count)
            entries += claim.entries
            trimmed += claim.trimmed
        if len(entries) < count and self._reclaim_due(key):
            claim = await self._reclaim_idle(stream, group, consumer, count - len(entries))
            entries += claim.entries
            trimmed += claim.trimmed
        if len(entries) < count:
            wait = 0 if entries or trimmed else block
            entries += await self._read_new(stream, group, consumer, count - len(entries), wait)
        return await self._admit(stream, group, consumer, entries, trimmed, kind)

    async def ack(self, stream: str, group: str, entry_ids: Iterable[str]) -> int:
        """Acknowledge entries whose effect is durable; returns how many were still pending."""
        ids = list(entry_ids)
        if not ids:
            return 0
        n = await self._ack(stream, group, ids)
        self._forget(stream, group, ids)
        return n

    async def ack_deliveries(self, deliveries: Iterable[Delivery[Any]]) -> int:
        """:meth:`ack` for deliveries from any streams and groups."""
        total = 0
        for (stream, group), ids in _by_group(deliveries).items():
            total += await self.ack(stream, group, ids)
        return total

    async def release(self, deliveries: Iterable[Delivery[Any]]) -> None:
        """Give deliveries back unfinished: they are redelivered on the next read of any
        consumer, and the attempt counts toward ``max_deliveries``."""
        for (stream, group), items in _by_group_full(deliveries).items():
            by_consumer: dict[str, list[str]] = {}
            for d in items:
                by_consumer.setdefault(d.consumer, []).append(d.entry_id)
            for consumer, ids in by_consumer.items():
                await self._touch(stream, group, consumer, ids, self.claim_idle_ms)
            self._forget(stream, group, [d.entry_id for d in items])
            self._reclaim_cursor.pop((stream, group), None)
            self._last_reclaim.pop((stream, group), None)

    @overload
    def processing(
        self,
        stream: str,
        group: str,
        consumer: str,
        count: int | None = None,
        block_ms: int | None = None,
        *,
        expect: type[M],
    ) -> AbstractAsyncContextManager[list[Delivery[M]]]: ...

    @overload
    def processing(
        self,
        stream: str,
        group: str,
        consumer: str,
        count: int | None = None,
        block_ms: int | None = None,
        *,
        expect: None = None,
    ) -> AbstractAsyncContextManager[list[Delivery[Any]]]: ...

    @asynccontextmanager
    async def processing(
        self,
        stream: str,
        group: str,
        consumer: str,
        count: int | None = None,
        block_ms: int | None = None,
        *,
        expect: type[M] | None = None,
    ) -> AsyncIterator[list[Delivery[Any]]]:
        """Read a batch; ack it when the block finishes, release it if the block raises.

        For consumers whose effect is durable when the block ends (the rollout worker: the
        scored groups are appended downstream inside the block)::

            async with bus.processing(prompts, INFERENCE_GROUP, me, expect=PromptMessage) as batch:
                groups = await generate_and_score(batch)
                await bus.publish_many(rollouts, groups)
        """
        deliveries = await self.read(stream, group, consumer, count, block_ms, expect=expect)
        try:
            yield deliveries
        except BaseException:
            await self._release_quietly(deliveries)
            raise
        await self.ack(stream, group, [d.entry_id for d in deliveries])

    async def renew(self, stream: str, group: str) -> None:
        """Reset the idle time of every entry this process holds on ``stream``/``group``.

        ``read`` does this on its own; call it during a step longer than ``claim_idle_ms``
        without reads, or another consumer will reclaim (and redo) the held entries.
        """
        await self._renew(stream, group, force=True)

    def held(self, stream: str, group: str) -> list[str]:
        """Ids delivered to this process and neither acked, released nor dead-lettered."""
        return list(self._held.get((stream, group), {}))

    # ------------------------------------------------------------------ dead letters

    async def dead_letter(
        self, item: Delivery[Any] | bytes, reason: str, *, stream: str = ""
    ) -> str:
        """Move a delivery to the dead-letter stream (and ack it, atomically), or record a raw
        payload that never made it into a stream. Returns the dead-letter entry id."""
        if isinstance(item, Delivery):
            record = _dl_record(
                item.stream,
                item.group,
                item.consumer,
                item.entry_id,
                reason,
                item.delivery_count,
                item.message_id,
                item.raw,
            )
            acks = [(item.stream, item.group, item.entry_id)] if item.group else []
            dl_id = (await self._dead_letter([record], acks))[0]
            if item.group:
                self._forget(item.stream, item.group, [item.entry_id])
            return dl_id
        record = _dl_record(stream, "", "", "", reason, 0, _try_message_id(item), bytes(item))
        return (await self._dead_letter([record], []))[0]

    async def dead_letters(self, count: int = 100, after: str = "-") -> list[DeadLetter]:
        """Records of the dead-letter stream with id > ``after``, oldest first."""
        return [_parse_dl(e) for e in await self._range(self.dead_letter_stream, after, count)]

    # ------------------------------------------------------------------ fan-out reads

    @overload
    async def latest(self, stream: str, *, expect: type[M]) -> Delivery[M] | None: ...

    @overload
    async def latest(self, stream: str, *, expect: None = None) -> Delivery[Any] | None: ...

    async def latest(
        self, stream: str, *, expect: type[M] | None = None
    ) -> Delivery[M] | Delivery[Any] | None:
        """The newest valid message of a stream (the current weights for a replica that starts
        later); None if the stream has none among its newest entries."""
        kind = self._expected_kind(stream, expect)
        for raw in await self._newest(stream, 16):
            delivery = self._decode_plain(stream, raw, kind)
            if delivery is not None:
                return delivery
        return None

    def follow(
        self, stream: str, after: str = "0", *, expect: type[M] | None = None
    ) -> StreamFollower[Any]:
        """A cursor over every new entry of ``stream`` (fan-out: each follower sees all)."""
        return StreamFollower(self, stream, after, self._expected_kind(stream, expect))

    async def unacked(
        self, stream: str, group: str, limit: int = 10_000, *, pending: bool = True
    ) -> list[Delivery[Any]]:
        """Valid messages the group has not acknowledged yet, without claiming them: the
        pending ones (``delivery_count`` >= 1), then the never delivered ones (``0``).

        ``limit`` bounds each part on its own, so a long pending list (a trainer that acks
        only at checkpoints) never hides an undelivered entry. ``pending=False`` skips the
        pending part and its cost (a lookup per entry) for callers that only need the
        undelivered ones. Used to rebuild the in-flight set (``PromptProducer``).
        """
        if limit < 1:
            raise BusError(f"unacked: limit must be >= 1, got {limit}")
        out = []
        for raw in await self._unacked(stream, group, limit, pending=pending):
            delivery = self._decode_plain(stream, raw, self.kinds.get(stream))
            if delivery is not None:
                out.append(delivery)
        return out

    # ------------------------------------------------------------------ internals

    def _expected_kind(self, stream: str, expect: type | None) -> str | None:
        if expect is None:
            return self.kinds.get(stream)
        if expect not in KIND_OF:
            raise BusError(f"expect must be one of {[t.__name__ for t in KIND_OF]}")
        return KIND_OF[expect]

    def _decode_plain(self, stream: str, raw: RawEntry, kind: str | None) -> Delivery[Any] | None:
        payload = (raw.fields or {}).get(names.PAYLOAD_FIELD)
        if payload is None:
            return None
        try:
            msg = decode(payload, expect=kind)
        except SchemaError as exc:
            log.warning("skipping entry %s of %s: %s", raw.entry_id, stream, exc)
            return None
        return Delivery(stream, "", "", raw.entry_id, msg, payload, raw.delivery_count)

    async def _admit(
        self,
        stream: str,
        group: str,
        consumer: str,
        entries: list[RawEntry],
        trimmed: list[str],
        kind: str | None,
    ) -> list[Delivery[Any]]:
        """Decode entries into deliveries; dead-letter (and ack) the ones that must not pass."""
        out: list[Delivery[Any]] = []
        records: list[dict[bytes, bytes]] = []
        acks: list[tuple[str, str, str]] = []

        def give_up(entry_id: str, reason: str, count: int, mid: str, payload: bytes) -> None:
            log.warning("dead-lettering %s %s: %s", stream, entry_id, reason)
            records.append(
                _dl_record(stream, group, consumer, entry_id, reason, count, mid, payload)
            )
            acks.append((stream, group, entry_id))

        for entry_id in trimmed:
            give_up(
                entry_id, "trimmed from the stream (MAXLEN) before it was acknowledged", 0, "", b""
            )
        seen: set[str] = set()
        held = self._held.setdefault((stream, group), {})
        now = self._clock()
        for raw in entries:
            if raw.entry_id in seen:
                continue
            seen.add(raw.entry_id)
            if raw.fields is None:
                give_up(
                    raw.entry_id,
                    "trimmed from the stream (MAXLEN) before it was acknowledged",
                    raw.delivery_count,
                    "",
                    b"",
                )
                continue
            payload = raw.fields.get(names.PAYLOAD_FIELD)
            if payload is None:
                have = sorted(k.decode("utf-8", "replace") for k in raw.fields)
                give_up(
                    raw.entry_id,
                    f"entry has no 'p' field (fields: {have})",
                    raw.delivery_count,
                    "",
                    b"",
                )
                continue
            try:
                msg = decode(payload, expect=kind)
            except SchemaError as exc:
                give_up(raw.entry_id, f"undecodable: {exc}", raw.delivery_count, "", payload)
                continue
            if raw.delivery_count > self.max_deliveries:
                reason = (
                    f"delivered {raw.delivery_count} times, more than "
                    f"max_deliveries={self.max_deliveries}"
                )
                give_up(raw.entry_id, reason, raw.delivery_count, message_id(msg), payload)
                continue
            held[raw.entry_id] = (consumer, now)
            out.append(
                Delivery(stream, group, consumer, raw.entry_id, msg, payload, raw.delivery_count)
            )
        if records:
            await self._dead_letter(records, acks)
            self._forget(stream, group, [a[2] for a in acks])
        return out

    async def _recover_own(self, ckey: tuple[str, str, str], count: int) -> ClaimResult:
        """Take back this consumer's pending entries that this process does not hold: left by
        an earlier run under the same name, or delivered while a reply was lost to a
        connection drop."""
        stream, group, consumer = ckey
        after = self._recover_from[ckey]
        ids = await self._own_pending(stream, group, consumer, after, count)
        if len(ids) < count:
            del self._recover_from[ckey]
        else:
            self._recover_from[ckey] = ids[-1]
        held = self._held.get((stream, group), {})
        todo = [i for i in ids if i not in held]
        if not todo:
            return ClaimResult([])
        return await self._claim(stream, group, consumer, todo)

    async def _reclaim_idle(
        self, stream: str, group: str, consumer: str, count: int
    ) -> ClaimResult:
        key = (stream, group)
        cursor = self._reclaim_cursor.get(key, "0-0")
        nxt, ids, trimmed = await self._autoclaim_ids(
            stream, group, consumer, self.claim_idle_ms, cursor, count
        )
        self._reclaim_cursor[key] = nxt
        if nxt in ("0-0", "0"):
            # A full pass is done: wait a while before the next one.
            self._last_reclaim[key] = self._clock()
        if not ids:
            return ClaimResult([], trimmed)
        claim = await self._claim(stream, group, consumer, ids)
        if claim.entries:
            log.info(
                "reclaimed %d idle entries of %s/%s for %s",
                len(claim.entries),
                stream,
                group,
                consumer,
            )
        return ClaimResult(claim.entries, trimmed + claim.trimmed)

    def _reclaim_due(self, key: tuple[str, str]) -> bool:
        """A pass over the pending list runs to its end, then waits a quarter idle timeout."""
        if self._reclaim_cursor.get(key, "0-0") not in ("0-0", "0"):
            return True
        last = self._last_reclaim.get(key)
        return last is None or self._clock() - last >= self.claim_idle_ms / 4000.0

    async def _renew_due(self, key: tuple[str, str]) -> None:
        await self._renew(*key, force=False)

    async def _renew(self, stream: str, group: str, *, force: bool) -> None:
        held = self._held.get((stream, group))
        if not held:
            return
        now = self._clock()
        horizon = self.claim_idle_ms / 3000.0
        by_consumer: dict[str, list[str]] = {}
        for entry_id, (consumer, at) in held.items():
            if force or now - at >= horizon:
                by_consumer.setdefault(consumer, []).append(entry_id)
        for consumer, ids in by_consumer.items():
            await self._touch(stream, group, consumer, ids, 0)
            for entry_id in ids:
                held[entry_id] = (consumer, now)

    def _forget(self, stream: str, group: str, ids: Iterable[str]) -> None:
        held = self._held.get((stream, group))
        if held:
            for entry_id in ids:
                held.pop(entry_id, None)

    async def _release_quietly(self, deliveries: Sequence[Delivery[Any]]) -> None:
        # Best effort on the way out of a failed block: if the bus is down, the entries stay
        # pending and are reclaimed after claim_idle_ms anyway, so waiting here helps nobody.
        if not deliveries:
            return
        try:
            async with asyncio.timeout(2.0):
                await self.release(deliveries)
        except Exception as exc:
            log.warning("could not release %d deliveries: %s", len(deliveries), exc)

    async def _release_all_held(self) -> None:
        for (stream, group), held in list(self._held.items()):
            by_consumer: dict[str, list[str]] = {}
            for entry_id, (consumer, _) in held.items():
                by_consumer.setdefault(consumer, []).append(entry_id)
            for consumer, ids in by_consumer.items():
                await self._touch(stream, group, consumer, ids, self.claim_idle_ms)
        self._held.clear()


class StreamFollower(Generic[M]):
    """Reads every entry of a stream after a cursor, outside any consumer group (weight
    announcements: every replica needs every one). Undecodable entries are skipped, not
    dead-lettered, since each follower would record them again."""

    def __init__(self, bus: Bus, stream: str, after: str, kind: str | None) -> None:
        self.bus = bus
        self.stream = stream
        self.last_id = after
        self._kind = kind

    async def poll(self, count: int = 16, block_ms: int | None = None) -> list[Delivery[M]]:
        block = self.bus.block_ms if block_ms is None else block_ms
        raws = await self.bus._read_after(self.stream, self.last_id, count, block)
        out: list[Delivery[M]] = []
        for raw in raws:
            self.last_id = raw.entry_id
            delivery = self.bus._decode_plain(self.stream, raw, self._kind)
            if delivery is not None:
                out.append(delivery)
        return out


def _by_group(deliveries: Iterable[Delivery[Any]]) -> dict[tuple[str, str], list[str]]:
    out: dict[tuple[str, str], list[str]] = {}
    for d in deliveries:
        out.setdefault((d.stream, d.group), []).append(d.entry_id)
    return out


def _by_group_full(
    deliveries: Iterable[Delivery[Any]],
) -> dict[tuple[str, str], list[Delivery[Any]]]:
    out: dict[tuple[str, str], list[Delivery[Any]]] = {}
    for d in deliveries:
        if d.group:
            out.setdefault((d.stream, d.group), []).append(d)
    return out


def _try_message_id(payload: bytes) -> str:
    try:
        return message_id(decode(payload))
    except SchemaError:
        return ""


def _dl_record(
    stream: str,
    group: str,
    consumer: str,
    entry_id: str,
    reason: str,
    deliveries: int,
    mid: str,
    payload: bytes,
) -> dict[bytes, bytes]:
    return {
        names.DL_STREAM: stream.encode(),
        names.DL_GROUP: group.encode(),
        names.DL_CONSUMER: consumer.encode(),
        names.DL_ENTRY_ID: entry_id.encode(),
        names.DL_REASON: reason.encode(),
        names.DL_DELIVERIES: str(deliveries).encode(),
        names.DL_MESSAGE_ID: mid.encode(),
        names.DL_PAYLOAD: payload,
        names.DL_AT: repr(time.time()).encode(),
    }


def _parse_dl(raw: RawEntry) -> DeadLetter:
    f = raw.fields or {}

    def text(key: bytes) -> str:
        return f.get(key, b"").decode("utf-8", "replace")

    return DeadLetter(
        entry_id=raw.entry_id,
        stream=text(names.DL_STREAM),
        group=text(names.DL_GROUP),
        consumer=text(names.DL_CONSUMER),
        source_id=text(names.DL_ENTRY_ID),
        reason=text(names.DL_REASON),
        deliveries=int(text(names.DL_DELIVERIES) or 0),
        message_id=text(names.DL_MESSAGE_ID),
        payload=f.get(names.DL_PAYLOAD, b""),
        at=float(text(names.DL_AT) or 0.0),
    )
