"""Who this client is and where its things live: partition, local data, state dir.

A SuperNode's ``--node-config`` reaches every ClientApp as ``context.node_config``:

* simulation: ``partition-id`` (and ``num-partitions``), set by Flower per virtual node;
* a device (``python -m client.agent``): ``data-path`` (its own files) and ``state-dir``.

The state dir is where a client keeps what must outlive one message, one run and a
restart of the device: the personal adapter and the privacy ledger take it as their
base dir (``node_setup(...).state_dir / "personal"``, ``... / "privacy"``). On a device
``participation.jsonl`` there records each round the node took part in, for its owner.
Nothing in the state dir is sent to the server. Without ``state-dir`` (simulation) it is
``<output_dir>/client-state/partition-<id>``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

PARTICIPATION_FILE = "participation.jsonl"
SEED_SPACE = 2**31 - 1


@dataclass(frozen=True)
class NodeSetup:
    """What the node config says about this client."""

    partition_id: int  # simulation partition; on a device a stable number from its node id
    data_path: str  # "" -> use the partition of the configured corpus
    state_dir: Path | None  # None when neither state-dir nor an output dir is known
    participation_log: Path | None  # devices only (state-dir given)


def node_setup(node_config: Mapping[str, object], *, node_id: int, output_dir: str) -> NodeSetup:
    """Read the node config; a device without ``partition-id`` is seeded by its node id."""
    if "partition-id" in node_config:
        partition_id = int(node_config["partition-id"])  # type: ignore[arg-type]
    else:
        partition_id = node_id % SEED_SPACE
    data_path = str(node_config.get("data-path", ""))
    state_dir = str(node_config.get("state-dir", ""))
    if state_dir:
        base: Path | None = Path(state_dir)
    elif output_dir:
        base = Path(output_dir) / "client-state" / f"partition-{partition_id}"
    else:
        base = None
    log = Path(state_dir) / PARTICIPATION_FILE if state_dir else None
    return NodeSetup(partition_id=partition_id, data_path=data_path, state_dir=base,
                     participation_log=log)


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
