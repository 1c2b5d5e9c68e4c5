"""Hostile and failing input on the bus: whatever an entry holds, it becomes a message or a dead
letter with its reason; every message field is bounded; an entry nobody works on any more is
never held. Each test is named after the fault it injects.

The bus tests run on Redis and on the in-memory bus alike (``bus_setup``); the property-based
tests feed the decoders random bytes, random msgpack values, mutated valid messages, deep
nesting and huge declared lengths, and accept only two outcomes: a message or a SchemaError.
"""

from __future__ import annotations

import asyncio
import math
import struct
import time
import types
from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.core import schemas
from services.core.config import (
    ModelConfig,
    RewardConfig,
    RolloutConfig,
    RunConfig,
    TaskConfig,
    build_config,
)
from services.core.images import image_ref
from services.core.schemas import (
    DEFAULT_LIMITS,
    KIND_PROMPT,
    KIND_SCORED_GROUP,
    KIND_WEIGHTS,
    Message,
    PromptMessage,
    Rollout,
    SchemaError,
    ScoredGroup,
    WeightAnnouncement,
    WireLimits,
    decode,
    encode,
)
from services.inference import rollout_worker as rw
from services.inference.generation import PromptRejected
from services.transport import INFERENCE_GROUP, TRAINER_GROUP, Bus, DeadLetter, Delivery, names
from services.transport import entries as entries_module
from services.transport.entries import RawEntry, decode_entry
from services.transport.factory import config_bound, make_bus, wire_limits
from tests.fixtures.redis import BusSetup, make_group, make_prompt, make_weights
from tests.fixtures.redis import run_buses as run

pytestmark = pytest.mark.timeout(60)

MESSAGES: list[Message] = [
    PromptMessage("p-1", "2 + 3 =", "5", "arithmetic", 4, 0.7, 0.9, 16, 3, 1712345678.0),
    PromptMessage("p-2", "Same colour?", "yes", "shapes", 2, images=(image_ref(b"a"),)),
    make_group("g-1", size=3, tokens=5, version=2),
    make_weights(7),
]
#: Bounds small enough that random values cross them often.
SMALL = WireLimits(
    max_payload_bytes=4096,
    max_id_chars=8,
    max_name_chars=12,
    max_prompt_chars=16,
    max_answer_chars=8,
    max_completion_chars=8,
    max_location_chars=16,
    max_group_size=4,
    max_tokens=64,
    max_sequence_tokens=8,
    max_reward_terms=2,
    max_images=2,
    max_version=100,
    max_temperature=2.0,
    max_abs_reward=10.0,
    max_timestamp=2e9,
)
KINDS = (None, KIND_PROMPT, KIND_SCORED_GROUP, KIND_WEIGHTS)


# ----------------------------------------------------------------------------- raw msgpack


def packed(value: Any) -> bytes:
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


def body_of(msg: Message) -> dict[str, Any]:
    body: dict[str, Any] = msgpack.unpackb(encode(msg), raw=False)
    return body


def raw_map(pairs: Sequence[tuple[Any, bytes]]) -> bytes:
    """A msgpack map whose values are already encoded (so they can be anything at all)."""
    return b"\xde" + struct.pack(">H", len(pairs)) + b"".join(packed(k) + v for k, v in pairs)


def with_raw(msg: Message, field: str, raw: bytes) -> bytes:
    """``msg`` encoded with the value of ``field`` (added if new) replaced by raw bytes."""
    pairs = [(k, raw if k == field else packed(v)) for k, v in body_of(msg).items()]
    if all(k != field for k, _ in pairs):
        pairs.append((field, raw))
    return raw_map(pairs)


def nested(depth: int, shape: str = "list") -> bytes:
    """A value nested ``depth`` levels deep: a list in a list ..., or a map in a map ..."""
    opener = {"list": b"\x91", "map": b"\x81\xa1k"}[shape]
    return opener * depth + b"\x01"


# ----------------------------------------------------------------------------- 1. no wedge


