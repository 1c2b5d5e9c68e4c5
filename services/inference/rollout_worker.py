"""The rollout worker: prompts in, scored groups out, inside the inference service.

Per prompt: generate G samples in one engine request (so the group has one weight version),
score them with the reward service, append the scored group to the rollouts stream, and only
then acknowledge the prompt. Up to ``inference.prompts_per_batch`` prompts are in flight at
once, so the engine batches them; a slot is refilled as soon as its prompt is done. Each group's
time in each phase (waiting for a weight reload, generating, decoding, scoring, publishing) is
observed in ``mapo_inference_rollout_seconds{phase}``.

Failures never crash the service: an unreachable reward service is retried with backoff while
the prompt stays held; a bus or engine failure gives the prompt back for redelivery (the bus
dead-letters it after ``bus.max_deliveries`` attempts); a prompt that cannot succeed anywhere
(empty, longer than the model's context, or refused by the reward service as invalid) is
dead-lettered at once with the reason. A dead engine (``errored``: vLLM cannot restart it
in-process) ends the worker's loop: it takes no more prompts, the ones in flight finish or are
given back, and the service exits for a fresh replica (``inference.engine_dead_grace_s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    retry_if_not_exception_type,
    wait_exponential_jitter,
)

from services.core.config import RunConfig
from services.core.images import ImageError, decode_image, limits_of
from services.core.schemas import PromptMessage, Rollout, ScoredGroup
from services.inference.generation import (
    EngineUnavailable,
    Generation,
    PromptRejected,
    never_sample,
    sampling_params,
)
from services.inference.metrics import InferenceMetrics
from services.transport.images import image_store
from services.transport.names import INFERENCE_GROUP

if TYPE_CHECKING:
    from vllm import CompletionOutput, RequestOutput, SamplingParams

    from services.transport import Bus, Delivery

log = logging.getLogger(__name__)

#: A prompt with pictures, as the engine takes it: text with one placeholder per picture.
ImagePrompt = dict[str, Any]

RETRY_MIN_S = 0.5
RETRY_MAX_S = 10.0


def backoff(what: str, **options: Any) -> AsyncRetrying:
    """Retry a call until it works: waits grow from RETRY_MIN_S to RETRY_MAX_S with jitter (so
    replicas do not retry in step), each failure is logged as 'cannot <what>', and cancellation
    still ends it at once."""

    def note(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        log.warning("cannot %s: %s; retrying in %.1f s", what, error, state.upcoming_sleep)

    return AsyncRetrying(
        wait=wait_exponential_jitter(multiplier=RETRY_MIN_S, max=RETRY_MAX_S, jitter=RETRY_MIN_S),
        before_sleep=note,
        reraise=True,
        **options,
    )


class EngineState(Protocol):
    @property
    def errored(self) -> bool: ...


class RolloutService(Protocol):
    """What the worker needs from the inference service that runs it."""

    @property
    def config(self) -> RunConfig: ...

    @property
    def replica(self) -> str: ...

    @property
    def metrics(self) -> InferenceMetrics: ...

    @property
    def engine(self) -> EngineState | None: ...

    @property
    def vision_token_ids(self) -> frozenset[int]: ...

    def tokenize(self, text: str) -> list[int]: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...

    async def generate(
        self, prompts: Sequence[Sequence[int] | ImagePrompt], params: SamplingParams
    ) -> Generation: ...


class Scorer(Protocol):
    """The part of the reward client the worker uses."""

    async def score_batch(
        self, task: str, completions: Sequence[str], answers: Sequence[str]
    ) -> Sequence[Any]: ...


def rollout_params(
    prompt: PromptMessage, max_tokens: int, forbidden: frozenset[int] = frozenset()
) -> SamplingParams:
    """G samples with the log-prob of each sampled token (flat: no per-token dicts).

    ``forbidden`` token ids are never sampled: a vision-language model's image and video
    placeholders, which in a completion would make the trainer look for a picture that is not
    there (an untrained model emits them)."""
    from vllm.sampling_params import RequestOutputKind

    return sampling_params(
        logit_bias=never_sample(forbidden),
        n=prompt.group_size,
        temperature=prompt.temperature,
        top_p=prompt.top_p,
        max_tokens=max_tokens,
        logprobs=0,
        flat_logprobs=True,
        detokenize=False,  # the text is decoded once per completion (InferenceService.decode)
        output_kind=RequestOutputKind.FINAL_ONLY,
    )


def sampled_logprobs(completion: CompletionOutput) -> np.ndarray:
    """The log-prob of each sampled token, in order (float32)."""
    flat: Any = completion.logprobs  # FlatLogprobs, or a list of per-position dicts
    n = len(completion.token_ids)
    if flat is None:
        raise ValueError("the engine returned no log-probs")
    starts = getattr(flat, "start_indices", None)
    if starts is not None:
        # With logprobs=0 each position holds exactly the sampled token.
        values = np.asarray(flat.logprobs, dtype=np.float32)
        if values.size != n or list(flat.token_ids) != list(completion.token_ids):
            raise ValueError("log-probs do not line up with the sampled tokens")
        return values
    return np.asarray(
        [pos[tok].logprob for pos, tok in zip(flat, completion.token_ids, strict=True)],
        dtype=np.float32,
    )


def build_group(
    prompt: PromptMessage,
    output: RequestOutput,
    texts: Sequence[str],
    scores: Sequence[Any],
    *,
    version: int,
    replica: str,
) -> ScoredGroup:
    """One scored group from the engine's output, its decoded texts and their scores."""
    completions = list(output.outputs)
    if not len(scores) == len(texts) == len(completions):
        raise ValueError(
            f"{len(scores)} scores and {len(texts)} texts for {len(completions)} completions"
        )
    rollouts = tuple(
        Rollout(
            text=text,
            token_ids=np.asarray(c.token_ids, dtype=np.int32),
            logprobs=sampled_logprobs(c),
            reward=float(s.reward),
            success=bool(s.success),
            status=str(s.status),
            terms={str(k): float(v) for k, v in dict(s.terms).items()},
            finish_reason=c.finish_reason or "length",
        )
        for c, text, s in zip(completions, texts, scores, strict=True)
    )
    return ScoredGroup(
        group_id=prompt.prompt_id,
        prompt=prompt.prompt,
        prompt_token_ids=np.asarray(output.prompt_token_ids or [], dtype=np.int32),
        answer=prompt.answer,
        task=prompt.task,
        policy_version=version,
        replica=replica,
        rollouts=rollouts,
        created_at=time.time(),
        images=prompt.images,
    )


