"""Exactly-once bookkeeping: the applied-groups ledger and deferred acks."""

from __future__ import annotations

import asyncio
import json

import pytest

from services.core.schemas import ScoredGroup
from services.trainer.ledger import AppliedLedger, DeferredAcks
from services.transport import TRAINER_GROUP, Delivery, make_bus
from tests.fixtures.redis import make_group


def delivery(group_id: str, entry_id: str = "1-0") -> Delivery[ScoredGroup]:
    return Delivery("s", "g", "c", entry_id, make_group(group_id), b"", 1)


def test_ledger_recognises_a_group_it_applied() -> None:
    ledger = AppliedLedger()
    assert ledger.mark("g1") is True
    assert ledger.mark("g1") is False
    assert "g1" in ledger and "g2" not in ledger


def test_admit_drops_repeats_also_within_one_batch() -> None:
    ledger = AppliedLedger(ids=["g0"])
    batch = [delivery("g0"), delivery("g1", "2-0"), delivery("g1", "3-0"), delivery("g2")]
    assert [d.message_id for d in ledger.admit(batch)] == ["g1", "g2"]


def test_ledger_keeps_the_newest_ids_within_its_capacity() -> None:
    ledger = AppliedLedger(capacity=3)
    for i in range(5):
        ledger.mark(f"g{i}")
    assert len(ledger) == 3
    assert "g1" not in ledger and all(f"g{i}" in ledger for i in (2, 3, 4))


def test_ledger_state_survives_a_json_checkpoint() -> None:
    ledger = AppliedLedger(capacity=10, ids=["a", "b"])
    restored = AppliedLedger.from_state_dict(json.loads(json.dumps(ledger.state_dict())))
    assert restored.capacity == 10 and "a" in restored and "b" in restored
    restored.mark("c")
    assert restored.state_dict()["ids"] == ["a", "b", "c"]


def test_ledger_refuses_state_of_an_unknown_version() -> None:
    with pytest.raises(ValueError, match="version"):
        AppliedLedger.from_state_dict({"version": 99, "capacity": 1, "ids": []})


def test_deferred_acks_ack_only_on_commit() -> None:
    async def main() -> None:
        bus = make_bus("memory://")
        await bus.ensure_group("s", TRAINER_GROUP)
        await bus.publish_many("s", [make_group("g1"), make_group("g2")])
        got = await bus.read("s", TRAINER_GROUP, "t", block_ms=0)
        acks = DeferredAcks(bus)
        acks.add(got)
        acks.add(got)  # adding twice is harmless
        assert len(acks) == 2
        assert (await bus.stats("s")).group(TRAINER_GROUP).pending == 2  # type: ignore[union-attr]
        assert await acks.commit() == 2
        assert len(acks) == 0
        assert (await bus.stats("s")).group(TRAINER_GROUP).pending == 0  # type: ignore[union-attr]

    asyncio.run(main())
