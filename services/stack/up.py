"""``mapo up``: the whole stack on one machine, from nothing to a trained model and a report.

In order: warm-start the demo model (or reuse it), measure its held-out accuracy (greedy and
sampled, in-domain and out-of-domain), start a private Redis (or use REDIS_URL), the reward
service, N inference replicas and the trainer as separate processes that talk only through
the bus, gRPC and the weight store; follow the trainer's metrics with a progress line; measure
the same accuracies again on the same problems with the same decoding; stop everything; print
a table and write ``summary.json`` and ``learning_curve.png`` into the run directory. Ctrl-C,
SIGTERM or a failing piece stop every process this command started, and a piece that cannot
start is reported with its fix.

The run directory is marked as one (:data:`RUN_MARKER`): ``mapo up`` replaces the outputs of an
earlier run only in a directory it marked, and starts only in a new or empty one otherwise.
Secrets (the password of the bus URL, tokens) are never printed or written: the run's
``config.toml`` holds them redacted, and the services get them through their environment.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import os
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomli_w

from services.core.config import ENV_PREFIX, ConfigError, RunConfig, load_config
from services.core.secrets import (
    REDACTED,
    is_secret_name,
    redact_text,
    redact_tree,
    redact_url,
    redacted_fields,
)
from services.stack.accounting import Ledger, bus_outcomes, issued_ids, reconcile
from services.stack.processes import (
    Child,
    StartError,
    free_port,
    grpc_serving,
    http_ok,
    port_open,
    stop_all,
    wait_until,
)
from services.stack.progress import (
    CURVE_FILE,
    MetricsFollower,
    ProgressLine,
    plot_learning_curve,
    summary_table,
    write_summary,
)
from services.stack.redis_local import RedisEndpoint, ping
from services.stack.supervisor import PROCESSES_FILE, Supervised, Supervisor

if TYPE_CHECKING:
    from services.stack.evaluate import EvalSets, Scores
    from services.stack.warmstart import WarmStartSettings

DEFAULT_RUN_DIR = "runs/demo"
DEMO_CONFIG = "configs/demo.toml"

#: The service entry points, each named by the file a checkout must contain.
PIECES = {
    "reward service": ("services.reward.server", "cli_serve"),
    "inference service": ("services.inference.server", "cli_serve"),
    "trainer": ("services.trainer.main", "cli_run"),
    "held-out evaluation": ("services.trainer.evaluation", "evaluate"),
}

REWARD_READY_S = 90.0
INFERENCE_READY_S = 300.0
#: Restarts of each piece (a service, the trainer, the private Redis) before the run gives up.
MAX_RESTARTS = 3


def demo_config_path() -> Path:
    """The shipped demo config, next to the package in a checkout."""
    return Path(__file__).resolve().parents[2] / DEMO_CONFIG


def resolve_config(args: argparse.Namespace) -> tuple[RunConfig, Path]:
    """The run's config: --config or the demo, then --set and the flags (flags win)."""
    path = Path(args.config) if args.config else demo_config_path()
    if not path.is_file():
        raise ConfigError(
            f"the demo config {path} is missing from this installation; "
            "pass --config FILE (see configs/ in the repository)"
        )
    extra = list(args.overrides or [])
    if args.steps is not None:
        extra.append(f"trainer.steps={args.steps}")
    if args.estimator is not None:
        extra.append(f"algorithm.estimator={args.estimator}")
    if args.seed is not None:
        extra += [f"task.seed={args.seed}", f"trainer.seed={args.seed}"]
    if getattr(args, "nproc", None) is not None:
        extra.append(f"trainer.nproc={args.nproc}")  # travels to the trainer in its config
    return load_config(path, overrides=extra), path


#: What one RL run leaves in its run directory; a new `mapo up` there replaces all of it (the
#: warm-started model/ is kept and reused).
RUN_OUTPUTS = (
    "checkpoints",
    "weights",
    "logs",
    "redis",
    "config.toml",
    "metrics.jsonl",
    "applied.jsonl",
    "trainer_state.json",
    "summary.json",
    PROCESSES_FILE,
    CURVE_FILE,
)


