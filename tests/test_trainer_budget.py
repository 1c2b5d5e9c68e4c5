"""Back-pressure: at most K prompts in flight, counted by id and rebuilt from the streams."""

from __future__ import annotations

import asyncio
import logging

import pytest

from services.core.schemas import PromptMessage
from services.trainer import budget as budget_module
from services.trainer.budget import InFlightBudget, PromptProducer
from services.transport import INFERENCE_GROUP, TRAINER_GROUP, Bus, BusError
from tests.fixtures.redis import BusSetup, make_group, make_prompt

pytestmark = pytest.mark.timeout(30)


def test_budget_counts_each_prompt_once_and_frees_a_slot_once() -> None:
    budget = InFlightBudget(2)
    budget.add("a")
    budget.add("a")
    budget.add("b")
    assert (budget.in_flight, budget.room()) == (2, 0)
    with pytest.raises(BusError, match="full"):
        budget.add("c")
    assert budget.settle("a") is True
    assert budget.settle("a") is False  # a duplicate group frees nothing
    assert budget.settle("zzz") is False
    assert budget.room() == 1


async def _worker(bus: Bus, s: BusSetup, n: int, *, ack: bool = True) -> None:
    """A rollout worker: append one group per prompt, then ack the prompts."""
    got = await bus.read(s.config.prompts_stream, INFERENCE_GROUP, "r0", n, expect=PromptMessage)
    await bus.publish_many(s.config.rollouts_stream, [make_group(d.message_id) for d in got])
    if ack:
        await bus.ack(s.config.prompts_stream, INFERENCE_GROUP, [d.entry_id for d in got])


def test_trainer_never_has_more_than_k_prompts_in_flight(bus_setup: BusSetup) -> None:
    async def main() -> None:
        bus = bus_setup.make()
        producer = await PromptProducer.restore(bus, bus_setup.config, limit=4)
        source = iter([make_prompt(i) for i in range(100)])
        assert await producer.fill(source) == 4
        assert await producer.fill(source) == 0  # full: nothing drawn from the source
        assert next(source).prompt_id == "p-00004"
        with pytest.raises(BusError, match="do not fit"):
            await producer.publish([make_prompt(99)])
        await _worker(bus, bus_setup, 3)
        got = await bus.read(bus_setup.config.rollouts_stream, TRAINER_GROUP, "t", 10)
        assert producer.returned(got) == 3
        assert producer.returned(got) == 0
        assert await producer.fill(source) == 3
        assert producer.budget.in_flight == 4
        await bus.close()

    asyncio.run(main())


def test_in_flight_set_is_rebuilt_from_the_streams_after_a_trainer_restart(
    bus_setup: BusSetup,
) -> None:
    async def main() -> None:
        bus = bus_setup.make()
        producer = await PromptProducer.restore(bus, bus_setup.config, limit=6)
        await producer.publish([make_prompt(i) for i in range(6)])
        await _worker(bus, bus_setup, 2)  # p0, p1 -> groups in the rollouts stream
        await _worker(bus, bus_setup, 1, ack=False)  # p2 -> group appended, prompt not acked
        got = await bus.read(bus_setup.config.rollouts_stream, TRAINER_GROUP, "t", 1)
        producer.returned(got)  # p0 came back to the trainer, which then dies (no ack)
        assert producer.budget.outstanding() == {f"p-{i:05d}" for i in range(1, 6)}

        restarted = await PromptProducer.restore(bus_setup.make(), bus_setup.config, limit=6)
        # p0's group was read but never acked, so it will be read (and settled) again.
        assert restarted.budget.outstanding() == {f"p-{i:05d}" for i in range(6)}
        await restarted.bus.close()
        await bus.close()

    asyncio.run(main())


def test_reconcile_frees_slots_of_prompts_dead_lettered_downstream(bus_setup: BusSetup) -> None:
    async def main() -> None:
        bus = bus_setup.make()
        producer = await PromptProducer.restore(bus, bus_setup.config, limit=3)
        await producer.publish([make_prompt(i) for i in range(3)])
        got = await bus.read(bus_setup.config.prompts_stream, INFERENCE_GROUP, "r0", 1)
        await bus.dead_letter(got[0], "cannot generate")
        assert producer.budget.room() == 0
        assert await producer.reconcile() == 1
        assert producer.budget.outstanding() == {"p-00001", "p-00002"}
        await bus.close()

    asyncio.run(main())


def test_reconcile_frees_only_prompts_given_up_on_not_groups_held_in_memory(
    bus_setup: BusSetup,
) -> None:
    """The trainer's queue holds groups it read but has not taken: the streams show them as
    delivered, yet their prompts are still in flight, so they are not freed slots."""

    async def main() -> None:
        bus = bus_setup.make()
        producer = await PromptProducer.restore(bus, bus_setup.config, limit=4)
        await producer.publish([make_prompt(i) for i in range(4)])
        await _worker(bus, bus_setup, 3)  # p0..p2 answered
        (lost,) = await bus.read(bus_setup.config.prompts_stream, INFERENCE_GROUP, "r0", 1)
        await bus.dead_letter(lost, "cannot generate")  # p3 given up on
        queue = await bus.read(bus_setup.config.rollouts_stream, TRAINER_GROUP, "t", 10)
        held = {d.message_id for d in queue}
        assert held == {"p-00000", "p-00001", "p-00002"}

        assert await producer.reconcile(held=held) == 1
        assert producer.budget.outstanding() == held
        assert await producer.reconcile(held=held) == 0  # nothing new given up on
        producer.returned(queue[:1])  # the trainer takes one group: settled, not freed
        assert await producer.reconcile(held=held - {"p-00000"}) == 0
        assert producer.budget.outstanding() == {"p-00001", "p-00002"}
        await bus.close()

    asyncio.run(main())


def test_recounts_see_every_group_past_more_pending_ones_than_the_bound(
    bus_setup: BusSetup, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A trainer acks only at checkpoints, so its group holds up to checkpoint_every x
    prompts_per_step read groups: ``restore`` counts them all (given ``deferred``), and
    ``reconcile`` skips them yet still finds every group not read yet."""
    monkeypatch.setattr(budget_module, "RECOUNT_PER_SLOT", 1)
    monkeypatch.setattr(budget_module, "RECOUNT_SLACK", 0)  # the recount bound: the limit, 2
    rollouts = bus_setup.config.rollouts_stream

    async def main() -> None:
        bus = bus_setup.make()
        await bus.ensure_group(rollouts, TRAINER_GROUP)
        await bus.publish_many(rollouts, [make_group(f"read{i}") for i in range(6)])
        assert len(await bus.read(rollouts, TRAINER_GROUP, "t", 6)) == 6  # acks deferred
        await bus.publish_many(rollouts, [make_group("new0")])
        everything = {f"read{i}" for i in range(6)} | {"new0"}

        producer = await PromptProducer.restore(bus, bus_setup.config, limit=2, deferred=6)
        assert producer.budget.outstanding() == everything
        assert "recount" not in caplog.text
        # No XPENDING page of the read groups here: the reader names the ones it holds.
        assert await producer.reconcile(held={f"read{i}" for i in range(6)}) == 0
        assert producer.budget.outstanding() == everything

        # Told too small a deferred, restore misses some and says what to pass.
        short = await PromptProducer.restore(bus, bus_setup.config, limit=2)
        assert short.budget.outstanding() == {"read0", "read1", "new0"}
        assert "pass PromptProducer.restore a deferred=" in caplog.text
        await bus.close()

    with caplog.at_level(logging.WARNING, logger="services.trainer.budget"):
        asyncio.run(main())
