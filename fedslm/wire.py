"""Reading tensors a peer sent, without trusting it.

``flwr.app.Array.numpy()`` hands the payload to ``np.load``, which believes the payload's
own header: a reply whose header claims 10^11 elements makes the server try to allocate
them, garbage bytes or another serialization type raise whatever numpy raises, and the
header need not agree with the shape the Array declares. ``decode_array`` checks the
header against the shape the server expects, the dtype and the exact payload size before
numpy reads anything, and reports every problem as one ``WireError`` line.
"""

from __future__ import annotations

import io

import numpy as np
from flwr.app import Array
from numpy.lib import format as npy

NUMPY_STYPE = "numpy.ndarray"  # what flwr.app.Array(ndarray) writes
HEADER_READERS = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}


class WireError(ValueError):
    """A received tensor cannot be read safely; the message says why."""


def decode_array(array: Array, *, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """The array's values, once its payload is a plain numeric npy of ``shape`` (default:
    the shape the Array declares) and exactly that many bytes."""
    if array.stype != NUMPY_STYPE:
        raise WireError(f"serialized as {array.stype!r}, expected {NUMPY_STYPE!r}")
    want = tuple(array.shape) if shape is None else tuple(shape)
    buffer = io.BytesIO(array.data)
    try:
        version = npy.read_magic(buffer)
        if version not in HEADER_READERS:
            raise WireError(f"npy format version {version} is not accepted")
        held_shape, _, dtype = HEADER_READERS[version](buffer)
    except (ValueError, EOFError) as err:
        raise WireError(f"payload is not an npy array ({err})") from None
    if dtype.hasobject or dtype.kind not in "biuf":
        raise WireError(f"payload dtype {dtype} is not a plain number type")
    if tuple(held_shape) != want:
        raise WireError(f"payload holds shape {tuple(held_shape)}, expected {want}")
    size = int(np.prod(want, dtype=np.int64)) * dtype.itemsize
    if len(array.data) - buffer.tell() != size:
        raise WireError(f"payload has {len(array.data) - buffer.tell()} data bytes, "
                        f"expected {size}")
    return np.load(io.BytesIO(array.data), allow_pickle=False)
