"""A replica's side of the weight store: find a version, download it, check it before use.

A version's location is a version directory, a store directory, or the base URL of a trainer's
:class:`~services.weights.store.WeightServer` (downloaded into a local cache, which is laid out
like a store). Failures are :class:`~services.weights.store.WeightStoreError` subclasses, so a
caller tells a corrupt version from an unreachable server by type.

A download is bounded and checked as it streams, never after the fact: the manifest first (at
most :data:`~services.weights.store.MAX_MANIFEST_BYTES`, its sha256 compared with the announced
one before anything else is fetched), then the weights file, whose size the manifest states.
A file larger than ``max_bytes`` is refused before its first byte; a server that sends more
than the manifest's size is cut off at the excess byte; fewer is a truncated download; both
file and manifest are hashed while they are written. Every socket operation has a timeout, and
the whole download a deadline (at least :data:`MIN_RATE` bytes per second), so a server that
hangs or trickles cannot hold a replica. Redirects are not followed and responses must not be
compressed. A failed download leaves nothing behind: the version appears whole or not at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from services.weights.store import (
    MANIFEST_FILE,
    MAX_MANIFEST_BYTES,
    WEIGHTS_FILE,
    Manifest,
    VersionMismatch,
    VersionMissing,
    WeightsCorrupt,
    WeightsTooLarge,
    WeightStoreError,
    check_compatible,
    check_tensors,
    verify_version,
    version_dir,
    versions_in,
)
from services.weights.trust import is_url

if TYPE_CHECKING:
    import httpx

__all__ = [
    "DEFAULT_MAX_BYTES",
    "MIN_RATE",
    "check_version",
    "fetch_version",
    "is_url",
    "locate_version",
    "remote_latest_version",
]

log = logging.getLogger(__name__)

#: ``weights.max_version_bytes``'s default: the largest weights file downloaded.
DEFAULT_MAX_BYTES = 1 << 38
#: The slowest download tolerated (bytes/s): the deadline is the timeout plus size / MIN_RATE.
MIN_RATE = 1 << 20
_LATEST_MAX_BYTES = 4096


def remote_latest_version(base_url: str, timeout_s: float = 10.0) -> int | None:
    """The newest version a weight server offers; None if it has none or is unreachable."""
    import httpx

    url = f"{base_url.rstrip('/')}/versions/latest"
    try:
        with (
            httpx.Client(timeout=timeout_s, follow_redirects=False) as client,
            client.stream("GET", url, headers={"Accept-Encoding": "identity"}) as resp,
        ):
            if resp.status_code != 200:
                return None
            body = b""
            for chunk in resp.iter_raw():
                body += chunk
                if len(body) > _LATEST_MAX_BYTES:
                    log.warning("weight server %s: /versions/latest is too long", base_url)
                    return None
    except httpx.HTTPError as exc:
        log.warning("weight server %s unreachable: %s", base_url, exc)
        return None
    try:
        version = json.loads(body)["version"]
    except (ValueError, KeyError, TypeError):
        log.warning('weight server %s: /versions/latest is not {"version": N}', base_url)
        return None
    if type(version) is not int or version < 0:
        log.warning("weight server %s: /versions/latest names no version", base_url)
        return None
    return version


def _download(
    client: httpx.Client,
    url: str,
    dest: Path,
    *,
    limit: int,
    exact: bool,
    timeout_s: float,
    what: str,
) -> str:
    """Stream ``url`` into ``dest``, hashing as it goes; return the sha256 (hex).

    At most ``limit`` bytes (``exact``: exactly ``limit``); more is cut off at the excess
    byte, fewer (with ``exact``) is a truncated download. The whole body must arrive within
    ``timeout_s`` plus its size (as declared, else ``limit``) at :data:`MIN_RATE`.
    """
    import httpx

    digest = hashlib.sha256()
    got = 0
    try:
        with client.stream("GET", url, headers={"Accept-Encoding": "identity"}) as resp:
            if resp.status_code != 200:
                raise WeightStoreError(f"GET {url} answered {resp.status_code}")
            encoding = resp.headers.get("content-encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                raise WeightStoreError(f"GET {url}: compressed response ({encoding}) refused")
            declared = resp.headers.get("content-length")
            if declared is not None:
                if not declared.strip().isdigit():
                    raise WeightStoreError(f"GET {url}: invalid Content-Length {declared[:40]!r}")
                if int(declared) > limit:
                    raise WeightsTooLarge(
                        f"GET {url}: the server offers {int(declared)} bytes, more than the "
                        f"{limit} the {what} may have; nothing downloaded"
                    )
            expected = limit if declared is None else int(declared)
            deadline = time.monotonic() + timeout_s + expected / MIN_RATE
            with dest.open("wb") as fh:
                for chunk in resp.iter_raw():
                    got += len(chunk)
                    if got > limit:
                        raise WeightsCorrupt(
                            f"GET {url}: the server sent more than the {limit} bytes the "
                            f"{what} may have; download aborted"
                        )
                    digest.update(chunk)
                    fh.write(chunk)
                    if time.monotonic() > deadline:
                        raise WeightStoreError(
                            f"GET {url}: too slow, {got} bytes of the {what} after "
                            f"{timeout_s:g} s + {MIN_RATE} bytes/s; download aborted"
                        )
                fh.flush()
                os.fsync(fh.fileno())
    except httpx.RemoteProtocolError as exc:
        raise WeightStoreError(
            f"GET {url}: truncated download, the connection closed after {got} bytes ({exc})"
        ) from None
    if exact and got != limit:
        raise WeightStoreError(
            f"GET {url}: truncated download, {got} of the {limit} bytes the {what} has"
        )
    return digest.hexdigest()


def fetch_version(
    base_url: str,
    version: int,
    cache_dir: str | Path,
    expected_sha256: str | None = None,
    timeout_s: float = 60.0,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    expected_bytes: int = 0,
) -> Path:
    """Download a version from a trainer's weight server into ``cache_dir`` and verify it.

    ``expected_sha256``: the manifest's (as announced); ``expected_bytes``: the weights file's
    size as announced (0: not said); ``max_bytes``: the largest weights file accepted;
    ``timeout_s``: every connect, read and write.
    """
    import httpx

    final = version_dir(cache_dir, version)
    if final.is_dir():
        with contextlib.suppress(WeightStoreError):
            manifest = verify_version(final, expected_sha256)
            _check_size(manifest, max_bytes, expected_bytes)
            return final
        shutil.rmtree(final, ignore_errors=True)
    if expected_bytes > max_bytes:
        raise WeightsTooLarge(
            f"version {version} is announced with {expected_bytes} bytes, more than "
            f"weights.max_version_bytes = {max_bytes}; nothing downloaded"
        )
    base = base_url.rstrip("/")
    try:
        with (
            versions_in(cache_dir).writing(version) as tmp,
            httpx.Client(timeout=timeout_s, follow_redirects=False) as client,
        ):
            prefix = f"{base}/versions/{version}"
            sha = _download(
                client,
                f"{prefix}/{MANIFEST_FILE}",
                tmp / MANIFEST_FILE,
                limit=MAX_MANIFEST_BYTES,
                exact=False,
                timeout_s=timeout_s,
                what="manifest",
            )
            if expected_sha256 is not None and sha != expected_sha256:
                raise WeightsCorrupt(
                    f"the manifest of version {version} at {base} does not match the "
                    "announced sha256"
                )
            manifest = Manifest.from_json((tmp / MANIFEST_FILE).read_bytes())
            if manifest.version != version:
                raise VersionMismatch(
                    f"{base} serves version {manifest.version} as version {version}"
                )
            _check_size(manifest, max_bytes, expected_bytes)
            digest = _download(
                client,
                f"{prefix}/{WEIGHTS_FILE}",
                tmp / WEIGHTS_FILE,
                limit=manifest.file_bytes,
                exact=True,
                timeout_s=timeout_s,
                what=f"weights file of version {version}",
            )
            if digest != manifest.file_sha256:
                raise WeightsCorrupt(
                    f"the weights file of version {version} at {base} does not match its "
                    "manifest sha256 (corrupt)"
                )
            check_tensors(tmp / WEIGHTS_FILE, manifest)
    except httpx.TimeoutException as exc:
        raise WeightStoreError(
            f"cannot fetch version {version} from {base}: no answer within {timeout_s:g} s "
            f"({type(exc).__name__})"
        ) from None
    except httpx.HTTPError as exc:
        raise WeightStoreError(f"cannot fetch version {version} from {base}: {exc}") from None
    except OSError as exc:  # the cache: disk full, permissions
        raise WeightStoreError(f"cannot store version {version} in {cache_dir}: {exc}") from None
    return final


def _check_size(manifest: Manifest, max_bytes: int, expected_bytes: int) -> None:
    if expected_bytes and manifest.file_bytes != expected_bytes:
        raise WeightsCorrupt(
            f"version {manifest.version}: the announcement says {expected_bytes} bytes, the "
            f"manifest {manifest.file_bytes}"
        )
    if manifest.file_bytes > max_bytes:
        raise WeightsTooLarge(
            f"version {manifest.version} has {manifest.file_bytes} bytes, more than "
            f"weights.max_version_bytes = {max_bytes}"
        )


def locate_version(
    location: str,
    version: int,
    cache_dir: Path,
    expected_sha256: str | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    expected_bytes: int = 0,
    timeout_s: float = 60.0,
) -> Path:
    """The local directory of ``version`` at ``location`` (downloaded first from a URL).

    Whether ``location`` may be used at all is the caller's to check first
    (:meth:`services.weights.trust.WeightTrust.check_location`).
    """
    if is_url(location):
        return fetch_version(
            location,
            version,
            cache_dir,
            expected_sha256,
            timeout_s,
            max_bytes=max_bytes,
            expected_bytes=expected_bytes,
        )
    path = Path(location)
    if (path / MANIFEST_FILE).is_file():
        return path
    directory = version_dir(path, version)
    if not directory.is_dir():
        raise VersionMissing(f"version {version} is not in {path}")
    return directory


def check_version(
    directory: Path,
    version: int,
    expected_sha256: str | None,
    served: Mapping[str, tuple[tuple[int, ...], str]],
    *,
    expected_bytes: int = 0,
) -> Manifest:
    """Verify a version's files, that it is ``version``, and that it fits the served model."""
    manifest = verify_version(directory, expected_sha256)
    if manifest.version != version:
        raise VersionMismatch(f"{directory} holds version {manifest.version}, expected {version}")
    if expected_bytes and manifest.file_bytes != expected_bytes:
        raise WeightsCorrupt(
            f"{directory}: the announcement says {expected_bytes} bytes, the manifest "
            f"{manifest.file_bytes}"
        )
    check_compatible(manifest, served)
    return manifest
