"""The inference service under requests it must refuse, and after its engine died.

In-process tests check the request guard (bearer token, body size, concurrency), the
dead-engine watch and the rollout worker's reaction to a dead engine without vLLM. The others
start the real service on the tiny model: its limits answered over HTTP, the API fuzzed from its
own OpenAPI schema with schemathesis, and a replica whose engine core is SIGKILLed.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.core.config import build_config
from services.core.secrets import redacted_fields
from services.inference.app import RequestGuard, build_app
from services.inference.generation import EngineUnavailable
from services.inference.launcher import InferenceProcess
from services.inference.service import InferenceService, max_prompt_chars

TOKEN = "test-api-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
GENERATION = frozenset({"/v1/completions", "/v1/chat/completions"})


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# ----------------------------------------------------------------------------- config


def test_limits_are_config_fields_with_defaults_and_bounds() -> None:
    inf = build_config({}).inference
    assert inf.engine_dead_grace_s == 15.0 and inf.api_token == ""
    assert (inf.max_n, inf.max_logprobs, inf.max_concurrent_requests) == (16, 20, 32)
    assert inf.max_body_bytes == 8 << 20 and inf.max_prompts_per_request >= 64
    for bad in (
        "inference.engine_dead_grace_s=-1",
        "inference.engine_dead_grace_s=601",
        "inference.max_n=0",
        "inference.max_logprobs=21",
        "inference.max_body_bytes=10",
        "inference.max_concurrent_requests=0",
        "inference.max_prompts_per_request=0",
        "inference.max_request_tokens=0",
    ):
        with pytest.raises(ValueError, match=bad.split("=")[0].split(".")[1]):
            build_config({}, overrides=[bad], environ={})


def test_api_token_is_a_secret() -> None:
    tree = build_config({"inference": {"api_token": "t0k"}}, environ={}).model_dump()
    assert "inference.api_token" in redacted_fields(tree)
    assert "inference.max_request_tokens" not in redacted_fields(tree)


# ----------------------------------------------------------------------------- the guard


class Blocking:
    """An ASGI app that reads its body, then waits on ``release`` on the generation routes."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.bodies: list[bytes] = []
        self.waiting = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.bodies.append(body)
        if scope["path"] in GENERATION:
            self.waiting += 1
            await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


def guarded(app: Any, **options: Any) -> httpx.AsyncClient:
    settings = {"api_token": "", "max_body_bytes": 1024, "max_concurrent": 2}
    guard = RequestGuard(app, limited_paths=GENERATION, **(settings | options))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=guard), base_url="http://t")


def assert_openai_error(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    error: dict[str, Any] = resp.json()["error"]
    assert error["message"] and error["code"] == status and error["type"]
    return error


def test_guard_asks_the_v1_routes_for_the_bearer_token() -> None:
    async def go() -> None:
        app = Blocking()
        app.release.set()
        async with guarded(app, api_token=TOKEN) as client:
            for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": TOKEN}):
                resp = await client.get("/v1/models", headers=headers)
                assert_openai_error(resp, 401)
                assert resp.headers["www-authenticate"] == "Bearer"
            assert (await client.get("/v1/models", headers=AUTH)).status_code == 200
            for probe in ("/health", "/live", "/ready", "/metrics"):
                assert (await client.get(probe)).status_code == 200

    run(go())


def test_guard_refuses_large_bodies_before_reading_them() -> None:
    async def go() -> None:
        app = Blocking()
        app.release.set()
        async with guarded(app) as client:
            resp = await client.post("/v1/completions", content=b"x" * 1025)
            assert "inference.max_body_bytes" in assert_openai_error(resp, 413)["message"]
            sent: list[int] = []

            async def chunks() -> Any:  # no Content-Length: counted as it arrives
                for i in range(100):
                    sent.append(i)
                    yield b"y" * 100

            resp = await client.post("/v1/completions", content=chunks())
            assert_openai_error(resp, 413)
            assert len(sent) <= 12  # it stopped reading just past the limit
            assert app.bodies == []
            resp = await client.post("/v1/completions", content=b"z" * 1024)
            assert resp.status_code == 200 and app.bodies == [b"z" * 1024]

    run(go())


def test_guard_answers_429_past_the_concurrency_limit_and_never_queues() -> None:
    async def go() -> None:
        app = Blocking()
        async with guarded(app, max_concurrent=2) as client:
            held = [asyncio.create_task(client.post(p, content=b"{}")) for p in sorted(GENERATION)]
            while app.waiting < 2:
                await asyncio.sleep(0.01)
            resp = await client.post("/v1/completions", content=b"{}")
            assert "inference.max_concurrent_requests" in assert_openai_error(resp, 429)["message"]
            assert int(resp.headers["retry-after"]) >= 1
            # Other routes are not counted.
            assert (await client.get("/v1/models")).status_code == 200
            app.release.set()
            assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200]
            assert (await client.post("/v1/completions", content=b"{}")).status_code == 200

    run(go())


