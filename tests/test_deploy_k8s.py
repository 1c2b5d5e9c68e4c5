"""deploy/k8s: every overlay rendered by ``kubectl kustomize`` and validated.

Built-in kinds are validated with ``kubernetes-validate --strict`` (offline OpenAPI schemas; an
unknown field is an error) against the oldest and newest Kubernetes versions the manifests
target. KEDA's ScaledObject and TriggerAuthentication are custom resources without schemas in
that tool: they are validated against the schema below, written from KEDA's CRDs
(keda.sh/v1alpha1, KEDA 2.10+) for the fields this deployment may use, plus the redis-streams
scaler's documented parameters. The multi-node overlay's JobSet is validated against JobSet's own
CRD schema (tests/fixtures/jobset_crd_schemas.json, the oldest and newest JobSet it targets, with
unknown fields rejected as kubectl's strict field validation does) and its Job template as a
batch/v1 Job by kubernetes-validate. The rendered objects are then checked against each other and
against the services: probes on the ports the commands bind, Services and PDBs that select the
pods, Secret references, the run config, and the commands parsed by the real ``mapo`` parser.

No secret has a default: the base's secretGenerator reads ``base/secrets/redis.env``, which a
user makes (deploy/make-secrets.sh). The checks render a copy of deploy/k8s in a temporary
directory holding a throwaway password instead (``k8s_copy``), never a developer's own file.
NetworkPolicies are checked by evaluating them, pod to pod and port by port, as the API defines
them; every container's resources, security context and mounts are checked too.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.cli import build_parser
from services.core.config import BusConfig, build_config, load_config
from services.transport.names import INFERENCE_GROUP
from tests.test_deploy_tools import (
    K8S,
    K8S_ANNOUNCE_SECRET,
    K8S_REDIS_PASSWORD,
    K8S_SECRET_FILE,
    K8S_WEIGHTS_SECRET_FILE,
    OVERLAYS,
    PROMETHEUS_DIR,
    binary,
    k8s_copy,
    metric_names,
    run,
    venv_tool,
)

K8S_VERSIONS = ("1.30.0", "1.37.0")
NAMESPACE = "mapo"
MULTINODE = "multinode"  # the GPU overlay with the trainer as a JobSet over several nodes
JOBSET_SCHEMAS = Path(__file__).parent / "fixtures" / "jobset_crd_schemas.json"

_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_INT = {"type": "integer"}
_OBJ = {"type": "object"}

SCALED_OBJECT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {
            "type": "object",
            "required": ["name", "namespace"],
            "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}},
        },
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "name": {"type": "string"},
                        "envSourceContainerName": {"type": "string"},
                    },
                },
                "pollingInterval": _INT,
                "cooldownPeriod": _INT,
                "initialCooldownPeriod": _INT,
                "idleReplicaCount": _INT,
                "minReplicaCount": _INT,
                "maxReplicaCount": _INT,
                "fallback": {
                    "type": "object",
                    "required": ["failureThreshold", "replicas"],
                    "properties": {"failureThreshold": _INT, "replicas": _INT},
                },
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "scalingModifiers": _OBJ,
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {"name": {"type": "string"}, "behavior": _OBJ},
                        },
                    },
                },
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "additionalProperties": False,
                        "properties": {
                            "type": {"type": "string"},
                            "name": {"type": "string"},
                            # KEDA's CRD: metadata values are strings (a bare 16 is rejected).
                            "metadata": _STR_MAP,
                            "metricType": {"enum": ["Value", "AverageValue", "Utilization"]},
                            "useCachedMetrics": {"type": "boolean"},
                            "authenticationRef": {
                                "type": "object",
                                "required": ["name"],
                                "additionalProperties": False,
                                "properties": {
                                    "name": {"type": "string"},
                                    "kind": {
                                        "enum": [
                                            "TriggerAuthentication",
                                            "ClusterTriggerAuthentication",
                                        ]
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}

TRIGGER_AUTH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "TriggerAuthentication"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "minProperties": 1,
            "properties": {
                "secretTargetRef": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["parameter", "name", "key"],
                        "additionalProperties": False,
                        "properties": {
                            "parameter": {"type": "string"},
                            "name": {"type": "string"},
                            "key": {"type": "string"},
                        },
                    },
                },
                "env": {"type": "array"},
                "configMapTargetRef": {"type": "array"},
                "podIdentity": _OBJ,
                "hashiCorpVault": _OBJ,
                "azureKeyVault": _OBJ,
                "awsSecretManager": _OBJ,
                "gcpSecretManager": _OBJ,
            },
        },
    },
}

# The redis-streams scaler's parameters (KEDA docs, "Redis Streams" scaler).
REDIS_STREAMS_PARAMETERS = {
    "address", "host", "port", "addressFromEnv", "hostFromEnv", "portFromEnv",
    "usernameFromEnv", "passwordFromEnv", "stream", "consumerGroup", "pendingEntriesCount",
    "streamLength", "lagCount", "activationLagCount", "activationStreamLength",
    "enableTLS", "unsafeSsl", "databaseIndex",
}  # fmt: skip
KEDA_KINDS = {"ScaledObject": SCALED_OBJECT_SCHEMA, "TriggerAuthentication": TRIGGER_AUTH_SCHEMA}


def kustomize(path: Path) -> list[dict[str, Any]]:
    out = run([binary("kubectl"), "kustomize", str(path)])
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


_RENDERED: dict[str, list[dict[str, Any]]] = {}
_COPY: list[tempfile.TemporaryDirectory[str]] = []


def k8s_root() -> Path:
    """deploy/k8s, copied once for this session with a throwaway Redis password."""
    if not _COPY:
        _COPY.append(tempfile.TemporaryDirectory(prefix="mapo-k8s-"))
        k8s_copy(Path(_COPY[0].name) / "k8s")
    return Path(_COPY[0].name) / "k8s"


def rendered(overlay: str) -> list[dict[str, Any]]:
    if overlay not in _RENDERED:
        root = k8s_root()
        path = root / "base" if overlay == "base" else root / "overlays" / overlay
        _RENDERED[overlay] = kustomize(path)
    return _RENDERED[overlay]


def secret_data(secret: dict[str, Any]) -> dict[str, str]:
    """A Secret's values, decoded (kustomize's generator writes base64 ``data``)."""
    data = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
    return {**data, **secret.get("stringData", {})}


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = find(docs, kind, name)
    return doc


def container(deploy: dict[str, Any], name: str) -> dict[str, Any]:
    (c,) = [c for c in deploy["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return c


def port_number(c: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (p,) = [p["containerPort"] for p in c.get("ports", []) if p["name"] == port]
    return int(p)


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def run_config(
    docs: list[dict[str, Any]], tmp_path: Path, env: dict[str, str] | None = None
) -> Any:
    (cm,) = [d for d in find(docs, "ConfigMap") if d["metadata"]["name"].startswith("mapo-run")]
    path = tmp_path / "run.toml"
    path.write_text(cm["data"]["run.toml"])
    return load_config(path, environ=env or {})


def literal_env(c: dict[str, Any]) -> dict[str, str]:
    """The container's env with $(VAR) references filled with placeholders, as kubelet would."""
    env: dict[str, str] = {}
    for e in c.get("env", []):
        value = e.get("value", "secret-value" if "valueFrom" in e else "")
        env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), value)
    return env


