"""What the server records for a straggling device, on a real local deployment.

    python -m fedslm.simulations.bench.straggler                 # 2 devices, 3 rounds, 25 s deadline

Device 2's ClientApp is frozen (SIGSTOP) as soon as it starts round 1's training and thawed
after round 1 has ended, like a device that stalls past the deadline and wakes up. The
script prints each round's status of both devices from clients.csv: the straggler is
dropped for round 1, its late reply is never counted for a later round, and it rejoins.
"""

from __future__ import annotations

import argparse
import csv
import os
import signal
import tempfile
import time
from pathlib import Path

from fedslm.simulations.local_deployment import Deployment, descendants


def clientapp_of(agent_pid: int) -> int | None:
    for pid in descendants(agent_pid):
        try:
            if b"flwr-clientapp" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            continue
    return None


def wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def run(root: Path, *, rounds: int, deadline: float) -> list[dict]:
    dep = Deployment(root)
    try:
        dep.start_federation(2)
        log = root / "logs" / "straggler.log"
        proc = dep.submit("federation.num_clients=2", f"federation.num_rounds={rounds}",
                          "training.local_steps=2", "training.central_eval=false",
                          "strategy.min_train_clients=1", "strategy.min_evaluate_clients=1",
                          "strategy.fraction_evaluate=0.5", f"federation.round_timeout={deadline}",
                          f"tracking.uri=sqlite:///{root / 'mlflow.db'}", name="straggler")
        wait(lambda: log.exists() and "configure_train" in log.read_text(), 600,
             "round 1 to start")
        before = clientapp_of(dep.agents[2].pid)  # possibly round 0's, on its way out
        wait(lambda: clientapp_of(dep.agents[2].pid) not in (None, before), 120,
             "device 2's round-1 ClientApp")
        frozen = clientapp_of(dep.agents[2].pid)
        os.kill(frozen, signal.SIGSTOP)
        print(f"froze device 2's ClientApp (pid {frozen}) in round 1", flush=True)
        wait(lambda: f"[round 1/{rounds}] |" in log.read_text(), 600, "round 1 to end")
        os.kill(frozen, signal.SIGCONT)
        print("thawed it after round 1 ended", flush=True)
        if proc.wait(timeout=900) != 0:
            raise SystemExit(f"the run failed\n{dep.tail()}")
        with open(root / "hydra" / "straggler" / "clients.csv") as fh:
            return [r for r in csv.DictReader(fh) if r["phase"] == "train"]
    finally:
        dep.stop_all()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--deadline", type=float, default=25.0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fedslm-straggler-") as tmp:
        rows = run(Path(tmp), rounds=args.rounds, deadline=args.deadline)
    nodes = list(dict.fromkeys(r["node_id"] for r in rows))
    print(f"{'round':>5}  " + "  ".join(f"node {n[:8]}…" for n in nodes))
    for rnd in sorted({int(r["round"]) for r in rows}):
        status = {r["node_id"]: r["status"] for r in rows if int(r["round"]) == rnd}
        print(f"{rnd:>5}  " + "  ".join(f"{status.get(n, '-'):>14}" for n in nodes))


if __name__ == "__main__":
    main()
