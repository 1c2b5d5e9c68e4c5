"""The bus contract, checked on Redis and on the in-memory bus alike (``bus_setup`` runs both).

Each test runs its own event loop with ``asyncio.run`` and uses streams no other test uses.
"""

from __future__ import annotations

import asyncio

import msgpack
import pytest

from services.core.schemas import PromptMessage, ScoredGroup, WeightAnnouncement, encode
from services.trainer.ledger import AppliedLedger, DeferredAcks
from services.transport import (
    INFERENCE_GROUP,
    TRAINER_GROUP,
    Bus,
    BusError,
    reader,
)
from services.transport.names import PAYLOAD_FIELD
from tests.fixtures.redis import (
    BusSetup,
    RedisServer,
    make_group,
    make_prompt,
    make_weights,
)
from tests.fixtures.redis import run_buses as run

pytestmark = pytest.mark.timeout(30)


def test_published_prompts_are_delivered_in_order_and_acked(bus_setup: BusSetup) -> None:
    async def body(s: BusSetup, bus: Bus) -> None:
        stream = s.config.prompts_stream
        await bus.ensure_group(stream, INFERENCE_GROUP)
        ids = await bus.publish_many(stream, [make_prompt(i) for i in range(5)])
        got = await bus.read(stream, INFERENCE_GROUP, "r0", 10, expect=PromptMessage)
        assert [d.entry_id for d in got] == ids
        assert [d.message.prompt_id for d in got] == [f"p-{i:05d}" for i in range(5)]
        assert all(d.delivery_count == 1 and d.group == INFERENCE_GROUP for d in got)
        assert (await bus.stats(stream)).group(INFERENCE_GROUP).pending == 5  # type: ignore[union-attr]
        assert await bus.ack(stream, INFERENCE_GROUP, ids) == 5
        stats = await bus.stats(stream)
        assert stats.length == 5 and stats.group(INFERENCE_GROUP).pending == 0  # type: ignore[union-attr]
        assert await bus.read(stream, INFERENCE_GROUP, "r0", 10, block_ms=0) == []

    run(bus_setup, body)


def test_entries_published_before_the_group_exists_are_not_lost(bus_setup: BusSetup) -> None:
    async def body(s: BusSetup, bus: Bus) -> None:
        stream = s.config.prompts_stream
        await bus.publish(stream, make_prompt(1))
        await bus.ensure_group(stream, INFERENCE_GROUP)
        got = await bus.read(stream, INFERENCE_GROUP, "r0", block_ms=0)
        assert [d.message.prompt_id for d in got] == ["p-00001"]

    run(bus_setup, body)


def test_blocking_read_wakes_up_when_an_entry_arrives(bus_setup: BusSetup) -> None:
    async def body(s: BusSetup, bus: Bus) -> None:
        stream = s.config.prompts_stream
        await bus.ensure_group(stream, INFERENCE_GROUP)
        reader = asyncio.create_task(bus.read(stream, INFERENCE_GROUP, "r0", 4, block_ms=5000))
        await asyncio.sleep(0.1)
        await bus.publish(stream, make_prompt(7))
        got = await asyncio.wait_for(reader, 3)
        assert [d.message.prompt_id for d in got] == ["p-00007"]

    run(bus_setup, body, n_buses=1)


def test_unacked_entries_of_a_stopped_consumer_are_reclaimed_by_another(
    bus_setup: BusSetup,
) -> None:
    async def body(s: BusSetup, dead: Bus, alive: Bus) -> None:
        stream = s.config.prompts_stream
        await alive.ensure_group(stream, INFERENCE_GROUP)
        await alive.publish_many(stream, [make_prompt(i) for i in range(6)])
        taken = await dead.read(stream, INFERENCE_GROUP, "dead", 4)
        assert len(taken) == 4  # ... and "dead" never acks, renews or reads again.
        first = await alive.read(stream, INFERENCE_GROUP, "alive", 10, block_ms=0)
        assert [d.message.prompt_id for d in first] == ["p-00004", "p-00005"]
        await alive.ack(stream, INFERENCE_GROUP, [d.entry_id for d in first])
        await asyncio.sleep(s.config.claim_idle_ms / 1000 + 0.15)
        redone = await alive.read(stream, INFERENCE_GROUP, "alive", 10, block_ms=0)
        assert sorted(d.message.prompt_id for d in redone) == [f"p-{i:05d}" for i in range(4)]
        assert all(d.delivery_count == 2 and d.consumer == "alive" for d in redone)
        await alive.ack(stream, INFERENCE_GROUP, [d.entry_id for d in redone])
        assert (await alive.stats(stream)).group(INFERENCE_GROUP).pending == 0  # type: ignore[union-attr]

    run(bus_setup, body, n_buses=2)


