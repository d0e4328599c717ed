"""Helpers every test folder may use (importable because tests/conftest.py puts tests/ on the path)."""
from __future__ import annotations

from PIL import Image

from protocol.images import encode_png


def solid_png(colour: tuple[int, int, int], side: int = 56) -> bytes:
    """PNG bytes of a `side`×`side` square of one colour."""
    return encode_png(Image.new("RGB", (side, side), colour))
