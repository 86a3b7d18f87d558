"""FLTrust (fedslm.server.fltrust): trust scores and the aggregate on hand-built deltas
(exact values), the round loop's columns and metrics, the root records and the config
refusals."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedslm.compression import update_records
from fedslm.config import ConfigError, DataConfig, ExperimentConfig
from fedslm.data import central_test_texts, load_client_split, root_texts
from fedslm.data.core import DataError
from fedslm.server.fltrust import FLTrust, fltrust_aggregate
from fedslm.server.rounds import RoundPlan, train_phase
from fedslm.server.strategy import build_strategy
from tests.fakes import arrays

R = 1 / math.sqrt(2)
ROOT = {"w": np.array([1.0, 0.0])}  # δ₀


def _one(delta: list[float]) -> tuple[list[float], np.ndarray | None]:
    got = fltrust_aggregate([{"w": np.array(delta)}], ROOT)
    return got.trust, None if got.delta is None else got.delta["w"]


def test_each_update_is_trusted_by_its_direction_and_counts_at_the_servers_size() -> None:
    trust, counted = _one([2, 0])
    assert trust == [1.0] and counted.tolist() == [1.0, 0.0]
    trust, counted = _one([1, 1])
    assert trust == pytest.approx([R], abs=1e-15)
    np.testing.assert_allclose(counted, [R, R], atol=1e-15)
    for away in ([-1, 0], [0, 3], [0, 0]):  # opposite, orthogonal, no update at all
        assert _one(away) == ([0.0], None)


def test_the_aggregate_of_a_mix_is_the_trust_weighted_mean_of_the_rescaled_updates() -> None:
    deltas = [{"w": np.array(d, dtype=float)} for d in ([2, 0], [1, 1], [-1, 0], [0, 3])]
    got = fltrust_aggregate(deltas, ROOT)
    assert got.trust == pytest.approx([1.0, R, 0.0, 0.0], abs=1e-15)
    # (1 * [1, 0] + (1/√2) * [1/√2, 1/√2]) / (1 + 1/√2)
    np.testing.assert_allclose(got.delta["w"], np.array([1.5, 0.5]) / (1 + R), rtol=1e-15)


def test_trust_is_over_all_tensors_at_once_and_shapes_are_kept() -> None:
    root = {"a": np.array([[1.0]]), "head": np.array([0.0, 0.0])}
    update = {"a": np.array([[1.0]]), "head": np.array([1.0, 0.0])}  # 45° from δ₀ over both
    got = fltrust_aggregate([update], root)
    assert got.trust == pytest.approx([R], abs=1e-15)
    assert got.delta["a"].shape == (1, 1) and got.delta["head"].shape == (2,)
    np.testing.assert_allclose(got.delta["a"], [[R]], atol=1e-15)
    np.testing.assert_allclose(got.delta["head"], [R, 0.0], atol=1e-15)
    assert fltrust_aggregate([update], {k: np.zeros_like(v) for k, v in root.items()}).trust == [0.0]


# ---- the round loop ------------------------------------------------------------------

GLOBAL = {"m.lora_A.weight": np.array([[0.5, 0.5], [0.0, 0.0]], np.float32)}
DELTAS = {1: [2, 0, 0, 0], 2: [1, 1, 0, 0], 3: [-1, 0, 0, 0], 4: [0, 3, 0, 0]}


@pytest.fixture
def in_a_serverapp(monkeypatch):
    """Flower stamps messages with the task's identity, set in a real ServerApp process."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


class ScriptedGrid:
    """Nodes 1..4 answering each train message with global + DELTAS[node], sent as the
    configured compression sends it."""

    def __init__(self, compression: str) -> None:
        self.compression, self.outbox = compression, {}

    def get_node_ids(self):
        return list(DELTAS)

    def push_messages(self, messages):
        ids = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = msg_id = f"train-{i}"
            node = msg.metadata.dst_node_id
            sent = {k: v.numpy() for k, v in msg.content.array_records["arrays"].items()}
            trained = {k: v + np.array(DELTAS[node], np.float32).reshape(v.shape) for k, v in sent.items()}
            records = update_records(trained, sent, method=self.compression, residual_path=None)
            content = RecordDict({**records, "metrics": MetricRecord({"num-examples": 10, "partition-id": node - 1})})
            reply = Message(content, reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = node
            self.outbox[msg_id] = reply
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids):
        return [self.outbox.pop(i) for i in list(message_ids) if i in self.outbox]


def _strategy(root: list[float]) -> FLTrust:
    cfg = ExperimentConfig.from_dict({"strategy": {"name": "fltrust"}, "federation": {"num_clients": 4}})
    strategy = build_strategy(cfg)
    assert isinstance(strategy, FLTrust)
    strategy.server_update = lambda rnd, glob: {"m.lora_A.weight": np.array(root, float).reshape(2, 2)}
    return strategy


