"""The trainer's run loop: prompts out, scored groups in, one step at a time, exactly once.

Two asyncio tasks share the bus: the feeder (:mod:`services.trainer.feeder`) keeps prompts
in flight and queues scored groups as they arrive; this loop takes groups from the queue,
admits or rejects each one (:func:`services.trainer.admission.admit`), and for every batch of
``trainer.prompts_per_step`` groups: trains (in a thread), publishes weights, logs metrics,
and every ``trainer.checkpoint_every`` steps checkpoints and only then acknowledges the groups
the checkpoint covers.

Exactly-once guarantee. Every scored group is applied exactly once to the model lineage that
survives: the ids of applied groups (the ledger), the dataset position and the counters are
saved in the same atomic checkpoint as the weights and optimiser, and a group's stream entry is
acknowledged only after a checkpoint that includes it is on disk. If the process dies, the
groups applied since the last checkpoint are redelivered (they were never acknowledged) and
applied again to the restored model, whose ledger does not contain them; groups the checkpoint
covers but whose acknowledgement was lost are recognised by the ledger and acknowledged without
being applied. A group is never applied twice to one lineage, and none is lost. The steps taken
after the last checkpoint by a killed process are lost with it (as are the weight versions it
published from them: a resumed run numbers its versions above them). Prompts are re-issued
after a resume under the ids they had, and the in-flight set is rebuilt from the streams, so a
prompt already outstanding is not published twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
import uuid
from collections.abc import Container
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.core.config import RunConfig
from services.core.images import ImageError
from services.core.schemas import ScoredGroup
from services.trainer import checkpoint as ckpt
from services.trainer.admission import Action, RunView, Verdict, admit
from services.trainer.budget import PromptProducer
from services.trainer.dataset import Position, PromptOrder, eval_examples, load_examples
from services.trainer.feeder import Feeder
from services.trainer.ledger import AppliedLedger, DeferredAcks
from services.trainer.metrics import JsonlLog, TrainerMetrics
from services.trainer.model import Learner
from services.trainer.vision import GroupVision
from services.transport import Bus, Delivery
from services.transport.factory import make_bus
from services.transport.images import ImageStore, image_store
from services.weights.publish import WeightPublisher, base_tensor_spec

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"
APPLIED_FILE = "applied.jsonl"
WAITING_LOG_EVERY_S = 30.0
#: Weight announcements kept on the bus (a replica needs only the newest).
ANNOUNCEMENTS_KEPT = 64

COUNTERS = (
    "groups_applied",
    "stale_dropped",
    "stale_corrected",
    "dapo_filtered",
    "duplicates",
    "dead_lettered",
    "unscored",
)


class RunDirError(RuntimeError):
    """The run cannot start as configured (a fresh run over an old one, a budget too small)."""


@dataclass
class RunState:
    """Everything besides tensors that a checkpoint must restore."""

    run_id: str
    step: int = 0
    version: int = 0
    position: Position = field(default_factory=Position)
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    ledger: AppliedLedger = field(default_factory=AppliedLedger)

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "step": self.step,
            "version": self.version,
            "position": self.position.to_dict(),
            "counters": dict(self.counters),
            "ledger": self.ledger.state_dict(),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RunState:
        counters = dict.fromkeys(COUNTERS, 0) | {k: int(v) for k, v in d["counters"].items()}
        return cls(
            run_id=str(d["run_id"]),
            step=int(d["step"]),
            version=int(d["version"]),
            position=Position.from_dict(d["position"]),
            counters=counters,
            ledger=AppliedLedger.from_state_dict(d["ledger"]),
        )


@dataclass
class Batch:
    """Groups admitted for the next step, and what happened to the rest."""

    groups: list[ScoredGroup] = field(default_factory=list)
    deliveries: list[Delivery[ScoredGroup]] = field(default_factory=list)
    staleness: dict[str, int] = field(default_factory=dict)
    corrected: set[str] = field(default_factory=set)
    dropped_ids: list[str] = field(default_factory=list)
    filtered_ids: list[str] = field(default_factory=list)
    unscored_ids: list[str] = field(default_factory=list)
    skipped: list[Delivery[ScoredGroup]] = field(default_factory=list)
    """Deliveries not applied (repeats, too stale, filtered): acked with the batch's step."""
    vision: dict[str, GroupVision] = field(default_factory=dict)

    def add(self, d: Delivery[ScoredGroup], verdict: Verdict) -> None:
        g = d.message
        if verdict.corrected:
            self.corrected.add(g.group_id)
        self.staleness[g.group_id] = verdict.staleness
        self.groups.append(g)
        self.deliveries.append(d)


