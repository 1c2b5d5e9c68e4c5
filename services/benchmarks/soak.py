"""``mapo bench soak --minutes N``: the whole stack for N minutes of training while faults hit it.

``mapo up`` trains the demo model (warm-started once, then reused) with no step limit. Once the
first step is logged the clock starts: every ``--fault-every-s`` one piece is SIGKILLed, in
turn the trainer, an inference replica with its engine, the reward service and Redis, and the
orchestrator restarts it. Every ``--sample-every-s`` the resident memory of each process (with
its helpers: engine, verifier workers) and the length of each stream are sampled. After N
minutes the trainer is told to stop (it checkpoints and exits), the run ends as a normal one
and writes its ledger.

Reported: groups issued, applied, skipped, dead-lettered, applied twice, outstanding and
missing (from the run's ledger), the restarts of each piece, the memory of every process and
the length of every stream at the start and at the end (both must stay flat: the trainer
trims what every group acknowledged), and the largest growth of any one process between its
first and last sample. Everything lands in ``soak.json`` and every sample in ``samples.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.core.config import RunConfig, load_config
from services.stack.faults import FAULTS, FaultError, inject, rss_bytes
from services.stack.processes import Child
from services.stack.progress import MetricsFollower
from services.stack.supervisor import read_pids

DEFAULT_RUN_DIR = "runs/bench-soak"
#: No step limit: the run ends when the soak tells the trainer to stop.
ENDLESS_STEPS = 10_000_000
#: Start-up (warm start reused, services, first step) and shutdown bounds, generous for a
#: slow machine; they guard against a hang, the soak itself is measured in minutes.
FIRST_STEP_S = 1800.0
SHUTDOWN_S = 900.0
MIB = 1 << 20
#: Memory growth is measured from this long after a process was first seen (start-up).
SETTLE_S = 120.0


@dataclass
class Sample:
    """One look at the run: memory per process and stream lengths."""

    at: float
    step: int
    rss: dict[str, int]
    pids: dict[str, int]
    streams: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "step": self.step,
            "rss": self.rss,
            "pids": self.pids,
            "streams": self.streams,
        }


@dataclass
class Soak:
    run_dir: Path
    orchestrator: int
    samples: list[Sample] = field(default_factory=list)
    faults: list[dict[str, Any]] = field(default_factory=list)

    def sample(self, step: int, bus: Any, streams: list[str]) -> Sample:
        pids = read_pids(self.run_dir)
        pids["mapo up"] = self.orchestrator
        lengths: dict[str, int] = {}
        for stream in streams:
            try:
                lengths[stream] = int(bus.xlen(stream))
            except Exception:  # Redis restarting: this sample has no length for it
                lengths[stream] = -1
        s = Sample(time.time(), step, {n: rss_bytes(p) for n, p in pids.items()}, pids, lengths)
        self.samples.append(s)
        with (self.run_dir / "samples.jsonl").open("a") as f:
            f.write(json.dumps(s.to_json()) + "\n")
        return s


def growth(samples: list[Sample], settle_s: float = SETTLE_S) -> dict[str, tuple[float, float]]:
    """Per piece: the RSS growth (MiB) of its longest-lived process, from its first sample
    ``settle_s`` after it was first seen (a replica loads its engine for a minute) to its last,
    and over how many minutes."""
    out: dict[str, tuple[float, float]] = {}
    for name in {n for s in samples for n in s.rss}:
        lives: dict[int, list[Sample]] = {}
        for s in samples:
            if name in s.pids and s.rss.get(name):
                lives.setdefault(s.pids[name], []).append(s)
        best = (0.0, 0.0)
        for seen in lives.values():
            settled = [s for s in seen if s.at - seen[0].at >= settle_s] or seen[-1:]
            grew = (settled[-1].rss[name] - settled[0].rss[name]) / MIB
            span = (settled[-1].at - settled[0].at) / 60
            if span > best[1]:
                best = (grew, span)
        out[name] = best
    return out


def report(soak: Soak, summary: dict[str, Any], minutes: float) -> str:
    first, last = soak.samples[0], soak.samples[-1]
    ledger = summary.get("ledger", {})
    lines = [
        f"soak: {minutes:.1f} min of training, steps {first.step} -> {last.step}, "
        f"{len(soak.faults)} faults injected",
        "ledger: "
        + ", ".join(
            f"{k} {ledger.get(k)}"
            for k in ("issued", "applied", "dead_lettered", "applied_twice", "outstanding")
        )
        + f", skipped {sum(ledger.get('skipped', {}).values())}, missing {ledger.get('missing')}",
        "restarts: " + ", ".join(f"{k} {v}" for k, v in summary.get("restarts", {}).items()),
        "",
        f"{'process':<24}{'RSS start':>11}{'RSS end':>11}  longest life: growth over minutes",
    ]
    grew = growth(soak.samples)
    for name in sorted(set(first.rss) | set(last.rss)):
        restarted = first.pids.get(name) != last.pids.get(name)
        g, span = grew.get(name, (0.0, 0.0))
        lines.append(
            f"{name:<24}{first.rss.get(name, 0) / MIB:>9.0f} M{last.rss.get(name, 0) / MIB:>9.0f} M"
            f"  {g:+.0f} MiB over {span:.0f} min{' (restarted)' if restarted else ''}"
        )
    lines += ["", f"{'stream':<40}{'start':>8}{'end':>8}{'max':>8}"]
    for stream in first.streams:
        most = max(s.streams.get(stream, -1) for s in soak.samples)
        end = last.streams.get(stream, -1)
        lines.append(f"{stream:<40}{first.streams[stream]:>8}{end:>8}{most:>8}")
    return "\n".join(lines)


def main(args: argparse.Namespace, config: RunConfig) -> int:
    del config  # the run re-reads the demo (or --config) like `mapo up`
    import redis

    from services.stack.runs import warm_model
    from services.stack.up import claim_run_dir, clear_previous_run, sigterm_as_interrupt

    if args.minutes <= 0 or args.fault_every_s <= 0 or args.sample_every_s <= 0:
        print("mapo bench soak: --minutes and the intervals must be positive", file=sys.stderr)
        return 2
    root = Path(args.run_dir or DEFAULT_RUN_DIR).resolve()
    with sigterm_as_interrupt():
        model = warm_model(args.config, args.overrides, 0, root)
        run_dir = root / "run"
        claim_run_dir(run_dir)
        # The last run's metrics and PIDs must be gone before this one is watched.
        clear_previous_run(run_dir)
        (run_dir / "samples.jsonl").unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "services.cli", "up", "--run-dir", str(run_dir)]
        cmd += ["--steps", str(ENDLESS_STEPS), "--replicas", str(args.replicas)]
        if args.config:
            cmd += ["--config", args.config]
        for item in [*(args.overrides or []), f"model.path={model}"]:
            cmd += ["--set", item]
        up = Child.start("mapo up", cmd, log_path=root / "up.log")
        print(f"mapo bench soak: mapo up started (log {root / 'up.log'})", flush=True)
        try:
            return _soak(args, up, run_dir, redis)
        finally:
            up.stop(grace_s=SHUTDOWN_S)


def _soak(args: argparse.Namespace, up: Child, run_dir: Path, redis: Any) -> int:
    follower = MetricsFollower(run_dir / "metrics.jsonl")

    def step() -> int:
        follower.poll()
        return max([int(r.get("step", 0)) for r in follower.records] + [0])

    deadline = time.monotonic() + FIRST_STEP_S
    while step() < 1:
        if not up.alive() or time.monotonic() > deadline:
            print(f"mapo bench soak: no training step; see {up.log_path}", file=sys.stderr)
            return 1
        time.sleep(1.0)
    run_config = load_config(run_dir / "config.toml", environ={})
    b = run_config.bus
    streams = [b.prompts_stream, b.rollouts_stream, b.weights_stream, b.dead_letter_stream]
    bus = redis.Redis.from_url(b.url, socket_timeout=5, socket_connect_timeout=5)
    soak = Soak(run_dir, up.pid)
    soak.sample(step(), bus, streams)
    t0 = time.monotonic()
    end = t0 + args.minutes * 60
    next_fault = t0 + args.fault_every_s
    next_sample = t0 + args.sample_every_s
    print(f"mapo bench soak: step {step()}; soaking for {args.minutes} min", flush=True)
    while time.monotonic() < end:
        if not up.alive():
            print(f"mapo bench soak: mapo up ended early; see {up.log_path}", file=sys.stderr)
            return 1
        now = time.monotonic()
        if now >= next_fault:
            fault = FAULTS[len(soak.faults) % len(FAULTS)]
            try:
                hit = inject(run_dir, fault, up.pid)
                soak.faults.append({"fault": fault, "pid": hit.pid, "step": step(), "at": hit.at})
                print(f"  {(now - t0) / 60:5.1f} min step {step()}: killed {hit.name}", flush=True)
            except FaultError as exc:  # e.g. the piece is being restarted right now
                print(f"  {(now - t0) / 60:5.1f} min: fault {fault} skipped: {exc}", flush=True)
            next_fault = now + args.fault_every_s
        if now >= next_sample:
            soak.sample(step(), bus, streams)
            next_sample = now + args.sample_every_s
        time.sleep(1.0)
    soak.sample(step(), bus, streams)
    minutes = (time.monotonic() - t0) / 60
    trainer = read_pids(run_dir).get("trainer")
    if trainer is not None:
        os.kill(trainer, signal.SIGTERM)  # a clean stop: checkpoint, then the run's report
    try:
        code = up.wait(SHUTDOWN_S)
    except Exception:
        print(f"mapo bench soak: mapo up did not stop; see {up.log_path}", file=sys.stderr)
        return 1
    try:
        summary: dict[str, Any] = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        print(f"mapo bench soak: no summary (mapo up exit {code}); see {up.log_path}")
        return 1
    text = report(soak, summary, minutes)
    print(text)
    result = {
        "minutes": minutes,
        "faults": soak.faults,
        "ledger": summary.get("ledger"),
        "restarts": summary.get("restarts"),
        "restart_reasons": summary.get("restart_reasons"),
        "start": soak.samples[0].to_json(),
        "end": soak.samples[-1].to_json(),
        "growth_mib": {k: v[0] for k, v in growth(soak.samples).items()},
        "stream_max": {
            stream: max(s.streams.get(stream, -1) for s in soak.samples)
            for stream in soak.samples[0].streams
        },
        "mapo_up_exit": code,
        "processor": _processor(),
    }
    (run_dir.parent / "soak.json").write_text(json.dumps(result, indent=1))
    print(f"results: {run_dir.parent / 'soak.json'}")
    return 0 if code == 0 else 1


def _processor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


__all__ = ["Sample", "Soak", "growth", "main", "report"]
