"""The inference service's runtime: the engine, the served weights, the rollout worker.

Start-up runs in the background (the HTTP probes answer while the model loads): build the
engine, load the newest valid weight version, then start the rollout worker and the listener
for weight announcements. ``/ready`` turns true when the engine is up and the version known.

A dead engine is not recovered in-process: vLLM's engine core cannot be restarted under a
running ``AsyncLLM``. When it dies (its process killed, an out-of-memory kill, a crash inside a
step), ``AsyncLLM.errored`` turns true and every call raises ``EngineDeadError``; the service
then answers 503 on ``/live`` and ``/ready`` with the reason, the rollout worker stops taking
prompts, and after ``inference.engine_dead_grace_s`` the service reports a fatal error, on which
``mapo inference serve`` exits with status 1 for its supervisor (compose's restart policy,
Kubernetes, ``mapo up``) to start a fresh replica.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from tenacity import AsyncRetrying, before_sleep_log, wait_exponential_jitter

from services.core.config import RunConfig
from services.core.schemas import WeightAnnouncement
from services.inference.generation import EngineUnavailable, Generation, PromptRejected
from services.inference.metrics import InferenceMetrics
from services.inference.reload import Candidate, ReloadRefused, WeightManager
from services.inference.rollout_worker import ImagePrompt, RolloutWorker
from services.models.arch import image_token_id, is_vision_language, placeholder_ids
from services.weights.base_model import resolve_model_dir
from services.weights.trust import WeightTrust

if TYPE_CHECKING:
    from vllm import RequestOutput, SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

    from services.transport import Bus, Delivery

log = logging.getLogger(__name__)

# How long start-up waits for the bus before it serves the HTTP API without it.
BUS_STARTUP_WAIT_S = 10.0
# Without a bus, retry it every second, then less often, up to every half minute.
BUS_RETRY_MAX_S = 30.0
# How often the engine's state is looked at (a death seen by a request is noted at once).
ENGINE_WATCH_S = 0.5
# Characters one token may stand for, at least, in the bound on a prompt's length that is checked
# before it is tokenised (see max_prompt_chars).
MIN_CHARS_PER_TOKEN = 16

T = TypeVar("T")


def replica_name(configured: str) -> str:
    return configured or f"{socket.gethostname()}-{os.getpid()}"


class InferenceService:
    """Owns the engine and everything that shares it."""

    def __init__(self, config: RunConfig, *, use_bus: bool = True) -> None:
        self.config = config
        self.use_bus = use_bus
        self.model = config.model.path
        self.replica = replica_name(config.inference.replica)
        self.metrics = InferenceMetrics()
        self.engine: AsyncLLM | None = None
        self.weights: WeightManager | None = None
        self.bus: Bus | None = None
        self.worker: RolloutWorker | None = None
        self.tokenizer: Any = None
        #: Longer prompts cannot fit the context whatever they tokenise to: refused untokenised.
        self.max_prompt_chars = 0
        #: Image and video placeholders of a vision-language model: never sampled.
        self.vision_token_ids: frozenset[int] = frozenset()
        self.image_token_id: int | None = None
        self.started_at = time.time()
        self.startup_error = ""
        self.ready = False
        #: Why the engine died, and when (monotonic): empty / None while it runs.
        self.engine_dead_reason = ""
        self.engine_dead_at: float | None = None
        self._on_fatal: Callable[[str], None] | None = None
        # Tokenising, chat templates, decoding for the HTTP API: off the event loop, one at a
        # time (a fast tokenizer shared between threads can fail with "Already borrowed").
        self._cpu = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mapo-cpu")
        self._tasks: list[asyncio.Task[Any]] = []
        self._waiting = 0  # generations waiting at the version gate
        self.metrics.watch_queue(self.queue_depth)

    # ------------------------------------------------------------------ lifecycle

    async def start(self, on_fatal: Callable[[str], None] | None = None) -> None:
        """Bring everything up; on a start-up error, report it through ``on_fatal``, and
        later a dead engine too (after ``inference.engine_dead_grace_s``)."""
        self._on_fatal = on_fatal
        try:
            await self._start()
        except Exception as exc:
            self.startup_error = f"{type(exc).__name__}: {exc}"
            log.exception("inference service failed to start")
            if on_fatal is not None:
                on_fatal(f"could not start: {self.startup_error}")

    async def _start(self) -> None:
        from services.inference.engine import EngineReloader, build_async_engine

        model_dir = await asyncio.to_thread(resolve_model_dir, self.model)
        started = time.perf_counter()
        await asyncio.to_thread(self._build_engine, build_async_engine, str(model_dir))
        assert self.engine is not None
        self._spawn(self._watch_engine(), "engine-watch")
        self.tokenizer = self.engine.get_tokenizer()
        self.max_prompt_chars = max_prompt_chars(self.tokenizer, self.config.model.max_model_len)
        if is_vision_language(model_dir):
            self.vision_token_ids = placeholder_ids(self.tokenizer)
            self.image_token_id = image_token_id(model_dir)
        log.info("engine ready in %.1f s (%s)", time.perf_counter() - started, model_dir)
        self.weights = WeightManager(
            EngineReloader(self.engine),
            model_dir,
            store=self.config.weights.store,
            trust=WeightTrust.from_config(self.config),
            on_change=self.metrics.weight_version.set,
            on_reload=self.metrics.reload_seconds.observe,
            on_failure=lambda reason: self.metrics.reload_failures.labels(reason).inc(),
        )
        candidates = await asyncio.to_thread(self.weights.store_candidates)
        announced = None
        if self.use_bus:
            from services.transport.factory import make_bus

            self.bus = make_bus(self.config)
            try:
                async with asyncio.timeout(BUS_STARTUP_WAIT_S):
                    announced = await self._latest_announcement()
            except Exception as exc:
                reason = str(exc) or type(exc).__name__
                log.warning("bus unreachable at start-up (%s); retrying in the background", reason)
        if announced is not None:
            candidates.append(_candidate(announced.message))
        await self.weights.load_newest(candidates)
        self.ready = True
        log.info("ready: serving %s at weight version %d", self.model, self.weights.version)
        if self.bus is not None:
            self._spawn(self._run_bus(announced), "bus")

    async def _latest_announcement(self) -> Delivery[WeightAnnouncement] | None:
        assert self.bus is not None
        return await self.bus.latest(self.config.bus.weights_stream, expect=WeightAnnouncement)

    async def _run_bus(self, announced: Delivery[WeightAnnouncement] | None) -> None:
        """Start the rollout worker once the newest announced version is in, then follow the
        announcements. Without a bus at start-up, wait for it first: no rollout is generated
        before the newest announced weights are loaded."""
        assert self.bus is not None and self.weights is not None
        if announced is None:
            retrying = AsyncRetrying(
                wait=wait_exponential_jitter(multiplier=1.0, max=BUS_RETRY_MAX_S, jitter=1.0),
                before_sleep=before_sleep_log(log, logging.WARNING),
            )
            announced = await retrying(self._latest_announcement)
            if announced is not None:
                with contextlib.suppress(ReloadRefused):
                    await self.weights.apply(_candidate(announced.message))
        cursor = announced.entry_id if announced is not None else "0"
        self.worker = RolloutWorker(self, self.bus)
        self._spawn(self._follow_weights(cursor), "weights-follower")
        await self.worker.run()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """A background task whose unexpected end is logged, never silent."""

        def done(task: asyncio.Task[None]) -> None:
            if not task.cancelled() and task.exception() is not None:
                log.error("%s stopped", name, exc_info=task.exception())

        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(done)
        self._tasks.append(task)

    def _build_engine(self, build: Callable[[RunConfig, str], AsyncLLM], model_dir: str) -> None:
        # Stored here rather than returned: a result returned from the thread stays referenced
        # by the executor's finished work item, which would keep the engine alive after stop().
        self.engine = build(self.config, model_dir)

    # ------------------------------------------------------------------ a dead engine

    async def _watch_engine(self) -> None:
        """Wait for the engine to die; then, after the grace period, report it as fatal."""
        while self.engine_dead_at is None:
            engine = self.engine
            if engine is not None and engine.errored:
                self.engine_died("its engine core process exited or failed")
                break
            await asyncio.sleep(ENGINE_WATCH_S)
        assert self.engine_dead_at is not None
        grace = self.config.inference.engine_dead_grace_s
        await asyncio.sleep(max(0.0, self.engine_dead_at + grace - time.monotonic()))
        reason = f"the engine died ({self.engine_dead_reason}); exiting for a fresh replica"
        log.error("%s", reason)
        if self._on_fatal is not None:
            self._on_fatal(reason)

    def engine_died(self, reason: str) -> None:
        """Note that the engine is dead (once): the replica stops being ready at once."""
        if self.engine_dead_at is not None:
            return
        self.engine_dead_at = time.monotonic()
        self.engine_dead_reason = reason
        self.ready = False
        grace = self.config.inference.engine_dead_grace_s
        log.error(
            "the vLLM engine died (%s): /live and /ready answer 503; exiting in %.0f s",
            reason,
            grace,
        )

    async def off_loop(self, fn: Callable[[], T]) -> T:
        """Run CPU-heavy request work (tokenising, rendering, decoding) off the event loop, so
        the probes and other requests keep being answered meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self._cpu, fn)

    async def stop(self) -> None:
        """Stop the worker (its unfinished prompts go back to the bus), then the engine."""
        self.ready = False
        if self.worker is not None:
            self.worker.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.worker is not None:
            await self.worker.close()
        if self.bus is not None:
            with contextlib.suppress(Exception):
                await self.bus.close()
        if self.engine is not None:
            # Stop the output handler first: it would report the engine core's exit as a crash.
            handler = getattr(self.engine, "output_handler", None)
            if handler is not None:
                handler.cancel()
                await asyncio.gather(handler, return_exceptions=True)
                self.engine.output_handler = None
            await asyncio.to_thread(self.engine.shutdown)
            # Drop every reference, or the engine's finaliser runs again at interpreter exit.
            if self.weights is not None:
                self.weights.reloader = _Stopped()
            self.engine = None
            gc.collect()
        self._cpu.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ weights

    async def _follow_weights(self, cursor: str) -> None:
        """Apply every newer version announced on the weights stream."""
        assert self.bus is not None and self.weights is not None
        follower = self.bus.follow(
            self.config.bus.weights_stream, cursor, expect=WeightAnnouncement
        )
        while True:
            try:
                deliveries = await follower.poll()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("cannot read weight announcements: %s; retrying", exc)
                await asyncio.sleep(1.0)
                continue
            if not deliveries:
                continue
            newest = self.weights.newest_acceptable(d.message for d in deliveries)
            if newest is None:
                continue  # every one refused: counted and logged
            try:
                await self.weights.apply(_candidate(newest))
            except ReloadRefused:
                pass  # counted and logged; the old version keeps serving
            except Exception:
                log.exception("loading announced version %d failed", newest.version)

    async def reload(self, version: int | None = None) -> int:
        """Admin reload: ``version`` from the store (any, even older), else the newest one."""
        weights = self._require_weights()
        if version is None:
            candidates = await asyncio.to_thread(weights.store_candidates)
            if self.bus is not None:
                try:
                    async with asyncio.timeout(BUS_STARTUP_WAIT_S):
                        latest = await self._latest_announcement()
                except Exception as exc:
                    log.warning("no announcements from the bus (%s): using the store only", exc)
                    latest = None
                if latest is not None:
                    candidates.append(_candidate(latest.message))
            return await weights.load_newest(candidates)
        if not weights.store:
            raise ReloadRefused("missing", "no weight store configured (weights.store)")
        return await weights.apply(Candidate(version, weights.store), force=True)

    def _require_weights(self) -> WeightManager:
        if self.weights is None:
            raise EngineUnavailable("the engine is still starting")
        return self.weights

    # ------------------------------------------------------------------ generation

    def tokenize(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise EngineUnavailable("the engine is still starting")
        if self.max_prompt_chars and len(text) > self.max_prompt_chars:
            # Tokenising megabytes takes seconds: a text this long cannot fit anyway.
            raise PromptRejected(
                f"the prompt has {len(text)} characters: more than a context of "
                f"{self.config.model.max_model_len} tokens can hold"
            )
        try:
            ids: list[int] = self.tokenizer.encode(text)
        except (UnicodeError, TypeError, ValueError) as exc:  # a lone surrogate, say
            raise PromptRejected(f"the text cannot be tokenised: {exc}") from None
        return ids

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of generated tokens, as the engine's detokenizer would give it.

        Requests run with ``detokenize=False``: decoding a finished completion once here costs
        far less than the engine's per-step incremental detokenization of every token.
        """
        text: str = self.tokenizer.decode(list(token_ids), skip_special_tokens=True)
        return text

    def check_length(self, prompt_ids: Sequence[int], max_tokens: int) -> None:
        limit = self.config.model.max_model_len
        if not prompt_ids:
            raise PromptRejected("the prompt is empty")
        if len(prompt_ids) + max_tokens > limit:
            raise PromptRejected(
                f"the prompt has {len(prompt_ids)} tokens and max_tokens is {max_tokens}: "
                f"together more than the model's context of {limit} tokens"
            )

    async def generate(
        self, prompts: Sequence[Sequence[int] | ImagePrompt], params: SamplingParams
    ) -> Generation:
        """Run prompts (token ids, or text with pictures) through the engine with one weight
        version for all."""
        engine = self.engine
        weights = self._require_weights()
        if engine is None or engine.errored:
            if engine is not None:
                self.engine_died("its engine core process exited or failed")
            raise EngineUnavailable("the engine is not running")
        from vllm.exceptions import VLLMClientError
        from vllm.inputs import tokens_input
        from vllm.v1.engine.exceptions import EngineDeadError

        async def one(prompt: Sequence[int] | ImagePrompt) -> RequestOutput:
            final = None
            request = prompt if isinstance(prompt, dict) else tokens_input(list(prompt))
            async for out in engine.generate(request, params, request_id=uuid.uuid4().hex):
                final = out
            assert final is not None
            return final

        self._waiting += 1
        admitted = False
        try:
            async with weights.gate.shared():
                self._waiting -= 1
                admitted = True
                version = weights.version
                started = time.perf_counter()
                try:
                    outputs = list(await asyncio.gather(*(one(p) for p in prompts)))
                except VLLMClientError as exc:
                    raise PromptRejected(str(exc)) from None
                except EngineDeadError as exc:
                    self.engine_died(f"a generation failed: {exc}")
                    raise EngineUnavailable(f"the engine died: {exc}") from None
                seconds = time.perf_counter() - started
        finally:
            if not admitted:
                self._waiting -= 1
        self.metrics.record_tokens(sum(len(c.token_ids) for o in outputs for c in o.outputs))
        return Generation(version, outputs, seconds)

    def queue_depth(self) -> float:
        running = self.engine.get_num_unfinished_requests() if self.engine is not None else 0
        return float(running + self._waiting)

    async def live(self) -> None:
        """A round trip to the engine core; raises if it does not answer in time, and at once
        (with the reason) when the engine is found dead meanwhile."""
        engine = self.engine
        if engine is None:
            raise EngineUnavailable("the engine is still starting")
        self._raise_if_dead(engine)

        async def round_trip() -> None:
            await engine.check_health()
            await engine.is_paused()

        probe = asyncio.ensure_future(round_trip())
        # A call in flight when the engine core dies may never be answered: look at the engine's
        # state meanwhile rather than wait for the deadline.
        probe.add_done_callback(lambda t: t.cancelled() or t.exception())
        try:
            async with asyncio.timeout(self.config.inference.live_timeout_s):
                while not probe.done():
                    await asyncio.wait({probe}, timeout=ENGINE_WATCH_S)
                    self._raise_if_dead(engine)
            probe.result()
        except Exception:
            self._raise_if_dead(engine)
            raise
        finally:
            probe.cancel()

    def _raise_if_dead(self, engine: Any) -> None:
        if engine.errored:
            self.engine_died("its engine core process exited or failed")
        if self.engine_dead_at is not None:
            left = self.engine_dead_at + self.config.inference.engine_dead_grace_s
            raise EngineUnavailable(
                f"the engine died ({self.engine_dead_reason}); the replica exits in "
                f"{max(0.0, left - time.monotonic()):.0f} s"
            )

    def status(self) -> dict[str, Any]:
        weights = self.weights
        return {
            "model": self.model,
            "replica": self.replica,
            "ready": self.ready,
            "weight_version": weights.version if weights else None,
            "weight_step": weights.served.step if weights else None,
            "weights_healthy": weights.healthy if weights else None,
            "last_weight_error": weights.last_error if weights else "",
            "rollout_worker": self.worker.state if self.worker else "off",
            "startup_error": self.startup_error,
            "engine": self._engine_state(),
            "engine_error": self.engine_dead_reason,
        }

    def _engine_state(self) -> str:
        if self.engine_dead_at is not None:
            return "dead"
        return "starting" if self.engine is None else "running"


class _Stopped:
    """The reloader of a service whose engine has shut down."""

    async def reload_files(self, paths: Sequence[str], expected: Any) -> None:
        raise EngineUnavailable("the engine has shut down")

    async def reset_prefix_cache(self) -> None:
        raise EngineUnavailable("the engine has shut down")


def max_prompt_chars(tokenizer: Any, max_model_len: int) -> int:
    """The most characters a prompt that fits ``max_model_len`` tokens can have.

    No token stands for more characters than its vocabulary entry has (a byte-level entry has
    one per byte; a sentencepiece or wordpiece one its marker too), so a longer text needs more
    tokens than the context holds. The bound is generous (at least ``MIN_CHARS_PER_TOKEN`` per
    token): it only spares the service from tokenising megabytes to find that out. 0: no bound
    (a tokenizer without a vocabulary to look at).
    """
    try:
        vocab = tokenizer.get_vocab()
    except Exception:
        return 0
    longest = max((len(token) for token in vocab), default=0)
    return max_model_len * max(longest, MIN_CHARS_PER_TOKEN)


def _candidate(msg: WeightAnnouncement) -> Candidate:
    return Candidate.announced(msg)
