"""Group-relative advantage estimators: MAPO and the GRPO family.

Every rollout of one prompt belongs to a group; each estimator scores a rollout against the
rewards of its own group only. Quantities that belong to a group (mean, std, certainty, lambda)
are computed per group and attached to samples through an explicit group index, never by
position, so a batch reordered for load balancing keeps every sample's advantage.

For a group of G rewards r_1..r_G (MAPO, arXiv 2509.18849, eqs. 2-6):

- ``mu = mean(r)``; ``sigma`` = population std (1/G, the paper) or sample std (1/(G-1)).
- ``z_i = (r_i - mu) / (sigma + eps)``; ``APD_i = (r_i - mu) / (mu + eps)``.
- ``p = N / G`` with N the successful rollouts; ``lambda = 1 - 4 p (1 - p)``.

Estimators (``A`` is the advantage; ``z_part + apd_part == A``):

- ``mapo``: ``A = (1 - lambda) z + lambda APD``; z_part ``(1 - lambda) z``, apd_part
  ``lambda APD``.
- ``mapo_random_lambda``: the same with ``lambda ~ U(0, 1)`` per group (the paper's ablation).
- ``grpo`` and ``dapo``: ``A = z`` (DAPO's group filter is :func:`dapo_keep_mask`).
- ``apd``: ``A = APD``, all in apd_part.
- ``dr_grpo``: ``A = r - mu``; ``rloo``: ``A = r_i - mean of the other G - 1 rewards``. Both
  are mean-centred terms without APD, so they count as z_part.

Edge cases, decided here:

- Quantities are keyed by group id, never by position: the ragged form sums each group in a
  canonical (id, reward) order, so shuffling a batch permutes its advantages bit for bit.
- A group whose rewards are all equal (G = 1 included) gets advantage exactly 0 under every
  estimator: it carries no preference signal.
- With ``std="sample"`` a group of one has sigma 0 (not 0/0).
- Success is ``r >= threshold`` where the threshold is ``success_threshold`` or, by default,
  ``max_reward``; a reward within 1e-9 (relative) below the threshold still counts, so
  rounding in a weighted reward such as ``0.1 * format + 0.9 * accuracy`` cannot turn a full
  score into a failure.
- ``mapo``, ``apd`` and ``mapo_random_lambda`` divide by the group mean, which is only
  meaningful for non-negative rewards: negative rewards raise :class:`AdvantageInputError`.
  With non-negative rewards ``|APD| < G`` and ``|z| <= sqrt(G)``, so these estimators are
  bounded. ``grpo``, ``dapo``, ``dr_grpo`` and ``rloo`` accept negative rewards.
- NaN or infinite rewards, and rewards beyond ``MAX_ABS_REWARD`` in magnitude (their squares
  would overflow), raise :class:`AdvantageInputError` for every estimator. A result that does
  not fit the output dtype raises too: nothing returns inf or NaN.
- A small group mean makes APD large (``[0, 0, 0, 0.1]`` gives +3 for the 0.1 rollout); that
  is the method. ``advantage_clip`` (off by default) caps ``|A|``; the two parts are scaled by
  the same factor, so ``z_part + apd_part == advantages`` always holds.

Computation is in float64 and the result is cast back to the input's floating dtype (float32
for integer or bool input).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

ESTIMATORS = ("mapo", "grpo", "apd", "mapo_random_lambda", "dr_grpo", "rloo", "dapo")
STD_KINDS = ("population", "sample")

# Squares of larger rewards overflow float64, which would silently turn sigma into inf.
MAX_ABS_REWARD = 1e100
# Relative slack below the success threshold that still counts as success.
SUCCESS_RTOL = 1e-9

_DIVIDES_BY_MEAN = frozenset({"mapo", "apd", "mapo_random_lambda"})
_USES_Z = frozenset({"mapo", "grpo", "dapo", "mapo_random_lambda"})


class AdvantageInputError(ValueError):
    """Rewards or options the estimators cannot turn into finite advantages; says why."""


@dataclass(frozen=True)
class GroupStats:
    """Per-group statistics, one entry per group (tensors of shape [num_groups], float64)."""

    p: Tensor
    """Trajectory certainty N / G, N = successful rollouts."""
    lam: Tensor
    """lambda(p) = 1 - 4 p (1 - p); for ``mapo_random_lambda`` the random lambda used."""
    mu: Tensor
    """Mean reward."""
    sigma: Tensor
    """Reward std (population by default, sample with ``std="sample"``)."""
    zero_variance: Tensor
    """Bool: every reward in the group is equal, so all its advantages are 0."""
    size: Tensor
    """Long: G, the number of rollouts in the group."""


@dataclass(frozen=True)
class AdvantageResult:
    """Advantages plus the parts and group statistics they came from (for metrics)."""

    advantages: Tensor
    """Same shape and floating dtype as the rewards."""
    z_part: Tensor
    """Contribution of the z-score / mean-centred term: (1 - lambda) z for MAPO, z for GRPO,
    the whole advantage for ``dr_grpo`` and ``rloo``, 0 for ``apd``."""
    apd_part: Tensor
    """Contribution of the APD term: lambda APD for MAPO, APD for ``apd``, 0 otherwise."""
    groups: GroupStats
    group_index: Tensor
    """Long, same shape as ``advantages``: the row of ``groups`` each sample belongs to."""


def success_mask(
    rewards: Tensor, *, max_reward: float = 1.0, success_threshold: float | None = None
) -> Tensor:
    """Bool mask of successful rollouts: ``reward >= threshold`` (within 1e-9 relative).

    The threshold is ``success_threshold`` when given, else ``max_reward``: with the paper's
    reward ``0.1 * format + 0.9 * accuracy`` only a full score of 1 is a success.
    """
    threshold = max_reward if success_threshold is None else success_threshold
    if not math.isfinite(threshold):
        raise AdvantageInputError(f"success threshold must be finite, got {threshold}")
    limit = threshold - SUCCESS_RTOL * abs(threshold)
    return rewards.to(torch.float64) >= limit


def compute_advantages(
    rewards: Tensor,
    estimator: str = "mapo",
    *,
    eps: float = 1e-6,
    std: str = "population",
    max_reward: float = 1.0,
    success_threshold: float | None = None,
    advantage_clip: float | None = None,
    generator: torch.Generator | None = None,
) -> AdvantageResult:
    """Advantages of a dense batch: ``rewards[g, i]`` is rollout i of group g, shape [groups, G]."""
    _check_options(estimator, eps, std, advantage_clip)
    if rewards.ndim != 2:
        raise AdvantageInputError(
            f"rewards must have shape [num_groups, G], got {tuple(rewards.shape)}; "
            "use compute_advantages_ragged for a flat batch with group ids"
        )
    num_groups, g = rewards.shape
    if g == 0:
        raise AdvantageInputError("a group needs at least one rollout (G = 0)")
    r = _validated_rewards(rewards, estimator)
    device = r.device

    mu = r.mean(dim=1)
    dev = r - mu[:, None]
    sq_dev = (dev * dev).sum(dim=1)
    successes = success_mask(r, max_reward=max_reward, success_threshold=success_threshold)
    n_success = successes.sum(dim=1)
    size = torch.full((num_groups,), g, dtype=torch.long, device=device)
    zero_variance = (r == r[:, :1]).all(dim=1)
    group_index = torch.arange(num_groups, device=device)[:, None].expand(num_groups, g)

    return _finish(
        r,
        dev,
        mu,
        sq_dev,
        n_success,
        size,
        zero_variance,
        group_index.contiguous(),
        lambda t: t[:, None],
        estimator=estimator,
        eps=eps,
        std=std,
        advantage_clip=advantage_clip,
        generator=generator,
        out_dtype=_out_dtype(rewards),
    )


def compute_advantages_ragged(
    rewards: Tensor,
    group_ids: Tensor,
    estimator: str = "mapo",
    *,
    eps: float = 1e-6,
    std: str = "population",
    max_reward: float = 1.0,
    success_threshold: float | None = None,
    advantage_clip: float | None = None,
    generator: torch.Generator | None = None,
) -> AdvantageResult:
    """Advantages of a flat batch in any order: sample i belongs to group ``group_ids[i]``.

    Groups may differ in size and their samples need not be contiguous. Rows of
    ``result.groups`` follow the sorted unique ids; ``result.group_index`` maps each sample
    to its row. With the same generator, ``mapo_random_lambda`` draws the same lambda for the
    k-th smallest id as the dense form does for row k.
    """
    _check_options(estimator, eps, std, advantage_clip)
    if rewards.ndim != 1:
        raise AdvantageInputError(
            f"rewards must be flat [n], got {tuple(rewards.shape)}; "
            "use compute_advantages for a dense [num_groups, G] batch"
        )
    _check_group_ids(group_ids, rewards)
    r = _validated_rewards(rewards, estimator)
    groups = _sort_groups(r, group_ids.to(r.device))

    def per_group_sum(sorted_values: Tensor) -> Tensor:
        if sorted_values.numel() == 0:  # segment_reduce rejects empty input
            return sorted_values.new_zeros(0)
        return torch.segment_reduce(sorted_values, "sum", lengths=groups.size)

    index = groups.index
    r_sorted = r.index_select(0, groups.order)
    mu = per_group_sum(r_sorted) / groups.size.to(torch.float64)
    dev_sorted = r_sorted - mu.index_select(0, groups.row_sorted)
    sq_dev = per_group_sum(dev_sorted * dev_sorted)
    dev = r - mu.index_select(0, index)  # the same values, in the caller's order
    successes = success_mask(r, max_reward=max_reward, success_threshold=success_threshold)
    n_success = torch.zeros_like(groups.size).index_add_(0, index, successes.to(torch.long))
    # Rewards are sorted within each group: all equal <=> first == last.
    last = groups.size.cumsum(0) - 1
    first = last - groups.size + 1
    zero_variance = r_sorted.index_select(0, first) == r_sorted.index_select(0, last)

    return _finish(
        r,
        dev,
        mu,
        sq_dev,
        n_success,
        groups.size,
        zero_variance,
        index,
        lambda x: x.index_select(0, index),
        estimator=estimator,
        eps=eps,
        std=std,
        advantage_clip=advantage_clip,
        generator=generator,
        out_dtype=_out_dtype(rewards),
    )


def dapo_keep_mask(
    rewards: Tensor,
    group_ids: Tensor | None = None,
    *,
    low: float = 0.01,
    high: float = 0.99,
    max_reward: float = 1.0,
    success_threshold: float | None = None,
) -> Tensor:
    """DAPO dynamic sampling: which groups to keep, as a bool tensor of shape [num_groups].

    Rule: keep a group iff its success share ``p = N / G`` satisfies ``low < p < high``
    (strict), with success as in :func:`success_mask`. For G <= 100 and the defaults this is
    "at least one success and at least one failure". The filter looks at outcomes, not raw
    rewards: ``[0, 0.1, 0.1, 0]`` (format credit, no correct answer) is dropped.

    ``rewards`` is dense [num_groups, G], or flat [n] with ``group_ids`` (rows then follow the
    sorted unique ids, as in :func:`compute_advantages_ragged`).
    """
    if not 0.0 <= low < high <= 1.0:
        raise AdvantageInputError(f"need 0 <= low < high <= 1, got low={low}, high={high}")
    successes = success_mask(rewards, max_reward=max_reward, success_threshold=success_threshold)
    if group_ids is None:
        if rewards.ndim != 2:
            raise AdvantageInputError(
                f"rewards must be [num_groups, G] without group_ids, got {tuple(rewards.shape)}"
            )
        p = successes.to(torch.float64).mean(dim=1)
    else:
        if rewards.ndim != 1:
            raise AdvantageInputError(
                f"rewards must be flat [n] with group_ids, got {tuple(rewards.shape)}"
            )
        _check_group_ids(group_ids, rewards)
        groups = _sort_groups(rewards.to(torch.float64), group_ids.to(rewards.device))
        n = torch.zeros_like(groups.size).index_add_(0, groups.index, successes.to(torch.long))
        p = n.to(torch.float64) / groups.size.to(torch.float64)
    return (p > low) & (p < high)


# ----------------------------------------------------------------------------- internals


def _check_options(estimator: str, eps: float, std: str, advantage_clip: float | None) -> None:
    if estimator not in ESTIMATORS:
        raise AdvantageInputError(
            f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}"
        )
    if std not in STD_KINDS:
        raise AdvantageInputError(f"std must be 'population' or 'sample', got {std!r}")
    if not (math.isfinite(eps) and eps > 0.0):
        raise AdvantageInputError(f"eps must be a finite number > 0, got {eps}")
    if advantage_clip is not None and not advantage_clip > 0.0:
        raise AdvantageInputError(
            f"advantage_clip must be > 0 (or None for off), got {advantage_clip}"
        )


def _check_group_ids(group_ids: Tensor, rewards: Tensor) -> None:
    if group_ids.shape != rewards.shape:
        raise AdvantageInputError(
            f"group_ids has shape {tuple(group_ids.shape)} but rewards {tuple(rewards.shape)}; "
            "give one group id per reward"
        )
    if group_ids.dtype.is_floating_point or group_ids.is_complex() or group_ids.dtype == torch.bool:
        raise AdvantageInputError(f"group_ids must be integers, got {group_ids.dtype}")


@dataclass(frozen=True)
class _SortedGroups:
    order: Tensor  # permutation putting samples in (group id, reward) order
    row_sorted: Tensor  # group row of each sample in that order
    index: Tensor  # group row of each sample in the caller's order
    size: Tensor  # samples per group row


def _sort_groups(r: Tensor, group_ids: Tensor) -> _SortedGroups:
    """Group rows by sorted unique id, and a canonical (id, reward) order of the samples.

    Sums taken in the canonical order do not depend on how the batch was shuffled, so a
    reordered batch gets bit-identical advantages, not just equal up to rounding.
    """
    n = r.numel()
    if n == 0:
        empty = torch.zeros(0, dtype=torch.long, device=r.device)
        return _SortedGroups(order=empty, row_sorted=empty, index=empty, size=empty)
    # Equal rewards are interchangeable, so only the second sort needs to be stable.
    by_value = torch.sort(r).indices
    ids_sorted, by_id = torch.sort(group_ids.index_select(0, by_value), stable=True)
    order = by_value.index_select(0, by_id)
    starts = torch.ones(n, dtype=torch.bool, device=r.device)
    starts[1:] = ids_sorted[1:] != ids_sorted[:-1]
    row_sorted = starts.cumsum(0) - 1
    index = torch.empty_like(row_sorted).scatter_(0, order, row_sorted)
    size = torch.bincount(row_sorted)
    return _SortedGroups(order=order, row_sorted=row_sorted, index=index, size=size)


def _out_dtype(rewards: Tensor) -> torch.dtype:
    return rewards.dtype if rewards.dtype.is_floating_point else torch.get_default_dtype()


def _validated_rewards(rewards: Tensor, estimator: str) -> Tensor:
    """The rewards as float64, after rejecting what no estimator can score sensibly."""
    if rewards.is_complex():
        raise AdvantageInputError(f"rewards must be real numbers, got {rewards.dtype}")
    r = rewards.detach().to(torch.float64)
    if r.numel() == 0:
        return r
    finite = torch.isfinite(r)
    if not bool(finite.all()):
        bad = int((~finite).sum().item())
        raise AdvantageInputError(
            f"{bad} reward(s) are NaN or infinite; the reward function must return finite "
            "numbers (score unscorable rollouts explicitly, e.g. as 0)"
        )
    largest = float(r.abs().max().item())
    if largest > MAX_ABS_REWARD:
        raise AdvantageInputError(
            f"reward of magnitude {largest:.3g} exceeds {MAX_ABS_REWARD:.0e}; rescale the rewards"
        )
    if estimator in _DIVIDES_BY_MEAN:
        smallest = float(r.min().item())
        if smallest < 0.0:
            raise AdvantageInputError(
                f"estimator {estimator!r} divides by the group mean reward and needs rewards "
                f">= 0, got {smallest:.6g}; shift the rewards to be non-negative or use "
                "grpo, dr_grpo or rloo"
            )
    return r


def _finish(
    r: Tensor,
    dev: Tensor,
    mu: Tensor,
    sq_dev: Tensor,
    n_success: Tensor,
    size: Tensor,
    zero_variance: Tensor,
    group_index: Tensor,
    expand: Callable[[Tensor], Tensor],
    *,
    estimator: str,
    eps: float,
    std: str,
    advantage_clip: float | None,
    generator: torch.Generator | None,
    out_dtype: torch.dtype,
) -> AdvantageResult:
    """Shared tail of the dense and ragged paths; ``expand`` maps per-group to per-sample."""
    device = r.device
    size_f = size.to(torch.float64)
    if std == "population":
        var = sq_dev / size_f.clamp_min(1.0)
    else:
        # A group of one has no sample std; 0 keeps it finite (its advantage is 0 anyway).
        var = torch.where(size > 1, sq_dev / (size_f - 1.0).clamp_min(1.0), 0.0)
    sigma = var.sqrt()
    p = n_success.to(torch.float64) / size_f.clamp_min(1.0)

    if estimator == "mapo_random_lambda":
        gen_device = generator.device if generator is not None else device
        lam = torch.rand(mu.shape, generator=generator, dtype=torch.float64, device=gen_device).to(
            device
        )
    else:
        lam = 1.0 - 4.0 * p * (1.0 - p)

    # Every estimator is the deviation r - mu times one per-group factor for each part, so the
    # per-sample work is a gather and a multiply (index_select: ~10x faster than x[index]). An all-equal group gets factor 0: rounding
    # can leave ~1e-17 deviations in it, and its advantage must be exactly 0.
    one = torch.ones_like(mu)
    if estimator in ("grpo", "dapo"):
        z_coef, apd_coef = one / (sigma + eps), None
    elif estimator in ("mapo", "mapo_random_lambda"):
        z_coef, apd_coef = (1.0 - lam) / (sigma + eps), lam / (mu + eps)
    elif estimator == "apd":
        z_coef, apd_coef = None, one / (mu + eps)
    elif estimator == "dr_grpo":
        z_coef, apd_coef = one, None
    else:  # rloo
        # r_i - (sum - r_i) / (G - 1) == G / (G - 1) * (r_i - mu); G = 1 is all-equal anyway.
        z_coef, apd_coef = size_f / (size_f - 1.0).clamp_min(1.0), None

    def part(coef: Tensor | None) -> Tensor:
        if coef is None:
            return torch.zeros_like(dev)
        return dev * expand(torch.where(zero_variance, 0.0, coef))

    z_part, apd_part = part(z_coef), part(apd_coef)
    advantages = z_part + apd_part

    if advantage_clip is not None:
        clipped = advantages.clamp(-advantage_clip, advantage_clip)
        scale = torch.where(advantages != 0, clipped / advantages, 1.0)
        z_part, apd_part, advantages = z_part * scale, apd_part * scale, clipped

    advantages = advantages.to(out_dtype)
    if advantages.numel() and not bool(torch.isfinite(advantages).all()):
        raise AdvantageInputError(
            f"advantages do not fit {out_dtype} (reward magnitudes too large for estimator "
            f"{estimator!r}); rescale the rewards or pass float64 rewards"
        )
    return AdvantageResult(
        advantages=advantages,
        z_part=z_part.to(out_dtype),
        apd_part=apd_part.to(out_dtype),
        groups=GroupStats(p=p, lam=lam, mu=mu, sigma=sigma, zero_variance=zero_variance, size=size),
        group_index=group_index,
    )
