"""Bring the docker-compose stack up for real, offline, check it end to end, tear it all down.

``make compose-smoke`` runs this. It needs root and Debian's apt (it installs ``docker.io``,
``debootstrap``, ``docker-compose`` and ``prometheus`` when missing) but no image registry:

1. starts a private Docker engine (own data root, exec root, socket and pid file; no iptables,
   no default bridge), so it never touches another engine on the machine;
2. builds a Debian bookworm base image with ``debootstrap`` (cached under
   ``$XDG_CACHE_HOME/mapo-rl/``) holding every OS package the Dockerfiles need, so that image
   builds run without network;
3. downloads the wheels of ``requirements/cpu.lock`` once (same cache) and lends them to the
   build through ``deploy/docker/wheels/`` (offline build: ``--no-index``);
4. builds the images with compose (plus a local Prometheus image from the host's binary);
5. brings up the CPU profile without Grafana (redis, reward, model, trainer, inference replicas,
   prometheus) with secrets made for this run only (docker-compose.yml has no defaults for
   them; a .env of the checkout is overridden), waits until every service is healthy, lets the
   trainer take a few steps through the real bus, checks that every replica serves the newest
   weight version, that Prometheus scrapes every target and that every Grafana dashboard
   expression returns data;
6. tears everything down in any case: containers, networks, volumes, the engine and its files.

Each phase prints its duration. Exit status 0 only when every check passed and nothing that the
run started is left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.test_deploy_tools import (  # noqa: E402  (after the path set-up)
    dashboard_expressions,
    substitute_grafana_variables,
)

SMOKE = REPO / "deploy" / "smoke"
WHEELS_DIR = REPO / "deploy" / "docker" / "wheels"
LOCK = REPO / "requirements" / "cpu.lock"
PROJECT = "mapo-smoke"
SUITE = "bookworm"
# Everything the Dockerfiles would otherwise apt-get: Python with headers and venv, the compiler
# torch's inductor calls, vLLM's runtime libraries, redis for the redis image, wget for the
# Prometheus healthcheck.
BASE_PACKAGES = (
    "python3,python3-venv,python3-pip,python3-dev,g++,libc6-dev,libgomp1,libnuma1,"
    "ca-certificates,redis-server,wget"
)
BASE_IMAGE = "mapo-smoke-base:bookworm"
PROMETHEUS_IMAGE = "mapo-smoke-prometheus:local"
BUILD_WHEELS = ("pip>=24", "setuptools==78.1.1", "wheel>=0.42")
APT_TOOLS = {  # command -> Debian package
    "dockerd": "docker.io",
    "docker": "docker.io",
    "debootstrap": "debootstrap",
    "docker-compose": "docker-compose",
    "prometheus": "prometheus",
}
SERVICES = ("redis", "reward", "model", "trainer-cpu", "inference-cpu", "prometheus")
# The work directory (the engine's data root included) is a tmpfs when this much memory is
# free: the images and containers take about 18 GiB there at the peak of the build (the image
# carries torch's regular build with its CUDA libraries, and the offline build copies their
# wheels in too; a tmpfs only holds what is written). With less memory they go to the disk.
TMPFS_MIN_FREE_GIB = 40.0
TMPFS_SIZE = "30g"
HOST_PORTS = {"prometheus": 9090, "reward metrics": 9091, "trainer metrics": 9092}


class SmokeError(RuntimeError):
    """A check failed; the message says which and why."""


def log(msg: str) -> None:
    print(f"[compose-smoke] {msg}", flush=True)


class Phases:
    """Wall-clock duration of each phase, printed as it ends and again at the end."""

    def __init__(self) -> None:
        self.done: list[tuple[str, float, str]] = []

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        log(f"{name} ...")
        outcome = "failed"
        try:
            yield
            outcome = "ok"
        finally:
            took = time.monotonic() - start
            self.done.append((name, took, outcome))
            log(f"{name}: {took:.1f} s ({outcome})")

    def summary(self) -> str:
        lines = [f"  {name:<22} {took:7.1f} s  {outcome}" for name, took, outcome in self.done]
        total = sum(took for _, took, _ in self.done)
        return "\n".join(["phase timings:", *lines, f"  {'total':<22} {total:7.1f} s"])


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    path = Path(base) / "mapo-rl"
    path.mkdir(parents=True, exist_ok=True)
    return path


def run(
    cmd: list[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    check: bool = True,
    quiet: bool = False,
    cwd: Path = REPO,
) -> subprocess.CompletedProcess[str]:
    """Run a command; its output is shown only when it fails (or always unless quiet)."""
    out = subprocess.run(
        cmd,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    if check and out.returncode != 0:
        tail = "\n".join((out.stdout + out.stderr).splitlines()[-40:])
        raise SmokeError(f"`{' '.join(cmd[:6])} ...` exited {out.returncode}:\n{tail}")
    if not quiet and out.returncode != 0:
        log(f"`{' '.join(cmd[:6])}` exited {out.returncode}: {out.stderr.strip()[-500:]}")
    return out


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode(errors="replace")
    except OSError:
        return 0, ""


def metric(text: str, name: str) -> float | None:
    """Value of an unlabelled series in Prometheus text format."""
    found = re.search(rf"^{re.escape(name)}(?:{{}})? ([-+0-9.eEinfNa]+)$", text, re.M)
    return float(found.group(1)) if found else None


# --- tools -------------------------------------------------------------------------------


def ensure_tools() -> None:
    """Install the Debian packages that provide the tools, when missing (root and apt only)."""
    missing = sorted({pkg for cmd, pkg in APT_TOOLS.items() if shutil.which(cmd) is None})
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SmokeError(
            f"missing {', '.join(missing)} and cannot install them (needs root and apt-get)"
        )
    log(f"installing {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-qq"], env=env)
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env)


def apt_mirror() -> str:
    """The Debian mirror apt already uses (debootstrap fetches the base system from it)."""
    if os.environ.get("MAPO_SMOKE_MIRROR"):
        return os.environ["MAPO_SMOKE_MIRROR"]
    sources = sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    for path in sources:
        text = path.read_text(errors="replace")
        for stanza in text.split("\n\n"):
            if re.search(rf"^Suites:.*\b{SUITE}\b", stanza, re.M) and "security" not in stanza:
                uri = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
                if uri:
                    return uri.group(1)
    with contextlib.suppress(OSError):
        for line in Path("/etc/apt/sources.list").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and parts[2] == SUITE:
                return next(p for p in parts[1:] if not p.startswith("["))
    return "http://deb.debian.org/debian"


# --- the private engine ------------------------------------------------------------------


class Engine:
    """A dockerd of our own: own paths and socket, stopped by its pid file."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.data_root = workdir / "data"
        self.exec_root = workdir / "exec"
        self.pidfile = workdir / "dockerd.pid"
        self.sock = workdir / "docker.sock"
        self.logfile = workdir / "dockerd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = {
            **os.environ,
            "DOCKER_HOST": f"unix://{self.sock}",
            "DOCKER_CONFIG": str(workdir / "client"),  # no credential helpers or contexts
            "DOCKER_BUILDKIT": "0",
            "COMPOSE_DOCKER_CLI_BUILD": "0",
            "COMPOSE_PROJECT_NAME": PROJECT,
        }
        self.env.pop("DOCKER_CONTEXT", None)

    def start(self) -> None:
        if Path("/run/containerd/containerd.sock").exists():
            # dockerd would attach to that containerd instead of starting its own.
            raise SmokeError("a system containerd runs (/run/containerd/containerd.sock)")
        (self.workdir / "client").mkdir()
        config = self.workdir / "daemon.json"
        config.write_text("{}\n")  # not /etc/docker/daemon.json: nothing of another engine
        cmd = [
            shutil.which("dockerd") or "dockerd",
            f"--config-file={config}",
            "--iptables=false",
            "--ip6tables=false",
            "--bridge=none",
            f"--data-root={self.data_root}",
            f"--exec-root={self.exec_root}",
            f"--pidfile={self.pidfile}",
            f"--host=unix://{self.sock}",
        ]
        with self.logfile.open("wb") as out:
            self.proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SmokeError(
                    f"dockerd exited ({self.proc.returncode}); does this machine allow it "
                    f"(root, cgroups, overlayfs)?\n{self.log_tail()}"
                )
            if (
                self.sock.exists()
                and run(["docker", "version"], env=self.env, check=False, quiet=True).returncode
                == 0
            ):
                return
            time.sleep(0.5)
        raise SmokeError(f"dockerd did not answer within 90 s:\n{self.log_tail()}")

    def log_tail(self, n: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-n:])
        return ""

    def docker(
        self,
        *args: str,
        timeout: float = 600,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        return run(["docker", *args], env=self.env, timeout=timeout, check=check)

    def stop(self) -> None:
        """SIGTERM by the pid file (dockerd stops its containers and containerd), then wait."""
        pid = None
        with contextlib.suppress(OSError, ValueError):
            pid = int(self.pidfile.read_text().strip())
        if pid is None and self.proc is not None and self.proc.poll() is None:
            pid = self.proc.pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 60
            while _alive(pid) and time.monotonic() < deadline:
                if self.proc is not None and self.proc.pid == pid:
                    self.proc.poll()  # reap our child
                time.sleep(0.2)
            if _alive(pid):
                log(f"dockerd {pid} ignored SIGTERM for 60 s: SIGKILL")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)