def test_a_consumer_restarted_under_its_name_gets_its_pending_entries_back_at_once(
    bus_setup: BusSetup,
) -> None:
    async def body(s: BusSetup, before: Bus, after: Bus) -> None:
        stream = s.config.rollouts_stream
        await before.ensure_group(stream, TRAINER_GROUP)
        await before.publish_many(stream, [make_group(f"g{i}") for i in range(3)])
        assert len(await before.read(stream, TRAINER_GROUP, "trainer", 10)) == 3
        # The process "dies" here; the new one uses the same consumer name.
        again = await after.read(stream, TRAINER_GROUP, "trainer", 10, block_ms=0)
        assert [d.message.group_id for d in again] == ["g0", "g1", "g2"]
        assert all(d.delivery_count == 2 for d in again)

    run(bus_setup, body, n_buses=2)


def test_entries_a_live_consumer_holds_are_renewed_and_not_reclaimed(bus_setup: BusSetup) -> None:
    async def body(s: BusSetup, holder: Bus, other: Bus) -> None:
        stream = s.config.rollouts_stream
        await holder.ensure_group(stream, TRAINER_GROUP)
        await holder.publish_many(stream, [make_group("g0"), make_group("g1")])
        held = await holder.read(stream, TRAINER_GROUP, "trainer", 10)
        assert len(held) == 2
        # Hold them (as the trainer does until a checkpoint) for three idle timeouts, reading.
        for _ in range(9):
            assert await holder.read(stream, TRAINER_GROUP, "trainer", 10, block_ms=100) == []
            assert await other.read(stream, TRAINER_GROUP, "other", 10, block_ms=0) == []
        assert sorted(holder.held(stream, TRAINER_GROUP)) == sorted(d.entry_id for d in held)

    run(bus_setup, body, n_buses=2)


def test_garbage_bytes_and_wrong_schema_version_go_to_dead_letter_stream_and_pipeline_continues(
    bus_setup: BusSetup,
) -> None:
    async def body(s: BusSetup, bus: Bus) -> None:
        stream = s.config.prompts_stream
        await bus.ensure_group(stream, INFERENCE_GROUP)
        garbage = b"\xc1\xff\x00not msgpack at all"
        future = msgpack.packb({"kind": "prompt", "v": 99, "prompt_id": "p-x"})
        await bus.publish_encoded(stream, [garbage, future])
        await bus.streams.add(stream, [{b"other": b"field"}])  # a foreign writer's entry
        await bus.publish(stream, make_prompt(1))
        got = await bus.read(stream, INFERENCE_GROUP, "r0", 10)
        assert [d.message.prompt_id for d in got] == ["p-00001"]
        dead = await bus.dead_letters()
        assert [d.payload for d in dead] == [garbage, future, b""]
        assert "not a msgpack payload" in dead[0].reason
        assert "unsupported schema version 99" in dead[1].reason
        assert "no 'p' field" in dead[2].reason
        assert {d.stream for d in dead} == {stream}
        assert {d.group for d in dead} == {INFERENCE_GROUP}
        # Dead-lettered entries are acknowledged: only the good one is pending.
        assert (await bus.stats(stream)).group(INFERENCE_GROUP).pending == 1  # type: ignore[union-attr]
        await bus.ack(stream, INFERENCE_GROUP, [got[0].entry_id])
        await bus.publish(stream, make_prompt(2))
        more = await bus.read(stream, INFERENCE_GROUP, "r0", 10)
        assert [d.message.prompt_id for d in more] == ["p-00002"]

    run(bus_setup, body)


