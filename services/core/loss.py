"""Clipped policy-gradient loss (PPO/GRPO family) with dual clip, KL and a behaviour correction.

Shapes: per-token tensors (``logprobs``, ``old_logprobs``, ``ref_logprobs``,
``behaviour_logprobs``, ``mask``) are [B, T]; ``advantages`` is [B], one per sequence and
shared by its tokens. ``mask`` is 1 on response tokens; everything off the mask is ignored,
even NaN or -inf padding.

Three policies meet here (decoupled PPO, as in AReaL): the *behaviour* policy mu that sampled
the tokens (``behaviour_logprobs``, reported by the inference engine), the *proximal* policy
pi_prox (``old_logprobs``: the trainer's weights before the first update on this batch) and the
policy being trained pi_theta (``logprobs``). Per token, with
``ratio = exp(logprobs - old_logprobs)`` (log-ratio clamped to [-20, 20] so that it cannot
overflow) and advantage A::

    pg = max(-A * ratio, -A * clamp(ratio, 1 - clip_low, 1 + clip_high))
    pg = min(pg, -A * dual_clip)            if A < 0 and dual_clip is set (verl's dual clip)
    pg = pg * w                             the behaviour correction, see below
    loss = agg(pg) + kl_coef * agg(kl)      agg as in :func:`aggregate`

The behaviour correction reweights each token by ``w``, a function of
``log_w = old_logprobs - behaviour_logprobs`` (``is_level = "token"``) or of its sum over the
sequence's tokens (``"sequence"``, one weight shared by the sequence's tokens)::

    truncate:  w = min(exp(log_w), tis_cap)
    mask:      w = exp(log_w) if exp(log_w) <= tis_cap else 0

``w`` is detached: it reweights the token's gradient without being differentiated. A masked
token still counts in the aggregation's denominator. The correction applies when
``behaviour_logprobs`` is given and ``behaviour_correction`` is not ``"off"``
(:func:`behaviour_weights`).

``kl`` (per-token mean) and ``kl_loss`` (aggregated like the loss, before ``kl_coef``) are
reported whenever ``ref_logprobs`` is given, and join the loss only when ``kl_coef > 0``;
without a reference both are 0. ``pg_loss`` is the aggregated surrogate term.

Clip metrics count masked tokens whose gradient a clip removed: ``clip_frac_high`` (A > 0 and
ratio > 1 + clip_high), ``clip_frac_low`` (A < 0 and ratio < 1 - clip_low),
``dual_clip_frac`` (A < 0 and ratio > dual_clip), ``clip_frac`` (any of them).
``tis_weight_mean`` is the mean behaviour weight and ``tis_clip_frac`` the share of tokens whose
weight was truncated or masked. With no response tokens at all the loss is 0 (still
differentiable), fractions are 0 and ratio and weight statistics are 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from services.core.config import AlgorithmConfig

AGGREGATIONS = ("token_mean", "seq_mean", "token_sum")
KL_TYPES = ("k1", "k3", "low_var_kl")
CORRECTIONS = ("truncate", "mask", "off")
IS_LEVELS = ("token", "sequence")

# exp() of a larger log-ratio overflows float32; verl clamps to the same range.
_MAX_LOG_RATIO = 20.0


@dataclass(frozen=True)
class LossInputs:
    """One (micro-)batch as the loss sees it; shapes in the module docstring."""

    logprobs: Tensor
    """Current policy, differentiable."""
    old_logprobs: Tensor
    """The proximal policy (PPO's old one); the ratio is taken against it."""
    advantages: Tensor
    """One per sequence."""
    mask: Tensor
    """1 on response tokens."""
    ref_logprobs: Tensor | None = None
    """Frozen reference policy, for the KL term."""
    behaviour_logprobs: Tensor | None = None
    """The policy that sampled the tokens, for the behaviour correction."""


@dataclass(frozen=True)
class LossStats:
    """What one loss evaluation reports; fractions and means are over masked tokens."""

    loss: float
    pg_loss: float
    kl_loss: float
    kl: float
    clip_frac_low: float
    clip_frac_high: float
    dual_clip_frac: float
    clip_frac: float
    ratio_mean: float
    ratio_min: float
    ratio_max: float
    tis_weight_mean: float
    tis_clip_frac: float
    tokens: float

    @classmethod
    def combine(cls, parts: Sequence[tuple[LossStats, float]]) -> LossStats:
        """Merge micro-batches, given each one's share of the loss's denominator.

        Loss terms add up with those shares (they sum to 1, so the merged loss is the whole
        batch's); token statistics are weighted by tokens; the ratio range is the union.
        """
        tokens = sum(s.tokens for s, _ in parts)
        with_tokens = [s for s, _ in parts if s.tokens]

        def shared(name: str) -> float:
            return float(sum(getattr(s, name) * w for s, w in parts))

        def per_token(name: str) -> float:
            return float(sum(getattr(s, name) * s.tokens for s, _ in parts)) / max(tokens, 1.0)

        return cls(
            **{name: shared(name) for name in _LOSS_TERMS},
            **{name: per_token(name) for name in _TOKEN_MEANS},
            ratio_min=min((s.ratio_min for s in with_tokens), default=1.0),
            ratio_max=max((s.ratio_max for s in with_tokens), default=1.0),
            tokens=tokens,
        )

    def as_dict(self) -> dict[str, float]:
        """Fields by name, for metric logs (without the token count)."""
        d = asdict(self)
        del d["tokens"]
        return d


_LOSS_TERMS = ("loss", "pg_loss", "kl_loss")
_TOKEN_MEANS = (
    "kl",
    "clip_frac_low",
    "clip_frac_high",
    "dual_clip_frac",
    "clip_frac",
    "ratio_mean",
    "tis_weight_mean",
    "tis_clip_frac",
)


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kl_type: str) -> Tensor:
    """Per-token estimate of KL(policy || reference) from sampled-token log-probs.

    ``k1 = logp - ref`` (unbiased, can be negative); ``k3 = exp(ref - logp) - (ref - logp) - 1``
    (unbiased, non-negative, lower variance); ``low_var_kl`` is k3 with the log-ratio clamped
    to [-20, 20] and the result clamped to [-10, 10], as in verl, so that one outlier token
    cannot dominate the loss.
    """
    if kl_type not in KL_TYPES:
        raise ValueError(f"unknown kl_type {kl_type!r}; choose one of {', '.join(KL_TYPES)}")
    if kl_type == "k1":
        return logprobs - ref_logprobs
    log_ratio = ref_logprobs - logprobs
    if kl_type == "k3":
        return torch.exp(log_ratio) - log_ratio - 1.0
    log_ratio = log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return (torch.exp(log_ratio) - log_ratio - 1.0).clamp(-10.0, 10.0)


