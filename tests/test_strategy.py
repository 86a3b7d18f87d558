"""Strategy selection and update screening on hand-built arrays and replies."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedProx, FedYogi

from fedslm.config import STRATEGIES, ExperimentConfig
from fedslm.server.strategy import build_strategy, screen_train_replies
from tests import fakes

EXPECTED = {"fedavg": FedAvg, "fedavgm": FedAvgM, "fedprox": FedProx, "fedadam": FedAdam,
            "fedyogi": FedYogi, "fedadagrad": FedAdagrad}


@pytest.mark.parametrize("name", STRATEGIES)
def test_each_strategy_name_builds_flowers_strategy(name: str) -> None:
    cfg = ExperimentConfig.from_dict({"strategy": {"name": name, "fraction_train": 0.5}})
    strategy = build_strategy(cfg)
    assert type(strategy) is EXPECTED[name]
    assert strategy.fraction_train == 0.5


def test_fedprox_carries_mu() -> None:
    cfg = ExperimentConfig.from_dict({"strategy": {"name": "fedprox", "proximal_mu": 0.25}})
    assert build_strategy(cfg).proximal_mu == 0.25


def _reply(node: int, arrays: dict[str, np.ndarray], n: object = 10) -> Message:
    return fakes.train_reply(node, arrays, num_examples=n if isinstance(n, int) else None)


REFERENCE = ArrayRecord({"a.lora_A.weight": Array(np.zeros((2, 3), np.float32)),
                         "a.lora_B.weight": Array(np.zeros((3, 2), np.float32))})


def _good() -> dict[str, np.ndarray]:
    return {"a.lora_A.weight": np.ones((2, 3), np.float32), "a.lora_B.weight": np.ones((3, 2), np.float32)}


def test_screening_keeps_honest_updates_and_names_the_problem_of_others() -> None:
    nan = _good()
    nan["a.lora_A.weight"][0, 0] = np.nan
    wrong_shape = _good()
    wrong_shape["a.lora_B.weight"] = np.ones((4, 2), np.float32)
    extra = {**_good(), "model.embed_tokens.weight": np.ones((5, 2), np.float32)}
    replies = [_reply(1, _good()), _reply(2, nan), _reply(3, wrong_shape), _reply(4, extra),
               _reply(5, _good(), n=None)]
    screened = screen_train_replies(replies, REFERENCE)
    assert [m.metadata.src_node_id for m in screened.accepted] == [1]
    assert screened.rejected[2] == "tensor a.lora_A.weight has non-finite values"
    assert screened.rejected[3] == "tensor a.lora_B.weight has shape (4, 2), expected (3, 2)"
    assert screened.rejected[4].startswith("unexpected tensors ['model.embed_tokens.weight']")
    assert screened.rejected[5] == "bad num-examples: None"


def test_fedavg_on_screened_updates_is_the_weighted_mean() -> None:
    a = {"a.lora_A.weight": np.full((2, 3), 1.0, np.float32), "a.lora_B.weight": np.full((3, 2), 2.0, np.float32)}
    b = {"a.lora_A.weight": np.full((2, 3), 4.0, np.float32), "a.lora_B.weight": np.full((3, 2), 8.0, np.float32)}
    bad = {"a.lora_A.weight": np.full((2, 3), np.inf, np.float32), "a.lora_B.weight": np.zeros((3, 2), np.float32)}
    screened = screen_train_replies([_reply(1, a, 1), _reply(2, b, 3), _reply(3, bad, 100)], REFERENCE)
    arrays, _ = FedAvg().aggregate_train(1, screened.accepted)
    np.testing.assert_allclose(arrays["a.lora_A.weight"].numpy(), np.full((2, 3), 3.25))
    np.testing.assert_allclose(arrays["a.lora_B.weight"].numpy(), np.full((3, 2), 6.5))


def _npy(header_shape: tuple[int, ...], descr: str = "<f4", data: bytes = b"") -> bytes:
    import io

    from numpy.lib import format as npy

    buf = io.BytesIO()
    npy.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": header_shape})
    return buf.getvalue() + data


def _raw(node: int, name_to_array: dict[str, Array]) -> Message:
    good = {k: Array(v) for k, v in _good().items()}
    return _reply_record(node, ArrayRecord({**good, **name_to_array}))


def _reply_record(node: int, record: ArrayRecord) -> Message:
    return fakes.train_reply(node, record, num_examples=3)


def test_hostile_payloads_are_rejected_before_numpy_reads_them() -> None:
    """The declared shape is right each time; the payload lies (a hostile client)."""
    import io

    name = "a.lora_B.weight"

    def arr(data: bytes, stype: str = "numpy.ndarray") -> Array:
        return Array(dtype="float32", shape=(3, 2), stype=stype, data=data)

    nine = io.BytesIO()
    np.save(nine, np.ones((3, 3), np.float32))
    objects = io.BytesIO()
    np.save(objects, np.array([None] * 6, dtype=object).reshape(3, 2), allow_pickle=True)
    replies = [
        _raw(1, {name: arr(nine.getvalue())}),                          # header says (3, 3)
        _raw(2, {name: arr(_npy((10**11,), data=b"\0" * 8))}),           # would allocate 400 GB
        _raw(3, {name: arr(b"garbage, not an npy file")}),
        _raw(4, {name: arr(_npy((3, 2), data=b"\0" * 24), stype="torch")}),
        _raw(5, {name: arr(objects.getvalue())}),
        _raw(6, {name: arr(_npy((3, 2), data=b"\0" * 20))}),             # 4 bytes short
        _raw(7, {}),                                                     # honest
    ]
    screened = screen_train_replies(replies, REFERENCE)
    assert [m.metadata.src_node_id for m in screened.accepted] == [7]
    assert screened.rejected == {
        1: f"tensor {name}: payload holds shape (3, 3), expected (3, 2)",
        2: f"tensor {name}: payload holds shape (100000000000,), expected (3, 2)",
        3: f"tensor {name}: payload is not an npy array (the magic string is not correct; "
           "expected b'\\x93NUMPY', got b'garbag')",
        4: f"tensor {name}: serialized as 'torch', expected 'numpy.ndarray'",
        5: f"tensor {name}: payload dtype object is not a plain number type",
        6: f"tensor {name}: payload has 20 data bytes, expected 24",
    }
