"""Runs of ``mapo up`` as child processes, for commands that run many of them.

``mapo compare`` and ``mapo bench objective`` both train the same starting model several times
through the whole stack with different settings. Each run is a separate ``mapo up`` process
(so every run starts its own services and leaves nothing behind), started here with its
overrides, its output in its own directory (``up.log`` beside the run's ``summary.json``), and
read back through the summary it writes.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.core.config import RunConfig
from services.stack.processes import Child
from services.stack.progress import SUMMARY_FILE

if TYPE_CHECKING:
    from services.stack.warmstart import WarmStartSettings

LOG_FILE = "up.log"


class RunFailed(RuntimeError):
    """A ``mapo up`` child that did not finish; the message names its log."""


@dataclass(frozen=True)
class UpRun:
    """One ``mapo up``: where it writes, and what it is given besides the defaults."""

    run_dir: Path
    seed: int
    model: Path
    steps: int | None = None
    estimator: str | None = None
    config: str | None = None
    #: ``section.field=value`` overrides, in order (a later one wins).
    overrides: Sequence[str] = field(default_factory=tuple)

    def command(self) -> list[str]:
        """The command line: the model comes last, so that nothing overrides it."""
        cmd = [sys.executable, "-m", "services.cli", "up", "--run-dir", str(self.run_dir)]
        cmd += ["--seed", str(self.seed)]
        if self.steps is not None:
            cmd += ["--steps", str(self.steps)]
        if self.estimator is not None:
            cmd += ["--estimator", self.estimator]
        if self.config:
            cmd += ["--config", self.config]
        for item in [*self.overrides, f"model.path={self.model}"]:
            cmd += ["--set", item]
        return cmd


def run_up(run: UpRun) -> dict[str, Any]:
    """Run ``mapo up`` to the end and return its ``summary.json``; raise :class:`RunFailed`
    when it fails. Interrupted (Ctrl-C, SIGTERM), it stops the child, which stops its stack.

    The run directory is claimed (marked) before the log goes into it, so that ``mapo up``
    accepts it as a run directory; a directory with other files in it is refused.
    """
    from services.stack.up import RunDirError, claim_run_dir

    try:
        claim_run_dir(run.run_dir)
    except RunDirError as exc:
        raise RunFailed(str(exc)) from None
    log = run.run_dir / LOG_FILE
    up = Child.start("mapo up", run.command(), log_path=log)
    try:
        code = up.wait()
    finally:
        up.stop(grace_s=120)  # `mapo up` stops what it started on SIGTERM
    if code != 0:
        raise RunFailed(f"mapo up failed with code {code}; see {log}")
    summary: dict[str, Any] = json.loads((run.run_dir / SUMMARY_FILE).read_text())
    return summary


def finished(run_dir: Path) -> dict[str, Any] | None:
    """The summary of a run that finished in ``run_dir``, or None (absent, or unreadable)."""
    try:
        summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def warm_model(
    config_file: str | None,
    overrides: Sequence[str],
    seed: int,
    where: Path,
    settings: WarmStartSettings | None = None,
) -> Path:
    """The model every run of ``seed`` starts from, resolved as ``mapo up --seed`` would: the
    configured ``model.path``, or the demo model warm-started once into ``where/model`` (a
    later call with the same settings reuses it)."""
    from services.stack.up import resolve_config, starting_model

    as_up = argparse.Namespace(
        config=config_file, overrides=list(overrides), steps=None, estimator=None, seed=seed
    )
    config: RunConfig = resolve_config(as_up)[0]
    model, _ = starting_model(config, where, settings)
    return model