def aggregate(values: Tensor, mask: Tensor, agg: str) -> Tensor:
    """Reduce per-token ``values`` [B, T] over the tokens where ``mask`` is set, to a scalar.

    - ``token_mean``: sum over tokens / number of tokens (long answers weigh more).
    - ``seq_mean``: mean over sequences of each sequence's token mean; sequences with no
      tokens are left out rather than counted as 0.
    - ``token_sum``: sum over tokens / B, with B the number of rows: a constant normaliser
      (Dr. GRPO), so a sequence's weight does not shrink with its length.

    Empty input gives 0, never NaN.
    """
    if agg not in AGGREGATIONS:
        raise ValueError(f"unknown agg {agg!r}; choose one of {', '.join(AGGREGATIONS)}")
    if values.ndim != 2 or mask.shape != values.shape:
        raise ValueError(
            f"values and mask must both be [B, T], got {tuple(values.shape)} and "
            f"{tuple(mask.shape)}"
        )
    keep = mask.bool()
    # where(), not multiplication: NaN * 0 is NaN, and padding may hold NaN or -inf.
    masked = torch.where(keep, values, torch.zeros((), dtype=values.dtype, device=values.device))
    if agg == "token_mean":
        return masked.sum() / keep.sum().clamp_min(1)
    if agg == "token_sum":
        return masked.sum() / max(values.shape[0], 1)
    tokens = keep.sum(dim=-1)
    seq_means = masked.sum(dim=-1) / tokens.clamp_min(1)
    has_tokens = tokens > 0
    return (seq_means * has_tokens).sum() / has_tokens.sum().clamp_min(1)


@torch.no_grad()
def behaviour_weights(
    proximal: Tensor, behaviour: Tensor, mask: Tensor, *, mode: str, level: str, cap: float
) -> tuple[Tensor, Tensor]:
    """Per-token weights pi_prox / mu, truncated or masked at ``cap``, and where they were.

    ``level = "sequence"`` gives every token of a row the row's weight
    ``exp(sum of log-ratios over its masked tokens)``. Off the mask the weight is 1 and nothing
    is flagged. Returns ``(weights, capped)``; ``capped`` marks the tokens whose weight the cap
    changed (truncated to ``cap``, or masked to 0).
    """
    if mode not in CORRECTIONS or mode == "off":
        raise ValueError(f"unknown correction {mode!r}; choose truncate or mask")
    if level not in IS_LEVELS:
        raise ValueError(f"unknown level {level!r}; choose one of {', '.join(IS_LEVELS)}")
    keep = mask.bool()
    zero = torch.zeros((), dtype=proximal.dtype, device=proximal.device)
    # where(), not multiplication: padding may hold NaN or -inf.
    log_w = torch.where(keep, proximal.detach() - behaviour.detach(), zero)
    if level == "sequence":
        log_w = torch.where(keep, log_w.sum(dim=-1, keepdim=True), zero)
    log_cap = math.log(cap)
    capped = keep & (log_w > log_cap)
    # min(exp(x), cap) == exp(min(x, log cap)), which cannot overflow.
    weights = torch.exp(log_w.clamp(max=log_cap))
    if mode == "mask":
        weights = torch.where(capped, zero, weights)
    return torch.where(keep, weights, torch.ones_like(weights)), capped