class RolloutWorker:
    """Consumes the prompts stream as one consumer of the ``inference`` group."""

    def __init__(self, service: RolloutService, bus: Bus, scorer: Scorer | None = None) -> None:
        cfg = service.config
        self.service = service
        self.bus = bus
        self.scorer = scorer
        self.prompts_stream = cfg.bus.prompts_stream
        self.rollouts_stream = cfg.bus.rollouts_stream
        self.group = INFERENCE_GROUP
        self.consumer = service.replica
        self.images = image_store(bus, cfg)
        self.slots = cfg.inference.prompts_per_batch
        self.state = "starting"
        self._owns_scorer = scorer is None
        self._running = asyncio.Event()
        self._running.set()
        self._stopping = False
        self._tasks: set[asyncio.Task[None]] = set()
        # Entry ids of the prompts being worked on: the only ones the renewer keeps ours.
        self._working: set[str] = set()

    # ------------------------------------------------------------------ control

    def pause(self) -> None:
        """Take no new prompts; the ones in flight finish."""
        self._running.clear()
        self.state = "paused"

    def resume(self) -> None:
        self._running.set()
        self.state = "running"

    def stop(self) -> None:
        self._stopping = True
        self._running.set()

    async def close(self) -> None:
        """Cancel unfinished prompts (they are given back to the bus) and close the scorer."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._owns_scorer and self.scorer is not None:
            with contextlib.suppress(Exception):
                await self.scorer.close()  # type: ignore[attr-defined]
        self.state = "stopped"

    # ------------------------------------------------------------------ main loop

    async def run(self) -> None:
        if self.scorer is None:
            from services.reward.client import RewardClient

            cfg = self.service.config.reward
            self.scorer = RewardClient(cfg.address, cfg.timeout_s)
        await backoff("create the consumer group")(self._ensure_group)
        renewer = asyncio.create_task(self._renew_forever(), name="rollout-renew")
        self.state = "running" if self._running.is_set() else "paused"
        try:
            while not self._stopping:
                await self._running.wait()
                if self._stopping:
                    break
                free = self.slots - len(self._tasks)
                if free <= 0:
                    await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
                    continue
                engine = self.service.engine
                if engine is not None and engine.errored:
                    # Nothing here can bring it back: stop taking prompts (they stay on the bus
                    # for the other replicas) and leave the restart to the service's supervisor.
                    self.state = "engine dead"
                    log.error("the engine died: the rollout worker takes no more prompts")
                    break
                if engine is None:
                    self.state = "engine unavailable"
                    await asyncio.sleep(1.0)
                    continue
                deliveries = await backoff("read prompts")(self._read, free)
                for delivery in deliveries:
                    task = asyncio.create_task(self._process(delivery))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer

    async def _ensure_group(self) -> None:
        await self.bus.ensure_group(self.prompts_stream, self.group)

    async def _read(self, count: int) -> list[Delivery[PromptMessage]]:
        return await self.bus.read(
            self.prompts_stream, self.group, self.consumer, count, expect=PromptMessage
        )

    async def _renew_forever(self) -> None:
        """Keep the prompts being worked on ours while they take longer than the bus's idle
        timeout; a prompt no task works on any more is left for the bus to reclaim."""
        period = max(self.bus.claim_idle_ms / 3000.0, 0.05)
        while True:
            await asyncio.sleep(period)
            with contextlib.suppress(Exception):
                await self.bus.renew(self.prompts_stream, self.group, list(self._working))

    # ------------------------------------------------------------------ one prompt

    async def _process(self, delivery: Delivery[PromptMessage]) -> None:
        self._working.add(delivery.entry_id)
        try:
            await self._process_one(delivery)
        finally:
            self._working.discard(delivery.entry_id)

    async def _process_one(self, delivery: Delivery[PromptMessage]) -> None:
        prompt = delivery.message
        try:
            group = await self.rollout(prompt)
            started = time.perf_counter()
            await self.bus.publish(self.rollouts_stream, group)
            await self.bus.ack(self.prompts_stream, self.group, [delivery.entry_id])
            self._observe("publish", time.perf_counter() - started)
            self._count(group)
        except PromptRejected as exc:
            log.warning("dead-lettering prompt %s: %s", prompt.prompt_id, exc)
            try:
                await self.bus.dead_letter(delivery, f"inference: {exc}")
            except Exception as error:  # it comes back after claim_idle_ms, to be refused again
                log.warning("could not dead-letter prompt %s: %s", prompt.prompt_id, error)
            finally:
                self.bus.forget([delivery])
        except asyncio.CancelledError:
            await self._give_back(delivery)
            raise
        except Exception as exc:
            level = logging.WARNING if isinstance(exc, EngineUnavailable) else logging.ERROR
            log.log(level, "prompt %s failed, giving it back: %s", prompt.prompt_id, exc)
            await self._give_back(delivery)

    async def _give_back(self, delivery: Delivery[PromptMessage]) -> None:
        """Release a prompt for redelivery; whatever fails, this worker stops holding it, so
        at worst the bus reclaims it after claim_idle_ms, and its slot is free again."""
        try:
            async with asyncio.timeout(2.0):
                await self.bus.release([delivery])
        except Exception as exc:
            log.warning("could not give prompt %s back: %s", delivery.message.prompt_id, exc)
        finally:
            self.bus.forget([delivery])

    async def _pictures(self, prompt: PromptMessage) -> list[Any]:
        """The prompt's images, fetched and decoded; a missing, damaged or oversized one makes
        the prompt one that can never succeed (:class:`PromptRejected`)."""
        cfg = self.service.config
        if len(prompt.images) > cfg.task.max_images:
            raise PromptRejected(
                f"the prompt has {len(prompt.images)} images; task.max_images is "
                f"{cfg.task.max_images}"
            )
        try:
            blobs = await self.images.get_all(prompt.images)
            limits = limits_of(cfg)
            return await asyncio.to_thread(
                lambda: [decode_image(b, limits, f"image {i}") for i, b in enumerate(blobs)]
            )
        except ImageError as exc:
            raise PromptRejected(str(exc)) from None

    async def rollout(self, prompt: PromptMessage) -> ScoredGroup:
        """Generate and score one group (no bus involved but the image store)."""
        ids = self.service.tokenize(prompt.prompt)
        limit = self.service.config.model.max_model_len
        if not ids:
            raise PromptRejected("the prompt is empty")
        if len(ids) >= limit:
            raise PromptRejected(f"the prompt has {len(ids)} tokens; the context is {limit}")
        request: Sequence[int] | ImagePrompt = ids
        if prompt.images:
            # The engine's processor expands each image's placeholder into its patch tokens.
            pictures = await self._pictures(prompt)
            request = {"prompt": prompt.prompt, "multi_modal_data": {"image": pictures}}
        forbidden = self.service.vision_token_ids
        params = rollout_params(prompt, min(prompt.max_tokens, limit - len(ids)), forbidden)
        started = time.perf_counter()
        gen = await self.service.generate([request], params)
        waited = time.perf_counter() - started
        # The engine's own time; the rest is waiting at the version gate (a reload running).
        self._observe("generate", gen.seconds)
        self._observe("weights_wait", max(waited - gen.seconds, 0.0))
        output = gen.outputs[0]
        started = time.perf_counter()
        texts = [self.service.decode(c.token_ids) for c in output.outputs]
        self._observe("decode", time.perf_counter() - started)
        started = time.perf_counter()
        scores = await self._score(prompt, texts)
        self._observe("score", time.perf_counter() - started)
        return build_group(
            prompt, output, texts, scores, version=gen.version, replica=self.service.replica
        )

    def _count(self, group: ScoredGroup) -> None:
        """One more group, and its prompt's text and picture tokens."""
        metrics = self.service.metrics
        metrics.groups.inc()
        image_id = getattr(self.service, "image_token_id", None)
        images = int((group.prompt_token_ids == image_id).sum()) if image_id is not None else 0
        metrics.prompt_tokens.labels("image").inc(images)
        metrics.prompt_tokens.labels("text").inc(len(group.prompt_token_ids) - images)

    def _observe(self, phase: str, seconds: float) -> None:
        """One group's time in ``phase`` (``mapo_inference_rollout_seconds``)."""
        self.service.metrics.rollout_seconds.labels(phase).observe(seconds)

    async def _score(self, prompt: PromptMessage, completions: list[str]) -> Sequence[Any]:
        """Score a group, retrying with backoff while the reward service is unreachable."""
        assert self.scorer is not None

        def waiting(state: RetryCallState) -> None:
            self.state = "waiting for the reward service"

        retrying = backoff(
            f"score prompt {prompt.prompt_id} (reward service)",
            # A refusal (ValueError) is final; cancellation is not an Exception and ends it too.
            retry=retry_if_exception_type(Exception) & retry_if_not_exception_type(ValueError),
            after=waiting,
        )
        try:
            scores = await retrying(
                self.scorer.score_batch, prompt.task, completions, [prompt.answer]
            )
        except ValueError as exc:  # the service refused this request: retrying cannot help
            raise PromptRejected(f"the reward service refused it: {exc}") from None
        if self.state == "waiting for the reward service":
            self.state = "running" if self._running.is_set() else "paused"
        return scores
