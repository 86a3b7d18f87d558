"""Many virtual clients on a few SuperNodes: what the strategy sees, what the SuperNodes
get, and whom replies are attributed to (a recording grid stands in for the SuperLink)."""

from __future__ import annotations

import contextlib
import re
import socket

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

import fedslm.client.app as client_app
from fedslm.client.node import this_node
from fedslm.config import ConfigError, ExperimentConfig
from fedslm.runconfig import to_run_config
from fedslm.server.population import PopulationGrid, population_grid
from tests import fakes


@pytest.fixture(autouse=True)
def serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages need the run/task ids a running ServerApp has set."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)


class RecordingGrid(Grid):
    """Two SuperNodes (ids 501, 502); keeps what was pushed, answers what it is asked."""

    def __init__(self) -> None:
        self.pushed: list[Message] = []

    def set_run(self, run) -> None:  # pragma: no cover - not used
        pass

    @property
    def run(self):  # pragma: no cover - not used
        return None

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # pragma: no cover
        return Message(content, dst_node_id=dst_node_id, message_type=message_type)

    def get_node_ids(self):
        return [502, 501]

    def push_messages(self, messages):
        start = len(self.pushed)
        self.pushed += list(messages)
        return [f"id{i}" for i in range(start, len(self.pushed))]

    def pull_messages(self, message_ids):
        replies = []
        for mid in message_ids:
            sent = self.pushed[int(mid[2:])]
            replies.append(fakes.reply(sent.metadata.dst_node_id,
                                       RecordDict({"metrics": MetricRecord({"num-examples": 1})}),
                                       kind=sent.metadata.message_type, reply_to=mid, message_id=f"r{mid}",
                                       group_id=""))
        return replies

    def send_and_receive(self, messages, *, timeout=None):  # pragma: no cover - not used
        raise NotImplementedError


def test_the_strategy_samples_from_the_whole_population() -> None:
    grid = PopulationGrid(RecordingGrid(), 10_000)
    assert list(grid.get_node_ids()) == list(range(1, 10_001))
    arrays = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    strategy = FedAvg(fraction_train=0.001, min_available_nodes=2)
    messages = list(strategy.configure_train(1, arrays, ConfigRecord({"lr": 0.1}), grid))
    assert len(messages) == 10
    assert all(1 <= m.metadata.dst_node_id <= 10_000 for m in messages)


def test_each_message_goes_to_a_supernode_with_its_clients_partition_id() -> None:
    inner = RecordingGrid()
    grid = PopulationGrid(inner, 1_000)
    arrays = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    shared = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 3})})
    asked = [7, 1_000, 1, 42, 7]
    ids = list(grid.push_messages([Message(shared, dst_node_id=v, message_type="train") for v in asked]))
    assert [m.metadata.dst_node_id for m in inner.pushed] == [501, 502, 501, 502, 501]
    assert [m.content["config"]["partition-id"] for m in inner.pushed] == [6, 999, 0, 41, 6]
    assert all(m.content["config"]["server-round"] == 3 for m in inner.pushed)
    assert all(m.content["arrays"] is arrays for m in inner.pushed)  # not copied per client
    assert "partition-id" not in shared["config"]  # the strategy's shared record is untouched
    replies = list(grid.pull_messages(ids))
    assert [r.metadata.src_node_id for r in replies] == asked


def test_a_message_to_a_node_outside_the_population_is_refused() -> None:
    grid = PopulationGrid(RecordingGrid(), 5)
    with pytest.raises(ValueError, match=r"node 6 is not a virtual client \(1\.\.5\)"):
        grid.push_messages([Message(RecordDict(), dst_node_id=6, message_type="train")])


def _context(supernodes: int, engine: str = "simulation") -> Context:
    remote = {"engine": engine, "address": "127.0.0.1:1", "insecure": True}
    fed = {"supernodes": supernodes} if engine == "simulation" else remote
    cfg = ExperimentConfig.from_dict({"federation": fed})
    return Context(run_id=1, node_id=501, node_config={"partition-id": 3}, state=RecordDict(),
                   run_config=to_run_config(cfg))


def _node(supernodes: int, msg: Message, engine: str = "simulation"):
    context = _context(supernodes, engine)
    return this_node(client_app.experiment(context), context, msg)


def test_client_takes_the_partition_from_the_message_only_in_simulation() -> None:
    msg = Message(RecordDict({"config": ConfigRecord({"partition-id": 42})}), dst_node_id=501,
                  message_type="train")
    assert _node(10, msg).partition_id == 42
    assert _node(0, msg).partition_id == 42  # a simulation the server adapted to its nodes
    assert _node(0, msg, engine="remote").partition_id == 3  # a device keeps its own
    bare = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=501, message_type="train")
    assert _node(10, bare).partition_id == 3
    assert _node(10, msg).state_dir.name == "42"  # state follows the client


