"""The trainer on several ranks (torchrun, gloo, FSDP2 on the CPU), in real processes.

- Two ranks take the same step as one on the same batch, with mini-batches (two AdamW updates
  after a separate proximal pass) and with the fused pass (one update). Loss, gradient norm and
  every other metric agree within rtol 1e-4 (atol 1e-6); the parameter update (new - initial)
  agrees within 1e-4 relative (L2 over every parameter) and every parameter within 1e-5, 1% of
  one AdamW step at lr 1e-3. Only the order of float32 sums differs, and AdamW's first steps
  (about lr * sign(gradient)) magnify that for gradients near zero. Measured: 8e-6 relative and
  4e-6 at most with two updates, 1e-7 and 7e-9 with one. The batch has an odd number of rows
  (an unscored rollout is left out) and one row per micro-batch, so some micro-batches of rank
  1 are stand-ins. The fused step recomputes activations (``trainer.activation_checkpointing``),
  which one process checks against keeping them.
- Checkpoints move between rank counts: a sharded checkpoint written by two ranks loads in one
  process with the same parameters bit for bit, and a single process's checkpoint loaded by two
  ranks and written again as shards comes back identical (parameters and AdamW moments).
- A rank SIGKILLed in the middle of a run against real Redis: torchrun restarts every rank, the
  run resumes from its checkpoint and finishes, and every group is applied exactly once in the
  surviving lineage.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from services.core.config import RunConfig, build_config
from services.core.schemas import ScoredGroup, encode
from services.stack.processes import Child
from services.trainer import checkpoint as ckpt
from services.trainer.main import torchrun_command
from services.trainer.metrics import read_jsonl, surviving_lineage
from tests.fixtures.redis import RedisServer, bus_config
from tests.fixtures.trainer import sampled_groups, trainer_config
from tests.test_trainer_resume import FakeInference, wait_for_step, write_toml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
METRIC_RTOL, METRIC_ATOL = 1e-4, 1e-6
PARAM_ATOL = 1e-5
UPDATE_RTOL = 1e-4
#: Metrics that are counts or sums of the whole batch, exactly equal on any number of ranks.
EXACT = ("groups", "sequences", "tokens", "response_tokens", "updates", "reward_mean")


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAPO__")}
    env["OMP_NUM_THREADS"] = "1"  # two ranks on two shared cores
    return env


def with_an_unscored_rollout(groups: list[ScoredGroup]) -> list[ScoredGroup]:
    """The last rollout of the first group left unscored: an odd number of rows."""
    first = groups[0]
    rollouts = list(first.rollouts)
    rollouts[-1] = dataclasses.replace(rollouts[-1], status="timed_out")
    return [dataclasses.replace(first, rollouts=tuple(rollouts)), *groups[1:]]


def config_for(
    model_dir: Path, run_dir: Path, *, mini_batch_groups: int, recompute: bool = False
) -> dict[str, Any]:
    trainer = {"prompts_per_step": 4, "run_dir": str(run_dir), "device": "cpu"}
    return {
        "model": {"path": str(model_dir), "max_model_len": 128},
        "rollout": {"group_size": 4, "max_tokens": 6},
        "algorithm": {"kl_coef": 0.05, "mini_batch_groups": mini_batch_groups},
        "optim": {"lr": 1e-3, "micro_batch": 1},
        "trainer": trainer | {"activation_checkpointing": recompute},
    }


@dataclasses.dataclass
class OneRank:
    """What a single process did with the same groups (the reference)."""

    metrics: dict[str, Any]
    params: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]


def optimizer_tensors(learner: Any) -> dict[str, torch.Tensor]:
    names = [n for n, p in learner.model.named_parameters() if p.requires_grad]
    tensors, _ = ckpt.optimizer_state(learner.optimizer, names)
    return tensors


def params_of(learner: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in learner.model.state_dict().items()}


def one_rank_step(
    config: RunConfig,
    groups: list[ScoredGroup],
    staleness: dict[str, int],
    corrected: frozenset[str],
    *,
    restore: Path | None = None,
    save_to: Path | None = None,
) -> OneRank:
    from services.trainer.model import Learner

    learner = Learner.build(config, weights_from=ckpt.weights_dir(restore) if restore else None)
    step = int(learner.restore(restore)["step"]) if restore else 0
    learner.set_step(step)
    result = learner.train(groups, staleness, corrected)
    if save_to is not None:
        learner.save(save_to, step + 1, {"step": step + 1})
    return OneRank(result.metrics, params_of(learner), optimizer_tensors(learner))


def load_one_rank(config: RunConfig, path: Path) -> Any:
    from services.trainer.model import Learner

    learner = Learner.build(config, weights_from=ckpt.weights_dir(path))
    learner.restore(path)
    return learner


@dataclasses.dataclass
class TwoRankJob:
    dir: Path
    model_dir: Path
    configs: dict[str, RunConfig]
    reference: dict[str, OneRank]
    one_rank_checkpoint: Path

    def metrics(self, phase: str) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads((self.dir / phase / "metrics.json").read_text())
        return loaded

    def weights(self, phase: str) -> dict[str, torch.Tensor]:
        return load_file(str(self.dir / phase / "weights.safetensors"))

    def checkpoint(self, phase: str) -> Path:
        found = ckpt.latest_checkpoint(self.dir / phase / "run")
        assert found is not None
        return found


@pytest.fixture(scope="module")
def two_ranks(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TwoRankJob:
    """One torchrun job of two ranks, and the same work done by one process beside it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        job = tmp_path_factory.mktemp("two-ranks")
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
        tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
        batches = {
            "fresh": with_an_unscored_rollout(sampled_groups(model, tokenizer, 4, prefix="a")),
            "resumed": with_an_unscored_rollout(
                sampled_groups(model, tokenizer, 4, seed=1, prefix="b")
            ),
        }
        # One stale group, kept with the behaviour correction.
        staleness = {"fresh": {"a1": 3}, "resumed": {"b2": 3}}
        corrected = {"fresh": ["a1"], "resumed": ["b2"]}
        trees = {
            "fresh": config_for(tiny_model_dir, job / "one", mini_batch_groups=2),
            "resumed": config_for(tiny_model_dir, job / "one", mini_batch_groups=0, recompute=True),
        }
        configs = {k: build_config(v, environ={}) for k, v in trees.items()}
        one_rank_dir = job / "one-rank-run"
        reference = {
            "fresh": one_rank_step(
                configs["fresh"],
                batches["fresh"],
                staleness["fresh"],
                frozenset(corrected["fresh"]),
                save_to=one_rank_dir,
            )
        }
        one_rank_checkpoint = ckpt.latest_checkpoint(one_rank_dir)
        assert one_rank_checkpoint is not None
        reference["resumed"] = one_rank_step(
            configs["resumed"],
            batches["resumed"],
            staleness["resumed"],
            frozenset(corrected["resumed"]),
            restore=one_rank_checkpoint,
        )
    finally:
        torch.set_num_threads(threads)

    phases = []
    for name, groups in batches.items():
        paths = []
        for i, g in enumerate(groups):
            path = job / f"{name}-{i}.bin"
            path.write_bytes(encode(g))
            paths.append(str(path))
        phases.append(
            {
                "name": name,
                "config": trees[name],
                "groups": paths,
                "staleness": staleness[name],
                "corrected": corrected[name],
                "restore": str(one_rank_checkpoint) if name == "resumed" else None,
            }
        )
    (job / "job.json").write_text(json.dumps(phases))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node=2", "-m", "tests.trainer_ranks_runner", str(job)]
    done = subprocess.run(
        command, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-8000:]
    return TwoRankJob(job, tiny_model_dir, configs, reference, one_rank_checkpoint)


