"""Compressed client updates: the adapter *delta* (trained minus received) as fp16, int8 or int4.

Deltas, not weights: one round of local training moves the adapter a little, so the
delta has a small range that a few bits resolve well, and the server adds it back onto
the exact float32 global it sent. What reaches the strategy (and the screening before it) is
an ordinary full adapter, so Flower's strategies run unchanged. Only the uplink is
compressed: the downlink global stays float32, so client and server agree bit for bit on
the base the delta is applied to.

Wire layout, under the reply's ``"arrays"`` record (one npy header each, instead of one
per tensor: at int8 a 128-byte header per tensor would be half the payload):

* ``delta``: every tensor's delta flattened and concatenated in sorted-name order,
  float16 (``fp16``), int8 (``int8``) or, for ``int4``, uint8 with two values per byte
  (value ``i`` in the low nibble of byte ``i // 2`` when ``i`` is even, the high nibble
  when odd; a nibble is the value's 4-bit two's complement, so -7..7 are codes 9..15,
  0..7, and code 8 (-8) never occurs; an odd total leaves the last high nibble 0);
* ``scales`` (int8, int4): one float32 per tensor, same order; per-tensor symmetric
  quantization ``q = round(x / s)`` with ``s = max|x| / L``, ``L`` = 127 or 7.

int4 keeps one scale per tensor, not per block of values: the default r=8 adapter has
8 tensors of 512 values, so a tensor is already a small block. On real one-round deltas
of the builtin model (peak about 2.5 standard deviations) the per-tensor int4 rounding
error is 10.5 % of the delta's L2 norm, with a float16 scale per 64 values 9.0 %, for
96 B more (+4 % at r=8);
error feedback sends what rounding drops in a later round anyway. At r=8 the int4 uplink
is 2,336 B, 283x less than full fine-tuning (int8: 4,384 B, 151x).

The reply also carries a ``"compression"`` config record naming the method; replies
without it are plain float32 adapters.

Error feedback: what quantization dropped (``corrected - decoded``) is added to the
client's next delta, so the error does not accumulate across rounds. The residual is kept
on disk in the client's own state dir (``RESIDUAL_FILE``, see ``fedslm.client.node``): in
simulation one process serves many clients, and per-client state in memory would grow
with the population.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedslm.atomic import atomic_write
from fedslm.adapters import to_array_record
from fedslm.keys import ARRAYS_KEY
from fedslm.replies import MAX_PARAM_ABS
from fedslm.wire import WireError, decode_array

INFO_KEY = "compression"
DELTA_KEY = "delta"
SCALES_KEY = "scales"
INT8_MAX = 127
INT4_MAX = 7
_WIRE_DTYPE = {"fp16": np.float16, "int8": np.int8, "int4": np.uint8}
_LEVELS = {"int8": INT8_MAX, "int4": INT4_MAX}  # the scaled methods: max |q|


class CompressionError(ValueError):
    """An update cannot be encoded or decoded; the message says which part is wrong."""


def quantize(x: np.ndarray, levels: int) -> tuple[np.ndarray, np.float32]:
    """Symmetric per-tensor quantization: int8 values in [-levels, levels], float32 scale."""
    x = np.asarray(x, dtype=np.float32)
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    scale = np.float32(peak / levels)
    if scale == 0:
        return np.zeros(x.shape, dtype=np.int8), np.float32(0.0)
    q = np.clip(np.rint(x / scale), -levels, levels).astype(np.int8)
    return q, scale


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """Symmetric per-tensor int8: values in [-127, 127] and the float32 scale."""
    return quantize(x, INT8_MAX)


def pack_int4(q: np.ndarray) -> np.ndarray:
    """Values in [-7, 7] two per byte, first value in the low nibble; odd count: pad 0."""
    codes = (np.asarray(q, np.int8).ravel() & 0x0F).astype(np.uint8)
    if codes.size % 2:
        codes = np.append(codes, np.uint8(0))
    return codes[0::2] | (codes[1::2] << 4)


def unpack_int4(packed: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` int8 values of ``pack_int4``; a set pad nibble or code 8 is refused."""
    codes = np.empty(2 * packed.size, np.uint8)
    codes[0::2], codes[1::2] = packed & 0x0F, packed >> 4
    if count % 2 and codes[count] != 0:
        raise CompressionError("int4: the pad nibble after the last value must be 0, "
                               f"got {int(codes[count])}")
    codes = codes[:count]
    if (codes == 8).any():
        raise CompressionError(f"int4: {int((codes == 8).sum())} nibble(s) hold code 8 (-8), "
                               "outside -7..7")
    return np.where(codes >= 8, codes.astype(np.int16) - 16, codes).astype(np.int8)


