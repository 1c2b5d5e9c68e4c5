"""Wire schemas: round trips, and every kind of bad payload gives a SchemaError that says why."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import pytest

from services.core.images import image_ref
from services.core.schemas import (
    DEFAULT_LIMITS,
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
    WireLimits,
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
        (lambda b: b.update(group_size=0), r"field 'group_size' must be an integer in \[1, "),
        (lambda b: b.update(group_size=True), "'group_size' must be an integer .*, got bool"),
        (lambda b: b.update(top_p=1.5), r"'top_p' must be finite and within \(0, 1\]"),
        (lambda b: b.update(prompt_id=""), "'prompt_id' must be a string of 1 to 512 characters"),
        (lambda b: b.update(issued_version=-1), r"'issued_version' must be an integer in \[0, "),
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
    body = body_of(scored_group())
    body["rollouts"][1]["terms"]["nan"] = math.nan
    with pytest.raises(SchemaError, match=r"rollouts\[1\]\.terms\[\.\.\.\]: must be finite"):
        decode(pack(body))


def test_bad_manifest_digest_is_rejected() -> None:
    body = body_of(weights())
    body["manifest_sha256"] = "AB" * 32
    with pytest.raises(SchemaError, match="64 lowercase hex"):
        decode(pack(body))


# ----------------------------------------------------------------------------- bounds

#: Bounds just above the test messages above, so one step past a bound is refused.
TIGHT = WireLimits(
    max_id_chars=8,
    max_name_chars=12,
    max_prompt_chars=16,
    max_answer_chars=4,
    max_completion_chars=32,
    max_location_chars=32,
    max_group_size=8,
    max_tokens=32,
    max_sequence_tokens=5,
    max_reward_terms=2,
    max_images=1,
    max_version=40,
    max_temperature=2.0,
    max_abs_reward=1.0,
    max_timestamp=2e9,
)
REF = image_ref(b"a picture")


def _set(*path: Any, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(body: dict[str, Any]) -> None:
        node = body
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return mutate


def _ids(n: int) -> bytes:
    return np.arange(n, dtype="<i4").tobytes()


@pytest.mark.parametrize(
    ("make", "mutate", "message"),
    [
        (prompt, _set("prompt_id", value="x" * 9), "'prompt_id' must be a string of 1 to 8 char"),
        (prompt, _set("prompt", value="x" * 17), "'prompt' must be a string of at most 16 char"),
        (prompt, _set("answer", value="x" * 5), "'answer' must be a string of at most 4 char"),
        (prompt, _set("task", value="x" * 13), "'task' must be a string of at most 12 char"),
        (prompt, _set("group_size", value=9), r"'group_size' must be an integer in \[1, 8\]"),
        (prompt, _set("group_size", value=2**62), r"'group_size' must be an integer in \[1, 8\]"),
        (
            prompt,
            _set("temperature", value=2.5),
            r"'temperature' must be finite and within \[0, 2\]",
        ),
        (prompt, _set("temperature", value=math.inf), "'temperature' must be finite"),
        (prompt, _set("max_tokens", value=33), r"'max_tokens' must be an integer in \[1, 32\]"),
        (prompt, _set("max_tokens", value=2**62), r"'max_tokens' must be an integer in \[1, 32\]"),
        (
            prompt,
            _set("issued_version", value=41),
            r"'issued_version' must be an integer in \[0, 40\]",
        ),
        (
            prompt,
            _set("created_at", value=3e9),
            r"'created_at' must be finite and within \[0, 2e\+09\]",
        ),
        (prompt, _set("created_at", value=-1.0), "'created_at' must be finite and within"),
        (prompt, _set("images", value=[REF, REF]), "'images' must be a list of at most 1 image"),
        (scored_group, _set("group_id", value="x" * 9), "'group_id' must be a string of 1 to 8"),
        (scored_group, _set("replica", value="x" * 13), "'replica' must be a string of at most 12"),
        (
            scored_group,
            _set("policy_version", value=41),
            r"'policy_version' must be an integer in \[0, 40\]",
        ),
        (
            scored_group,
            _set("prompt_token_ids", value=_ids(6)),
            "'prompt_token_ids' must be bytes of at most 5 int32",
        ),
        (
            scored_group,
            _set("rollouts", 0, "text", value="x" * 33),
            r"rollouts\[0\]: field 'text' must be a string of at most 32",
        ),
        (
            scored_group,
            _set("rollouts", 1, "token_ids", value=_ids(6)),
            r"rollouts\[1\]: field 'token_ids' must be bytes of at most 5 int32",
        ),
        (
            scored_group,
            _set("rollouts", 0, "terms", "x", value=0.5),
            r"rollouts\[0\]: field 'terms' must be a map of at most 2 reward terms",
        ),
        (
            scored_group,
            _set("rollouts", 0, "terms", value={"k" * 13: 0.5}),
            r"rollouts\[0\]\.terms: every key must be a string of at most 12",
        ),
        (
            scored_group,
            _set("rollouts", 2, "terms", "format", value=-2.0),
            r"rollouts\[2\]\.terms\[\.\.\.\]: must be finite and within \[-1, 1\]",
        ),
        (
            scored_group,
            _set("rollouts", 0, "reward", value=1.5),
            r"rollouts\[0\]: field 'reward' must be finite and within \[-1, 1\]",
        ),
        (
            scored_group,
            _set("rollouts", 0, "status", value="s" * 13),
            "'status' must be a string of at most 12",
        ),
        (
            scored_group,
            _set("rollouts", 0, "finish_reason", value="f" * 13),
            "'finish_reason' must be a string of at most 12",
        ),
        (weights, _set("version", value=41), r"'version' must be an integer in \[0, 40\]"),
        (weights, _set("step", value=2**62), r"'step' must be an integer in \[0, 40\]"),
        (weights, _set("location", value="l" * 33), "'location' must be a string of 1 to 32"),
    ],
)
def test_every_field_one_step_past_its_bound_is_refused_naming_the_field(
    make: Callable[[], Message], mutate: Callable[[dict[str, Any]], None], message: str
) -> None:
    assert decode(encode(make()), limits=TIGHT) == make()  # within every bound as it is
    body = body_of(make())
    mutate(body)
    with pytest.raises(SchemaError, match=message):
        decode(pack(body), limits=TIGHT)


def test_rollouts_past_the_group_bound_are_refused() -> None:
    body = body_of(scored_group())
    body["rollouts"] = body["rollouts"] * 3  # 9 rollouts
    with pytest.raises(SchemaError, match="'rollouts' must be a list of at most 8 rollouts"):
        decode(pack(body), limits=TIGHT)


def test_a_payload_larger_than_the_bound_is_refused_before_it_is_parsed() -> None:
    data = encode(scored_group())
    with pytest.raises(SchemaError, match=f"payload of {len(data)} bytes exceeds 100"):
        decode(data, limits=WireLimits(max_payload_bytes=100))


def test_decode_without_limits_applies_the_defaults() -> None:
    body = body_of(prompt())
    body["group_size"] = DEFAULT_LIMITS.max_group_size
    assert isinstance(decode(pack(body)), PromptMessage)
    body["group_size"] += 1
    with pytest.raises(SchemaError, match="group_size"):
        decode(pack(body))
