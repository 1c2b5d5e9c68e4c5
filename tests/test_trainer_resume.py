"""Crash safety: ``kill -9`` of the trainer, then ``--resume``, applies every group exactly once;
checkpoints and weight versions are never visible half-written, even to a process killed while
writing them."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from services.core.config import RunConfig
from services.core.schemas import ScoredGroup, WeightAnnouncement, decode
from services.stack.processes import Child
from services.trainer import checkpoint as ckpt
from services.trainer.metrics import read_jsonl, surviving_lineage
from services.transport import TRAINER_GROUP, make_bus
from services.transport.streams import id_key
from services.weights.store import (
    WeightStoreError,
    list_versions,
    verify_version,
    version_dir,
)
from tests.fixtures.redis import RedisServer, bus_config
from tests.fixtures.synthetic import fake_inference
from tests.fixtures.trainer import trainer_config

REPO = Path(__file__).resolve().parents[1]


def write_toml(path: Path, config: RunConfig) -> Path:
    """The config as a TOML run file (only scalars and flat sections: enough for these)."""
    lines = []
    for section, values in config.model_dump().items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if value is None:
                continue
            if isinstance(value, str):
                lines.append(f'{key} = "{value}"')
            elif isinstance(value, bool):
                lines.append(f"{key} = {'true' if value else 'false'}")
            elif isinstance(value, (list, tuple)):
                lines.append(f"{key} = [{', '.join(repr(v) for v in value)}]")
            else:
                lines.append(f"{key} = {value!r}")
    path.write_text("\n".join(lines) + "\n")
    return path


def trainer_process(config_file: Path, *extra: str) -> Child:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAPO__")}
    env["OMP_NUM_THREADS"] = "1"  # tiny model on shared cores: see tests/fixtures/trainer.py
    command = [sys.executable, "-m", "services.cli", "trainer", "run"]
    command += ["--config", str(config_file), *extra]
    log = config_file.parent / f"trainer{len(extra)}.log"
    return Child.start("trainer", command, log_path=log, env=env, cwd=REPO)


class FakeInference:
    """The inference side in a thread of its own: prompts in, random groups out, slowly enough
    that the trainer takes a few steps a second."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.stop_event: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.answered = 0

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            self.stop_event = asyncio.Event()
            bus = make_bus(self.config.bus)
            try:
                self.answered = await fake_inference(
                    bus, self.config.bus, self.stop_event, vocab_size=99, delay_s=0.15
                )
            finally:
                await bus.close()

        self.loop.run_until_complete(main())

    def __enter__(self) -> FakeInference:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        while self.stop_event is None:
            time.sleep(0.01)
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(10)


