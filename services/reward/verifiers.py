"""Verifiers: pure functions from one completion and its reference answers to a reward.

Every verifier has the signature ``(completion: str, answers: Sequence[str]) -> VerifierResult``
(label-choice verifiers also take ``labels``). They do no I/O and keep no state besides caches,
so they are tested directly and run unchanged inside the worker processes that put them under
a deadline (:mod:`services.reward.pool`).

Scored or not: ``Status.SCORED`` means the verifier judged the completion, including judging it
wrong. A completion with no ``\\boxed{}`` answer, a wrong label or an unparseable expression is
the policy's fault and scores 0, so RL learns to avoid it. ``Status.CANNOT_SCORE`` is kept for
cases where the verifier cannot judge through no fault of the completion, such as a reference
answer that does not parse; the trainer leaves such rollouts out rather than penalise them.

The paper's reward (MAPO, arXiv 2509.18849, after EasyR1) is ``0.1 * format + 0.9 * accuracy``:
format is ``<think>...</think>`` followed by ``\\boxed{...}``, and accuracy is judged on the
last ``\\boxed{}`` of the completion whether or not the format holds, so rewards take the values
{0, 0.1, 0.9, 1} and only 1 counts as success.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache
from typing import Any

FORMAT_WEIGHT = 0.1
ACCURACY_WEIGHT = 0.9

# The eight EmoSet emotion categories, the paper's classification task.
EMOSET_LABELS: tuple[str, ...] = (
    "amusement",
    "anger",
    "awe",
    "contentment",
    "disgust",
    "excitement",
    "fear",
    "sadness",
)


class Status(StrEnum):
    """What became of one verification (the wire enum without its prefix)."""

    SCORED = "scored"
    CANNOT_SCORE = "cannot_score"
    TIMED_OUT = "timed_out"


@dataclass(frozen=True)
class VerifierResult:
    """A reward with its per-term breakdown; ``message`` says why when it is not plain."""

    reward: float
    terms: Mapping[str, float] = field(default_factory=dict)
    status: Status = Status.SCORED
    message: str = ""

    @classmethod
    def cannot_score(cls, message: str) -> VerifierResult:
        return cls(0.0, {}, Status.CANNOT_SCORE, message)

    @classmethod
    def timed_out(cls, message: str) -> VerifierResult:
        return cls(0.0, {}, Status.TIMED_OUT, message)


# ----------------------------------------------------------------------------- extraction

_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE = re.compile(r"(?<!\\)[{}]|\\[{}]")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) whose braces close; else None.

    Braces are matched in one left-to-right pass, so a completion full of unclosed boxes costs
    linear time instead of one scan to the end per box.
    """
    opens = [m.end() - 1 for m in _BOX.finditer(text)]
    if not opens:
        return None
    box_opens = set(opens)
    closes: dict[int, int] = {}
    stack: list[int] = []
    for m in _BRACE.finditer(text, opens[0]):
        token = m.group()
        if token in ("{", "\\{"):
            stack.append(m.start() if token == "{" else -1)
        elif stack:
            start = stack.pop()
            if start in box_opens:
                closes[start] = m.start()
    for start in reversed(opens):
        if start in closes:
            return text[start + 1 : closes[start]]
    return None


_TAG_SPACE = re.compile(r"\s*(<|>|/)\s*")
_THINK = re.compile(r"<think>.*</think>(.*)", re.DOTALL)


def format_ok(completion: str) -> bool:
    """The paper's format: ``<think>...</think>`` first, then a ``\\boxed{...}`` after it.

    Spaces around ``<``, ``>`` and ``/`` are ignored (``< think >``), as in the reference code;
    the box must come after the last ``</think>``, so an answer boxed inside the reasoning does
    not count.
    """
    text = _TAG_SPACE.sub(r"\1", completion.strip())
    match = _THINK.fullmatch(text)
    return match is not None and last_boxed(match.group(1)) is not None


def format_reward(completion: str) -> float:
    return 1.0 if format_ok(completion) else 0.0


def combined(format_score: float, accuracy: float) -> float:
    """The paper's reward: 0.1 x format + 0.9 x accuracy."""
    return FORMAT_WEIGHT * format_score + ACCURACY_WEIGHT * accuracy


# ----------------------------------------------------------------------------- math


def _as_latex(answer: str) -> str:
    """A reference answer as math-verify parses it best: inside ``$...$`` unless delimited.

    Bare text is ambiguous to math-verify's plain-expression extractor (``2\\pi`` reads as 2).
    """
    text = answer.strip()
    if "$" in text or "\\boxed" in text or "\\(" in text or "\\[" in text:
        return text
    return f"${text}$"


@lru_cache(maxsize=512)
def _parse_reference(answer: str) -> tuple[Any, ...]:
    """Parsed reference answer; cached because every completion of a group shares it."""
    from math_verify import parse

    return tuple(parse(_as_latex(answer), parsing_timeout=None))


def _plain(text: str) -> str:
    return " ".join(text.strip().strip("$").split())


def math_equal(prediction: str, answers: Sequence[str]) -> bool | None:
    """Whether a boxed ``prediction`` is mathematically equal to one of ``answers``.

    Uses math-verify (sympy): ``\\frac{1}{2}``, ``0.5`` and ``1/2`` are equal, so are
    ``2(x+1)`` and ``2x+2``. None when no reference answer parses and none matches as text:
    the verifier cannot judge. math-verify's own signal-based timeouts are off; the worker
    pool puts the whole verification under one deadline instead.
    """
    from math_verify import parse, verify

    golds = [(a, _parse_reference(a)) for a in answers if a.strip()]
    parsed_golds = [g for _, g in golds if g]
    if any(_plain(prediction) == _plain(a) for a, _ in golds):
        return True
    if not parsed_golds:
        return None
    predicted = parse("\\boxed{" + prediction + "}", parsing_timeout=None)
    if not predicted:
        return False
    return any(verify(list(gold), predicted, timeout_seconds=None) for gold in parsed_golds)


