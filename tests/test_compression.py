"""Compressed updates: exact quantization, wire layout, error feedback on disk, and the
server's decoding before screening and aggregation (hand-built arrays and replies)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedslm.adapters import adapter_arrays, payload_bytes, to_array_record
from fedslm.compression import (
    CompressionError,
    compress_update,
    read_residual,
    decode,
    decode_update,
    encode,
    pack_int4,
    quantize_int8,
    RESIDUAL_FILE,
    update_records,
)
from fedslm.config import ConfigError, ExperimentConfig
from fedslm.server.decompress import decode_train_replies
from fedslm.server.strategy import screen_train_replies
from tests import fakes

SHAPES = {"m.q.lora_A.weight": (4, 16), "m.q.lora_B.weight": (16, 4)}


def adapter(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: (scale * rng.standard_normal(s)).astype(np.float32) for n, s in SHAPES.items()}


def reply(node: int, content: dict, n: int = 10):
    return fakes.reply(node, RecordDict({**content, "metrics": MetricRecord({"num-examples": n})}))


def test_int8_is_symmetric_per_tensor_with_a_float32_scale() -> None:
    q, scale = quantize_int8(np.array([-1.27, 0.0, 0.5, 0.004, 1.0], np.float32))
    assert q.dtype == np.int8 and scale.dtype == np.float32
    assert scale == np.float32(1.27 / 127)
    assert q.tolist() == [-127, 0, 50, 0, 100]
    zeros, zero_scale = quantize_int8(np.zeros((2, 2), np.float32))
    assert zeros.tolist() == [[0, 0], [0, 0]] and zero_scale == 0


def test_wire_layout_is_one_flat_delta_plus_one_scale_per_tensor() -> None:
    delta = adapter(0, 0.01)
    int8 = encode(delta, "int8")
    assert int8["delta"].dtype == np.int8 and int8["delta"].shape == (128,)
    assert int8["scales"].dtype == np.float32 and int8["scales"].shape == (2,)
    fp16 = encode(delta, "fp16")
    assert set(fp16) == {"delta"} and fp16["delta"].dtype == np.float16
    # sorted-name order: lora_A's 64 values first
    np.testing.assert_array_equal(fp16["delta"][:64], delta["m.q.lora_A.weight"].ravel().astype(np.float16))


def test_int4_packs_two_values_per_byte_and_decodes_to_exact_multiples_of_the_scale() -> None:
    shapes = {"a": (2, 2), "b": (3,)}  # 7 values: the last byte carries one pad nibble
    delta = {"a": np.array([[0.7, -0.36], [0.1, 0.0]], np.float32),
             "b": np.array([-0.02, 0.01, 0.0], np.float32)}
    wire = encode(delta, "int4")
    assert wire["scales"].dtype == np.float32
    assert wire["scales"].tolist() == [np.float32(0.1), np.float32(0.02 / 7)]
    # codes a: 7, -4, 1, 0 ; b: -7, 4 (0.01 / (0.02/7) = 3.5, rounded to even), 0, pad 0
    # nibbles (two's complement): 7, 0xC, 1, 0, 9, 4, 0, 0 -> low nibble first
    assert wire["delta"].dtype == np.uint8
    assert wire["delta"].tolist() == [0xC7, 0x01, 0x49, 0x00]
    back = decode(wire, "int4", shapes)
    np.testing.assert_array_equal(back["a"], np.array([[7, -4], [1, 0]], np.float32) * np.float32(0.1))
    np.testing.assert_array_equal(back["b"], np.array([-7, 4, 0], np.float32) * wire["scales"][1])
    assert back["a"].dtype == back["b"].dtype == np.float32


def test_int4_packing_covers_every_level_and_odd_lengths() -> None:
    levels = np.arange(-7, 8, dtype=np.int8)  # 15 values: odd
    packed = pack_int4(levels)
    assert packed.dtype == np.uint8 and packed.shape == (8,)
    assert packed[-1] >> 4 == 0 and packed[-1] & 0x0F == 7  # last value 7, then the pad
    assert packed[0] == (0x9 | 0xA << 4)  # -7, -6
    shapes = {"t": (15,)}
    wire = {"delta": packed, "scales": np.ones(1, np.float32)}
    assert decode(wire, "int4", shapes)["t"].tolist() == levels.tolist()


@pytest.mark.parametrize("method", ["fp16", "int8", "int4"])
def test_decode_inverts_encode_within_the_format_precision(method: str) -> None:
    delta = adapter(1, 0.02)
    wire = encode(delta, method)
    back = decode(wire, method, SHAPES)
    for name, value in delta.items():
        assert back[name].dtype == np.float32 and back[name].shape == value.shape
        peak = np.abs(value).max()
        levels = {"int8": 127, "int4": 7}
        bound = peak / levels[method] / 2 if method in levels else peak * 2**-11
        assert np.abs(back[name] - value).max() <= bound * (1 + 1e-6)


def test_compressed_payload_is_a_quarter_of_float32_plus_headers() -> None:
    trained, received = adapter(2), adapter(3)
    plain = payload_bytes(update_records(trained, received, method="none", residual_path=None)["arrays"])
    int8 = payload_bytes(update_records(trained, received, method="int8", residual_path=None)["arrays"])
    npy_header = 128
    int4 = payload_bytes(update_records(trained, received, method="int4", residual_path=None)["arrays"])
    assert plain == 128 * 4 + 2 * npy_header
    assert int8 == 128 * 1 + npy_header + 2 * 4 + npy_header
    assert int4 == 128 // 2 + npy_header + 2 * 4 + npy_header


def test_int4_uplink_of_the_default_adapter_is_2336_bytes(make_peft) -> None:
    """A tiny Llama of the builtin's shape (2 layers, hidden 64) at the default LoRA
    (r=8 on q/v): 4,096 values in 8 tensors."""
    received = adapter_arrays(make_peft())
    assert sum(v.size for v in received.values()) == 4096 and len(received) == 8
    trained = {n: v + np.float32(1e-3) for n, v in received.items()}
    records = update_records(trained, received, method="int4", residual_path=None)
    assert payload_bytes(records["arrays"]) == 4096 // 2 + 128 + 8 * 4 + 128 == 2336
    assert records["compression"]["method"] == "int4"


@pytest.mark.parametrize("bad", [
    ("int8", {"delta": np.zeros(128, np.int8)}, "expected arrays"),
    ("int8", {"delta": np.zeros(127, np.int8), "scales": np.ones(2, np.float32)}, "expected int8[128]"),
    ("int8", {"delta": np.zeros(128, np.int16), "scales": np.ones(2, np.float32)}, "delta is int16"),
    ("int8", {"delta": np.zeros(128, np.int8), "scales": np.ones(3, np.float32)}, "scales are float32[3]"),
    ("int8", {"delta": np.zeros(128, np.int8), "scales": -np.ones(2, np.float32)}, "finite and >= 0"),
    ("fp16", {"delta": np.zeros(128, np.float32)}, "delta is float32"),
    ("zip", {"delta": np.zeros(128, np.int8)}, "unknown compression method 'zip'"),
    ("int4", {"delta": np.zeros(64, np.uint8)}, "int4: expected arrays ['delta', 'scales']"),
    ("int4", {"delta": np.zeros(64, np.int8), "scales": np.ones(2, np.float32)},
     "int4: delta is int8[64], expected uint8[64] (128 values, two per byte)"),
    ("int4", {"delta": np.zeros(128, np.uint8), "scales": np.ones(2, np.float32)},
     "delta is uint8[128], expected uint8[64]"),
    ("int4", {"delta": np.zeros((2, 32), np.uint8), "scales": np.ones(2, np.float32)},
     "delta is uint8[2, 32], expected uint8[64]"),
    ("int4", {"delta": np.full(64, 0x80, np.uint8), "scales": np.ones(2, np.float32)},
     "int4: 64 nibble(s) hold code 8 (-8), outside -7..7"),
    ("int4", {"delta": np.zeros(64, np.uint8), "scales": np.ones(2, np.float16)},
     "int4: scales are float16[2], expected float32[2]"),
    ("int4", {"delta": np.zeros(64, np.uint8), "scales": np.ones(1, np.float32)},
     "int4: scales are float32[1], expected float32[2]"),
    ("int4", {"delta": np.zeros(64, np.uint8), "scales": np.array([1, np.nan], np.float32)},
     "int4: scales must be finite and >= 0"),
    ("int4", {"delta": np.zeros(64, np.uint8), "scales": np.array([1, -1], np.float32)},
     "int4: scales must be finite and >= 0"),
])
def test_malformed_wire_arrays_raise_naming_the_part(bad) -> None:
    method, wire, message = bad
    with pytest.raises(CompressionError, match=re.escape(message)):
        decode(wire, method, SHAPES)


def test_int4_pad_nibble_must_be_zero() -> None:
    shapes = {"t": (3,)}  # 3 values in 2 bytes: the high nibble of byte 1 is padding
    good = {"delta": np.array([0x21, 0x03], np.uint8), "scales": np.ones(1, np.float32)}
    assert decode(good, "int4", shapes)["t"].tolist() == [1.0, 2.0, 3.0]
    bad = {"delta": np.array([0x21, 0x13], np.uint8), "scales": np.ones(1, np.float32)}
    with pytest.raises(CompressionError, match=r"^int4: the pad nibble after the last value must be 0, got 1$"):
        decode(bad, "int4", shapes)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_error_feedback_residual_is_delta_minus_what_was_sent(tmp_path: Path, method: str) -> None:
    path = tmp_path / RESIDUAL_FILE
    received = adapter(8)
    trained = {n: v + adapter(9, 0.01)[n] for n, v in received.items()}
    wire = compress_update(trained, received, method=method, residual_path=path, run_id=1)
    sent = decode(wire, method, SHAPES)
    _, residual = read_residual(path)
    assert sorted(residual) == sorted(SHAPES)
    for n in SHAPES:
        np.testing.assert_array_equal(residual[n], (trained[n] - received[n]) - sent[n])
    # the next round sends the new delta plus that residual
    wire2 = compress_update(trained, received, method=method, residual_path=None)
    corrected = compress_update(trained, received, method=method, residual_path=path, run_id=1)
    want = encode({n: (trained[n] - received[n]) + residual[n] for n in SHAPES}, method)
    for key in want:
        np.testing.assert_array_equal(corrected[key], want[key])
    assert any((corrected[k] != wire2[k]).any() for k in want)


def test_error_feedback_keeps_the_residual_on_disk_per_partition(tmp_path: Path) -> None:
    path = tmp_path / "7" / RESIDUAL_FILE
    received = adapter(4)
    sent_total = {n: np.zeros(s, np.float32) for n, s in SHAPES.items()}
    true_total = {n: np.zeros(s, np.float32) for n, s in SHAPES.items()}
    for rnd in range(3):
        trained = {n: v + adapter(10 + rnd, 0.01)[n] for n, v in received.items()}
        wire = compress_update(trained, received, method="int8", residual_path=path, run_id=1)
        sent = decode(wire, "int8", SHAPES)
        for n in SHAPES:
            sent_total[n] += sent[n]
            true_total[n] += trained[n] - received[n]
    _, residual = read_residual(path)
    # telescoping: everything the client meant to send was sent, except the last residual
    for n in SHAPES:
        np.testing.assert_allclose(sent_total[n] + residual[n], true_total[n], atol=1e-6)
        assert np.abs(residual[n]).max() > 0
    assert sorted(p.name for p in path.parent.iterdir()) == [RESIDUAL_FILE]  # no temp files


def test_a_residual_for_other_tensors_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "0" / RESIDUAL_FILE
    compress_update(adapter(0), adapter(1), method="int8", residual_path=path, run_id=1)
    other = {"x.lora_A.weight": np.zeros((2, 2), np.float32)}
    with pytest.raises(CompressionError, match="residual does not match"):
        compress_update(other, other, method="int8", residual_path=path, run_id=1)


def test_server_decodes_to_global_plus_delta_then_screens_and_averages() -> None:
    received = adapter(5)
    reference = to_array_record(received)
    updates = [{n: v + adapter(20 + i, 0.01)[n] for n, v in received.items()} for i in range(2)]
    replies = [reply(i + 1, update_records(u, received, method="int8", residual_path=None), n=1 + 2 * i)
               for i, u in enumerate(updates)]
    garbled = update_records(updates[0], received, method="int8", residual_path=None)
    garbled["arrays"] = ArrayRecord({"delta": Array(np.zeros(5, np.int8)),
                                     "scales": Array(np.ones(2, np.float32))})
    replies.append(reply(9, garbled))
    plain = reply(4, {"arrays": to_array_record(updates[1])})
    decoded = decode_train_replies([*replies, plain], reference)
    assert decoded.rejected == {9: "compressed update: delta: payload holds shape (5,), expected (128,)"}
    screened = screen_train_replies(decoded.accepted, reference)
    assert [m.metadata.src_node_id for m in screened.accepted] == [1, 2, 4]
    assert "compression" not in screened.accepted[0].content.config_records
    arrays, _ = FedAvg().aggregate_train(1, screened.accepted[:2])
    for n in SHAPES:
        want = (updates[0][n] * 1 + updates[1][n] * 3) / 4
        step = max(np.abs(u[n] - received[n]).max() for u in updates) / 127
        assert np.abs(arrays[n].numpy() - want).max() <= step / 2 + 1e-6
    assert screened.accepted[2].content["arrays"]["m.q.lora_A.weight"].numpy().tolist() == \
        updates[1]["m.q.lora_A.weight"].tolist()  # uncompressed replies pass through untouched


def test_server_rejects_a_malformed_int4_reply_and_applies_a_good_one_to_the_global() -> None:
    received = adapter(7)
    reference = to_array_record(received)
    trained = {n: v + adapter(30, 0.01)[n] for n, v in received.items()}
    good = update_records(trained, received, method="int4", residual_path=None)
    bad = update_records(trained, received, method="int4", residual_path=None)
    packed = bad["arrays"]["delta"].numpy().copy()
    packed[3] = 0x08  # low nibble code 8: -8 is not a level
    bad["arrays"] = ArrayRecord({"delta": Array(packed), "scales": bad["arrays"]["scales"]})
    decoded = decode_train_replies([reply(1, good), reply(2, bad)], reference)
    assert decoded.rejected == {2: "compressed update: int4: 1 nibble(s) hold code 8 (-8), outside -7..7"}
    (msg,) = decoded.accepted
    assert "compression" not in msg.content.config_records
    wire = {k: a.numpy() for k, a in good["arrays"].items()}
    delta = decode(wire, "int4", SHAPES)
    for n in SHAPES:
        got = msg.content["arrays"][n].numpy()
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, received[n] + delta[n])
        assert np.abs(got - trained[n]).max() <= np.abs(trained[n] - received[n]).max() / 7 / 2 + 1e-6


def test_decoded_update_with_non_finite_values_is_still_screened_out() -> None:
    received = adapter(6)
    content = {"arrays": ArrayRecord({"delta": Array(np.full(128, np.inf, np.float16))}),
               "compression": ConfigRecord({"method": "fp16"})}
    msg = reply(3, content)
    assert decode_update(msg.content, to_array_record(received)) is not None
    decoded = decode_train_replies([msg], to_array_record(received))
    screened = screen_train_replies(decoded.accepted, to_array_record(received))
    assert screened.rejected[3].endswith("has non-finite values")


def test_compression_method_is_checked_by_key() -> None:
    with pytest.raises(ConfigError, match=r"^compression\.method: unknown value 'int2'"):
        ExperimentConfig.from_dict({"compression": {"method": "int2"}})
    assert ExperimentConfig.from_dict({"compression": {"method": "int8"}}).compression.error_feedback
    assert ExperimentConfig.from_dict({"compression": {"method": "int4"}}).compression.method == "int4"


def test_a_residual_from_another_run_is_not_added(tmp_path: Path) -> None:
    """A device's state dir outlives runs; run 2 starts from a zero residual."""
    path = tmp_path / RESIDUAL_FILE
    received = adapter(8)
    trained = {n: v + adapter(9, 0.01)[n] for n, v in received.items()}
    compress_update(trained, received, method="int4", residual_path=path, run_id=1)
    run, stored = read_residual(path)
    assert run == "1" and any(np.abs(r).max() > 0 for r in stored.values())
    fresh = compress_update(trained, received, method="int4", residual_path=None)
    assert all((compress_update(trained, received, method="int4", residual_path=path, run_id=2)[k]
                == fresh[k]).all() for k in fresh)
    assert read_residual(path)[0] == "2"
    # within one run the residual is added: the same update encodes differently
    again = compress_update(trained, received, method="int4", residual_path=path, run_id=2)
    assert any((again[k] != fresh[k]).any() for k in fresh)


