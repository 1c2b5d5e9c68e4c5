"""The weight path under attack: signed announcements, allowed sources, bounded downloads, and
a weight server that cuts off idle clients and caps its connections.

Everything is real: HTTP servers on free 127.0.0.1 ports (the trainer's WeightServer, and small
hostile ones that hang, lie about sizes or only record what reaches them), Redis from
``tests/fixtures/redis.py`` where announcements travel on the bus, and the replica's own
:class:`~services.inference.reload.WeightManager` with a stand-in engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
import torch
from safetensors.torch import save_file

from services.core.config import RunConfig, build_config
from services.core.schemas import (
    MAX_WEIGHTS_BYTES,
    SchemaError,
    WeightAnnouncement,
    decode,
    encode,
)
from services.core.secrets import is_secret_name, redact_tree
from services.inference.reload import Candidate, ReloadRefused, WeightManager
from services.stack.processes import free_port
from services.transport import make_bus
from services.weights import trust
from services.weights.fetch import fetch_version, remote_latest_version
from services.weights.publish import WeightPublisher
from services.weights.store import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    WeightsCorrupt,
    WeightServer,
    WeightsTooLarge,
    WeightStoreError,
    version_dir,
    write_version,
)
from tests.fixtures.redis import bus_config

KEY = "k" * 40
OTHER_KEY = "x" * 40


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# ----------------------------------------------------------------------------- helpers


def _tensors(scale: float = 1.0) -> dict[str, torch.Tensor]:
    return {"a.weight": torch.ones(64, 32) * scale, "b.bias": torch.zeros(5)}


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    save_file(_tensors(), str(d / WEIGHTS_FILE))
    return d


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


class FakeReloader:
    def __init__(self) -> None:
        self.loaded: list[tuple[str, ...]] = []

    async def reload_files(self, paths: Sequence[str], expected: Any) -> None:
        self.loaded.append(tuple(paths))

    async def reset_prefix_cache(self) -> None:
        return None


def config(store: Path, **weights: Any) -> RunConfig:
    return build_config({"weights": {"store": str(store), **weights}}, environ={})


def manager(
    model_dir: Path, store: Path, tmp_path: Path, **weights: Any
) -> tuple[WeightManager, FakeReloader, list[str]]:
    reloader, failures = FakeReloader(), []
    mgr = WeightManager(
        reloader,
        model_dir,
        store=str(store),
        trust=trust.WeightTrust.from_config(config(store, **weights)),
        cache_dir=tmp_path / "cache",
        on_failure=failures.append,
    )
    return mgr, reloader, failures


def announcement(
    version: int, location: str, sha: str, *, key: str = "", size: int = 0
) -> WeightAnnouncement:
    msg = WeightAnnouncement(
        version, location, sha, step=version, created_at=time.time(), file_bytes=size
    )
    return trust.sign(msg, key) if key else msg


def leftovers(cache: Path) -> list[str]:
    """What a failed download left in the cache: must be nothing version-like."""
    if not cache.exists():
        return []
    return sorted(p.name for p in cache.iterdir() if p.name != "LATEST")


class Recorder(threading.Thread):
    """An HTTP server that answers every request with ``handler(path)`` and records the paths.

    ``handler`` returns raw bytes written to the socket (status line, headers, body), or None
    to hold the connection open without answering (a hung server).
    """

    def __init__(self, handler: Callable[[str], bytes | None] | None = None) -> None:
        super().__init__(daemon=True)
        self.handler = handler or (lambda path: b"HTTP/1.0 404 Not Found\r\n\r\n")
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.connections = 0
        self.paths: list[str] = []
        self.held: list[socket.socket] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10.0)
        data = b""
        with contextlib.suppress(OSError):
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
        if not data:
            conn.close()
            return
        path = data.split(b" ", 2)[1].decode()
        self.paths.append(path)
        reply = self.handler(path)
        if reply is None:
            self.held.append(conn)  # never answered, never closed (until stop)
            return
        with contextlib.suppress(OSError):
            conn.sendall(reply)
        conn.close()

    def __enter__(self) -> Recorder:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stopping.set()
        self.join(timeout=5)
        self.sock.close()
        for conn in self.held:
            conn.close()


def response(body: bytes, *, length: int | None = None, status: str = "200 OK") -> bytes:
    """A raw HTTP/1.0 response; ``length``: the Content-Length to claim (None: leave it out)."""
    head = f"HTTP/1.0 {status}\r\nContent-Type: application/octet-stream\r\n"
    if length is not None:
        head += f"Content-Length: {length}\r\n"
    return head.encode() + b"\r\n" + body


def serving(directory: Path, weights: Callable[[bytes], bytes]) -> Callable[[str], bytes | None]:
    """A handler that serves ``directory``'s manifest honestly and ``weights(file)`` for the
    weights file."""
    manifest = (directory / MANIFEST_FILE).read_bytes()
    data = (directory / WEIGHTS_FILE).read_bytes()

    def handle(path: str) -> bytes | None:
        if path.endswith(MANIFEST_FILE):
            return response(manifest, length=len(manifest))
        if path.endswith(WEIGHTS_FILE):
            return weights(data)
        return response(b"", length=0, status="404 Not Found")

    return handle


# ----------------------------------------------------------------------------- signatures


def test_a_signed_announcement_survives_the_wire_and_any_change_breaks_it() -> None:
    msg = announcement(3, "http://trainer:8200", "ab" * 32, key=KEY, size=1234)
    back = decode(encode(msg))
    assert back == msg and len(back.signature) == 64
    trust.verify(back, KEY)
    changes = {
        "version": 4,
        "location": "http://trainer:8201",
        "manifest_sha256": "cd" * 32,
        "step": 99,
        "created_at": msg.created_at + 1e-6,
        "file_bytes": 1235,
    }
    signed_fields = {f.name for f in dataclasses.fields(msg)} - {"signature", "kind"}
    assert set(changes) == signed_fields  # every field is signed (a new one must be added here)
    for name, value in changes.items():
        with pytest.raises(trust.Refused) as info:
            trust.verify(dataclasses.replace(msg, **{name: value}), KEY)
        assert info.value.reason == "forged", name
    with pytest.raises(trust.Refused, match="forged"):
        trust.verify(msg, OTHER_KEY)
    with pytest.raises(trust.Refused, match="unsigned") as unsigned:
        trust.verify(dataclasses.replace(msg, signature=""), KEY)
    assert unsigned.value.reason == "unsigned"
    trust.verify(dataclasses.replace(msg, signature=""), "")  # no key: accepted


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("location", "l" * 5000, "'location' must be a string of 1 to 4096"),
        ("file_bytes", MAX_WEIGHTS_BYTES + 1, "'file_bytes' must be an integer"),
        ("file_bytes", -1, "'file_bytes' must be an integer"),
        ("signature", "a" * 65, "'signature' must be a string of at most 64"),
        ("signature", "A" * 64, "signature must be 64 lowercase hex"),
        ("signature", "a" * 63, "signature must be 64 lowercase hex"),
        ("extra", "x", "unknown field 'extra'"),
    ],
)
def test_an_announcement_past_its_bounds_is_refused_on_decode(
    field: str, value: Any, message: str
) -> None:
    body = msgpack.unpackb(encode(announcement(1, "/s", "0" * 64, key=KEY)), raw=False)
    body[field] = value
    with pytest.raises(SchemaError, match=message):
        decode(msgpack.packb(body, use_bin_type=True))


@pytest.mark.integration
def test_on_the_bus_oversized_announcements_are_skipped_and_forged_ones_refused(
    redis_server: Any, model_dir: Path, store: Path, tmp_path: Path
) -> None:
    """A replica following the real weights stream loads the genuine version; the forged,
    unsigned, oversized and foreign-sourced announcements around it change nothing."""
    directory, sha = write_version(store, 1, _tensors(2.0))
    size = (directory / WEIGHTS_FILE).stat().st_size
    cfg = bus_config(redis_server.url)
    mgr, reloader, failures = manager(model_dir, store, tmp_path, announce_secret=KEY)

    def raw(msg: WeightAnnouncement, **fields: Any) -> bytes:
        body = msgpack.unpackb(encode(msg), raw=False)
        body.update(fields)
        return bytes(msgpack.packb(body, use_bin_type=True))

    async def main() -> int:
        bus = make_bus(cfg)
        try:
            stream = cfg.weights_stream
            follower = bus.follow(stream, "0", expect=WeightAnnouncement)
            genuine = announcement(1, str(directory), sha, key=KEY, size=size)
            await bus.publish(stream, genuine)
            # A forged one of a higher version in the same batch must not hide it.
            await bus.publish(stream, announcement(900, str(directory), sha, key=OTHER_KEY))
            await bus.publish(stream, announcement(901, str(directory), sha))  # unsigned
            await bus.publish(stream, announcement(902, "http://127.0.0.1:9", sha, key=KEY))
            await bus.publish_encoded(
                stream,
                [
                    raw(genuine, version=903, location="l" * 5000),
                    raw(genuine, version=904, file_bytes=MAX_WEIGHTS_BYTES + 1),
                    raw(genuine, version=905, signature="s" * 65),
                ],
            )
            deliveries = await follower.poll(count=32, block_ms=100)
            # The oversized entries never decode: the follower skips them.
            assert sorted(d.message.version for d in deliveries) == [1, 900, 901, 902]
            latest = await bus.latest(stream, expect=WeightAnnouncement)
            assert latest is not None and latest.message.version == 902
            newest = mgr.newest_acceptable(d.message for d in deliveries)
            assert newest == genuine
            # And as the service does with it:
            return await mgr.apply(Candidate.announced(newest))
        finally:
            await bus.close()

    assert run(main()) == 1
    assert reloader.loaded == [(str(directory / WEIGHTS_FILE),)]
    assert sorted(failures) == ["forged", "source", "unsigned"]


def test_forged_and_unsigned_announcements_are_refused_and_nothing_loads(
    model_dir: Path, store: Path, tmp_path: Path
) -> None:
    directory, sha = write_version(store, 1, _tensors(2.0))
    mgr, reloader, failures = manager(model_dir, store, tmp_path, announce_secret=KEY)
    for msg, reason in (
        (announcement(1, str(directory), sha, key=OTHER_KEY), "forged"),
        (announcement(1, str(directory), sha), "unsigned"),
        (dataclasses.replace(announcement(1, str(directory), sha, key=KEY), step=77), "forged"),
    ):
        with pytest.raises(ReloadRefused) as info:
            run(mgr.apply(Candidate.announced(msg)))
        assert info.value.reason == reason
    assert failures == ["forged", "unsigned", "forged"]
    assert mgr.version == 0 and reloader.loaded == []
    assert "weights.announce_secret" in mgr.last_error
    # The same version, signed with the key, loads.
    assert run(mgr.apply(Candidate.announced(announcement(1, str(directory), sha, key=KEY)))) == 1
    # Versions of the replica's own store need no signature (start-up, admin reloads).
    write_version(store, 2, _tensors(3.0))
    assert run(mgr.load_newest(mgr.store_candidates())) == 2


def test_without_a_key_unsigned_announcements_load_with_a_warning(
    model_dir: Path, store: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory, sha = write_version(store, 1, _tensors(2.0))
    with caplog.at_level(logging.WARNING, logger="services.weights.trust"):
        mgr, _, _ = manager(model_dir, store, tmp_path)
    assert "announce_secret is not set" in caplog.text
    assert run(mgr.apply(Candidate.announced(announcement(1, str(directory), sha)))) == 1


# ----------------------------------------------------------------------------- sources


def test_an_announcement_at_a_foreign_url_is_refused_before_any_request(
    model_dir: Path, store: Path, tmp_path: Path
) -> None:
    directory, sha = write_version(store, 1, _tensors(2.0))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (store / "escape").symlink_to(outside)
    with Recorder() as foreign:
        mgr, reloader, failures = manager(
            model_dir,
            store,
            tmp_path,
            announce_secret=KEY,
            allowed_sources=["http://127.0.0.1:1/weights"],
        )
        host, port = "127.0.0.1", foreign.port
        locations = [
            foreign.url,  # another port of an allowed host
            f"http://{host}:1/other",  # outside the allowed path
            f"http://{host}:1/weights/../x",  # dot segments
            f"http://{host}:1@{host}:{port}/weights",  # user info hiding the real host
            f"http://{host}:1/weights?x=@{host}:{port}",  # a query
            f"https://{host}:1/weights",  # another scheme
            f"ftp://{host}:{port}/",
            f"http://{host}:1/weights\r\nHost: x",  # header injection
            str(outside),  # a directory outside the store
            str(store / "escape" / "v00000001"),  # ... reached through a link in it
            str(store / ".." / "elsewhere"),
        ]
        for location in locations:
            with pytest.raises(ReloadRefused) as info:
                run(mgr.apply(Candidate.announced(announcement(1, location, sha, key=KEY))))
            assert info.value.reason == "source", location
            assert "weight location refused" in str(info.value)
        time.sleep(0.3)
        assert foreign.connections == 0 and foreign.paths == []
    assert failures == ["source"] * len(locations)
    assert reloader.loaded == [] and leftovers(tmp_path / "cache") == []
    # The store itself, and an allowed URL prefix, pass the check.
    mgr.trust.check_location(str(directory))
    mgr.trust.check_location("http://127.0.0.1:1/weights/sub")
    mgr.trust.check_location("HTTP://127.0.0.1:1/weights")


def test_default_sources_are_the_store_and_the_trainers_weight_server(tmp_path: Path) -> None:
    cfg = build_config(
        {
            "weights": {"store": str(tmp_path / "w")},
            "trainer": {"weights_url": "http://trainer:8200"},
        },
        environ={},
    )
    t = trust.WeightTrust.from_config(cfg)
    t.check_location(str(tmp_path / "w" / "v00000003"))
    t.check_location("http://trainer:8200")
    for bad in ("http://trainer:8201", "http://trainer", "http://other:8200", str(tmp_path)):
        with pytest.raises(trust.Refused):
            t.check_location(bad)
    served = build_config(
        {"trainer": {"weights_port": 8200, "weights_host": "10.1.2.3"}}, environ={}
    )
    trust.WeightTrust.from_config(served).check_location("http://10.1.2.3:8200")
    wildcard = trust.WeightTrust.build(["http://127.0.0.1:*"])
    wildcard.check_location("http://127.0.0.1:41234")
    with pytest.raises(trust.Refused):
        wildcard.check_location("http://127.0.0.2:41234")


# ----------------------------------------------------------------------------- downloads


def test_a_truncated_download_fails_cleanly_and_leaves_no_version(
    store: Path, tmp_path: Path
) -> None:
    directory, sha = write_version(store, 1, _tensors(2.0))
    cache = tmp_path / "cache"
    # Content-Length says the whole file, the connection closes halfway.
    half = serving(directory, lambda data: response(data[: len(data) // 2], length=len(data)))
    # No Content-Length: the body simply ends early.
    short = serving(directory, lambda data: response(data[:-10]))
    for handler in (half, short):
        with Recorder(handler) as server, pytest.raises(WeightStoreError, match="truncated"):
            fetch_version(server.url, 1, cache, sha, timeout_s=5.0)
        assert leftovers(cache) == []
        assert not version_dir(cache, 1).exists()


def test_an_oversized_download_is_cut_off_and_leaves_no_version(
    store: Path, tmp_path: Path
) -> None:
    directory, sha = write_version(store, 1, _tensors(2.0))
    size = (directory / WEIGHTS_FILE).stat().st_size
    cache = tmp_path / "cache"
    # More bytes than the manifest says, without a Content-Length: cut off at the excess.
    more = serving(directory, lambda data: response(data + b"\0" * (8 << 20)))
    with Recorder(more) as server, pytest.raises(WeightsCorrupt, match="sent more than"):
        fetch_version(server.url, 1, cache, sha, timeout_s=5.0)
    assert leftovers(cache) == []
    # A Content-Length past the manifest's size: refused before the body is read.
    offered = serving(directory, lambda data: response(data + b"\0", length=size + 1))
    with Recorder(offered) as server, pytest.raises(WeightsTooLarge, match="offers"):
        fetch_version(server.url, 1, cache, sha, timeout_s=5.0)
    assert leftovers(cache) == []
    # A version over the replica's cap: the weights file is never requested.
    honest = serving(directory, lambda data: response(data, length=len(data)))
    with Recorder(honest) as server:
        with pytest.raises(WeightsTooLarge, match="max_version_bytes"):
            fetch_version(server.url, 1, cache, sha, timeout_s=5.0, max_bytes=size - 1)
        assert server.paths == [f"/versions/1/{MANIFEST_FILE}"]
        # An announced size that is not the manifest's.
        with pytest.raises(WeightsCorrupt, match="the announcement says"):
            fetch_version(server.url, 1, cache, sha, timeout_s=5.0, expected_bytes=size + 7)
        with pytest.raises(WeightsTooLarge, match="nothing downloaded"):
            fetch_version(server.url, 1, cache, sha, max_bytes=1 << 20, expected_bytes=2 << 20)
        # A manifest other than the announced one: the weights are never requested.
        server.paths.clear()
        with pytest.raises(WeightsCorrupt, match="announced sha256"):
            fetch_version(server.url, 1, cache, "0" * 64, timeout_s=5.0)
        assert server.paths == [f"/versions/1/{MANIFEST_FILE}"]
        assert leftovers(cache) == []
        # The honest server's version downloads.
        assert fetch_version(server.url, 1, cache, sha, expected_bytes=size) == version_dir(
            cache, 1
        )


def test_a_replica_refuses_an_oversized_version_through_its_manager(
    model_dir: Path, store: Path, tmp_path: Path
) -> None:
    directory, sha = write_version(store, 1, _tensors(2.0))
    size = (directory / WEIGHTS_FILE).stat().st_size
    honest = serving(directory, lambda data: response(data, length=len(data)))
    with Recorder(honest) as server:
        mgr, reloader, failures = manager(
            model_dir,
            store,
            tmp_path,
            allowed_sources=[server.url],
            max_version_bytes=1 << 20,
        )
        big = announcement(1, server.url, sha, size=2 << 20)
        with pytest.raises(ReloadRefused) as info:
            run(mgr.apply(Candidate.announced(big)))
        assert info.value.reason == "too_large" and server.paths == []
        wrong = announcement(1, server.url, sha, size=size + 1)
        with pytest.raises(ReloadRefused) as info:
            run(mgr.apply(Candidate.announced(wrong)))
        assert info.value.reason == "corrupt"
        assert run(mgr.apply(Candidate.announced(announcement(1, server.url, sha, size=size))))
    assert failures == ["too_large", "corrupt"] and len(reloader.loaded) == 1


def test_a_hung_weight_server_fails_the_fetch_within_its_timeout(
    store: Path, tmp_path: Path
) -> None:
    _, sha = write_version(store, 1, _tensors(2.0))
    with Recorder(lambda path: None) as hung:
        started = time.monotonic()
        with pytest.raises(WeightStoreError, match=r"no answer within 0.5 s"):
            fetch_version(hung.url, 1, tmp_path / "cache", sha, timeout_s=0.5)
        assert time.monotonic() - started < 5.0
        started = time.monotonic()
        assert remote_latest_version(hung.url, timeout_s=0.5) is None
        assert time.monotonic() - started < 5.0
    assert leftovers(tmp_path / "cache") == []


def test_a_trickling_weight_server_is_cut_off_by_the_deadline(store: Path, tmp_path: Path) -> None:
    """One byte at a time, each well inside the read timeout: the download's deadline
    (timeout + size at the slowest rate tolerated) ends it."""
    directory, sha = write_version(store, 1, _tensors(2.0))
    manifest = (directory / MANIFEST_FILE).read_bytes()
    stop = threading.Event()

    def trickle(conn: socket.socket) -> None:
        conn.settimeout(5.0)
        with contextlib.suppress(OSError):
            conn.recv(4096)
            head = f"HTTP/1.0 200 OK\r\nContent-Length: {len(manifest)}\r\n\r\n".encode()
            conn.sendall(head)
            for byte in manifest:
                if stop.is_set():
                    break
                conn.sendall(bytes([byte]))
                time.sleep(0.2)
        conn.close()

    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]

    def accept() -> None:
        with contextlib.suppress(OSError):
            conn, _ = sock.accept()
            trickle(conn)

    threading.Thread(target=accept, daemon=True).start()
    try:
        started = time.monotonic()
        with pytest.raises(WeightStoreError, match="too slow"):
            fetch_version(f"http://127.0.0.1:{port}", 1, tmp_path / "cache", sha, timeout_s=1.0)
        # The deadline: the timeout plus the declared size at the slowest rate tolerated, far
        # less than the trickle would take.
        assert time.monotonic() - started < 5.0
    finally:
        stop.set()
        sock.close()
    assert leftovers(tmp_path / "cache") == []


# ----------------------------------------------------------------------------- the server


@contextlib.contextmanager
def weight_server(store: Path, **kwargs: Any) -> Iterator[WeightServer]:
    server = WeightServer(store, **kwargs).start()
    try:
        yield server
    finally:
        server.stop()


def closed_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until the server closes ``sock`` (fails past ``seconds``)."""
    sock.settimeout(seconds)
    started = time.monotonic()
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(4096):
            data += chunk
    return time.monotonic() - started


