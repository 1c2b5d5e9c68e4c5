"""docker-compose.yml, deploy/compose.env and the Dockerfiles.

The compose file is validated by Debian's docker-compose 1.29 (``config -q``), the oldest
implementation users run; the resolved configuration is then checked for what the stack needs
(builds, healthchecks on real endpoints, dependency conditions, GPU reservations, profiles,
the shared weight volume). Service commands are parsed by the real ``mapo`` argument parser.
Compose resolves the file with throwaway secrets (no secret has a default) and an empty
``--env-file``, so that a developer's own ``.env`` changes nothing here.
"""

from __future__ import annotations

import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.cli import build_parser
from services.core.config import build_config
from tests.test_deploy_tools import (
    COMPOSE_SECRETS,
    DEPLOY,
    REPO,
    binary,
    compose_env,
    empty_env_file,
    run,
)

COMPOSE = REPO / "docker-compose.yml"
ENV_FILE = "deploy/compose.env"
MAPO_SERVICES = ("reward", "model", "trainer-cpu", "inference-cpu", "trainer-gpu", "inference-gpu")
PINNED = ("prometheus", "grafana")
#: The services that use the bus, the only ones that get the Redis password.
BUS_USERS = ("trainer-cpu", "inference-cpu", "trainer-gpu", "inference-gpu")
REDIS_PASSWORD = COMPOSE_SECRETS["REDIS_PASSWORD"]
EMPTY_ENV_FILE = empty_env_file()
SMOKE_SCRIPT = DEPLOY / "smoke" / "compose_smoke.py"


