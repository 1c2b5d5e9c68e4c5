"""The bus over Redis Streams (Redis 6.2+ and 7.x), surviving Redis restarts.

Every command runs under a deadline and is retried with bounded exponential backoff on
connection loss, timeouts and a server still loading its AOF, so a Redis restart pauses the
services instead of crashing them. A consumer group that vanished (Redis restarted without
persistence) is recreated on the spot.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.connection import parse_url
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    ReadOnlyError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from services.transport.base import (
    Bus,
    BusError,
    BusUnavailable,
    ClaimResult,
    GroupStats,
    RawEntry,
    StreamStats,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

_RETRYABLE = (RedisConnectionError, RedisTimeoutError, TimeoutError, ReadOnlyError, OSError)
#: Pending entries fetched per round trip when listing them (XPENDING, then XRANGE per id):
#: small enough for a reply well inside ``op_timeout_s``.
PENDING_PAGE = 500


def redact_url(url: str) -> str:
    """The URL with its password replaced, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def connection_kwargs(url: str) -> dict[str, Any]:
    """Connection settings from ``redis[s]://[user[:password]@]host[:port][/db][?opts]``.

    ``rediss://`` means TLS; ``?ssl_ca_certs=FILE`` names a private CA and
    ``?ssl_cert_reqs=none`` turns verification off. The db is the path or ``?db=N``.
    Percent-encode reserved characters in the user name and password.
    """
    scheme = urlsplit(url).scheme
    if scheme not in ("redis", "rediss", "unix"):
        raise BusError(
            f"bus URL {redact_url(url)!r} must start with redis://, rediss:// (TLS), unix:// "
            "or memory://"
        )
    try:
        kwargs: dict[str, Any] = dict(parse_url(url))
    except ValueError as exc:
        raise BusError(f"bus URL {redact_url(url)!r} is invalid: {exc}") from None
    path = urlsplit(url).path.strip("/")
    if scheme != "unix" and path and not path.isdigit():
        raise BusError(f"bus URL {redact_url(url)!r}: the path must be a database number")
    kwargs["ssl"] = scheme == "rediss"
    return kwargs


