"""Started by tests/test_trainer_distributed.py under torchrun: rank 0 drives the trainer's
``Learner`` exactly as the run loop does, the other ranks follow it (``follow``).

``python -m torch.distributed.run --nproc-per-node 2 -m tests.trainer_ranks_runner JOB_DIR``;
``JOB_DIR/job.json`` names the phases. Each phase builds a learner with its own config
(followers start a new ``follow`` per phase), optionally restores a checkpoint, trains on
encoded groups, evaluates, writes a checkpoint and the gathered weights, then stops the
followers. Every output goes to ``JOB_DIR/<phase>/``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


class WeightCapture:
    """Stands in for the weight publisher: keeps what ``Learner.publish`` hands it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, weights: Any, version: int, step: int) -> tuple[str, str]:
        from safetensors.torch import save_file

        tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
        save_file(tensors, str(self.path))
        return str(self.path), ""


def lead(phase: dict[str, Any], config: Any, out: Path) -> None:
    from services.core.schemas import ScoredGroup, decode
    from services.trainer import checkpoint as ckpt
    from services.trainer.dataset import eval_examples
    from services.trainer.model import Learner

    out.mkdir(parents=True, exist_ok=True)
    restore = phase.get("restore")
    learner = Learner.build(config, weights_from=ckpt.weights_dir(restore) if restore else None)
    step = 0
    if restore:
        step = int(learner.restore(restore).get("step", 0))
    groups = []
    for path in phase["groups"]:
        group = decode(Path(path).read_bytes())
        assert isinstance(group, ScoredGroup)
        groups.append(group)
    learner.set_step(step)
    result = learner.train(groups, phase["staleness"], frozenset(phase["corrected"]))
    (out / "metrics.json").write_text(json.dumps(result.metrics))
    learner.publish(WeightCapture(out / "weights.safetensors"), 0, step + 1)  # type: ignore[arg-type]
    t = config.task
    ev = learner.evaluate(eval_examples(t.dataset, t.eval_dataset, t.name, t.seed)[:64])
    (out / "eval.json").write_text(json.dumps({"completions": list(ev.completions)}))
    learner.save(out / "run", step + 1, {"step": step + 1})
    learner.close()


def main(argv: list[str]) -> int:
    from services.core.config import build_config
    from services.trainer import distributed
    from services.trainer.model import follow

    job = Path(argv[0])
    phases = json.loads((job / "job.json").read_text())
    topology = distributed.init("cpu")
    try:
        for phase in phases:
            config = build_config(phase["config"], environ={})
            if topology.leader:
                lead(phase, config, job / phase["name"])
            else:
                follow(config)
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
