"""Each verifier called directly: no server, no worker pool."""

from __future__ import annotations

import math

import pytest

from services.reward import verifiers as v
from services.reward.registry import (
    get_task,
    import_task_modules,
    normalize,
    register_task,
    task_names,
)
from services.reward.verifiers import EMOSET_LABELS, Status, VerifierResult

THINK = "<think>Half of one is one half.</think> "


# ----------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # the last box counts
        ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),  # nested braces
        ("\\boxed{2} and a broken \\boxed{3", "2"),  # an unclosed box is skipped
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),  # escaped braces are content
        ("\\fbox{7}", "7"),
        ("\\boxed {5}", "5"),
        ("no box here", None),
        ("\\boxed{", None),
    ],
)
def test_last_boxed(text: str, expected: str | None) -> None:
    assert v.last_boxed(text) == expected


def test_last_boxed_is_linear_on_many_unclosed_boxes() -> None:
    text = "\\boxed{" * 20_000 + "x"
    assert v.last_boxed(text) is None  # returns at once; a scan per box would take seconds


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("<think>reasoning</think> The answer is \\boxed{3}.", True),
        ("  <think>\nstep\n</think>\n\\boxed{3}", True),
        ("< think >spaced tags</ think > \\boxed{3}", True),  # tolerated, as in the paper's code
        ("<think></think>\\boxed{}", True),  # the paper's regex allows empty parts
        ("The answer is \\boxed{3}.", False),  # no think block
        ("<think>reasoning</think> The answer is 3.", False),  # no box
        ("<think>\\boxed{3}</think> so 3", False),  # boxed only inside the reasoning
        ("preamble <think>r</think> \\boxed{3}", False),  # must start with <think>
        ("<think>unclosed \\boxed{3}", False),
    ],
)
def test_format_check(text: str, ok: bool) -> None:
    assert v.format_ok(text) is ok
    assert v.format_reward(text) == (1.0 if ok else 0.0)


# ----------------------------------------------------------------------------- math


@pytest.mark.parametrize(
    ("prediction", "answer"),
    [
        ("\\frac{1}{2}", "0.5"),
        ("0.5", "\\frac{1}{2}"),
        ("1/2", "0.5"),
        ("\\dfrac{3}{4}", "0.75"),
        ("\\sqrt{12}", "2\\sqrt{3}"),
        ("2(x+1)", "2x+2"),
        ("(x+1)^2", "x^2+2x+1"),
        ("x = 3", "3"),
        ("\\frac{\\pi}{3}", "\\pi/3"),
        ("1,000", "1000"),
        ("\\{1, 2\\}", "\\{2, 1\\}"),
        ("50\\%", "0.5"),
    ],
)
def test_math_equivalences(prediction: str, answer: str) -> None:
    result = v.math_answer(f"\\boxed{{{prediction}}}", [answer])
    assert result == VerifierResult(1.0, {"accuracy": 1.0})


@pytest.mark.parametrize(
    ("prediction", "answer"),
    [("\\frac{1}{3}", "0.5"), ("2\\pi", "2"), ("x^2+1", "(x+1)^2"), ("-12", "12"), ("", "0")],
)
def test_math_non_equivalences(prediction: str, answer: str) -> None:
    result = v.math_answer(f"\\boxed{{{prediction}}}", [answer])
    assert result.status is Status.SCORED and result.reward == 0.0


def test_math_reward_is_the_papers_combination() -> None:
    answers = ["0.5"]
    assert v.math_reward(THINK + "\\boxed{\\frac{1}{2}}", answers).reward == 1.0
    assert v.math_reward("\\boxed{\\frac{1}{2}}", answers).reward == pytest.approx(0.9)
    assert v.math_reward(THINK + "\\boxed{3}", answers).reward == pytest.approx(0.1)
    assert v.math_reward("3", answers).reward == 0.0
    full = v.math_reward(THINK + "\\boxed{0.5}", answers)
    assert full.terms == {"format": 1.0, "accuracy": 1.0}
    assert v.math_reward("\\boxed{1/2}", answers).terms == {"format": 0.0, "accuracy": 1.0}


def test_math_without_a_boxed_answer_is_a_scored_zero() -> None:
    # The completion's fault: RL must see a 0, not a rollout left out of training.
    result = v.math_reward(THINK + "The answer is one half.", ["0.5"])
    assert result.status is Status.SCORED
    assert result.reward == 0.0 and result.terms == {"format": 0.0, "accuracy": 0.0}
    assert "boxed" in result.message


def test_math_any_of_several_answers() -> None:
    assert v.math_answer("\\boxed{4}", ["2", "-2"]).reward == 0.0
    assert v.math_answer("\\boxed{-2}", ["2", "-2"]).reward == 1.0


def test_math_unparseable_reference_cannot_be_scored() -> None:
    result = v.math_answer("\\boxed{1}", ["\\"])
    assert result.status is Status.CANNOT_SCORE and result.reward == 0.0
    assert v.math_reward(THINK + "\\boxed{1}", ["\\"]).status is Status.CANNOT_SCORE


def test_math_text_answer_matches_as_text() -> None:
    assert v.math_answer("\\boxed{\\text{(B)}}", ["\\text{(B)}"]).reward == 1.0


