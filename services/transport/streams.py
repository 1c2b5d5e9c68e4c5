"""What a bus needs from a stream server: the Redis Streams commands it uses, nothing more.

Two backends implement :class:`Streams`: :class:`~services.transport.redis_streams.RedisStreams`
and its in-memory twin :class:`~services.transport.memory_streams.MemoryStreams`. Neither
decides anything about delivery (decoding, reclaiming, renewing, dead-lettering): that is
:class:`~services.transport.delivery.DeliveryPolicy`, one code for both.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

from services.transport.entries import RawEntry

Fields = dict[bytes, bytes]


class BusError(RuntimeError):
    """The bus cannot do what was asked; the message says what to fix."""


class BusUnavailable(BusError):
    """Redis stayed unreachable past the reconnect deadline."""


def id_key(entry_id: str) -> tuple[int, int]:
    """Sort key of a stream id ``ms-seq``."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True)
class ConsumerGroupStats:
    name: str
    consumers: int
    pending: int  # delivered, not yet acknowledged
    last_delivered_id: str
    lag: int | None  # entries not yet delivered; None where Redis (< 7) does not report it


@dataclass(frozen=True)
class StreamStats:
    stream: str
    length: int
    groups: tuple[ConsumerGroupStats, ...] = ()

    def group(self, name: str) -> ConsumerGroupStats | None:
        return next((g for g in self.groups if g.name == name), None)


@dataclass(frozen=True)
class ClaimResult:
    entries: list[RawEntry] = field(default_factory=list)
    trimmed: list[str] = field(default_factory=list)  # pending ids whose entry no longer exists


class Streams(ABC):
    """Stream commands with Redis semantics. A group that is missing when a command needs it
    is created at ``0`` (what Redis looks like after a restart without persistence)."""

    #: Bumped whenever the connection had to be re-established: a reply lost with it may have
    #: delivered entries, so consumers then take back their own pending ones.
    reconnects: int = 0

    def __init__(self, maxlen: int) -> None:
        if maxlen < 1:
            raise BusError("maxlen must be >= 1")
        self.maxlen = maxlen

    @abstractmethod
    async def add(
        self, stream: str, entries: Sequence[Fields], acks: Sequence[tuple[str, str, str]] = ()
    ) -> list[str]:
        """XADD each entry (capped at ~maxlen) in one round trip; their ids. With ``acks``,
        (stream, group, id) triples, also XACK those, all in one MULTI/EXEC."""

    @abstractmethod
    async def ensure_group(self, stream: str, group: str, start_id: str) -> None:
        """XGROUP CREATE ... MKSTREAM; an existing group is left as it is."""

    @abstractmethod
    async def read_new(
        self, stream: str, group: str, consumer: str, count: int, block_ms: int
    ) -> list[RawEntry]:
        """XREADGROUP ... >: entries never delivered to the group; block_ms 0 does not block."""

    @abstractmethod
    async def read_after(
        self, stream: str, after: str, count: int, block_ms: int
    ) -> list[RawEntry]:
        """XREAD: entries with id > ``after`` (``0`` for all), outside any group."""

    @abstractmethod
    async def newest(self, stream: str, count: int) -> list[RawEntry]:
        """XREVRANGE: the newest entries, newest first."""

    @abstractmethod
    async def pending(
        self, stream: str, group: str, after: str, count: int, consumer: str | None = None
    ) -> list[RawEntry]:
        """XPENDING: pending entries with id > ``after`` ("-" for all), oldest first, with their
        delivery counts and fields (None where the entry was trimmed away)."""

    @abstractmethod
    async def autoclaim(
        self, stream: str, group: str, consumer: str, min_idle_ms: int, cursor: str, count: int
    ) -> tuple[str, list[str], list[str]]:
        """XAUTOCLAIM ... JUSTID: (next cursor, claimed ids, ids whose entry was trimmed)."""

    @abstractmethod
    async def claim(
        self, stream: str, group: str, consumer: str, ids: Sequence[str]
    ) -> ClaimResult:
        """XCLAIM ``ids`` for ``consumer``, counting a delivery; entries with their counts."""

    @abstractmethod
    async def touch(
        self, stream: str, group: str, consumer: str, ids: Sequence[str], idle_ms: int
    ) -> None:
        """XCLAIM ... IDLE JUSTID: set the idle time of pending ids, counting no delivery."""

    @abstractmethod
    async def ack(self, stream: str, group: str, ids: Sequence[str]) -> int:
        """XACK; how many were still pending."""

    @abstractmethod
    async def put_blob(self, key: str, data: bytes) -> bool:
        """SET ``key`` to ``data`` unless it exists (content-addressed values never change);
        whether it was written."""

    @abstractmethod
    async def get_blob(self, key: str) -> bytes | None:
        """GET ``key``; None when it does not exist."""

    @abstractmethod
    async def trim_consumed(self, stream: str, keep_last: int = 0) -> int:
        """Remove the entries every consumer group has acknowledged (below the oldest one
        pending or undelivered in any group), atomically; a stream without groups keeps its
        newest ``keep_last`` (0: is left as it is). How many entries went."""

    @abstractmethod
    async def stats(self, stream: str) -> StreamStats:
        """XLEN and XINFO GROUPS; an absent stream has length 0 and no groups."""

    @abstractmethod
    async def close(self) -> None: ...
