"""Streams on a Redis server (6.2+ and 7.x) that outlive Redis restarts.

Every command runs under a deadline. Connection loss, a timeout, a server still loading its
data (``LOADING``) or a replica in a failover (``READONLY``) is retried with exponential
backoff and full jitter (tenacity) for up to ``reconnect_timeout_s``, then
:class:`BusUnavailable` is raised; wrong credentials and untrusted certificates fail at once.
A consumer group that vanished (Redis restarted without persistence) is recreated on the spot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, ReadOnlyError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_delay,
    wait_random_exponential,
)

from services.transport.entries import RawEntry
from services.transport.streams import (
    BusError,
    BusUnavailable,
    ClaimResult,
    ConsumerGroupStats,
    Fields,
    Streams,
    StreamStats,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# Entries below the oldest one any group still needs (pending, or after its last delivered
# id) are acknowledged by every group; one script, so no delivery can slip in between.
_TRIM_CONSUMED = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
if #groups == 0 then
  local keep = tonumber(ARGV[1])
  if keep > 0 then return redis.call('XTRIM', KEYS[1], 'MAXLEN', keep) end
  return 0
end
local function parse(id)
  local dash = string.find(id, '-')
  return {tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))}
end
local function less(a, b) return a[1] < b[1] or (a[1] == b[1] and a[2] < b[2]) end
local floor = nil
for _, g in ipairs(groups) do
  local info = {}
  for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
  local last = parse(info['last-delivered-id'])
  local candidate = {last[1], last[2] + 1}
  if tonumber(info['pending']) > 0 then
    local summary = redis.call('XPENDING', KEYS[1], info['name'])
    local oldest = parse(summary[2])
    if less(oldest, candidate) then candidate = oldest end
  end
  if floor == nil or less(candidate, floor) then floor = candidate end
end
return redis.call('XTRIM', KEYS[1], 'MINID', string.format('%d-%d', floor[1], floor[2]))
"""

_TRANSIENT = (RedisConnectionError, RedisTimeoutError, TimeoutError, ReadOnlyError, OSError)


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


