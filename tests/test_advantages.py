"""Advantage estimators: the paper's worked numbers, invariants, group keying, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.core.advantages import (
    ESTIMATORS,
    AdvantageInputError,
    compute_advantages,
    compute_advantages_ragged,
    dapo_keep_mask,
    success_mask,
)
from services.core.config import AlgorithmConfig
from services.core.loss import LossInputs, policy_loss

EPS = 1e-6
NONNEG_ONLY = ("mapo", "apd", "mapo_random_lambda")
SIGNED_OK = ("grpo", "dapo", "dr_grpo", "rloo")


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def mapo_by_hand(rewards: list[float], eps: float = EPS) -> list[float]:
    """Equations 2-6 of the paper, one group, plain Python."""
    g = len(rewards)
    mu = sum(rewards) / g
    sigma = math.sqrt(sum((r - mu) ** 2 for r in rewards) / g)
    p = sum(r >= 1.0 - 1e-9 for r in rewards) / g
    lam = 1 - 4 * p * (1 - p)
    return [(1 - lam) * (r - mu) / (sigma + eps) + lam * (r - mu) / (mu + eps) for r in rewards]


# ----------------------------------------------------------------------------- worked numbers


def test_worked_example_gives_minus_1_318_for_the_0_9_rollout() -> None:
    res = compute_advantages(t([[0.9, 1.0, 1.0, 1.0]]))
    assert res.groups.p.item() == 0.75
    assert res.groups.lam.item() == 0.25
    assert res.groups.mu.item() == pytest.approx(0.975, abs=1e-15)
    # 0.75 * (-1.732) + 0.25 * (-0.0769) = -1.318, as in the paper's text.
    assert res.advantages[0, 0].item() == pytest.approx(-1.318, abs=5e-4)
    expected = mapo_by_hand([0.9, 1.0, 1.0, 1.0])
    torch.testing.assert_close(res.advantages[0], torch.tensor(expected, dtype=torch.float64))
    assert res.z_part[0, 0].item() == pytest.approx(0.75 * -math.sqrt(3), rel=1e-4)
    assert res.apd_part[0, 0].item() == pytest.approx(0.25 * -0.075 / 0.975, rel=1e-5)


def test_reversion_grpo_scores_confident_group_more_extremely_mapo_does_not() -> None:
    rewards = t([[0.9, 1.0, 1.0, 1.0], [0.1, 0.1, 1.0, 1.0]])
    grpo = compute_advantages(rewards, "grpo").advantages
    third = 1 / math.sqrt(3)
    expected = t([[-math.sqrt(3), third, third, third], [-1.0, -1.0, 1.0, 1.0]])
    torch.testing.assert_close(grpo, expected, atol=1e-4, rtol=0)
    # The reversion: the nearly-all-correct group's loser is punished harder than a real loser.
    assert abs(grpo[0, 0]) > abs(grpo[1, 0])

    mapo = compute_advantages(rewards, "mapo").advantages
    assert abs(mapo[0, 0]) < abs(grpo[0, 0])
    # p = 1/2 gives lambda = 0: the uncertain group keeps its z-scores exactly.
    torch.testing.assert_close(mapo[1], grpo[1], atol=0, rtol=0)


def test_mirror_groups_share_grpo_advantages_but_not_mapo_advantages() -> None:
    rewards = t([[0.0, 0.1, 0.1, 0.1], [0.9, 1.0, 1.0, 1.0]])
    grpo = compute_advantages(rewards, "grpo").advantages
    torch.testing.assert_close(grpo[0], grpo[1], atol=1e-12, rtol=0)

    res = compute_advantages(rewards, "mapo")
    # Hard prompt: p = 0, lambda = 1, pure APD: mu = 0.075 -> -1 and +1/3.
    assert res.groups.lam.tolist() == [1.0, 0.25]
    torch.testing.assert_close(
        res.advantages[0], t([[-1.0, 1 / 3, 1 / 3, 1 / 3]])[0], atol=1e-4, rtol=0
    )
    torch.testing.assert_close(
        res.advantages[1], torch.tensor(mapo_by_hand([0.9, 1.0, 1.0, 1.0]), dtype=torch.float64)
    )
    assert res.advantages[1, 1].item() == pytest.approx(0.4394, abs=1e-4)


def test_small_mean_gives_apd_of_three_and_the_optional_clip_caps_it() -> None:
    rewards = t([[0.0, 0.0, 0.0, 0.1]])
    res = compute_advantages(rewards, "mapo")
    assert res.advantages[0, 3].item() == pytest.approx(3.0, rel=1e-4)
    clipped = compute_advantages(rewards, "mapo", advantage_clip=2.0)
    assert clipped.advantages[0, 3].item() == 2.0
    assert clipped.advantages[0, 0].item() == pytest.approx(-1.0, rel=1e-4)  # under the cap
    torch.testing.assert_close(clipped.z_part + clipped.apd_part, clipped.advantages)


# ----------------------------------------------------------------------------- gradient ratio


def test_binary_mapo_over_grpo_ratio_is_one_minus_lambda_plus_lambda_sqrt_q_over_p() -> None:
    """For r in {0, 1}: mu = p and sigma = sqrt(p q), q = 1 - p.

    Success: z = q / sqrt(p q) = sqrt(q / p), APD = q / p. Failure: z = -sqrt(p / q), APD = -1.
    Both give A_mapo / A_grpo = (1 - lambda) + lambda * sqrt(q / p). The policy gradient of a
    rollout is A * grad log pi, so this is also the ratio of the two gradients on that rollout.
    """
    for g in (2, 4, 8, 12, 16):
        for n in range(1, g):
            rewards = torch.tensor([[1.0] * n + [0.0] * (g - n)], dtype=torch.float64)
            mapo = compute_advantages(rewards, "mapo", eps=1e-12).advantages[0]
            grpo = compute_advantages(rewards, "grpo", eps=1e-12).advantages[0]
            p = n / g
            lam = 1 - 4 * p * (1 - p)
            expected = (1 - lam) + lam * math.sqrt((1 - p) / p)
            torch.testing.assert_close(
                mapo / grpo, torch.full((g,), expected, dtype=torch.float64), rtol=1e-9, atol=0
            )
            ratio = (mapo[0] / grpo[0]).item()
            if p < 0.5:
                assert ratio > 1.0  # hard prompts: MAPO pushes successes harder
            elif p > 0.5:
                assert ratio < 1.0  # easy prompts: softer
            else:
                assert ratio == pytest.approx(1.0, abs=1e-12)


def test_binary_gradient_ratio_holds_for_the_policy_loss_gradient() -> None:
    g, n = 8, 2  # p = 1/4
    rewards = torch.tensor([[1.0] * n + [0.0] * (g - n)], dtype=torch.float64)
    grads = {}
    for est in ("mapo", "grpo"):
        adv = compute_advantages(rewards, est, eps=1e-12).advantages[0]
        logprobs = torch.full((g, 3), -1.0, dtype=torch.float64, requires_grad=True)
        x = LossInputs(logprobs, logprobs.detach(), adv, torch.ones(g, 3))
        loss, _ = policy_loss(x, AlgorithmConfig(kl_coef=0.0))
        loss.backward()
        assert logprobs.grad is not None
        grads[est] = logprobs.grad[0, 0].item()  # a token of a successful rollout
    p, lam = 0.25, 1 - 4 * 0.25 * 0.75
    assert grads["mapo"] / grads["grpo"] == pytest.approx(
        (1 - lam) + lam * math.sqrt((1 - p) / p), rel=1e-9
    )


# ----------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("value", [0.0, 0.1, 0.3, 1.0, 7.7])
def test_all_equal_group_gives_exactly_zero(estimator: str, value: float) -> None:
    rewards = torch.full((3, 12), value, dtype=torch.float64)
    res = compute_advantages(rewards, estimator, generator=torch.Generator().manual_seed(0))
    assert torch.equal(res.advantages, torch.zeros_like(rewards))
    assert res.groups.zero_variance.all()
    if value == 1.0 and estimator != "mapo_random_lambda":
        assert res.groups.lam.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("std", ["population", "sample"])
def test_group_of_one_gives_zero(estimator: str, std: str) -> None:
    res = compute_advantages(t([[0.3], [1.0], [0.0]]), estimator, std=std)
    assert torch.equal(res.advantages, torch.zeros(3, 1, dtype=torch.float64))
    assert res.groups.sigma.tolist() == [0.0, 0.0, 0.0]
    ragged = compute_advantages_ragged(
        torch.tensor([0.3, 0.9, 0.9]), torch.tensor([5, 1, 1]), estimator, std=std
    )
    assert ragged.advantages[0].item() == 0.0


def test_z_scores_dr_grpo_and_rloo_sum_to_zero_per_group() -> None:
    rewards = torch.rand(50, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for est in ("grpo", "dr_grpo", "rloo"):
        sums = compute_advantages(rewards, est).advantages.sum(dim=1)
        torch.testing.assert_close(sums, torch.zeros(50, dtype=torch.float64), atol=1e-12, rtol=0)


def test_dr_grpo_is_reward_minus_group_mean() -> None:
    rewards = t([[0.0, 0.1, 0.9, 1.0], [-2.0, 3.0, 0.5, 0.5]])
    res = compute_advantages(rewards, "dr_grpo")
    torch.testing.assert_close(res.advantages, rewards - rewards.mean(dim=1, keepdim=True))


def test_rloo_is_reward_minus_mean_of_the_others() -> None:
    rows = [[0.0, 0.1, 0.9, 1.0], [1.0, 0.0, 0.0], [-1.0, 2.0]]
    for row in rows:
        res = compute_advantages(t([row]), "rloo").advantages[0]
        expected = [r - sum(row[:i] + row[i + 1 :]) / (len(row) - 1) for i, r in enumerate(row)]
        torch.testing.assert_close(res, torch.tensor(expected, dtype=torch.float64))


def test_apd_is_deviation_over_mean() -> None:
    res = compute_advantages(t([[0.0, 0.1, 0.9, 1.0]]), "apd", eps=1e-12)
    mu = 0.5
    torch.testing.assert_close(
        res.advantages[0], torch.tensor([(r - mu) / mu for r in (0.0, 0.1, 0.9, 1.0)]).double()
    )


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("clip", [None, 0.5])
def test_parts_add_up_to_the_advantage(estimator: str, clip: float | None) -> None:
    rewards = t([[0.0, 0.1, 0.9, 1.0], [0.9, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.1]])
    res = compute_advantages(rewards, estimator, advantage_clip=clip)
    torch.testing.assert_close(res.z_part + res.apd_part, res.advantages)
    if estimator in ("grpo", "dapo", "dr_grpo", "rloo"):
        assert torch.equal(res.apd_part, torch.zeros_like(rewards))
    if estimator == "apd":
        assert torch.equal(res.z_part, torch.zeros_like(rewards))
    if clip is not None:
        assert res.advantages.abs().max().item() <= clip


def test_sample_std_uses_g_minus_one_and_population_uses_g() -> None:
    rewards = t([[0.0, 1.0]])
    pop = compute_advantages(rewards, "grpo", std="population", eps=1e-12)
    smp = compute_advantages(rewards, "grpo", std="sample", eps=1e-12)
    assert pop.groups.sigma.item() == pytest.approx(0.5)
    assert smp.groups.sigma.item() == pytest.approx(math.sqrt(0.5))
    torch.testing.assert_close(pop.advantages, t([[-1.0, 1.0]]))
    torch.testing.assert_close(smp.advantages, t([[-1 / math.sqrt(2), 1 / math.sqrt(2)]]))
    # torch.std is the sample std, as in the released code.
    rewards = torch.rand(7, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    res = compute_advantages(rewards, "grpo", std="sample")
    torch.testing.assert_close(res.groups.sigma, rewards.std(dim=1))


# ----------------------------------------------------------------------------- group keying


def _ragged_batch(sizes: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.full((s,), 1000 + 7 * k, dtype=torch.long) for k, s in enumerate(sizes)])
    levels = torch.tensor([0.0, 0.1, 0.9, 1.0], dtype=torch.float64)
    rewards = levels[torch.randint(0, 4, (len(ids),), generator=gen)]
    return rewards, ids


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_shuffling_the_flat_batch_permutes_advantages_identically(estimator: str) -> None:
    sizes = [1, 2, 3, 5, 8, 12, 12, 13, 4, 7]
    rewards, ids = _ragged_batch(sizes, seed=3)
    base = compute_advantages_ragged(
        rewards, ids, estimator, generator=torch.Generator().manual_seed(9)
    )
    for seed in range(3):
        perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))
        shuffled = compute_advantages_ragged(
            rewards[perm], ids[perm], estimator, generator=torch.Generator().manual_seed(9)
        )
        torch.testing.assert_close(shuffled.advantages, base.advantages[perm], atol=0, rtol=0)
        torch.testing.assert_close(shuffled.groups.lam, base.groups.lam, atol=0, rtol=0)
        assert torch.equal(shuffled.group_index, base.group_index[perm])


def test_position_keyed_lambda_like_the_released_code_fails_the_shuffle_check() -> None:
    """The shuffle test data must catch the released code's bug, or the test proves nothing."""
    rewards, ids = _ragged_batch([12] * 16, seed=4)
    perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(0))
    correct = compute_advantages_ragged(rewards[perm], ids[perm], "mapo")
    z = compute_advantages_ragged(rewards[perm], ids[perm], "grpo").advantages
    apd = compute_advantages_ragged(rewards[perm], ids[perm], "apd").advantages
    # The bug: per-group lambda expanded with repeat_interleave, assuming contiguous groups.
    lam_by_position = correct.groups.lam.repeat_interleave(correct.groups.size)
    buggy = (1 - lam_by_position) * z + lam_by_position * apd
    lam_by_id = correct.groups.lam[correct.group_index]
    torch.testing.assert_close((1 - lam_by_id) * z + lam_by_id * apd, correct.advantages)
    assert not torch.allclose(buggy, correct.advantages)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_ragged_equals_dense_for_equal_group_sizes(estimator: str) -> None:
    gen = torch.Generator().manual_seed(5)
    rewards = torch.rand(40, 6, generator=gen, dtype=torch.float64)
    rewards[::3] = (rewards[::3] > 0.5).double()  # some binary groups, so p varies
    rewards[5] = 1.0
    dense = compute_advantages(rewards, estimator, generator=torch.Generator().manual_seed(1))
    ids = torch.arange(40).repeat_interleave(6)
    ragged = compute_advantages_ragged(
        rewards.flatten(), ids, estimator, generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(ragged.advantages, dense.advantages.flatten())
    torch.testing.assert_close(ragged.groups.lam, dense.groups.lam)
    torch.testing.assert_close(ragged.groups.sigma, dense.groups.sigma)
    assert torch.equal(ragged.group_index, dense.group_index.flatten())


def test_group_rows_follow_sorted_unique_ids_including_negative_ones() -> None:
    ids = torch.tensor([42, -3, 42, 7, -3, 42])
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.5, 0.0, 1.0])
    res = compute_advantages_ragged(rewards, ids, "grpo")
    assert res.group_index.tolist() == [2, 0, 2, 1, 0, 2]
    assert res.groups.size.tolist() == [2, 1, 3]
    assert res.groups.zero_variance.tolist() == [True, True, False]
    torch.testing.assert_close(res.groups.p, torch.tensor([0.0, 0.0, 2 / 3], dtype=torch.float64))


