"""``mapo trainer run --config FILE [--resume]``: the trainer service's entry point."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from services.core.config import RunConfig


def cli_run(args: argparse.Namespace, config: RunConfig) -> int:
    """Train from scored groups until ``trainer.steps``; exit 2 on a run-directory mismatch."""
    logging.basicConfig(
        level=os.environ.get("MAPO_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if config.trainer.cpu_threads:
        import torch

        # On a machine the trainer shares with inference replicas, one team of threads per
        # core in each process oversubscribes the cores; the config splits them instead.
        torch.set_num_threads(config.trainer.cpu_threads)
    from services.trainer.loop import RunDirError, run

    try:
        return asyncio.run(run(config, resume=bool(getattr(args, "resume", False))))
    except RunDirError as exc:
        print(f"mapo trainer: {exc}", file=sys.stderr)
        return 2
