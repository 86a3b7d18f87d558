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
import math
import operator

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
    try:
        want = tuple(operator.index(d) for d in (array.shape if shape is None else shape))
    except TypeError:
        raise WireError(f"declared shape {array.shape!r} is not a shape") from None
    if any(d < 0 for d in want):
        raise WireError(f"declared shape {want} is not a shape")
    buffer = io.BytesIO(array.data)
    try:
        version = npy.read_magic(buffer)
        if version not in HEADER_READERS:
            raise WireError(f"npy format version {version} is not accepted")
        held_shape, _, dtype = HEADER_READERS[version](buffer)
    except WireError:
        raise
    except Exception as err:  # numpy's header parser raises ValueError, SyntaxError,
        # tokenize.TokenError, ... on bytes it did not write; all mean the same here
        reason = str(err).splitlines()[0] if str(err).strip() else type(err).__name__
        raise WireError(f"payload is not an npy array ({reason[:120]})") from None
    if dtype.hasobject or dtype.kind not in "biuf":
        raise WireError(f"payload dtype {dtype} is not a plain number type")
    if tuple(held_shape) != want:
        raise WireError(f"payload holds shape {tuple(held_shape)}, expected {want}")
    size = math.prod(int(d) for d in want) * dtype.itemsize  # Python ints: no overflow
    if len(array.data) - buffer.tell() != size:
        raise WireError(f"payload has {len(array.data) - buffer.tell()} data bytes, "
                        f"expected {size}")
    return np.load(io.BytesIO(array.data), allow_pickle=False)
