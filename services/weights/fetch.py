"""A replica's side of the weight store: find a version, download it, check it before use.

A version's location is a version directory, a store directory, or the base URL of a trainer's
:class:`~services.weights.store.WeightServer` (downloaded into a local cache, which is laid out
like a store). Failures are :class:`~services.weights.store.WeightStoreError` subclasses, so a
caller tells a corrupt version from an unreachable server by type.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path

from services.weights.store import (
    CHUNK,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    Manifest,
    VersionMismatch,
    VersionMissing,
    WeightStoreError,
    check_compatible,
    verify_version,
    version_dir,
    versions_in,
)

log = logging.getLogger(__name__)


def is_url(location: str) -> bool:
    return location.startswith(("http://", "https://"))


def remote_latest_version(base_url: str, timeout_s: float = 10.0) -> int | None:
    """The newest version a weight server offers; None if it has none or is unreachable."""
    import httpx

    try:
        resp = httpx.get(f"{base_url.rstrip('/')}/versions/latest", timeout=timeout_s)
    except httpx.HTTPError as exc:
        log.warning("weight server %s unreachable: %s", base_url, exc)
        return None
    if resp.status_code != 200:
        return None
    return int(resp.json()["version"])


def fetch_version(
    base_url: str,
    version: int,
    cache_dir: str | Path,
    expected_sha256: str | None = None,
    timeout_s: float = 60.0,
) -> Path:
    """Download a version from a trainer's weight server into ``cache_dir`` and verify it."""
    import httpx

    final = version_dir(cache_dir, version)
    if final.is_dir():
        with contextlib.suppress(WeightStoreError):
            verify_version(final, expected_sha256)
            return final
        shutil.rmtree(final, ignore_errors=True)
    base = base_url.rstrip("/")
    try:
        with (
            versions_in(cache_dir).writing(version) as tmp,
            httpx.Client(timeout=timeout_s) as client,
        ):
            for name in (MANIFEST_FILE, WEIGHTS_FILE):
                url = f"{base}/versions/{version}/{name}"
                with client.stream("GET", url) as resp:
                    if resp.status_code != 200:
                        raise WeightStoreError(f"GET {url} answered {resp.status_code}")
                    with (tmp / name).open("wb") as fh:
                        for chunk in resp.iter_bytes(CHUNK):
                            fh.write(chunk)
            verify_version(tmp, expected_sha256)
    except httpx.HTTPError as exc:
        raise WeightStoreError(f"cannot fetch version {version} from {base}: {exc}") from None
    return final


def locate_version(
    location: str, version: int, cache_dir: Path, expected_sha256: str | None = None
) -> Path:
    """The local directory of ``version`` at ``location`` (downloaded first from a URL)."""
    if is_url(location):
        return fetch_version(location, version, cache_dir, expected_sha256)
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
) -> Manifest:
    """Verify a version's files, that it is ``version``, and that it fits the served model."""
    manifest = verify_version(directory, expected_sha256)
    if manifest.version != version:
        raise VersionMismatch(f"{directory} holds version {manifest.version}, expected {version}")
    check_compatible(manifest, served)
    return manifest
