"""The trainer's feeder: prompts out up to the in-flight budget, scored groups into a queue.

It runs as its own asyncio task beside the step loop, so it keeps the prompts stream full and
keeps reading scored groups while a step computes in a thread. A prompt counts as in flight
until the loop takes its group from the queue (:meth:`Feeder.taken`), so the backlog of unread
and queued groups is bounded by the budget too. The dataset position moves only with what was
published, under a lock that :meth:`Feeder.position` takes, so a checkpoint never records a
prompt as issued that was not.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator, Sequence

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential

from services.core.config import RunConfig
from services.core.images import image_ref
from services.core.prompts import PromptFormat
from services.core.schemas import PromptMessage, ScoredGroup
from services.trainer.budget import PromptProducer
from services.trainer.dataset import Position, PromptOrder
from services.transport import Bus, Delivery
from services.transport.images import image_store
from services.transport.names import TRAINER_GROUP

log = logging.getLogger(__name__)

#: One trainer per run: a fixed consumer name lets a restarted trainer take back its own
#: pending entries at once instead of waiting for them to go idle.
CONSUMER = "trainer-0"
RECONCILE_EVERY_S = 30.0


class Feeder:
    """Fills the prompts stream and queues scored groups; :meth:`run` until cancelled."""

    def __init__(
        self,
        config: RunConfig,
        bus: Bus,
        producer: PromptProducer,
        order: PromptOrder,
        run_id: str,
        version: Callable[[], int],
        prompt_format: PromptFormat | None = None,
    ) -> None:
        self.config = config
        self.bus = bus
        self.producer = producer
        self.order = order
        self.run_id = run_id
        self.version = version
        self.prompt_format = prompt_format or PromptFormat()
        self.images = image_store(bus, config)
        self._staged: dict[str, bytes] = {}  # images of drawn prompts, stored before publishing
        self.queue: asyncio.Queue[Delivery[ScoredGroup]] = asyncio.Queue()
        self.unconsumed: set[str] = set()  # ids read into the queue, not yet taken
        self._lock = asyncio.Lock()
        self._reconciled_at = time.monotonic()

    async def run(self) -> None:
        """Fill and read forever; a bus error is logged and retried with backoff."""
        prompts = self._prompts()
        while True:
            # A fresh retry state per cycle: the backoff starts over after every success.
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(Exception),
                wait=wait_exponential(multiplier=0.5, min=0.5, max=10.0),
                before_sleep=_log_retry,
                reraise=True,
            ):
                with attempt:
                    await self._cycle(prompts)

    def taken(self, d: Delivery[ScoredGroup]) -> None:
        """The loop has the group: its prompt's in-flight slot is free."""
        self.unconsumed.discard(d.message_id)
        self.producer.returned([d])

    async def position(self) -> Position:
        """The dataset position of what has been published (waits for a fill under way)."""
        async with self._lock:
            return self.order.position

    async def _cycle(self, prompts: Iterator[PromptMessage]) -> None:
        cfg = self.config
        await self._fill(prompts)
        deliveries = await self.bus.read(
            cfg.bus.rollouts_stream,
            TRAINER_GROUP,
            CONSUMER,
            max(cfg.trainer.prompts_per_step, 16),
            expect=ScoredGroup,
        )
        for d in deliveries:
            self.unconsumed.add(d.message_id)
            self.queue.put_nowait(d)
        if time.monotonic() - self._reconciled_at >= RECONCILE_EVERY_S:
            # The streams cannot see the queue: its groups are still in flight.
            freed = await self.producer.reconcile(held=self.unconsumed)
            if freed:
                log.info("freed %d in-flight slots of prompts given up on", freed)
            self._reconciled_at = time.monotonic()

    async def _fill(self, prompts: Iterator[PromptMessage]) -> None:
        """Publish prompts up to the budget; on failure the position goes back."""
        async with self._lock:
            before = self.order.position
            try:
                await self.producer.fill(prompts, prepare=self._store_images)
            except BaseException:
                self.order.position = before
                raise

    async def _store_images(self, batch: Sequence[PromptMessage]) -> None:
        """Put the images of ``batch`` into the store before the prompts that name them go out.
        Every time, not once per run: a write of a picture already there changes nothing (the
        store keeps it by content), and a Redis that restarted without its data gets it back."""
        for ref in dict.fromkeys(ref for msg in batch for ref in msg.images):
            await self.images.put(self._staged[ref])
        self._staged.clear()

    def _prompts(self) -> Iterator[PromptMessage]:
        r = self.config.rollout
        for pos, ex in self.order:
            refs = tuple(image_ref(data) for data in ex.images)
            self._staged.update(zip(refs, ex.images, strict=True))
            yield PromptMessage(
                prompt_id=f"{self.run_id}:{pos.epoch}:{pos.index}",
                prompt=self.prompt_format.render_example(ex),
                answer=ex.answer,
                task=ex.task,
                group_size=r.group_size,
                temperature=r.temperature,
                top_p=r.top_p,
                max_tokens=r.max_tokens,
                issued_version=self.version(),
                created_at=time.time(),
                images=refs,
            )


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome is not None else None
    delay = state.next_action.sleep if state.next_action is not None else 0.0
    log.warning("bus error while feeding: %s; retrying in %.1f s", exc, delay)
