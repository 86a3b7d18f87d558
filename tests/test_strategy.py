"""Strategy selection and update screening on hand-built arrays and replies."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message
from flwr.serverapp.strategy import (Bulyan, FedAdagrad, FedAdam, FedAvg, FedAvgM, FedMedian,
                                     FedProx, FedTrimmedAvg, FedYogi, Krum, MultiKrum)

from fedslm.config import STRATEGIES, ExperimentConfig
from fedslm.server.fltrust import FLTrust
from fedslm.server.strategy import build_strategy, screen_train_replies
from tests import fakes

EXPECTED = {"fedavg": FedAvg, "fedavgm": FedAvgM, "fedprox": FedProx, "fedadam": FedAdam,
            "fedyogi": FedYogi, "fedadagrad": FedAdagrad, "fedmedian": FedMedian,
            "fedtrimmedavg": FedTrimmedAvg, "krum": Krum, "multikrum": MultiKrum, "bulyan": Bulyan,
            "fltrust": FLTrust}  # FLTrust: ours, on Flower's FedAvg


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


def _scalar_replies(values: list[float]) -> list[Message]:
    """One reply per value: every adapter entry equals it, 10 examples each."""
    return [_reply(i + 1, {"a.lora_A.weight": np.full((2, 3), v, np.float32),
                           "a.lora_B.weight": np.full((3, 2), v, np.float32)})
            for i, v in enumerate(values)]


@pytest.mark.parametrize(("name", "extra", "values", "expected"), [
    ("fedmedian", {}, [1, 2, 3, 4, 100], 3.0),
    ("fedtrimmedavg", {"trim_beta": 0.2}, [1, 2, 3, 4, 100], 3.0),  # mean of 2, 3, 4
    # Krum: the update with the least summed squared distance to its n - f - 2 = 2 nearest:
    # 2 and 3 tie (1 + 1 per entry); Flower takes the first
    ("krum", {"num_malicious": 1}, [1, 2, 3, 4, 100], 2.0),
    ("multikrum", {"num_malicious": 1, "num_selected": 2}, [1, 2, 3, 4, 100], 2.5),
    # Bulyan, f = 1, n = 7: Krum selects theta = 5 (1..5, never 100), then the mean of the
    # beta = 3 values nearest their median 3: 2, 3, 4
    ("bulyan", {"num_malicious": 1}, [1, 2, 3, 4, 5, 6, 100], 3.0),
])
def test_each_robust_rule_gives_the_known_result_on_screened_replies(name, extra, values, expected):
    cfg = ExperimentConfig.from_dict({"strategy": {"name": name, **extra},
                                      "federation": {"num_clients": len(values)}})
    screened = screen_train_replies(_scalar_replies(values), REFERENCE)
    arrays, _ = build_strategy(cfg).aggregate_train(1, screened.accepted)
    np.testing.assert_allclose(arrays["a.lora_A.weight"].numpy(), np.full((2, 3), expected))


@pytest.mark.parametrize(("overrides", "message"), [
    ({"privacy": {"mode": "dp_fedavg"}, "strategy": {"name": "fedmedian"}},
     "strategy.name: privacy.mode=dp_fedavg cannot wrap fedmedian"),
    ({"personalization": {"method": "local_only"}, "strategy": {"name": "krum", "num_malicious": 1}},
     "strategy.name: krum aggregates updates, but personalization.method=local_only sends none"),
    ({"personalization": {"method": "local_only"}, "compression": {"method": "int8"}},
     "compression.method: int8 compresses an update, but personalization.method=local_only"),
    ({"privacy": {"mode": "dp_fedavg", "clip_side": "client"}, "compression": {"method": "int4"}},
     "compression.method: int4 cannot be combined with privacy.clip_side=client"),
    ({"strategy": {"name": "bulyan", "num_malicious": 2}},
     "strategy.num_malicious: bulyan needs >= 4 * 2 + 3 = 11 sampled clients"),
    ({"strategy": {"name": "fedavg", "num_selected": 3}},
     "strategy.num_selected: is only used by multikrum, not fedavg"),
    ({"attack": {"kind": "scale"}, "federation": {"engine": "remote", "address": "127.0.0.1:1", "insecure": True}},
     "attack.kind: scale is for simulation only, not federation.engine=remote"),
    ({"robust": {"clip": "sometimes"}}, "robust.clip: unknown value 'sometimes'"),
    ({"robust": {"weight_cap": 0.5}}, "robust.weight_cap: must be 0 (off) or >= 1, got 0.5"),
])
def test_combinations_that_cannot_work_are_refused_in_one_line(overrides, message):
    from fedslm.config import ConfigError

    with pytest.raises(ConfigError) as err:
        ExperimentConfig.from_dict(overrides)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan", "fltrust"])
def test_robust_rules_have_no_round_to_round_state_so_resume_is_exact(name: str) -> None:
    from fedslm.server.checkpoint import restore_strategy_state, strategy_state

    strategy = build_strategy(ExperimentConfig.from_dict({"strategy": {"name": name}}))
    assert strategy_state(strategy) == {}
    restore_strategy_state(strategy, {})  # what a resumed run does with an empty state
