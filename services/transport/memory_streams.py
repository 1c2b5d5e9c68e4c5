"""Streams in process memory with the semantics of Redis 7 Streams, for unit tests.

Pending lists, delivery counts, idle times, trimming and missing groups behave as on Redis; the
delivery rules on top are the same code for both (:mod:`services.transport.delivery`). Not
thread-safe: use it from one event loop.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from services.transport.entries import RawEntry
from services.transport.streams import (
    BusError,
    ClaimResult,
    ConsumerGroupStats,
    Fields,
    Streams,
    StreamStats,
    id_key,
)


@dataclass
class _Pending:
    consumer: str
    delivered_at: float  # ms, time.monotonic
    count: int


@dataclass
class _Group:
    last_id: tuple[int, int]
    pending: dict[str, _Pending] = field(default_factory=dict)
    consumers: set[str] = field(default_factory=set)


@dataclass
class _Stream:
    keys: list[tuple[int, int]] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    fields: dict[str, Fields] = field(default_factory=dict)
    groups: dict[str, _Group] = field(default_factory=dict)
    last: tuple[int, int] = (0, 0)

    def after(self, key: tuple[int, int]) -> int:
        """Index of the first entry with id > key."""
        return bisect.bisect_right(self.keys, key)

    def entries(self, ids: Sequence[str], count: int = 0) -> list[RawEntry]:
        return [RawEntry(i, dict(self.fields[i]), count) for i in ids]


class MemoryStore:
    """The streams themselves; several buses may share one, as processes share one Redis."""

    def __init__(self) -> None:
        self.streams: dict[str, _Stream] = {}
        self.changed: dict[str, asyncio.Condition] = {}
        self.blobs: dict[str, bytes] = {}


class MemoryStreams(Streams):
    """:class:`Streams` in memory; ``make_bus("memory://name")`` gives buses on one store."""

    def __init__(
        self,
        store: MemoryStore | None = None,
        *,
        maxlen: int = 100_000,
    ) -> None:
        super().__init__(maxlen)
        self.store = store or MemoryStore()
        self.closed = False

    # ------------------------------------------------------------------ helpers

    def _stream(self, name: str) -> _Stream:
        self._check_open()
        return self.store.streams.get(name) or _Stream()

    def _group(self, stream: str, group: str) -> tuple[_Stream, _Group]:
        """The group, created at 0 if missing (Redis after a restart without persistence)."""
        self._check_open()
        s = self.store.streams.setdefault(stream, _Stream())
        return s, s.groups.setdefault(group, _Group(last_id=(0, 0)))

    def _check_open(self) -> None:
        if self.closed:
            raise BusError("the bus is closed")

    def _now_ms(self) -> float:
        return time.monotonic() * 1000.0

    async def _wait(self, stream: str, seconds: float) -> None:
        cond = self.store.changed.setdefault(stream, asyncio.Condition())
        async with cond:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(cond.wait(), min(seconds, 0.05))

    # ------------------------------------------------------------------ commands

    async def add(
        self, stream: str, entries: Sequence[Fields], acks: Sequence[tuple[str, str, str]] = ()
    ) -> list[str]:
        self._check_open()
        s = self.store.streams.setdefault(stream, _Stream())
        out = []
        for f in entries:
            ms = int(time.time() * 1000)
            s.last = (ms, 0) if ms > s.last[0] else (s.last[0], s.last[1] + 1)
            entry_id = f"{s.last[0]}-{s.last[1]}"
            s.keys.append(s.last)
            s.ids.append(entry_id)
            s.fields[entry_id] = dict(f)
            out.append(entry_id)
        excess = len(s.ids) - self.maxlen
        if excess > 0:
            for entry_id in s.ids[:excess]:
                del s.fields[entry_id]
            del s.ids[:excess], s.keys[:excess]
        cond = self.store.changed.setdefault(stream, asyncio.Condition())
        async with cond:
            cond.notify_all()
        for source, group, entry_id in acks:
            self._group(source, group)[1].pending.pop(entry_id, None)
        return out

    async def ensure_group(self, stream: str, group: str, start_id: str) -> None:
        self._check_open()
        s = self.store.streams.setdefault(stream, _Stream())
        if group not in s.groups:
            s.groups[group] = _Group(last_id=s.last if start_id == "$" else id_key(start_id))

    async def read_new(
        self, stream: str, group: str, consumer: str, count: int, block_ms: int
    ) -> list[RawEntry]:
        deadline = time.monotonic() + block_ms / 1000.0
        while True:
            s, g = self._group(stream, group)
            g.consumers.add(consumer)
            start = s.after(g.last_id)
            ids = s.ids[start : start + count]
            if ids or time.monotonic() >= deadline:
                break
            await self._wait(stream, deadline - time.monotonic())
        for entry_id in ids:
            g.pending[entry_id] = _Pending(consumer, self._now_ms(), 1)
        if ids:
            g.last_id = id_key(ids[-1])
        return s.entries(ids, 1)

    async def read_after(
        self, stream: str, after: str, count: int, block_ms: int
    ) -> list[RawEntry]:
        deadline = time.monotonic() + block_ms / 1000.0
        while True:
            s = self._stream(stream)
            key = s.last if after == "$" else id_key(after)
            after = f"{key[0]}-{key[1]}"
            start = s.after(key)
            ids = s.ids[start : start + count]
            if ids or time.monotonic() >= deadline:
                return s.entries(ids)
            await self._wait(stream, deadline - time.monotonic())

    async def newest(self, stream: str, count: int) -> list[RawEntry]:
        s = self._stream(stream)
        return s.entries(list(reversed(s.ids[-count:])))

    async def pending(
        self, stream: str, group: str, after: str, count: int, consumer: str | None = None
    ) -> list[RawEntry]:
        s, g = self._group(stream, group)
        lo = (-1, -1) if after == "-" else id_key(after)
        ids = sorted(
            (i for i, p in g.pending.items() if id_key(i) > lo and consumer in (None, p.consumer)),
            key=id_key,
        )[:count]
        return [RawEntry(i, s.fields.get(i), g.pending[i].count) for i in ids]

    async def autoclaim(
        self, stream: str, group: str, consumer: str, min_idle_ms: int, cursor: str, count: int
    ) -> tuple[str, list[str], list[str]]:
        s, g = self._group(stream, group)
        g.consumers.add(consumer)
        now = self._now_ms()
        claimed: list[str] = []
        trimmed: list[str] = []
        for entry_id in sorted(g.pending, key=id_key):
            if id_key(entry_id) < id_key(cursor):
                continue
            if len(claimed) >= count:
                return entry_id, claimed, trimmed
            p = g.pending[entry_id]
            if now - p.delivered_at < min_idle_ms:
                continue
            if entry_id not in s.fields:
                del g.pending[entry_id]
                trimmed.append(entry_id)
                continue
            g.pending[entry_id] = _Pending(consumer, now, p.count)
            claimed.append(entry_id)
        return "0-0", claimed, trimmed

    async def claim(
        self, stream: str, group: str, consumer: str, ids: Sequence[str]
    ) -> ClaimResult:
        s, g = self._group(stream, group)
        out = ClaimResult()
        for entry_id in ids:
            p = g.pending.get(entry_id)
            if p is None:
                continue
            if entry_id not in s.fields:
                del g.pending[entry_id]  # as Redis 7's XCLAIM does
                continue
            g.pending[entry_id] = _Pending(consumer, self._now_ms(), p.count + 1)
            out.entries.append(RawEntry(entry_id, dict(s.fields[entry_id]), p.count + 1))
        return out

    async def touch(
        self, stream: str, group: str, consumer: str, ids: Sequence[str], idle_ms: int
    ) -> None:
        _, g = self._group(stream, group)
        for entry_id in ids:
            p = g.pending.get(entry_id)
            if p is not None:
                g.pending[entry_id] = _Pending(consumer, self._now_ms() - idle_ms, p.count)

    async def ack(self, stream: str, group: str, ids: Sequence[str]) -> int:
        _, g = self._group(stream, group)
        return sum(g.pending.pop(i, None) is not None for i in ids)

    async def put_blob(self, key: str, data: bytes) -> bool:
        if key in self.store.blobs:
            return False
        self.store.blobs[key] = bytes(data)
        return True

    async def get_blob(self, key: str) -> bytes | None:
        return self.store.blobs.get(key)

    async def trim_consumed(self, stream: str, keep_last: int = 0) -> int:
        self._check_open()
        s = self.store.streams.get(stream)
        if s is None or not s.ids:
            return 0
        if not s.groups:
            cut = max(len(s.ids) - keep_last, 0) if keep_last else 0
        else:
            floor = min(
                min([id_key(i) for i in g.pending] + [(g.last_id[0], g.last_id[1] + 1)])
                for g in s.groups.values()
            )
            cut = sum(1 for k in s.keys if k < floor)
        for entry_id in s.ids[:cut]:
            del s.fields[entry_id]
        del s.ids[:cut], s.keys[:cut]
        return cut

    async def stats(self, stream: str) -> StreamStats:
        s = self._stream(stream)
        groups = tuple(
            ConsumerGroupStats(
                name=name,
                consumers=len(g.consumers),
                pending=len(g.pending),
                last_delivered_id=f"{g.last_id[0]}-{g.last_id[1]}",
                lag=len(s.ids) - s.after(g.last_id),
            )
            for name, g in s.groups.items()
        )
        return StreamStats(stream, len(s.ids), groups)

    async def close(self) -> None:
        self.closed = True
