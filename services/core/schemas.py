"""Wire schemas for the bus: prompts, scored groups and weight announcements.

Every payload is a msgpack map with ``kind`` (what it is) and ``v`` (schema version), so a
reader can tell a stale or foreign message from a corrupt one. Arrays travel as raw
little-endian bytes (int32 token ids, float32 log-probs). Nothing is ever pickled: a stream is
an input from the network, and :func:`decode` validates every field before anything uses it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
import numpy as np

from services.core.images import MAX_IMAGES_PER_MESSAGE, is_ref

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
    #: References (``sha256:<hex>``) of the images shown with the prompt, in order.
    images: tuple[str, ...] = ()

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
    #: The prompt's image references: the trainer runs the same pictures through the model.
    images: tuple[str, ...] = ()

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
            and self.images == other.images
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


def _check_rollouts(rollouts: tuple[Rollout, ...]) -> None:
    """The cheap structural checks a consumer would otherwise dead-letter the group for."""
    if not rollouts:
        raise SchemaError("scored_group: a group needs at least one rollout")
    for i, r in enumerate(rollouts):
        where = f"scored_group.rollouts[{i}]"
        if len(r.token_ids) != len(r.logprobs):
            raise SchemaError(
                f"{where}: {len(r.token_ids)} token ids but {len(r.logprobs)} log-probs; "
                "they must match"
            )
        if r.status not in ROLLOUT_STATUSES:
            raise SchemaError(f"{where}: unknown status '{r.status}'")
        if not math.isfinite(r.reward):
            raise SchemaError(f"{where}: field 'reward' must be finite, got {r.reward}")


def encode(msg: Message) -> bytes:
    """Serialise a message to its versioned msgpack form.

    Structural mistakes a consumer would reject (mismatched array lengths, unknown status,
    non-finite reward) raise here, on the producer's side; the full validation runs in
    :func:`decode`, where untrusted bytes arrive.
    """
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
        if msg.images:
            body["images"] = list(msg.images)
    elif isinstance(msg, ScoredGroup):
        _check_rollouts(msg.rollouts)
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
        if msg.images:
            body["images"] = list(msg.images)
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
    return _ENCODER.encode(body)


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


def _decode_arrays(
    raw_ids: list[bytes], raw_logprobs: list[bytes], where: str
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Validate the token ids and log-probs of all rollouts of a group in one numpy pass each.

    Per-rollout checks cost more than the whole decode of a typical group; joining the
    buffers keeps validation O(1) numpy calls per group. The arrays returned are views into
    one owned, writable copy.
    """
    for i, (ids, lps) in enumerate(zip(raw_ids, raw_logprobs, strict=True)):
        if len(ids) != len(lps):
            raise SchemaError(
                f"{where}.rollouts[{i}]: {len(ids) // 4} token ids but {len(lps) // 4} "
                "log-probs; they must match"
            )
    all_ids = np.frombuffer(b"".join(raw_ids), dtype="<i4").astype(np.int32)
    all_lps = np.frombuffer(b"".join(raw_logprobs), dtype="<f4").astype(np.float32)
    if all_ids.size and all_ids.min() < 0:
        raise SchemaError(f"{where}: negative token id")
    if all_lps.size and not (np.isfinite(all_lps).all() and all_lps.max() <= 1e-3):
        raise SchemaError(f"{where}: log-probs must be finite and <= 0")
    out = []
    start = 0
    for ids in raw_ids:
        end = start + len(ids) // 4
        out.append((all_ids[start:end], all_lps[start:end]))
        start = end
    return out


def _image_refs(value: Any, where: str) -> tuple[str, ...]:
    """A list of image references: at most MAX_IMAGES_PER_MESSAGE, each ``sha256:<hex>``."""
    if not isinstance(value, list):
        raise SchemaError(f"{where}: field 'images' must be a list, got {type(value).__name__}")
    if len(value) > MAX_IMAGES_PER_MESSAGE:
        raise SchemaError(
            f"{where}: {len(value)} images; a message may name at most {MAX_IMAGES_PER_MESSAGE}"
        )
    for i, ref in enumerate(value):
        if not isinstance(ref, str) or not is_ref(ref):
            raise SchemaError(f"{where}: images[{i}] is not an image reference (sha256:<hex>)")
    return tuple(value)


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
        images=_image_refs(d.get("images", []), w),
    )


class _WireRollout(msgspec.Struct, forbid_unknown_fields=True):
    text: str
    token_ids: bytes
    logprobs: bytes
    reward: float
    success: bool
    status: str
    terms: dict[str, float]
    finish_reason: str


class _WireScoredGroup(msgspec.Struct, forbid_unknown_fields=True):
    kind: str
    v: int
    group_id: str
    prompt: str
    prompt_token_ids: bytes
    answer: str
    task: str
    policy_version: int
    replica: str
    rollouts: list[_WireRollout]
    created_at: float
    images: list[str] = []


_GROUP_DECODER = msgspec.msgpack.Decoder(_WireScoredGroup)
_MISSING = re.compile(r"Object missing required field `(\w+)`(?: - at `\$(.*)`)?")
_AT = re.compile(r"^(.*) - at `\$(.*)`$")


