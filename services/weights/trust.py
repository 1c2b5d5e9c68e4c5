"""What a replica trusts: signed weight announcements, and the places it loads versions from.

**Signatures.** With ``weights.announce_secret`` set, the trainer signs every announcement: an
HMAC-SHA256, keyed with that secret, over :func:`canonical` (a fixed domain line, then every
field of the :class:`~services.core.schemas.WeightAnnouncement` but the signature itself, as
JSON with sorted keys). A replica with the secret refuses an announcement that is unsigned
(``unsigned``) or whose signature does not match (``forged``) before it looks at the location.
The manifest's sha256 is one of the signed fields, and the manifest holds the weights file's
size and sha256, so a signature covers every byte the replica then loads. Without a secret,
announcements are accepted unsigned and both sides say so in a warning at start-up: whoever can
write to the bus can then announce a version (still only from an allowed source, below).

**Sources.** A replica loads a version only from its own ``weights.store``, the trainer's
``trainer.weights_url`` (or ``http://<weights_host>:<weights_port>`` when that is served) and
the entries of ``weights.allowed_sources``: directories (the location must lie inside one, after
symbolic links are resolved) and URL prefixes ``http(s)://host[:port][/path]`` (same scheme,
host and port, ``*`` for any port; a port left out is the scheme's default; the path must lie
under the prefix's). A location elsewhere is refused (``source``) before any request is made, so
an announcement cannot make replicas fetch from an address of its choosing. URLs with user
info, a query, a fragment, ``.``/``..`` segments, spaces or control characters are refused too.

Pure functions and stdlib only: the config layer and the CLI can use this module without torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final
from urllib.parse import unquote, urlsplit

from services.core.schemas import WeightAnnouncement

if TYPE_CHECKING:
    from services.core.config import RunConfig

log = logging.getLogger(__name__)

#: What a signature is over, first: a signature for anything else never verifies here.
ANNOUNCE_DOMAIN: Final = b"mapo-rl weight announcement v1\n"
#: Keys shorter than this are accepted with a warning (a guessable key is hardly a key).
SHORT_KEY_CHARS: Final = 16
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_WILDCARD_HOSTS: Final = ("0.0.0.0", "::", "")
_PRINTABLE: Final = re.compile(r"[\x21-\x7e]+")


class Refused(ValueError):
    """An announcement or location a replica does not accept; ``reason`` is the metric label
    (``unsigned``, ``forged`` or ``source``)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class SourceError(ValueError):
    """A location or ``weights.allowed_sources`` entry that is not a usable directory or URL."""


# ----------------------------------------------------------------------------- signatures


def canonical(msg: WeightAnnouncement) -> bytes:
    """The bytes an announcement's signature is over: every field but ``signature``.

    Built from the dataclass's fields, so a field added to the schema is signed as well.
    Floats are written with Python's shortest round-trip form, which the msgpack float64 on the
    wire preserves exactly.
    """
    body = {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg) if f.name != "signature"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return ANNOUNCE_DOMAIN + text.encode("ascii")


def signature(msg: WeightAnnouncement, key: str) -> str:
    """The HMAC-SHA256 of ``msg`` under ``key``, 64 lowercase hex digits."""
    if not key:
        raise ValueError("an announcement cannot be signed with an empty key")
    return hmac.new(key.encode("utf-8"), canonical(msg), hashlib.sha256).hexdigest()


def sign(msg: WeightAnnouncement, key: str) -> WeightAnnouncement:
    """``msg`` with its signature under ``key``."""
    return dataclasses.replace(msg, signature=signature(msg, key))


def verify(msg: WeightAnnouncement, key: str) -> None:
    """Refuse ``msg`` unless it is signed with ``key`` (no key: everything passes)."""
    if not key:
        return
    where = f"announcement of version {msg.version}"
    if not msg.signature:
        raise Refused(
            "unsigned", f"{where} is unsigned, and this replica requires weights.announce_secret"
        )
    if not hmac.compare_digest(msg.signature, signature(msg, key)):
        raise Refused(
            "forged",
            f"{where} has a signature that does not match weights.announce_secret (forged, "
            "altered, or signed with another key)",
        )


# ----------------------------------------------------------------------------- sources


def is_url(location: str) -> bool:
    return location.startswith(("http://", "https://"))


@dataclass(frozen=True)
class UrlSource:
    scheme: str
    host: str
    port: int | None  # None: any port
    path: str  # without a trailing slash; "" is the root

    def admits(self, other: UrlSource) -> bool:
        return (
            self.scheme == other.scheme
            and self.host == other.host
            and (self.port is None or self.port == other.port)
            and (other.path == self.path or other.path.startswith(self.path + "/"))
        )

    def __str__(self) -> str:
        port = "*" if self.port is None else str(self.port)
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{port}{self.path}"


