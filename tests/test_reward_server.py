"""The reward service end to end: a real server process, real gRPC clients."""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from services.reward.client import (
    RewardClient,
    RewardRequestError,
    RewardUnavailable,
    ScoreResult,
)
from services.reward.rpc import reward_pb2, reward_pb2_grpc
from tests.fixtures.reward import RewardServerProcess, free_port

pytestmark = pytest.mark.integration

T = TypeVar("T")

SERVICE = "mapo.reward.v1.RewardService"
THINK = "<think>Two halves make a whole, so one of them is 0.5.</think> "
# math-verify evaluates this tower for minutes (sympy, interruptible): the deadline must stop it.
SLOW_FOR_MATH_VERIFY = THINK + "\\boxed{9^{9^{9^{9^{9}}}}}"


def with_client(
    server: RewardServerProcess,
    body: Callable[[RewardClient], Awaitable[T]],
    timeout_s: float = 30.0,
) -> T:
    async def main() -> T:
        async with RewardClient(server.address, timeout_s) as client:
            return await body(client)

    return asyncio.run(main())


@pytest.fixture
def stub(reward_server: RewardServerProcess) -> Iterator[reward_pb2_grpc.RewardServiceStub]:
    channel = grpc.insecure_channel(reward_server.address)
    try:
        yield reward_pb2_grpc.RewardServiceStub(channel)
    finally:
        channel.close()


# ----------------------------------------------------------------------------- scoring


def test_score_batch_math_group(reward_server: RewardServerProcess) -> None:
    completions = [
        THINK + "\\boxed{\\frac{1}{2}}",  # right, formatted
        "\\boxed{0.5}",  # right, no think block
        THINK + "\\boxed{3}",  # wrong, formatted
        "It is one half.",  # nothing boxed
    ]
    scores = with_client(
        reward_server, lambda c: c.score_batch("math", completions, "\\frac{1}{2}")
    )
    assert [s.reward for s in scores] == pytest.approx([1.0, 0.9, 0.1, 0.0])
    assert [s.success for s in scores] == [True, False, False, False]
    assert {s.status for s in scores} == {"scored"}
    assert scores[1].terms == {"format": 0.0, "accuracy": 1.0}


def test_score_single_arithmetic(reward_server: RewardServerProcess) -> None:
    result = with_client(reward_server, lambda c: c.score("arithmetic", "46", ["46"]))
    assert result == ScoreResult(1.0, True, {"accuracy": 1.0}, "scored", "")


def test_label_choice_with_candidate_labels(reward_server: RewardServerProcess) -> None:
    labels = ["joy", "grief", "rage"]
    scores = with_client(
        reward_server,
        lambda c: c.score_batch(
            "label_choice",
            ["<think>smiles</think> \\boxed{Joy}", "<think>tears</think> grief, then rage"],
            ["joy"],
            labels=labels,
        ),
    )
    assert [s.reward for s in scores] == pytest.approx([1.0, 0.0])


def test_list_tasks(reward_server: RewardServerProcess) -> None:
    tasks = with_client(reward_server, lambda c: c.list_tasks())
    assert {"math", "math_answer", "exact_match", "label_choice", "arithmetic"} <= set(tasks)
    assert tasks["math"] == 1.0


# ----------------------------------------------------------------------------- deadlines


def test_slow_completion_does_not_delay_other_requests(
    reward_server: RewardServerProcess,
) -> None:
    async def body(client: RewardClient) -> None:
        slow_start = time.perf_counter()
        slow = asyncio.create_task(
            client.score_batch("math", [SLOW_FOR_MATH_VERIFY], ["1"], verify_timeout_s=2.0)
        )
        await asyncio.sleep(0.3)  # the slow one is now on a worker
        start = time.perf_counter()
        normal = await client.score_batch("math", [THINK + "\\boxed{1/2}"] * 4, ["0.5"])
        normal_s = time.perf_counter() - start
        assert [s.reward for s in normal] == [1.0] * 4
        assert normal_s < 1.0, f"a normal group took {normal_s:.2f} s next to a slow one"
        assert not slow.done()
        await client.wait_ready(1.0)  # health answers too
        [timed_out] = await slow
        slow_s = time.perf_counter() - slow_start
        assert timed_out.status == "timed_out"
        assert timed_out.reward == 0.0 and not timed_out.success
        assert 1.5 < slow_s < 5.0

    with_client(reward_server, body)


def test_call_deadline_gets_an_answer_not_deadline_exceeded(
    reward_server: RewardServerProcess,
) -> None:
    # The server's verification deadline is 5 s but the call allows 2 s: the server answers
    # in time with the slow completion timed out and the quick one scored.
    async def body(client: RewardClient) -> None:
        start = time.perf_counter()
        scores = await client.score_batch("math", [SLOW_FOR_MATH_VERIFY, "\\boxed{1}"], ["1"])
        assert time.perf_counter() - start < 2.0
        assert [s.status for s in scores] == ["timed_out", "scored"]
        assert scores[1].reward == pytest.approx(0.9)

    with_client(reward_server, body, timeout_s=2.0)


