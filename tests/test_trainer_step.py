"""One training step on the tiny model: it learns, it reports sane numbers, and the numbers do
not depend on batch order, micro-batch size or a checkpoint in between."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from services.core.advantages import compute_advantages_ragged
from services.core.config import AlgorithmConfig
from services.trainer import checkpoint as ckpt
from services.trainer.batch import TrainBatch, collate
from services.trainer.model import Policy
from services.trainer.step import train_step
from tests.fixtures.trainer import sampled_groups, trainer_config

pytestmark = pytest.mark.usefixtures("one_thread")


def policy(model_dir: Path, tmp_path: Path, **sections: dict[str, Any]) -> Policy:
    return Policy.build(trainer_config(model_dir, tmp_path, **sections))


def params(p: Policy) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in p.model.named_parameters()}


def with_sgd(p: Policy) -> Policy:
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
        train_step(q.model, q.optimizer, b, q.settings, ref_model=q.ref_model)
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


def test_logprobs_at_other_temperatures_compare_with_untempered_inference_logprobs(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # vLLM reports raw (untempered) log-probs by default; the trainer trains the tempered
    # policy but compares like with like.
    p = policy(tiny_model_dir, tmp_path, rollout={"temperature": 0.7})
    groups = sampled_groups(p.model, p.tokenizer, 3, temperature=0.7)
    m = p.train(groups, {}, frozenset()).metrics
    assert m["logprob_mismatch"] < 1e-4


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

    q = Policy.build(p.config, weights_from=path / ckpt.MODEL_DIR)
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
    from services.trainer.synthetic import sample_groups

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