def assert_metrics_agree(two: dict[str, Any], one: dict[str, Any]) -> None:
    assert two.keys() == one.keys()
    for name in EXACT:
        assert two[name] == one[name], name
    for name, value in one.items():
        if name.endswith("_s") or name == "tokens_per_s":
            continue  # timings
        if value is None:
            assert two[name] is None, name
        else:
            assert two[name] == pytest.approx(value, rel=METRIC_RTOL, abs=METRIC_ATOL), name


def assert_params_agree(
    two: dict[str, torch.Tensor], one: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]
) -> None:
    assert set(one) <= set(two)
    for name, value in one.items():
        diff = float((two[name] - value).abs().max())
        assert diff <= PARAM_ATOL, (name, diff)
    apart = sum(float((two[n] - one[n]).pow(2).sum()) for n in initial)
    update = sum(float((one[n] - v).pow(2).sum()) for n, v in initial.items())
    assert update > 0 and (apart / update) ** 0.5 <= UPDATE_RTOL, (apart, update)


@pytest.mark.timeout(420)
def test_two_ranks_take_the_same_step_as_one(two_ranks: TwoRankJob) -> None:
    for phase in ("fresh", "resumed"):
        one = two_ranks.reference[phase]
        two_metrics = two_ranks.metrics(phase)
        assert_metrics_agree(two_metrics, one.metrics)
        # The step did something: the parameters moved, and every metric is the whole batch's.
        assert two_metrics["grad_norm"] > 0 and two_metrics["sequences"] == 15
        initial = load_file(str(two_ranks.model_dir / "model.safetensors"))
        if phase == "resumed":
            initial = params_of(
                load_one_rank(two_ranks.configs[phase], two_ranks.one_rank_checkpoint)
            )
        assert_params_agree(two_ranks.weights(phase), one.params, initial)
    assert two_ranks.reference["fresh"].metrics["updates"] == 2  # mini-batches, proximal pass
    assert two_ranks.reference["resumed"].metrics["updates"] == 1  # the fused pass


