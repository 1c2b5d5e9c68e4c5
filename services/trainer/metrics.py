"""The trainer's metrics: Prometheus series (``mapo_trainer_*``, ``mapo_bus_*``) and a JSONL log.

The Prometheus names are exactly those of docs/metrics.md; the trainer owns its registry, so
several trainers in one test process never collide. Every step also appends one JSON object to
``{run_dir}/metrics.jsonl`` (the local orchestrator tails it for its progress bar) and the group
ids it applied to ``{run_dir}/applied.jsonl``. Both files are append-only: after a resume, the
steps after the restored checkpoint appear again; ``applied.jsonl`` marks each start, so
:func:`surviving_lineage` can tell which records belong to the run that survived. A line cut
short by ``kill -9`` is skipped by :func:`read_jsonl`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from services.transport import StreamStats

PREFIX = "mapo_trainer_"
UNIT_BUCKETS = tuple(i / 10 for i in range(11))
STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 16, 32)
PUBLISH_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: ``mapo_trainer_phase_seconds{phase}``, each from the step record's ``{phase}_s``. ``step`` is
#: the whole step; wait, compute, publish, eval and checkpoint are its parts, and collate, old,
#: ref, forward, backward and optimizer are the parts of compute.
PHASES = (
    "wait",
    "compute",
    "collate",
    "old",
    "ref",
    "forward",
    "backward",
    "optimizer",
    "publish",
    "eval",
    "checkpoint",
    "step",
)
#: ``mapo_trainer_mismatch_kl{lag}``: label -> the step record's field.
MISMATCH_LAGS = {
    "all": "mismatch_kl",
    "0": "mismatch_kl_lag0",
    "1": "mismatch_kl_lag1",
    "2+": "mismatch_kl_lag2plus",
}


#: ``mapo_trainer_tokens_per_sequence{kind}``: label -> the step record's field.
TOKEN_KINDS = {
    "prompt_text": "prompt_text_tokens_per_seq",
    "image": "image_tokens_per_seq",
    "response": "response_tokens_per_seq",
}


class TrainerMetrics:
    """Every series the trainer exports, in its own registry."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        p = PREFIX
        self.step = Gauge(p + "step", "Optimiser steps taken.", registry=r)
        self.weight_version = Gauge(p + "weight_version", "Newest published version.", registry=r)
        self.certainty_p = Histogram(
            p + "certainty_p", "Trajectory certainty p per group.", buckets=UNIT_BUCKETS, registry=r
        )
        self.lam = Histogram(
            p + "lambda", "Certainty weight lambda(p) per group.", buckets=UNIT_BUCKETS, registry=r
        )
        self.p_mean = Gauge(p + "certainty_p_mean", "Mean p of the last step.", registry=r)
        self.lambda_mean = Gauge(p + "lambda_mean", "Mean lambda of the last step.", registry=r)
        self.advantage = Gauge(
            p + "advantage", "Advantage statistics of the last step.", ["stat"], registry=r
        )
        self.term_abs_mean = Gauge(
            p + "advantage_term_abs_mean",
            "Mean absolute contribution of each estimator term.",
            ["term"],
            registry=r,
        )
        self.zero_variance = Gauge(
            p + "zero_variance_share", "Share of groups whose rewards are all equal.", registry=r
        )
        self.reward_mean = Gauge(p + "reward_mean", "Mean reward of the last step.", registry=r)
        self.accuracy = Gauge(
            p + "accuracy", "Success share (train) and held-out accuracy (eval).", ["split"],
            registry=r,
        )  # fmt: skip
        self.loss = Gauge(p + "loss", "Policy loss.", registry=r)
        self.clip_fraction = Gauge(
            p + "clip_fraction", "Share of tokens clipped.", ["side"], registry=r
        )
        self.ratio = Gauge(
            p + "ratio", "PPO ratio pi_theta / pi_prox over the step's updates.", ["stat"],
            registry=r,
        )  # fmt: skip
        self.updates = Gauge(p + "updates", "Optimiser updates in the last step.", registry=r)
        self.importance_weight_mean = Gauge(
            p + "importance_weight_mean", "Mean behaviour weight pi_prox / mu.", registry=r
        )
        self.importance_weight_capped = Gauge(
            p + "importance_weight_capped_share",
            "Share of tokens whose behaviour weight was truncated or masked.",
            registry=r,
        )
        self.mismatch_kl = Gauge(
            p + "mismatch_kl",
            "KL(engine || trainer) per token on sampled tokens, by version lag.",
            ["lag"],
            registry=r,
        )
        self.kl = Gauge(p + "kl", "KL to the reference model.", registry=r)
        self.entropy = Gauge(p + "entropy", "Mean token entropy.", registry=r)
        self.grad_norm = Gauge(p + "grad_norm", "Pre-clip gradient norm.", registry=r)
        self.learning_rate = Gauge(p + "learning_rate", "Rate of the last step.", registry=r)
        self.staleness = Histogram(
            p + "staleness",
            "Policy versions between generation and use.",
            buckets=STALENESS_BUCKETS,
            registry=r,
        )
        self.stale_groups = Counter(
            p + "stale_groups", "Groups past the staleness bound.", ["action"], registry=r
        )
        self.logprob_mismatch = Gauge(
            p + "logprob_mismatch",
            "Mean abs(trainer - inference) log-prob on sampled tokens.",
            registry=r,
        )
        self.phase_seconds = Gauge(
            p + "phase_seconds", "Time of each phase of the last step.", ["phase"], registry=r
        )
        self.tokens_per_second = Gauge(
            p + "tokens_per_second", "Trained tokens per second.", registry=r
        )
        self.tokens_per_sequence = Gauge(
            p + "tokens_per_sequence",
            "Tokens per trained sequence of the last step, by kind.",
            ["kind"],
            registry=r,
        )
        self.publish_seconds = Histogram(
            p + "publish_seconds", "Weight publication latency.", buckets=PUBLISH_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.groups_applied = Counter(
            p + "groups_applied", "Groups applied (never twice).", registry=r
        )
        self.in_flight = Gauge(p + "in_flight", "Prompts outstanding on the bus.", registry=r)
        self.stream_length = Gauge(
            "mapo_bus_stream_length", "Entries in each stream.", ["stream"], registry=r
        )
        self.pending = Gauge(
            "mapo_bus_pending",
            "Delivered but unacknowledged entries.",
            ["stream", "group"],
            registry=r,
        )
        self.lag = Gauge(
            "mapo_bus_lag", "Entries not yet delivered to the group.", ["stream", "group"],
            registry=r,
        )  # fmt: skip
        self.dead_letters = Gauge(
            "mapo_bus_dead_letters", "Entries in the dead-letter stream.", registry=r
        )
        # Pre-create labelled children so every series exists from the first scrape.
        for side in ("low", "high", "dual"):
            self.clip_fraction.labels(side=side)
        for action in ("dropped", "corrected"):
            self.stale_groups.labels(action=action)
        for phase in PHASES:
            self.phase_seconds.labels(phase=phase)
        for stat in ("mean", "min", "max"):
            self.ratio.labels(stat=stat)
        for lag in MISMATCH_LAGS:
            self.mismatch_kl.labels(lag=lag)
        for split in ("train", "eval"):
            self.accuracy.labels(split=split)
        for kind in TOKEN_KINDS:
            self.tokens_per_sequence.labels(kind=kind)

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        """Expose ``/metrics`` on ``port`` (a scrape target for Prometheus)."""
        start_http_server(port, addr=host, registry=self.registry)

    def record_step(
        self,
        m: Mapping[str, Any],
        p: Iterable[float],
        lam: Iterable[float],
        staleness: Iterable[int],
    ) -> None:
        """Set every per-step series from one step's record (the JSONL line's fields)."""

        def put(gauge: Gauge, key: str) -> None:
            value = m.get(key)
            if value is not None and math.isfinite(value):
                gauge.set(value)

        self.step.set(m["step"])
        self.weight_version.set(m["version"])
        for x in p:
            self.certainty_p.observe(x)
        for x in lam:
            self.lam.observe(x)
        for s in staleness:
            self.staleness.observe(s)
        put(self.p_mean, "p_mean")
        put(self.lambda_mean, "lambda_mean")
        for stat in ("mean", "std", "min", "max", "abs_mean"):
            put(self.advantage.labels(stat=stat), f"adv_{stat}")
        put(self.term_abs_mean.labels(term="z"), "z_part_abs_mean")
        put(self.term_abs_mean.labels(term="apd"), "apd_part_abs_mean")
        put(self.zero_variance, "zero_variance_share")
        put(self.reward_mean, "reward_mean")
        put(self.accuracy.labels(split="train"), "accuracy")
        put(self.accuracy.labels(split="eval"), "eval_accuracy")
        put(self.loss, "loss")
        put(self.clip_fraction.labels(side="low"), "clip_frac_low")
        put(self.clip_fraction.labels(side="high"), "clip_frac_high")
        put(self.clip_fraction.labels(side="dual"), "dual_clip_frac")
        for stat in ("mean", "min", "max"):
            put(self.ratio.labels(stat=stat), f"ratio_{stat}")
        put(self.updates, "updates")
        put(self.importance_weight_mean, "tis_weight_mean")
        put(self.importance_weight_capped, "tis_clip_frac")
        for lag, key in MISMATCH_LAGS.items():
            put(self.mismatch_kl.labels(lag=lag), key)
        put(self.kl, "kl")
        put(self.entropy, "entropy")
        put(self.grad_norm, "grad_norm")
        put(self.learning_rate, "lr")
        put(self.logprob_mismatch, "logprob_mismatch")
        for phase in PHASES:
            put(self.phase_seconds.labels(phase=phase), f"{phase}_s")
        put(self.tokens_per_second, "tokens_per_s")
        for kind, key in TOKEN_KINDS.items():
            put(self.tokens_per_sequence.labels(kind=kind), key)

    def record_bus(self, stats: Iterable[StreamStats], dead_letter_stream: str) -> None:
        for st in stats:
            if st.stream == dead_letter_stream:
                self.dead_letters.set(st.length)
                continue
            self.stream_length.labels(stream=st.stream).set(st.length)
            for g in st.groups:
                self.pending.labels(stream=st.stream, group=g.name).set(g.pending)
                if g.lag is not None:
                    self.lag.labels(stream=st.stream, group=g.name).set(g.lag)


def _clean(value: Any) -> Any:
    """JSON has no NaN or infinity: such values are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class JsonlLog:
    """An append-only JSON-lines file, one fsync-free write per record."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A record cut short by a kill leaves no newline: start on a fresh line after it.
        if self.path.is_file() and self.path.stat().st_size:
            with self.path.open("rb") as fh:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    with self.path.open("ab") as out:
                        out.write(b"\n")

    def append(self, record: Mapping[str, Any]) -> None:
        line = json.dumps({k: _clean(v) for k, v in record.items()}, separators=(",", ":"))
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(line + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every complete record of a JSON-lines file (a torn last line is skipped)."""
    out: list[dict[str, Any]] = []
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def surviving_lineage(records: Iterable[Mapping[str, Any]]) -> dict[int, Mapping[str, Any]]:
    """Step -> record, for the steps of the run that survived every resume.

    A ``{"event": "start", "from_step": s}`` record (written when a run starts) discards every
    earlier record of a step after ``s``: those steps were lost with the process that took
    them, and the restarted run takes them again.
    """
    out: dict[int, Mapping[str, Any]] = {}
    for rec in records:
        if rec.get("event") == "start":
            start = int(rec["from_step"])
            out = {k: v for k, v in out.items() if k <= start}
        elif "step" in rec:
            out[int(rec["step"])] = rec
    return dict(sorted(out.items()))
