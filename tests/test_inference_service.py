"""The inference service for real: vLLM on the CPU with the tiny model, a real Redis, a real
reward server, the weight store. One service process is shared by the module (the engine's
first generation is slow); tests that change weights announce versions newer than the one
served and compare against references they record themselves.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from services.core.schemas import PromptMessage, ScoredGroup, WeightAnnouncement
from services.inference.launcher import InferenceProcess
from services.transport import INFERENCE_GROUP, make_bus
from services.weights.store import WEIGHTS_FILE, WeightServer, write_version
from tests.fixtures.redis import bus_config, bus_settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOKEN = "test-admin-token"
LIVE_TIMEOUT_S = 2.0
PROMPT = "12+34="


class Service:
    """The running service plus what the tests need to drive it."""

    def __init__(self, proc: InferenceProcess, model: Path, store: Path, bus_cfg: Any) -> None:
        self.proc = proc
        self.url = proc.url
        self.model = model
        self.store = store
        self.bus_cfg = bus_cfg
        self.http = httpx.Client(base_url=proc.url, timeout=120.0)

    def ready(self) -> dict[str, Any]:
        body: dict[str, Any] = self.http.get("/ready").json()
        return body

    def version(self) -> int:
        return int(self.ready()["weight_version"])

    def complete(self, **body: Any) -> dict[str, Any]:
        request = {"model": str(self.model), "prompt": PROMPT, "max_tokens": 8, "seed": 11}
        resp = self.http.post("/v1/completions", json=request | body)
        assert resp.status_code == 200, resp.text
        out: dict[str, Any] = resp.json()
        return out

    def sample(self) -> tuple[list[int], list[float], int]:
        """A seeded sample with its log-probs (same request, same weights: same answer)."""
        body = self.complete(logprobs=0, temperature=1.0)
        lp = body["choices"][0]["logprobs"]
        return lp["token_ids"], lp["token_logprobs"], body["weight_version"]

    def metric(self, name: str, labels: str = "") -> float:
        text = self.http.get("/metrics").text
        pattern = rf"^{re.escape(name)}{re.escape(labels)} (\S+)$"
        match = re.search(pattern, text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    def announce(self, version: int, location: str, sha: str) -> None:
        async def go() -> None:
            bus = make_bus(self.bus_cfg)
            try:
                msg = WeightAnnouncement(version, location, sha, step=version)
                await bus.publish(self.bus_cfg.weights_stream, msg)
            finally:
                await bus.close()

        asyncio.run(go())

    def wait_for(self, predicate: Any, what: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if self.proc.proc.poll() is not None:
                pytest.fail(f"the service exited:\n{self.proc.log()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}; status {self.ready()}")
            time.sleep(0.1)


@pytest.fixture(scope="module")
def service(
    tiny_model: Path,
    redis_server: Any,
    reward_server: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Service]:
    store = tmp_path_factory.mktemp("weights")
    cfg = bus_config(redis_server.url).model_copy(update={"claim_idle_ms": 30_000})
    settings = [
        *bus_settings(cfg),
        f"reward.address={reward_server.address}",
        f"weights.store={store}",
        # The reload test also serves versions from a WeightServer on a free port of this host.
        'weights.allowed_sources=["http://127.0.0.1:*"]',
        f"inference.admin_token={TOKEN}",
        "inference.prompts_per_batch=4",
        f"inference.live_timeout_s={LIVE_TIMEOUT_S}",
        "inference.kv_cache_gib=0.25",
        "model.max_model_len=128",
    ]
    proc = InferenceProcess(tiny_model, settings=settings)
    svc = Service(proc, tiny_model, store, cfg)
    try:
        yield svc
    finally:
        svc.http.close()
        code = proc.stop()
        assert code == 0, f"the service did not shut down cleanly ({code}):\n{proc.log()[-3000:]}"


@pytest.fixture(scope="module")
def base_weights(tiny_model: Path) -> dict[str, torch.Tensor]:
    return load_file(str(tiny_model / WEIGHTS_FILE))


def perturbed(base: dict[str, torch.Tensor], seed: int, scale: float = 0.05) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in base.items()}


def hf_logprobs(
    model_dir: Path, weights: dict[str, torch.Tensor], completion: list[int]
) -> list[float]:
    """Log-probs of ``completion`` after PROMPT under ``weights``, computed by transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.load_state_dict(weights, strict=False)
    model.tie_weights()
    prompt = AutoTokenizer.from_pretrained(str(model_dir)).encode(PROMPT)
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    return [logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(completion)]


