"""Request checks: bad input becomes one clear INVALID_ARGUMENT message, never a crash.

Everything a caller can get wrong is checked here, before any work is queued: the task name,
the group size, completion sizes, UTF-8, the reference answers, labels and the deadline.
Messages name the field, the offending item and the limit, so the fix is obvious.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from services.core.config import RewardConfig
from services.reward.registry import Task


class InvalidRequest(ValueError):
    """A request the server refuses; the message is sent back as the gRPC status details."""


@dataclass(frozen=True)
class ScoreJob:
    """A checked request: decoded text and the effective per-verification deadline."""

    task: Task
    completions: list[str]
    answers: list[str]
    labels: list[str]
    timeout_s: float


def _shown(name: str, limit: int = 80) -> str:
    """A caller's name as it goes back in a message: quoted, escaped, and cut at ``limit``
    characters (status details travel in a header, which has a size limit of its own)."""
    if len(name) <= limit:
        return repr(name)
    return f"{name[:limit]!r}... ({len(name)} characters)"


def _decode(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(
            f"{what} is not valid UTF-8 (byte {exc.start}: {exc.reason}); "
            "send text encoded as UTF-8"
        ) from None


def _texts(
    items: Sequence[bytes], field: str, *, limit: int, max_bytes: int, singular: bool = False
) -> list[str]:
    if len(items) > limit:
        raise InvalidRequest(
            f"{len(items)} {field} is more than reward.max_group={limit}; "
            "split the request or raise reward.max_group"
        )
    out = []
    for i, raw in enumerate(items):
        what = field.rstrip("s") if singular else f"{field.rstrip('s')} {i}"
        if len(raw) > max_bytes:
            raise InvalidRequest(
                f"{what} is {len(raw)} bytes, more than "
                f"reward.max_completion_bytes={max_bytes}; truncate it or raise the limit"
            )
        out.append(_decode(raw, what))
    return out


def check_request(
    task_name: str,
    completions: Sequence[bytes],
    answers: Sequence[bytes],
    labels: Sequence[bytes],
    timeout_s: float,
    *,
    tasks: Mapping[str, Task],
    config: RewardConfig,
    single: bool = False,
) -> ScoreJob:
    """Decode and check one Score/ScoreBatch request; InvalidRequest says what is wrong."""
    known = ", ".join(sorted(tasks))
    if not task_name.strip():
        raise InvalidRequest(f"task is empty; known tasks: {known}")
    task = tasks.get(task_name)
    if task is None:
        raise InvalidRequest(f"unknown task {_shown(task_name)}; known tasks: {known}")
    if not completions:
        raise InvalidRequest("completions is empty: send the group's completions (at least one)")
    limit, max_bytes = config.max_group, config.max_completion_bytes
    completion_texts = _texts(
        completions, "completions", limit=limit, max_bytes=max_bytes, singular=single
    )
    if not answers:
        raise InvalidRequest("answers is empty: send at least one reference answer")
    answer_texts = _texts(answers, "answers", limit=limit, max_bytes=max_bytes)
    if not any(a.strip() for a in answer_texts):
        raise InvalidRequest("every reference answer is blank: send at least one non-blank one")
    label_texts = _texts(labels, "labels", limit=limit, max_bytes=max_bytes)
    if label_texts and not task.takes_labels:
        takers = ", ".join(sorted(n for n, t in tasks.items() if t.takes_labels)) or "none"
        raise InvalidRequest(
            f"task '{task.name}' takes no labels; labels are for label-choice tasks ({takers})"
        )
    if not math.isfinite(timeout_s) or timeout_s < 0:
        raise InvalidRequest(
            f"timeout_s={timeout_s} is not a deadline: send seconds > 0, or 0 for the "
            f"server's reward.timeout_s={config.timeout_s:g}"
        )
    effective = config.timeout_s if timeout_s == 0 else min(timeout_s, config.timeout_s)
    return ScoreJob(task, completion_texts, answer_texts, label_texts, effective)
