"""One training step: the paper's objective on one batch of scored groups.

Read :func:`train_step` top to bottom: old log-probs, reference log-probs, advantages per group,
importance weights for stale groups, then one clipped AdamW step per PPO epoch, then the
diagnostics. Everything numeric (advantages, the loss) comes from ``services.core``; this module
only feeds it tensors and micro-batches the model.

Micro-batching does not change the objective: each micro-batch's loss is weighted by its share
of what the aggregation divides by (tokens for token_mean, sequences with tokens for seq_mean,
rows for token_sum), so the summed gradient equals that of the whole batch at once.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from services.core.advantages import AdvantageResult, compute_advantages_ragged
from services.core.loss import policy_loss
from services.trainer.batch import TrainBatch
from services.trainer.logprobs import TokenScores, forward_logprobs, row_slices, score_tokens

if TYPE_CHECKING:
    from services.core.config import RunConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepSettings:
    """The parts of a run config one step needs (defaults: the paper's)."""

    estimator: str = "mapo"
    eps: float = 1e-6
    std: str = "population"
    max_reward: float = 1.0
    success_threshold: float | None = None
    advantage_clip: float | None = None
    clip_low: float = 0.2
    clip_high: float = 0.3
    dual_clip: float | None = 3.0
    loss_agg: str = "token_mean"
    kl_coef: float = 1e-2
    kl_type: str = "low_var_kl"
    tis_cap: float | None = 2.0
    ppo_epochs: int = 1
    grad_clip: float = 1.0
    micro_batch: int = 64
    temperature: float = 1.0
    amp_dtype: torch.dtype | None = None

    @classmethod
    def from_config(cls, config: RunConfig, amp_dtype: torch.dtype | None = None) -> StepSettings:
        a = config.algorithm
        return cls(
            estimator=a.estimator,
            eps=a.eps,
            std=a.std,
            max_reward=config.task.max_reward,
            success_threshold=config.task.success_threshold,
            advantage_clip=a.advantage_clip,
            clip_low=a.clip_low,
            clip_high=a.clip_high,
            dual_clip=a.dual_clip,
            loss_agg=a.loss_agg,
            kl_coef=a.kl_coef,
            kl_type=a.kl_type,
            tis_cap=a.tis_cap,
            ppo_epochs=a.ppo_epochs,
            grad_clip=config.optim.grad_clip,
            micro_batch=config.optim.micro_batch,
            temperature=config.rollout.temperature,
            amp_dtype=amp_dtype,
        )


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
    s: StepSettings,
    *,
    ref_model: nn.Module | None = None,
    generator: torch.Generator | None = None,
) -> StepResult:
    """Apply one batch to ``model``: ``s.ppo_epochs`` clipped AdamW steps; return diagnostics."""
    ids, attn = batch.input_ids, batch.attention_mask

    def score(m: nn.Module, *, extras: bool = False) -> TokenScores:
        return score_tokens(
            m,
            ids,
            attn,
            micro_batch=s.micro_batch,
            temperature=s.temperature,
            with_entropy=extras,
            with_raw=extras,
            amp_dtype=s.amp_dtype,
        )

    # 1. The policy before the update is PPO's "old" policy; also the token entropy and the
    #    untempered log-probs, which are what the inference engine reports.
    old = score(model, extras=True)
    old_raw = old.raw_logprobs if old.raw_logprobs is not None else old.logprobs

    # 2. The frozen reference policy, for the KL loss.
    ref = None
    if s.kl_coef > 0.0:
        if ref_model is None:
            raise ValueError("kl_coef > 0 needs a reference model")
        ref = score(ref_model).logprobs

    # 3. Advantages per group, keyed by group id: shuffling the rows cannot change them.
    adv = compute_advantages_ragged(
        batch.rewards,
        batch.group_index,
        s.estimator,
        eps=s.eps,
        std=s.std,
        max_reward=s.max_reward,
        success_threshold=s.success_threshold,
        advantage_clip=s.advantage_clip,
        generator=generator,
    )
    advantages = adv.advantages.to(torch.float32)

    # 4. Stale groups kept under stale_policy="correct" get w = min(pi_old / mu, tis_cap) per
    #    token, mu being the policy that generated them; every other row weighs exactly 1.
    behaviour = None
    if s.tis_cap is not None and bool(batch.correct.any()):
        # Shifting by (tempered - raw) turns raw - raw into the ratio the loss computes.
        shifted = batch.behaviour_logprobs + (old.logprobs - old_raw)
        behaviour = torch.where(batch.correct[:, None], shifted, old.logprobs)

    # 5. PPO epochs: micro-batched forward/backward, grad-norm clip, one AdamW step each.
    params = [p for p in model.parameters() if p.requires_grad]
    loss_stats: dict[str, float] = {}
    grad_norms: list[float] = []
    for _ in range(s.ppo_epochs):
        epoch_stats = _backward(model, batch, old.logprobs, advantages, ref, behaviour, s)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, s.grad_clip))
        if math.isfinite(grad_norm):
            optimizer.step()
        else:
            log.warning("non-finite gradient norm %s: optimiser step skipped", grad_norm)
        optimizer.zero_grad(set_to_none=True)
        grad_norms.append(grad_norm)
        loss_stats = loss_stats or epoch_stats  # report the first (on-policy) epoch

    # 6. Diagnostics.
    metrics = _diagnostics(batch, adv, old.entropy, old_raw)
    metrics.update(loss_stats)
    metrics["grad_norm"] = grad_norms[0] if math.isfinite(grad_norms[0]) else None
    metrics["nonfinite_grad_steps"] = float(sum(not math.isfinite(g) for g in grad_norms))
    staleness = torch.zeros(len(batch.group_ids), dtype=torch.long)
    staleness.scatter_(0, batch.group_index.cpu(), batch.staleness.cpu())
    metrics["staleness_mean"] = float(staleness.to(torch.float64).mean())
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