#: The file that makes a directory a run directory of ``mapo up`` (written when it claims one).
RUN_MARKER = ".mapo-run"
#: First line of the ``config.toml`` a run writes: an older run directory, from before the
#: marker, is recognised by it.
CONFIG_HEADER = "# The effective config of this run, written by `mapo up`.\n"


class RunDirError(ValueError):
    """A run directory ``mapo up`` must not write into; the message says how to fix it."""


def is_run_dir(run_dir: Path) -> bool:
    """Whether ``run_dir`` is a run directory of ``mapo up`` (marked, or written before the
    marker existed: its config.toml starts with :data:`CONFIG_HEADER`)."""
    if (run_dir / RUN_MARKER).is_file():
        return True
    try:
        with (run_dir / "config.toml").open(encoding="utf-8") as f:
            return f.readline() == CONFIG_HEADER
    except (OSError, UnicodeDecodeError):
        return False


def claim_run_dir(run_dir: Path) -> None:
    """Make ``run_dir`` a run directory: create it, or mark an empty one; keep a run's own.

    Anything else is refused (:class:`RunDirError`): a new run deletes an old run's outputs
    there, and those names (logs, weights, checkpoints...) may be someone's own files.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir} is a file, not a directory; choose another --run-dir")
    if run_dir.is_dir() and not is_run_dir(run_dir) and any(run_dir.iterdir()):
        raise RunDirError(
            f"{run_dir} is not empty and is not a run directory of mapo up (it has no "
            f"{RUN_MARKER}), and a run replaces its logs, weights and checkpoints. Choose a new "
            f"or empty directory with --run-dir, or, if it holds an earlier run of mapo up, "
            f"mark it as one: touch {run_dir / RUN_MARKER}"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    marker = run_dir / RUN_MARKER
    if not marker.is_file():
        marker.write_text(
            "A run directory of `mapo up`: a new run here replaces the outputs of the last.\n"
        )


def clear_previous_run(run_dir: Path) -> None:
    """Remove the outputs of an earlier RL run in ``run_dir`` (only the names a run writes)."""
    for name in RUN_OUTPUTS:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def missing_pieces() -> list[str]:
    """Service entry points this checkout does not have, as 'name (module.function)'."""
    missing = []
    for name, (module, func) in PIECES.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(f"{name} ({module.replace('.', '/')}.py, {func})")
    return missing


def dump_config(config: RunConfig) -> tuple[str, list[str]]:
    """The config as TOML without its secrets, and ``section.field=null`` overrides for the
    fields that are None.

    TOML has no null, and leaving a field out would bring back its default, so a None travels
    to the child processes as an explicit override instead. A URL keeps its host with the
    password as ``***``; a token or password field is left out (its default, empty, disables
    what it guards, where ``***`` would be a guessable token). The services get the real values
    from :func:`secret_env`.
    """
    tree = config.model_dump(mode="json")
    nulls = [f"{s}.{k}=null" for s, fields in tree.items() for k, v in fields.items() if v is None]
    hidden = redacted_fields(tree)
    header = CONFIG_HEADER
    if nulls:
        header += "# None (passed to the services as --set): " + " ".join(nulls) + "\n"
    if hidden:
        header += (
            "# Secrets, redacted or left out here (the services got them in their environment): "
            + " ".join(hidden)
            + "\n"
        )
    body = {
        s: {
            k: v
            for k, v in fields.items()
            if v is not None and not (is_secret_name(k) and v == REDACTED)
        }
        for s, fields in redact_tree(tree).items()
    }
    return header + "\n" + tomli_w.dumps(body), nulls


def secret_env(config: RunConfig) -> dict[str, str]:
    """``MAPO__SECTION__FIELD`` variables with the values :func:`dump_config` does not write.

    JSON strings, so that a token of digits stays a string when the config reads it back.
    """
    tree = config.model_dump(mode="json")
    env = {}
    for dotted in redacted_fields(tree):
        section, field = dotted.split(".", 1)
        env[f"{ENV_PREFIX}{section.upper()}__{field.upper()}"] = json.dumps(tree[section][field])
    return env


def run_config(base: RunConfig, run_dir: Path, redis_url: str, reward_port: int) -> RunConfig:
    """The base config bound to this run: its directories, its Redis, its ports, its streams."""
    cfg = base.model_copy(deep=True)
    tag = uuid.uuid4().hex[:8]
    cfg.model.path = (
        str(run_dir / "model") if "path" not in base.model.model_fields_set else cfg.model.path
    )
    cfg.weights.store = str(run_dir / "weights")
    cfg.trainer.run_dir = str(run_dir)
    cfg.bus.url = redis_url
    cfg.bus.prompts_stream = f"mapo:{tag}:prompts"
    cfg.bus.rollouts_stream = f"mapo:{tag}:rollouts"
    cfg.bus.weights_stream = f"mapo:{tag}:weights"
    cfg.bus.dead_letter_stream = f"mapo:{tag}:dead"
    cfg.reward.address = f"127.0.0.1:{reward_port}"
    cfg.inference.host = "127.0.0.1"
    cfg.inference.port = 0
    return cfg


def trainer_threads(config: RunConfig, replicas: int, cores: int | None = None) -> int:
    """The trainer's torch threads on this machine: the cores the replicas' engines leave.

    Every process of the stack shares the machine, and a torch or OpenMP team with a thread
    per core in each of them oversubscribes it (threads spin while waiting for each other). So
    each engine keeps its ``inference.cpu_threads`` and the trainer takes the rest, split
    over its ``trainer.nproc`` ranks, at least one each; a value set in the config is kept.
    """
    if config.trainer.cpu_threads:
        return config.trainer.cpu_threads
    cores = cores or os.cpu_count() or 1
    engines = replicas * (config.inference.cpu_threads or cores)
    return max(1, (cores - engines) // config.trainer.nproc)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the cleanup below runs for both."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Stack:
    """The processes of one run, started in dependency order, kept alive by a
    :class:`Supervisor` while the trainer runs, and stopped in reverse."""

    def __init__(
        self,
        config: RunConfig,
        run_dir: Path,
        config_file: Path,
        nulls: list[str],
        *,
        max_restarts: int = MAX_RESTARTS,
        notify: Callable[[str], None] = print,
    ):
        self.config = config
        self.run_dir = run_dir
        self.logs = run_dir / "logs"
        self.service_args = ["--config", str(config_file)]
        for item in nulls:
            self.service_args += ["--set", item]
        # config_file is the whole effective config (the MAPO__ variables of this environment
        # are in it already), less the secrets, which travel here: never on a command line.
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        # A fresh key per run signs the weight announcements (a key the config sets wins).
        announce = {f"{ENV_PREFIX}WEIGHTS__ANNOUNCE_SECRET": json.dumps(os.urandom(32).hex())}
        self.env = {**inherited, **announce, **secret_env(config), "PYTHONUNBUFFERED": "1"}
        self.supervisor = Supervisor(run_dir, max_restarts=max_restarts, notify=notify)
        self.inference_urls: list[str] = []

    def _mapo(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "services.cli", *args, *self.service_args]

    def _start(self, name: str, args: list[str], log_name: str) -> Child:
        return Child.start(
            name, self._mapo(*args), log_path=self.logs / log_name, env=self.env,
            die_with_parent=True,
        )  # fmt: skip

    def _starter(self, name: str, args: list[str], log_name: str) -> Callable[[bool], Child]:
        """How a service is started, the first time and after it died (the same way)."""
        return lambda again: self._start(name, args, log_name)

    @property
    def trainer(self) -> Child | None:
        piece = self.supervisor.pieces.get("trainer")
        return piece.child if piece else None

    def watch_redis(self, redis: RedisEndpoint) -> None:
        """Restart the run's private Redis if it dies (it replays its append-only file)."""
        if redis.child is None:
            return  # the user's Redis (REDIS_URL): theirs to keep alive
        port = redis.port

        def start(again: bool) -> Child:
            if again:
                return redis.start_again(die_with_parent=True)
            assert redis.child is not None
            return redis.child

        self.supervisor.add(Supervised("redis", start, lambda: ping("127.0.0.1", port)))

    def start_reward(self) -> None:
        host, port = self.config.reward.address.rsplit(":", 1)
        address = self.config.reward.address
        args = ["reward", "serve", "--host", host, "--port", port]
        child = self.supervisor.add(
            Supervised(
                "reward service",
                self._starter("reward service", args, "reward.log"),
                lambda: grpc_serving(address, 2.0),
            )
        )
        wait_until(
            child,
            lambda: grpc_serving(address, 1.0),
            what=f"serving on {address}",
            timeout_s=REWARD_READY_S,
            fix=f"see {child.log_path}; `mapo reward serve --port 0` runs it alone",
        )

    def start_inference(self, replicas: int) -> None:
        ports = [free_port() for _ in range(replicas)]
        children = []
        for i, port in enumerate(ports):
            name = f"replica-{i}"
            args = ["inference", "serve", "--model", self.config.model.path, "--port", str(port)]
            args += ["--host", "127.0.0.1", "--set", f"inference.replica={name}"]
            start = self._starter(f"inference {name}", args, f"inference-{i}.log")
            probe = functools.partial(http_ok, f"http://127.0.0.1:{port}/live", 5.0)
            children.append(self.supervisor.add(Supervised(f"inference {name}", start, probe)))
        fix = (
            "see the log above; `mapo inference serve --model DIR --port 0` runs one replica "
            "alone. On a small machine try --replicas 1, or lower inference.kv_cache_gib."
        )
        for child, port in zip(children, ports, strict=True):
            wait_until(
                child,
                functools.partial(port_open, "127.0.0.1", port),
                what="listening",
                timeout_s=120.0,
                fix=fix,
            )
            base = f"http://127.0.0.1:{port}"
            wait_until(
                child,
                functools.partial(http_ok, base + "/ready"),
                what=f"ready at {base}/ready",
                timeout_s=INFERENCE_READY_S,
                fix=fix,
            )
            self.inference_urls.append(base)

    def start_trainer(self) -> Child:
        """The trainer; restarted with ``--resume`` (from its newest checkpoint) if it dies."""

        def start(again: bool) -> Child:
            args = ["trainer", "run", *(["--resume"] if again else [])]
            return self._start("trainer", args, "trainer.log")

        return self.supervisor.add(Supervised("trainer", start, done_on_success=True))

    def training_done(self) -> bool:
        """Whether the trainer finished (exit 0); restarts what died on the way."""
        self.supervisor.check()
        return self.supervisor.pieces["trainer"].finished

    def restarts(self) -> dict[str, int]:
        return self.supervisor.restarts()

    def stop(self, *, keep_redis: bool = False) -> None:
        """Trainer first (it checkpoints), then the replicas, then the reward service (and
        the private Redis unless ``keep_redis``: the run's ledger reads it)."""
        pieces = list(self.supervisor.pieces.values())
        order = [p for p in pieces if p.name == "trainer"]
        order += [p for p in pieces if p.name.startswith("inference")]
        order += [p for p in pieces if p.name == "reward service"]
        if not keep_redis:
            order += [p for p in pieces if p.name == "redis"]
        for piece in order:
            piece.finished = True  # stopped on purpose: not to be restarted
        stop_all([p.child for p in order if p.child is not None])