# ----------------------------------------------------------------------------- in-process app


class FakeTokenizer:
    """Slow on purpose: tokenising must not hold up the event loop."""

    chat_template = None

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    def encode(self, text: str) -> list[int]:
        time.sleep(self.delay_s)  # CPU-bound work, as far as the event loop can tell
        return [ord(c) % 50 for c in text]

    def get_vocab(self) -> dict[str, int]:
        return {chr(65 + i): i for i in range(50)}


def fake_service(config: Any, delay_s: float = 0.0) -> InferenceService:
    svc = InferenceService(config, use_bus=False)
    svc.tokenizer = FakeTokenizer(delay_s)
    svc.max_prompt_chars = max_prompt_chars(svc.tokenizer, config.model.max_model_len)
    svc.ready = True
    return svc


def test_tokenising_runs_off_the_event_loop() -> None:
    config = build_config({"model": {"path": "m", "max_model_len": 32}}, environ={})
    svc = fake_service(config, delay_s=1.0)
    app = build_app(config, service=svc, use_bus=False)

    async def go() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            # Tokenised (1 s), then too long for the context: 400 without vLLM.
            slow = asyncio.create_task(
                client.post("/v1/completions", json={"model": "m", "prompt": "1" * 40})
            )
            await asyncio.sleep(0.2)
            started = time.perf_counter()
            assert (await client.get("/live")).status_code == 200
            assert time.perf_counter() - started < 0.5
            assert not slow.done()
            resp = await slow
            assert "context" in assert_openai_error(resp, 400)["message"]
            # A prompt that cannot fit whatever it tokenises to is refused without tokenising.
            started = time.perf_counter()
            resp = await client.post("/v1/completions", json={"model": "m", "prompt": "1" * 9000})
            assert "characters" in assert_openai_error(resp, 400)["message"]
            assert time.perf_counter() - started < 0.5
        svc._cpu.shutdown()

    run(go())


