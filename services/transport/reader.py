"""Reads outside any consumer group: the newest message, a follower, the unacked recount, the
dead letters and the stream figures. They claim nothing and ack nothing.

An entry that carries no valid message is skipped with a warning here, not dead-lettered:
every reader sees every entry, so each would record it again. Skipping never costs the entries
around it: decoding an entry cannot raise (:func:`~services.transport.entries.decode_entry`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Generic, overload

from services.core.schemas import (
    DEFAULT_LIMITS,
    Message,
    PromptMessage,
    ScoredGroup,
    WeightAnnouncement,
    WireLimits,
)
from services.transport.entries import DeadLetter, Delivery, M, RawEntry, decode_entry
from services.transport.streams import BusError, Streams, StreamStats

log = logging.getLogger(__name__)

MESSAGE_TYPES = (PromptMessage, ScoredGroup, WeightAnnouncement)

#: Pending entries listed per round trip by ``unacked``: a reply well inside a command deadline.
PENDING_PAGE = 500


class StreamReader:
    """What every bus can read without a consumer group (a :class:`~services.transport.Bus`
    is one); ``kinds`` says which message kind each known stream carries, ``limits`` bounds
    every field of every message read."""

    def __init__(
        self,
        streams: Streams,
        *,
        dead_letter_stream: str,
        block_ms: int,
        kinds: Mapping[str, str] | None,
        limits: WireLimits = DEFAULT_LIMITS,
    ) -> None:
        self.streams = streams
        self.dead_letter_stream = dead_letter_stream
        self.block_ms = block_ms
        # Which message kind each known stream carries, so a read rejects foreign messages.
        self.kinds: dict[str, str] = dict(kinds or {})
        self.limits = limits

    @overload
    async def latest(self, stream: str, *, expect: type[M]) -> Delivery[M] | None: ...

    @overload
    async def latest(self, stream: str, *, expect: None = None) -> Delivery[Any] | None: ...

    async def latest(
        self, stream: str, *, expect: type[M] | None = None
    ) -> Delivery[M] | Delivery[Any] | None:
        """The newest valid message of a stream (the current weights for a replica that starts
        later); None if the stream has none among its newest entries."""
        kind = self._kind(stream, expect)
        for raw in await self.streams.newest(stream, 16):
            if (found := _valid(raw, kind, stream, self.limits)) is not None:
                return found
        return None

    def follow(
        self, stream: str, after: str = "0", *, expect: type[M] | None = None
    ) -> StreamFollower[Any]:
        """A cursor over every new entry of ``stream`` (fan-out: each follower sees all)."""
        return StreamFollower(self, stream, after, self._kind(stream, expect))

    async def unacked(
        self, stream: str, group: str, limit: int = 10_000, *, pending: bool = True
    ) -> list[Delivery[Any]]:
        """Valid messages the group has not acknowledged yet, without claiming them: the
        pending ones (``delivery_count`` >= 1), then the never delivered ones (``0``).

        ``limit`` bounds each part on its own, so a long pending list (a trainer that acks
        only at checkpoints) never hides an undelivered entry. ``pending=False`` skips the
        pending part and its cost. The last delivered id is read first, so an entry delivered
        meanwhile shows up twice rather than not at all. Used to rebuild the in-flight set.
        """
        if limit < 1:
            raise BusError(f"unacked: limit must be >= 1, got {limit}")
        info = (await self.streams.stats(stream)).group(group)
        last_delivered = "0" if info is None else info.last_delivered_id
        held = await self._pending(stream, group, limit) if pending and info else []
        entries = held + await self.streams.read_after(stream, last_delivered, limit, 0)
        kind = self.kinds.get(stream)
        return [d for d in (_valid(e, kind, stream, self.limits) for e in entries) if d is not None]

    async def dead_letters(self, count: int = 100, after: str = "-") -> list[DeadLetter]:
        """Records of the dead-letter stream with id > ``after``, oldest first."""
        start = "0" if after == "-" else after
        records = await self.streams.read_after(self.dead_letter_stream, start, count, 0)
        return [DeadLetter.from_entry(e) for e in records]

    async def stats(self, stream: str) -> StreamStats:
        """Length, and pending / last delivered id / lag (Redis 7+) of each group."""
        return await self.streams.stats(stream)

    def _kind(self, stream: str, expect: type[Message] | None) -> str | None:
        if expect is None:
            return self.kinds.get(stream)
        if expect not in MESSAGE_TYPES:
            raise BusError(f"expect must be one of {[t.__name__ for t in MESSAGE_TYPES]}")
        return expect.kind

    async def _pending(self, stream: str, group: str, limit: int) -> list[RawEntry]:
        """Up to ``limit`` pending entries, a page per round trip: a trainer between
        checkpoints holds thousands, too many for one reply."""
        out: list[RawEntry] = []
        after = "-"
        while len(out) < limit:
            page = min(PENDING_PAGE, limit - len(out))
            rows = await self.streams.pending(stream, group, after, page)
            out += [r for r in rows if r.fields is not None]  # a trimmed entry holds no message
            if len(rows) < page:
                break
            after = rows[-1].entry_id
        return out


def _valid(
    raw: RawEntry, kind: str | None, stream: str, limits: WireLimits
) -> Delivery[Any] | None:
    got = decode_entry(raw, kind, stream, limits=limits)
    if isinstance(got, DeadLetter):
        log.warning("skipping entry %s of %s: %s", raw.entry_id, stream, got.reason)
        return None
    return got


class StreamFollower(Generic[M]):
    """Reads every entry of a stream after a cursor (weight announcements: every replica
    needs every one)."""

    def __init__(self, reader: StreamReader, stream: str, after: str, kind: str | None) -> None:
        self.reader = reader
        self.stream = stream
        self.last_id = after
        self._kind = kind

    async def poll(self, count: int = 16, block_ms: int | None = None) -> list[Delivery[M]]:
        """The valid messages among the next ``count`` entries, in order; invalid ones are
        skipped, and the cursor moves past an entry only together with what it held."""
        block = self.reader.block_ms if block_ms is None else block_ms
        out: list[Delivery[M]] = []
        for raw in await self.reader.streams.read_after(self.stream, self.last_id, count, block):
            found = _valid(raw, self._kind, self.stream, self.reader.limits)
            if found is not None:
                out.append(found)
            self.last_id = raw.entry_id
        return out
