"""What a generation request is and how it fails: shared by the service and its callers.

The inference service, its OpenAI-compatible API and the rollout worker all build vLLM sampling
parameters and tell a request that can never succeed (:class:`PromptRejected`, dead-lettered or
answered 400) from an engine that is not there right now (:class:`EngineUnavailable`, retried).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm import RequestOutput, SamplingParams


class EngineUnavailable(RuntimeError):
    """The engine is not started yet, or it died."""


class PromptRejected(ValueError):
    """A request that cannot succeed anywhere: an empty prompt, one too long for the model's
    context, sampling settings the engine refuses, or a group the reward service refuses."""


@dataclass(frozen=True)
class Generation:
    """Outputs of one batch of prompts and the one version that produced all of them."""

    version: int
    outputs: list[RequestOutput]
    seconds: float


#: Logit bias that keeps a token from ever being sampled (exp(-100) is 0 in float32).
NEVER_BIAS = -100.0


def never_sample(token_ids: frozenset[int]) -> dict[int, float] | None:
    """The ``logit_bias`` that masks ``token_ids`` (a vision-language model's picture
    placeholders); None when there are none."""
    return dict.fromkeys(sorted(token_ids), NEVER_BIAS) if token_ids else None


def sampling_params(**kwargs: Any) -> SamplingParams:
    """vLLM sampling parameters; settings it rejects raise :class:`PromptRejected`."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMClientError

    try:
        return SamplingParams(**kwargs)
    except (VLLMClientError, ValueError) as exc:
        raise PromptRejected(f"sampling settings rejected: {exc}") from None