# --- Rendering and schema validation ------------------------------------------------------


@pytest.mark.parametrize("overlay", ["base", *OVERLAYS, MULTINODE])
def test_kustomize_renders(overlay: str) -> None:
    docs = rendered(overlay)
    assert docs
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == NAMESPACE, d["metadata"]["name"]
        assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "mapo-rl"


def jobs_of(jobset: dict[str, Any]) -> list[dict[str, Any]]:
    """The batch/v1 Jobs a JobSet creates, as JobSet names them (job index 0)."""
    name, meta = jobset["metadata"]["name"], jobset["metadata"]
    return [
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {
                "name": f"{name}-{rj['name']}-0",
                "namespace": meta["namespace"],
                **(
                    {"labels": rj["template"]["metadata"]["labels"]}
                    if "metadata" in rj["template"]
                    else {}
                ),
            },
            "spec": rj["template"]["spec"],
        }
        for rj in jobset["spec"]["replicatedJobs"]
    ]


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", [*OVERLAYS, MULTINODE])
def test_builtin_kinds_validate_strictly(overlay: str, k8s_version: str, tmp_path: Path) -> None:
    """Every built-in object, and the Job template of every JobSet, under --strict."""
    docs = [d for d in rendered(overlay) if d["kind"] not in KEDA_KINDS and d["kind"] != "JobSet"]
    docs += [job for js in find(rendered(overlay), "JobSet") for job in jobs_of(js)]
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    out = run([venv_tool("kubernetes-validate"), "--strict", "-k", k8s_version, str(path)])
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "WARN" not in text and "ERROR" not in text, text  # every kind had a schema
    assert text.count("passed for resource") == len(docs), text


def test_strict_validation_is_real(tmp_path: Path) -> None:
    """An unknown field in a Deployment fails kubernetes-validate --strict."""
    docs = rendered("cpu")
    bad = [dict(d) for d in docs if d["kind"] == "Deployment"][:1]
    bad[0]["spec"] = {**bad[0]["spec"], "replicaz": 2}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump_all(bad))
    out = run([venv_tool("kubernetes-validate"), "--strict", "-k", K8S_VERSIONS[0], str(path)])
    assert out.returncode != 0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keda_objects_match_the_crd_schema(overlay: str) -> None:
    import jsonschema

    for d in rendered(overlay):
        if d["kind"] in KEDA_KINDS:
            jsonschema.validate(d, KEDA_KINDS[d["kind"]])


def test_keda_schema_rejects_a_numeric_metadata_value() -> None:
    import jsonschema

    so = one(rendered("cpu"), "ScaledObject", "inference")
    bad = yaml.safe_load(yaml.safe_dump(so))
    bad["spec"]["triggers"][0]["metadata"]["lagCount"] = 16
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, SCALED_OBJECT_SCHEMA)


