"""Which policy version the engine serves, and how a new one gets in (or is refused).

An announced version is first admitted (:mod:`services.weights.trust`): its signature when the
replica holds ``weights.announce_secret`` (refused ``unsigned`` or ``forged``), and its location,
which must lie in an allowed source (refused ``source``, before any request is made). Versions
found in the replica's own ``weights.store`` need no signature. Then it is loaded in four steps:
locate it (a store directory, one version's directory, or a trainer's HTTP weight server, with a
bounded download), verify it (manifest sha256 as announced, file size and sha256, safetensors
header = manifest), check that its tensor names and shapes are exactly those of the served
model's checkpoint (these three in :mod:`services.weights.fetch`), then reload it in place.
Anything that fails before the last step leaves the engine untouched and the old version
serving; the reason is counted in ``mapo_inference_reload_failures_total``.

Versions never mix inside one generation: every generation holds the :class:`VersionGate`
shared, and a reload holds it exclusively. A reload therefore waits for in-flight requests to
finish (new ones wait behind it), swaps the weights, resets the prefix cache (its KV entries
were computed by the old weights) and reopens the gate. Every group and completion is stamped
with the version read while it held the gate.

Version 0 is the base model as loaded. Without ``force``, announcements of a version not newer
than the one served are ignored, so a replayed or reordered announcement never rolls back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from services.core.schemas import WeightAnnouncement
from services.weights.base_model import TensorSpec, safetensors_files, tensor_spec
from services.weights.fetch import check_version, is_url, locate_version, remote_latest_version
from services.weights.store import (
    WEIGHTS_FILE,
    Manifest,
    VersionMismatch,
    VersionMissing,
    WeightsCorrupt,
    WeightsIncompatible,
    WeightsTooLarge,
    WeightStoreError,
    latest_version,
    list_versions,
)
from services.weights.trust import Refused, WeightTrust

log = logging.getLogger(__name__)


class Reloader(Protocol):
    """What the weight manager needs from the engine."""

    async def reload_files(self, paths: Sequence[str], expected: TensorSpec) -> None: ...

    async def reset_prefix_cache(self) -> None: ...


class ReloadRefused(RuntimeError):
    """A version that was not loaded; ``reason`` is the metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Candidate:
    """A version that could be loaded, and where it was seen."""

    version: int
    location: str
    manifest_sha256: str | None = None
    step: int = 0
    #: The weights file's size as announced (0: not said).
    file_bytes: int = 0
    #: The announcement it came from (its signature is checked); None: the replica's own store.
    announcement: WeightAnnouncement | None = None

    @classmethod
    def announced(cls, msg: WeightAnnouncement) -> Candidate:
        """The candidate an announcement names."""
        return cls(msg.version, msg.location, msg.manifest_sha256, msg.step, msg.file_bytes, msg)


@dataclass(frozen=True)
class Served:
    """The version the engine computes with now."""

    version: int
    step: int
    files: tuple[str, ...]
    loaded_at: float


class VersionGate:
    """Many generations at once, or one reload: never both.

    A waiting reload closes the gate to new generations, so a steady stream of requests
    cannot starve it; it then waits for the running ones to finish.
    """

    def __init__(self) -> None:
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._open = asyncio.Event()
        self._open.set()
        self._writer = asyncio.Lock()

    @property
    def active(self) -> int:
        return self._active

    @property
    def closed(self) -> bool:
        return not self._open.is_set()

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        while not self._open.is_set():
            await self._open.wait()
        self._active += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._active -= 1
            if self._active == 0:
                self._idle.set()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._writer:
            self._open.clear()
            try:
                while self._active:
                    await self._idle.wait()
                yield
            finally:
                self._open.set()


# Why a version was refused (the metric label), by the type of the failure.
_REASONS: tuple[tuple[type[WeightStoreError], str], ...] = (
    (WeightsTooLarge, "too_large"),
    (WeightsCorrupt, "corrupt"),
    (VersionMissing, "missing"),
    (VersionMismatch, "mismatch"),
    (WeightsIncompatible, "incompatible"),
)


def _refusal(exc: WeightStoreError, otherwise: str) -> ReloadRefused:
    """The refusal for a weight-store failure; ``otherwise`` names one of no specific type."""
    reason = next((r for kind, r in _REASONS if isinstance(exc, kind)), otherwise)
    return ReloadRefused(reason, str(exc))