def publish_version(svc: Service, weights: dict[str, Any], *, via: str = "dir") -> int:
    version = svc.version() + 1
    directory, sha = write_version(svc.store, version, weights, step=version, keep=100)
    location = str(directory) if via == "dir" else via
    svc.announce(version, location, sha)
    svc.wait_for(lambda: svc.version() == version, f"version {version} to be served")
    return version


# ----------------------------------------------------------------------------- probes, API


def test_probes_and_metrics(service: Service) -> None:
    assert service.http.get("/health").json() == {"status": "ok"}
    assert service.http.get("/live").status_code == 200
    ready = service.ready()
    assert ready["ready"] and isinstance(ready["weight_version"], int)
    assert ready["rollout_worker"] in ("running", "starting")
    text = service.http.get("/metrics").text
    for name in (
        "mapo_inference_generated_tokens_total",
        "mapo_inference_tokens_per_second",
        "mapo_inference_queue_depth",
        "mapo_inference_weight_version",
        "mapo_inference_reload_seconds_count",
        'mapo_inference_reload_failures_total{reason="corrupt"}',
        "mapo_inference_groups_total",
        "mapo_inference_requests_total",
    ):
        assert name in text, name
    assert 'route="/metrics"' not in text


def test_openai_client_gets_completions(service: Service) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{service.url}/v1", api_key="unused", max_retries=0)
    models = client.models.list()
    assert [m.id for m in models.data] == [str(service.model)]
    out = client.completions.create(
        model=str(service.model), prompt=[PROMPT, "7+8="], max_tokens=6, n=2, logprobs=1, seed=3
    )
    assert len(out.choices) == 4 and [c.index for c in out.choices] == [0, 1, 2, 3]
    for choice in out.choices:
        assert isinstance(choice.text, str) and choice.finish_reason in ("stop", "length")
        assert choice.logprobs is not None
        assert all(lp <= 0.0 for lp in choice.logprobs.token_logprobs)
    assert out.usage is not None and out.usage.prompt_tokens == len(PROMPT) + len("7+8=")
    assert out.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in out.choices)


BAD_REQUESTS = [
    ("malformed json", b'{"model": "m", "prompt": '),
    ("not an object", b"[1, 2, 3]"),
    ("prompt wrong type", {"prompt": 12}),
    ("prompt missing", {"prompt": None}),
    ("empty prompt", {"prompt": ""}),
    ("empty prompt list", {"prompt": []}),
    ("max_tokens zero", {"max_tokens": 0}),
    ("max_tokens negative", {"max_tokens": -5}),
    ("max_tokens string", {"max_tokens": "many"}),
    ("prompt too long", {"prompt": "1" * 200}),
    ("prompt + max_tokens too long", {"max_tokens": 125}),
    ("temperature negative", {"temperature": -1}),
    ("top_p zero", {"top_p": 0}),
    ("n zero", {"n": 0}),
    ("n huge", {"n": 100000}),
    ("logprobs too many", {"logprobs": 1000}),
    ("greedy with n > 1", {"temperature": 0, "n": 2}),
    ("unknown model", {"model": "not-this-one"}),
    ("stream", {"stream": True}),
    ("stop empty", {"stop": [""]}),
    ("seed negative", {"seed": -1}),
]


@pytest.mark.parametrize("body", [b for _, b in BAD_REQUESTS], ids=[n for n, _ in BAD_REQUESTS])
def test_malformed_requests_get_4xx(service: Service, body: Any) -> None:
    if isinstance(body, bytes):
        resp = service.http.post(
            "/v1/completions", content=body, headers={"content-type": "application/json"}
        )
    else:
        request = {"model": str(service.model), "prompt": PROMPT} | body
        resp = service.http.post("/v1/completions", json=request)
    assert 400 <= resp.status_code < 500, resp.text
    assert "message" in resp.json()["error"]