def test_a_message_of_the_wrong_kind_for_its_stream_is_dead_lettered(bus_setup: BusSetup) -> None:
    async def body(s: BusSetup, bus: Bus) -> None:
        stream = s.config.rollouts_stream
        await bus.ensure_group(stream, TRAINER_GROUP)
        await bus.publish(stream, make_prompt(3))  # a prompt where groups belong
        await bus.publish(stream, make_group("g1"))
        got = await bus.read(stream, TRAINER_GROUP, "trainer", 10)
        assert [d.message.group_id for d in got] == ["g1"]
        (dead,) = await bus.dead_letters()
        assert "expected a 'scored_group' message, got 'prompt'" in dead.reason

    run(bus_setup, body)


def test_an_entry_failing_max_deliveries_times_is_dead_lettered_with_the_reason(
    bus_setup: BusSetup,
) -> None:
    async def body(s: BusSetup, bus: Bus) -> None:
        stream = s.config.prompts_stream
        await bus.ensure_group(stream, INFERENCE_GROUP)
        await bus.publish(stream, make_prompt("poison"))
        attempts = 0
        for _ in range(s.config.max_deliveries + 2):
            got = await bus.read(stream, INFERENCE_GROUP, "r0", 10, block_ms=0)
            if got:
                attempts += 1
                assert got[0].delivery_count == attempts
                await bus.release(got)  # processing failed
        assert attempts == s.config.max_deliveries
        (dead,) = await bus.dead_letters()
        # Given up on without decoding it again: the payload is kept for inspection.
        assert dead.payload == encode(make_prompt("poison")) and dead.message_id == ""
        assert dead.deliveries == s.config.max_deliveries + 1
        assert f"more than max_deliveries={s.config.max_deliveries}" in dead.reason
        assert "not decoded again" in dead.reason
        assert (await bus.stats(stream)).group(INFERENCE_GROUP).pending == 0  # type: ignore[union-attr]
        await bus.publish(stream, make_prompt(1))
        assert len(await bus.read(stream, INFERENCE_GROUP, "r0", 10)) == 1

    run(bus_setup, body)


def test_processing_block_acks_on_success_and_releases_for_redelivery_on_error(
    bus_setup: BusSetup,
) -> None:
    async def body(s: BusSetup, bus: Bus) -> None:
        prompts, rollouts = s.config.prompts_stream, s.config.rollouts_stream
        await bus.ensure_group(prompts, INFERENCE_GROUP)
        await bus.publish_many(prompts, [make_prompt(1), make_prompt(2)])
        with pytest.raises(RuntimeError):
            async with bus.processing(prompts, INFERENCE_GROUP, "r0", 1) as batch:
                assert [d.message.prompt_id for d in batch] == ["p-00001"]
                raise RuntimeError("generation failed")
        async with bus.processing(prompts, INFERENCE_GROUP, "r0", 5, block_ms=0) as batch:
            # The failed prompt comes back at once (released), with the next one.
            assert sorted(d.message.prompt_id for d in batch) == ["p-00001", "p-00002"]
            await bus.publish_many(rollouts, [make_group(d.message_id) for d in batch])
        assert (await bus.stats(prompts)).group(INFERENCE_GROUP).pending == 0  # type: ignore[union-attr]
        assert (await bus.stats(rollouts)).length == 2

    run(bus_setup, body)


