"""The trainer on Redis while its acks wait for checkpoints: more groups pending in the rollouts
stream than an in-flight recount reads must neither stall the feeder nor be logged as freed
slots (a user's run logged "bus error while feeding: XRANGE count must be a positive integer"
over and over, and "freed 32 in-flight slots" every 30 s with nothing dead-lettered)."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from services.trainer import budget as budget_module
from services.trainer import feeder
from services.trainer.budget import PromptProducer
from services.trainer.loop import TrainerRun
from services.transport import TRAINER_GROUP, make_bus
from tests.fixtures.redis import RedisServer, bus_config
from tests.fixtures.synthetic import fake_inference
from tests.fixtures.trainer import trainer_config

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]


@pytest.mark.timeout(240)
def test_feeder_reconciles_quietly_while_more_groups_are_pending_than_a_recount_reads(
    redis_server: RedisServer,
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    steps, per_step, in_flight, every = 12, 4, 4, 8
    # The recount bound, 10 x in_flight + 1000 in production, scaled down to 2 x in_flight so
    # that the checkpoint interval's deferred acks (up to 8 x 4 groups) exceed it.
    monkeypatch.setattr(budget_module, "RECOUNT_PER_SLOT", 2)
    monkeypatch.setattr(budget_module, "RECOUNT_SLACK", 0)
    bound = 2 * in_flight
    monkeypatch.setattr(feeder, "RECONCILE_EVERY_S", 0.0)  # after every read; 30 s in production
    bus = bus_config(redis_server.url).model_dump() | {"claim_idle_ms": 60_000, "block_ms": 50}
    config = trainer_config(
        tiny_model_dir,
        tmp_path,
        trainer={
            "steps": steps,
            "prompts_per_step": per_step,
            "in_flight": in_flight,
            "checkpoint_every": every,
        },
        bus=bus,
    )

    # How many groups the trainer group had pending at each reconcile: proof that the case
    # this test is about (pending > bound) happened, several times.
    pending_at_reconcile: list[int] = []
    reconcile = PromptProducer.reconcile

    async def counting_reconcile(self: PromptProducer, *args: Any, **kwargs: Any) -> int:
        group = (await self.bus.stats(self.rollouts_stream)).group(TRAINER_GROUP)
        pending_at_reconcile.append(group.pending if group else 0)
        return await reconcile(self, *args, **kwargs)

    monkeypatch.setattr(PromptProducer, "reconcile", counting_reconcile)

    async def main() -> int:
        side = make_bus(config.bus)
        stop = asyncio.Event()
        fake = asyncio.create_task(fake_inference(side, config.bus, stop, vocab_size=99))
        try:
            trainer = await asyncio.to_thread(TrainerRun.open, config, resume=False)
            async with asyncio.timeout(180):
                assert await trainer.run() == 0
            return len(await side.dead_letters())
        finally:
            stop.set()
            await fake
            await side.close()

    with caplog.at_level(logging.INFO, logger="services.trainer"):
        dead_lettered = asyncio.run(main())

    status = json.loads((tmp_path / "trainer_state.json").read_text())
    assert status["status"] == "finished" and status["step"] == steps
    assert sum(p > bound for p in pending_at_reconcile) >= 3, pending_at_reconcile
    messages = [r.getMessage() for r in caplog.records if r.name == "services.trainer.feeder"]
    assert not [m for m in messages if "bus error" in m]
    # Nothing was given up on, so no slot was freed; the queued groups are not freed slots.
    assert dead_lettered == 0
    assert not [m for m in messages if "in-flight slots" in m]
    budget_warnings = [r for r in caplog.records if r.name == "services.trainer.budget"]
    assert not budget_warnings, [r.getMessage() for r in budget_warnings]
