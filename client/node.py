"""Who this client is and where its things live: partition, local data, state dir.

A SuperNode's ``--node-config`` reaches every ClientApp as ``context.node_config``:

* simulation: ``partition-id`` (and ``num-partitions``), set by Flower per virtual node;
* a device (``python -m fedslm.client.agent``): ``data-path`` (its own files) and ``state-dir``.

The state dir is this client's own dir for what must outlive one message, one run and
a restart of the device: its personal adapter (``personal/``), its privacy ledger
(``privacy.json``) and, on a device, ``participation.jsonl`` recording each round the
node took part in, for its owner. Nothing in it is sent to the server. This is the one
rule for where client state lives: a device's ``state-dir`` as given; in simulation
``<simulation_base>/<partition id>`` (``<output_dir>/clients/<id>`` by default, see
``fedslm.rundir.resolve_state_dir``), so memory never grows with the population.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedslm.keys import CONFIG_KEY, PARTITION_ID
from fedslm.rundir import resolve_state_dir

if TYPE_CHECKING:
    from flwr.app import Context, Message

    from fedslm.config import ExperimentConfig

PARTICIPATION_FILE = "participation.jsonl"
SEED_SPACE = 2**31 - 1


@dataclass(frozen=True)
class NodeSetup:
    """What the node config says about this client."""

    partition_id: int  # simulation partition; on a device a stable number from its node id
    data_path: str  # "" -> use the partition of the configured corpus
    state_dir: Path  # this client's own dir
    participation_log: Path | None  # devices only (state-dir given)


def node_setup(node_config: Mapping[str, object], *, node_id: int,
               simulation_base: Path) -> NodeSetup:
    """Read the node config; a device without ``partition-id`` is seeded by its node id."""
    if "partition-id" in node_config:
        partition_id = int(node_config["partition-id"])  # type: ignore[arg-type]
    else:
        partition_id = node_id % SEED_SPACE
    data_path = str(node_config.get("data-path", ""))
    state_dir = str(node_config.get("state-dir", ""))
    base = Path(state_dir) if state_dir else Path(simulation_base) / str(partition_id)
    log = Path(state_dir) / PARTICIPATION_FILE if state_dir else None
    return NodeSetup(partition_id=partition_id, data_path=data_path, state_dir=base,
                     participation_log=log)


def this_node(cfg: ExperimentConfig, context: Context, msg: Message | None = None) -> NodeSetup:
    """This client's partition, data path and state dir. When a few simulated SuperNodes
    serve many clients (``federation.supernodes``, or a simulation started with fewer
    SuperNodes than clients), the server names the partition in the message; a real
    device's partition is never the server's to choose."""
    node_config = dict(context.node_config)
    if msg is not None and cfg.federation.engine == "simulation":
        config = msg.content.config_records.get(CONFIG_KEY, {})
        if PARTITION_ID in config:
            node_config[PARTITION_ID] = int(config[PARTITION_ID])
    return node_setup(node_config, node_id=context.node_id,
                      simulation_base=resolve_state_dir(cfg, run_id=context.run_id))


def record_participation(log: Path | None, *, run_id: int, server_round: int,
                         phase: str, metrics: Mapping[str, object]) -> None:
    """Append one line to the node's participation log: when, which run and round, what."""
    if log is None:
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    row = {"time": round(time.time(), 3), "run_id": run_id, "round": server_round, "phase": phase,
           **{k: metrics[k] for k in ("num-examples", "loss", "steps") if k in metrics}}
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


def read_participation(state_dir: Path) -> list[dict]:
    path = state_dir / PARTICIPATION_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