def math_answer(completion: str, answers: Sequence[str]) -> VerifierResult:
    """Accuracy only: the last ``\\boxed{}`` answer against the references (math-verify).

    No boxed answer scores 0 (the completion gave none); a reference that does not parse as
    math and does not match as text cannot be scored.
    """
    boxed = last_boxed(completion)
    if boxed is None:
        return VerifierResult(0.0, {"accuracy": 0.0}, message="no \\boxed{} answer")
    equal = math_equal(boxed, answers)
    if equal is None:
        return VerifierResult.cannot_score("no reference answer parses as math")
    accuracy = 1.0 if equal else 0.0
    return VerifierResult(accuracy, {"accuracy": accuracy})


def math_reward(completion: str, answers: Sequence[str]) -> VerifierResult:
    """The paper's math reward: 0.1 x format + 0.9 x math-verify accuracy of the boxed answer."""
    judged = math_answer(completion, answers)
    if judged.status is not Status.SCORED:
        return judged
    fmt = format_reward(completion)
    accuracy = judged.terms["accuracy"]
    return VerifierResult(
        combined(fmt, accuracy), {"format": fmt, "accuracy": accuracy}, message=judged.message
    )


# ----------------------------------------------------------------------------- text


def exact_match(completion: str, answers: Sequence[str]) -> VerifierResult:
    """1 when the completion, stripped of surrounding whitespace, equals a stripped answer."""
    text = completion.strip()
    accuracy = 1.0 if any(text == a.strip() for a in answers) else 0.0
    return VerifierResult(accuracy, {"accuracy": accuracy})


def arithmetic(completion: str, answers: Sequence[str]) -> VerifierResult:
    """The built-in demo task (``"12+34="`` -> ``"46"``): 1 iff the stripped completion is
    exactly the reference integer, else 0; never "cannot score".

    Exact on purpose: ``"046"``, ``"46.0"`` or ``"46 apples"`` are wrong, so the tiny policy
    learns to emit the answer and then end of text.
    """
    return exact_match(completion, answers)


def shapes(completion: str, answers: Sequence[str]) -> VerifierResult:
    """The built-in vision task (a picture, ``"How many shapes?"`` -> ``"2"``): 1 iff the
    stripped completion equals the reference colour name or digit, ignoring case, else 0.

    Case is ignored because ``"Red"`` names the colour as well as ``"red"`` does; anything
    more (``"red."``, ``"2 shapes"``) is wrong, so the tiny policy learns to stop.
    """
    return exact_match(completion.lower(), [a.lower() for a in answers])


_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}")
_LABEL_PUNCT = " \t\r\n.,;:!?\"'`*()[]{}$"


def normalize_label(text: str) -> str:
    """Case-folded label without LaTeX text wrappers, quotes, punctuation or extra spaces."""
    unwrapped = _TEXT_WRAPPER.sub(r"\1", text)
    return " ".join(unwrapped.strip(_LABEL_PUNCT).casefold().split())


@lru_cache(maxsize=256)
def _label_pattern(label: str) -> re.Pattern[str]:
    words = [re.escape(w) for w in label.split()]
    return re.compile(r"(?<!\w)" + r"\s+".join(words) + r"(?!\w)", re.IGNORECASE)


def pick_label(completion: str, labels: Sequence[str] = ()) -> str | None:
    """The label a completion chose: its last ``\\boxed{}``, else the last candidate label it
    mentions after its reasoning (``</think>``); None when it names none.

    Without candidate ``labels`` only a boxed answer counts: searching for the gold label
    alone would credit any completion that merely mentions it.
    """
    boxed = last_boxed(completion)
    if boxed is not None and normalize_label(boxed):
        return normalize_label(boxed)
    tail = completion.rsplit("</think>", 1)[-1]
    best: tuple[int, int, str] | None = None  # (end, length, label): latest, then longest
    for label in {normalize_label(lb) for lb in labels} - {""}:
        matches = list(_label_pattern(label).finditer(tail))
        if matches:
            last = matches[-1]
            key = (last.end(), last.end() - last.start(), label)
            if best is None or key > best:
                best = key
    return best[2] if best else None


def label_choice(
    completion: str, answers: Sequence[str], labels: Sequence[str] = ()
) -> VerifierResult:
    """Classification (e.g. emotions): 0.1 x format + 0.9 x (chosen label is a gold label).

    ``answers`` are the acceptable gold labels, ``labels`` the candidate set (optional). A gold
    label outside a given candidate set cannot be scored: the reference and the label set
    disagree.
    """
    golds = {normalize_label(a) for a in answers} - {""}
    candidates = {normalize_label(lb) for lb in labels} - {""}
    if candidates and not golds & candidates:
        return VerifierResult.cannot_score(
            f"no reference label ({', '.join(sorted(golds))}) is among the candidate labels"
        )
    chosen = pick_label(completion, labels)
    accuracy = 1.0 if chosen is not None and chosen in golds else 0.0
    fmt = format_reward(completion)
    message = "" if chosen is not None else "no label in \\boxed{} or in the answer"
    return VerifierResult(
        combined(fmt, accuracy), {"format": fmt, "accuracy": accuracy}, message=message
    )


def emotion(completion: str, answers: Sequence[str]) -> VerifierResult:
    """The paper's emotion task: label choice among the eight EmoSet categories."""
    return label_choice(completion, answers, EMOSET_LABELS)