def test_request_limits_come_from_the_config_and_answer_422() -> None:
    config = build_config(
        {
            "model": {"path": "m", "max_model_len": 64},
            "inference": {"max_n": 2, "max_prompts_per_request": 3, "max_request_tokens": 20},
        },
        environ={},
    )
    app = build_app(config, service=fake_service(config), use_bus=False)

    async def go() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            schema = (await client.get("/openapi.json")).json()["components"]["schemas"]
            props = schema["CompletionRequest"]["properties"]
            assert props["n"]["maximum"] == 2 and props["max_tokens"]["maximum"] == 20
            assert props["prompt"]["anyOf"][1]["maxItems"] == 3
            assert schema["ChatRequest"]["properties"]["top_logprobs"]["anyOf"][0]["maximum"] == 20
            cases = [
                ("/v1/completions", {"prompt": "1", "n": 3}, "n"),
                ("/v1/completions", {"prompt": ["1"] * 4}, "prompt"),
                ("/v1/completions", {"prompt": "1", "logprobs": 21}, "logprobs"),
                ("/v1/completions", {"prompt": "1", "max_tokens": 64}, "max_tokens"),
                ("/v1/completions", {"prompt": ["1", "2"], "n": 2, "max_tokens": 6}, None),
                ("/v1/chat/completions", {"messages": [], "n": 3}, "messages"),
                (
                    "/v1/chat/completions",
                    {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
                    None,
                ),
                (
                    "/v1/chat/completions",
                    {"messages": [{"role": "user", "content": "x"}], "max_tokens": 21},
                    "max_tokens",
                ),
                (
                    "/v1/chat/completions",
                    {"messages": [{"role": "user", "content": "x"}], "n": 2, "max_tokens": 11},
                    None,
                ),
            ]
            for path, body, param in cases:
                resp = await client.post(path, json={"model": "m"} | body)
                error = assert_openai_error(resp, 422)
                assert error["param"] == param, error
            resp = await client.post(
                "/v1/completions",
                json={"model": "m", "prompt": ["1", "2"], "n": 2, "max_tokens": 6},
            )
            assert "inference.max_request_tokens" in resp.json()["error"]["message"]
            # Malformed bodies, unknown routes and methods: OpenAI's error shape too.
            resp = await client.post("/v1/completions", content=b'{"model": ')
            assert_openai_error(resp, 422)
            assert_openai_error(await client.get("/v1/nothing"), 404)
            assert_openai_error(await client.get("/v1/completions"), 405)

    run(go())


# ----------------------------------------------------------------------------- a dead engine


class FakeEngine:
    """An engine core that answers until it dies; a call in flight then is never answered."""

    def __init__(self) -> None:
        self.errored = False
        self.hang = False

    async def check_health(self) -> None:
        if self.errored:
            raise RuntimeError("EngineDeadError")

    async def is_paused(self) -> bool:
        if self.hang:
            await asyncio.Event().wait()  # never answered
        return False


def test_a_dead_engine_is_reported_then_fatal_after_the_grace_period() -> None:
    config = build_config(
        {"inference": {"engine_dead_grace_s": 0.3, "live_timeout_s": 30}}, environ={}
    )
    svc = InferenceService(config, use_bus=False)
    engine = FakeEngine()
    svc.engine = engine  # type: ignore[assignment]
    svc.ready = True
    fatal: list[tuple[float, str]] = []

    async def go() -> None:
        svc._on_fatal = lambda reason: fatal.append((time.monotonic(), reason))
        watch = asyncio.create_task(svc._watch_engine())
        await svc.live()
        await asyncio.sleep(0.6)
        assert not fatal and svc.status()["engine"] == "running"
        # The engine core dies while /live waits for its answer: reported at once, not after
        # live_timeout_s.
        engine.hang = True
        live = asyncio.create_task(svc.live())
        await asyncio.sleep(0.2)
        engine.errored = True
        started = time.monotonic()
        with pytest.raises(EngineUnavailable, match=r"engine died.*exits in"):
            await live
        assert time.monotonic() - started < 2.0
        assert not svc.ready and svc.status()["engine"] == "dead"
        await asyncio.wait_for(watch, 5)
        died_at = svc.engine_dead_at
        assert died_at is not None and len(fatal) == 1
        assert fatal[0][0] - died_at >= 0.3 and "engine died" in fatal[0][1]

    run(go())
    svc._cpu.shutdown()


def test_the_rollout_worker_stops_on_a_dead_engine() -> None:
    from services.inference.rollout_worker import RolloutWorker
    from services.transport import INFERENCE_GROUP, make_bus
    from tests.test_inference_units import FakeScorer, FakeService, _prompt

    async def go() -> None:
        service = FakeService()
        cfg = service.config.bus.model_copy(
            update={"url": f"memory://{uuid.uuid4().hex}", "block_ms": 20}
        )
        service.config = service.config.model_copy(update={"bus": cfg})
        bus = make_bus(cfg)
        await bus.publish(cfg.prompts_stream, _prompt(0))
        service.engine.errored = True
        worker = RolloutWorker(service, bus, FakeScorer())  # type: ignore[arg-type]
        await asyncio.wait_for(worker.run(), 5)  # returns instead of looping
        assert worker.state == "engine dead"
        stats = await bus.stats(cfg.prompts_stream)
        group = stats.group(INFERENCE_GROUP)
        assert group is not None and group.pending == 0  # the prompt is left for others
        await worker.close()

    run(go())


# ----------------------------------------------------------------------------- the real service

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'][0] }}:{% if m['content'] is string %}"
    "{{ m['content'] }}{% else %}{% for c in m['content'] %}{% if c['type'] == 'text' %}"
    "{{ c['text'] }}{% endif %}{% endfor %}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}a:{% endif %}"
)
REQUEST_TOKENS = 8
LIMITS = [
    "model.max_model_len=64",
    "inference.kv_cache_gib=0.25",
    f"inference.api_token={TOKEN}",
    "inference.max_n=2",
    "inference.max_prompts_per_request=3",
    f"inference.max_request_tokens={REQUEST_TOKENS}",
    "inference.max_concurrent_requests=2",
    f"inference.max_body_bytes={64 << 10}",
]