# --- Autoscaling -----------------------------------------------------------------------


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_keda_scales_inference_on_prompts_lag(overlay: str, tmp_path: Path) -> None:
    docs = rendered(overlay)
    assert not find(docs, "HorizontalPodAutoscaler")
    so = one(docs, "ScaledObject", "inference")
    target = so["spec"]["scaleTargetRef"]
    assert (target.get("kind", "Deployment"), target["name"]) == ("Deployment", "inference")
    deploy = one(docs, "Deployment", target["name"])
    assert so["spec"]["minReplicaCount"] >= 1
    assert so["spec"]["maxReplicaCount"] > so["spec"]["minReplicaCount"]
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "redis-streams"
    meta = trigger["metadata"]
    assert set(meta) <= REDIS_STREAMS_PARAMETERS, set(meta) - REDIS_STREAMS_PARAMETERS
    config = run_config(docs, tmp_path)
    assert meta["stream"] == config.bus.prompts_stream == BusConfig().prompts_stream
    assert meta["consumerGroup"] == INFERENCE_GROUP
    assert int(meta["lagCount"]) > 0 and "activationLagCount" in meta
    assert "pendingEntriesCount" not in meta and "streamLength" not in meta
    # addressFromEnv names a variable of the scale target holding host:port of the Redis Service.
    env = literal_env(container(deploy, "inference"))
    host, port = env[meta["addressFromEnv"]].split(":")
    svc = one(docs, "Service", host)
    assert int(port) in [p["port"] for p in svc["spec"]["ports"]]
    # The password comes from the Secret the services use, through a TriggerAuthentication.
    auth = one(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    (ref,) = auth["spec"]["secretTargetRef"]
    assert ref["parameter"] == "password"
    secret = one(docs, "Secret", ref["name"])
    assert ref["key"] in secret_data(secret)
    # ...and the same Redis and password the replicas use for the bus.
    assert env["MAPO__BUS__URL"].startswith(f"redis://:secret-value@{host}:{port}/")


def test_hpa_overlay_scales_without_keda() -> None:
    docs = rendered("hpa")
    assert not find(docs, "ScaledObject") and not find(docs, "TriggerAuthentication")
    hpa = one(docs, "HorizontalPodAutoscaler", "inference")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "inference",
    }
    kinds = {m["type"] for m in hpa["spec"]["metrics"]}
    assert kinds == {"External", "Resource"}
    (external,) = [m["external"] for m in hpa["spec"]["metrics"] if m["type"] == "External"]
    # The adapter rule that serves this external metric, with valid PromQL on catalogued series.
    rules = yaml.safe_load((K8S / "components/hpa/prometheus-adapter.yaml").read_text())
    (rule,) = [r for r in rules["externalRules"] if r["name"]["as"] == external["metric"]["name"]]
    assert metric_names(rule["metricsQuery"]) == {"mapo_bus_lag"}
    assert f'stream="{BusConfig().prompts_stream}"' in rule["metricsQuery"]
    assert f'group="{INFERENCE_GROUP}"' in rule["metricsQuery"]
    # CPU utilisation needs CPU requests on the target.
    deploy = one(docs, "Deployment", "inference")
    assert container(deploy, "inference")["resources"]["requests"]["cpu"]