class WeightManager:
    """Tracks the served version; verifies, refuses or reloads new ones."""

    def __init__(
        self,
        reloader: Reloader,
        model_dir: Path,
        *,
        store: str = "",
        trust: WeightTrust | None = None,
        cache_dir: Path | None = None,
        on_change: Callable[[int], None] | None = None,
        on_reload: Callable[[float], None] | None = None,
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        self.reloader = reloader
        self.model_dir = model_dir
        self.store = store
        # Without rules of its own (tests, benchmarks): the store only, unsigned accepted.
        self.trust = trust if trust is not None else WeightTrust.build([store])
        self.trust.warn_if_weak()
        self.cache_dir = cache_dir or Path(tempfile.mkdtemp(prefix="mapo-weights-"))
        self.expected = tensor_spec(model_dir)
        self.gate = VersionGate()
        self.served = Served(0, 0, tuple(str(p) for p in safetensors_files(model_dir)), time.time())
        self.healthy = True  # False if a failed in-place reload left the weights unknown
        self.last_error = ""
        # Seconds of the last successful load: locate + verify, and the in-place reload.
        self.last_timing: dict[str, float] = {}
        self._lock = asyncio.Lock()
        self._on_change = on_change or (lambda v: None)
        self._on_reload = on_reload or (lambda s: None)
        self._on_failure = on_failure or (lambda r: None)

    @property
    def version(self) -> int:
        return self.served.version

    # ------------------------------------------------------------------ finding versions

    def store_candidates(self) -> list[Candidate]:
        """Versions in the configured store, newest first (a directory, or an HTTP server)."""
        if not self.store:
            return []
        if is_url(self.store):
            latest = remote_latest_version(self.store, min(10.0, self.trust.fetch_timeout_s))
            return [] if latest is None else [Candidate(latest, self.store)]
        if not Path(self.store).is_dir():
            return []
        newest = latest_version(self.store)
        versions = sorted(set(list_versions(self.store)) | ({newest} if newest else set()))
        return [Candidate(v, self.store) for v in reversed(versions)]

    # ------------------------------------------------------------------ admitting

    def admit(self, cand: Candidate) -> None:
        """Refuse a candidate whose announcement is not signed as required, or whose location
        is outside the allowed sources (nothing is fetched before this passes)."""
        try:
            if cand.announcement is not None:
                self.trust.check_announcement(cand.announcement)
            self.trust.check_location(cand.location)
        except Refused as exc:
            raise ReloadRefused(exc.reason, str(exc)) from None

    def newest_acceptable(self, msgs: Iterable[WeightAnnouncement]) -> WeightAnnouncement | None:
        """The newest of ``msgs`` that :meth:`admit` accepts; each refused one is counted and
        logged here, so a forged announcement of a high version cannot hide a genuine one
        that arrived with it."""
        newest: WeightAnnouncement | None = None
        for msg in msgs:
            try:
                self.admit(Candidate.announced(msg))
            except ReloadRefused as exc:
                self._refuse(exc)
                continue
            if newest is None or msg.version > newest.version:
                newest = msg
        return newest

    # ------------------------------------------------------------------ loading

    async def load_newest(self, candidates: Sequence[Candidate]) -> int:
        """Load the newest candidate that passes every check (start-up and admin reloads)."""
        for cand in sorted(candidates, key=lambda c: c.version, reverse=True):
            if cand.version <= self.version:
                break
            try:
                return await self.apply(cand)
            except ReloadRefused as exc:
                log.warning("version %d refused, trying an older one: %s", cand.version, exc)
        return self.version

    async def apply(self, cand: Candidate, *, force: bool = False) -> int:
        """Verify and load ``cand``; raise :class:`ReloadRefused` and keep the old weights if any
        check fails. Returns the version served afterwards."""
        async with self._lock:
            try:
                self.admit(cand)
            except ReloadRefused as exc:
                self._refuse(exc)
                raise
            if not force and cand.version <= self.version:
                log.info("version %d is not newer than %d: ignored", cand.version, self.version)
                return self.version
            started = time.perf_counter()
            try:
                directory = await asyncio.to_thread(self._locate, cand)
                manifest = await asyncio.to_thread(self._verify, directory, cand)
            except ReloadRefused as exc:
                self._refuse(exc)
                raise
            prepared = time.perf_counter() - started
            files = (str(directory / WEIGHTS_FILE),)
            async with self.gate.exclusive():
                swap_started = time.perf_counter()
                await self._swap(files, manifest)
                swap = time.perf_counter() - swap_started
            self.last_timing = {"verify_s": prepared, "reload_s": swap}
            self._on_reload(prepared + swap)
            log.info(
                "serving version %d (step %d): verify %.3f s, reload %.3f s",
                manifest.version,
                manifest.step,
                prepared,
                swap,
            )
            return self.version

    def _locate(self, cand: Candidate) -> Path:
        try:
            return locate_version(
                cand.location,
                cand.version,
                self.cache_dir,
                cand.manifest_sha256,
                max_bytes=self.trust.max_version_bytes,
                expected_bytes=cand.file_bytes,
                timeout_s=self.trust.fetch_timeout_s,
            )
        except WeightStoreError as exc:
            raise _refusal(exc, "unavailable") from None

    def _verify(self, directory: Path, cand: Candidate) -> Manifest:
        try:
            return check_version(
                directory,
                cand.version,
                cand.manifest_sha256,
                self.expected,
                expected_bytes=cand.file_bytes,
            )
        except WeightStoreError as exc:
            raise _refusal(exc, "corrupt") from None

    async def _swap(self, files: tuple[str, ...], manifest: Manifest) -> None:
        try:
            await self.reloader.reload_files(files, self.expected)
            await self.reloader.reset_prefix_cache()
        except Exception as exc:
            # The engine may hold part of the new weights: put the old ones back.
            self.healthy = False
            self._refuse(ReloadRefused("engine", f"in-place reload failed: {exc}"))
            try:
                await self.reloader.reload_files(self.served.files, self.expected)
                await self.reloader.reset_prefix_cache()
                self.healthy = True
            except Exception as restore_exc:
                log.error("could not restore version %d: %s", self.version, restore_exc)
            raise ReloadRefused("engine", f"in-place reload failed: {exc}") from exc
        self.served = Served(manifest.version, manifest.step, files, time.time())
        self.last_error = ""
        self._on_change(manifest.version)
        self._prune_cache()

    def _refuse(self, exc: ReloadRefused) -> None:
        self.last_error = str(exc)
        self._on_failure(exc.reason)
        log.warning(
            "weights refused (%s), still serving version %d: %s", exc.reason, self.version, exc
        )

    def _prune_cache(self) -> None:
        """Keep only the served version among downloaded ones."""
        served_dir = Path(self.served.files[0]).parent
        for child in self.cache_dir.glob("v*"):
            if child != served_dir and child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
