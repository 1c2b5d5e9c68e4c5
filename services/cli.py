"""``mapo``: one command-line program for every service and utility.

Arguments and the run config are parsed and validated here, before anything heavy is
imported; each subcommand names its handler as ``module:function`` and is imported only when
it runs, so ``mapo --help`` and config errors come back in a fraction of a second.
A handler has the signature ``handler(args: argparse.Namespace, config: RunConfig) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence

from services.core.config import ConfigError, RunConfig, load_config
from services.core.secrets import redact_tree
from services.models.arch import ARCHITECTURES, QWEN2


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML run file (see configs/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one config field (repeatable), e.g. --set trainer.steps=5",
    )


def _command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    handler: str,
    help_text: str,
) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text)
    _add_config_args(p)
    p.set_defaults(handler=handler)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mapo",
        description="Online RL post-training of language models with MAPO: services and tools.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # The main job: the whole local stack.
    up = _command(sub, "up", "services.stack.up:main", "Run the whole stack locally and train.")
    up.add_argument("--run-dir", default=None, help="where models, weights, logs go")
    up.add_argument("--steps", type=int, default=None, help="optimiser steps")
    up.add_argument("--replicas", type=int, default=1, help="inference replicas")
    up.add_argument("--estimator", default=None, help="advantage estimator (default mapo)")
    up.add_argument("--seed", type=int, default=None, help="seed for task, warm start and RL")
    up.add_argument("--nproc", type=int, default=None, help="trainer ranks (torchrun, FSDP2)")
    cmp = _command(
        sub,
        "compare",
        "services.stack.compare:main",
        "Every estimator x seed through the whole stack: table, spread and plot.",
    )
    cmp.add_argument(
        "--estimators",
        default="mapo,grpo,dapo,dr_grpo,apd,mapo_random_lambda",
        help="advantage estimators, comma-separated",
    )
    cmp.add_argument("--seeds", default="0,1,2", help="seeds, comma-separated")
    cmp.add_argument("--steps", type=int, default=None, help="RL steps of each run")
    cmp.add_argument("--run-dir", default=None, help="where the warm starts and runs go")

    # Services.
    reward = sub.add_parser("reward", help="The gRPC reward/verifier service.")
    rsub = reward.add_subparsers(dest="reward_command", metavar="ACTION", required=True)
    rs = _command(rsub, "serve", "services.reward.server:cli_serve", "Serve ScoreBatch over gRPC.")
    rs.add_argument("--host", default=None, help="bind address (default from config)")
    rs.add_argument("--port", type=int, default=None, help="port; 0 picks a free one")
    rs.add_argument("--workers", type=int, default=None, help="verifier worker processes")
    rs.add_argument(
        "--metrics-port", type=int, default=None, help="Prometheus /metrics port; 0 off"
    )

    inference = sub.add_parser("inference", help="The vLLM inference service.")
    isub = inference.add_subparsers(dest="inference_command", metavar="ACTION", required=True)
    iserve = _command(
        isub, "serve", "services.inference.server:cli_serve", "Serve vLLM with the rollout worker."
    )
    iserve.add_argument("--model", default=None, help="model directory (default from config)")
    iserve.add_argument("--host", default=None, help="bind address")
    iserve.add_argument("--port", type=int, default=None, help="HTTP port; 0 picks a free one")
    iserve.add_argument("--no-bus", action="store_true", help="HTTP API only, no rollout worker")

    trainer = sub.add_parser("trainer", help="The trainer service.")
    tsub = trainer.add_subparsers(dest="trainer_command", metavar="ACTION", required=True)
    trun = _command(tsub, "run", "services.trainer.main:cli_run", "Train from scored groups.")
    trun.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    trun.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="N",
        help="ranks on this node under torchrun, FSDP2-sharded (default trainer.nproc)",
    )

    # Utilities.
    mm = _command(
        sub, "make-model", "services.models.tiny:cli_make_model", "Build a tiny model offline."
    )
    mm.add_argument("dir", help="output directory")
    mm.add_argument(
        "--size",
        default="tiny",
        choices=["tiny", "mini", "small", "50m", "0.5b", "1.5b"],
        help="preset",
    )
    mm.add_argument("--seed", type=int, default=0, help="initialisation seed")
    mm.add_argument(
        "--arch",
        default=QWEN2,
        choices=ARCHITECTURES,
        help="qwen2: text only; qwen2_5_vl: Qwen2.5-VL with a small vision tower",
    )

    ev = _command(sub, "eval", "services.stack.evaluate:cli_eval", "Held-out accuracy.")
    ev.add_argument("target", help="model/checkpoint directory, or http://host:port of a service")
    ev.add_argument("--limit", type=int, default=None, help="evaluate at most N problems")

    bench = sub.add_parser("bench", help="Benchmarks (print their figures).")
    bsub = bench.add_subparsers(dest="bench_command", metavar="WHAT", required=True)
    ba = _command(
        bsub, "advantages", "services.benchmarks.advantages:main", "Advantage throughput."
    )
    ba.add_argument("--groups", type=int, default=100_000)
    ba.add_argument("--group-size", type=int, default=12)
    bb = _command(bsub, "bus", "services.benchmarks.bus:main", "Scored groups/s vs raw XADD.")
    bb.add_argument("--messages", type=int, default=5000)
    br = _command(
        bsub, "reward", "services.benchmarks.reward:main", "Completions scored per second."
    )
    br.add_argument("--completions", type=int, default=2000)
    bi = _command(
        bsub, "inference", "services.benchmarks.inference:main", "Service vs engine tokens/s."
    )
    bi.add_argument("--model", default=None, help="model directory (default: build --size)")
    bi.add_argument(
        "--size", default="tiny", choices=["tiny", "mini", "small"], help="model to build"
    )
    bi.add_argument("--prompts", type=int, default=32)
    bi.add_argument("--group-size", type=int, default=8)
    bi.add_argument("--max-tokens", type=int, default=64)
    bi.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up")
    bi.add_argument(
        "--vl", action="store_true", help="a tiny Qwen2.5-VL on the shapes task's pictures"
    )
    bl = _command(
        bsub, "reload", "services.benchmarks.reload:main", "Weight reload latency vs memcpy."
    )
    bl.add_argument("--sizes", default="tiny,50m", help="model presets, comma-separated")
    bl.add_argument("--repeats", type=int, default=5, help="reloads timed per model")
    bt = _command(bsub, "trainer", "services.benchmarks.trainer:main", "Trainer tokens/s per step.")
    bt.add_argument("--sizes", default="tiny,50m", help="model presets, comma-separated")
    bt.add_argument("--steps", type=int, default=3, help="timed steps per size (after 1 warm-up)")
    bt.add_argument(
        "--nproc", default=None, help="compare rank counts on the CPU instead, e.g. 1,2 (FSDP2)"
    )
    bt.add_argument("--threads-per-rank", type=int, default=1, help="torch threads of each rank")

    be = _command(
        bsub, "e2e", "services.benchmarks.e2e:main", "The stack vs a single-process loop."
    )
    be.add_argument("--steps", type=int, default=60, help="RL steps of each side")
    be.add_argument("--eval-every", type=int, default=10, help="steps between evaluations")
    be.add_argument("--rounds", type=int, default=5, help="timed rounds of each phase alone")
    be.add_argument("--run-dir", default=None, help="where the model and results go")

    bo = _command(
        bsub,
        "objective",
        "services.benchmarks.objective:main",
        "Held-out gain: mini-batch PPO with correction vs one update, over seeds.",
    )
    bo.add_argument("--seeds", default="0,1,2", help="seeds, comma-separated")
    bo.add_argument("--steps", type=int, default=100, help="RL steps of each run")
    bo.add_argument("--run-dir", default=None, help="where the models and runs go")

    bs = _command(
        bsub,
        "soak",
        "services.benchmarks.soak:main",
        "The stack for N minutes under periodic faults: ledger, restarts, memory, streams.",
    )
    bs.add_argument("--minutes", type=float, default=60.0, help="minutes of training")
    bs.add_argument(
        "--fault-every-s", type=float, default=180.0, help="seconds between injected faults"
    )
    bs.add_argument(
        "--sample-every-s", type=float, default=60.0, help="seconds between memory samples"
    )
    bs.add_argument("--replicas", type=int, default=1, help="inference replicas")
    bs.add_argument("--run-dir", default=None, help="where the model, run and results go")

    cfg = _command(sub, "config", "services.cli:show_config", "Print the effective config.")
    cfg.add_argument("--json", action="store_true", help="as JSON instead of TOML-like text")
    return parser


def show_config(args: argparse.Namespace, config: RunConfig) -> int:
    """Print the validated config, so a user sees exactly what a run would use.

    Secrets are shown as ``***`` (the password of the bus URL, tokens): the output gets pasted
    into issues and logs.
    """
    tree = redact_tree(config.model_dump(mode="json"))
    if args.json:
        print(json.dumps(tree, indent=2))
        return 0
    for section, values in tree.items():
        print(f"[{section}]")
        for key, value in values.items():
            print(f"{key} = {value!r}")
        print()
    return 0


def _resolve(spec: str) -> Callable[[argparse.Namespace, RunConfig], int]:
    module_name, func_name = spec.split(":")
    module = importlib.import_module(module_name)
    handler: Callable[[argparse.Namespace, RunConfig], int] = getattr(module, func_name)
    return handler


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, overrides=args.overrides)
    except ConfigError as exc:
        print(f"mapo: {exc}", file=sys.stderr)
        return 2
    handler = _resolve(args.handler)
    try:
        return int(handler(args, config) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
