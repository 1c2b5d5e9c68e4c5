"""The image store: encoded images under their content address, beside the streams.

Images are stored once and messages carry references (``sha256:<hex>``), not bytes: a group's
image is read by the replica that rolls it out and by the trainer that trains on it, prompts are
redelivered and re-issued over epochs, and a picture can weigh more than all its rollouts
together. Keeping them beside the streams (the same Redis, or the same in-memory store) needs no
shared volume between hosts and no further service. A reference names its bytes exactly, so a
value is written once and never changes (SET NX); a reader checks the hash again, so damaged
bytes are refused rather than trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from services.core.images import (
    ImageError,
    ImageLimits,
    check_bytes,
    image_ref,
    is_ref,
    limits_of,
    short,
)
from services.transport.streams import Streams

if TYPE_CHECKING:
    from services.core.config import RunConfig
    from services.transport.bus import Bus


class ImageMissing(ImageError):
    """A reference whose image is not in the store (never stored, or the store lost it)."""


class ImageStore:
    """Put and get encoded images by reference, within ``limits.max_bytes`` each."""

    def __init__(self, streams: Streams, prefix: str, limits: ImageLimits) -> None:
        self.streams = streams
        self.prefix = prefix
        self.limits = limits

    def key(self, ref: str) -> str:
        return self.prefix + ref.removeprefix("sha256:")

    async def put(self, data: bytes) -> str:
        """Store ``data`` (if it is not there yet); its reference."""
        if len(data) > self.limits.max_bytes:
            raise ImageError(f"image has {len(data)} bytes; the limit is {self.limits.max_bytes}")
        ref = image_ref(data)
        await self.streams.put_blob(self.key(ref), data)
        return ref

    async def put_all(self, images: Sequence[bytes]) -> tuple[str, ...]:
        return tuple([await self.put(data) for data in images])

    async def get(self, ref: str) -> bytes:
        """The bytes of ``ref``, checked against it."""
        if not is_ref(ref):
            raise ImageError(f"'{ref[:80]}' is not an image reference (sha256:<64 hex digits>)")
        data = await self.streams.get_blob(self.key(ref))
        if data is None:
            raise ImageMissing(f"image {short(ref)} is not in the image store")
        if len(data) > self.limits.max_bytes:
            raise ImageError(
                f"image {short(ref)} has {len(data)} bytes; the limit is {self.limits.max_bytes}"
            )
        check_bytes(ref, data)
        return data

    async def get_all(self, refs: Sequence[str]) -> list[bytes]:
        return [await self.get(ref) for ref in refs]


def image_store(bus: Bus, config: RunConfig) -> ImageStore:
    """The run's image store, beside ``bus``'s streams."""
    return ImageStore(bus.streams, config.bus.images_prefix, limits_of(config))
