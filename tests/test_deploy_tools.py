"""The tools the deployment checks run, and helpers the other test_deploy_* modules share.

Every check uses the ecosystem's own tool: Debian's ``docker-compose`` (1.29), ``kubectl
kustomize``, ``kubernetes-validate --strict``, ``promtool`` and ``prometheus`` (Debian's
``prometheus`` package), and the ``promql-parser`` package. ``.ci/run`` installs them. A check
skips only where its tool cannot be installed on the machine (no apt-get, or not root); where it
could be, a missing tool is a failure that says how to install it.
"""

from __future__ import annotations

import atexit
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
DASHBOARDS = DEPLOY / "grafana" / "dashboards"
PROMETHEUS_DIR = DEPLOY / "prometheus"
K8S = DEPLOY / "k8s"
OVERLAYS = ("cpu", "gpu", "hpa")
VENV_BIN = Path(sys.executable).parent

# Secrets have no defaults in deploy/ (deploy/make-secrets.sh makes them for a deployment). The
# checks render and resolve the manifests with throwaway values of their own, never with the
# files a developer may have made in this checkout.
#: The compose variables that must be set, each with a throwaway value.
COMPOSE_SECRETS = {
    "REDIS_PASSWORD": secrets.token_hex(24),
    "GRAFANA_ADMIN_PASSWORD": secrets.token_hex(24),
    "WEIGHTS_ANNOUNCE_SECRET": secrets.token_hex(24),
}
#: The kustomize secretGenerator's input, relative to deploy/k8s (an env file, KEY=value).
K8S_SECRET_FILE = Path("base") / "secrets" / "redis.env"
K8S_REDIS_PASSWORD = secrets.token_hex(24)
#: The second one: the key of the weight announcements' signatures.
K8S_WEIGHTS_SECRET_FILE = Path("base") / "secrets" / "weights.env"
K8S_ANNOUNCE_SECRET = secrets.token_hex(24)

# Debian package that provides each binary.
_DEBIAN = {
    "docker-compose": "docker-compose",
    "promtool": "prometheus",
    "prometheus": "prometheus",
    "kubectl": "kubernetes-client",
}

# Grafana's built-in variables, replaced the way Grafana does before a query reaches Prometheus.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
    "${__rate_interval}": "1m",
    "${__interval}": "15s",
    "${__range}": "1h",
}

# Which service exports a metric, by prefix (docs/metrics.md).
PREFIX_JOBS = {
    "mapo_reward_": "reward",
    "mapo_inference_": "inference",
    "mapo_trainer_": "trainer",
    "mapo_bus_": "trainer",
}


def _can_apt_install() -> bool:
    return shutil.which("apt-get") is not None and os.geteuid() == 0


def binary(name: str) -> str:
    """Path of a command-line tool, or fail/skip as the module docstring says."""
    path = shutil.which(name)
    if path is None and name == "kubectl":
        path = shutil.which("kubectl", path="/usr/bin:/usr/local/bin")
    if path is not None:
        return path
    package = _DEBIAN.get(name, name)
    if _can_apt_install():
        pytest.fail(f"{name} is missing: run .ci/run, or apt-get install -y {package}")
    pytest.skip(
        f"{name} cannot be installed here (it comes from Debian's {package} package and this "
        "machine has no apt-get or the tests do not run as root)"
    )


def venv_tool(name: str) -> str:
    """A console script of a Python package in the test environment (installable anywhere)."""
    path = VENV_BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is missing: pip install -e '.[dev]' (or run .ci/run)")
    return found


def run(
    cmd: list[str], *, cwd: Path = REPO, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False, env=env
    )


def compose_env(**override: str | None) -> dict[str, str]:
    """The environment compose runs in for the checks: the throwaway secrets, with
    ``override`` applied (None removes a variable, e.g. to see compose refuse to start)."""
    env = {k: v for k, v in os.environ.items() if k not in COMPOSE_SECRETS}
    env.update(COMPOSE_SECRETS)
    for key, value in override.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def empty_env_file() -> Path:
    """An empty file for compose's ``--env-file``: a developer's own .env beside
    docker-compose.yml (secrets, image names) must not change what the checks see."""
    fd, name = tempfile.mkstemp(prefix="mapo-compose-", suffix=".env")
    os.close(fd)
    atexit.register(os.unlink, name)
    return Path(name)


