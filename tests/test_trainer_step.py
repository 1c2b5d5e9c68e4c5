"""One training step on the tiny model: it learns, it reports sane numbers, and the numbers do
not depend on batch order, micro-batch size or a checkpoint in between."""

from __future__ import annotations

import copy
import dataclasses
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from services.core.advantages import compute_advantages_ragged
from services.core.config import AlgorithmConfig, ConfigError
from services.core.loss import LossInputs
from services.trainer import checkpoint as ckpt
from services.trainer import step as step_module
from services.trainer.batch import TrainBatch, collate
from services.trainer.logprobs import score_tokens
from services.trainer.model import Learner
from services.trainer.step import StepResult, train_step
from tests.fixtures.trainer import sampled_groups, trainer_config

pytestmark = pytest.mark.usefixtures("one_thread")


def policy(model_dir: Path, tmp_path: Path, **sections: dict[str, Any]) -> Learner:
    return Learner.build(trainer_config(model_dir, tmp_path, **sections))


def params(p: Learner) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in p.model.named_parameters()}


def with_sgd(p: Learner) -> Learner:
    """Plain SGD, lr 1: the update is the (clipped) gradient itself. Adam's first step is
    ~lr * sign(g), which turns rounding noise on near-zero gradients into full-size steps."""
    p.optimizer = torch.optim.SGD(p.model.parameters(), lr=1.0)
    return p


def permute(batch: TrainBatch, order: list[int]) -> TrainBatch:
    idx = torch.tensor(order)
    return TrainBatch(
        input_ids=batch.input_ids[idx],
        attention_mask=batch.attention_mask[idx],
        response_mask=batch.response_mask[idx],
        behaviour_logprobs=batch.behaviour_logprobs[idx],
        rewards=batch.rewards[idx],
        success=batch.success[idx],
        group_index=batch.group_index[idx],
        staleness=batch.staleness[idx],
        correct=batch.correct[idx],
        group_ids=batch.group_ids,
        sample_keys=tuple(batch.sample_keys[i] for i in order),
    )


