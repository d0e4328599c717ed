"""The one exception raised for anything that is not a valid forage message."""
from __future__ import annotations


class ProtocolError(ValueError):
    """A frame could not be decoded into a valid message: wrong type, truncated, oversized or wrong version."""
