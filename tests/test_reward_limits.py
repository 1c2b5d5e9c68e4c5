"""The reward service's limits, and hostile input against them.

A real server (``mapo reward serve`` in a child process) with small limits gets oversized,
malformed and random requests (hypothesis): every refusal must be a status the limits promise
(INVALID_ARGUMENT for a wrong request, RESOURCE_EXHAUSTED for too large or too much at once;
never UNKNOWN or INTERNAL), valid requests must still be scored, and the server must still
answer SERVING afterwards, with no traceback in its log. The verifier pool's bounded queue is
also tested on its own.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.reward.client import RewardClient, RewardRequestError, RewardUnavailable
from services.reward.pool import PoolBusy, VerifierPool
from services.reward.registry import Task, registered_tasks
from services.reward.rpc import reward_pb2
from services.reward.verifiers import Status
from services.stack.processes import Child, free_port, grpc_serving, wait_until

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
SERVICE = "/mapo.reward.v1.RewardService/"
METHODS = ("Score", "ScoreBatch", "ListTasks")

MAX_GROUP = 16
MAX_COMPLETION_BYTES = 4096
MAX_MESSAGE_BYTES = 48 * 1024  # below a full group of maximal completions: both limits bite
MAX_CONCURRENT_RPCS = 8
MAX_QUEUED = 32
SETTINGS = {
    "reward.max_group": MAX_GROUP,
    "reward.max_completion_bytes": MAX_COMPLETION_BYTES,
    "reward.max_message_bytes": MAX_MESSAGE_BYTES,
    "reward.max_concurrent_rpcs": MAX_CONCURRENT_RPCS,
    "reward.max_queued": MAX_QUEUED,
    "reward.timeout_s": 2,
}

THINK = "<think>Two halves make a whole.</think> "
# math-verify evaluates this tower for minutes: only the deadline stops it.
SLOW = THINK + "\\boxed{9^{9^{9^{9^{9}}}}}"

OK, INVALID, EXHAUSTED = (
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
)
ALLOWED = {OK, INVALID, EXHAUSTED}


def fuzz(cases: int) -> settings:
    return settings(
        max_examples=cases,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# ----------------------------------------------------------------------------- the server


@dataclass
class LimitedServer:
    child: Child
    address: str
    metrics_url: str
    channel: grpc.Channel

    def call(self, method: str, payload: bytes, timeout: float = 20.0) -> tuple[Any, bytes]:
        """(status code, reply bytes) of one call with ``payload`` as the serialized request."""
        rpc = self.channel.unary_unary(SERVICE + method)  # no serializers: bytes in, bytes out
        try:
            return OK, rpc(payload, timeout=timeout)
        except grpc.RpcError as exc:
            return exc.code(), (exc.details() or "").encode()

    def future(self, method: str, payload: bytes, timeout: float = 20.0) -> Future[Any]:
        rpc = self.channel.unary_unary(SERVICE + method)
        future: Future[Any] = rpc.future(payload, timeout=timeout)
        return future

    def assert_healthy(self) -> None:
        """Still running, SERVING, scoring a valid group, and no traceback in its log."""
        assert self.child.alive(), self.child.tail(60)
        assert grpc_serving(self.address, 5.0), self.child.tail(60)
        request = batch("arithmetic", [b"46", b"45"], [b"46"])
        code, reply = self.call("ScoreBatch", request.SerializeToString())
        assert code == OK, reply
        scores = reward_pb2.ScoreBatchResponse.FromString(reply).scores
        assert [s.reward for s in scores] == [1.0, 0.0]
        log = self.child.log_path.read_text(errors="replace")
        assert "Traceback" not in log and "internal error" not in log, self.child.tail(80)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LimitedServer]:
    port, metrics_port = free_port(), free_port()
    command = [sys.executable, "-m", "services.cli", "reward", "serve", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--workers", "2", "--metrics-port", str(metrics_port)]
    for key, value in SETTINGS.items():
        command += ["--set", f"{key}={value}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAPO__")}
    log_path = tmp_path_factory.mktemp("reward-limits") / "reward.log"
    child = Child.start("reward server", command, log_path=log_path, env=env, cwd=REPO)
    address = f"127.0.0.1:{port}"
    channel = grpc.insecure_channel(address)
    try:
        wait_until(
            child,
            lambda: grpc_serving(address, 1.0),
            what="answering SERVING",
            timeout_s=60,
            interval_s=0.1,
        )
        yield LimitedServer(child, address, f"http://127.0.0.1:{metrics_port}/metrics", channel)
    finally:
        channel.close()
        child.stop(grace_s=20)


def batch(task: str, completions: Sequence[bytes], answers: Sequence[bytes], **more: Any) -> Any:
    return reward_pb2.ScoreBatchRequest(
        task=task, completions=list(completions), answers=list(answers), **more
    )


def with_client(
    server: LimitedServer, body: Callable[[RewardClient], Any], timeout_s: float
) -> Any:
    async def main() -> Any:
        async with RewardClient(server.address, timeout_s) as client:
            return await body(client)

    return asyncio.run(main())


# ----------------------------------------------------------------------------- each limit


def test_a_message_over_the_size_limit_is_resource_exhausted(server: LimitedServer) -> None:
    for method in METHODS:
        code, details = server.call(method, b"\x0a" * (MAX_MESSAGE_BYTES + 1))
        assert code == EXHAUSTED, (method, code, details)
        assert b"larger than max" in details
    code, _ = server.call("ListTasks", b"\x0a\x00" * (MAX_MESSAGE_BYTES // 2))  # at the limit
    assert code == OK
    # The client says it is the request, not the server's load: retrying cannot help.
    big = ["x" * MAX_COMPLETION_BYTES] * 13  # each completion within its limit, the whole not
    with pytest.raises(RewardRequestError, match=r"too large.*reward\.max_message_bytes"):
        with_client(server, lambda c: c.score_batch("exact_match", big, ["x"]), 10.0)
    server.assert_healthy()


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        (
            {"completions": [b"1"] * (MAX_GROUP + 1)},
            rf"{MAX_GROUP + 1} completions is more than reward.max_group={MAX_GROUP}",
        ),
        (
            {"completions": [b"1", b"x" * (MAX_COMPLETION_BYTES + 1)]},
            rf"completion 1 is {MAX_COMPLETION_BYTES + 1} bytes, more than "
            rf"reward.max_completion_bytes={MAX_COMPLETION_BYTES}",
        ),
        ({"answers": [b"1"] * (MAX_GROUP + 1)}, r"17 answers is more than reward.max_group"),
        ({"task": "x" * 5000}, r"unknown task 'xxx*'\.\.\. \(5000 characters\); known tasks"),
    ],
)
def test_group_and_completion_limits_are_invalid_argument(
    server: LimitedServer, request_fields: dict[str, Any], message: str
) -> None:
    fields: dict[str, Any] = {"task": "arithmetic", "completions": [b"1"], "answers": [b"1"]}
    fields.update(request_fields)
    code, details = server.call(
        "ScoreBatch", reward_pb2.ScoreBatchRequest(**fields).SerializeToString()
    )
    assert code == INVALID, details
    assert re.search(message, details.decode()), details


def test_bytes_that_are_not_a_request_are_invalid_argument(server: LimitedServer) -> None:
    for payload, reason in [
        (b"\xff\xff\xff", "corrupt"),
        (b"\x0a\x03\xff\xfe\xfd", "UTF-8"),  # the task, a proto string, is not UTF-8
        (b"\x12\xff\xff\xff\xff\x0f", ""),  # a completion declared 4 GiB long
    ]:
        for method in ("Score", "ScoreBatch"):
            code, details = server.call(method, payload)
            assert code == INVALID, (payload, details)
            assert b"is not a valid Score" in details and reason.encode() in details


def test_calls_past_the_concurrency_cap_are_resource_exhausted(server: LimitedServer) -> None:
    slow = batch("math", [SLOW.encode()], [b"1"], timeout_s=2.0).SerializeToString()
    busy = [server.future("ScoreBatch", slow, timeout=3.0) for _ in range(MAX_CONCURRENT_RPCS)]
    # Once all of them are in flight (two verifying, the others queued), one more is refused.
    deadline = time.monotonic() + 1.5
    while True:
        code, details = server.call("ListTasks", b"")
        if code != OK or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert code == EXHAUSTED, details
    assert not any(f.done() for f in busy)
    # The calls that were taken are answered (timed out, by their deadline), none refused.
    for f in busy:
        reply = reward_pb2.ScoreBatchResponse.FromString(f.result(10))
        assert [s.status for s in reply.scores] == [reward_pb2.SCORE_STATUS_TIMED_OUT]
    server.assert_healthy()


def test_a_full_queue_is_resource_exhausted_and_frees_up(server: LimitedServer) -> None:
    slow_group = batch("math", [SLOW.encode()] * MAX_GROUP, [b"1"], timeout_s=2.0)
    # Two full groups: two completions verifying, 2 * 16 - 2 = 30 of 32 places queued; their
    # callers give up after 3 s (the server answers them "timed out" just before).
    waiting = [server.future("ScoreBatch", slow_group.SerializeToString(), 3.0) for _ in "ab"]
    time.sleep(0.5)
    three = batch("arithmetic", [b"1", b"2", b"3"], [b"1"]).SerializeToString()
    code, details = server.call("ScoreBatch", three)
    assert code == EXHAUSTED, details
    assert re.search(rb"busy: 30 completions are already waiting.*reward.max_queued=32", details)
    with pytest.raises(RewardUnavailable, match="RESOURCE_EXHAUSTED"):  # retryable
        with_client(server, lambda c: c.score_batch("arithmetic", ["1"] * 3, ["1"]), 5.0)
    two = batch("arithmetic", [b"1", b"2"], [b"1"])  # 30 + 2 fits: queued, then served
    assert server.call("ScoreBatch", two.SerializeToString(), 10.0)[0] == OK
    for f in waiting:
        reply = reward_pb2.ScoreBatchResponse.FromString(f.result(10))
        assert {s.status for s in reply.scores} == {reward_pb2.SCORE_STATUS_TIMED_OUT}
    # Those callers gone, their queued completions went with them.
    code, reply = server.call("ScoreBatch", three, 10.0)
    assert code == OK, reply
    with urllib.request.urlopen(server.metrics_url, timeout=5) as page:
        metrics = page.read().decode()
    assert re.search(
        r'mapo_reward_requests_total\{code="RESOURCE_EXHAUSTED",method="ScoreBatch"\} [1-9]',
        metrics,
    )
    server.assert_healthy()


# ----------------------------------------------------------------------------- fuzzing

TASKS = registered_tasks()
TAKES_LABELS = {name for name, t in TASKS.items() if t.takes_labels}


def utf8(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def expected_code(method: str, request: Any) -> Any:
    """The status the documented limits promise for ``request`` (one call, nothing else busy)."""
    if request.ByteSize() > MAX_MESSAGE_BYTES:
        return EXHAUSTED
    if method == "ListTasks":
        return OK
    completions = [request.completion] if method == "Score" else list(request.completions)
    answers, labels = list(request.answers), list(request.labels)
    if not request.task.strip() or request.task not in TASKS:
        return INVALID
    if not completions or not answers:
        return INVALID
    for items in (completions, answers, labels):
        if len(items) > MAX_GROUP:
            return INVALID
        if any(len(x) > MAX_COMPLETION_BYTES or utf8(x) is None for x in items):
            return INVALID
    if not any(str(utf8(a)).strip() for a in answers):
        return INVALID
    if labels and request.task not in TAKES_LABELS:
        return INVALID
    if not math.isfinite(request.timeout_s) or request.timeout_s < 0:
        return INVALID
    return OK


def repeated(unit: st.SearchStrategy[str], low: int, high: int) -> st.SearchStrategy[str]:
    """Long strings, cheaply: a short unit repeated many times."""
    return st.builds(lambda u, n: u * n, unit, st.integers(low, high))


SHORT_TEXT = st.text(max_size=24)  # any code point but lone surrogates: astral, combining, RTL
COMMON = st.sampled_from(["1", "46", "\\boxed{1}", THINK + "\\boxed{2}", "joy", " ", ""])
FIELD_BYTES = st.one_of(
    SHORT_TEXT.map(str.encode),
    SHORT_TEXT.map(str.encode),
    st.binary(max_size=24),  # mostly not UTF-8
    COMMON.map(str.encode),
    COMMON.map(str.encode),
    st.sampled_from(["\udcff", "a\ud800b"]).map(lambda s: s.encode("utf-8", "surrogatepass")),
    repeated(st.text(min_size=1, max_size=2), 1000, 3000).map(str.encode),  # near the limits
)
FIELD_LISTS = st.one_of(
    st.lists(FIELD_BYTES, max_size=MAX_GROUP + 4),
    st.builds(lambda item, n: [item] * n, FIELD_BYTES, st.integers(MAX_GROUP + 1, 300)),
)
TASK_NAMES = st.one_of(
    st.sampled_from(sorted(TASKS)),
    st.sampled_from(sorted(TASKS)),
    SHORT_TEXT,
    repeated(st.text(min_size=1, max_size=2), 100, 30000),
)
TIMEOUTS = st.one_of(
    st.just(0.0),
    st.floats(min_value=0.05, max_value=1.0),
    st.floats(),  # NaN, infinities, negatives, huge and tiny numbers
    st.sampled_from([-1.0, -0.0, 5e-324, 1e308, float("inf"), float("nan")]),
)
SCORE_BATCH = st.builds(
    reward_pb2.ScoreBatchRequest,
    task=TASK_NAMES,
    completions=FIELD_LISTS,
    answers=FIELD_LISTS,
    labels=st.one_of(st.just([]), FIELD_LISTS),
    timeout_s=TIMEOUTS,
)
SCORE = st.builds(
    reward_pb2.ScoreRequest,
    task=TASK_NAMES,
    completion=FIELD_BYTES,
    answers=FIELD_LISTS,
    labels=st.one_of(st.just([]), FIELD_LISTS),
    timeout_s=TIMEOUTS,
)
# Requests that are mostly valid, so that scoring (not only refusing) is fuzzed too.
SMALL_ITEMS = st.lists(st.one_of(COMMON, SHORT_TEXT).map(str.encode), min_size=1, max_size=6)
NEARLY_VALID = st.builds(
    reward_pb2.ScoreBatchRequest,
    task=st.sampled_from(sorted(TASKS)),
    completions=SMALL_ITEMS,
    answers=st.lists(COMMON.map(str.encode), min_size=1, max_size=3),
    timeout_s=st.one_of(st.just(0.0), st.floats(min_value=0.05, max_value=1.0)),
)
REQUESTS = st.one_of(
    st.tuples(st.just("ScoreBatch"), SCORE_BATCH),
    st.tuples(st.just("ScoreBatch"), NEARLY_VALID),
    st.tuples(st.just("Score"), SCORE),
    st.tuples(st.just("ListTasks"), st.just(reward_pb2.ListTasksRequest())),
)


def check_reply(method: str, request: Any, code: Any, reply: bytes) -> None:
    if code != OK:
        assert reply, f"{code.name} without a message"
        return
    if method == "ListTasks":
        names = {t.name for t in reward_pb2.ListTasksResponse.FromString(reply).tasks}
        assert names == set(TASKS)
        return
    if method == "Score":
        scores = [reward_pb2.ScoreResponse.FromString(reply).score]
        expected = 1
    else:
        scores = list(reward_pb2.ScoreBatchResponse.FromString(reply).scores)
        expected = len(request.completions)
    assert len(scores) == expected
    for s in scores:
        assert s.status != reward_pb2.SCORE_STATUS_UNSPECIFIED and math.isfinite(s.reward)


def test_random_requests_get_the_status_the_limits_promise(server: LimitedServer) -> None:
    """Random field values, valid or not: exactly the code the limits promise, and for a valid
    request a score per completion."""

    @fuzz(600)
    @given(REQUESTS)
    def case(method_and_request: tuple[str, Any]) -> None:
        method, request = method_and_request
        code, reply = server.call(method, request.SerializeToString())
        assert code == expected_code(method, request), (code, reply[:300])
        check_reply(method, request, code, reply)

    case()
    server.assert_healthy()


def flip(data: bytes, positions: list[int], values: list[int]) -> bytes:
    out = bytearray(data)
    for at, value in zip(positions, values, strict=False):
        if out:
            out[at % len(out)] = value
    return bytes(out)


# Seeds to mutate, built once (drawing whole messages for every case would cost more time than
# the calls): every field present, repeated ones several times, numbers of each width.
SEEDS = [
    batch("math", [THINK.encode() + b"\\boxed{1}", b"2"], [b"1", b"one"]).SerializeToString(),
    batch(
        "label_choice", [b"joy"], [b"joy"], labels=[b"joy", b"grief"], timeout_s=0.5
    ).SerializeToString(),
    batch("arithmetic", [b"46"] * MAX_GROUP, [b"46"], timeout_s=1e308).SerializeToString(),
    reward_pb2.ScoreRequest(
        task="exact_match", completion="é😀".encode(), answers=[b"x"]
    ).SerializeToString(),
    reward_pb2.ScoreRequest(
        task="math", completion=b"\\boxed{1}", answers=[b"1"], timeout_s=-1
    ).SerializeToString(),
]
VALID_BYTES = st.sampled_from(SEEDS)
RAW_PAYLOADS = st.one_of(
    st.binary(max_size=512),
    # Valid messages with bytes flipped, cut or extended: wrong lengths, tags, wire types.
    st.builds(
        flip,
        VALID_BYTES,
        st.lists(st.integers(0, 1 << 16), min_size=1, max_size=4),
        st.lists(st.integers(0, 255), min_size=1, max_size=4),
    ),
    st.builds(lambda raw, n: raw[: n % (len(raw) + 1)], VALID_BYTES, st.integers(0, 1 << 16)),
    st.builds(lambda raw, tail: raw + tail, VALID_BYTES, st.binary(max_size=32)),
    # Declared lengths far past the data, nesting and varints of every size.
    st.sampled_from(
        [
            b"\x12\xff\xff\xff\xff\x0f",
            b"\x1a\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
            b"\x29" + b"\xff" * 8,
            b"\x29\x00",
            b"\x0a\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",
            b"\x08" + b"\xff" * 20,
        ]
    ),
)
# Past the message size limit, by a little or by a lot. (grpc takes a tenth of a second or more
# to refuse one, on the caller's side only: the server serves others meanwhile.)
OVERSIZED = st.one_of(
    st.builds(
        lambda unit, extra: (
            (unit * (MAX_MESSAGE_BYTES // len(unit) + 1))[:MAX_MESSAGE_BYTES] + unit * extra
        ),
        st.binary(min_size=1, max_size=8),
        st.integers(1, 200_000),
    ),
    # Each completion within its limit, only the whole too large.
    st.builds(
        lambda text, extra: batch(
            "math", [text] * (MAX_MESSAGE_BYTES // len(text) + 1 + extra), [b"1"]
        ).SerializeToString(),
        repeated(st.text(min_size=1, max_size=2), 1500, 2000)
        .map(str.encode)
        .map(lambda raw: raw[:MAX_COMPLETION_BYTES]),
        st.integers(0, 20),
    ),
)


def test_random_bytes_never_crash_the_server(server: LimitedServer) -> None:
    """Any bytes as the serialized request, to every method: a valid parse is answered like any
    request, anything else is INVALID_ARGUMENT or RESOURCE_EXHAUSTED, never UNKNOWN/INTERNAL."""

    @fuzz(1500)
    @given(st.sampled_from(METHODS), RAW_PAYLOADS)
    def case(method: str, payload: bytes) -> None:
        code, reply = server.call(method, payload)
        assert code in ALLOWED, (code, reply[:300])
        if len(payload) > MAX_MESSAGE_BYTES:
            assert code == EXHAUSTED
        elif code == EXHAUSTED:
            raise AssertionError(f"nothing else is busy, yet: {reply[:300]!r}")

    case()
    server.assert_healthy()


def test_oversized_messages_are_refused_by_size_alone(server: LimitedServer) -> None:
    @fuzz(40)
    @given(st.sampled_from(METHODS), OVERSIZED)
    def case(method: str, payload: bytes) -> None:
        assert len(payload) > MAX_MESSAGE_BYTES
        code, reply = server.call(method, payload)
        assert code == EXHAUSTED and b"larger than max" in reply, (code, reply[:300])

    case()
    server.assert_healthy()


def test_bursts_of_concurrent_requests_are_served_or_refused_cleanly(
    server: LimitedServer,
) -> None:
    """Many calls at once, past the concurrency cap: each is answered with its scores or a
    clean refusal, and the server goes on."""

    @fuzz(40)
    @given(st.lists(REQUESTS, min_size=1, max_size=3 * MAX_CONCURRENT_RPCS))
    def case(requests: list[tuple[str, Any]]) -> None:
        futures = [server.future(m, r.SerializeToString()) for m, r in requests]
        for (method, request), f in zip(requests, futures, strict=True):
            try:
                code, reply = OK, f.result(30)
            except grpc.RpcError as exc:
                code, reply = exc.code(), (exc.details() or "").encode()
            assert code in ALLOWED, (code, reply[:300])
            if code != EXHAUSTED:  # refused for being busy, or what the limits promise
                assert code == expected_code(method, request), (code, reply[:300])
            check_reply(method, request, code, reply)

    case()
    server.assert_healthy()


# ----------------------------------------------------------------------------- the pool alone


def nap(completion: str, answers: Sequence[str]) -> float:
    time.sleep(float(completion))
    return 1.0


POOL_TASKS = {"nap": Task("nap", nap)}


def with_pool(body: Callable[[VerifierPool], Any], *, max_queued: int) -> Any:
    async def main() -> Any:
        pool = VerifierPool(POOL_TASKS, 1, max_queued=max_queued)
        await pool.start()
        try:
            return await body(pool)
        finally:
            await pool.close()

    return asyncio.run(main())


def test_pool_refuses_what_does_not_fit_and_queues_none_of_it() -> None:
    async def body(pool: VerifierPool) -> None:
        first = asyncio.create_task(pool.verify("nap", ["0.3"] * 3, ["x"], timeout_s=5))
        await asyncio.sleep(0.1)
        assert pool.queued == 2  # one running
        with pytest.raises(PoolBusy, match=r"2 completions are already waiting.*max_queued=4"):
            await pool.verify("nap", ["0"] * 3, ["x"], timeout_s=5)
        assert pool.queued == 2
        fits = await pool.verify("nap", ["0"] * 2, ["x"], timeout_s=5)  # 2 + 2 = 4
        assert [o.status for o in [*await first, *fits]] == [Status.SCORED] * 5
        assert pool.queued == 0

    with_pool(body, max_queued=4)


def test_pool_takes_one_request_larger_than_the_queue_when_it_is_empty() -> None:
    async def body(pool: VerifierPool) -> None:
        outcomes = await pool.verify("nap", ["0"] * 5, ["x"], timeout_s=5)
        assert [o.status for o in outcomes] == [Status.SCORED] * 5

    with_pool(body, max_queued=2)


def test_pool_callers_that_give_up_take_their_queued_completions_out() -> None:
    async def body(pool: VerifierPool) -> None:
        loop = asyncio.get_running_loop()
        # A deadline: the call returns early and its queued completions leave the queue.
        outcomes = await pool.verify(
            "nap", ["0.5"] * 4, ["x"], timeout_s=5, deadline=loop.time() + 0.2
        )
        assert [o.status for o in outcomes] == [Status.TIMED_OUT] * 4
        assert pool.queued == 0
        # A cancelled call: the same.
        call = asyncio.create_task(pool.verify("nap", ["0.5"] * 4, ["x"], timeout_s=5))
        await asyncio.sleep(0.1)
        assert pool.queued == 3
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert pool.queued == 0
        # Repeated give-ups never grow the queue: room for a full queue's worth again.
        outcomes = await pool.verify("nap", ["0"] * 4, ["x"], timeout_s=5)
        assert [o.status for o in outcomes] == [Status.SCORED] * 4

    with_pool(body, max_queued=4)
