"""One verifier worker process: receives jobs on a pipe, runs each under a deadline, replies.

The deadline has two layers. Here, a SIGALRM timer interrupts a verification that is still
running Python code at its deadline (sympy simplifying an exponent tower, say) and the worker
answers "timed out" and stays alive. The supervisor (:mod:`services.reward.pool`) kills the
process outright when no answer comes shortly after the deadline, which covers code the alarm
cannot interrupt (a long computation inside C) and verifiers that reset the alarm.

An address-space limit (``reward.worker_memory_mib``) turns a runaway allocation into a
MemoryError scored as "cannot score" instead of the host's OOM killer taking the service down.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
from collections.abc import Mapping, Sequence
from multiprocessing.connection import Connection
from types import FrameType

from services.reward.registry import Task
from services.reward.verifiers import Status, VerifierResult

# (job id, task, completion, answers, labels, timeout in seconds)
Job = tuple[int, str, str, tuple[str, ...], tuple[str, ...], float]
# (job id, status, reward, terms, message)
Reply = tuple[int, str, float, dict[str, float], str]

MAX_MESSAGE_CHARS = 500

# One of each common answer shape: the first of each loads a different corner of sympy.
WARM_UP = (
    ("\\frac{1}{2}", "0.5"),
    ("\\sqrt{12}", "2\\sqrt{3}"),
    ("(x+1)^2", "x^2+2x+1"),
    ("\\pi/3", "\\frac{\\pi}{3}"),
    ("x = 5", "5"),
    ("\\{1, 2\\}", "\\{1,2\\}"),
    ("(1, 2]", "(1,2]"),
    ("10\\%", "0.1"),
    ("3.5", "\\frac{7}{2}"),
    ("\\frac{2\\pi}{3}", "\\frac{\\pi}{3}"),
    ("x^2+1", "x^2+2x+1"),
    ("\\frac{2}{7}", "\\frac{7}{2}"),
)


class DeadlineExceeded(BaseException):
    """Raised by the alarm; a BaseException so a verifier's ``except Exception`` cannot eat it."""


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise DeadlineExceeded


def _describe(exc: BaseException) -> str:
    try:
        text = f"{type(exc).__name__}: {exc}"
    except Exception:  # str() of an odd exception can fail; its type still says something
        text = type(exc).__name__
    return text[:MAX_MESSAGE_CHARS]


def run_job(
    task: Task | None,
    task_name: str,
    completion: str,
    answers: Sequence[str],
    labels: Sequence[str],
    timeout_s: float,
) -> VerifierResult:
    """Verify one completion under a ``timeout_s`` alarm; never raises for a verifier's fault."""
    if task is None:
        return VerifierResult.cannot_score(f"task '{task_name}' is not loaded in this worker")
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            return task(completion, answers, labels)
        except MemoryError:
            return VerifierResult.cannot_score(
                "verification ran out of memory (reward.worker_memory_mib)"
            )
        except Exception as exc:  # a buggy verifier must not take the worker down
            # Described while the alarm is still armed: str() of a huge sympy value can hang.
            return VerifierResult.cannot_score(
                f"the reward function of '{task_name}' failed: {_describe(exc)}"
            )
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except DeadlineExceeded:
        return VerifierResult.timed_out(f"verification exceeded its {timeout_s:g} s deadline")


def _limit_memory(memory_mib: int) -> None:
    if memory_mib <= 0:
        return
    limit = memory_mib << 20
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def warm_up() -> None:
    """Import math-verify and run one verification, so the first real one is not the slowest.

    Run once in the fork server (:mod:`services.reward.warm`): every worker forked from it
    starts warm, and replacing a killed worker takes milliseconds.
    """
    # math-verify warns that its own timeouts are off: expected, the alarm replaces them.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    from services.reward.verifiers import math_reward

    for prediction, reference in WARM_UP:
        math_reward(f"<think>x</think> \\boxed{{{prediction}}}", (reference,))


def main(conn: Connection, tasks: Mapping[str, Task], memory_mib: int) -> None:
    """Serve jobs until the supervisor sends None or goes away (end of file on the pipe)."""
    # Ctrl-C reaches the whole process group; the supervisor decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, _on_alarm)
    _limit_memory(memory_mib)
    warm_up()  # instant when forked from a warm fork server
    conn.send(("ready", os.getpid()))
    while True:
        try:
            job: Job | None = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        job_id, task_name, completion, answers, labels, timeout_s = job
        result = run_job(tasks.get(task_name), task_name, completion, answers, labels, timeout_s)
        reply: Reply = (
            job_id,
            result.status.value,
            result.reward if result.status is Status.SCORED else 0.0,
            dict(result.terms),
            result.message,
        )
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            return