@pytest.fixture(scope="module")
def chat_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a short chat template, so that the chat route generates too."""
    out = tmp_path_factory.mktemp("tiny-chat") / "model"
    shutil.copytree(tiny_model, out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config["chat_template"] = CHAT_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def limited(chat_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    store = tmp_path_factory.mktemp("weights")
    proc = InferenceProcess(chat_model, no_bus=True, settings=[*LIMITS, f"weights.store={store}"])
    try:
        yield proc
    finally:
        code = proc.stop()
        assert code == 0, f"the service did not shut down cleanly ({code}):\n{proc.log()[-3000:]}"


def raw_request(url: str, head: bytes, timeout_s: float = 10.0) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout_s)
    sock.sendall(head)
    return sock


def read_status(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ", 2)[1]), data


def hold_a_slot(url: str, head: bytes) -> socket.socket:
    """A connection whose request holds a generation slot: its body never ends. (A slot ends
    just after its response is sent, so a request made at once can still find it taken: such a
    one is answered 429 at once, and tried again.)"""
    for _ in range(50):
        sock = raw_request(url, head)
        sock.settimeout(0.2)
        try:
            answer = sock.recv(1024)
        except TimeoutError:
            sock.settimeout(10.0)
            return sock  # no answer: it waits for its body, holding its slot
        sock.close()
        assert answer.startswith(b"HTTP/1.1 429"), answer
        time.sleep(0.05)
    raise AssertionError("no generation slot came free")


@pytest.mark.integration
@pytest.mark.slow
def test_real_service_limits_and_token(limited: Any, chat_model: Path) -> None:
    http = httpx.Client(base_url=limited.url, timeout=60.0)
    model = str(chat_model)
    try:
        for probe in ("/health", "/live", "/ready", "/metrics", "/openapi.json"):
            assert http.get(probe).status_code == 200, probe
        assert_openai_error(http.get("/v1/models"), 401)
        assert_openai_error(http.get("/v1/models", headers={"Authorization": "Bearer x"}), 401)
        assert http.get("/v1/models", headers=AUTH).json()["data"][0]["id"] == model

        body = {"model": model, "prompt": ["1+2=", "3+4="], "n": 2, "max_tokens": 2, "logprobs": 2}
        out = http.post("/v1/completions", json=body, headers=AUTH).json()
        assert len(out["choices"]) == 4 and len(out["choices"][0]["logprobs"]["top_logprobs"]) > 0
        chat = {
            "model": model,
            "messages": [{"role": "user", "content": "1+2="}],
            "max_tokens": 5,
            "logprobs": True,
            "top_logprobs": 3,
        }
        out = http.post("/v1/chat/completions", json=chat, headers=AUTH).json()
        content = out["choices"][0]["logprobs"]["content"]
        assert content and all(len(t["top_logprobs"]) <= 3 for t in content)
        assert any(t["top_logprobs"] for t in content)
        # Past the context: a clear 400, never a silently shortened completion.
        resp = http.post(
            "/v1/completions",
            json={"model": model, "prompt": "1" * 60, "max_tokens": 8},
            headers=AUTH,
        )
        assert "context" in assert_openai_error(resp, 400)["message"]

        # A declared body over the limit: 413 at once, without the body ever being sent.
        head = (
            b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {TOKEN}\r\nContent-Length: {1 << 30}\r\n\r\n".encode()
        )
        with raw_request(limited.url, head) as sock:
            status, _ = read_status(sock)
        assert status == 413
        # A chunked body is counted as it comes: 413 once past the limit, before it ends.
        head = (
            b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {TOKEN}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        )
        chunk = b"x" * 8192
        with raw_request(limited.url, head) as sock:
            for _ in range(9):  # 72 KiB, past the 64 KiB limit; the final chunk is never sent
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            status, _ = read_status(sock)
        assert status == 413

        # Two generation requests whose bodies are still arriving hold both slots: a third is
        # refused at once with Retry-After, and the slots come back when they end.
        head = (
            b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {TOKEN}\r\nContent-Length: 1000\r\n\r\n{{".encode()
        )
        holders = [hold_a_slot(limited.url, head) for _ in range(2)]
        try:
            deadline = time.monotonic() + 10
            while True:
                resp = http.post("/v1/completions", json=body, headers=AUTH)
                if resp.status_code == 429 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert "max_concurrent_requests" in assert_openai_error(resp, 429)["message"]
            assert int(resp.headers["retry-after"]) >= 1
            assert http.get("/live").status_code == 200  # probes are never counted
        finally:
            for sock in holders:
                sock.close()
        deadline = time.monotonic() + 10
        while http.post("/v1/completions", json=body, headers=AUTH).status_code == 429:
            assert time.monotonic() < deadline, "the slots were not given back"
            time.sleep(0.05)
    finally:
        http.close()


#: Generated cases per operation and mode (positive: valid per the schema; negative: not).
#: Sized for about 2 minutes on 2 cores: a chat request takes hypothesis ~5x longer to make.
FUZZ_BUDGET = {
    ("POST", "/v1/completions"): {"positive": 1000, "negative": 700},
    ("POST", "/v1/chat/completions"): {"positive": 200, "negative": 200},
    ("GET", "/v1/models"): {"positive": 50, "negative": 50},
}
#: At least this many of each route's cases generated for real.
FUZZ_GENERATED = {"/v1/completions": 100, "/v1/chat/completions": 10}
PROBE_EXAMPLES = 20


@pytest.mark.integration
@pytest.mark.slow
def test_fuzz_the_http_api_from_its_openapi_schema(limited: Any, chat_model: Path) -> None:
    """Thousands of generated requests: no 5xx, no crash, every refusal a 4xx with a JSON
    error body. A schema-valid request names the served model half of the time, so that
    generation itself runs; the limits keep each one cheap (at most 24 tokens)."""
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    schema = schemathesis.openapi.from_url(f"{limited.url}/openapi.json")
    session = requests.Session()
    model = str(chat_model)
    statuses: Counter[tuple[str, str, int]] = Counter()
    problems: list[str] = []

    def check(case: Any, response: Any, label: str) -> None:
        status = response.status_code
        statuses[(label, case.operation.path, status)] += 1
        problem = ""
        if status >= 500:
            problem = f"server error {status}"
        elif status >= 400:
            try:
                error = response.json()["error"]
                ok = isinstance(error, dict) and bool(error.get("message"))
            except (ValueError, KeyError, TypeError):
                ok = False
            content_type = (response.headers.get("content-type") or [""])[0]
            if not ok or not content_type.startswith("application/json"):
                problem = f"{status} without an OpenAI error body: {response.text[:200]!r}"
        if problem and len(problems) < 20:
            problems.append(f"{problem}\n    {case.as_curl_command()[:600]}")

    def serve(body: dict[str, Any]) -> None:
        """Make a schema-valid request one this replica generates for: the served model, and
        within the token budget the schema cannot express (prompts x n x max_tokens)."""
        body["model"] = model
        prompts = len(body["prompt"]) if isinstance(body.get("prompt"), list) else 1
        fits = max(1, REQUEST_TOKENS // (prompts * body.get("n", 1)))
        for field in ("max_tokens", "max_completion_tokens"):
            if body.get(field) is not None:
                body[field] = min(body[field], fits)
        if "messages" in body and not body.get("max_completion_tokens"):
            body["max_tokens"] = min(body.get("max_tokens") or fits, fits)
        if "prompt" in body:
            body["max_tokens"] = min(body.get("max_tokens", fits), fits)
        if body.get("top_logprobs"):
            body["logprobs"] = True

    def fuzz(op: Any, label: str, examples: int) -> None:
        """``examples`` generated requests to one operation; results go to ``check``."""
        mode = getattr(schemathesis.GenerationMode, label.upper())

        @settings(
            max_examples=examples,
            derandomize=True,
            database=None,
            deadline=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=op.as_strategy(generation_mode=mode), served=st.booleans())
        def one(case: Any, served: bool) -> None:
            body = case.body
            if label == "positive" and served and isinstance(body, dict):
                serve(body)
            response = case.call(base_url=limited.url, session=session, headers=AUTH)
            check(case, response, label)

        one()

    operations = [result.ok() for result in schema.get_all_operations()]
    paths = {(op.method.upper(), op.path) for op in operations}
    assert set(FUZZ_BUDGET) <= paths and ("GET", "/live") in paths, paths
    started = time.monotonic()
    for op in operations:
        budget = FUZZ_BUDGET.get((op.method.upper(), op.path), {"positive": PROBE_EXAMPLES})
        for label, examples in budget.items():
            fuzz(op, label, examples)
    seconds = time.monotonic() - started
    session.close()
    total = sum(statuses.values())
    summary = "\n".join(f"  {k}: {v}" for k, v in sorted(statuses.items()))
    print(f"{total} cases in {seconds:.0f} s:\n{summary}")
    assert not problems, "\n".join(problems)
    assert total >= 2000, summary
    # Generation really ran on both routes, and the service survived it all.
    for path, least in FUZZ_GENERATED.items():
        assert statuses[("positive", path, 200)] >= least, summary
    assert limited.proc.poll() is None
    assert httpx.get(f"{limited.url}/live").status_code == 200


def engine_core_children(pid: int) -> list[int]:
    """The service's child processes that run vLLM's engine core (from /proc, no psutil)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    cores = []
    for child in children:
        try:
            name = Path(f"/proc/{child}/comm").read_text().strip()
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if "EngineCor" in name or b"EngineCore" in cmdline:
            cores.append(child)
    return cores