class TrainerRun:
    """One process's run: built by :meth:`open`, driven by :meth:`run`."""

    def __init__(
        self, config: RunConfig, learner: Learner, state: RunState, *, resumed_from: Path | None
    ) -> None:
        self.config = config
        self.learner = learner
        self.state = state
        self.resumed_from = resumed_from
        self.run_dir = Path(config.trainer.run_dir)
        self.session = uuid.uuid4().hex[:8]
        self.metrics = TrainerMetrics()
        self.metrics_log = JsonlLog(self.run_dir / METRICS_FILE)
        self.applied_log = JsonlLog(self.run_dir / APPLIED_FILE)
        examples = load_examples(config.task.dataset, config.task.name, config.task.seed)
        self.order = PromptOrder(examples, config.task.seed, state.position)
        self.eval_set = (
            eval_examples(
                config.task.dataset, config.task.eval_dataset, config.task.name, config.task.seed
            )
            if config.trainer.eval_every
            else []
        )
        self.stopping = asyncio.Event()
        self.bus: Bus | None = None
        self.producer: PromptProducer | None = None
        self.feeder: Feeder | None = None
        self.images: ImageStore | None = None
        self.publisher: WeightPublisher | None = None
        self.acks: DeferredAcks | None = None
        self.last_checkpoint = state.step

    # ------------------------------------------------------------------ set-up

    @classmethod
    def open(cls, config: RunConfig, *, resume: bool) -> TrainerRun:
        """Load the newest checkpoint (``resume``) or start fresh; blocking."""
        if config.trainer.in_flight < config.trainer.prompts_per_step:
            raise RunDirError(
                f"trainer.in_flight={config.trainer.in_flight} is below trainer.prompts_per_step="
                f"{config.trainer.prompts_per_step}: a step could never fill; raise in_flight"
            )
        run_dir = Path(config.trainer.run_dir)
        latest = ckpt.latest_checkpoint(run_dir)
        if latest is not None and not resume:
            raise RunDirError(
                f"{run_dir} already holds checkpoints (newest: {latest.name}); pass --resume to "
                "continue that run, or choose another trainer.run_dir"
            )
        if latest is None:
            if resume:
                log.warning("no checkpoint in %s: starting a fresh run", run_dir)
            learner = Learner.build(config)
            state = RunState(run_id=uuid.uuid4().hex[:8])
            return cls(config, learner, state, resumed_from=None)
        learner = Learner.build(config, weights_from=ckpt.weights_dir(latest))
        state = RunState.from_json(learner.restore(latest))
        log.info("resuming from %s (step %d, version %d)", latest, state.step, state.version)
        return cls(config, learner, state, resumed_from=latest)

    async def run(self) -> int:
        cfg = self.config
        self.bus = make_bus(cfg)
        self.acks = DeferredAcks(self.bus)
        spec = base_tensor_spec(cfg.model.path)
        self.publisher = WeightPublisher(cfg, self.bus, spec, self.learner.serve_dtype)
        if cfg.trainer.metrics_port:
            self.metrics.serve(cfg.trainer.metrics_port)
        self._install_signal_handlers()
        feeding: asyncio.Task[None] | None = None
        try:
            # Acks wait for the next checkpoint: a restart finds up to a checkpoint's worth of
            # groups read but unacknowledged, all in flight again.
            self.producer = await PromptProducer.restore(
                self.bus,
                cfg.bus,
                cfg.trainer.in_flight,
                deferred=cfg.trainer.checkpoint_every * cfg.trainer.prompts_per_step,
            )
            self.images = image_store(self.bus, cfg)
            self.feeder = Feeder(
                cfg,
                self.bus,
                self.producer,
                self.order,
                self.state.run_id,
                self._version,
                self.learner.prompt_format,
            )
            await self._start()
            feeding = asyncio.create_task(self.feeder.run(), name="trainer-feeder")
            while self.state.step < cfg.trainer.steps and not self.stopping.is_set():
                await self._one_step()
            # No prompt goes out after the last checkpoint: its position is the last issued.
            await _cancelled(feeding)
            if self.state.step > self.last_checkpoint:
                await self._checkpoint()
            self._write_status("finished" if self.state.step >= cfg.trainer.steps else "stopped")
        finally:
            await _cancelled(feeding)
            self.publisher.close()
            await self.bus.close()
        return 0

    async def _start(self) -> None:
        """Publish the starting weights; a fresh run also writes checkpoint 0 first.

        Checkpoint 0 fixes the run id and dataset position before any prompt goes out, so a
        run killed at any point can be resumed under the same prompt ids.
        """
        assert self.publisher is not None
        if self.resumed_from is None:
            self.state.version = self.publisher.next_version_after_restart(-1)
            await self._checkpoint()
        else:
            self.state.version = self.publisher.next_version_after_restart(self.state.version)
        await self._publish()
        self.applied_log.append(
            {
                "event": "start",
                "from_step": self.state.step,
                "session": self.session,
                "run_id": self.state.run_id,
                "version": self.state.version,
                "time": time.time(),
            }
        )
        self._write_status("running")

    def _install_signal_handlers(self) -> None:
        # SIGTERM/SIGINT: finish the step in progress, checkpoint, acknowledge, exit cleanly.
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stopping.set)

    # ------------------------------------------------------------------ one step

    async def _one_step(self) -> None:
        cfg = self.config.trainer
        # 1. Wait for a full batch of admitted groups.
        t0 = time.perf_counter()
        batch = await self._collect(cfg.prompts_per_step)
        if batch is None:
            return
        wait_s = time.perf_counter() - t0

        # 2. Train on it (in a thread, so the feeder keeps the prompt stream full).
        lr = self.learner.set_step(self.state.step)
        result = await asyncio.to_thread(
            self.learner.train,
            batch.groups,
            batch.staleness,
            frozenset(batch.corrected),
            batch.vision,
        )
        self._applied(batch)

        # 3. Publish the new weights.
        publish_s = 0.0
        if self.state.step % cfg.publish_every == 0:
            self.state.version += 1
            publish_s = await self._publish()

        # 4. Evaluate on the held-out set now and then.
        record: dict[str, Any] = {}
        eval_s = 0.0
        if cfg.eval_every and self.eval_set and self.state.step % cfg.eval_every == 0:
            t = time.perf_counter()
            ev = await asyncio.to_thread(self.learner.evaluate, self.eval_set)
            eval_s = time.perf_counter() - t
            record["eval_accuracy"] = ev.accuracy

        # 5. The applied ids, before any checkpoint can cover them (surviving_lineage needs
        #    every checkpointed step in applied.jsonl).
        self.applied_log.append(
            {
                "step": self.state.step,
                "session": self.session,
                "group_ids": sorted(g.group_id for g in batch.groups),
                "stale_dropped_ids": batch.dropped_ids,
                "dapo_filtered_ids": batch.filtered_ids,
                "unscored_ids": batch.unscored_ids,
            }
        )

        # 6. Checkpoint, then acknowledge what it covers.
        checkpoint_s = 0.0
        if self.state.step % cfg.checkpoint_every == 0:
            t = time.perf_counter()
            await self._checkpoint()
            checkpoint_s = time.perf_counter() - t

        # 7. Log the step, with where its time went: one JSON line, Prometheus.
        timings = {
            "wait_s": wait_s,
            "publish_s": publish_s,
            "eval_s": eval_s,
            "checkpoint_s": checkpoint_s,
            "step_s": time.perf_counter() - t0,
        }
        record = self._step_record(result.metrics, timings) | record | {"lr": lr}
        self.metrics_log.append(record)
        self.metrics.record_step(record, result.p, result.lam, result.staleness)
        await self._record_bus()
        self._write_status("running")

    def _step_record(self, m: dict[str, float | None], timings: dict[str, float]) -> dict[str, Any]:
        assert self.producer is not None
        return {
            "step": self.state.step,
            "version": self.state.version,
            "time": time.time(),
            **m,
            **timings,
            **self.state.counters,
            "in_flight": self.producer.budget.in_flight,
        }

    # ------------------------------------------------------------------ admission

    def _applied(self, batch: Batch) -> None:
        """Book a step whose groups are now in the model: ledger, counters, pending acks.

        Only here, never at admission: a batch abandoned on shutdown must leave its groups
        unrecorded and unacknowledged, so that they are redelivered.
        """
        assert self.acks is not None
        c = self.state.counters
        self.state.step += 1
        for g in batch.groups:
            self.state.ledger.mark(g.group_id)
        self.acks.add(batch.deliveries)
        self.acks.add(batch.skipped)
        c["groups_applied"] += len(batch.groups)
        c["stale_corrected"] += len(batch.corrected)
        self.metrics.groups_applied.inc(len(batch.groups))
        if batch.corrected:
            self.metrics.stale_groups.labels(action="corrected").inc(len(batch.corrected))

    async def _collect(self, want: int) -> Batch | None:
        """Admit groups from the queue until ``want`` are ready; None when asked to stop."""
        assert self.feeder is not None
        batch = Batch()
        last_note = time.monotonic()
        while len(batch.groups) < want:
            get = asyncio.ensure_future(self.feeder.queue.get())
            stop = asyncio.ensure_future(self.stopping.wait())
            done, _ = await asyncio.wait(
                {get, stop}, timeout=WAITING_LOG_EVERY_S, return_when=asyncio.FIRST_COMPLETED
            )
            stop.cancel()
            if get not in done:
                get.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await get
                if self.stopping.is_set():
                    # The admitted groups stay pending; a restart gets them again.
                    return None
                if time.monotonic() - last_note >= WAITING_LOG_EVERY_S:
                    assert self.producer is not None
                    log.info(
                        "waiting for scored groups: %d/%d admitted, %d prompts in flight",
                        len(batch.groups),
                        want,
                        self.producer.budget.in_flight,
                    )
                    last_note = time.monotonic()
                continue
            delivery = get.result()
            self.feeder.taken(delivery)
            await self._admit(delivery, batch)
        return batch

    async def _admit(self, d: Delivery[ScoredGroup], batch: Batch) -> None:
        """Apply :func:`admit`'s verdict: into the batch, to the dead letters, or skipped."""
        assert self.bus is not None and self.acks is not None
        seen = _Either(self.state.ledger, batch.staleness)
        run = RunView(self.state.run_id, self.state.version, self.learner.vocab_size, seen)
        verdict = admit(d.message, run, self.config)
        if verdict.action is Action.APPLY and (why := await self._see(d.message, batch)):
            verdict = Verdict(Action.DEAD_LETTER, counter="dead_lettered", reason=why)
        if verdict.counter is not None:
            self.state.counters[verdict.counter] += 1
        if verdict.action is Action.APPLY:
            batch.add(d, verdict)
        elif verdict.action is Action.DEAD_LETTER:
            await self.bus.dead_letter(d, verdict.reason)
        else:
            # Acked with the step at its checkpoint, like everything applied; a batch abandoned
            # on shutdown leaves them unacknowledged, to be redelivered and judged again.
            batch.skipped.append(d)
            if verdict.counter == "stale_dropped":
                batch.dropped_ids.append(d.message.group_id)
                self.metrics.stale_groups.labels(action="dropped").inc()
            elif verdict.counter == "dapo_filtered":
                batch.filtered_ids.append(d.message.group_id)
            elif verdict.counter == "unscored":
                batch.unscored_ids.append(d.message.group_id)

    async def _see(self, g: ScoredGroup, batch: Batch) -> str | None:
        """The group's pictures into ``batch.vision``; why the group cannot be trained on
        (a picture missing, damaged or not the rollouts'), or None."""
        vision = self.learner.vision
        if vision is None:
            return (
                "trainer: the group has images but the policy is a text model" if g.images else None
            )
        why = vision.problem([r.token_ids for r in g.rollouts])
        if why is not None or not g.images:
            return why and f"trainer: {why}"
        assert self.images is not None
        try:
            data = await self.images.get_all(g.images)
            batch.vision[g.group_id] = await asyncio.to_thread(
                vision.prepare, g.prompt, g.prompt_token_ids, data
            )
        except ImageError as exc:
            return f"trainer: {exc}"
        return None

    def _version(self) -> int:
        return self.state.version

    # ------------------------------------------------------------------ durable effects

    async def _publish(self) -> float:
        """Write the current model as ``state.version`` and announce it; return seconds."""
        assert self.publisher is not None
        start = time.perf_counter()
        version, step = self.state.version, self.state.step
        location, sha = await asyncio.to_thread(self.learner.publish, self.publisher, version, step)
        await self.publisher.announce(version, location, sha, step)
        seconds = time.perf_counter() - start
        self.metrics.publish_seconds.observe(seconds)
        self.metrics.weight_version.set(version)
        return seconds

    async def _checkpoint(self) -> None:
        """Save everything, then acknowledge the groups the checkpoint covers."""
        assert self.acks is not None
        if self.feeder is not None:
            # A consistent snapshot: no prompt is half-issued while the position is copied.
            self.state.position = await self.feeder.position()
        snapshot = self.state.to_json()
        try:
            await asyncio.to_thread(self.learner.save, self.run_dir, self.state.step, snapshot)
        except ckpt.CheckpointError as exc:
            # Stop rather than train on without a checkpoint: nothing since the last one was
            # acknowledged, so a run resumed from it gets those groups again and loses none.
            log.error(
                "trainer stopping: checkpoint of step %d failed; the groups applied since "
                "step %d were not acknowledged and will be redelivered after a restart "
                "with --resume. %s",
                self.state.step,
                self.last_checkpoint,
                exc,
            )
            raise
        self.last_checkpoint = self.state.step
        await self.acks.commit()

    async def _record_bus(self) -> None:
        assert self.bus is not None and self.producer is not None
        b = self.config.bus
        self.metrics.in_flight.set(self.producer.budget.in_flight)
        with contextlib.suppress(Exception):  # housekeeping must never stop training
            # What every group has acknowledged goes: the streams stay as long as the work
            # in flight however long the run; replicas need only the newest announcements.
            await self.bus.trim_consumed(b.prompts_stream)
            await self.bus.trim_consumed(b.rollouts_stream)
            await self.bus.trim_consumed(b.weights_stream, keep_last=ANNOUNCEMENTS_KEPT)
        with contextlib.suppress(Exception):  # metrics must never stop training
            stats = [
                await self.bus.stats(s)
                for s in (b.prompts_stream, b.rollouts_stream, b.dead_letter_stream)
            ]
            self.metrics.record_bus(stats, b.dead_letter_stream)

    def _write_status(self, status: str) -> None:
        ckpt.atomic_write_json(
            self.run_dir / STATE_FILE,
            {
                "status": status,
                "step": self.state.step,
                "version": self.state.version,
                "groups_applied": self.state.counters["groups_applied"],
                "last_checkpoint": self.last_checkpoint,
                "run_id": self.state.run_id,
                "session": self.session,
                "updated_at": time.time(),
            },
        )


async def _cancelled(task: asyncio.Task[None] | None) -> None:
    """Cancel ``task`` (if any, and not done yet) and wait until it has stopped."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@dataclass(frozen=True)
class _Either:
    """Membership in either of two collections, without copying them."""

    first: Container[str]
    second: Container[str]

    def __contains__(self, item: object) -> bool:
        return item in self.first or item in self.second


async def run(config: RunConfig, *, resume: bool) -> int:
    """Open (fresh or resumed) and run to ``trainer.steps``."""
    trainer = await asyncio.to_thread(TrainerRun.open, config, resume=resume)
    return await trainer.run()