def test_the_weight_server_cuts_off_idle_and_trickling_clients(store: Path) -> None:
    write_version(store, 1, _tensors(2.0))
    with weight_server(store, timeout_s=0.5) as server:
        idle = socket.create_connection(("127.0.0.1", server.port))
        assert closed_within(idle, 5.0) < 3.0
        idle.close()
        # A request head sent a byte at a time, each inside the timeout: cut off all the same.
        slow = socket.create_connection(("127.0.0.1", server.port))
        started = time.monotonic()
        with contextlib.suppress(OSError):
            for byte in b"GET /versions/latest HTTP/1.0\r\nX-Padding: " + b"a" * 100:
                slow.sendall(bytes([byte]))
                time.sleep(0.05)
        assert time.monotonic() - started < 4.0
        slow.close()
        # The server still serves.
        resp = httpx.get(f"http://127.0.0.1:{server.port}/versions/latest", timeout=5.0)
        assert resp.json() == {"version": 1}


def test_the_weight_server_caps_concurrent_connections(store: Path) -> None:
    write_version(store, 1, _tensors(2.0))
    with weight_server(store, timeout_s=10.0, max_connections=2) as server:
        held = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2)]
        time.sleep(0.3)  # both accepted, each holding a slot
        extra = socket.create_connection(("127.0.0.1", server.port))
        extra.settimeout(5.0)
        reply = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := extra.recv(4096):
                reply += chunk
        extra.close()
        assert reply.startswith(b"HTTP/1.0 503"), reply
        assert json.loads(reply.split(b"\r\n\r\n", 1)[1]) == {"error": "too many connections"}
        assert server.refused == 1
        url = f"http://127.0.0.1:{server.port}/versions/latest"
        assert httpx.get(url, timeout=5.0).status_code == 503
        for sock in held:
            sock.close()
        deadline = time.monotonic() + 5.0
        while httpx.get(url, timeout=5.0).status_code != 200:
            assert time.monotonic() < deadline, "the slots were not given back"
            time.sleep(0.05)