def follow_training(
    stack: Stack, bar: ProgressLine, quiet_note_s: float = 120.0
) -> list[dict[str, Any]]:
    """Show each step as the trainer logs it until it finishes; restart what dies meanwhile.

    A step taken again after the trainer resumed replaces its earlier record.
    """
    follower = MetricsFollower(stack.run_dir / "metrics.jsonl")
    last_progress = time.monotonic()
    noted = False
    while not stack.training_done():
        new = follower.poll()
        for record in new:
            bar.update(record)
        if new:
            last_progress, noted = time.monotonic(), False
        elif not noted and time.monotonic() - last_progress > quiet_note_s:
            trainer = stack.trainer
            bar.message(
                f"no training step for {quiet_note_s:.0f} s; the services are running, "
                f"see {trainer.log_path if trainer else stack.logs} and the logs beside it"
            )
            noted = True
        time.sleep(0.5)
    for record in follower.poll():
        bar.update(record)
    bar.close()
    by_step = {int(r.get("step", 0)): r for r in follower.records}
    return [by_step[s] for s in sorted(by_step)]


def run_ledger(config: RunConfig) -> Ledger:
    """What became of every prompt group the trainer issued (the bus must still be up)."""
    import asyncio

    from services.trainer import checkpoint as ckpt
    from services.trainer.dataset import load_examples
    from services.trainer.metrics import read_jsonl, surviving_lineage

    run_dir = Path(config.trainer.run_dir)
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is None:
        raise StartError(f"the trainer left no checkpoint in {run_dir}")
    state = ckpt.read_state(latest, verify=False)["state"]
    size = len(load_examples(config.task.dataset, config.task.name, config.task.seed))
    position = state["position"]
    issued = issued_ids(str(state["run_id"]), int(position["epoch"]), int(position["index"]), size)
    lineage = surviving_lineage(read_jsonl(run_dir / "applied.jsonl"))
    letters, waiting = asyncio.run(bus_outcomes(config))
    return reconcile(issued, lineage, letters, waiting)