def parse_url(text: str, *, wildcard_port: bool = False) -> UrlSource:
    """An http(s) URL as scheme, host, port and path; anything ambiguous is a SourceError."""
    shown = text if len(text) <= 200 else text[:200] + "..."
    if not _PRINTABLE.fullmatch(text) or "\\" in text:
        raise SourceError(f"{shown!r} holds spaces, control or non-ASCII characters")
    any_port = False
    parts = urlsplit(text)
    netloc = parts.netloc
    if wildcard_port and netloc.endswith(":*"):
        any_port = True
        parts = urlsplit(text.replace(netloc, netloc[:-2], 1))
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise SourceError(f"{shown!r} is not an http(s) URL")
    if "@" in parts.netloc:
        raise SourceError(f"{shown!r} has user info (user@ or user:password@)")
    if parts.query or parts.fragment or "?" in text or "#" in text:
        raise SourceError(f"{shown!r} has a query or a fragment")
    host = parts.hostname
    if not host:
        raise SourceError(f"{shown!r} names no host")
    try:
        port = parts.port
    except ValueError:
        raise SourceError(f"{shown!r} has an invalid port") from None
    if any(seg in (".", "..") for seg in unquote(parts.path).split("/")):
        raise SourceError(f"{shown!r} has a '.' or '..' path segment")
    return UrlSource(
        scheme=scheme,
        host=host.lower(),
        port=None if any_port else (port if port is not None else _DEFAULT_PORTS[scheme]),
        path=parts.path.rstrip("/"),
    )


def parse_source(entry: str) -> UrlSource | Path:
    """A ``weights.allowed_sources`` entry: a URL prefix, or a directory (resolved)."""
    if "://" in entry:
        return parse_url(entry, wildcard_port=True)
    if not entry.strip():
        raise SourceError("an empty entry")
    return Path(entry).resolve()


def advertised_url(config: RunConfig, port: int) -> str:
    """Where replicas reach the trainer's weight server: the configured URL, else its host."""
    if config.trainer.weights_url:
        return config.trainer.weights_url.rstrip("/")
    host = config.trainer.weights_host
    if host in _WILDCARD_HOSTS:
        host = socket.gethostname()
    return f"http://{host}:{port}"


def default_sources(config: RunConfig) -> list[str]:
    """The sources a replica of this config accepts: its store, the trainer's weight server
    as the trainer would advertise it, and ``weights.allowed_sources``."""
    out = [config.weights.store]
    if config.trainer.weights_url:
        out.append(config.trainer.weights_url)
    elif config.trainer.weights_port > 0:
        out.append(advertised_url(config, config.trainer.weights_port))
    return out + list(config.weights.allowed_sources)


@dataclass(frozen=True)
class WeightTrust:
    """A replica's rules for announced versions: the key, the sources, the download caps."""

    key: str = ""
    sources: tuple[UrlSource | Path, ...] = ()
    max_version_bytes: int = 1 << 38
    fetch_timeout_s: float = 60.0

    @classmethod
    def build(
        cls,
        sources: list[str],
        *,
        key: str = "",
        max_version_bytes: int = 1 << 38,
        fetch_timeout_s: float = 60.0,
    ) -> WeightTrust:
        parsed: list[UrlSource | Path] = []
        for entry in sources:
            if not entry:
                continue
            try:
                parsed.append(parse_source(entry))
            except SourceError as exc:
                raise SourceError(f"weight source {exc}") from None
        return cls(key, tuple(dict.fromkeys(parsed)), max_version_bytes, fetch_timeout_s)

    @classmethod
    def from_config(cls, config: RunConfig) -> WeightTrust:
        w = config.weights
        return cls.build(
            default_sources(config),
            key=w.announce_secret,
            max_version_bytes=w.max_version_bytes,
            fetch_timeout_s=w.fetch_timeout_s,
        )

    def describe(self) -> str:
        return ", ".join(str(s) for s in self.sources) or "none"

    def warn_if_weak(self) -> None:
        """The start-up warning of a replica that accepts unsigned announcements."""
        if not self.key:
            log.warning(
                "weights.announce_secret is not set: weight announcements are accepted "
                "unsigned (whoever can write to the bus can announce a version; it is loaded "
                "only from %s). Set the same secret on the trainer and the replicas.",
                self.describe(),
            )
        elif len(self.key) < SHORT_KEY_CHARS:
            log.warning(
                "weights.announce_secret has fewer than %d characters: easy to guess",
                SHORT_KEY_CHARS,
            )

    def check_announcement(self, msg: WeightAnnouncement) -> None:
        """Refuse an announcement that is not signed as required or points elsewhere."""
        verify(msg, self.key)
        self.check_location(msg.location)

    def check_location(self, location: str) -> None:
        """Refuse (``source``) a location outside every allowed source; makes no request."""
        try:
            self._check_location(location)
        except SourceError as exc:
            raise Refused("source", f"weight location refused: {exc}") from None

    def _check_location(self, location: str) -> None:
        if is_url(location) or "://" in location:
            url = parse_url(location)
            if any(isinstance(s, UrlSource) and s.admits(url) for s in self.sources):
                return
            raise SourceError(
                f"{location!r} is not under an allowed weight source ({self.describe()}; "
                "weights.allowed_sources adds more)"
            )
        if "\x00" in location:
            raise SourceError("a location with a NUL character")
        try:
            path = Path(location).resolve()
        except (OSError, RuntimeError) as exc:  # a symbolic-link loop, a name too long
            raise SourceError(f"{location!r} cannot be resolved: {exc}") from None
        for source in self.sources:
            if isinstance(source, Path) and (path == source or source in path.parents):
                return
        raise SourceError(
            f"{location!r} is not inside an allowed weight source ({self.describe()}; "
            "weights.allowed_sources adds more)"
        )
