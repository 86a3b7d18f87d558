"""Compressed updates: exact quantization, wire layout, error feedback on disk, and the
server's decoding before screening and aggregation (hand-built arrays and replies)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Metadata, MetricRecord, RecordDict
from flwr.app.message.message import make_message
from flwr.serverapp.strategy import FedAvg

from fedslm.adapters import payload_bytes, to_array_record
from fedslm.compression import (
    CompressionError,
    compress_update,
    decode,
    decode_update,
    encode,
    quantize_int8,
    RESIDUAL_FILE,
    update_records,
)
from fedslm.config import ConfigError, ExperimentConfig
from server.decompress import decode_train_replies
from server.strategy import screen_train_replies

SHAPES = {"m.q.lora_A.weight": (4, 16), "m.q.lora_B.weight": (16, 4)}


def adapter(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: (scale * rng.standard_normal(s)).astype(np.float32) for n, s in SHAPES.items()}


def reply(node: int, content: dict, n: int = 10):
    metadata = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0,
                        reply_to_message_id="q", group_id="1", created_at=0.0, ttl=60.0,
                        message_type="train")
    return make_message(metadata, RecordDict({**content, "metrics": MetricRecord({"num-examples": n})}))


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


@pytest.mark.parametrize("method", ["fp16", "int8"])
def test_decode_inverts_encode_within_the_format_precision(method: str) -> None:
    delta = adapter(1, 0.02)
    wire = encode(delta, method)
    back = decode(wire, method, SHAPES)
    for name, value in delta.items():
        assert back[name].dtype == np.float32 and back[name].shape == value.shape
        peak = np.abs(value).max()
        bound = peak / 127 / 2 if method == "int8" else peak * 2**-11
        assert np.abs(back[name] - value).max() <= bound * (1 + 1e-6)


def test_compressed_payload_is_a_quarter_of_float32_plus_headers() -> None:
    trained, received = adapter(2), adapter(3)
    plain = payload_bytes(update_records(trained, received, method="none", residual_path=None)["arrays"])
    int8 = payload_bytes(update_records(trained, received, method="int8", residual_path=None)["arrays"])
    npy_header = 128
    assert plain == 128 * 4 + 2 * npy_header
    assert int8 == 128 * 1 + npy_header + 2 * 4 + npy_header


@pytest.mark.parametrize("bad", [
    ("int8", {"delta": np.zeros(128, np.int8)}, "expected arrays"),
    ("int8", {"delta": np.zeros(127, np.int8), "scales": np.ones(2, np.float32)}, "expected int8[128]"),
    ("int8", {"delta": np.zeros(128, np.int16), "scales": np.ones(2, np.float32)}, "delta is int16"),
    ("int8", {"delta": np.zeros(128, np.int8), "scales": np.ones(3, np.float32)}, "scales are float32[3]"),
    ("int8", {"delta": np.zeros(128, np.int8), "scales": -np.ones(2, np.float32)}, "finite and >= 0"),
    ("fp16", {"delta": np.zeros(128, np.float32)}, "delta is float32"),
    ("zip", {"delta": np.zeros(128, np.int8)}, "unknown compression method 'zip'"),
])
def test_malformed_wire_arrays_raise_naming_the_part(bad) -> None:
    method, wire, message = bad
    with pytest.raises(CompressionError, match=re.escape(message)):
        decode(wire, method, SHAPES)


def test_error_feedback_keeps_the_residual_on_disk_per_partition(tmp_path: Path) -> None:
    path = tmp_path / "7" / RESIDUAL_FILE
    received = adapter(4)
    sent_total = {n: np.zeros(s, np.float32) for n, s in SHAPES.items()}
    true_total = {n: np.zeros(s, np.float32) for n, s in SHAPES.items()}
    for rnd in range(3):
        trained = {n: v + adapter(10 + rnd, 0.01)[n] for n, v in received.items()}
        wire = compress_update(trained, received, method="int8", residual_path=path)
        sent = decode(wire, "int8", SHAPES)
        for n in SHAPES:
            sent_total[n] += sent[n]
            true_total[n] += trained[n] - received[n]
    with np.load(path) as stored:
        residual = {n: stored[n] for n in stored.files}
    # telescoping: everything the client meant to send was sent, except the last residual
    for n in SHAPES:
        np.testing.assert_allclose(sent_total[n] + residual[n], true_total[n], atol=1e-6)
        assert np.abs(residual[n]).max() > 0
    assert sorted(p.name for p in path.parent.iterdir()) == [RESIDUAL_FILE]  # no temp files


def test_a_residual_for_other_tensors_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "0" / RESIDUAL_FILE
    compress_update(adapter(0), adapter(1), method="int8", residual_path=path)
    other = {"x.lora_A.weight": np.zeros((2, 2), np.float32)}
    with pytest.raises(CompressionError, match="residual does not match"):
        compress_update(other, other, method="int8", residual_path=path)


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
    assert decoded.rejected == {9: "compressed update: int8: delta is int8[5], expected int8[128]"}
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
    with pytest.raises(ConfigError, match=r"^compression\.method: unknown value 'int4'"):
        ExperimentConfig.from_dict({"compression": {"method": "int4"}})
    assert ExperimentConfig.from_dict({"compression": {"method": "int8"}}).compression.error_feedback