def evaluate_policy(model_dir: Path, store: Path | None, sets: EvalSets) -> Scores:
    """Held-out accuracies of the model, with the newest version of ``store`` if any."""
    from services.stack.evaluate import load_policy, newest_weights, score

    policy = newest_weights(model_dir, store)
    model, tokenizer = load_policy(policy.model_dir, policy.version_dir)
    return score(model, tokenizer, sets)


def starting_model(
    config: RunConfig, run_dir: Path, warm: WarmStartSettings | None = None
) -> tuple[Path, dict[str, Any]]:
    """The starting policy: the configured model, or the demo model warm-started (with
    ``warm``, or the task's defaults) into ``run_dir/model``."""
    if "path" in config.model.model_fields_set:
        path = Path(config.model.path)
        if not (path / "config.json").is_file():
            raise StartError(
                f"model.path = {path} is not a model directory (no config.json)",
                fix="point model.path at an HF model directory, or leave it out for the demo model",
            )
        print(f"model: {path} (from the config; no warm start)")
        return path, {"warmstart_seconds": 0.0, "warmstart_reused": False}
    from services.stack.warmstart import WarmStartSettings, arch_for, warm_start

    if not config.task.dataset.startswith("builtin:"):
        raise StartError(
            "the demo model is warm-started on a built-in task only",
            fix="set model.path to your own model for a dataset file",
        )
    task = config.task.dataset.removeprefix("builtin:")
    settings = warm or WarmStartSettings(task=task, seed=config.task.seed, arch=arch_for(task))
    result = warm_start(run_dir / "model", settings)
    return run_dir / "model", {
        "warmstart_seconds": 0.0 if result.reused else result.seconds,
        "warmstart_reused": result.reused,
        "warmstart_steps": result.steps,
        "warmstart_trained_steps": result.trained_steps,
        "warmstart_accuracy": result.accuracy,
        "warmstart_in_band": result.in_band,
    }


