"""Wire schemas for the bus: prompts, scored groups and weight announcements.

Every payload is a msgpack map with ``kind`` (what it is) and ``v`` (schema version), so a
reader can tell a stale or foreign message from a corrupt one. Arrays travel as raw
little-endian bytes (int32 token ids, float32 log-probs). Nothing is ever pickled: a stream is
an input from the network, and :func:`decode` validates every field before anything uses it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack
import numpy as np

SCHEMA_VERSION: Final = 1
MAX_PAYLOAD_BYTES: Final = 64 << 20

KIND_PROMPT: Final = "prompt"
KIND_SCORED_GROUP: Final = "scored_group"
KIND_WEIGHTS: Final = "weights"

ROLLOUT_STATUSES: Final = frozenset({"scored", "cannot_score", "timed_out", "error"})


class SchemaError(ValueError):
    """A payload that cannot be decoded or fails validation; the message says why."""


@dataclass(frozen=True)
class PromptMessage:
    """One prompt to roll out G times. ``prompt_id`` is the group id everything is keyed by."""

    prompt_id: str
    prompt: str
    answer: str
    task: str
    group_size: int
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 32
    issued_version: int = 0
    created_at: float = 0.0

    kind: str = field(default=KIND_PROMPT, init=False, repr=False)


@dataclass(frozen=True)
class Rollout:
    """One sampled completion with its tokens, behaviour log-probs and reward."""

    text: str
    token_ids: np.ndarray  # int32 [T]
    logprobs: np.ndarray  # float32 [T], behaviour policy log-prob of each sampled token
    reward: float
    success: bool
    status: str = "scored"
    terms: dict[str, float] = field(default_factory=dict)
    finish_reason: str = "stop"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Rollout):
            return NotImplemented
        return (
            self.text == other.text
            and np.array_equal(self.token_ids, other.token_ids)
            and np.array_equal(self.logprobs, other.logprobs)
            and self.reward == other.reward
            and self.success == other.success
            and self.status == other.status
            and self.terms == other.terms
            and self.finish_reason == other.finish_reason
        )

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True)
class ScoredGroup:
    """All G rollouts of one prompt, scored, stamped with the policy version that made them."""

    group_id: str
    prompt: str
    prompt_token_ids: np.ndarray  # int32 [P]
    answer: str
    task: str
    policy_version: int
    replica: str
    rollouts: tuple[Rollout, ...]
    created_at: float = 0.0

    kind: str = field(default=KIND_SCORED_GROUP, init=False, repr=False)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ScoredGroup):
            return NotImplemented
        return (
            self.group_id == other.group_id
            and self.prompt == other.prompt
            and np.array_equal(self.prompt_token_ids, other.prompt_token_ids)
            and self.answer == other.answer
            and self.task == other.task
            and self.policy_version == other.policy_version
            and self.replica == other.replica
            and self.rollouts == other.rollouts
            and self.created_at == other.created_at
        )

    __hash__ = None  # type: ignore[assignment]

    @property
    def rewards(self) -> list[float]:
        return [r.reward for r in self.rollouts]


@dataclass(frozen=True)
class WeightAnnouncement:
    """A new policy version is in the weight store at ``location`` (directory or URL)."""

    version: int
    location: str
    manifest_sha256: str
    step: int = 0
    created_at: float = 0.0

    kind: str = field(default=KIND_WEIGHTS, init=False, repr=False)


Message = PromptMessage | ScoredGroup | WeightAnnouncement


def _i32(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a, dtype="<i4").tobytes()


def _f32(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a, dtype="<f4").tobytes()


def _rollout_to_wire(r: Rollout) -> dict[str, Any]:
    return {
        "text": r.text,
        "token_ids": _i32(r.token_ids),
        "logprobs": _f32(r.logprobs),
        "reward": float(r.reward),
        "success": bool(r.success),
        "status": r.status,
        "terms": {str(k): float(v) for k, v in r.terms.items()},
        "finish_reason": r.finish_reason,
    }


def encode(msg: Message) -> bytes:
    """Serialise a message to its versioned msgpack form (validating it first)."""
    body: dict[str, Any]
    if isinstance(msg, PromptMessage):
        body = {
            "prompt_id": msg.prompt_id,
            "prompt": msg.prompt,
            "answer": msg.answer,
            "task": msg.task,
            "group_size": msg.group_size,
            "temperature": float(msg.temperature),
            "top_p": float(msg.top_p),
            "max_tokens": msg.max_tokens,
            "issued_version": msg.issued_version,
            "created_at": float(msg.created_at),
        }
    elif isinstance(msg, ScoredGroup):
        body = {
            "group_id": msg.group_id,
            "prompt": msg.prompt,
            "prompt_token_ids": _i32(msg.prompt_token_ids),
            "answer": msg.answer,
            "task": msg.task,
            "policy_version": msg.policy_version,
            "replica": msg.replica,
            "rollouts": [_rollout_to_wire(r) for r in msg.rollouts],
            "created_at": float(msg.created_at),
        }
    elif isinstance(msg, WeightAnnouncement):
        body = {
            "version": msg.version,
            "location": msg.location,
            "manifest_sha256": msg.manifest_sha256,
            "step": msg.step,
            "created_at": float(msg.created_at),
        }
    else:
        raise SchemaError(f"cannot encode {type(msg).__name__}")
    body["kind"] = msg.kind
    body["v"] = SCHEMA_VERSION
    data: bytes = msgpack.packb(body, use_bin_type=True)
    # Round-trip validation keeps producers from writing what consumers would dead-letter.
    decode(data)
    return data


# ----------------------------------------------------------------------------- decoding


def _get(d: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise SchemaError(f"{where}: missing field '{key}'")
    value = d[key]
    if isinstance(value, bool) and typ in (int, float, (int, float)):
        raise SchemaError(f"{where}: field '{key}' must be a number, got bool")
    if not isinstance(value, typ):
        names = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
        raise SchemaError(f"{where}: field '{key}' must be {names}, got {type(value).__name__}")
    return value


def _finite(d: dict[str, Any], key: str, where: str) -> float:
    value = float(_get(d, key, (int, float), where))
    if not math.isfinite(value):
        raise SchemaError(f"{where}: field '{key}' must be finite, got {value}")
    return value


def _nonneg_int(d: dict[str, Any], key: str, where: str) -> int:
    value = int(_get(d, key, int, where))
    if value < 0:
        raise SchemaError(f"{where}: field '{key}' must be >= 0, got {value}")
    return value


def _array(d: dict[str, Any], key: str, dtype: str, where: str) -> np.ndarray:
    raw = _get(d, key, bytes, where)
    if len(raw) % 4:
        raise SchemaError(f"{where}: field '{key}' has {len(raw)} bytes, not a multiple of 4")
    return np.frombuffer(raw, dtype=dtype).astype(dtype[1:], copy=True)


def _decode_rollout(d: Any, where: str) -> Rollout:
    if not isinstance(d, dict):
        raise SchemaError(f"{where}: must be a map")
    token_ids = _array(d, "token_ids", "<i4", where)
    logprobs = _array(d, "logprobs", "<f4", where)
    if token_ids.shape != logprobs.shape:
        raise SchemaError(
            f"{where}: {token_ids.size} token ids but {logprobs.size} log-probs; they must match"
        )
    if token_ids.size and token_ids.min() < 0:
        raise SchemaError(f"{where}: negative token id")
    if not np.all(np.isfinite(logprobs)) or (logprobs.size and logprobs.max() > 1e-3):
        raise SchemaError(f"{where}: log-probs must be finite and <= 0")
    status = _get(d, "status", str, where)
    if status not in ROLLOUT_STATUSES:
        raise SchemaError(f"{where}: unknown status '{status}'")
    terms_raw = _get(d, "terms", dict, where)
    terms: dict[str, float] = {}
    for k, v in terms_raw.items():
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float)):
            raise SchemaError(f"{where}: terms must map names to numbers")
        if not math.isfinite(float(v)):
            raise SchemaError(f"{where}: term '{k}' must be finite")
        terms[k] = float(v)
    return Rollout(
        text=_get(d, "text", str, where),
        token_ids=token_ids,
        logprobs=logprobs,
        reward=_finite(d, "reward", where),
        success=_get(d, "success", bool, where),
        status=status,
        terms=terms,
        finish_reason=_get(d, "finish_reason", str, where),
    )


def _decode_prompt(d: dict[str, Any]) -> PromptMessage:
    w = "prompt"
    group_size = _nonneg_int(d, "group_size", w)
    if group_size < 1:
        raise SchemaError(f"{w}: group_size must be >= 1")
    prompt_id = _get(d, "prompt_id", str, w)
    if not prompt_id:
        raise SchemaError(f"{w}: prompt_id must not be empty")
    max_tokens = _nonneg_int(d, "max_tokens", w)
    if max_tokens < 1:
        raise SchemaError(f"{w}: max_tokens must be >= 1")
    top_p = _finite(d, "top_p", w)
    temperature = _finite(d, "temperature", w)
    if not 0.0 < top_p <= 1.0 or temperature < 0.0:
        raise SchemaError(f"{w}: need 0 < top_p <= 1 and temperature >= 0")
    return PromptMessage(
        prompt_id=prompt_id,
        prompt=_get(d, "prompt", str, w),
        answer=_get(d, "answer", str, w),
        task=_get(d, "task", str, w),
        group_size=group_size,
        temperature=temperature,
        top_p=top_p,
        max_tokens=max_tokens,
        issued_version=_nonneg_int(d, "issued_version", w),
        created_at=_finite(d, "created_at", w),
    )


def _decode_scored_group(d: dict[str, Any]) -> ScoredGroup:
    w = "scored_group"
    group_id = _get(d, "group_id", str, w)
    if not group_id:
        raise SchemaError(f"{w}: group_id must not be empty")
    raw_rollouts = _get(d, "rollouts", list, w)
    if not raw_rollouts:
        raise SchemaError(f"{w}: a group needs at least one rollout")
    rollouts = tuple(_decode_rollout(r, f"{w}.rollouts[{i}]") for i, r in enumerate(raw_rollouts))
    return ScoredGroup(
        group_id=group_id,
        prompt=_get(d, "prompt", str, w),
        prompt_token_ids=_array(d, "prompt_token_ids", "<i4", w),
        answer=_get(d, "answer", str, w),
        task=_get(d, "task", str, w),
        policy_version=_nonneg_int(d, "policy_version", w),
        replica=_get(d, "replica", str, w),
        rollouts=rollouts,
        created_at=_finite(d, "created_at", w),
    )


def _decode_weights(d: dict[str, Any]) -> WeightAnnouncement:
    w = "weights"
    sha = _get(d, "manifest_sha256", str, w)
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise SchemaError(f"{w}: manifest_sha256 must be 64 lowercase hex digits")
    location = _get(d, "location", str, w)
    if not location:
        raise SchemaError(f"{w}: location must not be empty")
    return WeightAnnouncement(
        version=_nonneg_int(d, "version", w),
        location=location,
        manifest_sha256=sha,
        step=_nonneg_int(d, "step", w),
        created_at=_finite(d, "created_at", w),
    )


_DECODERS: Final[dict[str, Callable[[dict[str, Any]], Message]]] = {
    KIND_PROMPT: _decode_prompt,
    KIND_SCORED_GROUP: _decode_scored_group,
    KIND_WEIGHTS: _decode_weights,
}


def decode(data: bytes, expect: str | None = None) -> Message:
    """Parse and validate a payload; raise :class:`SchemaError` saying what is wrong.

    ``expect`` names the kind the caller reads from this stream; anything else is rejected.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise SchemaError(f"payload must be bytes, got {type(data).__name__}")
    if len(data) > MAX_PAYLOAD_BYTES:
        raise SchemaError(f"payload of {len(data)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    try:
        body = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise SchemaError(f"not a msgpack payload: {exc.__class__.__name__}: {exc}") from None
    if not isinstance(body, dict):
        raise SchemaError(f"payload must be a msgpack map, got {type(body).__name__}")
    version = body.get("v")
    kind = body.get("kind")
    if version != SCHEMA_VERSION:
        raise SchemaError(
            f"unsupported schema version {version!r} (this build reads {SCHEMA_VERSION})"
        )
    if kind not in _DECODERS:
        raise SchemaError(f"unknown message kind {kind!r}")
    if expect is not None and kind != expect:
        raise SchemaError(f"expected a '{expect}' message, got '{kind}'")
    return _DECODERS[kind](body)