def _refused(exc: BaseException) -> bool:
    """Errors that no amount of retrying fixes: credentials, certificates."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (AuthenticationError, ssl.SSLCertVerificationError)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, _TRANSIENT) and not _refused(exc)


class GroupMissing(ResponseError):
    """NOGROUP: the stream or its consumer group does not exist."""


class GroupExists(ResponseError):
    """BUSYGROUP: the consumer group to create exists already."""


def typed_error(exc: ResponseError) -> ResponseError:
    """The typed form of a Redis error reply the bus acts on, else ``exc`` itself.

    Redis states these conditions only by the code that starts the reply's text, and redis-py
    raises a plain ``ResponseError`` for them: this is the one place that reads the text.
    """
    code = str(exc).split(" ", 1)[0]
    typed = {"NOGROUP": GroupMissing, "BUSYGROUP": GroupExists}.get(code)
    return exc if typed is None else typed(*exc.args)


async def _execute(pipe: Pipeline) -> list[Any]:
    """Run a pipeline and raise its first error reply unchanged (redis-py's own raising
    rewrites the text, which :func:`typed_error` reads)."""
    results = await pipe.execute(raise_on_error=False)
    for result in results:
        if isinstance(result, Exception):
            raise result
    return results


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _group_stats(info: dict[str, Any]) -> ConsumerGroupStats:
    """A group as XINFO GROUPS describes it (``lag`` only on Redis 7+)."""
    lag = info.get("lag")
    return ConsumerGroupStats(
        name=_s(info["name"]),
        consumers=int(info["consumers"]),
        pending=int(info["pending"]),
        last_delivered_id=_s(info["last-delivered-id"]),
        lag=None if lag is None else int(lag),
    )


def _after(entry_id: str) -> str:
    """A range start that excludes ``entry_id`` ("-": from the first entry)."""
    return "-" if entry_id == "-" else f"({entry_id}"


class RedisStreams(Streams):
    """:class:`Streams` on Redis; :func:`services.transport.make_bus` builds a bus on it."""

    def __init__(
        self,
        url: str,
        *,
        maxlen: int = 100_000,
        reconnect_timeout_s: float = 120.0,
        backoff_min_s: float = 0.05,
        backoff_max_s: float = 2.0,
        op_timeout_s: float = 10.0,
    ) -> None:
        super().__init__(maxlen)
        connection_kwargs(url)  # validate early, with a clear message
        self.url = url
        self.reconnect_timeout_s = reconnect_timeout_s
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self.op_timeout_s = op_timeout_s
        # Retries happen in _call, around each command, with a deadline in seconds. redis-py's
        # own retry is off: it counts attempts, and it would retry a wrong password (an
        # AuthenticationError is a ConnectionError to it). Blocking reads need a deadline of
        # their own, so there is no socket timeout either.
        self.redis: aioredis.Redis = aioredis.Redis.from_url(
            url,
            socket_timeout=None,
            socket_connect_timeout=5.0,
            retry=Retry(NoBackoff(), 0),
            decode_responses=False,
        )
        self.redis.set_response_callback("XAUTOCLAIM", lambda response, **_: response)

    # ------------------------------------------------------------------ retries

    async def _call(
        self, what: str, op: Callable[[], Awaitable[T]], *, timeout: float | None = None
    ) -> T:
        """Run ``op`` under a deadline, retrying as the module docstring says."""

        async def attempt() -> T:
            async with asyncio.timeout(timeout or self.op_timeout_s):
                return await op()

        retrying = AsyncRetrying(
            retry=retry_if_exception(_transient),
            wait=wait_random_exponential(multiplier=self.backoff_min_s, max=self.backoff_max_s),
            stop=stop_after_delay(self.reconnect_timeout_s),
            before_sleep=lambda state: self._reconnecting(what, state),
            reraise=True,
        )
        try:
            return await retrying(attempt)
        except _TRANSIENT as exc:
            if _refused(exc):
                raise BusError(
                    f"cannot use Redis at {redact_url(self.url)}: {exc}. Check the user, "
                    "password and TLS settings in the bus URL."
                ) from exc
            raise BusUnavailable(
                f"Redis at {redact_url(self.url)} unreachable for "
                f"{self.reconnect_timeout_s:.0f} s ({what}: {exc}). Make sure the server "
                "is running and the bus URL is right."
            ) from exc
        except ResponseError as exc:
            raise typed_error(exc) from None

    def _reconnecting(self, what: str, state: RetryCallState) -> None:
        if state.attempt_number == 1:
            self.reconnects += 1
            exc = state.outcome.exception() if state.outcome else None
            log.warning("%s: Redis unavailable (%s); reconnecting", what, exc)

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
        except GroupMissing:
            log.warning("group %s of %s is gone (Redis lost its data?); recreating", group, stream)
        await self.ensure_group(stream, group, "0")
        return await self._call(what, op, timeout=timeout)

    # ------------------------------------------------------------------ commands

    async def add(
        self, stream: str, entries: Sequence[Fields], acks: Sequence[tuple[str, str, str]] = ()
    ) -> list[str]:
        async def op() -> list[Any]:
            pipe = self.redis.pipeline(transaction=bool(acks))  # MULTI/EXEC with acks
            for f in entries:
                pipe.xadd(stream, f, maxlen=self.maxlen, approximate=True)  # type: ignore[arg-type]
            for source, group, entry_id in acks:
                pipe.xack(source, group, entry_id)
            return await _execute(pipe)

        return [_s(i) for i in (await self._call("XADD", op))[: len(entries)]]

    async def ensure_group(self, stream: str, group: str, start_id: str) -> None:
        with contextlib.suppress(GroupExists):
            await self._call(
                "XGROUP CREATE",
                lambda: self.redis.xgroup_create(stream, group, id=start_id, mkstream=True),
            )

    async def read_new(
        self, stream: str, group: str, consumer: str, count: int, block_ms: int
    ) -> list[RawEntry]:
        resp: Any = await self._group_call(
            "XREADGROUP",
            stream,
            group,
            lambda: self.redis.xreadgroup(
                group, consumer, {stream: ">"}, count=count, block=block_ms or None
            ),
            timeout=block_ms / 1000 + self.op_timeout_s,
        )
        return [RawEntry(_s(i), f) for _, entries in resp or () for i, f in entries]

    async def read_after(
        self, stream: str, after: str, count: int, block_ms: int
    ) -> list[RawEntry]:
        resp: Any = await self._call(
            "XREAD",
            lambda: self.redis.xread({stream: after}, count=count, block=block_ms or None),
            timeout=block_ms / 1000 + self.op_timeout_s,
        )
        return [RawEntry(_s(i), f, 0) for _, entries in resp or () for i, f in entries]

    async def newest(self, stream: str, count: int) -> list[RawEntry]:
        rows: Any = await self._call(
            "XREVRANGE", lambda: self.redis.xrevrange(stream, "+", "-", count=count)
        )
        return [RawEntry(_s(i), f, 0) for i, f in rows]

    async def pending(
        self, stream: str, group: str, after: str, count: int, consumer: str | None = None
    ) -> list[RawEntry]:
        async def op() -> tuple[list[Any], list[Any]]:
            rows = await self.redis.xpending_range(
                stream, group, min=_after(after), max="+", count=count, consumername=consumer
            )
            if not rows:
                return [], []
            pipe = self.redis.pipeline(transaction=False)
            for row in rows:
                pipe.xrange(stream, row["message_id"], row["message_id"], count=1)
            return rows, await _execute(pipe)

        rows, found = await self._group_call("XPENDING", stream, group, op)
        return [
            RawEntry(_s(row["message_id"]), hit[0][1] if hit else None, int(row["times_delivered"]))
            for row, hit in zip(rows, found, strict=True)
        ]

    async def autoclaim(
        self, stream: str, group: str, consumer: str, min_idle_ms: int, cursor: str, count: int
    ) -> tuple[str, list[str], list[str]]:
        async def op() -> Any:
            return await self.redis.execute_command(  # type: ignore[no-untyped-call]
                "XAUTOCLAIM", stream, group, consumer, min_idle_ms, cursor, "COUNT", count, "JUSTID"
            )

        resp = await self._group_call("XAUTOCLAIM", stream, group, op)
        trimmed = [_s(i) for i in resp[2]] if len(resp) > 2 else []  # Redis 7 reports these
        return _s(resp[0]), [_s(i) for i in resp[1]], trimmed

    async def claim(
        self, stream: str, group: str, consumer: str, ids: Sequence[str]
    ) -> ClaimResult:
        async def op() -> list[Any]:
            pipe = self.redis.pipeline(transaction=False)
            pipe.xclaim(stream, group, consumer, 0, list(ids))
            for i in ids:
                pipe.xpending_range(stream, group, min=i, max=i, count=1)
            return await _execute(pipe)

        claimed, *pending = await self._group_call("XCLAIM", stream, group, op)
        fields = {_s(i): f for i, f in claimed if i is not None}
        out = ClaimResult()
        for row in (row for rows in pending for row in rows):
            entry_id = _s(row["message_id"])
            if entry_id in fields:
                out.entries.append(
                    RawEntry(entry_id, fields[entry_id], int(row["times_delivered"]))
                )
            else:
                # Still pending but XCLAIM returned no entry: Redis 6.2's way of saying the
                # entry was trimmed away (7.x drops such ids and XAUTOCLAIM reports them).
                out.trimmed.append(entry_id)
        return out

    async def touch(
        self, stream: str, group: str, consumer: str, ids: Sequence[str], idle_ms: int
    ) -> None:
        idle = idle_ms or None
        await self._group_call(
            "XCLAIM",
            stream,
            group,
            lambda: self.redis.xclaim(
                stream, group, consumer, 0, list(ids), idle=idle, justid=True
            ),
        )

    async def ack(self, stream: str, group: str, ids: Sequence[str]) -> int:
        return int(
            await self._group_call(
                "XACK", stream, group, lambda: self.redis.xack(stream, group, *ids)
            )
        )

    async def put_blob(self, key: str, data: bytes) -> bool:
        return bool(await self._call("SET", lambda: self.redis.set(key, data, nx=True)))

    async def get_blob(self, key: str) -> bytes | None:
        value = await self._call("GET", lambda: self.redis.get(key))
        return None if value is None else bytes(value)

    async def trim_consumed(self, stream: str, keep_last: int = 0) -> int:
        async def op() -> Any:
            return await self.redis.eval(_TRIM_CONSUMED, 1, stream, keep_last)  # type: ignore[no-untyped-call]

        return int(await self._call("XTRIM", op))

    async def stats(self, stream: str) -> StreamStats:
        async def op() -> list[Any]:
            # One transaction, so "does not exist" is read from EXISTS, not from XINFO's error.
            pipe = self.redis.pipeline(transaction=True)
            pipe.exists(stream)
            pipe.xlen(stream)
            pipe.xinfo_groups(stream)
            return await pipe.execute(raise_on_error=False)

        exists, length, groups = await self._call("XINFO GROUPS", op)
        if not exists:
            return StreamStats(stream, 0)
        for result in (length, groups):
            if isinstance(result, Exception):
                raise result
        return StreamStats(stream, int(length), tuple(_group_stats(g) for g in groups))

    async def close(self) -> None:
        await self.redis.aclose()