def wait_for_step(run_dir: Path, trainer: Child, step: int, timeout: float) -> int:
    """Poll the step log until it shows ``step`` or more; return the newest step seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert trainer.alive(), trainer.tail(60)
        steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")]
        if steps and steps[-1] >= step:
            return int(steps[-1])
        time.sleep(0.01)
    raise AssertionError(f"no step {step} within {timeout} s")


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_kill_9_then_resume_applies_every_group_exactly_once(
    redis_server: RedisServer, tiny_model_dir: Path, tmp_path: Path
) -> None:
    steps, per_step, every = 12, 4, 5
    bus = bus_config(redis_server.url).model_dump()
    bus["claim_idle_ms"] = 60_000  # only the restart's own recovery may take entries back
    config = trainer_config(
        tiny_model_dir,
        tmp_path,
        trainer={"steps": steps, "prompts_per_step": per_step, "checkpoint_every": every},
        bus=bus,
    )
    config_file = write_toml(tmp_path / "run.toml", config)

    with FakeInference(config):
        first = trainer_process(config_file)
        try:
            # Past the first checkpoint (step 5) and before the second (step 10).
            killed_at = wait_for_step(tmp_path, first, every + 2, timeout=90)
        finally:
            first.kill()
        assert killed_at < steps
        second = trainer_process(config_file, "--resume")
        try:
            assert second.wait(120) == 0, second.tail(60)
        finally:
            second.kill()

    # The surviving lineage took every step once, and applied each group once.
    records = read_jsonl(tmp_path / "applied.jsonl")
    starts = [r for r in records if r.get("event") == "start"]
    assert len(starts) == 2 and starts[0]["from_step"] == 0
    resumed_from = starts[1]["from_step"]
    assert resumed_from in (every, 2 * every) and resumed_from <= killed_at
    lineage = surviving_lineage(records)
    assert list(lineage) == list(range(1, steps + 1))
    applied = [i for rec in lineage.values() for i in rec["group_ids"]]
    assert len(applied) == len(set(applied)) == steps * per_step

    # Groups the killed process applied after its last checkpoint were applied again (none
    # lost), after the restart.
    first_session = starts[0]["session"]
    lost_with_the_process = {
        i
        for r in records
        if r.get("session") == first_session and r.get("step", 0) > resumed_from
        for i in r["group_ids"]
    }
    assert lost_with_the_process, "the kill should land between two checkpoints"
    assert lost_with_the_process <= set(applied)

    # The final checkpoint's ledger is exactly the lineage's groups; the status file agrees.
    final = ckpt.read_state(ckpt.latest_checkpoint(tmp_path))
    assert final["step"] == steps
    assert set(final["state"]["ledger"]["ids"]) == set(applied)
    assert final["state"]["counters"]["groups_applied"] == steps * per_step

    # Redis agrees: everything acknowledged was applied (or recognised as a repeat); nothing
    # applied is still pending.
    r = redis.Redis.from_url(redis_server.url)
    stream = config.bus.rollouts_stream
    pending = {
        (e["message_id"].decode() if isinstance(e["message_id"], bytes) else e["message_id"])
        for e in r.xpending_range(stream, TRAINER_GROUP, "-", "+", 10_000)
    }
    entries = r.xrange(stream, "-", "+")
    groups: dict[str, str] = {}
    for entry_id, fields in entries:
        g = decode(fields[b"p"])
        assert isinstance(g, ScoredGroup)
        groups[entry_id.decode()] = g.group_id
    info = next(
        g for g in r.xinfo_groups(stream) if g["name"] in (TRAINER_GROUP, TRAINER_GROUP.encode())
    )
    last = info["last-delivered-id"]
    last_delivered = id_key(last.decode() if isinstance(last, bytes) else last)
    delivered = {eid for eid in groups if id_key(eid) <= last_delivered}
    acked = {groups[eid] for eid in delivered if eid not in pending}
    still_pending = {groups[eid] for eid in pending if eid in groups}
    assert acked <= set(applied)
    assert not still_pending & set(applied)

    # Weight versions only grew: the restart published above what the killed run reached.
    announced = [decode(f[b"p"]) for _, f in r.xrange(config.bus.weights_stream, "-", "+")]
    versions = [a.version for a in announced if isinstance(a, WeightAnnouncement)]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)
    r.close()


# ----------------------------------------------------------------------------- half-written

WRITER = r"""
import sys, itertools, torch
from services.core.config import build_config
from services.trainer.model import Learner
from services.weights.publish import base_tensor_spec, serving_tensors
from services.trainer.checkpoint import list_checkpoints
from services.weights.store import latest_version, write_version
model_dir, run_dir, store = sys.argv[1:4]
policy = Learner.build(build_config({"model": {"path": model_dir}}, environ={}))
spec = base_tensor_spec(model_dir)
start = max([latest_version(store) or 0, *list_checkpoints(run_dir)]) + 1
for step in itertools.count(start):
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(0.01)
    tensors = serving_tensors(policy.model, spec, torch.float32)
    write_version(store, step, tensors, step=step, keep=2)
    policy.save(run_dir, step, {"step": step})
    print(step, flush=True)
"""


def check_store(store: Path) -> list[int]:
    """Every version a reader can see verifies (one pruned meanwhile is gone, not partial)."""
    seen = list_versions(store)
    for v in seen:
        try:
            verify_version(version_dir(store, v))
        except (WeightStoreError, FileNotFoundError):
            if version_dir(store, v).exists():
                raise
    return seen


def check_checkpoints(run_dir: Path) -> list[int]:
    seen = ckpt.list_checkpoints(run_dir)
    for step in seen:
        try:
            ckpt.read_state(ckpt.step_dir(run_dir, step))
        except ckpt.CheckpointError:
            if ckpt.step_dir(run_dir, step).exists():
                raise
    return seen


@pytest.fixture
def small_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """4M parameters: a write takes long enough (tens of ms) for kills to land inside one."""
    from services.models.tiny import build_model

    yield build_model(tmp_path_factory.mktemp("small") / "small", "small")


@pytest.mark.timeout(120)
def test_checkpoint_and_weights_never_half_written(small_model_dir: Path, tmp_path: Path) -> None:
    store, run_dir = tmp_path / "weights", tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAPO__")}
    env["OMP_NUM_THREADS"] = "1"
    readers_saw: set[int] = set()
    failures: list[str] = []
    kills = 0
    for round_ in range(3):
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(small_model_dir), str(run_dir), str(store)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert writer.stdout is not None
        writer.stdout.readline()  # one full round written: the writer is past its start-up
        # Read while it writes: nothing visible may fail verification.
        deadline = time.monotonic() + 1.0 + 0.37 * round_
        while time.monotonic() < deadline:
            try:
                readers_saw.update(check_store(store))
                check_checkpoints(run_dir)
            except (WeightStoreError, ckpt.CheckpointError, FileNotFoundError) as exc:
                failures.append(str(exc))
        writer.send_signal(signal.SIGKILL)
        writer.wait(10)
        kills += 1
        # After the kill: whatever is visible is whole.
        check_store(store)
        assert check_checkpoints(run_dir)
        assert ckpt.latest_checkpoint(run_dir) is not None
    assert not failures, failures[:5]
    assert kills == 3 and len(readers_saw) >= 3
    # Temporary directories of killed writers are invisible to readers and pruned later.
    leftovers = list((run_dir / ckpt.CHECKPOINTS).glob(".tmp-*")) + list(store.glob(".tmp-*"))
    print(f"kills left {len(leftovers)} partial writes behind")
    ckpt.prune(run_dir, ckpt.KEEP)
    assert not list((run_dir / ckpt.CHECKPOINTS).glob(".tmp-*"))