def _fatal(exc: BaseException) -> bool:
    """Errors that no amount of retrying fixes: credentials, certificates."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (AuthenticationError, ssl.SSLCertVerificationError)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisBus(Bus):
    """:class:`Bus` on Redis Streams; build it with :func:`services.transport.make_bus`."""

    def __init__(
        self,
        url: str,
        *,
        reconnect_timeout_s: float = 120.0,
        backoff_min_s: float = 0.05,
        backoff_max_s: float = 2.0,
        op_timeout_s: float = 10.0,
        **settings: Any,
    ) -> None:
        super().__init__(**settings)
        connection_kwargs(url)  # validate early, with a clear message
        self.url = url
        self.reconnect_timeout_s = reconnect_timeout_s
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self.op_timeout_s = op_timeout_s
        # Deadlines are enforced per operation below (blocking reads need longer ones), and
        # retries happen here, with backoff, so redis-py's own are turned off.
        self._r: aioredis.Redis = aioredis.Redis.from_url(
            url,
            socket_timeout=None,
            socket_connect_timeout=5.0,
            retry=Retry(NoBackoff(), 0),
            decode_responses=False,
        )
        self._r.set_response_callback("XAUTOCLAIM", lambda response, **_: response)

    # ------------------------------------------------------------------ retries

    async def _call(
        self, what: str, op: Callable[[], Awaitable[T]], *, timeout: float | None = None
    ) -> T:
        """Run ``op`` under a deadline; on connection trouble back off and retry until
        ``reconnect_timeout_s`` has passed without success."""
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        delay = self.backoff_min_s
        while True:
            try:
                async with asyncio.timeout(timeout or self.op_timeout_s):
                    return await op()
            except _RETRYABLE as exc:
                if _fatal(exc):
                    raise BusError(
                        f"cannot use Redis at {redact_url(self.url)}: {exc}. Check the user, "
                        "password and TLS settings in the bus URL."
                    ) from exc
                now = loop.time()
                if deadline is None:
                    deadline = now + self.reconnect_timeout_s
                    self._epoch += 1
                    log.warning("%s: Redis unavailable (%s); reconnecting", what, exc)
                if now >= deadline:
                    raise BusUnavailable(
                        f"Redis at {redact_url(self.url)} unreachable for "
                        f"{self.reconnect_timeout_s:.0f} s ({what}: {exc}). Make sure the server "
                        "is running and the bus URL is right."
                    ) from exc
                await asyncio.sleep(min(delay * random.uniform(0.5, 1.0), deadline - now))
                delay = min(delay * 2, self.backoff_max_s)

    async def _group_call(
        self,
        what: str,
        stream: str,
        group: str,
        op: Callable[[], Awaitable[T]],
        *,
        timeout: float | None = None,
    ) -> T:
        """:meth:`_call`, recreating the group if Redis lost it (restart without persistence)."""
        try:
            return await self._call(what, op, timeout=timeout)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
        log.warning("group %s of %s is gone (Redis lost its data?); recreating it", group, stream)
        await self._ensure_group(stream, group, "0")
        return await self._call(what, op, timeout=timeout)

    # ------------------------------------------------------------------ primitives

    async def _add(self, stream: str, fields: Sequence[dict[bytes, bytes]]) -> list[str]:
        async def op() -> list[Any]:
            pipe = self._r.pipeline(transaction=False)
            for f in fields:
                pipe.xadd(stream, f, maxlen=self.maxlen, approximate=True)  # type: ignore[arg-type]
            return await pipe.execute()

        return [_s(i) for i in await self._call("XADD", op)]

    async def _ensure_group(self, stream: str, group: str, start_id: str) -> None:
        async def op() -> None:
            try:
                await self._r.xgroup_create(stream, group, id=start_id, mkstream=True)
            except ResponseError as exc:
                if not str(exc).startswith("BUSYGROUP"):
                    raise

        await self._call("XGROUP CREATE", op)

    async def _read_new(
        self, stream: str, group: str, consumer: str, count: int, block_ms: int
    ) -> list[RawEntry]:
        async def op() -> Any:
            return await self._r.xreadgroup(
                group, consumer, {stream: ">"}, count=count, block=block_ms or None
            )

        resp = await self._group_call(
            "XREADGROUP", stream, group, op, timeout=block_ms / 1000 + self.op_timeout_s
        )
        return [RawEntry(_s(i), f) for _, entries in resp or () for i, f in entries]

    async def _autoclaim_ids(
        self, stream: str, group: str, consumer: str, min_idle_ms: int, cursor: str, count: int
    ) -> tuple[str, list[str], list[str]]:
        async def op() -> Any:
            return await self._r.execute_command(  # type: ignore[no-untyped-call]
                "XAUTOCLAIM", stream, group, consumer, min_idle_ms, cursor, "COUNT", count, "JUSTID"
            )

        resp = await self._group_call("XAUTOCLAIM", stream, group, op)
        trimmed = [_s(i) for i in resp[2]] if len(resp) > 2 else []  # Redis 7 reports these
        return _s(resp[0]), [_s(i) for i in resp[1]], trimmed

    async def _claim(
        self, stream: str, group: str, consumer: str, ids: Sequence[str]
    ) -> ClaimResult:
        async def op() -> list[Any]:
            pipe = self._r.pipeline(transaction=False)
            pipe.xclaim(stream, group, consumer, 0, list(ids))
            for i in ids:
                pipe.xpending_range(stream, group, min=i, max=i, count=1)
            return await pipe.execute()

        claimed, *pending = await self._group_call("XCLAIM", stream, group, op)
        fields = {_s(i): f for i, f in claimed if i is not None}
        entries: list[RawEntry] = []
        trimmed: list[str] = []
        for rows in pending:
            for row in rows:
                entry_id = _s(row["message_id"])
                if entry_id in fields:
                    entries.append(
                        RawEntry(entry_id, fields[entry_id], int(row["times_delivered"]))
                    )
                else:
                    # Still pending but XCLAIM returned no entry: Redis 6.2's way of saying the
                    # entry was trimmed away (7.x drops such ids and XAUTOCLAIM reports them).
                    trimmed.append(entry_id)
        return ClaimResult(entries, trimmed)

    async def _own_pending(
        self, stream: str, group: str, consumer: str, after: str, count: int
    ) -> list[str]:
        async def op() -> Any:
            return await self._r.xpending_range(
                stream,
                group,
                min="-" if after == "-" else f"({after}",
                max="+",
                count=count,
                consumername=consumer,
            )

        rows = await self._group_call("XPENDING", stream, group, op)
        return [_s(r["message_id"]) for r in rows]

    async def _touch(
        self, stream: str, group: str, consumer: str, ids: Sequence[str], idle_ms: int
    ) -> None:
        async def op() -> Any:
            return await self._r.xclaim(
                stream, group, consumer, 0, list(ids), idle=idle_ms or None, justid=True
            )

        await self._group_call("XCLAIM", stream, group, op)

    async def _ack(self, stream: str, group: str, ids: Sequence[str]) -> int:
        async def op() -> Any:
            return await self._r.xack(stream, group, *ids)

        return int(await self._group_call("XACK", stream, group, op))

    async def _dead_letter(
        self, records: Sequence[dict[bytes, bytes]], acks: Sequence[tuple[str, str, str]]
    ) -> list[str]:
        async def op() -> list[Any]:
            # MULTI/EXEC: the record and the ack land together or not at all.
            pipe = self._r.pipeline(transaction=True)
            for rec in records:
                pipe.xadd(self.dead_letter_stream, rec, maxlen=self.maxlen, approximate=True)  # type: ignore[arg-type]
            for stream, group, entry_id in acks:
                pipe.xack(stream, group, entry_id)
            return await pipe.execute()

        results = await self._call("dead letter", op)
        return [_s(i) for i in results[: len(records)]]

    async def _newest(self, stream: str, count: int) -> list[RawEntry]:
        rows: Any = await self._call(
            "XREVRANGE", lambda: self._r.xrevrange(stream, "+", "-", count=count)
        )
        return [RawEntry(_s(i), f, 0) for i, f in rows]

    async def _read_after(
        self, stream: str, after: str, count: int, block_ms: int
    ) -> list[RawEntry]:
        async def op() -> Any:
            return await self._r.xread({stream: after}, count=count, block=block_ms or None)

        resp = await self._call("XREAD", op, timeout=block_ms / 1000 + self.op_timeout_s)
        return [RawEntry(_s(i), f, 0) for _, entries in resp or () for i, f in entries]

    async def _range(self, stream: str, after: str, count: int) -> list[RawEntry]:
        lo = "-" if after == "-" else f"({after}"
        rows: Any = await self._call("XRANGE", lambda: self._r.xrange(stream, lo, "+", count=count))
        return [RawEntry(_s(i), f, 0) for i, f in rows]

    async def _groups(self, stream: str) -> list[dict[str, Any]]:
        async def op() -> list[dict[str, Any]]:
            try:
                return list(await self._r.xinfo_groups(stream))
            except ResponseError as exc:
                if "no such key" in str(exc).lower():
                    return []
                raise

        return await self._call("XINFO GROUPS", op)

    async def _unacked(
        self, stream: str, group: str, limit: int, *, pending: bool
    ) -> list[RawEntry]:
        info = next((g for g in await self._groups(stream) if _s(g["name"]) == group), None)
        if info is None:
            return await self._range(stream, "-", limit)
        last_delivered = _s(info["last-delivered-id"])
        held = await self._pending_entries(stream, group, limit) if pending else []
        return held + await self._range(stream, last_delivered, limit)

    async def _pending_entries(self, stream: str, group: str, limit: int) -> list[RawEntry]:
        """Up to ``limit`` pending entries with their fields, oldest first, a page per round
        trip: a trainer between checkpoints holds thousands, too many for one reply."""
        out: list[RawEntry] = []
        after = "-"
        while len(out) < limit:
            page = min(PENDING_PAGE, limit - len(out))
            lo = after if after == "-" else f"({after}"

            async def op(lo: str = lo, page: int = page) -> tuple[list[Any], list[Any]]:
                rows = await self._r.xpending_range(stream, group, min=lo, max="+", count=page)
                if not rows:
                    return [], []
                pipe = self._r.pipeline(transaction=False)
                for row in rows:
                    pipe.xrange(stream, row["message_id"], row["message_id"], count=1)
                return rows, await pipe.execute()

            rows, found = await self._group_call("XPENDING", stream, group, op)
            # An id whose entry was trimmed away has no fields: it holds no message.
            out += [
                RawEntry(_s(row["message_id"]), hit[0][1], int(row["times_delivered"]))
                for row, hit in zip(rows, found, strict=True)
                if hit
            ]
            if len(rows) < page:
                break
            after = _s(rows[-1]["message_id"])
        return out

    async def stats(self, stream: str) -> StreamStats:
        length = int(await self._call("XLEN", lambda: self._r.xlen(stream)))
        groups = tuple(
            GroupStats(
                name=_s(g["name"]),
                consumers=int(g["consumers"]),
                pending=int(g["pending"]),
                last_delivered_id=_s(g["last-delivered-id"]),
                lag=None if g.get("lag") is None else int(g["lag"]),
            )
            for g in await self._groups(stream)
        )
        return StreamStats(stream, length, groups)

    async def close(self) -> None:
        try:
            async with asyncio.timeout(2.0):
                await self._release_all_held()
        except Exception as exc:  # shutting down: pending entries get reclaimed anyway
            log.warning("could not release held entries on close: %s", exc)
        await self._r.aclose()