def test_the_weight_server_serves_a_replica_end_to_end(
    model_dir: Path, store: Path, tmp_path: Path
) -> None:
    directory, sha = write_version(store, 1, _tensors(2.0))
    size = (directory / WEIGHTS_FILE).stat().st_size
    with weight_server(store, timeout_s=5.0, max_connections=4) as server:
        url = f"http://127.0.0.1:{server.port}"
        mgr, reloader, _ = manager(
            model_dir, tmp_path / "own", tmp_path, announce_secret=KEY, allowed_sources=[url]
        )
        msg = announcement(1, url, sha, key=KEY, size=size)
        assert run(mgr.apply(Candidate.announced(msg))) == 1
    assert reloader.loaded == [(str(version_dir(tmp_path / "cache", 1) / WEIGHTS_FILE),)]
    # Bad paths answer 404, never a file outside the store.
    with weight_server(store) as server:
        base = f"http://127.0.0.1:{server.port}"
        for path in ("/versions/1/../../etc/passwd", "/versions/" + "9" * 5000 + "/manifest.json"):
            assert httpx.get(base + path, timeout=5.0).status_code == 404


# ----------------------------------------------------------------------------- the trainer


@pytest.mark.integration
def test_the_trainer_signs_and_replicas_verify_over_the_bus(
    redis_server: Any, model_dir: Path, tmp_path: Path
) -> None:
    port = free_port()
    cfg = build_config(
        {
            "weights": {"store": str(tmp_path / "store"), "announce_secret": KEY},
            "trainer": {"weights_port": port, "weights_host": "127.0.0.1"},
            "bus": bus_config(redis_server.url).model_dump(),
        },
        environ={},
    )
    spec = {"a.weight": (64, 32), "b.bias": (5,)}

    async def main() -> WeightAnnouncement:
        bus = make_bus(cfg.bus)
        publisher = WeightPublisher(cfg, bus, spec, torch.float32)
        try:
            location, sha = publisher.write(_tensors(2.0), 1, 1)
            await publisher.announce(1, location, sha, 1)
            latest = await bus.latest(cfg.bus.weights_stream, expect=WeightAnnouncement)
            assert latest is not None
            msg: WeightAnnouncement = latest.message
            trust.verify(msg, KEY)
            assert msg.location == f"http://127.0.0.1:{port}"
            written = version_dir(cfg.weights.store, 1) / WEIGHTS_FILE
            assert msg.file_bytes == written.stat().st_size
            # A replica with the run's config loads it from the trainer's server.
            reloader = FakeReloader()
            mgr = WeightManager(
                reloader,
                model_dir,
                store=cfg.weights.store,
                trust=trust.WeightTrust.from_config(cfg),
                cache_dir=tmp_path / "cache",
            )
            assert await mgr.apply(Candidate.announced(msg)) == 1
            return msg
        finally:
            publisher.close()
            await bus.close()

    run(main())
    # Without a key the publisher announces unsigned.
    unsigned = cfg.model_copy(deep=True)
    unsigned.weights.announce_secret = ""
    unsigned.trainer.weights_port = 0
    publisher = WeightPublisher(unsigned, make_bus("memory://"), spec, torch.float32)
    location, sha = publisher.write(_tensors(3.0), 2, 2)
    assert publisher.announcement(2, location, sha, 2).signature == ""


