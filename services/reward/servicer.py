"""The gRPC servicer: converts messages, nothing more. Verifying is the pool's job.

Each call is checked (:mod:`services.reward.validation`), handed to the verifier pool, and
converted back; metrics are recorded per request and per completion. When the caller set a
gRPC deadline, the pool is told to answer a little before it, so the caller gets every
completion's result (some "timed out") instead of DEADLINE_EXCEEDED and nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TypeVar

import grpc

from services.core.config import RewardConfig
from services.reward import metrics
from services.reward.pool import Outcome, PoolClosed, VerifierPool
from services.reward.registry import Task
from services.reward.rpc import reward_pb2, reward_pb2_grpc
from services.reward.validation import InvalidRequest, check_request
from services.reward.verifiers import Status

log = logging.getLogger(__name__)

T = TypeVar("T")

STATUS_TO_PB = {
    Status.SCORED: reward_pb2.SCORE_STATUS_SCORED,
    Status.CANNOT_SCORE: reward_pb2.SCORE_STATUS_CANNOT_SCORE,
    Status.TIMED_OUT: reward_pb2.SCORE_STATUS_TIMED_OUT,
}


def reply_margin(remaining_s: float) -> float:
    """How long before the caller's deadline the reply is sent (the trip back takes time)."""
    return max(0.02, min(0.5, 0.1 * remaining_s))


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    """``mapo.reward.v1.RewardService`` on a verifier pool."""

    def __init__(self, pool: VerifierPool, tasks: Mapping[str, Task], config: RewardConfig):
        self.pool = pool
        self.tasks = dict(tasks)
        self.config = config

    async def Score(
        self, request: reward_pb2.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> reward_pb2.ScoreResponse:
        async def work() -> reward_pb2.ScoreResponse:
            scores = await self._score(
                context,
                request.task,
                [request.completion],
                request.answers,
                request.labels,
                request.timeout_s,
                single=True,
            )
            return reward_pb2.ScoreResponse(score=scores[0])

        return await self._handle("Score", context, work)

    async def ScoreBatch(
        self, request: reward_pb2.ScoreBatchRequest, context: grpc.aio.ServicerContext
    ) -> reward_pb2.ScoreBatchResponse:
        async def work() -> reward_pb2.ScoreBatchResponse:
            scores = await self._score(
                context,
                request.task,
                request.completions,
                request.answers,
                request.labels,
                request.timeout_s,
            )
            return reward_pb2.ScoreBatchResponse(scores=scores)

        return await self._handle("ScoreBatch", context, work)

    async def ListTasks(
        self, request: reward_pb2.ListTasksRequest, context: grpc.aio.ServicerContext
    ) -> reward_pb2.ListTasksResponse:
        async def work() -> reward_pb2.ListTasksResponse:
            return reward_pb2.ListTasksResponse(
                tasks=[
                    reward_pb2.TaskInfo(
                        name=t.name, max_reward=t.max_reward, description=t.description
                    )
                    for _, t in sorted(self.tasks.items())
                ]
            )

        return await self._handle("ListTasks", context, work)

    # ------------------------------------------------------------------ helpers

    async def _score(
        self,
        context: grpc.aio.ServicerContext,
        task_name: str,
        completions: Sequence[bytes],
        answers: Sequence[bytes],
        labels: Sequence[bytes],
        timeout_s: float,
        *,
        single: bool = False,
    ) -> list[reward_pb2.CompletionScore]:
        job = check_request(
            task_name,
            completions,
            answers,
            labels,
            timeout_s,
            tasks=self.tasks,
            config=self.config,
            single=single,
        )
        deadline = None
        remaining = context.time_remaining()
        if remaining is not None:
            deadline = asyncio.get_running_loop().time() + remaining - reply_margin(remaining)
        outcomes = await self.pool.verify(
            job.task.name,
            job.completions,
            job.answers,
            job.labels,
            timeout_s=job.timeout_s,
            deadline=deadline,
        )
        return [self._to_pb(job.task, o) for o in outcomes]

    @staticmethod
    def _to_pb(task: Task, outcome: Outcome) -> reward_pb2.CompletionScore:
        metrics.observe_completion(task.name, outcome.status.value, outcome.reward)
        return reward_pb2.CompletionScore(
            reward=outcome.reward,
            success=task.success(outcome.status, outcome.reward),
            terms=outcome.terms,
            status=STATUS_TO_PB[outcome.status],
            message=outcome.message,
        )

    async def _handle(
        self, method: str, context: grpc.aio.ServicerContext, work: Callable[[], Awaitable[T]]
    ) -> T:
        """Run ``work``; map failures to gRPC codes; count the request whatever happens."""
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return await work()
        except InvalidRequest as exc:
            code = grpc.StatusCode.INVALID_ARGUMENT
            await context.abort(code, str(exc))
        except PoolClosed:
            code = grpc.StatusCode.UNAVAILABLE
            await context.abort(code, "the reward service is shutting down; retry")
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.exception("%s failed", method)
            await context.abort(code, f"internal error in {method}; the server log has details")
        finally:
            metrics.observe_request(method, code.name, time.perf_counter() - start)
        raise AssertionError("context.abort returned")  # pragma: no cover
