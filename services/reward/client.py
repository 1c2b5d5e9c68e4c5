"""Async client of the reward service, for the other services (inference's rollout worker).

Imports only grpc and the generated stubs, never the server, so a client process loads no
verifier code. Every call carries a deadline (``timeout_s``); the server answers before it, with
completions it had no time for marked "timed_out", so a call returns a result per completion
unless the service is unreachable.

    client = RewardClient("127.0.0.1:50051", timeout_s=30.0)
    await client.wait_ready(30.0)
    scores = await client.score_batch("math", completions, ["\\\\frac{1}{2}"])
    await client.close()
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.reward.rpc import reward_pb2, reward_pb2_grpc

SERVICE_NAME = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name

STATUS_NAMES = {
    reward_pb2.SCORE_STATUS_SCORED: "scored",
    reward_pb2.SCORE_STATUS_CANNOT_SCORE: "cannot_score",
    reward_pb2.SCORE_STATUS_TIMED_OUT: "timed_out",
}


@dataclass(frozen=True)
class ScoreResult:
    """The score of one completion; ``status`` is 'scored', 'cannot_score' or 'timed_out'."""

    reward: float
    success: bool
    terms: dict[str, float] = field(default_factory=dict)
    status: str = "scored"
    message: str = ""


class RewardError(RuntimeError):
    """A call the reward service did not answer with scores; ``code`` is the gRPC status."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class RewardUnavailable(RewardError):
    """The service could not be reached or did not answer in time: retrying may help."""


class RewardRequestError(RewardError, ValueError):
    """The service refused the request (INVALID_ARGUMENT, or RESOURCE_EXHAUSTED for a message
    over its size limit): retrying the same one will not help."""


# grpc's words for a message past grpc.max_receive_message_length (or the sender's own limit).
_TOO_LARGE = "larger than max"

_RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.CANCELLED,
}


def _utf8(text: str) -> bytes:
    # surrogatepass: a lone surrogate reaches the server, which names the bad completion,
    # instead of failing here with a less helpful UnicodeEncodeError.
    return text.encode("utf-8", "surrogatepass")


def _as_list(values: Sequence[str] | str) -> list[str]:
    return [values] if isinstance(values, str) else list(values)


def to_result(score: reward_pb2.CompletionScore) -> ScoreResult:
    return ScoreResult(
        reward=float(score.reward),
        success=bool(score.success),
        terms={str(k): float(v) for k, v in score.terms.items()},
        status=STATUS_NAMES.get(score.status, "cannot_score"),
        message=score.message,
    )


class RewardClient:
    """Scores groups on the reward service at ``address``; ``timeout_s`` bounds each call."""

    def __init__(self, address: str, timeout_s: float = 30.0) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        self.address = address
        self.timeout_s = timeout_s
        self._channel: grpc.aio.Channel | None = None
        self._stub: reward_pb2_grpc.RewardServiceStub | None = None
        self._health: health_pb2_grpc.HealthStub | None = None

    def _stubs(self) -> tuple[reward_pb2_grpc.RewardServiceStub, health_pb2_grpc.HealthStub]:
        # Created on first use: a grpc.aio channel belongs to the event loop that runs it.
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.address)
            self._stub = reward_pb2_grpc.RewardServiceStub(self._channel)
            self._health = health_pb2_grpc.HealthStub(self._channel)
        assert self._stub is not None and self._health is not None
        return self._stub, self._health

    def _error(self, exc: grpc.aio.AioRpcError) -> RewardError:
        code = exc.code()
        where = f"reward service at {self.address}"
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return RewardRequestError(f"{where} refused the request: {exc.details()}", code)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and _TOO_LARGE in (exc.details() or ""):
            # Not "busy": the same request will be refused again, however long one waits.
            return RewardRequestError(
                f"{where} refused the request as too large ({exc.details()}); send fewer or "
                "shorter completions, or raise the server's reward.max_message_bytes",
                code,
            )
        if code in _RETRYABLE:
            hint = (
                "; make sure it is running (mapo reward serve) and reachable"
                if code == grpc.StatusCode.UNAVAILABLE
                else ""
            )
            return RewardUnavailable(f"{where}: {code.name}: {exc.details()}{hint}", code)
        return RewardError(f"{where}: {code.name}: {exc.details()}", code)

    async def score_batch(
        self,
        task: str,
        completions: Sequence[str],
        answers: Sequence[str] | str,
        *,
        labels: Sequence[str] = (),
        verify_timeout_s: float = 0.0,
    ) -> list[ScoreResult]:
        """Score one group: one result per completion, in order.

        ``answers`` is one reference answer or a list of acceptable ones; ``labels`` the
        candidate labels of a label-choice task; ``verify_timeout_s`` shortens the server's
        per-verification deadline (0: the server's ``reward.timeout_s``).
        """
        stub, _ = self._stubs()
        request = reward_pb2.ScoreBatchRequest(
            task=task,
            completions=[_utf8(c) for c in completions],
            answers=[_utf8(a) for a in _as_list(answers)],
            labels=[_utf8(lb) for lb in labels],
            timeout_s=verify_timeout_s,
        )
        try:
            reply = await stub.ScoreBatch(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None
        if len(reply.scores) != len(completions):
            raise RewardError(
                f"reward service at {self.address} returned {len(reply.scores)} scores "
                f"for {len(completions)} completions"
            )
        return [to_result(s) for s in reply.scores]

    async def score(
        self,
        task: str,
        completion: str,
        answers: Sequence[str] | str,
        *,
        labels: Sequence[str] = (),
        verify_timeout_s: float = 0.0,
    ) -> ScoreResult:
        """Score one completion."""
        stub, _ = self._stubs()
        request = reward_pb2.ScoreRequest(
            task=task,
            completion=_utf8(completion),
            answers=[_utf8(a) for a in _as_list(answers)],
            labels=[_utf8(lb) for lb in labels],
            timeout_s=verify_timeout_s,
        )
        try:
            reply = await stub.Score(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None
        return to_result(reply.score)

    async def list_tasks(self) -> dict[str, float]:
        """Task names the service knows, with their maximum rewards."""
        stub, _ = self._stubs()
        try:
            reply = await stub.ListTasks(reward_pb2.ListTasksRequest(), timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None
        return {t.name: t.max_reward for t in reply.tasks}

    async def wait_ready(self, deadline_s: float = 30.0, *, interval_s: float = 0.2) -> None:
        """Wait until the service answers SERVING to a standard health check.

        Raises RewardUnavailable after ``deadline_s`` seconds, saying what it last saw.
        """
        _, health = self._stubs()
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline_s
        last = "no answer"
        request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        while True:
            left = end - loop.time()
            try:
                reply = await health.Check(request, timeout=max(0.05, min(2.0, left)))
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.aio.AioRpcError as exc:
                last = f"{exc.code().name}: {exc.details()}"
            if loop.time() + interval_s >= end:
                raise RewardUnavailable(
                    f"reward service at {self.address} not ready after {deadline_s:g} s "
                    f"({last}); make sure it is running (mapo reward serve) and reachable"
                )
            await asyncio.sleep(interval_s)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stub = None
            self._health = None

    async def __aenter__(self) -> RewardClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
