"""Checkpoints when things go wrong: a disk that fills up while one is written, and a newest
checkpoint that is damaged.

A save that cannot be written fails with a CheckpointError naming the directory and the disk,
leaves nothing of itself behind, and leaves the previous checkpoint whole and loadable; the
trainer then stops, and a run resumed with ``--resume`` goes on from that checkpoint and gets
the unacknowledged groups again. A damaged newest checkpoint (truncated, a byte flipped, a file
or ``state.json`` missing or garbled) is skipped: ``latest_checkpoint`` returns the one before,
and a resumed trainer starts from it.

The full disk is a small tmpfs where this runs as root (CI does), and a file-size limit
(RLIMIT_FSIZE, in a child process) everywhere.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from services.core.config import RunConfig
from services.trainer import checkpoint as ckpt
from services.trainer.loop import TrainerRun
from services.trainer.metrics import read_jsonl, surviving_lineage
from services.trainer.model import Learner
from services.transport import make_bus
from tests.fixtures.synthetic import fake_inference
from tests.fixtures.trainer import sampled_groups, trainer_config

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helpers


@dataclass
class SmallDisk:
    """A tmpfs mounted for one test."""

    path: Path

    def resize(self, size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True)

    def free(self) -> int:
        return shutil.disk_usage(self.path).free


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[str], SmallDisk]]:
    """``small_disk("2m")``: a tmpfs of that size, unmounted when the test ends; the test is
    skipped where no tmpfs can be mounted (not root, or no mount permission)."""
    mounted: list[Path] = []

    def mount(size: str) -> SmallDisk:
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a tmpfs needs root (the RLIMIT_FSIZE test runs anywhere)")
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(where)
        return SmallDisk(where)

    try:
        yield mount
    finally:
        for where in reversed(mounted):
            if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(where)], check=False)


def fill(disk: SmallDisk, leave: int) -> Path:
    """Take all of ``disk`` but ``leave`` bytes with a file of real (not sparse) data."""
    filler = disk.path / "filler"
    with filler.open("wb") as fh:
        fh.write(b"\0" * max(0, disk.free() - leave))
    return filler


def params(p: Learner) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in p.model.named_parameters()}


def trained(config: RunConfig, seed: int = 0) -> Learner:
    """A learner after one step, so its optimiser has moments to save."""
    p = Learner.build(config)
    p.train(sampled_groups(p.model, p.tokenizer, 2, seed=seed, prefix=f"s{seed}"), {}, frozenset())
    return p


def assert_only(run_dir: Path, steps: list[int]) -> None:
    """The checkpoint directory holds these steps, whole, and nothing else: no temporary or
    partial directory, LATEST naming the newest."""
    root = ckpt.checkpoint_root(run_dir)
    names = sorted(p.name for p in root.iterdir())
    assert names == sorted(["LATEST", *(ckpt.step_dir(run_dir, s).name for s in steps)]), names
    assert (root / "LATEST").read_text().strip() == str(steps[-1])
    assert ckpt.list_checkpoints(run_dir) == steps
    assert ckpt.latest_checkpoint(run_dir) == ckpt.step_dir(run_dir, steps[-1])
    for s in steps:
        ckpt.read_state(ckpt.step_dir(run_dir, s))  # every file matches its sha256


def assert_loads(config: RunConfig, path: Path, state: dict[str, Any], weights: dict[str, Any]):
    q = Learner.build(config, weights_from=ckpt.weights_dir(path))
    assert q.restore(path) == state
    for name, value in params(q).items():
        assert torch.equal(value, weights[name]), name


# ----------------------------------------------------------------------------- a full disk


def test_a_save_onto_a_full_disk_fails_clearly_and_keeps_the_previous_checkpoint(
    tiny_model_dir: Path, small_disk: Callable[[str], SmallDisk]
) -> None:
    disk = small_disk("8m")
    run = disk.path / "run"
    config = trainer_config(tiny_model_dir, run)
    p = trained(config)
    first = p.save(run, 1, {"note": "one"})
    at_first = params(p)
    size = sum(f.stat().st_size for f in first.rglob("*") if f.is_file())
    filler = fill(disk, leave=size // 2)  # half a checkpoint's room
    p.train(sampled_groups(p.model, p.tokenizer, 2, seed=1, prefix="b"), {}, frozenset())

    with pytest.raises(ckpt.CheckpointError) as caught:
        p.save(run, 2, {"note": "two"})
    message = str(caught.value)
    for part in [
        "could not write the checkpoint of step 2",
        f"into {ckpt.checkpoint_root(run)}",
        "the disk is full",
        f"the disk mounted at {disk.path} (tmpfs, tmpfs)",
        "MiB free of 8.0 MiB",
        "step_00000001, is untouched and --resume goes on from it",
    ]:
        assert part in message, message
    assert_only(run, [1])
    assert_loads(config, first, {"note": "one"}, at_first)

    # With room again, the same step is saved.
    filler.unlink()
    at_second = params(p)
    assert p.save(run, 2, {"note": "two"}) == ckpt.step_dir(run, 2)
    assert_only(run, [1, 2])
    assert_loads(config, ckpt.step_dir(run, 2), {"note": "two"}, at_second)


WRITER = r"""
import json, resource, signal, sys
from services.core.config import build_config
from services.trainer import checkpoint as ckpt
from services.trainer.model import Learner
model_dir, run_dir = sys.argv[1:3]
policy = Learner.build(build_config({"model": {"path": model_dir}}, environ={}))
policy.save(run_dir, 1, {"note": "one"})
# Past the limit a write fails with EFBIG (instead of the signal killing the process).
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    policy.save(run_dir, 2, {"note": "two"})
except ckpt.CheckpointError as exc:
    print(json.dumps({"error": str(exc)}))
