"""The image codec every role shares. Images cross processes as encoded bytes (PNG/JPEG/WebP: `ToolItem.image`,
`Trajectory.images`); whoever needs pixels decodes them here, and whoever must refuse a pixel bomb reads the size
from the header alone first."""
from __future__ import annotations

import io

from PIL import Image


class ImageError(ValueError):
    """Bytes that are not a readable image; `too_large` when PIL refused them as a decompression bomb."""

    def __init__(self, message: str, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header alone (no pixel is decoded); ImageError on anything unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image exceeds the pixel limit: {exc}", too_large=True) from exc
    except Exception as exc:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise ImageError(f"undecodable image ({len(data)} bytes): {exc}") from exc


def open_image(data: bytes) -> Image.Image:
    """The image fully decoded in its own mode; ImageError on bad data (truncated data fails only at load)."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image exceeds the pixel limit: {exc}", too_large=True) from exc
    except Exception as exc:  # PIL raises several unrelated types for bad data
        raise ImageError(f"undecodable image ({len(data)} bytes): {exc}") from exc
    return image


def decode_image(data: bytes) -> Image.Image:
    """Encoded image bytes to an RGB PIL image; ImageError (a ValueError) on anything else."""
    return open_image(data).convert("RGB")


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes of `image`; PIL writes no timestamps, so equal pixels give equal bytes."""
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=6)
    return out.getvalue()


def png_thumbnail(image: Image.Image, side: int, resample: Image.Resampling = Image.Resampling.BICUBIC) -> bytes:
    """PNG bytes of `image` in RGB, shrunk (aspect kept) so that neither side exceeds `side`."""
    thumb = image.convert("RGB")
    thumb.thumbnail((side, side), resample)
    return encode_png(thumb)
