"""``mapo trainer run --config FILE [--resume] [--nproc N]``: the trainer service's entry point.

With ``--nproc N`` (or ``trainer.nproc``) above 1 this command becomes torch's elastic
launcher, ``torchrun``, which starts N ranks of this same command and restarts them all (up to
``trainer.max_restarts`` times) when one fails; a restarted rank resumes from the newest
checkpoint. Under torchrun (on one node or many) rank 0 runs the trainer and the other ranks
follow it (:mod:`services.trainer.distributed`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from services.core.config import RunConfig

SEPARATE_STORES = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


def cli_run(args: argparse.Namespace, config: RunConfig) -> int:
    """Train from scored groups until ``trainer.steps``; exit 2 on a run-directory mismatch."""
    logging.basicConfig(
        level=os.environ.get("MAPO_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from services.trainer import distributed

    resume = bool(getattr(args, "resume", False))
    nproc = getattr(args, "nproc", None) or config.trainer.nproc
    if nproc < 1:
        print(f"mapo trainer: --nproc must be at least 1, not {nproc}", file=sys.stderr)
        return 2
    if nproc > 1 and not distributed.launched_by_torchrun():
        return launch(args, config, nproc, resume=resume)
    if config.trainer.cpu_threads:
        import torch

        # On a machine the trainer shares with inference replicas, one team of threads per
        # core in each process oversubscribes the cores; the config splits them instead.
        torch.set_num_threads(config.trainer.cpu_threads)
    from services.trainer.checkpoint import CheckpointError
    from services.trainer.loop import RunDirError, run
    from services.trainer.model import follow

    topology = distributed.init(config.trainer.device)
    # torchrun restarts every rank after a failure: the run goes on from its checkpoint.
    resume = resume or topology.restart_count > 0
    try:
        if not topology.leader:
            return follow(config)
        try:
            code = asyncio.run(run(config, resume=resume))
        except RunDirError as exc:
            print(f"mapo trainer: {exc}", file=sys.stderr)
            code = 2
        except CheckpointError as exc:
            # Already logged with what happens next; the supervisor restarts with --resume.
            print(f"mapo trainer: {exc}", file=sys.stderr)
            return 1
        # Not on an exception: a rank may be gone, and torchrun stops the others anyway.
        distributed.current().tell(distributed.Op.STOP)
        return code
    finally:
        distributed.shutdown()


def torchrun_command(
    args: argparse.Namespace, nproc: int, max_restarts: int, *, resume: bool
) -> list[str]:
    """torchrun on one node, ``nproc`` ranks of ``mapo trainer run`` with the same config."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}"]
    command += ["-m", "services.cli", "trainer", "run"]
    if getattr(args, "config", None):
        command += ["--config", str(Path(args.config).resolve())]
    for item in getattr(args, "overrides", None) or []:
        command += ["--set", item]
    if resume:
        command.append("--resume")
    return command


def launch(args: argparse.Namespace, config: RunConfig, nproc: int, *, resume: bool) -> int:
    """Become torchrun (same PID, so signals reach it; it forwards them to the ranks).

    The run directory is checked first: torchrun restarts resume, so a fresh run over an old
    one must be refused before any rank starts.
    """
    from services.trainer import checkpoint as ckpt

    latest = ckpt.latest_checkpoint(config.trainer.run_dir)
    if latest is not None and not resume:
        print(
            f"mapo trainer: {config.trainer.run_dir} already holds checkpoints (newest: "
            f"{latest.name}); pass --resume to continue that run, or choose another "
            "trainer.run_dir",
            file=sys.stderr,
        )
        return 2
    command = torchrun_command(args, nproc, config.trainer.max_restarts, resume=resume)
    # Each attempt gets a store of its own: with the launcher's store shared, the ranks of a
    # restart can read the addresses of the ranks they replace (pytorch/pytorch#135712).
    os.environ.setdefault(SEPARATE_STORES, "1")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)
    return 1  # not reached