def test_admin_routes_need_the_bearer_token(service: Service) -> None:
    for path in ("/admin/weights/reload", "/admin/pause", "/admin/resume"):
        assert service.http.post(path).status_code == 401
        wrong = service.http.post(path, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 403
    resp = service.http.post("/admin/pause", headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.json()["rollout_worker"] == "paused"
    resp = service.http.post("/admin/resume", headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.json()["rollout_worker"] == "running"


# ----------------------------------------------------------------------------- rollouts


def test_rollout_worker_end_to_end(service: Service) -> None:
    """Prompts in, scored groups out, through Redis and the reward server; prompts acked."""
    # A greedy completion is known in advance: a prompt whose answer is that text must score 1.
    greedy = service.complete(temperature=0.0, max_tokens=6)["choices"][0]["text"]
    version = service.version()
    run = uuid.uuid4().hex[:6]
    prompts = [
        PromptMessage(
            prompt_id=f"{run}-{i}",
            prompt=f"{10 + i}+{20 + i}=",
            answer=str(30 + 2 * i),
            task="arithmetic",
            group_size=4,
            temperature=1.0,
            top_p=1.0,
            max_tokens=6,
        )
        for i in range(6)
    ]
    prompts.append(PromptMessage(f"{run}-greedy", PROMPT, greedy, "arithmetic", 1, 0.0, 1.0, 6))
    cfg = service.bus_cfg

    async def go() -> tuple[list[ScoredGroup], int]:
        bus = make_bus(cfg)
        try:
            await bus.ensure_group(cfg.rollouts_stream, f"check-{run}", "0")
            await bus.publish_many(cfg.prompts_stream, prompts)
            groups: dict[str, ScoredGroup] = {}
            async with asyncio.timeout(90):
                while len(groups) < len(prompts):
                    for d in await bus.read(cfg.rollouts_stream, f"check-{run}", "c", 16, 500):
                        if d.message.group_id.startswith(run):
                            groups[d.message.group_id] = d.message
                        await bus.ack(cfg.rollouts_stream, f"check-{run}", [d.entry_id])
                pending = -1
                while pending != 0:
                    stats = await bus.stats(cfg.prompts_stream)
                    group = stats.group(INFERENCE_GROUP)
                    pending = group.pending if group else -1
                    await asyncio.sleep(0.05)
            return list(groups.values()), pending
        finally:
            await bus.close()

    groups, pending = asyncio.run(go())
    assert pending == 0  # every prompt acknowledged after its group was appended
    by_id = {g.group_id: g for g in groups}
    for p in prompts:
        g = by_id[p.prompt_id]
        assert len(g.rollouts) == p.group_size
        assert g.policy_version == version and g.replica
        assert g.prompt == p.prompt and g.answer == p.answer and g.task == "arithmetic"
        assert g.prompt_token_ids.dtype == np.int32 and len(g.prompt_token_ids) == len(p.prompt)
        for r in g.rollouts:
            assert r.token_ids.dtype == np.int32 and r.logprobs.dtype == np.float32
            assert 1 <= len(r.token_ids) <= 6 and len(r.logprobs) == len(r.token_ids)
            assert np.all(r.logprobs <= 0.0)
            assert r.status == "scored" and r.finish_reason in ("stop", "length")
            assert r.reward == (1.0 if r.text.strip() == p.answer.strip() else 0.0)
    assert by_id[f"{run}-greedy"].rollouts[0].text == greedy
    assert by_id[f"{run}-greedy"].rewards == [1.0]
    assert service.metric("mapo_inference_groups_total") >= len(prompts)


# ----------------------------------------------------------------------------- weights


def test_weight_reload_changes_logprobs_as_expected(
    service: Service, base_weights: dict[str, torch.Tensor]
) -> None:
    # Serve the base weights as a new version, and record a seeded sample under them.
    v_base = publish_version(service, base_weights)
    tokens0, logprobs0, served0 = service.sample()
    assert served0 == v_base
    reloads = service.metric("mapo_inference_reload_seconds_count")

    # New weights: the served log-probs are exactly what transformers computes for them.
    new = perturbed(base_weights, seed=1)
    v_new = publish_version(service, new)
    tokens1, logprobs1, served1 = service.sample()
    assert served1 == v_new
    expected = hf_logprobs(service.model, new, tokens1)
    np.testing.assert_allclose(logprobs1, expected, atol=2e-4)
    before = hf_logprobs(service.model, base_weights, tokens1)
    assert max(abs(a - b) for a, b in zip(logprobs1, before, strict=True)) > 1e-2
    assert service.metric("mapo_inference_reload_seconds_count") == reloads + 1
    assert service.metric("mapo_inference_weight_version") == v_new

    # The base weights again, fetched over HTTP from a weight server: the same sample comes back.
    server = WeightServer(service.store).start()
    try:
        v_again = publish_version(service, base_weights, via=f"http://127.0.0.1:{server.port}")
    finally:
        server.stop()
    tokens2, logprobs2, served2 = service.sample()
    assert served2 == v_again
    assert tokens2 == tokens0 and logprobs2 == logprobs0


@pytest.mark.parametrize("damage", ["flipped bytes", "missing file", "wrong shapes", "wrong names"])
def test_bad_version_is_refused_and_generation_continues(
    service: Service, base_weights: dict[str, torch.Tensor], damage: str
) -> None:
    served = service.version()
    tokens0, logprobs0, _ = service.sample()
    weights = perturbed(base_weights, seed=2)
    reason = "corrupt"
    if damage == "wrong shapes":
        weights["model.norm.weight"] = torch.ones(65)
        reason = "incompatible"
    if damage == "wrong names":
        weights["model.layers.7.mlp.up_proj.weight"] = weights.pop("model.norm.weight")
        reason = "incompatible"
    version = served + 1
    directory, sha = write_version(service.store, version, weights, step=version, keep=100)
    target = directory / WEIGHTS_FILE
    if damage == "flipped bytes":
        raw = bytearray(target.read_bytes())
        raw[len(raw) // 2] ^= 0x5A
        target.write_bytes(bytes(raw))
    if damage == "missing file":
        target.unlink()
    failures = service.metric("mapo_inference_reload_failures_total", f'{{reason="{reason}"}}')
    service.announce(version, str(directory), sha)
    service.wait_for(
        lambda: (
            service.metric("mapo_inference_reload_failures_total", f'{{reason="{reason}"}}')
            > failures
        ),
        f"the {damage} version to be refused",
    )
    # An admin reload of it is refused too, with the reason.
    resp = service.http.post(
        "/admin/weights/reload",
        json={"version": version},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert resp.status_code == 409 and resp.json()["reason"] == reason
    # The old version keeps serving, unchanged.
    assert service.http.get("/live").status_code == 200
    assert service.version() == served
    tokens1, logprobs1, served1 = service.sample()
    assert (tokens1, logprobs1, served1) == (tokens0, logprobs0, served)
    # Leave no newer bad version behind for the next test's "newest" search.
    shutil.rmtree(directory)


def test_admin_reload_loads_a_chosen_version(
    service: Service, base_weights: dict[str, torch.Tensor]
) -> None:
    first = publish_version(service, perturbed(base_weights, seed=3))
    second = publish_version(service, perturbed(base_weights, seed=4))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    back = service.http.post("/admin/weights/reload", json={"version": first}, headers=auth)
    assert back.status_code == 200 and back.json()["weight_version"] == first
    newest = service.http.post("/admin/weights/reload", json={}, headers=auth)
    assert newest.status_code == 200 and newest.json()["weight_version"] == second


def test_live_reports_a_hung_engine(service: Service) -> None:
    """/live times out into 503 while the engine core is stopped, and recovers after."""
    import os
    import signal

    import psutil

    cores = [
        p for p in psutil.Process(service.proc.proc.pid).children() if "EngineCore" in p.name()
    ]
    assert len(cores) == 1, [p.name() for p in psutil.Process(service.proc.proc.pid).children()]
    core = cores[0]
    os.kill(core.pid, signal.SIGSTOP)  # a child of the service this module started
    try:
        started = time.monotonic()
        resp = service.http.get("/live")
        assert resp.status_code == 503 and resp.json()["status"] == "dead"
        assert time.monotonic() - started < LIVE_TIMEOUT_S + 5
        assert service.http.get("/health").status_code == 200  # the process itself is fine
    finally:
        os.kill(core.pid, signal.SIGCONT)
    service.wait_for(lambda: service.http.get("/live").status_code == 200, "the engine to answer")
    assert service.complete()["choices"]
