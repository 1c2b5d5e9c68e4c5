"""The bus in process memory, with the same semantics as Redis Streams, for unit tests.

Pending lists, delivery counts, idle-based reclaiming, trimming and dead letters behave as they
do on Redis 7 (the delivery rules themselves live in :class:`~services.transport.base.Bus`, so
both implementations share them). Pass a ``clock`` to make idle timeouts testable without
sleeping. Not thread-safe: use it from one event loop.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from services.transport.base import (
    Bus,
    BusError,
    ClaimResult,
    GroupStats,
    RawEntry,
    StreamStats,
    id_key,
)


@dataclass
class _Pending:
    consumer: str
    delivered_at: float
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
    fields: dict[str, dict[bytes, bytes]] = field(default_factory=dict)
    groups: dict[str, _Group] = field(default_factory=dict)
    last: tuple[int, int] = (0, 0)
    added: int = 0  # entries ever added, as Redis 7 counts them (for lag)

    def after(self, key: tuple[int, int]) -> int:
        """Index of the first entry with id > key."""
        return bisect.bisect_right(self.keys, key)


class MemoryStore:
    """The streams themselves; several :class:`MemoryBus` clients may share one, as several
    processes share one Redis (each client tracks only the entries it holds)."""

    def __init__(self) -> None:
        self.streams: dict[str, _Stream] = {}
        self.changed: dict[str, asyncio.Condition] = {}


class MemoryBus(Bus):
    """:class:`Bus` in memory; ``make_bus("memory://name")`` gives clients of one store."""

    def __init__(self, store: MemoryStore | None = None, **settings: Any) -> None:
        super().__init__(**settings)
        self.store = store or MemoryStore()
        self._streams = self.store.streams
        self._changed = self.store.changed
        self.closed = False

    # ------------------------------------------------------------------ helpers

    def _stream(self, name: str, create: bool = True) -> _Stream:
        s = self._streams.get(name)
        if s is None:
            s = _Stream()
            if create:
                self._streams[name] = s
        return s

    def _group(self, stream: str, group: str) -> _Group:
        s = self._streams.get(stream)
        g = s.groups.get(group) if s else None
        if g is None:
            # Same behaviour as RedisBus after a Redis restart without persistence.
            s = self._stream(stream)
            g = s.groups[group] = _Group(last_id=(0, 0))
        return g

    def _cond(self, stream: str) -> asyncio.Condition:
        cond = self._changed.get(stream)
        if cond is None:
            cond = self._changed[stream] = asyncio.Condition()
        return cond

    def _now_ms(self) -> float:
        return self._clock() * 1000.0

    def _check_open(self) -> None:
        if self.closed:
            raise BusError("the bus is closed")

    def _next_id(self, s: _Stream) -> str:
        ms = int(time.time() * 1000)
        key = (ms, 0) if ms > s.last[0] else (s.last[0], s.last[1] + 1)
        s.last = key
        return f"{key[0]}-{key[1]}"

    async def _notify(self, stream: str) -> None:
        cond = self._cond(stream)
        async with cond:
            cond.notify_all()

    # ------------------------------------------------------------------ primitives

    async def _add(self, stream: str, fields: Sequence[dict[bytes, bytes]]) -> list[str]:
        self._check_open()
        s = self._stream(stream)
        out = []
        for f in fields:
            entry_id = self._next_id(s)
            s.keys.append(id_key(entry_id))
            s.ids.append(entry_id)
            s.fields[entry_id] = dict(f)
            s.added += 1
            out.append(entry_id)
        self._trim(s)
        await self._notify(stream)
        return out

    def _trim(self, s: _Stream) -> None:
        excess = len(s.ids) - self.maxlen
        if excess > 0:
            for entry_id in s.ids[:excess]:
                del s.fields[entry_id]
            del s.ids[:excess]
            del s.keys[:excess]

    async def _ensure_group(self, stream: str, group: str, start_id: str) -> None:
        self._check_open()
        s = self._stream(stream)
        if group not in s.groups:
            last = s.last if start_id == "$" else id_key(start_id)
            s.groups[group] = _Group(last_id=last)

    async def _read_new(
        self, stream: str, group: str, consumer: str, count: int, block_ms: int
    ) -> list[RawEntry]:
        self._check_open()
        deadline = self._clock() + block_ms / 1000.0
        cond = self._cond(stream)
        while True:
            g = self._group(stream, group)
            g.consumers.add(consumer)
            s = self._stream(stream)
            start = s.after(g.last_id)
            ids = s.ids[start : start + count]
            if ids or block_ms <= 0:
                break
            remaining = deadline - self._clock()
            if remaining <= 0:
                return []
            async with cond:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(cond.wait(), min(remaining, 0.05))
        now = self._now_ms()
        for entry_id in ids:
            g.pending[entry_id] = _Pending(consumer, now, 1)
        if ids:
            g.last_id = id_key(ids[-1])
        return [RawEntry(i, dict(s.fields[i]), 1) for i in ids]

    async def _autoclaim_ids(
        self, stream: str, group: str, consumer: str, min_idle_ms: int, cursor: str, count: int
    ) -> tuple[str, list[str], list[str]]:
        self._check_open()
        s = self._stream(stream)
        g = self._group(stream, group)
        now = self._now_ms()
        start = id_key(cursor)
        order = sorted(g.pending, key=id_key)
        claimed: list[str] = []
        trimmed: list[str] = []
        nxt = "0-0"
        for entry_id in order:
            if id_key(entry_id) < start:
                continue
            if len(claimed) >= count:
                nxt = entry_id
                break
            p = g.pending[entry_id]
            if now - p.delivered_at < min_idle_ms:
                continue
            if entry_id not in s.fields:
                del g.pending[entry_id]
                trimmed.append(entry_id)
                continue
            g.pending[entry_id] = _Pending(consumer, now, p.count)
            claimed.append(entry_id)
        g.consumers.add(consumer)
        return nxt, claimed, trimmed

    async def _claim(
        self, stream: str, group: str, consumer: str, ids: Sequence[str]
    ) -> ClaimResult:
        self._check_open()
        s = self._stream(stream)
        g = self._group(stream, group)
        now = self._now_ms()
        entries = []
        for entry_id in ids:
            p = g.pending.get(entry_id)
            if p is None:
                continue
            if entry_id not in s.fields:
                del g.pending[entry_id]  # as Redis 7's XCLAIM does
                continue
            g.pending[entry_id] = _Pending(consumer, now, p.count + 1)
            entries.append(RawEntry(entry_id, dict(s.fields[entry_id]), p.count + 1))
        return ClaimResult(entries)

    async def _own_pending(
        self, stream: str, group: str, consumer: str, after: str, count: int
    ) -> list[str]:
        self._check_open()
        g = self._group(stream, group)
        lo = (-1, -1) if after == "-" else id_key(after)
        mine = sorted(
            (i for i, p in g.pending.items() if p.consumer == consumer and id_key(i) > lo),
            key=id_key,
        )
        return mine[:count]

    async def _touch(
        self, stream: str, group: str, consumer: str, ids: Sequence[str], idle_ms: int
    ) -> None:
        self._check_open()
        g = self._group(stream, group)
        now = self._now_ms()
        for entry_id in ids:
            p = g.pending.get(entry_id)
            if p is not None:
                g.pending[entry_id] = _Pending(consumer, now - idle_ms, p.count)

    async def _ack(self, stream: str, group: str, ids: Sequence[str]) -> int:
        self._check_open()
        g = self._group(stream, group)
        return sum(g.pending.pop(i, None) is not None for i in ids)

    async def _dead_letter(
        self, records: Sequence[dict[bytes, bytes]], acks: Sequence[tuple[str, str, str]]
    ) -> list[str]:
        self._check_open()
        ids = await self._add(self.dead_letter_stream, records)
        for stream, group, entry_id in acks:
            await self._ack(stream, group, [entry_id])
        return ids

    async def _newest(self, stream: str, count: int) -> list[RawEntry]:
        self._check_open()
        s = self._stream(stream, create=False)
        return [RawEntry(i, dict(s.fields[i]), 0) for i in reversed(s.ids[-count:])]

    async def _read_after(
        self, stream: str, after: str, count: int, block_ms: int
    ) -> list[RawEntry]:
        self._check_open()
        deadline = self._clock() + block_ms / 1000.0
        cond = self._cond(stream)
        while True:
            s = self._stream(stream, create=False)
            key = s.last if after == "$" else id_key(after)
            start = s.after(key)
            ids = s.ids[start : start + count]
            if ids or block_ms <= 0 or deadline - self._clock() <= 0:
                return [RawEntry(i, dict(s.fields[i]), 0) for i in ids]
            if after == "$":
                after = f"{key[0]}-{key[1]}"
            async with cond:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(cond.wait(), min(deadline - self._clock(), 0.05))

    async def _range(self, stream: str, after: str, count: int) -> list[RawEntry]:
        self._check_open()
        s = self._stream(stream, create=False)
        start = 0 if after == "-" else s.after(id_key(after))
        return [RawEntry(i, dict(s.fields[i]), 0) for i in s.ids[start : start + count]]

    async def _unacked(
        self, stream: str, group: str, limit: int, *, pending: bool
    ) -> list[RawEntry]:
        self._check_open()
        s = self._stream(stream, create=False)
        g = s.groups.get(group)
        if g is None:
            return await self._range(stream, "-", limit)
        held: list[RawEntry] = []
        if pending:
            ids = [i for i in sorted(g.pending, key=id_key) if i in s.fields][:limit]
            held = [RawEntry(i, dict(s.fields[i]), g.pending[i].count) for i in ids]
        start = s.after(g.last_id)
        rest = [RawEntry(i, dict(s.fields[i]), 0) for i in s.ids[start : start + limit]]
        return held + rest

    async def stats(self, stream: str) -> StreamStats:
        self._check_open()
        s = self._stream(stream, create=False)
        groups = tuple(
            GroupStats(
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
        if not self.closed:
            await self._release_all_held()
        self.closed = True