# ----------------------------------------------------------------------------- config


def test_the_weights_config_bounds_and_the_secret_stays_secret(tmp_path: Path) -> None:
    defaults = build_config({}, environ={}).weights
    assert defaults.announce_secret == "" and defaults.allowed_sources == []
    assert defaults.server_timeout_s == 30.0 and defaults.server_max_connections == 16
    for bad in (
        {"server_max_connections": 0},
        {"server_timeout_s": 0},
        {"fetch_timeout_s": 3601},
        {"max_version_bytes": 1},
        {"allowed_sources": ["http://user:pw@trainer:8200"]},
        {"allowed_sources": ["ftp://trainer/"]},
        {"allowed_sources": ["http://trainer:8200/?q"]},
        {"allowed_sources": [""]},
    ):
        with pytest.raises(ValueError, match="weights"):
            build_config({"weights": bad}, environ={})
    assert is_secret_name("announce_secret")
    cfg = build_config(
        {"weights": {"announce_secret": KEY}},
        environ={"MAPO__WEIGHTS__ALLOWED_SOURCES": '["http://trainer:8200"]'},
    )
    assert cfg.weights.allowed_sources == ["http://trainer:8200"]
    assert KEY not in json.dumps(redact_tree(cfg.model_dump(mode="json")))


def test_mapo_up_makes_a_fresh_announce_key_per_run(tmp_path: Path) -> None:
    from services.stack import up

    base = build_config({}, environ={})
    cfg = up.run_config(base, tmp_path, "redis://127.0.0.1:1/0", 4242)
    text, nulls = up.dump_config(cfg)
    (tmp_path / "config.toml").write_text(text)
    keys = []
    for _ in range(2):
        stack = up.Stack(cfg, tmp_path, tmp_path / "config.toml", nulls)
        raw = stack.env["MAPO__WEIGHTS__ANNOUNCE_SECRET"]
        key = build_config({}, environ={"MAPO__WEIGHTS__ANNOUNCE_SECRET": raw}).weights
        assert len(key.announce_secret) == 64
        assert key.announce_secret not in " ".join(stack._mapo("trainer", "run"))
        keys.append(key.announce_secret)
    assert keys[0] != keys[1]
    # A key the config sets is the one the services get.
    cfg.weights.announce_secret = KEY
    stack = up.Stack(cfg, tmp_path, tmp_path / "config.toml", nulls)
    assert json.loads(stack.env["MAPO__WEIGHTS__ANNOUNCE_SECRET"]) == KEY
    assert KEY not in up.dump_config(cfg)[0]


