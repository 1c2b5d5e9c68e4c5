"""The gRPC servicer: converts messages, nothing more. Verifying is the pool's job.

Each call is checked (:mod:`services.reward.validation`), handed to the verifier pool, and
converted back; metrics are recorded per request and per completion. When the caller set a
gRPC deadline, the pool is told to answer a little before it, so the caller gets every
completion's result (some "timed out") instead of DEADLINE_EXCEEDED and nothing.

Every refusal is a deliberate status: INVALID_ARGUMENT for a request that is wrong (bytes that
do not parse as the request message included: :func:`add_to_server` parses them itself, where
grpc would answer UNKNOWN), RESOURCE_EXHAUSTED when the verifier queue is full (retry later),
UNAVAILABLE while shutting down. INTERNAL means a bug, with the details in the server log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from services.core.config import RewardConfig
from services.reward import metrics
from services.reward.pool import Outcome, PoolBusy, PoolClosed, VerifierPool
from services.reward.registry import Task
from services.reward.rpc import reward_pb2, reward_pb2_grpc
from services.reward.validation import InvalidRequest, check_request
from services.reward.verifiers import Status

log = logging.getLogger(__name__)

SERVICE = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name

T = TypeVar("T")
M = TypeVar("M", bound=Message)

STATUS_TO_PB = {
    Status.SCORED: reward_pb2.SCORE_STATUS_SCORED,
    Status.CANNOT_SCORE: reward_pb2.SCORE_STATUS_CANNOT_SCORE,
    Status.TIMED_OUT: reward_pb2.SCORE_STATUS_TIMED_OUT,
}


@dataclass(frozen=True)
class Malformed:
    """What the deserializer hands the servicer for bytes that are not the request message."""

    message_type: str
    error: str


def safe_parser(message_type: type[M]) -> Callable[[bytes], M | Malformed]:
    """``message_type.FromString`` that returns :class:`Malformed` instead of raising.

    Raising in a deserializer makes grpc answer UNKNOWN with its own text; this way the
    servicer answers INVALID_ARGUMENT and says what is wrong.
    """
    name = message_type.DESCRIPTOR.name

    def parse(raw: bytes) -> M | Malformed:
        try:
            return message_type.FromString(raw)
        except (DecodeError, ValueError, RuntimeError) as exc:
            return Malformed(name, str(exc)[:200] or type(exc).__name__)

    return parse


def add_to_server(servicer: RewardServicer, server: grpc.aio.Server) -> None:
    """Register ``servicer`` like the generated ``add_RewardServiceServicer_to_server``, with
    request parsing that cannot fail (:func:`safe_parser`)."""
    pb = reward_pb2
    handlers = {
        "Score": grpc.unary_unary_rpc_method_handler(
            servicer.Score,
            request_deserializer=safe_parser(pb.ScoreRequest),
            response_serializer=pb.ScoreResponse.SerializeToString,
        ),
        "ScoreBatch": grpc.unary_unary_rpc_method_handler(
            servicer.ScoreBatch,
            request_deserializer=safe_parser(pb.ScoreBatchRequest),
            response_serializer=pb.ScoreBatchResponse.SerializeToString,
        ),
        "ListTasks": grpc.unary_unary_rpc_method_handler(
            servicer.ListTasks,
            request_deserializer=safe_parser(pb.ListTasksRequest),
            response_serializer=pb.ListTasksResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


def _parsed(request: M | Malformed) -> M:
    if isinstance(request, Malformed):
        raise InvalidRequest(
            f"the request is not a valid {request.message_type} message ({request.error}); "
            "send one serialized from proto/reward.proto"
        )
    return request


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
        self,
        request: reward_pb2.ScoreRequest | Malformed,
        context: grpc.aio.ServicerContext,
    ) -> reward_pb2.ScoreResponse:
        async def work() -> reward_pb2.ScoreResponse:
            req = _parsed(request)
            scores = await self._score(
                context,
                req.task,
                [req.completion],
                req.answers,
                req.labels,
                req.timeout_s,
                single=True,
            )
            return reward_pb2.ScoreResponse(score=scores[0])

        return await self._handle("Score", context, work)

    async def ScoreBatch(
        self,
        request: reward_pb2.ScoreBatchRequest | Malformed,
        context: grpc.aio.ServicerContext,
    ) -> reward_pb2.ScoreBatchResponse:
        async def work() -> reward_pb2.ScoreBatchResponse:
            req = _parsed(request)
            scores = await self._score(
                context,
                req.task,
                req.completions,
                req.answers,
                req.labels,
                req.timeout_s,
            )
            return reward_pb2.ScoreBatchResponse(scores=scores)

        return await self._handle("ScoreBatch", context, work)

    async def ListTasks(
        self,
        request: reward_pb2.ListTasksRequest | Malformed,
        context: grpc.aio.ServicerContext,
    ) -> reward_pb2.ListTasksResponse:
        async def work() -> reward_pb2.ListTasksResponse:
            _parsed(request)
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
        except PoolBusy as exc:
            code = grpc.StatusCode.RESOURCE_EXHAUSTED
            await context.abort(code, f"the reward service is busy: {exc}")
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
