"""SecAgg+ on Flower's deployment engine: a TLS SuperLink with node authentication and
3 device agents; one agent is killed while it trains in the masked-input stage, and the
round still unmasks the sum of the other two from the shares the victim sent before."""

from __future__ import annotations

import pytest

from fedslm.simulations.local_deployment import Deployment, kill_tree
from tests.test_deploy_e2e import (  # noqa: F401  (the shared federation and its checks)
    client_rows,
    each_test_stops_what_it_started,
    federation,
    finish,
    summary,
    tracking,
    wait_for,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

SECAGG = ["training.local_steps=2", "training.batch_size=4", "training.central_eval=false",
          "strategy.fraction_evaluate=0.5", "strategy.min_evaluate_clients=1",
          "strategy.min_train_clients=3", "federation.num_clients=3", "federation.num_rounds=1",
          "federation.initial_evaluation=false", "federation.round_timeout=90",
          "secure_aggregation=secaggplus", "secure_aggregation.threshold=2"]


def test_agent_killed_mid_protocol_round_unmasks_the_others(federation: Deployment) -> None:  # noqa: F811
    dep = federation
    victim = 3
    log = dep.root / "logs" / f"agent-{victim}.log"
    seen = log.read_text().count("Receiving: train.secagg_masked message")
    proc = dep.submit(*SECAGG, *tracking(dep.root), name="secagg-agent-killed")
    wait_for(lambda: log.read_text().count("Receiving: train.secagg_masked message") > seen, 150,
             "agent 3 to receive its masked-input stage", dep)
    kill_tree(dep.agents[victim].pid)  # the device dies after sharing its keys
    dep.agents[victim].wait(timeout=10)
    dep.start_agent(victim, dep.data[victim - 1])  # type: ignore[attr-defined]
    finish(proc, dep, timeout=360)
    out = dep.root / "hydra" / "secagg-agent-killed"
    result = summary(out)
    r1 = result["rounds"][0]
    assert (r1["secagg_survivors"], r1["secagg_dropped"], r1["secagg_abandoned"]) == (2, 1, 0)
    victim_id = dep.node_ids[victim]  # type: ignore[attr-defined]
    train = [r for r in client_rows(out) if r["phase"] == "train"]
    status = {r["node_id"]: r["status"] for r in train}
    # the SuperLink answers for a node that stopped heart-beating ("failed"), or the stage's
    # deadline passes first ("timed_out"): either way it is a dropout, recovered from shares
    assert status.pop(str(victim_id)) in ("failed", "timed_out")
    assert sorted(status.values()) == ["ok", "ok"]
    # no DP: weighted as plain FedAvg (auto), by the survivors' example counts sent in clear
    assert r1["secagg_weighted"] == 1
    assert r1["secagg_weight_total"] == sum(int(r["num-examples"]) for r in train if r["status"] == "ok")
    wait_for(lambda: log.read_text().count(f"SuperNode ID: {victim_id}") >= 2, 120,
             "the rebooted agent to be accepted again", dep)
