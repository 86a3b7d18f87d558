"""Property-based fuzzing (hypothesis) of everything that reads a client's reply: wire
decoding, compressed decoding, train/evaluate/status screening and Flower's aggregation
of what screening accepts. A few hundred cases, seconds; the long run is
``python -m fedslm.simulations.bench fuzz``."""

from __future__ import annotations

import io
from datetime import timedelta

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpy.lib import format as npy

from fedslm.compression import CompressionError, decode_update
from fedslm.wire import WireError, decode_array
from fedslm.simulations.bench.fuzz import check_round, honest_train, reference_adapter

FUZZ = settings(max_examples=150, deadline=timedelta(milliseconds=500),
                suppress_health_check=[HealthCheck.too_slow])
REFERENCE = reference_adapter(np.random.default_rng(0))
METHODS = ("none", "fp16", "int8", "int4")
HONEST = {m: honest_train(REFERENCE, m, np.random.default_rng(1)) for m in METHODS}


def _npy(dtype: str, shape: tuple[int, ...], data: bytes) -> bytes:
    buf = io.BytesIO()
    npy.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue() + data


headers = st.one_of(
    st.builds(_npy, st.sampled_from(["<f4", "<f8", "<f2", "|i1", "|u1", "|O", "<c8", "|b1", ">f4"]),
              st.lists(st.integers(0, 2**63 - 1), max_size=3).map(tuple), st.binary(max_size=64)),
    st.binary(max_size=200),
    st.binary(max_size=120).map(lambda b: b"\x93NUMPY\x01\x00" + len(b).to_bytes(2, "little") + b),
    st.text(max_size=80).map(lambda t: b"\x93NUMPY\x01\x00" + (len(t.encode()) + 1).to_bytes(2, "little")
                             + t.encode() + b"\n"),
)
shapes = st.lists(st.integers(0, 2**80), max_size=3).map(tuple)
wire_arrays = st.builds(lambda dtype, shape, stype, data: Array(dtype=dtype, shape=shape, stype=stype, data=data),
                        st.sampled_from(["float32", "float64", "int8", "uint8", "object", "x"]),
                        shapes, st.sampled_from(["numpy.ndarray", "torch", ""]), headers)


@FUZZ
@given(wire_arrays, st.one_of(st.none(), shapes))
def test_wire_decoding_returns_the_expected_shape_or_a_wire_error(array: Array, shape) -> None:
    try:
        values = decode_array(array, shape=shape)
    except WireError:
        return
    assert values.shape == (tuple(array.shape) if shape is None else shape)


metric_values = st.one_of(
    st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.integers(-5, 2**40), max_size=5), st.lists(st.floats(-1e3, 1e3), max_size=4))
metric_keys = st.sampled_from(["num-examples", "loss", "perplexity", "accuracy", "partition-id",
                               "dp-epsilon", "dp-delta", "confusion", "rouge_l_sum", "x"])


def _metric_record(items: dict) -> MetricRecord:
    try:
        return MetricRecord(items)
    except Exception:  # noqa: BLE001 - Flower itself refuses it: no client could send it
        return MetricRecord({"num-examples": 1})


metric_records = st.dictionaries(metric_keys, metric_values, max_size=5).map(_metric_record)


@st.composite
def train_replies(draw) -> RecordDict:
    """An honest reply of some method with parts replaced by fuzzed ones."""
    records = dict(HONEST[draw(st.sampled_from(METHODS))].items())
    if draw(st.booleans()):
        arrays = dict(records["arrays"].items())
        name = draw(st.sampled_from(sorted(arrays) + ["extra"]))
        arrays[name] = draw(wire_arrays)
        records["arrays"] = ArrayRecord(arrays)
    if draw(st.booleans()):
        records["metrics"] = draw(metric_records)
    if draw(st.booleans()):
        records["compression"] = ConfigRecord({"method": draw(st.sampled_from([*METHODS, "zip"]))})
    if draw(st.integers(0, 4)) == 0:
        records = {"metrics": draw(metric_records),
                   "status": ConfigRecord({"status": draw(st.sampled_from(["budget-exhausted", "?"])),
                                           "message": "spent"})}
    if draw(st.integers(0, 4)) == 0:
        records[draw(st.sampled_from(["more", "arrays", "metrics"]))] = draw(st.sampled_from(
            [ConfigRecord({"a": "b"}), MetricRecord({"x": 1.0}), ArrayRecord()]))
    return RecordDict(records)


