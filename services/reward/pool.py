"""A supervised pool of verifier processes: every verification under a deadline, no wedging.

Why not ``concurrent.futures.ProcessPoolExecutor``: it cannot stop a task that is running, so
one completion that sends math-verify into an endless computation holds a worker forever. Here
each worker is one process with one pipe, driven by one asyncio task (a *slot*) that sends a
job, waits for the answer until the job's deadline plus a short grace, and otherwise kills the
process (SIGKILL, by its PID) and starts a fresh one. A stuck worker costs only its own slot;
the event loop, health checks and the other slots carry on.

Workers come from a ``forkserver`` (never ``fork``: forking a process that runs gRPC threads
and an event loop copies locks in unknown states). The fork server has the verifiers imported
once, so replacing a killed worker takes milliseconds, not the seconds sympy takes to import.

Scheduling is round-robin across requests, not first-come-first-served across completions: a
group of 1,000 completions does not make a group of 8 that arrives after it wait for all 1,000.
A request may also carry an overall deadline (from its gRPC deadline): completions still queued
then are answered "timed out" without running, so a reply always arrives in time.

The queue is bounded: a request whose completions would take it past ``max_queued`` is refused
at once with :class:`PoolBusy` (the servicer answers RESOURCE_EXHAUSTED) instead of waiting,
unless the queue is empty, so one request of up to ``reward.max_group`` completions is always
taken. A call that gives up (cancelled, or past its deadline) takes its queued completions out
with it, so the queue never holds work nobody waits for.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import multiprocessing
import multiprocessing.context
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from tenacity import AsyncRetrying, before_sleep_log, wait_exponential_jitter

from services.reward import worker as worker_module
from services.reward.registry import Task
from services.reward.verifiers import Status

log = logging.getLogger(__name__)

KILL_GRACE_S = 0.5
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 5.0
RESPAWN_BACKOFF_S = 0.5  # first wait after a worker fails to start; doubles up to the max
RESPAWN_BACKOFF_MAX_S = 10.0
PRELOAD = ["services.reward.warm"]


class PoolClosed(RuntimeError):
    """The pool is shutting down and takes no more work."""


class PoolBusy(RuntimeError):
    """The queue is full: the request was refused without queueing any of it; retry later."""


class PoolStartError(RuntimeError):
    """A worker process did not start; the message says why."""


@dataclass(frozen=True)
class Outcome:
    """What a verification came to, as the servicer reports it."""

    status: Status
    reward: float
    terms: dict[str, float]
    message: str
    seconds: float = 0.0


@dataclass(eq=False)
class _Job:
    id: int
    task: str
    completion: str
    answers: tuple[str, ...]
    labels: tuple[str, ...]
    timeout_s: float
    deadline: float | None  # loop time by which the request must be answered
    future: asyncio.Future[Outcome]


@dataclass(eq=False)
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: Connection
    pid: int = 0


@dataclass
class _RoundRobin:
    """Queued jobs, one lane per request, served one job per lane in turn; ``size`` counts
    every job still in a lane."""

    lanes: collections.deque[collections.deque[_Job]] = field(default_factory=collections.deque)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    size: int = 0

    def add(self, jobs: Sequence[_Job]) -> collections.deque[_Job]:
        lane = collections.deque(jobs)
        if lane:
            self.lanes.append(lane)
            self.size += len(lane)
            self.wakeup.set()
        return lane

    def pop(self) -> _Job | None:
        """The next live job, or None when every lane is empty (cancelled jobs are dropped)."""
        while self.lanes:
            lane = self.lanes.popleft()
            while lane:
                job = lane.popleft()
                self.size -= 1
                if not job.future.done():
                    if lane:
                        self.lanes.append(lane)
                    return job
        return None

    def discard(self, lane: collections.deque[_Job]) -> None:
        """Take a lane out with whatever it still holds (its caller stopped waiting)."""
        if lane:
            with contextlib.suppress(ValueError):  # already taken out by pop() or drain()
                self.lanes.remove(lane)
                self.size -= len(lane)
            lane.clear()

    def drain(self) -> list[_Job]:
        jobs = [job for lane in self.lanes for job in lane]
        self.lanes.clear()
        self.size = 0
        return jobs


class VerifierPool:
    """``workers`` supervised verifier processes serving the tasks in ``tasks``.

    At most ``max_queued`` completions wait for a worker (more are refused with
    :class:`PoolBusy`; one request is always taken while the queue is empty).
    Use inside one running event loop: ``await pool.start()``, then ``await
    pool.verify(...)`` from any number of coroutines, then ``await pool.close()``.
    """

    def __init__(
        self,
        tasks: Mapping[str, Task],
        workers: int,
        *,
        memory_mib: int = 0,
        kill_grace_s: float = KILL_GRACE_S,
        start_timeout_s: float = START_TIMEOUT_S,
        preload: Sequence[str] = (),
        on_restart: Callable[[], None] | None = None,
        max_queued: int = 4096,
    ) -> None:
        if workers < 1:
            raise ValueError("a verifier pool needs at least one worker")
        if max_queued < 1:
            raise ValueError("a verifier pool needs room for at least one queued completion")
        self.max_queued = max_queued
        self.tasks = dict(tasks)
        self.workers = workers
        self.memory_mib = memory_mib
        self.kill_grace_s = kill_grace_s
        self.start_timeout_s = start_timeout_s
        self.restarts = 0
        self._on_restart = on_restart
        self._ctx = multiprocessing.get_context("forkserver")
        self._preload = [*PRELOAD, *preload]
        self._ids = itertools.count(1)
        self._queue: _RoundRobin | None = None
        self._slots: list[asyncio.Task[None]] = []
        self._live: dict[int, _Worker] = {}
        self._closing = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start every worker and wait until each is ready (PoolStartError when one is not)."""
        if self._queue is not None:
            raise RuntimeError("the pool is already started")
        self._queue = _RoundRobin()
        self._ctx.set_forkserver_preload(self._preload)
        first = await asyncio.gather(
            *(self._start_worker() for _ in range(self.workers)), return_exceptions=True
        )
        failures = [w for w in first if isinstance(w, BaseException)]
        if failures:
            for w in first:
                if isinstance(w, _Worker):
                    await self._stop_worker(w)
            raise PoolStartError(str(failures[0])) from failures[0]
        self._slots = [
            asyncio.create_task(self._slot(i, w), name=f"reward-slot-{i}")
            for i, w in enumerate(first)
            if isinstance(w, _Worker)
        ]

    async def close(self) -> None:
        """Stop taking work, fail what is still queued, stop every worker."""
        if self._closing:
            return
        self._closing = True
        if self._queue is not None:
            for job in self._queue.drain():
                if not job.future.done():
                    job.future.set_exception(PoolClosed("the reward service is shutting down"))
            self._queue.wakeup.set()
        if self._slots:
            await asyncio.gather(*self._slots, return_exceptions=True)
        for w in list(self._live.values()):
            await self._stop_worker(w)

    @property
    def pids(self) -> list[int]:
        """PIDs of the live worker processes."""
        return sorted(self._live)

    @property
    def queued(self) -> int:
        """Completions waiting for a worker (not those running)."""
        return 0 if self._queue is None else self._queue.size

    # ------------------------------------------------------------------ work

    async def verify(
        self,
        task: str,
        completions: Sequence[str],
        answers: Sequence[str],
        labels: Sequence[str] = (),
        *,
        timeout_s: float,
        deadline: float | None = None,
    ) -> list[Outcome]:
        """Verify each completion under ``timeout_s`` seconds; results in input order.

        ``deadline`` (event-loop time) bounds the whole call: a verification never runs past
        it, and completions not started by then come back "timed out". PoolBusy, with nothing
        queued, when the completions do not fit in the queue.
        """
        if self._queue is None or self._closing:
            raise PoolClosed("the verifier pool is not running")
        if task not in self.tasks:
            raise KeyError(f"unknown task '{task}'")
        queued = self._queue.size
        if queued and queued + len(completions) > self.max_queued:
            raise PoolBusy(
                f"{queued} completions are already waiting for a verifier and "
                f"{len(completions)} more would pass reward.max_queued={self.max_queued}; "
                "retry later, or add workers (reward.workers) or replicas"
            )
        loop = asyncio.get_running_loop()
        answers_t, labels_t = tuple(answers), tuple(labels)
        jobs = [
            _Job(
                next(self._ids),
                task,
                c,
                answers_t,
                labels_t,
                timeout_s,
                deadline,
                loop.create_future(),
            )
            for c in completions
        ]
        lane = self._queue.add(jobs)
        try:
            if deadline is None:
                return list(await asyncio.gather(*(j.future for j in jobs)))
            # Even with every worker busy elsewhere, the caller hears back by its deadline.
            await asyncio.wait([j.future for j in jobs], timeout=max(0.0, deadline - loop.time()))
            late = Outcome(Status.TIMED_OUT, 0.0, {}, "no result before the request's deadline")
            return [j.future.result() if j.future.done() else late for j in jobs]
        finally:
            # A call that stopped waiting: its queued jobs leave the queue, running ones finish.
            self._queue.discard(lane)
            for j in jobs:
                if not j.future.done():
                    j.future.cancel()

    # ------------------------------------------------------------------ slots

    async def _next_job(self) -> _Job | None:
        assert self._queue is not None
        while not self._closing:
            job = self._queue.pop()
            if job is not None:
                return job
            self._queue.wakeup.clear()
            await self._queue.wakeup.wait()
        return None

    async def _slot(self, index: int, worker: _Worker | None) -> None:
        """Feed one worker job after job; replace it whenever it dies or overruns."""
        while not self._closing:
            if worker is None:
                worker = await self._respawn()
                if worker is None:
                    break
            job = await self._next_job()
            if job is None:
                break
            try:
                outcome, healthy = await self._run(worker, job)
            except Exception:  # a bug here must cost one answer and one worker, not the slot
                log.exception("verifier slot %d failed on a job; replacing its worker", index)
                outcome = Outcome(Status.CANNOT_SCORE, 0.0, {}, "internal error in the verifier")
                healthy = False
            if not healthy:  # stop it before anyone hears back: no stuck process outlives a reply
                with contextlib.suppress(OSError):
                    worker.process.kill()
            if not job.future.done():
                job.future.set_result(outcome)
            if not healthy:
                await self._stop_worker(worker, kill=True)
                worker = None
                self.restarts += 1
                if self._on_restart is not None:
                    self._on_restart()
        if worker is not None:
            await self._stop_worker(worker)

    async def _respawn(self) -> _Worker | None:
        """A fresh worker, retried with backoff until one starts; None once the pool closes."""
        retrying = AsyncRetrying(
            wait=wait_exponential_jitter(
                multiplier=RESPAWN_BACKOFF_S, max=RESPAWN_BACKOFF_MAX_S, jitter=RESPAWN_BACKOFF_S
            ),
            stop=lambda _: self._closing,
            before_sleep=before_sleep_log(log, logging.ERROR),
            retry_error_callback=lambda _: None,
        )
        worker: _Worker | None = await retrying(self._start_worker)
        return worker

    async def _run(self, worker: _Worker, job: _Job) -> tuple[Outcome, bool]:
        """Run one job on ``worker``: (outcome, whether the worker can be reused)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        timeout = job.timeout_s
        if job.deadline is not None:
            timeout = min(timeout, job.deadline - start)
            if timeout <= 0:
                message = "not started before the request's deadline"
                return Outcome(Status.TIMED_OUT, 0.0, {}, message), True
        payload: worker_module.Job = (
            job.id,
            job.task,
            job.completion,
            job.answers,
            job.labels,
            timeout,
        )
        try:
            worker.conn.send(payload)
            reply = await self._receive(worker.conn, timeout + self.kill_grace_s)
        except TimeoutError:
            log.warning(
                "verifier worker %d overran its %.3g s deadline on task '%s'; restarting it",
                worker.pid,
                timeout,
                job.task,
            )
            message = f"verification exceeded its {timeout:g} s deadline; the worker was replaced"
            return Outcome(Status.TIMED_OUT, 0.0, {}, message, loop.time() - start), False
        except (EOFError, OSError):
            await asyncio.to_thread(worker.process.join, 1.0)
            code = worker.process.exitcode
            log.warning("verifier worker %d died (exit code %s); restarting it", worker.pid, code)
            message = f"the verifier process died (exit code {code}) on this completion"
            return Outcome(Status.CANNOT_SCORE, 0.0, {}, message, loop.time() - start), False
        job_id, status, reward, terms, message = reply
        if job_id != job.id:  # cannot happen with one job in flight; never trust a stray reply
            return Outcome(Status.CANNOT_SCORE, 0.0, {}, "verifier reply out of order"), False
        return Outcome(Status(status), reward, terms, message, loop.time() - start), True

    @staticmethod
    async def _receive(conn: Connection, timeout: float) -> Any:
        """The next message on ``conn`` within ``timeout`` seconds, without blocking the loop."""
        loop = asyncio.get_running_loop()
        readable: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not readable.done():
                readable.set_result(None)

        fd = conn.fileno()
        loop.add_reader(fd, wake)
        try:
            await asyncio.wait_for(readable, timeout)
        finally:
            loop.remove_reader(fd)
        return conn.recv()  # end of file (a dead worker) raises EOFError

    # ------------------------------------------------------------------ processes

    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=worker_module.main,
            args=(child, self.tasks, self.memory_mib),
            name="mapo-reward-worker",
            daemon=True,
        )
        process.start()
        child.close()
        return _Worker(process, parent)

    async def _start_worker(self) -> _Worker:
        """A new worker that has said it is ready."""
        # Starting talks to the fork server, which imports the verifiers the first time.
        w = await asyncio.to_thread(self._spawn)
        try:
            hello = await self._receive(w.conn, self.start_timeout_s)
        except (TimeoutError, EOFError, OSError) as exc:
            await asyncio.to_thread(w.process.join, 1.0)
            code = w.process.exitcode
            await self._stop_worker(w, kill=True)
            reason = "timed out" if isinstance(exc, TimeoutError) else f"exited with code {code}"
            raise PoolStartError(
                f"a verifier worker {reason} while starting; its error is in the log above"
            ) from None
        w.pid = int(hello[1])
        self._live[w.pid] = w
        return w

    async def _stop_worker(self, w: _Worker, *, kill: bool = False) -> None:
        """Stop one worker we started: politely unless ``kill``, by PID, and reap it."""
        self._live.pop(w.pid, None)
        if kill:
            with contextlib.suppress(OSError):
                w.process.kill()
        else:
            with contextlib.suppress(OSError):
                w.conn.send(None)
        await asyncio.to_thread(w.process.join, STOP_TIMEOUT_S)
        if w.process.exitcode is None:
            with contextlib.suppress(OSError):
                w.process.kill()
            await asyncio.to_thread(w.process.join, STOP_TIMEOUT_S)
        w.conn.close()
        with contextlib.suppress(ValueError):
            w.process.close()
