"""Inference service parts that need no engine: the version gate, weight refusal, scored groups,
the rollout worker's bus protocol (memory bus, fake engine), and the HTTP admin guard."""

from __future__ import annotations

import asyncio
import functools
import types
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from services.core.config import build_config
from services.core.schemas import PromptMessage, ScoredGroup
from services.inference import rollout_worker as rw
from services.inference.generation import EngineUnavailable, Generation, PromptRejected
from services.inference.metrics import InferenceMetrics, TokenRate
from services.inference.reload import Candidate, ReloadRefused, VersionGate, WeightManager
from services.transport import INFERENCE_GROUP, make_bus
from services.weights.store import WEIGHTS_FILE, version_dir, write_version


def run(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    """Run an async test on its own event loop (fixtures still arrive as arguments)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return asyncio.run(fn(*args, **kwargs))

    return wrapper


# ----------------------------------------------------------------------------- version gate


@run
async def test_gate_reload_waits_for_running_generations_and_blocks_new_ones() -> None:
    gate = VersionGate()
    events: list[str] = []
    release = asyncio.Event()

    async def generation(name: str, wait: asyncio.Event | None = None) -> None:
        async with gate.shared():
            events.append(f"{name} start")
            if wait is not None:
                await wait.wait()
            events.append(f"{name} end")

    async def reload() -> None:
        async with gate.exclusive():
            events.append("reload")

    first = asyncio.create_task(generation("g1", release))
    await asyncio.sleep(0)
    swap = asyncio.create_task(reload())
    await asyncio.sleep(0)
    late = asyncio.create_task(generation("g2"))
    await asyncio.sleep(0.01)
    assert events == ["g1 start"]  # the reload waits, and so does the late generation
    release.set()
    await asyncio.gather(first, swap, late)
    assert events == ["g1 start", "g1 end", "reload", "g2 start", "g2 end"]


@run
async def test_gate_survives_cancelled_waiters() -> None:
    gate = VersionGate()
    async with gate.exclusive():
        waiter = asyncio.create_task(gate.shared().__aenter__())
        await asyncio.sleep(0)
        waiter.cancel()
    assert gate.active == 0
    async with gate.shared():
        assert gate.active == 1


# ----------------------------------------------------------------------------- weights


class FakeReloader:
    def __init__(self, fail: bool = False) -> None:
        self.loaded: list[tuple[str, ...]] = []
        self.resets = 0
        self.fail = fail

    async def reload_files(self, paths: Sequence[str], expected: Any) -> None:
        if self.fail:
            self.fail = False  # the restore afterwards works
            raise RuntimeError("engine exploded")
        self.loaded.append(tuple(paths))

    async def reset_prefix_cache(self) -> None:
        self.resets += 1


def _tensors(scale: float = 1.0) -> dict[str, torch.Tensor]:
    return {"a.weight": torch.ones(4, 3) * scale, "b.bias": torch.zeros(5)}


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    save_file(_tensors(), str(d / WEIGHTS_FILE))
    return d


def _manager(model_dir: Path, store: Path, reloader: FakeReloader | None = None) -> WeightManager:
    failures: list[str] = []
    mgr = WeightManager(
        reloader or FakeReloader(), model_dir, store=str(store), on_failure=failures.append
    )
    mgr.failures = failures  # type: ignore[attr-defined]
    return mgr


@run
async def test_new_version_is_loaded_and_prefix_cache_reset(
    model_dir: Path, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    directory, sha = write_version(store, 1, _tensors(2.0), step=7)
    reloader = FakeReloader()
    mgr = _manager(model_dir, store, reloader)
    assert mgr.version == 0
    assert await mgr.apply(Candidate(1, str(store), sha)) == 1
    assert reloader.loaded == [(str(directory / WEIGHTS_FILE),)]
    assert reloader.resets == 1
    assert mgr.served.step == 7
    # An announcement that is not newer never rolls back.
    assert await mgr.apply(Candidate(1, str(directory), sha)) == 1
    assert len(reloader.loaded) == 1


@pytest.mark.parametrize("damage", ["flip", "missing", "shape", "names", "sha", "version"])
@run
async def test_bad_versions_are_refused_and_the_old_one_keeps_serving(
    model_dir: Path, tmp_path: Path, damage: str
) -> None:
    store = tmp_path / "store"
    tensors = _tensors(3.0)
    if damage == "shape":
        tensors["a.weight"] = torch.ones(3, 4)
    if damage == "names":
        tensors["c.weight"] = tensors.pop("b.bias")
    directory, sha = write_version(store, 1, tensors)
    weights = directory / WEIGHTS_FILE
    if damage == "flip":
        raw = bytearray(weights.read_bytes())
        raw[-3] ^= 0xFF
        weights.write_bytes(bytes(raw))
    if damage == "missing":
        weights.unlink()
    if damage == "sha":
        sha = "0" * 64
    if damage == "version":
        directory.rename(version_dir(store, 2))
    reloader = FakeReloader()
    mgr = _manager(model_dir, store, reloader)
    with pytest.raises(ReloadRefused) as info:
        await mgr.apply(Candidate(2 if damage == "version" else 1, str(store), sha))
    expected = {"shape": "incompatible", "names": "incompatible", "version": "mismatch"}
    assert info.value.reason == expected.get(damage, "corrupt")
    assert mgr.failures == [info.value.reason]  # type: ignore[attr-defined]
    assert mgr.version == 0 and reloader.loaded == []


@run
async def test_missing_version_is_refused(model_dir: Path, tmp_path: Path) -> None:
    mgr = _manager(model_dir, tmp_path / "store")
    with pytest.raises(ReloadRefused) as info:
        await mgr.apply(Candidate(4, str(tmp_path / "store")))
    assert info.value.reason == "missing"


@run
async def test_startup_picks_the_newest_valid_version(model_dir: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    write_version(store, 1, _tensors(1.5), keep=10)
    write_version(store, 2, _tensors(2.5), keep=10)
    newest, _ = write_version(store, 3, _tensors(3.5), keep=10)
    (newest / WEIGHTS_FILE).write_bytes(b"garbage")
    mgr = _manager(model_dir, store)
    assert [c.version for c in mgr.store_candidates()] == [3, 2, 1]
    assert await mgr.load_newest(mgr.store_candidates()) == 2


@run
async def test_failed_in_place_reload_restores_the_served_weights(
    model_dir: Path, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    _, sha = write_version(store, 1, _tensors(2.0))
    reloader = FakeReloader(fail=True)
    mgr = _manager(model_dir, store, reloader)
    with pytest.raises(ReloadRefused) as info:
        await mgr.apply(Candidate(1, str(store), sha))
    assert info.value.reason == "engine"
    assert mgr.version == 0 and mgr.healthy
    assert reloader.loaded == [(str(model_dir / WEIGHTS_FILE),)]  # the base went back in


# ----------------------------------------------------------------------------- groups


def _completion(tokens: list[int], logprobs: list[float], text: str = "46") -> Any:
    flat = types.SimpleNamespace(
        start_indices=list(range(len(tokens))),
        end_indices=list(range(1, len(tokens) + 1)),
        token_ids=list(tokens),
        logprobs=list(logprobs),
    )
    return types.SimpleNamespace(
        index=0, text=text, token_ids=tokens, logprobs=flat, finish_reason="stop"
    )


def _score(reward: float) -> Any:
    return types.SimpleNamespace(
        reward=reward, success=reward >= 1.0, terms={"exact": reward}, status="scored"
    )


def _prompt(i: int = 0, size: int = 2, text: str = "12+34=") -> PromptMessage:
    return PromptMessage(
        prompt_id=f"p{i}", prompt=text, answer="46", task="arithmetic", group_size=size
    )


def test_build_group_keeps_tokens_logprobs_and_version() -> None:
    out = types.SimpleNamespace(
        prompt_token_ids=[5, 6, 7],
        outputs=[_completion([1, 2], [-0.5, -1.5]), _completion([3], [-0.25], "4")],
    )
    scores = [_score(1.0), _score(0.0)]
    group = rw.build_group(_prompt(), out, ["46", "4"], scores, version=3, replica="r")
    assert group.policy_version == 3 and group.group_id == "p0" and group.replica == "r"
    assert group.prompt_token_ids.tolist() == [5, 6, 7]
    assert group.rollouts[0].token_ids.dtype == np.int32
    assert group.rollouts[0].logprobs.tolist() == [-0.5, -1.5]
    assert group.rewards == [1.0, 0.0]
    assert [r.text for r in group.rollouts] == ["46", "4"]
    with pytest.raises(ValueError, match="scores"):
        rw.build_group(_prompt(), out, ["46", "4"], [_score(1.0)], version=0, replica="r")


def test_misaligned_logprobs_are_an_error() -> None:
    bad = _completion([1, 2], [-0.5])
    with pytest.raises(ValueError, match="line up"):
        rw.sampled_logprobs(bad)


def test_token_rate_is_a_sliding_window() -> None:
    now = [100.0]
    rate = TokenRate(window_s=10.0, clock=lambda: now[0])
    rate.add(50)
    now[0] = 105.0
    rate.add(50)
    assert rate.rate() == 10.0
    now[0] = 112.0
    assert rate.rate() == 5.0


# ----------------------------------------------------------------------------- worker


class FakeService:
    """Just enough of InferenceService for the worker: tokenize, generate, metrics."""

    def __init__(self, max_model_len: int = 64) -> None:
        self.config = build_config(
            {"model": {"max_model_len": max_model_len}, "inference": {"prompts_per_batch": 3}}
        )
        self.replica = "replica-test"
        self.metrics = InferenceMetrics()
        self.engine = types.SimpleNamespace(errored=False)
        self.version = 5
        self.generated: list[int] = []
        self.vision_token_ids: frozenset[int] = frozenset()

    def tokenize(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, token_ids: Sequence[int]) -> str:
        return "46" if list(token_ids) == [1, 2] else "?"

    async def generate(self, prompts: Sequence[Sequence[int]], params: Any) -> Generation:
        size = params
        await asyncio.sleep(0.01)
        outs = [
            types.SimpleNamespace(
                prompt_token_ids=list(p),
                outputs=[_completion([1, 2], [-0.1, -0.2], "46") for _ in range(size)],
            )
            for p in prompts
        ]
        self.generated.append(len(prompts))
        return Generation(self.version, outs, 0.01)


class FakeScorer:
    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.calls = 0

    async def score_batch(
        self, task: str, completions: Sequence[str], answers: Sequence[str]
    ) -> list[Any]:
        self.calls += 1
        if self.failures:
            self.failures -= 1
            raise ConnectionError("reward service unavailable")
        return [_score(1.0 if c == answers[0] else 0.0) for c in completions]


@pytest.fixture
def fake_params(monkeypatch: pytest.MonkeyPatch) -> None:
    """No vLLM in unit tests: the sampling parameters are just the group size."""
    monkeypatch.setattr(rw, "rollout_params", lambda prompt, max_tokens, never: prompt.group_size)
    monkeypatch.setattr(rw, "RETRY_MIN_S", 0.01)


async def _run_worker(service: FakeService, scorer: FakeScorer, prompts: list[PromptMessage]):
    config = service.config.bus.model_copy(
        update={"url": f"memory://{uuid.uuid4().hex}", "block_ms": 20}
    )
    service.config = service.config.model_copy(update={"bus": config})
    bus = make_bus(config)
    await bus.ensure_group(config.rollouts_stream, "check")
    for p in prompts:
        await bus.publish(config.prompts_stream, p)
    worker = rw.RolloutWorker(service, bus, scorer)  # type: ignore[arg-type]
    task = asyncio.create_task(worker.run())
    groups: list[ScoredGroup] = []
    async with asyncio.timeout(10):
        while len(groups) + len(await bus.dead_letters()) < len(prompts):
            for d in await bus.read(config.rollouts_stream, "check", "c", 10, 20):
                groups.append(d.message)
    worker.stop()
    await task
    await worker.close()
    stats = await bus.stats(config.prompts_stream)
    return groups, stats.group(INFERENCE_GROUP), bus


@run
async def test_worker_publishes_one_scored_group_per_prompt_then_acks(fake_params: None) -> None:
    service = FakeService()
    groups, stats, _ = await _run_worker(service, FakeScorer(), [_prompt(i, 4) for i in range(7)])
    assert sorted(g.group_id for g in groups) == [f"p{i}" for i in range(7)]
    assert all(len(g.rollouts) == 4 and g.policy_version == 5 for g in groups)
    assert all(g.replica == "replica-test" and g.rewards == [1.0] * 4 for g in groups)
    assert stats is not None and stats.pending == 0
    assert service.metrics.groups._value.get() == 7
    # Where each group's time went: one observation per group and phase.
    for phase in ("weights_wait", "generate", "decode", "score", "publish"):
        sample = service.metrics.registry.get_sample_value(
            "mapo_inference_rollout_seconds_count", {"phase": phase}
        )
        assert sample == 7, phase
    generated = service.metrics.registry.get_sample_value(
        "mapo_inference_rollout_seconds_sum", {"phase": "generate"}
    )
    assert generated == pytest.approx(7 * 0.01)  # FakeService's engine time per request


@run
async def test_worker_retries_an_unavailable_reward_service(fake_params: None) -> None:
    scorer = FakeScorer(failures=3)
    groups, stats, _ = await _run_worker(FakeService(), scorer, [_prompt(0)])
    assert [g.group_id for g in groups] == ["p0"] and scorer.calls == 4
    assert stats is not None and stats.pending == 0


@run
async def test_worker_dead_letters_prompts_the_model_cannot_run(fake_params: None) -> None:
    prompts = [_prompt(0, text=""), _prompt(1, text="9" * 80), _prompt(2)]
    groups, stats, bus = await _run_worker(FakeService(max_model_len=64), FakeScorer(), prompts)
    assert [g.group_id for g in groups] == ["p2"]
    dead = await bus.dead_letters()
    assert sorted(d.message_id for d in dead) == ["p0", "p1"]
    assert all("inference:" in d.reason for d in dead)
    assert stats is not None and stats.pending == 0


@run
async def test_worker_gives_prompts_back_when_the_engine_fails(fake_params: None) -> None:
    service = FakeService()
    calls = {"n": 0}
    original = service.generate

    async def flaky(prompts: Sequence[Sequence[int]], params: Any) -> Generation:
        calls["n"] += 1
        if calls["n"] == 1:
            raise EngineUnavailable("restarting")
        return await original(prompts, params)

    service.generate = flaky  # type: ignore[method-assign]
    groups, _, _ = await _run_worker(service, FakeScorer(), [_prompt(0)])
    assert [g.group_id for g in groups] == ["p0"] and calls["n"] == 2


def test_prompt_rejected_is_a_value_error() -> None:
    assert issubclass(PromptRejected, ValueError)