def _wire_size(method: str, count: int) -> int:
    return (count + 1) // 2 if method == "int4" else count


def encode(delta: Mapping[str, np.ndarray], method: str) -> dict[str, np.ndarray]:
    """The wire arrays for ``delta`` (see the module docstring)."""
    if method not in _WIRE_DTYPE:
        raise CompressionError(f"compression.method: cannot encode with {method!r}")
    names = sorted(delta)
    if method == "fp16":
        flat = np.concatenate([np.asarray(delta[n], np.float32).ravel() for n in names])
        wire = flat.astype(np.float16)
        if not np.isfinite(wire).all():
            raise CompressionError("fp16: the update overflows float16 (|delta| > 65504)")
        return {DELTA_KEY: wire}
    parts, scales = zip(*(quantize(delta[n], _LEVELS[method]) for n in names))
    flat = np.concatenate([q.ravel() for q in parts])
    return {DELTA_KEY: pack_int4(flat) if method == "int4" else flat,
            SCALES_KEY: np.array(scales, dtype=np.float32)}


def decode(wire: Mapping[str, np.ndarray], method: str,
           shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Float32 deltas named and shaped as ``shapes`` (the global the server sent)."""
    if method not in _WIRE_DTYPE:
        raise CompressionError(f"unknown compression method {method!r}")
    expected_keys = {DELTA_KEY, SCALES_KEY} if method in _LEVELS else {DELTA_KEY}
    if set(wire) != expected_keys:
        raise CompressionError(f"{method}: expected arrays {sorted(expected_keys)}, got {sorted(wire)}")
    names = sorted(shapes)
    sizes = [int(np.prod(shapes[n], dtype=np.int64)) for n in names]
    flat = np.asarray(wire[DELTA_KEY])
    expected = _wire_size(method, sum(sizes))
    if flat.dtype != _WIRE_DTYPE[method] or flat.shape != (expected,):
        raise CompressionError(f"{method}: delta is {flat.dtype}{list(flat.shape)}, expected "
                               f"{np.dtype(_WIRE_DTYPE[method])}[{expected}]"
                               + (f" ({sum(sizes)} values, two per byte)" if method == "int4" else ""))
    if method == "int4":
        flat = unpack_int4(flat, sum(sizes))
    values = flat.astype(np.float32)
    if method in _LEVELS:
        scales = np.asarray(wire[SCALES_KEY])
        if scales.dtype != np.float32 or scales.shape != (len(names),):
            raise CompressionError(f"{method}: scales are {scales.dtype}{list(scales.shape)}, "
                                   f"expected float32[{len(names)}]")
        if not (np.isfinite(scales).all() and (scales >= 0).all()):
            raise CompressionError(f"{method}: scales must be finite and >= 0")
        values *= np.repeat(scales, sizes)
    out, start = {}, 0
    for name, size in zip(names, sizes):
        out[name] = values[start:start + size].reshape(shapes[name])
        start += size
    return out


RESIDUAL_FILE = "compression_residual.npz"  # in the client's own state dir (fedslm.client.node)
RUN_KEY = "__run__"  # the Flower run the residual belongs to, stored beside the tensors


def read_residual(path: Path) -> tuple[str, dict[str, np.ndarray]]:
    """(run id as stored, "" if none; the residual tensors) of a residual file."""
    with np.load(path) as stored:
        run = str(stored[RUN_KEY]) if RUN_KEY in stored.files else ""
        return run, {n: stored[n] for n in stored.files if n != RUN_KEY}


def _load_residual(path: Path, shapes: Mapping[str, tuple[int, ...]], run_id: int) -> dict[str, np.ndarray]:
    """The residual of this run; zeros when there is none yet or it is another run's.

    A device's state dir outlives runs: the residual of an earlier run is error against
    that run's global adapter, and adding it to this run's first delta would be noise.
    """
    run, residual = read_residual(path) if path.exists() else ("", {})
    if run != str(run_id):
        return {n: np.zeros(s, np.float32) for n, s in shapes.items()}
    if {n: r.shape for n, r in residual.items()} != dict(shapes):
        raise CompressionError(f"{path}: residual does not match this adapter's tensors")
    return residual


def _save_residual(path: Path, residual: Mapping[str, np.ndarray], run_id: int) -> None:
    """Atomic write: a crash leaves the previous residual, never a partial file."""
    atomic_write(path, lambda fh: np.savez(fh, **residual, **{RUN_KEY: np.array(str(run_id))}))


def compress_update(trained: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray], *,
                    method: str, residual_path: Path | None,
                    run_id: int | None = None) -> dict[str, np.ndarray]:
    """Encode ``trained - received`` (+ the stored residual of run ``run_id``); store the
    new residual.

    ``residual_path`` None disables error feedback; with a path, ``run_id`` is required.
    """
    if residual_path is not None and run_id is None:
        raise ValueError("compress_update: error feedback needs the run id its residual belongs to")
    if set(trained) != set(received):
        raise CompressionError("trained and received adapters name different tensors")
    shapes = {n: np.shape(v) for n, v in received.items()}
    delta = {n: np.asarray(trained[n], np.float32) - np.asarray(received[n], np.float32)
             for n in shapes}
    if residual_path is not None:
        residual = _load_residual(residual_path, shapes, run_id)
        delta = {n: delta[n] + residual[n] for n in shapes}
    wire = encode(delta, method)
    if residual_path is not None:
        sent = decode(wire, method, shapes)
        _save_residual(residual_path, {n: delta[n] - sent[n] for n in shapes}, run_id)
    return wire


def update_records(trained: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray], *,
                   method: str, residual_path: Path | None,
                   run_id: int | None = None) -> dict[str, ArrayRecord | ConfigRecord]:
    """The reply records carrying a client's update: plain float32 for ``none``."""
    if method == "none":
        return {ARRAYS_KEY: to_array_record(trained)}
    wire = compress_update(trained, received, method=method, residual_path=residual_path,
                           run_id=run_id)
    return {ARRAYS_KEY: ArrayRecord({k: Array(v) for k, v in wire.items()}),
            INFO_KEY: ConfigRecord({"method": method})}


def decode_update(content: RecordDict, reference: ArrayRecord) -> ArrayRecord | None:
    """The full float32 adapter ``reference + delta`` of a compressed reply; None when the
    reply is not compressed. Raises CompressionError for a malformed one.

    Every wire array is read against the shape the reference implies (never the shape
    the reply declares: a hostile one declares 10^19 elements), and scales and decoded
    values are bounded by ``MAX_PARAM_ABS``.
    """
    if INFO_KEY not in content.config_records:
        return None
    method = str(content.config_records[INFO_KEY].get("method"))
    if method not in _WIRE_DTYPE:
        raise CompressionError(f"unknown compression method {method!r}")
    if ARRAYS_KEY not in content.array_records:
        raise CompressionError("compressed reply lacks its arrays")
    base = {n: a.numpy() for n, a in reference.items()}
    count = sum(int(v.size) for v in base.values())
    shapes = {DELTA_KEY: (_wire_size(method, count),)}
    if method in _LEVELS:
        shapes[SCALES_KEY] = (len(base),)
    record = content.array_records[ARRAYS_KEY]
    if set(record.keys()) != set(shapes):
        raise CompressionError(f"{method}: expected arrays {sorted(shapes)}, got {sorted(record.keys())[:4]}")
    wire = {}
    for key, array in record.items():
        try:
            wire[key] = decode_array(array, shape=shapes[key])
        except WireError as err:
            raise CompressionError(f"{key}: {err}") from None
    if method in _LEVELS and wire[SCALES_KEY].dtype == np.float32 and \
            not (np.abs(wire[SCALES_KEY]) <= MAX_PARAM_ABS / _LEVELS[method]).all():
        raise CompressionError(f"{method}: a scale exceeds {MAX_PARAM_ABS / _LEVELS[method]:g} "
                               f"(decoded values are bounded by {MAX_PARAM_ABS:g})")
    with np.errstate(over="ignore", invalid="ignore"):
        delta = decode(wire, method, {n: v.shape for n, v in base.items()})
    return to_array_record({n: base[n].astype(np.float32) + delta[n] for n in base})
