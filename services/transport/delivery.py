"""The delivery policy: which entries a consumer is handed, and when one is given up.

- Entries this process holds are renewed (idle time reset, no delivery counted) once a third
  of ``claim_idle_ms`` has passed, so no other consumer reclaims them while it is alive.
- Before new entries, a consumer is handed again its own pending entries that this process does
  not hold, then entries of consumers idle past ``claim_idle_ms`` (:class:`Redeliveries`).
- An entry that does not decode, was trimmed while pending, or was delivered more than
  ``max_deliveries`` times goes to the dead-letter stream with the reason, acked in the same
  transaction: it is never returned and never blocks the entries behind it. The delivery count
  is checked first, so an entry past it is not decoded again.
- An entry leaves this process's bookkeeping when it is acked, released, dead-lettered or
  forgotten, even when telling the server fails: then it is left pending, unrenewed, and
  another consumer reclaims it after ``claim_idle_ms``. Nothing stays held, and renewed, that
  no one is working on.

The policy works over any :class:`~services.transport.streams.Streams` backend, so Redis and
the in-memory twin share it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

from services.core.schemas import DEFAULT_LIMITS, WireLimits
from services.transport.entries import DeadLetter, Delivery, RawEntry, decode_entry
from services.transport.streams import ClaimResult, Streams

log = logging.getLogger(__name__)

GroupKey = tuple[str, str]  # (stream, group)


class HeldEntries:
    """Entries handed to this process and not finished yet, with when each was last renewed."""

    def __init__(self) -> None:
        self._groups: dict[GroupKey, dict[str, tuple[str, float]]] = {}

    def add(self, key: GroupKey, consumer: str, ids: Iterable[str], now: float) -> None:
        held = self._groups.setdefault(key, {})
        for entry_id in ids:
            held[entry_id] = (consumer, now)

    def drop(self, key: GroupKey, ids: Iterable[str]) -> None:
        held = self._groups.get(key, {})
        for entry_id in ids:
            held.pop(entry_id, None)

    def ids(self, key: GroupKey) -> list[str]:
        return list(self._groups.get(key, {}))

    def by_consumer(self, key: GroupKey, renewed_by: float = math.inf) -> dict[str, list[str]]:
        """Held ids last renewed at ``renewed_by`` or earlier, per consumer."""
        out: dict[str, list[str]] = {}
        for entry_id, (consumer, at) in self._groups.get(key, {}).items():
            if at <= renewed_by:
                out.setdefault(consumer, []).append(entry_id)
        return out

    def groups(self) -> list[GroupKey]:
        return list(self._groups)


class Redeliveries:
    """Pending entries to hand out again before new ones.

    First a consumer's own pending entries that this process does not hold: left by an earlier
    run under the same name, or delivered while a reply was lost with the connection (so they
    are looked for again after every reconnect). Then entries of consumers idle past
    ``claim_idle_ms`` (XAUTOCLAIM): a pass over the pending list runs to its end, and the next
    starts a quarter idle timeout later.
    """

    def __init__(self, streams: Streams, claim_idle_ms: int) -> None:
        self.streams = streams
        self.claim_idle_ms = claim_idle_ms
        self._own_after: dict[tuple[str, str, str], str] = {}  # where the own scan resumes
        self._own_scanned: dict[tuple[str, str, str], int] = {}  # at which reconnect count
        self._cursor: dict[GroupKey, str] = {}
        self._pass_done_at: dict[GroupKey, float] = {}

    async def take(
        self, stream: str, group: str, consumer: str, count: int, held: HeldEntries
    ) -> ClaimResult:
        own = await self._own(stream, group, consumer, count, held)
        if len(own.entries) >= count or not self._idle_pass_due((stream, group)):
            return own
        idle = await self._idle(stream, group, consumer, count - len(own.entries))
        return ClaimResult(own.entries + idle.entries, own.trimmed + idle.trimmed)

    def start_over(self, key: GroupKey) -> None:
        """Released entries are due at once: the next read starts a fresh pass."""
        self._cursor.pop(key, None)
        self._pass_done_at.pop(key, None)

    async def _own(
        self, stream: str, group: str, consumer: str, count: int, held: HeldEntries
    ) -> ClaimResult:
        me = (stream, group, consumer)
        if self._own_scanned.get(me) != self.streams.reconnects:
            self._own_scanned[me] = self.streams.reconnects
            self._own_after[me] = "-"
        after = self._own_after.get(me)
        if after is None:
            return ClaimResult()
        pending = await self.streams.pending(stream, group, after, count, consumer)
        if len(pending) < count:
            del self._own_after[me]
        else:
            self._own_after[me] = pending[-1].entry_id
        mine = set(held.ids((stream, group)))
        todo = [p.entry_id for p in pending if p.entry_id not in mine]
        return await self.streams.claim(stream, group, consumer, todo) if todo else ClaimResult()

    async def _idle(self, stream: str, group: str, consumer: str, count: int) -> ClaimResult:
        key = (stream, group)
        cursor, ids, trimmed = await self.streams.autoclaim(
            stream, group, consumer, self.claim_idle_ms, self._cursor.get(key, "0-0"), count
        )
        self._cursor[key] = cursor
        if cursor in ("0-0", "0"):
            self._pass_done_at[key] = time.monotonic()
        if not ids:
            return ClaimResult([], trimmed)
        claim = await self.streams.claim(stream, group, consumer, ids)
        if claim.entries:
            n = len(claim.entries)
            log.info("reclaimed %d idle entries of %s/%s for %s", n, stream, group, consumer)
        return ClaimResult(claim.entries, trimmed + claim.trimmed)

    def _idle_pass_due(self, key: GroupKey) -> bool:
        if self._cursor.get(key, "0-0") not in ("0-0", "0"):
            return True
        done = self._pass_done_at.get(key)
        return done is None or time.monotonic() - done >= self.claim_idle_ms / 4000.0


class DeliveryPolicy:
    """Renews what this process holds, hands out redeliveries, counts deliveries and
    dead-letters what must not pass (see the module docstring)."""

    def __init__(
        self,
        streams: Streams,
        *,
        dead_letter_stream: str,
        claim_idle_ms: int,
        max_deliveries: int,
        limits: WireLimits = DEFAULT_LIMITS,
    ) -> None:
        self.streams = streams
        self.dead_letter_stream = dead_letter_stream
        self.claim_idle_ms = claim_idle_ms
        self.max_deliveries = max_deliveries
        self.limits = limits
        self.held = HeldEntries()
        self.redeliveries = Redeliveries(streams, claim_idle_ms)

    async def renew(
        self,
        stream: str,
        group: str,
        *,
        every_held: bool = False,
        only: Iterable[str] | None = None,
    ) -> None:
        """Reset the idle time of held entries not renewed for a third of ``claim_idle_ms``
        (``every_held``: of all of them); ``only``: of those among these ids."""
        key, now = (stream, group), time.monotonic()
        due_by = math.inf if every_held else now - self.claim_idle_ms / 3000.0
        wanted = None if only is None else set(only)
        for consumer, held in self.held.by_consumer(key, due_by).items():
            ids = held if wanted is None else [i for i in held if i in wanted]
            if ids:
                await self.streams.touch(stream, group, consumer, ids, 0)
                self.held.add(key, consumer, ids, now)

    async def redeliver(self, stream: str, group: str, consumer: str, count: int) -> ClaimResult:
        return await self.redeliveries.take(stream, group, consumer, count, self.held)

    async def admit(
        self,
        stream: str,
        group: str,
        consumer: str,
        entries: list[RawEntry],
        trimmed: list[str],
        kind: str | None,
    ) -> list[Delivery[Any]]:
        """Deliveries of the entries that may pass; the others are dead-lettered and acked."""
        passed: list[Delivery[Any]] = []
        dead: list[DeadLetter] = []
        seen: set[str] = set()
        for raw in [RawEntry(i, None, 0) for i in trimmed] + entries:
            if raw.entry_id in seen:
                continue
            seen.add(raw.entry_id)
            got = decode_entry(
                raw,
                kind,
                stream,
                group,
                consumer,
                limits=self.limits,
                max_deliveries=self.max_deliveries,
            )
            if isinstance(got, DeadLetter):
                log.warning("dead-lettering %s %s: %s", stream, raw.entry_id, got.reason)
                dead.append(got)
            else:
                passed.append(got)
        # Dead letters first: if writing them fails, the read fails with nothing held, and the
        # entries (left pending) come back after claim_idle_ms.
        await self.bury(dead)
        self.held.add((stream, group), consumer, [d.entry_id for d in passed], time.monotonic())
        return passed

    async def bury(self, letters: Sequence[DeadLetter]) -> list[str]:
        """Write dead letters and ack the entries they came from, in one transaction. The
        entries are no longer held afterwards, even if that fails (see the module docstring)."""
        if not letters:
            return []
        acks = [(d.stream, d.group, d.source_id) for d in letters if d.group]
        records = [d.fields() for d in letters]
        try:
            return await self.streams.add(self.dead_letter_stream, records, acks)
        finally:
            for stream, group, entry_id in acks:
                self.held.drop((stream, group), [entry_id])

    async def release(self, deliveries: Iterable[Delivery[Any]]) -> None:
        """Make deliveries due for redelivery at once (idle for ``claim_idle_ms`` already).
        They are no longer held afterwards, even if that fails (see the module docstring)."""
        groups = by_group(deliveries)
        try:
            for key, by_consumer in groups.items():
                for consumer, ids in by_consumer.items():
                    await self.streams.touch(*key, consumer, ids, self.claim_idle_ms)
                self.redeliveries.start_over(key)
        finally:
            self.forget(groups)

    def forget(self, groups: dict[GroupKey, dict[str, list[str]]]) -> None:
        """Stop holding entries (ids per group and consumer, as :func:`by_group` gives them)
        without telling the server: they stay pending until reclaimed after ``claim_idle_ms``."""
        for key, by_consumer in groups.items():
            for ids in by_consumer.values():
                self.held.drop(key, ids)

    async def release_all(self) -> None:
        for key in self.held.groups():
            for consumer, ids in self.held.by_consumer(key).items():
                await self.streams.touch(*key, consumer, ids, self.claim_idle_ms)
        self.held = HeldEntries()


def by_group(deliveries: Iterable[Delivery[Any]]) -> dict[GroupKey, dict[str, list[str]]]:
    """Entry ids per (stream, group) and consumer; deliveries read outside a group are left
    out, since nothing is pending for them."""
    out: dict[GroupKey, dict[str, list[str]]] = {}
    for d in deliveries:
        if d.group:
            out.setdefault((d.stream, d.group), {}).setdefault(d.consumer, []).append(d.entry_id)
    return out
