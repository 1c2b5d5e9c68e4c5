"""The supervised verifier pool: deadlines, killed and replaced workers, fairness.

The reward functions below are module-level so the worker processes can import them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import pytest

from services.reward.pool import VerifierPool
from services.reward.registry import Task
from services.reward.verifiers import Status

pytestmark = pytest.mark.integration

T = TypeVar("T")


def sleepy(completion: str, answers: Sequence[str]) -> float:
    """Sleeps ``completion`` seconds: interruptible, like sympy working in Python code."""
    time.sleep(float(completion))
    return 1.0


def stubborn(completion: str, answers: Sequence[str]) -> float:
    """Sleeps with the alarm blocked, like a verifier stuck inside C code."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    time.sleep(float(completion))
    return 1.0


def crash(completion: str, answers: Sequence[str]) -> float:
    os._exit(3)


def hog(completion: str, answers: Sequence[str]) -> float:
    return float(len(bytearray(1 << 31)))


def echo(completion: str, answers: Sequence[str]) -> float:
    return 1.0 if completion == answers[0] else 0.0


TASKS = {fn.__name__: Task(fn.__name__, fn) for fn in (sleepy, stubborn, crash, hog, echo)}


def run_with_pool(
    workers: int, body: Callable[[VerifierPool], Awaitable[T]], memory_mib: int = 0
) -> T:
    async def main() -> T:
        pool = VerifierPool(TASKS, workers, memory_mib=memory_mib)
        await pool.start()
        try:
            return await body(pool)
        finally:
            await pool.close()

    return asyncio.run(main())


async def timed(coro: Awaitable[T]) -> tuple[T, float]:
    start = time.perf_counter()
    result = await coro
    return result, time.perf_counter() - start


def test_soft_deadline_times_out_and_keeps_the_worker() -> None:
    async def body(pool: VerifierPool) -> None:
        pids = pool.pids
        [outcome], seconds = await timed(pool.verify("sleepy", ["30"], ["x"], timeout_s=0.5))
        assert outcome.status is Status.TIMED_OUT and outcome.reward == 0.0
        assert "0.5 s deadline" in outcome.message
        assert seconds < 2.0
        assert pool.pids == pids and pool.restarts == 0

    run_with_pool(1, body)


def test_worker_that_ignores_the_alarm_is_killed_and_replaced() -> None:
    async def body(pool: VerifierPool) -> None:
        [old_pid] = pool.pids
        [outcome], seconds = await timed(pool.verify("stubborn", ["60"], ["x"], timeout_s=0.5))
        assert outcome.status is Status.TIMED_OUT and "replaced" in outcome.message
        assert seconds < 0.5 + pool.kill_grace_s + 1.5
        [after] = await pool.verify("echo", ["a"], ["a"], timeout_s=5)
        with pytest.raises(ProcessLookupError):  # killed and reaped by then
            os.kill(old_pid, 0)
        assert after.status is Status.SCORED and after.reward == 1.0
        assert pool.restarts == 1 and pool.pids != [old_pid]

    run_with_pool(1, body)


def test_others_are_served_while_a_worker_is_stuck() -> None:
    async def body(pool: VerifierPool) -> None:
        stuck = asyncio.create_task(pool.verify("stubborn", ["60"], ["x"], timeout_s=1.5))
        await asyncio.sleep(0.2)
        outcomes, seconds = await timed(pool.verify("echo", ["a", "b", "a"], ["a"], timeout_s=5))
        assert [o.reward for o in outcomes] == [1.0, 0.0, 1.0]
        assert seconds < 1.0 and not stuck.done()
        [late] = await stuck
        assert late.status is Status.TIMED_OUT

    run_with_pool(2, body)


def test_crashed_worker_cannot_score_and_is_replaced() -> None:
    async def body(pool: VerifierPool) -> None:
        [outcome] = await pool.verify("crash", ["x"], ["x"], timeout_s=5)
        assert outcome.status is Status.CANNOT_SCORE and "exit code 3" in outcome.message
        [after] = await pool.verify("echo", ["a"], ["a"], timeout_s=5)
        assert after.reward == 1.0 and pool.restarts == 1

    run_with_pool(1, body)


def test_runaway_allocation_is_a_memory_error_not_an_oom_kill() -> None:
    async def body(pool: VerifierPool) -> None:
        pids = pool.pids
        [outcome] = await pool.verify("hog", ["x"], ["x"], timeout_s=5)
        assert outcome.status is Status.CANNOT_SCORE and "memory" in outcome.message
        assert pool.pids == pids  # the worker survived it

    run_with_pool(1, body, memory_mib=512)


def test_request_deadline_answers_unstarted_completions_as_timed_out() -> None:
    async def body(pool: VerifierPool) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 0.7
        call = pool.verify("sleepy", ["0.3"] * 6, ["x"], timeout_s=5, deadline=deadline)
        outcomes, seconds = await timed(call)
        statuses = [o.status for o in outcomes]
        assert statuses[:2] == [Status.SCORED, Status.SCORED]
        assert statuses[-1] is Status.TIMED_OUT
        assert seconds < 0.7 + 0.5

    run_with_pool(1, body)


def test_request_deadline_holds_even_when_every_worker_is_busy() -> None:
    async def body(pool: VerifierPool) -> None:
        stuck = asyncio.create_task(pool.verify("stubborn", ["60"], ["x"], timeout_s=1.5))
        await asyncio.sleep(0.2)
        deadline = asyncio.get_running_loop().time() + 0.4
        call = pool.verify("echo", ["a"], ["a"], timeout_s=5, deadline=deadline)
        [outcome], seconds = await timed(call)
        assert outcome.status is Status.TIMED_OUT and "deadline" in outcome.message
        assert seconds < 0.7
        await stuck

    run_with_pool(1, body)


def test_small_request_is_not_queued_behind_a_large_one() -> None:
    async def body(pool: VerifierPool) -> None:
        big = asyncio.create_task(pool.verify("sleepy", ["0.05"] * 40, ["x"], timeout_s=5))
        await asyncio.sleep(0.1)
        _, seconds = await timed(pool.verify("echo", ["a"], ["a"], timeout_s=5))
        assert seconds < 0.5 and not big.done()  # round-robin: one job of big, then ours
        assert all(o.status is Status.SCORED for o in await big)

    run_with_pool(1, body)


def test_cancelled_call_gives_its_queued_work_up() -> None:
    async def body(pool: VerifierPool) -> None:
        call = asyncio.create_task(pool.verify("sleepy", ["0.3"] * 20, ["x"], timeout_s=5))
        await asyncio.sleep(0.1)
        call.cancel()
        _, seconds = await timed(pool.verify("echo", ["a"], ["a"], timeout_s=5))
        assert seconds < 0.8  # only the verification already running finished first

    run_with_pool(1, body)


def test_pool_rejects_work_after_close() -> None:
    async def main() -> None:
        pool = VerifierPool(TASKS, 1)
        await pool.start()
        await pool.close()
        assert pool.pids == []
        from services.reward.pool import PoolClosed

        with pytest.raises(PoolClosed):
            await pool.verify("echo", ["a"], ["a"], timeout_s=1)

    asyncio.run(main())
