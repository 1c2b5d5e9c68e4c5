"""Two-digit addition and subtraction: ``"ab+cd="`` -> ``"efg"``, checked by exact match.

Small enough for a 4M-parameter model to learn on two CPU cores, hard enough that a short
supervised warm start leaves groups of mixed outcomes (where RL and MAPO's certainty weighting
have something to do). Every operand pair in 10..99 with both operators: 16,200 problems, of
which a fixed-seed 1,000 are held out.

The out-of-domain split is the same skill on numbers no training problem has: one operand (or
both) of a single digit, ``"7+45="``, ``"45-7="``. A fixed sample of 1,000, the same for every
seed (it is never trained on, so no seed needs its own).
"""

from __future__ import annotations

import random

from services.core.tasks import BuiltinTask, Example, register_builtin

NAME = "arithmetic"
HELD_OUT = 1000
OOD_PROBLEMS = 1000
#: Seed of the out-of-domain sample: fixed, so that every run is scored on the same problems.
OOD_SEED = 18


def problem(a: int, op: str, b: int) -> Example:
    value = a + b if op == "+" else a - b
    return Example(id=f"{a}{op}{b}", prompt=f"{a}{op}{b}=", answer=str(value), task=NAME)


def out_of_domain() -> tuple[Example, ...]:
    """Problems with a one-digit operand (0..9), which the 10..99 training pool never holds."""
    problems = [
        problem(a, op, b) for a in range(100) for b in range(100) for op in "+-" if a < 10 or b < 10
    ]
    random.Random(OOD_SEED).shuffle(problems)
    return tuple(problems[:OOD_PROBLEMS])


def build(seed: int = 0) -> BuiltinTask:
    """All problems, shuffled by ``seed``; the first HELD_OUT form the held-out split."""
    problems = [problem(a, op, b) for a in range(10, 100) for b in range(10, 100) for op in "+-"]
    random.Random(seed).shuffle(problems)
    return BuiltinTask(
        NAME, train=tuple(problems[HELD_OUT:]), eval=tuple(problems[:HELD_OUT]), ood=out_of_domain()
    )


register_builtin(NAME, build)