def test_each_group_is_applied_exactly_once_under_redelivery_and_duplicates(
    bus_setup: BusSetup,
) -> None:
    """The trainer's path: apply, checkpoint (model + ledger), then ack; crash anywhere."""

    async def body(s: BusSetup, bus1: Bus, bus2: Bus) -> None:
        stream = s.config.rollouts_stream
        await bus1.ensure_group(stream, TRAINER_GROUP)
        ids = [f"g{i}" for i in range(6)]
        # g2 arrives twice: its prompt was reclaimed from a slow replica and redone.
        await bus1.publish_many(stream, [make_group(i) for i in [*ids[:3], "g2", *ids[3:]]])
        applied: list[str] = []  # the model's state, as far as this test is concerned

        ledger = AppliedLedger()
        acks = DeferredAcks(bus1)
        batch = await bus1.read(stream, TRAINER_GROUP, "trainer", 4)
        applied += [d.message_id for d in ledger.admit(batch)]
        acks.add(batch)
        checkpoint = (list(applied), ledger.state_dict())  # saved; acks not yet sent
        batch = await bus1.read(stream, TRAINER_GROUP, "trainer", 2)
        applied += [d.message_id for d in ledger.admit(batch)]  # applied, not checkpointed
        # Crash. The restarted trainer restores the checkpoint and reads again.
        applied, state = list(checkpoint[0]), checkpoint[1]
        ledger = AppliedLedger.from_state_dict(state)
        acks = DeferredAcks(bus2)
        while True:
            batch = await bus2.read(stream, TRAINER_GROUP, "trainer", 10, block_ms=0)
            if not batch:
                break
            applied += [d.message_id for d in ledger.admit(batch)]
            acks.add(batch)
        assert await acks.commit() == 7
        assert sorted(applied) == ids
        assert (await bus2.stats(stream)).group(TRAINER_GROUP).pending == 0  # type: ignore[union-attr]

    run(bus_setup, body, n_buses=2)


def test_latest_gives_the_newest_weights_and_a_follower_sees_every_new_one(
    bus_setup: BusSetup,
) -> None:
    async def body(s: BusSetup, bus: Bus) -> None:
        stream = s.config.weights_stream
        assert await bus.latest(stream, expect=WeightAnnouncement) is None
        for v in (1, 2):
            await bus.publish(stream, make_weights(v))
        await bus.publish_encoded(stream, [b"garbage"])
        newest = await bus.latest(stream, expect=WeightAnnouncement)
        assert newest is not None and newest.message.version == 2
        follower = bus.follow(stream, newest.entry_id, expect=WeightAnnouncement)
        assert await follower.poll(block_ms=0) == []  # the garbage is skipped
        await bus.publish(stream, make_weights(3))
        got = await follower.poll(block_ms=1000)
        assert [d.message.version for d in got] == [3]

    run(bus_setup, body)


def test_stats_report_length_pending_and_lag(bus_setup: BusSetup) -> None:
    async def body(s: BusSetup, bus: Bus) -> None:
        stream = s.config.prompts_stream
        assert (await bus.stats(stream)).length == 0
        await bus.ensure_group(stream, INFERENCE_GROUP)
        await bus.publish_many(stream, [make_prompt(i) for i in range(5)])
        await bus.read(stream, INFERENCE_GROUP, "r0", 2)
        stats = await bus.stats(stream)
        group = stats.group(INFERENCE_GROUP)
        assert stats.length == 5 and group is not None
        assert group.pending == 2 and group.consumers == 1
        assert group.lag in (3, None)  # None on Redis 6.2, which does not report lag

    run(bus_setup, body)


def test_streams_are_capped_near_maxlen(bus_setup: BusSetup) -> None:
    async def body(s: BusSetup, bus: Bus) -> None:
        stream = s.config.weights_stream
        for _ in range(6):
            await bus.publish_many(stream, [make_weights(v) for v in range(100)])
        length = (await bus.stats(stream)).length
        assert 100 <= length < 600  # MAXLEN ~ trims whole nodes (100 entries each by default)

    run(bus_setup, body, maxlen=100)


