"""SecAgg+ on the deployment engine: a round's time with and without it, for
``python -m fedslm.simulations.bench secagg --deployment-agents 3``.

One local deployment (``fedslm.simulations.local_deployment``: a TLS SuperLink with node
authentication on 127.0.0.1 and real device agents on their own data) serves two runs
in turn, plain FedAvg first, then SecAgg+, same settings; each round's seconds come from
the run's summary (train and evaluate phases, as the ServerApp times them).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from fedslm.simulations.local_deployment import Deployment

SETTINGS = [
    "training.local_steps=5",
    "training.batch_size=4",
    "training.central_eval=false",
    "federation.initial_evaluation=false",
    "federation.round_timeout=300",
    "tracking.enabled=false",
]


def _run(dep: Deployment, name: str, agents: int, rounds: int, extra: list[str]) -> dict[str, Any]:
    proc = dep.submit(
        *SETTINGS,
        f"federation.num_clients={agents}",
        f"federation.num_rounds={rounds}",
        f"strategy.min_train_clients={agents}",
        f"strategy.min_evaluate_clients={agents}",
        *extra,
        name=name,
    )
    if proc.wait(timeout=900) != 0:
        raise SystemExit(f"the {name} run failed\n{dep.tail()}")
    return json.loads((dep.root / "hydra" / name / "summary.json").read_text())


def deployment_rounds(agents: int, *, rounds: int = 2) -> list[dict[str, Any]]:
    """Per round of each run: seconds, the ratio to plain's same round, SecAgg+ server
    CPU and uplink bytes per client."""
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedslm-secagg-deploy-") as tmp:
        dep = Deployment(Path(tmp))
        try:
            dep.start_federation(agents)
            runs = {
                "plain": _run(dep, "plain", agents, rounds, []),
                "secaggplus": _run(dep, "secaggplus", agents, rounds, ["secure_aggregation=secaggplus"]),
            }
        finally:
            dep.stop_all()
    plain = {r["round"]: r["round_seconds"] for r in runs["plain"]["rounds"] if r["round"] >= 1}
    for method, summary in runs.items():
        for r in (r for r in summary["rounds"] if r["round"] >= 1):
            rows.append(
                {
                    "aggregation": method,
                    "round": r["round"],
                    "round_seconds": r["round_seconds"],
                    "round_time_ratio": r["round_seconds"] / plain[r["round"]],
                    "server_secagg_cpu_s": r.get("secagg_server_cpu_seconds"),
                    "survivors": r.get("secagg_survivors", r.get("clients_sampled")),
                    "bytes_up_per_client": r["bytes_up"] / r["clients_sampled"],
                }
            )
    return rows