def test_supernodes_is_checked_by_key() -> None:
    with pytest.raises(ConfigError, match=r"^federation\.supernodes: must be >= 0"):
        ExperimentConfig.from_dict({"federation": {"supernodes": -1}})
    with pytest.raises(ConfigError, match=r"^federation\.supernodes: only applies to federation\.engine=simulation"):
        ExperimentConfig.from_dict({"federation": {"supernodes": 4, "engine": "remote", "address": "x:1"}})


def test_the_engine_starts_one_supernode_per_client_unless_pooled() -> None:
    from fedslm.simulations.launch import simulation_federation_config

    per_client = ExperimentConfig.from_dict({"federation": {"num_clients": 300}})
    pooled = ExperimentConfig.from_dict({"federation": {"num_clients": 10_000, "supernodes": 10}})
    assert simulation_federation_config(per_client).startswith("num-supernodes=300 ")
    assert simulation_federation_config(pooled) == (
        "num-supernodes=10 client-resources-num-cpus=1 client-resources-num-gpus=0.0")


def test_ray_cpus_caps_a_runs_own_ray_and_is_checked_by_key() -> None:
    from fedslm.simulations.launch import simulation_federation_config

    capped = ExperimentConfig.from_dict({"federation": {"num_clients": 3, "ray_cpus": 1}})
    assert simulation_federation_config(capped) == (
        "num-supernodes=3 client-resources-num-cpus=1 client-resources-num-gpus=0.0 "
        "init-args-num-cpus=1")
    # a sweep's shared Ray was started with the cap; a run connecting to it passes none
    assert "init-args" not in simulation_federation_config(capped, warm=True)
    with pytest.raises(ConfigError, match=r"^federation\.ray_cpus: must be >= 0"):
        ExperimentConfig.from_dict({"federation": {"ray_cpus": -1}})
    with pytest.raises(ConfigError, match=r"^federation\.ray_cpus: 1 is fewer than "
                                          r"federation\.client_num_cpus=2"):
        ExperimentConfig.from_dict({"federation": {"ray_cpus": 1, "client_num_cpus": 2}})
    with pytest.raises(ConfigError, match=r"^federation\.ray_cpus: only applies to federation\.engine=simulation"):
        ExperimentConfig.from_dict({"federation": {"ray_cpus": 2, "engine": "remote", "address": "127.0.0.1:1",
                                                   "insecure": True}})


def test_ray_address_names_a_running_ray_and_is_checked_by_key() -> None:
    from fedslm.simulations.launch import simulation_federation_config

    cfg = ExperimentConfig.from_dict({"federation": {"num_clients": 3, "ray_address": "10.0.0.5:6379"}})
    assert cfg.federation.ray_address == "10.0.0.5:6379"
    assert simulation_federation_config(cfg) == (
        "num-supernodes=3 client-resources-num-cpus=1 client-resources-num-gpus=0.0")
    assert ExperimentConfig.from_dict({"federation": {"ray_address": "[::1]:6379"}}).federation.ray_address
    for bad in ("10.0.0.5", "ray://10.0.0.5:10001", ":6379", "10.0.0.5:http", "10.0.0.5:0", "auto"):
        with pytest.raises(ConfigError, match=r"^federation\.ray_address: expected host:port of a running "
                                              rf"Ray's head .*got '{re.escape(bad)}'$"):
            ExperimentConfig.from_dict({"federation": {"ray_address": bad}})
    with pytest.raises(ConfigError, match=r"^federation\.ray_cpus: must be 0 with "
                                          r"federation\.ray_address=10\.0\.0\.5:6379: a running Ray's CPUs"):
        ExperimentConfig.from_dict({"federation": {"ray_address": "10.0.0.5:6379", "ray_cpus": 1}})
    with pytest.raises(ConfigError, match=r"^federation\.ray_address: only applies to federation\.engine=simulation$"):
        ExperimentConfig.from_dict({"federation": {"ray_address": "10.0.0.5:6379", "engine": "remote",
                                                   "address": "127.0.0.1:1", "insecure": True}})


def test_a_runs_own_ray_gets_a_fresh_token_and_a_running_ray_the_users(monkeypatch: pytest.MonkeyPatch,
                                                                        tmp_path) -> None:
    from fedslm.simulations.launch import ENGINE_ENV, running_ray_env, superlink_env

    monkeypatch.setenv("RAY_ADDRESS", "10.9.9.9:6379")  # the user's shell: followed by neither
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "u" * 64)
    own, again = superlink_env(tmp_path), superlink_env(tmp_path)
    assert "RAY_ADDRESS" not in own and own["RAY_AUTH_MODE"] == "token"
    assert len({own["RAY_AUTH_TOKEN"], again["RAY_AUTH_TOKEN"], "u" * 64}) == 3  # fresh per run
    assert len(own["RAY_AUTH_TOKEN"]) == 64
    running = superlink_env(tmp_path, ray_env=running_ray_env("10.0.0.5:6379"))
    assert (running["RAY_ADDRESS"], running["RAY_AUTH_MODE"], running["RAY_AUTH_TOKEN"]) == (
        "10.0.0.5:6379", "token", "u" * 64)  # the user's token, unchanged
    monkeypatch.delenv("RAY_AUTH_MODE")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    assert running_ray_env("10.0.0.5:6379") == {"RAY_ADDRESS": "10.0.0.5:6379"}
    assert "RAY_AUTH_TOKEN" not in superlink_env(tmp_path, ray_env=running_ray_env("10.0.0.5:6379"))
    # no idle worker prestarted for a run's driver: none could serve Flower's actors
    assert ENGINE_ENV["RAY_prestart_worker_first_driver"] == "0" == own["RAY_prestart_worker_first_driver"]