# ----------------------------------------------------------------------------- bad input


def _batch(**fields: Any) -> reward_pb2.ScoreBatchRequest:
    base: dict[str, Any] = {"task": "math", "completions": [b"\\boxed{1}"], "answers": [b"1"]}
    base.update(fields)
    return reward_pb2.ScoreBatchRequest(**base)


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        ({"completions": []}, r"completions is empty"),
        ({"completions": [b"x" * 4097]}, r"completion 0 is 4097 bytes, more than .*=4096"),
        ({"completions": [b"1"] * 17}, r"17 completions is more than reward.max_group=16"),
        ({"task": "nope"}, r"unknown task 'nope'; known tasks: .*arithmetic.*math"),
        ({"task": ""}, r"task is empty; known tasks"),
        ({"completions": [b"ok", b"caf\xc3"]}, r"completion 1 is not valid UTF-8 \(byte 3"),
        ({"answers": []}, r"answers is empty"),
        ({"answers": [b" "]}, r"every reference answer is blank"),
        ({"answers": [b"\xff"]}, r"answer 0 is not valid UTF-8"),
        ({"labels": [b"a"]}, r"task 'math' takes no labels.*label_choice"),
        ({"timeout_s": -1.0}, r"timeout_s=-1.0 is not a deadline"),
    ],
)
def test_bad_input_is_invalid_argument(
    stub: reward_pb2_grpc.RewardServiceStub, request_fields: dict[str, object], message: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.ScoreBatch(_batch(**request_fields), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(message, caught.value.details()), caught.value.details()


def test_score_names_the_completion_without_an_index(
    stub: reward_pb2_grpc.RewardServiceStub,
) -> None:
    request = reward_pb2.ScoreRequest(task="math", completion=b"\xed\xa0\x80", answers=[b"1"])
    with pytest.raises(grpc.RpcError) as caught:
        stub.Score(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("completion is not valid UTF-8")


def test_client_raises_request_error_on_bad_input(reward_server: RewardServerProcess) -> None:
    with pytest.raises(RewardRequestError, match="unknown task 'nope'"):
        with_client(reward_server, lambda c: c.score_batch("nope", ["x"], ["1"]))
    # A lone surrogate is sent as is and refused by the server with its position.
    with pytest.raises(RewardRequestError, match="completion 0 is not valid UTF-8"):
        with_client(reward_server, lambda c: c.score_batch("math", ["\udcff"], ["1"]))


def test_client_reports_an_unreachable_server() -> None:
    async def main() -> None:
        async with RewardClient(f"127.0.0.1:{free_port()}", timeout_s=2.0) as client:
            with pytest.raises(RewardUnavailable, match="not ready after"):
                await client.wait_ready(0.5)
            with pytest.raises(RewardUnavailable, match="UNAVAILABLE"):
                await client.score_batch("math", ["x"], ["1"])

    asyncio.run(main())


# ----------------------------------------------------------------------------- health, reflection


def test_health_checking(reward_server: RewardServerProcess) -> None:
    with grpc.insecure_channel(reward_server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as caught:
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_describes_the_service(reward_server: RewardServerProcess) -> None:
    with grpc.insecure_channel(reward_server.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {SERVICE, "grpc.health.v1.Health"} <= services
        pool = descriptor_pool.DescriptorPool(database)
        service = pool.FindServiceByName(SERVICE)
        methods = {m.name for m in service.methods}
        assert {"Score", "ScoreBatch", "ListTasks"} <= methods
        request = service.methods_by_name["ScoreBatch"].input_type
        assert {"task", "completions", "answers", "labels", "timeout_s"} <= set(
            request.fields_by_name
        )


# ----------------------------------------------------------------------------- metrics


def test_metrics_are_exposed(reward_server: RewardServerProcess) -> None:
    with_client(reward_server, lambda c: c.score_batch("math", [THINK + "\\boxed{2}"], ["2"]))
    with urllib.request.urlopen(reward_server.metrics_url, timeout=5) as reply:
        text = reply.read().decode()
    for line in [
        r'mapo_reward_requests_total\{code="OK",method="ScoreBatch"\} [1-9]',
        r'mapo_reward_request_seconds_count\{method="ScoreBatch"\} [1-9]',
        r'mapo_reward_completions_total\{status="scored",task="math"\} [1-9]',
        r'mapo_reward_timeouts_total\{task="math"\}',
        r'mapo_reward_score_mean\{task="math"\} (0\.\d+|1\.0)',
        r'mapo_reward_score_count\{task="math"\} [1-9]',
        r'mapo_reward_completions_total\{status="timed_out",task="arithmetic"\} 0\.0',
    ]:
        assert re.search(line, text), f"missing {line}"
    assert "grpc.health" not in text  # probes are not counted as requests
