"""The bus: publish messages to streams and consume them through consumer groups.

The rule the API is built around: **acknowledge only after the effect is durable.** ``read``
hands out deliveries that stay pending (and are redelivered if this process dies) until
``ack``; ``processing`` wraps the common case of an effect that is durable when the block ends.
Which entries a read hands out, and which it dead-letters instead, is the
:class:`~services.transport.delivery.DeliveryPolicy`; docs/bus.md states the guarantees.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, overload

from services.core.schemas import DEFAULT_LIMITS, Message, WireLimits, encode
from services.transport import names
from services.transport.delivery import DeliveryPolicy, by_group
from services.transport.entries import DeadLetter, Delivery, M
from services.transport.reader import StreamReader
from services.transport.streams import BusError, Streams

log = logging.getLogger(__name__)


class Bus(StreamReader):
    """Producer and consumer of versioned messages over ``streams`` (Redis or memory).

    An entry is pending from its delivery until ``ack``; entries of a consumer that stops
    renewing them are redelivered to another after ``claim_idle_ms``; an entry that cannot be
    decoded, breaks one of the bounds of ``limits``, or was delivered more than
    ``max_deliveries`` times, is dead-lettered. Publishing is at-least-once: consumers
    recognise a repeat by the message's stable id.
    """

    def __init__(
        self,
        streams: Streams,
        *,
        dead_letter_stream: str = "mapo:dead",
        block_ms: int = 1000,
        claim_idle_ms: int = 60_000,
        max_deliveries: int = 5,
        batch: int = 32,
        kinds: Mapping[str, str] | None = None,
        limits: WireLimits = DEFAULT_LIMITS,
    ) -> None:
        if max_deliveries < 1 or claim_idle_ms < 1 or batch < 1:
            raise BusError("max_deliveries, claim_idle_ms and batch must be >= 1")
        super().__init__(
            streams,
            dead_letter_stream=dead_letter_stream,
            block_ms=block_ms,
            kinds=kinds,
            limits=limits,
        )
        self.batch = batch
        self.delivery = DeliveryPolicy(
            streams,
            dead_letter_stream=dead_letter_stream,
            claim_idle_ms=claim_idle_ms,
            max_deliveries=max_deliveries,
            limits=limits,
        )

    @property
    def claim_idle_ms(self) -> int:
        return self.delivery.claim_idle_ms

    @property
    def max_deliveries(self) -> int:
        return self.delivery.max_deliveries

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
        return await self.streams.add(stream, [{names.PAYLOAD_FIELD: bytes(p)} for p in payloads])

    async def ensure_group(self, stream: str, group: str, start_id: str = "0") -> None:
        """Create the group (and the stream) if missing; an existing group is left as it is.

        The default start ``0`` means entries published before the group existed are still
        delivered, so a producer that starts first loses nothing.
        """
        await self.streams.ensure_group(stream, group, start_id)

    # ------------------------------------------------------------------ consuming

    @overload
    async def read(
        self, stream: str, group: str, consumer: str, count: int | None = None,
        block_ms: int | None = None, *, expect: type[M],
    ) -> list[Delivery[M]]: ...  # fmt: skip

    @overload
    async def read(
        self, stream: str, group: str, consumer: str, count: int | None = None,
        block_ms: int | None = None, *, expect: None = None,
    ) -> list[Delivery[Any]]: ...  # fmt: skip

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
        """Up to ``count`` deliveries for ``consumer``: redeliveries first (its own unfinished
        entries after a restart or reconnect, then entries of consumers idle too long), then
        new ones, waiting up to ``block_ms`` only when there is nothing else.

        Entries that must not pass are dead-lettered and acked here, never returned. Every
        returned delivery stays pending until :meth:`ack`.
        """
        count = count or self.batch
        block = self.block_ms if block_ms is None else block_ms
        kind = self._kind(stream, expect)
        await self.delivery.renew(stream, group)
        again = await self.delivery.redeliver(stream, group, consumer, count)
        entries, trimmed = again.entries, again.trimmed
        if len(entries) < count:
            wait = 0 if entries or trimmed else block
            new = await self.streams.read_new(stream, group, consumer, count - len(entries), wait)
            entries = entries + new
        return await self.delivery.admit(stream, group, consumer, entries, trimmed, kind)

    async def ack(self, stream: str, group: str, entry_ids: Iterable[str]) -> int:
        """Acknowledge entries whose effect is durable; returns how many were still pending."""
        ids = list(entry_ids)
        if not ids:
            return 0
        n = await self.streams.ack(stream, group, ids)
        self.delivery.held.drop((stream, group), ids)
        return n

    async def ack_deliveries(self, deliveries: Iterable[Delivery[Any]]) -> int:
        """:meth:`ack` for deliveries from any streams and groups."""
        total = 0
        for (stream, group), by_consumer in by_group(deliveries).items():
            total += await self.ack(stream, group, [i for ids in by_consumer.values() for i in ids])
        return total

    async def release(self, deliveries: Iterable[Delivery[Any]]) -> None:
        """Give deliveries back unfinished: they are redelivered on the next read of any
        consumer, and the attempt counts toward ``max_deliveries``. If telling the server
        fails, the deliveries are still no longer held (as with :meth:`forget`)."""
        await self.delivery.release(deliveries)

    def forget(self, deliveries: Iterable[Delivery[Any]]) -> None:
        """Stop holding deliveries without telling the server: nothing renews them any more,
        so another consumer reclaims them after ``claim_idle_ms``. For work abandoned when
        neither ack, release nor dead-lettering went through."""
        self.delivery.forget(by_group(deliveries))

    @overload
    def processing(
        self, stream: str, group: str, consumer: str, count: int | None = None,
        block_ms: int | None = None, *, expect: type[M],
    ) -> AbstractAsyncContextManager[list[Delivery[M]]]: ...  # fmt: skip

    @overload
    def processing(
        self, stream: str, group: str, consumer: str, count: int | None = None,
        block_ms: int | None = None, *, expect: None = None,
    ) -> AbstractAsyncContextManager[list[Delivery[Any]]]: ...  # fmt: skip

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
        """Read a batch; ack it when the block finishes, release it if the block raises. If the
        ack fails, the batch is no longer held either: it is reclaimed after ``claim_idle_ms``.

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
        try:
            await self.ack(stream, group, [d.entry_id for d in deliveries])
        except BaseException:
            self.forget(deliveries)  # no one will ack them now: left to be reclaimed and redone
            raise

    async def renew(self, stream: str, group: str, entry_ids: Iterable[str] | None = None) -> None:
        """Reset the idle time of every entry this process holds on ``stream``/``group``
        (``entry_ids``: of the held ones among these, the entries still being worked on).

        ``read`` does this on its own; call it during a step longer than ``claim_idle_ms``
        without reads, or another consumer will reclaim (and redo) the held entries.
        """
        await self.delivery.renew(stream, group, every_held=True, only=entry_ids)

    def held(self, stream: str, group: str) -> list[str]:
        """Ids delivered to this process and neither acked, released nor dead-lettered."""
        return self.delivery.held.ids((stream, group))

    async def trim_consumed(self, stream: str, keep_last: int = 0) -> int:
        """Drop the entries of ``stream`` that every consumer group has acknowledged, so a
        long run's streams stay as long as the work in flight; a stream without groups (the
        weight announcements) keeps its newest ``keep_last``. How many entries went."""
        return await self.streams.trim_consumed(stream, keep_last)

    async def dead_letter(
        self, item: Delivery[Any] | bytes, reason: str, *, stream: str = ""
    ) -> str:
        """Move a delivery to the dead-letter stream (and ack it, atomically), or record a raw
        payload that never made it into a stream. Returns the dead-letter entry id."""
        if isinstance(item, Delivery):
            letter = DeadLetter.of(item, reason)
        else:
            letter = DeadLetter.of_payload(stream, item, reason)
        return (await self.delivery.bury([letter]))[0]

    async def close(self) -> None:
        """Release held entries for prompt redelivery and close connections."""
        try:
            async with asyncio.timeout(2.0):
                await self.delivery.release_all()
        except Exception as exc:  # shutting down: pending entries get reclaimed anyway
            log.warning("could not release held entries on close: %s", exc)
        await self.streams.close()

    # ------------------------------------------------------------------ internals

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
