"""Where a training step's time goes: wall time per named phase.

CUDA runs kernels asynchronously, so on a CUDA device each phase synchronises the device when
it starts and when it ends; the time is then that of the work the phase queued, not of queuing
it. On the CPU nothing is synchronised (there is nothing to wait for).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

#: The phases of :meth:`services.trainer.model.Learner.train`, in order; each is reported as
#: ``{phase}_s`` (0.0 when it did not run in that step).
STEP_PHASES = ("collate", "old", "ref", "forward", "backward", "optimizer")


class PhaseTimer:
    """Accumulates seconds per phase name over any number of ``with timer.phase(name)``."""

    def __init__(self, device: torch.device) -> None:
        self.seconds: dict[str, float] = {}
        self._cuda = device if device.type == "cuda" else None

    def _sync(self) -> None:
        if self._cuda is not None:
            torch.cuda.synchronize(self._cuda)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def fields(self, phases: tuple[str, ...] = STEP_PHASES) -> dict[str, float]:
        """``{phase}_s`` for every phase in ``phases`` and every one timed (0.0 if not run)."""
        names = dict.fromkeys(phases) | dict.fromkeys(self.seconds)
        return {f"{name}_s": self.seconds.get(name, 0.0) for name in names}