def shm_is_memory(pod: dict[str, Any], c: dict[str, Any]) -> bool:
    """/dev/shm is a memory-backed emptyDir (NCCL's intra-node buffers; 64 MiB by default)."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    return bool(volumes[mount["name"]]["emptyDir"]["medium"] == "Memory")


def test_gpu_overlay_requests_gpus(tmp_path: Path) -> None:
    """One GPU per replica; the trainer on every GPU of a node, one rank each."""
    docs = rendered("gpu")
    inference = container(one(docs, "Deployment", "inference"), "inference")
    assert inference["resources"]["limits"]["nvidia.com/gpu"] == "1"
    deploy = one(docs, "Deployment", "trainer")
    trainer = container(deploy, "trainer")
    gpus = int(trainer["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus > 1
    for c in (inference, trainer):
        assert c["image"].endswith(":cuda")
    env = literal_env(trainer)
    assert env["MAPO__TRAINER__DEVICE"] == "cuda"
    assert int(env["MAPO__TRAINER__NPROC"]) == gpus
    assert run_config(docs, tmp_path, env).trainer.nproc == gpus
    assert shm_is_memory(deploy["spec"]["template"]["spec"], trainer)
    for overlay in ("cpu", "hpa"):
        text = yaml.safe_dump_all(rendered(overlay))
        assert "nvidia.com/gpu" not in text and ":cuda" not in text
        assert "NPROC" not in text  # one rank on the CPU


# --- Probes, ports, Services, PDBs, Secrets, config -------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_inference_probes(overlay: str) -> None:
    c = container(one(rendered(overlay), "Deployment", "inference"), "inference")
    port = int(flag(c["args"], "--port"))
    for probe, path in (
        ("startupProbe", "/ready"),
        ("readinessProbe", "/ready"),
        ("livenessProbe", "/live"),
    ):
        get = c[probe]["httpGet"]
        assert get["path"] == path, probe
        assert port_number(c, get["port"]) == port, probe
    # /live waits up to inference.live_timeout_s: the probe must wait longer.
    assert c["livenessProbe"]["timeoutSeconds"] > build_config().inference.live_timeout_s
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # engine + model


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_reward_grpc_probes(overlay: str) -> None:
    c = container(one(rendered(overlay), "Deployment", "reward"), "reward")
    port = int(flag(c["args"], "--port"))
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        grpc_probe = c[probe]["grpc"]  # native probe: grpc.health.v1.Health/Check
        assert grpc_probe["port"] == port, probe
        assert grpc_probe.get("service", "") == ""


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_trainer_volume_and_probes(overlay: str, tmp_path: Path) -> None:
    docs = rendered(overlay)
    deploy = one(docs, "Deployment", "trainer")
    assert deploy["spec"]["replicas"] == 1
    assert deploy["spec"]["strategy"]["type"] == "Recreate"
    c = container(deploy, "trainer")
    config = run_config(docs, tmp_path, literal_env(c))
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/metrics"
        assert port_number(c, get["port"]) == config.trainer.metrics_port
    assert port_number(c, "weights") == config.trainer.weights_port
    # Reachable from the replicas, and announced under the Service's name.
    assert config.trainer.weights_host == "0.0.0.0"
    svc = one(docs, "Service", "trainer")
    assert config.trainer.weights_url == f"http://trainer:{svc['spec']['ports'][0]['port']}"
    assert "--resume" in c["args"]
    volumes = {v["name"]: v for v in deploy["spec"]["template"]["spec"]["volumes"]}
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/data"]
    claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
    assert find(docs, "PersistentVolumeClaim", claim)
    assert config.trainer.run_dir.startswith("/data/") and config.model.path.startswith("/data/")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_redis(overlay: str) -> None:
    docs = rendered(overlay)
    c = container(one(docs, "Deployment", "redis"), "redis")
    assert " ".join(c["args"]).count("--appendonly yes") == 1
    assert "$(REDIS_PASSWORD)" in c["args"]
    assert c["readinessProbe"]["exec"]["command"] == ["redis-cli", "ping"]
    assert "REDISCLI_AUTH" in {e["name"] for e in c["env"]}
    major = int(c["image"].split(":")[1].split(".")[0])
    assert major >= 7  # XINFO GROUPS lag, which the autoscaler reads


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_and_pdbs_select_pods(overlay: str) -> None:
    docs = rendered(overlay)
    pods = {d["metadata"]["name"]: d["spec"]["template"] for d in find(docs, "Deployment")}
    for deploy in find(docs, "Deployment"):
        selector = deploy["spec"]["selector"]["matchLabels"]
        assert selector.items() <= deploy["spec"]["template"]["metadata"]["labels"].items()
    for svc in find(docs, "Service"):
        matched = [
            name
            for name, tpl in pods.items()
            if svc["spec"]["selector"].items() <= tpl["metadata"]["labels"].items()
        ]
        assert len(matched) == 1, (svc["metadata"]["name"], matched)
        (c, *_) = pods[matched[0]]["spec"]["containers"]
        for port in svc["spec"]["ports"]:
            port_number(c, port["targetPort"])  # a named port the container declares
    pdbs = {d["metadata"]["name"]: d for d in find(docs, "PodDisruptionBudget")}
    assert set(pdbs) == {"inference", "reward"}
    for name, pdb in pdbs.items():
        labels = pods[name]["metadata"]["labels"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert (
        pdbs["reward"]["spec"]["minAvailable"]
        < one(docs, "Deployment", "reward")["spec"]["replicas"]
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secret_and_configmap_references(overlay: str) -> None:
    docs = rendered(overlay)
    secrets = {d["metadata"]["name"]: d for d in find(docs, "Secret")}
    configmaps = {d["metadata"]["name"] for d in find(docs, "ConfigMap")}
    for deploy in find(docs, "Deployment"):
        spec = deploy["spec"]["template"]["spec"]
        for c in spec["containers"] + spec.get("initContainers", []):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    secret = secrets[ref["name"]]
                    assert ref["key"] in secret_data(secret)
        for v in spec.get("volumes", []):
            if "configMap" in v:
                assert v["configMap"]["name"] in configmaps
    # The password never appears in a pod spec, only through the Secret.
    password = secret_data(secrets["mapo-redis"])["password"]
    assert password == K8S_REDIS_PASSWORD  # from the generator's file, no default
    for deploy in find(docs, "Deployment"):
        assert password not in yaml.safe_dump(deploy)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_run_config_and_commands(overlay: str, tmp_path: Path) -> None:
    """The ConfigMap is a valid run config under every container's env; args parse."""
    docs = rendered(overlay)
    parser = build_parser()
    for deploy in find(docs, "Deployment"):
        if deploy["metadata"]["name"] == "redis":
            continue
        spec = deploy["spec"]["template"]["spec"]
        for c in spec["containers"]:
            config = run_config(docs, tmp_path, literal_env(c))
            args = parser.parse_args(c["args"])
            assert args.config == "/etc/mapo/run.toml"
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert "/etc/mapo" in mounts
            if deploy["metadata"]["name"] in ("inference", "trainer"):  # the bus users
                assert config.bus.url.startswith("redis://:secret-value@redis:6379/")
        for c in spec.get("initContainers", []):
            m = re.search(r"exec mapo (.+)$", c["command"][-1])
            assert m, c["command"]
            parser.parse_args(m.group(1).split())
    inference = literal_env(container(one(docs, "Deployment", "inference"), "inference"))
    trainer = one(docs, "Service", "trainer")
    config = run_config(docs, tmp_path, inference)
    assert config.weights.store == f"http://trainer:{trainer['spec']['ports'][0]['port']}"
    reward_svc = one(docs, "Service", "reward")
    host, port = config.reward.address.split(":")
    assert host == "reward" and int(port) == reward_svc["spec"]["ports"][0]["port"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_k8s_config_finds_every_pod(overlay: str) -> None:
    """deploy/prometheus/prometheus-k8s.yml resolves headless Services of this deployment."""
    docs = rendered(overlay)
    prom = yaml.safe_load((PROMETHEUS_DIR / "prometheus-k8s.yml").read_text())
    for job in prom["scrape_configs"]:
        (sd,) = job["dns_sd_configs"]
        (name,) = sd["names"]
        svc_name, namespace = name.split(".")[:2]
        assert namespace == NAMESPACE
        svc = one(docs, "Service", svc_name)
        assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"]
        assert svc["metadata"]["labels"]["app.kubernetes.io/component"] == job["job_name"]
        assert sd["port"] in [p["port"] for p in svc["spec"]["ports"]]


# --- The multi-node trainer (JobSet) ------------------------------------------------------


def jobset_schema(version: str) -> dict[str, Any]:
    """JobSet's CRD schema with unknown fields rejected, as `kubectl apply` (strict) rejects them."""

    def strict(node: Any) -> Any:
        if isinstance(node, dict):
            node = {k: strict(v) for k, v in node.items()}
            open_ended = "additionalProperties" in node or node.get(
                "x-kubernetes-preserve-unknown-fields"
            )
            if "properties" in node and not open_ended:
                node["additionalProperties"] = False
            return node
        if isinstance(node, list):
            return [strict(v) for v in node]
        return node

    schema: dict[str, Any] = strict(json.loads(JOBSET_SCHEMAS.read_text())[version])
    return schema


def the_jobset(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The trainer JobSet and its only replicated job."""
    (js,) = find(docs, "JobSet")
    (rj,) = js["spec"]["replicatedJobs"]
    return js, rj


def pod_of(rj: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = rj["template"]["spec"]["template"]
    return pod


JOBSET_VERSIONS = ("v0.5.0", "v0.12.0")


@pytest.mark.parametrize("version", JOBSET_VERSIONS)
def test_jobset_matches_the_crd_schema(version: str) -> None:
    import jsonschema

    js, _ = the_jobset(rendered(MULTINODE))
    assert (js["apiVersion"], js["kind"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet")
    jsonschema.validate(js, jobset_schema(version))


def test_jobset_schema_is_real() -> None:
    """A misspelt field, or a wrong type, fails the schema."""
    import jsonschema

    js, _ = the_jobset(rendered(MULTINODE))
    for path, value in ((("spec", "failurePolicy", "maxRestart"), 3), (("spec", "suspend"), "no")):
        bad = json.loads(json.dumps(js))
        node = bad
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, jobset_schema(JOBSET_VERSIONS[0]))


def test_multinode_runs_the_trainer_as_a_jobset_of_gpu_nodes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One pod per node, every GPU of each: torchrun, all of whose arguments come from the
    PET_* variables (read by torch's own parser), starts the ranks of `mapo trainer run`."""
    docs = rendered(MULTINODE)
    assert not find(docs, "Deployment", "trainer")
    assert {d["metadata"]["name"] for d in find(docs, "Deployment")} == {
        "redis",
        "reward",
        "inference",
    }
    js, rj = the_jobset(docs)
    job = rj["template"]["spec"]
    pod = pod_of(rj)["spec"]
    (c,) = pod["containers"]
    env = literal_env(c)
    # What torchrun makes of the pod: its parser reads PET_<ARGUMENT> when the flag is absent.
    assert c["command"] == ["python", "-m", "torch.distributed.run"]
    from torch.distributed.run import get_args_parser

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PET_NODE_RANK", "1")  # the second pod's completion index
    torchrun = get_args_parser().parse_args(c["args"])
    # Nodes: one Indexed Job, one pod per node; the node rank is the pod's completion index.
    assert int(torchrun.nnodes) >= 2 and job["parallelism"] == job["completions"]
    assert int(torchrun.nnodes) == job["parallelism"] and torchrun.node_rank == 1
    assert rj.get("replicas", 1) == 1 and job["completionMode"] == "Indexed"
    rank = next(e for e in c["env"] if e["name"] == "PET_NODE_RANK")["valueFrom"]["fieldRef"]
    assert rank["fieldPath"] == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    # Rendezvous on node 0, by the DNS name JobSet gives it (static rendezvous, not standalone).
    assert torchrun.rdzv_backend == "static" and not torchrun.standalone
    network = js["spec"]["network"]
    assert network["enableDNSHostnames"] is True
    subdomain = network.get("subdomain", js["metadata"]["name"])
    assert torchrun.master_addr == f"{js['metadata']['name']}-{rj['name']}-0-0.{subdomain}"
    assert torchrun.master_port in [p["containerPort"] for p in c["ports"]]
    # GPUs: every GPU of the node, one rank each; NCCL gets a memory-backed /dev/shm.
    gpus = int(c["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus >= 1 and int(torchrun.nproc_per_node) == gpus
    assert shm_is_memory(pod, c)
    assert all(x["image"].endswith(":cuda") for x in pod["containers"] + pod["initContainers"])
    # Restarts: a failed pod fails its Job at once, and JobSet recreates every node together;
    # torchrun restarts nothing.
    assert job["backoffLimit"] == 0 and pod["restartPolicy"] == "Never"
    assert js["spec"]["failurePolicy"]["maxRestarts"] > 0
    assert torchrun.max_restarts == 0
    # Each rank: `mapo trainer run` on the run config, under the pod's environment.
    assert (torchrun.module, torchrun.training_script) == (True, "services.cli")
    args = build_parser().parse_args(torchrun.training_script_args)
    assert args.config == "/etc/mapo/run.toml" and args.resume
    config = run_config(docs, tmp_path, env)
    assert config.trainer.device == "cuda"
    assert config.bus.url.startswith("redis://:secret-value@redis:6379/")


def test_multinode_volumes_and_references() -> None:
    """A volume every node mounts; the ConfigMap and Secret the pods name exist (hash suffix)."""
    docs = rendered(MULTINODE)
    _, rj = the_jobset(docs)
    pod = pod_of(rj)["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    for c in pod["containers"] + pod["initContainers"]:
        (data,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/data"]
        claim = one(
            docs,
            "PersistentVolumeClaim",
            volumes[data["name"]]["persistentVolumeClaim"]["claimName"],
        )
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    (c,) = pod["containers"]
    (cfg,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/etc/mapo"]
    assert find(docs, "ConfigMap", volumes[cfg["name"]]["configMap"]["name"])
    secrets = {d["metadata"]["name"]: d for d in find(docs, "Secret")}
    refs = [
        e["valueFrom"]["secretKeyRef"] for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})
    ]
    assert refs
    for ref in refs:
        assert ref["key"] in secret_data(secrets[ref["name"]])
    # No password in the JobSet itself: only through the Secret.
    password = secret_data(secrets["mapo-redis"])["password"]
    assert password not in yaml.safe_dump(find(docs, "JobSet"))


def test_multinode_services_reach_rank_zero() -> None:
    """Weights and metrics come from global rank 0: the Services select node 0's pod only."""
    docs = rendered(MULTINODE)
    _, rj = the_jobset(docs)
    template = pod_of(rj)
    (c,) = template["spec"]["containers"]
    for name in ("trainer", "trainer-metrics"):
        svc = one(docs, "Service", name)
        selector = dict(svc["spec"]["selector"])
        assert selector.pop("batch.kubernetes.io/job-completion-index") == "0"
        assert selector.items() <= template["metadata"]["labels"].items()
        for port in svc["spec"]["ports"]:
            port_number(c, port["targetPort"])
    # ...and no other workload carries the trainer's labels.
    for deploy in find(docs, "Deployment"):
        labels = deploy["spec"]["template"]["metadata"]["labels"]
        assert labels.get("app.kubernetes.io/component") != "trainer"


def test_multinode_model_step_builds_once(tmp_path: Path) -> None:
    """The init container: node 0 builds the model into place atomically, the others wait."""
    _, rj = the_jobset(rendered(MULTINODE))
    (init,) = pod_of(rj)["spec"]["initContainers"]
    assert init["command"][:2] == ["sh", "-c"]
    data = tmp_path / "data"
    data.mkdir()
    script = init["command"][2].replace("/data/", f"{data}/")
    m = re.search(r"mapo (make-model \S+ --size \w+)", init["command"][2])
    assert m
    build_parser().parse_args(m.group(1).split())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    (bin_dir / "mapo").write_text(
        f'#!/bin/sh\necho "$*" >> {calls}\nmkdir -p "$2" && echo {{}} > "$2/config.json"\n'
    )
    (bin_dir / "mapo").chmod(0o755)

    def node(index: int, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "JOB_COMPLETION_INDEX": str(index)}
        return subprocess.run(
            ["sh", "-c", script], env=env, capture_output=True, text=True, timeout=timeout
        )

    with pytest.raises(subprocess.TimeoutExpired):
        node(1, timeout=3)  # no model yet: node 1 waits
    assert node(0).returncode == 0
    assert (data / "model" / "config.json").is_file() and not (data / "model.partial").exists()
    assert node(0).returncode == 0 and node(1).returncode == 0  # already there: nothing to do
    assert calls.read_text().splitlines() == [f"make-model {data}/model.partial --size tiny"]


# --- Secrets: none shipped; kustomize needs the user's file ------------------------------


def test_rendering_without_the_secret_file_fails_naming_it(tmp_path: Path) -> None:
    root = k8s_copy(tmp_path / "k8s", secret=False)
    for path in (root / "base", root / "overlays" / "cpu"):
        out = run([binary("kubectl"), "kustomize", str(path)])
        assert out.returncode != 0
        assert str(K8S_SECRET_FILE) in out.stderr and "no such file" in out.stderr, out.stderr
    # The directory says how to make it; git ignores everything else in it.
    readme = (K8S / K8S_SECRET_FILE.parent / "README.md").read_text()
    assert "sh deploy/make-secrets.sh k8s" in readme and "openssl rand -hex 24" in readme
    out = run(["git", "check-ignore", "-q", f"deploy/k8s/{K8S_SECRET_FILE}"])
    assert out.returncode == 0, "the secret file must be ignored by git"


def test_no_secret_value_in_the_manifests() -> None:
    """No Secret object with data in deploy/k8s: the only Secret comes from the generator."""
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "Secret":
                raise AssertionError(f"{path} ships a Secret")
    base = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    files = {"mapo-redis": K8S_SECRET_FILE, "mapo-weights": K8S_WEIGHTS_SECRET_FILE}
    gens = {gen["name"]: gen for gen in base["secretGenerator"]}
    assert set(gens) == set(files)
    for name, gen in gens.items():
        assert gen["envs"] == [str(files[name].relative_to("base"))] and "literals" not in gen
    for overlay in (*OVERLAYS, MULTINODE):
        secrets = {s["metadata"]["name"]: secret_data(s) for s in find(rendered(overlay), "Secret")}
        # Stable names: KEDA's TriggerAuthentication and a user's own Secrets use them.
        assert secrets == {
            "mapo-redis": {"password": K8S_REDIS_PASSWORD},
            "mapo-weights": {"announce_secret": K8S_ANNOUNCE_SECRET},
        }


# --- NetworkPolicies ----------------------------------------------------------------------

# Pods as the policies see them: (namespace labels, pod labels).
Peer = tuple[dict[str, str], dict[str, str]]


def _ns(name: str) -> dict[str, str]:
    return {"kubernetes.io/metadata.name": name}


def _component(name: str) -> Peer:
    return _ns(NAMESPACE), {
        "app.kubernetes.io/component": name,
        "app.kubernetes.io/part-of": "mapo-rl",
    }


PROMETHEUS: Peer = (_ns("monitoring"), {"app.kubernetes.io/name": "prometheus"})
KEDA_OPERATOR: Peer = (_ns("keda"), {"app": "keda-operator"})
OTHER_POD: Peer = (_ns(NAMESPACE), {"app": "debug"})  # any other pod of the namespace
OUTSIDER: Peer = (_ns("default"), {"app.kubernetes.io/component": "inference"})


def _matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels and matchExpressions) against labels."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for e in selector.get("matchExpressions", []):
        present = e["key"] in labels
        inside = present and labels[e["key"]] in e.get("values", [])
        ok = {"In": inside, "NotIn": not inside, "Exists": present, "DoesNotExist": not present}
        if not ok[e["operator"]]:
            return False
    return True


def _peer_allows(peer: dict[str, Any], source: Peer) -> bool:
    ns_labels, pod_labels = source
    if "ipBlock" in peer:
        return False
    if "namespaceSelector" in peer:
        in_ns = _matches(peer["namespaceSelector"], ns_labels)
    else:
        in_ns = ns_labels == _ns(NAMESPACE)  # podSelector alone: the policy's namespace
    return in_ns and _matches(peer.get("podSelector", {}), pod_labels)


def pod_templates(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """component -> pod template, of the Deployments and of the JobSet."""
    templates = [d["spec"]["template"] for d in find(docs, "Deployment")]
    templates += [pod_of(rj) for js in find(docs, "JobSet") for rj in js["spec"]["replicatedJobs"]]
    return {tpl["metadata"]["labels"]["app.kubernetes.io/component"]: tpl for tpl in templates}


def _port_number(template: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    numbers = [
        p["containerPort"]
        for c in template["spec"]["containers"]
        for p in c.get("ports", [])
        if p.get("name") == port
    ]
    assert numbers, f"named port {port} is not on the selected pods"
    return int(numbers[0])


def allowed(docs: list[dict[str, Any]], source: Peer, target: str, port: int) -> bool:
    """Whether the NetworkPolicies let ``source`` connect to pods of ``target`` on ``port``."""
    template = pod_templates(docs)[target]
    labels = template["metadata"]["labels"]
    policies = [
        p for p in find(docs, "NetworkPolicy") if _matches(p["spec"]["podSelector"], labels)
    ]
    if not any("Ingress" in p["spec"].get("policyTypes", ["Ingress"]) for p in policies):
        return True  # not isolated
    for p in policies:
        for rule in p["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports is not None and port not in [_port_number(template, x["port"]) for x in ports]:
                continue
            peers = rule.get("from")
            if peers is None or any(_peer_allows(peer, source) for peer in peers):
                return True
    return False


@pytest.mark.parametrize("overlay", [*OVERLAYS, MULTINODE])
def test_network_policies_deny_by_default(overlay: str) -> None:
    docs = rendered(overlay)
    (deny,) = [
        p for p in find(docs, "NetworkPolicy") if p["metadata"]["name"] == "default-deny-ingress"
    ]
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    for p in find(docs, "NetworkPolicy"):
        assert p["metadata"]["namespace"] == NAMESPACE
        assert p["spec"]["policyTypes"] == ["Ingress"]  # egress is not restricted
        for rule in p["spec"].get("ingress", []):
            if p["metadata"]["name"] != "trainer-ranks":
                assert rule.get("ports") and rule.get("from"), p["metadata"]["name"]
    # Every pod is isolated: no component the policies forget.
    for component in pod_templates(docs):
        assert not allowed(docs, OUTSIDER, component, 1), component


@pytest.mark.parametrize("overlay", [*OVERLAYS, MULTINODE])
def test_network_policies_allow_only_what_must_talk(overlay: str) -> None:
    docs = rendered(overlay)
    templates = pod_templates(docs)
    port = {
        name: {p["name"]: p["containerPort"] for c in t["spec"]["containers"] for p in c["ports"]}
        for name, t in templates.items()
    }
    inference, trainer, reward, redis = (
        _component(n) for n in ("inference", "trainer", "reward", "redis")
    )
    keda = "keda" in yaml.safe_dump_all(find(docs, "ScaledObject"))
    expected: list[tuple[Peer, str, int, bool]] = [
        # Redis: the bus users, and KEDA's operator where KEDA scales the replicas.
        (inference, "redis", port["redis"]["redis"], True),
        (trainer, "redis", port["redis"]["redis"], True),
        (reward, "redis", port["redis"]["redis"], False),
        (OTHER_POD, "redis", port["redis"]["redis"], False),
        (PROMETHEUS, "redis", port["redis"]["redis"], False),
        (KEDA_OPERATOR, "redis", port["redis"]["redis"], keda),
        ((_ns("keda"), {"app": "other"}), "redis", port["redis"]["redis"], False),
        # The reward service: gRPC from the replicas only, metrics to Prometheus.
        (inference, "reward", port["reward"]["grpc"], True),
        (trainer, "reward", port["reward"]["grpc"], False),
        (OTHER_POD, "reward", port["reward"]["grpc"], False),
        (redis, "reward", port["reward"]["grpc"], False),
        (PROMETHEUS, "reward", port["reward"]["metrics"], True),
        (PROMETHEUS, "reward", port["reward"]["grpc"], False),
        (inference, "reward", port["reward"]["metrics"], False),
        # The trainer: weight versions to the replicas, metrics to Prometheus.
        (inference, "trainer", port["trainer"]["weights"], True),
        (reward, "trainer", port["trainer"]["weights"], False),
        (OTHER_POD, "trainer", port["trainer"]["weights"], False),
        (PROMETHEUS, "trainer", port["trainer"]["metrics"], True),
        (PROMETHEUS, "trainer", port["trainer"]["weights"], False),
        (redis, "trainer", port["trainer"]["weights"], False),
        (inference, "trainer", port["trainer"]["metrics"], False),
        # Inference HTTP (API and /metrics): any pod of the namespace, and Prometheus.
        (OTHER_POD, "inference", port["inference"]["http"], True),
        (trainer, "inference", port["inference"]["http"], True),
        (PROMETHEUS, "inference", port["inference"]["http"], True),
        (OUTSIDER, "inference", port["inference"]["http"], False),
        (OTHER_POD, "inference", 9999, False),
    ]
    if overlay == MULTINODE:
        # The ranks of different nodes: rendezvous and NCCL's own ports.
        rendezvous = port["trainer"]["rendezvous"]
        expected += [(trainer, "trainer", rendezvous, True), (trainer, "trainer", 41234, True)]
        expected += [(inference, "trainer", rendezvous, False)]
    wrong = [
        (source[1], target, p, want)
        for source, target, p, want in expected
        if allowed(docs, source, target, p) != want
    ]
    assert not wrong, wrong


# --- Resources, privileges, mounts --------------------------------------------------------


def pod_specs(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(workload, pod spec) of every Deployment and of the JobSet."""
    specs = [
        (d["metadata"]["name"], d["spec"]["template"]["spec"]) for d in find(docs, "Deployment")
    ]
    for js in find(docs, "JobSet"):
        specs += [("jobset", pod_of(rj)["spec"]) for rj in js["spec"]["replicatedJobs"]]
    return specs


@pytest.mark.parametrize("overlay", [*OVERLAYS, MULTINODE])
def test_every_container_has_requests_and_limits(overlay: str) -> None:
    for name, spec in pod_specs(rendered(overlay)):
        for c in spec["containers"] + spec.get("initContainers", []):
            res = c.get("resources", {})
            where = f"{name}/{c['name']}"
            assert {"cpu", "memory"} <= res.get("requests", {}).keys(), where
            assert "memory" in res.get("limits", {}), where


@pytest.mark.parametrize("overlay", [*OVERLAYS, MULTINODE])
def test_least_privilege(overlay: str) -> None:
    """No API token, RuntimeDefault seccomp, non-root, no privilege escalation, no
    capabilities, and read-only mounts wherever the service only reads."""
    for name, spec in pod_specs(rendered(overlay)):
        assert spec["automountServiceAccountToken"] is False, name
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] > 0, name
        assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, (name, c["name"])
            assert sc["capabilities"] == {"drop": ["ALL"]}, (name, c["name"])
            for m in c.get("volumeMounts", []):
                if m["mountPath"] == "/etc/mapo":
                    assert m.get("readOnly") is True, (name, c["name"])
        (main, *_) = spec["containers"]
        mounts = {m["mountPath"]: m for m in main.get("volumeMounts", [])}
        if name == "inference":  # reads the model its init container wrote
            assert mounts["/data"].get("readOnly") is True
            (init,) = spec["initContainers"]
            assert not [m for m in init["volumeMounts"] if m.get("readOnly")]
        if name in ("redis", "trainer", "jobset"):  # they write their data
            assert not mounts["/data"].get("readOnly")
        if name == "redis":
            assert main["securityContext"]["readOnlyRootFilesystem"] is True
