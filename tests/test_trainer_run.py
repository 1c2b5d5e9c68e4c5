"""The trainer as a service on an in-memory bus: prompts out, groups in, weights published,
checkpoints, logs, and a resume that neither loses nor repeats a group."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from services.core.config import RunConfig
from services.core.schemas import WeightAnnouncement
from services.trainer import checkpoint as ckpt
from services.trainer.loop import RunDirError, TrainerRun
from services.trainer.metrics import read_jsonl, surviving_lineage
from services.transport import make_bus
from services.weights.fetch import fetch_version
from services.weights.publish import WeightPublisher, base_tensor_spec
from services.weights.store import list_versions, verify_version
from tests.fixtures.redis import free_port
from tests.fixtures.synthetic import fake_inference
from tests.fixtures.trainer import trainer_config

pytestmark = pytest.mark.usefixtures("one_thread")

STEP_FIELDS = [
    "step",
    "version",
    "reward_mean",
    "accuracy",
    "p_mean",
    "lambda_mean",
    "zero_variance_share",
    "adv_mean",
    "adv_std",
    "adv_min",
    "adv_max",
    "z_part_abs_mean",
    "apd_part_abs_mean",
    "loss",
    "clip_frac_low",
    "clip_frac_high",
    "dual_clip_frac",
    "kl",
    "entropy",
    "grad_norm",
    "lr",
    "staleness_mean",
    "stale_dropped",
    "stale_corrected",
    "logprob_mismatch",
    "wait_s",
    "compute_s",
    "collate_s",
    "old_s",
    "ref_s",
    "forward_s",
    "backward_s",
    "optimizer_s",
    "publish_s",
    "eval_s",
    "checkpoint_s",
    "step_s",
    "tokens_per_s",
    "groups_applied",
]


def run_trainer(
    *phases: tuple[RunConfig, bool],
    version_of: Callable[[int, int], int] | None = None,
) -> list[WeightAnnouncement]:
    """Run the trainer once per ``(config, resume)`` phase, one after the other, against a
    fake inference side on the same in-memory bus; return every weight announcement."""

    async def main() -> list[WeightAnnouncement]:
        config = phases[0][0]
        bus = make_bus(config.bus)
        stop = asyncio.Event()
        fake = asyncio.create_task(
            fake_inference(bus, config.bus, stop, vocab_size=99, version_of=version_of)
        )
        try:
            for cfg, resume in phases:
                trainer = await asyncio.to_thread(TrainerRun.open, cfg, resume=resume)
                async with asyncio.timeout(120):
                    assert await trainer.run() == 0
            follower = bus.follow(config.bus.weights_stream, "0", expect=WeightAnnouncement)
            return [d.message for d in await follower.poll(1000, 0)]
        finally:
            stop.set()
            await fake
            await bus.close()

    return asyncio.run(main())


def test_run_publishes_checkpoints_and_logs_every_step(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    config = trainer_config(
        tiny_model_dir,
        tmp_path,
        trainer={"steps": 3, "eval_every": 3},
        task={"dataset": "builtin:arithmetic"},
        bus={"url": f"memory://{tmp_path.name}", "block_ms": 50},
    )
    announced = run_trainer((config, False))

    # Logs: one line per step with every documented field; the status file says finished.
    steps = read_jsonl(tmp_path / "metrics.jsonl")
    assert [s["step"] for s in steps] == [1, 2, 3]
    for s in steps:
        assert not [f for f in STEP_FIELDS if f not in s]
    assert 0.0 <= steps[-1]["eval_accuracy"] <= 1.0 and "eval_accuracy" not in steps[0]
    # Where each step's time went: the parts add up to no more than the step, and the phases
    # that ran only on some steps (evaluation every 3, checkpoint every 2) say so.
    for s in steps:
        parts = ("wait_s", "compute_s", "publish_s", "eval_s", "checkpoint_s")
        assert all(s[k] >= 0.0 for k in parts) and s["step_s"] >= sum(s[k] for k in parts)
        compute = ("collate_s", "old_s", "ref_s", "forward_s", "backward_s", "optimizer_s")
        assert s["compute_s"] >= sum(s[k] for k in compute)
        assert s["forward_s"] > 0 and s["backward_s"] > 0 and s["old_s"] == 0.0
    assert [s["eval_s"] > 0 for s in steps] == [False, False, True]
    assert [s["checkpoint_s"] > 0 for s in steps] == [False, True, False]
    assert steps[-1]["groups_applied"] == 12
    status = json.loads((tmp_path / "trainer_state.json").read_text())
    assert status["status"] == "finished" and status["step"] == 3 and status["version"] == 3

    # Weights: versions 0..3 announced in order, the newest 3 kept, each verifiable and holding
    # exactly the base checkpoint's tensors (tied embeddings: no lm_head.weight).
    assert [a.version for a in announced] == [0, 1, 2, 3]
    assert list_versions(tmp_path / "weights") == [1, 2, 3]
    newest = announced[-1]
    manifest = verify_version(newest.location, newest.manifest_sha256)
    spec = base_tensor_spec(tiny_model_dir)
    assert {t.name: t.shape for t in manifest.tensors} == spec
    assert "lm_head.weight" not in spec
    assert {t.dtype for t in manifest.tensors} == {"float32"}

    # Checkpoints: the last two, each complete; the ledger holds exactly the applied ids.
    assert ckpt.list_checkpoints(tmp_path) == [2, 3]
    state = ckpt.read_state(ckpt.latest_checkpoint(tmp_path))["state"]
    lineage = surviving_lineage(read_jsonl(tmp_path / "applied.jsonl"))
    applied = [i for rec in lineage.values() for i in rec["group_ids"]]
    assert len(applied) == len(set(applied)) == 12
    assert set(state["ledger"]["ids"]) == set(applied)
    assert all(i.startswith(state["run_id"] + ":") for i in applied)


def test_fresh_run_refuses_a_run_dir_with_checkpoints(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = trainer_config(
        tiny_model_dir,
        tmp_path,
        trainer={"steps": 1},
        bus={"url": f"memory://{tmp_path.name}", "block_ms": 50},
    )
    run_trainer((config, False))
    with pytest.raises(RunDirError, match="--resume"):
        TrainerRun.open(config, resume=False)


def test_resume_continues_without_losing_or_repeating_a_group(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    bus = {"url": f"memory://{tmp_path.name}", "block_ms": 50}
    first = trainer_config(tiny_model_dir, tmp_path, trainer={"steps": 2}, bus=bus)
    more = trainer_config(tiny_model_dir, tmp_path, trainer={"steps": 5}, bus=bus)
    announced = run_trainer((first, False), (more, True))

    lineage = surviving_lineage(read_jsonl(tmp_path / "applied.jsonl"))
    assert list(lineage) == [1, 2, 3, 4, 5]
    applied = [i for rec in lineage.values() for i in rec["group_ids"]]
    assert len(applied) == len(set(applied)) == 20
    # Versions only grow: the resumed run re-publishes its restored model as version 3.
    assert [a.version for a in announced] == [0, 1, 2, 3, 4, 5, 6]
    assert [a.step for a in announced] == [0, 1, 2, 2, 3, 4, 5]


def test_weights_served_over_http_for_replicas_without_the_volume(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from services.trainer.model import Learner

    config = trainer_config(
        tiny_model_dir,
        tmp_path,
        trainer={"weights_port": free_port()},
        bus={"url": f"memory://{tmp_path.name}"},
    )
    policy = Learner.build(config)

    async def publish_and_fetch() -> Path:
        bus = make_bus(config.bus)
        publisher = WeightPublisher(
            config, bus, base_tensor_spec(tiny_model_dir), policy.serve_dtype
        )
        try:
            location, sha = publisher.write(policy.model, 0, 0)
            await publisher.announce(0, location, sha, 0)
            latest = await bus.latest(config.bus.weights_stream, expect=WeightAnnouncement)
            assert latest is not None
            ann = latest.message
            assert ann.location == f"http://127.0.0.1:{config.trainer.weights_port}"
            return await asyncio.to_thread(
                fetch_version, ann.location, ann.version, tmp_path / "cache", ann.manifest_sha256
            )
        finally:
            publisher.close()
            await bus.close()

    fetched = asyncio.run(publish_and_fetch())
    from safetensors.torch import load_file

    tensors: dict[str, Any] = load_file(str(fetched / "model.safetensors"))
    state = policy.model.state_dict()
    for name, value in tensors.items():
        assert torch.equal(value, state[name])


def test_stop_request_checkpoints_the_last_step_and_resume_goes_on(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """SIGTERM (here: the event its handler sets) ends the run after the step in progress,
    with a checkpoint of that step, so nothing has to be redone."""
    bus = {"url": f"memory://{tmp_path.name}", "block_ms": 50}
    config = trainer_config(
        tiny_model_dir, tmp_path, trainer={"steps": 50, "checkpoint_every": 100}, bus=bus
    )

    async def main() -> int:
        bus_ = make_bus(config.bus)
        stop = asyncio.Event()
        fake = asyncio.create_task(fake_inference(bus_, config.bus, stop, vocab_size=99))
        trainer = await asyncio.to_thread(TrainerRun.open, config, resume=False)

        async def stop_after_two_steps() -> None:
            while trainer.state.step < 2:
                await asyncio.sleep(0.01)
            trainer.stopping.set()

        stopper = asyncio.create_task(stop_after_two_steps())
        try:
            async with asyncio.timeout(60):
                assert await trainer.run() == 0
        finally:
            stop.set()
            await fake
            await stopper
            await bus_.close()
        return trainer.state.step

    stopped_at = asyncio.run(main())
    status = json.loads((tmp_path / "trainer_state.json").read_text())
    assert status["status"] == "stopped" and status["step"] == stopped_at >= 2
    assert ckpt.list_checkpoints(tmp_path)[-1] == stopped_at


def test_every_documented_trainer_metric_is_exported() -> None:
    from prometheus_client import generate_latest

    from services.trainer.metrics import TrainerMetrics

    doc = (Path(__file__).resolve().parents[1] / "docs" / "metrics.md").read_text()
    section = doc.split("## Trainer", 1)[1].split("\n## ", 1)[0]
    documented = {
        line.split("`")[1] for line in section.splitlines() if line.startswith("| `mapo_")
    }
    metrics = TrainerMetrics()
    record = {"step": 1, "version": 1, "p_mean": 0.5, "lambda_mean": 0.0}
    metrics.record_step(record, [0.5], [0.0], [1])
    exposition = generate_latest(metrics.registry).decode()
    assert 'mapo_trainer_phase_seconds{phase="forward"}' in exposition
    exported = {
        line.split(" ")[2] for line in exposition.splitlines() if line.startswith("# TYPE ")
    }
    # Counters are exposed as NAME_total; the docs list them that way.
    exported |= {f"{n}_total" for n in exported}
    assert documented and documented <= exported, sorted(documented - exported)
