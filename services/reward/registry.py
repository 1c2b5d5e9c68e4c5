"""Task registry: task names to reward functions, built-ins plus the user's own.

A reward function is pure: ``fn(completion: str, answers: Sequence[str]) -> VerifierResult``;
a plain number means a scored reward with no breakdown, and None means "cannot score" (as in
TRL). A function that declares a ``labels`` parameter also receives the request's candidate
labels. Register with :func:`register_task`, from a module listed in ``reward.task_modules``
(imported at start) or before :func:`services.reward.server.create_server` is called:

    from services.reward.registry import register_task

    def contains_yes(completion, answers):
        return 1.0 if "yes" in completion.lower() else 0.0

    register_task("yes", contains_yes)

Functions run in worker processes and reach them pickled by reference, so they must be
importable module-level functions (not lambdas or closures). A function that calls
math-verify with its default (signal-based) timeouts replaces the worker's own deadline alarm
for that call; the supervisor still kills a worker that overruns, so it only costs a restart.
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from services.reward import verifiers
from services.reward.verifiers import Status, VerifierResult

RewardFn = Callable[..., VerifierResult | float | None]

SUCCESS_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Task:
    """A named reward: its function, its maximum reward (success means reaching it)."""

    name: str
    reward_fn: RewardFn
    max_reward: float = 1.0
    description: str = ""
    takes_labels: bool = False

    def __call__(
        self, completion: str, answers: Sequence[str], labels: Sequence[str] = ()
    ) -> VerifierResult:
        """Run the reward function and turn whatever it returns into a VerifierResult."""
        if self.takes_labels:
            out = self.reward_fn(completion, answers, labels=labels)
        else:
            out = self.reward_fn(completion, answers)
        return normalize(out, self.name)

    def success(self, status: Status, reward: float) -> bool:
        """Full success: scored and at the task's maximum (the paper's rule, r >= max)."""
        return status is Status.SCORED and reward >= self.max_reward - SUCCESS_TOLERANCE


def normalize(out: Any, task: str) -> VerifierResult:
    """A reward function's return value as a VerifierResult; odd values cannot be scored."""
    if out is None:
        return VerifierResult.cannot_score(f"the reward function of '{task}' returned None")
    if isinstance(out, VerifierResult):
        result = out
    elif isinstance(out, numbers.Real):
        result = VerifierResult(float(out))
    else:
        return VerifierResult.cannot_score(
            f"the reward function of '{task}' returned {type(out).__name__}, "
            "expected VerifierResult, a number or None"
        )
    values = [result.reward, *result.terms.values()]
    if not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in values):
        return VerifierResult.cannot_score(
            f"the reward function of '{task}' returned a non-finite or non-numeric value"
        )
    if result.status is not Status.SCORED:
        return VerifierResult(0.0, {}, result.status, result.message)
    return VerifierResult(
        float(result.reward),
        {str(k): float(v) for k, v in result.terms.items()},
        Status.SCORED,
        result.message,
    )


_TASKS: dict[str, Task] = {}


def register_task(
    name: str,
    reward_fn: RewardFn,
    max_reward: float = 1.0,
    *,
    description: str = "",
    replace: bool = False,
) -> Task:
    """Make ``reward_fn`` available as task ``name``; ``replace=True`` to redefine one."""
    if not name or not name.strip():
        raise ValueError("a task name must not be empty")
    if not callable(reward_fn):
        raise TypeError(f"the reward function of task '{name}' is not callable")
    if not (math.isfinite(max_reward) and max_reward > 0):
        raise ValueError(f"max_reward of task '{name}' must be a positive number")
    if name in _TASKS and not replace:
        raise ValueError(f"task '{name}' is already registered; pass replace=True to redefine it")
    try:
        takes_labels = "labels" in inspect.signature(reward_fn).parameters
    except (TypeError, ValueError):  # builtins without a signature
        takes_labels = False
    doc = description or (inspect.getdoc(reward_fn) or "").split("\n", 1)[0]
    task = Task(name, reward_fn, float(max_reward), doc, takes_labels)
    _TASKS[name] = task
    return task


def get_task(name: str) -> Task:
    """The task called ``name``; the error lists the known ones."""
    try:
        return _TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task '{name}'; known tasks: {', '.join(task_names())}") from None


def task_names() -> list[str]:
    return sorted(_TASKS)


def registered_tasks() -> dict[str, Task]:
    """A snapshot of the registry: what a worker pool started now will serve."""
    return dict(_TASKS)


def import_task_modules(modules: Sequence[str]) -> None:
    """Import user modules that call :func:`register_task` (``reward.task_modules``)."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ImportError(
                f"cannot import task module '{module}' (reward.task_modules): {exc}"
            ) from exc


register_task(
    "math",
    verifiers.math_reward,
    description="0.1 x format (<think>...</think> then \\boxed{}) + 0.9 x math-verify accuracy",
)
register_task(
    "math_answer",
    verifiers.math_answer,
    description="math-verify accuracy of the last \\boxed{} answer",
)
register_task(
    "exact_match",
    verifiers.exact_match,
    description="1 when the stripped completion equals a reference answer",
)
register_task(
    "label_choice",
    verifiers.label_choice,
    description="0.1 x format + 0.9 x (the boxed or last-mentioned label is a gold label)",
)
register_task(
    "emotion",
    verifiers.emotion,
    description="label choice among the eight EmoSet emotions (the paper's emotion task)",
)
register_task(
    "arithmetic",
    verifiers.arithmetic,
    description="the built-in demo task: 1 iff the stripped completion is the reference integer",
)
register_task(
    "shapes",
    verifiers.shapes,
    description="the built-in vision task: 1 iff the stripped completion is the reference "
    "colour or count, ignoring case",
)