def test_trainer_step_changes_parameters_and_reports_sane_diagnostics(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    p = policy(tiny_model_dir, tmp_path)
    groups = sampled_groups(p.model, p.tokenizer, 6)
    before = params(p)
    result = p.train(groups, {}, frozenset())
    m = result.metrics

    changed = [n for n, t in p.model.named_parameters() if not torch.equal(t, before[n])]
    assert len(changed) == len(before), "every parameter should move"
    # One PPO epoch: the old policy is the current one, so ratios are 1 and nothing clips.
    assert m["ratio_mean"] == pytest.approx(1.0) and m["ratio_max"] == pytest.approx(1.0)
    assert m["clip_frac"] == 0.0
    # The reference is the starting model: no KL yet.
    assert m["kl"] == pytest.approx(0.0, abs=1e-7)
    # Sampled from this very model in float32: trainer and "inference" log-probs agree.
    assert m["logprob_mismatch"] < 1e-4 and m["logprob_mismatch_fresh"] is not None
    vocab = p.vocab_size
    assert 0.0 < m["entropy"] <= math.log(vocab) + 1e-4
    assert m["grad_norm"] > 0.0 and math.isfinite(m["loss"])
    # Group statistics agree with the groups.
    rewards = [[r.reward for r in g.rollouts] for g in groups]
    successes = [[r.success for r in g.rollouts] for g in groups]
    assert m["reward_mean"] == pytest.approx(sum(map(sum, rewards)) / sum(map(len, rewards)))
    assert m["accuracy"] == pytest.approx(sum(map(sum, successes)) / sum(map(len, successes)))
    ps = [sum(s) / len(s) for s in successes]
    assert sorted(result.p) == pytest.approx(sorted(ps))
    assert m["lambda_mean"] == pytest.approx(sum(1 - 4 * x * (1 - x) for x in ps) / len(ps))
    # MAPO advantages sum to zero within each group, and both terms are reported.
    assert abs(m["adv_mean"]) < 1e-6 and m["adv_min"] < 0 < m["adv_max"]
    assert m["z_part_abs_mean"] > 0 and m["apd_part_abs_mean"] >= 0
    assert m["groups"] == 6 and m["tokens"] > m["response_tokens"] > 0
    assert m["tokens_per_s"] > 0 and m["staleness_mean"] == 0


def test_groups_keyed_by_id_shuffle_invariance(tiny_model_dir: Path, tmp_path: Path) -> None:
    p = policy(tiny_model_dir, tmp_path)
    groups = sampled_groups(p.model, p.tokenizer, 5)
    batch = collate(groups, pad_id=p.pad_id, max_len=128)
    shuffled_groups = collate(list(reversed(groups)), pad_id=p.pad_id, max_len=128)
    order = list(range(batch.size))
    random.Random(1).shuffle(order)
    shuffled_rows = permute(batch, order)

    def by_key(b: TrainBatch) -> dict[tuple[str, int], float]:
        adv = compute_advantages_ragged(b.rewards, b.group_index, "mapo").advantages
        return dict(zip(b.sample_keys, adv.tolist(), strict=True))

    reference = by_key(batch)
    assert by_key(shuffled_groups) == reference
    assert by_key(shuffled_rows) == reference

    # The whole step too: the same update whatever the row order.
    def step_from_start(b: TrainBatch) -> dict[str, torch.Tensor]:
        q = with_sgd(policy(tiny_model_dir, tmp_path))
        train_step(q.model, q.optimizer, b, q.config, amp_dtype=q.amp_dtype, ref_model=q.ref_model)
        return params(q)

    a, c = step_from_start(batch), step_from_start(shuffled_rows)
    for name in a:
        torch.testing.assert_close(a[name], c[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean", "token_sum"])
def test_micro_batching_gives_the_whole_batch_gradient(
    tiny_model_dir: Path, tmp_path: Path, agg: str
) -> None:
    def update(micro_batch: int) -> tuple[dict[str, torch.Tensor], float]:
        q = with_sgd(
            policy(
                tiny_model_dir,
                tmp_path,
                optim={"micro_batch": micro_batch},
                algorithm={"loss_agg": agg},
            )
        )
        groups = sampled_groups(q.model, q.tokenizer, 4)
        result = q.train(groups, {}, frozenset())
        return params(q), float(result.metrics["grad_norm"] or 0.0)

    whole, norm_whole = update(64)
    split, norm_split = update(3)
    assert norm_split == pytest.approx(norm_whole, rel=1e-4)
    for name in whole:
        torch.testing.assert_close(whole[name], split[name], rtol=1e-4, atol=1e-7)


def test_logprobs_at_other_temperatures_compare_with_the_engines_tempered_logprobs(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # The engine reports the log-probs of the distribution it sampled from (logits / T), and
    # the trainer scores at the same temperature: fresh groups match, and their behaviour
    # weights are 1 (at T = 1 against these log-probs they would be far from it).
    p = policy(tiny_model_dir, tmp_path, rollout={"temperature": 0.7})
    groups = sampled_groups(p.model, p.tokenizer, 3, temperature=0.7)
    m = p.train(groups, {}, frozenset()).metrics
    assert m["logprob_mismatch"] < 1e-4 and m["mismatch_kl"] < 1e-7
    assert m["tis_weight_mean"] == pytest.approx(1.0, abs=1e-4) and m["tis_clip_frac"] == 0.0


def test_two_ppo_epochs_take_two_optimiser_steps_and_move_the_ratio(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    p = policy(tiny_model_dir, tmp_path, algorithm={"ppo_epochs": 2})
    groups = sampled_groups(p.model, p.tokenizer, 4)
    p.train(groups, {}, frozenset())
    steps = {float(s["step"]) for s in p.optimizer.state.values()}
    assert steps == {2.0}


def test_dapo_means_clip_higher_and_no_kl_unless_set() -> None:
    a = AlgorithmConfig(estimator="dapo")
    assert a.dapo_filter and a.clip_high == 0.28 and a.kl_coef == 0.0
    b = AlgorithmConfig(estimator="dapo", kl_coef=0.05)
    assert b.kl_coef == 0.05 and b.clip_high == 0.28
    paper = AlgorithmConfig()
    assert (paper.clip_low, paper.clip_high, paper.dual_clip) == (0.2, 0.3, 3.0)
    assert (paper.kl_coef, paper.kl_type, paper.loss_agg) == (1e-2, "low_var_kl", "token_mean")


def test_resume_from_checkpoint_continues_bit_for_bit(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Step, checkpoint, step again == restore the checkpoint in a new policy, step again."""
    run = tmp_path / "run"
    p = policy(tiny_model_dir, run, algorithm={"estimator": "mapo_random_lambda"})
    first = sampled_groups(p.model, p.tokenizer, 3, seed=1, prefix="a")
    second = sampled_groups(p.model, p.tokenizer, 3, seed=2, prefix="b")
    p.train(first, {}, frozenset())
    path = p.save(run, 1, {"note": "x"})
    p.train(second, {}, frozenset())
    uninterrupted = params(p)

    q = Learner.build(p.config, weights_from=path / ckpt.MODEL_DIR)
    assert q.restore(path) == {"note": "x"}
    q.train(second, {}, frozenset())
    for name, value in params(q).items():
        assert torch.equal(value, uninterrupted[name]), name


@pytest.mark.parametrize("estimator", ["mapo", "grpo"])
def test_steps_raise_the_probability_of_rewarded_rollouts(
    tiny_model_dir: Path, tmp_path: Path, estimator: str
) -> None:
    """The sign of the whole step (advantage, loss, optimiser) is right: rewarding rollouts
    whose first token is a digit makes the policy sample digits first more often."""
    from tests.fixtures.synthetic import sample_groups

    p = policy(
        tiny_model_dir,
        tmp_path,
        algorithm={"estimator": estimator, "kl_coef": 0.0},
        optim={"lr": 3e-3, "weight_decay": 0.0},
    )
    digits = {p.tokenizer.convert_tokens_to_ids(c) for c in "0123456789"}
    prompt = p.tokenizer("12+34=", add_special_tokens=False)["input_ids"]

    def reward(_gid: str, _i: int, tokens: list[int]) -> float:
        return 1.0 if tokens and tokens[0] in digits else 0.0

    def digit_share(seed: int) -> float:
        gen = torch.Generator().manual_seed(seed)
        groups = sample_groups(
            p.model,
            [(f"probe{seed}", prompt)],
            group_size=256,
            max_tokens=1,
            eos_id=p.tokenizer.eos_token_id,
            reward_fn=reward,
            generator=gen,
        )
        return sum(r.reward for r in groups[0].rollouts) / 256

    before = digit_share(10_000)
    gen = torch.Generator().manual_seed(0)
    for step in range(15):
        groups = sample_groups(
            p.model,
            [(f"s{step}-{i}", prompt) for i in range(8)],
            group_size=8,
            max_tokens=3,
            eos_id=p.tokenizer.eos_token_id,
            reward_fn=reward,
            generator=gen,
        )
        p.train(groups, {}, frozenset())
    after = digit_share(10_001)
    # Digits are 10 of ~100 tokens: a random model starts near 10%; 15 steps must move it far.
    assert after > before + 0.2, (before, after)


# ----------------------------------------------------------------------------- fused forward

#: Fused and two-pass steps must agree to this relative tolerance (float rounding only: on the
#: CPU the two run the same kernels on the same micro-batches, so they agree far more closely).
FUSED_RTOL = 1e-6


class GradRecorder(torch.optim.SGD):
    """Plain SGD at lr 1 that keeps the (clipped) gradient it applied, parameter by parameter."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.named = [(n, t) for n, t in model.named_parameters() if t.requires_grad]
        super().__init__([t for _, t in self.named], lr=1.0)
        self.grads: dict[str, torch.Tensor] = {}

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        self.grads = {n: t.grad.detach().clone() for n, t in self.named if t.grad is not None}
        return super().step(closure)


def stale_batch(p: Learner, corrected: bool) -> TrainBatch:
    """Six groups sampled from the policy at its temperature; with ``corrected``, two of them
    as if generated by an older policy (log-probs lower by 0.5 and by 1.0: one importance
    weight under the cap, one capped) and kept under stale_policy="correct"."""
    t = p.config.rollout.temperature
    groups = sampled_groups(p.model, p.tokenizer, 6, temperature=t, seed=3)
    correct: frozenset[str] = frozenset()
    staleness: dict[str, int] = {}
    if corrected:
        shifts = {groups[1].group_id: 0.5, groups[4].group_id: 1.0}
        groups = [
            dataclasses.replace(
                g,
                rollouts=tuple(
                    dataclasses.replace(
                        r, logprobs=(r.logprobs - shifts.get(g.group_id, 0.0)).astype(np.float32)
                    )
                    for r in g.rollouts
                ),
            )
            for g in groups
        ]
        correct = frozenset(shifts)
        staleness = dict.fromkeys(shifts, 3)
    return collate(groups, pad_id=p.pad_id, max_len=128, staleness=staleness, correct=correct)


def one_step(
    model_dir: Path, tmp_path: Path, fused: bool, batch_of: Any, **sections: dict[str, Any]
) -> tuple[StepResult, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A fresh policy (same seed, same weights), one step on ``batch_of(policy)``: the result,
    the gradient the optimiser applied and the updated parameters."""
    q = policy(model_dir, tmp_path, optim={"micro_batch": 5}, **sections)
    recorder = GradRecorder(q.model)
    q.optimizer = recorder
    batch = batch_of(q)
    result = train_step(
        q.model,
        q.optimizer,
        batch,
        q.config,
        amp_dtype=q.amp_dtype,
        ref_model=q.ref_model,
        fused=fused,
    )
    return result, recorder.grads, params(q)


def assert_same_step(
    a: tuple[StepResult, dict[str, torch.Tensor], dict[str, torch.Tensor]],
    b: tuple[StepResult, dict[str, torch.Tensor], dict[str, torch.Tensor]],
) -> None:
    """Same loss, diagnostics, gradient and update, to FUSED_RTOL (timings aside)."""
    (ra, ga, pa), (rb, gb, pb) = a, b
    ma = {k: v for k, v in ra.metrics.items() if not k.endswith("_s")}
    mb = {k: v for k, v in rb.metrics.items() if not k.endswith("_s")}
    assert ma.keys() == mb.keys()
    for key, value in ma.items():
        if value is None:
            assert mb[key] is None, key
        else:
            assert mb[key] == pytest.approx(value, rel=FUSED_RTOL, abs=1e-9), key
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        scale = float(ga[name].abs().max())
        torch.testing.assert_close(gb[name], ga[name], rtol=FUSED_RTOL, atol=FUSED_RTOL * scale)
        torch.testing.assert_close(pb[name], pa[name], rtol=FUSED_RTOL, atol=1e-9)
    assert (ra.p, ra.lam, ra.staleness) == (rb.p, rb.lam, rb.staleness)


@pytest.mark.parametrize(
    ("temperature", "corrected"),
    [(1.0, False), (0.7, False), (1.0, True), (0.7, True)],
    ids=["T1", "T0.7", "T1-stale-corrected", "T0.7-stale-corrected"],
)
def test_fused_forward_gives_the_two_pass_step(
    tiny_model_dir: Path, tmp_path: Path, temperature: float, corrected: bool
) -> None:
    """ppo_epochs = 1: taking the old log-probs from the update's own forward pass gives the
    same loss, gradient, update and diagnostics as a separate no-grad pass before it."""
    sections: dict[str, Any] = {
        "rollout": {"temperature": temperature},
        "trainer": {"stale_policy": "correct"},
        "algorithm": {"tis_cap": 2.0},
    }

    def batch_of(q: Learner) -> TrainBatch:
        return stale_batch(q, corrected)

    two_pass = one_step(tiny_model_dir, tmp_path, False, batch_of, **sections)
    fused = one_step(tiny_model_dir, tmp_path, True, batch_of, **sections)
    assert_same_step(two_pass, fused)

    m = fused[0].metrics
    # What the comparison covers is not vacuous: a real gradient, entropy, KL, mismatch and,
    # with corrected rows, importance weights that are not all 1 (one shifted group capped).
    assert m["grad_norm"] and m["grad_norm"] > 0 and m["entropy"] and m["entropy"] > 0
    assert m["ratio_min"] == m["ratio_max"] == 1.0
    assert m["logprob_mismatch"] is not None
    if corrected:
        assert m["tis_weight_mean"] > 1.0 and m["tis_clip_frac"] > 0.0
        assert m["logprob_mismatch"] > 0.1  # the shifted rows
    else:
        # Every group is weighted by pi_prox / mu; sampled from this very model, that is 1.
        assert m["tis_weight_mean"] == pytest.approx(1.0, abs=1e-4) and m["tis_clip_frac"] == 0.0
        assert m["logprob_mismatch"] < 1e-4
    # The fused step spends no time on an old-policy pass; the two-pass one does.
    assert fused[0].metrics["old_s"] == 0.0 < two_pass[0].metrics["old_s"]


def test_fused_comparison_fails_when_old_comes_from_another_model_state(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The equality check above can fail: old log-probs scored on slightly different weights
    (as they would be if they were taken after an update, or from a stale copy) change the
    ratio, the importance weights and the diagnostics, and assert_same_step catches it."""

    def batch_of(q: Learner) -> TrainBatch:
        return stale_batch(q, corrected=True)

    sections: dict[str, Any] = {"trainer": {"stale_policy": "correct"}}
    fused = one_step(tiny_model_dir, tmp_path, True, batch_of, **sections)

    real_score = step_module.score_tokens

    def score_on_other_weights(m: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        other = copy.deepcopy(m)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(0)
            for t in other.parameters():
                t.add_(1e-3 * torch.randn(t.shape, generator=gen))
        return real_score(other, *args, **kwargs)

    monkeypatch.setattr(step_module, "score_tokens", score_on_other_weights)
    other_state = one_step(tiny_model_dir, tmp_path, False, batch_of, **sections)
    assert other_state[0].metrics["ratio_max"] != 1.0
    with pytest.raises(AssertionError):
        assert_same_step(other_state, fused)


def test_fused_step_runs_one_forward_per_micro_batch(tiny_model_dir: Path, tmp_path: Path) -> None:
    """16 rows in micro-batches of 3: 6 forward passes of the policy fused, 12 with the
    separate old-policy pass, 6 + 2 x 6 with two PPO epochs; the reference model's 6 always."""

    def count(fused: bool | None, epochs: int) -> tuple[int, int]:
        q = policy(
            tiny_model_dir, tmp_path, optim={"micro_batch": 3}, algorithm={"ppo_epochs": epochs}
        )
        assert q.ref_model is not None
        calls = {"policy": 0, "ref": 0}

        def counter(name: str) -> Any:
            def hook(*_: Any) -> None:
                calls[name] += 1

            return hook

        q.model.register_forward_hook(counter("policy"))
        q.ref_model.register_forward_hook(counter("ref"))
        groups = sampled_groups(q.model, q.tokenizer, 4)
        batch = collate(groups, pad_id=q.pad_id, max_len=128)
        assert batch.size == 16
        calls["policy"] = 0  # sampling ran the model too
        train_step(
            q.model,
            q.optimizer,
            batch,
            q.config,
            amp_dtype=q.amp_dtype,
            ref_model=q.ref_model,
            fused=fused,
        )
        return calls["policy"], calls["ref"]

    assert count(None, 1) == (6, 6)  # the default with one epoch is the fused path
    assert count(False, 1) == (12, 6)
    assert count(None, 2) == (18, 6)
    with pytest.raises(ValueError, match="ppo_epochs == 1"):
        count(True, 2)


def test_step_reports_where_its_time_goes(tiny_model_dir: Path, tmp_path: Path) -> None:
    p = policy(tiny_model_dir, tmp_path)
    m = p.train(sampled_groups(p.model, p.tokenizer, 4), {}, frozenset()).metrics
    parts = ("collate_s", "ref_s", "forward_s", "backward_s", "optimizer_s")
    assert all(m[k] is not None and m[k] > 0.0 for k in parts), m
    assert m["old_s"] == 0.0  # one epoch: fused, no separate old-policy pass
    assert m["compute_s"] is not None
    assert m["compute_s"] >= sum(float(m[k] or 0.0) for k in (*parts, "old_s"))

    q = policy(tiny_model_dir, tmp_path, algorithm={"ppo_epochs": 2, "kl_coef": 0.0})
    m = q.train(sampled_groups(q.model, q.tokenizer, 4), {}, frozenset()).metrics
    assert m["old_s"] is not None and m["old_s"] > 0.0 and m["ref_s"] == 0.0


# ------------------------------------------------ mini-batches and the behaviour correction


def shifted_batch(
    p: Learner, n: int, shifts: dict[int, float], lags: dict[int, int] | None = None
) -> TrainBatch:
    """``n`` groups sampled from the policy; group i's engine log-probs lowered by
    ``shifts[i]`` (as if an older policy had sampled it: pi_prox / mu = e^shift) and its
    staleness ``lags[i]`` (0 when absent), all within trainer.max_staleness."""
    groups = sampled_groups(p.model, p.tokenizer, n, seed=5)
    groups = [
        dataclasses.replace(
            g,
            rollouts=tuple(
                dataclasses.replace(
                    r, logprobs=(r.logprobs - shifts.get(i, 0.0)).astype(np.float32)
                )
                for r in g.rollouts
            ),
        )
        for i, g in enumerate(groups)
    ]
    staleness = {groups[i].group_id: lag for i, lag in (lags or {}).items()}
    return collate(groups, pad_id=p.pad_id, max_len=128, staleness=staleness)


def proximal_logprobs(p: Learner, batch: TrainBatch) -> torch.Tensor:
    """The proximal policy's log-probs, computed here independently of train_step."""
    t = p.config.rollout.temperature
    return score_tokens(
        p.model, batch.input_ids, batch.attention_mask, micro_batch=64, temperature=t
    ).logprobs


class Updates:
    """Spies on train_step: the rows of each mini-batch, and the inputs and statistics of
    every loss call (one per update with micro-batches larger than a mini-batch)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.minis: list[torch.Tensor] = []
        self.calls: list[tuple[LossInputs, Any]] = []
        real_loss, real_minis = step_module.policy_loss, step_module.mini_batches

        def loss(x: LossInputs, objective: AlgorithmConfig) -> Any:
            out = real_loss(x, objective)
            self.calls.append((x, out[1]))
            return out

        def minis(*args: Any) -> list[torch.Tensor]:
            self.minis = real_minis(*args)
            return self.minis

        monkeypatch.setattr(step_module, "policy_loss", loss)
        monkeypatch.setattr(step_module, "mini_batches", minis)

    def rows(self, k: int) -> torch.Tensor:
        return self.minis[k % len(self.minis)]


def test_mini_batches_take_whole_groups_by_group_index() -> None:
    index = torch.tensor([3, 0, 0, 1, 2, 3, 1, 2])
    rows = step_module.mini_batches(index, 4, 2)
    assert [r.tolist() for r in rows] == [[1, 2, 3, 6], [0, 4, 5, 7]]
    assert [r.tolist() for r in step_module.mini_batches(index, 4, 0)] == [list(range(8))]
    assert [r.tolist() for r in step_module.mini_batches(index, 4, 8)] == [list(range(8))]


def test_the_objective_settings_are_checked_together(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = trainer_config(tiny_model_dir, tmp_path)
    assert config.algorithm.mini_batch_groups == 8 and config.algorithm.tis_cap == 2.0
    algo = config.algorithm
    assert (algo.behaviour_correction, algo.is_level) == ("truncate", "token")
    with pytest.raises(ConfigError, match=r"not a multiple of algorithm\.mini_batch_groups"):
        trainer_config(
            tiny_model_dir,
            tmp_path,
            trainer={"prompts_per_step": 12, "in_flight": 12},
            algorithm={"mini_batch_groups": 8},
        )
    with pytest.raises(ConfigError, match='stale_policy = "drop"'):
        trainer_config(tiny_model_dir, tmp_path, algorithm={"behaviour_correction": "off"})
    trainer_config(
        tiny_model_dir,
        tmp_path,
        trainer={"prompts_per_step": 12, "in_flight": 12, "stale_policy": "drop"},
        algorithm={"mini_batch_groups": 3, "behaviour_correction": "off"},
    )


def test_four_mini_batches_clip_against_the_proximal_policy(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """8 groups in mini-batches of 2: four AdamW updates. Every update takes its ratio against
    the proximal log-probs (the weights before the first update, computed here independently)
    and weights its tokens against the engine's log-probs; the first update's ratio is exactly
    1, and a large rate moves the policy far enough that later updates clip.

    Two groups carry engine log-probs lower by 0.5 (one version stale): with the proximal and
    behaviour log-probs swapped, the inputs would not match and the first update's ratio would
    be e^0.5 on the first of them."""
    p = policy(
        tiny_model_dir,
        tmp_path,
        algorithm={"mini_batch_groups": 2, "kl_coef": 0.0},
        optim={"lr": 1e-2, "weight_decay": 0.0},
    )
    batch = shifted_batch(p, 8, {1: 0.5, 6: 0.5}, {1: 1, 6: 1})
    prox = proximal_logprobs(p, batch)
    spy = Updates(monkeypatch)
    m = train_step(p.model, p.optimizer, batch, p.config, ref_model=p.ref_model).metrics

    assert m["updates"] == 4.0 and len(spy.minis) == 4 and len(spy.calls) == 4
    assert {float(s["step"]) for s in p.optimizer.state.values()} == {4.0}
    assert m["old_s"] is not None and m["old_s"] > 0.0  # a separate proximal pass
    for k, (x, _) in enumerate(spy.calls):
        rows, cols = spy.rows(k), slice(0, x.mask.shape[1])
        mask = batch.response_mask[rows, cols]
        assert torch.equal(x.mask, mask)
        torch.testing.assert_close(x.old_logprobs[mask], prox[rows, cols][mask])
        assert x.behaviour_logprobs is not None
        assert torch.equal(x.behaviour_logprobs[mask], batch.behaviour_logprobs[rows, cols][mask])
    assert sorted(torch.cat(spy.minis).tolist()) == list(range(batch.size))

    first = spy.calls[0][1]
    assert first.ratio_min == first.ratio_max == 1.0
    later = [stats for _, stats in spy.calls[1:]]
    assert max(s.ratio_max for s in later) > 1.3 or min(s.ratio_min for s in later) < 0.8
    assert m["clip_frac"] > 0.0 and m["ratio_max"] > 1.0
    # The shifted groups weigh e^0.5 per token, the others about 1, none capped.
    assert m["tis_weight_mean"] > 1.05 and m["tis_clip_frac"] == 0.0


@pytest.mark.parametrize(
    ("mode", "level", "groups_per_update"),
    [
        ("truncate", "token", 0),
        ("mask", "token", 2),
        ("truncate", "sequence", 2),
        ("mask", "sequence", 0),
    ],
)
def test_stale_groups_get_behaviour_weights_capped_at_the_cap(
    tiny_model_dir: Path, tmp_path: Path, mode: str, level: str, groups_per_update: int
) -> None:
    """Every group is weighted by pi_prox / mu, truncated or masked at tis_cap, whether or not
    it is past trainer.max_staleness. Two groups within the bound were sampled by older
    policies (engine log-probs lower by 0.5 and by 1.0: e^0.5 is under the cap of 2, e^1 is
    over it). The weights are computed here from independently scored proximal log-probs;
    swapped (mu / pi_prox) they would be e^-0.5 and e^-1, never capped."""
    p = policy(
        tiny_model_dir,
        tmp_path,
        algorithm={
            "behaviour_correction": mode,
            "is_level": level,
            "mini_batch_groups": groups_per_update,
            "tis_cap": 2.0,
        },
    )
    batch = shifted_batch(p, 6, {1: 0.5, 4: 1.0}, {1: 1, 4: 2})
    assert not batch.correct.any()  # all within max_staleness
    mask = batch.response_mask
    log_w = torch.where(mask, proximal_logprobs(p, batch) - batch.behaviour_logprobs, 0.0)
    if level == "sequence":
        log_w = torch.where(mask, log_w.sum(-1, keepdim=True), 0.0)
    capped = log_w > math.log(2.0)
    w = torch.exp(log_w).clamp(max=2.0) if mode == "truncate" else torch.exp(log_w) * ~capped
    assert capped[mask].any() and (w[mask] != 1.0).any()

    m = _train(p, batch)
    assert m["updates"] == (3.0 if groups_per_update == 2 else 1.0)
    assert m["tis_weight_mean"] == pytest.approx(float(w[mask].mean()), rel=1e-5)
    assert m["tis_clip_frac"] == pytest.approx(float(capped[mask].float().mean()), rel=1e-5)
    # Trainer-versus-engine KL per version lag: k3 = r - 1 - log r with r = e^shift.
    assert m["mismatch_kl_lag0"] is not None and m["mismatch_kl_lag0"] < 1e-6
    assert m["mismatch_kl_lag1"] == pytest.approx(math.exp(0.5) - 1.5, rel=1e-3)
    assert m["mismatch_kl_lag2plus"] == pytest.approx(math.exp(1.0) - 2.0, rel=1e-3)


def _train(p: Learner, batch: TrainBatch) -> dict[str, float | None]:
    return train_step(p.model, p.optimizer, batch, p.config, ref_model=p.ref_model).metrics


def test_masked_tokens_give_no_policy_gradient(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Every group sampled by a policy far from the proximal one (weight e > cap 2): the mask
    mode removes all of them from the gradient, the truncating mode keeps them at weight 2."""

    def step(mode: str) -> tuple[dict[str, float | None], bool]:
        p = with_sgd(
            policy(
                tiny_model_dir,
                tmp_path,
                algorithm={"behaviour_correction": mode, "kl_coef": 0.0},
            )
        )
        batch = shifted_batch(p, 4, dict.fromkeys(range(4), 1.0))
        before = params(p)
        m = _train(p, batch)
        moved = any(not torch.equal(t, before[n]) for n, t in p.model.named_parameters())
        return m, moved

    masked, moved = step("mask")
    assert masked["tis_clip_frac"] == 1.0 and masked["tis_weight_mean"] == 0.0
    assert masked["grad_norm"] == 0.0 and not moved
    truncated, moved = step("truncate")
    assert truncated["tis_weight_mean"] == pytest.approx(2.0) and truncated["tis_clip_frac"] == 1.0
    assert truncated["grad_norm"] and truncated["grad_norm"] > 0.0 and moved
