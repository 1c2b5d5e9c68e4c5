"""One training step: the paper's objective on one rollout batch of scored groups.

Read :func:`train_step` top to bottom: proximal log-probs, reference log-probs, advantages per
group, then ``ppo_epochs`` passes over the mini-batches, one clipped AdamW update each, then the
diagnostics. Everything numeric (advantages, the loss, the behaviour weights) comes from
``services.core``; this module only feeds it tensors and micro-batches the model.

Decoupled PPO (as in AReaL): the ratio is taken against the *proximal* policy, the trainer's
weights before the first update on this batch, whose log-probs are computed once, without
gradients, and stay fixed while the updates move the model; every token is also weighted by
pi_prox / mu, mu being the policy that sampled it (the inference engine's log-probs), truncated
or masked at ``algorithm.tis_cap``. With a single update (one mini-batch, one epoch) the
proximal policy *is* the policy that update differentiates: its log-probs equal the detached
log-probs of that update's own forward pass, so the ratio is exactly 1. The *fused* path then
runs one forward pass per micro-batch instead of two, and takes the proximal log-probs and the
entropy from it; the behaviour weights still apply.

A mini-batch is ``algorithm.mini_batch_groups`` whole groups, chosen by group index (the
order of the sorted group ids), never by row position (:func:`mini_batches`). Micro-batching
does not change the objective: each micro-batch's loss is weighted by its share of what the
aggregation divides by over its mini-batch (tokens for token_mean, sequences with tokens for
seq_mean, rows for token_sum), so the summed gradient equals that of the mini-batch at once.

Each phase is timed (:class:`~services.trainer.timing.PhaseTimer`): ``old_s`` (the proximal
pass), ``ref_s``, ``forward_s``, ``backward_s`` (both summed over micro-batches and updates),
``optimizer_s`` (grad clip and step).
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
from services.trainer.distributed import WHOLE, RowShard
from services.trainer.logprobs import TokenScores, forward_logprobs, score_tokens
from services.trainer.timing import PhaseTimer

if TYPE_CHECKING:
    from services.core.config import RunConfig

log = logging.getLogger(__name__)

#: Version lags the trainer-versus-engine KL is reported for: 0, 1, and 2 or more.
LAG_BUCKETS = (("lag0", 0, 0), ("lag1", 1, 1), ("lag2plus", 2, None))


@dataclass
class StepResult:
    """Scalar diagnostics plus the per-group values that feed histograms."""

    metrics: dict[str, float | None]
    p: list[float] = field(default_factory=list)
    lam: list[float] = field(default_factory=list)
    staleness: list[int] = field(default_factory=list)


def mini_batches(group_index: Tensor, groups: int, groups_per_update: int) -> list[Tensor]:
    """The rows of each mini-batch: groups ``[k * n, (k + 1) * n)`` by group index.

    ``groups_per_update`` of 0, or at least ``groups``, gives one mini-batch of every row.
    Rows keep their order within a mini-batch.
    """
    n = groups_per_update if 0 < groups_per_update < groups else max(groups, 1)
    chunk = group_index.div(n, rounding_mode="floor")
    return [torch.nonzero(chunk == k).flatten() for k in range(math.ceil(groups / n))]


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
    shard: RowShard = WHOLE,
) -> StepResult:
    """Apply one rollout batch to ``model``: ``ppo_epochs`` x mini-batches clipped AdamW steps.

    ``amp_dtype`` is the autocast dtype of the forward passes (None: the parameters' own).
    ``fused`` (default: when there is one update) takes the proximal log-probs from the update's
    own forward pass; False forces the separate proximal pass (tests and benchmarks compare).
    ``shard`` (one of several ranks): the rows this rank runs through the model; every result
    is the whole batch's (:class:`~services.trainer.distributed.RowShard`).
    """
    algo = config.algorithm
    ids, attn = batch.input_ids, batch.attention_mask
    timer = timer if timer is not None else PhaseTimer(ids.device)
    minis = mini_batches(batch.group_index, len(batch.group_ids), algo.mini_batch_groups)
    updates = algo.ppo_epochs * len(minis)
    if fused is None:
        fused = updates == 1
    if fused and updates != 1:
        raise ValueError(
            "the fused forward pass needs one update per batch (ppo_epochs == 1 and one "
            f"mini-batch, not {updates} updates): later updates need fixed proximal log-probs"
        )

    def score(m: nn.Module, *, extras: bool = False) -> TokenScores:
        return shard.score(
            score_tokens,
            m,
            ids,
            attn,
            micro_batch=config.optim.micro_batch,
            temperature=config.rollout.temperature,
            with_entropy=extras,
            amp_dtype=amp_dtype,
            vision=batch.row_vision(),
            never=batch.never,
        )

    # 1. The proximal policy (the weights before the first update) and the token entropy,
    #    fixed here, before any update; the fused path gets them from the update's forward pass.
    prox: TokenScores | None = None
    if not fused:
        with timer.phase("old"):
            prox = score(model, extras=True)

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

    # 4. ppo_epochs passes over the mini-batches: micro-batched forward/backward of the loss
    #    (ratio against the proximal policy, every token weighted by pi_prox / mu), grad-norm
    #    clip, one AdamW step per mini-batch.
    params = [p for p in model.parameters() if p.requires_grad]
    update_stats: list[LossStats] = []
    grad_norms: list[float] = []
    for _ in range(algo.ppo_epochs):
        for rows in minis:
            upd = _backward(
                model, batch, rows, advantages, ref, config, amp_dtype, timer, prox, shard
            )
            if prox is None:  # fused: that forward pass was the proximal policy's
                prox = upd.scores
            with timer.phase("optimizer"):
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.optim.grad_clip))
                if math.isfinite(grad_norm):
                    optimizer.step()
                else:
                    log.warning("non-finite gradient norm %s: optimiser step skipped", grad_norm)
                optimizer.zero_grad(set_to_none=True)
            grad_norms.append(grad_norm)
            update_stats.append(upd.stats)
    assert prox is not None

    # 5. Diagnostics; the loss statistics cover every update (a clip acts only after the first).
    metrics = _diagnostics(batch, adv, prox)
    metrics.update(LossStats.combine([(s, 1.0 / updates) for s in update_stats]).as_dict())
    finite = [g for g in grad_norms if math.isfinite(g)]
    metrics["grad_norm"] = sum(finite) / len(finite) if finite else None
    metrics["nonfinite_grad_steps"] = float(len(grad_norms) - len(finite))
    metrics["updates"] = float(updates)
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
    """This micro-batch's share of its mini-batch's aggregation denominator (they sum to 1)."""
    if agg == "token_mean":
        return float(mask.sum()) / max(float(batch_mask.sum()), 1.0)
    if agg == "seq_mean":
        return float(mask.any(-1).sum()) / max(float(batch_mask.any(-1).sum()), 1.0)
    return mask.shape[0] / max(batch_mask.shape[0], 1)


@dataclass
class _Update:
    stats: LossStats
    """The mini-batch's loss statistics (micro-batches combined)."""
    scores: TokenScores | None
    """Fused path only: the detached log-probs and entropy of its forward pass."""


def _backward(
    model: nn.Module,
    batch: TrainBatch,
    rows: Tensor,
    advantages: Tensor,
    ref: Tensor | None,
    config: RunConfig,
    amp_dtype: torch.dtype | None,
    timer: PhaseTimer,
    prox: TokenScores | None,
    shard: RowShard = WHOLE,
) -> _Update:
    """Accumulate the loss gradient of the mini-batch ``rows``; return its loss statistics.

    ``prox`` is the proximal policy's scores, or None for the fused path: each micro-batch's
    proximal log-probs are then the detached log-probs of its own forward pass, which also
    yields the entropy (collected, batch-shaped, into the returned scores).
    """
    fused = prox is None
    correct = config.algorithm.behaviour_correction != "off"
    lengths = batch.attention_mask.sum(-1)
    mini_mask = batch.response_mask[rows]
    shape = (batch.size, batch.input_ids.shape[1] - 1)
    zeros = torch.zeros(shape, dtype=torch.float32, device=batch.input_ids.device)
    collected = TokenScores(zeros, zeros.clone()) if fused else None
    parts: list[tuple[LossStats, float]] = []
    for micro, share in shard.micro_batches(rows, config.optim.micro_batch):
        n = max(int(lengths[micro].max()), 2)
        cols = slice(0, n - 1)
        m = batch.response_mask[micro, cols]
        with timer.phase("forward"):
            scored = forward_logprobs(
                model,
                batch.input_ids[micro, :n],
                batch.attention_mask[micro, :n],
                temperature=config.rollout.temperature,
                with_entropy=fused,
                amp_dtype=amp_dtype,
                vision=batch.row_vision(micro),
                never=batch.never,
            )
            lp = scored.logprobs
            if collected is not None:
                prox_lp = lp.detach()
                collected.logprobs[micro, cols] = prox_lp
                if collected.entropy is not None and scored.entropy is not None:
                    collected.entropy[micro, cols] = scored.entropy
            else:
                assert prox is not None
                prox_lp = prox.logprobs[micro, cols]
            inputs = LossInputs(
                logprobs=lp,
                old_logprobs=prox_lp,
                advantages=advantages[micro],
                mask=m,
                ref_logprobs=None if ref is None else ref[micro, cols],
                behaviour_logprobs=batch.behaviour_logprobs[micro, cols] if correct else None,
            )
            loss, stats = policy_loss(inputs, config.algorithm)
            weight = share * _micro_weight(m, mini_mask, config.algorithm.loss_agg)
        with timer.phase("backward"):
            (loss * weight).backward()  # type: ignore[no-untyped-call]
        parts.append((stats, weight))
    return _Update(shard.combine(parts), shard.gather(collected))


def _masked_mean(values: Tensor, mask: Tensor) -> float | None:
    n = int(mask.sum())
    if n == 0:
        return None
    return float(torch.where(mask, values, 0.0).sum() / n)


def _diagnostics(
    batch: TrainBatch, adv: AdvantageResult, prox: TokenScores
) -> dict[str, float | None]:
    """What the dashboards plot: rewards, certainty, advantage terms, entropy, mismatch.

    The mismatch compares the proximal policy with the engine's log-probs, both at the
    sampling temperature: the mean absolute log-prob difference, and KL(mu || pi_prox) per
    token from the sampled tokens (k3 = r - 1 - log r, r = pi_prox / mu: unbiased, never
    negative), overall and per version lag.
    """
    a = adv.advantages.to(torch.float64)
    groups = adv.groups
    mask = batch.response_mask
    diff = prox.logprobs - batch.behaviour_logprobs
    log_r = diff.clamp(-20.0, 20.0)  # exp() of more overflows float32
    kl = torch.exp(log_r) - 1.0 - log_r
    lag = batch.staleness[:, None]
    fresh = mask & (lag == 0)
    metrics: dict[str, float | None] = {
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
        "entropy": None if prox.entropy is None else _masked_mean(prox.entropy, mask),
        "logprob_mismatch": _masked_mean(diff.abs(), mask),
        "logprob_mismatch_fresh": _masked_mean(diff.abs(), fresh),
        "mismatch_kl": _masked_mean(kl, mask),
    }
    for name, low, high in LAG_BUCKETS:
        in_bucket = (lag >= low) if high is None else (lag >= low) & (lag <= high)
        metrics[f"mismatch_kl_{name}"] = _masked_mean(kl, mask & in_bucket)
    return metrics