@pytest.mark.parametrize("compression", ["none", "fp16", "int8"])
def test_the_round_loop_decodes_bounds_then_trusts_and_logs_each_clients_trust(in_a_serverapp, compression) -> None:
    plan = RoundPlan(num_rounds=1, timeout=30.0, compression=compression)  # default bounds on
    new, metrics, rows = train_phase(ScriptedGrid(compression), _strategy([1, 0, 0, 0]), plan, 1, arrays(GLOBAL))
    # the default clip rescales nodes 1 and 4 to the median norm: a direction is kept, so
    # FLTrust's result is the same as on unclipped updates
    assert metrics["robust_clipped_fraction"] == 0.5
    expected = GLOBAL["m.lora_A.weight"] + np.array([[1.5, 0.5], [0, 0]], np.float32) / (1 + R)
    np.testing.assert_allclose(new["m.lora_A.weight"].numpy(), expected, rtol=1e-6)
    assert new["m.lora_A.weight"].numpy().dtype == np.float32
    assert {r["node_id"]: r["trust"] for r in rows} == pytest.approx({1: 1.0, 2: R, 3: 0.0, 4: 0.0}, abs=1e-6)
    assert metrics["robust_trust_zero_fraction"] == 0.5
    assert metrics["robust_trust_median"] == pytest.approx(R / 2, abs=1e-6)
    assert metrics["robust_root_update_norm"] == 1.0


def test_with_no_update_trusted_the_global_stays_and_one_line_says_so(in_a_serverapp, caplog) -> None:
    plan = RoundPlan(num_rounds=2, timeout=30.0)
    new, metrics, rows = train_phase(ScriptedGrid("none"), _strategy([0, 0, 1, 0]), plan, 2, arrays(GLOBAL))
    assert np.array_equal(new["m.lora_A.weight"].numpy(), GLOBAL["m.lora_A.weight"])
    assert metrics["robust_trust_zero_fraction"] == 1.0 and all(r["trust"] == 0.0 for r in rows)
    said = [r.getMessage() for r in caplog.records if "fltrust" in r.getMessage()]
    assert said == [
        "[round 2] fltrust: no update points within 90 degrees of the server's root "
        "update (all 4 trust 0); the global adapter is unchanged"
    ]


def test_fltrust_keeps_no_state_between_rounds_so_resume_is_exact(in_a_serverapp) -> None:
    from fedslm.server.checkpoint import strategy_state

    strategy = _strategy([1, 0, 0, 0])
    train_phase(ScriptedGrid("none"), strategy, RoundPlan(num_rounds=1, timeout=30.0), 1, arrays(GLOBAL))
    assert strategy_state(strategy) == {}  # δ₀ is recomputed each round from the global


def test_the_bench_reports_the_trust_attackers_and_honest_clients_got() -> None:
    from fedslm.simulations.bench.robustness import trust_summary

    trusted = [(0, 0.0), (1, 0.0), (2, 0.5), (3, 0.0), (2, 1.0)]  # (partition id, trust)
    assert trust_summary(trusted, malicious=2) == {
        "trust_mean_malicious": 0.0,
        "trust_zero_fraction_malicious": 1.0,
        "trust_mean_honest": 0.5,
        "trust_zero_fraction_honest": 1 / 3,
    }
    assert trust_summary(trusted, malicious=0) == {"trust_mean_honest": 0.3, "trust_zero_fraction_honest": 0.6}


# ---- the server's root records and update --------------------------------------------


@pytest.mark.parametrize("task", ["causal_lm", "instruct", "classify"])
def test_the_simulated_root_records_are_no_clients_and_not_central_evaluations(task: str) -> None:
    data, n = DataConfig(), 10
    root = root_texts(data, num_clients=n, task=task, root_docs=32)
    assert len(root) == 32 == len(set(root))
    seen = set(central_test_texts(data, num_clients=n, task=task))
    for pid in range(n):
        split = load_client_split(data, num_clients=n, partition_id=pid, task=task)
        seen |= set(split.train) | set(split.test)
    assert not set(root) & seen
    assert root == root_texts(data, num_clients=n, task=task, root_docs=32)  # reproducible