def test_a_1kb_entry_nested_1000_levels_deep_is_dead_lettered_and_the_pipeline_goes_on(
    bus_setup: BusSetup,
) -> None:
    deep = with_raw(make_prompt("deep"), "prompt_id", nested(1000))
    assert 1000 < len(deep) < 1200
    deep_maps = with_raw(make_prompt("deeper"), "unknown", nested(5000, "map"))

    async def body(s: BusSetup, bus: Bus) -> None:
        stream = s.config.prompts_stream
        await bus.ensure_group(stream, INFERENCE_GROUP)
        await bus.publish_encoded(stream, [deep, nested(1000), deep_maps])
        await bus.publish(stream, make_prompt(1))
        got = await bus.read(stream, INFERENCE_GROUP, "r0", 10, block_ms=0)
        assert [d.message.prompt_id for d in got] == ["p-00001"]
        dead = await bus.dead_letters()
        assert [d.payload for d in dead] == [deep, nested(1000), deep_maps]
        assert "nests too deeply" in dead[0].reason
        assert "must be a msgpack map" in dead[1].reason
        assert "nests too deeply" in dead[2].reason
        # Nothing is left to fail the next read, of this consumer or of another.
        await bus.ack(stream, INFERENCE_GROUP, [got[0].entry_id])
        assert await bus.read(stream, INFERENCE_GROUP, "r1", 10, block_ms=0) == []
        group = (await bus.stats(stream)).group(INFERENCE_GROUP)
        assert group is not None and group.pending == 0
        assert await bus.unacked(stream, INFERENCE_GROUP) == []

    run(bus_setup, body)


def test_a_deeply_nested_entry_between_weight_announcements_costs_no_announcement(
    bus_setup: BusSetup,
) -> None:
    async def body(s: BusSetup, bus: Bus) -> None:
        stream = s.config.weights_stream
        follower = bus.follow(stream, "0", expect=WeightAnnouncement)
        await bus.publish(stream, make_weights(1))
        await bus.publish_encoded(stream, [with_raw(make_weights(9), "location", nested(1000))])
        await bus.publish(stream, make_weights(2))
        got = await follower.poll(block_ms=0)
        assert [d.message.version for d in got] == [1, 2]
        # The newest entry is hostile: a replica that starts now still finds version 2.
        await bus.publish_encoded(stream, [nested(3000, "map")])
        newest = await bus.latest(stream, expect=WeightAnnouncement)
        assert newest is not None and newest.message.version == 2
        assert await follower.poll(block_ms=0) == []
        await bus.publish(stream, make_weights(3))
        assert [d.message.version for d in await follower.poll(block_ms=0)] == [3]

    run(bus_setup, body)


