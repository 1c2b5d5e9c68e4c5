"""Service plumbing without a server process: request checks, generated code, CLI, metrics,
and the in-process server API (create_server on port 0, start, stop)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from services.cli import build_parser
from services.core.config import RewardConfig, build_config
from services.reward import metrics, protogen
from services.reward.registry import registered_tasks
from services.reward.server import create_server, effective_config, join_address, split_address
from services.reward.validation import InvalidRequest, ScoreJob, check_request

CONFIG = RewardConfig(max_group=4, max_completion_bytes=16, timeout_s=5.0)
TASKS = registered_tasks()


def check(**fields: Any) -> ScoreJob:
    base: dict[str, Any] = {
        "task_name": "math",
        "completions": [b"\\boxed{1}"],
        "answers": [b"1"],
        "labels": [],
        "timeout_s": 0.0,
    }
    base.update(fields)
    return check_request(**base, tasks=TASKS, config=CONFIG)


def test_valid_request_is_decoded() -> None:
    job = check(completions=["é".encode(), b"2"], answers=[b"2", b"two"])
    assert job.completions == ["é", "2"] and job.answers == ["2", "two"]
    assert job.timeout_s == 5.0


def test_request_deadline_can_only_shorten_the_servers() -> None:
    assert check(timeout_s=0.5).timeout_s == 0.5
    assert check(timeout_s=60.0).timeout_s == 5.0


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"completions": []}, "completions is empty"),
        ({"completions": [b"1"] * 5}, "5 completions is more than reward.max_group=4"),
        ({"completions": [b"x" * 17]}, "completion 0 is 17 bytes"),
        ({"completions": [b"\x80"]}, "completion 0 is not valid UTF-8 (byte 0"),
        ({"task_name": "nope"}, "unknown task 'nope'; known tasks: arithmetic, "),
        ({"answers": []}, "answers is empty"),
        ({"answers": [b"x" * 17]}, "answer 0 is 17 bytes"),
        ({"labels": [b"a"]}, "task 'math' takes no labels"),
        ({"timeout_s": float("nan")}, "is not a deadline"),
    ],
)
def test_invalid_requests(fields: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        check(**fields)
    assert message in str(caught.value)


def test_labels_accepted_by_label_choice() -> None:
    job = check(task_name="label_choice", labels=[b"joy", b"grief"], answers=[b"joy"])
    assert job.labels == ["joy", "grief"]


def test_generated_code_is_up_to_date() -> None:
    assert protogen.stale_files(protogen.REPO / protogen.PACKAGE) == []


def test_generated_stubs_import_as_a_package() -> None:
    from services.reward.rpc import reward_pb2, reward_pb2_grpc

    assert reward_pb2.DESCRIPTOR.package == "mapo.reward.v1"
    assert hasattr(reward_pb2_grpc, "RewardServiceStub")


def test_client_does_not_import_the_server() -> None:
    import subprocess
    import sys

    code = (
        "import sys, services.reward.client\n"
        "bad = [m for m in sys.modules if m.startswith('services.reward.')\n"
        "       and m.split('.')[2] not in ('client', 'rpc')]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cli_flags_override_the_config() -> None:
    args = build_parser().parse_args(
        ["reward", "serve", "--port", "0", "--workers", "3", "--metrics-port", "9191"]
    )
    config = build_config({"reward": {"address": "0.0.0.0:50051"}}, environ={})
    reward, address = effective_config(args, config)
    assert address == "0.0.0.0:0"
    assert reward.workers == 3 and reward.metrics_port == 9191


def test_cli_rejects_zero_workers() -> None:
    args = build_parser().parse_args(["reward", "serve", "--workers", "0"])
    with pytest.raises(ValueError, match="workers"):
        effective_config(args, build_config({}, environ={}))


@pytest.mark.parametrize(
    ("address", "parts"),
    [("127.0.0.1:50051", ("127.0.0.1", 50051)), ("[::1]:7", ("::1", 7)), (":8", ("0.0.0.0", 8))],
)
def test_addresses(address: str, parts: tuple[str, int]) -> None:
    assert split_address(address) == parts
    if address.startswith(("1", "[")):
        assert join_address(*parts) == address


def test_score_mean_is_a_window() -> None:
    for reward in [0.0] * 10 + [1.0] * metrics.SCORE_WINDOW:
        metrics.observe_completion("test_window", "scored", reward)
    metrics.observe_completion("test_window", "timed_out", 0.0)  # not part of the mean
    value = metrics.REGISTRY.get_sample_value("mapo_reward_score_mean", {"task": "test_window"})
    assert value == 1.0
    timeouts = metrics.REGISTRY.get_sample_value(
        "mapo_reward_timeouts_total", {"task": "test_window"}
    )
    assert timeouts == 1.0


@pytest.mark.integration
def test_create_server_in_process_on_port_0() -> None:
    from services.reward.client import RewardClient

    async def main() -> None:
        server, port = create_server(RewardConfig(workers=1), "127.0.0.1:0")
        assert port > 0 and server.port == port
        await server.start()
        try:
            # The port is really ours: a second bind fails.
            with socket.socket() as taken, pytest.raises(OSError):
                taken.bind(("127.0.0.1", port))
            with pytest.raises(OSError, match="cannot bind"):
                create_server(RewardConfig(workers=1), f"127.0.0.1:{port}")
            async with RewardClient(f"127.0.0.1:{port}", 10.0) as client:
                await client.wait_ready(10.0)
                [result] = await client.score_batch("arithmetic", ["7"], ["7"])
                assert result.success
        finally:
            await server.stop(1.0)
        assert server.pool.pids == []

    asyncio.run(main())