# ----------------------------------------------------------------------------- text


@pytest.mark.parametrize(
    ("completion", "reward"),
    [("46", 1.0), (" 46\n", 1.0), ("046", 0.0), ("46.0", 0.0), ("46 apples", 0.0), ("", 0.0)],
)
def test_arithmetic_is_exact(completion: str, reward: float) -> None:
    result = v.arithmetic(completion, ["46"])
    assert result == VerifierResult(reward, {"accuracy": reward})


def test_arithmetic_never_cannot_score() -> None:
    for completion in ["", "\\boxed{", "x" * 10_000, "\u0000", "-3"]:
        assert v.arithmetic(completion, ["-3"]).status is Status.SCORED


def test_exact_match() -> None:
    assert v.exact_match("  Paris ", ["London", "Paris"]).reward == 1.0
    assert v.exact_match("paris", ["Paris"]).reward == 0.0  # exact means exact
    assert v.exact_match("Paris.", ["Paris"]).terms == {"accuracy": 0.0}


# ----------------------------------------------------------------------------- labels


def test_label_choice_boxed_label() -> None:
    result = v.label_choice("<think>dark sky</think> \\boxed{\\text{Fear}}", ["fear"])
    assert result == VerifierResult(1.0, {"format": 1.0, "accuracy": 1.0})


def test_label_choice_last_label_mentioned() -> None:
    text = "<think>could be anger</think> Not anger; it is fear, I think."
    result = v.label_choice(text, ["fear"], EMOSET_LABELS)
    assert result.reward == pytest.approx(0.9)  # right label, but no box: format 0
    assert v.label_choice(text, ["anger"], EMOSET_LABELS).reward == 0.0


def test_label_choice_ignores_labels_inside_the_reasoning() -> None:
    text = "<think>fear? awe?</think> I cannot tell."
    result = v.label_choice(text, ["fear"], EMOSET_LABELS)
    assert result.reward == 0.0 and result.message


def test_label_choice_without_candidates_needs_a_box() -> None:
    # Searching for the gold label alone would credit any mention of it.
    assert v.label_choice("<think>x</think> not fear", ["fear"]).reward == 0.0


def test_label_choice_prefers_the_longest_label_at_the_same_end() -> None:
    labels = ["happy", "very happy"]
    assert v.pick_label("It is very happy", labels) == "very happy"


def test_label_choice_gold_outside_candidates_cannot_be_scored() -> None:
    result = v.label_choice("\\boxed{joy}", ["joy"], EMOSET_LABELS)
    assert result.status is Status.CANNOT_SCORE


def test_emotion_task_uses_emoset_labels() -> None:
    assert v.emotion("<think>wow</think> \\boxed{Awe}", ["awe"]).reward == 1.0
    assert v.emotion("<think>wow</think> plain awe", ["awe"]).reward == pytest.approx(0.9)


# ----------------------------------------------------------------------------- registry


def test_builtin_tasks_are_registered() -> None:
    assert {"math", "math_answer", "exact_match", "label_choice", "emotion", "arithmetic"} <= set(
        task_names()
    )
    assert get_task("label_choice").takes_labels
    assert not get_task("math").takes_labels


def test_unknown_task_error_lists_known_tasks() -> None:
    with pytest.raises(KeyError, match=r"known tasks: .*arithmetic"):
        get_task("nope")


def _yes(completion: str, answers: list[str]) -> float:
    return 1.0 if "yes" in completion else 0.0


def test_register_user_task() -> None:
    task = register_task("test_yes", _yes, max_reward=1.0, replace=True)
    assert task("yes please", ["x"]) == VerifierResult(1.0)
    assert task.success(Status.SCORED, 1.0)
    with pytest.raises(ValueError, match="already registered"):
        register_task("test_yes", _yes)
    with pytest.raises(ValueError, match="max_reward"):
        register_task("test_bad", _yes, max_reward=0.0)


@pytest.mark.parametrize(
    ("value", "status", "reward"),
    [
        (None, Status.CANNOT_SCORE, 0.0),
        (True, Status.SCORED, 1.0),
        (0.25, Status.SCORED, 0.25),
        (math.nan, Status.CANNOT_SCORE, 0.0),
        (math.inf, Status.CANNOT_SCORE, 0.0),
        ("1.0", Status.CANNOT_SCORE, 0.0),
        (VerifierResult(0.5, {"a": math.nan}), Status.CANNOT_SCORE, 0.0),
        (VerifierResult(0.7, {}, Status.TIMED_OUT), Status.TIMED_OUT, 0.0),
    ],
)
def test_normalize_reward_function_output(value: object, status: Status, reward: float) -> None:
    result = normalize(value, "t")
    assert result.status is status and result.reward == reward


def test_success_is_reaching_the_maximum() -> None:
    task = get_task("math")
    assert task.success(Status.SCORED, 1.0)
    assert not task.success(Status.SCORED, 0.9)
    assert not task.success(Status.TIMED_OUT, 1.0)


def test_task_module_that_cannot_be_imported_names_the_setting() -> None:
    with pytest.raises(ImportError, match=r"reward.task_modules"):
        import_task_modules(["no_such_module_for_tasks"])
