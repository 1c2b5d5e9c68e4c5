"""One training step: the paper's objective on one batch of scored groups.

Read :func:`train_step` top to bottom: old log-probs, reference log-probs, advantages per group,
importance weights for stale groups, then one clipped AdamW step per PPO epoch, then the
diagnostics. Everything numeric (advantages, the loss) comes from ``services.core``; this module
only feeds it tensors and micro-batches the model.

PPO's "old" policy is the policy before the first update. In general (``ppo_epochs > 1``) its
log-probs are computed once, without gradients, before any update, and stay fixed while the
epochs move the model. With one epoch (the default) the old policy *is* the policy the only
update differentiates: the old log-probs equal the detached log-probs of that update's own
forward pass, so the ratio is exactly 1. The *fused* path then runs one forward pass per
micro-batch instead of two, and takes the old log-probs, the entropy and the untempered
log-probs from it.

Micro-batching does not change the objective: each micro-batch's loss is weighted by its share
of what the aggregation divides by (tokens for token_mean, sequences with tokens for seq_mean,
rows for token_sum), so the summed gradient equals that of the whole batch at once.

Each phase is timed (:class:`~services.trainer.timing.PhaseTimer`): ``old_s``, ``ref_s``,
``forward_s``, ``backward_s`` (both summed over micro-batches and epochs), ``optimizer_s``
(grad clip and step).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from services.core.advantages import AdvantageResult, compute_advantages_ragged
from services.core.loss import LossInputs, LossStats, policy_loss
from services.trainer.batch import TrainBatch
from services.trainer.logprobs import (
    TokenScores,
    effective_temperature,
    forward_logprobs,
    row_slices,
    score_tokens,
)
from services.trainer.timing import PhaseTimer

if TYPE_CHECKING:
    from services.core.config import RunConfig

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    """Scalar diagnostics plus the per-group values that feed histograms."""

    metrics: dict[str, float | None]
    p: list[float] = field(default_factory=list)
    lam: list[float] = field(default_factory=list)
    staleness: list[int] = field(default_factory=list)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: TrainBatch,
    config: RunConfig,
    *,
    amp_dtype: torch.dtype | None = None,
    ref_model: nn.Module | None = None,
    generator: torch.Generator | None = None,
    timer: PhaseTimer | None = None,
    fused: bool | None = None,
) -> StepResult:
    """Apply one batch to ``model``: ``algorithm.ppo_epochs`` clipped AdamW steps.

    ``amp_dtype`` is the autocast dtype of the forward passes (None: the parameters' own).
    ``fused`` (default: one PPO epoch) takes the old log-probs from the update's own forward
    pass; False forces the separate old-policy pass (tests and benchmarks compare them).
    """
    algo = config.algorithm
    ids, attn = batch.input_ids, batch.attention_mask
    timer = timer if timer is not None else PhaseTimer(ids.device)
    # One epoch: the old log-probs come from the update's own forward pass (module docstring).
    if fused is None:
        fused = algo.ppo_epochs == 1
    if fused and algo.ppo_epochs != 1:
        raise ValueError(
            "the fused forward pass needs ppo_epochs == 1: later epochs need fixed old log-probs"
        )

    def score(m: nn.Module, *, extras: bool = False) -> TokenScores:
        return score_tokens(
            m,
            ids,
            attn,
            micro_batch=config.optim.micro_batch,
            temperature=config.rollout.temperature,
            with_entropy=extras,
            with_raw=extras,
            amp_dtype=amp_dtype,
        )

    # 1. The policy before the update is PPO's "old" policy; also the token entropy and the
    #    untempered log-probs, which are what the inference engine reports. Fixed here, before
    #    the first update; the fused path gets them from the update's forward pass instead.
    old: TokenScores | None = None
    if not fused:
        with timer.phase("old"):
            old = score(model, extras=True)

    # 2. The frozen reference policy, for the KL loss.
    ref = None
    if algo.kl_coef > 0.0:
        if ref_model is None:
            raise ValueError("kl_coef > 0 needs a reference model")
        with timer.phase("ref"):
            ref = score(ref_model).logprobs

    # 3. Advantages per group, keyed by group id: shuffling the rows cannot change them.
    adv = compute_advantages_ragged(
        batch.rewards,
        batch.group_index,
        algo.estimator,
        eps=algo.eps,
        std=algo.std,
        max_reward=config.task.max_reward,
        success_threshold=config.task.success_threshold,
        advantage_clip=algo.advantage_clip,
        generator=generator,
    )
    advantages = adv.advantages.to(torch.float32)

    # 4. Stale groups kept under stale_policy="correct" get w = min(pi_old / mu, tis_cap) per
    #    token, mu being the policy that generated them; every other row weighs exactly 1
    #    (built per micro-batch from the old log-probs: see _behaviour).
    tis = algo.tis_cap is not None and bool(batch.correct.any())

    # 5. PPO epochs: micro-batched forward/backward, grad-norm clip, one AdamW step each.
    params = [p for p in model.parameters() if p.requires_grad]
    loss_stats: LossStats | None = None
    grad_norms: list[float] = []
    for _ in range(algo.ppo_epochs):
        epoch = _backward(model, batch, advantages, ref, config, amp_dtype, timer, old=old, tis=tis)
        if old is None:  # fused: that forward pass was the old policy's
            old = epoch.scores
        with timer.phase("optimizer"):
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.optim.grad_clip))
            if math.isfinite(grad_norm):
                optimizer.step()
            else:
                log.warning("non-finite gradient norm %s: optimiser step skipped", grad_norm)
            optimizer.zero_grad(set_to_none=True)
        grad_norms.append(grad_norm)
        loss_stats = loss_stats or epoch.stats  # report the first (on-policy) epoch
    assert old is not None and loss_stats is not None

    # 6. Diagnostics.
    old_raw = old.raw_logprobs if old.raw_logprobs is not None else old.logprobs
    metrics = _diagnostics(batch, adv, old.entropy, old_raw)
    metrics.update(loss_stats.as_dict())
    metrics["grad_norm"] = grad_norms[0] if math.isfinite(grad_norms[0]) else None
    metrics["nonfinite_grad_steps"] = float(sum(not math.isfinite(g) for g in grad_norms))
    staleness = torch.zeros(len(batch.group_ids), dtype=torch.long)
    staleness.scatter_(0, batch.group_index.cpu(), batch.staleness.cpu())
    metrics["staleness_mean"] = float(staleness.to(torch.float64).mean())
    metrics.update(timer.fields())
    return StepResult(
        metrics=metrics,
        p=adv.groups.p.tolist(),
        lam=adv.groups.lam.tolist(),
        staleness=staleness.tolist(),
    )


def _micro_weight(mask: Tensor, batch_mask: Tensor, agg: str) -> float:
    """This micro-batch's share of the aggregation's denominator (they sum to 1)."""
    if agg == "token_mean":
        return float(mask.sum()) / max(float(batch_mask.sum()), 1.0)
    if agg == "seq_mean":
        return float(mask.any(-1).sum()) / max(float(batch_mask.any(-1).sum()), 1.0)
    return mask.shape[0] / max(batch_mask.shape[0], 1)


def _behaviour(
    behaviour_logprobs: Tensor, correct: Tensor, old_logprobs: Tensor, old_raw: Tensor
) -> Tensor:
    """What the loss takes as mu: for corrected rows the engine's log-probs, shifted by
    (tempered - raw) so that raw - raw becomes the ratio the loss computes; for every other
    row pi_old itself, so that its weight is exactly 1."""
    shifted = behaviour_logprobs + (old_logprobs - old_raw)
    return torch.where(correct[:, None], shifted, old_logprobs)


@dataclass
class _Epoch:
    stats: LossStats
    """The whole batch's loss statistics (micro-batches combined)."""
    scores: TokenScores | None
    """Fused path only: the detached log-probs, entropy and raw log-probs of its forward."""


def _backward(
    model: nn.Module,
    batch: TrainBatch,
    advantages: Tensor,
    ref: Tensor | None,
    config: RunConfig,
    amp_dtype: torch.dtype | None,
    timer: PhaseTimer,
    *,
    old: TokenScores | None,
    tis: bool,
) -> _Epoch:
    """Accumulate the whole batch's loss gradient; return its loss statistics.

    ``old`` is the old policy's scores, or None for the fused path: each micro-batch's old
    log-probs are then the detached log-probs of its own forward pass, which also yields the
    entropy and raw log-probs (collected, batch-shaped, into the returned scores).
    """
    fused = old is None
    temperature = config.rollout.temperature
    lengths = batch.attention_mask.sum(-1)
    shape = (batch.size, batch.input_ids.shape[1] - 1)
    zeros = torch.zeros(shape, dtype=torch.float32, device=batch.input_ids.device)
    raw_needed = effective_temperature(temperature) != 1.0
    collected = (
        TokenScores(zeros, zeros.clone(), zeros.clone() if raw_needed else None) if fused else None
    )
    parts: list[tuple[LossStats, float]] = []
    for rows in row_slices(batch.size, config.optim.micro_batch):
        n = max(int(lengths[rows].max()), 2)
        cols = slice(0, n - 1)
        m = batch.response_mask[rows, cols]
        with timer.phase("forward"):
            scored = forward_logprobs(
                model,
                batch.input_ids[rows, :n],
                batch.attention_mask[rows, :n],
                temperature=temperature,
                with_entropy=fused,
                with_raw=fused,
                amp_dtype=amp_dtype,
            )
            lp = scored.logprobs
            if collected is not None:
                old_lp = lp.detach()
                old_raw = scored.raw_logprobs if scored.raw_logprobs is not None else old_lp
                _put(collected, rows, cols, old_lp, scored.entropy, scored.raw_logprobs)
            else:
                assert old is not None
                old_lp = old.logprobs[rows, cols]
                raw = old.raw_logprobs if old.raw_logprobs is not None else old.logprobs
                old_raw = raw[rows, cols]
            behaviour = (
                _behaviour(
                    batch.behaviour_logprobs[rows, cols], batch.correct[rows], old_lp, old_raw
                )
                if tis
                else None
            )
            inputs = LossInputs(
                logprobs=lp,
                old_logprobs=old_lp,
                advantages=advantages[rows],
                mask=m,
                ref_logprobs=None if ref is None else ref[rows, cols],
                behaviour_logprobs=behaviour,
            )
            loss, stats = policy_loss(inputs, config.algorithm)
            weight = _micro_weight(m, batch.response_mask, config.algorithm.loss_agg)
        with timer.phase("backward"):
            (loss * weight).backward()  # type: ignore[no-untyped-call]
        parts.append((stats, weight))
    return _Epoch(LossStats.combine(parts), collected)


def _put(
    into: TokenScores,
    rows: slice,
    cols: slice,
    logprobs: Tensor,
    entropy: Tensor | None,
    raw: Tensor | None,
) -> None:
    """Write one micro-batch's detached scores into the batch-shaped ones (as score_tokens)."""
    into.logprobs[rows, cols] = logprobs
    if into.entropy is not None and entropy is not None:
        into.entropy[rows, cols] = entropy
    if into.raw_logprobs is not None and raw is not None:
        into.raw_logprobs[rows, cols] = raw


def _masked_mean(values: Tensor, mask: Tensor) -> float | None:
    n = int(mask.sum())
    if n == 0:
        return None
    return float(torch.where(mask, values, 0.0).sum() / n)


def _diagnostics(
    batch: TrainBatch, adv: AdvantageResult, entropy: Tensor | None, old_raw: Tensor
) -> dict[str, float | None]:
    """What the dashboards plot: rewards, certainty, advantage terms, entropy, mismatch."""
    a = adv.advantages.to(torch.float64)
    groups = adv.groups
    mask = batch.response_mask
    mismatch = (old_raw - batch.behaviour_logprobs).abs()
    fresh = mask & (batch.staleness == 0)[:, None]
    return {
        "groups": float(len(batch.group_ids)),
        "sequences": float(batch.size),
        "tokens": float(batch.tokens),
        "response_tokens": float(batch.response_tokens),
        "reward_mean": float(batch.rewards.mean()),
        "accuracy": float(batch.success.to(torch.float64).mean()),
        "p_mean": float(groups.p.mean()),
        "lambda_mean": float(groups.lam.mean()),
        "zero_variance_share": float(groups.zero_variance.to(torch.float64).mean()),
        "adv_mean": float(a.mean()),
        "adv_std": float(a.std(unbiased=False)),
        "adv_min": float(a.min()),
        "adv_max": float(a.max()),
        "adv_abs_mean": float(a.abs().mean()),
        "z_part_abs_mean": float(adv.z_part.abs().to(torch.float64).mean()),
        "apd_part_abs_mean": float(adv.apd_part.abs().to(torch.float64).mean()),
        "entropy": None if entropy is None else _masked_mean(entropy, mask),
        "logprob_mismatch": _masked_mean(mismatch, mask),
        "logprob_mismatch_fresh": _masked_mean(mismatch, fresh),
    }