def test_a_root_data_file_is_read_with_the_tasks_loader_and_a_bad_one_names_the_key(tmp_path: Path) -> None:
    good = tmp_path / "root.jsonl"
    good.write_text('{"text": "the farmer plows the field"}\n{"text": "the sailor sails"}\n')
    assert root_texts(DataConfig(), num_clients=3, root_docs=0, root_data=str(good)) == (
        "the farmer plows the field",
        "the sailor sails",
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    for path, problem in (
        (bad, f"strategy.root_data: {bad}:2: malformed JSON"),
        (tmp_path / "missing.jsonl", f"strategy.root_data: {tmp_path / 'missing.jsonl'} does not exist"),
    ):
        with pytest.raises(DataError) as err:
            root_texts(DataConfig(), num_clients=3, root_docs=32, root_data=str(path))
        assert str(err.value).startswith(problem) and "\n" not in str(err.value)


def test_a_missing_root_file_fails_preflight_in_one_line_naming_the_key(tmp_path: Path) -> None:
    """Preflight runs before any engine starts; the launcher prints its DataError's one
    line and exits 2 (fedslm.simulations.run.EXPECTED_ERRORS)."""
    from fedslm.simulations.preflight import check_data

    missing = tmp_path / "root.jsonl"
    cfg = ExperimentConfig.from_dict({"strategy": {"name": "fltrust", "root_data": str(missing)}})
    with pytest.raises(DataError) as err:
        check_data(cfg)
    assert str(err.value) == f"strategy.root_data: {missing} does not exist"


def test_a_relative_root_file_reaches_the_serverapp_as_an_absolute_path(tmp_path: Path, monkeypatch) -> None:
    from fedslm.simulations.run import absolute_paths

    monkeypatch.chdir(tmp_path)  # the engine's processes run elsewhere
    cfg = ExperimentConfig.from_dict({"strategy": {"name": "fltrust", "root_data": "root.jsonl"}})
    assert absolute_paths(cfg).strategy.root_data == str(tmp_path.resolve() / "root.jsonl")


@pytest.mark.parametrize("task", ["causal_lm", "classify"])
def test_the_servers_update_is_the_clients_plain_loop_on_the_root_records(task: str) -> None:
    from fedslm.server.experiment import initial_adapter
    from fedslm.server.fltrust import root_update

    cfg = ExperimentConfig.from_dict(
        {"task": {"name": task}, "strategy": {"name": "fltrust", "root_docs": 8}, "training": {"local_steps": 2}}
    )
    glob = initial_adapter(cfg)
    update = root_update(cfg)
    delta = update(1, glob)
    assert set(delta) == set(glob) and all(delta[k].shape == glob[k].shape for k in glob)
    assert all(np.array_equal(delta[k], d) for k, d in update(1, glob).items())  # one seed per round
    moved = {k for k, d in delta.items() if np.abs(d).max() > 0}
    assert any("lora_B" in k for k in moved)
    if task == "classify":  # the head travels, so it is part of δ₀
        assert any("lora" not in k for k in moved)


# ---- the config check ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"secure_aggregation": {"method": "secaggplus"}},
            "strategy.name: fltrust cannot run with secure_aggregation.method=secaggplus",
        ),
        ({"privacy": {"mode": "dp_fedavg"}}, "strategy.name: fltrust cannot run with privacy.mode=dp_fedavg"),
        (
            {"privacy": {"mode": "dp_sgd+dp_fedavg"}},
            "strategy.name: fltrust cannot run with privacy.mode=dp_sgd+dp_fedavg",
        ),
        (
            {"personalization": {"method": "local_only"}},
            "strategy.name: fltrust aggregates updates, but personalization.method=local_only sends none",
        ),
        (
            {"data": {"source": "text_files", "path": "/x"}},
            "strategy.root_data: strategy.name=fltrust needs root data: name a file in task.name=causal_lm's format",
        ),
        ({"strategy": {"root_docs": 0}}, "strategy.root_docs: strategy.name=fltrust needs root data"),
        ({"peft": {"ranks": "0 r=4, * r=8"}}, "peft.ranks: cannot run with strategy.name=fltrust"),
        ({"aggregation": {"name": "flora"}}, "aggregation.name: cannot run with strategy.name=fltrust"),
        ({"strategy": {"name": "fedavg", "root_data": "/x.jsonl"}}, "strategy.root_data: is only used by fltrust"),
        ({"strategy": {"root_docs": -1}}, "strategy.root_docs: must be >= 0, got -1"),
    ],
)
def test_combinations_fltrust_cannot_work_with_are_refused_in_one_line(overrides, message) -> None:
    cfg = {"strategy": {"name": "fltrust"}, **overrides}
    cfg["strategy"] = {"name": "fltrust", **overrides.get("strategy", {})}
    with pytest.raises(ConfigError) as err:
        ExperimentConfig.from_dict(cfg)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_fltrust_runs_with_dp_sgd_clients_compression_and_a_root_file_beside_other_data() -> None:
    ok = {"privacy": {"mode": "dp_sgd"}, "compression": {"method": "int8"}}
    assert ExperimentConfig.from_dict({"strategy": {"name": "fltrust"}, **ok}).strategy.root_docs == 32
    ExperimentConfig.from_dict(
        {"strategy": {"name": "fltrust", "root_data": "/r.jsonl"}, "data": {"source": "text_files", "path": "/x"}}
    )
