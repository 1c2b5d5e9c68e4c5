"""Wire schemas: round trips, and every kind of bad payload gives a SchemaError that says why."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import pytest

from services.core.schemas import (
    KIND_PROMPT,
    KIND_SCORED_GROUP,
    KIND_WEIGHTS,
    SCHEMA_VERSION,
    Message,
    PromptMessage,
    Rollout,
    SchemaError,
    ScoredGroup,
    WeightAnnouncement,
    decode,
    encode,
)


def prompt() -> PromptMessage:
    return PromptMessage(
        prompt_id="p-17",
        prompt="What is 2 + 3?",
        answer="5",
        task="arithmetic",
        group_size=8,
        temperature=1.0,
        top_p=0.99,
        max_tokens=32,
        issued_version=4,
        created_at=1712345678.25,
    )


def rollout(reward: float = 1.0, n_tokens: int = 3) -> Rollout:
    return Rollout(
        text="<think>2+3</think> \\boxed{5}",
        token_ids=np.arange(n_tokens, dtype=np.int32) + 100,
        logprobs=-np.linspace(0.1, 1.0, n_tokens, dtype=np.float32),
        reward=reward,
        success=reward >= 1.0,
        status="scored",
        terms={"format": 1.0, "accuracy": 1.0},
        finish_reason="stop",
    )


def scored_group() -> ScoredGroup:
    return ScoredGroup(
        group_id="p-17",
        prompt="What is 2 + 3?",
        prompt_token_ids=np.array([1, 2, 3, 4], dtype=np.int32),
        answer="5",
        task="arithmetic",
        policy_version=4,
        replica="host-1",
        rollouts=(rollout(1.0), rollout(0.1, n_tokens=5), rollout(0.0, n_tokens=0)),
        created_at=1712345679.5,
    )


def weights() -> WeightAnnouncement:
    return WeightAnnouncement(
        version=5, location="runs/default/weights/v5", manifest_sha256="ab" * 32, step=40
    )


def body_of(msg: Message) -> dict[str, Any]:
    body: dict[str, Any] = msgpack.unpackb(encode(msg), raw=False)
    return body


def pack(body: dict[str, Any]) -> bytes:
    data: bytes = msgpack.packb(body, use_bin_type=True)
    return data


@pytest.mark.parametrize("make", [prompt, scored_group, weights])
def test_every_message_kind_round_trips_unchanged(make: Callable[[], Message]) -> None:
    msg = make()
    back = decode(encode(msg))
    assert type(back) is type(msg)
    assert back == msg


def test_round_trip_keeps_array_dtypes() -> None:
    back = decode(encode(scored_group()), expect=KIND_SCORED_GROUP)
    assert isinstance(back, ScoredGroup)
    assert back.prompt_token_ids.dtype == np.int32
    assert back.rollouts[1].logprobs.dtype == np.float32
    assert back.rollouts[2].token_ids.size == 0
    assert back.rewards == [1.0, 0.1, 0.0]


@pytest.mark.parametrize(
    "garbage", [b"", b"\xc1", b"\xff\x00garbage", b"\x93\x01\x02\x03", b"\xa5hello"]
)
def test_garbage_bytes_are_a_schema_error(garbage: bytes) -> None:
    with pytest.raises(SchemaError, match="msgpack"):
        decode(garbage)


def test_non_bytes_payload_is_a_schema_error() -> None:
    with pytest.raises(SchemaError, match="must be bytes"):
        decode("not bytes")  # type: ignore[arg-type]


@pytest.mark.parametrize("version", [SCHEMA_VERSION + 1, 0, "1", None])
def test_wrong_version_is_rejected_naming_both_versions(version: object) -> None:
    body = body_of(prompt())
    body["v"] = version
    with pytest.raises(SchemaError, match=rf"unsupported schema version.*reads {SCHEMA_VERSION}"):
        decode(pack(body))


def test_unknown_kind_is_rejected() -> None:
    body = body_of(prompt())
    body["kind"] = "gradient"
    with pytest.raises(SchemaError, match="unknown message kind 'gradient'"):
        decode(pack(body))


def test_a_valid_message_of_another_kind_is_rejected_when_a_kind_is_expected() -> None:
    with pytest.raises(SchemaError, match="expected a 'scored_group' message, got 'weights'"):
        decode(encode(weights()), expect=KIND_SCORED_GROUP)
    assert isinstance(decode(encode(weights()), expect=KIND_WEIGHTS), WeightAnnouncement)
    assert isinstance(decode(encode(prompt()), expect=KIND_PROMPT), PromptMessage)


@pytest.mark.parametrize(
    ("make", "field"),
    [(prompt, "prompt"), (prompt, "group_size"), (scored_group, "rollouts"), (weights, "location")],
)
def test_missing_field_is_named(make: Callable[[], Message], field: str) -> None:
    body = body_of(make())
    del body[field]
    with pytest.raises(SchemaError, match=f"missing field '{field}'"):
        decode(pack(body))


def test_missing_field_inside_a_rollout_names_the_rollout() -> None:
    body = body_of(scored_group())
    del body["rollouts"][1]["reward"]
    with pytest.raises(SchemaError, match=r"rollouts\[1\]: missing field 'reward'"):
        decode(pack(body))


def test_token_and_logprob_lengths_must_match() -> None:
    body = body_of(scored_group())
    body["rollouts"][0]["logprobs"] = np.zeros(2, dtype="<f4").tobytes()
    with pytest.raises(SchemaError, match="3 token ids but 2 log-probs"):
        decode(pack(body))
    bad = Rollout(
        text="x",
        token_ids=np.arange(3, dtype=np.int32),
        logprobs=np.zeros(2, dtype=np.float32),
        reward=0.0,
        success=False,
    )
    with pytest.raises(SchemaError, match="must match"):
        encode(ScoredGroup("g", "p", np.zeros(1, np.int32), "a", "t", 0, "r", (bad,)))


def test_nan_reward_is_rejected_on_both_sides() -> None:
    with pytest.raises(SchemaError, match="'reward' must be finite"):
        encode(ScoredGroup("g", "p", np.zeros(1, np.int32), "a", "t", 0, "r", (rollout(math.nan),)))
    body = body_of(scored_group())
    body["rollouts"][2]["reward"] = math.nan
    with pytest.raises(SchemaError, match=r"rollouts\[2\]: field 'reward' must be finite"):
        decode(pack(body))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b.update(group_size=0), "group_size must be >= 1"),
        (lambda b: b.update(group_size=True), "must be a number, got bool"),
        (lambda b: b.update(top_p=1.5), "top_p"),
        (lambda b: b.update(prompt_id=""), "prompt_id must not be empty"),
        (lambda b: b.update(issued_version=-1), "must be >= 0"),
    ],
)
def test_invalid_prompt_fields_are_rejected(
    mutate: Callable[[dict[str, Any]], None], message: str
) -> None:
    body = body_of(prompt())
    mutate(body)
    with pytest.raises(SchemaError, match=message):
        decode(pack(body))


def test_invalid_rollout_contents_are_rejected() -> None:
    body = body_of(scored_group())
    body["rollouts"][0]["logprobs"] = np.array([0.5, -1, -1], dtype="<f4").tobytes()
    with pytest.raises(SchemaError, match="log-probs must be finite and <= 0"):
        decode(pack(body))
    body = body_of(scored_group())
    body["rollouts"][0]["status"] = "great"
    with pytest.raises(SchemaError, match="unknown status 'great'"):
        decode(pack(body))
    body = body_of(scored_group())
    body["rollouts"] = []
    with pytest.raises(SchemaError, match="at least one rollout"):
        decode(pack(body))


def test_bad_manifest_digest_is_rejected() -> None:
    body = body_of(weights())
    body["manifest_sha256"] = "AB" * 32
    with pytest.raises(SchemaError, match="64 lowercase hex"):
        decode(pack(body))
