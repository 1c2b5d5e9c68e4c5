"""Policy loss: a hand-computed batch, clipping, aggregation, KL, truncated IS, gradients."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import pytest
import torch
from pydantic import ValidationError

from services.core.config import AlgorithmConfig
from services.core.loss import (
    LossInputs,
    LossStats,
    aggregate,
    behaviour_weights,
    kl_penalty,
    policy_loss,
)

NAN = math.nan
INF = math.inf


class Out(NamedTuple):
    loss: torch.Tensor
    stats: LossStats


def loss_of(
    logprobs: torch.Tensor,
    old: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logprobs: torch.Tensor | None = None,
    behaviour_logprobs: torch.Tensor | None = None,
    **objective: Any,
) -> Out:
    """The loss under the config's objective, with KL off unless a test turns it on."""
    objective.setdefault("kl_coef", 0.0)
    x = LossInputs(logprobs, old, adv, mask, ref_logprobs, behaviour_logprobs)
    return Out(*policy_loss(x, AlgorithmConfig(**objective)))


def hand_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two sequences of three tokens; the last token of the second one is padding.

    Ratios are chosen so that every clip case appears once (clip_low 0.2, clip_high 0.3,
    dual clip 3):

    seq 0, A = +1, ratios 1.0, 1.5, 0.5 -> pg = max(-r, -clamp(r, 0.8, 1.3))
        1.0: -1.0        1.5: max(-1.5, -1.3) = -1.3 (high clip)     0.5: max(-0.5, -0.8) = -0.5
    seq 1, A = -2, ratios 0.5, 4.0, pad -> pg = max(2r, 2 clamp(r, 0.8, 1.3)), then min(., 6)
        0.5: max(1.0, 1.6) = 1.6 (low clip)   4.0: max(8.0, 2.6) = 8.0 -> min(8, 6) = 6 (dual)
    token_mean = (-1 - 1.3 - 0.5 + 1.6 + 6) / 5 = 4.8 / 5 = 0.96
    """
    ratios = torch.tensor([[1.0, 1.5, 0.5], [0.5, 4.0, 1.0]], dtype=torch.float64)
    old = torch.tensor([[-1.0, -0.7, -2.0], [-0.4, -3.0, NAN]], dtype=torch.float64)
    logprobs = old + ratios.log()
    logprobs[1, 2] = -INF  # padding may hold anything
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages = torch.tensor([1.0, -2.0], dtype=torch.float64)
    return logprobs.requires_grad_(True), old, advantages, mask


def test_hand_computed_loss_and_clip_metrics() -> None:
    logprobs, old, adv, mask = hand_batch()
    out = loss_of(logprobs, old, adv, mask)
    assert out.loss.item() == pytest.approx(0.96, abs=1e-12)
    m = out.stats
    assert m.clip_frac_high == pytest.approx(1 / 5)
    assert m.clip_frac_low == pytest.approx(1 / 5)
    assert m.dual_clip_frac == pytest.approx(1 / 5)
    assert m.clip_frac == pytest.approx(3 / 5)
    assert m.ratio_mean == pytest.approx((1.0 + 1.5 + 0.5 + 0.5 + 4.0) / 5)
    assert m.ratio_min == pytest.approx(0.5) and m.ratio_max == pytest.approx(4.0)
    assert m.pg_loss == pytest.approx(0.96)
    assert m.kl == 0.0 and m.kl_loss == 0.0
    assert m.tis_weight_mean == 1.0 and m.tis_clip_frac == 0.0
    assert all(math.isfinite(v) for v in m.as_dict().values())


def test_hand_computed_gradient_is_zero_exactly_where_a_clip_acts() -> None:
    logprobs, old, adv, mask = hand_batch()
    loss_of(logprobs, old, adv, mask).loss.backward()
    # Unclipped tokens: d(-A r)/d logp = -A r, divided by the 5 tokens of token_mean.
    expected = torch.tensor([[-1.0 / 5, 0.0, -0.5 / 5], [0.0, 0.0, 0.0]], dtype=torch.float64)
    assert logprobs.grad is not None
    torch.testing.assert_close(logprobs.grad, expected)


def test_without_dual_clip_the_negative_advantage_token_is_unbounded() -> None:
    logprobs, old, adv, mask = hand_batch()
    out = loss_of(logprobs, old, adv, mask, dual_clip=None)
    # The 4.0-ratio token now costs 8 instead of 6: (-2.8 + 1.6 + 8) / 5.
    assert out.loss.item() == pytest.approx(6.8 / 5)
    assert out.stats.dual_clip_frac == 0.0
    assert out.stats.clip_frac == pytest.approx(2 / 5)
    out.loss.backward()
    assert logprobs.grad is not None
    assert logprobs.grad[1, 1].item() == pytest.approx(2.0 * 4.0 / 5)


@pytest.mark.parametrize(
    ("agg", "expected"),
    [
        ("token_mean", 4.8 / 5),
        ("seq_mean", ((-1.0 - 1.3 - 0.5) / 3 + (1.6 + 6.0) / 2) / 2),
        ("token_sum", 4.8 / 2),
    ],
)
def test_each_aggregation_on_the_hand_batch(agg: str, expected: float) -> None:
    logprobs, old, adv, mask = hand_batch()
    assert loss_of(logprobs, old, adv, mask, loss_agg=agg).loss.item() == pytest.approx(expected)


def test_aggregate_ignores_padding_and_empty_rows() -> None:
    values = torch.tensor([[1.0, 2.0, NAN], [INF, NAN, -INF], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]])
    assert aggregate(values, mask, "token_mean").item() == pytest.approx(7.0 / 3)
    # The empty row is left out of the sequence mean rather than counted as 0.
    assert aggregate(values, mask, "seq_mean").item() == pytest.approx((1.5 + 4.0) / 2)
    # token_sum divides by all 3 rows: a constant normaliser.
    assert aggregate(values, mask, "token_sum").item() == pytest.approx(7.0 / 3)
    empty = torch.zeros(3, 3, dtype=torch.bool)
    for agg in ("token_mean", "seq_mean", "token_sum"):
        assert aggregate(values, empty, agg).item() == 0.0
    with pytest.raises(ValueError, match="unknown agg"):
        aggregate(values, mask, "mean")


def test_kl_estimators_by_hand() -> None:
    logp = torch.tensor([math.log(2.0), -math.log(2.0), 0.0, 0.0])
    ref = torch.tensor([0.0, 0.0, 30.0, -30.0])
    k1 = kl_penalty(logp, ref, "k1")
    torch.testing.assert_close(k1, torch.tensor([math.log(2), -math.log(2), -30.0, 30.0]))
    k3 = kl_penalty(logp, ref, "k3")
    # exp(ref - logp) - (ref - logp) - 1
    assert k3[0].item() == pytest.approx(0.5 + math.log(2) - 1)
    assert k3[1].item() == pytest.approx(2.0 - math.log(2) - 1)
    assert k3[3].item() == pytest.approx(math.exp(-30) + 30 - 1)
    low = kl_penalty(logp, ref, "low_var_kl")
    torch.testing.assert_close(low[:2], k3[:2])
    assert low[2].item() == 10.0 and low[3].item() == 10.0  # clamped, as in verl
    assert (k3 >= 0).all()
    with pytest.raises(ValueError, match="unknown kl_type"):
        kl_penalty(logp, ref, "k2")


@pytest.mark.parametrize("kl_type", ["k1", "k3", "low_var_kl"])
def test_kl_term_adds_coef_times_aggregated_kl_and_reports_per_token_mean(kl_type: str) -> None:
    logprobs, old, adv, mask = hand_batch()
    ref = old.clone()
    ref[1, 2] = NAN  # padding in the reference too
    out = loss_of(logprobs, old, adv, mask, ref_logprobs=ref, kl_coef=0.1, kl_type=kl_type)
    kl = kl_penalty(logprobs.detach(), old, kl_type)[mask.bool()]
    assert out.stats.kl == pytest.approx(kl.mean().item())
    assert out.stats.kl_loss == pytest.approx(kl.mean().item())
    assert out.loss.item() == pytest.approx(0.96 + 0.1 * kl.mean().item())
    out.loss.backward()
    assert logprobs.grad is not None and torch.isfinite(logprobs.grad).all()
    assert logprobs.grad[1, 2].item() == 0.0


def test_k1_kl_gradient_is_coef_over_token_count() -> None:
    logprobs = torch.zeros(2, 4, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    out = loss_of(
        logprobs,
        logprobs.detach(),
        torch.zeros(2),
        mask,
        ref_logprobs=torch.full((2, 4), -1.0),
        kl_coef=0.5,
        kl_type="k1",
    )
    out.loss.backward()
    assert logprobs.grad is not None
    torch.testing.assert_close(logprobs.grad, 0.5 / 6 * mask.float())


def test_reference_without_kl_coef_is_monitored_but_not_in_the_loss() -> None:
    logprobs, old, adv, mask = hand_batch()
    out = loss_of(logprobs, old, adv, mask, ref_logprobs=old - 1.0, kl_type="k1")
    assert out.loss.item() == pytest.approx(0.96)
    assert out.stats.kl == pytest.approx(1.0 + sum(math.log(r) for r in (1.5, 0.5, 0.5, 4)) / 5)


def test_truncated_is_weights_multiply_token_losses_and_are_capped() -> None:
    logprobs, old, adv, mask = hand_batch()
    # exp(old - behaviour) = 3 (capped at 2), 0.5, 1, 1, 1, and padding that must not count.
    behaviour = old - torch.tensor(
        [[math.log(3.0), math.log(0.5), 0.0], [0.0, 0.0, 50.0]], dtype=torch.float64
    )
    out = loss_of(logprobs, old, adv, mask, behaviour_logprobs=behaviour, tis_cap=2.0)
    # Token losses -1, -1.3, -0.5, 1.6, 6 weighted by 2, 0.5, 1, 1, 1.
    assert out.loss.item() == pytest.approx((-2.0 - 0.65 - 0.5 + 1.6 + 6.0) / 5)
    assert out.stats.tis_weight_mean == pytest.approx((2.0 + 0.5 + 1 + 1 + 1) / 5)
    assert out.stats.tis_clip_frac == pytest.approx(1 / 5)
    out.loss.backward()
    assert logprobs.grad is not None
    # The weight is a constant: it scales the token's gradient (-A r / 5) and nothing else.
    assert logprobs.grad[0, 0].item() == pytest.approx(2.0 * -1.0 / 5)


def test_behaviour_correction_off_ignores_behaviour_logprobs() -> None:
    logprobs, old, adv, mask = hand_batch()
    out = loss_of(
        logprobs, old, adv, mask, behaviour_logprobs=old - 3.0, behaviour_correction="off"
    )
    assert out.loss.item() == pytest.approx(0.96)
    assert out.stats.tis_weight_mean == 1.0 and out.stats.tis_clip_frac == 0.0


def hand_behaviour(old: torch.Tensor) -> torch.Tensor:
    """exp(old - behaviour) = 3, 0.5, 1 | 1, 1.5, and padding that must not count."""
    log_w = [[math.log(3.0), math.log(0.5), 0.0], [0.0, math.log(1.5), 50.0]]
    return old - torch.tensor(log_w, dtype=torch.float64)


def test_masked_is_weights_zero_the_tokens_above_the_cap() -> None:
    logprobs, old, adv, mask = hand_batch()
    behaviour = hand_behaviour(old)
    out = loss_of(
        logprobs, old, adv, mask, behaviour_logprobs=behaviour, behaviour_correction="mask"
    )
    # Token losses -1, -1.3, -0.5, 1.6, 6 weighted by 0 (3 > cap 2), 0.5, 1, 1, 1.5; the masked
    # token still counts in the token mean's denominator.
    assert out.loss.item() == pytest.approx((0.0 - 0.65 - 0.5 + 1.6 + 9.0) / 5)
    assert out.stats.tis_weight_mean == pytest.approx((0.0 + 0.5 + 1 + 1 + 1.5) / 5)
    assert out.stats.tis_clip_frac == pytest.approx(1 / 5)
    out.loss.backward()
    assert logprobs.grad is not None and logprobs.grad[0, 0].item() == 0.0


@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_sequence_level_weights_share_the_product_of_token_ratios(mode: str) -> None:
    logprobs, old, adv, mask = hand_batch()
    behaviour = hand_behaviour(old)
    common: dict[str, Any] = {"behaviour_correction": mode, "is_level": "sequence"}
    # Sequence weights exp(log 3 + log 0.5 + 0) = 1.5 and exp(0 + log 1.5) = 1.5 (padding left
    # out): under the default cap of 2, the same in both modes.
    out = loss_of(logprobs, old, adv, mask, behaviour_logprobs=behaviour, **common)
    assert out.loss.item() == pytest.approx(1.5 * 0.96)
    assert out.stats.tis_weight_mean == pytest.approx(1.5)
    assert out.stats.tis_clip_frac == 0.0

    # Under a cap of 1.2 both sequences are capped (truncate) or zeroed (mask).
    capped = loss_of(logprobs, old, adv, mask, behaviour_logprobs=behaviour, tis_cap=1.2, **common)
    expected_w = 1.2 if mode == "truncate" else 0.0
    assert capped.stats.tis_weight_mean == pytest.approx(expected_w)
    assert capped.stats.tis_clip_frac == 1.0
    assert capped.loss.item() == pytest.approx(0.96 * expected_w)


def test_behaviour_weights_are_pi_prox_over_mu_not_the_inverse() -> None:
    """The weight is pi_prox / mu: swapped, the ratios 3 and 0.5 would become 1/3 and 2."""
    _, old, _, mask = hand_batch()
    behaviour = hand_behaviour(old)
    w, capped = behaviour_weights(old, behaviour, mask, mode="truncate", level="token", cap=2.0)
    assert w[0].tolist() == pytest.approx([2.0, 0.5, 1.0])
    assert w[1, :2].tolist() == pytest.approx([1.0, 1.5])
    assert w[1, 2].item() == 1.0  # padding
    assert capped.tolist() == [[True, False, False], [False, False, False]]
    swapped, _ = behaviour_weights(behaviour, old, mask, mode="truncate", level="token", cap=2.0)
    assert swapped[0].tolist() != pytest.approx(w[0].tolist())


def test_on_policy_gradient_is_minus_advantage_over_tokens() -> None:
    logprobs = torch.randn(3, 5, dtype=torch.float64).requires_grad_(True)
    adv = torch.tensor([0.5, -1.5, 2.0], dtype=torch.float64)
    mask = torch.ones(3, 5)
    out = loss_of(logprobs, logprobs.detach(), adv, mask)
    assert out.stats.clip_frac == 0.0 and out.stats.ratio_mean == 1.0
    out.loss.backward()
    assert logprobs.grad is not None
    torch.testing.assert_close(logprobs.grad, (-adv / 15)[:, None].expand(3, 5))


def test_empty_rows_and_empty_batches_give_finite_loss_and_gradients() -> None:
    logprobs = torch.full((2, 3), -1.0, requires_grad=True)
    mask = torch.tensor([[0, 0, 0], [1, 1, 0]])
    for agg in ("token_mean", "seq_mean", "token_sum"):
        out = loss_of(logprobs, logprobs.detach(), torch.tensor([1.0, 1.0]), mask, loss_agg=agg)
        assert math.isfinite(out.loss.item())
    none = torch.zeros(2, 3)
    out = loss_of(
        logprobs,
        logprobs.detach(),
        torch.tensor([1.0, -1.0]),
        none,
        ref_logprobs=logprobs.detach() + 1,
        kl_coef=0.1,
    )
    assert out.loss.item() == 0.0
    assert out.stats.ratio_mean == 1.0 and out.stats.clip_frac == 0.0
    assert all(math.isfinite(v) for v in out.stats.as_dict().values())
    out.loss.backward()
    assert logprobs.grad is not None and torch.equal(logprobs.grad, torch.zeros(2, 3))


@pytest.mark.parametrize("shape", [(0, 4), (3, 0)])
def test_a_batch_without_rows_or_columns_gives_zero_loss(shape: tuple[int, int]) -> None:
    logprobs = torch.zeros(shape, requires_grad=True)
    out = loss_of(logprobs, torch.zeros(shape), torch.zeros(shape[0]), torch.ones(shape))
    assert out.loss.item() == 0.0
    assert out.stats.ratio_min == 1.0 and out.stats.clip_frac == 0.0
    out.loss.backward()


def test_large_log_ratios_do_not_overflow() -> None:
    logprobs = torch.tensor([[0.0, -200.0]], requires_grad=True)
    old = torch.tensor([[-200.0, 0.0]])
    out = loss_of(logprobs, old, torch.tensor([-1.0]), torch.ones(1, 2))
    assert math.isfinite(out.loss.item())
    out.loss.backward()
    assert logprobs.grad is not None and torch.isfinite(logprobs.grad).all()


def test_advantages_and_old_logprobs_get_no_gradient() -> None:
    logprobs, old, adv, mask = hand_batch()
    old = old.clone().requires_grad_(True)
    adv = adv.clone().requires_grad_(True)
    loss_of(logprobs, old, adv, mask).loss.backward()
    assert old.grad is None and adv.grad is None
    assert logprobs.grad is not None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"advantages": torch.zeros(3)}, "advantages must be"),
        ({"mask": torch.ones(2, 4)}, "mask has shape"),
        ({"ref_logprobs": torch.zeros(2, 2)}, "ref_logprobs has shape"),
        ({"behaviour_logprobs": torch.zeros(3)}, "behaviour_logprobs has shape"),
        ({"logprobs": torch.zeros(6), "old_logprobs": torch.zeros(6)}, "must be \\[B, T\\]"),
    ],
)
def test_bad_tensors_are_rejected_with_a_clear_message(
    kwargs: dict[str, torch.Tensor], message: str
) -> None:
    args = {
        "logprobs": torch.zeros(2, 3),
        "old_logprobs": torch.zeros(2, 3),
        "advantages": torch.zeros(2),
        "mask": torch.ones(2, 3),
    } | kwargs
    with pytest.raises(ValueError, match=message):
        policy_loss(LossInputs(**args), AlgorithmConfig(kl_coef=0.0))


def test_kl_without_a_reference_is_rejected() -> None:
    x = LossInputs(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        policy_loss(x, AlgorithmConfig(kl_coef=0.1))


@pytest.mark.parametrize(
    "bad",
    [
        {"loss_agg": "mean"},
        {"kl_type": "k2"},
        {"dual_clip": 1.0},
        {"tis_cap": 0.0},
        {"behaviour_correction": "clip"},
        {"is_level": "geometric"},
        {"mini_batch_groups": -1},
    ],
)
def test_bad_objective_settings_are_rejected_by_the_config(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError, match=next(iter(bad))):
        AlgorithmConfig(**bad)  # type: ignore[arg-type]


def test_micro_batch_statistics_combine_to_the_whole_batch() -> None:
    logprobs, old, adv, mask = hand_batch()
    whole = loss_of(logprobs, old, adv, mask).stats
    parts = [
        loss_of(logprobs[i : i + 1], old[i : i + 1], adv[i : i + 1], mask[i : i + 1])
        for i in (0, 1)
    ]
    tokens = float(mask.sum())
    merged = LossStats.combine([(p.stats, p.stats.tokens / tokens) for p in parts])
    for name, value in whole.as_dict().items():
        assert getattr(merged, name) == pytest.approx(value), name
    assert merged.tokens == whole.tokens == 5.0