# ----------------------------------------------------------------------------- deployments


def _pod_specs(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Pod specs by workload name: Deployments and the JobSet's pod."""
    from tests.test_deploy_k8s import find

    pods = {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in find(docs, "Deployment")}
    for js in find(docs, "JobSet"):
        for rj in js["spec"]["replicatedJobs"]:
            pods[js["metadata"]["name"]] = rj["template"]["spec"]["template"]["spec"]
    return pods


@pytest.mark.parametrize("overlay", ["cpu", "gpu", "hpa", "multinode"])
def test_kubernetes_gives_the_announce_key_to_the_trainer_and_replicas_only(overlay: str) -> None:
    from tests.test_deploy_k8s import rendered
    from tests.test_deploy_tools import K8S_ANNOUNCE_SECRET

    docs = rendered(overlay)
    holders = set()
    for pod in _pod_specs(docs).values():
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            for e in c.get("env", []):
                if e["name"] == "MAPO__WEIGHTS__ANNOUNCE_SECRET":
                    ref = e["valueFrom"]["secretKeyRef"]  # never a literal value
                    assert ref == {"name": "mapo-weights", "key": "announce_secret"}, ref
                    holders.add(c["name"])
    assert holders == {"inference", "trainer"}
    assert K8S_ANNOUNCE_SECRET not in json.dumps([d for d in docs if d["kind"] != "Secret"])


def test_compose_gives_the_announce_key_to_the_bus_users_only() -> None:
    from tests.test_deploy_compose import BUS_USERS, compose
    from tests.test_deploy_tools import COMPOSE_SECRETS, compose_env

    out = compose("config")
    assert out.returncode == 0, out.stderr
    services = yaml_load(out.stdout)["services"]
    key = COMPOSE_SECRETS["WEIGHTS_ANNOUNCE_SECRET"]
    for name, svc in services.items():
        env = {k: str(v) for k, v in (svc.get("environment") or {}).items()}
        holds = [k for k, v in env.items() if key in v]
        assert holds == (["MAPO__WEIGHTS__ANNOUNCE_SECRET"] if name in BUS_USERS else []), name
    # No default: compose refuses to start without it, and says how to make it.
    refused = compose("config", "-q", env=compose_env(WEIGHTS_ANNOUNCE_SECRET=None))
    assert refused.returncode != 0
    assert "set WEIGHTS_ANNOUNCE_SECRET in .env" in refused.stderr, refused.stderr
    assert "deploy/make-secrets.sh" in refused.stderr


def yaml_load(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)
