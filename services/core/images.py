"""Images of vision-language prompts: content addresses, and decoding with bounds.

An image travels once: the trainer stores its encoded bytes under their SHA-256
(:mod:`services.transport.images`) and messages carry only the reference ``sha256:<hex>``.
Whoever reads an image back checks that the bytes still hash to the reference and decodes
them here, within byte and pixel bounds, before a processor or the engine sees them: a missing,
oversized or undecodable image is refused with :class:`ImageError` and its reason, and the
message that named it is dead-lettered.
"""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from PIL import Image

    from services.core.config import RunConfig

REF_PREFIX: Final = "sha256:"
_REF = re.compile(r"sha256:[0-9a-f]{64}")
#: Images one message may name, whatever the config says (a bound on the wire format).
MAX_IMAGES_PER_MESSAGE: Final = 64


class ImageError(ValueError):
    """An image that cannot be used; the message says why (missing, too large, undecodable)."""


def image_ref(data: bytes) -> str:
    """The content address of encoded image bytes."""
    return REF_PREFIX + hashlib.sha256(data).hexdigest()


def is_ref(value: str) -> bool:
    return bool(_REF.fullmatch(value))


def check_bytes(ref: str, data: bytes) -> None:
    """Raise unless ``data`` is what ``ref`` addresses (a store can hold damaged bytes)."""
    if image_ref(data) != ref:
        raise ImageError(f"image {short(ref)} is corrupt: its bytes do not hash to its reference")


def short(ref: str) -> str:
    """A reference shortened for messages and logs."""
    return ref[: len(REF_PREFIX) + 12]


@dataclass(frozen=True)
class ImageLimits:
    """What a service accepts: encoded size and decoded pixels of one image."""

    max_bytes: int = 4 << 20
    max_pixels: int = 1 << 22


def limits_of(config: RunConfig) -> ImageLimits:
    """The image limits a run's config sets (``task.max_image_bytes`` / ``max_image_pixels``)."""
    return ImageLimits(config.task.max_image_bytes, config.task.max_image_pixels)


def decode_image(data: bytes, limits: ImageLimits, name: str = "image") -> Image.Image:
    """Encoded bytes to an RGB picture, refusing what is too large before decoding it.

    The pixel bound is checked from the header, so a small file that would expand into a huge
    picture (a decompression bomb) is refused without being decoded.
    """
    from PIL import Image, UnidentifiedImageError

    if len(data) > limits.max_bytes:
        raise ImageError(f"{name} has {len(data)} bytes; the limit is {limits.max_bytes}")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > limits.max_pixels:
                raise ImageError(
                    f"{name} is {width}x{height} pixels; the limit is {limits.max_pixels} pixels"
                )
            img.load()
            return img.convert("RGB")
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"{name} cannot be decoded: {exc}") from None


def encode_png(img: Image.Image) -> bytes:
    """PNG bytes of a picture (how images given as objects enter the store)."""
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()
