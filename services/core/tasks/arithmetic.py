"""Two-digit addition and subtraction: ``"ab+cd="`` -> ``"efg"``, checked by exact match.

Small enough for a 4M-parameter model to learn on two CPU cores, hard enough that a short
supervised warm start leaves groups of mixed outcomes (where RL and MAPO's certainty weighting
have something to do). Every operand pair in 10..99 with both operators: 16,200 problems, of
which a fixed-seed 1,000 are held out.
"""

from __future__ import annotations

import random

from services.core.tasks import BuiltinTask, Example, register_builtin

NAME = "arithmetic"
HELD_OUT = 1000


def problem(a: int, op: str, b: int) -> Example:
    value = a + b if op == "+" else a - b
    return Example(id=f"{a}{op}{b}", prompt=f"{a}{op}{b}=", answer=str(value), task=NAME)


def build(seed: int = 0) -> BuiltinTask:
    """All problems, shuffled by ``seed``; the first HELD_OUT form the held-out split."""
    problems = [problem(a, op, b) for a in range(10, 100) for b in range(10, 100) for op in "+-"]
    random.Random(seed).shuffle(problems)
    return BuiltinTask(NAME, train=tuple(problems[HELD_OUT:]), eval=tuple(problems[:HELD_OUT]))


register_builtin(NAME, build)
