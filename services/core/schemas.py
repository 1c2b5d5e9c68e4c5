"""Wire schemas for the bus: prompts, scored groups and weight announcements.

Every payload is a msgpack map with ``kind`` (what it is) and ``v`` (schema version), so a
reader can tell a stale or foreign message from a corrupt one. Arrays travel as raw
little-endian bytes (int32 token ids, float32 log-probs). Nothing is ever pickled: a stream is
an input from the network, and :func:`decode` validates every field before anything uses it.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Annotated, Any, Final

import msgspec
import numpy as np

from services.core.images import MAX_IMAGES_PER_MESSAGE, is_ref

SCHEMA_VERSION: Final = 1
MAX_PAYLOAD_BYTES: Final = 64 << 20
#: Largest weights file a weight announcement may name (16 TiB); replicas cap lower
#: (``weights.max_version_bytes``).
MAX_WEIGHTS_BYTES: Final = 1 << 44

KIND_PROMPT: Final = "prompt"
KIND_SCORED_GROUP: Final = "scored_group"
KIND_WEIGHTS: Final = "weights"

ROLLOUT_STATUSES: Final = frozenset({"scored", "cannot_score", "timed_out", "error"})


class SchemaError(ValueError):
    """A payload that cannot be decoded or fails validation; the message says why."""


@dataclass(frozen=True)
class WireLimits:
    """Upper bounds on every field of every message kind; a payload past one is refused.

    The defaults admit whatever a valid run config can produce (the config's own field bounds),
    so they hold for any reader; ``transport.make_bus`` narrows some from the run config
    (``wire_limits``). docs/bus.md lists every bound and where it comes from.
    """

    #: A whole payload (one stream entry).
    max_payload_bytes: int = MAX_PAYLOAD_BYTES
    #: ``prompt_id`` and ``group_id``.
    max_id_chars: int = 512
    #: ``task``, ``replica``, ``status``, ``finish_reason`` and reward-term names.
    max_name_chars: int = 256
    #: Prompt text (prompts and scored groups).
    max_prompt_chars: int = 1 << 22
    #: Reference answers; the reward service refuses longer ones.
    max_answer_chars: int = 16 << 20
    #: The text of one rollout; the reward service refuses longer ones.
    max_completion_chars: int = 16 << 20
    #: A weight announcement's ``location`` (directory or URL).
    max_location_chars: int = 4096
    #: A prompt's ``group_size`` (vLLM's ``n``) and the rollouts of one scored group.
    max_group_size: int = 1024
    #: A prompt's ``max_tokens``.
    max_tokens: int = 131072
    #: Token ids (and log-probs) of a prompt or of one rollout.
    max_sequence_tokens: int = 131072
    #: Reward terms of one rollout.
    max_reward_terms: int = 64
    #: Image references of one message.
    max_images: int = MAX_IMAGES_PER_MESSAGE
    #: ``issued_version``, ``policy_version``, ``version`` and ``step``.
    max_version: int = (1 << 31) - 1
    #: A prompt's sampling temperature (vLLM refuses more than 2).
    max_temperature: float = 2.0
    #: Absolute value of a reward and of each reward term.
    max_abs_reward: float = 1e6
    #: ``created_at`` in unix seconds (about the year 2514).
    max_timestamp: float = float(1 << 34)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            kind = type(f.default)  # int bounds must stay ints: msgspec compares exactly
            if type(value) not in (kind, int) or not 0 < value < math.inf:
                raise ValueError(
                    f"WireLimits.{f.name} must be a finite {kind.__name__} > 0, got {value!r}"
                )


#: The limits ``decode`` applies when it is given none.
DEFAULT_LIMITS: Final = WireLimits()


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
    """A new policy version is in the weight store at ``location`` (directory or URL).

    ``file_bytes`` is the size of the version's weights file (0: not said), so a replica caps
    its download before it starts; ``signature`` the trainer's HMAC-SHA256 over every other
    field (64 hex digits; empty: unsigned), see :mod:`services.weights.trust`.
    """

    version: int
    location: str
    manifest_sha256: str
    step: int = 0
    created_at: float = 0.0
    file_bytes: int = 0
    signature: str = ""

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
        # Only when set, so an unsigned announcement reads as it always did.
        if msg.file_bytes:
            body["file_bytes"] = msg.file_bytes
        if msg.signature:
            body["signature"] = msg.signature
    else:
        raise SchemaError(f"cannot encode {type(msg).__name__}")
    body["kind"] = msg.kind
    body["v"] = SCHEMA_VERSION
    return _ENCODER.encode(body)


# ----------------------------------------------------------------------------- decoding
#
# Every field is decoded into a msgspec Struct whose types carry the bounds of a WireLimits
# (``Annotated[..., Meta(...)]``): msgspec checks each length and range in C as it reads, so
# an oversized list, string, byte array or map is refused before it is allocated, and a value
# whose type does not fit its place is refused without descending into it. What types cannot
# say (matching array lengths, token ids >= 0, log-probs <= 0, statuses, image references)
# is checked afterwards, without per-token Python loops.

_REF_CHARS: Final = len("sha256:") + 64
_HEX64: Final = re.compile(r"[0-9a-f]{64}")
_HEADER_VALUE_BYTES: Final = 64  # a kind or version larger than this is neither
_MAX_REASON_CHARS: Final = 600


def clip(text: str, limit: int = _MAX_REASON_CHARS) -> str:
    """``text`` cut to ``limit`` characters: a reason quotes hostile input, which can be huge."""
    return text if len(text) <= limit else f"{text[: limit - 15]}... ({len(text)} chars)"


class _Fields:
    """Annotated field types of one WireLimits, and what each must be, for error messages."""

    def __init__(self) -> None:
        self.said: dict[str, str] = {}

    def text(self, name: str, most: int, *, least: int = 0) -> Any:
        self.said[name] = (
            f"a string of {least} to {most} characters"
            if least
            else f"a string of at most {most} characters"
        )
        return Annotated[str, msgspec.Meta(min_length=least, max_length=most)]

    def integer(self, name: str, least: int, most: int) -> Any:
        self.said[name] = f"an integer in [{least}, {most}]"
        return Annotated[int, msgspec.Meta(ge=least, le=most)]

    def number(self, name: str, least: float, most: float, *, above: bool = False) -> Any:
        low = f"({least:g}" if above else f"[{least:g}"
        self.said[name] = f"finite and within {low}, {most:g}]"
        if above:
            return Annotated[float, msgspec.Meta(gt=least, le=most)]
        return Annotated[float, msgspec.Meta(ge=least, le=most)]

    def array(self, name: str, most_items: int, dtype: str) -> Any:
        self.said[name] = f"bytes of at most {most_items} {dtype} values ({4 * most_items} bytes)"
        return Annotated[bytes, msgspec.Meta(max_length=4 * most_items)]

    def items(self, name: str, item: Any, most: int, what: str) -> Any:
        self.said[name] = f"a list of at most {most} {what}"
        return Annotated[list[item], msgspec.Meta(max_length=most)]

    def terms(self, name: str, value: Any, most: int, most_chars: int) -> Any:
        self.said[name] = f"a map of at most {most} reward terms"
        self.said[f"{name}{{}}"] = f"a string of at most {most_chars} characters"
        self.said[f"{name}[]"] = self.said["reward"]
        key = Annotated[str, msgspec.Meta(max_length=most_chars)]
        return Annotated[dict[key, value], msgspec.Meta(max_length=most)]


@dataclass(frozen=True)
class _Decoders:
    prompt: msgspec.msgpack.Decoder[Any]
    group: msgspec.msgpack.Decoder[Any]
    weights: msgspec.msgpack.Decoder[Any]
    said: dict[str, str]


@functools.lru_cache(maxsize=16)
def _decoders(limits: WireLimits) -> _Decoders:
    """The typed decoders of every message kind under ``limits`` (built once per limits)."""
    L, f = limits, _Fields()
    envelope = [("kind", str), ("v", int)]
    shared = {
        "prompt": f.text("prompt", L.max_prompt_chars),
        "answer": f.text("answer", L.max_answer_chars),
        "task": f.text("task", L.max_name_chars),
        "created_at": f.number("created_at", 0.0, L.max_timestamp),
    }
    ref = Annotated[str, msgspec.Meta(max_length=_REF_CHARS)]
    f.said["images[]"] = "an image reference (sha256:<hex>)"
    images: tuple[str, Any, list[str]] = (
        "images",
        f.items("images", ref, L.max_images, "image references (sha256:<hex>)"),
        [],
    )
    prompt = msgspec.defstruct(
        "WirePrompt",
        [
            *envelope,
            ("prompt_id", f.text("prompt_id", L.max_id_chars, least=1)),
            ("prompt", shared["prompt"]),
            ("answer", shared["answer"]),
            ("task", shared["task"]),
            ("group_size", f.integer("group_size", 1, L.max_group_size)),
            ("temperature", f.number("temperature", 0.0, L.max_temperature)),
            ("top_p", f.number("top_p", 0.0, 1.0, above=True)),
            ("max_tokens", f.integer("max_tokens", 1, L.max_tokens)),
            ("issued_version", f.integer("issued_version", 0, L.max_version)),
            ("created_at", shared["created_at"]),
            images,
        ],
        forbid_unknown_fields=True,
    )
    reward = f.number("reward", -L.max_abs_reward, L.max_abs_reward)
    rollout = msgspec.defstruct(
        "WireRollout",
        [
            ("text", f.text("text", L.max_completion_chars)),
            ("token_ids", f.array("token_ids", L.max_sequence_tokens, "int32")),
            ("logprobs", f.array("logprobs", L.max_sequence_tokens, "float32")),
            ("reward", reward),
            ("success", bool),
            ("status", f.text("status", L.max_name_chars)),
            ("terms", f.terms("terms", reward, L.max_reward_terms, L.max_name_chars)),
            ("finish_reason", f.text("finish_reason", L.max_name_chars)),
        ],
        forbid_unknown_fields=True,
    )
    group = msgspec.defstruct(
        "WireScoredGroup",
        [
            *envelope,
            ("group_id", f.text("group_id", L.max_id_chars, least=1)),
            ("prompt", shared["prompt"]),
            ("prompt_token_ids", f.array("prompt_token_ids", L.max_sequence_tokens, "int32")),
            ("answer", shared["answer"]),
            ("task", shared["task"]),
            ("policy_version", f.integer("policy_version", 0, L.max_version)),
            ("replica", f.text("replica", L.max_name_chars)),
            ("rollouts", f.items("rollouts", rollout, L.max_group_size, "rollouts")),
            ("created_at", shared["created_at"]),
            images,
        ],
        forbid_unknown_fields=True,
    )
    weights = msgspec.defstruct(
        "WireWeights",
        [
            *envelope,
            ("version", f.integer("version", 0, L.max_version)),
            ("location", f.text("location", L.max_location_chars, least=1)),
            ("manifest_sha256", f.text("manifest_sha256", 64, least=64)),
            ("step", f.integer("step", 0, L.max_version)),
            ("created_at", shared["created_at"]),
            ("file_bytes", f.integer("file_bytes", 0, MAX_WEIGHTS_BYTES), 0),
            ("signature", f.text("signature", 64), ""),
        ],
        forbid_unknown_fields=True,
    )
    return _Decoders(
        prompt=msgspec.msgpack.Decoder(prompt),
        group=msgspec.msgpack.Decoder(group),
        weights=msgspec.msgpack.Decoder(weights),
        said=f.said,
    )


_ERROR = re.compile(r"(?P<what>.*?)(?: - at (?P<key>`key` in )?`\$(?P<path>[^`]*)`)?", re.S)
_LAST = re.compile(r"(?P<parent>.*?)(?:\.(?P<name>\w+)|(?P<index>\[(?:\d+|\.\.\.)\]))")
_FIELD = re.compile(r"Object (?P<how>missing required|contains unknown) field `(?P<name>.*)`", re.S)
_GOT = re.compile(r"Expected `[^`]*`, got `(?P<got>[^`]*)`")


def _validation_message(where: str, exc: msgspec.ValidationError, said: dict[str, str]) -> str:
    """msgspec's message in this module's form: ``scored_group.rollouts[1]: field ...``."""
    m = _ERROR.fullmatch(str(exc))
    assert m is not None  # the pattern matches any text
    what, path = m["what"], m["path"] or ""
    if field_error := _FIELD.fullmatch(what):
        how = "missing" if field_error["how"] == "missing required" else "unknown"
        return clip(f"{where}{path}: {how} field '{field_error['name']}'")
    got = _GOT.match(what)
    got_text = f", got {got['got']}" if got else ""
    last = _LAST.fullmatch(path)
    name = (last["name"] or "") if last else ""
    if m["key"]:
        if not path:
            return f"{where}: map keys must be strings{got_text}"
        must = said.get(f"{name}{{}}", "a string")
        return clip(f"{where}{path}: every key must be {must}{got_text}")
    if last is None:
        return clip(f"{where}: {what}")
    if last["index"]:  # an item of a list or a value of a map
        owner = _LAST.fullmatch(last["parent"])
        item = said.get(f"{owner['name'] if owner and owner['name'] else ''}[]")
        return clip(
            f"{where}{path}: must be {item}{got_text}" if item else f"{where}{path}: {what}"
        )
    if name not in said:
        return clip(f"{where}{path}: {what}")
    return clip(f"{where}{last['parent']}: field '{name}' must be {said[name]}{got_text}")


def _typed(
    decoder: msgspec.msgpack.Decoder[Any], data: bytes, where: str, said: dict[str, str]
) -> Any:
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise SchemaError(_validation_message(where, exc, said)) from None


def _decode_arrays(
    raw_ids: list[bytes], raw_logprobs: list[bytes], where: str
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Validate the token ids and log-probs of all rollouts of a group in one numpy pass each.

    Per-rollout checks cost more than the whole decode of a typical group; joining the
    buffers keeps validation O(1) numpy calls per group. The arrays returned are views into
    one owned, writable copy.
    """
    for i, (ids, lps) in enumerate(zip(raw_ids, raw_logprobs, strict=True)):
        if len(ids) % 4 or len(lps) % 4:
            raise SchemaError(
                f"{where}.rollouts[{i}]: token_ids and logprobs must be whole 4-byte values, "
                f"got {len(ids)} and {len(lps)} bytes"
            )
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


def _image_refs(value: list[str], where: str) -> tuple[str, ...]:
    """Image references, each ``sha256:<hex>`` (their number is bounded by the decoder)."""
    for i, ref in enumerate(value):
        if not is_ref(ref):
            raise SchemaError(f"{where}: images[{i}] is not an image reference (sha256:<hex>)")
    return tuple(value)


def _decode_prompt(data: bytes, d: _Decoders) -> PromptMessage:
    w = "prompt"
    p = _typed(d.prompt, data, w, d.said)
    return PromptMessage(
        prompt_id=p.prompt_id,
        prompt=p.prompt,
        answer=p.answer,
        task=p.task,
        group_size=p.group_size,
        temperature=p.temperature,
        top_p=p.top_p,
        max_tokens=p.max_tokens,
        issued_version=p.issued_version,
        created_at=p.created_at,
        images=_image_refs(p.images, w),
    )


def _decode_scored_group(data: bytes, d: _Decoders) -> ScoredGroup:
    """Scored groups are the bulk of the traffic: field types and bounds are checked in C by
    msgspec, arrays of all rollouts in one numpy pass, the rest in a short loop per rollout."""
    w = "scored_group"
    g = _typed(d.group, data, w, d.said)
    if not g.rollouts:
        raise SchemaError(f"{w}: a group needs at least one rollout")
    if len(g.prompt_token_ids) % 4:
        n = len(g.prompt_token_ids)
        raise SchemaError(f"{w}: field 'prompt_token_ids' has {n} bytes, not a multiple of 4")
    arrays = _decode_arrays([r.token_ids for r in g.rollouts], [r.logprobs for r in g.rollouts], w)
    rollouts = []
    for i, (r, (ids, lps)) in enumerate(zip(g.rollouts, arrays, strict=True)):
        if r.status not in ROLLOUT_STATUSES:
            raise SchemaError(clip(f"{w}.rollouts[{i}]: unknown status '{r.status}'"))
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


def _decode_weights(data: bytes, d: _Decoders) -> WeightAnnouncement:
    w = "weights"
    a = _typed(d.weights, data, w, d.said)
    if any(c not in "0123456789abcdef" for c in a.manifest_sha256):
        raise SchemaError(f"{w}: manifest_sha256 must be 64 lowercase hex digits")
    if a.signature and not _HEX64.fullmatch(a.signature):
        raise SchemaError(f"{w}: signature must be 64 lowercase hex digits (or absent)")
    return WeightAnnouncement(
        version=a.version,
        location=a.location,
        manifest_sha256=a.manifest_sha256,
        step=a.step,
        created_at=a.created_at,
        file_bytes=a.file_bytes,
        signature=a.signature,
    )


_DECODERS: Final[dict[str, Callable[[bytes, _Decoders], Message]]] = {
    KIND_PROMPT: _decode_prompt,
    KIND_SCORED_GROUP: _decode_scored_group,
    KIND_WEIGHTS: _decode_weights,
}


class _Header(msgspec.Struct):
    """Only the envelope, read first so version and kind errors say so plainly. Both stay
    undecoded (``Raw``) until their size is known to be small."""

    kind: msgspec.Raw = msgspec.Raw()
    v: msgspec.Raw = msgspec.Raw()


_HEADER_DECODER = msgspec.msgpack.Decoder(_Header)
_ENCODER = msgspec.msgpack.Encoder()
_NESTED_TOO_DEEP = "payload nests too deeply to decode (a message nests at most 4 levels)"


def _envelope_value(raw: msgspec.Raw) -> Any:
    """A kind or version as sent: None when absent, a short note when too large to be one."""
    if len(raw) == 0:
        return None
    if len(raw) > _HEADER_VALUE_BYTES:
        return f"<a value of {len(raw)} bytes>"
    return msgspec.msgpack.decode(raw)


def decode(data: bytes, expect: str | None = None, limits: WireLimits | None = None) -> Message:
    """Parse and validate a payload; raise :class:`SchemaError` saying what is wrong.

    ``expect`` names the kind the caller reads from this stream; anything else is rejected.
    ``limits`` bounds every field (default: :data:`DEFAULT_LIMITS`). Whatever the bytes, the
    outcome is a message or a SchemaError: any other failure of a decoder (nesting past the
    interpreter's recursion limit, memory, a bug) is turned into one, so a hostile payload is
    dead-lettered with a reason instead of failing every read of its stream.
    """
    try:
        return _decode(data, expect, limits or DEFAULT_LIMITS)
    except SchemaError:
        raise
    except RecursionError:
        raise SchemaError(_NESTED_TOO_DEEP) from None
    except msgspec.DecodeError as exc:
        raise SchemaError(clip(f"not a msgpack payload: {exc}")) from None
    except Exception as exc:
        raise SchemaError(clip(f"payload cannot be decoded: {type(exc).__name__}: {exc}")) from None


def _decode(data: bytes, expect: str | None, limits: WireLimits) -> Message:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise SchemaError(f"payload must be bytes, got {type(data).__name__}")
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    if size > limits.max_payload_bytes:
        raise SchemaError(f"payload of {size} bytes exceeds {limits.max_payload_bytes}")
    data = bytes(data)
    try:
        header = _HEADER_DECODER.decode(data)
    except msgspec.ValidationError as exc:
        if str(exc).startswith("Expected `object`"):
            raise SchemaError("payload must be a msgpack map") from None
        raise SchemaError(_validation_message("payload", exc, {})) from None
    except msgspec.DecodeError as exc:
        raise SchemaError(clip(f"not a msgpack payload: {exc}")) from None
    version = _envelope_value(header.v)
    if type(version) is not int or version != SCHEMA_VERSION:
        raise SchemaError(
            clip(f"unsupported schema version {version!r} (this build reads {SCHEMA_VERSION})")
        )
    kind = _envelope_value(header.kind)
    if not isinstance(kind, str) or kind not in _DECODERS:
        raise SchemaError(clip(f"unknown message kind {kind!r}"))
    if expect is not None and kind != expect:
        raise SchemaError(clip(f"expected a '{expect}' message, got '{kind}'"))
    return _DECODERS[kind](data, _decoders(limits))