def test_a_ray_address_that_does_not_answer_fails_before_anything_starts(tmp_path) -> None:
    import psutil

    from fedslm.simulations.launch import check_ray_address
    from fedslm.simulations.run import run

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        alive = listening.getsockname()[1]
        check_ray_address(ExperimentConfig.from_dict({"federation": {"ray_address": f"127.0.0.1:{alive}"}}))
    before = set(psutil.Process().children(recursive=True))  # conftest's shared Ray, if started
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, not listening: refuses connections
        cfg = ExperimentConfig.from_dict({
            "federation": {"num_clients": 2, "num_rounds": 1, "ray_address": f"127.0.0.1:{port}"},
            "data": {"docs_per_client": 16}, "tracking": {"enabled": False}, "verbose": True,
            "output_dir": str(tmp_path / "run")})
        with pytest.raises(ConfigError, match=rf"^federation\.ray_address: nothing answers at 127\.0\.0\.1:{port} "
                                              r"\(ConnectionRefusedError: Connection refused\); start it with "
                                              r"`ray start --head`, or leave it empty for a Ray per run$"):
            run(cfg)
    assert set(psutil.Process().children(recursive=True)) - before == set()  # no SuperLink, watchdog, Ray
    assert not (tmp_path / "run" / "status.json").exists()
    check_ray_address(ExperimentConfig.from_dict({}))  # no address: nothing to check


def test_a_sweep_on_a_running_ray_starts_no_ray_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedslm.simulations import warm_engine

    superlinks: list[dict | None] = []
    heads: list[int] = []

    @contextlib.contextmanager
    def superlink(home, mark, *, verbose, ray_env=None):
        superlinks.append(ray_env)
        yield f"127.0.0.1:{9000 + len(superlinks)}"

    @contextlib.contextmanager
    def head(home, mark, *, verbose, num_cpus):
        heads.append(num_cpus)
        yield {"RAY_ADDRESS": "127.0.0.1:7000", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "t" * 64}

    monkeypatch.setattr(warm_engine, "simulation_superlink", superlink)
    monkeypatch.setattr(warm_engine, "ray_head", head)
    engine = warm_engine.WarmEngine()
    try:
        first = engine.address(verbose=False, ray_cpus=0, ray_address="10.0.0.5:6379")
        assert engine.address(verbose=False, ray_cpus=0, ray_address="10.0.0.5:6379") == first
        assert (superlinks, heads, engine.ray_address, engine.starts) == (
            [{"RAY_ADDRESS": "10.0.0.5:6379"}], [], "10.0.0.5:6379", 1)
        engine.address(verbose=False, ray_cpus=1)  # a job without one: the sweep's own Ray
        assert (heads, superlinks[-1]["RAY_ADDRESS"], engine.ray_address, engine.starts) == (
            [1], "127.0.0.1:7000", "127.0.0.1:7000", 2)
    finally:
        engine.stop()


def test_a_large_population_on_one_supernode_per_client_gets_a_hint() -> None:
    from fedslm.simulations.preflight import hints

    def cfg(**fed):
        return ExperimentConfig.from_dict({"federation": fed})

    [hint] = hints(cfg(num_clients=10000))
    assert hint.startswith("federation.num_clients=10000 runs one simulated SuperNode per client")
    assert "federation.supernodes=10" in hint
    assert hints(cfg(num_clients=1000)) == []
    assert hints(cfg(num_clients=10000, supernodes=10)) == []


@pytest.mark.parametrize(("clients", "supernodes", "engine", "pooled"), [
    (5, 0, "simulation", True),    # `flwr run .`: 2 SuperNodes for 5 clients -> adapt
    (2, 0, "simulation", False),   # one SuperNode per client: as is
    (5, 0, "remote", False),       # devices connect over time: never adapt
    (5, 3, "simulation", True),    # federation.supernodes asks for it
])
def test_population_grid_adapts_a_simulation_to_its_supernodes(clients, supernodes, engine, pooled) -> None:
    grid = RecordingGrid()
    seen = population_grid(grid, num_clients=clients, supernodes=supernodes, engine=engine)
    assert isinstance(seen, PopulationGrid) is pooled
    assert sorted(seen.get_node_ids()) == (list(range(1, clients + 1)) if pooled else [501, 502])