def test_a_compressed_reply_whose_payload_header_lies_is_rejected_before_allocation() -> None:
    import io

    from numpy.lib import format as npy

    received = adapter(7)
    reference = to_array_record(received)
    records = update_records(received, received, method="int8", residual_path=None)
    buf = io.BytesIO()
    npy.write_array_header_1_0(buf, {"descr": "|i1", "fortran_order": False, "shape": (10**11,)})
    huge = Array(dtype="int8", shape=(10**11,), stype="numpy.ndarray", data=buf.getvalue() + b"\0" * 16)
    records["arrays"] = ArrayRecord({"delta": huge, "scales": records["arrays"]["scales"]})
    decoded = decode_train_replies([reply(3, records)], reference)
    assert decoded.accepted == []
    assert decoded.rejected == {3: "compressed update: delta: payload holds shape "
                                   "(100000000000,), expected (128,)"}


def test_error_feedback_without_a_run_id_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs the run id"):
        compress_update(adapter(0), adapter(1), method="int8", residual_path=tmp_path / RESIDUAL_FILE)


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("method", ["fp16", "int8", "int4"])
def test_a_non_finite_update_is_refused_and_keeps_the_last_residual(tmp_path: Path, method: str) -> None:
    """The client refuses to encode NaN, so it never reaches the residual (which would get
    every later update of this client rejected)."""
    path = tmp_path / RESIDUAL_FILE
    received = adapter(8)
    trained = {n: v + adapter(9, 0.01)[n] for n, v in received.items()}
    compress_update(trained, received, method=method, residual_path=path, run_id=1)
    before = path.read_bytes()
    broken = {n: v.copy() for n, v in trained.items()}
    broken[sorted(broken)[0]][0, 0] = np.nan
    with pytest.raises(CompressionError):
        compress_update(broken, received, method=method, residual_path=path, run_id=1)
    assert path.read_bytes() == before
