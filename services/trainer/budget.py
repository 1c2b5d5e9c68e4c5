"""Back-pressure: the trainer keeps at most K prompts in flight.

A prompt is *in flight* from the moment it is published until its scored group is read by the
trainer (or it is given up on: dead-lettered by the inference side). The count is kept as a
set of prompt ids, so a duplicate group cannot free a slot twice.

The source of truth is the streams themselves: a prompt is in flight exactly when it is
unacknowledged in the inference group of the prompts stream, or its group sits in the rollouts
stream not yet delivered to the trainer, or the trainer has read its group but not yet taken
it from its in-memory queue (the streams cannot see that queue, so the trainer names those
groups). The rollout worker appends a group *before* acking its prompt, so reading the prompts
side first and the rollouts side second misses nothing. :meth:`PromptProducer.restore`
rebuilds the set this way after a trainer restart (also counting groups the previous run read
but never acked, since they will be read again), and :meth:`PromptProducer.reconcile` does it
while running, which frees the slots of prompts given up on (dead-lettered on the inference
side) and only those.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator, Sequence
from typing import Any

from services.core.config import BusConfig
from services.core.schemas import PromptMessage
from services.transport import Bus, BusError, Delivery
from services.transport.names import INFERENCE_GROUP, TRAINER_GROUP

log = logging.getLogger(__name__)

#: How many unacknowledged entries a recount reads per part (pending, undelivered) of each
#: stream: RECOUNT_PER_SLOT per in-flight slot plus RECOUNT_SLACK, well past what one run
#: leaves (at most the in-flight limit), so that leftovers of a previous run with a larger
#: limit, and groups filtered or dropped between checkpoints, are counted too.
RECOUNT_PER_SLOT = 10
RECOUNT_SLACK = 1000


class InFlightBudget:
    """At most ``limit`` prompt ids outstanding; ``settle`` frees a slot once per id."""

    def __init__(self, limit: int, outstanding: Iterable[str] = ()) -> None:
        if limit < 1:
            raise ValueError("the in-flight limit must be >= 1")
        self.limit = limit
        self._ids: set[str] = set(outstanding)

    @property
    def in_flight(self) -> int:
        return len(self._ids)

    def room(self) -> int:
        """How many more prompts may be published now."""
        return max(self.limit - len(self._ids), 0)

    def outstanding(self) -> frozenset[str]:
        return frozenset(self._ids)

    def add(self, prompt_id: str) -> None:
        if prompt_id in self._ids:
            return
        if not self.room():
            raise BusError(f"in-flight budget of {self.limit} prompts is full")
        self._ids.add(prompt_id)

    def settle(self, prompt_id: str) -> bool:
        """The prompt came back (or was given up on); False if it was not outstanding."""
        if prompt_id not in self._ids:
            return False
        self._ids.discard(prompt_id)
        return True

    def replace(self, outstanding: Iterable[str]) -> None:
        self._ids = set(outstanding)


class PromptProducer:
    """Publishes prompts within an :class:`InFlightBudget` and settles returning groups."""

    def __init__(
        self,
        bus: Bus,
        budget: InFlightBudget,
        *,
        prompts_stream: str,
        rollouts_stream: str,
        prompts_group: str = INFERENCE_GROUP,
        rollouts_group: str = TRAINER_GROUP,
        deferred: int = 0,
    ) -> None:
        if deferred < 0:
            raise ValueError("deferred must be >= 0")
        self.bus = bus
        self.budget = budget
        self.prompts_stream = prompts_stream
        self.rollouts_stream = rollouts_stream
        self.prompts_group = prompts_group
        self.rollouts_group = rollouts_group
        self.deferred = deferred

    @classmethod
    async def restore(
        cls, bus: Bus, config: BusConfig, limit: int, *, deferred: int = 0
    ) -> PromptProducer:
        """Create both consumer groups if needed and rebuild the in-flight set from the
        streams (see the module docstring); the way a trainer starts, fresh or resumed.

        ``deferred``: how many groups the consumer may leave read but unacknowledged, for a
        trainer ``checkpoint_every * prompts_per_step`` (it acks only at checkpoints). A
        restart reads them all again, so all must be counted: the recount of the rollouts
        group's pending entries reads that many more than the in-flight bound. An explicit
        bound rather than an unbounded scan, so a runaway pending list cannot stall a start.
        """
        producer = cls(
            bus,
            InFlightBudget(limit),
            prompts_stream=config.prompts_stream,
            rollouts_stream=config.rollouts_stream,
            deferred=deferred,
        )
        await bus.ensure_group(producer.prompts_stream, producer.prompts_group)
        await bus.ensure_group(producer.rollouts_stream, producer.rollouts_group)
        producer.budget.replace(await producer._outstanding(include_read=True))
        return producer

    async def reconcile(self, held: Collection[str] = ()) -> int:
        """Recount the in-flight set from the streams; returns how many slots it freed: the
        prompts given up on (dead-lettered by the inference side, trimmed away), nothing else.

        ``held``: ids of groups the caller has read but not yet settled with :meth:`returned`
        (the trainer's queue). The streams show them as delivered, so they would otherwise
        look freed and be re-added by the caller. It is read after the streams, so pass the
        live collection. Call this from the task that reads the groups and publishes (not
        concurrently with either), e.g. every few steps.
        """
        counted = await self._outstanding(include_read=False)
        # Taken after the await: groups settled meanwhile were not given up on.
        recount = counted | set(held)
        freed = len(self.budget.outstanding() - recount)
        self.budget.replace(recount)
        return freed

    async def publish(self, prompts: Sequence[PromptMessage]) -> list[str]:
        """Publish prompts that fit the budget (all or none); returns their entry ids."""
        fresh = [p for p in prompts if p.prompt_id not in self.budget.outstanding()]
        if len({p.prompt_id for p in fresh}) > self.budget.room():
            raise BusError(
                f"{len(fresh)} prompts do not fit the in-flight budget "
                f"({self.budget.in_flight}/{self.budget.limit}); publish at most room() of them"
            )
        ids = await self.bus.publish_many(self.prompts_stream, fresh)
        for p in fresh:
            self.budget.add(p.prompt_id)
        return ids

    async def fill(
        self,
        prompts: Iterator[PromptMessage],
        prepare: Callable[[Sequence[PromptMessage]], Awaitable[None]] | None = None,
    ) -> int:
        """Publish from ``prompts`` until the budget is full; returns how many were published.
        Draws no more items from the iterator than it publishes; ``prepare`` runs on the batch
        first (the feeder stores the prompts' images there)."""
        batch: list[PromptMessage] = []
        for _ in range(self.budget.room()):
            nxt = next(prompts, None)
            if nxt is None:
                break
            batch.append(nxt)
        if batch:
            if prepare is not None:
                await prepare(batch)
            await self.publish(batch)
        return len(batch)

    def returned(self, deliveries: Iterable[Delivery[Any]]) -> int:
        """Settle the prompts whose groups were just read; returns how many slots freed."""
        return sum(self.budget.settle(d.message_id) for d in deliveries)

    async def _outstanding(self, *, include_read: bool) -> set[str]:
        """Prompt ids in flight per the streams; read groups count only with ``include_read``
        (while running they are settled by the reader, so their pending list is not even
        fetched: a trainer between checkpoints holds thousands)."""
        bound = RECOUNT_PER_SLOT * self.budget.limit + RECOUNT_SLACK
        prompts = await self.bus.unacked(self.prompts_stream, self.prompts_group, bound)
        self._warn_if_cut(self.prompts_stream, prompts, bound)
        bound += self.deferred if include_read else 0
        groups = await self.bus.unacked(
            self.rollouts_stream, self.rollouts_group, bound, pending=include_read
        )
        self._warn_if_cut(self.rollouts_stream, groups, bound)
        return {d.message_id for d in prompts} | {d.message_id for d in groups}

    @staticmethod
    def _warn_if_cut(stream: str, unacked: Sequence[Delivery[Any]], bound: int) -> None:
        """A part that filled its bound may have been cut: the budget then undercounts and
        lets more prompts out until those entries are processed. Say so, with the cure."""
        pending = sum(d.delivery_count > 0 for d in unacked)
        hints = {
            "pending": "pass PromptProducer.restore a deferred= covering the groups the "
            "trainer leaves unacknowledged between checkpoints",
            "undelivered": "entries left by another producer or an earlier run with a larger "
            "in_flight; trim the stream if they are not wanted",
        }
        for part, n in (("pending", pending), ("undelivered", len(unacked) - pending)):
            if n >= bound:
                log.warning(
                    "in-flight recount read %d %s entries of %s, its bound: the count may be "
                    "low until they are processed (%s)",
                    n,
                    part,
                    stream,
                    hints[part],
                )