def _validation_message(where: str, exc: msgspec.ValidationError) -> str:
    """msgspec's message in this module's form: ``scored_group.rollouts[1]: ...``."""
    text = str(exc)
    if m := _MISSING.fullmatch(text):
        return f"{where}{m.group(2) or ''}: missing field '{m.group(1)}'"
    if m := _AT.fullmatch(text):
        return f"{where}{m.group(2)}: {m.group(1)}"
    return f"{where}: {text}"


def _decode_scored_group(data: bytes) -> ScoredGroup:
    """Scored groups are the bulk of the traffic: field types are checked in C by msgspec,
    arrays of all rollouts in one numpy pass, the rest in a short Python loop."""
    w = "scored_group"
    try:
        g = _GROUP_DECODER.decode(data)
    except msgspec.ValidationError as exc:
        raise SchemaError(_validation_message(w, exc)) from None
    if not g.group_id:
        raise SchemaError(f"{w}: group_id must not be empty")
    if not g.rollouts:
        raise SchemaError(f"{w}: a group needs at least one rollout")
    if g.policy_version < 0:
        raise SchemaError(f"{w}: field 'policy_version' must be >= 0, got {g.policy_version}")
    if not math.isfinite(g.created_at):
        raise SchemaError(f"{w}: field 'created_at' must be finite, got {g.created_at}")
    for name, raw in [("prompt_token_ids", g.prompt_token_ids)] + [
        (f"rollouts[{i}].{k}", b)
        for i, r in enumerate(g.rollouts)
        for k, b in (("token_ids", r.token_ids), ("logprobs", r.logprobs))
    ]:
        if len(raw) % 4:
            raise SchemaError(f"{w}: field '{name}' has {len(raw)} bytes, not a multiple of 4")
    arrays = _decode_arrays([r.token_ids for r in g.rollouts], [r.logprobs for r in g.rollouts], w)
    rollouts = []
    for i, (r, (ids, lps)) in enumerate(zip(g.rollouts, arrays, strict=True)):
        where = f"{w}.rollouts[{i}]"
        if r.status not in ROLLOUT_STATUSES:
            raise SchemaError(f"{where}: unknown status '{r.status}'")
        if not math.isfinite(r.reward):
            raise SchemaError(f"{where}: field 'reward' must be finite, got {r.reward}")
        if not all(math.isfinite(v) for v in r.terms.values()):
            raise SchemaError(f"{where}: reward terms must be finite")
        rollouts.append(
            Rollout(
                text=r.text,
                token_ids=ids,
                logprobs=lps,
                reward=r.reward,
                success=r.success,
                status=r.status,
                terms=r.terms,
                finish_reason=r.finish_reason,
            )
        )
    images = _image_refs(g.images, w)
    prompt_ids = np.frombuffer(g.prompt_token_ids, dtype="<i4").astype(np.int32)
    if prompt_ids.size and prompt_ids.min() < 0:
        raise SchemaError(f"{w}: negative prompt token id")
    return ScoredGroup(
        group_id=g.group_id,
        prompt=g.prompt,
        prompt_token_ids=prompt_ids,
        answer=g.answer,
        task=g.task,
        policy_version=g.policy_version,
        replica=g.replica,
        rollouts=tuple(rollouts),
        created_at=g.created_at,
        images=images,
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


_MAP_DECODERS: Final[dict[str, Callable[[dict[str, Any]], Message]]] = {
    KIND_PROMPT: _decode_prompt,
    KIND_WEIGHTS: _decode_weights,
}
_KINDS: Final = frozenset({KIND_PROMPT, KIND_SCORED_GROUP, KIND_WEIGHTS})


class _Header(msgspec.Struct):
    """Only the envelope: read first, so version and kind errors say so plainly."""

    kind: Any = None
    v: Any = None


_HEADER_DECODER = msgspec.msgpack.Decoder(_Header)
_ENCODER = msgspec.msgpack.Encoder()


def decode(data: bytes, expect: str | None = None) -> Message:
    """Parse and validate a payload; raise :class:`SchemaError` saying what is wrong.

    ``expect`` names the kind the caller reads from this stream; anything else is rejected.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise SchemaError(f"payload must be bytes, got {type(data).__name__}")
    if len(data) > MAX_PAYLOAD_BYTES:
        raise SchemaError(f"payload of {len(data)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    data = bytes(data)
    try:
        header = _HEADER_DECODER.decode(data)
    except msgspec.ValidationError:
        raise SchemaError("payload must be a msgpack map") from None
    except msgspec.DecodeError as exc:
        raise SchemaError(f"not a msgpack payload: {exc}") from None
    if header.v != SCHEMA_VERSION or isinstance(header.v, bool):
        raise SchemaError(
            f"unsupported schema version {header.v!r} (this build reads {SCHEMA_VERSION})"
        )
    kind = header.kind
    if kind not in _KINDS:
        raise SchemaError(f"unknown message kind {kind!r}")
    if expect is not None and kind != expect:
        raise SchemaError(f"expected a '{expect}' message, got '{kind}'")
    if kind == KIND_SCORED_GROUP:
        return _decode_scored_group(data)
    body = msgspec.msgpack.decode(data)
    if not all(isinstance(k, str) for k in body):
        raise SchemaError("payload map keys must be strings")
    return _MAP_DECODERS[kind](body)