evaluate_replies = st.builds(lambda m: RecordDict({"metrics": m}), metric_records)


@FUZZ
@given(train_replies())
def test_compressed_decoding_raises_only_compression_errors(content: RecordDict) -> None:
    try:
        full = decode_update(content, REFERENCE)
    except CompressionError:
        return
    if full is not None:
        assert {k: v.shape for k, v in full.items()} == {k: v.shape for k, v in REFERENCE.items()}


@FUZZ
@given(st.lists(train_replies(), min_size=1, max_size=3), st.lists(evaluate_replies, max_size=3),
       st.sampled_from(METHODS))
def test_no_reply_escapes_screening_or_breaks_flowers_aggregation(train, evaluate, method) -> None:
    honest_eval = RecordDict({"metrics": MetricRecord({"loss": 2.0, "num-examples": 10})})
    assert check_round([HONEST[method], *train], [honest_eval, *evaluate], REFERENCE, method) == []


def test_the_fuzz_pipeline_flags_what_escapes() -> None:
    """The property can fail: a reply Flower cannot aggregate, fed past screening, is caught."""
    from fedslm.server import screening

    bad = RecordDict({"arrays": ArrayRecord({"x": Array(np.ones(2, np.float32))}),
                      "metrics": MetricRecord({"num-examples": 1})})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(screening, "_train_problem", lambda msg, expected: None)
        assert check_round([HONEST["none"], bad], [], REFERENCE, "none") != []


def _declared(dtype: str, shape: tuple[int, ...], header_shape: tuple[int, ...] | bytes) -> Array:
    """An Array declaring ``shape`` whose npy header claims ``header_shape`` over 16 bytes."""
    data = (_npy("<f4" if dtype == "float32" else "|i1", header_shape, b"\0" * 16)
            if isinstance(header_shape, tuple) else header_shape)
    return Array(dtype=dtype, shape=shape, stype="numpy.ndarray", data=data)


# the largest sizes the fuzzers generate, each declared over a payload of a few bytes
WORST = {
    "declared 2^70": _declared("float32", (2**70,), (2**70,)),
    "declared 10^11 x 2^31": _declared("int8", (10**11, 2**31), (10**11, 2**31)),
    "header 2^62 under a small declared shape": _declared("float32", (2, 3), (2**62,)),
    "header of 20 digits": _declared("float32", (2, 3), (10**20,)),
}


@pytest.mark.parametrize("name", sorted(WORST))
def test_the_worst_known_inputs_are_rejected_before_any_allocation(name: str) -> None:
    """Every size check comes before numpy reads: rejecting a reply that declares 2^70
    values allocates a few kB (the traced peak), never anything of the declared size,
    in wire decoding, compressed decoding and train screening alike."""
    import tracemalloc

    from fedslm.server.screening import screen_train_replies
    from fedslm.simulations.bench.fuzz import message

    array = WORST[name]
    plain = RecordDict({"arrays": ArrayRecord({**dict(REFERENCE.items()), "l0.lora_A.weight": array}),
                        "metrics": MetricRecord({"num-examples": 3})})
    packed = RecordDict({"arrays": ArrayRecord({"delta": array, "scales": Array(np.ones(2, np.float32))}),
                         "metrics": MetricRecord({"num-examples": 3}),
                         "compression": ConfigRecord({"method": "int8"})})
    tracemalloc.start()
    try:
        with pytest.raises(WireError):
            decode_array(array, shape=(2, 3))
        with pytest.raises(CompressionError, match="delta: "):
            decode_update(packed, REFERENCE)
        screened = screen_train_replies([message(1, plain)], REFERENCE)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert screened.accepted == [] and list(screened.rejected) == [1]
    assert peak < 64 * 1024


def test_the_servers_startup_objects_are_left_out_of_full_collections() -> None:
    """The fuzz run's slowest cases (0.23-1.25 s) were full garbage collections walking
    every object torch and the rest had created; the ServerApp freezes those first."""
    import gc

    from fedslm.server.rounds import freeze_startup_objects

    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    try:
        frozen = freeze_startup_objects()
        assert frozen > 1000
        # frozen objects still die by reference count (here: pytest-xdist's I/O thread
        # freed 2 once), and nothing joins the frozen set unless frozen again
        assert 0 <= frozen - gc.get_freeze_count() < frozen // 100
        assert len(gc.get_objects(generation=2)) < frozen  # what a full collection walks
    finally:
        gc.unfreeze()