def run(args: argparse.Namespace) -> int:
    """Everything ``mapo up`` does; returns the exit code."""
    t0 = time.monotonic()
    try:
        base, source = resolve_config(args)
    except ConfigError as exc:
        print(f"mapo up: {exc}", file=sys.stderr)
        return 2
    missing = missing_pieces()
    if missing:
        print(
            "mapo up: this installation lacks: " + "; ".join(missing) + ".\n"
            "how to fix: update your checkout (git pull) and reinstall (make install).",
            file=sys.stderr,
        )
        return 1
    if args.replicas < 1:
        print("mapo up: --replicas must be at least 1", file=sys.stderr)
        return 2
    run_dir = Path(args.run_dir or DEFAULT_RUN_DIR).resolve()
    try:
        claim_run_dir(run_dir)
    except RunDirError as exc:
        print(f"mapo up: {exc}", file=sys.stderr)
        return 2
    clear_previous_run(run_dir)
    print(
        f"mapo up: {base.trainer.steps} steps of {base.algorithm.estimator} with "
        f"{args.replicas} inference replica(s); config {source}; run directory {run_dir}",
        flush=True,
    )

    from services.stack.redis_local import check_url, ensure_redis

    stack: Stack | None = None
    redis = None
    try:
        with sigterm_as_interrupt():
            model_dir, warm = starting_model(base, run_dir)
            from services.stack.evaluate import eval_sets

            sets = eval_sets(base)
            initial = evaluate_policy(model_dir, None, sets)
            print(
                f"initial held-out accuracy: {initial.accuracy:.1%} on {len(sets.test):,} "
                f"problems ({initial.describe()})"
            )

            # Every write synced before Redis answers: a Redis killed mid-run and started
            # again loses no prompt it acknowledged, so the ledger can account for every one.
            redis = ensure_redis(run_dir / "redis", die_with_parent=True, appendfsync="always")
            if redis.child is None:
                check_url(redis.url)
            print(f"redis: {redis.source} at {redact_url(redis.url)}", flush=True)
            config = run_config(base, run_dir, redis.url, free_port())
            config.model.path = str(model_dir)
            config.trainer.cpu_threads = trainer_threads(config, args.replicas)
            text, nulls = dump_config(config)
            config_file = run_dir / "config.toml"
            config_file.write_text(text)

            t_rl = time.monotonic()
            bar = ProgressLine(config.trainer.steps)
            stack = Stack(config, run_dir, config_file, nulls, notify=bar.message)
            stack.watch_redis(redis)
            stack.start_reward()
            print(f"reward service: serving on {config.reward.address}", flush=True)
            stack.start_inference(args.replicas)
            print(f"inference: {', '.join(stack.inference_urls)} ready", flush=True)
            stack.start_trainer()
            print(f"trainer: started (logs in {stack.logs})", flush=True)
            records = follow_training(stack, bar)
            rl_seconds = time.monotonic() - t_rl

            # Stop the services first: the final evaluation then has the machine to itself.
            stack.stop(keep_redis=True)
            ledger = run_ledger(config)
            print(f"ledger: {ledger.describe()}", flush=True)
            restarts = stack.restarts()
            reasons = stack.supervisor.reasons()
            stack.stop()
            stack = None
            redis.stop()
            redis = None
            final = evaluate_policy(model_dir, Path(config.weights.store), sets)
            steps = max([int(r.get("step", 0)) for r in records] + [0])
            summary = {
                **initial.fields("initial"),
                **final.fields("final"),
                "accuracy_gain": final.accuracy - initial.accuracy,
                "steps": steps,
                "seconds": round(time.monotonic() - t0, 1),
                "rl_seconds": round(rl_seconds, 1),
                "estimator": config.algorithm.estimator,
                "replicas": args.replicas,
                "eval_problems": len(sets.test),
                "ood_problems": len(sets.ood),
                "eval_sampling": None if sets.sampling is None else asdict(sets.sampling),
                "model": str(model_dir),
                "seed": config.task.seed,
                "config": str(config_file),
                "ledger": ledger.to_json(),
                "restarts": restarts,
                "restart_reasons": reasons,
                **warm,
            }
            write_summary(run_dir, summary)
            plot_learning_curve(
                run_dir / CURVE_FILE, records, initial.accuracy, (steps, final.accuracy)
            )
            print(summary_table(summary))
            print(f"summary: {run_dir / 'summary.json'}; curve: {run_dir / CURVE_FILE}")
            if not ledger.ok:
                print(f"mapo up: the ledger does not balance: {ledger.describe()}", file=sys.stderr)
                return 1
            return 0
    except StartError as exc:
        # The explanation may quote a URL, e.g. an unreachable REDIS_URL.
        print("\n" + redact_text(exc.explain()), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nmapo up: interrupted; stopping everything (logs in {run_dir / 'logs'})")
        return 130
    finally:
        if stack is not None:
            stack.stop()
        if redis is not None:
            redis.stop()


def main(args: argparse.Namespace, config: RunConfig) -> int:
    """``mapo up`` (the CLI's parsed config is re-read here with the demo as the base file)."""
    del config
    return run(args)