def _backward(
    model: nn.Module,
    batch: TrainBatch,
    old_logprobs: Tensor,
    advantages: Tensor,
    ref: Tensor | None,
    behaviour: Tensor | None,
    s: StepSettings,
) -> dict[str, float]:
    """Accumulate the whole batch's loss gradient; return token-weighted loss statistics."""
    lengths = batch.attention_mask.sum(-1)
    sums: dict[str, float] = defaultdict(float)
    ratio_min, ratio_max = math.inf, -math.inf
    tokens = 0.0
    for rows in row_slices(batch.size, s.micro_batch):
        n = max(int(lengths[rows].max()), 2)
        cols = slice(0, n - 1)
        m = batch.response_mask[rows, cols]
        lp = forward_logprobs(
            model,
            batch.input_ids[rows, :n],
            batch.attention_mask[rows, :n],
            temperature=s.temperature,
            amp_dtype=s.amp_dtype,
        ).logprobs
        out = policy_loss(
            lp,
            old_logprobs[rows, cols],
            advantages[rows],
            m,
            clip_low=s.clip_low,
            clip_high=s.clip_high,
            dual_clip=s.dual_clip,
            agg=s.loss_agg,
            ref_logprobs=None if ref is None else ref[rows, cols],
            kl_coef=s.kl_coef,
            kl_type=s.kl_type,
            behaviour_logprobs=None if behaviour is None else behaviour[rows, cols],
            tis_cap=s.tis_cap if behaviour is not None else None,
        )
        weight = _micro_weight(m, batch.response_mask, s.loss_agg)
        (out.loss * weight).backward()  # type: ignore[no-untyped-call]
        n_tok = float(m.sum())
        tokens += n_tok
        sums["loss"] += float(out.loss.detach()) * weight
        sums["pg_loss"] += out.metrics["pg_loss"] * weight
        sums["kl_loss"] += out.metrics["kl_loss"] * weight
        for key in (
            "clip_frac_low",
            "clip_frac_high",
            "dual_clip_frac",
            "clip_frac",
            "kl",
            "ratio_mean",
            "tis_weight_mean",
            "tis_clip_frac",
        ):
            sums[key] += out.metrics[key] * n_tok
        if n_tok:
            ratio_min = min(ratio_min, out.metrics["ratio_min"])
            ratio_max = max(ratio_max, out.metrics["ratio_max"])
    stats = dict(sums)
    for key in stats:
        if key not in ("loss", "pg_loss", "kl_loss"):
            stats[key] = stats[key] / max(tokens, 1.0)
    stats["ratio_min"] = ratio_min if tokens else 1.0
    stats["ratio_max"] = ratio_max if tokens else 1.0
    return stats


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
