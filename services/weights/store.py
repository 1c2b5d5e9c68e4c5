"""The weight store: policy versions as safetensors plus a manifest, on disk or over HTTP.

Layout of a store directory::

    v00000007/model.safetensors   the tensors of version 7
    v00000007/manifest.json       version, step, file sha256 and size, every tensor's name/shape/dtype
    LATEST                        the newest complete version number

A version appears only whole (:class:`~services.weights.versions.VersionedDirs`). Readers verify
the manifest (its sha256 is what the trainer announces on the bus), the file's sha256, and that
the safetensors header matches the manifest, before a single tensor is used. Nothing here
unpickles anything. :class:`WeightServer` serves a store read-only over HTTP; replicas download
from it with :func:`services.weights.fetch.fetch_version`. The server cuts off a client that
does not send its request within ``timeout_s`` (or stalls that long while it reads a file), and
serves at most ``max_connections`` at once: a connection past that gets a 503 and is closed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.weights.versions import VersionedDirs, atomic_write_bytes, sha256_file

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
CHUNK = 1 << 20
#: A manifest larger than this is refused unread (one holds ~100 bytes per tensor).
MAX_MANIFEST_BYTES = 32 << 20
#: Weight server defaults (``weights.server_timeout_s``, ``weights.server_max_connections``).
SERVER_TIMEOUT_S = 30.0
SERVER_MAX_CONNECTIONS = 16
# safetensors' dtype names, as the manifest spells them.
SAFETENSORS_DTYPES = {
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F64": "float64",
    "I64": "int64",
    "I32": "int32",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
_DTYPES = set(SAFETENSORS_DTYPES.values())


class WeightStoreError(ValueError):
    """A version that is missing, partial, corrupt or inconsistent; the message says which."""


class WeightsCorrupt(WeightStoreError):
    """A manifest or weights file whose sha256 differs from the one it should have."""


class VersionMissing(WeightStoreError):
    """The version asked for is not in the store."""


class VersionMismatch(WeightStoreError):
    """A version directory that holds another version than the one asked for."""


class WeightsIncompatible(WeightStoreError):
    """A version whose tensor names or shapes differ from the model being served."""


class WeightsTooLarge(WeightStoreError):
    """A version larger than the replica accepts (``weights.max_version_bytes``)."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class Manifest:
    version: int
    step: int
    created_at: float
    file_sha256: str
    file_bytes: int
    tensors: tuple[TensorEntry, ...]

    def to_json(self) -> bytes:
        body = {
            "format": MANIFEST_FORMAT,
            "version": self.version,
            "step": self.step,
            "created_at": self.created_at,
            "file": WEIGHTS_FILE,
            "file_sha256": self.file_sha256,
            "file_bytes": self.file_bytes,
            "tensors": [
                {"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in self.tensors
            ],
        }
        return json.dumps(body, indent=1, sort_keys=True).encode()

    @staticmethod
    def from_json(raw: bytes) -> Manifest:
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise WeightStoreError(f"manifest is not JSON: {exc}") from None
        try:
            if body["format"] != MANIFEST_FORMAT:
                raise WeightStoreError(f"unsupported manifest format {body['format']!r}")
            tensors = []
            for t in body["tensors"]:
                shape = tuple(int(d) for d in t["shape"])
                if t["dtype"] not in _DTYPES or any(d < 0 for d in shape):
                    raise WeightStoreError(f"bad tensor entry {t!r}")
                tensors.append(TensorEntry(str(t["name"]), shape, str(t["dtype"])))
            manifest = Manifest(
                version=int(body["version"]),
                step=int(body["step"]),
                created_at=float(body["created_at"]),
                file_sha256=str(body["file_sha256"]),
                file_bytes=int(body["file_bytes"]),
                tensors=tuple(tensors),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, WeightStoreError):
                raise
            raise WeightStoreError(f"manifest is malformed: {exc!r}") from None
        if manifest.version < 0 or not re.fullmatch(r"[0-9a-f]{64}", manifest.file_sha256):
            raise WeightStoreError("manifest has a negative version or a malformed sha256")
        return manifest


def versions_in(store: str | Path) -> VersionedDirs:
    """The version directories of a store (or of a replica's download cache)."""
    return VersionedDirs(store, "v", MANIFEST_FILE)


def version_dir(store: str | Path, version: int) -> Path:
    return versions_in(store).path(version)


def list_versions(store: str | Path) -> list[int]:
    """Complete versions in the store, oldest first (temporary directories are ignored)."""
    return versions_in(store).list()


def latest_version(store: str | Path) -> int | None:
    """The newest complete version, from ``LATEST`` (falling back to a directory scan)."""
    return versions_in(store).latest()


def write_version(
    store: str | Path,
    version: int,
    tensors: Mapping[str, torch.Tensor],
    *,
    step: int = 0,
    keep: int = 3,
) -> tuple[Path, str]:
    """Write one version atomically, keep the newest ``keep``; return its directory and the
    sha256 of its manifest."""
    from safetensors.torch import save_file

    if version < 0:
        raise WeightStoreError(f"version must be >= 0, got {version}")
    versions = versions_in(store)
    if versions.path(version).exists():
        raise WeightStoreError(f"version {version} already exists in {versions.root}")
    with versions.writing(version) as tmp:
        contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        weights = tmp / WEIGHTS_FILE
        save_file(contiguous, str(weights), metadata={"format": "pt", "version": str(version)})
        with weights.open("rb") as fh:
            os.fsync(fh.fileno())
        manifest = Manifest(
            version=version,
            step=step,
            created_at=time.time(),
            file_sha256=sha256_file(weights),
            file_bytes=weights.stat().st_size,
            tensors=tuple(
                TensorEntry(name, tuple(t.shape), str(t.dtype).removeprefix("torch."))
                for name, t in sorted(contiguous.items())
            ),
        )
        raw = manifest.to_json()
        atomic_write_bytes(tmp / MANIFEST_FILE, raw)
    versions.prune(keep)
    return versions.path(version), hashlib.sha256(raw).hexdigest()


def prune(store: str | Path, keep: int) -> None:
    """Remove all but the newest ``keep`` versions (readers verify, so a removed one is refused)."""
    versions_in(store).prune(keep)


def read_manifest(directory: str | Path, expected_sha256: str | None = None) -> Manifest:
    path = Path(directory) / MANIFEST_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise WeightStoreError(f"no manifest at {path}: version missing or partial") from None
    if expected_sha256 is not None and hashlib.sha256(raw).hexdigest() != expected_sha256:
        raise WeightsCorrupt(f"manifest {path} does not match the announced sha256")
    return Manifest.from_json(raw)


def _safetensors_header(path: Path) -> dict[str, Any]:
    with path.open("rb") as fh:
        size_raw = fh.read(8)
        if len(size_raw) != 8:
            raise WeightStoreError(f"{path} is truncated")
        size = int.from_bytes(size_raw, "little")
        if size > 100 << 20:
            raise WeightStoreError(f"{path} has an implausible header size {size}")
        try:
            header: dict[str, Any] = json.loads(fh.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise WeightStoreError(f"{path} has a corrupt safetensors header") from None
    return header


def verify_version(directory: str | Path, expected_sha256: str | None = None) -> Manifest:
    """Check manifest, file size and sha256, and that the file holds exactly the manifest's tensors.

    A version pruned while it is being checked is reported as missing, like any other.
    """
    try:
        return _verify_version(Path(directory), expected_sha256)
    except FileNotFoundError as exc:
        raise WeightStoreError(f"version at {directory} vanished while being read: {exc}") from None


def _verify_version(directory: Path, expected_sha256: str | None) -> Manifest:
    manifest = read_manifest(directory, expected_sha256)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise WeightStoreError(f"{weights} is missing")
    if weights.stat().st_size != manifest.file_bytes:
        raise WeightStoreError(
            f"{weights} has {weights.stat().st_size} bytes, manifest says {manifest.file_bytes}"
        )
    if sha256_file(weights) != manifest.file_sha256:
        raise WeightsCorrupt(f"{weights} does not match its manifest sha256 (corrupt)")
    check_tensors(weights, manifest)
    return manifest


def check_tensors(weights: Path, manifest: Manifest) -> None:
    """Check that a weights file's safetensors header lists exactly the manifest's tensors."""
    header = _safetensors_header(weights)
    if not isinstance(header, dict):
        raise WeightStoreError(f"{weights} has a safetensors header that is not a map")
    header.pop("__metadata__", None)
    try:
        in_file = {
            name: TensorEntry(
                name, tuple(v["shape"]), SAFETENSORS_DTYPES.get(v["dtype"], v["dtype"])
            )
            for name, v in header.items()
        }
    except (KeyError, TypeError) as exc:
        raise WeightStoreError(f"{weights} has a malformed safetensors header: {exc!r}") from None
    if in_file != {t.name: t for t in manifest.tensors}:
        raise WeightStoreError(f"{weights} does not hold the tensors its manifest lists")


def check_compatible(
    manifest: Manifest, expected: Mapping[str, tuple[tuple[int, ...], str]]
) -> None:
    """Refuse a version whose names or shapes differ from the model being served."""
    got = {t.name: t.shape for t in manifest.tensors}
    want = {name: shape for name, (shape, _dtype) in expected.items()}
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    wrong = sorted(n for n in set(got) & set(want) if tuple(got[n]) != tuple(want[n]))
    if missing or extra or wrong:
        raise WeightsIncompatible(
            f"version {manifest.version} does not fit the served model: "
            f"missing {missing[:5]}, unexpected {extra[:5]}, wrong shape {wrong[:5]}"
        )


def load_tensors(
    directory: str | Path, expected_sha256: str | None = None
) -> dict[str, torch.Tensor]:
    """Verify a version, then load its tensors (safetensors: no code runs on load)."""
    from safetensors.torch import load_file

    verify_version(directory, expected_sha256)
    return load_file(str(Path(directory) / WEIGHTS_FILE))


# ----------------------------------------------------------------------------- HTTP


class _StoreHandler(BaseHTTPRequestHandler):
    """``GET /versions/latest`` and ``GET /versions/{n}/{manifest.json,model.safetensors}``.

    ``timeout`` bounds every socket operation (an idle client is cut off), and a timer cuts off
    a client that has not sent its whole request head within ``timeout`` (one that trickles a
    byte at a time would otherwise hold its thread for ever).
    """

    store: Path
    timeout: float = SERVER_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:  # silence access logs
        return

    def setup(self) -> None:
        super().setup()
        self._head_timer = threading.Timer(self.timeout, self._cut_off)
        self._head_timer.daemon = True
        self._head_timer.start()

    def _cut_off(self) -> None:
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def parse_request(self) -> bool:
        ok = super().parse_request()
        self._head_timer.cancel()
        return ok

    def finish(self) -> None:
        self._head_timer.cancel()
        with contextlib.suppress(OSError):
            super().finish()

    def do_GET(self) -> None:
        parts = [p for p in self.path.split("?")[0].split("/") if p]
        if parts == ["versions", "latest"]:
            latest = latest_version(self.store)
            if latest is None:
                self._send(404, b'{"error": "no version yet"}', "application/json")
                return
            self._send(200, json.dumps({"version": latest}).encode(), "application/json")
            return
        if (
            len(parts) == 3
            and parts[0] == "versions"
            and parts[1].isascii()
            and parts[1].isdigit()
            and len(parts[1]) <= 10
            and parts[2] in (MANIFEST_FILE, WEIGHTS_FILE)
        ):
            path = version_dir(self.store, int(parts[1])) / parts[2]
            if path.is_file():
                self._send_file(path)
                return
        self._send(404, b'{"error": "not found"}', "application/json")

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        try:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client went away or stalled past the timeout
            self.close_connection = True

    def _send_file(self, path: Path) -> None:
        try:
            fh = path.open("rb")
        except FileNotFoundError:  # pruned between the check and the open
            self._send(404, b'{"error": "pruned"}', "application/json")
            return
        with fh:
            size = os.fstat(fh.fileno()).st_size
            try:
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(size))
                self.end_headers()
                while chunk := fh.read(CHUNK):
                    self.wfile.write(chunk)
            except OSError:  # the client went away or stopped reading for ``timeout``
                self.close_connection = True


_BUSY = b'{"error": "too many connections"}'
_BUSY_RESPONSE = (
    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Retry-After: 1\r\nConnection: close\r\nContent-Length: "
    + str(len(_BUSY)).encode()
    + b"\r\n\r\n"
    + _BUSY
)


class _CappedServer(ThreadingHTTPServer):
    """A thread per connection, at most ``max_connections`` of them: past that, 503 and close."""

    daemon_threads = True
    block_on_close = False  # stop() must not wait for a slow client's download

    def __init__(self, address: tuple[str, int], handler: Any, max_connections: int) -> None:
        self._slots = threading.BoundedSemaphore(max_connections)
        self.refused = 0
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            self._turn_away(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _turn_away(self, request: socket.socket) -> None:
        # In the accepting thread, so nothing here may wait: a short non-blocking answer.
        try:
            request.setblocking(False)
            with contextlib.suppress(OSError):
                request.recv(65536)  # what the client sent already, so close() sends no RST
            request.send(_BUSY_RESPONSE)
        except OSError:
            pass
        finally:
            self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("weight server: request from %s failed", client_address, exc_info=True)


class WeightServer:
    """Serves a store read-only over HTTP so replicas on other hosts need no shared volume.

    ``timeout_s``: a client idle that long (before or during its request, or while it should
    be reading a file) is cut off. ``max_connections``: connections served at once; one more
    is answered 503 and closed.
    """

    def __init__(
        self,
        store: str | Path,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        timeout_s: float = SERVER_TIMEOUT_S,
        max_connections: int = SERVER_MAX_CONNECTIONS,
    ) -> None:
        if not (timeout_s > 0 and max_connections >= 1):
            raise ValueError("timeout_s must be > 0 and max_connections >= 1")
        handler = type(
            "Handler", (_StoreHandler,), {"store": Path(store), "timeout": float(timeout_s)}
        )
        self._server = _CappedServer((host, port), handler, max_connections)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def refused(self) -> int:
        """Connections turned away (503) because ``max_connections`` were being served."""
        return self._server.refused

    def start(self) -> WeightServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