def test_unacked_lists_pending_then_undelivered_messages(bus_setup: BusSetup) -> None:
    async def body(s: BusSetup, bus: Bus) -> None:
        stream = s.config.prompts_stream
        await bus.ensure_group(stream, INFERENCE_GROUP)
        await bus.publish_many(stream, [make_prompt(i) for i in range(4)])
        got = await bus.read(stream, INFERENCE_GROUP, "r0", 2)
        await bus.ack(stream, INFERENCE_GROUP, [got[0].entry_id])
        rest = await bus.unacked(stream, INFERENCE_GROUP)
        assert [(d.message_id, d.delivery_count) for d in rest] == [
            ("p-00001", 1),
            ("p-00002", 0),
            ("p-00003", 0),
        ]

    run(bus_setup, body)


def test_unacked_lists_every_undelivered_entry_past_more_pending_ones_than_the_limit(
    bus_setup: BusSetup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trainer that acks only at checkpoints holds many pending groups; the undelivered ones
    behind them (what the in-flight recount needs) must all still be listed, with no error."""
    monkeypatch.setattr(reader, "PENDING_PAGE", 2)  # several XPENDING pages on Redis

    async def body(s: BusSetup, bus: Bus) -> None:
        stream = s.config.rollouts_stream
        await bus.ensure_group(stream, TRAINER_GROUP)
        await bus.publish_many(stream, [make_group(f"read{i}") for i in range(7)])
        read = await bus.read(stream, TRAINER_GROUP, "t", 7)
        await bus.ack(stream, TRAINER_GROUP, [read[2].entry_id])  # a gap in the pending list
        await bus.publish_many(stream, [make_group(f"new{i}") for i in range(3)])
        pending = [f"read{i}" for i in (0, 1, 3, 4, 5, 6)]
        new = [f"new{i}" for i in range(3)]

        # 6 pending: limit 3 cuts the pending part only; limit 6 (the old "XRANGE count 0")
        # and anything larger list both parts whole.
        for limit, want in ((3, pending[:3] + new), (6, pending + new), (50, pending + new)):
            got = await bus.unacked(stream, TRAINER_GROUP, limit)
            assert [d.message_id for d in got] == want, limit
            assert [d.delivery_count for d in got] == [1] * (len(want) - 3) + [0] * 3
        # Each part is bounded on its own.
        got = await bus.unacked(stream, TRAINER_GROUP, 2)
        assert [d.message_id for d in got] == pending[:2] + new[:2]
        with pytest.raises(BusError, match="limit must be >= 1"):
            await bus.unacked(stream, TRAINER_GROUP, 0)

    run(bus_setup, body)


def test_unacked_without_pending_lists_only_the_undelivered_entries(bus_setup: BusSetup) -> None:
    async def body(s: BusSetup, bus: Bus) -> None:
        stream = s.config.rollouts_stream
        await bus.ensure_group(stream, TRAINER_GROUP)
        await bus.publish_many(stream, [make_group(f"read{i}") for i in range(5)])
        await bus.read(stream, TRAINER_GROUP, "t", 5)
        await bus.publish_many(stream, [make_group(f"new{i}") for i in range(3)])
        got = await bus.unacked(stream, TRAINER_GROUP, 2, pending=False)
        assert [(d.message_id, d.delivery_count) for d in got] == [("new0", 0), ("new1", 0)]
        got = await bus.unacked(stream, TRAINER_GROUP, pending=False)
        assert [d.message_id for d in got] == ["new0", "new1", "new2"]
        # Without a group nothing was delivered: the whole stream is undelivered.
        got = await bus.unacked(stream, "nobody", 3, pending=False)
        assert [d.message_id for d in got] == ["read0", "read1", "read2"]

    run(bus_setup, body)


def test_a_raw_payload_can_be_dead_lettered_with_its_origin(bus_setup: BusSetup) -> None:
    async def body(s: BusSetup, bus: Bus) -> None:
        await bus.dead_letter(encode(make_group("g9")), "too stale", stream="elsewhere")
        (dead,) = await bus.dead_letters()
        assert (dead.stream, dead.reason, dead.message_id) == ("elsewhere", "too stale", "g9")

    run(bus_setup, body)


def test_field_layout_of_an_entry_is_one_payload_field(bus_setup: BusSetup) -> None:
    async def body(s: BusSetup, bus: Bus) -> None:
        stream = s.config.rollouts_stream
        await bus.publish(stream, make_group("g1"))
        (raw,) = await bus.streams.read_after(stream, "0", 10, 0)
        assert list(raw.fields or {}) == [PAYLOAD_FIELD]
        assert (raw.fields or {})[PAYLOAD_FIELD] == encode(make_group("g1"))
        assert isinstance(make_group("g1"), ScoredGroup)

    run(bus_setup, body)


def test_a_pending_entry_trimmed_by_maxlen_is_recorded_as_dead_not_silently_lost(
    bus_setup: BusSetup,
) -> None:
    async def body(s: BusSetup, dead: Bus, alive: Bus) -> None:
        stream = s.config.prompts_stream
        await alive.ensure_group(stream, INFERENCE_GROUP)
        await alive.publish(stream, make_prompt("doomed"))
        (taken,) = await dead.read(stream, INFERENCE_GROUP, "dead", 1)
        for _ in range(4):
            await alive.publish_many(stream, [make_prompt(i) for i in range(100)])
        assert taken.entry_id not in [d.entry_id for d in await alive.unacked(stream, "x")]
        await asyncio.sleep(s.config.claim_idle_ms / 1000 + 0.15)
        while await alive.read(stream, INFERENCE_GROUP, "alive", 500, block_ms=0):
            pass
        (record,) = await alive.dead_letters()
        assert record.source_id == taken.entry_id
        assert "trimmed from the stream (MAXLEN)" in record.reason
        assert (await alive.stats(stream)).group(INFERENCE_GROUP).pending > 0  # type: ignore[union-attr]

    run(bus_setup, body, n_buses=2, maxlen=100)


@pytest.mark.integration
def test_the_server_is_redis_6_2_or_newer(redis_server: RedisServer) -> None:
    async def main() -> str:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(redis_server.url)
        info = await client.info("server")
        await client.aclose()
        return str(info["redis_version"])

    version = asyncio.run(main())
    print(f"redis_version={version} ({redis_server.source})")
    assert tuple(int(x) for x in version.split(".")[:2]) >= (6, 2)


def test_trim_consumed_drops_only_what_every_group_acknowledged(bus_setup: BusSetup) -> None:
    async def body(s: BusSetup, bus: Bus) -> None:
        stream = s.config.prompts_stream
        await bus.ensure_group(stream, INFERENCE_GROUP)
        await bus.ensure_group(stream, "audit")
        ids = await bus.publish_many(stream, [make_prompt(i) for i in range(6)])
        got = await bus.read(stream, INFERENCE_GROUP, "r0", 4, expect=PromptMessage)
        await bus.ack(stream, INFERENCE_GROUP, [got[0].entry_id, got[2].entry_id])
        # The "audit" group has read nothing yet: nothing may go.
        assert await bus.trim_consumed(stream) == 0
        audit = await bus.read(stream, "audit", "a0", 6, expect=PromptMessage)
        await bus.ack(stream, "audit", [d.entry_id for d in audit])
        # Entry 1 is still pending in the inference group: only entry 0 goes before it.
        assert await bus.trim_consumed(stream) == 1
        await bus.ack(stream, INFERENCE_GROUP, [got[1].entry_id, got[3].entry_id])
        # 0-3 acknowledged by both; 4 and 5 were never delivered to the inference group.
        assert await bus.trim_consumed(stream) == 3
        assert (await bus.stats(stream)).length == 2
        rest = await bus.read(stream, INFERENCE_GROUP, "r0", 10, expect=PromptMessage)
        assert [d.entry_id for d in rest] == ids[4:]
        # A stream without groups (announcements) keeps its newest entries.
        weights = s.config.weights_stream
        for v in range(5):
            await bus.publish(weights, make_weights(v))
        assert await bus.trim_consumed(weights, keep_last=2) == 3
        assert await bus.trim_consumed(weights) == 0
        newest = await bus.latest(weights, expect=WeightAnnouncement)
        assert newest is not None and newest.message.version == 4
        assert await bus.trim_consumed("no-such-stream") == 0

    run(bus_setup, body)