def compose(
    *args: str, files: tuple[Path, ...] = (COMPOSE,), env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """docker-compose with the throwaway secrets (or ``env``) and no .env of the checkout."""
    cmd = [binary("docker-compose"), "--env-file", str(EMPTY_ENV_FILE)]
    for f in files:
        cmd += ["-f", str(f)]
    return run([*cmd, *args], env=env or compose_env())


def env_file() -> dict[str, str]:
    out = {}
    for line in (REPO / ENV_FILE).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, value = line.split("=", 1)
            out[key] = value
    return out


@pytest.fixture(scope="module")
def resolved() -> dict[str, Any]:
    """The configuration as docker-compose resolves it (anchors, env_file, profiles merged)."""
    out = compose("config")
    assert out.returncode == 0, out.stderr
    data: dict[str, Any] = yaml.safe_load(out.stdout)
    return data


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return data


def mounts(svc: dict[str, Any]) -> set[tuple[str, str]]:
    """(source, target) of every volume, from the short form (1.29) or the long form (v2)."""
    out = set()
    for v in svc.get("volumes", []):
        if isinstance(v, dict):
            out.add((str(v["source"]), str(v["target"])))
        else:
            source, target = v.split(":")[:2]
            out.add((source, target))
    return out


def test_compose_config_is_valid() -> None:
    out = compose("config", "-q")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stderr.strip() == "", out.stderr  # no warnings (e.g. unset variables)


def test_compose_rejects_what_1_29_rejects(tmp_path: Path) -> None:
    """The validator is real: a service-level `gpus:` (compose v2 only) fails config -q."""
    bad = tmp_path / "docker-compose.yml"
    bad.write_text("services:\n  x:\n    image: busybox:1.36\n    gpus: all\n")
    out = run([binary("docker-compose"), "-f", str(bad), "config", "-q"])
    assert out.returncode != 0


def test_no_keys_that_compose_1_29_rejects(raw: dict[str, Any]) -> None:
    assert "name" not in raw and "include" not in raw and "version" not in raw
    for name, svc in raw["services"].items():
        assert "gpus" not in svc and "develop" not in svc, name
        assert "start_interval" not in svc.get("healthcheck", {}), name
        env_files = svc.get("env_file", [])
        env_files = [env_files] if isinstance(env_files, str) else env_files
        assert all(isinstance(f, str) for f in env_files), f"{name}: long-form env_file"


@pytest.mark.parametrize(
    ("profile", "services"),
    [
        (
            "cpu",
            {"redis", "reward", "model", "trainer-cpu", "inference-cpu", "prometheus", "grafana"},
        ),
        (
            "gpu",
            {"redis", "reward", "model", "trainer-gpu", "inference-gpu", "prometheus", "grafana"},
        ),
    ],
)
def test_profiles(resolved: dict[str, Any], profile: str, services: set[str]) -> None:
    active = {
        name
        for name, svc in resolved["services"].items()
        if not svc.get("profiles") or profile in svc["profiles"]
    }
    assert active == services
    out = compose("--profile", profile, "config", "-q")
    assert out.returncode == 0, out.stderr


def test_images_are_built_or_pinned(resolved: dict[str, Any]) -> None:
    """Nothing needs a registry except the two pinned monitoring images."""
    for name, svc in resolved["services"].items():
        if name in PINNED:
            assert "build" not in svc
            assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", svc["image"]), svc["image"]
            continue
        build = svc["build"]
        assert Path(build["context"]) == REPO, name
        assert (REPO / build["dockerfile"]).is_file(), build["dockerfile"]
        assert "image" in svc  # tagged, so services share one build


def test_one_env_file(resolved: dict[str, Any]) -> None:
    for name, svc in resolved["services"].items():
        if name == "prometheus":
            continue
        # docker-compose inlines env_file into environment; every key of the file is there.
        assert env_file().items() <= {k: str(v) for k, v in svc["environment"].items()}.items(), (
            name
        )


def test_env_file_is_a_valid_run_config(resolved: dict[str, Any]) -> None:
    env = env_file()
    config = build_config(environ=env)  # unknown MAPO__ keys or bad values raise
    # The bus URL comes from docker-compose.yml, built from the one secret.
    for name in BUS_USERS:
        environ = {k: str(v) for k, v in resolved["services"][name]["environment"].items()}
        bus = build_config(environ=environ).bus
        assert bus.url == f"redis://:{REDIS_PASSWORD}@redis:6379/0", name
    assert config.reward.address == "reward:50051"
    assert config.weights.store.startswith(config.trainer.run_dir + "/")
    assert config.model.path.startswith("/data/")
    assert config.trainer.metrics_port and config.reward.metrics_port
    # Replicas share the trainer's volume: versions are announced as directories there.
    assert config.trainer.weights_port == 0


def test_redis_aof_and_authenticated_healthcheck(resolved: dict[str, Any]) -> None:
    redis = resolved["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    # Compose prints $$ (its escape for a literal $): the shell in the container expands it.
    assert re.search(r'--requirepass "\$\$?REDIS_PASSWORD"', command), command
    assert ("redis-data", "/data") in mounts(redis)
    test = " ".join(redis["healthcheck"]["test"])
    assert "redis-cli ping" in test and "REDISCLI_AUTH" in test


def test_healthchecks_call_the_real_endpoints(resolved: dict[str, Any]) -> None:
    env = env_file()
    svcs = resolved["services"]
    reward = svcs["reward"]["healthcheck"]["test"]
    assert reward[:4] == ["CMD", "python", "-m", "services.reward.healthcheck"]
    assert reward[4].endswith(":" + env["MAPO__REWARD__ADDRESS"].split(":")[1])
    for name in ("inference-cpu", "inference-gpu"):
        test = " ".join(svcs[name]["healthcheck"]["test"])
        assert f"'http://127.0.0.1:{env['MAPO__INFERENCE__PORT']}' + p" in test
        assert "('/live', '/ready')" in test
    for name in ("trainer-cpu", "trainer-gpu"):
        test = " ".join(svcs[name]["healthcheck"]["test"])
        assert f"http://127.0.0.1:{env['MAPO__TRAINER__METRICS_PORT']}/metrics" in test
    for name in ("prometheus", "grafana"):
        assert "healthcheck" in svcs[name]


def test_dependency_conditions(resolved: dict[str, Any]) -> None:
    svcs = resolved["services"]
    for kind in ("cpu", "gpu"):
        inference = svcs[f"inference-{kind}"]["depends_on"]
        assert inference["redis"]["condition"] == "service_healthy"
        assert inference["reward"]["condition"] == "service_healthy"
        assert inference["model"]["condition"] == "service_completed_successfully"
        # A restarted trainer continues its run (a fresh run dir starts fresh).
        assert "--resume" in (_mapo_args(svcs[f"trainer-{kind}"]) or [])
        trainer = svcs[f"trainer-{kind}"]["depends_on"]
        assert trainer["redis"]["condition"] == "service_healthy"
        assert trainer["model"]["condition"] == "service_completed_successfully"
    assert svcs["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    # Nothing that is always on may depend on a service of one profile.
    for name, svc in svcs.items():
        if not svc.get("profiles"):
            for dep in svc.get("depends_on", {}):
                assert not svcs[dep].get("profiles"), f"{name} depends on profiled {dep}"


def test_gpu_reservations(resolved: dict[str, Any]) -> None:
    """The GPU trainer gets every GPU of the machine, an inference replica one."""
    counts = {"trainer-gpu": "all", "inference-gpu": 1}
    for name, svc in resolved["services"].items():
        devices = svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
        if name.endswith("-gpu"):
            expected = {"driver": "nvidia", "count": counts[name], "capabilities": ["gpu"]}
            assert devices == [expected], name
            assert svc["build"]["dockerfile"].endswith("Dockerfile.cuda")
        else:
            assert devices is None, name


def _bytes(size: str | int) -> int:
    """A compose size ("16gb", "512m" or bytes) in bytes."""
    m = re.fullmatch(r"(\d+)\s*([kmg]?)b?", str(size).lower())
    assert m, size
    return int(m.group(1)) * 1024 ** "_kmg".index(m.group(2) or "_")


def test_gpu_trainer_has_room_for_nccl(resolved: dict[str, Any]) -> None:
    """NCCL between the ranks of one machine needs more /dev/shm than the 64 MiB default."""
    svc = resolved["services"]["trainer-gpu"]
    assert _bytes(svc["shm_size"]) >= 8 * 2**30
    assert svc["ulimits"]["memlock"] == -1
    assert "shm_size" not in resolved["services"]["trainer-cpu"]


def _container_script(svc: dict[str, Any]) -> str:
    """The `sh -c` script as the container runs it (compose turns $$ into $)."""
    assert svc["entrypoint"] == ["sh", "-c"]
    (script,) = svc["command"]
    return str(script).replace("$$", "$")


def _run_trainer_script(
    script: str, tmp_path: Path, python: str, **env: str
) -> tuple[str, str, list[str]]:
    """Run the script with a stand-in `mapo` that reports what it was started with."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    mapo = bin_dir / "mapo"
    mapo.write_text('#!/bin/sh\necho "${CUDA_VISIBLE_DEVICES-unset}|$MAPO__TRAINER__NPROC|$*"\n')
    mapo.chmod(0o755)
    wrapper = bin_dir / "python"
    wrapper.write_text(f'#!/bin/sh\nexec "{python}" "$@"\n')
    wrapper.chmod(0o755)
    base = {"PATH": f"{bin_dir}:/usr/bin:/bin", "MAPO_TRAINER_GPUS": "all"}
    out = subprocess.run(
        ["sh", "-c", script], env={**base, **env}, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    visible, nproc, args = out.stdout.strip().split("|")
    return visible, nproc, args.split()


def test_gpu_trainer_runs_one_rank_per_visible_gpu(
    resolved: dict[str, Any], tmp_path: Path
) -> None:
    """The trainer's shell: nproc = GPUs the container sees, unless set; MAPO_TRAINER_GPUS narrows."""
    svc = resolved["services"]["trainer-gpu"]
    assert svc["environment"]["MAPO_TRAINER_GPUS"] == "all"
    script = _container_script(svc)
    # A stand-in python that counts CUDA_VISIBLE_DEVICES the way torch does (8 GPUs otherwise).
    fake = tmp_path / "fake-python"
    fake.write_text(
        '#!/bin/sh\n[ -n "${CUDA_VISIBLE_DEVICES+x}" ] || { echo 8; exit; }\n'
        'echo "$CUDA_VISIBLE_DEVICES" | tr , "\\n" | grep -c .\n'
    )
    fake.chmod(0o755)
    visible, nproc, args = _run_trainer_script(script, tmp_path, str(fake))
    assert (visible, nproc) == ("unset", "8")
    build_parser().parse_args(args)
    assert args == ["trainer", "run", "--resume"]
    assert _run_trainer_script(script, tmp_path, str(fake), MAPO_TRAINER_GPUS="1,2,3")[:2] == (
        "1,2,3",
        "3",
    )
    assert _run_trainer_script(script, tmp_path, str(fake), MAPO__TRAINER__NPROC="2")[:2] == (
        "unset",
        "2",
    )
    # The real interpreter runs the GPU count (no GPU here: 0).
    _, nproc, _ = _run_trainer_script(script, tmp_path, sys.executable)
    assert nproc == "0"
    # Whatever it resolves to is a valid run config.
    environ = {**env_file(), "MAPO__TRAINER__DEVICE": "cuda", "MAPO__TRAINER__NPROC": "8"}
    assert build_config(environ=environ).trainer.nproc == 8


def test_shared_weight_volume(resolved: dict[str, Any]) -> None:
    assert "weights" in resolved["volumes"]
    for name in MAPO_SERVICES:
        assert ("weights", "/data") in mounts(resolved["services"][name]), name


def test_prometheus_and_grafana_mount_deploy(resolved: dict[str, Any]) -> None:
    prom = resolved["services"]["prometheus"]
    assert (str(DEPLOY / "prometheus"), "/etc/prometheus") in mounts(prom)
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]


def _mapo_args(svc: dict[str, Any]) -> list[str] | None:
    command = svc["command"]
    if svc.get("entrypoint"):
        # sh -c "... || exec mapo ARGS": the mapo part.
        text = " ".join(command)
        m = re.search(r"exec mapo (.+)$", text)
        return m.group(1).split() if m else None
    return list(command)


@pytest.mark.parametrize("name", MAPO_SERVICES)
def test_service_commands_parse(resolved: dict[str, Any], name: str) -> None:
    """Each command is accepted by the real `mapo` argument parser."""
    args = _mapo_args(resolved["services"][name])
    assert args, name
    build_parser().parse_args(args)


def test_inference_has_a_stable_alias(resolved: dict[str, Any]) -> None:
    for kind in ("cpu", "gpu"):
        svc = resolved["services"][f"inference-{kind}"]
        assert svc["networks"]["default"]["aliases"] == ["inference"]
        svc = resolved["services"][f"trainer-{kind}"]
        assert svc["networks"]["default"]["aliases"] == ["trainer"]


# --- Dockerfiles ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda", "Dockerfile.redis"])
def test_dockerfile_copies_exist(name: str) -> None:
    text = (DEPLOY / "docker" / name).read_text(encoding="utf-8")
    assert text.count("\nFROM ") + text.startswith("FROM ") >= 1
    ignored = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for m in re.finditer(r"^COPY\s+(.+)$", text, re.M):
        *sources, _dest = m.group(1).split()
        for src in sources:
            assert (REPO / src).exists(), f"{name}: COPY {src}: not in the repository"
            top = src.strip("/").split("/")[0]
            assert top not in ignored, f"{name}: COPY {src} is excluded by .dockerignore"


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfile_runs_mapo(name: str) -> None:
    text = (DEPLOY / "docker" / name).read_text(encoding="utf-8")
    assert 'ENTRYPOINT ["mapo"]' in text
    assert "USER mapo" in text
    assert "python:3.11" in text
    if name == "Dockerfile.cpu":
        # `make install`: the whole lock with --no-deps, then the project with --no-deps.
        assert "LOCK=requirements/cpu.lock" in text and '--no-deps -r "$LOCK"' in text
        assert "pip install --no-deps --no-build-isolation ." in text
    else:
        assert '".[gpu]"' in text


# --- The reward healthcheck the compose file runs ----------------------------------------


@pytest.mark.integration
def test_reward_healthcheck_against_a_real_grpc_health_server() -> None:
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    probe = [sys.executable, "-m", "services.reward.healthcheck", f"127.0.0.1:{port}"]
    try:
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        ok = run(probe, timeout=30)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        down = run(probe, timeout=30)
        assert down.returncode == 1 and "NOT_SERVING" in down.stderr
        unknown = run([*probe, "--service", "no.such.Service"], timeout=30)
        assert unknown.returncode == 1
    finally:
        server.stop(grace=None)
    refused = run([*probe, "--timeout", "1"], timeout=30)
    assert refused.returncode == 1


def test_smoke_override_only_shrinks_the_run() -> None:
    """deploy/smoke/compose.smoke.yml is valid for 1.29 and changes nothing but run settings."""
    smoke = DEPLOY / "smoke" / "compose.smoke.yml"
    out = compose("--profile", "cpu", "config", files=(COMPOSE, smoke))
    assert out.returncode == 0, out.stderr
    merged = yaml.safe_load(out.stdout)["services"]
    base = yaml.safe_load(compose("--profile", "cpu", "config").stdout)["services"]
    assert merged.keys() == base.keys()
    build_config(environ={k: str(v) for k, v in merged["trainer-cpu"]["environment"].items()})
    for name, svc in merged.items():
        assert mounts(svc) == mounts(base[name]), name  # merging may reorder volumes
        same = {k: v for k, v in svc.items() if k not in ("environment", "volumes")}
        assert same == {
            k: v for k, v in base[name].items() if k not in ("environment", "volumes")
        }, name
        changed = {
            k
            for k, v in svc.get("environment", {}).items()
            if base[name].get("environment", {}).get(k) != v
        }
        assert all(k.startswith("MAPO__") for k in changed), (name, changed)


def test_image_overrides_default_to_the_pinned_images(resolved: dict[str, Any]) -> None:
    """Prometheus and Grafana images can be swapped (offline smoke test), pinned by default."""
    raw_text = COMPOSE.read_text(encoding="utf-8")
    assert "${MAPO_PROMETHEUS_IMAGE:-prom/prometheus:v2.55.1}" in raw_text
    assert resolved["services"]["prometheus"]["image"] == "prom/prometheus:v2.55.1"
    for name in MAPO_SERVICES:
        assert resolved["services"][name]["build"]["args"]["OFFLINE"] == "0", name


# --- Secrets: none in deploy/, compose refuses to start without them --------------------


SECRET_VARIABLES = ("REDIS_PASSWORD", "GRAFANA_ADMIN_PASSWORD", "WEIGHTS_ANNOUNCE_SECRET")


@pytest.mark.parametrize("name", SECRET_VARIABLES)
def test_compose_refuses_to_start_without_a_secret(name: str) -> None:
    """No default: every compose command fails, naming the variable and how to make it."""
    for args in (("config", "-q"), ("--profile", "cpu", "config", "-q")):
        out = compose(*args, env=compose_env(**{name: None}))
        assert out.returncode != 0, args
        assert f"set {name} in .env" in out.stderr, out.stderr
        assert "deploy/make-secrets.sh" in out.stderr, out.stderr
    # Set empty is missing too (${VAR:?...}).
    assert compose("config", "-q", env=compose_env(**{name: ""})).returncode != 0


def test_no_secret_has_a_default_in_deploy(raw: dict[str, Any]) -> None:
    env = env_file()
    for key in env:
        assert not re.search(r"PASSWORD|TOKEN|SECRET", key), f"compose.env sets {key}"
    assert "MAPO__BUS__URL" not in env and "@" not in "".join(env.values())
    text = COMPOSE.read_text(encoding="utf-8")
    for name in SECRET_VARIABLES:
        assert re.search(rf"\$\{{{name}:\?", text), f"{name} must be required (${{{name}:?...}})"
        assert not re.search(rf"\$\{{{name}:?-", text), f"{name} has a default"
        assert not re.search(rf"\${name}\b", text.replace(f"$${name}", "")), name


def test_the_redis_password_reaches_only_what_needs_it(resolved: dict[str, Any]) -> None:
    """Redis itself and the bus users; the bus URL is built from the one variable."""
    grafana = resolved["services"]["grafana"]["environment"]
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"] == COMPOSE_SECRETS["GRAFANA_ADMIN_PASSWORD"]
    for name, svc in resolved["services"].items():
        values = {k: str(v) for k, v in svc.get("environment", {}).items()}
        holds = [k for k, v in values.items() if REDIS_PASSWORD in v]
        if name == "redis":
            assert holds == ["REDIS_PASSWORD"]
        elif name in BUS_USERS:
            assert holds == ["MAPO__BUS__URL"], name
        else:
            assert holds == [], name
        if name != "grafana":
            assert "GF_SECURITY_ADMIN_PASSWORD" not in values, name


def test_inference_mounts_the_weight_store_read_only(raw: dict[str, Any]) -> None:
    for name in ("inference-cpu", "inference-gpu"):
        assert raw["services"][name]["volumes"] == ["weights:/data:ro"], name
    for name in ("model", "trainer-cpu", "trainer-gpu"):
        assert raw["services"][name]["volumes"] == ["weights:/data"], name  # they write it


def test_make_secrets_writes_once_and_compose_accepts_them(tmp_path: Path) -> None:
    """deploy/make-secrets.sh: both files, owner-only, URL-safe values, kept when run again."""
    (tmp_path / "deploy" / "k8s" / "base" / "secrets").mkdir(parents=True)
    script = tmp_path / "deploy" / "make-secrets.sh"
    script.write_bytes((DEPLOY / "make-secrets.sh").read_bytes())
    dotenv, k8s = tmp_path / ".env", tmp_path / "deploy" / "k8s" / "base" / "secrets" / "redis.env"
    out = run(["sh", str(script)], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    values = dict(line.split("=", 1) for line in dotenv.read_text().splitlines())
    assert set(values) == set(SECRET_VARIABLES)
    for name in SECRET_VARIABLES:
        assert re.fullmatch(r"[0-9a-f]{48}", values[name]), name
    assert values["REDIS_PASSWORD"] != values["GRAFANA_ADMIN_PASSWORD"]
    assert re.fullmatch(r"password=[0-9a-f]{48}\n", k8s.read_text())
    for path in (dotenv, k8s):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    # Run again, with a line of the user's own in .env: nothing replaced, nothing lost.
    with dotenv.open("a") as f:
        f.write("MAPO_TRAINER_GPUS=1,2\n")
    first = dotenv.read_text(), k8s.read_text()
    assert run(["sh", str(script)], cwd=tmp_path).returncode == 0
    assert run(["sh", str(script), "k8s"], cwd=tmp_path).returncode == 0
    assert (dotenv.read_text(), k8s.read_text()) == first
    assert run(["sh", str(script), "nonsense"], cwd=tmp_path).returncode == 2
    # Compose resolves with that .env alone (no secret in the environment).
    env = compose_env(**dict.fromkeys(SECRET_VARIABLES))
    out = run(
        [binary("docker-compose"), "--env-file", str(dotenv), "-f", str(COMPOSE), "config"],
        env=env,
    )
    assert out.returncode == 0, out.stderr
    trainer = yaml.safe_load(out.stdout)["services"]["trainer-cpu"]["environment"]
    assert trainer["MAPO__BUS__URL"] == f"redis://:{values['REDIS_PASSWORD']}@redis:6379/0"


def test_compose_smoke_makes_its_own_secrets(tmp_path: Path) -> None:
    """The smoke run (deploy/smoke/compose_smoke.py) passes random secrets of its own, with
    which its real compose command line resolves."""
    import importlib.util

    binary("docker-compose")
    spec = importlib.util.spec_from_file_location("compose_smoke", SMOKE_SCRIPT)
    assert spec is not None and spec.loader is not None
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    stacks = [smoke.Stack(smoke.Engine(tmp_path), replicas=1) for _ in range(2)]
    for name in SECRET_VARIABLES:
        values = [s.env[name] for s in stacks]
        assert all(re.fullmatch(r"[0-9a-f]{48}", v) for v in values), name
        assert values[0] != values[1], name  # made per run
    out = stacks[0].compose("config")
    trainer = yaml.safe_load(out.stdout)["services"]["trainer-cpu"]["environment"]
    password = stacks[0].env["REDIS_PASSWORD"]
    assert trainer["MAPO__BUS__URL"] == f"redis://:{password}@redis:6379/0"