def test_activation_checkpointing_takes_the_same_step(
    tiny_model_dir: Path, tmp_path: Path, one_thread: None
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    groups = sampled_groups(model, tokenizer, 4)
    steps = []
    for recompute in (False, True):
        tree = config_for(tiny_model_dir, tmp_path, mini_batch_groups=2, recompute=recompute)
        steps.append(one_rank_step(build_config(tree, environ={}), groups, {}, frozenset()))
    plain, recomputed = steps
    for name, value in plain.params.items():
        torch.testing.assert_close(recomputed.params[name], value, rtol=0, atol=1e-7, msg=name)
    assert recomputed.metrics["loss"] == pytest.approx(plain.metrics["loss"], rel=1e-6)


@pytest.mark.timeout(420)
def test_evaluation_on_two_ranks_is_that_of_the_gathered_weights(two_ranks: TwoRankJob) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.trainer.dataset import eval_examples
    from services.trainer.evaluation import evaluate

    config = two_ranks.configs["fresh"]
    model = AutoModelForCausalLM.from_pretrained(str(two_ranks.model_dir))
    model.load_state_dict(two_ranks.weights("fresh"))
    t = config.task
    examples = eval_examples(t.dataset, t.eval_dataset, t.name, t.seed)[:64]  # as the runner
    tokenizer = AutoTokenizer.from_pretrained(str(two_ranks.model_dir))
    ev = evaluate(model, tokenizer, examples, max_new_tokens=config.rollout.max_tokens)
    two = json.loads((two_ranks.dir / "fresh" / "eval.json").read_text())["completions"]
    assert two == list(ev.completions)


@pytest.mark.timeout(420)
def test_checkpoints_move_between_rank_counts(two_ranks: TwoRankJob, one_thread: None) -> None:
    # Two ranks -> one: the sharded checkpoint holds exactly the weights the ranks gathered,
    # and AdamW moments that agree with one process's.
    fresh = two_ranks.checkpoint("fresh")
    assert ckpt.read_state(fresh)["format"] == ckpt.SHARDED_FORMAT
    assert not (fresh / ckpt.MODEL_DIR).exists() and (fresh / ckpt.SHARDS_DIR).is_dir()
    one = load_one_rank(two_ranks.configs["fresh"], fresh)
    gathered = two_ranks.weights("fresh")
    for name, value in params_of(one).items():
        assert torch.equal(value, gathered[name]), name
    reference = two_ranks.reference["fresh"].optimizer
    loaded = optimizer_tensors(one)
    assert loaded.keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(loaded[name], value, rtol=1e-4, atol=1e-7, msg=name)

    # One -> two -> one: the single process's checkpoint, loaded by two ranks, trained on and
    # written as shards, resumes in one process with the weights the two ranks gathered.
    resumed = two_ranks.checkpoint("resumed")
    assert ckpt.read_state(resumed)["step"] == 2
    again = load_one_rank(two_ranks.configs["resumed"], resumed)
    gathered = two_ranks.weights("resumed")
    for name, value in params_of(again).items():
        assert torch.equal(value, gathered[name]), name
    reference = two_ranks.reference["resumed"].optimizer
    loaded = optimizer_tensors(again)
    for name, value in reference.items():
        torch.testing.assert_close(loaded[name], value, rtol=1e-4, atol=1e-7, msg=name)


def test_torchrun_command_runs_this_command_on_every_rank(tmp_path: Path) -> None:
    from argparse import Namespace

    args = Namespace(config="run.toml", overrides=["trainer.steps=5"], resume=False, nproc=4)
    command = torchrun_command(args, 4, 2, resume=True)
    assert command[:4] == [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    assert "--nproc-per-node=4" in command and "--max-restarts=2" in command
    tail = command[command.index("-m", 3) :]
    assert tail[:4] == ["-m", "services.cli", "trainer", "run"]
    assert tail[-1] == "--resume" and "trainer.steps=5" in tail
    assert Path(tail[tail.index("--config") + 1]).is_absolute()


def test_a_fresh_run_over_checkpoints_is_refused_before_torchrun(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    config = trainer_config(tiny_model_dir, tmp_path)
    state_dir = ckpt.step_dir(tmp_path, 3)
    state_dir.mkdir(parents=True)
    (state_dir / ckpt.STATE_FILE).write_text(
        json.dumps({"format": 1, "step": 3, "state": {}, "files": {}})
    )
    config_file = write_toml(tmp_path / "run.toml", config)
    command = [sys.executable, "-m", "services.cli", "trainer", "run", "--nproc", "2"]
    done = subprocess.run(
        [*command, "--config", str(config_file)],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "already holds checkpoints" in done.stderr


# ----------------------------------------------------------------------------- a rank killed


def ranks_of(launcher: int) -> dict[int, int]:
    """``{rank: pid}`` of the processes torchrun (``launcher``) started."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if parent != launcher:
            continue
        for item in environ:
            if item.startswith(b"RANK="):
                found[int(item[5:])] = int(entry.name)
    return found


@pytest.fixture
def launcher_log(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "trainer.log"
    yield path
    if path.exists():
        print(path.read_text()[-6000:])


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_a_killed_rank_is_restarted_and_every_group_is_applied_once(
    redis_server: RedisServer, tiny_model_dir: Path, tmp_path: Path, launcher_log: Path
) -> None:
    steps, per_step, every = 12, 4, 5
    bus = bus_config(redis_server.url).model_dump()
    bus["claim_idle_ms"] = 60_000  # only the restart's own recovery may take entries back
    config = trainer_config(
        tiny_model_dir,
        tmp_path,
        trainer={
            "steps": steps,
            "prompts_per_step": per_step,
            "checkpoint_every": every,
            "nproc": 2,
            "max_restarts": 2,
            "device": "cpu",
        },
        bus=bus,
    )
    config_file = write_toml(tmp_path / "run.toml", config)
    command = [sys.executable, "-m", "services.cli", "trainer", "run", "--config", str(config_file)]
    env = child_env() | {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "10"}
    with FakeInference(config):
        launcher = Child.start("trainer", command, log_path=launcher_log, env=env, cwd=REPO)
        try:
            # Past the first checkpoint (step 5) and before the second (step 10).
            killed_at = wait_for_step(tmp_path, launcher, every + 2, timeout=150)
            ranks = ranks_of(launcher.pid)
            assert set(ranks) == {0, 1}, ranks
            os.kill(ranks[1], signal.SIGKILL)
            assert launcher.wait(200) == 0, launcher.tail(80)
        finally:
            launcher.stop()
    assert killed_at < steps

    records = read_jsonl(tmp_path / "applied.jsonl")
    starts = [r for r in records if r.get("event") == "start"]
    assert len(starts) == 2 and starts[0]["from_step"] == 0, starts
    assert starts[1]["from_step"] in (every, 2 * every)
    lineage = surviving_lineage(records)
    assert list(lineage) == list(range(1, steps + 1))
    applied = [i for rec in lineage.values() for i in rec["group_ids"]]
    assert len(applied) == len(set(applied)) == steps * per_step

    final = ckpt.read_state(ckpt.latest_checkpoint(tmp_path))
    assert final["format"] == ckpt.SHARDED_FORMAT and final["step"] == steps
    assert set(final["state"]["ledger"]["ids"]) == set(applied)
    status = json.loads((tmp_path / "trainer_state.json").read_text())
    assert status["status"] == "finished" and status["groups_applied"] == steps * per_step
    deadline = time.monotonic() + 10
    while ranks_of(launcher.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not ranks_of(launcher.pid)