def policy_loss(x: LossInputs, objective: AlgorithmConfig) -> tuple[Tensor, LossStats]:
    """Clipped surrogate loss plus optional KL penalty, and its statistics.

    ``objective`` supplies clip_low, clip_high, dual_clip, loss_agg, kl_coef, kl_type,
    behaviour_correction, is_level and tis_cap (validated there); see the module docstring for
    the formulas.
    """
    _check_inputs(x, objective)
    o = objective
    keep = x.mask.bool()
    logprobs = x.logprobs
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)

    log_ratio = torch.where(keep, logprobs - x.old_logprobs.detach(), zero)
    ratio = torch.exp(log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    adv = x.advantages.detach().to(logprobs.dtype)[:, None].expand_as(logprobs)

    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - o.clip_low, 1.0 + o.clip_high)
    pg = torch.maximum(unclipped, clipped)
    if o.dual_clip is not None:
        pg = torch.where(adv < 0, torch.minimum(pg, -adv * o.dual_clip), pg)

    tis_weight = torch.ones_like(ratio)
    tis_clipped = torch.zeros_like(keep)
    if x.behaviour_logprobs is not None and o.behaviour_correction != "off":
        tis_weight, tis_clipped = behaviour_weights(
            x.old_logprobs,
            x.behaviour_logprobs,
            keep,
            mode=o.behaviour_correction,
            level=o.is_level,
            cap=o.tis_cap,
        )
        pg = pg * tis_weight.to(pg.dtype)

    pg_loss = aggregate(pg, keep, o.loss_agg)
    kl_loss = zero
    kl_mean = zero
    if x.ref_logprobs is not None:
        # Mask the inputs, not just the output: exp() of padding would make NaN gradients.
        kl = kl_penalty(
            torch.where(keep, logprobs, zero),
            torch.where(keep, x.ref_logprobs.detach(), zero),
            o.kl_type,
        )
        kl_loss = aggregate(kl, keep, o.loss_agg)
        kl_mean = aggregate(kl.detach(), keep, "token_mean")
    loss = pg_loss + o.kl_coef * kl_loss if o.kl_coef > 0.0 else pg_loss

    with torch.no_grad():
        r = ratio.detach()
        no_flags = torch.zeros_like(keep)
        high = keep & (adv > 0) & (r > 1.0 + o.clip_high)
        low = keep & (adv < 0) & (r < 1.0 - o.clip_low)
        dual = keep & (adv < 0) & (r > o.dual_clip) if o.dual_clip is not None else no_flags
        has_tokens = keep.any()
        one = torch.ones((), dtype=r.dtype, device=r.device)
        # min()/max() reject empty tensors; a sentinel keeps a [0, T] batch working.
        r_low = torch.where(keep, r, math.inf).flatten()
        r_high = torch.where(keep, r, -math.inf).flatten()
        if r.numel() == 0:
            r_low, r_high = one[None], one[None]
        stats = {
            "loss": loss,
            "pg_loss": pg_loss,
            "kl_loss": kl_loss,
            "kl": kl_mean,
            "clip_frac_low": _token_mean(low, keep),
            "clip_frac_high": _token_mean(high, keep),
            "dual_clip_frac": _token_mean(dual, keep),
            "clip_frac": _token_mean(low | high | dual, keep),
            "ratio_mean": torch.where(has_tokens, _token_mean(r, keep), one),
            "ratio_min": torch.where(has_tokens, r_low.min(), one),
            "ratio_max": torch.where(has_tokens, r_high.max(), one),
            "tis_weight_mean": torch.where(has_tokens, _token_mean(tis_weight, keep), one),
            "tis_clip_frac": _token_mean(tis_clipped & keep, keep),
            "tokens": keep.sum(),
        }
        # One device-to-host copy for all statistics instead of one sync per number.
        values = torch.stack([v.detach().to(torch.float64) for v in stats.values()]).tolist()
    return loss, LossStats(**dict(zip(stats, values, strict=True)))


def _token_mean(values: Tensor, keep: Tensor) -> Tensor:
    """Mean over the masked tokens; 0 when there are none."""
    return aggregate(values.to(torch.float64), keep, "token_mean")


def _check_inputs(x: LossInputs, objective: AlgorithmConfig) -> None:
    """Shapes, and the one cross-field rule the config cannot see (KL needs a reference)."""
    shape = tuple(x.logprobs.shape)
    if len(shape) != 2:
        raise ValueError(f"logprobs must be [B, T], got {shape}")
    for name in ("old_logprobs", "mask", "ref_logprobs", "behaviour_logprobs"):
        t = getattr(x, name)
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but logprobs {shape}")
    if tuple(x.advantages.shape) != shape[:1]:
        raise ValueError(
            f"advantages must be [B] = [{shape[0]}] (one per sequence), "
            f"got {tuple(x.advantages.shape)}"
        )
    if objective.kl_coef > 0.0 and x.ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs (or set kl_coef to 0)")