else:
    print(json.dumps({"error": None}))
"""


@pytest.mark.slow  # a fresh process imports transformers: about 20 s on 2 busy cores
def test_a_save_past_a_file_size_limit_fails_clearly_and_keeps_the_previous_checkpoint(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAPO__")}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", WRITER, str(tiny_model_dir), str(run)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    message = json.loads(done.stdout.strip().splitlines()[-1])["error"]
    assert message is not None, "the save went through despite the limit"
    for part in [
        f"could not write the checkpoint of step 2 into {ckpt.checkpoint_root(run)}",
        "a file size limit was reached",
        "the disk mounted at",
        "step_00000001, is untouched",
    ]:
        assert part in message, message
    assert_only(run, [1])


async def with_fake_inference(config: RunConfig, body: Callable[[], Any]) -> Any:
    """Run ``body()`` (a coroutine function) while a fake inference side answers prompts on the
    config's (in-memory) bus."""
    bus = make_bus(config.bus)
    stop = asyncio.Event()
    fake = asyncio.create_task(fake_inference(bus, config.bus, stop, vocab_size=99))
    try:
        return await body()
    finally:
        stop.set()
        await fake
        await bus.close()


def lineage_groups(run: Path) -> tuple[list[int], list[str], list[dict[str, Any]]]:
    records = read_jsonl(run / "applied.jsonl")
    lineage = surviving_lineage(records)
    applied = [i for rec in lineage.values() for i in rec["group_ids"]]
    return list(lineage), applied, records