def _mem_available_gib() -> float:
    with contextlib.suppress(OSError, StopIteration, ValueError):
        line = next(
            ln
            for ln in Path("/proc/meminfo").read_text().splitlines()
            if ln.startswith("MemAvailable:")
        )
        return int(line.split()[1]) / 2**20
    return 0.0


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def leftover_processes(marker: str) -> list[tuple[int, str]]:
    """Processes whose command line names our work directory (dockerd, containerd, shims)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if marker in cmdline and _alive(int(entry.name)):
                found.append((int(entry.name), cmdline.strip()))
    return found


def leftover_mounts(marker: str) -> list[str]:
    with contextlib.suppress(OSError):
        return [
            line.split()[1]
            for line in Path("/proc/self/mounts").read_text().splitlines()
            if marker in line.split()[1]
        ]
    return []


# --- images --------------------------------------------------------------------------------


def base_image(engine: Engine) -> None:
    """Import the debootstrap base image, building and caching its tarball when needed."""
    mirror = apt_mirror()
    key = hashlib.sha256(f"{SUITE} {mirror} {BASE_PACKAGES}".encode()).hexdigest()[:12]
    tarball = cache_dir() / f"base-{SUITE}-{key}.tar.gz"
    if not tarball.exists():
        rootfs = engine.workdir / "rootfs"
        log(f"debootstrap {SUITE} from {mirror} (cached afterwards in {tarball})")
        run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={BASE_PACKAGES}",
                SUITE,
                str(rootfs),
                mirror,
            ],
            timeout=1200,
        )
        for sub in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for item in (rootfs / sub).glob("*"):
                if item.is_file():
                    item.unlink()
        partial = tarball.with_suffix(".partial")
        run(["sh", "-c", f"tar -C '{rootfs}' -c . | gzip -1 > '{partial}'"], timeout=600)
        partial.rename(tarball)
        shutil.rmtree(rootfs)
    engine.docker("import", str(tarball), BASE_IMAGE)


def _wheel_present(folder: Path, name: str, version: str) -> bool:
    stem = re.sub(r"[-_.]+", "_", name).lower()
    return any(
        p.name.lower().startswith(f"{stem}-{version.lower()}-") for p in folder.glob("*.whl")
    )


def wheels(made: list[Path]) -> None:
    """Every wheel of the lock (and pip's own) in the cache; linked into deploy/docker/wheels/.

    Appends each link to `made` as it is created, so that teardown removes them all again.
    """
    cache = cache_dir() / "wheels"
    cache.mkdir(exist_ok=True)
    pins = []
    for line in LOCK.read_text().splitlines():
        if " @ " in line:  # a pin by URL: its wheel's file name says name and version
            name, url = line.split(" @ ", 1)
            version = url.split("#", 1)[0].rsplit("/", 1)[-1].split("-")[1]
            if not _wheel_present(cache, name.strip(), version):
                pins.append(line.strip())
            continue
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            if not _wheel_present(cache, name, version):
                pins.append(line)
    pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(cache)]
    if os.environ.get("MAPO_SMOKE_EXTRA_INDEX_URL"):
        pip += ["--extra-index-url", os.environ["MAPO_SMOKE_EXTRA_INDEX_URL"]]
    if pins:
        log(f"downloading {len(pins)} wheels into {cache}")
        run([*pip, *pins], timeout=1200)
    if not any(cache.glob("pip-*.whl")) or not any(cache.glob("setuptools-78.1.1-*.whl")):
        run([*pip, *BUILD_WHEELS], timeout=600)
    for whl in sorted(cache.glob("*.whl")):
        target = WHEELS_DIR / whl.name
        if target.exists():
            continue
        made.append(target)
        try:
            os.link(whl, target)
        except OSError:
            shutil.copy2(whl, target)


def prometheus_image(engine: Engine) -> None:
    context = engine.workdir / "prometheus-context"
    context.mkdir()
    shutil.copy2(shutil.which("prometheus") or "/usr/bin/prometheus", context / "prometheus")
    engine.docker(
        "build",
        "-q",
        "--network=none",
        "--build-arg",
        f"BASE_IMAGE={BASE_IMAGE}",
        "-f",
        str(SMOKE / "Dockerfile.prometheus"),
        "-t",
        PROMETHEUS_IMAGE,
        str(context),
    )


# --- the stack -----------------------------------------------------------------------------


class Stack:
    def __init__(self, engine: Engine, replicas: int) -> None:
        self.engine = engine
        self.replicas = replicas
        self.env = {
            **engine.env,
            "MAPO_BASE_IMAGE": BASE_IMAGE,
            "MAPO_REDIS_BASE_IMAGE": BASE_IMAGE,
            "MAPO_BUILD_NETWORK": "none",
            "MAPO_OFFLINE_BUILD": "1",
            "MAPO_PROMETHEUS_IMAGE": PROMETHEUS_IMAGE,
            # No secret has a default: this run makes its own, used by no other stack.
            "REDIS_PASSWORD": secrets.token_hex(24),
            "GRAFANA_ADMIN_PASSWORD": secrets.token_hex(24),
            "WEIGHTS_ANNOUNCE_SECRET": secrets.token_hex(24),
        }

    def compose(
        self,
        *args: str,
        timeout: float = 900,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        return run(
            [
                "docker-compose",
                "-p",
                PROJECT,
                "-f",
                str(REPO / "docker-compose.yml"),
                "-f",
                str(SMOKE / "compose.smoke.yml"),
                "--profile",
                "cpu",
                *args,
            ],
            env=self.env,
            timeout=timeout,
            check=check,
        )

    def build(self) -> None:
        # redis, and the one mapo-rl:cpu image that reward, model, trainer and inference share.
        self.compose("build", "redis", "reward", timeout=1800)

    def up(self) -> None:
        busy = [f"{what} 127.0.0.1:{port}" for what, port in HOST_PORTS.items() if _busy(port)]
        free = [p for p in range(8000, 8008) if not _busy(p)]
        if busy or len(free) < self.replicas:
            raise SmokeError(f"host ports taken: {busy or 'too many of 8000-8007'}")
        self.compose(
            "up", "-d", "--no-build", "--scale", f"inference-cpu={self.replicas}", *SERVICES
        )

    def containers(self) -> dict[str, dict[str, Any]]:
        ids = self.compose("ps", "-q").stdout.split()
        if not ids:
            return {}
        info = json.loads(self.engine.docker("inspect", *ids).stdout)
        return {c["Name"].lstrip("/"): c for c in info}

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            states = {}
            for name, c in self.containers().items():
                st = c["State"]
                if name.startswith(f"{PROJECT}_model_"):
                    if st["Status"] == "exited" and st["ExitCode"] != 0:
                        raise SmokeError(f"{name} exited {st['ExitCode']}")
                    states[name] = "done" if st["Status"] == "exited" else st["Status"]
                elif st["Status"] != "running":
                    raise SmokeError(f"{name} is {st['Status']} (exit {st['ExitCode']})")
                else:
                    states[name] = st.get("Health", {}).get("Status", "running")
                    if states[name] == "unhealthy":
                        raise SmokeError(f"{name} is unhealthy: {st['Health']['Log'][-1:]}")
            expected = len(SERVICES) - 1 + self.replicas
            if len(states) == expected and all(s in ("healthy", "done") for s in states.values()):
                log("healthy: " + ", ".join(sorted(states)))
                return
            if time.monotonic() > deadline:
                raise SmokeError(f"not healthy after {timeout:.0f} s: {states}")
            time.sleep(2)

    def replica_urls(self) -> list[str]:
        urls = []
        for i in range(1, self.replicas + 1):
            out = self.compose("port", f"--index={i}", "inference-cpu", "8000").stdout.strip()
            urls.append(f"http://{out.replace('0.0.0.0', '127.0.0.1')}")
        return urls

    def logs(self) -> str:
        return self.compose("logs", "--no-color", "--tail=25", check=False).stdout


def _busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_steps(steps: int, timeout: float) -> int:
    """Wait for `steps` more optimiser steps (with every service healthy).

    Returns the weight version the trainer has published by then.
    """
    deadline = time.monotonic() + timeout
    first = last = None
    while time.monotonic() < deadline:
        status, text = http_get("http://127.0.0.1:9092/metrics")
        step = metric(text, "mapo_trainer_step") if status == 200 else None
        version = metric(text, "mapo_trainer_weight_version") if status == 200 else None
        if step is not None:
            first = step if first is None else first
            if step != last:
                log(f"trainer step {step:.0f}, published version {version}")
                last = step
            if step >= first + steps and version is not None and version >= 1:
                return int(version)
        time.sleep(0.5)
    raise SmokeError(f"the trainer did not take {steps} steps within {timeout:.0f} s")


def wait_versions(urls: list[str], version: int, timeout: float) -> None:
    """Every replica serves `version` or newer, and is ready."""
    deadline = time.monotonic() + timeout
    seen: dict[str, float | None] = {}
    while time.monotonic() < deadline:
        for url in urls:
            status, text = http_get(f"{url}/metrics")
            seen[url] = metric(text, "mapo_inference_weight_version") if status == 200 else None
        if all(v is not None and v >= version for v in seen.values()) and all(
            http_get(f"{url}/ready", timeout=15)[0] == 200 for url in urls
        ):
            log(f"replicas serve versions {seen} (trainer published {version})")
            return
        time.sleep(1)
    raise SmokeError(f"replicas do not serve version {version}: {seen}")


def prom_api(path: str, **params: str) -> Any:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    status, body = http_get(f"http://127.0.0.1:9090/api/v1/{path}{query}", timeout=10)
    if status != 200:
        raise SmokeError(f"prometheus /api/v1/{path} answered {status}: {body[:300]}")
    return json.loads(body)["data"]


def check_prometheus(replicas: int, timeout: float) -> None:
    """Every target up (each replica found through DNS); every dashboard expression has data."""
    want = {"reward": 1, "inference": replicas, "trainer": 1, "prometheus": 1}
    deadline = time.monotonic() + timeout
    while True:
        active = prom_api("targets")["activeTargets"]
        jobs: dict[str, int] = {}
        for t in active:
            if t["health"] == "up":
                jobs[t["labels"]["job"]] = jobs.get(t["labels"]["job"], 0) + 1
        if jobs == want:
            log(f"targets up: {jobs}")
            break
        if time.monotonic() > deadline:
            raise SmokeError(
                f"targets: want {want} up, have {[(t['scrapeUrl'], t['health'], t['lastError']) for t in active]}"
            )
        time.sleep(2)
    pending = {
        f"{board}: {title}: {expr}": substitute_grafana_variables(expr)
        for board, title, expr in dashboard_expressions()
    }
    total = len(dashboard_expressions())
    while pending:
        for label, expr in list(pending.items()):
            if prom_api("query", query=expr)["result"]:
                del pending[label]
        if not pending:
            break
        if time.monotonic() > deadline:
            raise SmokeError(
                f"{len(pending)} of {total} dashboard expressions return no data:\n  "
                + "\n  ".join(pending)
            )
        time.sleep(3)
    log(f"all {total} dashboard expressions return data")
    bad = [
        (r["name"], r.get("lastError"))
        for g in prom_api("rules")["groups"]
        for r in g["rules"]
        if r.get("health") == "err"
    ]
    if bad:
        raise SmokeError(f"alert rules fail to evaluate: {bad}")


# --- main ----------------------------------------------------------------------------------


def teardown(engine: Engine, stack: Stack | None, linked: list[Path], phases: Phases) -> bool:
    """Remove everything the run made; True when nothing of it is left."""
    clean = True
    with phases("teardown"):
        if stack is not None and engine.sock.exists():
            out = stack.compose(
                "down", "-v", "--remove-orphans", "--timeout", "20", timeout=300, check=False
            )
            clean &= out.returncode == 0
        engine.stop()
        marker = str(engine.workdir)
        for _ in range(50):
            if not leftover_processes(marker):
                break
            time.sleep(0.2)
        for pid, cmd in leftover_processes(marker):
            log(f"left running after dockerd stopped, killing: {pid} {cmd[:120]}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            clean = False
        for mount in sorted(leftover_mounts(marker), key=len, reverse=True):
            if mount == marker:
                continue  # the work directory's own tmpfs, unmounted below
            log(f"left mounted, unmounting: {mount}")
            run(["umount", "-l", mount], check=False)
            clean = False
        if marker in leftover_mounts(marker):
            run(["umount", marker], check=False)
        shutil.rmtree(engine.workdir, ignore_errors=True)
        for path in linked:
            with contextlib.suppress(OSError):
                path.unlink()
        if engine.workdir.exists() or leftover_processes(marker) or leftover_mounts(marker):
            log(f"could not remove everything under {engine.workdir}")
            clean = False
    return clean


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="trainer steps to wait for")
    parser.add_argument("--replicas", type=int, default=2, help="inference replicas (1-8)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per waiting phase")
    args = parser.parse_args(argv)

    phases = Phases()
    workdir = Path(tempfile.mkdtemp(prefix="mapo-smoke-", dir="/tmp"))
    engine = Engine(workdir)
    stack: Stack | None = None
    linked: list[Path] = []
    ok = False

    def on_signal(signum: int, _frame: Any) -> None:
        raise SmokeError(f"interrupted by signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    try:
        with phases("tools"):
            ensure_tools()
        with phases("engine start"):
            if _mem_available_gib() >= TMPFS_MIN_FREE_GIB:
                # Images, containers and scratch files in memory: faster builds, and teardown
                # is one unmount (deleting gigabytes of layers from a disk mounted with
                # discard takes minutes).
                opts = f"size={TMPFS_SIZE},mode=0711"
                run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(workdir)])
            engine.start()
        with phases("base image"):
            base_image(engine)
        with phases("wheels"):
            wheels(linked)
        stack = Stack(engine, args.replicas)
        with phases("build"):
            stack.build()
            prometheus_image(engine)
        with phases("up"):
            stack.up()
        with phases("healthy"):
            stack.wait_healthy(args.timeout)
        with phases("trainer steps"):
            version = wait_steps(args.steps, args.timeout)
        with phases("version check"):
            wait_versions(stack.replica_urls(), version, args.timeout)
        with phases("prometheus checks"):
            check_prometheus(args.replicas, args.timeout)
        ok = True
    except (SmokeError, subprocess.TimeoutExpired, KeyboardInterrupt) as exc:
        log(f"FAILED: {exc}")
        if stack is not None and engine.sock.exists():
            print(stack.logs()[-12000:], flush=True)
        elif engine.proc is not None:
            print(engine.log_tail(), flush=True)
    finally:
        clean = teardown(engine, stack, linked, phases)
        print(phases.summary(), flush=True)
    if not clean:
        log("FAILED: something the run started was left behind (see above)")
    log("passed" if ok and clean else "failed")
    return 0 if ok and clean else 1


if __name__ == "__main__":
    sys.exit(main())