@pytest.mark.integration
@pytest.mark.slow
def test_replica_exits_nonzero_after_its_engine_core_is_killed(
    tiny_model: Path, tmp_path: Path
) -> None:
    grace_s = 3.0
    proc = InferenceProcess(
        tiny_model,
        no_bus=True,
        settings=[
            "model.max_model_len=64",
            "inference.kv_cache_gib=0.25",
            f"inference.engine_dead_grace_s={grace_s}",
            f"weights.store={tmp_path / 'weights'}",
        ],
    )
    http = httpx.Client(base_url=proc.url, timeout=30.0)
    try:
        assert http.get("/live").status_code == 200
        cores = engine_core_children(proc.proc.pid)
        assert len(cores) == 1, cores
        os.kill(cores[0], signal.SIGKILL)  # only the engine core this test's service started
        killed = time.monotonic()
        live: httpx.Response | None = None
        while time.monotonic() - killed < 30:
            live = http.get("/live")
            if live.status_code == 503:
                break
            time.sleep(0.1)
        assert live is not None and live.status_code == 503, live and live.text
        assert live.json()["status"] == "dead" and "engine died" in live.json()["detail"]
        ready = http.get("/ready")
        assert ready.status_code == 503 and ready.json()["engine"] == "dead"
        resp = http.post(
            "/v1/completions", json={"model": str(tiny_model), "prompt": "1+2=", "max_tokens": 4}
        )
        assert_openai_error(resp, 503)
        code = proc.proc.wait(timeout=120)
        assert code != 0, proc.log()[-3000:]
        assert time.monotonic() - killed >= grace_s
        assert "engine died" in proc.log()
    finally:
        http.close()
        proc.stop()