def k8s_copy(dest: Path, *, secret: bool = True) -> Path:
    """deploy/k8s copied to ``dest``, with a throwaway Redis password and announce key as the
    secretGenerators' inputs (``secret``); kustomize renders the copy as it would the original."""
    shutil.copytree(K8S, dest, ignore=shutil.ignore_patterns("redis.env", "weights.env"))
    if secret:
        (dest / K8S_SECRET_FILE).write_text(f"password={K8S_REDIS_PASSWORD}\n")
        (dest / K8S_WEIGHTS_SECRET_FILE).write_text(f"announce_secret={K8S_ANNOUNCE_SECRET}\n")
    return dest


def promql() -> Any:
    try:
        import promql_parser
    except ImportError:
        pytest.fail("promql-parser is missing: pip install -e '.[dev]' (or run .ci/run)")
    return promql_parser


def substitute_grafana_variables(expr: str) -> str:
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, GRAFANA_VARIABLES[name])
    leftover = re.findall(r"\$\{?\w+", expr)
    assert not leftover, f"unknown dashboard variable {leftover} in {expr!r}"
    return expr


def dashboard_files() -> list[Path]:
    return sorted(DASHBOARDS.glob("*.json"))


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard_expressions() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, PromQL) for every query target of every dashboard."""
    import json

    out = []
    for path in dashboard_files():
        board = json.loads(path.read_text(encoding="utf-8"))
        for panel in _panels(board.get("panels", [])):
            for target in panel.get("targets", []):
                if "expr" in target:
                    out.append((path.name, panel["title"], target["expr"]))
    return out


def alert_expressions() -> list[tuple[str, str]]:
    import yaml

    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text(encoding="utf-8"))
    return [
        (rule.get("alert") or rule.get("record"), rule["expr"])
        for group in rules["groups"]
        for rule in group["rules"]
    ]


def metric_names(expr: str) -> set[str]:
    """Names of every series selector of a (Grafana-variable-free) PromQL expression."""
    p = promql()
    names: set[str] = set()

    def visit(node: Any) -> bool:
        if isinstance(node, p.VectorSelector) and node.name:
            names.add(node.name)
        return True

    p.walk(p.parse(expr), visit)
    return names


def catalogue() -> dict[str, str]:
    """docs/metrics.md: metric name -> type."""
    text = (REPO / "docs" / "metrics.md").read_text(encoding="utf-8")
    return {
        m.group(1): m.group(2)
        for m in re.finditer(
            r"^\|\s*`(mapo_\w+)`\s*\|\s*(counter|gauge|histogram)\s*\|", text, re.M
        )
    }


def exported_series_names() -> dict[str, str]:
    """Every series name the catalogue implies -> the catalogue entry it belongs to."""
    names: dict[str, str] = {}
    for name, kind in catalogue().items():
        if kind == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                names[name + suffix] = name
        else:
            names[name] = name
    return names


def jobs_of(expr: str) -> set[str]:
    jobs = set()
    for name in metric_names(expr):
        for prefix, job in PREFIX_JOBS.items():
            if name.startswith(prefix):
                jobs.add(job)
    return jobs


# --- Tests of the toolchain itself: the versions the other checks rely on. ---------------


def test_docker_compose_is_debian_1_29() -> None:
    out = run([binary("docker-compose"), "version", "--short"]).stdout.strip()
    assert out.startswith("1.29"), out


def test_promtool_and_prometheus_are_2_x() -> None:
    for tool in ("promtool", "prometheus"):
        out = run([binary(tool), "--version"])
        text = out.stdout + out.stderr
        assert re.search(r"version 2\.\d+", text), text


def test_kubectl_has_kustomize() -> None:
    out = run([binary("kubectl"), "version", "--client"])
    assert "Kustomize Version" in out.stdout, out.stdout + out.stderr


def test_kubernetes_validate_knows_the_target_version() -> None:
    out = run([venv_tool("kubernetes-validate"), "--version"])
    assert out.returncode == 0, out.stderr


def test_catalogue_is_readable() -> None:
    names = catalogue()
    assert "mapo_trainer_certainty_p" in names
    assert names["mapo_trainer_certainty_p"] == "histogram"
    assert len(names) >= 40