def test_an_unexpected_exception_inside_a_decoder_is_a_dead_letter_with_its_reason(
    bus_setup: BusSetup, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = schemas._DECODERS[KIND_PROMPT]

    def buggy(data: bytes, decoders: Any) -> Message:
        if b"buggy" in data:
            raise KeyError("a bug in a decoder")
        return original(data, decoders)

    monkeypatch.setitem(schemas._DECODERS, KIND_PROMPT, buggy)

    async def body(s: BusSetup, bus: Bus) -> None:
        stream = s.config.prompts_stream
        await bus.ensure_group(stream, INFERENCE_GROUP)
        await bus.publish_many(stream, [make_prompt("buggy"), make_prompt(2)])
        got = await bus.read(stream, INFERENCE_GROUP, "r0", 10, block_ms=0)
        assert [d.message.prompt_id for d in got] == ["p-00002"]
        (dead,) = await bus.dead_letters()
        assert "KeyError" in dead.reason and "a bug in a decoder" in dead.reason

    run(bus_setup, body)


@pytest.mark.parametrize("error", [RecursionError, MemoryError, TypeError, AssertionError])
def test_an_exception_escaping_decode_still_gives_a_dead_letter(
    monkeypatch: pytest.MonkeyPatch, error: type[Exception]
) -> None:
    def escaping(*args: Any, **kwargs: Any) -> Message:
        raise error("escaped")

    monkeypatch.setattr(entries_module, "decode", escaping)
    payload = encode(make_prompt(1))
    got = decode_entry(RawEntry("5-0", {names.PAYLOAD_FIELD: payload}, 2), None, "s", "g", "c")
    assert isinstance(got, DeadLetter)
    assert error.__name__ in got.reason and got.payload == payload and got.deliveries == 2


def test_an_entry_past_max_deliveries_is_dead_lettered_without_being_decoded_again(
    bus_setup: BusSetup, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded: list[bytes] = []
    original = schemas.decode

    def counting(data: bytes, *args: Any, **kwargs: Any) -> Message:
        decoded.append(data)
        return original(data, *args, **kwargs)

    monkeypatch.setattr(entries_module, "decode", counting)

    async def body(s: BusSetup, bus: Bus) -> None:
        stream = s.config.prompts_stream
        await bus.ensure_group(stream, INFERENCE_GROUP)
        await bus.publish(stream, make_prompt("poison"))
        for attempt in range(1, s.config.max_deliveries + 1):
            got = await bus.read(stream, INFERENCE_GROUP, "r0", 10, block_ms=0)
            assert [d.delivery_count for d in got] == [attempt]
            await bus.release(got)  # the worker failed on it
        assert len(decoded) == s.config.max_deliveries
        assert await bus.read(stream, INFERENCE_GROUP, "r0", 10, block_ms=0) == []
        assert len(decoded) == s.config.max_deliveries  # not decoded a further time
        (dead,) = await bus.dead_letters()
        assert "not decoded again" in dead.reason
        assert dead.deliveries == s.config.max_deliveries + 1

    run(bus_setup, body)


# ----------------------------------------------------------------------------- 2. bounds


def test_group_size_and_max_tokens_of_2_to_the_62_are_dead_lettered_naming_the_field(
    bus_setup: BusSetup,
) -> None:
    huge_group = with_raw(make_prompt("g"), "group_size", packed(2**62))
    huge_tokens = with_raw(make_prompt("t"), "max_tokens", packed(2**62))

    async def body(s: BusSetup, bus: Bus) -> None:
        stream = s.config.prompts_stream
        await bus.ensure_group(stream, INFERENCE_GROUP)
        await bus.publish_encoded(stream, [huge_group, huge_tokens])
        await bus.publish(stream, make_prompt(1))
        got = await bus.read(stream, INFERENCE_GROUP, "r0", 10, block_ms=0)
        assert [d.message.prompt_id for d in got] == ["p-00001"]
        reasons = [d.reason for d in await bus.dead_letters()]
        assert "field 'group_size' must be an integer in [1, 1024]" in reasons[0]
        assert "field 'max_tokens' must be an integer in [1, 131072]" in reasons[1]

    run(bus_setup, body)


def test_a_scored_group_of_100000_rollouts_is_refused_before_it_is_built() -> None:
    body = body_of(make_group("g", size=1, tokens=2))
    body["rollouts"] = body["rollouts"] * 100_000
    data = packed(body)
    started = time.perf_counter()
    with pytest.raises(SchemaError, match="'rollouts' must be a list of at most 1024 rollouts"):
        decode(data)
    assert time.perf_counter() - started < 0.05  # refused from the list header, not per item


def test_default_limits_admit_whatever_a_valid_run_config_produces() -> None:
    """The defaults are the config's own bounds, so no valid run is refused by them."""
    assert DEFAULT_LIMITS.max_group_size == config_bound(RolloutConfig, "group_size")
    assert DEFAULT_LIMITS.max_sequence_tokens == config_bound(ModelConfig, "max_model_len")
    assert DEFAULT_LIMITS.max_tokens >= config_bound(RolloutConfig, "max_tokens")
    assert DEFAULT_LIMITS.max_tokens >= config_bound(ModelConfig, "max_model_len")
    assert DEFAULT_LIMITS.max_temperature == config_bound(RolloutConfig, "temperature")
    assert DEFAULT_LIMITS.max_abs_reward == config_bound(TaskConfig, "max_reward")
    assert DEFAULT_LIMITS.max_images >= config_bound(TaskConfig, "max_images")
    text = config_bound(RewardConfig, "max_completion_bytes")
    assert DEFAULT_LIMITS.max_completion_chars == DEFAULT_LIMITS.max_answer_chars == text
    largest = build_config(
        {
            "rollout": {"group_size": 1024, "max_tokens": 65536, "temperature": 2.0},
            "model": {"max_model_len": 131072},
            "reward": {"max_group": 65536, "max_completion_bytes": 16 << 20},
        }
    )
    assert wire_limits(largest) == DEFAULT_LIMITS
    with pytest.raises(ValueError, match="must be a finite int > 0"):
        WireLimits(max_group_size=0)
    with pytest.raises(ValueError, match="must be a finite int > 0"):
        WireLimits(max_tokens=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must be a finite float > 0"):
        WireLimits(max_abs_reward=math.inf)


def test_a_run_config_bounds_groups_by_reward_max_group_and_tokens_by_max_model_len(
    bus_setup: BusSetup,
) -> None:
    cfg: RunConfig = build_config(
        {"reward": {"max_group": 4}, "model": {"max_model_len": 64}, "rollout": {"max_tokens": 16}}
    ).model_copy(update={"bus": bus_setup.config})
    limits = wire_limits(cfg)
    assert (limits.max_group_size, limits.max_sequence_tokens, limits.max_tokens) == (4, 64, 64)

    async def main() -> None:
        bus = make_bus(cfg)
        try:
            assert bus.limits == limits
            prompts, groups = cfg.bus.prompts_stream, cfg.bus.rollouts_stream
            await bus.ensure_group(prompts, INFERENCE_GROUP)
            await bus.ensure_group(groups, TRAINER_GROUP)
            await bus.publish_many(prompts, [make_prompt("five", 5), make_prompt("four", 4)])
            got = await bus.read(prompts, INFERENCE_GROUP, "r0", 10, block_ms=0)
            assert [d.message.prompt_id for d in got] == ["four"]
            fits, too_many, too_long = (
                make_group("fits", size=4, tokens=64),
                make_group("too-many", size=5),
                make_group("too-long", tokens=65),
            )
            await bus.publish_many(groups, [too_many, too_long, fits])
            got = await bus.read(groups, TRAINER_GROUP, "t", 10, block_ms=0)
            assert [d.message.group_id for d in got] == ["fits"]
            reasons = [d.reason for d in await bus.dead_letters()]
            assert "field 'group_size' must be an integer in [1, 4]" in reasons[0]
            assert "field 'rollouts' must be a list of at most 4 rollouts" in reasons[1]
            assert "field 'token_ids' must be bytes of at most 64 int32 values" in reasons[2]
        finally:
            await bus.close()

    asyncio.run(main())


# ----------------------------------------------------------------------------- 3. held entries


def _worker(bus: Bus, cfg: RunConfig, replica: str) -> rw.RolloutWorker:
    service = types.SimpleNamespace(config=cfg, replica=replica)
    return rw.RolloutWorker(service, bus, scorer=object())  # type: ignore[arg-type]


@pytest.mark.parametrize("failing", ["release", "dead_letter"])
def test_a_prompt_whose_way_back_fails_is_no_longer_renewed_and_another_replica_reclaims_it(
    bus_setup: BusSetup, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """The worker fails on a prompt (the engine: give it back; or a refusal: dead-letter it),
    and that call to the bus fails too. The prompt must not stay held and renewed for ever."""
    cfg = build_config({}).model_copy(update={"bus": bus_setup.config})
    idle_s = cfg.bus.claim_idle_ms / 1000

    async def body(s: BusSetup, holder: Bus, other: Bus) -> None:
        stream = s.config.prompts_stream
        await holder.ensure_group(stream, INFERENCE_GROUP)
        await holder.publish(stream, make_prompt("stuck"))
        (delivery,) = await holder.read(stream, INFERENCE_GROUP, "holder", 1, block_ms=0)
        worker = _worker(holder, cfg, "holder")

        async def refuse(*args: Any, **kwargs: Any) -> None:
            raise ConnectionError("the bus went away")

        async def rollout(prompt: PromptMessage) -> ScoredGroup:
            await asyncio.sleep(idle_s * 1.5)  # longer than claim_idle_ms: renewed meanwhile
            if failing == "release":
                raise RuntimeError("the engine failed")
            raise PromptRejected("the prompt is empty")

        monkeypatch.setattr(holder, failing, refuse)
        monkeypatch.setattr(worker, "rollout", rollout)
        touched: list[str] = []
        touch = holder.streams.touch

        async def recording(stream: str, group: str, consumer: str, ids: Any, idle: int) -> None:
            touched.extend(ids)
            await touch(stream, group, consumer, ids, idle)

        monkeypatch.setattr(holder.streams, "touch", recording)
        renewer = asyncio.create_task(worker._renew_forever())
        try:
            processing = asyncio.create_task(worker._process(delivery))
            await asyncio.sleep(idle_s * 1.2)
            assert delivery.entry_id in touched  # kept ours while being worked on ...
            assert await other.read(stream, INFERENCE_GROUP, "other", 1, block_ms=0) == []
            await processing
            assert holder.held(stream, INFERENCE_GROUP) == []
            touched.clear()
            got: list[Delivery[Any]] = []
            deadline = time.monotonic() + idle_s * 3 + 1
            while not got and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                got = await other.read(stream, INFERENCE_GROUP, "other", 1, block_ms=0)
            # ... and left to the bus once nobody works on it: reclaimed after claim_idle_ms.
            assert [(d.message_id, d.delivery_count) for d in got] == [("stuck", 2)]
            assert delivery.entry_id not in touched
        finally:
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)

    run(bus_setup, body, n_buses=2)


def test_entries_whose_release_fails_on_the_server_are_no_longer_held(
    bus_setup: BusSetup, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def body(s: BusSetup, holder: Bus, other: Bus) -> None:
        stream = s.config.rollouts_stream
        await holder.ensure_group(stream, TRAINER_GROUP)
        await holder.publish_many(stream, [make_group("g0"), make_group("g1")])
        got = await holder.read(stream, TRAINER_GROUP, "holder", 10, block_ms=0)

        async def broken(*args: Any, **kwargs: Any) -> None:
            raise ConnectionError("XCLAIM failed")

        monkeypatch.setattr(holder.streams, "touch", broken)
        with pytest.raises(ConnectionError):
            await holder.release(got)
        assert holder.held(stream, TRAINER_GROUP) == []
        await asyncio.sleep(s.config.claim_idle_ms / 1000 + 0.15)
        # Reading no longer renews them (the touch would fail anyway): the other one gets them.
        again = await other.read(stream, TRAINER_GROUP, "other", 10, block_ms=0)
        assert sorted(d.message_id for d in again) == ["g0", "g1"]

    run(bus_setup, body, n_buses=2)


def test_a_read_whose_dead_letter_write_fails_holds_nothing(
    bus_setup: BusSetup, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def body(s: BusSetup, holder: Bus, other: Bus) -> None:
        stream = s.config.prompts_stream
        await holder.ensure_group(stream, INFERENCE_GROUP)
        await holder.publish_encoded(stream, [b"\xc1 garbage"])
        await holder.publish(stream, make_prompt(1))
        add = holder.streams.add

        async def failing_add(key: str, *args: Any, **kwargs: Any) -> list[str]:
            if key == s.config.dead_letter_stream:
                raise ConnectionError("MULTI/EXEC failed")
            return await add(key, *args, **kwargs)

        monkeypatch.setattr(holder.streams, "add", failing_add)
        with pytest.raises(ConnectionError):
            await holder.read(stream, INFERENCE_GROUP, "holder", 10, block_ms=0)
        assert holder.held(stream, INFERENCE_GROUP) == []
        await asyncio.sleep(s.config.claim_idle_ms / 1000 + 0.15)
        got = await other.read(stream, INFERENCE_GROUP, "other", 10, block_ms=0)
        assert [d.message.prompt_id for d in got] == ["p-00001"]
        (dead,) = await other.dead_letters()
        assert dead.payload == b"\xc1 garbage"

    run(bus_setup, body, n_buses=2)


def test_a_processing_block_whose_ack_fails_holds_nothing(
    bus_setup: BusSetup, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def body(s: BusSetup, holder: Bus, other: Bus) -> None:
        stream = s.config.prompts_stream
        await holder.ensure_group(stream, INFERENCE_GROUP)
        await holder.publish(stream, make_prompt(1))

        async def broken(*args: Any, **kwargs: Any) -> int:
            raise ConnectionError("XACK failed")

        monkeypatch.setattr(holder.streams, "ack", broken)
        with pytest.raises(ConnectionError):
            async with holder.processing(stream, INFERENCE_GROUP, "holder", 1, block_ms=0) as got:
                assert len(got) == 1
        assert holder.held(stream, INFERENCE_GROUP) == []
        await holder.read(stream, INFERENCE_GROUP, "holder", 1, block_ms=0)  # renews nothing
        await asyncio.sleep(s.config.claim_idle_ms / 1000 + 0.15)
        again = await other.read(stream, INFERENCE_GROUP, "other", 1, block_ms=0)
        assert [d.message_id for d in again] == ["p-00001"]

    run(bus_setup, body, n_buses=2)


# ----------------------------------------------------------------------------- 4. fuzzing


def fuzz(cases: int) -> settings:
    """Settings of one fuzzing test: about 3,800 cases in all across those below."""
    return settings(
        max_examples=cases,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def decodes_or_refuses(data: bytes) -> None:
    """The property every decoder keeps: a valid message (that round-trips) or a SchemaError
    with a short reason; and, through a stream entry, a Delivery or a DeadLetter."""
    for limits in (DEFAULT_LIMITS, SMALL):
        for kind in KINDS:
            try:
                msg = decode(data, expect=kind, limits=limits)
            except SchemaError as exc:
                assert 0 < len(str(exc)) <= 1000
                continue
            assert isinstance(msg, (PromptMessage, ScoredGroup, WeightAnnouncement))
            assert kind in (None, msg.kind)
            assert decode(encode(msg), limits=limits) == msg
    raw = RawEntry("1-0", {names.PAYLOAD_FIELD: data}, 1)
    got = decode_entry(raw, None, "s", "g", "c", limits=SMALL, max_deliveries=3)
    assert isinstance(got, (Delivery, DeadLetter))


scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=12)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.integers(-5, 5), inner, max_size=4)
    ),
    max_leaves=12,
)
#: Headers that declare far more than follows: array, map, str, bin and ext of 32-bit length.
HUGE_HEADERS = [b"\xdd", b"\xdf", b"\xdb", b"\xc6", b"\xc9", b"\xdc", b"\xde", b"\xda", b"\xc5"]


@st.composite
def huge_declared_lengths(draw: st.DrawFn) -> bytes:
    tag = draw(st.sampled_from(HUGE_HEADERS))
    width = 4 if tag in (b"\xdd", b"\xdf", b"\xdb", b"\xc6", b"\xc9") else 2
    length = draw(st.integers(1 << (8 * width - 1), (1 << (8 * width)) - 1))
    return tag + length.to_bytes(width, "big") + draw(st.binary(max_size=16))


@st.composite
def placed(draw: st.DrawFn, value: st.SearchStrategy[bytes]) -> bytes:
    """``value`` as a whole payload, as a field of a valid message, or inside its rollout."""
    raw = draw(value)
    msg = draw(st.sampled_from(MESSAGES))
    where = draw(st.sampled_from(["payload", "field", "unknown", "rollout"]))
    if where == "payload":
        return raw
    if where == "rollout" and isinstance(msg, ScoredGroup):
        rollout = body_of(msg)["rollouts"][0]
        key = draw(st.sampled_from([*rollout, "extra"]))
        pairs = [(k, raw if k == key else packed(v)) for k, v in rollout.items()]
        return with_raw(msg, "rollouts", b"\x91" + raw_map(pairs))
    field = draw(st.sampled_from([*body_of(msg), "extra"])) if where == "field" else "extra"
    return with_raw(msg, field, raw)


@fuzz(600)
@given(st.binary(max_size=200))
def test_random_bytes_decode_or_are_refused(data: bytes) -> None:
    decodes_or_refuses(data)


@fuzz(600)
@given(values)
def test_random_msgpack_values_decode_or_are_refused(value: Any) -> None:
    decodes_or_refuses(packed(value))


@fuzz(800)
@given(st.data())
def test_valid_messages_with_a_field_mutated_decode_or_are_refused(data: st.DataObject) -> None:
    msg = data.draw(st.sampled_from(MESSAGES))
    body = body_of(msg)
    target: dict[Any, Any] = body
    if isinstance(msg, ScoredGroup) and data.draw(st.booleans()):
        target = body["rollouts"][data.draw(st.integers(0, len(msg.rollouts) - 1))]
    key = data.draw(st.sampled_from([*target, "extra", 7]))
    if data.draw(st.booleans()):
        target.pop(key, None)
    else:
        target[key] = data.draw(values)
    decodes_or_refuses(packed(body))


@fuzz(600)
@given(st.sampled_from(MESSAGES), st.data())
def test_valid_messages_with_bytes_flipped_cut_or_inserted_decode_or_are_refused(
    msg: Message, data: st.DataObject
) -> None:
    raw = bytearray(encode(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw)))
        how = data.draw(st.sampled_from(["flip", "cut", "insert", "truncate"]))
        if how == "flip" and at < len(raw):
            raw[at] ^= data.draw(st.integers(1, 255))
        elif how == "cut":
            del raw[at : at + data.draw(st.integers(1, 8))]
        elif how == "insert":
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        else:
            del raw[at:]
    decodes_or_refuses(bytes(raw))


@fuzz(300)
@given(placed(st.builds(nested, st.integers(1, 4000), st.sampled_from(["list", "map"]))))
def test_deep_nesting_anywhere_decodes_or_is_refused(data: bytes) -> None:
    decodes_or_refuses(data)


@fuzz(400)
@given(placed(huge_declared_lengths()))
def test_huge_declared_lengths_anywhere_are_refused(data: bytes) -> None:
    decodes_or_refuses(data)


@fuzz(300)
@given(
    st.dictionaries(st.binary(max_size=3) | st.just(names.PAYLOAD_FIELD), st.binary(max_size=64))
    | st.none(),
    st.integers(0, 2**40),
)
def test_entries_with_random_fields_give_a_delivery_or_a_dead_letter(
    fields: dict[bytes, bytes] | None, count: int
) -> None:
    got = decode_entry(RawEntry("1-0", fields, count), KIND_PROMPT, "s", "g", "c", max_deliveries=5)
    assert isinstance(got, (Delivery, DeadLetter))
    if count > 5:
        assert isinstance(got, DeadLetter)


DL_FIELDS = [names.DL_STREAM, names.DL_REASON, names.DL_DELIVERIES, names.DL_AT, names.DL_PAYLOAD]


@fuzz(200)
@given(
    st.dictionaries(
        st.sampled_from(DL_FIELDS) | st.binary(max_size=3),
        st.binary(max_size=40) | st.sampled_from([b"1e400", b"nan", b"-3", b"9" * 80]),
    )
)
def test_dead_letter_records_with_random_fields_read_back(fields: dict[bytes, bytes]) -> None:
    letter = DeadLetter.from_entry(RawEntry("1-0", fields, 0))
    assert isinstance(letter.deliveries, int) and isinstance(letter.at, float)
    assert isinstance(
        DeadLetter.of_payload("s", fields.get(names.DL_PAYLOAD, b""), "x"), DeadLetter
    )


def test_a_valid_message_at_every_bound_still_decodes() -> None:
    """The bounds are inclusive: a message exactly at each of them is not refused."""
    L = SMALL
    rollout = Rollout(
        text="x" * L.max_completion_chars,
        token_ids=np.arange(L.max_sequence_tokens, dtype=np.int32),
        logprobs=np.zeros(L.max_sequence_tokens, dtype=np.float32),
        reward=-L.max_abs_reward,
        success=False,
        status="cannot_score",
        terms={"t" * L.max_name_chars: L.max_abs_reward, "u": 0.0},
        finish_reason="f" * L.max_name_chars,
    )
    prompt = PromptMessage(
        "i" * L.max_id_chars,
        "p" * L.max_prompt_chars,
        "a" * L.max_answer_chars,
        "t" * L.max_name_chars,
        L.max_group_size,
        L.max_temperature,
        1.0,
        L.max_tokens,
        L.max_version,
        L.max_timestamp,
        (image_ref(b"1"), image_ref(b"2")),
    )
    weights = WeightAnnouncement(L.max_version, "l" * L.max_location_chars, "0" * 64, L.max_version)
    group = ScoredGroup(
        "g",
        "p",
        np.zeros(L.max_sequence_tokens, np.int32),
        "a",
        "t",
        L.max_version,
        "r" * L.max_name_chars,
        (rollout,) * L.max_group_size,
    )
    for msg in (prompt, weights):
        assert decode(encode(msg), limits=L) == msg
    assert decode(encode(group), limits=L) == group
    tight = WireLimits(**{**SMALL.__dict__, "max_payload_bytes": 100})
    with pytest.raises(SchemaError, match="exceeds 100"):
        decode(encode(group), limits=tight)