def test_the_trainer_stops_on_a_full_disk_and_resumes_from_the_previous_checkpoint(
    tiny_model_dir: Path,
    tmp_path: Path,
    small_disk: Callable[[str], SmallDisk],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Checkpoint 0 (no optimiser moments yet) fits, checkpoint 2 does not: the trainer stops
    with the error; resumed on a larger disk it goes on from step 0, and the groups it applied
    in steps 1-2, never acknowledged, come again and are applied once."""
    disk = small_disk("1600k")
    run = disk.path / "run"
    per_step = 4
    config = trainer_config(
        tiny_model_dir,
        run,
        trainer={"steps": 4, "checkpoint_every": 2, "prompts_per_step": per_step},
        bus={"url": f"memory://{tmp_path.name}", "block_ms": 50},
        weights={"store": str(tmp_path / "weights")},  # only the run directory is small
    )
    caplog.set_level(logging.ERROR, logger="services.trainer.loop")

    async def main() -> None:
        first = await asyncio.to_thread(TrainerRun.open, config, resume=False)
        with pytest.raises(ckpt.CheckpointError, match="the disk is full"):
            async with asyncio.timeout(120):
                await first.run()
        assert first.state.step == 2 and first.last_checkpoint == 0
        assert_only(run, [0])
        disk.resize("64m")
        second = await asyncio.to_thread(TrainerRun.open, config, resume=True)
        assert second.resumed_from == ckpt.step_dir(run, 0)
        async with asyncio.timeout(120):
            assert await second.run() == 0

    asyncio.run(with_fake_inference(config, main))

    [stopping] = [r.getMessage() for r in caplog.records if "trainer stopping" in r.getMessage()]
    assert "checkpoint of step 2 failed" in stopping
    assert "applied since step 0 were not acknowledged and will be redelivered" in stopping
    assert "--resume" in stopping and "the disk is full" in stopping

    steps, applied, records = lineage_groups(run)
    assert steps == [1, 2, 3, 4]
    assert len(applied) == len(set(applied)) == 4 * per_step
    starts = [r for r in records if r.get("event") == "start"]
    assert [s["from_step"] for s in starts] == [0, 0]
    before_the_failure = {
        i
        for r in records
        if r.get("session") == starts[0]["session"]
        for i in r.get("group_ids", [])
    }
    assert len(before_the_failure) == 2 * per_step and before_the_failure <= set(applied)
    final = ckpt.read_state(ckpt.latest_checkpoint(run))
    assert final["step"] == 4 and set(final["state"]["ledger"]["ids"]) == set(applied)


# ----------------------------------------------------------------------------- a damaged one


def damage(path: Path, how: str) -> None:
    """Damage the checkpoint at ``path`` the way ``how`` says."""
    model = path / ckpt.MODEL_DIR / "model.safetensors"
    if how == "truncated":
        data = model.read_bytes()
        model.write_bytes(data[: len(data) // 2])
    elif how == "flipped byte":
        data = bytearray((path / ckpt.OPTIMIZER_FILE).read_bytes())
        data[len(data) // 2] ^= 0x01
        (path / ckpt.OPTIMIZER_FILE).write_bytes(bytes(data))
    elif how == "missing file":
        (path / ckpt.RNG_FILE).unlink()
    elif how == "missing state.json":
        (path / ckpt.STATE_FILE).unlink()
    elif how == "garbled state.json":
        (path / ckpt.STATE_FILE).write_text('{"format": 1, "step": ')
    else:
        raise ValueError(how)


DAMAGES = ["truncated", "flipped byte", "missing file", "missing state.json", "garbled state.json"]


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(
    tiny_model_dir: Path, tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    config = trainer_config(tiny_model_dir, run)
    p = trained(config)
    first = p.save(run, 1, {"note": "one"})
    at_first = params(p)
    p.train(sampled_groups(p.model, p.tokenizer, 2, seed=1, prefix="b"), {}, frozenset())
    newest = p.save(run, 2, {"note": "two"})
    damage(newest, how)

    with caplog.at_level(logging.WARNING, logger="services.trainer.checkpoint"):
        assert ckpt.latest_checkpoint(run) == first
    if how != "missing state.json":  # without its state.json a directory is not a checkpoint
        assert f"skipping checkpoint: {newest}" in caplog.text
    assert_loads(config, first, {"note": "one"}, at_first)

    # The damaged one is in the way of the next save of its step, which replaces it.
    at_second = params(p)
    assert p.save(run, 2, {"note": "again"}) == newest
    assert_only(run, [1, 2])
    assert_loads(config, newest, {"note": "again"}, at_second)


def test_a_resumed_trainer_starts_from_the_checkpoint_before_a_damaged_newest(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    per_step = 4
    bus = {"url": f"memory://{tmp_path.name}", "block_ms": 50}
    common = {"checkpoint_every": 2, "prompts_per_step": per_step}
    first = trainer_config(tiny_model_dir, tmp_path, trainer={"steps": 4, **common}, bus=bus)
    more = trainer_config(tiny_model_dir, tmp_path, trainer={"steps": 6, **common}, bus=bus)

    async def main() -> None:
        run = await asyncio.to_thread(TrainerRun.open, first, resume=False)
        async with asyncio.timeout(120):
            assert await run.run() == 0
        assert ckpt.list_checkpoints(tmp_path) == [2, 4]
        damage(ckpt.step_dir(tmp_path, 4), "flipped byte")

        resumed = await asyncio.to_thread(TrainerRun.open, more, resume=True)
        # It starts from step 2: its step, its weights, its optimiser moments.
        assert resumed.resumed_from == ckpt.step_dir(tmp_path, 2)
        assert resumed.state.step == 2 and resumed.last_checkpoint == 2
        saved = load_file(str(ckpt.step_dir(tmp_path, 2) / ckpt.MODEL_DIR / "model.safetensors"))
        live = resumed.learner.model.state_dict()
        for name, value in saved.items():
            assert torch.equal(live[name].to(value.dtype), value), name
        moments = load_file(str(ckpt.step_dir(tmp_path, 2) / ckpt.OPTIMIZER_FILE))
        state = resumed.learner.optimizer.state_dict()["state"]
        assert moments and len(state) == len({k.rpartition("::")[0] for k in moments})
        async with asyncio.timeout(120):
            assert await resumed.run() == 0

    asyncio.run(with_fake_inference(first, main))

    steps, applied, records = lineage_groups(tmp_path)
    assert [r["from_step"] for r in records if r.get("event") == "start"] == [0, 2]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert len(applied) == len(set(applied)) == 6 * per_step
    # Step 4 was taken again and checkpointed whole over the damaged one.
    assert_only(tmp_path, [4, 6])
    final = ckpt.read_state(ckpt.step_dir(tmp_path, 6))
    assert final["step"] == 6 and set(final["state"]["ledger"]["ids"]) == set(applied)