def test_random_lambda_is_uniform_reproducible_and_used_in_the_mix() -> None:
    rewards = torch.rand(2000, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    a = compute_advantages(
        rewards, "mapo_random_lambda", generator=torch.Generator().manual_seed(1)
    )
    b = compute_advantages(
        rewards, "mapo_random_lambda", generator=torch.Generator().manual_seed(1)
    )
    c = compute_advantages(
        rewards, "mapo_random_lambda", generator=torch.Generator().manual_seed(2)
    )
    assert torch.equal(a.advantages, b.advantages)
    assert not torch.equal(a.advantages, c.advantages)
    lam = a.groups.lam
    assert lam.min().item() >= 0.0 and lam.max().item() < 1.0
    assert lam.mean().item() == pytest.approx(0.5, abs=0.03)
    grpo = compute_advantages(rewards, "grpo").advantages
    apd = compute_advantages(rewards, "apd").advantages
    torch.testing.assert_close(a.advantages, (1 - lam[:, None]) * grpo + lam[:, None] * apd)


# ----------------------------------------------------------------------------- success and dapo


def test_only_full_reward_counts_as_success_with_the_paper_reward() -> None:
    rewards = t([[0.0, 0.1, 0.9, 1.0]])
    assert success_mask(rewards).tolist() == [[False, False, False, True]]
    assert compute_advantages(rewards).groups.p.item() == 0.25
    assert compute_advantages(rewards, success_threshold=0.9).groups.p.item() == 0.5
    assert compute_advantages(rewards, max_reward=2.0).groups.p.item() == 0.0


def test_success_tolerates_rounding_just_below_the_threshold_only() -> None:
    rewards = torch.tensor([1.0 - 1e-12, 1.0 - 1e-6, 0.1 + 0.9, 2.0], dtype=torch.float64)
    assert success_mask(rewards).tolist() == [True, False, True, True]


def test_dapo_keeps_groups_with_mixed_outcomes_only() -> None:
    rewards = t(
        [
            [0.0, 1.0, 0.0, 0.0],  # mixed: keep
            [1.0, 1.0, 1.0, 1.0],  # all solved: drop
            [0.0, 0.0, 0.0, 0.0],  # none solved: drop
            [0.0, 0.1, 0.1, 0.0],  # rewards differ but no success: drop
            [0.9, 1.0, 1.0, 1.0],  # 3 of 4 solved: keep
        ]
    )
    assert dapo_keep_mask(rewards).tolist() == [True, False, False, False, True]
    ids = torch.tensor([9, 9, 2, 2, 9, 2])
    flat = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    assert dapo_keep_mask(flat, ids).tolist() == [False, True]  # rows: id 2, id 9


def test_dapo_bounds_are_strict_on_the_success_share() -> None:
    # 1 success in 128 is a share of 0.0078, below the 0.01 bound.
    rewards = torch.zeros(1, 128, dtype=torch.float64)
    rewards[0, 0] = 1.0
    assert dapo_keep_mask(rewards).tolist() == [False]
    assert dapo_keep_mask(rewards, low=0.0).tolist() == [True]
    half = t([[1.0, 0.0]])
    assert dapo_keep_mask(half, low=0.5).tolist() == [False]
    with pytest.raises(AdvantageInputError, match="low < high"):
        dapo_keep_mask(half, low=0.9, high=0.1)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("estimator", NONNEG_ONLY)
def test_negative_rewards_are_rejected_where_the_mean_divides(estimator: str) -> None:
    with pytest.raises(AdvantageInputError, match=r"needs rewards >= 0.*-0\.5"):
        compute_advantages(t([[0.5, -0.5, 1.0]]), estimator)
    with pytest.raises(AdvantageInputError, match="non-negative"):
        compute_advantages_ragged(torch.tensor([0.5, -0.5]), torch.tensor([0, 0]), estimator)


@pytest.mark.parametrize("estimator", SIGNED_OK)
def test_negative_rewards_are_fine_for_estimators_that_do_not_divide_by_the_mean(
    estimator: str,
) -> None:
    res = compute_advantages(t([[0.5, -0.5, 1.0, -1.0]]), estimator)
    assert torch.isfinite(res.advantages).all()
    assert res.advantages[0, 2] > 0 > res.advantages[0, 3]


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_inf_rewards_are_rejected(estimator: str, bad: float) -> None:
    with pytest.raises(AdvantageInputError, match="NaN or infinite"):
        compute_advantages(t([[0.5, bad, 1.0]]), estimator)
    with pytest.raises(AdvantageInputError, match="NaN or infinite"):
        compute_advantages_ragged(torch.tensor([0.5, bad]), torch.tensor([1, 1]), estimator)


def test_huge_rewards_are_rejected_rather_than_overflowing() -> None:
    with pytest.raises(AdvantageInputError, match="exceeds"):
        compute_advantages(t([[1e200, 0.0]]), "grpo")
    # Fits float64 internally but not the float32 output.
    with pytest.raises(AdvantageInputError, match="do not fit"):
        compute_advantages(torch.tensor([[3e38, -3e38]]), "rloo")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"estimator": "ppo"}, "unknown estimator 'ppo'"),
        ({"std": "unbiased"}, "std must be"),
        ({"eps": 0.0}, "eps must be"),
        ({"eps": math.nan}, "eps must be"),
        ({"advantage_clip": 0.0}, "advantage_clip must be"),
    ],
)
def test_bad_options_are_rejected_with_a_clear_message(
    kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(AdvantageInputError, match=message):
        compute_advantages(t([[0.0, 1.0]]), **kwargs)  # type: ignore[arg-type]


def test_bad_shapes_and_ids_are_rejected() -> None:
    with pytest.raises(AdvantageInputError, match=r"\[num_groups, G\]"):
        compute_advantages(torch.tensor([0.0, 1.0]))
    with pytest.raises(AdvantageInputError, match="at least one rollout"):
        compute_advantages(torch.zeros(3, 0))
    with pytest.raises(AdvantageInputError, match="flat"):
        compute_advantages_ragged(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(AdvantageInputError, match="one group id per reward"):
        compute_advantages_ragged(torch.zeros(3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(AdvantageInputError, match="must be integers"):
        compute_advantages_ragged(torch.zeros(2), torch.zeros(2))


# ----------------------------------------------------------------------------- dtypes, empties


def test_output_dtype_follows_input_and_integers_become_float32() -> None:
    assert compute_advantages(torch.tensor([[0.0, 1.0]])).advantages.dtype == torch.float32
    assert compute_advantages(t([[0.0, 1.0]])).advantages.dtype == torch.float64
    res = compute_advantages(torch.tensor([[0, 1, 1, 1]]))
    assert res.advantages.dtype == torch.float32
    assert res.groups.p.item() == 0.75
    assert res.group_index.dtype == torch.long


def test_empty_batch_gives_empty_results() -> None:
    dense = compute_advantages(torch.zeros(0, 8))
    assert dense.advantages.shape == (0, 8) and dense.groups.p.shape == (0,)
    ragged = compute_advantages_ragged(torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert ragged.advantages.shape == (0,) and ragged.groups.size.shape == (0,)


# ----------------------------------------------------------------------------- properties

reward_values = st.one_of(
    st.sampled_from([0.0, 0.1, 0.9, 1.0]),
    st.floats(0.0, 1.0),
    st.floats(0.0, 1e-6),
    st.floats(0.0, 1e-300, allow_subnormal=True),
    st.floats(0.0, 1e6),
)
groups = st.lists(st.lists(reward_values, min_size=1, max_size=16), min_size=1, max_size=6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    groups=groups,
    estimator=st.sampled_from(ESTIMATORS),
    std=st.sampled_from(["population", "sample"]),
)
def test_random_nonnegative_groups_give_finite_keyed_advantages(
    groups: list[list[float]], estimator: str, std: str
) -> None:
    rewards = torch.tensor([r for grp in groups for r in grp], dtype=torch.float64)
    ids = torch.tensor([k for k, grp in enumerate(groups) for _ in grp])
    res = compute_advantages_ragged(
        rewards, ids, estimator, std=std, generator=torch.Generator().manual_seed(0)
    )
    adv = res.advantages
    assert torch.isfinite(adv).all()
    flat = res.groups.zero_variance[res.group_index]
    assert torch.equal(adv[flat], torch.zeros_like(adv[flat]))
    if estimator in NONNEG_ONLY:
        # Non-negative rewards bound |APD| by G and |z| by sqrt(G): the mix cannot blow up.
        assert (adv.abs() <= res.groups.size[res.group_index].double()).all()

    perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(len(ids)))
    shuffled = compute_advantages_ragged(
        rewards[perm], ids[perm], estimator, std=std, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(shuffled.advantages, adv[perm])

    if estimator != "mapo_random_lambda":  # its lambda is drawn per batch, not per group
        for k, grp in enumerate(groups):
            alone = compute_advantages(torch.tensor([grp], dtype=torch.float64), estimator, std=std)
            torch.testing.assert_close(adv[ids == k], alone.advantages[0])


@settings(max_examples=60, deadline=None)
@given(group=st.lists(reward_values, min_size=2, max_size=16))
def test_mapo_matches_the_paper_equations_in_plain_python(group: list[float]) -> None:
    res = compute_advantages(torch.tensor([group], dtype=torch.float64), "mapo")
    # All-equal groups are 0 by rule; elsewhere the equations hold as written.
    expected = [0.0] * len(group) if len(set(group)) == 1 else mapo_by_hand(group)
    torch.testing.assert_close(
        res.advantages[0], torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=1e-12
    )


@settings(max_examples=60, deadline=None)
@given(
    groups=st.lists(st.lists(st.floats(width=32), min_size=1, max_size=12), min_size=1, max_size=4),
    estimator=st.sampled_from(ESTIMATORS),
)
def test_any_float32_input_either_raises_clearly_or_gives_finite_output(
    groups: list[list[float]], estimator: str
) -> None:
    g = max(len(grp) for grp in groups)
    rewards = torch.tensor([grp + [grp[0]] * (g - len(grp)) for grp in groups])
    try:
        res = compute_advantages(rewards, estimator)
    except AdvantageInputError:
        return
    assert res.advantages.dtype == torch.float32
    assert torch.isfinite(res.advantages).all()
    assert torch.isfinite(res.z_part).all() and torch.isfinite(res.apd_part).all()


def test_benchmark_runs_on_a_small_batch(capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from services.benchmarks.advantages import main
    from services.core.config import RunConfig

    assert main(argparse.Namespace(groups=64, group_size=4, repeats=1), RunConfig()) == 0
    out = capsys.readouterr().out
    for line in ("mapo       dense", "mapo       ragged", "grpo       dense", "grpo       ragged"):
        assert line in out
