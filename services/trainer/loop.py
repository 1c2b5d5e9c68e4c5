"""The trainer's run loop: prompts out, scored groups in, one step at a time, exactly once.

Two asyncio tasks share the bus. The *feeder* keeps the prompts stream filled up to
``trainer.in_flight`` and reads scored groups into a queue as they arrive (so it keeps working
while a step computes in a thread). A prompt counts as in flight until the loop takes its group
from the queue, so the backlog of unread and queued groups is bounded by the budget too. The *loop* takes groups from the queue, admits or rejects
each one, and for every batch of ``trainer.prompts_per_step`` groups: trains (in a thread),
publishes weights, logs metrics, and every ``trainer.checkpoint_every`` steps checkpoints and
only then acknowledges the groups the checkpoint covers.

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

Admission of a delivered group, in order: a group from another run (its id lacks this run's
prefix) or one the trainer cannot use (empty prompt, too long, token ids outside the
vocabulary) is dead-lettered; a repeat of an applied id is acknowledged at the next checkpoint;
a group more than ``trainer.max_staleness`` versions behind is dropped (``stale_policy="drop"``)
or kept with truncated importance sampling (``"correct"``); with ``algorithm.dapo_filter``, a
group whose outcomes are all equal is filtered and the batch waits for another; a group with no
scored rollout is skipped. Everything not applied is counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from services.core.advantages import dapo_keep_mask
from services.core.config import RunConfig
from services.core.schemas import PromptMessage, ScoredGroup
from services.trainer import checkpoint as ckpt
from services.trainer.batch import problem, trainable
from services.trainer.dataset import Position, PromptOrder, eval_examples, load_examples
from services.trainer.metrics import JsonlLog, TrainerMetrics
from services.trainer.model import Policy
from services.trainer.publisher import WeightPublisher, base_tensor_spec
from services.transport.base import Bus, Delivery
from services.transport.budget import PromptProducer
from services.transport.factory import make_bus
from services.transport.idempotency import AppliedLedger, DeferredAcks
from services.transport.names import TRAINER_GROUP

log = logging.getLogger(__name__)

#: One trainer per run: a fixed consumer name lets a restarted trainer take back its own
#: pending entries at once instead of waiting for them to go idle.
CONSUMER = "trainer-0"
STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"
APPLIED_FILE = "applied.jsonl"
RECONCILE_EVERY_S = 30.0
WAITING_LOG_EVERY_S = 30.0
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


class TrainerRun:
    """One process's run: built by :meth:`open`, driven by :meth:`run`."""

    def __init__(
        self, config: RunConfig, policy: Policy, state: RunState, *, resumed_from: Path | None
    ) -> None:
        self.config = config
        self.policy = policy
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
        self.queue: asyncio.Queue[Delivery[ScoredGroup]] = asyncio.Queue()
        self.unconsumed: set[str] = set()  # ids read into the queue, not yet taken
        self.fill_lock = asyncio.Lock()
        self.stopping = asyncio.Event()
        self.bus: Bus | None = None
        self.producer: PromptProducer | None = None
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
            policy = Policy.build(config)
            state = RunState(run_id=uuid.uuid4().hex[:8])
            return cls(config, policy, state, resumed_from=None)
        policy = Policy.build(config, weights_from=latest / ckpt.MODEL_DIR)
        state = RunState.from_json(policy.restore(latest))
        log.info("resuming from %s (step %d, version %d)", latest, state.step, state.version)
        return cls(config, policy, state, resumed_from=latest)

    async def run(self) -> int:
        cfg = self.config
        self.bus = make_bus(cfg.bus)
        self.acks = DeferredAcks(self.bus)
        spec = base_tensor_spec(cfg.model.path)
        self.publisher = WeightPublisher(cfg, self.bus, spec, self.policy.serve_dtype)
        if cfg.trainer.metrics_port:
            self.metrics.serve(cfg.trainer.metrics_port)
        self._install_signal_handlers()
        feeder: asyncio.Task[None] | None = None
        try:
            # Acks wait for the next checkpoint: a restart finds up to a checkpoint's worth of
            # groups read but unacknowledged, all in flight again.
            self.producer = await PromptProducer.restore(
                self.bus,
                cfg.bus,
                cfg.trainer.in_flight,
                deferred=cfg.trainer.checkpoint_every * cfg.trainer.prompts_per_step,
            )
            await self._start()
            feeder = asyncio.create_task(self._feed(), name="trainer-feeder")
            while self.state.step < cfg.trainer.steps and not self.stopping.is_set():
                await self._one_step()
            if self.state.step > self.last_checkpoint:
                await self._checkpoint()
            self._write_status("finished" if self.state.step >= cfg.trainer.steps else "stopped")
        finally:
            if feeder is not None:
                feeder.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await feeder
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
        lr = self.policy.set_step(self.state.step)
        result = await asyncio.to_thread(
            self.policy.train, batch.groups, batch.staleness, frozenset(batch.corrected)
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
            ev = await asyncio.to_thread(self.policy.evaluate, self.eval_set)
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
        c = self.state.counters
        assert self.producer is not None
        return {
            "step": self.state.step,
            "version": self.state.version,
            "time": time.time(),
            **m,
            **timings,
            "groups_applied": c["groups_applied"],
            "stale_dropped": c["stale_dropped"],
            "stale_corrected": c["stale_corrected"],
            "dapo_filtered": c["dapo_filtered"],
            "duplicates": c["duplicates"],
            "dead_lettered": c["dead_lettered"],
            "unscored": c["unscored"],
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
        c["groups_applied"] += len(batch.groups)
        c["stale_corrected"] += len(batch.corrected)
        self.metrics.groups_applied.inc(len(batch.groups))
        if batch.corrected:
            self.metrics.stale_groups.labels(action="corrected").inc(len(batch.corrected))

    async def _collect(self, want: int) -> Batch | None:
        """Admit groups from the queue until ``want`` are ready; None when asked to stop."""
        batch = Batch()
        last_note = time.monotonic()
        while len(batch.groups) < want:
            get = asyncio.ensure_future(self.queue.get())
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
            self._taken(delivery)
            await self._admit(delivery, batch)
        return batch

    def _taken(self, d: Delivery[ScoredGroup]) -> None:
        """The loop has the group: its prompt's in-flight slot is free."""
        assert self.producer is not None
        self.unconsumed.discard(d.message_id)
        self.producer.returned([d])

    async def _admit(self, d: Delivery[ScoredGroup], batch: Batch) -> None:
        assert self.bus is not None and self.acks is not None
        g = d.message
        cfg, c = self.config, self.state.counters
        if not g.group_id.startswith(f"{self.state.run_id}:"):
            c["dead_lettered"] += 1
            await self.bus.dead_letter(
                d, f"group {g.group_id} was not issued by run {self.state.run_id}"
            )
            return
        reason = problem(g, max_len=cfg.model.max_model_len, vocab_size=self.policy.vocab_size)
        if reason is not None:
            c["dead_lettered"] += 1
            await self.bus.dead_letter(d, f"trainer cannot use group {g.group_id}: {reason}")
            return
        if g.group_id in self.state.ledger or g.group_id in batch.staleness:
            c["duplicates"] += 1
            self.acks.add([d])  # at the next checkpoint, like everything not applied
            return
        staleness = max(self.state.version - g.policy_version, 0)
        too_stale = staleness > cfg.trainer.max_staleness
        if too_stale and cfg.trainer.stale_policy == "drop":
            c["stale_dropped"] += 1
            batch.dropped_ids.append(g.group_id)
            self.metrics.stale_groups.labels(action="dropped").inc()
            self.acks.add([d])
            return
        if cfg.algorithm.dapo_filter and not self._dapo_keeps(g):
            c["dapo_filtered"] += 1
            batch.filtered_ids.append(g.group_id)
            self.acks.add([d])
            return
        if not trainable(g):
            c["unscored"] += 1
            self.acks.add([d])
            return
        if too_stale:
            batch.corrected.add(g.group_id)
        batch.staleness[g.group_id] = staleness
        batch.groups.append(g)
        batch.deliveries.append(d)

    def _dapo_keeps(self, g: ScoredGroup) -> bool:
        rewards = torch.tensor([[r.reward for r in g.rollouts if r.status == "scored"]])
        if rewards.numel() == 0:
            return False
        keep = dapo_keep_mask(
            rewards,
            max_reward=self.config.task.max_reward,
            success_threshold=self.config.task.success_threshold,
        )
        return bool(keep[0])

    # ------------------------------------------------------------------ feeding

    def _prompts(self) -> Iterator[PromptMessage]:
        r = self.config.rollout
        for pos, ex in self.order:
            yield PromptMessage(
                prompt_id=f"{self.state.run_id}:{pos.epoch}:{pos.index}",
                prompt=ex.prompt,
                answer=ex.answer,
                task=ex.task,
                group_size=r.group_size,
                temperature=r.temperature,
                top_p=r.top_p,
                max_tokens=r.max_tokens,
                issued_version=self.state.version,
                created_at=time.time(),
            )

    async def _fill(self, prompts: Iterator[PromptMessage]) -> None:
        """Publish prompts up to the in-flight budget; the dataset position moves only with
        what was published (under the lock a checkpoint takes its snapshot with)."""
        assert self.producer is not None
        async with self.fill_lock:
            room = self.producer.budget.room()
            if not room:
                return
            before = self.order.position
            batch = [next(prompts) for _ in range(room)]
            try:
                await self.producer.publish(batch)
            except BaseException:
                self.order.position = before
                raise

    async def _feed(self) -> None:
        """Keep the prompt stream full and move scored groups into the queue, forever."""
        assert self.bus is not None and self.producer is not None
        cfg = self.config
        prompts = self._prompts()
        last_reconcile = time.monotonic()
        delay = 0.5
        while True:
            try:
                await self._fill(prompts)
                deliveries = await self.bus.read(
                    cfg.bus.rollouts_stream,
                    TRAINER_GROUP,
                    CONSUMER,
                    max(cfg.trainer.prompts_per_step, 16),
                    expect=ScoredGroup,
                )
                for d in deliveries:
                    self.unconsumed.add(d.message_id)
                    self.queue.put_nowait(d)
                if time.monotonic() - last_reconcile >= RECONCILE_EVERY_S:
                    # The streams cannot see the queue: its groups are still in flight.
                    freed = await self.producer.reconcile(held=self.unconsumed)
                    if freed:
                        log.info("freed %d in-flight slots of prompts given up on", freed)
                    last_reconcile = time.monotonic()
                delay = 0.5
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("bus error while feeding: %s; retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    # ------------------------------------------------------------------ durable effects

    async def _publish(self) -> float:
        """Write the current model as ``state.version`` and announce it; return seconds."""
        assert self.publisher is not None
        start = time.perf_counter()
        version, step = self.state.version, self.state.step
        location, sha = await asyncio.to_thread(
            self.publisher.write, self.policy.model, version, step
        )
        await self.publisher.announce(version, location, sha, step)
        seconds = time.perf_counter() - start
        self.metrics.publish_seconds.observe(seconds)
        self.metrics.weight_version.set(version)
        return seconds

    async def _checkpoint(self) -> None:
        """Save everything, then acknowledge the groups the checkpoint covers."""
        assert self.acks is not None
        async with self.fill_lock:
            # A consistent snapshot: no prompt is half-issued while the position is copied.
            self.state.position = self.order.position
            snapshot = self.state.to_json()
        await asyncio.to_thread(self.policy.save, self.run_dir, self.state.step, snapshot)
        self.last_checkpoint = self.state.step
        await self.acks.commit()

    async def _record_bus(self) -> None:
        assert self.bus is not None and self.producer is not None
        b = self.config.bus
        self.metrics.in_flight.set(self.producer.budget.in_flight)
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


async def run(config: RunConfig, *, resume: bool) -> int:
    """Open (fresh or resumed) and run to ``trainer.steps``."""
    trainer = await asyncio.to_thread(TrainerRun.open, config, resume=resume)
    return await trainer.run()
