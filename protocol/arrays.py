"""Dense arrays on the wire: raw little-endian bytes plus dtype and shape, validated on the way in."""
from __future__ import annotations

import math

import numpy as np

from protocol.errors import ProtocolError
from protocol.messages import NDArray

# The closed set of dtypes that may cross a socket (bf16 travels as its raw uint16 bits, see learner/weights).
ALLOWED_DTYPES: frozenset[str] = frozenset(
    {"bool", "uint8", "int8", "int16", "uint16", "int32", "int64", "float16", "bfloat16", "float32", "float64"}
)
DEFAULT_MAX_ELEMENTS = 1 << 28  # 256M elements: far above any bucket we send, far below what hurts.

_ITEMSIZE = {"bool": 1, "uint8": 1, "int8": 1, "int16": 2, "uint16": 2, "bfloat16": 2, "float16": 2,
             "int32": 4, "float32": 4, "int64": 8, "float64": 8}


def to_ndarray(array: np.ndarray, dtype: str | None = None) -> NDArray:
    """Encode a numpy array (or a bf16 payload viewed as uint16 with dtype='bfloat16')."""
    name = dtype or str(array.dtype)
    if name not in ALLOWED_DTYPES:
        raise ProtocolError(f"dtype {name!r} cannot cross the wire; allowed: {sorted(ALLOWED_DTYPES)}")
    if name != "bfloat16":
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
    contiguous = np.require(array, requirements="C")  # unlike ascontiguousarray, keeps 0-d arrays 0-d
    return NDArray(dtype=name, shape=[int(s) for s in contiguous.shape], data=contiguous.tobytes())


def check_ndarray(array: NDArray, max_elements: int = DEFAULT_MAX_ELEMENTS, what: str = "array") -> int:
    """Validate dtype, shape and byte length; return the element count. Raises ProtocolError."""
    if array.dtype not in ALLOWED_DTYPES:
        raise ProtocolError(f"{what}: unknown dtype {array.dtype!r}")
    if any(s < 0 for s in array.shape) or len(array.shape) > 8:
        raise ProtocolError(f"{what}: invalid shape {array.shape}")
    count = math.prod(array.shape)
    if count > max_elements:
        raise ProtocolError(f"{what}: {count} elements exceeds the limit of {max_elements}")
    expected = count * _ITEMSIZE[array.dtype]
    if len(array.data) != expected:
        raise ProtocolError(
            f"{what}: {len(array.data)} bytes for shape {array.shape} {array.dtype} (expected {expected})"
        )
    return count


def from_ndarray(array: NDArray, max_elements: int = DEFAULT_MAX_ELEMENTS, what: str = "array") -> np.ndarray:
    """Decode to a read-only numpy view (bfloat16 comes back as uint16 bits)."""
    check_ndarray(array, max_elements, what)
    np_dtype = np.dtype("uint16" if array.dtype == "bfloat16" else array.dtype).newbyteorder("<")
    return np.frombuffer(array.data, dtype=np_dtype).reshape(array.shape)
